"""Pure-PyTorch reference math of Q3R: the specification, the CPU fallback, the test oracle.

Everything here follows ../shared/SPEC.md sections 2 and 3. Shapes use a leading batch
dimension "..." wherever it costs nothing, so the same functions serve one target or a stack
of same-shaped targets. All arithmetic runs in float32 (or float64 when the input is float64)
whatever the dtype of the weights, because the reweighting operator is a difference of
nearly equal terms for triplets close to eps.

The operator is represented by the leading singular triplets of the anchor W' and eps:

    U (..., d1, k), V (..., d2, k), sigma (..., k), eps (...,)

with any k >= r_env: triplets whose sigma <= eps get d_i = 0 and so contribute nothing
(SPEC fact 4). Zero-width factors (k = 0) give R = I.
"""

from __future__ import annotations

import math
import numbers
import sys

import torch
from torch import Tensor

__all__ = [
    "compute_dtype",
    "envelope_rank",
    "reweighting_coefficients",
    "operator_udv",
    "project",
    "reweighting_low_rank",
    "reweighting_row_blocks",
    "apply_reweighting",
    "penalty_value",
    "anchor_factors",
    "resolve_rank",
    "canonical_schedule",
    "next_eps",
    "SCHEDULE_ALIASES",
    "RANK_RULES",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is promoted to float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_eps(eps, like: Tensor) -> Tensor:
    eps = torch.as_tensor(eps, dtype=like.dtype, device=like.device)
    return eps.unsqueeze(-1)  # broadcast against the triplet dimension


def envelope_rank(sigma: Tensor, eps) -> Tensor:
    """r_env = #{i : sigma_i > eps} (strict), counted along the last dimension."""
    return (sigma > _as_eps(eps, sigma)).sum(dim=-1)


def reweighting_coefficients(sigma: Tensor, eps) -> Tensor:
    """d_i = eps / sigma_i - 1 for sigma_i > eps, else 0.  Shape (..., k).

    d lies in (-1, 0): the operator shrinks the directions of the large singular values.
    eps = +inf gives d = 0 (R = I), the state of the `min` schedule before its first refresh.
    """
    eps_b = _as_eps(eps, sigma)
    active = sigma > eps_b
    safe_sigma = torch.where(active, sigma, torch.ones_like(sigma))
    return torch.where(active, eps_b / safe_sigma - 1.0, torch.zeros_like(sigma))


def operator_udv(op: tuple) -> tuple[Tensor, Tensor, Tensor]:
    """(U, V, d) of an operator given as (U, V, d) or as (U, V, sigma, eps)."""
    if len(op) == 4:
        U, V, sigma, eps = op
        return U, V, reweighting_coefficients(sigma, eps)
    return op


def project(X: Tensor, U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """A = U^T X  (..., k, d2) and B = X V  (..., d1, k): the only reads of X that R needs."""
    X = X.to(compute_dtype(X.dtype))
    return U.to(X.dtype).transpose(-1, -2) @ X, X @ V.to(X.dtype)


def reweighting_low_rank(X: Tensor, U: Tensor, V: Tensor, d: Tensor) -> list[tuple[Tensor, Tensor]]:
    """R(X) - X as two rank-k products, [(L1, M1), (L2, M2)] with R(X) = X + L1 M1 + L2 M2:

        L1 = U,      M1 = diag(d) (A + C diag(d) V^T)      A = U^T X, C = A V
        L2 = X V,    M2 = diag(d) V^T

    in the compute dtype. Every piece has k rows or columns, and rows of R(X) are formed from
    them a block at a time (reweighting_row_blocks: the fallback steps' AdamQ3R term and the
    Q3R regularizer's gradient); R(X) written out as X + (U diag d) inner + (B diag d) V^T
    took three full-size temporaries.
    """
    X = X.to(compute_dtype(X.dtype))
    U, V, d = U.to(X.dtype), V.to(X.dtype), d.to(X.dtype)
    A, B = project(X, U, V)
    C = A @ V
    d_rows = d.unsqueeze(-1)  # (..., k, 1): scales rows of a (k, d2) matrix
    inner = A + (C * d.unsqueeze(-2)) @ V.transpose(-1, -2)
    return [(U, inner.mul_(d_rows)), (B, V.transpose(-1, -2) * d_rows)]


# Entries of one block of rows of R(X) that reweighting_row_blocks forms at a time: on a CPU
# about an L2 cache (1 MiB of float32); elsewhere (the GPU fallback serves factors wider than
# the kernels take, so weights of 4096+ columns) 64 MiB, so that each block's two products
# stay large matrix products. Tests set it small.
ROW_BLOCK_ELEMENTS = {"cpu": 2**18}
_ROW_BLOCK_ELEMENTS_ELSEWHERE = 2**24


def reweighting_row_blocks(X: Tensor, U: Tensor, V: Tensor, d: Tensor):
    """R(X) of a 2-D X (2-D U, V, 1-D d) in blocks of rows: yields (a, b, R(X)[a:b]), each a new
    tensor in the compute dtype of at most ROW_BLOCK_ELEMENTS entries (one row at least).

    The small products of the whole X (reweighting_low_rank) are taken when the first block is
    asked for; after that a block reads only its own rows of X, so a caller may write each block
    it gets back into those rows (AdamQ3R's step: W[a:b] -= c R[a:b]), and no others. A caller
    adding alpha R(X) to a tensor so rounds each entry once, as when R(X) is written out, with
    one block-sized temporary instead of three full-size ones. (Added as W plus two rank-k
    products instead, W was rounded twice, and where W barely moves from step to step, as for
    directions the term nearly leaves alone, those roundings repeated and drifted: 3,000
    term-only steps of a 128 x 128 float32 W, error along W 5.7e-7 of |W|^2 against 2.7e-8.)
    """
    X = X.to(compute_dtype(X.dtype))
    (L1, M1), (L2, M2) = reweighting_low_rank(X, U, V, d)
    budget = ROW_BLOCK_ELEMENTS.get(X.device.type, _ROW_BLOCK_ELEMENTS_ELSEWHERE)
    rows = max(1, budget // max(X.shape[1], 1))
    for a in range(0, X.shape[0], rows):
        b = min(a + rows, X.shape[0])
        yield a, b, torch.addmm(X[a:b], L1[a:b], M1).addmm_(L2[a:b], M2)


def apply_reweighting(X: Tensor, U: Tensor, V: Tensor, d: Tensor) -> Tensor:
    """R(X) = (I + U diag(d) U^T) X (I + V diag(d) V^T), in O(d1 d2 k).

    R(X) = X + U diag(d) (A + C diag(d) V^T) + B diag(d) V^T  with A = U^T X, B = X V, C = A V
    (see reweighting_low_rank). Returns the compute dtype (float32 or float64); the caller casts.
    """
    X = X.to(compute_dtype(X.dtype))
    (L1, M1), (L2, M2) = parts = reweighting_low_rank(X, U, V, d)
    if X.dim() == 2 and all(t.dim() == 2 for pair in parts for t in pair):  # (factors with batch dims: below)
        return torch.addmm(X, L1, M1).addmm_(L2, M2)  # the output is the only full-size tensor made
    return (L1 @ M1).add_(X).add_(L2 @ M2)


def penalty_value(X: Tensor, U: Tensor, V: Tensor, d: Tensor) -> Tensor:
    """<X, R(X)> = ||X||^2 + sum_ij d_i C_ij^2 d_j + sum_j d_j ||B_j||^2 + sum_i d_i ||A_i||^2.

    Differentiable in X (the factors are constants between refreshes), with gradient 2 R(X).
    Shape (...,).
    """
    X = X.to(compute_dtype(X.dtype))
    U, V, d = U.to(X.dtype), V.to(X.dtype), d.to(X.dtype)
    A, B = project(X, U, V)
    C = A @ V
    dd = d.unsqueeze(-1) * d.unsqueeze(-2)
    return (
        X.square().sum(dim=(-1, -2))
        + (dd * C.square()).sum(dim=(-1, -2))
        + (B.square().sum(dim=-2) * d).sum(dim=-1)
        + (A.square().sum(dim=-1) * d).sum(dim=-1)
    )


def anchor_factors(W: Tensor, k: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Exact SVD of the anchor W' (..., d1, d2) in the compute dtype.

    Returns U (..., d1, k), sigma (..., k), V (..., d2, k) for the k leading triplets
    (all min(d1, d2) when k is None) and the full spectrum (..., min(d1, d2)).
    """
    W = W.to(compute_dtype(W.dtype))
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    k = S.shape[-1] if k is None else k
    return U[..., :k], S[..., :k], Vh[..., :k, :].transpose(-1, -2), S


RANK_RULES = ("params", "reference")


def fraction_rank(fraction: float, d1: int, d2: int) -> int:
    """floor(f d1 d2 / (d1 + d2)): the rank at which factors d1 x r + r x d2 keep a fraction f
    of a d1 x d2 weight's parameters (rank rule "params"; q3r.compress cuts by it too). The
    float product may land a few ulp below an integer it equals, as 0.58 * 100 * 100 / 200 =
    28.999999999999996, hence the margin."""
    return math.floor(fraction * d1 * d2 / (d1 + d2) * (1 + 8 * sys.float_info.epsilon))


def resolve_rank(target_rank, d1: int, d2: int, rule: str = "params", name: str = "target", *,
                 param: str = "target_rank") -> int:
    """The integer target rank of a d1 x d2 target (SPEC section 3).

    rule "params": an int r is r; a float f in (0, 1) is floor(f d1 d2 / (d1 + d2)), the rank
    at which the factors d1 x r + r x d2 keep a fraction f of the parameters.
    rule "reference" (the published code): float f -> int(f max(d1, d2)),
    int r -> int(r max(d1, d2) / min(d1, d2)).
    The result must satisfy 1 <= r < min(d1, d2). ``param``: the argument the errors name
    (compress passes "fraction" / "rank": its caller gave no target_rank).
    """
    if rule not in RANK_RULES:
        raise ValueError(f"rank_rule must be one of {RANK_RULES}, got {rule!r}")
    if isinstance(target_rank, bool) or not isinstance(target_rank, numbers.Real):
        raise TypeError(f"{param} of {name} must be an int or a float, got {target_rank!r}")
    # a NumPy number from a sweep as the plain one it stands for: AdamQ3R's groups convert
    # theirs (config.plain_values), and a Target's np.float32 fraction was refused here
    target_rank = int(target_rank) if isinstance(target_rank, numbers.Integral) else float(target_rank)
    lo, hi = min(d1, d2), max(d1, d2)
    if isinstance(target_rank, float):
        if not (0.0 < target_rank < 1.0):
            raise ValueError(f"{param} of {name} as a fraction must lie in (0, 1), got {target_rank!r}")
    elif target_rank < 1:
        raise ValueError(f"{param} of {name} must be >= 1, got {target_rank!r}")
    # (before the rank's arithmetic, which divides by min(d1, d2) or d1 + d2: a zero-size weight
    # failed there with a bare ZeroDivisionError)
    if lo < 2:  # (said as "must satisfy 1 <= rank < 1", which read as a bug of ours)
        raise ValueError(f"{name} is a {d1}x{d2} matrix: no rank r with 1 <= r < min(d1, d2) = {lo} exists, so it "
                         "cannot be a Q3R target (or slice); exclude it")
    if isinstance(target_rank, float):
        # ("reference" keeps the published code's float arithmetic)
        rank = int(target_rank * hi) if rule == "reference" else fraction_rank(target_rank, d1, d2)
    else:
        rank = int(target_rank * hi / lo) if rule == "reference" else target_rank
    if not (1 <= rank < lo):
        raise ValueError(
            f"{param} of {name} resolves to rank {rank} for a {d1}x{d2} matrix; "
            f"it must satisfy 1 <= rank < {lo} (got {param}={target_rank!r}, rank_rule={rule!r})"
        )
    return rank


SCHEDULE_ALIASES = {
    "min": "min",
    "default": "min",
    "DEFAULT": "min",
    "geometric": "geometric",
    "linear": "geometric",
    "track": "track",
    "exploration": "track",
    "constant": "constant",
}


def canonical_schedule(name: str) -> str:
    """Our name of an eps schedule; the reference implementation's names are aliases."""
    if not isinstance(name, str) or name not in SCHEDULE_ALIASES:
        raise ValueError(f"eps_schedule must be one of {sorted(set(SCHEDULE_ALIASES))}, got {name!r}")
    return SCHEDULE_ALIASES[name]


def schedule_problem(schedule: str, eps_value=None, eps_floor=None, num_refreshes=None) -> str | None:
    """What an eps schedule lacks of the values it needs (None: nothing): constant needs a
    finite eps_value > 0, geometric a finite eps_floor > 0 and an int num_refreshes >= 1."""
    def positive(x) -> bool:
        return isinstance(x, numbers.Real) and not isinstance(x, bool) and 0 < x < math.inf

    given, schedule = schedule, canonical_schedule(schedule)
    # (named as the caller gave it: an alias named by our name read as another schedule's error)
    named = f"eps_schedule={given!r}" + (f" (the reference's name of {schedule!r})" if given != schedule else "")
    if schedule == "constant" and not positive(eps_value):
        return f"{named} needs a finite eps_value > 0, got eps_value={eps_value!r}"
    if schedule == "geometric":
        if not positive(eps_floor):
            return f"{named} needs a finite eps_floor > 0, got eps_floor={eps_floor!r}"
        # (numbers.Integral: a NumPy integer was refused as "needs num_refreshes >= 1, got
        # np.int64(3)"; eps_value and eps_floor took NumPy numbers already)
        if isinstance(num_refreshes, bool) or not isinstance(num_refreshes, numbers.Integral) or num_refreshes < 1:
            return f"{named} needs num_refreshes >= 1, got num_refreshes={num_refreshes!r}"
    return None


def next_eps(
    schedule: str,
    eps: float,
    sigma_next: float,
    refresh_index: int,
    eps0: float = math.nan,
    eps_value: float | None = None,
    eps_floor: float | None = None,
    num_refreshes: int | None = None,
) -> tuple[float, float]:
    """eps after a refresh (SPEC section 3).  Returns (eps, eps0).

    sigma_next is sigma_{r+1} of the current weights; refresh_index counts refreshes from 0.
      min:       min(eps, sigma_next); eps starts at +inf, so it never increases.
      geometric: eps0 = sigma_next at refresh 0, then eps * c down to eps_floor,
                 c = (eps_floor / eps0) ** (1 / num_refreshes); where eps_floor lies above
                 eps0 (c > 1: one floor for a group whose targets differ, or zero-initialized
                 weights) eps rises to eps_floor instead and stays there, never past it.
      track:     sigma_next.
      constant:  eps_value.
    eps is kept >= the smallest positive float so that R stays positive definite on
    rank-deficient weights (sigma_next = 0).
    """
    schedule = canonical_schedule(schedule)
    tiny = torch.finfo(torch.float32).tiny
    if schedule == "min":
        new = min(eps, sigma_next)
    elif schedule == "track":
        new = sigma_next
    elif schedule == "constant":
        new = float(eps_value)
    else:
        if refresh_index == 0 or not math.isfinite(eps0):
            eps0 = max(sigma_next, tiny)
            new = eps0
        else:
            c = (eps_floor / eps0) ** (1.0 / num_refreshes)
            new = max(eps * c, eps_floor) if c <= 1.0 else min(eps * c, eps_floor)
    return max(new, tiny), eps0

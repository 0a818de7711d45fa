"""Randomized, warm-started, batched leading-triplet estimation for refreshes (issue 4).

A refresh needs the triplets of W' above eps plus sigma_{r+1}: about r + 1 of them, not a
full SVD.  For a stack of same-shaped targets W (b, d1, d2) and a start basis P (b, d2, k):

    Q = orth(W P)                       range finder (P: previous V = warm start, or Gaussian)
    repeat q times:  Q = orth(W orth(W^T Q))    power (subspace) iteration
    B = Q^T W                           (b, k, d2)
    G = B B^T = E diag(lambda) E^T      Rayleigh-Ritz through the k x k Gram matrix
    sigma = sqrt(lambda),  U = Q E,  V = normalize_columns(B^T E)

Everything but the k x k eigenproblem is a batched matmul; the eigenproblem is solved by
torch.linalg.eigh or by the native Jacobi solver (q3r._native), which is fast exactly when
G is nearly diagonal, i.e. after a warm start.  orth() is Cholesky-QR applied twice after
scaling the columns to unit norm (a warm-start Y = W V_prev has columns of norm ~sigma_i and
nearly orthogonal directions, so scaling alone makes it well conditioned); members whose
Gram matrix is too ill-conditioned for that fall back to Householder QR.

Each product with a matrix is scaled by 1 / (its largest |entry|) before anything is squared,
so tiny and huge norms neither underflow nor overflow in the squared quantities (the weights
themselves are not copied to be scaled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from . import _native, reference
from ._transfer import to_device

EIGENSOLVERS = ("torch", "native")

# Orthogonality of the first Cholesky-QR pass below which the second pass is trusted
# (CholeskyQR2 is accurate when cond(Y) << eps^-1/2; ||Q1^T Q1 - I|| measures that).
_CHOLQR_MAX_DEFECT = 0.1


def _tiny(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).tiny


def _cholesky_qr(Y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One Cholesky-QR pass: Q = Y L^-T with L L^T = Y^T Y.  Returns (Q, ok (b,), Gram).

    L^-T is formed explicitly (a k x k triangular solve) and applied as one batched matmul:
    a triangular solve against the tall Y is a slow kernel on the GPU (1.2 of 15.5 ms of a
    warm ViT-B refresh on the H100), and whatever error the explicit inverse adds, Q = Y M
    stays in span(Y) -- the only thing the range finder needs; orthonormality is checked
    by the caller, which takes a second pass when it falls short.
    """
    gram = Y.mT @ Y
    L, info = torch.linalg.cholesky_ex(gram)
    ok = (info == 0) & torch.isfinite(L).all(dim=(-1, -2))
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
    L = torch.where(ok[:, None, None], L, eye)
    L_inv = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False)
    return Y @ L_inv.mT, ok, gram


def orthonormalize(Y: Tensor, active: Tensor | None = None) -> Tensor:
    """Orthonormal basis (b, n, k) of the columns of Y (b, n, k), n >= k.

    Cholesky-QR on column-normalized Y.  One pass suffices when the Gram matrix is close to
    the identity (Gershgorin: off-diagonal row sums < 1/2 bound cond(Y)^2 by 3), which is
    the warm-start case; otherwise a second pass (CholeskyQR2), and Householder QR for
    members where the first pass failed or left Q too far from orthonormal.  ``active``
    (b,) bool marks the members that count: the others (non-finite weights, whose result is
    discarded) neither force the second pass nor get the Householder fallback.
    """
    Y, Q1, ok1, good1 = _first_pass(Y, active)
    if bool(good1.all()):
        return Q1
    eye = torch.eye(Y.shape[-1], dtype=Y.dtype, device=Y.device)
    Q, ok2, gram2 = _cholesky_qr(Q1)
    defect = (gram2 - eye).abs().amax(dim=(-1, -2))
    bad = ~(ok1 & ok2 & (defect < _CHOLQR_MAX_DEFECT))
    if active is not None:
        bad = bad & active
    if bool(bad.any()):
        Q = Q.clone()
        Q[bad] = torch.linalg.qr(Y[bad]).Q
    return Q


def _first_pass(Y: Tensor, active: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """orthonormalize's first Cholesky-QR pass: (column-normalized Y, Q1, ok1, good1), good1
    (b,) on the device saying whether Q1 passed the one-pass check (inactive members pass)."""
    Y = Y / Y.norm(dim=-2, keepdim=True).clamp_min(_tiny(Y.dtype))
    Q1, ok1, gram1 = _cholesky_qr(Y)
    eye = torch.eye(Y.shape[-1], dtype=Y.dtype, device=Y.device)
    spread = (gram1 - eye).abs().sum(dim=-1).amax(dim=-1)
    good1 = ok1 & (spread < 0.5)
    if active is not None:
        good1 = good1 | ~active
    return Y, Q1, ok1, good1


def orthonormalize_unchecked(Y: Tensor, active: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """orthonormalize's first pass only, and whether each member passed its check (b,) bool,
    left on the device: no host sync.  The caller must redo the members that did not pass
    with orthonormalize before it uses their results (the refresh decides together with its
    other per-member decisions, in the one transfer it makes anyway)."""
    _, Q1, _, good1 = _first_pass(Y, active)
    return Q1, good1


def range_basis(W: Tensor, P: Tensor, power_iters: int, active: Tensor | None = None,
                inv: Tensor | None = None) -> Tensor:
    """Orthonormal Q (b, d1, k) approximating the leading left subspace: orth(W (W^T W)^q P)
    (``active``: see orthonormalize; ``inv`` (b, 1, 1): see sketch)."""
    Q = orthonormalize(_scaled(W @ P, inv), active)
    for _ in range(power_iters):
        Q = orthonormalize(_scaled(W @ orthonormalize(_scaled(W.mT @ Q, inv), active), inv), active)
    return Q


def _scaled(T: Tensor, inv: Tensor | None) -> Tensor:
    """T (a fresh product) times inv in place (None: T)."""
    return T if inv is None else T.mul_(inv)


Eigh = Callable[[Tensor], tuple[Tensor, Tensor]]


def eigensolver(name: str, max_sweeps: int = _native.DEFAULT_MAX_SWEEPS, tol: float = _native.DEFAULT_TOL) -> Eigh:
    """A batched symmetric eigensolver returning (evals descending, evecs as columns)."""
    if name == "torch":
        def solve(G: Tensor) -> tuple[Tensor, Tensor]:
            evals, evecs = torch.linalg.eigh(G)
            return evals.flip(-1), evecs.flip(-1)
        return solve
    if name == "native":  # (sketch's Gram matrices are symmetric, scaled, non-finite members zeroed)
        return lambda G: _native.batched_eigh(G, max_sweeps=max_sweeps, tol=tol, prepared=True)
    raise ValueError(f"eigensolver must be one of {EIGENSOLVERS}, got {name!r}")


def gram(W: Tensor, Q: Tensor, inv: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """B = Q^T W (b, k, d2) and its exactly symmetric Gram matrix G = B B^T (b, k, k)
    (``inv`` (b, 1, 1): B is scaled by it, see sketch)."""
    B = _scaled(Q.mT @ W, inv)
    G = B @ B.mT
    return B, 0.5 * (G + G.mT)  # exactly symmetric for the solver


def ritz_from_eig(Q: Tensor, B: Tensor, lam: Tensor, E: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """U (b, d1, k), sigma (b, k), V (b, d2, k) from the eigenpairs (lam, E) of B B^T."""
    sigma = lam.clamp_min(0.0).sqrt()
    U = Q @ E
    Z = B.mT @ E  # = W^T U = V diag(sigma), computed without dividing by small sigma
    V = Z / Z.norm(dim=-2, keepdim=True).clamp_min(_tiny(Z.dtype))
    return U, sigma, V


Start = Tensor | tuple[Tensor, ...] | None  # a warm start: columns, or column blocks to join


def start_basis(W: Tensor, k: int, warm: list[Start], generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Start basis P (b, d2, k): each member's warm columns (d2, <=k), topped up with Gaussian
    columns.  A warm start is a tensor (d2, w) or a tuple of column blocks whose concatenation
    it is (a state's V and tail), of which the first k columns are used.  Returns (P, cold
    (b,) bool on the CPU: members with no warm columns).

    A warm member's Gaussian top-up is made orthogonal to its warm columns (which are
    orthonormal: previous right singular vectors).  W g for a plain Gaussian g leans on W's
    leading directions, i.e. on the warm columns' images, and that one column fails the
    stack's one-pass Cholesky-QR check; W (I - V V^T) g does not.  A member short of a few
    warm columns (its envelope grew at its last refresh) is then as good a start as a full one.

    Members whose blocks have the same widths are copied in together (a stack and one copy
    per block), not member by member: a refresh of a whole model has one such set per stack.
    """
    b, _, d2 = W.shape
    P = torch.randn(b, d2, k, dtype=W.dtype, device=W.device, generator=generator)
    by_widths: dict[tuple[int, ...], list[tuple[int, list[Tensor]]]] = {}
    for j, start in enumerate(warm):
        blocks = _leading_blocks(start, k)
        if blocks:
            by_widths.setdefault(tuple(t.shape[-1] for t in blocks), []).append((j, blocks))
    for widths, entries in by_widths.items():
        rows = [j for j, _ in entries]
        index = None if len(rows) == b else to_device(rows, torch.int64, W.device)
        offset = 0
        for pos, width in enumerate(widths):
            # (no per-member .to: a no-op one still costs a dispatch per member; the copy into
            # P casts, and only a member on another device is moved first)
            parts = [blocks[pos] for _, blocks in entries]
            if any(t.device != W.device for t in parts):
                parts = [t.to(W.device) for t in parts]
            value = torch.stack(parts)
            if index is None:
                P[:, :, offset : offset + width] = value
            else:  # (an index_put does not cast: float32 factors into a float64 stack's P)
                P[index, :, offset : offset + width] = value.to(P.dtype)
            offset += width
    warm_widths = [0] * b
    for widths, entries in by_widths.items():
        for j, _ in entries:
            warm_widths[j] = sum(widths)
    if any(0 < w < k for w in warm_widths):
        P = _orthogonal_top_up(P, warm_widths)
    cold = torch.tensor([w == 0 for w in warm_widths], dtype=torch.bool)
    return P, cold


def _orthogonal_top_up(P: Tensor, warm_widths: list[int]) -> Tensor:
    """P with each member's columns from its warm width on projected off its warm columns:
    G - V (V^T G), for the whole stack in two batched matmuls (members with no warm columns
    or no top-up pass through unchanged)."""
    k = P.shape[-1]
    widths = to_device(warm_widths, torch.int64, P.device)
    warm = (torch.arange(k, device=P.device) < widths[:, None])[:, None, :]
    V = torch.where(warm, P, torch.zeros((), dtype=P.dtype, device=P.device))
    G = P - V
    return V + (G - V @ (V.mT @ G))


def _leading_blocks(start: Start, k: int) -> list[Tensor]:
    """The column blocks of a warm start cut to its first k columns (empty blocks dropped)."""
    if start is None:
        return []
    blocks, left = [], k
    for t in (start,) if isinstance(start, Tensor) else start:
        width = min(t.shape[-1], left)
        if width > 0:
            blocks.append(t if width == t.shape[-1] else t[:, :width])
            left -= width
    return blocks


def _warm_width(start: Start, k: int) -> int:
    return sum(t.shape[-1] for t in _leading_blocks(start, k))


def max_abs(W: Tensor) -> tuple[Tensor, Tensor]:
    """Largest |entry| (b,) of each member of a stack W (b, ...) and whether it is finite,
    i.e. whether the member has no NaN or inf: min and max propagate NaN.  One pass, with no
    |W| temporary of full size."""
    # flattened in whichever of its orientations is contiguous (a refresh stacks tall
    # targets transposed, as a view): the extremes do not depend on the order, a copy would
    flat = W.mT if W.dim() == 3 and not W.is_contiguous() and W.mT.is_contiguous() else W
    low, high = flat.flatten(1).aminmax(dim=1)
    top = torch.maximum(high, -low)
    return top, torch.isfinite(top)


@dataclass
class Sketch:
    """A stack's sketch up to its k x k Gram matrices: what remains is one eigensolve.

    Kept apart so that the Gram matrices of several stacks can go to the eigensolver in one
    batch (the native solver's cost is one thread block's latency, whatever the batch).
    """

    Q: Tensor  # (b, d1, k) orthonormal basis of the range
    B: Tensor  # (b, k, d2) = Q^T W / scale
    G: Tensor  # (b, k, k) = B B^T (zero for members with non-finite weights)
    scale: Tensor  # (b,) max |W| of each member
    finite: Tensor  # (b,) bool: the member's weights are all finite (else its results are void)
    # (b,) bool: the member's one-pass basis passed its check (sketch(check_later=True));
    # None: every basis was checked before it was used
    trusted: Tensor | None = None
    P: Tensor | None = None  # (b, d2, k) the start basis, its first warm_widths[j] columns warm
    warm_widths: list[int] | None = None
    # (b, k, k) H = R^T R for the residual R = (I - Q Q^T) W W^T Q of the range (scaled as G):
    # the Ritz residuals in k x k form (see ritz_residuals); None: not computed
    H: Tensor | None = None

    def triplets(self, lam: Tensor, E: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """U, sigma, V at W's scale from the eigenpairs of G (evals descending)."""
        U, sigma, V = ritz_from_eig(self.Q, self.B, lam, E)
        return U, sigma * self.scale[:, None], V

    def lag(self, V: Tensor, sigma: Tensor, eps: Tensor) -> Tensor:
        """How far the new right singular vectors V (b, d2, k) left the span of the warm
        columns they started from, weighted as the operator weighs them: sqrt(sum_i d_i^2
        sin^2 a_i / d2) (b,), a_i the angle of V[:, i] to that span, d_i = eps / sigma_i - 1
        for sigma_i > eps (eps (b,): the previous one) and 0 below.  0 for cold members.

        One pass from a warm start lags the weights by about the distance they moved since it
        was taken, and the relative error of R(X) on a random X that this leaves is about
        this number (0.9x-1.6x on power-law and random-init spectra at 768 x 768, 0.2x on
        steeply decaying ones, which converge faster: see SketchOptions.max_lag)."""
        if self.P is None or not any(self.warm_widths):
            return torch.zeros(V.shape[0], dtype=V.dtype, device=V.device)
        widths = to_device(self.warm_widths, torch.int64, V.device)
        warm = torch.arange(self.P.shape[-1], device=V.device) < widths[:, None]  # (b, k): the warm rows of P^T V
        inside = (self.P.mT @ V).square_().mul_(warm[:, :, None]).sum(dim=-2)  # cos^2 a_i
        return weighted_lag(sigma, inside, eps, V.shape[-2])

    def ritz_residuals(self, lam: Tensor, E: Tensor) -> Tensor:
        """rho (b, k): ||W v_i - sigma_i u_i|| / sigma_i of the triplets from the eigenpairs
        (lam, E) of G -- the part of the residual outside span(Q), which is all of it for exact
        eigenpairs (an eigensolver's own error, inside span(Q), is not seen) -- from H alone: W v_i = Z e_i / sqrt(lam_i) and sigma_i u_i = Q e_i
        sqrt(lam_i) (scaled), so the residual is (Z - Q G) e_i / sqrt(lam_i) = R e_i / sqrt(lam_i)
        and rho_i = sqrt(e_i^T H e_i) / lam_i (lam_i at least the smallest normal number: 0,
        not NaN, where both are 0).  Zero where H was not computed."""
        return torch.zeros_like(lam) if self.H is None else ritz_residuals(self.H, lam, E)


def residual_gram(W: Tensor, Q: Tensor, B: Tensor, G: Tensor, inv: Tensor | None = None) -> Tensor:
    """H = R^T R (b, k, k) for the residual R = W B^T - Q G = (I - Q Q^T) W W^T Q of the range
    Q of W (b, d1, d2), B = Q^T W and G = B B^T as gram gives them (``inv``: their scale, see
    sketch): one more product with W."""
    R = _scaled(W @ B.mT, inv) - Q @ G
    return R.mT @ R


def ritz_residuals(H: Tensor, lam: Tensor, E: Tensor) -> Tensor:
    """rho (b, k) from residual_gram's H and the eigenpairs (lam, E) of G: see
    Sketch.ritz_residuals."""
    return (E * (H @ E)).sum(dim=-2).clamp_min(0).sqrt() / lam.clamp_min(_tiny(lam.dtype))


def residual_error(sigma: Tensor, rho: Tensor, eps: Tensor, ranks: Tensor, d1: int, d2: int) -> Tensor:
    """An estimate (b,) of the relative error of R(X) on a random X that Ritz triplets leave,
    from their residuals (sigma, rho (b, k): the Ritz values, descending, and
    Sketch.ritz_residuals; eps (b,): the new eps; ranks (b,) int64: each member's r; d1 x d2:
    the shape the sketch decomposed).

    The residual rho_i is small where the sketch converged, but what it costs the operator
    grows as the gap to the spectrum the sketch did not capture closes: the angle of v_i to
    the true singular vector is about rho_i a_i and the Ritz value falls short by about
    delta_i = rho_i^2 a_i / 2 (relative), with a_i = sigma_i^2 / (sigma_i^2 - sigma_k^2), the
    smallest Ritz value sigma_k standing in for the uncaptured top.  Weighted as the operator
    weighs them (Sketch.lag weighs its angles alike), over the members above eps:

        sqrt( sum_i d_i^2 min(1, rho_i a_i)^2 / d2
              + sum_i s_i^2 (delta_eps - delta_i)^2 (d1 + d2) / (d1 d2) )

    with s_i = eps / sigma_i, d_i = s_i - 1, and delta_eps = delta_{r+1} where eps was set
    from sigma_{r+1} (equal to it: the `min` and `track` schedules, and the first `geometric`
    refresh), so that it falls short with it, else 0 (and 0 where sigma_{r+1} is the last Ritz
    value: no oversampling).

    Calibrated along real training runs (an MLP and a small ViT on the digits, 4,916 warm
    refreshes of a target; benchmarks/results/probes/residual_estimate_cpu_*.md): the true error
    was 1.4x to 3.5x this estimate (5th to 95th percentile), and the first warm refreshes of
    flat, fast-moving weights that the lag missed stood out by it (SketchOptions.max_residual).
    """
    b, k = sigma.shape
    if k < 2:
        return torch.zeros(b, dtype=sigma.dtype, device=sigma.device)
    # (clamped at 1: a residual as large as the value, an angle of 90 degrees, a value short
    # by all of it -- and no inf or NaN where a value or a gap is zero)
    rho = rho.clamp_max(1.0)
    sig2 = sigma.square()
    amp = (sig2 / (sig2 - sig2[:, -1:]).clamp_min(_tiny(sig2.dtype))).clamp_max_(1 / torch.finfo(sig2.dtype).eps)
    angle = (rho * amp).clamp_max_(1.0)
    short = (rho.square() * amp).div_(2).clamp_max_(1.0)  # relative shortfall of each Ritz value
    at_rank = ranks.clamp_max(k - 1)[:, None]
    # (sigma_{r+1} the last Ritz value, which stands in for the uncaptured top: no estimate of
    # its own shortfall, whose gap is 0 by construction)
    tracks = (sigma.gather(1, at_rank)[:, 0] == eps) & (ranks < k - 1)
    short_eps = short.gather(1, at_rank).mul_(tracks[:, None])
    inside = (sigma > eps[:, None]) & (torch.arange(k, device=sigma.device) < k - 1)
    s = torch.where(inside, eps[:, None] / sigma.clamp_min(_tiny(sigma.dtype)), 0.0)
    turned = ((s - 1) * angle).mul_(inside).square_().sum(dim=-1).div_(d2)
    valued = (short_eps - short).mul_(s).square_().sum(dim=-1).mul_((d1 + d2) / (d1 * d2))
    return (turned + valued).sqrt_()


def weighted_lag(sigma: Tensor, inside: Tensor, eps: Tensor, d2: int) -> Tensor:
    """sqrt(sum_i d_i^2 (1 - inside_i) / d2) (b,) with d_i = eps / sigma_i - 1 above eps and
    0 at and below it (sigma, inside (b, k): the Ritz values and cos^2 of each new right
    singular vector to the old span; eps (b,) the previous one): see Sketch.lag."""
    dd = (eps[:, None] / sigma - 1).clamp_max_(0).square_()  # (inf / sigma = inf for eps = inf: 0)
    return (dd * (1 - inside).clamp_min(0)).sum(dim=-1).div_(d2).sqrt_()


def sketch(
    W: Tensor,
    k: int,
    warm: list[Start],
    cold_power_iters: int = 3,
    warm_power_iters: int = 0,
    generator: torch.Generator | None = None,
    check_later: bool = False,
    max_top_up: int = 0,
    residuals: bool = False,
) -> Sketch:
    """Range finder and Gram matrices of a stack W (b, d1, d2) in W's compute dtype.

    Members with a warm basis get warm_power_iters power iterations, the others
    cold_power_iters (the whole stack takes the larger count when they are mixed).
    ``check_later`` (no power iteration, every member short of k warm columns by at most
    ``max_top_up``): one Cholesky-QR pass whose check is left in ``Sketch.trusted`` instead
    of deciding here on a second pass, which costs a host sync.  ``residuals``: compute
    ``Sketch.H`` for the Ritz residuals (one more product with W; False: H is None).

    Non-finite weights are found on the way, without a host sync of their own: the largest
    |entry| that scales each member is NaN or inf exactly then (min and max propagate NaN).
    Such members are marked in ``Sketch.finite``; they take no part in the stack's decisions
    and their Gram matrices are zeroed, so no solver ever sees a NaN.
    """
    W = W.to(reference.compute_dtype(W.dtype))
    scale, finite = max_abs(W)
    scale = torch.where(finite & (scale > 0), scale, torch.ones_like(scale))
    # the products with W are scaled by 1 / max|W|, not W itself: a scaled copy of the stack
    # would be another pass over the weights and another temporary of their size, while the
    # products are small; scaled before any square is taken, so tiny and huge norms neither
    # underflow nor overflow there
    inv = scale.reciprocal()[:, None, None]
    P, cold = start_basis(W, k, warm, generator)
    iters = cold_power_iters if bool(cold.any()) else warm_power_iters
    trusted = None
    # only a basis of (nearly) warm columns is left unchecked: warm columns and a few top-up
    # columns made orthogonal to them pass the one-pass check as a rule; a cold basis, or one
    # with many top-up columns, often fails it, and a failed unchecked basis costs a whole new
    # sketch, not just a second pass
    if check_later and iters == 0 and all(_warm_width(start, k) >= max(k - max_top_up, 1) for start in warm):
        Q, trusted = orthonormalize_unchecked(_scaled(W @ P, inv), finite)
    else:
        Q = range_basis(W, P, iters, finite, inv)
    B, G = gram(W, Q, inv)
    H = None
    if residuals:  # the Ritz residuals in k x k form (Sketch.ritz_residuals): one more product with W
        H = residual_gram(W, Q, B, G, inv)
    usable = finite if trusted is None else finite & trusted  # an unchecked basis may be garbage
    zero = torch.zeros((), dtype=G.dtype, device=G.device)
    G = torch.where(usable[:, None, None], G, zero)
    H = None if H is None else torch.where(usable[:, None, None], H, zero)
    return Sketch(Q, B, G, scale, finite, trusted, P, [_warm_width(start, k) for start in warm], H)


def randomized_triplets(
    W: Tensor,
    k: int,
    warm: list[Start],
    eigh: Eigh,
    cold_power_iters: int = 3,
    warm_power_iters: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """k leading approximate triplets of each W[j] (b, d1, d2), in W's compute dtype:
    ``sketch`` and then the eigensolve.  Returns U (b, d1, k), sigma (b, k) descending,
    V (b, d2, k), at W's scale.
    """
    sk = sketch(W, k, warm, cold_power_iters, warm_power_iters, generator)
    return sk.triplets(*eigh(sk.G))

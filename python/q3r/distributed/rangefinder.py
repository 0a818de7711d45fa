"""Randomized range finder on row-sharded matrices: leading SVD triplets without a gather.

For a slice X (d1 x d2) whose rows are spread over the ranks (X_r on rank r), with a sketch
width k (target rank + oversampling) and q power iterations:

    Y_r = X_r Omega                      local (Omega d2 x k, identical on every rank)
    repeat q times:
      Z = sum_r X_r^T Y_r                all-reduce d2 x k, then a local QR (replicated)
      Y_r = X_r Z                        local
    Q   = orth(Y)                        Cholesky-QR: G = sum_r Y_r^T Y_r (all-reduce k x k), twice
    B = sum_r Q_r^T X_r                  all-reduce k x d2
    B = Ub S Vh                          small SVD, replicated
    U_r = Q_r Ub,  V = Vh^T              U stays row-sharded like X

Every stage is batched over all slices: one collective per stage whatever the number of
targets, q + 3 per refresh; enveloping_svd adds one small one to agree on widenings (and one
for the Ritz residuals of its residual check, where a sketch is narrower than its matrix), and
repeats the whole for the slices whose sketch did not reach eps. Cholesky-QR squares the condition number, so the Gram matrix is accumulated and
factored in float64, each pass adds a tiny shift (so a rank-deficient sketch, e.g. zero
weights or a sketch as wide as the matrix, still factors), and the passes are repeated
(CholeskyQR2), which leaves Q orthonormal to float32 rounding. When k reaches min(d1, d2) the
result is the exact SVD up to rounding.
"""

from __future__ import annotations

import math

from typing import Callable

import torch
from torch import Tensor

from .._refresh_commit import MAX_EPS_SHORTFALL, flat_beyond, sigma_next_shortfall
from ..randomized import residual_error, weighted_lag

__all__ = ["sketch_width", "cold_sketch_width", "gaussian_sketch", "cholesky_qr", "range_finder_svd", "enveloping_svd"]

AllReduce = Callable[[Tensor], Tensor]


def sketch_width(rank: int, d1: int, d2: int, oversample: int) -> int:
    """k = rank + oversample, at most min(d1, d2); always > rank, so sigma_{r+1} is estimated."""
    return min(rank + oversample, min(d1, d2))


def cold_sketch_width(rank: int, d1: int, d2: int, oversample: int) -> int:
    """The width of a first (cold) refresh: rank + max(2 oversample, rank), at most min(d1, d2).
    A Gaussian start on a random-init spectrum, flat around sigma_{r+1}, needs the gap to
    converge, and under the `min` schedule the first eps is never raised again, so its error
    stays (the sketch is only computed this wide; the leading triplets are kept)."""
    return min(rank + max(2 * oversample, rank), min(d1, d2))


def gaussian_sketch(d2: int, k: int, seed: int, device, warm: Tensor | None = None) -> Tensor:
    """Omega (d2 x k): Gaussian from a CPU generator (the same bits on every rank and device),
    its first columns replaced by the previous right singular vectors when given (a warm start:
    the new dominant subspace is close to the old one)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(d2, k, generator=gen, dtype=torch.float32).to(device)
    if warm is not None and warm.numel():
        j = min(warm.shape[1], k)
        omega[:, :j] = warm[:, :j].to(device, torch.float32)
    return omega


def _flat_sum(blocks: list[Tensor], all_reduce: AllReduce) -> list[Tensor]:
    """Sum each block over ranks in one collective (blocks of any shapes and one dtype)."""
    if not blocks:
        return []
    flat = all_reduce(torch.cat([b.reshape(-1) for b in blocks]))
    out, offset = [], 0
    for b in blocks:
        out.append(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()
    return out


def cholesky_qr(Ys: list[Tensor], all_reduce: AllReduce, passes: int = 2) -> list[Tensor]:
    """Orthonormalize the columns of each row-sharded Y (local rows Ys[i]); one all-reduce of
    the k x k Gram matrices per pass. Returns the local rows of Q, float32."""
    for p in range(passes):
        grams = _flat_sum([y.double().transpose(0, 1) @ y.double() for y in Ys], all_reduce)
        out = []
        for y, g in zip(Ys, grams):
            L = torch.linalg.cholesky(_shifted(g))
            # Q = Y L^{-T}: solve Q L^T = Y
            q = torch.linalg.solve_triangular(L.transpose(0, 1), y.double(), upper=True, left=False)
            out.append(q.to(torch.float32))
        Ys = out
    return Ys


def _shifted(g: Tensor) -> Tensor:
    """The k x k Gram matrix g (float64) plus a tiny relative shift of its diagonal, which keeps
    Cholesky defined for a singular one (zero weights, a sketch wider than the rank) and
    changes nothing in fp32 on a well-conditioned one; on g's device (no host sync)."""
    k = g.shape[0]
    shift = 1e-12 * torch.diagonal(g).sum() / max(k, 1) + 1e-300
    return g + shift * torch.eye(k, dtype=g.dtype, device=g.device)


def power_of_two_scale(bound: float) -> float:
    """A power of two near ``bound`` (an upper bound of max |X| over the ranks, the same on
    every rank) to divide a slice's products by, or 1 where they cannot overflow or underflow
    float32 (|X| within 2^-32 .. 2^32): X^T X V of a weight with entries at 1e20 overflows
    float32, where the single-process refresh scales its products (q3r.randomized) and commits
    factors. A power of two scales exactly, so results are unchanged wherever nothing overflows."""
    if not math.isfinite(bound) or bound <= 0 or 2.0 ** -32 <= bound <= 2.0 ** 32:
        return 1.0
    return 2.0 ** math.floor(math.log2(bound))


def range_finder_svd(
    Xs: list[Tensor], omegas: list[Tensor], all_reduce: AllReduce, power_iters: int = 2,
    scales: list[float] | None = None,
) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Leading k triplets of each row-sharded X (local rows Xs[i], float32; Omega d2 x k).

    Returns per slice (U_local (rows x k), S (k,), V (d2 x k), frob2 ()) where frob2 is
    ||X / scales[i]||_F^2 of the whole slice (summed over ranks, for the tail energy; scales:
    power_of_two_scale of each slice, the same on every rank, by which every product is
    divided so that none overflows float32; S is returned unscaled, frob2 scaled).
    """
    Xs = [x.to(torch.float32) for x in Xs]
    inv = [1.0 / c for c in scales] if scales is not None else [1.0] * len(Xs)
    sc = lambda t, i: t if inv[i] == 1.0 else t.mul_(inv[i])  # noqa: E731 (exact: a power of two)
    Ys = [sc(x @ om, i) for i, (x, om) in enumerate(zip(Xs, omegas))]
    for _ in range(power_iters):
        # Z = X^T Y is replicated after its all-reduce, so orthonormalizing it is a local QR
        # and costs no collective; Y itself is orthonormalized only once, at the end (its
        # condition number is that of X on an orthonormal Z, so Cholesky-QR copes)
        Zs = _flat_sum([sc(x.transpose(0, 1) @ y, i) for i, (x, y) in enumerate(zip(Xs, Ys))], all_reduce)
        Ys = [sc(x @ torch.linalg.qr(z)[0], i) for i, (x, z) in enumerate(zip(Xs, Zs))]
    Q = cholesky_qr(Ys, all_reduce, passes=2)
    # B = Q^T X and ||X||^2 in one collective
    parts = []
    for i, (x, q) in enumerate(zip(Xs, Q)):
        parts += [sc(q.transpose(0, 1) @ x, i),
                  sc(torch.linalg.vector_norm(x).reshape(1), i).square()]  # (no x.square() temporary)
    sums = _flat_sum(parts, all_reduce)
    out = []
    for i, q in enumerate(Q):
        B, frob2 = sums[2 * i], sums[2 * i + 1]
        Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
        if inv[i] != 1.0:
            S = S * (1.0 / inv[i])
        out.append((q @ Ub, S, Vh.transpose(0, 1).contiguous(), frob2.reshape(())))
    return out


def enveloping_svd(
    Xs: list[Tensor],
    shapes: list[tuple[int, int]],
    widths: list[int],
    starts: list[Tensor | None],
    seeds: Callable[[int, int], int],
    envelope: Callable[[int, Tensor], int],
    all_reduce: AllReduce,
    power_iters: int,
    cold_power_iters: int,
    oversample: int,
    max_widenings: int = 3,
    prev_envs: list[int] | None = None,
    max_growth: int = 2,
    prev_eps: list[float] | None = None,
    max_lag: float = 1.0,
    flat_tolerance: float = -1.0,
    ranks: list[int] | None = None,
    max_residual: float = 1.0,
    resolvable_ratio: float = 1e-4,
    scales: list[float] | None = None,
) -> list[tuple]:
    """range_finder_svd of each row-sharded slice i (whole shape shapes[i]), sketched
    widths[i] wide from starts[i] (its previous V, or None: cold), and widened while the
    sketch did not reach eps: while more than width - oversample / 2 of its Ritz values lie
    above eps (``envelope(i, S)``: how many do), it is sketched again from its new V,
    r_env + oversample wide (at most min(d1, d2): the exact SVD up to rounding), at most
    max_widenings times. Under the `min` schedule eps never rises, so an envelope can outgrow
    any fixed width (a flat bulk lifted above eps by training); a truncated one would leave
    those triplets out of the operator. A warm sketch whose envelope grew by more than
    max_growth since the last refresh (``prev_envs[i]``) is widened too: its new members come
    from a flat bulk, where the Ritz values of a warm sketch fall short of the singular
    values and some of them are missed. A warm sketch whose lag (_lag, against the previous
    eps ``prev_eps[i]``) exceeds max_lag is sketched again at its width: the weights moved
    far since the last refresh, and q power iterations from there leave more error than
    the contract allows where the spectrum is flat around eps. A sketch whose uncaptured part
    sits at eps (q3r._refresh_commit.flat_beyond with ``flat_tolerance``; negative: never) is
    sketched again min(d1, d2) wide, the SVD up to rounding: its Ritz values undercount the
    members above eps there. A sketch whose residual estimate (q3r.randomized.residual_error from
    its Ritz residuals ||X v_i - sigma_i u_i||, float64, summed over ranks in one more small
    collective per attempt, none where every sketch spans its matrix; ``ranks[i]``: each
    slice's target rank) exceeds max_residual (1 or more: never, and not computed) where
    sigma_{r+1} and eps are at least resolvable_ratio sigma_1 (below that, B's float32
    rounding, some u sigma_1, puts the Ritz values themselves further off than the check
    resolves, and no retry changes that) is far from the weights' own triplets: a warm first sketch is
    sketched again at its width (wider where it is too narrow), any other as wide as the matrix.
    Retries take cold_power_iters.

    Every rank decides alike: S comes from the same all-reduced B on every rank, and one small
    all-reduce per attempt makes the decisions one where a solver that is not bitwise
    reproducible across ranks would let them differ (_agreed). ``seeds(i, attempt)``: the sketch's seed;
    ``envelope(i, S)`` -> (eps, r_env) gets S on the host (all slices' S cross in one transfer
    per attempt).
    ``scales``: power_of_two_scale of each slice (see range_finder_svd; None: 1).
    Returns per slice (U_local, S, V, frob2, r_env, S and frob2 on the host) of its last sketch
    (the tensor frob2 divided by scales[i]^2, the host one, a Python float, not).
    """
    scales = list(scales) if scales is not None else [1.0] * len(Xs)
    results: list = [None] * len(Xs)
    widths, starts = list(widths), list(starts)
    widened = [0] * len(Xs)
    margin = max(oversample // 2, 1)
    todo = list(range(len(Xs)))
    # attempt 0, one more at the same width for a slice whose warm sketch lagged or was far
    # (only ever after attempt 0), the widenings (each slice is widened max_widenings times at
    # most), and one as wide as the matrix (a flat or still far one), after which nothing retries
    for attempt in range(max_widenings + 3):
        if not todo:
            break
        omegas = [gaussian_sketch(shapes[i][1], widths[i], seeds(i, attempt), Xs[i].device, starts[i]) for i in todo]
        warm = [attempt == 0 and starts[i] is not None and starts[i].shape[-1] > 0 for i in todo]
        found = range_finder_svd([Xs[i] for i in todo], omegas, all_reduce, power_iters if all(warm) else cold_power_iters,
                                 [scales[i] for i in todo])
        # (no collective where every sketch spans its matrix: the SVD up to rounding, nothing to judge)
        judged = ranks is not None and max_residual < 1 and any(widths[i] < min(shapes[i]) for i in todo)
        residuals = _residuals_squared([Xs[i] for i in todo], found, all_reduce) if judged else None
        # S, frob2, the cos^2 of each new right singular vector to the warm columns (0 for cold
        # slices) and the squared Ritz residuals (0 unchecked), for every slice, in one transfer
        insides = [_inside(starts[i], V) if warm[n] else torch.zeros_like(S) for n, (i, (_, S, V, _)) in enumerate(zip(todo, found))]
        res = residuals or [torch.zeros_like(S) for _, S, _, _ in found]
        hosts = torch.cat([t.reshape(-1).to(torch.float32) for (_, S, _, frob2), inside, r2 in zip(found, insides, res)
                           for t in (S, frob2, inside, r2)]).cpu()
        hosts = hosts.split([n for _, S, _, _ in found for n in (S.numel(), 1, S.numel(), S.numel())])
        wanted = []  # per slice: (r_env, the width to sketch it again at, or 0)
        for n, i in enumerate(todo):
            S_host, inside = hosts[4 * n], hosts[4 * n + 2]
            eps, r_env = envelope(i, S_host)
            short = r_env > widths[i] - margin or (warm[n] and prev_envs is not None and r_env > prev_envs[i] + max_growth)
            lags = warm[n] and prev_eps is not None and _lag(S_host, inside, prev_eps[i], shapes[i][1]) > max_lag
            exact = widths[i] >= min(shapes[i])  # (the SVD up to rounding: nothing to improve)
            far = (residuals is not None and not exact
                   and _far(S_host, hosts[4 * n + 3], eps, ranks[i], shapes[i], max_residual, resolvable_ratio))
            if short and not exact and widened[i] < max_widenings:
                wanted.append((r_env, min(max(r_env + oversample, 2 * widths[i]), min(shapes[i]))))
            elif not exact and flat_beyond(S_host.tolist(), float(hosts[4 * n + 1]) * scales[i] ** 2, min(shapes[i]), eps,
                                           flat_tolerance):
                wanted.append((r_env, min(shapes[i])))
            elif far:  # (a warm first sketch: more iterations at its width; else the SVD up to rounding)
                wanted.append((r_env, widths[i] if warm[n] else min(shapes[i])))
            else:  # (a lag is only measured on attempt 0)
                wanted.append((r_env, widths[i] if lags and not exact else 0))
        retry = []
        agreed, spectra = _agreed(wanted, all_reduce, Xs[todo[0]].device, [hosts[4 * n] for n in range(len(todo))])
        for n, (i, (U, S, V, frob2), (r_env, wider)) in enumerate(zip(todo, found, agreed)):
            # the ranks' mean S (their own in the usual, bitwise equal case): every rank then
            # commits the same sigma and eps, so the same number of triplets above eps, which
            # sizes the per-step all-reduce
            S_host = spectra[n]
            results[i] = (U, S_host.to(S.device, S.dtype), V, frob2, r_env, S_host, float(hosts[4 * n + 1]) * scales[i] ** 2)
            if wider:
                widened[i] += wider > widths[i]
                widths[i], starts[i] = wider, V
                retry.append(i)
        todo = retry
    return results


def _residuals_squared(Xs: list[Tensor], found: list[tuple], all_reduce: AllReduce) -> list[Tensor]:
    """||X v_i - sigma_i u_i||^2 (k,) of each slice's Ritz triplets, as an exact Rayleigh-Ritz
    step on the sketch's subspace span(U) leaves them: ||(I - P_U) X v_i||^2, in float64 from
    one collective of the ranks' partial sums (U^T U, U^T X V and the column norms of X V).
    Formed in float32 as X v_i - sigma_i u_i, a residual carries the rounding of the dominant
    directions, some u sigma_1 / sigma_i: with one dominant direction (sigma_{r+1} / sigma_1 =
    1e-3) the check could not judge a sketch, and one off by 1.4e-3 in R(X) was committed.
    The projection removes that rounding (it lies in span(U)); what is left is the subspace's
    own error."""
    parts = []
    for x, (U, _, V, _) in zip(Xs, found):
        P, U64 = x.double() @ V.double(), U.double()
        parts += [U64.transpose(0, 1) @ U64, U64.transpose(0, 1) @ P, P.square().sum(dim=0)]
    sums = _flat_sum(parts, all_reduce)
    out = []
    for G, C, norms in zip(sums[0::3], sums[1::3], sums[2::3]):
        # G is I up to float32 rounding; shifted as in cholesky_qr for a zero column
        # (a failed factorization, non-finite factors from an overflowed sketch: NaN residuals,
        # which _far reads as far, as it read the float32 ones; no exception, no host sync)
        L, info = torch.linalg.cholesky_ex(_shifted(G))
        inside = (C * torch.cholesky_solve(C, L)).sum(dim=0)  # ||P_U X v_i||^2
        out.append(torch.where(info == 0, (norms - inside).clamp_min(0), torch.nan))
    return out


def _far(S: Tensor, r2: Tensor, eps: float, rank: int, shape: tuple[int, int], max_residual: float,
         resolvable_ratio: float) -> bool:
    """Whether a slice's Ritz triplets are far from its weights' own (on the host): the
    residual estimate of q3r.randomized.residual_error over max_residual, or the shortfall of a
    sigma_{r+1} that eps was set from over q3r._refresh_commit.MAX_EPS_SHORTFALL; judged only
    where the Ritz values resolve sigma_{r+1} and eps."""
    S64 = S.double()
    sigma_next = float(S64[rank]) if rank < S64.shape[0] else 0.0
    if S64.shape[0] < 2 or min(sigma_next, eps) < resolvable_ratio * float(S64[0]):
        return False
    rho = (r2.double().clamp_min(0).sqrt() / S64.clamp_min(torch.finfo(torch.float64).tiny)).nan_to_num(1.0, 1.0, 1.0)
    est = residual_error(S64[None], rho[None], torch.tensor([eps], dtype=torch.float64), torch.tensor([rank]), *shape)
    # an eps set from sigma_{r+1} whose Ritz value may fall short of it by more than the contract
    # allows: residual_error weighs that by (eps / sigma_i)^2, about 0 for a deep tail, and a warm
    # sketch of a tail drawn anew since the last refresh left eps 2.7% low (q3r._refresh_commit)
    short = (rank < S64.shape[0] - 1 and eps == sigma_next
             and sigma_next_shortfall(sigma_next, float(S64[-1]), float(rho[rank])) > MAX_EPS_SHORTFALL)
    return short or float(est[0]) > max_residual


def _inside(start: Tensor, V: Tensor) -> Tensor:
    """cos^2 of the angle of each column of V (d2, k) to the span of the warm columns of the
    sketch that found it (start: the previous V, orthonormal; as many of its columns as the
    sketch took)."""
    j = min(start.shape[-1], V.shape[-1])
    return (start[:, :j].to(V.device, V.dtype).transpose(0, 1) @ V).square().sum(dim=0)


def _lag(S: Tensor, inside: Tensor, eps: float, d2: int) -> float:
    """q3r.randomized.Sketch.lag of one slice, on the host: how far its new right singular
    vectors left the span of the old ones, weighted as the operator weighs them."""
    return float(weighted_lag(S[None], inside[None], torch.tensor([eps], dtype=S.dtype), d2)[0])


def _agreed(wanted: list[tuple[int, int]], all_reduce: AllReduce, device,
            spectra: list[Tensor] = ()) -> tuple[list[tuple[int, int]], list[Tensor]]:
    """The ranks' decisions (r_env, width to sketch again at or 0) made one, and their Ritz
    values S (``spectra``, per slice, on the host) made one: their mean. Every rank computes S
    from the same all-reduced B, but a singular value solver that is not bitwise reproducible
    across ranks (thread counts, libraries) could put a value on the other side of eps on one
    rank: a widening taken by some ranks only would hang the collectives, and so would a
    different number of triplets above eps (the per-step all-reduce is sized by it). One
    small all-reduce (sums; the same rounding everywhere): a slice is widened where any rank
    wants it, to the mean of the widths those ranks asked for; r_env is the ceiling of the
    mean; the mean of equal float32 values is that value. The table is reduced on ``device``,
    the weights' (an NCCL group has no CPU backend)."""
    if not wanted:
        return [], []
    local = torch.tensor([[r_env, wider, float(wider > 0), 1.0] for r_env, wider in wanted], dtype=torch.float64)
    flat = torch.cat([local.reshape(-1), *(s.reshape(-1).double() for s in spectra)])
    total = all_reduce(flat.to(device, copy=True)).cpu()
    table = total[: local.numel()].view_as(local)
    ranks = table[:, 3:4]
    means = [part.div(float(ranks[0, 0])).to(s.dtype) for part, s in
             zip(total[local.numel():].split([s.numel() for s in spectra]), spectra)]
    if bool((table[:, :3] == local[:, :3] * ranks).all()):  # the usual case: they agree
        return wanted, means
    r_env = torch.ceil(table[:, 0] / table[:, 3]).to(torch.int64).tolist()
    wider = torch.ceil(table[:, 1] / table[:, 2].clamp_min(1)).to(torch.int64).tolist()
    return list(zip(r_env, wider)), means

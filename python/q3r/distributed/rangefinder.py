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
targets, q + 3 per refresh. Cholesky-QR squares the condition number, so the Gram matrix is accumulated and
factored in float64, each pass adds a tiny shift (so a rank-deficient sketch, e.g. zero
weights or a sketch as wide as the matrix, still factors), and the passes are repeated
(CholeskyQR2), which leaves Q orthonormal to float32 rounding. When k reaches min(d1, d2) the
result is the exact SVD up to rounding.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["sketch_width", "gaussian_sketch", "cholesky_qr", "range_finder_svd"]

AllReduce = Callable[[Tensor], Tensor]


def sketch_width(rank: int, d1: int, d2: int, oversample: int) -> int:
    """k = rank + oversample, at most min(d1, d2); always > rank, so sigma_{r+1} is estimated."""
    return min(rank + oversample, min(d1, d2))


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
            k = g.shape[0]
            # a tiny relative shift keeps Cholesky defined for a singular Gram (zero weights, a
            # sketch wider than the rank); on a well-conditioned pass it changes nothing in fp32
            shift = 1e-12 * float(torch.diagonal(g).sum()) / max(k, 1) + 1e-300
            g = g + shift * torch.eye(k, dtype=g.dtype, device=g.device)
            L = torch.linalg.cholesky(g)
            # Q = Y L^{-T}: solve Q L^T = Y
            q = torch.linalg.solve_triangular(L.transpose(0, 1), y.double(), upper=True, left=False)
            out.append(q.to(torch.float32))
        Ys = out
    return Ys


def range_finder_svd(
    Xs: list[Tensor], omegas: list[Tensor], all_reduce: AllReduce, power_iters: int = 2
) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Leading k triplets of each row-sharded X (local rows Xs[i], float32; Omega d2 x k).

    Returns per slice (U_local (rows x k), S (k,), V (d2 x k), frob2 ()) where frob2 is
    ||X||_F^2 of the whole slice (summed over ranks, for the tail energy).
    """
    Xs = [x.to(torch.float32) for x in Xs]
    Ys = [x @ om for x, om in zip(Xs, omegas)]
    for _ in range(power_iters):
        # Z = X^T Y is replicated after its all-reduce, so orthonormalizing it is a local QR
        # and costs no collective; Y itself is orthonormalized only once, at the end (its
        # condition number is that of X on an orthonormal Z, so Cholesky-QR copes)
        Zs = _flat_sum([x.transpose(0, 1) @ y for x, y in zip(Xs, Ys)], all_reduce)
        Ys = [x @ torch.linalg.qr(z)[0] for x, z in zip(Xs, Zs)]
    Q = cholesky_qr(Ys, all_reduce, passes=2)
    # B = Q^T X and ||X||^2 in one collective
    parts = []
    for x, q in zip(Xs, Q):
        parts += [q.transpose(0, 1) @ x, x.square().sum().reshape(1)]
    sums = _flat_sum(parts, all_reduce)
    out = []
    for i, q in enumerate(Q):
        B, frob2 = sums[2 * i], sums[2 * i + 1]
        Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
        out.append((q @ Ub, S, Vh.transpose(0, 1).contiguous(), frob2.reshape(())))
    return out

"""R(X) = X + U A' + G V^T, tile by tile, for many blocks in one launch.

With A = U^T X, B = X V and C = U^T B (k x k), SPEC section 2 writes

    R(X) = X + (U diag d)(A + C diag(d) V^T) + B diag(d) V^T = X + U A' + G V^T,
    A' = diag(d) A  (k x cols),   G = (B + (U diag d) C) diag d   (rows x k).

So after the small stages (packing U and V; projection, which writes A'^T and B; C^T and d;
G, written over B) R is X plus a rank-2k update whose factors [U | G] and [A' ; V^T] are all
small: a tile of R needs a tile of X and four thin strips, never anything of full size, and
its inner loop multiplies aligned K-major tiles exactly as they are loaded. The apply kernel writes out = alpha * R(X)
(+ out, to add 2 lambda R(W) into a gradient in place).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _meta as m
from ._meta import (F_A, F_B, F_C, F_COLS, F_D, F_DSRC, F_EPS, F_K, F_ROWS, F_UP, F_VP, F_X, F_X_SC, F_X_SR, F_Y,
                    F_Y_SC, F_Y_SR, G_SCALE, NG)
from ._meta import coefficients, packed_width, pointer, tile_offsets
from .projection import _block, fill_factor_fields, launch_project


@triton.jit
def _gram_kernel(meta, sched, n_programs, D_FROM_SIGMA: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                 PRECISION: tl.constexpr):
    """C^T[jc, ic] = B[:, jc]^T @ U[:, ic] (C = U^T X V, stored transposed so that the G stage
    reads it K-major); tile 0 of each block also writes d (0 beyond k)."""
    row, tile = _block(meta, sched, n_programs)
    rows = tl.load(row + F_ROWS).to(tl.int32)
    k = tl.load(row + F_K).to(tl.int32)
    kp = packed_width(row)
    n_kc = kp // BK
    if tile == 0:
        d_ptr = tl.load(row + F_D).to(tl.pointer_type(tl.float32))
        for k0 in range(0, kp, BK):
            offs = k0 + tl.arange(0, BK)
            tl.store(d_ptr + offs, coefficients(row, offs, k, D_FROM_SIGMA))
    u_ptr = tl.multiple_of(tl.load(row + F_UP).to(tl.pointer_type(tl.float32)), 16)
    b_ptr = tl.multiple_of(tl.load(row + F_B).to(tl.pointer_type(tl.float32)), 16)
    offs_j = (tile // n_kc) * BK + tl.arange(0, BK)
    offs_i = (tile % n_kc) * BK + tl.arange(0, BK)
    acc = tl.zeros((BK, BK), dtype=tl.float32)
    for r0 in range(0, rows, BM):
        offs_m = r0 + tl.arange(0, BM)
        in_m = offs_m < rows
        bt = tl.load(b_ptr + offs_m[None, :] * kp + offs_j[:, None], mask=in_m[None, :], other=0.0)
        u = tl.load(u_ptr + offs_m[:, None] * kp + offs_i[None, :], mask=in_m[:, None], other=0.0)
        acc = tl.dot(bt, u, acc, input_precision=PRECISION)
    c_ptr = tl.load(row + F_C).to(tl.pointer_type(tl.float32))
    tl.store(c_ptr + offs_j[:, None] * kp + offs_i[None, :], acc)


@triton.jit
def _left_kernel(meta, sched, n_programs, BM: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    """G[rt, jc] = (B[rt, jc] + (U[rt, :] diag d) @ C[:, jc]) * d[jc], written over B[rt, jc]
    (each program reads only its own tile of B, so in place is safe)."""
    row, tile = _block(meta, sched, n_programs)
    rows = tl.load(row + F_ROWS).to(tl.int32)
    kp = packed_width(row)
    n_kc = kp // BK
    u_ptr = tl.multiple_of(tl.load(row + F_UP).to(tl.pointer_type(tl.float32)), 16)
    c_ptr = tl.multiple_of(tl.load(row + F_C).to(tl.pointer_type(tl.float32)), 16)
    d_ptr = tl.load(row + F_D).to(tl.pointer_type(tl.float32))
    b_ptr = tl.multiple_of(tl.load(row + F_B).to(tl.pointer_type(tl.float32)), 16)
    offs_m = (tile // n_kc) * BM + tl.arange(0, BM)
    offs_j = (tile % n_kc) * BK + tl.arange(0, BK)
    in_m = offs_m[:, None] < rows
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for k0 in range(0, kp, BK):
        offs_i = k0 + tl.arange(0, BK)
        u = tl.load(u_ptr + offs_m[:, None] * kp + offs_i[None, :], mask=in_m, other=0.0)
        di = tl.load(d_ptr + offs_i)
        c = tl.load(c_ptr + offs_j[None, :] * kp + offs_i[:, None])  # C[i, j] from C^T
        acc = tl.dot(u * di[None, :], c, acc, input_precision=PRECISION)
    b = tl.load(b_ptr + offs_m[:, None] * kp + offs_j[None, :], mask=in_m, other=0.0)
    dj = tl.load(d_ptr + offs_j)
    tl.store(b_ptr + offs_m[:, None] * kp + offs_j[None, :], (b + acc) * dj[None, :], mask=in_m)


@triton.jit
def lowrank_tile(row, offs_m, offs_n, rows, cols, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 PRECISION: tl.constexpr):
    """U A' + G V^T (= (U diag d) A + G V^T) on one (BM, BN) tile of a block, in float32.
    Every operand is packed (width kp, a multiple of BK): aligned K-major tiles, no k mask."""
    kp = packed_width(row)
    u_ptr = tl.multiple_of(tl.load(row + F_UP).to(tl.pointer_type(tl.float32)), 16)
    v_ptr = tl.multiple_of(tl.load(row + F_VP).to(tl.pointer_type(tl.float32)), 16)
    a_ptr = tl.multiple_of(tl.load(row + F_A).to(tl.pointer_type(tl.float32)), 16)
    g_ptr = tl.multiple_of(tl.load(row + F_B).to(tl.pointer_type(tl.float32)), 16)
    in_m = offs_m[:, None] < rows
    in_n = offs_n[:, None] < cols
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, kp, BK):
        offs_k = k0 + tl.arange(0, BK)
        u = tl.load(u_ptr + offs_m[:, None] * kp + offs_k[None, :], mask=in_m, other=0.0)
        a = tl.load(a_ptr + offs_n[:, None] * kp + offs_k[None, :], mask=in_n, other=0.0)
        acc = tl.dot(u, tl.trans(a), acc, input_precision=PRECISION)  # a holds (diag(d) A)^T
        g = tl.load(g_ptr + offs_m[:, None] * kp + offs_k[None, :], mask=in_m, other=0.0)
        v = tl.load(v_ptr + offs_n[:, None] * kp + offs_k[None, :], mask=in_n, other=0.0)
        acc = tl.dot(g, tl.trans(v), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _apply_kernel(meta, floats, sched, n_programs, X_DTYPE: tl.constexpr, Y_DTYPE: tl.constexpr,
                  ACCUMULATE: tl.constexpr, ALIGNED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr, PRECISION: tl.constexpr):
    """out = alpha * R(X) (+ out when ACCUMULATE) on one tile."""
    pid = tl.program_id(0)
    blk = tl.load(sched + pid).to(tl.int64)
    row, tile = _block(meta, sched, n_programs)
    rows = tl.load(row + F_ROWS).to(tl.int32)
    cols = tl.load(row + F_COLS).to(tl.int32)
    if ALIGNED:  # see _meta.aligned: 128-bit loads and stores
        cols = tl.multiple_of(cols, 16)
    n_ct = tl.cdiv(cols, BN)
    offs_m = (tile // n_ct) * BM + tl.arange(0, BM)
    offs_n = (tile % n_ct) * BN + tl.arange(0, BN)
    mask = (offs_m[:, None] < rows) & (offs_n[None, :] < cols)
    lowrank = lowrank_tile(row, offs_m, offs_n, rows, cols, BM, BN, BK, PRECISION)
    x_ptrs = pointer(row, F_X, X_DTYPE, ALIGNED) + tile_offsets(row, F_X_SR, F_X_SC, offs_m, offs_n, ALIGNED)
    r = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32) + lowrank
    alpha = tl.load(floats + blk * NG + G_SCALE)
    y_ptrs = pointer(row, F_Y, Y_DTYPE, ALIGNED) + tile_offsets(row, F_Y_SR, F_Y_SC, offs_m, offs_n, ALIGNED)
    out = alpha * r
    if ACCUMULATE:
        out = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32) + out
    tl.store(y_ptrs, out.to(Y_DTYPE), mask=mask)


def prepare(table: torch.Tensor, shapes, x_dtype: torch.dtype, d_from_sigma: bool, device,
            aligned: bool = False) -> None:
    """Run the small stages for every block of ``table``: packing, (diag(d) A)^T and B, then C
    and d, then G."""
    cfg = m.CONFIG
    launch_project(table, shapes, x_dtype, device, aligned, scale_a=True, d_from_sigma=d_from_sigma)
    prec = m.dot_precision()
    bm, bk = cfg.small_block_m, cfg.small_block_k
    kps = [m.padded_width(k) for _, _, k in shapes]
    sched, total = m.tile_schedule([(kp // bk) ** 2 for kp in kps], device)
    if total:
        _gram_kernel[(total,)](table, sched, total, d_from_sigma, bm, bk, prec, num_warps=cfg.small_num_warps)
    sched, total = m.tile_schedule([m.cdiv(r, bm) * (kp // bk) for (r, _, _), kp in zip(shapes, kps)], device)
    if total:
        _left_kernel[(total,)](table, sched, total, bm, bk, prec, num_warps=cfg.small_num_warps)


def tile_counts(shapes) -> list[int]:
    cfg = m.CONFIG
    return [m.cdiv(r, cfg.block_m) * m.cdiv(c, cfg.block_n) for r, c, _ in shapes]


def add_reweighting_(outs, Xs, Us, Vs, ds, alphas, accumulate: bool = True, sigmas=None, epss=None) -> None:
    """outs[i] (+)= alphas[i] * R_i(Xs[i]) for 2-D blocks, grouped: four launches per dtype pair.

    R_i is given by (Us[i], Vs[i], ds[i]), or by (Us[i], Vs[i]) with sigmas[i], epss[i] (0-d
    float32 tensor) when ds is None, in which case d is derived on the device. outs[i] may
    be a strided view (a gradient slice), or Xs[i] itself: a tile of X is read only by the
    program that writes the same tile of out, after A and B were formed.
    """
    if not Xs:
        return
    from_sigma = ds is None
    device = Xs[0].device
    shapes = [(X.shape[0], X.shape[1], U.shape[1]) for X, U in zip(Xs, Us)]
    ws = m.Workspace(shapes, device)
    groups: dict[tuple, list[int]] = {}
    for i, (X, U, V, Y) in enumerate(zip(Xs, Us, Vs, outs)):
        m.check_factors(X, U, V, None if from_sigma else ds[i])
        if tuple(Y.shape) != tuple(X.shape):
            raise ValueError(f"q3r_kernels: output of shape {tuple(Y.shape)} for X of shape {tuple(X.shape)}")
        groups.setdefault((X.dtype, Y.dtype, m.aligned(X, Y) and X.shape[1] % 16 == 0), []).append(i)
    for (x_dtype, y_dtype, aligned), idx in groups.items():
        rows, floats = m.new_table(len(idx)), []
        for row, i in zip(rows, idx):
            fill_factor_fields(row, Xs[i], Us[i], Vs[i], ws, i)
            m.put_matrix(row, (m.F_Y, m.F_Y_SR, m.F_Y_SC), outs[i])
            if from_sigma:
                row[F_DSRC], row[F_EPS] = sigmas[i].data_ptr(), epss[i].data_ptr()
            else:
                row[F_DSRC] = ds[i].data_ptr()
            floats.append([float(alphas[i])] + [0.0] * (int(NG) - 1))
        table = m.to_device_table(rows, torch.int64, device)
        floats = m.to_device_table(floats, torch.float32, device)
        sub_shapes = [shapes[i] for i in idx]
        prepare(table, sub_shapes, x_dtype, from_sigma, device, aligned)
        sched, total = m.tile_schedule(tile_counts(sub_shapes), device)
        if total:
            cfg = m.CONFIG
            _apply_kernel[(total,)](
                table, floats, sched, total, m.tl_dtype(x_dtype), m.tl_dtype(y_dtype), accumulate, aligned,
                cfg.block_m, cfg.block_n, cfg.block_k, m.dot_precision(), **m.launch_options(cfg.num_warps, cfg.num_stages),
            )
    del ws  # kernels are queued on the stream; the caching allocator keeps the order safe


def apply_reweighting(X: torch.Tensor, U: torch.Tensor, V: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """R(X) in float32, q3r.reference.apply_reweighting on the device (leading batch dims OK)."""
    batch, (d1, d2), k = X.shape[:-2], X.shape[-2:], U.shape[-1]
    n = math.prod(batch)
    Xs = X.reshape(n, d1, d2)
    Us = U.expand(*batch, d1, k).reshape(n, d1, k)
    Vs = V.expand(*batch, d2, k).reshape(n, d2, k)
    ds = d.expand(*batch, k).reshape(n, k)
    out = torch.empty(Xs.shape, dtype=torch.float32, device=X.device)
    add_reweighting_(list(out), list(Xs), list(Us), list(Vs), [t.contiguous() for t in ds], [1.0] * n,
                     accumulate=False)
    return out.reshape(X.shape)

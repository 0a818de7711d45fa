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
from ._meta import (F_A, F_B, F_C, F_COLS, F_D, F_K, F_NUMEL, F_ROWS, F_UP, F_VP, F_X, F_X_SC, F_X_SR, F_Y,
                    F_Y_SC, F_Y_SR, G_SCALE, NG)
from ._meta import coefficients, packed_width, pointer, tile_offsets
from .plan import BlockPlan
from .projection import _block, launch_project


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
    schedules = m.stage_schedules(shapes, device)
    sched, total = schedules["gram"]
    if total:
        _gram_kernel[(total,)](table, sched, total, d_from_sigma, bm, bk, prec, num_warps=cfg.small_num_warps)
    sched, total = schedules["left"]
    if total:
        _left_kernel[(total,)](table, sched, total, bm, bk, prec, num_warps=cfg.small_num_warps)


def tile_counts(shapes) -> list[int]:
    cfg = m.CONFIG
    return [m.cdiv(r, cfg.block_m) * m.cdiv(c, cfg.block_n) for r, c, _ in shapes]


class ReweightPlan(BlockPlan):
    """out (+)= alpha R(X) for a fixed set of 2-D blocks: tables, schedules, workspace layout.

    X is fixed (its address is in the tables); each out keeps the layout it had at build
    (shape, strides, dtype, 16-byte alignment) but may live elsewhere at every run: a
    gradient is often a new tensor each step. factors[i] is (U, V, d), or (U, V, sigma, eps)
    with d derived on the device; block i's follow :meth:`update_factors`. The workspace is
    allocated per run (see BlockPlan).
    """

    def __init__(self, Xs, outs, factors, accumulate: bool = True):
        super().__init__(Xs[0].device if Xs else None)
        cfg = m.CONFIG
        self.config = (cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages, m.dot_precision())
        self.accumulate = accumulate
        m.check_one_device(Xs, self.device, "block")
        by_key: dict[tuple, list[int]] = {}
        for i, (X, Y, f) in enumerate(zip(Xs, outs, factors)):
            if tuple(Y.shape) != tuple(X.shape) or Y.dim() != 2 or Y.device != X.device:
                raise ValueError(f"q3r_kernels: output of shape {tuple(Y.shape)} on {Y.device} for X of shape "
                                 f"{tuple(X.shape)} on {X.device}")
            by_key.setdefault((X.dtype, Y.dtype, m.aligned(X, Y) and X.shape[1] % 16 == 0, len(f)), []).append(i)
        self.groups = [self._group(key, idx, Xs, outs, factors) for key, idx in by_key.items()]
        self._index(len(Xs))

    def _group(self, key, idx, Xs, outs, factors) -> dict:
        x_dtype, y_dtype, aligned, n_factors = key
        table = m.new_table(len(idx))
        g = dict(idx=idx, dtypes=(x_dtype, y_dtype), aligned=aligned, n_factors=n_factors, sent=None, floats=None)
        self._q3r_group(g, table, [tuple(Xs[i].shape) for i in idx], [factors[i] for i in idx])
        for row, i in zip(table, idx):
            X = Xs[i]
            m.put_matrix(row, (F_X, F_X_SR, F_X_SC), X)
            m.put_matrix(row, (F_Y, F_Y_SR, F_Y_SC), outs[i])
            row[F_ROWS], row[F_COLS], row[F_NUMEL] = X.shape[0], X.shape[1], X.numel()
        g["sched"], g["total"] = m.tile_schedule(tile_counts(g["shapes"]), self.device)
        g["host"] = torch.tensor(table, dtype=torch.int64)
        return g

    def run(self, outs, alphas) -> None:
        """outs[i] (+)= alphas[i] * R_i(X_i); outs laid out as at build (the caller's promise)."""
        self.check_settings()
        with m.on_device(self.device):
            self._run(outs, alphas)

    def _run(self, outs, alphas) -> None:
        block_m, block_n, block_k, num_warps, num_stages, precision = self.config
        for g in self.groups:
            table, workspace = self.run_table(g, {int(F_Y): [outs[i].data_ptr() for i in g["idx"]]})
            scales = tuple(float(alphas[i]) for i in g["idx"])
            if g["floats"] is None or g["floats"][0] != scales:
                rows = [[a] + [0.0] * (int(NG) - 1) for a in scales]  # G_SCALE is field 0
                g["floats"] = (scales, m.to_device_table(rows, torch.float32, self.device))
            prepare(table, g["shapes"], g["dtypes"][0], g["n_factors"] == 4, self.device, g["aligned"])
            if g["total"]:
                _apply_kernel[(g["total"],)](
                    table, g["floats"][1], g["sched"], g["total"], *(m.tl_dtype(t) for t in g["dtypes"]),
                    self.accumulate, g["aligned"], block_m, block_n, block_k, precision,
                    **m.launch_options(num_warps, num_stages),
                )
            del workspace  # the launches are queued; the caching allocator keeps the order safe


def add_reweighting_(outs, Xs, Us, Vs, ds, alphas, accumulate: bool = True, sigmas=None, epss=None) -> None:
    """outs[i] (+)= alphas[i] * R_i(Xs[i]) for 2-D blocks, grouped: six launches per group (dtypes, alignment, factor form).

    R_i is given by (Us[i], Vs[i], ds[i]), or by (Us[i], Vs[i]) with sigmas[i], epss[i] (0-d
    float32 tensor) when ds is None, in which case d is derived on the device. outs[i] may
    be a strided view (a gradient slice), or Xs[i] itself: a tile of X is read only by the
    program that writes the same tile of out, after A and B were formed. A loop that calls
    this with the same tensors every step should keep a :class:`ReweightPlan` instead.
    """
    if not Xs:
        return
    for X in Xs:
        if X.dim() != 2:
            raise ValueError(f"q3r_kernels: a block must be 2-D, got X of shape {tuple(X.shape)}")
    factors = [(U, V, d) for U, V, d in zip(Us, Vs, ds)] if ds is not None else list(zip(Us, Vs, sigmas, epss))
    ReweightPlan(Xs, outs, factors, accumulate).run(outs, alphas)


def apply_reweighting(X: torch.Tensor, U: torch.Tensor, V: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """R(X) in float32, q3r.reference.apply_reweighting on the device (leading batch dims OK)."""
    (d1, d2), k = X.shape[-2:], U.shape[-1]
    # the batch dims of all four broadcast together, as in the reference (factors may carry some X lacks)
    batch = torch.broadcast_shapes(X.shape[:-2], U.shape[:-2], V.shape[:-2], d.shape[:-1])
    n = math.prod(batch)
    Xs = X.expand(*batch, d1, d2).reshape(n, d1, d2)
    Us = U.expand(*batch, d1, k).reshape(n, d1, k)
    Vs = V.expand(*batch, d2, k).reshape(n, d2, k)
    ds = d.expand(*batch, k).reshape(n, k)
    out = torch.empty(Xs.shape, dtype=torch.float32, device=X.device)
    add_reweighting_(list(out), list(Xs), list(Us), list(Vs), [t.contiguous() for t in ds], [1.0] * n,
                     accumulate=False)
    return out.reshape(*batch, d1, d2)

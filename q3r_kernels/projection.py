"""Projection A = U^T X, B = X V for many blocks (slices, weights) in one launch.

These two skinny products are the only reads of X that R(X) needs (SPEC section 2). For R
itself (apply.prepare) the kernel writes diag(d) A instead of A, so that the hot loop of the
apply and fused Adam kernels multiplies tiles straight from memory. A program owns either a (BM x BK) tile of B, reducing along a strip of X's rows, or a
(BK x BN) tile of A, reducing down a strip of X's columns; both reductions finish inside
the program, so the result is deterministic (no atomics) and no partial sums hit memory.
Programs for the same strip of X and different k-chunks are adjacent in the schedule, so
the repeated reads of a strip come from L2.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _meta as m
from ._meta import coefficients, pointer
from ._meta import F_A, F_B, F_COLS, F_K, F_ROWS, F_U, F_U_SK, F_U_SR, F_V, F_V_SK, F_V_SR, F_X, F_X_SC, F_X_SR, NF


@triton.jit
def _project_kernel(meta, sched, n_programs, X_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, SCALE_A: tl.constexpr,
                    D_FROM_SIGMA: tl.constexpr):
    pid = tl.program_id(0)
    blk = tl.load(sched + pid).to(tl.int64)
    tile = tl.load(sched + n_programs + pid)
    row = meta + blk * NF
    x_ptr = pointer(row, F_X, X_DTYPE, ALIGNED)
    x_sr = tl.load(row + F_X_SR).to(tl.int32)
    x_sc = tl.load(row + F_X_SC).to(tl.int32)
    if ALIGNED:  # unit column stride, rows and widths in multiples of 16: 128-bit loads
        x_sr = tl.multiple_of(x_sr, 16)
    rows = tl.load(row + F_ROWS).to(tl.int32)
    cols = tl.load(row + F_COLS).to(tl.int32)
    if ALIGNED:
        cols = tl.multiple_of(cols, 16)
    k = tl.load(row + F_K).to(tl.int32)
    n_kc = tl.cdiv(k, BK)
    n_b = tl.cdiv(rows, BM) * n_kc
    # (the two branches name their accumulators apart: Triton types a name across an if)
    if tile < n_b:
        # B[rt, kc] = sum over column tiles of X[rt, c] @ V[c, kc]
        v_ptr = tl.load(row + F_V).to(tl.pointer_type(tl.float32))
        v_sr = tl.load(row + F_V_SR).to(tl.int32)
        v_sk = tl.load(row + F_V_SK).to(tl.int32)
        offs_m = (tile // n_kc) * BM + tl.arange(0, BM)
        offs_k = (tile % n_kc) * BK + tl.arange(0, BK)
        acc_b = tl.zeros((BM, BK), dtype=tl.float32)
        for c0 in range(0, cols, BN):
            offs_n = c0 + tl.arange(0, BN)
            x = tl.load(x_ptr + x_offsets(offs_m, offs_n, x_sr, x_sc, ALIGNED),
                        mask=(offs_m[:, None] < rows) & (offs_n[None, :] < cols), other=0.0).to(tl.float32)
            v = tl.load(v_ptr + offs_n[:, None] * v_sr + offs_k[None, :] * v_sk,
                        mask=(offs_n[:, None] < cols) & (offs_k[None, :] < k), other=0.0)
            acc_b = tl.dot(x, v, acc_b, input_precision=PRECISION)
        b_ptr = tl.load(row + F_B).to(tl.pointer_type(tl.float32))
        tl.store(b_ptr + offs_m[:, None] * k + offs_k[None, :], acc_b,
                 mask=(offs_m[:, None] < rows) & (offs_k[None, :] < k))
    else:
        # A[kc, ct] = sum over row tiles of U[r, kc]^T @ X[r, ct]
        u_ptr = tl.load(row + F_U).to(tl.pointer_type(tl.float32))
        u_sr = tl.load(row + F_U_SR).to(tl.int32)
        u_sk = tl.load(row + F_U_SK).to(tl.int32)
        t = tile - n_b
        offs_n = (t // n_kc) * BN + tl.arange(0, BN)
        offs_k = (t % n_kc) * BK + tl.arange(0, BK)
        acc_a = tl.zeros((BK, BN), dtype=tl.float32)
        for r0 in range(0, rows, BM):
            offs_m = r0 + tl.arange(0, BM)
            # U^T loaded directly as a (BK, BM) tile: no transpose in registers
            ut = tl.load(u_ptr + offs_k[:, None] * u_sk + offs_m[None, :] * u_sr,
                         mask=(offs_k[:, None] < k) & (offs_m[None, :] < rows), other=0.0)
            x = tl.load(x_ptr + x_offsets(offs_m, offs_n, x_sr, x_sc, ALIGNED),
                        mask=(offs_m[:, None] < rows) & (offs_n[None, :] < cols), other=0.0).to(tl.float32)
            acc_a = tl.dot(ut, x, acc_a, input_precision=PRECISION)
        if SCALE_A:  # diag(d) A: the row scaling (U diag d) A would need in the apply loop
            acc_a = acc_a * coefficients(row, offs_k, k, D_FROM_SIGMA)[:, None]
        a_ptr = tl.load(row + F_A).to(tl.pointer_type(tl.float32))
        tl.store(a_ptr + offs_k[:, None] * cols + offs_n[None, :], acc_a,
                 mask=(offs_k[:, None] < k) & (offs_n[None, :] < cols))


@triton.jit
def x_offsets(offs_m, offs_n, x_sr, x_sc, ALIGNED: tl.constexpr):
    if ALIGNED:
        return offs_m[:, None] * x_sr + offs_n[None, :]
    return offs_m[:, None] * x_sr + offs_n[None, :] * x_sc


def project_tile_counts(shapes: list[tuple[int, int, int]]) -> list[int]:
    cfg = m.CONFIG
    return [(m.cdiv(r, cfg.proj_block_m) + m.cdiv(c, cfg.proj_block_n)) * m.cdiv(k, cfg.proj_block_k) for r, c, k in shapes]


def launch_project(table: torch.Tensor, shapes: list[tuple[int, int, int]], x_dtype: torch.dtype, device,
                   aligned: bool = False, scale_a: bool = False, d_from_sigma: bool = False) -> None:
    """Fill A and B of every block of ``table`` (rows built by the caller, all X of x_dtype;
    ``aligned``: every X passes _meta.aligned and has a width that is a multiple of 16;
    ``scale_a``: write diag(d) A, d from the rows' d or (``d_from_sigma``) sigma and eps)."""
    sched, total = m.tile_schedule(project_tile_counts(shapes), device)
    if total == 0:
        return
    cfg = m.CONFIG
    _project_kernel[(total,)](
        table, sched, total, m.tl_dtype(x_dtype), aligned, cfg.proj_block_m, cfg.proj_block_n, cfg.proj_block_k,
        m.dot_precision(), scale_a, d_from_sigma, **m.launch_options(cfg.proj_num_warps, cfg.proj_num_stages),
    )


def project_blocks(Xs: list[torch.Tensor], Us: list[torch.Tensor], Vs: list[torch.Tensor]):
    """[(A_i, B_i)] = [(U_i^T X_i, X_i V_i)] for 2-D blocks X_i (views are fine) in one launch
    per dtype of X. A_i is (k_i, cols_i), B_i (rows_i, k_i), float32."""
    if not Xs:
        return []
    for X, U, V in zip(Xs, Us, Vs):
        m.check_factors(X, U, V)
    device = Xs[0].device
    shapes = [(X.shape[0], X.shape[1], U.shape[1]) for X, U in zip(Xs, Us)]
    ws = m.Workspace(shapes, device)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, X in enumerate(Xs):
        by_dtype.setdefault(X.dtype, []).append(i)
    for dtype, idx in by_dtype.items():
        rows = m.new_table(len(idx))
        for row, i in zip(rows, idx):
            fill_factor_fields(row, Xs[i], Us[i], Vs[i], ws, i)
        launch_project(m.to_device_table(rows, torch.int64, device), [shapes[i] for i in idx], dtype, device)
    return [(ws.view(i, 0), ws.view(i, 1)) for i in range(len(Xs))]


def fill_factor_fields(row: list[int], X, U, V, ws: m.Workspace, i: int) -> None:
    """The table fields every stage reads: X, its size, the factors and the workspace."""
    m.put_matrix(row, (m.F_X, m.F_X_SR, m.F_X_SC), X)
    row[m.F_ROWS], row[m.F_COLS] = X.shape[0], X.shape[1]
    row[m.F_NUMEL] = X.shape[0] * X.shape[1]
    put_factor_fields(row, U, V)
    put_workspace_fields(row, ws, i)


def put_factor_fields(row: list[int], U, V) -> None:
    """The fields of the factors themselves (a refresh replaces them): k, U and V."""
    row[m.F_K] = U.shape[1]
    m.put_matrix(row, (m.F_U, m.F_U_SR, m.F_U_SK), U)
    m.put_matrix(row, (m.F_V, m.F_V_SR, m.F_V_SK), V)


def put_workspace_fields(row: list[int], ws: m.Workspace, i: int) -> None:
    for piece, field in enumerate((m.F_A, m.F_B, m.F_C, m.F_D)):
        row[field] = ws.address(i, piece)


def project(X: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A = U^T X (..., k, d2), B = X V (..., d1, k): q3r.reference.project on the device.
    Leading batch dimensions become blocks of one launch."""
    batch, (d1, d2), k = X.shape[:-2], X.shape[-2:], U.shape[-1]
    n = math.prod(batch)
    Xs = X.reshape(n, d1, d2)
    Us = U.expand(*batch, d1, k).reshape(n, d1, k)
    Vs = V.expand(*batch, d2, k).reshape(n, d2, k)
    out = project_blocks(list(Xs), list(Us), list(Vs))
    A = torch.stack([a for a, _ in out]).reshape(*batch, k, d2) if out else X.new_empty(*batch, k, d2, dtype=torch.float32)
    B = torch.stack([b for _, b in out]).reshape(*batch, d1, k) if out else X.new_empty(*batch, d1, k, dtype=torch.float32)
    return A, B

"""Projection A = U^T X, B = X V for many blocks (slices, weights), and the factor packing.

These two skinny products are the only reads of X that R(X) needs (SPEC section 2). Three
launches, each grouped over all blocks:

- pack: U -> U (rows, kp) and U^T (kp, rows_p), V -> V (cols, kp), zero-padded to the
  packed width kp (see _meta), so that every dot below reads aligned, K-major tiles;
- A^T = X^T U: a program owns a (BN, BK) tile of A^T and reduces down a strip of X's columns
  (X^T is the dot's first operand, taken from registers, so X is never copied transposed);
- B = X V: a program owns a (BM, BK) tile of B and reduces along a strip of X's rows. B is
  written over the packed U^T (one piece of workspace for both), so it runs second.

Both reductions finish inside the program: the result is deterministic (no atomics) and no
partial sums hit memory. For R itself (apply.prepare) the second writes (diag(d) A)^T, so the
hot loop of the apply and fused Adam kernels multiplies tiles straight from memory.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _meta as m
from ._meta import coefficients, packed_width, pointer, transposed_stride
from ._meta import (F_A, F_B, F_COLS, F_K, F_ROWS, F_U, F_U_SK, F_U_SR, F_UP, F_UT, F_V, F_V_SK, F_V_SR, F_VP, F_X,
                    F_X_SC, F_X_SR, NF)


@triton.jit
def _block(meta, sched, n_programs):
    """This program's table row and tile number within its block."""
    pid = tl.program_id(0)
    blk = tl.load(sched + pid).to(tl.int64)
    return meta + blk * NF, tl.load(sched + n_programs + pid)


@triton.jit
def _pack_kernel(meta, sched, n_programs, BR: tl.constexpr, BC: tl.constexpr):
    """Tile t of a block: rows [t BR, (t+1) BR) of U (t < its U tiles) or of V, copied over
    all kp columns (zeros beyond k) into U (rows, kp) and U^T (kp, rows_p), or V (cols, kp)."""
    row, tile = _block(meta, sched, n_programs)
    rows = tl.load(row + F_ROWS).to(tl.int32)
    cols = tl.load(row + F_COLS).to(tl.int32)
    k = tl.load(row + F_K).to(tl.int32)
    kp = packed_width(row)
    n_u = tl.cdiv(rows, BR)
    is_u = tile < n_u
    if is_u:
        src = tl.load(row + F_U).to(tl.pointer_type(tl.float32))
        s_r = tl.load(row + F_U_SR).to(tl.int32)
        s_k = tl.load(row + F_U_SK).to(tl.int32)
        dst = tl.load(row + F_UP).to(tl.pointer_type(tl.float32))
        n = rows
        r0 = tile * BR
    else:
        src = tl.load(row + F_V).to(tl.pointer_type(tl.float32))
        s_r = tl.load(row + F_V_SR).to(tl.int32)
        s_k = tl.load(row + F_V_SK).to(tl.int32)
        dst = tl.load(row + F_VP).to(tl.pointer_type(tl.float32))
        n = cols
        r0 = (tile - n_u) * BR
    offs_r = r0 + tl.arange(0, BR)
    in_r = offs_r[:, None] < n
    ut = tl.load(row + F_UT).to(tl.pointer_type(tl.float32))
    ut_sr = transposed_stride(rows)
    for c0 in range(0, kp, BC):
        offs_c = c0 + tl.arange(0, BC)
        x = tl.load(src + offs_r[:, None] * s_r + offs_c[None, :] * s_k, mask=in_r & (offs_c[None, :] < k), other=0.0)
        tl.store(dst + offs_r[:, None] * kp + offs_c[None, :], x, mask=in_r)
        if is_u:
            tl.store(ut + offs_c[None, :] * ut_sr + offs_r[:, None], x, mask=in_r)


@triton.jit
def _project_b_kernel(meta, sched, n_programs, X_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    """B[rt, kc] = sum over column chunks of X[rt, c] @ V[c, kc] (V packed, (cols, kp))."""
    row, tile = _block(meta, sched, n_programs)
    x_ptr, x_sr, x_sc, rows, cols, kp = _x_block(row, X_DTYPE, ALIGNED)
    n_kc = tl.cdiv(kp, BK)
    offs_m = (tile // n_kc) * BM + tl.arange(0, BM)
    offs_k = (tile % n_kc) * BK + tl.arange(0, BK)
    v_ptr = tl.multiple_of(tl.load(row + F_VP).to(tl.pointer_type(tl.float32)), 16)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for c0 in range(0, cols, BN):
        offs_n = c0 + tl.arange(0, BN)
        x = tl.load(x_ptr + x_offsets(offs_m, offs_n, x_sr, x_sc, ALIGNED),
                    mask=(offs_m[:, None] < rows) & (offs_n[None, :] < cols), other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs_n[:, None] * kp + offs_k[None, :],
                    mask=(offs_n[:, None] < cols) & (offs_k[None, :] < kp), other=0.0)
        acc = tl.dot(x, v, acc, input_precision=PRECISION)
    b_ptr = tl.load(row + F_B).to(tl.pointer_type(tl.float32))
    tl.store(b_ptr + offs_m[:, None] * kp + offs_k[None, :], acc, mask=(offs_m[:, None] < rows) & (offs_k[None, :] < kp))


@triton.jit
def _project_a_kernel(meta, sched, n_programs, X_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, SCALE_A: tl.constexpr,
                      D_FROM_SIGMA: tl.constexpr):
    """A^T[ct, kc] = sum over row chunks of X[r, ct]^T @ U[r, kc] (U^T packed, (kp, rows_p)),
    times diag(d) when SCALE_A."""
    row, tile = _block(meta, sched, n_programs)
    x_ptr, x_sr, x_sc, rows, cols, kp = _x_block(row, X_DTYPE, ALIGNED)
    n_kc = tl.cdiv(kp, BK)
    offs_n = (tile // n_kc) * BN + tl.arange(0, BN)
    offs_k = (tile % n_kc) * BK + tl.arange(0, BK)
    ut_ptr = tl.multiple_of(tl.load(row + F_UT).to(tl.pointer_type(tl.float32)), 16)
    ut_sr = transposed_stride(rows)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for r0 in range(0, rows, BM):
        offs_m = r0 + tl.arange(0, BM)
        x = tl.load(x_ptr + x_offsets(offs_m, offs_n, x_sr, x_sc, ALIGNED),
                    mask=(offs_m[:, None] < rows) & (offs_n[None, :] < cols), other=0.0).to(tl.float32)
        u = tl.load(ut_ptr + offs_k[None, :] * ut_sr + offs_m[:, None],
                    mask=(offs_m[:, None] < rows) & (offs_k[None, :] < kp), other=0.0)
        acc = tl.dot(tl.trans(x), u, acc, input_precision=PRECISION)
    if SCALE_A:  # diag(d) A: the row scaling (U diag d) A would need in the apply loop
        acc = acc * coefficients(row, offs_k, tl.load(row + F_K).to(tl.int32), D_FROM_SIGMA)[None, :]
    a_ptr = tl.load(row + F_A).to(tl.pointer_type(tl.float32))
    tl.store(a_ptr + offs_n[:, None] * kp + offs_k[None, :], acc, mask=(offs_n[:, None] < cols) & (offs_k[None, :] < kp))


@triton.jit
def _x_block(row, X_DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """X's pointer and strides, the block's rows and columns, and its packed width."""
    x_sr = tl.load(row + F_X_SR).to(tl.int32)
    x_sc = tl.load(row + F_X_SC).to(tl.int32)
    if ALIGNED:  # unit column stride, rows in multiples of 16: 128-bit loads
        x_sr = tl.multiple_of(x_sr, 16)
    rows = tl.load(row + F_ROWS).to(tl.int32)
    cols = tl.load(row + F_COLS).to(tl.int32)
    return pointer(row, F_X, X_DTYPE, ALIGNED), x_sr, x_sc, rows, cols, packed_width(row)


@triton.jit
def x_offsets(offs_m, offs_n, x_sr, x_sc, ALIGNED: tl.constexpr):
    if ALIGNED:
        return offs_m[:, None] * x_sr + offs_n[None, :]
    return offs_m[:, None] * x_sr + offs_n[None, :] * x_sc


def launch_pack(table: torch.Tensor, shapes: list[tuple[int, int, int]], device) -> None:
    """Fill every block's packed U, U^T and V (zero-padded to its kp) from its factors."""
    cfg = m.CONFIG
    sched, total = m.stage_schedules(shapes, device)["pack"]
    if total:
        _pack_kernel[(total,)](table, sched, total, cfg.small_block_m, cfg.small_block_k, num_warps=cfg.small_num_warps)


def launch_project(table: torch.Tensor, shapes: list[tuple[int, int, int]], x_dtype: torch.dtype, device,
                   aligned: bool = False, scale_a: bool = False, d_from_sigma: bool = False) -> None:
    """Pack the factors of every block of ``table`` (rows built by the caller, all X of x_dtype)
    and fill its B and A^T; ``aligned``: every X passes _meta.aligned and has a width that is a
    multiple of 16; ``scale_a``: write (diag(d) A)^T, d from the rows' d or (``d_from_sigma``)
    sigma and eps."""
    cfg = m.CONFIG
    launch_pack(table, shapes, device)
    prec, xt = m.dot_precision(), m.tl_dtype(x_dtype)
    schedules = m.stage_schedules(shapes, device)
    # A^T first: it reads the packed U^T, which B then overwrites (they share a piece)
    sched, total = schedules["project_a"]
    if total:
        _project_a_kernel[(total,)](table, sched, total, xt, aligned, cfg.projt_block_m, cfg.projt_block_n,
                                    cfg.proj_block_k, prec, scale_a, d_from_sigma,
                                    **m.launch_options(cfg.projt_num_warps, cfg.projt_num_stages))
    sched, total = schedules["project_b"]
    if total:
        _project_b_kernel[(total,)](table, sched, total, xt, aligned, cfg.proj_block_m, cfg.proj_block_n,
                                    cfg.proj_block_k, prec, **m.launch_options(cfg.proj_num_warps, cfg.proj_num_stages))


def project_blocks(Xs: list[torch.Tensor], Us: list[torch.Tensor], Vs: list[torch.Tensor]):
    """[(A_i, B_i)] = [(U_i^T X_i, X_i V_i)] for 2-D blocks X_i (views are fine), grouped
    launches per dtype of X. A_i is (k_i, cols_i), B_i (rows_i, k_i), float32 views."""
    if not Xs:
        return []
    for X, U, V in zip(Xs, Us, Vs):
        m.check_factors(X, U, V)
    device = Xs[0].device
    m.check_one_device(Xs, device, "block")
    shapes = [(X.shape[0], X.shape[1], U.shape[1]) for X, U in zip(Xs, Us)]
    ws = m.Workspace(shapes, device)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, X in enumerate(Xs):
        by_dtype.setdefault(X.dtype, []).append(i)
    for dtype, idx in by_dtype.items():
        rows = m.new_table(len(idx))
        for row, i in zip(rows, idx):
            fill_factor_fields(row, Xs[i], Us[i], Vs[i], ws, i)
        with m.on_device(device):
            launch_project(m.to_device_table(rows, torch.int64, device), [shapes[i] for i in idx], dtype, device)
    out = []
    for i, (_, _, k) in enumerate(shapes):
        out.append((ws.view(i, 0)[:, :k].t(), ws.view(i, 1)[:, :k]))
    return out


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
    row[m.F_KP] = m.padded_width(U.shape[1])
    m.put_matrix(row, (m.F_U, m.F_U_SR, m.F_U_SK), U)
    m.put_matrix(row, (m.F_V, m.F_V_SR, m.F_V_SK), V)


def put_workspace_fields(row: list[int], ws: m.Workspace, i: int) -> None:
    for piece, fields in enumerate(m.WORKSPACE_FIELDS):
        for field in fields:
            row[field] = ws.address(i, piece)


def project(X: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A = U^T X (..., k, d2), B = X V (..., d1, k): q3r.reference.project on the device.
    Leading batch dimensions become blocks of one launch."""
    (d1, d2), k = X.shape[-2:], U.shape[-1]
    batch = torch.broadcast_shapes(X.shape[:-2], U.shape[:-2], V.shape[:-2])  # (as the reference's products)
    n = math.prod(batch)
    Xs = X.expand(*batch, d1, d2).reshape(n, d1, d2)
    Us = U.expand(*batch, d1, k).reshape(n, d1, k)
    Vs = V.expand(*batch, d2, k).reshape(n, d2, k)
    out = project_blocks(list(Xs), list(Us), list(Vs))
    A = torch.stack([a for a, _ in out]).reshape(*batch, k, d2) if out else X.new_empty(*batch, k, d2, dtype=torch.float32)
    B = torch.stack([b for _, b in out]).reshape(*batch, d1, k) if out else X.new_empty(*batch, d1, k, dtype=torch.float32)
    return A, B

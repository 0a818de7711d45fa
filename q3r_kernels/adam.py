"""Fused AdamQ3R update: one pass over param, grad, exp_avg, exp_avg_sq per tile.

One step (SPEC section 3, decoupled; the arithmetic of torch.optim.Adam's single-tensor
path, done in float32 whatever the storage dtype):

    r  = R(W_prev) on this tile            (X plus a rank-2k update from A, G, U, V, d,
                                            all formed from W_prev before this pass)
    W  = W_prev * (1 - lr wd) - lr * (2 lambda r)
    m  = lerp(m, g, 1 - beta1);  v = beta2 v + (1 - beta2) g^2
    W  = W - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)

(the reference subtracts the term last; the sum is the same up to rounding, and applying it
first lets the kernel drop the term's registers before it loads the Adam tensors)

Every region (a Q3R slice with its factors, or a plain parameter / an uncovered part of a
sliced one) is a block of the same grouped launch machinery as the apply kernel, so a whole
model costs one launch for its Q3R regions and one for the rest (per dtype combination),
plus the three small preparation launches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import _meta as m
from ._meta import (F_COLS, F_M, F_NUMEL, F_ROWS, F_S, F_X, F_X_SC, F_X_SR, F_Y, F_Y_SC, F_Y_SR, G_BC2_SQRT,
                    G_DECAY, G_EPS, G_LR, G_ONE_MINUS_BETA2, G_SCALE, G_STEP_SIZE, G_W1, G_BETA2, NF, NG)
from .apply import lowrank_tile, prepare, tile_counts
from ._meta import pointer, tile_offsets
from .plan import BlockPlan


@triton.jit
def _adamq3r_kernel(meta, floats, sched, n_programs, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                    S_DTYPE: tl.constexpr, HAS_Q3R: tl.constexpr, ALIGNED: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    blk = tl.load(sched + pid).to(tl.int64)
    tile = tl.load(sched + n_programs + pid)
    row = meta + blk * NF
    hp = floats + blk * NG
    rows = tl.load(row + F_ROWS).to(tl.int32)
    cols = tl.load(row + F_COLS).to(tl.int32)
    numel = tl.load(row + F_NUMEL).to(tl.int32)
    if ALIGNED:  # widths in multiples of 16 keep the mask constant over a vector
        cols = tl.multiple_of(cols, 16)
        numel = tl.multiple_of(numel, 16)
    n_ct = tl.cdiv(cols, BN)
    offs_m = (tile // n_ct) * BM + tl.arange(0, BM)
    offs_n = (tile % n_ct) * BN + tl.arange(0, BN)
    # the linear bound serves flat tensors viewed as (ceil(n / cols), cols)
    mask = (offs_m[:, None] < rows) & (offs_n[None, :] < cols)
    mask = mask & (offs_m[:, None] * cols + offs_n[None, :] < numel)
    offs = tile_offsets(row, F_X_SR, F_X_SC, offs_m, offs_n, ALIGNED)
    p_ptrs = pointer(row, F_X, P_DTYPE, ALIGNED) + offs
    m_ptrs = pointer(row, F_M, S_DTYPE, ALIGNED) + offs
    s_ptrs = pointer(row, F_S, S_DTYPE, ALIGNED) + offs
    g_ptrs = pointer(row, F_Y, G_DTYPE, ALIGNED) + tile_offsets(row, F_Y_SR, F_Y_SC, offs_m, offs_n, ALIGNED)
    # Order matters for registers: the low-rank part of the term is accumulated first, then
    # the weights are loaded and the term applied, and only then the Adam tensors, so that
    # the dot operands and the four full tiles are never live at once.
    if HAS_Q3R:
        lowrank = lowrank_tile(row, offs_m, offs_n, rows, cols, BM, BN, BK, PRECISION)
    p = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_Q3R:
        # the regularizer's term at W_prev, before anything on this tile moves
        term = (p + lowrank) * tl.load(hp + G_SCALE)
        p = p * tl.load(hp + G_DECAY) - tl.load(hp + G_LR) * term
    else:
        p = p * tl.load(hp + G_DECAY)
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    exp_avg = tl.load(m_ptrs, mask=mask, other=0.0).to(tl.float32)
    exp_avg_sq = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32)
    w1 = tl.load(hp + G_W1)
    diff = g - exp_avg
    # torch's lerp switches formula at weight 0.5 for accuracy; follow it for parity
    exp_avg = tl.where(w1 < 0.5, exp_avg + w1 * diff, g - diff * (1.0 - w1))
    exp_avg_sq = exp_avg_sq * tl.load(hp + G_BETA2) + tl.load(hp + G_ONE_MINUS_BETA2) * g * g
    # IEEE-rounded sqrt and divisions, as torch computes them (tl.sqrt is the fast one)
    denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), tl.load(hp + G_BC2_SQRT)) + tl.load(hp + G_EPS)
    p = p + tl.div_rn(-tl.load(hp + G_STEP_SIZE) * exp_avg, denom)
    tl.store(p_ptrs, p.to(P_DTYPE), mask=mask)
    tl.store(m_ptrs, exp_avg.to(S_DTYPE), mask=mask)
    tl.store(s_ptrs, exp_avg_sq.to(S_DTYPE), mask=mask)


@dataclass
class AdamRegion:
    """A 2-D region of one parameter updated by the fused kernel.

    param / grad / exp_avg / exp_avg_sq: 2-D views of the same region (param, exp_avg and
    exp_avg_sq with the same strides; grad may differ). For a flat (contiguous) tensor give
    the 1-D tensors: it is viewed as rows of ``block_n``. factors: (U, V, d) of the slice's
    operator, or None for a region without a Q3R term. hyper: the float table row, see
    :func:`adam_hyper`.
    """

    param: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    hyper: list
    factors: tuple | None = None


def adam_hyper(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: float,
               scale: float = 0.0) -> list:
    """The float table row for a region, with the scalars torch's Adam computes in Python."""
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    row = [0.0] * int(NG)
    row[G_SCALE], row[G_LR], row[G_W1], row[G_BETA2] = scale, lr, 1 - beta1, beta2
    row[G_ONE_MINUS_BETA2], row[G_EPS], row[G_DECAY] = 1 - beta2, eps, 1 - lr * weight_decay
    row[G_STEP_SIZE], row[G_BC2_SQRT] = lr / bias_correction1, bias_correction2**0.5
    return row


def _region_row(reg: AdamRegion, row: list[int]) -> None:
    p = reg.param
    if p.dim() == 1:  # a flat contiguous tensor as (ceil(n / w), w) rows
        w = m.CONFIG.block_n
        row[F_X], row[F_X_SR], row[F_X_SC] = p.data_ptr(), w, 1
        row[F_Y], row[F_Y_SR], row[F_Y_SC] = reg.grad.data_ptr(), w, 1
        row[F_ROWS], row[F_COLS], row[F_NUMEL] = m.cdiv(p.numel(), w), w, p.numel()
    else:
        m.put_matrix(row, (F_X, F_X_SR, F_X_SC), p)
        m.put_matrix(row, (F_Y, F_Y_SR, F_Y_SC), reg.grad)
        row[F_ROWS], row[F_COLS], row[F_NUMEL] = p.shape[0], p.shape[1], p.numel()
    row[F_M], row[F_S] = reg.exp_avg.data_ptr(), reg.exp_avg_sq.data_ptr()


def check_region(reg: AdamRegion) -> bool:
    """Whether the fused kernel can take this region as it is laid out."""
    p = reg.param
    tensors = (p, reg.grad, reg.exp_avg, reg.exp_avg_sq)
    if p.dtype not in m.TORCH_TO_TL or reg.grad.dtype not in m.TORCH_TO_TL:
        return False
    if reg.exp_avg.dtype not in m.TORCH_TO_TL or reg.exp_avg_sq.dtype != reg.exp_avg.dtype:
        return False
    if any(t.shape != p.shape or t.device != p.device for t in tensors):
        return False
    if p.dim() == 1:  # int32 indexing inside a block
        return p.numel() < 2**31 and all(t.is_contiguous() for t in tensors)
    # (the kernel's linear bound holds the element count in int32 too: 2**31 itself wrapped to
    # -2**31 there and masked every element, so the region was silently left as it was)
    return (p.dim() == 2 and reg.exp_avg.stride() == p.stride() and reg.exp_avg_sq.stride() == p.stride()
            and p.numel() < 2**31 and all(m.fits_int32(t) for t in tensors))


class AdamQ3RPlan(BlockPlan):
    """Device tables, tile schedules and workspace for a fixed set of regions.

    Building them costs Python time per region; a training loop whose tensors stay put (the
    usual case: parameters and states keep their storage) builds a plan once and then only
    calls :meth:`run` with the per-step scalars, and :meth:`update_factors` (region i is
    block i) after a refresh, which brings new factor tensors, often of a new width.
    """

    def __init__(self, regions: list[AdamRegion]):
        super().__init__(regions[0].param.device if regions else None)
        m.check_one_device([reg.param for reg in regions], self.device, "region")
        cfg = m.CONFIG
        self.config = (cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages, m.dot_precision())
        self.plain_config = (cfg.plain_block_m, cfg.block_n, cfg.plain_num_warps, cfg.plain_num_stages)
        by_key: dict[tuple, list[int]] = {}
        for i, reg in enumerate(regions):
            by_key.setdefault((reg.param.dtype, reg.grad.dtype, reg.exp_avg.dtype, len(reg.factors or ()),
                               _aligned(reg)), []).append(i)
        self.groups = [self._group(key, idx, regions) for key, idx in by_key.items()]
        self._index(len(regions))

    def _group(self, key, idx, regions) -> dict:
        p_dtype, g_dtype, s_dtype, n_factors, aligned = key
        table = m.new_table(len(idx))
        g = dict(idx=idx, dtypes=(p_dtype, g_dtype, s_dtype), n_factors=n_factors, aligned=aligned,
                 shapes=[], workspace=None, sent=None)
        if n_factors:  # Q3R slices: 2-D, with factors checked against (rows, cols)
            self._q3r_group(g, table, [tuple(regions[i].param.shape) for i in idx], [regions[i].factors for i in idx])
        for row, i in zip(table, idx):
            _region_row(regions[i], row)
        counts = tile_counts(g["shapes"]) if n_factors else [
            m.cdiv(r, self.plain_config[0]) * m.cdiv(c, self.plain_config[1])
            for r, c in (_rows_cols(regions[i].param) for i in idx)
        ]
        g["sched"], g["total"] = m.tile_schedule(counts, self.device)  # depends on rows and cols only, not on k
        g["host"] = torch.tensor(table, dtype=torch.int64)
        return g

    def run(self, hypers: list[list], grad_ptrs: list[int] | None = None) -> None:
        """One fused step; hypers[i] is region i's float row (see :func:`adam_hyper`).

        grad_ptrs[i], when given, is the address of region i's gradient now: gradients are
        often reallocated every step (zero_grad(set_to_none=True)) while everything else
        stays put, so only that column of the table is set again (and sent if it changed).
        """
        self.check_settings()
        with m.on_device(self.device):
            self._run(hypers, grad_ptrs)

    def _run(self, hypers: list[list], grad_ptrs: list[int] | None) -> None:
        block_m, block_n, block_k, num_warps, num_stages, precision = self.config
        plain_m, plain_n, plain_warps, plain_stages = self.plain_config
        for g in self.groups:
            columns = {} if grad_ptrs is None else {int(m.F_Y): [grad_ptrs[i] for i in g["idx"]]}
            table, workspace = self.run_table(g, columns)
            floats = m.to_device_table([hypers[i] for i in g["idx"]], torch.float32, self.device)
            has_q3r = g["n_factors"] > 0
            if has_q3r:
                prepare(table, g["shapes"], g["dtypes"][0], g["n_factors"] == 4, self.device, g["aligned"])
                tiles, options = (block_m, block_n), m.launch_options(num_warps, num_stages)
            else:  # plain Adam regions: a memory-bound pass, smaller tiles
                tiles, options = (plain_m, plain_n), m.launch_options(plain_warps, plain_stages)
            if g["total"]:
                _adamq3r_kernel[(g["total"],)](
                    table, floats, g["sched"], g["total"], *(m.tl_dtype(t) for t in g["dtypes"]),
                    has_q3r, g["aligned"], *tiles, block_k, precision, **options,
                )
            del workspace  # the launches are queued; the caching allocator keeps the order safe


def adamq3r_update_(regions: list[AdamRegion]) -> None:
    """Apply the fused update to every region: per (dtypes) group, the preparation launches
    for its Q3R regions, one launch for them and one for the regions without a term."""
    if regions:
        AdamQ3RPlan(regions).run([reg.hyper for reg in regions])


def _aligned(reg: AdamRegion) -> bool:
    """Whether the region can take the ALIGNED kernels (128-bit accesses; see _meta.aligned)."""
    tensors = (reg.param, reg.grad, reg.exp_avg, reg.exp_avg_sq)
    width_ok = reg.param.numel() % 16 == 0 if reg.param.dim() == 1 else reg.param.shape[1] % 16 == 0
    return width_ok and m.aligned(*tensors)


def _rows_cols(p: torch.Tensor) -> tuple[int, int]:
    if p.dim() == 1:
        return m.cdiv(p.numel(), m.CONFIG.block_n), m.CONFIG.block_n
    return p.shape[0], p.shape[1]

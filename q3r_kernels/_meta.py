"""Host-side bookkeeping shared by the Q3R kernels: block tables, workspace, tile settings.

Every kernel here is *grouped*: one launch serves many "blocks", a block being one 2-D
target (a whole weight or a row / column slice of a fused one, given as a strided view)
with its own factors U (rows, k), V (cols, k) and its own k. What a program needs about
its block is read from a small int64 table of raw addresses, strides and sizes, so blocks
of different shapes, different k and different tensors share one launch (the pattern of
Triton's grouped-GEMM tutorial). Programs are mapped to (block, tile) through a flat
schedule, so a launch has exactly as many programs as there are tiles.

Every step first packs a block's factors into its workspace, zero-padded to a width kp (a
multiple of 32): U as (rows, kp) and as its transpose (kp, rows), V as (cols, kp). Every
operand of every dot is then 16-byte aligned and K-major (contiguous along the reduction),
which is what Hopper's tf32 tensor-core instructions read straight from shared memory; with
factors of width 153 read in place (row stride 153) the same GEMMs ran 2-4x slower on an H100
(micro-benchmark in benchmarks/results/kernel_layouts_h100.md). The zero columns add nothing.

This module imports torch and triton only, never q3r.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Fields of a block's row in the int64 table (kernels read them with tl.load(meta + i)).
# They are tl.constexpr because a @triton.jit function may only read constexpr globals;
# constexpr also indexes Python lists on the host side.
_C = tl.constexpr
F_X, F_X_SR, F_X_SC, F_ROWS, F_COLS, F_K = _C(0), _C(1), _C(2), _C(3), _C(4), _C(5)
F_U, F_U_SR, F_U_SK, F_V, F_V_SR, F_V_SK = _C(6), _C(7), _C(8), _C(9), _C(10), _C(11)
# workspace, all float32 with padded width kp (see Workspace): A^T or (diag(d) A)^T (cols, kp),
# B then G (rows, kp), C^T (kp, kp), d (kp), packed U (rows, kp), U^T (kp, rows_p; in B's piece), V (cols, kp)
F_A, F_B, F_C, F_D = _C(12), _C(13), _C(14), _C(15)
F_DSRC, F_EPS = _C(16), _C(17)  # d itself, or sigma and eps (then d is derived on the device)
F_Y, F_Y_SR, F_Y_SC = _C(18), _C(19), _C(20)  # apply: output; Adam: gradient
F_M, F_S = _C(21), _C(22)  # Adam: exp_avg, exp_avg_sq (same strides as X)
F_NUMEL = _C(23)  # linear bound, for flat tensors viewed as (ceil(n / w), w)
F_UP, F_UT, F_VP, F_KP = _C(24), _C(25), _C(26), _C(27)
NF = _C(28)

# Fields of a block's row in the float32 table (apply: only G_SCALE = alpha; Adam: scale =
# 2 lambda, w1 = 1 - beta1 as lerp's weight, decay = 1 - lr * weight_decay).
G_SCALE, G_LR, G_W1, G_BETA2, G_ONE_MINUS_BETA2, G_EPS, G_DECAY, G_STEP_SIZE, G_BC2_SQRT = (_C(i) for i in range(9))
NG = _C(9)

@triton.jit
def pointer(row, field, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """A typed pointer from a raw address in the table. ALIGNED promises 16-byte alignment
    (host-checked); the hint must sit on the pointer itself for Triton to use 128-bit
    accesses (on the integer it is lost in the conversion)."""
    ptr = tl.load(row + field).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def coefficients(row, offs, k, D_FROM_SIGMA: tl.constexpr):
    """d[offs] of a block (0 beyond k): the table's d itself, or eps / sigma - 1 above eps and
    0 at or below it (q3r.reference.reweighting_coefficients) from its sigma and eps."""
    src = tl.load(row + F_DSRC).to(tl.pointer_type(tl.float32))
    s = tl.load(src + offs, mask=offs < k, other=0.0)
    if D_FROM_SIGMA:
        eps = tl.load(tl.load(row + F_EPS).to(tl.pointer_type(tl.float32)))
        active = s > eps
        s = tl.where(active, eps / tl.where(active, s, 1.0) - 1.0, 0.0)
    return s


@triton.jit
def packed_width(row):
    """kp of a block, hinted as the multiple of 32 it is (aligned rows of every packed piece)."""
    return tl.multiple_of(tl.load(row + F_KP).to(tl.int32), 32)


@triton.jit
def transposed_stride(rows):
    """Row stride of the packed U^T (kp, rows_p): rows rounded up to a multiple of 4."""
    return tl.multiple_of((rows + 3) // 4 * 4, 4)


@triton.jit
def tile_offsets(row, f_sr, f_sc, offs_m, offs_n, ALIGNED: tl.constexpr):
    """int32 element offsets of a (BM, BN) tile within its block. ALIGNED promises a unit
    column stride and a row stride that is a multiple of 16 (host-checked)."""
    sr = tl.load(row + f_sr).to(tl.int32)
    if ALIGNED:
        return offs_m[:, None] * tl.multiple_of(sr, 16) + offs_n[None, :]
    return offs_m[:, None] * sr + offs_n[None, :] * tl.load(row + f_sc).to(tl.int32)


def aligned(*tensors: torch.Tensor) -> bool:
    """Whether 2-D tensors (or 1-D contiguous ones) meet what ALIGNED kernels assume."""
    for t in tensors:
        if t.data_ptr() % 16:
            return False
        if t.dim() == 2 and (t.stride(1) != 1 or t.stride(0) % 16):
            return False
        if t.dim() == 1 and t.stride(0) != 1:
            return False
    return True


TORCH_TO_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@dataclass
class TileConfig:
    """Tile sizes and dot precision. Tests shrink the tiles so that small awkward shapes
    span several tiles with ragged edges; all block sizes must be powers of two >= 16."""

    # Defaults: the fastest of the settings timed on an H100 for ViT-B/16's targets
    # (benchmarks/results/kernel_layouts_h100.md: packed factors, tf32x3 and tf32).
    # apply / fused Adam: a (block_m, block_n) tile of X, the factor width in chunks of block_k.
    # 64 x 64 with 4 warps and 3 stages (was 128 x 64, 8 warps, 4 stages): 0.15 ms less
    # device time per fused step on ViT-B/16 and GPT-2-small, and the apply no slower
    # (benchmarks/results/probes/tile_probe2_*_h100_*.txt).
    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 3  # software-pipelining depth (0: Triton's default for the device)
    # the fused kernel on regions without a Q3R term (plain Adam, memory-bound): rows per tile
    plain_block_m: int = 64
    plain_num_warps: int = 8
    plain_num_stages: int = 0
    # B = X V: (proj_block_m, proj_block_k) tiles of B, X's columns in chunks of proj_block_n
    proj_block_m: int = 128
    proj_block_n: int = 64
    proj_block_k: int = 64
    proj_num_warps: int = 8
    proj_num_stages: int = 3
    # A^T = X^T U: (projt_block_n, proj_block_k) tiles, X's rows in chunks of projt_block_m
    projt_block_m: int = 32
    projt_block_n: int = 128
    projt_num_warps: int = 4
    projt_num_stages: int = 4
    # the small stages (packing the factors, C = U^T B, G): (small_block_m, small_block_k) tiles
    small_block_m: int = 64
    small_block_k: int = 32
    small_num_warps: int = 4
    # fp32 dots: "tf32x3" is within a few ulp of fp32 at ~1/3 of tf32 speed; "tf32" is
    # fastest; "ieee" is exact fp32 FMA (and what the CPU interpreter does anyway). "auto"
    # follows torch's setting for its own fp32 CUDA matmuls (torch_allows_tf32): IEEE
    # (torch's default) -> "tf32x3"; TF32 allowed, by torch.set_float32_matmul_precision("high"
    # or "medium") or torch.backends.cuda.matmul.fp32_precision = "tf32" -> "tf32".
    precision: str = "auto"


CONFIG = TileConfig()


def launch_options(num_warps: int, num_stages: int) -> dict:
    """Keyword arguments of a kernel launch (num_stages only when set: 0 keeps Triton's)."""
    return dict(num_warps=num_warps, **({"num_stages": num_stages} if num_stages else {}))


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


PRECISIONS = ("auto", "tf32x3", "tf32", "ieee")


def torch_allows_tf32() -> bool:
    """Whether torch's own fp32 CUDA matmuls may use TF32 now. Read through the per-backend
    setting where torch has one (2.9 and later): there torch.get_float32_matmul_precision()
    raises once a user has set torch.backends.cuda.matmul.fp32_precision, the API torch now
    recommends; that setting also reflects the legacy ones (set_float32_matmul_precision,
    torch.backends.cuda.matmul.allow_tf32) and inheritance from torch.backends.fp32_precision."""
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)
    if getter is None:
        return torch.get_float32_matmul_precision() != "highest"
    return getter("cuda", "matmul") not in ("ieee", "none")


def gpu_dot_precision() -> str:
    """The input_precision of fp32 dots on the GPU, resolved now (see TileConfig.precision)."""
    if CONFIG.precision not in PRECISIONS:
        raise ValueError(f"q3r_kernels.CONFIG.precision must be one of {PRECISIONS}, got {CONFIG.precision!r}")
    if CONFIG.precision == "auto":
        return "tf32" if torch_allows_tf32() else "tf32x3"
    return CONFIG.precision


def dot_precision() -> str:
    """What the kernels pass as input_precision now: the interpreter computes fp32 exactly."""
    precision = gpu_dot_precision()  # validates CONFIG.precision under the interpreter too
    return "ieee" if interpreting() else precision


def settings() -> tuple:
    """Every tile setting and the dot precision in force now: what a plan was built for."""
    return tuple(vars(CONFIG).values()) + (dot_precision(),)


def tl_dtype(dtype: torch.dtype):
    if dtype not in TORCH_TO_TL:
        raise TypeError(f"q3r_kernels: unsupported dtype {dtype}; expected float32, bfloat16 or float16")
    return TORCH_TO_TL[dtype]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


K_ALIGN = 32  # factor widths are padded to a multiple of this (and of every k tile)


def padded_width(k: int) -> int:
    """kp: the packed width of factors of width k (0 stays 0: R = I, nothing to pack)."""
    cfg = CONFIG
    step = max(K_ALIGN, cfg.block_k, cfg.small_block_k)
    return cdiv(k, step) * step


def workspace_shapes(rows: int, cols: int, k: int) -> list[tuple[int, ...]]:
    """Shapes of a block's pieces: A^T (cols, kp), B (rows, kp), C^T (kp, kp), d (kp), packed U
    (rows, kp), packed V (cols, kp). The packed U^T (kp, rows_p) lives in B's piece: it is read
    only by the A^T projection, which runs before B is written (see projection.launch_project)."""
    kp = padded_width(k)
    return [(cols, kp), (rows, kp), (kp, kp), (kp,), (rows, kp), (cols, kp)]


def _piece_elements(rows: int, cols: int, k: int) -> list[int]:
    counts = [math.prod(shape) for shape in workspace_shapes(rows, cols, k)]
    counts[1] = max(counts[1], padded_width(k) * cdiv(rows, 4) * 4)  # B, or U^T before it
    return counts


def workspace_fits_int32(rows: int, cols: int, k: int) -> bool:
    """Whether the kernels' int32 offsets reach every element of each workspace piece of a
    (rows, cols) block with factors of width k. X itself may fit while a piece does not: its
    width kp (k padded) can exceed cols or rows where the factors are near full rank. (The
    largest of _piece_elements, without building the list: this runs per slice per step.)"""
    kp = padded_width(k)
    return max(rows + (-rows) % 4, cols, kp) * kp < 2**31


# table fields that hold each piece's address (U^T shares B's piece)
WORKSPACE_FIELDS = ((F_A,), (F_B, F_UT), (F_C,), (F_D,), (F_UP,), (F_VP,))
WORKSPACE_COLUMNS = [int(f) for fields in WORKSPACE_FIELDS for f in fields]


class Workspace:
    """Every block's pieces (see workspace_shapes) carved out of one float32 buffer.

    With ``allocate=False`` only the layout is made: addresses are then offsets from 0, and
    the owner adds the address of a buffer of ``total`` elements it allocates when it runs
    (see plan.BlockPlan: a workspace that lives only while its launches are queued)."""

    def __init__(self, shapes: list[tuple[int, int, int]], device, allocate: bool = True):
        offsets, total = [], 0
        for rows, cols, k in shapes:
            starts = []
            for n in _piece_elements(rows, cols, k):
                starts.append(total)
                total += n + (-n) % K_ALIGN  # every piece starts 128-byte aligned
            offsets.append(starts)
        self.total = max(total, 1)
        self.buffer = torch.empty(self.total, dtype=torch.float32, device=device) if allocate else None
        self.base = self.buffer.data_ptr() if allocate else 0
        self.offsets = offsets
        self.shapes = shapes

    def address(self, block: int, piece: int) -> int:
        return self.base + 4 * self.offsets[block][piece]

    def view(self, block: int, piece: int) -> torch.Tensor:
        shape = workspace_shapes(*self.shapes[block])[piece]
        start = self.offsets[block][piece]
        return self.buffer[start : start + math.prod(shape)].view(shape)


def tile_schedule(counts: list[int], device) -> tuple[torch.Tensor, int]:
    """Flat program -> (block, tile) map: int32 (2, total) = [block ids; tile ids].
    It depends on shapes and tiles only, so it is built once per layout and kept."""
    return _tile_schedule(tuple(counts), torch.device(device))


# (sized with q3r.ops._MAX_PLANS, 256 plans: a plan's main launch and its five preparation
# stages each have one; a staggered step's 2 T + 1 plans must not push each other out)
@functools.lru_cache(maxsize=1536)
def _tile_schedule(counts: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, int]:
    blocks = [b for b, n in enumerate(counts) for _ in range(n)]
    tiles = [t for n in counts for t in range(n)]
    return torch.tensor([blocks, tiles], dtype=torch.int32).to(device), len(tiles)


def stage_schedules(shapes, device) -> dict[str, tuple[torch.Tensor, int]]:
    """The tile schedules of the preparation stages (pack, project_a, project_b, gram, left)
    for blocks of these (rows, cols, k), cached per shapes and tile settings: a plan runs
    them every step, and they change only when a refresh changes a width."""
    cfg = CONFIG
    tiles = (cfg.small_block_m, cfg.small_block_k, cfg.projt_block_n, cfg.proj_block_m, cfg.proj_block_k, cfg.block_k)
    return _stage_schedules(tuple(shapes), torch.device(device), tiles)


@functools.lru_cache(maxsize=256)
def _stage_schedules(shapes, device, tiles) -> dict[str, tuple[torch.Tensor, int]]:
    small_m, small_k, projt_n, proj_m, proj_k, _ = tiles  # block_k: padded_width reads it
    kps = [padded_width(k) for _, _, k in shapes]
    counts = dict(
        pack=[(cdiv(r, small_m) + cdiv(c, small_m)) if k else 0 for r, c, k in shapes],
        project_a=[cdiv(c, projt_n) * cdiv(kp, proj_k) for (_, c, _), kp in zip(shapes, kps)],
        project_b=[cdiv(r, proj_m) * cdiv(kp, proj_k) for (r, _, _), kp in zip(shapes, kps)],
        gram=[(kp // small_k) ** 2 for kp in kps],
        left=[cdiv(r, small_m) * (kp // small_k) for (r, _, _), kp in zip(shapes, kps)],
    )
    return {name: tile_schedule(c, device) for name, c in counts.items()}


def new_table(n: int) -> list[list[int]]:
    return [[0] * int(NF) for _ in range(n)]


def fits_int32(t: torch.Tensor) -> bool:
    """Whether the kernels' int32 offsets within a block reach every element of each matrix of
    t (its last two dimensions): the offset of its last element is below 2**31. (Written out,
    not summed over a generator: add_reweighting_ asks it twice per block per step, 0.4 us a
    call here against 1.0 us.)"""
    shape, stride = t.shape, t.stride()
    if len(shape) < 2:
        return not shape or (shape[0] - 1) * abs(stride[0]) < 2**31
    return (shape[-2] - 1) * abs(stride[-2]) + (shape[-1] - 1) * abs(stride[-1]) < 2**31


def put_matrix(row: list[int], fields: tuple[int, int, int], t: torch.Tensor) -> None:
    """Address and the two strides of a 2-D tensor (a view is fine: no copy is made)."""
    f_ptr, f_s0, f_s1 = fields
    if not fits_int32(t):
        raise ValueError(f"q3r_kernels: a block of shape {tuple(t.shape)} spans 2**31 elements or more; "
                         "the kernels index within a block in int32")
    row[f_ptr], row[f_s0], row[f_s1] = t.data_ptr(), t.stride(0), t.stride(1)


def on_device(device):
    """The context every launch of a plan runs in: Triton launches on torch's current CUDA
    device (and its current stream), whatever device the tables' addresses point into, so a
    model on cuda:1 while cuda:0 is current (no torch.cuda.set_device in a DDP script; a
    model split over GPUs) would have its kernels run on the wrong GPU. A no-op off CUDA."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def check_one_device(tensors, device, what: str) -> None:
    """A plan's tables are sent to, and its kernels launched on, one device: refuse others."""
    for i, t in enumerate(tensors):
        if t.device != device:
            raise ValueError(f"q3r_kernels: {what} {i} is on {t.device}, the plan's first on {device}: "
                             "a plan serves one device (q3r.ops groups blocks by device)")


def to_device_table(rows, dtype: torch.dtype, device) -> torch.Tensor:
    table = rows if isinstance(rows, torch.Tensor) else torch.tensor(rows, dtype=dtype)
    if torch.device(device).type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    return table


def check_factors(X: torch.Tensor, U: torch.Tensor, V: torch.Tensor, d: torch.Tensor | None = None) -> None:
    if X.dim() != 2:
        raise ValueError(f"q3r_kernels: a block must be 2-D, got X of shape {tuple(X.shape)}")
    check_block_factors(tuple(X.shape), X.device, U, V, d)


def check_block_factors(shape: tuple[int, int], device, U: torch.Tensor, V: torch.Tensor,
                        d: torch.Tensor | None = None) -> None:
    """check_factors for a block known by its shape and device only (a cached plan keeps no
    tensors of its blocks, yet re-checks the new factors a refresh brings)."""
    rows, cols = shape
    k = U.shape[-1]
    if tuple(U.shape) != (rows, k) or tuple(V.shape) != (cols, k):
        raise ValueError(
            f"q3r_kernels: factors U {tuple(U.shape)}, V {tuple(V.shape)} do not fit X {(rows, cols)}"
        )
    if U.dtype != torch.float32 or V.dtype != torch.float32:
        raise TypeError(f"q3r_kernels: factors must be float32, got U {U.dtype}, V {V.dtype}")
    if d is not None and (tuple(d.shape) != (k,) or d.dtype != torch.float32 or (k > 1 and d.stride(0) != 1)):
        raise ValueError(f"q3r_kernels: d (or sigma) must be contiguous float32 of shape ({k},), got {d.dtype} {tuple(d.shape)}")
    for t in (U, V) + ((d,) if d is not None else ()):
        if t.device != device:
            raise ValueError(f"q3r_kernels: all tensors must be on {device}, got one on {t.device}")


__all__ = ["CONFIG", "TileConfig", "Workspace", "tile_schedule", "triton"]

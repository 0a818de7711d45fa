"""Helpers for the kernel tests: devices, sizes, tile settings and the error rule.

On CPU (Triton's interpreter) shapes are small and awkward and tiles are shrunk to 16 so
that every shape spans several tiles with ragged edges; on a GPU the same tests also run
at the sizes of ViT-B/16 targets with the default tiles.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

try:
    import q3r_kernels as K
except Exception:  # no triton: every kernel test is skipped
    K = None

needs_kernels = pytest.mark.skipif(K is None, reason="triton / q3r_kernels not importable")
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]


@contextlib.contextmanager
def tiles(size=16, num_warps=4):
    """Every tile dimension of every kernel set to ``size``."""
    saved = dict(vars(K.CONFIG))
    for name in ("block_m", "block_n", "block_k", "proj_block_m", "proj_block_n", "proj_block_k", "projt_block_m",
                 "projt_block_n", "small_block_m", "small_block_k", "plain_block_m"):
        setattr(K.CONFIG, name, size)
    K.CONFIG.num_warps = K.CONFIG.proj_num_warps = K.CONFIG.projt_num_warps = K.CONFIG.small_num_warps = K.CONFIG.plain_num_warps = num_warps
    try:
        yield
    finally:
        vars(K.CONFIG).update(saved)


def tile_settings(small: bool):
    """Small shapes: 16-wide tiles (many tiles, ragged edges). Real sizes: the defaults."""
    return tiles() if small else contextlib.nullcontext()


def factors(rows: int, cols: int, k: int, gen: torch.Generator, device=DEVICE):
    """Orthonormal U (rows, k), V (cols, k) and d in (-1, 0) with some inert (0) entries."""
    U = torch.linalg.qr(torch.randn(rows, max(k, 1), generator=gen, dtype=torch.float64))[0][:, :k]
    V = torch.linalg.qr(torch.randn(cols, max(k, 1), generator=gen, dtype=torch.float64))[0][:, :k]
    d = -torch.rand(k, generator=gen, dtype=torch.float64)
    if k > 2:
        d[-2:] = 0.0  # factor width beyond the envelope rank: inert triplets
    return tuple(t.to(torch.float32).to(device) for t in (U, V, d))


def rel_err(x: torch.Tensor, exact: torch.Tensor) -> float:
    exact = exact.to(torch.float64)
    return float((x.to(torch.float64) - exact).abs().max() / exact.abs().max().clamp_min(1e-30))


def assert_rule(fast: torch.Tensor, ref_path: torch.Tensor, exact: torch.Tensor, floor: float = 2e-6) -> None:
    """STYLE.md's rule: the kernel's error against an fp64 reference is at most twice that of
    the reference path run in the same dtype (plus a floor at fp32 rounding level)."""
    e_fast, e_ref = rel_err(fast, exact), rel_err(ref_path, exact)
    assert e_fast <= 2 * e_ref + floor, f"kernel error {e_fast:.3e} vs reference path {e_ref:.3e}"

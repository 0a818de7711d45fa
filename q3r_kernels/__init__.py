"""Triton kernels for the per-step work of Q3R (imports torch and triton only, never q3r).

One op, one name, the signature of its q3r.reference counterpart:

    project(X, U, V) -> (A, B)                 A = U^T X, B = X V
    apply_reweighting(X, U, V, d) -> R(X)      float32

and the grouped forms the library uses (many blocks -- weights or row / column slices of
fused weights, given as strided views -- per launch):

    project_blocks, add_reweighting_ (out += alpha R(X), in place), adamq3r_update_
    (the fused AdamQ3R step), and the cached plans behind the last two (ReweightPlan,
    AdamQ3RPlan) that a training loop keeps across steps.

Tile sizes and dot precision: q3r_kernels.CONFIG (fp32 dots follow torch's fp32 matmul settings, torch_allows_tf32(), unless CONFIG.precision names one).
"""

from ._meta import CONFIG, TileConfig, dot_precision, gpu_dot_precision, torch_allows_tf32
from .adam import AdamQ3RPlan, AdamRegion, adam_hyper, adamq3r_update_, check_region
from .apply import ReweightPlan, add_reweighting_, apply_reweighting
from .projection import project, project_blocks

__all__ = [
    "CONFIG",
    "TileConfig",
    "dot_precision",
    "gpu_dot_precision",
    "torch_allows_tf32",
    "AdamQ3RPlan",
    "AdamRegion",
    "adam_hyper",
    "adamq3r_update_",
    "check_region",
    "ReweightPlan",
    "add_reweighting_",
    "apply_reweighting",
    "project",
    "project_blocks",
]

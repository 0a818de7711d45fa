"""Q3R under torch.distributed: DDP (replicated weights) and FSDP2 (row-sharded DTensors).

* Replicated (DDP, or any run in which every rank holds the same weights): a refresh divides
  the targets among the ranks, balanced by decomposition cost, and exchanges the new factors
  in two all_gathers (after one of two numbers that checks that the ranks refresh the same
  targets); between refreshes nothing is communicated
  (:func:`refresh_slices_`, :mod:`.replicated`).
* Sharded (FSDP2 ``fully_shard``: DTensor parameters with Shard(0); HSDP's 2-D mesh adds a
  Replicate() dim, across which nothing is exchanged): the per-step term needs one
  all-reduce of the small U^T W matrices for all targets; the refresh is a randomized range finder
  on the local rows with all-reduces of k x k and k x d2 matrices (:mod:`.sharded`).

AdamQ3R and Q3R dispatch here by themselves; users only set up DDP / FSDP2 as usual.
:mod:`.comm` counts every collective q3r issues.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .._precision import refresh_precision
from . import comm
from .replicated import assign_by_cost, refresh_cost, refresh_slices_replicated_, same_on_every_rank
from .placement import check_sharding, diagnostic_slices, factor_rows, is_sharded, new_target_states
from .sharded import ShardedTerms
from .sharded_refresh import SKETCH, SketchOptions, refresh_sharded_
from .sharded_step import sharded_add_grad_, sharded_adamq3r_step_, sharded_penalty

__all__ = [
    "FactorLoadPlanner",
    "SKETCH",
    "ShardedTerms",
    "SketchOptions",
    "assign_by_cost",
    "check_sharding",
    "comm",
    "configure",
    "diagnostic_slices",
    "factor_rows",
    "is_replicated_distributed",
    "is_sharded",
    "new_target_states",
    "refresh_cost",
    "refresh_sharded_",
    "refresh_slices_",
    "refresh_slices_replicated_",
    "same_targets_on_every_rank",
    "sharded_add_grad_",
    "sharded_adamq3r_step_",
    "sharded_penalty",
]

_REPLICATED = {"enabled": True, "group": None}


def configure(*, replicated: bool | None = None, group=None, oversample: int | None = None,
              power_iters: int | None = None, cold_power_iters: int | None = None,
              max_widenings: int | None = None, max_envelope_growth: int | None = None,
              max_lag: float | None = None, flat_tolerance: float | None = None, max_residual: float | None = None,
              seed: int | None = None) -> None:
    """Process-wide settings.

    replicated: divide refreshes of plain (non-DTensor) targets across ranks when
    torch.distributed is initialized (default True; set False when ranks train different
    weights, e.g. independent runs that share a process group). group: the process group of
    the replicas (default: the world). oversample / power_iters / cold_power_iters /
    max_widenings / max_envelope_growth / max_lag / flat_tolerance (negative: never) /
    max_residual (1 or more: never) / seed:
    the randomized refresh of sharded targets (see :class:`SketchOptions`).
    """
    options = {"oversample": oversample, "power_iters": power_iters, "cold_power_iters": cold_power_iters,
               "max_widenings": max_widenings, "max_envelope_growth": max_envelope_growth, "seed": seed}
    # every value checked before any is set: a refused call changes nothing
    for name, value in options.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"q3r.distributed.configure: {name} must be an int >= 0, got {value!r}")
    if max_lag is not None and (isinstance(max_lag, bool) or not isinstance(max_lag, (int, float))
                                or not 0 <= max_lag < math.inf):
        raise ValueError(f"q3r.distributed.configure: max_lag must be a finite number >= 0, got {max_lag!r}")
    options["max_lag"] = None if max_lag is None else float(max_lag)
    if max_residual is not None and (isinstance(max_residual, bool) or not isinstance(max_residual, (int, float))
                                     or not 0 <= max_residual < math.inf):
        raise ValueError(f"q3r.distributed.configure: max_residual must be a finite number >= 0, got {max_residual!r}")
    options["max_residual"] = None if max_residual is None else float(max_residual)
    if flat_tolerance is not None and (isinstance(flat_tolerance, bool) or not isinstance(flat_tolerance, (int, float))
                                       or not -math.inf < flat_tolerance < 1):
        raise ValueError(f"q3r.distributed.configure: flat_tolerance must be a finite number < 1, got {flat_tolerance!r}")
    options["flat_tolerance"] = None if flat_tolerance is None else float(flat_tolerance)
    if replicated is not None:
        _REPLICATED["enabled"] = bool(replicated)
    if group is not None:
        _REPLICATED["group"] = group
    for name, value in options.items():
        if value is not None:
            setattr(SKETCH, name, value)


def __getattr__(name: str):
    # imported on first use: torch.distributed.checkpoint is not needed to train
    if name == "FactorLoadPlanner":
        from .checkpoint import FactorLoadPlanner

        return FactorLoadPlanner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_replicated_distributed() -> bool:
    """True when refreshes of plain targets are divided across ranks (world size > 1)."""
    return _REPLICATED["enabled"] and comm.world_size(_REPLICATED["group"]) > 1


def same_targets_on_every_rank(targets: list[tuple[str, tuple[int, ...]]]) -> bool:
    """Whether every rank of the replicas' group holds these same (name, shape) targets: one
    all_gather of their count and a checksum. Every rank of the group must call it at the same
    point (an optimizer's first step). False under ZeroRedundancyOptimizer, whose ranks each
    hold a share of the targets (some none at all), and for pipeline stages."""
    group = _REPLICATED["group"]
    on_cuda = dist.get_backend(group) == "nccl"  # (NCCL moves CUDA tensors only)
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    return same_on_every_rank(targets, device, group)


def refresh_slices_(weights, states, configs, method: str = "exact", warned: set | None = None,
                    before_wait=None, options=None, replicated: bool | None = None) -> list[bool]:
    """:func:`q3r.refresh.refresh_slices_`, divided across ranks when running data-parallel
    (``before_wait`` then runs after the refresh: its exchanges may still raise).
    ``replicated=False``: refresh on this rank alone even so (an optimizer whose ranks hold
    different targets, see same_targets_on_every_rank); None: the process setting (configure)."""
    if is_replicated_distributed() and replicated is not False:
        with refresh_precision():  # (the local refresh inside pins again: a no-op)
            done = refresh_slices_replicated_(weights, states, configs, method, warned, _REPLICATED["group"], options)
        if before_wait is not None:
            before_wait()
        return done
    from ..refresh import refresh_slices_ as local

    return local(weights, states, configs, method=method, warned=warned, before_wait=before_wait, options=options)

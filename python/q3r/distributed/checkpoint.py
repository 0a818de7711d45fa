"""Loading a torch.distributed.checkpoint whose Q3R factors are wider than the template's.

The factors of a sharded target are rank + oversample wide unless an envelope outgrows that
width, so a template made before loading (``get_state_dict`` of a fresh model and optimizer)
has the saved shapes -- except where an envelope did (q3r.distributed.rangefinder.enveloping_svd
widens the sketch and keeps every triplet above eps). DCP refuses to load a tensor into one
of another size; :class:`FactorLoadPlanner` first gives each Q3R factor of the template the
size the checkpoint has for it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from .placement import is_sharded

__all__ = ["FactorLoadPlanner"]


class FactorLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that the Q3R factors of the state dict (U, V, sigma
    and tail of every slice state: AdamQ3R's under a "q3r" key, a Q3R regularizer's under
    "targets") are replaced by zero tensors of the width the checkpoint saved them with before
    anything is read (in the dict passed to ``dcp.load``, which then holds the loaded
    factors). Only the last dimension may differ: a factor whose other sizes differ was saved
    with another layout of its target (which factor of a sliced target is kept in the
    parameter's rows or columns depends on how the target is sharded) and is refused with a
    ValueError naming it (DCP gathers it into its CheckpointException)::

        dcp.load(sd, checkpoint_id=path, planner=q3r.distributed.FactorLoadPlanner())
    """

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        if metadata is not None:
            for path, container, key, tensor in _q3r_tensors(state_dict):
                saved = metadata.state_dict_metadata.get(".".join(map(str, path)))
                if not isinstance(saved, TensorStorageMetadata):
                    continue
                if _only_width_differs(saved.size, tensor.shape):
                    container[key] = _zeros_like_with_width(tensor, saved.size[-1])
                elif tuple(saved.size) != tuple(tensor.shape):
                    raise ValueError(
                        f"q3r: the checkpoint's Q3R factor {'.'.join(map(str, path))} is {tuple(saved.size)}, this run's "
                        f"is {tuple(tensor.shape)}: it was saved with another layout of its target. A sliced target "
                        "keeps U or V in its parameter's rows or columns, sharded or not, as its sharding (FSDP2, "
                        "tensor parallel, FSDP2 over tensor parallel, one process) requires, so its factors do not "
                        "load across layouts; resume on the layout the checkpoint was saved with (whole-weight "
                        "targets' factors load on any)")
        super().set_up_planner(state_dict, metadata, is_coordinator)


_FACTORS = ("U", "V", "sigma", "tail")
_FLAT_FACTOR = re.compile(r"(^|\.)q3r\.\d+\.(U|V|sigma|tail)$")


def _q3r_tensors(node, path=()):
    """(path, container, key, tensor) of every factor of a slice state (a mapping with U, V,
    sigma and eps: in AdamQ3R's state, a list or a dict keyed "0", "1", ... under "q3r"; in a
    Q3R regularizer's, lists under "targets"; or, in an optimizer state dict flattened by
    DCP's flatten_optimizer_state_dict, a key ending in "q3r.<j>.U" etc.), found through
    nested mappings and lists; the path's parts joined with dots are DCP's key for it."""
    if isinstance(node, Mapping) and all(isinstance(node.get(name), torch.Tensor) for name in ("U", "V", "sigma", "eps")):
        for name in _FACTORS:
            if isinstance(node.get(name), torch.Tensor):
                yield (*path, name), node, name, node[name]
        return
    items = node.items() if isinstance(node, Mapping) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        if isinstance(value, (Mapping, list)):
            yield from _q3r_tensors(value, (*path, key))
        elif isinstance(key, str) and isinstance(value, torch.Tensor) and _FLAT_FACTOR.search(key):
            yield (*path, key), node, key, value  # flatten_optimizer_state_dict's "state.<fqn>.q3r.<j>.U"


def _only_width_differs(saved: torch.Size, current: torch.Size) -> bool:
    return len(saved) == len(current) >= 1 and saved[:-1] == current[:-1] and saved[-1] != current[-1]


def _zeros_like_with_width(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros shaped like t but ``width`` wide in the last dim; a DTensor stays a DTensor on the
    same mesh and placements (a sharded U: its rows sharded like the weight's)."""
    if not is_sharded(t):
        return t.new_zeros(*t.shape[:-1], width)
    from torch.distributed.tensor import DTensor

    local = t.to_local()
    shape = (*t.shape[:-1], width)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local.new_zeros(*local.shape[:-1], width), t.device_mesh, t.placements,
                              run_check=False, shape=shape, stride=stride)

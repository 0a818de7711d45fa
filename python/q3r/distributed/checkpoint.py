"""Loading a torch.distributed.checkpoint whose Q3R factors are wider than the template's.

The factors of a sharded target are rank + oversample wide, a width fixed for the run, so a
template made before loading (``get_state_dict`` of a fresh model and optimizer) has the saved
shapes -- until an envelope outgrows that width (q3r.distributed.rangefinder.enveloping_svd
widens the sketch and keeps every triplet above eps). DCP refuses to load a tensor into one
of another size; :class:`FactorLoadPlanner` first gives each Q3R factor of the template the
size the checkpoint has for it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from .sharded import is_sharded

__all__ = ["FactorLoadPlanner"]


class FactorLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that the Q3R factors of the state dict (the tensors
    under a "q3r" key: U, V, sigma, tail) are replaced by zero tensors of the width the
    checkpoint saved them with before anything is read (in the dict passed to
    ``dcp.load``, which then holds the loaded factors). Only the last dimension may differ:
    any other size mismatch is left to DCP, which refuses it::

        dcp.load(sd, checkpoint_id=path, planner=q3r.distributed.FactorLoadPlanner())
    """

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        if metadata is not None:
            for path, container, key, tensor in _q3r_tensors(state_dict):
                saved = metadata.state_dict_metadata.get(".".join(map(str, path)))
                if isinstance(saved, TensorStorageMetadata) and _only_width_differs(saved.size, tensor.shape):
                    container[key] = _zeros_like_with_width(tensor, saved.size[-1])
        super().set_up_planner(state_dict, metadata, is_coordinator)


def _q3r_tensors(node, path=(), inside=False):
    """(path, container, key, tensor) of every tensor below a "q3r" key, in DCP's key order:
    nested mappings and lists, their keys joined with dots."""
    items = node.items() if isinstance(node, Mapping) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        here = inside or key == "q3r"
        if isinstance(value, torch.Tensor):
            if here:
                yield (*path, key), node, key, value
        else:
            yield from _q3r_tensors(value, (*path, key), here)


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

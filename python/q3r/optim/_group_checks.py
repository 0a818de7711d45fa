"""Checks of AdamQ3R's param groups: torch.optim.Adam flags it does not have, hyperparameters,
target dtypes, and whether a group's options still fit the Q3R state made for them."""

from __future__ import annotations

import math
import numbers

import torch

from .._state_check import slice_state_problem
from ..targets import slice_shapes


# torch.optim.Adam options AdamQ3R does not have (refused where true, as constructor arguments
# too): in a param group they would be ignored, and amsgrad / maximize change the update rule
ADAM_ONLY_FLAGS = ("amsgrad", "maximize", "foreach", "fused", "capturable", "differentiable")


# the options that cut a group's targets into slices of some rank, which its Q3R state is made
# for (the others are read afresh at every step or refresh)
CUT_OPTIONS = ("slices", "slice_dim", "target_rank", "rank_rule")


def check_adam_flags(group: dict, where: str, flags: tuple[str, ...] = ADAM_ONLY_FLAGS) -> None:
    """A group's torch.optim.Adam options that AdamQ3R does not have, and Adam's L2 decay.
    (A loaded checkpoint of torch's Adam / AdamW is checked for the update-changing ones only,
    amsgrad and maximize: foreach / fused there do not change its update.)"""
    for flag in flags:
        if group.get(flag):
            raise ValueError(f"{where}: {flag}={group[flag]!r}, which AdamQ3R does not have")
    if group.get("decoupled_weight_decay") is False and group.get("weight_decay"):
        raise ValueError(f"{where}: decoupled_weight_decay=False with weight_decay={group['weight_decay']} (Adam's "
                         "L2 decay, added to the gradient); AdamQ3R's weight decay is decoupled, as AdamW's")


def check_target_dtype(p, index: int, where: str) -> None:
    """A Q3R target is a real floating-point weight. (A complex one was taken, and its first step
    failed inside the refresh, '"aminmax_cpu" not implemented for 'ComplexFloat'', after the
    parameters not being refreshed had been updated.)"""
    if not p.is_floating_point():
        raise TypeError(f"{where}: parameter {index} {tuple(p.shape)} is {p.dtype}; Q3R targets must be real "
                        "floating-point weights (the refresh's SVD and the term are real): leave it out of the "
                        "q3r=True groups")


def check_hyperparameters(group: dict, where: str) -> None:
    lr, eps, wd, betas = group["lr"], group["eps"], group["weight_decay"], group["betas"]
    # (a string, lr="1e-3" from a config file, failed with "'<=' not supported between instances
    # of 'float' and 'str'", naming no option)
    for key, value in (("lr", lr), ("eps", eps), ("weight_decay", wd)):
        if isinstance(value, (bool, str)) or not isinstance(value, (numbers.Real, torch.Tensor)):
            raise TypeError(f"{where}: {key} must be a number, got {value!r}")
    if isinstance(lr, torch.Tensor):  # (torch's Adam takes one for capturable / compiled steps; AdamQ3R has neither)
        raise TypeError(f"{where}: lr must be a Python number, got a Tensor ({lr!r}); AdamQ3R has no capturable or "
                        "compiled step that a tensor lr is for: pass float(lr)")
    if not (0.0 <= lr < math.inf):
        raise ValueError(f"{where}: invalid learning rate lr={lr!r}")
    if not 0.0 <= eps:
        raise ValueError(f"{where}: invalid epsilon eps={eps!r}")
    if not 0.0 <= wd:
        raise ValueError(f"{where}: invalid weight_decay={wd!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(isinstance(b, numbers.Real) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"{where}: invalid betas={betas!r}; need two values in [0, 1)")


def same_options(a: tuple, b: tuple) -> bool:
    """Whether two snapshots of a group's options are equal; False where they cannot be compared
    (a tensor of several elements written into an option, which the check then refuses)."""
    try:
        return bool(a == b)
    except RuntimeError:
        return False


def slice_states_misfit(p, group: dict, slices) -> str | None:
    """Why the slice states ``slices`` do not fit parameter p cut as ``group`` cuts it (their
    count, or slice_state_problem of one), or None. Asked of a loaded state and of a live one
    whose group's slicing was changed after steps."""
    shapes = slice_shapes(p.shape, group["slice_dim"], group["slices"])
    if len(slices) != len(shapes):
        return f"{len(slices)} Q3R slice states for {len(shapes)} slices of {shapes}"
    return next((why for s, (d1, d2) in zip(slices, shapes) if (why := slice_state_problem(p, s, d1, d2))), None)


class GroupPlaces:
    """Where groups and their parameters sit in param_groups, found once for many lookups: (group
    index, position in the group) of a parameter. Only the groups given are indexed by parameter."""

    def __init__(self, param_groups: list[dict], groups):
        self._group_index = {id(g): gi for gi, g in enumerate(param_groups)}
        self._param_index: dict[int, dict[int, int]] = {}
        for g in groups:  # (each group once: a refresh names a group once per parameter due)
            if id(g) not in self._param_index:  # (reversed: a parameter listed twice is at its first place)
                self._param_index[id(g)] = {id(q): j for j, q in reversed(list(enumerate(g["params"])))}

    def of(self, group: dict, p) -> tuple[int, int]:
        return self._group_index[id(group)], self._param_index[id(group)][id(p)]

"""Q3R options shared by AdamQ3R's param groups and the Q3R regularizer, and their validation.

Every check raises before any state changes (SPEC section 5) and names the option and value.
"""

from __future__ import annotations

import math
import numbers

from . import reference
from .refresh import REFRESH_METHODS, SliceConfig, sketch_options
from .targets import resolve_slice_ranks, slice_shapes, validate_slices

Q3R_DEFAULTS = {
    "lmbda": 0.1,
    "steps": 5,
    "target_rank": 0.2,
    "rank_rule": "params",
    "eps_schedule": "min",
    "eps_value": None,
    "eps_floor": None,
    "num_refreshes": None,
    "refresh": "auto",
    "refresh_options": None,
    "stagger": False,
    "slices": None,
    "slice_dim": 0,
    "names": None,
}


def plain_values(value):
    """Options as plain Python values: a numpy lambda (np.logspace sweeps) in a state dict makes
    torch.load(weights_only=True) refuse the checkpoint, as the Hugging Face Trainer loads it."""
    if isinstance(value, dict):
        return {k: plain_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain_values(v) for v in value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return value


def is_plain(value) -> bool:
    """Whether an option holds only plain Python values (what plain_values keeps as is)."""
    if isinstance(value, dict):
        return all(is_plain(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    return not isinstance(value, numbers.Number) or type(value) in (int, float, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def validate_q3r_options(opts: dict, where: str = "Q3R") -> None:
    """Check the scalar options (lambda, period, schedule, rank rule, refresh method)."""
    lmbda = opts["lmbda"]
    if not _is_real(lmbda) or not math.isfinite(lmbda) or lmbda < 0:
        raise ValueError(f"{where}: lmbda must be a finite number >= 0, got {lmbda!r}")
    steps = opts["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{where}: steps (the refresh period) must be an int >= 1, got {steps!r}")
    try:
        reference.canonical_schedule(opts["eps_schedule"])
    except ValueError as e:  # (naming where: the group or regularizer)
        raise ValueError(f"{where}: {e}") from None
    if opts["rank_rule"] not in reference.RANK_RULES:
        raise ValueError(f"{where}: rank_rule must be one of {reference.RANK_RULES}, got {opts['rank_rule']!r}")
    if opts["refresh"] not in REFRESH_METHODS:
        raise ValueError(f"{where}: refresh must be one of {REFRESH_METHODS}, got {opts['refresh']!r}")
    sketch_options(opts.get("refresh_options"), f"{where}: refresh_options")
    if not isinstance(opts.get("stagger", False), bool):
        raise ValueError(f"{where}: stagger must be True or False, got {opts['stagger']!r}")
    if (why := reference.schedule_problem(opts["eps_schedule"], opts["eps_value"], opts["eps_floor"], opts["num_refreshes"])):
        raise ValueError(f"{where}: {why}")


def default_names(prefix: str, slices) -> list[str]:
    if slices is None:
        return [prefix]
    return [f"{prefix}[{a}:{b}]" for a, b in slices]


def slice_configs(shape, opts: dict, names: list[str]) -> list[SliceConfig]:
    """One SliceConfig per slice of a weight of ``shape`` (validates shape, slices and ranks)."""
    label = names[0].split("[")[0] if names else "target"
    if len(shape) != 2:
        raise ValueError(
            f"Q3R target {label} has shape {tuple(shape)}; only 2-D weights (or slices of them) can be targets"
        )
    slices = validate_slices(shape, opts["slice_dim"], opts["slices"], label)
    if len(names) != len(slice_shapes(shape, opts["slice_dim"], slices)):
        raise ValueError(f"names of {label} must give one name per slice, got {names!r}")
    ranks = resolve_slice_ranks(shape, opts["slice_dim"], slices, opts["target_rank"], opts["rank_rule"], label)
    schedule = reference.canonical_schedule(opts["eps_schedule"])
    return [
        SliceConfig(name, rank, schedule, opts["eps_value"], opts["eps_floor"], opts["num_refreshes"])
        for name, rank in zip(names, ranks)
    ]

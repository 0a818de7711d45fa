"""Refreshing the reweighting operator of each target from an SVD of its current weights.

The per-target state is a dict of plain tensors (so optimizer state dicts load with
``torch.load(weights_only=True)``):

    U (d1, k) float32, V (d2, k) float32, sigma (k,) float32  -- leading triplets of the anchor
    eps () float32          -- smoothing parameter (+inf before the first refresh)
    eps0 () float32         -- first eps of the geometric schedule (nan otherwise)
    sigma_next () float32   -- sigma_{r+1} of the anchor
    tail_energy () float32  -- fraction of ||W'||_F^2 outside the leading r triplets
    refreshes () int64      -- how many refreshes have been applied

Targets of the same shape are stacked and decomposed in one batched call.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from . import reference

REFRESH_METHODS = ("exact",)


@dataclass(frozen=True)
class SliceConfig:
    """What a refresh needs to know about one target (a weight or a slice of one)."""

    name: str
    rank: int
    schedule: str = "min"
    eps_value: float | None = None
    eps_floor: float | None = None
    num_refreshes: int | None = None


def new_slice_state(d1: int, d2: int, device=None) -> dict[str, Tensor]:
    """State of a target before its first refresh: zero-width factors, i.e. R = I."""
    f32 = dict(dtype=torch.float32, device=device)
    return {
        "U": torch.zeros(d1, 0, **f32),
        "V": torch.zeros(d2, 0, **f32),
        "sigma": torch.zeros(0, **f32),
        "eps": torch.tensor(math.inf, **f32),
        "eps0": torch.tensor(math.nan, **f32),
        "sigma_next": torch.tensor(math.nan, **f32),
        "tail_energy": torch.tensor(math.nan, **f32),
        "refreshes": torch.tensor(0, dtype=torch.int64, device=device),
    }


def operator_of(state: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(U, V, d) of the current operator; d = 0 for triplets at or below eps."""
    return state["U"], state["V"], reference.reweighting_coefficients(state["sigma"], state["eps"])


def _warn_nonfinite(name: str, warned: set | None) -> None:
    if warned is not None and name in warned:
        return
    if warned is not None:
        warned.add(name)
    warnings.warn(
        f"q3r: target {name!r} has non-finite weights at a refresh; its refresh is skipped and "
        "the last good factors are kept",
        RuntimeWarning,
        stacklevel=3,
    )


def _commit_refresh(
    state: dict[str, Tensor], cfg: SliceConfig, spectrum: Tensor, U: Tensor, S: Tensor, V: Tensor
) -> None:
    """Update eps by the schedule and keep the triplets above it (U, S, V cover >= r_env)."""
    sigma_next = float(spectrum[cfg.rank]) if spectrum.numel() > cfg.rank else 0.0
    eps, eps0 = reference.next_eps(
        cfg.schedule,
        float(state["eps"]),
        sigma_next,
        int(state["refreshes"]),
        float(state["eps0"]),
        cfg.eps_value,
        cfg.eps_floor,
        cfg.num_refreshes,
    )
    r_env = int((S > eps).sum())
    total = float(spectrum.double().square().sum())
    head = float(spectrum[: cfg.rank].double().square().sum())
    state["U"] = U[:, :r_env].to(torch.float32).contiguous()
    state["V"] = V[:, :r_env].to(torch.float32).contiguous()
    state["sigma"] = S[:r_env].to(torch.float32).contiguous()
    state["eps"].fill_(eps)
    state["eps0"].fill_(eps0)
    state["sigma_next"].fill_(sigma_next)
    state["tail_energy"].fill_(0.0 if total == 0 else max(total - head, 0.0) / total)
    state["refreshes"].add_(1)


def refresh_slices_(
    weights: list[Tensor],
    states: list[dict[str, Tensor]],
    configs: list[SliceConfig],
    method: str = "exact",
    warned: set | None = None,
) -> list[bool]:
    """Refresh each target's factors in place from its current weights.

    weights[i] is a 2-D view of target i (any dtype); states[i] its state dict (updated in
    place); returns, per target, whether it was refreshed (False: non-finite weights, the
    old factors are kept and one warning per target name is issued).
    """
    if method not in REFRESH_METHODS:
        raise ValueError(f"refresh method must be one of {REFRESH_METHODS}, got {method!r}")
    done = [False] * len(weights)
    groups: dict[tuple, list[int]] = {}
    for i, W in enumerate(weights):
        if not bool(torch.isfinite(W).all()):
            _warn_nonfinite(configs[i].name, warned)
            continue
        groups.setdefault((tuple(W.shape), W.device), []).append(i)
    for idx in groups.values():
        stack = torch.stack([weights[i].detach().to(torch.float32) for i in idx])
        U, S, V, spectrum = reference.anchor_factors(stack)
        for j, i in enumerate(idx):
            _commit_refresh(states[i], configs[i], spectrum[j], U[j], S[j], V[j])
            done[i] = True
    return done

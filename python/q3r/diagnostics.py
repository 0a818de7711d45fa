"""Per-target diagnostics: how far each target is from its prescribed rank."""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from ._precision import autocast_off
from .refresh import operator_of


@autocast_off
@torch.no_grad()
def slice_diagnostics(W: Tensor, state: dict[str, Tensor], rank: int, lmbda: float) -> dict[str, float]:
    """Diagnostics of one target slice W under its current operator.

    envelope_rank: #{sigma_i > eps} of the anchor (the operator's rank);
    eps: the smoothing parameter;  sigma_next: sigma_{r+1} of the current weights;
    effective_rank: exp(entropy of sigma / sum sigma) of the current weights (Roy & Vetterli);
    tail_energy: fraction of ||W||_F^2 outside the leading ``rank`` singular values
    (what truncation to the target rank throws away); penalty: lmbda <W, R(W)>.
    """
    W32 = W.detach().to(reference.compute_dtype(W.dtype))
    of_operator = {
        "envelope_rank": float(reference.envelope_rank(state["sigma"], state["eps"])),
        "eps": float(state["eps"]),
    }
    if not bool(torch.isfinite(W32).all()):
        # (a logging call must not end a run whose weights went non-finite: SPEC section 5;
        # the SVD would raise) the weights' own measures are NaN, the operator's are kept
        nan = float("nan")
        return {**of_operator, "sigma_next": nan, "effective_rank": nan, "tail_energy": nan, "penalty": nan}
    sv = torch.linalg.svdvals(W32).double()
    energy = sv.square()
    total = float(energy.sum())
    p = sv / sv.sum() if float(sv.sum()) > 0 else sv
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    U, V, d = operator_of(state)
    return {
        **of_operator,
        "sigma_next": float(sv[rank]) if sv.numel() > rank else 0.0,
        "effective_rank": float(entropy.exp()) if total > 0 else 0.0,  # (a zero matrix has rank 0, not exp(0))
        "tail_energy": 0.0 if total == 0 else float(energy[rank:].sum()) / total,
        # (<W, R(W)> >= 0, R being positive definite; its closed form cancels where eps is tiny
        # and lands a few ulp of ||W||^2 below 0: -6e-06 was reported, h38)
        "penalty": max(float(lmbda * reference.penalty_value(W32, U, V, d)), 0.0),
    }

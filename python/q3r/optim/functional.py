"""The AdamQ3R update as functions of tensors (no optimizer object), reference path.

One step for a parameter W with gradient g (SPEC section 3, decoupled):

    T_j   = 2 lambda R_j(W_prev[slice j])          (evaluated before anything moves)
    W    <- W (1 - lr wd)                          (decoupled weight decay, if any)
    W    <- Adam(W, g)                             (bias-corrected, torch.optim.Adam arithmetic)
    W[j] <- W[j] - lr T_j

The Q3R term never enters the Adam moments, so with lambda = 0 this is torch.optim.Adam
(weight_decay = 0) or AdamW (weight_decay > 0) bit for bit on the reference path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import reference
from ..targets import slice_views, uncovered_ranges


@dataclass
class ParamWork:
    """Everything one parameter's update needs; built by AdamQ3R.step, consumed by a backend."""

    param: Tensor
    grad: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    step: Tensor  # float32 scalar, incremented here
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    lmbda: float = 0.0
    slice_dim: int = 0
    slices: list | None = None
    # per slice (U, V, d), or (U, V, sigma, eps): d is then derived where it is used (on the
    # device by the fused kernels, which saves a handful of tiny launches per slice per step)
    operators: list[tuple[Tensor, ...]] = field(default_factory=list)


def adam_update_(work: ParamWork, param: Tensor | None = None, decay: bool = True) -> None:
    """torch.optim.Adam's single-tensor update (decoupled weight decay as in AdamW, unless
    ``decay`` is False: the caller applied it), of ``param`` (default: work.param; or a float32
    copy of it, see adamq3r_reference_, whose moments are then computed in float32 as well)."""
    param = work.param if param is None else param
    grad, exp_avg, exp_avg_sq = work.grad, work.exp_avg, work.exp_avg_sq
    # a float32 copy of a low-precision parameter takes float32 moments too, stored rounded
    # once, as the fused kernel does: in float16, (1 - beta2) g^2 of a small g (|g| < 0.008)
    # underflows to 0 and eps = 1e-8 is 0 there too, so the update was inf, and at the next
    # step R(W) spread it over the whole target as NaN while the kernels' update stayed finite
    wide = param.dtype != exp_avg.dtype
    if wide:
        grad, exp_avg, exp_avg_sq = (t.to(param.dtype) for t in (grad, exp_avg, exp_avg_sq))
    work.step += 1
    if decay and work.weight_decay != 0:
        param.mul_(1 - work.lr * work.weight_decay)
    if param.is_complex():  # (as torch's Adam: real and imaginary parts as two reals; on the
        # complex tensors exp_avg_sq took g * g, not |g|^2, and the update drifted from AdamW's)
        param, grad, exp_avg, exp_avg_sq = (torch.view_as_real(t) for t in (param, grad, exp_avg, exp_avg_sq))
    exp_avg.lerp_(grad, 1 - work.beta1)
    exp_avg_sq.mul_(work.beta2).addcmul_(grad, grad, value=1 - work.beta2)
    step = float(work.step)
    bias_correction1 = 1 - work.beta1**step
    bias_correction2 = 1 - work.beta2**step
    step_size = work.lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(work.eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
    if wide:
        work.exp_avg.copy_(exp_avg)
        work.exp_avg_sq.copy_(exp_avg_sq)


def adamq3r_reference_(works: list[ParamWork]) -> None:
    """The reference AdamQ3R step over many parameters, one after another.

    A slice's rows are taken a block at a time (q3r.reference.reweighting_row_blocks): R_j of
    the block from W_prev, then W <- W (1 - lr wd) - lr 2 lambda R_j (W_prev) in those rows; then
    Adam's update without its decay, which reads nothing of W. That is the module docstring's
    step, with one block-sized temporary instead of R_j(W_prev) written out. Uncovered rows or
    columns of a sliced weight take W (1 - lr wd).
    """
    for work in works:
        if work.lmbda == 0 or not work.operators:  # without a term, torch.optim.Adam's update bit for bit
            adam_update_(work)
            continue
        # a low-precision parameter with a Q3R term is updated in float32 and rounded once, as
        # the fused kernel does: rounded after Adam and again after the term, a term below half
        # an ulp of W would be lost (in bf16 most of it, at typical lr * 2 lambda)
        wide = work.param.float() if work.param.dtype in (torch.bfloat16, torch.float16) else None
        target = work.param if wide is None else wide
        c, decay = work.lr * 2.0 * work.lmbda, work.lr * work.weight_decay
        for view, op in zip(slice_views(target, work.slice_dim, work.slices), work.operators):
            for a, b, R in reference.reweighting_row_blocks(view, *reference.operator_udv(op)):
                rows = view[a:b]
                if decay != 0:
                    rows.mul_(1 - decay)  # (AdamW's decay, as torch takes it)
                rows.sub_(R, alpha=c)
        if decay != 0 and work.slices is not None:
            for a, b in uncovered_ranges(target.shape[work.slice_dim], work.slices):
                target.narrow(work.slice_dim, a, b - a).mul_(1 - decay)
        adam_update_(work, target, decay=False)
        if wide is not None:
            work.param.copy_(wide)


def adamq3r_step_(works: list[ParamWork]) -> None:
    """Apply one AdamQ3R step to every parameter in ``works`` with the chosen backend: the
    fused Triton update (q3r.ops) takes what it can, the reference path the rest."""
    from ..ops import adamq3r_fused_  # q3r_kernels / triton load only once a kernel runs

    adamq3r_reference_(adamq3r_fused_(works))

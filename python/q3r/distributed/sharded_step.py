"""The training-step entry points for sharded targets: the AdamQ3R step, Q3R.add_grad_ and the
differentiable penalty, each built on :class:`.sharded.ShardedTerms` (one all-reduce per step for
all targets).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .._precision import no_autocast
from .placement import DTensor, is_sharded, local_tensor, placed_like_param
from .sharded import ShardedTerms, localized


def _grads_placed_like_params_(params) -> None:
    """Replace each .grad that is placed unlike its parameter by one placed like it (the same
    values), so that a term added to its local shard lands on the right entries."""
    for p in params:
        placed = placed_like_param(p, p.grad)
        if placed is not p.grad:
            p.grad = placed


def sharded_adamq3r_step_(works) -> None:
    """The AdamQ3R step (SPEC section 3) for parameters that may be DTensors: the step of
    q3r.optim.functional (fused Triton kernels where they run) on the local shards with the
    local operators, then the low-rank corrections of :class:`ShardedTerms` (one all-reduce
    per step for all targets), all evaluated before the update moves the weights."""
    from ..optim.functional import adam_update_, adamq3r_step_

    works = [dataclasses.replace(w, grad=placed_like_param(w.param, w.grad)) for w in works]
    q3r_works = [w for w in works if is_sharded(w.param) and w.lmbda != 0 and w.operators]
    terms = ShardedTerms([(w.param, w.slice_dim, w.slices, w.operators) for w in q3r_works])
    with_term = {id(w) for w in q3r_works}
    fused = [w for w in q3r_works if w.param.dtype == torch.float32]
    adamq3r_step_([terms.local_work(w) for w in fused] + [
        localized(w, operators=[] if is_sharded(w.param) else w.operators) for w in works if id(w) not in with_term])
    for w in fused:
        terms.correct_(w.param, w.param.to_local(), -w.lr * 2.0 * w.lmbda)
    for w in q3r_works:
        if w.param.dtype == torch.float32:
            continue
        # bf16 / fp16: the whole term at the weights before the step, the update of a float32
        # copy and one rounding, as adamq3r_reference_ does (rounded after Adam and again after
        # the term, a term below half an ulp of W was lost: most of it at typical lr * 2 lambda)
        todo = terms.full_terms(w.param)
        local = localized(w, operators=[])
        low = local.param.dtype in (torch.bfloat16, torch.float16)
        target = local.param.float() if low else local.param
        adam_update_(local, target)
        for view, R in zip(terms._views(w.param, target), todo):
            view.sub_(R.to(view.dtype), alpha=w.lr * 2.0 * w.lmbda)
        if low:
            local.param.copy_(target)


def sharded_add_grad_(entries, grads) -> None:
    """Q3R.add_grad_ for sharded targets: entries (param, slice_dim, slices, operators, scale),
    grads the parameters' (DTensor) gradients; adds scale * R(X) to each slice of the local
    gradient."""
    terms = ShardedTerms([entry[:4] for entry in entries])
    by_scale: dict[float, list] = {}
    for entry, g in zip(entries, grads):
        p = entry[0]
        if g is p.grad:  # (placed like p first: the term goes into the local shard)
            _grads_placed_like_params_([p])
            g = p.grad
        elif placed_like_param(p, g) is not g:  # (a copy placed like p would take the term, not g)
            raise ValueError(f"a gradient placed {tuple(g.placements)} for a sharded target placed "
                             f"{tuple(p.placements)}: pass it placed like its parameter")
        by_scale.setdefault(entry[4], []).append((p, local_tensor(g)))
    for scale, pairs in by_scale.items():
        terms.add_(pairs, scale)


def sharded_penalty(entries) -> Tensor:
    """The sum over the slices of sharded targets of <X, R(X)>, differentiable: its backward
    adds grad_output * 2 R(X) to the sharded ``.grad`` of the parameters that require it.

    entries: (param DTensor, slice_dim, slices, operators per slice). The value costs one
    all-reduce of the A = U^T X of all slices and one of a scalar per process group. The
    gradient does not flow through autograd's accumulation into ``.grad``: FSDP2 writes the
    reduced gradient shards on its own stream and only makes the default stream wait for them
    in a callback at the end of the backward pass, so the term is added in a callback queued to
    run after that one (see queue_after_backward_callbacks), at the weights the value was
    taken at (nothing moves them before the backward pass in a training loop). So it reaches
    ``.grad`` also under ``torch.autograd.grad`` (which leaves ``.grad`` alone otherwise) and is
    not differentiable again (``create_graph``). Under FSDP2's ``set_is_last_backward(False)``
    that callback does not wait for the reduction: use the penalty only in the last backward
    pass of such a sequence (or add_grad_ / AdamQ3R).
    """
    params = [e[0] for e in entries]
    return _PenaltyOfShards.apply(entries, *params)


class _PenaltyOfShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, entries, *params):
        ctx.terms, ctx.params = ShardedTerms(entries), params
        return ctx.terms.penalty_value()

    @staticmethod
    def backward(ctx, grad_output):
        terms = ctx.terms
        params = [p for i, p in enumerate(ctx.params) if ctx.needs_input_grad[1 + i]]

        def add_():
            factor = 2.0 * float(grad_output)  # at the end of the backward pass: one sync per step
            for p in params:
                if p.grad is None:
                    p.grad = DTensor.from_local(torch.zeros_like(p.to_local()), p.device_mesh, p.placements,
                                                run_check=False, shape=p.shape, stride=p.stride())
            _grads_placed_like_params_(params)
            with no_autocast():  # (a backward pass may run inside the caller's autocast too)
                terms.add_([(p, p.grad.to_local()) for p in params], factor)

        queue_after_backward_callbacks(add_)
        return (None,) * (1 + len(ctx.params))


def queue_after_backward_callbacks(fn) -> None:
    """From inside a backward pass: run fn at its end, after every callback queued during it.

    Final callbacks run in the order they were queued, and one queued by a callback runs after
    all of them. FSDP2 queues the callback that waits for its gradient reduction while the
    backward pass runs, possibly after the caller: queuing from a callback puts fn after it."""
    engine = torch.autograd.Variable._execution_engine
    engine.queue_callback(lambda: engine.queue_callback(fn))

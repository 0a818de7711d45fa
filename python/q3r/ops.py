"""Public functional ops of Q3R: validate, pick a backend (see _backend), call it.

Each op has the signature of its q3r.reference counterpart; the grouped ones take lists so
that the Triton backend serves a whole model's targets in a handful of launches:

    project(X, U, V) -> (A, B)
    apply_reweighting(X, U, V, d) -> R(X)   (float32 / float64)
    add_reweighting_(outs, weights, factors, alpha)        outs[i] += alpha R_i(weights[i])
    adamq3r_fused_(works) -> works it did not take          the fused AdamQ3R step

q3r_kernels (and so triton) is imported only when the Triton backend is chosen.

Automatic choice and factor width: automatic dispatch sends targets whose factors are wider
than Q3R_TRITON_MAX_WIDTH (default 512) to the reference path; Q3R_BACKEND=triton forces them.
The limit was 256 while the kernels were slower than the reference path at width 409
(LLaMA-1B-like; bench_step_h100_5884638.md) and, later, while their workspace was held between
steps (7.5% above AdamW's peak plus the factors at e3484d0).  Since 416e5fa the workspace is
allocated per step, and at 9591655 width 409 measured 84.8 against 113.9 ms of work at +0.015%
of peak memory (bench_step_h100_9591655.log); widths above 512 have not been measured.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

import os

from . import reference
from ._backend import BackendUnavailableError, backend_for, requested
from .targets import uncovered_ranges

__all__ = ["project", "apply_reweighting", "add_reweighting_", "adamq3r_fused_"]


AUTO_MAX_WIDTH_DEFAULT = 512  # (see the module docstring: measured up to width 409)


def auto_max_width() -> int:
    """Widest factor (columns of U) that automatic dispatch gives to the Triton kernels."""
    value = os.environ.get("Q3R_TRITON_MAX_WIDTH", str(AUTO_MAX_WIDTH_DEFAULT))
    try:
        width = int(value)
    except ValueError:
        width = -1
    if width < 0:
        raise ValueError(f"Q3R_TRITON_MAX_WIDTH must be an int >= 0, got {value!r}")
    return width


def _width_limit() -> int | None:
    """Widest factor automatic dispatch gives to the kernels now (None: no limit, forced)."""
    return None if requested() == "triton" else auto_max_width()


def _width_ok(factors, limit: int | None) -> bool:
    """False when automatic dispatch should keep these factors on the reference path."""
    return limit is None or all(f[0].shape[-1] <= limit for f in factors)


def _kernels():
    import q3r_kernels

    return q3r_kernels


def _check(X: Tensor, U: Tensor, V: Tensor, d: Tensor | None = None) -> None:
    if X.dim() < 2:
        raise ValueError(f"X must have at least 2 dimensions, got shape {tuple(X.shape)}")
    d1, d2 = X.shape[-2:]
    if U.dim() < 2 or V.dim() < 2 or U.shape[-2] != d1 or V.shape[-2] != d2 or U.shape[-1] != V.shape[-1]:
        raise ValueError(
            f"factors U {tuple(U.shape)} and V {tuple(V.shape)} do not fit X {tuple(X.shape)}: "
            "need U (..., d1, k) and V (..., d2, k)"
        )
    if d is not None and d.shape[-1] != U.shape[-1]:
        raise ValueError(f"d of shape {tuple(d.shape)} does not fit factors of width {U.shape[-1]}")
    for name, t in (("U", U), ("V", V), ("d", d)):
        if t is not None and t.device != X.device:
            raise ValueError(f"{name} is on {t.device} but X is on {X.device}")


def _fast(X: Tensor, U: Tensor, V: Tensor) -> bool:
    """Whether the kernels take this product: the Triton backend for X, float32 factors, and
    (under automatic dispatch) factors no wider than Q3R_TRITON_MAX_WIDTH, as add_reweighting_.
    Forced (Q3R_BACKEND=triton), a product the kernels cannot take is an error."""
    limit = _width_limit()  # (checked on every path: a bad setting is an error wherever it is read)
    if backend_for(X.device, X.dtype) != "triton":
        return False
    if U.dtype != torch.float32 or V.dtype != torch.float32:
        _refuse_forced(f"the kernels take float32 factors, got U {U.dtype} and V {V.dtype}")
        return False
    if not _width_ok([(U,)], limit):
        return False
    # (the kernels index within a matrix in int32; theirs raised ValueError for a larger one)
    meta = _kernels()._meta
    if not (all(meta.fits_int32(t) for t in (X, U, V)) and meta.workspace_fits_int32(*X.shape[-2:], U.shape[-1])):
        _refuse_forced(f"a matrix of X {tuple(X.shape)}, U, V or the kernels' workspace for them lies 2**31 "
                       "elements or more past its first")
        return False
    return True


def _refuse_forced(why: str) -> None:
    """Under Q3R_BACKEND=triton, an op the kernels cannot take raises rather than running on
    the reference path unasked."""
    if requested() == "triton":
        raise BackendUnavailableError(f"Q3R_BACKEND=triton was requested but {why}")


def project(X: Tensor, U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """A = U^T X (..., k, d2), B = X V (..., d1, k) in the compute dtype."""
    _check(X, U, V)
    if _fast(X, U, V):
        return _kernels().project(X, U, V)
    return reference.project(X, U, V)


def apply_reweighting(X: Tensor, U: Tensor, V: Tensor, d: Tensor) -> Tensor:
    """R(X) = (I + U diag d U^T) X (I + V diag d V^T) in the compute dtype."""
    _check(X, U, V, d)
    if _fast(X, U, V):
        return _kernels().apply_reweighting(X, U, V, d.to(torch.float32).contiguous())
    return reference.apply_reweighting(X, U, V, d)


_FAST_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def add_reweighting_(outs: list[Tensor], weights: list[Tensor], factors: list[tuple], alpha: float) -> None:
    """outs[i] += alpha * R_i(weights[i]) in place, for 2-D (views of) weights.

    factors[i] is (U, V, d), or (U, V, sigma, eps) (d is then derived as in
    q3r.reference.reweighting_coefficients, on the device when the kernels run).
    Everything is checked before any out changes. The kernels' tables are cached per layout
    (see _reweight_layout_key), so a loop that passes the same weights every step (the Q3R
    regularizer's add_grad_) pays for them once, and after a refresh only for its new factors.
    """
    if len(outs) != len(weights) or len(weights) != len(factors):
        raise ValueError(f"add_reweighting_ needs as many outs, weights and factors, got {len(outs)}, "
                         f"{len(weights)}, {len(factors)}")
    limit, verdict, fast, slow = _width_limit(), {}, [], []
    for i, (out, W, f) in enumerate(zip(outs, weights, factors)):
        if len(f) not in (3, 4):
            raise ValueError(f"factors[{i}] must be (U, V, d) or (U, V, sigma, eps), got {len(f)} tensors")
        where = (W.device, W.dtype)
        if where not in verdict:
            verdict[where] = backend_for(*where) == "triton"
        U, V = f[0], f[1]
        # (V too: the kernels refuse a factor of another dtype with a TypeError, where the
        # reference path takes it)
        # (and one the kernels' int32 offsets reach: theirs raised ValueError for a larger one)
        ok = (verdict[where] and W.dim() == 2 and out.dtype in _FAST_OUT_DTYPES
              and U.dtype == V.dtype == torch.float32 and (limit is None or U.shape[-1] <= limit))
        if ok:  # (the kernels are imported only where they are chosen)
            meta = _kernels()._meta
            ok = meta.fits_int32(W) and meta.fits_int32(out) and meta.workspace_fits_int32(*W.shape, U.shape[-1])
        if verdict[where] and not ok:
            _refuse_forced(f"block {i} does not fit the kernels (a 2-D weight, an out of dtype float32, bfloat16 "
                           f"or float16, float32 factors, and weight, out and the kernels' workspace each within "
                           f"2**31 elements of their first; got {W.dim()}-D {tuple(W.shape)}, {out.dtype}, U {U.dtype} "
                           f"{tuple(U.shape)}, V {V.dtype})")
        (fast if ok else slow).append(i)
    for i in slow:  # all of them before the first is applied
        _check(weights[i], factors[i][0], factors[i][1], factors[i][2])
        if len(factors[i]) == 4:
            _check_eps(factors[i][2], factors[i][3], f"factors[{i}]")
        if tuple(outs[i].shape) != tuple(weights[i].shape):
            raise ValueError(f"out of shape {tuple(outs[i].shape)} for a weight of shape {tuple(weights[i].shape)}")
    weights = _unaliased(outs, weights)
    # the kernels read d (or sigma) as contiguous float32 and eps as a float32 tensor on the
    # weight's device (the reference path also takes a Python number); these stay referenced
    # until run()
    # one plan per device: a plan's tables live on, and its kernels launch on, one device
    plans = []
    for idx in _by_device(fast, lambda i: weights[i].device):
        fast_factors = [_kernel_operator(factors[i], weights[i].device) for i in idx]
        plans.append((_reweight_plan_for([outs[i] for i in idx], [weights[i] for i in idx], fast_factors), idx))
    for i in slow:
        U, V, *rest = factors[i]
        d = rest[0] if len(rest) == 1 else reference.reweighting_coefficients(*rest)
        out, W = outs[i], weights[i]
        if (W.dim(), U.dim(), V.dim(), d.dim()) == (2, 2, 2, 1):
            # R(W) a block of rows at a time, each added once (a low-precision out takes it
            # rounded to its dtype): a block-sized temporary, not R(W) written out (three
            # full-size ones); W may be out (a block reads only its rows)
            for a, b, R in reference.reweighting_row_blocks(W, U, V, d):
                add_scaled_(out[a:b], R, alpha)
        else:  # (factors with batch dimensions)
            add_scaled_(out, reference.apply_reweighting(W, U, V, d), alpha)
    for plan, idx in plans:
        plan.run([outs[i] for i in idx], [alpha] * len(idx))


def _by_device(items: list, device_of) -> list[list]:
    """``items`` split by device_of(item), in order of first appearance (one list for one device)."""
    groups: dict = {}
    for item in items:
        groups.setdefault(device_of(item), []).append(item)
    return list(groups.values())


def add_scaled_(out: Tensor, R: Tensor, alpha: float) -> None:
    """out += alpha * R, R in its compute dtype (a new tensor, scaled in place). An out of a
    narrower dtype takes alpha * R rounded once to it: R rounded first and scaled there
    overflowed where R(W) lies beyond the dtype's range while alpha R does not (float16
    weights up to 60000: R(W) reaches about 1.7 max|W|, the term 2 lambda R(W) a fifth of
    that at lambda 0.1, and the gradient became inf), and rounded twice besides."""
    if torch.finfo(out.dtype).bits >= torch.finfo(R.dtype).bits:
        out.add_(R.to(out.dtype), alpha=alpha)
    else:
        out.add_(R.mul_(alpha).to(out.dtype))


def _unaliased(outs: list[Tensor], weights: list[Tensor]) -> list[Tensor]:
    """The weights, with a copy of each that shares memory with an out other than its own
    block's out being that very view: outs are written while weights are still read (the
    kernels' tiles, and the blocks one after another), so such a weight would be read
    half-updated.  An out with internal overlap (an expanded view) is refused, as torch
    refuses writes into one: nothing is written then.  (The optimizer and regularizer add
    into gradients: no copy.)"""
    for i, out in enumerate(outs):
        if torch._debug_has_internal_overlap(out) == 1:  # 1: MemOverlap.Yes
            raise ValueError(f"outs[{i}] has internal overlap (more than one element refers to a single memory "
                             f"location, e.g. an expanded view): it cannot be written in place")
    written: dict[int, list[int]] = {}
    for i, out in enumerate(outs):
        written.setdefault(out.untyped_storage().data_ptr(), []).append(i)
    if not any(W.untyped_storage().data_ptr() in written for W in weights):
        return weights
    return [W.clone() if any(i != j or not _same_view(outs[i], W) for i in written.get(W.untyped_storage().data_ptr(), ()))
            else W for j, W in enumerate(weights)]


def _same_view(a: Tensor, b: Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


def _check_eps(sigma: Tensor, eps, name: str) -> None:
    """eps must broadcast to sigma's batch dimensions (see reference._as_eps), adding none."""
    shape = tuple(getattr(eps, "shape", ()))
    if not shape and sigma.dim() >= 1:  # (one eps, as every target's state holds: (1,) broadcasts to
        return                          # any sigma; torch.broadcast_shapes took ~5 us per target per step)
    try:
        fits = torch.broadcast_shapes(shape + (1,), tuple(sigma.shape)) == tuple(sigma.shape)
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"{name}: eps of shape {shape} does not fit sigma of shape {tuple(sigma.shape)}")


def _reweight_plan_for(outs: list, weights: list, factors: list):
    """The cached ReweightPlan for these blocks, its factors brought up to date (None: no block)."""
    if not weights:
        return None
    key = _reweight_layout_key(outs, weights, factors)
    now = [_operator_key(f) for f in factors]
    entry = _PLANS.get(key)
    if entry is None:
        for W, f in zip(weights, factors):
            _check(W, f[0], f[1])
        entry = _cache(key, _CachedPlan(_kernels().ReweightPlan(weights, outs, factors), [], [], now))
    else:
        _follow_factors(entry, key, now, factors)
    return entry.plan


def _reweight_layout_key(outs: list, weights: list, factors: list) -> tuple:
    """What a ReweightPlan is built for: the weights' storage and layout, the outputs' layout
    (not their addresses: a gradient may be a new tensor every step), the factor form, and
    the tile settings."""
    return ("reweight", _config_key()) + tuple(
        (W.data_ptr(), W.shape, W.stride(), W.dtype, W.device, o.shape, o.stride(), o.dtype, o.device,
         o.data_ptr() % 16, len(f))
        for o, W, f in zip(outs, weights, factors)
    )


# ------------------------------------------------------------------ fused AdamQ3R step
def _regions(work, K):
    """The fused kernel's regions of one parameter, or None if its layout does not fit
    (their float rows are filled per step by adamq3r_fused_; only the layout matters here)."""
    tensors = (work.param, work.grad, work.exp_avg, work.exp_avg_sq)
    operators = work.operators if work.lmbda != 0 else []
    if not operators:
        if all(t.is_contiguous() for t in tensors):
            return [K.AdamRegion(*(t.view(-1) for t in tensors), None)]
        return [K.AdamRegion(*tensors, None)] if work.param.dim() == 2 else None
    if work.param.dim() != 2:
        return None
    dim, slices = work.slice_dim, work.slices
    spans = [(0, work.param.shape[dim])] if slices is None else list(slices)
    if len(spans) != len(operators):
        return None
    regions = [K.AdamRegion(*(t.narrow(dim, a, b - a) for t in tensors), None, tuple(op))
               for (a, b), op in zip(spans, operators)]
    regions += [K.AdamRegion(*(t.narrow(dim, a, b - a) for t in tensors), None)
                for a, b in uncovered_ranges(work.param.shape[dim], spans)]
    return regions


@dataclass
class _CachedPlan:
    plan: object  # q3r_kernels.AdamQ3RPlan or ReweightPlan
    region_map: list  # AdamQ3RPlan: per region, (work index, operator index or None, grad offset)
    rejected: list  # AdamQ3RPlan: indices of the works the kernels cannot take
    factors: list  # per block of the plan: the _operator_key its tables point at (None: no term)


# _layout_key or _reweight_layout_key -> _CachedPlan, least recently used first
_PLANS: OrderedDict = OrderedDict()
# (a staggered AdamQ3R step runs two plans per phase of its period, see AdamQ3R.step: 2 T + 1
# plans in all, so 256 keeps periods up to 127 without rebuilding; 64 rebuilt every step at
# T >= 32. Plans are small: their tables and tile schedules, a few hundred KB for all of
# ViT-B/16's targets, less for a phase's share; the workspace is allocated per run)
_MAX_PLANS = 256


def _config_key() -> tuple:
    """The tile settings and the resolved dot precision ("auto" follows torch per call)."""
    return _kernels()._meta.settings()


def _layout_key(works: list) -> tuple:
    """What a plan is built for: storage addresses, shapes, strides, slicing, which works
    have a Q3R term and how many operators of which kind, and the tile settings. Unchanged
    in an ordinary training loop. Gradient addresses are left out, but for their 16-byte
    alignment (which picks the kernels' aligned accesses): they are sent with every step (see
    AdamQ3RPlan.run); so are the factors: see _operator_key."""
    return ("adam", _config_key()) + tuple(
        (w.param.data_ptr(), w.param.shape, w.param.stride(), w.param.dtype, w.grad.stride(),
         w.grad.dtype, w.grad.data_ptr() % 16, w.exp_avg.data_ptr(), w.exp_avg_sq.data_ptr(), w.exp_avg.dtype,
         w.exp_avg.stride(), w.exp_avg_sq.stride(), w.lmbda != 0, w.slice_dim,
         None if w.slices is None else tuple(map(tuple, w.slices)),
         tuple(len(op) for op in w.operators) if w.lmbda != 0 else ())
        for w in works
    )


def _operator_key(op) -> tuple:
    """What the Q3R fields of a block's table row point at: its factor tensors' addresses,
    shapes, strides and dtypes. A refresh changes it (new tensors, a new width), and the
    cached plan's update_factors follows, far cheaper than building the plan again."""
    return tuple((t.data_ptr(), t.shape, t.stride(), t.dtype) for t in op)


def _cache(key, entry: "_CachedPlan") -> "_CachedPlan":
    _PLANS[key] = entry
    while len(_PLANS) > _MAX_PLANS:
        _PLANS.popitem(last=False)
    return entry


def _follow_factors(entry: "_CachedPlan", key, now: list, operators: list) -> None:
    """Bring a cached plan's factor fields up to date: now[b] is _operator_key of block b's
    factors operators[b] (None for a block without a Q3R term). Only the blocks whose key
    changed are rewritten (a staggered refresh touches a few); raises and changes nothing
    on bad factors."""
    _PLANS.move_to_end(key)
    if now != entry.factors:
        entry.plan.update_factors({b: tuple(operators[b]) for b, (old, new) in enumerate(zip(entry.factors, now))
                                   if old != new})
        entry.factors = now


def _build_plan(works: list) -> _CachedPlan:
    """A plan for the regions of every work the kernels can take."""
    K = _kernels()
    regions, region_map, rejected = [], [], []
    for i, work in enumerate(works):
        mine = _regions(work, K)
        if mine is None or not all(K.check_region(r) for r in mine):
            rejected.append(i)
            continue
        regions += mine
        base = work.grad.data_ptr()
        # _regions lists a work's operator regions first, in operator order
        region_map += [(i, None if r.factors is None else j, r.grad.data_ptr() - base) for j, r in enumerate(mine)]
    return _CachedPlan(K.AdamQ3RPlan(regions), region_map, rejected, _region_operators(works, region_map)[0])


def _region_operators(works: list, region_map: list) -> tuple[list, list]:
    """Per region of a plan: _operator_key of its factors and the factors (None, None without)."""
    ops_ = [None if j is None else works[i].operators[j] for i, j, _ in region_map]
    return [None if op is None else _operator_key(op) for op in ops_], ops_


def _plan_for(works: list) -> _CachedPlan:
    """The cached plan for this layout, its factor fields brought up to date, or a new one."""
    key = _layout_key(works)
    entry = _PLANS.get(key)
    if entry is None:
        return _cache(key, _build_plan(works))
    _follow_factors(entry, key, *_region_operators(works, entry.region_map))
    return entry


def _float32_tensor(t) -> bool:
    return isinstance(t, Tensor) and t.dtype == torch.float32


def _kernel_operator(f: tuple, device) -> tuple:
    """(U, V, d) or (U, V, sigma, eps) as the kernels read them (see add_reweighting_)."""
    U, V, d, *eps = f
    if not (d.dtype == torch.float32 and d.is_contiguous()):
        d = d.to(torch.float32).contiguous()
    if eps and not (_float32_tensor(eps[0]) and eps[0].device == device):
        eps = [torch.as_tensor(eps[0], dtype=torch.float32, device=device).reshape(())]
    return (U, V, d, *eps)


def adamq3r_fused_(works: list) -> list:
    """One AdamQ3R step (q3r.optim.functional arithmetic) for every work the Triton backend
    can take, in a few grouped launches; returns the works left for the reference path.

    A work is a q3r.optim.functional.ParamWork; its ``operators`` hold (U, V, d) or
    (U, V, sigma, eps) per slice. The Q3R term is evaluated at the weights before the step.
    The tables the kernels read are cached per layout (see _layout_key) and only their
    factor fields follow a refresh (see _operator_key), so a step in a steady training loop,
    refreshes included, costs little more Python than the launches themselves.
    """
    rest, taken, verdict, limit = [], [], {}, _width_limit()
    for work in works:
        p = work.param
        where = (p.device, p.dtype)
        if where not in verdict:
            verdict[where] = backend_for(p.device, p.dtype) == "triton"
        # (operators as the optimizer keeps them: float32 factors, d or sigma contiguous float32,
        # eps a tensor; another d raised ValueError in the kernels' plan, not taking this path)
        fits = all(op[0].dtype == op[1].dtype == torch.float32 and _float32_tensor(op[2]) and op[2].is_contiguous()
                   and (len(op) == 3 or _float32_tensor(op[3])) for op in work.operators)
        if verdict[where] and not fits:  # (forced: an error, as in project / add_reweighting_)
            _refuse_forced("the fused AdamQ3R step takes float32 factors, d or sigma as contiguous float32 and eps "
                           "as a float32 tensor, got "
                           + ", ".join(f"({', '.join(str(getattr(t, 'dtype', type(t).__name__)) for t in op)})"
                                       for op in work.operators))
        fits = fits and _width_ok(work.operators, limit)  # (before the workspace: that imports the kernels)
        if verdict[where] and fits and not _workspaces_fit(work.operators):
            _refuse_forced(f"the kernels' workspace for the factors of a {tuple(p.shape)} parameter lies 2**31 "
                           "elements or more past its first")
            fits = False
        if verdict[where] and fits:
            taken.append(work)
        else:
            rest.append(work)
    # one plan per device (see add_reweighting_), every one built and checked before any runs
    planned = [(_plan_for(group), group) for group in _by_device(taken, lambda w: w.param.device)]
    return rest + [w for entry, group in planned for w in _fused_step(entry, group)]


def _workspaces_fit(operators) -> bool:
    """Whether the kernels' int32 offsets reach every workspace piece of these slices (U is a
    slice's (rows, k), V its (cols, k))."""
    fits = _kernels()._meta.workspace_fits_int32
    return all(fits(op[0].shape[0], op[1].shape[0], op[0].shape[1]) for op in operators)


def _fused_step(entry: "_CachedPlan", taken: list) -> list:
    """Run a plan of adamq3r_fused_ for its works (on one device); returns those the plan
    rejected (a layout the kernels cannot read)."""
    region_map, rejected = entry.region_map, entry.rejected
    K = _kernels()
    hypers, memo = [], {}
    for work in taken:
        args = (work.lr, work.beta1, work.beta2, work.eps, work.weight_decay, float(work.step) + 1, work.lmbda)
        if args not in memo:  # groups usually share their scalars: build each row once
            memo[args] = (K.adam_hyper(*args[:-1]), K.adam_hyper(*args[:-1], scale=2.0 * work.lmbda))
        hypers.append(memo[args])
    grad_base = [w.grad.data_ptr() for w in taken]
    entry.plan.run([hypers[i][j is not None] for i, j, _ in region_map],
                   [grad_base[i] + offset for i, _, offset in region_map])
    skipped = set(rejected)
    done = [w for i, w in enumerate(taken) if i not in skipped]
    if done:  # (the plan may reject all: a channels_last conv weight alone, say)
        torch._foreach_add_([w.step for w in done], 1.0)  # the reference increments the same counter
    return [taken[i] for i in rejected]

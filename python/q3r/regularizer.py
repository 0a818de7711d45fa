"""Q3R as a regularizer for any optimizer (SGD, AdamW, ...).

Two honest modes, pick one per training step:

* ``loss = task_loss + reg.penalty()`` -- a differentiable lambda * sum <W, R(W)>; autograd
  adds 2 lambda R(W) to each target's gradient (R is self-adjoint, its factors are constants;
  for FSDP2-sharded targets a callback at the end of the backward pass adds it to the sharded
  ``.grad``, see q3r.distributed.sharded_penalty).
* ``reg.add_grad_()`` after ``backward()`` -- adds 2 lambda R(W) to ``.grad`` in place without
  autograd (coupled: the optimizer then sees it, e.g. in Adam's moments). ``reg.attach(opt)``
  makes ``opt.step()`` call it for you.

Each call counts one training step; the operator is refreshed inside it every ``steps``
steps (starting with the first), so the training loop needs no extra call.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import Tensor

from ._attach import AttachMixin, check_dense_grads, keyed_by_names, saved_targets
from ._compile import eager_under_compile
from . import ops, reference
from . import distributed
from ._precision import autocast_off, normal_tensors
from .config import Q3R_DEFAULTS, plain_values, slice_configs, validate_q3r_options
from .diagnostics import slice_diagnostics
from ._state_check import slice_state_problem
from .refresh import operator_of, refresh_around, sketch_options, upgrade_state
from .stagger import due_for_refresh, target_phases
from .targets import Target, slice_shapes, slice_views, target_list, warn_frozen

__all__ = ["Q3R"]

_SCALAR_OPTIONS = ("lmbda", "steps", "rank_rule", "eps_schedule", "eps_value", "eps_floor", "num_refreshes", "refresh", "stagger",
                   "refresh_options")


class Q3R(AttachMixin):
    """The Q3R regularizer over a list of :class:`q3r.Target` (see :func:`q3r.find_targets`),
    for any optimizer: :meth:`penalty` (a differentiable loss term), :meth:`add_grad_` (the
    term's gradient added to ``.grad``), or :meth:`attach` (add_grad_ inside every
    ``optimizer.step()``).

    Options (as AdamQ3R's group options; defaults in q3r.config.Q3R_DEFAULTS): lmbda (0.1),
    steps (5: refresh period), rank_rule, eps_schedule ("min"), eps_value, eps_floor,
    num_refreshes, refresh ("auto"), refresh_options (SketchOptions fields), stagger (False).
    Each target's rank is its ``target_rank`` (set by find_targets), not an option here.
    ``lmbda`` may be set between steps (``reg.lmbda = value``, checked as the constructor
    checks it). Targets frozen when it is built are named in one warning.
    """

    def __init__(self, targets: list[Target], **options):
        unknown = set(options) - set(_SCALAR_OPTIONS)
        if unknown:
            raise TypeError(f"Q3R got unknown arguments {sorted(unknown)}")
        self.options = plain_values({key: options.get(key, Q3R_DEFAULTS[key]) for key in _SCALAR_OPTIONS})
        validate_q3r_options({**Q3R_DEFAULTS, **self.options}, "Q3R")
        if self.options["refresh_options"] is not None:  # a copy: the caller's dict may change later
            self.options["refresh_options"] = dict(self.options["refresh_options"])
        # (Q3R(model.parameters()) or Q3R([layer.weight]) failed with "'Parameter' object has no
        # attribute 'param'", or with "distinct names, got [None, None]", which said neither)
        targets = target_list(targets, "Q3R")
        if not targets:
            raise ValueError("Q3R needs at least one target, got an empty list")
        names = [t.name for t in targets]
        if len(set(names)) != len(names) or len({id(t.param) for t in targets}) != len(targets):
            raise ValueError(f"Q3R targets must be distinct parameters with distinct names, got {names}")
        for t in targets:
            distributed.check_sharding(t.param, f"Q3R target {t.name}")
        warn_frozen(targets, "Q3R")
        self.targets = targets
        self.configs = [slice_configs(t.param.shape, self._target_options(t), t.slice_names()) for t in targets]
        self.state = {t.name: distributed.new_target_states(t.param, t.slice_dim, t.slices) for t in targets}
        self.num_steps = 0
        self._nonfinite_warned: set[str] = set()

    @property
    def lmbda(self) -> float:
        """lambda; may be set between steps (a warm-up of the term, as AdamQ3R's groups take a
        new ``lmbda`` written into param_groups), checked as the constructor checks it."""
        return self.options["lmbda"]

    @lmbda.setter
    def lmbda(self, value) -> None:
        validate_q3r_options({**Q3R_DEFAULTS, **self.options, "lmbda": value}, "Q3R")
        self.options["lmbda"] = plain_values(value)

    def _target_options(self, t: Target) -> dict:
        return {**Q3R_DEFAULTS, **self.options, "slices": t.slices, "slice_dim": t.slice_dim, "target_rank": t.target_rank}

    # ---------------------------------------------------------------- refresh
    @torch.no_grad()
    def refresh(self, names: set[str] | None = None, before_wait: Callable[[], None] | None = None) -> None:
        """Rebuild every target's operator (or only those in ``names``) from the current
        weights (done automatically).  ``before_wait``: see q3r.refresh.refresh_slices_."""
        chosen = [(t, cfgs) for t, cfgs in zip(self.targets, self.configs) if names is None or t.name in names]
        sharded = [(t, cfgs) for t, cfgs in chosen if distributed.is_sharded(t.param)]
        if sharded:  # FSDP2: a randomized refresh on the local rows (q3r.distributed.sharded_refresh)
            distributed.refresh_sharded_(
                [t.param for t, _ in sharded], [(t.slice_dim, t.slices) for t, _ in sharded],
                [self.state[t.name] for t, _ in sharded], [cfgs for _, cfgs in sharded], warned=self._nonfinite_warned,
            )
        weights, states, configs = [], [], []
        for t, cfgs in chosen:
            if distributed.is_sharded(t.param):
                continue
            weights.extend(slice_views(t.param.detach(), t.slice_dim, t.slices))
            states.extend(self.state[t.name])
            configs.extend(cfgs)
        # divided across ranks under DDP, plain refresh_slices_ otherwise
        distributed.refresh_slices_(weights, states, configs, method=self.options["refresh"],
                                    warned=self._nonfinite_warned, before_wait=before_wait,
                                    options=sketch_options(self.options["refresh_options"]))

    def _due_now(self) -> set[str]:
        """The targets refreshed at this step."""
        period = self.options["steps"]
        if self.options["stagger"]:  # each target at its own phase of the period
            phases = self._stagger_phases()
            return {name for name, phase in phases.items() if due_for_refresh(self.num_steps, period, phase)}
        return {t.name for t in self.targets} if self.num_steps % period == 0 else set()

    # (eager inside torch.compile: a compiled loss with penalty() in it traced the refresh and
    # recompiled it at every refresh; the penalty's own arithmetic is still compiled)
    @eager_under_compile
    def _begin_step(self, before_wait: Callable[[], None] | None = None) -> None:
        due = self._due_now()
        if due:
            self.refresh(due, before_wait)
        elif before_wait is not None:
            before_wait()
        self.num_steps += 1

    @eager_under_compile  # (see _begin_step)
    def _begin_penalty_step(self) -> None:
        """penalty()'s step, except while the autograd engine runs a backward pass: a penalty()
        called there is activation checkpointing recomputing the forward that held it, not a
        new training step. Counted there, a checkpointed loss with the penalty in it counted
        every step twice (refreshing at twice the rate), and a refresh due at the recompute
        gave the gradient other factors than the forward's value."""
        if _current_graph_task_id() == -1:
            self._begin_step()

    def _stagger_phases(self) -> dict[str, int]:
        """Refresh phase of each target, balancing the refresh cost over the period's steps with
        the targets of one stack kept together where that costs little (stagger.stagger_phases)."""
        if getattr(self, "_phases", None) is None:
            targets = [[(d1, d2, cfg.rank) for (d1, d2), cfg in zip(slice_shapes(t.param.shape, t.slice_dim, t.slices), cfgs)]
                       for t, cfgs in zip(self.targets, self.configs)]
            self._phases = dict(zip((t.name for t in self.targets), target_phases(targets, self.options["steps"])))
        return self._phases

    # ------------------------------------------------------------------ modes
    # (all in fp32 under the caller's autocast too: see q3r._precision)
    @autocast_off
    def penalty(self) -> Tensor:
        """lambda * sum over target slices of <W, R(W)>, differentiable in the weights.

        Each call counts one training step (and refreshes when due): under gradient
        accumulation, add it to one micro-batch's loss per optimizer step, or use attach.

        FSDP2-sharded targets: the value is the same on every rank; its gradient 2 lambda R(W)
        reaches the sharded ``.grad`` at the end of the backward pass, after FSDP2's gradient
        reduction (see q3r.distributed.sharded_penalty).

        DDP with ``find_unused_parameters=True`` refuses the penalty's gradient on a target the
        forward did not use at that step ("marked as ready twice"): use attach there
        (docs/distributed.md).

        Activation checkpointing that recomputes a forward holding the penalty
        (``torch.utils.checkpoint`` of a loss function) calls it again during the backward pass:
        that call is not counted and never refreshes."""
        self._begin_penalty_step()
        self._penalty_since_step = True  # (read by attach's hook: both modes in one step, see there)
        total = None
        sharded = [t for t in self.targets if distributed.is_sharded(t.param)]
        if sharded:
            total = distributed.sharded_penalty(
                [(t.param, t.slice_dim, t.slices, [operator_of(s) for s in self.state[t.name]]) for t in sharded])
        for t in self.targets:
            if distributed.is_sharded(t.param):
                continue
            for view, s in zip(slice_views(t.param, t.slice_dim, t.slices), self.state[t.name]):
                value = reference.penalty_value(view, *operator_of(s))
                total = value if total is None else total + value
        return self.lmbda * total

    @eager_under_compile  # (see _begin_step)
    @autocast_off
    @torch.no_grad()
    def add_grad_(self, *, grad_scale: float = 1.0) -> None:
        """Add 2 lambda R(W) to each target's ``.grad`` slice in place (targets without a
        gradient are skipped, as optimizers skip them). ``grad_scale``: the loss scale still in
        the gradients, by which the term is multiplied too (torch.amp.GradScaler's, where the
        optimizer unscales them itself; attach passes it). A bf16 / fp16 gradient takes the
        term scaled in float32 and rounded once."""
        if not (isinstance(grad_scale, (int, float)) and not isinstance(grad_scale, bool)
                and 0 < grad_scale < math.inf):
            raise ValueError(f"Q3R.add_grad_: grad_scale must be a finite number > 0, got {grad_scale!r}")
        with_grad = [t for t in self.targets if t.param.grad is not None]
        check_dense_grads(with_grad)  # (before the step is counted)
        if self.lmbda == 0 or any(distributed.is_sharded(t.param) for t in with_grad):
            self._begin_step()
            if self.lmbda != 0:
                self._add_grad_targets_(with_grad, grad_scale)
            return
        # the targets not refreshed now need nothing from the refresh: their terms are queued
        # as soon as its device work is, and run while the host waits for and decides its commits
        due = self._due_now()
        now, later = [t for t in with_grad if t.name not in due], [t for t in with_grad if t.name in due]
        refresh_around(
            self._begin_step, (lambda: self._add_grad_targets_(now, grad_scale)) if now else None,
            f"Q3R.add_grad_: the refresh failed after the gradients of the {len(now)} targets not being "
            f"refreshed had their terms added; the {len(later)} being refreshed did not",
        )
        if later:
            self._add_grad_targets_(later, grad_scale)

    def _add_grad_targets_(self, targets: list[Target], grad_scale: float = 1.0) -> None:
        alpha = 2.0 * self.lmbda * grad_scale
        sharded = [t for t in targets if distributed.is_sharded(t.param)]
        if sharded:  # FSDP2: local rows, one all-reduce for all targets
            distributed.sharded_add_grad_(
                [(t.param, t.slice_dim, t.slices, [operator_of(s) for s in self.state[t.name]], alpha)
                 for t in sharded],
                [t.param.grad for t in sharded],
            )
        weights, grads, factors = [], [], []
        for t in targets:
            if distributed.is_sharded(t.param):
                continue
            weights += slice_views(t.param.detach(), t.slice_dim, t.slices)
            grads += slice_views(t.param.grad, t.slice_dim, t.slices)
            factors += [(s["U"], s["V"], s["sigma"], s["eps"]) for s in self.state[t.name]]
        # all targets at once: grouped Triton launches on GPU, the reference loop elsewhere
        ops.add_reweighting_(grads, weights, factors, alpha)


    # ------------------------------------------------------------- inspection
    def diagnostics(self) -> dict[str, float]:
        """Per target slice: envelope rank, eps, sigma_{r+1}, effective rank, tail energy,
        penalty, as {"<name>/<metric>": float}. With FSDP2-sharded targets every rank must
        call it: each gathers the full weights, one at a time."""
        out: dict[str, float] = {}
        for t, cfgs in zip(self.targets, self.configs):
            pairs = distributed.diagnostic_slices(t.param, t.slice_dim, t.slices, self.state[t.name])
            for (view, s), cfg in zip(pairs, cfgs):
                for key, value in slice_diagnostics(view, s, cfg.rank, self.lmbda).items():
                    out[f"{cfg.name}/{key}"] = value
        return out

    # ----------------------------------------------------------- checkpointing
    def state_dict(self) -> dict:
        """Plain tensors and Python scalars only: loads with torch.load(weights_only=True)."""
        return {
            "num_steps": self.num_steps,
            "options": plain_values(self.options),  # (numpy scalars would need weights_only=False)
            "targets": {name: [dict(s) for s in slices] for name, slices in self.state.items()},
            "ranks": self._slice_ranks(),
        }

    def _slice_ranks(self) -> dict[str, list[int]]:
        """Each target's resolved rank per slice (its name: a list), as the options say which."""
        return {t.name: [cfg.rank for cfg in cfgs] for t, cfgs in zip(self.targets, self.configs)}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore factors and the step count; validates everything before changing anything.
        The options stay this regularizer's; where the checkpoint was saved with others, a
        warning names them (a checkpoint of a steps=5 run loaded into steps=3 said nothing)."""
        self._check_state_dict(state_dict)
        self._commit_state_dict(state_dict)
        self._warn_if_saved_with_other_options(state_dict, "Q3R.load_state_dict", stacklevel=3)

    def _warn_if_saved_with_other_options(self, state_dict: dict, where: str, stacklevel: int) -> None:
        differ = _changed_since_saved(state_dict, plain_values(self.options), self._slice_ranks())
        if differ:
            warnings.warn(f"{where}: the checkpoint was saved with other options (" + ", ".join(differ)
                          + "); this regularizer's are used, with the checkpoint's factors and step count",
                          RuntimeWarning, stacklevel=stacklevel)

    def _check_state_dict(self, state_dict: dict) -> None:
        # (None, a list or a "targets" that is no dict failed with AttributeError "'NoneType' object
        # has no attribute 'get'" or "'int' object is not iterable", naming no parameter)
        if not isinstance(state_dict, dict):
            raise TypeError(f"Q3R.load_state_dict: state_dict must be a dict (from Q3R.state_dict()), got "
                            f"{type(state_dict).__name__}")
        if not isinstance(state_dict.get("targets", {}), dict):
            raise ValueError(f"Q3R state_dict 'targets' must be a dict of per-target slice states, got "
                             f"{type(state_dict['targets']).__name__}")
        saved = saved_targets(state_dict, self.state)
        if saved is None:
            saved = state_dict.get("targets", {})
            raise ValueError(
                f"Q3R state_dict targets {sorted(map(str, saved))} do not match this regularizer's "
                f"{sorted(self.state)}: it comes from a different model"
            )
        for t in self.targets:
            if not isinstance(saved[t.name], (list, tuple)):
                raise ValueError(f"Q3R state_dict entry of {t.name} must be a list of slice states, got "
                                 f"{type(saved[t.name]).__name__}")
            shapes = slice_shapes(t.param.shape, t.slice_dim, t.slices)
            if len(saved[t.name]) != len(shapes):
                raise ValueError(f"Q3R state_dict has {len(saved[t.name])} slices for {t.name}, expected {len(shapes)}")
            for s, (d1, d2) in zip(saved[t.name], shapes):
                if (why := slice_state_problem(t.param, s, d1, d2)) is not None:
                    raise ValueError(f"Q3R state_dict {t.name}: {why}: it comes from a different model or is damaged")
        num_steps = state_dict.get("num_steps")
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
            raise ValueError(f"Q3R state_dict num_steps must be an int >= 0, got {num_steps!r}")

    # (normal tensors: copies made in a caller's inference_mode were inference tensors, which the
    # next training step's penalty() could not save for backward, "Inference tensors cannot be
    # saved for backward", until the next refresh replaced them)
    @normal_tensors()
    def _commit_state_dict(self, state_dict: dict) -> None:
        saved = saved_targets(state_dict, self.state)
        self.state = {
            t.name: [upgrade_state({k: v.detach().clone().to(t.param.device) for k, v in s.items()}, d1, d2)
                     for s, (d1, d2) in zip(saved[t.name], slice_shapes(t.param.shape, t.slice_dim, t.slices))]
            for t in self.targets
        }
        self.num_steps = state_dict["num_steps"]


def _changed_since_saved(state_dict: dict, options: dict, ranks: dict[str, list[int]]) -> list[str]:
    """'key saved -> now' for each option, and each target's per-slice ranks, that differ from a
    Q3R state dict's. (The ranks are the targets', not options: a rank-3 checkpoint loaded into a
    rank-5 regularizer said nothing, and its next refreshes set eps from the new rank.)"""
    saved = state_dict.get("options")
    saved = saved if isinstance(saved, dict) else {}
    differ = [f"{key} {saved[key]!r} -> {value!r}" for key, value in options.items() if key in saved and saved[key] != value]
    saved_ranks = state_dict.get("ranks")
    # (keyed as the targets are matched: a state saved under DDP's "module." names loads, and
    # its ranks, looked up by the unprefixed names, were never compared)
    saved_ranks = keyed_by_names(saved_ranks, ranks) or (saved_ranks if isinstance(saved_ranks, dict) else {})
    return differ + [f"target_rank of {name} {saved_ranks[name]!r} -> {now!r}" for name, now in ranks.items()
                     if isinstance(saved_ranks.get(name), (list, tuple)) and list(saved_ranks[name]) != now]


def _current_graph_task_id() -> int:
    """The id of the backward pass the autograd engine is running on this thread, -1 outside
    one (torch.utils.checkpoint asks the same private function; a torch without it: -1, so
    penalty() counts every call, as before this check existed)."""
    probe = getattr(torch._C, "_current_graph_task_id", None)
    return -1 if probe is None else probe()



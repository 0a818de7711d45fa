"""AdamQ3R: Adam with the Q3R rank regularizer applied as a decoupled term (SPEC sections 3-4)."""

from __future__ import annotations

import copy
import math
import numbers
import operator
import warnings
from collections.abc import Mapping
from typing import Callable

import torch
from torch.optim import Optimizer

from .._compile import eager_under_compile
from .. import distributed
from .._precision import no_autocast
from ..config import Q3R_DEFAULTS, default_names, is_plain, plain_values, slice_configs, validate_q3r_options
from ..diagnostics import slice_diagnostics
from .._state_check import slice_state_problem
from ..refresh import _Once, refresh_around, sketch_options, upgrade_state
from ..stagger import due_for_refresh, target_phases
from ..targets import slice_shapes, slice_views, validate_slices
from .functional import ParamWork, adamq3r_step_

__all__ = ["AdamQ3R"]


# torch.optim.Adam options AdamQ3R does not have (refused where true, as constructor arguments
# too): in a param group they would be ignored, and amsgrad / maximize change the update rule
_ADAM_ONLY_FLAGS = ("amsgrad", "maximize", "foreach", "fused", "capturable", "differentiable")
_Q3R_OPTIONS_OF = operator.itemgetter(*Q3R_DEFAULTS)  # a group's Q3R options, as a tuple
# the options that cut a group's targets into slices of some rank, which its Q3R state is made
# for (the others are read afresh at every step or refresh)
_CUT_OPTIONS = ("slices", "slice_dim", "target_rank", "rank_rule")


def _check_adam_flags(group: dict, where: str, flags: tuple[str, ...] = _ADAM_ONLY_FLAGS) -> None:
    """A group's torch.optim.Adam options that AdamQ3R does not have, and Adam's L2 decay.
    (A loaded checkpoint of torch's Adam / AdamW is checked for the update-changing ones only,
    amsgrad and maximize: foreach / fused there do not change its update.)"""
    for flag in flags:
        if group.get(flag):
            raise ValueError(f"{where}: {flag}={group[flag]!r}, which AdamQ3R does not have")
    if group.get("decoupled_weight_decay") is False and group.get("weight_decay"):
        raise ValueError(f"{where}: decoupled_weight_decay=False with weight_decay={group['weight_decay']} (Adam's "
                         "L2 decay, added to the gradient); AdamQ3R's weight decay is decoupled, as AdamW's")


def _check_target_dtype(p, index: int, where: str) -> None:
    """A Q3R target is a real floating-point weight. (A complex one was taken, and its first step
    failed inside the refresh, '"aminmax_cpu" not implemented for 'ComplexFloat'', after the
    parameters not being refreshed had been updated.)"""
    if not p.is_floating_point():
        raise TypeError(f"{where}: parameter {index} {tuple(p.shape)} is {p.dtype}; Q3R targets must be real "
                        "floating-point weights (the refresh's SVD and the term are real): leave it out of the "
                        "q3r=True groups")


def _check_hyperparameters(group: dict, where: str) -> None:
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


class AdamQ3R(Optimizer):
    """Adam whose ``q3r=True`` param groups are pushed towards low rank by Q3R.

    One step (SPEC section 3): every ``steps`` steps (starting with the first) each target's
    reweighting operator R is refreshed from an SVD of its current weights; then plain
    bias-corrected Adam on the task gradient, then W <- W - lr * 2 * lmbda * R(W_prev).
    ``weight_decay`` is decoupled (AdamW); :func:`q3r.param_groups` sets it to 0 on targets.

    Q3R group options (defaults in q3r.config.Q3R_DEFAULTS): lmbda (0.1), steps (5),
    target_rank (0.2; an int, a parameter fraction, or a list per slice), rank_rule ("params"
    or "reference"), eps_schedule ("min", "geometric", "track", "constant"), eps_value,
    eps_floor, num_refreshes, refresh ("auto" by default: the native Jacobi solver on CUDA when
    built, the randomized refresh elsewhere; "randomized", "native", or "exact" for full
    SVDs), refresh_options (a dict of q3r.refresh.SketchOptions fields for the randomized
    refresh), stagger (False: refresh every target at once every ``steps`` steps; True: a
    1/steps share at each step), slices + slice_dim (one slicing for every parameter of the
    group), names (one per slice, for diagnostics and errors). Any of them given to the
    constructor becomes the default of every group. An option written into ``param_groups``
    later (``lmbda`` by a schedule, as torch's schedulers write ``lr``) is checked at the next
    step, before any update: a bad value, or slices that no longer fit a target's Q3R state,
    raise ValueError. With ``stagger=True`` each group keeps the phases' clock as
    ``"stagger_clock"`` (and the clock of each parameter's last refresh as
    ``"stagger_refreshed"``), so state dicts, copies and pickles resume on the same steps.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        **q3r_defaults,
    ):
        # torch.optim.AdamW's own flags, as its kwargs or its .defaults carry them (foreach=None,
        # amsgrad=False, ...): taken where they ask for AdamQ3R's update, refused naming the flag
        # where they do not, as in a param group (all of them, even False, were "unknown arguments")
        adam_flags = {key: q3r_defaults.pop(key) for key in (*_ADAM_ONLY_FLAGS, "decoupled_weight_decay")
                      if key in q3r_defaults}
        _check_adam_flags({**adam_flags, "weight_decay": weight_decay}, "AdamQ3R")
        unknown = set(q3r_defaults) - set(Q3R_DEFAULTS) - {"q3r"}
        if unknown:
            raise TypeError(f"AdamQ3R got unknown arguments {sorted(unknown)}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, q3r=False)
        defaults.update(Q3R_DEFAULTS)
        defaults.update(plain_values(q3r_defaults))
        self._nonfinite_warned: set[str] = set()
        self._replicas: bool | None = None  # (see _decide_replicas)
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("q3r", False)
            for key, value in Q3R_DEFAULTS.items():
                group.setdefault(key, value)
        self.__dict__.setdefault("_nonfinite_warned", set())
        self.__dict__.setdefault("_replicas", None)

    # ----------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict) -> None:
        """Validate the whole group first, so a bad group leaves the optimizer untouched."""
        where = f"AdamQ3R param group {len(self.param_groups)}"
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        param_group["params"] = params  # (a generator is read once, here)
        # torch >= 2.6 takes (name, parameter) pairs; its add_param_group splits them below
        param_names = [q[0] for q in params] if params and all(isinstance(q, tuple) for q in params) else None
        params = [q[1] for q in params] if param_names is not None else params
        # (checked as they will be kept, plain values: a NumPy integer, target_rank=np.int64(2) or
        # steps from an np.arange sweep, was refused as "must be an int", while a NumPy float passed)
        merged = {**self.defaults, **param_group, **plain_values({key: param_group[key] for key in
                                                                  Q3R_DEFAULTS.keys() & param_group.keys()}),
                  "params": params}
        if param_names is not None:
            merged["param_names"] = param_names
        _check_adam_flags(merged, where)
        _check_hyperparameters(merged, where)
        if merged.get("q3r"):
            validate_q3r_options(merged, where)
            # (a parameter listed twice was refused as "slice names [...] are used twice",
            # which pointed at names the caller never gave)
            twice = next((i for i, p in enumerate(params) if any(q is p for q in params[:i])), None)
            if twice is not None:
                raise ValueError(f"{where}: parameter {twice} of the group is listed twice (a Q3R target is "
                                 "regularized once: list each parameter once)")
            names = []
            for index, p in enumerate(params):
                _check_target_dtype(p, index, where)
                if p.dim() == 2:  # (before _names counts the slices: a (start, stop, step) slice failed there
                    # with "too many values to unpack", naming neither the option nor the value)
                    validate_slices(p.shape, merged["slice_dim"], merged["slices"], f"{where} param {index}")
                p_names = self._names(merged, params, p, where)
                slice_configs(p.shape, merged, p_names)
                distributed.check_sharding(p, where)
                names += p_names
            self._check_names(merged, names, where)
        for key in Q3R_DEFAULTS.keys() & param_group.keys():  # (copies: the caller's dicts may change later)
            param_group[key] = plain_values(param_group[key])
        taken = self._taken_names() if merged.get("q3r") else None
        super().add_param_group(param_group)
        if taken is not None:
            self._names_taken = (len(self.param_groups), taken | set(names))

    @staticmethod
    def _names(group: dict, params, p, where: str) -> list[str]:
        """Slice names of parameter p: from the group's ``names`` (flat, per slice), else from
        its parameter name (groups of (name, parameter) pairs), else made up."""
        index = next(i for i, q in enumerate(params) if q is p)
        n_slices = len(slice_shapes(p.shape, group["slice_dim"], group["slices"])) if p.dim() == 2 else 1
        if group.get("names"):
            return list(group["names"][index * n_slices : (index + 1) * n_slices])
        if group.get("param_names"):
            return default_names(group["param_names"][index], group["slices"])
        return default_names(f"{where} param {index}", group["slices"])

    def _check_names(self, group: dict, names: list[str], where: str) -> None:
        """A new Q3R group's slice names: one per slice when given, none taken twice in the
        optimizer (diagnostics and warnings are keyed by them)."""
        given = group.get("names")
        # (a group without parameters ignores its names: ZeroRedundancyOptimizer gives every rank
        # a copy of each group, options and all, with only the parameters that rank updates)
        if given and group["params"] and len(given) != len(names):
            raise ValueError(f"{where}: names must give one name per slice ({len(names)} slices), got {len(given)} "
                             "(a wrapper that splits a group's parameters between ranks, as ZeroRedundancyOptimizer "
                             "does, cannot keep their names: make one group per target, as q3r.param_groups does)")
        taken = self._taken_names()
        clash = sorted({n for n in names if n in taken or names.count(n) > 1})
        if clash:
            raise ValueError(f"{where}: slice names {clash} are used twice; give each slice its own name")

    def _taken_names(self) -> set[str]:
        """The slice names of the Q3R groups so far (kept as groups are added: q3r.param_groups
        makes one group per target, and recounting them at every add was quadratic)."""
        cached = self.__dict__.get("_names_taken")
        if cached is None or cached[0] != len(self.param_groups):
            names = {name for gi, g in enumerate(self.param_groups) if g["q3r"] for q in g["params"]
                     for name in self._names(g, g["params"], q, f"AdamQ3R param group {gi}")}
            cached = self._names_taken = (len(self.param_groups), names)
        return cached[1]

    def _group_configs(self, group: dict, p):
        index = next(i for i, g in enumerate(self.param_groups) if g is group)
        where = f"AdamQ3R param group {index}"
        return slice_configs(p.shape, group, self._names(group, group["params"], p, where))

    # ------------------------------------------------------------------- step
    def _init_state(self, p, group) -> dict:
        state = self.state[p]
        # (float64: the refresh schedule reads it as an int, and a float32 count stops at 2**24)
        state["step"] = torch.tensor(0.0, dtype=torch.float64)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _new_q3r_state(self, p, group: dict, state: dict) -> bool:
        """Create p's slice states where it has none (its first step; or its group was turned
        to ``q3r=True`` after steps without, or its Adam state was loaded from torch's Adam /
        AdamW); returns whether it did: such a target is refreshed at once, not left with the
        identity operator until the period comes round."""
        if "q3r" in state:
            return False
        state["q3r"] = distributed.new_target_states(p, group["slice_dim"], group["slices"])
        return True

    def _check_new_target(self, p, group: dict) -> None:
        """The options of a target about to get its slice states (a group switched to
        q3r=True later was not checked when it was added)."""
        index = next(i for i, g in enumerate(self.param_groups) if g is group)
        validate_q3r_options(group, f"AdamQ3R param group {index}")
        _check_target_dtype(p, next(i for i, q in enumerate(group["params"]) if q is p), f"AdamQ3R param group {index}")
        self._group_configs(group, p)


    def _check_changed_options(self, gi: int, group: dict) -> None:
        """A Q3R group's options where they changed since the last step (a scheduler writing
        ``lmbda`` into param_groups, as torch's schedulers write ``lr``; a hand edit): checked as
        add_param_group checks them, and slices that no longer fit the Q3R state the group's
        parameters hold are refused, all before any update. (Unchecked, lmbda=nan turned the
        weights to NaN, a negative lmbda was used, steps=0 raised ZeroDivisionError, and new
        slices failed inside the update with some parameters updated.) Compared by value with
        the last options seen; a step where nothing changed costs one tuple comparison."""
        seen = self.__dict__.setdefault("_options_seen", {})
        try:
            now = _Q3R_OPTIONS_OF(group)
        except KeyError:  # (a group loaded from an older checkpoint may lack later options)
            now = tuple(group.get(key) for key in Q3R_DEFAULTS)
        last = seen.get(gi)  # (by index: a load replaces the groups, and old ones must not be kept alive)
        if last is not None and last[0] is group and _same_options(last[1], now):
            return
        where = f"AdamQ3R param group {gi}"
        validate_q3r_options(group, where)
        structural = last is None or last[0] is not group or any(
            a != b for key, a, b in zip(Q3R_DEFAULTS, last[1], now) if key in (*_CUT_OPTIONS, "names"))
        if structural:
            for p in group["params"]:
                self._group_configs(group, p)  # (slices in bounds, one name per slice, ranks in range)
                slices = (self.state.get(p) or {}).get("q3r")
                if slices is not None and (why := _slice_states_misfit(p, group, slices)):
                    index = next(i for i, q in enumerate(group["params"]) if q is p)
                    raise ValueError(
                        f"{where}: slice_dim={group['slice_dim']!r}, slices={group['slices']!r} do not fit the Q3R "
                        f"state that earlier steps made for parameter {index} {tuple(p.shape)} ({why}); put the "
                        "slicing back, or build a new optimizer for the new one")
        # kept as plain values, as add_param_group keeps them: a NumPy lambda from a warm-up sweep
        # (np.linspace) left in the group made torch.load(weights_only=True) refuse the checkpoint
        # (only those that are not: a list the caller still holds stays the group's)
        group.update({key: plain_values(group[key]) for key in Q3R_DEFAULTS if key in group and not is_plain(group[key])})
        seen[gi] = (group, copy.deepcopy(tuple(group.get(key) for key in Q3R_DEFAULTS)))

    def refresh(self, due: list[tuple[torch.Tensor, dict]], before_wait: Callable[[], None] | None = None) -> None:
        """Refresh the factors of the given (parameter, group) pairs from their current weights.

        ``before_wait`` (called once) is queued where the refresh would first wait for the
        device (see q3r.refresh.refresh_slices_); under DDP after the refresh."""
        before_wait = _Once(before_wait)
        sharded = [(p, group) for p, group in due if distributed.is_sharded(p)]
        if sharded:  # FSDP2: a randomized refresh on the local rows (q3r.distributed.sharded_refresh)
            distributed.refresh_sharded_(
                [p for p, _ in sharded], [(g["slice_dim"], g["slices"]) for _, g in sharded],
                [self.state[p]["q3r"] for p, _ in sharded], [self._group_configs(g, p) for p, g in sharded],
                warned=self._nonfinite_warned,
            )
            due = [(p, group) for p, group in due if not distributed.is_sharded(p)]
        by_method: dict[str, tuple[list, list, list]] = {}
        for p, group in due:
            views = slice_views(p.detach(), group["slice_dim"], group["slices"])
            options = group.get("refresh_options")
            key = (group["refresh"], None if options is None else tuple(sorted(options.items())))
            bucket = by_method.setdefault(key, ([], [], []))
            bucket[0].extend(views)
            bucket[1].extend(self.state[p]["q3r"])
            bucket[2].extend(self._group_configs(group, p))
        for (method, options), (weights, states, configs) in by_method.items():
            # divided across ranks under DDP, plain refresh_slices_ otherwise
            distributed.refresh_slices_(weights, states, configs, method=method, warned=self._nonfinite_warned,
                                        before_wait=before_wait,
                                        options=sketch_options(None if options is None else dict(options)),
                                        replicated=self._replicas)
        before_wait()

    def _decide_replicas(self) -> None:
        """Under DDP every rank's optimizer holds the same targets, and a refresh divides their
        work across the ranks (q3r.distributed). Under ZeroRedundancyOptimizer (AdamQ3R as its
        local optimizer) each rank holds a share of them, some ranks none at all: dividing that
        work raised, or waited for ever on a rank with nothing due. Decided once, at the first
        step with a process group up, by one all_gather of the count and a checksum of this
        optimizer's target names and shapes on every rank (every rank's optimizer steps, and
        ZeRO gives each rank every param group, empty ones too): where they differ, each rank
        refreshes its own targets, as configure(replicated=False) does for a whole process."""
        if self._replicas is not None or not distributed.is_replicated_distributed():
            return
        if not any(g["q3r"] for g in self.param_groups):
            return
        # (FSDP2: every rank holds every target, as a DTensor; ZeroRedundancyOptimizer takes none)
        if any(distributed.is_sharded(p) for g in self.param_groups if g["q3r"] for p in g["params"]):
            self._replicas = True
            return
        # (by group and position too: groups without names get made-up ones, alike on every rank)
        targets = [(f"{gi}.{j}:{','.join(self._names(g, g['params'], p, 'AdamQ3R'))}", tuple(p.shape))
                   for gi, g in enumerate(self.param_groups) if g["q3r"] for j, p in enumerate(g["params"])]
        self._replicas = distributed.same_targets_on_every_rank(targets)

    def _refresh_due(self, p, group: dict, step: int, clock: int | None, phases: dict[int, int] | None,
                     index: int) -> bool:
        """Every ``steps`` of the parameter's steps; with ``stagger=True`` each parameter at its
        own phase of the period on the optimizer's clock (see _stagger_clock), balanced by
        refresh cost over all staggered groups with the same period, with the targets of one
        stack kept in as few phases as the balance allows (stagger.stagger_phases)
        (q3r.param_groups makes one group per target, so balancing within a group would
        leave every target at phase 0), so no step pays all refreshes. ``phases``: the
        step's _stagger_phase_table(), looked up once per step by the caller (its signature
        walks every staggered group's parameters: looked up per target, a step cost
        quadratic host time in the number of targets). A staggered target is also due where a
        period or more of the clock has passed since its last refresh (``index``: its place in
        the group, see _note_staggered_refresh): the clock counts the optimizer's steps, and a
        target without a gradient at its phase (targets trained in turns, period 4: half of
        them never) was not refreshed again until it happened to have one there."""
        if not group.get("stagger"):
            return step % group["steps"] == 0
        if due_for_refresh(clock, group["steps"], phases[id(p)]):
            return True
        last = _last_staggered_refresh(group, index)
        return last is not None and clock - last >= group["steps"]

    def _stagger_clock(self) -> int:
        """The step the staggered phases count on: one clock for all targets. (Each parameter's
        own step count would not do: a target added later, or one whose gradient was None at
        some steps, counts behind the others, and its phase would land on the others'.) Kept
        as the optimizer steps, and in each staggered group as ``"stagger_clock"`` (so a state
        dict, a copy or a pickle of the optimizer carries it); after a load, unpickling or
        states written in by a wrapper, the largest of those and of any parameter's step count.
        (The step counts alone fell behind where no parameter had a gradient at every step,
        targets trained in turns: a resumed run's refreshes then fell on other steps.)"""
        clock = self.__dict__.get("_clock")
        if clock is None:
            saved = (g.get("stagger_clock") for g in self.param_groups)
            clock = max([*(int(st["step"]) for st in self.state.values() if isinstance(st, dict) and "step" in st),
                         *(int(c) for c in saved if isinstance(c, numbers.Integral) and not isinstance(c, bool))],
                        default=0)
        return clock

    def _stagger_phase_table(self) -> dict[int, int]:
        """{id(param): phase}, recomputed only when the staggered groups change."""
        staggered = [g for g in self.param_groups if g["q3r"] and g.get("stagger")]
        signature = tuple((id(g), g["steps"], tuple(id(q) for q in g["params"])) for g in staggered)
        cached = self.__dict__.get("_stagger_cache")
        if cached is not None and cached[0] == signature:
            return cached[1]
        table: dict[int, int] = {}
        for period in {g["steps"] for g in staggered}:
            members = [(q, g) for g in staggered if g["steps"] == period for q in g["params"]]
            targets = [[(d1, d2, cfg.rank) for (d1, d2), cfg in
                        zip(slice_shapes(q.shape, g["slice_dim"], g["slices"]), self._group_configs(g, q))]
                       for q, g in members]
            table.update({id(q): phase for (q, _), phase in zip(members, target_phases(targets, period))})
        self._stagger_cache = (signature, table)
        return table

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # the caller's forward pass: under the caller's autocast, if any
            with torch.enable_grad():
                loss = closure()
        with no_autocast():  # q3r's own math in fp32 (q3r._precision)
            self._step()
        return loss

    # (run eagerly inside torch.compile(optimizer.step): traced, the refresh's host logic and the
    # kernels' launches recompiled at every refresh, 16.8-18.7 s for 10 steps of a 2-layer MLP on the
    # CPU against well under 1 s eagerly; the update is one fused pass already)
    @eager_under_compile
    def _step(self) -> None:
        self._adopt_written_states()
        if not any(g["q3r"] for g in self.param_groups) and not self.__dict__.get("_no_target_warned"):
            self._no_target_warned = True  # (AdamQ3R(model.parameters()) is AdamW: say so, once)
            warnings.warn("AdamQ3R has no q3r=True param group, so it steps as AdamW with no Q3R term; build the "
                          "groups with q3r.param_groups(model, q3r.find_targets(model, ...))", stacklevel=4)
        # (every check before any update; this loop runs every step, so each attribute is read once)
        for gi, group in enumerate(self.param_groups):
            if group["q3r"]:
                self._check_changed_options(gi, group)
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    self._refuse_sparse_grad(p, g, group)
                if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                    self._refuse_grad(p, g, group)
                state = self.state.get(p)
                if group["q3r"] and (not state or "q3r" not in state):
                    self._check_new_target(p, group)  # (all before any state is made)
                if state:
                    self._check_state_follows(p, state)
        self._decide_replicas()
        works, due, q3r_works, noted = [], [], [], {}
        clock = self._stagger_clock() if any(g["q3r"] and g.get("stagger") for g in self.param_groups) else None
        phases = self._stagger_phase_table() if clock is not None else None  # (once per step, see _refresh_due)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self.state[p] or self._init_state(p, group)
                work = ParamWork(
                    p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"],
                    group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                )
                if group["q3r"]:
                    if (self._new_q3r_state(p, group, state)
                            or self._refresh_due(p, group, int(state["step"]), clock, phases, index)):
                        due.append((p, group))
                        if clock is not None and group.get("stagger"):
                            noted.setdefault(id(group), (group, []))[1].append(index)
                    work.lmbda, work.slice_dim, work.slices = group["lmbda"], group["slice_dim"], group["slices"]
                    q3r_works.append((work, state))
                works.append(work)
        if clock is not None and works:  # (a step with no gradient at all steps nothing: a
            self._clock = clock + 1       # clock rebuilt from the step counts after a load skips it too)
            for group in self.param_groups:  # (kept where state_dict, copies and pickles carry it)
                if group["q3r"] and group.get("stagger"):
                    group["stagger_clock"] = clock + 1
        for group, indices in noted.values():
            _note_staggered_refreshes(group, indices, clock)
        if any(distributed.is_sharded(w.param) for w in works):
            self.refresh(due)
            self._set_operators(q3r_works)
            distributed.sharded_adamq3r_step_(works)  # FSDP2: local shards, one all-reduce per step
            return
        # The parameters not refreshed now need nothing from the refresh: their updates are
        # queued as soon as the refresh's device work is, and run while the host waits for
        # and decides its commits (a staggered refresh leaves most targets out).
        refreshed = {id(p) for p, _ in due}
        later = [w for w in works if id(w.param) in refreshed]
        now = [w for w in works if id(w.param) not in refreshed]
        self._set_operators([(w, st) for w, st in q3r_works if id(w.param) not in refreshed])
        refresh_around(
            lambda before_wait: self.refresh(due, before_wait=before_wait),
            (lambda: adamq3r_step_(now)) if now else None,
            f"AdamQ3R.step: the refresh failed after the {len(now)} parameters not being refreshed had been "
            f"updated; the {len(later)} being refreshed were not",
        )
        self._set_operators([(w, st) for w, st in q3r_works if id(w.param) in refreshed])
        if later:
            adamq3r_step_(later)

    def _refuse_sparse_grad(self, p, g, group: dict) -> None:
        """A sparse gradient (nn.Embedding(sparse=True)), refused naming its parameter (the message
        named none: in a model of several embeddings, which one?)."""
        gi = next(i for i, q in enumerate(self.param_groups) if q is group)
        index = next(i for i, q in enumerate(group["params"]) if q is p)
        raise RuntimeError(
            f"AdamQ3R param group {gi}, parameter {index} {tuple(p.shape)}: its gradient is sparse; AdamQ3R, as "
            "torch.optim.Adam, takes dense gradients only: build the layer with sparse=False, or step that parameter "
            "with torch.optim.SparseAdam")

    def _refuse_grad(self, p, g, group: dict) -> None:
        """p's gradient g lacks p's shape, dtype or device (torch's ``.grad`` setter refuses
        those, but ``.grad.data = ...`` or a ``grad_dtype`` set on the parameter gets them
        there): the update failed on it with an error of the arithmetic ("expected dtype
        c10::BFloat16 for `end`"), after the parameters before it had been updated and had
        their step counted. Refused before any update, naming the parameter."""
        gi = next(i for i, q in enumerate(self.param_groups) if q is group)
        index = next(i for i, q in enumerate(group["params"]) if q is p)
        raise ValueError(
            f"AdamQ3R param group {gi}, parameter {index} ({tuple(p.shape)}, {p.dtype} on {p.device}): its gradient "
            f"is {tuple(g.shape)}, {g.dtype} on {g.device}; AdamQ3R needs a gradient of the parameter's shape, dtype "
            "and device (as torch.optim.Adam does)")

    def _check_state_follows(self, p, state: dict) -> None:
        """p's state where p is now: a model cast (model.to(torch.bfloat16)) or moved after
        steps leaves its Adam moments and factors behind; refused before any update, naming
        the parameter, rather than failing inside one with some parameters updated.  (Every
        step, for every parameter: the moments and factors are made, loaded and moved together,
        so one of each is looked at.)"""
        moment, slices = state.get("exp_avg"), state.get("q3r")
        factor = slices[0].get("U") if isinstance(slices, list) and slices and isinstance(slices[0], dict) else None
        if moment is not None and (moment.dtype != p.dtype or moment.device != p.device):
            key, t = "exp_avg", moment
        elif factor is not None and factor.device != p.device:
            key, t = "U", factor
        else:
            return
        gi, index = next((gi, i) for gi, g in enumerate(self.param_groups) for i, q in enumerate(g["params"]) if q is p)
        raise ValueError(
            f"AdamQ3R param group {gi}, parameter {index} ({tuple(p.shape)}, {p.dtype} on {p.device}): its state "
            f"{key} is {t.dtype} on {t.device}; the model was cast or moved after the optimizer took steps. Cast or "
            "move it before building the optimizer, or save the optimizer's state_dict and load it into one built "
            "after the change (load_state_dict casts the moments)")

    @staticmethod
    def _set_operators(q3r_works: list) -> None:
        for work, state in q3r_works:
            work.operators = [(s["U"], s["V"], s["sigma"], s["eps"]) for s in state["q3r"]]

    # ------------------------------------------------------------ diagnostics
    def diagnostics(self) -> dict[str, float]:
        """Per target slice: envelope rank, eps, sigma_{r+1}, effective rank, penalty,
        energy outside the target rank; flat {"<name>/<metric>": float} for loggers. With
        FSDP2-sharded parameters every rank must call it: each gathers the full weights, one
        at a time."""
        self._adopt_written_states()
        out: dict[str, float] = {}
        for group in self.param_groups:
            if not group["q3r"]:
                continue
            for p in group["params"]:
                state = self.state.get(p)
                # before its first step a target has the identity operator (eps = inf), as Q3R's
                # before its first penalty / add_grad_: reported as such, not left out
                slices = (state["q3r"] if state and "q3r" in state
                          else distributed.new_target_states(p, group["slice_dim"], group["slices"]))
                pairs = distributed.diagnostic_slices(p, group["slice_dim"], group["slices"], slices)
                for (view, s), cfg in zip(pairs, self._group_configs(group, p)):
                    for key, value in slice_diagnostics(view, s, cfg.rank, group["lmbda"]).items():
                        out[f"{cfg.name}/{key}"] = value
        return out

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """torch's, with each target's slice states as a dict keyed "0", "1", ... rather than a
        list: torch.distributed.checkpoint's flatten_optimizer_state_dict (torchtitan,
        OLMo-core) takes nested dicts, not lists. load_state_dict takes either layout."""
        sd = super().state_dict()
        sd["state"] = {pid: {**st, "q3r": {str(j): s for j, s in enumerate(st["q3r"])}}
                       if isinstance(st.get("q3r"), list) else st for pid, st in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load_state_dict, after checks that refuse a state dict from another model,
        or a damaged one, before anything changes, and with the float32 factors kept out of
        torch's cast of the state to the parameters' dtype.

        A state dict of ``torch.optim.Adam`` / ``AdamW`` (same groups and parameters) loads
        too: its groups keep this optimizer's Q3R options, the Adam moments carry over, and
        each target is refreshed at its next step.  Where the checkpoint's slices, slice_dim,
        target_rank or rank_rule differ from this optimizer's it warns, naming group, option
        and both values: the checkpoint's options win, as in torch, and the Q3R state is theirs.
        (A method, not load hooks: hooks are not kept by copy.deepcopy or pickling of an
        optimizer.)"""
        state_dict, stash = self._checked_for_load(state_dict)
        replaced = _replaced_options(self.param_groups, state_dict["param_groups"])
        super().load_state_dict(state_dict)
        if replaced:  # (torch's rule: the saved options win; said where they cut the targets otherwise)
            warnings.warn("AdamQ3R.load_state_dict: the checkpoint's options replace this optimizer's, as torch's "
                          "optimizers do, and these cut the targets otherwise: " + "; ".join(replaced) + ". The Q3R "
                          "state is the checkpoint's, for its options; to train with new ones, build a new optimizer",
                          RuntimeWarning, stacklevel=2)
        self.__dict__.pop("_names_taken", None)  # (the saved groups' names replace these)
        self.__dict__.pop("_clock", None)  # (counted again from the loaded step counts)
        for p, slices, shapes in stash:
            self.state[p]["q3r"] = _live_slice_states(p, slices, shapes)

    def _adopt_written_states(self) -> None:
        """Slice states that a wrapper wrote into ``self.state`` in the saved layout, bypassing
        load_state_dict: ZeroRedundancyOptimizer.load_state_dict copies each rank's share of
        the saved state straight in (and moves 0-dim tensors to the CPU). They are checked as
        load_state_dict checks them, all before any is changed, then put in the live layout on
        their parameter's device."""
        found = []
        for gi, group in enumerate(self.param_groups):
            if not group["q3r"]:  # (no slice states there; this runs at every step)
                continue
            for p in group["params"]:
                st = self.state.get(p)
                if isinstance(st, dict) and isinstance(st.get("q3r"), Mapping):
                    listed = _listed(st, f"AdamQ3R param group {gi}")
                    self._check_saved_param_state(listed, p, {**self.defaults, **group}, f"group {gi}")
                    found.append((p, listed["q3r"], slice_shapes(p.shape, group["slice_dim"], group["slices"])))
        for p, slices, shapes in found:
            self.state[p]["q3r"] = _live_slice_states(p, slices, shapes)
        if found:
            self.__dict__.pop("_clock", None)  # (the written states carry their step counts)

    def _checked_for_load(self, state_dict: dict) -> tuple[dict, list]:
        """(the state dict to hand to torch's load: groups of torch's Adam / AdamW given this
        optimizer's Q3R options, the Q3R states taken out; [(param, slice states, slice shapes)]
        to put back after it), or a ValueError before anything changes."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} param groups but this optimizer has "
                f"{len(self.param_groups)}: it comes from a different model or optimizer"
            )
        groups, mapping = [], {}
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"state_dict param group {gi} has {len(saved['params'])} parameters, this optimizer's has "
                    f"{len(group['params'])}: it comes from a different model or optimizer"
                )
            if "q3r" not in saved:  # torch.optim.Adam / AdamW
                saved = self._adopted_group(saved, group, f"state_dict param group {gi}")
            missing = [key for key in ("lr", "betas", "eps", "weight_decay") if key not in saved]
            if missing:  # (torch's load took such a group and its next step failed with a KeyError)
                raise ValueError(f"state_dict param group {gi} lacks {missing}: it is damaged")
            if saved.get("q3r"):
                # a Q3R option the saved group lacks (a checkpoint from before the option existed,
                # or an edited one) keeps this optimizer's value: torch's load, then __setstate__,
                # gave it the library default instead, e.g. lmbda 0.1 where the run was built with 0.5
                saved = {**{key: group[key] for key in Q3R_DEFAULTS if key not in saved}, **saved}
            groups.append(saved)
            merged = {**self.defaults, **saved}
            _check_hyperparameters(merged, f"state_dict param group {gi}")
            for pid, p in zip(saved["params"], group["params"]):
                mapping[pid] = (p, merged)
        states = {pid: _listed(st, f"state_dict param {pid}") for pid, st in state_dict["state"].items()}
        for pid, (p, merged) in mapping.items():
            gi = next(i for i, g in enumerate(groups) if pid in g["params"])
            self._check_saved_param_state(states.get(pid), p, merged, f"group {gi}")
        stash, new_state = [], {}
        for pid, st in states.items():
            if isinstance(st, dict) and "q3r" in st:
                st = dict(st)
                p, merged = mapping[pid]
                stash.append((p, st.pop("q3r"), slice_shapes(p.shape, merged["slice_dim"], merged["slices"])))
            new_state[pid] = st
        return {**state_dict, "param_groups": groups, "state": new_state}, stash

    @staticmethod
    def _adopted_group(saved: dict, group: dict, where: str) -> dict:
        """A saved group of torch's Adam / AdamW with this group's Q3R options, where its
        update is the one AdamQ3R makes (no amsgrad, no maximize, decoupled weight decay)."""
        _check_adam_flags(saved, where, flags=("amsgrad", "maximize"))
        if saved.get("weight_decay") and "decoupled_weight_decay" not in saved:  # (torch < 2.8 does not say)
            warnings.warn(f"{where}: a torch.optim checkpoint with weight_decay={saved['weight_decay']} that does not "
                          "say whether it was Adam's L2 decay or AdamW's decoupled one; AdamQ3R applies it decoupled",
                          RuntimeWarning, stacklevel=4)
        return {**{key: group[key] for key in ("q3r", *Q3R_DEFAULTS)}, **saved}

    @staticmethod
    def _check_saved_param_state(st, p, group: dict, where: str) -> None:
        if st is None:
            return
        if not isinstance(st, dict):
            raise ValueError(f"state_dict {where}: a parameter's state must be a dict, got {type(st).__name__}")
        # Adam's own entries: a state without one loaded and failed at the next step with a
        # KeyError; a negative step count failed inside the update, after the parameters before
        # it had been updated (a complex bias correction)
        missing = [key for key in ("step", "exp_avg", "exp_avg_sq") if key not in st]
        if st and missing:
            raise ValueError(f"state_dict {where}: a parameter's state lacks {missing} (keys: {sorted(st)}): it is damaged")
        if st and (why := _step_problem(st["step"])):
            raise ValueError(f"state_dict {where}: the step count {why}: it is damaged")
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st and (not isinstance(st[key], torch.Tensor) or tuple(st[key].shape) != tuple(p.shape)):
                got = tuple(st[key].shape) if isinstance(st[key], torch.Tensor) else type(st[key]).__name__
                raise ValueError(
                    f"state_dict {where}: {key} is {got} but the parameter has shape "
                    f"{tuple(p.shape)}: it comes from a different model"
                )
        if not group.get("q3r"):
            if "q3r" in st:
                raise ValueError(f"state_dict {where}: Q3R state for a parameter of a non-Q3R group")
            return
        validate_q3r_options(group, f"state_dict {where}")
        # the saved group's slices and target_rank must fit the parameter (a target_rank of 100
        # for a 16x8 weight loaded, and the next refresh or diagnostics() raised)
        if p.dim() == 2:
            label = f"state_dict {where} param {tuple(p.shape)}"
            slice_configs(p.shape, group, default_names(label, validate_slices(p.shape, group["slice_dim"],
                                                                              group["slices"], label)))
        slices = st.get("q3r", [])
        if not isinstance(slices, (list, tuple)):
            raise ValueError(f"state_dict {where}: the Q3R state must be a list of slice states, got {type(slices).__name__}")
        if "q3r" in st and (why := _slice_states_misfit(p, group, slices)):
            raise ValueError(f"state_dict {where}: {why}: it comes from a different model or is damaged")


def _same_options(a: tuple, b: tuple) -> bool:
    """Whether two snapshots of a group's options are equal; False where they cannot be compared
    (a tensor of several elements written into an option, which the check then refuses)."""
    try:
        return bool(a == b)
    except RuntimeError:
        return False


def _slice_states_misfit(p, group: dict, slices) -> str | None:
    """Why the slice states ``slices`` do not fit parameter p cut as ``group`` cuts it (their
    count, or slice_state_problem of one), or None. Asked of a loaded state and of a live one
    whose group's slicing was changed after steps."""
    shapes = slice_shapes(p.shape, group["slice_dim"], group["slices"])
    if len(slices) != len(shapes):
        return f"{len(slices)} Q3R slice states for {len(shapes)} slices of {shapes}"
    return next((why for s, (d1, d2) in zip(slices, shapes) if (why := slice_state_problem(p, s, d1, d2))), None)


def _replaced_options(groups: list[dict], saved_groups: list[dict]) -> list[str]:
    """'group i: key this -> saved' for each option of a Q3R group that decides its targets'
    slices and ranks and that a loaded group replaces with another value (slices compared as
    pairs: a checkpoint may hold them as lists)."""
    def plain(key, value):
        return [tuple(pair) for pair in value] if key == "slices" and value is not None else value

    return [f"group {gi}: {key} {group.get(key)!r} -> {saved.get(key)!r}"
            for gi, (group, saved) in enumerate(zip(groups, saved_groups)) if group.get("q3r") and saved.get("q3r")
            for key in _CUT_OPTIONS
            if key in saved and plain(key, group.get(key)) != plain(key, saved[key])]


def _step_problem(step) -> str | None:
    """Why a saved Adam step count is not one (None: it is): a finite whole number >= 0, as a
    number or a one-element real tensor."""
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.is_complex() or step.dtype == torch.bool:
            return f"must be a one-element real tensor, got {step.dtype} of shape {tuple(step.shape)}"
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, (int, float)):
        return f"must be a number, got {type(step).__name__}"
    if not (math.isfinite(step) and step >= 0 and step == int(step)):
        return f"must be a whole number >= 0, got {step!r}"
    return None


def _note_staggered_refreshes(group: dict, indices: list[int], clock: int) -> None:
    """Record in a staggered group, as ``"stagger_refreshed"`` (the clock of each of its
    parameters' last refresh, -1 where none was seen), that its parameters ``indices`` are
    refreshed at ``clock``: plain ints in the group, so that state dicts, copies and pickles carry
    them with the clock (a tensor in the parameter's state would be cast to a bf16 parameter's
    dtype on load, and read back from the device at every step). A new list, not changed in
    place: torch's state_dict() copies a group's dict, not its values, and an earlier state
    dict kept in memory must not move on with the optimizer."""
    seen = group.get("stagger_refreshed")
    fits = isinstance(seen, list) and len(seen) == len(group["params"])  # (else new, or the params changed)
    seen = list(seen) if fits else [-1] * len(group["params"])
    for index in indices:
        seen[index] = clock
    group["stagger_refreshed"] = seen


def _last_staggered_refresh(group: dict, index: int) -> int | None:
    """The clock of the parameter's last staggered refresh, or None where it is not known (a
    checkpoint from before it was kept, or a group whose parameters changed since)."""
    seen = group.get("stagger_refreshed")
    if not isinstance(seen, list) or len(seen) != len(group["params"]):
        return None
    last = seen[index]
    return last if isinstance(last, int) and not isinstance(last, bool) and last >= 0 else None


def _live_slice_states(p, slices, shapes) -> list[dict]:
    """Saved slice states as the optimizer keeps them: copies on p's device, upgraded from
    older layouts."""
    return [upgrade_state({key: value.detach().clone().to(device=p.device) for key, value in s.items()}, d1, d2)
            for s, (d1, d2) in zip(slices, shapes)]


def _listed(st, where: str):
    """A saved parameter state with its slice states as a list: state_dict writes them as a
    dict keyed "0", "1", ... (earlier versions, and callers, may give the list itself)."""
    slices = st.get("q3r") if isinstance(st, dict) else None
    if not isinstance(slices, Mapping):
        return st
    if set(slices) != {str(j) for j in range(len(slices))}:
        raise ValueError(f"{where}: the Q3R slice states must be keyed '0' .. 'n-1', got keys {sorted(slices, key=str)}")
    return {**st, "q3r": [slices[str(j)] for j in range(len(slices))]}

"""AdamQ3R: Adam with the Q3R rank regularizer applied as a decoupled term (SPEC sections 3-4)."""

from __future__ import annotations

import copy
import operator
import warnings
from typing import Callable

import torch
from torch.optim import Optimizer

from .._compile import eager_under_compile
from .. import distributed
from .._precision import no_autocast
from ..config import Q3R_DEFAULTS, default_names, is_plain, plain_values, slice_configs, validate_q3r_options
from ..diagnostics import slice_diagnostics
from ..refresh import _Once, refresh_around, sketch_options
from ..targets import slice_shapes, slice_views, validate_slices
from ._checkpointing import CheckpointMixin
from ._group_checks import (
    ADAM_ONLY_FLAGS, CUT_OPTIONS, GroupPlaces, check_adam_flags, check_hyperparameters, check_target_dtype, same_options,
    slice_states_misfit,
)
from ._stagger_schedule import StaggerMixin, last_staggered_refresh, note_staggered_refreshes
from .functional import ParamWork, adamq3r_step_

__all__ = ["AdamQ3R"]


_Q3R_OPTIONS_OF = operator.itemgetter(*Q3R_DEFAULTS)  # a group's Q3R options, as a tuple


class AdamQ3R(StaggerMixin, CheckpointMixin, Optimizer):
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
        adam_flags = {key: q3r_defaults.pop(key) for key in (*ADAM_ONLY_FLAGS, "decoupled_weight_decay")
                      if key in q3r_defaults}
        check_adam_flags({**adam_flags, "weight_decay": weight_decay}, "AdamQ3R")
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
        check_adam_flags(merged, where)
        check_hyperparameters(merged, where)
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
                check_target_dtype(p, index, where)
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
    def _names(group: dict, params, p, where: str, index: int | None = None) -> list[str]:
        """Slice names of parameter p: from the group's ``names`` (flat, per slice), else from
        its parameter name (groups of (name, parameter) pairs), else made up. ``index``: p's
        place in ``params``, where the caller knows it."""
        if index is None:
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

    def _group_configs(self, group: dict, p, places: GroupPlaces | None = None):
        """p's SliceConfigs. ``places``: where the caller asks for many targets (a refresh, the
        stagger table): looked up there, each lookup was a scan of the groups and of the
        group's parameters, quadratic in the number of targets."""
        if places is None:
            gi, index = next(i for i, g in enumerate(self.param_groups) if g is group), None
        else:
            gi, index = places.of(group, p)
        return slice_configs(p.shape, group, self._names(group, group["params"], p, f"AdamQ3R param group {gi}", index))

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
        check_target_dtype(p, next(i for i, q in enumerate(group["params"]) if q is p), f"AdamQ3R param group {index}")
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
        if last is not None and last[0] is group and same_options(last[1], now):
            return
        where = f"AdamQ3R param group {gi}"
        validate_q3r_options(group, where)
        structural = last is None or last[0] is not group or any(
            a != b for key, a, b in zip(Q3R_DEFAULTS, last[1], now) if key in (*CUT_OPTIONS, "names"))
        if structural:
            places = GroupPlaces(self.param_groups, [group])
            for p in group["params"]:
                self._group_configs(group, p, places)  # (slices in bounds, one name per slice, ranks in range)
                slices = (self.state.get(p) or {}).get("q3r")
                if slices is not None and (why := slice_states_misfit(p, group, slices)):
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
        places = GroupPlaces(self.param_groups, [group for _, group in due])
        sharded = [(p, group) for p, group in due if distributed.is_sharded(p)]
        if sharded:  # FSDP2: a randomized refresh on the local rows (q3r.distributed.sharded_refresh)
            distributed.refresh_sharded_(
                [p for p, _ in sharded], [(g["slice_dim"], g["slices"]) for _, g in sharded],
                [self.state[p]["q3r"] for p, _ in sharded], [self._group_configs(g, p, places) for p, g in sharded],
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
            bucket[2].extend(self._group_configs(group, p, places))
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
                    elif clock is not None and group.get("stagger") and last_staggered_refresh(group, index) is None:
                        # (last refresh not known: a checkpoint from before it was kept, or the group's
                        # params changed. Counted from now, else a target never stepped at its phase
                        # would never be refreshed again)
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
            note_staggered_refreshes(group, indices, clock)
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
        places = GroupPlaces(self.param_groups, [g for g in self.param_groups if g["q3r"]])
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
                for (view, s), cfg in zip(pairs, self._group_configs(group, p, places)):
                    for key, value in slice_diagnostics(view, s, cfg.rank, group["lmbda"]).items():
                        out[f"{cfg.name}/{key}"] = value
        return out


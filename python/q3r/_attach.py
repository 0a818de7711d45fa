"""Q3R.attach: the optimizer's ``step()`` adds 2 lambda R(W) to the targets' gradients first (a step
pre-hook), and its ``state_dict()`` / ``load_state_dict()`` carry the regularizer's state under
``"q3r"`` (checked before anything loads). A mixin of :class:`q3r.regularizer.Q3R`; the handle
``attach`` returns removes the hooks."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Callable

import torch

from torch import Tensor

from . import distributed
from ._precision import autocast_off
from .targets import Target


class AttachMixin:
    """attach() and the optimizer hooks of Q3R (see there)."""

    def attach(self, optimizer: torch.optim.Optimizer, carry_state: bool = True,
               add_term: bool = True) -> "AttachHandle":
        """Make ``optimizer.step()`` call :meth:`add_grad_` first. Returns a handle whose
        ``remove()`` detaches it again.

        ``optimizer.step(closure)`` (LBFGS, closure loops): the step counts once and refreshes
        when due before the closure runs, and 2 lambda R(W) is added to the gradients after
        each evaluation of the closure (which zeroes and recomputes them). The loss it returns
        is the closure's, without the penalty's value.

        ``carry_state=True`` (default): ``optimizer.state_dict()`` also holds this
        regularizer's :meth:`state_dict` (under ``"q3r"``) and ``optimizer.load_state_dict()``
        restores it, so a loop or framework that checkpoints only the optimizer (the Hugging
        Face Trainer's ``optimizer.pt``) resumes Q3R too. The saved state is checked before the
        optimizer loads anything and committed after it loaded; a state dict without it (an
        older checkpoint, DCP's ``get_state_dict``, which keeps only ``state`` and
        ``param_groups``) leaves the regularizer as it is, with a warning; one that holds Q3R
        states for other targets only (another model or choice of targets) is refused with a
        ValueError before anything loads (load it before attaching to keep this Q3R's state).
        Attached after the optimizer loaded a checkpoint, it cannot get that checkpoint's Q3R
        state back (torch's load dropped it): where the optimizer holds state for the targets
        and this Q3R has counted no step, attach warns so.
        Under ``torch.amp.GradScaler`` a step the scaler skips is not counted; with an
        optimizer that unscales its gradients itself (``fused=True``) the term is added at
        their loss scale, and a step where that overflows a float16 gradient is refused with a
        RuntimeError before any weight changes (see ``_refuse_overflowed_fp16_term``).

        ``add_term=False``: the step adds nothing and counts nothing; only the state is carried
        (``carry_state``), for a Q3R used through :meth:`penalty`, which counts its own steps, in
        a loop or framework that checkpoints only the optimizer (the Trainer's ``optimizer.pt``).
        (An optimizer class that overrides ``load_state_dict`` may change its state before
        ``Optimizer.load_state_dict`` runs the hooks, as ZeroRedundancyOptimizer does: for such
        an optimizer the check runs first, through a wrapper set on the instance that
        ``remove()`` takes away again, so that a refused Q3R state leaves the optimizer unchanged
        too.)"""
        if not isinstance(carry_state, bool):
            raise TypeError(f"Q3R.attach carry_state must be a bool, got {carry_state!r}")
        if not isinstance(add_term, bool):
            raise TypeError(f"Q3R.attach add_term must be a bool, got {add_term!r}")
        if not (add_term or carry_state):
            raise ValueError("Q3R.attach with add_term=False and carry_state=False would do nothing")
        optimizer = _hookable(optimizer)
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for t in self.targets:
            if id(t.param) not in owned:
                raise ValueError(f"Q3R target {t.name} is not among the optimizer's parameters")
        self._check_descends(optimizer)
        # a target already in a q3r=True group of AdamQ3R gets its term from AdamQ3R: attached
        # too, it was regularized twice (once decoupled, once through .grad), without a word
        twice = sorted(t.name for t in self.targets for group in optimizer.param_groups
                       if group.get("q3r") is True and any(p is t.param for p in group["params"]))
        if twice:
            raise ValueError(f"Q3R targets {twice} are in q3r=True param groups of the optimizer, which regularizes "
                             "them itself (AdamQ3R): attached as well they would get the term twice; attach Q3R to "
                             "a plain optimizer, or drop these targets from it")
        hooks = getattr(optimizer, "_optimizer_step_pre_hooks", {}).values()
        if any(getattr(h, "__self__", None) is self and getattr(h, "__func__", None) is AttachMixin._before_step
               for h in hooks):  # (twice would count two steps and add the term twice per step)
            raise ValueError("this Q3R is already attached to this optimizer (remove the first hook's handle "
                             "to attach again)")
        if carry_state and any(isinstance(other, AttachMixin) and set(other.state) == set(self.state)
                               for other in _carrying(optimizer)):
            if self in _carrying(optimizer):  # (a second add_term=False attach: no step hook to find above)
                raise ValueError("this Q3R already carries its state in this optimizer's state_dict (remove the "
                                 "first handle to attach again)")
            raise ValueError("another Q3R over the same targets already carries its state in this optimizer's "
                             "state_dict (their states could not be told apart): attach this one with carry_state=False "
                             "and checkpoint it with Q3R.state_dict()")
        if carry_state and self.num_steps == 0:
            _warn_if_loaded_before(optimizer, self.targets)
        self.__dict__.pop("_penalty_since_step", None)  # (penalties before attaching are not this step's)
        handles = [optimizer.register_step_pre_hook(self._before_step)] if add_term else []
        if carry_state:
            pending: list[dict] = []  # the checked state between the load's pre- and post-hook
            early = _CheckFirst(optimizer, lambda sd: self._check_optimizer_state(sd, pending))
            handles += [
                optimizer.register_state_dict_post_hook(self._save_into_optimizer_state),
                optimizer.register_load_state_dict_pre_hook(
                    lambda opt, sd: None if early.checked else self._check_optimizer_state(sd, pending)),
                optimizer.register_load_state_dict_post_hook(lambda opt: self._commit_optimizer_state(pending)),
            ]
            if early.installed:
                handles.append(early)
        return AttachHandle(handles)

    # (state carried in the optimizer's state_dict: a list, one entry per attached Q3R)
    def _save_into_optimizer_state(self, optimizer, state_dict: dict) -> dict:
        state_dict = dict(state_dict)
        state_dict["q3r"] = [*state_dict.get("q3r", []), self.state_dict()]
        return state_dict

    def _check_optimizer_state(self, state_dict: dict, pending: list) -> None:
        pending.clear()
        carried = state_dict.get("q3r", [])
        if not isinstance(carried, list):
            raise ValueError(f"the optimizer state_dict's 'q3r' entry must be a list of Q3R states, got "
                             f"{type(carried).__name__}")
        carried = [s for s in carried if isinstance(s, dict)]
        mine = [s for s in carried if saved_targets(s, self.state) is not None]
        if not mine and carried:
            # (states saved by Q3Rs over other targets: another model or another setup, as a
            # state dict of another model is refused everywhere else; it warned and loaded)
            raise ValueError(f"the optimizer state_dict holds Q3R states for other target sets "
                             f"({[sorted(s.get('targets', {})) for s in carried]}), none for this attached Q3R's "
                             f"targets {sorted(self.state)}: it comes from another model or another choice of "
                             "targets; load it before attaching, or attach with carry_state=False, to keep "
                             "this Q3R's own state")
        if not mine:
            warnings.warn(f"the optimizer state_dict being loaded holds no Q3R state for targets {sorted(self.state)}"
                          f": this attached Q3R keeps its own (step {self.num_steps}); load it with "
                          "Q3R.load_state_dict, or attach with carry_state=False to silence this",
                          stacklevel=_outside_stacklevel())
            return
        if len(mine) > 1:
            raise ValueError(f"the optimizer state_dict holds {len(mine)} Q3R states for targets {sorted(self.state)}")
        self._check_state_dict(mine[0])  # (raises before the optimizer loads anything)
        pending.append(mine[0])

    def _commit_optimizer_state(self, pending: list) -> None:
        if pending:
            state_dict = pending.pop()
            self._commit_state_dict(state_dict)
            # (as Q3R.load_state_dict warns: a Trainer's optimizer.pt of a steps=5 run, resumed
            # into an attached steps=3 Q3R, loaded without a word)
            self._warn_if_saved_with_other_options(
                state_dict, "optimizer.load_state_dict (the state of an attached Q3R)",
                stacklevel=_outside_stacklevel() + 1)

    def _check_descends(self, optimizer) -> None:
        """The optimizer descends along .grad for every target: with maximize=True it would
        ascend the penalty (grow the small singular values)."""
        targets = {id(t.param) for t in self.targets}
        for gi, group in enumerate(optimizer.param_groups):
            if group.get("maximize") and any(id(p) in targets for p in group["params"]):
                raise ValueError(f"optimizer param group {gi} has maximize=True: the Q3R term added to .grad "
                                 "would be ascended; to maximize an objective J, maximize J - penalty() instead")

    def _check_still_owned(self, optimizer) -> None:
        """Every target is still one of the optimizer's parameters. accelerate's prepare with
        FSDP2 (``Accelerator._prepare_fsdp2``) shards the model into new DTensor parameters and
        swaps them into the param groups of an optimizer built before it: a Q3R attached then
        kept the old parameters, which get no gradient, so every step was counted and refreshed
        the stale weights but added no term, without a word."""
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        gone = [t.name for t in self.targets if id(t.param) not in owned]
        if gone:
            raise RuntimeError(
                f"Q3R targets {gone[:3]}{' ...' if len(gone) > 3 else ''} ({len(gone)} of {len(self.targets)}) are no "
                "longer among the parameters of the optimizer this Q3R is attached to: their parameters were replaced "
                "after attach (accelerate's prepare does this under FSDP2, sharding the model into new parameters), "
                "so Q3R would regularize stale copies and add nothing. Find the targets on the prepared model and "
                "attach a new Q3R to the optimizer that prepare returns")

    def _before_step(self, optimizer, args, kwargs):
        """attach's step pre-hook: add_grad_ now, or wrap the step's closure (see attach)."""
        self._check_still_owned(optimizer)  # (before anything changes; groups can change after attach)
        self._check_descends(optimizer)
        # penalty() in the loss of a step of an optimizer this Q3R is attached to: the term
        # reaches .grad twice (the penalty's gradient, then attach's) and the step counts twice,
        # which the README's "use one of the two modes per step" says but nothing did: warn once
        if self.__dict__.pop("_penalty_since_step", False) and not self.__dict__.get("_both_modes_warned"):
            self._both_modes_warned = True
            warnings.warn("Q3R.penalty() was called in a step of an optimizer this Q3R is attached to: the term is "
                          "added to the gradients twice (by the penalty and by attach) and the step counted twice; "
                          "use penalty() or attach(), not both", stacklevel=3)
        # (args are step's own: the optimizer first, then the closure if passed by position)
        closure = kwargs["closure"] if "closure" in kwargs else (args[1] if len(args) > 1 else None)
        if closure is None:
            grad_scale = _amp_grad_scale(optimizer)
            if grad_scale is not None and not self._creates_state_only(optimizer):
                self.add_grad_(grad_scale=grad_scale)
                _refuse_overflowed_fp16_term(optimizer, self.targets, grad_scale)
            return None
        self._begin_step()

        def closure_with_term():
            loss = closure()
            self._add_grad_after_closure_()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_with_term}
        return (args[0], closure_with_term, *args[2:]), kwargs

    def _creates_state_only(self, optimizer) -> bool:
        """A step with lr 0 in every group on all-zero gradients of every target: how
        torch.distributed.checkpoint's get_state_dict / set_state_dict create a fresh
        optimizer's state. It is not a training step: not counted, nothing added (the term
        would be the only thing in Adam's moments). The gradients are looked at (a device
        sync) only where every lr is 0. FSDP2-sharded targets are left out (their step counts,
        as before): a rank sees only its shards, and ranks that disagreed would leave the
        refresh's collectives waiting."""
        for group in optimizer.param_groups:
            lr = group.get("lr")
            if isinstance(lr, Tensor):
                if lr.numel() != 1 or lr.device.type != "cpu":  # (no sync for a device lr)
                    return False
                lr = lr.item()
            if lr != 0:
                return False
        if any(distributed.is_sharded(t.param) for t in self.targets):
            return False
        grads = [t.param.grad for t in self.targets]
        return bool(grads) and all(g is not None for g in grads) and not any(bool(g.any()) for g in grads)

    @autocast_off
    @torch.no_grad()
    def _add_grad_after_closure_(self) -> None:
        with_grad = [t for t in self.targets if t.param.grad is not None]
        check_dense_grads(with_grad)
        if self.lmbda != 0:
            self._add_grad_targets_(with_grad)


def saved_targets(state_dict, names) -> dict | None:
    """A saved Q3R state's per-target entries keyed by ``names`` (None: other targets). A state
    saved before find_targets named the targets of a DistributedDataParallel wrapper as in the
    model it wraps has every name with DDP's "module." prefix: it loads too."""
    return keyed_by_names(state_dict.get("targets", {}) if isinstance(state_dict, dict) else {}, names)


def keyed_by_names(saved, names) -> dict | None:
    """A dict of a saved Q3R state keyed by target name ("targets", "ranks"), keyed by ``names``
    as saved_targets matches them (DDP's "module." taken off where that makes them ``names``),
    or None where they are other names."""
    if not isinstance(saved, dict):
        return None
    if set(saved) == set(names):
        return saved
    if saved and all(isinstance(k, str) and k.startswith("module.") for k in saved):
        stripped = {k[len("module."):]: v for k, v in saved.items()}
        if set(stripped) == set(names):
            return stripped
    return None


_INSIDE = tuple(os.path.dirname(m.__file__) + os.sep for m in (sys.modules[__package__], torch))


def _outside_stacklevel() -> int:
    """The ``stacklevel`` at which a warning issued by the caller of this function names the
    first frame outside q3r and torch: the line that loaded the optimizer's state (or the
    framework's, a Trainer's). A load hook runs under torch's Optimizer.load_state_dict and its
    wrappers (torch._disable_dynamo's), as many frames deep as the torch version has: a fixed
    stacklevel=4 named torch's eval_frame.py or optimizer.py."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    return level


def _amp_grad_scale(optimizer) -> float | None:
    """The loss scale still in the gradients when a step begins: 1, except under
    torch.amp.GradScaler with an optimizer that unscales them itself (``fused=True`` Adam,
    AdamW, SGD: ``_step_supports_amp_scaling``). GradScaler then sets ``optimizer.grad_scale``
    (None once unscale_ ran) and ``optimizer.found_inf`` for the step and calls it even on
    inf/NaN gradients, which the fused kernel skips: None then, for a step that is not taken
    (not counted, nothing added, as GradScaler skips other optimizers' steps). Without this
    the term went into gradients still scaled by 65536, and the kernel divided it away.
    Reading found_inf is a device sync, under that pairing only."""
    found_inf = getattr(optimizer, "found_inf", None)
    if isinstance(found_inf, Tensor) and bool(found_inf.ne(0).any()):
        return None
    grad_scale = getattr(optimizer, "grad_scale", None)
    return 1.0 if grad_scale is None else float(grad_scale)


def _refuse_overflowed_fp16_term(optimizer, targets: list[Target], grad_scale: float) -> None:
    """Under torch.amp.GradScaler with an optimizer that unscales its gradients itself
    (``fused=True``), the term goes into the gradients after the scaler checked them for inf, at
    the loss scale: a float16 gradient (float16 parameters) where ``scale * 2 lambda R(W)`` passes
    65504 became inf unseen and the fused step wrote NaN weights (h53: an fp16 layer scaled x8 at
    lambda 0.5, scale 65536). Refused here, before the step changes any weight or moment (the
    gradients were finite before the term: found_inf was 0). Skipping the step instead, as the
    scaler skips an overflow in the backward pass, would take the scaler's own inf flags:
    ``optimizer.found_inf`` is a sum of them made for the step, which ``scaler.update()`` does not
    read, so the scale would not back off and every later step would overflow again
    (benchmarks/results/probes/amp_fp16_term_cpu_e6c5109.txt). bfloat16 and float32 gradients
    reach 3.4e38 and are not looked at: float16 targets cost one more device sync per step, the
    usual AMP setup (float32 parameters) nothing. FSDP2-sharded targets are left out: a rank sees
    only its shards, and one rank raising alone would leave the others waiting in a collective."""
    if not isinstance(getattr(optimizer, "found_inf", None), Tensor):
        return
    fp16 = [t for t in targets if t.param.grad is not None and t.param.grad.dtype == torch.float16
            and not distributed.is_sharded(t.param)]
    if not fp16:
        return
    device = fp16[0].param.grad.device  # (one sync for all targets, wherever each lives)
    finite = torch.stack([torch.isfinite(t.param.grad).all().to(device) for t in fp16])
    if bool(finite.all()):
        return
    names = [t.name for t, ok in zip(fp16, finite.tolist()) if not ok]
    # GradScaler sets these two for the step and deletes them once the step returns, which a
    # raise from this hook skips: left behind, a later step without the scaler (the same
    # optimizer, or a GradScaler(enabled=False)) read them as its loss scale, so the fused
    # optimizer divided unscaled gradients by it and this hook added the term at it again
    # (refused again at once where it overflowed, as here)
    for name in ("grad_scale", "found_inf"):
        optimizer.__dict__.pop(name, None)
    raise RuntimeError(
        f"the Q3R term 2 lambda R(W), added at GradScaler's loss scale {grad_scale:g} (the fused optimizer unscales "
        f"the gradients itself, after this hook), overflowed the float16 gradients of targets {names}: the scaler "
        "had already checked them, and the fused step would write NaN weights. The step was not taken (weights and "
        "optimizer state unchanged; this Q3R counted it, and the gradients hold inf). Restart from a checkpoint with "
        "the targets' parameters in float32 (the usual AMP setup, torch.autocast over float32 weights), or with a "
        "GradScaler whose scale keeps scale * 2 lambda R(W) below 65504 (a lower init_scale; growth_factor=1.0 "
        "keeps it there)")


def _hookable(optimizer):
    """The optimizer whose step attach hooks: ``optimizer`` itself, or, for a wrapper that
    subclasses torch.optim.Optimizer without running its __init__ and steps, saves and loads
    through the optimizer it wraps (accelerate's AcceleratedOptimizer, what
    ``Accelerator.prepare`` returns: ``.optimizer``), the wrapped one. attach on such a wrapper
    failed with "'AcceleratedOptimizer' object has no attribute '_optimizer_step_pre_hooks'"."""
    seen = optimizer
    while not hasattr(optimizer, "_optimizer_step_pre_hooks"):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            raise TypeError(f"Q3R.attach needs a torch.optim.Optimizer (it registers step hooks); "
                            f"{type(seen).__name__} has no step hooks and wraps no optimizer as .optimizer: "
                            "attach to the optimizer it wraps")
        optimizer = inner
    return optimizer


def _warn_if_loaded_before(optimizer, targets: list[Target]) -> None:
    """A warning where the optimizer already holds state for targets of a Q3R that has counted no
    step: loaded from a checkpoint, the Q3R state it carried was dropped by that load (torch's
    load_state_dict keeps "state" and "param_groups" only; no hook claimed "q3r"), and nothing
    keeps it for a Q3R attached later. Resumed so (a Trainer callback attaching at
    on_train_begin), Q3R started again at step 0 and the next checkpoint carried that, without a
    word. (It sees an optimizer that has stepped before a Q3R was attached on purpose too.)"""
    held = [t.name for t in targets if optimizer.state.get(t.param)]
    if held:
        warnings.warn(f"Q3R.attach: the optimizer already holds state for targets {held[:3]}"
                      f"{' ...' if len(held) > 3 else ''} and this Q3R has counted no step. If that state was loaded "
                      "from a checkpoint saved with a Q3R attached, the Q3R state it carried under 'q3r' was dropped "
                      "by that load and Q3R starts again at step 0: attach before the optimizer loads (in the "
                      "Hugging Face Trainer: pass the optimizer in, or attach in create_optimizer), or restore it "
                      "first with Q3R.load_state_dict(checkpoint['q3r'][0]). (Starting Q3R on an optimizer that has "
                      "stepped, on purpose, warns too.)", stacklevel=3)


def _carrying(optimizer) -> list:
    """The Q3Rs attached to optimizer with carry_state=True."""
    hooks = getattr(optimizer, "_optimizer_state_dict_post_hooks", {}).values()
    return [h.__self__ for h in hooks if getattr(h, "__func__", None) is AttachMixin._save_into_optimizer_state]


class _CheckFirst:
    """For an optimizer whose class overrides ``load_state_dict``: an instance attribute that runs
    ``check`` on the state dict before the class's own method changes anything (torch runs the
    load pre-hooks only inside ``Optimizer.load_state_dict``, which such a method may call last,
    as ZeroRedundancyOptimizer does after copying each rank's share into its local optimizer).
    ``checked`` tells the pre-hook not to check the same load twice. ``remove()`` puts the
    instance back as it was, or, where something wrapped ``load_state_dict`` again after us,
    leaves a pass-through."""

    def __init__(self, optimizer, check: Callable[[dict], None]):
        self.checked = False
        self.installed = type(optimizer).load_state_dict is not torch.optim.Optimizer.load_state_dict
        if not self.installed:
            return
        self._optimizer, self._check, self._active = optimizer, check, True
        self._had_own = "load_state_dict" in vars(optimizer)
        self._inner = optimizer.load_state_dict  # (bound: the class's method, or an earlier wrapper)
        optimizer.load_state_dict = self._load

    def _load(self, state_dict: dict):
        if not self._active:
            return self._inner(state_dict)
        self._check(state_dict)  # (raises before the optimizer changed anything)
        self.checked = True
        try:
            return self._inner(state_dict)
        finally:
            self.checked = False

    def remove(self) -> None:
        if not self.installed or not self._active:
            return
        self._active = False
        if vars(self._optimizer).get("load_state_dict") != self._load:
            return  # (wrapped again since: stays a pass-through)
        layer = self  # (and the pass-throughs left below it go too)
        while layer._had_own and isinstance(below := getattr(layer._inner, "__self__", None), _CheckFirst) \
                and not below._active and layer._inner == below._load:
            layer = below
        if layer._had_own:
            self._optimizer.load_state_dict = layer._inner
        else:
            del self._optimizer.load_state_dict


class AttachHandle:
    """What :meth:`Q3R.attach` returns: ``remove()`` (or leaving a ``with`` block) takes all of
    its optimizer hooks away."""

    def __init__(self, handles):
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def __enter__(self) -> "AttachHandle":  # (as torch's RemovableHandle: `with reg.attach(opt): ...`)
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


def check_dense_grads(targets: list[Target]) -> None:
    """The term 2 lambda R(W) is dense: a target whose gradient is sparse (an
    ``nn.Embedding(sparse=True)`` stepped by SparseAdam) cannot take it in place. It failed with
    "outs[0] has internal overlap", after the step had been counted and refreshed."""
    sparse = [t.name for t in targets if t.param.grad.layout != torch.strided]
    if sparse:
        raise ValueError(f"Q3R targets {sparse} have sparse gradients (an nn.Embedding(sparse=True)?): the Q3R term "
                         "2 lambda R(W) is dense and cannot be added to them; build the layer with sparse=False "
                         "(and a dense optimizer), or leave it out of the targets")

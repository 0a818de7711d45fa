"""AdamQ3R's checkpoints: ``state_dict`` / ``load_state_dict`` (the Q3R slice states ride in each
target's optimizer state, keyed "0", "1", ... per slice), checked before anything loads, and the
adoption of states a wrapper (ZeroRedundancyOptimizer) writes straight into ``optimizer.state``.
A mixin of :class:`q3r.optim.adamq3r.AdamQ3R`."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch

from ..config import Q3R_DEFAULTS, default_names, slice_configs, validate_q3r_options
from ..refresh import upgrade_state
from ..targets import slice_shapes, validate_slices
from ._group_checks import CUT_OPTIONS, check_adam_flags, check_hyperparameters, slice_states_misfit


class CheckpointMixin:
    """state_dict / load_state_dict of AdamQ3R (see there)."""

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
        found, first = [], 0
        for gi, group in enumerate(self.param_groups):
            first, pids = first + len(group["params"]), range(first, first + len(group["params"]))
            if not group["q3r"]:  # (no slice states there; this runs at every step)
                continue
            for pid, p in zip(pids, group["params"]):
                st = self.state.get(p)
                if isinstance(st, dict) and isinstance(st.get("q3r"), Mapping):
                    listed = _listed(st, f"AdamQ3R param group {gi}")
                    # (pid: the parameter's key in this optimizer's state_dict()["state"])
                    self._check_saved_param_state(listed, p, {**self.defaults, **group}, f"group {gi}", pid)
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
            check_hyperparameters(merged, f"state_dict param group {gi}")
            for pid, p in zip(saved["params"], group["params"]):
                mapping[pid] = (p, merged)
        states = {pid: _listed(st, f"state_dict param {pid}") for pid, st in state_dict["state"].items()}
        for pid, (p, merged) in mapping.items():
            gi = next(i for i, g in enumerate(groups) if pid in g["params"])
            self._check_saved_param_state(states.get(pid), p, merged, f"group {gi}", pid)
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
        check_adam_flags(saved, where, flags=("amsgrad", "maximize"))
        if saved.get("weight_decay") and "decoupled_weight_decay" not in saved:  # (torch < 2.8 does not say)
            warnings.warn(f"{where}: a torch.optim checkpoint with weight_decay={saved['weight_decay']} that does not "
                          "say whether it was Adam's L2 decay or AdamW's decoupled one; AdamQ3R applies it decoupled",
                          RuntimeWarning, stacklevel=4)
        return {**{key: group[key] for key in ("q3r", *Q3R_DEFAULTS)}, **saved}

    @staticmethod
    def _check_saved_param_state(st, p, group: dict, where: str, pid=None) -> None:
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
        if "q3r" in st and (why := slice_states_misfit(p, group, slices)):
            param = "" if pid is None else f" param {pid!r} {tuple(p.shape)}"  # (its key in the state dict's "state")
            raise ValueError(f"state_dict {where}{param}: {why}: it comes from a different model or is damaged")


def _replaced_options(groups: list[dict], saved_groups: list[dict]) -> list[str]:
    """'group i: key this -> saved' for each option of a Q3R group that decides its targets'
    slices and ranks and that a loaded group replaces with another value (slices compared as
    pairs: a checkpoint may hold them as lists)."""
    def plain(key, value):
        return [tuple(pair) for pair in value] if key == "slices" and value is not None else value

    return [f"group {gi}: {key} {group.get(key)!r} -> {saved.get(key)!r}"
            for gi, (group, saved) in enumerate(zip(groups, saved_groups)) if group.get("q3r") and saved.get("q3r")
            for key in CUT_OPTIONS
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

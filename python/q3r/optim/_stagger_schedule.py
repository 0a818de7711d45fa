"""When AdamQ3R refreshes a target: every ``steps`` of its steps, or with ``stagger=True`` at its
own phase of one clock for all targets (q3r.stagger), the clock and each target's last refresh
kept in its param group so state dicts, copies and pickles resume on the same steps. A mixin of
:class:`q3r.optim.adamq3r.AdamQ3R`."""

from __future__ import annotations

import numbers

from ..stagger import due_for_refresh, target_phases
from ..targets import slice_shapes
from ._group_checks import GroupPlaces


class StaggerMixin:
    """The refresh schedule of AdamQ3R (see there)."""

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
        the group, see note_staggered_refreshes): the clock counts the optimizer's steps, and a
        target without a gradient at its phase (targets trained in turns, period 4: half of
        them never) was not refreshed again until it happened to have one there."""
        if not group.get("stagger"):
            return step % group["steps"] == 0
        if due_for_refresh(clock, group["steps"], phases[id(p)]):
            return True
        last = last_staggered_refresh(group, index)
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
        places = GroupPlaces(self.param_groups, staggered)
        for period in {g["steps"] for g in staggered}:
            members = [(q, g) for g in staggered if g["steps"] == period for q in g["params"]]
            targets = [[(d1, d2, cfg.rank) for (d1, d2), cfg in
                        zip(slice_shapes(q.shape, g["slice_dim"], g["slices"]), self._group_configs(g, q, places))]
                       for q, g in members]
            table.update({id(q): phase for (q, _), phase in zip(members, target_phases(targets, period))})
        self._stagger_cache = (signature, table)
        return table


def note_staggered_refreshes(group: dict, indices: list[int], clock: int) -> None:
    """Record in a staggered group, as ``"stagger_refreshed"`` (the clock of each of its
    parameters' last refresh, -1 where none was seen), that its parameters ``indices`` are
    refreshed at ``clock`` (or, where their last refresh was not known, are counted from it): plain ints in the group, so that state dicts, copies and pickles carry
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


def last_staggered_refresh(group: dict, index: int) -> int | None:
    """The clock of the parameter's last staggered refresh, or None where it is not known (a
    checkpoint from before it was kept, or a group whose parameters changed since)."""
    seen = group.get("stagger_refreshed")
    if not isinstance(seen, list) or len(seen) != len(group["params"]):
        return None
    last = seen[index]
    return last if isinstance(last, int) and not isinstance(last, bool) and last >= 0 else None

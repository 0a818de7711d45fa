"""Staggered refreshes: each target gets a phase in [0, T) so that every step of a refresh
period refreshes about 1/T of the total cost (issue 4), with the targets of one stack kept
in consecutive phases where that costs little (a phase pays a fixed cost per stack)."""

from __future__ import annotations

from .refresh import DEFAULT_SKETCH

# What a refresh pays per slice besides its flops (host work, small launches), in the units
# of refresh_cost. From an A/B of staggered ViT-B/16 and GPT-2 training steps on an H100
# (benchmarks/results/ab_h100_stagger_grouped/): about 0.18 ms of step time per slice
# refreshed, which is what the sketch's matmuls take for about 1e9 units (2.7 ms for the
# 14.7e9 of a whole ViT-B refresh, profile_refresh_h100_06917ee.txt). Without it, flops
# alone put 28 of ViT-B's 768x768 slices in one staggered phase and 6 of its 3072x768 ones in
# another, and the first took about 3 ms more above a plain step (8.5 against 5.4 ms).
PER_SLICE_COST = 1e9


def refresh_cost(d1: int, d2: int, rank: int, oversampling: int = DEFAULT_SKETCH.oversampling) -> float:
    """Cost of a warm randomized refresh of one d1 x d2 slice, for balancing: its flops (up
    to a constant: the sketch passes over the weights plus the k x k eigenproblem, k = rank
    + oversampling) plus PER_SLICE_COST."""
    k = min(rank + oversampling, min(d1, d2))
    return float(d1) * d2 * k + float(k) ** 3 + PER_SLICE_COST


def balance_by_cost(costs: list[float], bins: int) -> list[int]:
    """Bin in [0, bins) of each item so that the summed cost per bin is balanced.

    Longest-processing-time greedy (largest first, to the lightest bin); ties broken by
    index, so it is deterministic: the same on every rank and after a resume.
    """
    load = [0.0] * bins
    chosen = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        slot = min(range(bins), key=lambda b: (load[b], b))
        chosen[i] = slot
        load[slot] += costs[i]
    return chosen


# How much heavier (by cost) the heaviest phase may be than the greedy balance's when the
# targets of one stack are kept together. A phase pays a fixed cost per stack it refreshes
# (small launches and their host work) that a 1/T share of a stack does not amortize: on an
# H100 (benchmarks/results/stagger_timeline_h100_c1acbd0.txt) sketching a fifth of each of
# ViT-B/16's three stacks took 0.8-1.0 ms of device time per stack, a whole stack 1.8-2.1 ms;
# fit to whole training steps (ab_h100_stagger_grouped/), about 1.3 ms per stack in a phase.
_GROUPED_SLACK = 0.15


def stagger_phases(costs: list[float], period: int, keys: list | None = None) -> list[int]:
    """Phase in [0, period) of each target, balancing the summed refresh cost per phase.

    ``keys`` (optional, orderable; see stack_key) names the stacks a target's slices join in
    a refresh. With keys, the targets are ordered by key (then by index) and cut into at most
    ``period`` consecutive runs with the smallest possible heaviest run, so that most phases
    refresh one or two stacks instead of a share of every stack. That assignment is used
    when it touches fewer stacks per period than the greedy balance, leaves no phase empty
    that the greedy balance fills, and its heaviest phase costs at most 15% more; the greedy
    balance otherwise. Deterministic either way: the same on every rank. Phases are computed,
    not stored, so a run resumed under a version with another rule gets that rule's phases
    (a target may then wait up to 2T - 1 steps for its next refresh, once).
    """
    if not isinstance(period, int) or period < 1:
        raise ValueError(f"period must be an int >= 1, got {period!r}")
    greedy = balance_by_cost(costs, period)
    if keys is None or not costs or period == 1:
        return greedy
    if len(keys) != len(costs):
        raise ValueError(f"keys must name one stack per target: {len(keys)} keys for {len(costs)} costs")
    grouped = _consecutive_by_key(costs, keys, period)
    if grouped is None:
        return greedy

    def stacks(chosen: list[int]) -> int:  # (phase, stack) pairs: the fixed costs paid per period
        return len({(p, keys[i]) for i, p in enumerate(chosen)})

    if (stacks(grouped) < stacks(greedy) and len(set(grouped)) == len(set(greedy))
            and _max_load(costs, grouped, period) <= (1 + _GROUPED_SLACK) * _max_load(costs, greedy, period)):
        return grouped
    return greedy


def target_phases(targets: list[list[tuple[int, int, int]]], period: int) -> list[int]:
    """stagger_phases for targets given as their slices' (d1, d2, rank): the cost of each
    target is the sum of its slices' refresh_cost, its key the stack_key of their shapes."""
    costs = [sum(refresh_cost(d1, d2, rank) for d1, d2, rank in slices) for slices in targets]
    keys = [stack_key([(d1, d2) for d1, d2, _ in slices]) for slices in targets]
    return stagger_phases(costs, period, keys)


def stack_key(shapes) -> tuple:
    """The stagger key of a target whose slices have these (d1, d2) shapes: a refresh stacks
    slices by shape up to transposition (q3r.refresh), so targets with the same shapes, or
    their transposes, join the same stacks."""
    return tuple(sorted({(min(d1, d2), max(d1, d2)) for d1, d2 in shapes}))


def _consecutive_by_key(costs: list[float], keys: list, bins: int) -> list[int] | None:
    """Targets sorted by (key, index), cut into at most ``bins`` consecutive runs whose
    heaviest is as light as possible (bisection on that cap, filling runs greedily)."""
    order = sorted(range(len(costs)), key=lambda i: (keys[i], i))

    def fill(cap: float) -> list[int] | None:
        chosen, run, load = [0] * len(costs), 0, 0.0
        for i in order:
            if load > 0 and load + costs[i] > cap:
                run, load = run + 1, 0.0
            if run == bins:
                return None
            chosen[i], load = run, load + costs[i]
        return chosen

    low, high = max(costs), 0.0
    for i in order:  # summed in fill's order, so that fill(high) fits in one run bit for bit
        high += costs[i]
    for _ in range(64):
        mid = (low + high) / 2
        if mid <= low or mid >= high:
            break
        low, high = (low, mid) if fill(mid) is not None else (mid, high)
    return fill(high)  # None only if rounding defeats the above: the caller keeps the greedy balance


def _max_load(costs: list[float], chosen: list[int], bins: int) -> float:
    load = [0.0] * bins
    for c, b in zip(costs, chosen):
        load[b] += c
    return max(load)


def due_for_refresh(step: int, period: int, phase: int | None = None) -> bool:
    """Whether a target is refreshed at ``step`` (0-based).

    Without staggering (phase None) every target is due at steps 0, T, 2T, ...  With a phase
    p from stagger_phases the target is due at step 0 (so no target starts with R = I for
    longer than needed) and then at steps p, p + T, p + 2T, ...: each step of a period
    refreshes about 1/T of the total cost.
    """
    if phase is None:
        return step % period == 0
    return step == 0 or step % period == phase

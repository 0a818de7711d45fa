"""The randomized refresh of same-shaped groups of targets (refresh methods "randomized" and
"native"): members stacked by width, sketched (q3r.randomized), their k x k problems solved
together, committed (q3r._refresh_commit) or sent back for a wider sketch, a float64
Rayleigh-Ritz step, or an exact SVD."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from . import _refresh_commit as C
from . import randomized, reference
from ._transfer import to_device

if TYPE_CHECKING:
    from .refresh import SketchOptions


def _warm_basis(state: dict[str, Tensor]) -> tuple[Tensor, ...] | None:
    """Previous V and its tail (d2, j) as column blocks (randomized.Start), or None before the
    first refresh (V and d2 of the orientation the refresh decomposes: see q3r.refresh).
    Not joined here: start_basis copies the blocks of a whole stack at once."""
    blocks = tuple(t for t in (state["V"], state.get("tail")) if t is not None and t.shape[-1] > 0)
    return blocks or None


def _sketch_width(rank: int, prev_env: int, cold: bool, n: int, opts: SketchOptions) -> int:
    k = max(rank, prev_env) + opts.oversampling
    if cold:
        k = max(k, rank + max(2 * opts.oversampling, rank))
    return min(k, n)


@dataclass
class SketchGroup:
    """One same-shaped group of a sketched refresh and its targets still to do."""

    idx: list[int]
    method: str  # "randomized" or "native"
    n: int  # min(d1, d2)
    pending: dict = field(default_factory=dict)  # target -> (width, start basis)
    exact: list = field(default_factory=list)  # targets that get an exact SVD
    nonfinite: list = field(default_factory=list)  # targets found with non-finite weights
    widenings: dict = field(default_factory=dict)  # target -> how many times its sketch was widened
    stepped: set = field(default_factory=set)  # targets sketched again from this refresh's V (lag no longer checked)
    # targets sketched again with more power iterations than a warm sketch takes: those whose
    # first pass lagged (lag_power_iters) and those whose envelope grew (grown_power_iters)
    iterated: dict = field(default_factory=dict)  # target -> power iterations
    grown: set = field(default_factory=set)  # targets already sketched again for envelope growth

    def cap(self, opts: SketchOptions) -> int:
        """The widest sketch worth taking; wider targets get an exact SVD."""
        return int(opts.exact_fraction * self.n)


def refresh_sketched(weights, states, configs, groups: list[SketchGroup], opts: SketchOptions,
                     before_wait: Callable[[], None]) -> tuple[set[int], list[list[int]]]:
    """Randomized refresh of same-shaped groups; widen, or leave a target to an exact SVD.
    Returns (the targets skipped for non-finite weights, per group the targets that still
    need an exact SVD: too wide to sketch, not wide enough after max_widenings, or whose
    grown envelope took on more than max_sketched_growth new members).

    Each attempt sketches every group first and then solves the k x k problems of all
    stacks that share a solver, a width and a device in one call: the native solver costs
    one thread block's latency per call, whatever the batch, so a ViT's two stacks (attention;
    fc1 with fc2, transposed) in two calls cost twice one.  Stacks for torch.linalg.eigh
    are solved one by one as they are sketched, so that a large model's refresh never holds
    the sketches of all its targets at once.  ``before_wait``: see refresh_slices_ (the
    torch solver checks its result on the host, so it runs before the first one).
    """
    solvers = {name: randomized.eigensolver(name, opts.max_sweeps, opts.tol) for name in ("torch", "native")}
    for g in groups:
        for i in g.idx:
            warm = _warm_basis(states[i])
            prev_env = states[i]["sigma"].shape[0]
            g.pending[i] = (_sketch_width(configs[i].rank, prev_env, warm is None, g.n, opts), warm)
    # attempt 0, then one for members whose unchecked basis failed (they are sketched again at
    # the same width), one for those whose first pass lagged (again from their new V, with
    # power iterations), one for those whose envelope grew (wider, with grown_power_iters), then
    # the widenings: each member is widened max_widenings times at most
    for attempt in range(opts.max_widenings + 4):
        deferred = []
        stacks = [st for g in groups for st in _plan_stacks(g, weights, opts)]
        _align_native_widths(stacks, weights, opts)
        for st in stacks:
            _sketch_stack_(weights, st, attempt, opts)
            if st.native:
                deferred.append(st)
            else:
                before_wait()
                st.eig = solvers["torch"](st.sketch.G)
                _finish_stacks(weights, states, configs, [st], solvers, opts)
        # (by dtype too: a float64 target's Gram matrices would promote a float32 batch)
        batches = _by_key(deferred, lambda st: (st.k, st.sketch.G.device, st.sketch.G.dtype))
        for batch in batches:
            evals, evecs = solvers["native"](torch.cat([st.sketch.G for st in batch]))
            sizes = [len(st.members) for st in batch]
            for st, lam, E in zip(batch, evals.split(sizes), evecs.split(sizes)):
                st.eig = (lam, E)
        for batch in batches:  # (every batch's solve is queued before the first commit waits)
            _finish_stacks(weights, states, configs, batch, solvers, opts, before_wait)
        if not any(g.pending for g in groups):
            break
    nonfinite = {i for g in groups for i in g.nonfinite}
    # the too-wide ones (never sketched, so not yet checked for non-finite weights) and those
    # still not wide enough after max_widenings (pending ones too, though the loop leaves none)
    exact = [g.exact + list(g.pending) for g in groups if g.exact or g.pending]
    return nonfinite, exact


def _by_key(items: list, key) -> list[list]:
    buckets: dict = {}
    for item in items:
        buckets.setdefault(key(item), []).append(item)
    return list(buckets.values())


@dataclass
class _Stack:
    """A planned stack: a run of a group's cold or warm members that take the same number of
    power iterations (at most SketchOptions.max_stack_bytes of weights) and the sketch width
    they share."""

    group: SketchGroup
    members: list[int]
    starts: list  # each member's warm start basis (or None)
    k: int
    native: bool  # its k x k problems go to the native solver
    sketch: randomized.Sketch | None = None  # filled by _sketch_stack_
    power_iters: int | None = None  # of a warm stack (None: SketchOptions.warm_power_iters)
    energy: Tensor | None = None  # (b,) float64 ||W||_F^2
    eig: tuple = ()  # (evals, evecs) of sketch.G


def _plan_stacks(g: SketchGroup, weights, opts: SketchOptions) -> list[_Stack]:
    """Split the group's pending targets into stacks (one per cold / warm / number of power
    iterations, cut where a stack would take more than opts.max_stack_bytes); clears g.pending."""
    cap = g.cap(opts)
    g.exact += [i for i, (k, _) in g.pending.items() if k > cap]
    todo = {i: v for i, v in g.pending.items() if v[0] <= cap}
    g.pending = {}
    stacks = []
    # cold members apart from warm ones, and warm ones apart by their power iterations (more for
    # those sketched again because their first pass lagged or their envelope grew: see
    # SketchOptions), each cut into runs
    kinds: dict = {}
    for i, (_, warm) in todo.items():
        iters = None if warm is None or i not in g.iterated else max(opts.warm_power_iters, g.iterated[i])
        kinds.setdefault((warm is None, iters), []).append(i)
    for (cold, iters), members in kinds.items():
        for run in weights.chunks(members, opts.max_stack_bytes):
            k = max(todo[i][0] for i in run)
            stacks.append(_Stack(g, run, [todo[i][1] for i in run], k, g.method == "native" and k <= opts.native_max_k,
                                 power_iters=iters))
    return stacks


def _align_native_widths(stacks: list[_Stack], weights, opts: SketchOptions) -> None:
    """Widen native stacks to a wider one's width when that is at most opts.align_width more
    columns (and within their own limits), so that they share one native call: warm targets'
    envelopes differ by a column or two between shape groups, and each distinct width costs a
    whole launch (a block's latency).  A wider sketch is never less accurate."""
    native = sorted((s for s in stacks if s.native), key=lambda s: -s.k)
    for wide in native:
        device = weights.raw[wide.members[0]].device
        for s in native:
            limit = min(s.group.cap(opts), s.group.n)
            if (s.k < wide.k <= min(s.k + opts.align_width, limit)
                    and weights.raw[s.members[0]].device == device):
                s.k = wide.k


def _sketch_stack_(weights, st: _Stack, attempt: int, opts: SketchOptions) -> None:
    """Range finder and Gram matrices of the stack; what remains is its eigensolve."""
    stack = weights.stack(st.members)  # refresh_slices_ runs under no_grad
    # (modulo 2**64, what manual_seed takes: any seed >= 0 is a valid option, and one near the
    # top raised "Overflow when unpacking long long" at the first refresh, after the build took it)
    gen = torch.Generator(device=stack.device).manual_seed((opts.seed + 7919 * attempt) % 2**64)
    # first attempt: the one-pass orthonormalization's check rides on the commit's transfer;
    # members that fail it are sketched again, checked at once (see C.UNTRUSTED)
    st.sketch = randomized.sketch(stack, st.k, st.starts, cold_power_iters=opts.cold_power_iters,
                                  warm_power_iters=opts.warm_power_iters if st.power_iters is None else st.power_iters,
                                  generator=gen, check_later=attempt == 0,
                                  max_top_up=opts.oversampling // 2, residuals=opts.max_residual < 1)
    st.energy = _energy(stack)


# below this, an energy summed from float32 squares may have lost a visible part of itself to
# underflow (squares below 2^-126 lose bits: at most n 2^-126 in all, n 2^-62 of this)
_FAST_ENERGY_MIN = 2.0**-64


def _energy(stack: Tensor) -> Tensor:
    """(b,) float64 ||W||_F^2 of each member: norms along its contiguous dimension in its
    compute dtype, then their norm in float64.  ``vector_norm(stack, dtype=float64)`` cast
    its input first: a float64 copy of the whole stack (twice its bytes, up to 2 GiB at the
    default max_stack_bytes) at every refresh, for a total no more exact than the float32
    Ritz values it is compared with (both about 1e-7 relative).  Where float32 squares
    overflow (inf) or underflow (below _FAST_ENERGY_MIN), _checked_energy redoes it."""
    dim = -1 if stack.stride(-1) == 1 else -2  # (an all-tall stack is a transposed view)
    norms = torch.linalg.vector_norm(stack, dim=dim, dtype=reference.compute_dtype(stack.dtype))
    return torch.linalg.vector_norm(norms, dim=-1, dtype=torch.float64).square()


def _checked_energy(weights) -> Callable[[int, float, float], float]:
    """commit_sketch's ``energy_check``: a member's energy from a float64 norm of its weights
    where _energy could not give it (finite weights whose float32 squares overflowed, inf, or
    may have underflowed: below _FAST_ENERGY_MIN, the weights not zero, their top Ritz value
    is not); else the energy as it is.  A host sync per redone member, for weights no training
    run has."""

    def check(i: int, sigma_1: float, energy: float) -> float:
        if math.isinf(energy) or (energy < _FAST_ENERGY_MIN and sigma_1 > 0):
            return _float64_energy(weights[i])
        return energy

    return check


def _float64_energy(W: Tensor) -> float:
    return float(torch.linalg.vector_norm(W, dtype=torch.float64).square())


def _finish_stacks(weights, states, configs, stacks: list[_Stack], solvers, opts: SketchOptions,
                   before_wait: Callable[[], None] | None = None) -> None:
    """Commit solved stacks; queue their retries (wider sketch) or exact SVDs on their groups.
    The scalars every commit decides on cross to the host in one transfer for all the stacks
    (on a GPU each transfer waits for the device to drain; ``before_wait`` runs first)."""
    solved = [st.sketch.triplets(*st.eig) for st in stacks]
    columns = [C.commit_columns(st.energy, st.members, states, S, st.sketch.finite, st.sketch.trusted,
                                lambda eps, st=st, V=V, S=S: _first_pass_lag(st, V, S, eps),
                                st.sketch.ritz_residuals(*st.eig))
               for st, (_, S, V) in zip(stacks, solved)]
    if before_wait is not None:
        before_wait()
    hosts = C.to_host(columns)
    for st, (U, S, V), host in zip(stacks, solved, hosts):
        _finish_stack(weights, states, configs, st, U, S, V, host, solvers, opts)


def _first_pass_lag(st: _Stack, V, S, eps):
    """Sketch.lag of the members still on their first pass from the previous refresh's
    factors; 0 for those already sketched again from this refresh's V (that pass is the one
    more step of subspace iteration a lag asks for: they are not sent back again)."""
    lag = st.sketch.lag(V, S, eps)
    again = [j for j, i in enumerate(st.members) if i in st.group.stepped]
    if again:
        lag = lag.index_fill(0, to_device(again, torch.int64, lag.device), 0.0)
    return lag


def _finish_stack(weights, states, configs, st: _Stack, U, S, V, host, solvers, opts: SketchOptions) -> None:
    g, members, k = st.group, st.members, st.k
    place = {i: j for j, i in enumerate(members)}  # (a list.index per retried member was quadratic in N)
    final = k >= g.n
    retry = C.commit_sketch(st.energy, members, states, configs, U, S, V, opts, final=final,
                           finite=st.sketch.finite, host=host, grown=g.grown, iterated=g.iterated,
                           energy_check=_checked_energy(weights))
    refined_V = {}  # a widened retry of a refined member starts from its refined V
    refine = [i for i, width in retry.items() if width == C.REFINE]
    if refine:  # the same subspace, its k x k problem in float64 (see SketchOptions)
        rows = to_device([place[i] for i in refine], torch.int64, U.device)
        sub, Q2 = weights.stack(refine).double(), U.index_select(0, rows).double()
        energy = torch.linalg.vector_norm(sub, dim=(-1, -2)).square()  # (exact: its Ritz values are too)
        B2, G2 = randomized.gram(sub, Q2)
        lam2, E2 = solvers["torch"](G2)
        U2, S2, V2 = randomized.ritz_from_eig(Q2, B2, lam2, E2)
        # their residual check, in float64 too: the fp32 one cannot judge these targets (their
        # sigma_{r+1} or eps lies below resolvable_ratio sigma_1), and skipping it committed
        # sketches far from converged (a first warm refresh with one dominant direction:
        # sigma_{r+1} / sigma_1 = 3e-3, R(X) off by 6.7e-3 with an estimate of 3.0e-3)
        rho2 = (randomized.ritz_residuals(randomized.residual_gram(sub, Q2, B2, G2), lam2, E2)
                if opts.max_residual < 1 and not final else None)
        host2, = C.to_host([C.commit_columns(energy, refine, states, S2, None, residuals=rho2)])
        retry.update(C.commit_sketch(energy, refine, states, configs, U2, S2, V2, opts, final=final, precise=True,
                                     host=host2, grown=g.grown, iterated=g.iterated, residuals=rho2 is not None))
        refined_V = {i: V2[j].to(V.dtype) for j, i in enumerate(refine)}

    def again_from_new_V(i: int, width: int, iters: int | None = None) -> None:
        # sketched again from this refresh's V (a refined member's: its refined V), so its lag
        # is no longer checked; ``iters``: its power iterations from now on (None: unchanged)
        g.stepped.add(i)
        if iters is not None:
            g.iterated[i] = iters
        g.pending[i] = (min(width, g.n), refined_V[i] if i in refined_V else V[place[i]])

    for i, width in retry.items():
        if width is None:
            g.exact.append(i)
        elif width == C.NONFINITE:
            g.nonfinite.append(i)
        elif width == C.UNTRUSTED:  # the same sketch again, its basis checked this time
            g.pending[i] = (k, st.starts[place[i]])
        elif width == C.LAGGING:  # more steps of subspace iteration
            again_from_new_V(i, k, opts.lag_power_iters)
        elif isinstance(width, C.Grown):  # wider and iterated (SketchOptions.max_envelope_growth)
            g.grown.add(i)
            again_from_new_V(i, width.width, opts.grown_power_iters)  # (wider than the cap: exact SVD)
        elif width != C.REFINE:  # wider: one pass (an int), or iterated (C.Wider)
            if g.widenings.get(i, 0) >= opts.max_widenings:  # still not wide enough
                g.exact.append(i)
                continue
            g.widenings[i] = g.widenings.get(i, 0) + 1
            if isinstance(width, C.Wider):
                again_from_new_V(i, width.width, opts.lag_power_iters)
            else:
                again_from_new_V(i, width)

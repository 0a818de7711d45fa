"""Refreshing the reweighting operator of each target from an SVD of its current weights.

The per-target state is a dict of plain tensors (so optimizer state dicts load with
``torch.load(weights_only=True)``):

    U (d1, k) float32, V (d2, k) float32, sigma (k,) float32  -- leading triplets of the anchor
    eps () float32          -- smoothing parameter (+inf before the first refresh)
    eps0 () float32         -- first eps of the geometric schedule (nan otherwise)
    sigma_next () float32   -- sigma_{r+1} of the anchor
    tail_energy () float32  -- fraction of ||W'||_F^2 outside the leading r triplets
    refreshes () int64      -- how many refreshes have been applied
    V_tail (d2, j) float32  -- right singular vectors just below the kept ones: with V, the
                               warm start of the next randomized refresh (inert in R); up to
                               2 x oversampling of them, so that a target whose envelope is
                               narrower than its stack's still fills the stack's sketch width
                               with them rather than with Gaussian columns

Targets of the same shape are stacked and decomposed in one batched call.

Methods (``refresh_slices_(..., method=...)``):
    exact       full fp32 SVD per target (the specification)
    randomized  warm-started randomized range finder + Rayleigh-Ritz (randomized.py) with
                torch.linalg.eigh for the k x k eigenproblems
    native      the same with the native Jacobi eigensolver (csrc/); torch.linalg.eigh where
                the extension or its part for the device is missing
    auto        native on CUDA tensors when its CUDA part is built, else randomized
Staggering (``stagger_phases``, ``due_for_refresh``) spreads the refreshes of a period over
its steps so that no single step pays all of them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from . import _native, randomized, reference
from ._transfer import to_device

REFRESH_METHODS = ("exact", "randomized", "native", "auto")


@dataclass(frozen=True)
class SketchOptions:
    """Knobs of the randomized refresh.

    oversampling      sketch width k = max(r, previous r_env) + oversampling
    warm_power_iters  power iterations when starting from the previous V (0: one pass)
    cold_power_iters  power iterations of a first refresh, whose sketch is also wider:
                      r + max(2 oversampling, r) columns, because random-init spectra are
                      flat near sigma_{r+1} and need the gap to converge -- and under the
                      `min` schedule the first eps is never raised again, so its error stays
    exact_fraction    a target whose needed width exceeds this fraction of min(d1, d2)
                      gets an exact SVD instead (the sketch would not be cheaper)
    max_widenings     retries with a wider sketch when the Ritz values did not reach eps
    resolvable_ratio  the k x k Gram matrix holds sigma^2 in fp32, so it resolves sigma_{r+1}
                      only down to about sqrt(fp32 eps) sigma_1; a target whose estimated
                      sigma_{r+1} / sigma_1 is below this ratio has its Rayleigh-Ritz step
                      redone in float64 on the same subspace (a k x k problem), which is
                      what a Q3R-trained weight needs: its tail falls far below sigma_1
    resolvable_ratio_fp64  the limit of that float64 step: its subspace still comes from fp32
                      sketches (W @ P), which resolve tail directions to 1% down to about
                      3e-5 sigma_1 (tests/test_randomized_refresh.py); below this ratio a
                      target gets an exact SVD
    max_sweeps, tol   of the native Jacobi solver
    native_max_k      "native" uses the Jacobi solver only for sketches up to this width and
                      torch.linalg.eigh above: one thread block per matrix wins for many
                      small matrices (H100, 48 x 169^2 warm: 4.4 ms vs 45 ms) and loses
                      badly for a few large ones (one 835^2 matrix: ~200 ms vs ~10 ms),
                      and k <= ~235 is where A fits the block's shared memory
    align_width       native stacks up to this many columns narrower than another one are
                      widened to its width, so that both go to the native solver in one call
    seed              of the private generator for Gaussian sketches (the global RNG is
                      never touched, so training randomness does not depend on refreshes)
    """

    oversampling: int = 16
    warm_power_iters: int = 0
    cold_power_iters: int = 8
    exact_fraction: float = 0.5
    max_widenings: int = 2
    resolvable_ratio: float = 1e-2
    resolvable_ratio_fp64: float = 1e-4
    max_sweeps: int = _native.DEFAULT_MAX_SWEEPS
    tol: float = _native.DEFAULT_TOL
    native_max_k: int = 256
    align_width: int = 8
    seed: int = 0x51E5


DEFAULT_SKETCH = SketchOptions()


@dataclass(frozen=True)
class SliceConfig:
    """What a refresh needs to know about one target (a weight or a slice of one)."""

    name: str
    rank: int
    schedule: str = "min"
    eps_value: float | None = None
    eps_floor: float | None = None
    num_refreshes: int | None = None


def new_slice_state(d1: int, d2: int, device=None) -> dict[str, Tensor]:
    """State of a target before its first refresh: zero-width factors, i.e. R = I."""
    f32 = dict(dtype=torch.float32, device=device)
    return {
        "U": torch.zeros(d1, 0, **f32),
        "V": torch.zeros(d2, 0, **f32),
        "sigma": torch.zeros(0, **f32),
        "eps": torch.tensor(math.inf, **f32),
        "eps0": torch.tensor(math.nan, **f32),
        "sigma_next": torch.tensor(math.nan, **f32),
        "tail_energy": torch.tensor(math.nan, **f32),
        "refreshes": torch.tensor(0, dtype=torch.int64, device=device),
        "V_tail": torch.zeros(d2, 0, **f32),
    }


def operator_of(state: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(U, V, d) of the current operator; d = 0 for triplets at or below eps."""
    return state["U"], state["V"], reference.reweighting_coefficients(state["sigma"], state["eps"])


def _warn_nonfinite(name: str, warned: set | None) -> None:
    if warned is not None and name in warned:
        return
    if warned is not None:
        warned.add(name)
    warnings.warn(
        f"q3r: target {name!r} has non-finite weights at a refresh; its refresh is skipped and "
        "the last good factors are kept",
        RuntimeWarning,
        stacklevel=3,
    )


def resolve_method(method: str, device: torch.device) -> str:
    """The concrete method for tensors on ``device`` ("auto" -> "native" or "randomized")."""
    if method not in REFRESH_METHODS:
        raise ValueError(f"refresh method must be one of {REFRESH_METHODS}, got {method!r}")
    if method == "auto":
        return "native" if device.type == "cuda" and _native.available(device) else "randomized"
    return method


@torch.no_grad()
def refresh_slices_(
    weights: list[Tensor],
    states: list[dict[str, Tensor]],
    configs: list[SliceConfig],
    method: str = "exact",
    warned: set | None = None,
    options: SketchOptions | None = None,
    before_wait: Callable[[], None] | None = None,
) -> list[bool]:
    """Refresh each target's factors in place from its current weights.

    weights[i] is a 2-D view of target i (any dtype); states[i] its state dict (updated in
    place); returns, per target, whether it was refreshed (False: non-finite weights, the
    old factors are kept and one warning per target name is issued).  ``method``: see the
    module docstring; ``options`` tune the randomized methods.

    ``before_wait`` is called exactly once, before this returns: on the sketched paths as
    soon as the first attempt's device work is queued and before the host first waits for
    its results, so that work queued there (AdamQ3R: the updates of the parameters not being
    refreshed) runs on the device while the host decides the commits.  It must not change
    these weights or states.
    """
    if method not in REFRESH_METHODS:
        raise ValueError(f"refresh method must be one of {REFRESH_METHODS}, got {method!r}")
    options = options or DEFAULT_SKETCH
    before_wait = _Once(before_wait)
    groups: dict[tuple, list[int]] = {}
    for i, W in enumerate(weights):
        groups.setdefault((tuple(W.shape), W.device), []).append(i)
    exact, sketched = [], []
    for (_, device), idx in groups.items():
        concrete = resolve_method(method, device)
        if concrete == "exact":
            exact.append(idx)
        else:
            sketched.append(_SketchGroup(idx, concrete, min(weights[idx[0]].shape)))
    # the sketched path finds non-finite weights inside its own passes (no sync of its own)
    nonfinite = set()
    if sketched:
        nonfinite |= _refresh_sketched(weights, states, configs, sketched, options, before_wait)
    nonfinite |= _refresh_exact_groups(weights, states, configs, exact, before_wait)
    before_wait()
    for i in sorted(nonfinite):
        _warn_nonfinite(configs[i].name, warned)
    return [i not in nonfinite for i in range(len(weights))]


class _Once:
    """A callback run at most once (None: nothing to run); ``ran``: whether it has run."""

    def __init__(self, fn: Callable[[], None] | None):
        self.fn, self.ran = fn, False

    def __call__(self) -> None:
        fn, self.fn = self.fn, None
        if fn is not None:
            self.ran = True
            fn()


def refresh_around(refresh: Callable[[Callable[[], None]], None], early: Callable[[], None] | None,
                   partial: str) -> None:
    """``refresh(before_wait)`` with ``early`` (work that needs nothing from the refresh, such
    as the updates of the targets not being refreshed) as its before_wait, so that it runs on
    the device while the refresh waits for it; run after the refresh where the refresh did
    not call it.  A refresh that fails after ``early`` ran raises a RuntimeError that starts
    with ``partial`` (what was already done), chained to the failure."""
    once = _Once(early)
    try:
        refresh(once)
    except Exception as error:
        if once.ran:
            raise RuntimeError(f"{partial}; do not repeat this step as it stands") from error
        raise
    once()


def _refresh_exact_groups(weights, states, configs, groups: list[list[int]],
                          before_wait: Callable[[], None] | None = None) -> set[int]:
    """Exact SVDs of same-shaped groups of targets; returns the non-finite ones (skipped).
    Finiteness comes from each group's stacked max |W| (randomized.max_abs), one host sync
    for all groups (``before_wait`` runs first): a NaN must not reach the SVD, which may
    fail on it."""
    if not groups:
        return set()
    if before_wait is not None:
        before_wait()
    flags = torch.cat([randomized.max_abs(torch.stack([weights[i] for i in idx]))[1].cpu() for idx in groups])
    finite = dict(zip((i for idx in groups for i in idx), flags.tolist()))
    for idx in groups:
        ok = [i for i in idx if finite[i]]
        if ok:
            _refresh_exact(weights, states, configs, ok)
    return {i for i, good in finite.items() if not good}


def _refresh_exact(weights, states, configs, idx) -> None:
    """Exact SVD of same-shaped targets; committed like a sketch that covers the whole
    spectrum (one host transfer for the group, not a few per target)."""
    stack = torch.stack([weights[i].to(torch.float32) for i in idx])
    U, S, V, spectrum = reference.anchor_factors(stack)
    energy = spectrum.double().square().sum(dim=-1)
    _commit_sketch(energy, idx, states, configs, U, S, V, DEFAULT_SKETCH, final=True)


# ------------------------------------------------------------------ randomized refresh
def _warm_basis(state: dict[str, Tensor]) -> tuple[Tensor, ...] | None:
    """Previous V and its tail (d2, j) as column blocks (randomized.Start), or None before the
    first refresh.  Not joined here: start_basis copies the blocks of a whole stack at once."""
    blocks = tuple(t for t in (state["V"], state.get("V_tail")) if t is not None and t.shape[-1] > 0)
    return blocks or None


def _sketch_width(rank: int, prev_env: int, cold: bool, n: int, opts: SketchOptions) -> int:
    k = max(rank, prev_env) + opts.oversampling
    if cold:
        k = max(k, rank + max(2 * opts.oversampling, rank))
    return min(k, n)


@dataclass
class _SketchGroup:
    """One same-shaped group of a sketched refresh and its targets still to do."""

    idx: list[int]
    method: str  # "randomized" or "native"
    n: int  # min(d1, d2)
    pending: dict = field(default_factory=dict)  # target -> (width, start basis)
    exact: list = field(default_factory=list)  # targets that get an exact SVD
    nonfinite: list = field(default_factory=list)  # targets found with non-finite weights
    widenings: dict = field(default_factory=dict)  # target -> how many times its sketch was widened

    def cap(self, opts: SketchOptions) -> int:
        """The widest sketch worth taking; wider targets get an exact SVD."""
        return int(opts.exact_fraction * self.n)


def _refresh_sketched(weights, states, configs, groups: list[_SketchGroup], opts: SketchOptions,
                      before_wait: Callable[[], None]) -> set[int]:
    """Randomized refresh of same-shaped groups; widen or fall back to exact SVD per target.
    Returns the targets skipped for non-finite weights.

    Each attempt sketches every group first and then solves the k x k problems of all
    stacks that share a solver, a width and a device in one call: the native solver costs
    one thread block's latency per call, whatever the batch, so three shape groups (a ViT's
    attention, fc1, fc2) in three calls cost three times one.  Stacks for torch.linalg.eigh
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
    # the same width), then the widenings: each member is widened max_widenings times at most
    for attempt in range(opts.max_widenings + 2):
        deferred = []
        stacks = [st for g in groups for st in _plan_stacks(g, opts)]
        _align_native_widths(stacks, weights, opts)
        for st in stacks:
            _sketch_stack_(weights, st, attempt, opts)
            if st.native:
                deferred.append(st)
            else:
                before_wait()
                st.eig = solvers["torch"](st.sketch.G)
                _finish_stacks(weights, states, configs, [st], solvers, opts)
        batches = _by_key(deferred, lambda st: (st.k, st.sketch.G.device))
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
    return nonfinite | _refresh_exact_groups(weights, states, configs, exact, before_wait)


def _by_key(items: list, key) -> list[list]:
    buckets: dict = {}
    for item in items:
        buckets.setdefault(key(item), []).append(item)
    return list(buckets.values())


@dataclass
class _Stack:
    """A planned stack: a group's cold or warm members and the sketch width they share."""

    group: _SketchGroup
    members: list[int]
    starts: list  # each member's warm start basis (or None)
    k: int
    native: bool  # its k x k problems go to the native solver
    sketch: randomized.Sketch | None = None  # filled by _sketch_stack_
    energy: Tensor | None = None  # (b,) float64 ||W||_F^2
    eig: tuple = ()  # (evals, evecs) of sketch.G


def _plan_stacks(g: _SketchGroup, opts: SketchOptions) -> list[_Stack]:
    """Split the group's pending targets into stacks (one per cold / warm); clears g.pending."""
    cap = g.cap(opts)
    g.exact += [i for i, (k, _) in g.pending.items() if k > cap]
    todo = {i: v for i, v in g.pending.items() if v[0] <= cap}
    g.pending = {}
    stacks = []
    # one batch per (cold, warm): cold members take more power iterations
    for cold in (True, False):
        members = [i for i, (_, warm) in todo.items() if (warm is None) == cold]
        if members:
            k = max(todo[i][0] for i in members)
            stacks.append(_Stack(g, members, [todo[i][1] for i in members], k,
                                 g.method == "native" and k <= opts.native_max_k))
    return stacks


def _align_native_widths(stacks: list[_Stack], weights, opts: SketchOptions) -> None:
    """Widen native stacks to a wider one's width when that is at most opts.align_width more
    columns (and within their own limits), so that they share one native call: warm targets'
    envelopes differ by a column or two between shape groups, and each distinct width costs a
    whole launch (a block's latency).  A wider sketch is never less accurate."""
    native = sorted((s for s in stacks if s.native), key=lambda s: -s.k)
    for wide in native:
        device = weights[wide.members[0]].device
        for s in native:
            limit = min(s.group.cap(opts), s.group.n)
            if (s.k < wide.k <= min(s.k + opts.align_width, limit)
                    and weights[s.members[0]].device == device):
                s.k = wide.k


def _sketch_stack_(weights, st: _Stack, attempt: int, opts: SketchOptions) -> None:
    """Range finder and Gram matrices of the stack; what remains is its eigensolve."""
    stack = torch.stack([weights[i] for i in st.members])  # refresh_slices_ runs under no_grad
    gen = torch.Generator(device=stack.device).manual_seed(opts.seed + 7919 * attempt)
    # first attempt: the one-pass orthonormalization's check rides on the commit's transfer;
    # members that fail it are sketched again, checked at once (see _UNTRUSTED)
    st.sketch = randomized.sketch(stack, st.k, st.starts, cold_power_iters=opts.cold_power_iters,
                                  warm_power_iters=opts.warm_power_iters, generator=gen, check_later=attempt == 0,
                                  max_top_up=opts.oversampling // 2)
    st.energy = torch.linalg.vector_norm(stack, dim=(-1, -2), dtype=torch.float64).square()


def _finish_stacks(weights, states, configs, stacks: list[_Stack], solvers, opts: SketchOptions,
                   before_wait: Callable[[], None] | None = None) -> None:
    """Commit solved stacks; queue their retries (wider sketch) or exact SVDs on their groups.
    The scalars every commit decides on cross to the host in one transfer for all the stacks
    (on a GPU each transfer waits for the device to drain; ``before_wait`` runs first)."""
    solved = [st.sketch.triplets(*st.eig) for st in stacks]
    columns = [_commit_columns(st.energy, st.members, states, S, st.sketch.finite, st.sketch.trusted)
               for st, (_, S, _) in zip(stacks, solved)]
    if before_wait is not None:
        before_wait()
    hosts = _to_host(columns)
    for st, (U, S, V), host in zip(stacks, solved, hosts):
        _finish_stack(weights, states, configs, st, U, S, V, host, solvers, opts)


def _finish_stack(weights, states, configs, st: _Stack, U, S, V, host, solvers, opts: SketchOptions) -> None:
    g, members, k = st.group, st.members, st.k
    final = k >= g.n
    retry = _commit_sketch(st.energy, members, states, configs, U, S, V, opts, final=final,
                           finite=st.sketch.finite, host=host)
    refined_V = {}  # a widened retry of a refined member starts from its refined V
    refine = [i for i, width in retry.items() if width == _REFINE]
    if refine:  # the same subspace, its k x k problem in float64 (see SketchOptions)
        rows = to_device([members.index(i) for i in refine], torch.int64, U.device)
        sub = torch.stack([weights[i].detach() for i in refine]).double()
        U2, S2, V2 = randomized.ritz_triplets(sub, U.index_select(0, rows).double(), solvers["torch"])
        retry.update(_commit_sketch(st.energy.index_select(0, rows), refine, states, configs, U2, S2, V2, opts,
                                    final=final, precise=True))
        refined_V = {i: V2[j].to(V.dtype) for j, i in enumerate(refine)}
    for i, width in retry.items():
        if width is None:
            g.exact.append(i)
        elif width == _NONFINITE:
            g.nonfinite.append(i)
        elif width == _UNTRUSTED:  # the same sketch again, its basis checked this time
            g.pending[i] = (k, st.starts[members.index(i)])
        elif width != _REFINE:
            if g.widenings.get(i, 0) >= opts.max_widenings:  # still not wide enough
                g.exact.append(i)
                continue
            g.widenings[i] = g.widenings.get(i, 0) + 1
            g.pending[i] = (min(width, g.n), refined_V[i] if i in refined_V else V[members.index(i)])


_REFINE = -1  # _commit_sketch's answer for "redo the Rayleigh-Ritz step in float64"
_NONFINITE = -2  # ... and for "skipped: the weights are not finite"
_UNTRUSTED = -3  # ... and for "its one-pass basis failed the check: sketch it again"


def _commit_columns(energy, members, states, S, finite: Tensor | None, trusted: Tensor | None = None) -> Tensor:
    """What _commit_sketch decides on, per member (b, k + 6) float64 on the device: the Ritz
    values, ||W||_F^2, the previous eps, eps0 and refresh count, whether W was finite and
    whether its basis passed its check (Sketch.trusted; None: all did)."""
    prev = [torch.stack([states[i][key] for i in members]).to(device=S.device, dtype=torch.float64)
            for key in ("eps", "eps0", "refreshes")]
    flags = [torch.ones(S.shape[0], dtype=torch.bool, device=S.device) if t is None else t for t in (finite, trusted)]
    return torch.cat([S.double(), energy[:, None], *(p[:, None] for p in prev), *(f.double()[:, None] for f in flags)],
                     dim=1)


def _to_host(tables: list[Tensor]) -> list[Tensor]:
    """The 2-D tables on the host, in one transfer."""
    if len(tables) == 1:
        return [tables[0].cpu()]
    flat = torch.cat([t.reshape(-1) for t in tables]).cpu()
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tables]), tables)]


def _commit_sketch(energy, members, states, configs, U, S, V, opts: SketchOptions, final: bool,
                   precise: bool = False, finite: Tensor | None = None,
                   host: Tensor | None = None) -> dict[int, int | None]:
    """Commit the members whose sketch reached eps; return {target: wider width, _REFINE where
    the fp32 Ritz values cannot resolve sigma_{r+1}, None where only an exact SVD does,
    _NONFINITE where ``finite`` (b,) says the weights were not, or _UNTRUSTED where the
    columns' trusted flag says the basis failed its check} for the rest (``precise``: U, S,
    V come from the float64 Rayleigh-Ritz step).

    A sketch is wide enough when at most k - oversampling / 2 Ritz values lie above the new
    eps, so the kept triplets had at least half the oversampling below them.  All scalars
    of the group cross to the host in one transfer (``host``: their _commit_columns, when
    the caller moved them together with other stacks').
    """
    k = S.shape[1]
    if host is None:
        host, = _to_host([_commit_columns(energy, members, states, S, finite)])
    margin = max(opts.oversampling // 2, 1)
    retry, commits = {}, []
    # Python floats from here on: the per-target arithmetic below is a few hundred scalars, and
    # indexing a host tensor costs an op dispatch per scalar (thousands per refresh)
    for j, (i, row) in enumerate(zip(members, host.tolist())):
        if not row[k + 4]:
            retry[i] = _NONFINITE
            continue
        if not row[k + 5]:
            retry[i] = _UNTRUSTED
            continue
        cfg = configs[i]
        sigma = row[:k]
        sigma_next = sigma[cfg.rank] if cfg.rank < k else 0.0  # (an exact SVD of rank >= min(d1, d2))
        eps, eps0 = reference.next_eps(cfg.schedule, row[k + 1], sigma_next, int(row[k + 3]), row[k + 2],
                                       cfg.eps_value, cfg.eps_floor, cfg.num_refreshes)
        r_env = sum(1 for value in sigma if value > eps)
        resolvable = opts.resolvable_ratio_fp64 if precise else opts.resolvable_ratio
        if not final and sigma_next < resolvable * sigma[0]:
            retry[i] = None if precise else _REFINE
            continue
        if not final and r_env > k - margin:
            retry[i] = r_env + opts.oversampling
            continue
        total = row[k]
        head = math.fsum(value * value for value in sigma[: cfg.rank])
        tail = 0.0 if total == 0 else min(max(total - head, 0.0) / total, 1.0)
        commits.append((j, i, r_env, [eps, eps0, sigma_next, tail]))
    if commits:
        _store_commits(commits, states, U, S, V, opts)
    return retry


def _store_commits(commits, states, U, S, V, opts: SketchOptions) -> None:
    """Write the committed members' factors and scalars into their states.

    Members that keep the same number of triplets share one copy per factor (a gather of
    their rows, cut to width): each state then holds a contiguous view of it, so a stack
    costs a handful of kernel launches, not three per target.  The views share storage as
    sigma always did; all members of a stack are refreshed together, so it is freed together.
    """
    device = states[commits[0][1]]["eps"].device
    # views from a few unbind calls: slicing row by row costs a dispatch per view and target
    scalars = to_device([c[3] for c in commits], torch.float32, device)
    eps, eps0, sigma_next, tail = (column.unbind(0) for column in scalars.t().unbind(0))
    counts = (torch.stack([states[i]["refreshes"] for _, i, _, _ in commits]) + 1).unbind(0)
    U, S, V = (t.to(torch.float32) for t in (U, S, V))  # once per stack, not per target
    by_width: dict[int, list[tuple[int, int, int]]] = {}
    for row, (j, i, r_env, _) in enumerate(commits):
        by_width.setdefault(r_env, []).append((row, j, i))
    for r_env, entries in by_width.items():
        rows = [j for _, j, _ in entries]
        index = None if rows == list(range(U.shape[0])) else to_device(rows, torch.int64, U.device)
        parts = {
            "U": _gather_columns(U, index, 0, r_env).unbind(0),
            "V": _gather_columns(V, index, 0, r_env).unbind(0),
            "V_tail": _gather_columns(V, index, r_env, min(r_env + 2 * opts.oversampling, V.shape[-1])).unbind(0),
        }
        sigmas = S[:, :r_env].unbind(0)
        for n, (row, j, i) in enumerate(entries):
            state = states[i]
            for key, views in parts.items():
                state[key] = views[n]
            state["sigma"] = sigmas[j]
            state["eps"], state["eps0"], state["sigma_next"] = eps[row], eps0[row], sigma_next[row]
            state["tail_energy"], state["refreshes"] = tail[row], counts[row]


def _gather_columns(T: Tensor, index: Tensor | None, start: int, stop: int) -> Tensor:
    """T[index, :, start:stop] (T: (b, d, k); None: every row) as one new contiguous tensor,
    in one kernel."""
    block = T[:, :, start:stop]
    return block.contiguous() if index is None else block.index_select(0, index)


# ------------------------------------------------------------------------ staggering
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
    slices by shape, so targets with the same shapes join the same stacks."""
    return tuple(sorted({tuple(s) for s in shapes}))


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

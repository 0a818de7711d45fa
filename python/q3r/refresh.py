"""Refreshing the reweighting operator of each target from an SVD of its current weights.

The per-target state is a dict of plain tensors (so optimizer state dicts load with
``torch.load(weights_only=True)``):

    U (d1, k) float32, V (d2, k) float32, sigma (k,) float32  -- leading triplets of the anchor
    eps () float32          -- smoothing parameter (+inf before the first refresh)
    eps0 () float32         -- first eps of the geometric schedule (nan otherwise)
    sigma_next () float32   -- sigma_{r+1} of the anchor
    tail_energy () float32  -- fraction of ||W'||_F^2 outside the leading r triplets
    refreshes () int64      -- how many refreshes have been applied
    tail (max(d1, d2), j) float32 -- singular vectors just below the kept ones on the longer
                               side (V's for d1 <= d2, U's for a tall target): with V (U), the
                               warm start of the next randomized refresh (inert in R); up to
                               2 x oversampling of them, so that a target whose envelope is
                               narrower than its stack's still fills the stack's sketch width
                               with them rather than with Gaussian columns (before 49887cd
                               it was "V_tail" (d2, j); upgrade_state converts a loaded one)

Targets of the same shape up to transposition are stacked and decomposed in one batched
call: a tall target (d1 > d2) is decomposed as its transpose, so that a transformer's fc1
and fc2 (d x 4d and 4d x d) share one stack, and every range finder Y = W P runs on the
wide orientation, where Y and its orthonormalization have min(d1, d2) rows.

Methods (``refresh_slices_(..., method=...)``):
    exact       full fp32 SVD per target (the specification)
    randomized  warm-started randomized range finder + Rayleigh-Ritz (randomized.py) with
                torch.linalg.eigh for the k x k eigenproblems
    native      the same with the native Jacobi eigensolver (csrc/); torch.linalg.eigh where
                the extension or its part for the device is missing
    auto        native on CUDA tensors when its CUDA part is built, else randomized
The randomized methods live in q3r._refresh_sketched, the commit of a refresh's results (exact
or sketched) in q3r._refresh_commit; staggering (q3r.stagger) spreads the refreshes of a
period over its steps so that no single step pays all of them.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from . import _native, randomized, reference
from . import _refresh_commit as C
from ._orientation import oriented
from ._precision import as_caller, refresh_precision
from ._refresh_sketched import SketchGroup, refresh_sketched

REFRESH_METHODS = ("exact", "randomized", "native", "auto")


@dataclass(frozen=True)
class SketchOptions:
    """Knobs of the randomized refresh.

    oversampling      sketch width k = max(r, previous r_env) + oversampling
    warm_power_iters  power iterations when starting from the previous V (0: one pass)
    cold_power_iters  power iterations of a first refresh, whose sketch is also wider:
                      r + max(2 oversampling, r) columns, because random-init spectra are
                      flat near sigma_{r+1} and need the gap to converge -- and under the
                      `min` schedule the first eps is never raised again, so its error stays;
                      where many envelope members come to lie just above eps, R(X) errs by
                      about as much as eps does (relative): a flat bulk under sigma_{r+1}
                      (256 x 256, rank 24) left eps 1.4e-3 low and R(X) off by 1.2e-3 to 1.7e-3
                      at the next refreshes with 8 iterations, 3.6e-4 with 12, 6.9e-5 with 16
    exact_fraction    a target whose needed width exceeds this fraction of min(d1, d2)
                      gets an exact SVD instead (the sketch would not be cheaper)
    max_widenings     retries with a wider sketch when the Ritz values did not reach eps
    max_envelope_growth  a warm target whose envelope would grow by more than this many
                      triplets since its last refresh is sketched again from its new V,
                      max(2 k, r_env + oversampling) wide, with grown_power_iters (an exact SVD
                      where that exceeds exact_fraction; a lagging one too, which this covers):
                      the new members come from the part of the spectrum a
                      warm sketch resolves worst, and where they come from a flat bulk whose
                      top edge has risen above eps (a Q3R-trained tail, lifted by training),
                      its Ritz values fall short and most of them are missed (768 x 768: R(X)
                      off by up to 7.7e-2, benchmarks/results/probes/refresh_accuracy_768_*.txt;
                      0: any growth); under the geometric schedule eps falls by design and
                      envelopes grow at most refreshes
    grown_power_iters power iterations of that sketch, and of its widenings if it needs any
                      (8 was the cold count when this was set; more barely helped: see below)
    max_sketched_growth  where that sketch finds more new members than this, the target gets
                      an exact SVD after all: the iteration converges slowly at the edge of a
                      flat bulk, and a bulk rising above eps by 82 members at once (768 x 768)
                      left R(X) off by 8.4e-4 with 8 iterations and 7.0e-4 with 16, against
                      6e-5 for the exact SVD (refresh_accuracy_768_cpu_ffc3be0.txt); under
                      the geometric schedule envelopes grew by 2 to 29 per refresh
                      (geometric_growth_768_cpu_*.txt)
    max_lag           one pass from the old factors lags weights that moved far since the
                      last refresh; a warm target whose lag (randomized.Sketch.lag: how far
                      its new right singular vectors left the span of the old ones, weighted
                      as the operator weighs them, about the relative error of R(X) this
                      leaves) exceeds this is sketched again from its new V, with
                      lag_power_iters power iterations (768 x 768, power-law spectrum, noise
                      of 1e-2 of the rms entry per period: R(X) off by 1.7e-3 in one pass,
                      7.9e-4 with one more plain pass; 3e-2: 2.7e-3 with a plain pass, 1.3e-3
                      with 2 power iterations, 7.7e-4 with 4); 1: never
    lag_power_iters   power iterations of that second sketch (the iteration is slow where the
                      spectrum is flat around eps, and a weight that moved far starts far off:
                      the difference between two passes then understates the error left, so
                      the second sketch is not checked again but iterated enough; a widening
                      it needs after that takes as many)
    max_residual      the lag sees how far the vectors moved, not how far the sketch is from
                      the weights' own triplets: where the spectrum is flat around eps and the
                      weights move fast (the first warm refreshes of random-init weights), one
                      pass leaves Ritz values near eps up to 1% short with a small lag (MLP on
                      the digits, step 5: lag 2.1e-4, R(X) off by 4.3e-3; a small ViT's MLP
                      weights, step 5: off by 1.3e-3 to 2.1e-3 after the lag's 4 power
                      iterations).  A sketch whose residual estimate (randomized.residual_error
                      from its Ritz residuals: the error was 1.4x to 3.5x the estimate along
                      real training runs) exceeds this is sketched again from its new V: with
                      lag_power_iters as a lagging one, wider too where it is also too narrow
                      (a widening), as a Grown one where its envelope grew; one that already
                      took power iterations (a cold sketch, or a lagging or grown one) gets an
                      exact SVD instead; judged where the fp32 Ritz values resolve
                      sigma_{r+1} and eps (see resolvable_ratio), and for the targets below
                      that after their float64 Rayleigh-Ritz step, from float64 residuals,
                      down to resolvable_ratio_fp64; the residuals cost one more product with
                      the weights per sketch (a warm one-pass sketch takes two without it; in
                      float64 for the refined targets); 1 or more: never, and not computed --
                      and then a sketch that
                      is only too narrow is widened in one pass, which left a cold random-init
                      400 x 300 sketch under a low constant eps off by 2.8e-3.  A sketch whose
                      sigma_{r+1}, where eps is set from it, may fall short by more than
                      q3r._refresh_commit.MAX_EPS_SHORTFALL (2e-3) is sketched again the same
                      way (the estimate weighs that shortfall by (eps / sigma_i)^2, about 0
                      for a deep tail); off with this check, at 1 or more
    resolvable_ratio  the k x k Gram matrix holds sigma^2 in fp32, so it resolves sigma_{r+1}
                      only down to about sqrt(fp32 eps) sigma_1; a target whose estimated
                      sigma_{r+1} / sigma_1 is below this ratio has its Rayleigh-Ritz step
                      redone in float64 on the same subspace (a k x k problem), which is
                      what a Q3R-trained weight needs: its tail falls far below sigma_1
    resolvable_ratio_fp64  the limit of that float64 step: its subspace still comes from fp32
                      sketches (W @ P), which resolve tail directions to 1% down to about
                      3e-5 sigma_1 (tests/test_randomized_refresh.py); below this ratio a
                      target gets an exact SVD
    flat_tolerance    a sketch whose uncaptured part has an rms singular value of at least
                      (1 - flat_tolerance) eps gets an exact SVD (>= 0 here;
                      q3r.distributed.configure takes a negative one as never): the
                      spectrum is flat around eps beyond it, and its Ritz values
                      undercount the members above eps (orthogonal
                      init, 256 x 256, rank 24: R(X) off by up to 4.6e-3 before this; see
                      q3r._refresh_commit.flat_beyond)
    max_sweeps, tol   of the native Jacobi solver: max_sweeps >= 1, 0 < tol < 1 (either
                      outside left its input unrotated, which looks converged)
    native_max_k      "native" uses the Jacobi solver only for sketches up to this width and
                      torch.linalg.eigh above: one thread block per matrix wins for many
                      small matrices (H100, 48 x 169^2 warm: 4.4 ms vs 45 ms) and loses
                      badly for a few large ones (one 835^2 matrix: ~200 ms vs ~10 ms),
                      and k <= ~235 is where A fits the block's shared memory
    align_width       native stacks up to this many columns narrower than another one are
                      widened to its width, so that both go to the native solver in one call
    max_stack_bytes   the most a stack of same-shaped targets may take, counted at 4 bytes
                      an entry (it is a copy of their weights): larger groups are refreshed
                      in several stacks (float64 weights take twice this; bf16 ones 1.5x
                      while their float32 copy is made)
                      (ViT-B's and GPT-2's groups take at most 226 MB, LLaMA-1B's MLP group
                      3.2 GB); also bounds the exact path's stacks
    seed              of the private generator for Gaussian sketches (the global RNG is
                      never touched, so training randomness does not depend on refreshes)
    """

    oversampling: int = 16
    warm_power_iters: int = 0
    cold_power_iters: int = 16
    exact_fraction: float = 0.5
    max_widenings: int = 2
    max_envelope_growth: int = 2
    max_lag: float = 6e-4
    lag_power_iters: int = 4
    max_residual: float = 3e-4
    grown_power_iters: int = 8
    max_sketched_growth: int = 32
    resolvable_ratio: float = 1e-2
    resolvable_ratio_fp64: float = 1e-4
    flat_tolerance: float = 2e-2
    max_sweeps: int = _native.DEFAULT_MAX_SWEEPS
    tol: float = _native.DEFAULT_TOL
    native_max_k: int = 256
    align_width: int = 8
    max_stack_bytes: int = 2**30
    seed: int = 0x51E5

    def __post_init__(self):  # (every way of building one is checked: a NaN would turn a check off)
        for f in dataclasses.fields(self):
            value = _check_sketch_option(f.name, getattr(self, f.name), f.default, "SketchOptions")
            object.__setattr__(self, f.name, value)  # (a numpy number as the plain Python one)


def _check_sketch_option(name: str, value, default, where: str):
    """A SketchOptions field's value: an integer where the default is an int, else a finite real
    number; >= 0 (> 0 for max_stack_bytes, max_sweeps and tol; tol < 1 too). Returns it as a plain Python int or float
    (a numpy number from a sweep is taken, and stored as what a weights_only load reads).
    Raises ValueError naming it."""
    whole = type(default) is int
    ok = (isinstance(value, numbers.Integral) if whole else isinstance(value, numbers.Real)) and not isinstance(value, bool)
    if ok:
        value = int(value) if whole else (int(value) if isinstance(value, numbers.Integral) else float(value))
        ok = whole or math.isfinite(value)
    # (max_sweeps 0 and a tol of 1 or more leave the Jacobi solver's input as it is, which
    # |a_pq| <= sqrt(a_pp a_qq) makes converged: R(X) 7.6e-3 off the exact operator, unwarned)
    positive = name in ("max_stack_bytes", "tol", "max_sweeps")
    if not ok or value < 0 or (positive and value == 0):
        raise ValueError(f"{where}: {name} must be a{'n int' if whole else ' finite number'} "
                         f"{'> 0' if positive else '>= 0'}, got {value!r}")
    if name == "tol" and value >= 1:
        raise ValueError(f"{where}: tol must be a finite number > 0 and < 1 (relative to sqrt(a_pp a_qq)), got {value!r}")
    return value


DEFAULT_SKETCH = SketchOptions()


def sketch_options(overrides: dict | None, where: str = "refresh_options") -> SketchOptions:
    """SketchOptions with the fields named in ``overrides`` (a dict, as AdamQ3R groups and Q3R
    take them: plain values keep state dicts loadable with weights_only=True) changed from the
    defaults. Unknown names and values of the wrong kind raise ValueError naming them."""
    if overrides is None:
        return DEFAULT_SKETCH
    if not isinstance(overrides, dict):
        raise ValueError(f"{where} must be a dict of SketchOptions fields, got {overrides!r}")
    defaults = {f.name: getattr(DEFAULT_SKETCH, f.name) for f in dataclasses.fields(SketchOptions)}
    for name, value in overrides.items():
        if name not in defaults:
            raise ValueError(f"{where}: unknown option {name!r}; the options are {sorted(defaults)}")
        _check_sketch_option(name, value, defaults[name], where)  # (naming where; the new one stores plain values)
    return dataclasses.replace(DEFAULT_SKETCH, **overrides) if overrides else DEFAULT_SKETCH


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
        "tail": torch.zeros(max(d1, d2), 0, **f32),
    }


_STATE_KEYS = frozenset(new_slice_state(1, 1)) - {"tail"}  # (the warm-start tail is optional: upgrade_state)


def upgrade_state(state: dict[str, Tensor], d1: int, d2: int) -> dict[str, Tensor]:
    """A d1 x d2 target's state as loaded from a checkpoint, in this version's layout (in
    place; returned).  The warm-start tail was "V_tail" (d2, j) before it became "tail" on
    the longer side: kept for d1 <= d2, dropped for a tall target (whose next refresh then
    tops its warm start up with Gaussian columns, as after any envelope change)."""
    old = state.pop("V_tail", None)
    if "tail" not in state:
        keep = old is not None and d1 <= d2 and old.dim() == 2 and old.shape[0] == d2
        state["tail"] = old if keep else torch.zeros(max(d1, d2), 0, dtype=torch.float32, device=state["V"].device)
    return state


def tail_mismatch(state: dict[str, Tensor], d1: int, d2: int) -> str | None:
    """Why a loaded state's warm-start tail does not fit a d1 x d2 target (None: it fits or
    is absent), for the loaders' checks before anything changes."""
    tail = state.get("tail")
    if tail is None or (tail.dim() == 2 and tail.shape[0] == max(d1, d2)):
        return None
    return f"warm-start tail of shape {tuple(tail.shape)} does not fit a {d1}x{d2} slice (expected ({max(d1, d2)}, j))"


def operator_of(state: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(U, V, d) of the current operator; d = 0 for triplets at or below eps."""
    return state["U"], state["V"], reference.reweighting_coefficients(state["sigma"], state["eps"])


def _warn_nonfinite(name: str, warned: set | None) -> None:
    warn_once(name, warned, f"q3r: target {name!r} has non-finite weights (or singular values beyond float32's "
              "range) at a refresh; its refresh is skipped and the last good factors are kept", stacklevel=4)


def warn_once(key, warned: set | None, message: str, stacklevel: int) -> None:
    """A RuntimeWarning, once per key in ``warned`` (an optimizer's or regularizer's set; None:
    every time)."""
    if warned is not None:
        if key in warned:
            return
        warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


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
    _check_inputs(weights, states, configs)
    with refresh_precision():  # fp32 whatever the caller's autocast / TF32 settings (q3r._precision)
        return _refresh_slices(weights, states, configs, method, warned, options or DEFAULT_SKETCH,
                               _Once(as_caller(before_wait)))


def _refresh_slices(weights, states, configs, method: str, warned: set | None, options: SketchOptions,
                    before_wait: _Once) -> list[bool]:
    weights, states = oriented(weights, states)  # tall targets as their transposes
    groups: dict[tuple, list[int]] = {}
    for i, W in enumerate(weights.raw):  # by oriented shape, without making the views
        groups.setdefault((tuple(sorted(W.shape)), W.device), []).append(i)
    exact, sketched = [], []
    for (_, device), idx in groups.items():
        concrete = resolve_method(method, device)
        if concrete == "exact":
            exact += weights.chunks(idx, options.max_stack_bytes)
        else:
            sketched.append(SketchGroup(idx, concrete, min(weights.raw[idx[0]].shape)))
    # the sketched path finds non-finite weights inside its own passes (no sync of its own)
    nonfinite, fallback = set(), []
    if sketched:  # it leaves the targets that need an exact SVD after all to the call below
        nonfinite, fallback = refresh_sketched(weights, states, configs, sketched, options, before_wait)
    fallback = [run for idx in fallback for run in weights.chunks(idx, options.max_stack_bytes)]
    nonfinite |= _refresh_exact_groups(weights, states, configs, exact + fallback, before_wait)
    before_wait()
    for i in sorted(nonfinite):
        _warn_nonfinite(configs[i].name, warned)
    return [i not in nonfinite for i in range(len(weights))]


def _check_inputs(weights, states, configs) -> None:
    """What refresh_slices_ needs of its arguments, checked before any target is refreshed
    (AdamQ3R and Q3R check their options when built; this is for direct callers)."""
    if not len(weights) == len(states) == len(configs):
        raise ValueError(f"refresh_slices_ needs one state and one config per weight, got {len(weights)} weights, "
                         f"{len(states)} states, {len(configs)} configs")
    for W, state, cfg in zip(weights, states, configs):
        if W.dim() != 2:
            raise ValueError(f"target {cfg.name!r}: a refresh takes 2-D weights, got shape {tuple(W.shape)}")
        # (its keys only: a set operation per target, this runs at every refresh; AdamQ3R and
        # Q3R check loaded states whole, q3r._state_check)
        if not isinstance(state, dict) or not _STATE_KEYS <= state.keys():
            have = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"target {cfg.name!r}: its state must be a dict with the keys of new_slice_state "
                             f"{sorted(_STATE_KEYS)}, got {have}")
        if isinstance(cfg.rank, bool) or not isinstance(cfg.rank, int) or not 1 <= cfg.rank < min(W.shape):
            raise ValueError(f"target {cfg.name!r}: rank must be an int with 1 <= rank < {min(W.shape)} "
                             f"for a {tuple(W.shape)} weight, got {cfg.rank!r}")
        if (why := reference.schedule_problem(cfg.schedule, cfg.eps_value, cfg.eps_floor, cfg.num_refreshes)):
            raise ValueError(f"target {cfg.name!r}: {why}")


class _Once:
    """A callback run at most once (None: nothing to run); ``ran``: whether it has run (or
    started to), ``failed``: whether it raised."""

    def __init__(self, fn: Callable[[], None] | None):
        self.fn, self.ran, self.failed = fn, False, False

    def __call__(self) -> None:
        fn, self.fn = self.fn, None
        if fn is not None:
            self.ran = True
            try:
                fn()
            except BaseException:
                self.failed = True
                raise


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
        if once.ran and not once.failed:  # (an error of ``early`` itself is raised as it is)
            raise RuntimeError(f"{partial}; do not repeat this step as it stands") from error
        raise
    once()


def _refresh_exact_groups(weights, states, configs, groups: list[list[int]],
                          before_wait: Callable[[], None] | None = None) -> set[int]:
    """Exact SVDs of same-shaped groups of targets; returns the non-finite ones (skipped).
    Finiteness comes from each group's stacked max |W| (randomized.max_abs), one host
    transfer for all groups on one device (``before_wait`` runs first): a NaN must not reach
    the SVD, which may fail on it."""
    if not groups:
        return set()
    if before_wait is not None:
        before_wait()
    # (a float64 weight beyond float32's range counts as non-finite: its float32 SVD would be;
    # compared in float32, as in a bf16 / fp16 one float32's max rounds to inf, and inf <= inf)
    flags = [randomized.max_abs(weights.stack(idx))[0].float() <= torch.finfo(torch.float32).max for idx in groups]
    flags = torch.cat(flags).cpu() if len({f.device for f in flags}) == 1 else torch.cat([f.cpu() for f in flags])
    finite = dict(zip((i for idx in groups for i in idx), flags.tolist()))
    refused = set()
    for idx in groups:
        ok = [i for i in idx if finite[i]]
        if ok:
            refused |= _refresh_exact(weights, states, configs, ok)
    return refused | {i for i, good in finite.items() if not good}


def _refresh_exact(weights, states, configs, idx) -> set[int]:
    """Exact SVD of same-shaped targets; committed like a sketch that covers the whole
    spectrum (one host transfer for the group, not a few per target).  Returns the targets
    not committed: singular values beyond float32's range (weights near its limit)."""
    stack = weights.stack(idx).to(torch.float32)
    U, S, V, spectrum = reference.anchor_factors(stack)
    energy = spectrum.double().square().sum(dim=-1)
    return set(C.commit_sketch(energy, idx, states, configs, U, S, V, DEFAULT_SKETCH, final=True, precise=True))

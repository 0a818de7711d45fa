"""Deciding on and storing the result of a refresh (sketched or exact): per target, whether
its triplets reached eps and are committed -- eps scheduled (SPEC section 3), the kept
triplets and the warm-start tail written into its state -- or what it needs instead (a
wider sketch, a float64 Rayleigh-Ritz step, an exact SVD).  Everything a stack's commits
decide on crosses to the host in one transfer."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from . import reference
from .randomized import residual_error
from ._transfer import to_device

if TYPE_CHECKING:
    from .refresh import SketchOptions

REFINE = -1  # commit_sketch's answer for "redo the Rayleigh-Ritz step in float64"
NONFINITE = -2  # ... and for "skipped: the weights are not finite"
UNTRUSTED = -3  # ... and for "its one-pass basis failed the check: sketch it again"
LAGGING = -4  # ... and for "its triplets lag the weights: sketch it again from its new V"
_FP32_MAX = torch.finfo(torch.float32).max  # the factors are stored in float32


@dataclass(frozen=True)
class Grown:
    """commit_sketch's answer for "its envelope grew: sketch it again from its new V, this
    wide, with grown_power_iters" (see SketchOptions.max_envelope_growth).
    Wider than SketchGroup.cap, it gets an exact SVD instead."""

    width: int


@dataclass(frozen=True)
class Wider:
    """commit_sketch's answer for "its sketch is too narrow and far from converged (its
    residual estimate exceeds max_residual): sketch it again from its new V, this wide, with
    lag_power_iters" -- a widening, counted against max_widenings.  A plain int answer is a
    widening without power iterations."""

    width: int


def commit_columns(energy, members, states, S, finite: Tensor | None, trusted: Tensor | None = None,
                   lag: Callable[[Tensor], Tensor] | None = None, residuals: Tensor | None = None) -> Tensor:
    """What commit_sketch decides on, per member (b, 2 k + 7) float64 on the device: the Ritz
    values, ||W||_F^2, the previous eps, eps0 and refresh count, whether W was finite,
    whether its basis passed its check (Sketch.trusted; None: all did), its lag (``lag``:
    the previous eps (b,) -> Sketch.lag; None: 0) and its Ritz residuals (``residuals``
    (b, k): Sketch.ritz_residuals; None: 0)."""
    prev = [torch.stack([states[i][key] for i in members]).to(device=S.device, dtype=torch.float64)
            for key in ("eps", "eps0", "refreshes")]
    flags = [torch.ones(S.shape[0], dtype=torch.bool, device=S.device) if t is None else t for t in (finite, trusted)]
    lags = torch.zeros_like(prev[0]) if lag is None else lag(prev[0]).double()
    rho = torch.zeros_like(S, dtype=torch.float64) if residuals is None else residuals.double()
    return torch.cat([S.double(), energy[:, None], *(p[:, None] for p in prev), *(f.double()[:, None] for f in flags),
                      lags[:, None], rho], dim=1)


def to_host(tables: list[Tensor]) -> list[Tensor]:
    """The 2-D tables on the host, in one transfer."""
    if len(tables) == 1:
        return [tables[0].cpu()]
    flat = torch.cat([t.reshape(-1) for t in tables]).cpu()
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tables]), tables)]


def commit_sketch(energy, members, states, configs, U, S, V, opts: SketchOptions, final: bool,
                  precise: bool = False, finite: Tensor | None = None,
                  host: Tensor | None = None, grown=frozenset(), iterated=frozenset(),
                  residuals: bool = True, energy_check=None) -> dict[int, int | Grown | None]:
    """Commit the members whose sketch reached eps; return {target: wider width, REFINE where
    the fp32 Ritz values cannot resolve sigma_{r+1}, None where only an exact SVD does,
    NONFINITE where ``finite`` (b,) says the weights were not, UNTRUSTED where the
    columns' trusted flag says the basis failed its check, LAGGING where their lag
    exceeds opts.max_lag or whose residual estimate exceeds opts.max_residual (Wider where
    such a sketch is also too narrow; None where it already took power iterations: cold
    ones, and those in ``iterated``), or Grown} for the rest (``precise``: U, S, V come from
    the float64 Rayleigh-Ritz step).

    A sketch is wide enough when at most k - oversampling / 2 Ritz values lie above the new
    eps, so the kept triplets had at least half the oversampling below them; a warm member
    whose envelope would grow by more than opts.max_envelope_growth is sketched again as a
    Grown one (see SketchOptions), once: ``grown`` holds the members that already were.  All
    scalars of the group cross to the host in one transfer (``host``: their commit_columns,
    when the caller moved them together with other stacks'). ``residuals``: whether ``host``
    holds the Ritz residuals (the residual check runs where it does, unless
    opts.max_residual >= 1; a precise commit judges them down to resolvable_ratio_fp64).
    ``energy_check(target, sigma_1, energy) -> energy``: for each member with finite weights,
    the energy to decide on in place of the one in the columns (see _refresh_sketched._energy).
    """
    k = S.shape[1]
    if host is None:
        host, = to_host([commit_columns(energy, members, states, S, finite)])
    margin = max(opts.oversampling // 2, 1)
    retry, commits = {}, []
    # Python floats from here on: the per-target arithmetic below is a few hundred scalars, and
    # indexing a host tensor costs an op dispatch per scalar (thousands per refresh)
    rows = host.tolist()
    if energy_check is not None:
        for i, row in zip(members, rows):
            if row[k + 4]:  # (a non-finite member's is not needed)
                row[k] = energy_check(i, row[0], row[k])
    scheduled = [_scheduled(row, k, configs[i]) for i, row in zip(members, rows)]
    checked = residuals and not (final or opts.max_residual >= 1)  # (>= 1: the check is off)
    residual = _residual_errors(host, k, scheduled, members, configs, U, V) if checked else [0.0] * len(members)
    short = _eps_shortfalls(rows, k, scheduled, members, configs) if checked else [0.0] * len(members)
    for j, (i, row, plan) in enumerate(zip(members, rows, scheduled)):
        if not isinstance(plan, tuple):
            retry[i] = plan
            continue
        cfg = configs[i]
        sigma = row[:k]
        eps, eps0, sigma_next = plan
        r_env = sum(1 for value in sigma if value > eps)
        prev_env = states[i]["sigma"].shape[0]  # (a shape: no device access)
        # the Ritz values of new members are not to be trusted, nor is their count (a bulk lifted
        # above eps shows fewer of its members than it has): sketched again twice as wide, or an
        # exact SVD where that is wider than the cap.  Only as wide as the new envelope needs
        # (r_env + oversampling), the sketch missed the contract under the geometric schedule at
        # 768 x 768 (R(X) off by 3.6e-3 to 5.2e-3, CPU, a development variant)
        grows = (not final and int(row[k + 3]) > 0 and i not in grown
                 and r_env > prev_env + opts.max_envelope_growth)
        grow = Grown(max(r_env + opts.oversampling, 2 * k)) if grows else None
        if not final and row[k + 6] > opts.max_lag:  # (before REFINE: a float64 step keeps the subspace)
            retry[i] = grow or LAGGING  # (a grown sketch iterates more than a lagging one: it does both)
            continue
        resolvable = opts.resolvable_ratio_fp64 if precise else opts.resolvable_ratio
        # far from converged (SketchOptions.max_residual); judged only where the Ritz values
        # resolve sigma_{r+1} and eps, as do their residuals (fp32: else REFINE follows, which
        # judges them in float64).
        # Sketched again with power iterations: wider where it is also too narrow (a plain
        # widening, one pass, left a random-init cold sketch off by 2.8e-3), as it is where it
        # grew; an exact SVD where it already took power iterations (a cold sketch took
        # cold_power_iters; ``iterated``: a lagging or grown one)
        if (not final and (residual[j] > opts.max_residual or short[j] > MAX_EPS_SHORTFALL)
                and min(sigma_next, eps) >= resolvable * sigma[0]):
            cold = int(row[k + 3]) == 0
            narrow = r_env > k - margin
            if grow or narrow:
                retry[i] = grow or Wider(r_env + opts.oversampling)
            else:
                retry[i] = None if cold or i in iterated else LAGGING
            continue
        # (a sketch as wide as the matrix spans it: its float64 step is exact up to rounding,
        # but its fp32 Gram matrix resolves a deep tail no better than a narrower one's).
        # The deepest value the operator needs is the smaller of sigma_{r+1} and eps: under the
        # geometric schedule eps falls far below sigma_{r+1}, and the envelope members down
        # there were off by 1.8e-3 in R(X) in a real training run (MLP on digits, eps at
        # 2e-3 sigma_1, sigma_{r+1} at 0.27 sigma_1; 5.7e-7 after the float64 step)
        if not (final and precise) and min(sigma_next, eps) < resolvable * sigma[0]:
            retry[i] = None if precise else REFINE
            continue
        if not final and i in grown and r_env > prev_env + opts.max_sketched_growth:
            retry[i] = None  # too many new members to resolve in a flat bulk (see SketchOptions)
            continue
        if grow:
            retry[i] = grow
            continue
        if not final and r_env > k - margin:
            retry[i] = r_env + opts.oversampling
            continue
        # wide enough by its Ritz values, but those undercount where the spectrum is flat at eps
        if not final and flat_beyond(sigma, row[k], U.shape[-2], eps, opts.flat_tolerance):
            retry[i] = None  # (see SketchOptions.flat_tolerance)
            continue
        commits.append((j, i, r_env, [eps, eps0, sigma_next, tail_fraction(row[k], sigma, cfg.rank)]))
    if commits:
        _store_commits(commits, states, U, S, V, opts)
        warn_inert([configs[i].name for j, i, _, (_, _, sigma_next, _) in commits
                    if inert_under_min(configs[i], int(rows[j][k + 3]), rows[j][0], sigma_next)], stacklevel=6)
    return retry


# sigma_{r+1} at or below this share of sigma_1 at a first refresh: weights of rank <= r up to
# float32 rounding (zero-initialized weights: sigma = 0 throughout)
INERT_RATIO = 2.0**-20


def inert_under_min(cfg, refresh_index: int, sigma_1: float, sigma_next: float) -> bool:
    """Whether this first refresh leaves the target's Q3R term off for good: under the `min`
    schedule eps = min(eps, sigma_{r+1}) never rises again, and a weight of rank <= r (a
    zero-initialized one) brings it down to about 0 at once, where R weighs every direction
    that later grows above it by about eps^2 / sigma^2 (SPEC section 3, literally)."""
    return (refresh_index == 0 and reference.canonical_schedule(cfg.schedule) == "min"
            and sigma_next <= INERT_RATIO * sigma_1)


def warn_inert(names: list[str], stacklevel: int) -> None:
    """One warning for the targets inert_under_min found in one commit (it happens once per
    target and run: a first refresh)."""
    if names:
        shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        warnings.warn(f"q3r: {len(names)} target(s) had sigma_{{r+1}} = 0 (up to float32 rounding) at their first "
                      f"refresh, {shown}: zero-initialized weights, or weights of rank <= r. Under "
                      "eps_schedule='min' eps never rises again, so their Q3R term stays about 0 for the rest of "
                      "training. Start them from nonzero weights, or give them eps_schedule='track' (eps = "
                      "sigma_{r+1} at every refresh) or 'constant' with an eps_value ('geometric' climbs from "
                      "about 0 to its eps_floor only over num_refreshes refreshes)", UserWarning,
                      stacklevel=stacklevel)


def tail_fraction(total: float, sigma: list[float], rank: int) -> float:
    """The fraction of ||W||_F^2 (``total``) outside the leading ``rank`` values of ``sigma``, in
    [0, 1]: the head's energy can exceed the separately computed total by rounding (a weight of
    rank <= ``rank``), and a zero weight has no tail."""
    head = math.fsum(value * value for value in sigma[:rank])
    return 0.0 if total == 0 else min(max(total - head, 0.0) / total, 1.0)


def _scheduled(row: list[float], k: int, cfg) -> tuple[float, float, float] | int | None:
    """A member's (new eps, eps0, sigma_{r+1}) from its commit_columns row, or what it gets
    instead of a commit: NONFINITE, UNTRUSTED, or None (an exact SVD) where the sketch's
    products overflowed."""
    if not row[k + 4]:
        return NONFINITE
    if not row[k + 5]:
        return UNTRUSTED
    sigma = row[:k]
    if not all(map(math.isfinite, sigma)) or sigma[0] > _FP32_MAX:
        # the sketch's products overflowed (weights near float32's limits, or float64
        # ones beyond them): committed, NaN Ritz values would poison the warm start of
        # every later refresh; the exact path decides (a float32 SVD of the weights)
        return None
    sigma_next = sigma[cfg.rank] if cfg.rank < k else 0.0  # (an exact SVD of rank >= min(d1, d2))
    eps, eps0 = reference.next_eps(cfg.schedule, row[k + 1], sigma_next, int(row[k + 3]), row[k + 2],
                                   cfg.eps_value, cfg.eps_floor, cfg.num_refreshes)
    return eps, eps0, sigma_next


def _residual_errors(host: Tensor, k: int, scheduled: list, members, configs, U, V) -> list[float]:
    """randomized.residual_error of every member at its new eps (0 for those not committed),
    on the host, for the whole stack at once (host: the stack's commit_columns)."""
    eps = torch.tensor([plan[0] if isinstance(plan, tuple) else math.inf for plan in scheduled], dtype=host.dtype)
    ranks = torch.tensor([configs[i].rank for i in members], dtype=torch.int64)
    sigma = host[:, :k].nan_to_num(0.0, 0.0, 0.0)  # (members with non-finite values are not committed)
    rho = host[:, k + 7:].nan_to_num(1.0, 1.0, 1.0)  # (an unknown residual counts as a large one)
    return residual_error(sigma, rho, eps, ranks, U.shape[-2], V.shape[-2]).tolist()


# the most an eps set from sigma_{r+1} (the `min` and `track` schedules, the first `geometric`
# refresh) may fall short of it by its Ritz residual's estimate (relative; the contract is 1%,
# and the true shortfall was up to 3.5x the residual estimates, see residual_error)
MAX_EPS_SHORTFALL = 2e-3


def _eps_shortfalls(rows: list[list[float]], k: int, scheduled: list, members, configs) -> list[float]:
    """Per member, the estimated relative shortfall rho^2 a / 2 of its Ritz value sigma_{r+1}
    (randomized.residual_error's delta) where its new eps was set from it, else 0.  The
    residual estimate weighs that shortfall by (eps / sigma_i)^2, nearly 0 for a deep tail, so
    a warm sketch whose sigma_{r+1} came from a tail that moved on (bf16 rounding of a weight
    that moved, noise above a Q3R-trained tail: 128 x 128, rank 8, tail at 2e-3 sigma_1) was
    committed with eps 12% to 16% low, and under `min` eps never rises again."""
    out = []
    for row, plan, i in zip(rows, scheduled, members):  # (rows: the stack's commit_columns, as Python floats)
        r = configs[i].rank
        if not isinstance(plan, tuple) or r >= k - 1 or plan[0] != row[r]:
            out.append(0.0)
            continue
        out.append(sigma_next_shortfall(row[r], row[k - 1], row[k + 7 + r]))
    return out


def sigma_next_shortfall(sigma_next: float, sigma_last: float, rho: float) -> float:
    """How far (relative) a Ritz value sigma_{r+1} with relative Ritz residual rho may fall
    short of the singular value, as randomized.residual_error estimates it (rho^2 a / 2, a =
    sigma^2 / (sigma^2 - sigma_last^2), sigma_last the sketch's last Ritz value), at most 1; 0
    where sigma_{r+1} is 0 or rho is 0 or unknown. The sharded range finder asks it too."""
    if not (sigma_next > 0 and rho > 0):
        return 0.0
    rho = min(rho, 1.0)
    sig2, last2 = sigma_next ** 2, sigma_last ** 2
    amp = sig2 / (sig2 - last2) if sig2 > last2 else math.inf
    return min(rho * rho * amp / 2, 1.0)


def flat_beyond(sigma: list[float], total: float, n: int, eps: float, tolerance: float) -> bool:
    """Whether the part of the spectrum a sketch did not capture sits at eps: its rms
    singular value sqrt((||W||_F^2 - sum sigma_i^2) / (n - k)) at least (1 - tolerance) eps.
    Then the spectrum is flat around eps beyond the sketch (an orthogonal init, perhaps with
    a few learned directions on top), many members above eps lie outside it, and the Ritz
    values, which fall short of them all alike, undercount them (256 x 256, rank 24,
    orthogonal init drifting by 3e-3 per refresh: R(X) off by up to 4.6e-3).  Random-init
    spectra stay far from it (0.49 to 0.73 at 20% ranks, 256 to 2048 wide, aspect 1 to 4).
    A negative tolerance turns the rule off (q3r.distributed.configure documents it so; with
    it read as a fraction, -1 still fired on a bulk at twice eps)."""
    rest = n - len(sigma)
    if tolerance < 0 or rest <= 0 or not math.isfinite(eps):
        return False
    uncaptured = total - math.fsum(value * value for value in sigma)
    return uncaptured > 0 and uncaptured / rest >= ((1.0 - tolerance) * eps) ** 2


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
            "tail": _gather_columns(V, index, r_env, min(r_env + 2 * opts.oversampling, V.shape[-1])).unbind(0),
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

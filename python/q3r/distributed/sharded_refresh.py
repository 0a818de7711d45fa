"""The refresh of sharded targets: the randomized range finder of :mod:`.rangefinder` on each
rank's rows (one collective per process group for all targets), eps scheduled per SPEC section 3,
and the new factors stored placed like the weight (:mod:`.placement`). HSDP replica groups are
checked to hold the same weights first (_resync_replicas_); a block target or a replicated one
is refreshed by one rank of those holding its rows and its factors broadcast (refresh_owners).
See :mod:`.sharded` for the whole design.
"""

from __future__ import annotations

import dataclasses
import warnings
import zlib

import torch
from torch import Tensor

from .. import reference
from .._precision import refresh_precision
from .._refresh_commit import inert_under_min, warn_inert
from ..refresh import SliceConfig, _warn_nonfinite, warn_once
from ..targets import slice_shapes
from . import comm, refresh_owners
from .placement import (
    DTensor, Replicate, all_reduce_over_, factor_placements, group_key, layout_of, leads, local_slices,
    oriented, oriented_slicing, oriented_state, shard_axis,
)
from .rangefinder import cold_sketch_width, enveloping_svd, power_of_two_scale, sketch_width


@dataclasses.dataclass
class SketchOptions:
    """Randomized refresh of sharded targets (rangefinder.enveloping_svd): sketch width =
    rank + oversample (capped at min(d1, d2); a cap reached means the exact SVD up to
    rounding). A refresh warm-started from the previous right singular vectors runs
    ``power_iters`` power iterations. The first (cold) refresh of a target runs
    ``cold_power_iters`` on a wider sketch, rank + max(2 oversample, rank): a Gaussian start
    on a slowly decaying spectrum (random initial weights) needs them to pin down
    sigma_{r+1}, which the `min` schedule keeps as eps. A sketch with fewer than
    oversample / 2 Ritz values below eps is widened (to at least twice its width, from its new
    V, with ``cold_power_iters``: the new members come from a flat bulk) up to
    ``max_widenings`` times; so is a warm sketch whose envelope grew by more than
    ``max_envelope_growth`` triplets since the last refresh (a warm sketch's Ritz values
    fall short in a flat bulk lifted above eps, and miss some of its members); so is a warm
    sketch whose lag exceeds ``max_lag`` (as q3r.refresh.SketchOptions.max_lag: the weights
    moved far since the last refresh), at its width. A sketch whose uncaptured part sits
    within ``flat_tolerance`` of eps is sketched again min(d1, d2) wide, the SVD up to rounding
    (as q3r.refresh.SketchOptions.flat_tolerance: a spectrum flat around eps). A sketch whose
    Ritz residuals put it far from the weights' own triplets (``max_residual``, as
    q3r.refresh.SketchOptions.max_residual; 1 or more: never) is sketched again, at its width
    with cold_power_iters after a warm first pass, else as wide as the matrix: along real
    training runs (one rank, benchmarks/results/probes/sharded_training_*), 2 warm power
    iterations left 4 of some 10,000 warm target refreshes off by up to 1.66e-3.  Across warm
    refreshes this is subspace iteration continued over training, which is why 2 suffice then."""

    oversample: int = 16
    power_iters: int = 2
    cold_power_iters: int = 8
    max_widenings: int = 3
    max_envelope_growth: int = 2
    max_lag: float = 6e-4
    flat_tolerance: float = 2e-2
    max_residual: float = 3e-4
    seed: int = 0


SKETCH = SketchOptions()


def _seed(name: str, refreshes: int, attempt: int = 0) -> int:
    """The same on every rank: depends only on the slice's name, refresh count and attempt
    (a widened sketch's)."""
    return (SKETCH.seed * 1_000_003 + zlib.crc32(name.encode()) * 7919 + refreshes + 104_729 * attempt) % (2**63 - 1)


@torch.no_grad()
def refresh_sharded_(
    params: list,
    slicings: list[tuple[int, list | None]],
    states: list[list[dict[str, Tensor]]],
    configs: list[list[SliceConfig]],
    warned: set | None = None,
) -> None:
    """Refresh the factors of sharded targets in place: params[i] is a DTensor, slicings[i]
    its (slice_dim, slices), states[i] / configs[i] one entry per slice. Collective: every rank
    calls it with the same targets in the same order."""
    with refresh_precision():  # fp32 whatever the caller's autocast / TF32 settings (q3r._precision)
        _refresh_sharded(params, slicings, states, configs, warned)


def _refresh_sharded(params, slicings, states, configs, warned) -> None:
    _resync_replicas_(params, [cfgs[0].name.split("[")[0] for cfgs in configs])
    layouts = [layout_of(p) for p in params]
    # (a block target, or a replicated one, is refreshed by one rank of the ranks holding the
    # same rows, and its factors broadcast: refresh_owners)
    owners = refresh_owners.owners(params, layouts)
    by_group: dict[tuple, list] = {}
    shared = []
    for p, layout, owner, (slice_dim, slices), sts, cfgs in zip(params, layouts, owners, slicings, states, configs):
        axis = layout.axis  # (a Shard(1) target as its transpose: x, shape and s all transposed)
        shapes = slice_shapes(oriented(p, axis).shape, oriented_slicing(axis, slice_dim), slices)
        if owner is not None:
            shared.append((p, layout, [oriented_state(s, axis) for s in sts], [id(s) for s in sts], shapes, owner))
        if layout.col_dim is not None:  # a block's rows whole, on its owner only
            local = refresh_owners.gather_rows(p, layout, owner)
        else:
            local = p.to_local().detach() if owner is None or owner.rank == comm.rank(owner.group) else None
        if local is None:
            continue
        views = local_slices(oriented(local, axis), layout.rows[0], oriented_slicing(axis, slice_dim), slices)
        for (x, lo, hi), shape, s, cfg in zip(views, shapes, sts, cfgs):
            # (shared targets after the rest: their row groups' members share a coordinate on
            # the sharing dim, and with it which targets they own, which other groups need not)
            key = (owner is not None, group_key(layout.row_groups))
            by_group.setdefault(key, []).append((p, x, lo, hi, oriented_state(s, axis), cfg, shape, owner, id(s)))
    refreshed: set[int] = set()
    notes: dict[int, tuple] = {}  # (refresh_owners.share_)
    names = {id(s): cfg.name for sts, cfgs in zip(states, configs) for s, cfg in zip(sts, cfgs)}
    for key in sorted(by_group, key=lambda key: key[0]):  # (stable)
        items = by_group[key]
        groups = layout_of(items[0][0]).row_groups
        reduce = lambda t: all_reduce_over_(t, groups)  # noqa: E731
        # agree on which slices are finite everywhere before any factorization, and on a bound
        # of each one's largest |entry| (the sum of the ranks' own, in the same collective), by
        # which the range finder scales its products (rangefinder.power_of_two_scale)
        finite = [torch.isfinite(item[1]).all() for item in items]
        amax = [torch.where(ok, torch.linalg.vector_norm(item[1], float("inf")), 0.0) if item[1].numel()
                else ok.new_zeros((), dtype=torch.float32)
                for ok, item in zip(finite, items)]
        checks = reduce(torch.cat([torch.stack([(~ok).to(torch.float64) for ok in finite]),
                                   torch.stack([a.to(torch.float64) for a in amax])]))
        checks = checks.tolist()
        bad, bounds = checks[: len(items)], checks[len(items):]
        live, scales = [], []
        for item, flag, bound in zip(items, bad, bounds):
            if flag > 0:
                # one warning, not one per rank (a shared target's: after refresh_owners.share_)
                if item[7] is None and leads(item[0]):
                    _warn_nonfinite(item[5].name, warned)
            else:
                live.append(item)
                scales.append(power_of_two_scale(bound))
        prev = _previous([item[4] for item in live])
        results = enveloping_svd(
            [item[1] for item in live], [item[6] for item in live], [_width(item) for item in live],
            [item[4]["V"] if item[4]["V"].shape[-1] else None for item in live],
            lambda j, attempt: _seed(live[j][5].name, prev[j][2], attempt),
            lambda j, S: _envelope(prev[j], live[j][5], S)[::2], reduce,
            SKETCH.power_iters, SKETCH.cold_power_iters, SKETCH.oversample, SKETCH.max_widenings,
            [r_env for *_, r_env in prev], SKETCH.max_envelope_growth, [eps for eps, *_ in prev], SKETCH.max_lag,
            SKETCH.flat_tolerance, [item[5].rank for item in live], SKETCH.max_residual, scales=scales)
        for (p, x, lo, hi, s, cfg, shape, owner, key), before, (U_loc, S, V, _, r_env, S_host, frob2) in zip(
                live, prev, results):
            keep = _kept_width(cfg.rank, shape, r_env, S.shape[0])
            truncated = r_env > S.shape[0] - _margin() and S.shape[0] < min(shape)
            if truncated and owner is None and leads(p):
                _warn_truncated(cfg.name, r_env, S.shape[0], warned)
            inert = _commit_(s, cfg, before, p, lo, hi, U_loc[:, :keep], S[:keep], V[:, :keep], S_host, frob2, owner)
            refreshed.add(key)
            notes[key] = (int(inert), r_env if truncated else -1, S.shape[0])
    told = refresh_owners.share_(shared, refreshed, factor_placements, notes)
    # a shared target's warnings: from the same rank whichever rank refreshed it (its owner
    # depends on the targets due with it), once (warned)
    for p, _, _, keys, _, _ in shared:
        if leads(p):
            for key in keys:
                width, inert, r_env, found = told[key]
                name = names[key]
                if width < 0:
                    _warn_nonfinite(name, warned)
                    continue
                if r_env >= 0:
                    _warn_truncated(name, r_env, found, warned)
                if inert:
                    warn_inert([name], stacklevel=4)


def _margin() -> int:
    """Ritz values a sketch must have below eps to count as wide enough (as q3r.refresh asks)."""
    return max(SKETCH.oversample // 2, 1)


def _previous(states: list[dict]) -> list[tuple[float, float, int, int]]:
    """(eps, eps0, refresh count, r_env) of each state before the refresh, in one host
    transfer for all (a transfer per scalar would cost hundreds per refresh)."""
    if not states:
        return []
    rows = torch.stack([torch.stack([s["eps"].double(), s["eps0"].double(), s["refreshes"].double(),
                                     (s["sigma"] > s["eps"]).sum().double()]) for s in states]).tolist()
    return [(eps, eps0, int(count), int(r_env)) for eps, eps0, count, r_env in rows]


def _width(item) -> int:
    """The sketch width of a slice's refresh: a cold one is wider (cold_sketch_width); a warm
    one is rank + oversample, or the width its factors grew to (see _kept_width)."""
    s, cfg, (d1, d2) = item[4], item[5], item[6]
    if s["V"].shape[-1] == 0:
        return cold_sketch_width(cfg.rank, d1, d2, SKETCH.oversample)
    return max(sketch_width(cfg.rank, d1, d2, SKETCH.oversample), s["V"].shape[-1])


def _kept_width(rank: int, shape: tuple[int, int], r_env: int, found: int) -> int:
    """How many triplets a slice keeps: rank + oversample (the factors' width in a checkpoint
    made before any envelope grew), or r_env + oversample where the envelope outgrew that
    with less than the margin below it (those are in the operator, and the next refresh
    starts from them)."""
    k = sketch_width(rank, *shape, SKETCH.oversample)
    return min(k if r_env <= k - _margin() else r_env + SKETCH.oversample, found)


def _envelope(prev: tuple, cfg: SliceConfig, S: Tensor) -> tuple[float, float, int]:
    """(eps, eps0, r_env) that the Ritz values S (on the host) give a slice whose state was
    ``prev`` (see _previous; SPEC section 3)."""
    sigma_next = float(S[cfg.rank]) if cfg.rank < S.shape[0] else 0.0
    eps, eps0 = reference.next_eps(cfg.schedule, prev[0], sigma_next, prev[2], prev[1],
                                   cfg.eps_value, cfg.eps_floor, cfg.num_refreshes)
    return eps, eps0, int((S > eps).sum())


def _warn_truncated(name: str, r_env: int, width: int, warned: set | None) -> None:
    warn_once(("truncated", name), warned,
              f"q3r: the envelope of sharded target {name!r} ({r_env} singular values above eps) still filled its "
              f"sketch of {width} after {SKETCH.max_widenings} widenings; the operator uses the {width} largest "
              "(raise q3r.distributed.configure(max_widenings=...))", stacklevel=5)


def _resync_replicas_(params: list, names: list[str]) -> None:
    """HSDP: make the replica groups' shards of these targets equal again, before a refresh.

    Each replica group computes the Q3R term on its own, so its weights stay equal to the
    others' only if every group computes bit for bit the same (see the module docstring).
    One all-gather of two float64 checksums per target over each replicate mesh dim checks it;
    a target that differs is broadcast from the group's first replica (with a warning), and
    the refresh then computes the same factors from the same weights everywhere."""
    by_mesh: dict[tuple, list] = {}
    for p, name in zip(params, names):
        dims = tuple(i for i, on in enumerate(p.placements) if isinstance(on, Replicate))
        if dims:
            by_mesh.setdefault((id(p.device_mesh), dims), []).append((p, name))
    for (_, dims), members in by_mesh.items():
        mesh = members[0][0].device_mesh
        for dim in dims:
            group = mesh.get_group(dim)
            local = [p.to_local().detach() for p, _ in members]
            sums = torch.stack([torch.stack([t.double().sum(), t.double().square().sum()]) for t in local])
            everyone = torch.stack(comm.all_gather(sums, group))
            same = ((everyone == everyone[0]) | (everyone.isnan() & everyone[0].isnan())).all(dim=2).all(dim=0)
            drifted = [i for i, ok in enumerate(same.tolist()) if not ok]
            for i in drifted:
                comm.broadcast_(local[i], 0, group)
            # (by this group's first replica: the group that drifted need not be the mesh's first
            # rank's, which would not know of it; one warning per group that drifted)
            if drifted and mesh.get_local_rank(dim) == 0:
                # (a replica with non-finite weights is not a rounding drift: said so, h54)
                bad = (~torch.isfinite(everyone)).any(dim=2)  # (replica, target)
                why = "; ".join(
                    f"{members[i][1]}: replica(s) {[r for r in range(bad.shape[0]) if bad[r, i]]} of this group held "
                    f"non-finite weights" + (", the first replica's too, so the refresh skips it" if bad[0, i] else "")
                    for i in drifted if bad[:, i].any())
                warnings.warn(f"q3r: the HSDP replicas of {[members[i][1] for i in drifted]} had drifted apart "
                              + (f"({why})" if why else "(their Q3R terms were not computed bit for bit alike)")
                              + "; copied from the first replica", RuntimeWarning, stacklevel=3)


def _commit_(s: dict, cfg: SliceConfig, prev: tuple, p, lo: int, hi: int, U_loc: Tensor, S: Tensor, V: Tensor,
             S_host: Tensor, frob2: float, owner=None) -> bool:
    """Schedule eps and store the triplets (the ones at or below eps get d = 0); the scalars
    come from S_host, all Ritz values of the sketch on the host (sigma_{r+1} among them even
    where fewer are kept), and prev (see _previous). Returns whether the target is inert
    (inert_under_min), which it warns about here unless the target is shared (owner)."""
    sigma_next = float(S_host[cfg.rank]) if cfg.rank < S_host.shape[0] else 0.0
    eps, eps0, _ = _envelope(prev, cfg, S_host)
    inert = inert_under_min(cfg, prev[2], float(S_host[0]) if S_host.numel() else 0.0, sigma_next)
    if inert and owner is None and leads(p):  # (a shared target's: see _refresh_sharded)
        warn_inert([cfg.name], stacklevel=5)
    head = float(S_host[: cfg.rank].double().square().sum())
    k = S.shape[0]
    axis = shard_axis(p)  # (s: the state as the handled target sees it, see oriented_state)
    local = p.to_local()
    U_rows = torch.zeros(local.shape[axis], k, dtype=torch.float32, device=local.device)
    U_rows[lo:hi] = U_loc
    s["U"] = DTensor.from_local(U_rows, p.device_mesh, factor_placements(p), run_check=False,
                                shape=(p.shape[axis], k), stride=(k, 1))
    s["V"] = V.to(torch.float32).contiguous()
    s["sigma"] = S.to(torch.float32).contiguous()
    # fresh scalars rather than fill_: the old ones may be views shared with other state
    scalar = dict(dtype=torch.float32, device=s["eps"].device)
    s["eps"] = torch.tensor(eps, **scalar)
    s["eps0"] = torch.tensor(eps0, **scalar)
    s["sigma_next"] = torch.tensor(sigma_next, **scalar)
    s["tail_energy"] = torch.tensor(0.0 if frob2 == 0 else max(frob2 - head, 0.0) / frob2, **scalar)
    s["refreshes"] = s["refreshes"] + 1
    return inert

"""Q3R on sharded weights: DTensors with ``Shard(0)`` or ``Shard(1)`` on one mesh dim.

``Shard(0)`` is FSDP2's (``fully_shard``) and tensor parallelism's ``ColwiseParallel``;
``Shard(1)`` is ``RowwiseParallel``'s. A ``Shard(1)`` target is handled as its transpose, whose
rows are sharded: the operator is the same for W^T with U and V trading places (SPEC section 2:
R_{U,V}(X)^T = R_{V,U}(X^T)), so everything below, written for sharded rows, runs on transposed
views of the local shard and a view of each slice state in which U and V trade places
(q3r._orientation.TransposedState). Only the small correction (``ShardedTerms``) and the refresh
see the transpose; the fused per-step kernels get the local shard as it is, with the local
factors in the parameter's orientation. "Rows" below are the rows of the target as handled: a
``Shard(1)`` target's columns.

On a 1-D mesh that is plain FSDP2; on a 2-D mesh (HSDP: ``fully_shard(mesh=init_device_mesh(..,
(replicas, shards)))``, placements ``(Replicate(), Shard(0))``) every collective below runs over
the shard dim's process group only. The replica groups hold the same weights and factors and
compute the same per-step term, so between refreshes nothing is exchanged between them; a
refresh checks that their weights still agree, divides the targets among them and broadcasts
each one's new factors (refresh_owners).

No training step gathers a full weight (diagnostic_slices does). Each rank holds rows
[start, stop) of a target W (torch.chunk layout). For a slice with factors U (d1 x k,
row-sharded like W), V (d2 x k, replicated), d, of which the r_env triplets above eps enter:

    A = U^T X = sum_r U_r^T X_r          an all-reduce of r_env x d2 (all targets batched: one
                                          collective per process group and step)
    B_r = X_r V,  C = A V                 local
    R(X)_r = X_r + (U_r diag d)(A + C diag(d) V^T) + B_r diag(d) V^T      local

computed as R_r(X_r) + U_r M: the operator of the local factors alone, which the fused kernels
of q3r.ops apply to the local shard like to any block (the AdamQ3R update in the same pass),
plus a rank-r_env correction with M = diag(d) (A - U_r^T X_r)(I + V diag(d) V^T) (ShardedTerms).
HSDP: the replica groups compute the term each on their own; a refresh first checks that their
shards still agree and copies drifted ones from the first replica (_resync_replicas_).

The refresh runs the randomized range finder of :mod:`.rangefinder` on the local rows.

Layout of the factors, chosen so that torch.distributed.checkpoint saves and reshards them:
U of every slice of a Shard(0) target is a DTensor of shape (rows of the *parameter*, k),
Shard(0), i.e. stored in the parameter's row coordinates and sharded exactly like the weight;
for a row slice (timm qkv) the rows outside the slice are zero. For a Shard(1) target V plays
that part: a DTensor of shape (columns of the parameter, k), Shard(0) where the weight has
Shard(1), zero outside a column slice; its U is then the plain, replicated factor. The width k is target rank + oversampling
unless the envelope outgrows it (then r_env + oversampling, see _kept_width), so a
checkpoint template built before loading has the shapes of the saved factors, or
checkpoint.FactorLoadPlanner gives it them. The other factor, sigma and the scalars are plain
tensors, identical on every rank (DCP treats them as replicated).
"""

from __future__ import annotations

import dataclasses
import warnings
import zlib

import torch
from torch import Tensor

from .. import reference
from .._orientation import TransposedState
from .._precision import no_autocast, refresh_precision
from .._refresh_commit import inert_under_min, warn_inert
from ..refresh import SliceConfig, _warn_nonfinite, new_slice_state, warn_once
from ..targets import slice_shapes, slice_views
from . import comm, refresh_owners
from .rangefinder import cold_sketch_width, enveloping_svd, power_of_two_scale, sketch_width

try:  # DTensor is public since torch 2.4; keep `import q3r` working without it
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor, Replicate, Shard = None, None, None
try:  # (private: FSDP2's placement of a tensor-parallel weight's rows; a Shard subclass in some versions)
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:  # pragma: no cover
    _StridedShard = ()

__all__ = ["SketchOptions", "SKETCH", "is_sharded", "shard_axis", "check_sharding", "row_range", "local_slices", "refresh_sharded_", "ShardedTerms", "sharded_penalty", "diagnostic_slices", "factor_rows", "new_target_states"]


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


def is_sharded(t) -> bool:
    """True for a DTensor (FSDP2 parameter, its gradient or optimizer state)."""
    return DTensor is not None and isinstance(t, DTensor)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How a 2-D DTensor target is split, as q3r handles it.

    axis: 0 where rows are split (the target as it is), 1 where only columns are (handled as
    its transpose, whose rows are split). row_dims: the mesh dims that split the handled rows,
    the outer split first (two for FSDP2 over a ColwiseParallel weight: tensor parallel's
    Shard(0), then FSDP2's _StridedShard(0) of each tensor-parallel chunk). col_dim: the mesh
    dim that also splits the columns of a row-split target (FSDP2 over a RowwiseParallel
    weight: a block of rows x columns on each rank), else None. rows / cols: this rank's
    handled rows [start, stop) and, for a block, columns [start, stop), in torch.chunk layout
    (FSDP2's and DTensor's) nested in the order of row_dims."""

    axis: int
    row_dims: tuple[int, ...]
    col_dim: int | None
    rows: tuple[int, int]
    cols: tuple[int, int] | None
    row_groups: tuple  # the process groups of row_dims: a sum over the rows is an all-reduce over each in turn
    col_group: object  # the process group of col_dim, or None


_SUPPORTED = ("Shard(0) or Shard(1) on one mesh dim (FSDP2 / HSDP fully_shard, ColwiseParallel / RowwiseParallel), "
              "or on two (FSDP2 over a tensor-parallel weight: _StridedShard(0) + Shard(0), Shard(0) + Shard(1); "
              "or the same Shard twice), with Replicate() (or a Shard on a mesh dim of size 1) on any other mesh "
              "dims (or on all of them)")


def _layout(p, where: str = "q3r") -> _Layout:
    """The _Layout of the DTensor p; a split q3r cannot handle raises NotImplementedError naming
    the placements (when AdamQ3R or Q3R is built: check_sharding)."""
    placements, mesh = tuple(p.placements), p.device_mesh
    # (a Shard on a mesh dim of size 1 splits nothing: as Replicate, e.g. FSDP2 over a tensor-
    # parallel dim of size 1, where torch places a ColwiseParallel weight (Shard(0), Shard(0)))
    split = [(i, on) for i, on in enumerate(placements)
             if not isinstance(on, Replicate) and not (type(on) is Shard and mesh.size(i) == 1)]

    def refuse(why: str = ""):
        return NotImplementedError(f"{where}: q3r handles a sharded 2-D target with {_SUPPORTED}; got placements "
                                   f"{placements} on a {mesh.ndim}-D mesh{why}")

    # (mesh dim, 0 / 1 / "strided", placement)
    kinds = [(i, "strided" if isinstance(on, _StridedShard) else on.dim % 2, on) for i, on in split
             if isinstance(on, _StridedShard) or type(on) is Shard]
    if p.dim() != 2 or len(kinds) != len(split) or len(split) > 2:
        raise refuse()
    if not split:  # replicated on every mesh dim (torch's FSDP2-based replicate): whole on every rank
        axis, row_dims, col_dim = 0, (), None
    elif len(split) == 1:
        (dim, kind, _), = kinds
        if kind == "strided":
            raise refuse()
        axis, row_dims, col_dim = kind, (dim,), None
    elif [k for _, k, _ in kinds] == ["strided", 0]:
        # FSDP2 (an earlier mesh dim) splits each tensor-parallel row chunk: the chunks first
        (inner, _, strided), (outer, _, _) = kinds
        if strided.dim % 2 != 0 or getattr(strided, "split_factor", None) != mesh.size(outer):
            raise refuse(" (a _StridedShard(0) must split the chunks of the Shard(0) on a later mesh dim)")
        axis, row_dims, col_dim = 0, (outer, inner), None
    elif sorted(str(k) for _, k, _ in kinds) == ["0", "1"]:  # (either order of the mesh dims)
        axis, row_dims, col_dim = 0, tuple(i for i, k, _ in kinds if k == 0), next(i for i, k, _ in kinds if k == 1)
    elif kinds[0][1] == kinds[1][1] != "strided":
        # the same dim split on two mesh dims: DTensor splits each chunk of the first again
        axis, row_dims, col_dim = kinds[0][1], (kinds[0][0], kinds[1][0]), None
    else:
        raise refuse()
    local = p.to_local().shape
    rows = _nested_chunk(p.shape[axis], [(mesh.size(d), mesh.get_local_rank(d)) for d in row_dims])
    cols = None if col_dim is None else _nested_chunk(p.shape[1], [(mesh.size(col_dim), mesh.get_local_rank(col_dim))])
    held = (local[axis], local[1] if cols else None)
    if held != (rows[1] - rows[0], cols[1] - cols[0] if cols else None):
        what = ("rows", "columns")[axis]
        raise NotImplementedError(f"{where}: a sharded target's {what} must be split as FSDP2 and DTensor split them "
                                  f"(torch.chunk: {what} {rows[0]}..{rows[1]} here), got {held[0]} local {what} of a "
                                  f"{tuple(p.shape)} target (placements {placements})")
    return _Layout(axis, row_dims, col_dim, rows, cols, tuple(mesh.get_group(d) for d in row_dims),
                   None if col_dim is None else mesh.get_group(col_dim))


def _nested_chunk(n: int, splits: list[tuple[int, int]]) -> tuple[int, int]:
    """[start, stop) of range(n) after torch.chunk over each (size, index) of splits in turn."""
    start, stop = 0, n
    for size, me in splits:
        chunk = -(-(stop - start) // size)
        start, stop = min(start + me * chunk, stop), min(start + (me + 1) * chunk, stop)
    return start, stop


def shard_axis(p, where: str = "q3r") -> int:
    """0 where the DTensor p's rows are sharded (Shard(0), also with its columns), 1 where only
    its columns are (Shard(1): handled as its transpose)."""
    return _layout(p, where).axis


def _oriented(t: Tensor, axis: int) -> Tensor:
    """t as a target sharded along ``axis`` is handled: itself, or its transpose (a view)."""
    return t if axis == 0 else t.mT


def _oriented_slicing(axis: int, slice_dim: int) -> int:
    """The slice dim of the target as handled: row slices of a transposed target are column slices."""
    return slice_dim if axis == 0 else 1 - slice_dim


def _oriented_state(s: dict, axis: int):
    """A slice state as the handled target sees it (U and V trade places for a transposed one)."""
    return s if axis == 0 else TransposedState(s)


def _oriented_operator(op: tuple, axis: int) -> tuple:
    """(U, V, ...) of the parameter as the handled target's, or back (the same swap both ways)."""
    return op if axis == 0 else (op[1], op[0], *op[2:])


def _factor_placements(p) -> tuple:
    """The placements of the sharded factor of p, in p's handled rows: split like them (p's,
    with a Shard(1) of a transposed target as Shard(0)); replicated over the mesh dim that
    splits a block's columns."""
    layout = _layout(p)
    if layout.col_dim is not None:
        return refresh_owners.factor_placements(p, layout)
    return tuple(Shard(0) if type(on) is Shard else on for on in p.placements)


def check_sharding(p, where: str) -> None:
    """Refuse, when the optimizer or regularizer is built, a DTensor target q3r cannot handle."""
    if is_sharded(p):
        _layout(p, where)  # (its placements, then its rows: refused here, not at a later step)


def _key(groups: tuple) -> tuple:
    return tuple(id(g) for g in groups)


def _all_reduce_over_(t: Tensor, groups: tuple) -> Tensor:
    """Sum t over every rank of the groups (in place): one all-reduce per group, in turn."""
    for group in groups:
        comm.all_reduce_(t, group)
    return t


def _leads(p) -> bool:
    """True on the one rank of p's mesh that speaks for all: coordinate 0 on every mesh dim.
    (Not the owner of a shared target's refresh, refresh_owners: which rank that is depends on
    the targets due with it, so its warnings would come once from each rank it was dealt to.)"""
    return all(c == 0 for c in p.device_mesh.get_coordinate())


def row_range(p, where: str = "q3r") -> tuple[int, int]:
    """Rows [start, stop) of the parameter p held by this rank, or its columns for Shard(1)
    (torch.chunk layout, FSDP2's and DTensor's; another split, a DTensor built by hand, is
    refused)."""
    return _layout(p, where).rows


def local_slices(local: Tensor, start: int, slice_dim: int, slices) -> list[tuple[Tensor, int, int]]:
    """Per slice: (this rank's part of the slice, a view of ``local``; first and past-last local
    row it covers). A row slice that crosses a shard boundary is split between the ranks; a
    rank that holds none of its rows gets an empty view."""
    n = local.shape[0]
    if slices is None:
        return [(local, 0, n)]
    out = []
    for a, b in slices:
        if slice_dim == 1:
            out.append((local.narrow(1, a, b - a), 0, n))
        else:
            lo = min(max(a - start, 0), n)
            hi = max(min(b - start, n), lo)
            out.append((local.narrow(0, lo, hi - lo), lo, hi))
    return out


def _seed(name: str, refreshes: int, attempt: int = 0) -> int:
    """The same on every rank: depends only on the slice's name, refresh count and attempt
    (a widened sketch's)."""
    return (SKETCH.seed * 1_000_003 + zlib.crc32(name.encode()) * 7919 + refreshes + 104_729 * attempt) % (2**63 - 1)


def _local_U(U, lo: int, hi: int) -> Tensor:
    return U.to_local()[lo:hi] if is_sharded(U) else U[lo:hi]


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
    layouts = [_layout(p) for p in params]
    # (a block target, or a replicated one, is refreshed by one rank of the ranks holding the
    # same rows, and its factors broadcast: refresh_owners)
    owners = refresh_owners.owners(params, layouts)
    by_group: dict[tuple, list] = {}
    shared = []
    for p, layout, owner, (slice_dim, slices), sts, cfgs in zip(params, layouts, owners, slicings, states, configs):
        axis = layout.axis  # (a Shard(1) target as its transpose: x, shape and s all transposed)
        shapes = slice_shapes(_oriented(p, axis).shape, _oriented_slicing(axis, slice_dim), slices)
        if owner is not None:
            shared.append((p, layout, [_oriented_state(s, axis) for s in sts], [id(s) for s in sts], shapes, owner))
        if layout.col_dim is not None:  # a block's rows whole, on its owner only
            local = refresh_owners.gather_rows(p, layout, owner)
        else:
            local = p.to_local().detach() if owner is None or owner.rank == comm.rank(owner.group) else None
        if local is None:
            continue
        views = local_slices(_oriented(local, axis), layout.rows[0], _oriented_slicing(axis, slice_dim), slices)
        for (x, lo, hi), shape, s, cfg in zip(views, shapes, sts, cfgs):
            # (shared targets after the rest: their row groups' members share a coordinate on
            # the sharing dim, and with it which targets they own, which other groups need not)
            key = (owner is not None, _key(layout.row_groups))
            by_group.setdefault(key, []).append((p, x, lo, hi, _oriented_state(s, axis), cfg, shape, owner, id(s)))
    refreshed: set[int] = set()
    notes: dict[int, tuple] = {}  # (refresh_owners.share_)
    names = {id(s): cfg.name for sts, cfgs in zip(states, configs) for s, cfg in zip(sts, cfgs)}
    for key in sorted(by_group, key=lambda key: key[0]):  # (stable)
        items = by_group[key]
        groups = _layout(items[0][0]).row_groups
        reduce = lambda t: _all_reduce_over_(t, groups)  # noqa: E731
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
                if item[7] is None and _leads(item[0]):
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
            if truncated and owner is None and _leads(p):
                _warn_truncated(cfg.name, r_env, S.shape[0], warned)
            inert = _commit_(s, cfg, before, p, lo, hi, U_loc[:, :keep], S[:keep], V[:, :keep], S_host, frob2, owner)
            refreshed.add(key)
            notes[key] = (int(inert), r_env if truncated else -1, S.shape[0])
    told = refresh_owners.share_(shared, refreshed, _factor_placements, notes)
    # a shared target's warnings: from the same rank whichever rank refreshed it (its owner
    # depends on the targets due with it), once (warned)
    for p, _, _, keys, _, _ in shared:
        if _leads(p):
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
    if inert and owner is None and _leads(p):  # (a shared target's: see _refresh_sharded)
        warn_inert([cfg.name], stacklevel=5)
    head = float(S_host[: cfg.rank].double().square().sum())
    k = S.shape[0]
    axis = shard_axis(p)  # (s: the state as the handled target sees it, see _oriented_state)
    local = p.to_local()
    U_rows = torch.zeros(local.shape[axis], k, dtype=torch.float32, device=local.device)
    U_rows[lo:hi] = U_loc
    s["U"] = DTensor.from_local(U_rows, p.device_mesh, _factor_placements(p), run_check=False,
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


@dataclasses.dataclass
class _LocalSlice:
    """One slice's part on this rank, all of the target as handled (transposed for Shard(1)):
    the view x of its local block; the rows [lo, hi) and columns [clo, chi) of the local shard
    it covers; its local operator (U_r, V_c, sigma, eps) or (U_r, V_c, d) cut to the m triplets
    above eps (V_c: the rows of V for its local columns, all of them unless the columns are
    split too); when m > 0, A and the correction M, and for a block also B and N (see
    ShardedTerms)."""

    x: Tensor
    lo: int
    hi: int
    clo: int
    chi: int
    operator: tuple
    A: Tensor | None = None  # U_r^T X_r(c), then (after the all-reduce over the rows) U^T X (its columns c)
    M: Tensor | None = None
    A_own: Tensor | None = None  # a block's A_rc, kept for its M
    B: Tensor | None = None  # a block's X_rc V_c, then (after the all-reduce over the columns) X_r V
    C: Tensor | None = None  # a block's U^T X V (after that all-reduce)
    N: Tensor | None = None


def _local_blocks(local: Tensor, layout: _Layout, slice_dim: int, slices) -> list[tuple]:
    """Per slice: (this rank's part of it, a view of ``local``; its local rows [lo, hi) and
    columns [clo, chi); the rows [v0, v1) of the slice's V that its columns are). Like
    local_slices, also where a block's columns are split: a column slice is then cut at the
    shard's column boundaries as a row slice is at its row boundaries."""
    n, r0 = local.shape[0], layout.rows[0]
    c0, c1 = layout.cols if layout.cols is not None else (0, local.shape[1])
    if slices is None:
        return [(local, 0, n, 0, c1 - c0, c0, c1)]
    out = []
    for a, b in slices:
        if slice_dim == 1:
            lo_c = min(max(a, c0), c1)
            hi_c = max(min(b, c1), lo_c)
            out.append((local.narrow(1, lo_c - c0, hi_c - lo_c), 0, n, lo_c - c0, hi_c - c0, lo_c - a, hi_c - a))
        else:
            lo = min(max(a - r0, 0), n)
            hi = max(min(b - r0, n), lo)
            out.append((local.narrow(0, lo, hi - lo), lo, hi, 0, c1 - c0, c0, c1))
    return out


class ShardedTerms:
    """R(X) on the local shards of sharded targets, with one all-reduce for all of them (two
    where a block's columns are split too).

    entries: (param DTensor, slice_dim, slices, operators per slice); an operator is (U, V, d)
    or (U, V, sigma, eps), U in parameter rows (see the module docstring). For a slice X the
    rows r of this rank are

        R(X)_r = R_r(X_r) + U_r M,     M = diag(d) (A - A_r) (I + V diag(d) V^T)

    where R_r is the operator of the local factors (U_r, V, d) alone -- what q3r.ops applies to
    a block, fused Triton kernels included, with A_r = U_r^T X_r -- and A = U^T X = sum over
    ranks of A_r. Only the m triplets above eps enter (they lead: sigma is sorted), so A and M
    are m x d2. Construction computes every A_r and sums them in one collective per process
    group (each group in turn where rows are split over two mesh dims). Everything is
    evaluated at the weights as they were at construction. A Shard(1) target is held
    transposed (module docstring): x, the operators and the views of what the term is added to
    are its transpose's; the local operators handed to q3r.ops (add_, local_work) are turned
    back, so those see the local shard as it is.

    A block (FSDP2 over a RowwiseParallel weight: rows r and columns c split) has, with V_c the
    rows of V for its columns, A_c = U^T X_c (the A_rc = U_r^T X_rc summed over the rows' groups),
    B_r = X_r V and C = U^T X V (B_rc = X_rc V_c and A_c V_c summed over the columns' group, one
    more collective):

        R(X)_rc = R_rc(X_rc) + U_r M + N V_c^T,
        M = diag(d) (A_c - A_rc) + diag(d) (C - A_rc V_c) diag(d) V_c^T,   N = (B_r - B_rc) diag(d)
    """

    def __init__(self, entries):
        self._targets: dict[int, tuple] = {}
        pending: dict[tuple, list] = {}
        block_pending: dict[int, list] = {}
        flat = [op for entry in entries for op in entry[3] if op[0].shape[-1]]
        udv = reference.operator_udv
        counts = iter(torch.stack([(udv(op)[2] != 0).sum() for op in flat]).tolist() if flat else [])  # one sync
        for p, slice_dim, slices, ops in entries:
            layout = _layout(p)
            groups, col_group = layout.row_groups, layout.col_group
            axis = layout.axis
            slice_dim = _oriented_slicing(axis, slice_dim)
            parts = []
            blocks = _local_blocks(_oriented(p.to_local().detach(), axis), layout, slice_dim, slices)
            for (x, lo, hi, clo, chi, v0, v1), op in zip(blocks, ops):
                op = _oriented_operator(op, axis)
                m = int(next(counts)) if op[0].shape[-1] else 0
                if m == 0:  # R = I; U may be the slice-shaped start of a slice never refreshed
                    empty = x.new_zeros(x.shape[0], 0, dtype=torch.float32)
                    parts.append(_LocalSlice(x, lo, hi, clo, chi, (empty, op[1][v0:v1, :0], op[2][:0], *op[3:])))
                    continue
                local = (_local_U(op[0], lo, hi)[:, :m], op[1][v0:v1, :m], op[2][:m], *op[3:])
                part = _LocalSlice(x, lo, hi, clo, chi, local, A=local[0].transpose(0, 1) @ x.to(torch.float32))
                parts.append(part)
                pending.setdefault(_key(groups), [groups, []])[1].append(part)
                if col_group is not None:
                    part.B = x.to(torch.float32) @ local[1]
                    block_pending.setdefault(id(col_group), [col_group, []])[1].append(part)
            self._targets[id(p)] = (slice_dim, slices, layout, groups, col_group, parts)
        for groups, parts in pending.values():
            local_A = [part.A for part in parts]
            total = _all_reduce_over_(torch.cat([a.reshape(-1) for a in local_A]), groups)
            offset = 0
            for part, A_r in zip(parts, local_A):
                part.A = total[offset : offset + A_r.numel()].view_as(A_r)
                offset += A_r.numel()
                if part.B is None:  # (rows split only; a block's M waits for its columns' sums)
                    _, V, d = udv(part.operator)
                    M = d[:, None] * (part.A - A_r)
                    part.M = M + ((M @ V) * d) @ V.transpose(0, 1)
                else:
                    part.A_own = A_r
        for col_group, parts in block_pending.values():
            self._finish_blocks(parts, col_group)

    @staticmethod
    def _finish_blocks(parts: list, col_group) -> None:
        """B_r and C of the block slices (one all-reduce over their columns' group), then M, N."""
        udv = reference.operator_udv
        local = []
        for part in parts:
            V_c = udv(part.operator)[1]
            local += [part.B, part.A @ V_c]
        total = comm.all_reduce_(torch.cat([t.reshape(-1) for t in local]), col_group)
        offset = 0
        for i, part in enumerate(parts):
            B_rc, A_rc = local[2 * i], part.A_own
            part.B = total[offset : offset + B_rc.numel()].view_as(B_rc)
            offset += B_rc.numel()
            m = local[2 * i + 1].shape[0]
            part.C = total[offset : offset + m * m].view(m, m)
            offset += m * m
            _, V_c, d = udv(part.operator)
            C_rc = A_rc @ V_c
            part.M = d[:, None] * (part.A - A_rc) + ((d[:, None] * (part.C - C_rc)) * d) @ V_c.transpose(0, 1)
            part.N = (part.B - B_rc) * d

    def penalty_value(self) -> Tensor:
        """The sum over the slices of <X, R(X)> (the closed form of reference.penalty_value):
        ||X||^2 and the B = X V term summed over the ranks that hold different rows (and
        columns) of them, one all-reduce per process group; the parts of the all-reduced A and
        C = A V added once (a block's A_c term once per column shard, its B_r term once per row
        shard)."""
        buckets: dict[tuple, list] = {}
        shared = []

        def add(groups: tuple, value: Tensor) -> None:
            buckets.setdefault(_key(groups), [groups, []])[1].append(value)

        for *_, groups, col_group, parts in self._targets.values():
            for part in parts:
                X = part.x.to(torch.float32)
                if part.A is None:
                    add(groups + ((col_group,) if col_group is not None else ()), X.square().sum())
                    continue
                _, V, d = reference.operator_udv(part.operator)
                A_term = (part.A.square().sum(1) * d).sum()
                if col_group is None:
                    add(groups, X.square().sum() + ((X @ V).square().sum(0) * d).sum())
                    C = part.A @ V
                    shared.append((d[:, None] * d[None, :] * C.square()).sum() + A_term)
                else:
                    add(groups + (col_group,), X.square().sum())
                    add(groups, (part.B.square().sum(0) * d).sum())
                    add((col_group,), A_term)
                    shared.append((d[:, None] * d[None, :] * part.C.square()).sum())
        total = [_all_reduce_over_(torch.stack(sums).sum(), groups) for groups, sums in buckets.values()]
        return torch.stack(total + shared).sum()

    def _views(self, p, t: Tensor) -> list[Tensor]:
        """The slices' views of t, a tensor laid out like p's local shard, as the target is
        handled (transposed views for Shard(1))."""
        slice_dim, slices, layout, *_ = self._targets[id(p)]
        return [view for view, *_ in _local_blocks(_oriented(t, layout.axis), layout, slice_dim, slices)]

    @staticmethod
    def _correct(R: Tensor, part: _LocalSlice, alpha: float = 1.0) -> None:
        """R += alpha (U_r M + N V_c^T), in place."""
        if part.M is not None:
            R.addmm_(part.operator[0], part.M, alpha=alpha)
        if part.N is not None:
            R.addmm_(part.N, part.operator[1].transpose(0, 1), alpha=alpha)

    def full_terms(self, p) -> list[Tensor]:
        """R(X)_r of every slice of p in float32, whole (for weights or gradients that are not
        float32: added in one rounding, as the reference path does; split, the small
        correction would be rounded away)."""
        out = []
        for part in self._targets[id(p)][-1]:
            R = reference.apply_reweighting(part.x, *reference.operator_udv(part.operator)).to(torch.float32)
            self._correct(R, part)
            out.append(R)
        return out

    def local_work(self, work):
        """The ParamWork of a float32 parameter on its local shard, with the local operators of
        the slices that have local rows: the AdamQ3R step of q3r.optim.functional (fused
        kernels where they run) takes it, and :meth:`correct_` then adds the rest."""
        slice_dim, slices, layout, *_, parts = self._targets[id(work.param)]
        live = [part for part in parts if part.x.numel()]
        if slices is not None:  # the slices' ranges in the local shard (along work.slice_dim)
            slices = [(part.lo, part.hi) if slice_dim == 0 else (part.clo, part.chi) for part in live]
        return _localized(work, slices=slices, operators=[_oriented_operator(part.operator, layout.axis) for part in live])

    def correct_(self, p, t: Tensor, alpha: float) -> None:
        """t[slice] += alpha * (U_r M + N V_c^T) for every slice of p (t: float32, laid out like
        p's local shard): one or two rank-m matmuls per slice, in place."""
        for part, view in zip(self._targets[id(p)][-1], self._views(p, t)):
            if view.numel():
                self._correct(view, part, alpha)

    def add_(self, pairs, alpha: float) -> None:
        """t[slice] += alpha * R(X)_r for every slice of p, for (p, t) in pairs (t laid out like
        p's local shard): for float32 t the local operators of all of them in one call of
        q3r.ops.add_reweighting_ (grouped Triton launches where they run, no full-size
        temporary), then the corrections."""
        from ..ops import add_reweighting_, add_scaled_

        outs, xs, operators, corrected = [], [], [], []
        for p, t in pairs:
            if t.dtype != torch.float32:
                for view, R in zip(self._views(p, t), self.full_terms(p)):
                    add_scaled_(view, R, alpha)  # (R: a new float32 tensor)
                continue
            axis = self._targets[id(p)][2].axis
            for view, part in zip(self._views(p, t), self._targets[id(p)][-1]):
                if view.numel():  # (the local shard as it is: q3r.ops sees no transposed view)
                    outs.append(_oriented(view, axis))
                    xs.append(_oriented(part.x, axis))
                    operators.append(_oriented_operator(part.operator, axis))
            corrected.append((p, t))
        add_reweighting_(outs, xs, operators, alpha)
        for p, t in corrected:
            self.correct_(p, t, alpha)


def diagnostic_slices(p, slice_dim: int, slices, states) -> list[tuple[Tensor, dict]]:
    """Per slice of the target p: (the whole slice, its state with U in the slice's rows). For
    a sharded p a collective (all-gathers of the weight and of each U): for diagnostics, not
    for a training step."""
    if not is_sharded(p):
        return list(zip(slice_views(p.detach(), slice_dim, slices), states))
    W = p.detach().full_tensor()
    views = slice_views(W, slice_dim, slices)
    axis = shard_axis(p)
    key = ("U", "V")[axis]  # the factor sharded like p, in p's rows (Shard(0)) or columns (Shard(1))
    ranges = [(a, b) for a, b in slices] if slices is not None and slice_dim == axis else [(0, W.shape[axis])] * len(views)
    out = []
    for view, (a, b), s in zip(views, ranges, states):
        # that factor is in the parameter's rows / columns once refreshed here; before, it is
        # the empty slice-shaped start
        factor = s[key].full_tensor()[a:b] if is_sharded(s[key]) else s[key]
        out.append((view, {**s, key: factor}))
    return out


def new_target_states(p, slice_dim: int, slices) -> list[dict]:
    """The slice states of target p before its first refresh (refresh.new_slice_state). For a
    sharded p, U is a zero-wide DTensor in the parameter's rows, sharded like p, as a refresh
    leaves it: a checkpoint template made before any refresh (a fresh Q3R regularizer) then
    takes a saved U's shards (FactorLoadPlanner widens it), not the whole of it. For a Shard(1)
    target V is that DTensor, in the parameter's columns."""
    states = [new_slice_state(d1, d2, p.device) for d1, d2 in slice_shapes(p.shape, slice_dim, slices)]
    if is_sharded(p):
        local, axis = p.to_local(), shard_axis(p)
        shape = (p.shape[axis], 0)
        for s in states:
            s[("U", "V")[axis]] = DTensor.from_local(
                local.new_zeros(local.shape[axis], 0, dtype=torch.float32), p.device_mesh, _factor_placements(p),
                run_check=False, shape=shape, stride=torch.empty(shape, device="meta").stride())
    return states


def factor_rows(p, s: dict, d1: int, d2: int) -> tuple[int, int]:
    """The rows a loaded slice state s of a d1 x d2 slice of p must give its factors (U, V):
    the slice's, except for the factor sharded like p, which has the parameter's rows (U of a
    Shard(0) target) or columns (V of a Shard(1) one), see the module docstring. Refused (a
    ValueError): a sharded p whose factor is plain and non-empty (a checkpoint of an unsharded
    run: its rows would be misread), and a DTensor factor placed otherwise than this p keeps it
    (a state saved by a run sharded otherwise, or one rank's sharded state loaded unsharded:
    accepted by shape, it failed at the next step)."""
    rows = {"U": d1, "V": d2}
    key = None
    if is_sharded(p):
        axis = shard_axis(p)
        key = ("U", "V")[axis]
        if is_sharded(s[key]):
            rows[key] = p.shape[axis]
            if tuple(s[key].placements) != _factor_placements(p):
                raise ValueError(
                    f"the factor {key} of a sharded {tuple(p.shape)} parameter (placements {tuple(p.placements)}) "
                    f"is placed {tuple(s[key].placements)}, where this run keeps it {_factor_placements(p)}: a state "
                    "saved by a run sharded otherwise; save and load sharded runs with torch.distributed.checkpoint "
                    "(docs/distributed.md)")
        elif s[key].shape[-1] > 0:
            raise ValueError(
                f"the factor {key} {tuple(s[key].shape)} of a sharded {tuple(p.shape)} parameter (placements "
                f"{tuple(p.placements)}) was saved unsharded; save and load sharded runs with "
                "torch.distributed.checkpoint (docs/distributed.md)"
            )
    for other in ("U", "V"):
        if other != key and is_sharded(s[other]):
            where = "an unsharded" if key is None else f"a sharded {tuple(p.placements)}"
            raise ValueError(
                f"the factor {other} {tuple(s[other].shape)} is a DTensor (placements {tuple(s[other].placements)}), "
                f"as a sharded run saves it, but {where} {tuple(p.shape)} parameter keeps {other} a plain tensor: "
                "a state saved by a run sharded otherwise (one rank's shards, if saved with torch.save)")
    return rows["U"], rows["V"]


def _local(t):
    return t.to_local() if is_sharded(t) else t


def placed_like_param(p, g):
    """The gradient g of the DTensor p with p's placements (redistributed where they differ,
    else g itself). A gradient may come placed otherwise: Hugging Face's tensor-parallel
    embedding (weight Shard(0)) gets a Replicate() one. torch.optim's DTensor ops redistribute
    it on the fly; q3r works on the local shards, which must then cover the same entries."""
    if g is None or not (is_sharded(p) and is_sharded(g)):
        return g
    if g.device_mesh == p.device_mesh and tuple(g.placements) == tuple(p.placements):
        return g
    return g.redistribute(p.device_mesh, p.placements)


def _grads_placed_like_params_(params) -> None:
    """Replace each .grad that is placed unlike its parameter by one placed like it (the same
    values), so that a term added to its local shard lands on the right entries."""
    for p in params:
        placed = placed_like_param(p, p.grad)
        if placed is not p.grad:
            p.grad = placed


def _localized(work, **changes):
    """work on the local shards of its tensors (a plain tensor stays as it is)."""
    return dataclasses.replace(work, param=_local(work.param), grad=_local(work.grad), exp_avg=_local(work.exp_avg),
                               exp_avg_sq=_local(work.exp_avg_sq), **changes)


def sharded_adamq3r_step_(works) -> None:
    """The AdamQ3R step (SPEC section 3) for parameters that may be DTensors: the step of
    q3r.optim.functional (fused Triton kernels where they run) on the local shards with the
    local operators, then the low-rank corrections of :class:`ShardedTerms` (one all-reduce
    per step for all targets), all evaluated before the update moves the weights."""
    from ..optim.functional import adam_update_, adamq3r_step_

    works = [dataclasses.replace(w, grad=placed_like_param(w.param, w.grad)) for w in works]
    q3r_works = [w for w in works if is_sharded(w.param) and w.lmbda != 0 and w.operators]
    terms = ShardedTerms([(w.param, w.slice_dim, w.slices, w.operators) for w in q3r_works])
    with_term = {id(w) for w in q3r_works}
    fused = [w for w in q3r_works if w.param.dtype == torch.float32]
    adamq3r_step_([terms.local_work(w) for w in fused] + [
        _localized(w, operators=[] if is_sharded(w.param) else w.operators) for w in works if id(w) not in with_term])
    for w in fused:
        terms.correct_(w.param, w.param.to_local(), -w.lr * 2.0 * w.lmbda)
    for w in q3r_works:
        if w.param.dtype == torch.float32:
            continue
        # bf16 / fp16: the whole term at the weights before the step, the update of a float32
        # copy and one rounding, as adamq3r_reference_ does (rounded after Adam and again after
        # the term, a term below half an ulp of W was lost: most of it at typical lr * 2 lambda)
        todo = terms.full_terms(w.param)
        local = _localized(w, operators=[])
        low = local.param.dtype in (torch.bfloat16, torch.float16)
        target = local.param.float() if low else local.param
        adam_update_(local, target)
        for view, R in zip(terms._views(w.param, target), todo):
            view.sub_(R.to(view.dtype), alpha=w.lr * 2.0 * w.lmbda)
        if low:
            local.param.copy_(target)


def sharded_add_grad_(entries, grads) -> None:
    """Q3R.add_grad_ for sharded targets: entries (param, slice_dim, slices, operators, scale),
    grads the parameters' (DTensor) gradients; adds scale * R(X) to each slice of the local
    gradient."""
    terms = ShardedTerms([entry[:4] for entry in entries])
    by_scale: dict[float, list] = {}
    for entry, g in zip(entries, grads):
        p = entry[0]
        if g is p.grad:  # (placed like p first: the term goes into the local shard)
            _grads_placed_like_params_([p])
            g = p.grad
        elif placed_like_param(p, g) is not g:  # (a copy placed like p would take the term, not g)
            raise ValueError(f"a gradient placed {tuple(g.placements)} for a sharded target placed "
                             f"{tuple(p.placements)}: pass it placed like its parameter")
        by_scale.setdefault(entry[4], []).append((p, _local(g)))
    for scale, pairs in by_scale.items():
        terms.add_(pairs, scale)


def sharded_penalty(entries) -> Tensor:
    """The sum over the slices of sharded targets of <X, R(X)>, differentiable: its backward
    adds grad_output * 2 R(X) to the sharded ``.grad`` of the parameters that require it.

    entries: (param DTensor, slice_dim, slices, operators per slice). The value costs one
    all-reduce of the A = U^T X of all slices and one of a scalar per process group. The
    gradient does not flow through autograd's accumulation into ``.grad``: FSDP2 writes the
    reduced gradient shards on its own stream and only makes the default stream wait for them
    in a callback at the end of the backward pass, so the term is added in a callback queued to
    run after that one (see queue_after_backward_callbacks), at the weights the value was
    taken at (nothing moves them before the backward pass in a training loop). So it reaches
    ``.grad`` also under ``torch.autograd.grad`` (which leaves ``.grad`` alone otherwise) and is
    not differentiable again (``create_graph``). Under FSDP2's ``set_is_last_backward(False)``
    that callback does not wait for the reduction: use the penalty only in the last backward
    pass of such a sequence (or add_grad_ / AdamQ3R).
    """
    params = [e[0] for e in entries]
    return _PenaltyOfShards.apply(entries, *params)


class _PenaltyOfShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, entries, *params):
        ctx.terms, ctx.params = ShardedTerms(entries), params
        return ctx.terms.penalty_value()

    @staticmethod
    def backward(ctx, grad_output):
        terms = ctx.terms
        params = [p for i, p in enumerate(ctx.params) if ctx.needs_input_grad[1 + i]]

        def add_():
            factor = 2.0 * float(grad_output)  # at the end of the backward pass: one sync per step
            for p in params:
                if p.grad is None:
                    p.grad = DTensor.from_local(torch.zeros_like(p.to_local()), p.device_mesh, p.placements,
                                                run_check=False, shape=p.shape, stride=p.stride())
            _grads_placed_like_params_(params)
            with no_autocast():  # (a backward pass may run inside the caller's autocast too)
                terms.add_([(p, p.grad.to_local()) for p in params], factor)

        queue_after_backward_callbacks(add_)
        return (None,) * (1 + len(ctx.params))


def queue_after_backward_callbacks(fn) -> None:
    """From inside a backward pass: run fn at its end, after every callback queued during it.

    Final callbacks run in the order they were queued, and one queued by a callback runs after
    all of them. FSDP2 queues the callback that waits for its gradient reduction while the
    backward pass runs, possibly after the caller: queuing from a callback puts fn after it."""
    engine = torch.autograd.Variable._execution_engine
    engine.queue_callback(lambda: engine.queue_callback(fn))

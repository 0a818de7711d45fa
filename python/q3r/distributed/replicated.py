"""Refresh under data parallelism (DDP): every rank holds the same weights.

The reference implementation splits the per-target work across ranks and then all-reduces a
full-size gradient buffer of every target at every step. Here the only communication is at
a refresh (every T steps): the targets are assigned to ranks balanced by the cost of their
decomposition, each rank refreshes its share, and the new factors (U, V, sigma, eps and
the scalar state) are exchanged in two collectives, after a third that checks that every
rank refreshes the same targets (an all_gather of their count and a checksum of their names
and shapes: the other two have sizes that depend on them):

1. an all_gather of a small header per rank: the shapes of every state entry of each slice
   it refreshed (the widths k vary per slice and refresh) and a float64 checksum of every slice's weights, which
   must agree across ranks (else the ranks do not hold replicas, and splitting the work
   would be wrong: we raise instead of silently mixing factors), and whether its own refresh
   raised (then every rank raises, none changing its factors: each refreshes into copies);
2. an all_gather of one flat float32 buffer per rank holding its slices' state entries
   (U, V, sigma, eps, ... -- whatever refresh.py keeps), padded to the largest rank's buffer -- unless the padding would more than double
   the bytes (many more ranks than slices, or one slice much larger than the rest): then one
   broadcast per owning rank instead, which moves exactly the factors.

Between refreshes each rank applies the Q3R term to its own replica: no per-step collective.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor

from ..refresh import SliceConfig, new_slice_state, refresh_slices_ as _refresh_local_
from ..stagger import balance_by_cost
from . import comm

__all__ = ["refresh_cost", "assign_by_cost", "refresh_slices_replicated_"]

# all_gather pads every rank's buffer to the largest; above this many bytes per useful byte,
# the factors go out by one broadcast per owner instead
PADDING_LIMIT = 2.0


def refresh_cost(shape, rank: int, method: str = "exact") -> float:
    """Flops (up to a constant) of refreshing a d1 x d2 slice: a full SVD costs d1 d2 min(d1, d2);
    a sketch of width ~rank costs d1 d2 rank."""
    d1, d2 = shape
    return float(d1) * d2 * (min(d1, d2) if method == "exact" else rank + 10)


def assign_by_cost(costs: list[float], world: int) -> list[int]:
    """Owner rank of each item, balancing the summed cost per rank (see
    q3r.stagger.balance_by_cost): deterministic, so every rank computes the same assignment
    without talking."""
    return balance_by_cost(costs, world)


def _state_keys() -> list[str]:
    """Every key of a slice state, in an order all ranks share (new keys of refresh.py included)."""
    return sorted(new_slice_state(1, 1))


def _shapes_row(state: dict[str, Tensor], keys: list[str]) -> list[float]:
    """(ndim, size0, size1) per key: the header that lets other ranks size the payload.
    ndim -1 marks a key this state lacks."""
    row = []
    for key in keys:
        t = state.get(key)
        if t is None:
            row += [-1, 0, 0]
            continue
        if t.dim() > 2:
            raise ValueError(f"q3r: slice state entry {key!r} has {t.dim()} dims; at most 2 are exchanged")
        row += [t.dim(), *(list(t.shape) + [0, 0])[:2]]
    return row


def _numel(row: list[int]) -> int:
    total = 0
    for ndim, a, b in zip(row[0::3], row[1::3], row[2::3]):
        total += 0 if ndim < 0 else 1 if ndim == 0 else a if ndim == 1 else a * b
    return total


def _pack(state: dict[str, Tensor], keys: list[str]) -> Tensor:
    return torch.cat([state[k].reshape(-1).to(torch.float32) for k in keys if k in state])


def _unpack_(state: dict[str, Tensor], flat: Tensor, row: list[int], keys: list[str]) -> None:
    """Replace every entry of ``state`` by the owner's (float32 on the wire; int64 counters
    are exact there below 2**24 refreshes)."""
    offset = 0
    for key, ndim, a, b in zip(keys, row[0::3], row[1::3], row[2::3]):
        if ndim < 0:
            continue
        shape = [(), (a,), (a, b)][ndim]
        n = _numel([ndim, a, b])
        like = state.get(key)
        dtype = like.dtype if like is not None else torch.float32
        value = flat[offset : offset + n].reshape(shape)
        state[key] = (value.round() if not dtype.is_floating_point else value).to(dtype).clone()
        offset += n


def same_on_every_rank(targets: list[tuple[str, tuple[int, ...]]], device, group) -> bool:
    """Whether every rank of ``group`` has these same (name, shape) targets: one all_gather of
    their count and a checksum of their names and shapes. Every rank must call it."""
    text = "\n".join(f"{name}:{tuple(shape)}" for name, shape in targets)
    mine = torch.tensor([len(targets), zlib.crc32(text.encode())], dtype=torch.float64, device=device)
    everyone = torch.stack(comm.all_gather(mine, group)).cpu()
    return bool((everyone == everyone[0]).all())


def _check_same_targets(configs, shapes, device, group) -> None:
    """Refuse, with a message that says what to do, ranks that refresh different targets (the
    stages of a pipeline, different periods): the exchange's own collectives have sizes that
    depend on the targets, and would fail obscurely or hang."""
    if not same_on_every_rank([(c.name, s) for c, s in zip(configs, shapes)], device, group):
        raise RuntimeError(
            f"q3r: the ranks refresh different targets now (this rank: {len(configs)}, e.g. {configs[0].name!r}); a "
            "distributed refresh divides the work of data-parallel replicas. Where ranks train different weights "
            "(pipeline stages) or on different schedules, call q3r.distributed.configure(replicated=False) "
            "(AdamQ3R under ZeroRedundancyOptimizer finds that out by itself)"
        )


def refresh_slices_replicated_(
    weights: list[Tensor],
    states: list[dict[str, Tensor]],
    configs: list[SliceConfig],
    method: str = "exact",
    warned: set | None = None,
    group=None,
    options=None,
) -> list[bool]:
    """:func:`q3r.refresh.refresh_slices_` with the work divided across the ranks of ``group``
    (``options``: its SketchOptions).

    Same arguments and result; every rank must call it with the same targets in the same
    order and identical weights (as under DDP). Non-finite slices are skipped on every rank
    (the owner warns once).
    """
    world = comm.world_size(group)
    if world == 1 or not weights:  # every rank has the same (empty) list: nothing to exchange
        return _refresh_local_(weights, states, configs, method=method, warned=warned, options=options)
    me = comm.rank(group)
    shapes = [tuple(w.shape) for w in weights]
    _check_same_targets(configs, shapes, weights[0].device, group)
    owner = assign_by_cost([refresh_cost(s, c.rank, method) for s, c in zip(shapes, configs)], world)
    mine = [i for i in range(len(weights)) if owner[i] == me]
    # this rank's share is refreshed into copies of its states, committed once every rank has
    # refreshed its own: a failure on one rank (out of memory on the owner of the largest
    # target, an SVD that does not converge) then reaches the others through the header below,
    # instead of leaving them waiting in its all_gather until the process group times out, and
    # leaves every rank's factors as they were (the replicas stay equal)
    drafts = [dict(states[i]) for i in mine]
    failure = None
    try:
        done_mine = _refresh_local_(
            [weights[i] for i in mine], drafts, [configs[i] for i in mine], method=method, warned=warned,
            options=options,
        )
    except Exception as error:
        failure, done_mine = error, [False] * len(mine)
    device = weights[0].device if weights else torch.device("cpu")
    n, keys = len(weights), _state_keys()
    width = 3 * len(keys)
    # per slice: the shapes of its new state (owner) or -2 (not refreshed here); then checksums;
    # then whether this rank's refresh failed
    header = torch.full((n * width + n + 1,), -2.0, dtype=torch.float64, device=device)
    for draft, i, ok in zip(drafts, mine, done_mine):
        if ok:
            header[i * width : (i + 1) * width] = torch.tensor(_shapes_row(draft, keys), dtype=torch.float64)
    header[n * width : n * width + n] = torch.stack([torch.sum(w.detach(), dtype=torch.float64) for w in weights])
    header[-1] = float(failure is not None)
    headers = torch.stack(comm.all_gather(header, group)).cpu()
    failed = [r for r in range(world) if headers[r, -1] != 0]
    if failure is not None:
        raise failure
    if failed:
        raise RuntimeError(
            f"q3r: the refresh failed on rank(s) {failed} of the replicas' group (see its error there); no rank "
            "changed its factors"
        )
    sums = headers[:, n * width : n * width + n]
    same = (sums == sums[0]) | (torch.isnan(sums) & torch.isnan(sums[0]))
    if not bool(same.all()):
        bad = [configs[i].name for i in range(n) if not bool(same[:, i].all())]
        raise RuntimeError(
            f"q3r: the weights of {bad[:3]} differ across ranks, so they are not data-parallel replicas; "
            "a distributed refresh needs identical weights (wrap the model in DDP), or call "
            "q3r.distributed.configure(replicated=False) to refresh on every rank independently"
        )
    for draft, i in zip(drafts, mine):
        states[i].update(draft)
    rows = [[int(v) for v in headers[owner[i], i * width : (i + 1) * width].tolist()] for i in range(n)]
    done = [row[0] != -2 for row in rows]
    sizes = [0] * world
    for i in range(n):
        if done[i]:
            sizes[owner[i]] += _numel(rows[i])
    gather = world * max(sizes) <= PADDING_LIMIT * sum(sizes)
    buf = torch.zeros(max(sizes) if gather else sizes[me], dtype=torch.float32, device=device)
    offset = 0
    for i in mine:
        if done[i]:
            packed = _pack(states[i], keys)
            buf[offset : offset + packed.numel()] = packed
            offset += packed.numel()
    if max(sizes) == 0:
        gathered = []
    elif gather:
        gathered = comm.all_gather(buf, group)
    else:
        gathered = [
            buf if r == me else torch.empty(sizes[r], dtype=torch.float32, device=device) for r in range(world)
        ]
        for r in range(world):
            if sizes[r]:
                comm.broadcast_(gathered[r], r, group)
    offsets = [0] * world
    for i in range(n):
        if not done[i]:
            continue
        src, size = owner[i], _numel(rows[i])
        if src != me:
            _unpack_(states[i], gathered[src][offsets[src] : offsets[src] + size], rows[i], keys)
        offsets[src] += size
    return done

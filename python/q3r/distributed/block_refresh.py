"""Refreshes of block targets, divided over the ranks that share their rows.

A block target (FSDP2 over a RowwiseParallel weight, placements ``(Shard(0), Shard(1))``) has
its rows split over one mesh dim and its columns over another: the ranks of a column group
(the tensor-parallel ranks of one FSDP2 shard) hold the same rows in different columns, and
need the same factors, since the per-step term sums over the columns (sharded.ShardedTerms).

Each block target is refreshed by one rank of its column group, its *owner*: the targets of
a refresh are dealt out by size, largest first, each to the least loaded rank (the same
choice on every rank: it depends only on the targets' shapes and order). Its rows are
gathered whole on the owner alone, the owner runs the range finder with the other owners of
the same columns (its row group: every member has the same column coordinate, hence the same
targets), and then broadcasts the new factors to its column group.

Why not let every rank of the column group refresh, as each holds the gathered rows anyway:
that repeats the work tp times, and the copies agree only if every reduction is bitwise
reproducible. A copy with one more triplet above eps would make the per-step all-reduce over
the columns differ in size between ranks, which gloo aborts and NCCL may hang on. One owner
per target makes the copies equal by construction and divides the work.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import comm

try:
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover
    DTensor, Replicate = None, None

__all__ = ["owners", "gather_rows", "factor_placements", "share_"]

# the scalars of a slice state a refresh writes (besides U, V, sigma and the refresh count)
_SCALARS = ("eps", "eps0", "sigma_next", "tail_energy")


def owners(params: list, layouts: list) -> list[int | None]:
    """Per target (a DTensor and its _Layout): the rank of its column group that refreshes it,
    None for a target that is not a block. Largest first (by global size: the same choice in
    every column group) to the least loaded rank, per column group."""
    out: list[int | None] = [None] * len(layouts)
    by_group: dict[int, list[int]] = {}
    for i, layout in enumerate(layouts):
        if layout.col_dim is not None:
            by_group.setdefault(id(layout.col_group), []).append(i)
    for members in by_group.values():
        # by the whole target's size, not this rank's rows of it: the owners of a block must be
        # the same in every column group (the members of a row group run the range finder
        # together, so must own the same blocks), and torch.chunk gives the row shards of a
        # target whose rows do not divide evenly different sizes (even none), which could
        # order the targets differently from one row shard to the next
        size = {i: params[i].shape[0] * params[i].shape[1] for i in members}
        load = [0] * comm.world_size(layouts[members[0]].col_group)
        for i in sorted(members, key=lambda i: -size[i]):  # (stable: ties keep their order)
            owner = min(range(len(load)), key=lambda o: (load[o], o))
            out[i] = owner
            load[owner] += size[i]
    return out


def gather_rows(p, layout, owner: int) -> Tensor | None:
    """On the owner: this rank's rows of the block target p with all their columns (its block
    gathered over the column group; torch.chunk's uneven last chunks padded for the
    collective). None on the other ranks."""
    local, group, (c0, c1) = p.to_local().detach(), layout.col_group, layout.cols
    chunk = -(-p.shape[1] // comm.world_size(group))
    padded = torch.nn.functional.pad(local, (0, chunk - (c1 - c0)))
    parts = comm.gather(padded, owner, group)
    return None if parts is None else torch.cat(parts, dim=1)[:, : p.shape[1]]


def factor_placements(p, layout) -> tuple:
    """A block target's U: split over the mesh dims of p's rows, replicated over its columns'."""
    return tuple(Replicate() if i == layout.col_dim else on for i, on in enumerate(p.placements))


@torch.no_grad()
def share_(blocks: list[tuple], refreshed: set[int]) -> None:
    """Broadcast each block target's new factors from its owner to its column group.

    blocks: (p, layout, slice states, slice shapes, owner) of every block target of the
    refresh, in the same order on every rank; refreshed: the ids of the slice states this rank refreshed (a
    slice with non-finite weights is left as it was, on every rank). Per column group and
    owner: one broadcast of the factor widths, one of the factors, all slices packed."""
    by_group: dict[int, list[tuple]] = {}
    for block in blocks:
        by_group.setdefault(id(block[1].col_group), []).append(block)
    for members in by_group.values():
        group = members[0][1].col_group
        me = comm.rank(group)
        for owner in range(comm.world_size(group)):
            mine = [(p, layout, s, shape) for p, layout, states, shapes, o in members if o == owner
                    for s, shape in zip(states, shapes)]
            if mine:
                _share_from_(owner, me, group, mine, refreshed)


def _share_from_(owner: int, me: int, group, slices: list[tuple], refreshed: set[int]) -> None:
    device = slices[0][0].to_local().device
    # (-1: a slice its owner did not refresh: non-finite weights, left as they were everywhere)
    widths = torch.tensor([s["sigma"].shape[0] if id(s) in refreshed else -1 for _, _, s, _ in slices]
                          if me == owner else [0] * len(slices), dtype=torch.int64, device=device)
    widths = comm.broadcast_(widths, owner, group).tolist()
    if all(k < 0 for k in widths):
        return
    if me == owner:
        parts = [t.reshape(-1).to(torch.float32) for (_, _, s, _), k in zip(slices, widths) if k >= 0
                 for t in (s["U"].to_local(), s["V"], s["sigma"], *(s[n] for n in _SCALARS))]
        comm.broadcast_(torch.cat(parts), owner, group)
        return
    # U: this rank's rows of the parameter (the owner's are the same rows), V: the slice's columns
    sizes = [(p.to_local().shape[layout.axis], d2, k) for (p, layout, _, (_, d2)), k in zip(slices, widths)]
    total = sum(rows * k + cols * k + k + len(_SCALARS) for rows, cols, k in sizes if k >= 0)
    flat = comm.broadcast_(torch.empty(total, dtype=torch.float32, device=device), owner, group)
    at = 0
    for (p, layout, s, _), (rows, cols, k) in zip(slices, sizes):
        if k < 0:
            continue
        U, V, sigma, *scalars = torch.split(flat[at:at + rows * k + cols * k + k + len(_SCALARS)],
                                            [rows * k, cols * k, k] + [1] * len(_SCALARS))
        at += rows * k + cols * k + k + len(_SCALARS)
        s["U"] = DTensor.from_local(U.reshape(rows, k).clone(), p.device_mesh, factor_placements(p, layout),
                                    run_check=False, shape=(p.shape[layout.axis], k), stride=(k, 1))
        s["V"] = V.reshape(cols, k).clone()
        s["sigma"] = sigma.clone()
        for name, value in zip(_SCALARS, scalars):
            s[name] = value.reshape(()).clone()
        s["refreshes"] = s["refreshes"] + 1

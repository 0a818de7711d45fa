"""Refreshes of sharded targets divided over ranks that would otherwise repeat them.

Two kinds of ranks hold the same rows of a target and need the same factors:

* **Block targets** (FSDP2 over a RowwiseParallel weight, placements ``(Shard(0), Shard(1))``):
  the ranks of a column group (the tensor-parallel ranks of one FSDP2 shard) hold the same
  rows in different columns; the per-step term sums over the columns (sharded.ShardedTerms).
* **Replicas** (HSDP, placements ``(Replicate(), Shard(0 or 1))``; torch's FSDP2-based
  ``replicate``, all ``Replicate()``; tensor parallelism under it): the ranks of a replicate
  mesh dim hold the same local shard.

Each such target is refreshed by one rank of that group (the column group, or the replicate
dim's group), its *owner*: the targets of a refresh are dealt out by size, largest first, each
to the least loaded rank (the same choice on every rank: it depends only on the targets' global
shapes and order). A block's rows are gathered whole on the owner alone; the owner runs the
range finder with the other owners of the same rows' shards (its row group: every member has
the same coordinate on the sharing dim, hence the same targets), and then broadcasts the new
factors to the group.

Why not let every rank of the group refresh, as each holds what it needs: that repeats the
work once per rank of the group, and the copies agree only if every reduction is bitwise
reproducible. For a block, a copy with one more triplet above eps would make the per-step
all-reduce over the columns differ in size between ranks, which gloo aborts and NCCL may
hang on. One owner per target makes the copies equal by construction and divides the work.
A target with more than one replicate mesh dim of size > 1 (and no block split) is refreshed
by every rank as before.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..stagger import balance_by_cost
from . import comm

try:
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover
    DTensor, Replicate = None, None

__all__ = ["Owner", "sharing_dim", "owners", "gather_rows", "factor_placements", "share_"]

# the scalars of a slice state a refresh writes (besides U, V, sigma and the refresh count)
_SCALARS = ("eps", "eps0", "sigma_next", "tail_energy")


@dataclasses.dataclass(frozen=True)
class Owner:
    """Who refreshes a target: rank ``rank`` of ``group``, the process group of mesh dim ``dim``
    (a block's columns, or a replicate dim)."""

    dim: int
    group: object
    rank: int


def sharing_dim(p, layout) -> int | None:
    """The mesh dim whose ranks hold the same rows of p and so may share its refresh: a block's
    columns' dim; else its one replicate dim of size > 1; else None."""
    if layout.col_dim is not None:
        return layout.col_dim
    mesh = p.device_mesh
    replicated = [i for i, on in enumerate(p.placements) if isinstance(on, Replicate) and mesh.size(i) > 1]
    return replicated[0] if len(replicated) == 1 else None


def owners(params: list, layouts: list) -> list[Owner | None]:
    """Per target (a DTensor and its _Layout): its Owner, None for a target every rank refreshes
    its part of (no sharing dim). Largest first (by global size: the same choice in every group)
    to the least loaded rank, per group."""
    out: list[Owner | None] = [None] * len(layouts)
    by_group: dict[int, list[tuple[int, int]]] = {}
    for i, (p, layout) in enumerate(zip(params, layouts)):
        dim = sharing_dim(p, layout)
        if dim is not None:
            by_group.setdefault(id(p.device_mesh.get_group(dim)), []).append((i, dim))
    for members in by_group.values():
        # by the whole target's size, not this rank's rows of it: the owners of a target must be
        # the same in every group (the members of a row group run the range finder together,
        # so must own the same targets), and torch.chunk gives the row shards of a target whose
        # rows do not divide evenly different sizes (even none), which could order the targets
        # differently from one row shard to the next
        group = params[members[0][0]].device_mesh.get_group(members[0][1])
        sizes = [params[i].shape[0] * params[i].shape[1] for i, _ in members]
        for (i, dim), rank in zip(members, balance_by_cost(sizes, comm.world_size(group))):
            out[i] = Owner(dim, group, rank)
    return out


def gather_rows(p, layout, owner: Owner) -> Tensor | None:
    """On the owner: this rank's rows of the block target p with all their columns (its block
    gathered over the column group; torch.chunk's uneven last chunks padded for the
    collective). None on the other ranks."""
    local, group, (c0, c1) = p.to_local().detach(), layout.col_group, layout.cols
    chunk = -(-p.shape[1] // comm.world_size(group))
    padded = torch.nn.functional.pad(local, (0, chunk - (c1 - c0)))
    parts = comm.gather(padded, owner.rank, group)
    return None if parts is None else torch.cat(parts, dim=1)[:, : p.shape[1]]


def factor_placements(p, layout) -> tuple:
    """A block target's U: split over the mesh dims of p's rows, replicated over its columns'."""
    return tuple(Replicate() if i == layout.col_dim else on for i, on in enumerate(p.placements))


@torch.no_grad()
def share_(shared: list[tuple], refreshed: set[int], placements_of, notes: dict | None = None) -> dict[int, tuple]:
    """Broadcast each shared target's new factors from its owner to its group.

    shared: (p, layout, slice states as the target is handled (placement.oriented_state), their
    ids in the optimizer's state, slice shapes as handled, Owner) of every shared target of the
    refresh, in the same order on every rank; refreshed: the ids of the slice states this rank
    refreshed (a slice with non-finite weights is left as it was, on every rank);
    placements_of(p): the placements of p's sharded factor; notes: per id of a slice state this
    rank refreshed, what the refresh has to warn about, (inert, r_env of a truncated envelope or
    -1, the sketch's width). Per group and owner: one broadcast of the factor widths (with those
    notes), one of the factors, all slices packed.

    Returns, on every rank of the group, per id of a shared slice state: (width, or -1 where not
    refreshed; inert; r_env or -1; sketch width): the owner of a target depends on which targets
    a refresh has (a staggered one, periods differing between param groups), so its warnings
    are given by a rank that does not (placement.leads without an owner)."""
    notes = {} if notes is None else notes
    told: dict[int, tuple] = {}
    by_group: dict[int, list[tuple]] = {}
    for target in shared:
        by_group.setdefault(id(target[-1].group), []).append(target)
    for members in by_group.values():
        group = members[0][-1].group
        me = comm.rank(group)
        for rank in range(comm.world_size(group)):
            mine = [(p, layout, s, key, shape) for p, layout, states, keys, shapes, owner in members
                    if owner.rank == rank for s, key, shape in zip(states, keys, shapes)]
            if mine:
                _share_from_(rank, me, group, mine, refreshed, placements_of, notes, told)
    return told


def _share_from_(owner: int, me: int, group, slices: list[tuple], refreshed: set[int], placements_of,
                 notes: dict, told: dict) -> None:
    device = slices[0][0].to_local().device
    # (width -1: a slice its owner did not refresh: non-finite weights, left as they were
    # everywhere; then its notes, see share_)
    header = torch.tensor([[s["sigma"].shape[0], *notes.get(key, (0, -1, 0))] if key in refreshed else [-1, 0, -1, 0]
                           for _, _, s, key, _ in slices] if me == owner else [[0] * 4] * len(slices),
                          dtype=torch.int64, device=device)
    header = comm.broadcast_(header, owner, group).tolist()
    told.update((key, tuple(row)) for (_, _, _, key, _), row in zip(slices, header))
    widths = [row[0] for row in header]
    if all(k < 0 for k in widths):
        return
    if me == owner:
        parts = [t.reshape(-1).to(torch.float32) for (_, _, s, _, _), k in zip(slices, widths) if k >= 0
                 for t in (s["U"].to_local(), s["V"], s["sigma"], *(s[n] for n in _SCALARS))]
        comm.broadcast_(torch.cat(parts), owner, group)
        return
    # U: this rank's rows of the (handled) parameter, the owner's being the same rows; V: the
    # slice's columns
    sizes = [(p.to_local().shape[layout.axis], d2, k) for (p, layout, _, _, (_, d2)), k in zip(slices, widths)]
    total = sum(rows * k + cols * k + k + len(_SCALARS) for rows, cols, k in sizes if k >= 0)
    flat = comm.broadcast_(torch.empty(total, dtype=torch.float32, device=device), owner, group)
    at = 0
    for (p, layout, s, _, _), (rows, cols, k) in zip(slices, sizes):
        if k < 0:
            continue
        U, V, sigma, *scalars = torch.split(flat[at:at + rows * k + cols * k + k + len(_SCALARS)],
                                            [rows * k, cols * k, k] + [1] * len(_SCALARS))
        at += rows * k + cols * k + k + len(_SCALARS)
        s["U"] = DTensor.from_local(U.reshape(rows, k).clone(), p.device_mesh, placements_of(p),
                                    run_check=False, shape=(p.shape[layout.axis], k), stride=(k, 1))
        s["V"] = V.reshape(cols, k).clone()
        s["sigma"] = sigma.clone()
        for name, value in zip(_SCALARS, scalars):
            s[name] = value.reshape(()).clone()
        s["refreshes"] = s["refreshes"] + 1

"""Where a sharded target's pieces live: the layout of a DTensor target (which rows and columns
this rank holds, over which process groups), its orientation, and where its factors are placed.

A ``Shard(1)`` target is handled as its transpose, whose rows are sharded (SPEC section 2:
R_{U,V}(X)^T = R_{V,U}(X^T)); the helpers ``oriented*`` give the views and states of the target
as handled. The factor sharded like the weight (U of a ``Shard(0)`` target, V of a ``Shard(1)``
one) is a DTensor in the parameter's rows / columns, so that torch.distributed.checkpoint saves
and reshards it (see :mod:`.sharded` for the whole design).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .._orientation import TransposedState
from ..refresh import new_slice_state
from ..targets import slice_shapes, slice_views
from . import comm, refresh_owners

try:  # DTensor is public since torch 2.4; keep `import q3r` working without it
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor, Replicate, Shard = None, None, None
try:  # (private: FSDP2's placement of a tensor-parallel weight's rows; a Shard subclass in some versions)
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:  # pragma: no cover
    _StridedShard = ()


def is_sharded(t) -> bool:
    """True for a DTensor (FSDP2 parameter, its gradient or optimizer state)."""
    return DTensor is not None and isinstance(t, DTensor)


@dataclasses.dataclass(frozen=True)
class Layout:
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


def layout_of(p, where: str = "q3r") -> Layout:
    """The Layout of the DTensor p; a split q3r cannot handle raises NotImplementedError naming
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
    return Layout(axis, row_dims, col_dim, rows, cols, tuple(mesh.get_group(d) for d in row_dims),
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
    return layout_of(p, where).axis


def oriented(t: Tensor, axis: int) -> Tensor:
    """t as a target sharded along ``axis`` is handled: itself, or its transpose (a view)."""
    return t if axis == 0 else t.mT


def oriented_slicing(axis: int, slice_dim: int) -> int:
    """The slice dim of the target as handled: row slices of a transposed target are column slices."""
    return slice_dim if axis == 0 else 1 - slice_dim


def oriented_state(s: dict, axis: int):
    """A slice state as the handled target sees it (U and V trade places for a transposed one)."""
    return s if axis == 0 else TransposedState(s)


def oriented_operator(op: tuple, axis: int) -> tuple:
    """(U, V, ...) of the parameter as the handled target's, or back (the same swap both ways)."""
    return op if axis == 0 else (op[1], op[0], *op[2:])


def factor_placements(p) -> tuple:
    """The placements of the sharded factor of p, in p's handled rows: split like them (p's,
    with a Shard(1) of a transposed target as Shard(0)); replicated over the mesh dim that
    splits a block's columns."""
    layout = layout_of(p)
    if layout.col_dim is not None:
        return refresh_owners.factor_placements(p, layout)
    return tuple(Shard(0) if type(on) is Shard else on for on in p.placements)


def check_sharding(p, where: str) -> None:
    """Refuse, when the optimizer or regularizer is built, a DTensor target q3r cannot handle."""
    if is_sharded(p):
        layout_of(p, where)  # (its placements, then its rows: refused here, not at a later step)


def group_key(groups: tuple) -> tuple:
    return tuple(id(g) for g in groups)


def all_reduce_over_(t: Tensor, groups: tuple) -> Tensor:
    """Sum t over every rank of the groups (in place): one all-reduce per group, in turn."""
    for group in groups:
        comm.all_reduce_(t, group)
    return t


def leads(p) -> bool:
    """True on the one rank of p's mesh that speaks for all: coordinate 0 on every mesh dim.
    (Not the owner of a shared target's refresh, refresh_owners: which rank that is depends on
    the targets due with it, so its warnings would come once from each rank it was dealt to.)"""
    return all(c == 0 for c in p.device_mesh.get_coordinate())


def row_range(p, where: str = "q3r") -> tuple[int, int]:
    """Rows [start, stop) of the parameter p held by this rank, or its columns for Shard(1)
    (torch.chunk layout, FSDP2's and DTensor's; another split, a DTensor built by hand, is
    refused)."""
    return layout_of(p, where).rows


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


def local_tensor(t):
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
                local.new_zeros(local.shape[axis], 0, dtype=torch.float32), p.device_mesh, factor_placements(p),
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
            if tuple(s[key].placements) != factor_placements(p):
                raise ValueError(
                    f"the factor {key} of a sharded {tuple(p.shape)} parameter (placements {tuple(p.placements)}) "
                    f"is placed {tuple(s[key].placements)}, where this run keeps it {factor_placements(p)}: a state "
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

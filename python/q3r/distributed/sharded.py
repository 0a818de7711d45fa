"""Q3R on sharded weights: DTensors with ``Shard(0)`` or ``Shard(1)`` on one mesh dim.

``Shard(0)`` is FSDP2's (``fully_shard``) and tensor parallelism's ``ColwiseParallel``;
``Shard(1)`` is ``RowwiseParallel``'s. A ``Shard(1)`` target is handled as its transpose, whose
rows are sharded: the operator is the same for W^T with U and V trading places (SPEC section 2:
R_{U,V}(X)^T = R_{V,U}(X^T)), so everything below, written for sharded rows, runs on transposed
views of the local shard and a view of each slice state in which U and V trade places
(q3r._orientation.TransposedState, placement.oriented_state). Only the small correction (``ShardedTerms``) and the refresh
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

The refresh (:mod:`.sharded_refresh`) runs the randomized range finder of :mod:`.rangefinder` on
the local rows. The layouts and orientation of sharded targets are :mod:`.placement`'s; the
training-step entry points (AdamQ3R step, add_grad_, penalty) are :mod:`.sharded_step`'s; this
module holds the per-step term, :class:`ShardedTerms`.

Layout of the factors, chosen so that torch.distributed.checkpoint saves and reshards them:
U of every slice of a Shard(0) target is a DTensor of shape (rows of the *parameter*, k),
Shard(0), i.e. stored in the parameter's row coordinates and sharded exactly like the weight;
for a row slice (timm qkv) the rows outside the slice are zero. For a Shard(1) target V plays
that part: a DTensor of shape (columns of the parameter, k), Shard(0) where the weight has
Shard(1), zero outside a column slice; its U is then the plain, replicated factor. The width k is target rank + oversampling
unless the envelope outgrows it (then r_env + oversampling, see sharded_refresh._kept_width), so a
checkpoint template built before loading has the shapes of the saved factors, or
checkpoint.FactorLoadPlanner gives it them. The other factor, sigma and the scalars are plain
tensors, identical on every rank (DCP treats them as replicated).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .. import reference
from . import comm
from .placement import Layout, all_reduce_over_, group_key, is_sharded, layout_of, local_tensor, oriented, oriented_operator, oriented_slicing


def _local_U(U, lo: int, hi: int) -> Tensor:
    """Rows [lo, hi) of this rank's part of a factor sharded like the weight (or of a plain one)."""
    return U.to_local()[lo:hi] if is_sharded(U) else U[lo:hi]


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


def _local_blocks(local: Tensor, layout: Layout, slice_dim: int, slices) -> list[tuple]:
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
            layout = layout_of(p)
            groups, col_group = layout.row_groups, layout.col_group
            axis = layout.axis
            slice_dim = oriented_slicing(axis, slice_dim)
            parts = []
            blocks = _local_blocks(oriented(p.to_local().detach(), axis), layout, slice_dim, slices)
            for (x, lo, hi, clo, chi, v0, v1), op in zip(blocks, ops):
                op = oriented_operator(op, axis)
                m = int(next(counts)) if op[0].shape[-1] else 0
                if m == 0:  # R = I; U may be the slice-shaped start of a slice never refreshed
                    empty = x.new_zeros(x.shape[0], 0, dtype=torch.float32)
                    parts.append(_LocalSlice(x, lo, hi, clo, chi, (empty, op[1][v0:v1, :0], op[2][:0], *op[3:])))
                    continue
                local = (_local_U(op[0], lo, hi)[:, :m], op[1][v0:v1, :m], op[2][:m], *op[3:])
                part = _LocalSlice(x, lo, hi, clo, chi, local, A=local[0].transpose(0, 1) @ x.to(torch.float32))
                parts.append(part)
                pending.setdefault(group_key(groups), [groups, []])[1].append(part)
                if col_group is not None:
                    part.B = x.to(torch.float32) @ local[1]
                    block_pending.setdefault(id(col_group), [col_group, []])[1].append(part)
            self._targets[id(p)] = (slice_dim, slices, layout, groups, col_group, parts)
        for groups, parts in pending.values():
            local_A = [part.A for part in parts]
            total = all_reduce_over_(torch.cat([a.reshape(-1) for a in local_A]), groups)
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
            buckets.setdefault(group_key(groups), [groups, []])[1].append(value)

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
        total = [all_reduce_over_(torch.stack(sums).sum(), groups) for groups, sums in buckets.values()]
        return torch.stack(total + shared).sum()

    def _views(self, p, t: Tensor) -> list[Tensor]:
        """The slices' views of t, a tensor laid out like p's local shard, as the target is
        handled (transposed views for Shard(1))."""
        slice_dim, slices, layout, *_ = self._targets[id(p)]
        return [view for view, *_ in _local_blocks(oriented(t, layout.axis), layout, slice_dim, slices)]

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
        return localized(work, slices=slices, operators=[oriented_operator(part.operator, layout.axis) for part in live])

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
                    outs.append(oriented(view, axis))
                    xs.append(oriented(part.x, axis))
                    operators.append(oriented_operator(part.operator, axis))
            corrected.append((p, t))
        add_reweighting_(outs, xs, operators, alpha)
        for p, t in corrected:
            self.correct_(p, t, alpha)


def localized(work, **changes):
    """work on the local shards of its tensors (a plain tensor stays as it is)."""
    return dataclasses.replace(work, param=local_tensor(work.param), grad=local_tensor(work.grad), exp_avg=local_tensor(work.exp_avg),
                               exp_avg_sq=local_tensor(work.exp_avg_sq), **changes)

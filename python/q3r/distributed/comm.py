"""The only place q3r talks to torch.distributed: thin wrappers that also count.

Every collective q3r issues goes through these functions, so a test (or a user checking
a scaling estimate) can read exactly how many collectives of how many bytes a step or a
refresh cost: ``with comm.counting() as log: ...`` then ``log.calls`` / ``log.bytes``.
A world of one process issues nothing (the wrappers return their input).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["CommLog", "counting", "world_size", "rank", "all_reduce_", "all_gather", "gather", "broadcast_"]


@dataclass
class CommLog:
    """What was communicated: one (op, bytes sent by this rank) entry per collective."""

    entries: list[tuple[str, int]] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return len(self.entries)

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.entries)

    def count(self, op: str) -> int:
        return sum(1 for o, _ in self.entries if o == op)


_logs: list[CommLog] = []


@contextlib.contextmanager
def counting():
    """Record every q3r collective issued inside the block (nesting is allowed)."""
    log = CommLog()
    _logs.append(log)
    try:
        yield log
    finally:
        _logs.remove(log)


def _record(op: str, t: Tensor) -> None:
    for log in _logs:
        log.entries.append((op, t.numel() * t.element_size()))


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size(group=None) -> int:
    return dist.get_world_size(group) if initialized() else 1


def rank(group=None) -> int:
    return dist.get_rank(group) if initialized() else 0


def all_reduce_(t: Tensor, group=None) -> Tensor:
    """Sum t over the ranks of group, in place (no-op for a world of one)."""
    if world_size(group) > 1:
        _record("all_reduce", t)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def all_gather(t: Tensor, group=None) -> list[Tensor]:
    """Every rank's t (all the same shape), in rank order."""
    n = world_size(group)
    if n == 1:
        return [t]
    _record("all_gather", t)
    out = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def gather(t: Tensor, dst: int, group=None) -> list[Tensor] | None:
    """Every rank's t (all the same shape), in rank order, on rank dst of group; None on the
    other ranks."""
    n = world_size(group)
    if n == 1:
        return [t]
    _record("gather", t)
    out = [torch.empty_like(t) for _ in range(n)] if rank(group) == dst else None
    dist.gather(t.contiguous(), out, dst=dist.get_global_rank(group, dst) if group is not None else dst, group=group)
    return out


def broadcast_(t: Tensor, src: int, group=None) -> Tensor:
    """t from rank src (a rank of group) to every rank of group, in place."""
    if world_size(group) > 1:
        _record("broadcast", t)
        dist.broadcast(t, src=dist.get_global_rank(group, src) if group is not None else src, group=group)
    return t

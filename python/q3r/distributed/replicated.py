"""Refresh under data parallelism (DDP): every rank holds the same weights.

The reference implementation splits the per-target work across ranks and then all-reduces a
full-size gradient buffer of every target at every step. Here the only communication is at
a refresh (every T steps): the targets are assigned to ranks balanced by the cost of their
decomposition, each rank refreshes its share, and the new factors (U, V, sigma, eps and
the scalar state) are exchanged in two collectives:

1. an all_gather of a small header per rank: the width k of each slice it refreshed
   (-1: not its slice or skipped) and a float64 checksum of every slice's weights, which
   must agree across ranks (else the ranks do not hold replicas, and splitting the work
   would be wrong: we raise instead of silently mixing factors);
2. an all_gather of one flat float32 buffer per rank holding its slices' factors and
   scalars, padded to the largest rank's buffer.

Between refreshes each rank applies the Q3R term to its own replica: no per-step collective.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..refresh import SliceConfig, refresh_slices_ as _refresh_local_
from . import comm

__all__ = ["refresh_cost", "assign_by_cost", "refresh_slices_replicated_"]

_SCALARS = ("eps", "eps0", "sigma_next", "tail_energy", "refreshes")


def refresh_cost(shape, rank: int, method: str = "exact") -> float:
    """Flops (up to a constant) of refreshing a d1 x d2 slice: a full SVD costs d1 d2 min(d1, d2);
    a sketch of width ~rank costs d1 d2 rank."""
    d1, d2 = shape
    return float(d1) * d2 * (min(d1, d2) if method == "exact" else rank + 10)


def assign_by_cost(costs: list[float], world: int) -> list[int]:
    """Owner rank of each item: longest-processing-time greedy (largest first, to the least
    loaded rank). Deterministic, so every rank computes the same assignment without talking."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda j: (load[j], j))
        owner[i] = r
        load[r] += costs[i]
    return owner


def _pack(state: dict[str, Tensor]) -> Tensor:
    parts = [state["U"].reshape(-1), state["V"].reshape(-1), state["sigma"].reshape(-1)]
    parts += [state[key].reshape(1).to(torch.float32) for key in _SCALARS]
    return torch.cat([p.to(torch.float32) for p in parts])


def _unpack_(state: dict[str, Tensor], flat: Tensor, d1: int, d2: int, k: int) -> None:
    """Replace the factors and overwrite the scalars of ``state`` from a packed buffer."""
    u, v = d1 * k, d2 * k
    device = state["eps"].device
    flat = flat.to(device)
    state["U"] = flat[:u].reshape(d1, k).clone()
    state["V"] = flat[u : u + v].reshape(d2, k).clone()
    state["sigma"] = flat[u + v : u + v + k].clone()
    for j, key in enumerate(_SCALARS):
        state[key].fill_(flat[u + v + k + j].item() if key != "refreshes" else round(flat[u + v + k + j].item()))


def _packed_size(d1: int, d2: int, k: int) -> int:
    return (d1 + d2 + 1) * k + len(_SCALARS)


def refresh_slices_replicated_(
    weights: list[Tensor],
    states: list[dict[str, Tensor]],
    configs: list[SliceConfig],
    method: str = "exact",
    warned: set | None = None,
    group=None,
) -> list[bool]:
    """:func:`q3r.refresh.refresh_slices_` with the work divided across the ranks of ``group``.

    Same arguments and result; every rank must call it with the same targets in the same
    order and identical weights (as under DDP). Non-finite slices are skipped on every rank
    (the owner warns once).
    """
    world = comm.world_size(group)
    if world == 1 or not weights:  # every rank has the same (empty) list: nothing to exchange
        return _refresh_local_(weights, states, configs, method=method, warned=warned)
    me = comm.rank(group)
    shapes = [tuple(w.shape) for w in weights]
    owner = assign_by_cost([refresh_cost(s, c.rank, method) for s, c in zip(shapes, configs)], world)
    mine = [i for i in range(len(weights)) if owner[i] == me]
    done_mine = _refresh_local_(
        [weights[i] for i in mine], [states[i] for i in mine], [configs[i] for i in mine], method=method, warned=warned
    )
    device = weights[0].device if weights else torch.device("cpu")
    n = len(weights)
    header = torch.full((2 * n,), -1.0, dtype=torch.float64, device=device)
    for i, ok in zip(mine, done_mine):
        if ok:
            header[i] = states[i]["sigma"].shape[0]
    for i, w in enumerate(weights):
        header[n + i] = torch.sum(w.detach(), dtype=torch.float64)
    headers = torch.stack(comm.all_gather(header, group))
    sums = headers[:, n:]
    same = (sums == sums[0]) | (torch.isnan(sums) & torch.isnan(sums[0]))
    if not bool(same.all()):
        bad = [configs[i].name for i in range(n) if not bool(same[:, i].all())]
        raise RuntimeError(
            f"q3r: the weights of {bad[:3]} differ across ranks, so they are not data-parallel replicas; "
            "a distributed refresh needs identical weights (wrap the model in DDP), or call "
            "q3r.distributed.configure(replicated=False) to refresh on every rank independently"
        )
    widths = [int(headers[owner[i], i]) for i in range(n)]
    sizes = [0] * world
    for i in range(n):
        if widths[i] >= 0:
            sizes[owner[i]] += _packed_size(*shapes[i], widths[i])
    buf = torch.zeros(max(sizes), dtype=torch.float32, device=device)
    offset = 0
    for i in mine:
        if widths[i] >= 0:
            packed = _pack(states[i])
            buf[offset : offset + packed.numel()] = packed
            offset += packed.numel()
    gathered = comm.all_gather(buf, group) if max(sizes) > 0 else []
    offsets = [0] * world
    for i in range(n):
        if widths[i] < 0:
            continue
        src, size = owner[i], _packed_size(*shapes[i], widths[i])
        if src != me:
            _unpack_(states[i], gathered[src][offsets[src] : offsets[src] + size], *shapes[i], widths[i])
        offsets[src] += size
    return [w >= 0 for w in widths]

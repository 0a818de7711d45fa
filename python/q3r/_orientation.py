"""The orientation a refresh decomposes a target in: a tall target (d1 > d2) as its transpose.

Then d x 4d and 4d x d targets (a transformer's fc1 and fc2) share one stack, which halves
the stacks, and so the launches, of their refresh; and every range finder Y = W P runs on
the wide side, where Y and its orthonormalization have min(d1, d2) rows.  Nothing is copied
to transpose: the refresh sees views of the weights and a view of each tall target's state
in which U and V trade places.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch
from torch import Tensor


class OrientedWeights:
    """The weights as a refresh decomposes them: ``self[i]`` is W_i or W_i^T (a view)."""

    def __init__(self, weights: list[Tensor]):
        self.raw = weights
        self.tall = [W.shape[0] > W.shape[1] for W in weights]

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: int) -> Tensor:
        return self.raw[i].mT if self.tall[i] else self.raw[i]

    def chunks(self, idx: list[int], max_bytes: int) -> list[list[int]]:
        """idx (targets of one shape) cut into consecutive runs whose stack, in float32,
        takes at most max_bytes (at least one target per run): a stack is a copy of its
        members' weights, so this bounds what a refresh holds at once (LLaMA-7B's 96 MLP
        matrices stacked whole would take 17 GB)."""
        if not idx:
            return []
        per_run = max(1, max_bytes // (4 * self.raw[idx[0]].numel()))
        return [idx[i : i + per_run] for i in range(0, len(idx), per_run)]

    def stack(self, idx: list[int]) -> Tensor:
        """The members' oriented weights stacked (b, min(d1, d2), max(d1, d2)) in one copy.
        All tall: the stack of the weights as they are, transposed as a whole (a view, so no
        dispatch per member); a mixed stack takes each tall member's transposed view."""
        if all(self.tall[i] for i in idx):
            return torch.stack([self.raw[i] for i in idx]).mT
        return torch.stack([self[i] for i in idx])


class TransposedState(MutableMapping):
    """A tall target's state seen as the state of its transpose: U and V trade places; every
    other entry (the warm-start tail too, which lies on the longer side either way) is the
    target's own."""

    _SWAP = {"U": "V", "V": "U"}

    def __init__(self, state: dict[str, Tensor]):
        self.state = state

    def __getitem__(self, key: str) -> Tensor:
        return self.state[self._SWAP.get(key, key)]

    def __setitem__(self, key: str, value: Tensor) -> None:
        self.state[self._SWAP.get(key, key)] = value

    def __delitem__(self, key: str) -> None:
        del self.state[self._SWAP.get(key, key)]

    def __iter__(self):
        return (self._SWAP.get(key, key) for key in self.state)

    def __len__(self) -> int:
        return len(self.state)


def oriented(weights: list[Tensor], states: list[dict[str, Tensor]]) -> tuple[OrientedWeights, list]:
    """The weights and states of a refresh in the orientation it decomposes them in."""
    ow = OrientedWeights(weights)
    return ow, [TransposedState(s) if tall else s for s, tall in zip(states, ow.tall)]

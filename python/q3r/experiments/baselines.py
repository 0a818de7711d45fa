"""The baselines' model surgery: LoRA from scratch and LoRITa.

* LoRA from scratch: every target is replaced, before training, by a factored layer of the
  rank that keeps fraction f of its parameters (the same r = floor(f d1 d2 / (d1 + d2)) per
  slice that compression uses), so it is parameter-matched with the truncated models.
* LoRITa (Low-Rank Induced Training): every target (each QKV slice on its own) is
  over-parameterized as a product of N linear maps W = W_N ... W_1, trained with weight decay
  on the factors (which, for a product, penalizes a Schatten quasi-norm and so favours low
  rank), then collapsed to one matrix and truncated by SVD like the dense model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .. import reference
from ..compress import LowRankFusedLinear, LowRankLinear
from ..targets import Target, slice_shapes


def _replace(model: nn.Module, module_name: str, new: nn.Module) -> None:
    parent_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def lora_from_scratch_(model: nn.Module, targets: list[Target], fraction: float) -> nn.Module:
    """Replace each target Linear by a freshly initialized parameter-matched factored layer."""
    for t in targets:
        name = t.name.removesuffix(".weight")
        old = model.get_submodule(name)
        if not isinstance(old, nn.Linear):
            raise TypeError(f"LoRA from scratch expects nn.Linear targets, {name} is a {type(old).__name__}")
        shapes = slice_shapes(t.param.shape, t.slice_dim, t.slices)
        ranks = [reference.resolve_rank(fraction, d1, d2, "params", t.name) for d1, d2 in shapes]
        kw = dict(bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
        if t.slices is None:
            new = LowRankLinear(old.in_features, old.out_features, ranks[0], **kw)
        else:
            new = LowRankFusedLinear(old.in_features, old.out_features, t.slice_dim, t.slices, ranks, **kw)
        _replace(model, name, new)
    return model


class LinearProduct(nn.Module):
    """Parametrization W = W_N ... W_1 per slice, concatenated along ``slice_dim``.

    For a d1 x d2 slice the rectangular factor is the one that changes dimension and the
    N - 1 square ones live in the smaller dimension (fewest extra parameters). Square factors
    start orthogonal and the rectangular one as the dense init, so W starts with the dense
    model's scale.
    """

    def __init__(self, shape, slice_dim: int, slices, depth: int, init_std: float = 0.02):
        super().__init__()
        if depth < 2:
            raise ValueError(f"LoRITa depth must be >= 2, got {depth!r}")
        self.slice_dim, self.depth, self.init_std = slice_dim, depth, init_std
        self.shapes = slice_shapes(shape, slice_dim, slices)

    def forward(self, *factors: Tensor) -> Tensor:
        parts = []
        for i in range(len(self.shapes)):
            chain = factors[i * self.depth:(i + 1) * self.depth]  # W_1 first
            W = chain[0]
            for F_ in chain[1:]:
                W = F_ @ W
            parts.append(W)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.slice_dim)

    @torch.no_grad()
    def right_inverse(self, W: Tensor):
        # Called once at registration: fresh factors (the dense weight is not reused, LoRITa
        # trains from scratch); their product has the shape and dtype of W.
        out = []
        for d1, d2 in self.shapes:
            if d1 >= d2:  # W_1 square (d2 x d2), ..., W_N rectangular (d1 x d2)
                chain = [torch.empty(d2, d2) for _ in range(self.depth - 1)] + [torch.empty(d1, d2)]
            else:  # W_1 rectangular (d1 x d2), then squares (d1 x d1)
                chain = [torch.empty(d1, d2)] + [torch.empty(d1, d1) for _ in range(self.depth - 1)]
            rect_index = len(chain) - 1 if d1 >= d2 else 0
            for i, F_ in enumerate(chain):
                if i == rect_index:
                    nn.init.trunc_normal_(F_, std=self.init_std)
                else:
                    nn.init.orthogonal_(F_)
            out.extend(F_.to(W.device, W.dtype) for F_ in chain)
        return tuple(out)


def lorita_(model: nn.Module, targets: list[Target], depth: int) -> nn.Module:
    """Over-parameterize each target's weight as per-slice products of ``depth`` factors."""
    for t in targets:
        module = model.get_submodule(t.name.removesuffix(".weight"))
        parametrize.register_parametrization(
            module, "weight", LinearProduct(tuple(t.param.shape), t.slice_dim, t.slices, depth), unsafe=True
        )
    return model


@torch.no_grad()
def collapse_lorita_(model: nn.Module) -> nn.Module:
    """Multiply the factors out: every parametrized weight becomes one dense Parameter again."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight"):
            weight = module.weight.detach().clone()
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            # With several originals torch leaves a plain tensor behind; make it a Parameter
            # again so the collapsed model looks like the dense one (compress, state_dict).
            module._buffers.pop("weight", None)
            module.__dict__.pop("weight", None)
            module.weight = nn.Parameter(weight)
    return model

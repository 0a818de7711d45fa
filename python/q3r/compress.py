"""Compression: cut each target (or slice) to a low rank by an exact SVD and swap in factored layers.

``compress(model, targets, fraction=0.4)`` replaces every target module, in place, by a
factored module whose output equals the layer with SVD-truncated weights:

* a plain ``nn.Linear`` (or an unsliced HF ``Conv1D``) becomes a :class:`LowRankLinear`
  ``y = up @ (down @ x) + bias``;
* a fused weight cut into slices (timm ``qkv`` rows, GPT-2 ``c_attn`` columns) becomes a
  :class:`LowRankFusedLinear` holding one factor pair per slice and producing the same fused
  output layout; parts of the weight outside every slice stay dense;
* an ``nn.Embedding`` (its table as the weight, unsliced, without ``max_norm``, not a
  subclass with its own forward) becomes a :class:`LowRankEmbedding`.

Biases are kept (the published code's truncation drops them, which changes the model).
HF ``Conv1D`` stores its weight transposed (in, out) and computes ``x @ W + b``; it is
converted to the Linear convention first, so its column slices become output slices.

Ranks (per slice, d1 x d2): ``fraction`` f in (0, 1) gives r = floor(f d1 d2 / (d1 + d2)),
the same parameter-fraction rule training uses (:func:`q3r.reference.resolve_rank`), so a
model trained with ``target_rank=f`` is cut where it was pushed; ``fraction=1.0`` keeps the
dense weight untouched. ``rank`` (an int, 1 <= r <= min(d1, d2)) gives that rank everywhere;
with neither, each target's own ``target_rank`` is used.

Everything is checked, and every factored module built, before the first module is replaced:
an error leaves the model as it was. Refused: tied weights, non-finite weights, and layers
whose owner needs a real ``nn.Linear`` (an ``nn.MultiheadAttention``'s ``out_proj``, the
linears of an ``nn.TransformerEncoderLayer``, whose inference fast path reads them). An owner
that only reads ``.weight`` gets the dense product (see ``_read_weight``).
"""

from __future__ import annotations

import copy as copy_module
import json
import numbers
import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import reference
from ._files import atomic_path
from ._precision import autocast_off
from .distributed import is_sharded
from .targets import (Target, _find_targets, resolve_slice_ranks, slice_shapes, slice_views, uncompiled,
                      unwrapped_root, validate_slices)

__all__ = [
    "LowRankLinear",
    "LowRankFusedLinear",
    "LowRankEmbedding",
    "CompressionReport",
    "SliceRecord",
    "compress",
    "svd_truncate",
    "truncate_weights_",
    "count_parameters",
    "save_compressed",
    "load_compressed",
]


@autocast_off  # (an SVD and products of its factors: fp32 under the caller's autocast too)
def svd_truncate(W: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Balanced rank-``rank`` factors (up (d1, r), down (r, d2)) of W (d1, d2): up @ down = W_r.

    The SVD runs in fp32 (SPEC: precision); sqrt(sigma) goes to each side so neither factor
    is badly scaled if the factored layer is trained further. ``rank``: an int in
    [1, min(d1, d2)] (min(d1, d2) is exact).
    """
    if W.dim() != 2:
        raise ValueError(f"svd_truncate needs a 2-D W, got shape {tuple(W.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(W.shape):
        raise ValueError(f"rank of svd_truncate must be an int in [1, {min(W.shape)}] for a {W.shape[0]}x{W.shape[1]} W, "
                         f"got {rank!r}")
    U, sigma, V, _ = reference.anchor_factors(W.detach(), rank)
    root = sigma.sqrt()
    # (contiguous: safetensors' save of tensors shared between modules views them flat)
    return (U * root).to(W.dtype).contiguous(), (V * root).T.contiguous().to(W.dtype)


class LowRankLinear(nn.Module):
    """``y = x down^T up^T + bias``: a Linear whose (out, in) weight is up (out, r) @ down (r, in)."""

    _q3r_factored = True  # (q3r.find_targets passes factored layers by: their weight is computed)
    conv1d_layout = False  # (True where it replaced an HF Conv1D: ``weight`` reads (in, out))

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if isinstance(rank, bool) or not (isinstance(rank, int) and rank >= 1):
            raise ValueError(f"rank of LowRankLinear must be an int >= 1, got {rank!r}")
        kw = dict(device=device, dtype=dtype)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.up = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Init so that up @ down has roughly nn.Linear's output scale (LoRA-from-scratch needs it)."""
        nn.init.normal_(self.down, std=self.in_features ** -0.5)
        nn.init.normal_(self.up, std=(3.0 * self.rank) ** -0.5)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.down), self.up, self.bias)

    def dense_weight(self) -> Tensor:
        return self.up @ self.down

    weight = property(lambda self: _read_weight(self), doc="the dense weight, for code that reads a layer's "
                      "``.weight``: see _read_weight")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")  # (device types autocast knows; not meta)


class LowRankEmbedding(nn.Module):
    """An nn.Embedding whose (num_embeddings, embedding_dim) table is up (num, r) @ down (r, dim):
    each index looks up an r-wide row of ``up``, then one (r -> dim) product. ``padding_idx``,
    ``scale_grad_by_freq`` and ``sparse`` act on ``up`` as nn.Embedding's act on its table
    (the padding row of ``up`` gets no gradient; ``down`` is shared by all rows and does)."""

    _q3r_factored = True
    conv1d_layout = False

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, padding_idx: int | None = None,
                 scale_grad_by_freq: bool = False, sparse: bool = False, device=None, dtype=None):
        super().__init__()
        if isinstance(rank, bool) or not (isinstance(rank, int) and rank >= 1):
            raise ValueError(f"rank of LowRankEmbedding must be an int >= 1, got {rank!r}")
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx of LowRankEmbedding must be within num_embeddings ({num_embeddings}), "
                                 f"got {padding_idx!r}")
            padding_idx %= num_embeddings  # (as nn.Embedding stores a negative one)
        kw = dict(device=device, dtype=dtype)
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        self.padding_idx, self.scale_grad_by_freq, self.sparse = padding_idx, scale_grad_by_freq, sparse
        self.up = nn.Parameter(torch.empty(num_embeddings, rank, **kw))
        self.down = nn.Parameter(torch.empty(rank, embedding_dim, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Init so that up @ down has nn.Embedding's N(0, 1) entries, with a zero padding row."""
        nn.init.normal_(self.up)
        nn.init.normal_(self.down, std=self.rank ** -0.5)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.up[self.padding_idx].zero_()

    def forward(self, indices: Tensor) -> Tensor:
        codes = F.embedding(indices, self.up, self.padding_idx, None, 2.0, self.scale_grad_by_freq, self.sparse)
        # autocast off for the product: nn.Embedding is not autocast (its rows come out in the
        # table's dtype), and a bf16 product under autocast would turn the residual stream of an
        # fp32 model (LLaMA's inputs_embeds onward) bf16. (torch.autocast itself, not
        # no_autocast's ExitStack: torch.compile(fullgraph=True) traces it.)
        device_type = codes.device.type
        if device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return codes @ self.down
        return codes @ self.down

    def dense_weight(self) -> Tensor:
        return self.up @ self.down

    weight = LowRankLinear.weight

    def extra_repr(self) -> str:
        extra = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}{extra}"


def _read_weight(module) -> Tensor:
    """``.weight`` of a factored module: the dense product, rebuilt at every read, in the layout
    of the layer it replaced (an HF Conv1D's (in, out) where ``conv1d_layout``). Some owners
    read their layer's weight themselves, and had an AttributeError after compress: Hugging
    Face T5's feed-forward reads ``wo.weight.dtype``, timm BEiT / EVA attention with q/v biases
    calls ``F.linear(x, qkv.weight, ...)``, HF Mamba multiplies by ``dt_proj.weight``. Their
    outputs are right; such a layer saves parameters, not compute."""
    W = module.dense_weight()
    return W.transpose(0, 1) if module.conv1d_layout else W


class _DenseBlock(nn.Module):
    """A dense part of a fused weight that no slice covers (kept exactly)."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


def _segments(extent: int, slices: list[tuple[int, int]]) -> list[tuple[int, int, bool]]:
    """Partition [0, extent) into the slices (True) and the gaps between them (False)."""
    out, pos = [], 0
    for a, b in sorted(slices):
        if a > pos:
            out.append((pos, a, False))
        out.append((a, b, True))
        pos = b
    if pos < extent:
        out.append((pos, extent, False))
    return out


class LowRankFusedLinear(nn.Module):
    """A fused Linear (e.g. QKV) with one factor pair per slice and the original output layout.

    ``slice_dim`` is in the Linear convention: 0 slices output features (the rows of an
    (out, in) weight: timm ``qkv``, GPT-2 ``c_attn`` after transposing), whose outputs are
    concatenated; 1 slices input features, whose contributions are summed.
    ``ranks`` has one int per slice, in the order of ``slices``.
    """

    _q3r_factored = True
    conv1d_layout = False

    def __init__(self, in_features, out_features, slice_dim, slices, ranks, bias=True, device=None, dtype=None):
        super().__init__()
        slices = [tuple(s) for s in slices]
        if len(ranks) != len(slices):
            raise ValueError(f"LowRankFusedLinear needs one rank per slice, got ranks={ranks!r} for slices={slices!r}")
        extent = (out_features, in_features)[slice_dim]
        validate_slices((out_features, in_features), slice_dim, slices, "LowRankFusedLinear")
        self.in_features, self.out_features, self.slice_dim = in_features, out_features, slice_dim
        if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
            raise ValueError(f"ranks of LowRankFusedLinear must be ints >= 1, got {ranks!r}")
        self.slices, self.ranks = slices, list(ranks)
        self.segments = _segments(extent, slices)
        rank_of = dict(zip(slices, self.ranks))
        kw = dict(device=device, dtype=dtype)
        blocks = []
        for a, b, factored in self.segments:
            n_out, n_in = (b - a, in_features) if slice_dim == 0 else (out_features, b - a)
            if factored:
                blocks.append(LowRankLinear(n_in, n_out, rank_of[(a, b)], bias=False, **kw))
            else:
                blocks.append(_DenseBlock(n_in, n_out, **kw))
        self.blocks = nn.ModuleList(blocks)
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if self.slice_dim == 0:
            y = torch.cat([block(x) for block in self.blocks], dim=-1)
        else:
            y = sum(block(x[..., a:b]) for block, (a, b, _) in zip(self.blocks, self.segments))
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> Tensor:
        parts = [blk.dense_weight() if isinstance(blk, LowRankLinear) else blk.weight for blk in self.blocks]
        return torch.cat(parts, dim=self.slice_dim)

    weight = LowRankLinear.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, slice_dim={self.slice_dim}, slices={self.slices}, ranks={self.ranks}"


# ------------------------------------------------------------------ accounting


@dataclass
class SliceRecord:
    """One target slice: its shape, the rank kept (None = dense) and its parameter counts."""

    name: str
    shape: tuple[int, int]
    rank: int | None
    dense_params: int
    kept_params: int


@dataclass
class CompressionReport:
    """Per-slice and whole-model parameter counts before and after compression."""

    slices: list[SliceRecord] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0

    @property
    def target_params_before(self) -> int:
        return sum(s.dense_params for s in self.slices)

    @property
    def target_params_after(self) -> int:
        return sum(s.kept_params for s in self.slices)

    @property
    def target_fraction_kept(self) -> float:
        return self.target_params_after / max(self.target_params_before, 1)

    @property
    def model_fraction_kept(self) -> float:
        return self.model_params_after / max(self.model_params_before, 1)

    def table(self) -> str:
        rows = [("target", "shape", "rank", "dense", "kept", "kept %")]
        for s in self.slices:
            rows.append((s.name, f"{s.shape[0]}x{s.shape[1]}", "dense" if s.rank is None else str(s.rank),
                         f"{s.dense_params:,}", f"{s.kept_params:,}", f"{100 * s.kept_params / s.dense_params:.1f}"))
        rows.append(("all targets", "", "", f"{self.target_params_before:,}", f"{self.target_params_after:,}",
                     f"{100 * self.target_fraction_kept:.1f}"))
        rows.append(("whole model", "", "", f"{self.model_params_before:,}", f"{self.model_params_after:,}",
                     f"{100 * self.model_fraction_kept:.1f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 2, "-" * len(lines[0]))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "slices": [s.__dict__ | {"shape": list(s.shape)} for s in self.slices],
            "target_params_before": self.target_params_before,
            "target_params_after": self.target_params_after,
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
        }


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters of the model (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ compress


def _is_conv1d(module: nn.Module) -> bool:
    # HF GPT-2's Conv1D: weight (in, out) = (nx, nf), y = x @ W + b. Matched by name, so
    # transformers is never imported.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _slice_ranks(t: Target, fraction, rank, rank_rule: str) -> list[int | None]:
    """The rank of each slice of target t; None means keep it dense."""
    shapes = slice_shapes(t.param.shape, t.slice_dim, t.slices)
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (0.0 < fraction <= 1.0):
            raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
        if fraction == 1.0:
            return [None] * len(shapes)
        if rank_rule == "reference":  # (as training resolves target_rank=f under it)
            return [reference.resolve_rank(float(fraction), d1, d2, rank_rule, t.name, param="fraction")
                    for d1, d2 in shapes]
        ranks = [reference.fraction_rank(fraction, d1, d2) for d1, d2 in shapes]  # (resolve_rank's rule)
        for r, (d1, d2) in zip(ranks, shapes):
            if r < 1:
                raise ValueError(f"fraction={fraction!r} keeps no rank of the {d1}x{d2} slice of {t.name} "
                                 f"(floor(f d1 d2 / (d1 + d2)) = {r}); use a larger fraction or rank=")
        return ranks  # (below min(d1, d2) for any f < 1)
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
            raise TypeError(f"rank must be an int, got {rank!r}")
        rank = int(rank)  # (a NumPy integer, from a sweep, as training's target_rank takes one)
        if rank_rule == "reference":
            return [reference.resolve_rank(rank, d1, d2, rank_rule, t.name, param="rank") for d1, d2 in shapes]
        for d1, d2 in shapes:
            if not (1 <= rank <= min(d1, d2)):
                raise ValueError(f"rank={rank} is out of range for a {d1}x{d2} slice of {t.name}: need 1 <= rank <= {min(d1, d2)}")
        return [rank] * len(shapes)
    return resolve_slice_ranks(t.param.shape, t.slice_dim, t.slices, t.target_rank, rank_rule, t.name)


def _linear_view(module: nn.Module, t: Target):
    """(weight (out, in), slice_dim in the Linear convention) of a Linear or an HF Conv1D."""
    W = module.weight.detach()
    if _is_conv1d(module):
        return W.T, 1 - t.slice_dim
    return W, t.slice_dim


def _check_embedding(module: nn.Embedding, name: str) -> None:
    """An nn.Embedding compress can replace by a LowRankEmbedding: not a subclass with its own
    forward (Hugging Face's scaled word embeddings multiply the rows by embed_scale (Gemma, BART,
    M2M100...), its learned positional ones take a shape or position_ids and add an offset (BART,
    OPT): a plain lookup in their place changes the outputs or fails), and not one with max_norm,
    whose forward renormalizes the rows it looks up in its table, in place (factors have no rows to
    renormalize; the outputs would differ from the embedding's)."""
    if type(module).forward is not nn.Embedding.forward:
        raise TypeError(f"{name} is a {type(module).__name__}, an nn.Embedding subclass with its own forward: a "
                        "LowRankEmbedding (a plain lookup) in its place would not compute what it computes; compress "
                        "cannot replace it")
    if module.max_norm is not None:
        raise TypeError(f"{name} is an nn.Embedding with max_norm={module.max_norm}: its forward renormalizes rows of "
                        "its table in place, which a factored table cannot do; compress cannot replace it")


def _module_names(model: nn.Module, t: Target) -> list[str]:
    """Every name under which the target's module is registered in ``model`` (a module shared
    by two parents is replaced under both), after checking that compress can replace it:
    an nn.Linear, HF Conv1D or nn.Embedding whose weight no other module uses and whose owner does not read
    the weight itself.  Raises before anything changes."""
    name = _module_name(t)
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"target {t.name}: the model has no module {name!r}") from None
    if not (_is_conv1d(module) or isinstance(module, (nn.Linear, nn.Embedding))):
        raise TypeError(f"compress handles nn.Linear, HF Conv1D and nn.Embedding targets; {t.name} belongs to a "
                        f"{type(module).__name__}")
    if isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward:
        # (not refused: some compute just what nn.Linear does, as HF's FalconLinear; others do
        # not, as Llama4Router's top-k routing, and compress cannot tell them apart)
        warnings.warn(f"{t.name} belongs to a {type(module).__name__}, an nn.Linear subclass with its own forward; "
                      "compress replaces it by a LowRankLinear, which computes x W_r^T + b as nn.Linear does: check "
                      f"that this is what {type(module).__name__} computes", stacklevel=4)
    if isinstance(module, nn.Embedding):
        _check_embedding(module, t.name)
        if t.slices is not None:
            raise ValueError(f"target {t.name} is an nn.Embedding cut into slices; compress factors an embedding table "
                             "whole (leave its slices out)")
    names, tied = [], []
    for other_name, other in model.named_modules(remove_duplicate=False):
        if other is module:
            names.append(other_name)
        elif any(q is module.weight for q in other._parameters.values()):
            tied.append(other_name)
    if tied:
        raise ValueError(f"the weight of target {t.name} is also the weight of {tied} (tied weights): factoring one "
                         "use would leave the others dense; untie them first or leave the target out")
    for owner_name in names:
        owner = model.get_submodule(owner_name.rpartition(".")[0]) if "." in owner_name else model
        if isinstance(owner, nn.MultiheadAttention):  # (it reads out_proj.weight directly)
            raise TypeError(f"target {t.name} is the out_proj of an nn.MultiheadAttention, which reads its weight "
                            "directly: compress cannot replace it by factors")
        if isinstance(owner, nn.TransformerEncoderLayer):  # (its inference fast path reads linear1 / linear2 .weight)
            raise TypeError(f"target {t.name} belongs to an nn.TransformerEncoderLayer, whose inference fast path "
                            "(eval mode, as nn.TransformerEncoder uses it) reads its weights directly: compress cannot "
                            "replace it by factors")
    return names


def _factored_module(module: nn.Module, t: Target, ranks: list[int]) -> nn.Module:
    W, slice_dim = _linear_view(module, t)
    out_f, in_f = W.shape
    bias = getattr(module, "bias", None)
    kw = dict(device=W.device, dtype=W.dtype)
    if isinstance(module, nn.Embedding):  # (its table (num, dim) is the weight; out_f, in_f = num, dim)
        new = LowRankEmbedding(out_f, in_f, ranks[0], module.padding_idx, module.scale_grad_by_freq, module.sparse, **kw)
        new.up.data, new.down.data = svd_truncate(W, ranks[0])
    elif t.slices is None:
        new = LowRankLinear(in_f, out_f, ranks[0], bias=bias is not None, **kw)
        new.up.data, new.down.data = svd_truncate(W, ranks[0])
    else:
        new = LowRankFusedLinear(in_f, out_f, slice_dim, t.slices, ranks, bias=bias is not None, **kw)
        for (a, b, factored), block in zip(new.segments, new.blocks):
            part = W.narrow(slice_dim, a, b - a)
            if factored:
                block.up.data, block.down.data = svd_truncate(part, block.rank)
            else:
                block.weight.data.copy_(part)
    new.conv1d_layout = _is_conv1d(module)
    if bias is not None:
        new.bias.data.copy_(bias.detach())
        new.bias.requires_grad_(bias.requires_grad)
    for factor in new.parameters():  # (a frozen layer stays frozen; its bias was set just above)
        if factor is not getattr(new, "bias", None):
            factor.requires_grad_(module.weight.requires_grad)
    new.train(module.training)
    return new


def _resolve_targets(model: nn.Module, targets, fraction=None, rank=None) -> list[Target]:
    usage = "targets must be a list of q3r.Target (see q3r.find_targets) or module-name patterns"
    try:
        targets = [targets] if isinstance(targets, str) else list(targets)
    except TypeError:  # (None, a number, a single Target)
        raise TypeError(f"{usage}, got {targets!r}") from None
    if all(isinstance(t, str) for t in targets):
        # the ranks come from fraction / rank when given (checked by _slice_ranks), not from a default
        return _find_targets(model, targets, (), 0.2, None, "auto", None, check_ranks=fraction is None and rank is None)
    if not all(isinstance(t, Target) for t in targets):
        raise TypeError(usage)
    return targets


def _check_rank_options(fraction, rank, rank_rule) -> None:
    if fraction is not None and rank is not None:
        raise ValueError(f"give fraction or rank, not both (got fraction={fraction!r}, rank={rank!r})")
    # (checked even where fraction or rank makes it unused: a typo must not pass silently)
    if rank_rule not in reference.RANK_RULES:
        raise ValueError(f"rank_rule must be one of {reference.RANK_RULES}, got {rank_rule!r}")


def _plan_ranks(model: nn.Module, targets: list[Target], fraction, rank, rank_rule) -> list[tuple[Target, list]]:
    """Each target with the ranks of its slices, every target checked before the caller writes
    anything (SPEC section 5): its slices fit its weight, the model's weight of that name has the
    target's shape (targets found on a model of another size would be cut to ranks and a report
    that do not fit), and no weight is named twice (the second cut would find a replaced module)."""
    plans, seen = [], {}
    for t in targets:
        validate_slices(t.param.shape, t.slice_dim, t.slices, t.name)
        try:
            param = model.get_parameter(t.name)
        except AttributeError:
            raise ValueError(f"target {t.name}: the model has no parameter {t.name!r}") from None
        if param.shape != t.param.shape:
            raise ValueError(f"target {t.name} has shape {tuple(t.param.shape)}, but the model's {t.name} has shape "
                             f"{tuple(param.shape)}: were the targets found on another model?")
        if id(param) in seen:
            again = "" if seen[id(param)] == t.name else f" (as {seen[id(param)]}: one module under two names)"
            raise ValueError(f"target {t.name} is named twice in targets{again}; each module is cut once")
        seen[id(param)] = t.name
        ranks = _slice_ranks(t, fraction, rank, rank_rule)
        if any(r is not None for r in ranks) and param.device.type != "meta" and not bool(torch.isfinite(param).all()):
            raise ValueError(f"target {t.name} has non-finite weights (NaN or inf): they have no SVD to truncate")
        plans.append((t, ranks))
    return plans


def _module_name(t: Target) -> str:
    if not t.name.endswith(".weight"):
        raise ValueError(f"target {t.name} is not the .weight of a module; compress replaces whole modules")
    return t.name[: -len(".weight")]


# how to get from an FSDP2-sharded model to one compress can cut: its full weights, in a plain model
_GATHER_FIRST = ("gather the full weights into an unsharded copy of the model first, e.g. "
                 "torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions("
                 "full_state_dict=True, cpu_offload=True)) on rank 0, load that into a freshly built dense model, "
                 "and compress (save, load) that one (docs/distributed.md)")


def _refuse_sharded(model: nn.Module, what: str) -> None:
    """A TypeError naming the first DTensor (an FSDP2-sharded weight) among ``model``'s
    parameters and buffers: a rank holds only some rows of it, and compress replaces modules
    that FSDP2 manages (their SVDs, the swapped modules and a saved file would all be wrong)."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if is_sharded(t):
                raise TypeError(f"{what} needs a model with full weights, but its {kind} {name} is a DTensor "
                                f"(a distributed tensor, placements {tuple(t.placements)}): {_GATHER_FIRST}")


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def _refuse_ddp(model: nn.Module, what: str) -> None:
    """DDP's reducer keeps the parameters it was built with: factored modules swapped in under
    the wrapper would train with gradients that are never averaged across ranks (the ranks
    drift apart without an error)."""
    if _is_ddp(model):
        raise TypeError(f"{what}: model is a DistributedDataParallel wrapper, whose gradient reducer keeps the "
                        f"parameters it was built with, so the factored layers' gradients would never be averaged "
                        f"across ranks; pass the wrapped model (model.module) and wrap the result in a new "
                        f"DistributedDataParallel to train it further")


def compress(model: nn.Module, targets, *, fraction=None, rank=None, rank_rule: str = "params", copy: bool = False):
    """Truncate every target (each slice on its own) by an exact SVD; swap in factored modules.

    targets: a list of :class:`q3r.Target` (from :func:`q3r.find_targets`) or module-name
    patterns (fused QKV sliced automatically). Targets are looked up by name, so targets
    found on the original model also work with ``copy=True``.
    fraction: f in (0, 1) keeps r = floor(f d1 d2 / (d1 + d2)) per slice; 1.0 keeps targets dense.
    rank: one int rank for every slice (min(d1, d2) is allowed and is exact).
    Neither: each target's ``target_rank`` under ``rank_rule``.
    rank_rule="reference" (the published code's rule, SPEC section 3) applies to fraction and
    rank too, as training applies it to target_rank: f -> int(f max(d1, d2)), r ->
    int(r max(d1, d2) / min(d1, d2)), below min(d1, d2): a run trained with target_rank=f
    under it is cut where it was pushed by fraction=f with it.
    copy: compress a deep copy and leave ``model`` untouched (default: in place).

    Returns (compressed model, :class:`CompressionReport`).
    """
    _check_rank_options(fraction, rank, rank_rule)
    # (names as in the uncompiled model: a torch.compile'd layer is replaced by an uncompiled
    # factored one, and a compiled model or block keeps its wrapper around the factored modules)
    with uncompiled(model) as plain:
        _refuse_ddp(plain, "compress")
        _refuse_sharded(plain, "compress")
        targets = _resolve_targets(plain, targets, fraction, rank)
        # everything is checked before the first module is replaced (SPEC section 5)
        all_names = [_module_names(plain, t) for t in targets]
        plans = _plan_ranks(plain, targets, fraction, rank, rank_rule)
    report = CompressionReport(model_params_before=count_parameters(model))
    if copy:
        model = copy_module.deepcopy(model)
    with uncompiled(model) as plain:
        _swap_in_factors(plain, plans, all_names, report)
    report.model_params_after = count_parameters(model)
    return model, report


_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                 "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _swap_in_factors(model: nn.Module, plans, all_names, report: CompressionReport) -> None:
    # every factored module is built (its SVDs taken) before the first is swapped in: an error
    # on a later target leaves the model as it was
    swaps, records = [], []
    for (t, ranks), mod_names in zip(plans, all_names):
        module = model.get_submodule(mod_names[0])
        for name, (d1, d2), r in zip(t.slice_names(), slice_shapes(t.param.shape, t.slice_dim, t.slices), ranks):
            records.append(SliceRecord(name, (d1, d2), r, d1 * d2, d1 * d2 if r is None else r * (d1 + d2)))
        if any(r is not None for r in ranks):
            swaps.append((_factored_module(module, t, ranks), mod_names))
    larger = [f"{r.name} ({r.shape[0]}x{r.shape[1]} at rank {r.rank})" for r in records
              if r.rank is not None and r.kept_params >= r.dense_params]
    if larger:  # (rank= or a rank rule other than "params" can ask for this; a fraction below 1 cannot)
        warnings.warn(f"compress: {len(larger)} slice(s) have at least as many parameters factored as dense, "
                      f"r (d1 + d2) >= d1 d2: {', '.join(larger[:3])}{', ...' if len(larger) > 3 else ''}; "
                      "a rank below d1 d2 / (d1 + d2) saves parameters there", stacklevel=3)
    for new, mod_names in swaps:
        old = model.get_submodule(mod_names[0])
        if any(getattr(old, hooks, None) for hooks in _MODULE_HOOKS):
            warnings.warn(f"module {mod_names[0]} has hooks registered on it; the factored module that replaces it "
                          "does not carry them (register them again on it if they still apply)", stacklevel=3)
        for mod_name in mod_names:  # one factored module wherever the module was (still shared)
            parent_name, _, child = mod_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    report.slices += records


@torch.no_grad()
def truncate_weights_(model: nn.Module, targets, *, fraction=None, rank=None, rank_rule: str = "params") -> nn.Module:
    """The dense twin of :func:`compress`: overwrite each target slice by its SVD truncation.

    Keeps the architecture (and parameter count); the outputs equal those of the compressed
    model, which is what the tests check. Targets are looked up in ``model`` by name, as
    find_targets names them: through torch.compile's and DistributedDataParallel's wrappers
    (in place, the weights stay the parameters a DDP wrapper averages; returns ``model``).
    """
    _check_rank_options(fraction, rank, rank_rule)
    plain = unwrapped_root(model)  # (find_targets' names: no "module.", no "_orig_mod.")
    _refuse_sharded(plain, "truncate_weights_")
    # all ranks, shapes and finiteness are checked before the first weight is overwritten (one
    # target at a time after that: a copy of every truncated weight would double their memory)
    for t, ranks in _plan_ranks(plain, _resolve_targets(plain, targets, fraction, rank), fraction, rank, rank_rule):
        param = plain.get_parameter(t.name)  # by name, so targets found on another copy work
        for view, r in zip(slice_views(param, t.slice_dim, t.slices), ranks):
            if r is not None:
                up, down = svd_truncate(view, r)
                view.copy_(up @ down)
    return model


# ------------------------------------------------------------------ save / load

_METADATA_KEY = "q3r.compressed"


def _spec(m: nn.Module) -> dict | None:
    """A factored module's entry in the layout (None: not a factored module)."""
    if isinstance(m, LowRankFusedLinear):
        return dict(kind="fused", in_features=m.in_features, out_features=m.out_features,
                    slice_dim=m.slice_dim, slices=[list(s) for s in m.slices], ranks=m.ranks, bias=m.bias is not None)
    if isinstance(m, LowRankLinear):
        return dict(kind="linear", in_features=m.in_features, out_features=m.out_features,
                    rank=m.rank, bias=m.bias is not None)
    if isinstance(m, LowRankEmbedding):
        return dict(kind="embedding", num_embeddings=m.num_embeddings, embedding_dim=m.embedding_dim, rank=m.rank,
                    padding_idx=m.padding_idx, scale_grad_by_freq=m.scale_grad_by_freq, sparse=m.sparse)
    return None


def _layout(model: nn.Module) -> dict:
    """What load_compressed needs to rebuild the factored modules on a fresh dense model."""
    layout = {}
    for name, m in model.named_modules():
        if _spec(m) is not None and not any(name.startswith(f + ".") for f in layout):
            layout[name] = _spec(m)
    return layout


def _require_safetensors() -> None:
    """An ImportError that says how to get safetensors (an optional dependency) when it is missing."""
    try:
        import safetensors  # noqa: F401
    except ImportError as e:
        raise ImportError("q3r.save_compressed / load_compressed need the safetensors package: "
                          "pip install safetensors (or the q3r[io] extra)") from e


def save_compressed(model: nn.Module, path: str, metadata: dict | None = None) -> None:
    """Save a compressed model's weights and its factored layout to one safetensors file.
    The names in it are those of the uncompiled model (a torch.compile'd model, or one with
    compiled submodules, saves what the plain model saves), so that it loads into either; a
    DistributedDataParallel wrapper saves the model it wraps (no "module." prefix).
    ``metadata``: extra string entries for the file's header (values are str()'d; the key
    "q3r.compressed" is reserved for the layout)."""
    _require_safetensors()
    from safetensors.torch import save_model

    extra = {str(k): str(v) for k, v in (metadata or {}).items()}
    if _METADATA_KEY in extra:  # (it would replace the layout, and the file could not be loaded)
        raise ValueError(f"metadata must not use the key {_METADATA_KEY!r}: save_compressed stores the factored layout there")
    with uncompiled(model) as plain:
        plain = plain.module if _is_ddp(plain) else plain  # (the names of the model DDP wraps, as load wants them)
        _refuse_sharded(plain, "save_compressed")
        _refuse_directory(path, "save_compressed")
        layout = json.dumps(_layout(plain))
        # (written next to it and moved over it: a save cut short leaves the previous file whole,
        # whether or not the installed safetensors writes atomically itself)
        with atomic_path(path) as tmp:
            save_model(plain, str(tmp), metadata={_METADATA_KEY: layout, **extra})


def _refuse_directory(path, where: str) -> None:
    """A folder given for the file (a save_pretrained folder, say) gets an error naming it;
    safetensors said only "No such device (os error 19)" or "Is a directory"."""
    if os.path.isdir(path):
        raise ValueError(f"{where}: {path} is a folder; give the path of the .safetensors file "
                         "(save_compressed writes one file, e.g. small.safetensors)")


def _dense_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out_features, in_features) of an nn.Linear or HF Conv1D; None for any other module."""
    if _is_conv1d(module):
        return tuple(module.weight.shape[::-1])
    if isinstance(module, nn.Linear):
        return tuple(module.weight.shape)
    return None


def _rebuilt_module(model: nn.Module, name: str, spec, path) -> nn.Module:
    """The factored module the file's layout puts in place of ``model``'s dense module ``name``,
    on its device and dtype and in its training mode, after checking that it replaces a dense
    layer of the same shape (a load must not change the architecture it was given)."""
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{path} holds a factored module {name!r}, but the model has no module {name!r}") from None
    if _spec(old) is not None and _spec(old) == spec:  # (factored in the model's own architecture: filled as it is)
        return old
    if isinstance(spec, dict) and spec.get("kind") == "embedding":
        return _rebuilt_embedding(old, name, spec, path)
    shape = _dense_shape(old)
    if shape is None:
        raise TypeError(f"{path} holds a factored module {name!r}, but the model's {name!r} is a {type(old).__name__}, "
                        "not an nn.Linear or HF Conv1D (load_compressed needs a freshly built dense model)")
    kw = dict(device=old.weight.device, dtype=old.weight.dtype)
    try:
        if spec["kind"] == "fused":
            new = LowRankFusedLinear(spec["in_features"], spec["out_features"], spec["slice_dim"],
                                     [tuple(s) for s in spec["slices"]], spec["ranks"], bias=spec["bias"], **kw)
        else:
            new = LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"], bias=spec["bias"], **kw)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: damaged {_METADATA_KEY!r} metadata for module {name!r}: {spec!r} "
                         f"({type(e).__name__}: {e})") from None
    found, wanted = (new.out_features, new.in_features, new.bias is not None), (*shape, getattr(old, "bias", None) is not None)
    if found != wanted:
        raise ValueError(f"{path} holds a factored {name!r} of {found[1]} -> {found[0]} features (bias={found[2]}), but the "
                         f"model's {name!r} is {wanted[1]} -> {wanted[0]} (bias={wanted[2]}): another architecture")
    new.conv1d_layout = _is_conv1d(old)
    new.train(old.training)  # (as compress does: an eval-mode model stays in eval mode, a frozen layer frozen)
    bias = getattr(old, "bias", None)
    for param in new.parameters():
        param.requires_grad_(bias.requires_grad if param is new.bias and bias is not None else old.weight.requires_grad)
    return new


def _rebuilt_embedding(old: nn.Module, name: str, spec: dict, path) -> LowRankEmbedding:
    """The LowRankEmbedding of the file's layout in place of the model's nn.Embedding ``name``,
    after checking that it replaces an embedding of the same table and options."""
    if not isinstance(old, nn.Embedding):
        raise TypeError(f"{path} holds a factored embedding {name!r}, but the model's {name!r} is a {type(old).__name__}, "
                        "not an nn.Embedding (load_compressed needs a freshly built dense model)")
    _check_embedding(old, name)
    try:
        new = LowRankEmbedding(spec["num_embeddings"], spec["embedding_dim"], spec["rank"], spec["padding_idx"],
                               spec["scale_grad_by_freq"], spec["sparse"], device=old.weight.device, dtype=old.weight.dtype)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: damaged {_METADATA_KEY!r} metadata for module {name!r}: {spec!r} "
                         f"({type(e).__name__}: {e})") from None
    found = (new.num_embeddings, new.embedding_dim, new.padding_idx, new.scale_grad_by_freq, new.sparse)
    wanted = (old.num_embeddings, old.embedding_dim, old.padding_idx, old.scale_grad_by_freq, old.sparse)
    if found != wanted:
        raise ValueError(f"{path} holds a factored embedding {name!r} of (num_embeddings, embedding_dim, padding_idx, "
                         f"scale_grad_by_freq, sparse) = {found}, but the model's is {wanted}: another architecture")
    new.train(old.training)
    for param in new.parameters():
        param.requires_grad_(old.weight.requires_grad)
    return new


def _load_state(model: nn.Module, path, strict: bool, rebuilt: tuple[str, ...] = ()) -> None:
    """safetensors' load_model, except that every name and shape is checked before the first
    tensor is copied (load_model copies what fits, then raises, leaving the model half-loaded).
    ``rebuilt``: names of the factored modules the load put in place of dense ones; their
    tensors must be in the file even when ``strict`` is False (they hold only their random
    init: a file that lacks them would silently swap a trained layer for noise)."""
    from safetensors.torch import load_file

    state, own = load_file(str(path)), model.state_dict()
    meta = [k for k, v in own.items() if v.device.type == "meta"]
    if meta:  # (load_state_dict would copy nothing into them, with a warning at most)
        raise ValueError(f"load_compressed needs a model with storage: {meta[:3]} are on the meta device "
                         "(materialize it first, e.g. model.to_empty(device='cpu'))")
    problems = [f"{k}: {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model"
                for k, v in state.items() if k in own and v.shape != own[k].shape]
    # save_model stores a tensor shared by several names (tied weights) under one of them:
    # a tensor the file lacks is covered where it is the same view of memory as one it holds
    loaded = {_view_key(own[k]) for k in state if k in own}
    required = {k for k in own if any(k.startswith(f"{name}.") for name in rebuilt)}
    problems += [f"{k}: missing from the file, which lists its module as factored" for k in own
                 if k in required and k not in state and _view_key(own[k]) not in loaded]
    if strict:
        problems += [f"{k}: missing from the file" for k, v in own.items()
                     if k not in state and _view_key(v) not in loaded and k not in required]
        problems += [f"{k}: not in the model" for k in state if k not in own]
    if problems:
        raise ValueError(f"{path} does not fit the model ({len(problems)} problems): " + "; ".join(problems[:10]))
    model.load_state_dict(state, strict=False)


def _view_key(t: Tensor) -> tuple:
    """What makes two tensors the same memory: storage, offset, shape and strides (views of
    one flat buffer share a storage, not this)."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype


def load_compressed(model: nn.Module, path: str, strict: bool = True) -> nn.Module:
    """Load a file from :func:`save_compressed` into a freshly built dense model of the same
    architecture: the factored modules are rebuilt from the file's layout, then filled.
    On any error the model is left as it was. ``model`` may be torch.compile'd, or hold
    compiled submodules: names are matched as in the uncompiled model; a compiled layer that
    is replaced by factors is left uncompiled. ``strict`` (default True): every tensor of the
    model must be in the file and every tensor of the file in the model; False loads those
    that match by name (shapes are checked either way), except that the tensors of every
    factored module the file's layout puts in place of a dense one must be in it (else that
    layer would be left with the random init of its factors). Returns ``model``."""
    with uncompiled(model) as plain:
        _load_compressed(plain, path, strict)
    return model


def _load_compressed(model: nn.Module, path: str, strict: bool) -> None:
    _require_safetensors()
    _refuse_ddp(model, "load_compressed")
    _refuse_sharded(model, "load_compressed")
    import safetensors
    from safetensors import safe_open

    # (safetensors' error type: top-level in the versions we test; any error of an older one)
    SafetensorError = getattr(safetensors, "SafetensorError", Exception)

    _refuse_directory(path, "load_compressed")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except SafetensorError as e:  # (a torch.save file, say: "Error while deserializing header: header too large")
        raise ValueError(f"{path} is not a safetensors file written by q3r.save_compressed ({e})") from None
    if _METADATA_KEY not in meta:
        raise ValueError(f"{path} was not written by q3r.save_compressed (no {_METADATA_KEY!r} metadata)")
    try:
        layout = json.loads(meta[_METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: damaged {_METADATA_KEY!r} metadata ({e})") from None
    if not isinstance(layout, dict):
        raise ValueError(f"{path}: damaged {_METADATA_KEY!r} metadata (not a mapping of module names)")
    # every replacement is built and checked before the first one is swapped in
    swaps, rebuilt = [], []
    for name, spec in layout.items():
        new = _rebuilt_module(model, name, spec, path)
        old = model.get_submodule(name)
        if new is old:
            continue
        # a module registered under several names (shared, ALBERT-style) is replaced under all,
        # as compress replaced it: the file's layout names it once
        for alias, module in model.named_modules(remove_duplicate=False):
            if module is old:
                parent_name, _, child = alias.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                swaps.append((parent, child, old, new))
                rebuilt.append(alias)
    for parent, child, _, new in swaps:
        setattr(parent, child, new)
    try:
        _load_state(model, path, strict, tuple(rebuilt))
    except BaseException:  # (put the dense modules back: the model is left unchanged)
        for parent, child, old, _ in swaps:
            setattr(parent, child, old)
        raise

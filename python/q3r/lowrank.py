"""The factored layers that :func:`q3r.compress` swaps in, and the SVD truncation they hold.

* :class:`LowRankLinear`: ``y = up @ (down @ x) + bias``, for an ``nn.Linear`` (or an unsliced
  HF ``Conv1D``, converted to the Linear convention);
* :class:`LowRankFusedLinear`: one factor pair per slice of a fused weight (timm ``qkv`` rows,
  GPT-2 ``c_attn`` columns), the fused output layout kept, parts outside every slice dense;
* :class:`LowRankEmbedding`: an ``nn.Embedding``'s table, factored.

Each has a ``.weight`` property giving the dense product, for code that reads a layer's weight
(see ``_read_weight``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import reference
from ._precision import autocast_off
from .targets import validate_slices

__all__ = ["LowRankLinear", "LowRankFusedLinear", "LowRankEmbedding", "svd_truncate"]


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


def is_conv1d(module: nn.Module) -> bool:
    # HF GPT-2's Conv1D: weight (in, out) = (nx, nf), y = x @ W + b. Matched by name, so
    # transformers is never imported.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def check_embedding(module: nn.Embedding, name: str) -> None:
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

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
that only reads ``.weight`` gets the dense product (see ``q3r.lowrank._read_weight``).

The factored layers are :mod:`q3r.lowrank`'s; saving and loading, :mod:`q3r._compressed_io`'s
(all importable from here: ``from q3r.compress import LowRankLinear, save_compressed``).
"""

from __future__ import annotations

import copy as copy_module
import numbers
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from . import reference
from ._compressed_io import load_compressed, refuse_ddp, refuse_sharded, save_compressed
from .lowrank import LowRankEmbedding, LowRankFusedLinear, LowRankLinear, check_embedding, is_conv1d, svd_truncate
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
    if is_conv1d(module):
        return W.T, 1 - t.slice_dim
    return W, t.slice_dim


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
    if not (is_conv1d(module) or isinstance(module, (nn.Linear, nn.Embedding))):
        raise TypeError(f"compress handles nn.Linear, HF Conv1D and nn.Embedding targets; {t.name} belongs to a "
                        f"{type(module).__name__}")
    if isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward:
        # (not refused: some compute just what nn.Linear does, as HF's FalconLinear; others do
        # not, as Llama4Router's top-k routing, and compress cannot tell them apart)
        warnings.warn(f"{t.name} belongs to a {type(module).__name__}, an nn.Linear subclass with its own forward; "
                      "compress replaces it by a LowRankLinear, which computes x W_r^T + b as nn.Linear does: check "
                      f"that this is what {type(module).__name__} computes", stacklevel=4)
    if isinstance(module, nn.Embedding):
        check_embedding(module, t.name)
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
    new.conv1d_layout = is_conv1d(module)
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
        refuse_ddp(plain, "compress")
        refuse_sharded(plain, "compress")
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
    refuse_sharded(plain, "truncate_weights_")
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

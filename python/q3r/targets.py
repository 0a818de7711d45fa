"""Choosing which weights Q3R regularizes, and how fused weights split into slices.

A target is a 2-D weight, or a set of non-overlapping slices of one (rows of timm's fused
``qkv`` (3d, d), columns of Hugging Face GPT-2's ``Conv1D`` ``c_attn`` (d, 3d)). Each slice is
regularized on its own, with its own rank, factors and eps. Slices are views (``narrow``):
no zero-padded full-size copy of a slice or of its gradient is ever made.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import reference

__all__ = ["Target", "find_targets", "param_groups", "validate_slices", "slice_views", "slice_shapes"]

# Patterns users commonly mean: every Linear / Conv1D except the classifier head.
SLICE_DIM_NAMES = {0: "rows", 1: "columns"}


@dataclass
class Target:
    """One regularized weight: its name, the parameter, and how it is sliced.

    slices is None for the whole weight, else a list of (start, stop) along slice_dim;
    target_rank is one rank spec for every slice, or a list with one per slice.
    """

    name: str
    param: nn.Parameter
    slice_dim: int = 0
    slices: list[tuple[int, int]] | None = None
    target_rank: int | float | list = 0.2
    slice_labels: list[str] = field(default_factory=list)

    def slice_names(self) -> list[str]:
        if self.slices is None:
            return [self.name]
        labels = self.slice_labels or [f"{a}:{b}" for a, b in self.slices]
        return [f"{self.name}[{label}]" for label in labels]


def validate_slices(shape, slice_dim, slices, name: str) -> list[tuple[int, int]] | None:
    """Check slices of a 2-D weight: in bounds, non-empty, non-overlapping (SPEC section 5)."""
    # (True is == 1: it passed here and failed at the first refresh, in narrow(), after the
    # optimizer had made the target's state)
    if isinstance(slice_dim, bool) or slice_dim not in (0, 1):
        raise ValueError(f"slice_dim of {name} must be 0 (rows) or 1 (columns), got {slice_dim!r}")
    if slices is None:
        return None
    if isinstance(slices, (str, bytes)) or not hasattr(slices, "__iter__"):
        raise TypeError(f"slices of {name} must be a list of (start, stop) pairs, got {slices!r}")
    extent = shape[slice_dim]
    out = []
    for item in slices:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in item)):
            raise TypeError(f"slices of {name} must be (start, stop) pairs of ints, got {item!r}")
        start, stop = item
        if not (0 <= start < stop <= extent):
            raise ValueError(
                f"slice {item!r} of {name} is out of bounds: need 0 <= start < stop <= {extent} "
                f"along {SLICE_DIM_NAMES[slice_dim]} of a {tuple(shape)} weight"
            )
        out.append((start, stop))
    if not out:
        raise ValueError(f"slices of {name} must not be empty (use None for the whole weight)")
    ordered = sorted(out)
    for (a0, b0), (a1, b1) in zip(ordered, ordered[1:]):
        if a1 < b0:
            raise ValueError(f"slices {(a0, b0)} and {(a1, b1)} of {name} overlap")
    return out


def slice_shapes(shape, slice_dim: int, slices) -> list[tuple[int, int]]:
    """(d1, d2) of each slice of a 2-D weight (the whole weight when slices is None)."""
    if slices is None:
        return [(shape[0], shape[1])]
    if slice_dim == 0:
        return [(b - a, shape[1]) for a, b in slices]
    return [(shape[0], b - a) for a, b in slices]


def slice_views(t: Tensor, slice_dim: int, slices) -> list[Tensor]:
    """2-D views of each slice of t (the weight, or its gradient): narrow, never a copy."""
    if slices is None:
        return [t]
    return [t.narrow(slice_dim, a, b - a) for a, b in slices]


def uncovered_ranges(extent: int, slices) -> list[tuple[int, int]]:
    """Ranges along the slice dimension that no slice covers (AdamQ3R gives them plain Adam)."""
    out, pos = [], 0
    for a, b in sorted(slices):
        if a > pos:
            out.append((pos, a))
        pos = max(pos, b)
    if pos < extent:
        out.append((pos, extent))
    return out


def resolve_slice_ranks(shape, slice_dim, slices, target_rank, rank_rule, name) -> list[int]:
    """The integer rank of every slice; target_rank is one spec or a list per slice."""
    shapes = slice_shapes(shape, slice_dim, slices)
    if isinstance(target_rank, (list, tuple)):
        if len(target_rank) != len(shapes):
            raise ValueError(
                f"target_rank of {name} lists {len(target_rank)} ranks for {len(shapes)} slices: {target_rank!r}"
            )
        specs = list(target_rank)
    else:
        specs = [target_rank] * len(shapes)
    # (a slice's error names the slice: "qkv.weight slice 1 (rows 4:5)")
    names = [name] if slices is None else [f"{name} slice {i} ({('rows', 'columns')[slice_dim]} {a}:{b})"
                                           for i, (a, b) in enumerate(slices)]
    return [reference.resolve_rank(s, d1, d2, rank_rule, n) for s, (d1, d2), n in zip(specs, shapes, names)]


def _matches(pattern: str, name: str) -> bool:
    """Exact name, a dotted suffix ("attn.qkv" matches "blocks.0.attn.qkv"), or a regex fullmatch."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """model.named_modules() as find_targets names them: looking through the wrappers
    torch.compile puts around a model or a submodule (an OptimizedModule holding the original
    as ``_orig_mod``), so that the names, and the patterns and checkpoints that use them, are
    those of the model uncompiled. (get_submodule resolves them: the wrapper forwards
    attribute access to the original.) A module registered under several names is listed
    under each (named_modules' default lists it under its first only: a pattern naming
    another of its names matched nothing); its weight is still one target."""
    out = []
    for name, module in model.named_modules(remove_duplicate=False):
        if _is_compile_wrapper(module):
            continue
        out.append((".".join(part for part in name.split(".") if part != "_orig_mod"), module))
    return out


def _is_compile_wrapper(module) -> bool:
    return type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), nn.Module)


def _adapter_base(module: nn.Module, weight: Tensor) -> nn.Module | None:
    """The layer that ``module`` wraps when it is an adapter layer whose ``weight`` is that
    layer's (peft's tuner layers: a ``base_layer`` submodule, ``weight`` a property reading
    ``base_layer.weight``, through nested wrappers); else None."""
    base, seen = module, 0
    while isinstance(getattr(base, "base_layer", None), nn.Module) and seen < 8:
        base, seen = base.base_layer, seen + 1
    if base is module or "weight" in module._parameters:
        return None
    return base if getattr(base, "weight", None) is weight else None


def target_list(targets, where: str) -> list:
    """targets as a list, refused unless each is a Target: patterns, weights or the model
    itself, given where find_targets' result belongs, failed later with "'str' object has no
    attribute 'param'", which said neither what was wrong nor what to pass."""
    # (a single pattern, weight or model is one wrong thing, not a list to look inside)
    if isinstance(targets, (str, Tensor, nn.Module)):
        items = [targets]
    elif isinstance(targets, Target) or not hasattr(targets, "__iter__"):
        # (a single Target, None or a number failed with "'Target' object is not iterable",
        # which said neither what was wrong nor what to pass)
        raise TypeError(f"{where} targets must be a list of q3r.Target objects (from q3r.find_targets(model, "
                        f"patterns, target_rank=...)), got a {type(targets).__name__}"
                        + (": pass [target]" if isinstance(targets, Target) else ""))
    else:
        items = list(targets)
    wrong = next((t for t in items if not isinstance(t, Target)), None)
    if wrong is not None:
        raise TypeError(f"{where} targets must be q3r.Target objects (from q3r.find_targets(model, patterns, "
                        f"target_rank=...)), got a {type(wrong).__name__}")
    # (a complex weight was taken, and penalty() / the first refresh failed inside torch with
    # '"aminmax_cpu" not implemented for 'ComplexFloat''; AdamQ3R refuses it the same way)
    odd = next((t for t in items if not t.param.is_floating_point()), None)
    if odd is not None:
        raise TypeError(f"{where}: target {odd.name} {tuple(odd.param.shape)} is {odd.param.dtype}; Q3R targets must be "
                        "real floating-point weights (the refresh's SVD and the term are real): exclude it")
    return items


def warn_frozen(targets, where: str) -> None:
    """One warning naming the targets that are frozen (requires_grad=False) now: they get no
    gradient, so no update and no Q3R term while frozen (as torch's optimizers skip them). A
    model whose weights are all frozen (peft freezes every weight but its adapters') was
    regularized by nothing, without a word."""
    frozen = [t.name for t in targets if not t.param.requires_grad]
    if frozen:
        shown = ", ".join(frozen[:4]) + (f" and {len(frozen) - 4} more" if len(frozen) > 4 else "")
        warnings.warn(f"{where}: {len(frozen)} of {len(targets)} targets are frozen (requires_grad=False): {shown}; "
                      "they get no gradient, so no Q3R term until they are unfrozen (peft freezes every weight "
                      "but its adapters')", stacklevel=3)


def unwrapped_root(model: nn.Module) -> nn.Module:
    """``model`` without the wrappers that torch.compile and DistributedDataParallel put around
    it, in any order and number: torch.compile(DDP(m)) (accelerate's prepare with a dynamo
    backend under a launcher), DDP(torch.compile(m)) and DDP(m) all give m, whose names have
    neither "module." nor "_orig_mod."."""
    while True:
        if _is_compile_wrapper(model):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


@contextlib.contextmanager
def uncompiled(model: nn.Module):
    """The model without torch.compile's wrappers, for the duration of a with block: yields the
    original root module, in which every compiled submodule is replaced by its original, so
    that module names and state_dict keys are those of the uncompiled model (no "_orig_mod.").
    On exit each wrapper goes back where it was, unless its slot was given another module
    meanwhile (a layer replaced by load_compressed stays replaced)."""
    root = model
    while _is_compile_wrapper(root):
        root = root._orig_mod
    swapped, seen, todo = [], set(), [root]
    try:
        while todo:
            parent = todo.pop()
            if id(parent) in seen:
                continue
            seen.add(id(parent))
            for name, child in list(parent._modules.items()):
                original = child
                while _is_compile_wrapper(original):
                    original = original._orig_mod
                if original is not child:
                    parent._modules[name] = original
                    swapped.append((parent, name, child, original))
                if original is not None:
                    todo.append(original)
        yield root
    finally:
        for parent, name, wrapper, original in reversed(swapped):
            if parent._modules.get(name) is original:
                parent._modules[name] = wrapper


def _qkv_roles(parent: nn.Module) -> list[str]:
    """The labels of a timm qkv's row thirds, in row order: the role each third plays.

    timm's DaViT ChannelAttention (davit_*) unbinds its thirds as q, k, v but computes
    softmax(k^T v) @ q: the first third is the values, the second the queries (the rows of the
    softmax), the third the keys (the softmax runs over them). Labelled q, k, v in row order,
    zeroing the "v" slice left the block's output almost whole and zeroing "q" silenced it.
    """
    if type(parent).__name__ == "ChannelAttention" and type(parent).__module__.startswith("timm.models.davit"):
        return ["v", "q", "k"]
    return ["q", "k", "v"]


def _is_timm_diff_attention(parent: nn.Module) -> bool:
    return type(parent).__name__ == "DiffAttention" and type(parent).__module__.startswith("timm.")


def _auto_fused(parent: nn.Module | None, child_name: str, module: nn.Module, name: str, per_head: list[str],
                not_three: list[str] | None = None):
    """(slice_dim, slices, labels) for fused QKV weights we recognize, else None.

    timm Attention: ``qkv`` Linear of an attention block (it has ``num_heads``), weight (3d, d):
    row slices. Hugging Face GPT-2: ``c_attn`` Conv1D (weight (d, 3d), ``nf`` attribute):
    column slices. A qkv laid out per head (its block has ``key_dim``, or ``head_first=True``) is left whole: its
    module name goes into per_head, for one warning naming them all (find_targets). So is a
    qkv whose rows are not 3 x num_heads x head_dim where its block says both (``not_three``).
    """
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        return None
    if child_name == "qkv" and parent is not None and hasattr(parent, "num_heads") and weight.shape[0] % 3 == 0:
        if hasattr(parent, "key_dim") or getattr(parent, "head_first", False) is True:
            # timm's TinyViT, EfficientFormer (and kin) lay qkv's rows out per head, [q_h k_h v_h]
            # for each head h (view(B, N, heads, -1).split(...)): thirds of the rows would mix
            # Q, K and V of different heads (half of the "q" slice of tiny_vit_5m_224 was K and V).
            # So does timm's MaxViT AttentionCl with head_first=True, its default (maxvit_rmlp_*,
            # maxxvit_*: view(B, -1, heads, dim_head * 3).chunk(3)): its "q" third was Q and K
            per_head.append(f"{name} ({type(parent).__name__}.{child_name})")
            return None
        heads, head_dim = getattr(parent, "num_heads", None), getattr(parent, "head_dim", None)
        if _is_timm_diff_attention(parent) and isinstance(head_dim, int):
            # timm's differential attention (vit_*_diff, attn_layer="diff") halves head_dim (each
            # head's Q and K split in two for its two softmaxes) but its qkv is chunk(3) of
            # heads x 2 head_dim each: a Q, K, V triple, which the check below left whole
            # with a warning saying it was not one
            head_dim = 2 * head_dim
        if (isinstance(heads, int) and isinstance(head_dim, int) and not isinstance(heads, bool)
                and weight.shape[0] != 3 * heads * head_dim):
            # timm's GCViT global attention: its qkv holds K and V only (2 x heads x head_dim rows,
            # kv.reshape(B, N, 2, heads, head_dim)), which divide by 3 at gcvit_small's widths:
            # thirds would straddle K and V
            if not_three is not None:
                not_three.append(f"{name} ({type(parent).__name__}.{child_name}: {weight.shape[0]} rows, "
                                 f"not 3 x {heads} heads x {head_dim})")
            return None
        third = weight.shape[0] // 3
        return 0, [(0, third), (third, 2 * third), (2 * third, 3 * third)], _qkv_roles(parent)
    # (a cross-attention c_attn holds K and V only: (d, 2d), which may also divide by 3)
    if (child_name == "c_attn" and type(module).__name__ == "Conv1D" and weight.shape[1] % 3 == 0
            and not getattr(parent, "is_cross_attention", False)):
        third = weight.shape[1] // 3
        return 1, [(0, third), (third, 2 * third), (2 * third, 3 * third)], ["q", "k", "v"]
    return None


def find_targets(
    model: nn.Module,
    include,
    exclude=(),
    *,
    target_rank: int | float = 0.2,
    rank_overrides: dict | None = None,
    fused: str = "auto",
    slices: dict | None = None,
    rank_rule: str = "params",
) -> list[Target]:
    """Select target weights of ``model`` by module-name patterns.

    include / exclude: patterns (or one pattern) matched against module names by exact name,
    dotted suffix, or regex fullmatch. The module's ``weight`` is the target; it must be 2-D.
    rank_overrides: {pattern: rank spec}, first matching pattern wins over target_rank.
    fused: "auto" slices timm ``qkv`` and GPT-2 ``c_attn`` into Q, K, V; "none" never slices.
    slices: {module pattern: (slice_dim, [(start, stop), ...])} for anything else; wins over auto.
    A pattern of include, exclude, rank_overrides or slices that matches nothing is an error (a typo
    would leave a layer silently unregularized).  The weights must be parameters (nn.Parameter):
    a parametrized module's computed weight cannot be trained against; an adapter-wrapped
    layer (peft's LoRA: its ``weight`` is the wrapped layer's frozen one) is refused, merge the
    adapters first (``merge_and_unload()``) or exclude it. A timm ``qkv`` laid out per head (its
    block has ``key_dim`` or ``head_first=True``) or whose rows are not 3 x num_heads x
    head_dim of its block is left whole, with a warning: pass ``slices`` for its layout. The
    slices are labelled by the role they play: timm DaViT's ChannelAttention, whose first third
    is the values (softmax(k^T v) @ q), gets ``[v]``, ``[q]``, ``[k]`` in row order.
    rank_rule: the rule the ranks are checked by, as the optimizer or regularizer will resolve
    them (see q3r.reference.resolve_rank).
    """
    return _find_targets(model, include, exclude, target_rank, rank_overrides, fused, slices, check_ranks=True,
                         rank_rule=rank_rule)


def _find_targets(model, include, exclude, target_rank, rank_overrides, fused, slices, check_ranks: bool,
                  rank_rule: str = "params") -> list[Target]:
    """find_targets; ``check_ranks=False`` leaves the ranks to the caller (compress, given its
    own fraction or rank)."""
    if fused not in ("auto", "none"):
        raise ValueError(f"fused must be 'auto' or 'none', got {fused!r}")
    include = [include] if isinstance(include, str) else list(include)
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    rank_overrides = dict(rank_overrides or {})
    slices = dict(slices or {})
    # names as in the model DDP wraps, as for torch.compile's wrappers (_named_modules):
    # with "module." the Q3R states that an attached Q3R carries in the optimizer's
    # checkpoint did not load where the same script runs unwrapped (accelerate's prepare
    # wraps in DDP only under a launcher), and compress(model.module, targets) failed
    model = unwrapped_root(model)
    modules = _named_modules(model)
    parents = dict(modules)
    for option, patterns in (("include", include), ("exclude", exclude)):  # (a typo must not pass silently)
        unmatched = [p for p in patterns if not any(_matches(p, name) for name in parents if name)]
        if unmatched:
            # (names are the wrapped model's: a DDP / torch.compile prefix in a pattern matches nothing)
            prefixed = [p for p in unmatched if p.startswith(("module.", "_orig_mod."))]
            hint = (f"; targets are named as in the model a wrapper wraps (DDP's module., torch.compile's "
                    f"_orig_mod.): drop the prefix from {prefixed!r}" if prefixed else "")
            raise ValueError(f"{option} patterns {unmatched!r} match no module of the model{hint}")
    targets, used, per_head, not_three, factored = [], set(), [], [], []
    for name, module in modules:
        if not name or not any(_matches(p, name) for p in include) or any(_matches(p, name) for p in exclude):
            continue
        if getattr(type(module), "_q3r_factored", False):  # (already factored: its weight is computed)
            factored.append(name)
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        base = _adapter_base(module, weight)
        if base is not None:
            # (peft's LoRA layers and kin: their .weight is the wrapped layer's frozen weight,
            # without the adapter's update; it was found, whole (a wrapped GPT-2 c_attn was not
            # cut into Q, K, V), and AdamQ3R and penalty() then did nothing, without a word)
            raise ValueError(
                f"target {name} is an adapter layer ({type(module).__module__}.{type(module).__name__}, e.g. peft's "
                f"LoRA) wrapping a {type(base).__name__}: its .weight is the wrapped layer's weight"
                f"{' (frozen)' if not weight.requires_grad else ''}, without the adapter's update, so Q3R would "
                "regularize a weight that does not train. Merge the adapters into the model first (peft's "
                "merge_and_unload()) and find the targets there, or exclude this layer")
        if not isinstance(weight, nn.Parameter):
            raise TypeError(
                f"target {name}.weight is not a parameter but computed ({type(weight).__name__}, e.g. by "
                "torch.nn.utils.parametrize or weight_norm): Q3R regularizes parameters; target the "
                "parameters it is computed from, or remove the parametrization"
            )
        if weight.dim() != 2:
            raise ValueError(
                f"target {name}.weight has shape {tuple(weight.shape)}; only 2-D weights can be targets "
                "(no reshape rule is defined for other shapes)"
            )
        if id(weight) in used:
            continue  # tied weights are regularized once
        used.add(id(weight))
        rank = next((r for p, r in rank_overrides.items() if _matches(p, name)), target_rank)
        parent_name, _, child = name.rpartition(".")
        spec = next((s for p, s in slices.items() if _matches(p, name)), None)
        labels: list[str] = []
        if spec is not None:
            slice_dim, cuts = spec
        elif fused == "auto" and (auto := _auto_fused(parents.get(parent_name), child, module, name,
                                                              per_head, not_three)) is not None:
            slice_dim, cuts, labels = auto
        else:
            slice_dim, cuts = 0, None
        pname = f"{name}.weight"
        cuts = validate_slices(weight.shape, slice_dim, cuts, pname)
        if check_ranks:
            resolve_slice_ranks(weight.shape, slice_dim, cuts, rank, rank_rule, pname)
        targets.append(Target(pname, weight, slice_dim, cuts, rank, labels))
    if not targets:
        # (a compressed model's factored layers match the patterns but are skipped: say so)
        why = (f"; the modules they match are factored by q3r.compress ({', '.join(factored[:3])}"
               f"{', ...' if len(factored) > 3 else ''}): find the targets on the dense model") if factored else ""
        raise ValueError(f"include patterns {include!r} matched no module with a 2-D weight{why}")
    if per_head:
        shown = ", ".join(per_head[:4]) + (f" and {len(per_head) - 4} more" if len(per_head) > 4 else "")
        warnings.warn(f"{shown}: their attention blocks have key_dim (or head_first=True), as blocks whose qkv rows are "
                      "laid out per head do: left whole, not cut into Q, K, V thirds; pass slices={...} to find_targets "
                      "for the layout they have", stacklevel=3)
    if not_three:
        shown = ", ".join(not_three[:4]) + (f" and {len(not_three) - 4} more" if len(not_three) > 4 else "")
        warnings.warn(f"{shown}: not a Q, K, V triple by its block's num_heads and head_dim: left whole, not "
                      "cut into thirds; pass slices={...} to find_targets for the layout it has", stacklevel=3)
    chosen = [t.name[: -len(".weight")] for t in targets]
    for option, patterns in (("rank_overrides", rank_overrides), ("slices", slices)):
        idle = [p for p in patterns if not any(_matches(p, name) for name in chosen)]
        if idle:
            raise ValueError(f"{option} patterns {idle!r} match none of the targets {chosen}")
    return targets


def param_groups(model: nn.Module, targets: list[Target], weight_decay: float = 0.0, **q3r_options) -> list[dict]:
    """Optimizer param groups: one Q3R group per target and one group for all other parameters.

    q3r_options (lmbda, steps, eps_schedule, rank_rule, refresh, ...) go into every Q3R group.
    weight_decay applies to the non-target parameters only: on targets the Q3R term is the
    (reweighted) decay. Targets frozen now (requires_grad=False) are named in one warning:
    they get no gradient, so no Q3R term.
    """
    from .config import Q3R_DEFAULTS  # (config imports this module)

    unknown = sorted(set(q3r_options) - set(Q3R_DEFAULTS) - {"lr", "betas", "eps"})
    if unknown:  # (a typo would leave its option at the default, silently)
        raise TypeError(f"param_groups got unknown options {unknown}; Q3R options are {sorted(Q3R_DEFAULTS)}, "
                        "and lr, betas, eps")
    targets = target_list(targets, "param_groups")
    owned = {id(p) for p in model.parameters()}
    foreign = [t.name for t in targets if id(t.param) not in owned]
    if foreign:  # (found on a copy, say: the model's own weight would go unregularized, silently)
        raise ValueError(f"targets {foreign} are not parameters of this model (were they found on a copy of it?)")
    warn_frozen(targets, "q3r.param_groups")
    target_ids = {id(t.param) for t in targets}
    rest = [p for p in model.parameters() if id(p) not in target_ids and p.requires_grad]
    groups = [{"params": rest, "weight_decay": weight_decay}] if rest else []
    for t in targets:
        groups.append(
            {
                "params": [t.param],
                "q3r": True,
                "weight_decay": 0.0,
                "slices": None if t.slices is None else [tuple(s) for s in t.slices],
                "slice_dim": t.slice_dim,
                "target_rank": list(t.target_rank) if isinstance(t.target_rank, (list, tuple)) else t.target_rank,
                "names": t.slice_names(),
                **q3r_options,
            }
        )
    return groups

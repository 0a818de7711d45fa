"""Saving and loading compressed models (safetensors, extra ``q3r[io]``): ``save_compressed``
writes the factors and, in the file's metadata, the factored layout; ``load_compressed`` rebuilds
the factored modules on a freshly built dense model, each checked against the dense layer it
replaces, and loads. Also the refusals of wrapped models (FSDP2-sharded, DDP) that
:func:`q3r.compress` shares.
"""

from __future__ import annotations

import json
import os

import torch
from torch import Tensor, nn

from ._files import atomic_path
from .distributed import is_sharded
from .lowrank import LowRankEmbedding, LowRankFusedLinear, LowRankLinear, check_embedding, is_conv1d
from .targets import uncompiled

__all__ = ["save_compressed", "load_compressed"]


_GATHER_FIRST = ("gather the full weights into an unsharded copy of the model first, e.g. "
                 "torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions("
                 "full_state_dict=True, cpu_offload=True)) on rank 0, load that into a freshly built dense model, "
                 "and compress (save, load) that one (docs/distributed.md)")


def refuse_sharded(model: nn.Module, what: str) -> None:
    """A TypeError naming the first DTensor (an FSDP2-sharded weight) among ``model``'s
    parameters and buffers: a rank holds only some rows of it, and compress replaces modules
    that FSDP2 manages (their SVDs, the swapped modules and a saved file would all be wrong)."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if is_sharded(t):
                raise TypeError(f"{what} needs a model with full weights, but its {kind} {name} is a DTensor "
                                f"(a distributed tensor, placements {tuple(t.placements)}): {_GATHER_FIRST}")


def is_ddp(model: nn.Module) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def refuse_ddp(model: nn.Module, what: str) -> None:
    """DDP's reducer keeps the parameters it was built with: factored modules swapped in under
    the wrapper would train with gradients that are never averaged across ranks (the ranks
    drift apart without an error)."""
    if is_ddp(model):
        raise TypeError(f"{what}: model is a DistributedDataParallel wrapper, whose gradient reducer keeps the "
                        f"parameters it was built with, so the factored layers' gradients would never be averaged "
                        f"across ranks; pass the wrapped model (model.module) and wrap the result in a new "
                        f"DistributedDataParallel to train it further")


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
        plain = plain.module if is_ddp(plain) else plain  # (the names of the model DDP wraps, as load wants them)
        refuse_sharded(plain, "save_compressed")
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
    if is_conv1d(module):
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
    new.conv1d_layout = is_conv1d(old)
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
    check_embedding(old, name)
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
    refuse_ddp(model, "load_compressed")
    refuse_sharded(model, "load_compressed")
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

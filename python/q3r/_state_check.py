"""Checks of a slice state loaded from a checkpoint (AdamQ3R and Q3R ``load_state_dict``),
made before anything changes (SPEC section 5): a damaged or foreign state must be refused
with a ValueError, not accepted now and fail in the middle of a later step."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import distributed
from .refresh import new_slice_state, tail_mismatch

# every key of refresh.new_slice_state but the warm-start tail (optional: see upgrade_state),
# with the number of dims it must have
_REQUIRED_DIMS = {"U": 2, "V": 2, "sigma": 1, "eps": 0, "eps0": 0, "sigma_next": 0, "tail_energy": 0, "refreshes": 0}
# every key a slice state has: this version's, and the warm-start tail's name before 49887cd
_KNOWN_KEYS = frozenset(new_slice_state(1, 1)) | {"V_tail"}


def slice_state_problem(p, s, d1: int, d2: int) -> str | None:
    """Why ``s`` is not a usable state of a d1 x d2 slice of parameter p (None: it is)."""
    if not isinstance(s, dict):
        return f"a slice state must be a dict of tensors, got {type(s).__name__}"
    # (an entry no q3r version writes loaded silently where it was a tensor, and was kept and
    # saved again with every checkpoint: a state of another library or version, or an edited one)
    unknown = sorted(str(key) for key in s if key not in _KNOWN_KEYS)
    if unknown:
        return (f"slice state has entries {unknown} that q3r does not keep (its entries: {sorted(_REQUIRED_DIMS)} "
                "and the optional 'tail')")
    for key, dims in _REQUIRED_DIMS.items():
        t = s.get(key)
        if t is None:
            return f"slice state lacks {key!r} (keys: {sorted(s)})"
        if not isinstance(t, Tensor):
            return f"slice state {key!r} must be a tensor, got {type(t).__name__}"
        if t.dim() != dims:
            return f"slice state {key!r} must have {dims} dims, got shape {tuple(t.shape)}"
        if key == "refreshes":
            if t.is_floating_point() or t.is_complex():
                return f"slice state {key!r} must be an integer tensor, got {t.dtype}"
        elif t.dtype != torch.float32:
            # (the library keeps every state in float32, for float64 weights too: a float64 U
            # loaded and stayed float64, and a float16 one would have rounded the operator)
            return f"slice state {key!r} must be a float32 tensor, as q3r stores it, got {t.dtype}"
    # (any other entry, the warm-start tail included, is copied as a tensor when it loads: a
    # non-tensor one passed every check and failed there with "'int' object has no attribute
    # 'detach'" or "... 'dim'", an AttributeError naming nothing)
    other = next((key for key, value in s.items() if not isinstance(value, Tensor)), None)
    if other is not None:
        return f"slice state {other!r} must be a tensor, got {type(s[other]).__name__}"
    tail = s.get("tail")
    if isinstance(tail, Tensor) and tail.dtype != torch.float32:
        return f"slice state 'tail' must be a float32 tensor, as q3r stores it, got {tail.dtype}"
    k = s["sigma"].shape[0]
    try:
        u_rows, v_rows = distributed.factor_rows(p, s, d1, d2)
    except ValueError as err:
        return str(err)
    if tuple(s["U"].shape) != (u_rows, k) or tuple(s["V"].shape) != (v_rows, k):
        moved = _moved_between_layouts(p, s, u_rows, v_rows, d1, d2)
        return (f"factors of shapes U {tuple(s['U'].shape)}, V {tuple(s['V'].shape)}, sigma ({k},) "
                f"do not fit a {d1}x{d2} slice" + (f" ({moved})" if moved else ""))
    return tail_mismatch(s, d1, d2) or _non_finite(s)


def _non_finite(s: dict) -> str | None:
    """Why the values of a well-formed state are damaged: non-finite factors (they turned the
    weights NaN at the next step, and the refresh's non-finite guard then kept them as the
    last good ones) or an eps that is NaN or negative (+inf is a state before its first
    refresh; eps0, sigma_next and tail_energy are NaN there too, and only reported). A
    sharded factor is judged by this rank's shard: no collective in a load's checks."""
    for key in ("U", "V", "sigma", "tail"):
        t = s.get(key)
        if isinstance(t, Tensor) and t.numel() and not bool(torch.isfinite(_local(t)).all()):
            return f"slice state {key!r} holds non-finite values (a damaged checkpoint)"
    sigma = _local(s["sigma"])
    # (the kept triplets are those with sigma > eps >= 0: a sigma <= 0 gives s_i = eps / sigma <= 0
    # or inf, an operator that is no longer positive definite, and it loaded without a word)
    if sigma.numel() and not bool((sigma > 0).all()):
        return f"slice state 'sigma' holds values <= 0 (singular values above eps are > 0), got {sigma.tolist()}"
    eps = float(_local(s["eps"]))
    if math.isnan(eps) or eps < 0:
        return f"slice state 'eps' must be a number >= 0 (+inf before the first refresh), got {eps}"
    return None


def _local(t: Tensor) -> Tensor:
    """This rank's part of a sharded state tensor, or the tensor (no collective in a load's checks)."""
    return t.to_local() if distributed.is_sharded(t) else t


def _moved_between_layouts(p, s: dict, u_rows: int, v_rows: int, d1: int, d2: int) -> str | None:
    """Why a factor's rows differ where a checkpoint of a sliced target moved between a run in
    which the factor is kept in the slice's rows or columns (an unsharded run) and one that
    keeps it in the parameter's, sharded like the weight (U of an FSDP2 / Shard(0) target, V
    of a Shard(1) one), else None."""
    for key, saved, rows, own, whole in (("U", s["U"].shape[0], u_rows, d1, p.shape[0]),
                                         ("V", s["V"].shape[0], v_rows, d2, p.shape[1])):
        if saved == rows or own == whole:
            continue
        if saved == own:
            return (f"{key} has the slice's rows, as a run that does not shard it saves it; a sharded run keeps {key} "
                    "in the parameter's rows or columns: checkpoints of sliced targets do not move between the two")
        if saved == whole:
            return (f"{key} has the parameter's rows or columns, as a sharded run saves it; an unsharded run keeps {key} "
                    "in the slice's: checkpoints of sliced targets do not move between the two")
    return None

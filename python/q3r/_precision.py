"""The precision q3r's own math runs in, whatever the caller's context (SPEC section 3,
precision: the SVD and all reductions in fp32).

Two process settings would otherwise leak into it:

* **autocast.** ``loss = model(x) + reg.penalty()`` usually runs inside ``torch.autocast``,
  which would run R's products and a refresh due at that step in bf16 / fp16 (and mixed
  dtypes crashed the randomized refresh). Every public entry point turns autocast off for
  its own work (:func:`no_autocast`); the caller's region is untouched.
* **TF32 / bf16 fp32 matmuls** (``torch.set_float32_matmul_precision("high")``,
  ``torch.backends.cuda.matmul.fp32_precision = "tf32"``). The per-step term follows them on
  purpose, as torch's own fp32 matmuls and q3r's kernels do: the user traded precision for
  speed. A refresh does not: SPEC asks for fp32, and with TF32 products (emulated on a CPU at
  768 x 768, benchmarks/results/probes/refresh_accuracy_768_*.txt) the operator of a
  Q3R-trained weight whose tail sits at 1e-3 sigma_1 errs by 1.6e-3 to 3.1e-3, past issue 4's
  1e-3, against about 1e-4 in IEEE fp32. :func:`refresh_precision` pins fp32 matmuls to IEEE for its duration and
  restores the caller's settings after, and around the ``before_wait`` work a refresh runs
  for the caller (:func:`as_caller`).

The matmul settings are process-wide in torch, so a thread that runs its own matmuls while
another refreshes sees IEEE fp32 for that long.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

import torch

# (backend, op) pairs of torch's fp32-precision settings that decide fp32 matmuls: cuBLAS and
# oneDNN (a CPU with bf16 support runs fp32 matmuls in bf16 under "medium")
_MATMUL_BACKENDS = (("cuda", "matmul"), ("mkldnn", "matmul"))
_PARENT = {"cuda": ("cuda", "all"), "mkldnn": ("mkldnn", "all")}


def _new_api() -> bool:
    """torch >= 2.9 has per-backend fp32_precision settings; older ones the legacy switch."""
    return hasattr(torch._C, "_get_fp32_precision_getter")


@contextlib.contextmanager
def no_autocast() -> Iterator[None]:
    """Autocast off inside, for the device types (CPU, CUDA) where it is on now."""
    with contextlib.ExitStack() as stack:
        for device_type in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def autocast_off(fn: Callable) -> Callable:
    """Decorator: run ``fn`` with autocast off (see the module docstring)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with no_autocast():
            return fn(*args, **kwargs)

    return wrapped


# the caller's settings while a refresh has pinned IEEE (None: nothing was changed), and how
# deeply refreshes are nested (DDP's divided refresh calls the local one)
_PINNED = {"depth": 0, "saved": None}


@contextlib.contextmanager
def ieee_fp32_matmul() -> Iterator[None]:
    """IEEE fp32 matmuls inside, the caller's settings restored after; nests."""
    if _PINNED["depth"] == 0:
        saved = _read()
        if saved != _IEEE:
            _write(_IEEE)
            _PINNED["saved"] = saved
    _PINNED["depth"] += 1
    try:
        yield
    finally:
        _PINNED["depth"] -= 1
        if _PINNED["depth"] == 0 and _PINNED["saved"] is not None:
            saved, _PINNED["saved"] = _PINNED["saved"], None
            _write(saved)


def as_caller(fn: Callable[[], None] | None) -> Callable[[], None] | None:
    """``fn`` run with the caller's matmul settings back in place: the work a refresh runs for
    its caller in the middle (``before_wait``: AdamQ3R's other updates) is the caller's."""
    if fn is None:
        return None

    def run() -> None:
        saved = _PINNED["saved"]
        if saved is None:
            return fn()
        _write(saved)
        try:
            fn()
        finally:
            _write(_IEEE)

    return run


def _read():
    """The caller's fp32 matmul settings: a value per _MATMUL_BACKENDS entry (legacy torch:
    the one precision string)."""
    if not _new_api():
        return torch.get_float32_matmul_precision()
    get = torch._C._get_fp32_precision_getter
    # torch resolves "none" (inherit from the backend's setting) when read; a value equal to
    # its parent's is put back as "none", so that a later change of the parent still reaches it
    return tuple("none" if get(b, op) == get(*_PARENT[b]) else get(b, op) for b, op in _MATMUL_BACKENDS)


def _write(values) -> None:
    if not _new_api():
        torch.set_float32_matmul_precision(values)
        return
    for (backend, op), value in zip(_MATMUL_BACKENDS, values):
        torch._C._set_fp32_precision_setter(backend, op, value)


_IEEE = ("ieee",) * len(_MATMUL_BACKENDS) if _new_api() else "highest"


@contextlib.contextmanager
def refresh_precision() -> Iterator[None]:
    """Autocast off and IEEE fp32 matmuls, for a refresh (see the module docstring), and
    outside inference mode (normal_tensors)."""
    with no_autocast(), ieee_fp32_matmul(), normal_tensors():
        yield


@contextlib.contextmanager
def normal_tensors() -> Iterator[None]:
    """Tensors made inside are normal ones even where the caller runs in inference_mode:
    factors a refresh made there (a penalty() logged in an eval loop) would be inference
    tensors, which autograd refuses at the next training step.  Gradient mode off, as a
    refresh runs (inference_mode(False) alone turns it on)."""
    if not torch.is_inference_mode_enabled():
        yield
        return
    with torch.inference_mode(False), torch.no_grad():
        yield

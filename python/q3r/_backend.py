"""Which implementation runs an op: lazy, memoized probes and the Q3R_BACKEND override.

Rules (issue 3): CUDA tensors with Triton available -> "triton"; anything else ->
"reference". ``Q3R_BACKEND=reference|triton`` forces one; forcing one that cannot run the
given tensors is an error (BackendUnavailableError), never a silent fallback. CPU tensors
can run the Triton kernels only under the interpreter (TRITON_INTERPRET=1), which is how
the test-suite exercises them; CUDA tensors cannot (the reference path takes them then).
Nothing here imports triton or touches CUDA until a probe is first needed, so ``import q3r``
stays free of both.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

ENV_VAR = "Q3R_BACKEND"
BACKENDS = ("reference", "triton")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

log = logging.getLogger("q3r")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


def requested() -> str | None:
    """The backend forced by Q3R_BACKEND, or None (read on every call: cheap, and tests set it)."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, or 'auto' or unset (either picks per tensor), got {value!r}")
    return value


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401

        import q3r_kernels  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything
        return False, f"cannot import triton / q3r_kernels: {type(exc).__name__}: {exc}"
    return True, f"triton {triton.__version__}"


@functools.lru_cache(maxsize=None)
def _cuda_probe() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    try:
        from triton.runtime import driver

        driver.active.get_current_target()
    except Exception as exc:
        return False, f"triton has no usable GPU driver: {type(exc).__name__}: {exc}"
    return True, "CUDA device with a triton driver"


def triton_status(device_type: str = "cuda") -> tuple[bool, str]:
    """(available, why) for running the Triton kernels on tensors of ``device_type``."""
    ok, why = _triton_import()
    if not ok:
        return ok, why
    if device_type == "cuda":
        if _interpreting():  # (the interpreter copies tensor arguments to the host, but the kernels
            # read their blocks through raw addresses in a table: on the host a CUDA address is a crash)
            return False, "TRITON_INTERPRET=1: Triton's interpreter runs the kernels on cpu tensors only, not cuda ones"
        return _cuda_probe()
    if _interpreting() and device_type == "cpu":
        return True, "TRITON_INTERPRET=1: Triton's interpreter runs the kernels on CPU tensors (slow; for tests)"
    if device_type == "cpu":
        return False, "cpu tensors need TRITON_INTERPRET=1 (the kernels compile for CUDA only)"
    return False, f"the kernels run on cuda tensors (and, under TRITON_INTERPRET=1, cpu ones), not {device_type}"


_warned: set[str] = set()


def _fallback_once(why: str) -> None:
    if why not in _warned:
        _warned.add(why)
        log.warning("q3r: Triton kernels unavailable (%s); using the reference path", why)


def backend_for(device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """The backend that runs an op on tensors of this device and storage dtype."""
    device_type = torch.device(device).type
    forced = requested()
    if forced == "reference" or (forced is None and device_type != "cuda"):
        return "reference"  # decided without probing: no triton import on CPU-only runs
    ok, why = triton_status(device_type)
    if ok and dtype not in KERNEL_DTYPES:
        ok, why = False, f"the kernels take float32, bfloat16 or float16, not {dtype}"
    if forced == "triton":
        if not ok:
            raise BackendUnavailableError(f"{ENV_VAR}=triton was requested but cannot run here: {why}")
        return "triton"
    if not ok:
        _fallback_once(why)
        return "reference"
    return "triton"


def reset() -> None:
    """Forget the probes and the fallback notice (for tests that change the environment)."""
    _triton_import.cache_clear()
    _cuda_probe.cache_clear()
    _warned.clear()

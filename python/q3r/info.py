"""``python -m q3r.info``: what this installation can run, and why not where it cannot."""

from __future__ import annotations

import importlib.util
import os
import platform

import torch

from . import __version__, _backend


def _native_line() -> str:
    if importlib.util.find_spec("q3r._native") is None:
        return "not present (q3r._native is not part of this installation)"
    try:
        from . import _native

        return _native.status()
    except Exception as exc:  # a broken extension must not break the report
        return f"error while probing: {type(exc).__name__}: {exc}"


def report() -> str:
    lines = [
        f"q3r {__version__}  python {platform.python_version()}  torch {torch.__version__}",
        f"CUDA: {'available, ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}"
        f" (torch built with CUDA {torch.version.cuda})",
    ]
    try:
        import triton

        lines.append(f"triton: {triton.__version__}")
    except Exception as exc:
        lines.append(f"triton: not importable ({type(exc).__name__}: {exc})")
    else:  # (a q3r_kernels that fails to import was reported as "triton: not importable" under the version)
        try:
            import q3r_kernels

            lines.append(f"fp32 dots in the kernels on CUDA: {q3r_kernels.gpu_dot_precision()}"
                         f" (q3r_kernels.CONFIG.precision={q3r_kernels.CONFIG.precision!r}, "
                         f"TF32 allowed by torch's fp32 matmul settings: {q3r_kernels.torch_allows_tf32()})")
        except Exception as exc:
            lines.append(f"q3r_kernels: not importable ({type(exc).__name__}: {exc})")
    for device_type in ("cuda", "cpu"):
        ok, why = _backend.triton_status(device_type)
        lines.append(f"Triton kernels on {device_type} tensors: {'yes' if ok else 'no'} -- {why}")
    try:
        forced = _backend.requested()
        choice = f"forced by {_backend.ENV_VAR}={forced}" if forced else "automatic (CUDA + Triton -> triton, else reference)"
        if forced == "triton" and not any(_backend.triton_status(t)[0] for t in ("cuda", "cpu")):
            choice += " -- but it cannot run here (see above): every op will raise BackendUnavailableError"
    except ValueError as exc:
        choice = f"invalid: {exc}"
    lines.append(f"backend choice: {choice}")
    lines.append(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}")
    lines.append(f"native extension: {_native_line()}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    import argparse

    # (--help printed the report and any other argument was ignored, where `q3r info` refuses it)
    argparse.ArgumentParser(prog="python -m q3r.info",
                            description="which backends (Triton, native extension) are available and why not").parse_args()
    main()

#!/usr/bin/env python3
"""Set up a virtual environment and run the demo or the test suite: the README's two commands.

    python3 tools/dev.py demo   # the main job: a small real Q3R training run and its table
    python3 tools/dev.py test   # the whole test suite (CPU; Triton kernels under its interpreter)

Needs only Python >= 3.10 and pip. The environment lives in .venv (Q3R_VENV to move it).
torch is installed first and on its own (Q3R_TORCH, default "torch==2.13.0"; set
Q3R_TORCH_INDEX to a wheel index such as https://download.pytorch.org/whl/cpu where PyPI's
default torch would be a multi-GB CUDA build), so nothing installed later pulls another torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("Q3R_VENV", ROOT / ".venv")).resolve()  # (commands run from ROOT)
PY = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
EXTRAS = {"demo": "demo", "test": "test,hf,triton,experiment"}


def sh(*cmd, env=None) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, env=env)


def has_module(name: str) -> bool:
    return subprocess.run([str(PY), "-c", f"import {name}"], capture_output=True).returncode == 0


def setup(job: str) -> None:
    if not PY.exists():
        print(f"creating virtual environment {VENV}", flush=True)
        venv.EnvBuilder().create(VENV)
    # pip apart from the venv: where ensurepip fails (Debian's python3 without python3-venv) the
    # venv had its python but no pip, and every later run went on to fail in `python -m pip`
    # with "No module named pip"
    if not has_module("pip"):
        try:
            sh(PY, "-m", "ensurepip", "--upgrade", "--default-pip")
        except subprocess.CalledProcessError as exc:
            raise SystemExit(f"could not install pip into {VENV}: this Python's ensurepip failed "
                             "(on Debian/Ubuntu: apt-get install python3-venv); then run this again") from exc
    pip = [PY, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    if not has_module("torch"):
        index = os.environ.get("Q3R_TORCH_INDEX")
        sh(*pip, os.environ.get("Q3R_TORCH", "torch==2.13.0"), *(["--index-url", index] if index else []))
    sh(*pip, "setuptools>=64", "wheel", "pybind11", "ninja")
    # --no-build-isolation: the build sees the torch above, so the native CPU solver (csrc/)
    # is compiled for the tests; without it a build would fetch another torch.
    env = dict(os.environ)
    if job == "demo" and not any((ROOT / "python" / "q3r").glob("_C.*")):  # (not _C_build_failed.txt)
        # the demo does not need the compiled solver; where `dev.py test` or CMake built one,
        # the install rebuilds it rather than delete it (Q3R_BUILD_NATIVE=0 removes it)
        env.setdefault("Q3R_BUILD_NATIVE", "0")
    sh(*pip, "--no-build-isolation", "-e", f".[{EXTRAS[job]}]", env=env)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in EXTRAS:
        print(__doc__)
        return 2
    job, rest = argv[0], argv[1:]
    setup(job)
    if job == "demo":
        cmd = [PY, "-m", "q3r.cli", "demo", *rest]
    else:
        cmd = [PY, "-m", "pytest", "-q", *rest]
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run([str(c) for c in cmd], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

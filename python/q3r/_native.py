"""Lazy, memoized access to the optional compiled extension q3r._C (csrc/).

`import q3r` never loads it.  The first call of `load()` tries once; if the module is missing
or fails to import, or sits in a source tree whose csrc/ it was not built from (`_stale`),
one RuntimeWarning says so (none for a plain missing module) and every caller takes the
pure-PyTorch path.

    batched_eigh(G, max_sweeps=..., tol=...) -> (evals, evecs)
        eigenvalues descending (b, k) and eigenvectors as columns (b, k, k) of a batch of
        symmetric float32 matrices; the native Jacobi solver where it is built for G's device,
        else torch.linalg.eigh.
    status() -> str   one line per part: built or not, and why.

Build: `pip install --no-build-isolation -e .` (see setup.py for the switches).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import warnings

import torch
from torch import Tensor

from . import reference

DEFAULT_MAX_SWEEPS = 30
DEFAULT_TOL = 1e-7  # relative: rotate while |a_pq| > tol * sqrt(a_pp a_qq)

BUILD_FAILURE_NOTE = "_C_build_failed.txt"  # (written by setup.py when the build fails)
NATIVE_SUFFIXES = (".cpp", ".cu", ".h")  # the files of csrc/ that q3r._C's source_digest covers

_state: dict = {}


class NativeUnavailable(RuntimeError):
    """The compiled extension, or its part for the requested device, is not available."""


def load():
    """The compiled module, or None (memoized; warns once when it cannot be imported)."""
    if "module" not in _state:
        try:
            module = importlib.import_module("q3r._C")
            _state["module"], _state["error"] = module, _stale(module)
            if _state["error"] is not None:
                _state["module"] = None
                warnings.warn(f"q3r: {_state['error']}; refreshes use torch.linalg.eigh", RuntimeWarning, stacklevel=2)
        except ImportError as exc:  # missing, or built against another torch
            _state["module"] = None
            _state["error"] = f"{type(exc).__name__}: {exc}"
            if "No module named" not in str(exc):
                warnings.warn(f"q3r: native extension q3r._C failed to import ({exc}); "
                              "refreshes use torch.linalg.eigh", RuntimeWarning, stacklevel=2)
    return _state["module"]


def source_digest(csrc: str) -> str:
    """A digest of the native sources in the folder csrc (each .cpp, .cu and .h file's name and
    SHA-256, in name order); setup.py and CMakeLists.txt compile the same digest into q3r._C."""
    names = sorted(n for n in os.listdir(csrc) if n.endswith(NATIVE_SUFFIXES))
    listing = ""
    for name in names:
        with open(os.path.join(csrc, name), "rb") as f:
            listing += f"{name}:{hashlib.sha256(f.read()).hexdigest()};"
    return "h" + hashlib.sha256(listing.encode()).hexdigest()[:16]


def _stale(module) -> str | None:
    """Why a q3r._C running from a source tree (an editable install, or the CMake build, puts it
    in python/q3r/) is not a build of that tree's csrc/, or None.  A `git pull` that changes
    csrc/ without a rebuild left the earlier module loaded, silently running the old code."""
    package = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join(os.path.dirname(os.path.dirname(package)), "csrc")
    if not os.path.isfile(os.path.join(csrc, "binding.cpp")):
        return None  # (an installed wheel: no sources to compare with)
    built = getattr(module, "source_digest", None)
    try:
        if built == source_digest(csrc):
            return None
    except OSError:  # (an unreadable tree: keep the module rather than fail every refresh)
        return None
    return (f"q3r._C in {package} is an earlier build: it was built from other sources than {csrc} holds now "
            f"({'no source digest recorded' if built is None else 'source digest ' + built}); rebuild it with "
            "`pip install --no-build-isolation -e .` (or the CMake build in csrc/README.md)")


def build_info() -> dict:
    """{'cpu': bool, 'cuda': bool} of the compiled module ({} when it is not there)."""
    module = load()
    return dict(module.build_info()) if module is not None else {}


def available(device: torch.device | str = "cpu") -> bool:
    """Whether the native solver runs on tensors of this device."""
    info = build_info()
    return bool(info.get(torch.device(device).type, False))


def status() -> str:
    """What `python -m q3r.info` prints about the native extension."""
    module = load()
    if module is None:
        reason = _state["error"] or "not imported"
        if "No module named" in reason:
            failed = _build_failure()
            reason = (f"not built: {failed}" if failed else
                      "not built (install with `pip install --no-build-isolation -e .` "
                      "where torch is importable at build time)")
        return f"q3r._C unavailable: {reason}; refreshes use torch.linalg.eigh"
    info = build_info()
    if info.get("cuda"):
        cuda = "CUDA part: built"
    elif torch.version.cuda is None:
        cuda = "CUDA part: not built (this torch is a CPU-only build)"
    else:
        # (every way setup.py leaves it out; its log, `pip install -v`, says which)
        cuda = ("CUDA part: not built (at build time: no nvcc / CUDA_HOME, an nvcc of another CUDA major "
                "version than torch's, Q3R_BUILD_CUDA=0, or its compile failed and the CPU part was built alone)")
    return f"q3r._C loaded; CPU part: built; {cuda}"


def _build_failure() -> str | None:
    """The reason setup.py left next to where q3r._C would be when its build failed, or None."""
    try:
        with open(os.path.join(os.path.dirname(__file__), BUILD_FAILURE_NOTE), encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def batched_eigh(G: Tensor, max_sweeps: int = DEFAULT_MAX_SWEEPS, tol: float = DEFAULT_TOL,
                 require_native: bool = False, prepared: bool = False) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of symmetric G (b, k, k) -> (evals (b, k) descending, evecs (b, k, k)).

    Runs parallel-order cyclic Jacobi (csrc/) in float32 when the extension holds a part for
    G's device; otherwise torch.linalg.eigh in G's compute dtype (or NativeUnavailable when
    require_native).  Jacobi is cheap when G is nearly diagonal, as it is after a warm start.

    The native path reads the upper triangle of each rotation's pair but rotates whole rows,
    so G is symmetrized first, and scaled by its largest entry (float32's range, and its
    subnormals, stay clear of the products); a member with a non-finite entry comes back as
    NaN (SPEC section 5), all without a host sync.  ``prepared``: the caller's G already is
    symmetric, finite (non-finite members zeroed) and scaled, as the refresh's Gram matrices
    are (q3r.randomized.sketch): those steps are skipped.  The fallback symmetrizes and NaNs
    non-finite members the same way; a G that requires grad (with grad enabled) takes it, as the
    native solver has no backward; complex G is refused.
    """
    if G.dim() != 3 or G.shape[-1] != G.shape[-2]:
        raise ValueError(f"G must have shape (batch, k, k), got {tuple(G.shape)}")
    if G.is_complex():  # (the cast to the compute dtype below would drop the imaginary part)
        raise ValueError(f"G must be real symmetric, got {G.dtype}")
    # the native solver has no backward: autograd would see only the scaling around it and
    # return a wrong gradient, so a G that autograd records takes torch.linalg.eigh
    recorded = G.requires_grad and torch.is_grad_enabled()
    if available(G.device) and G.dtype == torch.float32 and not recorded:
        if prepared:
            evals, evecs, _ = load().batched_eigh(G, int(max_sweeps), float(tol))
            return evals, evecs
        return _checked(G, lambda S: load().batched_eigh(S, int(max_sweeps), float(tol))[:2], scaled=True)
    if require_native:
        why = "G requires grad and the native solver has no backward" if recorded else status()
        raise NativeUnavailable(f"native batched_eigh is not available for {G.device} / {G.dtype}; {why}")
    G = G.to(reference.compute_dtype(G.dtype))
    if prepared:
        return _eigh_descending(G)
    # the same symmetrization and non-finite members as the native path (torch.linalg.eigh
    # reads only the lower triangle: an asymmetric G, or a NaN above the diagonal, gave
    # another answer than the native solver)
    return _checked(G, _eigh_descending, scaled=False)


def _eigh_descending(G: Tensor) -> tuple[Tensor, Tensor]:
    evals, evecs = torch.linalg.eigh(G)
    return evals.flip(-1), evecs.flip(-1)


def _checked(G: Tensor, solve, scaled: bool) -> tuple[Tensor, Tensor]:
    if G.shape[-1] == 0:
        return solve(G)
    finite = torch.isfinite(G).flatten(1).all(1)
    # (halved before the sum: G + G^T overflows float32 for entries past ~1.7e38)
    S = torch.where(finite[:, None, None], 0.5 * G + 0.5 * G.mT, torch.zeros((), dtype=G.dtype, device=G.device))
    if scaled:
        scale = S.abs().amax(dim=(1, 2)).clamp_min(torch.finfo(G.dtype).tiny)
        evals, evecs = solve((S / scale[:, None, None]).contiguous())
        evals = evals * scale[:, None]
    else:
        evals, evecs = solve(S)
    nan = torch.full((), float("nan"), dtype=G.dtype, device=G.device)
    return torch.where(finite[:, None], evals, nan), torch.where(finite[:, None, None], evecs, nan)


def batched_eigh_with_sweeps(G: Tensor, max_sweeps: int = DEFAULT_MAX_SWEEPS,
                             tol: float = DEFAULT_TOL) -> tuple[Tensor, Tensor, Tensor]:
    """Like batched_eigh with the native solver only, also returning sweeps per matrix (int32)."""
    if not available(G.device):
        raise NativeUnavailable(status())
    return load().batched_eigh(G, int(max_sweeps), float(tol))

"""Packaging, and the optional native extension q3r._C (csrc/: the batched Jacobi eigensolver).

A build-isolated install (plain `pip install .`) has no torch in its build environment, so it
is pure Python and never runs a compiler.  The extension is built when torch is importable
at build time, i.e. with

    pip install --no-build-isolation -e .

Switches (environment variables):
    Q3R_BUILD_NATIVE = auto | 1 | 0   auto (default): build if torch is importable, and skip
                                      with a warning if compiling fails; 1: build or fail;
                                      0: never build.
    Q3R_BUILD_CUDA   = auto | 1 | 0   auto (default): add the CUDA kernel when torch is a CUDA
                                      build and nvcc is found (CUDA_HOME); 1: require it;
                                      0: CPU part only.
    TORCH_CUDA_ARCH_LIST               forwarded to torch's extension builder (e.g. "9.0").
`python -m q3r.info` reports what the installed package holds.
"""

import os
import sys

from setuptools import find_packages, setup

PACKAGES = dict(
    # every subpackage of python/q3r, found rather than listed, so a new one cannot be left out
    packages=["q3r", *(f"q3r.{p}" for p in find_packages("python/q3r")), "q3r_kernels"],
    package_dir={"q3r": "python/q3r", "q3r_kernels": "q3r_kernels"},
)


def _switch(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        raise SystemExit(f"{name} must be auto, 0 or 1, got {value!r}")
    return value


def _log(msg: str) -> None:
    print(f"q3r setup: {msg}", file=sys.stderr)


def _native_extension():
    """(ext_modules, cmdclass) for q3r._C, or ([], {}) when it is not to be built."""
    native = _switch("Q3R_BUILD_NATIVE")
    if native == "0":
        _log("Q3R_BUILD_NATIVE=0: pure-Python install")
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError:
        if native == "1":
            raise SystemExit("Q3R_BUILD_NATIVE=1 but torch is not importable at build time "
                             "(use pip install --no-build-isolation)")
        _log("torch not importable at build time: pure-Python install (no q3r._C)")
        return [], {}

    want_cuda = _switch("Q3R_BUILD_CUDA")
    cuda_ok = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if want_cuda == "1" and not cuda_ok:
        raise SystemExit(f"Q3R_BUILD_CUDA=1 but torch.version.cuda={torch.version.cuda} and "
                         f"CUDA_HOME={cpp_extension.CUDA_HOME}")
    with_cuda = want_cuda != "0" and cuda_ok

    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]  # at::parallel_for over the batch
    cxx = ["-O3", *openmp]  # the C++ standard is torch's choice
    sources = ["csrc/binding.cpp", "csrc/jacobi_cpu.cpp"]
    if with_cuda:
        sources.append("csrc/jacobi_cuda.cu")
        ext = cpp_extension.CUDAExtension(
            "q3r._C", sources, define_macros=[("Q3R_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=openmp)
    else:
        ext = cpp_extension.CppExtension("q3r._C", sources, extra_compile_args=cxx, extra_link_args=openmp)
    _log(f"building q3r._C (cpu{' + cuda' if with_cuda else ''})")

    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildNative(base):
        """In auto mode a failed compile leaves a working pure-Python install."""

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as exc:  # noqa: BLE001 - any compiler failure
                if native == "1":
                    raise
                _log(f"building {extension.name} failed, continuing without it: {exc}")

    return [ext], {"build_ext": BuildNative}


ext_modules, cmdclass = _native_extension()
setup(**PACKAGES, ext_modules=ext_modules, cmdclass=cmdclass)

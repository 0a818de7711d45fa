"""Packaging, and the optional native extension q3r._C (csrc/: the batched Jacobi eigensolver).

A build-isolated install (plain `pip install .`) has no torch in its build environment, so it
is pure Python and never runs a compiler.  The extension is built when torch is importable
at build time, i.e. with

    pip install --no-build-isolation -e .

Switches (environment variables):
    Q3R_BUILD_NATIVE = auto | 1 | 0   auto (default): build if torch is importable; if the
                                      build fails, retry without the CUDA part, then skip with
                                      a warning; 1: build or fail; 0: never build. (on/off,
                                      true/false, yes/no are accepted; empty means auto.)
    Q3R_BUILD_CUDA   = auto | 1 | 0   auto (default): add the CUDA kernel when torch is a CUDA
                                      build and CUDA_HOME has an nvcc of torch's CUDA major
                                      version; 1: require it (its failure fails the install);
                                      0: CPU part only.
    TORCH_CUDA_ARCH_LIST               forwarded to torch's extension builder (e.g. "9.0");
                                      with no GPU visible it defaults to "8.0;9.0+PTX".
Q3R_BUILD_NATIVE=0, an editable or in-place build that fails, and an editable install without
torch at build time remove python/q3r/_C*.so left by an earlier build (an editable install would
load it); a failed wheel or sdist build leaves it (it is not what that package holds).
A build that fails leaves q3r/_C_build_failed.txt where the module would have gone, saying why;
`python -m q3r.info` reports what the installed package holds, and that reason.
"""

import glob
import hashlib
import os
import re
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

PACKAGES = dict(
    # every subpackage of python/q3r, found rather than listed, so a new one cannot be left out
    packages=["q3r", *(f"q3r.{p}" for p in find_packages("python/q3r")), "q3r_kernels"],
    package_dir={"q3r": "python/q3r", "q3r_kernels": "q3r_kernels"},
)


_SPELLINGS = {"": "auto", "true": "1", "on": "1", "yes": "1", "false": "0", "off": "0", "no": "0"}


def _switch(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    value = _SPELLINGS.get(value, value)  # (an empty variable is unset; on/off, true/false too)
    if value not in ("auto", "0", "1"):
        raise SystemExit(f"{name} must be auto, 0 or 1, got {value!r}")
    return value


def _log(msg: str) -> None:
    print(f"q3r setup: {msg}", file=sys.stderr)


HEADERS = ["csrc/jacobi_common.h", "csrc/jacobi_cpu.h", "csrc/jacobi_cuda.h"]  # a change rebuilds
IN_PLACE = os.path.join("python", "q3r", "_C" + sysconfig.get_config_var("EXT_SUFFIX"))
# why the last build of q3r._C failed, written where the module would have gone (and so
# packaged with it, or read in place by an editable install): q3r._native.status() reports it
FAILURE_NOTE = "_C_build_failed.txt"
# only an editable install loads IN_PLACE: an sdist or a wheel leaves a developer's build there
EDITABLE = any(command in sys.argv for command in ("editable_wheel", "develop"))


def _remove_in_place_module(why: str) -> None:
    """An editable install loads python/q3r/_C*.so: one left by an earlier build would be used
    although this build did not make it (older sources, or another torch)."""
    if os.path.exists(IN_PLACE):
        os.remove(IN_PLACE)
        _log(f"removed {IN_PLACE} left by an earlier build ({why})")
    # an earlier failure's reason is not this build's: in place, and in setuptools' default build
    # folders, whose q3r/ a wheel built from this tree would package (h51)
    for note in [os.path.join(os.path.dirname(IN_PLACE), FAILURE_NOTE),
                 *glob.glob(os.path.join("build", "lib*", "q3r", FAILURE_NOTE))]:
        if os.path.exists(note):
            os.remove(note)


def _source_digest() -> str:
    """q3r._native.source_digest("csrc") (that module imports torch and q3r): compiled into q3r._C,
    which q3r._native refuses where it runs from a tree whose csrc/ no longer matches."""
    names = sorted(n for n in os.listdir("csrc") if n.endswith((".cpp", ".cu", ".h")))
    listing = ""
    for name in names:
        with open(os.path.join("csrc", name), "rb") as f:
            listing += f"{name}:{hashlib.sha256(f.read()).hexdigest()};"
    return "h" + hashlib.sha256(listing.encode()).hexdigest()[:16]


def _nvcc_major(cuda_home: str) -> str | None:
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+)\.", out)
    return match.group(1) if match else None


def _cuda_problem(torch, cpp_extension) -> str | None:
    """Why the CUDA part cannot be built here, or None."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (torch.version.cuda=None)"
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found (CUDA_HOME unset and no nvcc on PATH)"
    nvcc = _nvcc_major(cpp_extension.CUDA_HOME)
    if nvcc != torch.version.cuda.split(".")[0]:  # (torch's builder refuses another major version)
        return f"nvcc in {cpp_extension.CUDA_HOME} is CUDA {nvcc}, torch was built with CUDA {torch.version.cuda}"
    return None


def _native_extension():
    """(ext_modules, cmdclass) for q3r._C, or ([], {}) when it is not to be built."""
    native = _switch("Q3R_BUILD_NATIVE")
    if native == "0":
        _log("Q3R_BUILD_NATIVE=0: pure-Python install")
        _remove_in_place_module("Q3R_BUILD_NATIVE=0")
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError:
        if native == "1":
            raise SystemExit("Q3R_BUILD_NATIVE=1 but torch is not importable at build time "
                             "(use pip install --no-build-isolation)")
        _log("torch not importable at build time: pure-Python install (no q3r._C)")
        if EDITABLE:  # (a build-isolated `pip install -e .` after a --no-build-isolation one)
            _remove_in_place_module("torch not importable at build time")
        return [], {}

    want_cuda = _switch("Q3R_BUILD_CUDA")
    cuda_problem = _cuda_problem(torch, cpp_extension) if want_cuda != "0" else "Q3R_BUILD_CUDA=0"
    if want_cuda == "1" and cuda_problem is not None:
        raise SystemExit(f"Q3R_BUILD_CUDA=1 but the CUDA part cannot be built: {cuda_problem}")
    if want_cuda == "auto" and cuda_problem is not None:  # (a CPU torch too: say why, nvcc or not)
        _log(f"CPU part only: {cuda_problem}")
    with_cuda = cuda_problem is None
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        # (torch derives the list from the visible GPUs and fails on a build machine without
        # one; the same default as CMakeLists.txt, with PTX for newer GPUs)
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        _log("no GPU visible and TORCH_CUDA_ARCH_LIST unset: building for 8.0;9.0+PTX")

    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]  # at::parallel_for over the batch
    # -g0: Python's own CFLAGS carry -g, which made the module 11 MB of debug info (CMake's: 230 KB)
    cxx = ["-O3", "-g0", *openmp]  # the C++ standard is torch's choice

    digest = [("Q3R_SOURCE_DIGEST", _source_digest())]

    def extension(cuda: bool):
        sources = ["csrc/binding.cpp", "csrc/jacobi_cpu.cpp"]
        if not cuda:
            return cpp_extension.CppExtension("q3r._C", sources, depends=HEADERS, define_macros=digest,
                                              extra_compile_args=cxx, extra_link_args=openmp)
        return cpp_extension.CUDAExtension(
            "q3r._C", [*sources, "csrc/jacobi_cuda.cu"], depends=HEADERS,
            define_macros=[*digest, ("Q3R_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, extra_link_args=openmp)

    _log(f"building q3r._C (cpu{' + cuda' if with_cuda else ''})")
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildNative(base):
        """In auto mode a failed build leaves a working install: without the CUDA part if that
        was what failed, else pure Python; never with a module from an earlier build."""

        def build_extensions(self):
            self._note(None)
            error = self._attempt()
            if error is None:
                return
            if native == "1" or (with_cuda and want_cuda == "1"):
                raise error
            if with_cuda:
                _log(f"building q3r._C with its CUDA part failed ({error}); building the CPU part only")
                cpu = extension(cuda=False)
                for ext in self.extensions:  # (the Extension setuptools prepared, given the CPU part's settings)
                    for attr in ("sources", "define_macros", "include_dirs", "library_dirs", "libraries",
                                 "extra_compile_args", "extra_link_args", "language"):
                        setattr(ext, attr, getattr(cpu, attr))
                error = self._attempt()
                if error is None:
                    return
            _log(f"building q3r._C failed, continuing without it: {error}")
            if self._in_place:  # (a wheel's build leaves a developer's in-tree module alone)
                _remove_in_place_module("this build failed")
            self._note(f"its build failed ({type(error).__name__}: {error}; `pip install -v` shows the compiler's output)")
            self.extensions = []  # (so an editable install does not look for its output)

        def run(self):
            # (setuptools builds into build_lib with inplace off, then copies to the sources)
            self._in_place = bool(self.inplace) or EDITABLE
            super().run()

        def _note(self, text: str | None) -> None:
            """Write (or, with None, remove) the failure note next to where q3r._C goes: the
            build directory, and the sources for an in-place or editable build."""
            dirs = {os.path.dirname(self.get_ext_fullpath("q3r._C"))}
            if getattr(self, "_in_place", False):
                dirs.add(os.path.dirname(IN_PLACE))
            for folder in dirs:
                path = os.path.join(folder, FAILURE_NOTE)
                if text is None:
                    if os.path.exists(path):
                        os.remove(path)
                    continue
                os.makedirs(folder, exist_ok=True)
                with open(path, "w", encoding="utf-8") as f:
                    f.write(" ".join(text.split()) + "\n")

        def _attempt(self) -> Exception | None:
            """One build of self.extensions; on failure the compiler is as before and no output
            of an earlier build is left where this one should have written."""
            compiler = {k: getattr(self.compiler, k) for k in ("compile", "_compile", "spawn") if hasattr(self.compiler, k)}
            src_extensions = list(self.compiler.src_extensions)
            try:
                super().build_extensions()
                return None
            except Exception as exc:  # noqa: BLE001 - any compiler or toolchain failure
                for key, value in compiler.items():  # (torch's builder wraps these per call)
                    setattr(self.compiler, key, value)
                self.compiler.src_extensions = src_extensions
                for ext in self.extensions:
                    stale = self.get_ext_fullpath(ext.name)
                    if os.path.exists(stale):
                        os.remove(stale)
                return exc

    return [extension(with_cuda)], {"build_ext": BuildNative}


ext_modules, cmdclass = _native_extension()
setup(**PACKAGES, ext_modules=ext_modules, cmdclass=cmdclass)

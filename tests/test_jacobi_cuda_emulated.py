"""The CUDA Jacobi kernel's own source (csrc/jacobi_cuda.cu), run on the CPU.

tests/cuda_emulation/ supplies the CUDA names the file uses: a CUDA thread is a std::thread,
a block's threads share its dynamic shared memory and a std::barrier, blocks run one after
another. Only two spellings are rewritten (the dynamic shared-memory declaration and the
<<<...>>> launch), so the kernel's indexing, barriers, shared / global layouts and rotations
are checked on every CI run, not only on a lent GPU. What it cannot check: warp-level timing,
real memory ordering, and speed -- the GPU tests (test_native_eigh.py) do that on a GPU.
"""

import ctypes
import pathlib
import re
import shutil
import subprocess

import pytest
import torch

from q3r import _native

from test_native_eigh import check_decomposition, make_case

ROOT = pathlib.Path(__file__).resolve().parent.parent
HERE = ROOT / "tests" / "cuda_emulation"

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the emulation")


def kernel_for_cpu(source: str) -> str:
    rewritten, n_smem = re.subn(r"extern __shared__ (?:__align__\(\d+\) )?float smem\[\];",
                                "float* smem = emu::shared_memory.data();", source)
    rewritten, n_static = re.subn(r"__shared__ (unsigned int \w+;)", r"static \1", rewritten)
    rewritten, n_launch = re.subn(r"(\w+)<<<(.*?)>>>\(", r"emu::launch(\1, \2, ", rewritten, flags=re.S)
    assert (n_smem, n_static, n_launch) == (1, 1, 1), "csrc/jacobi_cuda.cu changed: update kernel_for_cpu"
    return rewritten


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    build = tmp_path_factory.mktemp("cuda_emulation")
    (build / "kernel_for_cpu.inc").write_text(kernel_for_cpu((ROOT / "csrc" / "jacobi_cuda.cu").read_text()))
    shutil.copy(HERE / "emulate.cpp", build / "emulate.cpp")
    library = build / "libjacobi_emulated.so"
    out = subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{build}", f"-I{HERE}",
                          f"-I{ROOT / 'csrc'}", str(build / "emulate.cpp"), "-o", str(library)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    lib = ctypes.CDLL(str(library))
    lib.emulated_batched_eigh.restype = ctypes.c_int
    return lib


def run(lib, G: torch.Tensor, optin: int, sm_count: int = 132, max_sweeps=30, tol=1e-7):
    G = G.to(torch.float32).contiguous()
    batch, k = G.shape[0], G.shape[-1]
    evals, evecs = torch.empty(batch, k), torch.empty(batch, k, k)
    sweeps = torch.empty(batch, dtype=torch.int32)
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    rc = lib.emulated_batched_eigh(ptr(G), ptr(evals), ptr(evecs), ptr(sweeps), ctypes.c_long(batch), k, max_sweeps,
                                   ctypes.c_float(tol), optin, sm_count)
    assert rc == 0
    return evals, evecs, sweeps


# H100's opt-in shared memory (A and Vt in shared memory), then limits that push Vt, then A too,
# to global memory
LAYOUTS = {"both_shared": 227 * 1024, "vt_global": 4 * (6 * 12 + 24 + 24 * 24) + 64, "all_global": 256}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind,k", [("spd", 24), ("nearly_diagonal", 17), ("repeated", 12), ("indefinite", 9),
                                    ("rank_deficient", 16), ("spd", 2), ("spd", 1)])
def test_emulated_cuda_kernel_decomposes_like_the_oracle(emulated, kind, k, layout):
    G64 = make_case(kind, k, batch=3, seed=11)
    evals, evecs, sweeps = run(emulated, G64, LAYOUTS[layout])
    check_decomposition(G64, evals, evecs)
    assert int(sweeps.max()) < 30
    if _native.available("cpu"):  # the same rounds and rotations as the CPU part (rounded apart)
        w, _, s = _native.batched_eigh_with_sweeps(G64.to(torch.float32))
        torch.testing.assert_close(evals, w, rtol=1e-5, atol=1e-6 * float(G64.abs().max()))
        assert int((sweeps - s).abs().max()) <= 1


@pytest.mark.parametrize("kind,k", [("nearly_diagonal", 17), ("spd", 24), ("indefinite", 40), ("spd", 5)])
def test_several_blocks_per_matrix_give_the_one_block_results_bit_for_bit(emulated, kind, k):
    """A batch of 3 on 132 SMs: up to 4 blocks per matrix, each with its own copy of A and a
    share of Vt's columns (where they fit in shared memory); with 1 SM, one block each."""
    G64 = make_case(kind, k, batch=3, seed=5)
    for optin in LAYOUTS.values():
        one = run(emulated, G64, optin, sm_count=1)
        several = run(emulated, G64, optin, sm_count=132)
        assert all(torch.equal(a, b) for a, b in zip(one, several))
        check_decomposition(G64, *several[:2])

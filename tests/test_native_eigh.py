"""The native batched Jacobi eigensolver (csrc/) against a float64 torch.linalg.eigh oracle.

The CPU part runs the same algorithm as the CUDA kernel, so these tests check the native
numerics on every CI run; the CUDA cases skip cleanly without a GPU or a CUDA build.
"""

import pytest
import torch

from q3r import _native

needs_cpu_native = pytest.mark.skipif(not _native.available("cpu"), reason=_native.status())
needs_cuda_native = pytest.mark.skipif(
    not (torch.cuda.is_available() and _native.available("cuda")), reason="needs CUDA and the CUDA part of q3r._C"
)


def _random_orthogonal(k, batch, gen):
    return torch.linalg.qr(torch.randn(batch, k, k, dtype=torch.float64, generator=gen)).Q


def _with_spectrum(evals, gen):
    """Symmetric float64 matrices Q diag(evals) Q^T with random orthogonal Q."""
    Q = _random_orthogonal(evals.shape[-1], evals.shape[0], gen)
    return (Q * evals[:, None, :]) @ Q.mT


def make_case(kind, k, batch=3, seed=0):
    gen = torch.Generator().manual_seed(seed + 7919 * k)
    if kind == "spd":  # Wishart: a Gram matrix like the refresh's
        X = torch.randn(batch, k, k + 7, dtype=torch.float64, generator=gen)
        return X @ X.mT
    if kind == "nearly_diagonal":  # what a warm start produces: graded diagonal + small coupling
        d = torch.logspace(0, -4, k, dtype=torch.float64).expand(batch, k)
        E = 1e-3 * torch.randn(batch, k, k, dtype=torch.float64, generator=gen)
        E = E * (d[:, :, None] * d[:, None, :]).sqrt()
        return torch.diag_embed(d) + 0.5 * (E + E.mT)
    if kind == "repeated":
        base = torch.tensor([4.0, 4.0, 4.0, 1.0, 1.0, 0.25], dtype=torch.float64)
        evals = base.repeat(k // base.numel() + 1)[:k].expand(batch, k)
        return _with_spectrum(evals, gen)
    if kind == "rank_deficient":
        m = max(k // 3, 1)
        X = torch.randn(batch, k, m, dtype=torch.float64, generator=gen)
        return X @ X.mT
    if kind == "indefinite":
        A = torch.randn(batch, k, k, dtype=torch.float64, generator=gen)
        return 0.5 * (A + A.mT)
    raise ValueError(kind)


def check_decomposition(G64, evals, evecs, rtol=2e-5):
    """Eigenvalues (sorted descending), residual and orthogonality against the float64 oracle."""
    ref = torch.linalg.eigvalsh(G64).flip(-1)
    scale = G64.abs().amax(dim=(-1, -2)).clamp_min(1e-300)[:, None]
    w, E = evals.double(), evecs.double()
    k = G64.shape[-1]
    assert evals.shape == G64.shape[:2] and evecs.shape == G64.shape
    assert torch.all(w[:, :-1] >= w[:, 1:]), "eigenvalues must be sorted descending"
    assert ((w - ref).abs() / scale).max() <= rtol * k**0.5
    residual = (G64 @ E - E * w[:, None, :]).norm(dim=(-1, -2)) / (scale[:, 0] * k**0.5)
    assert residual.max() <= 10 * rtol * k**0.5
    orth = (E.mT @ E - torch.eye(k, dtype=torch.float64)).abs().max()
    assert orth <= 10 * rtol * k**0.5


KINDS = ["spd", "nearly_diagonal", "repeated", "rank_deficient", "indefinite"]


@needs_cpu_native
@pytest.mark.parametrize("k", [1, 2, 17, 169])
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_matches_float64_eigh(kind, k):
    G = make_case(kind, k, batch=3 if k < 100 else 1)
    evals, evecs = _native.batched_eigh(G.float(), require_native=True)
    check_decomposition(G.float().double(), evals, evecs)


@needs_cpu_native
def test_cpu_large_k():
    G = make_case("nearly_diagonal", 257, batch=1)
    evals, evecs = _native.batched_eigh(G.float(), require_native=True)
    check_decomposition(G.float().double(), evals, evecs)


@needs_cpu_native
def test_nearly_diagonal_converges_in_few_sweeps():
    G = make_case("nearly_diagonal", 64, batch=2)
    _, _, sweeps = _native.batched_eigh_with_sweeps(G.float())
    cold = make_case("spd", 64, batch=2)
    _, _, cold_sweeps = _native.batched_eigh_with_sweeps(cold.float())
    assert sweeps.max() <= 4 < cold_sweeps.min()


@needs_cpu_native
def test_small_eigenvalues_keep_relative_accuracy():
    """Jacobi with a relative threshold resolves a graded Gram matrix's small eigenvalues."""
    G = make_case("nearly_diagonal", 40, batch=2).float()
    evals, _ = _native.batched_eigh(G, require_native=True)
    ref = torch.linalg.eigvalsh(G.double()).flip(-1)
    assert ((evals.double() - ref).abs() / ref).max() < 1e-4


@needs_cpu_native
def test_zero_and_empty_batches():
    evals, evecs = _native.batched_eigh(torch.zeros(2, 5, 5), require_native=True)
    assert torch.equal(evals, torch.zeros(2, 5)) and torch.equal(evecs, torch.eye(5).expand(2, 5, 5))
    evals, evecs = _native.batched_eigh(torch.zeros(0, 4, 4), require_native=True)
    assert evals.shape == (0, 4) and evecs.shape == (0, 4, 4)


@needs_cpu_native
@pytest.mark.parametrize("scale", [1e-36, 1e18, 1e20, 1e30])
def test_huge_and_tiny_scales(scale):
    G64 = make_case("spd", 17) * scale
    evals, evecs = _native.batched_eigh(G64.float(), require_native=True)
    check_decomposition(G64, evals, evecs)
    if scale >= 1e18:  # the solver itself (no scaling by the wrapper): |a_pp a_qq| once overflowed
        evals, evecs = _native.batched_eigh(G64.float(), require_native=True, prepared=True)
        check_decomposition(G64, evals, evecs)


@needs_cpu_native
def test_non_finite_members_come_back_as_nan_and_the_others_exact():
    G64 = make_case("spd", 6, batch=4)
    G = G64.float()
    G[1, 0, 3] = G[1, 3, 0] = float("nan")
    G[2, 0, 0] = float("inf")
    evals, evecs = _native.batched_eigh(G, require_native=True)
    for bad in (1, 2):
        assert evals[bad].isnan().all() and evecs[bad].isnan().all()
    keep = [0, 3]
    check_decomposition(G64[keep], evals[keep], evecs[keep])


@needs_cpu_native
def test_asymmetric_input_is_symmetrized_as_on_the_fallback():
    A = torch.randn(2, 5, 5, generator=torch.Generator().manual_seed(3))
    evals, evecs = _native.batched_eigh(A, require_native=True)
    check_decomposition((0.5 * (A + A.mT)).double(), evals, evecs)


def test_low_precision_input_is_solved_in_float32_on_the_fallback():
    G = make_case("spd", 5).to(torch.bfloat16)
    evals, evecs = _native.batched_eigh(G)
    assert evals.dtype == torch.float32
    check_decomposition(G.double(), evals, evecs, rtol=1e-5)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        _native.batched_eigh(torch.zeros(3, 4))
    if _native.available("cpu"):
        with pytest.raises(RuntimeError, match="float32"):
            _native.load().batched_eigh(torch.zeros(1, 3, 3, dtype=torch.float64), 5, 1e-7)
        with pytest.raises(RuntimeError, match="k = 32769 is above the limit of 32768"):
            _native.load().batched_eigh(torch.zeros(0, 32769, 32769), 5, 1e-7)


@needs_cpu_native
def test_a_sweep_bound_past_int32_is_no_bound():
    G = make_case("spd", 9)
    evals, evecs, sweeps = _native.batched_eigh_with_sweeps(G.float(), max_sweeps=2**32)
    assert sweeps.min() > 0
    check_decomposition(G.float().double(), evals, evecs)


@needs_cpu_native
def test_an_input_autograd_records_gets_its_true_gradient():
    """The native solver has no backward (autograd saw only the scaling around it: a wrong
    gradient); such a G takes torch.linalg.eigh, and require_native says why it cannot."""
    G = make_case("spd", 5).float().requires_grad_()
    evals, _ = _native.batched_eigh(G)
    evals.sum().backward()  # d(trace)/dG = I
    assert torch.allclose(G.grad, torch.eye(5).expand(3, 5, 5), atol=1e-5)
    with pytest.raises(_native.NativeUnavailable, match="requires grad"):
        _native.batched_eigh(G, require_native=True)
    with torch.no_grad():
        _native.batched_eigh(G, require_native=True)


def test_the_fallback_symmetrizes_and_nans_as_the_native_path_does():
    """torch.linalg.eigh reads only the lower triangle; the native path symmetrizes and NaNs a
    member with a non-finite entry anywhere. Both paths must give the same answer."""
    A = torch.randn(2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    evals, evecs = _native.batched_eigh(A)  # (float64: the fallback)
    check_decomposition(0.5 * (A + A.mT), evals, evecs, rtol=1e-12)
    A[1, 0, 3] = float("nan")  # above the diagonal
    evals, evecs = _native.batched_eigh(A)
    assert evals[1].isnan().all() and evecs[1].isnan().all() and evals[0].isfinite().all()
    with pytest.raises(ValueError, match="real"):  # (the cast to float64 dropped the imaginary part)
        _native.batched_eigh(A.to(torch.complex128))


@needs_cpu_native
def test_entries_near_the_float32_maximum_do_not_overflow_the_symmetrization():
    G = torch.diag_embed(torch.tensor([[2e38, 1e38, 1e30]]))
    evals, _ = _native.batched_eigh(G, require_native=True)
    assert torch.allclose(evals, torch.tensor([[2e38, 1e38, 1e30]]), rtol=1e-6)


def test_fallback_matches_contract():
    """float64 input (or no extension) goes through torch.linalg.eigh, same output contract."""
    G = make_case("spd", 9)
    evals, evecs = _native.batched_eigh(G)
    check_decomposition(G, evals, evecs, rtol=1e-12)


def test_status_is_a_line():
    text = _native.status()
    assert text.startswith("q3r._C ") and "\n" not in text


@needs_cpu_native
def test_status_names_every_reason_a_cuda_torch_gets_the_cpu_part_alone(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(_native, "build_info", lambda: {"cpu": True, "cuda": False})
    text = _native.status()
    assert "another CUDA major version" in text and "compile failed" in text and "Q3R_BUILD_CUDA=0" in text


@needs_cuda_native
# the kernel's three memory layouts on an H100: A and Vt in shared memory (k <= 169), A only
# (k up to about 235: 170 and 171 are a warm ViT-B / GPT-2 refresh), neither (300, 1024)
@pytest.mark.parametrize("k", [1, 2, 17, 169, 170, 200, 235, 300, 1024])
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_matches_float64_eigh(kind, k):
    G = make_case(kind, k, batch=2)
    evals, evecs = _native.batched_eigh(G.float().cuda(), require_native=True)
    check_decomposition(G.float().double(), evals.cpu(), evecs.cpu())


@needs_cuda_native
@pytest.mark.parametrize("k", [169, 171, 300])  # one per memory layout (see above)
def test_cuda_agrees_with_cpu_part(k):
    G = make_case("nearly_diagonal", k, batch=4).float()
    w_cpu, _, s_cpu = _native.batched_eigh_with_sweeps(G)
    w_gpu, _, s_gpu = _native.batched_eigh_with_sweeps(G.cuda())
    assert torch.allclose(w_cpu, w_gpu.cpu(), rtol=1e-5, atol=1e-7 * float(w_cpu.abs().max()))
    assert (s_cpu - s_gpu.cpu()).abs().max() <= 1


@needs_cuda_native
@pytest.mark.parametrize("k", [17, 169])
def test_cuda_small_batches_on_several_blocks_equal_one_block_per_matrix(k):
    """A batch that leaves SMs idle gets up to 4 blocks per matrix (each with its own copy of A
    and a share of Vt); the same matrices in a batch as large as the GPU get one block each.
    The arithmetic is the same, so the results must be equal bit for bit."""
    G = make_case("nearly_diagonal", k, batch=3).float().cuda()
    sms = torch.cuda.get_device_properties(G.device).multi_processor_count
    filler = make_case("spd", k, batch=sms, seed=1).float().cuda()
    few = _native.batched_eigh_with_sweeps(G)
    many = _native.batched_eigh_with_sweeps(torch.cat([G, filler]))
    for a, b in zip(few, many):
        assert torch.equal(a, b[:3])


def test_a_native_extension_that_fails_to_import_warns_once_and_a_missing_one_does_not(monkeypatch):
    # a build that exists but does not load (built against another torch) is worth a warning;
    # a plain install without the extension is not: both take the torch.linalg.eigh path
    import importlib
    import warnings

    for message, warns in [("undefined symbol: _ZN3c10", True), ("No module named 'q3r._C'", False)]:
        monkeypatch.setattr(_native, "_state", {})

        def fail(name, message=message):
            raise ImportError(message)

        monkeypatch.setattr(importlib, "import_module", fail)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _native.load() is None and _native.load() is None  # (memoized: tried once)
        assert [str(w.message).startswith("q3r: native extension q3r._C failed to import") for w in caught] == (
            [True] if warns else [])
        assert not _native.available("cpu")


def test_status_says_why_a_failed_build_left_no_module(monkeypatch, tmp_path):
    """After a build that failed (setup.py leaves its reason next to where q3r._C would be),
    status() says the build failed, not to run the install that was just run."""
    import importlib

    monkeypatch.setattr(_native, "_state", {})
    monkeypatch.setattr(importlib, "import_module", lambda name: (_ for _ in ()).throw(
        ImportError("No module named 'q3r._C'")))
    monkeypatch.setattr(_native, "__file__", str(tmp_path / "_native.py"))
    assert "install with" in _native.status()
    (tmp_path / _native.BUILD_FAILURE_NOTE).write_text("its build failed (CompileError: no c++)\n")
    text = _native.status()
    assert "not built: its build failed (CompileError: no c++)" in text and "\n" not in text


def test_a_module_built_from_other_sources_than_the_trees_csrc_is_not_used(monkeypatch, tmp_path):
    """A q3r._C in a source tree's python/q3r/ (an editable install, the CMake build) left from
    before a `git pull` that changed csrc/ was loaded, and status() said 'loaded': the old
    solver ran (one without the max_sweeps fix returned G's diagonal for max_sweeps=2**32)."""
    import importlib
    import types
    import warnings

    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "binding.cpp").write_text("// this tree's binding\n")
    (tmp_path / "csrc" / "README.md").write_text("not a source\n")
    monkeypatch.setattr(_native, "__file__", str(tmp_path / "python" / "q3r" / "_native.py"))
    current = _native.source_digest(str(tmp_path / "csrc"))

    def module(digest):
        fake = types.SimpleNamespace(build_info=lambda: {"cpu": True, "cuda": False})
        if digest is not None:  # (a module built before the digest was recorded has none)
            fake.source_digest = digest
        return fake

    for digest, used in [(None, False), ("h0123456789abcdef", False), (current, True)]:
        monkeypatch.setattr(_native, "_state", {})
        monkeypatch.setattr(importlib, "import_module", lambda name, m=module(digest): m)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert (_native.load() is not None) == used and _native.available("cpu") == used
        assert len(caught) == (0 if used else 1)
        if not used:
            assert "is an earlier build" in _native.status() and "rebuild it" in _native.status()
    # an installed package has no csrc/ beside it: nothing to compare with
    (tmp_path / "csrc" / "binding.cpp").unlink()
    monkeypatch.setattr(_native, "_state", {})
    monkeypatch.setattr(importlib, "import_module", lambda name: module(None))
    assert _native.load() is not None


def test_a_module_built_in_this_tree_is_a_build_of_its_sources():
    """setup.py and CMakeLists.txt compile the digest q3r._native computes: a module they built
    here is used (where csrc/ was edited since, this says to rebuild)."""
    import glob
    import os

    package = os.path.dirname(os.path.abspath(_native.__file__))
    tree = os.path.dirname(os.path.dirname(package))
    if not (glob.glob(os.path.join(package, "_C.*")) and os.path.isfile(os.path.join(tree, "csrc", "binding.cpp"))):
        pytest.skip("no q3r._C built in a source tree")
    assert _native.load() is not None, _native.status()

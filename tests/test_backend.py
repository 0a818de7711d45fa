"""Backend choice: the Q3R_BACKEND override, errors for unavailable backends, lazy imports."""

import os
import subprocess
import sys

import pytest
import torch

from q3r import _backend, ops, reference

from _kernel_utils import DEVICE, K, factors, tile_settings


@pytest.fixture(autouse=True)
def fresh_probes():
    _backend.reset()
    yield
    _backend.reset()


def test_import_q3r_does_not_import_triton_or_touch_cuda():
    code = ("import sys, q3r, torch; assert 'triton' not in sys.modules, 'triton imported'; "
            "assert not torch.cuda.is_initialized(), 'CUDA initialized'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "Q3R_BACKEND": ""})


def test_auto_picks_reference_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("Q3R_BACKEND", raising=False)
    assert _backend.backend_for("cpu") == "reference"


def test_forced_reference_and_invalid_value(monkeypatch):
    monkeypatch.setenv("Q3R_BACKEND", "reference")
    assert _backend.backend_for(DEVICE) == "reference"
    monkeypatch.setenv("Q3R_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match=r"Q3R_BACKEND must be one of .*, or 'auto' or unset .*got 'cuda-please'"):
        _backend.backend_for(DEVICE)
    monkeypatch.setenv("Q3R_BACKEND", "auto")  # (accepted, as the message says)
    assert _backend.requested() is None


def test_forced_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("Q3R_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(_backend.BackendUnavailableError, match="TRITON_INTERPRET"):
        _backend.backend_for("cpu")


def test_cuda_tensors_under_the_interpreter_take_the_reference_path(monkeypatch):
    """The interpreter copies a kernel's tensor arguments to the host, but the kernels reach
    their blocks through raw addresses in a table: CUDA addresses read on the host crashed the
    process. A GPU is simulated by the probe; automatic dispatch falls back, forcing is an error."""
    monkeypatch.setattr(_backend, "_cuda_probe", lambda: (True, "CUDA device with a triton driver"))
    monkeypatch.setattr(_backend, "_triton_import", lambda: (True, "triton"))
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.delenv("Q3R_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _backend.backend_for("cuda") == "triton"  # (the simulated GPU, compiled kernels)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.backend_for("cuda") == "reference"
    assert _backend.backend_for("cpu") == "reference"  # (automatic dispatch keeps CPU tensors there)
    monkeypatch.setenv("Q3R_BACKEND", "triton")
    assert _backend.backend_for("cpu") == "triton"
    with pytest.raises(_backend.BackendUnavailableError, match="TRITON_INTERPRET=1.*cpu tensors only"):
        _backend.backend_for("cuda")


def test_forced_triton_rejects_float64(monkeypatch):
    monkeypatch.setenv("Q3R_BACKEND", "triton")
    with pytest.raises(_backend.BackendUnavailableError, match="float64"):
        _backend.backend_for(DEVICE, torch.float64)


def test_missing_triton_falls_back_with_one_log_line(monkeypatch, caplog):
    monkeypatch.delenv("Q3R_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_triton_import", lambda: (False, "no triton here"))
    with caplog.at_level("WARNING", logger="q3r"):
        assert _backend.backend_for("cuda") == "reference"
        assert _backend.backend_for("cuda") == "reference"
    assert [r.getMessage() for r in caplog.records].count(
        "q3r: Triton kernels unavailable (no triton here); using the reference path") == 1
    monkeypatch.setenv("Q3R_BACKEND", "triton")
    with pytest.raises(_backend.BackendUnavailableError, match="no triton here"):
        _backend.backend_for("cuda")


@pytest.mark.skipif(K is None, reason="triton not importable")
def test_ops_dispatch_to_kernels_when_forced(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(21, 35, generator=gen).to(DEVICE)
    U, V, d = factors(21, 35, 6, gen)
    monkeypatch.setenv("Q3R_BACKEND", "triton")
    with tile_settings(True):
        A, B = ops.project(X, U, V)
        R = ops.apply_reweighting(X, U, V, d)
    A_ref, B_ref = reference.project(X, U, V)
    torch.testing.assert_close(A, A_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(B, B_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(R, reference.apply_reweighting(X, U, V, d), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        ops.project(X, V, U)


def test_info_module_runs():
    out = subprocess.run([sys.executable, "-m", "q3r.info"], check=True, capture_output=True, text=True).stdout
    assert "torch" in out and "Triton kernels on cuda tensors" in out and "native extension" in out


def test_info_module_takes_help_and_refuses_unknown_arguments():
    # (--help printed the report, and --bogus was ignored, as `q3r info` does not)
    out = subprocess.run([sys.executable, "-m", "q3r.info", "--help"], check=True, capture_output=True, text=True).stdout
    assert "usage: python -m q3r.info" in out and "native extension:" not in out
    bad = subprocess.run([sys.executable, "-m", "q3r.info", "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unrecognized arguments: --bogus" in bad.stderr


def test_fp32_dot_precision_follows_torch_matmul_precision(monkeypatch, fp32_precision_reset):
    monkeypatch.setattr(K.CONFIG, "precision", "auto")
    torch.set_float32_matmul_precision("highest")
    assert K.gpu_dot_precision() == "tf32x3"
    torch.set_float32_matmul_precision("high")  # the user allowed TF32 for fp32 matmuls
    assert K.gpu_dot_precision() == "tf32"
    torch.set_float32_matmul_precision("medium")
    assert K.gpu_dot_precision() == "tf32"
    monkeypatch.setattr(K.CONFIG, "precision", "tf32x3")  # an explicit setting wins
    assert K.gpu_dot_precision() == "tf32x3"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert K.dot_precision() == "ieee"  # the interpreter's dots are exact fp32 anyway
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert K.dot_precision() == "tf32x3"


@pytest.mark.skipif(not hasattr(torch._C, "_set_fp32_precision_setter"), reason="torch < 2.9: no per-backend setting")
def test_fp32_dot_precision_follows_the_per_backend_setting(monkeypatch, fp32_precision_reset):
    # the API torch recommends now; after it, torch.get_float32_matmul_precision() raises
    monkeypatch.setattr(K.CONFIG, "precision", "auto")
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    assert K.gpu_dot_precision() == "tf32"
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    assert K.gpu_dot_precision() == "tf32x3"
    torch.backends.cuda.matmul.fp32_precision = "none"  # inherits the generic setting
    torch.backends.fp32_precision = "tf32"
    assert K.gpu_dot_precision() == "tf32"
    torch.backends.fp32_precision = "none"
    assert K.gpu_dot_precision() == "tf32x3"
    torch.backends.cuda.matmul.allow_tf32 = True  # the older boolean switch
    assert K.gpu_dot_precision() == "tf32"


def test_bad_dot_precision_names_the_setting(monkeypatch):
    monkeypatch.setattr(K.CONFIG, "precision", "fp8")
    with pytest.raises(ValueError, match="CONFIG.precision"):
        K.dot_precision()


def test_cached_fused_plans_are_keyed_by_the_resolved_precision(monkeypatch, fp32_precision_reset):
    # a plan built under one precision must not serve a step after the user changes it
    from q3r.optim.functional import ParamWork

    monkeypatch.setattr(K.CONFIG, "precision", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # resolve as on a GPU; nothing is launched here
    W = torch.randn(6, 5)
    U, V, d = factors(6, 5, 2, torch.Generator().manual_seed(0), device="cpu")
    work = ParamWork(W, torch.randn(6, 5), torch.zeros(6, 5), torch.zeros(6, 5), torch.zeros(()),
                     1e-3, 0.9, 0.999, 1e-8, 0.0, lmbda=0.5, operators=[(U, V, d)])
    torch.set_float32_matmul_precision("highest")
    key_highest = ops._layout_key([work])
    torch.set_float32_matmul_precision("high")
    assert ops._layout_key([work]) != key_highest


@pytest.mark.skipif(K is None, reason="triton not importable")
def test_a_fused_step_of_works_the_kernels_all_reject_leaves_them_to_the_reference(monkeypatch):
    """A channels_last conv weight (4-D, not contiguous) is the only parameter not being
    refreshed at a refresh step: the fused step takes none of it and must hand it back
    untouched (it raised on an empty list of step counters)."""
    from q3r.optim import functional as F

    monkeypatch.setenv("Q3R_BACKEND", "triton")
    p = torch.randn(4, 3, 3, 3).to(DEVICE).to(memory_format=torch.channels_last)
    work = F.ParamWork(p, torch.randn_like(p), torch.zeros_like(p), torch.zeros_like(p), torch.tensor(0.0),
                       1e-2, 0.9, 0.999, 1e-8, 0.0)
    with tile_settings(True):
        assert ops.adamq3r_fused_([work]) == [work]
    assert float(work.step) == 0.0
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 16, bias=False)).to(DEVICE).to(memory_format=torch.channels_last)
    import q3r

    opt = q3r.AdamQ3R(q3r.param_groups(model, q3r.find_targets(model, ["2"], target_rank=2), lmbda=0.1, steps=5), lr=1e-3)
    x = torch.randn(2, 3, 8, 8).to(DEVICE).to(memory_format=torch.channels_last)
    with tile_settings(True):
        for _ in range(2):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    assert int(opt.state[model[0].weight]["step"]) == 2


@pytest.mark.skipif(K is None, reason="triton not importable")
@pytest.mark.parametrize("eps", [2.5, float("inf")])
def test_the_kernels_take_eps_as_a_number_like_the_reference(eps, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    U, V, _ = factors(16, 20, 4, gen)
    sigma, W = torch.tensor([5.0, 3.0, 2.0, 1.0]).to(DEVICE), torch.randn(16, 20, generator=gen).to(DEVICE)
    out = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("Q3R_BACKEND", backend)
        out[backend] = torch.zeros_like(W)
        with tile_settings(True):
            ops.add_reweighting_([out[backend]], [W], [(U, V, sigma, eps)], 1.0)
    torch.testing.assert_close(out["triton"], out["reference"], rtol=1e-5, atol=1e-5)


def test_automatic_dispatch_keeps_wide_or_mixed_factors_off_the_kernels_in_every_op(monkeypatch):
    """Q3R_TRITON_MAX_WIDTH bounds project and apply_reweighting too, not only the grouped
    paths, and float64 V keeps a product on the reference path (the kernels take float32)."""
    monkeypatch.setattr(ops, "backend_for", lambda device, dtype: "triton")  # as on a GPU, automatic
    monkeypatch.setenv("Q3R_TRITON_MAX_WIDTH", "3")
    monkeypatch.setattr(ops, "_kernels", lambda: pytest.fail("the kernels were called"))
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(12, 10, generator=gen)
    U, V, d = factors(12, 10, 5, gen)
    torch.testing.assert_close(ops.project(X, U, V)[0], reference.project(X, U, V)[0])
    torch.testing.assert_close(ops.apply_reweighting(X, U, V, d), reference.apply_reweighting(X, U, V, d))
    U2, V2, d2 = factors(12, 10, 2, gen)
    torch.testing.assert_close(ops.apply_reweighting(X, U2, V2.double(), d2),
                               reference.apply_reweighting(X, U2, V2.double(), d2))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_add_reweighting_into_outs_that_alias_the_weights(backend, monkeypatch):
    """An out that is another view of a weight (its transpose; the next block's weight) must
    not be read half-written: every block sees the weights as they were. An expanded out is
    refused before anything is written."""
    if backend == "triton" and K is None:
        pytest.skip("Triton kernels unavailable here")
    monkeypatch.setenv("Q3R_BACKEND", backend)
    gen = torch.Generator().manual_seed(6)
    W0, W1, W2, W3 = (torch.randn(20, 20, generator=gen).to(DEVICE) for _ in range(4))
    U, V, d = factors(20, 20, 6, gen)
    R = lambda X: reference.apply_reweighting(X, U, V, d)  # noqa: E731
    expected_t = W0.t() + 0.5 * R(W0)
    expected = (W2 + 0.5 * R(W1), W3 + 0.5 * R(W2))
    with tile_settings(True):
        ops.add_reweighting_([W0.t()], [W0], [(U, V, d)], 0.5)  # into the weight's transpose
        ops.add_reweighting_([W2, W3], [W1, W2], [(U, V, d)] * 2, 0.5)  # block 0 writes block 1's weight
    torch.testing.assert_close(W0.t(), expected_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(W2, expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(W3, expected[1], rtol=1e-5, atol=1e-5)
    expanded = torch.zeros(1, 20, device=DEVICE).expand(20, 20)
    keep = W1.clone()
    with pytest.raises(ValueError, match=r"outs\[1\] has internal overlap"):
        ops.add_reweighting_([W1, expanded], [W3, W3], [(U, V, d)] * 2, 1.0)
    assert torch.equal(W1, keep)


def test_a_bad_width_limit_is_an_error_wherever_automatic_dispatch_reads_it(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(12, 10, generator=gen)
    U, V, d = factors(12, 10, 5, gen)
    for value in ("abc", "-5"):
        monkeypatch.setenv("Q3R_TRITON_MAX_WIDTH", value)
        with pytest.raises(ValueError, match="Q3R_TRITON_MAX_WIDTH must be an int >= 0"):
            ops.apply_reweighting(X, U, V, d)  # (on CPU: the reference path, but the setting is still read)
        with pytest.raises(ValueError, match="Q3R_TRITON_MAX_WIDTH must be an int >= 0"):
            ops.add_reweighting_([X.clone()], [X], [(U, V, d)], 1.0)


def test_forced_triton_refuses_what_the_kernels_cannot_take_instead_of_falling_back(monkeypatch):
    if K is None:
        pytest.skip("Triton kernels unavailable here")
    monkeypatch.setenv("Q3R_BACKEND", "triton")
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(12, 10, generator=gen).to(DEVICE)
    U, V, d = factors(12, 10, 5, gen)
    with pytest.raises(_backend.BackendUnavailableError, match="float32 factors"):
        ops.apply_reweighting(X, U.double(), V.double(), d)
    with pytest.raises(_backend.BackendUnavailableError, match="float32 factors"):
        ops.project(X, U.double(), V.double())
    out = X.double()
    with pytest.raises(_backend.BackendUnavailableError, match="block 0 does not fit the kernels"):
        ops.add_reweighting_([out], [X], [(U, V, d)], 1.0)
    assert torch.equal(out, X.double())
    with pytest.raises(_backend.BackendUnavailableError, match="not meta"):
        ops.apply_reweighting(X.to("meta"), U.to("meta"), V.to("meta"), d.to("meta"))


def test_info_says_when_a_forced_triton_cannot_run(monkeypatch):
    from q3r import info

    monkeypatch.setenv("Q3R_BACKEND", "triton")
    monkeypatch.setattr(_backend, "triton_status", lambda device_type="cuda": (False, "no GPU here"))
    assert "cannot run here" in info.report()
    monkeypatch.setattr(_backend, "triton_status", lambda device_type="cuda": (True, "fine"))
    assert "cannot run here" not in info.report()


@pytest.mark.skipif(K is None, reason="triton not importable")
def test_forced_triton_refuses_a_fused_step_whose_factors_the_kernels_cannot_take(monkeypatch):
    """The fused AdamQ3R op, like project / apply_reweighting / add_reweighting_, raises under
    Q3R_BACKEND=triton for float64 factors (or eps not a float32 tensor) instead of handing the
    work back to the reference path unasked; nothing is updated."""
    from q3r.optim import functional as F

    monkeypatch.setenv("Q3R_BACKEND", "triton")
    gen = torch.Generator().manual_seed(3)
    U, V, d = factors(20, 30, 4, gen)
    sigma = torch.linspace(3.0, 0.1, 4).to(DEVICE)
    for op in [(U.double(), V.double(), d.double()), (U, V, sigma, 1.0), (U, V, sigma, torch.tensor(1.0, dtype=torch.float64))]:
        p = torch.randn(20, 30, generator=gen).to(DEVICE)
        keep = p.clone()
        work = F.ParamWork(p, torch.randn_like(p), torch.zeros_like(p), torch.zeros_like(p), torch.tensor(0.0),
                           1e-2, 0.9, 0.999, 1e-8, 0.0, lmbda=0.1, operators=[op])
        with tile_settings(True), pytest.raises(_backend.BackendUnavailableError, match="float32 factors"):
            ops.adamq3r_fused_([work])
        assert torch.equal(p, keep) and float(work.step) == 0.0
    monkeypatch.delenv("Q3R_BACKEND")  # automatic: the reference path takes it, as before
    assert ops.adamq3r_fused_([work]) == [work]


def test_info_blames_q3r_kernels_not_triton_when_only_the_kernels_fail_to_import(monkeypatch):
    pytest.importorskip("triton")
    from q3r import info

    monkeypatch.setitem(sys.modules, "q3r_kernels", None)  # import of q3r_kernels fails, triton's works
    lines = info.report().splitlines()
    assert not any(line.startswith("triton: not importable") for line in lines), lines
    assert any(line.startswith("q3r_kernels: not importable") for line in lines), lines


@pytest.mark.skipif(K is None, reason="triton not importable")
def test_automatic_dispatch_leaves_a_fused_step_with_another_d_to_the_reference(monkeypatch):
    """A (U, V, d) operator whose d is float64, or a strided view, reached the kernels' plan,
    which raised ValueError (it reads d as contiguous float32): automatic dispatch now hands the
    work to the reference path, as add_reweighting_ converts such a d, and forcing refuses it."""
    from q3r.optim import functional as F

    monkeypatch.setattr(ops, "backend_for", lambda device, dtype: "triton")  # as on a GPU, automatic
    monkeypatch.delenv("Q3R_BACKEND", raising=False)
    gen = torch.Generator().manual_seed(4)
    U, V, d = factors(20, 30, 4, gen)
    for bad in (d.double(), torch.stack([d, d], 1)[:, 0]):
        p = torch.randn(20, 30, generator=gen).to(DEVICE)
        work = F.ParamWork(p, torch.randn_like(p), torch.zeros_like(p), torch.zeros_like(p), torch.tensor(0.0),
                           1e-2, 0.9, 0.999, 1e-8, 0.0, lmbda=0.1, operators=[(U, V, bad)])
        with tile_settings(True):
            assert ops.adamq3r_fused_([work]) == [work]
        monkeypatch.setenv("Q3R_BACKEND", "triton")
        with tile_settings(True), pytest.raises(_backend.BackendUnavailableError, match="d or sigma as contiguous"):
            ops.adamq3r_fused_([work])
        monkeypatch.delenv("Q3R_BACKEND")

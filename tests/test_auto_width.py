"""Automatic dispatch keeps wide factors on the reference path (the kernels lose there)."""

import pytest
import torch

from q3r import ops, reference
from q3r.optim.functional import ParamWork


def _work(width: int) -> ParamWork:
    d1, d2 = width + 44, width + 54  # (taller than wide factors: QR keeps all their columns)
    p = torch.randn(d1, d2)
    U, V = torch.linalg.qr(torch.randn(d1, width))[0], torch.linalg.qr(torch.randn(d2, width))[0]
    sigma, eps = torch.linspace(5, 2, width), torch.tensor(1.0)
    return ParamWork(p, torch.randn_like(p), torch.zeros_like(p), torch.zeros_like(p), torch.tensor(0.0),
                     1e-3, 0.9, 0.999, 1e-8, 0.0, lmbda=0.1, operators=[(U, V, sigma, eps)])


@pytest.fixture
def triton_everywhere(monkeypatch):
    """Pretend the Triton backend is chosen, and fail loudly if a kernel is reached."""
    monkeypatch.setattr(ops, "backend_for", lambda device, dtype=None: "triton")

    def no_kernels():
        raise AssertionError("the kernels were called")

    monkeypatch.setattr(ops, "_kernels", no_kernels)
    monkeypatch.delenv("Q3R_BACKEND", raising=False)


def test_wide_factors_stay_on_the_reference_path(triton_everywhere, monkeypatch):
    work = _work(ops.AUTO_MAX_WIDTH_DEFAULT + 1)
    assert work.operators[0][0].shape[-1] == ops.AUTO_MAX_WIDTH_DEFAULT + 1
    assert ops.adamq3r_fused_([work]) == [work]
    out = torch.zeros_like(work.param)
    ops.add_reweighting_([out], [work.param], work.operators, alpha=0.5)  # reference: no kernel call
    U, V, sigma, eps = work.operators[0]
    from q3r import reference

    expected = 0.5 * reference.apply_reweighting(work.param, U, V, reference.reweighting_coefficients(sigma, eps))
    torch.testing.assert_close(out, expected)
    monkeypatch.setenv("Q3R_TRITON_MAX_WIDTH", "1000")
    with pytest.raises(AssertionError, match="kernels were called"):
        ops.adamq3r_fused_([work])


def test_narrow_factors_and_forced_triton_go_to_the_kernels(triton_everywhere, monkeypatch):
    with pytest.raises(AssertionError, match="kernels were called"):
        ops.adamq3r_fused_([_work(16)])
    monkeypatch.setenv("Q3R_BACKEND", "triton")
    with pytest.raises(AssertionError, match="kernels were called"):
        ops.adamq3r_fused_([_work(ops.AUTO_MAX_WIDTH_DEFAULT + 1)])


def test_factors_not_all_float32_stay_on_the_reference_path(triton_everywhere):
    """A V of another dtype than float32 is no more the kernels' than such a U: automatic
    dispatch keeps it on the reference path, as project and apply_reweighting do (the
    kernels refused it with a TypeError)."""
    work = _work(16)
    U, V, sigma, eps = work.operators[0]
    work.operators = [(U, V.double(), sigma, eps)]
    assert ops.adamq3r_fused_([work]) == [work]
    out = torch.zeros_like(work.param)
    ops.add_reweighting_([out], [work.param], work.operators, alpha=0.5)
    d = reference.reweighting_coefficients(sigma, eps)
    torch.testing.assert_close(out, 0.5 * reference.apply_reweighting(work.param, U, V, d))


def test_bad_width_setting(monkeypatch):
    monkeypatch.setenv("Q3R_TRITON_MAX_WIDTH", "wide")
    with pytest.raises(ValueError, match="Q3R_TRITON_MAX_WIDTH"):
        ops.auto_max_width()

"""q3r.ops refuses bad arguments by name before changing any output, and the diagnostics'
penalty is lambda <W, R(W)> (gaps a mutation review found)."""

import pytest
import torch

from q3r import ops
from q3r.diagnostics import slice_diagnostics
from q3r.reference import penalty_value
from q3r.refresh import SliceConfig, new_slice_state, operator_of, refresh_slices_


def _factors(gen):
    U = torch.linalg.qr(torch.randn(8, 3, generator=gen))[0]
    V = torch.linalg.qr(torch.randn(6, 3, generator=gen))[0]
    return U, V, torch.full((3,), -0.5)


def test_add_reweighting_refuses_mismatched_lists_and_out_shapes_before_any_change():
    gen = torch.Generator().manual_seed(0)
    W, f = torch.randn(8, 6, generator=gen), _factors(gen)
    outs = [torch.zeros(8, 6), torch.zeros(8, 6)]
    with pytest.raises(ValueError):  # (zip would drop outs[1] silently)
        ops.add_reweighting_(outs, [W], [f], 1.0)
    for bad in (torch.zeros(2, 8, 6), torch.zeros(6, 8)):  # (broadcast, or raised after outs[0] changed)
        outs = [torch.zeros(8, 6), bad]
        with pytest.raises(ValueError):
            ops.add_reweighting_(outs, [W, W], [f, f], 1.0)
        assert all(bool((o == 0).all()) for o in outs)
    outs = [torch.zeros(8, 6)]
    ops.add_reweighting_(outs, [W], [f], 1.0)  # (and the well-formed call works)
    assert outs[0].abs().sum() > 0


def test_project_and_apply_refuse_factors_of_different_widths():
    gen = torch.Generator().manual_seed(1)
    X, U, V = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen), torch.randn(6, 4, generator=gen)
    with pytest.raises(ValueError):
        ops.project(X, U, V)
    with pytest.raises(ValueError):
        ops.apply_reweighting(X, U, V, torch.ones(3))


def test_a_triton_max_width_of_zero_is_accepted(monkeypatch):
    monkeypatch.setenv("Q3R_TRITON_MAX_WIDTH", "0")
    assert ops.auto_max_width() == 0
    monkeypatch.setenv("Q3R_TRITON_MAX_WIDTH", "-1")
    with pytest.raises(ValueError, match="Q3R_TRITON_MAX_WIDTH"):
        ops.auto_max_width()


def test_the_diagnostics_penalty_scales_with_lambda():
    torch.manual_seed(0)
    W = torch.randn(20, 12)
    state = new_slice_state(20, 12)
    refresh_slices_([W], [state], [SliceConfig("t", 3)])
    half, whole = slice_diagnostics(W, state, 3, 0.5)["penalty"], slice_diagnostics(W, state, 3, 1.0)["penalty"]
    assert whole > 0 and abs(half - whole / 2) <= 1e-6 * whole


def test_the_diagnostics_penalty_is_never_below_zero():
    """<W, R(W)> = sum min(sigma_i, eps)^2 (SPEC fact 5): about 0 for a rank-3 W with eps 1e-20.
    Its closed form cancels ||W||^2 (about 1e7 here) and lands a few ulp below 0 for this
    seed; diagnostics report 0, not a negative penalty (h38 saw -6e-06)."""
    gen = torch.Generator().manual_seed(0)
    W = (torch.randn(40, 3, generator=gen) @ torch.randn(3, 30, generator=gen)) * 100
    state = new_slice_state(40, 30)
    refresh_slices_([W], [state], [SliceConfig("t", 5, schedule="constant", eps_value=1e-20)])
    assert float(penalty_value(W, *operator_of(state))) < 0  # (the premise: the closed form's rounding)
    assert slice_diagnostics(W, state, 5, 1.0)["penalty"] == 0.0


def test_factors_on_another_device_are_refused_by_name():
    # (meta tensors stand in for another device on a CPU-only machine)
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(8, 6, generator=gen)
    U, V, d = _factors(gen)
    for name, args in (("U", (U.to("meta"), V, d)), ("V", (U, V.to("meta"), d)), ("d", (U, V, d.to("meta")))):
        with pytest.raises(ValueError, match=f"{name} is on meta but X is on cpu"):
            ops.apply_reweighting(X, *args)


def test_automatic_dispatch_takes_factors_exactly_as_wide_as_the_limit():
    assert ops._width_ok([(torch.zeros(4, 7),), (torch.zeros(5, 3),)], 7)
    assert not ops._width_ok([(torch.zeros(4, 8),)], 7)
    assert ops._width_ok([(torch.zeros(4, 4096),)], None)  # (forced: no limit)

"""q3r.ops refuses bad arguments by name before changing any output, and the diagnostics'
penalty is lambda <W, R(W)> (gaps a mutation review found)."""

import pytest
import torch

from q3r import ops, reference
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


@pytest.mark.parametrize("bad", ["U", "V"])
def test_project_and_apply_refuse_factors_with_the_wrong_number_of_rows(bad):
    """U must have d1 rows and V d2: a ValueError naming the shapes, not a matmul's RuntimeError
    (or, for a square X, a silently wrong product)."""
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(8, 6, generator=gen)
    U, V = torch.randn(8, 3, generator=gen), torch.randn(6, 3, generator=gen)
    if bad == "U":
        U = torch.randn(7, 3, generator=gen)
    else:
        V = torch.randn(5, 3, generator=gen)
    with pytest.raises(ValueError, match="do not fit"):
        ops.project(X, U, V)
    with pytest.raises(ValueError, match="do not fit"):
        ops.apply_reweighting(X, U, V, torch.full((3,), -0.5))


@pytest.mark.parametrize("width", [1, 4])
def test_apply_refuses_a_d_that_does_not_fit_the_factors(width):
    """d must have one entry per column of U and V: one of length 1 would broadcast silently."""
    gen = torch.Generator().manual_seed(3)
    X, (U, V, _) = torch.randn(8, 6, generator=gen), _factors(gen)
    with pytest.raises(ValueError, match="does not fit factors"):
        ops.apply_reweighting(X, U, V, torch.full((width,), -0.5))


def test_add_reweighting_refuses_fewer_factors_than_weights_before_any_change():
    gen = torch.Generator().manual_seed(4)
    W, f = torch.randn(8, 6, generator=gen), _factors(gen)
    outs = [torch.zeros(8, 6), torch.zeros(8, 6)]
    with pytest.raises(ValueError, match="as many outs, weights and factors"):  # (zip would drop block 1)
        ops.add_reweighting_(outs, [W, W], [f], 1.0)
    assert all(bool((o == 0).all()) for o in outs)


def test_add_reweighting_refuses_an_eps_that_does_not_fit_sigma_before_any_change():
    """Factors as (U, V, sigma, eps): an eps of shape (2,) for one target's sigma (3,) would
    broadcast into two operators."""
    gen = torch.Generator().manual_seed(5)
    W, (U, V, _) = torch.randn(8, 6, generator=gen), _factors(gen)
    sigma = torch.tensor([3.0, 2.0, 1.0])
    outs = [torch.zeros(8, 6), torch.zeros(8, 6)]
    with pytest.raises(ValueError, match="eps of shape"):
        ops.add_reweighting_(outs, [W, W], [(U, V, sigma, torch.tensor(1.5)), (U, V, sigma, torch.tensor([1.5, 2.5]))], 1.0)
    assert all(bool((o == 0).all()) for o in outs)


def test_add_reweighting_with_batched_factors_adds_alpha_times_R():
    """Factors with a batch dimension take add_reweighting_'s other path (R written out)."""
    gen = torch.Generator().manual_seed(6)
    W = torch.randn(2, 8, 6, generator=gen)
    U = torch.linalg.qr(torch.randn(2, 8, 3, generator=gen))[0]
    V = torch.linalg.qr(torch.randn(2, 6, 3, generator=gen))[0]
    d = -torch.rand(2, 3, generator=gen) * 0.9
    out = torch.randn(2, 8, 6, generator=gen)
    expected = out + 0.3 * reference.apply_reweighting(W, U, V, d)
    ops.add_reweighting_([out], [W], [(U, V, d)], 0.3)
    torch.testing.assert_close(out, expected)


def test_add_reweighting_reads_weights_another_block_writes_as_they_were(monkeypatch):
    """An out that is another block's weight (blocks swapped), or a weight's own storage in
    another layout (its transpose), is written while that weight is still read: the result is
    that of the weights as they were (several row blocks, so a block reads rows already written)."""
    monkeypatch.setitem(reference.ROW_BLOCK_ELEMENTS, "cpu", 12)
    gen = torch.Generator().manual_seed(7)
    W0, W1 = torch.randn(6, 6, generator=gen), torch.randn(6, 6, generator=gen)
    f0 = (torch.linalg.qr(torch.randn(6, 3, generator=gen))[0], torch.linalg.qr(torch.randn(6, 3, generator=gen))[0],
          torch.tensor([-0.5, -0.3, -0.1]))
    f1 = (f0[1], f0[0], torch.tensor([-0.6, -0.2, -0.4]))
    R0, R1 = reference.apply_reweighting(W0, *f0), reference.apply_reweighting(W1, *f1)
    expected = (W1 + 0.7 * R0, W0 + 0.7 * R1)
    ops.add_reweighting_([W1, W0], [W0, W1], [f0, f1], 0.7)
    torch.testing.assert_close(W1, expected[0])
    torch.testing.assert_close(W0, expected[1])
    W = torch.randn(6, 6, generator=gen)
    expected = W.T + 0.7 * reference.apply_reweighting(W, *f0)
    ops.add_reweighting_([W.T], [W], [f0], 0.7)
    torch.testing.assert_close(W.T, expected)


def test_add_reweighting_refuses_an_out_with_internal_overlap_before_any_change():
    gen = torch.Generator().manual_seed(8)
    W, f = torch.randn(8, 6, generator=gen), _factors(gen)
    outs = [torch.zeros(8, 6), torch.zeros(6).expand(8, 6)]
    with pytest.raises(ValueError, match="internal overlap"):
        ops.add_reweighting_(outs, [W, W], [f, f], 1.0)
    assert bool((outs[0] == 0).all()) and bool((outs[1] == 0).all())


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

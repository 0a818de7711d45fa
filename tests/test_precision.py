"""q3r's math keeps its precision whatever the caller's context (q3r._precision): autocast
never reaches the penalty, the per-step term, a refresh, the diagnostics or compression, and
a refresh runs its fp32 matmuls in IEEE fp32 even where the user allowed TF32 / bf16, with
the user's settings back in place afterwards and for the work a refresh runs for its caller."""

from __future__ import annotations

import copy

import pytest
import torch

import q3r
import q3r.randomized
from q3r import _precision
from q3r.refresh import SketchOptions, SliceConfig, new_slice_state, refresh_slices_
from helpers import TinyViT

NEW_API = hasattr(torch._C, "_get_fp32_precision_getter")
BF16_AUTOCAST = dict(device_type="cpu", dtype=torch.bfloat16)


def _model(seed=0):
    torch.manual_seed(seed)
    model = TinyViT()
    with torch.no_grad():  # decaying spectra, so that the refresh has a tail to find
        for p in model.parameters():
            if p.dim() == 2 and min(p.shape) > 1:
                U, _, Vh = torch.linalg.svd(torch.randn_like(p), full_matrices=False)
                p.copy_((U * 0.8 ** torch.arange(U.shape[1])) @ Vh)
    return model


def _targets(model):
    return q3r.find_targets(model, ["qkv", "proj", "fc1", "fc2"], target_rank=3)


def _factors(state_dicts):
    return [t for slices in state_dicts for s in slices for t in (s["U"], s["V"], s["sigma"], s["eps"])]


@pytest.mark.parametrize("method", ["randomized", "exact"])
def test_penalty_under_autocast_is_the_fp32_penalty(method):
    # the usual loop: loss = model(x) + reg.penalty() inside torch.autocast. The randomized
    # refresh used to crash there (mixed dtypes); the value and gradient were bf16 products.
    grads, values, factors = [], [], []
    for autocast in (False, True):
        model = _model()
        reg = q3r.Q3R(_targets(model), lmbda=0.3, steps=2, refresh=method)
        for _ in range(3):  # a refresh, a plain step, a refresh
            model.zero_grad()
            with torch.autocast(**BF16_AUTOCAST, enabled=autocast):
                value = reg.penalty()
            assert value.dtype == torch.float32
            value.backward()
        values.append(value.detach())
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        factors.append(_factors(reg.state.values()))
    torch.testing.assert_close(values[1], values[0], rtol=0, atol=0)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(factors[1], factors[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_task_loss_keeps_the_callers_autocast():
    model = _model()
    reg = q3r.Q3R(_targets(model), lmbda=0.1, refresh="randomized")
    x = torch.randn(2, 6, 5)
    with torch.autocast(**BF16_AUTOCAST):
        penalty = reg.penalty()
        out = model(x)
        assert torch.is_autocast_enabled("cpu")
    assert out.dtype == torch.bfloat16 and penalty.dtype == torch.float32


def _adamq3r_run(step_in_autocast: bool, refresh: str):
    model = _model()
    opt = q3r.AdamQ3R(q3r.param_groups(model, _targets(model), lmbda=0.2, steps=2, refresh=refresh), lr=1e-2)
    seen = []
    x = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(1))

    def closure():
        seen.append(torch.is_autocast_enabled("cpu"))
        opt.zero_grad()
        with torch.autocast(**BF16_AUTOCAST):
            loss = model(x).float().square().mean()
        loss.backward()
        return loss

    for _ in range(3):
        if step_in_autocast:  # the whole loop body under autocast, step included
            with torch.autocast(**BF16_AUTOCAST):
                opt.step(closure)
        else:
            opt.step(closure)
    return model, opt, seen


@pytest.mark.parametrize("refresh", ["randomized", "exact"])
def test_adamq3r_step_under_autocast_is_the_fp32_step(refresh):
    plain, plain_opt, _ = _adamq3r_run(False, refresh)
    model, opt, seen = _adamq3r_run(True, refresh)
    assert seen == [True] * 3  # the closure (the caller's forward pass) ran under autocast
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert opt.diagnostics() == plain_opt.diagnostics()


def test_add_grad_diagnostics_and_compress_ignore_autocast():
    results = []
    for autocast in (False, True):
        model = _model()
        targets = _targets(model)
        reg = q3r.Q3R(targets, lmbda=0.3, refresh="randomized")
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        with torch.autocast(**BF16_AUTOCAST, enabled=autocast):
            reg.add_grad_()
            diagnostics = reg.diagnostics()
            compressed, _ = q3r.compress(copy.deepcopy(model), targets, fraction=0.5)
        results.append(([p.grad for p in model.parameters()], diagnostics,
                        [p.detach() for p in compressed.parameters()]))
    (grads0, diag0, comp0), (grads1, diag1, comp1) = results
    assert diag1 == diag0
    for a, b in zip(grads1 + comp1, grads0 + comp0):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------- fp32 matmul settings of a refresh
def _settings():
    """What torch's fp32 matmuls on CUDA and through oneDNN would do now."""
    if NEW_API:
        get = torch._C._get_fp32_precision_getter
        return get("cuda", "matmul"), get("mkldnn", "matmul")
    return torch.get_float32_matmul_precision()


def _ieee_settings():
    return ("ieee", "ieee") if NEW_API else "highest"


USER_SETTINGS = {
    "default": lambda: None,
    "legacy high": lambda: torch.set_float32_matmul_precision("high"),
    "legacy medium": lambda: torch.set_float32_matmul_precision("medium"),
    "legacy allow_tf32": lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True),
    "per-backend tf32": lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"),
    "generic tf32": lambda: setattr(torch.backends, "fp32_precision", "tf32"),
}


def _refresh(before_wait=None):
    """A randomized refresh of three small targets (narrow enough to be sketched)."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(48, 40, generator=gen) * 0.8 ** torch.arange(40) for _ in range(3)]
    states = [new_slice_state(48, 40) for _ in weights]
    configs = [SliceConfig(f"t{i}", 3) for i in range(3)]
    refresh_slices_(weights, states, configs, method="randomized", options=SketchOptions(oversampling=4),
                    before_wait=before_wait)


@pytest.mark.parametrize("user", list(USER_SETTINGS))
def test_refresh_pins_ieee_matmuls_and_restores_the_callers_settings(user, monkeypatch, fp32_precision_reset):
    if user not in ("default", "legacy high", "legacy medium") and not NEW_API:
        pytest.skip("torch < 2.9: no per-backend fp32 precision settings")
    USER_SETTINGS[user]()
    before = _settings()
    inside, for_caller = [], []
    original = q3r.randomized.sketch

    def spy(*args, **kwargs):
        inside.append(_settings())
        return original(*args, **kwargs)

    monkeypatch.setattr(q3r.randomized, "sketch", spy)
    _refresh(before_wait=lambda: for_caller.append(_settings()))
    assert inside and all(s == _ieee_settings() for s in inside)
    assert for_caller == [before]  # the caller's work in the middle of the refresh: its settings
    assert _settings() == before
    if user.startswith("legacy") or user == "default":  # and no "mix of legacy and new APIs" error
        torch.get_float32_matmul_precision()


def test_a_failed_refresh_restores_the_settings(monkeypatch, fp32_precision_reset):
    torch.set_float32_matmul_precision("high")
    before = _settings()

    def fail(*args, **kwargs):
        raise RuntimeError("sketch failed")

    monkeypatch.setattr(q3r.randomized, "sketch", fail)
    with pytest.raises(RuntimeError, match="sketch failed"):
        _refresh()
    assert _settings() == before
    assert torch.get_float32_matmul_precision() == "high"


def _generic_ieee_per_backend_tf32():
    torch.backends.fp32_precision = "ieee"
    torch.backends.cuda.matmul.fp32_precision = "tf32"


@pytest.mark.parametrize("user", ["legacy medium", "generic ieee, per-backend tf32"])
def test_nested_pins_restore_once_and_the_caller_work_sees_the_outermost_settings(user, fp32_precision_reset):
    # (tf32 under an explicit IEEE parent: the inner pin reads the pinned "ieee" as "none",
    # inherited, and must not take that for the caller's setting)
    if user != "legacy medium" and not NEW_API:
        pytest.skip("torch < 2.9: no per-backend fp32 precision settings")
    if user == "legacy medium":
        torch.set_float32_matmul_precision("medium")
    else:
        _generic_ieee_per_backend_tf32()
    before = _settings()
    seen = []
    with _precision.refresh_precision():
        with _precision.refresh_precision():  # DDP's divided refresh calls the local one
            _precision.as_caller(lambda: seen.append(_settings()))()
            seen.append(_settings())
        seen.append(_settings())
    assert seen == [before, _ieee_settings(), _ieee_settings()]
    assert _settings() == before


def test_inherited_settings_are_put_back_as_inherited(fp32_precision_reset):
    # torch reads "none" (inherit) as the parent's value; after a refresh, a later change of
    # the parent must still reach the matmul setting
    if not NEW_API:
        pytest.skip("torch < 2.9: no per-backend fp32 precision settings")
    torch.backends.fp32_precision = "tf32"
    _refresh()
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    torch.backends.fp32_precision = "ieee"
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"


def test_normal_tensors_leave_inference_mode_with_gradients_off_and_change_nothing_outside_it():
    # (q3r._precision.normal_tensors: inference_mode(False) alone turns gradient mode on)
    x = torch.ones(3, requires_grad=True)
    with torch.inference_mode():
        with _precision.normal_tensors():
            made = x * 2
            assert not torch.is_grad_enabled()
    assert not made.is_inference() and not made.requires_grad
    with _precision.normal_tensors():
        assert torch.is_grad_enabled()
        assert (x * 2).requires_grad


@pytest.mark.parametrize("method", ["randomized", "exact"])
def test_refresh_slices_under_autocast_is_the_fp32_refresh(method):
    # refresh_slices_ called directly (not through penalty(), which turns autocast off itself)
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn(48, 40, generator=gen) * 0.8 ** torch.arange(40) for _ in range(2)]
    configs = [SliceConfig(f"t{i}", 3) for i in range(2)]
    states = [[new_slice_state(48, 40) for _ in weights] for _ in range(2)]
    opts = SketchOptions(oversampling=4)  # (narrow enough to be sketched)
    refresh_slices_(weights, states[0], configs, method=method, options=opts)
    with torch.autocast(**BF16_AUTOCAST):
        refresh_slices_(weights, states[1], configs, method=method, options=opts)
    for a, b in zip(*states):
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, equal_nan=True)

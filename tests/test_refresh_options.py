"""refresh_options: SketchOptions fields set per AdamQ3R group or per Q3R regularizer, checked
when the optimizer / regularizer is built, carried to every refresh, and kept loadable."""

from __future__ import annotations

import io

import pytest
import torch

import q3r
import q3r.refresh
from helpers import TinyViT


def _model_and_targets(seed=0):
    torch.manual_seed(seed)
    model = TinyViT()
    return model, q3r.find_targets(model, ["qkv", "fc1"], target_rank=3)


def _step(model, opt, reg=None):
    loss = model(torch.randn(4, 6, 5)).square().mean()
    if reg is not None:
        loss = loss + reg.penalty()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


@pytest.fixture
def seen_options(monkeypatch):
    """The SketchOptions of every local refresh call, with the targets' shapes."""
    seen = []
    original = q3r.refresh.refresh_slices_

    def spy(weights, states, configs, *args, options=None, **kwargs):
        seen.append((options, sorted({tuple(w.shape) for w in weights})))
        return original(weights, states, configs, *args, options=options, **kwargs)

    monkeypatch.setattr(q3r.refresh, "refresh_slices_", spy)
    return seen


def test_adamq3r_groups_refresh_with_their_own_options(seen_options):
    model, targets = _model_and_targets()
    groups = q3r.param_groups(model, targets, lmbda=0.1, refresh="randomized")
    fc1 = [g for g in groups if g.get("q3r") and "fc1" in g["names"][0]]
    for g in fc1:
        g["refresh_options"] = {"oversampling": 4, "warm_power_iters": 1}
    opt = q3r.AdamQ3R(groups, lr=1e-3)
    _step(model, opt)
    by_options = {opts: shapes for opts, shapes in seen_options}
    special = q3r.refresh.SketchOptions(oversampling=4, warm_power_iters=1)
    assert len(seen_options) == 2  # one call for each set of options
    assert by_options == {special: [tuple(model.blocks[0].mlp.fc1.weight.shape)],
                          q3r.refresh.DEFAULT_SKETCH: [tuple(model.blocks[0].attn.proj.weight.shape)]}  # q, k, v


def test_adamq3r_groups_refresh_with_their_own_method(monkeypatch):
    seen = []
    original = q3r.refresh.refresh_slices_

    def spy(weights, states, configs, *args, **kwargs):
        seen.append((kwargs.get("method"), sorted({tuple(w.shape) for w in weights})))
        return original(weights, states, configs, *args, **kwargs)

    monkeypatch.setattr(q3r.refresh, "refresh_slices_", spy)
    model, targets = _model_and_targets()
    groups = q3r.param_groups(model, targets, lmbda=0.1, refresh="randomized")
    fc1 = next(g for g in groups if g.get("q3r") and g["params"][0] is model.blocks[0].mlp.fc1.weight)
    fc1["refresh"] = "exact"
    _step(model, q3r.AdamQ3R(groups, lr=1e-3))
    assert sorted(method for method, _ in seen) == ["exact", "randomized"]  # (one call per method)
    assert dict(seen)["exact"] == [tuple(model.blocks[0].mlp.fc1.weight.shape)]


def test_q3r_refreshes_with_its_options(seen_options):
    model, targets = _model_and_targets()
    reg = q3r.Q3R(targets, lmbda=0.1, refresh="randomized", refresh_options={"oversampling": 2, "seed": 7})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _step(model, opt, reg)
    assert [opts for opts, _ in seen_options] == [q3r.refresh.SketchOptions(oversampling=2, seed=7)]


@pytest.mark.parametrize("bad, words", [
    ({"oversample": 4}, "unknown option 'oversample'"),
    ({"oversampling": -1}, "oversampling must be an int >= 0"),
    ({"oversampling": 2.5}, "oversampling must be an int"),
    ({"warm_power_iters": True}, "warm_power_iters must be an int"),
    ({"tol": 0.0}, "tol must be a finite number > 0"),
    ({"exact_fraction": float("nan")}, "exact_fraction must be a finite number"),
    ([("oversampling", 4)], "must be a dict"),
])
def test_bad_refresh_options_are_refused_when_built(bad, words):
    model, targets = _model_and_targets()
    with pytest.raises(ValueError, match="refresh_options") as err:
        q3r.Q3R(targets, refresh_options=bad)
    assert words in str(err.value)
    groups = q3r.param_groups(model, targets, refresh_options=bad)
    with pytest.raises(ValueError, match=words.split(" must")[0]):
        q3r.AdamQ3R(groups, lr=1e-3)
    opt = q3r.AdamQ3R(q3r.param_groups(model, targets), lr=1e-3)
    before = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match="refresh_options"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(5, 7))], "q3r": True, "target_rank": 2,
                             "refresh_options": bad})
    assert len(opt.param_groups) == len(before)  # nothing added


def test_the_options_are_copied_and_saved_as_plain_values():
    model, targets = _model_and_targets()
    options = {"oversampling": 4}
    reg = q3r.Q3R(targets, refresh_options=options)
    opt = q3r.AdamQ3R(q3r.param_groups(model, targets, refresh_options=options), lr=1e-3)
    options["oversampling"] = -5  # a later change to the caller's dict does not bypass the checks
    assert reg.options["refresh_options"] == {"oversampling": 4}
    assert all(g["refresh_options"] == {"oversampling": 4} for g in opt.param_groups if g["q3r"])
    _step(model, opt)
    for state in (opt.state_dict(), reg.state_dict()):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)  # plain dicts and numbers only


@pytest.mark.parametrize("field, value, words", [
    ("max_residual", float("nan"), "max_residual must be a finite number >= 0"),  # (NaN turned the check off)
    ("max_lag", float("nan"), "max_lag must be a finite number >= 0"),
    ("max_residual", -1.0, "max_residual must be a finite number >= 0"),  # (sent every warm sketch back)
    ("max_residual", "0.1", "max_residual must be a finite number"),  # (failed mid-refresh, unnamed)
    ("oversampling", 2.5, "oversampling must be an int >= 0"),
    ("cold_power_iters", -1, "cold_power_iters must be an int >= 0"),
    ("max_stack_bytes", 0, "max_stack_bytes must be an int > 0"),
    ("tol", 0.0, "tol must be a finite number > 0"),
    # (the Jacobi solver then returns its input unrotated: R(X) 7.6e-3 off exact, unwarned)
    ("tol", 1.0, r"tol must be a finite number > 0 and < 1"),
    ("max_sweeps", 0, "max_sweeps must be an int > 0"),
    ("exact_fraction", float("nan"), "exact_fraction must be a finite number"),
    ("max_widenings", True, "max_widenings must be an int"),
])
def test_sketch_options_built_directly_are_checked_too(field, value, words):
    import dataclasses

    with pytest.raises(ValueError, match=f"SketchOptions: {words}"):
        q3r.refresh.SketchOptions(**{field: value})
    with pytest.raises(ValueError, match=words):  # (replace builds a new one: checked as well)
        dataclasses.replace(q3r.refresh.DEFAULT_SKETCH, **{field: value})
    assert q3r.refresh.SketchOptions(exact_fraction=1.5).exact_fraction == 1.5  # (above 1: never too wide)


def test_numpy_numbers_from_a_sweep_are_taken_and_kept_as_plain_python_numbers(seen_options):
    """refresh_options from numpy (np.arange / np.linspace sweeps), as lmbda from one is: taken,
    equal to the plain values, and saved as plain numbers (a numpy scalar in a state dict makes
    torch.load(weights_only=True) refuse it). An integral field still refuses a float of any kind."""
    np = pytest.importorskip("numpy")
    options = {"oversampling": np.int64(4), "flat_tolerance": np.float32(0.25), "max_lag": np.int32(1)}
    built = q3r.refresh.SketchOptions(**options)
    assert built == q3r.refresh.SketchOptions(oversampling=4, flat_tolerance=float(np.float32(0.25)), max_lag=1)
    assert [type(getattr(built, f)) for f in options] == [int, float, int]
    model, targets = _model_and_targets()
    reg = q3r.Q3R(targets, lmbda=0.1, refresh="randomized", refresh_options=options)
    opt = q3r.AdamQ3R(q3r.param_groups(model, targets, refresh="randomized", refresh_options=options), lr=1e-3)
    _step(model, opt)
    _step(model, torch.optim.SGD(model.parameters(), lr=1e-3), reg)
    assert [opts for opts, _ in seen_options] == [built, built]
    for state in (opt.state_dict(), reg.state_dict()):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    with pytest.raises(ValueError, match="oversampling must be an int >= 0, got np.float64"):
        q3r.refresh.SketchOptions(oversampling=np.float64(4))


@pytest.mark.parametrize("seed", [2**64 - 1, 2**64, 2**70])
def test_a_large_seed_taken_when_built_does_not_fail_a_sketched_refresh(seed):
    # (any int >= 0 passes SketchOptions' check; the sketch's generator takes seeds below 2**64,
    # and seed + 7919 * attempt raised "Overflow when unpacking long long" inside a step)
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(60, 50))  # (its warm refreshes are sketched)
    opt = q3r.AdamQ3R([{"params": [weight], "q3r": True, "target_rank": 3, "steps": 1, "refresh": "randomized",
                        "refresh_options": {"seed": seed}}], lr=1e-3)
    for _ in range(2):
        weight.grad = torch.randn_like(weight)
        opt.step()
    assert int(opt.state[weight]["q3r"][0]["refreshes"]) == 2


def test_auto_picks_native_only_on_a_cuda_device_where_it_is_built(monkeypatch):
    """refresh method "auto": the native solver on CUDA tensors when its CUDA part is there,
    the randomized one elsewhere (the device is only named, never touched)."""
    from q3r import _native
    monkeypatch.setattr(_native, "available", lambda device=None: True)
    assert q3r.refresh.resolve_method("auto", torch.device("cuda", 0)) == "native"
    assert q3r.refresh.resolve_method("auto", torch.device("cpu")) == "randomized"
    monkeypatch.setattr(_native, "available", lambda device=None: False)
    assert q3r.refresh.resolve_method("auto", torch.device("cuda", 0)) == "randomized"
    assert q3r.refresh.resolve_method("exact", torch.device("cuda", 0)) == "exact"


def test_before_wait_runs_once_even_with_no_targets():
    calls = []
    assert q3r.refresh.refresh_slices_([], [], [], method="randomized", before_wait=lambda: calls.append(1)) == []
    assert calls == [1]


def test_refresh_around_raises_an_error_of_the_early_work_as_it_is():
    """Only a failure of the refresh after ``early`` ran is wrapped (as 'partly done'); an error
    of ``early`` itself reaches the caller unchanged, and a refresh that never calls it gets it
    run after."""
    def early():
        raise KeyError("early")

    with pytest.raises(KeyError, match="early"):
        q3r.refresh.refresh_around(lambda before_wait: before_wait(), early, "partly done")
    calls = []

    def failing(before_wait):
        before_wait()
        raise OSError("refresh")

    with pytest.raises(RuntimeError, match="partly done") as info:
        q3r.refresh.refresh_around(failing, lambda: calls.append(1), "partly done")
    assert isinstance(info.value.__cause__, OSError) and calls == [1]
    q3r.refresh.refresh_around(lambda before_wait: None, lambda: calls.append(2), "partly done")
    assert calls == [1, 2]

"""The kernels launch on their tensors' device, not torch's current one.

Triton launches on torch.cuda.current_device() (and its current stream), while a plan's
tables hold addresses on the device its tensors live on: a model on cuda:1 while cuda:0 is
current (a DDP script without torch.cuda.set_device, a model split over GPUs) would have its
kernels run on the wrong GPU. So every launch runs inside q3r_kernels._meta.on_device(the
plan's device), a plan serves one device, and q3r.ops builds one plan per device. Two GPUs
are needed to see the crash itself; these tests check the guard and the grouping on CPU
(the interpreter) and with meta tensors standing in for a second device.
"""

import contextlib

import pytest
import torch

import q3r
from q3r import ops
from q3r.optim.functional import ParamWork

from _kernel_utils import DEVICE, K, factors, needs_kernels, tiles

pytestmark = needs_kernels

KERNELS = {"adam": ["_adamq3r_kernel"], "apply": ["_gram_kernel", "_left_kernel", "_apply_kernel"],
           "projection": ["_pack_kernel", "_project_a_kernel", "_project_b_kernel"]}


class _Launches:
    """Every kernel of q3r_kernels wrapped: records, per launch, the device guard it ran in."""

    def __init__(self, monkeypatch):
        self.guard, self.seen = [], []
        meta = K._meta
        real_on_device = meta.on_device

        @contextlib.contextmanager
        def on_device(device):
            self.guard.append(torch.device(device))
            with real_on_device(device):
                yield
            self.guard.pop()

        monkeypatch.setattr(meta, "on_device", on_device)
        for module, names in KERNELS.items():
            mod = getattr(K, module)
            for name in names:
                monkeypatch.setattr(mod, name, self._wrap(name, getattr(mod, name)))

    def _wrap(self, name, kernel):
        launches = self

        class Proxy:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launches.seen.append((name, launches.guard[-1] if launches.guard else None))
                    return kernel[grid](*args, **kwargs)
                return launch
        return Proxy()


def test_on_device_guards_cuda_devices_and_nothing_else():
    guard = K._meta.on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # (not entered: no GPU needed)
    assert isinstance(K._meta.on_device(torch.device("cpu")), contextlib.nullcontext)


def test_every_launch_runs_inside_the_guard_of_its_tensors_device(monkeypatch):
    monkeypatch.setenv("Q3R_BACKEND", "triton")  # (CPU tensors take the kernels only when asked)
    launches = _Launches(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(37, 21, generator=gen).to(DEVICE)
    U, V, d = factors(37, 21, 5, gen)
    with tiles():
        ops.project(X, U, V)
        ops.apply_reweighting(X, U, V, d)
        out = torch.randn(37, 21, generator=gen).to(DEVICE)
        ops.add_reweighting_([out], [X], [(U, V, d)], 0.3)
        work = ParamWork(param=X.clone(), grad=torch.randn(37, 21, generator=gen).to(DEVICE),
                         exp_avg=torch.zeros(37, 21, device=DEVICE), exp_avg_sq=torch.zeros(37, 21, device=DEVICE),
                         step=torch.zeros((), device=DEVICE), lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8,
                         weight_decay=0.0, lmbda=0.5, operators=[(U, V, d)])
        assert ops.adamq3r_fused_([work]) == []
    names = {name for name, _ in launches.seen}
    assert {"_adamq3r_kernel", "_apply_kernel", "_project_a_kernel", "_project_b_kernel", "_pack_kernel"} <= names
    outside = [(name, guard) for name, guard in launches.seen if guard != X.device]
    assert not outside, f"launches outside the guard of {X.device}: {outside}"


def test_a_plan_refuses_blocks_on_two_devices():
    gen = torch.Generator().manual_seed(1)
    Xs = [torch.randn(8, 6, generator=gen), torch.empty(8, 6, device="meta")]
    fs = [factors(8, 6, 2, gen, device="cpu"), tuple(t.to("meta") for t in factors(8, 6, 2, gen, device="cpu"))]
    with pytest.raises(ValueError, match="block 1 is on meta.*a plan serves one device"):
        K.ReweightPlan(Xs, [X.clone() for X in Xs], fs)
    with pytest.raises(ValueError, match="block 1 is on meta.*a plan serves one device"):
        K.projection.project_blocks(Xs, [f[0] for f in fs], [f[1] for f in fs])
    regions = [K.AdamRegion(X, X.clone(), X.clone(), X.clone(), None) for X in Xs]
    with pytest.raises(ValueError, match="region 1 is on meta.*a plan serves one device"):
        K.AdamQ3RPlan(regions)


def test_ops_build_one_plan_per_device(monkeypatch):
    """Works and blocks on two devices (CPU and meta standing in for two GPUs) get a plan each,
    each with only its device's tensors, every plan built before any runs."""
    monkeypatch.setattr(ops, "backend_for", lambda device, dtype: "triton")
    events = []

    class FakePlan:
        def __init__(self, devices):
            self.devices = devices

        def run(self, *args):
            events.append(("run", self.devices))

    def reweight_plan_for(outs, weights, factors_):
        devices = {W.device.type for W in weights} | {o.device.type for o in outs}
        events.append(("build", devices))
        return FakePlan(devices)

    def plan_for(works):
        devices = {w.param.device.type for w in works}
        events.append(("build", devices))
        return ops._CachedPlan(FakePlan(devices), [], [], [])

    monkeypatch.setattr(ops, "_reweight_plan_for", reweight_plan_for)
    monkeypatch.setattr(ops, "_plan_for", plan_for)
    gen = torch.Generator().manual_seed(2)
    blocks = []
    for device in ("cpu", "meta", "cpu"):
        U, V, d = (t.to(device) for t in factors(9, 7, 3, gen, device="cpu"))
        blocks.append((torch.zeros(9, 7, device=device), torch.randn(9, 7, generator=gen).to(device), (U, V, d)))
    ops.add_reweighting_([b[0] for b in blocks], [b[1] for b in blocks], [b[2] for b in blocks], 0.5)
    assert events == [("build", {"cpu"}), ("build", {"meta"}), ("run", {"cpu"}), ("run", {"meta"})]

    events.clear()
    works = [ParamWork(param=W, grad=torch.zeros_like(W), exp_avg=torch.zeros_like(W), exp_avg_sq=torch.zeros_like(W),
                       step=torch.zeros(()), lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8,
                       weight_decay=0.0, lmbda=0.5, operators=[f]) for _, W, f in blocks]
    assert ops.adamq3r_fused_(works) == []
    assert events == [("build", {"cpu"}), ("build", {"meta"}), ("run", {"cpu"}), ("run", {"meta"})]
    assert [float(w.step) for w in works] == [1.0, 1.0, 1.0]


def test_adamq3r_steps_a_model_through_the_guarded_launches(monkeypatch):
    """The optimizer's own step (the fused path) launches inside the guard too."""
    monkeypatch.setenv("Q3R_BACKEND", "triton")
    launches = _Launches(monkeypatch)
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(13, 19), torch.nn.Linear(19, 5)).to(DEVICE)
    targets = q3r.find_targets(model, ["0"], target_rank=3)
    opt = q3r.AdamQ3R(q3r.param_groups(model, targets, lmbda=0.5, steps=2), lr=1e-2)
    with tiles():
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 13, device=DEVICE)).square().mean().backward()
            opt.step()
    assert any(name == "_adamq3r_kernel" for name, _ in launches.seen)
    assert all(guard == torch.device(DEVICE) for _, guard in launches.seen)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs CUDA with two GPUs (a model on cuda:1, cuda:0 current)")
def test_a_model_on_the_second_gpu_steps_as_the_reference_there(monkeypatch):
    runs = []
    for backend in ("reference", "triton"):
        monkeypatch.setenv("Q3R_BACKEND", backend)
        torch.manual_seed(4)
        model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 32)).to("cuda:1")
        opt = q3r.AdamQ3R(q3r.param_groups(model, q3r.find_targets(model, ["0"], target_rank=8), lmbda=0.5, steps=2),
                          lr=1e-2)
        gen = torch.Generator().manual_seed(5)
        with torch.cuda.device(0):  # (the current device is not the model's)
            for _ in range(4):
                opt.zero_grad()
                model(torch.randn(8, 64, generator=gen).to("cuda:1")).square().mean().backward()
                opt.step()
        torch.cuda.synchronize(1)
        runs.append([p.detach().cpu() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

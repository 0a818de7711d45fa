"""torch.amp.GradScaler with AdamQ3R and with a Q3R attached to torch's optimizers, fused or
not: a step GradScaler skips (inf/NaN gradients) is not a training step for Q3R either (not
counted, nothing added: the same weights and refresh schedule as a run without it), and the
term is added at the gradients' scale. A fused optimizer unscales the gradients itself, after
Q3R's pre-hook: the term went in unscaled and the kernel divided it by 65536 (a review's case).
Runs on the CPU (GradScaler("cpu"), fused AdamW on the CPU), and on CUDA where there is one
(benchmarks/gpu_checks.sh runs it there: the fused kernel and the Triton term)."""

import pytest
import torch
from torch import nn

import q3r

BAD = 4  # the step whose gradients get an inf
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def _model(device="cpu"):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4)).to(device)


def _batches(device, n=10):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 16, generator=g).to(device), torch.randint(0, 4, (16,), generator=g).to(device))
            for _ in range(n)]


def _train(kind, scaler=True, inject=False, omit_bad=False, unscale_first=False, device="cpu"):
    model = _model(device)
    targets = q3r.find_targets(model, ["2", "4"], target_rank=4)
    if kind == "adamq3r":
        opt = q3r.AdamQ3R(q3r.param_groups(model, targets, lmbda=0.5, steps=3), lr=1e-2)
        counter = lambda: int(opt.state[targets[0].param]["step"])  # noqa: E731
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=kind == "fused")
        reg = q3r.Q3R(targets, lmbda=0.5, steps=3)
        reg.attach(opt)
        counter = lambda: reg.num_steps  # noqa: E731
    sc = torch.amp.GradScaler(device, init_scale=2.0 ** 16, growth_interval=1000) if scaler else None
    for i, (x, y) in enumerate(_batches(device)):
        if omit_bad and i == BAD:
            continue
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if sc is None:
            loss.backward()
            opt.step()
            continue
        sc.scale(loss).backward()
        if inject and i == BAD:
            model[0].weight.grad[0, 0] = float("inf")
        if unscale_first:
            sc.unscale_(opt)
        sc.step(opt)
        sc.update()
    return model, counter()


def _max_diff(a, b):
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("unscale_first", [False, True])
@pytest.mark.parametrize("kind", ["fused", "foreach", "adamq3r"])
def test_a_scaled_run_matches_the_unscaled_one(kind, unscale_first, device):
    plain, steps = _train("foreach" if kind == "fused" else kind, scaler=False, device=device)
    scaled, scaled_steps = _train(kind, unscale_first=unscale_first, device=device)
    assert scaled_steps == steps == 10
    # (a power-of-two scale: the same values up to the fused kernel's own rounding; the
    # term unscaled by the kernel left fc2 2.7 away)
    assert _max_diff(scaled, plain) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("unscale_first", [False, True])
@pytest.mark.parametrize("kind", ["fused", "foreach", "adamq3r"])
def test_a_step_the_scaler_skips_is_not_a_q3r_step(kind, unscale_first, device):
    skipped, steps = _train(kind, inject=True, unscale_first=unscale_first, device=device)
    without, steps_without = _train(kind, omit_bad=True, unscale_first=unscale_first, device=device)
    assert steps == steps_without == 9  # (the fused one counted 10 and refreshed off schedule)
    assert _max_diff(skipped, without) < 1e-6


def test_add_grad_checks_its_scale():
    model = _model()
    reg = q3r.Q3R(q3r.find_targets(model, ["2"], target_rank=4), lmbda=0.5)
    for bad in (0.0, -1.0, float("inf"), float("nan"), True, "2"):
        with pytest.raises(ValueError, match="grad_scale"):
            reg.add_grad_(grad_scale=bad)
    assert reg.num_steps == 0


def test_add_grad_passes_the_scale_to_the_sharded_term(monkeypatch):
    # FSDP2-sharded targets take add_grad_'s other branch (one all-reduce for all targets, in
    # q3r.distributed.sharded_add_grad_): the loss scale must reach that term too. The CPU
    # GradScaler tests run unsharded only; here the sharded call is stood in for, and the
    # alpha each target gets is read off it
    model = _model()
    reg = q3r.Q3R(q3r.find_targets(model, ["2", "4"], target_rank=4), lmbda=0.5)
    for t in reg.targets:
        t.param.grad = torch.zeros_like(t.param)
    alphas = []
    monkeypatch.setattr(q3r.distributed, "is_sharded", lambda t: any(t is x.param for x in reg.targets))
    monkeypatch.setattr(q3r.distributed, "sharded_add_grad_",
                        lambda entries, grads: alphas.append([entry[-1] for entry in entries]))
    monkeypatch.setattr(reg, "_begin_step", lambda: None)  # (the sharded refresh needs a process group)
    reg.add_grad_()
    reg.add_grad_(grad_scale=8.0)
    assert alphas == [[1.0, 1.0], [8.0, 8.0]]  # (2 lambda, times the scale)


def _fp16_layer_step(init_scale, device):
    # h53's case: float16 parameters (not the usual AMP setup's float32 ones), fc2 scaled x8 so
    # that 2 lambda R(W) at the loss scale 65536 passes float16's 65504 after the scaler's check
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        model[2].weight.mul_(8)
    model = model.to(device, torch.float16)
    reg = q3r.Q3R(q3r.find_targets(model, ["2"], target_rank=4), lmbda=0.5, steps=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    reg.attach(opt)
    sc = torch.amp.GradScaler(device, init_scale=init_scale)
    x, y = _batches(device, 1)[0]
    sc.scale(nn.functional.cross_entropy(model(x.half()).float(), y)).backward()
    before = [p.detach().clone() for p in model.parameters()]
    return model, opt, sc, before


@pytest.mark.parametrize("device", DEVICES)
def test_a_float16_term_that_overflows_at_the_loss_scale_is_refused_before_the_fused_step(device):
    model, opt, sc, before = _fp16_layer_step(2.0 ** 16, device)
    with pytest.raises(RuntimeError, match=r"overflowed the float16 gradients of targets \['2.weight'\]"):
        sc.step(opt)  # (the fused step wrote NaN into 267 of fc2's 1024 weights on the CPU, without a word)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not opt.state
    # at a scale where the term fits, the same step is taken, as before
    model, opt, sc, before = _fp16_layer_step(2.0 ** 8, device)
    sc.step(opt)
    sc.update()
    assert sc.get_scale() == 2.0 ** 8 and torch.isfinite(model[2].weight).all()
    assert not torch.equal(model[2].weight, before[2])


@pytest.mark.parametrize("device", DEVICES)
def test_a_refused_float16_term_leaves_no_loss_scale_on_the_optimizer(device):
    """GradScaler sets optimizer.grad_scale and found_inf for a fused step and deletes them after
    it; the refusal raises before that. Left on the optimizer, a later step without the scaler
    read the stale 65536 as its loss scale: the hook added the term at it and refused again."""
    model, opt, sc, before = _fp16_layer_step(2.0 ** 16, device)
    with pytest.raises(RuntimeError, match="overflowed the float16 gradients"):
        sc.step(opt)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    opt.zero_grad()
    x, y = _batches(device, 1)[0]
    nn.functional.cross_entropy(model(x.half()).float(), y).backward()  # (unscaled: no scaler now)
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(model[2].weight, before[2])

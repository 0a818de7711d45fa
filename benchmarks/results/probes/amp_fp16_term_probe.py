"""attach under torch.amp.GradScaler with low-precision parameters (README, "With the rest of a
training loop", the float16 known limit). Two questions, on h53's layer (fc2 scaled x8, lambda
0.5, scale 65536, Adam, CPU):

1. float16 parameters, fused Adam: does marking the term's overflow in ``optimizer.found_inf``
   from a step pre-hook (after attach's) make the step a skipped one, as the scaler's skip of an
   overflow in the backward pass? A hook of this probe does that here, on q3r without the
   refusal (run it at e6c5109): the fused step is skipped, but GradScaler.update() reads its
   own per-device flags, not this sum of them, so the scale never backs off, and Adam never steps.
2. bfloat16 parameters, fused and foreach Adam: the run under the scaler against the same run
   without it (max abs difference of the parameters after 8 steps).

Usage: OMP_NUM_THREADS=1 PYTHONPATH=python python benchmarks/results/probes/amp_fp16_term_probe.py
"""

import torch
from torch import nn

import q3r


def setup(dtype, **adam):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        model[2].weight.mul_(8)
    model = model.to(dtype)
    reg = q3r.Q3R(q3r.find_targets(model, ["2"], target_rank=4), lmbda=0.5, steps=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, **adam)
    reg.attach(opt)
    return model, reg, opt


def steps(model, opt, dtype, scaler, n, report=None):
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        x, y = torch.randn(16, 16, generator=g).to(dtype), torch.randint(0, 4, (16,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).float(), y)
        if scaler is None:
            loss.backward()
            opt.step()
            continue
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if report:
            report(i)


print("1. float16, fused Adam, the term's overflow marked in optimizer.found_inf (growth_interval 2)")
model, reg, opt = setup(torch.float16, fused=True)


def mark_overflow(o, args, kwargs):  # (registered after attach's hook: runs after the term went in)
    o.found_inf.add_((~torch.isfinite(model[2].weight.grad).all()).float())


opt.register_step_pre_hook(mark_overflow)
sc = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=2)
steps(model, opt, torch.float16, sc, 6, lambda i: print(
    f"  step {i}: scale {sc.get_scale():g}, fc2 finite {bool(torch.isfinite(model[2].weight).all())}, "
    f"Adam steps {int(opt.state[model[2].weight]['step']) if opt.state else 0}, Q3R steps {reg.num_steps}"))

print("2. bfloat16: scaled (65536) against unscaled, 8 steps")
for kind in ("fused", "foreach"):
    runs = []
    for scaled in (False, True):
        model, reg, opt = setup(torch.bfloat16, **{kind: True})
        steps(model, opt, torch.bfloat16, torch.amp.GradScaler("cpu", init_scale=2.0 ** 16) if scaled else None, 8)
        runs.append((model, reg.num_steps))
    pairs = zip(runs[0][0].parameters(), runs[1][0].parameters())
    diff = max(float((p - q).detach().float().abs().max()) for p, q in pairs)
    print(f"  {kind}: Q3R steps {runs[0][1]} / {runs[1][1]}, max |difference| {diff:g}")

"""Probe (not committed as code): device time per kernel of the per-step work and the fused
AdamQ3R step on ViT-B/16 for a list of tile settings (torch.profiler, sum over 5 calls / 5)."""
import json, os, sys, gc
sys.path.insert(0, "benchmarks")
import torch
import _common as C
import bench_step as B
import q3r
import q3r_kernels as K
from q3r import ops
from q3r.targets import slice_views
from torch.profiler import ProfilerActivity, profile

os.environ["Q3R_BACKEND"] = "triton"
torch.manual_seed(0)
key = sys.argv[1]
configs = json.loads(sys.argv[2])
model, make_batch, loss_fn, targets, label = C.MODELS[key](device="cuda")
params = [p for p in model.parameters() if p.requires_grad]
data = make_batch()
def fwd_bwd():
    for p in params: p.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = loss_fn(model, data)
    loss.backward()
tq = B.q3r_targets(targets)
opt = q3r.AdamQ3R(q3r.param_groups(model, tq, weight_decay=0.05, lmbda=B.LMBDA, steps=B.T), lr=1e-4)
B.fake_refresh(opt)
fwd_bwd(); opt.step()
for g in opt.param_groups: g["steps"] = 10**9
weights, grads, factors = [], [], []
for t in tq:
    weights += slice_views(t.param.detach(), t.slice_dim, t.slices)
    grads += slice_views(t.param.grad, t.slice_dim, t.slices)
    factors += [(s["U"], s["V"], s["sigma"], s["eps"]) for s in opt.state[t.param]["q3r"]]
work = lambda: ops.add_reweighting_(grads, weights, factors, 2 * B.LMBDA)
saved = dict(vars(K.CONFIG))
def device_ms(fn, n=5):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n): fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if e.key.startswith("_") and e.key.endswith("_kernel"):
            out[e.key] = e.device_time_total / 1e3 / n
    return out
for change in configs:
    vars(K.CONFIG).update(saved); vars(K.CONFIG).update(change)
    tag = ",".join(f"{k}={v}" for k, v in change.items()) or "default"
    try:
        w, s = device_ms(work), device_ms(opt.step)
        wall = C.cuda_time_ms(opt.step)
        print(f"{tag:60s} work {sum(w.values()):.3f} step {sum(s.values()):.3f} wall_step {wall:.3f} | "
              + " ".join(f"{k[1:-7]}={v:.3f}" for k, v in sorted(s.items())) + " | apply=" + f"{w.get('_apply_kernel', 0):.3f}", flush=True)
    except Exception as exc:
        print(f"{tag}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
vars(K.CONFIG).update(saved)
for g in opt.param_groups:
    g["_lmbda"], g["lmbda"] = g["lmbda"], 0.0 if g.get("q3r") else g["lmbda"]
s0 = device_ms(opt.step)
print("lambda=0 fused step kernels:", {k: round(v, 3) for k, v in s0.items()}, flush=True)
aw = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=True)
for _ in range(3): aw.step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(5): aw.step()
    torch.cuda.synchronize()
print("fused AdamW device ms:", round(sum(e.self_device_time_total for e in prof.key_averages()) / 1e3 / 5, 3), flush=True)

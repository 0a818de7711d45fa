"""Host timeline of AdamQ3R training steps with real refreshes, staggered and plain.

    python benchmarks/stagger_timeline.py [vit_b16|gpt2_small|llama_1b] [--device cpu --tiny]

For each step of one T-step cycle it prints, at each point (forward and backward queued, the
refresh and its sketches, the host transfer its commit waits for, the commits, the fused
steps), "h<host ms>/d<device ms>" since the step began.  Where d runs ahead of h the device is
busy with work the host queued earlier; where they are equal the host has waited for the
device (a sync) and the device idles while the host prepares what comes next.  On the CPU
(``--device cpu``, a smoke run of this script with ``--tiny``) there is no device clock: only
h is printed.
"""
import argparse, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
import _common as C
import q3r
from bench_step import q3r_targets, LMBDA, T
from q3r.optim import adamq3r as A
from q3r import _refresh_commit, _refresh_sketched

ap = argparse.ArgumentParser()
ap.add_argument("model", nargs="?", default="vit_b16", choices=sorted(C.MODELS))
ap.add_argument("--device", default="cuda")
ap.add_argument("--tiny", action="store_true", help="the benchmark's tiny model (smoke test)")
args = ap.parse_args()
device_type = torch.device(args.device).type
cuda = device_type == "cuda"
model, make_batch, loss_fn, targets, label = C.MODELS[args.model](device=args.device, tiny=args.tiny)
params = [p for p in model.parameters() if p.requires_grad]
data = make_batch()
marks = []
def mark(name):
    ev = None
    if cuda:
        ev = torch.cuda.Event(enable_timing=True); ev.record()
    marks.append((name, time.perf_counter(), ev))
def wrap(obj, attr, name):
    real = getattr(obj, attr)
    def f(*a, **k):
        mark(name + ">"); out = real(*a, **k); mark(name + "<"); return out
    setattr(obj, attr, f)
wrap(A.AdamQ3R, "refresh", "refresh"); wrap(_refresh_commit, "to_host", "to_host"); wrap(A, "adamq3r_step_", "fused_step")
wrap(_refresh_commit, "_store_commits", "store"); wrap(_refresh_sketched, "_sketch_stack_", "sketch")

def train_step(opt):
    for p in params: p.grad = None
    mark("start")
    with torch.autocast(device_type, dtype=torch.bfloat16):
        loss = loss_fn(model, data)
    mark("fwd queued")
    loss.backward()
    mark("bwd queued")
    opt.step()
    mark("step queued")
    if cuda:
        torch.cuda.synchronize()
    mark("done")

def stamp(name, t, ev, t0, e0):
    return f"{name} h{1e3 * (t - t0):.1f}" + (f"/d{e0.elapsed_time(ev):.1f}" if cuda else "")

for stagger in (True, False):
    groups = q3r.param_groups(model, q3r_targets(targets), weight_decay=0.05, lmbda=LMBDA, steps=T, refresh="auto", stagger=stagger)
    opt = q3r.AdamQ3R(groups, lr=1e-4)
    for _ in range(2 * T): train_step(opt)
    for s in range(T):
        marks.clear(); train_step(opt)
        t0, e0 = marks[0][1], marks[0][2]
        print(f"stagger={stagger} step {s}: " + "  ".join(stamp(n, t, e, t0, e0) for n, t, e in marks[1:]))

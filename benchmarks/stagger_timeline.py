"""Host timeline of AdamQ3R training steps with real refreshes, staggered and plain (CUDA only).

    python benchmarks/stagger_timeline.py [vit_b16|gpt2_small|llama_1b]

For each step of one T-step cycle it prints, at each point (forward and backward queued, the
refresh and its sketches, the host transfer its commit waits for, the commits, the fused
steps), "h<host ms>/d<device ms>" since the step began.  Where d runs ahead of h the device is
busy with work the host queued earlier; where they are equal the host has waited for the
device (a sync) and the device idles while the host prepares what comes next.
"""
import sys, time
sys.path.insert(0, "benchmarks")
import torch
import _common as C
import q3r
from bench_step import q3r_targets, LMBDA, T
from q3r.optim import adamq3r as A
from q3r import refresh as R

model, make_batch, loss_fn, targets, label = C.MODELS[sys.argv[1] if len(sys.argv) > 1 else "vit_b16"](device="cuda", tiny=False)
params = [p for p in model.parameters() if p.requires_grad]
data = make_batch()
marks = []
def mark(name):
    ev = torch.cuda.Event(enable_timing=True); ev.record(); marks.append((name, time.perf_counter(), ev))
def wrap(obj, attr, name):
    real = getattr(obj, attr)
    def f(*a, **k):
        mark(name + ">"); out = real(*a, **k); mark(name + "<"); return out
    setattr(obj, attr, f)
wrap(A.AdamQ3R, "refresh", "refresh"); wrap(R, "_to_host", "to_host"); wrap(A, "adamq3r_step_", "fused_step")
wrap(R, "_store_commits", "store"); wrap(R, "_sketch_stack_", "sketch")

def train_step(opt):
    for p in params: p.grad = None
    mark("start")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = loss_fn(model, data)
    mark("fwd queued")
    loss.backward()
    mark("bwd queued")
    opt.step()
    mark("step queued")
    torch.cuda.synchronize()
    mark("done")

for stagger in (True, False):
    groups = q3r.param_groups(model, q3r_targets(targets), weight_decay=0.05, lmbda=LMBDA, steps=T, refresh="auto", stagger=stagger)
    opt = q3r.AdamQ3R(groups, lr=1e-4)
    for _ in range(2 * T): train_step(opt)
    for s in range(T):
        marks.clear(); train_step(opt)
        t0, e0 = marks[0][1], marks[0][2]
        print(f"stagger={stagger} step {s}: " + "  ".join(f"{n} h{1e3*(t-t0):.1f}/d{e0.elapsed_time(e):.1f}" for n, t, e in marks[1:]))

"""The reference (fallback) AdamQ3R step on the CPU: time and full-size allocations per step.

    OMP_NUM_THREADS=1 python benchmarks/results/probes/fallback_step_probe.py [--model vit] [--reps 5]

Targets and ranks of bench_step.py's ViT-B/16 (Q/K/V row slices, 20% ranks, lambda 0.1, random
factors as bench_step's fake refresh makes them), gradients random. Times AdamQ3R steps (no
refresh) and AdamW (torch.optim.AdamW, foreach=False) over the same parameters, in turn; counts
the step's allocations of at least a 768 x 768 float32 tensor (torch.profiler memory events).
Run it at two commits (PYTHONPATH) to compare them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # benchmarks/
from _common import git_commit, vit_b16  # noqa: E402
from bench_step import fake_refresh, q3r_targets  # noqa: E402

import q3r  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    os.environ["Q3R_BACKEND"] = "reference"
    torch.manual_seed(0)
    model, _, _, targets, label = vit_b16(device="cpu")
    params = [p for _, p, _, _ in targets]  # the targets only: the step's Q3R part is what differs
    opt = q3r.AdamQ3R(q3r.param_groups(model, q3r_targets(targets), lmbda=0.1, steps=10**6), lr=1e-4)
    fake_refresh(opt)
    adamw = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    opt.step()  # the refresh (random factors)
    adamw.step()
    times = {"adamq3r": [], "adamw": []}
    for _ in range(args.reps):
        for name, o in (("adamq3r", opt), ("adamw", adamw)):
            t0 = time.perf_counter()
            o.step()
            times[name].append((time.perf_counter() - t0) * 1e3)
    full = 768 * 768 * 4
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    events = [e for e in prof.events() if e.self_cpu_memory_usage >= full]
    print(f"commit {git_commit()}  {label}, {len(targets)} targets, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    for name, ts in times.items():
        print(f"{name} step ms (targets only): " + " ".join(f"{t:.0f}" for t in ts) + f"; median {statistics.median(ts):.0f}")
    print(f"AdamQ3R step: {len(events)} allocations of >= 768 x 768 float32, {sum(e.self_cpu_memory_usage for e in events) / 2**20:.0f} MiB in all")


if __name__ == "__main__":
    main()

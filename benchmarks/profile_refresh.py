"""Where a warm refresh's time goes: torch.profiler over one warm refresh of a model's targets.

    python benchmarks/profile_refresh.py [--model vit] [--method native] [--device cuda]

Prints --reps timed warm refreshes (wall clock, synchronized), then two profiler tables of one
more: by device time (which kernels) and by host time (launches, copies to the host, Python
glue).  When the wall clock is well above the device total, the refresh is bound by the host.
The shapes, ranks and weight drift are those of bench_refresh.py.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_refresh import model_shapes, rank_of  # noqa: E402

from q3r.refresh import SliceConfig, new_slice_state, refresh_slices_  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit")
    ap.add_argument("--method", default="native")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--reps", type=int, default=5, help="timed warm refreshes before the profiled one")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator(device=dev).manual_seed(0)
    weights = [torch.randn(d1, d2, device=dev, generator=gen) / math.sqrt(d2)
               for _, d1, d2, count in model_shapes(args.model) for _ in range(count)]
    drifted = [w + 0.005 * torch.randn(w.shape, device=dev, generator=gen) / math.sqrt(w.shape[1]) for w in weights]
    configs = [SliceConfig(f"t{i}", rank_of(*w.shape)) for i, w in enumerate(weights)]
    states = [new_slice_state(*w.shape, device=dev) for w in weights]
    for i in range(4):  # a cold refresh, then warm ones
        refresh_slices_(weights if i % 2 else drifted, states, configs, method=args.method)
    sync()
    times = []
    for i in range(args.reps):
        t0 = time.perf_counter()
        refresh_slices_(weights if i % 2 else drifted, states, configs, method=args.method)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    print("warm refresh ms: " + " ".join(f"{t:.2f}" for t in times) + f"; median {sorted(times)[len(times) // 2]:.2f}")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        refresh_slices_(weights, states, configs, method=args.method)
        sync()
    top_level = [e for e in prof.events() if e.name.startswith("aten::")
                 and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    print(f"top-level aten ops in one warm refresh: {len(top_level)} (each a host dispatch; on CUDA most launch)")
    averages = prof.key_averages()
    if dev.type == "cuda":
        print(averages.table(sort_by="device_time_total", row_limit=args.rows, max_name_column_width=50))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=50))
    print("kept widths (r_env):", sorted({s["sigma"].shape[0] for s in states}))


if __name__ == "__main__":
    main()

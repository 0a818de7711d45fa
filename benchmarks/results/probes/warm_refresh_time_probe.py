"""Warm randomized refresh of bench_refresh's ViT-B/16 weights (random init, 0.5% drift):
wall time of each of 6 warm refreshes after a cold one (CPU, 1 thread).

    OMP_NUM_THREADS=1 python benchmarks/results/probes/warm_refresh_time_probe.py [max_residual=1.0 ...]

(SketchOptions fields as name=value, numbers only; results: warm_refresh_time_vit_cpu.txt)"""
import sys, time, statistics
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))  # benchmarks/
import torch
torch.set_num_threads(1)
import q3r
from bench_refresh import model_shapes, rank_of, make_weights
from q3r.refresh import SketchOptions, SliceConfig, new_slice_state, refresh_slices_
opts = SketchOptions(**dict(a.split("=") for a in sys.argv[1:]) and {k: float(v) for k, v in (a.split("=") for a in sys.argv[1:])}) if len(sys.argv) > 1 else None
groups = make_weights(model_shapes("vit"), torch.device("cpu"), torch.Generator().manual_seed(0))
weights = [w for g in groups for w in g[4]]; drifted = [w for g in groups for w in g[5]]
configs = [SliceConfig(f"t{i}", rank_of(*w.shape)) for i, w in enumerate(weights)]
states = [new_slice_state(*w.shape) for w in weights]
refresh_slices_(weights, states, configs, method="randomized", options=opts)
ts = []
for n in range(6):
    t0 = time.perf_counter()
    refresh_slices_(drifted if n % 2 == 0 else weights, states, configs, method="randomized", options=opts)
    ts.append(time.perf_counter() - t0)
print(q3r.__file__, opts and opts.max_residual, "warm s:", " ".join("%.2f" % t for t in ts), "median %.2f" % statistics.median(ts), flush=True)

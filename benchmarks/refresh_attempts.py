"""What each warm native refresh of bench_refresh's ViT-B/16 weights does.

    python benchmarks/refresh_attempts.py [--model vit] [--device cuda]

Per refresh (alternating drifted weights, then the first stack refreshed on the same
weights again): wall ms, host transfers (each waits for the device), sketches checked on the
host (a sync each) or left to the commit, members whose unchecked basis failed (a second
sketch), orthogonal top-ups, and the envelope and tail widths afterwards.  ``--model tiny
--device cpu`` is a smoke run of this script; its times mean nothing.
"""
import argparse, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
from bench_refresh import model_shapes, rank_of, make_weights
from q3r import _native, randomized, _refresh_commit as C
from q3r.refresh import SliceConfig, new_slice_state, refresh_slices_

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="vit")
ap.add_argument("--device", default="cuda")
args = ap.parse_args()
dev = torch.device(args.device)
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
method = "native" if _native.available(dev) else "randomized"
stats = {"to_host": 0, "untrusted": 0, "checked": 0, "deferred": 0, "top_up": 0}
th, ro, ru, tu = C.to_host, randomized.orthonormalize, randomized.orthonormalize_unchecked, randomized._orthogonal_top_up
C.to_host = lambda t: stats.__setitem__("to_host", stats["to_host"] + 1) or th(t)
randomized.orthonormalize = lambda *a, **k: stats.__setitem__("checked", stats["checked"] + 1) or ro(*a, **k)
randomized._orthogonal_top_up = lambda *a, **k: stats.__setitem__("top_up", stats["top_up"] + 1) or tu(*a, **k)
def u(*a, **k):
    stats["deferred"] += 1; Q, t = ru(*a, **k); stats["untrusted"] += int((~t).sum()); return Q, t
randomized.orthonormalize_unchecked = u
shapes = model_shapes(args.model)
groups = make_weights(shapes, dev, torch.Generator(device=dev).manual_seed(0))
weights = [w for g in groups for w in g[4]]; drifted = [w for g in groups for w in g[5]]
configs = [SliceConfig(f"t{i}", rank_of(*w.shape)) for i, w in enumerate(weights)]
states = [new_slice_state(*w.shape, device=dev) for w in weights]
refresh_slices_(weights, states, configs, method=method)
print(f"{args.model} on {dev}, method {method}")
def run(tag, ws, st, cf):
    before = dict(stats); sync(); t = time.perf_counter()
    refresh_slices_(ws, st, cf, method=method); sync()
    print(tag, f"{1e3 * (time.perf_counter() - t):.1f} ms", {k: stats[k] - before[k] for k in stats},
          "envs", sorted({s["sigma"].shape[0] for s in st}), "tails", sorted({s["tail"].shape[1] for s in st}))
for i in range(6):
    run(f"flip{i}", drifted if i % 2 == 0 else weights, states, configs)
first = sorted(shapes[0][1:3])  # the first stack: that shape and its transpose (q3r._orientation)
idx = [i for i, w in enumerate(weights) if sorted(w.shape) == first]
for i in range(5):
    run(f"same{i}", [weights[j] for j in idx], [states[j] for j in idx], [configs[j] for j in idx])

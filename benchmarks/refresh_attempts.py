"""What each warm native refresh of bench_refresh's ViT-B/16 weights does (CUDA only).

    python benchmarks/refresh_attempts.py

Per refresh (alternating drifted weights, then one shape group refreshed on the same weights
again): wall ms, host transfers (each waits for the device), sketches checked on the host
(a sync each) or left to the commit, members whose unchecked basis failed (a second sketch),
orthogonal top-ups, and the envelope and tail widths afterwards.
"""
import sys, time, torch
sys.path.insert(0, "benchmarks")
from bench_refresh import model_shapes, rank_of, make_weights
from q3r import randomized, refresh as R
from q3r.refresh import SliceConfig, new_slice_state, refresh_slices_
stats = {"to_host": 0, "untrusted": 0, "checked": 0, "deferred": 0, "top_up": 0}
th, ro, ru, tu = R._to_host, randomized.orthonormalize, randomized.orthonormalize_unchecked, randomized._orthogonal_top_up
R._to_host = lambda t: stats.__setitem__("to_host", stats["to_host"] + 1) or th(t)
randomized.orthonormalize = lambda *a, **k: stats.__setitem__("checked", stats["checked"] + 1) or ro(*a, **k)
randomized._orthogonal_top_up = lambda *a, **k: stats.__setitem__("top_up", stats["top_up"] + 1) or tu(*a, **k)
def u(*a, **k):
    stats["deferred"] += 1; Q, t = ru(*a, **k); stats["untrusted"] += int((~t).sum()); return Q, t
randomized.orthonormalize_unchecked = u
dev = torch.device("cuda")
groups = make_weights(model_shapes("vit"), dev, torch.Generator(device=dev).manual_seed(0))
weights = [w for g in groups for w in g[4]]; drifted = [w for g in groups for w in g[5]]
configs = [SliceConfig(f"t{i}", rank_of(*w.shape)) for i, w in enumerate(weights)]
states = [new_slice_state(*w.shape, device=dev) for w in weights]
refresh_slices_(weights, states, configs, method="native")
def run(tag, ws, st, cf):
    before = dict(stats); torch.cuda.synchronize(); t = time.perf_counter()
    refresh_slices_(ws, st, cf, method="native"); torch.cuda.synchronize()
    print(tag, f"{1e3 * (time.perf_counter() - t):.1f} ms", {k: stats[k] - before[k] for k in stats},
          "envs", sorted({s["sigma"].shape[0] for s in st}), "tails", sorted({s["V_tail"].shape[1] for s in st}))
for i in range(6):
    run(f"flip{i}", drifted if i % 2 == 0 else weights, states, configs)
idx = [i for i, w in enumerate(weights) if tuple(w.shape) == (768, 768)]
for i in range(5):
    run(f"same{i}", [weights[j] for j in idx], [states[j] for j in idx], [configs[j] for j in idx])

"""Refresh cost: exact SVD vs torch.svd_lowrank vs our randomized refresh (torch.linalg.eigh)
vs our randomized refresh with the native Jacobi eigensolver, per matrix and per model.

    python benchmarks/bench_refresh.py [--models vit gpt2 llama1b llama7b] [--csv PATH] [--quick]

Models (BENCH.md): ViT-B/16 (72 targets: Q, K, V slices, proj, fc1, fc2), GPT-2-small (72:
c_attn column slices, c_proj, c_fc, mlp c_proj), LLaMA-1B-like (d 2048, 16 layers, GQA k/v
512 x 2048, MLP 8192: 112 targets), single LLaMA-7B-sized matrices (4096^2, 11008 x 4096).
Ranks r = 0.2 min(d1, d2).  Weights are random-init (Gaussian / sqrt(fan-in)) and drift by
0.5% between refreshes; warm = steady-state refresh after a cold one.

Exact SVD of the big models is timed on one matrix per shape and multiplied by the count
(column `extrapolated` = 1): a full pass would take minutes.  Also timed: the eigensolver
alone on a batch of 48 warm-started 169 x 169 Gram matrices (torch.linalg.eigh vs native),
and a staggered T = 5 cycle of the ViT refresh (per-step refresh time, max / median), and the
ViT refresh under the `geometric` schedule (eps falling from sigma_{r+1} to sigma_{r+33} over
4 refreshes: every target's envelope grows at each, which the fast refresh sketches twice as
wide instead of taking an exact SVD; phase `geometric_grown`, with how many targets still took
one). Results are printed and appended to the CSV with device, versions and commit.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import exact_fallbacks, git_commit  # noqa: E402

from q3r import _native, randomized
from q3r.refresh import SliceConfig, new_slice_state, refresh_slices_
from q3r.stagger import due_for_refresh, target_phases


def model_shapes(name: str) -> list[tuple[str, int, int, int]]:
    """(label, d1, d2, count) of the targets of a model."""
    if name == "vit":
        return [("qkv slice / proj", 768, 768, 48), ("fc1", 3072, 768, 12), ("fc2", 768, 3072, 12)]
    if name == "gpt2":  # Conv1D weights are (in, out)
        return [("c_attn slice / c_proj", 768, 768, 48), ("c_fc", 768, 3072, 12), ("mlp c_proj", 3072, 768, 12)]
    if name == "llama1b":
        return [("q / o", 2048, 2048, 32), ("k / v", 512, 2048, 32), ("gate / up", 8192, 2048, 32),
                ("down", 2048, 8192, 16)]
    if name == "vit_mini":  # the ViT-B/16 layout at 1/8 width: host overhead on a CPU
        return [("qkv slice / proj", 96, 96, 48), ("fc1", 384, 96, 12), ("fc2", 96, 384, 12)]
    if name == "tiny":  # smoke test of this script
        return [("tiny", 96, 64, 6), ("tiny^T", 64, 96, 3)]
    if name == "llama7b":
        return [("attn 4096^2", 4096, 4096, 1), ("mlp 11008 x 4096", 11008, 4096, 1)]
    raise ValueError(name)


def rank_of(d1: int, d2: int) -> int:
    return int(0.2 * min(d1, d2))


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn, reps: int, warmup: int = 1) -> float:
        """Median milliseconds of fn() over reps calls."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def make_weights(shapes, device, gen):
    """Per shape group: list of random-init weights and a drifted copy."""
    groups = []
    for label, d1, d2, count in shapes:
        W = [torch.randn(d1, d2, device=device, generator=gen) / math.sqrt(d2) for _ in range(count)]
        W2 = [w + 0.005 * torch.randn(d1, d2, device=device, generator=gen) / math.sqrt(d2) for w in W]
        groups.append((label, d1, d2, count, W, W2))
    return groups


def bench_model(name, device, timer, rows, args, gen):
    shapes = model_shapes(name)
    groups = make_weights(shapes, device, gen)
    n_targets = sum(g[3] for g in groups)
    weights = [w for g in groups for w in g[4]]
    drifted = [w for g in groups for w in g[5]]
    configs = [SliceConfig(f"t{i}", rank_of(*w.shape)) for i, w in enumerate(weights)]
    results = {}

    # exact: one matrix per shape, times its count (a whole pass is minutes on big models)
    exact_total, extrapolated = 0.0, 0
    for label, d1, d2, count, W, _ in groups:
        per = timer(lambda: torch.linalg.svd(W[0].float(), full_matrices=False), reps=1 if d1 * d2 > 4e6 else 3)
        rows.append(row(name, f"{d1}x{d2}", 1, "exact_svd", "per_matrix", per, per))
        exact_total += per * count
        extrapolated |= count > 1
    results["exact_svd"] = exact_total
    rows.append(row(name, "model", n_targets, "exact_svd", "whole_model", exact_total, exact_total / n_targets,
                    extrapolated=extrapolated))

    # torch.svd_lowrank (batched per shape group, q = r + 16, niter = 2): stateless, no warm start
    def lowrank():
        for label, d1, d2, count, W, _ in groups:
            torch.svd_lowrank(torch.stack(W), q=rank_of(d1, d2) + 16, niter=2)
    t = timer(lowrank, reps=args.reps)
    results["svd_lowrank"] = t
    rows.append(row(name, "model", n_targets, "svd_lowrank", "whole_model", t, t / n_targets))

    for method in ("randomized", "native"):
        if method == "native" and not _native.available(device):
            print(f"  native: skipped ({_native.status()})")
            continue
        states = [new_slice_state(*w.shape, device=device) for w in weights]
        cold = timer(lambda: refresh_slices_(weights, [new_slice_state(*w.shape, device=device) for w in weights],
                                             configs, method=method), reps=1, warmup=1 if device.type == "cuda" else 0)
        rows.append(row(name, "model", n_targets, method, "cold", cold, cold / n_targets))
        refresh_slices_(weights, states, configs, method=method)
        flip = [0]

        def warm():
            flip[0] ^= 1
            refresh_slices_(drifted if flip[0] else weights, states, configs, method=method)
        t = timer(warm, reps=args.reps, warmup=2)
        results[method] = t
        rows.append(row(name, "model", n_targets, method, "warm", t, t / n_targets))
        for label, d1, d2, count, W, W2 in groups:  # per matrix: one shape group alone
            idx = [i for i, w in enumerate(weights) if tuple(w.shape) == (d1, d2)][:count]
            subs = [[w[i] for i in idx] for w in (weights, drifted)]
            sub_s, sub_c = [states[i] for i in idx], [configs[i] for i in idx]

            def warm_group():  # moving weights as in warm() (the same weights again converge at once)
                flip[0] ^= 1
                refresh_slices_(subs[flip[0]], sub_s, sub_c, method=method)
            tg = timer(warm_group, reps=args.reps, warmup=1)
            rows.append(row(name, f"{d1}x{d2}", count, method, "warm_group", tg, tg / count))
    for method, t in results.items():
        print(f"  {name:8s} {method:12s} whole model {t:10.2f} ms   {results['exact_svd'] / t:8.1f}x vs exact")
    return weights, drifted, configs


def bench_eigensolver(device, timer, rows, args, gen):
    """A batch (48 by default) of warm-started 169 x 169 Gram matrices, as in a ViT-B/16 refresh."""
    b, n, r = args.eig_batch, 768, 153
    k = r + 16
    W = torch.randn(b, n, n, device=device, generator=gen) / math.sqrt(n)
    V = torch.linalg.svd(W, full_matrices=False).Vh[:, :k].mT  # previous refresh's V
    W = W + 0.005 * torch.randn(b, n, n, device=device, generator=gen) / math.sqrt(n)
    Q = randomized.orthonormalize(W @ V)
    B = Q.mT @ W
    G = B @ B.mT
    G = 0.5 * (G + G.mT)
    t_eigh = timer(lambda: torch.linalg.eigh(G), reps=args.reps)
    rows.append(row("eigensolver", f"{b}x{k}x{k}", b, "torch.linalg.eigh", "warm_gram", t_eigh, t_eigh / b))
    print(f"  eigh   {b} x {k}^2 warm Gram: {t_eigh:8.3f} ms")
    if _native.available(device):
        t_nat = timer(lambda: _native.batched_eigh(G), reps=args.reps)
        _, _, sweeps = _native.batched_eigh_with_sweeps(G)
        ref = torch.linalg.eigvalsh(G.double()).flip(-1)
        w, _ = _native.batched_eigh(G)
        err = float(((w.double() - ref).abs() / ref.abs().amax(dim=-1, keepdim=True)).max())
        rows.append(row("eigensolver", f"{b}x{k}x{k}", b, "native_jacobi", "warm_gram", t_nat, t_nat / b,
                        note=f"sweeps max {int(sweeps.max())}; max rel eval err {err:.1e}; {t_eigh / t_nat:.1f}x vs eigh"))
        print(f"  native {b} x {k}^2 warm Gram: {t_nat:8.3f} ms  ({t_eigh / t_nat:.1f}x vs eigh, sweeps {int(sweeps.max())})")
        Gc = torch.randn(b, k, k + 8, device=device, generator=gen)
        Gc = Gc @ Gc.mT
        t_cold = timer(lambda: _native.batched_eigh(Gc), reps=max(args.reps // 2, 1))
        t_cold_eigh = timer(lambda: torch.linalg.eigh(Gc), reps=max(args.reps // 2, 1))
        rows.append(row("eigensolver", f"{b}x{k}x{k}", b, "native_jacobi", "cold_gram", t_cold, t_cold / b))
        rows.append(row("eigensolver", f"{b}x{k}x{k}", b, "torch.linalg.eigh", "cold_gram", t_cold_eigh, t_cold_eigh / b))


def bench_stagger(weights, drifted, configs, device, timer, rows, args, method, period=5):
    """Per-step refresh time over a staggered cycle (refresh work only, no training step)."""
    states = [new_slice_state(*w.shape, device=device) for w in weights]
    refresh_slices_(weights, states, configs, method=method)
    phases = target_phases([[(*w.shape, c.rank)] for w, c in zip(weights, configs)], period)  # AdamQ3R's and Q3R's rule
    per_phase = []
    for phase in range(period):
        idx = [i for i in range(len(weights)) if due_for_refresh(period * 3 + phase, period, phases[i])]
        subs = [[w[i] for i in idx] for w in (weights, drifted)]
        flip = [0]

        def step():  # moving weights, as in warm(): the same weights again would tie sigma_{r+1} with eps
            flip[0] ^= 1
            refresh_slices_(subs[flip[0]], [states[i] for i in idx], [configs[i] for i in idx], method=method)
        per_phase.append(timer(step, reps=args.reps, warmup=1))
    med = statistics.median(per_phase)
    note = "per-step ms " + " ".join(f"{t:.2f}" for t in per_phase) + f"; max/median {max(per_phase) / med:.2f}"
    rows.append(row("stagger", "model", len(weights), method, f"stagger_T{period}_max_step", max(per_phase),
                    max(per_phase) / len(weights), note=note))
    print(f"  stagger T={period} {method}: {note}")


ENV: dict = {}


def bench_geometric(weights, drifted, device, timer, rows, method):
    """Refreshes 2 to 4 of a `geometric` schedule from one cold refresh: the median ms of the
    three, and how many targets the fast refresh left to an exact SVD in them."""
    floors = [float(torch.linalg.svdvals(w.float())[rank_of(*w.shape) + 32]) for w in weights]
    configs = [SliceConfig(f"g{i}", rank_of(*w.shape), schedule="geometric", eps_floor=floor, num_refreshes=4)
               for i, (w, floor) in enumerate(zip(weights, floors))]
    states = [new_slice_state(*w.shape, device=device) for w in weights]
    refresh_slices_(weights, states, configs, method=method)  # cold: eps = sigma_{r+1}
    sequence = iter([drifted, weights, drifted])
    with exact_fallbacks() as exact:
        t = timer(lambda: refresh_slices_(next(sequence), states, configs, method=method), reps=3, warmup=0)
    envs = sorted(int(st["sigma"].shape[0]) for st in states)
    note = f"exact SVDs in 3 refreshes: {sum(exact)} of {3 * len(weights)}; envelopes {envs[0]}..{envs[-1]}"
    rows.append(row("geometric", "model", len(weights), method, "geometric_grown", t, t / len(weights), note=note))
    print(f"  geometric {method:12s} {t:10.2f} ms per refresh   {note}")


def row(model, shape, count, method, phase, ms, ms_per_matrix, extrapolated=0, note=""):
    return {"model": model, "shape": shape, "count": count, "method": method, "phase": phase,
            "ms": round(ms, 4), "ms_per_matrix": round(ms_per_matrix, 4), "extrapolated": extrapolated,
            "note": note, **ENV}


def environment(device):
    commit = git_commit()  # Q3R_COMMIT first: a copied tree's .git may not be the tree's commit
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    return {"device": name, "torch": torch.__version__, "triton": triton_version, "commit": commit,
            "native": _native.status().replace(",", ";"),
            "time": datetime.datetime.now().isoformat(timespec="seconds")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit", "gpt2", "llama1b", "llama7b"])
    parser.add_argument("--csv", default=os.path.join(os.path.dirname(__file__), "results", "refresh.csv"))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--eig-batch", type=int, default=48, help="batch of the eigensolver benchmark")
    parser.add_argument("--quick", action="store_true", help="ViT only, few reps, eigensolver batch 4 (CPU smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.reps, args.eig_batch = ["vit"], 2, 4
    device = torch.device(args.device)
    ENV.update(environment(device))
    print(f"device: {ENV['device']}  torch {ENV['torch']}  commit {ENV['commit']}\n{ENV['native']}")
    timer = Timer(device)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = CsvRows(args.csv)
    bench_eigensolver(device, timer, rows, args, gen)
    for name in args.models:
        weights, drifted, configs = bench_model(name, device, timer, rows, args, gen)
        if name in ("vit", "tiny"):
            for method in ("randomized", "native"):
                if method == "randomized" or _native.available(device):
                    bench_stagger(weights, drifted, configs, device, timer, rows, args, method)
                    bench_geometric(weights, drifted, device, timer, rows, method)
        del weights, drifted
    print(f"{rows.count} rows appended to {args.csv}")


class CsvRows:
    """Appends each row to the CSV as soon as it is measured (a run cut short keeps its rows)."""

    def __init__(self, path: str):
        self.path, self.count = path, 0
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def append(self, item: dict) -> None:
        new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(item))
            if new:
                writer.writeheader()
            writer.writerow(item)
        self.count += 1


if __name__ == "__main__":
    sys.exit(main())

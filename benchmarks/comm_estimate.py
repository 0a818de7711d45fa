"""Bytes communicated per rank by Q3R under DDP and FSDP2, ours vs the reference scheme.

Analytic: computed from the target shapes of the three models of shared/BENCH.md with the same
functions the code uses (assignment by cost, padding rule, sketch widths, state layout), for
8, 64 and 512 ranks. Ring collectives, per rank: an all-reduce of n bytes moves 2 (P-1)/P n,
an all_gather of n bytes per rank (P-1) n, a broadcast n. Factors in fp32, Gram matrices in
fp64. docs/distributed.md gives the formulas.

    python benchmarks/comm_estimate.py            # prints the table, writes the CSV

Assumptions: r = 0.2 min(d1, d2) per target (BENCH.md's "20% ranks"); after a refresh the
envelope rank r_env = r (the `min` schedule gives exactly r at the first refresh); the
reference implementation (ThatE10/Q3R) all-reduces a full-size fp32 gradient buffer of every
target at every step and has no sharded mode; T = 5.
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import subprocess

from q3r.distributed import replicated
from q3r.distributed.rangefinder import cold_sketch_width, sketch_width
from q3r.distributed.sharded_refresh import SketchOptions

PERIOD = 5
RANKS = (8, 64, 512)
F32, F64 = 4, 8


def vit_b16():
    """ViT-B/16: 12 blocks; qkv (2304, 768) cut into Q, K, V rows; proj; fc1; fc2 -> 72 targets."""
    per_block = [(768, 768)] * 3 + [(768, 768), (3072, 768), (768, 3072)]
    return per_block * 12


def gpt2_small():
    """GPT-2 small (HF Conv1D weights are (in, out)): c_attn (768, 2304) cut into Q, K, V columns;
    attn c_proj; mlp c_fc (768, 3072); mlp c_proj (3072, 768) -> 72 targets."""
    per_block = [(768, 768)] * 3 + [(768, 768), (768, 3072), (3072, 768)]
    return per_block * 12


def llama_1b():
    """d 2048, 16 layers with Llama-3.2-1B's shapes (BENCH.md gives only d and L): q, o (2048, 2048);
    grouped k, v (512, 2048); gate, up (8192, 2048); down (2048, 8192) -> 112 targets."""
    per_block = [(2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192)]
    return per_block * 16


MODELS = {"ViT-B/16": vit_b16, "GPT-2-small": gpt2_small, "LLaMA-1B-like": llama_1b}


def ring_all_reduce(n: float, P: int) -> float:
    return 2 * (P - 1) / P * n


def rank_of(d1, d2):
    return max(1, int(0.2 * min(d1, d2)))


def ddp_refresh_bytes(shapes, P):
    """Ours under DDP, one refresh: the same-targets check (two float64 per rank), header
    all_gather + factor exchange (padded all_gather, or one broadcast per owner when padding
    would more than double it), as in replicated.py."""
    keys = replicated._state_keys()
    header = (2 + len(shapes) * 3 * len(keys) + len(shapes) + 1) * F64  # (+1: whether the rank's refresh failed)
    owner = replicated.assign_by_cost([replicated.refresh_cost(s, rank_of(*s)) for s in shapes], P)
    sizes = [0] * P
    for (d1, d2), o in zip(shapes, owner):
        r = rank_of(d1, d2)
        tail = min(16, min(d1, d2) - r) if "tail" in keys else 0
        sizes[o] += (d1 + d2 + 1) * r + max(d1, d2) * tail + (len(keys) - 4)  # U, V, sigma, tail, scalars
    if P * max(sizes) <= replicated.PADDING_LIMIT * sum(sizes):
        factors, calls = (P - 1) * max(sizes) * F32, 3
    else:  # each rank receives every other owner's factors
        factors, calls = (sum(sizes) - min(sizes)) * F32, 2 + sum(1 for s in sizes if s)
    return (P - 1) * header + factors, calls


def fsdp_step_bytes(shapes, P):
    """Ours under FSDP2, one step: one all-reduce of every A = U^T W (r_env x d2, fp32)."""
    return ring_all_reduce(sum(rank_of(d1, d2) * d2 for d1, d2 in shapes) * F32, P)


def fsdp_refresh_bytes(shapes, P, q, cold=False):
    """Ours under FSDP2, one refresh with q power iterations: finite flags, q projections
    Z = W^T Y (d2 x k), two Cholesky-QR passes over the k x k Gram matrices (fp64),
    B = Q^T W (k x d2) with ||W||^2, and the ranks' agreement on the decisions and Ritz values
    (4 + k fp64 per target, rangefinder._agreed); all-reduces batched over targets: q + 5.
    ``cold``: a first refresh, whose sketch is wider (rangefinder.cold_sketch_width)."""
    over = SketchOptions().oversample
    width = cold_sketch_width if cold else sketch_width
    ks = [width(rank_of(d1, d2), d1, d2, over) for d1, d2 in shapes]
    gram = 2 * sum(k * k for k in ks) * F64
    proj = (q + 1) * sum(k * d2 for k, (d1, d2) in zip(ks, shapes)) * F32 + len(shapes) * F32
    flags = len(shapes) * F32
    agree = sum(4 + k for k in ks) * F64
    return ring_all_reduce(gram + proj + flags + agree, P), 1 + q + 2 + 1 + 1


def rows():
    opts = SketchOptions()
    for model, make in MODELS.items():
        shapes = make()
        full = sum(d1 * d2 for d1, d2 in shapes) * F32
        for P in RANKS:
            ref_step = ring_all_reduce(full, P)
            ddp_ref, ddp_calls = ddp_refresh_bytes(shapes, P)
            fs_step = fsdp_step_bytes(shapes, P)
            fs_ref, fs_calls = fsdp_refresh_bytes(shapes, P, opts.power_iters)
            fs_cold, _ = fsdp_refresh_bytes(shapes, P, opts.cold_power_iters, cold=True)
            common = dict(model=model, targets=len(shapes), target_MB=full / 1e6, ranks=P)
            yield dict(common, engine="DDP", scheme="reference", step_MB=ref_step / 1e6, refresh_MB=0.0,
                       avg_step_MB=ref_step / 1e6, calls_step="1+", calls_refresh=0,
                       engine_own_MB=ring_all_reduce(full, P) / 1e6)
            yield dict(common, engine="DDP", scheme="ours", step_MB=0.0, refresh_MB=ddp_ref / 1e6,
                       avg_step_MB=ddp_ref / PERIOD / 1e6, calls_step=0, calls_refresh=ddp_calls,
                       engine_own_MB=ring_all_reduce(full, P) / 1e6)
            yield dict(common, engine="FSDP2", scheme="reference", step_MB=float("nan"), refresh_MB=float("nan"),
                       avg_step_MB=float("nan"), calls_step="n/a", calls_refresh="n/a",
                       engine_own_MB=3 * (P - 1) / P * full / 1e6)
            yield dict(common, engine="FSDP2", scheme="ours", step_MB=fs_step / 1e6, refresh_MB=fs_ref / 1e6,
                       avg_step_MB=(fs_step + fs_ref / PERIOD) / 1e6, calls_step=1, calls_refresh=fs_calls,
                       engine_own_MB=3 * (P - 1) / P * full / 1e6, cold_refresh_MB=fs_cold / 1e6)


def fmt(x):
    if isinstance(x, str):
        return x
    if x != x:
        return "n/a"
    return f"{x:,.1f}" if x >= 1 or x == 0 else f"{x:.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", default=str(pathlib.Path(__file__).parent / "results" / "comm_estimate.csv"))
    args = ap.parse_args()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=pathlib.Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    table = list(rows())
    print("| model | ranks | engine | scheme | per step (MB) | per refresh (MB) | avg per step, T=5 (MB) "
          "| collectives step / refresh | engine's own traffic for the targets per step (MB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['model']} | {r['ranks']} | {r['engine']} | {r['scheme']} | {fmt(r['step_MB'])} | "
              f"{fmt(r['refresh_MB'])} | {fmt(r['avg_step_MB'])} | {r['calls_step']} / {r['calls_refresh']} | "
              f"{fmt(r['engine_own_MB'])} |")
    path = pathlib.Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ["model", "targets", "target_MB", "ranks", "engine", "scheme", "step_MB", "refresh_MB",
              "cold_refresh_MB", "avg_step_MB", "calls_step", "calls_refresh", "engine_own_MB"]
    with path.open("w", newline="") as f:  # deterministic numbers: rewritten, not appended
        writer = csv.DictWriter(f, fieldnames=fields + ["commit", "source"])
        writer.writeheader()
        for r in table:
            writer.writerow({**{k: r.get(k, "") for k in fields}, "commit": commit, "source": "analytic"})
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()

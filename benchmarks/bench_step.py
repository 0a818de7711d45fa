"""Per-step cost of Q3R against fused AdamW, on the models of BENCH.md, in one run.

For each model (bf16 autocast forward + backward, fp32 weights; 20% ranks, r = 0.2 min(d1, d2)
per slice; Q/K/V as separate slices; T = 5, lambda = 0.1) it reports:

  fwd_bwd_ms                 forward + backward
  adamw_step_ms              torch.optim.AdamW(fused=True).step()
  adamq3r_{ref,fast}_step_ms AdamQ3R.step() on the reference path / the Triton path, refresh excluded
  adamq3r_fast_lmbda0_step_ms  the fused kernel with lambda = 0 (its plain-Adam cost)
  q3r_work_{ref,fast}_ms     the per-step Q3R work alone: 2 lambda R(W) added into every target's
                             gradient (what Q3R.add_grad_ does), reference / Triton
  train_{adamw,adamq3r_ref,adamq3r_fast}_ms   a whole training step (fwd + bwd + optimizer)
  ratio_train_fast_over_adamw_interleaved    the same ratio from AdamW and AdamQ3R steps taken
                             in turn on one model (median of per-pair ratios; drift falls on both)
  peak_{...}_bytes           peak allocated CUDA memory during that training step
  peak_{...}_requested_bytes the same in the bytes the tensors asked for (no allocator rounding)
  start_{...}_bytes          CUDA memory allocated when that training step began
  factor_bytes, tail_bytes   the U, V factors of all targets; the warm-start tails a refresh keeps
and the ratios; peak_fast_above_adamw_and_factors_frac_of_factors is BENCH.md's memory target
(the excess over AdamW and U, V, as a fraction of U, V: <= 5%; its _requested_ twin counts
requested bytes, start_fast_above_adamw_bytes the part of the excess held before the step
began: optimizer state, not transients). Refreshes are replaced by random factors of the target rank (sigma in (1, 2],
eps = 1, so every triplet is active): this benchmark is about the steps between refreshes;
bench_refresh.py measures refreshes. Timings: CUDA events, median, after warm-up.

    python benchmarks/bench_step.py [--models vit_b16,gpt2_small,llama_1b] [--sweep] [--profile]
        [--fp32-matmul highest|high] [--csv benchmarks/results/bench_step.csv] [--dry-run]

--cycle adds, per model, whole training steps over T-step cycles with real refreshes
(refresh="auto", weights moving under training), without and with stagger=True:
  cycle_{plain,stagger}_phase{p}_ms   median over cycles of the step at phase p of the cycle
  cycle_{plain,stagger}_max_over_median  slowest phase / median phase (issue: <= 1.1 staggered)
  cycle_{plain,stagger}_mean_over_adamw  mean training step, refreshes included / AdamW's mean
                                         over as many steps (BENCH.md: <= 1.05x at T = 5)

--fp32-matmul sets torch.set_float32_matmul_precision for the whole run (the model's fp32
matmuls and, through q3r_kernels.CONFIG.precision = "auto", the kernels' fp32 dots:
highest -> tf32x3, high -> tf32); rows of a "high" run are named bench_step[fp32_matmul=high].
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

if "--dry-run" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import q3r  # noqa: E402
from q3r import ops  # noqa: E402
from q3r.refresh import SketchOptions  # noqa: E402
from q3r.targets import slice_shapes, slice_views  # noqa: E402

LMBDA, T, RANK_FRACTION = 0.1, 5, 0.2
TAIL_OVERSAMPLING = SketchOptions().oversampling  # (the default: what a real refresh keeps)


def q3r_targets(targets):
    out = []
    for name, p, dim, slices in targets:
        ranks = [int(RANK_FRACTION * min(d1, d2)) for d1, d2 in slice_shapes(p.shape, dim, slices)]
        out.append(q3r.Target(name, p, dim, slices, target_rank=ranks if slices else ranks[0]))
    return out


def fake_refresh(opt):
    """Replace the refresh by random factors of the target rank (see the module docstring)."""

    def refresh(due, before_wait=None):
        if before_wait is not None:  # (AdamQ3R.step: the updates of the others, queued first)
            before_wait()
        for p, group in due:
            for state in opt.state[p]["q3r"]:
                d1, d2 = state["U"].shape[0], state["V"].shape[0]
                k = int(RANK_FRACTION * min(d1, d2))
                # row-major, as a real refresh commits them (QR's Q is column-major)
                state["U"] = torch.linalg.qr(torch.randn(d1, k, device=p.device))[0].contiguous()
                state["V"] = torch.linalg.qr(torch.randn(d2, k, device=p.device))[0].contiguous()
                # the warm-start tail a real refresh keeps (2 x oversampling columns on the longer
                # side): memory only, the per-step work does not read it
                state["tail"] = torch.zeros(max(d1, d2), min(2 * TAIL_OVERSAMPLING, min(d1, d2) - k), device=p.device)
                state["sigma"] = torch.sort(1 + torch.rand(k, device=p.device), descending=True).values
                state["eps"] = torch.tensor(1.0, device=p.device)

    opt.refresh = refresh


def set_backend(name: str) -> None:
    os.environ["Q3R_BACKEND"] = name


def bench_model(key: str, sweep: bool, tiny: bool = False, profile: bool = False) -> tuple[str, list]:
    device = "cpu" if tiny else "cuda"
    model, make_batch, loss_fn, targets, label = C.MODELS[key](device=device, tiny=tiny)
    params = [p for p in model.parameters() if p.requires_grad]
    data = make_batch()
    res: list[tuple[str, float, str]] = []

    def fwd_bwd():
        for p in params:
            p.grad = None
        with torch.autocast(device, dtype=torch.bfloat16, enabled=not tiny):
            loss = loss_fn(model, data)
        loss.backward()

    res.append(("fwd_bwd_ms", C.cuda_time_ms(fwd_bwd), "ms"))

    # ---- fused AdamW
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=not tiny)
    fwd_bwd()
    opt.step()
    res.append(("adamw_step_ms", C.cuda_time_ms(opt.step), "ms"))

    def train_adamw():
        fwd_bwd()
        opt.step()

    res.append(("train_adamw_ms", C.cuda_time_ms(train_adamw, warmup=2, iters=8), "ms"))
    res += memory_rows("adamw", train_adamw)
    del opt
    gc.collect()
    torch.cuda.empty_cache()

    # ---- AdamQ3R
    tq = q3r_targets(targets)
    groups = q3r.param_groups(model, tq, weight_decay=0.05, lmbda=LMBDA, steps=T)
    opt = q3r.AdamQ3R(groups, lr=1e-4)
    fake_refresh(opt)
    fwd_bwd()
    set_backend("triton")
    opt.step()  # refresh (random factors), plan, compilation
    for g in opt.param_groups:
        g["steps"] = 10**9  # no refresh inside the timed steps
    slice_states = [s for st in opt.state.values() for s in st.get("q3r", [])]
    factor_bytes = sum(s["U"].numel() * 4 + s["V"].numel() * 4 for s in slice_states)  # U and V only
    tail_bytes = sum(s["tail"].numel() * 4 for s in slice_states)
    if profile or sweep:  # separate passes: kernel by kernel, or only the tile settings
        weights, grads, factors = [], [], []
        for t in tq:
            weights += slice_views(t.param.detach(), t.slice_dim, t.slices)
            grads += slice_views(t.param.grad, t.slice_dim, t.slices)
            factors += [(s["U"], s["V"], s["sigma"], s["eps"]) for s in opt.state[t.param]["q3r"]]
        work = lambda: ops.add_reweighting_(grads, weights, factors, 2 * LMBDA)  # noqa: E731
        if profile:
            return label, profile_step(opt.step, "step") + profile_step(work, "work")
        return label, sweep_configs(opt, work)
    res.append(("factor_bytes", factor_bytes, "bytes"))
    res.append(("tail_bytes", tail_bytes, "bytes"))
    res.append(("adamq3r_fast_step_ms", C.cuda_time_ms(opt.step), "ms"))
    set_backend("reference")
    res.append(("adamq3r_ref_step_ms", C.cuda_time_ms(opt.step, warmup=1, iters=5), "ms"))

    def train_q3r():
        fwd_bwd()
        opt.step()

    set_backend("triton")
    res.append(("train_adamq3r_fast_ms", C.cuda_time_ms(train_q3r, warmup=2, iters=8), "ms"))
    res += memory_rows("adamq3r_fast", train_q3r)
    set_backend("reference")
    res.append(("train_adamq3r_ref_ms", C.cuda_time_ms(train_q3r, warmup=1, iters=4), "ms"))
    res += memory_rows("adamq3r_ref", train_q3r)
    set_backend("triton")
    res += interleaved_rows(params, fwd_bwd, train_q3r, tiny)

    # ---- the per-step Q3R work alone: 2 lambda R(W) into every target gradient
    weights, grads, factors = [], [], []
    for t in tq:
        weights += slice_views(t.param.detach(), t.slice_dim, t.slices)
        grads += slice_views(t.param.grad, t.slice_dim, t.slices)
        factors += [(s["U"], s["V"], s["sigma"], s["eps"]) for s in opt.state[t.param]["q3r"]]
    res.append(("q3r_work_ref_ms", C.cuda_time_ms(lambda: ops.add_reweighting_(grads, weights, factors, 2 * LMBDA),
                                                  warmup=1, iters=5), "ms"))
    set_backend("triton")
    res.append(("q3r_work_fast_ms", C.cuda_time_ms(lambda: ops.add_reweighting_(grads, weights, factors, 2 * LMBDA)),
                "ms"))

    # ---- the fused kernel's own plain-Adam cost (lambda = 0 -> no Q3R regions)
    for g in opt.param_groups:
        g["_lmbda"], g["lmbda"] = g["lmbda"], 0.0 if g.get("q3r") else g["lmbda"]
    res.append(("adamq3r_fast_lmbda0_step_ms", C.cuda_time_ms(opt.step), "ms"))
    for g in opt.param_groups:
        g["lmbda"] = g.pop("_lmbda")


    v = dict((n, x) for n, x, _ in res)
    res += [
        ("ratio_q3r_work_ref_over_fast", v["q3r_work_ref_ms"] / v["q3r_work_fast_ms"], "x"),
        ("ratio_step_fast_over_adamw", v["adamq3r_fast_step_ms"] / v["adamw_step_ms"], "x"),
        ("ratio_train_fast_over_adamw", v["train_adamq3r_fast_ms"] / v["train_adamw_ms"], "x"),
        ("ratio_train_ref_over_adamw", v["train_adamq3r_ref_ms"] / v["train_adamw_ms"], "x"),
        ("peak_fast_above_adamw_bytes", v["peak_adamq3r_fast_bytes"] - v["peak_adamw_bytes"], "bytes"),
        # BENCH.md: above fused AdamW, "the factors U, V only (+5%)": the excess over U and V as a
        # fraction of U and V (the warm-start tails count as excess). Before 2026-11-24 this row
        # divided by AdamW's whole peak instead ("_minus_factors_frac" in older CSV rows).
        ("peak_fast_above_adamw_and_factors_frac_of_factors",
         (v["peak_adamq3r_fast_bytes"] - v["peak_adamw_bytes"] - factor_bytes) / max(factor_bytes, 1), "frac"),
        ("peak_ref_above_adamw_bytes", v["peak_adamq3r_ref_bytes"] - v["peak_adamw_bytes"], "bytes"),
        # the same counted in requested bytes (no allocator rounding), and how much of the
        # excess was already allocated before the training step began (state, not transients)
        ("peak_requested_fast_above_adamw_and_factors_frac_of_factors",
         (v["peak_adamq3r_fast_requested_bytes"] - v["peak_adamw_requested_bytes"] - factor_bytes)
         / max(factor_bytes, 1), "frac"),
        ("start_fast_above_adamw_bytes", v["start_adamq3r_fast_bytes"] - v["start_adamw_bytes"], "bytes"),
    ]
    del opt, model, params, grads, weights, factors
    gc.collect()
    torch.cuda.empty_cache()
    return label, res


def interleaved_rows(params, fwd_bwd, train_q3r, tiny: bool, pairs: int = 12) -> list[tuple[str, float, str]]:
    """Whole training steps with fused AdamW and with AdamQ3R (fast path) taken in turn on the
    same model, so that drift of the machine (clocks, temperature, a neighbour) falls on both
    alike: train_{adamw,adamq3r_fast}_interleaved_ms (medians) and the median of the per-pair
    ratios. A second AdamW is made for this and dropped after (the peak memory rows are
    measured before it exists)."""
    adamw = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=not tiny)

    def train_adamw():
        fwd_bwd()
        adamw.step()

    for _ in range(1 if tiny else 2):  # warm-up (AdamW's state is made here)
        train_adamw()
        train_q3r()
    pairs = 1 if tiny else pairs
    times = [(C.step_times_ms(train_adamw, 1)[0], C.step_times_ms(train_q3r, 1)[0]) for _ in range(pairs)]
    del adamw
    gc.collect()
    ratios = [q / a for a, q in times]
    return [("train_adamw_interleaved_ms", statistics.median(a for a, _ in times), "ms"),
            ("train_adamq3r_fast_interleaved_ms", statistics.median(q for _, q in times), "ms"),
            ("ratio_train_fast_over_adamw_interleaved", statistics.median(ratios), "x")]


def memory_rows(name: str, train_step) -> list[tuple[str, float, str]]:
    """peak_{name}_bytes (allocated), peak_{name}_requested_bytes and start_{name}_bytes of one
    training step (see _common.memory_during)."""
    mem = C.memory_during(train_step)
    return [(f"peak_{name}_bytes", mem["peak"], "bytes"), (f"peak_{name}_requested_bytes", mem["requested_peak"], "bytes"),
            (f"start_{name}_bytes", mem["start"], "bytes")]


def profile_step(fn, tag: str, steps: int = 3) -> list[tuple[str, float, str]]:
    """Device time per kernel over a few calls of fn (torch.profiler), per call, and the
    host time of a call (wall time up to the last launch, no synchronization inside)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0]
    events.sort(key=lambda e: -e.device_time_total)
    out = [(f"profile_{tag}_device_ms[{e.key[:60]}]", e.device_time_total / 1e3 / steps, "ms") for e in events[:10]]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    out.append((f"profile_{tag}_host_ms", (time.perf_counter() - start) * 1e3 / steps, "ms"))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out


def bench_cycle(key: str, tiny: bool = False, cycles: int = 3, warm_cycles: int = 2) -> tuple[str, list]:
    """Whole training steps with real refreshes, step by step over T-step cycles."""
    set_backend("auto")  # what a user gets: Triton on CUDA, the reference path elsewhere
    device = "cpu" if tiny else "cuda"
    model, make_batch, loss_fn, targets, label = C.MODELS[key](device=device, tiny=tiny)
    params = [p for p in model.parameters() if p.requires_grad]
    data = make_batch()
    initial = [p.detach().clone() for p in params]
    res: list[tuple[str, float, str]] = []

    def train_step(opt):
        for p in params:
            p.grad = None
        with torch.autocast(device, dtype=torch.bfloat16, enabled=not tiny):
            loss = loss_fn(model, data)
        loss.backward()
        opt.step()

    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=not tiny)
    C.step_times_ms(lambda: train_step(opt), 2)  # warm-up
    adamw_times = C.step_times_ms(lambda: train_step(opt), cycles * T)
    adamw = sum(adamw_times) / len(adamw_times)  # a mean, as the cycles' below (was a median of 8)
    res.append(("cycle_train_adamw_ms", adamw, "ms"))
    del opt
    for stagger in (False, True):
        with torch.no_grad():
            for p, p0 in zip(params, initial):
                p.copy_(p0)
        groups = q3r.param_groups(model, q3r_targets(targets), weight_decay=0.05, lmbda=LMBDA, steps=T,
                                  refresh="auto", stagger=stagger)
        opt = q3r.AdamQ3R(groups, lr=1e-4)
        tag = "stagger" if stagger else "plain"
        C.step_times_ms(lambda: train_step(opt), warm_cycles * T)  # first (cold) refreshes, plans, compilation
        times = C.step_times_ms(lambda: train_step(opt), cycles * T)
        phases = [sorted(times[p::T])[len(times[p::T]) // 2] for p in range(T)]
        res += [(f"cycle_{tag}_phase{p}_ms", t, "ms") for p, t in enumerate(phases)]
        res.append((f"cycle_{tag}_max_over_median", max(phases) / sorted(phases)[T // 2], "x"))
        res.append((f"cycle_{tag}_mean_over_adamw", sum(times) / len(times) / adamw, "x"))
        del opt
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return label + " cycle", res


def sweep_configs(opt, work_fast) -> list[tuple[str, float, str]]:
    """A few tile settings and the dot precision (each new setting compiles afresh)."""
    import q3r_kernels as K

    saved = dict(vars(K.CONFIG))
    out = []
    for change in [dict(precision="tf32"), dict(block_m=128, num_warps=8, num_stages=4),  # the defaults before 06917ee
                   dict(block_n=128), dict(num_stages=4), dict(block_k=16), dict(proj_block_m=256, proj_block_n=32),
                   dict(proj_block_k=32, proj_num_stages=4), dict(projt_block_n=256, projt_num_warps=8, projt_num_stages=3),
                   dict(projt_block_m=64, projt_num_warps=8, projt_num_stages=3), dict(small_block_m=128)]:
        vars(K.CONFIG).update(saved)
        vars(K.CONFIG).update(change)
        tag = ",".join(f"{k}={v}" for k, v in change.items())
        try:
            out.append((f"sweep_q3r_work_fast_ms[{tag}]", C.cuda_time_ms(work_fast), "ms"))
            out.append((f"sweep_adamq3r_fast_step_ms[{tag}]", C.cuda_time_ms(opt.step), "ms"))
        except Exception as exc:  # a setting that does not compile is a result too
            print(f"sweep {tag}: {type(exc).__name__}: {exc}", flush=True)
    vars(K.CONFIG).update(saved)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="vit_b16,gpt2_small,llama_1b")
    ap.add_argument("--csv", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_step.csv"))
    ap.add_argument("--sweep", action="store_true", help="then time a few tile settings on ViT-B/16")
    ap.add_argument("--profile", action="store_true", help="then profile the fast step of each model, per kernel")
    ap.add_argument("--cycle", action="store_true",
                    help="then time whole training steps over T-step cycles with real refreshes, plain and staggered")
    ap.add_argument("--fp32-matmul", choices=["highest", "high"], default="highest",
                    help="torch.set_float32_matmul_precision for the run (default: torch's own, highest)")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny models on CPU under TRITON_INTERPRET=1, no CSV: checks the script, measures nothing")
    args = ap.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("bench_step.py needs a CUDA device (or --dry-run)")
    torch.manual_seed(0)
    torch.set_float32_matmul_precision(args.fp32_matmul)
    meta = C.metadata()
    print(f"# {meta} fp32_matmul={args.fp32_matmul}", flush=True)
    runs = [(key, "") for key in args.models.split(",")]
    runs += [(key, "profile") for key in args.models.split(",") if args.profile]
    runs += [(key, "cycle") for key in args.models.split(",") if args.cycle]
    runs += [("vit_b16", "sweep")] if args.sweep else []
    for key, extra in runs:  # extras last: the main table must not wait for their compilations
        t0 = time.time()
        if extra == "cycle":
            label, res = bench_cycle(key, tiny=args.dry_run, **(dict(cycles=1, warm_cycles=1) if args.dry_run else {}))
        else:
            label, res = bench_model(key, sweep=extra == "sweep", tiny=args.dry_run, profile=extra == "profile")
        if not args.dry_run:
            name = "bench_step" if args.fp32_matmul == "highest" else f"bench_step[fp32_matmul={args.fp32_matmul}]"
            C.append_csv(args.csv, [{**meta, "benchmark": name, "model": label, "measure": n,
                                  "value": f"{x:.6g}", "unit": u} for n, x, u in res])
        print(f"\n## {label}  ({time.time() - t0:.0f} s)")
        for n, x, u in res:
            shown = f"{x / 2**20:.1f} MiB" if u == "bytes" else f"{x:.4g} {u}"
            print(f"  {n:<48} {shown}", flush=True)


if __name__ == "__main__":
    main()

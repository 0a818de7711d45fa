"""The benchmark scripts still run: bench_step's --dry-run (tiny models on CPU under the
Triton interpreter) goes through every measurement path and prints every measure.
It measures nothing; the numbers come from a GPU run (benchmarks/results)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_step_dry_run_prints_every_measure():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--dry-run", "--models", "vit_b16",
         "--fp32-matmul", "high", "--cycle"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fp32_matmul=high" in out.stdout
    for measure in ("fwd_bwd_ms", "adamw_step_ms", "adamq3r_ref_step_ms", "adamq3r_fast_step_ms",
                    "q3r_work_ref_ms", "q3r_work_fast_ms", "ratio_train_fast_over_adamw", "tail_bytes",
                    "ratio_train_fast_over_adamw_interleaved",
                    "peak_fast_above_adamw_and_factors_frac_of_factors",
                    "peak_requested_fast_above_adamw_and_factors_frac_of_factors", "start_fast_above_adamw_bytes",
                    "cycle_plain_phase4_ms", "cycle_stagger_max_over_median", "cycle_stagger_mean_over_adamw"):
        assert measure in out.stdout, f"{measure} missing from:\n{out.stdout[-3000:]}"


def test_profile_refresh_runs_on_cpu():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "profile_refresh.py"), "--model", "tiny", "--method", "randomized",
         "--device", "cpu", "--rows", "5", "--reps", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "warm refresh ms:" in out.stdout and "top-level aten ops in one warm refresh" in out.stdout
    assert "aten::" in out.stdout and "kept widths" in out.stdout


def test_bench_refresh_takes_the_commit_from_q3r_commit():
    """A copied tree's .git can name another commit (it did on the device machine)."""
    env = {**os.environ, "Q3R_COMMIT": "feedbeef"}
    out = subprocess.run(
        [sys.executable, "-c", "import sys, torch; sys.path.insert(0, 'benchmarks'); import bench_refresh; "
         "print(bench_refresh.environment(torch.device('cpu'))['commit'])"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "feedbeef"


def test_plan_overhead_runs_on_cpu():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plan_overhead.py")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for line in ("step, cached plan", "plan rebuilt from scratch", "(staggered)", "control",
                 "add_grad_, cached plan", "add_grad_, plan rebuilt"):
        assert line in out.stdout, out.stdout[-2000:]


def test_refresh_attempts_runs_on_cpu():
    """A CUDA probe that wraps q3r internals by name: the smoke run catches a renamed one."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "refresh_attempts.py"), "--model", "tiny", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert [line.split()[0] for line in lines[1:]] == [f"flip{i}" for i in range(6)] + [f"same{i}" for i in range(5)]
    if "method native" in lines[0]:  # the native solver's stacks send their scalars together
        assert all("'to_host': 1" in line for line in lines[1:]), out.stdout  # one host transfer per warm refresh


def test_stagger_timeline_runs_on_cpu():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stagger_timeline.py"), "vit_b16", "--device", "cpu", "--tiny"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"stagger={s} step {i}" for s in (True, False) for i in range(5)]
    assert sum("refresh>" in line for line in lines) >= 2 and all("done h" in line for line in lines), out.stdout


def test_bench_refresh_times_the_geometric_schedule_and_counts_exact_svds(monkeypatch):
    import torch

    import q3r.refresh as R

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_refresh as B

    device = torch.device("cpu")
    groups = B.make_weights(B.model_shapes("tiny"), device, torch.Generator().manual_seed(0))
    weights, drifted = [w for g in groups for w in g[4]], [w for g in groups for w in g[5]]
    rows, sketched = [], R.refresh_sketched
    B.bench_geometric(weights, drifted, device, B.Timer(device), rows, "randomized")
    assert R.refresh_sketched is sketched  # its counter is taken out again
    (r,) = rows
    assert r["phase"] == "geometric_grown" and r["count"] == 9 and r["ms"] > 0
    # tiny targets are too narrow for a sketch twice as wide: every grown one takes the exact SVD
    assert r["note"].startswith("exact SVDs in 3 refreshes: 27 of 27")

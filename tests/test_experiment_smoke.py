"""The vit-fmnist pipeline end to end at its smoke size (CPU, ~1-2 minutes): it checks that
the harness trains every method, truncates, and writes a sane table; it is not the claim."""

import csv
import json
import subprocess
import sys

import pytest

from q3r.experiments import fashion_mnist
from q3r.experiments.harness import make_config, plan


def _have_data() -> bool:
    try:
        fashion_mnist.data_dir()
        return True
    except FileNotFoundError:
        return False


def test_missing_data_names_the_install_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        fashion_mnist.data_dir(tmp_path)


def test_plan_covers_every_method_and_target_set():
    specs = plan(make_config("full"))
    methods = {(s.method, s.target_set) for s in specs}
    for m in ("q3r", "lora", "lorita"):
        assert (m, "qkv") in methods and (m, "qkv+mlp") in methods
    assert ("dense", None) in methods
    assert len({s.run_id for s in specs}) == len(specs)


@pytest.mark.skipif(not _have_data(), reason="Fashion-MNIST missing: apt-get install -y dataset-fashion-mnist")
def test_smoke_run_writes_a_sane_table(tmp_path):
    out = tmp_path / "smoke"
    cmd = [sys.executable, "-m", "q3r.experiments.cli", "vit-fmnist", "--size", "smoke", "--out", str(out), "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("results.json", "results.csv", "results.md", "results.png"):
        assert (out / name).stat().st_size > 0
    summary = json.loads((out / "results.json").read_text())
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["method"] for r in rows} >= {"dense+SVD", "Q3R (trained at 20%)", "LoRA from scratch", "LoRITa N=2"}
    assert all(0.0 <= float(r["test_acc"]) <= 1.0 for r in rows)
    dense = {(r["target_set"], float(r["fraction"])): float(r["test_acc"]) for r in rows if r["method"] == "dense+SVD"}
    for s in ("qkv", "qkv+mlp"):
        assert dense[(s, 1.0)] > 0.2  # it learned something (10 classes: chance is 0.1)
        assert dense[(s, 0.1)] <= dense[(s, 1.0)] + 0.05  # keeping more parameters does not grossly hurt
        params = [int(r["model_params"]) for r in rows if r["method"] == "dense+SVD" and r["target_set"] == s]
        assert params == sorted(params, reverse=True)  # 100% .. 10% kept: fewer parameters each step
    assert summary["claims"] and all(isinstance(c["holds"], bool) for c in summary["claims"])
    # Resuming finds every run finished and trains nothing.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "7 already finished" in again.stdout

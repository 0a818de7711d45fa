"""Seed check of the full GPU run: re-train with seed 1 the configurations that seed 0 chose
for the decisive cells (Q3R against LoRA and dense+SVD at 40% and 20% kept).

    python results/vit-fmnist/gpu/seed1/seed_check.py DATA_DIR OUT_DIR [WORKERS]

Writes OUT_DIR/<run>.json (the harness's per-run result) for each configuration.
"""
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch

from q3r.experiments import harness
from q3r.experiments.training import RunSpec

SPECS = [
    RunSpec("dense", None, None, {"wd": 0.05}),
    RunSpec("dense", None, None, {"wd": 1.0}),
    RunSpec("q3r", "qkv", 0.2, {"lmbda": 1.0}),
    RunSpec("lora", "qkv", 0.2, {"lr": 1e-3}),
    RunSpec("q3r", "qkv+mlp", 0.2, {"lmbda": 1.0}),
    RunSpec("lora", "qkv+mlp", 0.2, {"lr": 1e-3}),
    RunSpec("q3r", "qkv+mlp", 0.4, {"lmbda": 4.0}),
    RunSpec("lora", "qkv+mlp", 0.4, {"lr": 1e-3}),
]


def main():
    data_dir, out = sys.argv[1], sys.argv[2]
    workers = int(sys.argv[3]) if len(sys.argv) > 3 else len(SPECS)
    cfg = harness.make_config("full", seed=1)
    os.makedirs(out + "/ckpt", exist_ok=True)
    ctx = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futs = {pool.submit(harness._run_in_worker, cfg, s, data_dir, "cuda", out + "/ckpt", 1): s for s in SPECS}
        for f in as_completed(futs):
            r = f.result()
            with open(f"{out}/{r['run']}.json", "w") as fh:
                json.dump(r, fh, indent=1)
            print("finished", r["run"], f"{r['train_seconds']:.0f}s", flush=True)


if __name__ == "__main__":
    main()

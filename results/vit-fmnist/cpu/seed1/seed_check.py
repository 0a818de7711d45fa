"""Seed check: re-train the configurations chosen at seed 0 with seed 1 (cpu size)."""
import json, os, sys, tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
import torch
from q3r.experiments import harness
from q3r.experiments.training import RunSpec

SPECS = [
    RunSpec("dense", None, None, {"wd": 0.05}),
    RunSpec("dense", None, None, {"wd": 1.0}),
    RunSpec("q3r", "qkv+mlp", 0.2, {"lmbda": 1.0}),
    RunSpec("lora", "qkv+mlp", 0.2, {"lr": 3e-3}),
    RunSpec("q3r", "qkv", 0.4, {"lmbda": 4.0}),
    RunSpec("lora", "qkv", 0.4, {"lr": 3e-3}),
    RunSpec("lorita", "qkv+mlp", None, {"wd": 0.1, "depth": 2}),
    RunSpec("q3r", "qkv+mlp", 0.4, {"lmbda": 1.0}),
]

def main():
    cfg = harness.make_config("cpu", seed=1)
    out = "/work/runs/seed1"
    os.makedirs(out + "/ckpt", exist_ok=True)
    ctx = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=ctx) as pool:
        futs = {pool.submit(harness._run_in_worker, cfg, s, None, "cpu", out + "/ckpt", 1): s for s in SPECS}
        for f in as_completed(futs):
            r = f.result()
            json.dump(r, open(f"{out}/{r['run']}.json", "w"), indent=1)
            print("finished", r["run"], flush=True)

if __name__ == "__main__":
    main()

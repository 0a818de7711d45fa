"""The refresh of FSDP2-sharded targets (q3r.distributed.sharded_refresh.refresh_sharded_) against the
exact SVD at ViT-B size (768 x 768, rank 153), on the spectra and drifts of
refresh_accuracy_probe.py, with the accuracy contract of issue 4 (R(X) within 1e-3,
sigma_{r+1} within 1%).

Runs in one process: a gloo group of world size 1 and a 1-D mesh, so the weight is a DTensor
with Shard(0) whose one shard is the whole matrix; the range finder is the same code that runs
on many ranks (its collectives are then no-ops).

    python benchmarks/results/probes/sharded_refresh_accuracy_probe.py [--size 768] [--refreshes 3]
        [--kinds ...] [--drifts ...] [--configure "max_lag=1.0"]   (that one: the lag rule off)
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

# this checkout's q3r, whatever is installed (the folder of a script run directly is on the
# path already, so its sibling probe imports as it is)
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "python"))

import torch.distributed as dist  # noqa: E402

from refresh_accuracy_probe import against_exact  # noqa: E402


def worst_errors(kind: str, n: int, rank: int, refreshes: int, drift: float, seed: int = 0):
    """max over refreshes and 2 targets of (R(X) relative error, sigma_{r+1} relative error),
    and the last refresh's (sharded, exact) envelope sizes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from q3r.distributed.sharded_refresh import refresh_sharded_

    mesh = init_device_mesh("cpu", (1,))

    def refresh(weights, fast, configs):
        params = [distribute_tensor(w, mesh, [Shard(0)]) for w in weights]
        refresh_sharded_(params, [(0, None)] * len(params), [[s] for s in fast], [[c] for c in configs], set())

    worst_r, worst_s, fast, exact = against_exact(refresh, kind, n, rank, refreshes, drift, seed)
    envelopes = [(int((f["sigma"] > f["eps"]).sum()), int(e["sigma"].shape[0])) for f, e in zip(fast, exact)]
    return worst_r, worst_s, envelopes


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=768)
    ap.add_argument("--refreshes", type=int, default=3)
    ap.add_argument("--drifts", type=float, nargs="+", default=[1e-3, 1e-2, 3e-2])
    ap.add_argument("--kinds", nargs="+", default=["trained_decay", "exp_decay", "q3r_tail_1e-2", "q3r_tail_1e-3", "random_init"])
    ap.add_argument("--configure", default="", help="q3r.distributed.configure arguments, e.g. \"max_lag=1.0\"")
    args = ap.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    import q3r.distributed
    from q3r.distributed.sharded_refresh import SKETCH

    q3r.distributed.configure(**eval(f"dict({args.configure})", {}))

    rank = int(0.2 * args.size)
    print(f"# {args.size} x {args.size}, rank {rank}, {args.refreshes} refreshes (cold, then warm on drifting weights), "
          f"sharded range finder {SKETCH}; worst of 2 targets; contract: R(X) <= 1e-3, sigma_(r+1) <= 1e-2", flush=True)
    print(f"{'spectrum':>16} | {'drift':>6} | {'R(X) err':>9} | {'sigma err':>9} | envelopes at the last refresh (sharded, exact)")
    for kind in args.kinds:
        for drift in args.drifts:
            r, s, envelopes = worst_errors(kind, args.size, rank, args.refreshes, drift)
            print(f"{kind:>16} | {drift:6.0e} | {r:9.2e} | {s:9.2e} | {envelopes}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""The sharded range finder (q3r.distributed.rangefinder.enveloping_svd, FSDP2's refresh) along
real training runs, on one rank: at every warm refresh of an AdamQ3R run (the models of
training_refresh_accuracy_probe.py, refreshed by the single-process refresh as usual), each
target's pre-refresh state and weights go through enveloping_svd with q3r.distributed's
settings (identity all-reduce: world size 1), and the R(X) it gives is compared with an exact
float64 SVD's (relative Frobenius error, eps by the target's schedule from each one's own
sigma_{r+1}; worst of 2 Gaussian X).  The warm starts are the single-process refresh's
factors, not the sharded refresh's own.

Usage: OMP_NUM_THREADS=1 python benchmarks/results/probes/sharded_training_probe.py --model mlp \\
          --lmbda 3.0 --epochs 50 --out x.json     (then --summarize x.json y.json ...)
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import residual_estimate_probe as E  # noqa: E402

from q3r import reference  # noqa: E402
from q3r.distributed import sharded_refresh as sharded  # noqa: E402
import q3r.distributed.rangefinder as rangefinder  # noqa: E402
from q3r.distributed.rangefinder import enveloping_svd, sketch_width  # noqa: E402

RECORDS = []
GEN = torch.Generator().manual_seed(11)
SKETCHES = [0]  # range_finder_svd calls: the sketches a refresh took (its cost)
_range_finder_svd = rangefinder.range_finder_svd


def _counted(*args, **kwargs):
    SKETCHES[0] += 1
    return _range_finder_svd(*args, **kwargs)


rangefinder.range_finder_svd = _counted


def RESIDUAL(cfg):
    """enveloping_svd's residual-check arguments as sharded_refresh.py passes them (none before the
    check existed: this probe's first results, at 159d2fb, ran without them)."""
    return [cfg.rank], sharded.SKETCH.max_residual


def check(views, states, configs, step):
    S_ = sharded.SKETCH
    for W, st, cfg in zip(views, states, configs):
        if st is None or st["V"].shape[-1] == 0:
            continue
        W = W.float()
        d1, d2 = W.shape
        prev = (float(st["eps"]), float(st["eps0"]), int(st["refreshes"]), int((st["sigma"] > st["eps"]).sum()))
        width = max(sketch_width(cfg.rank, d1, d2, S_.oversample), st["V"].shape[-1])
        SKETCHES[0] = 0
        (U, S, V, _, r_env, S_host, _), = enveloping_svd(
            [W], [(d1, d2)], [width], [st["V"]], lambda j, a: sharded._seed(cfg.name, prev[2], a),
            lambda j, S: sharded._envelope(prev, cfg, S)[::2], lambda t: t,
            S_.power_iters, S_.cold_power_iters, S_.oversample, S_.max_widenings, [prev[3]],
            S_.max_envelope_growth, [prev[0]], S_.max_lag, S_.flat_tolerance, *RESIDUAL(cfg))
        eps = sharded._envelope(prev, cfg, S_host)[0]
        Ux, Sx, Vxh = torch.linalg.svd(W.double(), full_matrices=False)
        sigma_next = float(Sx[cfg.rank]) if cfg.rank < Sx.shape[0] else 0.0
        eps_x, _ = reference.next_eps(cfg.schedule, prev[0], sigma_next, prev[2], prev[1],
                                      cfg.eps_value, cfg.eps_floor, cfg.num_refreshes)
        err = max(E.rel_error((U, V, S, eps), (Ux, Vxh.mT, Sx, eps_x),
                              torch.randn(W.shape, generator=GEN, dtype=torch.float64)) for _ in range(2))
        RECORDS.append(dict(step=step, name=cfg.name, shape=[d1, d2], err=err, width=width, kept=int(S.shape[0]),
                            sketches=SKETCHES[0]))


def summarize(paths):
    for p in paths:
        rows = json.load(open(p))
        bad = [r for r in rows if r["err"] > 1e-3]
        worst = max(rows, key=lambda r: r["err"])
        # (sketches: recorded since ad-hoc runs of later commits; absent in older files)
        cost = (f", sketches {sum(r['sketches'] for r in rows)} (matrix-wide: "
                f"{sum(r['kept'] >= min(r['shape']) for r in rows)})" if "sketches" in rows[0] else "")
        print(f"{p}: {len(rows)} warm target refreshes, worst R(X) error {worst['err']:.2e} (step {worst['step']}, "
              f"{worst['name']}), over 1e-3: {len(bad)}" + (f" at steps {sorted({r['step'] for r in bad})}" if bad else "")
              + cost)


if __name__ == "__main__":
    E.run(check, RECORDS, summarize)

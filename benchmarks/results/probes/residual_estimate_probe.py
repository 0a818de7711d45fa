"""Calibrate randomized.residual_error (SketchOptions.max_residual) along real training
runs: at every warm refresh of AdamQ3R (the models of training_refresh_accuracy_probe.py), the
targets' weights and pre-refresh states are taken, and for each target:
  * a one-pass warm sketch as the refresh's first attempt takes it (from the previous V and
    tail, width max(r, previous r_env) + oversampling): its lag, its residual estimate, and the
    relative Frobenius error of its R(X) against an exact float64 SVD (eps of each by the `min`
    schedule from its own sigma_{r+1}; worst of 2 Gaussian X);
  * the sketch a lagging target gets next (from that pass's V, lag_power_iters power
    iterations): its residual estimate and its error.
The training itself runs with the library's refresh as it is (method randomized).

Usage: OMP_NUM_THREADS=1 python benchmarks/results/probes/residual_estimate_probe.py \\
          --model mlp --lmbda 3.0 --epochs 50 --out x.json     (then --summarize x.json y.json ...)
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import training_refresh_accuracy_probe as P  # noqa: E402

from q3r import randomized, reference  # noqa: E402
import q3r.refresh as QR  # noqa: E402
from q3r.targets import slice_views  # noqa: E402

OPTS = QR.SketchOptions()
RECORDS = []
GEN = torch.Generator().manual_seed(5)


def rel_error(op, exact, X):
    def R(U, V, S, eps):
        d = reference.reweighting_coefficients(S.double(), torch.as_tensor(eps, dtype=torch.float64))
        return reference.apply_reweighting(X, U.double(), V.double(), d)
    a, b = R(*op), R(*exact)
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def one_sketch(W, k, start, iters, eps_prev, rank):
    sk = randomized.sketch(W[None], k, [start], warm_power_iters=iters, residuals=True)
    lam, E = randomized.eigensolver("torch")(sk.G)
    U, S, V = sk.triplets(lam, E)
    eps, _ = reference.next_eps("min", eps_prev, float(S[0, rank]), 1, eps_prev)  # (as the refresh sets it)
    S64 = S.double()
    est = float(randomized.residual_error(S64, sk.ritz_residuals(lam, E).double(), torch.tensor([eps], dtype=torch.float64),
                                          torch.tensor([rank]), W.shape[0], W.shape[1])[0])
    lag = float(sk.lag(V, S, torch.tensor([eps_prev]))[0])
    return (U[0], V[0], S[0], eps), est, lag


def check(views, states, configs, step):
    for W, st, cfg in zip(views, states, configs):
        if st is None or st["V"].shape[-1] == 0 or cfg.schedule != "min":
            continue
        tall = W.shape[0] > W.shape[1]  # the refresh's orientation (q3r._orientation)
        Wo = (W.mT if tall else W).float()
        V_prev = st["U"] if tall else st["V"]
        start = tuple(t for t in (V_prev, st.get("tail")) if t is not None and t.shape[-1] > 0)
        r, eps_prev = cfg.rank, float(st["eps"])
        k = min(max(r, st["sigma"].shape[0]) + OPTS.oversampling, min(Wo.shape))
        Ux, Sx, Vxh = torch.linalg.svd(Wo.double(), full_matrices=False)
        exact = (Ux, Vxh.mT, Sx, min(eps_prev, float(Sx[r])))
        op1, est1, lag = one_sketch(Wo, k, start, 0, eps_prev, r)
        op2, est2, _ = one_sketch(Wo, k, op1[1], OPTS.lag_power_iters, eps_prev, r)
        errs = []
        for op in (op1, op2):
            errs.append(max(rel_error(op, exact, torch.randn(Wo.shape, generator=GEN, dtype=torch.float64))
                            for _ in range(2)))
        RECORDS.append(dict(step=step, name=cfg.name, shape=list(Wo.shape), rank=r, lag=lag,
                            est1=est1, err1=errs[0], est2=est2, err2=errs[1]))


class Checker:
    """Stands in for the accuracy probe's checker: checks, then refreshes as usual."""

    def __init__(self, opt, args, fast):
        self.opt, self.step, self.refresh_index = opt, 0, 0
        self.fast_time = self.exact_time = 0.0
        self.fallback_targets = self.total_targets = 0
        self.violations, self.records = [], []
        refresh = opt.refresh

        def checked(due, before_wait=None):
            if due:
                views, states, configs = [], [], []
                for p, group in due:
                    views += [v.clone() for v in slice_views(p.detach(), group["slice_dim"], group["slices"])]
                    cfgs = opt._group_configs(group, p)
                    prev = opt.state[p].get("q3r")
                    states += [None] * len(cfgs) if prev is None else [copy.deepcopy(s) for s in prev]
                    configs += cfgs
                check(views, states, configs, self.step)
                self.refresh_index += 1
            return refresh(due, before_wait)

        opt.refresh = checked


def summarize(paths):
    rows = [r for p in paths for r in json.load(open(p))]
    print(f"{len(rows)} warm refreshes of a target")
    for n in ("1", "2"):
        ok = sorted(r["est" + n] for r in rows if r["err" + n] < 5e-4)
        bad = sorted(r["est" + n] for r in rows if r["err" + n] > 1e-3)
        ratio = sorted(r["err" + n] / r["est" + n] for r in rows if r["err" + n] > 2e-4 and r["est" + n] > 0)
        pick = lambda xs, q: xs[min(int(q * len(xs)), len(xs) - 1)] if xs else float("nan")  # noqa: E731
        print(f"pass {n}: error < 5e-4: {len(ok)}, estimate max {pick(ok, 1):.2e}, 99th pct {pick(ok, .99):.2e}; "
              f"error > 1e-3: {len(bad)}, estimate min {pick(bad, 0):.2e}; error / estimate (error > 2e-4, "
              f"n={len(ratio)}): 5th pct {pick(ratio, .05):.2f}, median {pick(ratio, .5):.2f}, 95th pct {pick(ratio, .95):.2f}")
    missed = [r for r in rows if r["err1"] > 1e-3 and r["lag"] <= OPTS.max_lag]
    print(f"pass 1 error > 1e-3 with lag <= max_lag: {len(missed)}; of them with estimate > max_residual: "
          f"{sum(r['est1'] > OPTS.max_residual for r in missed)}")
    for n in ("1", "2"):
        over = [r for r in rows if r["est" + n] > OPTS.max_residual]
        print(f"pass {n}: estimate > max_residual: {len(over)} (error > 1e-3 among them: "
              f"{sum(r['err' + n] > 1e-3 for r in over)}); error > 1e-3 with estimate <= max_residual: "
              f"{sum(r['err' + n] > 1e-3 and r['est' + n] <= OPTS.max_residual for r in rows)}")


def run(check_fn, records, summarize_fn) -> None:
    """The command line of this probe and of those built on it: ``--summarize FILES``, or a
    training run (training_refresh_accuracy_probe's arguments plus ``--out``) whose every
    refresh first goes through ``check_fn``, saving ``records`` to ``--out``."""
    global check
    if sys.argv[1] == "--summarize":
        summarize_fn(sys.argv[2:])
        return
    check = check_fn  # (Checker calls this module's check)
    P.Checker = Checker
    out = sys.argv[sys.argv.index("--out") + 1]
    try:
        P.main()
    finally:
        with open(out, "w") as f:
            json.dump(records, f)


if __name__ == "__main__":
    run(check, RECORDS, summarize)

"""Check the fast (randomized / native) refresh of AdamQ3R against an exact SVD along a real
training run (MLP on sklearn digits, or a small ViT on the same digits).

At every refresh, the optimizer's refresh() is wrapped: the target weights and the pre-refresh
slice states are snapshotted, the fast refresh runs as usual, and then for every slice:
  * sigma_{r+1}: fast state's sigma_next vs float64 SVD of the same weights
  * err_a:   R_fast(X) vs R_exact64(X) at the FAST state's eps (X Gaussian, 3 draws; max)
  * err_o:   R_fast(X) vs R_oracle(X), the library's exact refresh path (method="exact") run on
             a deep copy of the same pre-refresh state and the same weights (its own eps)
  * err_0:   R_oracle(X) vs R_exact64(X) at the oracle's eps (the fp32 noise floor)
  * err_w:   like err_a with X = W itself (informational)
  * eps_rel: |eps_fast - eps_oracle| / eps_oracle
Fallbacks of the fast path to an exact SVD are counted (q3r.refresh._refresh_exact_groups).
With --method exact the run only logs eps per refresh (the twin run for eps drift).

Written by a review helper (2026-11-24); results: training_refresh_accuracy_cpu_55fedfe.md.

Usage: OMP_NUM_THREADS=1 python benchmarks/results/probes/training_refresh_accuracy_probe.py --model mlp --lmbda 3.0 --method randomized \
          --schedule min --epochs 50 --out results/x.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import torch
from torch import nn

import q3r
import q3r.refresh as QR
from q3r import reference
from q3r.demo import load_digits_split, make_mlp
from q3r.experiments.vit import ViT, TARGET_SETS
from q3r.targets import slice_views

torch.set_num_threads(1)

CONTRACT_R = 1e-3
CONTRACT_SIGMA = 1e-2


def build(args):
    torch.manual_seed(args.seed)
    if args.model == "mlp":
        model = make_mlp(256)
        targets = q3r.find_targets(model, ["2", "4"], target_rank=0.05)
    else:
        model = ViT(image_size=8, patch_size=2, in_chans=1, num_classes=10, dim=args.vit_dim, depth=args.vit_depth,
                    num_heads=4, mlp_ratio=4.0)
        targets = q3r.find_targets(model, TARGET_SETS["qkv+mlp"], target_rank=0.2)
    return model, targets


def init_sigma_next(model, targets):
    """median sigma_{r+1} over the targets at init (to set the geometric schedule's floor)."""
    vals = []
    for t in targets:
        W = t.param.detach()
        slices = t.slices if t.slices is not None else [None]
        ranks = t.target_rank if isinstance(t.target_rank, (list, tuple)) else [t.target_rank] * len(slices)
        for s, tr in zip(slices, ranks):
            V = W if s is None else (W[s[0]:s[1]] if t.slice_dim == 0 else W[:, s[0]:s[1]])
            r = reference.resolve_rank(tr, *V.shape)
            vals.append(float(torch.linalg.svdvals(V.double())[r]))
    vals.sort()
    return vals[len(vals) // 2]


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def R64(state_like, X):
    U, V, sigma, eps = state_like
    d = reference.reweighting_coefficients(sigma.double(), torch.as_tensor(eps, dtype=torch.float64))
    return reference.apply_reweighting(X, U.double(), V.double(), d)


class Checker:
    def __init__(self, opt, args, fast: bool):
        self.opt, self.args, self.fast = opt, args, fast
        self.records = []  # one per (refresh, slice)
        self.refresh_index = 0
        self.fast_time = 0.0
        self.exact_time = 0.0
        self.fallback_targets = 0
        self.total_targets = 0
        self.gen = torch.Generator().manual_seed(1234 + args.seed)
        self._orig_refresh = opt.refresh
        opt.refresh = self.refresh
        self._orig_exact_groups = QR._refresh_exact_groups
        self._counting = False
        self._fallbacks_now = 0
        checker = self

        def counting_exact_groups(weights, states, configs, groups, before_wait=None):
            if checker._counting:
                checker._fallbacks_now += sum(len(g) for g in groups)
            return checker._orig_exact_groups(weights, states, configs, groups, before_wait)

        QR._refresh_exact_groups = counting_exact_groups
        self.step = 0
        self.violations = []

    def refresh(self, due, before_wait=None):
        if not due:
            return self._orig_refresh(due, before_wait)
        # snapshot the weights and pre-refresh states of all due slices
        views, states, configs, names = [], [], [], []
        for p, group in due:
            vs = slice_views(p.detach(), group["slice_dim"], group["slices"])
            cfgs = self.opt._group_configs(group, p)
            st = self.opt.state[p].get("q3r")
            views += [v.clone() for v in vs]
            states += [None] * len(vs) if st is None else [copy.deepcopy(s) for s in st]
            configs += cfgs
            names += [c.name for c in cfgs]
        pre = states
        self._counting, self._fallbacks_now = True, 0
        t0 = time.perf_counter()
        self._orig_refresh(due, before_wait)
        t1 = time.perf_counter()
        self._counting = False
        self.fast_time += t1 - t0
        fallbacks = self._fallbacks_now
        self.total_targets += len(views)
        self.fallback_targets += fallbacks
        # the post-refresh states (in the order of the views)
        post = []
        for p, group in due:
            post += self.opt.state[p]["q3r"]
        if not self.fast:
            for name, s in zip(names, post):
                self.records.append(dict(refresh=self.refresh_index, step=self.step, name=name,
                                         eps=float(s["eps"]), sigma_next=float(s["sigma_next"])))
            self.refresh_index += 1
            return
        # the exact oracle: same weights, deep copies of the same pre-refresh states
        oracle_states = [QR.new_slice_state(*v.shape) if s is None else s for s, v in zip(pre, views)]
        pre_saved = [None if s is None else copy.deepcopy(s) for s in pre]
        t2 = time.perf_counter()
        QR.refresh_slices_(views, oracle_states, configs, method="exact")
        self.exact_time += time.perf_counter() - t2
        bad_here = []
        for j, (W, s, o, cfg) in enumerate(zip(views, post, oracle_states, configs)):
            W64 = W.double()
            U, S, Vh = torch.linalg.svd(W64, full_matrices=False)
            V = Vh.mT
            r = cfg.rank
            s_exact = float(S[r])
            eps_f = float(s["eps"])
            eps_o = float(o["eps"])
            fast_op = (s["U"], s["V"], s["sigma"], s["eps"])
            oracle_op = (o["U"], o["V"], o["sigma"], o["eps"])
            exact_at_f = (U, V, S, eps_f)
            exact_at_o = (U, V, S, eps_o)
            err_a = err_o = err_0 = 0.0
            for _ in range(3):
                X = torch.randn(W.shape, generator=self.gen, dtype=torch.float64)
                Rf = R64(fast_op, X)
                err_a = max(err_a, rel(Rf, R64(exact_at_f, X)))
                err_o = max(err_o, rel(Rf, R64(oracle_op, X)))
                err_0 = max(err_0, rel(R64(oracle_op, X), R64(exact_at_o, X)))
            err_w = rel(R64(fast_op, W64), R64(exact_at_f, W64))
            sig_err = abs(float(s["sigma_next"]) - s_exact) / s_exact
            rec = dict(refresh=self.refresh_index, step=self.step, name=cfg.name, shape=list(W.shape), rank=r,
                       eps=eps_f, eps_oracle=eps_o, eps_rel=abs(eps_f - eps_o) / eps_o,
                       sigma_next=float(s["sigma_next"]), sigma_next_exact=s_exact, sigma_err=sig_err,
                       r_env=int(s["sigma"].shape[0]), r_env_exact=int((S > eps_f).sum()),
                       sigma1=float(S[0]), err_a=err_a, err_o=err_o, err_0=err_0, err_w=err_w)
            self.records.append(rec)
            if err_a > CONTRACT_R or err_o > CONTRACT_R or sig_err > CONTRACT_SIGMA:
                bad_here.append(rec)
        if bad_here:
            self.violations += bad_here
            path = os.path.join(self.args.repro_dir,
                                f"repro_{self.tag()}_refresh{self.refresh_index}.pt")
            torch.save(dict(views=views, pre_states=pre_saved, configs=[c.__dict__ for c in configs],
                            method=self.args.method, names=names, records=bad_here, args=vars(self.args)), path)
            print(f"  VIOLATION at refresh {self.refresh_index} (step {self.step}): "
                  + ", ".join(f"{b['name']} err_a={b['err_a']:.2e} err_o={b['err_o']:.2e} "
                              f"sig={b['sigma_err']:.2e}" for b in bad_here) + f" -> {path}", flush=True)
        self.refresh_index += 1

    def tag(self):
        a = self.args
        return f"{a.model}_l{a.lmbda:g}_{a.method}_{a.schedule}_s{a.seed}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["mlp", "vit"], default="mlp")
    ap.add_argument("--lmbda", type=float, default=3.0)
    ap.add_argument("--method", choices=["randomized", "native", "exact"], default="randomized")
    ap.add_argument("--schedule", choices=["min", "geometric"], default="min")
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vit-dim", type=int, default=128)
    ap.add_argument("--vit-depth", type=int, default=2)
    ap.add_argument("--floor-factor", type=float, default=0.01,
                    help="geometric: eps_floor = this x median sigma_{r+1} at init")
    ap.add_argument("--out", required=True)
    ap.add_argument("--repro-dir", default="training_refresh_repro",
                    help="where each refresh that breaks the contract is saved (weights and pre-refresh states)")
    args = ap.parse_args()
    os.makedirs(args.repro_dir, exist_ok=True)
    lr = args.lr if args.lr is not None else (2e-3 if args.model == "mlp" else 2e-3)
    train_set, test_set = load_digits_split(args.seed)
    model, targets = build(args)
    x, y = train_set
    if args.model == "vit":
        x = x.view(-1, 1, 8, 8)
    steps_per_epoch = math.ceil(len(y) / 64)
    n_refresh = math.ceil(args.epochs * steps_per_epoch / 5)
    opts = dict(lmbda=args.lmbda, steps=5, refresh=args.method, eps_schedule=args.schedule)
    eps_floor = None
    if args.schedule == "geometric":
        eps_floor = args.floor_factor * init_sigma_next(model, targets)
        opts.update(eps_floor=eps_floor, num_refreshes=n_refresh)
    opt = q3r.AdamQ3R(q3r.param_groups(model, targets, weight_decay=0.01, **opts), lr=lr)
    checker = Checker(opt, args, fast=args.method != "exact")
    g = torch.Generator().manual_seed(args.seed + 1)
    t_start = time.perf_counter()
    step = 0
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            checker.step = step
            opt.step()
            step += 1
        if epoch % 10 == 9 or epoch == args.epochs - 1:
            print(f"epoch {epoch + 1} step {step} loss {loss.item():.3f} refreshes {checker.refresh_index} "
                  f"({time.perf_counter() - t_start:.0f}s)", flush=True)
    model.eval()
    xt, yt = test_set
    if args.model == "vit":
        xt = xt.view(-1, 1, 8, 8)
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    out = dict(args=vars(args), lr=lr, eps_floor=eps_floor, num_refreshes=n_refresh, steps=step,
               refreshes=checker.refresh_index, test_acc=acc, fast_time=checker.fast_time,
               exact_time=checker.exact_time, fallback_targets=checker.fallback_targets,
               total_targets=checker.total_targets, violations=len(checker.violations),
               wall=time.perf_counter() - t_start, records=checker.records)
    with open(args.out, "w") as f:
        json.dump(out, f)
    print(f"done: {step} steps, {checker.refresh_index} refreshes, acc {acc:.3f}, fast refresh {checker.fast_time:.1f}s, "
          f"exact oracle {checker.exact_time:.1f}s, fallbacks {checker.fallback_targets}/{checker.total_targets}, "
          f"violations {len(checker.violations)}, wall {out['wall']:.0f}s")


if __name__ == "__main__":
    main()

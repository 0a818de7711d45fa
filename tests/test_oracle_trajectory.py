"""Whole training trajectories against an independent float64 oracle written from SPEC sections 2-3
alone (an exact SVD per refresh, R(X) = (I + U d U^T) X (I + V d V^T), the four eps schedules, the
decoupled AdamQ3R step), not from q3r's code: several groups with their own lambda, period, rank
(int, fraction, per slice) and schedule; row slices with a gap, column slices; a target without
a gradient at some steps; weight decay; an lr scheduler; a mid-run checkpoint round trip; and the
Q3R regularizer through penalty(), add_grad_() and attach() with torch's SGD and AdamW."""

import io
import math

import pytest
import torch

import q3r

F64 = torch.float64


# ----------------------------------------------------------------------------- the oracle
class Slice:
    def __init__(self, dim, cut, rank, schedule, eps_value=None, eps_floor=None, num_refreshes=None):
        self.dim, self.cut, self.rank, self.schedule = dim, cut, rank, schedule
        self.eps_value, self.eps_floor, self.num_refreshes = eps_value, eps_floor, num_refreshes
        self.eps, self.eps0, self.count, self.U, self.V, self.sigma = math.inf, None, 0, None, None, None

    def view(self, W):
        if self.cut is None:
            return W
        return W[slice(*self.cut)] if self.dim == 0 else W[:, slice(*self.cut)]

    def refresh(self, W):
        U, s, Vh = torch.linalg.svd(self.view(W).to(F64), full_matrices=False)
        nxt = float(s[self.rank])
        if self.schedule == "min":
            self.eps = min(self.eps, nxt)
        elif self.schedule == "track":
            self.eps = nxt
        elif self.schedule == "constant":
            self.eps = self.eps_value
        else:  # geometric: eps0 = sigma_{r+1}(W_0), times c = (floor / eps0)^(1/N) per refresh, down to the floor
            if self.eps0 is None:
                self.eps0 = nxt
            c = (self.eps_floor / self.eps0) ** (1 / self.num_refreshes)
            self.eps = max(self.eps0 * c ** self.count, self.eps_floor)
        self.count += 1
        keep = int((s > self.eps).sum())
        self.U, self.V, self.sigma = U[:, :keep], Vh[:keep].T, s[:keep]

    def R(self, X):
        d = self.eps / self.sigma - 1
        left = X + self.U @ (d[:, None] * (self.U.T @ X))
        return left + (left @ self.V) @ (d[:, None] * self.V.T)


def term(W, slices, lmbda):
    """2 lambda R(W) of every slice, in W's shape (zero outside the slices)."""
    out = torch.zeros_like(W)
    for s in slices:
        s.view(out).add_(2 * lmbda * s.R(s.view(W)))
    return out


def oracle_adamq3r(W0, specs, grads_of, lr_at, steps):
    """specs: per parameter dict(slices, lmbda, T, lr, betas, eps, wd) (slices None: not a target)."""
    W = [w.clone() for w in W0]
    m = [torch.zeros_like(w) for w in W]
    v = [torch.zeros_like(w) for w in W]
    t = [0] * len(W)
    out = []
    for k in range(steps):
        grads = grads_of(k, W)
        for i, (g, sp) in enumerate(zip(grads, specs)):
            if g is None:
                continue
            lr = sp["lr"] * lr_at(k)
            b1, b2 = sp["betas"]
            if sp["slices"] is not None and t[i] % sp["T"] == 0:
                for s in sp["slices"]:
                    s.refresh(W[i])
            t[i] += 1
            q = term(W[i], sp["slices"], sp["lmbda"]) if sp["slices"] is not None else 0
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            step = (m[i] / (1 - b1 ** t[i])) / ((v[i] / (1 - b2 ** t[i])).sqrt() + sp["eps"])
            W[i] = W[i] * (1 - lr * sp["wd"]) - lr * step - lr * q
        out.append([w.clone() for w in W])
    return out


# ----------------------------------------------------------------------------- the problem
SHAPES = [(37, 53), (40, 13), (40, 13), (30, 17), (24, 24), (11, 7)]
NO_GRAD = {(2, 1), (2, 2), (2, 6), (0, 9)}  # (param, step): .grad is None there


def _problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    W0 = [torch.randn(s, generator=gen, dtype=F64) for s in SHAPES]
    C = [0.3 * torch.randn(s, generator=gen, dtype=F64) for s in SHAPES]
    S = []
    for _, d2 in SHAPES:
        A = torch.randn(d2, d2, generator=gen, dtype=F64) / math.sqrt(d2)
        S.append(A @ A.T + 0.1 * torch.eye(d2, dtype=F64))

    def grads_of(k, W):  # of sum_i 1/2 tr((W_i - C_i) S_i (W_i - C_i)^T)
        return [None if (i, k) in NO_GRAD else (w - C[i].to(w.dtype)) @ S[i].to(w.dtype) for i, w in enumerate(W)]
    return W0, grads_of


GROUPS = [  # q3r options per group, with the indices of its parameters
    dict(idx=[0], slice_dim=1, slices=[(0, 20), (26, 53)], target_rank=[3, 0.3], eps_schedule="min", steps=3,
         lmbda=0.2, weight_decay=0.05, betas=(0.8, 0.99)),
    dict(idx=[1, 2], slice_dim=0, slices=None, target_rank=0.25, eps_schedule="geometric", eps_floor=0.3,
         num_refreshes=3, steps=2, lmbda=0.1, weight_decay=0.0, betas=(0.9, 0.999)),
    dict(idx=[3], slice_dim=0, slices=[(2, 12), (15, 30)], target_rank=2, eps_schedule="track", steps=1,
         lmbda=0.3, weight_decay=0.0, betas=(0.9, 0.95)),
    dict(idx=[4], slice_dim=0, slices=None, target_rank=3, eps_schedule="constant", eps_value=2.0, steps=5,
         lmbda=0.1, weight_decay=0.01, betas=(0.9, 0.999)),
]
LR, ADAM_EPS, PLAIN = 1e-2, 1e-3, dict(lr=3e-3, weight_decay=0.01, betas=(0.9, 0.999))


def _lr_at(k):
    return [1.0, 0.5, 2.0][(k // 4) % 3]


def _oracle_specs():
    specs = [None] * len(SHAPES)
    for g in GROUPS:
        for i in g["idx"]:
            d1, d2 = SHAPES[i]
            cuts = g["slices"] or [None]
            ranks = g["target_rank"] if isinstance(g["target_rank"], list) else [g["target_rank"]] * len(cuts)
            slices = []
            for cut, rank in zip(cuts, ranks):
                a, b = (d1, d2) if cut is None else ((cut[1] - cut[0], d2) if g["slice_dim"] == 0 else (d1, cut[1] - cut[0]))
                r = math.floor(rank * a * b / (a + b)) if isinstance(rank, float) else rank
                slices.append(Slice(g["slice_dim"], cut, r, g["eps_schedule"], g.get("eps_value"), g.get("eps_floor"),
                                    g.get("num_refreshes")))
            specs[i] = dict(slices=slices, lmbda=g["lmbda"], T=g["steps"], lr=LR, betas=g["betas"], eps=ADAM_EPS,
                            wd=g["weight_decay"])
    specs[5] = dict(slices=None, lr=PLAIN["lr"], betas=PLAIN["betas"], eps=ADAM_EPS, wd=PLAIN["weight_decay"])
    return specs


def _adamq3r(params, refresh="exact"):
    groups = [{**{k: v for k, v in g.items() if k != "idx"}, "params": [params[i] for i in g["idx"]], "q3r": True,
               "refresh": refresh} for g in GROUPS]
    groups.append({"params": [params[5]], **PLAIN})
    opt = q3r.AdamQ3R(groups, lr=LR, eps=ADAM_EPS)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_at)


def _run_adamq3r(W0, grads_of, dtype, steps, resume_at=None):
    params = [torch.nn.Parameter(w.to(dtype).clone()) for w in W0]
    opt, sched = _adamq3r(params)
    out = []
    for k in range(steps):
        if k == resume_at:  # a checkpoint through torch.save / torch.load(weights_only=True), a fresh optimizer
            buf = io.BytesIO()
            torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
            buf.seek(0)
            saved = torch.load(buf, weights_only=True)
            params = [torch.nn.Parameter(p.detach().clone()) for p in params]
            opt, sched = _adamq3r(params)
            opt.load_state_dict(saved["opt"])
            sched.load_state_dict(saved["sched"])
        for p, g in zip(params, grads_of(k, [p.detach() for p in params])):
            p.grad = g
        opt.step()
        sched.step()
        out.append([p.detach().clone() for p in params])
    return out, opt


def _max_rel(run, ref):
    return max(float((a.to(F64) - b).abs().max() / b.abs().max()) for xs, ys in zip(run, ref) for a, b in zip(xs, ys))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_adamq3r_trajectory_matches_the_oracle_and_resumes_bit_for_bit(dtype, tol):
    steps = 16
    W0, grads_of = _problem()
    ref_specs = _oracle_specs()
    ref = oracle_adamq3r([w.to(dtype).to(F64) for w in W0], ref_specs, grads_of, _lr_at, steps)
    run, opt = _run_adamq3r(W0, grads_of, dtype, steps)
    # (float64 weights: q3r's factors are float32 (SPEC section 3), so agreement is to float32 rounding)
    assert _max_rel(run, ref) < tol
    diag = opt.diagnostics()
    env = [int(v) for k, v in diag.items() if k.endswith("/envelope_rank")]
    eps = [v for k, v in diag.items() if k.endswith("/eps")]
    want = [s for g in GROUPS for i in g["idx"] for s in ref_specs[i]["slices"]]
    assert env == [s.sigma.numel() for s in want]
    for got, s in zip(eps, want):
        assert math.isclose(got, s.eps, rel_tol=1e-5), (eps, [s.eps for s in want])
    assert any(s.schedule == "geometric" and s.eps == s.eps_floor for s in want)  # (the floor was reached)
    resumed, _ = _run_adamq3r(W0, grads_of, dtype, steps, resume_at=7)
    assert all(torch.equal(a, b) for xs, ys in zip(run, resumed) for a, b in zip(xs, ys))


@pytest.mark.parametrize("mode, opt_name", [("penalty", "sgd"), ("add_grad", "adamw"), ("attach", "adamw"),
                                            ("attach", "sgd")])
def test_q3r_regularizer_trajectory_matches_the_oracle(mode, opt_name):
    """One step count for all targets (a target without a gradient still counts the step); the
    penalty's autograd gradient and the in-place term are both 2 lambda R(W)."""
    steps, lmbda, T, lr = 12, 0.2, 3, 1e-2
    W0, grads_of = _problem(1)
    idx = [0, 1, 3]  # targets: column slices, a whole matrix, row slices with a gap
    cuts = {0: (1, [(0, 20), (26, 53)], [3, 0.3]), 1: (0, None, 4), 3: (0, [(2, 12), (15, 30)], 2)}
    # the oracle
    slices = {}
    for i in idx:
        dim, cut, rank = cuts[i]
        ranks = rank if isinstance(rank, list) else [rank] * len(cut or [None])
        slices[i] = []
        for c, rk in zip(cut or [None], ranks):
            d1, d2 = SHAPES[i]
            a, b = (d1, d2) if c is None else ((c[1] - c[0], d2) if dim == 0 else (d1, c[1] - c[0]))
            slices[i].append(Slice(dim, c, math.floor(rk * a * b / (a + b)) if isinstance(rk, float) else rk, "min"))
    W = [W0[i].clone() for i in idx]
    ref_opt = (torch.optim.SGD if opt_name == "sgd" else torch.optim.AdamW)(
        [torch.nn.Parameter(w) for w in W], lr=lr, **({"momentum": 0.9} if opt_name == "sgd" else {}))
    ref, ref_pen = [], []
    for k in range(steps):
        if k % T == 0:
            for i, w in zip(idx, ref_opt.param_groups[0]["params"]):
                for s in slices[i]:
                    s.refresh(w.detach())
        params = ref_opt.param_groups[0]["params"]
        full = [None] * len(SHAPES)
        for i, p in zip(idx, params):
            full[i] = p.detach()
        g_all = grads_of(k, [full[i] if full[i] is not None else W0[i] for i in range(len(SHAPES))])
        ref_pen.append(sum(lmbda * float((s.view(p.detach()) * s.R(s.view(p.detach()))).sum())
                           for i, p in zip(idx, params) for s in slices[i]))
        for i, p in zip(idx, params):
            g = g_all[i]
            q = term(p.detach(), slices[i], lmbda)
            p.grad = (q if mode == "penalty" else None) if g is None else g + q
        ref_opt.step()
        ref.append([p.detach().clone() for p in params])
    # q3r
    params = [torch.nn.Parameter(W0[i].clone()) for i in idx]
    targets = [q3r.Target(f"t{i}", p, slice_dim=cuts[i][0], slices=cuts[i][1], target_rank=cuts[i][2])
               for i, p in zip(idx, params)]
    reg = q3r.Q3R(targets, lmbda=lmbda, steps=T, refresh="exact")
    opt = (torch.optim.SGD if opt_name == "sgd" else torch.optim.AdamW)(
        params, lr=lr, **({"momentum": 0.9} if opt_name == "sgd" else {}))
    if mode == "attach":
        reg.attach(opt)
    run, pen = [], []
    for k in range(steps):
        full = [None] * len(SHAPES)
        for i, p in zip(idx, params):
            full[i] = p.detach()
        g_all = grads_of(k, [full[i] if full[i] is not None else W0[i] for i in range(len(SHAPES))])
        for i, p in zip(idx, params):
            p.grad = g_all[i]
        if mode == "penalty":
            value = reg.penalty()
            pen.append(float(value.detach()))
            value.backward()
        elif mode == "add_grad":
            reg.add_grad_()
        opt.step()
        run.append([p.detach().clone() for p in params])
    assert _max_rel(run, ref) < 1e-6
    for a, b in zip(pen, ref_pen):
        assert math.isclose(a, b, rel_tol=1e-4)

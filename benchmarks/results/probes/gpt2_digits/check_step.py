"""h65: independent float64 re-implementation of SPEC section 3 (AdamQ3R decoupled step; Q3R.attach on AdamW)
on a tiny GPT-2 (c_attn column-sliced), compared against q3r for several steps across refreshes."""
import sys, torch

from transformers import GPT2Config, GPT2Model
import q3r

torch.set_default_dtype(torch.float64)
PAT = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
LR, LM, T, R, NSTEPS = 1e-2, 0.5, 3, 2, 10
refresh = sys.argv[1] if len(sys.argv) > 1 else "exact"
VARIANT = sys.argv[2] if len(sys.argv) > 2 else "spec"  # spec | nolambda | noslice | flipsign | everystep


def make():
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=8, n_head=2, n_positions=6, vocab_size=11, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    m = GPT2Model(cfg)
    with torch.no_grad():  # make weights larger than GPT-2's 0.02 init so the spectrum is spread
        for p in m.parameters():
            if p.dim() == 2: p.mul_(20)
    return m


def loss_fn(m, ids):
    return m(input_ids=ids).last_hidden_state.square().mean()


def R_apply(X, U, V, d):
    return X + U @ torch.diag(d) @ (U.T @ X) + (X @ V) @ torch.diag(d) @ V.T + U @ torch.diag(d) @ (U.T @ X @ V) @ torch.diag(d) @ V.T


class MyQ3R:
    """per slice state: eps (starts inf), U, V, d."""
    def __init__(self, targets):
        self.views = []  # (param name, dim, a, b)
        for t in targets:
            if t.slices is None or VARIANT == 'noslice':
                self.views.append((t.name, None, None, None))
            else:
                for a, b in t.slices:
                    self.views.append((t.name, t.slice_dim, a, b))
        self.state = [dict(eps=float("inf"), U=None, V=None, d=None) for _ in self.views]

    def sl(self, P, v):
        _, dim, a, b = v
        return P if dim is None else P.narrow(dim, a, b - a)

    def refresh(self, params):
        for v, s in zip(self.views, self.state):
            W = self.sl(params[v[0]].detach(), v)
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            s["eps"] = min(s["eps"], float(S[R]))
            k = int((S > s["eps"]).sum())
            s["U"], s["V"], s["d"] = U[:, :k], Vh[:k].T, s["eps"] / S[:k] - 1

    def term(self, params):
        """{name: 2*lmbda*R(W)} full-shape."""
        out = {n: torch.zeros_like(params[n]) for n, *_ in self.views}
        for v, s in zip(self.views, self.state):
            W = self.sl(params[v[0]].detach(), v)
            self.sl(out[v[0]], v).copy_((0 if VARIANT == 'nolambda' else -1 if VARIANT == 'flipsign' else 1) * 2 * LM * R_apply(W, s["U"], s["V"], s["d"]))
        return out


def run_lib(mode, batches):
    m = make()
    tg = q3r.find_targets(m, PAT, target_rank=R)
    if mode == "adamq3r":
        opt = q3r.AdamQ3R(q3r.param_groups(m, tg, lmbda=LM, steps=T, refresh=refresh), lr=LR)
    else:
        opt = torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=0.0)
        q3r.Q3R(tg, lmbda=LM, steps=T, refresh=refresh).attach(opt)
    for ids in batches:
        opt.zero_grad(); loss_fn(m, ids).backward(); opt.step()
    return m


def run_mine(mode, batches):
    m = make()
    tg = q3r.find_targets(m, PAT, target_rank=R)
    params = dict(m.named_parameters())
    # map target names to param names
    pid = {id(p): n for n, p in params.items()}
    tparam = {pid[id(t.param)]: t for t in tg}
    my = MyQ3R(tg)
    P = {t.name: t.param for t in tg}
    b1, b2, eps_adam = 0.9, 0.999, 1e-8
    mstate = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in params.items()}
    for k, ids in enumerate(batches):
        for p in m.parameters(): p.grad = None
        loss_fn(m, ids).backward()
        if k % (1 if VARIANT == 'everystep' else T) == 0:
            my.refresh(P)
        term = my.term(P)  # at W_prev
        with torch.no_grad():
            for n, p in params.items():
                g = p.grad.clone()
                tname = tparam[n].name if n in tparam else None
                if mode == "attach" and tname is not None:
                    g += term[tname]
                mm, vv = mstate[n]
                mm.mul_(b1).add_(g, alpha=1 - b1); vv.mul_(b2).addcmul_(g, g, value=1 - b2)
                mhat = mm / (1 - b1 ** (k + 1)); vhat = vv / (1 - b2 ** (k + 1))
                new = p - LR * mhat / (vhat.sqrt() + eps_adam)
                if mode == "adamq3r" and tname is not None:
                    new = new - LR * term[tname]
                p.copy_(new)
    return m


torch.manual_seed(123)
batches = [torch.randint(0, 11, (4, 6)) for _ in range(NSTEPS)]
base = make()
for mode in ("adamq3r", "attach"):
    a, b = run_lib(mode, batches), run_mine(mode, batches)
    # no-Q3R baseline to show the term matters
    worst, moved = 0.0, 0.0
    for (n, pa), (_, pb), (_, p0) in zip(a.named_parameters(), b.named_parameters(), base.named_parameters()):
        if pa.dim() == 2 and "wte" not in n and "wpe" not in n:
            err = float((pa - pb).norm() / (pb - p0).norm())
            worst = max(worst, err)
            print(f"{mode:8s} {n:22s} |lib-mine|/|mine-W0| = {err:.2e}   |mine-W0| = {float((pb - p0).norm()):.3e}")
    print(f"{mode}: worst relative error {worst:.2e}")

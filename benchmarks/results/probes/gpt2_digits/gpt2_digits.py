"""h65: tiny HF GPT-2 (n_layer=2, n_embd=64) as a classifier on sklearn digits (8 rows of 8 pixels = 8 tokens).
Compare AdamW / AdamQ3R / Q3R.attach(AdamW), then SVD-truncate targets to 20% / 10% with q3r.compress.
Usage: python gpt2_digits.py --seeds 0 1 --epochs 60 --lmbdas 0.1 0.01
"""
import argparse, json, math, time
import torch
from torch import nn
from transformers import GPT2Config, GPT2Model
import q3r
from q3r.demo import load_digits_split, accuracy

PATTERNS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=8, vocab_size=2,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        self.inp = nn.Linear(8, 64)
        self.gpt = GPT2Model(cfg)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        h = self.gpt(inputs_embeds=self.inp(x.view(-1, 8, 8))).last_hidden_state
        return self.head(h.mean(1))


def independent_stats(model, targets, fraction):
    """tail energy & effective rank computed here (float64 SVD), per slice, at the params rule rank."""
    out = []
    for t in targets:
        W = t.param.detach().double()
        views = [W] if t.slices is None else [W.narrow(t.slice_dim, a, b - a) for a, b in t.slices]
        for v in views:
            d1, d2 = v.shape
            r = math.floor(fraction * d1 * d2 / (d1 + d2))
            s = torch.linalg.svdvals(v)
            e = s.square()
            p = s / s.sum()
            out.append((float(e[r:].sum() / e.sum()), float(torch.exp(-(p * p.log()).sum()))))
    n = len(out)
    return sum(o[0] for o in out) / n, sum(o[1] for o in out) / n


def run(method, lmbda, seed, epochs, lr, bs, target_rank, steps, sched='min'):
    torch.manual_seed(seed)
    train_set, test_set = load_digits_split(seed)
    model = Net()
    targets = q3r.find_targets(model, PATTERNS, target_rank=target_rank)
    reg = None
    if method == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    elif method == "adamq3r":
        opt = q3r.AdamQ3R(q3r.param_groups(model, targets, weight_decay=0.01, lmbda=lmbda, steps=steps, eps_schedule=sched), lr=lr)
    elif method == "attach":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        reg = q3r.Q3R(targets, lmbda=lmbda, steps=steps, eps_schedule=sched)
        reg.attach(opt)
    x, y = train_set
    g = torch.Generator().manual_seed(seed + 1)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), bs):
            idx = perm[i:i + bs]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
    res = {"sched": sched, "method": method, "lmbda": lmbda if method != "adamw" else 0.0, "seed": seed,
           "train_s": time.perf_counter() - t0, "final_loss": loss.item(),
           "dense": accuracy(model, *test_set)}
    for f in (0.2, 0.1):
        cut, rep = q3r.compress(model, PATTERNS, fraction=f, copy=True)
        res[f"acc@{f}"] = accuracy(cut, *test_set)
        res[f"tail@{f}"], res["eff_rank"] = independent_stats(model, targets, f)
    diag = opt.diagnostics() if method == "adamq3r" else (reg.diagnostics() if reg else None)
    if diag:
        te = [v for k, v in diag.items() if k.endswith("/tail_energy")]
        er = [v for k, v in diag.items() if k.endswith("/effective_rank")]
        res["lib_tail@0.2"] = sum(te) / len(te)
        res["lib_eff_rank"] = sum(er) / len(er)
        res["lib_env_rank"] = [v for k, v in diag.items() if k.endswith("/envelope_rank")]
        res["lib_sigma_next"] = [round(v, 4) for k, v in diag.items() if k.endswith("/sigma_next")]
        res["lib_eps"] = [round(v, 4) for k, v in diag.items() if k.endswith("/eps")]
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--bs", type=int, default=64)
    ap.add_argument("--lmbdas", type=float, nargs="+", default=[0.1, 0.01])
    ap.add_argument("--methods", nargs="+", default=["adamw", "adamq3r", "attach"])
    ap.add_argument("--target_rank", type=float, default=0.2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--sched", default="min")
    a = ap.parse_args()
    rows = []
    for seed in a.seeds:
        for m in a.methods:
            for lm in ([0.0] if m == "adamw" else a.lmbdas):
                r = run(m, lm, seed, a.epochs, a.lr, a.bs, a.target_rank, a.steps, a.sched)
                rows.append(r)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
    if a.out:
        json.dump(rows, open(a.out, "w"), indent=1)

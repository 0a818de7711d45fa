"""Probe (not committed): how much of the per-step Q3R work hides behind fwd+bwd on a side stream."""
import os, sys, statistics
sys.path.insert(0, "benchmarks")
import torch
import _common as C
from q3r.targets import slice_views
from q3r import ops
from q3r_kernels.projection import project_blocks
os.environ["Q3R_BACKEND"] = "triton"
torch.manual_seed(0)
for key in sys.argv[1:] or ["vit_b16"]:
    model, make_batch, loss_fn, targets, label = C.MODELS[key](device="cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    data = make_batch()
    Xs, Us, Vs, factors, outs = [], [], [], [], []
    for name, p, dim, slices in targets:
        for X in slice_views(p.detach(), dim, slices):
            k = int(0.2 * min(X.shape))
            U = torch.linalg.qr(torch.randn(X.shape[0], k, device="cuda"))[0]
            V = torch.linalg.qr(torch.randn(X.shape[1], k, device="cuda"))[0]
            Xs.append(X); Us.append(U); Vs.append(V)
            factors.append((U, V, torch.sort(1 + torch.rand(k, device="cuda"), descending=True).values,
                            torch.tensor(1.0, device="cuda")))
            outs.append(torch.zeros_like(X, dtype=torch.float32))
    def fwd_bwd():
        for p in params: p.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model, data)
        loss.backward()
    proj = lambda: project_blocks(Xs, Us, Vs)
    work = lambda: ops.add_reweighting_(outs, Xs, factors, 0.2)
    res = {"fwd_bwd": C.cuda_time_ms(fwd_bwd), "proj": C.cuda_time_ms(proj), "work": C.cuda_time_ms(work)}
    for prio in (0, -1):
        side = torch.cuda.Stream(priority=prio)
        for tag, fn in (("proj", proj), ("work", work)):
            def both(fn=fn, side=side):
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    fn()
                fwd_bwd()
                torch.cuda.current_stream().wait_stream(side)
            def serial(fn=fn):
                fn(); fwd_bwd()
            t_b, t_s = C.cuda_time_ms(both), C.cuda_time_ms(serial)
            res[f"{tag}_prio{prio}_overlap"] = t_b
            res[f"{tag}_prio{prio}_serial"] = t_s
            res[f"{tag}_prio{prio}_hidden_frac"] = (t_s - t_b) / res[tag]
    print(label, " ".join(f"{k}={v:.3f}" for k, v in res.items()), flush=True)
    del model, params, Xs, Us, Vs, factors, outs
    torch.cuda.empty_cache()

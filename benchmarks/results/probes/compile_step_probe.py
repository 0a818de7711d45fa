import torch, q3r, time
def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
x = torch.randn(64, 16)
res = {}
for mode in ("eager", "compiled"):
    model = build()
    opt = q3r.AdamQ3R(q3r.param_groups(model, q3r.find_targets(model, ["0", "2"], target_rank=2), lmbda=0.1, steps=3), lr=1e-2)
    step = torch.compile(opt.step) if mode == "compiled" else opt.step
    t0 = time.time()
    try:
        for i in range(10):
            opt.zero_grad(); model(x).square().mean().backward(); step()
        res[mode] = [p.detach().clone() for p in model.parameters()]
        print(mode, "ok %.1fs" % (time.time() - t0), opt.diagnostics().get("0.weight/refreshes"))
    except Exception as e:
        print(mode, "ERR", type(e).__name__, str(e)[:300])
if len(res) == 2: print("max diff", max(float((a - b).abs().max()) for a, b in zip(res["eager"], res["compiled"])))

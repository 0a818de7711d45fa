import torch, q3r, time
torch.manual_seed(0)
def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
x = torch.randn(64, 16)
res = {}
for mode in ("eager", "compiled"):
    model = build()
    reg = q3r.Q3R(q3r.find_targets(model, ["0", "2"], target_rank=2), lmbda=0.1, steps=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    def loss_fn(x):
        return model(x).square().mean() + reg.penalty()
    fn = torch.compile(loss_fn) if mode == "compiled" else loss_fn
    t0 = time.time()
    for step in range(10):
        opt.zero_grad()
        loss = fn(x)
        loss.backward()
        opt.step()
    res[mode] = ([p.detach().clone() for p in model.parameters()], reg.num_steps, float(loss), time.time() - t0)
    print(mode, "num_steps", reg.num_steps, "loss", float(loss), "time %.1fs" % (time.time() - t0), "refreshes", [int(s["refreshes"]) for st in reg.state.values() for s in st])
print("max diff", max(float((a - b).abs().max()) for a, b in zip(res["eager"][0], res["compiled"][0])))

"""How far an exact float32 SVD is from a float64 one on the spiked weights of
sharded_spike_probe.py (R(X) with each one's own eps): the floor below which no float32
refresh can meet the contract.

Usage: OMP_NUM_THREADS=1 python benchmarks/results/probes/fp32_svd_floor_probe.py
"""
import os, sys, torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "tests"))
import test_sharded_residual as T
from q3r import reference
weights, states, configs = T._vit_at_its_first_warm_refresh()
for c in (300.0, 30000.0):
    worst = 0
    for w, s, cfg in zip(weights, states, configs):
        sig = torch.linalg.svdvals(w.double())
        W = w + c * float(sig[0]) * torch.outer(s["U"][:, 0], s["V"][:, 0])
        prev = (float(s["eps"]), float(s["eps0"]), int(s["refreshes"]))
        out = []
        for dt in (torch.float32, torch.float64):
            U, S, Vh = torch.linalg.svd(W.to(dt), full_matrices=False)
            U, S, V = U.double(), S.double(), Vh.mT.double()
            eps, _ = reference.next_eps(cfg.schedule, prev[0], float(S[cfg.rank]), prev[2], prev[1], cfg.eps_value, cfg.eps_floor, cfg.num_refreshes)
            X = torch.randn(W.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
            out.append(reference.apply_reweighting(X, U, V, reference.reweighting_coefficients(S, eps)))
        worst = max(worst, float((out[0] - out[1]).norm() / out[1].norm()))
        ratio = float(sig[cfg.rank] / (sig[0]*(1+c)))
    print(f"x{c:g}: fp32 exact SVD vs fp64, worst R(X) error {worst:.2e}; sigma_r+1/sigma_1 ~ {ratio:.1e}")

"""The sharded range finder (FSDP2's refresh) on spiked spectra, one rank: the small ViT's
step-5 weights and states (tests/test_sharded_residual.py) plus c sigma_1 along each weight's
top direction; worst R(X) error of enveloping_svd against an exact float64 SVD, residual check
on and off, and how many of its judgements (_far calls) said far.

Usage: OMP_NUM_THREADS=1 python benchmarks/results/probes/sharded_spike_probe.py
"""
import os, sys, torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "tests"))
import test_sharded_residual as T
from q3r.distributed import sharded_refresh as sharded
import q3r.distributed.rangefinder as rf
calls = []
judge = rf._far
rf._far = lambda *a: calls.append(judge(*a)) or calls[-1]
weights, states, configs = T._vit_at_its_first_warm_refresh()
for c in (0.0, 30.0, 300.0, 3000.0, 30000.0):
    ws = []
    for w, s in zip(weights, states):
        sig = torch.linalg.svdvals(w.double())
        ws.append(w + c * float(sig[0]) * torch.outer(s["U"][:, 0], s["V"][:, 0]))
    calls.clear()
    on = [T._sharded_error(w, s, cf, sharded.SKETCH.max_residual, torch.Generator().manual_seed(2)) for w, s, cf in zip(ws, states, configs)]
    far = sum(calls)
    off = [T._sharded_error(w, s, cf, 1.0, torch.Generator().manual_seed(2)) for w, s, cf in zip(ws, states, configs)]
    print(f"spike x{c:g}: worst R(X) error, check on {max(on):.2e} (far {far} of {len(calls)} judged)  check off {max(off):.2e}", flush=True)

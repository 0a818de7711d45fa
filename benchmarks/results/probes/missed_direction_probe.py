"""A direction outside the previous row space, which a warm sketch does not see (README,
"Refresh accuracy", known limit): a 96 x 128 weight, rank 12, whose last 32 rows and columns
are exactly zero at the first refresh and then come alive along one direction u v^T at
``mult`` times eps. R(X) of the randomized refresh against the exact one at the second
(warm) refresh, relative Frobenius error for one Gaussian X (a review's construct).

Usage: OMP_NUM_THREADS=1 python benchmarks/results/probes/missed_direction_probe.py
"""

import torch

from q3r import reference
from q3r.refresh import SliceConfig, new_slice_state, operator_of, refresh_slices_

gen = torch.Generator().manual_seed(0)
d1, d2, rank, dead = 96, 128, 12, 32
W0 = torch.zeros(d1, d2, dtype=torch.float64)
W0[: d1 - dead, : d2 - dead] = torch.randn(d1 - dead, d2 - dead, generator=gen, dtype=torch.float64) / (d2 - dead) ** 0.5
eps = float(torch.linalg.svdvals(W0)[rank])
for mult in (1.05, 1.5, 3.0, 10.0, 100.0):
    u, v = torch.zeros(d1, dtype=torch.float64), torch.zeros(d2, dtype=torch.float64)
    u[d1 - dead:] = torch.randn(dead, generator=gen, dtype=torch.float64)
    v[d2 - dead:] = torch.randn(dead, generator=gen, dtype=torch.float64)
    W1 = W0 + mult * eps * torch.outer(u / u.norm(), v / v.norm())
    fast, exact, config = new_slice_state(d1, d2), new_slice_state(d1, d2), SliceConfig("w", rank)
    for W in (W0, W1):
        refresh_slices_([W.float()], [fast], [config], method="randomized")
        refresh_slices_([W.float()], [exact], [config], method="exact")
    X = torch.randn(d1, d2, generator=gen, dtype=torch.float64)
    Rf, Re = (reference.apply_reweighting(X, *(t.double() for t in operator_of(s))) for s in (fast, exact))
    print(f"new direction at {mult:g} x eps: R(X) error of the warm refresh {float((Rf - Re).norm() / Re.norm()):.2e}, "
          f"envelope {int((fast['sigma'] > fast['eps']).sum())} (exact {int((exact['sigma'] > exact['eps']).sum())})")

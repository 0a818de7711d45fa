"""How often the `geometric` eps schedule sends a fast refresh to the exact SVD.

The growth rule (SketchOptions.max_envelope_growth) gives a warm target whose envelope grows
by more than 2 triplets at a refresh an exact SVD. Under `geometric`, eps falls by design, and
with a floor well below sigma_{r+1} the envelope grows at every refresh until eps reaches the
floor. This runs tests/test_randomized_refresh.py's sequences (120 x 96, rank 16, two targets,
noise of 5e-3 of the rms entry per period) with eps_floor = sigma_{r+31} and prints, per
refresh, how many targets the fast refresh left to an exact SVD.

    python benchmarks/results/probes/geometric_growth_probe.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT / "python"), str(ROOT / "tests")]

import torch  # noqa: E402

import q3r.refresh as refresh  # noqa: E402
from test_randomized_refresh import FAST, RANK, SliceConfig, run_sequence, spectrum_case  # noqa: E402


def main() -> None:
    exact_per_refresh = []
    original = refresh.refresh_sketched

    def counting(*args, **kwargs):
        nonfinite, exact = original(*args, **kwargs)
        exact_per_refresh.append(sum(len(group) for group in exact))
        return nonfinite, exact

    refresh.refresh_sketched = counting
    print("spectrum | method | targets given an exact SVD at refreshes 1..6 | envelopes at the end")
    for kind in ("trained_decay", "exp_decay", "random_init"):
        for method in FAST:
            exact_per_refresh.clear()
            gen = torch.Generator().manual_seed(11)
            weights = [spectrum_case(kind, gen) for _ in range(2)]
            floor = float(torch.linalg.svdvals(weights[0].double())[RANK + 30])
            configs = [SliceConfig(f"t{j}", RANK, schedule="geometric", eps_floor=floor, num_refreshes=4) for j in range(2)]
            fast, _ = run_sequence(method, weights, configs, refreshes=6, drift=5e-3, gen=gen)
            print(f"{kind} | {method} | {exact_per_refresh} | {[int(s['sigma'].shape[0]) for s in fast]}")


if __name__ == "__main__":
    main()

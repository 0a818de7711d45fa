"""How often the `geometric` eps schedule sends a fast refresh to the exact SVD, and how
accurate it is there.

Under `geometric`, eps falls by design, and with a floor well below sigma_{r+1} envelopes
grow at every refresh until eps reaches the floor. A warm target whose envelope grows by more
than SketchOptions.max_envelope_growth is sketched again, twice as wide, with
grown_power_iters, or takes an exact SVD where twice as wide exceeds exact_fraction of the
matrix (before ffc3be0: always an exact SVD). This runs two drifting n x n targets (noise of
3e-3 of the rms entry per period), rank 0.2 n, eps_floor = sigma_{r+17} and sigma_{r+65} of
the first weight, num_refreshes 4, six refreshes, against the exact SVD, and prints per
refresh how many targets the fast refresh left to an exact SVD, the exact envelopes, the worst
R(X) and sigma_{r+1} relative errors (contract: 1e-3 and 1e-2) and the fast refreshes' time.

    python benchmarks/results/probes/geometric_growth_probe.py [--size 768] [--options "..."]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# this checkout's q3r, whatever is installed, and its benchmarks' helpers (the folder of a
# script run directly is on the path already, so its sibling probe imports as it is)
ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT / "python"), str(ROOT / "benchmarks")]

import torch  # noqa: E402

from _common import exact_fallbacks  # noqa: E402
from q3r import reference  # noqa: E402
from q3r.refresh import SketchOptions, SliceConfig, new_slice_state, operator_of, refresh_slices_  # noqa: E402
from refresh_accuracy_probe import drifted, weight  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=768)
    ap.add_argument("--options", default="", help="SketchOptions fields, e.g. \"max_envelope_growth=10**9\"")
    args = ap.parse_args(argv)
    n, rank = args.size, int(0.2 * args.size)
    options = SketchOptions(**eval(f"dict({args.options})", {}))
    print(f"# {n} x {n}, rank {rank}, geometric schedule (num_refreshes 4), 6 refreshes, drift 3e-3, "
          f"method randomized, {options}")
    print("spectrum | eps_floor | targets given an exact SVD at refreshes 1..6 | exact envelopes | "
          "worst R(X) err | worst sigma err | fast refresh time (s)")
    for kind in ("trained_decay", "random_init", "q3r_tail_1e-2"):
        for below in (16, 64):
            gen = torch.Generator().manual_seed(0)
            torch.manual_seed(0)
            weights = [weight(kind, n, rank, gen) for _ in range(2)]
            floor = float(torch.linalg.svdvals(weights[0].double())[rank + below])
            configs = [SliceConfig(f"t{j}", rank, schedule="geometric", eps_floor=floor, num_refreshes=4)
                       for j in range(2)]
            fast = [new_slice_state(n, n) for _ in weights]
            exact = [new_slice_state(n, n) for _ in weights]
            X = torch.randn(n, n, generator=gen)
            worst_r = worst_s = seconds = 0.0
            envelopes = []
            with exact_fallbacks() as exact_per_refresh:  # (one count per fast refresh: the exact ones are not sketched)
                for _ in range(6):
                    start = time.perf_counter()
                    refresh_slices_(weights, fast, configs, method="randomized", options=options)
                    seconds += time.perf_counter() - start
                    refresh_slices_(weights, exact, configs, method="exact")
                    for f, e in zip(fast, exact):
                        Rf = reference.apply_reweighting(X, *operator_of(f))
                        Re = reference.apply_reweighting(X, *operator_of(e))
                        worst_r = max(worst_r, float((Rf - Re).norm() / Re.norm()))
                        se = float(e["sigma_next"])
                        worst_s = max(worst_s, abs(float(f["sigma_next"]) - se) / se)
                    envelopes.append(int(exact[0]["sigma"].shape[0]))
                    weights = drifted(weights, 3e-3, gen)
            print(f"{kind} | sigma_(r+{below + 1}) | {exact_per_refresh} | {envelopes} | {worst_r:.2e} | "
                  f"{worst_s:.2e} | {seconds:.1f}", flush=True)


if __name__ == "__main__":
    main()

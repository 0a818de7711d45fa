"""The randomized refresh against the exact SVD at ViT-B size (768 x 768, rank 153), on
spectra like those of tests/test_randomized_refresh.py and on Q3R-trained ones (a flat bulk
just under eps) drifting between refreshes; each in IEEE fp32 and with TF32 matmuls emulated.

Why: the tests check the accuracy contract of issue 4 at about 100 x 100; this checks it at
a real size. The TF32 column is what an unpinned refresh would do under
``torch.set_float32_matmul_precision("high")`` on a GPU (q3r._precision pins IEEE).

TF32 tensor cores round each fp32 input to a 10-bit mantissa (round to nearest, ties away)
and accumulate in fp32. This emulates that on a CPU: a dispatch mode rounds the fp32 operands
of every matrix product (mm, bmm, addmm, baddbmm, ...) the same way, so the whole randomized
refresh runs as an unpinned one would under "high" on a GPU (solvers, norms and elementwise
ops stay fp32, as they do there). It compares the operator and sigma_{r+1} against the exact
SVD, with the accuracy contract of issue 4 (R(X) within 1e-3, sigma_{r+1} within 1%), on
spectra like those of tests/test_randomized_refresh.py at a ViT-B-sized 768 x 768.

    python benchmarks/results/probes/refresh_accuracy_probe.py [--size 768] [--refreshes 3]
        [--options "max_envelope_growth=10**9"]   (SketchOptions fields; that one: the rule off)
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

# this checkout's q3r, whatever is installed (the folder of a script run directly is on the
# path already, so its sibling probe imports as it is)
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "python"))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from q3r import reference  # noqa: E402
from q3r.refresh import SketchOptions, SliceConfig, new_slice_state, operator_of, refresh_slices_  # noqa: E402

aten = torch.ops.aten
# products and the positions of their matrix operands (a bias / accumulator input is added in
# fp32 by the epilogue, as cuBLAS does)
_PRODUCTS = {aten.mm.default: (0, 1), aten.bmm.default: (0, 1), aten.addmm.default: (1, 2),
             aten.baddbmm.default: (1, 2), aten.mv.default: (0, 1), aten.dot.default: (0, 1)}


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest value with a 10-bit mantissa (ties away from zero), as fp32."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32).reshape(x.shape)


class EmulatedTF32(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        operands = _PRODUCTS.get(func)
        if operands is not None:
            args = list(args)
            for i in operands:
                if args[i].dtype == torch.float32:
                    args[i] = tf32_round(args[i])
        return func(*args, **(kwargs or {}))


def spectrum(kind: str, n: int, rank: int) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64)
    if kind == "trained_decay":  # power law over a noise floor
        return (1 + i) ** -0.8 + 0.02 * torch.rand(n, dtype=torch.float64)
    if kind == "exp_decay":
        return torch.exp(-i / (n / 10))
    if kind.startswith("q3r_tail_"):  # after Q3R training: the tail pushed down to a ratio
        ratio = float(kind.removeprefix("q3r_tail_"))
        return torch.cat([torch.linspace(1.0, 0.3, rank, dtype=torch.float64),
                          ratio * torch.linspace(1.0, 0.2, n - rank, dtype=torch.float64)])
    raise ValueError(kind)


def weight(kind: str, n: int, rank: int, gen) -> torch.Tensor:
    if kind == "random_init":  # Gaussian / sqrt(fan-in), as bench_refresh.py uses
        return torch.randn(n, n, generator=gen) / math.sqrt(n)
    return with_spectrum(spectrum(kind, n, rank), gen)


def with_spectrum(sigma: torch.Tensor, gen) -> torch.Tensor:
    n = sigma.numel()
    U = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen)).Q
    V = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen)).Q
    return ((U * sigma) @ V.T).float()


def worst_errors(kind: str, n: int, rank: int, refreshes: int, drift: float, emulate: bool,
                 options: SketchOptions, seed: int = 0) -> tuple[float, float]:
    """max over refreshes and targets of (R(X) relative error, sigma_{r+1} relative error)."""
    def refresh(weights, fast, configs):
        with EmulatedTF32() if emulate else contextlib.nullcontext():
            refresh_slices_(weights, fast, configs, method="randomized", options=options)

    worst_r, worst_s, _, _ = against_exact(refresh, kind, n, rank, refreshes, drift, seed)
    return worst_r, worst_s


def against_exact(refresh, kind: str, n: int, rank: int, refreshes: int, drift: float, seed: int = 0):
    """``refresh(weights, states, configs)`` and the exact SVD side by side on two drifting
    targets: the worst R(X) and sigma_{r+1} relative errors over the refreshes, and the last
    states (fast, exact). A fast state's U may be a DTensor (a sharded refresh)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    weights = [weight(kind, n, rank, gen) for _ in range(2)]
    configs = [SliceConfig(f"t{j}", rank) for j in range(2)]
    fast = [new_slice_state(n, n) for _ in weights]
    exact = [new_slice_state(n, n) for _ in weights]
    X = torch.randn(n, n, generator=gen)
    worst_r = worst_s = 0.0
    for _ in range(refreshes):
        refresh(weights, fast, configs)
        refresh_slices_(weights, exact, configs, method="exact")
        for f, e in zip(fast, exact):
            U = f["U"].full_tensor() if hasattr(f["U"], "full_tensor") else f["U"]
            Rf = reference.apply_reweighting(X, *operator_of({**f, "U": U}))
            Re = reference.apply_reweighting(X, *operator_of(e))
            worst_r = max(worst_r, float((Rf - Re).norm() / Re.norm()))
            se = float(e["sigma_next"])
            worst_s = max(worst_s, abs(float(f["sigma_next"]) - se) / se)
        weights = drifted(weights, drift, gen)
    return worst_r, worst_s, fast, exact


def drifted(weights: list[torch.Tensor], drift: float, gen) -> list[torch.Tensor]:
    """Each weight plus Gaussian noise of ``drift`` times its rms entry."""
    return [w + float(drift * w.double().norm() / math.sqrt(w.numel())) * torch.randn(w.shape, generator=gen)
            for w in weights]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=768)
    ap.add_argument("--refreshes", type=int, default=3)
    ap.add_argument("--drifts", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2],
                    help="noise added between refreshes, times the weight's rms entry")
    ap.add_argument("--kinds", nargs="+", default=["trained_decay", "exp_decay", "q3r_tail_1e-2", "q3r_tail_1e-3", "random_init"])
    ap.add_argument("--options", default="", help="SketchOptions fields, e.g. \"oversampling=32,warm_power_iters=1\"")
    args = ap.parse_args(argv)
    rank = int(0.2 * args.size)
    options = SketchOptions(**eval(f"dict({args.options})", {}))
    print(f"# {args.size} x {args.size}, rank {rank}, {args.refreshes} refreshes (cold, then warm on drifting weights), "
          f"method randomized, {options}; worst of 2 targets; contract: R(X) <= 1e-3, sigma_(r+1) <= 1e-2",
          flush=True)
    print(f"{'spectrum':>16} | {'drift':>6} | {'R(X) err, IEEE':>14} | {'R(X) err, TF32':>14} | {'sigma err, IEEE':>15} | "
          f"{'sigma err, TF32':>15}")
    for kind in args.kinds:
        for drift in args.drifts:
            r_ieee, s_ieee = worst_errors(kind, args.size, rank, args.refreshes, drift, emulate=False, options=options)
            r_tf32, s_tf32 = worst_errors(kind, args.size, rank, args.refreshes, drift, emulate=True, options=options)
            print(f"{kind:>16} | {drift:6.0e} | {r_ieee:14.2e} | {r_tf32:14.2e} | {s_ieee:15.2e} | {s_tf32:15.2e}", flush=True)


if __name__ == "__main__":
    main()

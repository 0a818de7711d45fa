"""Host (Python) overhead of the fused AdamQ3R step around refreshes, on a CPU.

    python benchmarks/plan_overhead.py

Builds the ViT-B/16 layout on the CPU, selects the Triton backend under the interpreter and
stubs out the kernels' launch (AdamQ3RPlan.run), so what is timed is only the Python around
them: building or updating the plan (device tables) the fused kernels read.  Prints the
fastest of n steps for: a cached plan; a plan rebuilt from scratch; a step after every
target got new factors of a new width (a whole refresh); a step after a few targets did (a
staggered refresh); and a control that makes as many tensors as the staggered case without
swapping them in.  Measures nothing on a GPU.
"""

import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
os.environ["Q3R_BACKEND"] = "triton"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import _common as C  # noqa: E402
import q3r  # noqa: E402
import q3r_kernels as K  # noqa: E402
from bench_step import fake_refresh, q3r_targets  # noqa: E402
from q3r import ops  # noqa: E402


def fastest_ms(fn, n=20, prep=None) -> float:
    times = []
    for _ in range(n):
        if prep:
            prep()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def main() -> None:
    model, _, _, targets, label = C.vit_b16(device="cpu")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt = q3r.AdamQ3R(q3r.param_groups(model, q3r_targets(targets), weight_decay=0.05, lmbda=0.1, steps=5), lr=1e-4)
    fake_refresh(opt)
    K.AdamQ3RPlan.run = lambda self, *a, **k: None  # time the Python only
    opt.step()
    for g in opt.param_groups:
        g["steps"] = 10**9  # no refresh inside the timed steps
    print(label, "(CPU, kernels stubbed)")
    print(f"  step, cached plan: {fastest_ms(opt.step):.2f} ms")

    def rebuilt():
        ops._PLANS.clear()
        opt.step()
    print(f"  step, plan rebuilt from scratch: {fastest_ms(rebuilt):.2f} ms")

    # A refresh replaces every slice's U, V, sigma, eps by new tensors whose width moves by a
    # few columns: fresh tensors (unfilled: run() is stubbed) of a width cycling through
    # k+1, k-1, k+2, k-2, k+3 are swapped in before each timed step.
    states = [opt.state[p]["q3r"] for g in opt.param_groups if g["q3r"] for p in g["params"]]
    widths = [[s["U"].shape[1] for s in st] for st in states]
    turn = [0]

    def swap(which):
        turn[0] += 1
        dk = (1, -1, 2, -2, 3)[turn[0] % 5]
        for n, (st, ks) in enumerate(zip(states, widths)):
            if which(n):
                for s, k in zip(st, ks):
                    s.update(U=torch.empty(s["U"].shape[0], k + dk), V=torch.empty(s["V"].shape[0], k + dk),
                             sigma=torch.empty(k + dk), eps=torch.tensor(1.0))
    whole = fastest_ms(opt.step, prep=lambda: swap(lambda n: True))
    print(f"  step after all {len(states)} targets got new factors: {whole:.2f} ms")
    step_no = [0]

    def few():
        step_no[0] += 1
        swap(lambda n: (n - step_no[0]) % 16 == 0)
    print(f"  step after {len(states) // 16} targets got new factors (staggered): {fastest_ms(opt.step, 32, few):.2f} ms")
    junk = []

    def control():
        junk[:] = [torch.empty(768, 150) for _ in range(18)]
    print(f"  control, cached plan after making as many tensors: {fastest_ms(opt.step, 32, control):.2f} ms")


if __name__ == "__main__":
    main()

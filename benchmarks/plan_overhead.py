"""Host (Python) overhead of the per-step Q3R work around refreshes, on a CPU.

    python benchmarks/plan_overhead.py

Builds the ViT-B/16 layout on the CPU, selects the Triton backend under the interpreter and
stubs out every kernel launch (the launch call returns at once), so what is timed is the
Python around them: building, updating and running the cached plans (device tables,
schedules, workspace) the kernels read.  For the fused AdamQ3R step it prints the fastest of
n steps for: a cached plan; a plan rebuilt from scratch; a step after every target got new
factors of a new width (a whole refresh); a step after a few targets did (a staggered
refresh); and a control that makes as many tensors as the staggered case without swapping
them in.  For the Q3R regularizer's add_grad_ (ops.add_reweighting_): a cached plan, and a
plan rebuilt from scratch.  Measures nothing on a GPU, where launches add their own cost.
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
from bench_step import RANK_FRACTION, fake_refresh, q3r_targets  # noqa: E402
from q3r import ops  # noqa: E402
from q3r.targets import slice_shapes  # noqa: E402


def fastest_ms(fn, n=20, prep=None) -> float:
    times = []
    for _ in range(n):
        if prep:
            prep()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def stub_launches() -> None:
    """Make kernel[grid](...) return at once: time the Python only."""
    kernel_type = type(K.apply._apply_kernel)  # every @triton.jit kernel shares it
    kernel_type.__getitem__ = lambda self, grid: (lambda *args, **kwargs: None)


def regularizer(model, targets) -> None:
    """The Q3R regularizer's per-step work: add_grad_ on every target's gradient."""
    reg = q3r.Q3R(q3r_targets(targets), lmbda=0.1, steps=10**9)
    for t in reg.targets:  # factors of the target rank, as a refresh leaves them (see fake_refresh)
        for state, (rows, cols) in zip(reg.state[t.name], slice_shapes(t.param.shape, t.slice_dim, t.slices)):
            k = int(RANK_FRACTION * min(rows, cols))
            state.update(U=torch.randn(rows, k), V=torch.randn(cols, k), sigma=torch.rand(k) + 1,
                         eps=torch.tensor(1.0))
    reg.num_steps = 1  # past the first refresh
    reg.add_grad_()
    print(f"  regularizer add_grad_, cached plan: {fastest_ms(reg.add_grad_):.2f} ms")

    def rebuilt():
        ops._PLANS.clear()
        reg.add_grad_()
    print(f"  regularizer add_grad_, plan rebuilt from scratch: {fastest_ms(rebuilt):.2f} ms")


def main() -> None:
    model, _, _, targets, label = C.vit_b16(device="cpu")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt = q3r.AdamQ3R(q3r.param_groups(model, q3r_targets(targets), weight_decay=0.05, lmbda=0.1, steps=5), lr=1e-4)
    fake_refresh(opt)
    stub_launches()
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
    regularizer(model, targets)


if __name__ == "__main__":
    main()

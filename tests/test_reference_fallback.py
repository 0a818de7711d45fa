"""The reference path as the fallback step (CPU; GPU where the kernels do not run): R(W) is
added as W plus two rank-k products, in place, so a step makes no full-size temporary of its
own, and its arithmetic is the decoupled step of SPEC section 3."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import q3r
from q3r import reference
from helpers import dense_reweighting

SHAPES = [(37, 53), (53, 37), (1, 9), (16, 16)]


def _operator(W: torch.Tensor, k: int, keep: int):
    """(U, V, d) of W's top-k triplets with eps = sigma_{keep}: the triplets past `keep` get d = 0."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    eps = S[keep] if keep < S.numel() else S[-1] / 2
    return U[:, :k], Vh[:k].mT, reference.reweighting_coefficients(S[:k], eps)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [0, 1, 4])
def test_the_low_rank_parts_add_up_to_the_dense_operator(shape, k):
    g = torch.Generator().manual_seed(sum(shape) + k)
    W, X = (torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(2))
    k = min(k, min(shape))
    U, V, d = _operator(W, k, k)
    parts = reference.reweighting_low_rank(X, U, V, d)
    assert len(parts) == 2 and all(L.shape[-1] == M.shape[-2] == k for L, M in parts)
    total = X + sum(L @ M for L, M in parts)
    eps = float(torch.linalg.svdvals(W)[k]) if k < min(shape) else float(torch.linalg.svdvals(W)[-1]) / 2
    expected = dense_reweighting(W, eps, X) if k else X
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reference.apply_reweighting(X, U, V, d), expected, rtol=1e-12, atol=1e-12)


def test_the_low_rank_parts_of_a_batch_are_those_of_each_member():
    g = torch.Generator().manual_seed(3)
    W, X = torch.randn(3, 13, 9, generator=g), torch.randn(3, 13, 9, generator=g)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    d = reference.reweighting_coefficients(S[:, :4], S[:, 4])
    batched = reference.reweighting_low_rank(X, U[:, :, :4], Vh[:, :4].mT, d)
    for b in range(3):
        single = reference.reweighting_low_rank(X[b], U[b, :, :4], Vh[b, :4].mT, d[b])
        for (Lb, Mb), (L, M) in zip(batched, single):
            torch.testing.assert_close(Lb[b] @ Mb[b], L @ M)


def _full_size_allocations(run, nbytes: int) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    return sum(1 for e in prof.events() if e.self_cpu_memory_usage >= nbytes)


def _stepped(dtype, lmbda: float, weight_decay: float = 0.0, slices=None, slice_dim: int = 0):
    """An AdamQ3R over one 96 x 80 target, past its first (refresh) step: the next step is a
    plain one. Returns (parameter, optimizer)."""
    g = torch.Generator().manual_seed(0)
    W = torch.nn.Parameter(torch.randn(96, 80, generator=g).to(dtype))
    group = {"params": [W], "q3r": True, "target_rank": 3, "lmbda": lmbda, "steps": 1000,
             "refresh": "exact", "weight_decay": weight_decay}
    if slices is not None:
        group["slices"], group["slice_dim"] = slices, slice_dim
    opt = q3r.AdamQ3R([group], lr=1e-2)
    W.grad = torch.randn(96, 80, generator=g).to(dtype)
    opt.step()
    return W, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_decay, slices", [(0.0, None), (0.1, [(0, 30), (30, 61), (70, 96)])])
def test_a_fallback_step_with_a_term_makes_no_more_full_size_tensors_than_adams_own(dtype, weight_decay, slices,
                                                                                     monkeypatch):
    """Adam's own arithmetic makes full-size temporaries (its denominator, as torch.optim.Adam's
    does), and a low-precision target with a term is stepped in float32: a float32 copy of it
    and of its gradient and two moments (4). The Q3R term adds none beyond its blocks of rows
    (12 rows here); R(W) written out per slice made three, and the low-precision target's
    slices were each converted again. Counted: allocations of at least a float32 tensor of the
    smallest slice's size."""
    monkeypatch.setenv("Q3R_BACKEND", "reference")
    monkeypatch.setitem(reference.ROW_BLOCK_ELEMENTS, "cpu", 1000)  # (blocks of 12 rows)
    full = 96 * 80 * 4 if slices is None else 26 * 80 * 4
    W, opt = _stepped(torch.float32, 0.0, weight_decay, slices)
    adams_own = _full_size_allocations(opt.step, full)
    W, opt = _stepped(dtype, 0.5, weight_decay, slices)
    with_term = _full_size_allocations(opt.step, full)
    assert adams_own >= 1
    assert with_term <= adams_own + (4 if dtype != torch.float32 else 0), (with_term, adams_own)


def test_the_regularizers_fallback_adds_its_term_to_the_gradient_with_no_full_size_tensor(monkeypatch):
    monkeypatch.setenv("Q3R_BACKEND", "reference")
    monkeypatch.setitem(reference.ROW_BLOCK_ELEMENTS, "cpu", 1000)
    model = torch.nn.Sequential(torch.nn.Linear(80, 96, bias=False))
    reg = q3r.Q3R(q3r.find_targets(model, ["0"], target_rank=3), lmbda=0.5, refresh="exact")
    model[0].weight.grad = torch.randn(96, 80)
    reg.add_grad_()  # (the first call refreshes)
    before = model[0].weight.grad.clone()
    assert _full_size_allocations(reg.add_grad_, 96 * 80 * 4) == 0
    state = reg.state[reg.targets[0].name][0]
    W = model[0].weight.detach()
    expected = before + 2 * 0.5 * reference.apply_reweighting(W, state["U"], state["V"], reference.reweighting_coefficients(
        state["sigma"], state["eps"]))
    torch.testing.assert_close(model[0].weight.grad, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("slice_dim", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_the_fallback_step_is_the_decoupled_step_on_slices_with_a_gap_and_weight_decay(dtype, slice_dim, monkeypatch):
    """W <- W (1 - lr wd) - Adam step - lr 2 lambda R_j(W_prev) on each slice, W (1 - lr wd) -
    Adam step on the rows (columns) no slice covers, written out with R(W_prev) in float64.
    Column slices are views with gaps between their rows, into which the term is added."""
    monkeypatch.setenv("Q3R_BACKEND", "reference")
    slices = [(0, 30), (30, 61), (70, 96)] if slice_dim == 0 else [(0, 20), (20, 41), (55, 80)]
    lr, wd, lmbda = 1e-2, 0.1, 0.5
    W, opt = _stepped(dtype, lmbda, wd, slices, slice_dim)
    prev = W.detach().double().clone()
    state = opt.state[W]
    m, v = state["exp_avg"].double().clone(), state["exp_avg_sq"].double().clone()
    g = torch.randn(96, 80, generator=torch.Generator().manual_seed(9)).to(dtype)
    W.grad = g
    opt.step()
    g = g.double()
    m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
    expected = prev * (1 - lr * wd) - lr / (1 - 0.9**2) * m / ((v / (1 - 0.999**2)).sqrt() + 1e-8)
    for (a, b), s in zip(slices, state["q3r"]):
        d = reference.reweighting_coefficients(s["sigma"], s["eps"]).double()  # (as the step takes it: float32 state)
        R = reference.apply_reweighting(prev.narrow(slice_dim, a, b - a), s["U"].double(), s["V"].double(), d)
        expected.narrow(slice_dim, a, b - a).sub_(lr * 2 * lmbda * R)
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(W.detach().double(), expected.to(dtype).double(), rtol=tol, atol=tol)


def test_the_fallback_steps_scaling_of_the_slices_has_no_bias_that_accumulates_over_steps():
    """The term is subtracted as lr 2 lambda R(W) per element (a block of rows of R at a time).
    Taken as W times one factor (1 - lr wd - lr 2 lambda) plus the rank-k products (29e6178),
    that factor rounded to float32 was off by up to 2^-25, the same in every element and every
    step, so a float32 weight drifted from the float64 step along W itself, linearly in the
    number of steps (here 200 steps: 6e-6 of |W|^2; per element: 5e-8). c = lr 2 lambda is put
    halfway between two float32 neighbours of 1 - c."""
    from q3r.optim import functional

    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(48, 40, generator=g, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    op = (U[:, :4].float(), Vh[:4].mT.float(), S[:4].float(), S[4].float())
    lmbda = 0.1
    lr = 3355.5 * 2.0**-24 / (2 * lmbda)  # c = 2.0e-4
    out = {}
    for dtype in (torch.float32, torch.float64):
        W = W0.to(dtype, copy=True)
        zero = torch.zeros_like(W)  # no task gradient: Adam's update is 0, the step is the term alone
        work = functional.ParamWork(W, zero, zero.clone(), zero.clone(), torch.tensor(0.0), lr, 0.9, 0.999, 1e-8, 0.0,
                                    lmbda, 0, None, [op])
        for _ in range(200):
            functional.adamq3r_reference_([work])
        out[dtype] = W.double()
    exact = out[torch.float64]
    assert float(exact.norm()) < 0.99 * float(W0.norm())  # (the term did move W)
    bias = float(((out[torch.float32] - exact) * exact).sum() / exact.square().sum())
    assert abs(bias) < 5e-7, bias


def _cuda_step_peak(dtype, lmbda: float, d1: int, d2: int, k: int) -> int:
    """Bytes allocated above what was held when a (non-refresh) AdamQ3R step on one CUDA target began."""
    g = torch.Generator(device="cuda").manual_seed(0)
    W = torch.nn.Parameter(torch.randn(d1, d2, device="cuda", generator=g).to(dtype))
    opt = q3r.AdamQ3R([{"params": [W], "q3r": True, "target_rank": k, "lmbda": lmbda, "steps": 1000,
                        "refresh": "exact"}], lr=1e-3)
    W.grad = torch.randn(d1, d2, device="cuda", generator=g).to(dtype)
    opt.step()  # (the refresh)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    opt.step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_cuda_the_fallback_steps_term_adds_to_the_peak_no_more_than_its_factor_sized_pieces(dtype, monkeypatch):
    """The reference path on a GPU (where it serves factors wider than Q3R_TRITON_MAX_WIDTH):
    a step with a term peaks above a float32 step with lambda = 0 (Adam's own temporaries) by no
    more than a few factor-sized pieces (A, B, the products' halves: (d1 + d2) k floats each) and
    a block of rows of R(W) (1 MiB here; two while one is freed), plus, for a low-precision
    target, its float32 copy, gradient and two moments. R(W) written out added three full-size
    float32 tensors per slice."""
    monkeypatch.setenv("Q3R_BACKEND", "reference")
    monkeypatch.setitem(reference.ROW_BLOCK_ELEMENTS, "cuda", 2**18)  # (blocks of 170 rows, 1 MiB)
    d1, d2, k = 2048, 1536, 64
    adams_own = _cuda_step_peak(torch.float32, 0.0, d1, d2, k)
    with_term = _cuda_step_peak(dtype, 0.5, d1, d2, k)
    full32 = d1 * d2 * 4
    allowed = 6 * (d1 + d2) * k * 4 + 2 * 2**20 + (4 * full32 if dtype != torch.float32 else 0) + 2**20
    assert adams_own >= full32  # (its denominator, at least)
    assert with_term - adams_own <= allowed, (with_term, adams_own, allowed)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_fallback_step_in_blocks_of_rows_is_the_step_taken_whole(dtype, monkeypatch):
    """R(W) formed a few rows at a time (7 rows; a block that ends mid-slice, column slices) gives
    the step that forming it whole gives, for AdamQ3R and for the regularizer's add_grad_."""
    monkeypatch.setenv("Q3R_BACKEND", "reference")
    results = {}
    for budget in (7 * 80, 2**30):
        monkeypatch.setitem(reference.ROW_BLOCK_ELEMENTS, "cpu", budget)
        W, opt = _stepped(dtype, 0.5, 0.1, [(0, 20), (20, 41), (55, 80)], slice_dim=1)
        W.grad = torch.randn(96, 80, generator=torch.Generator().manual_seed(9)).to(dtype)
        opt.step()
        model = torch.nn.Sequential(torch.nn.Linear(80, 96, bias=False)).to(dtype)
        with torch.no_grad():
            model[0].weight.copy_(W)
        reg = q3r.Q3R(q3r.find_targets(model, ["0"], target_rank=3), lmbda=0.5, refresh="exact")
        model[0].weight.grad = torch.ones_like(W)
        reg.add_grad_()
        results[budget] = (W.detach().clone(), model[0].weight.grad.clone())
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for blocked, whole in zip(results[7 * 80], results[2**30]):
        torch.testing.assert_close(blocked, whole, rtol=tol, atol=tol)


def test_the_fallback_step_does_not_drift_where_the_term_barely_moves_w():
    """Where W barely moves from step to step (here: only the term acts, and it nearly leaves the
    top directions alone), each step's roundings repeat. Added as W - c W and then the two
    rank-k products, W was rounded twice per step, and those roundings did not cancel: after
    3,000 steps of a 128 x 128 float32 W the error along W was 5.7e-7 and 2.8e-7 of |W|^2
    (seeds 0, 1); R(W)'s rows formed first and W rounded once per step: 2.4e-8 and 5.3e-8
    (R(W) written out whole, 371a6ad: 2.7e-8 and 1.5e-10)."""
    from q3r.optim import functional

    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        W0 = torch.randn(128, 128, generator=g, dtype=torch.float64)
        U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
        op = (U[:, :4].float(), Vh[:4].mT.float(), S[:4].float(), S[4].float())
        out = {}
        for dtype in (torch.float32, torch.float64):
            W = W0.to(dtype, copy=True)
            zero = torch.zeros_like(W)  # no task gradient: the step is the term alone (c = 2e-4)
            work = functional.ParamWork(W, zero, zero.clone(), zero.clone(), torch.tensor(0.0), 1e-3, 0.9, 0.999,
                                        1e-8, 0.0, 0.1, 0, None, [op])
            for _ in range(3000):
                functional.adamq3r_reference_([work])
            out[dtype] = W.double()
        exact = out[torch.float64]
        drift = float(((out[torch.float32] - exact) * exact).sum() / exact.square().sum())
        assert abs(drift) < 1.5e-7, (seed, drift)


def test_a_low_precision_gradient_takes_the_regularizers_term_in_blocks_too(monkeypatch):
    """bf16 weights and gradients (the usual bf16 model): the fallback reads W once as float32
    (one full-size float32 copy) and adds R(W) rounded to bf16 a block at a time, equal to R(W)
    written out and rounded once; it wrote R(W) out in float32 first (a second full-size one)."""
    monkeypatch.setenv("Q3R_BACKEND", "reference")
    monkeypatch.setitem(reference.ROW_BLOCK_ELEMENTS, "cpu", 1000)
    model = torch.nn.Sequential(torch.nn.Linear(80, 96, bias=False)).to(torch.bfloat16)
    reg = q3r.Q3R(q3r.find_targets(model, ["0"], target_rank=3), lmbda=0.5, refresh="exact")
    model[0].weight.grad = torch.randn(96, 80).to(torch.bfloat16)
    reg.add_grad_()  # (the first call refreshes)
    before = model[0].weight.grad.clone()
    assert _full_size_allocations(reg.add_grad_, 96 * 80 * 4) == 1
    state = reg.state[reg.targets[0].name][0]
    R = reference.apply_reweighting(model[0].weight.detach(), state["U"], state["V"],
                                    reference.reweighting_coefficients(state["sigma"], state["eps"]))
    torch.testing.assert_close(model[0].weight.grad, before.add(R.to(torch.bfloat16), alpha=1.0), rtol=0.02, atol=0.02)

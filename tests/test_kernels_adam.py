"""The fused AdamQ3R update vs the reference functional step, and a K-step optimizer parity
run (fused AdamQ3R vs reference AdamQ3R, identical gradients)."""

import copy

import pytest
import torch

from q3r import AdamQ3R, ops
from q3r.optim import functional as F

from _kernel_utils import CUDA, DEVICE, DTYPES, K, assert_rule, factors, needs_kernels, rel_err, tile_settings

pytestmark = needs_kernels

# (shape, slice dim, slices or None, k per slice or None for a plain parameter, weight decay)
SMALL = [
    ((37, 53), 0, [(0, 11), (11, 24), (24, 37)], [5, 10, 3], 0.0),
    ((23, 53), 1, [(0, 17), (17, 34), (40, 53)], [7, 3, 12], 0.0),  # columns 34:40 uncovered
    ((37, 53), 0, None, [20], 0.0),
    ((53,), 0, None, None, 0.01),  # a bias: plain Adam(W)
    ((19, 21), 0, None, None, 0.01),
    ((48, 64), 0, [(0, 16), (16, 48)], [5, 9], 0.0),  # aligned: the ALIGNED kernel variants
    ((64,), 0, None, None, 0.0),
]
REAL = [
    ((2304, 768), 0, [(0, 768), (768, 1536), (1536, 2304)], [153, 153, 153], 0.0),
    ((768, 2304), 1, [(0, 768), (768, 1536), (1536, 2304)], [153, 153, 153], 0.0),
    ((3072, 768), 0, None, [153], 0.0),
    ((768,), 0, None, None, 0.01),
]


def make_works(layout, dtype, seed=0, transpose_plain=False):
    gen = torch.Generator().manual_seed(seed)
    works = []
    for shape, dim, slices, ks, wd in layout:
        rnd = lambda: torch.randn(*shape, generator=gen).to(DEVICE, dtype)  # noqa: E731
        param, grad = rnd(), rnd()
        if transpose_plain and ks is None and len(shape) == 2:  # a non-contiguous parameter
            param, grad = param.t().contiguous().t(), grad.t().contiguous().t()
        exp_avg = torch.empty_like(param).copy_(0.1 * rnd())
        exp_avg_sq = torch.empty_like(param).copy_(0.01 * rnd().abs())
        work = F.ParamWork(param, grad, exp_avg, exp_avg_sq, torch.tensor(3.0), 1e-2, 0.9, 0.999, 1e-8, wd)
        if ks is not None:
            spans = [(0, shape[dim])] if slices is None else slices
            work.lmbda, work.slice_dim, work.slices = 0.1, dim, slices
            work.operators = []
            for (a, b), k in zip(spans, ks):
                rows, cols = (b - a, shape[1]) if dim == 0 else (shape[0], b - a)
                work.operators.append(factors(rows, cols, k, gen))
        works.append(work)
    return works


def clone_works(works, dtype=None):
    out = []
    for w in works:
        c = copy.copy(w)
        for name in ("param", "grad", "exp_avg", "exp_avg_sq"):
            t = getattr(w, name)
            setattr(c, name, torch.empty_like(t, dtype=dtype or t.dtype).copy_(t))
        c.step = w.step.clone()
        c.operators = [tuple(t.double() if dtype == torch.float64 else t for t in op) for op in w.operators]
        out.append(c)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("small", [True] + ([False] if CUDA else []))
def test_fused_update_matches_reference_step(small, dtype, monkeypatch):
    monkeypatch.setenv("Q3R_BACKEND", "triton")
    works = make_works(SMALL if small else REAL, dtype, transpose_plain=small)
    ref_path, exact = clone_works(works), clone_works(works, torch.float64)
    with tile_settings(small):
        assert ops.adamq3r_fused_(works) == []
    F.adamq3r_reference_(ref_path)
    F.adamq3r_reference_(exact)
    for w, r, e in zip(works, ref_path, exact):
        assert float(w.step) == float(r.step) == 4.0
        for name in ("param", "exp_avg", "exp_avg_sq"):
            if dtype == torch.float32:
                torch.testing.assert_close(getattr(w, name), getattr(r, name), rtol=2e-5, atol=2e-6)
            else:
                assert_rule(getattr(w, name), getattr(r, name), getattr(e, name), floor=1e-3)


def _model_groups(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"qkv": (37, 53), "c_attn": (23, 53), "fc": (29, 31), "bias": (53,)}
    params = {n: torch.nn.Parameter(torch.randn(*s, generator=gen).to(DEVICE, dtype)) for n, s in shapes.items()}
    groups = [
        {"params": [params["qkv"]], "q3r": True, "slices": [(0, 11), (11, 24), (24, 37)], "slice_dim": 0,
         "target_rank": 3},
        {"params": [params["c_attn"]], "q3r": True, "slices": [(0, 17), (17, 34), (40, 53)], "slice_dim": 1,
         "target_rank": [4, 3, 5]},
        {"params": [params["fc"]], "q3r": True, "target_rank": 0.3},
        {"params": [params["bias"]], "weight_decay": 0.05},
    ]
    return params, groups


@pytest.mark.parametrize("dtype", DTYPES)
def test_k_step_parity_fused_vs_reference_adamq3r(dtype, monkeypatch):
    """Identical gradients for K steps (two refreshes in between): parameters agree."""
    steps, K_steps = 3, 7
    models, calls = {}, []
    run = K.AdamQ3RPlan.run
    monkeypatch.setattr(K.AdamQ3RPlan, "run", lambda plan, hypers, ptrs=None: calls.append(len(hypers)) or run(plan, hypers, ptrs))
    runs = [("reference", dtype), ("triton", dtype)] + ([("reference", torch.float32)] if dtype != torch.float32 else [])
    for backend, run_dtype in runs:
        monkeypatch.setenv("Q3R_BACKEND", backend)
        params, groups = _model_groups(run_dtype)
        opt = AdamQ3R(groups, lr=1e-2, lmbda=0.1, steps=steps)
        gen = torch.Generator().manual_seed(11)
        with tile_settings(True):
            for _ in range(K_steps):
                for p in params.values():
                    p.grad = torch.randn(p.shape, generator=gen).to(DEVICE, run_dtype)
                opt.step()
        models[backend if run_dtype == dtype else "float32"] = params
    # every step of the triton run went through the fused kernels: 3 + 3 + 1 Q3R regions,
    # the uncovered columns, the bias
    assert calls == [9] * K_steps
    for name, p_ref in models["reference"].items():
        p_fast = models["triton"][name].detach()
        if dtype != torch.float32:  # judged against the float32 run, by STYLE.md's 2x rule
            assert_rule(p_fast, p_ref.detach(), models["float32"][name].detach(), floor=1e-3)
            continue
        diff = float((p_fast.double() - p_ref.detach().double()).abs().max())
        rel = rel_err(p_fast, p_ref.detach())
        assert rel <= 1e-5, f"{name}: max abs diff {diff:.3e}, rel {rel:.3e}"

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
    # (Q3R regions with weight decay too: AdamQ3R accepts it in a q3r group, and the fused
    # kernel decays them in the same pass)
    ((37, 53), 0, [(0, 11), (11, 24), (24, 37)], [5, 10, 3], 0.05),
    ((23, 53), 1, [(0, 17), (17, 34), (40, 53)], [7, 3, 12], 0.02),  # columns 34:40 uncovered
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


def make_works(layout, dtype, seed=0, transpose_plain=False, beta1=0.9):
    gen = torch.Generator().manual_seed(seed)
    works = []
    for shape, dim, slices, ks, wd in layout:
        rnd = lambda: torch.randn(*shape, generator=gen).to(DEVICE, dtype)  # noqa: E731
        param, grad = rnd(), rnd()
        if transpose_plain and ks is None and len(shape) == 2:  # a non-contiguous parameter
            param, grad = param.t().contiguous().t(), grad.t().contiguous().t()
        exp_avg = torch.empty_like(param).copy_(0.1 * rnd())
        exp_avg_sq = torch.empty_like(param).copy_(0.01 * rnd().abs())
        work = F.ParamWork(param, grad, exp_avg, exp_avg_sq, torch.tensor(3.0), 1e-2, beta1, 0.999, 1e-8, wd)
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


@pytest.mark.parametrize("beta1", [0.9, 0.3])  # (the kernel's lerp takes another branch below 0.5)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("small", [True] + ([False] if CUDA else []))
def test_fused_update_matches_reference_step(small, dtype, beta1, monkeypatch):
    monkeypatch.setenv("Q3R_BACKEND", "triton")
    works = make_works(SMALL if small else REAL, dtype, transpose_plain=small, beta1=beta1)
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


@pytest.mark.parametrize("stagger", [False, True])
# (float16 on CPU too: the interpreter rounds to it as a GPU does; its bfloat16 truncates)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
def test_k_step_parity_fused_vs_reference_adamq3r(dtype, stagger, monkeypatch):
    """Identical gradients for K steps (two refreshes in between; staggered: some target
    refreshes at most steps, and the cached plan follows its new factors): parameters agree."""
    steps, K_steps = 3, 7
    models, calls, updates = {}, [], []
    run, update = K.AdamQ3RPlan.run, K.AdamQ3RPlan.update_factors
    monkeypatch.setattr(K.AdamQ3RPlan, "run", lambda plan, hypers, ptrs=None: calls[-1].append(len(hypers)) or run(plan, hypers, ptrs))
    monkeypatch.setattr(K.AdamQ3RPlan, "update_factors", lambda plan, new: updates.append(len(new)) or update(plan, new))
    runs = [("reference", dtype), ("triton", dtype)] + ([("reference", torch.float32)] if dtype != torch.float32 else [])
    for backend, run_dtype in runs:
        monkeypatch.setenv("Q3R_BACKEND", backend)
        params, groups = _model_groups(run_dtype)
        opt = AdamQ3R(groups, lr=1e-2, lmbda=0.1, steps=steps, stagger=stagger)
        gen = torch.Generator().manual_seed(11)
        with tile_settings(True):
            for _ in range(K_steps):
                for p in params.values():
                    p.grad = torch.randn(p.shape, generator=gen).to(DEVICE, run_dtype)
                calls.append([])
                opt.step()
        models[backend if run_dtype == dtype else "float32"] = params
    # every step of the triton run went through the fused kernels: 3 + 3 + 1 Q3R regions,
    # the uncovered columns, the bias; at a refresh step in two runs (AdamQ3R.step: the
    # targets being refreshed after the others)
    triton_calls = calls[K_steps : 2 * K_steps]  # (the runs: reference, triton, and maybe float32)
    assert [sum(step) for step in triton_calls] == [9] * K_steps
    assert [len(step) for step in triton_calls] == ([2] * K_steps if stagger else [2, 1, 1] * 2 + [2])
    assert updates and (min(updates) < 7 if stagger else set(updates) == {7})  # 7 Q3R slices in all
    for name, p_ref in models["reference"].items():
        p_fast = models["triton"][name].detach()
        if dtype != torch.float32:  # judged against the float32 run, by STYLE.md's 2x rule
            assert_rule(p_fast, p_ref.detach(), models["float32"][name].detach(), floor=1e-3)
            continue
        diff = float((p_fast.double() - p_ref.detach().double()).abs().max())
        rel = rel_err(p_fast, p_ref.detach())
        assert rel <= 1e-5, f"{name}: max abs diff {diff:.3e}, rel {rel:.3e}"


# ------------------------------------------------- the cached plan across refreshes
# Awkward slices, a whole matrix whose width crosses the 16-wide k chunks (the preparation
# launches' schedules follow k) and a plain matrix; the second work's operators come as
# (U, V, sigma, eps), as AdamQ3R gives them, so both kinds of Q3R groups are updated.
REFRESH_LAYOUT = [
    ((37, 53), 0, [(0, 11), (11, 24), (24, 37)], [5, 10, 3], 0.0),
    ((23, 53), 1, [(0, 17), (17, 34), (40, 53)], [7, 3, 9], 0.0),
    ((29, 35), 0, None, [16], 0.0),
    ((19, 21), 0, None, None, 0.01),
]


def _new_operators(work, widths, gen, sigma_form):
    """New factor tensors of the given widths, as a refresh makes them."""
    ops_ = []
    for (rows, cols), k in zip(_slice_shapes(work), widths):
        U, V, d = factors(rows, cols, k, gen)
        if sigma_form:  # d = eps / sigma - 1 above eps, 0 at or below it
            sigma = torch.linspace(3.0, 0.5, k, device=DEVICE)
            ops_.append((U, V, sigma, torch.tensor(1.0, device=DEVICE)))
        else:
            ops_.append((U, V, d))
    return ops_


def _slice_shapes(work):
    spans = [(0, work.param.shape[work.slice_dim])] if work.slices is None else work.slices
    return [(b - a, work.param.shape[1]) if work.slice_dim == 0 else (work.param.shape[0], b - a) for a, b in spans]


def _fused_and_reference_step(works, refs, gen):
    """One step on both paths from the same state and gradients; returns the cached entry."""
    for w, r in zip(works, refs):
        w.grad.copy_(torch.randn(w.grad.shape, generator=gen).to(DEVICE))
        for name in ("param", "grad", "exp_avg", "exp_avg_sq"):
            getattr(r, name).copy_(getattr(w, name))
        r.step.copy_(w.step)
        r.operators, r.lmbda = w.operators, w.lmbda
    with tile_settings(True):
        assert ops.adamq3r_fused_(works) == []
    F.adamq3r_reference_(refs)
    for w, r in zip(works, refs):
        for name in ("param", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(getattr(w, name), getattr(r, name), rtol=2e-5, atol=2e-6)
    with tile_settings(True):
        return ops._PLANS[ops._layout_key(works)]


def test_refreshes_update_the_cached_plan_and_keep_parity(monkeypatch):
    monkeypatch.setenv("Q3R_BACKEND", "triton")
    monkeypatch.setattr(ops, "_PLANS", type(ops._PLANS)())
    builds, updates = [], []
    init, update = K.AdamQ3RPlan.__init__, K.AdamQ3RPlan.update_factors
    monkeypatch.setattr(K.AdamQ3RPlan, "__init__", lambda plan, regions: builds.append(1) or init(plan, regions))
    monkeypatch.setattr(K.AdamQ3RPlan, "update_factors", lambda plan, f: updates.append(len(f)) or update(plan, f))
    works = make_works(REFRESH_LAYOUT, torch.float32, seed=3)
    refs = clone_works(works)
    gen = torch.Generator().manual_seed(5)
    base = [[5, 10, 3], [7, 3, 9], [16]]

    def refresh(dk, only=None):  # new tensors for every operator, widths moved by dk
        for n, (w, ks) in enumerate(zip(works[:3], base)):
            if only is None or n == only:
                w.operators = _new_operators(w, [k + dk for k in ks], gen, sigma_form=n == 1)

    refresh(0)
    plan = _fused_and_reference_step(works, refs, gen).plan
    assert (len(builds), updates) == (1, [])
    # the workspace is laid out, not held: each step allocates it (see q3r_kernels.plan)
    assert all(g["workspace"].buffer is None for g in plan.groups if g["n_factors"])
    # factors of width k+1, k-2, k, then the same width again (new tensors, same shapes: the
    # workspaces are kept), then a staggered refresh of the first target only (its 3 slices
    # are rewritten, the other rows keep their factors and follow the moved workspace)
    for n, (dk, only) in enumerate([(1, None), (-2, None), (0, None), (0, None), (1, 0)]):
        spaces = [g["workspace"] for g in plan.groups]
        refresh(dk, only)
        assert _fused_and_reference_step(works, refs, gen).plan is plan and len(builds) == 1
        assert ([g["workspace"] for g in plan.groups] == spaces) == (n == 3)
    assert updates == [7, 7, 7, 7, 3]
    # a step with the factors unchanged: neither
    _fused_and_reference_step(works, refs, gen)
    assert (len(builds), len(updates)) == (1, 5)
    # which works have a term is part of the layout: a new plan, and the old one is cached
    works[1].lmbda = 0.0
    assert _fused_and_reference_step(works, refs, gen).plan is not plan and len(builds) == 2
    works[1].lmbda = 0.1
    refresh(2)
    assert _fused_and_reference_step(works, refs, gen).plan is plan and len(builds) == 2
    # a new optimizer-state storage is a new layout too
    works[0].exp_avg = works[0].exp_avg.clone()
    refs[0].exp_avg = refs[0].exp_avg.clone()
    assert _fused_and_reference_step(works, refs, gen).plan is not plan and len(builds) == 3


@pytest.mark.parametrize("bad", ["U rows", "V width", "eps", "sigma"])
def test_bad_factors_in_the_update_raise_and_leave_the_plan_usable(bad, monkeypatch):
    monkeypatch.setenv("Q3R_BACKEND", "triton")
    monkeypatch.setattr(ops, "_PLANS", type(ops._PLANS)())
    works = make_works(REFRESH_LAYOUT, torch.float32, seed=4)
    refs = clone_works(works)
    gen = torch.Generator().manual_seed(6)
    works[1].operators = _new_operators(works[1], [7, 3, 9], gen, sigma_form=True)
    entry = _fused_and_reference_step(works, refs, gen)
    good = [list(w.operators) for w in works]
    host = [g["host"].clone() for g in entry.plan.groups]
    # a refresh whose last target is bad: the first one's new factors are fine
    works[0].operators = _new_operators(works[0], [6, 11, 4], gen, sigma_form=False)
    new = _new_operators(works[1], [8, 4, 13], gen, sigma_form=True)
    U, V, sigma, eps = new[2]
    new[2] = {"U rows": (U[1:], V, sigma, eps), "V width": (U, V[:, 1:], sigma, eps),
              "eps": (U, V, sigma, torch.ones(2, device=DEVICE)), "sigma": (U, V, sigma[1:], eps)}[bad]
    works[1].operators = new
    before = [w.param.clone() for w in works]
    with pytest.raises(ValueError, match="eps must be" if bad == "eps" else "do not fit|must be contiguous"):
        with tile_settings(True):
            ops.adamq3r_fused_(works)
    for w, p in zip(works, before):  # nothing ran
        assert torch.equal(w.param, p) and float(w.step) == 4.0
    with tile_settings(True):
        assert ops._PLANS[ops._layout_key(works)] is entry
    assert all(torch.equal(g["host"], h) for g, h in zip(entry.plan.groups, host))
    # the old factors still match the tables; new good ones are taken up
    for w, ops_ in zip(works, good):
        w.operators = ops_
    assert _fused_and_reference_step(works, refs, gen) is entry
    works[1].operators = _new_operators(works[1], [6, 2, 11], gen, sigma_form=True)
    assert _fused_and_reference_step(works, refs, gen) is entry


def test_a_gradient_that_moves_off_16_byte_alignment_gets_its_own_plan(monkeypatch):
    """The plan picks the kernels' 128-bit accesses from the gradients' alignment: a later
    gradient with the same layout but 4 bytes off must not reuse it."""
    monkeypatch.setenv("Q3R_BACKEND", "triton")
    monkeypatch.setattr(ops, "_PLANS", type(ops._PLANS)())
    layout = [((32, 48), 0, [(0, 16), (16, 32)], [5, 7], 0.0), ((16, 32), 0, None, None, 0.01)]
    works = make_works(layout, torch.float32, seed=9)
    refs = clone_works(works)
    gen = torch.Generator().manual_seed(10)
    first = _fused_and_reference_step(works, refs, gen)
    assert first.plan.groups[0]["aligned"]
    flat = torch.empty(1 + works[0].grad.numel(), device=DEVICE)
    works[0].grad = flat[1:].view(works[0].grad.shape)  # the same layout, 4 bytes off
    second = _fused_and_reference_step(works, refs, gen)
    assert second is not first and len(ops._PLANS) == 2
    assert not any(g["aligned"] for g in second.plan.groups if 0 in g["idx"])


def test_regions_beyond_the_kernels_int32_offsets_are_left_to_the_reference_path():
    """The fused kernel indexes within a region, and bounds it by its element count, in int32.
    A region of exactly 2**31 elements was taken, and its count wrapped to -2**31 in the
    kernel, masking every element: the parameter was silently not updated. A larger one (here
    transposed, or with a gradient of padded rows) was taken too, and building the plan raised
    ValueError. (Meta tensors: nothing is allocated.)"""
    def region(shape, stride=None, grad_stride=None):
        make = lambda s: torch.empty_strided(shape, s or torch.empty(shape, device="meta").stride(), device="meta")  # noqa: E731
        p = make(stride)
        return K.AdamRegion(p, make(grad_stride or stride), make(stride), make(stride), [])
    assert K.check_region(region((1, 2**31 - 1)))  # the last element's offset and the count fit
    assert not K.check_region(region((2**16, 2**15)))  # 2**31 elements
    assert not K.check_region(region((2**15 + 1, 2**16), stride=(1, 2**15 + 1)))  # transposed, more
    assert not K.check_region(region((2, 2**30 - 1), grad_stride=(3 * 2**29, 1)))  # the gradient's last offset
    assert K.check_region(region((2, 2**30 - 1), grad_stride=(2**30, 1)))

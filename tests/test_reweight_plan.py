"""ops.add_reweighting_'s cached ReweightPlan (the regularizer's per-step path) across steps:
new gradient tensors every step, refreshes (whole and staggered, new widths), both factor
forms in one call, bad factors, a layout change -- every result against the reference."""

import pytest
import torch

from q3r import ops, reference

from _kernel_utils import DEVICE, K, factors, needs_kernels, tile_settings

pytestmark = needs_kernels
ALPHA = 0.2

# (rows of the fused weight, cols, slice dim, slices): row slices, column slices, a whole one
LAYOUT = [((37, 53), 0, [(0, 11), (11, 24), (24, 37)]), ((23, 53), 1, [(0, 17), (17, 34), (40, 53)]),
          ((29, 35), 0, [(0, 29)])]


def _blocks(gen):
    weights = [torch.randn(shape, generator=gen).to(DEVICE) for shape, _, _ in LAYOUT]
    views = [W.narrow(dim, a, b - a) for W, (_, dim, spans) in zip(weights, LAYOUT) for a, b in spans]
    return weights, views


def _grads(weights, gen):
    """New gradient tensors (new addresses, the same layout), as zero_grad(set_to_none) gives."""
    grads = [torch.randn(W.shape, generator=gen).to(DEVICE) for W in weights]
    return grads, [g.narrow(dim, a, b - a) for g, (_, dim, spans) in zip(grads, LAYOUT) for a, b in spans]


def _operators(views, widths, gen):
    """Block i's factors: (U, V, d) for even i, (U, V, sigma, eps) for odd i (both forms)."""
    out = []
    for i, (X, k) in enumerate(zip(views, widths)):
        U, V, d = factors(X.shape[0], X.shape[1], k, gen)
        if i % 2:
            sigma = torch.linspace(3.0, 0.5, k, device=DEVICE)
            out.append((U, V, sigma, torch.tensor(1.2, device=DEVICE)))
        else:
            out.append((U, V, d))
    return out


def _step(views, gviews, ops_, alpha=ALPHA):
    """One ops.add_reweighting_ call, checked block by block against the reference."""
    expected = []
    for X, G, f in zip(views, gviews, ops_):
        U, V, *rest = f
        d = rest[0] if len(rest) == 1 else reference.reweighting_coefficients(*rest)
        expected.append(G.double() + alpha * reference.apply_reweighting(X.double(), U.double(), V.double(), d.double()))
    with tile_settings(True):
        ops.add_reweighting_(gviews, views, ops_, alpha)
    for G, e in zip(gviews, expected):
        torch.testing.assert_close(G.double(), e, rtol=1e-5, atol=1e-5)


@pytest.fixture
def counted(monkeypatch):
    """The Triton backend, an empty plan cache, and counts of plan builds and factor updates."""
    monkeypatch.setenv("Q3R_BACKEND", "triton")
    monkeypatch.setattr(ops, "_PLANS", type(ops._PLANS)())
    builds, updates = [], []
    init, update = K.ReweightPlan.__init__, K.ReweightPlan.update_factors
    monkeypatch.setattr(K.ReweightPlan, "__init__", lambda plan, *a, **k: builds.append(1) or init(plan, *a, **k))
    monkeypatch.setattr(K.ReweightPlan, "update_factors", lambda plan, new: updates.append(sorted(new)) or update(plan, new))
    return builds, updates


def test_cached_plan_follows_gradients_and_refreshes(counted):
    builds, updates = counted
    gen = torch.Generator().manual_seed(1)
    weights, views = _blocks(gen)
    base = [5, 10, 3, 7, 3, 9, 16]
    ops_ = _operators(views, base, gen)
    for _ in range(3):  # new gradient tensors every step: the plan is built once
        _step(views, _grads(weights, gen)[1], ops_)
    assert (len(builds), updates) == (1, [])
    plan = next(iter(ops._PLANS.values())).plan
    assert all(g["workspace"].buffer is None for g in plan.groups)  # no workspace held between steps
    # whole refreshes: new widths (every workspace moves), then new tensors of the same widths
    for dk in (1, -2, 0):
        ops_ = _operators(views, [k + dk for k in base], gen)
        _step(views, _grads(weights, gen)[1], ops_)
    assert len(builds) == 1 and updates == [list(range(7))] * 3
    # a staggered refresh of blocks 1 and 4 only (one of each form), then the weights move on
    new = _operators(views, [k + 2 for k in base], gen)
    ops_ = [new[i] if i in (1, 4) else f for i, f in enumerate(ops_)]
    _step(views, _grads(weights, gen)[1], ops_)
    assert len(builds) == 1 and updates[-1] == [1, 4]
    with torch.no_grad():
        for W in weights:
            W.add_(0.1)
    _step(views, _grads(weights, gen)[1], ops_, alpha=0.05)  # in-place weights, a new alpha
    assert (len(builds), len(updates)) == (1, 4)


def test_bad_factors_change_nothing_and_the_plan_stays_usable(counted, monkeypatch):
    builds, updates = counted
    monkeypatch.setenv("Q3R_TRITON_MAX_WIDTH", "8")
    monkeypatch.delenv("Q3R_BACKEND")  # automatic: factors wider than 8 take the reference path
    monkeypatch.setattr(ops, "backend_for", lambda device, dtype=None: "triton")
    gen = torch.Generator().manual_seed(2)
    weights, views = _blocks(gen)
    ops_ = _operators(views, [5, 10, 3, 7, 3, 9, 6], gen)  # blocks 1 and 5 go to the reference path
    grads, gviews = _grads(weights, gen)
    _step(views, gviews, ops_)
    assert len(builds) == 1
    U, V, sigma, eps = ops_[3]
    for bad, match in [((U[1:], V, sigma, eps), "do not fit"), ((U, V, sigma, torch.ones(2, device=DEVICE)), "eps"),
                       ((U, V, sigma[1:], eps), "must be contiguous"), ((U, V), "must be \\(U, V, d\\)")]:
        wrong = list(ops_)
        wrong[3] = bad
        before = [g.clone() for g in grads]
        with pytest.raises(ValueError, match=match):
            with tile_settings(True):
                ops.add_reweighting_(gviews, views, wrong, ALPHA)
        assert all(torch.equal(g, b) for g, b in zip(grads, before))  # not even the reference blocks
    assert len(updates) == 3  # three were tried (and refused); the fourth failed before the plan
    _step(views, gviews, ops_)  # the old factors still match the tables: nothing to update
    assert (len(builds), len(updates)) == (1, 3)


def test_a_new_layout_is_a_new_plan(counted):
    builds, _ = counted
    gen = torch.Generator().manual_seed(3)
    weights, views = _blocks(gen)
    ops_ = _operators(views, [4] * 7, gen)
    grads, gviews = _grads(weights, gen)
    _step(views, gviews, ops_)
    # a gradient that is not 16-byte aligned (the kernels' aligned loads depend on it)
    flat = torch.randn(1 + grads[2].numel(), generator=gen).to(DEVICE)
    gviews[-1] = flat[1:].view(grads[2].shape)
    _step(views, gviews, ops_)
    assert len(builds) == 2
    _step(views, _grads(weights, gen)[1], ops_)  # back to the first layout: the cached plan
    assert len(builds) == 2


def test_a_plan_kept_across_a_change_of_tile_settings_refuses_to_run():
    """Its workspace layout and schedules were made for the old settings (q3r.ops keys its
    cache by them, so only a plan kept by hand can meet this)."""
    gen = torch.Generator().manual_seed(4)
    _, views = _blocks(gen)
    ops_ = [f[:3] for f in _operators(views, [5] * 7, gen)]
    outs = [torch.zeros_like(X) for X in views]
    with tile_settings(True):
        plan = K.ReweightPlan(views, outs, ops_)
    with pytest.raises(RuntimeError, match="CONFIG or the fp32 matmul precision changed"):
        plan.run(outs, [ALPHA] * len(outs))
    assert all(not o.any() for o in outs)
    with tile_settings(True):
        plan.run(outs, [ALPHA] * len(outs))
    for out, X, (U, V, d) in zip(outs, views, ops_):
        torch.testing.assert_close(out, ALPHA * reference.apply_reweighting(X, U, V, d), rtol=1e-5, atol=1e-5)


def _plan(views, ops_):
    outs = [torch.zeros_like(X) for X in views]
    with tile_settings(True):
        return K.ReweightPlan(views, outs, ops_)


def test_a_new_width_of_one_block_moves_the_workspace_of_every_block():
    """A staggered refresh that widens one block's factors moves the workspace pieces of every
    block laid out after it: their rows must be rewritten too, or two blocks share workspace
    memory (the existing staggered case keeps every padded width, so nothing moved there).
    The rows must be those a plan built afresh has."""
    from q3r_kernels import _meta as m

    gen = torch.Generator().manual_seed(5)
    views = [torch.randn(48, 40, generator=gen).to(DEVICE) for _ in range(3)]
    ops_ = [factors(48, 40, 4, gen) for _ in views]
    plan = _plan(views, ops_)
    wider = list(ops_)  # block 0: 4 -> 36 wide, past the 32 columns its pieces were padded to
    wider[0] = factors(48, 40, 36, gen)
    with tile_settings(True):
        assert m.padded_width(36) > m.padded_width(4)
        plan.update_factors({0: wider[0]})
    fresh = _plan(views, wider)
    for g, f in zip(plan.groups, fresh.groups):
        assert torch.equal(g["host"][:, m.WORKSPACE_COLUMNS], f["host"][:, m.WORKSPACE_COLUMNS])


def test_update_factors_refuses_a_float64_eps_and_a_negative_block_index():
    # the kernels read eps as float32 through its address, and block -1 is no block of the
    # plan (not the last one): both are refused before anything is written
    gen = torch.Generator().manual_seed(6)
    _, views = _blocks(gen)
    ops_ = _operators(views, [5] * 7, gen)
    plan = _plan(views, ops_)
    before = [g["host"].clone() for g in plan.groups]
    U, V, sigma, eps = ops_[1]
    with tile_settings(True):
        with pytest.raises(ValueError, match="eps must be a one-element float32 tensor"):
            plan.update_factors({1: (U, V, sigma, eps.double())})
        with pytest.raises(ValueError, match="block -1 of this plan has no Q3R term"):
            plan.update_factors({-1: ops_[-1]})
    assert all(torch.equal(g["host"], b) for g, b in zip(plan.groups, before))


def test_a_block_beyond_the_kernels_int32_offsets_takes_the_reference_path(monkeypatch):
    """A weight whose last element lies 2**31 or more past its first was given to the kernels,
    whose plan raised ValueError (they index within a block in int32): automatic dispatch sends
    it to the reference path, and a forced Triton backend refuses it. (Meta tensors, on which
    the kernels are made to look available: nothing is allocated or launched.)"""
    monkeypatch.setattr(ops, "backend_for", lambda device, dtype=None: "triton")
    monkeypatch.setattr(ops, "_PLANS", type(ops._PLANS)())
    monkeypatch.delenv("Q3R_BACKEND", raising=False)
    built = []
    monkeypatch.setattr(K, "ReweightPlan", lambda *a, **k: built.append(1))
    W = torch.empty(2, 2**30 + 1, device="meta")
    U, V, d = torch.empty(2, 1, device="meta"), torch.empty(2**30 + 1, 1, device="meta"), torch.empty(1, device="meta")
    ops.add_reweighting_([torch.empty_like(W)], [W], [(U, V, d)], 0.2)
    assert built == []
    monkeypatch.setenv("Q3R_BACKEND", "triton")
    with pytest.raises(ops.BackendUnavailableError, match=r"within 2\*\*31 elements.*\(2, 1073741825\)"):
        ops.add_reweighting_([torch.empty_like(W)], [W], [(U, V, d)], 0.2)


def test_project_and_apply_of_a_matrix_beyond_the_kernels_int32_offsets_take_the_reference_path(monkeypatch):
    """As add_reweighting_: ops.project and ops.apply_reweighting gave such a matrix to the
    kernels, which raised ValueError. (Meta tensors, the kernels made to look available.)"""
    monkeypatch.setattr(ops, "backend_for", lambda device, dtype=None: "triton")
    monkeypatch.delenv("Q3R_BACKEND", raising=False)
    monkeypatch.setattr(K, "project", lambda *a: pytest.fail("the kernels were called"))
    monkeypatch.setattr(K, "apply_reweighting", lambda *a: pytest.fail("the kernels were called"))
    X = torch.empty(3, 2, 2**30 + 1, device="meta")  # each matrix's last element 2**31 + 1 past its first
    U, V, d = torch.empty(2, 1, device="meta"), torch.empty(2**30 + 1, 1, device="meta"), torch.empty(1, device="meta")
    A, B = ops.project(X, U, V)
    assert A.shape == (3, 1, 2**30 + 1) and B.shape == (3, 2, 1)
    assert ops.apply_reweighting(X, U, V, d).shape == X.shape
    monkeypatch.setenv("Q3R_BACKEND", "triton")
    with pytest.raises(ops.BackendUnavailableError, match=r"2\*\*31 elements or more"):
        ops.project(X, U, V)


def test_a_staggered_step_keeps_its_plans_across_cycles_at_long_periods(monkeypatch):
    """A staggered AdamQ3R step runs two plans per phase of its period (the targets refreshed
    now and the rest): 2 T + 1 layouts. The cache held 64, so at T >= 32 every step built its
    plans again (h70: 79-80 builds per 40-step cycle at T = 40). Plans are counted here with a
    stand-in that launches nothing (the layouts, not the arithmetic, are under test)."""
    from collections import OrderedDict

    import q3r

    builds = []

    class CountingPlan:
        def __init__(self, regions):
            builds.append(len(regions))

        def run(self, *args):
            pass

        def update_factors(self, new):
            pass

    monkeypatch.setenv("Q3R_BACKEND", "triton")
    monkeypatch.setattr(ops, "_PLANS", OrderedDict())
    monkeypatch.setattr(K, "AdamQ3RPlan", CountingPlan)
    T = 40
    torch.manual_seed(0)
    model = torch.nn.ModuleList(torch.nn.Linear(6, 8, bias=False) for _ in range(T)).to(DEVICE)
    targets = q3r.find_targets(model, [str(i) for i in range(T)], target_rank=2)
    opt = q3r.AdamQ3R(q3r.param_groups(model, targets, lmbda=0.5, steps=T, stagger=True), lr=1e-2)
    x = torch.randn(3, 6, device=DEVICE)
    for step in range(3 * T):
        if step == 2 * T:  # (step 0 refreshes every target: phase 0's own split first comes at step T)
            two_cycles = len(builds)
        opt.zero_grad()
        sum(layer(x).square().sum() for layer in model).backward()
        opt.step()
    assert two_cycles <= 2 * T + 1
    assert len(builds) == two_cycles, f"{len(builds) - two_cycles} plans built again in the third cycle"


def test_factors_whose_workspace_passes_the_kernels_int32_offsets_take_the_reference_path(monkeypatch):
    """X of 2**22 x 500 fits the kernels' int32 offsets, but its factors at full rank (k = 500)
    are packed 512 wide: the workspace piece B (rows, 512) holds 2**31 elements, past what the
    kernels index (h70, by reading). Automatic dispatch sends such a block (and such a fused
    step) to the reference path, a forced Triton backend refuses it. (Meta tensors, the kernels
    made to look available: nothing is allocated or launched.)"""
    from q3r.optim.functional import ParamWork

    assert K._meta.fits_int32(torch.empty(2**22, 500, device="meta"))
    assert not K._meta.workspace_fits_int32(2**22, 500, 500) and K._meta.workspace_fits_int32(2**22, 500, 400)
    monkeypatch.setattr(ops, "backend_for", lambda device, dtype=None: "triton")
    monkeypatch.setattr(ops, "_PLANS", type(ops._PLANS)())
    monkeypatch.delenv("Q3R_BACKEND", raising=False)
    built = []
    monkeypatch.setattr(K, "ReweightPlan", lambda *a, **k: built.append(1))
    W = torch.empty(2**22, 500, device="meta")
    U, V, d = torch.empty(2**22, 500, device="meta"), torch.empty(500, 500, device="meta"), torch.empty(500, device="meta")
    ops.add_reweighting_([torch.empty_like(W)], [W], [(U, V, d)], 0.2)
    assert built == []
    work = ParamWork(param=W, grad=torch.empty_like(W), exp_avg=torch.empty_like(W), exp_avg_sq=torch.empty_like(W),
                     step=torch.zeros(()), lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, lmbda=0.1,
                     operators=[(U, V, d)])
    assert ops.adamq3r_fused_([work]) == [work]  # (left for the reference path)
    monkeypatch.setenv("Q3R_BACKEND", "triton")
    with pytest.raises(ops.BackendUnavailableError, match="workspace"):
        ops.add_reweighting_([torch.empty_like(W)], [W], [(U, V, d)], 0.2)
    with pytest.raises(ops.BackendUnavailableError, match="workspace"):
        ops.adamq3r_fused_([work])
    with pytest.raises(ops.BackendUnavailableError, match="workspace"):
        ops.project(W, U, V)


def test_moments_at_the_same_address_in_another_layout_do_not_reuse_the_plan(monkeypatch):
    """The fused step's plan was keyed by the moments' addresses but not their strides: moments
    at the same address laid out otherwise (transposed) reused a plan that reads them as the
    parameter is laid out, where a new plan rejects them (they must match the parameter's
    strides) and leaves the parameter to the reference path (h70)."""
    from q3r.optim.functional import ParamWork

    monkeypatch.setenv("Q3R_BACKEND", "triton")
    gen = torch.Generator().manual_seed(7)
    p = torch.randn(12, 9, generator=gen).to(DEVICE)
    U, V, d = factors(12, 9, 3, gen)
    m_buf, v_buf = torch.zeros(108, device=DEVICE), torch.zeros(108, device=DEVICE)

    def work(exp_avg, exp_avg_sq):
        return ParamWork(param=p, grad=torch.randn(12, 9, generator=gen).to(DEVICE), exp_avg=exp_avg,
                         exp_avg_sq=exp_avg_sq, step=torch.zeros(()), lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8,
                         weight_decay=0.0, lmbda=0.5, operators=[(U, V, d)])

    with tile_settings(small=True):
        assert ops.adamq3r_fused_([work(m_buf.view(12, 9), v_buf.view(12, 9))]) == []
        moved = work(m_buf.view(9, 12).t(), v_buf.view(9, 12).t())  # (the same addresses, transposed)
        assert ops.adamq3r_fused_([moved]) == [moved]


def test_workspace_fits_int32_is_the_largest_workspace_piece_below_2_to_the_31():
    """workspace_fits_int32 (per slice per step, so computed without building the pieces'
    list) agrees with the pieces themselves, at the default tiles and at 16-wide ones."""
    import itertools

    def slow(rows, cols, k):
        return max(K._meta._piece_elements(rows, cols, k)) < 2**31

    for settings in (tile_settings(small=False), tile_settings(small=True)):
        with settings:
            for rows, cols, k in itertools.product([1, 3, 5, 1000, 2**21 - 1, 2**22, 2**22 + 1, 2**26],
                                                   [1, 7, 500, 4096, 2**22], [0, 1, 31, 33, 400, 500, 512, 4096]):
                assert K._meta.workspace_fits_int32(rows, cols, k) == slow(rows, cols, k), (rows, cols, k)


def test_fits_int32_is_the_last_elements_offset_below_2_to_the_31():
    """fits_int32 (asked per block per step by add_reweighting_, so written out) against the
    offset of each matrix's last element, over shapes, views and batches (meta tensors)."""
    def slow(t):
        return sum((n - 1) * abs(s) for n, s in zip(t.shape[-2:], t.stride()[-2:])) < 2**31

    seen = set()
    for shape in [(), (0,), (5,), (2**31,), (2**31 + 1,), (0, 3), (3, 0), (7, 5), (2, 7, 5), (2**16, 2**15),
                  (2**16, 2**15 + 1), (2**16 + 1, 2**15), (3, 2**16, 2**15), (2**31, 1), (1, 2**31)]:
        x = torch.empty(shape, device="meta")
        views = [x]
        if x.dim() >= 2:
            views += [x.transpose(-2, -1), x[..., ::2], x[..., ::3, :]]
        for v in views:
            assert K._meta.fits_int32(v) == slow(v), (tuple(v.shape), v.stride())
            seen.add(slow(v))
    assert seen == {True, False}

"""q3r.reference against the facts of SPEC section 2, in float64 on random matrices."""

import math

import pytest
import torch

from q3r import reference as ref

f64 = torch.float64
SHAPES = [(7, 5), (5, 9), (12, 12), (1, 4), (33, 17)]


def _random_case(shape, seed, eps_index=None):
    """A random anchor W', its full SVD, and an eps strictly between two singular values."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(*shape, generator=g, dtype=f64)
    U_f, S, Vh = torch.linalg.svd(W, full_matrices=True)
    n = S.numel()
    i = (n // 2) if eps_index is None else eps_index
    eps = float((S[i - 1] + S[i]) / 2) if 0 < i < n else (float(S[-1]) / 2 if i >= n else float(S[0]) * 2)
    X = torch.randn(*shape, generator=g, dtype=f64)
    return W, U_f, S, Vh.T, eps, X


def _operator(W, eps, k=None):
    U, S, V, _ = ref.anchor_factors(W, k)
    return U, V, ref.reweighting_coefficients(S, eps)


def _full_basis_apply(X, U_f, S, V_f, eps):
    """Independent form of fact 1: scale entry (i, j) of U_f^T X V_f by eps^2 / (max(s_i,eps) max(s_j,eps))."""
    d1, d2 = X.shape
    s1 = torch.zeros(d1, dtype=f64)
    s2 = torch.zeros(d2, dtype=f64)
    s1[: S.numel()] = S
    s2[: S.numel()] = S
    w1 = eps / torch.clamp(s1, min=eps)
    w2 = eps / torch.clamp(s2, min=eps)
    return U_f @ ((U_f.T @ X @ V_f) * w1[:, None] * w2[None, :]) @ V_f.T


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_fact1_full_basis_matches_factored(shape, seed):
    W, U_f, S, V_f, eps, X = _random_case(shape, seed)
    RX = ref.apply_reweighting(X, *_operator(W, eps))
    torch.testing.assert_close(RX, _full_basis_apply(X, U_f, S, V_f, eps), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_fact2_self_adjoint_and_spectrum(shape):
    W, U_f, S, V_f, eps, X = _random_case(shape, 3)
    U, V, d = _operator(W, eps)
    Y = torch.randn(*shape, dtype=f64)
    lhs = (ref.apply_reweighting(X, U, V, d) * Y).sum()
    rhs = (X * ref.apply_reweighting(Y, U, V, d)).sum()
    assert math.isclose(float(lhs), float(rhs), rel_tol=1e-12, abs_tol=1e-12)
    # The matrix of R on vec(X): its eigenvalues must be s_i s_j with s = 1 on the complement.
    d1, d2 = shape
    basis = torch.eye(d1 * d2, dtype=f64).reshape(d1 * d2, d1, d2)
    M = ref.apply_reweighting(basis, U, V, d).reshape(d1 * d2, d1 * d2)
    torch.testing.assert_close(M, M.T, rtol=0, atol=1e-12)
    s1 = torch.ones(d1, dtype=f64)
    s2 = torch.ones(d2, dtype=f64)
    active = S > eps
    s1[: S.numel()][active] = eps / S[active]
    s2[: S.numel()][active] = eps / S[active]
    expected = torch.sort((s1[:, None] * s2[None, :]).flatten()).values
    torch.testing.assert_close(torch.linalg.eigvalsh(M), expected, rtol=0, atol=1e-12)
    evals = torch.linalg.eigvalsh(M)  # (R's own eigenvalues, not the expected ones)
    assert float(evals.min()) >= min(1.0, (eps / float(S[0])) ** 2) - 1e-12 and float(evals.max()) <= 1 + 1e-12


@pytest.mark.parametrize("shape", SHAPES)
def test_fact3_gradient_is_twice_R(shape):
    W, *_, eps, X = _random_case(shape, 4)
    U, V, d = _operator(W, eps)
    X = X.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(ref.penalty_value(X, U, V, d), X)
    torch.testing.assert_close(grad, 2 * ref.apply_reweighting(X.detach(), U, V, d), rtol=1e-12, atol=1e-12)
    # and by central finite differences along a random direction
    H = torch.randn(*shape, dtype=f64)
    h = 1e-6
    fd = (ref.penalty_value(X.detach() + h * H, U, V, d) - ref.penalty_value(X.detach() - h * H, U, V, d)) / (2 * h)
    assert math.isclose(float(fd), float((grad * H).sum()), rel_tol=1e-7, abs_tol=1e-7)


def test_penalty_value_equals_inner_product():
    W, *_, eps, X = _random_case((13, 8), 5)
    U, V, d = _operator(W, eps)
    value = ref.penalty_value(X, U, V, d)
    assert math.isclose(float(value), float((X * ref.apply_reweighting(X, U, V, d)).sum()), rel_tol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_fact4_partial_svd_invariance(shape):
    W, U_f, S, V_f, eps, X = _random_case(shape, 6)
    r_env = int(ref.envelope_rank(S, eps))
    full = ref.apply_reweighting(X, *_operator(W, eps))
    for k in range(r_env, S.numel() + 1):
        torch.testing.assert_close(ref.apply_reweighting(X, *_operator(W, eps, k)), full, rtol=1e-12, atol=1e-12)
    if r_env > 0:
        fewer = ref.apply_reweighting(X, *_operator(W, eps, r_env - 1))
        assert float((fewer - full).norm()) > 1e-6


def test_fact4_zero_envelope_is_identity_weight_decay():
    W, *_, X = _random_case((9, 6), 7)
    eps = 10 * float(torch.linalg.matrix_norm(W, ord=2))
    U, V, d = _operator(W, eps)
    assert int(ref.envelope_rank(ref.anchor_factors(W)[1], eps)) == 0
    torch.testing.assert_close(ref.apply_reweighting(X, U, V, d), X, rtol=0, atol=0)
    assert math.isclose(float(ref.penalty_value(X, U, V, d)), float(X.square().sum()), rel_tol=1e-14)
    # eps = +inf (the min schedule before its first refresh) also gives R = I
    torch.testing.assert_close(ref.apply_reweighting(X, U, V, ref.reweighting_coefficients(ref.anchor_factors(W)[1], math.inf)), X)


@pytest.mark.parametrize("shape", SHAPES)
def test_fact5_anchor_identities(shape):
    W, U_f, S, V_f, eps, _ = _random_case(shape, 8)
    U, V, d = _operator(W, eps)
    n = S.numel()
    expected = U_f[:, :n] @ torch.diag(torch.minimum(S, eps**2 / S)) @ V_f[:, :n].T
    torch.testing.assert_close(ref.apply_reweighting(W, U, V, d), expected, rtol=1e-12, atol=1e-12)
    assert math.isclose(float(ref.penalty_value(W, U, V, d)), float(torch.clamp(S, max=eps).square().sum()), rel_tol=1e-12)


def _smoothed_logdet(X, eps):
    s = torch.linalg.svdvals(X)
    return torch.where(s >= eps, eps**2 * torch.log(s / eps) + eps**2 / 2, s**2 / 2).sum()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", range(3))
def test_fact6_majorization(shape, seed):
    W, *_, eps, _ = _random_case(shape, 10 + seed)
    U, V, d = _operator(W, eps)
    q_anchor = ref.penalty_value(W, U, V, d)
    F_anchor = _smoothed_logdet(W, eps)
    g = torch.Generator().manual_seed(seed)
    for scale in (1e-3, 0.1, 1.0, 5.0):
        X = W + scale * torch.randn(*shape, generator=g, dtype=f64)
        bound = F_anchor + (ref.penalty_value(X, U, V, d) - q_anchor) / 2
        assert float(_smoothed_logdet(X, eps)) <= float(bound) + 1e-10
    # equality at X = W' with a tangent bound: the gap closes to second order (100x for a step
    # 10x shorter; a bound that only touched W' would close to first order, 10x), or is 0
    gaps = []
    for scale in (1e-3, 1e-4):
        X = W + scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=f64)
        gaps.append(float(F_anchor + (ref.penalty_value(X, U, V, d) - q_anchor) / 2 - _smoothed_logdet(X, eps)))
    assert gaps[1] <= gaps[0] / 50 + 1e-13, gaps


def test_fact7_sloppy_near_threshold_barely_changes_R():
    """A triplet with sigma just above eps has d ~ 0: dropping it changes R by little."""
    W, U_f, S, V_f, eps, X = _random_case((10, 8), 12)
    eps_tight = float(S[3]) * (1 - 1e-4)  # triplet 3 sits just above eps
    full = ref.apply_reweighting(X, *_operator(W, eps_tight))
    U, S4, V, _ = ref.anchor_factors(W, 3)
    dropped = ref.apply_reweighting(X, U, V, ref.reweighting_coefficients(S4, eps_tight))
    assert float((dropped - full).norm() / full.norm()) < 1e-3


def test_batched_shapes_match_single():
    g = torch.Generator().manual_seed(13)
    Ws = torch.randn(4, 9, 7, generator=g, dtype=f64)
    Xs = torch.randn(4, 9, 7, generator=g, dtype=f64)
    U, S, V, _ = ref.anchor_factors(Ws, 5)
    eps = S[:, 2]
    d = ref.reweighting_coefficients(S, eps)
    batched = ref.apply_reweighting(Xs, U, V, d)
    for b in range(4):
        single = ref.apply_reweighting(Xs[b], U[b], V[b], ref.reweighting_coefficients(S[b], eps[b]))
        torch.testing.assert_close(batched[b], single)


def test_low_precision_input_is_computed_in_fp32():
    W, *_, eps, X = _random_case((16, 12), 14)
    U, V, d = (t.float() for t in _operator(W, eps))
    out = ref.apply_reweighting(X.to(torch.bfloat16), U, V, d)
    assert out.dtype == torch.float32
    exact = ref.apply_reweighting(X.to(torch.bfloat16).double(), U.double(), V.double(), d.double())
    assert float((out.double() - exact).norm() / exact.norm()) < 1e-5


@pytest.mark.parametrize(
    "spec, d1, d2, rule, expected",
    [
        (0.2, 768, 768, "params", 76),  # floor(0.2 * 768 * 768 / 1536)
        (0.5, 100, 300, "params", 37),  # floor(0.5 * 30000 / 400)
        (16, 64, 128, "params", 16),
        (0.2, 768, 3072, "reference", 614),  # int(0.2 * 3072), as the published code
        (16, 64, 128, "reference", 32),  # int(16 * 128 / 64)
    ],
)
def test_resolve_rank_rules(spec, d1, d2, rule, expected):
    assert ref.resolve_rank(spec, d1, d2, rule) == expected


@pytest.mark.parametrize("spec", [0, -1, 64, 1.0, 0.0, 1.5, 0.001])
def test_resolve_rank_out_of_range(spec):
    with pytest.raises(ValueError, match="target_rank"):
        ref.resolve_rank(spec, 64, 128)


def test_resolve_rank_types():
    with pytest.raises(TypeError, match="target_rank"):
        ref.resolve_rank(True, 10, 10)
    with pytest.raises(TypeError, match="target_rank"):
        ref.resolve_rank("0.2", 10, 10)
    with pytest.raises(ValueError, match="rank_rule"):
        ref.resolve_rank(2, 10, 10, rule="max")


def test_eps_schedules():
    inf = math.inf
    # min: starts at +inf, never increases
    eps, _ = ref.next_eps("min", inf, 3.0, 0)
    assert eps == 3.0
    assert ref.next_eps("DEFAULT", eps, 5.0, 1)[0] == 3.0
    assert ref.next_eps("min", eps, 2.0, 2)[0] == 2.0
    # track follows sigma_{r+1}, up or down
    assert ref.next_eps("exploration", 2.0, 5.0, 3)[0] == 5.0
    # constant
    assert ref.next_eps("constant", inf, 5.0, 0, eps_value=0.25)[0] == 0.25
    # geometric: eps0 = sigma_{r+1}(W_0), then eps * c down to the floor after N refreshes
    eps, eps0 = ref.next_eps("linear", inf, 8.0, 0, eps_floor=0.5, num_refreshes=4)
    assert (eps, eps0) == (8.0, 8.0)
    for i in range(1, 7):
        eps, eps0 = ref.next_eps("geometric", eps, 100.0, i, eps0, eps_floor=0.5, num_refreshes=4)
        assert math.isclose(eps, max(8.0 * (0.5 / 8.0) ** (i / 4), 0.5), rel_tol=1e-12)
    # a floor above eps0 (one floor for a group, or zero-initialized weights): eps rises to it, never past
    eps, eps0 = ref.next_eps("geometric", inf, 1.0, 0, eps_floor=16.0, num_refreshes=4)
    for i in range(1, 7):
        eps, eps0 = ref.next_eps("geometric", eps, 100.0, i, eps0, eps_floor=16.0, num_refreshes=4)
        assert math.isclose(eps, min(2.0 ** i, 16.0), rel_tol=1e-12)
    # rank-deficient weights: eps stays positive
    assert ref.next_eps("track", 1.0, 0.0, 1)[0] > 0
    with pytest.raises(ValueError, match="eps_schedule"):
        ref.next_eps("cosine", 1.0, 1.0, 0)


def test_a_triplet_at_eps_is_outside_the_envelope():
    """SPEC: the envelope holds the triplets strictly above eps; one at eps has d = 0 (and
    would have d = 0 by the formula eps / sigma - 1 too, but counts in no envelope rank)."""
    sigma = torch.tensor([3.0, 2.0, 2.0, 1.0], dtype=torch.float64)
    assert int(ref.envelope_rank(sigma, 2.0)) == 1
    assert ref.reweighting_coefficients(sigma, 2.0).tolist() == [2.0 / 3.0 - 1.0, 0.0, 0.0, 0.0]
    assert int(ref.envelope_rank(sigma, 0.5)) == 4 and int(ref.envelope_rank(sigma, 3.0)) == 0


def test_the_geometric_schedule_climbs_from_a_zero_sigma_next_to_its_floor():
    """Zero-initialized weights (sigma_{r+1} = 0 at refresh 0): eps0 is kept positive, so the
    schedule's factor (eps_floor / eps0) ** (1 / N) is finite and eps rises to the floor in N
    refreshes (with eps0 = 0 the second refresh divided by zero)."""
    eps, eps0 = ref.next_eps("geometric", math.inf, 0.0, 0, eps_floor=0.5, num_refreshes=4)
    assert eps0 > 0 and eps == eps0
    seen = [eps]
    for i in range(1, 7):
        eps, eps0 = ref.next_eps("geometric", eps, 0.0, i, eps0, eps_floor=0.5, num_refreshes=4)
        seen.append(eps)
    assert all(b > a for a, b in zip(seen[:4], seen[1:5]))
    assert math.isclose(seen[4], 0.5, rel_tol=1e-9) and seen[5] == seen[6] == 0.5


def test_project_of_low_precision_input_runs_in_fp32():
    """project is the ops' A = U^T X, B = X V for any X: a bfloat16 X is read in float32, as by
    apply_reweighting, not the factors cast down to bfloat16."""
    W, *_, eps, X = _random_case((16, 12), 15)
    U, V, _ = (t.float() for t in _operator(W, eps, k=5))
    Xb = X.to(torch.bfloat16)
    A, B = ref.project(Xb, U, V)
    assert A.dtype == B.dtype == torch.float32
    A64, B64 = U.double().T @ Xb.double(), Xb.double() @ V.double()
    assert float((A.double() - A64).norm() / A64.norm()) < 1e-5
    assert float((B.double() - B64).norm() / B64.norm()) < 1e-5


def test_the_geometric_schedule_starts_where_it_has_no_eps0():
    """A state without eps0 after its first refresh (refreshed under another schedule, or
    loaded from an older checkpoint) starts the geometric schedule there: eps0 = sigma_{r+1},
    not a NaN eps."""
    eps, eps0 = ref.next_eps("geometric", 5.0, 3.0, 4, math.nan, eps_floor=0.5, num_refreshes=4)
    assert (eps, eps0) == (3.0, 3.0)
    eps, _ = ref.next_eps("geometric", eps, 100.0, 5, eps0, eps_floor=0.5, num_refreshes=4)
    assert math.isclose(eps, 3.0 * (0.5 / 3.0) ** 0.25, rel_tol=1e-12)


@pytest.mark.parametrize("schedule, kwargs, named", [
    ("constant", dict(eps_value=math.inf), "eps_value"),
    ("constant", dict(eps_value=0.0), "eps_value"),
    ("geometric", dict(eps_floor=math.inf, num_refreshes=4), "eps_floor"),
    ("geometric", dict(eps_floor=0.5, num_refreshes=0), "num_refreshes"),
    ("geometric", dict(eps_floor=0.5, num_refreshes=2.0), "num_refreshes"),
])
def test_schedule_values_out_of_range_are_named(schedule, kwargs, named):
    problem = ref.schedule_problem(schedule, **kwargs)
    assert problem is not None and named in problem
    assert ref.schedule_problem("geometric", eps_floor=0.5, num_refreshes=1) is None


def test_schedule_values_may_be_numpy_numbers():
    """refresh_slices_ checks a SliceConfig with schedule_problem: a NumPy num_refreshes of 3
    was refused as not >= 1, while NumPy eps_value / eps_floor were taken."""
    np = pytest.importorskip("numpy")
    assert ref.schedule_problem("geometric", eps_floor=np.float32(0.5), num_refreshes=np.int64(3)) is None
    assert ref.schedule_problem("constant", eps_value=np.float64(0.5)) is None
    assert "num_refreshes" in ref.schedule_problem("geometric", eps_floor=0.5, num_refreshes=np.int64(0))


def test_params_rank_rule_is_the_floor_of_the_exact_value():
    """floor(f d1 d2 / (d1 + d2)) of the decimal f, not of its float product, which may land
    a few ulp below an integer (0.58 x 100 x 100 / 200 = 28.999999999999996)."""
    from fractions import Fraction

    assert ref.resolve_rank(0.58, 100, 100) == 29
    for f in [i / 100 for i in range(1, 100)]:
        for d1, d2 in [(100, 100), (64, 48), (768, 768), (3072, 768), (192, 576), (50, 30)]:
            exact = Fraction(str(f)) * d1 * d2 / (d1 + d2)
            want = exact.numerator // exact.denominator
            if 1 <= want < min(d1, d2):
                assert ref.resolve_rank(f, d1, d2) == want, (f, d1, d2)


def test_resolve_rank_takes_numpy_numbers_of_either_kind():
    """A NumPy fraction (np.float32 from a sweep) is the float it stands for, as a NumPy integer
    is the int: AdamQ3R's groups converted theirs, a Target's reached resolve_rank and was
    refused with a TypeError."""
    np = pytest.importorskip("numpy")
    assert ref.resolve_rank(np.float32(0.5), 100, 300) == ref.resolve_rank(float(np.float32(0.5)), 100, 300) == 37
    assert ref.resolve_rank(np.int64(16), 64, 128, "reference") == 32
    from q3r import Q3R, Target

    reg = Q3R([Target("w", torch.nn.Parameter(torch.randn(20, 20)), target_rank=np.float32(0.2))])
    assert reg.configs[0][0].rank == 2

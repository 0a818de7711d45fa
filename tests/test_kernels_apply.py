"""The apply kernel (out += alpha R(X), rank-2k update tile by tile) vs the reference."""

import pytest
import torch

from q3r import reference

from _kernel_utils import DEVICE, DTYPES, K, assert_rule, factors, needs_kernels, tile_settings
from test_kernels_project import CASES, make_blocks

pytestmark = needs_kernels
ALPHA = 0.2  # 2 lambda with lambda = 0.1


def exact_update(G, X, U, V, d, alpha):
    return G.double() + alpha * reference.apply_reweighting(X.double(), U.double(), V.double(), d.double())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,small", CASES)
def test_add_reweighting_into_gradient_slices(name, small, dtype):
    W, views, ops = make_blocks(name, small, dtype)
    grad = torch.randn(W.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
    dim_views = [grad.as_strided(v.shape, v.stride(), v.storage_offset()) for v in views]
    before = [g.clone() for g in dim_views]
    with tile_settings(small):
        K.add_reweighting_(dim_views, views, [o[0] for o in ops], [o[1] for o in ops], [o[2] for o in ops],
                           [ALPHA] * len(views))
    for g, g0, X, (U, V, d) in zip(dim_views, before, views, ops):
        ref_path = g0.clone().add_(reference.apply_reweighting(X, U, V, d).to(dtype), alpha=ALPHA)
        assert_rule(g, ref_path, exact_update(g0, X, U, V, d, ALPHA))
    # parts of the gradient outside every slice are untouched
    covered = torch.zeros(W.shape, dtype=torch.bool, device=DEVICE)
    for v in views:
        covered.as_strided(v.shape, v.stride(), v.storage_offset()).fill_(True)
    fresh = torch.randn(W.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
    assert torch.equal(grad[~covered], fresh[~covered])


def test_d_derived_from_sigma_and_eps():
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(37, 53, generator=gen).to(DEVICE)
    U, V, _ = factors(37, 53, 20, gen)
    sigma = torch.sort(torch.rand(20, generator=gen) * 5, descending=True).values.to(DEVICE)
    eps = sigma[12].clone()  # triplets 12.. are at or below eps: inert
    out = torch.zeros_like(X)
    with tile_settings(True):
        K.add_reweighting_([out], [X], [U], [V], None, [1.0], sigmas=[sigma], epss=[eps])
    d = reference.reweighting_coefficients(sigma, eps)
    torch.testing.assert_close(out, reference.apply_reweighting(X, U, V, d), rtol=1e-5, atol=1e-5)


def test_apply_reference_signature_with_batch_and_zero_width():
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(3, 21, 18, generator=gen).to(DEVICE)
    U, V, d = factors(21, 18, 9, gen)
    with tile_settings(True):
        out = K.apply_reweighting(X, U, V, d)
        same = K.apply_reweighting(X, U[:, :0], V[:, :0], d[:0])  # k = 0: R = I
    torch.testing.assert_close(out, reference.apply_reweighting(X, U, V, d), rtol=1e-5, atol=1e-5)
    assert torch.equal(same, X)


def test_apply_broadcasts_batch_dims_the_factors_carry_and_x_lacks():
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(21, 18, generator=gen).to(DEVICE)
    ops = [factors(21, 18, 9, gen) for _ in range(2)]
    U, V, d = (torch.stack(t) for t in zip(*ops))
    with tile_settings(True):
        both = K.apply_reweighting(X, U, V, d)
        only_d = K.apply_reweighting(X[None].expand(3, 21, 18), U[0], V[0], d[:1].expand(3, 9))
    torch.testing.assert_close(both, reference.apply_reweighting(X, U, V, d), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(only_d, reference.apply_reweighting(X, U[0], V[0], d[:1].expand(3, 9)),
                               rtol=1e-5, atol=1e-5)
    assert both.shape == (2, 21, 18) and only_d.shape == (3, 21, 18)


def test_regularizer_add_grad_uses_kernels_and_matches(monkeypatch):
    """Q3R.add_grad_ on the Triton backend (row slices, column slices) equals the reference."""
    from q3r import Q3R, Target

    grads = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("Q3R_BACKEND", backend)
        gen = torch.Generator().manual_seed(4)
        qkv = torch.nn.Parameter(torch.randn(37, 53, generator=gen).to(DEVICE))
        attn = torch.nn.Parameter(torch.randn(23, 53, generator=gen).to(DEVICE))
        targets = [Target("qkv", qkv, 0, [(0, 11), (11, 24), (24, 37)], 3),
                   Target("c_attn", attn, 1, [(0, 17), (17, 34), (40, 53)], 4)]
        reg = Q3R(targets, lmbda=0.1, steps=2)
        for p in (qkv, attn):
            p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
        with tile_settings(True):
            for _ in range(3):  # refresh, plain step, refresh
                reg.add_grad_()
        grads[backend] = (qkv.grad.clone(), attn.grad.clone())
    for fast, ref in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_default_tiles_with_partial_chunks_of_the_packed_width():
    """The default (GPU) tiles on small awkward blocks: k chunks of 64 over packed widths of 32
    and 64 (a chunk partly beyond kp), row and column tiles partly beyond the block."""
    gen = torch.Generator().manual_seed(6)
    blocks = [(37, 53, 20), (70, 45, 35), (19, 130, 1)]
    Xs = [torch.randn(r, c, generator=gen).to(DEVICE) for r, c, _ in blocks]
    ops = [factors(r, c, k, gen) for r, c, k in blocks]
    outs = [torch.randn(X.shape, generator=gen).to(DEVICE) for X in Xs]
    before = [o.clone() for o in outs]
    K.add_reweighting_(outs, Xs, [o[0] for o in ops], [o[1] for o in ops], [o[2] for o in ops], [ALPHA] * len(Xs))
    for out, out0, X, (U, V, d) in zip(outs, before, Xs, ops):
        torch.testing.assert_close(out, out0 + ALPHA * reference.apply_reweighting(X, U, V, d), rtol=1e-5, atol=1e-5)
    for X, (U, V, _) in zip(Xs, ops):
        (A, B), = K.project_blocks([X], [U], [V])
        torch.testing.assert_close(A, U.T @ X, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(B, X @ V, rtol=1e-5, atol=1e-5)

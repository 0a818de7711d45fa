"""The projection kernel (A = U^T X, B = X V for many blocks in one launch) vs the reference."""

import pytest
import torch

from q3r import reference

from _kernel_utils import CUDA, DEVICE, DTYPES, K, assert_rule, factors, needs_kernels, tile_settings

pytestmark = needs_kernels

# (weight shape, slice dim, slices, k per slice); slices None = the whole weight
SMALL = {
    "rows_11_13_13": ((37, 53), 0, [(0, 11), (11, 24), (24, 37)], [5, 10, 0]),
    "cols_with_gap": ((23, 53), 1, [(0, 17), (17, 34), (40, 53)], [7, 3, 12]),
    "whole": ((37, 53), 0, None, [20]),
    # widths in multiples of 16 on aligned storage (project_blocks itself always takes the
    # unaligned loads; the ALIGNED variants run inside the apply and the fused step, and
    # test_kernels_apply.py's aligned_cols case is the one that catches a broken one)
    "aligned_cols": ((32, 96), 1, [(0, 32), (32, 64), (64, 96)], [9, 20, 4]),
}
REAL = {
    "vit_qkv_rows": ((2304, 768), 0, [(0, 768), (768, 1536), (1536, 2304)], [153, 153, 140]),
    "gpt2_c_attn_cols": ((768, 2304), 1, [(0, 768), (768, 1536), (1536, 2304)], [153, 153, 153]),
    "vit_fc1": ((3072, 768), 0, None, [153]),
}
CASES = [(name, True) for name in SMALL] + ([(name, False) for name in REAL] if CUDA else [])


def make_blocks(name: str, small: bool, dtype, seed: int = 0):
    shape, dim, slices, ks = (SMALL if small else REAL)[name]
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(*shape, generator=gen).to(DEVICE, dtype)
    spans = [(0, shape[dim])] if slices is None else slices
    views = [W.narrow(dim, a, b - a) for a, b in spans]
    ops = [factors(v.shape[0], v.shape[1], k, gen) for v, k in zip(views, ks)]
    return W, views, ops


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,small", CASES)
def test_project_blocks_matches_reference(name, small, dtype):
    W, views, ops = make_blocks(name, small, dtype)
    with tile_settings(small):
        out = K.project_blocks(views, [U for U, _, _ in ops], [V for _, V, _ in ops])
    for X, (U, V, _), (A, B) in zip(views, ops, out):
        A_ref, B_ref = reference.project(X, U, V)
        A_exact, B_exact = reference.project(X.double(), U.double(), V.double())
        assert A.shape == A_ref.shape and B.shape == B_ref.shape
        if U.shape[1] == 0:
            continue
        assert_rule(A, A_ref, A_exact)
        assert_rule(B, B_ref, B_exact)


def test_project_reference_signature_with_batch():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(2, 19, 33, generator=gen).to(DEVICE)
    U, V, _ = factors(19, 33, 17, gen)
    with tile_settings(True):
        A, B = K.project(X, U, V)
    A_ref, B_ref = reference.project(X, U, V)
    torch.testing.assert_close(A, A_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(B, B_ref, rtol=1e-5, atol=1e-5)
    # factors with a batch dim X lacks: broadcast, as the reference's products do
    Ub, Vb = torch.stack([U, U.flip(-1)]), torch.stack([V, V.flip(-1)])
    with tile_settings(True):
        A, B = K.project(X[0], Ub, Vb)
    A_ref, B_ref = reference.project(X[0], Ub, Vb)
    assert A.shape == A_ref.shape == (2, 17, 33) and B.shape == B_ref.shape == (2, 19, 17)
    torch.testing.assert_close(A, A_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(B, B_ref, rtol=1e-5, atol=1e-5)

"""Single-process tests of q3r.distributed: assignment by cost, the range finder's accuracy
against an exact SVD (judged by R(X), SPEC fact 7), and the no-op paths without a process group."""

from __future__ import annotations

import math

import pytest
import torch

import q3r
from q3r import reference
from q3r.distributed import assign_by_cost, comm, refresh_cost
from q3r.distributed.rangefinder import cholesky_qr, gaussian_sketch, range_finder_svd, sketch_width
from q3r.distributed.sharded_refresh import SKETCH
from q3r.refresh import SliceConfig, new_slice_state, refresh_slices_


def _matrix(d1, d2, decay, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = min(d1, d2)
    U = torch.linalg.qr(torch.randn(d1, n, generator=gen))[0]
    V = torch.linalg.qr(torch.randn(d2, n, generator=gen))[0]
    return (U * torch.arange(1, n + 1, dtype=torch.float32) ** -decay) @ V.T


def _rel_error_of_R(W, X, U, S, V, rank):
    """Relative error of R(X) built from approximate triplets, against the exact operator."""
    Ue, Se, Ve, spectrum = reference.anchor_factors(W)
    exact = reference.apply_reweighting(X, Ue, Ve, reference.reweighting_coefficients(Se, float(spectrum[rank])))
    approx = reference.apply_reweighting(X, U, V, reference.reweighting_coefficients(S, float(S[rank])))
    return float((approx - exact).norm() / exact.norm())


def _identity(t):
    return t


def test_assign_by_cost_balances_cost_not_count():
    costs = [refresh_cost((d, d), 1) for d in (2048, 512, 512, 512, 512, 512, 512, 512, 512)]
    owner = assign_by_cost(costs, 2)
    load = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(2)]
    assert owner[0] != owner[1] or owner.count(owner[0]) == 1  # the big one is alone with few others
    assert max(load) == costs[0]  # the 2048 slice outweighs all eight 512 slices together
    assert assign_by_cost(costs, 2) == owner  # deterministic: every rank computes the same


@pytest.mark.parametrize("d1,d2,decay", [(256, 192, 1.0), (160, 400, 0.5)])
def test_range_finder_accuracy_cold_and_warm(d1, d2, decay):
    W = _matrix(d1, d2, decay)
    rank = reference.resolve_rank(0.2, d1, d2)
    k = sketch_width(rank, d1, d2, SKETCH.oversample)
    gen = torch.Generator().manual_seed(1)
    noise = lambda: torch.randn(d1, d2, generator=gen) * W.norm() / math.sqrt(W.numel())  # noqa: E731
    (U, S, V, frob2), = range_finder_svd([W], [gaussian_sketch(d2, k, 0, "cpu")], _identity, SKETCH.cold_power_iters)
    assert math.isclose(float(frob2), float(W.square().sum()), rel_tol=1e-5)
    assert torch.allclose(U.T @ U, torch.eye(k), atol=1e-5)
    assert _rel_error_of_R(W, W + 0.1 * noise(), U, S, V, rank) < 1e-2
    # warm refreshes while the weights drift: subspace iteration continued across refreshes
    for step in range(4):
        W = W + 0.01 * noise()
        (U, S, V, _), = range_finder_svd([W], [gaussian_sketch(d2, k, step + 1, "cpu", V)], _identity, SKETCH.power_iters)
    assert _rel_error_of_R(W, W + 0.1 * noise(), U, S, V, rank) < 1e-3


def test_ranks_that_disagree_on_a_widening_take_the_same_one():
    # (r_env, width to widen to or 0) per slice on two ranks whose singular values differ in
    # the last bit around eps: both must widen the second slice, to the same width
    from q3r.distributed.rangefinder import _agreed

    a, b = [(40, 0), (51, 96), (30, 0)], [(40, 0), (50, 0), (30, 0)]
    table = lambda wanted: torch.tensor([[r, w, float(w > 0), 1.0] for r, w in wanted], dtype=torch.float64)  # noqa: E731
    cpu = torch.device("cpu")
    # and their Ritz values, 1 ulp apart around eps = 1 on the second slice: both take the mean
    S_a = [torch.tensor([3.0, 2.0]), torch.tensor([2.0, 1.0]), torch.tensor([5.0])]
    S_b = [S_a[0], torch.nextafter(S_a[1], torch.zeros(2)), S_a[2]]
    flat = lambda wanted, spectra: torch.cat([table(wanted).reshape(-1)] + [s.double() for s in spectra])  # noqa: E731
    on_a, mean_a = _agreed(a, lambda t: t + flat(b, S_b), cpu, S_a)
    on_b, mean_b = _agreed(b, lambda t: t + flat(a, S_a), cpu, S_b)
    assert on_a == on_b == [(40, 0), (51, 96), (30, 0)]
    assert all(torch.equal(x, y) and x.dtype == torch.float32 for x, y in zip(mean_a, mean_b))
    assert torch.equal(mean_a[0], S_a[0]) and torch.equal(mean_a[2], S_a[2])  # equal values stay as they are
    same, means = _agreed(a, lambda t: 2 * t, cpu, S_a)  # ranks that agree keep their decisions and S
    assert same == a and all(torch.equal(x, y) for x, y in zip(means, S_a))
    # the table is reduced on the weights' device: an NCCL group has no CPU backend
    seen = []
    assert _agreed(a, lambda t: (seen.append(t.device.type), 2 * table(a).reshape(-1))[1], torch.device("meta"))[0] == a
    assert seen == ["meta"]


def test_full_width_sketch_is_the_exact_svd():
    W = _matrix(40, 24, 0.7)
    (U, S, V, _), = range_finder_svd([W], [gaussian_sketch(24, 24, 0, "cpu")], _identity, 1)
    assert torch.allclose(S, torch.linalg.svdvals(W), rtol=1e-4, atol=1e-6)
    assert torch.allclose((U * S) @ V.T, W, atol=1e-5)


def test_cholesky_qr_survives_rank_deficient_and_zero_sketches():
    Y = torch.randn(50, 3) @ torch.randn(3, 8)  # rank 3, width 8
    Q = cholesky_qr([Y], _identity, passes=3)[0]
    assert torch.isfinite(Q).all()
    assert torch.allclose(Q @ (Q.T @ Y), Y, atol=1e-4)  # Q spans Y
    assert torch.isfinite(cholesky_qr([torch.zeros(10, 4)], _identity)[0]).all()


def test_without_a_process_group_nothing_is_communicated():
    assert not comm.initialized() and comm.world_size() == 1
    W = torch.randn(12, 9)
    a, b = new_slice_state(12, 9), new_slice_state(12, 9)
    cfg = [SliceConfig("w", 3)]
    with comm.counting() as log:
        q3r.distributed.refresh_slices_([W], [a], cfg)
        comm.all_reduce_(torch.ones(2))
    refresh_slices_([W], [b], cfg)
    assert log.calls == 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True)


def test_configure_validates():
    import dataclasses

    from q3r.distributed import _REPLICATED

    before, replicated = dataclasses.asdict(SKETCH), dict(_REPLICATED)
    try:
        with pytest.raises(ValueError, match="oversample"):
            q3r.distributed.configure(oversample=-1)
        with pytest.raises(ValueError, match="power_iters"):
            q3r.distributed.configure(power_iters=1.5)
        for bad in (-1e-3, float("nan"), float("inf"), True):
            with pytest.raises(ValueError, match="max_lag"):
                q3r.distributed.configure(replicated=False, oversample=SKETCH.oversample + 1, max_lag=bad)
            with pytest.raises(ValueError, match="max_residual"):
                q3r.distributed.configure(replicated=False, oversample=SKETCH.oversample + 1, max_residual=bad)
        # a refused call changes nothing
        assert dataclasses.asdict(SKETCH) == before and _REPLICATED == replicated
    finally:
        q3r.distributed.configure(**{k: v for k, v in before.items()}, replicated=replicated["enabled"])


def test_a_penalty_gradient_is_added_after_callbacks_queued_later_in_the_backward_pass():
    """Q3R.penalty() on FSDP2 shards adds its gradient in a final callback, which must run after
    FSDP2's (queued while the backward pass runs, maybe after the penalty's node)."""
    from q3r.distributed.sharded_step import queue_after_backward_callbacks

    order = []
    engine = torch.autograd.Variable._execution_engine

    class Early(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.sum()

        @staticmethod
        def backward(ctx, g):
            order.append("early node")
            queue_after_backward_callbacks(lambda: order.append("ours"))
            return None

    a, b = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    other = (b * 2).sum()
    def later_hook(grad):
        order.append("later hook")
        engine.queue_callback(lambda: order.append("theirs"))

    other.register_hook(later_hook)
    early = Early.apply(a)  # created last: the engine runs it first
    (other + early).backward()
    assert order[:2] == ["early node", "later hook"]  # the setting of concern: theirs is queued after
    assert order[2:] == ["theirs", "ours"]


def test_a_refresh_that_fails_on_one_rank_raises_on_every_rank_at_once(tmp_path):
    """DDP: the local part of a refresh raising on one rank (out of memory on the owner of the
    largest target) left the other ranks waiting in the factor exchange until the process
    group timed out (gloo's 30 minutes by default), with gloo's message, not q3r's; and the
    ranks that had refreshed their share kept the new factors. Now every rank raises at once,
    no rank changes its factors, and the next refresh runs normally."""
    import _distributed_worker as worker

    world = 2
    worker.spawn(worker.failing_refresh_worker, world, str(tmp_path / "out"))
    outs = [torch.load(tmp_path / f"out.{rank}") for rank in range(world)]
    assert outs[-1]["error"] == "injected failure of the local refresh"
    for out in outs[:-1]:
        assert "refresh failed on rank(s) [1]" in out["error"]
        assert out["elapsed"] < 30  # (the process group's timeout is 60 s)
    assert all(out["unchanged"] for out in outs)
    for out in outs[1:]:
        for got, ref in zip(out["states"], outs[0]["states"]):
            for key in ref:
                torch.testing.assert_close(got[key], ref[key], rtol=0, atol=0, equal_nan=True)
    assert all(int(st["refreshes"]) == 1 for st in outs[0]["states"])

"""Host-side work of a sketched refresh (issue 4): a warm refresh of a whole model was bound by
the host on the H100 (1,172 launches and 49 blocking copies around 15.5 ms of device work), so
its per-target work is batched per stack (and per group on the exact path).  These tests pin
that down on the CPU: the number of dispatched ops (kernel launches and host syncs on a GPU)
does not grow with the number of same-shaped targets, and the batched pieces
(warm starts, non-finite detection, factor copies) give exactly what the per-target code gave.
"""

import collections
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from q3r import _native, randomized
from q3r import _refresh_sketched as _sketched
from q3r.refresh import SliceConfig, new_slice_state, refresh_slices_

D1, D2, RANK = 96, 64, 5  # sketch width 21 <= 32: the sketched path, not the exact fallback


class CountOps(TorchDispatchMode):
    """Counts every op that reaches the dispatcher (on CUDA, most of them launch a kernel)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _targets(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(D1, D2, generator=gen) for _ in range(n)]
    return weights, [SliceConfig(f"t{i}", RANK) for i in range(n)], [new_slice_state(D1, D2) for _ in range(n)]


def _shrunk(weights, step):
    """The weights scaled by 0.98^step.  Refreshing unchanged weights again leaves sigma_{r+1}
    equal to eps up to roundoff, so whether a member's envelope rank is r or r + 1 (SPEC §3)
    turns on the last bit of an estimate, which differs between machines (BLAS, threads) and
    between stacks of different sizes; a shrinking spectrum makes eps follow sigma_{r+1} down
    and every envelope rank r, on any machine."""
    return [w * 0.98**step for w in weights]


METHODS = ["randomized"] + (["native"] if _native.available("cpu") else [])


@pytest.mark.parametrize("method", METHODS + ["exact"])
def test_warm_refresh_dispatches_the_same_ops_for_4_and_16_targets(method):
    counts = {}
    for n in (4, 16):
        weights, configs, states = _targets(n)
        for step in range(2):  # cold, then warm
            refresh_slices_(_shrunk(weights, step), states, configs, method=method)
        weights = _shrunk(weights, 2)
        with CountOps() as mode:
            assert all(refresh_slices_(weights, states, configs, method=method))
        counts[n] = mode.counts
    # (no op more often for 16 than for 4; torch's matmul may pick its views by batch size)
    grown = {op: (counts[4][op], counts[16][op]) for op in counts[16] if counts[16][op] > counts[4][op]}
    assert not grown, grown
    assert sum(counts[16].values()) < 300


@pytest.mark.parametrize("method", METHODS + ["exact"])
def test_warm_refresh_calls_the_same_top_level_ops_for_4_and_16_targets(method):
    """The same on the host side: ops that dispatch nothing (a .to to the dtype and device a
    tensor already has) still cost a call each, which the dispatch mode above does not see;
    the profiler's top-level aten ops do (start_basis once called .to per warm member)."""
    from torch.profiler import ProfilerActivity, profile

    counts = {}
    for n in (4, 16):
        weights, configs, states = _targets(n)
        for step in range(2):
            refresh_slices_(_shrunk(weights, step), states, configs, method=method)
        weights = _shrunk(weights, 2)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            assert all(refresh_slices_(weights, states, configs, method=method))
        counts[n] = collections.Counter(
            e.name for e in prof.events()
            if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
    grown = {op: (counts[4][op], counts[16][op]) for op in counts[16] if counts[16][op] > counts[4][op]}
    assert not grown, grown


def test_start_basis_copies_column_blocks_like_the_joined_columns():
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(5, D1, D2, generator=gen)
    k = 12
    # warm starts are orthonormal columns (previous V and its tail), as a refresh stores them
    bases = [torch.linalg.qr(torch.randn(D2, 12 + 8, generator=gen)).Q for _ in range(5)]
    V = [basis[:, :w] for basis, w in zip(bases, (7, 7, 3, 9, 7))]
    tails = [basis[:, v.shape[1] : v.shape[1] + w] for basis, v, w in zip(bases, V, (5, 5, 2, 8, 0))]
    # members 0, 1 share widths (7, 5); 2 is short (topped up); 3 is cut at k; 4 has an empty tail;
    # one member is cold, and one is given as a single tensor (a widened retry's start)
    warm = [(V[0], tails[0]), (V[1], tails[1]), (V[2], tails[2]), (V[3], tails[3]), None]
    warm_single = list(warm)
    warm_single[4] = V[4]
    for starts in (warm, warm_single):
        P, cold = randomized.start_basis(W, k, starts, torch.Generator().manual_seed(7))
        gauss = torch.randn(5, D2, k, generator=torch.Generator().manual_seed(7))
        for j, start in enumerate(starts):
            if start is None:  # cold: Gaussian columns alone
                assert torch.equal(P[j], gauss[j])
                continue
            joined = torch.cat(start, dim=-1) if isinstance(start, tuple) else start
            width = min(joined.shape[-1], k)
            assert torch.equal(P[j, :, :width], joined[:, :width])
            # a short member's top-up: the Gaussian columns projected off its warm columns
            Vw, top_up = joined[:, :width], gauss[j, :, width:]
            torch.testing.assert_close(P[j, :, width:], top_up - Vw @ (Vw.T @ top_up), rtol=1e-5, atol=1e-5)
            assert torch.all((Vw.T @ P[j, :, width:]).abs() < 1e-5)
        assert cold.tolist() == [start is None for start in starts]


@pytest.mark.parametrize("short", [2, 12])
def test_a_warm_stack_with_members_short_of_warm_columns_is_not_checked_on_the_host(short, monkeypatch):
    """An envelope that grew at the last refresh leaves its target a column or two short of the
    next sketch width.  Its orthogonal top-up passes the one-pass check like warm columns do,
    so the stack still leaves its check on the device (no host sync in the sketch, and no
    second sketch).  A member short of more than oversampling / 2 columns (12 here, of 21) is
    checked at once, as before: many top-up columns would often fail the check, and a failed
    unchecked basis costs a whole second sketch."""
    weights, configs, states = _targets(6, seed=6)
    for step in range(2):
        refresh_slices_(_shrunk(weights, step), states, configs, method="randomized")
    for state in states[:3]:  # as if their envelopes had grown at the last refresh
        state["tail"] = state["tail"][:, :-short]
    checked, trusted = [], []
    orthonormalize, unchecked = randomized.orthonormalize, randomized.orthonormalize_unchecked
    monkeypatch.setattr(randomized, "orthonormalize", lambda *a, **kw: checked.append(1) or orthonormalize(*a, **kw))

    def unchecked_spy(*a, **kw):
        Q, good = unchecked(*a, **kw)
        trusted.append(good)
        return Q, good

    monkeypatch.setattr(randomized, "orthonormalize_unchecked", unchecked_spy)
    assert all(refresh_slices_(_shrunk(weights, 2), states, configs, method="randomized"))
    if short == 2:
        assert not checked and len(trusted) == 1 and bool(trusted[0].all())
    else:
        assert checked and not trusted
    # and the factors are right: sigma matches an exact SVD
    exact = torch.linalg.svdvals(torch.stack(_shrunk(weights, 2)))
    for state, s in zip(states, exact):
        r_env = state["sigma"].shape[0]
        torch.testing.assert_close(state["sigma"], s[:r_env], rtol=1e-4, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_member_of_a_stack_is_skipped_without_touching_the_others(method, monkeypatch):
    """The bad member is found from the stack's own max |W| (no sync of its own); it neither
    forces the stack's second Cholesky-QR pass nor reaches Householder QR or the solver."""
    weights, configs, states = _targets(3, seed=2)
    for step in range(2):
        refresh_slices_(_shrunk(weights, step), states, configs, method=method)
    weights = _shrunk(weights, 2)
    alone = [{key: value.clone() for key, value in state.items()} for state in states]
    before_bad = {key: value.clone() for key, value in states[2].items()}
    bad = weights[2].clone()
    bad[4, 5] = float("nan")
    qr_calls = []
    real_qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda *a, **kw: qr_calls.append(1) or real_qr(*a, **kw))
    with pytest.warns(RuntimeWarning, match="'t2' has non-finite"):
        done = refresh_slices_([weights[0], weights[1], bad], states, configs, method=method)
    assert done == [True, True, False] and not qr_calls
    for key, value in before_bad.items():  # the bad member keeps its last good factors
        torch.testing.assert_close(states[2][key], value, rtol=0, atol=0, equal_nan=True)
    # the good members get what a refresh without the bad one gives (the bad one is last, so
    # the Gaussian columns that top up their warm starts are the same)
    refresh_slices_(weights[:2], alone[:2], configs[:2], method=method)
    for j in (0, 1):
        for key in ("U", "V", "tail", "sigma", "eps", "sigma_next", "tail_energy", "refreshes"):
            torch.testing.assert_close(states[j][key], alone[j][key], rtol=1e-5, atol=1e-6)


def test_orthonormalize_leaves_inactive_members_out_of_its_decisions():
    gen = torch.Generator().manual_seed(3)
    Y = torch.randn(3, 50, 8, generator=gen)
    good = randomized.orthonormalize(Y[[0, 2]])
    Y[1, 0, 0] = float("inf")
    Q = randomized.orthonormalize(Y, torch.tensor([True, False, True]))
    assert torch.equal(Q[[0, 2]], good)


def test_committed_factors_are_contiguous_views_with_the_right_values():
    weights, configs, states = _targets(4, seed=4)
    exact = [new_slice_state(D1, D2) for _ in weights]
    refresh_slices_(weights, states, configs, method="randomized")
    refresh_slices_(weights, exact, configs, method="exact")
    for fast, ref in zip(states, exact):
        for key in ("U", "V", "tail"):
            assert fast[key].is_contiguous() and fast[key].dtype == torch.float32
        assert fast["sigma"].shape == ref["sigma"].shape
        torch.testing.assert_close(fast["sigma"], ref["sigma"], rtol=1e-4, atol=0)
        # singular vectors up to sign
        signs = torch.sign((fast["U"] * ref["U"]).sum(0))
        torch.testing.assert_close(fast["U"] * signs, ref["U"], rtol=0, atol=2e-3)
    # a later refresh of one member replaces its views only
    others = [states[j]["U"].clone() for j in (1, 2, 3)]
    refresh_slices_([weights[0] * 2], [states[0]], [configs[0]], method="randomized")
    for j, U in zip((1, 2, 3), others):
        assert torch.equal(states[j]["U"], U)


def test_small_tables_reach_the_device_with_their_values():
    from q3r._transfer import to_device

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = to_device([3, 1, 2], torch.int64, device)
    assert t.device.type == device and t.dtype == torch.int64 and t.tolist() == [3, 1, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n", [4, 16])
def test_warm_refresh_syncs_the_host_a_few_times_per_stack(n):
    """On a GPU each host sync drains the stream, so host and device work stop overlapping.
    A warm refresh of one same-shaped stack may sync for its decisions: whether Cholesky-QR
    needs a second pass, whether a member needs Householder QR, the commit's one transfer of
    scalars, and torch.linalg.eigh's error check where the native solver is not built. The
    small index and scalar tables it sends to the device must not sync (q3r._transfer)."""
    import warnings

    method = "native" if _native.available("cuda") else "randomized"
    weights, configs, states = _targets(n)
    weights = [w.cuda() for w in weights]
    states = [new_slice_state(D1, D2, "cuda") for _ in range(n)]
    for _ in range(2):  # cold, then warm
        refresh_slices_(weights, states, configs, method=method)
    # mixed widths in one stack: the commit gathers rows per width (index tables)
    for j, w in enumerate(weights):
        w.mul_(1 + 0.01 * j)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert all(refresh_slices_(weights, states, configs, method=method))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 4, [str(w.message)[:120] for w in syncs]


@pytest.mark.skipif(not _native.available("cpu"), reason="needs the CPU part of q3r._C")
def test_stacks_solved_together_send_their_commit_scalars_to_the_host_together(monkeypatch):
    """A warm native refresh of three shapes, two of them transposes of each other (one stack):
    one host transfer per native solver call (on a GPU each transfer waits for the device to
    drain), carrying every stack it solved."""
    from q3r import _refresh_commit

    gen = torch.Generator().manual_seed(5)
    shapes = [(D1, D2)] * 3 + [(D2, D1)] * 3 + [(2 * D1, D2)] * 3
    weights = [torch.randn(*shape, generator=gen) for shape in shapes]
    configs = [SliceConfig(f"t{i}", RANK) for i in range(len(shapes))]
    states = [new_slice_state(*shape) for shape in shapes]
    for _ in range(2):  # cold, then warm
        refresh_slices_(weights, states, configs, method="native")
    transfers, solves = [], []
    to_host, solve = _refresh_commit.to_host, _native.batched_eigh
    monkeypatch.setattr(_refresh_commit, "to_host", lambda tables: transfers.append(len(tables)) or to_host(tables))
    monkeypatch.setattr(_native, "batched_eigh", lambda G, **kw: solves.append(G.shape[0]) or solve(G, **kw))
    assert all(refresh_slices_(weights, states, configs, method="native"))
    assert len(transfers) == len(solves) and sum(transfers) == 2 and sum(solves) == 9


def test_a_steady_warm_refresh_takes_one_cholesky_qr_pass_per_stack(monkeypatch):
    """Members whose envelope is narrower than the stack's fill the sketch width with their
    stored tail, not with Gaussian columns: one Gaussian column makes the whole stack's first
    Cholesky-QR pass fail its check and take a second (on a GPU also a host sync)."""
    gen = torch.Generator().manual_seed(6)
    shapes = [(96, 96)] * 8 + [(384, 96)] * 4
    weights = [torch.randn(*shape, generator=gen) for shape in shapes]
    configs = [SliceConfig(f"t{i}", 19) for i in range(len(shapes))]
    states = [new_slice_state(*shape) for shape in shapes]
    for _ in range(3):  # the first one exact (a cold sketch would be too wide), then warm ones
        refresh_slices_(weights, states, configs, method="randomized")
        for w in weights:
            w.add_(torch.randn(w.shape, generator=gen), alpha=0.005)
    refresh_slices_(weights, states, configs, method="randomized")
    envelopes = {s["U"].shape[1] for s in states}
    assert len(envelopes) > 1, envelopes  # some members are narrower than their stack
    passes = []
    real = randomized._cholesky_qr
    monkeypatch.setattr(randomized, "_cholesky_qr", lambda Y: passes.append(Y.shape) or real(Y))
    assert all(refresh_slices_(weights, states, configs, method="randomized"))  # the same weights
    assert len(passes) == 2, passes


def _steady_targets(seed):
    """A warm-started model at steady state: cold (exact) and two warm refreshes behind it
    (and the weights of the next refresh, see _shrunk)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(96, 96)] * 6 + [(384, 96)] * 3
    weights = [torch.randn(*shape, generator=gen) for shape in shapes]
    configs = [SliceConfig(f"t{i}", 19) for i in range(len(shapes))]
    states = [new_slice_state(*shape) for shape in shapes]
    for step in range(3):
        refresh_slices_(_shrunk(weights, step), states, configs, method="randomized")
    return _shrunk(weights, 3), configs, states


def test_a_fully_warm_sketch_leaves_its_check_to_the_commit_and_gets_the_same_factors(monkeypatch):
    """With k warm columns per member the one-pass basis is not checked on the host (a sync
    per stack on a GPU): its check travels with the commit's scalars, and the factors are
    those of the checked path."""
    weights, configs, states = _steady_targets(7)
    checked = [{key: value.clone() for key, value in s.items()} for s in states]
    calls = collections.Counter()
    real = randomized.orthonormalize
    monkeypatch.setattr(randomized, "orthonormalize", lambda *a, **k: calls.update(["checked"]) or real(*a, **k))
    assert all(refresh_slices_(weights, states, configs, method="randomized"))
    assert calls["checked"] == 0
    sketch = randomized.sketch
    monkeypatch.setattr(randomized, "sketch", lambda *a, **k: sketch(*a, **{**k, "check_later": False}))
    assert all(refresh_slices_(weights, checked, configs, method="randomized"))
    assert calls["checked"] == 2  # one per stack
    for fast, ref in zip(states, checked):
        for key, value in ref.items():
            torch.testing.assert_close(fast[key], value, rtol=0, atol=0, equal_nan=True)


def test_a_member_whose_unchecked_basis_fails_is_sketched_again_with_the_check(monkeypatch):
    weights, configs, states = _steady_targets(8)
    V = states[1]["V"].clone()
    V[:, 1] = V[:, 0]  # a dependent warm start: the one-pass basis of member 1 fails its check
    states[1]["V"] = V
    reference = [{key: value.clone() for key, value in s.items()} for s in states]
    sketches = []
    sketch = randomized.sketch
    monkeypatch.setattr(randomized, "sketch", lambda W, *a, **k: sketches.append((W.shape[0], k["check_later"]))
                        or sketch(W, *a, **k))
    assert all(refresh_slices_(weights, states, configs, method="randomized"))
    # both stacks unchecked first; then member 1 alone, checked
    assert sorted(sketches) == [(1, False), (3, True), (6, True)], sketches
    monkeypatch.setattr(randomized, "sketch", lambda *a, **k: sketch(*a, **{**k, "check_later": False}))
    assert all(refresh_slices_(weights, reference, configs, method="randomized"))
    for fast, ref in zip(states, reference):
        torch.testing.assert_close(fast["sigma"], ref["sigma"], rtol=1e-5, atol=0)
        for key in ("eps", "sigma_next", "refreshes"):
            torch.testing.assert_close(fast[key], ref[key], rtol=1e-5, atol=0)


def test_a_failed_unchecked_basis_does_not_use_up_a_widening():
    """With max_widenings = 0 the member is sketched again (checked) and committed from its
    sketch, as the checked path would: not sent to an exact SVD."""
    import dataclasses

    from q3r import reference, refresh

    weights, configs, states = _steady_targets(8)
    V = states[1]["V"].clone()
    V[:, 1] = V[:, 0]
    states[1]["V"] = V
    exact = []
    real = reference.anchor_factors
    reference.anchor_factors = lambda W: exact.append(W.shape) or real(W)
    try:
        options = dataclasses.replace(refresh.DEFAULT_SKETCH, max_widenings=0)
        assert all(refresh_slices_(weights, states, configs, method="randomized", options=options))
    finally:
        reference.anchor_factors = real
    assert exact == []
    assert int(states[1]["refreshes"]) == 4


@pytest.mark.parametrize("warm", [False, True])
def test_a_sketch_makes_no_full_size_temporary(warm):
    """The sketch scales its small products with W, not a copy of the stack: on a GPU that copy
    was a pass over the weights and a temporary of their size (2 GB for LLaMA-1B's 32 gate/up
    matrices).  No op inside it returns a tensor as large as the stack."""
    weights, configs, states = _targets(4, seed=8)
    # tall targets: a refresh stacks them transposed, as a view of the stack of the weights
    # (tiny norms: the scaling still works)
    stack = torch.stack(weights).mT * 1e-30
    starts = [None] * 4
    if warm:
        refresh_slices_([w * 1e-30 for w in weights], states, configs, method="randomized")
        starts = [(s["U"], s["tail"]) for s in states]  # the transposes' V: the targets' U
    largest = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                # (views of the stack, such as the flattened one that max_abs reads, are no copies)
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() != stack_memory:
                    largest.append(t.numel())
            return out

    k = RANK + 16
    stack_memory = stack.untyped_storage().data_ptr()
    with Sizes():
        sk = randomized.sketch(stack, k, starts, check_later=warm, generator=torch.Generator().manual_seed(1))
    assert largest and max(largest) < stack.numel()
    # and the scale is right: the same sketch of the same weights at unit scale, times 1e-30
    unit = randomized.sketch(torch.stack(weights).mT, k, starts, check_later=warm, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sk.G, unit.G, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sk.scale, unit.scale * 1e-30, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_warm_refresh_makes_no_float64_copy_of_the_weights(dtype):
    """The energy ||W||_F^2 a commit compares its Ritz values with was a float64 norm, which
    casts its input inside the op: a float64 copy of every stack (twice its float32 bytes)
    at every refresh.  Now nothing a warm refresh allocates is larger than the stack in
    float32 (the stack itself; a bf16 stack's float32 copy for the sketch).  Random-init
    weights: no member takes the float64 Rayleigh-Ritz step, whose float64 stack is by design."""
    from torch.profiler import ProfilerActivity, profile

    n = 4
    weights, configs, states = _targets(n, seed=3)
    weights = [w.to(dtype) for w in weights]
    refresh_slices_(weights, states, configs, method="randomized")  # cold
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        assert all(refresh_slices_([w * 0.98 for w in weights], states, configs, method="randomized"))
    largest = max(e.self_cpu_memory_usage for e in prof.events())
    assert 0 < largest <= 4 * n * D1 * D2
    for w, s in zip(weights, states):  # and the tail energy it stored is right
        sv = torch.linalg.svdvals(w.double() * 0.98)
        assert abs(float(s["tail_energy"]) - float(sv[RANK:].square().sum() / sv.square().sum())) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("tall", [False, True])
def test_stack_energy_is_the_float64_frobenius_norm_where_float32_squares_hold(dtype, tall):
    gen = torch.Generator().manual_seed(4)
    exponents = (-30, -12, 0, 12, 30)
    weights = [(torch.randn(D2, D1, generator=gen) * 10.0**e).to(dtype) for e in exponents]
    stack = torch.stack(weights).mT if tall else torch.stack(weights)  # (a transposed view when tall)
    energy = _sketched._energy(stack)
    expected = torch.stack([w.double().square().sum() for w in weights])
    torch.testing.assert_close(energy[1:4], expected[1:4], rtol=1e-6, atol=0)
    if dtype != torch.float64:  # (float32 squares: 1e-60 underflows, 1e60 overflows; _checked_energy redoes them)
        assert energy[0] < _sketched._FAST_ENERGY_MIN and energy[4].isinf()
    else:
        torch.testing.assert_close(energy, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scale", [1e-25, 1e25])
def test_weights_of_extreme_scale_get_their_tail_energy_from_a_float64_norm(method, scale, monkeypatch):
    """Where float32 squares would underflow or overflow, the commit's energy comes from a
    float64 norm of the member: the tail energy and the commit are those of the weights at
    unit scale.  Only those members are redone (one float64 norm each, a host sync): not the
    others of their stack, nor a zero weight, whose energy is 0 in any precision, nor one with
    non-finite weights, skipped anyway."""
    weights, configs, states = _targets(6, seed=5)
    for w in weights[:4:2]:
        w.mul_(scale)
    weights[4].zero_()
    redone = []
    float64_energy = _sketched._float64_energy
    monkeypatch.setattr(_sketched, "_float64_energy", lambda W: redone.append(W.shape) or float64_energy(W))
    unit_states = [new_slice_state(D1, D2) for _ in weights[:5]]
    for step in range(3):  # cold, then warm
        if step == 0:
            assert all(refresh_slices_(weights, states, configs, method=method))
            weights[5][0, 0] = math.inf  # (now in a warm stack, skipped with a warning: its energy is not needed)
        else:
            with pytest.warns(RuntimeWarning, match="non-finite"):
                assert refresh_slices_(_shrunk(weights, step), states, configs, method=method) == [True] * 5 + [False]
        refresh_slices_(_shrunk([w / scale if j in (0, 2) else w for j, w in enumerate(weights[:5])], step),
                        unit_states, configs[:5], method=method)
    for j, (s, u) in enumerate(zip(states[:4], unit_states)):
        assert float(s["tail_energy"]) > 0.5  # (random weights at 20% ranks: most energy in the tail)
        assert abs(float(s["tail_energy"]) - float(u["tail_energy"])) < 1e-5, j
        assert s["sigma"].shape == u["sigma"].shape
    assert float(states[4]["tail_energy"]) == 0.0
    assert len(redone) == 2 * 2  # (the two extreme members at each warm refresh; the first is exact)



@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scale", [1e-25, 1e25])
def test_extreme_scale_members_of_the_float64_rayleigh_ritz_step_get_a_float64_energy(monkeypatch, method, scale):
    """One dominant direction (sigma_{r+1} some 5e-3 sigma_1) sends warm members to the float64
    Rayleigh-Ritz step (REFINE), whose commit takes its energy from its own float64 stack: the
    stack's energy is inf or 0 for members of extreme scale (float32 squares; _checked_energy
    redoes it in the first commit's rows only), and taken from there the tail energy was wrong."""
    gen = torch.Generator().manual_seed(5)
    weights = []
    for _ in range(4):
        W = torch.randn(D1, D2, generator=gen)
        u, v = torch.randn(D1, generator=gen), torch.randn(D2, generator=gen)
        weights.append(W + 300 * float(torch.linalg.svdvals(W)[0]) * torch.outer(u / u.norm(), v / v.norm()))
    configs = [SliceConfig(f"t{i}", RANK) for i in range(4)]
    states, unit_states = ([new_slice_state(D1, D2) for _ in weights] for _ in range(2))
    precise = []
    commit = _sketched.C.commit_sketch
    monkeypatch.setattr(_sketched.C, "commit_sketch",
                        lambda *a, **kw: precise.extend(a[1] if kw.get("precise") else []) or commit(*a, **kw))
    for step in range(3):  # cold, then warm
        refresh_slices_([w * scale if j % 2 == 0 else w for j, w in enumerate(_shrunk(weights, step))], states,
                        configs, method=method)
    assert {0, 2} <= set(precise)  # (the extreme members took the float64 step)
    for step in range(3):
        refresh_slices_(_shrunk(weights, step), unit_states, configs, method=method)
    for j, (s, u) in enumerate(zip(states, unit_states)):
        assert 0 < float(u["tail_energy"]) < 1e-3  # (the dominant direction holds nearly all of it)
        assert abs(float(s["tail_energy"]) - float(u["tail_energy"])) < 1e-2 * float(u["tail_energy"]), j
        assert s["sigma"].shape == u["sigma"].shape


def test_exact_refresh_of_several_shape_groups_skips_only_the_nonfinite_target():
    """The exact path reads every group's finiteness flags together: each flag must land on
    its own target (the groups are of different sizes, the bad target is in the second)."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(D1, D2)] * 2 + [(D2, D1)] * 3 + [(40, 30)]
    weights = [torch.randn(*shape, generator=gen) for shape in shapes]
    configs = [SliceConfig(f"t{i}", RANK) for i in range(len(shapes))]
    states = [new_slice_state(*shape) for shape in shapes]
    weights[3][1, 2] = float("inf")
    with pytest.warns(RuntimeWarning, match="'t3' has non-finite"):
        done = refresh_slices_(weights, states, configs, method="exact")
    assert done == [i != 3 for i in range(len(shapes))]
    assert [int(s["refreshes"]) for s in states] == [int(i != 3) for i in range(len(shapes))]


@pytest.mark.parametrize("method", METHODS + ["exact"])
def test_a_group_larger_than_max_stack_bytes_is_refreshed_in_bounded_stacks(method, monkeypatch):
    """A stack copies its members' weights: a group whose stack would exceed
    SketchOptions.max_stack_bytes is cut into runs that fit (LLaMA-7B's MLP group would take
    17 GB at once). No op of the refresh makes a tensor larger than the budget, and the
    factors still match the exact refresh's."""
    from q3r import _refresh_sketched, reference
    from q3r.refresh import SketchOptions, operator_of

    n, per_stack = 7, 3
    weights, configs, states = _targets(n, seed=9)
    weights = _shrunk(weights, 0)
    opts = SketchOptions(max_stack_bytes=per_stack * D1 * D2 * 4 + 100)
    exact = [new_slice_state(D1, D2) for _ in range(n)]
    runs = []
    real_sketch, real_anchor = _refresh_sketched._sketch_stack_, reference.anchor_factors
    monkeypatch.setattr(_refresh_sketched, "_sketch_stack_",
                        lambda w, st, attempt, o: runs.append(len(st.members)) or real_sketch(w, st, attempt, o))
    monkeypatch.setattr(reference, "anchor_factors", lambda W: runs.append(W.shape[0]) or real_anchor(W))
    largest = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            largest.extend(t.numel() for t in (out if isinstance(out, (tuple, list)) else (out,))
                           if isinstance(t, torch.Tensor))
            return out

    for step in range(3):  # cold, then warm
        runs.clear()
        w = _shrunk(weights, step)
        with Sizes():
            assert all(refresh_slices_(w, states, configs, method=method, options=opts))
        assert sorted(runs)[-1] == per_stack and sum(runs) >= n, runs  # (retries may add runs)
        assert max(largest) * 4 <= opts.max_stack_bytes
        monkeypatch.setattr(reference, "anchor_factors", real_anchor)
        refresh_slices_(w, exact, configs, method="exact")
        monkeypatch.setattr(reference, "anchor_factors", lambda W: runs.append(W.shape[0]) or real_anchor(W))
        gen = torch.Generator().manual_seed(step)
        for f, e in zip(states, exact):
            X = torch.randn(D1, D2, generator=gen)
            Rf, Re = (reference.apply_reweighting(X, *operator_of(s)) for s in (f, e))
            assert float((Rf - Re).norm() / Re.norm()) <= 1e-3


def test_orthonormalize_nearly_parallel_columns_is_not_left_to_one_pass():
    # two columns at an angle of ~1e-3 rad: the normalized Gram matrix's off-diagonal row sums
    # pass 1 (outside the one-pass bound of 1/2), and one Cholesky-QR pass leaves Q^T Q off the
    # identity by ~0.3; the second pass (or Householder QR) must make it orthonormal
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(1, 200, 1, generator=gen)
    Y = torch.cat([base + 1e-3 * torch.randn(1, 200, 1, generator=gen) for _ in range(2)]
                  + [torch.randn(1, 200, 6, generator=gen)], dim=-1)
    Q = randomized.orthonormalize(Y)
    assert float((Q.mT @ Q - torch.eye(8)).abs().max()) < 1e-5
    assert float((Y - Q @ (Q.mT @ Y)).norm() / Y.norm()) < 1e-5  # and it still spans Y


@pytest.mark.parametrize("method", METHODS + ["exact"])
def test_targets_larger_than_max_stack_bytes_are_refreshed_one_per_stack(method):
    # at least one target per stack (OrientedWeights.chunks): a budget below one target's size
    # refreshes each alone rather than none
    from q3r.refresh import SketchOptions

    weights, configs, states = _targets(3, seed=10)
    opts = SketchOptions(max_stack_bytes=D1 * D2)  # a quarter of one float32 target
    assert refresh_slices_(weights, states, configs, method=method, options=opts) == [True] * 3
    assert [int(s["refreshes"]) for s in states] == [1, 1, 1]

"""A refresh decomposes a tall target as its transpose (q3r._orientation): d x 4d and 4d x d
targets share one stack, their factors come back in the target's own orientation, and
checkpoints from before the warm-start tail moved to the longer side still load."""

import io

import pytest
import torch

import q3r
from q3r import _native, _refresh_sketched
from q3r.refresh import SliceConfig, new_slice_state, refresh_slices_, upgrade_state
from helpers import TinyViT
from test_randomized_refresh import D1, D2, RANK, operator_error, spectrum_case

FAST = ["randomized"] + (["native"] if _native.available("cpu") else [])


def _tall_and_wide(gen):
    """Two tall D1 x D2 targets and two wide ones (transposes of such), trained-like spectra."""
    tall = [spectrum_case("trained_decay", gen) for _ in range(2)]
    wide = [spectrum_case("trained_decay", gen).T.contiguous() for _ in range(2)]
    return [tall[0], wide[0], tall[1], wide[1]]


@pytest.mark.parametrize("method", FAST)
def test_transposed_shapes_share_one_stack_and_match_the_exact_refresh(method, monkeypatch):
    gen = torch.Generator().manual_seed(31)
    weights = _tall_and_wide(gen)
    configs = [SliceConfig(f"t{i}", RANK) for i in range(len(weights))]
    fast = [new_slice_state(*w.shape) for w in weights]
    exact = [new_slice_state(*w.shape) for w in weights]
    stacked = []
    real = _refresh_sketched._sketch_stack_
    monkeypatch.setattr(_refresh_sketched, "_sketch_stack_",
                        lambda w, st, attempt, opts: stacked.append(sorted(st.members)) or real(w, st, attempt, opts))
    for refresh in range(4):  # cold, then warm on drifting weights
        stacked.clear()
        assert all(refresh_slices_(weights, fast, configs, method=method))
        refresh_slices_(weights, exact, configs, method="exact")
        assert stacked[0] == [0, 1, 2, 3], stacked  # one stack of all four (retries may follow)
        for w, f, e in zip(weights, fast, exact):
            d1, d2 = w.shape
            k = f["sigma"].shape[0]
            assert f["U"].shape == (d1, k) and f["V"].shape == (d2, k)
            assert f["tail"].shape[0] == max(d1, d2) and f["tail"].shape[1] > 0
            assert operator_error(f, e, torch.randn(d1, d2, generator=gen)) <= 1e-3
            assert abs(float(f["sigma_next"]) - float(e["sigma_next"])) <= 1e-2 * float(e["sigma_next"])
            # the factors are the target's, not its transpose's: U^T W V = diag(sigma)
            torch.testing.assert_close(f["U"].T @ w @ f["V"], torch.diag(f["sigma"]), rtol=0, atol=2e-4 * float(f["sigma"][0]))
        weights = [w + 3e-3 * w.norm() / w.numel() ** 0.5 * torch.randn(w.shape, generator=gen) for w in weights]


def test_exact_refresh_of_a_tall_target_keeps_its_orientation():
    gen = torch.Generator().manual_seed(32)
    w = spectrum_case("trained_decay", gen)
    state = new_slice_state(*w.shape)
    refresh_slices_([w], [state], [SliceConfig("t", RANK)], method="exact")
    U, S, Vh = torch.linalg.svd(w.double())
    k = state["sigma"].shape[0]
    torch.testing.assert_close(state["sigma"].double(), S[:k], rtol=1e-5, atol=0)
    torch.testing.assert_close((state["U"].double() @ state["U"].double().T), U[:, :k] @ U[:, :k].T, rtol=0, atol=1e-4)
    torch.testing.assert_close((state["V"].double() @ state["V"].double().T), Vh[:k].T @ Vh[:k], rtol=0, atol=1e-4)
    assert state["tail"].shape[0] == D1 > D2


def test_upgrade_state_keeps_a_wide_targets_V_tail_and_drops_a_tall_ones():
    wide = {"V": torch.zeros(50, 3), "V_tail": torch.randn(50, 4)}
    kept = wide["V_tail"]
    assert upgrade_state(wide, 20, 50)["tail"] is kept and "V_tail" not in wide
    tall = {"V": torch.zeros(20, 3), "V_tail": torch.randn(20, 4)}
    upgrade_state(tall, 50, 20)
    assert tall["tail"].shape == (50, 0) and "V_tail" not in tall
    current = {"V": torch.zeros(20, 3), "tail": torch.randn(50, 4)}
    assert upgrade_state(dict(current), 50, 20)["tail"] is current["tail"]  # this version's layout: unchanged


def _old_layout(slices):
    """A checkpoint's slice states as q3r before 49887cd wrote them: "V_tail" (d2, j) instead of "tail"."""
    old = []
    for s in slices:
        s = dict(s)
        tail = s.pop("tail")
        d2 = s["V"].shape[0]
        s["V_tail"] = tail if tail.shape[0] == d2 else torch.randn(d2, tail.shape[1])
        old.append(s)
    return old


INCLUDE = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


def test_q3r_loads_a_checkpoint_with_the_old_tail_and_keeps_training():
    torch.manual_seed(6)
    model = TinyViT()
    reg = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=3), lmbda=0.2, steps=2)
    for _ in range(3):
        reg.penalty()
    saved = reg.state_dict()
    saved["targets"] = {name: _old_layout(slices) for name, slices in saved["targets"].items()}
    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    reg2 = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=3), lmbda=0.2, steps=2)
    reg2.load_state_dict(torch.load(buf, weights_only=True))
    shapes = {t.name: [(d1, d2) for d1, d2 in q3r.targets.slice_shapes(t.param.shape, t.slice_dim, t.slices)]
              for t in reg2.targets}
    saw_tall = False
    for name, slices in reg2.state.items():
        for s, (d1, d2) in zip(slices, shapes[name]):
            assert "V_tail" not in s and s["tail"].shape[0] == max(d1, d2)
            saw_tall |= d1 > d2
    assert saw_tall  # fc1 is 48 x 24
    for _ in range(3):  # refreshes from the upgraded states
        assert torch.isfinite(reg2.penalty())
    for _ in range(3):
        assert torch.equal(reg.penalty(), reg2.penalty())


def test_adamq3r_loads_a_checkpoint_with_the_old_tail():
    torch.manual_seed(7)
    model = TinyViT()
    targets = q3r.find_targets(model, INCLUDE, target_rank=3)
    opt = q3r.AdamQ3R(q3r.param_groups(model, targets, lmbda=0.1, steps=2), lr=1e-2)
    x = torch.randn(6, 4, 5)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    saved = opt.state_dict()
    for st in saved["state"].values():
        if "q3r" in st:  # (and as a list, as state_dict wrote them then)
            st["q3r"] = _old_layout(st["q3r"].values())
    opt2 = q3r.AdamQ3R(q3r.param_groups(model, targets, lmbda=0.1, steps=2), lr=1e-2)
    opt2.load_state_dict(saved)
    for p, st in opt2.state.items():
        for s in st.get("q3r", []):
            assert "V_tail" not in s and s["tail"].shape[0] == max(s["U"].shape[0], s["V"].shape[0])
    for _ in range(3):
        opt2.zero_grad()
        model(x).square().mean().backward()
        opt2.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_tail_that_does_not_fit_is_rejected_on_load_without_change():
    torch.manual_seed(8)
    model = TinyViT()
    reg = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=3), lmbda=0.2, steps=2)
    reg.penalty()
    saved = reg.state_dict()
    name = next(n for n in saved["targets"] if n.endswith("fc1.weight"))  # 48 x 24: tail (48, j)
    saved["targets"][name][0]["tail"] = torch.zeros(24, 3)  # the short side: an old V_tail renamed by hand
    fresh = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=3), lmbda=0.2, steps=2)
    before = {k: [dict(s) for s in v] for k, v in fresh.state.items()}
    with pytest.raises(ValueError, match="tail of shape \\(24, 3\\)"):
        fresh.load_state_dict(saved)
    assert fresh.num_steps == 0 and all(before[k][0]["tail"] is fresh.state[k][0]["tail"] for k in before)

    targets = q3r.find_targets(model, INCLUDE, target_rank=3)
    opt = q3r.AdamQ3R(q3r.param_groups(model, targets, lmbda=0.1, steps=2), lr=1e-2)
    model(torch.randn(6, 4, 5)).square().mean().backward()
    opt.step()
    osd = opt.state_dict()
    fc1 = next(st for st in osd["state"].values() if "q3r" in st and st["q3r"]["0"]["U"].shape[0] == 48)
    fc1["q3r"]["0"]["tail"] = torch.zeros(24, 3)
    opt2 = q3r.AdamQ3R(q3r.param_groups(model, targets, lmbda=0.1, steps=2), lr=1e-2)
    with pytest.raises(ValueError, match="tail of shape \\(24, 3\\)"):
        opt2.load_state_dict(osd)
    assert not opt2.state


def test_upgrade_state_keeps_a_square_targets_V_tail():
    # a square target is decomposed as it is (not tall), so its old V_tail (d2, j) is still
    # its warm-start tail: dropping it would cost its next refresh the warm columns
    square = {"V": torch.zeros(30, 3), "V_tail": torch.randn(30, 4)}
    kept = square["V_tail"]
    assert upgrade_state(square, 30, 30)["tail"] is kept and "V_tail" not in square


def test_a_checkpoint_saved_before_the_first_refresh_loads_into_a_fresh_q3r():
    """A fresh state's (empty) warm-start tail lies on the longer side like a refreshed one's,
    so a checkpoint taken before the first refresh passes the loaders' tail check (fc1 is tall,
    fc2 wide).  (Kills the mutant that made new_slice_state's tail (min(d1, d2), 0).)"""
    torch.manual_seed(7)
    model = TinyViT()
    reg = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=3), lmbda=0.2, steps=2)
    buf = io.BytesIO()
    torch.save(reg.state_dict(), buf)
    buf.seek(0)
    reg2 = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=3), lmbda=0.2, steps=2)
    reg2.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(3):
        assert torch.equal(reg.penalty(), reg2.penalty())

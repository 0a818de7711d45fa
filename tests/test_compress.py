"""q3r.compress: factored modules reproduce the SVD-truncated dense model; full rank is exact."""

import copy
import sys
import warnings

import pytest
import torch
from torch import nn

import q3r
from q3r.compress import (
    LowRankEmbedding,
    LowRankFusedLinear,
    LowRankLinear,
    compress,
    count_parameters,
    load_compressed,
    save_compressed,
    svd_truncate,
    truncate_weights_,
)
from q3r.targets import uncompiled


class Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D (weight (nx, nf), y = x @ W + b), re-declared so the test
    needs no transformers; compress recognizes it by class name and ``nf``."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads  # makes find_targets slice qkv into Q, K, V rows
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v)


class GPTBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.c_attn = Conv1D(3 * dim, dim)
        self.c_proj = Conv1D(dim, dim)

    def forward(self, x):
        q, k, v = self.c_attn(x).split(x.shape[-1], dim=-1)
        return self.c_proj(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)


class Toy(nn.Module):
    def __init__(self, dim=24):
        super().__init__()
        self.attn = Attention(dim, num_heads=2)
        self.gpt = GPTBlock(dim)
        self.fc1 = nn.Linear(dim, 40)
        self.fc2 = nn.Linear(40, 7)

    def forward(self, x):
        x = x + self.attn(x)
        x = x + self.gpt(x)
        return self.fc2(torch.relu(self.fc1(x)))


PATTERNS = ["attn.qkv", "gpt.c_attn", "gpt.c_proj", "fc1"]


@pytest.fixture
def model_and_input():
    torch.manual_seed(0)
    return Toy().double().eval(), torch.randn(3, 5, 24, dtype=torch.double)


def test_svd_truncate_is_the_best_rank_r_approximation():
    torch.manual_seed(1)
    W = torch.randn(17, 11, dtype=torch.double)
    up, down = svd_truncate(W, 4)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(up @ down, U[:, :4] @ torch.diag(S[:4]) @ Vh[:4])
    # balanced: sqrt(sigma) on each side (the factors of a layer trained further start alike)
    torch.testing.assert_close(up.norm(dim=0), S[:4].sqrt())
    torch.testing.assert_close(down.norm(dim=1), S[:4].sqrt())


@pytest.mark.parametrize("fraction", [0.6, 0.4, 0.2, 0.1])
def test_compressed_outputs_equal_truncated_dense(model_and_input, fraction):
    model, x = model_and_input
    targets = q3r.find_targets(model, PATTERNS)
    dense = truncate_weights_(copy.deepcopy(model), PATTERNS, fraction=fraction)
    small, report = compress(model, targets, fraction=fraction, copy=True)
    torch.testing.assert_close(small(x), dense(x))
    assert isinstance(small.attn.qkv, LowRankFusedLinear) and isinstance(small.gpt.c_attn, LowRankFusedLinear)
    assert isinstance(small.fc1, LowRankLinear) and isinstance(small.gpt.c_proj, LowRankLinear)
    assert isinstance(model.attn.qkv, nn.Linear)  # copy=True leaves the original alone
    # Each slice gets r = floor(f d1 d2 / (d1 + d2)) and the counts add up.
    for s in report.slices:
        d1, d2 = s.shape
        assert s.rank == int(fraction * d1 * d2 // (d1 + d2)) and s.kept_params == s.rank * (d1 + d2)
    assert report.model_params_after == count_parameters(small)
    assert report.model_params_before - report.model_params_after == report.target_params_before - report.target_params_after
    assert report.target_fraction_kept <= fraction
    assert report.target_fraction_kept == report.target_params_after / report.target_params_before
    assert "whole model" in report.table() and "attn.qkv.weight[q]" in report.table()


def test_full_rank_equals_original_and_bias_is_kept(model_and_input):
    model, x = model_and_input
    expected = model(x)
    small, _ = compress(model, PATTERNS, rank=24)
    assert small is model  # in place by default
    torch.testing.assert_close(small(x), expected)
    assert small.attn.qkv.bias is not None and small.gpt.c_attn.bias is not None


def test_fraction_one_keeps_dense_weights(model_and_input):
    model, x = model_and_input
    expected = model(x)
    small, report = compress(model, PATTERNS, fraction=1.0)
    assert isinstance(small.attn.qkv, nn.Linear)
    assert report.model_params_after == report.model_params_before
    torch.testing.assert_close(small(x), expected)


def test_target_rank_is_used_when_neither_given(model_and_input):
    model, _ = model_and_input
    targets = q3r.find_targets(model, ["fc1"], target_rank=3)
    small, report = compress(model, targets)
    assert small.fc1.rank == 3 and report.slices[0].rank == 3


def test_partial_slices_leave_gaps_dense():
    torch.manual_seed(2)
    lin = nn.Sequential(nn.Linear(10, 12)).double()
    x = torch.randn(4, 10, dtype=torch.double)
    for slice_dim, cuts in [(0, [(2, 6), (8, 12)]), (1, [(0, 4), (5, 9)])]:
        model = copy.deepcopy(lin)
        targets = q3r.find_targets(model, ["0"], target_rank=1, slices={"0": (slice_dim, cuts)})
        dense = truncate_weights_(copy.deepcopy(model), targets, rank=2)
        small, _ = compress(model, targets, rank=2)
        assert isinstance(small[0], LowRankFusedLinear)
        torch.testing.assert_close(small(x), dense(x))
        torch.testing.assert_close(small[0].dense_weight(), dense[0].weight)


def test_save_and_load_roundtrip(tmp_path, model_and_input):
    model, x = model_and_input
    fresh = copy.deepcopy(model)
    small, _ = compress(model, PATTERNS, fraction=0.3)
    path = tmp_path / "small.safetensors"
    save_compressed(small, path, metadata={"fraction": 0.3})
    loaded = load_compressed(fresh, path)
    torch.testing.assert_close(loaded(x), small(x))
    assert count_parameters(loaded) == count_parameters(small)


def test_a_ddp_wrapper_is_refused_by_compress_and_load_and_saved_under_the_wrapped_names(tmp_path, model_and_input):
    """DDP's reducer keeps the parameters it was built with: factored layers swapped in under it
    would train with gradients never averaged across ranks. compress and load_compressed refuse
    the wrapper (the model unchanged) and say to pass model.module; save_compressed saves the
    model it wraps, under names that load into a dense model."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, x = model_and_input
    fresh = copy.deepcopy(model)
    small, _ = compress(copy.deepcopy(model), PATTERNS, fraction=0.3)
    path = tmp_path / "small.safetensors"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        save_compressed(DDP(small), path)
        assert not any(k.startswith("module.") for k in _safetensors_keys(path))
        ddp = DDP(model)
        for call in (lambda: compress(ddp, PATTERNS, fraction=0.3), lambda: compress(ddp, PATTERNS, fraction=0.3, copy=True),
                     lambda: load_compressed(ddp, path)):  # (a file that loads into ddp.module)
            with pytest.raises(TypeError, match=r"DistributedDataParallel wrapper.*pass the wrapped model \(model.module\)"):
                call()
            assert all(type(m) in (nn.Linear, Conv1D) for m in model.modules() if hasattr(m, "weight"))
        torch.testing.assert_close(load_compressed(fresh, path)(x), small(x))
    finally:
        dist.destroy_process_group()


def _safetensors_keys(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def _uncompiled_output(model, x):
    """model(x) with its compiled submodules run as the plain modules they wrap (no compile)."""
    with uncompiled(model) as plain:
        return plain(x)


def test_a_compiled_model_compresses_saves_and_loads_under_its_uncompiled_names(tmp_path, model_and_input):
    """torch.compile wraps a model (or a block, or a layer) in an OptimizedModule whose names
    start with _orig_mod.: a model trained compiled must save what the plain model saves and
    load into either. (No compiled forward runs: the wrappers are lazy, and _orig_mod is the
    module itself.)"""
    model, x = model_and_input
    plain_file, compiled_file = tmp_path / "plain.safetensors", tmp_path / "compiled.safetensors"
    reference, _ = compress(copy.deepcopy(model), PATTERNS, fraction=0.3)
    save_compressed(reference, plain_file)

    twin = copy.deepcopy(model)
    twin.gpt = torch.compile(twin.gpt)  # a compiled block: its layers are compressed inside it
    twin.fc1 = torch.compile(twin.fc1)  # a compiled layer: replaced by an (uncompiled) factored one
    compiled = torch.compile(twin)
    targets = q3r.find_targets(compiled, PATTERNS)
    small, _ = compress(compiled, targets, fraction=0.3)
    assert small is compiled and isinstance(twin.fc1, LowRankLinear)
    assert type(twin.gpt).__name__ == "OptimizedModule" and isinstance(twin.gpt._orig_mod.c_attn, LowRankFusedLinear)
    torch.testing.assert_close(_uncompiled_output(twin, x), reference(x))
    save_compressed(small, compiled_file)
    assert _safetensors_keys(compiled_file) == _safetensors_keys(plain_file)
    assert not any("_orig_mod" in k for k in _safetensors_keys(compiled_file))
    assert type(twin.gpt).__name__ == "OptimizedModule"  # (saving put the wrapper back)

    plain = load_compressed(copy.deepcopy(model), compiled_file)  # trained compiled, deployed plain
    torch.testing.assert_close(plain(x), reference(x))
    fresh = copy.deepcopy(model)
    fresh.gpt = torch.compile(fresh.gpt)
    fresh_compiled = torch.compile(fresh)
    assert load_compressed(fresh_compiled, plain_file) is fresh_compiled
    assert type(fresh.gpt).__name__ == "OptimizedModule" and isinstance(fresh.gpt._orig_mod.c_proj, LowRankLinear)
    torch.testing.assert_close(_uncompiled_output(fresh, x), reference(x))


def test_a_failed_load_into_a_compiled_model_leaves_its_wrappers_and_layers(tmp_path, model_and_input):
    model, _ = model_and_input
    small, _ = compress(copy.deepcopy(model), PATTERNS, fraction=0.3)
    path = tmp_path / "small.safetensors"
    save_compressed(small, path)
    other = copy.deepcopy(model)
    other.extra = nn.Linear(2, 2).double()  # not in the file: refused after the layers were swapped in
    wrapper = other.fc1 = torch.compile(other.fc1)
    with pytest.raises(ValueError, match="extra.weight: missing from the file"):
        load_compressed(torch.compile(other), path)
    assert other.fc1 is wrapper and type(wrapper._orig_mod) is nn.Linear
    assert type(other.attn.qkv) is nn.Linear and type(other.gpt.c_attn) is Conv1D


def test_load_rejects_plain_safetensors(tmp_path, model_and_input):
    from safetensors.torch import save_model

    model, _ = model_and_input
    save_model(model, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="save_compressed"):
        load_compressed(copy.deepcopy(model), tmp_path / "plain.safetensors")


def test_load_rejects_a_file_that_is_not_safetensors_naming_it(tmp_path, model_and_input):
    # a torch.save checkpoint passed by mistake raised safetensors' own
    # "SafetensorError: Error while deserializing header: header too large", naming neither
    model, _ = model_and_input
    torch.save(model.state_dict(), tmp_path / "model.pt")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"model.pt is not a safetensors file written by q3r.save_compressed"):
        load_compressed(model, tmp_path / "model.pt")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs, error", [
    (dict(fraction=0.0), ValueError),
    (dict(fraction=1.5), ValueError),
    (dict(rank=25), ValueError),
    (dict(rank=2.5), TypeError),
    (dict(fraction=0.5, rank=2), ValueError),
])
def test_bad_arguments_fail_before_any_change(model_and_input, kwargs, error):
    model, _ = model_and_input
    with pytest.raises(error):
        compress(model, PATTERNS, **kwargs)
    assert isinstance(model.attn.qkv, nn.Linear) and isinstance(model.fc1, nn.Linear)


def test_compressed_model_trains_and_keeps_bf16():
    torch.manual_seed(3)
    model = Toy().to(torch.bfloat16)
    small, _ = compress(model, PATTERNS, fraction=0.4)
    assert small.fc1.up.dtype == torch.bfloat16
    small(torch.randn(2, 5, 24, dtype=torch.bfloat16)).float().sum().backward()
    assert small.attn.qkv.blocks[0].up.grad is not None


def test_a_module_shared_by_two_parents_is_replaced_under_both(tmp_path):
    torch.manual_seed(0)
    shared = nn.Linear(32, 32)
    model = nn.Module()
    model.a, model.b = shared, shared  # (ALBERT-style sharing)
    x = torch.randn(4, 32)

    def forward(m):
        return m.b(torch.relu(m.a(x)))

    twin = truncate_weights_(copy.deepcopy(model), ["a"], rank=4)
    small, report = compress(model, ["a"], rank=4)
    assert isinstance(small.a, LowRankLinear) and small.b is small.a
    torch.testing.assert_close(forward(small), forward(twin), rtol=1e-5, atol=1e-6)
    assert count_parameters(small) == 4 * 64 + 32
    # saved and loaded into a fresh model: rebuilt under both names, one module again
    pytest.importorskip("safetensors")
    path = tmp_path / "shared.safetensors"
    save_compressed(small, path)
    fresh = nn.Module()
    fresh.a = fresh.b = nn.Linear(32, 32)
    load_compressed(fresh, path)
    assert isinstance(fresh.a, LowRankLinear) and fresh.b is fresh.a
    torch.testing.assert_close(forward(fresh), forward(small))
    # found under its second name too (named_modules lists a shared module under its first
    # only: "match no module of the model"), and one target under both
    other = nn.Module()
    other.a = other.b = nn.Linear(32, 32)
    assert [t.name for t in q3r.find_targets(other, ["b"])] == ["b.weight"]
    assert [t.name for t in q3r.find_targets(other, ["a", "b"])] == ["a.weight"]
    small_b, _ = compress(other, ["b"], rank=4)
    assert isinstance(small_b.a, LowRankLinear) and small_b.b is small_b.a


def test_tied_weights_of_two_modules_are_refused_before_any_change():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    model[2].weight = model[0].weight
    with pytest.raises(ValueError, match=r"also the weight of \['2'\] \(tied weights\)"):
        compress(model, ["0"], rank=4)
    assert isinstance(model[0], nn.Linear) and model[2].weight is model[0].weight


def test_multihead_attention_out_proj_is_refused():
    mha = nn.Module()
    mha.attn = nn.MultiheadAttention(16, 2)
    with pytest.raises(TypeError, match="MultiheadAttention"):
        compress(mha, ["attn.out_proj"], rank=4)
    assert isinstance(mha.attn.out_proj, nn.Linear)


def test_a_bad_target_late_in_the_list_leaves_the_model_untouched():
    model = nn.Sequential(nn.Linear(16, 16), nn.Embedding(20, 16, max_norm=1.0))
    targets = q3r.find_targets(model, ["0", "1"], target_rank=4)
    with pytest.raises(TypeError, match="nn.Embedding with max_norm=1.0"):
        compress(model, targets, rank=4)
    assert isinstance(model[0], nn.Linear)


def test_patterns_with_a_rank_or_fraction_are_not_held_to_the_default_target_rank():
    """A 64 -> 4 head has no rank at the default target_rank 0.2, but the caller gave its own."""
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    for kwargs, ranks in ((dict(rank=2), [2, 2]), (dict(fraction=0.5), [10, 1]), (dict(fraction=1.0), [None, None])):
        _, report = compress(model, ["0", "2"], copy=True, **kwargs)
        assert [s.rank for s in report.slices] == ranks, kwargs
    with pytest.raises(ValueError, match=r"fraction=0\.01 keeps no rank"):
        compress(model, ["0", "2"], fraction=0.01)


def test_a_frozen_layer_stays_frozen():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8))
    model[0].requires_grad_(False)
    small, _ = compress(model, ["0", "1"], rank=4)
    assert [p.requires_grad for p in small[0].parameters()] == [False] * 3
    assert all(p.requires_grad for p in small[1].parameters())


def _mlp(hidden=16, out=10, seed=0, hidden2=None):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, hidden), nn.ReLU(), nn.Linear(hidden2 or hidden, out))


def _snapshot(model):
    return str(model), {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, snapshot):
    text, state = snapshot
    assert str(model) == text and state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("build, match", ids=["duplicate", "overlap", "out of bounds"], argvalues=[
    (lambda m: q3r.find_targets(m, ["0"]) + q3r.find_targets(m, ["0", "2"]), r"target 0\.weight is named twice"),
    (lambda m: [q3r.Target("0.weight", m[0].weight), q3r.Target("2.weight", m[2].weight, 1, [(0, 10), (8, 16)])],
     r"of 2\.weight overlap"),
    (lambda m: [q3r.Target("0.weight", m[0].weight), q3r.Target("2.weight", m[2].weight, 1, [(0, 10), (10, 20)])],
     r"of 2\.weight is out of bounds"),
])
def test_a_duplicate_or_badly_sliced_target_late_in_the_list_leaves_the_model_untouched(build, match):
    model = _mlp()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        compress(model, build(model), rank=2)
    _assert_unchanged(model, before)


def test_truncate_weights_checks_every_rank_before_writing():
    model = _mlp()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"rank=12 is out of range for a 10x16 slice of 2\.weight"):
        truncate_weights_(model, ["0", "2"], rank=12)  # fine for 16x24, too large for 10x16
    _assert_unchanged(model, before)


@pytest.mark.parametrize("patterns, build, match", ids=["other layer", "other layer, bias fits", "extra layer",
                                                           "no module", "other target shape"], argvalues=[
    (["0"], lambda: _mlp(out=12, seed=1), r"2\.weight: \(10, 16\) in the file, \(12, 16\) in the model"),
    (["0"], lambda: _mlp(hidden2=12, seed=1), r"2\.weight: \(10, 16\) in the file, \(10, 12\) in the model"),
    (["0"], lambda: nn.Sequential(*_mlp(seed=1), nn.Linear(10, 5)), r"3\.weight: missing from the file"),
    (["2"], lambda: nn.Sequential(nn.Linear(24, 16), nn.ReLU()), r"the model has no module '2'"),
    (["0"], lambda: _mlp(hidden=20, seed=1), r"factored '0' of 24 -> 16 features .* the model's '0' is 24 -> 20"),
])
def test_load_compressed_into_another_architecture_leaves_the_model_unchanged(tmp_path, patterns, build, match):
    small, _ = compress(_mlp(), patterns, rank=3)
    save_compressed(small, tmp_path / "small.safetensors")
    model = build()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_compressed(model, tmp_path / "small.safetensors")
    _assert_unchanged(model, before)


def test_targets_found_on_a_model_of_another_size_are_refused():
    targets = q3r.find_targets(_mlp(hidden=48), ["0"])
    model = _mlp(hidden=20)
    with pytest.raises(ValueError, match=r"target 0\.weight has shape \(48, 24\), but the model's 0\.weight has shape \(20, 24\)"):
        compress(model, targets, rank=4)
    assert isinstance(model[0], nn.Linear)


def test_save_compressed_refuses_the_reserved_metadata_key(tmp_path):
    small, _ = compress(_mlp(), ["0"], rank=3)
    with pytest.raises(ValueError, match=r"metadata must not use the key 'q3r\.compressed'"):
        save_compressed(small, tmp_path / "small.safetensors", metadata={"q3r.compressed": "mine"})
    assert not (tmp_path / "small.safetensors").exists()


def test_a_folder_given_for_the_file_is_named_and_a_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    """A folder (a save_pretrained folder, say) got safetensors' "No such device (os error 19)"
    on load and "Is a directory" on save, naming no path. A save cut short (here: the writer
    raising after writing part of the file) must leave the previous file whole and no stray
    file behind, whatever the installed safetensors does."""
    import safetensors.torch

    small, _ = compress(_mlp(), ["0"], rank=3)
    with pytest.raises(ValueError, match=rf"save_compressed: {tmp_path} is a folder; give the path of the "):
        save_compressed(small, tmp_path)
    with pytest.raises(ValueError, match=rf"load_compressed: {tmp_path} is a folder"):
        load_compressed(_mlp(), tmp_path)
    assert not list(tmp_path.iterdir())
    path = tmp_path / "small.safetensors"
    save_compressed(small, path)
    good = path.read_bytes()

    def cut_short(model, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(good[: len(good) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_model", cut_short)
    with pytest.raises(OSError, match="No space left"):
        save_compressed(compress(_mlp(seed=1), ["0"], rank=3)[0], path)
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["small.safetensors"]


@pytest.mark.parametrize("fn", [compress, truncate_weights_])
@pytest.mark.parametrize("kwargs", [dict(fraction=0.3), dict(rank=2)])
def test_rank_rule_is_checked_when_fraction_or_rank_is_given(fn, kwargs):
    model = _mlp()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"rank_rule must be one of .*'bogus'"):
        fn(model, ["0"], rank_rule="bogus", **kwargs)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("fn", [compress, truncate_weights_])
def test_rank_rule_reference_applies_to_fraction_and_rank_as_in_training(fn):
    """fraction=f / rank=r under rank_rule="reference" cut where target_rank=f / r trained under
    it (int(f max), int(r max / min)); they were cut by the "params" rule, without a word."""
    model = nn.Sequential(nn.Linear(128, 32))  # a 32 x 128 weight
    for kwargs, expected in ((dict(fraction=0.2), 25), (dict(rank=2), 8)):  # int(0.2 * 128), int(2 * 128 / 32)
        trained = q3r.find_targets(model, ["0"], rank_rule="reference", target_rank=[*kwargs.values()][0])[0]
        assert q3r.reference.resolve_rank(trained.target_rank, 32, 128, "reference") == expected
        out = fn(model, ["0"], rank_rule="reference", **kwargs, **({"copy": True} if fn is compress else {}))
        if fn is compress:
            assert out[0][0].up.shape == (32, expected) and out[1].slices[0].rank == expected
        else:
            assert torch.linalg.matrix_rank(out[0].weight.double(), rtol=1e-5) == expected
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"resolves to rank 32 for a 32x128 matrix"):  # int(0.25 * 128) = min
        fn(model, ["0"], fraction=0.25, rank_rule="reference")
    _assert_unchanged(model, before)


@pytest.mark.parametrize("fn", [compress, truncate_weights_])
@pytest.mark.parametrize("kwargs, match", [
    (dict(fraction=0.005), r"fraction of 0\.weight resolves to rank 0 .*\(got fraction=0\.005, rank_rule='reference'\)"),
    (dict(rank=8), r"rank of 0\.weight resolves to rank 32 .*\(got rank=8, rank_rule='reference'\)"),
    (dict(rank=-1), r"rank of 0\.weight must be >= 1, got -1")])
def test_rank_rule_reference_errors_name_the_fraction_or_rank_given(fn, kwargs, match):
    """Under rank_rule="reference" a fraction= / rank= out of range was refused as
    "target_rank of 0.weight ... (got target_rank=0.01 ...)": a parameter the caller never gave."""
    model = nn.Sequential(nn.Linear(128, 32))  # a 32 x 128 weight: int(0.005 * 128) = 0, int(8 * 128 / 32) = 32
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match) as err:
        fn(model, ["0"], rank_rule="reference", **kwargs)
    assert "target_rank" not in str(err.value)
    _assert_unchanged(model, before)


def test_a_numpy_integer_rank_is_taken_as_training_takes_one(tmp_path):
    """rank=np.int64(3) (a sweep over np.arange) was refused, "rank must be an int", where
    find_targets' target_rank takes NumPy integers; it cuts as rank=3 does and saves and loads."""
    np = pytest.importorskip("numpy")
    model = _mlp()
    small, report = compress(model, ["0"], rank=np.int64(3), copy=True)
    assert type(small[0].rank) is int and small[0].up.shape == (16, 3) and report.slices[0].rank == 3
    torch.testing.assert_close(small[0].dense_weight(), compress(model, ["0"], rank=3, copy=True)[0][0].dense_weight())
    save_compressed(small, tmp_path / "small.safetensors")
    assert load_compressed(_mlp(), tmp_path / "small.safetensors")[0].rank == 3
    assert torch.linalg.matrix_rank(truncate_weights_(_mlp(), ["0"], rank=np.int32(2))[0].weight) == 2


def test_unclear_inputs_get_errors_naming_the_parameter_or_file(tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(TypeError, match="targets must be a list"):
        compress(_mlp(), None, rank=2)
    small, _ = compress(_mlp(), ["0"], rank=3)
    save_compressed(small, tmp_path / "small.safetensors")
    with pytest.raises(ValueError, match="the model has no module '0'"):
        load_compressed(nn.Sequential(), tmp_path / "small.safetensors")  # (a model without parameters)
    state = load_file(tmp_path / "small.safetensors")
    for i, damaged in enumerate(["{not json", '{"0": {"kind": "linear"}}', '["0"]']):
        path = tmp_path / f"damaged{i}.safetensors"
        save_file(state, path, metadata={"q3r.compressed": damaged})
        model = _mlp()
        before = _snapshot(model)
        with pytest.raises(ValueError, match=rf"damaged{i}\.safetensors: damaged 'q3r\.compressed' metadata"):
            load_compressed(model, path)
        _assert_unchanged(model, before)


def test_compress_and_load_compressed_keep_the_training_mode_of_the_replaced_modules(tmp_path):
    small, _ = compress(_mlp().eval(), ["0"], rank=3)
    assert isinstance(small[0], LowRankLinear) and not small[0].training
    small.train()
    save_compressed(small, tmp_path / "small.safetensors")
    loaded = load_compressed(_mlp().eval(), tmp_path / "small.safetensors")
    assert isinstance(loaded[0], LowRankLinear) and not loaded[0].training


def test_a_strict_load_refuses_a_file_with_tensors_the_model_lacks(tmp_path):
    small, _ = compress(_mlp(), ["0"], rank=3)
    small.extra = nn.Linear(2, 2)
    save_compressed(small, tmp_path / "small.safetensors")
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="extra.weight: not in the model"):
        load_compressed(model, tmp_path / "small.safetensors")
    assert isinstance(model[0], nn.Linear) and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert isinstance(load_compressed(model, tmp_path / "small.safetensors", strict=False)[0], LowRankLinear)


def test_a_non_strict_load_refuses_a_file_that_lacks_the_tensors_of_a_factored_module(tmp_path):
    # strict=False loads what matches by name, but a factored module the file's layout puts in
    # place of a dense layer has only the random init of its factors: a file without its
    # tensors swapped a trained layer for noise, silently
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    small, _ = compress(_mlp(), ["0", "2"], rank=3)
    save_compressed(small, tmp_path / "small.safetensors")
    with safe_open(tmp_path / "small.safetensors", framework="pt") as f:
        meta = f.metadata()
    head_only = {k: v for k, v in load_file(tmp_path / "small.safetensors").items() if k.startswith("2.")}
    save_file(head_only, tmp_path / "partial.safetensors", metadata=meta)
    model = _mlp()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"0\.(up|down|bias): missing from the file, which lists its module as factored"):
        load_compressed(model, tmp_path / "partial.safetensors", strict=False)
    _assert_unchanged(model, before)
    # (a model with extra tensors of its own still loads non-strictly, and its factors are the file's)
    model = _mlp()
    model.extra = nn.Linear(2, 2)
    load_compressed(model, tmp_path / "small.safetensors", strict=False)
    assert torch.equal(model[0].up, small[0].up) and torch.equal(model[2].down, small[2].down)


def test_save_and_load_without_safetensors_say_how_to_get_it(tmp_path, monkeypatch, model_and_input):
    model, _ = model_and_input
    small, _ = compress(copy.deepcopy(model), PATTERNS, fraction=0.3)
    for name in ("safetensors", "safetensors.torch"):
        monkeypatch.setitem(sys.modules, name, None)  # (import of a None entry raises ImportError)
    with pytest.raises(ImportError, match="pip install safetensors"):
        save_compressed(small, tmp_path / "small.safetensors")
    with pytest.raises(ImportError, match="pip install safetensors"):
        load_compressed(copy.deepcopy(model), tmp_path / "small.safetensors")


def test_transformer_encoder_layer_linears_are_refused_before_any_change():
    # its eval-mode fast path (and nn.TransformerEncoder's) reads linear1 / linear2 .weight itself:
    # compressed, the layer failed with AttributeError at evaluation
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    before = _snapshot(layer)
    with pytest.raises(TypeError, match=r"linear1\.weight belongs to an nn\.TransformerEncoderLayer"):
        compress(layer, ["linear1", "linear2"], rank=4)
    _assert_unchanged(layer, before)


@pytest.mark.parametrize("fn", [compress, truncate_weights_])
def test_non_finite_weights_late_in_the_list_are_refused_before_any_change(fn):
    for bad in (float("nan"), float("inf")):  # (NaN failed in the SVD after the first swap; inf cut to NaN factors)
        model = _mlp()
        with torch.no_grad():
            model[2].weight[3, 5] = bad
        before = _snapshot(model)
        with pytest.raises(ValueError, match=r"target 2\.weight has non-finite weights"):
            fn(model, ["0", "2"], rank=2)
        text, state = before
        assert str(model) == text
        assert all(torch.equal(v, model.state_dict()[k]) or (k == "2.weight" and torch.equal(v.nan_to_num(), model.state_dict()[k].nan_to_num()))
                   for k, v in state.items())


def test_a_failing_svd_of_a_later_target_leaves_the_model_as_it_was(monkeypatch):
    # every factored module is built before the first is swapped in
    compress_module = sys.modules["q3r.compress"]  # (q3r.compress is also the function's name)
    model = _mlp()
    before = _snapshot(model)
    real, calls = compress_module.svd_truncate, []

    def failing_second(W, rank):
        calls.append(rank)
        if len(calls) == 2:
            raise torch.linalg.LinAlgError("did not converge")
        return real(W, rank)

    monkeypatch.setattr(compress_module, "svd_truncate", failing_second)
    with pytest.raises(torch.linalg.LinAlgError):
        compress(model, ["0", "2"], rank=2)
    assert calls == [2, 2]
    _assert_unchanged(model, before)


def test_a_per_slice_rank_list_of_the_wrong_length_is_refused():
    model = Toy()
    qkv = model.attn.qkv.weight
    slices = [(0, 8), (8, 16), (16, 24)]
    for ranks in ([3, 3], [3, 3, 3, 3]):
        target = q3r.Target("attn.qkv.weight", qkv, 0, slices, target_rank=ranks)
        for fn in (compress, truncate_weights_):
            before = _snapshot(model)
            with pytest.raises(ValueError, match=rf"lists {len(ranks)} ranks for 3 slices"):
                fn(model, [target])
            _assert_unchanged(model, before)
    plain = _mlp()
    with pytest.raises(ValueError, match="lists 2 ranks for 1 slices"):
        compress(plain, [q3r.Target("0.weight", plain[0].weight, target_rank=[3, 5])])


def test_compress_by_fraction_cuts_at_the_rank_training_used():
    # 0.58 * 100 * 100 / 200 = 28.999999999999996 in floats: the training rank is 29, and a plain
    # floor cut one below it
    model = nn.Sequential(nn.Linear(100, 100))
    trained = q3r.find_targets(model, ["0"], target_rank=0.58)[0]
    assert q3r.reference.resolve_rank(0.58, 100, 100) == 29
    _, report = compress(model, ["0"], fraction=0.58, copy=True)
    assert [s.rank for s in report.slices] == [29]
    assert trained.target_rank == 0.58
    dense = truncate_weights_(copy.deepcopy(model), ["0"], fraction=0.58)
    sigma = torch.linalg.svdvals(dense[0].weight.detach().double())
    assert int((sigma > 1e-4 * sigma[0]).sum()) == 29


@pytest.mark.parametrize("rank", [-1, 0, 12, True, 2.0])
def test_svd_truncate_refuses_a_rank_outside_1_to_min_d(rank):
    W = torch.randn(17, 11)
    with pytest.raises(ValueError, match=r"rank of svd_truncate must be an int in \[1, 11\]"):
        svd_truncate(W, rank)
    up, down = svd_truncate(W, 11)  # (full rank: exact)
    torch.testing.assert_close(up @ down, W, rtol=1e-4, atol=1e-5)


def test_low_rank_modules_refuse_ranks_that_are_not_ints():
    with pytest.raises(ValueError, match="ranks of LowRankFusedLinear must be ints >= 1"):
        LowRankFusedLinear(8, 12, 0, [(0, 6), (6, 12)], [2.9, 3])
    with pytest.raises(ValueError, match="rank of LowRankLinear must be an int >= 1"):
        LowRankLinear(8, 12, True)


def test_a_strict_load_refuses_a_file_that_lacks_tensors_of_views_of_one_buffer(tmp_path):
    # the model's dense parameters are views of one flat buffer (they share a storage without
    # being tied): the file lacks 4.weight / 4.bias, which must not pass as tied to 2.*
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 8))

    small, _ = compress(build(), ["0"], rank=4)
    del small[4]
    path = tmp_path / "partial.safetensors"
    save_compressed(small, str(path))
    model = build()
    params = [(mod, n) for mod in (model[2], model[4]) for n in ("weight", "bias")]
    flat = torch.cat([getattr(mod, n).detach().reshape(-1) for mod, n in params])
    offset = 0
    for mod, n in params:
        p = getattr(mod, n)
        setattr(mod, n, nn.Parameter(flat[offset:offset + p.numel()].view_as(p)))
        offset += p.numel()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"4\.weight: missing from the file"):
        load_compressed(model, str(path))
    _assert_unchanged(model, before)


def test_load_into_a_meta_model_is_refused_and_tied_weights_still_load(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    small, _ = compress(model, ["0"], rank=4, copy=True)
    path = tmp_path / "m.safetensors"
    save_compressed(small, str(path))
    with torch.device("meta"):
        empty = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    with pytest.raises(ValueError, match="meta device"):
        load_compressed(empty, str(path))
    assert isinstance(empty[0], nn.Linear)  # (unchanged)

    class Tied(nn.Module):  # (two names, one tensor: save_model stores it once)
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    torch.manual_seed(2)
    tied = Tied()
    path2 = tmp_path / "tied.safetensors"
    save_compressed(tied, str(path2))
    fresh = Tied()
    load_compressed(fresh, str(path2))
    assert torch.equal(fresh.a.weight, tied.a.weight) and fresh.b.weight is fresh.a.weight


def test_a_frozen_dense_layer_loads_as_frozen_factors(tmp_path):
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8))
    model[0].requires_grad_(False)
    small, _ = compress(model, ["0", "1"], rank=4, copy=True)
    path = tmp_path / "frozen.safetensors"
    save_compressed(small, str(path))
    fresh = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8))
    fresh[0].requires_grad_(False)
    fresh[1].bias.requires_grad_(False)
    load_compressed(fresh, str(path))
    assert [p.requires_grad for p in fresh[0].parameters()] == [False] * 3
    assert {n: p.requires_grad for n, p in fresh[1].named_parameters()} == {"down": True, "up": True, "bias": False}


def test_hooks_on_a_replaced_module_are_named_in_a_warning():
    model = _mlp()
    seen = []
    model[2].register_forward_hook(lambda m, i, o: seen.append(1))
    with pytest.warns(UserWarning, match="module 2 has hooks registered on it") as record:
        small, _ = compress(model, ["0", "2"], rank=2)
    assert len(record) == 1 and record[0].filename == __file__
    small(torch.randn(3, 24))
    assert seen == []  # (what the warning says)


def test_a_model_with_factored_layers_of_its_own_loads_them_as_they_are(tmp_path):
    class Net(nn.Module):  # (LowRankLinear as part of the architecture)
        def __init__(self):
            super().__init__()
            self.low, self.fc = LowRankLinear(16, 16, 4), nn.Linear(16, 8)

        def forward(self, x):
            return self.fc(torch.relu(self.low(x)))

    torch.manual_seed(0)
    small, _ = compress(Net(), ["fc"], rank=2)
    path = tmp_path / "own.safetensors"
    save_compressed(small, str(path))
    fresh = Net()
    own = fresh.low
    load_compressed(fresh, str(path))
    assert fresh.low is own and isinstance(fresh.fc, LowRankLinear)
    x = torch.randn(5, 16)
    assert torch.equal(fresh(x), small(x))
    other = Net()
    other.low = LowRankLinear(16, 16, 3)  # (another rank: another architecture)
    with pytest.raises(TypeError, match="not an nn.Linear"):
        load_compressed(other, str(path))


class _ReadsItsLayersWeights(nn.Module):
    """Owners that read a layer's weight themselves, as Hugging Face T5's feed-forward reads
    ``wo.weight.dtype``, timm BEiT / EVA attention calls ``F.linear(x, qkv.weight, ...)`` and a
    GPT-2-style block might read a Conv1D's (in, out) weight: each raised AttributeError after
    compress (a review's case with the real T5, BEiT and Mamba)."""

    def __init__(self, dim=24):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.randn(3 * dim))
        self.wo = nn.Linear(3 * dim, dim)
        self.c_proj = Conv1D(dim, dim)

    def forward(self, x):
        h = torch.nn.functional.linear(x, self.qkv.weight, self.q_bias)
        h = self.wo(h.to(self.wo.weight.dtype))
        return h @ self.c_proj.weight + self.c_proj.bias


@pytest.mark.parametrize("fraction", [0.4, 0.1])
def test_owners_that_read_the_weight_of_a_compressed_layer_get_the_dense_product(tmp_path, fraction):
    torch.manual_seed(0)
    model = _ReadsItsLayersWeights().double().eval()
    x = torch.randn(4, 24, dtype=torch.double)
    patterns = ["qkv", "wo", "c_proj"]
    dense = truncate_weights_(copy.deepcopy(model), patterns, fraction=fraction)
    small, _ = compress(model, q3r.find_targets(model, patterns, fused="none"), fraction=fraction, copy=True)
    torch.testing.assert_close(small(x), dense(x))
    assert small.c_proj.conv1d_layout and not small.wo.conv1d_layout
    assert small.c_proj.weight.shape == dense.c_proj.weight.shape  # (Conv1D's (in, out))
    small(x).sum().backward()  # (gradients reach the factors through the product)
    assert small.qkv.up.grad is not None and small.c_proj.down.grad is not None
    # loaded into a fresh dense model: the same layout, the same outputs
    save_compressed(small, tmp_path / "m.safetensors")
    fresh = _ReadsItsLayersWeights().double().eval()
    load_compressed(fresh, tmp_path / "m.safetensors")
    assert fresh.c_proj.conv1d_layout
    torch.testing.assert_close(fresh(x), dense(x))
    # a fused layer reads its dense product too
    fused = LowRankFusedLinear(6, 9, 0, [(0, 3), (3, 6)], [2, 2], bias=False)
    torch.testing.assert_close(fused.weight, fused.dense_weight())


def test_find_targets_passes_factored_layers_by():
    torch.manual_seed(0)
    model = _ReadsItsLayersWeights()
    compress(model, q3r.find_targets(model, ["wo"]), rank=4)
    found = q3r.find_targets(model, ["wo", "qkv"], fused="none")
    assert [t.name for t in found] == ["qkv.weight"]  # (not the computed wo.weight)
    with pytest.raises(ValueError, match="match no module with a 2-D weight|matched no module"):
        q3r.find_targets(model, ["wo"])


def test_find_targets_passes_factored_fused_layers_by():
    # a LowRankFusedLinear's .weight is computed too (the dense product of its blocks): a
    # pattern naming it must pass it by, not refuse it as a computed (parametrized) weight
    torch.manual_seed(0)
    model = _ReadsItsLayersWeights()
    thirds = {"qkv": (0, [(0, 24), (24, 48), (48, 72)])}
    compress(model, q3r.find_targets(model, ["qkv"], slices=thirds), rank=4)
    assert isinstance(model.qkv, LowRankFusedLinear)
    found = q3r.find_targets(model, ["qkv", "wo"])
    assert [t.name for t in found] == ["wo.weight"]


def test_hugging_face_t5_feed_forward_compresses_and_runs():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=4, vocab_size=50,
                                   decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    ids = torch.randint(0, 50, (2, 7))
    dense = truncate_weights_(copy.deepcopy(model), ["DenseReluDense.wo"], fraction=0.3)
    small, _ = compress(model, q3r.find_targets(model, ["DenseReluDense.wo"]), fraction=0.3, copy=True)
    with torch.no_grad():  # (it read wo.weight.dtype: AttributeError)
        torch.testing.assert_close(small(input_ids=ids, decoder_input_ids=ids).logits,
                                   dense(input_ids=ids, decoder_input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_a_rank_that_saves_no_parameters_is_cut_with_a_warning_naming_the_slice():
    """rank=min(d1, d2) of a non-square weight (or the "reference" rank rule: int(f max(d1, d2))) gives r (d1 + d2) >= d1 d2:
    the factored layer is exact (or truncated) but larger than the dense one. compress does as
    asked and says so; a fraction below 1 never asks for it."""
    model = nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 40))
    x = torch.randn(3, 20)
    with pytest.warns(UserWarning, match=r"2 slice\(s\) have at least as many parameters factored as dense.*"
                                         r"0\.weight \(10x20 at rank 10\), 2\.weight \(40x10 at rank 10\)"):
        small, report = compress(model, ["0", "2"], rank=10, copy=True)
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)
    assert report.model_params_after > report.model_params_before
    square = nn.Sequential(nn.Linear(20, 20))
    with pytest.warns(UserWarning, match=r"1 slice\(s\).*0\.weight \(20x20 at rank 10\);"):  # 10 * 40 = 400: as many
        compress(square, ["0"], rank=10, copy=True)
    trained = q3r.find_targets(square, ["0"], target_rank=0.5, rank_rule="reference")  # int(0.5 * 20) = 10
    with pytest.warns(UserWarning, match=r"1 slice\(s\).*0\.weight \(20x20 at rank 10\);"):
        compress(square, trained, rank_rule="reference", copy=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compress(model, ["0", "2"], rank=6, copy=True)  # 6 * 30 = 180 < 200; 6 * 50 = 300 < 400
        compress(model, ["0", "2"], fraction=0.99, copy=True)
        compress(square, ["0"], rank=9, copy=True)


class _Tokens(nn.Module):
    """Token embedding (with a padding row) -> linear head: an embedding table as a target."""

    def __init__(self, padding_idx=0, **embedding_options):
        super().__init__()
        self.emb = nn.Embedding(50, 24, padding_idx=padding_idx, **embedding_options)
        self.head = nn.Linear(24, 7)

    def forward(self, idx):
        return self.head(self.emb(idx).relu())


def test_an_embedding_table_is_compressed_to_factors_with_the_outputs_of_its_truncated_twin():
    torch.manual_seed(0)
    model = _Tokens(padding_idx=-1)  # (stored as 49, as nn.Embedding stores it)
    idx = torch.tensor([[0, 3, 49, 17], [49, 49, 5, 2]])
    twin = truncate_weights_(copy.deepcopy(model), ["emb"], rank=6)
    small, report = compress(model, ["emb"], rank=6, copy=True)
    assert isinstance(small.emb, LowRankEmbedding) and small.emb.padding_idx == 49
    assert (small.emb.up.shape, small.emb.down.shape) == ((50, 6), (6, 24))
    torch.testing.assert_close(small(idx), twin(idx), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(small.emb.weight, twin.emb.weight, rtol=1e-5, atol=1e-5)  # (.weight: the dense table)
    assert report.slices[0].kept_params == 6 * (50 + 24) < report.slices[0].dense_params == 50 * 24
    # as in nn.Embedding, the padding row of the looked-up table gets no gradient
    small.emb(idx).sum().backward()
    assert small.emb.up.grad[49].abs().sum() == 0 and small.emb.up.grad[3].abs().sum() > 0
    assert small.emb.down.grad.abs().sum() > 0
    # built directly: a negative padding_idx counts from the end, as nn.Embedding's does; its row starts at 0
    direct = LowRankEmbedding(50, 24, 3, padding_idx=-2)
    assert direct.padding_idx == 48 and direct.up[48].abs().sum() == 0 and direct.up[47].abs().sum() > 0
    with pytest.raises(ValueError, match="padding_idx of LowRankEmbedding must be within num_embeddings"):
        LowRankEmbedding(50, 24, 3, padding_idx=50)


def test_a_low_rank_embedding_scales_the_gradient_of_up_by_the_lookup_counts():
    # scale_grad_by_freq acts on ``up`` as nn.Embedding's acts on its table: the gradient of
    # a row looked up k times in the batch is divided by k (float64 oracle below)
    torch.manual_seed(0)
    emb = LowRankEmbedding(11, 7, 3, scale_grad_by_freq=True, dtype=torch.float64)
    indices = torch.tensor([[4, 1, 4], [9, 4, 1]])
    upstream = torch.randn(2, 3, 7, dtype=torch.float64)
    (emb(indices) * upstream).sum().backward()
    expected = torch.zeros(11, 3, dtype=torch.float64)
    counts = torch.bincount(indices.flatten(), minlength=11)
    for index, g in zip(indices.flatten().tolist(), upstream.reshape(-1, 7)):
        expected[index] += (g @ emb.down.detach().T) / counts[index]
    torch.testing.assert_close(emb.up.grad, expected)


def test_a_fresh_low_rank_linear_has_the_weight_scale_of_nn_linear():
    # (its init: up @ down with nn.Linear's weight variance, 1 / (3 in_features), so a factored
    # layer trained from scratch starts at a dense layer's output scale)
    torch.manual_seed(0)
    layer = LowRankLinear(300, 200, 40)
    dense = nn.Linear(300, 200)
    ratio = layer.dense_weight().detach().var() / dense.weight.detach().var()
    assert 0.9 < float(ratio) < 1.1, float(ratio)


def test_a_fused_low_rank_linear_needs_one_rank_per_slice():
    # (two ranks for three slices: the third slice's block failed with a KeyError, four: one was dropped)
    for ranks in ([1, 2], [1, 2, 1, 2]):
        with pytest.raises(ValueError, match="one rank per slice"):
            LowRankFusedLinear(5, 9, 0, [(0, 3), (3, 6), (6, 9)], ranks)


def test_a_sparse_low_rank_embedding_gives_up_a_sparse_gradient():
    # (sparse=True acts on ``up`` as nn.Embedding's acts on its table)
    emb = LowRankEmbedding(13, 6, 2, sparse=True)
    emb(torch.tensor([[3, 7, 3]])).sum().backward()
    assert emb.sparse and emb.up.grad.is_sparse and not emb.down.grad.is_sparse


def test_a_fresh_low_rank_embedding_has_the_unit_entries_of_nn_embedding():
    # (its init: up @ down with nn.Embedding's N(0, 1) entries)
    torch.manual_seed(0)
    table = LowRankEmbedding(400, 300, 30).dense_weight().detach()
    assert 0.9 < float(table.var()) < 1.1, float(table.var())


def test_a_compressed_embedding_saves_and_loads_into_a_fresh_model_and_refuses_another(tmp_path):
    pytest.importorskip("safetensors")
    torch.manual_seed(1)
    model = _Tokens(scale_grad_by_freq=True)
    small, _ = compress(model, ["emb"], fraction=0.3, copy=True)
    path = tmp_path / "tokens.safetensors"
    save_compressed(small, path)
    fresh = load_compressed(_Tokens(scale_grad_by_freq=True), path)
    idx = torch.randint(0, 50, (3, 5))
    assert isinstance(fresh.emb, LowRankEmbedding) and fresh.emb.scale_grad_by_freq
    torch.testing.assert_close(fresh(idx), small(idx), rtol=0, atol=0)
    for other, match in ((_Tokens(padding_idx=3, scale_grad_by_freq=True), r"padding_idx.* = \(50, 24, 0, True, False\), "
                          r"but the model's is \(50, 24, 3, True, False\): another architecture"),
                         (_Tokens(), r"\(50, 24, 0, True, False\), but the model's is \(50, 24, 0, False, False\)"),
                         (_Tokens(max_norm=2.0, scale_grad_by_freq=True), "max_norm"),):
        before = copy.deepcopy(other.state_dict())
        with pytest.raises((ValueError, TypeError), match=match):
            load_compressed(other, path)
        assert isinstance(other.emb, nn.Embedding)
        assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())
    linear = nn.Module()
    linear.emb, linear.head = nn.Linear(24, 50), nn.Linear(24, 7)
    with pytest.raises(TypeError, match="not an nn.Embedding"):
        load_compressed(linear, path)


def test_a_frozen_embedding_stays_frozen_when_compressed_and_when_loaded(tmp_path):
    # (a frozen input embedding is common in fine-tuning; its factors must not start training)
    pytest.importorskip("safetensors")
    model = _Tokens()
    model.emb.requires_grad_(False)
    small, _ = compress(model, ["emb"], fraction=0.3, copy=True)
    assert [p.requires_grad for p in small.emb.parameters()] == [False, False]
    path = tmp_path / "frozen.safetensors"
    save_compressed(small, path)
    fresh = _Tokens()
    fresh.emb.requires_grad_(False)
    fresh = load_compressed(fresh, path)
    assert isinstance(fresh.emb, LowRankEmbedding)
    assert [p.requires_grad for p in fresh.emb.parameters()] == [False, False]
    assert all(p.requires_grad for p in fresh.head.parameters())
    trainable = load_compressed(_Tokens(), path)
    assert [p.requires_grad for p in trainable.emb.parameters()] == [True, True]


def test_an_embedding_with_max_norm_or_slices_is_refused_before_anything_changes():
    model = _Tokens(max_norm=1.0)
    with pytest.raises(TypeError, match="max_norm=1.0: its forward renormalizes rows"):
        compress(model, ["head", "emb"], rank=4)
    assert isinstance(model.head, nn.Linear) and isinstance(model.emb, nn.Embedding)
    model = _Tokens()
    targets = q3r.find_targets(model, ["emb"], target_rank=2, slices={"emb": (0, [(0, 25), (25, 50)])})
    with pytest.raises(ValueError, match="nn.Embedding cut into slices"):
        compress(model, targets, rank=2)
    assert isinstance(model.emb, nn.Embedding)


def test_a_q3r_trained_embedding_target_is_cut_where_it_was_pushed():
    """An embedding target trained with AdamQ3R towards 20% of its parameters, then compressed
    at that fraction: the factored model's outputs are the truncated twin's, and it finds the
    table itself no longer (factored layers are passed by)."""
    torch.manual_seed(2)
    model = _Tokens()
    targets = q3r.find_targets(model, ["emb"], target_rank=0.2)
    opt = q3r.AdamQ3R(q3r.param_groups(model, targets, lmbda=1.0, steps=2), lr=1e-2)
    for _ in range(6):
        idx = torch.randint(0, 50, (8, 4))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(idx).mean(1), torch.randint(0, 7, (8,))).backward()
        opt.step()
    twin = truncate_weights_(copy.deepcopy(model), targets, fraction=0.2)
    small, report = compress(model, targets, fraction=0.2, copy=True)
    assert report.slices[0].rank == 3  # floor(0.2 * 50 * 24 / 74)
    idx = torch.randint(0, 50, (4, 6))
    torch.testing.assert_close(small(idx), twin(idx), rtol=1e-5, atol=1e-5)
    assert q3r.find_targets(small, ["head"], target_rank=2)[0].name == "head.weight"
    with pytest.raises(ValueError, match="emb"):
        q3r.find_targets(small, ["emb"], target_rank=2)  # (factored: passed by, so the pattern matches nothing)


def test_a_target_of_a_module_compress_has_no_factored_form_for_is_refused_naming_it():
    class Scale(nn.Module):  # (a 2-D weight Q3R can train, in a module compress knows nothing of)
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return x @ self.weight

    model = nn.Sequential(nn.Linear(8, 8), Scale())
    with pytest.raises(TypeError, match=r"compress handles nn.Linear, HF Conv1D and nn.Embedding targets; 1.weight "
                                        r"belongs to a Scale"):
        compress(model, q3r.find_targets(model, ["0", "1"], target_rank=2), rank=2)
    assert isinstance(model[0], nn.Linear)


class _ScaledEmbedding(nn.Embedding):
    """Hugging Face's scaled word embedding (Gemma, BART, M2M100...): rows times embed_scale."""

    def forward(self, idx):
        return super().forward(idx) * 4.0


class _InitOnlyEmbedding(nn.Embedding):
    """A subclass that changes only the init: its forward is nn.Embedding's."""

    def reset_parameters(self):
        nn.init.normal_(self.weight, std=0.02)


def test_an_embedding_subclass_with_its_own_forward_is_refused_and_one_without_is_compressed(tmp_path):
    """A LowRankEmbedding is a plain lookup: in place of a subclass with its own forward (HF
    Gemma's embed_tokens multiply by sqrt(hidden), BART / OPT positional embeddings take a shape
    or position_ids) it changed the outputs silently or failed at the next forward."""
    torch.manual_seed(3)
    model = _Tokens()
    model.emb = _ScaledEmbedding(50, 24, padding_idx=0)
    with pytest.raises(TypeError, match="emb.weight is a _ScaledEmbedding, an nn.Embedding subclass with its own forward"):
        compress(model, ["head", "emb"], rank=4)
    assert isinstance(model.head, nn.Linear) and type(model.emb) is _ScaledEmbedding
    plain = _Tokens()
    plain.emb = _InitOnlyEmbedding(50, 24, padding_idx=0)
    idx = torch.randint(0, 50, (3, 5))
    twin = truncate_weights_(copy.deepcopy(plain), ["emb"], rank=4)
    small, _ = compress(plain, ["emb"], rank=4, copy=True)
    assert isinstance(small.emb, LowRankEmbedding)
    torch.testing.assert_close(small(idx), twin(idx), rtol=1e-5, atol=1e-5)
    pytest.importorskip("safetensors")
    path = tmp_path / "tokens.safetensors"
    save_compressed(small, path)
    with pytest.raises(TypeError, match="_ScaledEmbedding, an nn.Embedding subclass with its own forward"):
        load_compressed(model, path)
    assert type(model.emb) is _ScaledEmbedding


def test_a_compressed_embedding_under_autocast_gives_the_tables_dtype_as_nn_embedding_does():
    """nn.Embedding is not autocast: an fp32 table gives fp32 rows under torch.autocast. The
    factored lookup's product ran in bf16 there, so an fp32 model's residual stream (LLaMA's
    inputs_embeds onward) turned bf16 and the outputs left the truncated twin's."""
    torch.manual_seed(4)
    model = _Tokens()
    twin = truncate_weights_(copy.deepcopy(model), ["emb"], rank=6)
    small, _ = compress(model, ["emb"], rank=6, copy=True)
    idx = torch.randint(0, 50, (3, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense_rows, rows = twin.emb(idx), small.emb(idx)
    assert dense_rows.dtype == rows.dtype == torch.float32
    torch.testing.assert_close(rows, dense_rows, rtol=1e-5, atol=1e-5)
    # a bf16 table gives bf16 rows, with autocast or without
    half = compress(copy.deepcopy(model).to(torch.bfloat16), ["emb"], rank=6)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert half.emb(idx).dtype == torch.bfloat16


def test_an_nn_linear_subclass_with_its_own_forward_is_compressed_with_a_warning_naming_it():
    """compress cannot tell a subclass that computes what nn.Linear does (HF's FalconLinear) from
    one that does not (Llama4Router): it replaces it, as before, and says so."""

    class Routed(nn.Linear):
        def forward(self, x):
            return super().forward(x).relu()

    model = nn.Sequential(nn.Linear(8, 12), Routed(12, 6))
    with pytest.warns(UserWarning, match=r"1\.weight belongs to a Routed, an nn.Linear subclass with its own forward"):
        small, _ = compress(model, ["0", "1"], rank=3, copy=True)
    assert isinstance(small[1], LowRankLinear)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compress(nn.Sequential(nn.Linear(8, 12)), ["0"], rank=3)  # (a plain nn.Linear: quiet)


def test_finding_targets_on_a_compressed_model_says_its_layers_are_factored():
    # (the factored layers match the patterns but are skipped: the error said only "matched no
    # module with a 2-D weight"; h50)
    small, _ = compress(_mlp(), ["0", "2"], rank=3)
    with pytest.raises(ValueError, match=r"matched no module with a 2-D weight; the modules they match are factored by "
                                         r"q3r.compress \(0, 2\): find the targets on the dense model"):
        q3r.find_targets(small, ["0", "2"], target_rank=2)

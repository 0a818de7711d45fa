"""Target selection (patterns, fused QKV) and every bad input of SPEC section 5."""

import copy
import warnings

import pytest
import torch

import q3r
from helpers import TinyViT


def test_patterns_exact_suffix_and_regex():
    model = TinyViT(depth=3)
    names = [t.name for t in q3r.find_targets(model, ["mlp.fc1"])]
    assert names == [f"blocks.{i}.mlp.fc1.weight" for i in range(3)]
    names = [t.name for t in q3r.find_targets(model, [r"blocks\.[02]\.attn\.proj"])]
    assert names == ["blocks.0.attn.proj.weight", "blocks.2.attn.proj.weight"]
    names = [t.name for t in q3r.find_targets(model, r"blocks\.\d+\.mlp\.fc\d", exclude=["blocks.1.mlp.fc2"])]
    assert "blocks.1.mlp.fc2.weight" not in names and len(names) == 5


def test_timm_style_qkv_is_split_into_row_slices():
    model = TinyViT(dim=24)
    (t,) = q3r.find_targets(model, ["blocks.0.attn.qkv"])
    assert (t.slice_dim, t.slices) == (0, [(0, 24), (24, 48), (48, 72)])
    assert t.slice_names() == [f"blocks.0.attn.qkv.weight[{x}]" for x in "qkv"]
    (t,) = q3r.find_targets(model, ["blocks.0.attn.qkv"], fused="none")
    assert t.slices is None


def test_an_exclude_pattern_that_matches_nothing_is_refused():
    # (a typo in exclude selected the layer it meant to leave out, silently)
    with pytest.raises(ValueError, match=r"exclude patterns \['blocks.0.attn.qvk'\] match no module"):
        q3r.find_targets(TinyViT(), ["attn.qkv"], exclude=["blocks.0.attn.qvk"])


def test_a_qkv_laid_out_per_head_is_left_whole_with_a_warning():
    # timm's TinyViT / EfficientFormer attention (key_dim; rows [q_h k_h v_h] per head h): row
    # thirds would mix Q, K and V of different heads (a review found half the "q" slice was not Q)
    model = TinyViT(dim=24)
    model.blocks[0].attn.key_dim = 4
    with pytest.warns(UserWarning, match="laid out per head") as caught:
        (t,) = q3r.find_targets(model, ["blocks.0.attn.qkv"])
    assert t.slices is None
    # one warning naming the module, at the caller's line
    (w,) = [w for w in caught if "per head" in str(w.message)]
    assert str(w.message).startswith("blocks.0.attn.qkv (") and w.filename == __file__
    for block in model.blocks:
        block.attn.key_dim = 4
    with pytest.warns(UserWarning, match="laid out per head") as caught:
        targets = q3r.find_targets(model, ["attn.qkv"])
    assert all(t.slices is None for t in targets) and len(targets) == len(model.blocks)
    assert len([w for w in caught if "per head" in str(w.message)]) == 1
    (t,) = q3r.find_targets(model, ["blocks.0.attn.qkv"], slices={"qkv": (0, [(0, 24), (24, 48)])})
    assert t.slices == [(0, 24), (24, 48)]  # (the user's layout, no warning needed)


def test_a_head_first_qkv_of_timm_maxvit_is_left_whole_with_a_warning():
    # timm's MaxViT AttentionCl (maxvit_rmlp_*, maxxvit_*): num_heads and dim_head (no head_dim, no
    # key_dim), and with head_first=True, its default, rows [q_h k_h v_h] per head h; its "q" third
    # was Q and K of heads 0..heads/3 (a review found it on maxvit_rmlp_nano_rw_256)
    class AttentionCl(torch.nn.Module):
        def __init__(self, dim=24, dim_head=4, head_first=True):
            super().__init__()
            self.num_heads, self.dim_head, self.head_first = dim // dim_head, dim_head, head_first
            self.qkv = torch.nn.Linear(dim, 3 * dim)

        def forward(self, x):  # (as timm's, up to the attention itself)
            B = x.shape[0]
            if self.head_first:
                return self.qkv(x).view(B, -1, self.num_heads, self.dim_head * 3).transpose(1, 2).chunk(3, dim=3)
            return self.qkv(x).reshape(B, -1, 3, self.num_heads, self.dim_head).transpose(1, 3).unbind(2)

    model = torch.nn.Sequential(AttentionCl())
    with pytest.warns(UserWarning, match="laid out per head"):
        (t,) = q3r.find_targets(model, ["0.qkv"])
    assert t.slices is None
    # head_first=False (maxvit_*_tf_*): heads after Q, K, V; thirds are Q, K and V, as they were
    model = torch.nn.Sequential(AttentionCl(head_first=False))
    (t,) = q3r.find_targets(model, ["0.qkv"])
    x = torch.randn(2, 5, 24)
    base = model(x)
    saved = t.param.detach().clone()
    for i, (a, b) in enumerate(t.slices):
        with torch.no_grad():
            t.param[a:b] += 1.0
        changed = [j for j, (u, v) in enumerate(zip(base, model(x))) if not torch.equal(u, v)]
        with torch.no_grad():
            t.param.copy_(saved)
        assert changed == [i], (t.slice_labels[i], changed)


def test_a_qkv_that_is_not_three_heads_times_head_dim_is_left_whole_with_a_warning():
    # timm's GCViT global attention: its qkv holds K and V only (2 x heads x head_dim rows), in a
    # block with num_heads; at gcvit_small's widths (dim 96, 3 heads) 192 rows divide by 3, and
    # fused="auto" cut them into "q, k, v" thirds that straddle K and V
    class Attention(torch.nn.Module):
        def __init__(self, dim, heads, kv_only):
            super().__init__()
            self.num_heads, self.head_dim = heads, dim // heads
            self.qkv = torch.nn.Linear(dim, (2 if kv_only else 3) * dim)

    model = torch.nn.Module()
    model.glob, model.local = Attention(12, 3, kv_only=True), Attention(12, 3, kv_only=False)
    with pytest.warns(UserWarning, match="not a Q, K, V triple") as caught:
        targets = {t.name: t for t in q3r.find_targets(model, ["qkv"], target_rank=2)}
    assert targets["glob.qkv.weight"].slices is None
    assert targets["local.qkv.weight"].slices == [(0, 12), (12, 24), (24, 36)]  # (a Q, K, V triple: cut as before)
    (w,) = [w for w in caught if "triple" in str(w.message)]
    assert str(w.message).startswith("glob.qkv (Attention.qkv: 24 rows, not 3 x 3 heads x 4)") and w.filename == __file__


def test_a_timm_differential_attention_qkv_is_cut_into_q_k_v():
    # timm's DiffAttention (vit_*_diff, attn_layer="diff") sets head_dim to half a head (each
    # head's Q and K are split in two for its two softmaxes), so its qkv (3 x dim rows, chunk(3))
    # was "not 3 x num_heads x head_dim" and left whole, with a warning saying it was not a Q, K,
    # V triple: it is one (a sweep over timm with a zero-V oracle found the thirds are Q, K, V)
    class DiffAttention(torch.nn.Module):  # (timm.layers.diff_attention's, up to names and norms)
        def __init__(self, dim, num_heads):
            super().__init__()
            self.num_heads, self.head_dim = num_heads, dim // num_heads // 2
            self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

        def forward(self, x):  # the attention only: the output the projection reads
            B, N, C = x.shape
            q, k, v = self.qkv(x).chunk(3, dim=2)
            q = q.reshape(B, N, self.num_heads, 2, self.head_dim).permute(3, 0, 2, 1, 4)
            k = k.reshape(B, N, self.num_heads, 2, self.head_dim).permute(3, 0, 2, 1, 4)
            v = v.reshape(B, N, self.num_heads, 2 * self.head_dim).transpose(1, 2)
            a1, a2 = ((q @ k.transpose(-1, -2)) * self.head_dim ** -0.5).softmax(dim=-1)
            return (a1 @ v - 0.5 * (a2 @ v)).transpose(1, 2).reshape(B, N, C)

    DiffAttention.__module__ = "timm.layers.diff_attention"
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.attn = DiffAttention(16, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no "not a Q, K, V triple" warning)
        (t,) = q3r.find_targets(model, ["attn.qkv"], target_rank=2)
    assert t.slices == [(0, 16), (16, 32), (32, 48)] and t.slice_labels == ["q", "k", "v"]
    x = torch.randn(2, 5, 16)
    zeroed, shifted = copy.deepcopy(model.attn), copy.deepcopy(model.attn)
    with torch.no_grad():
        zeroed.qkv.weight[32:].zero_()
        zeroed.qkv.bias[32:].zero_()
        shifted.qkv.bias[16:32] += torch.randn(16)  # one vector added to every key: the softmaxes ignore it
    assert zeroed(x).abs().max() == 0  # the slice named v is V
    torch.testing.assert_close(shifted(x), model.attn(x))  # the slice named k is K


def test_the_slices_of_a_timm_davit_channel_attention_are_named_by_the_role_they_play():
    # timm's DaViT ChannelAttention unbinds its qkv thirds as q, k, v but computes
    # softmax(k^T v) @ q (attention over channels): its first third is the values. Labelled
    # q, k, v in row order, zeroing the "v" slice of davit_tiny left the block's output almost
    # whole, and zeroing "q" silenced it (a sweep over timm with a zero-V oracle found this)
    class ChannelAttention(torch.nn.Module):  # (timm.models.davit's, up to names)
        def __init__(self, dim, num_heads):
            super().__init__()
            self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
            self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

        def forward(self, x):  # the attention only: the output the projection reads
            B, N, C = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
            attn = ((k * self.scale).transpose(-1, -2) @ v).softmax(dim=-1)
            return (attn @ q.transpose(-1, -2)).transpose(-1, -2).transpose(1, 2).reshape(B, N, C)

    ChannelAttention.__module__ = "timm.models.davit"
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.attn = ChannelAttention(12, 3)
    (t,) = q3r.find_targets(model, ["attn.qkv"], target_rank=2)
    assert t.slices == [(0, 12), (12, 24), (24, 36)]  # (still three projections, each regularized on its own)
    assert t.slice_names() == [f"attn.qkv.weight[{x}]" for x in "vqk"]
    x = torch.randn(2, 5, 12)

    def out_with(label, change):
        a, b = t.slices[t.slice_labels.index(label)]
        with torch.no_grad():
            saved = model.attn.qkv.weight.clone(), model.attn.qkv.bias.clone()
            change(model.attn.qkv.weight[a:b], model.attn.qkv.bias[a:b])
            y = model.attn(x)
            model.attn.qkv.weight.copy_(saved[0]), model.attn.qkv.bias.copy_(saved[1])
        return y

    def zero(w, b):
        w.zero_()
        b.zero_()

    def shift(w, b):  # one value per token added to every key channel: the softmax over keys ignores it
        w.add_(torch.randn(1, w.shape[1]))
        b.add_(1.0)

    base = model.attn(x).detach()
    assert out_with("v", zero).abs().max() == 0  # V: no values, no output
    torch.testing.assert_close(out_with("k", shift), base)  # K: what the softmax runs over
    assert not torch.allclose(out_with("q", shift), base)
    # (timm's other blocks keep q, k, v: only DaViT's channel attention swaps them)
    ChannelAttention.__module__ = __name__
    (t,) = q3r.find_targets(model, ["attn.qkv"], target_rank=2)
    assert t.slice_labels == ["q", "k", "v"]


def test_rank_overrides_and_per_slice_ranks():
    model = TinyViT(dim=24)
    targets = q3r.find_targets(model, ["attn.qkv", "mlp.fc1"], target_rank=0.25, rank_overrides={"mlp.fc1": 5})
    assert {t.name: t.target_rank for t in targets}["blocks.0.mlp.fc1.weight"] == 5
    opt = q3r.AdamQ3R(q3r.param_groups(model, targets), lr=1e-3)
    qkv_group = next(g for g in opt.param_groups if (g.get("names") or [""])[0].startswith("blocks.0.attn.qkv"))
    assert qkv_group["target_rank"] == 0.25


def test_hugging_face_gpt2_c_attn_is_split_into_column_slices():
    transformers = pytest.importorskip("transformers", reason="transformers is installed by .ci/run")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=16, vocab_size=50)
    model = transformers.GPT2LMHeadModel(config)
    targets = q3r.find_targets(model, ["attn.c_attn", "mlp.c_fc"], target_rank=4)
    c_attn = next(t for t in targets if t.name.endswith("h.0.attn.c_attn.weight"))
    assert (c_attn.slice_dim, c_attn.slices) == (1, [(0, 32), (32, 64), (64, 96)])
    opt = q3r.AdamQ3R(q3r.param_groups(model, targets, lmbda=0.1, steps=2), lr=1e-3)
    ids = torch.randint(0, 50, (2, 8))
    for _ in range(3):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    states = opt.state[c_attn.param]["q3r"]
    assert [tuple(s["U"].shape[:1]) + tuple(s["V"].shape[:1]) for s in states] == [(32, 32)] * 3
    assert all(int((s["sigma"] > s["eps"]).sum()) >= 4 for s in states)


# ------------------------------------------------------------------ bad input


def test_non_2d_target_is_rejected():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match=r"0\.weight has shape \(4, 3, 3, 3\)"):
        q3r.find_targets(model, ["0"])
    bias = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        q3r.AdamQ3R([{"params": [bias], "q3r": True}])


@pytest.mark.parametrize(
    "options, message",
    [
        ({"lmbda": -0.1}, "lmbda must be a finite number >= 0, got -0.1"),
        ({"lmbda": float("nan")}, "lmbda"),
        ({"steps": 0}, "steps .* got 0"),
        ({"steps": 2.5}, "steps .* got 2.5"),
        ({"eps_schedule": "cosine"}, r"(AdamQ3R param group [01]|Q3R): eps_schedule .* got 'cosine'"),
        ({"eps_schedule": "constant"}, "eps_value"),
        ({"eps_schedule": "geometric", "eps_floor": 1e-3}, "num_refreshes"),
        # (an alias is named as given: the error named 'geometric', which the user never wrote)
        ({"eps_schedule": "linear"}, r"eps_schedule='linear' \(the reference's name of 'geometric'\) needs a finite "
                                     r"eps_floor > 0, got eps_floor=None"),
        ({"target_rank": 8}, "target_rank .* rank 8 for a 10x8 matrix"),
        ({"target_rank": 1.5}, r"target_rank .* \(0, 1\), got 1.5"),
        ({"rank_rule": "max"}, "rank_rule"),
        ({"refresh": "magic"}, "refresh"),
        ({"slices": [(0, 6), (5, 10)], "target_rank": 2}, "overlap"),
        ({"slices": [(0, 11)], "target_rank": 2}, "out of bounds"),
        ({"slices": [(4, 4)], "target_rank": 2}, "out of bounds"),
        ({"slices": [(-2, 5)], "target_rank": 2}, "out of bounds"),  # (a negative start narrows from the end)
        ({"slice_dim": 2, "slices": [(0, 5)]}, "slice_dim"),
    ],
)
def test_bad_q3r_options_raise_and_change_nothing(options, message):
    p = torch.nn.Parameter(torch.randn(10, 8))
    q = torch.nn.Parameter(torch.randn(3))
    opt = q3r.AdamQ3R([{"params": [q]}], lr=1e-3)
    before = copy.deepcopy(opt.param_groups)
    with pytest.raises((ValueError, TypeError), match=message):
        opt.add_param_group({"params": [p], "q3r": True, **options})
    assert len(opt.param_groups) == len(before) and opt.param_groups[0]["params"][0] is q
    with pytest.raises((ValueError, TypeError), match=message):
        q3r.AdamQ3R([{"params": [p], "q3r": True, **options}])
    regularizer_options = {k: v for k, v in options.items() if k not in ("slices", "slice_dim", "target_rank")}
    if regularizer_options:
        with pytest.raises((ValueError, TypeError), match=message):
            q3r.Q3R([q3r.Target("p", p)], **regularizer_options)


def test_bad_optimizer_hyperparameters():
    p = torch.nn.Parameter(torch.randn(4, 4))
    for kwargs, message in [({"lr": -1.0}, "lr=-1.0"), ({"lr": float("inf")}, "lr=inf"), ({"betas": (0.9, 1.0)}, "betas"),
                            ({"betas": (0.9, 0.99, 0.5)}, "betas"),
                            ({"eps": -1.0}, "eps=-1.0"), ({"weight_decay": -0.1}, "weight_decay")]:
        with pytest.raises(ValueError, match=message):
            q3r.AdamQ3R([p], **kwargs)
    with pytest.raises(TypeError, match="unknown arguments"):
        q3r.AdamQ3R([p], lambda_=0.1)


def test_a_zero_learning_rate_is_taken_as_torchs_adam_takes_it():
    # (lr=0: a warm-up's first step, or how torch.distributed.checkpoint makes an optimizer's
    # state; torch.optim.Adam takes it, and AdamQ3R's term lr * 2 lambda R(W) is then 0 too)
    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(9, 7, generator=g)
    W = torch.nn.Parameter(W0.clone())
    opt = q3r.AdamQ3R([{"params": [W], "q3r": True, "target_rank": 2, "lmbda": 0.4}], lr=0.0, weight_decay=0.1)
    for _ in range(2):
        W.grad = torch.randn(9, 7, generator=g)
        opt.step()
    assert torch.equal(W.detach(), W0)
    assert opt.state[W]["step"].item() == 2 and opt.state[W]["q3r"][0]["eps"].isfinite().all()


def test_a_zero_adam_eps_is_taken_and_steps_as_torchs_adam():
    g = torch.Generator().manual_seed(4)
    W0 = torch.randn(5, 3, generator=g)
    ours, theirs = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(W0.clone())
    opt = q3r.AdamQ3R([{"params": [ours], "q3r": True, "target_rank": 1, "lmbda": 0.0}], lr=1e-2, eps=0.0)
    adam = torch.optim.Adam([theirs], lr=1e-2, eps=0.0, foreach=False)
    for _ in range(3):
        grad = torch.randn(5, 3, generator=g)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt.step()
        adam.step()
    assert torch.equal(ours, theirs)


def test_bad_target_selection():
    model = TinyViT()
    with pytest.raises(ValueError, match=r"\['does.not.exist'\] match no module"):
        q3r.find_targets(model, ["mlp.fc1", "does.not.exist"])  # a typo is not passed over
    with pytest.raises(ValueError, match="matched no module with a 2-D weight"):
        q3r.find_targets(model, ["blocks.0.attn"])  # a module, but without a weight
    with pytest.raises(ValueError, match=r"rank_overrides patterns \['mlp.fc_1'\] match none"):
        q3r.find_targets(model, ["mlp.fc1"], rank_overrides={"mlp.fc_1": 2})
    with pytest.raises(ValueError, match=r"slices patterns \['fc2'\] match none"):
        q3r.find_targets(model, ["mlp.fc1"], slices={"fc2": (0, [(0, 8)])})
    with pytest.raises(ValueError, match="must not be empty"):
        q3r.find_targets(model, ["blocks.0.mlp.fc1"], slices={"fc1": (0, [])})
    with pytest.raises(ValueError, match="must not be empty"):
        q3r.AdamQ3R([{"params": [model.blocks[0].mlp.fc1.weight], "q3r": True, "target_rank": 3, "slices": []}])
    with pytest.raises(ValueError, match="overlap"):
        q3r.find_targets(model, ["blocks.0.mlp.fc1"], slices={"fc1": (0, [(0, 30), (20, 48)])})
    with pytest.raises(ValueError, match="target_rank"):
        q3r.find_targets(model, ["mlp.fc1"], target_rank=24)
    with pytest.raises(ValueError, match="fused"):
        q3r.find_targets(model, ["mlp.fc1"], fused="yes")


def test_pattern_rules_first_override_wins_suffixes_are_dotted_and_tied_weights_count_once():
    model = TinyViT()
    # the first matching rank_overrides pattern wins (both match blocks.0.mlp.fc1)
    got = q3r.find_targets(model, ["mlp.fc1"], target_rank=2, rank_overrides={r"blocks\.0\.mlp\.fc1": 3, "mlp.fc1": 4})
    assert [t.target_rank for t in got] == [3, 4]
    # a suffix pattern matches whole dotted components: "fc1" is not a suffix of "my_fc1"
    net = torch.nn.Sequential()
    net.add_module("my_fc1", torch.nn.Linear(8, 8))
    net.add_module("fc1", torch.nn.Linear(8, 8))
    assert [t.name for t in q3r.find_targets(net, ["fc1"], target_rank=2)] == ["fc1.weight"]
    # a weight shared by two modules (tied) is one target
    net.my_fc1.weight = net.fc1.weight
    assert [t.name for t in q3r.find_targets(net, ["my_fc1", "fc1"], target_rank=2)] == ["my_fc1.weight"]


def _trained(seed, dim=24):
    torch.manual_seed(seed)
    model = TinyViT(dim=dim)
    targets = q3r.find_targets(model, ["attn.qkv", "mlp.fc1"], target_rank=3)
    opt = q3r.AdamQ3R(q3r.param_groups(model, targets, lmbda=0.1, steps=2), lr=1e-2)
    x = torch.randn(4, 3, 5)
    for _ in range(2):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    return model, opt


def test_state_dict_from_a_different_model_is_rejected_before_any_change():
    _, opt = _trained(0)
    _, other = _trained(1, dim=32)
    snapshot = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for p, s in opt.state.items()}
    with pytest.raises(ValueError, match="different model"):
        opt.load_state_dict(other.state_dict())
    for p, s in opt.state.items():
        assert torch.equal(s["exp_avg"], snapshot[id(p)]["exp_avg"])
        if "q3r" in s:
            assert s["q3r"][0]["U"].shape == snapshot[id(p)]["q3r"][0]["U"].shape
    fewer = other.state_dict()
    fewer["param_groups"] = fewer["param_groups"][:-1]
    with pytest.raises(ValueError, match="param groups"):
        opt.load_state_dict(fewer)


def _damaged(sd, damage):
    """A copy of an AdamQ3R state dict with one part of the sliced (qkv) target's state damaged."""
    sd = copy.deepcopy(sd)
    index = next(i for i, st in sd["state"].items() if len(st.get("q3r", {})) == 3)
    st = sd["state"][index]
    if damage == "exp_avg shape":
        st["exp_avg"] = st["exp_avg"][:-1]
    elif damage == "slice count":
        del st["q3r"]["2"]
    return sd


@pytest.mark.parametrize("damage, message", [("exp_avg shape", "exp_avg is"), ("slice count", "2 Q3R slice states for 3 slices")])
def test_a_damaged_state_dict_of_the_same_model_is_refused_before_any_change(damage, message):
    _, opt = _trained(0)
    sd = opt.state_dict()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(_damaged(sd, damage))
    after = opt.state_dict()
    for index, st in before["state"].items():
        assert torch.equal(after["state"][index]["exp_avg"], st["exp_avg"])
        assert after["state"][index].get("q3r", {}).keys() == st.get("q3r", {}).keys()


def test_loaded_q3r_states_are_copied_not_shared():
    """Changing (or reusing) the state dict after loading it must not change the optimizer's
    Q3R state. (The Adam moments follow torch.optim: Optimizer.load_state_dict keeps a tensor
    already of the parameter's dtype and device as it is.)"""
    _, opt = _trained(0)
    _, other = _trained(3)
    sd = other.state_dict()
    opt.load_state_dict(sd)
    expected = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        for slice_state in st.get("q3r", {}).values():
            for value in slice_state.values():
                value.add_(1)  # (U, V, sigma, eps, counts: all of them)
    checked = 0
    for index, st in opt.state_dict()["state"].items():
        for key, slice_state in st.get("q3r", {}).items():
            for name, value in slice_state.items():
                torch.testing.assert_close(value, expected["state"][index]["q3r"][key][name], rtol=0, atol=0,
                                           equal_nan=True, msg=name)
                checked += 1
    assert checked > 0


def test_non_finite_weights_skip_the_refresh_keep_factors_and_warn_once():
    model, opt = _trained(2)  # 2 steps with period 2: the next step refreshes
    fc1 = model.blocks[0].mlp.fc1.weight
    good = {k: v.clone() for k, v in opt.state[fc1]["q3r"][0].items()}
    with torch.no_grad():
        fc1[0, 0] = float("nan")
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):  # two refreshes fall in these steps
            for p in model.parameters():  # finite gradients, so only fc1 is non-finite
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
    messages = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    assert len(messages) == 1 and "blocks.0.mlp.fc1.weight" in messages[0]
    state = opt.state[fc1]["q3r"][0]
    for key in ("U", "V", "sigma", "eps", "refreshes"):
        assert torch.equal(state[key], good[key]), key
    assert int(opt.state[fc1]["step"]) == 6  # the steps themselves still ran
    other = opt.state[model.blocks[1].mlp.fc1.weight]["q3r"][0]
    assert int(other["refreshes"]) == 3 and bool(torch.isfinite(other["U"]).all())


def test_add_reweighting_checks_every_block_before_it_changes_any():
    from q3r import ops

    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(6, 5, generator=gen) for _ in range(3)]
    U, V = torch.linalg.qr(torch.randn(6, 2, generator=gen))[0], torch.linalg.qr(torch.randn(5, 2, generator=gen))[0]
    good = (U, V, torch.tensor([-0.5, -0.2]))
    for bad, match in [((U, V, torch.tensor([-0.5, -0.2, -0.1])), "does not fit factors of width 2"),
                       ((U, V, torch.tensor([3.0, 2.0]), torch.ones(3)), "eps of shape \\(3,\\) does not fit")]:
        outs = [torch.zeros(6, 5) for _ in weights]
        with pytest.raises(ValueError, match=match):
            ops.add_reweighting_(outs, weights, [good, good, bad], 1.0)
        assert all(not o.any() for o in outs)


def test_a_parametrized_weight_is_refused():
    model = torch.nn.Sequential(torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(16, 16)))
    with pytest.raises(TypeError, match="not a parameter but computed"):
        q3r.find_targets(model, ["0"], target_rank=4)


def test_gpt2_cross_attention_c_attn_is_not_cut_into_q_k_v():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=48, n_layer=1, n_head=2, add_cross_attention=True, vocab_size=50)
    model = transformers.GPT2LMHeadModel(config)
    targets = {t.name: t for t in q3r.find_targets(model, ["c_attn"], target_rank=4)}
    assert targets["transformer.h.0.attn.c_attn.weight"].slices == [(0, 48), (48, 96), (96, 144)]
    cross = targets["transformer.h.0.crossattention.c_attn.weight"]  # K and V only, (48, 96)
    assert tuple(cross.param.shape) == (48, 96) and cross.slices is None


def test_targets_of_a_compiled_model_have_the_uncompiled_names():
    """torch.compile wraps the model (and any compiled submodule) in an OptimizedModule whose
    parameter names start with _orig_mod.: patterns, names and checkpoints must not see it."""
    model = TinyViT()
    compiled = torch.compile(model)  # (lazy: nothing is compiled until it is called)
    model.blocks[1] = torch.compile(model.blocks[1])
    plain = TinyViT()
    kwargs = dict(target_rank=2, rank_overrides={r"blocks\.1\.mlp\.fc1": 3})
    got = q3r.find_targets(compiled, ["attn.qkv", "mlp.fc1"], [r"blocks\.0\.attn\..*"], **kwargs)
    want = q3r.find_targets(plain, ["attn.qkv", "mlp.fc1"], [r"blocks\.0\.attn\..*"], **kwargs)
    assert [(t.name, t.slices, t.target_rank) for t in got] == [(t.name, t.slices, t.target_rank) for t in want]
    assert got[-1].param is model.blocks[1]._orig_mod.mlp.fc1.weight
    reg = q3r.Q3R(got, lmbda=0.1)
    reg.penalty()
    q3r.Q3R(want, lmbda=0.1).load_state_dict(reg.state_dict())  # (the same names: it loads)


def test_find_targets_checks_ranks_by_the_rank_rule_it_is_given():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="resolves to rank 0"):
        q3r.find_targets(model, ["0"], target_rank=0.2)  # "params": floor(0.2 * 64 / 16) = 0
    targets = q3r.find_targets(model, ["0"], target_rank=0.2, rank_rule="reference")  # int(0.2 * 8) = 1
    assert q3r.Q3R(targets, rank_rule="reference").configs[0][0].rank == 1


def test_uncovered_ranges_lists_every_gap_between_slices_and_nothing_else():
    # the rows no slice covers get plain Adam (and decay) from AdamQ3R and the fused kernels:
    # a gap of a single row must be listed, and slices that reach the end leave no empty range
    from q3r.targets import uncovered_ranges

    assert uncovered_ranges(10, [(0, 3), (4, 10)]) == [(3, 4)]
    assert uncovered_ranges(10, [(1, 3), (3, 9)]) == [(0, 1), (9, 10)]
    assert uncovered_ranges(9, [(6, 9), (0, 3), (3, 6)]) == []


def test_a_row_between_slices_gets_the_adamw_update_with_its_weight_decay():
    # row 3 belongs to no slice: no Q3R term, but the group's decoupled weight decay and Adam,
    # as torch.optim.AdamW gives it
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(10, 8, generator=gen)
    p, ref = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt = q3r.AdamQ3R([{"params": [p], "q3r": True, "slices": [(0, 3), (4, 10)], "target_rank": 1,
                        "weight_decay": 0.1, "lmbda": 0.5}], lr=1e-2)
    adamw = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        grad = torch.randn(10, 8, generator=gen)
        p.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        adamw.step()
    torch.testing.assert_close(p.detach()[3], ref.detach()[3], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(p.detach()[:3], ref.detach()[:3])  # (the slices do get the Q3R term)


def test_a_qkv_whose_rows_do_not_divide_by_three_is_left_whole():
    # thirds of 10 rows would leave the last row out of every slice (no Q3R term on it): such
    # a weight is no fused Q, K, V
    class Attention(torch.nn.Module):
        num_heads = 2

        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(8, 10)

    model = torch.nn.Sequential(Attention())
    (target,) = q3r.find_targets(model, ["qkv"], target_rank=2)
    assert target.slices is None and target.slice_names() == ["0.qkv.weight"]


def test_param_groups_leave_frozen_parameters_out():
    # param_groups hands the optimizer only trainable parameters: a frozen backbone
    # (fine-tuning) stays out of every group, so nothing can step it (a .grad set on it by
    # other code included) and it takes no optimizer state
    model = TinyViT()
    for p in model.blocks[0].parameters():
        p.requires_grad_(False)
    groups = q3r.param_groups(model, q3r.find_targets(model, ["blocks.1.mlp.fc1"], target_rank=3), weight_decay=0.05)
    grouped = {id(p) for g in groups for p in g["params"]}
    assert not grouped & {id(p) for p in model.blocks[0].parameters()}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "options, message",
    [
        ({"steps": True}, "steps .* got True"),  # a bool is no period, though it is an int
        ({"stagger": 1}, "stagger must be True or False, got 1"),
        ({"stagger": "yes"}, "stagger must be True or False"),
        ({"slices": [(0, 5), (5, 10)], "target_rank": 2, "names": ["only_one"]}, "one name per slice"),
        ({"slices": [(False, 5)], "target_rank": 2}, "pairs of ints"),
        # (True == 1 passed and failed at the first refresh, in narrow(), after the state was made)
        ({"slices": [(0, 5)], "slice_dim": True, "target_rank": 2}, r"slice_dim of .* got True"),
        # (failed with "too many values to unpack", naming neither option nor value)
        ({"slices": [(0, 5, 1)], "target_rank": 2}, r"slices of .*pairs of ints, got \(0, 5, 1\)"),
    ],
)
def test_more_bad_q3r_options_raise_and_change_nothing(options, message):
    # as test_bad_q3r_options_raise_and_change_nothing: refused when the group is added, before
    # anything changes, with the option named
    p = torch.nn.Parameter(torch.randn(10, 8))
    q = torch.nn.Parameter(torch.randn(3))
    opt = q3r.AdamQ3R([{"params": [q]}], lr=1e-3)
    with pytest.raises((ValueError, TypeError), match=message):
        opt.add_param_group({"params": [p], "q3r": True, **options})
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"][0] is q
    with pytest.raises((ValueError, TypeError), match=message):
        q3r.AdamQ3R([{"params": [p], "q3r": True, **options}])


def test_numpy_integer_options_are_taken_as_ints():
    """A rank or a period from a NumPy sweep (np.arange) was refused as "must be an int" while a
    NumPy float lambda was taken; kept as plain ints (a weights_only checkpoint needs them)."""
    np = pytest.importorskip("numpy")
    p = torch.nn.Parameter(torch.randn(10, 8))
    opt = q3r.AdamQ3R([{"params": [p], "q3r": True, "target_rank": np.int64(2), "steps": np.int64(3)}], lr=1e-3)
    assert type(opt.param_groups[0]["target_rank"]) is int and type(opt.param_groups[0]["steps"]) is int
    p.grad = torch.ones_like(p)
    opt.step()
    model = torch.nn.Sequential(torch.nn.Linear(8, 10))
    reg = q3r.Q3R(q3r.find_targets(model, ["0"], target_rank=np.int64(2)), steps=np.int64(3))
    assert type(reg.options["steps"]) is int
    reg.penalty().backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_an_inf_in_low_precision_weights_skips_the_exact_refresh_and_warns(dtype):
    """An inf in a bf16 / fp16 target is non-finite like a NaN: the exact refresh (also taken by
    "auto" for small targets) skips it with one warning. Its check compared in the weight's dtype, where float32's max
    rounds to inf, so inf passed and the SVD raised (a LinAlgError out of AdamQ3R.step)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(24, 20, generator=gen).to(dtype))
    opt = q3r.AdamQ3R([{"params": [p], "q3r": True, "target_rank": 2, "lmbda": 0.1, "steps": 1, "refresh": "exact"}],
                      lr=1e-2)
    p.grad = torch.randn(p.shape, generator=gen).to(dtype)
    opt.step()
    good = {k: v.clone() for k, v in opt.state[p]["q3r"][0].items()}
    with torch.no_grad():
        p[::2] = float("inf")  # (as Adam's fp16 overflow makes them; with one inf LAPACK's SVD returned NaN,
        # which the commit refuses, with many it raised)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    assert sum("non-finite" in str(w.message) for w in caught) == 1
    for key in ("U", "V", "sigma", "eps"):
        assert torch.equal(opt.state[p]["q3r"][0][key], good[key]), key


@pytest.mark.parametrize("rank_rule,target_rank", [("reference", 2), ("params", 0.5), ("reference", 0.5)])
def test_a_zero_size_target_is_refused_naming_it_not_with_a_division_by_zero(rank_rule, target_rank):
    # (the rank's arithmetic divides by min(d1, d2) or d1 + d2, and ran before the check that no
    # rank fits: an nn.Linear(8, 0) failed with a bare ZeroDivisionError naming nothing)
    model = torch.nn.Sequential(torch.nn.Linear(8, 0))
    with pytest.raises(ValueError, match=r"0.weight is a 0x8 matrix: no rank r"):
        q3r.find_targets(model, ["0"], target_rank=target_rank, rank_rule=rank_rule)
    with pytest.raises(ValueError, match=r"no rank r"):
        q3r.reference.resolve_rank(target_rank, 0, 0, rank_rule)


def test_a_target_or_slice_with_one_row_is_refused_naming_it_and_why():
    # (a 1 x N weight, or a one-row slice, was refused as "must satisfy 1 <= rank < 1", naming
    # the weight and not the slice, which read as a bug rather than as a target no rank fits)
    model = torch.nn.Sequential(torch.nn.Linear(8, 1), torch.nn.Linear(8, 5))
    with pytest.raises(ValueError, match=r"0.weight is a 1x8 matrix: no rank r with 1 <= r < min\(d1, d2\) = 1 exists"):
        q3r.find_targets(model, ["0"], target_rank=1)
    with pytest.raises(ValueError, match=r"1.weight slice 1 \(rows 4:5\) is a 1x8 matrix: no rank r"):
        q3r.find_targets(model, ["1"], target_rank=1, slices={"1": (0, [(0, 4), (4, 5)])})

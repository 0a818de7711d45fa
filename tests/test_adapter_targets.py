"""find_targets on adapter-wrapped layers (peft's LoRA): their .weight is the wrapped layer's
frozen weight, without the adapter's update. Such a target was found (a wrapped GPT-2 c_attn
whole, not cut into Q, K, V) and AdamQ3R and penalty() then changed nothing, without a word:
now it is refused with the reason and what to do."""

import importlib.util

import pytest
import torch
from torch import nn

import q3r


class _LoraLike(nn.Module):
    """As peft's lora.Linear: base_layer, adapters, and .weight a property reading the base's."""

    def __init__(self, base: nn.Linear, r: int = 2):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.zeros_(self.lora_B.weight)
        base.requires_grad_(False)

    @property
    def weight(self):
        return self.base_layer.weight

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    model[2] = _LoraLike(model[2])
    return model


def test_an_adapter_wrapped_layer_is_refused_with_the_reason():
    model = _model()
    with pytest.raises(ValueError, match=r"target 2 is an adapter layer .*_LoraLike.* wrapping a Linear: its \.weight "
                                         r"is the wrapped layer's weight \(frozen\).*merge_and_unload"):
        q3r.find_targets(model, ["2"], target_rank=2)
    # (before: found, and a whole AdamQ3R run left the frozen weight as it was, with no warning)
    # the layers around it, and the wrapped layer itself named directly, are found as before
    assert [t.name for t in q3r.find_targets(model, ["0", "4"], target_rank=2)] == ["0.weight", "4.weight"]
    assert [t.name for t in q3r.find_targets(model, ["2.base_layer"], target_rank=2)] == ["2.base_layer.weight"]


def test_a_pattern_that_only_passes_through_adapters_still_finds_the_plain_layers():
    model = _model()
    with pytest.raises(ValueError, match="adapter layer"):
        q3r.find_targets(model, [r"\d+"], target_rank=2)  # (regex: 0, 2 (the adapter) and 4)
    assert len(q3r.find_targets(model, [r"\d+"], exclude=["2"], target_rank=2)) == 2


@pytest.mark.skipif(importlib.util.find_spec("peft") is None or importlib.util.find_spec("transformers") is None,
                    reason="peft / transformers not installed")
def test_peft_lora_on_gpt2_is_refused():
    import peft
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1,
                                                                 n_head=4))
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    with pytest.raises(ValueError, match=r"c_attn is an adapter layer .*wrapping a Conv1D.*\(frozen\)"):
        q3r.find_targets(model, ["attn.c_attn", "mlp.c_fc"], target_rank=0.3)


def test_frozen_targets_are_named_by_param_groups_and_q3r(recwarn):
    # a frozen target gets no gradient, so no term: with peft every weight but the adapters' is
    # frozen, and AdamQ3R over q3r.param_groups (or penalty()) regularized nothing, without a word
    model = _model()
    model[0].requires_grad_(False)
    targets = q3r.find_targets(model, ["0", "4"], target_rank=2)
    with pytest.warns(UserWarning, match=r"q3r.param_groups: 1 of 2 targets are frozen \(requires_grad=False\): "
                                         r"0.weight; .*no Q3R term until they are unfrozen"):
        q3r.param_groups(model, targets)
    with pytest.warns(UserWarning, match=r"Q3R: 1 of 2 targets are frozen .*0.weight"):
        q3r.Q3R(targets)
    model[0].requires_grad_(True)
    recwarn.clear()
    q3r.param_groups(model, targets), q3r.Q3R(targets)
    assert not [w for w in recwarn if "frozen" in str(w.message)]

"""find_targets on a DistributedDataParallel wrapper (what accelerate's prepare returns under a
launcher, e.g. when Q3R is attached after prepare) names the targets as in the model it wraps,
as it does through torch.compile's wrappers. With DDP's "module." prefix, the Q3R state that an
attached Q3R carries in the optimizer's checkpoint did not load where the same script runs
unwrapped (plain ``python``: accelerate does not wrap), and compress(model.module, targets)
failed with "the model has no module 'module....'"; states saved that way still load."""

import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import q3r

PATTERNS = ["0", "2"]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 16), nn.GELU(), nn.Linear(16, 4))


def _train(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(8, 16, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_targets_of_a_ddp_wrapper_are_named_as_in_the_wrapped_model(one_process_group):
    model = _model()
    ddp = DDP(model)
    found = q3r.find_targets(ddp, PATTERNS, target_rank=0.3)
    plain = q3r.find_targets(model, PATTERNS, target_rank=0.3)
    assert [t.name for t in found] == [t.name for t in plain] == ["0.weight", "2.weight"]
    assert all(a.param is b.param for a, b in zip(found, plain))
    small, _ = q3r.compress(model, found, fraction=0.5, copy=True)  # (before: "the model has no module 'module.0'")
    assert type(small[0]).__name__ != "Linear"


def test_a_checkpoint_of_a_ddp_run_resumes_unwrapped_bit_for_bit(one_process_group):
    # the straight run: unwrapped, 5 steps
    straight = _model()
    opt = torch.optim.AdamW(straight.parameters(), lr=1e-2)
    q3r.Q3R(q3r.find_targets(straight, PATTERNS, target_rank=0.3), lmbda=0.5, steps=2).attach(opt)
    _train(straight, opt, 3)
    _train(straight, opt, 2, seed=2)

    # 3 steps under DDP, targets found on the wrapper and Q3R attached after wrapping
    model = _model()
    ddp = DDP(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    q3r.Q3R(q3r.find_targets(ddp, PATTERNS, target_rank=0.3), lmbda=0.5, steps=2).attach(opt)
    _train(ddp, opt, 3)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    assert sorted(saved["opt"]["q3r"][0]["targets"]) == ["0.weight", "2.weight"]

    # resumed unwrapped (before: "holds Q3R states for other target sets (['module.0.weight', ...])")
    resumed = _model()
    resumed.load_state_dict(saved["model"])
    opt = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    reg = q3r.Q3R(q3r.find_targets(resumed, PATTERNS, target_rank=0.3), lmbda=0.5, steps=2)
    reg.attach(opt)
    opt.load_state_dict(saved["opt"])
    assert reg.num_steps == 3
    _train(resumed, opt, 2, seed=2)
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, straight.state_dict()[k]), k


def test_a_state_saved_with_ddps_prefix_still_loads():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    reg = q3r.Q3R(q3r.find_targets(model, PATTERNS, target_rank=0.3), lmbda=0.5, steps=2)
    reg.attach(opt)
    _train(model, opt, 3)
    old = reg.state_dict()
    old["targets"] = {f"module.{k}": v for k, v in old["targets"].items()}  # (as find_targets(ddp) named them)
    other = q3r.Q3R(q3r.find_targets(model, PATTERNS, target_rank=0.3), lmbda=0.5, steps=2)
    other.load_state_dict(old)
    assert other.num_steps == 3
    assert all(torch.equal(a["U"], b["U"]) for k in other.state for a, b in zip(other.state[k], reg.state[k]))
    # through the optimizer's carried copy too
    sd = opt.state_dict()
    sd["q3r"] = [old]
    fresh = _model()
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    reg2 = q3r.Q3R(q3r.find_targets(fresh, PATTERNS, target_rank=0.3), lmbda=0.5, steps=2)
    reg2.attach(opt2)
    opt2.load_state_dict(sd)
    assert reg2.num_steps == 3
    # other names are still refused
    old["targets"] = {f"other.{k}": v for k, v in reg.state_dict()["targets"].items()}
    with pytest.raises(ValueError, match="do not match"):
        other.load_state_dict(old)


def test_targets_of_a_compiled_ddp_wrapper_are_named_as_in_the_wrapped_model(one_process_group):
    """torch.compile(DDP(m)) is what accelerate's prepare returns with a dynamo backend under a
    launcher (DDP first, torch.compile last); its targets kept the "module." prefix that the
    DDP wrapper alone lost, so the same script's checkpoints still did not resume across a run
    with and without the launcher (there: torch.compile(m), no prefix)."""
    model = _model()
    plain = [t.name for t in q3r.find_targets(model, PATTERNS, target_rank=0.3)]
    for wrapped in (torch.compile(DDP(model)), DDP(torch.compile(model)), torch.compile(DDP(torch.compile(model)))):
        found = q3r.find_targets(wrapped, PATTERNS, target_rank=0.3)
        assert [t.name for t in found] == plain == ["0.weight", "2.weight"], type(wrapped).__name__
        assert all(t.param is model.get_parameter(t.name) for t in found)


def test_truncate_weights_on_a_ddp_wrapper_cuts_the_wrapped_weights(one_process_group):
    """truncate_weights_ looks the targets up by name in the model it is given: with the DDP
    wrapper's targets named as in the wrapped model, truncate_weights_(ddp, ...) failed with
    "the model has no parameter '0.weight'" (patterns and find_targets' targets alike), where
    it had cut the weights before. In place, the wrapper's parameters stay the ones DDP averages."""
    from q3r.compress import truncate_weights_

    reference = truncate_weights_(_model(), PATTERNS, fraction=0.5)
    for how in ("patterns", "targets", "compiled"):
        model = _model()
        ddp = DDP(model)
        wrapper = torch.compile(ddp) if how == "compiled" else ddp
        targets = PATTERNS if how == "patterns" else q3r.find_targets(ddp, PATTERNS, target_rank=0.3)
        assert truncate_weights_(wrapper, targets, fraction=0.5) is wrapper
        for k, v in reference.state_dict().items():
            torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0, msg=f"{how}: {k}")
        assert not torch.equal(model[0].weight, _model()[0].weight)  # (cut, not left as it was)


def test_a_pattern_with_a_wrappers_prefix_is_refused_with_the_reason(one_process_group):
    """docs/distributed.md says patterns that start with "module." match nothing there and say
    so: the error said only that they match no module."""
    ddp = DDP(_model())
    with pytest.raises(ValueError, match=r"include patterns \['module\.0'\] match no module of the model; targets are "
                                         r"named as in the model a wrapper wraps .*drop the prefix from \['module\.0'\]"):
        q3r.find_targets(ddp, ["module.0", "2"], target_rank=2)
    with pytest.raises(ValueError, match=r"match no module of the model; targets .*\['_orig_mod\.2'\]"):
        q3r.find_targets(torch.compile(_model()), ["0", "_orig_mod.2"], target_rank=2)
    with pytest.raises(ValueError, match=r"match no module of the model$"):  # (no hint where no prefix is at fault)
        q3r.find_targets(ddp, ["9"], target_rank=2)


def test_a_state_saved_with_ddps_prefix_and_other_ranks_loads_with_the_rank_warning():
    """The saved per-slice ranks are compared by target name: those of a state saved under DDP's
    "module." names (which loads, above) were looked up by the unprefixed names and never
    compared, so a rank-2 state loaded into a rank-3 regularizer without the warning an
    unprefixed one gives."""
    model = _model()
    found = q3r.find_targets(model, PATTERNS, target_rank=2)
    reg = q3r.Q3R([dataclasses.replace(t, name=f"module.{t.name}") for t in found], lmbda=0.5, steps=2)
    reg.penalty()
    saved = reg.state_dict()
    assert sorted(saved["ranks"]) == ["module.0.weight", "module.2.weight"]
    other = q3r.Q3R(q3r.find_targets(model, PATTERNS, target_rank=3), lmbda=0.5, steps=2)
    with pytest.warns(RuntimeWarning, match=r"target_rank of 0.weight \[2\] -> \[3\], target_rank of 2.weight"):
        other.load_state_dict(saved)
    assert other.num_steps == 1
    # through the optimizer's carried copy too
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sd = opt.state_dict()
    sd["q3r"] = [saved]
    resumed = q3r.Q3R(q3r.find_targets(model, PATTERNS, target_rank=3), lmbda=0.5, steps=2)
    resumed.attach(opt)
    with pytest.warns(RuntimeWarning, match=r"target_rank of 0.weight \[2\] -> \[3\]"):
        opt.load_state_dict(sd)
    assert resumed.num_steps == 1

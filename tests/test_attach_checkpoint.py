"""Q3R.attach carries the regularizer's state in the optimizer's state_dict (carry_state)."""

import copy
import io
import warnings

import pytest
import torch

import q3r
from helpers import TinyViT

INCLUDE = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


def _train(model, opt, steps, first_seed):
    for seed in range(first_seed, first_seed + steps):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(6, 4, 5, generator=g), torch.randint(0, 3, (6,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _setup(model, carry_state=True, include=INCLUDE):
    reg = q3r.Q3R(q3r.find_targets(model, include, target_rank=3), lmbda=0.5, steps=3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    handle = reg.attach(opt, carry_state=carry_state)
    return reg, opt, handle


def _round_trip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # (what the HF Trainer's resume does)


def _resumed(model_state, opt_state, carry_state=True):
    model = TinyViT()
    model.load_state_dict(model_state)
    reg, opt, _ = _setup(model, carry_state)
    opt.load_state_dict(opt_state)
    return model, reg, opt


def test_optimizer_checkpoint_alone_resumes_the_regularizer_bit_for_bit():
    torch.manual_seed(0)
    model = TinyViT()
    reg, opt, _ = _setup(model)
    _train(model, opt, 5, 0)  # (step 5: mid-period, the factors of the refresh at step 4 in use)
    model_state, opt_state = _round_trip(copy.deepcopy(model.state_dict())), _round_trip(opt.state_dict())
    _train(model, opt, 6, 100)

    model2, reg2, opt2 = _resumed(model_state, opt_state)
    assert reg2.num_steps == 5
    _train(model2, opt2, 6, 100)
    assert reg2.num_steps == reg.num_steps == 11
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)

    # the test can fail: without the carried state the resumed run refreshes from scratch
    model3, reg3, opt3 = _resumed(model_state, opt_state, carry_state=False)
    assert reg3.num_steps == 0
    _train(model3, opt3, 6, 100)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), model3.parameters()))


def _steps5_checkpoint() -> dict:
    """The optimizer state_dict of AdamW with a steps=5 Q3R attached, after 2 steps (round-tripped)."""
    torch.manual_seed(0)
    model = TinyViT()
    reg = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=3), lmbda=0.5, steps=5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    reg.attach(opt)
    _train(model, opt, 2, 0)
    return _round_trip(opt.state_dict())


def test_a_carried_state_saved_with_other_options_loads_with_the_warning_q3r_load_state_dict_gives():
    """A Trainer resuming a steps=5 run's optimizer.pt into a steps=3 attached Q3R (h64's probe)
    loaded it without a word, where Q3R.load_state_dict of the same state warns."""
    saved = _steps5_checkpoint()

    reg2, opt2, _ = _setup(TinyViT())  # (steps=3)
    with pytest.warns(RuntimeWarning, match=r"attached Q3R\): the checkpoint was saved with other options \(steps 5 -> 3\)"):
        opt2.load_state_dict(saved)
    assert reg2.num_steps == 2 and reg2.options["steps"] == 3
    with warnings.catch_warnings():  # (the same options: quiet)
        warnings.simplefilter("error")
        _setup(TinyViT())[1].load_state_dict(_round_trip(opt2.state_dict()))


class _OwnLoad(torch.optim.AdamW):
    def load_state_dict(self, state_dict):  # (a class that overrides it: attach checks first)
        return super().load_state_dict(state_dict)


@pytest.mark.parametrize("cls", [torch.optim.AdamW, _OwnLoad])
def test_the_warnings_of_a_carried_states_load_name_the_line_that_loads_it(cls):
    """They named torch's eval_frame.py (no Q3R state) and optimizer.py (other options): a fixed
    stacklevel=4 under Optimizer.load_state_dict and its torch._disable_dynamo wrapper."""
    saved = _steps5_checkpoint()
    plain = {k: v for k, v in saved.items() if k != "q3r"}
    for state, message in [(saved, "saved with other options"), (plain, "holds no Q3R state")]:
        model2 = TinyViT()
        reg2 = q3r.Q3R(q3r.find_targets(model2, INCLUDE, target_rank=3), lmbda=0.5, steps=3)
        opt2 = cls(model2.parameters(), lr=3e-3)
        reg2.attach(opt2)
        with pytest.warns(RuntimeWarning if "options" in message else UserWarning, match=message) as record:
            opt2.load_state_dict(state)
        assert [w.filename for w in record] == [__file__], message


def test_a_damaged_carried_state_is_refused_before_the_optimizer_or_regularizer_changes():
    torch.manual_seed(1)
    model = TinyViT()
    reg, opt, _ = _setup(model)
    _train(model, opt, 4, 0)
    saved = _round_trip(opt.state_dict())
    last = reg.targets[-1].name
    saved["q3r"][0]["targets"][last][0]["U"] = saved["q3r"][0]["targets"][last][0]["U"][:-1]

    model2 = TinyViT()
    model2.load_state_dict(model.state_dict())
    reg2, opt2, _ = _setup(model2)
    _train(model2, opt2, 2, 50)
    reg_before = {k: [dict(s) for s in v] for k, v in reg2.state.items()}
    opt_before = copy.deepcopy(opt2.state_dict())
    with pytest.raises(ValueError, match=last):
        opt2.load_state_dict(saved)
    assert reg2.num_steps == 2
    assert all(reg_before[k][i][key] is reg2.state[k][i][key] for k in reg_before
               for i in range(len(reg_before[k])) for key in reg_before[k][i])
    after = opt2.state_dict()
    assert after["q3r"][0]["num_steps"] == 2
    for pid, st in opt_before["state"].items():  # (AdamW's own state: the step count and moments)
        for key, value in st.items():
            assert torch.equal(value, after["state"][pid][key])


def test_a_state_dict_without_it_warns_and_keeps_the_regularizer():
    torch.manual_seed(2)
    model = TinyViT()
    plain = torch.optim.AdamW(model.parameters(), lr=3e-3)
    _train(model, plain, 3, 0)
    reg, opt, _ = _setup(model)
    _train(model, opt, 2, 10)
    with pytest.warns(UserWarning, match="holds no Q3R state"):
        opt.load_state_dict(plain.state_dict())
    assert reg.num_steps == 2
    assert opt.state_dict()["state"][0]["step"] == 3  # (the optimizer's own part loaded)
    other = q3r.Q3R(q3r.find_targets(model, ["mlp.fc1"], target_rank=3), lmbda=0.5, steps=3)
    other_opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    other.attach(other_opt)
    _train(model, other_opt, 1, 20)
    # Q3R states of other targets only: another model or setup, refused before anything loads
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"other target sets \(\[\['blocks.0.mlp.fc1.weight'"):
        opt.load_state_dict(other_opt.state_dict())
    assert reg.num_steps == 2
    after = opt.state_dict()
    for pid, st in before["state"].items():
        assert all(torch.equal(value, after["state"][pid][key]) for key, value in st.items())
    # loaded before attaching, it loads (the optimizer's part; the carried entry is not read)
    fresh = torch.optim.AdamW(model.parameters(), lr=3e-3)
    fresh.load_state_dict(other_opt.state_dict())
    assert fresh.state_dict()["state"][0]["step"] == 1
    reg_quiet, opt_quiet, _ = _setup(TinyViT(), carry_state=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt_quiet.load_state_dict(torch.optim.AdamW(opt_quiet.param_groups[0]["params"]).state_dict())


def test_two_regularizers_on_one_optimizer_each_get_their_own_state_back():
    torch.manual_seed(3)
    model = TinyViT()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    attn = q3r.Q3R(q3r.find_targets(model, ["attn.qkv", "attn.proj"], target_rank=3), lmbda=0.5, steps=2)
    mlp = q3r.Q3R(q3r.find_targets(model, ["mlp.fc1", "mlp.fc2"], target_rank=3), lmbda=0.5, steps=3)
    attn.attach(opt)
    mlp.attach(opt)
    _train(model, opt, 3, 0)
    saved = _round_trip(opt.state_dict())
    assert len(saved["q3r"]) == 2

    opt2 = torch.optim.AdamW(model.parameters(), lr=3e-3)
    mlp2 = q3r.Q3R(q3r.find_targets(model, ["mlp.fc1", "mlp.fc2"], target_rank=3), lmbda=0.5, steps=3)
    attn2 = q3r.Q3R(q3r.find_targets(model, ["attn.qkv", "attn.proj"], target_rank=3), lmbda=0.5, steps=2)
    mlp2.attach(opt2)  # (attached in the other order)
    attn2.attach(opt2)
    opt2.load_state_dict(saved)
    for reg, reg2 in ((attn, attn2), (mlp, mlp2)):
        assert set(reg2.state) == set(reg.state)
        for name in reg.state:
            for s, s2 in zip(reg.state[name], reg2.state[name]):
                assert s.keys() == s2.keys()  # (eps0 is NaN until a geometric schedule sets it: equal_nan)
                assert all(torch.allclose(s[k], s2[k], rtol=0, atol=0, equal_nan=True) for k in s)


def test_removing_the_handle_takes_every_hook_away():
    torch.manual_seed(4)
    model = TinyViT()
    reg, opt, handle = _setup(model)
    handle.remove()
    assert "q3r" not in opt.state_dict()
    _train(model, opt, 2, 0)
    assert reg.num_steps == 0  # (the step hook is gone too)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.load_state_dict(opt.state_dict())
    with pytest.raises(TypeError, match="carry_state"):
        reg.attach(opt, carry_state="yes")


def test_dcp_state_dicts_drop_the_carried_state_and_loading_says_so():
    """torch.distributed.checkpoint's get_state_dict keeps only state and param_groups: the
    optimizer's load warns, and docs/distributed.md's way (the Q3R state saved beside it,
    carry_state=False) resumes quietly."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    torch.manual_seed(5)
    model = TinyViT()
    reg, opt, _ = _setup(model)
    _train(model, opt, 4, 0)
    msd, osd = get_state_dict(model, opt)
    assert set(osd) == {"state", "param_groups"}
    with pytest.warns(UserWarning, match="holds no Q3R state"):
        set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)

    saved = {"model": copy.deepcopy(msd), "optim": copy.deepcopy(osd), "q3r": copy.deepcopy(reg.state_dict())}
    model2 = TinyViT()
    reg2, opt2, _ = _setup(model2, carry_state=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_state_dict(model2, opt2, model_state_dict=saved["model"], optim_state_dict=saved["optim"])
    reg2.load_state_dict(saved["q3r"])
    _train(model, opt, 3, 100)
    _train(model2, opt2, 3, 100)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_handle_is_a_context_manager_and_numpy_options_still_load_weights_only():
    np = pytest.importorskip("numpy")
    torch.manual_seed(6)
    model = TinyViT()
    reg = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=3), lmbda=np.float64(0.5), steps=3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with reg.attach(opt):
        _train(model, opt, 2, 0)
        saved = _round_trip(opt.state_dict())  # (weights_only=True: numpy scalars would fail it)
    assert reg.num_steps == 2 and saved["q3r"][0]["options"]["lmbda"] == 0.5
    assert "q3r" not in opt.state_dict()  # (the with block removed the hooks)
    _round_trip(reg.state_dict())


def test_two_carrying_regularizers_over_the_same_targets_are_refused_and_bad_entries_named():
    model = TinyViT()
    reg, opt, _ = _setup(model)
    twin = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=2), lmbda=0.1, steps=3)
    with pytest.raises(ValueError, match="same targets"):
        twin.attach(opt)
    twin.attach(opt, carry_state=False)  # (its state checkpointed apart)
    _train(model, opt, 2, 0)
    saved = opt.state_dict()
    saved["q3r"] = None
    with pytest.raises(ValueError, match="'q3r' entry must be a list"):
        opt.load_state_dict(saved)
    assert reg.num_steps == 2


def test_a_state_dict_carrying_two_states_for_one_regularizer_is_refused():
    model = TinyViT()
    reg, opt, _ = _setup(model)
    _train(model, opt, 2, 0)
    saved = opt.state_dict()
    saved["q3r"] = saved["q3r"] * 2  # (which of the two would it load?)
    with pytest.raises(ValueError, match="holds 2 Q3R states"):
        opt.load_state_dict(saved)
    assert reg.num_steps == 2


class _CopiesStateFirst(torch.optim.AdamW):
    """As ZeroRedundancyOptimizer.load_state_dict does: write the saved per-parameter state into
    the live state first, then call Optimizer.load_state_dict (which runs the hooks)."""

    def load_state_dict(self, state_dict):
        params = [p for g in self.param_groups for p in g["params"]]
        for index, value in state_dict["state"].items():
            self.state[params[index]] = copy.deepcopy(value)
        super().load_state_dict(state_dict)


def _damaged_and_live(make_opt, seed):
    """A run's optimizer state_dict with one carried factor cut short, and a second run (2 steps
    in) whose optimizer would load it."""
    torch.manual_seed(seed)
    model = TinyViT()
    reg = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=3), lmbda=0.5, steps=3)
    opt = make_opt(model.parameters())
    reg.attach(opt)
    _train(model, opt, 4, 0)
    if hasattr(opt, "consolidate_state_dict"):  # (ZeroRedundancyOptimizer)
        opt.consolidate_state_dict(to=0)
    saved = _round_trip(opt.state_dict())
    last = reg.targets[-1].name
    saved["q3r"][0]["targets"][last][0]["V"] = saved["q3r"][0]["targets"][last][0]["V"][:, :-1]
    model2 = TinyViT()
    model2.load_state_dict(model.state_dict())
    reg2 = q3r.Q3R(q3r.find_targets(model2, INCLUDE, target_rank=3), lmbda=0.5, steps=3)
    opt2 = make_opt(model2.parameters())
    handle = reg2.attach(opt2)
    _train(model2, opt2, 2, 50)
    return saved, last, reg2, opt2, handle


def _moments(opt):
    return {id(p): {k: v.clone() for k, v in opt.state[p].items()} for g in opt.param_groups for p in g["params"]}


def _assert_same_moments(before, opt):
    for g in opt.param_groups:
        for p in g["params"]:
            assert before[id(p)].keys() == opt.state[p].keys()
            assert all(torch.equal(before[id(p)][k], opt.state[p][k]) for k in before[id(p)])


def test_an_optimizer_that_loads_its_state_before_the_hooks_is_left_unchanged_by_a_refused_state():
    saved, last, reg2, opt2, handle = _damaged_and_live(lambda ps: _CopiesStateFirst(ps, lr=3e-3), 5)
    assert "load_state_dict" in vars(opt2)  # (the check-first wrapper on the instance)
    before = _moments(opt2)
    with pytest.raises(ValueError, match=last):
        opt2.load_state_dict(saved)
    assert reg2.num_steps == 2
    _assert_same_moments(before, opt2)  # (without the wrapper: the saved step-4 moments)
    good = copy.deepcopy(saved)
    good["q3r"] = _round_trip(opt2.state_dict())["q3r"]  # (a sound carried state: loads, checked once)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt2.load_state_dict(good)
    handle.remove()
    assert "load_state_dict" not in vars(opt2)  # (the class's own method again)
    assert opt2.load_state_dict.__func__ is _CopiesStateFirst.load_state_dict


def test_check_first_wrappers_of_two_regularizers_chain_and_come_off_in_any_order():
    torch.manual_seed(6)
    model = TinyViT()
    opt = _CopiesStateFirst(model.parameters(), lr=3e-3)
    attn = q3r.Q3R(q3r.find_targets(model, ["attn.qkv", "attn.proj"], target_rank=3), lmbda=0.5, steps=2)
    mlp = q3r.Q3R(q3r.find_targets(model, ["mlp.fc1", "mlp.fc2"], target_rank=3), lmbda=0.5, steps=3)
    h_attn, h_mlp = attn.attach(opt), mlp.attach(opt)
    _train(model, opt, 3, 0)
    saved = _round_trip(opt.state_dict())
    bad = copy.deepcopy(saved)
    name = mlp.targets[0].name
    bad["q3r"][1]["targets"][name][0]["sigma"] = bad["q3r"][1]["targets"][name][0]["sigma"][:-1]
    _train(model, opt, 1, 10)  # (moves the moments and both step counts on)
    before, counts = _moments(opt), (attn.num_steps, mlp.num_steps)
    with pytest.raises(ValueError, match=name):
        opt.load_state_dict(bad)
    _assert_same_moments(before, opt)
    assert (attn.num_steps, mlp.num_steps) == counts
    h_attn.remove()  # (the inner wrapper: becomes a pass-through, the outer one stays)
    with pytest.raises(ValueError, match=name):
        opt.load_state_dict(bad)
    _assert_same_moments(before, opt)
    opt.load_state_dict(saved)
    assert (attn.num_steps, mlp.num_steps) == (counts[0], 3)  # (only mlp still carries its state)
    h_mlp.remove()
    assert "load_state_dict" not in vars(opt)


def test_zero_redundancy_optimizer_is_left_unchanged_by_a_refused_carried_state(tmp_path):
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        make = lambda ps: ZeroRedundancyOptimizer(ps, optimizer_class=torch.optim.AdamW, lr=3e-3)  # noqa: E731
        saved, last, reg2, opt2, _ = _damaged_and_live(make, 7)
        before = _moments(opt2.optim)
        with pytest.raises(ValueError, match=last):
            opt2.load_state_dict(saved)
        assert reg2.num_steps == 2
        _assert_same_moments(before, opt2.optim)
    finally:
        dist.destroy_process_group()


def test_the_state_creating_step_of_get_state_dict_is_not_a_training_step():
    """get_state_dict on a fresh optimizer steps with lr 0 on zero gradients: the attached Q3R
    neither counts it nor puts its term into AdamW's moments (they stay zero, as without it).
    A real step with lr 0 counts, as does one where a target's gradient is not zero."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    torch.manual_seed(8)
    model = TinyViT()
    reg, opt, _ = _setup(model)
    get_state_dict(model, opt)
    assert reg.num_steps == 0 and opt.state  # (the optimizer's state was created)
    assert all(not opt.state[t.param]["exp_avg"].any() for t in reg.targets)

    for group in opt.param_groups:
        group["lr"] = torch.tensor(0.0)
    before = {t.name: t.param.detach().clone() for t in reg.targets}
    _train(model, opt, 1, 0)  # (gradients of the loss: counted, the term added)
    assert reg.num_steps == 1 and all(opt.state[t.param]["exp_avg"].any() for t in reg.targets)
    assert all(torch.equal(before[t.name], t.param) for t in reg.targets)  # (lr 0 moved nothing)
    opt.zero_grad(set_to_none=False)
    reg.targets[0].param.grad[0, 0] = 1.0  # (one target's gradient not zero: a step)
    opt.step()
    assert reg.num_steps == 2
    opt.zero_grad(set_to_none=False)
    opt.step()  # (every gradient zero, every lr 0: skipped)
    assert reg.num_steps == 2
    opt.param_groups[-1]["lr"] = 1e-9
    opt.step()
    assert reg.num_steps == 3


def test_attach_to_an_accelerate_prepared_optimizer_hooks_the_optimizer_it_wraps():
    # Accelerator.prepare returns an AcceleratedOptimizer, a torch.optim.Optimizer subclass that
    # never runs Optimizer.__init__ and steps / saves / loads through .optimizer: attach on it
    # raised "'AcceleratedOptimizer' object has no attribute '_optimizer_step_pre_hooks'"
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)

    def run(wrap):
        torch.manual_seed(0)
        model = TinyViT()
        reg = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=3), lmbda=0.5, steps=3)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        if wrap:
            opt = accelerator.prepare(opt)
            assert type(opt).__name__ == "AcceleratedOptimizer"
        reg.attach(opt)
        _train(model, opt, 4, 0)
        return model, reg, opt

    model, reg, opt = run(wrap=False)
    model_w, reg_w, opt_w = run(wrap=True)
    assert reg_w.num_steps == reg.num_steps == 4
    for a, b in zip(model.parameters(), model_w.parameters()):
        assert torch.equal(a, b)
    # the carried state travels through the wrapper's state_dict / load_state_dict too
    state = _round_trip(opt_w.state_dict())
    assert state["q3r"][0]["num_steps"] == 4
    torch.manual_seed(0)
    model2 = TinyViT()
    model2.load_state_dict(model_w.state_dict())
    reg2 = q3r.Q3R(q3r.find_targets(model2, INCLUDE, target_rank=3), lmbda=0.5, steps=3)
    opt2 = accelerator.prepare(torch.optim.AdamW(model2.parameters(), lr=3e-3))
    reg2.attach(opt2)
    opt2.load_state_dict(state)
    assert reg2.num_steps == 4


def test_attach_to_something_that_is_no_optimizer_says_so():
    model = TinyViT()
    reg = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=3))
    with pytest.raises(TypeError, match="needs a torch.optim.Optimizer"):
        reg.attach(model)


def test_attaching_after_the_optimizer_loaded_a_checkpoint_warns_that_its_q3r_state_was_dropped():
    """torch's load_state_dict keeps only "state" and "param_groups": a checkpoint's carried
    "q3r" entry that no attached Q3R claims is dropped, and nothing keeps it for a Q3R attached
    afterwards (a Trainer callback attaching at on_train_begin, after the resume loaded
    optimizer.pt). That Q3R started again at step 0, and the next checkpoint carried that,
    without a word. attach now warns, and its advice restores the run."""
    torch.manual_seed(0)
    model = TinyViT()
    reg, opt, _ = _setup(model)
    _train(model, opt, 5, 0)
    opt_state = _round_trip(opt.state_dict())
    assert opt_state["q3r"][0]["num_steps"] == 5

    late = torch.optim.AdamW(model.parameters(), lr=3e-3)
    late.load_state_dict(opt_state)  # (before any Q3R is attached: "q3r" is dropped here)
    reg2 = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=3), lmbda=0.5, steps=3)
    with pytest.warns(UserWarning, match=r"already holds state for targets \['blocks.0.attn.qkv.weight'.*dropped"):
        reg2.attach(late)
    assert reg2.num_steps == 0

    # the advice: restore the Q3R first (then attach says nothing), or attach before loading
    late = torch.optim.AdamW(model.parameters(), lr=3e-3)
    late.load_state_dict(opt_state)
    reg3 = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=3), lmbda=0.5, steps=3)
    reg3.load_state_dict(opt_state["q3r"][0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg3.attach(late)
        _setup(TinyViT())  # (a fresh optimizer holds no state: nothing to say)
    assert reg3.num_steps == 5


def _train_with_penalty(model, reg, opt, steps, first_seed):
    for seed in range(first_seed, first_seed + steps):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(6, 4, 5, generator=g), torch.randint(0, 3, (6,), generator=g)
        opt.zero_grad()
        (torch.nn.functional.cross_entropy(model(x), y) + reg.penalty()).backward()
        opt.step()


def test_add_term_false_carries_a_penalty_only_regularizer_in_the_optimizer_state_and_adds_nothing():
    """A Q3R used through penalty() only was in no optimizer checkpoint (the Trainer's
    optimizer.pt): a resume restarted its clock. attach(optimizer, add_term=False) carries its
    state there; the step adds no term and counts no step (penalty() counts them)."""
    def build(model, attached):
        reg = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=3), lmbda=0.5, steps=3)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        if attached:
            reg.attach(opt, add_term=False)
        return reg, opt

    torch.manual_seed(0)
    model = TinyViT()
    plain = copy.deepcopy(model)
    reg, opt = build(model, True)
    reg_plain, opt_plain = build(plain, False)
    _train_with_penalty(model, reg, opt, 5, 0)
    _train_with_penalty(plain, reg_plain, opt_plain, 5, 0)
    assert reg.num_steps == reg_plain.num_steps == 5
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)  # (the step added nothing to what the penalty gave)
    model_state, opt_state = _round_trip(copy.deepcopy(model.state_dict())), _round_trip(opt.state_dict())
    assert "q3r" not in opt_plain.state_dict() and opt_state["q3r"][0]["num_steps"] == 5
    _train_with_penalty(model, reg, opt, 6, 100)

    resumed = TinyViT()
    resumed.load_state_dict(model_state)
    reg2, opt2 = build(resumed, True)
    opt2.load_state_dict(opt_state)
    assert reg2.num_steps == 5
    _train_with_penalty(resumed, reg2, opt2, 6, 100)
    assert reg2.num_steps == reg.num_steps == 11
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)

    with pytest.raises(ValueError, match="this Q3R already carries its state"):
        reg2.attach(opt2, add_term=False)
    with pytest.raises(ValueError, match="would do nothing"):
        reg2.attach(opt2, add_term=False, carry_state=False)
    with pytest.raises(TypeError, match="add_term must be a bool"):
        reg2.attach(opt2, add_term=None)

"""Q3R for any optimizer: autograd penalty, in-place gradient, attach, checkpoints."""

import copy
import io
import math
import warnings

import pytest
import torch

import q3r
from q3r import reference
from helpers import TinyViT, dense_reweighting, sigma_next

INCLUDE = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 4, 5, generator=g), torch.randint(0, 3, (6,), generator=g)


def _task_loss(model, seed):
    x, y = _batch(seed)
    return torch.nn.functional.cross_entropy(model(x), y)


def test_penalty_gradient_is_two_lambda_R():
    torch.manual_seed(0)
    model = TinyViT()
    reg = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=3), lmbda=0.7, steps=5)
    value = reg.penalty()
    value.backward()
    qkv = model.blocks[0].attn.qkv.weight
    for j in range(3):
        W = qkv.detach()[24 * j : 24 * (j + 1)]
        eps = sigma_next(W, 3)
        expected = 2 * 0.7 * dense_reweighting(W, eps, W)
        torch.testing.assert_close(qkv.grad[24 * j : 24 * (j + 1)].double(), expected, rtol=1e-5, atol=1e-6)
    # the value is lambda * sum <W, R(W)>, and non-target parameters get no gradient
    assert model.head.weight.grad is None and model.blocks[0].attn.qkv.bias.grad is None
    expected_value = sum(
        0.7 * float((W * dense_reweighting(W, sigma_next(W, 3), W)).sum())
        for t in reg.targets
        for W in q3r.targets.slice_views(t.param.detach(), t.slice_dim, t.slices)
    )
    assert abs(value.detach().item() - expected_value) < 1e-4 * expected_value


def test_in_place_mode_equals_autograd_mode():
    torch.manual_seed(1)
    a = TinyViT()
    b = copy.deepcopy(a)
    reg_a = q3r.Q3R(q3r.find_targets(a, INCLUDE, target_rank=3), lmbda=0.3, steps=2)
    reg_b = q3r.Q3R(q3r.find_targets(b, INCLUDE, target_rank=3), lmbda=0.3, steps=2)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05)
    for step in range(5):
        opt_a.zero_grad()
        (_task_loss(a, step) + reg_a.penalty()).backward()
        opt_a.step()
        opt_b.zero_grad()
        _task_loss(b, step).backward()
        reg_b.add_grad_()
        opt_b.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    assert reg_a.num_steps == reg_b.num_steps == 5


def test_lambda_can_be_set_between_steps_and_is_checked():
    """A warm-up of the term: reg.lmbda set between steps is the lambda the next term uses
    (penalty and add_grad_), checked as the constructor checks it; a refused value changes
    nothing."""
    torch.manual_seed(3)
    model = TinyViT()
    reg = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=3), lmbda=0.7, steps=5)
    qkv = model.blocks[0].attn.qkv.weight
    first = reg.penalty()
    for bad in (-1.0, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match=r"Q3R: lmbda must be a finite number >= 0, got"):
            reg.lmbda = bad
        assert reg.lmbda == 0.7
    reg.lmbda = 0.35
    torch.testing.assert_close(reg.penalty(), first / 2)  # (same factors: no refresh at step 1)
    reg.lmbda = 0.0
    qkv.grad = torch.zeros_like(qkv)
    reg.add_grad_()
    assert not qkv.grad.any()
    np = pytest.importorskip("numpy")
    reg.lmbda = np.float32(0.25)  # (kept as a plain float: a state dict with it loads weights_only)
    assert type(reg.state_dict()["options"]["lmbda"]) is float


def test_add_grad_with_lambda_zero_counts_its_steps_and_keeps_the_refresh_schedule():
    # (a warm-up that starts the term at lambda 0: the steps still count, so the refreshes fall
    # on steps 0, T, 2T, ... of the run, as with the term on, and R is fresh when lambda rises)
    g = torch.Generator().manual_seed(5)
    W = torch.nn.Parameter(torch.randn(10, 7, generator=g))
    reg = q3r.Q3R([q3r.Target("w", W, target_rank=2)], lmbda=0.0, steps=2, refresh="exact")
    grad = torch.randn(10, 7, generator=g)
    for _ in range(5):
        W.grad = grad.clone()
        reg.add_grad_()
        assert torch.equal(W.grad, grad)  # (no term at lambda 0)
    assert reg.num_steps == 5 and int(reg.state["w"][0]["refreshes"]) == 3  # (steps 0, 2, 4)


def test_a_state_saved_with_other_options_loads_with_a_warning_naming_them():
    """The options stay the loading regularizer's (its factors and step count are the
    checkpoint's); a checkpoint of a steps=5 run loaded into steps=3 said nothing (h53)."""
    torch.manual_seed(4)
    model = TinyViT()
    targets = q3r.find_targets(model, INCLUDE, target_rank=3)
    reg = q3r.Q3R(targets, lmbda=0.7, steps=5)
    reg.penalty()
    saved = reg.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q3r.Q3R(targets, lmbda=0.7, steps=5).load_state_dict(saved)
    other = q3r.Q3R(targets, lmbda=0.7, steps=3)
    with pytest.warns(RuntimeWarning, match=r"saved with other options \(steps 5 -> 3\); this regularizer's are used"):
        other.load_state_dict(saved)
    assert other.options["steps"] == 3 and other.num_steps == 1



def test_a_state_saved_with_other_target_ranks_loads_with_a_warning_naming_them():
    """The ranks are the targets' (find_targets' target_rank), not Q3R options: a checkpoint of
    a rank-3 run loaded into a rank-4 regularizer said nothing (h60), and its next refreshes set
    eps from sigma_5 instead of sigma_4."""
    torch.manual_seed(4)
    model = TinyViT()
    reg = q3r.Q3R(q3r.find_targets(model, ["blocks.0.mlp.fc1"], target_rank=3), lmbda=0.7, steps=5)
    reg.penalty()
    saved = reg.state_dict()
    other = q3r.Q3R(q3r.find_targets(model, ["blocks.0.mlp.fc1"], target_rank=4), lmbda=0.7, steps=5)
    with pytest.warns(RuntimeWarning, match=r"other options \(target_rank of blocks.0.mlp.fc1.weight \[3\] -> \[4\]\)"):
        other.load_state_dict(saved)
    saved.pop("ranks")  # (a checkpoint from before the ranks were saved: nothing to compare)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other.load_state_dict(saved)

def test_attach_adds_gradient_inside_step_and_refreshes_every_T():
    torch.manual_seed(2)
    model = TinyViT()
    reg = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=3), lmbda=0.2, steps=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    reg.attach(opt)
    fc1 = model.blocks[0].mlp.fc1.weight
    refreshes = []
    for step in range(7):
        opt.zero_grad()
        _task_loss(model, step).backward()
        grad_before = fc1.grad.clone()
        W = fc1.detach().clone()
        opt.step()
        s = reg.state["blocks.0.mlp.fc1.weight"][0]
        refreshes.append(int(s["refreshes"]))
        added = fc1.grad - grad_before
        torch.testing.assert_close(added, 0.4 * reference.apply_reweighting(W, *q3r.refresh.operator_of(s)), rtol=1e-5, atol=1e-7)
    assert refreshes == [1, 1, 1, 2, 2, 2, 3]


def test_an_lr_zero_step_with_a_target_without_gradient_is_counted():
    # (only a step with every target's gradient present and all zero is taken for
    # torch.distributed.checkpoint's state creation and left uncounted)
    a, b = torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(6, 5))
    reg = q3r.Q3R([q3r.Target("a", a, target_rank=1), q3r.Target("b", b, target_rank=1)], lmbda=0.1)
    opt = torch.optim.SGD([a, b], lr=0.0)
    reg.attach(opt)
    a.grad = torch.zeros_like(a)
    opt.step()
    assert reg.num_steps == 1
    a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)  # (a's holds the first step's term)
    opt.step()
    assert reg.num_steps == 1  # (both present and zero: a state-creating step)


def test_attach_rejects_target_outside_optimizer():
    model = TinyViT()
    reg = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=3))
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="blocks.0.attn.qkv.weight is not among the optimizer's parameters"):
        reg.attach(opt)


def test_attach_refuses_targets_that_adamq3r_regularizes_itself():
    # attached to AdamQ3R over its own q3r=True targets, Q3R added its term to .grad on top of
    # AdamQ3R's decoupled one: twice the regularization, silently
    model = TinyViT()
    targets = q3r.find_targets(model, INCLUDE, target_rank=3)
    opt = q3r.AdamQ3R(q3r.param_groups(model, targets, lmbda=0.1), lr=1e-3)
    hooks = dict(opt._optimizer_step_pre_hooks)
    with pytest.raises(ValueError, match=r"\['blocks.0.attn.proj.weight', .*in q3r=True param groups"):
        q3r.Q3R(targets).attach(opt)
    assert dict(opt._optimizer_step_pre_hooks) == hooks
    # a plain group of AdamQ3R (no Q3R term there) can still take an attached Q3R
    plain = q3r.AdamQ3R(model.parameters(), lr=1e-3)
    q3r.Q3R(targets).attach(plain)


def test_penalty_and_attach_in_one_step_warn_once_that_the_term_is_added_twice():
    # the README says to use one of the two modes per step; used together, the term reached
    # .grad twice and the step counted twice without a word
    torch.manual_seed(0)
    model = TinyViT()
    reg = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=3), lmbda=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.penalty()  # (before attaching: not a step of this optimizer, no warning for it)
    reg.attach(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _task_loss(model, 0).backward()
        opt.step()  # attach alone: silent
    for step in (1, 2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.zero_grad()
            (_task_loss(model, step) + reg.penalty()).backward()
            opt.step()
        assert len([w for w in caught if "added to the gradients twice" in str(w.message)]) == (step == 1)


@pytest.mark.parametrize("given", ["parameters", "weights"])
def test_q3r_of_parameters_rather_than_targets_names_what_it_needs(given):
    # (it failed with "'Parameter' object has no attribute 'param'", or with
    # "distinct names, got [None, None, ...]")
    model = TinyViT()
    params = model.parameters() if given == "parameters" else [model.head.weight]
    with pytest.raises(TypeError, match="q3r.Target objects .*find_targets.*got a Parameter"):
        q3r.Q3R(params)


def test_attach_refuses_a_second_attach_and_maximizing_groups():
    model = TinyViT()
    reg = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = reg.attach(opt)
    with pytest.raises(ValueError, match="already attached"):
        reg.attach(opt)
    handle.remove()
    reg.attach(opt)  # (attached again once the first hook is gone)
    with pytest.raises(ValueError, match="maximize=True"):
        reg.attach(torch.optim.SGD(model.parameters(), lr=0.1, maximize=True))
    # a group switched to maximize after attach: refused at the step, before anything changes
    opt.param_groups[0]["maximize"] = True
    _task_loss(model, 0).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="maximize=True"):
        opt.step()
    assert reg.num_steps == 0
    assert all(torch.equal(a, p.grad) and torch.equal(b, p) for a, b, p in zip(grads, weights, model.parameters()))


def test_in_place_gradient_touches_only_the_slices_and_keeps_the_buffer():
    torch.manual_seed(3)
    W = torch.nn.Parameter(torch.randn(37, 53))
    target = q3r.Target("w", W, slice_dim=0, slices=[(0, 11), (11, 24), (26, 37)], target_rank=[2, 3, 4])
    reg = q3r.Q3R([target], lmbda=0.5)
    W.grad = torch.randn(37, 53)
    before, storage = W.grad.clone(), W.grad.data_ptr()
    reg.add_grad_()
    assert W.grad.data_ptr() == storage
    assert torch.equal(W.grad[24:26], before[24:26])  # the uncovered rows are untouched
    for (a, b), rank in zip(target.slices, [2, 3, 4]):
        Wj = W.detach()[a:b]
        expected = before[a:b].double() + 2 * 0.5 * dense_reweighting(Wj, sigma_next(Wj, rank), Wj)
        torch.testing.assert_close(W.grad[a:b].double(), expected, rtol=1e-5, atol=1e-5)


def test_column_slices():
    torch.manual_seed(4)
    W = torch.nn.Parameter(torch.randn(20, 45))
    target = q3r.Target("c_attn", W, slice_dim=1, slices=[(0, 15), (15, 30), (30, 45)], target_rank=3)
    reg = q3r.Q3R([target], lmbda=1.0)
    reg.penalty().backward()
    for a, b in target.slices:
        Wj = W.detach()[:, a:b]
        torch.testing.assert_close(W.grad[:, a:b].double(), 2 * dense_reweighting(Wj, sigma_next(Wj, 3), Wj), rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_resumes_identically():
    torch.manual_seed(5)
    model = TinyViT()
    reg = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=3), lmbda=0.2, steps=3)
    for _ in range(4):
        reg.penalty()
    buf = io.BytesIO()
    torch.save(reg.state_dict(), buf)
    buf.seek(0)
    reg2 = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=3), lmbda=0.2, steps=3)
    reg2.load_state_dict(torch.load(buf, weights_only=True))
    assert reg2.num_steps == 4
    for _ in range(3):
        assert torch.equal(reg.penalty(), reg2.penalty())


def test_state_dict_from_other_model_is_rejected_without_change():
    reg = q3r.Q3R(q3r.find_targets(TinyViT(dim=24), INCLUDE, target_rank=3))
    other = q3r.Q3R(q3r.find_targets(TinyViT(dim=32), INCLUDE, target_rank=3))
    other.penalty()
    before = {k: [dict(s) for s in v] for k, v in reg.state.items()}
    with pytest.raises(ValueError, match="do not fit"):
        reg.load_state_dict(other.state_dict())
    assert reg.num_steps == 0 and all(before[k][0]["U"] is reg.state[k][0]["U"] for k in before)


def test_a_negative_step_count_is_refused_and_loaded_factors_are_copies():
    torch.manual_seed(5)
    model = TinyViT()
    reg = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=3), lmbda=0.2, steps=3)
    reg.penalty()
    saved = reg.state_dict()
    twin = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=3), lmbda=0.2, steps=3)
    with pytest.raises(ValueError, match="num_steps"):
        twin.load_state_dict({**saved, "num_steps": -1})
    assert twin.num_steps == 0
    twin.load_state_dict(saved)
    loaded = {name: [s["U"].clone() for s in slices] for name, slices in twin.state.items()}
    for slices in saved["targets"].values():  # changing the loaded dict afterwards changes nothing
        for s in slices:
            s["U"].add_(1.0)
    for name, slices in twin.state.items():
        assert all(torch.equal(s["U"], u) for s, u in zip(slices, loaded[name]))


def test_a_state_dict_of_the_wrong_type_is_refused_naming_what_it_must_be():
    # (None or a list failed with AttributeError "'NoneType' object has no attribute 'get'", a
    # non-dict "targets" or per-target entry with "'int' object is not iterable" / "has no len()")
    reg = q3r.Q3R(q3r.find_targets(TinyViT(), ["attn.proj"], target_rank=3))
    names = list(reg.state)
    with pytest.raises(TypeError, match="state_dict must be a dict .* got NoneType"):
        reg.load_state_dict(None)
    with pytest.raises(TypeError, match="state_dict must be a dict .* got list"):
        reg.load_state_dict([reg.state_dict()])
    with pytest.raises(ValueError, match="'targets' must be a dict .* got int"):
        reg.load_state_dict({"targets": 3, "num_steps": 0})
    with pytest.raises(ValueError, match=f"entry of {names[0]} must be a list of slice states, got int"):
        reg.load_state_dict({"targets": {n: 5 for n in names}, "num_steps": 0})
    assert reg.num_steps == 0


def _saved_with_slice_entries(entry: dict):
    """(model, a Q3R over its attn.proj after one penalty(), that Q3R's state_dict with
    ``entry`` added to every slice state of its first target, that target's name)."""
    torch.manual_seed(7)
    model = TinyViT()
    reg = q3r.Q3R(q3r.find_targets(model, ["attn.proj"], target_rank=3))
    reg.penalty()
    saved = reg.state_dict()
    name = next(iter(saved["targets"]))
    saved["targets"][name] = [{**s, **entry} for s in saved["targets"][name]]
    return model, reg, saved, name


@pytest.mark.parametrize("entry", [{"tail": 5}, {"V_tail": None}])
def test_a_slice_state_entry_that_is_no_tensor_is_refused_naming_it(entry):
    # (it passed the checks and failed in the copy with AttributeError "'int' object has no
    # attribute 'detach'" / "... 'dim'", naming nothing; AdamQ3R's load shares the check)
    model, reg, saved, name = _saved_with_slice_entries(entry)
    key = next(iter(entry))
    twin = q3r.Q3R(q3r.find_targets(model, ["attn.proj"], target_rank=3))
    with pytest.raises(ValueError, match=f"slice state '{key}' must be a tensor, got {type(entry[key]).__name__}"):
        twin.load_state_dict(saved)
    assert twin.num_steps == 0
    opt = q3r.AdamQ3R(q3r.param_groups(model, q3r.find_targets(model, ["attn.proj"], target_rank=3)), lr=0.01)
    reg.penalty().backward()
    opt.step()
    state = opt.state_dict()
    slices = next(s["q3r"] for s in state["state"].values() if "q3r" in s)
    next(iter(slices.values())).update(entry)  # (slices by index, as strings)
    with pytest.raises(ValueError, match=f"slice state '{key}' must be a tensor"):
        q3r.AdamQ3R(q3r.param_groups(model, q3r.find_targets(model, ["attn.proj"], target_rank=3)),
                    lr=0.01).load_state_dict(state)


@pytest.mark.parametrize("value", [torch.zeros(3), torch.tensor(1.0), 3])
def test_a_slice_state_entry_q3r_does_not_keep_is_refused_before_anything_loads(value):
    """A slice state entry that no q3r version writes (a typo, another library's state, an edited
    checkpoint) loaded silently where it was a tensor, kept and saved again with every
    checkpoint (an int one was refused, as 'must be a tensor'). It is refused, naming the entry
    (and AdamQ3R's the parameter), before anything changes, by Q3R.load_state_dict, by
    AdamQ3R.load_state_dict and in the state an attached Q3R carries; the warm-start tail under
    its old name V_tail still loads."""
    model, reg, saved, name = _saved_with_slice_entries({"sigma_hat": value})
    twin = q3r.Q3R(q3r.find_targets(model, ["attn.proj"], target_rank=3))
    with pytest.raises(ValueError, match=rf"Q3R state_dict {name}: slice state has entries \['sigma_hat'\] that q3r does not keep"):
        twin.load_state_dict(saved)
    assert twin.num_steps == 0 and all(s["sigma"].numel() == 0 for s in twin.state[name])
    # carried by an optimizer: refused before the optimizer loads anything
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    twin.attach(opt)
    sd = opt.state_dict()
    model(torch.randn(2, 4, 5)).sum().backward()
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"slice state has entries \['sigma_hat'\]"):
        opt.load_state_dict({**sd, "q3r": [saved]})
    assert twin.num_steps == 1 and torch.equal(opt.state_dict()["state"][0]["exp_avg"], before["state"][0]["exp_avg"])
    # the old name of the warm-start tail is known
    legacy = reg.state_dict()
    legacy["targets"][name] = [{**{k: v for k, v in s.items() if k != "tail"}, "V_tail": s["tail"]}
                               for s in legacy["targets"][name]]
    q3r.Q3R(q3r.find_targets(model, ["attn.proj"], target_rank=3)).load_state_dict(legacy)
    # AdamQ3R: refused naming group, parameter and entry, with nothing loaded
    opt = q3r.AdamQ3R(q3r.param_groups(model, q3r.find_targets(model, ["attn.proj"], target_rank=3)), lr=0.01)
    model(torch.randn(2, 4, 5)).sum().backward()
    opt.step()
    state = opt.state_dict()
    pid = next(pid for pid, s in state["state"].items() if "q3r" in s)
    state["state"][pid]["q3r"]["0"]["sigma_hat"] = value
    fresh = q3r.AdamQ3R(q3r.param_groups(model, q3r.find_targets(model, ["attn.proj"], target_rank=3)), lr=0.01)
    with pytest.raises(ValueError, match=rf"state_dict group \d+ param {pid} .*: slice state has entries \['sigma_hat'\]"):
        fresh.load_state_dict(state)
    assert not fresh.state


@pytest.mark.parametrize("through", ["q3r", "optimizer"])
def test_a_state_loaded_in_inference_mode_trains_on(through):
    # (the loaded copies were inference tensors: the next penalty().backward() failed with
    # "Inference tensors cannot be saved for backward" until a refresh replaced them)
    torch.manual_seed(6)
    model = TinyViT()
    reg = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=3), lmbda=0.2, steps=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    reg.attach(opt)
    reg.penalty()
    saved = reg.state_dict() if through == "q3r" else opt.state_dict()
    twin = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=3), lmbda=0.2, steps=4)
    twin_opt = torch.optim.SGD(model.parameters(), lr=0.01)
    twin.attach(twin_opt)
    with torch.inference_mode():
        (twin if through == "q3r" else twin_opt).load_state_dict(saved)
    assert not any(v.is_inference() for slices in twin.state.values() for s in slices for v in s.values())
    twin.penalty().backward()  # (step 1 of 4: no refresh, the loaded factors are used)
    assert twin.num_steps == 2 and model.blocks[0].attn.proj.weight.grad is not None


def test_one_parameter_under_two_names_is_refused():
    model = TinyViT()
    t = q3r.find_targets(model, ["blocks.0.mlp.fc1"], target_rank=3)[0]
    alias = q3r.Target(name="alias.weight", param=t.param, target_rank=3)
    with pytest.raises(ValueError, match="distinct parameters"):
        q3r.Q3R([t, alias])


def test_diagnostics_report_every_slice():
    torch.manual_seed(6)
    model = TinyViT()
    reg = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=3), lmbda=0.1)
    reg.penalty()
    diag = reg.diagnostics()
    assert diag["blocks.0.attn.qkv.weight[q]/envelope_rank"] == 3.0
    W = model.blocks[0].attn.qkv.weight.detach()[:24]
    assert abs(diag["blocks.0.attn.qkv.weight[q]/sigma_next"] - sigma_next(W, 3)) < 1e-5
    s = torch.linalg.svdvals(W.double())
    assert abs(diag["blocks.0.attn.qkv.weight[q]/tail_energy"] - float(s[3:].square().sum() / s.square().sum())) < 1e-6
    assert 1 <= diag["blocks.0.attn.qkv.weight[q]/effective_rank"] <= 24


def test_diagnostics_of_non_finite_and_zero_weights():
    """A logging call does not end a run whose weights went non-finite (NaN measures, the
    operator's kept); a zero weight has effective rank 0."""
    torch.manual_seed(6)
    model = TinyViT()
    reg = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=3), lmbda=0.1)
    reg.penalty()
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[0, 0] = float("nan")
        model.blocks[0].attn.qkv.weight[:24].zero_()
    diag = reg.diagnostics()
    nan_target = "blocks.0.mlp.fc1.weight"
    assert math.isnan(diag[f"{nan_target}/penalty"]) and math.isnan(diag[f"{nan_target}/effective_rank"])
    assert diag[f"{nan_target}/envelope_rank"] == 3.0
    assert diag["blocks.0.attn.qkv.weight[q]/effective_rank"] == 0.0
    assert diag["blocks.0.attn.qkv.weight[q]/tail_energy"] == 0.0


@pytest.mark.parametrize("dim, method", [(24, "randomized"), (48, "native")])
def test_add_grad_adds_the_terms_of_targets_not_being_refreshed_before_the_refresh_waits(dim, method):
    """Staggered: the gradients of the targets not refreshed at a step get their terms before
    the refresh first waits for the device, the refreshed ones' after its commit; the
    gradients are those of the refresh-first order, bit for bit."""
    from q3r import _native, _refresh_commit, ops, regularizer

    if method == "native" and not _native.available("cpu"):
        pytest.skip("needs the CPU part of q3r._C")

    def run(spy):
        torch.manual_seed(4)
        model = TinyViT(dim=dim)
        reg = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=3), lmbda=0.2, steps=3, stagger=True, refresh=method)
        grads = []
        for step in range(5):
            model.zero_grad()
            _task_loss(model, step).backward()
            spy.append([])
            reg.add_grad_()
            grads.append([p.grad.clone() for p in model.parameters()])
        return reg, grads

    events, add, to_host = [], ops.add_reweighting_, _refresh_commit.to_host
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(regularizer.ops, "add_reweighting_", lambda g, *a, **k: events[-1].append(len(g)) or add(g, *a, **k))
        mp.setattr(_refresh_commit, "to_host", lambda t: events[-1].append("wait") or to_host(t))
        reg, grads = run(events)
    n_slices = sum(len(reg.state[t.name]) for t in reg.targets)
    assert events[0][-1] == n_slices  # step 0 refreshes every target: nothing to do before
    for step in events[1:]:  # terms for the others, the wait(s), terms for the refreshed
        assert step[0] != "wait" and "wait" in step and step[-1] != "wait", step
        assert sum(n for n in events[0] + step if n != "wait") == 2 * n_slices
    real_refresh = q3r.Q3R.refresh

    def refresh_first(self, names=None, before_wait=None):
        real_refresh(self, names)
        if before_wait is not None:
            before_wait()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(q3r.Q3R, "refresh", refresh_first)
        _, plain = run([])
    for step, (a, b) in enumerate(zip(grads, plain)):
        for x, y in zip(a, b):
            assert torch.equal(x, y), step


@pytest.mark.parametrize("mode", ["add_grad_", "attach"])
def test_a_float16_gradient_takes_the_term_scaled_before_it_is_rounded(mode):
    """2 lambda R(W) fits in float16 where R(W) itself does not: R(W) reaches 5/3 max|W| for
    W = 60000 (2 I - J) (8 x 8, rank 1: R(W) = W + 40000 J, diagonal 100000 > 65504). The term
    was rounded to float16 first and scaled there, so the gradient became inf (and the SGD step
    after attach made the weights inf) while penalty() gave 2 lambda R(W) = 20000 finite."""
    n = 8
    W = 60000.0 * (2 * torch.eye(n) - torch.ones(n, n))
    p = torch.nn.Parameter(W.to(torch.float16))
    reg = q3r.Q3R([q3r.Target("w", p, target_rank=1)], lmbda=0.1, refresh="exact")
    p.grad = torch.zeros_like(p)
    if mode == "add_grad_":
        reg.add_grad_()
    else:
        opt = torch.optim.SGD([p], lr=1e-9)  # (lr 0 on zero gradients is a state-creating step)
        reg.attach(opt)
        opt.step()
    expected = 0.2 * (W + 40000.0 * torch.ones(n, n))  # 2 lambda R(W): 20000 on the diagonal, -4000 off it
    assert torch.isfinite(p.grad).all()
    torch.testing.assert_close(p.grad.float(), expected, rtol=2e-3, atol=1.0)
    assert torch.isfinite(p).all()


def test_a_target_with_a_sparse_gradient_is_refused_by_name_before_the_step_counts():
    # (an nn.Embedding(sparse=True) target stepped by SparseAdam failed with "outs[0] has internal
    # overlap" after the step had been counted and refreshed)
    torch.manual_seed(0)
    emb = torch.nn.Embedding(30, 8, sparse=True)
    reg = q3r.Q3R(q3r.find_targets(torch.nn.ModuleDict({"emb": emb}), ["emb"], target_rank=2), lmbda=0.1)
    opt = torch.optim.SparseAdam(list(emb.parameters()), lr=1e-2)
    reg.attach(opt)
    emb(torch.tensor([1, 2, 5])).sum().backward()
    grad, weight = emb.weight.grad.to_dense(), emb.weight.detach().clone()
    with pytest.raises(ValueError, match=r"\['emb.weight'\] have sparse gradients"):
        opt.step()
    assert reg.num_steps == 0 and torch.equal(emb.weight.grad.to_dense(), grad) and torch.equal(emb.weight, weight)
    assert all(s["U"].shape[1] == 0 for s in reg.state["emb.weight"])  # (not refreshed)
    with pytest.raises(ValueError, match="sparse gradients"):
        reg.add_grad_()
    assert reg.num_steps == 0


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_a_checkpointed_loss_with_the_penalty_counts_each_step_once(use_reentrant):
    # (torch.utils.checkpoint recomputes the forward, penalty() included, during the backward
    # pass: each step was counted twice, refreshing at twice the rate, and the weights drifted)
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(3)
    plain = TinyViT()
    checkpointed = copy.deepcopy(plain)
    runs = []
    for model, wrap in ((plain, False), (checkpointed, True)):
        reg = q3r.Q3R(q3r.find_targets(model, INCLUDE, target_rank=3), lmbda=0.5, steps=2)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)

        def loss_of(x, y, model=model, reg=reg):
            return torch.nn.functional.cross_entropy(model(x), y) + reg.penalty()

        for step in range(5):
            x, y = _batch(step)
            x.requires_grad_(use_reentrant)  # (a reentrant checkpoint needs an input that requires grad)
            opt.zero_grad()
            loss = checkpoint(loss_of, x, y, use_reentrant=use_reentrant) if wrap else loss_of(x, y)
            loss.backward()
            opt.step()
        runs.append((reg.num_steps, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0] == 5
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

"""A Q3R attached to an optimizer whose parameters are replaced afterwards: what accelerate's
``prepare`` does under FSDP2 (``Accelerator._prepare_fsdp2``, accelerate 1.15): it shards the model
into new DTensor parameters and swaps them into the param groups of an optimizer built before
(``fsdp2_switch_optimizer_parameters``). The attached Q3R kept the old parameters, which get no
gradient: every step was counted and refreshed the stale weights, and no term was added, without a
word. Each step now checks that the targets are still the optimizer's (accelerate takes that path
only on an accelerator device, so the swap is done here by hand, as it does it)."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

import q3r


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 16), nn.GELU(), nn.Linear(16, 4))


def _targets(model):
    return q3r.find_targets(model, ["0", "2"], target_rank=0.3)


def _swap_parameters(model, optimizer, new_named_parameters):
    """accelerate's switch: the param groups get, for each old parameter, the new one of its name."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [{**g, "params": [new_named_parameters[by_id[id(p)]] for p in g["params"]]} for g in optimizer.param_groups]


def _step(model, opt, x):
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


def test_a_step_after_the_optimizer_lost_the_targets_raises_before_anything_changes():
    model = _model()
    reg = q3r.Q3R(_targets(model), lmbda=0.5, steps=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    reg.attach(opt)
    x = torch.randn(8, 16)
    _step(model, opt, x)
    assert reg.num_steps == 1
    # the model's parameters replaced by new ones, the optimizer's groups switched to them
    new = {n: nn.Parameter(p.detach().clone()) for n, p in model.named_parameters()}
    opt.param_groups[:] = _swap_parameters(model, opt, new)
    for n, p in new.items():
        module, attr = n.rsplit(".", 1)
        setattr(model.get_submodule(module), attr, p)
    before = {n: p.detach().clone() for n, p in new.items()}
    model(x).square().mean().backward()
    with pytest.raises(RuntimeError, match=r"\(2 of 2\) are no longer among the parameters of the optimizer.*attach a new Q3R"):
        opt.step()  # (before: counted as step 2, refreshed the stale weights, added no term)
    assert reg.num_steps == 1
    assert all(torch.equal(p, before[n]) for n, p in new.items())  # (the pre-hook raised before the update)


def test_fsdp2_swap_as_accelerate_does_it_is_refused_and_the_recipe_regularizes(tmp_path):
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        x = torch.randn(8, 16)
        runs = {}
        for mode in ("attached-before", "attached-after", "plain"):
            model = _model()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            reg = q3r.Q3R(_targets(model), lmbda=0.5, steps=2) if mode == "attached-before" else None
            if reg is not None:
                reg.attach(opt)
            old = dict(model.named_parameters())
            fsdp.fully_shard(model, mesh=mesh)
            new = dict(model.named_parameters())
            by_id = {id(p): n for n, p in old.items()}
            for g in opt.param_groups:
                g["params"] = [new[by_id[id(p)]] for p in g["params"]]
            if mode == "attached-before":
                model(x).square().mean().backward()
                with pytest.raises(RuntimeError, match="no longer among the parameters of the optimizer"):
                    opt.step()
                assert reg.num_steps == 0
                continue
            if mode == "attached-after":  # the error's advice: targets found on the prepared (sharded) model
                reg = q3r.Q3R(_targets(model), lmbda=0.5, steps=2)
                reg.attach(opt)
            for _ in range(3):
                _step(model, opt, x)
            if reg is not None:
                assert reg.num_steps == 3
            runs[mode] = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
        assert any(not torch.equal(v, runs["plain"][n]) for n, v in runs["attached-after"].items())
    finally:
        dist.destroy_process_group()

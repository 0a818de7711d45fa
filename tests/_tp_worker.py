"""Worker processes for tests/test_tensor_parallel.py: the test model of _distributed_worker
under tensor parallelism (torch.distributed.tensor.parallel.parallelize_module on a 1-D mesh).

In every block attn.qkv and fc1 are ColwiseParallel (weight Shard(0), the layout of FSDP2's
row shards) and attn.proj and fc2 RowwiseParallel (weight Shard(1): each rank holds a range of
columns). fc2's column slices (0, 40), (40, 75) are so column slices of a column-sharded
weight, the first crossing the shard boundary (75 columns split 38 / 37, torch.chunk); fc1's
75 rows split 38 / 37. Every rank trains on the whole global batch (tensor parallelism splits
the weights, not the data), so the weights must match a single-process run of that batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import q3r
import _distributed_worker as base
from _distributed_worker import DEVICE, OPTIMIZERS, batches, diagnostics_of, full_state, train


def tp_plan(depth: int, plain_mlps: tuple[int, ...] = ()) -> dict:
    """ColwiseParallel / RowwiseParallel for attn.qkv, attn.proj, fc1, fc2 of every block
    (but fc1 / fc2 of the blocks in plain_mlps).

    qkv's output is gathered (Replicate) because the attention views it by heads; proj then
    takes that replicated input. fc1 keeps its output a DTensor (Shard(-1)): handed on as a
    local tensor, fc2's RowwiseParallel would rebuild it with DTensor.from_local, which assumes
    an even split and gets 76 / 74 columns instead of 75 (sharding propagation refuses it)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for i in range(depth):
        plan.update({f"blocks.{i}.attn.qkv": ColwiseParallel(output_layouts=Replicate()),
                     f"blocks.{i}.attn.proj": RowwiseParallel(input_layouts=Replicate())})
        if i not in plain_mlps:
            plan.update({f"blocks.{i}.fc1": ColwiseParallel(use_local_output=False), f"blocks.{i}.fc2": RowwiseParallel()})
    return plan


def tp_model(mesh, dtype=torch.float32):
    """The test model (same initialization as base.make_model) with tp_plan on ``mesh``."""
    from torch.distributed.tensor.parallel import parallelize_module

    model = base.make_model().to(dtype)
    return parallelize_module(model, mesh, tp_plan(len(model.blocks)))


def tp_worker(rank, world, port, out_path, ckpt_dir, oversample):
    """Everything the tests read, in one process group: the forward against the plain model;
    training with each optimizer kind; the factor layout; a DCP save / resume of AdamQ3R and
    of a Q3R regularizer in penalty mode; layouts that must be refused. Rank 0 writes it."""
    from torch.distributed.device_mesh import init_device_mesh

    base._init(rank, world, port)
    q3r.distributed.configure(oversample=oversample)
    mesh = init_device_mesh(DEVICE, (world,))
    results = {"forward": _forward_diff(mesh), "placements": _placements(tp_model(mesh))}
    data = batches()
    for kind in OPTIMIZERS:
        model = tp_model(mesh)
        opt = OPTIMIZERS[kind](model)
        logs = []
        train(model, opt, data, 0, 1, logs)  # (rank 0 of a world of 1: every rank the whole batch)
        results[kind] = {"weights": full_state(model), "logs": logs, "penalties": getattr(opt, "penalty_values", []),
                         "diagnostics": diagnostics_of(opt), "layout": _layout(model, opt)}
        if kind == "adamq3r":  # (this rank's state as torch.save would keep it: DTensor factors)
            results[kind]["state_dict"] = opt.state_dict()
    # the default (narrow) sketch: the Shard(1) targets' range finder on transposed views
    from q3r.distributed.sharded_refresh import SketchOptions

    q3r.distributed.configure(oversample=SketchOptions().oversample)
    model = tp_model(mesh)
    opt = base.make_adamq3r(model)
    train(model, opt, data, 0, 1)
    results["narrow_sketch"] = {"weights": full_state(model), "widths": _layout(model, opt)}
    q3r.distributed.configure(oversample=oversample)
    # bfloat16 weights: the sharded step's float32 update and one rounding
    results["bf16"] = steps_in_bf16(tp_model(mesh, torch.bfloat16), lmbda=0.05)
    results["resume_adamq3r"] = _resume_adamq3r(mesh, f"{ckpt_dir}/adamq3r")
    results["resume_penalty"] = _resume_regularizer(mesh, f"{ckpt_dir}/penalty")
    results["refused"] = _refused_layouts(world)
    # the same dim split on both mesh dims of a (1, world) mesh (the size-1 split: nothing), and a
    # block whose rows' mesh dim has size 1 (a column split only)
    results["nested"] = nested_shard_runs(init_device_mesh(DEVICE, (1, world)), [(0, 0), (1, 1), (0, 1)])
    if rank == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


def steps_in_bf16(model, lmbda: float, steps: int = 3) -> dict[str, torch.Tensor]:
    """``steps`` AdamQ3R steps of the bfloat16 model on fixed random gradients (the same whole
    tensors on every rank, placed like each parameter: no forward pass whose rounding would
    differ between a sharded and an unsharded model): the full weights after."""
    from torch.distributed.tensor import distribute_tensor

    groups = q3r.param_groups(model, base.make_targets(model), lmbda=lmbda, steps=base.PERIOD, refresh="exact")
    opt = q3r.AdamQ3R(groups, lr=3e-3)
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        for p in model.parameters():
            g = (1e-2 * torch.randn(p.shape, generator=gen)).to(torch.bfloat16)
            p.grad = distribute_tensor(g, p.device_mesh, p.placements) if hasattr(p, "placements") else g
        opt.step()
    return full_state(model)


def nested_shard_runs(mesh, cases: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """AdamQ3R (lmbda 0.05, period 2, target rank 5, sketches as wide as the matrix) on one
    37 x 29 weight placed on the 2-D mesh as (Shard(a), Shard(b)) for each (a, b) of cases, on
    fixed random gradients placed like it: its full value after 5 steps, keyed by the
    placements; under "one process", the same run of the plain tensor."""
    from torch.distributed.tensor import Shard, distribute_tensor

    out = {}
    for placements in [None, *([Shard(a), Shard(b)] for a, b in cases)]:
        gen = torch.Generator().manual_seed(11)
        place = (lambda t: t.to(DEVICE)) if placements is None else (lambda t: distribute_tensor(t, mesh, placements))  # noqa: E731
        w = torch.nn.Parameter(place(torch.randn(37, 29, generator=gen)))
        opt = q3r.AdamQ3R([{"params": [w], "q3r": True, "target_rank": 5, "lmbda": 0.05, "steps": 2,
                            "refresh": "exact"}], lr=3e-2)
        for _ in range(5):
            w.grad = place(torch.randn(37, 29, generator=gen))
            opt.step()
        full = w.full_tensor() if placements is not None else w
        out["one process" if placements is None else repr(tuple(placements))] = full.detach().cpu().clone()
    return out


def uneven_block_runs(mesh) -> dict[str, torch.Tensor]:
    """AdamQ3R (lmbda 0.05, period 2, target rank 3, sketches as wide as the matrix) on a 12 x 16
    and a 13 x 16 weight (in that order; the second cut into column slices (0, 5), (5, 16), the
    first crossing the columns' shard boundary) placed (Shard(0), Shard(1)) on the 2-D mesh, on
    fixed random gradients: their full values after 5 steps; under "one process" the same run of
    the plain tensors. 13 rows split 7 / 6: by its local rows the 13 x 16 block is the larger
    on dp rank 0 and ties with the 12 x 16 one on dp rank 1."""
    from torch.distributed.tensor import Shard, distribute_tensor

    shapes, out = [(12, 16), (13, 16)], {}
    for placements in (None, [Shard(0), Shard(1)]):
        gen = torch.Generator().manual_seed(13)
        place = (lambda t: t.to(DEVICE)) if placements is None else (lambda t: distribute_tensor(t, mesh, placements))  # noqa: E731
        ws = [torch.nn.Parameter(place(torch.randn(*shape, generator=gen))) for shape in shapes]
        opt = q3r.AdamQ3R([{"params": [ws[0]], "q3r": True},
                           {"params": [ws[1]], "q3r": True, "slice_dim": 1, "slices": [(0, 5), (5, 16)]}],
                          lr=3e-2, target_rank=3, lmbda=0.05, steps=2, refresh="exact")
        for _ in range(5):
            for w, shape in zip(ws, shapes):
                w.grad = place(torch.randn(*shape, generator=gen))
            opt.step()
        key = "one process" if placements is None else repr(tuple(placements))
        out[key] = [(w.full_tensor() if placements is not None else w).detach().cpu().clone() for w in ws]
    return out


def nonfinite_block_run(mesh) -> dict:
    """AdamQ3R on a 12 x 16 (row slices (0, 3), (3, 12)) and a 13 x 16 (column slices (0, 5),
    (5, 16)) weight placed (Shard(0), Shard(1)) on the 2 x 2 mesh; before the refresh of step 2
    rank 1 (dp 0, tp 1) writes a NaN into its first local entry of the first and an inf into its
    last local entry of the second: row 0, column 8 (row slice 0) and row 6, column 15 (column
    slice 1). Per rank: the non-finite warnings it gave, and each slice's refresh count and a
    fingerprint of its factors after that step (the same on the tp ranks of a row shard?).
    Every rank must take part (collectives)."""
    import warnings

    from torch.distributed.tensor import Shard, distribute_tensor

    shapes, placements = [(12, 16), (13, 16)], [Shard(0), Shard(1)]
    gen = torch.Generator().manual_seed(17)
    ws = [torch.nn.Parameter(distribute_tensor(torch.randn(*shape, generator=gen), mesh, placements))
          for shape in shapes]
    opt = q3r.AdamQ3R([{"params": [ws[0]], "q3r": True, "slices": [(0, 3), (3, 12)], "names": ["w0.a", "w0.b"]},
                       {"params": [ws[1]], "q3r": True, "slice_dim": 1, "slices": [(0, 5), (5, 16)], "names": ["w1.a", "w1.b"]}],
                      lr=3e-2, target_rank=2, lmbda=0.05, steps=2, refresh="exact")
    warned = []
    for step in range(3):
        for w, shape in zip(ws, shapes):
            w.grad = distribute_tensor(torch.randn(*shape, generator=gen), mesh, placements)
        if step == 2 and dist.get_rank() == 1:
            with torch.no_grad():
                ws[0].to_local()[0, 0] = float("nan")
                ws[1].to_local()[-1, -1] = float("inf")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        warned += [str(w.message) for w in caught if "finite" in str(w.message)]
    states = [s for w in ws for s in opt.state[w]["q3r"]]
    same = base.same_factors(states, mesh["tp"].get_group())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {"warned": warned, "refreshes": [int(s["refreshes"]) for s in states],
                                      "same_on_tp": same})
    return everyone


def _forward_diff(mesh) -> float:
    """Largest difference of the logits of the parallelized model from the plain one's."""
    tokens = batches(1)[0][:, :-1].to(DEVICE)
    with torch.no_grad():
        return float((tp_model(mesh)(tokens) - base.make_model()(tokens)).abs().max())


def _placements(model) -> dict[str, str]:
    return {name: repr(tuple(p.placements)) for name, p in model.named_parameters() if hasattr(p, "placements")}


def _slice_states(opt, model, name: str) -> list[dict]:
    """The slice states of target ``name`` (AdamQ3R's, or an attached / penalty Q3R's)."""
    reg = getattr(opt, "q3r_regularizer", None)
    if reg is not None:
        return reg.state[name]
    return opt.state[model.get_parameter(name)]["q3r"]


def _describe(t) -> dict:
    """Type, global shape, placements and local shape of a factor; its whole value; and whether
    every rank holds the same local tensor (the plain factors must be replicated)."""
    sharded = hasattr(t, "to_local")
    local = t.to_local() if sharded else t
    same = None  # (a DTensor's local shards differ, in shape too)
    if not sharded:
        gathered = q3r.distributed.comm.all_gather(local.detach().contiguous(), None)
        same = all(torch.equal(g, gathered[0]) for g in gathered)
    return {"type": type(t).__name__, "shape": tuple(t.shape), "local_shape": tuple(local.shape),
            "placements": repr(tuple(t.placements)) if sharded else None,
            "whole": (t.full_tensor() if sharded else t).detach().cpu().clone(), "same_on_every_rank": same}


def _layout(model, opt) -> dict:
    """U and V of every slice of block 0's fc2 (Shard(1), column slices), proj (Shard(1),
    whole) and qkv (Shard(0), row slices), with the local shape of the weight."""
    out = {}
    for name in ("blocks.0.fc2.weight", "blocks.0.attn.proj.weight", "blocks.0.attn.qkv.weight"):
        p = model.get_parameter(name)
        out[name] = {"W_local_shape": tuple(p.to_local().shape), "W_placements": repr(tuple(p.placements)),
                     "slices": [{"U": _describe(s["U"]), "V": _describe(s["V"])} for s in _slice_states(opt, model, name)]}
    return out


def _resume_adamq3r(mesh, ckpt_dir) -> dict:
    """AdamQ3R saved with torch.distributed.checkpoint after 3 steps, trained 2 more; a fresh
    parallelized model + AdamQ3R loaded from the checkpoint as docs/distributed.md says and
    trained the same 2 steps: both final weights."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    data = batches()
    model = tp_model(mesh)
    opt = base.make_adamq3r(model)
    train(model, opt, data[:3], 0, 1)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt_dir)
    train(model, opt, data[3:], 0, 1)
    out = {"straight": full_state(model)}
    model = tp_model(mesh)
    opt = base.make_adamq3r(model)
    msd, osd = get_state_dict(model, opt)  # template (initializes the optimizer state)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=ckpt_dir, planner=q3r.distributed.FactorLoadPlanner())
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    # the loaded factors of fc2's first slice, before training goes on (V: a DTensor, Shard(0))
    out["loaded_fc2_V"] = _describe(_slice_states(opt, model, "blocks.0.fc2.weight")[0]["V"])
    train(model, opt, data[3:], 0, 1)
    out["resumed"] = full_state(model)
    return out


def _resume_regularizer(mesh, ckpt_dir) -> dict:
    """A Q3R regularizer in penalty mode (AdamW on loss + penalty()), saved after 3 steps with
    its state and resumed into a fresh regularizer that has not refreshed yet (its factors
    zero wide: FactorLoadPlanner widens them): both final weights, or the error."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    data = batches()

    def build():
        model = tp_model(mesh)
        opt = base.make_penalized_adamw(model)
        return model, opt, opt.q3r_regularizer

    model, opt, reg = build()
    train(model, opt, data[:3], 0, 1)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd, "q3r": reg.state_dict()}, checkpoint_id=ckpt_dir)
    train(model, opt, data[3:], 0, 1)
    out = {"straight": full_state(model)}
    model, opt, reg = build()
    out["fresh_fc2_V"] = _describe(reg.state["blocks.0.fc2.weight"][0]["V"])  # the template's, before loading
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd, "q3r": reg.state_dict()}
    try:
        dcp.load(sd, checkpoint_id=ckpt_dir, planner=q3r.distributed.FactorLoadPlanner())
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        reg.load_state_dict(sd["q3r"])
    except Exception as err:  # (reported to the test, which fails on it)
        out["error"] = f"{type(err).__name__}: {str(err)[:3000]}"
        return out
    train(model, opt, data[3:], 0, 1)
    out["resumed"] = full_state(model)
    return out


def _refused_layouts(world) -> dict[str, str]:
    """Layouts q3r does not handle, refused when AdamQ3R / Q3R is built: a weight sharded on two
    mesh dims (a (1, world) mesh: the placements are what counts), and a Shard(1) weight whose
    columns are not split as torch.chunk splits them."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh2 = init_device_mesh(DEVICE, (1, world), mesh_dim_names=("a", "b"))
    mesh1 = init_device_mesh(DEVICE, (world,))
    rank = dist.get_rank()

    def uneven_columns():  # 10 columns split 7 / 3 where torch.chunk gives 5 / 5
        cols = 7 if rank == 0 else 3
        return DTensor.from_local(torch.randn(8, cols), mesh1, [Shard(1)], run_check=False,
                                  shape=torch.Size((8, 10)), stride=(10, 1))

    def strided_other_factor():  # FSDP2's _StridedShard of rows, but not of the later dim's chunks (sf 3, not 2)
        from torch.distributed.tensor.placement_types import _StridedShard

        return DTensor.from_local(torch.randn(8 // world, 10), mesh2, [_StridedShard(0, split_factor=3), Shard(0)],
                                  run_check=False, shape=torch.Size((8, 10)), stride=(10, 1))

    # ((Shard(0), Shard(1)) and (Shard(1), Shard(0)) are blocks, handled: test_fsdp2_over_tensor_parallel_*;
    # the same Shard on two mesh dims is handled too: nested_shard_runs)
    makes = {"(_StridedShard(0), Shard(0))": strided_other_factor}
    if world == 2:
        makes["uneven_columns"] = uneven_columns
    return base.refusals(makes)


def tp_replicas_worker(rank, world, port, out_path, oversample):
    """Data-parallel replicas of a tensor-parallel group on a (2, world // 2) mesh ("dp", "tp"):
    parallelize_module on the tp dim, then torch's replicate (FSDP2-based DDP) on the dp dim, so
    that the targets' placements are (Replicate(), Shard(0)) and (Replicate(), Shard(1)); each
    replica trains on its half of the global batch. Rank 0 writes the final weights per
    optimizer kind and the placements."""
    from torch.distributed._composable.replicate_with_fsdp import replicate
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    base._init(rank, world, port)
    q3r.distributed.configure(oversample=oversample)
    mesh = init_device_mesh(DEVICE, (2, world // 2), mesh_dim_names=("dp", "tp"))
    results = {}
    for kind in OPTIMIZERS:
        model = base.make_model()
        # (block 1's MLP left out of the plan: replicate makes its weights (Replicate(),) DTensors)
        parallelize_module(model, mesh["tp"], tp_plan(len(model.blocks), plain_mlps=(1,)))
        for block in model.blocks:
            replicate(block, mesh=mesh["dp"])
        replicate(model, mesh=mesh["dp"])
        opt = OPTIMIZERS[kind](model)
        train(model, opt, batches(), mesh.get_local_rank("dp"), 2)
        results[kind] = {"weights": full_state(model), "penalties": getattr(opt, "penalty_values", [])}
        results["placements"] = _placements(model)
    if rank == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


def tp_kernels_worker(rank, world, port, out_path, oversample):
    """Tensor-parallel training with the Triton kernels forced (CPU tensors under
    TRITON_INTERPRET=1, which the test environment sets): the fused plans get each rank's shard
    as it is (a Shard(1) weight's local columns, its local factors turned back from the
    transposed frame) and ShardedTerms adds the rest. Rank 0 writes the final weights and what
    the plans took."""
    import os

    from torch.distributed.device_mesh import init_device_mesh

    base._init(rank, world, port)
    os.environ["Q3R_BACKEND"] = "triton"
    q3r.distributed.configure(oversample=oversample)
    mesh = init_device_mesh(DEVICE, (world,))
    results = base.forced_kernel_runs(lambda: tp_model(mesh), 0, 1)  # (every rank the whole batch)
    if rank == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


# ---------------------------------------------------------------- Hugging Face tp_plan="auto"
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HF_STEPS = 4


def save_tiny_llama(path: str) -> None:
    """A tiny random Llama (its config carries Hugging Face's tensor-parallel plan: q/k/v, gate,
    up column-wise, o and down row-wise, the embedding vocabulary-parallel), saved to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    LlamaForCausalLM(config).save_pretrained(path)


def _hf_optimizer(model, kind):
    """AdamQ3R, or AdamW with a Q3R attached / on loss + penalty() (the regularizer or None).
    The embedding is a target too: under tp_plan its gradient comes Replicate(), unlike its
    Shard(0) weight, and the term must still reach the right rows."""
    embedding = q3r.Target("model.embed_tokens.weight", model.get_input_embeddings().weight, target_rank=4)
    targets = [*q3r.find_targets(model, HF_TARGETS, target_rank=0.25), embedding]
    if kind == "adamq3r":
        return q3r.AdamQ3R(q3r.param_groups(model, targets, lmbda=0.1, steps=2, refresh="exact"), lr=3e-3), None
    reg = q3r.Q3R(targets, lmbda=0.1, steps=2, refresh="exact")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    if kind == "q3r_adamw":
        reg.attach(opt)
        return opt, None
    return opt, reg


def hf_train(path: str, kind: str, tp: bool) -> dict[str, torch.Tensor]:
    """HF_STEPS steps of the saved Llama on the same batches, loaded whole or with
    tp_plan="auto" (every rank the whole batch); the full weights at the end."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **({"tp_plan": "auto"} if tp else {}))
    opt, reg = _hf_optimizer(model, kind)
    gen = torch.Generator().manual_seed(1)
    for _ in range(HF_STEPS):
        tokens = torch.randint(0, 64, (2, 16), generator=gen)
        loss = model(tokens, labels=tokens).loss
        if reg is not None:
            loss = loss + reg.penalty()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return full_state(model)


def hf_tp_worker(rank, world, port, path, out_path, oversample):
    """Hugging Face's own tensor parallelism (from_pretrained(tp_plan="auto")) with each
    optimizer kind: the final weights, and the placements of the parameters and of the
    embedding's gradient (Replicate() against its weight's Shard(0): q3r's step must place it
    like the weight before working on local shards)."""
    import os

    from transformers import AutoModelForCausalLM

    # (what torchrun sets: without them from_pretrained loads the model whole, not parallelized)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    base._init(rank, world, port)
    q3r.distributed.configure(oversample=oversample)
    model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto")
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    model(tokens, labels=tokens).loss.backward()
    embedding = model.get_input_embeddings().weight
    results = {"placements": _placements(model),
               "embedding_grad": repr(tuple(embedding.grad.placements)), "embedding": repr(tuple(embedding.placements))}
    results["term"] = hf_term(path, tp=True)
    for kind in OPTIMIZERS:
        results[kind] = hf_train(path, kind, tp=True)
    if rank == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


def hf_term(path: str, tp: bool) -> dict[str, torch.Tensor]:
    """2 lambda R(W) of every target of the saved Llama, whole: Q3R.add_grad_ (refreshing
    first) into zero gradients. The embedding is a target too, its zero gradient placed as a
    backward pass places it under tp_plan: Replicate(), unlike its Shard(0) weight."""
    from torch.distributed.tensor import Replicate
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **({"tp_plan": "auto"} if tp else {}))
    embedding = model.get_input_embeddings().weight
    targets = [*q3r.find_targets(model, HF_TARGETS, target_rank=0.25), q3r.Target("embedding", embedding, target_rank=4)]
    reg = q3r.Q3R(targets, lmbda=0.1, steps=2, refresh="exact")
    for t in targets:
        t.param.grad = torch.zeros_like(t.param)
    if tp:
        embedding.grad = embedding.grad.redistribute(embedding.device_mesh, [Replicate()])
    reg.add_grad_()
    return {t.name: (t.param.grad.full_tensor() if tp else t.param.grad).clone() for t in targets}


# ---------------------------------------------------------------- FSDP2 over tensor parallel
def fsdp_tp_model(mesh):
    """tp_plan on the mesh's "tp" dim, then FSDP2 (fully_shard) over its "dp" dim: the 2-D
    layout of torchtitan's FSDP + TP. qkv and fc1 (ColwiseParallel) become
    (_StridedShard(0), Shard(0)): rows split over both dims; proj and fc2 (RowwiseParallel)
    (Shard(0), Shard(1)): a block of rows x columns on each rank."""
    from torch.distributed.fsdp import fully_shard

    model = tp_model(mesh["tp"])
    for block in model.blocks:
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model


def _block_refresh_checks(mesh, data, dp) -> dict:
    """AdamQ3R on the 2-D layout with the range finder's input perturbed on tp rank 1 only
    (noise of 1e-3 of its largest entry: as if that rank's reductions had rounded otherwise).
    Per rank: which block targets it refreshed (its rows gathered to it), and whether every
    block slice's factors (U's local rows, V, sigma, eps) are bitwise the same on the tp ranks
    of each row shard. Every rank must take part (collectives): call it on all of them."""
    from q3r.distributed import refresh_owners
    from q3r.distributed import sharded_refresh as sharded

    model = fsdp_tp_model(mesh)
    opt = base.make_adamq3r(model)
    names = {id(p): name for name, p in model.named_parameters()}
    tp, owned = mesh.get_local_rank("tp"), set()
    gather_rows, enveloping_svd = refresh_owners.gather_rows, sharded.enveloping_svd

    def gathered(p, layout, owner):
        rows = gather_rows(p, layout, owner)
        if rows is not None:
            owned.add(names[id(p)])
        return rows

    def perturbed(xs, *args, **kwargs):
        if tp == 1:
            gen = torch.Generator().manual_seed(len(xs))
            xs = [x + 1e-3 * x.abs().max() * torch.randn(x.shape, generator=gen).to(x) if x.numel() else x for x in xs]
        return enveloping_svd(xs, *args, **kwargs)

    refresh_owners.gather_rows, sharded.enveloping_svd = gathered, perturbed
    try:
        train(model, opt, data, dp, 2)
    finally:
        refresh_owners.gather_rows, sharded.enveloping_svd = gather_rows, enveloping_svd
    blocks = sorted(n for n, p in model.named_parameters() if n.endswith(("proj.weight", "fc2.weight")))
    states = [s for name in blocks for s in _slice_states(opt, model, name)]
    agree = base.same_factors(states, mesh["tp"].get_group())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {"dp": dp, "tp": tp, "owned": sorted(owned), "agree": agree,
                                      "refreshes": base.refresh_count(opt)})
    return {"ranks": everyone, "slices": len(states)}


def fsdp_tp_worker(rank, world, port, out_path, ckpt_dir, oversample):
    """On a (2, world // 2) ("dp", "tp") mesh: training with each optimizer kind (each dp rank
    its half of the global batch), the factor layout and diagnostics, a DCP save / resume of
    AdamQ3R, and AdamQ3R / attach with the Triton kernels forced (the interpreter on CPU)."""
    import os

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from q3r import ops

    base._init(rank, world, port)
    q3r.distributed.configure(oversample=oversample)
    mesh = init_device_mesh(DEVICE, (2, world // 2), mesh_dim_names=("dp", "tp"))
    dp = mesh.get_local_rank("dp")
    results = {"placements": _placements(fsdp_tp_model(mesh))}
    data = batches()
    for kind in OPTIMIZERS:
        model = fsdp_tp_model(mesh)
        opt = OPTIMIZERS[kind](model)
        logs = []
        train(model, opt, data, dp, 2, logs)
        results[kind] = {"weights": full_state(model), "logs": logs, "penalties": getattr(opt, "penalty_values", []),
                         "diagnostics": diagnostics_of(opt), "layout": _layout(model, opt)}
    # DCP: saved after 3 steps, continued 2; resumed into a fresh model + optimizer
    model = fsdp_tp_model(mesh)
    opt = base.make_adamq3r(model)
    train(model, opt, data[:3], dp, 2)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt_dir)
    train(model, opt, data[3:], dp, 2)
    resume = {"straight": full_state(model)}
    model = fsdp_tp_model(mesh)
    opt = base.make_adamq3r(model)
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=ckpt_dir, planner=q3r.distributed.FactorLoadPlanner())
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    train(model, opt, data[3:], dp, 2)
    resume["resumed"] = full_state(model)
    results["resume"] = resume
    results["block_refresh"] = _block_refresh_checks(mesh, data, dp)
    results["nested"] = nested_shard_runs(mesh, [(0, 0), (1, 1)])
    results["nonfinite_blocks"] = nonfinite_block_run(mesh)
    results["uneven_blocks"] = uneven_block_runs(mesh)
    # FSDP2 over a tensor-parallel dim of size 1: torch places qkv / fc1 (Shard(0), Shard(0))
    thin = init_device_mesh(DEVICE, (world, 1), mesh_dim_names=("dp", "tp"))
    model = fsdp_tp_model(thin)
    opt = base.make_adamq3r(model)
    train(model, opt, data, thin.get_local_rank("dp"), world)
    results["tp_of_one"] = {"placements": _placements(model), "weights": full_state(model),
                            "layout": _layout(model, opt)}
    os.environ["Q3R_BACKEND"] = "triton"
    for kind in ("adamq3r", "q3r_adamw"):
        ops._PLANS.clear()
        model = fsdp_tp_model(mesh)
        opt = OPTIMIZERS[kind](model)
        train(model, opt, data, dp, 2)
        results[f"{kind} kernels"] = {"weights": full_state(model), "plans": sorted({key[0] for key in ops._PLANS})}
    del os.environ["Q3R_BACKEND"]
    if rank == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()

"""Worker processes for the distributed tests (spawned by tests/test_distributed_*.py).

A tiny GPT-style model (fused timm-style qkv with row slices, an MLP whose second weight is cut
into column slices and whose first has a row count that does not split evenly) is trained for a
few steps under DDP or FSDP2 with gloo on CPU; rank 0 writes the final weights, the collective
counts and the checkpoint-resume results to a file that the test compares with a
single-process run of the same global batch.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

import q3r
from q3r.distributed import comm

VOCAB, WIDTH, HIDDEN, SEQ = 17, 32, 75, 8
# CPU + gloo by default; Q3R_TEST_DEVICE=cuda runs the same workers with NCCL (one GPU per rank)
DEVICE = os.environ.get("Q3R_TEST_DEVICE", "cpu")
STEPS, PERIOD, GLOBAL_BATCH = 5, 2, 4


class Attention(nn.Module):
    def __init__(self, width: int, num_heads: int = 4):
        super().__init__()
        self.num_heads = num_heads  # makes "qkv" a timm-style fused target (row slices)
        self.qkv = nn.Linear(width, 3 * width, bias=False)  # a key bias gets no gradient: Adam would amplify noise
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width)
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab=VOCAB, width=WIDTH, hidden=HIDDEN, depth=2, seq=SEQ):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(seq, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, hidden) for _ in range(depth))
        self.head = nn.Linear(width, vocab)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def make_model() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT().to(DEVICE)


def make_targets(model):
    return q3r.find_targets(
        model, ["qkv", "proj", "fc1", "fc2"], target_rank=0.3,
        slices={"fc2": (1, [(0, 40), (40, HIDDEN)])},
    )


def batches(n=STEPS, batch=GLOBAL_BATCH, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, SEQ + 1), generator=gen) for _ in range(n)]


def loss_of(model, tokens):
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def make_adamq3r(model, **options):
    groups = q3r.param_groups(model, make_targets(model), lmbda=0.05, steps=PERIOD, refresh="exact", **options)
    return q3r.AdamQ3R(groups, lr=3e-3)


def make_regularized_adamw(model):
    reg = q3r.Q3R(make_targets(model), lmbda=0.05, steps=PERIOD, refresh="exact")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    reg.attach(opt)
    opt.q3r_regularizer = reg  # for refresh_count
    return opt


def make_penalized_adamw(model):
    """AdamW on loss + Q3R.penalty() (see train)."""
    reg = q3r.Q3R(make_targets(model), lmbda=0.05, steps=PERIOD, refresh="exact")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    opt.q3r_regularizer, opt.q3r_penalty, opt.penalty_values = reg, True, []
    return opt


OPTIMIZERS = {"adamq3r": make_adamq3r, "q3r_adamw": make_regularized_adamw, "q3r_penalty": make_penalized_adamw}


def refresh_count(opt) -> int:
    """Refreshes applied so far, summed over every target slice (AdamQ3R or an attached Q3R)."""
    reg = getattr(opt, "q3r_regularizer", None)
    if reg is not None:
        slices = [s for ss in reg.state.values() for s in ss]
    else:
        local = getattr(opt, "optim", opt)  # (ZeroRedundancyOptimizer: the rank's own optimizer)
        # (slice states ZeroRedundancyOptimizer.load_state_dict wrote are in the saved layout, a
        # dict keyed "0", "1", ..., until AdamQ3R's next step adopts them)
        held = [st.get("q3r", []) for st in local.state.values()]
        slices = [s for ss in held for s in (ss.values() if isinstance(ss, dict) else ss)]
    return sum(int(s["refreshes"]) for s in slices)


def train(model, opt, data, rank=0, world=1, logs=None):
    """Each rank takes its contiguous part of every global batch."""
    from torch.distributed.tensor.debug import CommDebugMode

    for step, tokens in enumerate(data):
        part = tokens.chunk(world)[rank].to(DEVICE)
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model, part)
        if getattr(opt, "q3r_penalty", False):  # refreshes in penalty(): the logs below miss them
            penalty = opt.q3r_regularizer.penalty()
            opt.penalty_values.append(float(penalty.detach()))
            loss = loss + penalty
        loss.backward()
        before = refresh_count(opt)
        with comm.counting() as log, CommDebugMode() as every:
            opt.step()
        if logs is not None:
            # which steps refresh is the optimizer's business (period, staggering): read it off
            logs.append({"step": step, "q3r_calls": log.calls, "q3r_bytes": log.bytes,
                         "ops": [op for op, _ in log.entries], "all_calls": every.get_total_counts(),
                         "refreshed": refresh_count(opt) > before, "first_refresh": before == 0})


def full_state(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.replace("module.", "")] = t.detach().cpu().clone()
    return out


def diagnostics_of(opt) -> dict[str, float]:
    reg = getattr(opt, "q3r_regularizer", None)
    return reg.diagnostics() if reg is not None else opt.diagnostics()


def single_process(kind: str, extras: dict | None = None) -> dict[str, torch.Tensor]:
    """The final weights of one process on the global batches; extras, when given, gets the
    values of Q3R.penalty() along the way (q3r_penalty) and the final diagnostics."""
    model = make_model()
    opt = OPTIMIZERS[kind](model)
    train(model, opt, batches())
    if extras is not None:
        extras.update(penalties=getattr(opt, "penalty_values", []), diagnostics=diagnostics_of(opt))
    return full_state(model)


def single_process_adamq3r(patterns) -> dict[str, torch.Tensor]:
    """The final weights of one process with AdamQ3R on the targets ``patterns`` finds (as
    zero_redundancy builds them)."""
    model = make_model()
    targets = q3r.find_targets(model, patterns, target_rank=0.3)
    opt = q3r.AdamQ3R(q3r.param_groups(model, targets, lmbda=0.05, steps=PERIOD, refresh="exact"), lr=3e-3)
    train(model, opt, batches())
    return full_state(model)


# ------------------------------------------------------------------ workers
def _init(rank, world, port):
    if DEVICE == "cuda":
        torch.cuda.set_device(rank)
    backend = "nccl" if DEVICE == "cuda" else "gloo"
    # a collective one rank skips fails after 5 minutes instead of hanging the suite for 30
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=5))
    torch.set_num_threads(1)


def ddp_worker(rank, world, port, out_path, init=True):
    if init:
        _init(rank, world, port)
    from torch.nn.parallel import DistributedDataParallel as DDP

    results = {}
    for kind in OPTIMIZERS:
        model = make_model()
        ddp = DDP(model, device_ids=[rank] if DEVICE == "cuda" else None)
        opt = OPTIMIZERS[kind](model)
        logs = []
        train(ddp, opt, batches(), rank, world, logs)
        results[kind] = {"weights": full_state(model), "logs": logs, "penalties": getattr(opt, "penalty_values", [])}
    # ranks that do not hold replicas must be refused, not silently mixed
    from q3r.refresh import SliceConfig, new_slice_state

    w = torch.full((6, 4), float(rank), device=DEVICE)
    try:
        q3r.distributed.refresh_slices_([w], [new_slice_state(6, 4, DEVICE)], [SliceConfig("w", 2)])
        results["not_replicas"] = "no error"
    except RuntimeError as err:
        results["not_replicas"] = str(err)
    # ranks that refresh different targets (pipeline stages on the default replicated setting)
    try:
        shapes = [(6, 4)] * (1 + rank)
        q3r.distributed.refresh_slices_([torch.randn(*s, device=DEVICE) for s in shapes],
                                        [new_slice_state(*s, DEVICE) for s in shapes],
                                        [SliceConfig(f"w{i}", 2) for i in range(len(shapes))])
        results["different_targets"] = "no error"
    except RuntimeError as err:
        results["different_targets"] = str(err)
    # the factor exchange by padded all_gather and by one broadcast per owner give the same states
    from q3r.distributed import replicated
    from q3r.refresh import refresh_slices_

    gen = torch.Generator().manual_seed(5)
    ws = [torch.randn(*shape, generator=gen).to(DEVICE) for shape in [(40, 12), (12, 30), (20, 20)]]
    cfgs = [SliceConfig(f"w{i}", 3) for i in range(len(ws))]
    paths = {}
    for name, limit in (("gather", 2.0), ("broadcast", 0.0), ("local", None)):
        states = [new_slice_state(*w.shape, DEVICE) for w in ws]
        with comm.counting() as log:
            if limit is None:
                refresh_slices_(ws, states, cfgs)
            else:
                replicated.PADDING_LIMIT = limit
                replicated.refresh_slices_replicated_(ws, states, cfgs)
        paths[name] = {"ops": [op for op, _ in log.entries], "states": [{k: v.cpu() for k, v in st.items()} for st in states]}
    replicated.PADDING_LIMIT = 2.0
    results["paths"] = paths
    results["zero"] = zero_redundancy(rank, world, configure=True)
    results["zero_unconfigured"] = zero_redundancy(rank, world, configure=False)
    # one target: the rank ZeRO gives it refreshes it, the other has none (it waited for ever)
    results["zero_one_target"] = zero_redundancy(rank, world, configure=False, patterns=["blocks.0.fc1"])
    if rank == 0:
        torch.save(results, out_path)
    if init:
        dist.destroy_process_group()


def zero_redundancy(rank, world, configure: bool, patterns=None) -> dict:
    """DDP + ZeroRedundancyOptimizer(optimizer_class=AdamQ3R), each rank updating and
    refreshing only its share of the targets, with configure(replicated=False) as
    docs/distributed.md said until AdamQ3R found out by itself (``configure``), or without:
    the final weights; the weights of a run saved after 3 steps (consolidate_state_dict),
    resumed into a fresh model and optimizer, and finished; the weights the uninterrupted
    run had then; how many ranks update some target. ``patterns``: the targets (default:
    make_targets')."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    def build():
        model = make_model()
        targets = make_targets(model) if patterns is None else q3r.find_targets(model, patterns, target_rank=0.3)
        groups = q3r.param_groups(model, targets, lmbda=0.05, steps=PERIOD, refresh="exact")
        return model, ZeroRedundancyOptimizer(groups, optimizer_class=q3r.AdamQ3R, lr=3e-3)

    data = batches()
    q3r.distributed.configure(replicated=not configure)
    try:
        model, opt = build()
        ddp = DDP(model, device_ids=[rank] if DEVICE == "cuda" else None)
        train(ddp, opt, data[:3], rank, world)
        opt.consolidate_state_dict(to=0)
        saved = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                 # (a deep copy: a state dict holds the live state tensors, which training changes)
                 "optim": copy.deepcopy(opt.state_dict()) if rank == 0 else None}
        train(ddp, opt, data[3:], rank, world)
        out = {"weights": full_state(model),
               "owns_targets": any(g.get("q3r") and g["params"] for g in opt.optim.param_groups)}
        shared = [saved]
        dist.broadcast_object_list(shared, src=0)  # (a file every rank reads, in a real run)
        model, opt = build()
        model.load_state_dict(shared[0]["model"])
        opt.load_state_dict(shared[0]["optim"])
        train(DDP(model, device_ids=[rank] if DEVICE == "cuda" else None), opt, data[3:], rank, world)
        out["resumed"] = full_state(model)
    finally:
        q3r.distributed.configure(replicated=True)
    owns = [None] * world
    dist.all_gather_object(owns, out.pop("owns_targets"))
    out["ranks_owning_targets"] = sum(owns)
    return out


def _fsdp_model(mesh_shape=None):
    """FSDP2 over all ranks, or HSDP when mesh_shape is (replicas, shards)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh_shape = mesh_shape or (dist.get_world_size(),)
    names = ("replicate", "shard")[-len(mesh_shape):]  # FSDP2 needs names on an HSDP mesh
    mesh = init_device_mesh(DEVICE, mesh_shape, mesh_dim_names=names)
    model = make_model()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fsdp_worker(rank, world, port, out_path, ckpt_dir, oversample, init=True, mesh_shape=None):
    if init:
        _init(rank, world, port)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    q3r.distributed.configure(oversample=oversample)
    results = {}
    for kind in OPTIMIZERS:
        model = _fsdp_model(mesh_shape)
        opt = OPTIMIZERS[kind](model)
        logs = []
        train(model, opt, batches(), rank, world, logs)
        results[kind] = {"weights": full_state(model), "logs": logs, "penalties": getattr(opt, "penalty_values", []),
                         "diagnostics": diagnostics_of(opt)}

    # save after 3 steps, continue 2; a fresh model + optimizer restored from the checkpoint must
    # continue identically
    data = batches()
    model = _fsdp_model(mesh_shape)
    opt = make_adamq3r(model)
    train(model, opt, data[:3], rank, world)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt_dir)
    train(model, opt, data[3:], rank, world)
    straight = full_state(model)
    resumed = resume_from(ckpt_dir, mesh_shape, data[3:], rank, world)
    # factors are sharded like the weights
    qkv = model.blocks[0].attn.qkv.weight
    s = opt.state[qkv]["q3r"][1]
    results["resume"] = {
        "straight": straight, "resumed": resumed,
        "U_type": type(s["U"]).__name__, "U_shape": tuple(s["U"].shape),
        "U_local_rows": s["U"].to_local().shape[0], "W_local_rows": qkv.to_local().shape[0],
        "U_placements": repr(tuple(s["U"].placements)), "W_placements": repr(tuple(qkv.placements)),
    }
    if mesh_shape is not None:
        results["refused"] = _refused_layouts(qkv.device_mesh)
        results["drift"] = _replica_drift(mesh_shape, rank, world)
        results["replica_shares"] = _replica_shares(mesh_shape, rank, world)
        results["shared_warnings"] = _shared_target_warnings(qkv.device_mesh, rank, world)
        results["shared_truncated"] = _shared_truncated_warnings(qkv.device_mesh, rank, world)
    else:
        results["term_paths"] = _term_paths(model, opt)
        results["unsharded_factors"] = _load_unsharded_factors(opt)
        results["compress"] = _compress_sharded(model, rank)
    if rank == 0:
        torch.save(results, out_path)
    if init:
        dist.destroy_process_group()


def _compress_sharded(model, rank) -> dict:
    """compress and its save / load refuse the FSDP2 model (every rank, the model unchanged);
    the recipe their error gives (a full state dict into a dense model on rank 0) compresses."""
    import io

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from q3r.compress import truncate_weights_

    before, errors = full_state(model), {}
    targets = make_targets(model)
    calls = {"compress": lambda: q3r.compress(model, targets, fraction=0.3),
             "truncate_weights_": lambda: truncate_weights_(model, targets, fraction=0.3),
             "save_compressed": lambda: q3r.save_compressed(model, io.BytesIO()),
             "load_compressed": lambda: q3r.load_compressed(model, "never-read.safetensors")}
    for name, call in calls.items():
        try:
            call()
            errors[name] = None
        except TypeError as e:
            errors[name] = str(e)
    same = lambda a, b: a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    out = {"errors": errors, "unchanged": same(before, full_state(model)),
           "still_sharded": type(model.blocks[0].fc1.weight).__name__}
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        dense = make_model()
        dense.load_state_dict(full)
        small, report = q3r.compress(dense, targets, fraction=0.3, copy=True)  # (targets of the sharded model)
        tokens = batches(1)[0][:, :-1]
        truncated = truncate_weights_(dense, targets, fraction=0.3)
        with torch.no_grad():
            out["output_diff"] = float((small(tokens) - truncated(tokens)).abs().max())
        out["factored"] = sorted({type(m).__name__ for m in small.modules() if type(m).__name__.startswith("LowRank")})
        out["weights_match"] = same(before, full)
    return out


def resume_from(ckpt_dir, mesh_shape, data, rank, world) -> dict[str, torch.Tensor]:
    """A fresh FSDP2 model + AdamQ3R restored from a DCP checkpoint (saved on any mesh), then
    trained on data; the full weights at the end."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _fsdp_model(mesh_shape)
    opt = make_adamq3r(model)
    msd, osd = get_state_dict(model, opt)  # template (initializes the optimizer state)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=ckpt_dir, planner=q3r.distributed.FactorLoadPlanner())  # as docs/distributed.md says
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    train(model, opt, data, rank, world)
    return full_state(model)


def _term_paths(model, opt) -> dict[str, float]:
    """ShardedTerms.add_ on this rank's shards: R(X)_r into a bfloat16 tensor (whole, one
    rounding) against float32 (local operator + correction), and R = I for slices never
    refreshed (width-0 factors, U still slice-shaped): it must add X itself."""
    from q3r.distributed.sharded import ShardedTerms
    from q3r.refresh import new_slice_state

    targets = make_targets(model)
    entries = [(t.param, t.slice_dim, t.slices, [(s["U"], s["V"], s["sigma"], s["eps"]) for s in opt.state[t.param]["q3r"]])
               for t in targets]
    terms = ShardedTerms(entries)
    out = {"bf16_vs_fp32": 0.0}
    for t in targets:
        local = t.param.to_local()
        t32, t16 = torch.zeros_like(local), torch.zeros_like(local, dtype=torch.bfloat16)
        terms.add_([(t.param, t32)], 1.0)
        terms.add_([(t.param, t16)], 1.0)
        out["bf16_vs_fp32"] = max(out["bf16_vs_fp32"], float((t16.float() - t32).abs().max() / t32.abs().max()))
    fresh = []
    for t in targets:
        states = [new_slice_state(d1, d2, DEVICE) for d1, d2 in q3r.targets.slice_shapes(t.param.shape, t.slice_dim, t.slices)]
        fresh.append((t.param, t.slice_dim, t.slices, [(s["U"], s["V"], s["sigma"], s["eps"]) for s in states]))
    grads = [torch.zeros_like(t.param) for t in targets]  # DTensors like the parameters
    q3r.distributed.sharded_add_grad_([(*e, 1.0) for e in fresh], grads)
    out["never_refreshed_adds_X"] = all(torch.equal(g.to_local(), t.param.to_local()) for g, t in zip(grads, targets))
    return out


def _load_unsharded_factors(opt) -> str:
    """A state dict whose U of a sharded parameter is a plain tensor (as an unsharded run saves
    it) must be refused: its rows are the slice's, not the shard's."""
    sd = opt.state_dict()
    idx, st = next((i, st) for i, st in sd["state"].items() if "q3r" in st)
    plain = {**st["q3r"]["0"], "U": torch.zeros(3, st["q3r"]["0"]["U"].shape[1])}
    bad = {**sd, "state": {**sd["state"], idx: {**st, "q3r": {**st["q3r"], "0": plain}}}}
    try:
        opt.load_state_dict(bad)
        return "no error"
    except ValueError as err:
        return str(err)


def _replica_drift(mesh_shape, rank, world) -> dict[str, bool]:
    """HSDP: perturb the second replica's shards of one target after STEPS steps; the next
    refresh (the second step after, with PERIOD 2) must make the replicas equal again."""
    import warnings

    assert STEPS % PERIOD == 1  # step STEPS is not a refresh, step STEPS + 1 is
    model = _fsdp_model(mesh_shape)
    opt = make_adamq3r(model)
    data = batches()
    train(model, opt, data, rank, world)
    qkv = model.blocks[0].attn.qkv.weight
    group = qkv.device_mesh.get_group(0)  # the replicate dim

    def equal() -> bool:
        shards = comm.all_gather(qkv.to_local().detach(), group)
        return all(torch.equal(s, shards[0]) for s in shards)

    with torch.no_grad():
        if qkv.device_mesh.get_coordinate()[0] == 1:
            qkv.to_local().add_(1e-3)
    out = {"equal_after_perturbing": equal()}
    train(model, opt, data[:1], rank, world)
    out["equal_before_refresh"] = equal()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, opt, data[1:2], rank, world)
    out["equal_after_refresh"] = equal()
    out["warned"] = any("had drifted apart" in str(w.message) for w in caught)
    # a drift between the replicas of the last shard only (not the first rank's), right before a
    # refresh (a plain step would carry it to the other shards through the term's all-reduce):
    # repaired by that refresh and warned about too
    train(model, opt, data[2:3], rank, world)
    with torch.no_grad():
        if all(c == n - 1 for c, n in zip(qkv.device_mesh.get_coordinate(), mesh_shape)):
            qkv.to_local().add_(1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, opt, data[3:4], rank, world)
    everyone = [None] * world
    dist.all_gather_object(everyone, sum("had drifted apart" in str(w.message) for w in caught))
    out["other_shard"] = {"equal_after_refresh": equal(), "warnings": sum(everyone)}
    out["non_finite"] = _replica_non_finite(qkv.device_mesh, world)
    return out


def _replica_non_finite(mesh, world) -> list[str]:
    """A NaN on the second replica of a (Replicate(), Shard(0)) target's first shard: the resync
    before a refresh copies the first replica's rows over it and says the cause was non-finite
    weights (it said only 'drifted apart'). Every rank's q3r warnings."""
    import warnings

    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from q3r.distributed.sharded_refresh import _resync_replicas_

    w = distribute_tensor(torch.randn(8, 6, generator=torch.Generator().manual_seed(2)).to(DEVICE), mesh,
                          [Replicate(), Shard(0)])
    with torch.no_grad():
        if list(mesh.get_coordinate()) == [1, 0]:
            w.to_local()[0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _resync_replicas_([w], ["w"])
    everyone = [None] * world
    dist.all_gather_object(everyone, [str(m.message) for m in caught if str(m.message).startswith("q3r")]
                           + ([] if torch.isfinite(w.to_local()).all() else ["still non-finite"]))
    return [m for ms in everyone for m in ms]


def same_factors(states: list[dict], group) -> bool:
    """Whether every rank of group holds bitwise the same factors (U's local rows, V, sigma,
    eps) in these slice states: per slice a float64 fingerprint (the sizes, and sums weighted
    by position, so a difference in any bit shows, almost surely), compared over the group."""
    def fingerprint(t: torch.Tensor) -> float:
        return float((t.double().reshape(-1) * torch.linspace(1, 2, t.numel(), dtype=torch.float64)).sum())

    parts = [[s["U"].to_local(), s["V"], s["sigma"], s["eps"]] for s in states]
    mine = torch.tensor([[float(t.numel()) for t in ts] + [fingerprint(t) for t in ts] for ts in parts],
                        dtype=torch.float64)
    return all(torch.equal(other, mine) for other in comm.all_gather(mine, group))


def _replica_shares(mesh_shape, rank, world) -> list[dict]:
    """AdamQ3R on HSDP, counting on each rank the slices its range finder factors (the calls of
    sharded_refresh.enveloping_svd) over the run; then per rank its mesh coordinate, that count, and
    whether the factors of every slice are bitwise those of the other replica. Every rank must
    take part (collectives)."""
    from q3r.distributed import sharded_refresh as sharded

    model = _fsdp_model(mesh_shape)
    opt = make_adamq3r(model)
    factored, enveloping_svd = [0], sharded.enveloping_svd

    def counted(xs, *args, **kwargs):
        factored[0] += len(xs)
        return enveloping_svd(xs, *args, **kwargs)

    sharded.enveloping_svd = counted
    try:
        train(model, opt, batches(), rank, world)
    finally:
        sharded.enveloping_svd = enveloping_svd
    mesh = model.blocks[0].attn.qkv.weight.device_mesh
    states = [s for p in model.parameters() for s in opt.state.get(p, {}).get("q3r", [])]
    same = same_factors(states, mesh.get_group(0))
    everyone = [None] * world
    dist.all_gather_object(everyone, {"coordinate": mesh.get_coordinate(), "factored": factored[0],
                                      "slices": len(states), "refreshes": refresh_count(opt), "same": same})
    return everyone


def _shared_target_warnings(mesh, rank, world) -> dict[str, list]:
    """Targets whose refresh one rank of a group does (refresh_owners: replicas, (Replicate(),
    Shard(0)), and blocks, (Shard(0), Shard(1)), on the 2-D mesh), of 12, 10 and 4 rows, the
    first refreshed every 3 steps, the others every 2: the 10-row one is dealt to the second
    rank of its group at step 0 (with the 12-row one due) and to the first at steps 2 and 4.
    Its weights are non-finite from step 0 on, on every rank. Per placement, the q3r warnings
    each rank gave over 6 steps (a single process warns once). Every rank must take part."""
    import warnings

    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    out = {}
    for name, placements in (("replicas", [Replicate(), Shard(0)]), ("blocks", [Shard(0), Shard(1)])):
        gen = torch.Generator().manual_seed(3)
        shapes = [(12, 16), (10, 16), (4, 16)]
        weights = [nn.Parameter(distribute_tensor(torch.randn(*shape, generator=gen).to(DEVICE), mesh, placements))
                   for shape in shapes]
        with torch.no_grad():
            weights[1].to_local().fill_(float("nan"))
        opt = q3r.AdamQ3R([{"params": [w], "q3r": True, "target_rank": 2, "lmbda": 0.05, "steps": steps,
                            "refresh": "exact"} for w, steps in zip(weights, (3, 2, 2))], lr=1e-2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(6):
                for w, shape in zip(weights, shapes):
                    w.grad = distribute_tensor(torch.randn(*shape, generator=gen).to(DEVICE), mesh, placements)
                opt.step()
        mine = [str(w.message) for w in caught if str(w.message).startswith("q3r")]
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        out[name] = [m for ms in everyone for m in ms]
    return out


def _shared_truncated_warnings(mesh, rank, world) -> dict[str, list]:
    """A shared target (replicas, (Replicate(), Shard(0)), and blocks, (Shard(0), Shard(1)))
    whose envelope outgrows its sketch with no widening allowed: 96 x 96, rank 8, 8 leading
    singular values over a bulk of 1e-3 at the first refresh (eps = sigma_9, about 1e-3), the
    bulk raised to 0.5 by the second, so that all 96 lie above eps and fill the warm sketch of
    24. A larger target (128 x 96, refreshed with it) is dealt to the first rank of each group,
    so the truncated one is refreshed by the second while the mesh's first rank warns: through
    refresh_owners.share_'s header. Per placement, the q3r warnings each rank gave over 3
    steps (a single process warns once). Every rank must take part."""
    import warnings

    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    gen = torch.Generator().manual_seed(5)
    left, right = (torch.linalg.qr(torch.randn(96, 96, dtype=torch.float64, generator=gen)).Q for _ in range(2))
    sequence = [((left * torch.cat([torch.linspace(1.0, 0.5, 8, dtype=torch.float64),
                                    torch.full((88,), bulk, dtype=torch.float64)])) @ right.T).float()
                for bulk in (1e-3, 0.5, 0.5)]
    big = torch.randn(128, 96, generator=gen)
    out, defaults = {}, dataclasses.asdict(q3r.distributed.SKETCH)
    # (the rules that would sketch it wider or exactly off; the oversampling the widths above assume)
    q3r.distributed.configure(oversample=16, max_widenings=0, max_envelope_growth=10**9, max_lag=1.0, max_residual=1.0,
                              flat_tolerance=-1.0)
    try:
        for name, placements in (("replicas", [Replicate(), Shard(0)]), ("blocks", [Shard(0), Shard(1)])):
            weights = [nn.Parameter(distribute_tensor(t.to(DEVICE), mesh, placements)) for t in (big, sequence[0])]
            opt = q3r.AdamQ3R([{"params": weights, "q3r": True, "target_rank": 8, "lmbda": 0.05, "steps": 1}], lr=1e-2)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for W in sequence:
                    with torch.no_grad():
                        weights[1].copy_(distribute_tensor(W.to(DEVICE), mesh, placements))
                    for w in weights:
                        w.grad = torch.zeros_like(w)
                    opt.step()
            mine = [str(w.message) for w in caught if str(w.message).startswith("q3r")]
            everyone = [None] * world
            dist.all_gather_object(everyone, mine)
            out[name] = [m for ms in everyone for m in ms]
    finally:
        q3r.distributed.configure(**defaults)
    return out


def _refused_layouts(mesh) -> dict[str, str]:
    """Layouts q3r does not handle must be refused when the optimizer / regularizer is built."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    def uneven():  # Shard(0) rows split 5 / 3 over the shard dim, where FSDP2 (torch.chunk) gives 4 / 4
        rows = 5 if mesh.get_local_rank(1) == 0 else 3
        return DTensor.from_local(torch.randn(rows, 6), mesh, [Replicate(), Shard(0)], run_check=False,
                                  shape=torch.Size((8, 6)), stride=(6, 1))

    def strided(placements):  # FSDP2's _StridedShard, but not of a later mesh dim's row chunks
        return lambda: DTensor.from_local(torch.randn(4, 3), mesh, placements, run_check=False,
                                          shape=torch.Size((8, 6)), stride=(6, 1))

    # (Replicate + Shard(1), tensor parallel's RowwiseParallel with replicas, Shard(0) + Shard(1), FSDP2 over
    # it, and the same Shard twice are handled: tests/test_tensor_parallel.py)
    return refusals({"strided_columns": strided([_StridedShard(1, split_factor=2), Shard(1)]),
                     "strided_later": strided([Shard(0), _StridedShard(0, split_factor=2)]),
                     "uneven_rows": uneven})


def refusals(makes: dict) -> dict[str, str]:
    """For each label -> make() of a weight: "<error type>: <message>" (or "no error") of
    building AdamQ3R, and a Q3R, with it as a target (keys "AdamQ3R <label>", "Q3R <label>")."""
    out = {}
    for label, make in makes.items():
        w = nn.Parameter(make())
        for who, build in (("AdamQ3R", lambda: q3r.AdamQ3R([{"params": [w], "q3r": True, "target_rank": 2}])),
                           ("Q3R", lambda: q3r.Q3R([q3r.Target("w", w, target_rank=2)]))):
            try:
                build()
                out[f"{who} {label}"] = "no error"
            except Exception as err:  # (any error is reported to the test, which checks its type)
                out[f"{who} {label}"] = f"{type(err).__name__}: {err}"
    return out


def both_worker(rank, world, port, ddp_path, fsdp_path, ckpt_dir, oversample):
    """DDP then FSDP2 in one process group: one spawn (process start-up dominates on CPU)."""
    _init(rank, world, port)
    ddp_worker(rank, world, port, ddp_path, init=False)
    fsdp_worker(rank, world, port, fsdp_path, ckpt_dir, oversample, init=False)
    dist.destroy_process_group()


def hsdp_worker(rank, world, port, out_path, ckpt_dir, oversample, saved_ckpt, reshard_path):
    """fsdp_worker on a 2-D mesh: 2 replica groups of world // 2 shards (HSDP). Then the
    checkpoint saved_ckpt (written by fsdp_worker on world // 2 ranks after 3 steps) is resumed
    here for the last steps on a 1-D mesh of all ranks (each weight and U split in twice as
    many shards) and on the HSDP mesh."""
    _init(rank, world, port)
    fsdp_worker(rank, world, port, out_path, ckpt_dir, oversample, init=False, mesh_shape=(2, world // 2))
    rest = batches()[3:]
    resumed = {f"{shape}": resume_from(saved_ckpt, shape, rest, rank, world) for shape in ((world,), (2, world // 2))}
    # FSDP2 on all ranks: some hold no rows of some qkv slices
    for kind in ("q3r_adamw", "q3r_penalty"):
        model = _fsdp_model((world,))
        opt = OPTIMIZERS[kind](model)
        train(model, opt, batches(), rank, world)
        resumed[f"{kind} on ({world},)"] = full_state(model)
    if rank == 0:
        torch.save(resumed, reshard_path)
    dist.destroy_process_group()


def fsdp_kernels_worker(rank, world, port, out_path, oversample):
    """FSDP2 training with the Triton kernels forced (on CPU tensors: under TRITON_INTERPRET=1,
    which the test environment sets), with what the fused plans took."""
    _init(rank, world, port)
    os.environ["Q3R_BACKEND"] = "triton"
    q3r.distributed.configure(oversample=oversample)
    results = forced_kernel_runs(_fsdp_model, rank, world)
    if rank == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


def forced_kernel_runs(build, rank, world) -> dict:
    """Each optimizer kind trained on build() (with Q3R_BACKEND=triton set by the caller): the
    final weights and what the fused plans took."""
    from q3r import ops

    results = {}
    for kind in OPTIMIZERS:
        ops._PLANS.clear()
        model = build()
        opt = OPTIMIZERS[kind](model)
        train(model, opt, batches(), rank, world)
        plans = {key[0]: entry for key, entry in ops._PLANS.items()}  # the last of each kind
        adam = plans.get("adam")
        results[kind] = {
            "weights": full_state(model), "plans": sorted(plans),
            "q3r_regions": 0 if adam is None else sum(j is not None for _, j, _ in adam.region_map),
            "rejected": None if adam is None else len(adam.rejected),
        }
    return results


def sharded_refresh_worker(rank, world, port, cases_path, out_path, ckpt_dir, mesh_shape=None):
    """refresh_sharded_ of row-sharded copies of the weight sequences in cases_path ({name:
    (rank, [W at each refresh], q3r.distributed.configure options)}), on a 1-D mesh or an HSDP
    one (mesh_shape = (replicas, shards): rows sharded over the second dim); rank 0 writes, per case
    and refresh, the whole factors and scalars of the state, and the warnings the refreshes
    gave. Then each case's last state is saved with torch.distributed.checkpoint and loaded
    into its first (whose factors may be narrower), with and without FactorLoadPlanner."""
    import warnings

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from q3r.distributed.sharded_refresh import refresh_sharded_
    from q3r.refresh import SliceConfig, new_slice_state

    _init(rank, world, port)
    if mesh_shape is None:
        mesh, placements = init_device_mesh(DEVICE, (world,)), [Shard(0)]
    else:
        mesh, placements = init_device_mesh(DEVICE, mesh_shape, mesh_dim_names=("replicate", "shard")), [Replicate(), Shard(0)]
    out = {}
    defaults = dataclasses.asdict(q3r.distributed.SKETCH)
    for name, (target_rank, sequence, options) in torch.load(cases_path).items():
        q3r.distributed.configure(**options)
        state, config, history, states = new_slice_state(*sequence[0].shape, DEVICE), SliceConfig(name, target_rank), [], []
        warned = set()  # as an optimizer keeps it
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for W in sequence:
                p = distribute_tensor(W.to(DEVICE), mesh, placements)
                refresh_sharded_([p], [(0, None)], [[state]], [[config]], warned)
                states.append(dict(state))
                history.append({key: (value.full_tensor() if hasattr(value, "full_tensor") else value).cpu().clone()
                                for key, value in state.items()})
        q3r.distributed.configure(**defaults)
        out[name] = {"history": history, "warnings": [str(w.message) for w in caught],
                     "checkpoint": _load_grown_factors(states[-1], states[0], os.path.join(ckpt_dir, name))}
    # every rank's warnings too (those meant to come once, from rank 0, must not repeat elsewhere)
    by_rank = [None] * world
    dist.all_gather_object(by_rank, {name: case["warnings"] for name, case in out.items()})
    for name in out:
        out[name]["warnings_by_rank"] = [w[name] for w in by_rank]
    if rank == 0:
        torch.save(out, out_path)
    dist.destroy_process_group()


def _load_grown_factors(saved: dict, template: dict, path: str) -> dict:
    """dcp.save of ``saved`` (a sharded slice state), then dcp.load into a copy of
    ``template``: the error DCP's own planner gives, and the factors FactorLoadPlanner loads."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"q3r": [saved]}, checkpoint_id=path)
    result = {}
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load({"q3r": [dict(template)]}, checkpoint_id=path)
        result["default_planner"] = "loaded"
    except CheckpointException as err:  # (a BaseException: DCP's wrapper of the ranks' errors)
        result["default_planner"] = str(err)
    sd = {"q3r": [dict(template)]}
    dcp.load(sd, checkpoint_id=path, planner=q3r.distributed.FactorLoadPlanner())
    loaded = sd["q3r"][0]
    result["equal"] = all(_same(_whole(loaded[key]), _whole(saved[key])) for key in saved)
    result["U_is_sharded_like_before"] = (type(loaded["U"]) is type(saved["U"])
                                          and getattr(loaded["U"], "placements", None) == getattr(saved["U"], "placements", None))
    return result


def stagger_resume_worker(rank, world, port, ckpt_dir, out_path):
    """FSDP2 + AdamQ3R with stagger=True saved after 3 steps and resumed as docs/distributed.md
    says. Rank 0 writes the factor widths of the template get_state_dict makes, and whether
    the resumed run continued like the uninterrupted one, or the error it gave."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _init(rank, world, port)
    data = batches()
    model = _fsdp_model()
    opt = make_adamq3r(model, stagger=True)
    train(model, opt, data[:3], rank, world)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt_dir)
    train(model, opt, data[3:], rank, world)
    straight = full_state(model)
    model = _fsdp_model()
    opt = make_adamq3r(model, stagger=True)
    msd, osd = get_state_dict(model, opt)  # template (initializes the optimizer state: a first step)
    out = {"template_widths": sorted({s["U"].shape[-1] for st in opt.state.values() for s in st.get("q3r", [])})}
    sd = {"model": msd, "optim": osd}
    def load():
        dcp.load(sd, checkpoint_id=ckpt_dir, planner=q3r.distributed.FactorLoadPlanner())
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])

    _resume_and_compare(load, (CheckpointException, ValueError), model, opt, data[3:], straight, out, rank, world,
                        out_path)


def _resume_and_compare(load, errors, model, opt, data, straight, out, rank, world, out_path) -> None:
    """load(), then train on ``data`` and record in ``out`` whether the weights end equal to
    ``straight`` (the uninterrupted run's), or the error load raised; rank 0 writes ``out``."""
    try:
        load()
    except errors as err:
        out["error"] = f"{type(err).__name__}: {str(err)[:3000]}"
    else:
        train(model, opt, data, rank, world)
        resumed = full_state(model)
        out["equal"] = all(torch.equal(straight[name], resumed[name]) for name in straight)
    if rank == 0:
        torch.save(out, out_path)
    dist.destroy_process_group()


def regularizer_resume_worker(rank, world, port, ckpt_dir, out_path):
    """FSDP2 + a Q3R regularizer in penalty mode, saved with DCP after 3 steps and resumed into
    a fresh regularizer (no refresh yet: its U are zero wide) with FactorLoadPlanner. Rank 0
    writes whether the resumed run continued like the uninterrupted one, or the error."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _init(rank, world, port)
    data = batches()

    def build():
        model = _fsdp_model()
        reg = q3r.Q3R(make_targets(model), lmbda=0.05, steps=PERIOD, refresh="exact")
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        opt.q3r_regularizer, opt.q3r_penalty, opt.penalty_values = reg, True, []
        return model, opt, reg

    model, opt, reg = build()
    train(model, opt, data[:3], rank, world)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd, "q3r": reg.state_dict()}, checkpoint_id=ckpt_dir)
    train(model, opt, data[3:], rank, world)
    straight = full_state(model)
    model, opt, reg = build()
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd, "q3r": reg.state_dict()}
    def load():
        dcp.load(sd, checkpoint_id=ckpt_dir, planner=q3r.distributed.FactorLoadPlanner())
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        reg.load_state_dict(sd["q3r"])

    # (any error is reported to the test, which fails on it)
    _resume_and_compare(load, Exception, model, opt, data[3:], straight, {}, rank, world, out_path)


def unequal_svd_worker(rank, world, port, out_path):
    """A sharded refresh whose small SVD differs by one ulp between the ranks (rank 0 up, the
    others down), around eps = sigma_3 = 3 (a constant schedule): every rank must commit the
    same sigma, and the per-step term (an all-reduce sized by the triplets above eps) must run.
    Each rank writes its sigma and whether the term ran."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from q3r.distributed.sharded_refresh import refresh_sharded_
    from q3r.distributed.sharded_step import sharded_add_grad_
    from q3r.refresh import SliceConfig, new_slice_state

    _init(rank, world, port)
    real_svd = torch.linalg.svd

    def svd(B, full_matrices=True):
        U, S, Vh = real_svd(B, full_matrices=full_matrices)
        return U, torch.nextafter(S, S + (1 if rank == 0 else -1)), Vh

    mesh = init_device_mesh(DEVICE, (world,))
    W = torch.zeros(8, 6)
    W[:6, :6] = torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5]))
    p = distribute_tensor(W.to(DEVICE), mesh, [Shard(0)])
    state = new_slice_state(8, 6, DEVICE)
    torch.linalg.svd = svd
    try:
        refresh_sharded_([p], [(0, None)], [[state]], [[SliceConfig("w", 2, schedule="constant", eps_value=3.0)]])
    finally:
        torch.linalg.svd = real_svd
    grad = torch.zeros_like(p)
    sharded_add_grad_([(p, 0, None, [(state["U"], state["V"], state["sigma"], state["eps"])], 1.0)], [grad])
    torch.save({"sigma": state["sigma"].cpu(), "term": True}, f"{out_path}.{rank}")
    dist.destroy_process_group()


def huge_weights_worker(rank, world, port, out_path):
    """A sharded refresh of finite weights whose squares overflow float32 (entries at 1e22,
    and one entry at 1e25 on the last rank's rows among O(1) ones): the single-process refresh
    scales its products and commits factors; the range finder's X^T X V overflowed, and its
    Cholesky-QR raised on every rank. Rank 0 writes, per case, the error or the committed
    sigma and V, and the exact singular values (float64)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from q3r.distributed.sharded_refresh import refresh_sharded_
    from q3r.refresh import SliceConfig, new_slice_state

    _init(rank, world, port)
    mesh = init_device_mesh(DEVICE, (world,))
    gen = torch.Generator().manual_seed(3)
    spread = torch.randn(12, 10, generator=gen) * 1e22
    spike = torch.randn(12, 10, generator=gen)
    spike[-1, 0] = 1e25
    out = {}
    for name, W in {"spread": spread, "spike": spike}.items():
        p = distribute_tensor(W.to(DEVICE), mesh, [Shard(0)])
        state = new_slice_state(12, 10, DEVICE)
        try:
            refresh_sharded_([p], [(0, None)], [[state]], [[SliceConfig("w", 3)]], warned=set())
            out[name] = {"sigma": state["sigma"].cpu(), "V": state["V"].cpu(), "refreshes": int(state["refreshes"]),
                         "exact": torch.linalg.svdvals(W.double())}
        except Exception as e:  # (every rank raised alike)
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    if rank == 0:
        torch.save(out, out_path)
    dist.destroy_process_group()


def failing_refresh_worker(rank, world, port, out_path):
    """A replicated (DDP) refresh whose local part raises on the last rank (as out of memory on
    the owner of the largest target would): every rank must raise at once, none changing its
    factors, and the next refresh must run normally. Each rank writes its error, how long the
    failed refresh took, whether its states stayed as they were, and the states of the next one."""
    import time

    from q3r.distributed import replicated
    from q3r.refresh import SliceConfig, new_slice_state

    # (a short timeout: before, the other ranks waited in the header's all_gather for all of it)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(3)
    ws = [torch.randn(*shape, generator=gen) for shape in [(24, 16), (16, 20), (18, 18)]]
    cfgs = [SliceConfig(f"w{i}", 3) for i in range(len(ws))]
    states = [new_slice_state(*w.shape) for w in ws]
    before = [{k: v.clone() for k, v in st.items()} for st in states]
    real = replicated._refresh_local_

    def failing(*args, **kwargs):  # (after the refresh wrote its drafts: they must not reach the states)
        real(*args, **kwargs)
        raise RuntimeError("injected failure of the local refresh")

    if rank == world - 1:
        replicated._refresh_local_ = failing
    start = time.monotonic()
    try:
        replicated.refresh_slices_replicated_(ws, states, cfgs)
        error = None
    except RuntimeError as err:
        error = str(err)
    finally:
        replicated._refresh_local_ = real
    elapsed = time.monotonic() - start
    unchanged = all(_same(st[k], b[k]) for st, b in zip(states, before) for k in b)
    replicated.refresh_slices_replicated_(ws, states, cfgs)
    torch.save({"error": error, "elapsed": elapsed, "unchanged": unchanged,
                "states": [{k: v.cpu() for k, v in st.items()} for st in states]}, f"{out_path}.{rank}")
    dist.destroy_process_group()


def _whole(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _same(a, b) -> bool:
    """Equal shapes and values, NaN equal to NaN (eps0 of the `min` schedule)."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_then_collect(fn, rank, *args):
    """fn, then a garbage collection while the interpreter is whole: FSDP2 leaves reference
    cycles that hold its process groups (and gloo's worker threads), and collected at
    interpreter teardown one aborted now and then with "terminate called without an active
    exception" after the work was done (examples/fsdp2_gpt_pretrain.py: 5 of 16 runs without
    the collection, none of 16 with it)."""
    import gc

    try:
        fn(rank, *args)
    finally:
        gc.collect()


def spawn(fn, world, *args, tries: int = 3):
    """Run fn on ``world`` CPU processes (gloo), collecting garbage in each before it exits
    (see _run_then_collect). A process killed by a signal still gets another try, up to
    ``tries`` in all (that abort came twice in a row in one CI run while other multi-process
    jobs shared the 2 cores). A worker that raises, or results that differ, still fail the
    tests."""
    import functools

    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # (a worker that aborts prints the Python stacks of its threads: where the abort came from)
    os.environ.setdefault("PYTHONFAULTHANDLER", "1")
    for attempt in range(1, tries + 1):
        try:
            context = mp.spawn(functools.partial(_run_then_collect, fn), args=(world, free_port(), *args),
                               nprocs=world, join=False)
            if _joined(context, SPAWN_TIMEOUT_S):
                return
            if attempt == tries:
                raise TimeoutError(f"distributed workers of {fn.__name__} still running after {SPAWN_TIMEOUT_S} s, "
                                   f"{tries} times")
            print(f"distributed workers of {fn.__name__} hung; killed, trying again")
        except mp.ProcessExitedException as crash:
            if crash.signal_name is None or attempt == tries:
                raise
            print(f"distributed worker {crash.error_index} died with {crash.signal_name}; trying again")


# a worker that hangs (a gloo teardown waiting for a peer that has exited: once in CI, in a DDP
# worker that destroyed its process group with the DDP model still alive) is killed after this
# and counts as a crash: the suite must not wait for ever
SPAWN_TIMEOUT_S = 600


def _joined(context, timeout: float) -> bool:
    """Wait for the spawned processes; False (after killing them) if they are not all done
    within ``timeout`` seconds. A worker that raised or died raises here, as mp.spawn does."""
    import time

    deadline = time.monotonic() + timeout
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            for process in context.processes:
                process.join()
            return False
    return True


def ddp_inert_worker(rank, world, port, out_path):
    """4 zero-initialized targets under DDP (the ranks divide the refreshes): the names each
    rank's inert-target warnings give (gathered; rank 0 writes them)."""
    import gc

    _init(rank, world, port)
    named = _inert_names_under_ddp(rank)
    # DDP's reducer torn down while its process group is up: with the DDP model still alive at
    # destroy_process_group, its collection afterwards hung a worker in 10 of 24 runs here
    gc.collect()
    gathered = [None] * world
    dist.all_gather_object(gathered, named)
    if rank == 0:
        torch.save(gathered, out_path)
    dist.destroy_process_group()


def _inert_names_under_ddp(rank) -> list[str]:
    import warnings

    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])
    with torch.no_grad():
        for layer in model:
            layer.weight.zero_()
    ddp = DDP(model)
    opt = q3r.AdamQ3R(q3r.param_groups(model, q3r.find_targets(ddp, ["0", "1", "2", "3"], target_rank=0.25),
                                       lmbda=0.1, steps=2), lr=1e-2)
    gen = torch.Generator().manual_seed(rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            ddp(torch.randn(4, 16, generator=gen)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    return sorted(f"{i}.weight" for m in caught if "at their first refresh" in str(m.message)
                  for i in range(4) if f"'{i}.weight'" in str(m.message))

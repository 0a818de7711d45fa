"""Shared pieces of the benchmarks: run metadata, CSV output, CUDA timing, model builders.

Models (BENCH.md): ViT-B/16 (timm when importable, else an equivalent plain stack),
GPT-2-small-like (HF Conv1D layout: fused c_attn weight (d, 3d), column slices) and
LLaMA-1B-like (fused qkv weight (3d, d), row slices; SwiGLU MLP; no rotary embedding, which
costs nothing measurable here). Each builder returns (model, make_batch, loss_fn, targets)
where targets are (name, parameter, slice_dim, slices) with Q/K/V as separate slices.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import os
import platform
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- metadata


def git_commit() -> str:
    """Q3R_COMMIT when set (a copy of the tree without .git), else git's HEAD."""
    if os.environ.get("Q3R_COMMIT"):
        return os.environ["Q3R_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


@contextlib.contextmanager
def exact_fallbacks():
    """Within the block, the list of how many targets each fast (sketched) refresh call left to
    an exact SVD (the refresh's own report, q3r.refresh.refresh_sketched's second result)."""
    import q3r.refresh as R

    counts, sketched = [], R.refresh_sketched

    def counting(*args, **kwargs):
        nonfinite, left = sketched(*args, **kwargs)
        counts.append(sum(len(group) for group in left))
        return nonfinite, left

    R.refresh_sketched = counting
    try:
        yield counts
    finally:
        R.refresh_sketched = sketched


def metadata() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "triton": triton_version,
        "commit": git_commit(),
    }


CSV_FIELDS = ["timestamp", "device", "torch", "cuda", "triton", "commit", "benchmark", "model", "measure", "value", "unit"]


def append_csv(path: str, rows: list[dict]) -> None:
    """Long format (one measurement per row), so every benchmark shares one schema."""
    new = not os.path.exists(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


# ------------------------------------------------------------------------------ timing


def step_times_ms(fn, n: int) -> list[float]:
    """Wall time in ms of each of n consecutive calls of fn, each bracketed by CUDA events
    (perf_counter without CUDA: only for dry runs of the scripts)."""
    out = []
    for _ in range(n):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            out.append(1e3 * (time.perf_counter() - t0))
    return out


def cuda_time_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median wall time of fn() in ms after warm-up (see step_times_ms; on CPU at most 2 calls)."""
    if not torch.cuda.is_available():
        return statistics.median(step_times_ms(fn, max(1, min(iters, 2))))
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return statistics.median(step_times_ms(fn, iters))


def memory_during(fn) -> dict[str, int]:
    """CUDA memory around fn(): "start" (allocated before it), "peak" (peak allocated while it
    runs), "requested_peak" (the same counted in the bytes the tensors asked for: the
    caching allocator rounds blocks up, and a block it does not split can be up to 1 MB
    larger than asked, so two runs with different cache histories can differ by some MB in
    "peak" alone). All 0 without CUDA (fn still runs)."""
    if not torch.cuda.is_available():
        fn()
        return {"start": 0, "peak": 0, "requested_peak": 0}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    stats = torch.cuda.memory_stats()
    return {"start": start, "peak": torch.cuda.max_memory_allocated(),
            "requested_peak": stats["requested_bytes.all.peak"]}


# ------------------------------------------------------------------------------ models


class Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D: weight (in, out), y = x W + b."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.02)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


def _attend(qkv: torch.Tensor, heads: int, causal: bool) -> torch.Tensor:
    B, N, three_d = qkv.shape
    d = three_d // 3
    q, k, v = qkv.view(B, N, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(B, N, d)


class ViTBlock(nn.Module):
    """Module names as in timm (attn.qkv, attn.proj, mlp.fc1, mlp.fc2)."""

    def __init__(self, d=768, heads=12, mlp=3072):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.ModuleDict({"qkv": nn.Linear(d, 3 * d), "proj": nn.Linear(d, d)})
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(d, mlp), "fc2": nn.Linear(mlp, d)})

    def forward(self, x):
        x = x + self.attn.proj(_attend(self.attn.qkv(self.norm1(x)), self.heads, False))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class PlainViT(nn.Module):
    """ViT-B/16 at 224 px: patch 16, 12 blocks of width 768, 12 heads, MLP 3072, 1000 classes."""

    def __init__(self, d=768, depth=12, heads=12, classes=1000):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 16, 16)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 197, d) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(d, heads, 4 * d) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, images):
        x = self.patch(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def vit_b16(batch: int = 128, device="cuda", tiny: bool = False):
    try:
        if tiny:
            raise ImportError("tiny dry-run model")
        import timm

        model, source = timm.create_model("vit_base_patch16_224", num_classes=1000), "timm"
    except Exception:
        model, source = (PlainViT(d=48, depth=1, heads=4) if tiny else PlainViT()), "plain"
    model = model.to(device)
    targets = []
    for i, blk in enumerate(model.blocks):
        d = blk.attn.qkv.weight.shape[1]
        targets.append((f"blocks.{i}.attn.qkv", blk.attn.qkv.weight, 0, [(0, d), (d, 2 * d), (2 * d, 3 * d)]))
        targets += [(f"blocks.{i}.attn.proj", blk.attn.proj.weight, 0, None),
                    (f"blocks.{i}.mlp.fc1", blk.mlp.fc1.weight, 0, None),
                    (f"blocks.{i}.mlp.fc2", blk.mlp.fc2.weight, 0, None)]
    gen = torch.Generator(device=device).manual_seed(0)
    batch = 2 if tiny else batch

    def make_batch():
        return (torch.randn(batch, 3, 224, 224, device=device, generator=gen),
                torch.randint(0, 1000, (batch,), device=device, generator=gen))

    def loss_fn(model, data):
        images, labels = data
        return F.cross_entropy(model(images), labels)

    return model, make_batch, loss_fn, targets, f"ViT-B/16 ({source}) batch {batch}"


class GPT2Block(nn.Module):
    def __init__(self, d=768, heads=12):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = Conv1D(d, 3 * d), Conv1D(d, d)
        self.c_fc, self.mlp_proj = Conv1D(d, 4 * d), Conv1D(4 * d, d)

    def forward(self, x):
        x = x + self.c_proj(_attend(self.c_attn(self.ln_1(x)), self.heads, True))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2(nn.Module):
    def __init__(self, d=768, depth=12, vocab=50257, ctx=1024, heads=12):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(GPT2Block(d, heads if d % heads == 0 else 4) for _ in range(depth))
        self.ln_f = nn.LayerNorm(d)
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.01)

    def forward(self, tokens):
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.t()  # tied head


class LlamaBlock(nn.Module):
    def __init__(self, d=2048, heads=32, mlp=8192):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.gate, self.up = nn.Linear(d, mlp, bias=False), nn.Linear(d, mlp, bias=False)
        self.down = nn.Linear(mlp, d, bias=False)

    def forward(self, x):
        x = x + self.o(_attend(self.qkv(self.norm1(x)), self.heads, True))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Llama(nn.Module):
    def __init__(self, d=2048, depth=16, vocab=32000, heads=32, mlp=8192):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(LlamaBlock(d, heads, mlp) for _ in range(depth))
        self.norm, self.head = nn.RMSNorm(d), nn.Linear(d, vocab, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _lm(model, vocab, batch, seq, device):
    gen = torch.Generator(device=device).manual_seed(0)

    def make_batch():
        return torch.randint(0, vocab, (batch, seq + 1), device=device, generator=gen)

    def loss_fn(model, tokens):
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))

    return make_batch, loss_fn


def gpt2_small(batch: int = 16, seq: int = 1024, device="cuda", tiny: bool = False):
    d = 48 if tiny else 768
    model = (GPT2(d, 1, 100, 64) if tiny else GPT2()).to(device)
    batch, seq = (2, 16) if tiny else (batch, seq)
    targets = []
    for i, blk in enumerate(model.blocks):
        targets.append((f"h.{i}.attn.c_attn", blk.c_attn.weight, 1, [(0, d), (d, 2 * d), (2 * d, 3 * d)]))
        targets += [(f"h.{i}.attn.c_proj", blk.c_proj.weight, 0, None), (f"h.{i}.mlp.c_fc", blk.c_fc.weight, 0, None),
                    (f"h.{i}.mlp.c_proj", blk.mlp_proj.weight, 0, None)]
    return (model, *_lm(model, 100 if tiny else 50257, batch, seq, device), targets,
            f"GPT-2-small-like batch {batch}x{seq}")


def llama_1b(batch: int = 8, seq: int = 1024, device="cuda", tiny: bool = False):
    """d 2048, 16 layers, MLP 8192, full-size K and V (no grouped-query attention), vocabulary
    32,000. Not the shapes bench_refresh.py's llama1b uses (Llama-3.2-1B's: K, V 512 x 2048):
    this model has 13% more per-step Q3R work and 17% more factor memory."""
    d = 64 if tiny else 2048
    model = (Llama(d, 1, 100, heads=4, mlp=128) if tiny else Llama()).to(device)
    batch, seq = (2, 16) if tiny else (batch, seq)
    targets = []
    for i, blk in enumerate(model.blocks):
        targets.append((f"layers.{i}.qkv", blk.qkv.weight, 0, [(0, d), (d, 2 * d), (2 * d, 3 * d)]))
        targets += [(f"layers.{i}.{n}", getattr(blk, n).weight, 0, None) for n in ("o", "gate", "up", "down")]
    return (model, *_lm(model, 100 if tiny else 32000, batch, seq, device), targets,
            f"LLaMA-1B-like batch {batch}x{seq}")


MODELS = {"vit_b16": vit_b16, "gpt2_small": gpt2_small, "llama_1b": llama_1b}

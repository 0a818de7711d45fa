"""One run of the experiment: build, train (resumable), truncate at every fraction, evaluate.

Every method goes through the same loop: same data order, augmentation, batch size, epochs,
warmup + cosine schedule, bf16 autocast on CUDA, and the same evaluation (SVD truncation by
:func:`q3r.compress` at each fraction of target parameters kept). Only the optimizer and the
model surgery differ:

* ``dense``  -- AdamW, weight decay ``wd`` on every parameter (its tuned knob).
* ``q3r``    -- AdamQ3R: Q3R on the targets with ``lmbda`` and ``target_rank`` = the training
  fraction; AdamW-style decay ``base_wd`` on the other parameters.
* ``lora``   -- targets replaced by parameter-matched factored layers; AdamW with ``lr``.
* ``lorita`` -- targets as products of ``depth`` factors with AdamW decay ``wd`` on the
  factors; collapsed to dense matrices after training.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import q3r
from q3r.compress import compress, count_parameters

from . import baselines, fashion_mnist
from .._files import atomic_path
from .vit import TARGET_SETS, ViT


@dataclass(frozen=True)
class RunSpec:
    """What one run trains. ``train_fraction`` is the Q3R target rank / LoRA size (None otherwise)."""

    method: str
    target_set: str | None
    train_fraction: float | None
    hparams: dict = field(default_factory=dict, hash=False)

    @property
    def run_id(self) -> str:
        parts = [self.method]
        if self.target_set:
            parts.append(self.target_set.replace("+", "_"))
        if self.train_fraction is not None:
            parts.append(f"f{self.train_fraction:g}")
        parts += [f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in sorted(self.hparams.items())]
        return "-".join(parts)


def seed_generator(*keys: int) -> torch.Generator:
    # One deterministic stream per (seed, epoch, purpose): every method sees the same batches.
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k)) % (2 ** 63)
    return torch.Generator().manual_seed(seed)


def build_model(cfg: dict, spec: RunSpec, device) -> tuple[torch.nn.Module, dict]:
    """The model after method surgery, and {target set: targets found on the dense model}."""
    torch.manual_seed(cfg["seed"])  # the same dense initialization for every run
    model = ViT(**cfg["model"]).to(device)
    rank = spec.train_fraction if spec.train_fraction is not None else 0.2
    targets = {name: q3r.find_targets(model, pats, target_rank=rank, fused="auto") for name, pats in TARGET_SETS.items()}
    own = targets.get(spec.target_set)
    if spec.method == "lora":
        baselines.lora_from_scratch_(model, own, spec.train_fraction)
    elif spec.method == "lorita":
        baselines.lorita_(model, own, spec.hparams["depth"])
    elif spec.method not in ("dense", "q3r"):
        raise ValueError(f"unknown method {spec.method!r}")
    return model, targets


def build_optimizer(cfg: dict, spec: RunSpec, model, targets) -> torch.optim.Optimizer:
    lr = spec.hparams.get("lr", cfg["lr"])
    base_wd = cfg["base_wd"]
    if spec.method == "dense":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=spec.hparams["wd"])
    if spec.method == "q3r":
        groups = q3r.param_groups(model, targets[spec.target_set], weight_decay=base_wd,
                                  lmbda=spec.hparams["lmbda"], steps=cfg["q3r_steps"])
        return q3r.AdamQ3R(groups, lr=lr, weight_decay=base_wd)
    if spec.method == "lorita":
        factors = [p for n, p in model.named_parameters() if ".parametrizations.weight.original" in n]
        ids = {id(p) for p in factors}
        rest = [p for p in model.parameters() if id(p) not in ids]
        return torch.optim.AdamW([{"params": rest, "weight_decay": base_wd},
                                  {"params": factors, "weight_decay": spec.hparams["wd"]}], lr=lr)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=base_wd)


def warmup_cosine(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda" else torch.autocast("cpu", enabled=False)


@torch.no_grad()
def accuracy(model, images_u8, labels, device, batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        x = fashion_mnist.normalize(images_u8[start:start + batch_size])
        with autocast(device):
            correct += (model(x).argmax(-1) == labels[start:start + batch_size]).sum().item()
    return correct / max(1, len(labels))


@torch.no_grad()
def relative_truncation_error(model, targets, fraction: float) -> float:
    """Mean over target slices of ||W - W_r||_F / ||W||_F: how much truncation removes."""
    if fraction >= 1.0:
        return 0.0
    errs = []
    for t in targets:
        W = model.get_parameter(t.name).float()
        for view, (d1, d2) in zip(q3r.targets.slice_views(W, t.slice_dim, t.slices),
                                  q3r.targets.slice_shapes(W.shape, t.slice_dim, t.slices)):
            r = q3r.reference.resolve_rank(fraction, d1, d2, "params", t.name)
            s = torch.linalg.svdvals(view)
            errs.append((s[r:].square().sum() / s.square().sum()).sqrt().item())
    return sum(errs) / len(errs)


def evaluate_run(cfg, spec, model, targets, data, device) -> list[dict]:
    """Test and validation accuracy at each fraction of target parameters kept."""
    rows = []
    sets = [spec.target_set] if spec.target_set else list(TARGET_SETS)
    for set_name in sets:
        tgts = targets[set_name]
        dense_target_params = sum(t.param.numel() for t in tgts)
        fractions = [spec.train_fraction] if spec.method == "lora" else cfg["eval_fractions"]
        for f in fractions:
            if spec.method == "lora":
                evaluated, kept, err = model, _lora_target_params(tgts, f), None
            else:
                evaluated, report = compress(model, tgts, fraction=f, copy=True)
                kept, err = report.target_params_after, relative_truncation_error(model, tgts, f)
            rows.append(dict(
                target_set=set_name, fraction=f,
                val_acc=accuracy(evaluated, data["val_images"], data["val_labels"], device),
                test_acc=accuracy(evaluated, data["test_images"], data["test_labels"], device),
                model_params=count_parameters(evaluated), target_params=kept,
                target_params_dense=dense_target_params, rel_trunc_error=err,
            ))
    return rows


def _lora_target_params(targets, fraction: float) -> int:
    total = 0
    for t in targets:
        for d1, d2 in q3r.targets.slice_shapes(t.param.shape, t.slice_dim, t.slices):
            total += q3r.reference.resolve_rank(fraction, d1, d2, "params", t.name) * (d1 + d2)
    return total


def train_run(cfg: dict, spec: RunSpec, data: dict, device, checkpoint_dir: Path, progress=None) -> dict:
    """Train one run (resuming from its epoch checkpoint if any) and evaluate it."""
    checkpoint = Path(checkpoint_dir) / f"{spec.run_id}.pt"
    n_train, bs, epochs = len(data["train_labels"]), cfg["batch_size"], cfg["epochs"]
    steps_per_epoch = n_train // bs  # drop the ragged last batch: every step has the same size
    total = steps_per_epoch * epochs

    def build():
        model, targets = build_model(cfg, spec, device)
        opt = build_optimizer(cfg, spec, model, targets)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, max(1, int(cfg["warmup"] * total))))
        return model, targets, opt, sched

    model, targets, opt, sched = build()
    start_epoch, seconds = 0, 0.0
    state = _read_checkpoint(checkpoint, device)
    if state is not None:
        try:  # a checkpoint that loads but does not fit (another version's model or optimizer)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start_epoch, seconds = int(state["epoch"]), float(state["seconds"])
            if not 0 <= start_epoch <= epochs:
                raise ValueError(f"epoch {start_epoch} outside 0..{epochs}")
        except torch.OutOfMemoryError:  # (a good checkpoint on a full device: not a reason to start over)
            raise
        except Exception as err:  # noqa: BLE001 -- as for an unreadable file: start over, with a warning
            warnings.warn(f"checkpoint {checkpoint} does not fit this run ({type(err).__name__}: {str(err)[:200]}); "
                          "training the run from epoch 0")
            model, targets, opt, sched = build()  # load_state_dict may have loaded part of it
            start_epoch, seconds = 0, 0.0
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(n_train, generator=seed_generator(cfg["seed"], epoch, 1)).to(device)
        aug = seed_generator(cfg["seed"], epoch, 2)
        for step in range(steps_per_epoch):
            idx = order[step * bs:(step + 1) * bs]
            x = fashion_mnist.augment(fashion_mnist.normalize(data["train_images"][idx]), aug)
            with autocast(device):
                loss = F.cross_entropy(model(x), data["train_labels"][idx], label_smoothing=cfg["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if progress is not None:
                progress.update(1)
                if step % 20 == 0:
                    progress.set_postfix(run=spec.run_id, epoch=epoch, loss=f"{loss.item():.3f}")
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"run {spec.run_id}: loss became {loss.item()} in epoch {epoch}")
        seconds += time.perf_counter() - t0
        if progress is None:  # worker processes: one line per epoch instead of a bar
            print(f"{spec.run_id}: epoch {epoch + 1}/{epochs} loss {loss.item():.3f} ({seconds:.0f}s)", flush=True)
        with atomic_path(checkpoint) as tmp:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "epoch": epoch + 1, "seconds": seconds}, tmp)
    if spec.method == "lorita":
        baselines.collapse_lorita_(model)
    evals = evaluate_run(cfg, spec, model, targets, data, device)
    return dict(run=spec.run_id, spec=asdict(spec), train_seconds=seconds, epochs=epochs,
                steps=total, trained_params=_trained_params(spec, cfg, device), evals=evals)


def _read_checkpoint(path: Path, device):
    """The epoch checkpoint, or None if there is none or it is unreadable (then the run starts over)."""
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except torch.OutOfMemoryError:  # (a good checkpoint on a full device: not a reason to start over)
        raise
    except Exception as err:  # a damaged file fails in many ways (EOFError, RuntimeError, KeyError, ...)
        warnings.warn(f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); training the run from epoch 0")
        return None


def _trained_params(spec, cfg, device) -> int:
    """Parameters the optimizer updates during training (LoRITa's factors are more than dense)."""
    model, _ = build_model(cfg, spec, "cpu")
    return count_parameters(model)

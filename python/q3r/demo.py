"""The main job: a small, real Q3R run that needs no download.

An MLP on scikit-learn's bundled 8x8 digits (1,797 images) is trained twice from the same
initialization, once with plain AdamW and once with AdamQ3R (its two 256x256 hidden weights
pushed towards 5% of their parameters), then those weights are truncated by an exact SVD to a
few fractions of their parameters (:func:`q3r.compress`) and the test accuracy of each is
printed as a table.

lambda is large (3.0) because what matters is the total decay lr * 2 lambda * steps that the
tail directions see against Adam's roughly lr-sized updates: this run has ~840 steps at
lr 2e-3, the paper's CIFAR runs tens of thousands.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from .compress import compress, count_parameters
from .optim import AdamQ3R
from .targets import find_targets, param_groups

FRACTIONS = (1.0, 0.2, 0.1, 0.05, 0.03, 0.02)
HIDDEN = ["2", "4"]  # the two width x width hidden Linear layers of the MLP below


@dataclass
class DemoConfig:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    lmbda: float = 3.0
    target_rank: float = 0.05
    steps: int = 5
    seed: int = 0
    width: int = 256


def load_digits_split(seed: int):
    """Digits scaled to [0, 1], split 75/25 with a fixed permutation."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # the demo's only optional dependency
        raise SystemExit("q3r demo needs scikit-learn (bundled digits data): pip install scikit-learn") from exc
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.75 * len(y))
    return (x[perm[:cut]], y[perm[:cut]]), (x[perm[cut:]], y[perm[cut:]])


def make_mlp(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, 10),
    )


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def train(model, optimizer, train_set, cfg: DemoConfig, label: str) -> None:
    from tqdm.auto import tqdm

    x, y = train_set
    g = torch.Generator().manual_seed(cfg.seed + 1)
    bar = tqdm(range(cfg.epochs), desc=label, unit="epoch", leave=True)
    for _ in bar:
        model.train()
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")


def adamq3r_for(model: torch.nn.Module, cfg: DemoConfig) -> AdamQ3R:
    """The demo's AdamQ3R for ``model`` (raises ValueError naming a bad option)."""
    targets = find_targets(model, HIDDEN, target_rank=cfg.target_rank)
    return AdamQ3R(param_groups(model, targets, weight_decay=0.01, lmbda=cfg.lmbda, steps=cfg.steps), lr=cfg.lr)


def check_config(cfg: DemoConfig) -> None:
    """Raise ValueError for options the demo or its optimizer refuse, before anything runs."""
    for name in ("epochs", "batch_size", "width"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {cfg.seed!r}")  # (torch.manual_seed's range)
    adamq3r_for(make_mlp(cfg.width), cfg)


def run_demo(cfg: DemoConfig | None = None) -> dict:
    """Train both models, truncate, and return {"rows": [...], ...}; prints the table."""
    cfg = cfg or DemoConfig()
    torch.manual_seed(cfg.seed)
    train_set, test_set = load_digits_split(cfg.seed)
    base = make_mlp(cfg.width)
    started = time.perf_counter()

    lowrank = copy.deepcopy(base)
    q3r_optimizer = adamq3r_for(lowrank, cfg)  # first: a bad option fails before any training
    dense = copy.deepcopy(base)
    train(dense, torch.optim.AdamW(dense.parameters(), lr=cfg.lr, weight_decay=0.01), train_set, cfg, "AdamW  ")
    train(lowrank, q3r_optimizer, train_set, cfg, "AdamQ3R")

    rows = []
    for fraction in FRACTIONS:
        row = {"fraction": fraction}
        for name, model in (("adamw", dense), ("adamq3r", lowrank)):
            cut, report = compress(model, HIDDEN, fraction=fraction, copy=True)
            row[name] = accuracy(cut, *test_set)
            row["target_params"] = report.target_params_after
            row["model_params"] = count_parameters(cut)
        rows.append(row)
    result = {"config": cfg.__dict__, "rows": rows, "seconds": time.perf_counter() - started}
    print(format_table(rows, count_parameters(base)))
    print(f"(scikit-learn digits, {len(train_set[1])} train / {len(test_set[1])} test images, "
          f"seed {cfg.seed}, {result['seconds']:.0f} s)")
    return result


def format_table(rows: list[dict], dense_params: int) -> str:
    lines = [
        f"{'target params kept':>19} | {'target params':>13} | {'model params':>12} | {'AdamW + SVD':>11} | {'AdamQ3R + SVD':>13}",
        "-" * 81,
    ]
    for r in rows:
        lines.append(
            f"{r['fraction']:>18.0%} | {r['target_params']:>13,} | {r['model_params']:>12,} | "
            f"{r['adamw']:>11.2%} | {r['adamq3r']:>13.2%}"
        )
    lines.append(f"(dense model: {dense_params:,} parameters)")
    return "\n".join(lines)

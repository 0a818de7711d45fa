"""``q3r experiment vit-fmnist``: the command-line entry to the headline experiment.

``add_parser(subparsers)`` registers the ``experiment`` subcommand on the q3r CLI's argparse
subparsers; ``main(argv)`` runs it standalone (``python -m q3r.experiments.cli vit-fmnist``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("experiment", help="run a paper experiment (Q3R against the baselines)")
    _add_experiments(parser)
    return parser


def _add_experiments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_subparsers(dest="experiment", required=True)
    vit = which.add_parser(
        "vit-fmnist",
        help="ViT-Tiny-shaped model on Fashion-MNIST: Q3R vs dense+SVD, LoRA, LoRITa at 100/60/40/20/10%% kept",
        description="Train every method with the same data, budget and evaluation; write results.json/.csv/.md/.png.",
    )
    vit.add_argument("--size", choices=["smoke", "cpu", "full"], default="smoke",
                     help="smoke: tiny CI check; cpu: reduced CPU run; full: ViT-Tiny on one GPU (default: smoke)")
    vit.add_argument("--out", type=_nonempty, default=None, help="output folder (default: runs/vit-fmnist-<size>)")
    vit.add_argument("--data-dir", type=_nonempty, default=None,
                     help="folder with the four Fashion-MNIST IDX .gz files (default: $Q3R_FMNIST_DIR or /usr/share/datasets/fashion-mnist)")
    vit.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    vit.add_argument("--workers", type=_positive_int, default=1,
                     help="runs trained at once in separate processes (a small model leaves a GPU mostly idle)")
    vit.add_argument("--epochs", type=_positive_int, default=None, help="override the size's number of epochs")
    vit.add_argument("--seed", type=int, default=None, help="override the seed (default 0)")
    vit.add_argument("--fresh", action="store_true", help="discard finished runs and checkpoints in --out")
    vit.set_defaults(func=run_vit_fmnist)


def _positive_int(text: str) -> int:
    # argparse turns this into "argument --epochs: must be an integer >= 1, got '0'" and exit code 2
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _nonempty(text: str) -> str:
    # (an empty --out, as from `--out "$DIR"` with DIR unset, counted as not given: the command
    # ran on the default folder, and with --fresh deleted the finished runs there)
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_vit_fmnist(args) -> int:
    from .harness import UsageError, make_config, run_experiment

    out = args.out or f"runs/vit-fmnist-{args.size}"
    meta = dict(command="q3r experiment vit-fmnist " + " ".join(sys.argv[sys.argv.index("vit-fmnist") + 1:]) if "vit-fmnist" in sys.argv else "",
                commit=os.environ.get("Q3R_COMMIT") or _git_commit())  # a copied tree has no .git
    try:
        cfg = make_config(args.size, epochs=args.epochs, seed=args.seed)
        summary = run_experiment(cfg, out, data_dir=args.data_dir, device=args.device, workers=args.workers, fresh=args.fresh, meta=meta)
    except (UsageError, FileNotFoundError) as err:  # the user's mistake: a message, not a traceback
        print(f"q3r experiment: error: {err}", file=sys.stderr)
        return 2
    missing = summary["meta"].get("runs_missing")
    if missing:  # runs that failed in a worker (logged above): partial results are not success
        print(f"q3r experiment: {len(missing)} run(s) did not finish: {', '.join(missing)}; partial results in {out}/results.md "
              "(the same command again trains them)", file=sys.stderr)
        return 1
    print(f"results in {out}/results.md, results.csv, results.json, results.png")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="q3r experiment")
    _add_experiments(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""The ``q3r`` command: ``q3r demo``, ``q3r info``, and subcommands registered by subpackages."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ._files import write_text


def _demo(args) -> int:
    from .demo import DemoConfig, check_config, run_demo

    cfg = DemoConfig(epochs=args.epochs, lmbda=args.lmbda, target_rank=args.target_rank, seed=args.seed)
    try:
        check_config(cfg)
        if args.json is not None:  # (checked before the run, not found wanting after it)
            _check_writable(args.json)
    except (ValueError, TypeError) as err:
        # (the demo's checks name its config fields; the optimizer's name its param groups)
        print(f"q3r demo: error: {err} (from --epochs {args.epochs} --lmbda {args.lmbda} "
              f"--target-rank {args.target_rank} --seed {args.seed})", file=sys.stderr)
        return 2
    result = run_demo(cfg)
    if args.json is not None:
        write_text(args.json, json.dumps(result, indent=2))
    return 0


def _check_writable(path: str) -> None:
    if not path:  # (`--json "$UNSET"`: asked for a file, so not quietly none)
        raise ValueError("--json: got an empty path")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"--json: {path} is a directory")
    if not os.path.isdir(folder):
        raise ValueError(f"--json: the directory {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--json: cannot write into {folder}")


def _info(args) -> int:
    from . import info

    info.main()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="q3r", description="Q3R: low-rank training with a reweighted rank regularizer")
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = __import__("q3r.demo", fromlist=["DemoConfig"]).DemoConfig()
    demo = sub.add_parser("demo", help="train a small MLP on bundled digits with AdamW and AdamQ3R, truncate, compare",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the training digits")
    demo.add_argument("--lmbda", type=float, default=defaults.lmbda, help="Q3R strength lambda")
    demo.add_argument("--target-rank", type=float, default=defaults.target_rank,
                      help="parameter fraction to train towards (rank floor(f d1 d2 / (d1 + d2)) per weight)")
    demo.add_argument("--seed", type=int, default=defaults.seed, help="seed of the split, the init and the batches")
    demo.add_argument("--json", help="also write the result table to this JSON file")
    demo.set_defaults(func=_demo)
    info = sub.add_parser("info", help="which backends (Triton, native extension) are available and why not")
    info.set_defaults(func=_info)
    _register_optional(sub)
    return parser


def _register_optional(sub) -> None:
    """Subcommands that live in subpackages (they import only when run)."""
    try:
        from .experiments.cli import add_parser as add_experiment
    except ImportError:
        return
    add_experiment(sub)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

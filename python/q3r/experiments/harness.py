"""The experiment's plan and driver: sizes, the list of runs, resumable execution, outputs.

Each finished run writes ``runs/<run_id>.json`` in the output folder and an unfinished one
keeps an epoch checkpoint in ``checkpoints/``; running the same command again skips the
finished runs and continues the others from their last epoch. After every finished run the
aggregate outputs (results.json, results.csv, results.md, results.png) are rewritten, so a
run cut short still leaves a table of what finished.

Tuning: every method gets the same small budget, two values of its own main knob (dense:
weight decay; Q3R: lambda; LoRA: learning rate; LoRITa: weight decay on its factors), each
a full training run; the value is chosen by accuracy on a validation split held out from the
training set (never the test set). See report.py for how the table picks among them.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager, suppress
from pathlib import Path

import torch

from . import fashion_mnist, report
from .._files import write_text
from .training import RunSpec, seed_generator, train_run

EVAL_FRACTIONS = [1.0, 0.6, 0.4, 0.2, 0.1]

BASE = dict(
    seed=0, lr=1e-3, base_wd=0.05, warmup=0.05, label_smoothing=0.1, q3r_steps=5,
    eval_fractions=EVAL_FRACTIONS,
)

SIZES = {
    # CI: a tiny model on a data subset; checks the pipeline, not the claim.
    "smoke": dict(
        model=dict(patch_size=7, dim=32, depth=2, num_heads=2), n_train=3072, n_val=512, n_test=1000,
        epochs=4, batch_size=128, lr=3e-3, warmup=0.02, cpu_threads=1,
        grid=dict(dense=dict(wd=[0.05]), q3r=dict(lmbda=[0.5]), lora=dict(lr=[2e-3]), lorita=dict(wd=[0.05], depth=[2])),
        q3r_fractions=[0.2], lora_fractions=[0.2],
    ),
    # A reduced CPU run (2 cores): a 4-block, width-64 ViT on 40k images, with the same
    # tuning budget as the full size (two values per knob, LoRITa with N = 2 and 3); about an
    # hour with --workers 2. Not ViT-Tiny: the claim at reduced scale.
    "cpu": dict(
        model=dict(patch_size=7, dim=64, depth=4, num_heads=2), n_train=40000, n_val=5000, n_test=10000,
        epochs=8, batch_size=128, lr=3e-3, warmup=0.02, cpu_threads=1,
        grid=dict(dense=dict(wd=[0.05, 1.0]), q3r=dict(lmbda=[1.0, 4.0]), lora=dict(lr=[1e-3, 3e-3]),
                  lorita=dict(wd=[0.1, 1.0], depth=[2, 3])),
        q3r_fractions=[0.4, 0.2], lora_fractions=[0.4, 0.2],
    ),
    # The experiment: ViT-Tiny shape, all of Fashion-MNIST (55k train / 5k val / 10k test), one GPU.
    "full": dict(
        model=dict(patch_size=4, dim=192, depth=12, num_heads=3), n_train=55000, n_val=5000, n_test=10000,
        epochs=6, batch_size=256,
        grid=dict(dense=dict(wd=[0.05, 1.0]), q3r=dict(lmbda=[1.0, 4.0]), lora=dict(lr=[1e-3, 3e-3]),
                  lorita=dict(wd=[0.1, 1.0], depth=[2, 3])),
        q3r_fractions=[0.4, 0.2, 0.1], lora_fractions=[0.4, 0.2, 0.1],
    ),
}


class UsageError(ValueError):
    """A bad argument or output folder: the command line prints it without a traceback."""


def make_config(size: str, **overrides) -> dict:
    if size not in SIZES:
        raise UsageError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    cfg = copy.deepcopy({**BASE, **SIZES[size], "size": size})
    for key, value in overrides.items():
        if value is not None:
            cfg[key] = value
    if not (isinstance(cfg["epochs"], int) and cfg["epochs"] >= 1):  # 0 or less "trains" nothing
        raise UsageError(f"epochs must be an integer >= 1, got {cfg['epochs']!r}")
    if not (isinstance(cfg["seed"], int) and 0 <= cfg["seed"] < 2 ** 63):  # torch.manual_seed's range
        raise UsageError(f"seed must be an integer in [0, 2**63), got {cfg['seed']!r}")
    return cfg


def _grid(values: dict) -> list[dict]:
    combos = [{}]
    for key, options in values.items():
        combos = [{**c, key: v} for c in combos for v in options]
    return combos


def plan(cfg: dict) -> list[RunSpec]:
    """All runs, most important first (so a run cut short has the claim's cells)."""
    g = cfg["grid"]
    sets = ["qkv", "qkv+mlp"]
    specs = [RunSpec("dense", None, None, h) for h in _grid(g["dense"])]
    for f in sorted(set(cfg["q3r_fractions"]) | set(cfg["lora_fractions"]), reverse=True):
        for s in sets:
            if f in cfg["q3r_fractions"]:
                specs += [RunSpec("q3r", s, f, h) for h in _grid(g["q3r"])]
            if f in cfg["lora_fractions"]:
                specs += [RunSpec("lora", s, f, h) for h in _grid(g["lora"])]
        if f == max(cfg["q3r_fractions"]):
            specs += [RunSpec("lorita", s, None, h) for s in sets for h in _grid(g["lorita"])]
    return specs


def load_data(cfg: dict, data_dir, device) -> dict:
    """Train / validation (held out from train by a seeded permutation) / test, on ``device``."""
    raw = fashion_mnist.load(data_dir)
    perm = torch.randperm(len(raw["train_labels"]), generator=seed_generator(cfg["seed"], 99))
    train_idx, val_idx = perm[: cfg["n_train"]], perm[len(perm) - cfg["n_val"]:]
    if cfg["n_train"] + cfg["n_val"] > len(perm):
        raise ValueError(f"n_train + n_val = {cfg['n_train'] + cfg['n_val']} exceeds the {len(perm)} training images")
    return {k: v.to(device) for k, v in dict(
        train_images=raw["train_images"][train_idx], train_labels=raw["train_labels"][train_idx],
        val_images=raw["train_images"][val_idx], val_labels=raw["train_labels"][val_idx],
        test_images=raw["test_images"][: cfg["n_test"]], test_labels=raw["test_labels"][: cfg["n_test"]],
    ).items()}


_WORKER_DATA: dict = {}


def _run_in_worker(cfg, spec, data_dir, device, checkpoint_dir, threads):
    """Process-pool entry point: each worker loads the data once and trains one run at a time."""
    torch.set_num_threads(threads)
    key = (str(data_dir), str(device))
    if key not in _WORKER_DATA:
        _WORKER_DATA[key] = load_data(cfg, data_dir, device)
    return train_run(cfg, spec, _WORKER_DATA[key], device, checkpoint_dir)


def resolve_device(device: str) -> str:
    """``auto`` -> cuda if there is one, else cpu; any other value must name a usable device."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UsageError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"device {device!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_out_dir(out: Path, cfg: dict, fresh: bool) -> None:
    """Refuse an --out that is not a folder, or that holds runs of another configuration."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"out {str(out)!r}: {existing} is a file, not a folder")
    config_file = out / "config.json"
    if fresh or not config_file.exists():
        return
    try:
        same = json.loads(config_file.read_text()) == json.loads(json.dumps(cfg))
    except ValueError:  # unreadable: cannot tell whether its runs match this configuration
        raise UsageError(f"{config_file} is unreadable; use another --out or --fresh") from None
    if not same:
        raise UsageError(f"{out} holds runs of a different configuration; use another --out or --fresh")


def check_data_size(cfg: dict, data_dir) -> None:
    """Readable data with enough training and test images for the size's splits. Every file is
    read in full here, before --out is touched: a damaged file found later (after --fresh has
    deleted the finished runs) would cost those runs."""
    try:
        have = fashion_mnist.check(data_dir)
    except ValueError as err:
        raise UsageError(str(err)) from None
    need_train = cfg["n_train"] + cfg["n_val"]
    if need_train > have["train_labels"] or cfg["n_test"] > have["test_labels"]:
        raise UsageError(f"size {cfg['size']!r} needs {need_train} training and {cfg['n_test']} test images; "
                         f"{fashion_mnist.data_dir(data_dir)} holds {have['train_labels']} and {have['test_labels']}")


_EVAL_KEYS = ("target_set", "fraction", "val_acc", "test_acc", "model_params", "target_params",
              "target_params_dense", "rel_trunc_error")


def _check_run(result, run_id: str) -> None:
    """Raise ValueError unless ``result`` is a run file of this version for ``run_id``."""
    if not isinstance(result, dict) or result.get("run") != run_id:
        raise ValueError(f"not a result of run {run_id}")
    spec, evals = result.get("spec"), result.get("evals")
    if not (isinstance(spec, dict) and isinstance(spec.get("method"), str) and isinstance(spec.get("hparams"), dict)):
        raise ValueError("no valid 'spec'")
    if not (isinstance(evals, list) and evals and all(isinstance(e, dict) and all(k in e for k in _EVAL_KEYS) for e in evals)):
        raise ValueError("no valid 'evals'")


def _read_runs(runs_dir: Path) -> dict:
    """Finished runs by id; a file that does not parse (cut short by an older version) or does
    not hold what this version writes is treated as not finished, so its run is trained
    again and the file rewritten."""
    results = {}
    for p in runs_dir.glob("*.json"):
        try:
            result = json.loads(p.read_text())
            _check_run(result, p.stem)
        except ValueError as err:
            warnings.warn(f"{p} is unreadable ({err}); its run will be trained again")
            continue
        results[p.stem] = result
    return results


def run_experiment(cfg: dict, out_dir, data_dir=None, device="auto", workers=1, fresh=False, meta=None, log=print) -> dict:
    """Run (or resume) every planned run and write the outputs; returns the summary dict."""
    # Every check comes before the first file is touched: a refused run (a typo in --device
    # with --fresh, say) must neither delete finished runs nor leave folders behind.
    device = resolve_device(device)
    if not (isinstance(workers, int) and workers >= 1):
        raise UsageError(f"workers must be an integer >= 1, got {workers!r}")
    out = Path(out_dir)
    check_out_dir(out, cfg, fresh)
    check_data_size(cfg, data_dir)  # also fails, with the install hint, if the data is missing
    out.mkdir(parents=True, exist_ok=True)
    with _sole_user(out):
        return _run_experiment(cfg, out, data_dir, device, workers, fresh, meta, log)


LOCK_NAME = ".q3r-experiment.lock"


@contextmanager
def _sole_user(out: Path):
    """One command per --out at a time. Two on one folder trained every run twice, and a
    --fresh in one deleted the other's finished runs (h48). The lock file holds the host and
    process id of its command; one left by a command that died on this host (kill -9) is taken
    over, one from another host (a shared file system) is refused with its path."""
    path, me = out / LOCK_NAME, f"{socket.gethostname()} {os.getpid()}"
    with _takeover_guard(out):
        _take_lock(out, path, me)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


@contextmanager
def _takeover_guard(out: Path):
    """Commands on this host take the lock one at a time (a flock on the folder, released by the
    kernel if the command dies): two that found the same stale lock both removed it, the second
    removing the lock the first had just made, and both ran."""
    try:
        import fcntl

        fd = os.open(out, os.O_RDONLY)
    except (ImportError, OSError):  # (no flock here: the lock file alone)
        yield
        return
    try:
        with suppress(OSError):  # (a file system without flock: the lock file alone)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _take_lock(out: Path, path: Path, me: str) -> None:
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = path.read_text().strip()
            except OSError:
                holder = ""
            host, _, pid = holder.partition(" ")
            if attempt == 0 and host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                path.unlink(missing_ok=True)  # (its command is gone: stale)
                continue
            raise UsageError(f"{out} is in use by another q3r experiment command ({holder or 'unknown'}); wait for it "
                             f"to finish or use another --out (if that command is gone, remove {path})") from None
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # (another user's process)
        return True
    return True


def _run_experiment(cfg: dict, out: Path, data_dir, device: str, workers: int, fresh: bool, meta, log) -> dict:
    # again under the lock: a command of another configuration that held it may have written
    # config.json since the check before it (h51)
    check_out_dir(out, cfg, fresh)
    runs_dir, ckpt_dir = out / "runs", out / "checkpoints"
    runs_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if fresh:
        for f in list(runs_dir.glob("*.json")) + list(ckpt_dir.glob("*.pt")):
            f.unlink()
    write_text(out / "config.json", json.dumps(cfg, indent=1))
    if torch.device(device).type == "cpu" and cfg.get("cpu_threads"):
        # A tiny model gains nothing from threads, and on a busy machine they cost a lot.
        torch.set_num_threads(min(torch.get_num_threads(), cfg["cpu_threads"]))
    meta = dict(meta or {}, device=_device_name(device), torch=torch.__version__, size=cfg["size"])
    specs = plan(cfg)
    results = _read_runs(runs_dir)
    todo = [s for s in specs if s.run_id not in results]
    log(f"{len(specs)} runs planned, {len(specs) - len(todo)} already finished; device {meta['device']}, {workers} worker(s)")

    trained = []  # runs finished by this command

    def progress_meta(extra=None):
        # which planned runs have no result yet: the report says so rather than passing a
        # table chosen among some of the tuning runs off as the experiment's
        return dict(meta, **(extra or {}), runs_planned=len(specs),
                    runs_missing=[s.run_id for s in specs if s.run_id not in results])

    if fresh:  # the previous outputs describe the runs just deleted
        report.write_outputs(out, cfg, [], progress_meta())

    def finished(result):
        trained.append(result["run"])
        # who trained it: a later command that resumes (another commit, another device) must
        # not pass this run off as its own (results.json's meta is the last command's)
        result["trained_with"] = {k: meta.get(k) for k in ("commit", "device", "torch", "command")}
        write_text(runs_dir / f"{result['run']}.json", json.dumps(result, indent=1))
        results[result["run"]] = result
        (ckpt_dir / f"{result['run']}.pt").unlink(missing_ok=True)
        report.write_outputs(out, cfg, [results[s.run_id] for s in specs if s.run_id in results], progress_meta())
        best = max(e["test_acc"] for e in result["evals"])
        log(f"finished {result['run']} in {result['train_seconds']:.0f}s (best test acc {best:.4f})")

    start = time.perf_counter()
    from tqdm.auto import tqdm

    if workers <= 1:
        data = load_data(cfg, data_dir, device)
        steps = len(data["train_labels"]) // cfg["batch_size"] * cfg["epochs"]
        with tqdm(total=steps * len(todo), desc="vit-fmnist", unit="step", mininterval=2.0) as bar:
            for spec in todo:
                finished(train_run(cfg, spec, data, device, ckpt_dir, progress=bar))
    else:
        threads = max(1, (os.cpu_count() or 2) // workers)
        ctx = torch.multiprocessing.get_context("spawn")  # CUDA cannot be forked
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool, tqdm(total=len(todo), desc="vit-fmnist runs", unit="run") as bar:
            futures = {pool.submit(_run_in_worker, cfg, s, data_dir, device, ckpt_dir, threads): s for s in todo}
            for fut in as_completed(futures):
                bar.update(1)
                try:
                    finished(fut.result())
                except Exception as err:  # one failed run must not lose the others' results
                    log(f"run {futures[fut].run_id} failed: {type(err).__name__}: {err}")
    ordered = [results[s.run_id] for s in specs if s.run_id in results]
    # (the wall time of this command only: a command that resumes finished runs trains none of
    # them, so it says how many it trained)
    summary = report.write_outputs(out, cfg, ordered, progress_meta(dict(wall_seconds=round(time.perf_counter() - start, 1),
                                                                         runs_trained=len(trained))))
    log(summary["markdown"])
    return summary


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"cuda: {torch.cuda.get_device_name()}"
    return f"cpu ({os.cpu_count()} cores)"

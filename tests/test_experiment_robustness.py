"""Damaged inputs of the vit-fmnist harness (found in review h48): a damaged data file is a
user error found before --out is touched, and a run file or checkpoint that parses but is not
what this version writes is trained again with a warning, as an unreadable one is."""

import gzip
import json

import pytest
import torch

from test_experiment_smoke import _cli, _fake_fmnist, _tiny_config, _tree

from q3r.experiments import fashion_mnist
from q3r.experiments.harness import UsageError, plan, run_experiment

LABELS = fashion_mnist.FILES["test_labels"]


def _damage(folder, how):
    path = folder / LABELS
    if how == "wrong magic":
        raw = gzip.open(path).read()
        with gzip.open(path, "wb") as f:
            f.write(b"\x00\x00\x0d\x01" + raw[4:])
    elif how == "gzip cut short":
        comp = path.read_bytes()
        path.write_bytes(comp[: len(comp) // 2])
    elif how == "not gzip":
        path.write_bytes(gzip.open(path).read())
    elif how == "data cut short":
        raw = gzip.open(path).read()
        with gzip.open(path, "wb") as f:
            f.write(raw[:-5])
    return path


@pytest.mark.parametrize("how", ["wrong magic", "gzip cut short", "not gzip", "data cut short"])
def test_damaged_data_is_refused_before_fresh_deletes_anything(how, tmp_path, capsys):
    data, out = _fake_fmnist(tmp_path / "data", n_train=3584, n_test=1000), tmp_path / "out"
    bad = _damage(data, how)
    (out / "runs").mkdir(parents=True)
    (out / "checkpoints").mkdir()
    (out / "runs" / "dense-wd0.05.json").write_text("{}")
    (out / "checkpoints" / "q3r-qkv-f0.2-lmbda0.5.pt").write_bytes(b"x")
    before = _tree(out)
    rc, err = _cli(["vit-fmnist", "--out", str(out), "--data-dir", str(data), "--device", "cpu", "--fresh"], capsys)
    assert rc == 2 and err.startswith("q3r experiment: error: ") and str(bad) in err, err
    assert _tree(out) == before  # the finished run and the checkpoint are still there


def test_read_idx_names_the_file(tmp_path):
    data = _fake_fmnist(tmp_path / "data", n_train=8, n_test=8)
    bad = _damage(data, "not gzip")
    with pytest.raises(ValueError, match=str(bad)):
        fashion_mnist.load(data)
    with pytest.raises(UsageError, match=str(bad)):
        run_experiment(_tiny_config(), tmp_path / "out", data_dir=data, device="cpu", log=lambda *a: None)


def test_run_files_and_checkpoints_that_parse_but_do_not_fit_are_trained_again(tmp_path):
    data, out = _fake_fmnist(tmp_path / "data"), tmp_path / "out"
    cfg = _tiny_config()
    run_experiment(cfg, out, data_dir=data, device="cpu", log=lambda *a: None)
    runs = sorted((out / "runs").glob("*.json"))
    expected = {p.stem: json.loads(p.read_text())["evals"] for p in runs}
    empty, other, lost = runs[0], runs[1], runs[2]
    empty.write_text("{}")  # valid JSON, not a run file
    other.write_text(runs[3].read_text())  # another run's result under this name
    lost.unlink()
    torch.save({"model": {}, "epoch": 1}, out / "checkpoints" / f"{lost.stem}.pt")  # loads, does not fit
    with pytest.warns(UserWarning) as caught:
        summary = run_experiment(cfg, out, data_dir=data, device="cpu", log=lambda *a: None)
    messages = " ".join(str(w.message) for w in caught)
    assert str(empty) in messages and str(other) in messages and f"{lost.stem}.pt" in messages
    assert summary["meta"]["runs_trained"] == 3 and len(summary["runs"]) == len(plan(cfg))
    for p in (empty, other, lost):  # trained again from scratch: the same result as the first time
        assert json.loads(p.read_text())["evals"] == expected[p.stem]


def test_a_partial_report_says_which_runs_are_missing(tmp_path, capsys, monkeypatch):
    data, out = _fake_fmnist(tmp_path / "data"), tmp_path / "out"
    cfg = _tiny_config(lora_fractions=[0.2])
    cfg["grid"]["lora"]["lr"] = [float("nan")]  # AdamW refuses it: both LoRA runs fail in their worker
    lines = []
    summary = run_experiment(cfg, out, data_dir=data, device="cpu", workers=2, log=lines.append)
    failed = sorted(s.run_id for s in plan(cfg) if s.method == "lora")
    assert sum("failed" in line for line in lines) == 2
    assert sorted(summary["meta"]["runs_missing"]) == failed and summary["meta"]["runs_planned"] == len(plan(cfg))
    md = (out / "results.md").read_text()
    assert f"{len(plan(cfg)) - 2} of {len(plan(cfg))} planned runs finished" in md and all(f in md for f in failed)
    assert json.loads((out / "results.json").read_text())["meta"]["runs_missing"] == summary["meta"]["runs_missing"]

    # the command line exits non-zero on such a summary
    from q3r.experiments import harness
    monkeypatch.setattr(harness, "run_experiment", lambda *a, **k: summary)
    rc, err = _cli(["vit-fmnist", "--out", str(out), "--data-dir", str(data)], capsys)
    assert rc == 1 and all(f in err for f in failed)


def test_fresh_does_not_leave_the_deleted_runs_report(tmp_path, monkeypatch):
    from q3r.experiments import harness

    data, out = _fake_fmnist(tmp_path / "data"), tmp_path / "out"
    cfg = _tiny_config()
    run_experiment(cfg, out, data_dir=data, device="cpu", log=lambda *a: None)
    assert (out / "results.png").exists()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness, "train_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, out, data_dir=data, device="cpu", fresh=True, log=lambda *a: None)
    assert not list((out / "runs").glob("*.json"))
    assert json.loads((out / "results.json").read_text())["table"] == []
    assert f"0 of {len(plan(cfg))} planned runs finished" in (out / "results.md").read_text()
    assert not (out / "results.png").exists()


def test_each_run_records_who_trained_it_and_a_mixed_report_says_so(tmp_path):
    data, out = _fake_fmnist(tmp_path / "data"), tmp_path / "out"
    cfg = _tiny_config()
    a = dict(commit="aaaaaaa", command="q3r experiment vit-fmnist --device cuda")
    run_experiment(cfg, out, data_dir=data, device="cpu", meta=a, log=lambda *x: None)
    runs = sorted((out / "runs").glob("*.json"))
    runs[0].unlink()  # trained again by a later command at another commit
    summary = run_experiment(cfg, out, data_dir=data, device="cpu", meta=dict(commit="bbbbbbb"), log=lambda *x: None)
    by_run = {r["run"]: r["trained_with"]["commit"] for r in summary["runs"]}
    assert by_run[runs[0].stem] == "bbbbbbb" and sum(c == "aaaaaaa" for c in by_run.values()) == len(runs) - 1
    md = (out / "results.md").read_text()
    assert "trained by 2 different setups" in md and "aaaaaaa" in md and "bbbbbbb" in md


def test_one_command_per_out_folder_at_a_time(tmp_path):
    """Two commands on one --out trained every run twice, and a --fresh in one deleted the
    other's finished runs (h48): the second is refused, naming the holder, with nothing touched;
    a lock left by a command that died on this host is taken over, and a finished command
    leaves none behind."""
    import os
    import socket
    import subprocess
    import sys

    from q3r.experiments.harness import LOCK_NAME

    data, out = _fake_fmnist(tmp_path / "data"), tmp_path / "out"
    cfg = _tiny_config()
    run_experiment(cfg, out, data_dir=data, device="cpu", log=lambda *a: None)
    assert not (out / LOCK_NAME).exists()
    lock = out / LOCK_NAME
    for holder in (f"{socket.gethostname()} {os.getpid()}", "another-host 123"):  # (alive here; another host's)
        lock.write_text(holder)
        before = _tree(out)
        with pytest.raises(UsageError, match=rf"is in use by another q3r experiment command \({holder}\).*remove {lock}"):
            run_experiment(cfg, out, data_dir=data, device="cpu", fresh=True, log=lambda *a: None)
        assert _tree(out) == before  # (--fresh deleted nothing)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(f"{socket.gethostname()} {int(gone.stdout)}")  # (its command was killed: stale)
    summary = run_experiment(cfg, out, data_dir=data, device="cpu", log=lambda *a: None)
    assert summary["meta"]["runs_missing"] == [] and not lock.exists()


def test_two_commands_that_find_one_stale_lock_do_not_both_take_it_over(tmp_path, monkeypatch):
    """Both read the dead holder before either takes it over (held open by a slow liveness
    check): each removed the lock file and made its own, the second removing the first's, and
    both ran on one --out. Now one takes it over, the other is refused naming it."""
    import socket
    import threading
    import time

    from q3r.experiments import harness

    (tmp_path / harness.LOCK_NAME).write_text(f"{socket.gethostname()} 999999999")  # (no such process)
    real_alive = harness._alive

    def slow_alive(pid):
        time.sleep(0.5)
        return real_alive(pid)

    monkeypatch.setattr(harness, "_alive", slow_alive)
    inside, refused = [], []

    def command(name):
        try:
            with harness._sole_user(tmp_path):
                inside.append(name)
                time.sleep(1.5)
        except UsageError:
            refused.append(name)

    threads = [threading.Thread(target=command, args=(name,)) for name in "AB"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(inside) == 1 and len(refused) == 1, (inside, refused)
    assert not (tmp_path / harness.LOCK_NAME).exists()


@pytest.mark.parametrize("where", ["reading", "loading"])
def test_a_checkpoint_that_fails_for_want_of_memory_is_not_trained_over(where, tmp_path, monkeypatch):
    """Out of memory while reading or loading a good checkpoint is the device's state, not the
    file's: it was caught as a damaged checkpoint, the run started again from epoch 0, and the
    checkpoint was overwritten after one epoch (h51). It is raised, the checkpoint kept."""
    from q3r.experiments import training

    data, out = _fake_fmnist(tmp_path / "data"), tmp_path / "out"
    cfg = _tiny_config()
    run_experiment(cfg, out, data_dir=data, device="cpu", log=lambda *a: None)
    run = sorted((out / "runs").glob("*.json"))[0]
    run.unlink()
    checkpoint = out / "checkpoints" / f"{run.stem}.pt"
    torch.save({"model": {}, "optimizer": {}, "scheduler": {}, "epoch": 1, "seconds": 0.0}, checkpoint)
    kept = checkpoint.read_bytes()

    def out_of_memory(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    if where == "reading":
        monkeypatch.setattr(training.torch, "load", out_of_memory)
    else:
        monkeypatch.setattr(torch.nn.Module, "load_state_dict", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        run_experiment(cfg, out, data_dir=data, device="cpu", log=lambda *a: None)
    assert checkpoint.read_bytes() == kept


def test_the_out_folders_configuration_is_checked_again_under_the_lock(tmp_path, monkeypatch):
    """A command of another configuration that held the lock may have written config.json after
    this command's first check: checked again once the lock is taken (h51)."""
    from q3r.experiments import harness

    data, out = _fake_fmnist(tmp_path / "data"), tmp_path / "out"
    cfg = _tiny_config()
    take = harness._take_lock

    def after_the_other_command(out_dir, path, me):  # (it ran with another configuration meanwhile)
        (out_dir / "config.json").write_text(json.dumps({**cfg, "seed": cfg["seed"] + 1}))
        take(out_dir, path, me)

    monkeypatch.setattr(harness, "_take_lock", after_the_other_command)
    with pytest.raises(UsageError, match="holds runs of a different configuration"):
        run_experiment(cfg, out, data_dir=data, device="cpu", log=lambda *a: None)
    assert not (out / "runs").exists()

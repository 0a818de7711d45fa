"""The vit-fmnist pipeline end to end at its smoke size (CPU, ~1-2 minutes): it checks that
the harness trains every method, truncates, and writes a sane table; it is not the claim."""

import csv
import json
import subprocess
import sys

import pytest
import torch

from q3r.experiments import fashion_mnist
from q3r.experiments.harness import make_config, plan


def _have_data() -> bool:
    try:
        fashion_mnist.data_dir()
        return True
    except FileNotFoundError:
        return False


def test_missing_data_names_the_install_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        fashion_mnist.data_dir(tmp_path)


def test_plan_covers_every_method_and_target_set():
    specs = plan(make_config("full"))
    methods = {(s.method, s.target_set) for s in specs}
    for m in ("q3r", "lora", "lorita"):
        assert (m, "qkv") in methods and (m, "qkv+mlp") in methods
    assert ("dense", None) in methods
    assert len({s.run_id for s in specs}) == len(specs)


@pytest.mark.skipif(not _have_data(), reason="Fashion-MNIST missing: apt-get install -y dataset-fashion-mnist")
def test_smoke_run_writes_a_sane_table(tmp_path):
    out = tmp_path / "smoke"
    cmd = [sys.executable, "-m", "q3r.experiments.cli", "vit-fmnist", "--size", "smoke", "--out", str(out), "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("results.json", "results.csv", "results.md", "results.png"):
        assert (out / name).stat().st_size > 0
    summary = json.loads((out / "results.json").read_text())
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["method"] for r in rows} >= {"dense+SVD", "Q3R (trained at 20%)", "LoRA from scratch", "LoRITa N=2"}
    assert all(0.0 <= float(r["test_acc"]) <= 1.0 for r in rows)
    dense = {(r["target_set"], float(r["fraction"])): float(r["test_acc"]) for r in rows if r["method"] == "dense+SVD"}
    for s in ("qkv", "qkv+mlp"):
        assert dense[(s, 1.0)] > 0.2  # it learned something (10 classes: chance is 0.1)
        assert dense[(s, 0.1)] <= dense[(s, 1.0)] + 0.05  # keeping more parameters does not grossly hurt
        params = [int(r["model_params"]) for r in rows if r["method"] == "dense+SVD" and r["target_set"] == s]
        assert params == sorted(params, reverse=True)  # 100% .. 10% kept: fewer parameters each step
    assert summary["claims"] and all(isinstance(c["holds"], bool) for c in summary["claims"])
    # Resuming finds every run finished and trains nothing.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "7 already finished" in again.stdout


# Bad input and interrupted runs, on tiny fake Fashion-MNIST files (random pixels, seconds).

def _fake_fmnist(folder, n_train=192, n_test=64):
    """The four IDX .gz files, in the format fashion_mnist.read_idx reads."""
    import gzip

    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shapes = dict(train_images=(n_train, 28, 28), train_labels=(n_train,), test_images=(n_test, 28, 28), test_labels=(n_test,))
    for key, name in fashion_mnist.FILES.items():
        arr = rng.integers(0, 10 if key.endswith("labels") else 256, shapes[key], dtype=np.uint8)
        header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
        with gzip.open(folder / name, "wb") as f:
            f.write(header + arr.tobytes())
    return folder


def _tiny_config(**overrides):
    return make_config("smoke", **{**dict(epochs=1, n_train=128, n_val=64, n_test=64, batch_size=64, lora_fractions=[]), **overrides})


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _cli(argv, capsys):
    from q3r.experiments import cli

    try:
        rc = cli.main(argv)
    except SystemExit as exit_:  # argparse refusals
        rc = exit_.code
    return rc, capsys.readouterr().err


def test_fresh_with_a_bad_device_deletes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    (out / "checkpoints").mkdir()
    (out / "runs" / "dense-wd0.05.json").write_text("{}")
    (out / "checkpoints" / "q3r-qkv-f0.2-lmbda0.5.pt").write_bytes(b"x")
    before = _tree(out)
    rc, err = _cli(["vit-fmnist", "--out", str(out), "--data-dir", str(_fake_fmnist(tmp_path / "data")),
                    "--fresh", "--device", "cdua"], capsys)
    assert rc == 2 and "device" in err and "'cdua'" in err
    assert _tree(out) == before


@pytest.mark.parametrize("option", ["--out", "--data-dir"])
def test_an_empty_out_or_data_dir_is_refused_not_replaced_by_the_default(option, tmp_path, capsys, monkeypatch):
    # (`--out "$DIR" --fresh` with DIR unset ran on the default runs/vit-fmnist-<size>, whose
    # finished runs --fresh deletes; an empty --data-dir read $Q3R_FMNIST_DIR or Debian's folder)
    monkeypatch.chdir(tmp_path)
    default_runs = tmp_path / "runs" / "vit-fmnist-smoke" / "runs"
    default_runs.mkdir(parents=True)
    (default_runs / "dense-wd0.05.json").write_text("{}")
    values = {"--out": str(tmp_path / "out"), "--data-dir": str(_fake_fmnist(tmp_path / "data")), option: ""}
    # (a bad --device too: without the check the command stops there, before training)
    rc, err = _cli(["vit-fmnist", "--out", values["--out"], "--data-dir", values["--data-dir"], "--fresh",
                    "--device", "cdua"], capsys)
    assert rc == 2 and f"argument {option}: must not be empty" in err
    assert (default_runs / "dense-wd0.05.json").exists()


def test_cuda_requested_without_cuda_is_refused(monkeypatch):
    from q3r.experiments.harness import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device(device)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"


@pytest.mark.parametrize("option", ["--epochs", "--workers"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_counts_below_one_are_refused(option, value, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = _cli(["vit-fmnist", "--out", str(out), "--data-dir", str(_fake_fmnist(tmp_path / "data")), option, value], capsys)
    assert rc == 2 and f"argument {option}: must be an integer >= 1" in err
    assert not out.exists()
    with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
        make_config("smoke", epochs=int(value))


@pytest.mark.parametrize("case", ["bogus device", "cuda without cuda", "other config", "out is a file", "too few images"])
def test_user_errors_print_a_message_and_touch_nothing(case, tmp_path, capsys, monkeypatch):
    data, out = _fake_fmnist(tmp_path / "data"), tmp_path / "out"
    args = {"--out": str(out), "--data-dir": str(data), "--device": "cpu", "--epochs": "1"}
    if case == "bogus device":
        args["--device"] = "bogus"
    elif case == "cuda without cuda":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        args["--device"] = "cuda"
    elif case == "other config":
        out.mkdir()
        (out / "config.json").write_text('{"size": "smoke", "epochs": 9}')
    elif case == "out is a file":
        out.write_text("not a folder")
    else:  # smoke size needs 3072 + 512 training images; the fake data has 192
        pass
    before = _tree(tmp_path)
    rc, err = _cli(["vit-fmnist"] + [x for kv in args.items() for x in kv], capsys)
    assert rc == 2 and err.startswith("q3r experiment: error: ") and "Traceback" not in err, err
    assert _tree(tmp_path) == before


def test_resume_retrains_runs_whose_files_were_cut_short(tmp_path):
    from q3r.experiments.harness import run_experiment

    data, out = _fake_fmnist(tmp_path / "data"), tmp_path / "out"
    cfg = _tiny_config()
    run_experiment(cfg, out, data_dir=data, device="cpu", log=lambda *a: None)
    runs = sorted((out / "runs").glob("*.json"))
    assert len(runs) == len(plan(cfg)) and not list(out.rglob("*.tmp"))
    assert json.loads((out / "results.json").read_text())["meta"]["runs_trained"] == len(runs)
    cut, lost = runs[0], runs[1]  # a run file cut short; a run killed while saving its checkpoint
    cut.write_text(cut.read_text()[:100])
    lost.unlink()
    (out / "checkpoints" / f"{lost.stem}.pt").write_bytes(b"PK\x03\x04garbage")
    lines = []
    with pytest.warns(UserWarning) as caught:
        summary = run_experiment(cfg, out, data_dir=data, device="cpu", log=lines.append)
    messages = " ".join(str(w.message) for w in caught)
    assert str(cut) in messages and f"{lost.stem}.pt" in messages
    assert f"{len(runs) - 2} already finished" in lines[0]
    assert len(summary["runs"]) == len(runs)
    for p in (cut, lost):
        assert json.loads(p.read_text())["run"] == p.stem
    # (its wall time covers only what this command did: the two runs it trained again)
    assert json.loads((out / "results.json").read_text())["meta"]["runs_trained"] == 2


def test_a_checkpoint_write_cut_short_keeps_the_last_good_one(tmp_path, monkeypatch):
    from q3r.experiments import training
    from q3r.experiments.harness import load_data

    cfg = _tiny_config(epochs=2)
    data = load_data(cfg, _fake_fmnist(tmp_path / "data"), "cpu")
    spec = plan(cfg)[0]
    (tmp_path / "ckpt").mkdir()
    real_save, saves = torch.save, []

    def killed_in_second_save(obj, path):
        saves.append(path)
        if len(saves) == 1:
            return real_save(obj, path)
        with open(path, "wb") as f:  # the process dies half way through the file
            f.write(b"PK\x03\x04partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(training.torch, "save", killed_in_second_save)
    with pytest.raises(KeyboardInterrupt):
        training.train_run(cfg, spec, data, "cpu", tmp_path / "ckpt")
    assert torch.load(tmp_path / "ckpt" / f"{spec.run_id}.pt", weights_only=True)["epoch"] == 1
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == [f"{spec.run_id}.pt"]  # no temporary left


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path):
    from q3r._files import atomic_path, write_text

    path = tmp_path / "results.json"
    write_text(path, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]

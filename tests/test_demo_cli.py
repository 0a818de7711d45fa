"""The main job end to end at a reduced size, and the CLI wiring."""

import json

import pytest

from q3r import cli
from q3r.demo import FRACTIONS, DemoConfig, run_demo

pytest.importorskip("sklearn", reason="the demo's data comes with scikit-learn (installed by .ci/run)")


def test_demo_trains_truncates_and_reports(capsys):
    result = run_demo(DemoConfig(epochs=3, width=128))
    rows = result["rows"]
    assert [r["fraction"] for r in rows] == list(FRACTIONS)
    for r in rows:
        assert 0.0 <= r["adamw"] <= 1.0 and 0.0 <= r["adamq3r"] <= 1.0
    assert rows[0]["adamw"] > 0.5 and rows[0]["adamq3r"] > 0.5  # 3 epochs already learn digits
    params = [r["target_params"] for r in rows]
    assert params == sorted(params, reverse=True) and params[0] == 2 * 128 * 128
    out = capsys.readouterr().out
    assert "AdamQ3R + SVD" in out and "100%" in out


def test_cli_demo_writes_json(tmp_path):
    path = tmp_path / "demo.json"
    assert cli.main(["demo", "--epochs", "1", "--json", str(path)]) == 0
    assert len(json.loads(path.read_text())["rows"]) == len(FRACTIONS)


def test_cli_rejects_unknown_command():
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])


@pytest.mark.parametrize("option, message", [
    (["--target-rank", "5"], "target_rank"), (["--lmbda", "-1"], "lmbda"), (["--epochs", "0"], "epochs"),
    (["--seed", "99999999999999999999"], "seed"), (["--json", "/no/such/dir/out.json"], "--json"),
    # (an empty --json, as from an unset shell variable, trained and wrote nothing, exit status 0)
    (["--json", ""], "--json: got an empty path"),
])
def test_cli_demo_refuses_bad_options_before_training(option, message, capsys, monkeypatch):
    import q3r.demo

    monkeypatch.setattr(q3r.demo, "train", lambda *a, **k: pytest.fail("trained before checking its options"))
    assert cli.main(["demo", *option]) == 2
    assert message in capsys.readouterr().err


def test_cli_demo_refuses_a_directory_as_json(tmp_path, capsys):
    assert cli.main(["demo", "--json", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_python_dash_m_q3r_runs_the_cli():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "q3r", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "demo" in done.stdout


def test_dev_script_resolves_a_relative_venv_against_where_it_was_called(tmp_path, monkeypatch):
    """tools/dev.py runs its commands from the repository root: Q3R_VENV=rel must mean the
    caller's ./rel, an absolute path."""
    import importlib.util
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("Q3R_VENV", "rel")
    spec = importlib.util.spec_from_file_location("dev_script", Path(__file__).parent.parent / "tools" / "dev.py")
    dev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dev)
    assert dev.VENV == tmp_path / "rel"


def test_dev_script_installs_pip_into_a_venv_without_it_and_says_what_is_missing(tmp_path, monkeypatch):
    """A venv left without pip (its ensurepip failed: Debian's python3 without python3-venv) was
    taken as ready: every later run failed in `python -m pip` with 'No module named pip'."""
    import importlib.util
    import subprocess
    from pathlib import Path

    monkeypatch.setenv("Q3R_VENV", str(tmp_path / "env"))
    spec = importlib.util.spec_from_file_location("dev_script", Path(__file__).parent.parent / "tools" / "dev.py")
    dev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dev)
    dev.PY.parent.mkdir(parents=True)
    dev.PY.touch()  # (the venv's python is there)
    ran = []

    def sh(*cmd, env=None):
        ran.append(cmd[1:3])
        if cmd[1:3] == ("-m", "ensurepip"):
            raise subprocess.CalledProcessError(1, cmd)
        pytest.fail(f"ran {cmd} in a venv without pip")

    monkeypatch.setattr(dev, "has_module", lambda name: False)
    monkeypatch.setattr(dev, "sh", sh)
    with pytest.raises(SystemExit, match="python3-venv"):
        dev.setup("demo")
    assert ran == [("-m", "ensurepip")]


@pytest.mark.parametrize("built", [False, True, "failed"])
def test_dev_script_demo_keeps_a_built_native_module(tmp_path, monkeypatch, built):
    """`dev.py demo` installed with Q3R_BUILD_NATIVE=0, which deletes python/q3r/_C*: a module
    that `dev.py test` or the CMake build had made was removed by the next demo (h61). The note
    a failed build leaves (_C_build_failed.txt) is no module: the demo does not try the build again."""
    import importlib.util
    from pathlib import Path

    monkeypatch.setenv("Q3R_VENV", str(tmp_path / "env"))
    monkeypatch.delenv("Q3R_BUILD_NATIVE", raising=False)
    spec = importlib.util.spec_from_file_location("dev_script", Path(__file__).parent.parent / "tools" / "dev.py")
    dev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dev)
    root = tmp_path / "root"
    (root / "python" / "q3r").mkdir(parents=True)
    if built == "failed":
        (root / "python" / "q3r" / "_C_build_failed.txt").touch()
    elif built:
        (root / "python" / "q3r" / "_C.cpython-311-x86_64-linux-gnu.so").touch()
    envs = []
    monkeypatch.setattr(dev, "ROOT", root)
    (tmp_path / "python").touch()  # (the venv's python, there)
    monkeypatch.setattr(dev, "PY", tmp_path / "python")
    monkeypatch.setattr(dev, "has_module", lambda name: True)
    monkeypatch.setattr(dev, "sh", lambda *cmd, env=None: envs.append(env))
    dev.setup("demo")
    assert envs[-1].get("Q3R_BUILD_NATIVE") == (None if built is True else "0")

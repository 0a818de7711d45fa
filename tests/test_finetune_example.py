"""examples/finetune_minilm_sentiment.py on a tiny randomly initialized BERT and a synthetic
copy of the vaderSentiment archive: the data reader, the targets of a Hugging Face BERT, that
AdamQ3R pushes them to low rank there, and the whole command (runs, table, save / load check,
resume)."""

import io
import json
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import q3r

transformers = pytest.importorskip("transformers", reason="transformers is installed by .ci/run")
pytest.importorskip("safetensors")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import finetune_minilm_sentiment as ex  # noqa: E402

WORDS = ["good", "great", "fine", "lovely", "bad", "awful", "dull", "poor", "the", "film", "was", "a", "plot", "cast"]


def _sentences(n: int, seed: int = 0) -> list[tuple[str, float]]:
    """Sentences whose rating's sign follows their words (a learnable signal), a few neutral."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        pool = WORDS[:4] if positive else WORDS[4:8]
        words = [pool[j] for j in torch.randint(0, 4, (2,), generator=g).tolist()]
        words += [WORDS[8 + j] for j in torch.randint(0, 6, (3,), generator=g).tolist()]
        rating = 0.0 if i % 17 == 0 else (1.5 if positive else -1.5)
        rows.append((" ".join(words), rating))
    return rows


def _archive(tmp_path: Path, rows) -> Path:
    """The layout of the vaderSentiment-3.3.2 sdist: the ratings file inside a tarball inside it."""
    text = "\r\n".join(f"{i + 1}\t{r}\t{s}" for i, (s, r) in enumerate(rows)).encode()

    def tar_gz(members: dict) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    inner = tar_gz({"hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt": text,
                    "hutto_ICWSM_2014/tweets_GroundTruth.txt": b"1\t1.0\tnot this one"})
    path = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    path.write_bytes(tar_gz({"vaderSentiment-3.3.2/setup.py": b"",
                             "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": inner}))
    return path


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 32) with a word-level tokenizer, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    transformers.BertTokenizerFast(vocab=vocab).save_pretrained(folder)
    config = transformers.BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    return folder


def test_read_ratings_from_the_archive_a_folder_and_the_file(tmp_path):
    rows = _sentences(40)
    archive = _archive(tmp_path, rows)
    assert ex.read_ratings(archive) == rows
    assert ex.read_ratings(tmp_path) == rows  # a folder holding the archive
    plain = tmp_path / "x" / ex.RATINGS_MEMBER
    plain.parent.mkdir()
    plain.write_text("\n".join(f"{i}\t{r}\t{s}" for i, (s, r) in enumerate(rows)))
    assert ex.read_ratings(plain) == rows
    for bad in (tmp_path / "missing.tar.gz", tmp_path / "x" / "empty"):
        if bad.name == "empty":
            bad.mkdir()
        with pytest.raises(SystemExit, match="pip download --no-deps --no-binary :all: vaderSentiment"):
            ex.read_ratings(bad)


def test_split_drops_neutral_sentences_and_is_seeded():
    rows = _sentences(100)
    parts = ex.split(rows, n_test=20, n_val=10, seed=3)
    assert [len(parts[k][1]) for k in ("test", "val", "train")] == [20, 10, 100 - 6 - 30]
    sentences = [s for k in parts for s in parts[k][0]]
    assert len(sentences) == 94
    assert ex.split(rows, 20, 10, 3)["train"][0] == parts["train"][0]
    assert ex.split(rows, 20, 10, 4)["train"][0] != parts["train"][0]
    label = {s: int(r > 0) for s, r in rows if r != 0}
    assert all(label[s] == y for k in parts for s, y in zip(parts[k][0], parts[k][1].tolist()))
    with pytest.raises(SystemExit, match="leaves no training sentences"):
        ex.split(rows, 60, 40, 0)


def test_targets_of_a_hugging_face_bert(tiny_model_dir):
    model, _ = ex.load_pretrained(tiny_model_dir, seed=0)
    names = sorted(t.name for t in ex.find_encoder_targets(model, 0.2))
    per_layer = ["attention.output.dense", "attention.self.key", "attention.self.query", "attention.self.value",
                 "intermediate.dense", "output.dense"]
    assert names == sorted(f"bert.encoder.layer.{i}.{n}.weight" for i in range(2) for n in per_layer)


def _tail_fraction(model, targets, fraction):
    """Mean fraction of ||W||_F^2 beyond each target's rank at ``fraction``."""
    out = []
    for t in targets:
        d1, d2 = t.param.shape
        r = q3r.reference.resolve_rank(fraction, d1, d2, "params", t.name)
        s = torch.linalg.svdvals(model.get_parameter(t.name).detach())
        out.append((s[r:].square().sum() / s.square().sum()).item())
    return sum(out) / len(out)


def test_adamq3r_fine_tuning_pushes_bert_targets_to_low_rank(tiny_model_dir):
    """The same fine-tuning with AdamW and with AdamQ3R: both fit the training set, and only
    AdamQ3R leaves almost no energy outside the targets' leading 20% of parameters."""
    train = ex.split(_sentences(160), 20, 10, 0)["train"]
    tails, fit = {}, {}
    for method in ("dense", "q3r"):
        model, tok = ex.load_pretrained(tiny_model_dir, seed=0)
        opt = ex.make_optimizer(model, method, lr=3e-3, fraction=0.2, lmbda=30.0, weight_decay=0.01)
        ex.fine_tune(model, tok, train, opt, epochs=8, batch_size=16, seed=0, log=lambda _: None)
        fit[method] = ex.accuracy(model, tok, *train)
        tails[method] = _tail_fraction(model, ex.find_encoder_targets(model, 0.2), 0.2)
    assert min(fit.values()) >= 0.95, fit
    assert tails["q3r"] < 0.1 * tails["dense"], tails  # (lambda 0 would give 1x)


def _run(lmbda, val, fraction=0.2):
    return dict(run=ex.run_id("q3r", fraction, lmbda), lmbda=lmbda, seconds=1.0,
                evals=[dict(fraction=f, val_acc=val if f == fraction else 0.0, test_acc=0.5) for f in ex.EVAL_FRACTIONS])


def test_the_table_chooses_lambda_by_validation_at_the_training_fraction_and_the_larger_on_a_tie():
    runs = {r["run"]: r for r in (_run(1.0, 0.7), _run(30.0, 0.8), _run(100.0, 0.6))}
    assert ex.table(runs, [0.2], [1.0, 30.0, 100.0])[1] == {0.2: 30.0}
    tied = {r["run"]: r for r in (_run(1.0, 0.8), _run(30.0, 0.8))}
    assert ex.table(tied, [0.2], [1.0, 30.0])[1] == {0.2: 30.0}
    assert ex.table(tied, [0.2], [30.0, 1.0])[1] == {0.2: 30.0}  # (not the order of the grid)


@pytest.mark.parametrize("bad, message", [
    (["--max-train", "0"], "--max-train must be >= 1"),
    (["--threads", "-1"], "--threads must be >= 1"),
    (["--fractions", "0.2", "0.2000001"], "name the same run twice"),
    (["--fractions", "1.0"], "--fractions must lie in"),
    (["--lambdas", "nan"], "--lambdas must be finite"),
])
def test_bad_arguments_are_refused_before_anything_runs(bad, message, capsys):
    with pytest.raises(SystemExit):
        ex.parse_args(["--data", "x"] + bad)
    assert message in capsys.readouterr().err


def test_duplicates_in_the_grid_are_run_once():
    args = ex.parse_args(["--data", "x", "--fractions", "0.4", "0.4", "--lambdas", "3", "3", "1"])
    assert args.fractions == [0.4] and args.lambdas == [3.0, 1.0]


def test_a_model_dir_that_is_no_model_folder_is_refused_by_name(tmp_path):
    """(before, transformers took a missing folder for a hub repo id: "Repo id must use
    alphanumeric chars", or, offline, a hub error; an empty one raised after the data was read)"""
    archive = _archive(tmp_path, _sentences(40))
    for folder in (tmp_path / "missing", tmp_path):
        with pytest.raises(SystemExit, match="is not a model folder .no config.json.; the pretrained model"):
            ex.main(["--data", str(archive), "--model-dir", str(folder), "--out", str(tmp_path / "out"),
                     "--n-test", "4", "--n-val", "4", "--batch-size", "4"])


def test_too_few_training_sentences_for_one_batch_is_an_error(tiny_model_dir):
    model, tok = ex.load_pretrained(tiny_model_dir, seed=0)
    opt = ex.make_optimizer(model, "dense", lr=1e-3, fraction=None, lmbda=None, weight_decay=0.0)
    with pytest.raises(ValueError, match="make no batch of 16"):
        ex.fine_tune(model, tok, (["good film"] * 8, torch.ones(8, dtype=torch.long)), opt, 1, 16, 0)
    # one batch, one step: warmup and decay share it (no division by zero)
    ex.fine_tune(model, tok, (["good film"] * 16, torch.ones(16, dtype=torch.long)), opt, 1, 16, 0, log=lambda _: None)


def test_the_whole_command_runs_resumes_and_reloads(tiny_model_dir, tmp_path, capsys):
    archive = _archive(tmp_path, _sentences(200))
    out = tmp_path / "out"
    argv = ["--data", str(archive), "--model-dir", str(tiny_model_dir), "--out", str(out), "--fractions", "0.4",
            "0.3", "--lambdas", "1", "30", "--epochs", "1", "--lr", "3e-3", "--batch-size", "16",
            "--n-test", "40", "--n-val", "20"]
    assert ex.main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    assert sorted(result["runs"]) == ["dense", "q3r-f0.3-lambda1", "q3r-f0.3-lambda30", "q3r-f0.4-lambda1",
                                      "q3r-f0.4-lambda30"]
    for run in result["runs"].values():  # (0.3, a training fraction, is evaluated too)
        assert [e["fraction"] for e in run["evals"]] == [1.0, 0.6, 0.4, 0.3, 0.2, 0.1]
        kept = [e["target_params"] / e["target_params_dense"] for e in run["evals"]]
        assert kept[0] == 1.0 and all(a > b for a, b in zip(kept, kept[1:]))
    md = (out / "results.md").read_text()
    assert "| dense fine-tune + SVD |" in md and "Q3R fine-tune, target_rank 0.3" in md and "30% kept" in md
    assert "Saved and reloaded" in md and (out / "compressed.safetensors").exists()
    capsys.readouterr()
    assert ex.main(argv) == 0  # again: every run is kept, nothing is trained
    assert capsys.readouterr().out.count("finished before, kept") == 5
    assert ex.main(argv[:argv.index("--epochs")] + ["100"] + argv[argv.index("--epochs"):]) == 0
    printed = capsys.readouterr().out  # a grid grown by one lambda trains only its two new runs
    assert printed.count("finished before, kept") == 5 and printed.count("fine-tuning") == 2

    # the check refuses weights that are not the chosen run's, or that evaluate differently
    # (both candidates of the grid in argv, whichever of them is chosen)
    paths = [out / f"{ex.run_id('q3r', 0.3, lm)}.pt" for lm in (1.0, 30.0)]
    saved = [torch.load(p, weights_only=True) for p in paths]
    for p, state in zip(paths, saved):
        torch.save(dict(state, run="another"), p)
    assert ex.main(argv) == 0
    assert "save / load check is skipped" in capsys.readouterr().out
    assert "check was skipped" in (out / "results.md").read_text()
    for p, state in zip(paths, saved):
        torch.save(dict(state, model={k: torch.zeros_like(v) if "encoder" in k else v
                                      for k, v in state["model"].items()}), p)
    with pytest.raises(SystemExit, match="evaluates to"):
        ex.main(argv)
    capsys.readouterr()

    assert ex.main(argv[:-1] + ["21"]) == 0  # other settings: trained again
    assert "finished before, kept" not in capsys.readouterr().out

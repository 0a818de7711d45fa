"""Turn finished runs into the experiment's table, claim checks, CSV, JSON and plot.

How a table cell picks among the tuning runs (always by validation accuracy, never test):
* ``Q3R (trained at f0)``: one model per row, the lambda with the best validation accuracy
  at its own training fraction f0; the row shows that model at every fraction.
* ``LoRA``: at fraction f, the learning rate with the best validation accuracy among the
  runs of size f (there is no LoRA at 100%: that is the dense model).
* ``dense+SVD`` and ``LoRITa``: at each fraction separately, the weight decay with the best
  validation accuracy there (per-cell choice: if anything this favours the baselines).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .._files import atomic_path, write_text

TARGET_SET_TITLES = {"qkv": "Q, K, V (separate slices)", "qkv+mlp": "Q, K, V + fc1 + fc2"}
CLAIM_DROPS = {0.4: 1.3, 0.2: 4.0}  # the paper's shape: at 40% kept <= 1.3 points lost, at 20% <= 4


def _evals(results, method, target_set, **where):
    """(run result, eval row) pairs of one method on one target set."""
    out = []
    for r in results:
        spec = r["spec"]
        if spec["method"] != method or any(spec.get(k, spec["hparams"].get(k)) != v for k, v in where.items()):
            continue
        out += [(r, e) for e in r["evals"] if e["target_set"] == target_set]
    return out


def _best_by_val(pairs):
    return max(pairs, key=lambda p: p[1]["val_acc"]) if pairs else None


def select_cells(results, cfg) -> dict:
    """{target set: {row label: {fraction: (run, eval)}}}."""
    table = {}
    for s in ("qkv", "qkv+mlp"):
        rows = {}
        fr = cfg["eval_fractions"]
        rows["dense+SVD"] = {f: _best_by_val([p for p in _evals(results, "dense", s) if p[1]["fraction"] == f]) for f in fr}
        for f0 in cfg["q3r_fractions"]:
            own = _best_by_val([p for p in _evals(results, "q3r", s, train_fraction=f0) if p[1]["fraction"] == f0])
            if own is not None:
                run = own[0]["run"]
                rows[f"Q3R (trained at {f0:.0%})"] = {f: next(((r, e) for r, e in _evals(results, "q3r", s) if r["run"] == run and e["fraction"] == f), None) for f in fr}
        rows["LoRA from scratch"] = {f: _best_by_val(_evals(results, "lora", s, train_fraction=f)) for f in fr}
        for depth in sorted({h["depth"] for h in _hparams(results, "lorita")}):
            rows[f"LoRITa N={depth}"] = {f: _best_by_val([p for p in _evals(results, "lorita", s, depth=depth) if p[1]["fraction"] == f]) for f in fr}
        table[s] = {k: v for k, v in rows.items() if any(c is not None for c in v.values())}
    return table


def _hparams(results, method):
    return [r["spec"]["hparams"] for r in results if r["spec"]["method"] == method]


def two_standard_errors(p1: float, p2: float, n: int | None) -> float | None:
    """2 s.e. (accuracy points) of the difference of two accuracies, each measured on n test
    images, treated as independent: conservative for two evaluations of one model."""
    if not n:
        return None
    return 200 * math.sqrt((p1 * (1 - p1) + p2 * (1 - p2)) / n)


def check_claims(cells, n_test: int | None = None) -> list[dict]:
    """The claim, cell by cell: Q3R's drop against its own untruncated model, and whether it
    beats every baseline at the same parameter count; each with 2 s.e. of test-set noise."""
    checks = []
    for s, rows in cells.items():
        for f, limit in CLAIM_DROPS.items():
            row = rows.get(f"Q3R (trained at {f:.0%})")
            if row and row.get(1.0) and row.get(f):
                full, cut = row[1.0][1]["test_acc"], row[f][1]["test_acc"]
                drop = 100 * (full - cut)
                checks.append(dict(target_set=s, fraction=f, claim=f"Q3R loses <= {limit} points at {f:.0%} kept",
                                   value=round(drop, 2), holds=drop <= limit,
                                   two_se=_rounded(two_standard_errors(full, cut, n_test)), margin=limit - drop))
        for label, row in rows.items():
            if not label.startswith("Q3R (trained at "):
                continue
            f = float(label.removeprefix("Q3R (trained at ").removesuffix("%)")) / 100
            if not row.get(f):
                continue
            mine = row[f][1]["test_acc"]
            for other, orow in rows.items():
                if other.startswith("Q3R") or not orow.get(f):
                    continue
                theirs = orow[f][1]["test_acc"]
                checks.append(dict(target_set=s, fraction=f, claim=f"Q3R beats {other} at {f:.0%} kept",
                                   value=round(100 * (mine - theirs), 2), holds=mine > theirs,
                                   two_se=_rounded(two_standard_errors(mine, theirs, n_test)),
                                   margin=100 * (mine - theirs)))
    for c in checks:  # a verdict whose margin is inside the noise is reported as such
        margin = c.pop("margin")
        c["within_noise"] = c["two_se"] is not None and abs(margin) < c["two_se"]
    return checks


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def _verdict(c: dict) -> str:
    word = "yes" if c["holds"] else "**no**"
    return word + (" (within 2 s.e.)" if c.get("within_noise") else "")


def markdown(cells, checks, meta) -> str:
    lines = []
    missing = meta.get("runs_missing")
    if missing:
        lines += [f"**Partial results: {meta['runs_planned'] - len(missing)} of {meta['runs_planned']} planned runs "
                  f"finished.** Missing: {', '.join(missing)}. Each cell is chosen among the finished runs only, "
                  "so the tables and claim checks below are not the experiment's.", ""]
    for s, rows in cells.items():
        if not rows:
            lines += [f"### Targets: {TARGET_SET_TITLES[s]}", "", "(no finished run yet)", ""]
            continue
        fr = sorted({f for row in rows.values() for f in row}, reverse=True)
        lines += [f"### Targets: {TARGET_SET_TITLES[s]}", "",
                  "| method | " + " | ".join(f"{f:.0%} kept" for f in fr) + " |",
                  "|---|" + "---:|" * len(fr)]
        for label, row in rows.items():
            cells_txt = [f"{100 * row[f][1]['test_acc']:.2f}" if row.get(f) else "—" for f in fr]
            lines.append(f"| {label} | " + " | ".join(cells_txt) + " |")
        ref = rows.get("dense+SVD", {})
        lines.append("| whole-model params | " + " | ".join(f"{ref[f][1]['model_params']:,}" if ref.get(f) else "—" for f in fr) + " |")
        lines.append("| target params kept | " + " | ".join(f"{ref[f][1]['target_params']:,}" if ref.get(f) else "—" for f in fr) + " |")
        lines.append("")
    if checks:
        lines += ["### The claim, cell by cell (test accuracy points)", "",
                  "2 s.e.: test-set noise of the difference (two independent binomial accuracies on the "
                  "test images; conservative for a model against its own truncation).", "",
                  "| targets | claim | value | 2 s.e. | holds |", "|---|---|---:|---:|---|"]
        lines += [f"| {c['target_set']} | {c['claim']} | {c['value']:+.2f} | "
                  f"{'—' if c.get('two_se') is None else format(c['two_se'], '.2f')} | {_verdict(c)} |" for c in checks]
        lines.append("")
    lines.append("Device: {device}; torch {torch}; size {size}; commit {commit}.".format(
        **{k: meta.get(k) or "?" for k in ("device", "torch", "size", "commit")}))
    setups = meta.get("trained_with") or []
    if len(setups) > 1:
        lines.append("")
        lines.append(f"**The runs were trained by {len(setups)} different setups** (results.json: `runs[].trained_with`):")
        lines += ["- {n} run(s): commit {commit}, device {device}, torch {torch}".format(
            **{k: s.get(k) or "?" for k in ("n", "commit", "device", "torch")}) for s in setups]
    return "\n".join(lines)


def _setups(results) -> list[dict]:
    """The distinct (commit, device, torch) that trained the runs, with how many runs each."""
    counts = {}
    for r in results:
        w = r.get("trained_with") or {}
        key = tuple(w.get(k) for k in ("commit", "device", "torch"))
        counts[key] = counts.get(key, 0) + 1
    return [dict(commit=c, device=d, torch=t, n=n) for (c, d, t), n in counts.items()]


def plot(cells, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cells), figsize=(6 * len(cells), 4.2), squeeze=False)
    for ax, (s, rows) in zip(axes[0], cells.items()):
        for label, row in rows.items():
            pts = sorted((f, 100 * c[1]["test_acc"]) for f, c in row.items() if c)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log")
        ticks = sorted({f for row in rows.values() for f in row})
        ax.set_xticks(ticks, [f"{f:.0%}" for f in ticks])
        ax.minorticks_off()
        ax.set_xlabel("target parameters kept")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"ViT on Fashion-MNIST: {TARGET_SET_TITLES[s]}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # partial results (a run in progress) may have no curve yet
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # the format by name: the path may be a temporary one
    plt.close(fig)


def write_outputs(out_dir, cfg, results, meta) -> dict:
    out = Path(out_dir)
    meta = dict(meta, trained_with=_setups(results))
    cells = select_cells(results, cfg)
    checks = check_claims(cells, cfg.get("n_test"))
    md = markdown(cells, checks, meta)
    flat = []
    for s, rows in cells.items():
        for label, row in rows.items():
            for f, c in row.items():
                if c:
                    r, e = c
                    flat.append(dict(target_set=s, method=label, fraction=f, test_acc=e["test_acc"], val_acc=e["val_acc"],
                                     model_params=e["model_params"], target_params=e["target_params"],
                                     target_params_dense=e["target_params_dense"], rel_trunc_error=e["rel_trunc_error"],
                                     run=r["run"], hparams=json.dumps(r["spec"]["hparams"], sort_keys=True)))
    with atomic_path(out / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(flat[0]) if flat else ["target_set"])
        writer.writeheader()
        writer.writerows(flat)
    summary = dict(meta=meta, config=cfg, table=flat, claims=checks, runs=results, markdown=md)
    write_text(out / "results.json", json.dumps(summary, indent=1))
    write_text(out / "results.md", md + "\n")
    if flat:
        with atomic_path(out / "results.png") as tmp:
            plot(cells, tmp)
    else:  # a plot of earlier runs (before --fresh) would not match the other files
        (out / "results.png").unlink(missing_ok=True)
    return summary

"""Comparison report of training runs (e.g. sigmoid vs softmax attention): tables, curves and UMAPs.

``python -m training.report RUN_DIR [RUN_DIR ...] --out DIR`` reads from each run directory

- ``metrics.jsonl`` (one JSON object per step: step, loss, grad_norm, lr, tokens_per_s, ...; the trainer's log),
- ``config.yaml`` (optional; its ``attention`` entry, at any depth, names the run, else the directory name does),
- ``eval/metrics.json`` and ``eval/umap.csv`` (optional; written by ``training.evaluate``),

and writes ``DIR/report.json`` (one metric table per run), ``DIR/report.md``, ``DIR/training_curves.png`` (loss and
gradient norm against step, all runs on one figure) and ``DIR/umaps.png`` (the runs' UMAPs side by side).

Per-run summary: ``final_loss`` is the mean loss over the last 10 % of the logged steps (at least 1 step), which is
less noisy than the last step; throughput numbers are medians over the steps after the first (the first carries
compilation/warm-up).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

EVAL_KEYS = ("nmi", "ari", "asw_label", "bio_conservation", "val_loss")
TABLE = (  # (report.json key, markdown column header, format)
    ("nmi", "NMI", ".3f"),
    ("ari", "ARI", ".3f"),
    ("asw_label", "ASW (cell type)", ".3f"),
    ("bio_conservation", "bio-conservation", ".3f"),
    ("asw_batch", "ASW (batch)", ".3f"),
    ("graph_connectivity", "graph connectivity", ".3f"),
    ("ilisi", "iLISI", ".3f"),
    ("batch_correction", "batch correction", ".3f"),
    ("overall", "overall (0.6 bio + 0.4 batch)", ".3f"),
    ("val_loss", "val loss", ".4f"),
    ("final_loss", "final train loss", ".4f"),
    ("max_grad_norm", "max grad norm", ".3g"),
    ("tokens_per_s", "tokens/s", ",.0f"),
    ("cells_per_s", "cells/s", ",.1f"),
    ("steps", "steps", "d"),
)


def read_metrics(path: Path) -> pd.DataFrame:
    """The per-step log as a DataFrame sorted by step (lines without ``step`` and ``loss`` are other events)."""
    if not path.is_file():
        raise FileNotFoundError(f"no training log: {path}")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not a JSON line ({e.msg})") from None
        if isinstance(row, dict) and "step" in row and "loss" in row:
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no step records (JSON lines with 'step' and 'loss')")
    # a resumed run may log a step twice: keep the last record of each step
    return pd.DataFrame(rows).drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)


def _find(tree, key):
    """First value of ``key`` anywhere in a nested dict (depth first), else None."""
    if isinstance(tree, dict):
        if key in tree and not isinstance(tree[key], dict):
            return tree[key]
        for v in tree.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None


def run_name(run_dir: Path) -> str:
    """The run's attention kind from its ``config.yaml``, else the directory name."""
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        kind = _find(yaml.safe_load(cfg.read_text()), "attention")
        if kind is not None:
            return str(kind)
    return run_dir.name


def summarize(run_dir: str | Path) -> dict:
    """Summary of one run: training-log statistics plus the evaluation metrics if present."""
    run_dir = Path(run_dir)
    log = read_metrics(run_dir / "metrics.jsonl")
    tail = log.tail(max(1, math.ceil(0.1 * len(log))))
    steady = log.iloc[1:] if len(log) > 1 else log
    out = {
        "run_dir": str(run_dir),
        "steps": int(log["step"].iloc[-1]),
        "final_loss": float(tail["loss"].mean()),
        "first_loss": float(log["loss"].iloc[0]),
    }
    if "grad_norm" in log:
        out["max_grad_norm"] = float(log["grad_norm"].max())
    for k in ("tokens_per_s", "cells_per_s", "mfu", "mem_gb"):
        if k in log and steady[k].notna().any():  # mfu is null on CPU (no peak FLOP/s to compare with)
            out[k] = float(steady[k].median())
    ev = run_dir / "eval" / "metrics.json"
    if ev.is_file():
        metrics = json.loads(ev.read_text())
        out.update({k: metrics[k] for k in EVAL_KEYS if k in metrics})
        out["eval"] = metrics
    return out


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, dict):  # per-dataset values: show their mean
        v = float(np.mean(list(v.values())))
    return format(int(v) if spec == "d" else v, spec)


def markdown_table(summaries: dict[str, dict]) -> str:
    """Markdown table: one row per metric, one column per run."""
    names = list(summaries)
    keys = [row for row in TABLE if any(row[0] in s for s in summaries.values())]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, header, spec in keys:
        lines.append(f"| {header} | " + " | ".join(_fmt(summaries[n].get(key), spec) for n in names) + " |")
    return "\n".join(lines)


def plot_curves(logs: dict[str, pd.DataFrame], path: Path) -> Path:
    """Loss and gradient norm against step, one line per run (raw, plus a rolling mean when long enough)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.style.context("default"):  # independent of rcParams changed by scanpy in this process
        return _plot_curves(plt, logs, path)


def _plot_curves(plt, logs: dict[str, pd.DataFrame], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (name, log), colour in zip(logs.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        for ax, key in zip(axes, ("loss", "grad_norm")):
            if key not in log:
                continue
            window = max(1, len(log) // 20)
            ax.plot(log["step"], log[key], color=colour, alpha=0.3 if window > 1 else 1.0, lw=0.8,
                    label=None if window > 1 else name)
            if window > 1:
                ax.plot(log["step"], log[key].rolling(window, min_periods=1).mean(), color=colour, lw=1.8,
                        label=f"{name} (mean of {window})")
    axes[0].set(title="training loss (masked genes)", xlabel="step", ylabel="loss")
    axes[1].set(title="global gradient norm", xlabel="step", ylabel="‖g‖₂", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_umaps(umaps: dict[str, pd.DataFrame], path: Path, summaries: dict[str, dict]) -> Path:
    """The runs' UMAPs side by side, with one colour per cell type shared by all panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.style.context("default"):  # independent of rcParams changed by scanpy in this process
        return _plot_umaps(plt, umaps, path, summaries)


def _plot_umaps(plt, umaps: dict[str, pd.DataFrame], path: Path, summaries: dict[str, dict]) -> Path:
    labels = sorted(set().union(*(set(u["label"].astype(str)) for u in umaps.values())))
    cmap = plt.get_cmap("tab20" if len(labels) > 10 else "tab10")
    colours = {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}
    fig, axes = plt.subplots(1, len(umaps), figsize=(4.5 * len(umaps), 4.8), squeeze=False)
    for ax, (name, u) in zip(axes[0], umaps.items()):
        lab = u["label"].astype(str)
        ax.scatter(u["umap1"], u["umap2"], c=[colours[x] for x in lab], s=4, linewidths=0, rasterized=True)
        bio = summaries[name].get("bio_conservation")
        ax.set_title(name + (f"\nbio-conservation {bio:.3f}" if bio is not None else ""))
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [plt.Line2D([], [], ls="", marker="o", color=colours[lab], label=lab) for lab in labels]
    fig.tight_layout()
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(run_dirs: list[str | Path], out: str | Path, *, title: str = "Training report",
                 notes: str = "", extra: dict | None = None, baselines: dict[str, str | Path] | None = None) -> dict:
    """Summarise ``run_dirs`` into ``out``/report.{json,md} + PNGs; returns the report dict.

    ``notes`` (markdown) goes under the title; ``extra`` entries are added to report.json.
    ``baselines`` maps a name to an evaluation directory (``metrics.json``, ``umap.csv``) of an embedding that
    was not trained (e.g. PCA): it gets a column in the table and a UMAP panel, under ``report["baselines"]``.
    """
    if not run_dirs:
        raise ValueError("no run directories given")
    out = Path(out)
    summaries, logs, umaps, base = {}, {}, {}, {}
    for d in map(Path, run_dirs):
        name = run_name(d)
        if name in summaries:
            name = f"{name} ({d.name})"
        summaries[name] = summarize(d)
        logs[name] = read_metrics(d / "metrics.jsonl")
        if (d / "eval" / "umap.csv").is_file():
            umaps[name] = pd.read_csv(d / "eval" / "umap.csv", index_col=0)
    for name, ev in (baselines or {}).items():
        ev = Path(ev)
        if not (ev / "metrics.json").is_file():
            raise FileNotFoundError(f"baseline {name!r}: no metrics.json in {ev}")
        metrics = json.loads((ev / "metrics.json").read_text())
        base[name] = {**{k: metrics[k] for k in EVAL_KEYS if k in metrics}, "eval": metrics}
        if (ev / "umap.csv").is_file():
            umaps[name] = pd.read_csv(ev / "umap.csv", index_col=0)
    out.mkdir(parents=True, exist_ok=True)
    plots = {"training_curves": plot_curves(logs, out / "training_curves.png").name}
    if umaps:
        plots["umaps"] = plot_umaps(umaps, out / "umaps.png", {**summaries, **base}).name
    report = {"title": title, "runs": summaries, "baselines": base, "plots": plots, **(extra or {})}
    md = [f"# {title}", ""]
    if notes:
        md += [notes, ""]
    md += [markdown_table({**summaries, **{f"{n} (baseline)": b for n, b in base.items()}}), "",
           "NMI/ARI: Leiden clustering of the k-NN graph of the embeddings at the NMI-optimal resolution (0.1–2.0); "
           "ASW: cell-type silhouette rescaled to (asw+1)/2; bio-conservation: their mean (scIB). "
           "Final train loss: mean over the last 10 % of steps; throughput: median per step.", "",
           f"![training curves]({plots['training_curves']})", ""]
    if "umaps" in plots:
        md += [f"![UMAPs]({plots['umaps']})", ""]
    for name, path in (("report.json", out / "report.json"), ("report.md", out / "report.md")):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n" if name.endswith("json") else "\n".join(md))
        tmp.replace(path)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.report", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl, optionally eval/)")
    p.add_argument("--out", required=True, help="output directory for report.md, report.json and PNGs")
    p.add_argument("--title", default="Training report")
    a = p.parse_args(argv)
    try:
        report = write_report(a.runs, a.out, title=a.title)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(report["runs"]))
    print(f"wrote {Path(a.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

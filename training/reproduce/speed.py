"""Speed recipe: sigmoid vs softmax training throughput per context, and the paper's GPU-hour table.

Throughput: ``launch.measure.measure`` — the logic of ``benchmarks/training_gpu.py``: real ``Trainer`` steps
(DeepSpeed, the preset's ZeRO stage and precision) on synthetic cells that fill the context, each attempt in a
fresh process; median tokens/s over the timed steps after the warm-up. The micro-batch holds the same tokens
at every context (``tokens_per_batch / context`` cells; ``None``: the preset's own tokens per micro-batch).

Projection: ``launch.project.project`` for the paper's table (160m, 400m, 600m, 1.4b × 2K, 4K, 8K, both
attentions; 131.6M cells, one epoch, 16 GPUs). Analytic at ``mfu`` (identical for both attentions, which do
the same FLOPs), replaced by measured cells/s per GPU where a measured projection (``rates``, e.g. the
committed ``launch/results/measured-h100/projection.json``) or this run (a paper size on a GPU) has the row.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from training.reproduce.output import provenance, read_json, write_json, write_text

KINDS = ("sigmoid", "softmax")
PAPER_SIZES = ("160m", "400m", "600m", "1.4b")
PAPER_CONTEXTS = (2048, 4096, 8192)
PAPER = {"claim": "sigmoid attention trains up to 10 % faster", "max_speedup_pct": 10.0}


@dataclass(frozen=True)
class Scale:
    preset: str
    contexts: tuple[int, ...]
    warmup_steps: int
    timed_steps: int
    tokens_per_batch: int | None = None


SCALES = {
    "demo": Scale("tiny", contexts=(64, 128, 256), warmup_steps=2, timed_steps=6, tokens_per_batch=2048),
    # One H100: 6 measurements × (start-up ~40 s + 60 steps) ≈ 8 min.
    "gpu": Scale("160m", contexts=PAPER_CONTEXTS, warmup_steps=10, timed_steps=50),
}


def measure_all(scale: Scale, progress: bool) -> list[dict]:
    from tqdm.auto import tqdm

    from launch.measure import measure

    rows = []
    runs = [(c, a) for c in scale.contexts for a in KINDS]
    for ctx, att in tqdm(runs, desc="speed", unit="run", disable=not progress):
        t0 = time.perf_counter()
        bs = max(1, scale.tokens_per_batch // ctx) if scale.tokens_per_batch else None
        try:
            m = measure(scale.preset, ctx, att, warmup_steps=scale.warmup_steps, timed_steps=scale.timed_steps,
                        batch_size=bs)
            rows.append(dataclasses.asdict(m) | {"seconds": round(time.perf_counter() - t0, 1)})
        except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
            rows.append({"size": scale.preset, "context": ctx, "attention": att, "error": f"{type(e).__name__}: {e}"})
    for r in rows:
        other = next((x for x in rows if x["context"] == r["context"] and x["attention"] == "softmax"
                      and "error" not in x), None)
        r["sigmoid_over_softmax"] = (r["tokens_per_s"] / other["tokens_per_s"]
                                     if r["attention"] == "sigmoid" and other and "error" not in r else None)
    return rows


def projection(measured: list[dict], rates: Path | None, mfu: float, on_gpu: bool) -> list[dict]:
    """The paper's 4 sizes × 3 contexts × 2 attentions; measured cells/s per GPU where known."""
    from launch.project import project

    cells, gpus = 131.6e6, 16
    rows = project(list(PAPER_SIZES), list(PAPER_CONTEXTS), cells=cells, gpus=gpus, mfu=mfu)
    known = {}
    if rates is not None and Path(rates).is_file():
        known = {(r["size"], r["context"], r["attention"]): (r["cells_per_s_per_gpu"], f"measured ({Path(rates)})")
                 for r in read_json(rates)["rows"] if r.get("cells_per_s_per_gpu")}
    if on_gpu:
        known |= {(r["size"], r["context"], r["attention"]): (r["cells_per_s"], "measured (this run)")
                  for r in measured if "error" not in r}
    for r in rows:
        k = known.get((r["size"], r["context"], r["attention"]))
        if k:
            r.update(cells_per_s_per_gpu=k[0], throughput=k[1], gpu_hours=cells / k[0] / 3600,
                     wall_hours=cells / k[0] / 3600 / gpus)
    for r in rows:
        soft = next(x for x in rows if (x["size"], x["context"], x["attention"]) == (r["size"], r["context"], "softmax"))
        r["sigmoid_saving_pct"] = (100 * (1 - r["gpu_hours"] / soft["gpu_hours"]) if r["attention"] == "sigmoid"
                                   else None)
    return rows


def plot(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ok = [r for r in rows if "error" not in r]
    ctxs = sorted({r["context"] for r in ok})
    x = np.arange(len(ctxs))
    with plt.style.context("default"):
        fig, ax = plt.subplots(figsize=(1.8 * len(ctxs) + 2.5, 3.8))
        for i, (att, c) in enumerate((("sigmoid", "tab:blue"), ("softmax", "tab:red"))):
            by = {r["context"]: r for r in ok if r["attention"] == att}
            bars = ax.bar(x + (i - 0.5) * 0.38, [by[k]["tokens_per_s"] if k in by else 0 for k in ctxs], 0.38,
                          color=c, label=att)
            if att == "sigmoid":
                for b, k in zip(bars, ctxs):
                    if k in by and by[k]["sigmoid_over_softmax"]:
                        ax.annotate(f"×{by[k]['sigmoid_over_softmax']:.3f}", (b.get_x() + b.get_width() / 2,
                                    b.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, [str(c) for c in ctxs])
        ax.set(xlabel="context (tokens per cell)", ylabel="training tokens/s", title=title)
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return path


def markdown(s: dict) -> str:
    lines = [f"# Speed recipe ({s['scale_name']} scale)", "",
             f"`{s['settings']['preset']}` preset, synthetic cells filling the context, "
             f"{s['settings']['warmup_steps']} warm-up + {s['settings']['timed_steps']} timed steps per run "
             f"(medians). Device: {s['provenance']['device']}; commit `{s['provenance']['commit']}`; "
             f"{s['provenance']['date']}.", "",
             "| context | attention | micro-batch | tokens/s | cells/s | MFU | sigmoid / softmax |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in s["throughput"]:
        if "error" in r:
            lines.append(f"| {r['context']} | {r['attention']} | – | error: {r['error'][:80]} | | | |")
            continue
        lines.append(f"| {r['context']} | {r['attention']} | {r['batch_size']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['cells_per_s']:,.1f} | {'–' if r.get('mfu') is None else format(r['mfu'], '.3f')} | "
                     f"{'' if r['sigmoid_over_softmax'] is None else format(r['sigmoid_over_softmax'], '.3f')} |")
    lines += ["", s["verdict"], "", f"![throughput]({s['plots'][0]})", "",
              "## Projected GPU-hours (the paper's table: 131.6M cells, 1 epoch, 16 GPUs)", "",
              "| size | context | sigmoid GPU-h | softmax GPU-h | sigmoid saving | throughput source |",
              "|---|---:|---:|---:|---:|---|"]
    proj = s["projection"]
    for r in (r for r in proj if r["attention"] == "sigmoid"):
        soft = next(x for x in proj if (x["size"], x["context"], x["attention"]) == (r["size"], r["context"], "softmax"))
        src = r["throughput"] if r["throughput"] == soft["throughput"] else f"{r['throughput']} / {soft['throughput']}"
        lines.append(f"| {r['size']} | {r['context']} | {r['gpu_hours']:,.0f} | {soft['gpu_hours']:,.0f} | "
                     f"{r['sigmoid_saving_pct']:+.1f} % | {src} |")
    lines += ["", f"![projection]({s['plots'][1]})", "", f"Paper: {PAPER['claim']}. " + s["caveat"], ""]
    return "\n".join(lines)


def run(scale_name: str, out: Path, *, scale: Scale, rates: Path | None = None, mfu: float = 0.4,
        progress: bool = True) -> dict:
    import torch

    from launch.project import write_outputs

    out.mkdir(parents=True, exist_ok=True)
    rows = measure_all(scale, progress)
    on_gpu = torch.cuda.is_available()
    proj = projection(rows, rates, mfu, on_gpu)
    ratios = [r for r in rows if r.get("sigmoid_over_softmax")]
    verdict = ("sigmoid / softmax tokens/s: " + ", ".join(f"{r['context']}: {r['sigmoid_over_softmax']:.3f}"
                                                         for r in ratios) + ".") if ratios else "no ratio measured."
    caveat = ("Demo scale on a CPU (tiny shapes, C++ CPU kernels vs PyTorch SDPA, a shared and loaded machine) says "
              "nothing about H100 speed: the GPU table comes from the committed H100 measurements."
              if not on_gpu else "One GPU, synthetic cells; the projection assumes linear scaling to 16 GPUs.")
    plot(rows, out / "speed.png", f"{scale.preset}: training throughput")
    meta = {"cells": 131.6e6, "epochs": 1.0, "gpus": 16, "gpu_mem_gib": 80.0,
            "throughput": f"measured where available, else MFU {mfu:g}", "note": "the paper's table"}
    write_outputs(proj, out / "projection", meta)
    summary = {"recipe": "speed", "scale_name": scale_name, "settings": dataclasses.asdict(scale),
               "provenance": provenance(), "throughput": rows, "projection": proj, "verdict": verdict,
               "paper": PAPER, "caveat": caveat, "plots": ["speed.png", "projection/projection.png"]}
    write_json(out / "summary.json", summary)
    write_text(out / "report.md", markdown(summary))
    return summary

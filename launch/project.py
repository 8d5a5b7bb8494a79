"""``python -m launch.project``: GPU-hours to train each model size × context × attention on a corpus.

Per cell of ``s`` tokens (the context: every cell is assumed to fill it) a bidirectional encoder costs
``F_cell = (6·(N − N_head) + 6·N_head·r + 12·L·d·s)·s`` training FLOPs (N non-embedding parameters from a
meta-device build of the preset, N_head of them in the masked-expression head, which runs on the masked
fraction r of the tokens; L layers, width d; see ``launch.model_size``). Throughput per GPU is either

* analytic (``--mfu``): ``cells/s = mfu · peak / F_cell`` (same for sigmoid and softmax, which do the
  same FLOPs), or
* measured (``--measure``): median cells/s of real training steps on the local GPU (``launch.measure``).

``GPU-hours = cells · epochs / (cells/s per GPU) / 3600``; wall-clock hours divide by ``--gpus``.
Each row also carries the memory check of ``launch.memory`` (model states under the preset's ZeRO
stage over ``--gpus`` GPUs, activations with/without checkpointing, the micro-batch that fits) and
``launch.memory.plan``'s choice of ZeRO stage, checkpointing and micro-batch (``plan_*``); ``--settings plan``
measures and checks with that choice instead of the preset's.
``--context-parallel P`` splits every cell over P GPUs (``training.parallel``): activations per GPU ÷ P,
and each row gives the all-to-all bytes each GPU sends per cell (``cp_comm_gib_per_cell``); the FLOPs do not
change, but where P does not divide the heads the ranks with ⌈H/P⌉ heads set the attention's pace
(``cp_head_balance`` = H/(P·⌈H/P⌉), e.g. 0.75 for 12 heads on 8 GPUs), so the analytic throughput counts the
attention FLOPs ``12·L·d·s²`` as taking 1/balance as long.
Writes ``projection.{md,csv,json,png}`` to ``--out``; the plot compares sigmoid and softmax GPU-hours
per size, one panel per context (like Figure 3 of the sigmoid-attention paper).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from rich.progress import Progress

from launch.memory import checkpointing_value, cp_comm_bytes, feasibility, plan
from launch.model_size import flops_per_cell, model_size
from training.parallel.ulysses_pipelined import head_balance

ATTENTIONS = ("sigmoid", "softmax")
H100_BF16_PEAK = 989e12


def _plan(m, context: int, gpus: int, gpu_mem_gib: float, context_parallel: int):
    try:
        return plan(m, context, gpus, gpu_mem_gib, context_parallel=context_parallel)
    except ValueError:
        return None


def effective_flops(m, context: int, context_parallel: int = 1) -> float:
    """A cell's training FLOPs as the GPUs spend time on them: the attention term ``12·L·d·s²`` over the head
    balance of the context-parallel split (:func:`training.parallel.ulysses_pipelined.head_balance`)."""
    attention = 12 * m.n_layers * m.d_model * context * context
    return flops_per_cell(m, context) + attention * (1 / head_balance(m.n_heads, context_parallel) - 1)


def _row(m, context: int, attention: str, cells: float, epochs: float, gpus: int, gpu_mem_gib: float,
         cells_per_s: float, source: str, pl, measured=None, context_parallel: int = 1,
         settings: str = "preset") -> dict:
    """One projection row; ``pl``: ``launch.memory.plan``'s choice for this size × context (None: nothing fits)."""
    stage = pl.zero_stage if settings == "plan" and pl else m.zero_stage
    f = feasibility(m, context, stage, gpus, gpu_mem_gib, context_parallel=context_parallel)
    gpu_hours = cells * epochs / cells_per_s / 3600 if cells_per_s else None
    row = {"size": m.name, "context": context, "attention": attention, "n_params": m.n_params,
           "n_params_nonemb": m.n_params_nonemb, "flops_per_cell": flops_per_cell(m, context),
           "throughput": source, "cells_per_s_per_gpu": cells_per_s, "gpu_hours": gpu_hours,
           "wall_hours": gpu_hours / gpus if gpu_hours else None, "settings": settings, "zero_stage": stage,
           "model_state_gib": f.model_state_gib, "act_gib_per_cell": f.act_gib_per_cell,
           "act_gib_per_cell_ckpt": f.act_gib_per_cell_ckpt, "max_cells": f.max_cells,
           "max_cells_ckpt": f.max_cells_ckpt, "memory": f.verdict, "context_parallel_degree": context_parallel,
           "cp_comm_gib_per_cell": -(-context // context_parallel) * cp_comm_bytes(m, context_parallel) / 2**30,
           "cp_head_balance": head_balance(m.n_heads, context_parallel),
           "plan_zero_stage": pl.zero_stage if pl else None,
           "plan_checkpointing": pl.activation_checkpointing if pl else None,
           "plan_micro_batch": pl.micro_batch if pl else None,
           "plan_relative_speed": pl.relative_speed if pl else None}
    if measured is not None:
        row.update(measured_batch=measured.batch_size, measured_mem_gb=measured.mem_gb,
                   measured_tokens_per_cell=measured.tokens_per_cell, measured_steps=measured.steps)
    return row


def project(sizes, contexts, *, cells: float, gpus: int, epochs: float = 1.0, mfu: float | None = 0.4,
            peak_flops: float = H100_BF16_PEAK, measure_steps: tuple[int, int] | None = None,
            gpu_mem_gib: float = 80.0, attentions=ATTENTIONS, batch_size: int | None = None,
            context_parallel: int = 1, settings: str = "preset", on_row=None) -> list[dict]:
    """One row per size × context × attention (analytic when ``measure_steps`` is None). ``settings="plan"``
    measures with (and checks the memory of) ``launch.memory.plan``'s ZeRO stage, checkpointing and micro-batch
    for ``gpus`` GPUs of ``gpu_mem_gib`` instead of the preset's; every row carries the plan either way.
    ``on_row(row)`` is called as each row is made (``--measure`` appends it to ``rows.jsonl`` at once, so a run
    killed part-way keeps what it measured)."""
    if settings not in ("preset", "plan"):
        raise ValueError(f"settings must be 'preset' or 'plan', got {settings!r}")
    models = {s: model_size(s) for s in sizes}
    rows = []
    with Progress(transient=True) as progress:
        task = progress.add_task("projection", total=len(sizes) * len(contexts) * len(attentions))
        for s in sizes:
            for ctx in contexts:
                m = models[s]
                pl = _plan(m, ctx, gpus, gpu_mem_gib, context_parallel)
                for att in attentions:
                    progress.update(task, description=f"{s} ctx {ctx} {att}")
                    if measure_steps is None:
                        rate = mfu * peak_flops / effective_flops(m, ctx, context_parallel)
                        rows.append(_row(m, ctx, att, cells, epochs, gpus, gpu_mem_gib, rate, f"mfu={mfu:g}", pl,
                                         context_parallel=context_parallel, settings=settings))
                    else:
                        from launch.measure import DoesNotFit, measure

                        bs, extra = batch_size, []
                        if settings == "plan" and pl is not None:
                            bs = batch_size or pl.micro_batch
                            ckpt = checkpointing_value(pl.activation_checkpointing)
                            extra = [f"run.zero_stage={pl.zero_stage}", f"model.activation_checkpointing={ckpt}"]
                        try:
                            meas = measure(s, ctx, att, warmup_steps=measure_steps[0],
                                           timed_steps=measure_steps[1], batch_size=bs, extra_overrides=extra)
                        except DoesNotFit as e:  # a row, not the end of the projection
                            progress.console.print(f"[yellow]{e}")
                            row = _row(m, ctx, att, cells, epochs, gpus, gpu_mem_gib, None, "measured", pl,
                                       settings=settings)
                            rows.append(row | {"memory": "out of memory at micro-batch 1 (measured)"})
                        else:
                            rows.append(_row(m, ctx, att, cells, epochs, gpus, gpu_mem_gib, meas.cells_per_s,
                                             "measured", pl, meas, settings=settings))
                    if on_row is not None:
                        on_row(rows[-1])
                    progress.advance(task)
    _savings(rows)
    return rows


def _savings(rows: list[dict]) -> None:
    """Sigmoid's GPU-hour saving relative to softmax (on the sigmoid row, when both were run)."""
    for r in rows:
        soft = [x for x in rows if (x["size"], x["context"], x["attention"]) == (r["size"], r["context"], "softmax")]
        r["sigmoid_saving_pct"] = (100 * (1 - r["gpu_hours"] / soft[0]["gpu_hours"])
                                   if r["attention"] == "sigmoid" and soft and r["gpu_hours"] and soft[0]["gpu_hours"]
                                   else None)


def apply_scaling(rows: list[dict], measured: list[dict], gpus: int) -> list[dict]:
    """Scale each row's one-GPU rate by the data-parallel efficiency measured for its (size, context, attention):
    e = per-GPU tokens/s at W GPUs ÷ tokens/s at 1 GPU, from the largest W ≤ ``gpus`` in ``measured`` (rows of
    ``benchmarks/training_gpu.py --world-sizes``); where a file holds several rows of one world size (calls merged
    over sessions), the newest by ``date`` counts. Rows without such a measurement keep their rate (e = 1, said
    so in ``dp_efficiency_source``). Measured within one node: across nodes the efficiency may be lower."""
    ok = [m for m in measured if "error" not in m]
    for r in rows:
        same = [m for m in ok if (m["size"], m["context"], m["attention"]) == (r["size"], r["context"], r["attention"])]
        one = [m for m in same if m.get("world_size", 1) == 1]
        many = [m for m in same if 1 < m.get("world_size", 1) <= gpus]
        if gpus == 1 or not one or not many or not r.get("cells_per_s_per_gpu"):
            r.update(dp_efficiency=1.0, dp_efficiency_source="assumed (no data-parallel measurement)")
            continue
        top = max(many, key=lambda m: (m["world_size"], m.get("date") or ""))
        base = max(one, key=lambda m: m.get("date") or "")
        per_gpu = top.get("tokens_per_s_per_gpu") or top["tokens_per_s"] / top["world_size"]
        e = per_gpu / base["tokens_per_s"]
        r.update(dp_efficiency=e, dp_efficiency_source=f"measured at {top['world_size']} GPUs",
                 cells_per_s_per_gpu=r["cells_per_s_per_gpu"] * e, gpu_hours=r["gpu_hours"] / e,
                 wall_hours=r["wall_hours"] / e)
    _savings(rows)
    return rows


def _markdown(rows: list[dict], header: str) -> str:
    cols = ["size", "context", "attention", "n_params", "cells_per_s_per_gpu", "gpu_hours", "wall_hours",
            "sigmoid_saving_pct", "dp_efficiency", "zero_stage", "model_state_gib", "max_cells", "max_cells_ckpt", "memory",
            "plan_zero_stage", "plan_checkpointing", "plan_micro_batch"]
    if any(r.get("context_parallel_degree", 1) > 1 for r in rows):
        cols += ["context_parallel_degree", "cp_comm_gib_per_cell", "cp_head_balance"]
    if any("measured_batch" in r for r in rows):
        cols += ["measured_batch", "measured_mem_gb"]

    def fmt(v):
        if v is None:
            return ""
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"
        return f"{v:,}" if isinstance(v, int) else str(v)
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    contexts = sorted({r["context"] for r in rows})
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    fig, axes = plt.subplots(1, len(contexts), figsize=(4.2 * len(contexts), 4), squeeze=False, sharey=True)
    x = np.arange(len(sizes))
    for ax, ctx in zip(axes[0], contexts):
        for i, (att, color) in enumerate((("softmax", "tab:gray"), ("sigmoid", "tab:blue"))):
            sel = {r["size"]: r for r in rows if r["context"] == ctx and r["attention"] == att and r["gpu_hours"]}
            if not sel:
                continue
            bars = ax.bar(x + (i - 0.5) * 0.38, [sel[s]["gpu_hours"] if s in sel else 0 for s in sizes], 0.38,
                          label=att, color=color)
            for b, s in zip(bars, sizes):
                if s not in sel:
                    continue
                pct = sel[s]["sigmoid_saving_pct"]
                if pct is not None:
                    ax.annotate(f"{pct:+.1f}%", (b.get_x() + b.get_width() / 2, b.get_height()),
                                ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, sizes)
        ax.set_yscale("log")
        ax.set_title(f"context {ctx}")
        ax.set_xlabel("model size")
    axes[0][0].set_ylabel("GPU-hours")
    axes[0][0].legend()
    fig.suptitle(title + "   (% = sigmoid saving vs softmax)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_outputs(rows: list[dict], out: Path, meta: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    title = (f"{meta['cells']:.4g} cells × {meta['epochs']:g} epoch(s) on {meta['gpus']} GPUs; "
             f"throughput {meta['throughput']}")
    paths = [out / f"projection.{ext}" for ext in ("md", "csv", "json", "png")]
    paths[0].write_text(_markdown(rows, f"# GPU-hour projection\n\n{title}\n\n{meta['note']}"))
    with open(paths[1], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    paths[2].write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    _plot(rows, paths[3], title)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.project", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["160m", "400m", "600m", "1.4b"], help="training presets")
    p.add_argument("--context", nargs="+", type=int, default=[2048, 4096, 8192])
    p.add_argument("--cells", type=float, default=131.6e6, help="cells per epoch")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--gpus", type=int, default=16)
    p.add_argument("--gpu-mem-gib", type=float, default=80.0)
    p.add_argument("--context-parallel", type=int, default=1, metavar="P",
                   help="GPUs sharing each cell's sequence (activations / P; must divide --gpus)")
    p.add_argument("--attention", nargs="+", choices=ATTENTIONS, default=list(ATTENTIONS))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation for the analytic path (0.4)")
    g.add_argument("--measure", action="store_true", help="time real training steps on the local device")
    p.add_argument("--peak-flops", type=float, default=H100_BF16_PEAK, help="per-GPU peak for --mfu (H100 bf16)")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--timed-steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=None,
                   help="--measure micro-batch (cells); default keeps the preset's tokens per micro-batch")
    p.add_argument("--settings", choices=("preset", "plan"), default="preset",
                   help="memory settings measured and checked: the preset's ZeRO stage / checkpointing / "
                        "micro-batch, or launch.memory.plan's choice for --gpus GPUs of --gpu-mem-gib")
    p.add_argument("--scaling", type=Path, default=None,
                   help="a benchmarks/training_gpu.py JSON with --world-sizes rows: scale each rate by the measured "
                        "data-parallel efficiency")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    if a.scaling is not None and not a.scaling.is_file():
        p.error(f"--scaling {a.scaling}: no such file")
    mfu = a.mfu if a.mfu is not None else 0.4
    if not a.measure and not 0 < mfu <= 1:
        p.error(f"--mfu must lie in (0, 1], got {mfu}")
    if a.cells <= 0 or a.epochs <= 0 or a.gpus < 1:
        p.error("--cells, --epochs must be > 0 and --gpus >= 1")
    if any(c < 2 for c in a.context):
        p.error("--context values must be >= 2")
    if a.context_parallel < 1 or a.gpus % a.context_parallel:
        p.error(f"--context-parallel {a.context_parallel} must be >= 1 and divide --gpus {a.gpus}")
    if a.measure and a.context_parallel > 1:
        p.error("--measure times one GPU; use benchmarks/context_parallel.py for context parallelism")
    from launch.configs import ConfigError, resolve_config
    try:
        for s in a.sizes:
            resolve_config(s)
    except ConfigError as e:
        p.error(str(e))
    t0 = time.time()
    on_row = None
    if a.measure:  # each measured row on disk as soon as it exists (minutes apiece on a lent GPU)
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "rows.jsonl").write_text("")

        def on_row(row):
            with open(a.out / "rows.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
    rows = project(a.sizes, a.context, cells=a.cells, gpus=a.gpus, epochs=a.epochs, mfu=mfu,
                   peak_flops=a.peak_flops, gpu_mem_gib=a.gpu_mem_gib,
                   measure_steps=(a.warmup_steps, a.timed_steps) if a.measure else None, attentions=a.attention,
                   batch_size=a.batch_size, context_parallel=a.context_parallel, settings=a.settings,
                   on_row=on_row)
    if a.scaling is not None:
        try:
            apply_scaling(rows, json.loads(a.scaling.read_text())["rows"], a.gpus)
        except (ValueError, KeyError) as e:
            p.error(f"--scaling {a.scaling}: not a training benchmark JSON ({type(e).__name__}: {e})")
    device = "cpu"
    if a.measure:
        import torch
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    meta = {"cells": a.cells, "epochs": a.epochs, "gpus": a.gpus, "gpu_mem_gib": a.gpu_mem_gib, "settings": a.settings,
            "context_parallel_degree": a.context_parallel,
            "throughput": f"measured on {device}" if a.measure else f"MFU {mfu:g} of {a.peak_flops:.3g} FLOP/s",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.time() - t0, 1),
            "argv": sys.argv[1:] if argv is None else argv,
            "note": "F_cell = (6·(N − N_head) + 6·N_head·r + 12·L·d·s)·s with s = context, r the masked fraction "
                    "(head on masked tokens only); memory: bf16 AdamW states under the "
                    f"{'planned' if a.settings == 'plan' else 'preset'} ZeRO stage over the GPUs, activations 32·d "
                    "B/token/layer (2·d with checkpointing); plan_*: launch.memory.plan's choice."}
    for path in write_outputs(rows, a.out, meta):
        print(path)
    print(_markdown(rows, ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

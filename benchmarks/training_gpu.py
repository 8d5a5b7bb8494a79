"""Trainer throughput on the local GPU: sigmoid vs softmax per preset × context, a few hundred real steps each.

Each run is ``launch.measure.measure`` (the real ``training.trainer.Trainer``: DeepSpeed engine with the
preset's ZeRO stage, bf16, activation checkpointing where the preset sets it) on synthetic cells whose
expressed-gene count fills the context. Reported per run: median tokens/s, cells/s and MFU over the timed
steps (warm-up excluded), peak GPU memory (``torch.cuda.max_memory_allocated``), first/last loss.
``--world-sizes 1 2 4`` repeats every run data parallel over that many local GPUs: each row carries
``world_size``, ``tokens_per_s`` (global) and ``tokens_per_s_per_gpu``; the table adds the per-GPU scaling
against the same run on one GPU. ``--mds CORPUS`` measures the data path instead (issue: real shards must keep
≥ 0.97× the synthetic tokens/s): each run reads the corpus's MDS shards through the real loader (``data=mds``), then
runs on synthetic cells of the same mean length, micro-batch and vocabulary (``data=synthetic_matched``,
``benchmarks.real_feed``); the micro-batch keeps the preset's tokens per micro-batch at the corpus's mean cell
length. The table adds real / synthetic tokens/s. The JSON carries ``commit`` ($SIGATTN_COMMIT where set, else ``git rev-parse``).
MFU = (6·(N_nonemb − N_head) + 6·N_head·r + 12·L·d·s)·tokens/s / bf16 peak (``training.metrics``; the head
runs on the masked fraction r of the tokens). Writes JSON (device, versions, date,
rows) and a markdown table; prints the sigmoid/softmax ratio per preset × context.

    python benchmarks/training_gpu.py --runs 160m:2048 160m:8192 1.4b:8192 --steps 200 \
        --out benchmarks/results/training_h100.json
    NCCL_NVLS_ENABLE=0 python benchmarks/training_gpu.py --runs 160m:8192 --world-sizes 1 2 4 --out dp.json
    python benchmarks/training_gpu.py --runs 160m:2048 --mds runs/demo/corpus --out real_feed.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _table(rows: list[dict]) -> str:
    real = any(r.get("data", "synthetic") != "synthetic" for r in rows)
    lines = ["| preset | context | attention | " + ("data | " if real else "") + "GPUs | micro-batch | tokens/s | "
             "tokens/s per GPU | per GPU vs 1 GPU | cells/s | MFU | peak mem GiB | loss first → last | "
             "sigmoid / softmax tokens/s |" + (" real / synthetic tokens/s |" if real else ""),
             "|---|---|---|" + ("---|" if real else "") + "---|---|---|---|---|---|---|---|---|---|" + ("---|" if real else "")]

    def key(r, att=None, data=None, w=None):
        return (r["size"], r["context"], att or r["attention"], data or r.get("data", "synthetic"),
                w or r.get("world_size", 1))

    by = {key(r): r for r in rows if "error" not in r}
    for r in rows:
        w = r.get("world_size", 1)
        data = f"{r.get('data', 'synthetic')} | " if real else ""
        if "error" in r:
            lines.append(f"| {r['size']} | {r['context']} | {r['attention']} | {data}{w} | – | error: {r['error'][:80]} "
                         "|||||||" + ("|" if real else ""))
            continue
        other = by.get(key(r, "softmax"))
        ratio = f"{r['tokens_per_s'] / other['tokens_per_s']:.3f}" if r["attention"] == "sigmoid" and other else ""
        one = by.get(key(r, w=1))
        per_gpu = r.get("tokens_per_s_per_gpu") or r["tokens_per_s"] / w
        scale = f"{per_gpu / one['tokens_per_s']:.3f}" if one and w > 1 else ""
        mfu = f"{r['mfu']:.3f}" if r.get("mfu") is not None else "–"
        lines.append(f"| {r['size']} | {r['context']} | {r['attention']} | {data}{w} | {r['batch_size']} | "
                     f"{r['tokens_per_s']:,.0f} | {per_gpu:,.0f} | {scale} | {r['cells_per_s']:.1f} | {mfu} | "
                     f"{r['mem_gb']:.1f} | {r['loss_first']:.3f} → {r['loss_last']:.3f} | {ratio} |"
                     + (f" {_real_ratio(r, by.get(key(r, data='synthetic_matched')))} |" if real else ""))
    return "\n".join(lines)


def _real_ratio(r: dict, synthetic: dict | None) -> str:
    return f"{r['tokens_per_s'] / synthetic['tokens_per_s']:.3f}" if r.get("data") == "mds" and synthetic else ""


def _measure_real(measure, size: str, ctx: int, att: str, w: int, a, stats: dict) -> list[dict]:
    """The ``--mds`` pair of one run: real shards, then synthetic cells of the measured mean length (``stats``: the
    corpus's ``benchmarks.real_feed.corpus_stats``)."""
    from benchmarks.real_feed import matched_mean_genes
    from launch.model_size import model_size

    m = model_size(size)
    bs = a.batch_size or max(1, round(m.batch_size * m.context / (min(stats["genes_per_cell"], ctx - 1) + 1)))
    common = dict(warmup_steps=a.warmup_steps, timed_steps=a.steps, world_size=w)
    rows = []
    t0 = time.time()
    real = measure(size, ctx, att, batch_size=bs, extra_overrides=[*a.override, f"data.mds={a.mds}"], **common)
    rows.append(dataclasses.asdict(real) | {"data": "mds", "corpus": str(a.mds), "corpus_cells": stats["cells"],
                                            "seconds": round(time.time() - t0, 1)})
    t0 = time.time()
    genes = matched_mean_genes(real.tokens_per_cell, stats["vocab_size"], ctx)
    syn = measure(size, ctx, att, batch_size=real.batch_size, **common, extra_overrides=[
        *a.override, f"data.synthetic_vocab={stats['vocab_size']}", f"data.synthetic_mean_genes={genes}"])
    rows.append(dataclasses.asdict(syn) | {"data": "synthetic_matched", "synthetic_mean_genes": genes,
                                           "seconds": round(time.time() - t0, 1)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=["160m:2048", "160m:8192", "1.4b:8192"], help="PRESET:CONTEXT")
    ap.add_argument("--attention", nargs="+", default=["sigmoid", "softmax"])
    ap.add_argument("--steps", type=int, default=200, help="timed steps per run")
    ap.add_argument("--warmup-steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=None, help="micro-batch (cells); default keeps the preset's "
                                                                   "tokens per micro-batch")
    ap.add_argument("--override", action="append", default=[], help="extra trainer override (repeatable)")
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[1],
                    help="data-parallel ranks (local GPUs) per run, e.g. 1 2 4")
    ap.add_argument("--mds", type=Path, default=None, help="a data_prep corpus: measure real shards through the real "
                    "loader against synthetic cells of the same mean length (rows data=mds / synthetic_matched)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    stats = None
    if a.mds is not None:
        from benchmarks.real_feed import corpus_stats

        try:
            stats = corpus_stats(a.mds)
        except (FileNotFoundError, ValueError) as e:
            ap.error(f"--mds: {e}")
    import torch
    import triton

    from benchmarks.provenance import commit
    from launch.measure import measure

    runs = []
    for spec in a.runs:
        size, _, ctx = spec.partition(":")
        if not ctx.isdigit():
            ap.error(f"bad --runs entry {spec!r}: expected PRESET:CONTEXT")
        runs += [(size, int(ctx), att, w) for w in a.world_sizes for att in a.attention]
    meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "commit": commit(),
            "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "warmup_steps": a.warmup_steps, "timed_steps": a.steps, "overrides": a.override,
            **({"mds": str(a.mds)} if a.mds else {}), "rows": []}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for size, ctx, att, w in runs:
        t0 = time.time()
        try:
            if a.mds is not None:
                new = _measure_real(measure, size, ctx, att, w, a, stats)
            else:
                m = measure(size, ctx, att, warmup_steps=a.warmup_steps, timed_steps=a.steps,
                            batch_size=a.batch_size, extra_overrides=a.override, world_size=w)
                new = [dataclasses.asdict(m) | {"seconds": round(time.time() - t0, 1)}]
        except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
            new = [{"size": size, "context": ctx, "attention": att, "world_size": w,
                    **({"data": "mds"} if a.mds else {}), "error": f"{type(e).__name__}: {e}"}]
        for row in new:
            meta["rows"].append(row)
            print(json.dumps(row), flush=True)
        a.out.write_text(json.dumps(meta, indent=1))   # incremental: a killed sweep keeps its finished rows
    table = _table(meta["rows"])
    a.out.with_suffix(".md").write_text(f"{meta['device']}, {meta['date']}, torch {meta['torch']}\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

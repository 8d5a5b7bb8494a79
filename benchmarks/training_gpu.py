"""Trainer throughput on the local GPU: sigmoid vs softmax per preset × context, a few hundred real steps each.

Each run is ``launch.measure.measure`` (the real ``training.trainer.Trainer``: DeepSpeed engine with the
preset's ZeRO stage, bf16, activation checkpointing where the preset sets it) on synthetic cells whose
expressed-gene count fills the context. Reported per run: median tokens/s, cells/s and MFU over the timed
steps (warm-up excluded), peak GPU memory (``torch.cuda.max_memory_allocated``), first/last loss.
``--world-sizes 1 2 4`` repeats every run data parallel over that many local GPUs: each row carries
``world_size``, ``tokens_per_s`` (global) and ``tokens_per_s_per_gpu``; the table adds the per-GPU scaling
against the same run on one GPU. The JSON carries ``commit`` ($SIGATTN_COMMIT where set, else ``git rev-parse``).
MFU = (6·(N_nonemb − N_head) + 6·N_head·r + 12·L·d·s)·tokens/s / bf16 peak (``training.metrics``; the head
runs on the masked fraction r of the tokens). Writes JSON (device, versions, date,
rows) and a markdown table; prints the sigmoid/softmax ratio per preset × context.

    python benchmarks/training_gpu.py --runs 160m:2048 160m:8192 1.4b:8192 --steps 200 \
        --out benchmarks/results/training_h100.json
    NCCL_NVLS_ENABLE=0 python benchmarks/training_gpu.py --runs 160m:8192 --world-sizes 1 2 4 --out dp.json
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
    lines = ["| preset | context | attention | GPUs | micro-batch | tokens/s | tokens/s per GPU | per GPU vs 1 GPU | "
             "cells/s | MFU | peak mem GiB | loss first → last | sigmoid / softmax tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    key = lambda r, att=None: (r["size"], r["context"], att or r["attention"], r.get("world_size", 1))  # noqa: E731
    by = {key(r): r for r in rows if "error" not in r}
    for r in rows:
        w = r.get("world_size", 1)
        if "error" in r:
            lines.append(f"| {r['size']} | {r['context']} | {r['attention']} | {w} | – | error: {r['error'][:80]} "
                         "|||||||")
            continue
        other = by.get(key(r, "softmax"))
        ratio = f"{r['tokens_per_s'] / other['tokens_per_s']:.3f}" if r["attention"] == "sigmoid" and other else ""
        one = by.get((r["size"], r["context"], r["attention"], 1))
        per_gpu = r.get("tokens_per_s_per_gpu") or r["tokens_per_s"] / w
        scale = f"{per_gpu / one['tokens_per_s']:.3f}" if one and w > 1 else ""
        mfu = f"{r['mfu']:.3f}" if r.get("mfu") is not None else "–"
        lines.append(f"| {r['size']} | {r['context']} | {r['attention']} | {w} | {r['batch_size']} | "
                     f"{r['tokens_per_s']:,.0f} | {per_gpu:,.0f} | {scale} | {r['cells_per_s']:.1f} | {mfu} | "
                     f"{r['mem_gb']:.1f} | {r['loss_first']:.3f} → {r['loss_last']:.3f} | {ratio} |")
    return "\n".join(lines)


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
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
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
            "warmup_steps": a.warmup_steps, "timed_steps": a.steps, "overrides": a.override, "rows": []}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for size, ctx, att, w in runs:
        t0 = time.time()
        try:
            m = measure(size, ctx, att, warmup_steps=a.warmup_steps, timed_steps=a.steps, batch_size=a.batch_size,
                        extra_overrides=a.override, world_size=w)
            row = dataclasses.asdict(m) | {"seconds": round(time.time() - t0, 1)}
        except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
            row = {"size": size, "context": ctx, "attention": att, "world_size": w,
                   "error": f"{type(e).__name__}: {e}"}
        meta["rows"].append(row)
        print(json.dumps(row), flush=True)
        a.out.write_text(json.dumps(meta, indent=1))   # incremental: a killed sweep keeps its finished rows
    table = _table(meta["rows"])
    a.out.with_suffix(".md").write_text(f"{meta['device']}, {meta['date']}, torch {meta['torch']}\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

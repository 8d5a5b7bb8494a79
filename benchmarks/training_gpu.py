"""Trainer throughput on the local GPU: sigmoid vs softmax per preset × context, a few hundred real steps each.

Each run is ``launch.measure.measure`` (the real ``training.trainer.Trainer``: DeepSpeed engine with the
preset's ZeRO stage, bf16, activation checkpointing where the preset sets it) on synthetic cells whose
expressed-gene count fills the context. Reported per run: median tokens/s, cells/s and MFU over the timed
steps (warm-up excluded), peak GPU memory (``torch.cuda.max_memory_allocated``), first/last loss.
MFU = (6·(N_nonemb − N_head) + 6·N_head·r + 12·L·d·s)·tokens/s / bf16 peak (``training.metrics``; the head
runs on the masked fraction r of the tokens). Writes JSON (device, versions, date,
rows) and a markdown table; prints the sigmoid/softmax ratio per preset × context.

    python benchmarks/training_gpu.py --runs 160m:2048 160m:8192 1.4b:8192 --steps 200 \
        --out benchmarks/results/training_h100.json
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
    lines = ["| preset | context | attention | micro-batch | tokens/s | cells/s | MFU | peak mem GiB | "
             "loss first → last | sigmoid / softmax tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["size"], r["context"], r["attention"]): r for r in rows if "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['context']} | {r['attention']} | – | error: {r['error'][:80]} |||||")
            continue
        other = by.get((r["size"], r["context"], "softmax"))
        ratio = f"{r['tokens_per_s'] / other['tokens_per_s']:.3f}" if r["attention"] == "sigmoid" and other else ""
        mfu = f"{r['mfu']:.3f}" if r.get("mfu") is not None else "–"
        lines.append(f"| {r['size']} | {r['context']} | {r['attention']} | {r['batch_size']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['cells_per_s']:.1f} | {mfu} | {r['mem_gb']:.1f} | {r['loss_first']:.3f} → {r['loss_last']:.3f} | "
                     f"{ratio} |")
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
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    import torch
    import triton

    from launch.measure import measure

    runs = []
    for spec in a.runs:
        size, _, ctx = spec.partition(":")
        if not ctx.isdigit():
            ap.error(f"bad --runs entry {spec!r}: expected PRESET:CONTEXT")
        runs += [(size, int(ctx), att) for att in a.attention]
    meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "warmup_steps": a.warmup_steps, "timed_steps": a.steps, "overrides": a.override, "rows": []}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for size, ctx, att in runs:
        t0 = time.time()
        try:
            m = measure(size, ctx, att, warmup_steps=a.warmup_steps, timed_steps=a.steps, batch_size=a.batch_size,
                        extra_overrides=a.override)
            row = dataclasses.asdict(m) | {"seconds": round(time.time() - t0, 1)}
        except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
            row = {"size": size, "context": ctx, "attention": att, "error": f"{type(e).__name__}: {e}"}
        meta["rows"].append(row)
        print(json.dumps(row), flush=True)
        a.out.write_text(json.dumps(meta, indent=1))   # incremental: a killed sweep keeps its finished rows
    table = _table(meta["rows"])
    a.out.with_suffix(".md").write_text(f"{meta['device']}, {meta['date']}, torch {meta['torch']}\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

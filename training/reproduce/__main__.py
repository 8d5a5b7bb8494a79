"""``python -m training.reproduce stability|quality|speed [--scale demo|gpu|cluster] --out DIR [options]``.

Every recipe writes ``DIR/summary.json``, PNG plots and ``DIR/report.md``. Options override the scale's
settings (``--steps``, ``--context``, ...), which is how the tests run each recipe on a tiny config.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path


def _scale(scales: dict, name: str, args: argparse.Namespace, fields: dict[str, str]):
    """The named scale with every option the user gave (``fields``: option dest → Scale field)."""
    scale = scales[name]
    changes = {f: getattr(args, d) for d, f in fields.items() if getattr(args, d, None) is not None}
    return dataclasses.replace(scale, **{k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.reproduce", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="recipe", required=True)

    s = sub.add_parser("stability", help="LR ladder without gradient clipping: sigmoid vs softmax divergence")
    s.add_argument("--scale", choices=("demo", "gpu", "cluster"), default="demo")
    s.add_argument("--out", type=Path, default=None, help="output folder (default runs/reproduce/stability-SCALE)")
    s.add_argument("--preset")
    s.add_argument("--context", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--steps", type=int)
    s.add_argument("--warmup", type=int)
    s.add_argument("--min-lr-ratio", type=float,
                   help="the cosine ends at lr x this (default 0.1); 1 = constant LR after the warm-up")
    s.add_argument("--lrs", type=float, nargs="+", help="the learning-rate ladder")
    s.add_argument("--seed", type=int)
    s.add_argument("--seeds", type=int, nargs="+",
                   help="repeat every arm over these seeds (weights, cells, masks); default: --seed alone")
    s.add_argument("--attention", nargs="+", choices=("sigmoid", "softmax"), default=["sigmoid", "softmax"],
                   help="attentions to train (finished arms in --out are reused, also by a later run with a "
                        "longer ladder)")
    s.add_argument("--force", action="store_true", help="re-train finished arms")
    s.add_argument("--gpus", default="auto",
                   help="arms trained at once, one per GPU (default auto: every visible GPU; without CUDA, 1)")
    s.add_argument("--collect", type=Path, help="judge runs trained elsewhere: a folder of run dirs")
    s.add_argument("--nodes", type=int, default=2, help="cluster scale: nodes per run")
    s.add_argument("--gpus-per-node", type=int, default=8, help="cluster scale: GPUs per node")
    s.add_argument("--partition", help="cluster scale: Slurm partition")
    s.add_argument("--corpus", help="cluster scale: data_prep corpus on shared storage (default: synthetic cells)")
    s.add_argument("--rates", type=Path, default=Path("launch/results/measured-h100/projection.json"),
                   help="cluster scale: measured cells/s per GPU (a launch.project JSON); else --mfu")
    s.add_argument("--mfu", type=float, default=0.4, help="cluster scale: MFU where no measured rate exists")
    s.add_argument("--quiet", action="store_true")

    q = sub.add_parser("quality", help="≥ 5 seeds per attention on real datasets: val loss + scIB, with CIs")
    q.add_argument("--scale", choices=("demo", "gpu"), default="demo")
    q.add_argument("--out", type=Path, default=None, help="output folder (default runs/reproduce/quality-SCALE)")
    q.add_argument("--seeds", type=int, nargs="+")
    q.add_argument("--steps", type=int)
    q.add_argument("--batch-size", type=int)
    q.add_argument("--context", type=int)
    q.add_argument("--max-cells", type=int, help="cells per dataset (a fixed random subset)")
    q.add_argument("--mask-patterns", type=int, help="fixed masking patterns of the validation loss")
    q.add_argument("--datasets", nargs="+", help="dataset names (default: all of training.reproduce.datasets)")
    q.add_argument("--stage", choices=("all", "prepare", "device", "host"), default="all",
                   help="one part of the recipe, for machines that hold only part of what it needs: prepare (CPU: "
                        "corpus + held-out cells), device (GPU: training, val loss, embeddings), host (CPU: scIB, "
                        "PCA, report); default all three")
    q.add_argument("--arms", nargs="+", choices=("sigmoid", "softmax", "untrained"),
                   default=["sigmoid", "softmax", "untrained"],
                   help="what this invocation trains/scores: the two attentions and the untrained encoder (initial "
                        "weights: what training added)")
    q.add_argument("--force", action="store_true", help="re-train and re-evaluate finished arms")
    q.add_argument("--gpus", default="auto",
                   help="arms trained at once, one per GPU (default auto: every visible GPU; without CUDA, 1)")
    q.add_argument("--quiet", action="store_true")

    v = sub.add_parser("speed", help="sigmoid vs softmax training tokens/s per context + projected GPU-hours")
    v.add_argument("--scale", choices=("demo", "gpu"), default="demo")
    v.add_argument("--out", type=Path, default=None, help="output folder (default runs/reproduce/speed-SCALE)")
    v.add_argument("--preset")
    v.add_argument("--contexts", type=int, nargs="+")
    v.add_argument("--warmup-steps", type=int)
    v.add_argument("--timed-steps", type=int)
    v.add_argument("--mfu", type=float, default=0.4, help="projection: MFU where no measured rate exists")
    v.add_argument("--rates", type=Path, default=Path("launch/results/measured-h100/projection.json"),
                   help="projection: measured cells/s per GPU (a launch.project JSON) for the 4 × 3 table")
    v.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    from training.reproduce.parallel import resolve_gpus

    a = build_parser().parse_args(argv)
    out = a.out or Path("runs/reproduce") / f"{a.recipe}-{a.scale}"
    try:
        if a.recipe == "stability":
            from training.reproduce import stability

            if a.collect is not None:
                summary = stability.collect(a.collect, out)
            elif a.scale == "cluster":
                scale = _scale(stability.SCALES, "cluster", a, {"preset": "preset", "context": "context",
                               "batch_size": "batch_size", "steps": "steps", "warmup": "warmup", "lrs": "lrs",
                               "seed": "seed", "min_lr_ratio": "min_lr_ratio"})
                summary = stability.write_cluster_sweep(out, scale=scale, nodes=a.nodes, gpus_per_node=a.gpus_per_node,
                                                        partition=a.partition, rates=a.rates, mfu=a.mfu,
                                                        corpus=a.corpus)
                print(f"GPU-hours per arm: {summary['gpu_hours_per_arm']}; sweep total {summary['gpu_hours_total']:,.0f}")
            else:
                scale = _scale(stability.SCALES, a.scale, a, {"preset": "preset", "context": "context",
                               "batch_size": "batch_size", "steps": "steps", "warmup": "warmup", "lrs": "lrs",
                               "seed": "seed", "min_lr_ratio": "min_lr_ratio"})
                summary = stability.run(a.scale, out, scale=scale, attentions=tuple(a.attention), force=a.force,
                                        progress=not a.quiet, seeds=tuple(a.seeds) if a.seeds else None,
                                        gpus=resolve_gpus(a.gpus))
                print(summary["verdict"])
        elif a.recipe == "quality":
            from training.reproduce import quality

            scale = _scale(quality.SCALES, a.scale, a, {"seeds": "seeds", "steps": "steps", "batch_size": "batch_size",
                           "context": "context", "max_cells": "max_cells", "mask_patterns": "mask_patterns",
                           "datasets": "datasets"})
            summary = quality.run(a.scale, out, scale=scale, force=a.force, progress=not a.quiet, stage=a.stage,
                                  arms=tuple(a.arms), gpus=resolve_gpus(a.gpus) if a.stage in ("all", "device") else 1)
            print(summary["verdict"])
            if a.stage in ("prepare", "device"):
                return 0                           # no report yet
        else:
            from training.reproduce import speed

            scale = _scale(speed.SCALES, a.scale, a, {"preset": "preset", "contexts": "contexts",
                           "warmup_steps": "warmup_steps", "timed_steps": "timed_steps"})
            summary = speed.run(a.scale, out, scale=scale, rates=a.rates, mfu=a.mfu, progress=not a.quiet)
            print(summary["verdict"])
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

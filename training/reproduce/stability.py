"""Stability recipe: does softmax diverge where sigmoid attention does not, without gradient clipping?

Arms: every (attention, learning rate) of a ladder, otherwise identical — preset, synthetic cells filling the
context (``training.synthetic``: the same cells in the same order for every arm), seed (so the same initial
weights: both attentions have the same parameters), warm-up + cosine schedule, ``optim.grad_clip=null``,
``run.nan_policy=stop``. Each arm logs every step the loss, the global gradient norm, the largest attention
logit and the largest activation (:mod:`training.reproduce.monitor`) and is judged by
:func:`training.reproduce.divergence.assess` (diverged or not, first non-finite step, first gradient-norm
spike above 100× its running median, largest gradient norm).

Scales: ``demo`` (tiny preset, CPU, minutes), ``gpu`` (160m at 8K on one H100, ~20 min for 6 arms), and
``cluster``, which trains nothing: it writes the Slurm sweep of the paper's setting (160m, 8K, 80K steps,
both attentions × the ladder) as a ``launch.submit`` command with the projected GPU-hours
(``launch.project``). Finished arms are kept (``verdict.json`` per arm) and skipped on a re-run, so a long
ladder can be spread over several invocations; ``--force`` re-trains them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from training.reproduce.divergence import SPIKE_FACTOR, assess
from training.reproduce.output import (as_record, budget, other_budget, provenance, read_json, write_json,
                                       write_text)
from training.reproduce.parallel import on_gpus

KINDS = ("sigmoid", "softmax")
PAPER = {"model": "160m", "context": 8192, "steps": 80_000, "softmax_diverges_at_step": 55_000,
         "claim": "softmax without gradient clipping diverges (loss ~3 → 10+, gradient norm up 10^4) at step "
                  "~55K; sigmoid keeps decreasing"}


@dataclass(frozen=True)
class Scale:
    """What every arm trains: preset, cells (context, micro-batch), steps, warm-up and the LR ladder."""

    preset: str
    context: int
    batch_size: int
    steps: int
    warmup: int
    lrs: tuple[float, ...]
    seed: int = 0
    synthetic_vocab: int = 20_000
    min_lr_ratio: float = 0.1       # the cosine ends at lr·min_lr_ratio; 1.0 = constant after the warm-up

    def overrides(self, attention: str, lr: float, run_dir: Path, progress: bool) -> list[str]:
        return [f"model.attention={attention}", "data.mds=null", f"data.context_length={self.context}",
                f"data.batch_size={self.batch_size}", f"data.synthetic_vocab={self.synthetic_vocab}",
                f"data.synthetic_mean_genes={min(2 * self.context, self.synthetic_vocab // 2)}",
                f"optim.lr={lr}", "optim.grad_clip=null", f"optim.warmup_steps={self.warmup}",
                f"optim.min_lr_ratio={self.min_lr_ratio}",
                f"run.max_steps={self.steps}", f"run.seed={self.seed}", f"run.dir={run_dir}",
                "run.nan_policy=stop", "run.ckpt_every=0", "run.tensorboard=false", f"run.progress={progress}"]


SCALES = {
    "demo": Scale("tiny", context=64, batch_size=8, steps=100, warmup=10, lrs=(1e-3, 1e-2, 5e-2)),
    # One H100: 160m at 8K, micro-batch 8 (~0.5 s/step) → 6 arms × 250 steps ≈ 15 min + start-up ≈ 20 min.
    "gpu": Scale("160m", context=8192, batch_size=8, steps=250, warmup=20, lrs=(2e-3, 6e-3, 1e-2)),
    # The paper's run; per-GPU micro-batch 8 × 16 GPUs = 128 cells of 8K tokens per step.
    "cluster": Scale("160m", context=8192, batch_size=8, steps=80_000, warmup=2_000, lrs=(6e-4, 2e-3, 6e-3)),
}


def _budget(scale: dict) -> dict:
    """What an arm's training depends on: the scale without the ladder (an arm is one of its rungs)."""
    return budget(Scale, scale, drop=("lrs",))


def arm_name(attention: str, lr: float, seed: int | None = None) -> str:
    """``sigmoid_lr0.006``; with a seed other than the scale's: ``sigmoid_lr0.006_s1``."""
    return f"{attention}_lr{lr:g}" + (f"_s{seed}" if seed is not None else "")


def run_arm(scale: Scale, attention: str, lr: float, arm_dir: Path, *, force: bool = False,
            progress: bool = True) -> dict:
    """Train one arm (or return its stored verdict); returns the arm's summary row."""
    from launch.configs import resolve_config
    from training.config import load_config
    from training.reproduce.entry import MonitoredTrainer
    from training.trainer import NonFiniteError

    done = arm_dir / "verdict.json"
    if done.is_file() and not force:
        row = read_json(done)
        old, new = _budget(row.get("scale", {})), _budget(as_record(scale))
        if old != new:
            raise other_budget(arm_dir, old, new)
        return {"seed": scale.seed} | row | {"run_dir": f"{arm_dir.parent.name}/{arm_dir.name}"}
    if arm_dir.exists():
        shutil.rmtree(arm_dir)
    arm_dir.mkdir(parents=True)
    overrides = scale.overrides(attention, lr, arm_dir, progress)
    cfg = load_config(resolve_config(scale.preset), overrides)
    t0 = time.perf_counter()
    with MonitoredTrainer(cfg) as trainer:
        try:
            trainer.train()
        except NonFiniteError:
            pass                                            # logged by the monitor; the verdict reads it
    verdict = assess(read_records(arm_dir))
    row = {"arm": arm_dir.name, "attention": attention, "lr": lr, "seed": scale.seed, **verdict.to_dict(),
           "seconds": round(time.perf_counter() - t0, 1), "run_dir": f"{arm_dir.parent.name}/{arm_dir.name}",
           "overrides": overrides, "scale": dataclasses.asdict(scale), "trained_on": provenance()}
    write_json(done, row)
    return row


def read_records(arm_dir: Path) -> list[dict]:
    """The arm's per-step records (the last one of a step logged twice, as after a resume)."""
    path = Path(arm_dir) / "stability.jsonl"
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def plot(rows: list[dict], path: Path, title: str, root: Path) -> Path:
    """Loss, gradient norm and largest attention logit (log scale) against step, both attentions, one column
    per learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = sorted({r["lr"] for r in rows})
    colours = {"sigmoid": "tab:blue", "softmax": "tab:red"}
    with plt.style.context("default"):
        fig, axes = plt.subplots(3, len(lrs), figsize=(4.2 * len(lrs), 8.4), squeeze=False, sharex="col")
        for j, lr in enumerate(lrs):
            several = len({r.get("seed", 0) for r in rows}) > 1      # one line per seed, one legend entry per kind
            labelled = set()
            for r in (r for r in rows if r["lr"] == lr):
                recs = read_records(root / r["run_dir"])
                steps = [x["step"] for x in recs]
                n_div = sum(x["diverged"] for x in rows if x["lr"] == lr and x["attention"] == r["attention"])
                label = None if r["attention"] in labelled else r["attention"] + (
                    f" ({n_div} diverged)" if several and n_div else " (diverged)" if r["diverged"] else "")
                labelled.add(r["attention"])
                for i, key in enumerate(("loss", "grad_norm", "max_attn_logit")):
                    vals = [x[key] if x.get(key) is not None else float("nan") for x in recs]
                    axes[i][j].plot(steps, vals, color=colours.get(r["attention"]), lw=0.8 if several else 1.0,
                                    alpha=0.6 if several else 1.0, label=label if i == 0 else None)
                    if r["instability_step"] is not None:
                        axes[i][j].axvline(r["instability_step"], color=colours.get(r["attention"]), ls="--", lw=0.8)
            axes[0][j].set_title(f"lr {lr:g}")
            axes[2][j].set_xlabel("step")
            for i, name in enumerate(("training loss", "global gradient norm", "max attention logit q·k/√D")):
                axes[i][j].set_yscale("log" if i < 2 else "symlog")
                axes[i][j].grid(alpha=0.3, which="both")
                if j == 0:
                    axes[i][j].set_ylabel(name)
            axes[0][j].legend(fontsize=8)
        fig.suptitle(title + "\n(dashed: first non-finite value or gradient-norm spike)", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return path


def _cell(v, spec=".3g"):
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "**yes**" if v else "no"
    return format(v, spec) if isinstance(v, float) else str(v)


def _schedule(settings: dict) -> str:
    r = settings.get("min_lr_ratio", Scale.min_lr_ratio)
    return "then constant" if r == 1 else f"cosine to {r:g}×"


def markdown(summary: dict) -> str:
    s = summary
    rows = s["arms"]
    lines = [f"# Stability recipe ({s['scale_name']} scale)", "",
             f"{s['settings']['preset']} preset, synthetic cells filling a {s['settings']['context']}-token context, "
             f"micro-batch {s['settings']['batch_size']}, {s['settings']['steps']} steps (warm-up "
             f"{s['settings']['warmup']}, {_schedule(s['settings'])}), seed(s) "
             f"{', '.join(map(str, s['settings'].get('seeds', [s['settings']['seed']])))}, no gradient clipping, "
             f"only the attention differs. {_trained_on(rows)} Report written on {s['provenance']['device']}, "
             f"commit `{s['provenance']['commit']}`, {s['provenance']['date']}.", "",
             "| attention | lr | seed | diverged | first non-finite step | first grad-norm spike (>100× median) | "
             "max grad norm | max attn logit | max activation | first → best → final loss | steps |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in sorted(rows, key=lambda r: (r["lr"], r.get("seed", 0), r["attention"])):
        lines.append(f"| {r['attention']} | {r['lr']:g} | {r.get('seed', 0)} | {_cell(r['diverged'])} | "
                     f"{_cell(r['first_nonfinite_step'])} | "
                     f"{_cell(r['first_grad_spike_step'])} | {_cell(r['max_grad_norm'])} | {_cell(r['max_attn_logit'])} | "
                     f"{_cell(r['max_activation'])} | {_cell(r['first_loss'])} → {_cell(r['best_loss'])} → "
                     f"{_cell(r['final_loss'])} | {r['steps']} |")
    lines += ["", s["verdict"], "", f"![loss and gradient norm per learning rate]({s['plots'][0]})", "",
              f"Paper: {PAPER['claim']}. " + s["caveat"], ""]
    return "\n".join(lines)


def _trained_on(rows: list[dict]) -> str:
    """Where the arms were trained (each verdict records it; an arm trained elsewhere keeps its own)."""
    seen = sorted({(t.get("device"), t.get("commit"), (t.get("date") or "")[:10])
                   for t in (r.get("trained_on") for r in rows) if t})
    if not seen:
        return "The arms' verdicts do not record where they were trained (written before they did)."
    return "Arms trained on " + "; ".join(f"{d}, commit `{c}`, {day}" for d, c, day in seen) + "."


def verdict_line(rows: list[dict]) -> str:
    parts = []
    for kind in KINDS:
        mine = [r for r in rows if r["attention"] == kind]
        if mine:
            one_seed = len({r.get("seed", 0) for r in mine}) == 1
            tag = (lambda r: f"{r['lr']:g}") if one_seed else (lambda r: f"{r['lr']:g} seed {r.get('seed', 0)}")
            div = [tag(r) for r in mine if r["diverged"]]
            spk = [tag(r) for r in mine if r["first_grad_spike_step"] is not None]
            unit = "learning rates" if one_seed else "runs (learning rate × seed)"
            parts.append(f"{kind}: diverged at {len(div)} of {len(mine)} {unit}"
                         + (f" ({', '.join(div)})" if div else "")
                         + f", gradient-norm spikes at {len(spk)}" + (f" ({', '.join(spk)})" if spk else ""))
    return "; ".join(parts) + "."


def run(scale_name: str, out: Path, *, scale: Scale, attentions=KINDS, force: bool = False,
        progress: bool = True, seeds: tuple[int, ...] | None = None, gpus: int = 1) -> dict:
    """Train every arm of the ladder (skipping finished ones) and write summary.json, the plot and report.md.
    ``seeds``: every (attention, lr) arm once per seed (the scale's own seed keeps the plain arm name); ``gpus``:
    arms trained at once, one per GPU (``training.reproduce.parallel``)."""
    out.mkdir(parents=True, exist_ok=True)
    seeds = tuple(seeds) if seeds else (scale.seed,)
    arms = [(a, lr, sd) for lr in scale.lrs for sd in seeds for a in attentions]
    names = [arm_name(a, lr, None if sd == scale.seed else sd) for a, lr, sd in arms]
    rows = on_gpus(functools.partial(run_arm, force=force, progress=progress and gpus == 1),
                   [(dataclasses.replace(scale, seed=sd), a, lr, out / "arms" / name)
                    for (a, lr, sd), name in zip(arms, names)], gpus, desc="stability arms", names=names,
                   progress=progress)
    caveat = ("Demo scale on a CPU (a tiny model, a few hundred steps) says nothing about the paper's 80K-step "
              "claim: it checks the recipe end to end." if scale_name == "demo" else
              "One seed and a few hundred steps per arm: a learning-rate ladder makes instability show early; "
              "it does not reproduce the paper's step-55K divergence at its learning rate.")
    summary = {"recipe": "stability", "scale_name": scale_name, "settings": dataclasses.asdict(scale) | {"seeds": seeds},
               "criteria": {"grad_spike_factor": SPIKE_FACTOR, "spike_median_window": 50,
                            "diverged": "non-finite loss/grad norm, or final loss > 1.5 × best running-mean loss"},
               "provenance": provenance(), "arms": rows, "verdict": verdict_line(rows), "paper": PAPER,
               "caveat": caveat, "plots": ["stability.png"]}
    plot(rows, out / "stability.png", f"{scale.preset}, context {scale.context}, no clipping", out)
    write_json(out / "summary.json", summary)
    write_text(out / "report.md", markdown(summary))
    return summary


def write_cluster_sweep(out: Path, *, scale: Scale = SCALES["cluster"], nodes: int = 2, gpus_per_node: int = 8,
                        partition: str | None = None, time_limit: str = "24:00:00",
                        rates: Path | None = None, mfu: float = 0.4, corpus: str | None = None) -> dict:
    """The paper's setting as a ``launch.submit`` job-array command, with projected GPU-hours per arm.

    GPU-hours per arm = steps × global batch cells / (cells/s per GPU) / 3600, with cells/s from a committed
    measured projection (``rates``, e.g. ``launch/results/measured-h100/projection.json``) where it has the
    (size, context, attention) row, else analytic at ``mfu`` (``launch.project``). ``corpus``: a data_prep
    corpus on shared storage (the paper trained on CellxGene); without it the runs use synthetic cells.
    """
    from launch.configs import check_overrides, resolve_config
    from launch.project import project, write_outputs

    gpus = nodes * gpus_per_node
    cells = scale.steps * scale.batch_size * gpus
    base = [o for o in scale.overrides("sigmoid", scale.lrs[0], Path("RUN_DIR"), False)
            if not o.startswith(("model.attention=", "optim.lr=", "run.dir=", "run.progress="))]
    base = [o.replace("run.ckpt_every=0", "run.ckpt_every=1000") for o in base]
    if corpus is not None:
        base = [f"data.mds={corpus}" if o.startswith("data.mds=") else o for o in base
                if not o.startswith(("data.synthetic_vocab=", "data.synthetic_mean_genes="))]
    entry = "training.reproduce.entry:build_trainer"
    check_overrides(resolve_config(scale.preset), base + ["model.attention=softmax", f"optim.lr={scale.lrs[0]}"],
                    "training.reproduce.entry")
    cmd = ["python", "-m", "launch.submit", scale.preset, *base, "--nodes", str(nodes), "--gpus-per-node",
           str(gpus_per_node), "--time", time_limit, "--name", "stability-160m-8k", "--entry", entry,
           "--array-sweep", "model.attention=" + ",".join(KINDS), "optim.lr=" + ",".join(f"{x:g}" for x in scale.lrs)]
    if partition:
        cmd[cmd.index("--time"):cmd.index("--time")] = ["--partition", partition]
    rows = project([scale.preset], [scale.context], cells=cells, gpus=gpus, mfu=mfu)
    measured = {}
    if rates is not None and Path(rates).is_file():
        measured = {(r["size"], r["context"], r["attention"]): r for r in read_json(rates)["rows"]
                    if r.get("cells_per_s_per_gpu")}
    for r in rows:
        m = measured.get((r["size"], r["context"], r["attention"]))
        if m:
            r.update(throughput=f"measured ({Path(rates).as_posix()})", cells_per_s_per_gpu=m["cells_per_s_per_gpu"],
                     gpu_hours=cells / m["cells_per_s_per_gpu"] / 3600,
                     wall_hours=cells / m["cells_per_s_per_gpu"] / 3600 / gpus)
    soft = {r["context"]: r for r in rows if r["attention"] == "softmax"}
    for r in rows:
        if r["attention"] == "sigmoid" and r["context"] in soft:
            r["sigmoid_saving_pct"] = 100 * (1 - r["gpu_hours"] / soft[r["context"]]["gpu_hours"])
    per_arm = {r["attention"]: r["gpu_hours"] for r in rows}
    total = sum(per_arm[a] for a in KINDS) * len(scale.lrs)
    out.mkdir(parents=True, exist_ok=True)
    script = ("#!/bin/bash\n# The paper's stability setting: 160m, 8K context, 80K steps, no gradient clipping,\n"
              f"# {len(KINDS)} attentions x {len(scale.lrs)} learning rates = {len(KINDS) * len(scale.lrs)} array tasks "
              f"of {gpus} GPUs.\n# Projected: {total:,.0f} GPU-hours in all "
              + ", ".join(f"{a} {per_arm[a]:,.0f}" for a in KINDS) + " GPU-hours per arm.\n"
              "# Each run writes stability.jsonl (loss, grad norm, max attention logit, max activation per step).\n"
              "# Run from the repository root.\nset -euo pipefail\n" + shlex.join(cmd) + "\n")
    write_text(out / "submit_sweep.sh", script).chmod(0o755)
    meta = {"cells": cells, "epochs": 1.0, "gpus": gpus, "gpu_mem_gib": 80.0,
            "throughput": "measured where available, else MFU " + f"{mfu:g}",
            "note": f"{scale.steps:,} steps × {scale.batch_size} cells × {gpus} GPUs per arm."}
    write_outputs(rows, out / "projection", meta)
    summary = {"recipe": "stability", "scale_name": "cluster", "settings": dataclasses.asdict(scale),
               "nodes": nodes, "gpus_per_node": gpus_per_node, "corpus": corpus, "global_batch_cells": scale.batch_size * gpus,
               "command": cmd, "script": "submit_sweep.sh", "projection": rows,
               "gpu_hours_per_arm": per_arm, "gpu_hours_total": total, "paper": PAPER,
               "provenance": provenance(), "plots": ["projection/projection.png"]}
    write_json(out / "summary.json", summary)
    write_text(out / "report.md", "\n".join([
        "# Stability recipe (cluster scale): the paper's setting as a Slurm sweep", "",
        f"`{out / 'submit_sweep.sh'}` submits {len(KINDS) * len(scale.lrs)} array tasks "
        f"({', '.join(KINDS)} × lr {', '.join(f'{x:g}' for x in scale.lrs)}), each {nodes} nodes × {gpus_per_node} "
        f"GPUs, {scale.steps:,} steps of {scale.batch_size * gpus} cells × {scale.context} tokens, no clipping, on "
        + (f"the corpus `{corpus}`." if corpus else "synthetic cells (pass `--corpus` for a real data_prep corpus)."),
        "",
        "| attention | cells/s per GPU | throughput | GPU-hours per arm | wall hours per arm |", "|---|---:|---|---:|---:|",
        *[f"| {r['attention']} | {r['cells_per_s_per_gpu']:.1f} | {r['throughput']} | {r['gpu_hours']:,.0f} | "
          f"{r['wall_hours']:,.1f} |" for r in rows], "",
        f"Total: **{total:,.0f} GPU-hours** for the sweep.", "", "```bash", shlex.join(cmd), "```", "",
        "Afterwards: `python -m training.reproduce stability --collect JOB_FOLDER/runs --out DIR` judges each "
        "run's stability.jsonl and draws the plot.", ""]))
    return summary


def collect(runs_root: Path, out: Path) -> dict:
    """Judge runs trained elsewhere (e.g. the cluster sweep): every ``*/stability.jsonl`` under ``runs_root``."""
    import yaml

    rows = []
    for log in sorted(Path(runs_root).glob("*/stability.jsonl")):
        cfg = yaml.safe_load((log.parent / "config.yaml").read_text())
        v = assess(read_records(log.parent))
        rows.append({"arm": log.parent.name, "attention": cfg["model"]["attention"], "lr": cfg["optim"]["lr"],
                     **v.to_dict(), "run_dir": log.parent.name})
    if not rows:
        raise FileNotFoundError(f"no */stability.jsonl under {runs_root}")
    out.mkdir(parents=True, exist_ok=True)
    plot(rows, out / "stability.png", f"runs under {runs_root}", Path(runs_root))
    summary = {"recipe": "stability", "scale_name": "collected", "runs_root": str(runs_root), "arms": rows,
               "verdict": verdict_line(rows), "provenance": provenance(), "plots": ["stability.png"]}
    write_json(out / "summary.json", summary)
    return summary

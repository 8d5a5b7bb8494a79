"""Quality recipe: is sigmoid attention's embedding better than softmax's, beyond seed noise?

One corpus of real datasets (:mod:`training.reproduce.datasets`, built by ``python -m data_prep build`` with a
per-cell train/val split); for every seed and attention one model trained with the same budget (same preset,
steps, micro-batch, context, learning rate; the seed sets initial weights, data order, gene sampling and
masks identically for both attentions). Per model and dataset, on the held-out (val) cells only:

- the masked-gene validation loss (``training.evaluate.masked_validation_loss``) averaged over
  ``mask_patterns`` fixed masking patterns (mask seeds 0 … K−1, the same for every model);
- scIB bio-conservation (Leiden NMI / ARI at the NMI-optimal resolution, cell-type ASW, their mean;
  ``training.evaluate``) of the embeddings (``training.embed``): the CLS state, and (composite only) the mean of
  the gene tokens' states. The masked-expression loss is taken on gene tokens only, so CLS is trained only as a
  key/value the genes attend to; the mean-pooled row shows whether the gene states learned what CLS did not.

PCA of the same held-out cells (log-normalised counts, 2,000 HVGs, 30 PCs; scanpy) is the no-training row,
evaluated with the same seeds. Statistics (:mod:`training.reproduce.stats`): mean ± 95 % t-interval per
attention, and the paired difference sigmoid − softmax over seeds with its interval and p-value. A finished
arm (``result.json``) is reused on a re-run, so a long run can be spread over several invocations.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.reproduce.datasets import DATASETS, LABEL_KEY, prepare
from training.reproduce.heldout import heldout_cells
from training.reproduce.parallel import on_gpus
from training.reproduce.output import (as_record, budget, other_budget, provenance, read_json, write_json,
                                       write_text)
from training.reproduce.stats import fmt_ci, mean_ci, paired_difference

KINDS = ("sigmoid", "softmax")
# The same encoder (sigmoid attention) at its initial weights (one step at lr 0): what training added over the
# architecture and the input embedding alone.
UNTRAINED = "untrained"
ARMS = (*KINDS, UNTRAINED)
METRICS = (("bio_conservation", "bio-conservation"), ("nmi", "Leiden NMI"), ("ari", "Leiden ARI"),
           ("asw_label", "cell-type ASW"), ("bio_conservation_mean", "bio-conservation, mean pooling"),
           ("val_loss", "validation loss"))
# embeddings/<dataset><suffix>.h5ad per pooling; the metric keys of the non-primary poolings carry the same suffix
POOLINGS = {"cls": "", "mean": "_mean"}
PAPER = {"claim": "sigmoid attention: +25 % cell-type separation (scIB bio-conservation: Leiden NMI, ARI, "
                  "silhouette) and lower validation loss on six datasets",
         "bio_conservation_gain_pct": 25.0}
OBSM_KEY = "X_sigattn"
FAILED = "failed.json"      # an arm whose validation loss or embeddings came out non-finite (trained again next call)


@dataclass(frozen=True)
class Scale:
    seeds: tuple[int, ...]
    steps: int
    batch_size: int
    context: int
    max_cells: int | None          # per dataset (None: all)
    mask_patterns: int
    datasets: tuple[str, ...] = tuple(DATASETS)
    preset: str = "tiny"
    lr: float = 2e-3
    warmup: int = 20
    val_frac: float = 0.2
    num_workers: int = 0           # loader processes (tokenising beside the GPU step; streaming's order is the same)

    def overrides(self, attention: str, seed: int, corpus: Path, run_dir: Path, progress: bool) -> list[str]:
        return [f"model.attention={attention}", f"data.mds={corpus}", f"data.context_length={self.context}",
                f"data.batch_size={self.batch_size}", f"data.num_workers={self.num_workers}", f"optim.lr={self.lr}",
                f"optim.warmup_steps={self.warmup}", f"run.max_steps={self.steps}", f"run.ckpt_every={self.steps}",
                "run.keep_last=1", f"run.seed={seed}", f"run.dir={run_dir}", "run.tensorboard=false",
                f"run.progress={progress}"]


SCALES = {
    "demo": Scale(seeds=(0, 1, 2, 3, 4), steps=60, batch_size=16, context=64, max_cells=600, mask_patterns=3),
    # One H100: 160m at 2K (the datasets' cells have ~700–1,000 genes), 10 models × 400 steps of 32 cells
    # (~1.5 min each) + evaluation ≈ 25 min of device time.
    "gpu": Scale(seeds=(0, 1, 2, 3, 4), steps=400, batch_size=32, context=2048, max_cells=None, mask_patterns=5,
                 preset="160m", lr=6e-4, warmup=40, num_workers=4),
}


def _budget(scale: dict) -> dict:
    """What one model and its evaluation depend on: the scale without the list of seeds and the loader workers
    (the same cells in the same order either way)."""
    return budget(Scale, scale, drop=("seeds", "num_workers"))


def build_corpus(scale: Scale, out: Path, quiet: bool) -> Path:
    """The datasets' subsets → ``out/corpus`` (data_prep build, idempotent)."""
    import sys

    from training.demo import run_logged

    files = prepare(scale.datasets, out / "data", max_cells=scale.max_cells)
    corpus = out / "corpus"
    stamp = {"files": [str(f) for f in files], "val_frac": scale.val_frac, "max_cells": scale.max_cells}
    if (corpus / "manifest.json").is_file() and (out / "corpus.json").is_file() and read_json(out / "corpus.json") == stamp:
        return corpus                          # built from these very files (prepare re-uses unchanged ones)
    run_logged([sys.executable, "-m", "data_prep", "build", *map(str, files), "--out", str(corpus),
                "--cell-type-key", LABEL_KEY, "--split-by", "cell", "--val-frac", str(scale.val_frac),
                "--seed", "0"], out / "logs" / "data_prep.log", "data_prep build", quiet)
    write_json(out / "corpus.json", stamp)
    return corpus


def val_loss(run_dir: Path, corpus: Path, patterns: int) -> dict[str, float]:
    """Masked-gene validation loss per dataset, averaged over ``patterns`` fixed masking patterns."""
    from training.evaluate import masked_validation_loss

    per = [masked_validation_loss(run_dir, corpus, seed=p, progress=False)["val_loss_per_dataset"]
           for p in range(patterns)]
    return {name: float(np.mean([x[name] for x in per])) for name in per[0]}


def _reusable(done: Path, scale: Scale) -> dict | None:
    """``done``'s record if it exists and was made with this budget, else None."""
    if not done.is_file():
        return None
    r = read_json(done)
    return r if _budget(r.get("scale", {})) == _budget(as_record(scale)) else None


def _require_budget(arm: Path, record: dict, scale: Scale) -> dict:
    """``record`` (an arm's stored JSON) if it was made with this budget; else the refusal naming what differs."""
    old, new = _budget(record.get("scale", {})), _budget(as_record(scale))
    if old != new:
        raise other_budget(arm, old, new)
    return record


class NonFiniteLoss(RuntimeError):
    """A model's validation loss came out NaN/inf."""


def train_arm(attention: str, seed: int, scale: Scale, corpus: Path, heldout: dict[str, Path], arm: Path,
              *, force: bool, progress: bool) -> dict:
    """The GPU half of an arm: train (a fresh process), the validation loss, the held-out cells' embeddings →
    ``arm/trained.json`` (+ ``arm/embeddings/``); reused unless ``force`` or the budget changed. Needs no scanpy."""
    import shutil
    import sys

    from launch.configs import resolve_config
    from training.checkpoint import cached_weights
    from training.demo import run_logged
    from training.embed import NonFiniteEmbeddings, embed

    done = arm / "trained.json"
    if not force and done.is_file():              # finished: reused, or refused if trained with another budget
        return _require_budget(arm, read_json(done), scale)
    if arm.exists():
        shutil.rmtree(arm)
    t0 = time.perf_counter()
    run_dir = arm / "run"
    untrained = attention == UNTRAINED
    overrides = scale.overrides("sigmoid" if untrained else attention, seed, corpus, run_dir, False)
    if untrained:                   # initial weights: one step at lr 0 (AdamW and its weight decay scale by lr)
        overrides += ["optim.lr=0", "optim.warmup_steps=1", "run.max_steps=1", "run.ckpt_every=1"]
    # A fresh process per model (as make demo does): its own process group and streaming shared memory.
    run_logged([sys.executable, "-m", "training.train", str(resolve_config(scale.preset)), *overrides],
               arm / "train.log",
                f"training ({attention}, seed {seed})", quiet=not progress)
    t_train = time.perf_counter() - t0
    try:
        with cached_weights():     # the checkpoint's shards consolidated once for the K + 2·datasets passes
            losses = val_loss(run_dir, corpus, scale.mask_patterns)
            if bad := [n for n, v in losses.items() if not math.isfinite(v)]:
                raise NonFiniteLoss(f"validation loss is not finite on {', '.join(bad)}: {losses}")
            for name, cells in heldout.items():
                for pooling, suffix in POOLINGS.items():
                    embed(run_dir, cells, arm / "embeddings" / f"{name}{suffix}.h5ad", obsm_key=OBSM_KEY,
                          progress=False, pooling=pooling)
    except (NonFiniteLoss, NonFiniteEmbeddings) as e:   # recorded, not raised: the call goes on with the next arm
        r = {"attention": attention, "seed": seed, "failed": f"non-finite: {e}", "run_dir": str(run_dir),
             "seconds": round(time.perf_counter() - t0, 1), "provenance": provenance()}
        write_json(arm / FAILED, r)
        warnings.warn(f"arm {attention} seed {seed}: {r['failed']} (recorded in {arm / FAILED}; the next "
                      "--stage device call trains it again)", stacklevel=2)
        return r
    r = {"attention": attention, "seed": seed, "val_loss": losses, "train_seconds": round(t_train, 1),
         "seconds": round(time.perf_counter() - t0, 1), "run_dir": str(run_dir), "provenance": provenance(),
         "scale": dataclasses.asdict(scale)}
    write_json(done, r)
    return r


def unscored(attention: str, seed: int, arm: Path) -> str | None:
    """Why ``arm`` cannot be scored (not trained, or its training ended in non-finite values), or None."""
    if (arm / "trained.json").is_file():
        return None
    if (arm / FAILED).is_file():
        return read_json(arm / FAILED)["failed"]
    return f"not trained ({arm / 'trained.json'} is missing: run --stage device)"


def score_arm(attention: str, seed: int, scale: Scale, heldout: dict[str, Path], arm: Path, *, force: bool) -> dict:
    """The CPU half of an arm: scIB bio-conservation of ``arm/embeddings/`` (scanpy/scib) with the validation loss
    of ``arm/trained.json`` → ``arm/result.json``; reused unless ``force``."""
    from training.evaluate import evaluate

    done = arm / "result.json"
    if not force and (r := _reusable(done, scale)) is not None:
        return r
    trained = arm / "trained.json"
    if why := unscored(attention, seed, arm):
        raise FileNotFoundError(f"{trained}: arm {attention} seed {seed}: {why}")
    t = _require_budget(arm, read_json(trained), scale)     # never score another budget's model as this one
    t0 = time.perf_counter()
    metrics = {}
    for name in heldout:
        emb = arm / "embeddings" / f"{name}.h5ad"
        m = evaluate(emb, arm / "eval" / name, obsm_key=OBSM_KEY, label_key=LABEL_KEY, umap=False, seed=seed,
                     progress=False)
        metrics[name] = {k: m[k] for k, _ in METRICS if k in m} | {"val_loss": t["val_loss"][name],
                                                                   "n_cells": m["n_cells"]}
        for suffix in filter(None, POOLINGS.values()):      # arms trained before a pooling was added lack its file
            if (emb := arm / "embeddings" / f"{name}{suffix}.h5ad").is_file():
                m = evaluate(emb, arm / "eval" / f"{name}{suffix}", obsm_key=OBSM_KEY, label_key=LABEL_KEY,
                             umap=False, seed=seed, progress=False)
                metrics[name][f"bio_conservation{suffix}"] = m["bio_conservation"]
    r = {"attention": attention, "seed": seed, "metrics": metrics, "train_seconds": t["train_seconds"],
         "seconds": round(t["seconds"] + time.perf_counter() - t0, 1), "run_dir": t["run_dir"],
         "trained_on": t.get("provenance"), "scale": dataclasses.asdict(scale)}
    write_json(done, r)
    return r


def pca_arm(seed: int, heldout: dict[str, Path], arm: Path, scale: Scale) -> dict:
    from training.baseline import pca_baseline
    from training.evaluate import evaluate

    done = arm / "result.json"
    if (r := _reusable(done, scale)) is not None:
        return r
    metrics = {}
    for name, cells in heldout.items():
        emb = pca_baseline(cells, arm / name, seed=seed)
        m = evaluate(emb, arm / name / "eval", obsm_key="X_pca", label_key=LABEL_KEY, umap=False, seed=seed,
                     progress=False)
        metrics[name] = {k: m[k] for k, _ in METRICS if k in m} | {"n_cells": m["n_cells"]}
    r = {"attention": "PCA", "seed": seed, "metrics": metrics, "scale": dataclasses.asdict(scale)}
    write_json(done, r)
    return r


def aggregate(results: list[dict], datasets: list[str]) -> dict:
    """Per dataset and metric: mean ± CI per arm (sigmoid, softmax, untrained, PCA), the paired sigmoid − softmax,
    and the paired sigmoid − untrained (``training_gain``: the untrained arm is the sigmoid model's initial weights
    of the same seed)."""
    table = {}
    for name in datasets:
        table[name] = {}
        for key, _ in METRICS:
            per = {a: {r["seed"]: r["metrics"][name].get(key) for r in results if r["attention"] == a}
                   for a in (*ARMS, "PCA")}
            entry = {a: mean_ci([v for v in per[a].values() if v is not None]) | {"per_seed": per[a]}
                     for a in per if any(v is not None for v in per[a].values())}
            if all(a in entry for a in KINDS):
                entry["difference"] = paired_difference(per["sigmoid"], per["softmax"])
                soft = entry["softmax"]["mean"]
                entry["relative_difference_pct"] = (100 * entry["difference"]["mean"] / abs(soft)
                                                    if soft else None)
            if "sigmoid" in entry and UNTRAINED in entry:   # same seed, same initial weights: what training added
                entry["training_gain"] = paired_difference(per["sigmoid"], per[UNTRAINED])
            table[name][key] = entry
    return table


def _sig(d: dict) -> str:
    if d["ci_low"] is None:                     # one pair: no interval, so nothing to say about 0
        return "one seed: no interval"
    return "CI excludes 0" if d["ci_low"] > 0 or d["ci_high"] < 0 else "CI includes 0"


def verdict_line(table: dict) -> str:
    parts, gains = [], []
    for name, t in table.items():
        for key, label in (("bio_conservation", "bio-conservation"), ("val_loss", "val loss")):
            d = t.get(key, {}).get("difference")
            if d is None or d["mean"] is None:
                continue
            parts.append(f"{name} {label}: sigmoid − softmax = {fmt_ci(d, '+.4f')} "
                         f"({t[key]['relative_difference_pct']:+.1f} %, {_sig(d)})")
        for key, label in (("bio_conservation", "CLS"), ("bio_conservation_mean", "mean pooling")):
            d = t.get(key, {}).get("training_gain")
            if d is not None and d["mean"] is not None:
                gains.append(f"{name} {label} {fmt_ci(d, '+.4f')} ({_sig(d)})")
    sentences = ["; ".join(parts) + "."] if parts else []
    if gains:
        sentences.append("What training added to bio-conservation (sigmoid − its untrained initial weights): "
                         + "; ".join(gains) + ".")
    return " ".join(sentences)


def _measured(entry: dict) -> bool:
    return any(a in entry for a in (*ARMS, "PCA"))


def plot(table: dict, path: Path, title: str) -> Path:
    """Per-seed points (paired seeds joined by lines) with mean ± 95 % CI, one panel per dataset × metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    metrics = [(k, label) for k, label in METRICS if any(_measured(table[n][k]) for n in names)]
    colours = {"sigmoid": "tab:blue", "softmax": "tab:red", UNTRAINED: "tab:olive", "PCA": "tab:gray"}
    with plt.style.context("default"):
        fig, axes = plt.subplots(len(names), len(metrics), figsize=(3.1 * len(metrics), 3.0 * len(names)),
                                 squeeze=False)
        for i, name in enumerate(names):
            for j, (key, label) in enumerate(metrics):
                ax = axes[i][j]
                entry = table[name][key]
                arms = [a for a in (*ARMS, "PCA") if a in entry]
                for x, a in enumerate(arms):
                    seeds = sorted(entry[a]["per_seed"])
                    ys = [entry[a]["per_seed"][s] for s in seeds]
                    ax.scatter([x] * len(ys), ys, color=colours[a], s=18, alpha=0.8, zorder=3)
                    m, h = entry[a]["mean"], entry[a]["half_width"] or 0.0
                    ax.errorbar(x + 0.18, m, yerr=h, fmt="s", color=colours[a], capsize=4, ms=5)
                if all(a in entry for a in KINDS):
                    for s in entry["sigmoid"]["per_seed"]:
                        ys = [entry[a]["per_seed"].get(s) for a in KINDS]
                        if None not in ys:
                            ax.plot([0, 1], ys, color="0.6", lw=0.7, zorder=1)
                ax.set_xticks(range(len(arms)), arms, fontsize=8)
                ax.set_xlim(-0.5, len(arms) - 0.3)
                ax.set_title(f"{name}: {label}", fontsize=9)
                ax.grid(alpha=0.3, axis="y")
        fig.suptitle(title + "   (dots: seeds, joined when paired; squares: mean ± 95 % CI)", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return path


def _where(summary: dict) -> str:
    """Where the models were trained and where they were scored (the staged recipe does the two on different
    machines, possibly at different commits)."""
    p = summary["provenance"]
    trained = sorted({(t["device"], t["commit"]) for r in summary["results"] if (t := r.get("trained_on"))})
    here = f"device {p['device']}, commit `{p['commit']}`, {p['date']}"
    if not trained or trained == [(p["device"], p["commit"])]:
        return f"Run on {here}."
    return ("Trained on " + "; ".join(f"{d} (commit `{c}`)" for d, c in trained) + f"; scored on {here}.")


def markdown(summary: dict) -> str:
    s, sc = summary, summary["settings"]
    lines = [f"# Quality recipe ({s['scale_name']} scale)", "",
             f"`{sc['preset']}` preset, {len(sc['seeds'])} seeds per attention, each model {sc['steps']} steps × "
             f"{sc['batch_size']} cells × ≤ {sc['context']} genes (lr {sc['lr']:g}), on one corpus of "
             + ", ".join(f"{n} ({DATASETS[n].about}; {'at most ' + format(sc['max_cells'], ',') if sc['max_cells'] else 'all'} cells used)" for n in sc["datasets"])
             + f". Metrics on held-out cells (per-cell val split, {sc['val_frac']:.0%}); validation loss averaged over "
             f"{sc['mask_patterns']} fixed masking patterns. {_where(s)}", ""]
    for name, t in s["table"].items():
        lines += [f"## {name}", "", "| metric | sigmoid | softmax | untrained encoder | PCA (no training) "
                  "| sigmoid − softmax (paired) | relative | p | sigmoid − untrained (paired) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key, label in METRICS:
            e = t[key]
            if not _measured(e):                        # e.g. mean pooling of arms trained before it was added
                continue
            d = e.get("difference", {})
            rel = e.get("relative_difference_pct")
            lines.append(f"| {label} | {fmt_ci(e.get('sigmoid', {}), '.4f')} | {fmt_ci(e.get('softmax', {}), '.4f')} | "
                         f"{fmt_ci(e.get(UNTRAINED, {}), '.4f')} | {fmt_ci(e.get('PCA', {}), '.4f')} | "
                         f"{fmt_ci(d, '+.4f')} | "
                         f"{'–' if rel is None else format(rel, '+.1f') + ' %'} | "
                         f"{'–' if d.get('p_value') is None else format(d['p_value'], '.3g')} | "
                         f"{fmt_ci(e.get('training_gain', {}), '+.4f')} |")
        lines.append("")
    if s.get("not_scored"):
        lines += ["Not scored (each row's n says how many seeds it has):", "",
                  *[f"- {k}: {v}" for k, v in s["not_scored"].items()], ""]
    lines += ["Mean ± half-width of the 95 % Student-t interval over seeds; the difference is paired by seed. "
              "Higher is better except for the validation loss.", "", s["verdict"], "",
              f"![per-seed points]({s['plots'][0]})", "", f"Paper: {PAPER['claim']}. " + s["caveat"], ""]
    return "\n".join(lines)


STAGES = ("all", "prepare", "device", "host")


def _prepared(scale: Scale, out: Path) -> tuple[Path, dict[str, Path]]:
    """The corpus and held-out cells a ``prepare`` stage left in ``out`` (on a machine without the datasets)."""
    corpus = out / "corpus"
    heldout = {n: out / "heldout" / f"{n}.h5ad" for n in scale.datasets}
    missing = [str(p) for p in [corpus / "manifest.json", *heldout.values()] if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]} is missing: run --stage prepare into {out} first (on a machine with "
                                f"the datasets) and carry {out}/corpus and {out}/heldout along")
    return corpus, heldout


def run(scale_name: str, out: Path, *, scale: Scale, force: bool = False, progress: bool = True,
        stage: str = "all", arms: tuple[str, ...] = ARMS, gpus: int = 1) -> dict:
    """The recipe, or one ``stage`` of it for machines that hold only part of what it needs (the lent GPUs have
    neither the datasets' package nor scanpy): ``prepare`` (CPU: corpus + held-out cells), ``device`` (GPU:
    training, validation loss, embeddings; carries ``out/corpus`` and ``out/heldout`` in, ``out/arms`` back),
    ``host`` (CPU: scIB of the returned embeddings, PCA, statistics, report). ``all`` runs the three in turn.
    ``arms``: which of sigmoid, softmax and the untrained encoder this invocation trains and scores (a device
    call can train the untrained arms, ~45 s each on a GPU, apart from the trained ones). ``gpus``: arms trained
    at once, one per GPU (``training.reproduce.parallel``)."""
    from tqdm.auto import tqdm

    if stage not in STAGES:
        raise ValueError(f"--stage {stage!r}: choose one of {', '.join(STAGES)}")
    if unknown := [a for a in arms if a not in ARMS]:
        raise ValueError(f"--arms {' '.join(unknown)}: choose from {', '.join(ARMS)}")
    if len(set(scale.seeds)) != len(scale.seeds):
        raise ValueError(f"--seeds {list(scale.seeds)}: a seed is repeated")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if stage in ("all", "prepare"):
        corpus = build_corpus(scale, out, quiet=not progress)
        heldout = heldout_cells(corpus, out / "heldout", quiet=not progress)
        if stage == "prepare":
            return {"stage": "prepare", "corpus": str(corpus), "heldout": {n: str(p) for n, p in heldout.items()},
                    "verdict": f"prepared {corpus} and {len(heldout)} held-out datasets"}
    else:
        corpus, heldout = _prepared(scale, out)
    kinds = tuple(a for a in ARMS if a in arms)
    pairs = [(a, s) for s in scale.seeds for a in kinds]
    if stage in ("all", "device"):
        todo = [(a, s) for a, s in pairs          # an arm scored earlier has nothing to train
                if stage != "all" or force or _reusable(out / "arms" / f"{a}_seed{s}" / "result.json", scale) is None]
        on_gpus(functools.partial(train_arm, force=force, progress=progress and gpus == 1),
                [(a, s, scale, corpus, heldout, out / "arms" / f"{a}_seed{s}") for a, s in todo], gpus,
                desc="quality arms (train)", names=[f"{a}_seed{s}" for a, s in todo], progress=progress)
    # Arms another call has still to train (or that failed) are listed in the report, not scored; none: an error.
    missing = {f"{a}_seed{s}": why for a, s in pairs if (why := unscored(a, s, out / "arms" / f"{a}_seed{s}"))}
    if stage == "device":
        return {"stage": "device", "arms": [f"{a}_seed{s}" for a, s in pairs], "failed": missing,
                "verdict": f"trained {len(pairs) - len(missing)} models into {out / 'arms'}; score them with "
                           "--stage host" + "".join(f"\nFAILED {k}: {v}" for k, v in missing.items())}
    if len(missing) == len(pairs):
        a, s = pairs[0]
        raise FileNotFoundError(f"no arm to score: {a} seed {s}: {missing[f'{a}_seed{s}']}")
    results = [score_arm(a, s, scale, heldout, out / "arms" / f"{a}_seed{s}", force=force)
               for a, s in tqdm(pairs, desc="quality arms (score)", unit="model", disable=not progress)
               if f"{a}_seed{s}" not in missing]
    for s in scale.seeds:
        results.append(pca_arm(s, heldout, out / "arms" / f"pca_seed{s}", scale))
    table = aggregate(results, list(heldout))
    caveat = ("Demo scale on a CPU (a tiny model trained for seconds, far behind PCA) says nothing about the "
              "paper's claim: it checks the recipe and its statistics end to end." if scale_name == "demo" else
              "A short single-GPU budget per model, not the paper's pre-training on ~130M cells.")
    summary = {"recipe": "quality", "scale_name": scale_name, "settings": dataclasses.asdict(scale), "arms": list(kinds),
               "provenance": provenance(), "datasets": {n: DATASETS[n].about for n in scale.datasets},
               "heldout_cells": {n: str(p) for n, p in heldout.items()}, "results": results, "not_scored": missing,
               "table": table,
               "verdict": verdict_line(table), "paper": PAPER, "caveat": caveat, "plots": ["quality.png"],
               "seconds": round(time.perf_counter() - t0, 1)}
    plot(table, out / "quality.png", f"{scale.preset}, {len(scale.seeds)} seeds"
         + (f" (not scored: {', '.join(missing)})" if missing else ""))
    write_json(out / "summary.json", summary)
    write_text(out / "report.md", markdown(summary))
    return json.loads(json.dumps(summary, default=str))

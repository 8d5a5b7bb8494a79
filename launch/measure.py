"""Measured training throughput of a preset on the local device: a few real ``Trainer`` steps, warm-up excluded.

The trainer is the one ``launch.submit`` runs (``training.trainer.Trainer``: DeepSpeed engine, the
preset's ZeRO stage, precision and activation checkpointing) on synthetic cells whose expressed-gene
count (mean ``2·context``, see ``training.synthetic``) fills the context, so nearly every cell is
``context`` tokens. The micro-batch keeps the preset's tokens per micro-batch
(``batch·context_preset / context``); on out-of-memory it is halved and retried. Step times come from
the trainer's per-step records (``cells_per_s``, ``tokens_per_s``, ``mem_gb``) through its callback
hook; the measurement stops by an exception from the callback before the final checkpoint is written.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
from dataclasses import dataclass


class _Done(Exception):
    """Raised from the trainer callback once enough steps are timed."""


@dataclass(frozen=True)
class Measurement:
    size: str
    context: int
    attention: str
    batch_size: int
    cells_per_s: float       # per GPU, median over timed steps
    tokens_per_s: float
    tokens_per_cell: float
    mem_gb: float
    steps: int


def measure(size: str, context: int, attention: str, *, warmup_steps: int = 3, timed_steps: int = 5,
            batch_size: int | None = None, extra_overrides: list[str] = ()) -> Measurement:
    """Time ``timed_steps`` training steps after ``warmup_steps``; halve the micro-batch on OOM."""
    import torch

    from launch.configs import resolve_config
    from launch.model_size import model_size
    from training.config import load_config
    from training.presets import NOMINAL_VOCAB
    from training.trainer import Trainer

    m = model_size(size)
    bs = batch_size or max(1, m.batch_size * m.context // context)
    while True:
        records: list[dict] = []

        def collect(trainer, record):
            records.append(record)
            if len(records) >= warmup_steps + timed_steps:
                raise _Done

        with tempfile.TemporaryDirectory(prefix="sigattn-measure-") as run_dir:
            cfg = load_config(resolve_config(size), [
                f"model.attention={attention}", "data.mds=null", f"data.context_length={context}",
                f"data.batch_size={bs}", f"data.synthetic_vocab={NOMINAL_VOCAB}",
                f"data.synthetic_mean_genes={min(2 * context, NOMINAL_VOCAB // 2)}", f"run.dir={run_dir}",
                f"run.max_steps={warmup_steps + timed_steps + 10}", "run.ckpt_every=1000000",
                "optim.warmup_steps=1", "run.progress=false",
                "run.tensorboard=false", "run.nan_policy=skip", *extra_overrides])
            trainer = None
            try:
                trainer = Trainer(cfg, callbacks=[collect])
                trainer.train()
                raise RuntimeError(f"{size}/{context}/{attention}: trainer finished before {len(records)} steps")
            except _Done:
                pass
            except torch.OutOfMemoryError:
                if bs == 1:
                    raise
                bs //= 2
                continue
            finally:
                del trainer
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        timed = [r for r in records[warmup_steps:] if r.get("cells_per_s")]
        if not timed:
            raise RuntimeError(f"{size}/{context}/{attention}: no timed step had a loss (all skipped)")
        cps = statistics.median(r["cells_per_s"] for r in timed)
        tps = statistics.median(r["tokens_per_s"] for r in timed)
        return Measurement(size=size, context=context, attention=attention, batch_size=bs, cells_per_s=cps,
                           tokens_per_s=tps, tokens_per_cell=tps / cps, mem_gb=max(r["mem_gb"] for r in timed),
                           steps=len(timed))

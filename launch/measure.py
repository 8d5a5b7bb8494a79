"""Measured training throughput of a preset on the local device: a few real ``Trainer`` steps, warm-up excluded.

The trainer is the one ``launch.submit`` runs (``training.trainer.Trainer``: DeepSpeed engine, the
preset's ZeRO stage, precision and activation checkpointing) on synthetic cells whose expressed-gene
count (mean ``2·context``, see ``training.synthetic``) fills the context, so nearly every cell is
``context`` tokens. The micro-batch keeps the preset's tokens per micro-batch
(``batch·context_preset / context``); on out-of-memory it is halved and retried. Each attempt runs in a
fresh spawned process, so a failed attempt's DeepSpeed engine, CUDA memory and process group die with it
(an in-process retry inherits them). ``world_size`` W > 1 runs data parallel over W local GPUs (W spawned ranks
on one host, NCCL; gloo on CPU): the same per-GPU micro-batch, ``tokens_per_s``/``cells_per_s`` the global
figures and ``*_per_gpu`` them ÷ W (the trainer reduces its counts over ranks), so rows of several W compare the
per-GPU rate (data-parallel scaling); the ranks carry ``LOCAL_WORLD_SIZE`` = W, so each gets ⌊cores/W⌋ intra-op
threads (``training.distributed.share_host_threads``) and mosaicml-streaming knows its node's ranks. No OOM retry
there: a rank out of memory fails the measurement. Step times come from the trainer's per-step records
(``cells_per_s``, ``tokens_per_s``, ``mfu``, ``mem_gb`` = this process's peak) through its callback hook; the
measurement stops by an exception from the callback before the final checkpoint is written.
"""

from __future__ import annotations

import multiprocessing
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

OOM = "out of memory"


class DoesNotFit(RuntimeError):
    """Out of device memory even at micro-batch 1."""


class _Done(Exception):
    """Raised from the trainer callback once enough steps are timed."""


@dataclass(frozen=True)
class Measurement:
    size: str
    context: int
    attention: str
    batch_size: int
    cells_per_s: float       # all ranks together (one GPU: per GPU), median over timed steps
    tokens_per_s: float
    tokens_per_cell: float
    mem_gb: float
    steps: int
    mfu: float | None = None   # median model FLOPs utilisation (None on CPU)
    loss_first: float | None = None
    loss_last: float | None = None
    world_size: int = 1
    cells_per_s_per_gpu: float | None = None
    tokens_per_s_per_gpu: float | None = None


def own_rendezvous() -> None:
    """In a spawned one-process measurement: drop a rendezvous inherited from the parent (e.g. a trainer built
    earlier in the same pytest or notebook process, whose store may still hold MASTER_PORT), so the trainer starts
    its own. Ranks of a data-parallel measurement (WORLD_SIZE > 1) keep theirs."""
    import os

    if os.environ.get("WORLD_SIZE", "1") == "1":
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(var, None)


def trainer_config(size: str, context: int, attention: str, bs: int, steps: int, extra_overrides, run_dir):
    """The measured trainer's config: the preset, synthetic cells filling ``context``, no checkpoints, no logs."""
    from launch.configs import resolve_config
    from training.config import load_config
    from training.presets import NOMINAL_VOCAB

    return load_config(resolve_config(size), [
        f"model.attention={attention}", "data.mds=null", f"data.context_length={context}",
        f"data.batch_size={bs}", f"data.synthetic_vocab={NOMINAL_VOCAB}",
        f"data.synthetic_mean_genes={min(2 * context, NOMINAL_VOCAB // 2)}", f"run.dir={run_dir}",
        f"run.max_steps={steps + 10}", "run.ckpt_every=1000000",
        "optim.warmup_steps=1", "run.progress=false",
        "run.tensorboard=false", "run.nan_policy=skip", *extra_overrides])


def _attempt(size: str, context: int, attention: str, bs: int, steps: int, extra_overrides: list[str]):
    """Child process: run ``steps`` trainer steps at micro-batch ``bs``; return their records, or ``OOM``."""
    import torch

    own_rendezvous()

    from training.trainer import Trainer

    records: list[dict] = []

    def collect(trainer, record):
        records.append(record)
        if len(records) >= steps:
            raise _Done

    with tempfile.TemporaryDirectory(prefix="sigattn-measure-") as run_dir:
        cfg = trainer_config(size, context, attention, bs, steps, extra_overrides, run_dir)
        try:
            with Trainer(cfg, callbacks=[collect]) as trainer:
                trainer.train()
        except _Done:
            return records
        except torch.OutOfMemoryError:
            return OOM
    raise RuntimeError(f"{size}/{context}/{attention}: trainer finished before {len(records)} steps")


def _rank(rank: int, world: int, port: int, args: tuple, out) -> None:
    """One rank of a data-parallel measurement (spawned): rank 0 puts its records (or the error) on ``out``."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        records = _attempt(*args)
    except BaseException as e:  # noqa: BLE001 - reported by rank 0's queue
        if rank == 0:
            out.put(f"{type(e).__name__}: {e}")
        raise
    if rank == 0:
        out.put(records)


def _data_parallel(world: int, args: tuple):
    """Run ``_attempt(*args)`` on ``world`` local ranks; rank 0's records."""
    import torch.multiprocessing as mp

    from training.ports import free_port

    port = free_port()
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_rank, args=(world, port, args, out), nprocs=world, join=True, start_method="spawn")
    res = out.get()
    if isinstance(res, str):
        raise RuntimeError(f"data-parallel measurement over {world} ranks failed: {res}")
    return res


def measure(size: str, context: int, attention: str, *, warmup_steps: int = 3, timed_steps: int = 5,
            batch_size: int | None = None, extra_overrides: list[str] = (), world_size: int = 1) -> Measurement:
    """Time ``timed_steps`` training steps after ``warmup_steps``; halve the micro-batch on OOM (one process);
    ``world_size`` > 1: data parallel over that many local devices (see the module docstring)."""
    from launch.model_size import model_size

    m = model_size(size)
    bs = batch_size or max(1, m.batch_size * m.context // context)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    while world_size == 1:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            records = pool.submit(_attempt, size, context, attention, bs, warmup_steps + timed_steps,
                                  list(extra_overrides)).result()
        if records != OOM:
            break
        if bs == 1:
            raise DoesNotFit(f"{size}/{context}/{attention}: out of memory at micro-batch 1")
        bs //= 2
    if world_size > 1:
        records = _data_parallel(world_size, (size, context, attention, bs, warmup_steps + timed_steps,
                                              list(extra_overrides)))
        if records == OOM:
            raise DoesNotFit(f"{size}/{context}/{attention}: out of memory at micro-batch {bs} on {world_size} ranks")
    timed = [r for r in records[warmup_steps:] if r.get("cells_per_s")]
    if not timed:
        raise RuntimeError(f"{size}/{context}/{attention}: no timed step had a loss (all skipped)")
    cps = statistics.median(r["cells_per_s"] for r in timed)
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    return Measurement(size=size, context=context, attention=attention, batch_size=bs, cells_per_s=cps,
                       tokens_per_s=tps, tokens_per_cell=tps / cps, mem_gb=max(r["mem_gb"] for r in timed),
                       steps=len(timed), mfu=statistics.median(mfus) if mfus else None,
                       loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None,
                       world_size=world_size, cells_per_s_per_gpu=cps / world_size,
                       tokens_per_s_per_gpu=tps / world_size)

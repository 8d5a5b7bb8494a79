"""The callable submitit runs in every task: distributed env → trainer → stop on signal → requeue.

One task per GPU. Each task exports the torch.distributed environment from submitit's job environment
(``TorchDistributedEnvironment().export(set_cuda_visible_devices=False)``: DeepSpeed picks the device
from ``LOCAL_RANK``, so every task keeps all GPUs of its node visible), builds the trainer through the
entry point ``module:function`` (``function(config, overrides) -> Trainer``), installs
``StopOnSignal`` and calls ``trainer.train()``.

When ``train()`` returns ``"stopped"`` (the warning signal arrived, every rank saved collectively), the
stop was not a ``launch cancel`` (see :func:`cancel_marker`) and fewer than ``max_requeues`` requeues were
used, all ranks meet at a barrier, rank 0 requeues the job through submitit's job environment (``scontrol requeue`` on Slurm, exit code 144 for the local
executor) and every rank exits without writing a result, so the job is not seen as finished. The
requeued job runs this same callable again and the trainer resumes from ``checkpoints/latest``.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from launch.preemption import StopOnSignal
from training.ports import RENDEZVOUS_PORTS

log = logging.getLogger(__name__)

DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
DEFAULT_ENTRY = "launch.trainer_entry:build_trainer"
# Rendezvous ports lie below Linux's default ephemeral range (training.ports). submitit's own pick (20000–60000, seeded
# by the job id) can land on a port the kernel has just given to an outgoing connection on the master node, and
# init_distributed then fails with EADDRINUSE now and then.


def rendezvous_port(job_id: str) -> int:
    """The MASTER_PORT of a Slurm job: the same on every task and node (derived from the job id alone), outside the
    ephemeral range; array tasks ("123_4") get different ports."""
    return RENDEZVOUS_PORTS[zlib.crc32(str(job_id).encode()) % len(RENDEZVOUS_PORTS)]


def load_entry(entry: str) -> Callable[..., Any]:
    """Import ``"package.module:function"``; a clear error when either part is missing."""
    module_name, sep, attr = entry.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"entry must look like 'package.module:function', got {entry!r}")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"entry {entry!r}: module {module_name} has no attribute {attr!r}") from None


@dataclass
class TrainJob:
    """Picklable job body; the same object runs again after each requeue."""

    config: str
    overrides: list[str] = field(default_factory=list)
    entry: str = DEFAULT_ENTRY
    max_requeues: int = 3
    master_port: int | None = None  # local executor: a port the submitter found free (else rendezvous_port)

    def __call__(self) -> str:
        import submitit

        env = submitit.JobEnvironment()
        for var in DIST_VARS:  # inherited from the submitting shell (sbatch exports it): Slurm's values must win
            os.environ.pop(var, None)
        # Read by TorchDistributedEnvironment below; the same for every task.
        os.environ["MASTER_PORT"] = str(self.master_port if self.master_port is not None else rendezvous_port(env.job_id))
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{env.global_rank} %(name)s: %(message)s")
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        stopper = StopOnSignal().install()  # replaces submitit's rank-0-only USR2 handler, on every rank
        trainer = load_entry(self.entry)(self.config, list(self.overrides))
        stopper.attach(trainer)
        status = trainer.train()
        log.info("rank %s: train() returned %r", env.global_rank, status)
        if status != "stopped":
            _finish_distributed()
            return status
        if cancel_marker(env.paths.folder, env.job_id).exists():  # scancel's SIGTERM, not a preemption
            log.warning("stopped by launch cancel: checkpoint saved, not requeued")
            _finish_distributed()
            return "cancelled"
        used = _requeues_used(env)
        if used >= self.max_requeues:
            log.warning("stopped with a checkpoint; not requeued: %d/%d requeues used", used, self.max_requeues)
            _finish_distributed()
            return status
        _barrier()  # everyone has saved before the job is requeued (and killed)
        _finish_distributed()
        if env.global_rank == 0:
            _record_requeue(env, used + 1)
            log.warning("requeueing job %s (%d/%d)", env.job_id, used + 1, self.max_requeues)
            env._requeue(self.max_requeues - used - 1)  # submitit's per-cluster requeue (scontrol / exit 144)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0 if env.global_rank else 1)  # no result pickle: the job is not finished


def cancel_marker(job_folder: str | os.PathLike, job_id: str) -> Path:
    """Written by ``launch cancel`` before it signals a job. SIGTERM also announces a preemption, so a
    job stopped by it requeues itself unless this file says the stop was a cancel."""
    return Path(job_folder) / f"{job_id}_cancel_requested"


def _counter_file(env) -> Path:
    return Path(env.paths.folder) / f"{env.job_id}_requeues.json"


def _requeues_used(env) -> int:
    """Requeues so far: Slurm's ``SLURM_RESTART_COUNT`` when set, else our counter in the job folder."""
    if "SLURM_RESTART_COUNT" in os.environ:
        return int(os.environ["SLURM_RESTART_COUNT"])
    f = _counter_file(env)
    return int(json.loads(f.read_text())["requeues"]) if f.exists() else 0


def _record_requeue(env, n: int) -> None:
    f = _counter_file(env)
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps({"requeues": n}))
    tmp.replace(f)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _finish_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

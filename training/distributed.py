"""Process-group set-up for torchrun, the deepspeed launcher, Slurm, or a single process.

Order: RANK/WORLD_SIZE already set (torchrun, deepspeed launcher) → used as is (the deepspeed
launcher's LOCAL_SIZE is copied to LOCAL_WORLD_SIZE for mosaicml-streaming); else inside a
Slurm job (SLURM_PROCID) → ``submitit.helpers.TorchDistributedEnvironment().export()`` derives
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT (without touching CUDA_VISIBLE_DEVICES, which would
break DeepSpeed's LOCAL_RANK device choice); else a one-process group on a free local port.
Without CUDA, ``DS_ACCELERATOR=cpu`` is set before DeepSpeed is imported (gloo backend).
Host threads: W ranks on one host that each see every core would each run an all-core intra-op pool
(oversubscribed: 4 ranks on a 64-core 4-GPU host measured 0.72× one GPU's per-GPU rate, 1.015× with 16 threads
each); ``share_host_threads`` gives each of the node's ``LOCAL_WORLD_SIZE`` ranks ⌊cores/W⌋, unless
``OMP_NUM_THREADS`` is set (torchrun sets 1) or a launcher already bound the rank to fewer cores (Slurm's
``--cpus-per-task``).
"""

from __future__ import annotations

import os

import torch

from training.ports import free_port


def export_env() -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT where no launcher did."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", "0")
        # The deepspeed launcher says LOCAL_SIZE; mosaicml-streaming reads LOCAL_WORLD_SIZE (else it
        # takes every rank for its own node's leader and they collide on shared memory).
        if "LOCAL_SIZE" in os.environ:
            os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ["LOCAL_SIZE"])
        return
    if "SLURM_PROCID" in os.environ and "SLURM_JOB_ID" in os.environ:
        import submitit
        # submitit picks its job environment from SUBMITIT_EXECUTOR (set by submitit jobs; a plain
        # sbatch/srun step has only the SLURM_* variables).
        os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def host_threads(local_world: int, cores: int) -> int:
    """Intra-op threads for one of ``local_world`` ranks sharing ``cores`` cores: ⌊cores/local_world⌋, at least 1."""
    return max(1, cores // max(1, local_world))


def share_host_threads() -> int | None:
    """Set this rank's intra-op threads to ``host_threads(LOCAL_WORLD_SIZE, cores)`` where the rank sees every core
    and no ``OMP_NUM_THREADS`` is given; return the count set, or None where nothing was changed."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    if local <= 1 or os.environ.get("OMP_NUM_THREADS"):
        return None
    total = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
    if usable < total:       # bound to its own cores by the launcher: already shared
        return None
    n = host_threads(local, usable)
    torch.set_num_threads(n)
    return n


def init_distributed() -> tuple[int, int, torch.device]:
    """Export the environment, share the host's cores among its ranks, start the process group; return
    (rank, world_size, device)."""
    export_env()
    share_host_threads()
    import deepspeed
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def shutdown() -> None:
    """Destroy the process group through DeepSpeed, which also drops the groups it cached (world clone, mpu,
    sequence-parallel groups); a later trainer in the same process would otherwise meet dead group objects
    ("Group ... is not registered")."""
    if not torch.distributed.is_initialized():
        return
    import sys
    if "deepspeed" in sys.modules:
        import deepspeed.comm as ds_comm
        if ds_comm.is_initialized():
            ds_comm.destroy_process_group()
            return
    torch.distributed.destroy_process_group()

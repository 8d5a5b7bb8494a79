"""Entry point: ``python -m training.train CONFIG.yaml [section.key=value ...]``.

Works as a single process, under ``torchrun``/the ``deepspeed`` launcher, or in a Slurm step
(see :mod:`training.distributed`). SIGTERM/SIGUSR1 (Slurm pre-emption) call
``Trainer.request_stop()``: every rank checkpoints at the end of the step and the run exits 0;
``sbatch --requeue`` then resumes from ``latest``. Exit code 1 on a non-finite loss under
``nan_policy: stop`` and on a resume whose overrides change what the checkpoint means.
"""

from __future__ import annotations

import argparse
import signal
import sys

from training.config import load_config
from training.distributed import shutdown


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.splitlines()[0])
    p.add_argument("config", help="YAML config (see training/configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. run.zero_stage=2 optim.grad_clip=null")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment is what is used.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))

    from training.checkpoint import ResumeConfigError
    from training.trainer import NonFiniteError, Trainer
    try:
        trainer = Trainer(cfg)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, lambda *_: trainer.request_stop())
        status = trainer.train()
        if trainer.rank == 0:
            print(f"[sigattn] {status} at step {trainer.step} → {cfg.run.dir}", flush=True)
        return 0
    except (NonFiniteError, ResumeConfigError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())

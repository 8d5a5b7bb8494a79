"""Turn Slurm's warning signal into a collective, checkpointed stop on every rank.

Slurm delivers ``--signal=USR2@T`` to every task of the job, while submitit's own handler checkpoints on
rank 0 only; DeepSpeed saves are collective, so each rank instead installs ``StopOnSignal``, which calls
``trainer.request_stop()``. The trainer all-reduces that flag each step, so every rank stops after the
same step and joins the collective save. A signal that arrives before the trainer exists is remembered
and forwarded as soon as ``attach(trainer)`` is called.
"""

from __future__ import annotations

import logging
import signal
from typing import Protocol

log = logging.getLogger(__name__)


class Stoppable(Protocol):
    def request_stop(self) -> None: ...


class StopOnSignal:
    """Signal handler (installed with ``install()``) that requests a stop of the attached trainer."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGUSR2, signal.SIGTERM)):
        self.signals = signals
        self.received: signal.Signals | None = None
        self._trainer: Stoppable | None = None

    def install(self) -> "StopOnSignal":
        for sig in self.signals:
            signal.signal(sig, self._handle)
        return self

    def attach(self, trainer: Stoppable) -> None:
        self._trainer = trainer
        if self.received is not None:
            trainer.request_stop()

    @property
    def stop_requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002 (signal handler signature)
        if self.received is None:
            log.warning("caught %s: stopping after the current step, checkpointing, then requeueing",
                        signal.Signals(signum).name)
        self.received = signal.Signals(signum)
        if self._trainer is not None:
            self._trainer.request_stop()

"""The trainer of the stability recipe: sigattn's ``Trainer`` with a :class:`StabilityMonitor` attached.

Also a ``launch.submit --entry training.reproduce.entry:build_trainer`` entry point, so the cluster sweep logs
the same ``stability.jsonl`` as a local run. A non-finite loss or gradient norm (``nan_policy=stop``) is
written to the log as a record with ``loss: null, nonfinite: true`` before the error propagates.
"""

from __future__ import annotations

from training.config import load_config as _load_config
from training.reproduce.monitor import StabilityMonitor
from training.trainer import NonFiniteError, Trainer


class MonitoredTrainer(Trainer):
    def __init__(self, cfg, callbacks=()):
        super().__init__(cfg, callbacks)
        self.monitor = StabilityMonitor(self.engine.module, self.run_dir / "stability.jsonl", rank=self.rank)
        self.callbacks.append(self.monitor)

    def train(self) -> str:
        try:
            return super().train()
        except NonFiniteError:
            self.monitor.nonfinite(self.step + 1)
            raise

    def close(self) -> None:
        monitor = getattr(self, "monitor", None)
        if monitor is not None:
            monitor.remove()
        super().close()


def load_config(config: str, overrides: list[str]):
    return _load_config(config, overrides)


def build_trainer(config: str, overrides: list[str]) -> MonitoredTrainer:
    return MonitoredTrainer(load_config(config, overrides))

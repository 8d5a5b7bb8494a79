"""The default job entry: sigattn's DeepSpeed trainer built from ``CONFIG`` + dotted overrides.

``launch.job.TrainJob`` calls ``build_trainer(config, overrides)`` in every task;
``launch.configs.check_overrides`` calls ``load_config`` before submitting, so a bad key or value
fails on the login node with the trainer's own message.
"""

from __future__ import annotations


def load_config(config: str, overrides: list[str]):
    from training.config import load_config as _load

    return _load(config, overrides)


def build_trainer(config: str, overrides: list[str]):
    from training.trainer import Trainer

    return Trainer(load_config(config, overrides))

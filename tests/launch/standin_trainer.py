"""A small stand-in for ``training.train.build_trainer`` with the trainer contract of docs/CONTRACTS.md.

``build_trainer(config_yaml, overrides) -> Trainer``; ``Trainer.request_stop()`` sets a flag that is
all-reduced (MAX) every step; when set, every rank takes part in the checkpoint save and ``train()``
returns ``"stopped"``; a new trainer resumes from ``checkpoints/latest``. Data-parallel linear
regression over gloo: the batch of (step, rank) is drawn from a generator seeded by both, so the data
position is the step and a resumed run reproduces an uninterrupted run's per-step losses exactly.
Rank 0 appends ``{"step", "loss"}`` to ``metrics.jsonl``; ``train.sleep_s`` slows steps for signal tests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import yaml


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    for o in overrides:
        key, sep, value = o.partition("=")
        if not sep:
            raise ValueError(f"override {o!r} is not key=value")
        node, *path = cfg, *key.split(".")
        for k in path[:-1]:
            if k not in node:
                raise KeyError(f"unknown config key {key!r}")
            node = node[k]
        if path[-1] not in node:
            raise KeyError(f"unknown config key {key!r}")
        node[path[-1]] = yaml.safe_load(value)
    return cfg


def build_trainer(config: str, overrides: list[str]) -> "Trainer":
    cfg = apply_overrides(yaml.safe_load(Path(config).read_text()), overrides)
    return Trainer(cfg)


class Trainer:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.run_dir = Path(cfg["run"]["dir"])
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(cfg["train"]["seed"])
        self.model = torch.nn.Linear(8, 1)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg["train"]["lr"])
        self.step = 0
        self._stop = False
        latest = self.run_dir / "checkpoints" / "latest"
        if latest.exists():
            state = torch.load(self.run_dir / "checkpoints" / latest.read_text().strip() / "state.pt")
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["opt"])
            self.step = state["step"]
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))

    def request_stop(self) -> None:
        self._stop = True

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.cfg["train"]["seed"] * 100_003 + step * 64 + self.rank)
        x = torch.randn(16, 8, generator=g)
        return x, x.sum(1, keepdim=True) * 0.5 + 0.1 * torch.randn(16, 1, generator=g)

    def _save(self) -> None:
        tag = f"step{self.step:06d}"
        if self.rank == 0:
            d = self.run_dir / "checkpoints" / tag
            d.mkdir(parents=True, exist_ok=True)
            torch.save({"model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": self.step},
                       d / "state.pt")
            tmp = self.run_dir / "checkpoints" / "latest.tmp"
            tmp.write_text(tag)
            tmp.replace(self.run_dir / "checkpoints" / "latest")
        dist.barrier()

    def train(self) -> str:
        import time

        total, sleep_s = self.cfg["train"]["steps"], self.cfg["train"]["sleep_s"]
        while self.step < total:
            flag = torch.tensor([float(self._stop)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0:
                self._save()
                return "stopped"
            x, y = self._batch(self.step)
            loss = torch.nn.functional.mse_loss(self.model(x), y)
            self.opt.zero_grad()
            loss.backward()
            for p in self.model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= self.world
            self.opt.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            self.step += 1
            if self.rank == 0:
                with open(self.run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"step": self.step, "loss": mean.item() / self.world,
                                        "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0))}) + "\n")
            time.sleep(sleep_s)
        self._save()
        return "finished"


def load_config(config: str, overrides: list[str]) -> dict:
    """Resolved config; raises ``KeyError``/``ValueError`` for a bad override (used by launch's validation)."""
    return apply_overrides(yaml.safe_load(Path(config).read_text()), overrides)

"""Checkpoints: DeepSpeed save/load, an atomic ``latest`` pointer, keep-last-K, inference loading.

Layout under ``<run.dir>/checkpoints/``: one DeepSpeed tag dir per save (``step_00000100/``: model,
ZeRO optimizer and LR-scheduler states; ``client_state`` with the step, counters and the data
loader's ``state_dict``; ``rng_rank<r>.pt`` with each rank's torch/numpy/python RNG states) and the
file ``latest`` holding the newest complete tag. ``latest`` is written to a temporary file and
``os.replace``-d after every rank has finished writing, so a run killed at any moment resumes from
a complete checkpoint; older tags beyond ``keep_last`` are then removed.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """Tag named by ``ckpt_dir/latest``, or None when there is no complete checkpoint."""
    p = Path(ckpt_dir) / LATEST
    if not p.is_file():
        return None
    tag = p.read_text().strip()
    if not (Path(ckpt_dir) / tag).is_dir():
        raise FileNotFoundError(f"{p} names {tag!r}, which does not exist in {ckpt_dir}")
    return tag


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, ckpt_dir: str | Path, step: int, client_state: dict, keep_last: int) -> str:
    """Collective save of ``step``; then rank 0 moves ``latest`` and prunes old tags."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    rank = dist.get_rank()
    torch.save(rng_state(), ckpt_dir / tag / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        _write_atomic(ckpt_dir / LATEST, tag)
        tags = sorted(p.name for p in ckpt_dir.glob("step_*") if p.is_dir())
        for old in tags[:-keep_last] if keep_last > 0 else []:
            if old != tag:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    dist.barrier()
    return tag


def resume(engine, ckpt_dir: str | Path) -> dict | None:
    """Load the ``latest`` checkpoint into ``engine``; return its client state (None: nothing to resume)."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir}/{tag}")
    rng_file = Path(ckpt_dir) / tag / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client


def _run_dir(path: Path) -> Path:
    for p in (path, path.parent, path.parent.parent):
        if (p / "config.yaml").is_file():
            return p
    raise FileNotFoundError(f"no config.yaml found at or above {path} (expected a run dir or a checkpoint in one)")


def load_for_inference(path: str | Path, device: str | torch.device = "cpu"):
    """``(model, cfg, tokenizer)`` from a run dir, its ``checkpoints/`` dir or one tag dir.

    Weights are consolidated to fp32 with DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``
    (any ZeRO stage); the model is returned in eval mode on ``device``.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from data_prep.tokenize import N_SPECIAL, CellTokenizer
    from training.config import load_config
    from training.encoder import build_model

    path = Path(path)
    run_dir = _run_dir(path)
    cfg = load_config(run_dir / "config.yaml")
    if (path / LATEST).is_file() or path == run_dir:
        ckpt_dir = path if (path / LATEST).is_file() else run_dir / "checkpoints"
        tag = latest_tag(ckpt_dir)
        if tag is None:
            raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
    else:
        ckpt_dir, tag = path.parent, path.name
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    model = build_model(cfg.model)
    model.load_state_dict(state)
    d = cfg.data
    tokenizer = CellTokenizer(cfg.model.n_tokens - N_SPECIAL, d.context_length, d.n_bins, cfg.run.seed, d.gene_selection)
    return model.to(device).eval(), cfg, tokenizer

"""Checkpoints: DeepSpeed save/load, an atomic ``latest`` pointer, keep-last-K, the config each
checkpoint was trained with, inference loading.

Layout under ``<run.dir>/checkpoints/``: one DeepSpeed tag dir per save (``step_00000100/``: model,
ZeRO optimizer and LR-scheduler states; ``client_state`` with the step, counters and the data
loader's ``state_dict``; ``rng_rank<r>.pt`` with each rank's torch/numpy/python RNG states;
``config.yaml``, the resolved config it was trained with, and ``corpus.json``, the identity of its
corpus) and the file ``latest`` holding the newest complete tag. ``latest`` is written to a temporary
file and ``os.replace``-d after every rank has finished writing, so a run killed at any moment resumes
from a complete checkpoint; older tags beyond ``keep_last`` are then removed.

Resume with other settings (:func:`check_resume`): a key in :data:`RESUMABLE` (steps, logging,
checkpointing, ZeRO stage, precision, optimizer, micro-batch) may change and the change is reported;
any other change alters what the checkpoint means — its tokenizer (vocabulary, context, bins, gene
selection, seed), its corpus, objective (mask ratio) or architecture — and is refused, naming the keys.
The corpus is compared by the build fingerprint in its ``manifest.json``, so a corpus copied elsewhere
resumes and one rebuilt in place with other inputs or options does not.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"
CONFIG = "config.yaml"
CORPUS = "corpus.json"

# Keys that may differ between a checkpoint's config and the config that resumes it (reported, allowed).
RESUMABLE = frozenset({
    "run.dir", "run.max_steps", "run.ckpt_every", "run.keep_last", "run.log_every", "run.log_cell_ids",
    "run.tensorboard", "run.progress", "run.nan_policy", "run.zero_stage", "run.precision", "run.compile",
    "data.num_workers", "data.batch_size", "model.activation_checkpointing", "parallel.context_parallel_chunks",
    "parallel.context_parallel_exchange", "run.prefetch",
}) | {f"optim.{k}" for k in ("lr", "weight_decay", "betas", "eps", "warmup_steps", "min_lr_ratio", "grad_clip",
                               "grad_accum", "device_skip")}


class ResumeConfigError(ValueError):
    """A resume whose config changes what the checkpoint means (tokenizer, corpus, objective, model)."""


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


def corpus_id(mds: str | None) -> str | None:
    """The corpus's build fingerprint (``manifest.json``), else its path (None: synthetic cells)."""
    if mds is None:
        return None
    manifest = Path(mds) / "manifest.json"
    if manifest.is_file():
        fp = json.loads(manifest.read_text()).get("fingerprint")
        if fp:
            return f"fingerprint {fp}"
    return f"path {mds}"


def save_config(tag_dir: Path, cfg) -> None:
    """Write the config ``tag_dir`` was trained with, and its corpus identity."""
    cfg.save(tag_dir / CONFIG)
    (tag_dir / CORPUS).write_text(json.dumps({"mds": cfg.data.mds, "id": corpus_id(cfg.data.mds)}) + "\n")


def save(engine, ckpt_dir: str | Path, step: int, client_state: dict, keep_last: int, cfg=None) -> str:
    """Collective save of ``step`` (with ``cfg``, the config it was trained with); then rank 0 moves
    ``latest`` and prunes old tags."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    rank = dist.get_rank()
    torch.save(rng_state(), ckpt_dir / tag / f"rng_rank{rank}.pt")
    if rank == 0 and cfg is not None:
        save_config(ckpt_dir / tag, cfg)
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


def trained_config(tag_dir: str | Path):
    """``(cfg, corpus id)`` a checkpoint was trained with: its own ``config.yaml``, or for a checkpoint
    written before checkpoints kept one, the run dir's (corpus id then unknown: None)."""
    from training.config import load_config

    tag_dir = Path(tag_dir)
    if (tag_dir / CONFIG).is_file():
        corpus = json.loads((tag_dir / CORPUS).read_text())["id"] if (tag_dir / CORPUS).is_file() else None
        return load_config(tag_dir / CONFIG), corpus
    run_config = tag_dir.parent.parent / CONFIG
    if run_config.is_file():
        return load_config(run_config), None
    raise FileNotFoundError(f"no {CONFIG} in checkpoint {tag_dir} nor in its run dir {tag_dir.parent.parent}")


def _flat(cfg) -> dict:
    return {f"{section}.{k}": v for section, values in asdict(cfg).items() for k, v in values.items()}


def check_resume(ckpt_dir: str | Path, cfg) -> dict[str, tuple]:
    """Compare ``cfg`` (resolved) with the config of the ``latest`` checkpoint in ``ckpt_dir``.

    Returns ``{key: (checkpoint value, new value)}`` of the allowed changes (empty: same config or
    nothing to resume); raises :class:`ResumeConfigError` naming every key that would change what the
    checkpoint means."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return {}
    old, old_corpus = trained_config(Path(ckpt_dir) / tag)
    a, b = _flat(old), _flat(cfg)
    changed = {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}
    refused = {k: v for k, v in changed.items() if k not in RESUMABLE and k != "data.mds"}
    new_corpus = corpus_id(cfg.data.mds)
    if old_corpus is not None and old_corpus != new_corpus:          # other content, wherever it lies
        refused["data.mds"] = (f"{old.data.mds} ({old_corpus})", f"{cfg.data.mds} ({new_corpus})")
    elif old_corpus is None and "data.mds" in changed:               # identity not recorded: the path decides
        refused["data.mds"] = changed["data.mds"]
    if refused:
        lines = "; ".join(f"{k}: {o!r} → {n!r}" for k, (o, n) in sorted(refused.items()))
        raise ResumeConfigError(
            f"cannot resume {Path(ckpt_dir) / tag} with this config: it changes what the checkpoint means "
            f"({lines}). Drop these overrides to resume, or train in a new run.dir.")
    return changed


_WEIGHTS: dict | None = None          # {(checkpoints dir, tag): fp32 state dict} inside cached_weights()


@contextlib.contextmanager
def cached_weights():
    """Inside the block ``load_for_inference`` consolidates each checkpoint's ZeRO shards once: several evaluations
    of one checkpoint (the quality recipe's validation loss over K masking patterns and its embeddings) share the
    fp32 weights instead of re-reading the shards each time. Each call still builds its own model."""
    global _WEIGHTS
    outer = _WEIGHTS
    _WEIGHTS = {} if outer is None else outer
    try:
        yield
    finally:
        _WEIGHTS = outer


def load_for_inference(path: str | Path, device: str | torch.device = "cpu"):
    """``(model, cfg, tokenizer)`` from a run dir (its ``latest``), its ``checkpoints/`` dir or one tag dir,
    built with the config that checkpoint was trained with.

    Weights are consolidated to fp32 with DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``
    (any ZeRO stage; once per checkpoint inside ``cached_weights()``); the model is returned in eval mode on
    ``device``.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from data_prep.tokenize import N_SPECIAL, CellTokenizer
    from training.encoder import build_model

    path = Path(path)
    if path.name.startswith("step_") or (path.parent / LATEST).is_file():
        ckpt_dir, tag = path.parent, path.name                    # one checkpoint
    else:
        ckpt_dir = path if (path / LATEST).is_file() else path / "checkpoints"
        tag = latest_tag(ckpt_dir)
        if tag is None:
            raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
    cfg, _ = trained_config(ckpt_dir / tag)
    key = (str(Path(ckpt_dir).resolve()), tag)
    if _WEIGHTS is not None and key in _WEIGHTS:
        state = _WEIGHTS[key]
    else:
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        if _WEIGHTS is not None:
            _WEIGHTS[key] = state
    model = build_model(cfg.model)
    model.load_state_dict(state)
    d = cfg.data
    tokenizer = CellTokenizer(cfg.model.n_tokens - N_SPECIAL, d.context_length, d.n_bins, cfg.run.seed, d.gene_selection)
    return model.to(device).eval(), cfg, tokenizer

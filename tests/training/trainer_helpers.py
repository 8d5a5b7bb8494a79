"""Shared by the trainer tests: a real PBMC 3k corpus (built once per session) and tiny run overrides."""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# One compiled deepspeed_shm_comm for every test and subprocess (same cache as the Makefile).
ENV = {"TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"), "DS_ACCELERATOR": "cpu",
       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def pbmc_corpus(tmp_path_factory) -> str:
    """PBMC 3k (all 2,700 real cells) through ``data_prep.build``, built once per test session."""
    from data_prep.build import BuildOptions, build
    from data_prep.datasets import pbmc3k_path
    out = tmp_path_factory.getbasetemp() / "pbmc3k_corpus"
    if not (out / "manifest.json").is_file():
        build([pbmc3k_path()], str(out), BuildOptions(cell_type_key="celltype", min_genes=200, seed=3),
              log=lambda *a: None)
    return str(out)


def synth_corpus(root, seed: int, n_cells: int = 420) -> str:
    """Two CellxGene-schema synthetic datasets (``data_prep.synth_census``, 1,500 genes, 60-400 genes a cell) through
    ``data_prep.build`` with a per-cell split (20 % val): needs nothing downloaded, unlike :func:`pbmc_corpus`, so
    it also runs on the GPU machines."""
    from data_prep.build import BuildOptions, build
    from data_prep.synth_census import SynthOptions, write_corpus
    root = Path(root)
    files = write_corpus(root / "h5ad", n_cells, 2, SynthOptions(n_genes=1500, min_len=60, max_len=400, seed=seed),
                         progress=False)
    build([f["path"] for f in files], str(root / "corpus"),
          BuildOptions(min_genes=50, split_by="cell", val_frac=0.2, test_frac=0.05, seed=seed), log=lambda *a: None)
    return str(root / "corpus")


def tiny_overrides(corpus: str, run_dir, **extra) -> list[str]:
    """A 2-layer, d=32 model on 64-token cells: a few steps take seconds on 2 CPU cores."""
    base = {"model.preset": "tiny", "model.n_layers": 2, "model.d_model": 32, "model.n_heads": 4,
            "model.d_ff": 64, "model.attention": "softmax", "data.mds": corpus, "data.context_length": 64,
            "data.n_bins": 11, "data.batch_size": 8, "optim.lr": 3e-3, "optim.warmup_steps": 2,
            "run.dir": str(run_dir), "run.max_steps": 4, "run.ckpt_every": 2, "run.keep_last": 2,
            "run.precision": "fp32", "run.progress": False, "run.tensorboard": False}
    base.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in base.items()]


def by_step(path, key) -> dict:
    """{step: record[key]} of a run's JSON-lines file (metrics.jsonl, cells_rank0.jsonl)."""
    return {r["step"]: r[key] for r in map(json.loads, Path(path).read_text().splitlines())}


def set_env() -> dict:
    old = {k: os.environ.get(k) for k in ENV}
    os.environ.update({k: v for k, v in ENV.items() if k != "PYTHONPATH"})
    return old


def restore_env(old: dict) -> None:
    """Undo ``set_env`` after in-process trainers: shut the process group down (DeepSpeed's groups with it) and
    drop the one-process rendezvous they exported, so later tests and their subprocesses start clean."""
    from training.distributed import shutdown
    shutdown()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)


def sigattn_works() -> bool:
    """True when ``sigattn.sigmoid_attention_varlen`` imports and runs on CPU (C++ op built)."""
    try:
        import torch
        from sigattn import sigmoid_attention_varlen
        q = torch.randn(3, 1, 4)
        sigmoid_attention_varlen(q, q, q, torch.tensor([0, 3], dtype=torch.int32), 3)
        return True
    except Exception:          # not built yet / not importable: the sigmoid tests are skipped with a reason
        return False


ATTENTION_KINDS = ["softmax", "sigmoid"]


def skip_unless_sigattn(kind: str):
    import pytest
    if kind == "sigmoid" and not sigattn_works():
        pytest.skip("sigattn.sigmoid_attention_varlen is not importable/built on this machine")

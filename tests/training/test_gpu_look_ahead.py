"""The trainer's look-ahead (``run.prefetch``) on a GPU: the next micro-batch is masked and copied host→device
(page-locked, ``non_blocking``) while the GPU still runs this backward. The CPU test
(``test_trainer.py::test_the_look_ahead_changes_when_the_host_works_not_what_is_trained``) shows it trains the same
batches bitwise; this one runs the CUDA path, where a copy racing the kernels that read it would change the losses.
Bitwise equality is not expected here (the backward adds dQ in any order); the cells must match exactly and the
losses within bf16 noise."""

from __future__ import annotations

import math
import os

import pytest
import torch

from trainer_helpers import ENV, by_step, synth_corpus, tiny_overrides

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_look_ahead_on_cuda_trains_the_same_batches(tmp_path):
    from data_prep._torchvision_shim import ensure_importable
    from training.config import load_config
    from training.trainer import Trainer

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", ENV["TORCH_EXTENSIONS_DIR"])
    corpus = synth_corpus(tmp_path / "data", seed=7)
    runs = {}
    for prefetch in (False, True):
        run_dir = tmp_path / f"prefetch_{prefetch}"
        t = Trainer(load_config(None, tiny_overrides(corpus, run_dir, **{
            "run.max_steps": 6, "run.ckpt_every": 3, "optim.grad_accum": 2, "run.log_cell_ids": True,
            "run.precision": "auto", "run.prefetch": prefetch, "model.attention": "sigmoid"})))
        try:
            assert t.train() == "finished" and t.step == 6
        finally:
            t.close()
        runs[prefetch] = by_step(run_dir / "metrics.jsonl", "loss"), by_step(run_dir / "cells_rank0.jsonl", "cell_ids")
    ensure_importable()
    from streaming.base.util import clean_stale_shared_memory
    clean_stale_shared_memory()
    (loss_off, cells_off), (loss_on, cells_on) = runs[False], runs[True]
    assert cells_on == cells_off and sorted(loss_on) == list(range(1, 7))
    for step, v in loss_off.items():
        assert math.isfinite(loss_on[step]) and abs(loss_on[step] - v) <= 2e-3 * abs(v), step

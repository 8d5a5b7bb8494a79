"""Exact resume after SIGKILL (real subprocesses), and a 2-process torchrun (gloo) run on real PBMC shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from trainer_helpers import ATTENTION_KINDS, ENV, REPO, pbmc_corpus, skip_unless_sigattn, tiny_overrides
from training.ports import free_port

TINY = str(REPO / "training" / "configs" / "tiny.yaml")
# Runs the real Trainer and SIGKILLs its own process right after step KILL_AFTER (no save at that step).
KILLER = """
import os, signal, sys
from training.config import load_config
from training.trainer import Trainer
kill_after = int(sys.argv[1])
def die(trainer, record):
    if record["step"] == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
Trainer(load_config(sys.argv[2], sys.argv[3:]), callbacks=[die]).train()
"""


def run(args, timeout=300):
    env = {**os.environ, **ENV}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def by_step(path, key):
    """Last record per step (a resumed run re-does the steps after its checkpoint)."""
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec[key]
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return pbmc_corpus(tmp_path_factory)


@pytest.mark.parametrize("attention", ATTENTION_KINDS)
def test_sigkill_then_resume_is_bitwise_identical(corpus, tmp_path, attention):
    skip_unless_sigattn(attention)
    steps, kill_after = 10, 7
    extra = {"model.attention": attention, "run.max_steps": steps, "run.ckpt_every": 3, "run.log_cell_ids": True, "run.keep_last": 2}
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    ref = run([sys.executable, "-m", "training.train", TINY, *tiny_overrides(corpus, ref_dir, **extra)])
    assert ref.returncode == 0, ref.stderr[-3000:]

    killed = run([sys.executable, "-c", KILLER, str(kill_after), TINY, *tiny_overrides(corpus, cut_dir, **extra)])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (cut_dir / "checkpoints" / "latest").read_text() == "step_00000006"
    assert max(by_step(cut_dir / "metrics.jsonl", "loss")) == kill_after
    cells_before = by_step(cut_dir / "cells_rank0.jsonl", "cell_ids")

    resumed = run([sys.executable, "-m", "training.train", TINY, *tiny_overrides(corpus, cut_dir, **extra)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 6" in resumed.stdout

    ref_loss, cut_loss = by_step(ref_dir / "metrics.jsonl", "loss"), by_step(cut_dir / "metrics.jsonl", "loss")
    assert list(ref_loss) == list(range(1, steps + 1)) and ref_loss == cut_loss          # bitwise: float ==
    assert by_step(ref_dir / "metrics.jsonl", "grad_norm") == by_step(cut_dir / "metrics.jsonl", "grad_norm")
    ref_cells = by_step(ref_dir / "cells_rank0.jsonl", "cell_ids")
    cut_cells = by_step(cut_dir / "cells_rank0.jsonl", "cell_ids")
    assert cut_cells == ref_cells and cells_before[kill_after] == ref_cells[kill_after]
    seen = [c for s in range(1, steps + 1) for c in cut_cells[s]]
    assert len(seen) == len(set(seen)) == steps * 8                                        # none twice, none skipped


LAUNCHERS = {
    "torchrun": lambda port: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                              "--master_port", str(port), "-m", "training.train"],
    "deepspeed": lambda port: [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                               "--master_port", str(port), "--module", "training.train"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_split_cells_and_agree(corpus, tmp_path, launcher):
    extra = {"run.max_steps": 4, "run.log_cell_ids": True, "run.zero_stage": 2}
    res = run([*LAUNCHERS[launcher](free_port()), TINY, *tiny_overrides(corpus, tmp_path, **extra)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "world 2" in res.stdout
    r0, r1 = by_step(tmp_path / "cells_rank0.jsonl", "cell_ids"), by_step(tmp_path / "cells_rank1.jsonl", "cell_ids")
    a = [c for s in r0 for c in r0[s]]
    b = [c for s in r1 for c in r1[s]]
    assert len(a) == len(b) == 4 * 8 and not set(a) & set(b) and len(set(a + b)) == 64
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in recs)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000004"

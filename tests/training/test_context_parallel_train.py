"""Training with context parallelism (real Trainer, DeepSpeed, gloo, torchrun): CP = 2 on 2 processes equals
1 process (ZeRO-3 + activation checkpointing; also with the exchange pipelined in 2 head chunks, and CP = 3 on
3 processes with 4 heads split 2/1/1), and DP = 2 × CP = 2 on 4 processes equals DP = 2 on 2 processes
(ZeRO-2) — per-step loss and gradient norm (grad clipping on), sigmoid and softmax; a CP = 2 run stopped and
resumed reproduces the uninterrupted losses. (Adam is nearly invariant to a gradient scale, so the losses alone
would not catch a wrong normalisation: the gradient norms do.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from trainer_helpers import ATTENTION_KINDS, ENV, REPO, sigattn_works, skip_unless_sigattn
from training.ports import free_port

pytestmark = [pytest.mark.slow]
DRIVER = str(REPO / "tests" / "training" / "cp_train_driver.py")
STEPS = 4
KINDS = [k for k in ATTENTION_KINDS if k != "sigmoid" or sigattn_works()]


def _overrides(seed: int, **extra) -> list[str]:
    """Tiny synthetic cells (~20–60 genes, odd lengths) in a 2-layer d=32 model: seconds per run."""
    base = {"model.preset": "tiny", "model.n_layers": 2, "model.d_model": 32, "model.n_heads": 4, "model.d_ff": 64,
            "data.synthetic_vocab": 400, "data.synthetic_mean_genes": 30, "data.context_length": 61,
            "data.n_bins": 11, "data.batch_size": 3, "optim.lr": 3e-3, "optim.warmup_steps": 2, "optim.grad_clip": 0.5,
            "run.max_steps": STEPS, "run.ckpt_every": 0, "run.precision": "fp32", "run.progress": False,
            "run.tensorboard": False, "run.seed": seed}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _train(out, nproc: int, cp: int, seed: int, stop_after: int = 0, **extra) -> dict[str, list[dict]]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), DRIVER, str(out), ",".join(KINDS), str(stop_after),
           *_overrides(seed, **{"parallel.context_parallel_degree": cp, **extra})]
    res = subprocess.run(cmd, cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return {k: [json.loads(x) for x in (out / k / "metrics.jsonl").read_text().splitlines()] for k in KINDS}


def _same(got: list[dict], want: list[dict], what: str) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1)), what
    for key in ("loss", "grad_norm"):
        g, w = np.array([r[key] for r in got]), np.array([r[key] for r in want])
        assert np.allclose(g, w, rtol=2e-5, atol=1e-7), f"{what} {key}: {g} vs {w}"


@pytest.fixture(scope="module")
def seed():
    return int(np.random.default_rng().integers(1000))


def test_cp2_equals_one_process(tmp_path, seed):
    # ZeRO-3 (the 1.4b preset's stage, where DeepSpeed's reduce-scatter needs training.parallel.backward_scale)
    # with activation checkpointing (the recomputed forward repeats the all-to-alls)
    extra = {"run.zero_stage": 3, "model.activation_checkpointing": "true"}
    one = _train(tmp_path / "one", 1, 1, seed, **extra)
    cp2 = _train(tmp_path / "cp2", 2, 2, seed, **extra)
    # the pipelined exchange (2 head chunks, training.parallel.ulysses_pipelined), recomputed under checkpointing
    piped = _train(tmp_path / "cp2c2", 2, 2, seed, **extra, **{"parallel.context_parallel_chunks": 2})
    uneven = _train(tmp_path / "cp3", 3, 3, seed, **extra)      # 4 heads over 3 ranks: 2/1/1 (our exchange)
    for k in KINDS:
        _same(cp2[k], one[k], f"{k}: CP=2 vs 1 process")
        _same(piped[k], one[k], f"{k}: CP=2 in 2 pipelined head chunks vs 1 process")
        _same(uneven[k], one[k], f"{k}: CP=3 (uneven heads) vs 1 process")
        assert one[k][-1]["loss"] != one[k][0]["loss"]


def test_dp2_cp2_equals_dp2_and_resume_with_cp(tmp_path, seed):
    dp2 = _train(tmp_path / "dp2", 2, 1, seed, **{"run.zero_stage": 2})
    both = _train(tmp_path / "dp2cp2", 4, 2, seed, **{"run.zero_stage": 2})
    for k in KINDS:
        _same(both[k], dp2[k], f"{k}: DP=2×CP=2 vs DP=2")
    # resume with CP: stop (checkpoint) after step 2 (the trainer stops at the end of step 3), relaunch
    extra = {"run.zero_stage": 2, "run.ckpt_every": 100}
    first = _train(tmp_path / "resumed", 4, 2, seed, stop_after=2, **extra)
    assert all(r[-1]["step"] == 3 for r in first.values())
    resumed = _train(tmp_path / "resumed", 4, 2, seed, **extra)
    for k in KINDS:
        by_step = {r["step"]: r for r in resumed[k]}          # the log holds steps 1–3, then 4 after the resume
        _same([by_step[s] for s in range(1, STEPS + 1)], both[k], f"{k}: CP=2 resumed vs uninterrupted")


def test_compiled_cp2_equals_eager_cp2(tmp_path, seed):
    """run.compile with CP = 2: each block compiles around the eager Ulysses exchange (a graph break there, not an
    error) and trains exactly as the eager CP run. aot_eager: Dynamo + AOTAutograd without Inductor's C++ builds
    (Inductor with our op is covered by test_trainer's compiled run)."""
    eager = _train(tmp_path / "eager", 2, 2, seed)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           DRIVER, str(tmp_path / "compiled"), ",".join(KINDS), "0",
           *_overrides(seed, **{"parallel.context_parallel_degree": 2, "run.compile": "true"})]
    res = subprocess.run(cmd, cwd=REPO, env={**os.environ, **ENV, "SIGATTN_COMPILE_BACKEND": "aot_eager"},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    for k in KINDS:
        got = [json.loads(x) for x in (tmp_path / "compiled" / k / "metrics.jsonl").read_text().splitlines()]
        _same(got, eager[k], f"{k}: compiled CP=2 vs eager CP=2")
        graphs = [int(line.rsplit(" ", 1)[1]) for line in res.stdout.splitlines()
                  if line.startswith(f"{k}: compiled graphs")]
        assert graphs and min(graphs) >= 2, res.stdout[-2000:]   # the regions before and after the exchange


def test_benchmark_script_runs_a_tiny_shape_on_cpu(tmp_path):
    """benchmarks/context_parallel.py end to end (launcher → torchrun → worker) on 2 gloo ranks: tiny CP=2 rows, one
    exchange (DeepSpeed's), 2 pipelined head chunks, and our exchange forced at one chunk, with world size, degrees, throughput, memory and a non-zero all-to-all
    share; the JSON names the commit."""
    skip_unless_sigattn("sigmoid")
    out = tmp_path / "cp.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "context_parallel.py"), "--nproc", "2", "--runs", "tiny:96:2",
           "tiny:96:2:2", "tiny:96:2:1:ours", "--steps", "2", "--warmup-steps", "1", "--profile-steps", "1",
           "--override=model.n_layers=1", "--override=model.d_model=32", "--override=model.d_ff=64", "--override=data.n_bins=11",
           "--override=data.batch_size=2", "--settings", "plan", "--out", str(out)]
    res = subprocess.run(cmd, cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [(r.get("context_parallel_chunks"), r.get("exchange")) for r in data["rows"]] == [
        (1, "deepspeed"), (2, "ours"), (1, "ours")]
    for row in data["rows"]:
        assert "error" not in row, row
        assert (row["world_size"], row["context_parallel_degree"], row["data_parallel_degree"]) == (2, 2, 1)
        assert row["tokens_per_s"] > 0 and row["peak_mem_gib"] > 0 and 0 < row["cp_comm_share"] < 1
        # the memory plan's ZeRO stage and checkpointing; the micro-batch override wins over the plan's
        assert (row["settings"], row["zero_stage"], row["activation_checkpointing"], row["batch_size"]) == (
            "plan", 0, False, 2)
    assert len(data["commit"]) == 40 and data["device"] == "cpu"
    table = out.with_suffix(".md").read_text()
    assert "| tiny | 96 | sigmoid | 2 | 2 | 1 (deepspeed) | 1 | plan (0, False) |" in table
    assert "| tiny | 96 | sigmoid | 2 | 2 | 2 (ours) | 1 | plan (0, False) |" in table
    assert "| tiny | 96 | sigmoid | 2 | 2 | 1 (ours) | 1 | plan (0, False) |" in table


def test_benchmark_run_specs_parse_and_bad_ones_are_named():
    from benchmarks.context_parallel import parse_run, resolved_exchange

    assert parse_run("160m:32768:4") == ("160m", 32768, 4, 1, "auto")
    assert parse_run("1.4b:32768:4:2") == ("1.4b", 32768, 4, 2, "auto")
    assert parse_run("1.4b:32768:4:1:ours") == ("1.4b", 32768, 4, 1, "ours")
    for bad in ("160m:32768", "1.4b:32768:4:1:ring", "1.4b:32k:4", "1.4b:32768:4:1:ours:x"):
        with pytest.raises(ValueError, match="expected PRESET:CONTEXT:P\\[:C\\[:EXCHANGE\\]\\]"):
            parse_run(bad)
    assert [resolved_exchange(x, c, 12, P) for x, c, P in [("auto", 1, 4), ("auto", 3, 4), ("auto", 1, 8),
                                                           ("ours", 1, 4), ("auto", 1, 1)]] == [
        "deepspeed", "ours", "ours", "ours", "none"]

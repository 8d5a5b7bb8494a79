"""launch without Slurm: sweep expansion, time limits, config checks, and the local executor (workstation path)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import yaml

from launch import configs, submit, sweep
from launch.job import load_entry

ENTRY = "tests.launch.standin_trainer:build_trainer"


def test_sweep_is_the_cartesian_product_in_order():
    n1, n2 = random.randint(1, 4), random.randint(1, 3)
    a = [str(random.randint(0, 10**6)) + f"x{i}" for i in range(n1)]
    b = [f"v{i}" for i in range(n2)]
    combos = sweep.expand(sweep.parse_sweep([f"k1={','.join(a)}", f"s.k2={','.join(b)}"]))
    assert combos == [[f"k1={x}", f"s.k2={y}"] for x in a for y in b]
    assert sweep.expand([]) == [[]]
    assert sweep.tag(["model.attention=softmax", "data.context_length=4096"]) == "attention-softmax_context_length-4096"


@pytest.mark.parametrize("bad", ["k", "k=", "=1,2", "k=1,,2", "k=1,1"])
def test_sweep_rejects_malformed(bad):
    with pytest.raises(ValueError, match="--array-sweep"):
        sweep.parse_sweep([bad])


def test_parse_time():
    assert submit.parse_time("01:30:00") == 90 and submit.parse_time("1-00:00:01") == 1441
    assert submit.parse_time("45") == 45 and submit.parse_time("10:00") == 10


def test_config_keys_resolve_through_the_trainer(tmp_path):
    p = configs.resolve_config("tiny")
    full = configs.check_overrides(p, ["attention=softmax", "context=256", "optim.lr=1.0e-3"], "launch.trainer_entry")
    assert full == ["model.attention=softmax", "data.context_length=256", "optim.lr=1.0e-3"]
    for bad, msg in [(["attention=relu"], "sigmoid"), (["model.nope=1"], "unknown config key"),
                     (["run.max_steps=ten"], "expected int")]:
        with pytest.raises(configs.ConfigError, match=msg):
            configs.check_overrides(p, bad, "launch.trainer_entry")
    (tmp_path / "x.yaml").write_text("a: [1,\n")
    with pytest.raises(configs.ConfigError, match="not valid YAML"):
        configs.check_overrides(tmp_path / "x.yaml", [], None)
    with pytest.raises(ValueError, match="module:function"):
        load_entry("launch.job")


def test_local_executor_runs_two_tasks_and_requeues_on_signal(tmp_path, monkeypatch):
    """No Slurm: submitit's local executor; USR2 to the tasks → collective save → local requeue → same losses."""
    import signal
    import time

    cfg = tmp_path / "c.yaml"
    seed = random.randint(0, 999)
    cfg.write_text(yaml.safe_dump({"run": {"dir": "x"}, "train": {"steps": 12, "sleep_s": 0.3, "lr": 0.05, "seed": seed}}))
    common = [str(cfg), "--gpus-per-node", "0", "--tasks-per-node", "2", "--local", "--entry", ENTRY,
              "--time", "00:10:00", "--signal-delay-s", "30", "--no-snapshot"]
    folder, (job,) = submit.submit(submit.parse_args(common + ["--folder", str(tmp_path / "a")]))
    assert 1024 <= job.submission().function.master_port <= 65535  # a free port picked at submission, not submitit's
    run_dir = Path(json.loads((folder / "launch.json").read_text())["jobs"][0]["run_dir"])
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").exists() or len((run_dir / "metrics.jsonl").read_text().splitlines()) < 3:
        assert time.monotonic() < deadline, job.stderr()
        time.sleep(0.2)
    pids = _task_pids(job)
    assert len(pids) == 2
    for pid in pids:  # what Slurm does before the time limit: USR2 to every task
        os.kill(pid, signal.SIGUSR2)
    assert job.results() == ["finished", "finished"]
    interrupted = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in interrupted] == list(range(1, 13))
    assert json.loads((job.paths.folder / f"{job.job_id}_requeues.json").read_text()) == {"requeues": 1}

    folder2, (job2,) = submit.submit(submit.parse_args(
        common + ["--folder", str(tmp_path / "b"), "train.sleep_s=0"]))
    assert job2.results() == ["finished", "finished"]
    ref_dir = Path(json.loads((folder2 / "launch.json").read_text())["jobs"][0]["run_dir"])
    ref = [json.loads(line)["loss"] for line in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in interrupted] == pytest.approx(ref, rel=1e-6)


def _task_pids(job) -> list[int]:
    """The local controller's children (one Python process per task)."""
    children = Path(f"/proc/{job.job_id}/task/{job.job_id}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


def _fake_slurm(tmp_path, monkeypatch, squeue_script: str) -> Path:
    """``sacct`` reporting job 7 FAILED (a lagging record) and the given ``squeue`` script, first on PATH."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "sacct").write_text("#!/bin/sh\necho '7|FAILED'\n")
    (bin_ / "squeue").write_text("#!/bin/sh\n" + squeue_script)
    for f in bin_.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr("launch.job_folder.time.sleep", lambda s: None)
    return bin_


def test_slurm_states_retries_a_failing_squeue_instead_of_trusting_sacct(tmp_path, monkeypatch):
    from launch.job_folder import slurm_states
    n = tmp_path / "calls"
    _fake_slurm(tmp_path, monkeypatch, f"echo x >> {n}\n[ $(wc -l < {n}) -ge 3 ] && echo '7|PENDING' && exit 0\n"
                "echo 'squeue: error: Socket timed out on send/recv operation' >&2; exit 1\n")
    assert slurm_states(["7"]) == {"7": ("PENDING", 0)}  # live state after two failed tries, not sacct's FAILED


def test_slurm_states_uses_sacct_once_the_job_left_the_queue_and_raises_when_squeue_keeps_failing(tmp_path,
                                                                                                   monkeypatch):
    from launch.job_folder import slurm_states
    bin_ = _fake_slurm(tmp_path, monkeypatch, "echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1\n")
    assert slurm_states(["7"]) == {"7": ("FAILED", 0)}
    (bin_ / "squeue").write_text("#!/bin/sh\necho 'Unable to contact slurm controller' >&2; exit 1\n")
    with pytest.raises(RuntimeError, match="squeue failed 5 times: Unable to contact slurm controller"):
        slurm_states(["7"])


def test_rendezvous_port_is_per_job_stable_and_outside_the_ephemeral_range():
    from launch.job import rendezvous_port
    ports = {j: rendezvous_port(j) for j in ["1", "2", "12345", "12345_0", "12345_1", "999999"]}
    assert ports == {j: rendezvous_port(j) for j in ports}                     # every task computes the same
    assert all(20000 <= p < 32768 for p in ports.values()), ports              # Linux ephemeral: 32768–60999
    assert len(set(ports.values())) == len(ports)                              # array tasks differ
    lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert all(not lo <= p <= hi for p in ports.values()), (lo, hi)


def test_memory_plan_overrides_follow_the_plan_and_keep_the_users_keys():
    from launch.memory import plan
    from launch.model_size import model_size
    path = configs.resolve_config("1.4b")
    logs = []
    out = submit.memory_plan_overrides(path, ["data.context_length=32768", "parallel.context_parallel_degree=4"], 4,
                                       80.0, log=logs.append)
    p = plan(model_size("1.4b", overrides=["data.context_length=32768"]), 32768, 4, 80.0, context_parallel=4)
    assert out == [f"run.zero_stage={p.zero_stage}", f"model.activation_checkpointing={str(p.activation_checkpointing).lower()}",
                   f"data.batch_size={p.micro_batch}"]
    # 1.4b at 32K on one GPU: checkpointing every 4th layer, written as the integer the config takes
    sel = submit.memory_plan_overrides(path, ["data.context_length=32768"], 1, 80.0, log=logs.append)
    assert "model.activation_checkpointing=4" in sel and "selective (every 4th layer) activation checkpointing" in logs[-1]
    assert "context parallel 4" in logs[0]
    kept = submit.memory_plan_overrides(path, ["run.zero_stage=3"], 1, 80.0, log=logs.append)
    assert not any(o.startswith("run.zero_stage=") for o in kept) and "kept your run.zero_stage" in logs[-1]
    # the overridden shape is what gets planned: a 4-layer 1.4b fits 24 GiB cards without sharding, the full one not
    small = submit.memory_plan_overrides(path, ["model.n_layers=4"], 8, 24.0, log=logs.append)
    big = submit.memory_plan_overrides(path, [], 8, 24.0, log=logs.append)
    assert small[0] == "run.zero_stage=0" and big[0] != "run.zero_stage=0"


def test_memory_plan_errors_name_the_problem(capsys):
    with pytest.raises(SystemExit, match="--memory-plan sizes GPU memory"):
        submit.validate(submit.parse_args(["tiny", "--gpus-per-node", "0", "--memory-plan", "80", "--local"]), False)
    with pytest.raises(SystemExit, match="does not fit in 4 GiB.*nothing submitted"):
        submit.validate(submit.parse_args(["1.4b", "--gpus-per-node", "1", "--memory-plan", "4", "--local"]), False)

"""launch.submit against a real one-node Slurm: a 2-task job, preemption → requeue → identical losses, an array
sweep, and bad arguments refused before anything is submitted."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from launch import submit
from slurm_cluster import job_state, wait_final  # tests/launch is on sys.path (conftest)
from launch.job_folder import JobFolder

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]

ENTRY = "tests.launch.standin_trainer:build_trainer"


def _config(tmp_path: Path, steps: int, sleep_s: float, seed: int) -> Path:
    p = tmp_path / "standin.yaml"
    p.write_text(yaml.safe_dump({"run": {"dir": str(tmp_path / "unused")},
                                 "train": {"steps": steps, "sleep_s": sleep_s, "lr": 0.05, "seed": seed}}))
    return p


def _submit(argv: list[str]):
    args = submit.parse_args(argv + ["--entry", ENTRY, "--time", "00:10:00", "--signal-delay-s", "60"])
    return submit.submit(args)


def _metrics(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def _wait_done(job, timeout: float = 240):
    return wait_final(job, timeout)


@pytest.fixture(scope="module")
def reference(slurm_cluster, tmp_path_factory):
    """An uninterrupted 2-task run (also the 'runs to completion' check)."""
    tmp = tmp_path_factory.mktemp("ref")
    seed = int(time.time()) % 1000
    cfg = _config(tmp, steps=24, sleep_s=0.0, seed=seed)
    folder, jobs = _submit([str(cfg), "--gpus-per-node", "0", "--tasks-per-node", "2", "--folder", str(tmp / "job")])
    job = _wait_done(jobs[0])
    assert job_state(job) == "COMPLETED", job.stderr()
    record = json.loads((folder / "launch.json").read_text())
    return cfg, job, Path(record["jobs"][0]["run_dir"]), record


def test_two_task_job_completes(reference):
    _, job, run_dir, record = reference
    assert record["cluster"] == "slurm" and record["tasks_per_node"] == 2
    assert job.results() == ["finished", "finished"]
    steps = [m["step"] for m in _metrics(run_dir)]
    assert steps == list(range(1, 25))
    assert (run_dir / "checkpoints" / "latest").read_text() == "step000024"
    assert job.paths.stdout.exists() and "train() returned 'finished'" in job.stderr()  # per-task logs in the folder


def test_preempted_job_requeues_and_matches_uninterrupted_losses(reference, slurm_cluster, tmp_path):
    cfg_ref, _, ref_dir, _ = reference
    seed = yaml.safe_load(cfg_ref.read_text())["train"]["seed"]
    cfg = _config(tmp_path, steps=24, sleep_s=0.4, seed=seed)
    folder, jobs = _submit([str(cfg), "--gpus-per-node", "0", "--tasks-per-node", "2", "--folder", str(tmp_path / "job"),
                            "--max-requeues", "2"])
    job = jobs[0]
    run_dir = Path(json.loads((folder / "launch.json").read_text())["jobs"][0]["run_dir"])
    deadline = time.monotonic() + 180
    while len(_metrics(run_dir)) < 5:
        assert time.monotonic() < deadline and not job.done(), f"job did not reach step 5: {job_state(job)} {job.stderr()}"
        time.sleep(0.5)
    # what Slurm does --signal-delay-s before the time limit: USR2 to every task of every step
    slurm_cluster.run("scancel", "--signal=USR2", job.job_id)
    slurm_cluster.release_requeued(job.job_id)
    _wait_done(job)
    assert job_state(job) == "COMPLETED", job.stderr() + "\nslurmctld:\n" + slurm_cluster.log_tail("slurmctld")
    assert job.results()[0] == "finished"
    got = _metrics(run_dir)
    restarts = [m["restart"] for m in got]
    assert 1 in restarts and restarts == sorted(restarts), "the job was not requeued once"
    assert [m["step"] for m in got] == list(range(1, 25)), "steps lost or repeated across the requeue"
    ref = [m["loss"] for m in _metrics(ref_dir)]
    assert [m["loss"] for m in got] == pytest.approx(ref, rel=1e-6, abs=1e-7)
    info = JobFolder(folder).jobs()[0]
    assert (info.state, info.restarts, info.last["step"]) == ("COMPLETED", 1, 24)
    acct = slurm_cluster.run("sacct", "-j", job.job_id, "-X", "-n", "-D", "-o", "State").stdout.split()
    assert "REQUEUED" in acct, acct


def test_array_sweep_runs_every_combination(slurm_cluster, tmp_path):
    cfg = _config(tmp_path, steps=3, sleep_s=0.0, seed=1)
    folder, jobs = _submit([str(cfg), "--gpus-per-node", "0", "--folder", str(tmp_path / "job"),
                            "--array-sweep", "train.lr=0.01,0.1", "seed=3,4,5", "--array-parallelism", "2"])
    assert len(jobs) == 6 and len({j.job_id.split("_")[0] for j in jobs}) == 1, "not one array job"
    for j in jobs:
        _wait_done(j)
        assert job_state(j) == "COMPLETED", j.stderr()
    assert [j.state for j in JobFolder(folder).jobs()] == ["COMPLETED"] * 6
    record = json.loads((folder / "launch.json").read_text())
    combos = {tuple(sorted(o for o in r["overrides"] if not o.startswith("run.dir="))) for r in record["jobs"]}
    assert combos == {(f"train.lr={lr}", f"train.seed={s}") for lr in ("0.01", "0.1") for s in (3, 4, 5)}
    for r in record["jobs"]:
        got = yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())
        assert f"train.lr={got['train']['lr']}" in r["overrides"] and f"train.seed={got['train']['seed']}" in r["overrides"]
        assert [m["step"] for m in _metrics(Path(r["run_dir"]))] == [1, 2, 3]


@pytest.mark.parametrize("argv, message", [
    (["no-such-preset"], "unknown preset"),
    (["{dir}/missing.yaml"], "config file not found"),
    (["{cfg}", "--gpus-per-node", "1"], "have 0 GPU"),
    (["{cfg}", "--gpus-per-node", "0", "--tasks-per-node", "3"], "have 2 CPUs"),
    (["{cfg}", "--gpus-per-node", "0", "--nodes", "2"], "has 1 node"),
    (["{cfg}", "train.stepz=3", "--gpus-per-node", "0"], "unknown config key 'train.stepz'"),
    (["{cfg}", "train.steps", "--gpus-per-node", "0"], "bad override"),
    (["{cfg}", "--gpus-per-node", "0", "--partition", "nope"], "no partition 'nope'"),
    (["{cfg}", "--gpus-per-node", "0", "--array-sweep", "train.lr="], "--array-sweep"),
])
def test_bad_arguments_fail_before_submission(slurm_cluster, tmp_path, capsys, argv, message):
    cfg = _config(tmp_path, steps=3, sleep_s=0.0, seed=0)
    argv = [a.format(cfg=cfg, dir=tmp_path) for a in argv]
    before = slurm_cluster.run("sacct", "-X", "-n", "-a", "-o", "JobID").stdout.split()
    with pytest.raises(SystemExit) as e:
        _submit(argv + ["--folder", str(tmp_path / "job")])
    assert message in str(e.value) and "nothing submitted" in str(e.value)
    assert not (tmp_path / "job").exists()
    assert slurm_cluster.run("sacct", "-X", "-n", "-a", "-o", "JobID").stdout.split() == before


def test_cancel_stops_a_running_job(slurm_cluster, tmp_path):
    cfg = _config(tmp_path, steps=1000, sleep_s=0.5, seed=0)
    folder, jobs = _submit([str(cfg), "--gpus-per-node", "0", "--folder", str(tmp_path / "job")])
    run_dir = Path(json.loads((folder / "launch.json").read_text())["jobs"][0]["run_dir"])
    try:
        deadline = time.monotonic() + 120
        while not _metrics(run_dir):
            assert time.monotonic() < deadline, "job never started"
            time.sleep(0.5)
        assert JobFolder(folder).jobs()[0].state == "RUNNING"  # live (squeue), though sacct may still lag
        assert JobFolder(folder).cancel() == [jobs[0].job_id]
        _wait_done(jobs[0], timeout=60)
        assert job_state(jobs[0]) == "CANCELLED"
        # scancel's SIGTERM also announces preemptions: the job saved and exited instead of requeueing itself
        deadline = time.monotonic() + 30
        while "stopped by launch cancel" not in jobs[0].stderr():
            assert time.monotonic() < deadline, jobs[0].stderr()
            time.sleep(0.5)
        assert not (jobs[0].paths.folder / f"{jobs[0].job_id}_requeues.json").exists()
        time.sleep(2)
        assert job_state(jobs[0]) == "CANCELLED"  # not pending again
    finally:  # a failed check must not leave a 500 s job holding the node for the next tests
        slurm_cluster.run("scancel", jobs[0].job_id, check=False)

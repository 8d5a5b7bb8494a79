"""The real trainer (DeepSpeed, gloo, 2 tasks) through launch.submit on the test Slurm, on a PBMC 3k corpus:
it runs to completion, and a run preempted by USR2 is requeued and reproduces the uninterrupted per-step losses."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from launch import submit
from slurm_cluster import FINAL, job_state, wait_final  # tests/launch is on sys.path (conftest)
from launch.job_folder import JobFolder

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
STEPS = 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    from data_prep.build import BuildOptions, build
    from data_prep.datasets import pbmc3k_path

    out = tmp_path_factory.mktemp("pbmc3k") / "corpus"
    build([pbmc3k_path()], str(out), BuildOptions(cell_type_key="celltype", min_genes=200, seed=3), log=lambda *a: None)
    return str(out)


@pytest.fixture(autouse=True)
def _job_env(monkeypatch):
    # sbatch exports the submitting environment: one compiled deepspeed_shm_comm, CPU accelerator, 1 thread per rank
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _overrides(corpus: str, seed: int) -> list[str]:
    return ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.d_ff=128", "attention=sigmoid",
            f"data.mds={corpus}", "context=128", "data.n_bins=11", "data.batch_size=8", "optim.warmup_steps=2",
            f"run.max_steps={STEPS}", "run.ckpt_every=1000", "run.precision=fp32", "run.progress=false",
            "run.tensorboard=false", f"run.seed={seed}"]


def _wait(job):
    wait_final(job, timeout=400)


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return []
    return [(r["step"], r["loss"]) for r in map(json.loads, f.read_text().splitlines())]


def _run(corpus, tmp_path, seed, extra=()):
    args = submit.parse_args(
        ["tiny", *_overrides(corpus, seed), "--gpus-per-node", "0", "--tasks-per-node", "2",
         "--folder", str(tmp_path), "--time", "00:15:00", "--signal-delay-s", "60", *extra])
    folder, jobs = submit.submit(args)
    return folder, jobs[0], JobFolder(folder).jobs()[0].run_dir


def test_deepspeed_job_completes_then_preempted_job_resumes_exactly(slurm_cluster, corpus, tmp_path):
    seed = int(time.time()) % 97
    _, ref_job, ref_dir = _run(corpus, tmp_path / "ref", seed)
    _wait(ref_job)
    assert job_state(ref_job) == "COMPLETED", ref_job.stderr()
    assert ref_job.results() == ["finished", "finished"]
    ref = _losses(ref_dir)
    assert [s for s, _ in ref] == list(range(1, STEPS + 1))

    folder, job, run_dir = _run(corpus, tmp_path / "pre", seed, ["--max-requeues", "1"])
    deadline = time.monotonic() + 300
    while len(_losses(run_dir)) < 3:
        assert time.monotonic() < deadline and job_state(job) not in FINAL, job.stderr()
        time.sleep(0.1)
    slurm_cluster.run("scancel", "--signal=USR2", job.job_id)
    slurm_cluster.release_requeued(job.job_id)
    _wait(job)
    assert job_state(job) == "COMPLETED", job.stderr()
    info = JobFolder(folder).jobs()[0]
    assert info.restarts == 1, "not requeued"
    got = _losses(run_dir)
    steps = [s for s, _ in got]
    assert steps == list(range(1, STEPS + 1)), f"steps lost or repeated across the requeue: {steps}"
    assert len(list((run_dir / "checkpoints").glob("*"))) >= 2  # the preemption save and the final one
    assert [v for _, v in got] == pytest.approx([v for _, v in ref], rel=1e-5, abs=1e-6)


def test_context_parallel_job_matches_one_task(slurm_cluster, corpus, tmp_path):
    """2 tasks with --context-parallel 2 (one DP rank, each cell split over both; mosaicml-streaming replicates
    the samples to the pair) give the per-step losses of a 1-task job on the same corpus and seed."""
    seed, steps = int(time.time()) % 89, 8
    _, one_job, one_dir = _run(corpus, tmp_path / "one", seed, ["--tasks-per-node", "1", f"run.max_steps={steps}"])
    _, cp_job, cp_dir = _run(corpus, tmp_path / "cp", seed, ["--context-parallel", "2", f"run.max_steps={steps}"])
    for job in (one_job, cp_job):
        _wait(job)
        assert job_state(job) == "COMPLETED", job.stderr()
    assert cp_job.results() == ["finished", "finished"]
    one, cp = _losses(one_dir), _losses(cp_dir)
    assert [s for s, _ in cp] == [s for s, _ in one] == list(range(1, steps + 1))
    assert [v for _, v in cp] == pytest.approx([v for _, v in one], rel=1e-5, abs=1e-6)

"""A job folder written by ``launch.submit``: its jobs, their states, logs and latest metrics.

``launch.json`` lists the jobs (id, overrides, run dir); submitit keeps per-task logs under
``submitit/<job id>/``; the trainer appends one JSON per step to ``<run dir>/metrics.jsonl``.
States come from ``squeue``/``sacct`` on Slurm (:func:`slurm_states`); for the local executor from the result pickle and the process.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class JobInfo:
    job_id: str
    tag: str
    run_dir: Path
    state: str
    restarts: int
    last: dict | None  # last metrics.jsonl record
    stdout: Path
    stderr: Path


class JobFolder:
    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        record = self.folder / "launch.json"
        if not record.is_file():
            raise FileNotFoundError(f"{self.folder} is not a launch job folder (no launch.json)")
        self.record = json.loads(record.read_text())
        self.cluster = self.record["cluster"]

    def _paths(self, job_id: str):
        from submitit.core.utils import JobPaths

        return JobPaths(self.folder / "submitit" / "%j", job_id=job_id, task_id=0)

    def _local_state(self, job_id: str) -> tuple[str, int]:
        paths = self._paths(job_id)
        counter = paths.folder / f"{job_id}_requeues.json"
        restarts = json.loads(counter.read_text())["requeues"] if counter.exists() else 0
        if paths.result_pickle.exists():
            from submitit.core.utils import pickle_load

            outcome, _ = pickle_load(paths.result_pickle)
            return ("COMPLETED" if outcome == "success" else "FAILED"), restarts
        try:
            os.kill(int(job_id), 0)
            return "RUNNING", restarts
        except (ProcessLookupError, ValueError):
            return "ENDED-WITHOUT-RESULT", restarts

    def jobs(self) -> list[JobInfo]:
        states = slurm_states(j["job_id"] for j in self.record["jobs"]) if self.cluster == "slurm" else {}
        infos = []
        for j in self.record["jobs"]:
            state, restarts = states.get(j["job_id"], ("UNKNOWN", 0)) if self.cluster == "slurm" \
                else self._local_state(j["job_id"])
            metrics = Path(j["run_dir"]) / "metrics.jsonl"
            last = None
            if metrics.exists():
                lines = metrics.read_text().splitlines()
                last = json.loads(lines[-1]) if lines else None
            p = self._paths(j["job_id"])
            infos.append(JobInfo(j["job_id"], j["tag"], Path(j["run_dir"]), state, restarts, last, p.stdout, p.stderr))
        return infos

    def cancel(self) -> list[str]:
        """``scancel`` every job (Slurm) or SIGTERM each local controller; returns the ids cancelled.

        Each job's cancel marker is written first: the trainer saves a checkpoint on the SIGTERM and,
        seeing the marker, exits instead of requeueing itself as it would on a preemption."""
        from launch.job import cancel_marker

        ids = [j["job_id"] for j in self.record["jobs"]]
        for i in ids:
            marker = cancel_marker(self._paths(i).folder, i)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        if self.cluster == "slurm":
            subprocess.run(["scancel", *sorted({i.split("_")[0] for i in ids})], check=True, timeout=60)
            return ids
        done = []
        for i in ids:  # the local job id is its controller's PID: only signal it if it is still that process
            if self._local_state(i)[0] != "RUNNING" or not _is_submitit_controller(int(i)):
                continue
            os.kill(int(i), 15)
            done.append(i)
        return done


def slurm_states(job_ids) -> dict[str, tuple[str, int]]:
    """``{job id: (state, requeues)}`` for Slurm jobs (array elements included, ``123_4``).

    ``sacct`` gives every job's record and counts its requeues; ``squeue`` (slurmctld's live view) wins for jobs
    still queued or running, because sacct learns of state changes from slurmdbd, which can lag by seconds to
    minutes: right after a requeue it may still show the earlier run's end while the job is pending again.
    """
    ids = ",".join(sorted({j.split("_")[0] for j in job_ids}))
    # -D keeps the records of earlier runs of a requeued job (state REQUEUED), oldest first
    r = subprocess.run(["sacct", "-j", ids, "-X", "-n", "-P", "-D", "-o", "JobID,State"],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"sacct failed: {r.stderr.strip()}")
    out: dict[str, tuple[str, int]] = {}
    for line in r.stdout.splitlines():
        jid, state = line.split("|")
        state = state.split()[0]
        requeues = out.get(jid, ("", 0))[1]
        out[jid] = (state, requeues + (state == "REQUEUED"))
    for line in _squeue(ids).splitlines():
        jid, state = line.strip().split("|")
        out[jid] = (state, out.get(jid, ("", 0))[1])
    return out


def _squeue(ids: str, tries: int = 5) -> str:
    """``squeue`` lines ``id|state`` for ``ids``; "" when every job has left the queue ("Invalid job id").

    Any other failure (slurmctld busy: "Socket timed out", "Unable to contact slurm controller") is
    retried, then raised: read as "left the queue" it would let ``sacct``'s lagging record of an
    earlier run (e.g. FAILED just before a requeue) pass for the job's final state.
    """
    for attempt in range(tries):
        r = subprocess.run(["squeue", "-h", "-r", "-j", ids, "-o", "%i|%T"], capture_output=True, text=True,
                           timeout=60)
        if r.returncode == 0:
            return r.stdout
        if "Invalid job id" in r.stderr:
            return ""
        time.sleep(0.5 * 2 ** attempt)
    raise RuntimeError(f"squeue failed {tries} times: {r.stderr.strip()}")


def _is_submitit_controller(pid: int) -> bool:
    try:
        return b"submitit" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False

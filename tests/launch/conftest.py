"""Fixtures for launch tests: a real one-node Slurm (session-scoped) and the stand-in trainer's config."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # the job entry ``tests.launch.standin_trainer`` is imported from the repo root
    sys.path.insert(0, str(REPO))

from slurm_cluster import SlurmCluster, SlurmUnavailable  # noqa: E402 (tests/launch is on sys.path)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """Start munge, MariaDB, slurmdbd, slurmctld and slurmd; set ``SLURM_CONF``; stop them by PID at the end."""
    try:
        cluster = SlurmCluster().start()
    except SlurmUnavailable as e:
        pytest.skip(f"no test Slurm: {e}")
    old = os.environ.get("SLURM_CONF")
    os.environ.update(cluster.environment())
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old

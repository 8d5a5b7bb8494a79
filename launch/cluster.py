"""What the scheduler offers: is Slurm reachable, and what does one node of a partition have (``sinfo``)."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class NodeShape:
    """Largest node of a partition: ``cpus`` and ``gpus`` (from the ``gpu`` GRES), and how many nodes."""

    partition: str
    cpus: int
    gpus: int
    nodes: int


def slurm_available() -> bool:
    """True when ``sinfo`` runs and reaches a controller (an installed client alone is not enough)."""
    if shutil.which("sinfo") is None:
        return False
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and bool(r.stdout.strip())


def _gres_gpus(gres: str) -> int:
    """``gpu:h100:8(S:0-1),shard:4`` → 8; ``(null)`` → 0."""
    n = 0
    for item in gres.split(","):
        m = re.match(r"gpu(?::[^:(]+)?:(\d+)", item.strip())
        if m:
            n = max(n, int(m.group(1)))
    return n


def node_shape(partition: str | None = None) -> NodeShape:
    """The biggest node of ``partition`` (the default partition when None), read with ``sinfo``."""
    cmd = ["sinfo", "-h", "-N", "-o", "%P|%c|%G|%N"]
    if partition:
        cmd += ["-p", partition]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        raise RuntimeError(f"sinfo failed: {r.stderr.strip()}")
    rows = [line.split("|") for line in r.stdout.splitlines() if line.strip()]
    if partition is None:
        rows = [row for row in rows if row[0].endswith("*")]
    if not rows:
        what = f"partition {partition!r}" if partition else "a default partition"
        available = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True).stdout.split()
        raise ValueError(f"Slurm has no {what}; partitions: {', '.join(available) or 'none'}")
    return NodeShape(partition=rows[0][0].rstrip("*"), cpus=max(int(r[1].rstrip("+")) for r in rows),
                     gpus=max(_gres_gpus(r[2]) for r in rows), nodes=len({r[3] for r in rows}))

"""glibc malloc settings for build processes: reuse freed memory instead of faulting in fresh pages.

A build allocates and frees buffers of tens of MB per row chunk (zarr's shard and codec buffers,
numpy temporaries, MDS shards). glibc serves blocks above its mmap threshold (dynamic, ≤ 32 MiB) with
a fresh ``mmap`` and unmaps them on free, so every chunk touches new pages: ~40k minor page faults
per 27k-cell file on our 2-core VMs, 15–40 % of the build's CPU time in the kernel. With a 1 GiB mmap
threshold, a 1 GiB trim threshold and one arena, freed blocks stay in the heap and are reused
(≈ 300 faults per file after the first). Cost: the process keeps its peak heap until it exits.

The thresholds are read when the C library starts, so :func:`reexec_with_malloc_env` re-runs the
current command with them set (``python -m data_prep`` and the benchmark call it first). It does
nothing when they are already set, or off glibc (macOS/musl: the variables mean nothing there).
"""

from __future__ import annotations

import os
import sys

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_ARENA_MAX": "1"}


def missing() -> dict[str, str]:
    """The settings of :data:`MALLOC_ENV` not present in this process's environment."""
    return {k: v for k, v in MALLOC_ENV.items() if k not in os.environ}


def reexec_with_malloc_env(argv: list[str]) -> None:
    """``os.execve`` this interpreter with ``argv`` and :data:`MALLOC_ENV` added; returns when not applicable.

    Call it before anything is written or started (it replaces the process). An explicit value of a
    variable in the environment wins; ``SIGATTN_NO_MALLOC_ENV=1`` turns the re-exec off.
    """
    add = missing()
    if not add or os.environ.get("SIGATTN_NO_MALLOC_ENV") == "1" or not _glibc():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv], {**os.environ, **add})


def _glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False

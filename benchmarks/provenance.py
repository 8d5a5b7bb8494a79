"""The commit a benchmark measured, for its JSON: ``$SIGATTN_COMMIT`` where set (a GPU machine gets a copy of the
working tree without ``.git``), else ``git rev-parse HEAD`` of this checkout; None when neither is known."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def commit() -> str | None:
    if os.environ.get("SIGATTN_COMMIT"):
        return os.environ["SIGATTN_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None

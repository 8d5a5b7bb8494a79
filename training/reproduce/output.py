"""What every recipe writes next to its numbers: provenance and atomically replaced JSON/markdown files."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import socket
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def provenance() -> dict:
    """Commit measured (``$SIGATTN_COMMIT`` where set, as on a GPU machine given a copy without ``.git``; else
    ``git rev-parse HEAD``, ``+dirty`` with local changes), host, device, versions, date."""
    import torch

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = os.environ.get("SIGATTN_COMMIT") or git("rev-parse", "HEAD") or None
    if commit and not os.environ.get("SIGATTN_COMMIT") and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    cuda = torch.cuda.is_available()
    return {"commit": commit, "host": socket.gethostname(), "platform": platform.platform(),
            "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_text(path: Path, text: str) -> Path:
    """Write via a temporary file and rename, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def write_json(path: Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def as_record(scale) -> dict:
    """A recipe's ``Scale`` as its arms' JSON stores it (tuples become lists), so the two compare equal."""
    return json.loads(json.dumps(dataclasses.asdict(scale)))


def budget(scale_cls, record: dict, drop: tuple[str, ...]) -> dict:
    """What an arm depends on: a stored ``Scale`` record without the fields in ``drop``; fields added to
    ``scale_cls`` after the record was written take their default (the value that arm ran with)."""
    defaults = {f.name: f.default for f in dataclasses.fields(scale_cls) if f.default is not dataclasses.MISSING}
    return {k: v for k, v in (defaults | record).items() if k not in drop}


def other_budget(arm: Path, old: dict, new: dict) -> ValueError:
    """The refusal to overwrite a finished arm trained with another budget: names each setting that differs, so
    GPU-hours already spent are never thrown away by a changed flag."""
    changed = ", ".join(f"{k} {old.get(k, '–')} → {new.get(k, '–')}" for k in sorted(set(old) | set(new))
                        if old.get(k) != new.get(k))
    return ValueError(f"{arm}: finished with another budget ({changed}); --force re-trains it, or write to another "
                      "--out")

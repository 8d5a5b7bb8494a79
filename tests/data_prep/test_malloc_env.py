import json
import os
import subprocess
import sys

import pytest

from data_prep.malloc_env import MALLOC_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHILD = """
import json, os, sys
sys.path.insert(0, {root!r})
with open({log!r}, "a") as f:
    f.write(json.dumps([sys.argv[1:], {{k: os.environ.get(k) for k in {keys!r}}}]) + "\\n")
from data_prep.malloc_env import reexec_with_malloc_env
reexec_with_malloc_env([__file__, *sys.argv[1:]])
"""


def _run(tmp_path, env) -> list:
    """Start the child with ``env`` changes (None = unset); one log line per start of it."""
    log, child = tmp_path / "log.jsonl", tmp_path / "child.py"
    log.unlink(missing_ok=True)
    child.write_text(CHILD.format(root=ROOT, log=str(log), keys=list(MALLOC_ENV)))
    env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    subprocess.run([sys.executable, str(child), "a b", "--x"], check=True, env=env, timeout=60)
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.skipif(not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"), reason="glibc only")
def test_reexec_sets_missing_settings_keeps_explicit_ones_and_args(tmp_path):
    starts = _run(tmp_path, {**{k: None for k in MALLOC_ENV}, "MALLOC_ARENA_MAX": "4", "SIGATTN_NO_MALLOC_ENV": None})
    assert len(starts) == 2  # the command ran again, once
    args, env = starts[1]
    assert args == ["a b", "--x"] and env == {**MALLOC_ENV, "MALLOC_ARENA_MAX": "4"}


def test_no_reexec_when_set_or_turned_off(tmp_path):
    assert len(_run(tmp_path, {**MALLOC_ENV, "SIGATTN_NO_MALLOC_ENV": None})) == 1
    starts = _run(tmp_path, {**{k: None for k in MALLOC_ENV}, "SIGATTN_NO_MALLOC_ENV": "1"})
    assert len(starts) == 1 and starts[0][1] == {k: None for k in MALLOC_ENV}

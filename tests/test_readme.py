"""The README stays true: its Python example runs, and every command line it shows names a real make target or a
real ``python -m`` entry point whose ``--help`` lists each option the README passes. (What the commands do is
tested where they live: the demo in tests/training/test_demo.py, build in tests/data_prep/test_build.py, etc.)"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _commands() -> list[list[str]]:
    cmds = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line:
                cmds.append(shlex.split(line))
    return cmds


def test_readme_opens_with_the_two_commands():
    first = _blocks("bash")[0]
    assert [c[:2] for c in _commands()[:2]] == [["make", "demo"], ["make", "test"]], first
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target


def test_readme_python_example_runs():
    blocks = _blocks("python")
    assert blocks
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


@pytest.mark.parametrize("cmd", [c for c in _commands() if c[:2] == ["python", "-m"]], ids=lambda c: " ".join(c[2:4]))
def test_readme_command_options_exist(cmd):
    module, rest = cmd[2], cmd[3:]
    sub = [rest[0]] if module in ("launch", "data_prep", "training.reproduce") else []   # subcommands: launch status, …
    proc = subprocess.run([sys.executable, "-m", module, *sub, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for opt in (a.split("=")[0] for a in rest if a.startswith("--")):
        assert opt in proc.stdout, f"README passes {opt} to python -m {module}, which does not offer it"

"""Run a command with only the GPU image's packages and the wheel kit's importable (the rest of the venv hidden).

    python benchmarks/gpu_image_sim.py [--kit .whl] -- python -m pytest --collect-only -m gpu tests/training

A ``sitecustomize`` put first on PYTHONPATH (so subprocesses inherit it) refuses, as ModuleNotFoundError, every
top-level import whose distribution is in neither benchmarks/gpu_image_packages.txt nor the kit;
``importlib.util.find_spec`` returns None for those, as on the GPU machine. It checks which packages are present,
not their versions (the venv's versions are what gets imported).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SITE = '''
import importlib.metadata as _md, importlib.util as _iu, re as _re, sys as _sys
_ALLOWED = set(%r)
_P2D = _md.packages_distributions()
_TAG = "[gpu-image sim]"


class _Block:
    def find_spec(self, name, path=None, target=None):
        dists = _P2D.get(name) if "." not in name else None
        if not dists or any(_re.sub(r"[-_.]+", "-", d).lower() in _ALLOWED for d in dists):
            return None   # stdlib, local, or allowed: the normal finders decide
        raise ModuleNotFoundError(f"{_TAG} No module named {name!r} ({dists[0]} is not on the GPU machine)", name=name)


_find_spec = _iu.find_spec


def _find_spec_none(name, package=None):
    try:
        return _find_spec(name, package)
    except ModuleNotFoundError as e:
        if _TAG in str(e):
            return None
        raise


_sys.meta_path.insert(0, _Block())
_iu.find_spec = _find_spec_none
'''


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kit", default=".whl", help="folder of the wheel kit (default .whl)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("no command given (put it after --)")
    if not os.path.isdir(args.kit):
        ap.error(f"no wheel kit at {args.kit} (bash benchmarks/gpu_wheels.sh builds it)")
    with open(os.path.join(HERE, "gpu_image_packages.txt")) as f:
        image = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    kit = [w.split("-")[0] for w in os.listdir(args.kit) if w.endswith(".whl")]
    allowed = sorted({norm(n) for n in image + kit} | {"sigattn"})
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "sitecustomize.py"), "w") as f:
            f.write(SITE % (allowed,))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (d, os.environ.get("PYTHONPATH")) if p))
        return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())

"""A/B of ``build`` CPU time between two checkouts, interleaved, for machines whose speed drifts.

Our 2-core VMs drift by ±25 % within minutes, so two benchmark runs taken apart cannot resolve a 10 %
change. This script alternates the two checkouts round by round (each round: one process per side,
one untimed warm-up build, then ``--builds`` timed builds of the same file) and reports, per side, the
median CPU time and the median over rounds of the B/A ratio of round medians (drift cancels inside a
round). Each side runs the way its own CLI would: with ``data_prep.malloc_env``'s settings when that
checkout has the module, without them when it does not.

    git worktree add /tmp/base <rev> && (cd /tmp/base && python setup.py build_ext --inplace)
    python benchmarks/data_prep_ab.py --a /tmp/base --b . [--rounds 6 --builds 4 --replicas 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

CHILD = r"""
import json, os, resource, shutil, sys, time
sys.path.insert(0, sys.argv[1])
from data_prep._torchvision_shim import ensure_importable
ensure_importable()
import streaming  # noqa: F401  (imported before the timed builds)
from data_prep.build import BuildOptions, build
src, out, n = sys.argv[2], sys.argv[3], int(sys.argv[4])
for i in range(n + 1):
    shutil.rmtree(out, ignore_errors=True)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    build([src], out, BuildOptions(), log=lambda *a: None)
    r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    if i:  # the first build of a process pays imports and first-touch page faults
        print(json.dumps({"user_s": r1.ru_utime - r0.ru_utime, "sys_s": r1.ru_stime - r0.ru_stime, "wall_s": wall,
                          "minflt": r1.ru_minflt - r0.ru_minflt}), flush=True)
shutil.rmtree(out, ignore_errors=True)
"""


def side_env(path: str) -> dict[str, str]:
    """The environment this checkout's CLI would build in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["TQDM_DISABLE"] = "1"
    if os.path.isfile(os.path.join(path, "data_prep", "malloc_env.py")):
        from data_prep.malloc_env import MALLOC_ENV
        env.update(MALLOC_ENV)
    return env


def run_side(path: str, src: str, work: str, builds: int) -> list[dict]:
    out = subprocess.run([sys.executable, "-c", CHILD, os.path.abspath(path), src, os.path.join(work, "corpus"),
                          str(builds)], env=side_env(path), capture_output=True, text=True, check=True, timeout=1800)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", required=True, help="baseline checkout (its extensions built)")
    ap.add_argument("--b", default=".", help="candidate checkout")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--builds", type=int, default=4, help="timed builds per side and round")
    ap.add_argument("--replicas", type=int, default=10, help="PBMC 3k copies in the one input file")
    ap.add_argument("--out", default="benchmarks/results/data_prep_ab.json")
    a = ap.parse_args()
    sys.path.insert(0, HERE)
    from data_prep_bench import replicate  # noqa: E402

    from data_prep.datasets import pbmc3k_path  # noqa: E402

    with tempfile.TemporaryDirectory(prefix="data_prep_ab-") as work:
        src = replicate(pbmc3k_path(), a.replicas, os.path.join(work, f"pbmc3k_x{a.replicas}.h5ad"))
        runs: dict[str, list[list[dict]]] = {"a": [], "b": []}
        for r in range(a.rounds):
            for side in ("a", "b") if r % 2 == 0 else ("b", "a"):  # alternate who goes first
                runs[side].append(run_side(getattr(a, side), src, work, a.builds))
            print(f"round {r + 1}/{a.rounds}: " + ", ".join(
                f"{s} {statistics.median(x['user_s'] + x['sys_s'] for x in runs[s][-1]):.3f} CPU-s" for s in "ab"),
                flush=True)
    n_cells = 2700 * a.replicas

    def cpu(round_):
        return statistics.median(x["user_s"] + x["sys_s"] for x in round_)

    summary = {}
    for s in "ab":
        flat = [x for rnd in runs[s] for x in rnd]
        c = statistics.median(x["user_s"] + x["sys_s"] for x in flat)
        summary[s] = {"checkout": os.path.abspath(getattr(a, s)), "malloc_env": "MALLOC_ARENA_MAX" in side_env(getattr(a, s)),
                      "cpu_s": round(c, 3), "cells_per_cpu_s": round(n_cells / c),
                      "user_s": round(statistics.median(x["user_s"] for x in flat), 3),
                      "sys_s": round(statistics.median(x["sys_s"] for x in flat), 3),
                      "wall_s": round(statistics.median(x["wall_s"] for x in flat), 3),
                      "minflt": round(statistics.median(x["minflt"] for x in flat))}
    ratios = [cpu(b) / cpu(a_) for a_, b in zip(runs["a"], runs["b"])]
    res = {"date": time.strftime("%Y-%m-%d"), "cells": n_cells, "rounds": a.rounds, "builds_per_round": a.builds,
           "machine": {"cpus": os.cpu_count()}, "summary": summary,
           "b_over_a_cpu_per_round": [round(x, 3) for x in ratios],
           "b_over_a_cpu_median": round(statistics.median(ratios), 3), "runs": runs}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()

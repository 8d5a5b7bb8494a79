"""benchmarks/data_prep_bench.py: its arithmetic and the build-scaling fit (tiny sizes; no timing asserted)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import data_prep_bench as bench  # noqa: E402


def test_h100_consumption_arithmetic():
    r = bench.h100_cells_per_s(1000)
    flops = 6 * 160e6 + 12 * 12 * 1024 * 1000
    assert r["flops_per_token"] == flops
    assert r["cells_per_s"] == round(0.40 * 989e12 / flops / 1000, 1)


def test_bench_scaling_separates_fixed_and_per_cell_cost(tmp_path):
    res = bench.bench_scaling(str(tmp_path), (1, 2), repeats=1, have={})
    assert [p["cells"] for p in res["points"]] == [2700, 5400]
    (a, b) = res["points"]
    slope = (b["cpu_s"] - a["cpu_s"]) / 2700  # two points: the fit passes through both
    assert res["cpu_us_per_cell"] == pytest.approx(slope * 1e6, abs=0.01)
    assert res["fixed_cpu_s_per_file"] == pytest.approx(a["cpu_s"] - slope * 2700, abs=1e-3)
    assert not list(tmp_path.glob("scaling-*"))  # corpora removed after timing


def test_ab_script_runs_both_sides_and_writes_ratios(tmp_path):
    """benchmarks/data_prep_ab.py end to end on one tiny round (this checkout against itself)."""
    import json
    import os
    import subprocess

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "ab.json"
    subprocess.run([sys.executable, str(root / "benchmarks" / "data_prep_ab.py"), "--a", str(root), "--b", str(root),
                    "--rounds", "1", "--builds", "1", "--replicas", "1", "--out", str(out)],
                   check=True, timeout=600, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    r = json.loads(out.read_text())
    assert [len(r["runs"][s]) for s in "ab"] == [1, 1] and len(r["runs"]["a"][0]) == 1
    assert r["summary"]["a"]["malloc_env"] is True  # this checkout builds with data_prep.malloc_env's settings
    assert r["b_over_a_cpu_median"] == pytest.approx(r["b_over_a_cpu_per_round"][0])

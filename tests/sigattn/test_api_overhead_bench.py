"""benchmarks/api_overhead.py end to end on the CPU at a tiny size: rows, ratios and JSON fields (no timing asserted)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import api_overhead  # noqa: E402


def test_api_overhead_bench_writes_rows(tmp_path):
    out = tmp_path / "api.json"
    api_overhead.main(["--n", "8", "17", "--cells", "2", "--d", "64", "--repeats", "2", "--inner", "1",
                       "--device", "cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {"device", "commit", "date", "rows"} <= set(result)
    rows = result["rows"]
    assert {(r["N"], r["mode"], r["call"]) for r in rows} == {
        (n, m, c) for n in (8, 17) for m in ("fwd", "fwd_bwd") for c in ("api", "op")}
    assert all(r["us_median"] > 0 and len(r["us_all"]) == 2 for r in rows)
    assert all(r["ratio_to_op"] > 0 for r in rows if r["call"] == "api")

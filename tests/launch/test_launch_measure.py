"""launch.measure and benchmarks/training_gpu.py on the CPU: real trainer steps in spawned processes, one rank and
two data-parallel ranks (gloo); rows carry world_size, global and per-GPU rates; the JSON carries the commit."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_training_benchmark_rows_for_one_and_two_ranks(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import training_gpu

    monkeypatch.setenv("SIGATTN_COMMIT", "abc123")
    out = tmp_path / "dp.json"
    assert training_gpu.main(["--runs", "tiny:64", "--attention", "sigmoid", "--world-sizes", "1", "2",
                              "--steps", "2", "--warmup-steps", "1", "--batch-size", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["commit"] == "abc123"
    rows = {r["world_size"]: r for r in res["rows"]}
    assert set(rows) == {1, 2} and all("error" not in r for r in rows.values()), res["rows"]
    for w, r in rows.items():
        assert r["batch_size"] == 2 and r["steps"] == 2 and r["tokens_per_s"] > 0
        assert r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_s"] / w)
        assert r["cells_per_s_per_gpu"] == pytest.approx(r["cells_per_s"] / w)
    # two ranks each train micro-batches of 2 cells of ~64 tokens: the global count is about twice one rank's
    assert rows[2]["tokens_per_s"] / rows[2]["cells_per_s"] == pytest.approx(
        rows[1]["tokens_per_s"] / rows[1]["cells_per_s"], rel=0.2)
    table = out.with_suffix(".md").read_text()
    assert "| GPUs |" in table and "| tiny | 64 | sigmoid | 2 |" in table


def test_measure_refuses_a_bad_world_size():
    from launch.measure import measure

    with pytest.raises(ValueError, match="world_size must be >= 1"):
        measure("tiny", 64, "sigmoid", world_size=0)

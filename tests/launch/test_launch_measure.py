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


@pytest.mark.slow
def test_training_benchmark_real_corpus_against_matched_synthetic(tmp_path, monkeypatch):
    """--mds: a real-shards row and a synthetic row of the same micro-batch, vocabulary and mean cell length."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import training_gpu

    from benchmarks.real_feed import corpus_stats, synthetic_tokens_per_cell
    from data_prep.build import BuildOptions, build
    from data_prep.datasets import pbmc3k_path

    corpus = tmp_path / "corpus"
    build([pbmc3k_path()], str(corpus), BuildOptions(cell_type_key="celltype", seed=3), log=lambda *a: None)
    stats = corpus_stats(corpus)
    assert stats["cells"] == 2700 and 500 < stats["genes_per_cell"] < 1500 and stats["vocab_size"] > 30000
    out = tmp_path / "real.json"
    # context 512: PBMC cells (~850 genes) mostly fill it, some are shorter
    assert training_gpu.main(["--runs", "tiny:512", "--attention", "sigmoid", "--steps", "2", "--warmup-steps", "1",
                              "--batch-size", "2", "--mds", str(corpus), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["mds"] == str(corpus)
    rows = {r["data"]: r for r in res["rows"]}
    assert set(rows) == {"mds", "synthetic_matched"} and all("error" not in r for r in rows.values()), res["rows"]
    real, syn = rows["mds"], rows["synthetic_matched"]
    assert real["corpus_cells"] == 2700 and real["batch_size"] == syn["batch_size"] == 2
    assert 300 < real["tokens_per_cell"] <= 512
    # the matched generator's expected length is the real run's, within one bisection step's reach
    assert synthetic_tokens_per_cell(syn["synthetic_mean_genes"], stats["vocab_size"], 512) == pytest.approx(
        real["tokens_per_cell"], rel=0.05)
    table = out.with_suffix(".md").read_text()
    assert "real / synthetic tokens/s" in table and "| tiny | 512 | sigmoid | mds | 1 |" in table


def test_training_benchmark_refuses_a_folder_that_is_no_corpus(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import training_gpu

    with pytest.raises(SystemExit):
        training_gpu.main(["--runs", "tiny:64", "--mds", str(tmp_path), "--out", str(tmp_path / "x.json")])
    assert "is not a data_prep corpus: manifest.json missing" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()

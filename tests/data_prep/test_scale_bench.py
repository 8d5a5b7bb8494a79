"""benchmarks/data_prep_scale.py at small scale: multi-rank exact resume, the resume check itself, records."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep.build import BuildOptions, build
from data_prep.synth_census import SynthOptions, write_corpus

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import data_prep_scale as bench  # noqa: E402


@pytest.fixture(scope="module")
def synth_corpus(tmp_path_factory):
    """3 synthetic census datasets (≈ 600 cells, 2,000 genes), built with the default options."""
    d = tmp_path_factory.mktemp("synth")
    recs = write_corpus(d / "h5ad", 600, 3, SynthOptions(n_genes=2000, min_len=210, max_len=400), progress=False)
    m = build([r["path"] for r in recs], str(d / "corpus"), BuildOptions(), log=lambda *a: None)
    return str(d / "corpus"), m


def test_check_resume_accepts_exact_and_finds_gaps_and_repeats(rng):
    n, ranks = int(rng.integers(50, 90)), 3
    order = rng.permutation(n)
    padded = np.concatenate([order, order[: ranks * -(-n // ranks) - n]])  # streaming's padding
    shares = [padded[r::ranks] for r in range(ranks)]
    k = int(rng.integers(1, len(shares[0]) - 1))
    a, b = [s[:k] for s in shares], [s[k:] for s in shares]
    ok = bench.check_resume(a, b, n)
    assert ok["exact"] and ok["repeated"] == ok["padding_expected"] and ok["unique"] == n
    skipped = bench.check_resume(a, [b[0][1:], *b[1:]], n)  # one cell lost at the restart
    assert not skipped["exact"] and "never seen" in skipped["problems"][0]
    twice = bench.check_resume(a, [np.concatenate([a[0][-1:], b[0][:-1]]), *b[1:]], n)  # one cell replayed
    assert not twice["exact"] and any("seen twice" in p for p in twice["problems"])


@pytest.mark.slow
def test_resume_across_rank_processes_gives_exactly_the_rest(synth_corpus, tmp_path, rng):
    """2 rank processes stop after k batches and save state; 2 fresh ones resume: their cells are
    exactly what an uninterrupted run of each rank gives after its first k batches (same order)."""
    corpus, m = synth_corpus
    n_train = m["split"]["n_cells"]["train"]
    bs, ranks = 8, 2
    k = int(rng.integers(2, n_train // (ranks * bs) - 2))
    full = bench.run_ranks(corpus, str(tmp_path), "f", ranks, 64, bs, 1, seed=3, quiet=True)
    a = bench.run_ranks(corpus, str(tmp_path), "a", ranks, 64, bs, 1, limit=k, save_state=True, seed=3, quiet=True)
    states = [json.loads(Path(s["state"]).read_text()) for s in a]
    assert states[0] == states[1] and states[0]["sample_in_epoch"] == ranks * bs * k
    b = bench.run_ranks(corpus, str(tmp_path), "b", ranks, 64, bs, 1, state_in=a[0]["state"], seed=3, quiet=True)
    for r in range(ranks):
        assert len(a[r]["ids"]) == k * bs
        assert np.array_equal(np.concatenate([a[r]["ids"], b[r]["ids"]]), full[r]["ids"])
    res = bench.check_resume([s["ids"] for s in a], [s["ids"] for s in b], n_train)
    assert res["exact"], res["problems"]


@pytest.mark.slow
def test_benchmark_end_to_end_writes_json_and_plot(tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    work = tmp_path / "work"
    bench.main(["--cells", "600", "--datasets", "3", "--sizes", "200,600", "--synth-args",
                "--genes 2000 --min-len 210 --max-len 400", "--ranks", "2", "--num-workers", "0", "--batch-size", "8",
                "--cells-tput", "16", "--work", str(work), "--out", str(out), "--plot", str(png), "--quiet"])
    r = json.loads(out.read_text())
    assert [b["n_cells"] for b in r["build"]] == [200, 600] and r["generate"]["cells"] == 600
    assert all(b["peak_rss_mb"] > 50 and b["cpu_s"] > 0 for b in r["build"])
    assert r["loader"]["resume"]["exact"] and r["loader"]["resume"]["unique"] == r["build"][-1]["n_train"]
    assert r["loader"]["ctx_2k"]["cells_per_rank"] == [16, 16] and r["loader"]["ctx_8k"]["target_per_rank"] > 100
    assert len(r["commit"]) == 40 and png.stat().st_size > 10_000
    assert not work.exists()  # generated data deleted


def test_rank_summary_reports_the_steady_phase_only_where_the_cpu_clock_saw_it():
    # a short steady phase can take less than one 10 ms CPU tick on a rank: no division by zero, no steady figures
    base = {"cells": 16, "wall_s": 2.0, "cpu_s": 1.0, "tokens": 4000, "peak_rss_mb": 300.0}
    seen = [base | {"steady_cells": 8, "steady_cpu_s": 0.5}, base | {"steady_cells": 8, "steady_cpu_s": 0.25}]
    r = bench.rank_summary(seen, 2048, 1000.0)
    assert r["steady_cells_per_cpu_s_per_rank"] == [16, 32] and r["median_steady_cells_per_cpu_s"] == 24
    r = bench.rank_summary([seen[0], base | {"steady_cells": 8, "steady_cpu_s": 0.0}], 2048, 1000.0)
    assert "median_steady_cells_per_cpu_s" not in r and r["median_cells_per_cpu_s"] == 16

"""data_prep.synth_census: CellxGene-schema h5ad files, chunked writing, length model, build round trip."""

import os
import tracemalloc

import anndata as ad
import numpy as np
import pytest

from data_prep.build import BuildOptions, build
from data_prep.synth_census import (OBS_COLUMNS, GeneModel, SynthOptions, length_summary, main, split_cells,
                                    write_corpus, write_dataset)

SMALL = SynthOptions(n_genes=3000, min_len=50, max_len=600, chunk_cells=97)


@pytest.fixture
def seed(rng):
    return int(rng.integers(1 << 30))


def test_files_follow_the_census_schema(tmp_path, seed):
    opts = SynthOptions(**{**SMALL.__dict__, "seed": seed})
    recs = write_corpus(tmp_path, 701, 3, opts, progress=False)
    assert [r["n_cells"] for r in recs] == [234, 234, 233]
    ids = set()
    for r in recs:
        a = ad.read_h5ad(r["path"])
        X = a.X
        assert X.format == "csr" and X.dtype == np.float32 and X.indices.dtype == np.int32
        assert X.has_sorted_indices and np.array_equal(X.data, np.rint(X.data)) and X.data.min() >= 1
        assert X.nnz == r["nnz"] and X.shape == (r["n_cells"], 3000)
        assert list(a.obs.columns) == list(OBS_COLUMNS)
        n = np.diff(X.indptr)
        assert np.array_equal(a.obs["nnz"].to_numpy(), n)
        assert np.allclose(a.obs["raw_sum"].to_numpy(), np.asarray(X.sum(1)).ravel())
        assert a.var_names[0] == "ENSG00000000001" and a.var_names.is_unique and a.var.index.name == "feature_id"
        assert a.obs["dataset_id"].nunique() == 1 and a.obs["donor_id"].nunique() >= 3
        assert a.obs["cell_type"].nunique() >= 3
        ct, ct_id = a.obs["cell_type"].astype(str), a.obs["cell_type_ontology_term_id"].astype(str)
        assert (ct + ct_id).nunique() == ct.nunique() and ct_id.str.startswith("CL:").all()
        assert a.obs["is_primary_data"].dtype == bool
        assert a.uns["schema_version"]
        ids.add(a.obs["dataset_id"].iloc[0])
        assert not os.path.exists(r["path"] + ".part")
    assert len(ids) == 3


def test_same_seed_same_file_other_seed_other_file(tmp_path, seed):
    opts = SynthOptions(**{**SMALL.__dict__, "seed": seed})
    a = write_dataset(tmp_path / "a.h5ad", 1, 150, opts)
    b = write_dataset(tmp_path / "b.h5ad", 1, 150, opts)
    c = write_dataset(tmp_path / "c.h5ad", 1, 150, SynthOptions(**{**opts.__dict__, "seed": seed + 1}))
    xa, xb, xc = (ad.read_h5ad(r["path"]).X for r in (a, b, c))
    assert (xa != xb).nnz == 0
    assert xa.shape != xc.shape or (xa != xc).nnz > 0


@pytest.mark.parametrize("target", [37, 400, 1500])
def test_realised_length_matches_the_target_on_average(rng, target):
    """Saturated (popular) genes absorb several points; points_for compensates: E[length] = target."""
    m = GeneModel(6000, int(rng.integers(1 << 30)))
    types = rng.integers(0, 20, 300)
    x = m.cells(rng, np.full(300, target), np.sort(types))
    n = np.diff(x.indptr)
    assert abs(n.mean() - target) < 0.05 * target + 2
    rows = np.split(x.indices, x.indptr[1:-1])
    assert all((np.diff(r) > 0).all() for r in rows)  # sorted and distinct within every cell


def test_corpus_lengths_have_a_census_like_shape(tmp_path):
    """Default model on 5 datasets (one per assay): median ≈ 2K, a Smart-seq tail towards 10K."""
    recs = write_corpus(tmp_path, 2500, 5, SynthOptions(chunk_cells=500), progress=False)
    s = length_summary([r["path"] for r in recs])
    assert 1500 < s["p50"] < 2600 and s["p99"] > 5000 and s["max"] <= 10_000 and s["p1"] >= 100


def test_memory_is_bounded_by_the_chunk_not_the_file(tmp_path):
    """Python-level peak (numpy reports to tracemalloc) grows with the obs table only, not with X."""
    opts = SynthOptions(n_genes=3000, min_len=500, max_len=600, chunk_cells=200)
    model = GeneModel(opts.n_genes, 0)
    peaks = []
    for n in (1000, 4000):
        tracemalloc.start()
        write_dataset(tmp_path / f"m{n}.h5ad", 0, n, opts, model)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    x_bytes = 4000 * 550 * 8  # the larger file's X: data + indices
    assert peaks[1] - peaks[0] < 0.25 * x_bytes, peaks


def test_build_reads_the_files(tmp_path, seed):
    opts = SynthOptions(**{**SMALL.__dict__, "seed": seed, "not_primary": 0.1, "min_len": 150})
    recs = write_corpus(tmp_path / "h5ad", 600, 3, opts, progress=False)
    m = build([r["path"] for r in recs], str(tmp_path / "c"), BuildOptions(min_genes=200), log=lambda *a: None)
    not_primary = sum(r["not_primary"] for r in recs)
    assert m["totals"]["cells_in"] == 600
    assert sum(d["dropped_not_primary"] for d in m["datasets"]) == not_primary > 0
    assert m["split"]["effective"] == "donor"
    assert all(d["gene_key"] == "var_names" and d["match_ratio"] == 1.0 for d in m["datasets"])
    # labels come from the kept cells only: a type seen only on dropped cells (not primary, < 200 genes) is absent
    kept = set()
    for r in recs:
        obs = ad.read_h5ad(r["path"]).obs
        keep = obs["is_primary_data"].to_numpy(bool) & (obs["nnz"].to_numpy() >= 200)
        kept |= set(obs["cell_type"].astype(str)[keep])
    assert set(m["labels"]["cell_type"]) == kept


def test_cli_and_errors(tmp_path, capsys):
    assert main([str(tmp_path), "--cells", "120", "--datasets", "2", "--genes", "2000", "--max-len", "300"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["synth-00.h5ad", "synth-01.h5ad"]
    assert "expressed genes per cell" in capsys.readouterr().out
    assert main([str(tmp_path / "x"), "--cells", "1", "--datasets", "2"]) == 2
    assert "n_datasets" in capsys.readouterr().err
    assert main([str(tmp_path / "y"), "--cells", "10", "--genes", "2000", "--max-len", "3000"]) == 2
    with pytest.raises(ValueError, match="n_genes"):
        GeneModel(70_000, 0)
    assert split_cells(10, 3) == [4, 3, 3]

import json
import os
import shutil
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from h5ad_factory import ensembl, synth_counts, write_h5ad

from data_prep._torchvision_shim import ensure_importable
from data_prep.build import BuildOptions, build
from data_prep.datasets import pbmc68k_reduced_path
from data_prep.malloc_env import MALLOC_ENV
from data_prep.source import SourceError
from data_prep.vocab import GeneVocab

ensure_importable()
from streaming import StreamingDataset  # noqa: E402
from streaming.base.util import clean_stale_shared_memory  # noqa: E402

QUIET = {"log": lambda *a: None}


def _opts(**kw):
    kw.setdefault("min_genes", 3)
    return BuildOptions(**kw)


def _mds_samples(corpus, split):
    ds = StreamingDataset(local=os.path.join(corpus, "mds", split), shuffle=False, batch_size=1)
    out = [ds[i] for i in range(len(ds))]
    del ds
    clean_stale_shared_memory()
    return out


# --- the real PBMC 3k corpus -------------------------------------------------------------------

def test_pbmc_zarr_roundtrip_every_gene(pbmc_corpus, pbmc_path):
    corpus, m = pbmc_corpus
    rec = m["datasets"][0]
    assert rec["count_source"] == "X" and rec["gene_key"] == "gene_ids" and rec["match_ratio"] == 1.0
    z = ad.read_zarr(os.path.join(corpus, rec["zarr"]))
    src = ad.read_h5ad(pbmc_path)
    assert z.shape == (rec["cells_out"], src.n_vars) and rec["cells_in"] == 2700
    rows = z.obs["source_row"].to_numpy()
    assert (z.X != sp.csr_matrix(src.X[rows])).nnz == 0  # every gene, exact counts
    assert z.X.dtype == np.int32 and list(z.var_names) == list(src.var_names)
    assert (z.obs["celltype"].astype(str).to_numpy() == src.obs["celltype"].astype(str).to_numpy()[rows]).all()
    vocab = GeneVocab.load(os.path.join(corpus, "vocab.tsv"))
    assert np.array_equal(z.var["vocab_id"].to_numpy(), vocab.map_var(src.var))
    x = zarr.open_group(os.path.join(corpus, rec["zarr"]), mode="r")["X"]
    for name in ("data", "indices", "indptr"):
        assert x[name].metadata.zarr_format == 3
        assert type(x[name].metadata.codecs[0]).__name__ == "ShardingCodec"
        assert [type(c).__name__ for c in x[name].compressors] == ["BloscCodec"]
    assert m["mds"]["columns"]["genes"] == "ndarray:uint16" and m["mds"]["columns"]["counts"] == "ndarray"
    assert m["mds"]["compression"] == "zstd:1" and m["mds"]["shard_mb"] == 16 and m["format_version"] == 2


def test_pbmc_manifest_split_fallback_and_labels(pbmc_corpus):
    corpus, m = pbmc_corpus
    assert m["split"]["requested"] == "donor" and m["split"]["effective"] == "cell"
    assert "fallback_reason" in m["split"]
    n = m["split"]["n_cells"]
    assert sum(n.values()) == m["totals"]["cells_in_mds"] == m["totals"]["cells_out"]
    assert 0.05 < n["val"] / sum(n.values()) < 0.15 and 0.05 < n["test"] / sum(n.values()) < 0.15
    assert len(m["labels"]["cell_type"]) == 8 and "CD4 T" in m["labels"]["cell_type"]
    assert m["vocab"]["size"] == 32738 and len(m["vocab"]["sha256"]) == 64
    with open(os.path.join(corpus, "manifest.json")) as f:
        assert json.load(f)["fingerprint"] == m["fingerprint"]
    types = [s["cell_type"] for s in _mds_samples(corpus, "val")]
    assert max(types) < 8 and len(set(types)) >= 4


def test_scaled_scanpy_file_is_refused(tmp_path):
    with pytest.raises(SourceError, match="no raw counts.*X has negative values.*raw.X has non-integer"):
        build([pbmc68k_reduced_path()], str(tmp_path / "c"), _opts(), **QUIET)
    assert not (tmp_path / "c").exists() and [p.name for p in tmp_path.iterdir()] == [".c.lock"]  # nothing else


def test_corrupt_and_truncated_files(tmp_path, pbmc_path):
    trunc = tmp_path / "trunc.h5ad"
    data = open(pbmc_path, "rb").read()
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match="corrupt or truncated"):
        build([str(trunc)], str(tmp_path / "c"), _opts(), **QUIET)
    junk = tmp_path / "junk.h5ad"
    junk.write_bytes(np.random.default_rng().bytes(5000))
    with pytest.raises(SourceError, match="corrupt or truncated"):
        build([str(junk)], str(tmp_path / "c"), _opts(), **QUIET)
    with pytest.raises(SourceError, match="no such file"):
        build([str(tmp_path / "missing.h5ad")], str(tmp_path / "c"), _opts(), **QUIET)


def test_csc_file_is_refused(tmp_path, rng):
    p = write_h5ad(tmp_path / "csc.h5ad", synth_counts(rng, 30, 20).tocsc())
    with pytest.raises(SourceError, match="CSC"):
        build([p], str(tmp_path / "c"), _opts(), **QUIET)


# --- synthetic files for the bad cases --------------------------------------------------------

@pytest.mark.parametrize("bad,msg", [(np.nan, "NaN"), (-2.0, "negative"), (2.5, "non-integer")])
def test_bad_values_are_refused_with_rows(tmp_path, rng, bad, msg):
    X = synth_counts(rng, 120, 40)
    row = int(rng.integers(0, 120))
    X[row, X[row].indices[0]] = bad
    p = write_h5ad(tmp_path / "bad.h5ad", X)
    with pytest.raises(SourceError, match=msg):
        build([p], str(tmp_path / "c"), _opts(), **QUIET)


def test_raw_preferred_when_x_is_normalised(tmp_path, rng):
    counts = synth_counts(rng, 80, 30)
    raw = ad.AnnData(X=counts, var=pd.DataFrame(index=[ensembl(i) for i in range(30)]))
    norm = counts.multiply(1e4 / counts.sum(1)).tocsr()
    norm.data = np.log1p(norm.data)
    p = write_h5ad(tmp_path / "n.h5ad", norm.astype(np.float32), raw=raw)
    m = build([p], str(tmp_path / "c"), _opts(), **QUIET)
    assert m["datasets"][0]["count_source"] == "raw.X"
    z = ad.read_zarr(tmp_path / "c" / m["datasets"][0]["zarr"])
    assert (z.X != counts[z.obs["source_row"].to_numpy()]).nnz == 0


def _lognorm(counts):
    norm = counts.multiply(1e4 / counts.sum(1)).tocsr()
    norm.data = np.log1p(norm.data)
    return norm.astype(np.float32)


@pytest.mark.parametrize("name", ["counts", "my_umis"])
def test_counts_found_in_a_layer_when_x_and_raw_are_normalised(tmp_path, rng, name):
    # the scanpy/scvi-tools layout: counts kept in a layer, X and raw.X log-normalised; any layer name is probed
    # (conventional names first), a CSC layer is skipped and named only if nothing else holds counts
    counts = synth_counts(rng, 90, 30)
    norm = _lognorm(counts)
    raw = ad.AnnData(X=norm, var=pd.DataFrame(index=[ensembl(i) for i in range(30)]))
    layers = {"lognorm": norm, name: counts, "a_csc": counts.tocsc()}
    p = write_h5ad(tmp_path / "n.h5ad", norm, raw=raw, layers=layers)
    m = build([p], str(tmp_path / "c"), _opts(), **QUIET)
    assert m["datasets"][0]["count_source"] == f'layers["{name}"]'
    z = ad.read_zarr(tmp_path / "c" / m["datasets"][0]["zarr"])
    assert (z.X != counts[z.obs["source_row"].to_numpy()]).nnz == 0
    p = write_h5ad(tmp_path / "none.h5ad", norm, raw=raw, layers={"lognorm": norm, "a_csc": counts.tocsc()})
    with pytest.raises(SourceError, match=r'no raw counts: X has non-integer.*raw\.X has non-integer.*'
                                          r'layers\["a_csc"\] is unreadable row by row.*CSC.*'
                                          r'layers\["lognorm"\] has non-integer'):
        build([p], str(tmp_path / "c2"), _opts(), **QUIET)


def test_counts_in_a_layer_of_a_legacy_layout_file(tmp_path, rng):
    # no root encoding attributes (pre-0.7 anndata): read through anndata's backed reader, layers included
    import h5py

    counts = synth_counts(rng, 70, 25)
    p = write_h5ad(tmp_path / "legacy.h5ad", _lognorm(counts), layers={"counts": counts})
    with h5py.File(p, "r+") as f:
        del f.attrs["encoding-type"], f.attrs["encoding-version"]
    m = build([p], str(tmp_path / "c"), _opts(), **QUIET)
    assert m["datasets"][0]["count_source"] == 'layers["counts"]'
    z = ad.read_zarr(tmp_path / "c" / m["datasets"][0]["zarr"])
    assert (z.X != counts[z.obs["source_row"].to_numpy()]).nnz == 0


def test_tolerance_rounding_qc_and_primary(tmp_path, rng):
    n, g = 150, 50
    X = synth_counts(rng, n, g, density=0.3).tolil()
    X[5, :] = 0
    X[5, 0] = 1  # one gene: below min_genes
    X[7, :] = 0  # empty
    X = X.tocsr()
    X.data[0] += 4e-4  # within tolerance
    primary = np.ones(n, dtype=bool)
    drop_primary = rng.choice(np.setdiff1d(np.arange(n), [5, 7]), 9, replace=False)
    primary[drop_primary] = False
    obs = pd.DataFrame({"is_primary_data": primary}, index=[f"c{i}" for i in range(n)])
    p = write_h5ad(tmp_path / "q.h5ad", X, obs=obs)
    m = build([p], str(tmp_path / "c"), _opts(min_genes=2), **QUIET)
    rec = m["datasets"][0]
    expressed = np.diff(X.indptr)
    low = int(((expressed < 2) & primary).sum())
    assert rec["dropped_min_genes"] == low >= 2 and rec["dropped_not_primary"] == 9
    assert rec["cells_out"] == n - low - 9 == m["totals"]["cells_in_mds"]
    z = ad.read_zarr(tmp_path / "c" / rec["zarr"])
    rows = z.obs["source_row"].to_numpy()
    assert not set(rows) & (set(drop_primary) | {5, 7})
    assert (z.X != sp.csr_matrix(np.round(X[rows].toarray())).astype(np.int32)).nnz == 0


def test_unknown_duplicate_and_versioned_ids(tmp_path, rng):
    vocab = GeneVocab([ensembl(i) for i in range(10)])
    vocab.save(tmp_path / "vocab.tsv")
    # genes 0..7 known (gene 3 twice: versioned duplicate), then two unknown IDs
    names = [ensembl(i) + ".5" for i in range(8)] + [ensembl(3) + ".9", ensembl(77), ensembl(78)]
    X = synth_counts(rng, 60, len(names), density=0.5)
    p = write_h5ad(tmp_path / "u.h5ad", X, var=pd.DataFrame({"gene_ids": names},
                                                             index=[f"S{i}" for i in range(len(names))]))
    m = build([p], str(tmp_path / "c"), _opts(vocab=str(tmp_path / "vocab.tsv"), val_frac=0, test_frac=0), **QUIET)
    rec = m["datasets"][0]
    assert rec["n_genes_mapped"] == 9 and rec["n_genes_duplicate"] == 1 and rec["n_genes"] == 11
    z = ad.read_zarr(tmp_path / "c" / rec["zarr"])
    assert z.var["vocab_id"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 3, -1, -1]
    dense = X.toarray()
    for s in _mds_samples(str(tmp_path / "c"), "train"):
        row = dense[z.obs["source_row"].iloc[s["cell_id"]]]
        expect = np.zeros(10)
        np.add.at(expect, [0, 1, 2, 3, 4, 5, 6, 7, 3], row[:9])
        got = np.zeros(10)
        got[s["genes"]] = s["counts"]
        assert np.array_equal(got, expect) and len(set(s["genes"])) == len(s["genes"])


def test_symbol_only_file_mapped_via_table_and_match_threshold(tmp_path, rng):
    ids = [ensembl(i) for i in range(40)]
    syms = [f"GENE{i}" for i in range(40)]
    table = tmp_path / "table.csv"
    pd.DataFrame({"gene_id": ids, "gene_name": syms}).to_csv(table, index=False)
    with_ids = write_h5ad(tmp_path / "a.h5ad", synth_counts(rng, 50, 40),
                          var=pd.DataFrame({"gene_ids": ids}, index=syms))
    sym_only = write_h5ad(tmp_path / "b.h5ad", synth_counts(rng, 50, 30), var_names=syms[5:35])
    m = build([with_ids, sym_only], str(tmp_path / "c"), _opts(symbol_table=str(table)), **QUIET)
    b = m["datasets"][1]
    assert b["gene_key"].startswith("symbols") and b["n_genes_mapped"] == 30
    z = ad.read_zarr(tmp_path / "c" / b["zarr"])
    assert z.var["vocab_id"].tolist() == list(range(5, 35))
    # vocabulary symbols alone (no table) also map the symbol-only file
    m2 = build([with_ids, sym_only], str(tmp_path / "c2"), _opts(), **QUIET)
    assert m2["datasets"][1]["n_genes_mapped"] == 30
    # a file whose genes are mostly unknown is refused, the corpus is not written
    unknown = write_h5ad(tmp_path / "x.h5ad", synth_counts(rng, 50, 20),
                         var_names=[ensembl(1000 + i) for i in range(15)] + ids[:5])
    with pytest.raises(SourceError, match=r"5/20 genes \(25.0%\).*min-match 50%"):
        build([unknown], str(tmp_path / "c3"), _opts(vocab=str(tmp_path / "c" / "vocab.tsv")), **QUIET)
    m4 = build([unknown], str(tmp_path / "c3"), _opts(vocab=str(tmp_path / "c" / "vocab.tsv"), min_match=0.2), **QUIET)
    assert m4["datasets"][0]["match_ratio"] == 0.25


def test_symbol_only_dense_file_builds_with_the_default_gencode_table(tmp_path, rng):
    """A file as users bring it: symbols only, dense float counts, no obs columns, no --symbol-table."""
    from data_prep.vocab import DEFAULT_SYMBOL_TABLE, read_symbol_table

    gencode = read_symbol_table(DEFAULT_SYMBOL_TABLE)
    n_known, n_unknown = int(rng.integers(30, 60)), int(rng.integers(3, 9))
    known = list(rng.choice(sorted(gencode), n_known, replace=False))
    syms = known + [f"NOT_A_GENE{i}" for i in range(n_unknown)]
    order = rng.permutation(len(syms))
    syms = [syms[i] for i in order]
    X = synth_counts(rng, int(rng.integers(40, 90)), len(syms), density=0.4).toarray()   # dense float32
    is_known = np.array([not s.startswith("NOT_A_GENE") for s in syms])

    def check(path, heavy_unknown: bool):
        out = tmp_path / ("heavy" if heavy_unknown else "light")
        m = build([path], str(out), _opts(val_frac=0, test_frac=0), **QUIET)
        rec = m["datasets"][0]
        assert rec["gene_key"] == "symbols (var_names)" and rec["n_genes_mapped"] == n_known
        assert m["symbol_table"]["path"] == str(DEFAULT_SYMBOL_TABLE) and "GENCODE release 44" in m["symbol_table"]["source"]
        z = ad.read_zarr(out / rec["zarr"])
        kept = X[z.obs["source_row"].to_numpy()]
        assert rec["counts_total"] == int(kept.sum()) and rec["counts_mapped"] == int(kept[:, is_known].sum())
        assert rec["count_share_mapped"] == pytest.approx(kept[:, is_known].sum() / kept.sum(), abs=1e-6)
        vocab = GeneVocab.load(out / "vocab.tsv")
        assert sorted(vocab.gene_ids.tolist()) == sorted(gencode[s] for s in known)
        assert [vocab.gene_ids[v] if v >= 0 else None for v in z.var["vocab_id"]] == [gencode.get(s) for s in syms]
        return m

    m = check(write_h5ad(tmp_path / "light.h5ad", X, var_names=syms), heavy_unknown=False)
    share_genes = n_known / len(syms)
    mapping = [w for w in m["warnings"] if "map to the vocabulary" in w]  # (the others: no cell_type / donor_id)
    assert bool(mapping) == (share_genes < 0.8 or m["datasets"][0]["count_share_mapped"] < 0.9)
    X[:, ~is_known] *= 1000                                      # unknown genes now hold most counts: warned
    m = check(write_h5ad(tmp_path / "heavy.h5ad", X, var_names=syms), heavy_unknown=True)
    [w] = [w for w in m["warnings"] if "map to the vocabulary" in w]
    assert f"{n_known}/{len(syms)} genes" in w and "of the counts map" in w and "--symbol-table" in w


def test_build_cli_reports_the_mapped_share_and_warns(tmp_path, rng):
    X = synth_counts(rng, 60, 12, density=0.5)
    p = write_h5ad(tmp_path / "s.h5ad", X, var_names=["CD3E", "MS4A1", "NKG7", "LYZ"] + [f"NOPE{i}" for i in range(8)])
    env = {**os.environ, "SIGATTN_NO_MALLOC_ENV": "1"}
    proc = subprocess.run([sys.executable, "-m", "data_prep", "build", p, "--out", str(tmp_path / "c"), "--min-genes", "1",
                           "--split-by", "cell", "--min-match", "0.3"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "s 4/12 (" in proc.stdout and "% of counts)" in proc.stdout
    assert "WARNING: s: only 4/12 genes (33.3%)" in proc.stderr


def _donor_files(tmp_path, rng, n_files=2, donors_per_file=6):
    paths = []
    for f in range(n_files):
        n = int(rng.integers(80, 160))
        obs = pd.DataFrame({"donor_id": [f"d{d}" for d in rng.integers(0, donors_per_file, n)],
                            "cell_type": rng.choice(["T", "B", "NK"], n)}, index=[f"f{f}c{i}" for i in range(n)])
        paths.append(write_h5ad(tmp_path / f"ds{f}.h5ad", synth_counts(rng, n, 30), obs=obs))
    return paths


def test_split_by_donor_no_leakage_and_deterministic(tmp_path, rng):
    paths = _donor_files(tmp_path, rng)
    opts = _opts(split_by="donor", val_frac=0.15, test_frac=0.15, seed=int(rng.integers(1000)))
    m1 = build(paths, str(tmp_path / "c1"), opts, **QUIET)
    m2 = build(paths, str(tmp_path / "c2"), opts, **QUIET)
    assert m1["split"] == m2["split"] and m1["split"]["effective"] == "donor"
    donors = {s: {x["donor"] for x in _mds_samples(str(tmp_path / "c1"), s)} for s in ("train", "val", "test")}
    assert all(donors[s] for s in donors)
    assert not donors["train"] & donors["val"] and not donors["train"] & donors["test"] \
        and not donors["val"] & donors["test"]
    names = m1["labels"]["donor"]
    assert {names[d] for d in donors["val"]} == set(m1["split"]["groups"]["val"])
    assert len(names) == 12  # the same donor name in two datasets is two donors
    ids = sorted(x["cell_id"] for s in ("train", "val", "test") for x in _mds_samples(str(tmp_path / "c1"), s))
    assert ids == list(range(m1["totals"]["cells_out"]))  # unique across the corpus
    m3 = build(paths, str(tmp_path / "c3"), _opts(split_by="dataset"), **QUIET)
    assert m3["split"]["effective"] == "cell"  # two datasets cannot fill three splits


def test_idempotent_rerun_and_option_change(tmp_path, rng):
    paths = _donor_files(tmp_path, rng, n_files=1)
    out = tmp_path / "c"
    m1 = build(paths, str(out), _opts(), **QUIET)
    stamp = os.stat(out / "manifest.json").st_mtime_ns
    m2 = build(paths, str(out), _opts(workers=2), **QUIET)  # workers do not change the result
    assert m2.get("skipped") and os.stat(out / "manifest.json").st_mtime_ns == stamp
    m3 = build(paths, str(out), _opts(seed=9), **QUIET)
    assert not m3.get("skipped") and m3["fingerprint"] != m1["fingerprint"]


def test_failed_rebuild_leaves_corpus_intact(tmp_path, rng, monkeypatch):
    paths = _donor_files(tmp_path, rng, n_files=1)
    out = tmp_path / "c"
    m1 = build(paths, str(out), _opts(), **QUIET)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))

    def boom(*a, **k):
        raise RuntimeError("simulated crash while writing MDS")

    import data_prep.mds
    monkeypatch.setattr(data_prep.mds, "write_mds", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        build(paths, str(out), _opts(seed=5), **QUIET)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert json.load(open(out / "manifest.json"))["fingerprint"] == m1["fingerprint"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temp dir left behind
    # a build killed outright leaves its temp dir: the next build clears it; a concurrent one is refused
    (tmp_path / ".c.tmp-killed").mkdir()
    monkeypatch.undo()
    build(paths, str(out), _opts(seed=6), **QUIET)
    assert not (tmp_path / ".c.tmp-killed").exists()
    import fcntl
    with open(tmp_path / ".c.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="another build"):
            build(paths, str(out), _opts(seed=7), **QUIET)


def test_parallel_writers_same_content(tmp_path, rng):
    paths = _donor_files(tmp_path, rng, n_files=2)
    kw = dict(cells_per_part=37, split_by="cell", val_frac=0.2, test_frac=0.1)
    build(paths, str(tmp_path / "w1"), _opts(workers=1, **kw), **QUIET)
    m = build(paths, str(tmp_path / "w2"), _opts(workers=2, **kw), **QUIET)
    assert m["mds"]["shards"]["train"] > 2  # several parts merged into one index
    for split in ("train", "val", "test"):
        a = sorted(_mds_samples(str(tmp_path / "w1"), split), key=lambda s: s["cell_id"])
        b = sorted(_mds_samples(str(tmp_path / "w2"), split), key=lambda s: s["cell_id"])
        assert len(a) == len(b) == m["split"]["n_cells"][split]
        for x, y in zip(a, b):
            assert all(np.array_equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("layout", ["csr", "csr_int64", "dense", "raw"])
def test_chunked_reads_reuse_buffers_exactly(tmp_path, rng, layout):
    """Many small chunks (reused read buffers), every on-disk layout: the store equals the source."""
    X = synth_counts(rng, 157, 40, density=0.3)
    X[3] = 0  # explicit zeros and a row dropped by QC
    X[10, :5] = 0.0
    if layout == "csr_int64":
        X = sp.csr_matrix(X.astype(np.int64))
    kw = {"raw": ad.AnnData(X=X, var=pd.DataFrame(index=[ensembl(i) for i in range(40)]))} if layout == "raw" else {}
    x_file = sp.csr_matrix(X * 0.37) if layout == "raw" else (X.toarray() if layout == "dense" else X)
    p = write_h5ad(tmp_path / "a.h5ad", x_file, **kw)
    m = build([p], str(tmp_path / "c"), _opts(min_genes=2, chunk_cells=16, split_by="cell"), **QUIET)
    z = ad.read_zarr(tmp_path / "c" / m["datasets"][0]["zarr"])
    rows = z.obs["source_row"].to_numpy()
    dense = X.toarray()
    assert ((dense > 0).sum(1) >= 2).sum() == len(rows) and 3 not in rows
    assert np.array_equal(z.X.toarray(), dense[rows].astype(np.int32))


def test_unknown_compression_refused_before_writing(tmp_path, rng):
    paths = _donor_files(tmp_path, rng, n_files=1)
    with pytest.raises(ValueError, match="unknown MDS compression 'lz5'"):
        build(paths, str(tmp_path / "c"), _opts(compression="lz5"), **QUIET)
    with pytest.raises(ValueError, match="shard_mb must be ≥ 1"):
        build(paths, str(tmp_path / "c"), _opts(shard_mb=0), **QUIET)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".c", "c"))]
    m = build(paths, str(tmp_path / "c"), _opts(compression="br:1"), **QUIET)
    assert m["mds"]["compression"] == "br:1" and len(_mds_samples(str(tmp_path / "c"), "train")) > 0


def test_cli_summary_and_error(tmp_path, rng):
    p = _donor_files(tmp_path, rng, n_files=1)[0]
    cmd = [sys.executable, "-m", "data_prep", "build", p, "--out", str(tmp_path / "c"), "--min-genes", "2",
           "--split-by", "cell", "--val-frac", "0.1", "--test-frac", "0.1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=os.getcwd())
    assert r.returncode == 0, r.stderr
    assert "cells in" in r.stdout and "shards" in r.stdout
    with open(tmp_path / "c" / "manifest.json") as f:  # the CLI re-ran itself with the malloc settings
        glibc = (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
        assert json.load(f)["malloc_env"] == {k: os.environ.get(k, v if glibc else None) for k, v in MALLOC_ENV.items()}
    r = subprocess.run(cmd[:4] + [pbmc68k_reduced_path()] + cmd[5:], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "error:" in r.stderr and "no raw counts" in r.stderr
    shutil.rmtree(tmp_path / "c")


# --- users' own files: odd layouts and mistakes ---------------------------------------------------

def test_out_that_is_not_a_corpus_is_refused_and_left_untouched(tmp_path, rng):
    """`--out` naming the data directory itself must not replace it (it used to be renamed aside and deleted)."""
    data = tmp_path / "data"
    data.mkdir()
    p = write_h5ad(data / "a.h5ad", synth_counts(rng, 40, 20))
    (data / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a data_prep corpus"):
        build([p], str(data), _opts(split_by="cell"), **QUIET)
    assert sorted(x.name for x in data.iterdir()) == ["a.h5ad", "notes.txt"]
    (tmp_path / "empty").mkdir()  # an empty directory, or a finished corpus, is fine
    build([p], str(tmp_path / "empty"), _opts(split_by="cell"), **QUIET)
    build([p], str(tmp_path / "empty"), _opts(split_by="cell", seed=1), **QUIET)


def test_corpus_directory_gets_the_umask_mode_not_the_temporary_directorys(tmp_path, rng):
    """The build writes into a mkdtemp directory (0700); the finished corpus must be readable as a mkdir'd one is
    (a group sharing the cluster's file system), also after a rebuild replaced it."""
    import os
    import stat
    p = write_h5ad(tmp_path / "a.h5ad", synth_counts(rng, 40, 20))
    old = os.umask(0o022)
    try:
        for seed in (0, 1):
            build([p], str(tmp_path / "c"), _opts(split_by="cell", seed=seed), **QUIET)
            assert stat.S_IMODE(os.stat(tmp_path / "c").st_mode) == 0o755
    finally:
        os.umask(old)


def test_an_empty_held_out_split_is_warned_at_the_build_and_refused_by_the_loader(tmp_path, rng):
    from data_prep.loader import build_loader
    from data_prep.tokenize import CellTokenizer
    p = write_h5ad(tmp_path / "a.h5ad", synth_counts(rng, 6, 20))
    m = build([p], str(tmp_path / "c"), _opts(split_by="cell", val_frac=0.05, test_frac=0.05), **QUIET)
    assert m["mds"]["n_cells"]["val"] == 0
    assert any(w.startswith("split val") and "holds no cells" in w for w in m["warnings"]), m["warnings"]
    with pytest.raises(ValueError, match="the val split at .* holds no cells"):
        build_loader(str(tmp_path / "c"), "val", tokenizer=CellTokenizer(100, 16, 5), batch_size=2)


def test_the_same_content_given_twice_is_warned(tmp_path, rng):
    import shutil
    p = write_h5ad(tmp_path / "a.h5ad", synth_counts(rng, 40, 20))
    q = str(tmp_path / "copy.h5ad")
    shutil.copy(p, q)
    m = build([p, q], str(tmp_path / "c"), _opts(split_by="cell"), **QUIET)
    (w,) = [w for w in m["warnings"] if w.startswith("inputs with the same content")]
    assert "copy = a" in w and m["totals"]["cells_out"] == 2 * m["datasets"][0]["cells_out"] > 0
    m = build([p], str(tmp_path / "d"), _opts(split_by="cell"), **QUIET)
    assert not any("same content" in w for w in m["warnings"])


def test_inputs_of_two_species_are_warned(tmp_path, rng):
    h = write_h5ad(tmp_path / "h.h5ad", synth_counts(rng, 40, 20))
    mouse = [f"ENSMUSG{i:011d}" for i in range(20)]
    m_ = write_h5ad(tmp_path / "m.h5ad", synth_counts(rng, 40, 20), var_names=mouse)
    m = build([h, m_], str(tmp_path / "c"), _opts(split_by="cell"), **QUIET)
    assert [d["ensembl_prefix"] for d in m["datasets"]] == ["ENSG", "ENSMUSG"]
    (w,) = [w for w in m["warnings"] if w.startswith("inputs from more than one species")]
    assert "human (ENSG): h" in w and "mouse (ENSMUSG): m" in w
    m = build([h], str(tmp_path / "d"), _opts(split_by="cell"), **QUIET)
    assert not any("species" in w for w in m["warnings"])


def test_counts_only_in_a_layer_of_a_file_without_x(tmp_path, rng):
    """X = None (allowed by anndata) with the counts in a layer: found there, as the docs promise."""
    counts = synth_counts(rng, 60, 25)
    p = str(tmp_path / "nox.h5ad")
    ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(60)]),
               var=pd.DataFrame(index=[ensembl(i) for i in range(25)]), layers={"counts": counts}).write_h5ad(p)
    m = build([p], str(tmp_path / "c"), _opts(split_by="cell"), **QUIET)
    assert m["datasets"][0]["count_source"] == 'layers["counts"]'
    z = ad.read_zarr(tmp_path / "c" / m["datasets"][0]["zarr"])
    assert (z.X != counts[z.obs["source_row"].to_numpy()]).nnz == 0
    p = str(tmp_path / "empty.h5ad")
    ad.AnnData(obs=pd.DataFrame(index=["c0"]), var=pd.DataFrame(index=[ensembl(0)])).write_h5ad(p)
    with pytest.raises(SourceError, match="no count matrix"):
        build([p], str(tmp_path / "c2"), _opts(), **QUIET)


def test_a_directory_or_a_non_anndata_hdf5_file_is_named_as_such(tmp_path, rng):
    import h5py

    store = tmp_path / "a.zarr"
    ad.AnnData(X=synth_counts(rng, 10, 5)).write_zarr(store)
    with pytest.raises(SourceError, match="is a directory, not an h5ad file"):
        build([str(store)], str(tmp_path / "c"), _opts(), **QUIET)
    tenx = tmp_path / "filtered_feature_bc_matrix.h5"  # a 10x Genomics HDF5 file
    with h5py.File(tenx, "w") as f:
        f.create_group("matrix")["shape"] = [5, 10]
    with pytest.raises(SourceError, match=r"not an h5ad \(AnnData\) file.*matrix.*read_10x_h5"):
        build([str(tenx)], str(tmp_path / "c"), _opts(), **QUIET)


def test_a_label_column_no_input_has_is_warned_with_the_columns_there_are(tmp_path, rng):
    paths = _donor_files(tmp_path, rng, n_files=2)
    m = build(paths, str(tmp_path / "c"), _opts(cell_type_key="celltype", split_by="cell"), **QUIET)
    [w] = m["warnings"]
    assert "--cell-type-key 'celltype'" in w and "'unknown'" in w and "cell_type" in w and "donor_id" in w
    assert m["labels"]["cell_type"] == ["unknown"]
    m = build(paths, str(tmp_path / "c"), _opts(split_by="cell", seed=1), **QUIET)  # keys present: no warning
    assert m["warnings"] == []


def test_no_cell_passing_qc_says_why_and_warns_nothing_else(tmp_path, rng):
    obs = pd.DataFrame({"is_primary_data": [False] * 50}, index=[f"c{i}" for i in range(50)])
    p = write_h5ad(tmp_path / "np.h5ad", synth_counts(rng, 50, 20), obs=obs)
    lines = []
    with pytest.raises(SourceError, match=r"no cell passed QC.*np: 0/50 kept.*50 with is_primary_data False"):
        build([p], str(tmp_path / "c"), _opts(), log=lines.append)
    assert not [x for x in lines if "of the counts" in x]  # no "0.0% of the counts map" for a dataset without cells

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from h5ad_factory import synth_counts, write_h5ad

from data_prep.build import BuildOptions, build
from data_prep.ingest import IngestJob, ingest_all
from data_prep.labels import load_rows
from data_prep.source import PROBE_CELLS, SourceError


def _files(tmp_path, rng, sizes, obs=False):
    def labels(n):  # a label column with a missing value
        if not obs:
            return None
        ct = pd.Series(rng.choice(["T", "B", "NK"], n), dtype="category", index=[f"c{i}" for i in range(n)])
        ct.iloc[int(rng.integers(n))] = np.nan
        return pd.DataFrame({"cell_type": ct})
    return [write_h5ad(tmp_path / f"f{i}.h5ad", synth_counts(rng, n, 25), obs=labels(n)) for i, n in enumerate(sizes)]


def test_parallel_ingest_equals_serial_and_reports_every_cell(tmp_path, rng):
    paths = _files(tmp_path, rng, [int(n) for n in rng.integers(50, 300, 3)], obs=True)
    out = {}
    for workers in (1, 3):
        seen = []
        jobs = [IngestJob(p, str(tmp_path / f"w{workers}-{i}.zarr"), rng.integers(-1, 40, 25).astype(np.int32)
                          if workers == 1 else None, labels=str(tmp_path / f"w{workers}-{i}-labels"),
                          label_keys={"cell_type": "cell_type", "none": "no_such_column"}) for i, p in enumerate(paths)]
        if workers == 3:  # the same vocabulary ids as the serial run
            for j, ref in zip(jobs, out[1][1]):
                j.vocab_ids = ref.vocab_ids
        res = ingest_all(jobs, min_genes=2, chunk_cells=37, workers=workers, progress=seen.append)
        out[workers] = (res, jobs)
        assert sum(seen) == sum(ad.read_h5ad(p).n_obs for p in paths)
    for (a, ja), (b, jb) in zip(zip(*out[1]), zip(*out[3])):
        assert a["stats"] == b["stats"] and a["nnz"] == b["nnz"] and a["n_kept"] == b["n_kept"]
        assert a["labels"] == b["labels"] and a["labels"]["none"] == {"names": ["unknown"], "present": False,
                                                                      "counts": [a["n_kept"]]}
        za, zb = ad.read_zarr(ja.store), ad.read_zarr(jb.store)
        assert (za.X != zb.X).nnz == 0 and za.obs.equals(zb.obs) and za.var.equals(zb.var)
        assert len(za.obs) == a["n_kept"]
        for name in ("cell_type", "none"):  # the kept cells' label codes, on disk
            ca, cb = load_rows(ja.labels, name), load_rows(jb.labels, name)
            assert np.array_equal(ca, cb) and len(ca) == a["n_kept"]
            assert np.bincount(ca, minlength=len(a["labels"][name]["names"])).tolist() == a["labels"][name]["counts"]
        names = np.asarray(a["labels"]["cell_type"]["names"])
        want = za.obs["cell_type"].astype(object).fillna("unknown").to_numpy()
        assert (names[load_rows(ja.labels, "cell_type")] == want).all()


def test_a_failing_file_in_a_worker_fails_the_build_with_its_rows(tmp_path, rng):
    """A problem past the probed rows is found by the worker ingesting that file; nothing is left behind."""
    good = _files(tmp_path, rng, [60])[0]
    X = synth_counts(rng, PROBE_CELLS + 100, 25)
    row = PROBE_CELLS + 50
    X[row, X[row].indices[0]] = -3.0
    bad = write_h5ad(tmp_path / "bad.h5ad", X)
    with pytest.raises(SourceError, match=rf"bad.h5ad \(X\), rows {PROBE_CELLS}:.*negative"):
        build([good, bad], str(tmp_path / "c"), BuildOptions(min_genes=2, workers=2, chunk_cells=1000), log=lambda *a: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".c.lock", "bad.h5ad", "f0.h5ad"]

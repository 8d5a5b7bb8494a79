import numpy as np
import pytest

from data_prep.source import COUNT_TOL, as_counts, count_problem


@pytest.mark.parametrize("values, expect", [
    (np.array([1.0, 2.0, 3.0], np.float32), [1, 2, 3]),
    (np.array([-0.0, 7.0]), [0, 7]),
    (np.array([1 + COUNT_TOL / 2, 2 - COUNT_TOL / 2]), [1, 2]),  # within tolerance: rounded
    (np.array([1, 2**31 - 1], np.int64), [1, 2**31 - 1]),
    (np.array([3, 4], np.uint16), [3, 4]),
    (np.zeros(0, np.float32), []),
])
def test_as_counts_accepts_and_converts(values, expect):
    out, problem = as_counts(values)
    assert problem is None and out.dtype == np.int32 and out.tolist() == expect


@pytest.mark.parametrize("values, msg", [
    (np.array([1.0, np.nan]), "NaN"),
    (np.array([1.0, np.inf]), "infinite"),
    (np.array([1.0, -2.0]), "negative"),
    (np.array([-1, 2], np.int32), "negative"),
    (np.array([1.5]), "non-integer"),
    (np.array([3e9]), "int32 range"),
    (np.array([2**40], np.int64), "int32 range"),
])
def test_as_counts_refuses_with_reason(values, msg):
    out, problem = as_counts(values)
    assert out is None and msg in problem


def test_as_counts_agrees_with_count_problem_on_random_values(rng):
    """The fast path must accept exactly what count_problem accepts, and round the same way."""
    for _ in range(50):
        v = rng.integers(0, 1000, 200).astype(np.float64)
        kind = rng.integers(0, 4)
        if kind == 1:
            v[rng.integers(200)] += rng.uniform(-2 * COUNT_TOL, 2 * COUNT_TOL)
        elif kind == 2:
            v[rng.integers(200)] = -rng.uniform(0.5, 5)
        elif kind == 3:
            v[rng.integers(200)] = np.nan
        out, problem = as_counts(v)
        assert (problem is None) == (count_problem(v) is None)
        if problem is None:
            assert np.array_equal(out, np.rint(v).astype(np.int32))


def test_chunks_are_capped_in_nonzeros_and_cover_every_row(tmp_path, rng):
    """Long cells give short chunks (≤ max_nnz non-zeros, ≥ 1 row); together they are the whole matrix."""
    import anndata as ad

    from data_prep.source import QCStats, Source
    from data_prep.synth_census import SynthOptions, write_dataset

    r = write_dataset(tmp_path / "s.h5ad", 4, 300, SynthOptions(n_genes=2000, min_len=5, max_len=900,
                                                                seed=int(rng.integers(1 << 30))))
    X = ad.read_h5ad(r["path"]).X
    cap = int(rng.integers(1500, 5000))
    src = Source(r["path"])
    blocks = [(rows.copy(), b.copy()) for rows, b in src.chunks(min_genes=1, chunk_cells=64, stats=QCStats(),
                                                                    max_nnz=cap)]
    src.close()
    assert all(b.nnz <= cap or b.shape[0] == 1 for _, b in blocks)
    assert all(b.shape[0] <= 64 for _, b in blocks) and len(blocks) > 300 * X.nnz / X.shape[0] / cap
    keep = np.asarray(ad.read_h5ad(r["path"]).obs["is_primary_data"], dtype=bool)
    rows = np.concatenate([r for r, _ in blocks])
    assert np.array_equal(rows, np.flatnonzero(keep))
    import scipy.sparse as sp
    assert (sp.vstack([b for _, b in blocks]) != X[rows]).nnz == 0

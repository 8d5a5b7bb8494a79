import numpy as np
import pytest
import scipy.sparse as sp

from data_prep.mds import mapped_rows


@pytest.mark.parametrize("draw", range(10))
def test_mapped_rows_against_dense(rng, draw):
    """MDS row mapping = dense column sum over source genes sharing a vocabulary id."""
    n, g, v = int(rng.integers(1, 40)), int(rng.integers(2, 60)), 25
    vocab_ids = rng.integers(-1, v, g).astype(np.int32)
    X = sp.random(n, g, density=0.3, format="csr", random_state=rng)
    X.data = np.ceil(X.data * 9).astype(np.int32)
    dense = X.toarray()
    before = [a.copy() for a in (X.indptr, X.indices, X.data)]
    ptr, genes, counts = mapped_rows(X.indptr, X.indices, X.data, vocab_ids)
    assert all(np.array_equal(a, b) for a, b in zip(before, (X.indptr, X.indices, X.data)))  # inputs untouched
    for i in range(n):
        expect = np.zeros(v, dtype=np.int64)
        m = vocab_ids >= 0
        np.add.at(expect, vocab_ids[m], dense[i, m])
        got = np.zeros(v, dtype=np.int64)
        got[genes[ptr[i]:ptr[i + 1]]] = counts[ptr[i]:ptr[i + 1]]
        assert np.array_equal(got, expect) and len(set(genes[ptr[i]:ptr[i + 1]])) == ptr[i + 1] - ptr[i]

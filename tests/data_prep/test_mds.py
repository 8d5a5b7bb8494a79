import numpy as np
import pytest
import scipy.sparse as sp

from data_prep.mds import VocabMap


@pytest.mark.parametrize("dtype", [np.int32, np.uint16])
@pytest.mark.parametrize("draw", range(10))
def test_vocab_map_against_dense(rng, draw, dtype):
    """MDS row mapping = dense column sum over source genes sharing a vocabulary id."""
    n, g, v = int(rng.integers(1, 40)), int(rng.integers(2, 60)), 25
    vocab_ids = rng.integers(-1, v, g).astype(np.int32)
    X = sp.random(n, g, density=0.3, format="csr", random_state=rng)
    X.data = np.ceil(X.data * 9).astype(np.int32)
    dense = X.toarray()
    before = [a.copy() for a in (X.indptr, X.indices, X.data)]
    if draw % 3 == 0:  # also the fast paths: no unmapped gene / no shared id
        vocab_ids = np.abs(vocab_ids) if draw % 2 else rng.permutation(v)[:g] if g <= v else np.abs(vocab_ids)
    ptr, genes, counts = VocabMap(vocab_ids, dtype)(X.indptr, X.indices, X.data)
    assert genes.dtype == dtype and counts.dtype == np.int32 and ptr.dtype == np.int64
    assert all(np.array_equal(a, b) for a, b in zip(before, (X.indptr, X.indices, X.data)))  # inputs untouched
    for i in range(n):
        expect = np.zeros(v, dtype=np.int64)
        m = vocab_ids >= 0
        np.add.at(expect, vocab_ids[m], dense[i, m])
        got = np.zeros(v, dtype=np.int64)
        got[genes[ptr[i]:ptr[i + 1]]] = counts[ptr[i]:ptr[i + 1]]
        assert np.array_equal(got, expect) and len(set(genes[ptr[i]:ptr[i + 1]])) == ptr[i + 1] - ptr[i]


# --- the cell encoder: byte-identical to streaming's generic MDSWriter.encode_sample ---------------

from data_prep._torchvision_shim import ensure_importable  # noqa: E402

ensure_importable()
from streaming import MDSWriter, StreamingDataset  # noqa: E402

from data_prep.mds import CellMDSWriter, Task, check_compression, counts_dtypes, genes_dtype, write_task  # noqa: E402
from data_prep.zarr_store import ZarrDatasetWriter, iter_csr_rows  # noqa: E402

LENGTHS = [1, 2, 17, 255, 256, 257, 65535, 65536, 70000]


def _sample(rng, n, vocab_size, max_count):
    genes = rng.choice(vocab_size, size=n, replace=n > vocab_size).astype(genes_dtype(vocab_size))
    counts = rng.integers(1, max_count + 1, n)
    counts[rng.integers(n)] = max_count
    kind = int(counts_dtypes(np.array([max_count]))[0])
    counts = counts.astype((np.uint8, np.uint16, np.uint32)[kind])
    return {"genes": genes, "counts": counts, "dataset": int(rng.integers(0, 5)),
            "cell_type": int(rng.integers(0, 2**40)), "donor": int(rng.integers(0, 1000)),
            "cell_id": int(rng.integers(0, 2**62))}


@pytest.mark.parametrize("vocab_size", [100, 65536, 65537])
def test_cell_encoder_matches_streaming_byte_for_byte(tmp_path, rng, vocab_size):
    """Every length class of the shape header, every counts dtype, both genes dtypes."""
    w = CellMDSWriter(out=str(tmp_path / "w"), vocab_size=vocab_size, compression="zstd:1")
    for n in LENGTHS:
        for max_count in (1, 255, 256, 65535, 65536, 2**31 - 1):
            s = _sample(rng, n, vocab_size, max_count)
            assert w.encode_sample(s) == MDSWriter.encode_sample(w, s), (n, max_count)
    w.finish()


def test_counts_dtypes_boundaries():
    assert counts_dtypes(np.array([0, 1, 255, 256, 65535, 65536, 2**31 - 1])).tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert genes_dtype(65536) == np.uint16 and genes_dtype(65537) == np.uint32


def test_cell_encoder_unusual_samples_get_streamings_errors(tmp_path):
    w = CellMDSWriter(out=str(tmp_path / "w"), vocab_size=100)
    ok = {"genes": np.array([1, 2], np.uint16), "counts": np.array([3, 4], np.uint8), "dataset": 0,
          "cell_type": 0, "donor": 0, "cell_id": 0}
    with pytest.raises(ValueError, match="Wrong dtype"):  # genes must be the corpus' dtype
        w.encode_sample({**ok, "genes": ok["genes"].astype(np.int64)})
    with pytest.raises(ValueError, match="0 elements"):  # streaming refuses empty arrays
        w.encode_sample({**ok, "genes": ok["genes"][:0], "counts": ok["counts"][:0]})
    # other counts dtypes fall back to the generic encoder (and stay readable)
    s = {**ok, "counts": np.array([3, 4], np.int64)}
    assert w.encode_sample(s) == MDSWriter.encode_sample(w, s)
    w.finish()


def test_cell_writer_round_trip_through_streaming(tmp_path, rng):
    samples = [_sample(rng, int(n), 70000, int(m)) for n, m in zip(rng.integers(1, 3000, 40),
                                                                     rng.choice([3, 300, 70000], 40))]
    with CellMDSWriter(out=str(tmp_path / "mds"), vocab_size=70000, compression="zstd:1",
                       hashes=["xxh64"], size_limit=1 << 14) as w:
        for s in samples:
            w.write(s)
    ds = StreamingDataset(local=str(tmp_path / "mds"), shuffle=False, batch_size=1)
    assert len(ds) == len(samples)
    for i, s in enumerate(samples):
        got = ds[i]
        assert all(np.array_equal(got[k], s[k]) for k in s) and got["counts"].dtype == s["counts"].dtype



@pytest.mark.parametrize("vocab_size", [300, 70000])
def test_write_cells_equals_write_per_cell(tmp_path, rng, vocab_size):
    """The bulk path writes the same shard files (bytes, boundaries, index) as ``write`` per cell."""
    lens = rng.integers(1, 400, 120)
    lens[[3, 50]] = [300, 1]
    if vocab_size > 1 << 16:
        lens[80] = 70_000  # a cell whose shape header needs uint32
    ptr = np.concatenate([[0], np.cumsum(lens)])
    genes = rng.integers(0, vocab_size, ptr[-1]).astype(genes_dtype(vocab_size))
    counts = rng.integers(1, 100, ptr[-1]).astype(np.int64)
    counts[ptr[7]] = 300  # a uint16 cell
    counts[ptr[9] + 1] = 70000  # a uint32 cell
    kinds = counts_dtypes(np.maximum.reduceat(counts, ptr[:-1]))
    cast = {k: counts.astype((np.uint8, np.uint16, np.uint32)[k]) for k in np.unique(kinds).tolist()}
    meta = [rng.integers(0, 2**40, len(lens)).tolist() for _ in range(3)]
    kw = dict(vocab_size=vocab_size, compression="zstd:1", hashes=["xxh64"], size_limit=1 << 13 if vocab_size < 1 << 16 else 1 << 17)
    with CellMDSWriter(out=str(tmp_path / "a"), **kw) as w:
        for i in range(len(lens)):
            s, e = ptr[i], ptr[i + 1]
            w.write({"genes": genes[s:e], "counts": cast[int(kinds[i])][s:e], "dataset": 3, "cell_id": meta[0][i],
                     "cell_type": meta[1][i], "donor": meta[2][i]})
    with CellMDSWriter(out=str(tmp_path / "b"), **kw) as w:
        for lo, hi in ((0, 1), (1, 60), (60, 120)):  # several calls continue the same shard
            w.write_cells(genes, cast, ptr[lo:hi].tolist(), ptr[lo + 1:hi + 1].tolist(), kinds[lo:hi].tolist(),
                          meta[0][lo:hi], meta[1][lo:hi], meta[2][lo:hi], 3)
    a, b = sorted((tmp_path / "a").iterdir()), sorted((tmp_path / "b").iterdir())
    assert len(a) > 3 and [p.name for p in a] == [p.name for p in b]
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(a, b))



def test_joint_shard_encoder_matches_streaming(tmp_path, rng):
    w = CellMDSWriter(out=str(tmp_path / "w"), vocab_size=100)
    for n in (0, 1, 57):
        w.new_samples = [rng.bytes(int(k)) for k in rng.integers(1, 500, n)]
        assert w.encode_joint_shard() == MDSWriter.encode_joint_shard(w)
    w.new_samples = []
    w.finish()

def test_write_cells_refuses_wrong_genes_dtype(tmp_path):
    with CellMDSWriter(out=str(tmp_path / "w"), vocab_size=100) as w:
        with pytest.raises(ValueError, match="genes are int32, this corpus stores uint16"):
            w.write_cells(np.array([1], np.int32), {0: np.array([1], np.uint8)}, [0], [1], [0], [0], [0], [0], 0)


def test_check_compression():
    check_compression("zstd:1")
    with pytest.raises(ValueError, match=r"unknown MDS compression 'zstd:99'.*zstd\[:1-22\]"):
        check_compression("zstd:99")


def _store(tmp_path, rng, n=60, g=30):
    X = sp.random(n, g, density=0.4, format="csr", random_state=rng, dtype=np.float64)
    X.data = np.ceil(X.data * 300).astype(np.int32)
    X[5] = 0  # an empty row
    X.eliminate_zeros()
    X = sp.csr_matrix(X.astype(np.int32))
    w = ZarrDatasetWriter(str(tmp_path / "d.zarr"), g)
    w.append(X)
    import pandas as pd
    w.finish(pd.DataFrame(index=[f"c{i}" for i in range(n)]), pd.DataFrame(index=[f"g{i}" for i in range(g)]))
    return str(tmp_path / "d.zarr"), X


@pytest.mark.parametrize("max_nnz", [1, 7, 50, 1 << 22])
def test_iter_csr_rows_blocks_cover_the_range(tmp_path, rng, max_nnz):
    store, X = _store(tmp_path, rng)
    start, stop = 3, 57
    rows, seen = [], 0
    for row0, ptr, ind, dat in iter_csr_rows(store, start, stop, max_nnz):
        assert row0 == seen and ptr[0] == 0 and ptr[-1] == len(ind) == len(dat)
        assert len(ptr) == 2 or ptr[-1] <= max_nnz  # a block exceeds the bound only as a single row
        rows += [sp.csr_matrix((dat, ind, ptr), shape=(len(ptr) - 1, X.shape[1]))]
        seen += len(ptr) - 1
    assert (sp.vstack(rows) != X[start:stop]).nnz == 0


def test_write_task_block_size_does_not_change_shards(tmp_path, rng):
    store, X = _store(tmp_path, rng)
    n = X.shape[0]
    vid = rng.permutation(40)[:X.shape[1]].astype(np.int32)
    vid[::7] = -1

    def task():
        return Task(part=0, store=store, dataset=1, start=0, stop=n, vocab_ids=vid,
                    split=rng.integers(0, 3, n), cell_type=rng.integers(0, 4, n), donor=rng.integers(0, 9, n),
                    cell_id0=100)
    t = task()
    r_small = write_task(t, str(tmp_path / "a"), 40, max_nnz=5)
    r_big = write_task(t, str(tmp_path / "b"), 40)
    assert r_small == r_big and r_small["cells"] == n
    for split in ("train", "val", "test"):
        a, b = tmp_path / "a" / split / "part-00000", tmp_path / "b" / split / "part-00000"
        if not a.exists():
            assert not b.exists()
            continue
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        for p in a.iterdir():
            assert p.read_bytes() == (b / p.name).read_bytes()


def test_first_cell_is_checked_against_streamings_encoder(tmp_path, monkeypatch):
    """A streaming release that changes the sample format makes both encoders fail loudly, not write bad shards."""
    monkeypatch.setattr(MDSWriter, "encode_sample", lambda self, sample: b"another format")
    genes, counts = np.array([1, 2], np.uint16), {0: np.array([3, 4], np.uint8)}
    w = CellMDSWriter(out=str(tmp_path / "a"), vocab_size=100)
    with pytest.raises(RuntimeError, match="changed the MDS sample format"):
        w.write_cells(genes, counts, [0], [2], [0], [7], [1], [2], 0)
    w = CellMDSWriter(out=str(tmp_path / "b"), vocab_size=100)
    with pytest.raises(RuntimeError, match="changed the MDS sample format"):
        w.encode_sample({"genes": genes, "counts": counts[0], "dataset": 0, "cell_type": 1, "donor": 2, "cell_id": 7})


def test_index_is_written_without_whole_second_waits(tmp_path, monkeypatch):
    """MDSWriter sleeps 1 s while uploads are queued before writing the index; CellMDSWriter polls every ms."""
    import time

    import streaming.base.format.base.writer as base_writer
    slept = []
    monkeypatch.setattr(base_writer, "sleep", slept.append)  # would be called with 1 by MDSWriter
    w = CellMDSWriter(out=str(tmp_path / "w"), vocab_size=100)
    w.write_cells(np.array([1, 2], np.uint16), {0: np.array([3, 4], np.uint8)}, [0], [2], [0], [7], [1], [2], 0)
    for _ in range(4 * w.executor._max_workers):  # keep the upload queue busy for ~0.1 s
        w.executor.submit(time.sleep, 0.1 / 4)
    t = time.perf_counter()
    w.finish()
    assert slept == [] and time.perf_counter() - t < 0.9
    assert StreamingDataset(local=str(tmp_path / "w"), batch_size=1)[0]["cell_id"] == 7

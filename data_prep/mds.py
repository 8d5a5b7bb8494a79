"""Write MDS shards (mosaicml-streaming) from the Zarr corpus, in parallel, one writer per part.

Per cell: ``genes`` = vocabulary ids of its expressed, mapped genes (source order; ``uint16`` when the
vocabulary has ≤ 65,536 genes, else ``uint32``), ``counts`` = raw counts (source genes sharing a
vocabulary id are summed) in the smallest unsigned dtype that holds the cell's largest count
(``uint8``/``uint16``/``uint32``, stored per sample: cast before arithmetic), ``dataset``/
``cell_type``/``donor``/``cell_id`` ints. Compact dtypes halve the bytes that zstd compresses at
build time and decompresses at load time (8 → ~4 bytes per non-zero on 10x data).

Cells with no mapped gene are skipped (streaming refuses empty arrays) and counted. Each task (a row
range of one dataset's store) writes ``<split>/part-NNNNN/`` with its own :class:`CellMDSWriter`
(an ``MDSWriter``: zstd, xxh64 hashes); ``streaming.base.util.merge_index`` then writes each split's
``index.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_all_start_methods, get_context

import numpy as np
import scipy.sparse as sp

from data_prep._torchvision_shim import ensure_importable

ensure_importable()

from streaming import MDSWriter  # noqa: E402
from streaming.base.compression import get_compressions, is_compression  # noqa: E402
from streaming.base.format.mds.encodings import NDArray  # noqa: E402
from streaming.base.util import merge_index  # noqa: E402

from data_prep._mds_cells import pack_cells  # noqa: E402  (csrc/mds_cells.cpp; after torch, whose libraries it links)
from data_prep.labels import load_rows  # noqa: E402
from data_prep.split import SPLITS  # noqa: E402
from data_prep.zarr_store import iter_csr_rows  # noqa: E402

# Raw shard size. streaming's default is 64 MiB; 16 MiB (≈ 5 MiB after zstd:1 on 10x data) keeps the
# writer's per-shard buffers under glibc's 32 MiB mmap ceiling, so they are reused instead of being
# mapped and page-faulted afresh for every shard (−30 % kernel time of the build on our VMs).
SIZE_LIMIT = 1 << 24
COMPRESSION = "zstd:1"


def check_compression(name: str) -> None:
    """Refuse a compression name streaming does not know, before anything is written."""
    if not is_compression(name):
        levels: dict[str, list[int]] = {}
        for c in get_compressions():
            fam, _, lvl = c.partition(":")
            levels.setdefault(fam, []).extend([int(lvl)] if lvl else [])
        known = ", ".join(f"{f}[:{min(v)}-{max(v)}]" if v else f for f, v in sorted(levels.items()))
        raise ValueError(f"unknown MDS compression {name!r}; streaming knows: {known}")


def genes_dtype(vocab_size: int) -> np.dtype:
    """Storage dtype of the ``genes`` column for a vocabulary of ``vocab_size`` ids."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def columns(vocab_size: int) -> dict[str, str]:
    """MDS column encodings of a corpus whose vocabulary has ``vocab_size`` genes."""
    return {"genes": f"ndarray:{genes_dtype(vocab_size).name}", "counts": "ndarray", "dataset": "int",
            "cell_type": "int", "donor": "int", "cell_id": "int"}


def counts_dtypes(max_counts: np.ndarray) -> np.ndarray:
    """Per cell, the smallest of uint8/uint16/uint32 holding its largest count (as an index 0/1/2)."""
    return (max_counts >= 1 << 8).astype(np.int8) + (max_counts >= 1 << 16)


_COUNT_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32))
_COUNT_CODES = [NDArray._value_dtype2int[d.name] for d in _COUNT_DTYPES]
_SHAPE_CODES = [(1 << 2) | NDArray._shape_dtype2int[d] for d in ("uint8", "uint16", "uint32")]
_ORDER = ["cell_id", "cell_type", "counts", "dataset", "donor", "genes"]  # MDSWriter sorts columns by name


class CellMDSWriter(MDSWriter):
    """``MDSWriter`` for the cell columns with a specialised ``encode_sample``.

    streaming's generic encoder spends ~50 µs per cell dispatching six columns through its encoding
    registry; this one packs the same bytes directly (``pack_cells``, csrc/mds_cells.cpp, which
    ``encode_sample`` calls for one cell and :meth:`write_cells` for a block): the ``uint32`` sizes of
    the two variable columns, then the columns in streaming's (sorted) order — ``cell_id``, ``cell_type``
    (``int64``), ``counts`` (dtype code + shape + data), ``dataset``, ``donor`` (``int64``), ``genes``
    (shape + data; its dtype is in the column encoding). Everything else (shard size limit,
    compression, hashes, index) is MDSWriter's own. The first sample of every writer is also encoded
    by ``MDSWriter.encode_sample`` and the two must agree byte for byte, so a streaming release that
    changes the format fails loudly instead of writing unreadable shards.
    """

    def __init__(self, *, vocab_size: int, **kw):
        super().__init__(columns=columns(vocab_size), **kw)
        if list(self.column_names) != _ORDER:
            raise RuntimeError(f"MDSWriter orders the columns as {self.column_names}, CellMDSWriter expects {_ORDER}")
        self._genes_dtype = genes_dtype(vocab_size)
        self._checked = False

    def encode_sample(self, sample: dict) -> bytes:
        genes, counts = sample["genes"], sample["counts"]
        n = len(genes)
        if counts.dtype not in _COUNT_DTYPES or genes.dtype != self._genes_dtype or genes.ndim != 1 \
                or counts.shape != genes.shape or not n:
            return super().encode_sample(sample)  # anything unusual: the library's checks and errors
        k = _COUNT_DTYPES.index(counts.dtype)
        by_kind = [np.ascontiguousarray(counts) if i == k else None for i in range(3)]
        out = pack_cells(np.ascontiguousarray(genes), by_kind, [0], [n], [k], [sample["cell_id"]],
                         [sample["cell_type"]], [sample["donor"]], sample["dataset"], _COUNT_CODES, _SHAPE_CODES)[0]
        if not self._checked:
            self._check_against_streaming(sample, out)
        return out

    def _check_against_streaming(self, sample: dict, encoded: bytes) -> None:
        """Once per writer: streaming's own encoder must produce the same bytes for ``sample``."""
        if MDSWriter.encode_sample(self, sample) != encoded:
            raise RuntimeError("CellMDSWriter's encoder disagrees with streaming's MDSWriter.encode_sample "
                               "(a streaming release changed the MDS sample format?)")
        self._checked = True

    def write_cells(self, genes: np.ndarray, counts: dict[int, np.ndarray], starts: np.ndarray, ends: np.ndarray,
                    kinds: np.ndarray, cell_ids: np.ndarray, cell_types: np.ndarray, donors: np.ndarray,
                    dataset: int) -> None:
        """Append cells given as slices ``starts[i]:ends[i]`` (non-empty) of one CSR block.

        The same sample bytes and the same shard boundaries as :meth:`write` called per cell: the
        samples are packed by ``data_prep._mds_cells.pack_cells`` (csrc/mds_cells.cpp, one memcpy
        pass instead of a dict, an encoder call and a join per cell), and the shard-size rule of
        ``MDSWriter.write`` (flush before a sample that would take the shard past ``size_limit``) is
        applied to all of them at once on their cumulative sizes. ``counts[k]``: the block's counts
        as ``_COUNT_DTYPES[k]``, for each kind ``k`` (0/1/2 = uint8/16/32) occurring in ``kinds``.
        """
        if self.event.is_set():  # an upload thread failed: let write() raise its error
            return super().write({})
        if genes.dtype != self._genes_dtype:
            raise ValueError(f"genes are {genes.dtype}, this corpus stores {self._genes_dtype}")
        samples = pack_cells(genes, [counts.get(k) for k in range(3)], starts, ends, kinds, cell_ids, cell_types,
                             donors, dataset, _COUNT_CODES, _SHAPE_CODES)
        if not samples:
            return
        if not self._checked:
            s, e, k = int(starts[0]), int(ends[0]), int(kinds[0])
            self._check_against_streaming({"genes": genes[s:e], "counts": counts[k][s:e], "dataset": dataset,
                                           "cell_type": int(cell_types[0]), "donor": int(donors[0]),
                                           "cell_id": int(cell_ids[0])}, samples[0])
        size = np.zeros(len(samples) + 1, np.int64)  # size[j] - size[i]: bytes that samples i..j-1 add to a shard
        np.cumsum(np.fromiter(map(len, samples), np.int64, len(samples)) + self.extra_bytes_per_sample, out=size[1:])
        limit, i = self.size_limit, 0
        while i < len(samples):
            j = len(samples)
            if limit:  # samples i..j-1 fit in the current shard
                j = min(j, int(np.searchsorted(size, size[i] + limit - self.new_shard_size, side="right")) - 1)
            if j <= i:  # sample i does not fit: flush, then it starts the next shard (as MDSWriter.write does)
                self.flush_shard()
                self._reset_cache()
                j = i + 1
            self.new_samples.extend(samples[i:j])
            self.new_shard_size += int(size[j] - size[i])
            i = j

    def _write_index(self) -> None:
        """``MDSWriter._write_index`` without its whole-second waits.

        It polls the upload queue with ``sleep(1)`` until the shards queued for upload are taken,
        which for local output (microseconds per "upload") still cost a whole second of wall time now
        and then (once in 6 builds of 3 writers in one count); the same wait here polls every millisecond.
        """
        while self.executor._work_queue.qsize() > 0:  # the queue MDSWriter itself polls
            time.sleep(0.001)
        super()._write_index()

    def encode_joint_shard(self) -> bytes:
        """``MDSWriter.encode_joint_shard`` (sample count, uint32 offsets, config, samples) in one join
        instead of three copies of the shard."""
        sizes = np.fromiter(map(len, self.new_samples), np.int64, len(self.new_samples))
        offsets = np.zeros(len(sizes) + 1, np.int64)
        np.cumsum(sizes, out=offsets[1:])
        offsets += 4 + 4 * len(offsets) + len(self.config_data)
        return b"".join([np.uint32(len(sizes)).tobytes(), offsets.astype(np.uint32).tobytes(), self.config_data,
                         *self.new_samples])


@dataclasses.dataclass
class Task:
    """Rows ``start:stop`` of one dataset store, with per-row labels and split codes: given as arrays
    (``split``, ``cell_type``, ``donor``, per row of the range), or read when the task runs from
    ``labels``, a directory with ``split.npy``/``cell_type.npy``/``donor.npy`` over all the store's
    rows (so a build's task list holds no per-cell array)."""
    part: int
    store: str
    dataset: int
    start: int
    stop: int
    vocab_ids: np.ndarray  # per source gene, −1 = unmapped
    split: np.ndarray | None = None  # per row of the range
    cell_type: np.ndarray | None = None
    donor: np.ndarray | None = None
    cell_id0: int = 0  # cell_id of row ``start``
    labels: str | None = None

    def with_labels(self) -> Task:
        """This task with ``split``/``cell_type``/``donor`` read from ``labels`` (itself when given)."""
        if self.labels is None:
            return self
        return dataclasses.replace(self, labels=None, **{k: load_rows(self.labels, k, self.start, self.stop)
                                                         for k in ("split", "cell_type", "donor")})


class VocabMap:
    """Source gene columns → vocabulary ids for CSR blocks: drop unmapped genes, sum duplicates.

    ``vocab_ids``: per source gene, −1 = unmapped. Built once per dataset (the lookup table in the
    storage dtype of ``genes``, whether any gene is unmapped or two share an id); each block then
    costs one gather of its gene indices, plus a compaction only when the dataset has unmapped genes.
    Genes keep the source column order, except when the dataset maps two genes to one id: then
    scipy's ``sum_duplicates`` sorts each row and sums the counts of equal ids.
    """

    def __init__(self, vocab_ids: np.ndarray, dtype=np.int32):
        vocab_ids = np.asarray(vocab_ids)
        self.dtype = np.dtype(dtype)
        self.unmapped = vocab_ids < 0
        self.any_unmapped = bool(self.unmapped.any())
        mapped = vocab_ids[~self.unmapped]
        self.duplicates = len(np.unique(mapped)) < len(mapped)
        self.n_ids = int(mapped.max()) + 1 if len(mapped) else 0
        if self.n_ids > np.iinfo(self.dtype).max + 1:
            raise ValueError(f"vocabulary ids up to {self.n_ids - 1} do not fit {self.dtype}")
        self.lut = np.where(self.unmapped, 0, vocab_ids).astype(self.dtype)

    def __call__(self, indptr: np.ndarray, indices: np.ndarray,
                 data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(indptr, genes, counts)`` of the mapped block (int64, ``dtype``, int32); inputs untouched."""
        indptr = np.asarray(indptr, dtype=np.int64)
        if self.any_unmapped:
            dropped = np.flatnonzero(self.unmapped[indices])
            if len(dropped):  # rebase indptr by the number of dropped entries before each row start
                indptr = indptr - np.searchsorted(dropped, indptr)
                keep = np.ones(len(indices), dtype=bool)
                keep[dropped] = False
                indices, data = indices[keep], data[keep]
        if not self.duplicates:  # no id twice in a row: nothing to sum
            return indptr, self.lut[indices], data.astype(np.int32, copy=False)
        m = sp.csr_matrix((data.astype(np.int64), self.lut[indices].astype(np.int64), indptr),
                          shape=(len(indptr) - 1, self.n_ids))  # fresh arrays: sum_duplicates works in place
        m.sum_duplicates()
        if m.nnz and m.data.max() > np.iinfo(np.int32).max:
            raise ValueError("summed duplicate-gene counts exceed int32")
        return m.indptr.astype(np.int64), m.indices.astype(self.dtype), m.data.astype(np.int32)


def write_task(task: Task, out_root: str, vocab_size: int, compression: str = COMPRESSION,
               size_limit: int = SIZE_LIMIT, max_nnz: int = 1 << 22) -> dict:
    """Write one task's cells into ``out_root/<split>/part-NNNNN``; returns counts per split.

    The row range is read in blocks of ≤ ``max_nnz`` non-zeros (bounded memory); each split's
    writer receives its rows in row order.
    """
    task = task.with_labels()
    written = {s: 0 for s in SPLITS}
    no_genes = 0
    vocab_map = VocabMap(task.vocab_ids, genes_dtype(vocab_size))
    try:
        with contextlib.ExitStack() as stack:
            writers = {}
            for code, split in enumerate(SPLITS):
                if (task.split == code).any():
                    writers[code] = stack.enter_context(CellMDSWriter(
                        out=os.path.join(out_root, split, f"part-{task.part:05d}"), vocab_size=vocab_size,
                        compression=compression, hashes=["xxh64"], size_limit=size_limit, exist_ok=False))
            for row0, indptr, indices, data in iter_csr_rows(task.store, task.start, task.stop, max_nnz):
                ptr, genes, counts = vocab_map(indptr, indices, data)
                n = len(ptr) - 1
                nonempty = ptr[1:] > ptr[:-1]
                row_max = np.zeros(n, dtype=np.int64)
                if nonempty.any():
                    row_max[nonempty] = np.maximum.reduceat(counts, ptr[:-1][nonempty])
                kinds = counts_dtypes(row_max)
                # the block once per dtype in use (counts are ≥ 0: int32 → uint32 is a free view)
                cast = {k: counts.view(np.uint32) if k == 2 else counts.astype(_COUNT_DTYPES[k])
                        for k in np.unique(kinds).tolist()}
                rows = slice(row0, row0 + n)
                split = task.split[rows]
                no_genes += int(n - nonempty.sum())
                for code, w in writers.items():
                    idx = np.flatnonzero((split == code) & nonempty)
                    w.write_cells(genes, cast, ptr[:-1][idx], ptr[1:][idx], kinds[idx], task.cell_id0 + row0 + idx,
                                  task.cell_type[rows][idx], task.donor[rows][idx], task.dataset)
                    written[SPLITS[code]] += len(idx)
    except Exception as e:
        raise RuntimeError(f"writing MDS part {task.part} ({task.store} rows {task.start}:{task.stop}): {e}") from e
    return {"written": written, "no_mapped_genes": no_genes, "cells": task.stop - task.start}


def write_mds(tasks: list[Task], out_root: str, workers: int, vocab_size: int, progress=None, **kw) -> dict:
    """Run ``write_task`` over ``tasks`` (in ``workers`` forked processes when > 1), merge indexes."""
    totals = {"written": {s: 0 for s in SPLITS}, "no_mapped_genes": 0}

    def add(r):
        for s in SPLITS:
            totals["written"][s] += r["written"][s]
        totals["no_mapped_genes"] += r["no_mapped_genes"]
        if progress is not None:
            progress(r["cells"])

    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            add(write_task(t, out_root, vocab_size, **kw))
    else:
        # fork: the children inherit the imported streaming/torch (a spawned child spends ~10 s
        # importing them); zarr resets its event-loop thread after fork.
        ctx = get_context("fork" if "fork" in get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
            futures = [ex.submit(write_task, t, out_root, vocab_size, **kw) for t in tasks]
            for f in as_completed(futures):
                add(f.result())
    totals["shards"] = {}
    for split in SPLITS:
        root = os.path.join(out_root, split)
        os.makedirs(root, exist_ok=True)
        parts = sorted(p for p in os.listdir(root) if p.startswith("part-"))
        if not parts:  # an empty split still gets a valid (empty) index
            with MDSWriter(out=os.path.join(root, "part-empty"), columns=columns(vocab_size), exist_ok=False):
                pass
            parts = ["part-empty"]
        with _quiet_root_logger():  # merge_index logs a warning per call about its temp dir
            merge_index([os.path.join(root, p, "index.json") for p in parts], root, keep_local=True)
        totals["shards"][split] = _count_shards(os.path.join(root, "index.json"))
    return totals


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _count_shards(index_path: str) -> int:
    import json
    with open(index_path) as f:
        return len(json.load(f)["shards"])

"""Write MDS shards (mosaicml-streaming) from the Zarr corpus, in parallel, one writer per part.

Per cell: ``genes`` int32 = vocabulary ids of its expressed, mapped genes (source order), ``counts``
int32 (raw counts; source genes sharing a vocabulary id are summed), ``dataset``/``cell_type``/
``donor``/``cell_id`` ints. Cells with no mapped gene are skipped (streaming refuses empty arrays)
and counted. Each task (a row range of one dataset's store) writes ``<split>/part-NNNNN/`` with its
own ``MDSWriter`` (zstd, xxh64 hashes); ``streaming.base.util.merge_index`` then writes each split's
``index.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_all_start_methods, get_context

import numpy as np
import scipy.sparse as sp

from data_prep._torchvision_shim import ensure_importable

ensure_importable()

from streaming import MDSWriter  # noqa: E402
from streaming.base.util import merge_index  # noqa: E402

from data_prep.split import SPLITS  # noqa: E402
from data_prep.zarr_store import read_csr_rows  # noqa: E402

COLUMNS = {"genes": "ndarray:int32", "counts": "ndarray:int32", "dataset": "int", "cell_type": "int",
           "donor": "int", "cell_id": "int"}
SIZE_LIMIT = 1 << 26


@dataclasses.dataclass
class Task:
    """Rows ``start:stop`` of one dataset store, with per-row labels and split codes."""
    part: int
    store: str
    dataset: int
    start: int
    stop: int
    vocab_ids: np.ndarray  # per source gene, −1 = unmapped
    split: np.ndarray  # per row of the range
    cell_type: np.ndarray
    donor: np.ndarray
    cell_id0: int  # cell_id of row ``start``


def mapped_rows(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray,
                vocab_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map a CSR block's columns to vocabulary ids: drop unmapped genes, sum duplicates.

    Returns ``(indptr, genes, counts)`` of the mapped block. Genes keep the source column order,
    except when the dataset maps two genes to one id: then scipy's ``sum_duplicates`` sorts each row
    and sums the counts of equal ids.
    """
    g = vocab_ids[indices]
    dropped = np.flatnonzero(g < 0)
    if len(dropped):  # rebase indptr by the number of dropped entries before each row start
        indptr = indptr - np.searchsorted(dropped, indptr)
        keep = np.ones(len(g), dtype=bool)
        keep[dropped] = False
        g, data = g[keep], data[keep]
    mapped = vocab_ids[vocab_ids >= 0]
    if len(np.unique(mapped)) == len(mapped):  # no id twice in a row: nothing to sum
        return np.asarray(indptr, dtype=np.int64), g.astype(np.int32, copy=False), data.astype(np.int32, copy=False)
    m = sp.csr_matrix((data.astype(np.int64), g, indptr), shape=(len(indptr) - 1, int(mapped.max()) + 1),
                      copy=True)  # sum_duplicates works in place: never touch the caller's arrays
    m.sum_duplicates()
    if m.nnz and m.data.max() > np.iinfo(np.int32).max:
        raise ValueError("summed duplicate-gene counts exceed int32")
    return m.indptr.astype(np.int64), m.indices.astype(np.int32), m.data.astype(np.int32)


def write_task(task: Task, out_root: str, compression: str = "zstd", size_limit: int = SIZE_LIMIT) -> dict:
    """Write one task's cells into ``out_root/<split>/part-NNNNN``; returns counts per split."""
    indptr, indices, data = read_csr_rows(task.store, task.start, task.stop)
    ptr, genes, counts = mapped_rows(indptr, indices, data, task.vocab_ids)
    written = {s: 0 for s in SPLITS}
    no_genes = 0
    writers = {}
    try:
        for code, split in enumerate(SPLITS):
            rows = np.flatnonzero(task.split == code)
            if not len(rows):
                continue
            out = os.path.join(out_root, split, f"part-{task.part:05d}")
            with MDSWriter(out=out, columns=COLUMNS, compression=compression, hashes=["xxh64"],
                           size_limit=size_limit, exist_ok=False) as w:
                writers[split] = out
                for i in rows:
                    s, e = ptr[i], ptr[i + 1]
                    if s == e:
                        no_genes += 1
                        continue
                    w.write({"genes": genes[s:e], "counts": counts[s:e], "dataset": task.dataset,
                             "cell_type": int(task.cell_type[i]), "donor": int(task.donor[i]),
                             "cell_id": task.cell_id0 + int(i)})
                    written[split] += 1
    except Exception as e:
        raise RuntimeError(f"writing MDS part {task.part} ({task.store} rows {task.start}:{task.stop}): {e}") from e
    return {"written": written, "no_mapped_genes": no_genes, "cells": task.stop - task.start}


def write_mds(tasks: list[Task], out_root: str, workers: int, progress=None, **kw) -> dict:
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
            add(write_task(t, out_root, **kw))
    else:
        # fork: the children inherit the imported streaming/torch (a spawned child spends ~10 s
        # importing them); zarr resets its event-loop thread after fork.
        ctx = get_context("fork" if "fork" in get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
            futures = [ex.submit(write_task, t, out_root, **kw) for t in tasks]
            for f in as_completed(futures):
                add(f.result())
    totals["shards"] = {}
    for split in SPLITS:
        root = os.path.join(out_root, split)
        os.makedirs(root, exist_ok=True)
        parts = sorted(p for p in os.listdir(root) if p.startswith("part-"))
        if not parts:  # an empty split still gets a valid (empty) index
            with MDSWriter(out=os.path.join(root, "part-empty"), columns=COLUMNS, exist_ok=False):
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

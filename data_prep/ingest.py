"""Ingest h5ad datasets into per-dataset Zarr stores, one process per dataset when ``workers > 1``.

One dataset = one :class:`~data_prep.source.Source` streamed chunk by chunk (validated, QC-filtered)
into one :class:`~data_prep.zarr_store.ZarrDatasetWriter`; datasets are independent, so a corpus of
many files is ingested ``workers`` files at a time (forked processes; each re-opens its file). A
single file is ingested in the calling process. Progress is reported in cells read.
"""

from __future__ import annotations

import dataclasses
import queue
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_all_start_methods, get_context

import numpy as np

from data_prep.labels import label_codes, save_codes
from data_prep.source import QCStats, Source
from data_prep.zarr_store import ZarrDatasetWriter


@dataclasses.dataclass
class IngestJob:
    path: str  # the h5ad
    store: str  # the new ``*.zarr``
    vocab_ids: np.ndarray  # per source gene, −1 = unmapped (stored as var['vocab_id'])
    labels: str | None = None  # directory for the kept cells' label codes (``<key>.npy``, data_prep.labels)
    label_keys: dict[str, str] = dataclasses.field(default_factory=dict)  # file name → obs column coded into it


def ingest_dataset(job: IngestJob, min_genes: int, chunk_cells: int, source: Source | None = None,
                   progress=None, buffers: dict | None = None) -> dict:
    """Write ``job.store`` from ``job.path``; returns QC counts, the number of kept cells, nnz, and the
    total counts of the kept cells and those on mapped genes (``vocab_ids >= 0``).

    With ``job.labels``, each obs column of ``job.label_keys`` (``{name: column}``) is coded
    (:func:`data_prep.labels.label_codes`) over the kept cells and its codes saved to
    ``job.labels/<name>.npy``; the result then holds, per name, its label names and whether obs has
    the column, and obs's column names. Nothing per cell is returned: the caller's memory does
    not grow with the dataset.

    ``source``: the already open ``Source`` of ``job.path`` (else it is opened here). ``progress(n)``
    is called with the number of source cells read since the last call. ``buffers``: read buffers
    shared with datasets ingested before or after this one in the same process.
    """
    src = source if source is not None else Source(job.path)
    try:
        writer = ZarrDatasetWriter(job.store, src.var.shape[0])
        stats, rows, done = QCStats(), [], 0
        mapped = np.asarray(job.vocab_ids) >= 0
        counts_total = counts_mapped = 0
        for r, block in src.chunks(min_genes, chunk_cells, stats, buffers):
            writer.append(block)  # before the next chunk: blocks share read buffers
            counts_total += int(block.data.sum(dtype=np.int64))
            counts_mapped += int(block.data.sum(dtype=np.int64, where=mapped[block.indices]))
            rows.append(r)
            if progress is not None:
                progress(stats.cells_in - done)
            done = stats.cells_in
        if progress is not None:
            progress(stats.cells_in - done)
        rows = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        obs = src.obs.iloc[rows].copy()
        obs["source_row"] = rows
        var = src.var.copy()
        var["vocab_id"] = job.vocab_ids
        writer.finish(obs, var)
        labels = {}
        if job.labels is not None:
            codes = {}
            for name, key in job.label_keys.items():
                names, codes[name] = label_codes(src.obs.get(key), rows)
                labels[name] = {"names": names, "present": key in src.obs.columns,
                                "counts": np.bincount(codes[name], minlength=len(names)).tolist()}
            save_codes(job.labels, **codes)
        return {"stats": dataclasses.asdict(stats), "n_kept": len(rows), "labels": labels,
                "obs_columns": [str(c) for c in src.obs.columns], "nnz": int(writer.nnz),
                "counts_total": counts_total, "counts_mapped": counts_mapped}
    finally:
        if source is None:
            src.close()


_BUFFERS: dict = {}  # per worker process: the files a worker ingests in turn share its read buffers


def _child(job: IngestJob, min_genes: int, chunk_cells: int, q) -> dict:
    return ingest_dataset(job, min_genes, chunk_cells, progress=q.put, buffers=_BUFFERS)


def ingest_all(jobs: list[IngestJob], min_genes: int, chunk_cells: int, workers: int,
               sources: list[Source] | None = None, progress=None) -> list[dict]:
    """``ingest_dataset`` over ``jobs`` (results in job order), ``workers`` datasets at a time."""
    if workers <= 1 or len(jobs) <= 1:
        buffers: dict = {}
        return [ingest_dataset(j, min_genes, chunk_cells, sources[i] if sources else None, progress, buffers)
                for i, j in enumerate(jobs)]
    ctx = get_context("fork" if "fork" in get_all_start_methods() else "spawn")
    with ctx.Manager() as manager:
        q = manager.Queue()
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as ex:
            futures = {ex.submit(_child, j, min_genes, chunk_cells, q): i for i, j in enumerate(jobs)}
            results: list[dict | None] = [None] * len(jobs)
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(q, progress)
                for f in finished:
                    results[futures[f]] = f.result()  # re-raises a child's SourceError here
            _drain(q, progress)
    return results


def _drain(q, progress) -> None:
    while True:
        try:
            n = q.get_nowait()
        except queue.Empty:
            return
        if progress is not None:
            progress(n)

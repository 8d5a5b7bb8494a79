"""``build``: h5ad files → ``DIR/{manifest.json, vocab.tsv, zarr/<dataset>.zarr, mds/<split>/}``.

Steps: open and validate every input (``data_prep.source``), build or load the gene vocabulary and
map each dataset (refusing one whose match ratio is below ``min_match``), stream QC-passing cells
into per-dataset Zarr v3 stores (``data_prep.ingest``, ``workers`` files at a time), assign splits
(``data_prep.split``), write MDS shards from the Zarr stores (``data_prep.mds``, ``workers`` row
ranges at a time), write the manifest.

Idempotent: the manifest records a fingerprint of the inputs' content hashes (xxh3-128), the
options and the given vocabulary; a re-run with the same fingerprint does nothing.
Atomic: everything is written into ``.DIR.tmp-<random>`` beside ``DIR``, under an exclusive
lock (``.DIR.lock``, ``fcntl.flock``) that also lets a new build clear temp dirs left by a killed one; on success an existing
``DIR`` is renamed aside, the new one renamed into place and the old one deleted. A failure removes
the temporary dir and leaves any finished corpus untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import xxhash
from tqdm.auto import tqdm

from data_prep.ingest import IngestJob, ingest_all
from data_prep.malloc_env import MALLOC_ENV
from data_prep.split import ALGORITHM as SPLIT_ALGORITHM, assign_splits
from data_prep.source import Source, SourceError
from data_prep.vocab import (
    DEFAULT_SYMBOL_TABLE,
    DEFAULT_SYMBOL_TABLE_SOURCE,
    GeneVocab,
    read_symbol_table,
    var_gene_ids,
    var_symbols,
)

FORMAT_VERSION = 2  # 2: compact MDS dtypes (genes uint16/uint32, counts rightsized per cell)
UNKNOWN = "unknown"
#: A dataset whose mapped genes hold less than this share of its genes, or of its counts, gets a warning.
WARN_GENE_SHARE = 0.8
WARN_COUNT_SHARE = 0.9


@dataclasses.dataclass
class BuildOptions:
    vocab: str | None = None
    symbol_table: str | None = None
    min_genes: int = 200
    min_match: float = 0.5
    split_by: str = "donor"
    val_frac: float = 0.05
    test_frac: float = 0.05
    seed: int = 0
    workers: int = 1
    cell_type_key: str = "cell_type"
    donor_key: str = "donor_id"
    chunk_cells: int = 20_000
    cells_per_part: int = 100_000
    compression: str = "zstd:1"
    shard_mb: int = 16
    force: bool = False

    def fingerprint_fields(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("workers", "force", "chunk_cells", "vocab", "symbol_table"):
            d.pop(k)
        return d


def file_xxh3(path: str, chunk: int = 1 << 20) -> str:
    """xxh3-128 of a file's bytes (fast content hash used for idempotency).

    Read into one reused cache-sized buffer: a fresh large ``bytes`` per read costs a page fault
    per 4 KiB (as much CPU time as the hashing itself)."""
    h = xxhash.xxh3_128()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _fingerprint(input_hashes: list[str], opts: BuildOptions, vocab_hash: str | None, table_hash: str | None) -> str:
    payload = {"format": FORMAT_VERSION, "inputs": input_hashes, "options": opts.fingerprint_fields(),
               "vocab": vocab_hash, "symbol_table": table_hash, "split_algorithm": SPLIT_ALGORITHM}
    return xxhash.xxh3_128(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _dataset_names(paths: list[str]) -> list[str]:
    names, seen = [], {}
    for p in paths:
        stem = Path(p).name.removesuffix(".h5ad")
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        names.append(stem if n == 0 else f"{stem}-{n}")
    return names


def _label_codes(col: pd.Series | None, rows: np.ndarray) -> tuple[list[str], np.ndarray]:
    """``(names, int32 code per kept row)`` of a label column (missing column or value → ``unknown``).

    Codes, not a string per cell: per-cell strings cost ~0.9 KB a cell over the build (the
    1M-cell benchmark's peak RSS grew with the corpus), codes 4 bytes."""
    if col is None:
        return [UNKNOWN], np.zeros(len(rows), np.int32)
    codes, uniques = pd.factorize(col.iloc[rows], use_na_sentinel=True)  # observed values only
    names = [UNKNOWN if v == "nan" else v for v in pd.Index(uniques).astype(str)]
    codes = codes.astype(np.int32)
    if (codes < 0).any():  # missing values
        names.append(UNKNOWN)
        codes[codes < 0] = len(names) - 1
    return names, codes


def _global_codes(local: list[tuple[list[str], np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-dataset ``(names, codes)`` → ``(sorted unique names, codes into them)`` over all cells."""
    names = np.asarray(sorted({n for ns, _ in local for n in ns}), dtype=object)
    index = {n: i for i, n in enumerate(names)}
    codes = [np.asarray([index[n] for n in ns], np.int32)[c] for ns, c in local]
    return names, np.concatenate(codes) if codes else np.zeros(0, np.int32)


def mapping_warning(rec: dict) -> str | None:
    """A clear warning when a dataset's mapped genes are few or hold few of its counts (None when fine)."""
    genes, counts = rec["match_ratio"], rec["count_share_mapped"]
    if genes >= WARN_GENE_SHARE and counts >= WARN_COUNT_SHARE:
        return None
    how = rec["gene_key"]
    hint = ("symbols are matched to Ensembl IDs by name; symbols of an older or another annotation (or another "
            "species) do not match: give a file with Ensembl IDs, or --symbol-table with a table for its annotation"
            if how.startswith("symbols") else "check that --vocab fits this file's annotation and species")
    return (f"{rec['name']}: only {rec['n_genes_mapped']}/{rec['n_genes']} genes ({genes:.1%}) holding "
            f"{counts:.1%} of the counts map to the vocabulary (via {how}); unmapped genes are left out of the "
            f"training data ({hint})")


def build(inputs: list[str], out: str, opts: BuildOptions | None = None, log=print) -> dict:
    """Build the corpus at ``out``; returns the manifest (existing one when up to date)."""
    opts = opts or BuildOptions()
    if not inputs:
        raise ValueError("no input files")
    if opts.min_genes < 1:
        raise ValueError(f"min_genes must be ≥ 1 (MDS cannot store empty cells), got {opts.min_genes}")
    if opts.shard_mb < 1:
        raise ValueError(f"shard_mb must be ≥ 1, got {opts.shard_mb}")
    if not 0 <= opts.min_match <= 1:
        raise ValueError(f"min_match must lie in [0, 1], got {opts.min_match}")
    from data_prep.mds import check_compression  # imports streaming
    check_compression(opts.compression)
    t0 = time.perf_counter()
    out = os.path.abspath(out)
    inputs = [os.path.abspath(p) for p in inputs]
    for p in inputs:
        if not os.path.isfile(p):
            raise SourceError(f"{p}: no such file")
    input_hashes = [file_xxh3(p) for p in inputs]
    vocab_hash = file_xxh3(opts.vocab) if opts.vocab else None
    table_hash = file_xxh3(opts.symbol_table if opts.symbol_table else DEFAULT_SYMBOL_TABLE)
    fp = _fingerprint(input_hashes, opts, vocab_hash, table_hash)
    manifest_path = os.path.join(out, "manifest.json")
    if not opts.force and os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            old = json.load(f)
        if old.get("fingerprint") == fp:
            log(f"{out}: up to date (fingerprint {fp[:12]}), nothing to do")
            old["skipped"] = True
            return old

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    with _exclusive(out):
        return _build_locked(out, inputs, input_hashes, opts, fp, t0, log)


@contextlib.contextmanager
def _exclusive(out: str):
    """Hold ``.<name>.lock`` beside ``out`` (one build per corpus at a time); clear leftovers of killed builds."""
    parent, name = os.path.dirname(out), os.path.basename(out)
    with open(os.path.join(parent, f".{name}.lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another build is writing {out} (lock .{name}.lock is held)") from None
        for stale in glob.glob(os.path.join(parent, f".{name}.tmp-*")) + glob.glob(os.path.join(parent, f".{name}.old-*")):
            shutil.rmtree(stale, ignore_errors=True)
        yield


def _build_locked(out, inputs, input_hashes, opts, fp, t0, log) -> dict:
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    sources: list[Source] = []
    try:
        manifest = _build_into(tmp, inputs, input_hashes, opts, sources, log)
        manifest["fingerprint"] = fp
        manifest["seconds"] = round(time.perf_counter() - t0, 3)
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for s in sources:
            s.close()
    return manifest


def _swap_into_place(tmp: str, out: str) -> None:
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
        os.rmdir(old)
        os.rename(out, old)
    os.rename(tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _build_into(tmp: str, inputs, input_hashes, opts: BuildOptions, sources: list, log) -> dict:
    names = _dataset_names(inputs)
    timings = {}
    t = time.perf_counter()
    for p in inputs:
        sources.append(Source(p))
    gene_ids = [var_gene_ids(s.var) for s in sources]
    table, table_rec = None, None
    if opts.symbol_table:
        table = read_symbol_table(opts.symbol_table)
        table_rec = {"path": os.path.abspath(opts.symbol_table), "source": "--symbol-table", "n_symbols": len(table)}
    elif any(ids is None for ids, _ in gene_ids):  # symbol-only files: the shipped GENCODE table
        table = read_symbol_table(DEFAULT_SYMBOL_TABLE)
        table_rec = {"path": str(DEFAULT_SYMBOL_TABLE), "source": DEFAULT_SYMBOL_TABLE_SOURCE, "n_symbols": len(table)}
        log(f"files without Ensembl IDs: mapping their symbols with {DEFAULT_SYMBOL_TABLE_SOURCE} "
            f"({len(table)} symbols; --symbol-table to use another table)")

    # Vocabulary and per-dataset gene mapping.
    if opts.vocab:
        vocab = GeneVocab.load(opts.vocab)
        vocab_origin = os.path.abspath(opts.vocab)
    else:
        vocab = GeneVocab.from_vars([s.var for s in sources], symbol_table=table, gene_ids=gene_ids)
        vocab_origin = "built from inputs"
    vocab_sha = vocab.save(os.path.join(tmp, "vocab.tsv"))
    mappings, datasets = [], []
    for name, src, h, (ids, id_source) in zip(names, sources, input_hashes, gene_ids):
        vid = vocab.map_var(src.var, symbol_table=table, gene_ids=(ids, id_source))
        n_mapped = int((vid >= 0).sum())
        ratio = n_mapped / max(len(vid), 1)
        mapped = vid[vid >= 0]
        rec = {"name": name, "path": src.path, "xxh3_128": h, "count_source": src.count_source,
               "gene_key": id_source or f"symbols ({var_symbols(src.var)[1]})", "n_genes": len(vid),
               "n_genes_mapped": n_mapped, "match_ratio": round(ratio, 6),
               "n_genes_duplicate": int(len(mapped) - len(np.unique(mapped)))}
        log(f"{name}: {src.n_obs} cells × {len(vid)} genes, counts in {src.count_source}, "
            f"{n_mapped}/{len(vid)} genes mapped ({ratio:.1%}) via {rec['gene_key']}")
        if ratio < opts.min_match:
            raise SourceError(f"{src.path}: only {n_mapped}/{len(vid)} genes ({ratio:.1%}) map to the vocabulary "
                              f"(threshold --min-match {opts.min_match:.0%}); gene IDs looked up via {rec['gene_key']}")
        mappings.append(vid)
        datasets.append(rec)

    timings["open_and_map"] = time.perf_counter() - t
    t = time.perf_counter()

    # Zarr stores, chunk by chunk (``workers`` datasets at a time).
    os.makedirs(os.path.join(tmp, "zarr"))
    jobs = [IngestJob(src.path, os.path.join(tmp, "zarr", f"{name}.zarr"), vid)
            for name, src, vid in zip(names, sources, mappings)]
    with tqdm(total=sum(s.n_obs for s in sources), desc="zarr", unit="cell", unit_scale=True, leave=False) as bar:
        results = ingest_all(jobs, opts.min_genes, opts.chunk_cells, opts.workers, sources, progress=bar.update)
    cell_types, donors, kept_rows, warnings_ = [], [], [], []
    for name, src, rec, res in zip(names, sources, datasets, results):
        rows, stats = res["rows"], res["stats"]
        rec.update(stats, zarr=f"zarr/{name}.zarr", nnz=res["nnz"])
        cell_types.append(_label_codes(src.obs.get(opts.cell_type_key), rows))
        rec["has_cell_type"] = opts.cell_type_key in src.obs.columns
        rec["has_donor"] = opts.donor_key in src.obs.columns
        d_names, d_codes = _label_codes(src.obs.get(opts.donor_key), rows)
        donors.append(([f"{name}/{d}" for d in d_names], d_codes))
        kept_rows.append(len(rows))
        log(f"{name}: kept {stats['cells_out']}/{stats['cells_in']} cells (dropped {stats['dropped_min_genes']} "
            f"with < {opts.min_genes} genes, {stats['dropped_not_primary']} not primary)")
        rec["counts_total"], rec["counts_mapped"] = res["counts_total"], res["counts_mapped"]
        rec["count_share_mapped"] = round(res["counts_mapped"] / max(res["counts_total"], 1), 6)
        log(f"{name}: mapped genes {rec['match_ratio']:.1%} of genes, {rec['count_share_mapped']:.1%} of counts")
        low = mapping_warning(rec)
        if low:
            warnings_.append(low)
            log(f"WARNING: {low}")

    timings["zarr"] = time.perf_counter() - t
    t = time.perf_counter()

    # Labels and split.
    if sum(kept_rows) == 0:
        raise SourceError("no cell passed QC in any input (check --min-genes)")
    ct_names, ct_codes = _global_codes(cell_types)
    donor_names, donor_codes = _global_codes(donors)
    if opts.split_by not in ("dataset", "donor", "cell"):
        raise ValueError(f"split_by must be dataset, donor or cell, got {opts.split_by!r}")
    if opts.split_by == "dataset":
        ds_names, ds_codes = _global_codes([([n], np.zeros(k, np.int32)) for n, k in zip(names, kept_rows)])
    groups, group_names = (ds_codes, ds_names) if opts.split_by == "dataset" else (donor_codes, donor_names)
    split_codes, split_info = assign_splits(groups, split_by=opts.split_by, val_frac=opts.val_frac,
                                            test_frac=opts.test_frac, seed=opts.seed, group_names=group_names)

    # MDS shards from the Zarr stores.
    from data_prep.mds import Task, columns, write_mds  # imports streaming

    tasks, offset = [], 0
    for d, (name, vid, n) in enumerate(zip(names, mappings, kept_rows)):
        for start in range(0, n, opts.cells_per_part):
            stop = min(start + opts.cells_per_part, n)
            sl = slice(offset + start, offset + stop)
            tasks.append(Task(part=len(tasks), store=os.path.join(tmp, "zarr", f"{name}.zarr"), dataset=d,
                              start=start, stop=stop, vocab_ids=vid, split=split_codes[sl],
                              cell_type=ct_codes[sl], donor=donor_codes[sl], cell_id0=offset + start))
        offset += n
    with tqdm(total=offset, desc="mds", unit="cell", unit_scale=True, leave=False) as bar:
        mds = write_mds(tasks, os.path.join(tmp, "mds"), opts.workers, len(vocab), progress=bar.update,
                        compression=opts.compression, size_limit=opts.shard_mb << 20)
    timings["split_and_mds"] = time.perf_counter() - t

    return {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "options": dataclasses.asdict(opts),
        "vocab": {"path": "vocab.tsv", "sha256": vocab_sha, "size": len(vocab), "origin": vocab_origin},
        "symbol_table": table_rec,
        "warnings": warnings_,
        "datasets": datasets,
        "labels": {"cell_type": ct_names.tolist(), "dataset": list(names), "donor": donor_names.tolist(),
                   "cell_type_key": opts.cell_type_key, "donor_key": opts.donor_key},
        "cell_id": "global row over the datasets' zarr stores in dataset order (dataset offset + zarr row)",
        "split": split_info,
        "mds": {"columns": columns(len(vocab)), "compression": opts.compression, "shard_mb": opts.shard_mb,
                "n_cells": mds["written"], "shards": mds["shards"],
                "dropped_no_mapped_genes": mds["no_mapped_genes"]},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},  # see data_prep.malloc_env
        "totals": {"cells_in": int(sum(r["cells_in"] for r in datasets)),
                   "cells_out": int(sum(r["cells_out"] for r in datasets)),
                   "cells_in_mds": int(sum(mds["written"].values()))},
    }

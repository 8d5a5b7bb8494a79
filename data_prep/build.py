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
the temporary dir and leaves any finished corpus untouched. So ``DIR`` must be new, empty or a finished corpus
(``manifest.json``): any other existing path is refused before anything is read, never replaced.
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
from data_prep.labels import UNKNOWN, corpus_names, load_rows, save_codes
from data_prep.malloc_env import MALLOC_ENV
from data_prep.split import ALGORITHM as SPLIT_ALGORITHM, SplitPlan
from data_prep.source import Source, SourceError, check_input
from data_prep.vocab import (
    DEFAULT_SYMBOL_TABLE,
    DEFAULT_SYMBOL_TABLE_SOURCE,
    GeneVocab,
    read_symbol_table,
    var_gene_ids,
    var_symbols,
)

FORMAT_VERSION = 2  # 2: compact MDS dtypes (genes uint16/uint32, counts rightsized per cell)
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


def mapping_warning(rec: dict) -> str | None:
    """A clear warning when a dataset's mapped genes are few or hold few of its counts (None when fine; a
    dataset that kept no cell is judged on its genes alone)."""
    genes, counts = rec["match_ratio"], rec["count_share_mapped"]
    if genes >= WARN_GENE_SHARE and (counts >= WARN_COUNT_SHARE or rec["counts_total"] == 0):
        return None  # (no kept cells, no counts: QC, not the mapping, is what to look at)
    how = rec["gene_key"]
    hint = ("symbols are matched to Ensembl IDs by name; symbols of an older or another annotation (or another "
            "species) do not match: give a file with Ensembl IDs, or --symbol-table with a table for its annotation"
            if how.startswith("symbols") else "check that --vocab fits this file's annotation and species")
    return (f"{rec['name']}: only {rec['n_genes_mapped']}/{rec['n_genes']} genes ({genes:.1%}) holding "
            f"{counts:.1%} of the counts map to the vocabulary (via {how}); unmapped genes are left out of the "
            f"training data ({hint})")


def _missing_label_warning(results: list[dict], names: list[str], label: str, option: str, key: str) -> str | None:
    """A warning when no input's obs has the ``label`` column ``key`` (a misspelt key, most likely), naming
    the columns the first input has; None when some input has it."""
    if any(r["labels"][label]["present"] for r in results):
        return None
    cols = results[0]["obs_columns"]
    return (f"{option} {key!r}: no input has this obs column, so every cell's {label.replace('_', ' ')} is "
            f"{UNKNOWN!r} (obs columns of {names[0]}: {', '.join(map(repr, cols[:30])) or 'none'}"
            f"{', …' if len(cols) > 30 else ''})")


ENSEMBL_SPECIES = {"ENSG": "human", "ENSMUSG": "mouse", "ENSRNOG": "rat", "ENSDARG": "zebrafish",
                   "ENSMMUG": "macaque", "ENSMFAG": "macaque", "ENSSSCG": "pig", "ENSBTAG": "cattle"}


def ensembl_prefix(gene_ids) -> str | None:
    """The most common Ensembl gene-ID prefix (``ENSG``, ``ENSMUSG`` …) of these IDs; None for no Ensembl ID."""
    prefixes = pd.Series(gene_ids, dtype=object).str.extract(r"^(ENS[A-Z]*G)\d", expand=False).dropna()
    return None if prefixes.empty else str(prefixes.value_counts().index[0])


def _species_warning(datasets: list[dict]) -> str | None:
    """A warning when the inputs' genes come from more than one species (by Ensembl prefix): their genes share no
    token, so the model learns each species' cells on disjoint inputs. Not refused: a cross-species corpus may be
    meant."""
    by = {}
    for r in datasets:
        if r["ensembl_prefix"]:
            by.setdefault(r["ensembl_prefix"], []).append(r["name"])
    if len(by) < 2:
        return None
    return ("inputs from more than one species share no gene tokens: " + "; ".join(
        f"{ENSEMBL_SPECIES.get(p, p)} ({p}): {', '.join(n[:3])}{', …' if len(n) > 3 else ''}" for p, n in by.items()))


def _same_content_warning(names: list[str], input_hashes: list[str]) -> str | None:
    """A warning when inputs have the same content (a file given twice, or through a link): their cells would be
    trained on twice and could straddle the split. Not refused: a throughput benchmark may mean it."""
    seen: dict[str, str] = {}
    pairs = []
    for name, h in zip(names, input_hashes):
        if h in seen:
            pairs.append(f"{name} = {seen[h]}")
        seen.setdefault(h, name)
    return (f"inputs with the same content ({'; '.join(pairs)}): every cell of theirs is in the corpus once per copy"
            if pairs else None)


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
        check_input(p)
    manifest_path = os.path.join(out, "manifest.json")
    if os.path.lexists(out) and not os.path.isfile(manifest_path) and not (os.path.isdir(out) and not os.listdir(out)):
        # a successful build replaces ``out`` whole: never a directory (or file) that is not a finished corpus
        raise ValueError(f"{out} exists and is not a data_prep corpus (no manifest.json): refusing to replace it; "
                         "give --out a new or empty directory")
    input_hashes = [file_xxh3(p) for p in inputs]
    vocab_hash = file_xxh3(opts.vocab) if opts.vocab else None
    table_hash = file_xxh3(opts.symbol_table if opts.symbol_table else DEFAULT_SYMBOL_TABLE)
    fp = _fingerprint(input_hashes, opts, vocab_hash, table_hash)
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
    # mkdtemp makes the directory 0700; the corpus gets a plain mkdir's mode (0777 less the umask), so a group
    # that shares a cluster's file system can read it as it can the files inside
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
        os.rmdir(old)
        os.rename(out, old)
    os.rename(tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _build_into(tmp: str, inputs, input_hashes, opts: BuildOptions, sources: list, log) -> dict:
    """Memory does not grow with the corpus: files are opened one at a time (their ``var`` for the
    vocabulary and the gene mapping, then obs + counts for ingestion), and per-cell labels and split
    codes live on disk per dataset (``data_prep.labels``) until the MDS tasks read their row ranges.
    What is held for the whole build is per file (its gene mapping, label names), not per cell."""
    names = _dataset_names(inputs)
    timings = {}
    t = time.perf_counter()
    table, table_rec = None, None
    if opts.symbol_table:
        table = read_symbol_table(opts.symbol_table)
        table_rec = {"path": os.path.abspath(opts.symbol_table), "source": "--symbol-table", "n_symbols": len(table)}

    def genes_of(path: str):
        """``(open Source without obs, its gene IDs)``; loads the shipped symbol table at the first
        file without Ensembl IDs (used only for such files)."""
        nonlocal table, table_rec
        src = Source(path, load_obs=False)
        sources.append(src)  # closed by the caller if anything fails
        ids = var_gene_ids(src.var)
        if ids[0] is None and table is None:  # symbol-only files: the shipped GENCODE table
            table = read_symbol_table(DEFAULT_SYMBOL_TABLE)
            table_rec = {"path": str(DEFAULT_SYMBOL_TABLE), "source": DEFAULT_SYMBOL_TABLE_SOURCE,
                         "n_symbols": len(table)}
            log(f"files without Ensembl IDs: mapping their symbols with {DEFAULT_SYMBOL_TABLE_SOURCE} "
                f"({len(table)} symbols; --symbol-table to use another table)")
        return src, ids

    def done(src: Source) -> None:
        src.close()
        sources.remove(src)

    # Vocabulary (one file's var at a time), then each dataset's gene mapping.
    if opts.vocab:
        vocab = GeneVocab.load(opts.vocab)
        vocab_origin = os.path.abspath(opts.vocab)
    else:
        id_sym: dict[str, str] = {}
        for p in inputs:
            src, ids = genes_of(p)
            GeneVocab.collect(id_sym, src.var, ids, table)
            done(src)
        vocab = GeneVocab.from_collected(id_sym)
        vocab_origin = "built from inputs"
    vocab_sha = vocab.save(os.path.join(tmp, "vocab.tsv"))
    mappings, datasets, n_obs = [], [], []
    for name, p, h in zip(names, inputs, input_hashes):
        src, (ids, id_source) = genes_of(p)
        vid = vocab.map_var(src.var, symbol_table=table, gene_ids=(ids, id_source))
        n_mapped = int((vid >= 0).sum())
        ratio = n_mapped / max(len(vid), 1)
        mapped = vid[vid >= 0]
        rec = {"name": name, "path": src.path, "xxh3_128": h, "count_source": src.count_source,
               "gene_key": id_source or f"symbols ({var_symbols(src.var)[1]})", "n_genes": len(vid),
               "n_genes_mapped": n_mapped, "match_ratio": round(ratio, 6),
               "n_genes_duplicate": int(len(mapped) - len(np.unique(mapped))),
               "ensembl_prefix": ensembl_prefix(np.asarray(vocab.gene_ids, dtype=object)[mapped])}
        log(f"{name}: {src.n_obs} cells × {len(vid)} genes, counts in {src.count_source}, "
            f"{n_mapped}/{len(vid)} genes mapped ({ratio:.1%}) via {rec['gene_key']}")
        if ratio < opts.min_match:
            raise SourceError(f"{src.path}: only {n_mapped}/{len(vid)} genes ({ratio:.1%}) map to the vocabulary "
                              f"(threshold --min-match {opts.min_match:.0%}); gene IDs looked up via {rec['gene_key']}")
        n_obs.append(src.n_obs)
        done(src)
        mappings.append(vid)
        datasets.append(rec)

    timings["open_and_map"] = time.perf_counter() - t
    t = time.perf_counter()

    # Zarr stores, chunk by chunk (``workers`` datasets at a time); label codes per dataset to scratch.
    os.makedirs(os.path.join(tmp, "zarr"))
    scratch = os.path.join(tmp, ".labels")
    labels_dir = [os.path.join(scratch, f"{d:06d}") for d in range(len(names))]
    jobs = [IngestJob(p, os.path.join(tmp, "zarr", f"{name}.zarr"), vid, labels=lab,
                      label_keys={"cell_type": opts.cell_type_key, "donor": opts.donor_key})
            for name, p, vid, lab in zip(names, inputs, mappings, labels_dir)]
    with tqdm(total=sum(n_obs), desc="zarr", unit="cell", unit_scale=True, leave=False) as bar:
        results = ingest_all(jobs, opts.min_genes, opts.chunk_cells, opts.workers, progress=bar.update)
    kept_rows, warnings_ = [], []

    def warn(msg: str | None) -> None:
        if msg:
            warnings_.append(msg)
            log(f"WARNING: {msg}")

    for name, rec, res in zip(names, datasets, results):
        stats = res["stats"]
        rec.update(stats, zarr=f"zarr/{name}.zarr", nnz=res["nnz"])
        rec["has_cell_type"] = res["labels"]["cell_type"]["present"]
        rec["has_donor"] = res["labels"]["donor"]["present"]
        kept_rows.append(res["n_kept"])
        log(f"{name}: kept {stats['cells_out']}/{stats['cells_in']} cells (dropped {stats['dropped_min_genes']} "
            f"with < {opts.min_genes} genes, {stats['dropped_not_primary']} not primary)")
        rec["counts_total"], rec["counts_mapped"] = res["counts_total"], res["counts_mapped"]
        rec["count_share_mapped"] = round(res["counts_mapped"] / max(res["counts_total"], 1), 6)
        log(f"{name}: mapped genes {rec['match_ratio']:.1%} of genes, {rec['count_share_mapped']:.1%} of counts")
        warn(mapping_warning(rec))
    for label, option, key in (("cell_type", "--cell-type-key", opts.cell_type_key),
                               ("donor", "--donor-key", opts.donor_key)):
        warn(_missing_label_warning(results, names, label, option, key))
    warn(_species_warning(datasets))
    warn(_same_content_warning(names, input_hashes))

    timings["zarr"] = time.perf_counter() - t
    t = time.perf_counter()

    # Labels and split: corpus-wide codes and split codes, one dataset at a time, back to scratch.
    if sum(kept_rows) == 0:
        raise SourceError("no cell passed QC in any input: " + "; ".join(
            f"{r['name']}: 0/{r['cells_in']} kept ({r['dropped_min_genes']} with < {opts.min_genes} expressed genes "
            f"(--min-genes), {r['dropped_not_primary']} with is_primary_data False)" for r in datasets))
    ct_names, ct_luts = corpus_names([r["labels"]["cell_type"]["names"] for r in results])
    donor_names, donor_luts = corpus_names([[f"{name}/{d}" for d in r["labels"]["donor"]["names"]]
                                            for name, r in zip(names, results)])
    if opts.split_by not in ("dataset", "donor", "cell"):
        raise ValueError(f"split_by must be dataset, donor or cell, got {opts.split_by!r}")
    if opts.split_by == "dataset":
        group_names, group_luts = corpus_names([[n] for n in names])
        local_sizes = [[k] for k in kept_rows]
    else:
        group_names, group_luts = donor_names, donor_luts
        local_sizes = [r["labels"]["donor"]["counts"] for r in results]
    sizes = np.zeros(len(group_names), np.int64)
    for lut, counts in zip(group_luts, local_sizes):
        np.add.at(sizes, lut, np.asarray(counts, np.int64))
    plan = SplitPlan(sum(kept_rows), sizes, group_names, split_by=opts.split_by, val_frac=opts.val_frac,
                     test_frac=opts.test_frac, seed=opts.seed)
    for d, lab in enumerate(labels_dir):
        cell_type = ct_luts[d][load_rows(lab, "cell_type")]
        donor = donor_luts[d][load_rows(lab, "donor")]
        groups = donor if opts.split_by != "dataset" else np.full(kept_rows[d], group_luts[d][0], np.int32)
        save_codes(lab, split=plan.codes(groups), cell_type=cell_type, donor=donor)
    split_info = plan.info()

    # MDS shards from the Zarr stores.
    from data_prep.mds import Task, columns, write_mds  # imports streaming

    tasks, offset = [], 0
    for d, (name, vid, n) in enumerate(zip(names, mappings, kept_rows)):
        for start in range(0, n, opts.cells_per_part):
            stop = min(start + opts.cells_per_part, n)
            tasks.append(Task(part=len(tasks), store=os.path.join(tmp, "zarr", f"{name}.zarr"), dataset=d,
                              start=start, stop=stop, vocab_ids=vid, cell_id0=offset + start, labels=labels_dir[d]))
        offset += n
    with tqdm(total=offset, desc="mds", unit="cell", unit_scale=True, leave=False) as bar:
        mds = write_mds(tasks, os.path.join(tmp, "mds"), opts.workers, len(vocab), progress=bar.update,
                        compression=opts.compression, size_limit=opts.shard_mb << 20)
    shutil.rmtree(scratch)
    timings["split_and_mds"] = time.perf_counter() - t
    fracs = {"val": opts.val_frac, "test": opts.test_frac}
    empty = [k for k, n in mds["written"].items() if not n and fracs.get(k, 1.0) > 0]
    if empty:   # a loader of such a split fails (data_prep.loader says why); say it now, at the build
        warn(f"split {', '.join(empty)} holds no cells ({offset} cells in all; val_frac {opts.val_frac}, test_frac "
             f"{opts.test_frac}): a loader of it will refuse; build from more cells for a held-out split")

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

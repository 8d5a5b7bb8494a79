"""Open one h5ad out-of-core, pick its raw-count matrix and stream validated, QC-filtered row chunks.

Counts must be finite, ≥ 0 and integral: a value is accepted when ``|x − round(x)| ≤ COUNT_TOL``
(1e-3, for counts stored as float) and stored rounded as int32. Where the counts are looked for, in order
(:func:`count_candidates`, the same rule for ``training.embed`` and the PCA baseline): ``X``, then ``raw.X``, then
the layers, conventional count names first (``layers["counts"]`` is where scanpy/scvi-tools workflows keep them
before normalising ``X``). A file with counts in none of them (normalised / log / scaled data) is refused, naming
what each holds.
The choice is made on the first ``PROBE_CELLS`` cells; every later chunk is checked again, so a
file that turns bad half way is refused with the row where it does.

Chunks are at most ``chunk_cells`` rows and :data:`CHUNK_NNZ` non-zeros (memory bounded whatever the
cells' length).

QC per cell: dropped when it has fewer than ``min_genes`` expressed genes (count > 0) or when
``obs['is_primary_data']`` exists and is False. Both are counted.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

COUNT_TOL = 1e-3
PROBE_CELLS = 2000
# Non-zeros read per chunk at most (with ``chunk_cells`` rows at most): ≈ 12 bytes each in read buffers,
# so ≈ 200 MB, whether a chunk is 20,000 10x cells of 800 genes or 1,700 Smart-seq cells of 10,000.
CHUNK_NNZ = 1 << 24
INT32_MAX = np.iinfo(np.int32).max
# Layer names that usually hold raw counts, tried before any other layer.
COUNT_LAYERS = ("counts", "raw_counts", "count", "umi_counts", "umis", "umi", "raw")


def count_candidates(has_raw: bool, layers) -> list[str]:
    """Where raw counts are looked for, in order: ``X``, ``raw/X``, then ``layers/<name>`` (the names of
    :data:`COUNT_LAYERS` first, case-insensitively, then the others in sorted order)."""
    layers = list(layers)
    known = [n for c in COUNT_LAYERS for n in layers if n.lower() == c]
    rest = sorted(n for n in layers if n not in known)
    return ["X", *(["raw/X"] if has_raw else []), *(f"layers/{n}" for n in known + rest)]


class Unreadable(Exception):
    """A candidate count matrix that cannot be read row by row (the reason in its message)."""


def anndata_matrix(adata: ad.AnnData, key: str):
    """Matrix ``key`` (a :func:`count_candidates` key) of an in-memory or backed AnnData."""
    if key.startswith("layers/"):
        return adata.layers[key[len("layers/"):]]
    return adata.X if key == "X" else adata.raw.X


def first_counts(candidates: list[str], open_matrix) -> tuple[str | None, object, list[str]]:
    """The first of ``candidates`` whose first ``PROBE_CELLS`` rows hold raw counts: ``(key, matrix, problems)``,
    or ``(None, None, problems)`` when none does; ``problems`` says what each candidate looked at holds.
    ``open_matrix(key)`` returns the matrix, None to pass over it (absent, or not this file's cells × genes), or
    raises :class:`Unreadable` to have it noted and passed over. The one probe behind ``data_prep build``,
    ``training.embed`` and the PCA baseline."""
    problems = []
    for key in candidates:
        try:
            m = open_matrix(key)
        except Unreadable as e:
            problems.append(f"{source_name(key)} is unreadable row by row ({e})")
            continue
        if m is None:
            continue
        problem = count_problem(_as_csr(m[: min(PROBE_CELLS, m.shape[0])]).data)
        if problem is None:
            return key, m, problems
        problems.append(f"{source_name(key)} has {problem}")
    return None, None, problems


def source_name(key: str) -> str:
    """``raw/X`` → ``raw.X``, ``layers/counts`` → ``layers["counts"]`` (as users write them)."""
    if key.startswith("layers/"):
        return f'layers["{key[len("layers/"):]}"]'
    return key.replace("/", ".")


class SourceError(ValueError):
    """An input file that cannot be used as a raw-count dataset."""


def check_input(path: str) -> None:
    """Refuse a missing path, or a directory (an AnnData ``.zarr`` store, say), naming it."""
    if os.path.isdir(path):
        raise SourceError(f"{path}: is a directory, not an h5ad file (an AnnData .zarr store? convert it: "
                          "anndata.read_zarr(path).write_h5ad(...))")
    if not os.path.isfile(path):
        raise SourceError(f"{path}: no such file")


@dataclasses.dataclass
class QCStats:
    cells_in: int = 0
    cells_out: int = 0
    dropped_min_genes: int = 0
    dropped_not_primary: int = 0


def _as_csr(block) -> sp.csr_matrix:
    if sp.issparse(block):
        return sp.csr_matrix(block)
    return sp.csr_matrix(np.asarray(block))


def count_problem(values: np.ndarray) -> str | None:
    """Why ``values`` are not raw counts (None when they are)."""
    v = np.asarray(values)
    if v.size == 0:
        return None
    if np.issubdtype(v.dtype, np.integer):
        return f"negative values (min {v.min()})" if v.min() < 0 else None
    lo, hi = v.min(), v.max()
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "NaN or infinite values"
    if lo < 0:
        return f"negative values (min {lo:.4g})"
    if hi > INT32_MAX:
        return f"counts above int32 range (max {hi:.4g})"
    off = np.abs(v - np.rint(v))
    if off.max() > COUNT_TOL:
        i = int(off.argmax())
        return f"non-integer values (e.g. {v[i]:.6g}; tolerance {COUNT_TOL})"
    return None


def as_counts(values: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray | None, str | None]:
    """``(int32 counts, None)`` when ``values`` are raw counts, else ``(None, why)``.

    Fast path for exact integers (one cast and one comparison); values within ``COUNT_TOL`` of an
    integer are rounded; everything else is explained by :func:`count_problem`. ``out``: an int32
    buffer of ``values``' length to write into (no allocation).
    """
    v = np.asarray(values)
    if out is None:
        out = np.empty(v.shape, np.int32)
    if v.dtype.kind in "iub":
        problem = count_problem(v) or (f"counts above int32 range (max {v.max()})"
                                       if v.size and v.max() > INT32_MAX else None)
        if problem:
            return None, problem
        np.copyto(out, v, casting="unsafe")
        return out, None
    with np.errstate(invalid="ignore"):  # NaN/inf/huge cast to garbage and fail the comparison
        np.copyto(out, v, casting="unsafe")
        exact = bool(np.equal(out, v).all())
    if exact and (v.size == 0 or out.min() >= 0):
        return out, None
    problem = count_problem(v)
    if problem:
        return None, problem
    np.copyto(out, np.rint(v), casting="unsafe")
    return out, None


class _CSRRows:
    """Row ranges of an h5ad's on-disk CSR group, read with ``h5py.read_direct`` into reused buffers.

    Fresh arrays of tens of MB per chunk cost a page fault per 4 KiB page on first touch (a third
    of the build's CPU time on our VMs); reusing buffers avoids it. A block returned by
    :meth:`rows` lives in ``bufs`` and is overwritten by the next call with the same dict.
    """

    def __init__(self, group: h5py.Group):
        self.data, self.indices, self.indptr = group["data"], group["indices"], group["indptr"]

    @staticmethod
    def _buf(bufs: dict, name: str, dtype, n: int) -> np.ndarray:
        b = bufs.get(name)
        if b is None or len(b) < n or b.dtype != dtype:
            b = bufs[name] = np.empty(max(n, int(1.25 * len(b)) if b is not None else n), dtype)
        return b[:n]

    def stop_within(self, start: int, stop: int, max_nnz: int) -> int:
        """The largest ``s ≤ stop`` (at least ``start + 1``) such that rows ``start:s`` hold ≤ ``max_nnz`` non-zeros."""
        ptr = self.indptr[start:stop + 1]
        s = int(np.searchsorted(ptr, ptr[0] + max_nnz, side="right")) - 1
        return start + min(max(s, 1), stop - start)

    def rows(self, start: int, stop: int, bufs: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(indptr rebased to 0, indices, values, int32 output buffer)`` of rows ``start:stop``."""
        ptr = self.indptr[start:stop + 1].astype(np.int64)
        a, b = int(ptr[0]), int(ptr[-1])
        ind = self._buf(bufs, "indices", self.indices.dtype, b - a)
        vals = self._buf(bufs, "data", self.data.dtype, b - a)
        if b > a:
            self.indices.read_direct(ind, np.s_[a:b], np.s_[0:b - a])
            self.data.read_direct(vals, np.s_[a:b], np.s_[0:b - a])
        return ptr - a, ind, vals, self._buf(bufs, "counts", np.int32, b - a)


class Source:
    """An h5ad with ``obs``/``var`` in memory and the raw-count matrix on disk.

    Current-format files are opened with h5py + ``anndata.io.read_elem``/``sparse_dataset``, so only
    obs/var are loaded (not obsm/obsp/layers/uns); legacy layouts go through
    ``anndata.read_h5ad(backed="r")``. ``load_obs=False``: var and the matrix only (``obs`` is None
    for current-format files), for steps that look at genes, not cells.
    """

    def __init__(self, path: str | os.PathLike, load_obs: bool = True):
        self.path = os.fspath(path)
        check_input(self.path)
        try:
            self._file = h5py.File(self.path, "r")
            if self._file.attrs.get("encoding-type") == "anndata":
                # current format: only obs/var are loaded, the matrices stay on disk; without X (anndata allows
                # X = None, counts in a layer) the cells are counted on obs
                x = self._matrix("X")
                obs = ad.io.read_elem(self._file["obs"]) if load_obs or x is None else None
                self.obs = obs if load_obs else None
                self.var = ad.io.read_elem(self._file["var"])
                self.n_obs = len(obs) if obs is not None else x.shape[0]
                layers = list(self._file["layers"].keys()) if "layers" in self._file else []
                candidates = count_candidates("raw/X" in self._file, layers)
            elif not {"obs", "var"} <= set(self._file):
                raise SourceError(
                    f"{self.path}: an HDF5 file but not an h5ad (AnnData) file: no obs/var (top level: "
                    f"{', '.join(sorted(self._file)[:8]) or 'empty'}). A 10x Genomics .h5 is converted with "
                    "scanpy.read_10x_h5(path).write_h5ad(...).")
            else:  # legacy layouts (pre-0.7 anndata, e.g. raw.X/raw.var): anndata's backed reader knows them
                self._file.close()
                self._file = None
                self._adata = ad.read_h5ad(self.path, backed="r")
                self.obs, self.var = self._adata.obs, self._adata.var
                candidates = count_candidates(self._adata.raw is not None, list(self._adata.layers.keys()))
                for key in (k for k in candidates if k in ("X", "raw/X")):   # CSC layers are skipped later
                    if getattr(anndata_matrix(self._adata, key), "format", None) == "csc":
                        raise SourceError(self._csc_message(source_name(key)))
        except SourceError:
            raise
        except Exception as e:  # h5py/anndata raise many types for damaged files
            raise SourceError(f"{self.path}: cannot read as h5ad (corrupt or truncated?): "
                              f"{type(e).__name__}: {e}") from e
        if self.obs is not None:
            self.n_obs = len(self.obs)
        key, self.matrix = self._choose_matrix(candidates)
        self.count_source = source_name(key)
        self._rows = _CSRRows(self._file[key]) if getattr(self, "_file", None) is not None \
            and isinstance(self._file[key], h5py.Group) else None
        if key == "raw/X":
            self.var = (ad.io.read_elem(self._file["raw/var"]) if getattr(self, "_file", None) is not None
                        else self._adata.raw.var)

    def _csc_message(self, key: str) -> str:
        return (f"{self.path}: {key} is stored as CSC (column-major); reading cells in chunks would re-read the "
                "whole matrix for every chunk. Convert it to CSR first (adata.X = adata.X.tocsr(); "
                "adata.write_h5ad(...)).")

    def _matrix(self, key: str):
        """On-disk matrix ``key``: a backed CSR dataset, an h5py dense dataset, or None."""
        if key not in self._file:
            return None
        elem = self._file[key]
        if isinstance(elem, h5py.Dataset):
            return elem
        fmt = elem.attrs.get("encoding-type", "")
        if fmt == "csc_matrix":
            raise SourceError(self._csc_message(key.replace("/", ".")))
        if fmt != "csr_matrix":
            raise SourceError(f"{self.path}: {key} has unsupported encoding {fmt!r}")
        return ad.io.sparse_dataset(elem)

    def _candidate(self, key: str):
        """Count-matrix candidate ``key`` for :func:`first_counts`."""
        if getattr(self, "_file", None) is None:
            m = anndata_matrix(self._adata, key)
            if key.startswith("layers/") and getattr(m, "format", None) == "csc":
                raise Unreadable("stored as CSC")
            return m
        try:
            m = self._matrix(key)
        except SourceError as e:                # a CSC or oddly encoded layer: say so if nothing else has counts
            if key in ("X", "raw/X"):
                raise
            raise Unreadable(e) from e
        if m is None or m.shape[0] != self.n_obs or (key != "raw/X" and m.shape[1] != len(self.var)):
            return None                         # not a cells × genes matrix of this file
        return m

    def _choose_matrix(self, candidates: list[str]):
        """The first of ``candidates`` that holds counts (on the first PROBE_CELLS cells): ``(key, matrix)``."""
        try:
            key, m, problems = first_counts(candidates, self._candidate)
        except SourceError:
            raise
        except Exception as e:
            raise SourceError(f"{self.path}: cannot read the count matrix (corrupt or truncated?): "
                              f"{type(e).__name__}: {e}") from e
        if key is not None:
            return key, m
        if not problems:
            raise SourceError(f"{self.path}: no count matrix: no X, raw.X or layer of its {self.n_obs} cells × "
                              f"{len(self.var)} genes")
        raise SourceError(
            f"{self.path}: no raw counts: " + "; ".join(problems) + " (looks normalised/log-transformed/scaled; "
            "looked in X, raw.X and every layer). Provide the file with raw integer counts.")

    def keep_mask_obs(self) -> np.ndarray:
        """Cells that pass the metadata part of QC (``is_primary_data``)."""
        if self.obs is None:
            raise RuntimeError(f"{self.path}: opened without obs (Source(load_obs=False))")
        if "is_primary_data" in self.obs.columns:
            col = self.obs["is_primary_data"]
            return np.asarray(col.astype(str).str.lower().isin(["true", "1"]), dtype=bool)
        return np.ones(self.n_obs, dtype=bool)

    def chunks(self, min_genes: int, chunk_cells: int, stats: QCStats, buffers: dict | None = None,
               max_nnz: int = CHUNK_NNZ) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
        """Yield ``(kept_row_indices, csr int32 counts of kept rows)``, validating every chunk.

        A chunk is at most ``chunk_cells`` rows and, for on-disk CSR, at most ``max_nnz`` non-zeros
        (at least one row), so memory is bounded whatever the cells' length. A yielded block may
        share buffers with the next one: use it before asking for the next. ``buffers``: a dict of
        read buffers to use (and grow), so that files read one after another reuse the same memory.
        """
        buffers = {} if buffers is None else buffers
        primary = self.keep_mask_obs()
        start = 0
        while start < self.n_obs:
            stop = min(start + chunk_cells, self.n_obs)
            if self._rows is not None:
                try:
                    stop = self._rows.stop_within(start, stop, max_nnz)
                except Exception as e:
                    raise SourceError(f"{self.path}: cannot read the row pointers of rows {start}:{stop} "
                                      f"(corrupt or truncated?): {type(e).__name__}: {e}") from e
            out, shape = None, (stop - start, len(self.var))
            try:
                if self._rows is not None:
                    ptr, ind, vals, out = self._rows.rows(start, stop, buffers)
                else:
                    block = _as_csr(self.matrix[start:stop])
                    ptr, ind, vals, shape = block.indptr, block.indices, block.data, block.shape
            except Exception as e:
                raise SourceError(f"{self.path}: cannot read rows {start}:{stop} (corrupt or truncated?): "
                                  f"{type(e).__name__}: {e}") from e
            data, problem = as_counts(vals, out)
            if problem is not None:
                raise SourceError(f"{self.path} ({self.count_source}), rows {start}:{stop}: {problem}")
            block = sp.csr_matrix((data, ind, ptr), shape=shape)
            block.eliminate_zeros()
            n_expr = np.diff(block.indptr)
            prim = primary[start:stop]
            enough = n_expr >= min_genes
            keep = prim & enough
            stats.cells_in += stop - start
            stats.dropped_not_primary += int((~prim).sum())
            stats.dropped_min_genes += int((prim & ~enough).sum())
            stats.cells_out += int(keep.sum())
            rows = np.flatnonzero(keep)
            if len(rows) == len(keep):
                yield rows + start, block
            elif len(rows):
                yield rows + start, block[rows]
            start = stop

    def close(self) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.close()
        if getattr(self, "_adata", None) is not None:
            self._adata.file.close()


def column_or_none(obs: pd.DataFrame, key: str | None) -> pd.Series | None:
    return obs[key] if key and key in obs.columns else None

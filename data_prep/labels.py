"""Per-cell labels (cell type, donor, split) as integer codes, kept on disk one dataset at a time.

A label column of a dataset becomes ``(names, int32 code per kept cell)`` (:func:`label_codes`):
4 bytes a cell instead of a string (~0.9 KB a cell). The corpus-wide codes index the sorted union of
all datasets' names (:func:`corpus_names`); a dataset's local codes map to them through a small
lookup table (``lut[local]``). The per-cell arrays are written to ``.npy`` files per dataset
(:func:`save_codes`) and read back a row range at a time through a memory map (:func:`load_rows`),
so the build never holds one label per corpus cell: its memory does not grow with the corpus.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

UNKNOWN = "unknown"


def label_codes(col: pd.Series | None, rows: np.ndarray) -> tuple[list[str], np.ndarray]:
    """``(names, int32 code per kept row)`` of a label column (missing column or value → ``unknown``)."""
    if col is None:
        return [UNKNOWN], np.zeros(len(rows), np.int32)
    codes, uniques = pd.factorize(col.iloc[rows], use_na_sentinel=True)  # observed values only
    names = [UNKNOWN if v == "nan" else v for v in pd.Index(uniques).astype(str)]
    codes = codes.astype(np.int32)
    if (codes < 0).any():  # missing values
        names.append(UNKNOWN)
        codes[codes < 0] = len(names) - 1
    return names, codes


def corpus_names(local_names: list[list[str]]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Sorted union of the datasets' names, and per dataset the lookup ``local code → corpus code``."""
    names = np.asarray(sorted({n for ns in local_names for n in ns}), dtype=object)
    index = {n: i for i, n in enumerate(names)}
    return names, [np.asarray([index[n] for n in ns], np.int32) for ns in local_names]


def save_codes(directory: str, **arrays: np.ndarray) -> None:
    """Write each array to ``directory/<name>.npy``."""
    os.makedirs(directory, exist_ok=True)
    for name, a in arrays.items():
        np.save(os.path.join(directory, f"{name}.npy"), a)


def load_rows(directory: str, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows ``start:stop`` of ``directory/<name>.npy``, read through a memory map (only those pages)."""
    m = np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r")
    out = np.array(m[start:stop])
    del m
    return out

"""Gene vocabulary keyed on Ensembl gene IDs.

Vocabulary id ``g`` (0 … n−1) is the row of ``vocab.tsv`` (columns ``gene_id``, ``symbol``; the
symbol may be empty). IDs are normalised by dropping the version suffix (``ENSG00000141510.17`` →
``ENSG00000141510``). A dataset's genes are mapped:

1. by Ensembl ID, taken from ``var_names`` when most of them look like Ensembl IDs, else from the
   first of the columns ``gene_ids``, ``gene_id``, ``ensembl_id``, ``feature_id`` that exists;
2. only when the file has no IDs at all: by symbol (``var_names`` or ``feature_name`` /
   ``gene_symbols`` / ``gene_name``) through the vocabulary's own symbols, extended by a
   ``symbol → ID`` table (:func:`read_symbol_table`): the user's, else :data:`DEFAULT_SYMBOL_TABLE`
   (GENCODE release 44, human; provenance in ``data_prep/gene_tables/README.md``). A symbol naming
   several IDs is ambiguous and stays unmapped.

Unknown genes map to −1. Several source genes may map to the same vocabulary id (duplicate IDs, two
versions of one ID); the MDS writer sums their counts per cell (see ``data_prep.mds``).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
_VERSIONED_RE = re.compile(r"^(ENS[A-Z]*G\d+)\.\d+$")
ID_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "feature_id")
SYMBOL_COLUMNS = ("feature_name", "gene_symbols", "gene_name", "gene_symbol")
UNMAPPED = -1


def normalize_ids(ids) -> np.ndarray:
    """Strip Ensembl version suffixes; non-Ensembl strings are returned unchanged."""
    sub = _VERSIONED_RE.sub
    return np.asarray([sub(r"\1", x) if "." in x else x for x in pd.Index(ids).astype(str)], dtype=object)


def ensembl_mask(values) -> np.ndarray:
    """Per value: does it look like an Ensembl gene ID (``ENS[species]G`` + ≥ 6 digits, optional version)?"""
    match = ENSEMBL_RE.match
    return np.fromiter((match(x) is not None for x in pd.Index(values).astype(str)), bool, len(values))


def _looks_ensembl(values, probe: int = 2048) -> float:
    """Fraction of Ensembl-like IDs among ``probe`` evenly spaced values (all of them when fewer)."""
    n = len(values)
    if n == 0:
        return 0.0
    if n > probe:
        values = np.asarray(values, dtype=object)[np.linspace(0, n - 1, probe).round().astype(np.int64)]
    return float(ensembl_mask(values).mean())


def var_gene_ids(var: pd.DataFrame) -> tuple[np.ndarray | None, str]:
    """Normalised Ensembl IDs of ``var`` and where they came from, or ``(None, "")`` when absent."""
    if _looks_ensembl(var.index) >= 0.5:
        return normalize_ids(var.index), "var_names"
    for col in ID_COLUMNS:
        if col in var.columns and _looks_ensembl(var[col]) >= 0.5:
            return normalize_ids(var[col]), col
    return None, ""


def var_symbols(var: pd.DataFrame) -> tuple[np.ndarray, str]:
    """Gene symbols of ``var``: a symbol column if there is one, else ``var_names``."""
    for col in SYMBOL_COLUMNS:
        if col in var.columns:
            return np.asarray(pd.Index(var[col]).astype(str), dtype=object), col
    return np.asarray(var.index.astype(str), dtype=object), "var_names"


#: Default ``symbol → Ensembl ID`` table for files without IDs: GENCODE release 44 (human, GRCh38), headerless
#: ``ENSG…,SYMBOL`` rows; source, licence and checksum in ``data_prep/gene_tables/README.md``.
DEFAULT_SYMBOL_TABLE = Path(__file__).resolve().parent / "gene_tables" / "gencode_v44_human_gene_id2name.csv.gz"
DEFAULT_SYMBOL_TABLE_SOURCE = "GENCODE release 44 (human, GRCh38; Ensembl 110), via celltypist 1.7.1"
_ID_NAMES = ("gene_id", "ensembl_id", "gene_ids", "ensembl_gene_id", "id")
_SYMBOL_NAMES = ("gene_name", "symbol", "gene_symbol", "gene_symbols", "name", "feature_name")


def read_symbol_table(path: str | os.PathLike) -> dict[str, str]:
    """Read a ``symbol → Ensembl ID`` table: CSV or TSV (optionally gzipped), with or without a header.

    With a header, columns are matched loosely by name (``gene_id``/``Gene_ID``/``ensembl_id`` and
    ``gene_name``/``Gene_Name``/``symbol``); without one (the first row already holds an Ensembl ID, as in
    GENCODE's ``GENCODEv44_Gene_id2name.csv``) the table must have two columns and the one holding Ensembl
    IDs is the ID column. Symbols naming several IDs are left out.
    """
    try:
        df = pd.read_csv(path, sep=None, engine="python", dtype=str, header=None, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"cannot read symbol table {path}: {e}") from e
    if df.empty:
        raise ValueError(f"symbol table {path} is empty")
    first = df.iloc[0].astype(str)
    if ensembl_mask(first).any():  # headerless: the ID column is the one holding Ensembl IDs
        if df.shape[1] != 2:
            raise ValueError(f"symbol table {path} has no header and {df.shape[1]} columns: a table without a "
                             "header needs exactly two (Ensembl ID and symbol, in either order)")
        id_col = int(np.argmax([_looks_ensembl(df[c]) for c in df.columns]))
        id_col, sym_col = df.columns[id_col], df.columns[1 - id_col]
    else:
        df = df.iloc[1:].set_axis(first.tolist(), axis=1)
        cols = {c.lower(): c for c in df.columns}
        id_col = next((cols[c] for c in _ID_NAMES if c in cols), None)
        sym_col = next((cols[c] for c in _SYMBOL_NAMES if c in cols), None)
        if id_col is None or sym_col is None:
            raise ValueError(f"symbol table {path}: need an ID column and a symbol column, found "
                             f"{first.tolist()} (names like gene_id / gene_name, or no header and two columns)")
    df = df.loc[(df[id_col] != "") & (df[sym_col] != ""), [id_col, sym_col]].copy()
    if not len(df) or _looks_ensembl(df[id_col]) < 0.5:
        raise ValueError(f"symbol table {path}: column {id_col!r} does not hold Ensembl gene IDs")
    df[id_col] = normalize_ids(df[id_col])
    df = df.drop_duplicates()
    unique = df.groupby(sym_col)[id_col].transform("nunique") == 1
    return dict(zip(df.loc[unique, sym_col], df.loc[unique, id_col]))


class GeneVocab:
    """Ordered Ensembl-ID vocabulary with optional symbols; id = position."""

    def __init__(self, gene_ids, symbols=None):
        ids = normalize_ids(gene_ids)
        if len(ids) == 0:
            raise ValueError("empty gene vocabulary")
        if pd.Index(ids).has_duplicates:
            dup = pd.Index(ids)[pd.Index(ids).duplicated()][:5].tolist()
            raise ValueError(f"gene vocabulary has duplicate IDs, e.g. {dup}")
        self.gene_ids = ids
        if symbols is None:
            self.symbols = np.full(len(ids), "", dtype=object)
        else:
            syms = pd.Series(symbols, dtype=object)
            self.symbols = np.asarray(syms.where(syms.notna(), "").astype(str), dtype=object)
        self._index = pd.Index(self.gene_ids)

    @functools.cached_property
    def _symbol_to_id(self) -> dict[str, int]:
        """Unambiguous symbol → id (only needed for datasets without gene IDs)."""
        sym = pd.Series(np.arange(len(self.gene_ids)), index=self.symbols)
        sym = sym[sym.index != ""]
        counts = sym.index.value_counts()
        return sym[~sym.index.isin(counts.index[counts > 1])].to_dict()

    def __len__(self) -> int:
        return len(self.gene_ids)

    def __eq__(self, other) -> bool:
        return isinstance(other, GeneVocab) and np.array_equal(self.gene_ids, other.gene_ids)

    @classmethod
    def from_vars(cls, vars_: list[pd.DataFrame], symbol_table: dict[str, str] | None = None,
                  gene_ids: list | None = None) -> GeneVocab:
        """Union of the Ensembl IDs of several datasets' ``var``, sorted by ID (deterministic).

        Symbol-only datasets contribute the IDs their symbols map to through ``symbol_table``;
        symbols are recorded where a dataset has both. ``gene_ids``: each var's
        :func:`var_gene_ids` when the caller already has them.
        """
        id_sym: dict[str, str] = {}
        for k, var in enumerate(vars_):
            cls.collect(id_sym, var, gene_ids[k] if gene_ids is not None else var_gene_ids(var), symbol_table)
        return cls.from_collected(id_sym)

    @staticmethod
    def collect(id_sym: dict[str, str], var: pd.DataFrame, gene_ids: tuple, symbol_table: dict[str, str] | None) -> None:
        """Add one dataset's genes to ``id_sym`` (Ensembl ID → symbol), as :meth:`from_vars` does for each
        of its ``vars_``: a build can read one file's ``var`` at a time."""
        ids, _ = gene_ids
        syms, _ = var_symbols(var)
        if ids is None:
            if symbol_table:
                for s in syms:
                    if s in symbol_table:
                        id_sym.setdefault(symbol_table[s], s)
            return
        match = ENSEMBL_RE.match
        ok = ensembl_mask(ids)
        for i, s in zip(ids[ok].tolist(), syms[ok].tolist()):
            if not id_sym.get(i):
                id_sym[i] = "" if s.startswith("ENS") and match(s) else s

    @classmethod
    def from_collected(cls, id_sym: dict[str, str]) -> GeneVocab:
        """The vocabulary of what :meth:`collect` gathered: IDs sorted."""
        if not id_sym:
            raise ValueError("no Ensembl gene IDs found in any dataset (and no symbol table to map symbols)")
        order = sorted(id_sym)
        return cls(order, [id_sym[i] for i in order])

    @classmethod
    def load(cls, path: str | os.PathLike) -> GeneVocab:
        """Read ``vocab.tsv`` (header ``gene_id<TAB>symbol``)."""
        try:
            df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        except (OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read gene vocabulary {path}: {e}") from e
        if "gene_id" not in df.columns:
            raise ValueError(f"gene vocabulary {path}: missing 'gene_id' column (found {list(df.columns)})")
        return cls(df["gene_id"].to_numpy(), df["symbol"].to_numpy() if "symbol" in df.columns else None)

    def save(self, path: str | os.PathLike) -> str:
        """Write ``vocab.tsv`` atomically; returns its SHA-256."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f, delimiter="\t", lineterminator="\n")
            w.writerow(("gene_id", "symbol"))
            w.writerows(zip(self.gene_ids.tolist(), self.symbols.tolist()))
        os.replace(tmp, path)
        return file_sha256(path)

    def map_var(self, var: pd.DataFrame, symbol_table: dict[str, str] | None = None,
                gene_ids: tuple | None = None) -> np.ndarray:
        """Vocabulary id of each row of ``var`` (int32, −1 = unmapped); see the module docstring.

        ``gene_ids``: ``var_gene_ids(var)`` when the caller already has it.
        """
        ids, _ = gene_ids if gene_ids is not None else var_gene_ids(var)
        if ids is None:
            syms, _ = var_symbols(var)
            out = pd.Series(syms).map(self._symbol_to_id).fillna(UNMAPPED).to_numpy(dtype=np.int64)
            if symbol_table:
                via = self._index.get_indexer(pd.Series(syms).map(symbol_table).fillna("").to_numpy())
                out = np.where(out >= 0, out, via)
            return out.astype(np.int32)
        return self._index.get_indexer(ids).astype(np.int32)

    def sha256(self) -> str:
        """Hash of the vocabulary content (IDs in order)."""
        return hashlib.sha256("\n".join(self.gene_ids).encode()).hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()

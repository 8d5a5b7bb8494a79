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


def pca_embedding(counts: ad.AnnData, seed: int = 0) -> np.ndarray:
    """``[n_cells, ≤ 30]`` float32 PCA embedding of the raw counts in ``counts.X`` (not modified)."""
    import scanpy as sc

    x = counts.X
    data = x.data if sp.issparse(x) else np.asarray(x)
    if data.size and (data.min() < 0 or not np.array_equal(data, np.round(data))):
        raise ValueError("the PCA baseline needs raw counts in X (found negative or non-integer values)")
    a = ad.AnnData(X=sp.csr_matrix(x, dtype=np.float32), obs=counts.obs[[]].copy(), var=counts.var[[]].copy())
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

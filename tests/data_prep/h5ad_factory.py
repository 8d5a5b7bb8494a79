"""Small synthetic h5ad files for data_prep tests (imported by the tests: pytest puts this dir on sys.path)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def synth_counts(rng, n_cells: int, n_genes: int, density: float = 0.2) -> sp.csr_matrix:
    """Random sparse integer counts (float32 storage, like most h5ad files), every cell non-empty."""
    m = sp.random(n_cells, n_genes, density=density, format="csr", random_state=rng, dtype=np.float32)
    m.data = np.ceil(m.data * 20).astype(np.float32)
    m[np.arange(n_cells), rng.integers(0, n_genes, n_cells)] = 1.0  # no empty rows
    return sp.csr_matrix(m)


def ensembl(i) -> str:
    return f"ENSG{int(i):011d}"


def write_h5ad(path, X, *, var_names=None, var=None, obs=None, raw=None, layers=None) -> str:
    n_cells, n_genes = X.shape
    var = var if var is not None else pd.DataFrame(index=var_names if var_names is not None
                                                   else [ensembl(i) for i in range(n_genes)])
    obs = obs if obs is not None else pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)])
    a = ad.AnnData(X=X, obs=obs, var=var, layers=layers)
    if raw is not None:
        a.raw = raw
    a.write_h5ad(path)
    return str(path)

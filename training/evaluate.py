"""scIB bio-conservation metrics of cell embeddings.

``python -m training.evaluate EMB.h5ad|EMB.zarr --obsm-key X_sigattn --label-key cell_type --out DIR`` writes ``DIR/metrics.json``, ``DIR/resolution_sweep.csv`` and
``DIR/umap.png``.

Metrics (scIB, Luecken et al. 2022), computed with the reference ``scib`` package (pure Python: scanpy +
scikit-learn; ``scib-metrics`` would pull JAX), on a k-NN graph (``scanpy.pp.neighbors``) of the embedding:

- ``nmi``: max over a Leiden resolution sweep r ∈ {0.1, 0.2, …, 2.0} (``scib.metrics.cluster_optimal_resolution``,
  Leiden with ``flavor="igraph"``) of NMI(clusters_r, labels) = 2·I(C; L) / (H(C) + H(L)) (arithmetic mean).
- ``ari``: adjusted Rand index of the clustering at that NMI-optimal resolution,
  ARI = (RI − E[RI]) / (max RI − E[RI]).
- ``asw_label``: cell-type silhouette on the embedding, rescaled to [0, 1] as scIB does:
  (mean_i s(i) + 1) / 2 with s(i) = (b_i − a_i) / max(a_i, b_i) (Euclidean). 0.5 = no structure.
- ``bio_conservation`` = mean(nmi, ari, asw_label).

Cells whose label is missing are dropped (their number is reported as ``n_cells_unlabelled``).

With ``--checkpoint`` and ``--corpus``: the masked-gene validation loss of the checkpoint on the corpus's ``val``
split, per dataset and overall — the training objective (cross-entropy of the expression bin of masked genes, mask
ratio ``run.mask_ratio``) averaged over masked genes: L_d = Σ_{masked t in dataset d} CE_t / #masked_d. Masks are
drawn from a generator seeded by (seed, batch index), so the number is reproducible.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

#: Leiden resolutions of the sweep: 0.1, 0.2, ..., 2.0 (scIB's ``get_resolutions(n=20, max=2)``).
RESOLUTIONS = tuple(round(0.1 * i, 1) for i in range(1, 21))
METRIC_KEYS = ("nmi", "ari", "asw_label", "bio_conservation")


def read_cells(path: str | os.PathLike) -> ad.AnnData:
    """Read an AnnData from ``.h5ad`` or ``.zarr`` (a clear error for anything else or a missing file)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"embedding file not found: {path}")
    if path.suffix == ".h5ad":
        return ad.read_h5ad(path)
    if path.suffix == ".zarr" or (path / "zarr.json").exists() or (path / ".zgroup").exists():
        return ad.read_zarr(path)
    raise ValueError(f"{path}: expected an .h5ad file or a .zarr store")


def _checked(adata: ad.AnnData, obsm_key: str, label_key: str) -> tuple[ad.AnnData, int]:
    """A minimal AnnData (embedding + string labels) of the labelled cells; validates the inputs."""
    if obsm_key not in adata.obsm:
        raise KeyError(f"obsm key {obsm_key!r} not found; available: {sorted(adata.obsm.keys())}")
    if label_key not in adata.obs:
        raise KeyError(f"label key {label_key!r} not found in obs; available: {list(adata.obs.columns)}")
    emb = np.asarray(adata.obsm[obsm_key], dtype=np.float32)
    if emb.ndim != 2 or emb.shape[1] < 1:
        raise ValueError(f"obsm[{obsm_key!r}] must be a 2-D [cells, dims] array, got shape {emb.shape}")
    if not np.isfinite(emb).all():
        bad = int((~np.isfinite(emb)).any(axis=1).sum())
        raise ValueError(f"obsm[{obsm_key!r}] has non-finite values in {bad} cells")
    labels = adata.obs[label_key]
    keep = labels.notna().to_numpy()
    n_missing = int((~keep).sum())
    cells = ad.AnnData(
        obs=pd.DataFrame({"label": labels[keep].astype(str).astype("category").to_numpy()},
                         index=adata.obs_names[keep]),
        obsm={"X_emb": emb[keep]},
    )
    if cells.n_obs < 10:
        raise ValueError(f"only {cells.n_obs} labelled cells: too few to evaluate")
    if cells.obs["label"].nunique() < 2:
        raise ValueError(f"label {label_key!r} has fewer than 2 distinct values: metrics are undefined")
    return cells, n_missing


def bio_conservation(
    adata: ad.AnnData,
    obsm_key: str,
    label_key: str,
    *,
    resolutions: tuple[float, ...] = RESOLUTIONS,
    n_neighbors: int = 15,
    seed: int = 0,
) -> tuple[dict, pd.DataFrame, ad.AnnData]:
    """scIB bio-conservation of ``adata.obsm[obsm_key]`` against ``adata.obs[label_key]``.

    Returns ``(metrics, sweep, cells)``: the metric dict (see module docstring), the NMI per Leiden resolution,
    and the evaluated cells (k-NN graph, optimal ``leiden`` clusters) for plotting.
    """
    import scanpy as sc
    import scib

    cells, n_missing = _checked(adata, obsm_key, label_key)
    sc.pp.neighbors(cells, use_rep="X_emb", n_neighbors=min(n_neighbors, cells.n_obs - 1), random_state=seed)
    with contextlib.redirect_stdout(io.StringIO()):  # scib prints one line per resolution
        res_best, _, sweep = scib.metrics.cluster_optimal_resolution(
            cells, label_key="label", cluster_key="leiden", resolutions=list(resolutions),
            verbose=False, return_all=True, force=True,
            flavor="igraph", n_iterations=2, directed=False, random_state=seed,
        )
    if cells.obs["leiden"].isna().all():  # every resolution scored NMI = 0: scib keeps no clustering
        cells.obs["leiden"] = cells.obs[f"leiden_{res_best}"]
    ari = scib.metrics.ari(cells, cluster_key="leiden", label_key="label", implementation="sklearn")
    asw = scib.metrics.silhouette(cells, label_key="label", embed="X_emb", scale=True)
    nmi = scib.metrics.nmi(cells, cluster_key="leiden", label_key="label")
    metrics = {
        "nmi": float(nmi),
        "ari": float(ari),
        "asw_label": float(asw),
        "bio_conservation": float(np.mean([nmi, ari, asw])),
        "leiden_resolution": float(res_best),
        "n_clusters": int(cells.obs["leiden"].nunique()),
        "n_cells": int(cells.n_obs),
        "n_cells_unlabelled": n_missing,
        "n_labels": int(cells.obs["label"].nunique()),
        "embedding_dim": int(cells.obsm["X_emb"].shape[1]),
    }
    return metrics, sweep.rename(columns={"score": "nmi"}), cells


def _select_cells(batch: dict, masked, cells):
    """Sub-batch of the packed ``batch`` (and its mask) holding only ``cells`` (a 1-D index tensor)."""
    import torch

    cu = batch["cu_seqlens"].long()
    tok = torch.cat([torch.arange(cu[i], cu[i + 1]) for i in cells.tolist()])
    lengths = (cu[1:] - cu[:-1])[cells]
    sub = {"input_ids": batch["input_ids"][tok], "values": batch["values"][tok],
           "cu_seqlens": torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32),
           "max_seqlen": int(lengths.max())}
    return sub, masked[tok]


def masked_validation_loss(checkpoint, corpus, *, split: str = "val", batch_size: int = 32, seed: int = 0,
                           progress: bool = True) -> dict:
    """Masked-gene loss of ``checkpoint`` on the corpus split, per dataset (see module docstring)."""
    import torch
    from tqdm.auto import tqdm

    from data_prep.loader import build_loader
    from training.checkpoint import load_for_inference
    from training.masking import choose_masked, mask_generator

    corpus = Path(corpus)
    manifest = corpus / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"no corpus manifest at {manifest} (is --corpus a data_prep build output?)")
    names = json.loads(manifest.read_text()).get("labels", {}).get("dataset", [])
    model, cfg, tokenizer = load_for_inference(checkpoint)
    loader = build_loader(str(corpus), split, tokenizer=tokenizer, batch_size=batch_size, shuffle=False)
    loss_sum: dict[int, float] = {}
    n_masked: dict[int, int] = {}
    n_cells: dict[int, int] = {}
    with torch.no_grad():
        for i, batch in enumerate(tqdm(loader, desc=f"{split} loss", unit="batch", disable=not progress)):
            masked = choose_masked(batch["cu_seqlens"], cfg.run.mask_ratio, mask_generator(seed, i))
            for d in batch["dataset"].unique().tolist():
                sub, sub_mask = _select_cells(batch, masked, torch.nonzero(batch["dataset"] == d).flatten())
                if not sub_mask.any():
                    continue
                loss, n = model(sub, sub_mask)
                loss_sum[d] = loss_sum.get(d, 0.0) + float(loss) * int(n)
                n_masked[d] = n_masked.get(d, 0) + int(n)
                n_cells[d] = n_cells.get(d, 0) + int((batch["dataset"] == d).sum())
    if not n_masked:
        raise ValueError(f"the {split!r} split of {corpus} has no cells with masked genes")

    def name(d: int) -> str:
        return names[d] if 0 <= d < len(names) else str(d)

    return {
        "val_loss": sum(loss_sum.values()) / sum(n_masked.values()),
        "val_loss_per_dataset": {name(d): loss_sum[d] / n_masked[d] for d in sorted(n_masked)},
        "val_cells": {name(d): n_cells[d] for d in sorted(n_cells)},
        "val_masked_genes": sum(n_masked.values()),
    }


def plot_umap(cells: ad.AnnData, path: str | os.PathLike, *, title: str = "", seed: int = 0) -> Path:
    """UMAP of the evaluated cells (needs their k-NN graph), coloured by label; written as a PNG.

    Also stores the coordinates in ``cells.obsm["X_umap"]`` so reports can redraw them side by side.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    if "X_umap" not in cells.obsm:
        sc.tl.umap(cells, random_state=seed)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    sc.pl.umap(cells, color="label", ax=ax, show=False, title=title or "UMAP by cell type", frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def evaluate(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    obsm_key: str = "X_sigattn",
    label_key: str = "cell_type",
    checkpoint: str | os.PathLike | None = None,
    corpus: str | os.PathLike | None = None,
    title: str = "",
    seed: int = 0,
    umap: bool = True,
    progress: bool = True,
) -> dict:
    """Evaluate the embedding in ``path``; write ``metrics.json`` (+ sweep CSV, UMAP PNG, UMAP coords) to ``out``."""
    if (checkpoint is None) != (corpus is None):
        raise ValueError("the validation loss needs both --checkpoint and --corpus")
    out = Path(out)
    adata = read_cells(path)
    out.mkdir(parents=True, exist_ok=True)
    metrics, sweep, cells = bio_conservation(adata, obsm_key, label_key, seed=seed)
    metrics.update(embeddings=str(path), obsm_key=obsm_key, label_key=label_key)
    sweep.to_csv(out / "resolution_sweep.csv", index=False)
    if umap:
        plot_umap(cells, out / "umap.png", title=title or f"{Path(path).name}: {obsm_key}", seed=seed)
        pd.DataFrame(cells.obsm["X_umap"], index=cells.obs_names, columns=["umap1", "umap2"]).assign(
            label=cells.obs["label"].to_numpy()
        ).to_csv(out / "umap.csv")
    if checkpoint is not None:
        metrics.update(masked_validation_loss(checkpoint, corpus, seed=seed, progress=progress))
        metrics["checkpoint"] = str(checkpoint)
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    tmp.replace(out / "metrics.json")
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("embeddings", help="AnnData (.h5ad or .zarr) with the cell embedding in obsm")
    p.add_argument("--obsm-key", default="X_sigattn", help="obsm key of the embedding (default: X_sigattn)")
    p.add_argument("--label-key", default="cell_type", help="obs column with cell-type labels (default: cell_type)")
    p.add_argument("--checkpoint", help="checkpoint (run dir or tag dir) for the masked-gene validation loss")
    p.add_argument("--corpus", help="data_prep output directory holding mds/val, for the validation loss")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--title", default="", help="title of the UMAP plot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-umap", action="store_true", help="skip the UMAP plot")
    a = p.parse_args(argv)
    try:
        metrics = evaluate(a.embeddings, a.out, obsm_key=a.obsm_key, label_key=a.label_key,
                           checkpoint=a.checkpoint, corpus=a.corpus, title=a.title, seed=a.seed,
                           umap=not a.no_umap)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    for k in METRIC_KEYS:
        print(f"{k:>18s}: {metrics[k]:.4f}")
    if "val_loss" in metrics:
        print(f"{'val_loss':>18s}: {metrics['val_loss']:.4f}  " + ", ".join(
            f"{k} {v:.4f}" for k, v in metrics["val_loss_per_dataset"].items()))
    print(f"wrote {Path(a.out) / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

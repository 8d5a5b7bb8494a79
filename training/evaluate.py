"""scIB metrics of cell embeddings: bio-conservation, and batch correction with ``--batch-key``.

``python -m training.evaluate EMB.h5ad|EMB.zarr --obsm-key X_sigattn --label-key cell_type [--batch-key donor]
[--pca-baseline CELLS.h5ad] [--checkpoint RUN --corpus DIR [--device auto]] --out DIR`` writes
``DIR/metrics.json``, ``DIR/resolution_sweep.csv`` and ``DIR/umap.png``.

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

With ``--batch-key`` (donor, sample, condition, technology …): scIB batch-correction metrics on the same k-NN
graph, each in [0, 1], 1 = batches well mixed within cell types:

- ``asw_batch``: for each label j, 1 − |s_batch(i)| averaged over its cells, then over labels
  (``scib.metrics.silhouette_batch``; labels present in one batch only are skipped).
- ``graph_connectivity``: mean over labels of |largest connected component of the label's k-NN subgraph| / |label|.
- ``ilisi``: graph iLISI (``scib.metrics.ilisi_graph``, k0 = 90 on shortest-path distances of the k-NN graph):
  (median LISI − 1) / (n_batches − 1). Only where scib's shipped ``knn_graph`` binary runs: it needs glibc ≥ 2.38,
  so not on Debian 12 (then ``not_computed["ilisi"]`` gives the reason; building it would mean compiling).
- ``batch_correction`` = mean of the batch metrics computed (``batch_correction_of``); ``overall`` =
  0.6·bio_conservation + 0.4·batch_correction (the scIB weighting). kBET needs R (rpy2 + the kBET R package) and
  PCR comparison the unintegrated data: neither is computed (``not_computed`` says so). Cells without a batch are
  dropped (``n_cells_no_batch``).

With ``--pca-baseline CELLS.h5ad`` (the raw-count file that was embedded): the same metrics for a PCA embedding of
the same cells (log-normalised counts, 2,000 HVGs, 30 PCs; ``training.baseline``), in ``metrics["pca_baseline"]``.

With ``--checkpoint`` and ``--corpus``: the masked-gene validation loss of the checkpoint on the corpus's ``val``
split, per dataset and overall — the training objective (cross-entropy of the expression bin of masked genes, mask
ratio ``run.mask_ratio``) averaged over masked genes: L_d = Σ_{masked t in dataset d} CE_t / #masked_d. Masks are
drawn from a generator seeded by (seed, batch index), so the number is reproducible. It runs on ``--device``
(``auto``: the GPU when there is one) in the run's precision there (``run.precision``; ``auto`` = bf16 on a GPU),
always fp32 on the CPU; sums stay on the device until the end.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

#: Leiden resolutions of the sweep: 0.1, 0.2, ..., 2.0 (scIB's ``get_resolutions(n=20, max=2)``).
RESOLUTIONS = tuple(round(0.1 * i, 1) for i in range(1, 21))
METRIC_KEYS = ("nmi", "ari", "asw_label", "bio_conservation")
BATCH_KEYS = ("asw_batch", "graph_connectivity", "ilisi", "batch_correction", "overall")
NOT_COMPUTED = {"kbet": "needs R with the kBET package (rpy2)",
                "pcr_comparison": "needs the unintegrated data next to the embedding"}


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


def _checked(adata: ad.AnnData, obsm_key: str, label_key: str,
             batch_key: str | None = None) -> tuple[ad.AnnData, dict]:
    """A minimal AnnData (embedding, string ``label`` and ``batch``) of the cells that have both; validates."""
    if obsm_key not in adata.obsm:
        raise KeyError(f"obsm key {obsm_key!r} not found; available: {sorted(adata.obsm.keys())}")
    for what, key in (("label", label_key), ("batch", batch_key)):
        if key is not None and key not in adata.obs:
            raise KeyError(f"{what} key {key!r} not found in obs; available: {list(adata.obs.columns)} "
                           f"(pass --{what}-key)")
    emb = np.asarray(adata.obsm[obsm_key], dtype=np.float32)
    if emb.ndim != 2 or emb.shape[1] < 1:
        raise ValueError(f"obsm[{obsm_key!r}] must be a 2-D [cells, dims] array, got shape {emb.shape}")
    if not np.isfinite(emb).all():
        bad = int((~np.isfinite(emb)).any(axis=1).sum())
        raise ValueError(f"obsm[{obsm_key!r}] has non-finite values in {bad} cells")
    labels = adata.obs[label_key]
    has_label = labels.notna().to_numpy()
    has_batch = adata.obs[batch_key].notna().to_numpy() if batch_key else np.ones(adata.n_obs, bool)
    keep = has_label & has_batch
    obs = {"label": pd.Categorical(labels[keep].astype(str).to_numpy())}
    if batch_key:
        obs["batch"] = pd.Categorical(adata.obs[batch_key][keep].astype(str).to_numpy())
    cells = ad.AnnData(obs=pd.DataFrame(obs, index=adata.obs_names[keep]), obsm={"X_emb": emb[keep]})
    if cells.n_obs < 10:
        raise ValueError(f"only {cells.n_obs} labelled cells: too few to evaluate")
    if cells.obs["label"].nunique() < 2:
        raise ValueError(f"label {label_key!r} has fewer than 2 distinct values: metrics are undefined")
    if batch_key and cells.obs["batch"].nunique() < 2:
        raise ValueError(f"batch {batch_key!r} has fewer than 2 distinct values: batch mixing is undefined")
    dropped = {"n_cells_unlabelled": int((~has_label).sum())}
    if batch_key:
        dropped["n_cells_no_batch"] = int((has_label & ~has_batch).sum())
    return cells, dropped


def bio_conservation(
    adata: ad.AnnData,
    obsm_key: str,
    label_key: str,
    *,
    batch_key: str | None = None,
    resolutions: tuple[float, ...] = RESOLUTIONS,
    n_neighbors: int = 15,
    seed: int = 0,
) -> tuple[dict, pd.DataFrame, ad.AnnData]:
    """scIB bio-conservation of ``adata.obsm[obsm_key]`` against ``adata.obs[label_key]`` (and, with
    ``batch_key``, batch correction against ``adata.obs[batch_key]``: :func:`batch_correction`).

    Returns ``(metrics, sweep, cells)``: the metric dict (see module docstring), the NMI per Leiden resolution,
    and the evaluated cells (k-NN graph, optimal ``leiden`` clusters) for plotting.
    """
    import scanpy as sc
    import scib

    cells, dropped = _checked(adata, obsm_key, label_key, batch_key)
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
        **dropped,
        "n_labels": int(cells.obs["label"].nunique()),
        "embedding_dim": int(cells.obsm["X_emb"].shape[1]),
    }
    if batch_key:
        metrics.update(batch_correction(cells), batch_key=batch_key)
        metrics["overall"] = 0.6 * metrics["bio_conservation"] + 0.4 * metrics["batch_correction"]
    return metrics, sweep.rename(columns={"score": "nmi"}), cells


def batch_correction(cells: ad.AnnData) -> dict:
    """scIB batch-correction metrics of evaluated ``cells`` (``obsm["X_emb"]``, obs ``label`` and ``batch``, and
    their k-NN graph); see the module docstring."""
    import scib

    with contextlib.redirect_stdout(io.StringIO()):  # scib prints per label
        asw = scib.metrics.silhouette_batch(cells, batch_key="batch", label_key="label", embed="X_emb",
                                            scale=True, verbose=False)
    with warnings.catch_warnings():  # scib 1.1.7 calls pd.value_counts, deprecated in pandas 2.1: its warning, here only
        warnings.filterwarnings("ignore", "pandas.value_counts is deprecated", FutureWarning)
        conn = scib.metrics.graph_connectivity(cells, "label")
    scores = {"asw_batch": float(asw), "graph_connectivity": float(conn)}
    not_computed = dict(NOT_COMPUTED)
    if (problem := _scib_knn_graph_problem()) is None:
        graph = ad.AnnData(obs=cells.obs[["batch"]].copy(), uns={"neighbors": cells.uns["neighbors"]},
                           obsp={"connectivities": cells.obsp["connectivities"].copy()})  # scib rewrites both
        scores["ilisi"] = float(scib.metrics.ilisi_graph(graph, batch_key="batch", type_="knn", scale=True))
    else:
        not_computed["ilisi"] = problem
    return {**scores, "batch_correction": float(np.mean(list(scores.values()))),
            "batch_correction_of": sorted(scores), "n_batches": int(cells.obs["batch"].nunique()),
            "not_computed": not_computed}


@functools.cache
def _scib_knn_graph_problem() -> str | None:
    """Why scib's shipped ``knn_graph`` helper (graph iLISI's shortest-path search) cannot run here, or None.

    scib 1.1.7's wheel carries a prebuilt binary linked against glibc ≥ 2.38 (Debian 12 has 2.36); scib would
    run it, ignore the failure and crash reading its missing output.
    """
    import scib

    exe = Path(scib.__file__).parent / "knn_graph" / "knn_graph.o"
    try:
        proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    except OSError as e:
        return f"scib's knn_graph helper cannot run here ({e})"
    err = proc.stderr.strip().splitlines()
    if proc.returncode == 127 or any("required by" in line or "error while loading" in line for line in err):
        return f"scib's prebuilt knn_graph helper cannot run here: {err[0] if err else 'exit 127'}"
    return None


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
                           device: str = "auto", progress: bool = True) -> dict:
    """Masked-gene loss of ``checkpoint`` on the corpus split, per dataset (see module docstring).

    On ``device`` (``auto``: CUDA when available) in the run's precision there (fp32 on the CPU); the masks are
    drawn on the host, so the number does not depend on the device beyond its arithmetic.
    """
    import torch
    from tqdm.auto import tqdm

    from data_prep.loader import build_loader
    from training.checkpoint import load_for_inference
    from training.deepspeed_config import resolve_precision
    from training.embed import resolve_device
    from training.masking import choose_masked, mask_generator

    corpus = Path(corpus)
    manifest = corpus / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"no corpus manifest at {manifest} (is --corpus a data_prep build output?)")
    names = json.loads(manifest.read_text()).get("labels", {}).get("dataset", [])
    dev = resolve_device(device)
    model, cfg, tokenizer = load_for_inference(checkpoint, device=dev)
    precision = resolve_precision(cfg, cuda=dev.type == "cuda") if dev.type == "cuda" else "fp32"
    if precision == "bf16":  # as DeepSpeed's bf16 mode trains it: bf16 weights, fp32 cross-entropy (model.forward)
        model = model.to(torch.bfloat16)
    loader = build_loader(str(corpus), split, tokenizer=tokenizer, batch_size=batch_size, shuffle=False)
    n_ds = max(len(names), 1)
    loss_sum = torch.zeros(n_ds, dtype=torch.float64, device=dev)   # Σ CE over masked genes, per dataset
    n_masked = torch.zeros(n_ds, dtype=torch.int64, device=dev)
    n_cells = np.zeros(n_ds, dtype=np.int64)
    with torch.no_grad():
        for i, batch in enumerate(tqdm(loader, desc=f"{split} loss", unit="batch", disable=not progress)):
            masked = choose_masked(batch["cu_seqlens"], cfg.run.mask_ratio, mask_generator(seed, i))
            ds = batch["dataset"]  # host tensors: choosing sub-batches reads nothing from the device
            if int(ds.max()) >= n_ds:
                raise ValueError(f"{corpus}: a cell names dataset {int(ds.max())}, the manifest lists {n_ds}")
            for d in ds.unique().tolist():
                sub, sub_mask = _select_cells(batch, masked, torch.nonzero(ds == d).flatten())
                n_cells[d] += int((ds == d).sum())
                if not sub_mask.any():
                    continue
                sub = {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in sub.items()}
                loss, n = model(sub, sub_mask.to(dev, non_blocking=True))
                loss_sum[d] += loss.double() * n
                n_masked[d] += n
    loss_sum, n_masked = loss_sum.cpu().numpy(), n_masked.cpu().numpy()   # the one read back
    seen = np.flatnonzero(n_masked)
    if not len(seen):
        raise ValueError(f"the {split!r} split of {corpus} has no cells with masked genes")

    def name(d: int) -> str:
        return names[d] if 0 <= d < len(names) else str(d)

    return {
        "val_loss": float(loss_sum.sum() / n_masked.sum()),
        "val_loss_per_dataset": {name(d): float(loss_sum[d] / n_masked[d]) for d in seen},
        "val_cells": {name(d): int(n_cells[d]) for d in np.flatnonzero(n_cells)},
        "val_masked_genes": int(n_masked.sum()),
        "val_device": str(dev),
        "val_precision": precision,
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
    with warnings.catch_warnings():
        # scanpy 1.11.5 (the last release for Python 3.11) calls Colormap.set_bad in every embedding plot, which
        # matplotlib 3.11 marks pending-deprecated; nothing we pass avoids it (scanpy ≥ 1.12 needs Python 3.12).
        warnings.filterwarnings("ignore", "The set_bad function", PendingDeprecationWarning)
        sc.pl.umap(cells, color="label", ax=ax, show=False, title=title or "UMAP by cell type", frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _pca_cells(counts_path: str | os.PathLike, adata: ad.AnnData, seed: int) -> ad.AnnData:
    """PCA embedding (``obsm["X_pca"]``) of the cells of ``adata``, computed from the raw counts in ``counts_path``."""
    from training.baseline import pca_embedding

    counts = read_cells(counts_path)
    missing = adata.obs_names.difference(counts.obs_names)
    if len(missing):
        raise ValueError(f"--pca-baseline {counts_path}: {len(missing)} of the embedded cells are not in it "
                         f"(e.g. {missing[0]!r}); give the file that was embedded")
    counts = counts[adata.obs_names] if not counts.obs_names.equals(adata.obs_names) else counts
    return ad.AnnData(obs=adata.obs, obsm={"X_pca": pca_embedding(counts, seed)})


def evaluate(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    obsm_key: str = "X_sigattn",
    label_key: str = "cell_type",
    batch_key: str | None = None,
    pca_baseline: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    corpus: str | os.PathLike | None = None,
    device: str = "auto",
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
    metrics, sweep, cells = bio_conservation(adata, obsm_key, label_key, batch_key=batch_key, seed=seed)
    metrics.update(embeddings=str(path), obsm_key=obsm_key, label_key=label_key)
    if pca_baseline is not None:
        base, _, _ = bio_conservation(_pca_cells(pca_baseline, adata, seed), "X_pca", label_key,
                                      batch_key=batch_key, seed=seed)
        metrics["pca_baseline"] = {**base, "counts": str(pca_baseline)}
    out.mkdir(parents=True, exist_ok=True)
    sweep.to_csv(out / "resolution_sweep.csv", index=False)
    if umap:
        plot_umap(cells, out / "umap.png", title=title or f"{Path(path).name}: {obsm_key}", seed=seed)
        pd.DataFrame(cells.obsm["X_umap"], index=cells.obs_names, columns=["umap1", "umap2"]).assign(
            label=cells.obs["label"].to_numpy()
        ).to_csv(out / "umap.csv")
    if checkpoint is not None:
        metrics.update(masked_validation_loss(checkpoint, corpus, seed=seed, device=device, progress=progress))
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
    p.add_argument("--batch-key", help="obs column with batches (donor, sample, technology...): adds scIB "
                   "batch-correction metrics and the overall score")
    p.add_argument("--pca-baseline", metavar="CELLS.h5ad",
                   help="raw-count file of the embedded cells: evaluate a PCA embedding of them alongside")
    p.add_argument("--checkpoint", help="checkpoint (run dir or tag dir) for the masked-gene validation loss")
    p.add_argument("--corpus", help="data_prep output directory holding mds/val, for the validation loss")
    p.add_argument("--device", default="auto",
                   help="device of the validation loss: auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--title", default="", help="title of the UMAP plot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-umap", action="store_true", help="skip the UMAP plot")
    a = p.parse_args(argv)
    try:
        metrics = evaluate(a.embeddings, a.out, obsm_key=a.obsm_key, label_key=a.label_key, batch_key=a.batch_key,
                           pca_baseline=a.pca_baseline, checkpoint=a.checkpoint, corpus=a.corpus, device=a.device,
                           title=a.title, seed=a.seed, umap=not a.no_umap)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    keys = [k for k in (*METRIC_KEYS, *BATCH_KEYS) if k in metrics]
    base = metrics.get("pca_baseline")
    print(f"{'':>18s}  {'embedding':>9s}" + (f"  {'PCA':>9s}" if base else ""))
    for k in keys:
        print(f"{k:>18s}: {metrics[k]:9.4f}" + (f"  {base[k]:9.4f}" if base else ""))
    if "val_loss" in metrics:
        print(f"{'val_loss':>18s}: {metrics['val_loss']:9.4f}  ({metrics['val_device']}, {metrics['val_precision']}) "
              + ", ".join(f"{k} {v:.4f}" for k, v in metrics["val_loss_per_dataset"].items()))
    print(f"wrote {Path(a.out) / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

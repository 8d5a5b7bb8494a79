"""Synthetic CellxGene-schema h5ad files at census scale, written chunk by chunk (bounded memory).

    python -m data_prep.synth_census OUT_DIR --cells 1000000 --datasets 8 [--genes 60000] [--seed 0]

writes ``OUT_DIR/synth-NN.h5ad``, one file per dataset (cells split evenly). Each file is an AnnData
(current h5ad encoding) the way CellxGene ships source files and the census stores them:

- ``X``: raw integer counts, CSR, ``float32`` data / ``int32`` indices, sorted indices per row,
  appended in row chunks through ``anndata.io.sparse_dataset(...).append`` (never the whole matrix in
  memory: one chunk of ``chunk_cells`` cells, ≈ 10 bytes per non-zero).
- ``var``: index = Ensembl gene IDs (``feature_id``, ``ENSG`` + 11 digits), ``feature_name``,
  ``feature_reference``, ``feature_biotype``, ``feature_length``, ``feature_type``.
- ``obs``: the census columns (:data:`OBS_COLUMNS`): ``dataset_id``, ``assay``(``_ontology_term_id``),
  ``cell_type``(…), ``development_stage``(…), ``disease``(…), ``donor_id``, ``is_primary_data``,
  ``observation_joinid``, ``self_reported_ethnicity``(…), ``sex``(…), ``suspension_type``, ``tissue``(…),
  ``tissue_type``, ``tissue_general``(…), and the per-cell summaries ``raw_sum``, ``nnz``,
  ``raw_mean_nnz``, ``raw_variance_nnz``, ``n_measured_vars``.

**Cell length** (expressed genes per cell). Each dataset has one assay (cycling through
:data:`ASSAYS`); a cell draws a target ``L ~ LogNormal(log m_assay, σ_assay)`` clipped to ``[min_len,
max_len]`` (default 100 … 10,000). The per-assay medians m are the usual genes-per-cell of those
protocols (10x 3' v2 ≈ 1.3K, 10x 5' ≈ 1.7K, multiome nuclei ≈ 2K, 10x 3' v3 ≈ 2.3K, Smart-seq2 ≈
4.5K), chosen so that the corpus has the issue's figures (census: median ≈ 2K expressed genes a
cell, tail to ≈ 10K); they are *not* fitted to census data (no census access here). The realised
length is ``L`` in expectation (see next point); :func:`length_summary` reports it from ``obs['nnz']``.

**Which genes.** Gene ``g`` has a popularity ``π_g`` (Zipf: ``(rank + 10)^-1.1`` over a random
rank). Per cell type, the weights ``w_g`` are ``π_g`` with the type's own 300 marker genes ×20, capped
at ``W_CAP = 1e-3`` (renormalised): the cap keeps a housekeeping gene's detection ``k·w_g`` below 1 in
shallow cells and spares generating points that land on an already expressed gene. The weights
tile ``[0, 1)`` in gene-index order; a cell of ``k`` points takes the stratified points
``u_j = (j + U_j) / k``, ``U_j ~ U(0, 1)``, ``j = 0 … k−1``, and expresses the genes they land in,
so ``P(g expressed) = min(1, k·w_g)`` and ``E[length] = Σ_g min(1, k·w_g)``; ``k`` is chosen per
cell by inverting that (:meth:`GeneModel.points_for`). Points are sorted by construction, so a row's
indices come out sorted with no sort; two points in one gene count once. A lookup table of 2^20
bins per cell type maps ``u`` to genes; rows are ordered by donor, then cell type, so one table
at a time stays in cache.

**Counts** of an expressed gene: ``Geometric(p_g)`` on 1, 2, …, mean ``1/p_g = 1 + μ_g`` with
``μ_g = min(300, 0.1·G·π_g)`` (drawn as ``1 + ⌊log U / log(1 − p_g)⌋``): about two thirds of the
non-zeros are 1 (like UMI data), the most popular genes average ~100, a few cells need 16-bit counts.

**Labels.** Per dataset: ``dataset_id`` (UUID from the seed), one tissue, 3–16 donors (each with a
sex), 6–14 cell types with Dirichlet proportions; a ``--not-primary`` share of cells has
``is_primary_data = False`` (the build drops them). Deterministic in ``(seed, dataset index)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import uuid

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

# (assay, EFO term, median expressed genes per cell, log-space σ, suspension_type)
ASSAYS = (
    ("10x 3' v3", "EFO:0009922", 2300, 0.45, "cell"),
    ("10x 3' v2", "EFO:0009899", 1300, 0.45, "cell"),
    ("10x 5' v2", "EFO:0009900", 1700, 0.45, "cell"),
    ("10x multiome", "EFO:0030059", 2000, 0.5, "nucleus"),
    ("Smart-seq2", "EFO:0008931", 4500, 0.35, "cell"),
)
CELL_TYPES = (
    ("T cell", "CL:0000084"), ("B cell", "CL:0000236"), ("natural killer cell", "CL:0000623"),
    ("monocyte", "CL:0000576"), ("macrophage", "CL:0000235"), ("fibroblast", "CL:0000057"),
    ("endothelial cell", "CL:0000115"), ("epithelial cell", "CL:0000066"), ("neuron", "CL:0000540"),
    ("astrocyte", "CL:0000127"), ("oligodendrocyte", "CL:0000128"), ("hepatocyte", "CL:0000182"),
    ("cardiac muscle cell", "CL:0000746"), ("keratinocyte", "CL:0000312"), ("mast cell", "CL:0000097"),
    ("plasma cell", "CL:0000786"), ("platelet", "CL:0000233"), ("erythrocyte", "CL:0000232"),
    ("smooth muscle cell", "CL:0000192"), ("pericyte", "CL:0000669"),
)
TISSUES = (("blood", "UBERON:0000178"), ("lung", "UBERON:0002048"), ("brain", "UBERON:0000955"),
           ("liver", "UBERON:0002107"), ("heart", "UBERON:0000948"), ("kidney", "UBERON:0002113"),
           ("skin of body", "UBERON:0002097"), ("colon", "UBERON:0001155"))
DISEASES = (("normal", "PATO:0000461"), ("COVID-19", "MONDO:0100096"))
SEXES = (("female", "PATO:0000383"), ("male", "PATO:0000384"))
ETHNICITIES = (("European", "HANCESTRO:0005"), ("unknown", "unknown"))
DEV_STAGE = ("unknown", "unknown")
OBS_COLUMNS = (
    "dataset_id", "assay", "assay_ontology_term_id", "cell_type", "cell_type_ontology_term_id",
    "development_stage", "development_stage_ontology_term_id", "disease", "disease_ontology_term_id",
    "donor_id", "is_primary_data", "observation_joinid", "self_reported_ethnicity",
    "self_reported_ethnicity_ontology_term_id", "sex", "sex_ontology_term_id", "suspension_type", "tissue",
    "tissue_ontology_term_id", "tissue_type", "tissue_general", "tissue_general_ontology_term_id",
    "raw_sum", "nnz", "raw_mean_nnz", "raw_variance_nnz", "n_measured_vars",
)
LUT_BITS = 20
N_MARKERS = 300
MARKER_BOOST = 20.0
W_CAP = 1e-3


@dataclasses.dataclass
class SynthOptions:
    n_genes: int = 60_000
    min_len: int = 100
    max_len: int = 10_000
    not_primary: float = 0.02
    chunk_cells: int = 4096
    seed: int = 0


def gene_ids(n_genes: int) -> list[str]:
    """Ensembl-style gene IDs ``ENSG00000000001 …`` (unversioned, 11 digits)."""
    return [f"ENSG{i + 1:011d}" for i in range(n_genes)]


class GeneModel:
    """Gene popularity weights, per-cell-type lookup tables ``u → gene`` and per-gene count means."""

    def __init__(self, n_genes: int, seed: int):
        if n_genes < N_MARKERS or n_genes > 1 << 16:
            raise ValueError(f"n_genes must lie in [{N_MARKERS}, 65536], got {n_genes}")
        rng = np.random.default_rng([seed, 0xC0FFEE])
        self.n_genes = n_genes
        base = (rng.permutation(n_genes) + 10.0) ** -1.1
        self.weights = np.empty((len(CELL_TYPES), n_genes))
        for t in range(len(CELL_TYPES)):
            w = base.copy()
            w[rng.choice(n_genes, N_MARKERS, replace=False)] *= MARKER_BOOST
            for _ in range(3):  # cap (and renormalise): points beyond a gene's first are wasted work
                w = np.minimum(w / w.sum(), W_CAP)
            self.weights[t] = w / w.sum()
        popularity = base / base.sum()
        m = 1 << LUT_BITS
        centres = (np.arange(m) + 0.5) / m
        self.lut = np.stack([np.minimum(np.searchsorted(np.cumsum(w), centres, side="right"), n_genes - 1)
                             for w in self.weights]).astype(np.uint16).ravel()
        mu = np.minimum(300.0, 0.1 * n_genes * popularity)
        self.inv_log_q = (1.0 / np.log(mu / (1.0 + mu))).astype(np.float32)  # 1 / log(1 − p), p = 1/(1+μ)
        # expected distinct genes of k stratified points: Σ_g min(1, k·w_g), on a grid of k, per cell type
        self.k_grid = np.unique(np.geomspace(1, 8 * n_genes, 256).astype(np.int64)).astype(np.float64)
        self.distinct = np.stack([self._expected_distinct(w, self.k_grid) for w in self.weights])

    @staticmethod
    def _expected_distinct(w: np.ndarray, k: np.ndarray) -> np.ndarray:
        """``Σ_g min(1, k·w_g)`` for each k: genes with w ≥ 1/k always, the rest with probability k·w."""
        ws = np.sort(w)  # ascending
        tail = np.concatenate([[0.0], np.cumsum(ws)])  # tail[i] = sum of the i smallest weights
        n_small = np.searchsorted(ws, 1.0 / k, side="left")  # weights < 1/k
        return (len(w) - n_small) + k * tail[n_small]

    def points_for(self, lengths: np.ndarray, cell_types: np.ndarray) -> np.ndarray:
        """Points per cell that give ``lengths`` distinct genes on average (inverts the saturation)."""
        k = np.empty(len(lengths), np.int64)
        for t in np.unique(cell_types):
            sel = cell_types == t
            k[sel] = np.rint(np.interp(lengths[sel], self.distinct[t], self.k_grid))
        return np.maximum(k, 1)

    def cells(self, rng: np.random.Generator, lengths: np.ndarray,
              cell_types: np.ndarray) -> sp.csr_matrix:
        """CSR float32 counts (sorted indices) of cells with ≈ ``lengths`` expressed genes and ``cell_types``."""
        cell_types = np.asarray(cell_types)
        k = self.points_for(np.asarray(lengths, dtype=np.float64), cell_types)
        n, total = len(k), int(k.sum())
        starts = np.zeros(n + 1, np.int64)
        np.cumsum(k, out=starts[1:])
        cell_of = np.repeat(np.arange(n, dtype=np.int32), k)
        j = np.arange(total, dtype=np.int32)
        j -= np.repeat(starts[:-1].astype(np.int32), k)  # point index within its cell
        scale = ((1 << LUT_BITS) / k).astype(np.float32)
        u = j.astype(np.float32)
        u += rng.random(total, dtype=np.float32)
        u *= scale[cell_of]  # (j + U) / k · 2^LUT_BITS: stratified, sorted within each cell
        bins = u.astype(np.int32)
        np.minimum(bins, (1 << LUT_BITS) - 1, out=bins)
        bins += (cell_types.astype(np.int32) << LUT_BITS)[cell_of]
        genes = self.lut[bins]
        keep = np.ones(total, dtype=bool)
        np.not_equal(genes[1:], genes[:-1], out=keep[1:])
        keep[starts[:-1]] = True  # a cell's first point starts a new gene
        genes, cell_of = genes[keep], cell_of[keep]
        indptr = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(cell_of, minlength=n), out=indptr[1:])
        # Geometric(p) on 1, 2, …: 1 + floor(log U / log(1 − p))
        c = np.log(rng.random(len(genes), dtype=np.float32) + np.float32(1e-30))
        c *= self.inv_log_q[genes]
        counts = np.floor(c, out=c)
        counts += 1
        return sp.csr_matrix((counts, genes.astype(np.int32), indptr), shape=(n, self.n_genes))


def dataset_plan(index: int, n_cells: int, opts: SynthOptions) -> dict:
    """Labels of dataset ``index``: assay, tissue, donors, cell types and per-cell draws (deterministic)."""
    rng = np.random.default_rng([opts.seed, index])
    assay = ASSAYS[index % len(ASSAYS)]
    n_donors = int(rng.integers(3, 17))
    n_types = int(rng.integers(6, 15))
    types = np.sort(rng.choice(len(CELL_TYPES), n_types, replace=False))
    return {
        "index": index, "n_cells": n_cells, "assay": assay,
        "dataset_id": str(uuid.UUID(bytes=rng.bytes(16), version=4)),
        "tissue": TISSUES[int(rng.integers(len(TISSUES)))],
        "disease": DISEASES[int(rng.random() < 0.25)],
        "donors": [f"donor-{index:02d}-{d:02d}" for d in range(n_donors)],
        "donor_sex": rng.integers(0, 2, n_donors), "donor_eth": rng.integers(0, 2, n_donors),
        "types": types, "type_probs": rng.dirichlet(np.full(n_types, 0.8)),
        "donor_probs": rng.dirichlet(np.full(n_donors, 2.0)),
        "rng": rng,
    }


def _cat(values, codes) -> pd.Categorical:
    return pd.Categorical.from_codes(codes, categories=list(values))


def _obs(plan: dict, donor: np.ndarray, ctype: np.ndarray, primary: np.ndarray, stats: dict,
         n_genes: int, rng: np.random.Generator) -> pd.DataFrame:
    n = plan["n_cells"]
    one = np.zeros(n, np.int8)
    assay, efo, _, _, suspension = plan["assay"]
    tissue, disease = plan["tissue"], plan["disease"]
    d_sex, d_eth = plan["donor_sex"][donor], plan["donor_eth"][donor]
    types = [CELL_TYPES[t] for t in plan["types"]]
    obs = {
        "dataset_id": _cat([plan["dataset_id"]], one),
        "assay": _cat([assay], one), "assay_ontology_term_id": _cat([efo], one),
        "cell_type": _cat([t[0] for t in types], ctype),
        "cell_type_ontology_term_id": _cat([t[1] for t in types], ctype),
        "development_stage": _cat([DEV_STAGE[0]], one),
        "development_stage_ontology_term_id": _cat([DEV_STAGE[1]], one),
        "disease": _cat([disease[0]], one), "disease_ontology_term_id": _cat([disease[1]], one),
        "donor_id": _cat(plan["donors"], donor),
        "is_primary_data": primary,
        "observation_joinid": [f"{x:016x}" for x in rng.integers(0, 1 << 62, n)],
        "self_reported_ethnicity": _cat([e[0] for e in ETHNICITIES], d_eth),
        "self_reported_ethnicity_ontology_term_id": _cat([e[1] for e in ETHNICITIES], d_eth),
        "sex": _cat([s[0] for s in SEXES], d_sex), "sex_ontology_term_id": _cat([s[1] for s in SEXES], d_sex),
        "suspension_type": _cat([suspension], one),
        "tissue": _cat([tissue[0]], one), "tissue_ontology_term_id": _cat([tissue[1]], one),
        "tissue_type": _cat(["tissue"], one),
        "tissue_general": _cat([tissue[0]], one), "tissue_general_ontology_term_id": _cat([tissue[1]], one),
        **stats, "n_measured_vars": np.full(n, n_genes, np.int64),
    }
    index = pd.Index([f"cell-{plan['index']:02d}-{i:08d}" for i in range(n)], dtype=str)
    return pd.DataFrame(obs, index=index)[list(OBS_COLUMNS)]


def _var(n_genes: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng([seed, 0xFEED])
    biotype = rng.choice(np.array(["protein_coding", "lncRNA", "pseudogene"]), n_genes, p=[0.33, 0.33, 0.34])
    return pd.DataFrame({
        "feature_name": [f"SYN{i + 1}" for i in range(n_genes)],
        "feature_reference": pd.Categorical(["NCBITaxon:9606"] * n_genes),
        "feature_biotype": pd.Categorical(["gene"] * n_genes),
        "feature_length": rng.integers(300, 100_000, n_genes),
        "feature_type": pd.Categorical(biotype),
    }, index=pd.Index(gene_ids(n_genes), name="feature_id", dtype=str))


def write_dataset(path: str | os.PathLike, index: int, n_cells: int, opts: SynthOptions | None = None,
                  model: GeneModel | None = None, progress=None) -> dict:
    """Write dataset ``index`` (``n_cells`` cells) to ``path``; returns a summary (cells, nnz, assay, …).

    Written to ``path + '.part'`` and renamed when complete. ``progress(n)`` is called per chunk.
    """
    opts = opts or SynthOptions()
    if n_cells < 1:
        raise ValueError(f"n_cells must be ≥ 1, got {n_cells}")
    if not 1 <= opts.min_len <= opts.max_len <= opts.n_genes:
        raise ValueError(f"need 1 ≤ min_len ≤ max_len ≤ n_genes, got {opts.min_len}, {opts.max_len}, {opts.n_genes}")
    model = model or GeneModel(opts.n_genes, opts.seed)
    plan = dataset_plan(index, n_cells, opts)
    rng = plan["rng"]
    _, _, median, sigma, _ = plan["assay"]
    lengths = np.clip(np.rint(rng.lognormal(np.log(median), sigma, n_cells)), opts.min_len, opts.max_len)
    ctype = rng.choice(len(plan["types"]), n_cells, p=plan["type_probs"])
    donor = rng.choice(len(plan["donors"]), n_cells, p=plan["donor_probs"])
    order = np.lexsort((ctype, donor))  # rows sorted by donor, then cell type (one lookup table at a time)
    ctype, donor = ctype[order], donor[order]
    primary = rng.random(n_cells) >= opts.not_primary
    stats = {k: np.zeros(n_cells, dt) for k, dt in
             (("raw_sum", np.float64), ("nnz", np.int64), ("raw_mean_nnz", np.float64), ("raw_variance_nnz", np.float64))}
    path = os.fspath(path)
    part = path + ".part"
    nnz = 0
    try:
        with h5py.File(part, "w") as f:
            x = None
            for a in range(0, n_cells, opts.chunk_cells):
                b = min(a + opts.chunk_cells, n_cells)
                block = model.cells(rng, lengths[a:b], plan["types"][ctype[a:b]])
                if x is None:
                    ad.io.write_elem(f, "X", block, dataset_kwargs={"chunks": (1 << 18,)})
                    x = ad.io.sparse_dataset(f["X"])
                else:
                    x.append(block)
                n_expr = np.diff(block.indptr)
                s = np.add.reduceat(block.data.astype(np.float64), block.indptr[:-1]) if block.nnz else 0
                s2 = np.add.reduceat(block.data.astype(np.float64) ** 2, block.indptr[:-1]) if block.nnz else 0
                stats["raw_sum"][a:b], stats["nnz"][a:b] = s, n_expr
                stats["raw_mean_nnz"][a:b] = s / n_expr
                stats["raw_variance_nnz"][a:b] = s2 / n_expr - (s / n_expr) ** 2
                nnz += block.nnz
                if progress is not None:
                    progress(b - a)
            ad.io.write_elem(f, "obs", _obs(plan, donor, ctype, primary, stats, opts.n_genes, rng))
            ad.io.write_elem(f, "var", _var(opts.n_genes, opts.seed))
            for key in ("obsm", "varm", "obsp", "varp", "layers"):
                ad.io.write_elem(f, key, {})
            ad.io.write_elem(f, "uns", {"schema_version": "5.2.0", "title": f"synthetic dataset {index}",
                                        "organism": "Homo sapiens", "organism_ontology_term_id": "NCBITaxon:9606"})
            f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        os.replace(part, path)
    finally:
        if os.path.exists(part):
            os.remove(part)
    return {"path": path, "dataset_id": plan["dataset_id"], "assay": plan["assay"][0], "n_cells": n_cells,
            "nnz": nnz, "n_donors": len(plan["donors"]), "n_cell_types": len(plan["types"]),
            "not_primary": int((~primary).sum()), "bytes": os.path.getsize(path)}


def split_cells(n_cells: int, n_datasets: int) -> list[int]:
    """``n_cells`` split as evenly as possible over ``n_datasets`` files (earlier files get the remainder)."""
    if n_datasets < 1 or n_cells < n_datasets:
        raise ValueError(f"need 1 ≤ n_datasets ≤ n_cells, got {n_datasets} datasets for {n_cells} cells")
    q, r = divmod(n_cells, n_datasets)
    return [q + (i < r) for i in range(n_datasets)]


def write_corpus(out_dir: str | os.PathLike, n_cells: int, n_datasets: int, opts: SynthOptions | None = None,
                 progress: bool = True) -> list[dict]:
    """Write ``out_dir/synth-NN.h5ad`` for NN < ``n_datasets`` (existing files are overwritten)."""
    from tqdm.auto import tqdm

    opts = opts or SynthOptions()
    os.makedirs(out_dir, exist_ok=True)
    model = GeneModel(opts.n_genes, opts.seed)
    out = []
    with tqdm(total=n_cells, desc="synth", unit="cell", unit_scale=True, disable=not progress) as bar:
        for i, n in enumerate(split_cells(n_cells, n_datasets)):
            out.append(write_dataset(os.path.join(os.fspath(out_dir), f"synth-{i:02d}.h5ad"), i, n, opts, model,
                                     progress=bar.update))
    return out


def length_summary(paths: list[str]) -> dict:
    """Expressed genes per cell over the files' ``obs['nnz']``: median, mean, percentiles, max."""
    n = np.concatenate([ad.io.read_elem(h5py.File(p, "r")["obs/nnz"]) for p in paths])
    q = np.percentile(n, [1, 10, 50, 90, 99, 99.9])
    return {"cells": int(len(n)), "mean": round(float(n.mean()), 1), "max": int(n.max()),
            **{f"p{k}": round(float(v), 1) for k, v in zip(("1", "10", "50", "90", "99", "99.9"), q)}}


def main(argv: list[str] | None = None) -> int:
    d = SynthOptions()
    ap = argparse.ArgumentParser(prog="python -m data_prep.synth_census",
                                 description="write synthetic CellxGene-schema h5ad files (see the module docstring)")
    ap.add_argument("out_dir")
    ap.add_argument("--cells", type=int, required=True, help="cells in all files together")
    ap.add_argument("--datasets", type=int, default=4, help="number of files (datasets)")
    ap.add_argument("--genes", type=int, default=d.n_genes, help="genes in var (≤ 65,536)")
    ap.add_argument("--min-len", type=int, default=d.min_len, help="fewest expressed genes a cell draws")
    ap.add_argument("--max-len", type=int, default=d.max_len, help="most expressed genes a cell draws")
    ap.add_argument("--not-primary", type=float, default=d.not_primary, help="share with is_primary_data=False")
    ap.add_argument("--chunk-cells", type=int, default=d.chunk_cells, help="cells generated and written at a time")
    ap.add_argument("--seed", type=int, default=d.seed)
    a = ap.parse_args(argv)
    opts = SynthOptions(n_genes=a.genes, min_len=a.min_len, max_len=a.max_len, not_primary=a.not_primary,
                        chunk_cells=a.chunk_cells, seed=a.seed)
    try:
        files = write_corpus(a.out_dir, a.cells, a.datasets, opts)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in files:
        print(f"{r['path']}: {r['n_cells']} cells, {r['nnz'] / r['n_cells']:.0f} genes/cell, {r['assay']}, "
              f"{r['n_donors']} donors, {r['n_cell_types']} cell types, {r['bytes'] / 1e6:.0f} MB")
    print("expressed genes per cell:", length_summary([r["path"] for r in files]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

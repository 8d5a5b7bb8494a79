"""Real cells through the real loader against synthetic cells of the same mean length: is the GPU kept fed?

Real cells are shorter than a training context (PBMC 3k: ~850 expressed genes), so synthetic cells that fill the
context are no baseline for them. The pair that isolates the data path:

* **real** — the trainer reads the corpus's MDS shards through ``data_prep.loader`` (mosaicml-streaming, load-time
  tokenisation, the preset's ``data.num_workers``);
* **synthetic, matched** — the same trainer, micro-batch (cells) and vocabulary size, on ``training.synthetic`` cells
  whose mean tokenised length equals the real run's measured ``tokens_per_cell``.

Tokens per cell = ``min(genes, context − 1) + 1`` (CLS). The synthetic generator draws
``n ~ LogNormal(log mean_genes, 0.4)`` genes plus 100 markers, so ``mean_genes`` for a target length is found by
bisection over the generator itself (:func:`matched_mean_genes`). What still differs: the spread of lengths (real
cells vary more), hence attention work per token ``Σ L_i² / Σ L_i`` — reported beside the ratio by the trainer's
MFU, which counts it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def corpus_stats(corpus: str | Path) -> dict:
    """``{"cells", "genes_per_cell", "vocab_size"}`` of a ``python -m data_prep build`` corpus (its manifest and
    ``vocab.tsv``); a clear error when ``corpus`` is not one."""
    corpus = Path(corpus)
    manifest, vocab = corpus / "manifest.json", corpus / "vocab.tsv"
    for f in (manifest, vocab):
        if not f.is_file():
            raise FileNotFoundError(f"{corpus} is not a data_prep corpus: {f.name} missing "
                                    "(build one with python -m data_prep build IN.h5ad --out DIR)")
    datasets = json.loads(manifest.read_text())["datasets"]
    cells = sum(d["cells_out"] for d in datasets)
    if cells == 0:
        raise ValueError(f"{corpus}: the corpus has no cells")
    from data_prep.vocab import GeneVocab

    return {"cells": cells, "genes_per_cell": sum(d["nnz"] for d in datasets) / cells,
            "vocab_size": len(GeneVocab.load(vocab))}


def synthetic_tokens_per_cell(mean_genes: int, vocab_size: int, context: int, n: int = 256, seed: int = 0) -> float:
    """Mean tokenised length of ``n`` synthetic cells drawn with ``mean_genes`` (as the trainer would tokenise them)."""
    from training.synthetic import synthetic_cell, zipf_log_weights

    log_w = zipf_log_weights(vocab_size)
    genes = [len(synthetic_cell(i, vocab_size, mean_genes, seed, log_w=log_w)["genes"]) for i in range(n)]
    return float(np.mean(np.minimum(genes, context - 1) + 1))


def matched_mean_genes(tokens_per_cell: float, vocab_size: int, context: int, n: int = 256) -> int:
    """The ``data.synthetic_mean_genes`` whose cells average ``tokens_per_cell`` tokens at ``context`` (bisection;
    clipped to what the generator can reach: at least its 50 genes + 100 markers, at most ``vocab/2``)."""
    lo, hi = 50, vocab_size // 2
    while lo < hi:
        mid = (lo + hi) // 2
        if synthetic_tokens_per_cell(mid, vocab_size, context, n) < tokens_per_cell:
            lo = mid + 1
        else:
            hi = mid
    return lo

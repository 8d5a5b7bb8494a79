"""Synthetic-but-realistic cells for benchmarks and tests without a prepared corpus.

Cell ``i`` is drawn from ``numpy.random.default_rng((seed, i))``: a type ``i mod n_types``; a number
of expressed genes ``n ~ LogNormal(log(mean_genes), 0.4)`` clipped to [50, vocab/2]; n distinct
genes drawn without replacement with Zipf(1.1) popularity over the vocabulary (a housekeeping-like
head and a long tail; Gumbel top-k) plus 100 type-specific marker genes; counts ``1 + NegBin(r=2, p)`` with 4× higher means on markers. The
loader yields packed varlen batches (``data_prep.tokenize.pack_batch``), rank r of W takes cells
``(b·W + r)·batch_size …`` of batch b, and its state is the number of batches consumed.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from data_prep.tokenize import CellTokenizer, pack_batch


def zipf_log_weights(vocab_size: int, exponent: float = 1.1) -> np.ndarray:
    return -exponent * np.log(np.arange(1, vocab_size + 1))


def synthetic_cell(i: int, vocab_size: int, mean_genes: int, seed: int = 0, n_types: int = 8,
                   log_w: np.ndarray | None = None) -> dict:
    """Sparse (genes, counts) and labels of synthetic cell ``i`` (``log_w``: cached ``zipf_log_weights``)."""
    rng = np.random.default_rng((seed, i))
    cell_type = i % n_types
    n = int(np.clip(rng.lognormal(np.log(mean_genes), 0.4), 50, vocab_size // 2))
    log_w = zipf_log_weights(vocab_size) if log_w is None else log_w
    genes = np.argpartition(log_w + rng.gumbel(size=vocab_size), -n)[-n:]
    markers = np.random.default_rng((seed, 10**9 + cell_type)).choice(vocab_size, 100, replace=False)
    genes = np.union1d(genes, markers).astype(np.int32)
    mean = np.where(np.isin(genes, markers), 8.0, 2.0)
    counts = (1 + rng.negative_binomial(2, 2 / (2 + mean))).astype(np.int32)
    return {"genes": genes, "counts": counts, "cell_type": cell_type, "dataset": 0, "donor": 0, "cell_id": i}


class SyntheticBatches(torch.utils.data.Dataset):
    """Map-style: item ``b`` is rank ``rank``'s packed batch number ``b`` (a pure function of b)."""

    def __init__(self, tokenizer: CellTokenizer, batch_size: int, mean_genes: int, seed: int, rank: int,
                 world_size: int):
        self.tokenizer, self.batch_size, self.mean_genes = tokenizer, batch_size, mean_genes
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.log_w = zipf_log_weights(tokenizer.vocab_size)

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, b: int) -> dict:
        first = (b * self.world_size + self.rank) * self.batch_size
        items = []
        for i in range(first, first + self.batch_size):
            cell = synthetic_cell(i, self.tokenizer.vocab_size, self.mean_genes, self.seed, log_w=self.log_w)
            tok = self.tokenizer(cell["genes"], cell["counts"], cell_id=i)
            items.append({**tok, **{k: cell[k] for k in ("cell_type", "dataset", "donor", "cell_id")}})
        return pack_batch(items)


class SyntheticCellLoader:
    """Endless packed batches of synthetic cells, sharded by rank; resumable via state_dict.

    Batches are made by a ``torch.utils.data.DataLoader`` (``num_workers`` processes, in order);
    the state is the number of batches handed out, so prefetched batches are not counted. ``pin_memory``
    (CUDA only): batches come in page-locked memory, for asynchronous copies to the GPU.
    """

    def __init__(self, tokenizer: CellTokenizer, batch_size: int, *, mean_genes: int = 1500,
                 seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0, pin_memory: bool = False):
        self.dataset = SyntheticBatches(tokenizer, batch_size, mean_genes, seed, rank, world_size)
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.batches = 0

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state["batches"])

    def __iter__(self):
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                             sampler=itertools.count(self.batches),
                                             prefetch_factor=4 if self.num_workers else None,
                                             persistent_workers=False, pin_memory=self.pin_memory)
        for batch in loader:
            self.batches += 1
            yield batch

import numpy as np
import pytest
import torch

from data_prep.tokenize import CLS_ID, N_SPECIAL, CellTokenizer, expression_bins, pack_batch


def _cell(rng, n, vocab=5000):
    genes = np.sort(rng.choice(vocab, n, replace=False)).astype(np.int32)
    counts = rng.negative_binomial(2, 0.3, n).astype(np.int32) + 1
    return genes, counts


def test_bins_match_quantile_definition(rng):
    n_bins = int(rng.integers(2, 60))
    counts = rng.negative_binomial(1, 0.2, int(rng.integers(1, 3000))) + 1
    b = expression_bins(counts, n_bins)
    x = np.log1p(counts.astype(np.float64))
    edges = np.quantile(x, np.arange(1, n_bins) / n_bins)
    expect = 1 + np.array([(edges < xi).sum() for xi in x])
    assert np.array_equal(b, expect)
    assert b.min() >= 1 and b.max() <= n_bins
    # monotone in counts; ties share a bin; all-equal counts → bin 1
    o = np.argsort(counts, kind="stable")
    assert (np.diff(b[o]) >= 0).all()
    assert (expression_bins(np.full(7, 3), n_bins) == 1).all()


def test_bins_spread_over_range_for_distinct_counts():
    b = expression_bins(np.arange(1, 1001), 10)
    assert np.bincount(b)[1:].tolist() == [100] * 10


def test_tokenizer_layout_and_determinism(rng):
    genes, counts = _cell(rng, int(rng.integers(300, 900)))
    tok = CellTokenizer(5000, context_length=int(rng.integers(50, 200)), n_bins=51, seed=7)
    a = tok(genes, counts, cell_id=11, epoch=0)
    L = tok.context_length
    assert a["length"] == L and a["input_ids"].shape == (L,) and a["input_ids"].dtype == torch.int64
    assert a["input_ids"][0] == CLS_ID and a["values"][0] == tok.value_cls
    g = a["input_ids"][1:].numpy() - N_SPECIAL
    assert np.isin(g, genes).all() and len(np.unique(g)) == L - 1 and (np.diff(g) > 0).all()
    # values are the bins of the whole cell at the chosen genes
    bins = expression_bins(counts, 51)
    assert np.array_equal(a["values"][1:].numpy(), bins[np.searchsorted(genes, g)])
    # same (seed, cell, epoch) → same; other epoch/cell/seed → another subset
    assert torch.equal(tok(genes, counts, cell_id=11, epoch=0)["input_ids"], a["input_ids"])
    assert not torch.equal(tok(genes, counts, cell_id=11, epoch=1)["input_ids"], a["input_ids"])
    assert not torch.equal(tok(genes, counts, cell_id=12, epoch=0)["input_ids"], a["input_ids"])
    other = CellTokenizer(5000, L, 51, seed=8)
    assert not torch.equal(other(genes, counts, cell_id=11, epoch=0)["input_ids"], a["input_ids"])
    assert tok.n_tokens == 5000 + N_SPECIAL and tok.n_value_tokens == 54


def test_short_cell_keeps_all_genes_and_top_mode(rng):
    genes, counts = _cell(rng, 40)
    tok = CellTokenizer(5000, 64, 11, gene_selection="top")
    a = tok(genes, counts)
    assert a["length"] == 41 and np.array_equal(a["input_ids"][1:].numpy() - N_SPECIAL, genes)
    top = CellTokenizer(5000, 11, 11, gene_selection="top")(genes, counts)
    kept = top["input_ids"][1:].numpy() - N_SPECIAL
    assert counts[np.isin(genes, kept)].min() >= counts[~np.isin(genes, kept)].max()


def test_bad_input():
    tok = CellTokenizer(10, 8)
    with pytest.raises(ValueError, match="gene ids"):
        tok(np.array([3, 10]), np.array([1, 1]))
    with pytest.raises(ValueError, match="equal length"):
        tok(np.array([3]), np.array([1, 1]))
    with pytest.raises(ValueError, match="context_length"):
        CellTokenizer(10, 1)
    with pytest.raises(ValueError, match="gene_selection"):
        CellTokenizer(10, 8, gene_selection="random")


def test_pack_batch_varlen(rng):
    tok = CellTokenizer(5000, 100, 21)
    items = []
    for i in range(int(rng.integers(1, 9))):
        genes, counts = _cell(rng, int(rng.integers(1, 150)))
        it = tok(genes, counts, cell_id=i)
        it.update(cell_type=i % 3, dataset=0, donor=i, cell_id=i)
        items.append(it)
    b = pack_batch(items)
    lengths = [it["length"] for it in items]
    assert b["cu_seqlens"].dtype == torch.int32 and b["cu_seqlens"].tolist() == np.cumsum([0] + lengths).tolist()
    assert b["max_seqlen"] == max(lengths) and b["input_ids"].shape == (sum(lengths),)
    for i, it in enumerate(items):
        s, e = b["cu_seqlens"][i], b["cu_seqlens"][i + 1]
        assert torch.equal(b["input_ids"][s:e], it["input_ids"]) and torch.equal(b["values"][s:e], it["values"])
    assert b["donor"].dtype == torch.int64 and b["donor"].tolist() == list(range(len(items)))

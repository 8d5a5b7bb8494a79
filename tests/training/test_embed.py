"""training.embed: chunked reading, gene mapping, batching and the CLI on real and synthetic cells."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from data_prep.datasets import pbmc3k_path
from data_prep.tokenize import CellTokenizer, pack_batch
from data_prep.vocab import GeneVocab
from training.config import ModelConfig
from training.embed import CellMatrix, check_counts, embed_cells
from training.encoder import build_model

CPU = torch.device("cpu")


def tiny_model(tok, attention="softmax", embedding="cls", seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(preset=None, n_layers=2, d_model=32, n_heads=4, d_ff=64, attention=attention,
                      embedding=embedding, n_tokens=tok.n_tokens, n_bins=tok.n_bins)
    return build_model(cfg).eval()


def synthetic_cells(rng, n_cells, n_genes, vocab_size):
    """Random counts over genes whose Ensembl IDs are a random subset of a vocabulary of ``vocab_size``."""
    ids = [f"ENSG{i:011d}" for i in range(vocab_size)]
    var_ids = list(rng.choice(ids, size=n_genes, replace=False))
    x = sp.random(n_cells, n_genes, density=0.3, format="csr", random_state=rng,
                  data_rvs=lambda k: rng.integers(1, 40, size=k)).astype(np.float32)
    var = pd.DataFrame({"gene_ids": var_ids}, index=[f"sym{i}" for i in range(n_genes)])
    obs = pd.DataFrame({"cell_type": rng.choice(["a", "b", "c"], n_cells)}, index=[f"c{i}" for i in range(n_cells)])
    return ad.AnnData(X=x, obs=obs, var=var), GeneVocab(ids)


def one_by_one(model, tok, genes_counts):
    return np.stack([model.embed(pack_batch([tok(g, c, cell_id=i)]))[0].numpy()
                     for i, (g, c) in enumerate(genes_counts)])


@pytest.mark.parametrize("fmt, dense, embedding", [("h5ad", False, "cls"), ("zarr", True, "mean")])
def test_embeddings_match_cell_by_cell_model_calls(tmp_path, fmt, dense, embedding):
    rng = np.random.default_rng()
    n_cells = int(rng.integers(37, 80))
    adata, vocab = synthetic_cells(rng, n_cells, int(rng.integers(40, 90)), 120)
    # an unmapped gene and a duplicated ID (counts must be summed, as the corpus does)
    adata.var.iloc[0, 0] = "ENSG99999999999"
    adata.var.iloc[2, 0] = adata.var.iloc[1, 0]
    if dense:
        adata.X = adata.X.toarray()
    path = tmp_path / f"cells.{fmt}"
    if fmt == "zarr":
        with ad.settings.override(zarr_write_format=3):
            adata.write_zarr(path)
    else:
        adata.write_h5ad(path)
    tok = CellTokenizer(len(vocab), context_length=int(rng.integers(8, 30)), n_bins=11, seed=3)
    model = tiny_model(tok, embedding=embedding)
    cells = CellMatrix(path)
    assert cells.shape == adata.shape and list(cells.obs.index) == list(adata.obs_names)
    emb, n_empty = embed_cells(model, tok, cells, vocab.map_var(cells.var), batch_size=int(rng.integers(3, 11)),
                               device=CPU, progress=False)
    cells.close()

    x = sp.csr_matrix(adata.X)
    vid = vocab.map_var(adata.var)
    expected_input = []
    for r in range(n_cells):
        row = x[r]
        g, c = vid[row.indices], row.data.astype(np.int64)
        summed = pd.Series(c[g >= 0]).groupby(g[g >= 0]).sum()
        expected_input.append((summed.index.to_numpy(np.int32), summed.to_numpy(np.int32)))
    ref = one_by_one(model, tok, expected_input)
    assert emb.shape == (n_cells, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, ref, rtol=1e-4, atol=1e-5)
    assert n_empty == sum(len(g) == 0 for g, _ in expected_input)


def test_pooling_override_is_the_cls_state_or_the_mean_of_the_gene_states(tmp_path):
    rng = np.random.default_rng()
    adata, vocab = synthetic_cells(rng, int(rng.integers(9, 25)), 60, 80)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    tok = CellTokenizer(len(vocab), context_length=int(rng.integers(5, 20)), n_bins=11, seed=1)
    seed = int(rng.integers(1 << 30))
    cls_model, mean_model = tiny_model(tok, embedding="cls", seed=seed), tiny_model(tok, embedding="mean", seed=seed)
    cells = CellMatrix(tmp_path / "cells.h5ad")
    vid = vocab.map_var(cells.var)
    got = {p: embed_cells(cls_model, tok, cells, vid, batch_size=4, device=CPU, progress=False, pooling=p)[0]
           for p in ("cls", "mean", None)}
    twin, _ = embed_cells(mean_model, tok, cells, vid, batch_size=7, device=CPU, progress=False)
    cells.close()
    np.testing.assert_array_equal(got[None], got["cls"])                       # None: the config's pooling
    np.testing.assert_allclose(got["mean"], twin, rtol=1e-5, atol=1e-6)
    # brute force: the final states of one cell, averaged over its gene tokens (position 0 is CLS)
    x = sp.csr_matrix(adata.X)
    for r in rng.choice(x.shape[0], 3, replace=False):
        row = x[r]
        batch = pack_batch([tok(vid[row.indices].astype(np.int32), row.data.astype(np.int32), cell_id=int(r))])
        with torch.no_grad():
            h = cls_model.encode(batch["input_ids"], batch["values"], batch["cu_seqlens"], int(batch["max_seqlen"]))
        np.testing.assert_allclose(got["mean"][r], h[1:].mean(0).numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got["cls"][r], h[0].numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(got["mean"], got["cls"])
    with pytest.raises(ValueError, match="pooling must be 'cls' or 'mean'"):
        cls_model.embed(batch, "max")


def test_counts_are_found_where_the_corpus_builder_finds_them(tmp_path):
    # X log-normalised, counts in layers["counts"] (scanpy/scvi-tools) or in raw.X with raw's own genes: the same
    # cells get the same embedding as from a file with the counts in X; the PCA baseline finds them too
    from training.baseline import pca_embedding, raw_counts

    rng = np.random.default_rng()
    adata, vocab = synthetic_cells(rng, int(rng.integers(20, 40)), 50, 90)
    counts = sp.csr_matrix(adata.X)
    norm = counts.multiply(1e4 / np.maximum(counts.sum(1), 1)).tocsr()
    norm.data = np.log1p(norm.data)
    adata.write_h5ad(tmp_path / "x.h5ad")
    layered = ad.AnnData(X=norm.astype(np.float32), obs=adata.obs, var=adata.var, layers={"counts": counts})
    layered.write_h5ad(tmp_path / "layer.h5ad")
    extra = pd.DataFrame({"gene_ids": ["ENSG99999999998"]}, index=["extra"])
    raw = ad.AnnData(X=sp.hstack([counts, sp.csr_matrix(np.ones((counts.shape[0], 1)))]).tocsr(),
                     var=pd.concat([adata.var, extra]))
    in_raw = ad.AnnData(X=norm.astype(np.float32), obs=adata.obs, var=adata.var)
    in_raw.raw = raw
    in_raw.write_h5ad(tmp_path / "raw.h5ad")
    ad.AnnData(X=norm.astype(np.float32), obs=adata.obs, var=adata.var).write_h5ad(tmp_path / "none.h5ad")
    tok = CellTokenizer(len(vocab), context_length=24, n_bins=11, seed=5)
    model = tiny_model(tok)
    embs = {}
    for name, where in (("x", "X"), ("layer", 'layers["counts"]'), ("raw", "raw.X")):
        cells = CellMatrix(tmp_path / f"{name}.h5ad")
        assert cells.source == where and cells.shape[1] == (51 if name == "raw" else 50)
        embs[name], _ = embed_cells(model, tok, cells, vocab.map_var(cells.var), batch_size=8, device=CPU,
                                    progress=False)
        cells.close()
    np.testing.assert_array_equal(embs["layer"], embs["x"])
    np.testing.assert_array_equal(embs["raw"], embs["x"])      # the extra raw gene is not in the vocabulary
    with pytest.raises(ValueError, match=r"no raw counts in X, raw.X or any layer \(X has non-integer"):
        CellMatrix(tmp_path / "none.h5ad")
    assert raw_counts(layered)[1] == 'layers["counts"]' and raw_counts(in_raw)[1] == "raw.X"
    np.testing.assert_allclose(pca_embedding(layered, seed=1), pca_embedding(adata, seed=1), rtol=1e-4, atol=1e-4)


def test_real_pbmc_cells_are_independent_of_batch_size_and_read_chunk(tmp_path, monkeypatch):
    import training.embed as E

    rng = np.random.default_rng()
    full = ad.read_h5ad(pbmc3k_path(), backed="r")
    full[np.sort(rng.choice(full.n_obs, 150, replace=False))].to_memory().write_h5ad(tmp_path / "pbmc150.h5ad")
    cells = CellMatrix(tmp_path / "pbmc150.h5ad")
    vocab = GeneVocab.from_vars([cells.var])
    vid = vocab.map_var(cells.var)
    assert (vid >= 0).mean() > 0.99
    tok = CellTokenizer(len(vocab), context_length=64, n_bins=21)
    model = tiny_model(tok, attention="softmax", embedding="mean")
    a, n_empty = embed_cells(model, tok, cells, vid, batch_size=64, device=CPU, progress=False)
    monkeypatch.setattr(E, "READ_CHUNK", 41)
    b, _ = embed_cells(model, tok, cells, vid, batch_size=5, device=CPU, progress=False)
    cells.close()
    assert a.shape == (150, 32) and n_empty == 0 and np.isfinite(a).all()
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert np.linalg.matrix_rank(a, tol=1e-3) > 10  # cells differ from each other


def test_non_count_input_and_bad_layers_are_refused(tmp_path):
    rng = np.random.default_rng()
    adata, _ = synthetic_cells(rng, 20, 30, 50)
    adata.layers["lognorm"] = np.log1p(adata.X)
    adata.layers["csc"] = sp.csc_matrix(adata.X)
    adata.write_h5ad(tmp_path / "a.h5ad")
    cells = CellMatrix(tmp_path / "a.h5ad", layer="lognorm")
    with pytest.raises(ValueError, match="does not hold raw counts"):
        check_counts(cells.rows(0, 20), "X")
    cells.close()
    with pytest.raises(ValueError, match="CSC"):
        CellMatrix(tmp_path / "a.h5ad", layer="csc")
    with pytest.raises(KeyError, match="layer 'counts' not found"):
        CellMatrix(tmp_path / "a.h5ad", layer="counts")
    with pytest.raises(FileNotFoundError):
        CellMatrix(tmp_path / "missing.h5ad")
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match="expected an .h5ad file or a .zarr store"):
        CellMatrix(tmp_path / "a.csv")


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["softmax", "sigmoid"])
def test_cuda_embeddings_match_cpu(tmp_path, attention):
    """Same model on CUDA (bf16 autocast) and CPU (fp32): embeddings agree to bf16 precision."""
    rng = np.random.default_rng()
    adata, vocab = synthetic_cells(rng, 70, 60, 100)
    adata.write_h5ad(tmp_path / "c.h5ad")
    tok = CellTokenizer(len(vocab), context_length=40, n_bins=11)
    model = tiny_model(tok, attention=attention, embedding="mean")
    cells = CellMatrix(tmp_path / "c.h5ad")
    vid = vocab.map_var(cells.var)
    cpu, _ = embed_cells(model, tok, cells, vid, batch_size=16, device=CPU, progress=False)
    gpu, _ = embed_cells(model.cuda(), tok, cells, vid, batch_size=16, device=torch.device("cuda"), progress=False)
    cells.close()
    cos = (cpu * gpu).sum(1) / np.linalg.norm(cpu, axis=1) / np.linalg.norm(gpu, axis=1)
    assert cos.min() > 0.99


def test_non_finite_embeddings_are_refused_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    # A model that gives some cells NaN (bad weights, or a kernel fault) must not leave a file that scIB would
    # read as embeddings: a clear error naming the cells, and the previous output kept.
    import re
    import types

    import training.checkpoint
    import training.embed as E

    rng = np.random.default_rng()
    adata, vocab = synthetic_cells(rng, int(rng.integers(12, 30)), 40, 60)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    vocab.save(tmp_path / "vocab.tsv")
    tok = CellTokenizer(len(vocab), context_length=16, n_bins=11, seed=0)
    model = tiny_model(tok)
    cfg = types.SimpleNamespace(model=model.cfg, data=types.SimpleNamespace(mds=None))
    monkeypatch.setattr(training.checkpoint, "load_for_inference", lambda path: (model, cfg, tok))
    bad = sorted(rng.choice(adata.n_obs, 2, replace=False).tolist())
    real = E.embed_cells

    def poisoned(*a, **k):
        emb, n_empty = real(*a, **k)
        emb[bad[0], 3] = np.nan
        emb[bad[1], 0] = np.inf
        return emb, n_empty

    out = tmp_path / "emb.h5ad"
    assert E.main(["ckpt", str(tmp_path / "cells.h5ad"), "--out", str(out), "--vocab", str(tmp_path / "vocab.tsv"),
                   "--no-progress"]) == 0
    before = out.read_bytes()
    monkeypatch.setattr(E, "embed_cells", poisoned)
    with pytest.raises(E.NonFiniteEmbeddings, match=re.escape(f"rows {bad}: c{bad[0]}, c{bad[1]}")) as e:
        E.embed("ckpt", tmp_path / "cells.h5ad", out, vocab=tmp_path / "vocab.tsv", progress=False)
    assert str(e.value).startswith(f"2 of {adata.n_obs} cells of ") and f"{out} not written" in str(e.value)
    assert E.main(["ckpt", str(tmp_path / "cells.h5ad"), "--out", str(out), "--vocab", str(tmp_path / "vocab.tsv"),
                   "--no-progress"]) == 1
    assert "non-finite embeddings" in capsys.readouterr().err
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "cells.h5ad", "emb.h5ad", "vocab.tsv"]

"""Cell embeddings of a trained checkpoint for any AnnData file.

``python -m training.embed CHECKPOINT INPUT.h5ad|INPUT.zarr --out OUT.h5ad|OUT.zarr [--obsm-key X_sigattn]
[--pooling cls|mean] [--batch-size 64] [--device auto] [--vocab VOCAB.tsv] [--layer counts]``

Steps: the input's genes are mapped to the corpus vocabulary (``GeneVocab.map_var``; the vocabulary is
``<corpus>/vocab.tsv`` of the checkpoint's ``data.mds`` unless ``--vocab`` is given); raw counts (found where the
corpus builder finds them: ``X``, ``raw.X`` or a layer, ``data_prep.source.count_candidates``; ``--layer`` names
one) are read in row chunks straight from the file (``anndata.io.sparse_dataset``: backed, never the whole matrix),
mapped like the training corpus (``data_prep.mds.VocabMap``: unmapped genes dropped, duplicates summed),
tokenised by the checkpoint's ``CellTokenizer`` (epoch 0, no masking), packed into varlen batches and
embedded with ``model.embed`` under ``torch.no_grad()``: the CLS token's final state or the mean of the gene
tokens' (``--pooling``; default: the checkpoint's ``model.embedding``). The masked-expression loss is taken on
gene tokens only, so the CLS state is trained only as a key/value the genes attend to: compare both.

The output is an AnnData with the input's ``obs`` (same cells, same order), the embedding
``[n_cells, d]`` float32 in ``obsm[obsm_key]``, no genes, and ``uns["sigattn_embed"]`` recording the
checkpoint, the vocabulary match and the number of cells with no mapped gene. It is written to a
temporary path and renamed, so a failure never leaves a partial file (nor touches an existing one).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import scipy.sparse as sp
import torch
import zarr
from tqdm.auto import tqdm

from data_prep.mds import VocabMap
from data_prep.tokenize import pack_batch
from data_prep.vocab import GeneVocab

READ_CHUNK = 2048  # cells read from the file at a time


class CellMatrix:
    """Row-chunked read access to ``X`` (or a layer) of an ``.h5ad``/``.zarr`` AnnData without loading it."""

    def __init__(self, path: str | os.PathLike, layer: str | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"input not found: {self.path}")
        if self.path.suffix == ".h5ad":
            self._file = h5py.File(self.path, "r")
            root = self._file
        elif self.path.is_dir():
            self._file = None
            root = zarr.open_group(str(self.path), mode="r")
        else:
            raise ValueError(f"{self.path}: expected an .h5ad file or a .zarr store")
        self.obs = ad.io.read_elem(root["obs"])
        self.var = ad.io.read_elem(root["var"])
        if layer is None:
            if "X" not in root:
                raise ValueError(f"{self.path}: no X matrix (pass --layer)")
            self.source = self._find_counts(root)
        else:
            if "layers" not in root or layer not in root["layers"]:
                have = list(root["layers"].keys()) if "layers" in root else []
                raise KeyError(f"layer {layer!r} not found in {self.path}; available: {have}")
            self._x = self._open(root[f"layers/{layer}"])
            self.source = f'layers["{layer}"]'
        self.shape = tuple(self._x.shape)
        if self.shape != (len(self.obs), len(self.var)):
            raise ValueError(f"{self.path}: matrix {self.shape} does not match obs×var {len(self.obs)}×{len(self.var)}")

    def _open(self, node):
        kind = dict(node.attrs).get("encoding-type", "array")
        if kind == "csc_matrix":
            raise ValueError(f"{self.path}: the count matrix is CSC; row-wise reading needs CSR (convert with "
                             "adata.X = adata.X.tocsr())")
        return ad.io.sparse_dataset(node) if kind == "csr_matrix" else node

    def _find_counts(self, root) -> str:
        """Open the first of X, raw.X, layers that holds raw counts on its first cells
        (``data_prep.source.first_counts``); ``raw.X`` brings its own genes (``raw/var``). Returns where."""
        from data_prep.source import Unreadable, count_candidates, first_counts, source_name

        layers = list(root["layers"].keys()) if "layers" in root else []
        has_raw = "raw" in root and "X" in root["raw"]
        raw_var = ad.io.read_elem(root["raw/var"]) if has_raw else None

        def open_matrix(key):
            try:
                x = self._open(root[key])
            except ValueError as e:
                if key == "X":
                    raise
                raise Unreadable(e) from e
            n_var = len(raw_var) if key == "raw/X" else len(self.var)
            return x if tuple(x.shape) == (len(self.obs), n_var) else None

        key, x, problems = first_counts(count_candidates(has_raw, layers), open_matrix)
        if key is None:
            raise ValueError(f"{self.path}: no raw counts in X, raw.X or any layer (" + "; ".join(problems) + "); "
                             "embedding needs the raw integer counts the corpus was built from")
        self._x = x
        if key == "raw/X":
            self.var = raw_var
        return source_name(key)

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        block = self._x[start:stop]
        return block.tocsr() if sp.issparse(block) else sp.csr_matrix(np.asarray(block))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def check_counts(block: sp.csr_matrix, where: str) -> None:
    """Raw counts, by the corpus builder's rule (``data_prep.source.count_problem``: integral within 1e-3, ≥ 0,
    finite); anything else (log-normalised, scaled) is refused."""
    from data_prep.source import count_problem

    if (problem := count_problem(block.data)) is not None:
        raise ValueError(f"{where} does not hold raw counts ({problem}); pass --layer with the raw-count layer")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    return dev


def corpus_vocab(cfg, vocab: str | os.PathLike | None) -> GeneVocab:
    """The gene vocabulary the checkpoint was trained with."""
    if vocab is None:
        mds = getattr(getattr(cfg, "data", None), "mds", None)
        if not mds:
            raise ValueError("the checkpoint's config names no corpus (data.mds): pass --vocab VOCAB.tsv")
        vocab = Path(mds) / "vocab.tsv"
    if not Path(vocab).is_file():
        raise FileNotFoundError(f"gene vocabulary not found: {vocab} (pass --vocab)")
    return GeneVocab.load(vocab)


def embed_cells(model, tokenizer, cells: CellMatrix, vocab_ids: np.ndarray, *, batch_size: int,
                device: torch.device, progress: bool = True, pooling: str | None = None) -> tuple[np.ndarray, int]:
    """Embeddings ``[n_cells, d]`` (float32, input order) and the number of cells with no mapped gene."""
    n = cells.shape[0]
    out: np.ndarray | None = None
    n_empty = 0
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    bar = tqdm(total=n, unit="cell", desc="embed", disable=not progress)
    vocab_map = VocabMap(vocab_ids)
    for c0 in range(0, n, READ_CHUNK):
        block = cells.rows(c0, min(c0 + READ_CHUNK, n))
        check_counts(block, f"{cells.path} rows {c0}–{c0 + block.shape[0]}")
        indptr, genes, counts = vocab_map(block.indptr, block.indices, np.rint(block.data).astype(np.int64))
        for b0 in range(0, block.shape[0], batch_size):
            items = []
            for r in range(b0, min(b0 + batch_size, block.shape[0])):
                lo, hi = indptr[r], indptr[r + 1]
                n_empty += hi == lo
                items.append(tokenizer(genes[lo:hi], counts[lo:hi], cell_id=c0 + r, epoch=0))
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in pack_batch(items).items()}
            with torch.no_grad(), autocast:
                emb = model.embed(batch, pooling).float().cpu().numpy()
            if out is None:
                out = np.empty((n, emb.shape[1]), dtype=np.float32)
            out[c0 + b0: c0 + b0 + len(items)] = emb
            bar.update(len(items))
    bar.close()
    if out is None:
        raise ValueError(f"{cells.path} has no cells")
    return out, int(n_empty)


def _write_atomic(adata: ad.AnnData, out: Path) -> None:
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        if out.suffix == ".zarr":
            with ad.settings.override(zarr_write_format=3):
                adata.write_zarr(tmp)
        else:
            adata.write_h5ad(tmp)
        if out.is_dir():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()


class NonFiniteEmbeddings(RuntimeError):
    """The model gave some cells NaN/inf embeddings (nothing is written)."""


def embed(checkpoint: str | os.PathLike, input: str | os.PathLike, out: str | os.PathLike, *,
          obsm_key: str = "X_sigattn", batch_size: int = 64, device: str = "auto",
          vocab: str | os.PathLike | None = None, layer: str | None = None, progress: bool = True,
          pooling: str | None = None) -> ad.AnnData:
    """Embed every cell of ``input`` with ``checkpoint``; write and return the output AnnData. ``pooling``: ``cls``
    or ``mean`` (default: the checkpoint's ``model.embedding``)."""
    from training.checkpoint import load_for_inference

    out = Path(out)
    if out.suffix not in (".h5ad", ".zarr"):
        raise ValueError(f"--out must end in .h5ad or .zarr, got {out}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be ≥ 1, got {batch_size}")
    if pooling not in (None, "cls", "mean"):
        raise ValueError(f"--pooling must be 'cls' or 'mean', got {pooling!r}")
    dev = resolve_device(device)
    cells = CellMatrix(input, layer)
    try:
        model, cfg, tokenizer = load_for_inference(checkpoint)
        voc = corpus_vocab(cfg, vocab)
        if len(voc) != tokenizer.vocab_size:
            raise ValueError(f"vocabulary has {len(voc)} genes but the checkpoint's tokenizer expects "
                             f"{tokenizer.vocab_size}: wrong --vocab?")
        vocab_ids = voc.map_var(cells.var)
        n_mapped = int((vocab_ids >= 0).sum())
        if n_mapped == 0:
            raise ValueError(f"none of the {len(vocab_ids)} genes of {input} is in the corpus vocabulary "
                             "(are Ensembl IDs in var_names or var['gene_ids']?)")
        if n_mapped < 0.5 * len(vocab_ids):
            warnings.warn(f"only {n_mapped}/{len(vocab_ids)} genes of {input} map to the corpus vocabulary",
                          stacklevel=2)
        model = model.to(dev).eval()
        pooling = pooling or cfg.model.embedding
        t0 = time.perf_counter()
        emb, n_empty = embed_cells(model, tokenizer, cells, vocab_ids, batch_size=batch_size, device=dev,
                                   progress=progress, pooling=pooling)
        seconds = time.perf_counter() - t0
        if not (finite := np.isfinite(emb).all(axis=1)).all():
            bad = np.flatnonzero(~finite)
            names = ", ".join(map(str, cells.obs.index[bad[:5]]))
            raise NonFiniteEmbeddings(
                f"{len(bad)} of {len(emb)} cells of {input} got non-finite embeddings (rows {bad[:5].tolist()}: "
                f"{names}{', …' if len(bad) > 5 else ''}); {out} not written. The checkpoint's weights or the "
                f"forward pass on {dev} gave NaN/inf: check the weights are finite and embed again")
        if n_empty:
            how = "embedded from CLS alone" if pooling == "cls" else "zero vectors: no gene to average"
            warnings.warn(f"{n_empty} cells have no gene in the corpus vocabulary ({how})", stacklevel=2)
        result = ad.AnnData(
            obs=cells.obs.copy(), obsm={obsm_key: emb},
            uns={"sigattn_embed": {"checkpoint": str(checkpoint), "input": str(input), "obsm_key": obsm_key,
                                   "pooling": pooling, "genes_mapped": n_mapped, "genes_total": int(len(vocab_ids)),
                                   "cells_without_mapped_genes": n_empty, "device": str(dev),
                                   "seconds": round(seconds, 3)}},
        )
    finally:
        cells.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(result, out)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.embed", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="checkpoint directory (a run's checkpoints/<tag> or the run dir)")
    p.add_argument("input", help="AnnData with raw counts (.h5ad or .zarr)")
    p.add_argument("--out", required=True, help="output AnnData (.h5ad or .zarr)")
    p.add_argument("--obsm-key", default="X_sigattn", help="obsm key of the embedding (default: X_sigattn)")
    p.add_argument("--pooling", choices=("cls", "mean"),
                   help="cell embedding: the CLS state or the mean of the gene tokens' (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=64, help="cells per forward pass (default: 64)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--vocab", help="gene vocabulary (default: <corpus>/vocab.tsv from the checkpoint's config)")
    p.add_argument("--layer", help="read raw counts from this layer instead of X")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        res = embed(a.checkpoint, a.input, a.out, obsm_key=a.obsm_key, batch_size=a.batch_size, device=a.device,
                    vocab=a.vocab, layer=a.layer, progress=not a.no_progress, pooling=a.pooling)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    except NonFiniteEmbeddings as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    info = res.uns["sigattn_embed"]
    print(f"embedded {res.n_obs} cells → obsm[{a.obsm_key!r}] {res.obsm[a.obsm_key].shape} "
          f"({info['genes_mapped']}/{info['genes_total']} genes mapped, {info['seconds']:.1f} s) → {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""training model: presets' sizes (meta device), attention cores, padding invariance, masked loss, embeddings."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.tokenize import CellTokenizer, pack_batch
from training.attention import softmax_attention_padded
from training.config import ModelConfig, load_config
from training.encoder import build_model
from training.masking import choose_masked, mask_generator
from training.presets import NOMINAL_PARAMS, NOMINAL_VOCAB, PRESETS

from trainer_helpers import sigattn_works

KINDS = ["softmax", pytest.param("sigmoid", marks=pytest.mark.skipif(not sigattn_works(), reason="sigattn op not built"))]


def random_cells(rng, n_cells, vocab=300, max_genes=40, n_bins=11):
    tok = CellTokenizer(vocab, context_length=max_genes + 1, n_bins=n_bins, seed=int(rng.integers(1 << 30)))
    items = []
    for i in range(n_cells):
        n = int(rng.integers(1, max_genes + 1))
        genes = np.sort(rng.choice(vocab, n, replace=False)).astype(np.int32)
        items.append(tok(genes, rng.integers(1, 50, n).astype(np.int32), cell_id=i))
    return tok, items


def small_model(tok, attention, embedding="cls", layers=2):
    cfg = ModelConfig(preset=None, n_layers=layers, d_model=48, n_heads=4, d_ff=96, attention=attention,
                      embedding=embedding, n_tokens=tok.n_tokens, n_bins=tok.n_bins)
    return build_model(cfg).eval()


@pytest.mark.parametrize("name", [n for n in PRESETS if NOMINAL_PARAMS[n]])
def test_preset_parameter_counts_match_names(name):
    cfg = load_config(overrides=[f"model.preset={name}"]).model
    model = build_model(dataclasses.replace(cfg, n_tokens=NOMINAL_VOCAB + 3, n_bins=51), device="meta")
    n = model.num_params()
    print(f"{name}: {n:,} parameters ({model.num_params(non_embedding=True):,} non-embedding)")
    assert all(p.is_meta for p in model.parameters())
    assert abs(n - NOMINAL_PARAMS[name]) / NOMINAL_PARAMS[name] < 0.10
    # 12·L·d² dominates the non-embedding count.
    approx = 12 * cfg.n_layers * cfg.d_model ** 2
    assert abs(model.num_params(non_embedding=True) - approx) / approx < 0.02


def test_softmax_padded_matches_per_cell_sdpa():
    rng = np.random.default_rng()
    lengths = rng.integers(1, 30, size=5)
    cu = torch.zeros(6, dtype=torch.int32)
    cu[1:] = torch.from_numpy(np.cumsum(lengths))
    T, H, D = int(cu[-1]), 3, 8
    q, k, v = (torch.randn(T, H, D, dtype=torch.float64) for _ in range(3))
    out = softmax_attention_padded(q, k, v, cu, int(lengths.max()))
    for i in range(5):
        s = slice(int(cu[i]), int(cu[i + 1]))
        ref = torch.softmax(torch.einsum("thd,shd->hts", q[s], k[s]) / D ** 0.5, -1)
        torch.testing.assert_close(out[s], torch.einsum("hts,shd->thd", ref, v[s]))


@pytest.mark.parametrize("attention", KINDS)
@pytest.mark.parametrize("embedding", ["cls", "mean"])
def test_cell_output_is_the_same_alone_or_packed(attention, embedding):
    rng = np.random.default_rng()
    tok, items = random_cells(rng, int(rng.integers(3, 7)))
    torch.manual_seed(int(rng.integers(1 << 30)))
    model = small_model(tok, attention, embedding)
    packed = model.embed(pack_batch(items))
    alone = torch.cat([model.embed(pack_batch([it])) for it in items])
    assert packed.shape == (len(items), 48)
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)
    # Hidden states too, token by token.
    b = pack_batch(items)
    h = model.encode(b["input_ids"], b["values"], b["cu_seqlens"], b["max_seqlen"])
    h0 = model.encode(items[0]["input_ids"], items[0]["values"], torch.tensor([0, items[0]["length"]],
                      dtype=torch.int32), items[0]["length"])
    torch.testing.assert_close(h[: items[0]["length"]], h0, rtol=1e-4, atol=1e-5)


def test_mean_embedding_is_mean_of_gene_states():
    rng = np.random.default_rng()
    tok, items = random_cells(rng, 4)
    model = small_model(tok, "softmax", "mean")
    b = pack_batch(items)
    h = model.encode(b["input_ids"], b["values"], b["cu_seqlens"], b["max_seqlen"])
    cu = b["cu_seqlens"]
    ref = torch.stack([h[cu[i] + 1: cu[i + 1]].mean(0) if cu[i + 1] - cu[i] > 1 else torch.zeros(48)
                       for i in range(4)])
    torch.testing.assert_close(model.embed(b), ref)


@pytest.mark.parametrize("attention", KINDS)
def test_loss_only_on_masked_genes(attention):
    rng = np.random.default_rng()
    tok, items = random_cells(rng, 5, max_genes=30)
    model = small_model(tok, attention)
    b = pack_batch(items)
    masked = choose_masked(b["cu_seqlens"], 0.3, mask_generator(int(rng.integers(100)), 3))
    loss, n = model(b, masked)
    assert n == masked.sum() > 0
    # The same positions as int64 indices (the sync-free form the GPU path uses) give the same loss.
    loss_idx, n_idx = model(b, masked.nonzero().squeeze(1))
    assert n_idx == n
    torch.testing.assert_close(loss_idx, loss, rtol=0, atol=0)
    # Reference: CE over the masked rows only, from the encoder run on MASK-ed values.
    h = model.encode(b["input_ids"], b["values"].masked_fill(masked, tok.value_mask), b["cu_seqlens"],
                     b["max_seqlen"])
    logits = model.head_out(model.head_ln(torch.nn.functional.gelu(model.head_dense(h))))
    ref = torch.nn.functional.cross_entropy(logits[masked], b["values"][masked] - 1)
    torch.testing.assert_close(loss, ref)
    # The true bins of masked genes reach the loss only as targets; changing them changes the loss ...
    b2 = dict(b, values=b["values"].clone())
    b2["values"][masked] = (b["values"][masked] % tok.n_bins) + 1
    assert not torch.equal(model(b2, masked)[0], loss)
    # ... and the gradient reaches the head only through masked rows: unmasked targets are unused.
    loss.backward()
    assert model.head_out.weight.grad.abs().sum() > 0


def test_masking_counts_cls_and_determinism():
    rng = np.random.default_rng()
    lengths = rng.integers(1, 60, size=9)
    cu = torch.zeros(10, dtype=torch.int32)
    cu[1:] = torch.from_numpy(np.cumsum(lengths))
    ratio = float(rng.uniform(0.05, 0.5))
    m = choose_masked(cu, ratio, mask_generator(7, 11, 1))
    for i, n in enumerate(lengths):
        cell = m[int(cu[i]): int(cu[i + 1])]
        assert not cell[0]                                   # CLS never masked
        assert int(cell.sum()) == (max(1, round(ratio * (n - 1))) if n > 1 else 0)
    assert torch.equal(m, choose_masked(cu, ratio, mask_generator(7, 11, 1)))
    assert not torch.equal(m, choose_masked(cu, ratio, mask_generator(7, 12, 1)))
    assert not torch.equal(m, choose_masked(cu, ratio, mask_generator(7, 11, 0)))
    with pytest.raises(ValueError, match="mask ratio"):
        choose_masked(cu, 1.5, mask_generator(0, 0))


def test_model_needs_tokenizer_sizes():
    with pytest.raises(ValueError, match="n_tokens and n_bins"):
        build_model(ModelConfig())


def test_activation_checkpointing_gives_the_same_gradients(monkeypatch):
    import training.encoder as encoder
    rng = np.random.default_rng()
    tok, items = random_cells(rng, 4)
    b = pack_batch(items)
    masked = choose_masked(b["cu_seqlens"], 0.2, mask_generator(1, 2))
    real, calls = encoder.checkpoint, []
    monkeypatch.setattr(encoder, "checkpoint", lambda block, *a, **k: calls.append(block) or real(block, *a, **k))
    grads, ran = [], []
    for ac in (False, True, 2, 3):          # none, every block, every 2nd / 3rd block (selective)
        torch.manual_seed(5)
        model = small_model(tok, "softmax").train()
        model.cfg.activation_checkpointing = ac
        calls.clear()
        model(b, masked)[0].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        ran.append([list(model.blocks).index(blk) for blk in calls])
    L = len(model.blocks)
    assert ran == [[], list(range(L)), list(range(0, L, 2)), list(range(0, L, 3))]
    for g in grads[1:]:
        for a, c in zip(grads[0], g):
            torch.testing.assert_close(a, c)


def test_cli_rejects_bad_overrides_clearly(capsys):
    from training.train import main
    with pytest.raises(SystemExit) as e:
        main([str(Path(__file__).parents[2] / "training" / "configs" / "tiny.yaml"), "run.zero_stage=9"])
    assert e.value.code == 2 and "run.zero_stage must be 0–3" in capsys.readouterr().err

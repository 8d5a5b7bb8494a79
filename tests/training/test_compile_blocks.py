"""Regional torch.compile (training/compile.py): each block compiles without graph breaks (fullgraph) with the
attention custom op inside the graph, matches eager in loss and every gradient, and does not recompile per batch
as T and max_seqlen change (one recompile at most: the first graph specialises the max_seqlen int)."""

import copy

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from data_prep.tokenize import CellTokenizer, pack_batch
from training.compile import compile_blocks
from training.config import ModelConfig
from training.encoder import build_model
from training.masking import choose_masked, mask_generator

from trainer_helpers import ATTENTION_KINDS, skip_unless_sigattn


def _batch(rng, tok, n_cells):
    items = []
    for i in range(n_cells):
        n = int(rng.integers(1, 60))
        genes = np.sort(rng.choice(300, n, replace=False)).astype(np.int32)
        items.append(tok(genes, rng.integers(1, 50, n).astype(np.int32), cell_id=i))
    b = pack_batch(items)
    return b, choose_masked(b["cu_seqlens"], 0.2, mask_generator(n_cells, 0)).nonzero().squeeze(1)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ATTENTION_KINDS)
def test_compiled_blocks_match_eager_without_graph_breaks(attention):
    skip_unless_sigattn(attention)
    torch._dynamo.reset()
    rng = np.random.default_rng()
    tok = CellTokenizer(300, context_length=64, n_bins=11, seed=int(rng.integers(1 << 30)))
    cfg = ModelConfig(preset=None, n_layers=3, d_model=32, n_heads=4, d_ff=64, attention=attention,
                      n_tokens=tok.n_tokens, n_bins=tok.n_bins)
    compiled = build_model(cfg)
    eager = copy.deepcopy(compiled)
    compile_blocks(compiled)
    assert list(compiled.state_dict()) == list(eager.state_dict())        # checkpoints stay interchangeable
    counters.clear()
    for n_cells in (5, 8, 3):                                              # T and max_seqlen change each batch
        batch, idx = _batch(rng, tok, n_cells)
        loss_c, _ = compiled(batch, idx)
        loss_e, _ = eager(batch, idx)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        loss_c.backward()
        loss_e.backward()
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])

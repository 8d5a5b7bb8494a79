"""training.metrics: the 6·(N − N_head) + 6·N_head·r + 12·L·d·s FLOP formula against torch's FlopCounterMode, JSONL + TensorBoard."""

import json

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from data_prep.tokenize import CellTokenizer, pack_batch
from training.config import ModelConfig
from training.encoder import build_model
from training.masking import choose_masked, mask_generator
from training.metrics import MetricsLogger, device_peak_flops, effective_seq_len, flops_per_token, head_params


def test_formula_matches_counted_flops_of_a_training_step():
    rng = np.random.default_rng()
    layers, d = int(rng.integers(1, 4)), 64
    tok = CellTokenizer(500, context_length=400, n_bins=11)
    n = int(rng.integers(100, 399))                      # one cell: no padding in the softmax path
    genes = np.sort(rng.choice(500, n, replace=False)).astype(np.int32)
    batch = pack_batch([tok(genes, rng.integers(1, 30, n).astype(np.int32))])
    model = build_model(ModelConfig(preset=None, n_layers=layers, d_model=d, n_heads=4, d_ff=4 * d,
                                    attention="softmax", n_tokens=tok.n_tokens, n_bins=11))
    masked = choose_masked(batch["cu_seqlens"], 0.15, mask_generator(0, 0))
    with FlopCounterMode(display=False) as fc:
        loss, m = model(batch, masked)
        loss.backward()
    T, s = batch["input_ids"].numel(), effective_seq_len(batch["cu_seqlens"])
    assert s == T
    head = sum(p.numel() for name, p in model.named_parameters() if name.startswith("head") and p.ndim == 2)
    body = sum(p.numel() for b in model.blocks for p in b.parameters() if p.ndim == 2)
    # Linear layers exactly: body on all T tokens, head on masked tokens only (CPU SDPA is not counted).
    assert fc.get_total_flops() == 6 * body * T + 6 * head * int(m)
    # Attention, counted on the maths it computes (QKᵀ and PV, forward + backward): 12·d·s per token.
    q, k, v = (torch.randn(4, T, d // 4, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as fa:
        (torch.softmax(q @ k.transpose(1, 2), -1) @ v).sum().backward()
    assert fa.get_total_flops() == 12 * d * s * T
    counted = fc.get_total_flops() + layers * fa.get_total_flops()
    # The documented per-token formula, with the head on the masked fraction r = m/T of the tokens, differs
    # from the count only by the vector parameters (biases, LayerNorms) it also counts as 6 FLOPs per token.
    n_nonemb, n_head = model.num_params(non_embedding=True), head_params(model)
    r = int(m) / T
    formula = flops_per_token(n_nonemb, layers, d, s, n_head, r) * T
    vectors = 6 * (n_nonemb - n_head - body) * T + 6 * (n_head - head) * int(m)
    assert formula - counted == pytest.approx(vectors, rel=1e-12)
    assert abs(formula - counted) / counted < 0.03
    # Counting the head on every token (the old formula) overstates by 6·N_head·(T − m).
    assert flops_per_token(n_nonemb, layers, d, s, n_head, 1.0) * T - formula == pytest.approx(6 * n_head * (T - int(m)))


def test_effective_seq_len_and_cpu_peak():
    cu = torch.tensor([0, 10, 40], dtype=torch.int32)
    assert effective_seq_len(cu) == (100 + 900) / 40
    assert device_peak_flops(torch.device("cpu")) is None


def test_logger_writes_jsonl_and_tensorboard(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=True)
    for step in (1, 2):
        log.log({"step": step, "loss": 1.0 / step, "mfu": None, "skipped": False})
    log.close()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert recs == [{"step": 1, "loss": 1.0, "mfu": None, "skipped": False},
                    {"step": 2, "loss": 0.5, "mfu": None, "skipped": False}]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss")] == [1.0, 0.5]


def test_recompute_mfu_rescales_logged_mfu_by_the_formula_ratio(tmp_path):
    """benchmarks/recompute_mfu.py: mfu = mfu_as_logged · F_new/F_old at the row's tokens per cell; idempotent."""
    import importlib.util
    import shutil
    from pathlib import Path

    from launch.model_size import flops_per_cell, model_size
    repo = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("recompute_mfu", repo / "benchmarks" / "recompute_mfu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rng = np.random.default_rng()
    s, logged = float(rng.uniform(500, 8192)), float(rng.uniform(0.1, 0.6))
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"rows": [{"size": "160m", "context": 8192, "attention": "sigmoid", "tokens_per_cell": s,
                                          "mfu": logged}, {"size": "160m", "context": 8192, "error": "x", "mfu": None}]}))
    mod.recompute(path)
    first = json.loads(path.read_text())
    m = model_size("160m")
    f_old = 6 * m.n_params_nonemb + 12 * m.n_layers * m.d_model * s
    row = first["rows"][0]
    assert row["mfu_as_logged"] == logged and row["mfu"] == pytest.approx(logged * flops_per_cell(m, s) / s / f_old)
    assert 0.99 * logged < row["mfu"] < logged and "head" in first["mfu_recomputed"]["formula"]
    shutil.copy(path, tmp_path / "again.json")
    mod.recompute(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text())["rows"] == first["rows"]

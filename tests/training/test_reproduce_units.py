"""training.reproduce building blocks: seed statistics, divergence verdicts, the stability monitor's hooks."""

import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from training.reproduce.divergence import assess, first_spike
from training.reproduce.monitor import StabilityMonitor, max_logit
from training.reproduce.stats import fmt_ci, mean_ci, paired_difference


def test_mean_ci_is_the_student_t_interval():
    rng = np.random.default_rng()
    x = rng.normal(rng.uniform(-2, 2), rng.uniform(0.1, 2), size=int(rng.integers(3, 9)))
    s = mean_ci(x)
    lo, hi = sps.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
    assert s["mean"] == pytest.approx(x.mean()) and s["n"] == len(x)
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((lo, hi))
    assert mean_ci([x[0]])["half_width"] is None and mean_ci([])["mean"] is None
    assert mean_ci([1.0, float("nan"), 3.0])["n"] == 2
    assert fmt_ci(s, ".2f") == f"{x.mean():.2f} ± {(hi - lo) / 2:.2f}"


def test_paired_difference_uses_matching_seeds_only():
    rng = np.random.default_rng()
    a = {s: float(rng.normal()) for s in range(6)}
    b = {s: a.get(s, 0.0) - 0.5 + 0.1 * float(rng.normal()) for s in range(1, 7)}   # seeds 1..5 shared
    d = paired_difference(a, b)
    diffs = [a[s] - b[s] for s in range(1, 6)]
    assert d["n"] == 5 and d["mean"] == pytest.approx(np.mean(diffs))
    assert d["p_value"] == pytest.approx(sps.ttest_rel([a[s] for s in range(1, 6)], [b[s] for s in range(1, 6)]).pvalue)
    assert d["ci_low"] > 0                                                  # a clear shift of +0.5


def test_quality_verdict_names_one_seed_and_starts_clean():
    """One seed has no interval (not "CI includes 0"); with no softmax arm the line starts with its first clause."""
    from training.reproduce.quality import verdict_line

    one = paired_difference({0: 0.3}, {0: 0.2})
    line = verdict_line({"pbmc3k": {"bio_conservation": {"training_gain": one}}})
    assert line.startswith("What training added") and "one seed: no interval" in line and "CI" not in line
    many = paired_difference({s: 0.3 + 0.01 * s for s in range(4)}, {s: 0.1 for s in range(4)})
    assert "(CI excludes 0)" in verdict_line({"pbmc3k": {"bio_conservation": {"training_gain": many}}})


def _records(rng, n, **extra):
    g = rng.lognormal(0.0, 0.3, size=n)
    loss = 4.0 * np.exp(-np.arange(n) / (n / 3)) + 1.0 + 0.01 * rng.normal(size=n)
    return [{"step": i + 1, "loss": float(loss[i]), "grad_norm": float(g[i]), **extra} for i in range(n)]


def test_stable_run_is_not_diverged():
    rng = np.random.default_rng()
    v = assess(_records(rng, int(rng.integers(60, 120)), max_attn_logit=2.0, max_activation=3.0))
    assert not v.diverged and v.first_nonfinite_step is None and v.first_grad_spike_step is None
    assert v.instability_step is None and v.max_attn_logit == 2.0 and v.best_loss < v.first_loss


def test_gradient_spike_is_found_at_its_step():
    rng = np.random.default_rng()
    recs = _records(rng, 100)
    k = int(rng.integers(20, 95))
    recs[k - 1]["grad_norm"] *= 1e3
    v = assess(recs)
    assert v.first_grad_spike_step == k == v.instability_step
    assert v.max_grad_norm == pytest.approx(recs[k - 1]["grad_norm"])
    assert first_spike([1.0] * 5 + [1e9], range(1, 7)) is None              # too little history


def test_nonfinite_loss_and_loss_blow_up_diverge():
    rng = np.random.default_rng()
    recs = _records(rng, 50)
    k = int(rng.integers(12, 50))
    recs[k - 1]["loss"] = None
    recs[k - 1]["grad_norm"] = None
    v = assess(recs)
    assert v.diverged and v.first_nonfinite_step == k and "non-finite" in v.diverged_reason
    v = assess(_records(rng, 30), stopped_at=31)
    assert v.diverged and v.first_nonfinite_step == 31 and v.steps == 31
    recs = _records(rng, 80)
    for r in recs[60:]:
        r["loss"] = 12.0                                                   # back up from ~1 to 10+
    v = assess(recs)
    assert v.diverged and v.first_nonfinite_step is None and "best" in v.diverged_reason
    recs = _records(rng, 40)
    recs[20]["grad_norm"] = float("inf")
    assert assess(recs).first_nonfinite_step == 21


def test_max_logit_matches_brute_force_per_cell():
    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 30)))
    lengths = torch.randint(1, 23, (5,), generator=g)
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    T, H, D = int(cu[-1]), 3, 8
    q, k = torch.randn(T, H, D, generator=g) * 2, torch.randn(T, H, D, generator=g) * 2
    want = max(float((q[a:b].transpose(0, 1) @ k[a:b].permute(1, 2, 0)).max()) / math.sqrt(D)
               for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()))
    got = max_logit(q, k, cu, int(lengths.max()), block_elems=64)         # several query blocks
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_max_logit_negative_cells_and_empty_cells():
    # every logit of the only non-empty cell is negative: padded slots must not count as 0; empty cells are skipped
    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 30)))
    D = 4
    k = torch.rand(7, 2, D, generator=g) + 0.5
    q = -(torch.rand(7, 2, D, generator=g) + 0.5)
    cu = torch.tensor([0, 0, 7, 7], dtype=torch.int32)                   # cells of 0, 7 and 0 tokens
    want = float((q.transpose(0, 1) @ k.permute(1, 2, 0)).max()) / math.sqrt(D)
    assert want < 0
    got = max_logit(q, k, cu, 12, block_elems=50)                        # max_seqlen above the longest cell
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_monitor_reports_max_activation_and_logit_of_a_real_encoder(tmp_path):
    from training.config import ModelConfig
    from training.encoder import build_model

    rng = np.random.default_rng()
    torch.manual_seed(int(rng.integers(1 << 30)))
    cfg = ModelConfig(preset=None, n_layers=2, d_model=16, n_heads=2, d_ff=32, attention="softmax",
                      n_tokens=50, n_bins=5)
    model = build_model(cfg)
    lengths = torch.tensor(rng.integers(2, 9, size=3))
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    T = int(cu[-1])
    batch = {"input_ids": torch.randint(0, 50, (T,)), "values": torch.randint(1, 6, (T,)), "cu_seqlens": cu,
             "max_seqlen": int(lengths.max())}
    mon = StabilityMonitor(model, tmp_path / "s.jsonl")
    outs, logits = [], []
    hooks = [b.register_forward_hook(lambda m, a, o: outs.append(o.detach().abs().max())) for b in model.blocks]
    hooks += [b.attn.qkv.register_forward_hook(lambda m, a, o: logits.append(o.detach())) for b in model.blocks]
    loss, _ = model(batch, torch.rand(T) < 0.5)
    mon(None, {"step": 1, "loss": float(loss.detach()), "grad_norm": 1.0, "lr": 0.1})
    rec = mon.records[-1]
    assert rec["max_activation"] == pytest.approx(float(max(outs)))
    want = max(float(max_logit(*o.view(T, 3, 2, 8).unbind(1)[:2], cu, int(lengths.max()))) for o in logits)
    assert rec["max_attn_logit"] == pytest.approx(want)
    mon.nonfinite(2)
    mon.remove()
    model(batch, torch.rand(T) < 0.5)
    mon(None, {"step": 3, "loss": 1.0})                                   # hooks removed: nothing measured
    assert mon.records[-1]["max_activation"] is None
    lines = (tmp_path / "s.jsonl").read_text().splitlines()
    assert len(lines) == 3 and '"nonfinite": true' in lines[1]
    for h in hooks:
        h.remove()
    with pytest.raises(ValueError, match="no training.attention.Attention"):
        StabilityMonitor(torch.nn.Linear(2, 2), None)

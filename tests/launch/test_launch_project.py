"""launch.project: parameter counts, FLOPs and GPU-hours, memory feasibility, output files, and --measure on CPU."""

from __future__ import annotations

import csv
import importlib
import json
import math
import os
import random
from pathlib import Path

import pytest

from launch import project
from launch.memory import activation_bytes, feasibility, model_state_bytes
from launch.model_size import flops_per_cell, model_size

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["tiny", "160m", "1.4b"])
def test_param_count_matches_closed_form(name):
    """Meta-device count equals the closed form of training/presets.py's docstring."""
    from data_prep.tokenize import CellTokenizer
    from training.config import load_config
    from training.presets import NOMINAL_VOCAB

    m = model_size(name)
    cfg = load_config(REPO / "training" / "configs" / f"{name}.yaml")
    tok = CellTokenizer(NOMINAL_VOCAB, 16, cfg.data.n_bins, 0)
    d, f, L, nb = m.d_model, m.d_ff, m.n_layers, cfg.data.n_bins
    body = L * (4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d) + 2 * d + d * d + d + 2 * d + d * nb + nb
    assert m.n_params_nonemb == body
    assert m.n_params == body + tok.n_tokens * d + tok.n_value_tokens * d


def test_flops_and_gpu_hours_follow_the_formula():
    m = model_size("400m")
    rng = random.Random()
    ctx, mfu, cells, gpus = rng.choice([1000, 3000, 8192]), rng.uniform(0.2, 0.6), rng.uniform(1e6, 1e8), rng.randint(1, 64)
    from training.config import load_config
    nb = load_config(REPO / "training" / "configs" / "400m.yaml").data.n_bins
    head = m.d_model * m.d_model + 3 * m.d_model + m.d_model * nb + nb        # head_dense, head_ln, head_out
    masked = round(0.15 * (ctx - 1))                                          # the preset's mask ratio, CLS excluded
    f = (6 * (m.n_params_nonemb - head) + 12 * m.n_layers * m.d_model * ctx) * ctx + 6 * head * masked
    assert m.n_params_head == head and m.mask_ratio == 0.15
    assert flops_per_cell(m, ctx) == pytest.approx(f)
    rows = project.project(["400m"], [ctx], cells=cells, gpus=gpus, epochs=2.0, mfu=mfu, peak_flops=1e15)
    assert [r["attention"] for r in rows] == ["sigmoid", "softmax"]
    hours = 2.0 * cells * f / (mfu * 1e15) / 3600
    for r in rows:
        assert r["gpu_hours"] == pytest.approx(hours) and r["wall_hours"] == pytest.approx(hours / gpus)
    assert rows[0]["sigmoid_saving_pct"] == pytest.approx(0.0) and rows[1]["sigmoid_saving_pct"] is None
    # attention's share grows with context: FLOPs per cell are super-linear in s
    assert flops_per_cell(m, 2 * ctx) > 2 * flops_per_cell(m, ctx)


def test_memory_model():
    p, g = random.randint(10**8, 10**10), random.randint(2, 64)
    states = [model_state_bytes(p, z, g) for z in range(4)]
    assert states[0] == 16 * p and states[3] == pytest.approx(16 * p / g)
    assert states == sorted(states, reverse=True)
    assert model_state_bytes(p, 2, 1) == model_state_bytes(p, 0, 1)  # nothing to shard on one GPU
    m = model_size("1.4b")
    # 32·d bytes per token and layer (Korthikanti et al.'s 34·d less the two 1-byte dropout masks; no dropout here)
    s, L, d = random.randint(100, 8192), m.n_layers, m.d_model
    assert activation_bytes(m, 1, s, False) == pytest.approx(32 * d * L * s + s * (2 * d + 4 * 51))
    assert activation_bytes(m, 1, s, True) == pytest.approx(2 * d * L * s + 32 * d * s + s * (2 * d + 4 * 51))
    assert activation_bytes(m, 2, 4096, False) == pytest.approx(2 * activation_bytes(m, 1, 4096, False))
    assert activation_bytes(m, 1, 4096, True) < activation_bytes(m, 1, 4096, False) / 5
    small = feasibility(m, 8192, 0, 1, gpu_mem_gib=16)   # 16 B/param of 1.4B params alone exceed 16 GiB
    assert small.verdict == "does not fit" and small.max_cells == 0
    f2, f8 = feasibility(m, 2048, 3, 16), feasibility(m, 8192, 3, 16)
    assert f2.max_cells > f8.max_cells >= 1 and f8.max_cells_ckpt > f8.max_cells
    tight = next(feasibility(m, 8192, 3, 16, gpu_mem_gib=gb) for gb in range(1, 200)
                 if feasibility(m, 8192, 3, 16, gpu_mem_gib=gb).max_cells_ckpt >= 1)
    assert tight.verdict == "fits with activation checkpointing"


def test_cli_writes_table_csv_json_and_plot(tmp_path, capsys):
    out = tmp_path / "proj"
    assert project.main(["--sizes", "160m", "1.4b", "--context", "2048", "8192", "--cells", "131.6e6", "--gpus", "16",
                         "--mfu", "0.4", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "projection.csv")))
    assert len(rows) == 2 * 2 * 2 and {r["memory"] for r in rows} <= {"fits", "fits with activation checkpointing",
                                                                        "does not fit"}
    data = json.loads((out / "projection.json").read_text())
    assert data["meta"]["gpus"] == 16 and len(data["rows"]) == 8
    big = [r for r in data["rows"] if r["size"] == "1.4b" and r["context"] == 8192][0]
    assert math.isclose(big["gpu_hours"], 131.6e6 * flops_per_cell(model_size("1.4b"), 8192) / (0.4 * 989e12) / 3600)
    md = (out / "projection.md").read_text()
    assert md.count("\n| 1.4b |") == 4 and "GPU-hour projection" in md
    import matplotlib.image

    img = matplotlib.image.imread(out / "projection.png")
    assert img.shape[0] > 200 and img.shape[1] > 600


@pytest.mark.parametrize("argv, msg", [(["--sizes", "3b"], "unknown preset"), (["--mfu", "1.5"], "--mfu"),
                                       (["--context", "1"], "--context")])
def test_cli_rejects_bad_arguments(tmp_path, capsys, argv, msg):
    with pytest.raises(SystemExit):
        project.main(argv + ["--out", str(tmp_path / "o")])
    assert msg in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_scaling_applies_the_measured_data_parallel_efficiency(tmp_path, capsys):
    # a training_gpu.py JSON: 160m@2048 sigmoid measured on 1 and 4 GPUs (0.9 per-GPU efficiency), softmax on 1 only
    scaling = tmp_path / "dp.json"
    rows = [dict(size="160m", context=2048, attention="sigmoid", world_size=1, tokens_per_s=1000.0),
            dict(size="160m", context=2048, attention="sigmoid", world_size=4, tokens_per_s=3600.0,
                 tokens_per_s_per_gpu=900.0),
            dict(size="160m", context=2048, attention="sigmoid", world_size=8, error="OutOfMemoryError"),
            dict(size="160m", context=2048, attention="softmax", world_size=1, tokens_per_s=950.0)]
    scaling.write_text(json.dumps({"rows": rows}))
    base, scaled = tmp_path / "base", tmp_path / "scaled"
    argv = ["--sizes", "160m", "--context", "2048", "--gpus", "16", "--mfu", "0.4"]
    assert project.main(argv + ["--out", str(base)]) == 0
    assert project.main(argv + ["--scaling", str(scaling), "--out", str(scaled)]) == 0
    b, s = ({r["attention"]: r for r in json.loads((d / "projection.json").read_text())["rows"]} for d in (base, scaled))
    assert s["sigmoid"]["dp_efficiency"] == pytest.approx(0.9)
    assert s["sigmoid"]["dp_efficiency_source"] == "measured at 4 GPUs"
    assert s["sigmoid"]["gpu_hours"] == pytest.approx(b["sigmoid"]["gpu_hours"] / 0.9)
    assert s["sigmoid"]["cells_per_s_per_gpu"] == pytest.approx(b["sigmoid"]["cells_per_s_per_gpu"] * 0.9)
    assert s["softmax"]["dp_efficiency"] == 1.0 and "assumed" in s["softmax"]["dp_efficiency_source"]
    assert s["softmax"]["gpu_hours"] == pytest.approx(b["softmax"]["gpu_hours"])
    assert s["sigmoid"]["sigmoid_saving_pct"] < b["sigmoid"]["sigmoid_saving_pct"]      # recomputed after scaling
    with pytest.raises(SystemExit):
        project.main(argv + ["--scaling", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")])
    assert "no such file" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_scaling_takes_the_newest_row_of_a_world_size():
    # a file merged over calls: two 4-GPU rows and two 1-GPU rows, oldest first; the newest of each counts
    r = [dict(size="160m", context=8192, attention="sigmoid", cells_per_s_per_gpu=10.0, gpu_hours=100.0,
              wall_hours=10.0)]
    m = [dict(size="160m", context=8192, attention="sigmoid", world_size=1, tokens_per_s=1000.0,
              date="2026-11-28T15:58:56+00:00"),
         dict(size="160m", context=8192, attention="sigmoid", world_size=4, tokens_per_s_per_gpu=1000.0,
              tokens_per_s=4000.0, date="2026-11-28T16:09:54+00:00"),
         dict(size="160m", context=8192, attention="sigmoid", world_size=4, tokens_per_s_per_gpu=1500.0,
              tokens_per_s=6000.0, date="2026-11-28T20:27:54+00:00"),
         dict(size="160m", context=8192, attention="sigmoid", world_size=1, tokens_per_s=1600.0,
              date="2026-11-28T20:00:00+00:00")]
    (row,) = project.apply_scaling(r, m, gpus=16)
    assert row["dp_efficiency"] == pytest.approx(1500.0 / 1600.0)


def _sigattn_api() -> bool:
    try:
        return hasattr(importlib.import_module("sigattn"), "sigmoid_attention_varlen")
    except ImportError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["softmax", pytest.param("sigmoid", marks=pytest.mark.skipif(
    not _sigattn_api(), reason="sigattn.sigmoid_attention_varlen (public API) not available yet"))])
def test_measure_smoke_on_cpu(tmp_path, monkeypatch, attention):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    out = tmp_path / "m"
    assert project.main(["--sizes", "tiny", "--context", "32", "--cells", "1e4", "--gpus", "2", "--measure",
                         "--warmup-steps", "1", "--timed-steps", "2", "--batch-size", "4", "--attention", attention,
                         "--out", str(out)]) == 0
    (row,) = json.loads((out / "projection.json").read_text())["rows"]
    assert row["throughput"] == "measured" and row["measured_batch"] == 4 and row["measured_steps"] == 2
    assert row["cells_per_s_per_gpu"] > 0 and row["gpu_hours"] == pytest.approx(1e4 / row["cells_per_s_per_gpu"] / 3600)
    assert 0.8 * 32 <= row["measured_tokens_per_cell"] <= 32  # synthetic cells fill the context
    assert os.path.getsize(out / "projection.png") > 0


def test_measure_leaves_no_distributed_env(tmp_path, monkeypatch):
    """Trainers built in-process must not leak MASTER_PORT & co. into later submissions (sbatch exports env)."""
    from launch.job import DIST_VARS

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    for k in DIST_VARS:
        monkeypatch.delenv(k, raising=False)
    project.project(["tiny"], [16], cells=1e3, gpus=1, measure_steps=(1, 1), attentions=("softmax",), batch_size=2)
    assert not any(k in os.environ for k in DIST_VARS)


def test_measure_row_that_does_not_fit_is_kept(tmp_path, monkeypatch):
    """A size × context that runs out of memory even at micro-batch 1 becomes a row saying so; the rest go on."""
    from launch import measure as measure_mod

    def fake_measure(size, context, attention, **kw):
        if context == 64:
            raise measure_mod.DoesNotFit(f"{size}/{context}/{attention}: out of memory at micro-batch 1")
        return measure_mod.Measurement(size=size, context=context, attention=attention, batch_size=2,
                                       cells_per_s=10.0 if attention == "sigmoid" else 8.0, tokens_per_s=320.0,
                                       tokens_per_cell=32.0, mem_gb=1.0, steps=2)

    monkeypatch.setattr(measure_mod, "measure", fake_measure)
    rows = project.project(["tiny"], [32, 64], cells=1e3, gpus=1, measure_steps=(1, 2))
    fits = [r for r in rows if r["context"] == 32]
    oom = [r for r in rows if r["context"] == 64]
    assert len(fits) == 2 and len(oom) == 2
    assert all(r["gpu_hours"] is None and r["memory"].startswith("out of memory") for r in oom)
    assert oom[0]["sigmoid_saving_pct"] is None
    sig = next(r for r in fits if r["attention"] == "sigmoid")
    assert sig["sigmoid_saving_pct"] == pytest.approx(20.0)
    meta = {"cells": 1e3, "epochs": 1.0, "gpus": 1, "throughput": "measured", "note": ""}
    paths = project.write_outputs(rows, tmp_path, meta)
    assert "out of memory at micro-batch 1" in paths[0].read_text() and paths[3].stat().st_size > 0


def test_measure_keeps_each_row_on_disk_as_it_is_measured(tmp_path, monkeypatch):
    """A --measure run killed part-way (a lent GPU's time limit) keeps the rows it finished in rows.jsonl."""
    from launch import measure as measure_mod
    calls = []

    def fake_measure(size, context, attention, **kw):
        calls.append(attention)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what a timeout's signal looks like to the loop
        return measure_mod.Measurement(size=size, context=context, attention=attention, batch_size=2,
                                       cells_per_s=10.0, tokens_per_s=320.0, tokens_per_cell=32.0, mem_gb=1.0,
                                       steps=2)

    monkeypatch.setattr(measure_mod, "measure", fake_measure)
    out = tmp_path / "m"
    with pytest.raises(KeyboardInterrupt):
        project.main(["--sizes", "tiny", "--context", "32", "64", "--gpus", "1", "--measure", "--out", str(out)])
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert [(r["context"], r["attention"]) for r in rows] == [(32, "sigmoid"), (32, "softmax")]
    assert all(r["cells_per_s_per_gpu"] == 10.0 for r in rows) and not (out / "projection.json").exists()


def test_memory_plan_picks_the_fastest_setting_that_fits():
    from launch.memory import GiB, plan, relative_speed
    m = model_size("1.4b")
    # one 80 GB card at 8K: ZeRO-0 without checkpointing holds 3 cells (24K tokens) and beats the preset's ZeRO-3 +
    # full checkpointing (recompute = +1/3 of the matmuls)
    p = plan(m, 8192, 1, 80.0)
    assert (p.zero_stage, p.activation_checkpointing, p.micro_batch) == (0, False, 3)
    assert p.memory_gib <= 80 * 0.9 and p.memory_gib + feasibility(m, 8192, 0, 1).act_gib_per_cell > 80 * 0.9
    assert p.relative_speed > relative_speed(3, True, 4 * 8192)
    speeds = [c[3] for c in p.candidates]
    assert speeds == sorted(speeds, reverse=True) and len(p.candidates) >= 4
    # a smaller card: checkpointing (or ZeRO sharding) becomes necessary, and the plan still fits
    for gb in (24, 40):
        q = plan(m, 8192, 8, gb)
        used = model_state_bytes(m.n_params, q.zero_stage, 8) / GiB + q.micro_batch * (
            feasibility(m, 8192, q.zero_stage, 8, gb).act_gib_per_cell_ckpt if q.activation_checkpointing
            else feasibility(m, 8192, q.zero_stage, 8, gb).act_gib_per_cell)
        assert used <= gb * 0.9 and q.micro_batch >= 1
    assert plan(m, 8192, 8, 24).zero_stage >= 1          # 16 B/param of 1.4B (21 GiB) leave no room on 24 GB
    # context parallelism: each GPU holds s/P tokens of a cell, so at 32K on 4 GPUs no checkpointing is needed
    assert not plan(m, 32768, 4, 80.0, context_parallel=4).activation_checkpointing
    with pytest.raises(ValueError, match="does not fit in 8 GiB"):
        plan(m, 8192, 1, 8.0)
    # 160m: nothing to save memory on, the micro-batch is capped at MAX_MICRO_TOKENS tokens
    small = plan(model_size("160m"), 2048, 1, 80.0)
    assert (small.zero_stage, small.activation_checkpointing, small.micro_batch) == (0, False, 32)


def test_memory_plan_weighs_selective_checkpointing():
    from launch.memory import (GiB, checkpointed_layers, checkpointing_value, checkpointing_words, cp_comm_bytes,
                               plan, relative_speed)
    m = model_size("1.4b")
    d, L, s = m.d_model, m.n_layers, 8192
    assert [checkpointed_layers(L, c) for c in (False, True, 1, 2, 4)] == [0, L, L, 13, 7]
    head = s * (2 * d + 4 * 51)
    assert activation_bytes(m, 1, s, 2) == pytest.approx(2 * d * 13 * s + 32 * d * 13 * s + 32 * d * s + head)
    sizes = [activation_bytes(m, 1, s, c) for c in (True, 2, 4, False)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    assert cp_comm_bytes(m, 4, 2) == pytest.approx(cp_comm_bytes(m, 4) * (16 * L + 8 * 13) / (16 * L))
    # 1.4b at 32K on one 80 GB card: no checkpointing does not fit a cell, full recomputes every layer; checkpointing
    # every 4th layer fits one cell and is modelled fastest
    p = plan(m, 32768, 1, 80.0)
    assert (p.zero_stage, p.activation_checkpointing, p.micro_batch) == (0, 4, 1)
    assert model_state_bytes(m.n_params, 0, 1) + activation_bytes(m, 1, 32768, False) > 80 * GiB * 0.9
    assert p.relative_speed > max(c[3] for c in p.candidates if c[1] is True)
    assert p.relative_speed == pytest.approx(relative_speed(0, 7 / L, 32768))
    assert (checkpointing_value(4), checkpointing_value(True), checkpointing_value(False)) == ("4", "true", "false")
    assert checkpointing_words(4) == "selective (every 4th layer)" and checkpointing_words(True) == "full"
    # with one layer "every 2nd/4th" is full checkpointing: the plan does not list them again
    one = model_size("tiny", overrides=["model.n_layers=1"])
    assert {c[1] for c in plan(one, 512, 1, 80.0).candidates} == {False, True}


def test_project_measures_with_the_plan(monkeypatch):
    from launch import measure as measure_mod
    seen = []

    def fake_measure(size, context, attention, **kw):
        seen.append(kw)
        return measure_mod.Measurement(size=size, context=context, attention=attention, batch_size=kw["batch_size"],
                                       cells_per_s=4.0, tokens_per_s=4.0 * context, tokens_per_cell=float(context),
                                       mem_gb=60.0, steps=2)

    monkeypatch.setattr(measure_mod, "measure", fake_measure)
    rows = project.project(["1.4b"], [8192], cells=1e6, gpus=1, measure_steps=(1, 2), attentions=("sigmoid",),
                           settings="plan")
    assert seen[0]["batch_size"] == 3
    assert seen[0]["extra_overrides"] == ["run.zero_stage=0", "model.activation_checkpointing=false"]
    assert rows[0]["zero_stage"] == 0 and rows[0]["settings"] == "plan" and rows[0]["plan_micro_batch"] == 3
    preset = project.project(["1.4b"], [8192], cells=1e6, gpus=1, measure_steps=(1, 2), attentions=("sigmoid",))
    assert seen[1]["extra_overrides"] == [] and preset[0]["zero_stage"] == 3 and preset[0]["plan_zero_stage"] == 0
    with pytest.raises(ValueError, match="settings"):
        project.project(["1.4b"], [8192], cells=1e6, gpus=1, settings="auto")

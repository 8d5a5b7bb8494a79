"""training.trainer in-process on real PBMC 3k shards: ZeRO 1/2/3, clipping off, accumulation, NaN policy,
request_stop + resume, inference loading, and a short convergence run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from trainer_helpers import ATTENTION_KINDS, by_step, skip_unless_sigattn, tiny_overrides
from training.config import load_config


pytestmark = pytest.mark.usefixtures("clean_streaming_shm")   # the corpus fixture: tests/training/conftest.py


def make_trainer(corpus, run_dir, callbacks=(), **extra):
    from training.trainer import Trainer
    return Trainer(load_config(None, tiny_overrides(corpus, run_dir, **extra)), callbacks=callbacks)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b):
    """Two run folders trained the same: losses, gradient norms and cells per step, bitwise."""
    for name, key in (("metrics.jsonl", "loss"), ("metrics.jsonl", "grad_norm"), ("cells_rank0.jsonl", "cell_ids")):
        assert by_step(a / name, key) == by_step(b / name, key), key


@pytest.mark.parametrize("stage, clip, gas, ac", [(1, 1.0, 1, False), (2, None, 1, 2), (3, 0.5, 2, True)])  # ac 2: selective
def test_zero_stages_train_checkpoint_and_load_for_inference(corpus, tmp_path, stage, clip, gas, ac, monkeypatch):
    import logging

    from deepspeed.utils import logger as ds_logger

    from training.checkpoint import latest_tag, load_for_inference
    seen = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda rec: seen.append(rec.getMessage())
    ds_logger.addHandler(handler)
    try:
        t = make_trainer(corpus, tmp_path, **{"run.zero_stage": stage, "optim.grad_clip": clip, "optim.grad_accum": gas,
                                              "model.activation_checkpointing": ac, "run.log_cell_ids": True})
    finally:
        ds_logger.removeHandler(handler)
    assert not [m for m in seen if "learning rate" in m], seen  # scheduler built at iteration 0, not −1
    assert t.train() == "finished" and t.step == 4
    recs = records(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    cells = by_step(tmp_path / "cells_rank0.jsonl", "cell_ids")
    for r in recs:
        # one step per logged window: tokens_per_step · (cells / tokens) is the step's cells
        assert r["tokens_per_step"] * r["cells_per_s"] / r["tokens_per_s"] == pytest.approx(len(cells[r["step"]]))
        assert all(r[k] is not None for k in ("loss", "grad_norm", "lr", "tokens_per_s", "cells_per_s", "mem_gb"))
        assert torch.isfinite(torch.tensor(r["loss"])) and r["grad_norm"] > 0 and r["mfu"] is None
        assert r["cells_per_s"] > 0 and r["tokens_per_s"] > r["cells_per_s"]
        assert r["tokens_per_step"] > 0 and 1 < r["seq_len"] <= t.cfg.data.context_length
    assert recs[0]["lr"] == 0.0 and recs[1]["lr"] == pytest.approx(3e-3 / 2)      # linear warm-up over 2 steps
    assert recs[3]["lr"] == pytest.approx(3e-3 * 0.1)                             # cosine floor at max_steps
    assert latest_tag(tmp_path / "checkpoints") == "step_00000004"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]
    model, cfg, tok = load_for_inference(tmp_path)
    assert cfg.run.zero_stage == stage and tok.n_tokens == cfg.model.n_tokens
    batch = next(iter(t.loader))
    with torch.no_grad():
        live = t.engine.module.eval().embed(batch)
    torch.testing.assert_close(model.embed(batch), live.float())
    # inside cached_weights() each checkpoint's shards are consolidated once; every call still gets its own model
    import deepspeed.utils.zero_to_fp32 as z2f

    from training.checkpoint import cached_weights
    real, calls = z2f.get_fp32_state_dict_from_zero_checkpoint, []
    monkeypatch.setattr(z2f, "get_fp32_state_dict_from_zero_checkpoint",
                        lambda d, tag: calls.append(tag) or real(d, tag=tag))
    with cached_weights():
        a = load_for_inference(tmp_path)[0]
        b = load_for_inference(tmp_path / "checkpoints" / "step_00000004")[0]
        a.to(torch.bfloat16)                                                   # a caller's cast stays its own
        old = load_for_inference(tmp_path / "checkpoints" / "step_00000002")[0]
    assert calls == ["step_00000004", "step_00000002"]
    with torch.no_grad():
        torch.testing.assert_close(b.embed(batch), model.embed(batch), rtol=0, atol=0)
        assert not torch.equal(old.embed(batch), model.embed(batch))
    load_for_inference(tmp_path)
    assert calls == ["step_00000004", "step_00000002", "step_00000004"]       # no cache outside the block


def _nan_loss_once(module):
    """Make the model's next forward return a NaN loss (once; the forward after it is the real one again)."""
    orig = module.forward

    def nan_once(*a, **k):
        module.forward = orig
        loss, n = orig(*a, **k)
        return loss * float("nan"), n
    module.forward = nan_once


def test_nan_loss_skip_policy_skips_the_step_and_keeps_going(corpus, tmp_path):
    state = {}

    def poison(trainer, record):
        if record["step"] == 2:                                # make step 3's loss NaN, once
            module = trainer.engine.module
            _nan_loss_once(module)
            state["params"] = [p.detach().clone() for p in module.parameters()]
        if record["step"] == 3:
            state["after"] = [p.detach().clone() for p in trainer.engine.module.parameters()]

    t = make_trainer(corpus, tmp_path, callbacks=[poison], **{"run.nan_policy": "skip", "run.max_steps": 5})
    assert t.train() == "finished" and t.skipped_steps == 1
    recs = records(tmp_path)
    assert recs[2]["loss"] is None and recs[2]["skipped"] and recs[4]["skipped_steps"] == 1
    assert all(r["loss"] is not None for i, r in enumerate(recs) if i != 2)
    assert all(torch.equal(a, b) for a, b in zip(state["params"], state["after"]))   # no update applied


@pytest.mark.parametrize("log_every", [1, 2])          # step 3 logged, or not (no host read of its own)
def test_nan_loss_stop_policy_keeps_last_good_checkpoint(corpus, tmp_path, log_every):
    from training.checkpoint import latest_tag
    from training.trainer import NonFiniteError

    def poison(trainer, record):
        if record["step"] == 2:
            with torch.no_grad():
                trainer.engine.module.head_out.bias.fill_(float("inf"))

    t = make_trainer(corpus, tmp_path, callbacks=[poison], **{"run.nan_policy": "stop", "run.max_steps": 6,
                                                                "run.log_every": log_every})
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 3.*Last good checkpoint: .*step_00000002"):
        t.train()
    assert latest_tag(tmp_path / "checkpoints") == "step_00000002"
    assert not (tmp_path / "checkpoints" / "step_00000003").exists()


# One micro-batch of a 2-micro-batch step has a NaN loss, and the step is not logged: its backward still runs
# (the gradients turn NaN on the device), the boundary drops the update. ZeRO 1: DeepSpeed's check; ZeRO 0 fp32:
# the trainer's, which must keep DeepSpeed's micro-step count on the accumulation boundary.
@pytest.mark.parametrize("stage", [1, 0])
def test_nan_loss_in_one_micro_batch_of_an_unlogged_step_is_skipped(corpus, tmp_path, stage):
    state = {"records": []}

    def poison(trainer, record):
        state["records"].append(record)
        module = trainer.engine.module
        if record["step"] == 2:                                # the first micro-batch of step 3
            _nan_loss_once(module)
            state["before"] = [p.detach().clone() for p in module.parameters()]
        if record["step"] == 3:
            state["after"] = [p.detach().clone() for p in module.parameters()]

    t = make_trainer(corpus, tmp_path, callbacks=[poison], **{
        "run.nan_policy": "skip", "run.max_steps": 5, "run.log_every": 2, "optim.grad_accum": 2,
        "run.zero_stage": stage, "run.ckpt_every": 0})
    assert t.train() == "finished" and t.skipped_steps == 1
    assert t.engine.micro_steps == 5 * 2                     # DeepSpeed's accumulation boundary stayed aligned
    assert state["records"][2]["skipped"] and "loss" not in state["records"][2]     # unlogged: nothing read
    assert all(torch.equal(a, b) for a, b in zip(state["before"], state["after"]))   # no update applied
    assert not all(torch.equal(a, b) for a, b in zip(state["after"], t.engine.module.parameters()))  # then trains
    recs = records(tmp_path)
    assert [r["step"] for r in recs] == [2, 4, 5] and [r["skipped_steps"] for r in recs] == [0, 1, 1]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in recs)


def test_request_stop_saves_and_resume_continues(corpus, tmp_path):
    from training.checkpoint import latest_tag
    t = make_trainer(corpus, tmp_path, callbacks=[lambda tr, rec: rec["step"] == 3 and tr.request_stop()],
                     **{"run.max_steps": 6, "run.ckpt_every": 100})
    # The flag set after step 3 is all-reduced at the start of step 4, which ends with a collective save.
    assert t.train() == "stopped" and t.step == 4
    assert latest_tag(tmp_path / "checkpoints") == "step_00000004"
    t2 = make_trainer(corpus, tmp_path, **{"run.max_steps": 6, "run.ckpt_every": 100})
    assert t2.step == 4
    assert t2.train() == "finished"
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("attention", ATTENTION_KINDS)
def test_loss_drops_on_real_pbmc_tokens(corpus, tmp_path, attention):
    skip_unless_sigattn(attention)
    t = make_trainer(corpus, tmp_path, **{"model.attention": attention, "run.max_steps": 30, "run.ckpt_every": 1000, "optim.lr": 1e-2,
                                          "optim.warmup_steps": 3, "data.batch_size": 16, "model.d_model": 64})
    t.train()
    losses = [r["loss"] for r in records(tmp_path)]
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    print(f"loss {first:.3f} → {last:.3f}")
    assert last < first - 0.1, losses


# fp32 + ZeRO 0 is DeepSpeed's plain-optimizer path (no norm, no check); bf16 + 0 its bf16 wrapper; + 1 BF16_Optimizer.
@pytest.mark.parametrize("policy, stage, precision", [(p, z, "fp32") for p in ("skip", "stop") for z in (0, 1)]
                         + [("skip", 0, "bf16"), ("skip", 1, "bf16")])
def test_nan_gradient_with_finite_loss(corpus, tmp_path, policy, stage, precision):
    from training.trainer import NonFiniteError
    state = {}

    def poison(trainer, record):
        module = trainer.engine.module
        if record["step"] == 2:                                 # step 3: finite loss, NaN gradient
            state["hook"] = module.head_dense.weight.register_hook(lambda g: g * float("nan"))
            state["before"] = [p.detach().clone() for p in module.parameters()]
        if record["step"] == 3:
            state["hook"].remove()
            state["after"] = [p.detach().clone() for p in module.parameters()]

    t = make_trainer(corpus, tmp_path, callbacks=[poison], **{"run.nan_policy": policy, "run.max_steps": 5,
                                                                "run.zero_stage": stage, "run.precision": precision})
    if policy == "stop":
        with pytest.raises(NonFiniteError, match="non-finite gradient norm at step 3"):
            t.train()
        return
    assert t.train() == "finished" and t.skipped_steps == 1
    recs = records(tmp_path)
    assert recs[2]["skipped"] and recs[2]["skipped_steps"] == 1 and not recs[1].get("skipped") and all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    assert all(torch.equal(a, b) for a, b in zip(state["before"], state["after"]))    # update not applied
    assert all(torch.isfinite(p).all() for p in t.engine.module.parameters())
    assert all(r["grad_norm"] > 0 for i, r in enumerate(recs) if i != 2)              # logged on every path
    assert recs[2]["grad_norm"] is None or not math.isfinite(recs[2]["grad_norm"])


def test_close_releases_the_engine(corpus, tmp_path):
    """A closed trainer's model parameters are freed (DeepSpeed's hooks would otherwise keep the engine alive)."""
    import gc
    import weakref

    with make_trainer(corpus, tmp_path, **{"run.max_steps": 1, "run.ckpt_every": 0}) as t:
        assert t.train() == "finished"
        param = weakref.ref(next(t.engine.module.parameters()))
    assert t.engine is None
    del t
    gc.collect()
    assert param() is None


def test_a_trainer_after_shutdown_gets_a_fresh_process_group(corpus, tmp_path):
    """shutdown() between two trainers in one process (recipes, notebooks): DeepSpeed's cached groups go with the
    process group, so the second trainer builds new ones instead of failing with "Group ... is not registered"."""
    from training.distributed import shutdown
    with make_trainer(corpus, tmp_path / "a", **{"run.max_steps": 1, "run.ckpt_every": 0}) as t:
        assert t.train() == "finished"
    shutdown()
    assert not torch.distributed.is_initialized()
    with make_trainer(corpus, tmp_path / "b", **{"run.max_steps": 1, "run.ckpt_every": 0}) as t:
        assert t.train() == "finished" and torch.distributed.is_initialized()


@pytest.mark.slow
def test_compiled_trainer_matches_eager_losses(corpus, tmp_path):
    """run.compile=true (regional torch.compile of the blocks) gives the eager run's per-step losses."""
    losses = {}
    for mode in ("eager", "compile"):
        t = make_trainer(corpus, tmp_path / mode, **{"run.max_steps": 3, "run.compile": mode == "compile"})
        assert t.train() == "finished"
        if mode == "compile":
            assert all(hasattr(b.forward, "_torchdynamo_orig_callable") for b in t.engine.module.blocks)
        t.close()
        losses[mode] = [r["loss"] for r in records(tmp_path / mode)]
    assert losses["compile"] == pytest.approx(losses["eager"], rel=1e-5)
def test_checkpoint_on_the_last_step_of_an_epoch_resumes_into_the_next(corpus, tmp_path):
    """A save on the epoch's last (partial) batch — a pre-emption or ckpt_every landing there — resumes with
    exactly the batches an uninterrupted run sees: the next epoch from its start (issue 20.1)."""
    n_train = json.loads((Path(corpus) / "manifest.json").read_text())["split"]["n_cells"]["val"]  # a small split
    bs = 32
    k = math.ceil(n_train / bs)                        # step k holds the epoch's last cells
    assert n_train % bs                                 # ... in a partial batch
    extra = {"data.split": "val", "data.batch_size": bs, "run.max_steps": k + 3, "run.ckpt_every": 100,
             "run.log_cell_ids": True}
    ref = make_trainer(corpus, tmp_path / "ref", **extra)
    assert ref.train() == "finished"
    ref.close()
    cut = make_trainer(corpus, tmp_path / "cut", callbacks=[lambda tr, rec: rec["step"] == k - 1 and tr.request_stop()],
                       **extra)
    assert cut.train() == "stopped" and cut.step == k
    cut.close()
    resumed = make_trainer(corpus, tmp_path / "cut", **extra)
    assert resumed.step == k
    assert resumed.train() == "finished" and resumed.step == k + 3
    resumed.close()

    assert_same_run(tmp_path / "cut", tmp_path / "ref")
    cells = by_step(tmp_path / "ref" / "cells_rank0.jsonl", "cell_ids")
    assert len(cells[k]) == n_train % bs and len(cells[k + 1]) == bs
    epoch0 = [c for s in range(1, k + 1) for c in cells[s]]
    assert len(epoch0) == len(set(epoch0)) == n_train                 # the first epoch: every train cell once


def test_resume_refuses_overrides_that_change_the_checkpoint_and_records_the_others(corpus, tmp_path):
    """Each checkpoint keeps the config it was trained with; a resume that would change its tokenizer, corpus,
    objective or model fails naming the keys and writes nothing; max_steps & co. are allowed and recorded (20.4)."""
    import dataclasses
    import shutil

    from training.checkpoint import ResumeConfigError, check_resume, load_for_inference, trained_config
    t = make_trainer(corpus, tmp_path, **{"run.max_steps": 2, "run.ckpt_every": 2})
    assert t.train() == "finished"
    cfg2 = t.cfg
    t.close()
    assert trained_config(tmp_path / "checkpoints" / "step_00000002")[0] == cfg2
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for key, value in [("run.mask_ratio", 0.3), ("run.seed", 7), ("data.gene_selection", "top"),
                       ("data.context_length", 48), ("model.d_model", 64), ("model.attention", "sigmoid")]:
        with pytest.raises(ResumeConfigError, match=rf"cannot resume .*step_00000002.*{key}: "):
            make_trainer(corpus, tmp_path, **{"run.max_steps": 4, key: value})
    moved = tmp_path.parent / f"{tmp_path.name}_other_corpus"
    shutil.copytree(corpus, moved, ignore=shutil.ignore_patterns("mds"))
    (moved / "manifest.json").write_text((moved / "manifest.json").read_text().replace('"fingerprint": "', '"fingerprint": "x'))
    with pytest.raises(ResumeConfigError, match=r"data\.mds: .*fingerprint"):
        make_trainer(corpus, tmp_path, **{"data.mds": moved})          # a different corpus (by its fingerprint)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before           # nothing written
    same = tmp_path.parent / f"{tmp_path.name}_same_corpus"
    shutil.copytree(corpus, same, ignore=shutil.ignore_patterns("mds"))                   # the corpus, moved
    moved_cfg = dataclasses.replace(cfg2, data=dataclasses.replace(cfg2.data, mds=str(same)))
    assert check_resume(tmp_path / "checkpoints", moved_cfg) == {"data.mds": (corpus, str(same))}

    t = make_trainer(corpus, tmp_path, **{"run.max_steps": 4, "run.log_every": 2, "optim.lr": 1e-3, "run.prefetch": False})
    assert t.step == 2 and t.resume_changes == {"run.max_steps": (2, 4), "run.log_every": (1, 2),
                                                "optim.lr": (3e-3, 1e-3), "run.prefetch": (True, False)}
    assert t.train() == "finished"
    t.close()
    resumes = [json.loads(x) for x in (tmp_path / "resumes.jsonl").read_text().splitlines()]
    assert resumes == [{"tag": "step_00000002", "time": resumes[0]["time"],
                        "changed": {"run.max_steps": [2, 4], "run.log_every": [1, 2], "optim.lr": [3e-3, 1e-3],
                                    "run.prefetch": [True, False]}}]
    _, cfg_old, _ = load_for_inference(tmp_path / "checkpoints" / "step_00000002")
    _, cfg_new, _ = load_for_inference(tmp_path)
    assert cfg_old == cfg2 and cfg_old.run.max_steps == 2 and cfg_new.run.max_steps == 4 and cfg_new.optim.lr == 1e-3


def test_the_look_ahead_changes_when_the_host_works_not_what_is_trained(corpus, tmp_path):
    """run.prefetch masks and copies the next micro-batch during this one's backward. Same losses, gradient norms and
    cells as without it, also across a stop-and-resume: a step that saves takes no batch ahead, so the loader position
    a checkpoint records counts only trained batches (with a batch taken ahead, the resumed run would skip it)."""
    extra = {"optim.grad_accum": 2, "run.max_steps": 5, "run.ckpt_every": 2, "run.log_cell_ids": True}
    off = make_trainer(corpus, tmp_path / "off", **extra, **{"run.prefetch": False})
    assert off.train() == "finished"
    off.close()
    cut = make_trainer(corpus, tmp_path / "cut", callbacks=[lambda tr, rec: rec["step"] == 2 and tr.request_stop()],
                       **extra)
    assert cut.train() == "stopped" and cut.step == 3            # the stop agreed at step 3's start: saved after it
    cut.close()
    on = make_trainer(corpus, tmp_path / "cut", **extra)
    assert on.step == 3 and on.train() == "finished"
    on.close()

    assert_same_run(tmp_path / "cut", tmp_path / "off")
    cells = by_step(tmp_path / "off" / "cells_rank0.jsonl", "cell_ids")
    seen = [c for s in range(1, 6) for c in cells[s]]
    assert len(seen) == len(set(seen))                            # none twice (the first epoch), none skipped

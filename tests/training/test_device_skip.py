"""``optim.device_skip``: training.guarded_adamw clips and skips non-finite updates on the device, DeepSpeed's bf16
ZeRO-1/2 step reads nothing on the host; same training as DeepSpeed's own check when nothing is non-finite, and the
NaN policies act at the next read (a logged step or a save)."""

from __future__ import annotations

import math

import pytest
import torch

from test_trainer import _nan_loss_once, make_trainer, records
from training.guarded_adamw import GuardedAdamW

BF16 = {"run.precision": "bf16", "run.zero_stage": 1}


pytestmark = pytest.mark.usefixtures("clean_streaming_shm")   # the corpus fixture: tests/training/conftest.py


def _params(rng_seed: int):
    g = torch.Generator().manual_seed(rng_seed)
    ps = [torch.nn.Parameter(torch.randn(7, 5, generator=g)), torch.nn.Parameter(torch.randn(3, generator=g))]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 3
    return ps


def _ds_style_step(opt: torch.optim.Optimizer) -> None:
    """Step one parameter group at a time, as DeepSpeed's ZeRO-1/2 optimizer does."""
    groups = opt.param_groups
    for g in groups:
        opt.param_groups = [g]
        opt.step()
    opt.param_groups = groups


@pytest.mark.parametrize("clip", [None, 0.5, 1e6])
def test_clips_like_deepspeed_and_steps_like_adamw(clip):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    ours, ref = _params(seed), _params(seed)
    norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ours]))
    opt = GuardedAdamW([{"params": ours[:1], "weight_decay": 0.1}, {"params": ours[1:], "weight_decay": 0.0}],
                       clip=clip, lr=0.05, betas=(0.9, 0.95), eps=1e-8)
    opt.norm_source = lambda: norm
    _ds_style_step(opt)
    if clip:                                                   # DeepSpeed: g / max(1, (‖g‖ + 1e-6) / clip)
        for p in ref:
            p.grad /= max(1.0, (float(norm) + 1e-6) / clip)
    torch.optim.AdamW([{"params": ref[:1], "weight_decay": 0.1}, {"params": ref[1:], "weight_decay": 0.0}],
                      lr=0.05, betas=(0.9, 0.95), eps=1e-8, foreach=False).step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert int(opt.skipped) == 0 and all(float(opt.state[p]["step"]) == 1 for p in ours)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])     # −1: DeepSpeed's invalid-norm sentinel
def test_a_bad_norm_changes_nothing_and_counts_once_per_update(bad):
    ps = _params(1)
    opt = GuardedAdamW([{"params": ps[:1]}, {"params": ps[1:]}], clip=1.0, lr=0.05)
    good = torch.tensor(2.0)
    opt.norm_source = lambda: good
    _ds_style_step(opt)                                         # one good update: moments exist
    before = [p.detach().clone() for p in ps]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in ps]
    worse = torch.tensor(bad)
    opt.norm_source = lambda: worse
    _ds_style_step(opt)                                         # two groups, one update
    assert all(torch.equal(a, b) for a, b in zip(before, ps))
    for p, s in zip(ps, state):
        assert all(torch.equal(opt.state[p][k], v) for k, v in s.items())   # moments and step count too
    assert int(opt.skipped) == 1
    opt.norm_source = lambda: torch.tensor(bad)                 # the next update's norm: a new tensor
    _ds_style_step(opt)
    assert int(opt.skipped) == 3                                # each call a new tensor: counted per call


def test_without_a_norm_source_it_says_so():
    opt = GuardedAdamW(_params(2), clip=None, lr=0.1)
    with pytest.raises(RuntimeError, match="norm_source is not set"):
        opt.step()


def test_needs_bf16_zero_1_or_2(corpus, tmp_path):
    with pytest.raises(ValueError, match="optim.device_skip needs bf16 with ZeRO stage 1 or 2.*fp32 with stage 1"):
        make_trainer(corpus, tmp_path, **{"optim.device_skip": True})


@pytest.mark.parametrize("stage", [1, 2])
def test_trains_like_deepspeeds_own_check_and_clipping(corpus, tmp_path, stage):
    """Clipping active (0.05 against norms ~1): the same losses and norms as DeepSpeed's clipping and check."""
    runs = {}
    for skip in (False, True):
        d = tmp_path / str(skip)
        t = make_trainer(corpus, d, **{**BF16, "run.zero_stage": stage, "optim.grad_clip": 0.05,
                                       "optim.device_skip": skip, "run.max_steps": 5, "run.ckpt_every": 0})
        assert t.train() == "finished"
        runs[skip] = records(d)
    for a, b in zip(runs[False], runs[True]):
        assert a["grad_norm"] > 0.05                                           # the clip acts on every step
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=2e-2)
    assert runs[True][-1]["loss"] < runs[True][0]["loss"]


def test_nan_loss_of_an_unlogged_step_is_skipped_and_counted_at_the_next_logged_step(corpus, tmp_path):
    state = {}

    def poison(trainer, record):
        module = trainer.engine.module
        if record["step"] == 2:                                 # step 3 (not logged) gets a NaN loss
            _nan_loss_once(module)
            state["before"] = [p.detach().clone() for p in module.parameters()]
        if record["step"] == 3:
            state["after"] = [p.detach().clone() for p in module.parameters()]
            state["record3"] = dict(record)

    t = make_trainer(corpus, tmp_path, callbacks=[poison], **{
        **BF16, "optim.device_skip": True, "run.nan_policy": "skip", "run.max_steps": 6, "run.log_every": 2,
        "run.ckpt_every": 0})
    assert t.train() == "finished" and t.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(state["before"], state["after"]))   # no update applied
    assert "skipped" not in state["record3"]                                       # not read on step 3
    recs = records(tmp_path)
    assert [r["step"] for r in recs] == [2, 4, 6] and [r["skipped_steps"] for r in recs] == [0, 1, 1]
    assert recs[1]["skipped"] == 1 and all(math.isfinite(r["loss"]) for r in recs)  # step 4's own loss is fine
    assert all(torch.isfinite(p).all() for p in t.engine.module.parameters())


def test_stop_policy_reads_before_a_save_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    from training.checkpoint import latest_tag
    from training.trainer import NonFiniteError

    def poison(trainer, record):
        if record["step"] == 2:
            _nan_loss_once(trainer.engine.module)             # step 3: neither logged nor saved; step 4 saves

    t = make_trainer(corpus, tmp_path, callbacks=[poison], **{
        **BF16, "optim.device_skip": True, "run.nan_policy": "stop", "run.max_steps": 6, "run.log_every": 10,
        "run.ckpt_every": 2})
    with pytest.raises(NonFiniteError, match=r"skipped on the device\) in 1 of steps 3–4; .*step_00000002"):
        t.train()
    assert latest_tag(tmp_path / "checkpoints") == "step_00000002"
    assert not (tmp_path / "checkpoints" / "step_00000004").exists()


def test_stop_and_resume_trains_as_one_run(corpus, tmp_path):
    """The optimizer's state (fused AdamW under DeepSpeed's ZeRO-1) goes through a checkpoint: 2 + 2 steps equal 4."""
    kw = {**BF16, "optim.device_skip": True, "run.max_steps": 4, "run.ckpt_every": 2}
    one = make_trainer(corpus, tmp_path / "one", **kw)
    assert one.train() == "finished"
    one.close()
    first = make_trainer(corpus, tmp_path / "two", callbacks=[lambda tr, rec: rec["step"] == 1 and tr.request_stop()],
                         **kw)                             # the same schedule; stops (and saves) after step 2
    assert first.train() == "stopped" and first.step == 2
    first.close()
    second = make_trainer(corpus, tmp_path / "two", **kw)
    assert second.step == 2 and second.train() == "finished"
    a, b = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [(r["loss"], r["grad_norm"]) for r in a] == [(r["loss"], r["grad_norm"]) for r in b]

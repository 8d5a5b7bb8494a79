"""Issue 18.2: the training step reads no device value on the host when the step is not logged, and one when it is.

CPU: a ``TorchDispatchMode`` follows "device-side" tensors — the model's parameters, the tensors the trainer copies
with ``training.trainer.to_device``, and everything computed from them (gradients, loss, norms, all-reduced
vectors) — and counts each host read of one (``aten._local_scalar_dense``: ``.item()``, ``float()``, ``bool()``;
``.cpu()``, ``.tolist()``, ``.numpy()``) by the first caller outside torch: our code (``training/``) or
DeepSpeed's. GPU (``@pytest.mark.gpu``): the same steps run under ``torch.cuda.set_sync_debug_mode("error")``
except inside DeepSpeed's ``engine.step()``, whose optimizers read the global norm themselves."""

from __future__ import annotations

import json
import os
import sys
import weakref
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from trainer_helpers import REPO, restore_env, set_env

TRAINING = str(REPO / "training") + os.sep
TORCH = str(Path(torch.__file__).parent) + os.sep
HERE = str(Path(__file__).resolve())
LOG_EVERY, STEPS = 3, 6                  # steps 3 and 6 are logged, 1, 2, 4, 5 are not


@pytest.fixture(scope="module", autouse=True)
def _env():
    old = set_env()
    yield
    restore_env(old)


def _cfg(run_dir, **extra):
    from training.config import load_config
    base = {"model.preset": "tiny", "model.n_layers": 2, "model.d_model": 32, "model.n_heads": 4, "model.d_ff": 64,
            "model.attention": "softmax", "data.synthetic_vocab": 400, "data.synthetic_mean_genes": 30,
            "data.context_length": 61, "data.n_bins": 11, "data.batch_size": 3, "optim.lr": 3e-3,
            "optim.warmup_steps": 2, "run.max_steps": STEPS, "run.log_every": LOG_EVERY, "run.ckpt_every": 0,
            "run.progress": False, "run.tensorboard": False, "run.dir": str(run_dir)}
    base.update(extra)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


class DeviceReads(TorchDispatchMode):
    """Counts host reads of device-side tensors, per caller (``training`` or ``other``)."""

    def __init__(self):
        super().__init__()
        self._ids: dict[int, weakref.ref] = {}
        self.reads: list[tuple[str, str]] = []          # (who, "file:line what")

    def taint(self, t) -> None:
        if isinstance(t, torch.Tensor):
            i = id(t)
            self._ids[i] = weakref.ref(t, lambda _, i=i: self._ids.pop(i, None))

    def tainted(self, t) -> bool:
        r = self._ids.get(id(t))
        return r is not None and r() is t

    def read(self, what: str) -> None:
        f = sys._getframe(1)
        while f is not None and (f.f_code.co_filename.startswith(TORCH) or f.f_code.co_filename == HERE):
            f = f.f_back
        where = f"{f.f_code.co_filename}:{f.f_lineno} {what}" if f else what
        self.reads.append(("training" if f and f.f_code.co_filename.startswith(TRAINING) else "other", where))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device_in = any(self.tainted(t) for t in pytree.tree_leaves((args, kwargs)))
        if device_in and func is torch.ops.aten._local_scalar_dense.default:
            self.read("item")
        out = func(*args, **kwargs)
        if device_in:
            for t in pytree.tree_leaves(out):
                self.taint(t)
        return out


@pytest.fixture
def reads(monkeypatch):
    """An active-on-demand DeviceReads with the host-copy methods and ``training.trainer.to_device`` patched."""
    mode = DeviceReads()
    for name in ("cpu", "tolist", "numpy"):
        orig = getattr(torch.Tensor, name)

        def patched(self, *a, _orig=orig, _name=name, **k):
            if mode.tainted(self):
                mode.read(_name)
                with _disable_current_modes():          # on a GPU the host copy is a new, host-side tensor
                    out = _orig(self, *a, **k)
                    return out.clone() if isinstance(out, torch.Tensor) and out is self else out
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, patched)

    import training.trainer as trainer_mod
    to_device = getattr(trainer_mod, "to_device", None)
    if to_device is not None:
        def tainting(x, device):
            with _disable_current_modes():
                y = to_device(x, device).clone()         # the device copy is not the host tensor
            mode.taint(y)
            return y
        monkeypatch.setattr(trainer_mod, "to_device", tainting)
    return mode


def _run(mode: DeviceReads, cfg) -> dict[int, Counter]:
    """Train ``STEPS`` steps under ``mode``; return the reads of each step by caller."""
    from training.trainer import Trainer
    per_step, seen = {}, [0]

    def cut(trainer, record):
        new = mode.reads[seen[0]:]
        seen[0] = len(mode.reads)
        per_step[record["step"]] = Counter(who for who, _ in new)
        per_step[record["step"]]["where"] = [w for who, w in new if who == "training"]
        per_step[record["step"]]["deepspeed"] = sorted({w.split("site-packages/")[-1] for who, w in new if who == "other"})

    with Trainer(cfg, callbacks=[cut]) as t:
        for p in t.engine.module.parameters():
            mode.taint(p)
            mode.taint(getattr(p, "ds_tensor", None))   # ZeRO-3: the partition a parameter's data lives in
        for v in vars(t.engine.optimizer).values():     # DeepSpeed's flat fp32 / gradient buffers, made at init
            for x in pytree.tree_leaves(v) if isinstance(v, (list, tuple, dict)) else [v]:
                mode.taint(x)
        with mode:
            assert t.train() == "finished"
    return per_step


# ZeRO-1 fp32 (the CPU default; DeepSpeedZeroOptimizer) with accumulation, ZeRO-1 bf16 (DeepSpeedZeroOptimizer, the 160m
# preset), ZeRO-2 bf16 (400m/600m), ZeRO-3 bf16 with accumulation (1.4b), ZeRO-0 bf16 (DeepSpeed's bf16 wrapper):
# DeepSpeed checks the norm itself, we read nothing on an unlogged step. ZeRO-0 fp32 is DeepSpeed's plain-optimizer
# path: nothing there checks the norm, so the trainer reads it, once per step (its documented exception).
# With optim.device_skip (bf16 ZeRO-1/2, training.guarded_adamw) DeepSpeed reads nothing either: no read at all.
@pytest.mark.parametrize("stage, precision, gas, unlogged, device_skip", [
    (1, "fp32", 2, 0, False), (1, "bf16", 1, 0, False), (2, "bf16", 1, 0, False), (3, "bf16", 2, 0, False),
    (0, "bf16", 1, 0, False), (0, "fp32", 1, 1, False), (1, "bf16", 2, 0, True), (2, "bf16", 1, 0, True)])
def test_unlogged_steps_read_no_device_value(tmp_path, reads, stage, precision, gas, unlogged, device_skip):
    per_step = _run(reads, _cfg(tmp_path, **{"run.zero_stage": stage, "run.precision": precision,
                                             "optim.grad_accum": gas, "optim.device_skip": device_skip}))
    assert sorted(per_step) == list(range(1, STEPS + 1))
    for step, c in per_step.items():
        logged = step % LOG_EVERY == 0
        print(f"step {step} ({'logged' if logged else 'not logged'}): training {c['training']}, "
              f"DeepSpeed {c['other']} {c['where']} {c['deepspeed'] if step == 1 else ''}")
        assert c["training"] == (1 if logged else unlogged), (step, c["where"])
    if device_skip:
        assert all(c["other"] == 0 for c in per_step.values()), {s: c["deepspeed"] for s, c in per_step.items()}
    elif (stage, precision) != (0, "fp32"):     # DeepSpeed's own norm check is seen (and counted apart)
        assert all(c["other"] > 0 for c in per_step.values())
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [3, 6] and all(r["loss"] > 0 and r["grad_norm"] > 0 for r in recs)
    assert all(r["tokens_per_s"] > r["cells_per_s"] > 0 for r in recs)


@pytest.mark.gpu
@pytest.mark.parametrize("stage, device_skip", [(1, False), (2, False), (1, True), (2, True)])
def test_unlogged_cuda_steps_do_not_sync(tmp_path, stage, device_skip):
    """bf16 on CUDA under ``set_sync_debug_mode("error")`` for the unlogged steps after the first (2, 4, 5), except
    inside ``engine.step()`` (DeepSpeed's ZeRO-1/2 optimizer reads the overflow flag and the global norm there);
    with ``optim.device_skip`` inside it too (from step 2: step 1 builds the optimizer's state).
    ZeRO-2 runs without ``overlap_comm`` (DeepSpeed's default for stage 2), whose backward epilogue would
    synchronize; ZeRO-3 is left out for the same reason (its backward epilogue syncs its reduce stream)."""
    from training.trainer import Trainer
    state = {"mode": 0}

    def mode_for_next_step(trainer, record):          # the next step is unlogged: error on any sync
        nxt = record["step"] + 1
        state["mode"] = 0 if nxt % LOG_EVERY == 0 or nxt >= STEPS else 2
        torch.cuda.set_sync_debug_mode(state["mode"])

    try:
        with Trainer(_cfg(tmp_path, **{"run.zero_stage": stage, "run.precision": "bf16", "data.batch_size": 8,
                                       "optim.device_skip": device_skip}),
                     callbacks=[mode_for_next_step]) as t:
            ds_step = t.engine.step

            def step_tolerated(*a, **k):                # DeepSpeed's own reads, not ours
                torch.cuda.set_sync_debug_mode(0)
                try:
                    return ds_step(*a, **k)
                finally:
                    torch.cuda.set_sync_debug_mode(state["mode"])
            if not device_skip:
                t.engine.step = step_tolerated          # step 1 (NCCL and cuBLAS set-up) runs unchecked
            assert t.train() == "finished"
            assert next(iter(t.loader))["input_ids"].is_pinned()     # batches come page-locked
    finally:
        torch.cuda.set_sync_debug_mode(0)
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [3, 6] and all(r["loss"] > 0 and r["grad_norm"] > 0 for r in recs)

"""The DeepSpeed config dict derived from a :class:`training.config.Config`.

The optimizer (``torch.optim.AdamW``) is passed to ``deepspeed.initialize`` as an object (no JIT
Adam build); the LR schedule is DeepSpeed's ``WarmupCosineLR``: linear warm-up from 0 to ``lr`` over
``warmup_steps``, then ``lr·(r + (1−r)·(1+cos(π·t))/2)`` with r = ``min_lr_ratio`` and t the
fraction of the remaining steps. Update k (1-based) uses iteration k−1 (the scheduler is built at
iteration 0 — built "before it has started", at −1, it logs a warning and sets LR 0 — and the trainer
applies iteration 0 with ``scheduler.step(0)``): LR 0 at step 1, rising by ``lr/warmup_steps`` per step, then the cosine, which
reaches ``lr·min_lr_ratio`` at step ``max_steps``. ``gradient_clipping: 0`` means no clipping in DeepSpeed. With ``optim.device_skip`` DeepSpeed neither clips nor
checks the norm (``bf16.check_grad_overflow: false``): :class:`training.guarded_adamw.GuardedAdamW` does both.
DeepSpeed's throughput timer is off: it is on by default and calls ``torch.cuda.synchronize()`` at the start of
every forward and the end of every ``step()`` (``deepspeed.utils.timer.ThroughputTimer``); the trainer measures
tokens/s itself.
"""

from __future__ import annotations

from training.config import Config


def resolve_precision(cfg: Config, cuda: bool) -> str:
    p = cfg.run.precision
    return ("bf16" if cuda else "fp32") if p == "auto" else p


def deepspeed_config(cfg: Config, world_size: int, cuda: bool) -> dict:
    o, r = cfg.optim, cfg.run
    ds = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": o.grad_accum,
        "train_batch_size": cfg.data.batch_size * o.grad_accum * world_size,
        "gradient_clipping": float(o.grad_clip or 0.0),
        "zero_optimization": {"stage": r.zero_stage},
        "bf16": {"enabled": resolve_precision(cfg, cuda) == "bf16"},
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": r.max_steps,
                "warmup_num_steps": o.warmup_steps,
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": o.min_lr_ratio,
                "warmup_type": "linear",
                "last_batch_iteration": 0,  # not −1: that logs "get learning rate ... before it has started"
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "timers": {"throughput": {"enabled": False}},
    }
    if o.device_skip:   # training.guarded_adamw clips and skips on the device instead (no host read in step())
        ds["gradient_clipping"] = 0.0
        ds["bf16"]["check_grad_overflow"] = False
        ds["zero_allow_untested_optimizer"] = True     # DeepSpeed's ZeRO list has torch's AdamW, not subclasses
    return ds

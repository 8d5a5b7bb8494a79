"""AdamW that clips and skips a non-finite update on the device: DeepSpeed's ZeRO-1/2 bf16 step with no host read.

DeepSpeed 0.19's bf16 ZeRO-1/2 ``step()`` reads the overflow flag (``has_overflow``), the validity of the global norm
(``is_invalid_grad_norm``) and, with clipping, the clip norm's validity on the host: each read drains the GPU before
the update's kernels are queued, so the host's work in ``step()`` then runs with the GPU idle (H200, 160m @ 8K:
~48 ms of a ~450 ms step). With ``optim.device_skip`` the trainer turns DeepSpeed's check and clipping off
(``bf16.check_grad_overflow: false``, ``gradient_clipping: 0``) and this optimizer does both, on the global norm
DeepSpeed still computes as a device tensor (``_global_grad_norm``, set before it calls this ``step``):

    bad = ¬isfinite(‖g‖) ∨ ‖g‖ < 0               (DeepSpeed reports a non-finite group norm as −1)
    g ← g / max(1, (‖g‖ + 10⁻⁶) / clip)            (DeepSpeed's clipping; skipped when bad)
    fused AdamW with ``found_inf`` = bad           (when bad: no change to parameters, moments or step count)

``skipped`` counts bad updates on the device; the trainer reads it with its logged values and before a save. What
differs from DeepSpeed's host-side skip: the LR schedule still advances on a skipped step (DeepSpeed's does not).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class GuardedAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW(fused=True)`` plus on-device clipping and skipping (see the module docstring).

    ``norm_source``: returns the global gradient norm (a device tensor) of the update being made; set it after
    ``deepspeed.initialize`` (the norm lives in DeepSpeed's optimizer, built around this one). DeepSpeed calls
    ``step`` once per parameter group with the same norm tensor; the update is counted once.
    """

    def __init__(self, params, *, clip: float | None, **kwargs):
        super().__init__(params, fused=True, **kwargs)
        self.clip = float(clip or 0.0)
        self.norm_source: Callable[[], torch.Tensor] | None = None
        self.skipped: torch.Tensor | None = None
        self._counted: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("GuardedAdamW.step takes no closure")
        if self.norm_source is None:
            raise RuntimeError("GuardedAdamW.norm_source is not set (the trainer sets it after deepspeed.initialize)")
        raw = self.norm_source()
        if not torch.is_tensor(raw):
            raise RuntimeError(f"GuardedAdamW needs the global norm as a device tensor, got {type(raw).__name__}")
        device = self.param_groups[0]["params"][0].device
        norm = raw.to(device=device, dtype=torch.float32).reshape(())
        bad = ~torch.isfinite(norm) | (norm < 0)
        if self.clip > 0:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                div = torch.where(bad, torch.ones_like(norm), ((norm + 1e-6) / self.clip).clamp(min=1.0))
                torch._foreach_div_(grads, div)
        self.found_inf = bad.float()
        if raw is not self._counted:                 # the same tensor comes for the other parameter groups
            self._counted = raw
            self.skipped = bad.long() if self.skipped is None else self.skipped + bad.long()
        return super().step()

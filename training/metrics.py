"""Per-step metrics: JSONL + TensorBoard, and the FLOPs/MFU formula.

Training FLOPs per token of a bidirectional encoder (forward + backward = 3× forward)::

    F_token = 6·(N − N_head) + 6·N_head·r + 12·L·d·s

N = non-embedding parameters (embedding lookups are not matmuls), of which N_head belong to the
masked-expression head (``head_*``: dense, LayerNorm, projection to the bins), which runs on the
masked tokens only, a fraction r of all tokens (≈ the mask ratio; the trainer uses the step's own
count); L layers, d width, s the token-weighted sequence length ``s = Σ n_i² / Σ n_i`` of the packed
cells (each token attends to its own cell only: QKᵀ and PV cost 2·2·n·d per token forward, ×3 with
backward).
MFU = F_token · tokens/s ÷ (peak bf16 dense FLOP/s × number of devices). Peaks (dense, no
sparsity) come from vendor datasheets; on CPU ``mfu`` is ``null`` (no meaningful bf16 peak).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

PEAK_BF16_FLOPS = {          # substring of torch.cuda.get_device_name() → dense bf16 FLOP/s
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,          # SXM
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
}


def device_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of one device, or None (CPU / unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in name:
            return peak
    return None


def flops_per_token(n_params_nonembedding: int, n_layers: int, d_model: int, seq_len: float,
                    n_params_head: int, masked_frac: float) -> float:
    """``6·(N − N_head) + 6·N_head·r + 12·L·d·s`` training FLOPs per token."""
    if not 0.0 <= masked_frac <= 1.0:
        raise ValueError(f"masked_frac must lie in [0, 1], got {masked_frac}")
    return (6.0 * (n_params_nonembedding - n_params_head) + 6.0 * n_params_head * masked_frac
            + 12.0 * n_layers * d_model * seq_len)


def head_params(model: torch.nn.Module) -> int:
    """N_head: parameters of the masked-expression head (modules named ``head_*``)."""
    return sum(p.numel() for name, p in model.named_parameters() if name.startswith("head_"))


def effective_seq_len(cu_seqlens: torch.Tensor) -> float:
    """Token-weighted mean cell length ``Σ n_i² / Σ n_i``."""
    n = (cu_seqlens[1:] - cu_seqlens[:-1]).double()
    return float((n * n).sum() / n.sum().clamp(min=1))


class MetricsLogger:
    """Appends one JSON object per step to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", buffering=1)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(Path(run_dir) / "tb"))

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        self._file.close()
        if self.writer is not None:
            self.writer.close()

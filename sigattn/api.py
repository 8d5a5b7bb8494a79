"""Public sigmoid-attention API: ``out_i = Σ_j sigmoid(scale·q_i·k_j + b)·v_j`` over the valid keys of i's sequence.

``scale`` defaults to 1/√D. ``bias``: ``"log_n"`` (b = −log n_valid of that sequence), a float (b = bias), or ``None``
(b = 0). ``causal=True`` restricts to j ≤ i. GQA/MQA: head h uses kv head ``h // (H // H_kv)``. Outputs and
gradients at padded positions are exactly 0. Inputs may be strided (e.g. views of a fused QKV projection); no copy
is made when avoidable.

Bad input raises ``ValueError`` naming the problem. Shapes, dtypes and devices are always checked. The *values* of
``seq_lens``/``cu_seqlens`` are checked on the host only where that costs no GPU sync: for CPU tensors (the C++
kernels check them again). For CUDA tensors a call never reads a device tensor on the host — no sync, CUDA-graph
capturable, like FlashAttention's varlen API — so ``max_seqlen`` comes from the caller (the loader knows it) and
the values are the caller's contract; ``SIGATTN_CHECK_INPUTS=1`` or ``with sigattn.input_checks():`` turns the host
checks on for CUDA tensors too (each call then syncs: for debugging). Under ``torch.compile`` the host checks are
skipped.
"""

import contextlib
import math
import numbers
import os

import torch

from . import ops

MAX_HEAD_DIM = 256
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # float64: tests / gradcheck


def _bias_args(bias) -> tuple[float, bool]:
    """Map the public bias mode to the ops' ``(bias, log_n_bias)``."""
    if isinstance(bias, str):
        if bias != "log_n":
            raise ValueError(f"bias must be 'log_n', a float or None, got {bias!r}")
        return 0.0, True
    if bias is None:
        return 0.0, False
    if isinstance(bias, bool) or not isinstance(bias, (int, float)):
        raise ValueError(f"bias must be 'log_n', a float or None, got {bias!r}")
    return float(bias), False


def _check_qkv(q, k, v, ndim: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{layout} layout needs {ndim}-D {name}, got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {q.dtype}; use float32, bfloat16 or float16")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[:-2] != k.shape[:-2]:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} differ in their leading (token) dims")
    D, H, H_kv = q.shape[-1], q.shape[-2], k.shape[-2]
    if k.shape[-1] != D:
        raise ValueError(f"head dim of q ({D}) and k/v ({k.shape[-1]}) differ")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {D} unsupported (1..{MAX_HEAD_DIM})")
    if H_kv < 1 or H % H_kv != 0:
        raise ValueError(f"number of q heads ({H}) must be a multiple of k/v heads ({H_kv})")


_check_cuda_values = os.environ.get("SIGATTN_CHECK_INPUTS", "0") not in ("", "0")


@contextlib.contextmanager
def input_checks(enabled: bool = True):
    """Check ``seq_lens``/``cu_seqlens`` values on the host for CUDA inputs too inside this block (each call syncs)."""
    global _check_cuda_values
    before, _check_cuda_values = _check_cuda_values, bool(enabled)
    try:
        yield
    finally:
        _check_cuda_values = before


def _host_checks(t: torch.Tensor) -> bool:
    """Whether the values of index tensor ``t`` may be read on the host: never under torch.compile; for CUDA
    tensors only when input checks are on (the read is a device sync)."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or _check_cuda_values


def _check_index(t, name: str, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be an int32 torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q/k/v are on {device}")


def _max_seqlen(max_seqlen):
    """``max_seqlen`` as a Python int (a SymInt under torch.compile); a CUDA tensor is refused, not read."""
    if isinstance(max_seqlen, torch.Tensor):
        if max_seqlen.device.type != "cpu" or max_seqlen.numel() != 1:
            raise ValueError(f"max_seqlen must be a Python int (got a {max_seqlen.device.type} tensor of shape "
                             f"{tuple(max_seqlen.shape)}: reading it would stall the GPU); the loader's batch has it")
        max_seqlen = int(max_seqlen)
    if isinstance(max_seqlen, torch.SymInt):
        return max_seqlen
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, numbers.Integral):
        raise ValueError(f"max_seqlen must be a Python int, got {type(max_seqlen).__name__}")
    if max_seqlen < 0:
        raise ValueError(f"max_seqlen must be ≥ 0, got {max_seqlen}")
    return int(max_seqlen)


def sigmoid_attention(q, k, v, *, seq_lens=None, scale=None, bias="log_n", causal=False) -> torch.Tensor:
    """Padded layout: q ``[B, N, H, D]``, k/v ``[B, N, H_kv, D]``, seq_lens int32 ``[B]`` (valid tokens per sequence,
    trailing padding; None = all N valid) → ``[B, N, H, D]`` in q's dtype."""
    _check_qkv(q, k, v, 4, "padded")
    B, N = q.shape[:2]
    if seq_lens is not None:
        _check_index(seq_lens, "seq_lens", q.device)
        if seq_lens.shape[0] != B:
            raise ValueError(f"seq_lens has {seq_lens.shape[0]} entries for batch size {B}")
        if seq_lens.numel() and _host_checks(seq_lens):
            lo, hi = int(seq_lens.min()), int(seq_lens.max())
            if lo < 0 or hi > N:
                raise ValueError(f"seq_lens values must be in [0, N={N}], got min {lo}, max {hi}")
    b, log_n = _bias_args(bias)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return torch.ops.sigattn.attn_fwd(q, k, v, seq_lens, scale, b, log_n, bool(causal))


def sigmoid_attention_varlen(q, k, v, cu_seqlens, max_seqlen, *, scale=None, bias="log_n",
                             causal=False) -> torch.Tensor:
    """Varlen layout: packed q ``[T, H, D]``, k/v ``[T, H_kv, D]``, cu_seqlens int32 ``[B+1]`` (sequence b is tokens
    ``cu_seqlens[b]:cu_seqlens[b+1]``), max_seqlen ≥ the longest sequence → ``[T, H, D]`` in q's dtype."""
    _check_qkv(q, k, v, 3, "varlen")
    _check_index(cu_seqlens, "cu_seqlens", q.device)
    if cu_seqlens.shape[0] < 1:
        raise ValueError("cu_seqlens needs at least one entry (B + 1)")
    max_seqlen = _max_seqlen(max_seqlen)
    if _host_checks(cu_seqlens):
        cu = cu_seqlens.tolist()
        if cu[0] != 0:
            raise ValueError(f"cu_seqlens[0] must be 0, got {cu[0]}")
        if cu[-1] != q.shape[0]:
            raise ValueError(f"cu_seqlens[-1] = {cu[-1]} != total tokens T = {q.shape[0]}")
        lengths = [e - a for a, e in zip(cu[:-1], cu[1:])]
        if any(n < 0 for n in lengths):
            raise ValueError(f"cu_seqlens must be non-decreasing, got {cu}")
        if lengths and max(lengths) > max_seqlen:
            raise ValueError(f"max_seqlen = {max_seqlen} < longest sequence {max(lengths)}")
    b, log_n = _bias_args(bias)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return torch.ops.sigattn.attn_varlen_fwd(q, k, v, cu_seqlens, max_seqlen, scale, b, log_n, bool(causal))

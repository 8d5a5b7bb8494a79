"""Float64 PyTorch reference for sigmoid attention (both layouts), written as plainly as possible.

Per sequence with n valid tokens, head h (kv head ``h // (H // H_kv)``):
``out_i = Σ_{j < n (j ≤ i if causal)} sigmoid(scale·q_i·k_j + b)·v_j`` with
``b = bias − log(n)`` for ``bias="log_n"``, ``b = bias`` for a float, ``b = 0`` for ``None``.
Rows at padded positions are 0. Results are float64 (autograd through them gives reference gradients); pass
``dtype=torch.bfloat16`` etc. to run the same math in low precision (the tests' tolerance baseline).
"""

import math

import torch


def _bias_value(bias, n: int) -> float:
    if bias == "log_n":
        return -math.log(n)
    return 0.0 if bias is None else float(bias)


def _one_sequence(q, k, v, scale, bias, causal):
    """q ``[n, H, D]``, k/v ``[n, H_kv, D]`` → ``[n, H, D]``, all in one dtype."""
    n, H, D = q.shape
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    s = torch.einsum("ihd,jhd->hij", q, k) * scale + _bias_value(bias, n)
    p = torch.sigmoid(s)
    if causal:
        p = p * torch.ones(n, n, dtype=p.dtype, device=p.device).tril()
    return torch.einsum("hij,jhd->ihd", p, v)


def sigmoid_attention_ref(q, k, v, seq_lens=None, scale=None, bias="log_n", causal=False, dtype=torch.float64):
    """Padded layout: q ``[B, N, H, D]``, k/v ``[B, N, H_kv, D]``, seq_lens ``[B]`` (None = all N) → ``dtype``."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    B, N, H, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    lens = [N] * B if seq_lens is None else [int(x) for x in seq_lens]
    rows = []
    for b, n in enumerate(lens):
        o = q.new_zeros(N, H, D)
        if n > 0:
            o = torch.cat([_one_sequence(q[b, :n], k[b, :n], v[b, :n], scale, bias, causal), o[n:]])
        rows.append(o)
    return torch.stack(rows)


def sigmoid_attention_varlen_ref(q, k, v, cu_seqlens, scale=None, bias="log_n", causal=False, dtype=torch.float64):
    """Varlen layout: packed q ``[T, H, D]``, k/v ``[T, H_kv, D]``, cu_seqlens ``[B+1]`` → ``[T, H, D]`` in ``dtype``."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    cu = [int(x) for x in cu_seqlens]
    parts = [_one_sequence(q[a:e], k[a:e], v[a:e], scale, bias, causal) for a, e in zip(cu[:-1], cu[1:]) if e > a]
    return torch.cat(parts) if parts else q.new_zeros(q.shape)

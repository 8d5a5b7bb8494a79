"""Triton forward kernel: ``out[i] = Σ_{j<L (j≤i if causal)} σ(scale·q_i·k_j + b)·v_j``, fp32 accumulation.

Grid ``(cdiv(max_seqlen, BLOCK_M), B·H)``; program (m, b·H+h) owns query rows [m·BLOCK_M, (m+1)·BLOCK_M) of
sequence b, head h (kv head ``h // GROUP``). Sigmoid needs no running max/sum, so each k/v tile is one
``S = Q·Kᵀ → P = σ(c1·S + c0) → O += P·V`` step. Tiles entirely in padding are skipped (their rows are written
as 0); full tiles run unmasked, only the length tail and causal diagonal tiles are masked; causal skips the
tiles above the diagonal.
"""

import torch
import triton
import triton.language as tl

from . import triton_tuning as tuning
from .triton_common import load_tile, mm, prob, seq_bounds, sigmoid_coeffs, store_tile


@triton.jit
def _fwd_tiles(acc, q, Kb, Vb, stride_kt, stride_vt, offs_m, offs_d, L, lo, hi, c1, c0,
               D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, FAST_SIGMOID: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        kn = start_n + offs_n
        k = load_tile(Kb, kn, stride_kt, offs_d, L, D, D_PAD, MASKED)
        s = mm(q, tl.trans(k), DOT_FP32)
        p = prob(s * c1 + c0, FAST_SIGMOID)
        if MASKED:
            keep = kn[None, :] < L
            if CAUSAL:
                keep = keep & (kn[None, :] <= offs_m[:, None])
            p = tl.where(keep, p, 0.0)
        v = load_tile(Vb, kn, stride_vt, offs_d, L, D, D_PAD, MASKED)
        acc = acc + mm(p.to(v.dtype), v, DOT_FP32)
    return acc


@triton.jit(do_not_specialize=["N", "seq_bucket"])
def attn_fwd_kernel(Q, K, V, O, SeqInfo, scale, bias, N, seq_bucket,
                    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                    stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
                    H, GROUP,
                    D: tl.constexpr, D_PAD: tl.constexpr, VARLEN: tl.constexpr, HAS_LENS: tl.constexpr,
                    LOG_N_BIAS: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
                    FAST_SIGMOID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    qbase, L, n_rows = seq_bounds(SeqInfo, b, N, stride_qb, stride_qt, VARLEN, HAS_LENS)
    kbase, _, _ = seq_bounds(SeqInfo, b, N, stride_kb, stride_kt, VARLEN, HAS_LENS)
    vbase, _, _ = seq_bounds(SeqInfo, b, N, stride_vb, stride_vt, VARLEN, HAS_LENS)
    obase, _, _ = seq_bounds(SeqInfo, b, N, stride_ob, stride_ot, VARLEN, HAS_LENS)
    start_m = pid_m * BLOCK_M
    if start_m < n_rows:
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D_PAD)
        Ob = O + obase + h * stride_oh
        acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
        if start_m < L:
            q = load_tile(Q + qbase + h * stride_qh, offs_m, stride_qt, offs_d, L, D, D_PAD, True)
            Kb = K + kbase + hk * stride_kh
            Vb = V + vbase + hk * stride_vh
            c1, c0 = sigmoid_coeffs(scale, bias, L, LOG_N_BIAS, FAST_SIGMOID)
            L_full = (L // BLOCK_N) * BLOCK_N
            if CAUSAL:
                full_hi = tl.minimum(start_m, L_full)
                hi = tl.minimum(start_m + BLOCK_M, L)
            else:
                full_hi = L_full
                hi = L
            acc = _fwd_tiles(acc, q, Kb, Vb, stride_kt, stride_vt, offs_m, offs_d, L, 0, full_hi, c1, c0,
                             D, D_PAD, BLOCK_N, False, CAUSAL, DOT_FP32, FAST_SIGMOID)
            acc = _fwd_tiles(acc, q, Kb, Vb, stride_kt, stride_vt, offs_m, offs_d, L, full_hi, hi, c1, c0,
                             D, D_PAD, BLOCK_N, True, CAUSAL, DOT_FP32, FAST_SIGMOID)
        store_tile(Ob, acc, offs_m, stride_ot, offs_d, L, n_rows, D)


_fwd_autotuned = tuning.autotuned(attn_fwd_kernel, tuning.FWD_CONFIGS)


def launch_fwd(q, k, v, seq_info, *, varlen: bool, max_seqlen: int, scale: float, bias: float,
               log_n_bias: bool, causal: bool) -> torch.Tensor:
    """Run the forward kernel on 4-D padded (``[B,N,H,D]``) or 3-D varlen (``[T,H,D]``) tensors (last dim contiguous)."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    D = q.shape[-1]
    H, H_kv = q.shape[-2], k.shape[-2]
    if varlen:
        B = seq_info.shape[0] - 1
        N = 0
        sb = lambda t: (0, t.stride(0), t.stride(1))  # noqa: E731
    else:
        B, N = q.shape[0], q.shape[1]
        sb = lambda t: (t.stride(0), t.stride(1), t.stride(2))  # noqa: E731
    if B == 0 or max_seqlen == 0 or q.numel() == 0:
        return out.zero_()
    has_lens = seq_info is not None
    if seq_info is None:
        seq_info = q.new_empty(1, dtype=torch.int32)
    d_pad = max(16, triton.next_power_of_2(D))
    meta = dict(D=D, D_PAD=d_pad, VARLEN=varlen, HAS_LENS=has_lens, LOG_N_BIAS=bool(log_n_bias),
                CAUSAL=bool(causal), DOT_FP32=q.dtype == torch.float32 or tuning.INTERPRET,
                FAST_SIGMOID=tuning.fast_sigmoid(q.dtype))
    args = (q, k, v, out, seq_info, float(scale), float(bias), N, tuning.seq_bucket(max_seqlen),
            *sb(q), *sb(k), *sb(v), *sb(out), H, H // H_kv)
    if tuning.no_autotune() or q.dtype == torch.float32:
        cfg = tuning.fixed("fwd", d_pad, q.dtype == torch.float32)
        grid = (triton.cdiv(max_seqlen, cfg.kwargs["BLOCK_M"]), B * H)
        attn_fwd_kernel[grid](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        grid = lambda M: (triton.cdiv(max_seqlen, M["BLOCK_M"]), B * H)  # noqa: E731
        _fwd_autotuned[grid](*args, **meta)
    return out

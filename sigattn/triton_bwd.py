"""Triton backward kernels for sigmoid attention (sigmoid needs no rowsum(dO∘O) preprocess).

With P = σ(scale·QKᵀ + b), dP = dO·Vᵀ, dS = P∘(1−P)∘dP:
  dV = Pᵀ·dO,   dK = scale·dSᵀ·Q,   dQ = scale·dS·K.

Default (5 GEMMs per tile): one K/V-parallel kernel, grid ``(cdiv(max_seqlen, BLOCK_N), B·H_kv)``; each program
holds a k/v tile, loops over the GQA group's query heads and their query tiles, accumulates dK, dV in registers
(deterministic, no atomics for them) and adds dQ tile contributions into an fp32 buffer with atomics.
Deterministic mode (``SIGATTN_DETERMINISTIC=1``): the same kernel without dQ (4 GEMMs) plus a Q-parallel dQ kernel
(3 GEMMs: S, dP, dQ) that writes dQ directly. Padding rows get exact zeros; tiles in padding are skipped.

dQ by TMA reductions (``dq_tma``, sm90+, D a power of two; the default for varlen calls, ``SIGATTN_DQ_TMA``): each
[BLOCK_M, D] dQ tile goes to shared memory and one bulk ``cp.reduce.async.bulk.tensor.add.f32`` per tile adds it
into the fp32 buffer (``desc.atomic_add``), instead of one ``red.global.add.f32`` per element. The tile's rows past
the sequence's end hold exact zeros (q = dO = 0 there, so dSᵀ's columns vanish), so adding them into the next
sequence's rows (varlen) or the padding rows (padded) changes nothing.
"""

import functools

import torch
import triton
import triton.language as tl

from . import triton_tuning as tuning

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # a Triton without host-side tensor descriptors: pointer atomics only
    TensorDescriptor = None
from .triton_common import load_tile, mm, prob, seq_bounds, sigmoid_coeffs, store_tile


@triton.jit
def _kv_tiles(dk, dv, k, v, Qb, DOb, DQb, DQd, dq_row, dq_col, stride_qt, stride_dot, stride_dqt, offs_n, offs_d, L,
              lo, hi, c1, c0, scale, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, COMPUTE_DQ: tl.constexpr, DQ_TMA: tl.constexpr,
              DOT_FP32: tl.constexpr, FAST_SIGMOID: tl.constexpr):
    offs_mb = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_mb
        q = load_tile(Qb, offs_m, stride_qt, offs_d, L, D, D_PAD, MASKED)
        do = load_tile(DOb, offs_m, stride_dot, offs_d, L, D, D_PAD, MASKED)
        sT = mm(k, tl.trans(q), DOT_FP32)  # [BLOCK_N, BLOCK_M]
        pT = prob(sT * c1 + c0, FAST_SIGMOID)
        if MASKED:
            # rows ≥ L have q = dO = 0, so only the causal mask changes P here
            if CAUSAL:
                pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
        dv = dv + mm(pT.to(do.dtype), do, DOT_FP32)
        dpT = mm(v, tl.trans(do), DOT_FP32)
        dsT = ((pT - pT * pT) * dpT).to(q.dtype)   # P(1−P) as one FFMA (p − p·p), then ×dP: 2 FMA-pipe ops
        dk = dk + mm(dsT, q, DOT_FP32)
        if COMPUTE_DQ:
            dq = mm(tl.trans(dsT), k, DOT_FP32) * scale
            if DQ_TMA:  # rows ≥ L of dq are exact zeros (see the module docstring)
                DQd.atomic_add([dq_row + start_m, dq_col], dq)
            else:
                ptrs = DQb + offs_m[:, None] * stride_dqt + offs_d[None, :]
                tl.atomic_add(ptrs, dq, mask=(offs_m[:, None] < L) & (offs_d[None, :] < D), sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=["N", "seq_bucket"])
def attn_bwd_kv_kernel(Q, K, V, DO, DQ, DQd, DK, DV, SeqInfo, scale, bias, N, seq_bucket,
                       stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                       stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                       stride_dqb, stride_dqt, stride_dqh, stride_dkb, stride_dkt, stride_dkh,
                       stride_dvb, stride_dvt, stride_dvh, H_kv, GROUP,
                       D: tl.constexpr, D_PAD: tl.constexpr, VARLEN: tl.constexpr, HAS_LENS: tl.constexpr,
                       LOG_N_BIAS: tl.constexpr, CAUSAL: tl.constexpr, COMPUTE_DQ: tl.constexpr,
                       DQ_TMA: tl.constexpr, DOT_FP32: tl.constexpr, FAST_SIGMOID: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """DQd (DQ_TMA): a tensor descriptor over DQ as [rows, H·D] with block [BLOCK_M, D]; else unused."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_kv
    hk = pid_bh % H_kv
    kbase, L, n_rows = seq_bounds(SeqInfo, b, N, stride_kb, stride_kt, VARLEN, HAS_LENS)
    vbase, _, _ = seq_bounds(SeqInfo, b, N, stride_vb, stride_vt, VARLEN, HAS_LENS)
    dkbase, _, _ = seq_bounds(SeqInfo, b, N, stride_dkb, stride_dkt, VARLEN, HAS_LENS)
    dvbase, _, _ = seq_bounds(SeqInfo, b, N, stride_dvb, stride_dvt, VARLEN, HAS_LENS)
    start_n = pid_n * BLOCK_N
    if start_n < n_rows:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D_PAD)
        dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
        if start_n < L:
            qbase, _, _ = seq_bounds(SeqInfo, b, N, stride_qb, stride_qt, VARLEN, HAS_LENS)
            dobase, _, _ = seq_bounds(SeqInfo, b, N, stride_dob, stride_dot, VARLEN, HAS_LENS)
            dqbase, _, _ = seq_bounds(SeqInfo, b, N, stride_dqb, stride_dqt, VARLEN, HAS_LENS)
            k = load_tile(K + kbase + hk * stride_kh, offs_n, stride_kt, offs_d, L, D, D_PAD, True)
            v = load_tile(V + vbase + hk * stride_vh, offs_n, stride_vt, offs_d, L, D, D_PAD, True)
            c1, c0 = sigmoid_coeffs(scale, bias, L, LOG_N_BIAS, FAST_SIGMOID)
            L_full = (L // BLOCK_M) * BLOCK_M
            if CAUSAL:
                lo = start_n
                mid = tl.minimum(start_n + BLOCK_N, L)
            else:
                lo = 0
                mid = 0
            tail = tl.maximum(L_full, mid)
            dq_row = (dqbase // stride_dqt).to(tl.int32)        # the sequence's first row of DQ as [rows, H·D]
            for g in range(0, GROUP):
                h = hk * GROUP + g
                Qb = Q + qbase + h * stride_qh
                DOb = DO + dobase + h * stride_doh
                DQb = DQ + dqbase + h * stride_dqh
                dq_col = h * D
                # causal diagonal tiles (masked), then full tiles, then the length tail (masked)
                dk, dv = _kv_tiles(dk, dv, k, v, Qb, DOb, DQb, DQd, dq_row, dq_col, stride_qt, stride_dot,
                                   stride_dqt, offs_n, offs_d, L, lo, mid, c1, c0, scale, D, D_PAD, BLOCK_M, True,
                                   CAUSAL, COMPUTE_DQ, DQ_TMA, DOT_FP32, FAST_SIGMOID)
                dk, dv = _kv_tiles(dk, dv, k, v, Qb, DOb, DQb, DQd, dq_row, dq_col, stride_qt, stride_dot,
                                   stride_dqt, offs_n, offs_d, L, mid, L_full, c1, c0, scale, D, D_PAD, BLOCK_M,
                                   False, CAUSAL, COMPUTE_DQ, DQ_TMA, DOT_FP32, FAST_SIGMOID)
                dk, dv = _kv_tiles(dk, dv, k, v, Qb, DOb, DQb, DQd, dq_row, dq_col, stride_qt, stride_dot,
                                   stride_dqt, offs_n, offs_d, L, tail, L, c1, c0, scale, D, D_PAD, BLOCK_M, True,
                                   CAUSAL, COMPUTE_DQ, DQ_TMA, DOT_FP32, FAST_SIGMOID)
            dk = dk * scale
        store_tile(DK + dkbase + hk * stride_dkh, dk, offs_n, stride_dkt, offs_d, L, n_rows, D)
        store_tile(DV + dvbase + hk * stride_dvh, dv, offs_n, stride_dvt, offs_d, L, n_rows, D)


@triton.jit
def _dq_tiles(dq, q, do, Kb, Vb, stride_kt, stride_vt, offs_m, offs_d, L, lo, hi, c1, c0,
              D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, FAST_SIGMOID: tl.constexpr):
    offs_nb = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        kn = start_n + offs_nb
        k = load_tile(Kb, kn, stride_kt, offs_d, L, D, D_PAD, MASKED)
        v = load_tile(Vb, kn, stride_vt, offs_d, L, D, D_PAD, MASKED)
        p = prob(mm(q, tl.trans(k), DOT_FP32) * c1 + c0, FAST_SIGMOID)
        if MASKED:
            if CAUSAL:
                p = tl.where(kn[None, :] <= offs_m[:, None], p, 0.0)
        dp = mm(do, tl.trans(v), DOT_FP32)  # keys ≥ L have v = 0, so dS = 0 there
        ds = ((p - p * p) * dp).to(k.dtype)
        dq = dq + mm(ds, k, DOT_FP32)
    return dq


@triton.jit(do_not_specialize=["N", "seq_bucket"])
def attn_bwd_dq_kernel(Q, K, V, DO, DQ, SeqInfo, scale, bias, N, seq_bucket,
                       stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                       stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                       stride_dqb, stride_dqt, stride_dqh, H, GROUP,
                       D: tl.constexpr, D_PAD: tl.constexpr, VARLEN: tl.constexpr, HAS_LENS: tl.constexpr,
                       LOG_N_BIAS: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
                       FAST_SIGMOID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    qbase, L, n_rows = seq_bounds(SeqInfo, b, N, stride_qb, stride_qt, VARLEN, HAS_LENS)
    dqbase, _, _ = seq_bounds(SeqInfo, b, N, stride_dqb, stride_dqt, VARLEN, HAS_LENS)
    start_m = pid_m * BLOCK_M
    if start_m < n_rows:
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D_PAD)
        dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
        if start_m < L:
            kbase, _, _ = seq_bounds(SeqInfo, b, N, stride_kb, stride_kt, VARLEN, HAS_LENS)
            vbase, _, _ = seq_bounds(SeqInfo, b, N, stride_vb, stride_vt, VARLEN, HAS_LENS)
            dobase, _, _ = seq_bounds(SeqInfo, b, N, stride_dob, stride_dot, VARLEN, HAS_LENS)
            q = load_tile(Q + qbase + h * stride_qh, offs_m, stride_qt, offs_d, L, D, D_PAD, True)
            do = load_tile(DO + dobase + h * stride_doh, offs_m, stride_dot, offs_d, L, D, D_PAD, True)
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
            dq = _dq_tiles(dq, q, do, Kb, Vb, stride_kt, stride_vt, offs_m, offs_d, L, 0, full_hi, c1, c0,
                           D, D_PAD, BLOCK_N, False, CAUSAL, DOT_FP32, FAST_SIGMOID)
            dq = _dq_tiles(dq, q, do, Kb, Vb, stride_kt, stride_vt, offs_m, offs_d, L, full_hi, hi, c1, c0,
                           D, D_PAD, BLOCK_N, True, CAUSAL, DOT_FP32, FAST_SIGMOID)
            dq = dq * scale
        store_tile(DQ + dqbase + h * stride_dqh, dq, offs_m, stride_dqt, offs_d, L, n_rows, D)


def _dq_block(nargs) -> None:
    """Config pre-hook: the dQ descriptor's block is the config's query tile × D."""
    if nargs.get("DQd") is not None:
        nargs["DQd"].block_shape = [nargs["BLOCK_M"], nargs["D"]]


_kv_autotuned = tuning.autotuned(attn_bwd_kv_kernel, tuning.with_pre_hook(tuning.BWD_CONFIGS, _dq_block),
                                 reset_to_zero=["DQ"])
_dq_autotuned = tuning.autotuned(attn_bwd_dq_kernel, tuning.DQ_CONFIGS)


def _launch(kernel, tuned, kind, grid_rows, bh, args, meta, d_pad):
    if tuning.no_autotune() or args[0].dtype == torch.float32:
        cfg = tuning.fixed(kind, d_pad, args[0].dtype == torch.float32)
        blk = cfg.kwargs["BLOCK_N" if kind == "bwd" else "BLOCK_M"]
        if kind == "bwd":
            _dq_block(dict(meta, DQd=args[5], **cfg.kwargs))
        kernel[(triton.cdiv(grid_rows, blk), bh)](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps,
                                                  num_stages=cfg.num_stages)
    else:
        key = "BLOCK_N" if kind == "bwd" else "BLOCK_M"
        tuned[lambda M: (triton.cdiv(grid_rows, M[key]), bh)](*args, **meta)


@functools.lru_cache(maxsize=None)
def _has_tma(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def dq_tma_usable(q: torch.Tensor, d_pad: int) -> bool:
    """TMA reductions of dQ need sm90+, a power-of-two head dim and a Triton with host tensor descriptors (the
    interpreter has no descriptor reduce)."""
    return (TensorDescriptor is not None and not tuning.INTERPRET and q.is_cuda and q.dtype != torch.float32
            and q.shape[-1] == d_pad and _has_tma(q.device.index if q.device.index is not None else 0))


def launch_bwd(do, q, k, v, seq_info, *, varlen: bool, max_seqlen: int, scale: float, bias: float,
               log_n_bias: bool, causal: bool, deterministic: bool | None = None, dq_tma: bool | None = None):
    """Gradients (dq, dk, dv) for 4-D padded or 3-D varlen tensors (last dim contiguous). ``dq_tma``: dQ by TMA
    reductions where usable (default: ``tuning.dq_tma(varlen)``)."""
    D = q.shape[-1]
    H, H_kv = q.shape[-2], k.shape[-2]
    det = tuning.deterministic() if deterministic is None else deterministic
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if varlen:
        B, N = seq_info.shape[0] - 1, 0
        sb = lambda t: (0, t.stride(0), t.stride(1))  # noqa: E731
    else:
        B, N = q.shape[0], q.shape[1]
        sb = lambda t: (t.stride(0), t.stride(1), t.stride(2))  # noqa: E731
    if B == 0 or max_seqlen == 0 or q.numel() == 0:
        return torch.zeros_like(q), dk.zero_(), dv.zero_()
    if det or q.dtype == torch.float32:
        dq_buf = torch.empty(q.shape, dtype=q.dtype, device=q.device) if det else torch.zeros_like(q)
    else:
        dq_buf = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    has_lens = seq_info is not None
    if seq_info is None:
        seq_info = q.new_empty(1, dtype=torch.int32)
    d_pad = max(16, triton.next_power_of_2(D))
    meta = dict(D=D, D_PAD=d_pad, VARLEN=varlen, HAS_LENS=has_lens, LOG_N_BIAS=bool(log_n_bias),
                CAUSAL=bool(causal), DOT_FP32=q.dtype == torch.float32 or tuning.INTERPRET,
                FAST_SIGMOID=tuning.fast_sigmoid(q.dtype))
    head = (float(scale), float(bias), N, tuning.seq_bucket(max_seqlen))
    use_tma = (not det and (tuning.dq_tma(varlen) if dq_tma is None else dq_tma)   # not det: dq_buf is fp32
               and dq_tma_usable(q, d_pad))
    dq_desc = None
    if use_tma:  # DQ as [rows, H·D]; the block is set per config (_dq_block)
        rows = dq_buf.numel() // (H * D)
        dq_desc = TensorDescriptor(dq_buf, shape=[rows, H * D], strides=[H * D, 1], block_shape=[16, D])
    kv_args = (q, k, v, do, dq_buf, dq_desc, dk, dv, seq_info, *head, *sb(q), *sb(k), *sb(v), *sb(do),
               *sb(dq_buf), *sb(dk), *sb(dv), H_kv, H // H_kv)
    _launch(attn_bwd_kv_kernel, _kv_autotuned, "bwd", max_seqlen, B * H_kv, kv_args,
            dict(meta, COMPUTE_DQ=not det, DQ_TMA=use_tma), d_pad)
    if det:
        dq_args = (q, k, v, do, dq_buf, seq_info, *head, *sb(q), *sb(k), *sb(v), *sb(do), *sb(dq_buf),
                   H, H // H_kv)
        _launch(attn_bwd_dq_kernel, _dq_autotuned, "dq", max_seqlen, B * H, dq_args, meta, d_pad)
    dq = dq_buf if dq_buf.dtype == q.dtype else dq_buf.to(q.dtype)
    return dq, dk, dv

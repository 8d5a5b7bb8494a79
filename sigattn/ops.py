"""Python side of the ``sigattn::`` ops: loads the C++ library (schemas + CPU kernels), and registers fake kernels
(torch.compile / meta), autograd for the two forward ops, and FLOP formulas for ``FlopCounterMode``.

FLOPs: forward = 4·H·D·Σ_seq pairs, pairs = L² (causal: L(L+1)/2), i.e. 2·H·D per pair for QKᵀ and 2·H·D for PV.
The lengths come from ``seq_lens``/``cu_seqlens`` when they are concrete tensors; under fake/symbolic tracing
the bound B·N² (padded) or T·max_seqlen (varlen) is used. Backward = 2.5 × forward (the usual convention:
dV, dP, dQ, dK are four matmuls plus the recomputed QKᵀ, i.e. 5 matmuls vs 2).
"""

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils.flop_counter import register_flop_formula

from . import _C  # noqa: F401  (loading the library registers the schemas and the CPU kernels)

BWD_FLOP_FACTOR = 2.5

_ops = torch.ops.sigattn


# ---- fake kernels: outputs are contiguous, in the input dtype ------------------------------------------------------
def _like(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty(t.shape)


@torch.library.register_fake("sigattn::attn_fwd")
def _attn_fwd_fake(q, k, v, seq_lens, scale, bias, log_n_bias, causal):
    return _like(q)


@torch.library.register_fake("sigattn::attn_varlen_fwd")
def _attn_varlen_fwd_fake(q, k, v, cu_seqlens, max_seqlen, scale, bias, log_n_bias, causal):
    return _like(q)


@torch.library.register_fake("sigattn::attn_bwd")
def _attn_bwd_fake(grad_out, q, k, v, seq_lens, scale, bias, log_n_bias, causal):
    return _like(q), _like(k), _like(v)


@torch.library.register_fake("sigattn::attn_varlen_bwd")
def _attn_varlen_bwd_fake(grad_out, q, k, v, cu_seqlens, max_seqlen, scale, bias, log_n_bias, causal):
    return _like(q), _like(k), _like(v)


# ---- autograd ---------------------------------------------------------------------------------------------------
def _setup_padded(ctx, inputs, output):
    q, k, v, seq_lens, *params = inputs
    ctx.save_for_backward(q, k, v, seq_lens)
    ctx.params = params


def _backward_padded(ctx, grad_out):
    q, k, v, seq_lens = ctx.saved_tensors
    dq, dk, dv = _ops.attn_bwd(grad_out, q, k, v, seq_lens, *ctx.params)
    return dq, dk, dv, None, None, None, None, None


def _setup_varlen(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, *params = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens)
    ctx.max_seqlen = max_seqlen
    ctx.params = params


def _backward_varlen(ctx, grad_out):
    q, k, v, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _ops.attn_varlen_bwd(grad_out, q, k, v, cu_seqlens, ctx.max_seqlen, *ctx.params)
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("sigattn::attn_fwd", _backward_padded, setup_context=_setup_padded)
torch.library.register_autograd("sigattn::attn_varlen_fwd", _backward_varlen, setup_context=_setup_varlen)


# ---- FLOP formulas ----------------------------------------------------------------------------------------------
def _pairs(lengths: torch.Tensor, causal: bool) -> int:
    lengths = lengths.to("cpu", torch.int64)
    return int((lengths * (lengths + 1) // 2 if causal else lengths * lengths).sum())


def _concrete(t) -> bool:
    return isinstance(t, torch.Tensor) and not is_fake(t) and not isinstance(t, torch.SymInt)


def _fwd_flops_padded(q, seq_lens, causal) -> int:
    B, N, H, D = q.shape
    if seq_lens is not None and _concrete(seq_lens):
        pairs = _pairs(seq_lens, causal)
    else:
        pairs = B * (N * (N + 1) // 2 if causal else N * N)
    return 4 * H * D * pairs


def _fwd_flops_varlen(q, cu_seqlens, max_seqlen, causal) -> int:
    T, H, D = q.shape
    if _concrete(cu_seqlens):
        pairs = _pairs(cu_seqlens[1:] - cu_seqlens[:-1], causal)
    else:
        pairs = T * (max_seqlen + 1) // 2 if causal else T * max_seqlen
    return 4 * H * D * pairs


@register_flop_formula(_ops.attn_fwd, get_raw=True)
def _attn_fwd_flop(q, k, v, seq_lens, scale, bias, log_n_bias, causal, *args, **kwargs) -> int:
    return _fwd_flops_padded(q, seq_lens, causal)


@register_flop_formula(_ops.attn_bwd, get_raw=True)
def _attn_bwd_flop(grad_out, q, k, v, seq_lens, scale, bias, log_n_bias, causal, *args, **kwargs) -> int:
    return int(BWD_FLOP_FACTOR * _fwd_flops_padded(q, seq_lens, causal))


@register_flop_formula(_ops.attn_varlen_fwd, get_raw=True)
def _attn_varlen_fwd_flop(q, k, v, cu_seqlens, max_seqlen, scale, bias, log_n_bias, causal, *args, **kwargs) -> int:
    return _fwd_flops_varlen(q, cu_seqlens, max_seqlen, causal)


@register_flop_formula(_ops.attn_varlen_bwd, get_raw=True)
def _attn_varlen_bwd_flop(grad_out, q, k, v, cu_seqlens, max_seqlen, scale, bias, log_n_bias, causal, *args,
                          **kwargs) -> int:
    return int(BWD_FLOP_FACTOR * _fwd_flops_varlen(q, cu_seqlens, max_seqlen, causal))

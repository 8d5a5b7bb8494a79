"""CUDA implementations of the four ``sigattn::`` ops (schemas in csrc/, see docs/CONTRACTS.md) via the Triton kernels.

Importing this module registers them with ``torch.library.register_kernel(..., "cuda")``. The plain launchers
(``attn_fwd`` …) are usable without the registration (tests, benchmarks). Inputs may be strided views
(e.g. slices of a fused QKV projection) as long as the head dim is contiguous; no per-call host allocation
besides the outputs, no host sync, so the ops are CUDA-graph and torch.compile friendly.

Kernel choice, once per device (capability): on sm90 the forward runs the Gluon Hopper kernel (``hopper_fwd``)
for the inputs it supports (bf16/fp16, D 64/128, non-causal, heads contiguous); everything else, other GPUs and
the Triton interpreter use the portable Triton kernels. ``SIGATTN_HOPPER=0`` turns the Hopper kernel off.
The Gluon Hopper backward (``hopper_bwd``: its GPU tests pass; on an H200 it runs at 0.94–1.09× the portable
backward) is opt-in: ``SIGATTN_HOPPER_BWD=1`` routes the backward of the inputs it supports there (deterministic
mode keeps its dQ kernel, never the atomic variant; ``SIGATTN_HOPPER_DQ_ATOMIC=1|tma|0`` picks the variant
otherwise: dQ by vector reductions, by TMA reductions, or its own kernel; default ``hopper_bwd.DQ_ATOMIC``).
"""

import functools

import torch

from . import hopper_bwd, hopper_fwd
from . import triton_tuning as tuning
from .triton_bwd import launch_bwd as _portable_bwd
from .triton_fwd import launch_fwd as _portable_fwd


@functools.lru_cache(maxsize=None)
def _hopper_device(index: int) -> bool:
    return (hopper_fwd.HAVE_GLUON and not tuning.INTERPRET
            and torch.cuda.get_device_capability(index) == (9, 0))


def launch_fwd(q, k, v, seq_info, *, varlen, max_seqlen, scale, bias, log_n_bias, causal):
    """Forward through the kernel chosen for this device (see module docstring); same contract as triton_fwd's."""
    if (q.is_cuda and _hopper_device(q.device.index or 0) and tuning._flag("SIGATTN_HOPPER", "1")
            and hopper_fwd.supported(q, k, v, causal)):
        return hopper_fwd.launch_fwd(q, k, v, seq_info, varlen=varlen, max_seqlen=max_seqlen, scale=scale,
                                     bias=bias, log_n_bias=log_n_bias, causal=causal,
                                     fast_sigmoid=tuning.fast_sigmoid(q.dtype))
    return _portable_fwd(q, k, v, seq_info, varlen=varlen, max_seqlen=max_seqlen, scale=scale, bias=bias,
                         log_n_bias=log_n_bias, causal=causal)


def launch_bwd(do, q, k, v, seq_info, *, varlen, max_seqlen, scale, bias, log_n_bias, causal):
    """Backward through the kernel chosen for this device: the portable one unless ``SIGATTN_HOPPER_BWD=1`` on sm90
    (see module docstring); same contract as triton_bwd's."""
    if (q.is_cuda and _hopper_device(q.device.index or 0) and tuning._flag("SIGATTN_HOPPER_BWD", "0")
            and tuning._flag("SIGATTN_HOPPER", "1") and hopper_bwd.supported(do, q, k, v, causal)):
        return hopper_bwd.launch_bwd(do, q, k, v, seq_info, varlen=varlen, max_seqlen=max_seqlen, scale=scale,
                                     bias=bias, log_n_bias=log_n_bias, causal=causal,
                                     fast_sigmoid=tuning.fast_sigmoid(q.dtype),
                                     dq_atomic=tuning.hopper_dq_atomic(hopper_bwd.DQ_ATOMIC))
    return _portable_bwd(do, q, k, v, seq_info, varlen=varlen, max_seqlen=max_seqlen, scale=scale, bias=bias,
                         log_n_bias=log_n_bias, causal=causal)


def _last_contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _prep(q, k, v, idx):
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    if idx is not None:
        idx = idx.to(torch.int32).contiguous()
    return q, k, v, idx


def attn_fwd(q, k, v, seq_lens, scale, bias, log_n_bias, causal):
    """Padded layout forward: q ``[B, N, H, D]``, k/v ``[B, N, H_kv, D]``, seq_lens int32 ``[B]`` or None."""
    q, k, v, seq_lens = _prep(q, k, v, seq_lens)
    return launch_fwd(q, k, v, seq_lens, varlen=False, max_seqlen=q.shape[1], scale=scale, bias=bias,
                      log_n_bias=log_n_bias, causal=causal)


def attn_bwd(grad_out, q, k, v, seq_lens, scale, bias, log_n_bias, causal):
    """Padded layout backward: returns (dq, dk, dv); exact zeros at padded rows."""
    q, k, v, seq_lens = _prep(q, k, v, seq_lens)
    return launch_bwd(_last_contig(grad_out), q, k, v, seq_lens, varlen=False, max_seqlen=q.shape[1], scale=scale,
                      bias=bias, log_n_bias=log_n_bias, causal=causal)


def attn_varlen_fwd(q, k, v, cu_seqlens, max_seqlen, scale, bias, log_n_bias, causal):
    """Varlen forward: packed q ``[T, H, D]``, k/v ``[T, H_kv, D]``, cu_seqlens int32 ``[B+1]``."""
    q, k, v, cu_seqlens = _prep(q, k, v, cu_seqlens)
    return launch_fwd(q, k, v, cu_seqlens, varlen=True, max_seqlen=int(max_seqlen), scale=scale, bias=bias,
                      log_n_bias=log_n_bias, causal=causal)


def attn_varlen_bwd(grad_out, q, k, v, cu_seqlens, max_seqlen, scale, bias, log_n_bias, causal):
    """Varlen backward: returns (dq, dk, dv)."""
    q, k, v, cu_seqlens = _prep(q, k, v, cu_seqlens)
    return launch_bwd(_last_contig(grad_out), q, k, v, cu_seqlens, varlen=True, max_seqlen=int(max_seqlen),
                      scale=scale, bias=bias, log_n_bias=log_n_bias, causal=causal)


def _schemas_loaded() -> bool:
    try:
        torch.ops.sigattn.attn_fwd  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def register() -> None:
    """Register the launchers as the CUDA kernels of the ``sigattn::`` ops (schemas must already be loaded)."""
    if not _schemas_loaded():
        raise ImportError("sigattn op schemas are not loaded (build/import the C++ extension sigattn._C first)")
    for name, fn in (("attn_fwd", attn_fwd), ("attn_bwd", attn_bwd), ("attn_varlen_fwd", attn_varlen_fwd),
                     ("attn_varlen_bwd", attn_varlen_bwd)):
        torch.library.register_kernel(f"sigattn::{name}", "cuda", fn)


register()

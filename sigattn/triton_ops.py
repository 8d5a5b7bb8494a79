"""CUDA implementations of the four ``sigattn::`` ops (schemas in csrc/, see docs/CONTRACTS.md) via the Triton kernels.

Importing this module registers them with ``torch.library.register_kernel(..., "cuda")``. The plain launchers
(``attn_fwd`` …) are usable without the registration (tests, benchmarks). Inputs may be strided views
(e.g. slices of a fused QKV projection) as long as the head dim is contiguous; no per-call host allocation
besides the outputs, no host sync, so the ops are CUDA-graph and torch.compile friendly.
"""

import torch

from .triton_bwd import launch_bwd
from .triton_fwd import launch_fwd


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

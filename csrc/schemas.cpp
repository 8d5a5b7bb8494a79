// The one definition of the four sigattn:: op schemas (docs/CONTRACTS.md). Kernels are registered elsewhere:
// CPU in cpu_ops.cpp, CUDA (Triton) from sigattn/triton_ops.py, fake/autograd/FLOPs from sigattn/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(sigattn, m) {
  m.def(
      "attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? seq_lens, float scale, float bias, bool log_n_bias, "
      "bool causal) -> Tensor");
  m.def(
      "attn_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? seq_lens, float scale, float bias, "
      "bool log_n_bias, bool causal) -> (Tensor, Tensor, Tensor)");
  m.def(
      "attn_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, SymInt max_seqlen, float scale, float bias, "
      "bool log_n_bias, bool causal) -> Tensor");
  m.def(
      "attn_varlen_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, SymInt max_seqlen, "
      "float scale, float bias, bool log_n_bias, bool causal) -> (Tensor, Tensor, Tensor)");
}

// CPU kernels of the four sigattn:: ops: input validation (messages name the problem), layout → segments, and
// registration with TORCH_LIBRARY_IMPL(sigattn, CPU). The math lives in attention_cpu.cpp.
#include <torch/library.h>

#include <optional>

#include "attention_cpu.h"

namespace sigattn {
namespace {

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t dims, const char* layout) {
  TORCH_CHECK(q.dim() == dims && k.dim() == dims && v.dim() == dims, "sigattn: ", layout, " layout needs ", dims,
              "-D q, k, v; got q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "sigattn: CPU kernel got tensors on devices q ", q.device(), ", k ", k.device(), ", v ", v.device());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "sigattn: q, k, v dtypes differ: ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
              "sigattn: unsupported dtype ", dt, " (float32, bfloat16, float16 or float64)");
  TORCH_CHECK(k.sizes() == v.sizes(), "sigattn: k and v shapes differ: ", k.sizes(), " vs ", v.sizes());
  const int64_t D = q.size(-1), H = q.size(-2), H_kv = k.size(-2);
  TORCH_CHECK(k.size(-1) == D, "sigattn: head dim of q (", D, ") and k/v (", k.size(-1), ") differ");
  TORCH_CHECK(D >= 1 && D <= kMaxHeadDim, "sigattn: head dim ", D, " unsupported (1..", kMaxHeadDim, ")");
  TORCH_CHECK(H_kv >= 1 && H % H_kv == 0, "sigattn: number of q heads (", H, ") must be a multiple of k/v heads (",
              H_kv, ")");
  for (int64_t d = 0; d < dims - 2; ++d)
    TORCH_CHECK(q.size(d) == k.size(d), "sigattn: q ", q.sizes(), " and k/v ", k.sizes(), " differ in dim ", d);
}

void check_grad(const at::Tensor& grad_out, const at::Tensor& q) {
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "sigattn: grad_out shape ", grad_out.sizes(), " != q shape ", q.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type(), "sigattn: grad_out dtype ", grad_out.scalar_type(),
              " != q dtype ", q.scalar_type());
  TORCH_CHECK(grad_out.device() == q.device(), "sigattn: grad_out on ", grad_out.device(), ", q on ", q.device());
}

void check_index(const at::Tensor& idx, const char* name) {
  TORCH_CHECK(idx.scalar_type() == at::kInt, "sigattn: ", name, " must be int32, got ", idx.scalar_type());
  TORCH_CHECK(idx.dim() == 1, "sigattn: ", name, " must be 1-D, got shape ", idx.sizes());
  TORCH_CHECK(idx.device().is_cpu(), "sigattn: ", name, " on ", idx.device(), " but the inputs are on cpu");
}

// Padded layout [B, N, ...]: sequence b is tokens [b*N, b*N + seq_lens[b]).
std::vector<Segment> padded_segments(const at::Tensor& q, const std::optional<at::Tensor>& seq_lens) {
  const int64_t B = q.size(0), N = q.size(1);
  std::vector<Segment> segs(B);
  if (!seq_lens.has_value()) {
    for (int64_t b = 0; b < B; ++b) segs[b] = {b * N, N};
    return segs;
  }
  check_index(*seq_lens, "seq_lens");
  TORCH_CHECK(seq_lens->size(0) == B, "sigattn: seq_lens has ", seq_lens->size(0), " entries for batch size ", B);
  const at::Tensor lens = seq_lens->contiguous();
  const int32_t* l = lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(l[b] >= 0 && l[b] <= N, "sigattn: seq_lens[", b, "] = ", l[b], " is outside [0, N=", N, "]");
    segs[b] = {b * N, l[b]};
  }
  return segs;
}

// Varlen layout [T, ...]: sequence b is tokens [cu[b], cu[b+1]).
std::vector<Segment> varlen_segments(const at::Tensor& q, const at::Tensor& cu_seqlens, int64_t max_seqlen) {
  check_index(cu_seqlens, "cu_seqlens");
  const int64_t n = cu_seqlens.size(0), T = q.size(0);
  TORCH_CHECK(n >= 1, "sigattn: cu_seqlens needs at least one entry (B + 1)");
  const at::Tensor cu_c = cu_seqlens.contiguous();
  const int32_t* cu = cu_c.data_ptr<int32_t>();
  TORCH_CHECK(cu[0] == 0, "sigattn: cu_seqlens[0] = ", cu[0], " must be 0");
  TORCH_CHECK(cu[n - 1] == T, "sigattn: cu_seqlens[-1] = ", cu[n - 1], " != total tokens T = ", T);
  std::vector<Segment> segs(n - 1);
  for (int64_t b = 0; b + 1 < n; ++b) {
    TORCH_CHECK(cu[b + 1] >= cu[b], "sigattn: cu_seqlens is not non-decreasing at index ", b + 1, " (", cu[b],
                " -> ", cu[b + 1], ")");
    TORCH_CHECK(cu[b + 1] - cu[b] <= max_seqlen, "sigattn: sequence ", b, " has length ", cu[b + 1] - cu[b],
                " > max_seqlen = ", max_seqlen);
    segs[b] = {cu[b], cu[b + 1] - cu[b]};
  }
  return segs;
}

// [B, N, H, D] -> [B*N, H, D] token-packed view (copies only if the strides do not allow a view).
at::Tensor packed(const at::Tensor& x) { return x.reshape({-1, x.size(2), x.size(3)}); }

at::Tensor attn_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const std::optional<at::Tensor>& seq_lens, double scale, double bias, bool log_n_bias,
                    bool causal) {
  check_qkv(q, k, v, 4, "padded");
  const auto segs = padded_segments(q, seq_lens);
  return attention_forward_cpu(packed(q), packed(k), packed(v), segs, {scale, bias, log_n_bias, causal})
      .view(q.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_bwd(const at::Tensor& grad_out, const at::Tensor& q,
                                                        const at::Tensor& k, const at::Tensor& v,
                                                        const std::optional<at::Tensor>& seq_lens, double scale,
                                                        double bias, bool log_n_bias, bool causal) {
  check_qkv(q, k, v, 4, "padded");
  check_grad(grad_out, q);
  const auto segs = padded_segments(q, seq_lens);
  auto [dq, dk, dv] = attention_backward_cpu(packed(grad_out), packed(q), packed(k), packed(v), segs,
                                             {scale, bias, log_n_bias, causal});
  return {dq.view(q.sizes()), dk.view(k.sizes()), dv.view(v.sizes())};
}

at::Tensor attn_varlen_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
                           int64_t max_seqlen, double scale, double bias, bool log_n_bias, bool causal) {
  check_qkv(q, k, v, 3, "varlen");
  const auto segs = varlen_segments(q, cu_seqlens, max_seqlen);
  return attention_forward_cpu(q, k, v, segs, {scale, bias, log_n_bias, causal});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_varlen_bwd(const at::Tensor& grad_out, const at::Tensor& q,
                                                               const at::Tensor& k, const at::Tensor& v,
                                                               const at::Tensor& cu_seqlens, int64_t max_seqlen,
                                                               double scale, double bias, bool log_n_bias,
                                                               bool causal) {
  check_qkv(q, k, v, 3, "varlen");
  check_grad(grad_out, q);
  const auto segs = varlen_segments(q, cu_seqlens, max_seqlen);
  return attention_backward_cpu(grad_out, q, k, v, segs, {scale, bias, log_n_bias, causal});
}

}  // namespace
}  // namespace sigattn

TORCH_LIBRARY_IMPL(sigattn, CPU, m) {
  m.impl("attn_fwd", &sigattn::attn_fwd);
  m.impl("attn_bwd", &sigattn::attn_bwd);
  m.impl("attn_varlen_fwd", &sigattn::attn_varlen_fwd);
  m.impl("attn_varlen_bwd", &sigattn::attn_varlen_bwd);
}

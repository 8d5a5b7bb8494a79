// CPU sigmoid attention on a token-packed layout, shared by the padded and varlen ops.
//
// Tensors are viewed as q [T, H, D], k/v [T, H_kv, D]; a sequence is a run of `len` tokens starting at `start`.
// Forward, per sequence and head h (kv head h / (H / H_kv)), with b = bias - (log_n_bias ? log(len) : 0):
//   P = sigmoid(scale * Q K^T + b)   (causal: P_ij = 0 for j > i),   O = P V.
// Backward: dV = P^T dO, dP = dO V^T, dS = dP * P * (1 - P), dQ = scale dS K, dK = scale dS^T Q
// (dK/dV summed over the query heads sharing a kv head). Tokens outside every sequence get exact zeros.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace sigattn {

constexpr int64_t kMaxHeadDim = 256;

struct Segment {
  int64_t start;
  int64_t len;
};

struct AttnParams {
  double scale;
  double bias;
  bool log_n_bias;
  bool causal;
};

// out [T, H, D] in q's dtype; accumulation in fp32 (fp64 for fp64 inputs).
at::Tensor attention_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::vector<Segment>& segments, const AttnParams& p);

// (dq [T, H, D], dk [T, H_kv, D], dv [T, H_kv, D]) in q's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q,
                                                                      const at::Tensor& k, const at::Tensor& v,
                                                                      const std::vector<Segment>& segments,
                                                                      const AttnParams& p);

}  // namespace sigattn

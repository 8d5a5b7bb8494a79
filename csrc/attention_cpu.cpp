// Tiled CPU kernels for attention_cpu.h: query blocks of `rows` × all (causal: preceding) keys, converted to the
// accumulation dtype and multiplied with ATen BLAS; parallel over (sequence, head[, query block]) with at::parallel_for.
#include "attention_cpu.h"

#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <cmath>

namespace sigattn {
namespace {

// Rows per query block: keep the [rows, keys] score tile around 128K elements (512 KB fp32, fits L2).
int64_t block_rows(int64_t len) {
  constexpr int64_t kTileElems = 1 << 17;
  return std::min(len, std::clamp<int64_t>(kTileElems / std::max<int64_t>(len, 1), 16, 256));
}

at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// [len, D] view of head `h` of a segment, in the accumulation dtype (a copy only if the dtype differs).
at::Tensor head_slice(const at::Tensor& x, const Segment& s, int64_t h, at::ScalarType acc) {
  return x.narrow(0, s.start, s.len).select(1, h).to(acc);
}

double effective_bias(const AttnParams& p, int64_t len) {
  return p.bias - (p.log_n_bias ? std::log(static_cast<double>(len)) : 0.0);
}

// P = sigmoid(scale * Qb K^T + b) for query rows [i0, i0 + Qb.size(0)); causal zeroes keys j > i.
// scale and b are folded into the GEMM (addmm with a broadcast scalar), so the tile is touched once more only.
at::Tensor probabilities(const at::Tensor& qb, const at::Tensor& keys, int64_t i0, double b, const AttnParams& p) {
  at::Tensor s = at::addmm(at::scalar_tensor(b, qb.options()), qb, keys.t(), /*beta=*/1, /*alpha=*/p.scale);
  s.sigmoid_();
  if (p.causal) s.tril_(i0);
  return s;
}

// Grain (in tasks) so that each parallel chunk has ~2^18 multiply-adds: tiny calls stay on the calling thread, where
// a thread-pool hand-off would cost more than the work (badly so on an oversubscribed machine).
int64_t grain(double macs_total, int64_t n_tasks) {
  const double per_task = macs_total / std::max<int64_t>(n_tasks, 1);
  return std::max<int64_t>(1, static_cast<int64_t>(std::ceil((1 << 18) / std::max(per_task, 1.0))));
}

struct Task {
  int32_t seg;
  int32_t head;
  int64_t i0;
  int64_t rows;
};

// Worker threads do not inherit the caller's dispatch TLS: run the ATen calls below autograd.
struct KernelGuard {
  c10::impl::ExcludeDispatchKeyGuard no_autograd{c10::autograd_dispatch_keyset_with_ADInplaceOrView};
};

}  // namespace

at::Tensor attention_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::vector<Segment>& segments, const AttnParams& p) {
  const int64_t H = q.size(1), group = H / k.size(1);
  const at::ScalarType acc = acc_type(q);
  at::Tensor out = at::zeros(q.sizes(), q.options());

  std::vector<Task> tasks;
  for (size_t si = 0; si < segments.size(); ++si) {
    const int64_t len = segments[si].len, rows = block_rows(len);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i0 = 0; i0 < len; i0 += rows)
        tasks.push_back({static_cast<int32_t>(si), static_cast<int32_t>(h), i0, std::min(rows, len - i0)});
  }

  double macs = 0;
  for (const Task& t : tasks) macs += 2.0 * t.rows * (p.causal ? t.i0 + t.rows : segments[t.seg].len) * q.size(2);
  const int64_t n = static_cast<int64_t>(tasks.size());
  at::parallel_for(0, n, grain(macs, n), [&](int64_t begin, int64_t end) {
    KernelGuard guard;
    for (int64_t t = begin; t < end; ++t) {
      const Task& task = tasks[t];
      const Segment& s = segments[task.seg];
      const int64_t kv_head = task.head / group;
      const int64_t n_keys = p.causal ? task.i0 + task.rows : s.len;
      at::Tensor qb = q.narrow(0, s.start + task.i0, task.rows).select(1, task.head).to(acc);
      at::Tensor keys = k.narrow(0, s.start, n_keys).select(1, kv_head).to(acc);
      at::Tensor vals = v.narrow(0, s.start, n_keys).select(1, kv_head).to(acc);
      at::Tensor probs = probabilities(qb, keys, task.i0, effective_bias(p, s.len), p);
      out.narrow(0, s.start + task.i0, task.rows).select(1, task.head).copy_(at::mm(probs, vals));
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q,
                                                                      const at::Tensor& k, const at::Tensor& v,
                                                                      const std::vector<Segment>& segments,
                                                                      const AttnParams& p) {
  const int64_t T = q.size(0), H = q.size(1), H_kv = k.size(1), D = q.size(2), group = H / H_kv;
  const at::ScalarType acc = acc_type(q);
  at::Tensor dq = at::zeros(q.sizes(), q.options());
  // Per-query-head dK/dV in the accumulation dtype; summed over each GQA group at the end.
  at::Tensor dk_heads = at::zeros({T, H, D}, q.options().dtype(acc));
  at::Tensor dv_heads = at::zeros({T, H, D}, q.options().dtype(acc));

  const int64_t n_tasks = static_cast<int64_t>(segments.size()) * H;
  double macs = 0;
  for (const Segment& s : segments) macs += 5.0 * s.len * s.len * D * H;
  at::parallel_for(0, n_tasks, grain(macs, n_tasks), [&](int64_t begin, int64_t end) {
    KernelGuard guard;
    for (int64_t t = begin; t < end; ++t) {
      const Segment& s = segments[t / H];
      const int64_t h = t % H, kv_head = h / group;
      if (s.len == 0) continue;
      const double b = effective_bias(p, s.len);
      at::Tensor qh = head_slice(q, s, h, acc), doh = head_slice(grad_out, s, h, acc);
      at::Tensor kh = head_slice(k, s, kv_head, acc), vh = head_slice(v, s, kv_head, acc);
      at::Tensor dqh = dq.narrow(0, s.start, s.len).select(1, h);
      at::Tensor dkh = at::zeros({s.len, D}, qh.options()), dvh = at::zeros({s.len, D}, qh.options());
      const int64_t rows = block_rows(s.len);
      for (int64_t i0 = 0; i0 < s.len; i0 += rows) {
        const int64_t m = std::min(rows, s.len - i0), n_keys = p.causal ? i0 + m : s.len;
        at::Tensor qb = qh.narrow(0, i0, m), dob = doh.narrow(0, i0, m);
        at::Tensor keys = kh.narrow(0, 0, n_keys), vals = vh.narrow(0, 0, n_keys);
        at::Tensor probs = probabilities(qb, keys, i0, b, p);
        dvh.narrow(0, 0, n_keys).addmm_(probs.t(), dob);
        // dS / scale; the scale is applied to the [*, D] products instead of the [m, n_keys] tile.
        at::Tensor ds = at::sigmoid_backward(at::mm(dob, vals.t()), probs);
        dqh.narrow(0, i0, m).copy_(at::mm(ds, keys).mul_(p.scale));
        dkh.narrow(0, 0, n_keys).addmm_(ds.t(), qb, /*beta=*/1, /*alpha=*/p.scale);
      }
      dk_heads.narrow(0, s.start, s.len).select(1, h).copy_(dkh);
      dv_heads.narrow(0, s.start, s.len).select(1, h).copy_(dvh);
    }
  });
  auto reduce_group = [&](const at::Tensor& per_head) {
    return per_head.view({T, H_kv, group, D}).sum(2).to(q.scalar_type());
  };
  return {dq, reduce_group(dk_heads), reduce_group(dv_heads)};
}

}  // namespace sigattn

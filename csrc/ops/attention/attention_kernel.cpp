// Blockwise attention CPU kernels, forward and backward side by side (FlashAttention-2
// scheme). Built once per instruction set; T is the opmath type (float or double), every
// input already converted and contiguous.
//
// forward, per (b, h, query block Qi):            backward, per (b, h), key block Kj outer:
//   for each key block Kj not masked away:          for each query block Qi that sees Kj:
//     S  = scale * Qi Kj^T          [qn, kn]          S  = scale * Qi Kj^T, P = exp(S - lse_i)
//     m' = max(m, rowmax S)                           dVj += P^T dOi
//     P  = exp(S - m'), l = l e^(m-m') + rowsum P     dP  = dOi Vj^T
//     O  = O e^(m-m') + P Vj                          dS  = P * (dP - delta_i)
//   out = O / l,  lse = m + log l                     dQi += scale * dS Kj,  dKj += scale * dS^T Qi
//
// Only [q_chunk, k_chunk] score blocks exist; the backward saves nothing of size T x S.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "csrc/ops/attention/attention.h"
#include "csrc/ops/blas.h"
#include "csrc/ops/kernel_utils.h"

namespace bpt::cpu::CPU_CAPABILITY {
namespace {

using ops::AttentionParams;

struct Span {
  int64_t start, len;
};

enum class BlockMask { Skip, Full, Partial };

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// How the masks treat a (query block, key block) pair. seg is one batch row's [S] segment
// ids (or null); query i's document is seg[kv_offset + i]. Skipping on disjoint id ranges is
// exact for packed (non-decreasing) ids and safe for any ids.
BlockMask classify(const AttentionParams& p, const int64_t* seg, Span qs, Span ks) {
  bool partial = false;
  if (p.causal) {
    const int64_t first_q = p.kv_offset + qs.start, last_q = first_q + qs.len - 1;
    if (ks.start > last_q) return BlockMask::Skip;
    partial = ks.start + ks.len - 1 > first_q;
  }
  if (seg != nullptr) {
    const auto [qmin, qmax] = std::minmax_element(seg + p.kv_offset + qs.start, seg + p.kv_offset + qs.start + qs.len);
    const auto [kmin, kmax] = std::minmax_element(seg + ks.start, seg + ks.start + ks.len);
    if (*kmax < *qmin || *kmin > *qmax) return BlockMask::Skip;
    partial = partial || !(*qmin == *qmax && *kmin == *kmax && *qmin == *kmin);
  }
  return partial ? BlockMask::Partial : BlockMask::Full;
}

// Sets the masked entries of a [qs.len, ks.len] score block (ld ks.len) to -inf.
template <typename T>
void apply_mask(const AttentionParams& p, const int64_t* seg, Span qs, Span ks, T* scores) {
  for (int64_t i = 0; i < qs.len; ++i) {
    const int64_t q_pos = p.kv_offset + qs.start + i;
    T* row = scores + i * ks.len;
    const int64_t visible = p.causal ? std::clamp<int64_t>(q_pos - ks.start + 1, 0, ks.len) : ks.len;
    std::fill(row + visible, row + ks.len, kNegInf<T>);
    if (seg != nullptr) {
      const int64_t doc = seg[q_pos];
      for (int64_t j = 0; j < visible; ++j) {
        if (seg[ks.start + j] != doc) row[j] = kNegInf<T>;
      }
    }
  }
}

template <typename T>
at::vec::Vectorized<T> vexp(at::vec::Vectorized<T> x) {
  if constexpr (std::is_same_v<T, float>) {
    return x.exp_u20();  // within ~20 ulp; -inf gives 0
  } else {
    return x.exp();
  }
}

template <typename T>
T row_max(const T* x, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  return at::vec::reduce_all<T>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, x, n);
}

// x <- exp(x - shift), returning the sum of the new x: one pass over the row.
template <typename T>
T exp_shifted_sum(T* x, int64_t n, T shift) {
  using Vec = at::vec::Vectorized<T>;
  const Vec s(shift);
  Vec acc(T(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec e = vexp(Vec::loadu(x + i) - s);
    e.store(x + i);
    acc = acc + e;
  }
  if (i < n) {
    const Vec e = vexp(Vec::loadu(x + i, n - i) - s);
    e.store(x + i, n - i);
    acc = acc + Vec::set(Vec(T(0)), e, n - i);
  }
  return at::vec::vec_reduce_all<T>([](Vec a, Vec b) { return a + b; }, acc);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
void forward_typed(const AttentionParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& segment_ids, const at::Tensor& out, const at::Tensor& lse) {
  using Vec = at::vec::Vectorized<T>;
  const int64_t T_len = p.q_len, S = p.kv_len, D = p.head_dim;
  const int64_t n_q_blocks = ceil_div(T_len, p.q_chunk);
  const T scale = static_cast<T>(p.scale);
  const T* q_data = q.const_data_ptr<T>();
  const T* k_data = k.const_data_ptr<T>();
  const T* v_data = v.const_data_ptr<T>();
  const int64_t* seg_data = p.has_segments ? segment_ids.const_data_ptr<int64_t>() : nullptr;
  T* out_data = out.mutable_data_ptr<T>();
  T* lse_data = lse.mutable_data_ptr<T>();

  // Tasks are (b, h, query block), the last query blocks first: under a causal mask they
  // cost the most, and handing them out early keeps the threads' ends even.
  parallel_tasks(p.batch * p.q_heads * n_q_blocks, [&](const auto& next_task) {
    std::vector<T> scores(p.q_chunk * p.k_chunk), acc(p.q_chunk * D), m(p.q_chunk), l(p.q_chunk);
    for (int64_t task; (task = next_task()) >= 0;) {
      const int64_t bh = task / n_q_blocks, b = bh / p.q_heads, h = bh % p.q_heads;
      const int64_t q_block = n_q_blocks - 1 - task % n_q_blocks;
      const Span qs{q_block * p.q_chunk, std::min(p.q_chunk, T_len - q_block * p.q_chunk)};
      const int64_t kv_head = b * p.kv_heads + h / p.group();
      const T* Q = q_data + (bh * T_len + qs.start) * D;
      const T* K = k_data + kv_head * S * D;
      const T* V = v_data + kv_head * S * D;
      const int64_t* seg = seg_data ? seg_data + b * S : nullptr;

      std::fill(acc.begin(), acc.begin() + qs.len * D, T(0));
      std::fill(m.begin(), m.end(), kNegInf<T>);
      std::fill(l.begin(), l.end(), T(0));
      const int64_t k_end = p.causal ? std::min(S, p.kv_offset + qs.start + qs.len) : S;
      for (int64_t k0 = 0; k0 < k_end; k0 += p.k_chunk) {
        const Span ks{k0, std::min(p.k_chunk, S - k0)};
        const BlockMask mask = classify(p, seg, qs, ks);
        if (mask == BlockMask::Skip) continue;
        T* s = scores.data();
        blas::gemm(false, true, qs.len, ks.len, D, scale, Q, D, K + k0 * D, D, T(0), s, ks.len);
        if (mask == BlockMask::Partial) apply_mask(p, seg, qs, ks, s);
        for (int64_t i = 0; i < qs.len; ++i) {
          T* row = s + i * ks.len;
          const T m_new = std::max(m[i], row_max(row, ks.len));
          if (m_new == kNegInf<T>) {  // nothing visible in this row yet
            std::fill(row, row + ks.len, T(0));
            continue;
          }
          const T row_sum = exp_shifted_sum(row, ks.len, m_new);
          const T correction = std::exp(m[i] - m_new);  // 0 when m[i] = -inf
          l[i] = l[i] * correction + row_sum;
          m[i] = m_new;
          if (correction != T(1)) {
            const Vec c(correction);
            at::vec::map([c](Vec a) { return a * c; }, acc.data() + i * D, acc.data() + i * D, D);
          }
        }
        blas::gemm(false, false, qs.len, D, ks.len, T(1), s, ks.len, V + k0 * D, D, T(1), acc.data(), D);
      }

      T* O = out_data + (bh * T_len + qs.start) * D;
      T* L = lse_data + bh * T_len + qs.start;
      for (int64_t i = 0; i < qs.len; ++i) {
        // A row that sees no key (impossible with valid offsets) yields 0 and lse -inf.
        const Vec inv(l[i] > 0 ? T(1) / l[i] : T(0));
        at::vec::map([inv](Vec a) { return a * inv; }, O + i * D, acc.data() + i * D, D);
        L[i] = l[i] > 0 ? m[i] + std::log(l[i]) : kNegInf<T>;
      }
    }
  });
}

template <typename T>
void backward_typed(const AttentionParams& p, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& lse, const at::Tensor& delta,
                    const at::Tensor& segment_ids, const at::Tensor& grad_q, const at::Tensor& grad_k_per_head,
                    const at::Tensor& grad_v_per_head) {
  using Vec = at::vec::Vectorized<T>;
  const int64_t T_len = p.q_len, S = p.kv_len, D = p.head_dim;
  const T scale = static_cast<T>(p.scale);
  const T* q_data = q.const_data_ptr<T>();
  const T* k_data = k.const_data_ptr<T>();
  const T* v_data = v.const_data_ptr<T>();
  const T* go_data = grad_out.const_data_ptr<T>();
  const T* lse_data = lse.const_data_ptr<T>();
  const T* delta_data = delta.const_data_ptr<T>();
  const int64_t* seg_data = p.has_segments ? segment_ids.const_data_ptr<int64_t>() : nullptr;
  T* gq_data = grad_q.mutable_data_ptr<T>();
  T* gk_data = grad_k_per_head.mutable_data_ptr<T>();
  T* gv_data = grad_v_per_head.mutable_data_ptr<T>();

  // One task per (b, query head): it owns grad_q[b, h] and the per-head grad_k/grad_v slices.
  parallel_tasks(p.batch * p.q_heads, [&](const auto& next_task) {
    std::vector<T> probs(p.q_chunk * p.k_chunk), dprobs(p.q_chunk * p.k_chunk);
    for (int64_t bh; (bh = next_task()) >= 0;) {
      const int64_t b = bh / p.q_heads, h = bh % p.q_heads;
      const int64_t kv_head = b * p.kv_heads + h / p.group();
      const T* Q = q_data + bh * T_len * D;
      const T* dO = go_data + bh * T_len * D;
      const T* K = k_data + kv_head * S * D;
      const T* V = v_data + kv_head * S * D;
      const T* L = lse_data + bh * T_len;
      const T* delta_row = delta_data + bh * T_len;
      const int64_t* seg = seg_data ? seg_data + b * S : nullptr;
      T* dQ = gq_data + bh * T_len * D;
      T* dK = gk_data + bh * S * D;
      T* dV = gv_data + bh * S * D;

      for (int64_t k0 = 0; k0 < S; k0 += p.k_chunk) {
        const Span ks{k0, std::min(p.k_chunk, S - k0)};
        // Causal: the first query that sees key k0 is at kv_offset + i >= k0.
        const int64_t first_q = p.causal ? std::max<int64_t>(0, k0 - p.kv_offset) : 0;
        for (int64_t q0 = first_q / p.q_chunk * p.q_chunk; q0 < T_len; q0 += p.q_chunk) {
          const Span qs{q0, std::min(p.q_chunk, T_len - q0)};
          const BlockMask mask = classify(p, seg, qs, ks);
          if (mask == BlockMask::Skip) continue;
          T* P = probs.data();
          T* dP = dprobs.data();
          blas::gemm(false, true, qs.len, ks.len, D, scale, Q + q0 * D, D, K + k0 * D, D, T(0), P, ks.len);
          if (mask == BlockMask::Partial) apply_mask(p, seg, qs, ks, P);
          for (int64_t i = 0; i < qs.len; ++i) {
            const T row_lse = L[q0 + i];
            T* row = P + i * ks.len;
            if (row_lse == kNegInf<T>) {
              std::fill(row, row + ks.len, T(0));
            } else {
              const Vec shift(row_lse);
              at::vec::map([shift](Vec s) { return vexp(s - shift); }, row, row, ks.len);
            }
          }
          // dV_j += P^T dO_i
          blas::gemm(true, false, ks.len, D, qs.len, T(1), P, ks.len, dO + q0 * D, D, T(1), dV + k0 * D, D);
          // dP = dO_i V_j^T, then dS = P * (dP - delta_i), in place of dP
          blas::gemm(false, true, qs.len, ks.len, D, T(1), dO + q0 * D, D, V + k0 * D, D, T(0), dP, ks.len);
          for (int64_t i = 0; i < qs.len; ++i) {
            const Vec d(delta_row[q0 + i]);
            at::vec::map2([d](Vec pv, Vec dpv) { return pv * (dpv - d); }, dP + i * ks.len, P + i * ks.len,
                          dP + i * ks.len, ks.len);
          }
          // dQ_i += scale * dS K_j ; dK_j += scale * dS^T Q_i
          blas::gemm(false, false, qs.len, D, ks.len, scale, dP, ks.len, K + k0 * D, D, T(1), dQ + q0 * D, D);
          blas::gemm(true, false, ks.len, D, qs.len, scale, dP, ks.len, Q + q0 * D, D, T(1), dK + k0 * D, D);
        }
      }
    }
  });
}

}  // namespace

void attention_forward(const AttentionParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& segment_ids, const at::Tensor& out, const at::Tensor& lse) {
  if (q.scalar_type() == at::kDouble) {
    forward_typed<double>(p, q, k, v, segment_ids, out, lse);
  } else {
    forward_typed<float>(p, q, k, v, segment_ids, out, lse);
  }
}

void attention_backward(const AttentionParams& p, const at::Tensor& grad_out, const at::Tensor& q,
                        const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse, const at::Tensor& delta,
                        const at::Tensor& segment_ids, const at::Tensor& grad_q, const at::Tensor& grad_k_per_head,
                        const at::Tensor& grad_v_per_head) {
  if (q.scalar_type() == at::kDouble) {
    backward_typed<double>(p, grad_out, q, k, v, lse, delta, segment_ids, grad_q, grad_k_per_head, grad_v_per_head);
  } else {
    backward_typed<float>(p, grad_out, q, k, v, lse, delta, segment_ids, grad_q, grad_k_per_head, grad_v_per_head);
  }
}

}  // namespace bpt::cpu::CPU_CAPABILITY

// Blockwise attention CPU kernels, forward and backward side by side (FlashAttention-2
// scheme). Built once per instruction set. Inputs arrive contiguous, as fp32/fp64, or as
// bf16 when the AVX512-BF16 GEMM is available; T is the accumulation type (fp32 or fp64).
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
#include "csrc/ops/bf16_gemm.h"
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

// ---- GEMM back ends --------------------------------------------------------------------
// The loops below are written once over a back end that does the block products:
//   scores: S = scale * Q_i K_j^T            add_pv: acc += P V_j
//   dp:     dP = dO_i V_j^T                  add_dq: dQ_i += dS K_j
//   add_dv: dV_j += P^T dO_i                 add_dk: dK_j += dS^T Q_i   (dS carries the scale)
// BlasGemms runs them on fp32/fp64 operands through BLAS. Bf16Gemms runs them on the bf16
// inputs through the AVX512-BF16 kernel, rounding P and dS to bf16 as FlashAttention does
// on GPUs; it accumulates dK_j and dV_j transposed ([D, kn]) and adds them at the block's end.

template <typename T>
struct BlasGemms {
  using acc_t = T;
  struct Scratch {};

  const AttentionParams& p;
  const T *q, *k, *v, *grad_out;  // [B*H, len, D]; grad_out only for the backward

  Scratch scratch() const { return {}; }
  const T* rows(const T* base, int64_t head, int64_t len, Span s) const {
    return base + (head * len + s.start) * p.head_dim;
  }

  void scores(Scratch&, int64_t bh, int64_t kvh, Span qs, Span ks, T* s) const {
    const int64_t D = p.head_dim;
    blas::gemm(false, true, qs.len, ks.len, D, static_cast<T>(p.scale), rows(q, bh, p.q_len, qs), D,
               rows(k, kvh, p.kv_len, ks), D, T(0), s, ks.len);
  }
  void add_pv(Scratch&, int64_t kvh, Span qs, Span ks, const T* probs, T* acc) const {
    const int64_t D = p.head_dim;
    blas::gemm(false, false, qs.len, D, ks.len, T(1), probs, ks.len, rows(v, kvh, p.kv_len, ks), D, T(1), acc, D);
  }
  void begin_key_block(Scratch&, Span) const {}
  void add_dv(Scratch&, int64_t bh, Span qs, Span ks, const T* probs, T* dv) const {
    const int64_t D = p.head_dim;
    blas::gemm(true, false, ks.len, D, qs.len, T(1), probs, ks.len, rows(grad_out, bh, p.q_len, qs), D, T(1), dv, D);
  }
  void dp(Scratch&, int64_t bh, int64_t kvh, Span qs, Span ks, T* dprobs) const {
    const int64_t D = p.head_dim;
    blas::gemm(false, true, qs.len, ks.len, D, T(1), rows(grad_out, bh, p.q_len, qs), D, rows(v, kvh, p.kv_len, ks),
               D, T(0), dprobs, ks.len);
  }
  void add_dq(Scratch&, int64_t kvh, Span qs, Span ks, const T* ds, T* dq) const {
    const int64_t D = p.head_dim;
    blas::gemm(false, false, qs.len, D, ks.len, T(1), ds, ks.len, rows(k, kvh, p.kv_len, ks), D, T(1), dq, D);
  }
  void add_dk(Scratch&, int64_t bh, Span qs, Span ks, const T* ds, T* dk) const {
    const int64_t D = p.head_dim;
    blas::gemm(true, false, ks.len, D, qs.len, T(1), ds, ks.len, rows(q, bh, p.q_len, qs), D, T(1), dk, D);
  }
  void end_key_block(Scratch&, Span, T*, T*) const {}
};

struct Bf16Gemms {
  using acc_t = float;
  struct Scratch {
    std::vector<uint16_t> a;        // P or dS as a bf16 row-major A operand
    std::vector<uint16_t> b;        // P or dS packed as a B operand
    std::vector<float> dk_t, dv_t;  // [D, k_chunk] accumulators of dK_j^T, dV_j^T
  };

  const AttentionParams& p;
  const uint16_t *q, *grad_out;      // [B*Hq, T, D] rows
  const uint16_t *q_t, *grad_out_t;  // [B*Hq, D, T], backward only
  int64_t n_k_blocks = 0, kt_block = 0, kn_block = 0;
  // Per (kv head, key block): K^T and V^T packed as [D, kn] operands, K and V as [kn, D].
  std::vector<uint16_t> k_t, v_t, k_n, v_n;

  Bf16Gemms(const AttentionParams& params, const uint16_t* q_, const uint16_t* k, const uint16_t* v,
            const uint16_t* grad_out_, const uint16_t* q_t_, const uint16_t* grad_out_t_)
      : p(params), q(q_), grad_out(grad_out_), q_t(q_t_), grad_out_t(grad_out_t_) {
    const int64_t D = p.head_dim, heads = p.batch * p.kv_heads;
    const bool backward = grad_out != nullptr;
    n_k_blocks = ceil_div(p.kv_len, p.k_chunk);
    kt_block = bf16_packed_size(D, p.k_chunk);
    kn_block = bf16_packed_size(p.k_chunk, D);
    k_t.resize(heads * n_k_blocks * kt_block);
    v_n.resize(heads * n_k_blocks * kn_block);
    if (backward) {
      v_t.resize(heads * n_k_blocks * kt_block);
      k_n.resize(heads * n_k_blocks * kn_block);
    }
    at::parallel_for(0, heads * n_k_blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t hb = begin; hb < end; ++hb) {
        const Span ks{(hb % n_k_blocks) * p.k_chunk, std::min(p.k_chunk, p.kv_len - (hb % n_k_blocks) * p.k_chunk)};
        const uint16_t* k_rows = k + ((hb / n_k_blocks) * p.kv_len + ks.start) * D;
        const uint16_t* v_rows = v + ((hb / n_k_blocks) * p.kv_len + ks.start) * D;
        bf16_pack(k_rows, D, /*trans=*/true, D, ks.len, k_t.data() + hb * kt_block);
        bf16_pack(v_rows, D, /*trans=*/false, ks.len, D, v_n.data() + hb * kn_block);
        if (backward) {
          bf16_pack(v_rows, D, /*trans=*/true, D, ks.len, v_t.data() + hb * kt_block);
          bf16_pack(k_rows, D, /*trans=*/false, ks.len, D, k_n.data() + hb * kn_block);
        }
      }
    });
  }

  Scratch scratch() const {
    const int64_t block = p.q_chunk * p.k_chunk;
    Scratch s{std::vector<uint16_t>(block), std::vector<uint16_t>(bf16_packed_size(p.q_chunk, p.k_chunk)), {}, {}};
    if (grad_out != nullptr) {
      s.dk_t.resize(p.head_dim * p.k_chunk);
      s.dv_t.resize(p.head_dim * p.k_chunk);
    }
    return s;
  }
  int64_t block_index(int64_t kvh, Span ks) const { return kvh * n_k_blocks + ks.start / p.k_chunk; }
  const uint16_t* rows(const uint16_t* base, int64_t bh, Span qs) const {
    return base + (bh * p.q_len + qs.start) * p.head_dim;
  }

  void scores(Scratch&, int64_t bh, int64_t kvh, Span qs, Span ks, float* s) const {
    bf16_gemm(qs.len, ks.len, p.head_dim, rows(q, bh, qs), p.head_dim, k_t.data() + block_index(kvh, ks) * kt_block,
              s, ks.len, /*accumulate=*/false);
    using Vec = at::vec::Vectorized<float>;
    const Vec scale(static_cast<float>(p.scale));
    at::vec::map([scale](Vec x) { return x * scale; }, s, s, qs.len * ks.len);
  }
  void add_pv(Scratch& sc, int64_t kvh, Span qs, Span ks, const float* probs, float* acc) const {
    bf16_convert(probs, ks.len, qs.len, ks.len, sc.a.data(), ks.len);
    bf16_gemm(qs.len, p.head_dim, ks.len, sc.a.data(), ks.len, v_n.data() + block_index(kvh, ks) * kn_block, acc,
              p.head_dim, /*accumulate=*/true);
  }
  void begin_key_block(Scratch& sc, Span ks) const {
    std::fill(sc.dk_t.begin(), sc.dk_t.begin() + p.head_dim * ks.len, 0.0f);
    std::fill(sc.dv_t.begin(), sc.dv_t.begin() + p.head_dim * ks.len, 0.0f);
  }
  // dV_j^T [D, kn] += dO_i^T [D, qn] P [qn, kn]
  void add_dv(Scratch& sc, int64_t bh, Span qs, Span ks, const float* probs, float*) const {
    bf16_pack_from_float(probs, ks.len, qs.len, ks.len, sc.b.data());
    bf16_gemm(p.head_dim, ks.len, qs.len, grad_out_t + bh * p.head_dim * p.q_len + qs.start, p.q_len, sc.b.data(),
              sc.dv_t.data(), ks.len, /*accumulate=*/true);
  }
  void dp(Scratch&, int64_t bh, int64_t kvh, Span qs, Span ks, float* dprobs) const {
    bf16_gemm(qs.len, ks.len, p.head_dim, rows(grad_out, bh, qs), p.head_dim,
              v_t.data() + block_index(kvh, ks) * kt_block, dprobs, ks.len, /*accumulate=*/false);
  }
  void add_dq(Scratch& sc, int64_t kvh, Span qs, Span ks, const float* ds, float* dq) const {
    bf16_convert(ds, ks.len, qs.len, ks.len, sc.a.data(), ks.len);
    bf16_gemm(qs.len, p.head_dim, ks.len, sc.a.data(), ks.len, k_n.data() + block_index(kvh, ks) * kn_block, dq,
              p.head_dim, /*accumulate=*/true);
  }
  // dK_j^T [D, kn] += Q_i^T [D, qn] dS [qn, kn]
  void add_dk(Scratch& sc, int64_t bh, Span qs, Span ks, const float* ds, float*) const {
    bf16_pack_from_float(ds, ks.len, qs.len, ks.len, sc.b.data());
    bf16_gemm(p.head_dim, ks.len, qs.len, q_t + bh * p.head_dim * p.q_len + qs.start, p.q_len, sc.b.data(),
              sc.dk_t.data(), ks.len, /*accumulate=*/true);
  }
  void end_key_block(Scratch& sc, Span ks, float* dk, float* dv) const {
    for (int64_t j = 0; j < ks.len; ++j) {
      for (int64_t d = 0; d < p.head_dim; ++d) {
        dk[j * p.head_dim + d] += sc.dk_t[d * ks.len + j];
        dv[j * p.head_dim + d] += sc.dv_t[d * ks.len + j];
      }
    }
  }
};

// ---- the loops --------------------------------------------------------------------------

template <typename Gemms, typename T = typename Gemms::acc_t>
void forward_loop(const AttentionParams& p, const Gemms& g, const int64_t* seg_data, T* out_data, T* lse_data) {
  using Vec = at::vec::Vectorized<T>;
  const int64_t T_len = p.q_len, S = p.kv_len, D = p.head_dim;
  const int64_t n_q_blocks = ceil_div(T_len, p.q_chunk);
  // Tasks are (b, h, query block), the last query blocks first: under a causal mask they
  // cost the most, and handing them out early keeps the threads' ends even.
  parallel_tasks(p.batch * p.q_heads * n_q_blocks, [&](const auto& next_task) {
    auto scratch = g.scratch();
    std::vector<T> scores(p.q_chunk * p.k_chunk), acc(p.q_chunk * D), m(p.q_chunk), l(p.q_chunk);
    for (int64_t task; (task = next_task()) >= 0;) {
      const int64_t bh = task / n_q_blocks, b = bh / p.q_heads, h = bh % p.q_heads;
      const int64_t q_block = n_q_blocks - 1 - task % n_q_blocks;
      const Span qs{q_block * p.q_chunk, std::min(p.q_chunk, T_len - q_block * p.q_chunk)};
      const int64_t kvh = b * p.kv_heads + h / p.group();
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
        g.scores(scratch, bh, kvh, qs, ks, s);
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
        g.add_pv(scratch, kvh, qs, ks, s, acc.data());
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

// grad_k_slices / grad_v_slices are [B, Hkv, S, D] (one task per kv head, looping over its
// query heads) or [B, Hq, S, D] (one task per query head, more tasks when B * Hkv is below
// the thread count; the caller sums the group). Either way a task owns what it writes.
template <typename Gemms, typename T = typename Gemms::acc_t>
void backward_loop(const AttentionParams& p, const Gemms& g, const T* lse_data, const T* delta_data,
                   const int64_t* seg_data, T* gq_data, T* gk_data, T* gv_data, bool grads_per_kv_head) {
  using Vec = at::vec::Vectorized<T>;
  const int64_t T_len = p.q_len, S = p.kv_len, D = p.head_dim;
  const Vec scale(static_cast<T>(p.scale));
  const int64_t heads_per_task = grads_per_kv_head ? p.group() : 1;
  parallel_tasks(p.batch * p.q_heads / heads_per_task, [&](const auto& next_task) {
    auto scratch = g.scratch();
    std::vector<T> probs(p.q_chunk * p.k_chunk), dprobs(p.q_chunk * p.k_chunk);
    for (int64_t task; (task = next_task()) >= 0;) {
      T* dK = gk_data + task * S * D;
      T* dV = gv_data + task * S * D;
      for (int64_t bh = task * heads_per_task; bh < (task + 1) * heads_per_task; ++bh) {
        const int64_t b = bh / p.q_heads, h = bh % p.q_heads;
        const int64_t kvh = b * p.kv_heads + h / p.group();
        const T* L = lse_data + bh * T_len;
        const T* delta_row = delta_data + bh * T_len;
        const int64_t* seg = seg_data ? seg_data + b * S : nullptr;
        T* dQ = gq_data + bh * T_len * D;

        for (int64_t k0 = 0; k0 < S; k0 += p.k_chunk) {
          const Span ks{k0, std::min(p.k_chunk, S - k0)};
          g.begin_key_block(scratch, ks);
          // Causal: the first query that sees key k0 is at kv_offset + i >= k0.
          const int64_t first_q = p.causal ? std::max<int64_t>(0, k0 - p.kv_offset) : 0;
          for (int64_t q0 = first_q / p.q_chunk * p.q_chunk; q0 < T_len; q0 += p.q_chunk) {
            const Span qs{q0, std::min(p.q_chunk, T_len - q0)};
            const BlockMask mask = classify(p, seg, qs, ks);
            if (mask == BlockMask::Skip) continue;
            T* P = probs.data();
            T* dP = dprobs.data();
            g.scores(scratch, bh, kvh, qs, ks, P);
            if (mask == BlockMask::Partial) apply_mask(p, seg, qs, ks, P);
            for (int64_t i = 0; i < qs.len; ++i) {  // P = exp(S - lse)
              const T row_lse = L[q0 + i];
              T* row = P + i * ks.len;
              if (row_lse == kNegInf<T>) {
                std::fill(row, row + ks.len, T(0));
              } else {
                const Vec shift(row_lse);
                at::vec::map([shift](Vec x) { return vexp(x - shift); }, row, row, ks.len);
              }
            }
            g.add_dv(scratch, bh, qs, ks, P, dV + k0 * D);
            g.dp(scratch, bh, kvh, qs, ks, dP);
            for (int64_t i = 0; i < qs.len; ++i) {  // dS = scale * P * (dP - delta), in place of dP
              const Vec d(delta_row[q0 + i]);
              at::vec::map2([d, scale](Vec pv, Vec dpv) { return pv * (dpv - d) * scale; }, dP + i * ks.len,
                            P + i * ks.len, dP + i * ks.len, ks.len);
            }
            g.add_dq(scratch, kvh, qs, ks, dP, dQ + q0 * D);
            g.add_dk(scratch, bh, qs, ks, dP, dK + k0 * D);
          }
          g.end_key_block(scratch, ks, dK + k0 * D, dV + k0 * D);
        }
      }
    }
  });
}

const uint16_t* bf16_bits(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const uint16_t*>(t.const_data_ptr<at::BFloat16>()) : nullptr;
}

}  // namespace

void attention_forward(const AttentionParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& segment_ids, const at::Tensor& out, const at::Tensor& lse) {
  const int64_t* seg = p.has_segments ? segment_ids.const_data_ptr<int64_t>() : nullptr;
  switch (q.scalar_type()) {
    case at::kBFloat16: {
      const Bf16Gemms g(p, bf16_bits(q), bf16_bits(k), bf16_bits(v), nullptr, nullptr, nullptr);
      return forward_loop(p, g, seg, out.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>());
    }
    case at::kDouble: {
      const BlasGemms<double> g{p, q.const_data_ptr<double>(), k.const_data_ptr<double>(), v.const_data_ptr<double>(),
                                nullptr};
      return forward_loop(p, g, seg, out.mutable_data_ptr<double>(), lse.mutable_data_ptr<double>());
    }
    default: {
      const BlasGemms<float> g{p, q.const_data_ptr<float>(), k.const_data_ptr<float>(), v.const_data_ptr<float>(),
                               nullptr};
      return forward_loop(p, g, seg, out.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>());
    }
  }
}

void attention_backward(const AttentionParams& p, const at::Tensor& grad_out, const at::Tensor& q,
                        const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse, const at::Tensor& delta,
                        const at::Tensor& segment_ids, const at::Tensor& grad_q, const at::Tensor& grad_k_slices,
                        const at::Tensor& grad_v_slices) {
  const int64_t* seg = p.has_segments ? segment_ids.const_data_ptr<int64_t>() : nullptr;
  auto run = [&](const auto& g, auto* type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    backward_loop(p, g, lse.const_data_ptr<T>(), delta.const_data_ptr<T>(), seg, grad_q.mutable_data_ptr<T>(),
                  grad_k_slices.mutable_data_ptr<T>(), grad_v_slices.mutable_data_ptr<T>(),
                  grad_k_slices.size(1) == p.kv_heads);
  };
  switch (q.scalar_type()) {
    case at::kBFloat16: {
      // Transposed copies feed dK^T += Q^T dS and dV^T += dO^T P as row-major A operands.
      const at::Tensor q_t = q.transpose(2, 3).contiguous(), grad_out_t = grad_out.transpose(2, 3).contiguous();
      const Bf16Gemms g(p, bf16_bits(q), bf16_bits(k), bf16_bits(v), bf16_bits(grad_out), bf16_bits(q_t),
                        bf16_bits(grad_out_t));
      return run(g, static_cast<float*>(nullptr));
    }
    case at::kDouble:
      return run(BlasGemms<double>{p, q.const_data_ptr<double>(), k.const_data_ptr<double>(),
                                   v.const_data_ptr<double>(), grad_out.const_data_ptr<double>()},
                 static_cast<double*>(nullptr));
    default:
      return run(BlasGemms<float>{p, q.const_data_ptr<float>(), k.const_data_ptr<float>(), v.const_data_ptr<float>(),
                                  grad_out.const_data_ptr<float>()},
                 static_cast<float*>(nullptr));
  }
}

}  // namespace bpt::cpu::CPU_CAPABILITY

#pragma once
// Argument checks shared by every op's front: one message naming the op, the argument and
// what was expected. Written on sym sizes so the Meta kernels run them under dynamic shapes.

#include <ATen/core/Tensor.h>
#include <c10/core/SymBool.h>

#include <algorithm>

namespace bpt::ops {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name,
              " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                             const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ", ref_name,
              " (", ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref_name, "'s device (",
              ref.device(), "), got ", t.device());
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim, const char* layout) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", layout, " (", dim, "-D), got shape ", t.sym_sizes());
}

// A chunk (block) size: positive, or -1 for "no chunking" (llamabpt's convention).
inline void check_chunk(const char* op, const char* name, int64_t chunk) {
  TORCH_CHECK(chunk == -1 || chunk >= 1, op, ": ", name, " must be a positive block size or -1 (no chunking), got ",
              chunk);
}

// The block length a chunk argument means for a sequence of `length`: -1 or a chunk past the
// end is one block of everything; at least 1, so empty inputs still loop correctly.
inline int64_t resolve_chunk(int64_t chunk, int64_t length) {
  return std::max<int64_t>(1, chunk == -1 ? length : std::min(chunk, length));
}

// Accumulation dtype: fp64 for fp64, fp32 for everything else.
inline at::ScalarType accumulate_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_reduced_float(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

// A gradient (or saved output) that must match a tensor's shape and dtype exactly.
inline void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK(t.sym_sizes() == ref.sym_sizes(), op, ": ", name, " must have ", ref_name, "'s shape ", ref.sym_sizes(),
              ", got ", t.sym_sizes());
  check_same_dtype(op, name, t, ref, ref_name);
}

inline void check_size(const char* op, const char* name, const c10::SymInt& got, const c10::SymInt& want,
                       const char* what) {
  TORCH_SYM_CHECK(got.sym_eq(want), op, ": ", name, " must be ", want, " (", what, "), got ", got);
}

}  // namespace bpt::ops

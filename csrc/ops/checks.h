#pragma once
// Argument checks shared by every op's front: one message naming the op, the argument and
// what was expected. Written on sym sizes so the Meta kernels run them under dynamic shapes.

#include <ATen/core/Tensor.h>
#include <c10/core/SymBool.h>

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

inline void check_size(const char* op, const char* name, const c10::SymInt& got, const c10::SymInt& want,
                       const char* what) {
  TORCH_SYM_CHECK(got.sym_eq(want), op, ": ", name, " must be ", want, " (", what, "), got ", got);
}

}  // namespace bpt::ops

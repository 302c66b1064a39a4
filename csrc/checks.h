// Argument checks shared by the CPU and CUDA implementations; the Python layer checks the
// same things first (pssr/ops/_validate.py), these guard direct calls of torch.ops.pssr.*.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>

#include "surgery_math.h"

namespace pssr {

inline Reduce parse_reduce(c10::string_view reduce) {
  if (reduce == "max") return Reduce::Max;
  if (reduce == "sum") return Reduce::Sum;
  TORCH_CHECK(false, "pssr: reduce must be 'max' or 'sum', got '", std::string(reduce), "'");
}

inline Mode parse_mode(c10::string_view mode) {
  if (mode == "mean") return Mode::Mean;
  if (mode == "topk") return Mode::TopK;
  TORCH_CHECK(false, "pssr: mode must be 'mean' or 'topk', got '", std::string(mode), "'");
}

inline void check_image_batch(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, "pssr: ", name, " must have shape (B, C, H, W), got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "pssr: ", name, " must be floating, got ",
              t.scalar_type());
  TORCH_CHECK(t.size(1) >= 1, "pssr: ", name, " must have at least one channel, got ", t.sizes());
}

inline void check_surgery_args(const at::Tensor& x, const at::Tensor& grad, double alpha, int64_t k,
                               double fill) {
  check_image_batch("x", x);
  check_image_batch("grad", grad);
  TORCH_CHECK(x.sizes() == grad.sizes(), "pssr: x and grad must have the same shape, got ",
              x.sizes(), " and ", grad.sizes());
  TORCH_CHECK(x.scalar_type() == grad.scalar_type(), "pssr: x and grad must have the same dtype, got ",
              x.scalar_type(), " and ", grad.scalar_type());
  TORCH_CHECK(x.device() == grad.device(), "pssr: x and grad must be on the same device, got ",
              x.device(), " and ", grad.device());
  TORCH_CHECK(std::isfinite(alpha) && alpha >= 0, "pssr: alpha must be finite and >= 0, got ", alpha);
  TORCH_CHECK(std::isfinite(fill), "pssr: fill must be finite, got ", fill);
  TORCH_CHECK(k >= 0 && k <= x.size(2) * x.size(3), "pssr: k must be in [0, H*W], got ", k);
}

}  // namespace pssr

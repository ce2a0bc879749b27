// Shape and dtype checks of the criss-cross attention ops, shared by the CPU glue
// (csrc/cpu/cca.cpp) and the CUDA glue (csrc/cuda/cca.cu). They repeat armnet_ops/_checks.py for
// callers that reach torch.ops directly; each backend adds its own device (and size-limit) checks.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace armnet_ops {
namespace cca_checks {

// q, k (N, Cqk, H, W) and v (N, Cv, H, W), one dtype.
inline void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const char* op) {
  TORCH_CHECK(q.dim() == 4, op, ": argument 'q' must be 4-D (N, Cqk, H, W), got ", q.dim(), "-D");
  TORCH_CHECK(k.sizes() == q.sizes(), op, ": argument 'k' must have the shape of 'q' ", q.sizes(),
              ", got ", k.sizes());
  TORCH_CHECK(v.dim() == 4, op, ": argument 'v' must be 4-D (N, Cv, H, W), got ", v.dim(), "-D");
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(2) == q.size(2) && v.size(3) == q.size(3), op,
              ": argument 'v' must have N, H, W of 'q' (", q.size(0), ", ", q.size(2), ", ",
              q.size(3), "), got ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
}

// The saved tensors and the incoming gradient of cca_backward (grad_out) and of
// cca_residual_backward (pass op "cca_residual_backward", grad_name "grad_y").
inline void check_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& v,
                           const at::Tensor& out, const at::Tensor& lse,
                           const char* op = "cca_backward", const char* grad_name = "grad_out") {
  TORCH_CHECK(grad_out.sizes() == v.sizes() && out.sizes() == v.sizes(), op, ": ", grad_name,
              " and out must have the shape of v ", v.sizes(), ", got ", grad_out.sizes(), " and ",
              out.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(2) &&
                  lse.size(2) == q.size(3),
              op, ": lse must be (N, H, W), got ", lse.sizes());
}

// gamma of cca_residual_forward / cca_residual_backward: one element (any shape), in the op-math
// type of v (float32 for float16, bfloat16 and float32; float64 for float64), on v's device (the
// GPU kernels read it through its pointer).
inline void check_gamma(const at::Tensor& gamma, const at::Tensor& v, const char* op) {
  TORCH_CHECK(gamma.numel() == 1, op, ": argument 'gamma' must have one element, got ",
              gamma.numel(), " (shape ", gamma.sizes(), ")");
  const auto want = at::toOpMathType(v.scalar_type());
  TORCH_CHECK(gamma.scalar_type() == want, op, ": argument 'gamma' must have dtype ", want,
              " (the op-math type of v's ", v.scalar_type(), "), got ", gamma.scalar_type());
  TORCH_CHECK(gamma.device() == v.device(), op, ": argument 'gamma' must be on v's device ",
              v.device(), ", got ", gamma.device());
}

// residual of cca_residual_forward: v's shape, dtype and device (any strides).
inline void check_residual(const at::Tensor& residual, const at::Tensor& v, const char* op) {
  TORCH_CHECK(residual.sizes() == v.sizes(), op, ": argument 'residual' must have the shape of v ",
              v.sizes(), ", got ", residual.sizes());
  TORCH_CHECK(residual.scalar_type() == v.scalar_type(), op,
              ": argument 'residual' must have the dtype of v (", v.scalar_type(), "), got ",
              residual.scalar_type());
  TORCH_CHECK(residual.device() == v.device(), op, ": argument 'residual' must be on v's device ",
              v.device(), ", got ", residual.device());
}

// grad_energy of cca_weight_backward: (N, H+W-1, H, W) for q of shape (N, C, H, W).
inline void check_grad_energy(const at::Tensor& g, const at::Tensor& q) {
  const int64_t N = q.size(0), H = q.size(2), W = q.size(3);
  TORCH_CHECK(g.dim() == 4 && g.size(0) == N && g.size(1) == H + W - 1 && g.size(2) == H &&
                  g.size(3) == W,
              "cca_weight_backward: grad_energy must be (N, H+W-1, H, W) = (", N, ", ", H + W - 1,
              ", ", H, ", ", W, "), got ", g.sizes());
}

// attn (N, H+W-1, H, W) against v (N, C, H, W), one dtype: cca_map and its backward.
inline void check_attn(const at::Tensor& a, const at::Tensor& v, const char* op) {
  TORCH_CHECK(v.dim() == 4, op, ": argument 'v' must be 4-D (N, C, H, W), got ", v.dim(), "-D");
  const int64_t N = v.size(0), H = v.size(2), W = v.size(3);
  TORCH_CHECK(a.dim() == 4 && a.size(0) == N && a.size(1) == H + W - 1 && a.size(2) == H &&
                  a.size(3) == W,
              op, ": argument 'attn' must be (N, H+W-1, H, W) = (", N, ", ", H + W - 1, ", ", H,
              ", ", W, "), got ", a.sizes());
  TORCH_CHECK(a.scalar_type() == v.scalar_type(), op, ": attn and v must share one dtype, got ",
              a.scalar_type(), " and ", v.scalar_type());
}

// grad_out of cca_map_backward: the shape of v.
inline void check_map_grad(const at::Tensor& g, const at::Tensor& v) {
  TORCH_CHECK(g.sizes() == v.sizes(), "cca_map_backward: grad_out must have the shape of v ",
              v.sizes(), ", got ", g.sizes());
}

}  // namespace cca_checks
}  // namespace armnet_ops

// Shape, dtype and parameter checks of the CARAFE ops, shared by the CPU glue
// (csrc/cpu/carafe.cpp) and the CUDA glue (csrc/cuda/carafe.cu). They repeat armnet_ops/_checks.py
// for callers that reach torch.ops directly; each backend adds its own device (and size-limit)
// checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace armnet_ops {
namespace carafe_checks {

// features (N, C, H, W) and the masks: normalised (N, G·k², s·H, s·W), or for the fused ops raw
// logits (N, G·k²·s², H, W); masks_name is the argument's name in the op schema.
inline void check_inputs(const char* op, const at::Tensor& features, const at::Tensor& masks,
                         const char* masks_name, int64_t k, int64_t G, int64_t s, bool fused) {
  TORCH_CHECK(features.dim() == 4, op, ": argument 'features' must be 4-D, got ", features.dim(),
              "-D with shape ", features.sizes());
  TORCH_CHECK(masks.dim() == 4, op, ": argument '", masks_name, "' must be 4-D, got ",
              masks.dim(), "-D with shape ", masks.sizes());
  TORCH_CHECK(masks.scalar_type() == features.scalar_type(), op, ": argument '", masks_name,
              "' must have the dtype of 'features' (", features.scalar_type(), "), got ",
              masks.scalar_type());
  TORCH_CHECK(masks.device() == features.device(), op, ": argument '", masks_name,
              "' must be on the device of 'features' (", features.device(), "), got ",
              masks.device());
  TORCH_CHECK(k >= 1 && k % 2 == 1, op, ": argument 'kernel_size' must be odd and >= 1, got ", k);
  TORCH_CHECK(G >= 1, op, ": argument 'group_size' must be >= 1, got ", G);
  TORCH_CHECK(s >= 1, op, ": argument 'scale_factor' must be >= 1, got ", s);
  const int64_t N = features.size(0), C = features.size(1), H = features.size(2),
                W = features.size(3), k2 = k * k;
  TORCH_CHECK(C % G == 0, op, ": the channels of 'features' (", C,
              ") must be divisible by group_size (", G, "), got C % G = ", C % G);
  TORCH_CHECK(masks.size(0) == N, op, ": argument '", masks_name, "' must have N = ", N,
              " (dim 0), got ", masks.size(0));
  if (fused) {
    TORCH_CHECK(masks.size(1) == G * k2 * s * s, op, ": argument '", masks_name,
                "' must have G·k²·s² = ", G * k2 * s * s, " channels (dim 1), got ",
                masks.size(1));
    TORCH_CHECK(masks.size(2) == H && masks.size(3) == W, op, ": argument '", masks_name,
                "' must have the spatial size of 'features' (", H, ", ", W, "), got (",
                masks.size(2), ", ", masks.size(3), ")");
  } else {
    TORCH_CHECK(masks.size(1) == G * k2, op, ": argument '", masks_name, "' must have G·k² = ",
                G * k2, " channels (dim 1), got ", masks.size(1));
    TORCH_CHECK(masks.size(2) == s * H && masks.size(3) == s * W, op, ": argument '", masks_name,
                "' must have spatial size (s·H, s·W) = (", s * H, ", ", s * W, "), got (",
                masks.size(2), ", ", masks.size(3), ")");
  }
}

// grad_out of the backward ops: (N, C, s·H, s·W), the dtype and device of features.
inline void check_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& features,
                           int64_t s) {
  const int64_t N = features.size(0), C = features.size(1), sH = s * features.size(2),
                sW = s * features.size(3);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == N && grad_out.size(1) == C &&
                  grad_out.size(2) == sH && grad_out.size(3) == sW,
              op, ": argument 'grad_out' must have shape (", N, ", ", C, ", ", sH, ", ", sW,
              "), got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == features.scalar_type() &&
                  grad_out.device() == features.device(),
              op, ": argument 'grad_out' must have the dtype and device of 'features' (",
              features.scalar_type(), ", ", features.device(), "), got ",
              grad_out.scalar_type(), ", ", grad_out.device());
}

}  // namespace carafe_checks
}  // namespace armnet_ops

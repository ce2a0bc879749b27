// Directional dilated convolution: what the CPU glue (csrc/cpu/directional_conv.cpp) and the CUDA
// glue (csrc/cuda/directional_conv.cu) share. The input checks and the device-generic ATen
// backwards are defined once, in the CPU file (the same extension library); the CUDA file
// registers those backwards for the CUDA key and runs the checks before its own forward kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <tuple>

namespace armnet_ops {
namespace dconv {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
// grad_x, grad_weight, grad_bias, grad_scale, grad_shift.
using Grads = std::tuple<Tensor, Tensor, OptTensor, OptTensor, OptTensor>;
// grad_x, grad_weight_h, grad_weight_v, then (bias, scale, shift) gradients: bias_h, bias_v,
// scale_h, shift_h, scale_v, shift_v.
using PairGrads = std::tuple<Tensor, Tensor, Tensor, OptTensor, OptTensor, OptTensor, OptTensor,
                             OptTensor, OptTensor>;

// The checks of armnet_ops/_checks.py, for callers that reach torch.ops directly.
void check_inputs(const char* op, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                  at::IntArrayRef dilation, const OptTensor& scale, const OptTensor& shift);

Grads backward_aten(const Tensor& grad_y, const Tensor& x, const Tensor& weight,
                    const OptTensor& bias, const Tensor& y, at::IntArrayRef dilation,
                    const OptTensor& scale, const OptTensor& shift, bool relu);

// Both branches through backward_aten, grad_x summed.
PairGrads pair_backward_aten(const Tensor& grad_y_h, const Tensor& grad_y_v, const Tensor& x,
                             const Tensor& weight_h, const Tensor& weight_v,
                             const OptTensor& bias_h, const OptTensor& bias_v, const Tensor& y_h,
                             const Tensor& y_v, at::IntArrayRef dilation_h,
                             at::IntArrayRef dilation_v, const OptTensor& scale_h,
                             const OptTensor& shift_h, const OptTensor& scale_v,
                             const OptTensor& shift_v, bool relu);

}  // namespace dconv
}  // namespace armnet_ops

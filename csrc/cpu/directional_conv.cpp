// Directional dilated convolution: the CPU kernels, and the device-generic ATen backward that the
// CUDA backend reuses (csrc/cuda/directional_conv.cu registers it for the CUDA key).
//
//   y = act(conv2d(x, weight, bias, padding = (dh*(kh-1)/2, dw*(kw-1)/2), dilation = (dh, dw))
//           * scale + shift)
//
// The forward calls ATen's convolution (oneDNN / the dilated slow path) with scale and shift
// folded into its weight and bias, and applies the ReLU in place on its fresh output. The
// backward never needs the pre-scale convolution output z:
//
//   g_act   = grad_y * (y > 0)                      (the ReLU mask read off y; grad_y without ReLU)
//   gw_act  = wgrad(x, g_act)                       (the weight gradient of an unscaled conv)
//   grad_x  = dgrad(g_act, weight * scale)          (scale folded into the weight, per out channel)
//   grad_w  = gw_act * scale
//   grad_b  = sum(g_act) * scale
//   grad_scale = sum(g_act * z) = sum_{ci,kh,kw}(gw_act * weight) + bias * sum(g_act)
//   grad_shift = sum(g_act)
//
// so nothing is recomputed and nothing is divided by a scale that may be 0. Outputs: y, grad_x
// in x's suggested memory format (what the fake kernels in armnet_ops/directional_conv.py promise),
// grad_weight and the 1-D gradients contiguous.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "directional_conv.h"

namespace armnet_ops {
namespace dconv {

void check_inputs(const char* op, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                  at::IntArrayRef dilation, const OptTensor& scale, const OptTensor& shift) {
  TORCH_CHECK(x.dim() == 4, op, ": argument 'x' must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(weight.dim() == 4, op, ": argument 'weight' must be 4-D (C_out, C_in, kh, kw), got ",
              weight.dim(), "-D");
  TORCH_CHECK(dilation.size() == 2, op, ": argument 'dilation' must have 2 entries, got ",
              dilation.size());
  TORCH_CHECK(dilation[0] >= 1 && dilation[1] >= 1, op,
              ": argument 'dilation' must be >= 1, got (", dilation[0], ", ", dilation[1], ")");
  TORCH_CHECK(weight.size(2) % 2 == 1 && weight.size(3) % 2 == 1, op,
              ": the kernel (weight.shape[2:]) must be odd, got (", weight.size(2), ", ",
              weight.size(3), ")");
  TORCH_CHECK(weight.size(1) == x.size(1), op, ": argument 'weight' must have in_channels = ",
              x.size(1), " (dim 1), got ", weight.size(1));
  TORCH_CHECK(x.is_floating_point(), op, ": argument 'x' must be floating point, got ",
              x.scalar_type());
  const int64_t c_out = weight.size(0);
  const auto check_vec = [&](const char* name, const OptTensor& t) {
    if (!t.has_value()) return;
    TORCH_CHECK(t->dim() == 1 && t->size(0) == c_out, op, ": argument '", name,
                "' must have shape (", c_out, ",), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": argument '", name,
                "' must have the dtype of 'x' (", x.scalar_type(), "), got ", t->scalar_type());
    TORCH_CHECK(t->device() == x.device(), op, ": argument '", name,
                "' must be on the device of 'x' (", x.device(), "), got ", t->device());
  };
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op,
              ": argument 'weight' must have the dtype of 'x' (", x.scalar_type(), "), got ",
              weight.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), op, ": argument 'weight' must be on the device of 'x' (",
              x.device(), "), got ", weight.device());
  check_vec("bias", bias);
  check_vec("scale", scale);
  check_vec("shift", shift);
}

std::array<int64_t, 2> same_padding(const Tensor& weight, at::IntArrayRef dilation) {
  return {dilation[0] * (weight.size(2) - 1) / 2, dilation[1] * (weight.size(3) - 1) / 2};
}

Tensor forward_aten(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                    at::IntArrayRef dilation, const OptTensor& scale, const OptTensor& shift,
                    bool relu) {
  check_inputs("directional_conv2d_forward", x, weight, bias, dilation, scale, shift);
  const auto fmt = x.suggest_memory_format();
  const auto pad = same_padding(weight, dilation);
  if (x.size(0) == 0) {
    return at::empty({0, weight.size(0), x.size(2), x.size(3)}, x.options()).contiguous(fmt);
  }
  // The affine part of the epilogue is folded into the convolution, (conv(x, w) + b)·s + t =
  // conv(x, w·s) + (b·s + t): the per-channel products cost C_out·C_in·kh·kw multiplies instead
  // of two passes over y, which leaves one pass (the ReLU, NaN-keeping like torch.relu). The
  // folded weights are formed in the op-math type and rounded once to x's dtype.
  Tensor w = weight;
  OptTensor b = bias;
  if (scale.has_value() || shift.has_value()) {
    const auto acc = at::toOpMathType(x.scalar_type());
    const OptTensor s = scale.has_value() ? OptTensor(scale->to(acc)) : std::nullopt;
    OptTensor b_acc = bias.has_value() ? OptTensor(bias->to(acc)) : std::nullopt;
    if (s.has_value()) {
      w = (weight.to(acc) * s->view({-1, 1, 1, 1})).to(x.scalar_type());
      if (b_acc.has_value()) b_acc = *b_acc * *s;
    }
    if (shift.has_value()) b_acc = b_acc.has_value() ? *b_acc + shift->to(acc) : shift->to(acc);
    if (b_acc.has_value()) b = b_acc->to(x.scalar_type());
  }
  Tensor y = at::convolution(x, w, b, {1, 1}, pad, dilation, /*transposed=*/false, {0, 0},
                             /*groups=*/1);
  y = y.contiguous(fmt);
  if (relu) y.relu_();
  return y;
}

Grads backward_aten(const Tensor& grad_y, const Tensor& x, const Tensor& weight,
                    const OptTensor& bias, const Tensor& y, at::IntArrayRef dilation,
                    const OptTensor& scale, const OptTensor& shift, bool relu) {
  check_inputs("directional_conv2d_backward", x, weight, bias, dilation, scale, shift);
  TORCH_CHECK(grad_y.sizes() == y.sizes(), "directional_conv2d_backward: argument 'grad_y' must "
              "have the shape of 'y' ", y.sizes(), ", got ", grad_y.sizes());
  const auto fmt = x.suggest_memory_format();
  const auto pad = same_padding(weight, dilation);
  const auto vec = [](const OptTensor& t, const Tensor& v) -> OptTensor {
    return t.has_value() ? OptTensor(v) : std::nullopt;
  };
  if (x.size(0) == 0) {
    Tensor z = at::zeros({weight.size(0)}, weight.options());
    return {at::zeros_like(x).contiguous(fmt), at::zeros_like(weight).contiguous(), vec(bias, z),
            vec(scale, z.clone()), vec(shift, z.clone())};
  }
  // ReLU's gradient is taken as 0 where y == 0, as torch.relu's backward does.
  const Tensor g_act = relu ? at::threshold_backward(grad_y, y, 0) : grad_y;
  const Tensor w_eff = scale.has_value() ? weight * scale->view({-1, 1, 1, 1}) : weight;
  // One convolution_backward call for every device, asked for grad_x too except on CUDA. It
  // computes the weight gradient with the backend's own weight-gradient algorithm (cuDNN's wgrad
  // on CUDA, oneDNN / the dilated slow path on the CPU), so the CPU tests run the very call the
  // CUDA backend makes. Written as a forward convolution instead (x^T * g_act^T with stride =
  // dilation, a kh × kw output from an H × W "filter"), cuDNN can be very slow. Like F.conv2d's
  // backward (the reference backend), the weight gradient is deterministic when
  // torch.backends.cudnn.deterministic (or torch.use_deterministic_algorithms) asks for it.
  auto grads = at::convolution_backward(g_act, x, w_eff, std::nullopt, {1, 1}, pad, dilation,
                                        false, {0, 0}, 1, {!x.is_cuda(), true, false});
  const Tensor gw_act = std::get<1>(grads);  // depends on g_act and x only, not on the weight
  Tensor grad_x;
  if (x.is_cuda()) {
    // cuDNN's data-gradient algorithms may accumulate with atomics; the same gradient as a
    // same-padded forward convolution with the flipped, transposed kernel (an ordinary conv
    // shape) and `deterministic` requested:
    //   grad_x = conv(g_act, flip(w_eff)^T, same padding, dilation)            (stride 1)
    auto& ctx = at::globalContext();
    grad_x = at::_convolution(g_act, w_eff.flip({2, 3}).transpose(0, 1), std::nullopt, {1, 1},
                              pad, dilation, false, {0, 0}, 1, ctx.benchmarkCuDNN(),
                              /*deterministic=*/true, ctx.userEnabledCuDNN(),
                              ctx.allowTF32CuDNN());
  } else {
    grad_x = std::get<0>(grads);
  }
  // The small reductions run in the op-math type (fp32 for fp16/bf16), rounded once at the end.
  const auto acc = at::toOpMathType(x.scalar_type());
  const auto dtype = x.scalar_type();
  const Tensor sum_g = g_act.sum({0, 2, 3}, /*keepdim=*/false, acc);
  const Tensor gw = gw_act.to(acc);
  const OptTensor s = scale.has_value() ? OptTensor(scale->to(acc)) : std::nullopt;
  Tensor grad_w = (s.has_value() ? gw * s->view({-1, 1, 1, 1}) : gw).to(dtype);
  OptTensor grad_b, grad_scale, grad_shift;
  if (bias.has_value()) grad_b = (s.has_value() ? sum_g * *s : sum_g).to(dtype);
  if (scale.has_value()) {
    Tensor gs = (gw * weight.to(acc)).sum({1, 2, 3});
    if (bias.has_value()) gs = gs + bias->to(acc) * sum_g;
    grad_scale = gs.to(dtype);
  }
  if (shift.has_value()) grad_shift = sum_g.to(dtype, /*non_blocking=*/false, /*copy=*/true);
  return {grad_x.contiguous(fmt), grad_w.contiguous(), grad_b, grad_scale, grad_shift};
}

// ---- the horizontal + vertical pair --------------------------------------------------------------

// Both branches through backward_aten, grad_x summed. Device-generic (the CUDA key reuses it).
PairGrads pair_backward_aten(const Tensor& grad_y_h, const Tensor& grad_y_v, const Tensor& x,
                             const Tensor& weight_h, const Tensor& weight_v,
                             const OptTensor& bias_h, const OptTensor& bias_v, const Tensor& y_h,
                             const Tensor& y_v, at::IntArrayRef dilation_h,
                             at::IntArrayRef dilation_v, const OptTensor& scale_h,
                             const OptTensor& shift_h, const OptTensor& scale_v,
                             const OptTensor& shift_v, bool relu) {
  auto [gx_h, gw_h, gb_h, gs_h, gt_h] =
      backward_aten(grad_y_h, x, weight_h, bias_h, y_h, dilation_h, scale_h, shift_h, relu);
  auto [gx_v, gw_v, gb_v, gs_v, gt_v] =
      backward_aten(grad_y_v, x, weight_v, bias_v, y_v, dilation_v, scale_v, shift_v, relu);
  gx_h.add_(gx_v);
  return {gx_h, gw_h, gw_v, gb_h, gb_v, gs_h, gt_h, gs_v, gt_v};
}

std::tuple<Tensor, Tensor> pair_forward_cpu(const Tensor& x, const Tensor& weight_h,
                                            const Tensor& weight_v, const OptTensor& bias_h,
                                            const OptTensor& bias_v, at::IntArrayRef dilation_h,
                                            at::IntArrayRef dilation_v, const OptTensor& scale_h,
                                            const OptTensor& shift_h, const OptTensor& scale_v,
                                            const OptTensor& shift_v, bool relu) {
  return {forward_aten(x, weight_h, bias_h, dilation_h, scale_h, shift_h, relu),
          forward_aten(x, weight_v, bias_v, dilation_v, scale_v, shift_v, relu)};
}

}  // namespace dconv

TORCH_LIBRARY_IMPL(armnet_ops, CPU, m) {
  m.impl("directional_conv2d_forward", &dconv::forward_aten);
  m.impl("directional_conv2d_backward", &dconv::backward_aten);
  m.impl("directional_conv2d_pair_forward", &dconv::pair_forward_cpu);
  m.impl("directional_conv2d_pair_backward", &dconv::pair_backward_aten);
}

}  // namespace armnet_ops

// The schemas of every armnet_ops operator, declared once. Kernels live elsewhere:
// csrc/cpu/*.cpp register for the CPU key, csrc/cuda/*.cu for the CUDA key, and the Triton
// kernels register Python implementations of the `*_triton` twins (armnet_ops/triton/).
// Fake (meta) kernels and autograd are registered in Python, one module per op.
//
// Each forward saves what its backward needs and nothing more; each backward is an op of its
// own, so that torch.compile and opcheck see through the whole graph.

#include <torch/library.h>

TORCH_LIBRARY(armnet_ops, m) {
  // ---- criss-cross attention (armnet_ops/cca.py) -------------------------------------------
  // out (N, Cv, H, W); lse (N, H, W) in the op-math type (float32, float64 for float64 inputs):
  // the log-sum-exp of the H+W-1 scaled energies of each pixel, the only statistic the backward
  // needs to rebuild the weights.
  m.def("cca_forward(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "cca_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // CCNet's block with its epilogue fused: y = gamma * out + residual. gamma holds one element
  // in the op-math type; residual has v's shape and dtype. out and lse are returned for the
  // backward. grad_residual is grad_y itself (the caller's); grad_gamma = sum(grad_y * out),
  // reduced in a fixed order, with gamma's shape.
  m.def(
      "cca_residual_forward(Tensor q, Tensor k, Tensor v, Tensor residual, Tensor gamma, "
      "float scale) -> (Tensor y, Tensor out, Tensor lse)");
  m.def(
      "cca_residual_backward(Tensor grad_y, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor gamma, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, "
      "Tensor grad_gamma)");
  // Frees the buffers the CPU kernels keep between calls, scratch and freed outputs (see
  // cpu/buffer_cache.h); returns the bytes freed.
  m.def("cpu_scratch_release() -> int");
  // The two-op API of CCNet: energy (N, H+W-1, H, W), row keys first, then the column without
  // the pixel itself.
  m.def("cca_weight(Tensor q, Tensor k) -> Tensor");
  m.def("cca_weight_backward(Tensor grad_energy, Tensor q, Tensor k) -> (Tensor grad_q, Tensor grad_k)");
  m.def("cca_map(Tensor attn, Tensor v) -> Tensor");
  m.def("cca_map_backward(Tensor grad_out, Tensor attn, Tensor v) -> (Tensor grad_attn, Tensor grad_v)");

  // ---- CARAFE (armnet_ops/carafe.py) ---------------------------------------------------------
  m.def(
      "carafe_forward(Tensor features, Tensor masks, int kernel_size, int group_size, "
      "int scale_factor) -> Tensor");
  m.def(
      "carafe_backward(Tensor grad_out, Tensor features, Tensor masks, int kernel_size, "
      "int group_size, int scale_factor) -> (Tensor grad_features, Tensor grad_masks)");
  m.def(
      "carafe_fused_forward(Tensor features, Tensor mask_logits, int kernel_size, int group_size, "
      "int scale_factor) -> Tensor");
  m.def(
      "carafe_fused_backward(Tensor grad_out, Tensor features, Tensor mask_logits, int kernel_size, "
      "int group_size, int scale_factor) -> (Tensor grad_features, Tensor grad_mask_logits)");

  // ---- directional dilated convolution (armnet_ops/directional_conv.py) ----------------------
  // y = act((conv2d(x, weight, bias, same padding, dilation) * scale + shift)); scale and shift
  // per output channel (a folded BatchNorm); relu selects the activation.
  m.def(
      "directional_conv2d_forward(Tensor x, Tensor weight, Tensor? bias, int[2] dilation, "
      "Tensor? scale, Tensor? shift, bool relu) -> Tensor");
  m.def(
      "directional_conv2d_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias, Tensor y, "
      "int[2] dilation, Tensor? scale, Tensor? shift, bool relu) -> (Tensor grad_x, "
      "Tensor grad_weight, Tensor? grad_bias, Tensor? grad_scale, Tensor? grad_shift)");
  // The horizontal and vertical branches of ARM-Net's DTM read the same input: one op computes
  // both, y_h = act(conv(x, weight_h, dilation_h) ...) and y_v likewise, with one pass over x
  // where the backend fuses them (Triton). The backward sums both branches into grad_x.
  m.def(
      "directional_conv2d_pair_forward(Tensor x, Tensor weight_h, Tensor weight_v, Tensor? bias_h, "
      "Tensor? bias_v, int[2] dilation_h, int[2] dilation_v, Tensor? scale_h, Tensor? shift_h, "
      "Tensor? scale_v, Tensor? shift_v, bool relu) -> (Tensor y_h, Tensor y_v)");
  m.def(
      "directional_conv2d_pair_backward(Tensor grad_y_h, Tensor grad_y_v, Tensor x, Tensor weight_h, "
      "Tensor weight_v, Tensor? bias_h, Tensor? bias_v, Tensor y_h, Tensor y_v, int[2] dilation_h, "
      "int[2] dilation_v, Tensor? scale_h, Tensor? shift_h, Tensor? scale_v, Tensor? shift_v, "
      "bool relu) -> (Tensor grad_x, Tensor grad_weight_h, Tensor grad_weight_v, Tensor? grad_bias_h, "
      "Tensor? grad_bias_v, Tensor? grad_scale_h, Tensor? grad_shift_h, Tensor? grad_scale_v, "
      "Tensor? grad_shift_v)");
}

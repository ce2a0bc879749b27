// Criss-cross attention on the CPU: the fused op (cca_forward / cca_backward), CCNet's block with
// its residual epilogue (cca_residual_forward / cca_residual_backward) and CCNet's two-op API
// (cca_weight / cca_map and their backwards). fp32 and fp64.
//
// The residual epilogue is fused: the forward writes y = gamma · out + residual from the same
// accumulator as out, and the backward reads grad_y and applies gamma as a factor inside the
// kernel (the gradient of out is gamma · grad_y, and everything is linear in it); its per-pixel
// D_u = <grad_y_u, out_u> (which the backward needs anyway, times gamma) also gives
// grad_gamma = sum_u D_u.
//
// Layout: q, k (N, Cqk, H, W), v (N, Cv, H, W), all made contiguous NCHW by the glue. The key
// set of pixel u = (h, w) is its row (h, z), z in [0, W), and its column (j, w), j != h.
//
// The fused forward works one image row (n, h) at a time (at::parallel_for over N·H). For the W
// pixels of the row it builds a (W + H) x W block of energies, key-major so that every inner
// loop runs along w (contiguous in NCHW and vectorisable): block rows z < W are the row keys,
// block rows W + j the column keys, with j == h masked to -inf (that key is the pixel itself,
// already counted as a row key). One softmax per pixel over that block gives the weights; the
// block is O(W·(H+W)) per thread and is never written to memory as a whole tensor. The forward
// saves out and the log-sum-exp (N, H, W) (in the op-math type: float for fp32, double for fp64).
//
// The backward recomputes the weights from lse and is deterministic (gather, no scatter between
// threads) in two passes:
//   A. per pixel row h: P, dP = <dO_u, v_s>, D_u = <dO_u, O_u>, dS = P (dP - D) · scale; then
//      dq for the row, and the row-key part of dk, dv for keys in row h (only the pixels of row h
//      see them as row keys).
//   B. per key row j: the column-key part of dk, dv for the keys (j, w): the pixels (h, w),
//      h != j, are visited in a fixed order and their weights recomputed from q, k, lse and D.
// Each pass writes only the rows it owns, so the result does not depend on the thread count.

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <cmath>
#include <limits>
#include <vector>

#include "cca_checks.h"

namespace armnet_ops {
namespace {

#define ARMNET_ISA_KERNELS "cca_kernels.h"
#include "isa_variants.h"

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  cca_checks::check_qkv(q, k, v, op);
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), op,
              ": expected CPU tensors");
}

// The fused forward: (y, out, lse). With `residual` defined (the residual op) the kernel also
// writes y = gamma · out + residual from the accumulator of out; otherwise y is undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& q_, const at::Tensor& k_,
                                                       const at::Tensor& v_, double scale,
                                                       const at::Tensor& residual_,
                                                       const at::Tensor& gamma) {
  auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const int64_t N = q.size(0), Cqk = q.size(1), H = q.size(2), W = q.size(3), Cv = v.size(1);
  auto out = at::empty({N, Cv, H, W}, v.options());
  auto lse = at::empty({N, H, W}, q.options().dtype(at::toOpMathType(q.scalar_type())));
  const bool epilogue = residual_.defined();
  at::Tensor residual, y;
  if (epilogue) {
    residual = residual_.contiguous();
    y = at::empty({N, Cv, H, W}, v.options());
  }
  if (out.numel() == 0 && lse.numel() == 0) return {y, out, lse};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cca_forward_cpu", [&] {
    // A CPU tensor: reading gamma here costs no device synchronisation.
    const scalar_t g = epilogue ? gamma.item<scalar_t>() : scalar_t(0);
    ARMNET_CPU_KERNEL(forward_kernel<scalar_t>, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                      v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                      N, Cqk, Cv, H, W, static_cast<scalar_t>(scale),
                      epilogue ? residual.data_ptr<scalar_t>() : nullptr,
                      epilogue ? y.data_ptr<scalar_t>() : nullptr, g);
  });
  return {y, out, lse};
}

std::tuple<at::Tensor, at::Tensor> cca_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& v, double scale) {
  check_inputs(q, k, v, "cca_forward");
  auto [y, out, lse] = forward(q, k, v, scale, at::Tensor(), at::Tensor());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cca_residual_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& residual,
    const at::Tensor& gamma, double scale) {
  const char* op = "cca_residual_forward";
  check_inputs(q, k, v, op);
  cca_checks::check_residual(residual, v, op);
  cca_checks::check_gamma(gamma, v, op);
  return forward(q, k, v, scale, residual, gamma);
}

// The fused backward: (grad_q, grad_k, grad_v, D) where D (N, H, W) holds <go_u, out_u> per
// pixel; the gradient of out is gamma · go (gamma = 1 for cca_backward).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out_, const at::Tensor& lse_, double scale, double gamma) {
  auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  auto go = grad.to(v.scalar_type()).contiguous(), out = out_.contiguous();
  auto lse = lse_.to(q.scalar_type()).contiguous();
  const int64_t N = q.size(0), Cqk = q.size(1), H = q.size(2), W = q.size(3), Cv = v.size(1);
  auto gq = at::empty_like(q), gk = at::empty_like(k), gv = at::empty_like(v);
  auto D = at::empty({N, H, W}, q.options());
  if (N * H * W == 0) return {gq.zero_(), gk.zero_(), gv.zero_(), D};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cca_backward_cpu", [&] {
    ARMNET_CPU_KERNEL(backward_kernel<scalar_t>, go.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
                      k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                      lse.data_ptr<scalar_t>(), gq.data_ptr<scalar_t>(), gk.data_ptr<scalar_t>(),
                      gv.data_ptr<scalar_t>(), D.data_ptr<scalar_t>(), N, Cqk, Cv, H, W,
                      static_cast<scalar_t>(scale), static_cast<scalar_t>(gamma));
  });
  return {gq, gk, gv, D};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cca_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale) {
  check_inputs(q, k, v, "cca_backward");
  cca_checks::check_backward(grad_out, q, v, out, lse);
  auto [gq, gk, gv, D] = backward(grad_out, q, k, v, out, lse, scale, 1.0);
  return {gq, gk, gv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cca_residual_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& gamma, double scale) {
  const char* op = "cca_residual_backward";
  check_inputs(q, k, v, op);
  cca_checks::check_backward(grad_y, q, v, out, lse, op, "grad_y");
  cca_checks::check_gamma(gamma, v, op);
  auto [gq, gk, gv, D] = backward(grad_y, q, k, v, out, lse, scale, gamma.item<double>());
  // grad_gamma = sum(grad_y · out) = sum_u D_u: one serial pass in double over the per-pixel
  // partials, so the order (and the result) is fixed whatever the thread count.
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES(D.scalar_type(), "cca_residual_backward_cpu", [&] {
    const scalar_t* d = D.data_ptr<scalar_t>();
    for (int64_t i = 0, n = D.numel(); i < n; ++i) total += static_cast<double>(d[i]);
  });
  auto grad_gamma = at::full(gamma.sizes(), total, gamma.options());
  return {gq, gk, gv, grad_gamma};
}

at::Tensor cca_weight_cpu(const at::Tensor& q_, const at::Tensor& k_) {
  check_inputs(q_, k_, q_, "cca_weight");
  auto q = q_.contiguous(), k = k_.contiguous();
  const int64_t N = q.size(0), C = q.size(1), H = q.size(2), W = q.size(3);
  auto e = at::empty({N, H + W - 1, H, W}, q.options());
  if (e.numel() == 0) return e;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cca_weight_cpu", [&] {
    ARMNET_CPU_KERNEL(weight_kernel<scalar_t>, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                      e.data_ptr<scalar_t>(), N, C, H, W);
  });
  return e;
}

std::tuple<at::Tensor, at::Tensor> cca_weight_backward_cpu(const at::Tensor& g_,
                                                           const at::Tensor& q_,
                                                           const at::Tensor& k_) {
  check_inputs(q_, k_, q_, "cca_weight_backward");
  const int64_t N = q_.size(0), C = q_.size(1), H = q_.size(2), W = q_.size(3);
  cca_checks::check_grad_energy(g_, q_);
  auto q = q_.contiguous(), k = k_.contiguous(), g = g_.to(q.scalar_type()).contiguous();
  auto gq = at::zeros_like(q), gk = at::zeros_like(k);
  if (N * H * W == 0) return {gq, gk};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cca_weight_backward_cpu", [&] {
    ARMNET_CPU_KERNEL(weight_backward_kernel<scalar_t>, g.data_ptr<scalar_t>(),
                      q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), gq.data_ptr<scalar_t>(),
                      gk.data_ptr<scalar_t>(), N, C, H, W);
  });
  return {gq, gk};
}

at::Tensor cca_map_cpu(const at::Tensor& a_, const at::Tensor& v_) {
  cca_checks::check_attn(a_, v_, "cca_map");
  auto a = a_.contiguous(), v = v_.contiguous();
  const int64_t N = v.size(0), C = v.size(1), H = v.size(2), W = v.size(3);
  auto out = at::empty_like(v);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "cca_map_cpu", [&] {
    ARMNET_CPU_KERNEL(map_kernel<scalar_t>, a.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                      out.data_ptr<scalar_t>(), N, C, H, W);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> cca_map_backward_cpu(const at::Tensor& g_, const at::Tensor& a_,
                                                        const at::Tensor& v_) {
  cca_checks::check_attn(a_, v_, "cca_map_backward");
  cca_checks::check_map_grad(g_, v_);
  auto a = a_.contiguous(), v = v_.contiguous(), g = g_.to(v.scalar_type()).contiguous();
  const int64_t N = v.size(0), C = v.size(1), H = v.size(2), W = v.size(3);
  auto ga = at::zeros_like(a), gv = at::zeros_like(v);
  if (N * H * W == 0) return {ga, gv};
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "cca_map_backward_cpu", [&] {
    ARMNET_CPU_KERNEL(map_backward_kernel<scalar_t>, g.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
                      v.data_ptr<scalar_t>(), ga.data_ptr<scalar_t>(), gv.data_ptr<scalar_t>(),
                      N, C, H, W);
  });
  return {ga, gv};
}

}  // namespace

TORCH_LIBRARY_IMPL(armnet_ops, CPU, m) {
  m.impl("cca_forward", &cca_forward_cpu);
  m.impl("cca_backward", &cca_backward_cpu);
  m.impl("cca_residual_forward", &cca_residual_forward_cpu);
  m.impl("cca_residual_backward", &cca_residual_backward_cpu);
  m.impl("cca_weight", &cca_weight_cpu);
  m.impl("cca_weight_backward", &cca_weight_backward_cpu);
  m.impl("cca_map", &cca_map_cpu);
  m.impl("cca_map_backward", &cca_map_backward_cpu);
}

}  // namespace armnet_ops

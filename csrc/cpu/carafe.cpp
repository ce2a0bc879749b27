// CARAFE on the CPU: carafe_forward/backward (normalised high-resolution masks) and
// carafe_fused_forward/backward (raw low-resolution logits, pixel shuffle + softmax on the fly).
//
// Layout (contiguous NCHW after the glue below): features (N, C, H, W); masks (N, G·k², sH, sW)
// with channel g·k² + ky·k + kx = tap (ky, kx) of group g; logits (N, G·k²·s², H, W) with channel
// (g·k² + t)·s² + i·s + j = tap t of group g at child (i, j) of the low-resolution pixel (the
// pixel_shuffle order). out (N, C, sH, sW).
//
// Work is split into units (n, g, block of BH low-resolution rows) run by at::parallel_for. Every
// output element is written by exactly one unit, so the backward is a deterministic gather: no
// unit adds into memory another unit writes.
//
// The fused ops never materialise the high-resolution mask. Each unit normalises the logits of
// the rows it needs into a small per-thread scratch (k² × rows × sW), which is then reused for all
// C/G channels of the group. The backward recomputes it; the halo of r low-resolution rows above
// and below the block is recomputed by the neighbouring unit too (cost (BH + 2r) / BH of a
// softmax, small against the C/G·k² multiply-adds per pixel).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "carafe_checks.h"

namespace armnet_ops {
namespace {

// Low-resolution rows per work unit.
constexpr int64_t kBlockRows = 8;

struct Geometry {
  int64_t N, C, H, W, k, G, s, r, k2, Cg, sH, sW;
};

Geometry check_inputs(const char* op, const at::Tensor& features, const at::Tensor& masks,
                      const char* masks_name, int64_t k, int64_t G, int64_t s, bool fused) {
  carafe_checks::check_inputs(op, features, masks, masks_name, k, G, s, fused);
  Geometry g{};
  g.N = features.size(0);
  g.C = features.size(1);
  g.H = features.size(2);
  g.W = features.size(3);
  g.k = k;
  g.G = G;
  g.s = s;
  g.r = (k - 1) / 2;
  g.k2 = k * k;
  g.sH = s * g.H;
  g.sW = s * g.W;
  g.Cg = g.C / G;
  return g;
}

int64_t row_blocks(const Geometry& g) { return (g.H + kBlockRows - 1) / kBlockRows; }

#define ARMNET_ISA_KERNELS "carafe_kernels.h"
#include "isa_variants.h"

at::Tensor forward_impl(const at::Tensor& features_in, const at::Tensor& masks_in, int64_t k,
                        int64_t G, int64_t s, bool fused) {
  const char* op = fused ? "carafe_fused_forward" : "carafe_forward";
  const Geometry g = check_inputs(op, features_in, masks_in, fused ? "mask_logits" : "masks", k,
                                  G, s, fused);
  TORCH_CHECK(features_in.device().is_cpu(), op, ": the CPU kernel needs CPU tensors, got ",
              features_in.device());
  const at::Tensor features = features_in.contiguous();
  const at::Tensor masks = masks_in.contiguous();
  at::Tensor out = at::empty({g.N, g.C, g.sH, g.sW}, features.options());
  if (out.numel() == 0) return out;
  const int64_t units = g.N * g.G * row_blocks(g);
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "carafe_forward_cpu", [&] {
    const scalar_t* fp = features.data_ptr<scalar_t>();
    const scalar_t* mp = masks.data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
      ARMNET_CPU_KERNEL(forward_units<scalar_t>, g, fp, mp, fused, op_, begin, end);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> backward_impl(const at::Tensor& grad_out_in,
                                                 const at::Tensor& features_in,
                                                 const at::Tensor& masks_in, int64_t k, int64_t G,
                                                 int64_t s, bool fused) {
  const char* op = fused ? "carafe_fused_backward" : "carafe_backward";
  const Geometry g = check_inputs(op, features_in, masks_in, fused ? "mask_logits" : "masks", k,
                                  G, s, fused);
  TORCH_CHECK(features_in.device().is_cpu(), op, ": the CPU kernel needs CPU tensors, got ",
              features_in.device());
  carafe_checks::check_grad_out(op, grad_out_in, features_in, s);
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor features = features_in.contiguous();
  const at::Tensor masks = masks_in.contiguous();
  at::Tensor grad_features = at::empty(features.sizes(), features.options());
  // Every element of both gradients is written below; an empty group (C = 0) leaves nothing to
  // reduce, hence the explicit zeros for that case.
  at::Tensor grad_masks = g.C == 0 ? at::zeros(masks.sizes(), masks.options())
                                   : at::empty(masks.sizes(), masks.options());
  if (g.N == 0 || g.C == 0 || g.H == 0 || g.W == 0) return {grad_features, grad_masks};
  const int64_t units = g.N * g.G * row_blocks(g);
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "carafe_backward_cpu", [&] {
    const scalar_t* gop = grad_out.data_ptr<scalar_t>();
    const scalar_t* fp = features.data_ptr<scalar_t>();
    const scalar_t* mp = masks.data_ptr<scalar_t>();
    scalar_t* gfp = grad_features.data_ptr<scalar_t>();
    scalar_t* gmp = grad_masks.data_ptr<scalar_t>();
    at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
      ARMNET_CPU_KERNEL(backward_units<scalar_t>, g, gop, fp, mp, fused, gfp, gmp, begin, end);
    });
  });
  return {grad_features, grad_masks};
}

at::Tensor carafe_forward_cpu(const at::Tensor& features, const at::Tensor& masks, int64_t k,
                              int64_t G, int64_t s) {
  return forward_impl(features, masks, k, G, s, false);
}

std::tuple<at::Tensor, at::Tensor> carafe_backward_cpu(const at::Tensor& grad_out,
                                                       const at::Tensor& features,
                                                       const at::Tensor& masks, int64_t k,
                                                       int64_t G, int64_t s) {
  return backward_impl(grad_out, features, masks, k, G, s, false);
}

at::Tensor carafe_fused_forward_cpu(const at::Tensor& features, const at::Tensor& logits,
                                    int64_t k, int64_t G, int64_t s) {
  return forward_impl(features, logits, k, G, s, true);
}

std::tuple<at::Tensor, at::Tensor> carafe_fused_backward_cpu(const at::Tensor& grad_out,
                                                             const at::Tensor& features,
                                                             const at::Tensor& logits, int64_t k,
                                                             int64_t G, int64_t s) {
  return backward_impl(grad_out, features, logits, k, G, s, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(armnet_ops, CPU, m) {
  m.impl("carafe_forward", &carafe_forward_cpu);
  m.impl("carafe_backward", &carafe_backward_cpu);
  m.impl("carafe_fused_forward", &carafe_fused_forward_cpu);
  m.impl("carafe_fused_backward", &carafe_fused_backward_cpu);
}

}  // namespace armnet_ops

// CARAFE on CUDA: carafe_forward/backward (normalised masks (N, G·k², sH, sW)) and
// carafe_fused_forward/backward (raw logits (N, G·k²·s², H, W): pixel shuffle + softmax over the
// k² taps in the kernel; the high-resolution mask is never written).
//
// Layout: contiguous NCHW (the glue calls .contiguous(), so channels_last and other strides give
// correct answers); logit channel (g·k² + t)·s² + i·s + j is tap t of group g at child (i, j).
//
// Tiling. A block is 32 lanes × kWarps warps and owns a tile of 32 consecutive low-resolution
// pixels of one row, of one (n, g). Lane l works on pixel w0 + l for all s² children at once,
// so a feature tap is loaded once per channel into a register and used for every child. The
// masks of the tile, k² taps × s² children × 32 pixels, are staged in shared memory once (the
// fused kernels compute the softmax while staging) and then serve all channels of the group;
// the warps split the channels, each thread keeping CB channels × (up to) s² children of
// accumulators in registers. Loads along the lane index are along W, hence coalesced; with s = 2
// or 4 the s children of a row are written (and read) as one vector.
//
// Limits. Shared memory holds k²·s²·32 accumulators, independent of G (mmcv keeps G·k² values per
// pixel and silently overflows past G·k² = 384). If k²·s² exceeds what the device can give one
// block (k²·s² ≤ 1816 in fp32/fp16/bf16, 908 in fp64 on H100/H200: 227 KiB), a clear error
// is raised.
//
// Backward, deterministic (no atomics):
//   * mask_grad: dmask[t, y, x] = Σ_c grad_out[c, y, x]·f[c, tap t of (y, x)]; each thread owns a
//     few taps × children of its pixel and loops over all channels of the group (no split, so no
//     cross-block reduction). The fused variant keeps dp in shared memory, recomputes the softmax
//     from the logits, writes dlogit = p·(dp − Σ_t p·dp), and a per-child log-sum-exp
//     (N, G, s², H, W), 1/k² of a mask, for the feature gradient.
//   * feature_grad: a gather. Feature pixel (hh, ww) collects, for tap (ky, kx), the s² children of
//     the low-resolution pixel (hh + r − ky, ww + r − kx); the masks of those children are staged
//     per tap in shared memory (for the fused op, p = exp(logit − lse)).
// Accumulation in fp32 for fp16/bf16/fp32 (at::opmath_type), fp64 for fp64.
//
// The device code and the launch decisions (channel splits, shared memory bytes, the grad_out
// copy) are in carafe_kernels.cuh (no ATen there, so tests/test_carafe.py compiles them for the
// host and checks them without a GPU); this file holds the checks and the launches.


#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "carafe_checks.h"
#include "carafe_kernels.cuh"

namespace armnet_ops {
namespace {

using namespace carafe_cuda;

// ---- host glue ----------------------------------------------------------------------------------

struct Geometry {
  int64_t N, C, H, W, k, G, s;
};

Geometry check_inputs(const char* op, const at::Tensor& features, const at::Tensor& masks,
                      const char* masks_name, int64_t k, int64_t G, int64_t s, bool fused) {
  carafe_checks::check_inputs(op, features, masks, masks_name, k, G, s, fused);
  TORCH_CHECK(features.is_cuda(), op, ": the CUDA kernel needs CUDA tensors, got 'features' on ",
              features.device());
  Geometry g{features.size(0), features.size(1), features.size(2), features.size(3), k, G, s};
  const int64_t k2 = k * k;
  // Sizes that travel as int: per-plane coordinates and the block count. Element offsets are
  // int64 throughout.
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  TORCH_CHECK(g.C <= kMax && s * g.H <= kMax && s * g.W <= kMax && k2 * s * s <= kMax, op,
              ": sizes past the int32 range are not supported, got features ", features.sizes(),
              ", kernel_size ", k, ", scale_factor ", s);
  return g;
}

// Dynamic shared memory of the staged masks; raises the per-kernel limit past 48 KiB when needed.
template <typename Kernel>
size_t prepare_smem(const char* op, Kernel kernel, const Geometry& g, size_t elem) {
  const size_t bytes = staged_mask_bytes(g.k, g.s, elem);
  const int device = at::cuda::current_device();
  const size_t optin = at::cuda::getDeviceProperties(device)->sharedMemPerBlockOptin;
  TORCH_CHECK(bytes <= optin, op, ": kernel_size² · scale_factor² = ", g.k * g.k * g.s * g.s,
              " needs ", bytes, " bytes of shared memory per block, past this device's ", optin,
              " (at most ", optin / (kLanes * elem), " for this dtype)");
  if (bytes > kSmemWithoutOptin) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
  return bytes;
}

int64_t tile_count(const Geometry& g) {
  return carafe_cuda::tile_count(g.N, g.H, g.W, g.G);
}

int channel_splits(const Geometry& g, int cb) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return carafe_cuda::channel_splits(tile_count(g), g.C / g.G, cb, sms);
}

void check_grid(const char* op, int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), op, ": ", blocks,
              " thread blocks exceed the grid limit");
}

// Calls f(std::integral_constant<int, S_CT>) with S_CT = s for s in 1..4, else 0 (runtime s).
template <typename F>
void dispatch_scale(int64_t s, F&& f) {
  switch (s) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
}


at::Tensor forward_cuda(const at::Tensor& features_in, const at::Tensor& masks_in, int64_t k,
                        int64_t G, int64_t s, bool fused) {
  const char* op = fused ? "carafe_fused_forward" : "carafe_forward";
  const Geometry g = check_inputs(op, features_in, masks_in, fused ? "mask_logits" : "masks", k,
                                  G, s, fused);
  const c10::cuda::CUDAGuard guard(features_in.device());
  const at::Tensor features = features_in.contiguous();
  const at::Tensor masks = masks_in.contiguous();
  at::Tensor out = at::empty({g.N, g.C, s * g.H, s * g.W}, features.options());
  if (out.numel() == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(),
                                  "carafe_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_scale(s, [&](auto s_ct) {
      constexpr int S_CT = decltype(s_ct)::value;
      constexpr int CB = forward_cb<S_CT>();
      auto kernel = fused ? carafe_forward_kernel<scalar_t, acc_t, S_CT, CB, true>
                          : carafe_forward_kernel<scalar_t, acc_t, S_CT, CB, false>;
      const size_t smem = prepare_smem(op, kernel, g, sizeof(acc_t));
      const int splits = channel_splits(g, CB);
      const int64_t blocks = tile_count(g) * splits;
      check_grid(op, blocks);
      kernel<<<static_cast<unsigned>(blocks), dim3(kLanes, kWarps), smem, stream>>>(
          features.data_ptr<scalar_t>(), masks.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
          static_cast<int>(g.C), static_cast<int>(g.H), static_cast<int>(g.W),
          static_cast<int>(g.G), static_cast<int>(k), static_cast<int>(s), splits);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_out_in,
                                                 const at::Tensor& features_in,
                                                 const at::Tensor& masks_in, int64_t k, int64_t G,
                                                 int64_t s, bool fused) {
  const char* op = fused ? "carafe_fused_backward" : "carafe_backward";
  const Geometry g = check_inputs(op, features_in, masks_in, fused ? "mask_logits" : "masks", k,
                                  G, s, fused);
  carafe_checks::check_grad_out(op, grad_out_in, features_in, s);
  const c10::cuda::CUDAGuard guard(features_in.device());
  at::Tensor grad_out = grad_out_in.contiguous();
  if (grad_out_needs_copy(grad_out.data_ptr())) grad_out = grad_out.clone();
  const at::Tensor features = features_in.contiguous();
  const at::Tensor masks = masks_in.contiguous();
  at::Tensor grad_features = at::empty(features.sizes(), features.options());
  at::Tensor grad_masks = at::empty(masks.sizes(), masks.options());
  if (g.N == 0 || g.H == 0 || g.W == 0) return {grad_features, grad_masks};
  if (g.C == 0) return {grad_features, grad_masks.zero_()};  // nothing to reduce over
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(),
                                  "carafe_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Per-child log-sum-exp of the fused softmax, written by the mask kernel.
    at::Tensor lse = fused ? at::empty({g.N, g.G, s * s, g.H, g.W},
                                       features.options().dtype(c10::CppTypeToScalarType<acc_t>::value))
                           : at::Tensor();
    acc_t* lse_ptr = fused ? lse.data_ptr<acc_t>() : nullptr;
    dispatch_scale(s, [&](auto s_ct) {
      constexpr int S_CT = decltype(s_ct)::value;
      constexpr int TB = mask_tb<S_CT>();
      {
        auto kernel = fused ? carafe_mask_grad_kernel<scalar_t, acc_t, S_CT, TB, true>
                            : carafe_mask_grad_kernel<scalar_t, acc_t, S_CT, TB, false>;
        const size_t smem = fused ? prepare_smem(op, kernel, g, sizeof(acc_t)) : 0;
        const int64_t blocks = tile_count(g);
        check_grid(op, blocks);
        kernel<<<static_cast<unsigned>(blocks), dim3(kLanes, kWarps), smem, stream>>>(
            grad_out.data_ptr<scalar_t>(), features.data_ptr<scalar_t>(),
            masks.data_ptr<scalar_t>(), grad_masks.data_ptr<scalar_t>(), lse_ptr,
            static_cast<int>(g.C), static_cast<int>(g.H), static_cast<int>(g.W),
            static_cast<int>(g.G), static_cast<int>(k), static_cast<int>(s));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      {
        auto kernel = fused ? carafe_feature_grad_kernel<scalar_t, acc_t, S_CT, kFeatureCB, true>
                            : carafe_feature_grad_kernel<scalar_t, acc_t, S_CT, kFeatureCB, false>;
        const size_t smem = prepare_smem(op, kernel, g, sizeof(acc_t));
        const int splits = channel_splits(g, kFeatureCB);
        const int64_t blocks = tile_count(g) * splits;
        check_grid(op, blocks);
        kernel<<<static_cast<unsigned>(blocks), dim3(kLanes, kWarps), smem, stream>>>(
            grad_out.data_ptr<scalar_t>(), masks.data_ptr<scalar_t>(), lse_ptr,
            grad_features.data_ptr<scalar_t>(), static_cast<int>(g.C), static_cast<int>(g.H),
            static_cast<int>(g.W), static_cast<int>(g.G), static_cast<int>(k),
            static_cast<int>(s), splits);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {grad_features, grad_masks};
}

at::Tensor carafe_forward_cuda(const at::Tensor& features, const at::Tensor& masks, int64_t k,
                               int64_t G, int64_t s) {
  return forward_cuda(features, masks, k, G, s, false);
}

std::tuple<at::Tensor, at::Tensor> carafe_backward_cuda(const at::Tensor& grad_out,
                                                        const at::Tensor& features,
                                                        const at::Tensor& masks, int64_t k,
                                                        int64_t G, int64_t s) {
  return backward_cuda(grad_out, features, masks, k, G, s, false);
}

at::Tensor carafe_fused_forward_cuda(const at::Tensor& features, const at::Tensor& logits,
                                     int64_t k, int64_t G, int64_t s) {
  return forward_cuda(features, logits, k, G, s, true);
}

std::tuple<at::Tensor, at::Tensor> carafe_fused_backward_cuda(const at::Tensor& grad_out,
                                                              const at::Tensor& features,
                                                              const at::Tensor& logits, int64_t k,
                                                              int64_t G, int64_t s) {
  return backward_cuda(grad_out, features, logits, k, G, s, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(armnet_ops, CUDA, m) {
  m.impl("carafe_forward", &carafe_forward_cuda);
  m.impl("carafe_backward", &carafe_backward_cuda);
  m.impl("carafe_fused_forward", &carafe_fused_forward_cuda);
  m.impl("carafe_fused_backward", &carafe_fused_backward_cuda);
}

}  // namespace armnet_ops

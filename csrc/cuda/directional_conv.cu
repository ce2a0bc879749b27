// Directional dilated convolution, CUDA forward: an implicit GEMM with the epilogue fused.
//
//   y = act(conv2d(x, weight, bias, same padding, dilation=(DH, DW)) * scale + shift)
//
// GEMM view: M = N·H·W output pixels, N = C_out, K = KH·KW·C_in. A block owns a BM × BN output
// tile and walks K as (tap, channel chunk): for a tap the A tile is BM pixels shifted by
// ((kh-KH/2)·DH, (kw-KW/2)·DW), read straight from x (zero where the shifted pixel is outside the
// image: the "same" padding, no padded copy), and the B tile is a BK × BN block of the weight,
// repacked once per call as (KH·KW, C_in, C_out). bias, scale, shift and ReLU are applied to the
// fp32 (fp64) accumulator before the single store of y.
//
// Two kernels:
//  * fp16 / bf16 on sm_80+: tensor cores through nvcuda::wmma (16×16×16 fragments, fp32
//    accumulation). 64 × 64 × 32 tiles, 4 warps each computing 32 × 32. 16-byte vector loads
//    when channels_last and C_in (C_out) are multiples of 8, scalar loads otherwise.
//  * everything else (fp32, fp64, and fp16/bf16 before sm_80): SIMT, 64 × 64 × 16 tiles,
//    256 threads with a 4 × 4 register tile each; fp32 accumulation (fp64 for fp64), no TF32.
//
// Layout: x and y are addressed through their (n, c, h, w) strides; the glue makes x dense in its
// suggested memory format and allocates y in the same one. channels_last is the fast layout (an
// A row is a contiguous run of channels, a y row is a contiguous run of output channels).
//
// The backward is the device-generic ATen backward of csrc/cpu/directional_conv.cpp (grad_x as a
// cuDNN forward convolution with `deterministic` requested, the weight gradient through
// at::convolution_backward), registered here for the CUDA key; the Triton backend has its own
// implicit-GEMM backward. The pair op runs the forward twice.
//
// The device code is in directional_conv_kernels.cuh (no ATen there, so the host emulation in
// tests/test_dconv_cuda_emulation.py compiles the same kernels); this file holds the launches.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "directional_conv.h"
#include "directional_conv_kernels.cuh"

namespace armnet_ops {
namespace dconv {

// ---- host glue -----------------------------------------------------------------------------------

template <typename T>
struct WmmaType;
template <>
struct WmmaType<at::Half> {
  using type = __half;
};
template <>
struct WmmaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename scalar_t>
const scalar_t* opt_ptr(const OptTensor& t) {
  return t.has_value() ? t->data_ptr<scalar_t>() : nullptr;
}

// Picks the kernel: tensor cores for fp16/bf16 on sm_80+, SIMT otherwise. A template, so that the
// wmma kernel is only instantiated for the 16-bit types.
template <typename scalar_t>
void launch_forward(const Tensor& xc, const Tensor& wp, Tensor& y, ConvShape s,
                    const Epilogue<scalar_t>& epi, bool tensor_cores) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto* xp = xc.data_ptr<scalar_t>();
  const auto* wpp = wp.data_ptr<scalar_t>();
  auto* yp = y.data_ptr<scalar_t>();
  constexpr bool is_16bit =
      std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>;
  if constexpr (is_16bit) {
    if (tensor_cores) {
      using T = typename WmmaType<scalar_t>::type;
      const int64_t blocks = forward_blocks<TC_BM, TC_BN>(s);
      TORCH_CHECK(blocks < INT32_MAX, "directional_conv2d_forward (cuda): too many tiles");
      const bool vec_a = wmma_vec_a(s, xp), vec_b = wmma_vec_b(s, wpp);
      const dim3 grid(static_cast<unsigned>(blocks));
      if (vec_a && vec_b) {
        dconv_forward_wmma_kernel<scalar_t, T, true, true>
            <<<grid, TC_THREADS, 0, stream>>>(xp, wpp, yp, s, epi);
      } else if (vec_a) {
        dconv_forward_wmma_kernel<scalar_t, T, true, false>
            <<<grid, TC_THREADS, 0, stream>>>(xp, wpp, yp, s, epi);
      } else if (vec_b) {
        dconv_forward_wmma_kernel<scalar_t, T, false, true>
            <<<grid, TC_THREADS, 0, stream>>>(xp, wpp, yp, s, epi);
      } else {
        dconv_forward_wmma_kernel<scalar_t, T, false, false>
            <<<grid, TC_THREADS, 0, stream>>>(xp, wpp, yp, s, epi);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  const int64_t blocks = forward_blocks<SIMT_BM, SIMT_BN>(s);
  TORCH_CHECK(blocks < INT32_MAX, "directional_conv2d_forward (cuda): too many tiles");
  dconv_forward_simt_kernel<scalar_t, at::acc_type<scalar_t, /*is_cuda=*/true>>
      <<<static_cast<unsigned>(blocks), SIMT_THREADS, 0, stream>>>(xp, wpp, yp, s, epi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor forward_cuda(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                    at::IntArrayRef dilation, const OptTensor& scale, const OptTensor& shift,
                    bool relu) {
  check_inputs("directional_conv2d_forward", x, weight, bias, dilation, scale, shift);
  TORCH_CHECK(x.is_cuda(), "directional_conv2d_forward (cuda): argument 'x' must be a CUDA "
              "tensor, got ", x.device());
  c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = x.suggest_memory_format();
  const int64_t N = x.size(0), C_in = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t C_out = weight.size(0), KH = weight.size(2), KW = weight.size(3);
  Tensor y = at::empty({N, C_out, H, W}, x.options().memory_format(fmt));
  if (y.numel() == 0) return y;  // never launch an empty grid
  TORCH_CHECK(C_in < INT32_MAX && C_out < INT32_MAX && H < INT32_MAX && W < INT32_MAX &&
                  H * W < INT32_MAX,
              "directional_conv2d_forward (cuda): C_in, C_out, H, W and H·W must be < 2^31");
  const Tensor xc = x.contiguous(fmt);
  // (KH, KW, C_in, C_out): one K × N weight matrix per tap.
  const Tensor wp = weight.permute({2, 3, 1, 0}).contiguous();
  const auto contig = [](const OptTensor& t) -> OptTensor {
    return t.has_value() ? OptTensor(t->contiguous()) : std::nullopt;
  };
  const OptTensor b = contig(bias), sc = contig(scale), sh = contig(shift);

  ConvShape s;
  s.M = N * H * W;
  s.HW = H * W;
  s.H = static_cast<int>(H);
  s.W = static_cast<int>(W);
  s.C_in = static_cast<int>(C_in);
  s.C_out = static_cast<int>(C_out);
  s.KH = static_cast<int>(KH);
  s.KW = static_cast<int>(KW);
  s.DH = static_cast<int>(dilation[0]);
  s.DW = static_cast<int>(dilation[1]);
  s.sxn = xc.stride(0);
  s.sxc = xc.stride(1);
  s.sxh = xc.stride(2);
  s.sxw = xc.stride(3);
  s.syn = y.stride(0);
  s.syc = y.stride(1);
  s.syh = y.stride(2);
  s.syw = y.stride(3);

  const bool tensor_cores = at::cuda::getCurrentDeviceProperties()->major >= 8;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "directional_conv2d_forward_cuda", [&] {
    launch_forward<scalar_t>(xc, wp, y, s, Epilogue<scalar_t>{opt_ptr<scalar_t>(b),
                             opt_ptr<scalar_t>(sc), opt_ptr<scalar_t>(sh), relu}, tensor_cores);
  });
  return y;
}

// The pair on CUDA: two forward launches on the same stream (the fused single launch is the
// Triton backend's).
std::tuple<Tensor, Tensor> pair_forward_cuda(const Tensor& x, const Tensor& weight_h,
                                             const Tensor& weight_v, const OptTensor& bias_h,
                                             const OptTensor& bias_v, at::IntArrayRef dilation_h,
                                             at::IntArrayRef dilation_v, const OptTensor& scale_h,
                                             const OptTensor& shift_h, const OptTensor& scale_v,
                                             const OptTensor& shift_v, bool relu) {
  return {forward_cuda(x, weight_h, bias_h, dilation_h, scale_h, shift_h, relu),
          forward_cuda(x, weight_v, bias_v, dilation_v, scale_v, shift_v, relu)};
}

Grads backward_cuda(const Tensor& grad_y, const Tensor& x, const Tensor& weight,
                    const OptTensor& bias, const Tensor& y, at::IntArrayRef dilation,
                    const OptTensor& scale, const OptTensor& shift, bool relu) {
  c10::cuda::CUDAGuard guard(x.device());
  return backward_aten(grad_y, x, weight, bias, y, dilation, scale, shift, relu);
}

PairGrads pair_backward_cuda(const Tensor& grad_y_h, const Tensor& grad_y_v, const Tensor& x,
                             const Tensor& weight_h, const Tensor& weight_v,
                             const OptTensor& bias_h, const OptTensor& bias_v, const Tensor& y_h,
                             const Tensor& y_v, at::IntArrayRef dilation_h,
                             at::IntArrayRef dilation_v, const OptTensor& scale_h,
                             const OptTensor& shift_h, const OptTensor& scale_v,
                             const OptTensor& shift_v, bool relu) {
  c10::cuda::CUDAGuard guard(x.device());
  return pair_backward_aten(grad_y_h, grad_y_v, x, weight_h, weight_v, bias_h, bias_v, y_h, y_v,
                            dilation_h, dilation_v, scale_h, shift_h, scale_v, shift_v, relu);
}

}  // namespace dconv

TORCH_LIBRARY_IMPL(armnet_ops, CUDA, m) {
  m.impl("directional_conv2d_forward", &dconv::forward_cuda);
  m.impl("directional_conv2d_backward", &dconv::backward_cuda);
  m.impl("directional_conv2d_pair_forward", &dconv::pair_forward_cuda);
  m.impl("directional_conv2d_pair_backward", &dconv::pair_backward_cuda);
}

}  // namespace armnet_ops

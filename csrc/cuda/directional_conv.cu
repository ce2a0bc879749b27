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
// The backward is the device-generic ATen backward of csrc/cpu/directional_conv.cpp (cuDNN
// convolutions with `deterministic` requested: no atomics), registered here for the CUDA key; the
// Triton backend has its own implicit-GEMM backward. The pair op runs the forward twice.
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

namespace armnet_ops {
namespace dconv {

// Sizes, strides (in elements) and the dilated-kernel geometry, passed by value.
struct ConvShape {
  int64_t M;                   // N·H·W
  int64_t HW;                  // H·W
  int H, W, C_in, C_out;
  int KH, KW, DH, DW;
  int64_t sxn, sxc, sxh, sxw;  // x (n, c, h, w) strides
  int64_t syn, syc, syh, syw;  // y (n, c, h, w) strides
  int n_tiles;                 // ceil(C_out / BN): output-channel tiles per pixel block
};

template <typename scalar_t>
struct Epilogue {
  const scalar_t* bias;   // nullptr when absent
  const scalar_t* scale;
  const scalar_t* shift;
  bool relu;
};

// bias -> scale -> shift -> ReLU on one accumulator value of output channel co.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t epilogue(acc_t v, const Epilogue<scalar_t>& e, int co) {
  if (e.bias) v += static_cast<acc_t>(e.bias[co]);
  if (e.scale) v *= static_cast<acc_t>(e.scale[co]);
  if (e.shift) v += static_cast<acc_t>(e.shift[co]);
  if (e.relu) v = v > acc_t(0) ? v : acc_t(0);
  return v;
}

// The (n, h, w) of the tile's BM output pixels, computed once per block into shared memory (the
// divisions are paid once, not once per tap). h = -1 marks a pixel past M.
template <int BM>
__device__ __forceinline__ void tile_pixels(const ConvShape& s, int64_t m0, int64_t* pix_n,
                                            int* pix_h, int* pix_w) {
  for (int i = threadIdx.x; i < BM; i += blockDim.x) {
    const int64_t m = m0 + i;
    if (m < s.M) {
      const int64_t n = m / s.HW;
      const int rem = static_cast<int>(m - n * s.HW);
      pix_n[i] = n;
      pix_h[i] = rem / s.W;
      pix_w[i] = rem - (rem / s.W) * s.W;
    } else {
      pix_n[i] = 0;
      pix_h[i] = -1;
      pix_w[i] = 0;
    }
  }
}

// Offset of x[n, :, h + dh, w + dw] (channel 0), or -1 when that pixel is padding.
__device__ __forceinline__ int64_t shifted_offset(const ConvShape& s, int64_t n, int h, int w,
                                                  int dh, int dw) {
  if (h < 0) return -1;  // pixel past M
  const int ih = h + dh, iw = w + dw;
  if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) return -1;
  return n * s.sxn + static_cast<int64_t>(ih) * s.sxh + static_cast<int64_t>(iw) * s.sxw;
}

// ---- SIMT kernel (fp32, fp64; fp16/bf16 before sm_80) --------------------------------------------

constexpr int SIMT_BM = 64, SIMT_BN = 64, SIMT_BK = 16, SIMT_THREADS = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(SIMT_THREADS)
    dconv_forward_simt_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ wp,
                              scalar_t* __restrict__ y, const ConvShape s,
                              const Epilogue<scalar_t> epi) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  // K-major A (As[k][m]) so that the 16 threads of a row group read one broadcast value.
  __shared__ acc_t As[SIMT_BK][SIMT_BM];
  __shared__ acc_t Bs[SIMT_BK][SIMT_BN];
  __shared__ int64_t pix_n[SIMT_BM];
  __shared__ int pix_h[SIMT_BM], pix_w[SIMT_BM];

  const int tid = threadIdx.x;
  const int64_t bid = blockIdx.x;
  const int n0 = static_cast<int>(bid % s.n_tiles) * SIMT_BN;
  const int64_t m0 = (bid / s.n_tiles) * SIMT_BM;
  tile_pixels<SIMT_BM>(s, m0, pix_n, pix_h, pix_w);
  __syncthreads();

  // Thread (ty, tx) owns rows ty + 16·i and columns tx + 16·j of the tile.
  const int tx = tid % 16, ty = tid / 16;
  acc_t acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = acc_t(0);

  // Loader roles: A element (row a_m + 16·i, channel a_k); B element (k row b_k + 4·i, column b_n).
  const int a_k = tid % SIMT_BK, a_m = tid / SIMT_BK;
  const int b_n = tid % SIMT_BN, b_k = tid / SIMT_BN;

  for (int tap = 0; tap < s.KH * s.KW; ++tap) {
    const int dh = (tap / s.KW - s.KH / 2) * s.DH;
    const int dw = (tap % s.KW - s.KW / 2) * s.DW;
    int64_t a_off[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = a_m + 16 * i;
      a_off[i] = shifted_offset(s, pix_n[r], pix_h[r], pix_w[r], dh, dw);
    }
    const scalar_t* w_tap = wp + static_cast<int64_t>(tap) * s.C_in * s.C_out;
    for (int c0 = 0; c0 < s.C_in; c0 += SIMT_BK) {
      const int c = c0 + a_k;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        As[a_k][a_m + 16 * i] = (a_off[i] >= 0 && c < s.C_in)
                                    ? static_cast<acc_t>(x[a_off[i] + c * s.sxc])
                                    : acc_t(0);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int k = b_k + 4 * i;
        const int co = n0 + b_n;
        Bs[k][b_n] = (c0 + k < s.C_in && co < s.C_out)
                         ? static_cast<acc_t>(w_tap[static_cast<int64_t>(c0 + k) * s.C_out + co])
                         : acc_t(0);
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < SIMT_BK; ++k) {
        acc_t a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = As[k][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = Bs[k][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
      }
      __syncthreads();
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = ty + 16 * i;
    if (pix_h[r] < 0) continue;
    const int64_t row = pix_n[r] * s.syn + static_cast<int64_t>(pix_h[r]) * s.syh +
                        static_cast<int64_t>(pix_w[r]) * s.syw;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int co = n0 + tx + 16 * j;
      if (co < s.C_out) {
        y[row + co * s.syc] = static_cast<scalar_t>(epilogue(acc[i][j], epi, co));
      }
    }
  }
}

// ---- tensor-core kernel (fp16, bf16; sm_80+) -----------------------------------------------------

constexpr int TC_BM = 64, TC_BN = 64, TC_BK = 32, TC_THREADS = 128;
// Row pads keep every wmma fragment pointer 32-byte aligned and spread the shared-memory banks:
// A rows are (32 + 8)·2 = 80 bytes, B rows (64 + 8)·2 = 144 bytes, C rows (64 + 4)·4 = 272 bytes.
constexpr int TC_LDA = TC_BK + 8, TC_LDB = TC_BN + 8, TC_LDC = TC_BN + 4;

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

// VEC_A: x is channels_last with C_in % 8 == 0, so 8 channels are one aligned 16-byte load.
// VEC_B: C_out % 8 == 0, likewise for the packed weight rows.
template <typename scalar_t, bool VEC_A, bool VEC_B>
__global__ void __launch_bounds__(TC_THREADS)
    dconv_forward_wmma_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ wp,
                              scalar_t* __restrict__ y, const ConvShape s,
                              const Epilogue<scalar_t> epi) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using T = typename WmmaType<scalar_t>::type;
  static_assert(sizeof(T) == 2 && sizeof(scalar_t) == 2, "16-bit types only");
  // Raw 16-bit storage: a zero bit pattern is +0 in both fp16 and bf16.
  __shared__ __align__(32) uint16_t As[TC_BM * TC_LDA];
  __shared__ __align__(32) uint16_t Bs[TC_BK * TC_LDB];
  __shared__ __align__(32) float Cs[TC_BM * TC_LDC];
  __shared__ int64_t pix_n[TC_BM];
  __shared__ int pix_h[TC_BM], pix_w[TC_BM];

  const uint16_t* xr = reinterpret_cast<const uint16_t*>(x);
  const uint16_t* wr = reinterpret_cast<const uint16_t*>(wp);
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int warp_m = warp / 2, warp_n = warp % 2;  // 2 × 2 warps, 32 × 32 each
  const int64_t bid = blockIdx.x;
  const int n0 = static_cast<int>(bid % s.n_tiles) * TC_BN;
  const int64_t m0 = (bid / s.n_tiles) * TC_BM;
  tile_pixels<TC_BM>(s, m0, pix_n, pix_h, pix_w);
  __syncthreads();

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  // Loader roles. Vector A: 4 vectors of 8 channels per row, rows tid/4 + 32·i (i < 2).
  // Scalar A: channel tid % 32 of rows tid/32 + 4·i (i < 16). Vector B: 8 vectors per k row,
  // k rows tid/8 + 16·i (i < 2). Scalar B: column tid % 64 of k rows tid/64 + 2·i (i < 16).
  constexpr int A_ROWS = VEC_A ? 2 : 16;
  const int a_row0 = VEC_A ? tid / 4 : tid / 32;
  const int a_row_step = VEC_A ? 32 : 4;
  const int a_k = VEC_A ? (tid % 4) * 8 : tid % 32;

  for (int tap = 0; tap < s.KH * s.KW; ++tap) {
    const int dh = (tap / s.KW - s.KH / 2) * s.DH;
    const int dw = (tap % s.KW - s.KW / 2) * s.DW;
    int64_t a_off[A_ROWS];
#pragma unroll
    for (int i = 0; i < A_ROWS; ++i) {
      const int r = a_row0 + a_row_step * i;
      a_off[i] = shifted_offset(s, pix_n[r], pix_h[r], pix_w[r], dh, dw);
    }
    const uint16_t* w_tap = wr + static_cast<int64_t>(tap) * s.C_in * s.C_out;
    for (int c0 = 0; c0 < s.C_in; c0 += TC_BK) {
      // A tile: As[m][k] = x[pixel m shifted by the tap, c0 + k].
      const int c = c0 + a_k;
#pragma unroll
      for (int i = 0; i < A_ROWS; ++i) {
        const int r = a_row0 + a_row_step * i;
        if constexpr (VEC_A) {
          uint4 v = make_uint4(0, 0, 0, 0);
          // C_in % 8 == 0 and c % 8 == 0: the 8 channels are all in range or all out.
          if (a_off[i] >= 0 && c < s.C_in) v = *reinterpret_cast<const uint4*>(xr + a_off[i] + c);
          *reinterpret_cast<uint4*>(&As[r * TC_LDA + a_k]) = v;
        } else {
          As[r * TC_LDA + a_k] = (a_off[i] >= 0 && c < s.C_in) ? xr[a_off[i] + c * s.sxc] : 0;
        }
      }
      // B tile: Bs[k][n] = w[tap, c0 + k, n0 + n].
      if constexpr (VEC_B) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int k = tid / 8 + 16 * i;
          const int nn = (tid % 8) * 8;
          uint4 v = make_uint4(0, 0, 0, 0);
          if (c0 + k < s.C_in && n0 + nn < s.C_out)
            v = *reinterpret_cast<const uint4*>(w_tap + static_cast<int64_t>(c0 + k) * s.C_out +
                                                n0 + nn);
          *reinterpret_cast<uint4*>(&Bs[k * TC_LDB + nn]) = v;
        }
      } else {
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          const int k = tid / 64 + 2 * i;
          const int nn = tid % 64;
          Bs[k * TC_LDB + nn] = (c0 + k < s.C_in && n0 + nn < s.C_out)
                                    ? w_tap[static_cast<int64_t>(c0 + k) * s.C_out + n0 + nn]
                                    : 0;
        }
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < TC_BK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b[2];
#pragma unroll
        for (int i = 0; i < 2; ++i)
          wmma::load_matrix_sync(
              a[i], reinterpret_cast<const T*>(&As[(warp_m * 32 + 16 * i) * TC_LDA + kk]), TC_LDA);
#pragma unroll
        for (int j = 0; j < 2; ++j)
          wmma::load_matrix_sync(
              b[j], reinterpret_cast<const T*>(&Bs[kk * TC_LDB + warp_n * 32 + 16 * j]), TC_LDB);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
  }

  // The accumulators go through shared memory so that the epilogue knows each value's (row,
  // channel) and the stores run along the contiguous channel dimension.
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&Cs[(warp_m * 32 + 16 * i) * TC_LDC + warp_n * 32 + 16 * j],
                              acc[i][j], TC_LDC, wmma::mem_row_major);
  __syncthreads();
  for (int e = tid; e < TC_BM * TC_BN; e += TC_THREADS) {
    const int r = e / TC_BN, nn = e % TC_BN;
    const int co = n0 + nn;
    if (pix_h[r] < 0 || co >= s.C_out) continue;
    const int64_t off = pix_n[r] * s.syn + static_cast<int64_t>(pix_h[r]) * s.syh +
                        static_cast<int64_t>(pix_w[r]) * s.syw + static_cast<int64_t>(co) * s.syc;
    y[off] = static_cast<scalar_t>(epilogue<scalar_t, float>(Cs[r * TC_LDC + nn], epi, co));
  }
#else
  __trap();  // the host launches this kernel on sm_80+ only
#endif
}

// ---- host glue -----------------------------------------------------------------------------------

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
      s.n_tiles = static_cast<int>((s.C_out + TC_BN - 1) / TC_BN);
      const int64_t blocks = ((s.M + TC_BM - 1) / TC_BM) * s.n_tiles;
      TORCH_CHECK(blocks < INT32_MAX, "directional_conv2d_forward (cuda): too many tiles");
      // 16-byte loads need 8 contiguous channels at 16-byte aligned addresses.
      const bool vec_a =
          s.sxc == 1 && s.C_in % 8 == 0 && reinterpret_cast<uintptr_t>(xp) % 16 == 0;
      const bool vec_b = s.C_out % 8 == 0 && reinterpret_cast<uintptr_t>(wpp) % 16 == 0;
      const dim3 grid(static_cast<unsigned>(blocks));
      if (vec_a && vec_b) {
        dconv_forward_wmma_kernel<scalar_t, true, true>
            <<<grid, TC_THREADS, 0, stream>>>(xp, wpp, yp, s, epi);
      } else if (vec_a) {
        dconv_forward_wmma_kernel<scalar_t, true, false>
            <<<grid, TC_THREADS, 0, stream>>>(xp, wpp, yp, s, epi);
      } else if (vec_b) {
        dconv_forward_wmma_kernel<scalar_t, false, true>
            <<<grid, TC_THREADS, 0, stream>>>(xp, wpp, yp, s, epi);
      } else {
        dconv_forward_wmma_kernel<scalar_t, false, false>
            <<<grid, TC_THREADS, 0, stream>>>(xp, wpp, yp, s, epi);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  s.n_tiles = static_cast<int>((s.C_out + SIMT_BN - 1) / SIMT_BN);
  const int64_t blocks = ((s.M + SIMT_BM - 1) / SIMT_BM) * s.n_tiles;
  TORCH_CHECK(blocks < INT32_MAX, "directional_conv2d_forward (cuda): too many tiles");
  dconv_forward_simt_kernel<scalar_t>
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

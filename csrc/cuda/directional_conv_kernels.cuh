// The directional dilated convolution CUDA forward kernels (see directional_conv.cu for the
// design) and the launch geometry the glue computes for them. Device code and plain host helpers
// only, no ATen: tests/test_dconv_cuda_emulation.py compiles this very file for the host (one
// std::thread per CUDA thread, a barrier for __syncthreads, a host nvcuda::wmma and host
// __half / __nv_bfloat16 types) and checks the kernels without a GPU.
#pragma once

#include <cstdint>

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
  // `v < 0 ? 0 : v`, not `v > 0 ? v : 0` nor fmax(v, 0): NaN compares false and passes through,
  // as torch.relu keeps it.
  if (e.relu) v = v < acc_t(0) ? acc_t(0) : v;
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

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(SIMT_THREADS)
    dconv_forward_simt_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ wp,
                              scalar_t* __restrict__ y, const ConvShape s,
                              const Epilogue<scalar_t> epi) {
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

// T: the wmma element type of scalar_t (__half for fp16, __nv_bfloat16 for bf16).
// VEC_A: x is channels_last with C_in % 8 == 0, so 8 channels are one aligned 16-byte load.
// VEC_B: C_out % 8 == 0, likewise for the packed weight rows.
template <typename scalar_t, typename T, bool VEC_A, bool VEC_B>
__global__ void __launch_bounds__(TC_THREADS)
    dconv_forward_wmma_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ wp,
                              scalar_t* __restrict__ y, const ConvShape s,
                              const Epilogue<scalar_t> epi) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
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

// ---- launch geometry (shared by the glue and the host emulation) -------------------------------

// Sets s.n_tiles for a BM × BN tile and returns the number of blocks of the 1-D grid.
template <int BM, int BN>
inline int64_t forward_blocks(ConvShape& s) {
  s.n_tiles = static_cast<int>((s.C_out + BN - 1) / BN);
  return ((s.M + BM - 1) / BM) * s.n_tiles;
}

// The wmma kernel's 16-byte loads need 8 contiguous channels at 16-byte aligned addresses: x
// channels_last with C_in % 8 == 0 (VEC_A), the packed weight rows with C_out % 8 == 0 (VEC_B).
inline bool wmma_vec_a(const ConvShape& s, const void* x) {
  return s.sxc == 1 && s.C_in % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
}
inline bool wmma_vec_b(const ConvShape& s, const void* packed_weight) {
  return s.C_out % 8 == 0 && reinterpret_cast<uintptr_t>(packed_weight) % 16 == 0;
}

}  // namespace dconv
}  // namespace armnet_ops

// The CARAFE CUDA kernels (see carafe.cu for the design). Device code only: plain templates over
// the scalar type taking pointers and sizes, no ATen. Kept apart from the glue so that
// tests/cuda_emulation/ can compile the very same kernels for the host (one std::thread per CUDA
// thread, a barrier for __syncthreads) and check their indexing without a GPU.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

namespace armnet_ops {
namespace carafe_cuda {

constexpr int kLanes = 32;  // low-resolution pixels per tile (one warp wide)
constexpr int kWarps = 4;
constexpr int kThreads = kLanes * kWarps;

// ---- device helpers ---------------------------------------------------------------------------

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// The s children of one row of a low-resolution pixel are contiguous; with a compile-time s of 2
// or 4 (and at most 16 bytes) they move as one vector. The element offset is a multiple of s
// (plane sizes and row lengths are multiples of s), so the vector is aligned.
template <int S_CT, typename scalar_t>
struct ChildRow {
  static constexpr bool kVector = (S_CT == 2 || S_CT == 4) && sizeof(scalar_t) * S_CT <= 16;
};

template <typename acc_t>
__device__ __forceinline__ acc_t fast_exp(acc_t x) {
  return ::exp(x);
}
template <>
__device__ __forceinline__ float fast_exp<float>(float x) {
  return __expf(x);
}

// Online softmax statistics of the k² logits at `lg` (stride `tap_stride` between taps).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void softmax_stats(const scalar_t* __restrict__ lg, int64_t tap_stride,
                                              int K2, acc_t& mx, acc_t& den) {
  mx = -std::numeric_limits<acc_t>::infinity();
  den = acc_t(0);
  for (int t = 0; t < K2; ++t) {
    const acc_t x = static_cast<acc_t>(lg[t * tap_stride]);
    const acc_t nm = x > mx ? x : mx;
    // On the first tap mx = -inf: exp(-inf) = 0 and den stays 0 + exp(0).
    den = den * fast_exp(mx - nm) + fast_exp(x - nm);
    mx = nm;
  }
}

// The block's tile: 32 pixels of row h starting at column w0, of (n, g), channel split `split`.
struct Tile {
  int w0, h, n, g, split;
};

__device__ __forceinline__ Tile decode_tile(int W, int H, int G, int splits) {
  int64_t b = blockIdx.x;
  const int w_tiles = (W + kLanes - 1) / kLanes;
  Tile t;
  t.w0 = static_cast<int>(b % w_tiles) * kLanes;
  b /= w_tiles;
  t.h = static_cast<int>(b % H);
  b /= H;
  t.split = static_cast<int>(b % splits);
  b /= splits;
  t.g = static_cast<int>(b % G);
  t.n = static_cast<int>(b / G);
  return t;
}

// ---- forward ----------------------------------------------------------------------------------

// S_CT: the scale factor when it is 1..4 (compile-time, one pass over all s² children), 0 for a
// runtime s (children in passes of QB = 4). CB: channels per thread per pass.
template <typename scalar_t, typename acc_t, int S_CT, int CB, bool FUSED>
__global__ void __launch_bounds__(kThreads)
carafe_forward_kernel(const scalar_t* __restrict__ features, const scalar_t* __restrict__ masks,
                      scalar_t* __restrict__ out, int C, int H, int W, int G, int k, int s_rt,
                      int splits) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* msk = reinterpret_cast<acc_t*>(smem_raw);  // [k²][s²][32]
  constexpr int QB = S_CT > 0 ? S_CT * S_CT : 4;
  const int s = S_CT > 0 ? S_CT : s_rt;
  const int s2 = s * s, K2 = k * k, r = (k - 1) / 2;
  const int lane = threadIdx.x, warp = threadIdx.y, tid = warp * kLanes + lane;
  const Tile tile = decode_tile(W, H, G, splits);
  const int h = tile.h, Cg = C / G, sW = s * W;
  const int64_t HW = static_cast<int64_t>(H) * W, oHW = HW * s2;
  const int64_t ng = static_cast<int64_t>(tile.n) * G + tile.g;

  // Stage the normalised masks of the tile: msk[(t·s² + q)·32 + l].
  if (FUSED) {
    for (int pq = tid; pq < s2 * kLanes; pq += kThreads) {
      const int q = pq / kLanes, l = pq % kLanes, w = tile.w0 + l;
      if (w >= W) continue;  // never read: lanes past W return below
      const scalar_t* lg = masks + (ng * K2 * s2 + q) * HW + static_cast<int64_t>(h) * W + w;
      const int64_t tap_stride = s2 * HW;
      acc_t mx, den;
      softmax_stats(lg, tap_stride, K2, mx, den);
      const acc_t inv = acc_t(1) / den;
      for (int t = 0; t < K2; ++t)
        msk[(t * s2 + q) * kLanes + l] =
            fast_exp(static_cast<acc_t>(lg[t * tap_stride]) - mx) * inv;
    }
  } else {
    for (int idx = tid; idx < K2 * s2 * kLanes; idx += kThreads) {
      const int l = idx % kLanes, q = (idx / kLanes) % s2, t = idx / (kLanes * s2);
      const int w = tile.w0 + l;
      if (w >= W) continue;
      const int y = h * s + q / s, x = w * s + q % s;
      msk[idx] = static_cast<acc_t>(masks[(ng * K2 + t) * oHW + static_cast<int64_t>(y) * sW + x]);
    }
  }
  __syncthreads();
  const int w = tile.w0 + lane;
  if (w >= W) return;  // no barrier below

  const int per_split = (Cg + splits - 1) / splits;
  const int c_begin = tile.split * per_split;
  const int c_end = min(Cg, c_begin + per_split);
  const int64_t chan0 = static_cast<int64_t>(tile.n) * C + static_cast<int64_t>(tile.g) * Cg;
  for (int cb0 = c_begin + warp * CB; cb0 < c_end; cb0 += kWarps * CB) {
    for (int q0 = 0; q0 < s2; q0 += QB) {
      acc_t acc[CB][QB];
#pragma unroll
      for (int cb = 0; cb < CB; ++cb)
#pragma unroll
        for (int qb = 0; qb < QB; ++qb) acc[cb][qb] = acc_t(0);
      for (int ky = 0; ky < k; ++ky) {
        const int hh = h + ky - r;
        if (hh < 0 || hh >= H) continue;
        for (int kx = 0; kx < k; ++kx) {
          const int ww = w + kx - r;
          if (ww < 0 || ww >= W) continue;
          const int t = ky * k + kx;
          const int64_t foff = static_cast<int64_t>(hh) * W + ww;
          acc_t f[CB];
#pragma unroll
          for (int cb = 0; cb < CB; ++cb)
            f[cb] = cb0 + cb < c_end ? static_cast<acc_t>(features[(chan0 + cb0 + cb) * HW + foff])
                                     : acc_t(0);
#pragma unroll
          for (int qb = 0; qb < QB; ++qb) {
            const int q = q0 + qb;
            const acc_t m = (S_CT > 0 || q < s2) ? msk[(t * s2 + q) * kLanes + lane] : acc_t(0);
            // One feature value per channel serves every child of the pixel.
#pragma unroll
            for (int cb = 0; cb < CB; ++cb) acc[cb][qb] += f[cb] * m;
          }
        }
      }
#pragma unroll
      for (int cb = 0; cb < CB; ++cb) {
        if (cb0 + cb >= c_end) break;
        scalar_t* o = out + (chan0 + cb0 + cb) * oHW;
        if constexpr (ChildRow<S_CT, scalar_t>::kVector) {
#pragma unroll
          for (int i = 0; i < S_CT; ++i) {
            Vec<scalar_t, S_CT> v;
#pragma unroll
            for (int j = 0; j < S_CT; ++j) v.v[j] = static_cast<scalar_t>(acc[cb][i * S_CT + j]);
            *reinterpret_cast<Vec<scalar_t, S_CT>*>(
                o + static_cast<int64_t>(h * s + i) * sW + static_cast<int64_t>(w) * s) = v;
          }
        } else {
#pragma unroll
          for (int qb = 0; qb < QB; ++qb) {
            const int q = q0 + qb;
            if (S_CT == 0 && q >= s2) break;
            o[static_cast<int64_t>(h * s + q / s) * sW + static_cast<int64_t>(w) * s + q % s] =
                static_cast<scalar_t>(acc[cb][qb]);
          }
        }
      }
    }
  }
}

// ---- backward: masks / logits -------------------------------------------------------------------

// TB taps × QB children per thread per pass; the warps share out the (tap, child) passes and
// every thread loops over all Cg channels, so each gradient element is one thread's sum.
template <typename scalar_t, typename acc_t, int S_CT, int TB, bool FUSED>
__global__ void __launch_bounds__(kThreads)
carafe_mask_grad_kernel(const scalar_t* __restrict__ grad_out,
                        const scalar_t* __restrict__ features, const scalar_t* __restrict__ masks,
                        scalar_t* __restrict__ grad_masks, acc_t* __restrict__ lse, int C, int H,
                        int W, int G, int k, int s_rt) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* dps = reinterpret_cast<acc_t*>(smem_raw);  // fused only: dp [k²][s²][32]
  constexpr int QB = S_CT > 0 ? S_CT * S_CT : 4;
  const int s = S_CT > 0 ? S_CT : s_rt;
  const int s2 = s * s, K2 = k * k, r = (k - 1) / 2;
  const int lane = threadIdx.x, warp = threadIdx.y, tid = warp * kLanes + lane;
  const Tile tile = decode_tile(W, H, G, 1);
  const int h = tile.h, Cg = C / G, sW = s * W, w = tile.w0 + lane;
  const int64_t HW = static_cast<int64_t>(H) * W, oHW = HW * s2;
  const int64_t ng = static_cast<int64_t>(tile.n) * G + tile.g;
  const int64_t chan0 = static_cast<int64_t>(tile.n) * C + static_cast<int64_t>(tile.g) * Cg;
  const int n_tb = (K2 + TB - 1) / TB, n_qb = (s2 + QB - 1) / QB;

  if (w < W) {
    for (int item = warp; item < n_tb * n_qb; item += kWarps) {
      const int t0 = (item / n_qb) * TB, q0 = (item % n_qb) * QB;
      acc_t acc[TB][QB];
#pragma unroll
      for (int tb = 0; tb < TB; ++tb)
#pragma unroll
        for (int qb = 0; qb < QB; ++qb) acc[tb][qb] = acc_t(0);
      // Feature offsets of the TB taps (-1 outside the image: zero padding).
      int64_t foff[TB];
#pragma unroll
      for (int tb = 0; tb < TB; ++tb) {
        const int t = t0 + tb, ky = t / k, kx = t % k;
        const int hh = h + ky - r, ww = w + kx - r;
        foff[tb] = (t < K2 && hh >= 0 && hh < H && ww >= 0 && ww < W)
                       ? static_cast<int64_t>(hh) * W + ww
                       : -1;
      }
      for (int c = 0; c < Cg; ++c) {
        const scalar_t* go = grad_out + (chan0 + c) * oHW;
        acc_t gq[QB];
        if constexpr (ChildRow<S_CT, scalar_t>::kVector) {
#pragma unroll
          for (int i = 0; i < S_CT; ++i) {
            const Vec<scalar_t, S_CT> v = *reinterpret_cast<const Vec<scalar_t, S_CT>*>(
                go + static_cast<int64_t>(h * s + i) * sW + static_cast<int64_t>(w) * s);
#pragma unroll
            for (int j = 0; j < S_CT; ++j) gq[i * S_CT + j] = static_cast<acc_t>(v.v[j]);
          }
        } else {
#pragma unroll
          for (int qb = 0; qb < QB; ++qb) {
            const int q = q0 + qb;
            gq[qb] = (S_CT > 0 || q < s2)
                         ? static_cast<acc_t>(go[static_cast<int64_t>(h * s + q / s) * sW +
                                                 static_cast<int64_t>(w) * s + q % s])
                         : acc_t(0);
          }
        }
        const scalar_t* fc = features + (chan0 + c) * HW;
#pragma unroll
        for (int tb = 0; tb < TB; ++tb) {
          const acc_t f = foff[tb] >= 0 ? static_cast<acc_t>(fc[foff[tb]]) : acc_t(0);
#pragma unroll
          for (int qb = 0; qb < QB; ++qb) acc[tb][qb] += f * gq[qb];
        }
      }
#pragma unroll
      for (int tb = 0; tb < TB; ++tb) {
        const int t = t0 + tb;
        if (t >= K2) break;
#pragma unroll
        for (int qb = 0; qb < QB; ++qb) {
          const int q = q0 + qb;
          if (S_CT == 0 && q >= s2) break;
          if (FUSED) {
            dps[(t * s2 + q) * kLanes + lane] = acc[tb][qb];
          } else {
            grad_masks[(ng * K2 + t) * oHW + static_cast<int64_t>(h * s + q / s) * sW +
                       static_cast<int64_t>(w) * s + q % s] = static_cast<scalar_t>(acc[tb][qb]);
          }
        }
      }
    }
  }
  if (FUSED) {
    __syncthreads();  // dp of every (tap, child) of the tile is in shared memory
    for (int pq = tid; pq < s2 * kLanes; pq += kThreads) {
      const int q = pq / kLanes, l = pq % kLanes, wl = tile.w0 + l;
      if (wl >= W) continue;
      const int64_t off = (ng * K2 * s2 + q) * HW + static_cast<int64_t>(h) * W + wl;
      const int64_t tap_stride = s2 * HW;
      acc_t mx, den;
      softmax_stats(masks + off, tap_stride, K2, mx, den);
      const acc_t inv = acc_t(1) / den;
      acc_t dot = acc_t(0);
      for (int t = 0; t < K2; ++t)
        dot += fast_exp(static_cast<acc_t>(masks[off + t * tap_stride]) - mx) * inv *
               dps[(t * s2 + q) * kLanes + l];
      for (int t = 0; t < K2; ++t) {
        const acc_t p = fast_exp(static_cast<acc_t>(masks[off + t * tap_stride]) - mx) * inv;
        grad_masks[off + t * tap_stride] =
            static_cast<scalar_t>(p * (dps[(t * s2 + q) * kLanes + l] - dot));
      }
      lse[(ng * s2 + q) * HW + static_cast<int64_t>(h) * W + wl] = mx + ::log(den);
    }
  }
}

// ---- backward: features -----------------------------------------------------------------------

template <typename scalar_t, typename acc_t, int S_CT, int CB, bool FUSED>
__global__ void __launch_bounds__(kThreads)
carafe_feature_grad_kernel(const scalar_t* __restrict__ grad_out,
                           const scalar_t* __restrict__ masks, const acc_t* __restrict__ lse,
                           scalar_t* __restrict__ grad_features, int C, int H, int W, int G, int k,
                           int s_rt, int splits) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* msk = reinterpret_cast<acc_t*>(smem_raw);  // [k²][s²][32]
  constexpr int QB = S_CT > 0 ? S_CT * S_CT : 4;
  const int s = S_CT > 0 ? S_CT : s_rt;
  const int s2 = s * s, K2 = k * k, r = (k - 1) / 2;
  const int lane = threadIdx.x, warp = threadIdx.y, tid = warp * kLanes + lane;
  const Tile tile = decode_tile(W, H, G, splits);
  const int hh = tile.h, Cg = C / G, sW = s * W;
  const int64_t HW = static_cast<int64_t>(H) * W, oHW = HW * s2;
  const int64_t ng = static_cast<int64_t>(tile.n) * G + tile.g;

  // Stage, for each tap t, the masks of the children of the source pixel
  // (hh + r - ky, ww + r - kx) of each lane; zero where the source is outside the image.
  for (int idx = tid; idx < K2 * s2 * kLanes; idx += kThreads) {
    const int l = idx % kLanes, q = (idx / kLanes) % s2, t = idx / (kLanes * s2);
    const int ww = tile.w0 + l, ky = t / k, kx = t % k;
    const int h = hh + r - ky, w = ww + r - kx;
    acc_t v = acc_t(0);
    if (ww < W && h >= 0 && h < H && w >= 0 && w < W) {
      const int64_t p = static_cast<int64_t>(h) * W + w;
      if (FUSED) {
        v = fast_exp(static_cast<acc_t>(masks[((ng * K2 + t) * s2 + q) * HW + p]) -
                     lse[(ng * s2 + q) * HW + p]);
      } else {
        v = static_cast<acc_t>(masks[(ng * K2 + t) * oHW + static_cast<int64_t>(h * s + q / s) * sW +
                                     static_cast<int64_t>(w) * s + q % s]);
      }
    }
    msk[idx] = v;
  }
  __syncthreads();
  const int ww = tile.w0 + lane;
  if (ww >= W) return;  // no barrier below

  const int per_split = (Cg + splits - 1) / splits;
  const int c_begin = tile.split * per_split;
  const int c_end = min(Cg, c_begin + per_split);
  const int64_t chan0 = static_cast<int64_t>(tile.n) * C + static_cast<int64_t>(tile.g) * Cg;
  for (int cb0 = c_begin + warp * CB; cb0 < c_end; cb0 += kWarps * CB) {
    acc_t acc[CB];
#pragma unroll
    for (int cb = 0; cb < CB; ++cb) acc[cb] = acc_t(0);
    for (int ky = 0; ky < k; ++ky) {
      const int h = hh + r - ky;
      if (h < 0 || h >= H) continue;
      for (int kx = 0; kx < k; ++kx) {
        const int w = ww + r - kx;
        if (w < 0 || w >= W) continue;
        const int t = ky * k + kx;
        for (int q0 = 0; q0 < s2; q0 += QB) {
          acc_t m[QB];
#pragma unroll
          for (int qb = 0; qb < QB; ++qb) {
            const int q = q0 + qb;
            m[qb] = (S_CT > 0 || q < s2) ? msk[(t * s2 + q) * kLanes + lane] : acc_t(0);
          }
#pragma unroll
          for (int cb = 0; cb < CB; ++cb) {
            // Clamp instead of breaking out, so the loop unrolls and acc[] stays in registers;
            // the clamped channel's sum is never stored.
            const int c = min(cb0 + cb, c_end - 1);
            const scalar_t* go = grad_out + (chan0 + c) * oHW;
            if constexpr (ChildRow<S_CT, scalar_t>::kVector) {
#pragma unroll
              for (int i = 0; i < S_CT; ++i) {
                const Vec<scalar_t, S_CT> v = *reinterpret_cast<const Vec<scalar_t, S_CT>*>(
                    go + static_cast<int64_t>(h * s + i) * sW + static_cast<int64_t>(w) * s);
#pragma unroll
                for (int j = 0; j < S_CT; ++j)
                  acc[cb] += static_cast<acc_t>(v.v[j]) * m[i * S_CT + j];
              }
            } else {
#pragma unroll
              for (int qb = 0; qb < QB; ++qb) {
                const int q = q0 + qb;
                if (S_CT == 0 && q >= s2) break;
                acc[cb] += static_cast<acc_t>(go[static_cast<int64_t>(h * s + q / s) * sW +
                                                 static_cast<int64_t>(w) * s + q % s]) *
                           m[qb];
              }
            }
          }
        }
      }
    }
#pragma unroll
    for (int cb = 0; cb < CB; ++cb) {
      if (cb0 + cb >= c_end) break;
      grad_features[(chan0 + cb0 + cb) * HW + static_cast<int64_t>(hh) * W + ww] =
          static_cast<scalar_t>(acc[cb]);
    }
  }
}

// ---- launch configuration (shared with the host emulation in the tests) ----------------------

// Channels per thread in the forward: about 32 accumulators (64 at s = 4).
template <int S_CT>
constexpr int forward_cb() {
  return S_CT == 1 ? 16 : S_CT == 2 ? 8 : S_CT == 3 ? 4 : S_CT == 4 ? 4 : 8;
}
// Taps per thread in the mask gradient.
template <int S_CT>
constexpr int mask_tb() {
  return S_CT == 1 ? 8 : S_CT == 2 ? 4 : S_CT == 3 ? 2 : S_CT == 4 ? 2 : 4;
}
constexpr int kFeatureCB = 8;

// ---- host-side launch decisions (the glue's, callable by the host emulation) --------------------

// Blocks of one channel split: one per 32-pixel row tile of each (n, g).
inline int64_t tile_count(int64_t N, int64_t H, int64_t W, int64_t G) {
  return (W + kLanes - 1) / kLanes * H * N * G;
}

// Channel splits: enough blocks to fill the device (about 4 per SM), but at least a full pass of
// kWarps·cb channels per block.
inline int channel_splits(int64_t tiles, int64_t Cg, int cb, int sms) {
  const int64_t want = (4 * static_cast<int64_t>(sms) + std::max<int64_t>(tiles, 1) - 1) /
                       std::max<int64_t>(tiles, 1);
  const int64_t most = (Cg + kWarps * cb - 1) / (kWarps * cb);
  return static_cast<int>(std::max<int64_t>(1, std::min(want, most)));
}

// Dynamic shared memory of the staged masks, k²·s² accumulators per pixel of the 32-pixel tile,
// and what a block may use without raising cudaFuncAttributeMaxDynamicSharedMemorySize.
inline size_t staged_mask_bytes(int64_t k, int64_t s, size_t acc_bytes) {
  return static_cast<size_t>(k * k * s * s) * kLanes * acc_bytes;
}
constexpr size_t kSmemWithoutOptin = 48 * 1024;

// grad_out is read s children at a time as one vector (up to 16 bytes, see ChildRow): a
// contiguous view whose data starts off a 16-byte boundary (an odd storage offset) is copied to a
// fresh, aligned buffer first.
inline bool grad_out_needs_copy(const void* grad_out) {
  return reinterpret_cast<uintptr_t>(grad_out) % 16 != 0;
}

}  // namespace carafe_cuda
}  // namespace armnet_ops

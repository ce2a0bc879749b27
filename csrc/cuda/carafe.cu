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

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

namespace armnet_ops {
namespace {

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

// ---- host glue ----------------------------------------------------------------------------------

struct Geometry {
  int64_t N, C, H, W, k, G, s;
};

Geometry check_inputs(const char* op, const at::Tensor& features, const at::Tensor& masks,
                      const char* masks_name, int64_t k, int64_t G, int64_t s, bool fused) {
  TORCH_CHECK(features.dim() == 4, op, ": argument 'features' must be 4-D, got ", features.dim(),
              "-D with shape ", features.sizes());
  TORCH_CHECK(masks.dim() == 4, op, ": argument '", masks_name, "' must be 4-D, got ",
              masks.dim(), "-D with shape ", masks.sizes());
  TORCH_CHECK(features.is_cuda(), op, ": the CUDA kernel needs CUDA tensors, got 'features' on ",
              features.device());
  TORCH_CHECK(masks.device() == features.device(), op, ": argument '", masks_name,
              "' must be on the device of 'features' (", features.device(), "), got ",
              masks.device());
  TORCH_CHECK(masks.scalar_type() == features.scalar_type(), op, ": argument '", masks_name,
              "' must have the dtype of 'features' (", features.scalar_type(), "), got ",
              masks.scalar_type());
  TORCH_CHECK(k >= 1 && k % 2 == 1, op, ": argument 'kernel_size' must be odd and >= 1, got ", k);
  TORCH_CHECK(G >= 1, op, ": argument 'group_size' must be >= 1, got ", G);
  TORCH_CHECK(s >= 1, op, ": argument 'scale_factor' must be >= 1, got ", s);
  Geometry g{features.size(0), features.size(1), features.size(2), features.size(3), k, G, s};
  TORCH_CHECK(g.C % G == 0, op, ": the channels of 'features' (", g.C,
              ") must be divisible by group_size (", G, "), got C % G = ", g.C % G);
  const int64_t k2 = k * k;
  TORCH_CHECK(masks.size(0) == g.N, op, ": argument '", masks_name, "' must have N = ", g.N,
              " (dim 0), got ", masks.size(0));
  if (fused) {
    TORCH_CHECK(masks.size(1) == G * k2 * s * s, op, ": argument '", masks_name,
                "' must have G·k²·s² = ", G * k2 * s * s, " channels (dim 1), got ",
                masks.size(1));
    TORCH_CHECK(masks.size(2) == g.H && masks.size(3) == g.W, op, ": argument '", masks_name,
                "' must have the spatial size of 'features' (", g.H, ", ", g.W, "), got (",
                masks.size(2), ", ", masks.size(3), ")");
  } else {
    TORCH_CHECK(masks.size(1) == G * k2, op, ": argument '", masks_name, "' must have G·k² = ",
                G * k2, " channels (dim 1), got ", masks.size(1));
    TORCH_CHECK(masks.size(2) == s * g.H && masks.size(3) == s * g.W, op, ": argument '",
                masks_name, "' must have spatial size (s·H, s·W) = (", s * g.H, ", ", s * g.W,
                "), got (", masks.size(2), ", ", masks.size(3), ")");
  }
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
  const size_t bytes = static_cast<size_t>(g.k * g.k * g.s * g.s) * kLanes * elem;
  const int device = at::cuda::current_device();
  const size_t optin = at::cuda::getDeviceProperties(device)->sharedMemPerBlockOptin;
  TORCH_CHECK(bytes <= optin, op, ": kernel_size² · scale_factor² = ", g.k * g.k * g.s * g.s,
              " needs ", bytes, " bytes of shared memory per block, past this device's ", optin,
              " (at most ", optin / (kLanes * elem), " for this dtype)");
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
  return bytes;
}

int64_t tile_count(const Geometry& g) {
  return (g.W + kLanes - 1) / kLanes * g.H * g.N * g.G;
}

// Channel splits: enough blocks to fill the device (≈ 4 per SM), but at least a full pass of
// kWarps·CB channels per block.
int channel_splits(const Geometry& g, int cb) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t tiles = std::max<int64_t>(tile_count(g), 1);
  const int64_t want = (4 * sms + tiles - 1) / tiles;
  const int64_t most = (g.C / g.G + kWarps * cb - 1) / (kWarps * cb);
  return static_cast<int>(std::max<int64_t>(1, std::min(want, most)));
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
  TORCH_CHECK(grad_out_in.dim() == 4 && grad_out_in.size(0) == g.N && grad_out_in.size(1) == g.C &&
                  grad_out_in.size(2) == s * g.H && grad_out_in.size(3) == s * g.W,
              op, ": argument 'grad_out' must have shape (", g.N, ", ", g.C, ", ", s * g.H, ", ",
              s * g.W, "), got ", grad_out_in.sizes());
  TORCH_CHECK(grad_out_in.scalar_type() == features_in.scalar_type() &&
                  grad_out_in.device() == features_in.device(),
              op, ": argument 'grad_out' must have the dtype and device of 'features' (",
              features_in.scalar_type(), ", ", features_in.device(), "), got ",
              grad_out_in.scalar_type(), ", ", grad_out_in.device());
  const c10::cuda::CUDAGuard guard(features_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous();
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

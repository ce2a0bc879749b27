// Criss-cross attention, hand-written CUDA: the fused op (cca_forward / cca_backward) and CCNet's
// two-op API (cca_weight / cca_map and their backwards). fp32, fp16, bf16 (and fp64), all with
// accumulation in the op-math type (float; double for double).
//
// Layout: q, k (N, Cqk, H, W), v (N, Cv, H, W), contiguous NCHW (the glue calls .contiguous()).
// The keys of pixel u = (h, w) are indexed s in [0, W + H): s < W is the row key (h, s); s = W + j
// is the column key (j, w), and s = W + h (the pixel itself, already a row key) is skipped. The
// forward never materialises the (N, H+W-1, H, W) energy: one thread block per pixel keeps that
// pixel's W + H energies in shared memory.
//
//   cca_forward_kernel        block per pixel: energies -> block max -> exp, block sum -> lse;
//                             then threads over Cv: out = sum_s p_s v_s. Saves out and lse.
//   cca_backward_query_kernel block per pixel: D = <dO, O>, dS_s = P_s (<dO, v_s> - D) scale,
//                             dq = sum_s dS_s k_s. Writes D for the next kernel.
//   cca_backward_key_kernel   block per key t: the W + H - 1 pixels that see t (its row, and its
//                             column without itself) recompute P and dS from q, k, lse and D;
//                             dk = sum_u dS_u q_u, dv = sum_u P_u dO_u. A gather: every output is
//                             written by one thread in a fixed order, no atomics, deterministic.
//
// What remains (performance, not correctness): this is a SIMT kernel. Reads of v, dO along the
// channel are strided by H·W, and no tensor cores are used; the next step is the line-tiled
// design of armnet_ops/triton/cca.py (row pass + column pass, q·k and p·v as mma tiles).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cca_checks.h"

namespace armnet_ops {
namespace {

constexpr int kThreads = 256;  // a multiple of 32: the block reduction works in whole warps
constexpr int kElementwiseThreads = 256;

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <typename T>
__device__ __forceinline__ T warp_max(T x) {
  for (int o = 16; o > 0; o >>= 1) x = max(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// Block-wide sum or max; every thread returns the result. scratch holds 32 values. The leading
// __syncthreads also orders this call after the reads of scratch[0] by a previous call.
template <typename T, bool kMax>
__device__ T block_reduce(T x, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n_warps = (blockDim.x + 31) >> 5;
  x = kMax ? warp_max(x) : warp_sum(x);
  __syncthreads();
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    T y = lane < n_warps ? scratch[lane] : (kMax ? neg_inf<T>() : T(0));
    y = kMax ? warp_max(y) : warp_sum(y);
    if (lane == 0) scratch[0] = y;
  }
  __syncthreads();
  return scratch[0];
}

// Offset h'·W + w' of key s of the pixel (h, w), or -1 for the pixel itself in its column.
__device__ __forceinline__ int64_t key_offset(int s, int h, int w, int W) {
  if (s < W) return static_cast<int64_t>(h) * W + s;
  const int j = s - W;
  return j == h ? -1 : static_cast<int64_t>(j) * W + w;
}

// Offset of pixel u of the pixels that see key (j, z) (u < W: (j, u); u = W + h: (h, z), h != j),
// or -1 for u = W + j.
__device__ __forceinline__ int64_t query_offset(int u, int j, int z, int W) {
  if (u < W) return static_cast<int64_t>(j) * W + u;
  const int h = u - W;
  return h == j ? -1 : static_cast<int64_t>(h) * W + z;
}

// ---- fused forward ------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
cca_forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                   const scalar_t* __restrict__ v, scalar_t* __restrict__ out,
                   acc_t* __restrict__ lse, int Cqk, int Cv, int H, int W, acc_t scale) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* qs = reinterpret_cast<acc_t*>(smem_raw);  // [Cqk] q of this pixel
  acc_t* ps = qs + Cqk;                             // [W + H] energies, then weights
  acc_t* scratch = ps + W + H;                      // [32]
  const int64_t HW = static_cast<int64_t>(H) * W;
  const int64_t pix = blockIdx.x;  // n·HW + h·W + w
  const int64_t n = pix / HW, hw = pix % HW;
  const int h = static_cast<int>(hw / W), w = static_cast<int>(hw % W);
  const scalar_t* qn = q + n * Cqk * HW;
  const scalar_t* kn = k + n * Cqk * HW;
  const scalar_t* vn = v + n * Cv * HW;

  for (int c = threadIdx.x; c < Cqk; c += blockDim.x) qs[c] = static_cast<acc_t>(qn[c * HW + hw]);
  __syncthreads();
  acc_t m_local = neg_inf<acc_t>();
  for (int s = threadIdx.x; s < W + H; s += blockDim.x) {
    const int64_t key = key_offset(s, h, w, W);
    acc_t e = neg_inf<acc_t>();
    if (key >= 0) {
      e = 0;
      for (int c = 0; c < Cqk; ++c) e += qs[c] * static_cast<acc_t>(kn[c * HW + key]);
      e *= scale;
    }
    ps[s] = e;
    m_local = max(m_local, e);
  }
  const acc_t m = block_reduce<acc_t, true>(m_local, scratch);  // finite: W >= 1 row keys
  acc_t l_local = 0;
  for (int s = threadIdx.x; s < W + H; s += blockDim.x) {
    const acc_t p = ps[s] == neg_inf<acc_t>() ? acc_t(0) : exp(ps[s] - m);
    ps[s] = p;
    l_local += p;
  }
  const acc_t l = block_reduce<acc_t, false>(l_local, scratch);  // also publishes ps
  if (threadIdx.x == 0) lse[pix] = m + log(l);
  const acc_t inv_l = acc_t(1) / l;
  for (int c = threadIdx.x; c < Cv; c += blockDim.x) {
    const scalar_t* vc = vn + c * HW;
    acc_t acc = 0;
    for (int z = 0; z < W; ++z) acc += ps[z] * static_cast<acc_t>(vc[static_cast<int64_t>(h) * W + z]);
    for (int j = 0; j < H; ++j) {
      if (j == h) continue;
      acc += ps[W + j] * static_cast<acc_t>(vc[static_cast<int64_t>(j) * W + w]);
    }
    out[n * Cv * HW + c * HW + hw] = static_cast<scalar_t>(acc * inv_l);
  }
}

// ---- fused backward -----------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
cca_backward_query_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ q,
                          const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                          const scalar_t* __restrict__ out, const acc_t* __restrict__ lse,
                          scalar_t* __restrict__ gq, acc_t* __restrict__ dbuf, int Cqk, int Cv,
                          int H, int W, acc_t scale) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* qs = reinterpret_cast<acc_t*>(smem_raw);  // [Cqk]
  acc_t* gos = qs + Cqk;                            // [Cv] dO of this pixel
  acc_t* ds = gos + Cv;                             // [W + H] dS
  acc_t* scratch = ds + W + H;                      // [32]
  const int64_t HW = static_cast<int64_t>(H) * W;
  const int64_t pix = blockIdx.x;
  const int64_t n = pix / HW, hw = pix % HW;
  const int h = static_cast<int>(hw / W), w = static_cast<int>(hw % W);
  const scalar_t* kn = k + n * Cqk * HW;
  const scalar_t* vn = v + n * Cv * HW;

  for (int c = threadIdx.x; c < Cqk; c += blockDim.x)
    qs[c] = static_cast<acc_t>(q[n * Cqk * HW + c * HW + hw]);
  acc_t d_local = 0;
  for (int c = threadIdx.x; c < Cv; c += blockDim.x) {
    const acc_t g = static_cast<acc_t>(go[n * Cv * HW + c * HW + hw]);
    gos[c] = g;
    d_local += g * static_cast<acc_t>(out[n * Cv * HW + c * HW + hw]);
  }
  const acc_t D = block_reduce<acc_t, false>(d_local, scratch);  // also publishes qs, gos
  if (threadIdx.x == 0) dbuf[pix] = D;
  const acc_t lse_u = lse[pix];
  for (int s = threadIdx.x; s < W + H; s += blockDim.x) {
    const int64_t key = key_offset(s, h, w, W);
    acc_t d = 0;
    if (key >= 0) {
      acc_t e = 0;
      for (int c = 0; c < Cqk; ++c) e += qs[c] * static_cast<acc_t>(kn[c * HW + key]);
      const acc_t p = exp(e * scale - lse_u);
      acc_t dp = 0;
      for (int c = 0; c < Cv; ++c) dp += gos[c] * static_cast<acc_t>(vn[c * HW + key]);
      d = p * (dp - D) * scale;
    }
    ds[s] = d;
  }
  __syncthreads();
  for (int c = threadIdx.x; c < Cqk; c += blockDim.x) {
    const scalar_t* kc = kn + c * HW;
    acc_t acc = 0;
    for (int z = 0; z < W; ++z) acc += ds[z] * static_cast<acc_t>(kc[static_cast<int64_t>(h) * W + z]);
    for (int j = 0; j < H; ++j) {
      if (j == h) continue;
      acc += ds[W + j] * static_cast<acc_t>(kc[static_cast<int64_t>(j) * W + w]);
    }
    gq[n * Cqk * HW + c * HW + hw] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
cca_backward_key_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ q,
                        const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                        const acc_t* __restrict__ lse, const acc_t* __restrict__ dbuf,
                        scalar_t* __restrict__ gk, scalar_t* __restrict__ gv, int Cqk, int Cv,
                        int H, int W, acc_t scale) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* ks = reinterpret_cast<acc_t*>(smem_raw);  // [Cqk] k of this key
  acc_t* vs = ks + Cqk;                             // [Cv] v of this key
  acc_t* ps = vs + Cv;                              // [W + H] P of the pixels that see it
  acc_t* ds = ps + W + H;                           // [W + H] dS of those pixels
  const int64_t HW = static_cast<int64_t>(H) * W;
  const int64_t key = blockIdx.x;  // n·HW + j·W + z
  const int64_t n = key / HW, jz = key % HW;
  const int j = static_cast<int>(jz / W), z = static_cast<int>(jz % W);
  const scalar_t* qn = q + n * Cqk * HW;
  const scalar_t* gon = go + n * Cv * HW;
  const acc_t* lse_n = lse + n * HW;
  const acc_t* d_n = dbuf + n * HW;

  for (int c = threadIdx.x; c < Cqk; c += blockDim.x)
    ks[c] = static_cast<acc_t>(k[n * Cqk * HW + c * HW + jz]);
  for (int c = threadIdx.x; c < Cv; c += blockDim.x)
    vs[c] = static_cast<acc_t>(v[n * Cv * HW + c * HW + jz]);
  __syncthreads();
  for (int u = threadIdx.x; u < W + H; u += blockDim.x) {
    const int64_t pix = query_offset(u, j, z, W);
    acc_t p = 0, d = 0;
    if (pix >= 0) {
      acc_t e = 0;
      for (int c = 0; c < Cqk; ++c) e += static_cast<acc_t>(qn[c * HW + pix]) * ks[c];
      p = exp(e * scale - lse_n[pix]);
      acc_t dp = 0;
      for (int c = 0; c < Cv; ++c) dp += static_cast<acc_t>(gon[c * HW + pix]) * vs[c];
      d = p * (dp - d_n[pix]) * scale;
    }
    ps[u] = p;
    ds[u] = d;
  }
  __syncthreads();
  // Pixels of the row (j, u), then of the column (h, z), h != j: a fixed order.
  for (int c = threadIdx.x; c < Cqk; c += blockDim.x) {
    const scalar_t* qc = qn + c * HW;
    acc_t acc = 0;
    for (int u = 0; u < W; ++u) acc += ds[u] * static_cast<acc_t>(qc[static_cast<int64_t>(j) * W + u]);
    for (int h = 0; h < H; ++h) {
      if (h == j) continue;
      acc += ds[W + h] * static_cast<acc_t>(qc[static_cast<int64_t>(h) * W + z]);
    }
    gk[n * Cqk * HW + c * HW + jz] = static_cast<scalar_t>(acc);
  }
  for (int c = threadIdx.x; c < Cv; c += blockDim.x) {
    const scalar_t* gc = gon + c * HW;
    acc_t acc = 0;
    for (int u = 0; u < W; ++u) acc += ps[u] * static_cast<acc_t>(gc[static_cast<int64_t>(j) * W + u]);
    for (int h = 0; h < H; ++h) {
      if (h == j) continue;
      acc += ps[W + h] * static_cast<acc_t>(gc[static_cast<int64_t>(h) * W + z]);
    }
    gv[n * Cv * HW + c * HW + jz] = static_cast<scalar_t>(acc);
  }
}

// ---- the two-op API: one thread per output element -----------------------------------------
// energy (N, S = H+W-1, H, W): channel s < W is the row key (h, s); channel W + i the column key
// (j, w), j = i if i < h else i + 1. Offsets of the key of channel s at pixel (h, w):

__device__ __forceinline__ int64_t channel_key_offset(int s, int h, int w, int W) {
  if (s < W) return static_cast<int64_t>(h) * W + s;
  const int i = s - W;
  return static_cast<int64_t>(i < h ? i : i + 1) * W + w;
}

// The channel in which pixel (h, ·) stores its column key of row j (j != h).
__device__ __forceinline__ int column_channel(int j, int h, int W) { return W + (j < h ? j : j - 1); }

template <typename scalar_t, typename acc_t>
__global__ void cca_weight_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                  scalar_t* __restrict__ e, int64_t total, int C, int H, int W) {
  const int64_t HW = static_cast<int64_t>(H) * W, S = H + W - 1;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t hw = idx % HW, n = idx / (S * HW);
    const int s = static_cast<int>((idx / HW) % S);
    const int h = static_cast<int>(hw / W), w = static_cast<int>(hw % W);
    const int64_t key = channel_key_offset(s, h, w, W);
    const scalar_t* qn = q + n * C * HW;
    const scalar_t* kn = k + n * C * HW;
    acc_t acc = 0;
    for (int c = 0; c < C; ++c)
      acc += static_cast<acc_t>(qn[c * HW + hw]) * static_cast<acc_t>(kn[c * HW + key]);
    e[idx] = static_cast<scalar_t>(acc);
  }
}

// grad of q (KEY_SIDE false) or of k (true) from the grad of the energy.
template <typename scalar_t, typename acc_t, bool KEY_SIDE>
__global__ void cca_weight_backward_kernel(const scalar_t* __restrict__ g,
                                           const scalar_t* __restrict__ other,
                                           scalar_t* __restrict__ grad, int64_t total, int C,
                                           int H, int W) {
  const int64_t HW = static_cast<int64_t>(H) * W, S = H + W - 1;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t hw = idx % HW, nc = idx / HW, n = nc / C;
    const int h = static_cast<int>(hw / W), w = static_cast<int>(hw % W);
    const scalar_t* gn = g + n * S * HW;
    const scalar_t* oc = other + nc * HW;  // channel c of the other operand, image n
    acc_t acc = 0;
    if (!KEY_SIDE) {
      // dq(h, w) = sum_s G[s, h, w] k[key_s(h, w)]
      for (int s = 0; s < S; ++s)
        acc += static_cast<acc_t>(gn[s * HW + hw]) *
               static_cast<acc_t>(oc[channel_key_offset(s, h, w, W)]);
    } else {
      // dk(j, z) with (j, z) = (h, w): the row (j, u) sees it in channel z, the column (r, z),
      // r != j, in channel column_channel(j, r).
      const int j = h, z = w;
      for (int u = 0; u < W; ++u) {
        const int64_t pu = static_cast<int64_t>(j) * W + u;
        acc += static_cast<acc_t>(gn[z * HW + pu]) * static_cast<acc_t>(oc[pu]);
      }
      for (int r = 0; r < H; ++r) {
        if (r == j) continue;
        const int64_t pu = static_cast<int64_t>(r) * W + z;
        acc += static_cast<acc_t>(gn[column_channel(j, r, W) * HW + pu]) * static_cast<acc_t>(oc[pu]);
      }
    }
    grad[idx] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void cca_map_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ v,
                               scalar_t* __restrict__ out, int64_t total, int C, int H, int W) {
  const int64_t HW = static_cast<int64_t>(H) * W, S = H + W - 1;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t hw = idx % HW, nc = idx / HW, n = nc / C;
    const int h = static_cast<int>(hw / W), w = static_cast<int>(hw % W);
    const scalar_t* an = a + n * S * HW;
    const scalar_t* vc = v + nc * HW;
    acc_t acc = 0;
    for (int s = 0; s < S; ++s)
      acc += static_cast<acc_t>(an[s * HW + hw]) * static_cast<acc_t>(vc[channel_key_offset(s, h, w, W)]);
    out[idx] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void cca_map_backward_attn_kernel(const scalar_t* __restrict__ go,
                                             const scalar_t* __restrict__ v,
                                             scalar_t* __restrict__ ga, int64_t total, int C,
                                             int H, int W) {
  const int64_t HW = static_cast<int64_t>(H) * W, S = H + W - 1;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t hw = idx % HW, n = idx / (S * HW);
    const int s = static_cast<int>((idx / HW) % S);
    const int h = static_cast<int>(hw / W), w = static_cast<int>(hw % W);
    const int64_t key = channel_key_offset(s, h, w, W);
    const scalar_t* gon = go + n * C * HW;
    const scalar_t* vn = v + n * C * HW;
    acc_t acc = 0;
    for (int c = 0; c < C; ++c)
      acc += static_cast<acc_t>(gon[c * HW + hw]) * static_cast<acc_t>(vn[c * HW + key]);
    ga[idx] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void cca_map_backward_v_kernel(const scalar_t* __restrict__ go,
                                          const scalar_t* __restrict__ a,
                                          scalar_t* __restrict__ gv, int64_t total, int C, int H,
                                          int W) {
  const int64_t HW = static_cast<int64_t>(H) * W, S = H + W - 1;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t hw = idx % HW, nc = idx / HW, n = nc / C;
    const int j = static_cast<int>(hw / W), z = static_cast<int>(hw % W);
    const scalar_t* an = a + n * S * HW;
    const scalar_t* gc = go + nc * HW;
    acc_t acc = 0;
    for (int u = 0; u < W; ++u) {
      const int64_t pu = static_cast<int64_t>(j) * W + u;
      acc += static_cast<acc_t>(an[z * HW + pu]) * static_cast<acc_t>(gc[pu]);
    }
    for (int r = 0; r < H; ++r) {
      if (r == j) continue;
      const int64_t pu = static_cast<int64_t>(r) * W + z;
      acc += static_cast<acc_t>(an[column_channel(j, r, W) * HW + pu]) * static_cast<acc_t>(gc[pu]);
    }
    gv[idx] = static_cast<scalar_t>(acc);
  }
}

// ---- glue ---------------------------------------------------------------------------------

void check_cuda_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const char* op) {
  cca_checks::check_qkv(q, k, v, op);
  TORCH_CHECK(q.is_cuda() && k.device() == q.device() && v.device() == q.device(), op,
              ": q, k, v must be on one CUDA device, got ", q.device(), ", ", k.device(), ", ",
              v.device());
  TORCH_CHECK(q.size(0) * q.size(2) * q.size(3) <= std::numeric_limits<int32_t>::max() &&
                  q.size(1) <= std::numeric_limits<int32_t>::max() &&
                  v.size(1) <= std::numeric_limits<int32_t>::max(),
              op, ": N·H·W and the channel counts must fit in int32 (one block per pixel), got "
              "shapes ", q.sizes(), " and ", v.sizes());
}

size_t checked_smem(size_t bytes, const char* op, int64_t H, int64_t W) {
  TORCH_CHECK(bytes <= 48 * 1024, op, ": H + W and the channel counts too large for the CUDA "
              "kernel's shared memory (", bytes, " bytes > 48 KiB) at H = ", H, ", W = ", W,
              "; use backend='triton'");
  return bytes;
}

unsigned int elementwise_blocks(int64_t total) {
  const int64_t blocks = (total + kElementwiseThreads - 1) / kElementwiseThreads;
  return static_cast<unsigned int>(std::min<int64_t>(blocks, 65535LL * 16));
}

std::tuple<at::Tensor, at::Tensor> cca_forward_cuda(const at::Tensor& q_, const at::Tensor& k_,
                                                    const at::Tensor& v_, double scale) {
  check_cuda_inputs(q_, k_, v_, "cca_forward");
  c10::cuda::CUDAGuard guard(q_.device());
  auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const int64_t N = q.size(0), Cqk = q.size(1), H = q.size(2), W = q.size(3), Cv = v.size(1);
  auto out = at::empty({N, Cv, H, W}, v.options());
  auto lse = at::empty({N, H, W}, q.options().dtype(at::toOpMathType(q.scalar_type())));
  if (N * H * W == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "cca_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = checked_smem((Cqk + W + H + 32) * sizeof(acc_t), "cca_forward", H, W);
    cca_forward_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned int>(N * H * W), kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
            q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
            out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), static_cast<int>(Cqk),
            static_cast<int>(Cv), static_cast<int>(H), static_cast<int>(W),
            static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cca_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out_, const at::Tensor& lse_, double scale) {
  check_cuda_inputs(q_, k_, v_, "cca_backward");
  cca_checks::check_backward(grad_out, q_, v_, out_, lse_);
  c10::cuda::CUDAGuard guard(q_.device());
  auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  auto go = grad_out.to(v.scalar_type()).contiguous(), out = out_.to(v.scalar_type()).contiguous();
  const auto acc_type = at::toOpMathType(q.scalar_type());
  auto lse = lse_.to(acc_type).contiguous();
  const int64_t N = q.size(0), Cqk = q.size(1), H = q.size(2), W = q.size(3), Cv = v.size(1);
  auto gq = at::empty_like(q), gk = at::empty_like(k), gv = at::empty_like(v);
  if (N * H * W == 0) return {gq, gk, gv};
  auto dbuf = at::empty({N, H, W}, q.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "cca_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto stream = at::cuda::getCurrentCUDAStream();
    const auto blocks = static_cast<unsigned int>(N * H * W);
    const size_t smem_q = checked_smem((Cqk + Cv + W + H + 32) * sizeof(acc_t), "cca_backward", H, W);
    cca_backward_query_kernel<scalar_t, acc_t><<<blocks, kThreads, smem_q, stream>>>(
        go.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
        v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(),
        gq.data_ptr<scalar_t>(), dbuf.data_ptr<acc_t>(), static_cast<int>(Cqk),
        static_cast<int>(Cv), static_cast<int>(H), static_cast<int>(W), static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const size_t smem_k = checked_smem((Cqk + Cv + 2 * (W + H)) * sizeof(acc_t), "cca_backward", H, W);
    cca_backward_key_kernel<scalar_t, acc_t><<<blocks, kThreads, smem_k, stream>>>(
        go.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
        v.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), dbuf.data_ptr<acc_t>(),
        gk.data_ptr<scalar_t>(), gv.data_ptr<scalar_t>(), static_cast<int>(Cqk),
        static_cast<int>(Cv), static_cast<int>(H), static_cast<int>(W), static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gq, gk, gv};
}

void check_attn(const at::Tensor& a, const at::Tensor& v, const char* op) {
  cca_checks::check_attn(a, v, op);
  TORCH_CHECK(a.is_cuda() && v.device() == a.device(), op, ": attn and v must be on one CUDA "
              "device, got ", a.device(), " and ", v.device());
}

// The two-op API's kernels share one signature, (in0, in1, out, total, C, H, W), with one thread
// per element of out; a launch is skipped by the caller when out is empty.
template <typename scalar_t, typename Kernel>
void launch_elementwise(Kernel kernel, const at::Tensor& in0, const at::Tensor& in1,
                        const at::Tensor& out, int64_t C, int64_t H, int64_t W) {
  const int64_t total = out.numel();
  kernel<<<elementwise_blocks(total), kElementwiseThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      in0.data_ptr<scalar_t>(), in1.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), total,
      static_cast<int>(C), static_cast<int>(H), static_cast<int>(W));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor cca_weight_cuda(const at::Tensor& q_, const at::Tensor& k_) {
  check_cuda_inputs(q_, k_, q_, "cca_weight");
  c10::cuda::CUDAGuard guard(q_.device());
  auto q = q_.contiguous(), k = k_.contiguous();
  const int64_t N = q.size(0), C = q.size(1), H = q.size(2), W = q.size(3);
  auto e = at::empty({N, H + W - 1, H, W}, q.options());
  const int64_t total = e.numel();
  if (total == 0) return e;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "cca_weight_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_elementwise<scalar_t>(cca_weight_kernel<scalar_t, acc_t>, q, k, e, C, H, W);
  });
  return e;
}

std::tuple<at::Tensor, at::Tensor> cca_weight_backward_cuda(const at::Tensor& g_,
                                                            const at::Tensor& q_,
                                                            const at::Tensor& k_) {
  check_cuda_inputs(q_, k_, q_, "cca_weight_backward");
  const int64_t C = q_.size(1), H = q_.size(2), W = q_.size(3);
  cca_checks::check_grad_energy(g_, q_);
  c10::cuda::CUDAGuard guard(q_.device());
  auto q = q_.contiguous(), k = k_.contiguous(), g = g_.to(q.scalar_type()).contiguous();
  auto gq = at::empty_like(q), gk = at::empty_like(k);
  const int64_t total = gq.numel();
  if (total == 0) return {gq.zero_(), gk.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "cca_weight_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_elementwise<scalar_t>(cca_weight_backward_kernel<scalar_t, acc_t, false>, g, k, gq, C,
                                 H, W);
    launch_elementwise<scalar_t>(cca_weight_backward_kernel<scalar_t, acc_t, true>, g, q, gk, C,
                                 H, W);
  });
  return {gq, gk};
}

at::Tensor cca_map_cuda(const at::Tensor& a_, const at::Tensor& v_) {
  check_attn(a_, v_, "cca_map");
  c10::cuda::CUDAGuard guard(v_.device());
  auto a = a_.contiguous(), v = v_.contiguous();
  const int64_t C = v.size(1), H = v.size(2), W = v.size(3);
  auto out = at::empty_like(v);
  const int64_t total = out.numel();
  if (total == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "cca_map_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_elementwise<scalar_t>(cca_map_kernel<scalar_t, acc_t>, a, v, out, C, H, W);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> cca_map_backward_cuda(const at::Tensor& g_,
                                                         const at::Tensor& a_,
                                                         const at::Tensor& v_) {
  check_attn(a_, v_, "cca_map_backward");
  cca_checks::check_map_grad(g_, v_);
  c10::cuda::CUDAGuard guard(v_.device());
  auto a = a_.contiguous(), v = v_.contiguous(), g = g_.to(v.scalar_type()).contiguous();
  const int64_t C = v.size(1), H = v.size(2), W = v.size(3);
  auto ga = at::empty_like(a), gv = at::empty_like(v);
  const int64_t total_a = ga.numel(), total_v = gv.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "cca_map_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (total_a > 0) {
      launch_elementwise<scalar_t>(cca_map_backward_attn_kernel<scalar_t, acc_t>, g, v, ga, C, H,
                                   W);
    }
    if (total_v > 0) {
      launch_elementwise<scalar_t>(cca_map_backward_v_kernel<scalar_t, acc_t>, g, a, gv, C, H, W);
    }
  });
  return {ga, gv};
}

}  // namespace

TORCH_LIBRARY_IMPL(armnet_ops, CUDA, m) {
  m.impl("cca_forward", &cca_forward_cuda);
  m.impl("cca_backward", &cca_backward_cuda);
  m.impl("cca_weight", &cca_weight_cuda);
  m.impl("cca_weight_backward", &cca_weight_backward_cuda);
  m.impl("cca_map", &cca_map_cuda);
  m.impl("cca_map_backward", &cca_map_backward_cuda);
}

}  // namespace armnet_ops

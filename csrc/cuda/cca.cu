// Criss-cross attention, hand-written CUDA: the fused op (cca_forward / cca_backward), CCNet's
// block with its residual epilogue fused (cca_residual_forward / cca_residual_backward), and
// CCNet's two-op API (cca_weight / cca_map and their backwards). fp32, fp16, bf16 (and fp64).
//
// Layout: q, k (N, Cqk, H, W), v (N, Cv, H, W). The tiled kernels read them in NHWC memory order
// (channels_last strides): channels_last inputs are used in place, NCHW inputs go through one
// transpose each (nhwc() below; benchmarks/traffic.py counts it). Outputs are contiguous NCHW.
// The H+W-1 keys of pixel (h, w) are its row (h, z), itself included, and its column (j, w),
// j != h. Nothing of size (N, H+W-1, H, W) is ever materialised.
//
// The fused op is line-tiled; the device code is in cca_kernels.cuh, where each kernel's header
// states the bytes it moves. Every kernel runs twice: a column pass (lines = columns, the pixel
// itself excluded from its keys), then a row pass, which adds the column pass's result and writes
// the NCHW outputs along w (coalesced). A block owns BO positions of one line and walks the
// line's positions BK at a time; operand tiles [positions][channels] are read along channels
// (coalesced in both passes; 16-byte cp.async, double-buffered over channel chunks of CT, when a
// pixel's channel vector is a multiple of 16 bytes). All tile products are 16x16x16 mma on
// shared-memory operands: nvcuda::wmma tensor cores for fp16/bf16 (fp32 accumulators;
// ProdTiles16: BO = 128, so H, W <= 128 is one own tile, BK = 64, CT = 32, 8 warps), scalar FMA
// of the same tiles for fp32/fp64 (ProdTilesFma: BO = 64, BK = 32, CT = 32, 4 warps; no TF32,
// so fp32 stays exact to fp32 rounding).
//
//   forward  cca_fwd_line_kernel, column pass then row pass, where the longer line's energies
//            and P fit in shared memory (Smem::line_fits: fp16/bf16 lines up to 256 positions on
//            an sm_90, fp32 384, fp64 160; CCNet's 97x97 and Cityscapes' 128x256 included). Per
//            block of BO own positions: q·k against every key tile of the line, the pass's
//            softmax state (m, l) per pixel and P = exp(e - m) in the element type, formed once;
//            then P·V over Cv in chunks of CT in registers (v read once per own tile, no Cv
//            groups). The column pass writes part = P·V / l (NHWC, element type) and
//            lse_c = m + log l; the row pass merges the two states per pixel,
//            lse = logaddexp(lse_c, lse_r), out = exp(m_r - lse)·P_r·V + exp(lse_c - lse)·part,
//            rounds once into out (so fp16/bf16 out carries two roundings of the column part;
//            tests/test_cca_cuda_emulation.py bounds the error at 1 ulp of the output scale),
//            writes y = gamma·out + residual for the residual op (gamma read on the device) and
//            overwrites lse with the merged value. Saved: out, lse (N, H, W) in op-math type.
//            Longer lines (the fallback, chosen on the host):
//            1. cca_lse_kernel, column pass then row pass: per pixel the log-sum-exp of its
//               scaled energies by an online softmax over key tiles; the row pass merges its
//               value into the column pass's by logaddexp. Saved: lse.
//            2. cca_pv_kernel<KEY=false>, grid (image·line·pixel tile, Cv group): P recomputed
//               from the final lse once per (pixel tile, key tile) and used for every Cv chunk
//               of the group (op-math accumulators in shared memory; the group is the widest
//               that fits: fp16/bf16 288 channels on an sm_90, fp32 all of Cv up to 704). The
//               column pass writes part as above (weighted by the final lse), the row pass adds
//               it in fp32 and rounds once more into out, and writes y. Saved: out.
//   backward 1. cca_delta_kernel: D_u = gamma·<grad_y_u, out_u> (gamma = 1 for cca_backward),
//               and for the residual op the per-pixel <grad_y_u, out_u>, summed by at::sum
//               (a fixed-shape reduction) into grad_gamma.
//            2. cca_grad_kernel<KEY=false> (dq), grid (pixel tiles, Cqk tiles of CT):
//               dS = P·(gamma·dO·V^T - D)·scale, dq += dS·K; <KEY=true> (dk), grid (key tiles,
//               Cqk tiles), the transposed tiles, dk += dS^T·Q gathered over the pixels of the
//               line that see each key.
//            3. cca_pv_kernel<KEY=true> (dv), grid (key tiles, Cv groups): dv += gamma·P^T·dO.
//            Column pass then row pass each, the row pass adding the column pass's result in
//            stream order: every element is written by one thread, no atomics, deterministic.
//
// Extra memory: lse (and D) (N, H, W) in op-math type; one element-type buffer of out's size in
// the forward and of N·max(Cqk, Cv)·H·W in the backward (the column pass's results); the NHWC
// copies of NCHW inputs. Shared memory per block (sm_90 opt-in up to 227 KiB): fp16/bf16 line
// kernel 34 KiB + 768 B per position of the line padded to 64 (130 KiB at 97 -> 128, 226 KiB at
// 256), lse 81 KiB, dq/dk 115 KiB, P·V 81 KiB + 512 B per Cv channel of the group.
// bfloat16 needs sm_80, fp16 sm_70: the glue refuses older GPUs with an error (their device code
// compiles to scalar FMA). cp.async needs sm_80; older GPUs get plain 16-byte copies.
//
// The two-op API (below) is one thread per output element, SIMT, correct and simple: it exists
// for CCNet compatibility and materialises the energy by definition.
//
// What is verified where: the tiled kernels (both forward paths) at the production tiles
// (ProdTiles16 in fp16, bf16, float and double through a host nvcuda::wmma, ProdTilesFma) and at
// small tiles run on the host in tests/test_cca_cuda_emulation.py; tests/test_sass.py checks the
// sm_90 SASS (no local memory, HMMA in the fp16/bf16 kernels, 16-byte cp.async operand loads).
// The real wmma fragment layout, the cp.async instructions' behaviour, launch configurations,
// shared-memory limits and speed are checked only by the needs_cuda tests (the same file, and the
// cuda backend of tests/test_cca.py).
// What remains (performance): wgmma/TMA (sm_90) instead of mma.sync and cp.async; the backward
// recomputes dP = dO·V^T per Cqk tile (CT = 32: twice at Cqk = 64) and reloads dO per key tile
// (benchmarks/traffic.py: about 8x its minimum at (2, 64, 512, 97, 97) bf16); the forward
// (2.45x its minimum there with channels_last inputs, 3.55x with NCHW ones, of which the
// transposes are 1.1x) could read NCHW v in the row pass without a transpose; fp32 could use
// 3xTF32 tensor-core products.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <initializer_list>
#include <cmath>
#include <limits>
#include <type_traits>

#include "cca_checks.h"
#include "cca_kernels.cuh"

namespace armnet_ops {
namespace {

constexpr int kElementwiseThreads = 256;

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

// The two-op API has two contractions and their transposes, and each op uses them with other
// operands: energy e[s, u] = <x_u, y_key_s(u)> is cca_weight(q, k) and the attn grad of
// cca_map(grad_out, v); the query-side gather sum_s e[s, u] y_key_s(u) is the q grad of
// cca_weight(G, k) and cca_map itself (attn, v); the key-side gather is the k grad of
// cca_weight(G, q) and the v grad of cca_map (attn, grad_out).
template <typename scalar_t, typename acc_t>
__global__ void cca_energy_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
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

// sum over the keys of energy-layout weights g times the other operand: at each pixel
// (KEY_SIDE false, the q grad of cca_weight, cca_map's output) or at each key, gathered over the
// pixels that see it (KEY_SIDE true, the k grad of cca_weight, the v grad of cca_map).
template <typename scalar_t, typename acc_t, bool KEY_SIDE>
__global__ void cca_gather_kernel(const scalar_t* __restrict__ g,
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

// ---- glue -------------------------------------------------------------------------------------

void check_cuda_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const char* op) {
  cca_checks::check_qkv(q, k, v, op);
  TORCH_CHECK(q.is_cuda() && k.device() == q.device() && v.device() == q.device(), op,
              ": q, k, v must be on one CUDA device, got ", q.device(), ", ", k.device(), ", ",
              v.device());
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(q.size(1) <= kMax && v.size(1) <= kMax && q.size(2) <= kMax && q.size(3) <= kMax,
              op, ": H, W and the channel counts must fit in int32, got shapes ", q.sizes(),
              " and ", v.sizes());
}

// Element type, mma policy and tile sizes per dtype.
template <typename T_, typename acc_t_, template <typename, typename> class Pol_, class Tl_>
struct KindOf {
  using T = T_;
  using acc_t = acc_t_;
  using Pol = Pol_<T_, acc_t_>;
  using Tl = Tl_;
};
template <typename scalar_t>
struct Kind;
template <>
struct Kind<at::Half> : KindOf<__half, float, cca_cuda::WmmaPolicy, cca_cuda::ProdTiles16> {};
template <>
struct Kind<at::BFloat16>
    : KindOf<__nv_bfloat16, float, cca_cuda::WmmaPolicy, cca_cuda::ProdTiles16> {};
template <>
struct Kind<float> : KindOf<float, float, cca_cuda::FmaPolicy, cca_cuda::ProdTilesFma> {};
template <>
struct Kind<double> : KindOf<double, double, cca_cuda::FmaPolicy, cca_cuda::ProdTilesFma> {};

// The tensor-core instantiations need sm_70 (fp16) and sm_80 (bf16).
template <typename scalar_t>
void check_arch(const at::Tensor& t, const char* op) {
  const auto* prop = at::cuda::getDeviceProperties(t.device().index());
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    TORCH_CHECK(prop->major >= 8, op, ": bfloat16 needs a GPU of compute capability 8.0 or newer "
                "(bf16 tensor-core mma), got ", prop->major, ".", prop->minor,
                "; use float16 or float32");
  } else if constexpr (std::is_same_v<scalar_t, at::Half>) {
    TORCH_CHECK(prop->major >= 7, op, ": float16 needs a GPU of compute capability 7.0 or newer "
                "(tensor-core mma), got ", prop->major, ".", prop->minor, "; use float32");
  }
}

template <typename T, typename scalar_t>
T* dptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.data_ptr<scalar_t>()) : nullptr;
}

template <typename acc_t>
acc_t* aptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<acc_t>() : nullptr;
}

// The column pass (first) and the row pass (final, writes the NCHW outputs along w) of an (H, W)
// plane. aligned: every NHWC operand starts 16-byte aligned (cp.async of channel vectors).
template <class Tl>
std::array<cca_cuda::LinePass, 2> line_passes(int64_t H, int64_t W,
                                              std::initializer_list<at::Tensor> operands) {
  const int64_t HW = H * W;
  bool aligned = true;
  for (const auto& t : operands)
    aligned = aligned && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  cca_cuda::LinePass col{static_cast<int>(H), static_cast<int>(W),
                         static_cast<int>((H + Tl::BO - 1) / Tl::BO), 1, W, HW, true, aligned};
  cca_cuda::LinePass row{static_cast<int>(W), static_cast<int>(H),
                         static_cast<int>((W + Tl::BO - 1) / Tl::BO), W, 1, HW, false, aligned};
  return {col, row};
}

// The operands in NHWC memory order (a (N, C, H, W) tensor with channels-last strides): no copy
// for channels_last inputs, one transpose for NCHW ones.
at::Tensor nhwc(const at::Tensor& t) { return t.contiguous(at::MemoryFormat::ChannelsLast); }

// Launches kernel(args...) on a grid of (image, line, tile) x channel tiles.
template <class Tl, typename Kernel, typename... KArgs>
void launch_lines(Kernel kernel, const cca_cuda::LinePass& g, int64_t N, int64_t c_tiles,
                  int64_t smem, const char* op, KArgs... args) {
  const int64_t blocks = N * g.n_lines * g.tiles;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max() && c_tiles <= 65535, op,
              ": too many tiles for one launch (", blocks, " x ", c_tiles, ")");
  if (blocks == 0 || c_tiles == 0) return;
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(static_cast<size_t>(smem) <= prop->sharedMemPerBlockOptin, op, ": the kernel needs ",
              smem, " bytes of shared memory, the GPU allows ", prop->sharedMemPerBlockOptin);
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  kernel<<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(c_tiles)), Tl::kThreads, smem,
           at::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The fused op's launches for one dtype: its element type, policy and tiles named once.
template <typename scalar_t>
struct Fused {
  using K = Kind<scalar_t>;
  using T = typename K::T;
  using acc_t = typename K::acc_t;
  using Pol = typename K::Pol;
  using Tl = typename K::Tl;
  using S = cca_cuda::Smem<T, acc_t, Tl>;

  // The arguments every kernel reads: q, k, v, their channel counts and the scale.
  static cca_cuda::Args<T, acc_t> qkv_args(const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, double scale) {
    cca_cuda::Args<T, acc_t> a{};
    a.q = dptr<T, scalar_t>(q);
    a.k = dptr<T, scalar_t>(k);
    a.v = dptr<T, scalar_t>(v);
    a.D = static_cast<int>(q.size(1));
    a.Cv = static_cast<int>(v.size(1));
    a.scale = static_cast<acc_t>(scale);
    return a;
  }

  // out, lse (and y = gamma·out + residual when residual is defined) for NHWC q, k, v; out, y
  // and residual NCHW.
  static void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& residual, const at::Tensor& gamma, const at::Tensor& out,
                      const at::Tensor& lse, const at::Tensor& y, double scale, const char* op);

  // grad_q, grad_k, grad_v (NCHW; and the per-pixel partials of grad_gamma when gpart is
  // defined) for NHWC q, k, v, go (go_nchw: the same gradient NCHW, and out NCHW, for D); go is
  // grad_out, or grad_y with gamma defined.
  static void backward(const at::Tensor& go, const at::Tensor& go_nchw, const at::Tensor& q,
                       const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                       const at::Tensor& lse, const at::Tensor& gamma, const at::Tensor& gq,
                       const at::Tensor& gk, const at::Tensor& gv, const at::Tensor& gpart,
                       double scale, const char* op);
};

// The widest Cv group whose P·V accumulators fit in this GPU's shared memory.
template <class S>
int pv_group(int64_t Cv, const char* op) {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const int group = S::group_width(static_cast<int>(Cv),
                                   static_cast<int64_t>(prop->sharedMemPerBlockOptin));
  TORCH_CHECK(group > 0, op, ": the P·V kernel needs ", S::bytes_pv(0),
              "+ bytes of shared memory, the GPU allows ", prop->sharedMemPerBlockOptin);
  return group;
}

template <typename scalar_t>
void Fused<scalar_t>::forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& residual, const at::Tensor& gamma,
                              const at::Tensor& out, const at::Tensor& lse, const at::Tensor& y,
                              double scale, const char* op) {
  check_arch<scalar_t>(q, op);
  const int64_t N = q.size(0), H = q.size(2), W = q.size(3), Cv = v.size(1);
  auto a = qkv_args(q, k, v, scale);
  a.lse_out = aptr<acc_t>(lse);
  // The column pass's result, NHWC in the element type (read back once by the row pass).
  const at::Tensor part = at::empty({N * H * W * Cv}, out.options());
  a.part = dptr<T, scalar_t>(part);
  a.out = dptr<T, scalar_t>(out);
  if (residual.defined()) {
    a.residual = dptr<T, scalar_t>(residual);
    a.gamma = aptr<acc_t>(gamma);
    a.y = dptr<T, scalar_t>(y);
  }
  const auto passes = line_passes<Tl>(H, W, {q, k, v});
  // Lines whose energies and P fit in shared memory (fp16/bf16 on an sm_90: up to 256 positions,
  // fp32 384, fp64 160): one kernel per pass, P formed once per own tile, one softmax state per
  // pixel carried from the column pass into the row pass through lse and part.
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  if (S::line_fits(static_cast<int>(H), static_cast<int>(W),
                   static_cast<int64_t>(prop->sharedMemPerBlockOptin))) {
    for (int pass = 0; pass < 2; ++pass) {
      launch_lines<Tl>(cca_cuda::cca_fwd_line_kernel<Pol, Tl, T, acc_t>, passes[pass], N, 1,
                       S::bytes_line(passes[pass].L), op, a, passes[pass], pass == 1);
    }
    return;
  }
  // Longer lines: the final lse first (cca_lse_kernel), then P·V with P recomputed from it per
  // Cv group (cca_pv_kernel), whose shared memory does not grow with the line.
  for (int pass = 0; pass < 2; ++pass) {
    launch_lines<Tl>(cca_cuda::cca_lse_kernel<Pol, Tl, T, acc_t>, passes[pass], N, 1,
                     S::bytes_lse, op, a, passes[pass], pass == 1);
  }
  if (Cv == 0) return;
  a.lse = aptr<acc_t>(lse);
  a.group = pv_group<S>(Cv, op);
  const int64_t groups = (Cv + a.group - 1) / a.group;
  for (int pass = 0; pass < 2; ++pass) {
    launch_lines<Tl>(cca_cuda::cca_pv_kernel<Pol, Tl, T, acc_t, false>, passes[pass], N, groups,
                     S::bytes_pv(a.group), op, a, passes[pass], pass == 1);
  }
}

template <typename scalar_t>
void Fused<scalar_t>::backward(const at::Tensor& go, const at::Tensor& go_nchw,
                               const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& out, const at::Tensor& lse,
                               const at::Tensor& gamma, const at::Tensor& gq, const at::Tensor& gk,
                               const at::Tensor& gv, const at::Tensor& gpart, double scale,
                               const char* op) {
  check_arch<scalar_t>(q, op);
  const int64_t N = q.size(0), D = q.size(1), H = q.size(2), W = q.size(3), Cv = v.size(1);
  const int64_t total = N * H * W;
  auto stream = at::cuda::getCurrentCUDAStream();
  auto dd = at::empty({N, H, W}, lse.options());
  TORCH_CHECK((total + kElementwiseThreads - 1) / kElementwiseThreads <=
                  std::numeric_limits<int32_t>::max(),
              op, ": N·H·W = ", total, " is too large for one launch");
  cca_cuda::cca_delta_kernel<T, acc_t>
      <<<static_cast<unsigned>((total + kElementwiseThreads - 1) / kElementwiseThreads),
         kElementwiseThreads, 0, stream>>>(dptr<T, scalar_t>(go_nchw), dptr<T, scalar_t>(out),
                                           aptr<acc_t>(gamma), aptr<acc_t>(dd), aptr<acc_t>(gpart),
                                           static_cast<int>(Cv), H * W, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto a = qkv_args(q, k, v, scale);
  a.go = dptr<T, scalar_t>(go);
  a.gamma = aptr<acc_t>(gamma);
  a.lse = aptr<acc_t>(lse);
  a.dd = aptr<acc_t>(dd);
  // The column pass's results, NHWC in the element type: one buffer serves dq, dk, dv in turn.
  const at::Tensor part = at::empty({total * std::max(D, Cv)}, out.options());
  a.part = dptr<T, scalar_t>(part);
  const auto passes = line_passes<Tl>(H, W, {q, k, v, go});
  if (D > 0) {
    const int64_t d_tiles = (D + Tl::CT - 1) / Tl::CT;
    a.out = dptr<T, scalar_t>(gq);
    for (int pass = 0; pass < 2; ++pass) {
      launch_lines<Tl>(cca_cuda::cca_grad_kernel<Pol, Tl, T, acc_t, false>, passes[pass], N,
                       d_tiles, S::bytes_grad, op, a, passes[pass], pass == 1);
    }
    a.out = dptr<T, scalar_t>(gk);
    for (int pass = 0; pass < 2; ++pass) {
      launch_lines<Tl>(cca_cuda::cca_grad_kernel<Pol, Tl, T, acc_t, true>, passes[pass], N,
                       d_tiles, S::bytes_grad, op, a, passes[pass], pass == 1);
    }
  }
  if (Cv > 0) {
    a.out = dptr<T, scalar_t>(gv);
    a.group = pv_group<S>(Cv, op);
    const int64_t groups = (Cv + a.group - 1) / a.group;
    for (int pass = 0; pass < 2; ++pass) {
      launch_lines<Tl>(cca_cuda::cca_pv_kernel<Pol, Tl, T, acc_t, true>, passes[pass], N, groups,
                       S::bytes_pv(a.group), op, a, passes[pass], pass == 1);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> cca_forward_cuda(const at::Tensor& q_, const at::Tensor& k_,
                                                    const at::Tensor& v_, double scale) {
  check_cuda_inputs(q_, k_, v_, "cca_forward");
  c10::cuda::CUDAGuard guard(q_.device());
  auto q = nhwc(q_), k = nhwc(k_), v = nhwc(v_);
  const int64_t N = q.size(0), H = q.size(2), W = q.size(3), Cv = v.size(1);
  auto out = at::empty({N, Cv, H, W}, v.options());  // NCHW (options carry no memory format)
  auto lse = at::empty({N, H, W}, q.options().dtype(at::toOpMathType(q.scalar_type())));
  if (N * H * W == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "cca_forward_cuda", [&] {
    Fused<scalar_t>::forward(q, k, v, at::Tensor(), at::Tensor(), out, lse, at::Tensor(), scale,
                           "cca_forward");
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cca_residual_forward_cuda(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& residual_,
    const at::Tensor& gamma_, double scale) {
  const char* op = "cca_residual_forward";
  check_cuda_inputs(q_, k_, v_, op);
  cca_checks::check_residual(residual_, v_, op);
  cca_checks::check_gamma(gamma_, v_, op);
  c10::cuda::CUDAGuard guard(q_.device());
  auto q = nhwc(q_), k = nhwc(k_), v = nhwc(v_);
  auto residual = residual_.contiguous(), gamma = gamma_.contiguous();
  const int64_t N = q.size(0), H = q.size(2), W = q.size(3), Cv = v.size(1);
  auto out = at::empty({N, Cv, H, W}, v.options());
  auto y = at::empty({N, Cv, H, W}, v.options());
  auto lse = at::empty({N, H, W}, q.options().dtype(at::toOpMathType(q.scalar_type())));
  if (N * H * W == 0) return {y, out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "cca_residual_forward_cuda", [&] {
    Fused<scalar_t>::forward(q, k, v, residual, gamma, out, lse, y, scale, op);
  });
  return {y, out, lse};
}

// The saved tensors and the gradient in the layouts and dtypes the kernels read: go, q, k, v
// NHWC for the tiled kernels, go_nchw and out NCHW for the delta kernel.
struct Saved {
  at::Tensor go, go_nchw, q, k, v, out, lse;
};

// A gradient: NCHW like the op's outputs (every element is written by the row pass).
at::Tensor nchw_empty(const at::Tensor& like) { return at::empty(like.sizes(), like.options()); }

Saved prepare_backward(const at::Tensor& grad, const at::Tensor& q_, const at::Tensor& k_,
                       const at::Tensor& v_, const at::Tensor& out_, const at::Tensor& lse_,
                       const char* op, const char* grad_name) {
  check_cuda_inputs(q_, k_, v_, op);
  cca_checks::check_backward(grad, q_, v_, out_, lse_, op, grad_name);
  TORCH_CHECK(grad.device() == q_.device() && out_.device() == q_.device() &&
                  lse_.device() == q_.device(),
              op, ": grad, out and lse must be on ", q_.device(), ", got ", grad.device(), ", ",
              out_.device(), ", ", lse_.device());
  const auto st = v_.scalar_type();
  const at::Tensor go = grad.to(st);
  return {nhwc(go),     go.contiguous(),          nhwc(q_), nhwc(k_), nhwc(v_),
          out_.to(st).contiguous(), lse_.to(at::toOpMathType(q_.scalar_type())).contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cca_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out_, const at::Tensor& lse_, double scale) {
  c10::cuda::CUDAGuard guard(q_.device());
  const Saved s = prepare_backward(grad_out, q_, k_, v_, out_, lse_, "cca_backward", "grad_out");
  auto gq = nchw_empty(s.q), gk = nchw_empty(s.k), gv = nchw_empty(s.v);
  if (s.q.size(0) * s.q.size(2) * s.q.size(3) == 0) return {gq, gk, gv};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.q.scalar_type(), "cca_backward_cuda", [&] {
    Fused<scalar_t>::backward(s.go, s.go_nchw, s.q, s.k, s.v, s.out, s.lse, at::Tensor(), gq,
                              gk, gv, at::Tensor(), scale, "cca_backward");
  });
  return {gq, gk, gv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cca_residual_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out_, const at::Tensor& lse_, const at::Tensor& gamma_, double scale) {
  const char* op = "cca_residual_backward";
  c10::cuda::CUDAGuard guard(q_.device());
  const Saved s = prepare_backward(grad_y, q_, k_, v_, out_, lse_, op, "grad_y");
  cca_checks::check_gamma(gamma_, v_, op);
  auto gamma = gamma_.contiguous();
  auto gq = nchw_empty(s.q), gk = nchw_empty(s.k), gv = nchw_empty(s.v);
  if (s.q.size(0) * s.q.size(2) * s.q.size(3) == 0) return {gq, gk, gv, at::zeros_like(gamma_)};
  auto gpart = at::empty({s.q.size(0), s.q.size(2), s.q.size(3)}, s.lse.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.q.scalar_type(), "cca_residual_backward_cuda", [&] {
    Fused<scalar_t>::backward(s.go, s.go_nchw, s.q, s.k, s.v, s.out, s.lse, gamma, gq, gk, gv,
                              gpart, scale, op);
  });
  // grad_gamma = sum over pixels of <grad_y_u, out_u>: per-pixel partials, then one fixed-shape
  // reduction (deterministic).
  auto grad_gamma = gpart.sum().to(gamma_.scalar_type()).reshape(gamma_.sizes());
  return {gq, gk, gv, grad_gamma};
}

unsigned int elementwise_blocks(int64_t total) {
  const int64_t blocks = (total + kElementwiseThreads - 1) / kElementwiseThreads;
  return static_cast<unsigned int>(std::min<int64_t>(blocks, 65535LL * 16));
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
    launch_elementwise<scalar_t>(cca_energy_kernel<scalar_t, acc_t>, q, k, e, C, H, W);
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
    launch_elementwise<scalar_t>(cca_gather_kernel<scalar_t, acc_t, false>, g, k, gq, C,
                                 H, W);
    launch_elementwise<scalar_t>(cca_gather_kernel<scalar_t, acc_t, true>, g, q, gk, C,
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
    launch_elementwise<scalar_t>(cca_gather_kernel<scalar_t, acc_t, false>, a, v, out, C, H, W);
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
      launch_elementwise<scalar_t>(cca_energy_kernel<scalar_t, acc_t>, g, v, ga, C, H, W);
    }
    if (total_v > 0) {
      launch_elementwise<scalar_t>(cca_gather_kernel<scalar_t, acc_t, true>, a, g, gv, C, H, W);
    }
  });
  return {ga, gv};
}

}  // namespace

TORCH_LIBRARY_IMPL(armnet_ops, CUDA, m) {
  m.impl("cca_forward", &cca_forward_cuda);
  m.impl("cca_backward", &cca_backward_cuda);
  m.impl("cca_residual_forward", &cca_residual_forward_cuda);
  m.impl("cca_residual_backward", &cca_residual_backward_cuda);
  m.impl("cca_weight", &cca_weight_cuda);
  m.impl("cca_weight_backward", &cca_weight_backward_cuda);
  m.impl("cca_map", &cca_map_cuda);
  m.impl("cca_map_backward", &cca_map_backward_cuda);
}

}  // namespace armnet_ops

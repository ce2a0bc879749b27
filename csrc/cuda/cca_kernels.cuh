// The fused criss-cross attention CUDA kernels (see cca.cu for the launches and what is saved).
// Device code only: plain templates over the scalar type, an "mma policy" and the tile sizes,
// taking pointers, sizes and strides, no ATen. Kept apart from the glue so that
// tests/test_cca_cuda_emulation.py compiles the very same kernels, at the very same production
// tile configurations (ProdTiles16, ProdTilesFma below), for the host (one std::thread per CUDA
// thread, a barrier for __syncthreads, a small host nvcuda::wmma) and checks them against the
// reference without a GPU.
//
// Layout. The operands q, k, v (and dO in the backward) are read in NHWC: channel c of pixel p of
// image n at ((n·H·W + p)·C + c). A pixel's channel vector is contiguous, so an operand tile
// [positions][channels] is read along channels in both passes: in the column pass as well as in
// the row pass consecutive threads read consecutive bytes (16 at a time by cp.async when the
// channel count is a multiple of 16 bytes). The final outputs (out, y, dq, dk, dv) are NCHW and
// written by the row pass, whose positions are contiguous along w; the first pass's partial
// result is an NHWC buffer, written and read along channels.
//
// Terms. A *pass* walks lines: the column pass the W columns (positions along h, keys (j, w) with
// j != h: exclude_self) and then the row pass the H rows (keys (h, z) for all z). One kernel
// serves both; only LinePass differs. A block owns BO positions of one line (the "own" rows of
// its tiles) and walks the line's other positions BK at a time (the "other" columns): for the
// forward and dq the own rows are pixels and the others keys; for dk and dv the own rows are keys
// and the others the pixels that see them (a gather: every output element is written by one
// block, no atomics).
//
// Products. Every tile product is a warp-level 16x16x16 mma on shared-memory operands through a
// policy: WmmaPolicy (nvcuda::wmma: mma.sync on tensor cores, half / bfloat16 in, fp32
// accumulators) or FmaPolicy (the same tile shapes by scalar FMA, for float and double: no TF32,
// exact fp32). Warp w of a block owns the 16-row strip [16w, 16w + 16) of every BO-row tile.
// Accumulator tiles go through shared memory (store/load of accumulator fragments) before and
// after any element-wise step, so no code depends on the fragment layout.
//
// Pipelining. Channel chunks of CT are streamed through two shared-memory buffers: chunk i + 1 is
// in flight (cp.async) while the mma of chunk i runs. The own operand of the energy contraction
// stays resident across key tiles when it fits its two buffers (C <= 2·CT: Cqk = 64 at CT = 32).
// The forward's line kernel streams v the same way, over (Cv chunk, key tile) steps.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#define ARMNET_CCA_WMMA 1
#endif

namespace armnet_ops {
namespace cca_cuda {

// ---- scalar conversions (ATen builds disable the implicit half/bfloat16 ones) -----------------

template <typename acc_t, typename T>
__device__ __forceinline__ acc_t to_acc(T x) {
  return static_cast<acc_t>(x);
}
template <typename T, typename acc_t>
__device__ __forceinline__ T from_acc(acc_t x) {
  return static_cast<T>(x);
}
#ifdef __CUDACC__
template <>
__device__ __forceinline__ float to_acc<float, __half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float x) {
  return __float2bfloat16_rn(x);
}
#endif

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// log(e^x + e^y), exact when one side is -inf (a column pass without keys, H = 1): the merge of
// the column pass's log-sum-exp into the row pass's, the one formula both forwards use.
template <typename acc_t>
__device__ __forceinline__ acc_t log_add_exp(acc_t x, acc_t y) {
  const acc_t hi = x > y ? x : y, lo = x > y ? y : x;
  return hi == neg_inf<acc_t>() ? hi : hi + log1p(exp(lo - hi));
}

// ---- tile sizes and the shared-memory layout --------------------------------------------------

// BO: own positions per block (16 per warp); BK: other positions per step along the line; CT:
// channels per chunk of a contraction, and the width of a dq/dk output tile.
template <int BO_, int BK_, int CT_>
struct Tiles {
  static constexpr int BO = BO_;
  static constexpr int BK = BK_;
  static constexpr int CT = CT_;
  static_assert(BO % 16 == 0 && BK % 16 == 0 && CT % 16 == 0, "tiles are whole 16x16 mma tiles");
  static_assert(CT <= BK, "a dq/dk output tile (CT wide) is staged in an energy tile (BK wide)");
  static constexpr int kWarps = BO / 16;
  static constexpr int kThreads = 32 * kWarps;
  // Padded leading dimensions. Every wmma tile origin is a multiple of 16 rows and columns, so
  // with these (multiples of 8 elements for 16-bit, of 4 for 32-bit, as wmma requires) each origin
  // is 32-byte aligned; the padding also spreads rows over the shared-memory banks.
  static constexpr int LDX = 2 * CT + 8;  // own operand, two chunks side by side [BO][LDX]
  static constexpr int LDC = CT + 8;      // other operand chunk [BK][LDC], two buffers
  static constexpr int LDP = BK + 8;      // P or dS [BO][LDP], element type
  static constexpr int LDE = BK + 4;      // energies, dP [BO][LDE], op-math type
};

// The production configurations, used by cca.cu and by the host emulation alike.
// 16-bit (tensor cores): 8 warps, a whole line of up to 128 positions per block (H, W = 97 in
// one tile, so each pass reads v once), keys 64 at a time, channel chunks of 32.
using ProdTiles16 = Tiles<128, 64, 32>;
// fp32 / fp64 (scalar FMA): 4 warps.
using ProdTilesFma = Tiles<64, 32, 32>;

__host__ __device__ constexpr int64_t align128(int64_t b) { return (b + 127) / 128 * 128; }

// Offsets in the dynamic shared memory: xs [BO][LDX] (own operand), ys [2][BK][LDC] (other
// operand, or the P·Z operand), ps [BO][LDP] (P or dS in the element type), st (per-position
// statistics), es [BO][LDE] (energies; the output tile of dq/dk at the end), fs [BO][LDE] (dP,
// backward), ac [BO][CG + 4] (op-math accumulators of a Cv group, P·V kernel; CG at run time).
template <typename T, typename acc_t, class Tl>
struct Smem {
  static constexpr int64_t xs = 0;
  static constexpr int64_t ys = xs + align128(int64_t(Tl::BO) * Tl::LDX * sizeof(T));
  static constexpr int64_t ps = ys + align128(int64_t(2) * Tl::BK * Tl::LDC * sizeof(T));
  static constexpr int64_t st = ps + align128(int64_t(Tl::BO) * Tl::LDP * sizeof(T));
  static constexpr int64_t es =
      st + align128(int64_t(2) * (Tl::BO > Tl::BK ? Tl::BO : Tl::BK) * sizeof(acc_t));
  static constexpr int64_t fs = es + align128(int64_t(Tl::BO) * Tl::LDE * sizeof(acc_t));
  static constexpr int64_t bytes_lse = fs;
  static constexpr int64_t ac = fs;  // the P·V kernel has no dP
  static constexpr int64_t bytes_grad = fs + align128(int64_t(Tl::BO) * Tl::LDE * sizeof(acc_t));
  static constexpr int ld_acc(int group) { return group + 4; }
  static constexpr int64_t bytes_pv(int group) {
    return ac + align128(int64_t(Tl::BO) * ld_acc(group) * sizeof(acc_t));
  }
  // The widest Cv group (a multiple of CT, at most the padded Cv) whose accumulators fit in
  // smem_limit bytes: P is computed once per (own tile, key tile) for a whole group, so one group
  // for all of Cv where it fits. 0 when not even one chunk fits.
  static constexpr int group_width(int Cv, int64_t smem_limit) {
    const int cv_pad = (Cv + Tl::CT - 1) / Tl::CT * Tl::CT;
    int g = cv_pad;
    while (g > 0 && bytes_pv(g) > smem_limit) g -= Tl::CT;
    return g;
  }

  // The forward line kernel (cca_fwd_line_kernel) keeps a whole line's energies and P: xs and ys
  // as above, then lst [4][BO] (per-row statistics, op-math), les [BO][line_lde] (the energies
  // against every key of the line, op-math) and lps [BO][line_ldp] (P, element type), with the
  // line's L keys padded to Lp = a multiple of BK. The leading dimensions keep every 16x16 tile
  // origin 32-byte aligned, as LDE and LDP do.
  static constexpr int line_pad(int L) { return (L + Tl::BK - 1) / Tl::BK * Tl::BK; }
  static constexpr int line_lde(int L) { return line_pad(L) + 4; }
  static constexpr int line_ldp(int L) { return line_pad(L) + 8; }
  static constexpr int64_t lst = ps;
  static constexpr int64_t les = lst + align128(int64_t(4) * Tl::BO * sizeof(acc_t));
  static constexpr int64_t lps(int L) {
    return les + align128(int64_t(Tl::BO) * line_lde(L) * sizeof(acc_t));
  }
  static constexpr int64_t bytes_line(int L) {
    return lps(L) + align128(int64_t(Tl::BO) * line_ldp(L) * sizeof(T));
  }
  // Whether the forward runs the line kernel in both passes (both lines fit in smem_limit);
  // otherwise it runs cca_lse_kernel and cca_pv_kernel (the glue's fallback for long lines).
  static constexpr bool line_fits(int H, int W, int64_t smem_limit) {
    return bytes_line(H > W ? H : W) <= smem_limit;
  }
};

// Shared memory per block on sm_90 (opt-in maximum): what group_width is given there.
constexpr int64_t kSmemSm90 = 232448;

// Typed views of the dynamic shared memory.
template <typename T, typename acc_t, class Tl>
struct SharedTiles {
  using S = Smem<T, acc_t, Tl>;
  T *xs, *ys, *ps;
  acc_t *st, *es, *fs, *ac;
  __device__ __forceinline__ explicit SharedTiles(unsigned char* raw)
      : xs(reinterpret_cast<T*>(raw + S::xs)),
        ys(reinterpret_cast<T*>(raw + S::ys)),
        ps(reinterpret_cast<T*>(raw + S::ps)),
        st(reinterpret_cast<acc_t*>(raw + S::st)),
        es(reinterpret_cast<acc_t*>(raw + S::es)),
        fs(reinterpret_cast<acc_t*>(raw + S::fs)),
        ac(reinterpret_cast<acc_t*>(raw + S::ac)) {}
};

// ---- mma policies: c += A·B on 16x16 tiles in shared memory -----------------------------------
// A(i, k) at a[i·lda + k] (row-major) or a[k·lda + i] (column-major); B(k, j) at b[k·ldb + j] or
// b[j·ldb + k]. Calls are warp-collective; operands stay untouched in shared memory until the
// mma that uses them has run (FmaPolicy reads them there).

// Scalar FMA, the same tiles: lane l owns the elements e = l + 32t (t < 8) of the 16x16
// accumulator, row e / 16, column e % 16.
template <typename T, typename acc_t>
struct FmaPolicy {
  struct Acc {
    acc_t x[8];
  };
  template <bool ROW>
  struct FragA {
    const T* p;
    int ld;
  };
  template <bool ROW>
  struct FragB {
    const T* p;
    int ld;
  };
  __device__ __forceinline__ static void zero(Acc& c) {
#pragma unroll
    for (int t = 0; t < 8; ++t) c.x[t] = acc_t(0);
  }
  template <bool ROW>
  __device__ __forceinline__ static void load_a(FragA<ROW>& f, const T* p, int ld) {
    f.p = p;
    f.ld = ld;
  }
  template <bool ROW>
  __device__ __forceinline__ static void load_b(FragB<ROW>& f, const T* p, int ld) {
    f.p = p;
    f.ld = ld;
  }
  // k outermost: the lane's B value is loaded once per k; its 8 rows' A values are shared by the
  // 16 lanes of a half-warp (shared-memory broadcast).
  template <bool AROW, bool BROW>
  __device__ __forceinline__ static void mma(Acc& c, const FragA<AROW>& a, const FragB<BROW>& b) {
    const int lane = threadIdx.x & 31, i0 = lane >> 4, j = lane & 15;
#pragma unroll
    for (int kk = 0; kk < 16; ++kk) {
      const acc_t bv = to_acc<acc_t>(BROW ? b.p[kk * b.ld + j] : b.p[j * b.ld + kk]);
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        const int i = i0 + 2 * t;
        c.x[t] += to_acc<acc_t>(AROW ? a.p[i * a.ld + kk] : a.p[kk * a.ld + i]) * bv;
      }
    }
  }
  __device__ __forceinline__ static void store(acc_t* p, int ld, const Acc& c) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      const int e = lane + 32 * t;
      p[(e >> 4) * ld + (e & 15)] = c.x[t];
    }
  }
  __device__ __forceinline__ static void load_acc(Acc& c, const acc_t* p, int ld) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      const int e = lane + 32 * t;
      c.x[t] = p[(e >> 4) * ld + (e & 15)];
    }
  }
};

#if defined(ARMNET_CCA_WMMA) || defined(ARMNET_CCA_HOST_WMMA)
// Tensor cores through nvcuda::wmma (m16n16k16, mma.sync / HMMA on sm_90). On the host the test
// harness supplies a small nvcuda::wmma of its own, instantiated with float and double.
template <typename T, typename acc_t>
struct WmmaPolicy {
  using Acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, acc_t>;
  template <bool ROW>
  using Layout = std::conditional_t<ROW, nvcuda::wmma::row_major, nvcuda::wmma::col_major>;
  template <bool ROW>
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, Layout<ROW>>;
  template <bool ROW>
  using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, Layout<ROW>>;
  __device__ __forceinline__ static void zero(Acc& c) { nvcuda::wmma::fill_fragment(c, acc_t(0)); }
  // The layouts are not deducible through the aliases: the fragment types are taken as they come.
  template <typename Frag>
  __device__ __forceinline__ static void load_a(Frag& f, const T* p, int ld) {
    nvcuda::wmma::load_matrix_sync(f, p, ld);
  }
  template <typename Frag>
  __device__ __forceinline__ static void load_b(Frag& f, const T* p, int ld) {
    nvcuda::wmma::load_matrix_sync(f, p, ld);
  }
  template <typename FA, typename FB>
  __device__ __forceinline__ static void mma(Acc& c, const FA& a, const FB& b) {
    nvcuda::wmma::mma_sync(c, a, b, c);
  }
  __device__ __forceinline__ static void store(acc_t* p, int ld, const Acc& c) {
    nvcuda::wmma::store_matrix_sync(p, c, ld, nvcuda::wmma::mem_row_major);
  }
  __device__ __forceinline__ static void load_acc(Acc& c, const acc_t* p, int ld) {
    nvcuda::wmma::load_matrix_sync(c, p, ld, nvcuda::wmma::mem_row_major);
  }
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
// bfloat16 wmma needs sm_80 (and half wmma sm_70): in device code for older architectures these
// instantiations fall back to scalar FMA, so that any TORCH_CUDA_ARCH_LIST builds. The glue
// refuses bfloat16 below sm_80 with a clear error, so this code is never launched there.
template <>
struct WmmaPolicy<__nv_bfloat16, float> : FmaPolicy<__nv_bfloat16, float> {};
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
template <>
struct WmmaPolicy<__half, float> : FmaPolicy<__half, float> {};
#endif
#endif

// ---- asynchronous copies ------------------------------------------------------------------------
// 16 bytes global -> shared: cp.async (LDGSTS, bypassing L1 and the registers) on sm_80+, a plain
// 16-byte load and store elsewhere (older GPUs, and the host emulation). With in == false the
// destination is zero-filled and nothing is read (src must still be a valid address).
template <typename T>
struct alignas(16) Vec16 {
  T x[16 / sizeof(T)];
};

template <typename T>
__device__ __forceinline__ void copy16(T* dst, const T* src, bool in) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src),
               "r"(in ? 16 : 0));
#else
  Vec16<T> v;
  if (in) {
    v = *reinterpret_cast<const Vec16<T>*>(src);
  } else {
    for (auto& e : v.x) e = from_acc<T>(0.0f);
  }
  *reinterpret_cast<Vec16<T>*>(dst) = v;
#endif
}
__device__ __forceinline__ void async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most one committed group (the newest) is still in flight.
__device__ __forceinline__ void async_wait_all_but_one() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group 1;\n" ::);
#endif
}

// ---- geometry -----------------------------------------------------------------------------------

// One pass. Pixel index inside an (H, W) plane: line·s_line + position·s_pos. Element (pixel p,
// channel c) of image n is at (n·HW + p)·C + c in an NHWC operand, (n·C + c)·HW + p in an NCHW
// output.
struct LinePass {
  int L;        // positions per line (= keys per line)
  int n_lines;  // lines per image
  int tiles;    // ceil(L / BO)
  int64_t s_line, s_pos, HW;
  bool exclude_self;  // column pass: the pixel itself is a row key, not a column key
  bool aligned;       // every NHWC operand starts 16-byte aligned: channel vectors whose size is
                      // a multiple of 16 bytes move 16 bytes at a time (cp.async)
};

// Everything the kernels read or write; unused pointers are null. Operands NHWC, outputs NCHW.
template <typename T, typename acc_t>
struct Args {
  const T* q;         // (N, H, W, D)
  const T* k;         // (N, H, W, D)
  const T* v;         // (N, H, W, Cv)
  const T* go;        // (N, H, W, Cv): grad of out, or grad of y (then scaled by gamma)
  const T* residual;  // (N, Cv, H, W), residual forward only
  const acc_t* gamma; // one element, residual ops only
  const acc_t* lse;   // (N, H, W)
  const acc_t* dd;    // (N, H, W): D_u = <dO_u, O_u>
  acc_t* lse_out;     // lse kernel: where the pass writes its (merged) log-sum-exp
  T* part;            // (N, H, W, C) the first (column) pass's result, element type
  T* out;             // (N, C, H, W) the op's output: out, dq, dk or dv
  T* y;               // (N, Cv, H, W) residual forward: gamma·out + residual
  int D, Cv;
  int group;          // P·V kernel: channels per block (a multiple of CT)
  acc_t scale;
};

struct Block {
  int64_t n;        // image
  int64_t line_off; // pixel index of position 0 of the line
  int own0;         // first own position of the block
};

__device__ __forceinline__ Block decode_block(const LinePass& g, int bo) {
  int64_t b = blockIdx.x;
  Block r;
  r.own0 = static_cast<int>(b % g.tiles) * bo;
  b /= g.tiles;
  r.line_off = (b % g.n_lines) * g.s_line;
  r.n = b / g.n_lines;
  return r;
}

// ---- block-level building blocks ------------------------------------------------------------

// dst[i][c] (leading dimension ld) = src(position p0 + i, channel c0 + c) for i < ROWS, c < CT,
// zero outside the C channels and the L positions (the zero padding of the k-dimension and of
// the line's tail). src points at channel 0 of position 0 of the line (NHWC); positions are
// s_pos·C elements apart. Consecutive threads read consecutive channels of a position: the
// accesses are coalesced in both passes. With vec (C·sizeof(T) a multiple of 16, aligned
// operands), 16 bytes per thread by cp.async; the caller commits and waits.
template <class Tl, int ROWS, typename T>
__device__ __forceinline__ void load_tile(T* dst, int ld, const T* __restrict__ src, int p0, int c0,
                                          int C, int L, int64_t s_pos, bool vec) {
  const int64_t stride = s_pos * C;
  if (vec) {
    constexpr int VE = 16 / sizeof(T);
    constexpr int VR = Tl::CT / VE;  // vectors per row
    static_assert(Tl::CT % VE == 0, "vector chunks");
    for (int e = threadIdx.x; e < ROWS * VR; e += Tl::kThreads) {
      const int i = e / VR, c = (e % VR) * VE;
      // C is a multiple of VE: a vector is wholly inside the channels or wholly outside.
      const bool in = p0 + i < L && c0 + c < C;
      copy16(dst + i * ld + c, in ? src + (p0 + i) * stride + c0 + c : src, in);
    }
    return;
  }
  const T zero = from_acc<T>(0.0f);
  for (int e = threadIdx.x; e < ROWS * Tl::CT; e += Tl::kThreads) {
    const int i = e / Tl::CT, c = e % Tl::CT;
    dst[i * ld + c] = (p0 + i < L && c0 + c < C) ? src[(p0 + i) * stride + c0 + c] : zero;
  }
}

template <typename T>
__device__ __forceinline__ bool vec_ok(const LinePass& g, int C) {
  return g.aligned && (static_cast<int64_t>(C) * sizeof(T)) % 16 == 0;
}

// The warp's 16-row strip of an accumulator tile (N/16 fragments) into es (ld).
template <class Pol, int N, typename acc_t>
__device__ __forceinline__ void store_strip(acc_t* es, int ld,
                                            const typename Pol::Acc (&acc)[N / 16]) {
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < N / 16; ++j) Pol::store(es + 16 * warp * ld + 16 * j, ld, acc[j]);
}

// es[i][j] (warp strips, leading dimension lde) = sum_c X(x0 + i, c) · Y(y0 + j, c) over C
// channels, CT at a time, X the block's BO own positions, Y BK other positions. Chunk i of X
// lives in xs at column (i & 1)·CT and of Y in ys buffer i & 1; chunk i + 1 is copied while
// chunk i is multiplied. With load_own = false, X is already resident in xs (C <= 2·CT, loaded by
// an earlier call). Syncs on entry and before returning; the caller reads es after a
// __syncthreads.
template <class Pol, class Tl, typename T, typename acc_t>
__device__ void contract(acc_t* es, const T* __restrict__ x, int x0, const T* __restrict__ y,
                         int y0, int C, const LinePass& g, bool load_own, T* xs, T* ys,
                         int lde = Tl::LDE) {
  const int warp = threadIdx.x >> 5;
  const bool vec = vec_ok<T>(g, C);
  typename Pol::Acc acc[Tl::BK / 16];
#pragma unroll
  for (int j = 0; j < Tl::BK / 16; ++j) Pol::zero(acc[j]);
  const int n = (C + Tl::CT - 1) / Tl::CT;
  auto issue = [&](int i) {
    if (load_own)
      load_tile<Tl, Tl::BO>(xs + (i & 1) * Tl::CT, Tl::LDX, x, x0, i * Tl::CT, C, g.L, g.s_pos,
                            vec);
    load_tile<Tl, Tl::BK>(ys + (i & 1) * Tl::BK * Tl::LDC, Tl::LDC, y, y0, i * Tl::CT, C, g.L,
                          g.s_pos, vec);
    async_commit();
  };
  __syncthreads();  // xs, ys, es are free
  if (n > 0) issue(0);
  for (int i = 0; i < n; ++i) {
    if (i + 1 < n) {
      issue(i + 1);
    } else {
      async_commit();  // an empty group keeps "all but one" meaning "chunk i has landed"
    }
    async_wait_all_but_one();
    __syncthreads();
    const T* xb = xs + (i & 1) * Tl::CT;
    const T* yb = ys + (i & 1) * Tl::BK * Tl::LDC;
    const int kc = C - i * Tl::CT < Tl::CT ? C - i * Tl::CT : Tl::CT;  // past C: zeros
    for (int kk = 0; kk < kc; kk += 16) {
      typename Pol::template FragA<true> fa;
      Pol::load_a(fa, xb + 16 * warp * Tl::LDX + kk, Tl::LDX);
#pragma unroll
      for (int j = 0; j < Tl::BK / 16; ++j) {
        typename Pol::template FragB<false> fb;
        Pol::load_b(fb, yb + 16 * j * Tl::LDC + kk, Tl::LDC);
        Pol::mma(acc[j], fa, fb);
      }
    }
    __syncthreads();  // buffer i & 1 is refilled by the next issue
  }
  store_strip<Pol, Tl::BK>(es, lde, acc);
}

// acc[j] += ps(this warp's own rows, [0, n_other)) · Z(other positions, channels 16j..) with ps
// [own][other] (leading dimension ldp) and Z in zs as [position][channel] (LDC).
template <class Pol, class Tl, typename T>
__device__ __forceinline__ void product_pz(typename Pol::Acc (&acc)[Tl::CT / 16], const T* ps,
                                           const T* zs, int n_other, int ldp = Tl::LDP) {
  const int warp = threadIdx.x >> 5;
  for (int kk = 0; kk < n_other; kk += 16) {
    typename Pol::template FragA<true> fa;
    Pol::load_a(fa, ps + 16 * warp * ldp + kk, ldp);
#pragma unroll
    for (int j = 0; j < Tl::CT / 16; ++j) {
      typename Pol::template FragB<true> fb;
      Pol::load_b(fb, zs + kk * Tl::LDC + 16 * j, Tl::LDC);
      Pol::mma(acc[j], fa, fb);
    }
  }
}

// Writes the block's [BO own positions] x [width channels from c0] output tile, held in src (ld),
// times mult (and times row_mult[i] for own row i when row_mult is not null). The first (column)
// pass stores it, rounded to the element type, in the NHWC buffer part, along channels. The
// final (row) pass adds part (times part_mult[i] when not null) in op-math, rounds once into the
// NCHW output dst along positions (contiguous along w), and, for the residual forward,
// y = gamma·total + residual. src is updated in place; one __syncthreads inside.
template <class Tl, typename T, typename acc_t>
__device__ __forceinline__ void store_tile(acc_t* src, int ld, int width, acc_t mult,
                                           const acc_t* row_mult, const acc_t* part_mult,
                                           bool final, T* part, T* dst, T* y,
                                           const T* __restrict__ residual, acc_t g_res,
                                           const Block& b, int c0, int C, const LinePass& g) {
  for (int e = threadIdx.x; e < Tl::BO * width; e += Tl::kThreads) {
    const int i = e / width, c = e % width;
    if (b.own0 + i >= g.L || c0 + c >= C) continue;
    const int64_t idx =
        (b.n * g.HW + b.line_off + static_cast<int64_t>(b.own0 + i) * g.s_pos) * C + c0 + c;
    const acc_t val = (row_mult != nullptr ? mult * row_mult[i] : mult) * src[i * ld + c];
    if (!final) {
      part[idx] = from_acc<T>(val);
    } else {
      const acc_t pv = to_acc<acc_t>(part[idx]);
      src[i * ld + c] = val + (part_mult != nullptr ? part_mult[i] * pv : pv);
    }
  }
  if (!final) return;
  __syncthreads();
  for (int e = threadIdx.x; e < Tl::BO * width; e += Tl::kThreads) {
    const int i = e % Tl::BO, c = e / Tl::BO;
    if (b.own0 + i >= g.L || c0 + c >= C) continue;
    const int64_t idx = (b.n * C + c0 + c) * g.HW + b.line_off +
                        static_cast<int64_t>(b.own0 + i) * g.s_pos;
    const acc_t val = src[i * ld + c];
    dst[idx] = from_acc<T>(val);
    if (y != nullptr) y[idx] = from_acc<T>(g_res * val + to_acc<acc_t>(residual[idx]));
  }
}

__device__ __forceinline__ bool key_valid(int p, int s, int L, bool exclude_self) {
  return p < L && s < L && !(exclude_self && p == s);
}

// Where a block of cca_pv_kernel / cca_grad_kernel works, and its line's pointers (NHWC, at
// channel 0 of position 0 of the line). The block's own positions are pixels (KEY = false) or
// keys (KEY = true); x holds the own side of the energy contraction, y the other side (q or k),
// gx / gy the two sides of dP = dO·V^T (backward), stat the per-pixel statistics of the line.
template <typename T, typename acc_t, bool KEY>
struct Frame {
  Block b;
  int64_t pix0;  // n·HW + line_off
  const T *x, *y, *gx, *gy;
  const acc_t *lse, *dd;
  __device__ __forceinline__ Frame(const Args<T, acc_t>& a, const LinePass& g, int bo)
      : b(decode_block(g, bo)),
        pix0(b.n * g.HW + b.line_off),
        x((KEY ? a.k : a.q) + pix0 * a.D),
        y((KEY ? a.q : a.k) + pix0 * a.D),
        gx(a.go == nullptr ? nullptr : (KEY ? a.v : a.go) + pix0 * a.Cv),
        gy(a.go == nullptr ? nullptr : (KEY ? a.go : a.v) + pix0 * a.Cv),
        lse(a.lse + pix0),
        dd(a.dd == nullptr ? nullptr : a.dd + pix0) {}
  // In tile (own i, other j): the pixel is the own position (KEY = false) or the other one.
  __device__ __forceinline__ bool valid(int own, int oth, const LinePass& g) const {
    return KEY ? key_valid(oth, own, g.L, g.exclude_self)
               : key_valid(own, oth, g.L, g.exclude_self);
  }
};

// Loads the statistics of n pixels from pix0 into st: lse, and dd after it (at st + n).
template <class Tl, typename acc_t>
__device__ __forceinline__ void load_stats(acc_t* st, const acc_t* lse, const acc_t* dd, int pix0,
                                           int n, const LinePass& g) {
  for (int t = threadIdx.x; t < n; t += Tl::kThreads) {
    const int pix = pix0 + t;
    const bool in = pix < g.L;
    const int64_t off = static_cast<int64_t>(pix) * g.s_pos;
    st[t] = in ? lse[off] : acc_t(0);
    if (dd != nullptr) st[n + t] = in ? dd[off] : acc_t(0);
  }
}

// Positions of the other tile starting at o0 that hold real data, rounded up to the mma size.
template <class Tl>
__device__ __forceinline__ int other_extent(int L, int o0) {
  return L - o0 < Tl::BK ? ((L - o0 + 15) / 16) * 16 : Tl::BK;
}

// ---- kernels --------------------------------------------------------------------------------
// Traffic: each kernel's comment gives the global bytes it requests per pass, with b =
// sizeof(T), a = sizeof(acc_t), P = N·H·W pixels, L the pass's line length, T_o = ceil(L / BO)
// own tiles and T_k = ceil(L / BK) key tiles per line, D = Cqk, G = ceil(Cv / group) and
// r = 1 when the own side of q·k stays resident (D <= 2·CT), else T_k. benchmarks/traffic.py
// sums them (cca_cuda_traffic).

// cca_lse_kernel: per pixel of the pass, the log-sum-exp of its scaled energies over the pass's
// keys, by an online softmax over key tiles (two threads per pixel row, each over alternate
// keys, merged at the end). The first (column) pass writes it to lse_out; the final (row) pass
// merges it with what the first pass wrote there (read then written by one thread) by logaddexp.
// A column pass with no keys (H = 1) writes -inf, which the merge leaves out.
// Traffic per pass: q P·D·b·r, k P·D·b·T_o, lse P·a written (and read by the row pass).
template <class Pol, class Tl, typename T, typename acc_t>
__global__ void __launch_bounds__(Tl::kThreads, 1)
cca_lse_kernel(Args<T, acc_t> a, LinePass g, bool final) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const SharedTiles<T, acc_t, Tl> sh(smem_raw);
  const Block b = decode_block(g, Tl::BO);
  const int64_t pix0 = b.n * g.HW + b.line_off;
  const int r = threadIdx.x >> 1, part = threadIdx.x & 1;  // kThreads = 2·BO
  const int own = b.own0 + r;
  const bool resident = a.D <= 2 * Tl::CT;
  acc_t m = neg_inf<acc_t>(), l = acc_t(0);
  for (int o0 = 0; o0 < g.L; o0 += Tl::BK) {
    contract<Pol, Tl>(sh.es, a.q + pix0 * a.D, b.own0, a.k + pix0 * a.D, o0, a.D, g,
                      o0 == 0 || !resident, sh.xs, sh.ys);
    __syncthreads();
    for (int j = part; j < Tl::BK; j += 2) {
      if (!key_valid(own, o0 + j, g.L, g.exclude_self)) continue;
      const acc_t x = sh.es[r * Tl::LDE + j] * a.scale;
      if (x > m) {
        l = l * exp(m - x) + acc_t(1);  // m = -inf at the first key: l = 0·0 + 1
        m = x;
      } else {
        l += exp(x - m);
      }
    }
  }
  sh.st[threadIdx.x] = m;
  __syncthreads();
  const acc_t m1 = sh.st[threadIdx.x ^ 1];
  __syncthreads();
  sh.st[threadIdx.x] = l;
  __syncthreads();
  if (part == 0 && own < g.L) {
    const acc_t l1 = sh.st[threadIdx.x + 1];
    const acc_t mx = m > m1 ? m : m1;
    acc_t lse = neg_inf<acc_t>();
    if (mx != neg_inf<acc_t>()) lse = mx + log(l * exp(m - mx) + l1 * exp(m1 - mx));
    acc_t* dst = a.lse_out + pix0 + static_cast<int64_t>(own) * g.s_pos;
    if (final) lse = log_add_exp(*dst, lse);  // *dst: the column pass's value
    *dst = lse;
  }
}

// cca_pv_kernel, KEY = false (the forward's output): for a tile of pixels and a group of Cv,
//   out(p, c) = sum_s exp(scale·<q_p, k_s> - lse_p) · v(s, c)
// over the pass's keys, P recomputed from the final lse (no rescaling) once per key tile and
// used for every CT chunk of the group (op-math accumulators in shared memory, ac), P·V by mma
// with P in the element type. KEY = true (dv in the backward): for a tile of keys,
//   dv(s, c) = gamma · sum_p P(p, s) · dO(p, c)
// over the pixels p of the line that see s. Grid: x = (image, line, own tile), y = Cv group.
// Traffic per pass: G·(q P·D·b·r + k P·D·b·T_o + lse P·a·T_k) + v (dO for dv) P·Cv·b·T_o; the
// column pass writes part P·Cv·b, the row pass reads it and writes out P·Cv·b (residual op: also
// residual read and y written, P·Cv·b each).
template <class Pol, class Tl, typename T, typename acc_t, bool KEY>
__global__ void __launch_bounds__(Tl::kThreads, 1)
cca_pv_kernel(Args<T, acc_t> a, LinePass g, bool final) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const SharedTiles<T, acc_t, Tl> sh(smem_raw);
  const Frame<T, acc_t, KEY> f(a, g, Tl::BO);
  const int warp = threadIdx.x >> 5;
  const int c_begin = static_cast<int>(blockIdx.y) * a.group;
  const int width = a.Cv - c_begin < a.group ? a.Cv - c_begin : a.group;
  const int chunks = (width + Tl::CT - 1) / Tl::CT;
  const int lda = a.group + 4;
  const T* z = (KEY ? a.go : a.v) + f.pix0 * a.Cv;  // the second product's operand
  const bool zvec = vec_ok<T>(g, a.Cv);
  const bool resident = a.D <= 2 * Tl::CT;
  for (int e = threadIdx.x; e < Tl::BO * lda; e += Tl::kThreads) sh.ac[e] = acc_t(0);
  for (int o0 = 0; o0 < g.L; o0 += Tl::BK) {
    contract<Pol, Tl>(sh.es, f.x, f.b.own0, f.y, o0, a.D, g, o0 == 0 || !resident, sh.xs, sh.ys);
    // the first Cv chunk is in flight while P is formed (ys is free after contract's last sync)
    load_tile<Tl, Tl::BK>(sh.ys, Tl::LDC, z, o0, c_begin, a.Cv, g.L, g.s_pos, zvec);
    async_commit();
    load_stats<Tl>(sh.st, f.lse, static_cast<const acc_t*>(nullptr), KEY ? o0 : f.b.own0,
                   KEY ? Tl::BK : Tl::BO, g);
    __syncthreads();
    for (int e = threadIdx.x; e < Tl::BO * Tl::BK; e += Tl::kThreads) {
      const int i = e / Tl::BK, j = e % Tl::BK;
      const acc_t p = f.valid(f.b.own0 + i, o0 + j, g)
                          ? exp(sh.es[i * Tl::LDE + j] * a.scale - sh.st[KEY ? j : i])
                          : acc_t(0);
      sh.ps[i * Tl::LDP + j] = from_acc<T>(p);
    }
    const int ext = other_extent<Tl>(g.L, o0);
    for (int ci = 0; ci < chunks; ++ci) {
      if (ci + 1 < chunks)
        load_tile<Tl, Tl::BK>(sh.ys + ((ci + 1) & 1) * Tl::BK * Tl::LDC, Tl::LDC, z, o0,
                              c_begin + (ci + 1) * Tl::CT, a.Cv, g.L, g.s_pos, zvec);
      async_commit();
      async_wait_all_but_one();
      __syncthreads();  // chunk ci (and, the first time, ps) is visible to every warp
      typename Pol::Acc acc[Tl::CT / 16];
      acc_t* strip = sh.ac + 16 * warp * lda + ci * Tl::CT;  // this warp's rows only
#pragma unroll
      for (int j = 0; j < Tl::CT / 16; ++j) Pol::load_acc(acc[j], strip + 16 * j, lda);
      product_pz<Pol, Tl>(acc, sh.ps, sh.ys + (ci & 1) * Tl::BK * Tl::LDC, ext);
      store_strip<Pol, Tl::CT>(sh.ac + ci * Tl::CT, lda, acc);  // adds the warp's row offset
      __syncthreads();  // buffer ci & 1 is refilled next
    }
  }
  __syncthreads();
  const acc_t gm = a.gamma != nullptr ? *a.gamma : acc_t(1);
  store_tile<Tl>(sh.ac, lda, width, KEY ? gm : acc_t(1), static_cast<const acc_t*>(nullptr),
                 static_cast<const acc_t*>(nullptr), final, a.part, a.out,
                 KEY ? nullptr : a.y, a.residual, gm, f.b, c_begin, a.Cv, g);
}

// cca_fwd_line_kernel: the forward of one pass in one kernel, for lines that fit in shared
// memory (Smem::line_fits; otherwise the glue runs cca_lse_kernel and cca_pv_kernel). A block
// owns BO positions of one line (a whole line of up to 128 in ProdTiles16) and
//   1. contracts q·k against every key tile of the line into les (op-math), then forms, per own
//      position p, the pass's softmax state m_p = max_s e(p, s), l_p = sum_s exp(e(p, s) - m_p)
//      over the pass's keys (e = scale·<q_p, k_s>) and P(p, s) = exp(e(p, s) - m_p) in the
//      element type in lps: P is formed once, before any channel of v is read;
//   2. walks Cv in chunks of CT, each chunk accumulating P·V over the line's key tiles in
//      registers (v tiles double-buffered by cp.async across (chunk, key tile) steps), so v is
//      read once per own tile and there are no Cv groups;
//   3. per chunk, the epilogue: the column pass writes part = P·V / l (normalised by its own
//      state, rounded to the element type, NHWC) and lse_c = m + log l (-inf without keys, H = 1)
//      to lse_out; the row pass merges the two states, lse = logaddexp(lse_c, lse_r), writes
//      out = exp(m_r - lse)·P_r·V + exp(lse_c - lse)·part (= the softmax over all H+W-1 keys;
//      NCHW, residual y = gamma·out + x), and overwrites lse_out with the merged lse, which is
//      what the backward reads (the same value cca_lse_kernel would save, up to the order of
//      the exp sums).
// The part buffer rounds the column pass's contribution to the element type once before the
// final rounding of out (as the fallback does); tests/test_cca_cuda_emulation.py bounds the
// effect in 16-bit.
// Traffic per pass: q P·D·b·r, k P·D·b·T_o, v P·Cv·b·T_o; lse P·a written by the column pass,
// read and written by the row pass; part P·Cv·b written by the column pass and read by the row
// pass, out P·Cv·b written (residual op: also residual read and y written, P·Cv·b each).
template <class Pol, class Tl, typename T, typename acc_t>
__global__ void __launch_bounds__(Tl::kThreads, 1)
cca_fwd_line_kernel(Args<T, acc_t> a, LinePass g, bool final) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  using S = Smem<T, acc_t, Tl>;
  T* xs = reinterpret_cast<T*>(smem_raw + S::xs);
  T* ys = reinterpret_cast<T*>(smem_raw + S::ys);
  acc_t* st = reinterpret_cast<acc_t*>(smem_raw + S::lst);  // [4][BO]: exchange, row factors
  acc_t* es = reinterpret_cast<acc_t*>(smem_raw + S::les);
  T* ps = reinterpret_cast<T*>(smem_raw + S::lps(g.L));
  const int lde = S::line_lde(g.L), ldp = S::line_ldp(g.L), Lp = S::line_pad(g.L);
  const Block b = decode_block(g, Tl::BO);
  const int64_t pix0 = b.n * g.HW + b.line_off;
  const bool resident = a.D <= 2 * Tl::CT;

  // 1. Energies of the own positions against the whole line, then the softmax state and P.
  for (int o0 = 0; o0 < g.L; o0 += Tl::BK)
    contract<Pol, Tl>(es + o0, a.q + pix0 * a.D, b.own0, a.k + pix0 * a.D, o0, a.D, g,
                      o0 == 0 || !resident, xs, ys, lde);
  // The first v tile is in flight while P is formed (ys is free after contract's last sync).
  const T* v = a.v + pix0 * a.Cv;
  const bool vvec = vec_ok<T>(g, a.Cv);
  const int key_tiles = Lp / Tl::BK, chunks = (a.Cv + Tl::CT - 1) / Tl::CT;
  const int steps = chunks * key_tiles;  // (chunk, key tile), key tiles innermost
  auto issue = [&](int i) {
    load_tile<Tl, Tl::BK>(ys + (i & 1) * Tl::BK * Tl::LDC, Tl::LDC, v, (i % key_tiles) * Tl::BK,
                          (i / key_tiles) * Tl::CT, a.Cv, g.L, g.s_pos, vvec);
    async_commit();
  };
  if (steps > 0) issue(0);
  __syncthreads();  // es is complete
  // Two threads per own row (kThreads = 2·BO), each over alternate keys, merged through st.
  const int r = threadIdx.x >> 1, half = threadIdx.x & 1;
  const int own = b.own0 + r;
  acc_t m = neg_inf<acc_t>();
  for (int j = half; j < g.L; j += 2) {
    if (!key_valid(own, j, g.L, g.exclude_self)) continue;
    const acc_t x = es[r * lde + j] * a.scale;
    m = x > m ? x : m;
  }
  st[threadIdx.x] = m;
  __syncthreads();
  const acc_t m1 = st[threadIdx.x ^ 1];
  m = m1 > m ? m1 : m;
  acc_t l = acc_t(0);
  for (int j = half; j < Lp; j += 2) {
    acc_t p = acc_t(0);
    if (key_valid(own, j, g.L, g.exclude_self)) {
      p = exp(es[r * lde + j] * a.scale - m);
      l += p;
    }
    ps[r * ldp + j] = from_acc<T>(p);
  }
  __syncthreads();  // every thread has read its partner's m
  st[threadIdx.x] = l;
  __syncthreads();
  l += st[threadIdx.x ^ 1];
  // Per own row: the factor of this pass's P·V (acc_mult) and, in the row pass, of part.
  acc_t* acc_mult = st + 2 * Tl::BO;
  acc_t* part_mult = st + 3 * Tl::BO;
  if (half == 0) {
    acc_t fa = acc_t(0), fp = acc_t(0);
    if (own < g.L) {
      acc_t* lse = a.lse_out + pix0 + static_cast<int64_t>(own) * g.s_pos;
      // l = 0 only for a column without keys (H = 1): lse -inf, part 0
      const acc_t lse_pass = l > acc_t(0) ? m + log(l) : neg_inf<acc_t>();
      if (!final) {
        fa = l > acc_t(0) ? acc_t(1) / l : acc_t(0);
        *lse = lse_pass;
      } else {
        const acc_t lse_c = *lse;  // read and overwritten by this thread only
        const acc_t merged = log_add_exp(lse_c, lse_pass);
        fa = exp(m - merged);
        fp = exp(lse_c - merged);
        *lse = merged;
      }
    }
    acc_mult[r] = fa;
    part_mult[r] = fp;
  }

  // 2. P·V, CT channels at a time, over the line's key tiles; 3. the epilogue per chunk.
  const acc_t gm = a.gamma != nullptr ? *a.gamma : acc_t(1);
  typename Pol::Acc acc[Tl::CT / 16];
  for (int i = 0; i < steps; ++i) {
    const int kt = i % key_tiles;
    if (kt == 0) {
#pragma unroll
      for (int j = 0; j < Tl::CT / 16; ++j) Pol::zero(acc[j]);
    }
    if (i + 1 < steps) {
      issue(i + 1);
    } else {
      async_commit();  // an empty group: "all but one" still means "step i has landed"
    }
    async_wait_all_but_one();
    __syncthreads();  // step i's v tile (and, the first time, ps and the row factors) visible
    product_pz<Pol, Tl>(acc, ps + kt * Tl::BK, ys + (i & 1) * Tl::BK * Tl::LDC,
                        other_extent<Tl>(g.L, kt * Tl::BK), ldp);
    __syncthreads();  // buffer i & 1 is refilled by the next step's issue
    if (kt == key_tiles - 1) {
      // es is free since P was formed: it stages the chunk's [BO][CT] result.
      store_strip<Pol, Tl::CT>(es, Tl::CT + 4, acc);
      __syncthreads();
      store_tile<Tl>(es, Tl::CT + 4, Tl::CT, acc_t(1), acc_mult, part_mult, final, a.part,
                     a.out, a.y, a.residual, gm, b, (i / key_tiles) * Tl::CT, a.Cv, g);
    }
  }
}

// cca_grad_kernel, KEY = false (dq): for a tile of pixels and a tile of Cqk,
//   dq(p, d) = sum_s dS(p, s) · k(s, d),  dS = P (gamma·<dO_p, v_s> - D_p) · scale
// over the pass's keys; dP = dO·V^T is its own contraction over all of Cv. KEY = true (dk): for
// a tile of keys, dk(s, d) = sum_p dS(p, s) · q(p, d) over the pixels of the line that see s.
// dS is rounded to the element type for its mma, as flash-attention does. Grid: x = (image,
// line, own tile), y = Cqk tile (CT wide).
// Traffic per pass and Cqk tile: q, k P·D·b·(T_k + T_o), dO, v P·Cv·b·(T_k + T_o) (both sides
// reloaded per key tile: two contractions share xs), the output side's CT channels P·CT·b·T_o,
// lse and D 2·P·a·T_k; the output as the P·V kernel's with C = D (part P·D·b written, read,
// dq or dk P·D·b written).
template <class Pol, class Tl, typename T, typename acc_t, bool KEY>
__global__ void __launch_bounds__(Tl::kThreads, 1)
cca_grad_kernel(Args<T, acc_t> a, LinePass g, bool final) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const SharedTiles<T, acc_t, Tl> sh(smem_raw);
  const Frame<T, acc_t, KEY> f(a, g, Tl::BO);
  const int c0 = static_cast<int>(blockIdx.y) * Tl::CT;
  const acc_t gm = a.gamma != nullptr ? *a.gamma : acc_t(1);
  typename Pol::Acc acc[Tl::CT / 16];
#pragma unroll
  for (int j = 0; j < Tl::CT / 16; ++j) Pol::zero(acc[j]);
  for (int o0 = 0; o0 < g.L; o0 += Tl::BK) {
    contract<Pol, Tl>(sh.es, f.x, f.b.own0, f.y, o0, a.D, g, true, sh.xs, sh.ys);
    contract<Pol, Tl>(sh.fs, f.gx, f.b.own0, f.gy, o0, a.Cv, g, true, sh.xs, sh.ys);
    // the other side's output-tile channels (k or q) are in flight while dS is formed
    load_tile<Tl, Tl::BK>(sh.ys, Tl::LDC, f.y, o0, c0, a.D, g.L, g.s_pos, vec_ok<T>(g, a.D));
    async_commit();
    load_stats<Tl>(sh.st, f.lse, f.dd, KEY ? o0 : f.b.own0, KEY ? Tl::BK : Tl::BO, g);
    __syncthreads();
    const int ns = KEY ? Tl::BK : Tl::BO;
    for (int e = threadIdx.x; e < Tl::BO * Tl::BK; e += Tl::kThreads) {
      const int i = e / Tl::BK, j = e % Tl::BK;
      acc_t ds = acc_t(0);
      if (f.valid(f.b.own0 + i, o0 + j, g)) {
        const int u = KEY ? j : i;  // the pixel's statistics
        const acc_t p = exp(sh.es[i * Tl::LDE + j] * a.scale - sh.st[u]);
        ds = p * (gm * sh.fs[i * Tl::LDE + j] - sh.st[ns + u]) * a.scale;
      }
      sh.ps[i * Tl::LDP + j] = from_acc<T>(ds);
    }
    async_commit();
    async_wait_all_but_one();
    __syncthreads();
    product_pz<Pol, Tl>(acc, sh.ps, sh.ys, other_extent<Tl>(g.L, o0));
  }
  __syncthreads();
  store_strip<Pol, Tl::CT>(sh.es, Tl::LDE, acc);
  __syncthreads();
  store_tile<Tl>(sh.es, Tl::LDE, Tl::CT, acc_t(1), static_cast<const acc_t*>(nullptr),
                 static_cast<const acc_t*>(nullptr), final, a.part, a.out, static_cast<T*>(nullptr),
                 static_cast<const T*>(nullptr), acc_t(0), f.b, c0, a.D, g);
}

// cca_delta_kernel: one thread per pixel, D_u = gamma·<dO_u, O_u> over Cv (dO = gamma·grad_y for
// the residual op, gamma = 1 otherwise); gpart_u = <grad_y_u, O_u>, the pixel's share of
// grad_gamma (residual op only). go and out NCHW: consecutive threads read consecutive pixels of
// each channel. Traffic: 2·P·Cv·b read, P·a written (2·P·a, residual op).
template <typename T, typename acc_t>
__global__ void cca_delta_kernel(const T* __restrict__ go, const T* __restrict__ out,
                                 const acc_t* __restrict__ gamma, acc_t* __restrict__ dd,
                                 acc_t* __restrict__ gpart, int Cv, int64_t HW, int64_t total) {
  const int64_t pix = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pix >= total) return;
  const int64_t n = pix / HW, hw = pix % HW;
  const T* gp = go + n * Cv * HW + hw;
  const T* op = out + n * Cv * HW + hw;
  acc_t dot = acc_t(0);
  for (int c = 0; c < Cv; ++c) {
    const int64_t off = static_cast<int64_t>(c) * HW;
    dot += to_acc<acc_t>(gp[off]) * to_acc<acc_t>(op[off]);
  }
  dd[pix] = gamma != nullptr ? *gamma * dot : dot;
  if (gpart != nullptr) gpart[pix] = dot;
}

}  // namespace cca_cuda
}  // namespace armnet_ops

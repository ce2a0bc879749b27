// The fused criss-cross attention CUDA kernels (see cca.cu for the design, the launches and what
// is saved). Device code only: plain templates over the scalar type, an "mma policy" and the tile
// sizes, taking pointers, sizes and strides, no ATen. Kept apart from the glue so that
// tests/test_cca_cuda_emulation.py compiles the very same kernels for the host (one std::thread
// per CUDA thread, a barrier for __syncthreads, a small host nvcuda::wmma) and checks them
// against the reference without a GPU.
//
// Terms. A *pass* walks lines: the row pass the H rows (positions along w, keys (h, z) for all
// z), the column pass the W columns (positions along h, keys (j, w) with j != h: EXCLUDE_SELF).
// One kernel serves both; only LinePass (line/position strides) and exclude_self differ. A block
// owns BL positions of one line of one image (the "own" rows of its tiles) and walks the line's
// other positions BL at a time (the "other" columns): for the forward and dq the own rows are
// pixels and the others keys; for dk and dv the own rows are keys and the others the pixels that
// see them (a gather: every output element is written by one block, no atomics).
//
// Products. Every tile product is a warp-level 16x16x16 mma on shared-memory operands through a
// policy: WmmaPolicy (nvcuda::wmma, tensor cores: half / bfloat16 in, float accumulators) or
// FmaPolicy (the same tile shapes by scalar FMA, for float and double: no TF32, exact fp32).
// Warp w of a block owns the 16-row strip [16w, 16w + 16) of every BL-row tile. Accumulator
// tiles go through shared memory (store_matrix_sync) before any element-wise step, so no code
// depends on the fragment layout.
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

// ---- tile sizes and the shared-memory layout --------------------------------------------------

// BL: positions per tile along a line (own rows and other columns alike); CT: channels per chunk
// of a contraction, and the width of an output tile (Cqk for dq/dk, Cv for out/dv).
template <int BL_, int CT_>
struct Tiles {
  static constexpr int BL = BL_;
  static constexpr int CT = CT_;
  static_assert(BL % 16 == 0 && CT % 16 == 0, "tiles are whole 16x16 mma tiles");
  static constexpr int kWarps = BL / 16;
  static constexpr int kThreads = 32 * kWarps;
  // Padded leading dimensions. Every wmma tile origin is a multiple of 16 rows and columns, so
  // with these (multiples of 8 elements for 16-bit, of 4 for 32-bit, as wmma requires) each origin
  // is 32-byte aligned; the padding also spreads rows over the shared-memory banks.
  static constexpr int LDT = BL + 8;                    // operand tiles, element type
  static constexpr int LDF = (BL > CT ? BL : CT) + 4;   // accumulator tiles, op-math type
};

__host__ __device__ constexpr int64_t align128(int64_t b) { return (b + 127) / 128 * 128; }

// Offsets in the dynamic shared memory: xs, ys [CT][LDT] (contraction operands; xs then holds
// the second product's operand), ps [BL][LDT] (P or dS in the element type), st (per-position
// statistics), es [BL][LDF] (energies; the output tile at the end), fs [BL][LDF] (dP, backward).
template <typename T, typename acc_t, class Tl>
struct Smem {
  static constexpr int64_t xs = 0;
  static constexpr int64_t ys = xs + align128(int64_t(Tl::CT) * Tl::LDT * sizeof(T));
  static constexpr int64_t ps = ys + align128(int64_t(Tl::CT) * Tl::LDT * sizeof(T));
  static constexpr int64_t st = ps + align128(int64_t(Tl::BL) * Tl::LDT * sizeof(T));
  static constexpr int64_t es = st + align128(int64_t(2) * Tl::kThreads * sizeof(acc_t));
  static constexpr int64_t fs = es + align128(int64_t(Tl::BL) * Tl::LDF * sizeof(acc_t));
  static constexpr int64_t bytes_forward = fs;  // lse and P·V kernels
  static constexpr int64_t bytes_grad = fs + align128(int64_t(Tl::BL) * Tl::LDF * sizeof(acc_t));
};

// Typed views of the dynamic shared memory.
template <typename T, typename acc_t, class Tl>
struct SharedTiles {
  using S = Smem<T, acc_t, Tl>;
  T *xs, *ys, *ps;
  acc_t *st, *es, *fs;
  __device__ __forceinline__ explicit SharedTiles(unsigned char* raw)
      : xs(reinterpret_cast<T*>(raw + S::xs)),
        ys(reinterpret_cast<T*>(raw + S::ys)),
        ps(reinterpret_cast<T*>(raw + S::ps)),
        st(reinterpret_cast<acc_t*>(raw + S::st)),
        es(reinterpret_cast<acc_t*>(raw + S::es)),
        fs(reinterpret_cast<acc_t*>(raw + S::fs)) {}
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
};

#if defined(ARMNET_CCA_WMMA) || defined(ARMNET_CCA_HOST_WMMA)
// Tensor cores through nvcuda::wmma (m16n16k16). On the host the test harness supplies a small
// nvcuda::wmma of its own, instantiated with float and double.
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

// ---- geometry -----------------------------------------------------------------------------------

// One pass. Offsets inside an (H, W) plane: line·s_line + position·s_pos; channel c of image n
// of a C-channel NCHW tensor adds (n·C + c)·HW.
struct LinePass {
  int L;        // positions per line (= keys per line)
  int n_lines;  // lines per image
  int tiles;    // ceil(L / BL)
  int64_t s_line, s_pos, HW;
  bool exclude_self;  // column pass: the pixel itself is a row key, not a column key
  bool vec;           // positions contiguous (s_pos = 1) and every (channel, line) start of the
                      // operands 16-byte aligned: operand tiles move 16 bytes at a time
};

// Everything the kernels read or write; unused pointers are null.
template <typename T, typename acc_t>
struct Args {
  const T* q;         // (N, D, H, W)
  const T* k;         // (N, D, H, W)
  const T* v;         // (N, Cv, H, W)
  const T* go;        // grad of out, or grad of y (then scaled by gamma)
  const T* residual;  // (N, Cv, H, W), residual forward only
  const acc_t* gamma; // one element, residual ops only
  const acc_t* lse;   // (N, H, W)
  const acc_t* dd;    // (N, H, W): D_u = <dO_u, O_u>
  acc_t* lse_out;     // lse kernel: where the pass writes its (merged) log-sum-exp
  acc_t* part;        // (N, C, H, W) op-math buffer: the row pass's result (may alias out)
  T* out;             // the pass's output tensor: out, dq, dk or dv
  T* y;               // residual forward: gamma·out + residual
  int D, Cv;
  acc_t scale;
};

struct Block {
  int64_t n;        // image
  int64_t line_off; // plane offset of position 0 of the line
  int own0;         // first own position of the block
};

__device__ __forceinline__ Block decode_block(const LinePass& g, int bl) {
  int64_t b = blockIdx.x;
  Block r;
  r.own0 = static_cast<int>(b % g.tiles) * bl;
  b /= g.tiles;
  r.line_off = (b % g.n_lines) * g.s_line;
  r.n = b / g.n_lines;
  return r;
}

// ---- block-level building blocks ------------------------------------------------------------

// dst[c][i] (leading dimension LDT) = src(channel c0 + c, position p0 + i), zero outside the C
// channels and the L positions (the zero padding of the k-dimension and of the line's tail).
// src points at channel 0, position 0 of the line. Consecutive threads read consecutive
// positions (coalesced in a row pass); with vec, 16 bytes per thread (p0 and the row stride LDT
// keep the shared-memory side 16-byte aligned too).
template <typename T>
struct alignas(16) Vec16 {
  T x[16 / sizeof(T)];
};

template <class Tl, typename T>
__device__ __forceinline__ void load_chunk(T* dst, const T* __restrict__ src, int p0, int c0,
                                           int C, int L, int64_t HW, int64_t s_pos, bool vec) {
  const T zero = from_acc<T>(0.0f);
  if (vec) {
    constexpr int VE = 16 / sizeof(T);
    static_assert(Tl::BL % VE == 0 && (Tl::LDT * sizeof(T)) % 16 == 0, "vector tiles");
    constexpr int kPer = Tl::BL / VE;
    for (int e = threadIdx.x; e < Tl::CT * kPer; e += Tl::kThreads) {
      const int c = e / kPer, i = (e % kPer) * VE;
      const T* s = src + static_cast<int64_t>(c0 + c) * HW + (p0 + i);
      Vec16<T> val;
      if (c0 + c < C && p0 + i + VE <= L) {
        val = *reinterpret_cast<const Vec16<T>*>(s);
      } else {
#pragma unroll
        for (int u = 0; u < VE; ++u) val.x[u] = (c0 + c < C && p0 + i + u < L) ? s[u] : zero;
      }
      *reinterpret_cast<Vec16<T>*>(dst + c * Tl::LDT + i) = val;
    }
    return;
  }
  for (int e = threadIdx.x; e < Tl::CT * Tl::BL; e += Tl::kThreads) {
    const int c = e / Tl::BL, i = e % Tl::BL;
    T val = zero;
    if (c0 + c < C && p0 + i < L)
      val = src[static_cast<int64_t>(c0 + c) * HW + static_cast<int64_t>(p0 + i) * s_pos];
    dst[c * Tl::LDT + i] = val;
  }
}

// The warp's 16-row strip of an accumulator tile (N/16 fragments) into es (LDF).
template <class Pol, class Tl, int N, typename acc_t>
__device__ __forceinline__ void store_strip(acc_t* es, const typename Pol::Acc (&acc)[N / 16]) {
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < N / 16; ++j) Pol::store(es + 16 * warp * Tl::LDF + 16 * j, Tl::LDF, acc[j]);
}

// es[i][j] (warp strips, LDF) = sum_c X(c, x0 + i) · Y(c, y0 + j) over C channels, CT at a
// time: X the block's own positions, Y the other positions, both read with load_chunk.
// Starts with a __syncthreads per chunk (xs, ys are reused); the caller syncs before reading es.
template <class Pol, class Tl, typename T, typename acc_t>
__device__ __forceinline__ void contract(acc_t* es, const T* __restrict__ x, int x0,
                                         const T* __restrict__ y, int y0, int C, int L, int64_t HW,
                                         int64_t s_pos, bool vec, T* xs, T* ys) {
  const int warp = threadIdx.x >> 5;
  typename Pol::Acc acc[Tl::BL / 16];
#pragma unroll
  for (int j = 0; j < Tl::BL / 16; ++j) Pol::zero(acc[j]);
  for (int c0 = 0; c0 < C; c0 += Tl::CT) {
    __syncthreads();
    load_chunk<Tl>(xs, x, x0, c0, C, L, HW, s_pos, vec);
    load_chunk<Tl>(ys, y, y0, c0, C, L, HW, s_pos, vec);
    __syncthreads();
    const int kc = C - c0 < Tl::CT ? C - c0 : Tl::CT;  // padded chunks past C are all zero
    for (int kk = 0; kk < kc; kk += 16) {
      typename Pol::template FragA<false> fa;
      Pol::load_a(fa, xs + kk * Tl::LDT + 16 * warp, Tl::LDT);
#pragma unroll
      for (int j = 0; j < Tl::BL / 16; ++j) {
        typename Pol::template FragB<true> fb;
        Pol::load_b(fb, ys + kk * Tl::LDT + 16 * j, Tl::LDT);
        Pol::mma(acc[j], fa, fb);
      }
    }
  }
  store_strip<Pol, Tl, Tl::BL>(es, acc);
}

// acc[j] += ps(own rows of this warp, [0, BL)) · Z(positions [0, BL), channels 16j..), with Z
// in xs as [channel][position] (the B operand column-major).
template <class Pol, class Tl, typename T>
__device__ __forceinline__ void product_pz(typename Pol::Acc (&acc)[Tl::CT / 16], const T* ps,
                                           const T* xs, int n_other) {
  const int warp = threadIdx.x >> 5;
  for (int kk = 0; kk < n_other; kk += 16) {
    typename Pol::template FragA<true> fa;
    Pol::load_a(fa, ps + 16 * warp * Tl::LDT + kk, Tl::LDT);
#pragma unroll
    for (int j = 0; j < Tl::CT / 16; ++j) {
      typename Pol::template FragB<false> fb;
      Pol::load_b(fb, xs + 16 * j * Tl::LDT + kk, Tl::LDT);
      Pol::mma(acc[j], fa, fb);
    }
  }
}

// Writes the block's [BL own positions] x [CT channels from c0] output tile, held in es (LDF),
// times mult. The row pass (final = false) stores it in the op-math buffer part; the column pass
// adds part and rounds once into dst, and, for the residual forward, y = gamma·total + residual.
// part may alias dst (op-math outputs): each element is read, then written, by one thread.
template <class Tl, typename T, typename acc_t>
__device__ __forceinline__ void store_tile(const acc_t* es, acc_t mult, bool final, acc_t* part,
                                           T* dst, T* y, const T* __restrict__ residual,
                                           acc_t g_res, int64_t base, int own0, int c0, int C,
                                           int L, int64_t HW, int64_t s_pos) {
  for (int e = threadIdx.x; e < Tl::BL * Tl::CT; e += Tl::kThreads) {
    const int i = e % Tl::BL, c = e / Tl::BL;
    if (own0 + i >= L || c0 + c >= C) continue;
    const int64_t idx =
        base + static_cast<int64_t>(c0 + c) * HW + static_cast<int64_t>(own0 + i) * s_pos;
    acc_t val = mult * es[i * Tl::LDF + c];
    if (!final) {
      part[idx] = val;
    } else {
      val += part[idx];
      dst[idx] = from_acc<T>(val);
      if (y != nullptr) y[idx] = from_acc<T>(g_res * val + to_acc<acc_t>(residual[idx]));
    }
  }
}

__device__ __forceinline__ bool key_valid(int p, int s, int L, bool exclude_self) {
  return p < L && s < L && !(exclude_self && p == s);
}

// Where a block of cca_pv_kernel / cca_grad_kernel works, and its line's pointers. The block's
// own positions are pixels (KEY = false) or keys (KEY = true); x holds the own side of the
// energy contraction, y the other side (q or k), gx / gy the two sides of dP = dO·V^T (backward),
// stat the per-pixel statistics of the line.
template <typename T, typename acc_t, bool KEY>
struct Frame {
  Block b;
  int c0;  // first channel of the output tile
  int64_t qk_plane, v_plane;
  const T *x, *y, *gx, *gy;
  const acc_t *lse, *dd;
  __device__ __forceinline__ Frame(const Args<T, acc_t>& a, const LinePass& g, int bl, int ct)
      : b(decode_block(g, bl)),
        c0(static_cast<int>(blockIdx.y) * ct),
        qk_plane(b.n * a.D * g.HW + b.line_off),
        v_plane(b.n * a.Cv * g.HW + b.line_off),
        x((KEY ? a.k : a.q) + qk_plane),
        y((KEY ? a.q : a.k) + qk_plane),
        gx(a.go == nullptr ? nullptr : (KEY ? a.v : a.go) + v_plane),
        gy(a.go == nullptr ? nullptr : (KEY ? a.go : a.v) + v_plane),
        lse(a.lse + b.n * g.HW + b.line_off),
        dd(a.dd == nullptr ? nullptr : a.dd + b.n * g.HW + b.line_off) {}
  // In tile (own i, other j): the pixel is the own position (KEY = false) or the other one.
  __device__ __forceinline__ bool valid(int own, int oth, const LinePass& g) const {
    return KEY ? key_valid(oth, own, g.L, g.exclude_self)
               : key_valid(own, oth, g.L, g.exclude_self);
  }
};

// Loads the statistics of the BL pixels of the current tile pair into st: lse, and dd after it.
template <class Tl, typename acc_t>
__device__ __forceinline__ void load_stats(acc_t* st, const acc_t* lse, const acc_t* dd, int pix0,
                                           const LinePass& g) {
  if (threadIdx.x < Tl::BL) {
    const int pix = pix0 + static_cast<int>(threadIdx.x);
    const bool in = pix < g.L;
    const int64_t off = static_cast<int64_t>(pix) * g.s_pos;
    st[threadIdx.x] = in ? lse[off] : acc_t(0);
    if (dd != nullptr) st[Tl::BL + threadIdx.x] = in ? dd[off] : acc_t(0);
  }
}

// Positions of the other tile starting at o0 that hold real data, rounded up to the mma size.
template <class Tl>
__device__ __forceinline__ int other_extent(int L, int o0) {
  return L - o0 < Tl::BL ? ((L - o0 + 15) / 16) * 16 : Tl::BL;
}

// ---- kernels --------------------------------------------------------------------------------

// cca_lse_kernel: per pixel of the pass, the log-sum-exp of its scaled energies over the pass's
// keys, by an online softmax over key tiles (two threads per pixel row, each over alternate
// keys, merged at the end). The row pass writes it to lse_out; the column pass merges it with
// what the row pass wrote there (lse_out itself, read then written by one thread) by logaddexp.
// A column pass with no keys (H = 1) leaves the row value.
template <class Pol, class Tl, typename T, typename acc_t>
__global__ void __launch_bounds__(Tl::kThreads)
cca_lse_kernel(Args<T, acc_t> a, LinePass g) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const SharedTiles<T, acc_t, Tl> sh(smem_raw);
  const Block b = decode_block(g, Tl::BL);
  const int64_t plane = b.n * a.D * g.HW + b.line_off;
  const int r = threadIdx.x >> 1, part = threadIdx.x & 1;  // kThreads = 2·BL
  const int own = b.own0 + r;
  acc_t m = neg_inf<acc_t>(), l = acc_t(0);
  for (int o0 = 0; o0 < g.L; o0 += Tl::BL) {
    __syncthreads();  // es is rewritten below
    contract<Pol, Tl>(sh.es, a.q + plane, b.own0, a.k + plane, o0, a.D, g.L, g.HW, g.s_pos, g.vec,
                      sh.xs, sh.ys);
    __syncthreads();
    for (int j = part; j < Tl::BL; j += 2) {
      if (!key_valid(own, o0 + j, g.L, g.exclude_self)) continue;
      const acc_t x = sh.es[r * Tl::LDF + j] * a.scale;
      if (x > m) {
        l = l * exp(m - x) + acc_t(1);  // m = -inf at the first key: l = 0·0 + 1
        m = x;
      } else {
        l += exp(x - m);
      }
    }
  }
  sh.st[threadIdx.x] = m;
  sh.st[Tl::kThreads + threadIdx.x] = l;
  __syncthreads();
  if (part == 0 && own < g.L) {
    const acc_t m1 = sh.st[threadIdx.x + 1], l1 = sh.st[Tl::kThreads + threadIdx.x + 1];
    const acc_t mx = m > m1 ? m : m1;
    acc_t lse = neg_inf<acc_t>();
    if (mx != neg_inf<acc_t>()) lse = mx + log(l * exp(m - mx) + l1 * exp(m1 - mx));
    acc_t* dst = a.lse_out + b.n * g.HW + b.line_off + static_cast<int64_t>(own) * g.s_pos;
    if (g.exclude_self) {
      const acc_t row = *dst;  // finite: every pixel has W >= 1 row keys
      if (lse != neg_inf<acc_t>()) {
        const acc_t hi = row > lse ? row : lse, lo = row > lse ? lse : row;
        lse = hi + log1p(exp(lo - hi));
      } else {
        lse = row;
      }
    }
    *dst = lse;
  }
}

// cca_pv_kernel, KEY = false (the forward's output): for a tile of pixels and a tile of Cv,
//   out(p, c) = sum_s exp(scale·<q_p, k_s> - lse_p) · v(s, c)
// over the pass's keys, P recomputed from the final lse (no rescaling), P·V by mma with P in the
// element type. KEY = true (dv in the backward): for a tile of keys and a tile of Cv,
//   dv(s, c) = gamma · sum_p P(p, s) · dO(p, c)
// over the pixels p of the line that see s. Grid: x = (image, line, own tile), y = Cv tile.
template <class Pol, class Tl, typename T, typename acc_t, bool KEY>
__global__ void __launch_bounds__(Tl::kThreads)
cca_pv_kernel(Args<T, acc_t> a, LinePass g, bool final) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const SharedTiles<T, acc_t, Tl> sh(smem_raw);
  const Frame<T, acc_t, KEY> f(a, g, Tl::BL, Tl::CT);
  const T* z = (KEY ? a.go : a.v) + f.v_plane;  // the second product's operand, other positions
  typename Pol::Acc acc[Tl::CT / 16];
#pragma unroll
  for (int j = 0; j < Tl::CT / 16; ++j) Pol::zero(acc[j]);
  for (int o0 = 0; o0 < g.L; o0 += Tl::BL) {
    __syncthreads();  // ps, xs, es, st of the previous tile are free
    load_stats<Tl>(sh.st, f.lse, static_cast<const acc_t*>(nullptr), KEY ? o0 : f.b.own0, g);
    contract<Pol, Tl>(sh.es, f.x, f.b.own0, f.y, o0, a.D, g.L, g.HW, g.s_pos, g.vec, sh.xs, sh.ys);
    __syncthreads();
    for (int e = threadIdx.x; e < Tl::BL * Tl::BL; e += Tl::kThreads) {
      const int i = e / Tl::BL, j = e % Tl::BL;
      const acc_t p = f.valid(f.b.own0 + i, o0 + j, g)
                          ? exp(sh.es[i * Tl::LDF + j] * a.scale - sh.st[KEY ? j : i])
                          : acc_t(0);
      sh.ps[i * Tl::LDT + j] = from_acc<T>(p);
    }
    load_chunk<Tl>(sh.xs, z, o0, f.c0, a.Cv, g.L, g.HW, g.s_pos, g.vec);
    __syncthreads();
    product_pz<Pol, Tl>(acc, sh.ps, sh.xs, other_extent<Tl>(g.L, o0));
  }
  __syncthreads();
  store_strip<Pol, Tl, Tl::CT>(sh.es, acc);
  __syncthreads();
  const acc_t gm = a.gamma != nullptr ? *a.gamma : acc_t(1);
  store_tile<Tl>(sh.es, KEY ? gm : acc_t(1), final, a.part, a.out, KEY ? nullptr : a.y,
                 a.residual, gm, f.v_plane, f.b.own0, f.c0, a.Cv, g.L, g.HW, g.s_pos);
}

// cca_grad_kernel, KEY = false (dq): for a tile of pixels and a tile of Cqk,
//   dq(p, d) = sum_s dS(p, s) · k(s, d),  dS = P (gamma·<dO_p, v_s> - D_p) · scale
// over the pass's keys; dP = dO·V^T is its own contraction over all of Cv. KEY = true (dk): for
// a tile of keys, dk(s, d) = sum_p dS(p, s) · q(p, d) over the pixels of the line that see s.
// dS is rounded to the element type for its mma, as flash-attention does. Grid: x = (image,
// line, own tile), y = Cqk tile.
template <class Pol, class Tl, typename T, typename acc_t, bool KEY>
__global__ void __launch_bounds__(Tl::kThreads)
cca_grad_kernel(Args<T, acc_t> a, LinePass g, bool final) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const SharedTiles<T, acc_t, Tl> sh(smem_raw);
  const Frame<T, acc_t, KEY> f(a, g, Tl::BL, Tl::CT);
  const acc_t gm = a.gamma != nullptr ? *a.gamma : acc_t(1);
  typename Pol::Acc acc[Tl::CT / 16];
#pragma unroll
  for (int j = 0; j < Tl::CT / 16; ++j) Pol::zero(acc[j]);
  for (int o0 = 0; o0 < g.L; o0 += Tl::BL) {
    __syncthreads();
    load_stats<Tl>(sh.st, f.lse, f.dd, KEY ? o0 : f.b.own0, g);
    contract<Pol, Tl>(sh.es, f.x, f.b.own0, f.y, o0, a.D, g.L, g.HW, g.s_pos, g.vec, sh.xs, sh.ys);
    contract<Pol, Tl>(sh.fs, f.gx, f.b.own0, f.gy, o0, a.Cv, g.L, g.HW, g.s_pos, g.vec, sh.xs,
                      sh.ys);
    __syncthreads();
    for (int e = threadIdx.x; e < Tl::BL * Tl::BL; e += Tl::kThreads) {
      const int i = e / Tl::BL, j = e % Tl::BL;
      acc_t ds = acc_t(0);
      if (f.valid(f.b.own0 + i, o0 + j, g)) {
        const int u = KEY ? j : i;  // the pixel's statistics
        const acc_t p = exp(sh.es[i * Tl::LDF + j] * a.scale - sh.st[u]);
        ds = p * (gm * sh.fs[i * Tl::LDF + j] - sh.st[Tl::BL + u]) * a.scale;
      }
      sh.ps[i * Tl::LDT + j] = from_acc<T>(ds);
    }
    load_chunk<Tl>(sh.xs, f.y, o0, f.c0, a.D, g.L, g.HW, g.s_pos, g.vec);  // k or q, other side
    __syncthreads();
    product_pz<Pol, Tl>(acc, sh.ps, sh.xs, other_extent<Tl>(g.L, o0));
  }
  __syncthreads();
  store_strip<Pol, Tl, Tl::CT>(sh.es, acc);
  __syncthreads();
  store_tile<Tl>(sh.es, acc_t(1), final, a.part, a.out, static_cast<T*>(nullptr),
                 static_cast<const T*>(nullptr), acc_t(0), f.qk_plane, f.b.own0, f.c0, a.D, g.L,
                 g.HW, g.s_pos);
}

// cca_delta_kernel: one thread per pixel, D_u = gamma·<dO_u, O_u> over Cv (dO = gamma·grad_y for
// the residual op, gamma = 1 otherwise); gpart_u = <grad_y_u, O_u>, the pixel's share of
// grad_gamma (residual op only). Consecutive threads read consecutive pixels of each channel.
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

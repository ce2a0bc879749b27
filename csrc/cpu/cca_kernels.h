// Criss-cross attention CPU kernels (see cca.cpp for the algorithm). This file has no include
// guard and no includes on purpose: cca.cpp includes it once per instruction set, inside one
// namespace each (baseline, AVX2+FMA, AVX-512), and picks one at run time. The products of a
// row go to BLAS (gemm_rm in cca.cpp), those of a block of columns to lane_gemm, a register-tiled
// GEMM vectorised across the columns; the other loops (softmax, the two-op API) run along
// contiguous memory so that the compiler vectorises them. Summation orders are fixed by the code
// (no dependence on threads), so results are deterministic.

#include "vec_exp.h"

// acc[w] += sum_r x(r)[w] · y(r)[w] for r < count, four pairs of rows per sweep.
template <typename T, typename RowX, typename RowY>
inline void accumulate_products(T* __restrict acc, int64_t W, int64_t count, RowX x, RowY y) {
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) {
    const T *x0 = x(r), *x1 = x(r + 1), *x2 = x(r + 2), *x3 = x(r + 3);
    const T *y0 = y(r), *y1 = y(r + 1), *y2 = y(r + 2), *y3 = y(r + 3);
    for (int64_t w = 0; w < W; ++w)
      acc[w] += (x0[w] * y0[w] + x1[w] * y1[w]) + (x2[w] * y2[w] + x3[w] * y3[w]);
  }
  for (; r < count; ++r) {
    const T *xr = x(r), *yr = y(r);
    for (int64_t w = 0; w < W; ++w) acc[w] += xr[w] * yr[w];
  }
}

// ---- fused forward and backward --------------------------------------------------------------
// Two passes over the lines of every image, the columns first, then the rows; each works on a
// whole line at a time, with the softmax between its products, and no energy tensor in memory.
// q, k, v, the incoming gradient G and every output are NCHW.
//
// Rows: a row of any of them is a (C x W) matrix with leading dimension H·W, so each product of
// a row is one BLAS GEMM (gemm_rm in cca.cpp) on the tensors as they are:
//   E = scale·Q_rᵀ K_r,  O_r += V_r Pᵀ,  dP = G_rᵀ V_r,  dQ_r += K_r dSᵀ,  dK_r += Q_r dS,
//   dV_r += G_r P.
// Columns: a column is strided in NCHW, but adjacent columns are adjacent in memory. The column
// pass takes L = kLanes of them at once, one vector register wide (lane l is column b·L + l),
// and runs the same products as GEMMs whose scalar multiply-add is a vector one across the
// block's columns (lane_gemm): no transposes. The operands are copied into a lane layout first
// (pack_lanes: a block's (channel, row) vectors contiguous, zero past W), a chunk of channels at
// a time, reading whole rows of the NCHW tensors; the results are copied back the same way. In a
// column the self key (i, i) is masked: that pixel is already a key of its row.

#pragma GCC push_options
// Vector multiply-adds become FMA instructions: the extension is compiled as ISO C++, under
// which GCC does not contract a·b + c by default (the rest of this file keeps that).
#pragma GCC optimize("fp-contract=fast")

template <typename T>
struct Lanes {
  static constexpr int64_t n = kVectorBytes / sizeof(T);
  typedef T V __attribute__((vector_size(kVectorBytes)));
};

// always_inline: also into the functions outside this fp-contract region, which GCC would not
// otherwise inline across the differing options.
template <typename T>
__attribute__((always_inline)) inline typename Lanes<T>::V load_lanes(const T* p) {
  typename Lanes<T>::V x;
  __builtin_memcpy(&x, p, sizeof x);
  return x;
}

template <typename T>
__attribute__((always_inline)) inline void store_lanes(T* p, typename Lanes<T>::V x) {
  __builtin_memcpy(p, &x, sizeof x);
}

// The register tile of lane_gemm: kTileI x kTileK accumulators, the kTileK vectors of B they
// share, and one vector of A at a time: 12 + 2 + 1 of 16 registers, 24 + 3 + 1 of 32. B comes
// from L2 (the packed chunk is larger than L1) and A from L1, so the tile is tall: each B vector
// feeds kTileI multiply-adds, which keeps L2 under 11 bytes per FMA cycle at 16 registers.
constexpr int kTileI = kVectorRegisters >= 32 ? 8 : 6;
constexpr int kTileK = kVectorRegisters >= 32 ? 3 : 2;

// One tile of lane_gemm from packed operands: ap holds A's kTileI rows interleaved per r
// (ap[(r·kTileI + i)·L]), bp B's kTileK rows (bp[(r·kTileK + k)·L]), zero past the matrix's
// edge; only the first mi x mk results are stored.
template <typename T>
inline void lane_tile(int64_t R, T alpha, const T* ap, const T* bp, bool accumulate, T* c,
                      int64_t sci, int64_t sck, int64_t mi, int64_t mk) {
  using V = typename Lanes<T>::V;
  constexpr int64_t L = Lanes<T>::n;
  V acc[kTileI][kTileK];
  for (int i = 0; i < kTileI; ++i)
    for (int k = 0; k < kTileK; ++k) acc[i][k] = V{};
  for (int64_t r = 0; r < R; ++r) {
    V y[kTileK];
    for (int k = 0; k < kTileK; ++k) y[k] = load_lanes(bp + (r * kTileK + k) * L);
    for (int i = 0; i < kTileI; ++i) {
      V x = load_lanes(ap + (r * kTileI + i) * L);
      // x in a register, loaded once: left to itself GCC folds the load into each of the
      // kTileK multiply-adds, and the loads, not the FMAs, then set the pace.
#if defined(__x86_64__)
      asm("" : "+x"(x));
#endif
      for (int k = 0; k < kTileK; ++k) acc[i][k] += x * y[k];
    }
  }
  for (int i = 0; i < kTileI; ++i)
    for (int k = 0; k < kTileK; ++k)
      if (i < mi && k < mk) {
        T* o = c + i * sci + k * sck;
        V res = acc[i][k] * alpha;
        if (accumulate) res += load_lanes(o);
        store_lanes(o, res);
      }
}

// The chunks of r in lane_gemm: equal, each with a packed B (K vectors per r, K padded to a
// multiple of kTileK) of at most half a core's L2.
template <typename T>
int64_t lane_chunk(int64_t K, int64_t R) {
  constexpr int64_t kChunkBytes = 256 * 1024;
  const int64_t KT = (K + kTileK - 1) / kTileK;
  const int64_t most = std::max<int64_t>(8, kChunkBytes / (KT * kTileK * kVectorBytes));
  const int64_t n_chunks = std::max<int64_t>(1, (R + most - 1) / most);
  return std::max<int64_t>(1, (R + n_chunks - 1) / n_chunks);
}

// Elements of B packed for lane_gemm_packed.
template <typename T>
int64_t packed_size(int64_t K, int64_t R) {
  return (K + kTileK - 1) / kTileK * kTileK * std::max<int64_t>(R, 1) * Lanes<T>::n;
}

// B(k, r) = b[k·sbk + r·sbr] packed as lane_gemm_packed reads it: per chunk of r, per tile of
// kTileK rows, per r, the tile's vectors side by side (zero past K).
template <typename T>
void pack_b(int64_t K, int64_t R, const T* b, int64_t sbk, int64_t sbr, T* bp) {
  using V = typename Lanes<T>::V;
  constexpr int64_t L = Lanes<T>::n;
  const int64_t KT = (K + kTileK - 1) / kTileK, chunk = lane_chunk<T>(K, R);
  for (int64_t r0 = 0; r0 < R; r0 += chunk) {
    const int64_t rc = std::min(R, r0 + chunk) - r0;
    T* dst = bp + KT * kTileK * r0 * L;
    for (int64_t kt = 0; kt < KT; ++kt)
      for (int64_t r = 0; r < rc; ++r)
        for (int64_t kk = 0; kk < kTileK; ++kk) {
          const int64_t k = kt * kTileK + kk;
          store_lanes(dst + ((kt * rc + r) * kTileK + kk) * L,
                      k < K ? load_lanes(b + k * sbk + (r0 + r) * sbr) : V{});
        }
  }
}

// C(i, k) = alpha·sum_{r < R} A(i, r)·B(k, r), plus C(i, k) if accumulate, for i < M, k < K,
// each element a vector of kLanes columns: A(i, r) at a + i·sai + r·sar, B packed by pack_b,
// C(i, k) at c + i·sci + k·sck. As in a BLAS GEMM both operands are packed into the order the
// tiles read them: each chunk of B once (pack_b), each row of tiles of A once per chunk, which
// every tile of the row then rereads from L1 while B streams from L2. The order of the sums is
// fixed by the shapes alone.
template <typename T>
void lane_gemm_packed(int64_t M, int64_t K, int64_t R, T alpha, const T* a, int64_t sai,
                      int64_t sar, const T* bp, bool accumulate, T* c, int64_t sci, int64_t sck) {
  using V = typename Lanes<T>::V;
  constexpr int64_t L = Lanes<T>::n;
  if (M == 0 || K == 0) return;
  const int64_t KT = (K + kTileK - 1) / kTileK, chunk = lane_chunk<T>(K, R);
  thread_local std::vector<T> apack;
  apack.resize(kTileI * chunk * L);
  // R = 0 still runs once: C = 0 (or is kept, accumulating).
  for (int64_t r0 = 0; r0 < std::max<int64_t>(R, 1); r0 += chunk) {
    const int64_t rc = std::max<int64_t>(std::min(R, r0 + chunk) - r0, 0);
    const bool add = accumulate || r0 > 0;
    const T* bc = bp + KT * kTileK * r0 * L;
    for (int64_t i0 = 0; i0 < M; i0 += kTileI) {
      const int64_t mi = std::min<int64_t>(kTileI, M - i0);
      T* ap = apack.data();
      for (int64_t r = 0; r < rc; ++r)
        for (int64_t ii = 0; ii < kTileI; ++ii)
          store_lanes(ap + (r * kTileI + ii) * L,
                      ii < mi ? load_lanes(a + (i0 + ii) * sai + (r0 + r) * sar) : V{});
      for (int64_t kt = 0; kt < KT; ++kt)
        lane_tile<T>(rc, alpha, ap, bc + kt * rc * kTileK * L, add,
                     c + i0 * sci + kt * kTileK * sck, sci, sck, mi,
                     std::min<int64_t>(kTileK, K - kt * kTileK));
    }
  }
}

// lane_gemm_packed with B(k, r) at b + k·sbk + r·sbr, packed here.
template <typename T>
void lane_gemm(int64_t M, int64_t K, int64_t R, T alpha, const T* a, int64_t sai, int64_t sar,
               const T* b, int64_t sbk, int64_t sbr, bool accumulate, T* c, int64_t sci,
               int64_t sck) {
  thread_local std::vector<T> bpack;
  bpack.resize(packed_size<T>(K, R));
  pack_b(K, R, b, sbk, sbr, bpack.data());
  lane_gemm_packed(M, K, R, alpha, a, sai, sar, bpack.data(), accumulate, c, sci, sck);
}

// P = exp(scale·<q_h, k_j> - x_h) of one block of columns, from its packed q, k (Cqk x H
// vectors): with x the columns' own maxima (lse = nullptr: they are computed and stored in
// m_out, with the sums in s_out), or x = lse given (the backward). The self key gets weight 0; with
// H = 1 it is the only key, and m = -inf, s = 0. P: H x H vectors.
template <typename T>
void column_weights(const T* qp, const T* kp, int64_t Cqk, int64_t H, T scale, const T* lse,
                    T* m_out, T* s_out, T* P) {
  using V = typename Lanes<T>::V;
  constexpr int64_t L = Lanes<T>::n;
  const int64_t HL = H * L;
  lane_gemm(H, H, Cqk, scale, qp, L, HL, kp, L, HL, false, P, HL, L);
  for (int64_t h = 0; h < H; ++h) {
    T* e = P + h * HL;
    V x;
    if (lse != nullptr) {
      x = load_lanes(lse + h * L);
    } else {
      x = V{} - std::numeric_limits<T>::infinity();
      for (int64_t j = 0; j < H; ++j)
        if (j != h) {
          const V y = load_lanes(e + j * L);
          x = y > x ? y : x;
        }
    }
    if (H > 1 || lse != nullptr) {
      for (int64_t j = 0; j < H; ++j) store_lanes(e + j * L, load_lanes(e + j * L) - x);
      exp_inplace(e, HL);
    }
    store_lanes(e + h * L, V{});
    if (lse == nullptr) {
      V sum = V{};
      for (int64_t j = 0; j < H; ++j) sum += load_lanes(e + j * L);
      store_lanes(m_out + h * L, x);
      store_lanes(s_out + h * L, sum);
    }
  }
}

#pragma GCC pop_options

// ---- the lane layout --------------------------------------------------------------------------
// The column pass works on packed copies in which a block of L = kLanes columns has its
// (channel, row) vectors contiguous. The columns of all images are numbered as one sequence,
// g = n·W + w (column w of image n is lane g % L of block g / L), so a block may hold the last
// columns of one image and the first of the next: the lanes never interact, and only the last
// block is padded (with zeros). Per image blocks would pad every image: at W = 97 in AVX-512
// that is 7 blocks for 6 columns' worth of 16 each, against 13 for both images of N = 2.
// Packing reads whole rows of the NCHW tensor and writes sequential streams, one per block;
// reading a block's vectors in place instead (L of W columns per row, rows W apart) kept the
// FMAs waiting on memory. In chunks of kChannelChunk channels for v, the gradient and the
// outputs, so the copies stay small.
constexpr int64_t kChannelChunk = 64;

template <typename T>
constexpr int64_t lane_blocks(int64_t N, int64_t W) {
  return (N * W + Lanes<T>::n - 1) / Lanes<T>::n;
}

// Pack (kPack) or unpack between the tensor and the lane layout; one loop for both directions.
template <bool kPack, typename T>
void copy_lanes(T* nchw, int64_t N, int64_t Ct, int64_t c0, int64_t C, int64_t H, int64_t W,
                T* lanes) {
  constexpr int64_t L = Lanes<T>::n;
  const int64_t HW = H * W, columns = N * W;
  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / C, c = t % C;
      T* plane = nchw + (n * Ct + c0 + c) * HW;
      for (int64_t j = 0; j < H; ++j)
        for (int64_t w = 0, nl; w < W; w += nl) {  // pieces of the row, one per block
          const int64_t g = n * W + w, l = g % L;
          nl = std::min(L - l, W - w);
          T *lane = lanes + ((g / L * C + c) * H + j) * L + l, *row = plane + j * W + w;
          if (nl == L && kPack)  // whole vectors (std::copy would call memmove per piece)
            store_lanes(lane, load_lanes(row));
          else if (nl == L)
            store_lanes(row, load_lanes(lane));
          else if (kPack)  // the other lanes belong to the neighbouring image, or are padding
            std::fill(std::copy(row, row + nl, lane), lane + (g + nl == columns ? L - l : nl),
                      T(0));
          else
            std::copy(lane, lane + nl, row);
        }
    }
  });
}

// dst[g / L][c][j][g % L] = src[n][c0 + c][j][w] with g = n·W + w, for channels [c0, c0 + C) of
// an (N, Csrc, H, W) tensor; 0 past the last column (g >= N·W).
template <typename T>
void pack_lanes(const T* src, int64_t N, int64_t Csrc, int64_t c0, int64_t C, int64_t H,
                int64_t W, T* dst) {
  copy_lanes<true>(const_cast<T*>(src), N, Csrc, c0, C, H, W, dst);  // src is only read
}

// The inverse: dst[n][c0 + c][j][w] = src[g / L][c][j][g % L].
template <typename T>
void unpack_lanes(const T* src, int64_t N, int64_t Cdst, int64_t c0, int64_t C, int64_t H,
                  int64_t W, T* dst) {
  copy_lanes<false>(dst, N, Cdst, c0, C, H, W, const_cast<T*>(src));  // src is only read
}

// Work on the indices [0, n) by every thread: fn(claim) runs once per thread, and claim() hands
// out the next index not yet taken (n and above once all are). Indices go to threads as they come
// free, rather than in equal ranges up front: on a shared machine one core often runs slower, and
// with equal ranges the other waited for it at the end of every pass. Each index runs once and
// writes its own outputs, so results do not depend on which thread took it.
template <typename Fn>
void parallel_dynamic(int64_t n, const Fn& fn) {
  std::atomic<int64_t> next{0};
  const auto claim = [&next] { return next.fetch_add(1, std::memory_order_relaxed); };
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1,
                   [&](int64_t, int64_t) { fn(claim); });
}

// Runs fn(block, m0, m1) for every block and, so that two threads have work at every width, for
// two halves [m0, m1) of the M rows of its product (split at a multiple of kTileI). The halves
// write disjoint rows: the results do not depend on the split.
template <typename Fn>
void for_block_halves(int64_t blocks, int64_t M, Fn fn) {
  const int64_t half = std::min(M, (M / 2 + kTileI - 1) / kTileI * kTileI);
  parallel_dynamic(2 * blocks, [&](const auto& claim) {
    for (int64_t t; (t = claim()) < 2 * blocks;) {
      const int64_t m0 = t % 2 ? half : 0, m1 = t % 2 ? M : half;
      if (m0 < m1) fn(t / 2, m0, m1);
    }
  });
}

// Brings the C runs of W elements at p, p + HW, p + 2·HW, ... (one image row of an NCHW tensor)
// into cache, rw = 1 for a row that will be written. A row's runs are a few cache lines each,
// pages apart, which the hardware prefetchers do not follow; the BLAS calls of the row pass then
// wait on memory one run at a time. These prefetches, issued back to back, overlap the misses
// (the backward's row pass at (2, 64, 512, 97, 97) on an AVX-512 Zen 4: 49 -> 39 ms).
template <int rw, typename T>
void prefetch_row(const T* p, int64_t C, int64_t HW, int64_t W) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t c = 0; c < C; ++c, p += HW) {
    for (int64_t w = 0; w < W; w += kLine) __builtin_prefetch(p + w, rw, 2);
    __builtin_prefetch(p + W - 1, rw, 2);
  }
}

// E = scale·Q_rᵀ K_r for image row (n, h): W x W.
template <typename T>
void row_energies(const T* q, const T* k, int64_t Cqk, int64_t HW, int64_t W, T scale, T* E) {
  gemm_rm(true, false, W, W, Cqk, scale, q, HW, k, HW, T(0), E, W);
}

// The forward: (A) every block of columns, with the columns' own softmax statistics (mcol, scol)
// and the unnormalised column part written into out; (B) every row, which merges its statistics
// with the column's (log-sum-exp), rescales the column part in out and adds its own with one
// GEMM (beta = 1), with the residual epilogue y = gamma·out + residual and lse. Each energy is
// computed once, and each pass writes only the pixels of its own lines.
template <typename T>
void forward_kernel(const T* q, const T* k, const T* v, T* mcol, T* scol, T* out, T* lse,
                    int64_t N, int64_t Cqk, int64_t Cv, int64_t H, int64_t W, T scale,
                    const T* residual = nullptr, T* y = nullptr, T gamma = T(0)) {
  constexpr int64_t L = Lanes<T>::n;
  const int64_t HW = H * W, HL = H * L, blocks = lane_blocks<T>(N, W);
  const int64_t psize = packed_size<T>(H, H), cc_max = std::min(kChannelChunk, Cv);
  {
    auto qp = scratch<T>(blocks * Cqk * HL), kp = scratch<T>(blocks * Cqk * HL);
    auto ms = scratch<T>(2 * blocks * HL), Pp = scratch<T>(blocks * psize);
    auto vp = scratch<T>(blocks * cc_max * HL), op = scratch<T>(blocks * cc_max * HL);
    pack_lanes(q, N, Cqk, 0, Cqk, H, W, qp.get());
    pack_lanes(k, N, Cqk, 0, Cqk, H, W, kp.get());
    parallel_dynamic(blocks, [&](const auto& claim) {
      auto P = scratch<T>(H * HL);
      for (int64_t b; (b = claim()) < blocks;) {
        column_weights(qp.get() + b * Cqk * HL, kp.get() + b * Cqk * HL, Cqk, H, scale,
                       static_cast<const T*>(nullptr), ms.get() + b * HL,
                       ms.get() + (blocks + b) * HL, P.get());
        pack_b(H, H, P.get(), HL, L, Pp.get() + b * psize);  // B(h, j) of V Pᵀ
      }
    });
    unpack_lanes(ms.get(), N, 1, 0, 1, H, W, mcol);
    unpack_lanes(ms.get() + blocks * HL, N, 1, 0, 1, H, W, scol);
    for (int64_t c0 = 0; c0 < Cv; c0 += kChannelChunk) {
      const int64_t cc = std::min(kChannelChunk, Cv - c0);
      pack_lanes(v, N, Cv, c0, cc, H, W, vp.get());
      for_block_halves(blocks, cc, [&](int64_t b, int64_t m0, int64_t m1) {
        lane_gemm_packed(m1 - m0, H, H, T(1), vp.get() + (b * cc + m0) * HL, HL, L,
                         Pp.get() + b * psize, false, op.get() + (b * cc + m0) * HL, HL, L);
      });
      unpack_lanes(op.get(), N, Cv, c0, cc, H, W, out);
    }
  }
  parallel_dynamic(N * H, [&](const auto& claim) {
    std::vector<T> E(W * W), f(W);
    for (int64_t nh; (nh = claim()) < N * H;) {
      const int64_t n = nh / H, h = nh % H, p0 = n * HW + h * W;
      prefetch_row<0>(v + n * Cv * HW + h * W, Cv, HW, W);
      prefetch_row<1>(out + n * Cv * HW + h * W, Cv, HW, W);
      row_energies(q + n * Cqk * HW + h * W, k + n * Cqk * HW + h * W, Cqk, HW, W, scale,
                   E.data());
      for (int64_t w = 0; w < W; ++w) {
        // The row's own statistics, merged with the column's: weights exp(e - M) / Z.
        T* e = E.data() + w * W;
        const T mr = *std::max_element(e, e + W);
        for (int64_t z = 0; z < W; ++z) e[z] -= mr;
        exp_inplace(e, W);
        T sr = 0;
        for (int64_t z = 0; z < W; ++z) sr += e[z];
        const T mc = mcol[p0 + w], sc = scol[p0 + w];
        const T M = std::max(mr, mc);
        const T ar = std::exp(mr - M), ac = sc > T(0) ? std::exp(mc - M) : T(0);
        const T Z = ar * sr + ac * sc;
        lse[p0 + w] = M + std::log(Z);
        for (int64_t z = 0; z < W; ++z) e[z] *= ar / Z;
        f[w] = ac / Z;
      }
      const int64_t base = n * Cv * HW + h * W;
      T* o = out + base;
      for (int64_t c = 0; c < Cv; ++c)
        for (int64_t w = 0; w < W; ++w) o[c * HW + w] *= f[w];
      gemm_rm(false, true, Cv, W, W, T(1), v + base, HW, E.data(), W, T(1), o, HW);
      if (y != nullptr)
        for (int64_t c = 0; c < Cv; ++c) {
          const T* x = residual + base + c * HW;
          T* yc = y + base + c * HW;
          for (int64_t w = 0; w < W; ++w) yc[w] = gamma * o[c * HW + w] + x[w];
        }
    }
  });
}

// D_u = <go_u, out_u> per pixel, from NCHW go and out: (N, H, W).
template <typename T>
void pixel_dots(const T* go, const T* out, T* D, int64_t N, int64_t C, int64_t H, int64_t W) {
  const int64_t HW = H * W;
  parallel_dynamic(N * H, [&](const auto& claim) {
    for (int64_t nh; (nh = claim()) < N * H;) {
      const int64_t n = nh / H, h = nh % H;
      T* d = D + n * HW + h * W;
      std::fill(d, d + W, T(0));
      accumulate_products(d, W, C, [&](int64_t c) { return go + (n * C + c) * HW + h * W; },
                          [&](int64_t c) { return out + (n * C + c) * HW + h * W; });
    }
  });
}

// The backward, the same two passes: the weights are recomputed from lse, and dS = P (dP - D)
// ·scale·gamma, where gamma scales the incoming gradient G (cca_residual_backward: G is grad_y and
// the gradient of out is gamma·grad_y) and D holds <G_u, out_u> before that factor. The column
// pass writes gq, gk, gv; the row pass adds to them. No two tasks of a pass touch the same pixel
// and the order of the passes is fixed, so the result does not depend on the thread count.
template <typename T>
void backward_kernel(const T* q, const T* k, const T* v, const T* go, const T* lse, const T* D,
                     T* gq, T* gk, T* gv, int64_t N, int64_t Cqk, int64_t Cv, int64_t H,
                     int64_t W, T scale, T gamma) {
  constexpr int64_t L = Lanes<T>::n;
  const int64_t HW = H * W, HL = H * L, blocks = lane_blocks<T>(N, W);
  const int64_t psize = packed_size<T>(H, H), cc_max = std::min(kChannelChunk, Cv);
  const T sg = scale * gamma;
  {
    auto qp = scratch<T>(blocks * Cqk * HL), kp = scratch<T>(blocks * Cqk * HL);
    auto st = scratch<T>(2 * blocks * HL);  // lse, then D
    auto P = scratch<T>(blocks * H * HL), PTp = scratch<T>(blocks * psize);
    auto dS = scratch<T>(blocks * H * HL);  // dP, then dS
    auto vp = scratch<T>(blocks * cc_max * HL), gp = scratch<T>(blocks * cc_max * HL);
    auto op = scratch<T>(blocks * cc_max * HL);
    auto gqp = scratch<T>(blocks * Cqk * HL), gkp = scratch<T>(blocks * Cqk * HL);
    pack_lanes(q, N, Cqk, 0, Cqk, H, W, qp.get());
    pack_lanes(k, N, Cqk, 0, Cqk, H, W, kp.get());
    pack_lanes(lse, N, 1, 0, 1, H, W, st.get());
    pack_lanes(D, N, 1, 0, 1, H, W, st.get() + blocks * HL);
    parallel_dynamic(blocks, [&](const auto& claim) {
      for (int64_t b; (b = claim()) < blocks;) {
        T* Pb = P.get() + b * H * HL;
        column_weights(qp.get() + b * Cqk * HL, kp.get() + b * Cqk * HL, Cqk, H, scale,
                       static_cast<const T*>(st.get() + b * HL), static_cast<T*>(nullptr),
                       static_cast<T*>(nullptr), Pb);
        pack_b(H, H, Pb, L, HL, PTp.get() + b * psize);  // B(j, h) of G P
      }
    });
    // dP is summed over the channel chunks below; with no channel (Cv = 0) it is 0.
    if (Cv == 0) std::fill(dS.get(), dS.get() + blocks * H * HL, T(0));
    for (int64_t c0 = 0; c0 < Cv; c0 += kChannelChunk) {
      const int64_t cc = std::min(kChannelChunk, Cv - c0);
      pack_lanes(v, N, Cv, c0, cc, H, W, vp.get());
      pack_lanes(go, N, Cv, c0, cc, H, W, gp.get());
      // dP(h, j) += sum_c G(c, h) V(c, j) over the chunk's channels, rows h split in halves.
      for_block_halves(blocks, H, [&](int64_t b, int64_t m0, int64_t m1) {
        lane_gemm(m1 - m0, H, cc, T(1), gp.get() + b * cc * HL + m0 * L, L, HL,
                  vp.get() + b * cc * HL, L, HL, c0 > 0, dS.get() + b * H * HL + m0 * HL, HL, L);
      });
      // gv(c, j) = gamma·sum_h G(c, h) P(h, j).
      for_block_halves(blocks, cc, [&](int64_t b, int64_t m0, int64_t m1) {
        lane_gemm_packed(m1 - m0, H, H, gamma, gp.get() + (b * cc + m0) * HL, HL, L,
                         PTp.get() + b * psize, false, op.get() + (b * cc + m0) * HL, HL, L);
      });
      unpack_lanes(op.get(), N, Cv, c0, cc, H, W, gv);
    }
    // dS = P (dP - D)·scale·gamma, then gq(c, h) = sum_j K(c, j) dS(h, j) and
    // gk(c, j) = sum_h Q(c, h) dS(h, j).
    using V = typename Lanes<T>::V;
    parallel_dynamic(blocks, [&](const auto& claim) {
      for (int64_t b; (b = claim()) < blocks;) {
        T *Pb = P.get() + b * H * HL, *dSb = dS.get() + b * H * HL;
        for (int64_t h = 0; h < H; ++h) {
          const V d = load_lanes(st.get() + (blocks + b) * HL + h * L);
          for (int64_t j = 0; j < H; ++j) {
            T* ds = dSb + h * HL + j * L;
            store_lanes(ds, load_lanes(Pb + h * HL + j * L) * (load_lanes(ds) - d) * sg);
          }
        }
        const T *qb = qp.get() + b * Cqk * HL, *kb = kp.get() + b * Cqk * HL;
        lane_gemm(Cqk, H, H, T(1), kb, HL, L, dSb, HL, L, false, gqp.get() + b * Cqk * HL, HL,
                  L);
        lane_gemm(Cqk, H, H, T(1), qb, HL, L, dSb, L, HL, false, gkp.get() + b * Cqk * HL, HL,
                  L);
      }
    });
    unpack_lanes(gqp.get(), N, Cqk, 0, Cqk, H, W, gq);
    unpack_lanes(gkp.get(), N, Cqk, 0, Cqk, H, W, gk);
  }
  parallel_dynamic(N * H, [&](const auto& claim) {
    std::vector<T> P(W * W), dS(W * W);
    for (int64_t nh; (nh = claim()) < N * H;) {
      const int64_t n = nh / H, h = nh % H, p0 = n * HW + h * W;
      const int64_t iq = n * Cqk * HW + h * W, iv = n * Cv * HW + h * W;
      prefetch_row<0>(go + iv, Cv, HW, W);
      prefetch_row<0>(v + iv, Cv, HW, W);
      row_energies(q + iq, k + iq, Cqk, HW, W, scale, P.data());
      for (int64_t w = 0; w < W; ++w) {
        T* p = P.data() + w * W;
        for (int64_t z = 0; z < W; ++z) p[z] -= lse[p0 + w];
        exp_inplace(p, W);
      }
      gemm_rm(true, false, W, W, Cv, T(1), go + iv, HW, v + iv, HW, T(0), dS.data(), W);
      for (int64_t w = 0; w < W; ++w)
        for (int64_t z = 0; z < W; ++z)
          dS[w * W + z] = P[w * W + z] * (dS[w * W + z] - D[p0 + w]) * sg;
      prefetch_row<1>(gv + iv, Cv, HW, W);
      gemm_rm(false, true, Cqk, W, W, T(1), k + iq, HW, dS.data(), W, T(1), gq + iq, HW);
      gemm_rm(false, false, Cqk, W, W, T(1), q + iq, HW, dS.data(), W, T(1), gk + iq, HW);
      gemm_rm(false, false, Cv, W, W, gamma, go + iv, HW, P.data(), W, T(1), gv + iv, HW);
    }
  });
}

// ---- the two-op API -----------------------------------------------------------------------
// energy (N, H+W-1, H, W): channel z < W is the row key (h, z); channel W + i is the column key
// (j, w) with j = i if i < h else i + 1. All four kernels work per image row (n, r) and write
// only row r of their outputs.

inline int64_t col_channel(int64_t W, int64_t j, int64_t h) {  // channel of key (j, w) at row h
  return W + (j < h ? j : j - 1);
}

template <typename T>
void weight_kernel(const T* q, const T* k, T* e, int64_t N, int64_t C, int64_t H, int64_t W) {
  const int64_t HW = H * W, S = H + W - 1;
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nh = begin; nh < end; ++nh) {
      const int64_t n = nh / H, h = nh % H;
      const T* qn = q + n * C * HW;
      const T* kn = k + n * C * HW;
      T* en = e + n * S * HW;
      for (int64_t s = 0; s < S; ++s) std::fill(en + s * HW + h * W, en + s * HW + h * W + W, T(0));
      for (int64_t c = 0; c < C; ++c) {
        const T* qrow = qn + c * HW + h * W;
        for (int64_t z = 0; z < W; ++z) {
          const T kz = kn[c * HW + h * W + z];
          T* erow = en + z * HW + h * W;
          for (int64_t w = 0; w < W; ++w) erow[w] += qrow[w] * kz;
        }
        for (int64_t j = 0; j < H; ++j) {
          if (j == h) continue;
          const T* krow = kn + c * HW + j * W;
          T* erow = en + col_channel(W, j, h) * HW + h * W;
          for (int64_t w = 0; w < W; ++w) erow[w] += qrow[w] * krow[w];
        }
      }
    }
  });
}

template <typename T>
void weight_backward_kernel(const T* g, const T* q, const T* k, T* gq, T* gk, int64_t N,
                            int64_t C, int64_t H, int64_t W) {
  const int64_t HW = H * W, S = H + W - 1;
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nr = begin; nr < end; ++nr) {
      const int64_t n = nr / H, r = nr % H;
      const T* qn = q + n * C * HW;
      const T* kn = k + n * C * HW;
      const T* gn = g + n * S * HW;
      for (int64_t c = 0; c < C; ++c) {
        T* gqrow = gq + n * C * HW + c * HW + r * W;
        T* gkrow = gk + n * C * HW + c * HW + r * W;
        const T* qrow = qn + c * HW + r * W;
        std::fill(gqrow, gqrow + W, T(0));
        std::fill(gkrow, gkrow + W, T(0));
        // Pixels of row r: their row keys (r, z) and column keys (j, w).
        for (int64_t z = 0; z < W; ++z) {
          const T* grow = gn + z * HW + r * W;
          const T kz = kn[c * HW + r * W + z];
          T s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t w = 0; w < W; ++w) {
            gqrow[w] += grow[w] * kz;
            s += grow[w] * qrow[w];
          }
          gkrow[z] += s;  // key (r, z) seen as a row key by the pixels of row r
        }
        for (int64_t j = 0; j < H; ++j) {
          if (j == r) continue;
          // gq: pixels (r, w) with column key (j, w).
          const T* grow = gn + col_channel(W, j, r) * HW + r * W;
          const T* krow = kn + c * HW + j * W;
          for (int64_t w = 0; w < W; ++w) gqrow[w] += grow[w] * krow[w];
          // gk: key (r, w) seen as a column key by the pixel (j, w).
          const T* grow2 = gn + col_channel(W, r, j) * HW + j * W;
          const T* qrow2 = qn + c * HW + j * W;
          for (int64_t w = 0; w < W; ++w) gkrow[w] += grow2[w] * qrow2[w];
        }
      }
    }
  });
}

template <typename T>
void map_kernel(const T* a, const T* v, T* out, int64_t N, int64_t C, int64_t H, int64_t W) {
  const int64_t HW = H * W, S = H + W - 1;
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nh = begin; nh < end; ++nh) {
      const int64_t n = nh / H, h = nh % H;
      const T* an = a + n * S * HW;
      for (int64_t c = 0; c < C; ++c) {
        const T* vc = v + n * C * HW + c * HW;
        T* orow = out + n * C * HW + c * HW + h * W;
        std::fill(orow, orow + W, T(0));
        for (int64_t z = 0; z < W; ++z) {
          const T vz = vc[h * W + z];
          const T* arow = an + z * HW + h * W;
          for (int64_t w = 0; w < W; ++w) orow[w] += arow[w] * vz;
        }
        for (int64_t j = 0; j < H; ++j) {
          if (j == h) continue;
          const T* vrow = vc + j * W;
          const T* arow = an + col_channel(W, j, h) * HW + h * W;
          for (int64_t w = 0; w < W; ++w) orow[w] += arow[w] * vrow[w];
        }
      }
    }
  });
}

template <typename T>
void map_backward_kernel(const T* go, const T* a, const T* v, T* ga, T* gv, int64_t N, int64_t C,
                         int64_t H, int64_t W) {
  const int64_t HW = H * W, S = H + W - 1;
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nr = begin; nr < end; ++nr) {
      const int64_t n = nr / H, r = nr % H;
      const T* an = a + n * S * HW;
      T* gan = ga + n * S * HW;
      for (int64_t s = 0; s < S; ++s) std::fill(gan + s * HW + r * W, gan + s * HW + r * W + W, T(0));
      for (int64_t c = 0; c < C; ++c) {
        const T* vc = v + n * C * HW + c * HW;
        const T* gorow = go + n * C * HW + c * HW + r * W;
        T* gvrow = gv + n * C * HW + c * HW + r * W;
        std::fill(gvrow, gvrow + W, T(0));
        for (int64_t z = 0; z < W; ++z) {
          const T vz = vc[r * W + z];
          const T* arow = an + z * HW + r * W;
          T* garow = gan + z * HW + r * W;
          T s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t w = 0; w < W; ++w) {
            garow[w] += gorow[w] * vz;
            s += arow[w] * gorow[w];
          }
          gvrow[z] += s;
        }
        for (int64_t j = 0; j < H; ++j) {
          if (j == r) continue;
          // grad attn at pixels (r, w), column key (j, w).
          const T* vrow = vc + j * W;
          T* garow = gan + col_channel(W, j, r) * HW + r * W;
          for (int64_t w = 0; w < W; ++w) garow[w] += gorow[w] * vrow[w];
          // grad v at (r, w) from the pixel (j, w), which sees it as a column key.
          const T* arow = an + col_channel(W, r, j) * HW + j * W;
          const T* gorow2 = go + n * C * HW + c * HW + j * W;
          for (int64_t w = 0; w < W; ++w) gvrow[w] += arow[w] * gorow2[w];
        }
      }
    }
  });
}


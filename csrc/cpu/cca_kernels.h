// Criss-cross attention CPU kernels (see cca.cpp for the algorithm). This file has no include
// guard and no includes on purpose: cca.cpp includes it once per instruction set, inside one
// namespace each (baseline, AVX2+FMA, AVX-512), and picks one at run time. The loops of its own
// (softmax, transposes, the two-op API) run along contiguous memory so that the compiler
// vectorises them; the products go to BLAS (gemm_rm in cca.cpp). Summation orders are fixed by
// the code (no dependence on threads), so results are deterministic.

#include "vec_exp.h"

// acc[w] += sum_r coef(r) · row(r)[w] for r < count. Four rows per sweep over acc: one load and
// one store of acc per four FMAs (the loops are bound by loads and stores, not by FMAs). acc never
// overlaps the rows read (__restrict: no run-time alias checks before the vector loop).
template <typename T, typename Row, typename Coef>
inline void accumulate_rows(T* __restrict acc, int64_t W, int64_t count, Row row, Coef coef) {
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) {
    const T *x0 = row(r), *x1 = row(r + 1), *x2 = row(r + 2), *x3 = row(r + 3);
    const T a0 = coef(r), a1 = coef(r + 1), a2 = coef(r + 2), a3 = coef(r + 3);
    for (int64_t w = 0; w < W; ++w) acc[w] += (a0 * x0[w] + a1 * x1[w]) + (a2 * x2[w] + a3 * x3[w]);
  }
  for (; r < count; ++r) {
    const T* x = row(r);
    const T a = coef(r);
    for (int64_t w = 0; w < W; ++w) acc[w] += a * x[w];
  }
}

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

// ---- fused forward and backward: GEMMs over lines -----------------------------------------
// A line is one row (L = W pixels) or one column (L = H pixels) of an image. Every product of
// the attention over a line is one GEMM, with the softmax between them along the contiguous rows
// of the line's L x L energy block:
//   E = scale·Q_l K_lᵀ,  O_lᵀ = V_lᵀ Pᵀ,  dP = G_l V_lᵀ,  dQ_l = dS K_l,  dK_l = dSᵀ Q_l,
//   dV_lᵀ = G_lᵀ P.
// q and k (Cqk channels, small) are read from pixel-major (NHWC) copies, where a line's channel
// vectors sit at a fixed stride. v, the incoming gradient G and the outputs (Cv channels) stay
// NCHW: a row of them is already a strided (Cv x W) matrix, and a column is gathered, in blocks
// of up to kColumnBlock adjacent columns (whole cache lines) and kChannelChunk channels, into a
// (channels x H) matrix per column, and scattered back the same way. In a column the self key (i, i) is masked: that pixel is
// already a key of its row.

struct Line {
  int64_t length, first, stride;
  bool column;
};

inline Line row_line(int64_t W, int64_t h) { return {W, h * W, 1, false}; }
inline Line column_line(int64_t H, int64_t W, int64_t w) { return {H, w, W, true}; }

constexpr int64_t kColumnBlock = 16;
// The column pass keeps the weights of all its columns (H x H each) and walks v's channels in
// chunks, outermost: a chunk's planes (kChannelChunk·H·W elements; 600 KB in fp32 at 97 x 97)
// and the output's stay in a core's L2 while its column blocks are gathered, multiplied and
// scattered, so v and out are each read from memory once, in whole rows.
constexpr int64_t kChannelChunk = 16;

template <typename T>
void line_energies(const T* Q, const T* K, int64_t C, const Line& l, T scale, T* E) {
  const int64_t L = l.length, ld = l.stride * C;
  gemm_rm(false, true, L, L, C, scale, Q + l.first * C, ld, K + l.first * C, ld, T(0), E, L);
}

// dst[b][c][j] = src[c][j][w0 + b] for the nb <= kColumnBlock columns from w0 of one NCHW
// image (C planes of H x W). Transposed through a kColumnBlock x kColumnBlock tile, so that both
// the reads (nb adjacent columns) and the writes (adjacent j) are runs of contiguous memory.
// The loops are written out (no memcpy calls for 16 elements) and have constant trip counts
// for whole tiles, so that they compile to vector moves.
template <typename T, int64_t NB, int64_t NJ>
inline void transpose_tile(const T* src, int64_t src_ld, T* dst, int64_t dst_ld, int64_t nb,
                           int64_t nj) {
  T tile[kColumnBlock][kColumnBlock];
  const int64_t b_end = NB ? NB : nb, j_end = NJ ? NJ : nj;
  for (int64_t j = 0; j < j_end; ++j)
    for (int64_t b = 0; b < b_end; ++b) tile[b][j] = src[j * src_ld + b];
  for (int64_t b = 0; b < b_end; ++b)
    for (int64_t j = 0; j < j_end; ++j) dst[b * dst_ld + j] = tile[b][j];
}

// A whole 16 x 16 float tile in sixteen 64-byte vectors: four stages that each swap one bit
// between the row and the column index (blocks of 8, 4, 2, 1 exchanged across the diagonal),
// 64 two-source shuffles in all instead of 256 scalar moves each way (one vpermt2ps each with
// AVX-512; the other instruction sets get GCC's lowering of the same shuffles).
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

template <int D>
inline void swap_bit(f32x16* r) {
  // lo[k] = (k & D) ? b[k - D] : a[k];  hi[k] = (k & D) ? b[k] : a[k + D]  (b is index 16+)
  constexpr i32x16 lo = D == 8 ? i32x16{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}
                      : D == 4 ? i32x16{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27}
                      : D == 2 ? i32x16{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29}
                               : i32x16{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
  constexpr i32x16 hi = lo + D;
  for (int i = 0; i < 16; ++i)
    if ((i & D) == 0) {
      const f32x16 a = r[i], b = r[i + D];
      r[i] = __builtin_shuffle(a, b, lo);
      r[i + D] = __builtin_shuffle(a, b, hi);
    }
}

inline void transpose16(const float* src, int64_t src_ld, float* dst, int64_t dst_ld) {
  f32x16 r[16];
  for (int i = 0; i < 16; ++i) __builtin_memcpy(&r[i], src + i * src_ld, sizeof(f32x16));
  swap_bit<8>(r);
  swap_bit<4>(r);
  swap_bit<2>(r);
  swap_bit<1>(r);
  for (int i = 0; i < 16; ++i) __builtin_memcpy(dst + i * dst_ld, &r[i], sizeof(f32x16));
}

// dst[b·dst_ld + j] = src[j·src_ld + b] for b < nb, j < nj (both <= kColumnBlock).
template <typename T>
inline void transpose_block(const T* src, int64_t src_ld, T* dst, int64_t dst_ld, int64_t nb,
                            int64_t nj) {
  static_assert(kColumnBlock == 16, "transpose16 handles 16 x 16 tiles");
  if constexpr (std::is_same_v<T, float>)
    if (nb == kColumnBlock && nj == kColumnBlock) return transpose16(src, src_ld, dst, dst_ld);
  if (nb == kColumnBlock && nj == kColumnBlock)
    transpose_tile<T, kColumnBlock, kColumnBlock>(src, src_ld, dst, dst_ld, nb, nj);
  else
    transpose_tile<T, 0, 0>(src, src_ld, dst, dst_ld, nb, nj);
}

template <typename T>
void gather_columns(const T* src, int64_t C, int64_t H, int64_t W, int64_t w0, int64_t nb,
                    T* dst) {
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j0 = 0; j0 < H; j0 += kColumnBlock)
      transpose_block(src + (c * H + j0) * W + w0, W, dst + c * H + j0, C * H, nb,
                      std::min(kColumnBlock, H - j0));
}

// The inverse: dst[c][j][w0 + b] = src[b][c][j].
template <typename T>
void scatter_columns(const T* src, int64_t C, int64_t H, int64_t W, int64_t w0, int64_t nb,
                     T* dst) {
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j0 = 0; j0 < H; j0 += kColumnBlock)
      transpose_block(src + c * H + j0, C * H, dst + (c * H + j0) * W + w0, W,
                      std::min(kColumnBlock, H - j0), nb);
}

// Runs fn(n, wa, wb) over runs of adjacent columns [wa, wb) of one image, the N·W columns split
// evenly between the threads.
template <typename Fn>
void for_column_runs(int64_t N, int64_t W, Fn fn) {
  at::parallel_for(0, N * W, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t n = i / W, wa = i % W, wb = std::min(W, wa + end - i);
      fn(n, wa, wb);
      i += wb - wa;
    }
  });
}

// Uninitialised scratch of n elements.
template <typename T>
std::unique_ptr<T[]> scratch(int64_t n) {
  return std::unique_ptr<T[]>(new T[n]);
}

// Row i of E becomes exp(E_i - m_i) with m_i its maximum over the unmasked keys; s_i is the sum.
// The masked self key of a column gets weight 0, and a query with no key at all (the column of
// a one-row image) gets m = -inf, s = 0 and no weights.
template <typename T>
void exp_rows(T* E, const Line& l, T* m, T* s) {
  const int64_t L = l.length;
  for (int64_t i = 0; i < L; ++i) {
    T* e = E + i * L;
    T mx = -std::numeric_limits<T>::infinity();
    for (int64_t z = 0; z < L; ++z)
      if (!(l.column && z == i)) mx = std::max(mx, e[z]);
    if (mx == -std::numeric_limits<T>::infinity()) {
      std::fill(e, e + L, T(0));
      m[i] = mx;
      s[i] = T(0);
      continue;
    }
    for (int64_t z = 0; z < L; ++z) e[z] -= mx;
    exp_inplace(e, L);
    if (l.column) e[i] = T(0);
    T sum = 0;
    for (int64_t z = 0; z < L; ++z) sum += e[z];
    m[i] = mx;
    s[i] = sum;
  }
}

// The forward, in two passes over pixel-major Q, K (N, H, W, Cqk) and NCHW v:
//   A. per column: P = exp(E - m_col) with the column's own softmax statistics (m_col, s_col),
//      and the unnormalised column part V_c Pᵀ scattered into out.
//   B. per row: the row's statistics are merged with the column's (log-sum-exp), the column
//      part in out is rescaled in place and the row part added by one GEMM (beta = 1), with the
//      residual epilogue y = gamma·out + residual and lse.
// Each energy is computed once, and each pass writes only the pixels of its own lines.
template <typename T>
void forward_kernel(const T* Q, const T* K, const T* v, T* mcol, T* scol, T* out, T* lse,
                    int64_t N, int64_t Cqk, int64_t Cv, int64_t H, int64_t W, T scale,
                    const T* residual = nullptr, T* y = nullptr, T gamma = T(0)) {
  const int64_t HW = H * W;
  const int64_t HH = H * H, chunk = kColumnBlock * kChannelChunk * H;
  for_column_runs(N, W, [&](int64_t n, int64_t wa, int64_t wb) {
    auto P = scratch<T>((wb - wa) * HH), Vb = scratch<T>(chunk), Ob = scratch<T>(chunk);
    auto m = scratch<T>(H), s = scratch<T>(H);
    for (int64_t w = wa; w < wb; ++w) {
      const Line l = column_line(H, W, w);
      T* E = P.get() + (w - wa) * HH;
      line_energies(Q + n * HW * Cqk, K + n * HW * Cqk, Cqk, l, scale, E);
      exp_rows(E, l, m.get(), s.get());
      for (int64_t i = 0; i < H; ++i) {
        mcol[n * HW + l.first + i * l.stride] = m[i];
        scol[n * HW + l.first + i * l.stride] = s[i];
      }
    }
    for (int64_t c0 = 0; c0 < Cv; c0 += kChannelChunk) {
      const int64_t cc = std::min(kChannelChunk, Cv - c0), plane = (n * Cv + c0) * HW;
      for (int64_t w0 = wa; w0 < wb; w0 += kColumnBlock) {
        const int64_t nb = std::min(kColumnBlock, wb - w0);
        gather_columns(v + plane, cc, H, W, w0, nb, Vb.get());
        for (int64_t b = 0; b < nb; ++b)
          gemm_rm(false, true, cc, H, H, T(1), Vb.get() + b * cc * H, H,
                  P.get() + (w0 - wa + b) * HH, H, T(0), Ob.get() + b * cc * H, H);
        scatter_columns(Ob.get(), cc, H, W, w0, nb, out + plane);
      }
    }
  });
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> E(W * W), m(W), s(W), f(W);
    for (int64_t nh = begin; nh < end; ++nh) {
      const int64_t n = nh / H;
      const Line l = row_line(W, nh % H);
      line_energies(Q + n * HW * Cqk, K + n * HW * Cqk, Cqk, l, scale, E.data());
      exp_rows(E.data(), l, m.data(), s.data());
      const int64_t p0 = n * HW + l.first;
      for (int64_t w = 0; w < W; ++w) {
        const T mc = mcol[p0 + w], sc = scol[p0 + w];
        const T M = std::max(m[w], mc);
        const T ar = std::exp(m[w] - M), ac = sc > T(0) ? std::exp(mc - M) : T(0);
        const T Z = ar * s[w] + ac * sc;
        lse[p0 + w] = M + std::log(Z);
        for (int64_t z = 0; z < W; ++z) E[w * W + z] *= ar / Z;
        f[w] = ac / Z;
      }
      const int64_t base = n * Cv * HW + l.first;
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
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nh = begin; nh < end; ++nh) {
      const int64_t n = nh / H, h = nh % H;
      T* d = D + n * HW + h * W;
      std::fill(d, d + W, T(0));
      accumulate_products(d, W, C, [&](int64_t c) { return go + (n * C + c) * HW + h * W; },
                          [&](int64_t c) { return out + (n * C + c) * HW + h * W; });
    }
  });
}

// The weights P of a line recomputed from the saved lse, and dS = P (dP - D)·scale·gamma from
// dP (in dS on entry). gamma scales the incoming gradient G (cca_residual_backward: G is grad_y
// and the gradient of out is gamma·grad_y); D holds <G_u, out_u> before that factor.
template <typename T>
void line_weights(const Line& l, const T* Q, const T* K, const T* lse, int64_t Cqk, T scale,
                  T* P) {
  const int64_t L = l.length;
  line_energies(Q, K, Cqk, l, scale, P);
  for (int64_t i = 0; i < L; ++i) {
    T* p = P + i * L;
    const T x = lse[l.first + i * l.stride];
    for (int64_t z = 0; z < L; ++z) p[z] -= x;
    exp_inplace(p, L);
    if (l.column) p[i] = T(0);
  }
}

template <typename T>
void line_score_grads(const Line& l, const T* P, const T* D, T scale_gamma, T* dS) {
  const int64_t L = l.length;
  for (int64_t i = 0; i < L; ++i) {
    const T d = D[l.first + i * l.stride];
    T* ds = dS + i * L;
    const T* p = P + i * L;
    for (int64_t z = 0; z < L; ++z) ds[z] = p[z] * (ds[z] - d) * scale_gamma;
  }
}

// dQ_l = dS K_l and dK_l = dSᵀ Q_l, written (beta = 0) or added (beta = 1) to pixel-major dQ, dK.
template <typename T>
void line_qk_grads(const Line& l, const T* Q, const T* K, const T* dS, int64_t Cqk, T beta, T* dQ,
                   T* dK) {
  const int64_t L = l.length, ld = l.stride * Cqk, off = l.first * Cqk;
  gemm_rm(false, false, L, Cqk, L, T(1), dS, L, K + off, ld, beta, dQ + off, ld);
  gemm_rm(true, false, L, Cqk, L, T(1), dS, L, Q + off, ld, beta, dK + off, ld);
}

// rows[c·HW + w] = pix[w·C + c]: one image row of W pixels, pixel-major to NCHW.
template <typename T>
void store_row_nchw(const T* pix, int64_t W, int64_t C, int64_t HW, T* rows) {
  for (int64_t c = 0; c < C; ++c)
    for (int64_t w = 0; w < W; ++w) rows[c * HW + w] = pix[w * C + c];
}

// The backward: pass A writes each column's part of dQ, dK (pixel-major) and gv (NCHW, through
// the column blocks); pass B adds each row's part and stores the finished rows of dQ, dK NCHW
// into gq, gk. No two tasks of a pass touch the same pixel, and the order of the passes is
// fixed, so the result does not depend on the thread count.
template <typename T>
void backward_kernel(const T* Q, const T* K, const T* v, const T* go, const T* lse, const T* D,
                     T* dQ, T* dK, T* gq, T* gk, T* gv, int64_t N, int64_t Cqk, int64_t Cv,
                     int64_t H, int64_t W, T scale, T gamma) {
  const int64_t HW = H * W;
  const T sg = scale * gamma;
  const int64_t HH = H * H, chunk = kColumnBlock * kChannelChunk * H;
  for_column_runs(N, W, [&](int64_t n, int64_t wa, int64_t wb) {
    const int64_t iq = n * HW * Cqk, nw = wb - wa;
    auto P = scratch<T>(nw * HH), dS = scratch<T>(nw * HH);
    auto Vb = scratch<T>(chunk), Gb = scratch<T>(chunk), Ob = scratch<T>(chunk);
    for (int64_t w = wa; w < wb; ++w)
      line_weights(column_line(H, W, w), Q + iq, K + iq, lse + n * HW, Cqk, scale,
                   P.get() + (w - wa) * HH);
    std::fill(dS.get(), dS.get() + nw * HH, T(0));
    // One sweep over the channel chunks: dP = G_c V_cᵀ accumulates over them, and each chunk's
    // rows of dV_cᵀ = gamma·G_cᵀ P (which needs P only) are finished and scattered.
    for (int64_t c0 = 0; c0 < Cv; c0 += kChannelChunk) {
      const int64_t cc = std::min(kChannelChunk, Cv - c0), plane = (n * Cv + c0) * HW;
      for (int64_t w0 = wa; w0 < wb; w0 += kColumnBlock) {
        const int64_t nb = std::min(kColumnBlock, wb - w0);
        gather_columns(v + plane, cc, H, W, w0, nb, Vb.get());
        gather_columns(go + plane, cc, H, W, w0, nb, Gb.get());
        for (int64_t b = 0; b < nb; ++b) {
          const T *Vc = Vb.get() + b * cc * H, *Gc = Gb.get() + b * cc * H;
          const int64_t e = (w0 - wa + b) * HH;
          gemm_rm(true, false, H, H, cc, T(1), Gc, H, Vc, H, T(1), dS.get() + e, H);
          gemm_rm(false, false, cc, H, H, gamma, Gc, H, P.get() + e, H, T(0),
                  Ob.get() + b * cc * H, H);
        }
        scatter_columns(Ob.get(), cc, H, W, w0, nb, gv + plane);
      }
    }
    for (int64_t w = wa; w < wb; ++w) {
      const Line l = column_line(H, W, w);
      T *Pw = P.get() + (w - wa) * HH, *dSw = dS.get() + (w - wa) * HH;
      line_score_grads(l, Pw, D + n * HW, sg, dSw);
      line_qk_grads(l, Q + iq, K + iq, dSw, Cqk, T(0), dQ + iq, dK + iq);
    }
  });
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> P(W * W), dS(W * W);
    for (int64_t nh = begin; nh < end; ++nh) {
      const int64_t n = nh / H, iq = n * HW * Cqk;
      const Line l = row_line(W, nh % H);
      const int64_t base = n * Cv * HW + l.first;
      line_weights(l, Q + iq, K + iq, lse + n * HW, Cqk, scale, P.data());
      gemm_rm(true, false, W, W, Cv, T(1), go + base, HW, v + base, HW, T(0), dS.data(), W);
      line_score_grads(l, P.data(), D + n * HW, sg, dS.data());
      line_qk_grads(l, Q + iq, K + iq, dS.data(), Cqk, T(1), dQ + iq, dK + iq);
      gemm_rm(false, false, Cv, W, W, gamma, go + base, HW, P.data(), W, T(1), gv + base, HW);
      const int64_t off = iq + l.first * Cqk, row = n * Cqk * HW + l.first;
      store_row_nchw(dQ + off, W, Cqk, HW, gq + row);
      store_row_nchw(dK + off, W, Cqk, HW, gk + row);
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


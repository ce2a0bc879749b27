// Criss-cross attention CPU kernels (see cca.cpp for the algorithm). This file has no include
// guard and no includes on purpose: cca.cpp includes it once per instruction set, inside one
// namespace each (baseline, AVX2+FMA, AVX-512), and picks one at run time. Every inner
// loop runs along w, contiguous in NCHW, so that the compiler vectorises it. Summation orders are
// fixed by the code (no dependence on threads), so results are deterministic.

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

// ---- fused forward ------------------------------------------------------------------------

template <typename T>
void row_energies(const T* q, const T* k, int64_t C, int64_t H, int64_t W, int64_t h, T scale,
                  T* E) {
  // E[(s) * W + w] for s in [0, W + H): s < W row key (h, s), s = W + j column key (j, w).
  const int64_t HW = H * W;
  std::fill(E, E + (W + H) * W, T(0));
  auto qrow = [&](int64_t c) { return q + c * HW + h * W; };
  for (int64_t z = 0; z < W; ++z)
    accumulate_rows(E + z * W, W, C, qrow, [&](int64_t c) { return k[c * HW + h * W + z]; });
  for (int64_t j = 0; j < H; ++j) {
    if (j == h) continue;
    accumulate_products(E + (W + j) * W, W, C, qrow, [&](int64_t c) { return k + c * HW + j * W; });
  }
  for (int64_t i = 0; i < (W + H) * W; ++i) E[i] *= scale;
}

// With y != nullptr also the residual epilogue y = gamma · out + residual, written from the same
// accumulator as out (residual contiguous NCHW like out).
template <typename T>
void forward_kernel(const T* q, const T* k, const T* v, T* out, T* lse, int64_t N, int64_t Cqk,
                    int64_t Cv, int64_t H, int64_t W, T scale, const T* residual = nullptr,
                    T* y = nullptr, T gamma = T(0)) {
  const int64_t HW = H * W;
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> E((W + H) * W), m(W), l(W), acc(W);
    for (int64_t nh = begin; nh < end; ++nh) {
      const int64_t n = nh / H, h = nh % H;
      const T* qn = q + n * Cqk * HW;
      const T* kn = k + n * Cqk * HW;
      const T* vn = v + n * Cv * HW;
      row_energies(qn, kn, Cqk, H, W, h, scale, E.data());
      // Softmax over the W + H - 1 keys of each pixel; the self entry of the column is skipped.
      std::fill(m.begin(), m.end(), -std::numeric_limits<T>::infinity());
      for (int64_t s = 0; s < W + H; ++s) {
        if (s == W + h) continue;
        const T* e = E.data() + s * W;
        for (int64_t w = 0; w < W; ++w) m[w] = std::max(m[w], e[w]);
      }
      std::fill(l.begin(), l.end(), T(0));
      for (int64_t s = 0; s < W + H; ++s) {
        T* e = E.data() + s * W;
        if (s == W + h) {
          std::fill(e, e + W, T(0));
          continue;
        }
        for (int64_t w = 0; w < W; ++w) e[w] -= m[w];
        exp_inplace(e, W);
        for (int64_t w = 0; w < W; ++w) l[w] += e[w];
      }
      T* lse_row = lse + n * HW + h * W;
      for (int64_t w = 0; w < W; ++w) {
        lse_row[w] = m[w] + std::log(l[w]);
        l[w] = T(1) / l[w];
      }
      for (int64_t s = 0; s < W + H; ++s) {
        T* e = E.data() + s * W;
        for (int64_t w = 0; w < W; ++w) e[w] *= l[w];
      }
      for (int64_t c = 0; c < Cv; ++c) {
        const T* vc = vn + c * HW;
        std::fill(acc.begin(), acc.end(), T(0));
        accumulate_rows(acc.data(), W, W, [&](int64_t z) { return E.data() + z * W; },
                        [&](int64_t z) { return vc[h * W + z]; });
        // The weights of the self entry (row W + h) are zero, so the column runs over all H.
        accumulate_products(acc.data(), W, H, [&](int64_t j) { return E.data() + (W + j) * W; },
                            [&](int64_t j) { return vc + j * W; });
        const int64_t row = n * Cv * HW + c * HW + h * W;
        std::copy(acc.begin(), acc.end(), out + row);
        if (y != nullptr) {
          const T* x = residual + row;
          T* yrow = y + row;
          for (int64_t w = 0; w < W; ++w) yrow[w] = gamma * acc[w] + x[w];
        }
      }
    }
  });
}

// ---- fused backward -----------------------------------------------------------------------

// `go` is the incoming gradient scaled by `gamma` before use: gamma = 1 for cca_backward; for
// cca_residual_backward go is grad_y and the gradient of out is gamma · grad_y. Everything is
// linear in it, so gamma enters as a factor on dS (gamma · scale), on the row-key coefficients of
// dv and on the column-key weights of dv; no scaled copy of grad_y is made. Dbuf receives
// <go_u, out_u> per pixel before that scaling: summed, it is the gradient of gamma.
template <typename T>
void backward_kernel(const T* go, const T* q, const T* k, const T* v, const T* out, const T* lse,
                     T* gq, T* gk, T* gv, T* Dbuf, int64_t N, int64_t Cqk, int64_t Cv, int64_t H,
                     int64_t W, T scale, T gamma = T(1)) {
  const int64_t HW = H * W;
  const T scale_gamma = scale * gamma;
  // Pass A: one pixel row at a time.
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> P((W + H) * W), dS((W + H) * W), PT(W * W), dST(W * W), D(W), acc(W);
    for (int64_t nh = begin; nh < end; ++nh) {
      const int64_t n = nh / H, h = nh % H;
      const T* qn = q + n * Cqk * HW;
      const T* kn = k + n * Cqk * HW;
      const T* vn = v + n * Cv * HW;
      const T* gon = go + n * Cv * HW;
      const T* on = out + n * Cv * HW;
      const T* lse_row = lse + n * HW + h * W;
      row_energies(qn, kn, Cqk, H, W, h, scale, P.data());
      for (int64_t s = 0; s < W + H; ++s) {
        T* p = P.data() + s * W;
        if (s == W + h) {
          std::fill(p, p + W, T(0));
          continue;
        }
        for (int64_t w = 0; w < W; ++w) p[w] -= lse_row[w];
        exp_inplace(p, W);
      }
      // D_u = <go_u, O_u> and dP[s][w] = <go_u, v_s>, both before the gamma factor.
      std::fill(D.begin(), D.end(), T(0));
      std::fill(dS.begin(), dS.end(), T(0));
      auto gorow = [&](int64_t c) { return gon + c * HW + h * W; };
      accumulate_products(D.data(), W, Cv, gorow, [&](int64_t c) { return on + c * HW + h * W; });
      for (int64_t z = 0; z < W; ++z)
        accumulate_rows(dS.data() + z * W, W, Cv, gorow,
                        [&](int64_t c) { return vn[c * HW + h * W + z]; });
      for (int64_t j = 0; j < H; ++j) {
        if (j == h) continue;
        accumulate_products(dS.data() + (W + j) * W, W, Cv, gorow,
                            [&](int64_t c) { return vn + c * HW + j * W; });
      }
      std::copy(D.begin(), D.end(), Dbuf + n * HW + h * W);
      for (int64_t s = 0; s < W + H; ++s) {
        T* d = dS.data() + s * W;
        const T* p = P.data() + s * W;
        for (int64_t w = 0; w < W; ++w) d[w] = p[w] * (d[w] - D[w]) * scale_gamma;
      }
      // dq for the pixels of row h.
      for (int64_t c = 0; c < Cqk; ++c) {
        const T* kc = kn + c * HW;
        std::fill(acc.begin(), acc.end(), T(0));
        accumulate_rows(acc.data(), W, W, [&](int64_t z) { return dS.data() + z * W; },
                        [&](int64_t z) { return kc[h * W + z]; });
        // dS of the self entry (row W + h) is zero.
        accumulate_products(acc.data(), W, H, [&](int64_t j) { return dS.data() + (W + j) * W; },
                            [&](int64_t j) { return kc + j * W; });
        std::copy(acc.begin(), acc.end(), gq + n * Cqk * HW + c * HW + h * W);
      }
      // Row-key part of dk, dv for the keys (h, z): gk[c,h,z] = sum_w dS[z][w] q[c,h,w]. Written
      // as axpys over z with the (W x W) row blocks transposed (PT[w][z]), so that the loops
      // vectorise along z instead of ending in a horizontal sum per (c, z).
      for (int64_t z = 0; z < W; ++z)
        for (int64_t w = 0; w < W; ++w) {
          PT[w * W + z] = P[z * W + w];
          dST[w * W + z] = dS[z * W + w];
        }
      for (int64_t c = 0; c < Cqk; ++c) {
        const T* qrow = qn + c * HW + h * W;
        T* gkrow = gk + n * Cqk * HW + c * HW + h * W;
        std::fill(gkrow, gkrow + W, T(0));
        accumulate_rows(gkrow, W, W, [&](int64_t w) { return dST.data() + w * W; },
                        [&](int64_t w) { return qrow[w]; });
      }
      for (int64_t c = 0; c < Cv; ++c) {
        const T* gorow = gon + c * HW + h * W;
        T* gvrow = gv + n * Cv * HW + c * HW + h * W;
        std::fill(gvrow, gvrow + W, T(0));
        accumulate_rows(gvrow, W, W, [&](int64_t w) { return PT.data() + w * W; },
                        [&](int64_t w) { return gamma * gorow[w]; });
      }
    }
  });
  // Pass B: one key row j at a time; adds the column-key part to dk, dv of row j. First the
  // weights P[h] and dS[h] of the pixels (h, w), h != j, for their key (j, w) (zero for h = j),
  // then dv and dk of row j as sums over h, four rows per sweep.
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> P(H * W), dS(H * W);
    for (int64_t nj = begin; nj < end; ++nj) {
      const int64_t n = nj / H, j = nj % H;
      const T* qn = q + n * Cqk * HW;
      const T* kn = k + n * Cqk * HW;
      const T* vn = v + n * Cv * HW;
      const T* gon = go + n * Cv * HW;
      std::fill(P.begin(), P.end(), T(0));
      std::fill(dS.begin(), dS.end(), T(0));
      for (int64_t h = 0; h < H; ++h) {
        if (h == j) continue;
        T* p = P.data() + h * W;
        T* ds = dS.data() + h * W;
        accumulate_products(p, W, Cqk, [&](int64_t c) { return qn + c * HW + h * W; },
                            [&](int64_t c) { return kn + c * HW + j * W; });
        const T* lse_row = lse + n * HW + h * W;
        for (int64_t w = 0; w < W; ++w) p[w] = p[w] * scale - lse_row[w];
        exp_inplace(p, W);
        accumulate_products(ds, W, Cv, [&](int64_t c) { return gon + c * HW + h * W; },
                            [&](int64_t c) { return vn + c * HW + j * W; });
        const T* D = Dbuf + n * HW + h * W;
        for (int64_t w = 0; w < W; ++w) {
          ds[w] = p[w] * (ds[w] - D[w]) * scale_gamma;
          p[w] *= gamma;  // the column-key weight of dv: P · gamma · grad_y
        }
      }
      for (int64_t c = 0; c < Cv; ++c)
        accumulate_products(gv + n * Cv * HW + c * HW + j * W, W, H,
                            [&](int64_t h) { return P.data() + h * W; },
                            [&](int64_t h) { return gon + c * HW + h * W; });
      for (int64_t c = 0; c < Cqk; ++c)
        accumulate_products(gk + n * Cqk * HW + c * HW + j * W, W, H,
                            [&](int64_t h) { return dS.data() + h * W; },
                            [&](int64_t h) { return qn + c * HW + h * W; });
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


// CARAFE CPU kernels (see carafe.cpp for the layout and the work split). No include guard and no
// includes on purpose: carafe.cpp includes this file once per instruction set through
// isa_variants.h, inside one namespace each, and picks one at run time. Every inner loop runs
// along a contiguous row (w or x) so that the compiler vectorises it; the summation order is fixed
// by the code, so results do not depend on the thread count.

#include "vec_exp.h"

// Where the normalised mask row of tap t at output row y lives: either the caller's masks tensor
// (tap_stride = sH·sW, y0 = 0) or a unit's scratch holding rows [y0, y0 + rows).
template <typename scalar_t>
struct MaskRows {
  const scalar_t* base;
  int64_t tap_stride, y0, sW;
  const scalar_t* row(int64_t t, int64_t y) const { return base + t * tap_stride + (y - y0) * sW; }
};

// Softmax over the k² taps of group grp for output rows [y0, y1), read straight from the
// low-resolution logits (the pixel shuffle is only index arithmetic), into buf (k² × rows × sW).
// For one child (i, j) of a low-resolution row h the k² taps are k² rows of W contiguous logits,
// so the max, the exp and the sum run along w and vectorise; only the store interleaves the s
// children of each column into the output row.
template <typename scalar_t>
void normalise_rows(const Geometry& g, const scalar_t* logits, int64_t n, int64_t grp, int64_t y0,
                    int64_t y1, scalar_t* buf, std::vector<scalar_t>& scratch) {
  const int64_t s2 = g.s * g.s, HW = g.H * g.W, W = g.W;
  const int64_t tap_stride = s2 * HW;  // between the logit planes of consecutive taps
  const int64_t p_stride = (y1 - y0) * g.sW;
  const scalar_t* lg = logits + (n * g.G + grp) * g.k2 * s2 * HW;
  scratch.resize(static_cast<size_t>((g.k2 + 1) * W));
  scalar_t* e = scratch.data();  // k² rows of W: the exponentials
  scalar_t* m = e + g.k2 * W;    // the running max, then 1 / sum
  for (int64_t y = y0; y < y1; ++y) {
    const int64_t h = y / g.s, i = y % g.s;
    for (int64_t j = 0; j < g.s; ++j) {
      const scalar_t* l = lg + (i * g.s + j) * HW + h * W;
      std::copy(l, l + W, m);
      for (int64_t t = 1; t < g.k2; ++t) {
        const scalar_t* lt = l + t * tap_stride;
        for (int64_t w = 0; w < W; ++w) m[w] = std::max(m[w], lt[w]);
      }
      for (int64_t t = 0; t < g.k2; ++t) {
        const scalar_t* lt = l + t * tap_stride;
        scalar_t* et = e + t * W;
        for (int64_t w = 0; w < W; ++w) et[w] = lt[w] - m[w];
      }
      exp_inplace(e, g.k2 * W);
      std::fill(m, m + W, scalar_t(0));
      for (int64_t t = 0; t < g.k2; ++t)
        for (int64_t w = 0; w < W; ++w) m[w] += e[t * W + w];
      for (int64_t w = 0; w < W; ++w) m[w] = scalar_t(1) / m[w];
      scalar_t* p = buf + (y - y0) * g.sW + j;
      for (int64_t t = 0; t < g.k2; ++t) {
        const scalar_t* et = e + t * W;
        scalar_t* pt = p + t * p_stride;
        for (int64_t w = 0; w < W; ++w) pt[w * g.s] = et[w] * m[w];
      }
    }
  }
}

// dL/dlogit = p·(dp − Σ_t p·dp) for output rows [y0, y1) (dp: k² rows of sW per output row, tap
// stride dp_tap, from row y0), scattered back through the pixel shuffle into grad_logits.
template <typename scalar_t>
void logit_grad_rows(const Geometry& g, const MaskRows<scalar_t>& m, const scalar_t* dp,
                     int64_t dp_tap, int64_t n, int64_t grp, int64_t y0, int64_t y1,
                     scalar_t* grad_logits, std::vector<scalar_t>& scratch) {
  const int64_t s2 = g.s * g.s, HW = g.H * g.W, sW = g.sW;
  scalar_t* gl = grad_logits + (n * g.G + grp) * g.k2 * s2 * HW;
  scratch.resize(static_cast<size_t>(2 * sW));
  scalar_t* dot = scratch.data();
  scalar_t* row = dot + sW;
  for (int64_t y = y0; y < y1; ++y) {
    const int64_t h = y / g.s, i = y % g.s;
    const scalar_t* d = dp + (y - y0) * sW;
    std::fill(dot, dot + sW, scalar_t(0));
    for (int64_t t = 0; t < g.k2; ++t) {
      const scalar_t *mt = m.row(t, y), *dt = d + t * dp_tap;
      for (int64_t x = 0; x < sW; ++x) dot[x] += mt[x] * dt[x];
    }
    for (int64_t t = 0; t < g.k2; ++t) {
      const scalar_t *mt = m.row(t, y), *dt = d + t * dp_tap;
      for (int64_t x = 0; x < sW; ++x) row[x] = mt[x] * (dt[x] - dot[x]);
      for (int64_t j = 0; j < g.s; ++j) {
        scalar_t* dl = gl + (t * s2 + i * g.s + j) * HW + h * g.W;
        for (int64_t w = 0; w < g.W; ++w) dl[w] = row[w * g.s + j];
      }
    }
  }
}

// The inner loops run along an output row x ∈ [0, sW) as dst[x] += a[x]·b[x], which the compiler
// vectorises. To get there, each feature row is first upsampled to output resolution (nearest,
// x' → x'/s) into a row padded with r·s zeros on both sides: tap kx of output pixel x then reads
// up[pad + x + (kx − r)·s], a plain shifted row, and the zero pads are the zero padding of CARAFE.
// The feature gradient runs the same shift backwards into an upsampled accumulator row, summed
// over the s children of each column at the end. These rows are O(k·sW) per thread.
template <typename scalar_t>
inline void fma_row(scalar_t* __restrict__ dst, const scalar_t* __restrict__ a,
                    const scalar_t* __restrict__ b, int64_t len) {
  for (int64_t x = 0; x < len; ++x) dst[x] += a[x] * b[x];
}

// Upsampled, zero-padded feature rows hh ∈ [e0, e1) of one channel plane (rows outside the image
// are left as they are: the loops below skip them).
template <typename scalar_t>
struct UpRows {
  std::vector<scalar_t> data;
  int64_t e0 = 0, pad = 0, len = 0;

  void reset(const Geometry& g, int64_t lo, int64_t hi) {
    e0 = lo;
    pad = g.r * g.s;
    len = g.sW + 2 * pad;
    data.assign(static_cast<size_t>((hi - lo) * len), scalar_t(0));
  }
  // Pointer to output column 0 of row hh (valid from -pad to sW + pad).
  const scalar_t* row(int64_t hh) const { return data.data() + (hh - e0) * len + pad; }
  void fill(const Geometry& g, const scalar_t* plane, int64_t lo, int64_t hi) {
    for (int64_t hh = std::max<int64_t>(lo, 0); hh < std::min(hi, g.H); ++hh) {
      scalar_t* dst = data.data() + (hh - e0) * len + pad;
      const scalar_t* src = plane + hh * g.W;
      for (int64_t w = 0; w < g.W; ++w)
        for (int64_t j = 0; j < g.s; ++j) dst[w * g.s + j] = src[w];
    }
  }
};

// out rows [y0, y1) (low-resolution rows [h0, h1)) of every channel of group grp.
template <typename scalar_t>
void forward_unit(const Geometry& g, const scalar_t* features, const MaskRows<scalar_t>& m,
                  int64_t n, int64_t grp, int64_t h0, int64_t h1, scalar_t* out, UpRows<scalar_t>& up) {
  const int64_t HW = g.H * g.W, oHW = g.sH * g.sW;
  up.reset(g, h0 - g.r, h1 + g.r);
  for (int64_t c = grp * g.Cg; c < (grp + 1) * g.Cg; ++c) {
    up.fill(g, features + (n * g.C + c) * HW, h0 - g.r, h1 + g.r);
    scalar_t* oc = out + (n * g.C + c) * oHW;
    for (int64_t y = h0 * g.s; y < h1 * g.s; ++y) {
      scalar_t* acc = oc + y * g.sW;
      std::fill(acc, acc + g.sW, scalar_t(0));
      const int64_t h = y / g.s;
      for (int64_t ky = 0; ky < g.k; ++ky) {
        const int64_t hh = h + ky - g.r;
        if (hh < 0 || hh >= g.H) continue;
        const scalar_t* frow = up.row(hh);
        for (int64_t kx = 0; kx < g.k; ++kx)
          fma_row(acc, frow + (kx - g.r) * g.s, m.row(ky * g.k + kx, y), g.sW);
      }
    }
  }
}

// Both gradients of low-resolution rows [h0, h1) of group grp, for every channel of the group:
//   dp(t, y)[x] += grad_out[c, y, x] · f[c, tap t of (y, x)]   for y ∈ [h0·s, h1·s)
//   grad_features[c, hh, ·] for hh ∈ [h0, h1), a gather through the shifted rows.
// `dp` points at zeroed rows (k² × (h1 − h0)·s × sW, tap stride dp_tap).
template <typename scalar_t>
void backward_unit(const Geometry& g, const scalar_t* grad_out, const scalar_t* features,
                   const MaskRows<scalar_t>& m, int64_t n, int64_t grp, int64_t h0, int64_t h1,
                   scalar_t* dp, int64_t dp_tap, scalar_t* grad_features, UpRows<scalar_t>& up,
                   std::vector<scalar_t>& accrow) {
  const int64_t HW = g.H * g.W, oHW = g.sH * g.sW, y0 = h0 * g.s;
  up.reset(g, h0 - g.r, h1 + g.r);
  accrow.resize(static_cast<size_t>(up.len));
  for (int64_t c = grp * g.Cg; c < (grp + 1) * g.Cg; ++c) {
    up.fill(g, features + (n * g.C + c) * HW, h0 - g.r, h1 + g.r);
    const scalar_t* goc = grad_out + (n * g.C + c) * oHW;
    for (int64_t y = y0; y < h1 * g.s; ++y) {
      const scalar_t* gorow = goc + y * g.sW;
      const int64_t h = y / g.s;
      for (int64_t ky = 0; ky < g.k; ++ky) {
        const int64_t hh = h + ky - g.r;
        if (hh < 0 || hh >= g.H) continue;
        const scalar_t* frow = up.row(hh);
        for (int64_t kx = 0; kx < g.k; ++kx)
          fma_row(dp + (ky * g.k + kx) * dp_tap + (y - y0) * g.sW, gorow,
                  frow + (kx - g.r) * g.s, g.sW);
      }
    }
    for (int64_t hh = h0; hh < h1; ++hh) {
      // accrow[pad + ww·s + j] collects the children j of feature column ww; the pads catch
      // the taps that fall outside the image.
      std::fill(accrow.begin(), accrow.end(), scalar_t(0));
      scalar_t* acc = accrow.data() + up.pad;
      for (int64_t ky = 0; ky < g.k; ++ky) {
        const int64_t h = hh + g.r - ky;
        if (h < 0 || h >= g.H) continue;
        for (int64_t i = 0; i < g.s; ++i) {
          const int64_t y = h * g.s + i;
          for (int64_t kx = 0; kx < g.k; ++kx)
            fma_row(acc + (kx - g.r) * g.s, goc + y * g.sW, m.row(ky * g.k + kx, y), g.sW);
        }
      }
      scalar_t* gf = grad_features + (n * g.C + c) * HW + hh * g.W;
      for (int64_t ww = 0; ww < g.W; ++ww) {
        scalar_t sum = 0;
        for (int64_t j = 0; j < g.s; ++j) sum += acc[ww * g.s + j];
        gf[ww] = sum;
      }
    }
  }
}

// Units [begin, end) of the forward (a unit is (n, group, block of kBlockRows low-resolution
// rows), numbered n-major); `fused`: `masks` are the raw low-resolution logits.
template <typename scalar_t>
void forward_units(const Geometry& g, const scalar_t* features, const scalar_t* masks, bool fused,
                   scalar_t* out, int64_t begin, int64_t end) {
  const int64_t blocks = row_blocks(g);
  std::vector<scalar_t> buf, scratch;
  UpRows<scalar_t> up;
  for (int64_t u = begin; u < end; ++u) {
    const int64_t b = u % blocks, grp = (u / blocks) % g.G, n = u / (blocks * g.G);
    const int64_t h0 = b * kBlockRows, h1 = std::min(g.H, h0 + kBlockRows);
    const int64_t y0 = h0 * g.s, y1 = h1 * g.s;
    MaskRows<scalar_t> m;
    if (fused) {
      buf.resize(static_cast<size_t>(g.k2 * (y1 - y0) * g.sW));
      normalise_rows(g, masks, n, grp, y0, y1, buf.data(), scratch);
      m = {buf.data(), (y1 - y0) * g.sW, y0, g.sW};
    } else {
      m = {masks + (n * g.G + grp) * g.k2 * g.sH * g.sW, g.sH * g.sW, 0, g.sW};
    }
    forward_unit(g, features, m, n, grp, h0, h1, out, up);
  }
}

// Units [begin, end) of the backward, numbered as in forward_units.
template <typename scalar_t>
void backward_units(const Geometry& g, const scalar_t* grad_out, const scalar_t* features,
                    const scalar_t* masks, bool fused, scalar_t* grad_features,
                    scalar_t* grad_masks, int64_t begin, int64_t end) {
  const int64_t blocks = row_blocks(g);
  std::vector<scalar_t> buf, dp, accrow, scratch;
  UpRows<scalar_t> up;
  for (int64_t u = begin; u < end; ++u) {
    const int64_t b = u % blocks, grp = (u / blocks) % g.G, n = u / (blocks * g.G);
    const int64_t h0 = b * kBlockRows, h1 = std::min(g.H, h0 + kBlockRows);
    const int64_t y0 = h0 * g.s, y1 = h1 * g.s;
    if (fused) {
      // The feature gather reads the masks of low-resolution rows [h0 - r, h1 + r).
      const int64_t e0 = std::max<int64_t>(0, h0 - g.r) * g.s;
      const int64_t e1 = std::min<int64_t>(g.H, h1 + g.r) * g.s;
      buf.resize(static_cast<size_t>(g.k2 * (e1 - e0) * g.sW));
      normalise_rows(g, masks, n, grp, e0, e1, buf.data(), scratch);
      const MaskRows<scalar_t> m{buf.data(), (e1 - e0) * g.sW, e0, g.sW};
      const int64_t dp_tap = (y1 - y0) * g.sW;
      dp.assign(static_cast<size_t>(g.k2 * dp_tap), scalar_t(0));
      backward_unit(g, grad_out, features, m, n, grp, h0, h1, dp.data(), dp_tap, grad_features,
                    up, accrow);
      logit_grad_rows(g, m, dp.data(), dp_tap, n, grp, y0, y1, grad_masks, scratch);
    } else {
      const int64_t off = (n * g.G + grp) * g.k2 * g.sH * g.sW;
      const MaskRows<scalar_t> m{masks + off, g.sH * g.sW, 0, g.sW};
      // dL/dmask accumulates straight into this unit's rows of grad_masks.
      scalar_t* gm = grad_masks + off + y0 * g.sW;
      for (int64_t t = 0; t < g.k2; ++t)
        std::fill(gm + t * g.sH * g.sW, gm + t * g.sH * g.sW + (y1 - y0) * g.sW, scalar_t(0));
      backward_unit(g, grad_out, features, m, n, grp, h0, h1, gm, g.sH * g.sW, grad_features, up,
                    accrow);
    }
  }
}

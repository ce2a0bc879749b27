// CARAFE on the CPU: carafe_forward/backward (normalised high-resolution masks) and
// carafe_fused_forward/backward (raw low-resolution logits, pixel shuffle + softmax on the fly).
//
// Layout (contiguous NCHW after the glue below): features (N, C, H, W); masks (N, G·k², sH, sW)
// with channel g·k² + ky·k + kx = tap (ky, kx) of group g; logits (N, G·k²·s², H, W) with channel
// (g·k² + t)·s² + i·s + j = tap t of group g at child (i, j) of the low-resolution pixel (the
// pixel_shuffle order). out (N, C, sH, sW).
//
// Work is split into units (n, g, block of BH low-resolution rows) run by at::parallel_for. Every
// output element is written by exactly one unit, so the backward is a deterministic gather: no
// unit adds into memory another unit writes.
//
// The fused ops never materialise the high-resolution mask. Each unit normalises the logits of
// the rows it needs into a small per-thread scratch (k² × rows × sW), which is then reused for all
// C/G channels of the group. The backward recomputes it; the halo of r low-resolution rows above
// and below the block is recomputed by the neighbouring unit too (cost (BH + 2r) / BH of a
// softmax, small against the C/G·k² multiply-adds per pixel).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "carafe_checks.h"

namespace armnet_ops {
namespace {

// Low-resolution rows per work unit.
constexpr int64_t kBlockRows = 8;

struct Geometry {
  int64_t N, C, H, W, k, G, s, r, k2, Cg, sH, sW;
};

Geometry check_inputs(const char* op, const at::Tensor& features, const at::Tensor& masks,
                      const char* masks_name, int64_t k, int64_t G, int64_t s, bool fused) {
  carafe_checks::check_inputs(op, features, masks, masks_name, k, G, s, fused);
  Geometry g{};
  g.N = features.size(0);
  g.C = features.size(1);
  g.H = features.size(2);
  g.W = features.size(3);
  g.k = k;
  g.G = G;
  g.s = s;
  g.r = (k - 1) / 2;
  g.k2 = k * k;
  g.sH = s * g.H;
  g.sW = s * g.W;
  g.Cg = g.C / G;
  return g;
}

// Where the normalised mask row of tap t at output row y lives: either the caller's masks tensor
// (tap_stride = sH·sW, y0 = 0) or a unit's scratch holding rows [y0, y0 + rows).
template <typename scalar_t>
struct MaskRows {
  const scalar_t* base;
  int64_t tap_stride, y0, sW;
  const scalar_t* row(int64_t t, int64_t y) const { return base + t * tap_stride + (y - y0) * sW; }
};

// Softmax over the k² taps of group g for output rows [y0, y1), read straight from the
// low-resolution logits (the pixel shuffle is only index arithmetic), into buf (k² × rows × sW).
template <typename scalar_t>
void normalise_rows(const Geometry& g, const scalar_t* logits, int64_t n, int64_t grp, int64_t y0,
                    int64_t y1, scalar_t* buf) {
  const int64_t s2 = g.s * g.s, HW = g.H * g.W, rows = y1 - y0;
  const int64_t tap_stride = s2 * HW;  // between the logit planes of consecutive taps
  const scalar_t* lg = logits + (n * g.G + grp) * g.k2 * s2 * HW;
  for (int64_t y = y0; y < y1; ++y) {
    const int64_t h = y / g.s, i = y % g.s;
    for (int64_t x = 0; x < g.sW; ++x) {
      const int64_t w = x / g.s, j = x % g.s;
      const scalar_t* l = lg + (i * g.s + j) * HW + h * g.W + w;
      scalar_t mx = l[0];
      for (int64_t t = 1; t < g.k2; ++t) mx = std::max(mx, l[t * tap_stride]);
      scalar_t* p = buf + (y - y0) * g.sW + x;
      const int64_t p_stride = rows * g.sW;
      scalar_t sum = 0;
      for (int64_t t = 0; t < g.k2; ++t) {
        const scalar_t e = std::exp(l[t * tap_stride] - mx);
        p[t * p_stride] = e;
        sum += e;
      }
      const scalar_t inv = scalar_t(1) / sum;
      for (int64_t t = 0; t < g.k2; ++t) p[t * p_stride] *= inv;
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

int64_t row_blocks(const Geometry& g) { return (g.H + kBlockRows - 1) / kBlockRows; }

at::Tensor forward_impl(const at::Tensor& features_in, const at::Tensor& masks_in, int64_t k,
                        int64_t G, int64_t s, bool fused) {
  const char* op = fused ? "carafe_fused_forward" : "carafe_forward";
  const Geometry g = check_inputs(op, features_in, masks_in, fused ? "mask_logits" : "masks", k,
                                  G, s, fused);
  TORCH_CHECK(features_in.device().is_cpu(), op, ": the CPU kernel needs CPU tensors, got ",
              features_in.device());
  const at::Tensor features = features_in.contiguous();
  const at::Tensor masks = masks_in.contiguous();
  at::Tensor out = at::empty({g.N, g.C, g.sH, g.sW}, features.options());
  if (out.numel() == 0) return out;
  const int64_t blocks = row_blocks(g), units = g.N * g.G * blocks;
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "carafe_forward_cpu", [&] {
    const scalar_t* fp = features.data_ptr<scalar_t>();
    const scalar_t* mp = masks.data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> buf;
      UpRows<scalar_t> up;
      for (int64_t u = begin; u < end; ++u) {
        const int64_t b = u % blocks, grp = (u / blocks) % g.G, n = u / (blocks * g.G);
        const int64_t h0 = b * kBlockRows, h1 = std::min(g.H, h0 + kBlockRows);
        const int64_t y0 = h0 * g.s, y1 = h1 * g.s;
        MaskRows<scalar_t> m;
        if (fused) {
          buf.resize(static_cast<size_t>(g.k2 * (y1 - y0) * g.sW));
          normalise_rows(g, mp, n, grp, y0, y1, buf.data());
          m = {buf.data(), (y1 - y0) * g.sW, y0, g.sW};
        } else {
          m = {mp + (n * g.G + grp) * g.k2 * g.sH * g.sW, g.sH * g.sW, 0, g.sW};
        }
        forward_unit(g, fp, m, n, grp, h0, h1, op_, up);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> backward_impl(const at::Tensor& grad_out_in,
                                                 const at::Tensor& features_in,
                                                 const at::Tensor& masks_in, int64_t k, int64_t G,
                                                 int64_t s, bool fused) {
  const char* op = fused ? "carafe_fused_backward" : "carafe_backward";
  const Geometry g = check_inputs(op, features_in, masks_in, fused ? "mask_logits" : "masks", k,
                                  G, s, fused);
  TORCH_CHECK(features_in.device().is_cpu(), op, ": the CPU kernel needs CPU tensors, got ",
              features_in.device());
  carafe_checks::check_grad_out(op, grad_out_in, features_in, s);
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor features = features_in.contiguous();
  const at::Tensor masks = masks_in.contiguous();
  at::Tensor grad_features = at::empty(features.sizes(), features.options());
  // Every element of both gradients is written below; an empty group (C = 0) leaves nothing to
  // reduce, hence the explicit zeros for that case.
  at::Tensor grad_masks = g.C == 0 ? at::zeros(masks.sizes(), masks.options())
                                   : at::empty(masks.sizes(), masks.options());
  if (g.N == 0 || g.C == 0 || g.H == 0 || g.W == 0) return {grad_features, grad_masks};
  const int64_t blocks = row_blocks(g), units = g.N * g.G * blocks;
  const int64_t s2 = g.s * g.s, HW = g.H * g.W;
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "carafe_backward_cpu", [&] {
    const scalar_t* gop = grad_out.data_ptr<scalar_t>();
    const scalar_t* fp = features.data_ptr<scalar_t>();
    const scalar_t* mp = masks.data_ptr<scalar_t>();
    scalar_t* gfp = grad_features.data_ptr<scalar_t>();
    scalar_t* gmp = grad_masks.data_ptr<scalar_t>();
    at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> buf, dp, accrow;
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
          normalise_rows(g, mp, n, grp, e0, e1, buf.data());
          const MaskRows<scalar_t> m{buf.data(), (e1 - e0) * g.sW, e0, g.sW};
          const int64_t dp_tap = (y1 - y0) * g.sW;
          dp.assign(static_cast<size_t>(g.k2 * dp_tap), scalar_t(0));
          backward_unit(g, gop, fp, m, n, grp, h0, h1, dp.data(), dp_tap, gfp, up, accrow);
          // dL/dlogit = p·(dp − Σ_t p·dp), scattered back through the pixel shuffle.
          scalar_t* gl = gmp + (n * g.G + grp) * g.k2 * s2 * HW;
          for (int64_t y = y0; y < y1; ++y) {
            const int64_t h = y / g.s, i = y % g.s;
            for (int64_t x = 0; x < g.sW; ++x) {
              const int64_t w = x / g.s, j = x % g.s;
              const scalar_t* d = dp.data() + (y - y0) * g.sW + x;
              scalar_t dot = 0;
              for (int64_t t = 0; t < g.k2; ++t) dot += m.row(t, y)[x] * d[t * dp_tap];
              scalar_t* dl = gl + (i * g.s + j) * HW + h * g.W + w;
              for (int64_t t = 0; t < g.k2; ++t)
                dl[t * s2 * HW] = m.row(t, y)[x] * (d[t * dp_tap] - dot);
            }
          }
        } else {
          const int64_t off = (n * g.G + grp) * g.k2 * g.sH * g.sW;
          const MaskRows<scalar_t> m{mp + off, g.sH * g.sW, 0, g.sW};
          // dL/dmask accumulates straight into this unit's rows of grad_masks.
          scalar_t* gm = gmp + off + y0 * g.sW;
          for (int64_t t = 0; t < g.k2; ++t)
            std::fill(gm + t * g.sH * g.sW, gm + t * g.sH * g.sW + (y1 - y0) * g.sW, scalar_t(0));
          backward_unit(g, gop, fp, m, n, grp, h0, h1, gm, g.sH * g.sW, gfp, up, accrow);
        }
      }
    });
  });
  return {grad_features, grad_masks};
}

at::Tensor carafe_forward_cpu(const at::Tensor& features, const at::Tensor& masks, int64_t k,
                              int64_t G, int64_t s) {
  return forward_impl(features, masks, k, G, s, false);
}

std::tuple<at::Tensor, at::Tensor> carafe_backward_cpu(const at::Tensor& grad_out,
                                                       const at::Tensor& features,
                                                       const at::Tensor& masks, int64_t k,
                                                       int64_t G, int64_t s) {
  return backward_impl(grad_out, features, masks, k, G, s, false);
}

at::Tensor carafe_fused_forward_cpu(const at::Tensor& features, const at::Tensor& logits,
                                    int64_t k, int64_t G, int64_t s) {
  return forward_impl(features, logits, k, G, s, true);
}

std::tuple<at::Tensor, at::Tensor> carafe_fused_backward_cpu(const at::Tensor& grad_out,
                                                             const at::Tensor& features,
                                                             const at::Tensor& logits, int64_t k,
                                                             int64_t G, int64_t s) {
  return backward_impl(grad_out, features, logits, k, G, s, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(armnet_ops, CPU, m) {
  m.impl("carafe_forward", &carafe_forward_cpu);
  m.impl("carafe_backward", &carafe_backward_cpu);
  m.impl("carafe_fused_forward", &carafe_fused_forward_cpu);
  m.impl("carafe_fused_backward", &carafe_fused_backward_cpu);
}

}  // namespace armnet_ops

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

namespace armnet_ops {
namespace {

// Low-resolution rows per work unit.
constexpr int64_t kBlockRows = 8;

struct Geometry {
  int64_t N, C, H, W, k, G, s, r, k2, Cg, sH, sW;
};

Geometry check_inputs(const char* op, const at::Tensor& features, const at::Tensor& masks,
                      const char* masks_name, int64_t k, int64_t G, int64_t s, bool fused) {
  TORCH_CHECK(features.dim() == 4, op, ": argument 'features' must be 4-D, got ", features.dim(),
              "-D with shape ", features.sizes());
  TORCH_CHECK(masks.dim() == 4, op, ": argument '", masks_name, "' must be 4-D, got ",
              masks.dim(), "-D with shape ", masks.sizes());
  TORCH_CHECK(masks.scalar_type() == features.scalar_type(), op, ": argument '", masks_name,
              "' must have the dtype of 'features' (", features.scalar_type(), "), got ",
              masks.scalar_type());
  TORCH_CHECK(masks.device() == features.device(), op, ": argument '", masks_name,
              "' must be on the device of 'features' (", features.device(), "), got ",
              masks.device());
  TORCH_CHECK(k >= 1 && k % 2 == 1, op, ": argument 'kernel_size' must be odd and >= 1, got ", k);
  TORCH_CHECK(G >= 1, op, ": argument 'group_size' must be >= 1, got ", G);
  TORCH_CHECK(s >= 1, op, ": argument 'scale_factor' must be >= 1, got ", s);
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
  TORCH_CHECK(g.C % G == 0, op, ": the channels of 'features' (", g.C,
              ") must be divisible by group_size (", G, "), got C % G = ", g.C % G);
  g.Cg = g.C / G;
  TORCH_CHECK(masks.size(0) == g.N, op, ": argument '", masks_name, "' must have N = ", g.N,
              " (dim 0), got ", masks.size(0));
  if (fused) {
    TORCH_CHECK(masks.size(1) == G * g.k2 * s * s, op, ": argument '", masks_name,
                "' must have G·k²·s² = ", G * g.k2 * s * s, " channels (dim 1), got ",
                masks.size(1));
    TORCH_CHECK(masks.size(2) == g.H && masks.size(3) == g.W, op, ": argument '", masks_name,
                "' must have the spatial size of 'features' (", g.H, ", ", g.W, "), got (",
                masks.size(2), ", ", masks.size(3), ")");
  } else {
    TORCH_CHECK(masks.size(1) == G * g.k2, op, ": argument '", masks_name, "' must have G·k² = ",
                G * g.k2, " channels (dim 1), got ", masks.size(1));
    TORCH_CHECK(masks.size(2) == g.sH && masks.size(3) == g.sW, op, ": argument '", masks_name,
                "' must have spatial size (s·H, s·W) = (", g.sH, ", ", g.sW, "), got (",
                masks.size(2), ", ", masks.size(3), ")");
  }
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

// The valid low-resolution column range [lo, hi) of w such that w + kx - r lies in [0, W).
inline void tap_columns(const Geometry& g, int64_t kx, int64_t& lo, int64_t& hi) {
  lo = std::max<int64_t>(0, g.r - kx);
  hi = std::min<int64_t>(g.W, g.W + g.r - kx);
}

// out rows [y0, y1) of every channel of group grp.
template <typename scalar_t>
void forward_unit(const Geometry& g, const scalar_t* features, const MaskRows<scalar_t>& m,
                  int64_t n, int64_t grp, int64_t y0, int64_t y1, scalar_t* out) {
  const int64_t HW = g.H * g.W, oHW = g.sH * g.sW;
  for (int64_t c = grp * g.Cg; c < (grp + 1) * g.Cg; ++c) {
    const scalar_t* fc = features + (n * g.C + c) * HW;
    scalar_t* oc = out + (n * g.C + c) * oHW;
    for (int64_t y = y0; y < y1; ++y) {
      scalar_t* acc = oc + y * g.sW;
      std::fill(acc, acc + g.sW, scalar_t(0));
      const int64_t h = y / g.s;
      for (int64_t ky = 0; ky < g.k; ++ky) {
        const int64_t hh = h + ky - g.r;
        if (hh < 0 || hh >= g.H) continue;
        const scalar_t* frow = fc + hh * g.W;
        for (int64_t kx = 0; kx < g.k; ++kx) {
          const scalar_t* mrow = m.row(ky * g.k + kx, y);
          int64_t lo, hi;
          tap_columns(g, kx, lo, hi);
          // One feature load serves the s children of the low-resolution column.
          for (int64_t w = lo; w < hi; ++w) {
            const scalar_t f = frow[w + kx - g.r];
            const int64_t xb = w * g.s;
            for (int64_t j = 0; j < g.s; ++j) acc[xb + j] += f * mrow[xb + j];
          }
        }
      }
    }
  }
}

// dL/dmask for output rows [y0, y1) of group grp: gm(t, y)[x] = Σ_c grad_out[c,y,x]·f[c, tap].
// Written through `gm_row`, which the caller points at grad_masks or at a scratch.
template <typename scalar_t, typename RowFn>
void grad_mask_unit(const Geometry& g, const scalar_t* grad_out, const scalar_t* features,
                    int64_t n, int64_t grp, int64_t y, RowFn gm_row) {
  const int64_t HW = g.H * g.W, oHW = g.sH * g.sW;
  for (int64_t t = 0; t < g.k2; ++t) std::fill(gm_row(t), gm_row(t) + g.sW, scalar_t(0));
  const int64_t h = y / g.s;
  for (int64_t c = grp * g.Cg; c < (grp + 1) * g.Cg; ++c) {
    const scalar_t* fc = features + (n * g.C + c) * HW;
    const scalar_t* gorow = grad_out + (n * g.C + c) * oHW + y * g.sW;
    for (int64_t ky = 0; ky < g.k; ++ky) {
      const int64_t hh = h + ky - g.r;
      if (hh < 0 || hh >= g.H) continue;
      const scalar_t* frow = fc + hh * g.W;
      for (int64_t kx = 0; kx < g.k; ++kx) {
        scalar_t* acc = gm_row(ky * g.k + kx);
        int64_t lo, hi;
        tap_columns(g, kx, lo, hi);
        for (int64_t w = lo; w < hi; ++w) {
          const scalar_t f = frow[w + kx - g.r];
          const int64_t xb = w * g.s;
          for (int64_t j = 0; j < g.s; ++j) acc[xb + j] += f * gorow[xb + j];
        }
      }
    }
  }
}

// dL/dfeatures for low-resolution rows [h0, h1) of every channel of group grp: a gather over the
// output pixels whose window covers (hh, ww), i.e. the children of (hh + r - ky, ww + r - kx).
template <typename scalar_t>
void grad_feature_unit(const Geometry& g, const scalar_t* grad_out, const MaskRows<scalar_t>& m,
                       int64_t n, int64_t grp, int64_t h0, int64_t h1, scalar_t* grad_features) {
  const int64_t HW = g.H * g.W, oHW = g.sH * g.sW;
  for (int64_t c = grp * g.Cg; c < (grp + 1) * g.Cg; ++c) {
    const scalar_t* goc = grad_out + (n * g.C + c) * oHW;
    for (int64_t hh = h0; hh < h1; ++hh) {
      scalar_t* acc = grad_features + (n * g.C + c) * HW + hh * g.W;
      std::fill(acc, acc + g.W, scalar_t(0));
      for (int64_t ky = 0; ky < g.k; ++ky) {
        const int64_t h = hh + g.r - ky;
        if (h < 0 || h >= g.H) continue;
        for (int64_t i = 0; i < g.s; ++i) {
          const int64_t y = h * g.s + i;
          const scalar_t* gorow = goc + y * g.sW;
          for (int64_t kx = 0; kx < g.k; ++kx) {
            const scalar_t* mrow = m.row(ky * g.k + kx, y);
            // ww such that the source column w = ww + r - kx lies in [0, W).
            const int64_t lo = std::max<int64_t>(0, kx - g.r);
            const int64_t hi = std::min<int64_t>(g.W, g.W + kx - g.r);
            for (int64_t ww = lo; ww < hi; ++ww) {
              const int64_t xb = (ww + g.r - kx) * g.s;
              scalar_t sum = 0;
              for (int64_t j = 0; j < g.s; ++j) sum += gorow[xb + j] * mrow[xb + j];
              acc[ww] += sum;
            }
          }
        }
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
        forward_unit(g, fp, m, n, grp, y0, y1, op_);
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
  TORCH_CHECK(grad_out_in.dim() == 4 && grad_out_in.size(0) == g.N && grad_out_in.size(1) == g.C &&
                  grad_out_in.size(2) == g.sH && grad_out_in.size(3) == g.sW,
              op, ": argument 'grad_out' must have shape (", g.N, ", ", g.C, ", ", g.sH, ", ", g.sW,
              "), got ", grad_out_in.sizes());
  TORCH_CHECK(grad_out_in.scalar_type() == features_in.scalar_type() &&
                  grad_out_in.device() == features_in.device(),
              op, ": argument 'grad_out' must have the dtype and device of 'features' (",
              features_in.scalar_type(), ", ", features_in.device(), "), got ",
              grad_out_in.scalar_type(), ", ", grad_out_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor features = features_in.contiguous();
  const at::Tensor masks = masks_in.contiguous();
  at::Tensor grad_features = at::empty(features.sizes(), features.options());
  // Every element of both gradients is written below (zero included), so no zero fill here;
  // an empty group (C = 0) leaves nothing to reduce, hence the explicit zeros for that case.
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
      std::vector<scalar_t> buf, dp;
      for (int64_t u = begin; u < end; ++u) {
        const int64_t b = u % blocks, grp = (u / blocks) % g.G, n = u / (blocks * g.G);
        const int64_t h0 = b * kBlockRows, h1 = std::min(g.H, h0 + kBlockRows);
        MaskRows<scalar_t> m;
        if (fused) {
          // The feature gather reads the masks of low-resolution rows [h0 - r, h1 + r).
          const int64_t e0 = std::max<int64_t>(0, h0 - g.r) * g.s;
          const int64_t e1 = std::min<int64_t>(g.H, h1 + g.r) * g.s;
          buf.resize(static_cast<size_t>(g.k2 * (e1 - e0) * g.sW));
          normalise_rows(g, mp, n, grp, e0, e1, buf.data());
          m = {buf.data(), (e1 - e0) * g.sW, e0, g.sW};
          // dL/dlogit = p·(dp − Σ_t p·dp), scattered back through the pixel shuffle.
          dp.resize(static_cast<size_t>(g.k2 * g.sW));
          scalar_t* gl = gmp + (n * g.G + grp) * g.k2 * s2 * HW;
          for (int64_t y = h0 * g.s; y < h1 * g.s; ++y) {
            grad_mask_unit(g, gop, fp, n, grp, y,
                           [&](int64_t t) { return dp.data() + t * g.sW; });
            const int64_t h = y / g.s, i = y % g.s;
            for (int64_t x = 0; x < g.sW; ++x) {
              const int64_t w = x / g.s, j = x % g.s;
              scalar_t dot = 0;
              for (int64_t t = 0; t < g.k2; ++t) dot += m.row(t, y)[x] * dp[t * g.sW + x];
              scalar_t* dl = gl + (i * g.s + j) * HW + h * g.W + w;
              for (int64_t t = 0; t < g.k2; ++t)
                dl[t * s2 * HW] = m.row(t, y)[x] * (dp[t * g.sW + x] - dot);
            }
          }
        } else {
          const int64_t off = (n * g.G + grp) * g.k2 * g.sH * g.sW;
          m = {mp + off, g.sH * g.sW, 0, g.sW};
          scalar_t* gm = gmp + off;
          for (int64_t y = h0 * g.s; y < h1 * g.s; ++y)
            grad_mask_unit(g, gop, fp, n, grp, y,
                           [&](int64_t t) { return gm + t * g.sH * g.sW + y * g.sW; });
        }
        grad_feature_unit(g, gop, m, n, grp, h0, h1, gfp);
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

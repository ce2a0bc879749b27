"""The fused criss-cross attention CUDA kernels (csrc/cuda/cca_kernels.cuh), emulated on the host.

The device code is plain C++ over a scalar type, an mma policy and the tile sizes, so it compiles
with g++ given a few shims: one std::thread per CUDA thread, a std::barrier for __syncthreads,
blocks of a launch run one after another (one static array is the block's shared memory), and a
small nvcuda::wmma whose fragments hold the whole 16x16 tile in every thread (the kernels touch
fragments only through fill/load/store/mma, so its layout does not matter).

The kernels are instantiated with float and double at the production tile configurations of
csrc/cuda/cca.cu (ProdTilesFma through the scalar-FMA policy, as fp32/fp64 run on the GPU, and
ProdTiles16 through the wmma policy, as fp16/bf16 run, with the Cv group an sm_90 gets for 2-byte
elements; test_production_tiles_are_emulated ties the two files together) and at small tiles, so
that small images still have several own tiles, key tiles, Cv groups and zero-padded channel
chunks. The host driver launches them in the order of csrc/cuda/cca.cu (column pass, then row
pass; the forward through cca_fwd_line_kernel where the longer line fits the shared-memory limit,
through cca_lse_kernel and cca_pv_kernel otherwise, as the glue picks, and the cases cover both
at both production configurations by their `smem` limit), with q, k, v, dO in NHWC, and the
results are checked against armnet_ops.reference: out,
the saved lse, the three gradients, and the residual block (y, grad_gamma). cp.async is a plain
16-byte copy on the host: the double-buffer protocol (which buffer holds which chunk, the
barriers) is what runs here.

What this cannot check: fp16/bf16 rounding (test_line_forward_16bit_rounding models the line
forward's rounding points in torch instead), the real wmma fragment layout, the asynchrony of
cp.async, shared-memory limits, launch configurations and timing. The needs_cuda tests at the
end of this file (and the cuda backend of tests/test_cca.py) run the compiled kernels through
the registered ops; tests/test_sass.py reads their machine code.
"""
import ctypes
import math
import os
import re
import sys

import pytest
import torch

from armnet_ops import reference
from host_emulation import build_harness
from numerics import assert_close, needs_cuda


HARNESS = r"""
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <thread>
#include <type_traits>
#include <vector>

struct dim3 { unsigned x = 0, y = 0, z = 0; };
static thread_local dim3 blockIdx;
static thread_local dim3 threadIdx;
static dim3 blockDim;
static std::barrier<>* g_barrier = nullptr;
inline void __syncthreads() { g_barrier->arrive_and_wait(); }
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n)

// A host nvcuda::wmma: every thread of a warp holds a whole tile, but only lane 0 computes the
// products and stores (the kernels touch fragments only through load / fill / mma / store, and
// sync before anyone reads what was stored), which keeps the emulation 32 times cheaper.
namespace nvcuda { namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment { T x[M * N]; };
template <typename T, typename L>
void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, L>& f, const T* p, unsigned ld) {
  for (int i = 0; i < 16; ++i)
    for (int k = 0; k < 16; ++k)
      f.x[i * 16 + k] = std::is_same_v<L, row_major> ? p[i * ld + k] : p[k * ld + i];
}
template <typename T, typename L>
void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, L>& f, const T* p, unsigned ld) {
  for (int k = 0; k < 16; ++k)
    for (int j = 0; j < 16; ++j)
      f.x[k * 16 + j] = std::is_same_v<L, row_major> ? p[k * ld + j] : p[j * ld + k];
}
template <typename T>
void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, T v) {
  for (auto& e : f.x) e = v;
}
template <typename T, typename Tc, typename La, typename Lb>
void mma_sync(fragment<accumulator, 16, 16, 16, Tc>& d,
              const fragment<matrix_a, 16, 16, 16, T, La>& a,
              const fragment<matrix_b, 16, 16, 16, T, Lb>& b,
              const fragment<accumulator, 16, 16, 16, Tc>& c) {
  if ((threadIdx.x & 31) != 0) return;  // only lane 0's tile is ever stored (see above)
  Tc r[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      Tc s = c.x[i * 16 + j];
      for (int k = 0; k < 16; ++k) s += Tc(a.x[i * 16 + k]) * Tc(b.x[k * 16 + j]);
      r[i * 16 + j] = s;
    }
  std::copy(r, r + 256, d.x);
}
template <typename T>
void load_matrix_sync(fragment<accumulator, 16, 16, 16, T>& f, const T* p, unsigned ld, layout_t) {
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.x[i * 16 + j] = p[i * ld + j];
}
template <typename T>
void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, 16, T>& f, unsigned ld, layout_t) {
  if ((threadIdx.x & 31) != 0) return;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) p[i * ld + j] = f.x[i * 16 + j];
}
} }
#define ARMNET_CCA_HOST_WMMA 1

namespace armnet_ops { namespace cca_cuda {
alignas(128) unsigned char smem_raw[1 << 20];
} }
#include "cuda/cca_kernels.cuh"

using namespace armnet_ops::cca_cuda;

// One std::thread per CUDA thread for the whole launch; blocks one after another, a barrier
// between blocks (the shared memory is reused).
template <typename F>
static void launch(int64_t gx, int64_t gy, int threads, F body) {
  if (gx == 0 || gy == 0) return;
  std::barrier<> bar(threads);
  g_barrier = &bar;
  blockDim.x = threads;
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      threadIdx.x = t;
      for (int64_t by = 0; by < gy; ++by)
        for (int64_t bx = 0; bx < gx; ++bx) {
          blockIdx.x = static_cast<unsigned>(bx);
          blockIdx.y = static_cast<unsigned>(by);
          body();
          bar.arrive_and_wait();
        }
    });
  for (auto& th : pool) th.join();
}

// The column pass then the row pass, as the glue builds them; aligned as the glue decides it.
template <class Tl, typename T>
static void passes(int H, int W, std::initializer_list<const T*> operands, LinePass (&g)[2]) {
  const int64_t HW = int64_t(H) * W;
  bool aligned = true;
  for (const T* p : operands)
    aligned = aligned && (p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0);
  g[0] = LinePass{H, W, (H + Tl::BO - 1) / Tl::BO, 1, W, HW, true, aligned};
  g[1] = LinePass{W, H, (W + Tl::BO - 1) / Tl::BO, W, 1, HW, false, aligned};
}

static int64_t lines(const LinePass& g, int N) { return int64_t(N) * g.n_lines * g.tiles; }

// Whether the forward runs cca_fwd_line_kernel (as the glue decides it: both lines fit in
// smem_limit with elem_bytes-byte elements), else cca_lse_kernel + cca_pv_kernel.
template <class Tl, typename T>
static bool uses_line_kernel(int H, int W, int elem_bytes, int64_t limit) {
  return elem_bytes == 2 ? Smem<std::uint16_t, T, Tl>::line_fits(H, W, limit)
                         : Smem<T, T, Tl>::line_fits(H, W, limit);
}

// The launch sequence of csrc/cuda/cca.cu. q, k, v, go NHWC; go_nchw, residual and the outputs
// NCHW. The Cv group is what the glue picks on an sm_90 (smem_limit = 0) for an element of
// elem_bytes bytes (2: the fp16/bf16 production kernels), or for a smaller smem_limit (to get
// several groups at small Cv).
template <class Pol, class Tl, typename T>
static void run(int bwd, const T* q, const T* k, const T* v, const T* go, const T* go_nchw,
                const T* residual, const T* gamma, T* out, T* lse, T* y, T* gq, T* gk, T* gv,
                T* gpart, T* part, int N, int D, int Cv, int H, int W, T scale, int elem_bytes,
                int64_t smem_limit) {
  LinePass g[2];
  passes<Tl, T>(H, W, {q, k, v, go}, g);
  Args<T, T> a{};
  a.q = q; a.k = k; a.v = v; a.D = D; a.Cv = Cv; a.scale = scale; a.part = part;
  const int64_t limit = smem_limit > 0 ? smem_limit : kSmemSm90;
  a.group = elem_bytes == 2 ? Smem<std::uint16_t, T, Tl>::group_width(Cv, limit)
                            : Smem<T, T, Tl>::group_width(Cv, limit);
  const int64_t groups = a.group > 0 ? (Cv + a.group - 1) / a.group : 0;
  const int64_t d_tiles = (D + Tl::CT - 1) / Tl::CT;
  if (!bwd) {
    a.lse_out = lse; a.out = out;
    if (residual) { a.residual = residual; a.gamma = gamma; a.y = y; }
    if (uses_line_kernel<Tl, T>(H, W, elem_bytes, limit)) {
      for (int i = 0; i < 2; ++i)
        launch(lines(g[i], N), 1, Tl::kThreads,
               [&] { cca_fwd_line_kernel<Pol, Tl, T, T>(a, g[i], i == 1); });
      return;
    }
    for (int i = 0; i < 2; ++i)
      launch(lines(g[i], N), 1, Tl::kThreads,
             [&] { cca_lse_kernel<Pol, Tl, T, T>(a, g[i], i == 1); });
    a.lse = lse;
    for (int i = 0; i < 2; ++i)
      launch(lines(g[i], N), groups, Tl::kThreads,
             [&] { cca_pv_kernel<Pol, Tl, T, T, false>(a, g[i], i == 1); });
    return;
  }
  const int64_t total = int64_t(N) * H * W;
  std::vector<T> dd(total);
  launch((total + 63) / 64, 1, 64, [&] {
    cca_delta_kernel<T, T>(go_nchw, out, gamma, dd.data(), gpart, Cv, int64_t(H) * W, total);
  });
  a.go = go; a.gamma = gamma; a.lse = lse; a.dd = dd.data();
  T* grads[3] = {gq, gk, gv};
  for (int which = 0; which < 3; ++which) {
    a.out = grads[which];
    for (int i = 0; i < 2; ++i) {
      if (which == 0)
        launch(lines(g[i], N), d_tiles, Tl::kThreads,
               [&] { cca_grad_kernel<Pol, Tl, T, T, false>(a, g[i], i == 1); });
      else if (which == 1)
        launch(lines(g[i], N), d_tiles, Tl::kThreads,
               [&] { cca_grad_kernel<Pol, Tl, T, T, true>(a, g[i], i == 1); });
      else
        launch(lines(g[i], N), groups, Tl::kThreads,
               [&] { cca_pv_kernel<Pol, Tl, T, T, true>(a, g[i], i == 1); });
    }
  }
}

// The configurations: 0 and 1 are the production ones of cca.cu (Kind<float/double> and
// Kind<Half/BFloat16>), the others small test tiles.
template <typename T>
static void dispatch(int cfg, int bwd, const T* q, const T* k, const T* v, const T* go,
                     const T* go_nchw, const T* residual, const T* gamma, T* out, T* lse, T* y,
                     T* gq, T* gk, T* gv, T* gpart, T* part, int N, int D, int Cv, int H, int W,
                     T scale, int64_t smem_limit) {
#define ARGS bwd, q, k, v, go, go_nchw, residual, gamma, out, lse, y, gq, gk, gv, gpart, part, N, \
             D, Cv, H, W, scale
  switch (cfg) {
    case 0: run<FmaPolicy<T, T>, ProdTilesFma, T>(ARGS, sizeof(T), smem_limit); break;
    case 1: run<WmmaPolicy<T, T>, ProdTiles16, T>(ARGS, 2, smem_limit); break;
    case 2: run<FmaPolicy<T, T>, Tiles<16, 16, 16>, T>(ARGS, sizeof(T), smem_limit); break;
    case 3: run<WmmaPolicy<T, T>, Tiles<32, 16, 16>, T>(ARGS, sizeof(T), smem_limit); break;
    case 4: run<WmmaPolicy<T, T>, Tiles<16, 32, 16>, T>(ARGS, sizeof(T), smem_limit); break;
    default: break;
  }
#undef ARGS
}

// The Cv group the harness uses (what the glue launches) for a configuration.
template <typename T>
static int group_of(int cfg, int Cv, int64_t smem_limit) {
  const int64_t limit = smem_limit > 0 ? smem_limit : kSmemSm90;
  switch (cfg) {
    case 0: return Smem<T, T, ProdTilesFma>::group_width(Cv, limit);
    case 1: return Smem<std::uint16_t, T, ProdTiles16>::group_width(Cv, limit);
    case 2: return Smem<T, T, Tiles<16, 16, 16>>::group_width(Cv, limit);
    case 3: return Smem<T, T, Tiles<32, 16, 16>>::group_width(Cv, limit);
    case 4: return Smem<T, T, Tiles<16, 32, 16>>::group_width(Cv, limit);
    default: return 0;
  }
}

// Whether the harness's forward runs the line kernel (what the glue launches) for a configuration.
template <typename T>
static int line_of(int cfg, int H, int W, int64_t smem_limit) {
  const int64_t limit = smem_limit > 0 ? smem_limit : kSmemSm90;
  switch (cfg) {
    case 0: return uses_line_kernel<ProdTilesFma, T>(H, W, sizeof(T), limit);
    case 1: return uses_line_kernel<ProdTiles16, T>(H, W, 2, limit);
    case 2: return uses_line_kernel<Tiles<16, 16, 16>, T>(H, W, sizeof(T), limit);
    case 3: return uses_line_kernel<Tiles<32, 16, 16>, T>(H, W, sizeof(T), limit);
    case 4: return uses_line_kernel<Tiles<16, 32, 16>, T>(H, W, sizeof(T), limit);
    default: return 0;
  }
}

extern "C" {
#define EMULATE(NAME, T)                                                                          \
  void NAME(int cfg, int bwd, const T* q, const T* k, const T* v, const T* go, const T* go_nchw,  \
            const T* residual, const T* gamma, T* out, T* lse, T* y, T* gq, T* gk, T* gv,         \
            T* gpart, T* part, int N, int D, int Cv, int H, int W, double scale,                  \
            long long smem_limit) {                                                               \
    dispatch<T>(cfg, bwd, q, k, v, go, go_nchw, residual, gamma, out, lse, y, gq, gk, gv, gpart,  \
                part, N, D, Cv, H, W, static_cast<T>(scale), smem_limit);                         \
  }
EMULATE(cca_emulate_f32, float)
EMULATE(cca_emulate_f64, double)
int cca_group_f32(int cfg, int Cv, long long smem_limit) {
  return group_of<float>(cfg, Cv, smem_limit);
}
int cca_group_f64(int cfg, int Cv, long long smem_limit) {
  return group_of<double>(cfg, Cv, smem_limit);
}
int cca_line_f32(int cfg, int H, int W, long long smem_limit) {
  return line_of<float>(cfg, H, W, smem_limit);
}
int cca_line_f64(int cfg, int H, int W, long long smem_limit) {
  return line_of<double>(cfg, H, W, smem_limit);
}
}
"""

# (policy, BO, BK, CT) of each configuration the harness instantiates; 0 and 1 are the production
# tiles of csrc/cuda/cca.cu (checked against the header below, so the two cannot drift apart).
CONFIGS = {0: ("fma", 64, 32, 32), 1: ("wmma", 128, 64, 32), 2: ("fma", 16, 16, 16),
           3: ("wmma", 32, 16, 16), 4: ("wmma", 16, 32, 16)}
PRODUCTION = {0: "ProdTilesFma", 1: "ProdTiles16"}


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    lib = build_harness(tmp_path_factory.mktemp("cca_emulation"), "cca_emulation", HARNESS)
    for fn in (lib.cca_group_f32, lib.cca_group_f64):
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong]
    for fn in (lib.cca_line_f32, lib.cca_line_f64):
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_longlong]
    return lib


def test_production_tiles_are_emulated():
    """The harness's configurations 0 and 1 are the tiles cca.cu launches: Kind<float/double>
    uses ProdTilesFma and Kind<Half/BFloat16> ProdTiles16, whose sizes are those in CONFIGS."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "csrc", "cuda", "cca_kernels.cuh")) as f:
        header = f.read()
    with open(os.path.join(root, "csrc", "cuda", "cca.cu")) as f:
        glue = f.read()
    for cfg, name in PRODUCTION.items():
        _, bo, bk, ct = CONFIGS[cfg]
        assert re.search(rf"using {name} = Tiles<{bo}, {bk}, {ct}>;", header), name
    kinds = dict(re.findall(r"struct Kind<(at::\w+|float|double)>\s*:\s*KindOf<[^>]*?cca_cuda::"
                            r"(ProdTiles\w+)>", glue))
    assert kinds == {"at::Half": "ProdTiles16", "at::BFloat16": "ProdTiles16",
                     "float": "ProdTilesFma", "double": "ProdTilesFma"}, kinds


def _nhwc(t):
    return None if t is None else t.permute(0, 2, 3, 1).contiguous()


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None and t.numel() else None)


def _emulate(lib, cfg, q, k, v, go, residual, gamma, scale, smem_limit=0):
    """Runs the emulated forward then backward (q, k, v, go given NCHW, passed NHWC as the glue
    does); every output starts as NaN, so an element a kernel forgets to write shows up."""
    N, D, H, W = q.shape
    Cv = v.shape[1]
    dt = q.dtype
    fn = lib.cca_emulate_f64 if dt == torch.float64 else lib.cca_emulate_f32
    nan = float("nan")
    out = torch.full((N, Cv, H, W), nan, dtype=dt)
    lse = torch.full((N, H, W), nan, dtype=dt)
    y = torch.full((N, Cv, H, W), nan, dtype=dt) if residual is not None else None
    gq, gk = torch.full_like(q, nan), torch.full_like(k, nan)
    gv = torch.full_like(v, nan)
    gpart = torch.full((N, H, W), nan, dtype=dt) if residual is not None else None
    part = torch.full((N * max(D, Cv) * H * W,), nan, dtype=dt)
    sizes = [ctypes.c_int(s) for s in (N, D, Cv, H, W)]
    qn, kn, vn, gon = (_nhwc(t) for t in (q, k, v, go))

    def call(bwd):
        fn(ctypes.c_int(cfg), ctypes.c_int(bwd), _ptr(qn), _ptr(kn), _ptr(vn), _ptr(gon), _ptr(go),
           _ptr(residual), _ptr(gamma), _ptr(out), _ptr(lse), _ptr(y), _ptr(gq), _ptr(gk),
           _ptr(gv), _ptr(gpart), _ptr(part), *sizes, ctypes.c_double(scale),
           ctypes.c_longlong(smem_limit))

    call(0)
    call(1)
    return out, lse, y, gq, gk, gv, gpart


def _reference_lse(q, k, scale):
    """The log-sum-exp over the H+W-1 keys of each pixel (row with self, column without)."""
    H = q.shape[2]
    e_row = torch.einsum("nchw,nchg->nhwg", q, k) * scale
    e_col = torch.einsum("nchw,ncgw->nhwg", q, k) * scale
    self_key = torch.eye(H, dtype=torch.bool)[None, :, None, :]
    e_col = e_col.masked_fill(self_key, float("-inf"))
    return torch.logsumexp(torch.cat([e_row, e_col], dim=-1), dim=-1)



CASES = [
    # cfg, N, Cqk, Cv, H, W, dtype, residual, smem limit (0: an sm_90's, as the glue; smaller
    # limits give several Cv groups of 16 at small Cv)
    # production tiles of fp32/fp64 (FMA, BO = 64, BK = 32, CT = 32)
    (0, 2, 8, 24, 5, 7, torch.float64, False, 0),     # Cqk padded within one chunk
    (0, 1, 3, 5, 1, 9, torch.float64, True, 0),       # H = 1: the column pass has no keys
    (0, 1, 4, 6, 9, 1, torch.float32, True, 0),       # W = 1
    (0, 1, 72, 40, 70, 3, torch.float32, True, 0),    # 2 own tiles, 3 key tiles, Cqk > 2·CT
    (0, 1, 16, 300, 3, 4, torch.float64, True, 0),    # Cv = 300: two groups (256 + 44) in fp64
    (0, 1, 8, 12, 34, 33, torch.float32, False, 0),   # 16-byte channel vectors (cp.async path)
    (0, 1, 72, 40, 70, 3, torch.float32, True, 64 << 10),  # a 70-line does not fit: lse + P·V
    (0, 1, 8, 12, 2, 384, torch.float32, False, 0),   # the longest fp32 line that fits
    # production tiles of fp16/bf16 (wmma, BO = 128, BK = 64, CT = 32), in float / double
    (1, 1, 64, 32, 6, 97, torch.float32, True, 0),    # CCNet's Cqk, W = 97 in one own tile
    (1, 1, 20, 17, 17, 18, torch.float64, True, 0),   # scalar loads, tails
    (1, 1, 8, 300, 3, 5, torch.float32, True, 0),     # Cv = 300 > 288: two Cv groups
    (1, 1, 70, 9, 130, 2, torch.float64, False, 0),   # H = 130: 2 own tiles, 3 key tiles
    (1, 1, 70, 300, 130, 2, torch.float32, False, 150 << 10),  # lse + P·V, 3 Cv groups
    (1, 1, 16, 40, 2, 256, torch.float32, True, 0),   # the longest line that fits (226 KiB)
    (1, 2, 5, 7, 1, 3, torch.float64, True, 0),
    # small test tiles: many tiles and groups on small images
    (2, 2, 5, 33, 17, 21, torch.float64, True, 21 << 10),  # fma 16/16/16, 3 Cv groups
    (2, 1, 1, 1, 1, 1, torch.float64, True, 21 << 10),     # one pixel: a single row key
    (3, 1, 33, 40, 35, 6, torch.float32, False, 18 << 10),  # Cqk > 2·CT: own side reloaded
    (4, 1, 16, 24, 33, 34, torch.float32, True, 15 << 10),  # BK > BO, 2 Cv groups
    (4, 1, 7, 9, 2, 2, torch.float64, False, 0),
]


@pytest.mark.parametrize("cfg,N,D,Cv,H,W,dtype,with_residual,smem", CASES)
def test_cuda_kernels_emulated(emulation, cfg, N, D, Cv, H, W, dtype, with_residual, smem):
    torch.manual_seed(1000 * cfg + 10 * H + W)
    scale = 0.7 if D < 32 else D ** -0.5
    q = torch.randn(N, D, H, W, dtype=torch.float64)
    k = torch.randn(N, D, H, W, dtype=torch.float64)
    v = torch.randn(N, Cv, H, W, dtype=torch.float64)
    grad = torch.randn(N, Cv, H, W, dtype=torch.float64)
    residual = torch.randn(N, Cv, H, W, dtype=torch.float64) if with_residual else None
    gamma = torch.tensor([0.6], dtype=torch.float64) if with_residual else None

    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref_out = reference.criss_cross_attention(qr, kr, vr, scale)
    if with_residual:
        gr = gamma.clone().requires_grad_()
        ref_y = gr * ref_out + residual
        ref_y.backward(grad)
    else:
        ref_out.backward(grad)
    ref_lse = _reference_lse(q, k, scale)

    conv = (lambda t: None if t is None else t.to(dtype).contiguous())
    limit = smem
    group_fn = emulation.cca_group_f64 if dtype == torch.float64 else emulation.cca_group_f32
    group = group_fn(cfg, Cv, limit)
    assert group > 0
    out, lse, y, gq, gk, gv, gpart = _emulate(
        emulation, cfg, conv(q), conv(k), conv(v), conv(grad), conv(residual), conv(gamma), scale,
        limit)
    what = f"emulated CUDA ({CONFIGS[cfg]}, {dtype}, Cv group {group})"
    assert_close(out, ref_out.detach(), what=f"{what} out")
    assert_close(lse, ref_lse, what=f"{what} lse")
    assert_close(gq, qr.grad, what=f"{what} grad q")
    assert_close(gk, kr.grad, what=f"{what} grad k")
    assert_close(gv, vr.grad, what=f"{what} grad v")
    if with_residual:
        assert_close(y, ref_y.detach(), what=f"{what} y")
        assert_close(gpart.sum().reshape(1), gr.grad, what=f"{what} grad gamma")


def test_cv_groups_as_launched(emulation):
    """The Cv groups of cca_pv_kernel (the forward's fallback for long lines, and dv) the cases
    rely on: the fp16/bf16 production kernel fits 288 channels per group on an sm_90 (two groups
    at CCNet's Cv = 512), the fp64 one 256 (two groups at Cv = 300), and the small limits give
    several groups."""
    assert emulation.cca_group_f32(1, 512, 0) == 288
    assert emulation.cca_group_f32(1, 300, 0) == 288
    assert emulation.cca_group_f64(0, 300, 0) == 256
    assert emulation.cca_group_f64(2, 33, 21 << 10) == 16


def test_traffic_model_uses_the_launched_tiles(emulation):
    """benchmarks/traffic.py models the tiles and Cv groups the kernels are launched with."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    import traffic
    assert traffic.TILES[2] == CONFIGS[1][1:]
    assert traffic.TILES[4] == traffic.TILES[8] == CONFIGS[0][1:]
    for cv in (1, 33, 300, 512, 1000):
        assert traffic.pv_group(cv, 2) == emulation.cca_group_f32(1, cv, 0), cv
        assert traffic.pv_group(cv, 4) == emulation.cca_group_f32(0, cv, 0), cv
        assert traffic.pv_group(cv, 8) == emulation.cca_group_f64(0, cv, 0), cv
    # the forward's kernel choice (line kernel or lse + P·V), at and around the limits: fp16/bf16
    # lines up to 256, fp32 384, fp64 160 on an sm_90
    for h, w in ((1, 1), (97, 97), (128, 256), (256, 257), (160, 3), (161, 3), (384, 2), (385, 2)):
        assert traffic.line_fits(h, w, 2) == bool(emulation.cca_line_f32(1, h, w, 0)), (h, w)
        assert traffic.line_fits(h, w, 4) == bool(emulation.cca_line_f32(0, h, w, 0)), (h, w)
        assert traffic.line_fits(h, w, 8) == bool(emulation.cca_line_f64(0, h, w, 0)), (h, w)
    assert traffic.line_fits(128, 256, 2) and not traffic.line_fits(257, 3, 2)
    assert traffic.line_fits(384, 1, 4) and not traffic.line_fits(385, 1, 4)
    assert traffic.line_fits(160, 1, 8) and not traffic.line_fits(161, 1, 8)
    # the modelled forward at (2, 64, 512, 97, 97) bf16 runs the line kernel, within 3x the minimum
    fwd = traffic.cca_cuda_traffic(2, 64, 512, 97, 97, 2, "forward", channels_last=True)
    assert list(fwd["kernels"]) == ["line (q·k, P, P·V)"] and fwd["ratio"] <= 3.0, fwd


def test_both_forward_paths_are_emulated(emulation):
    """The cases run the line kernel and the lse + P·V fallback at both production tile
    configurations (the glue picks by the shared-memory fit of the longer line)."""
    paths = set()
    for cfg, _, _, _, H, W, dtype, _, smem in CASES:
        fn = emulation.cca_line_f64 if dtype == torch.float64 else emulation.cca_line_f32
        paths.add((cfg, bool(fn(cfg, H, W, smem))))
    assert {(0, True), (0, False), (1, True), (1, False)} <= paths, paths


def _line_forward_model(q, k, v, scale, dtype):
    """The rounding points of cca_fwd_line_kernel in fp16/bf16, modelled in torch (this harness
    instantiates the kernels with float and double only): q, k, v rounded to dtype; energies and
    each pass's softmax state (m, l) in fp32; P rounded to dtype; P·V accumulated in fp32; the
    column pass's part = P_c·V / l_c rounded to dtype; out = exp(m_r - lse)·P_r·V +
    exp(lse_c - lse)·part with lse = logaddexp(lse_c, lse_r), rounded once to dtype."""
    q, k, v = (t.to(dtype).double() for t in (q, k, v))
    H = q.shape[2]
    e_col = (torch.einsum("nchw,ncgw->nhwg", q, k) * scale).float()
    e_col = e_col.masked_fill(torch.eye(H, dtype=torch.bool)[None, :, None, :], float("-inf"))
    e_row = (torch.einsum("nchw,nchg->nhwg", q, k) * scale).float()

    def state(e):
        m = e.amax(-1, keepdim=True)
        p = torch.exp(e - m)
        return m, p.sum(-1, keepdim=True), p.to(dtype).double()

    (m_c, l_c, p_c), (m_r, l_r, p_r) = state(e_col), state(e_row)
    acc_c = torch.einsum("nhwg,ncgw->nchw", p_c, v).float()
    acc_r = torch.einsum("nhwg,nchg->nchw", p_r, v).float()
    per_pixel = lambda t: t[..., 0][:, None]  # (N, H, W, 1) -> (N, 1, H, W)
    part = (acc_c / per_pixel(l_c)).to(dtype)
    lse_c, lse_r = m_c + torch.log(l_c), m_r + torch.log(l_r)
    lse = torch.logaddexp(lse_c, lse_r)
    out = (acc_r * per_pixel(torch.exp(m_r - lse))
           + part.float() * per_pixel(torch.exp(lse_c - lse)))
    return out.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,D,Cv,H,W,scale", [
    (2, 64, 512, 23, 29, 64 ** -0.5),  # CCNet's channels
    (1, 16, 64, 40, 40, 3.0),          # peaked softmax: large energies
])
def test_line_forward_16bit_rounding(N, D, Cv, H, W, scale, dtype):
    """The line forward's 16-bit error bound: storing the column pass's part in the element type
    (which keeps the traffic model under 3x the minimum) rounds the column contribution twice.
    Against the fp64 reference of the rounded inputs, the modelled output stays within 1 ulp of
    the output scale (2^floor(log2 max|ref|) · eps), and within the tests' rule for 16-bit
    outputs (tests/numerics.py: twice the error of the reference formulation run in dtype, the
    einsum one, plus half an eps). Measured when written: 0.6-0.8 ulp (0.4-0.5 ulp with an fp32
    part) against 1.3-10 ulp for the einsum formulation in the same dtype. A model of the rounding
    points, not the compiled kernel: the real fp16/bf16 kernels run only in the needs_cuda tests."""
    torch.manual_seed(N + D + H)
    q, k = torch.randn(N, D, H, W, dtype=torch.float64), torch.randn(N, D, H, W, dtype=torch.float64)
    v = torch.randn(N, Cv, H, W, dtype=torch.float64)
    low = [t.to(dtype) for t in (q, k, v)]
    ref = reference.criss_cross_attention(*(t.double() for t in low), scale)
    out = _line_forward_model(q, k, v, scale, dtype)
    ulp = 2.0 ** math.floor(math.log2(ref.abs().max().item())) * torch.finfo(dtype).eps
    err = (out.double() - ref).abs().max().item()
    assert err <= ulp, f"{dtype}: line forward model error {err:.3e} > 1 ulp ({ulp:.3e})"
    einsum_lowp = reference.criss_cross_attention(*low, scale)
    assert_close(out, ref, einsum_lowp, f"line forward model {dtype}")


def test_backward_is_deterministic(emulation):
    """Two runs give bitwise-equal gradients (a gather formulation, no atomics)."""
    torch.manual_seed(7)
    q, k = torch.randn(1, 5, 6, 9), torch.randn(1, 5, 6, 9)
    v, go = torch.randn(1, 7, 6, 9), torch.randn(1, 7, 6, 9)
    a = _emulate(emulation, 0, q, k, v, go, None, None, 1.0)
    b = _emulate(emulation, 0, q, k, v, go, None, None, 1.0)
    for x, y in zip(a, b):
        if x is not None:
            assert torch.equal(x, y)


# ---- the compiled kernels, on a GPU -------------------------------------------------------------
# The registered CUDA ops called directly, the residual pair included, against the fp64 reference
# (fp16/bf16 by the rule of tests/numerics.py, with the reference run in that precision).

GPU = "cuda"


def _ops():
    return torch.ops.armnet_ops


def _reference_block(q, k, v, x, gamma, grad, scale):
    """out, y = gamma·out + x, and the gradients of y (q, k, v, gamma) by autograd."""
    q, k, v, gamma = (t.detach().clone().requires_grad_() for t in (q, k, v, gamma))
    out = reference.criss_cross_attention(q, k, v, scale)
    y = gamma * out + x
    y.backward(grad)
    return out.detach(), y.detach(), q.grad, k.grad, v.grad, gamma.grad


def _skip_without_bf16(dtype):
    if dtype == torch.bfloat16 and GPU == "cuda" and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("bfloat16 needs compute capability 8.0 (the op refuses it below)")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,D,Cv,H,W", [
    (2, 64, 512, 33, 37),   # CCNet's channel ratio, several Cv tiles, two tiles along each line
    (1, 8, 24, 97, 97),     # mmcv's published spatial size, Cqk padded to 16
    (2, 5, 7, 1, 70),       # H = 1
    (1, 3, 130, 65, 1),     # W = 1, a Cv tail
    (1, 16, 16, 64, 64),    # 16-byte channel vectors (cp.async) in 16-bit and fp32
    (1, 64, 300, 130, 9),   # two own tiles along h, Cv = 300 (line kernel in every dtype)
    (1, 8, 300, 300, 3),    # H = 300: fp16/bf16 take the lse + P·V fallback (two Cv groups)
    (1, 4, 24, 2, 400),     # W = 400: fp32 takes the fallback too
])
def test_cuda_ops_on_gpu(dtype, N, D, Cv, H, W):
    _skip_without_bf16(dtype)
    ops = _ops()
    scale = D ** -0.5
    gen = torch.Generator(device=GPU).manual_seed(N + D + Cv + H + W)
    mk = lambda c: torch.randn(N, c, H, W, device=GPU, dtype=torch.float64, generator=gen)
    q, k, v, x, grad = mk(D), mk(D), mk(Cv), mk(Cv), mk(Cv)
    gamma = torch.tensor([0.6], device=GPU, dtype=torch.float64)
    ref = _reference_block(q, k, v, x, gamma, grad, scale)
    low = [t.to(dtype) for t in (q, k, v, x, grad)]
    g32 = gamma.float()
    ref_low = None
    if dtype != torch.float32:
        ref_low = _reference_block(*low[:4], g32, low[4].float(), scale)
        ref_low = tuple(t.to(dtype) if t.dtype != torch.float32 or i < 5 else t
                        for i, t in enumerate(ref_low))
    ql, kl, vl, xl, gl = low
    y, out, lse = ops.cca_residual_forward(ql, kl, vl, xl, g32, scale)
    gq, gk, gv, gg = ops.cca_residual_backward(gl, ql, kl, vl, out, lse, g32, scale)
    pick = (lambda i: None) if ref_low is None else (lambda i: ref_low[i])
    what = f"cuda {dtype} {(N, D, Cv, H, W)}"
    assert y.dtype == out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out, ref[0], pick(0), f"{what} out")
    assert_close(y, ref[1], pick(1), f"{what} y")
    # lse is float32 from fp32-accumulated energies: against the fp64 lse of the rounded inputs
    ref_lse = _reference_lse(ql.double().cpu(), kl.double().cpu(), scale).to(GPU)
    assert_close(lse, ref_lse, None, f"{what} lse")
    for i, (got, name) in enumerate(zip((gq, gk, gv), ("grad q", "grad k", "grad v"))):
        assert got.dtype == dtype
        assert_close(got, ref[2 + i], pick(2 + i), f"{what} {name}")
    assert gg.shape == gamma.shape and gg.dtype == torch.float32
    if dtype == torch.float32:
        assert_close(gg, ref[5], None, f"{what} grad gamma")
    else:  # <grad_y, out> with out rounded to dtype: the low-precision reference's error
        lowp_gg = (gl.float() * ref_low[0].float()).sum().reshape(1)
        bound = 2 * (lowp_gg.double() - ref[5]).abs().item() + 1e-3 * ref[5].abs().item()
        assert (gg.double() - ref[5]).abs().item() <= bound, f"{what} grad gamma"
    # the plain pair runs the same kernels: gamma = 1, no epilogue
    out2, lse2 = ops.cca_forward(ql, kl, vl, scale)
    assert torch.equal(out2, out) and torch.equal(lse2, lse)
    gq2, gk2, gv2 = ops.cca_backward(gl * 0.5, ql, kl, vl, out, lse, scale)
    lowp_gv = None if ref_low is None else 0.5 * ref_low[4].double() / 0.6
    assert_close(gv2, 0.5 * ref[4] / 0.6, lowp_gv, f"{what} cca_backward grad v")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_channels_last_inputs(dtype):
    """channels_last q, k, v (read in place, no transpose) give the very same results as NCHW
    ones, and the outputs are contiguous NCHW either way."""
    _skip_without_bf16(dtype)
    ops = _ops()
    q, k = (torch.randn(2, 16, 21, 37, device=GPU, dtype=dtype) for _ in range(2))
    v, g = (torch.randn(2, 40, 21, 37, device=GPU, dtype=dtype) for _ in range(2))
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (q, k, v, g)]
    out, lse = ops.cca_forward(q, k, v, 1.0)
    out_cl, lse_cl = ops.cca_forward(*cl[:3], 1.0)
    assert out_cl.is_contiguous() and torch.equal(out_cl, out) and torch.equal(lse_cl, lse)
    grads = ops.cca_backward(g, q, k, v, out, lse, 1.0)
    grads_cl = ops.cca_backward(cl[3], *cl[:3], out, lse, 1.0)
    for a, b in zip(grads, grads_cl):
        assert b.is_contiguous() and torch.equal(a, b)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backward_deterministic(dtype):
    _skip_without_bf16(dtype)
    ops = _ops()
    q, k = (torch.randn(2, 16, 45, 51, device=GPU, dtype=dtype) for _ in range(2))
    v, g = (torch.randn(2, 96, 45, 51, device=GPU, dtype=dtype) for _ in range(2))
    out, lse = ops.cca_forward(q, k, v, 1.0)
    a = ops.cca_backward(g, q, k, v, out, lse, 1.0)
    b = ops.cca_backward(g, q, k, v, out, lse, 1.0)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@needs_cuda
def test_cuda_ops_empty_and_bad_input():
    ops = _ops()
    q = torch.randn(0, 4, 5, 6, device=GPU)
    v = torch.randn(0, 7, 5, 6, device=GPU)
    out, lse = ops.cca_forward(q, q, v, 1.0)
    assert out.shape == (0, 7, 5, 6) and lse.shape == (0, 5, 6)
    q = torch.randn(1, 4, 5, 6, device=GPU)
    v = torch.randn(1, 7, 5, 6, device=GPU)
    with pytest.raises(RuntimeError, match="gamma"):
        ops.cca_residual_forward(q, q, v, v, torch.ones(2, device=GPU), 1.0)
    with pytest.raises(RuntimeError, match="residual"):
        ops.cca_residual_forward(q, q, v, q, torch.ones(1, device=GPU), 1.0)

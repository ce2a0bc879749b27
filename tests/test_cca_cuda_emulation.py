"""The fused criss-cross attention CUDA kernels (csrc/cuda/cca_kernels.cuh), emulated on the host.

The device code is plain C++ over a scalar type, an mma policy and the tile sizes, so it compiles
with g++ given the shims of tests/host_emulation.py: one std::thread per CUDA thread, a
std::barrier for __syncthreads, blocks of a (2-D) grid run one after another (one static array is
the block's shared memory), the host __half / __nv_bfloat16 (conversions from float round to
nearest even, as on the device) and a small nvcuda::wmma whose fragments hold the whole 16x16 tile
(the kernels touch fragments only through fill/load/store/mma, so its layout does not matter).

Every kernel (cca_fwd_line_kernel for out and lse where the longer line fits the shared-memory
limit, else cca_lse_kernel and cca_pv_kernel, as the glue picks, the cases covering both paths by
their `smem` limit; cca_pv_kernel for dv, cca_grad_kernel for dq and dk, cca_delta_kernel),
forward and backward, plain and residual, runs in the launch order of csrc/cuda/cca.cu (column
pass, then row pass; q, k, v, dO in NHWC):
* fp16 and bf16 as on the GPU: WmmaPolicy<T, float> at ProdTiles16 (16-bit fragments, fp32
  accumulators), with the element-type roundings (P and dS for their mma, the part buffer, the
  outputs); checked per element within bounds derived from those roundings, against a replay of
  the roundings in fp64, and against the einsum formulation in the same dtype (never less
  accurate), see test_cuda_kernels_emulated_16bit;
* float and double at both production tile configurations (ProdTilesFma through the scalar-FMA
  policy, as fp32/fp64 run on the GPU; ProdTiles16 through the wmma policy with the Cv group an
  sm_90 gets for 2-byte elements) and at small tiles, so that small images still have several own
  tiles, key tiles, Cv groups and zero-padded channel chunks.
test_production_tiles_are_emulated ties the configurations to cca.cu. Results are checked against
armnet_ops.reference: out, the saved lse, the three gradients, and the residual block (y,
grad_gamma). cp.async is a plain 16-byte copy on the host: the double-buffer protocol (which
buffer holds which chunk, the barriers) is what runs here.

What this cannot check: the real wmma fragment layout and the tensor cores' summation order, the
asynchrony of cp.async, shared-memory limits, launch configurations and timing. The needs_cuda
tests at the end of this file (and the cuda backend of tests/test_cca.py) run the compiled
kernels through the registered ops; tests/test_sass.py reads their machine code.
"""
import ctypes
import math
import os
import re
import sys

import pytest
import torch

from armnet_ops import reference
from host_emulation import HOST_CUDA, HOST_HALF, HOST_WMMA, build_harness
from numerics import assert_close, needs_cuda


HARNESS = HOST_CUDA + r"""
#include <algorithm>
#include <cstdlib>
#include <initializer_list>
#include <type_traits>
#define __shared__
#define __align__(n)
namespace armnet_ops { namespace cca_cuda {
alignas(128) unsigned char smem_raw[1 << 20];  // every block's dynamic shared memory
} }
""" + HOST_HALF + HOST_WMMA + r"""
#define ARMNET_CCA_HOST_WMMA 1
#include "cuda/cca_kernels.cuh"

using namespace armnet_ops::cca_cuda;

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
template <class Tl, typename T, typename A>
static bool uses_line_kernel(int H, int W, int elem_bytes, int64_t limit) {
  return elem_bytes == 2 ? Smem<std::uint16_t, A, Tl>::line_fits(H, W, limit)
                         : Smem<T, A, Tl>::line_fits(H, W, limit);
}

// THE LAUNCH SEQUENCE of csrc/cuda/cca.cu, for every element type T (float, double, __half,
// __nv_bfloat16) and op-math type A (T, or float for the 16-bit types) alike: a kernel added here
// is emulated in every dtype and configuration of dispatch below. q, k, v, go NHWC; go_nchw,
// residual and the outputs NCHW; lse, gamma, gpart in A. The Cv group is what the glue picks on
// an sm_90 (smem_limit = 0) for an element of elem_bytes bytes (2: the fp16/bf16 production
// kernels, also when float stands in for them), or for a smaller smem_limit (several groups).
template <class Pol, class Tl, typename T, typename A>
static void run(int bwd, const T* q, const T* k, const T* v, const T* go, const T* go_nchw,
                const T* residual, const A* gamma, T* out, A* lse, T* y, T* gq, T* gk, T* gv,
                A* gpart, T* part, int N, int D, int Cv, int H, int W, A scale, int elem_bytes,
                int64_t smem_limit) {
  LinePass g[2];
  passes<Tl, T>(H, W, {q, k, v, go}, g);
  Args<T, A> a{};
  a.q = q; a.k = k; a.v = v; a.D = D; a.Cv = Cv; a.scale = scale; a.part = part;
  const int64_t limit = smem_limit > 0 ? smem_limit : kSmemSm90;
  a.group = elem_bytes == 2 ? Smem<std::uint16_t, A, Tl>::group_width(Cv, limit)
                            : Smem<T, A, Tl>::group_width(Cv, limit);
  const int64_t groups = a.group > 0 ? (Cv + a.group - 1) / a.group : 0;
  const int64_t d_tiles = (D + Tl::CT - 1) / Tl::CT;
  if (!bwd) {
    a.lse_out = lse; a.out = out;
    if (residual) { a.residual = residual; a.gamma = gamma; a.y = y; }
    if (uses_line_kernel<Tl, T, A>(H, W, elem_bytes, limit)) {
      for (int i = 0; i < 2; ++i)
        launch(lines(g[i], N), 1, Tl::kThreads,
               [&] { cca_fwd_line_kernel<Pol, Tl, T, A>(a, g[i], i == 1); });
      return;
    }
    for (int i = 0; i < 2; ++i)
      launch(lines(g[i], N), 1, Tl::kThreads,
             [&] { cca_lse_kernel<Pol, Tl, T, A>(a, g[i], i == 1); });
    a.lse = lse;
    for (int i = 0; i < 2; ++i)
      launch(lines(g[i], N), groups, Tl::kThreads,
             [&] { cca_pv_kernel<Pol, Tl, T, A, false>(a, g[i], i == 1); });
    return;
  }
  const int64_t total = int64_t(N) * H * W;
  std::vector<A> dd(total);
  launch((total + 63) / 64, 64, [&] {
    cca_delta_kernel<T, A>(go_nchw, out, gamma, dd.data(), gpart, Cv, int64_t(H) * W, total);
  });
  a.go = go; a.gamma = gamma; a.lse = lse; a.dd = dd.data();
  a.out = gq;
  for (int i = 0; i < 2; ++i)
    launch(lines(g[i], N), d_tiles, Tl::kThreads,
           [&] { cca_grad_kernel<Pol, Tl, T, A, false>(a, g[i], i == 1); });
  a.out = gk;
  for (int i = 0; i < 2; ++i)
    launch(lines(g[i], N), d_tiles, Tl::kThreads,
           [&] { cca_grad_kernel<Pol, Tl, T, A, true>(a, g[i], i == 1); });
  a.out = gv;
  for (int i = 0; i < 2; ++i)
    launch(lines(g[i], N), groups, Tl::kThreads,
           [&] { cca_pv_kernel<Pol, Tl, T, A, true>(a, g[i], i == 1); });
}

// The configurations: 0 and 1 are the production ones of cca.cu (Kind<float/double>: FmaPolicy
// at ProdTilesFma; Kind<Half/BFloat16>: WmmaPolicy<T, float> at ProdTiles16, here also run with
// float/double elements), the others small test tiles. The 16-bit types run their production
// configuration only (the FMA fallback of WmmaPolicy is for GPUs below sm_70/sm_80).
template <typename T, typename A>
static void dispatch(int cfg, int bwd, const T* q, const T* k, const T* v, const T* go,
                     const T* go_nchw, const T* residual, const A* gamma, T* out, A* lse, T* y,
                     T* gq, T* gk, T* gv, A* gpart, T* part, int N, int D, int Cv, int H, int W,
                     A scale, int64_t smem_limit) {
#define ARGS bwd, q, k, v, go, go_nchw, residual, gamma, out, lse, y, gq, gk, gv, gpart, part, N, \
             D, Cv, H, W, scale
  if (cfg == 1) return run<WmmaPolicy<T, A>, ProdTiles16, T, A>(ARGS, 2, smem_limit);
  if constexpr (sizeof(T) > 2) {
    switch (cfg) {
      case 0: return run<FmaPolicy<T, A>, ProdTilesFma, T, A>(ARGS, sizeof(T), smem_limit);
      case 2: return run<FmaPolicy<T, A>, Tiles<16, 16, 16>, T, A>(ARGS, sizeof(T), smem_limit);
      case 3: return run<WmmaPolicy<T, A>, Tiles<32, 16, 16>, T, A>(ARGS, sizeof(T), smem_limit);
      case 4: return run<WmmaPolicy<T, A>, Tiles<16, 32, 16>, T, A>(ARGS, sizeof(T), smem_limit);
      default: break;
    }
  }
#undef ARGS
  std::abort();  // a configuration this element type does not run (the Python side checks first)
}

// The Cv group the harness uses (what the glue launches) for a configuration.
template <typename T, typename A>
static int group_of(int cfg, int Cv, int64_t smem_limit) {
  const int64_t limit = smem_limit > 0 ? smem_limit : kSmemSm90;
  switch (cfg) {
    case 0: return Smem<T, A, ProdTilesFma>::group_width(Cv, limit);
    case 1: return Smem<std::uint16_t, A, ProdTiles16>::group_width(Cv, limit);
    case 2: return Smem<T, A, Tiles<16, 16, 16>>::group_width(Cv, limit);
    case 3: return Smem<T, A, Tiles<32, 16, 16>>::group_width(Cv, limit);
    case 4: return Smem<T, A, Tiles<16, 32, 16>>::group_width(Cv, limit);
    default: return 0;
  }
}

// Whether the harness's forward runs the line kernel (what the glue launches) for a configuration.
template <typename T, typename A>
static int line_of(int cfg, int H, int W, int64_t smem_limit) {
  const int64_t limit = smem_limit > 0 ? smem_limit : kSmemSm90;
  switch (cfg) {
    case 0: return uses_line_kernel<ProdTilesFma, T, A>(H, W, sizeof(T), limit);
    case 1: return uses_line_kernel<ProdTiles16, T, A>(H, W, 2, limit);
    case 2: return uses_line_kernel<Tiles<16, 16, 16>, T, A>(H, W, sizeof(T), limit);
    case 3: return uses_line_kernel<Tiles<32, 16, 16>, T, A>(H, W, sizeof(T), limit);
    case 4: return uses_line_kernel<Tiles<16, 32, 16>, T, A>(H, W, sizeof(T), limit);
    default: return 0;
  }
}

// dtype: 0 float, 1 double, 2 __half, 3 __nv_bfloat16 (op-math float for the last two).
extern "C" {
void cca_emulate(int dtype, int cfg, int bwd, const void* q, const void* k, const void* v,
                 const void* go, const void* go_nchw, const void* residual, const void* gamma,
                 void* out, void* lse, void* y, void* gq, void* gk, void* gv, void* gpart,
                 void* part, int N, int D, int Cv, int H, int W, double scale,
                 long long smem_limit) {
#define RUN(T, A)                                                                                 \
  dispatch<T, A>(cfg, bwd, static_cast<const T*>(q), static_cast<const T*>(k),                    \
                 static_cast<const T*>(v), static_cast<const T*>(go),                             \
                 static_cast<const T*>(go_nchw), static_cast<const T*>(residual),                 \
                 static_cast<const A*>(gamma), static_cast<T*>(out), static_cast<A*>(lse),        \
                 static_cast<T*>(y), static_cast<T*>(gq), static_cast<T*>(gk),                    \
                 static_cast<T*>(gv), static_cast<A*>(gpart), static_cast<T*>(part), N, D, Cv, H, \
                 W, static_cast<A>(scale), smem_limit)
  switch (dtype) {
    case 0: RUN(float, float); break;
    case 1: RUN(double, double); break;
    case 2: RUN(__half, float); break;
    default: RUN(__nv_bfloat16, float); break;
  }
#undef RUN
}
int cca_group(int dtype, int cfg, int Cv, long long smem_limit) {
  return dtype == 1 ? group_of<double, double>(cfg, Cv, smem_limit)
                    : dtype == 0 ? group_of<float, float>(cfg, Cv, smem_limit)
                                 : group_of<std::uint16_t, float>(cfg, Cv, smem_limit);
}
int cca_line(int dtype, int cfg, int H, int W, long long smem_limit) {
  return dtype == 1 ? line_of<double, double>(cfg, H, W, smem_limit)
                    : dtype == 0 ? line_of<float, float>(cfg, H, W, smem_limit)
                                 : line_of<std::uint16_t, float>(cfg, H, W, smem_limit);
}
}
"""

# (policy, BO, BK, CT) of each configuration the harness instantiates; 0 and 1 are the production
# tiles of csrc/cuda/cca.cu (checked against the header below, so the two cannot drift apart).
CONFIGS = {0: ("fma", 64, 32, 32), 1: ("wmma", 128, 64, 32), 2: ("fma", 16, 16, 16),
           3: ("wmma", 32, 16, 16), 4: ("wmma", 16, 32, 16)}
PRODUCTION = {0: "ProdTilesFma", 1: "ProdTiles16"}


DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
HALF = (torch.float16, torch.bfloat16)


def _opmath(dtype):
    """The kernels' op-math type (acc_t of cca.cu's Kind): float for the 16-bit types."""
    return torch.float32 if dtype in HALF else dtype


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    lib = build_harness(tmp_path_factory.mktemp("cca_emulation"), "cca_emulation", HARNESS)
    lib.cca_group.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_longlong]
    lib.cca_line.argtypes = [ctypes.c_int] * 4 + [ctypes.c_longlong]
    return lib


def _group(lib, dtype, cfg, cv, smem_limit=0):
    return lib.cca_group(DTYPES[dtype], cfg, cv, smem_limit)


def _line(lib, dtype, cfg, H, W, smem_limit=0):
    """Whether the forward runs cca_fwd_line_kernel (else cca_lse_kernel + cca_pv_kernel)."""
    return bool(lib.cca_line(DTYPES[dtype], cfg, H, W, smem_limit))


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
    """Runs the emulated forward then backward (q, k, v, go given NCHW in the element type,
    passed NHWC as the glue does; gamma in the op-math type); every output starts as NaN, so an
    element a kernel forgets to write shows up. lse and gpart come back in the op-math type."""
    N, D, H, W = q.shape
    Cv = v.shape[1]
    dt = q.dtype
    if dt in HALF:
        assert cfg == 1, f"{dt} runs its production configuration (1) only, not {cfg}"
    acc = _opmath(dt)
    nan = float("nan")
    out = torch.full((N, Cv, H, W), nan, dtype=dt)
    lse = torch.full((N, H, W), nan, dtype=acc)
    y = torch.full((N, Cv, H, W), nan, dtype=dt) if residual is not None else None
    gq, gk = torch.full_like(q, nan), torch.full_like(k, nan)
    gv = torch.full_like(v, nan)
    gpart = torch.full((N, H, W), nan, dtype=acc) if residual is not None else None
    part = torch.full((N * max(D, Cv) * H * W,), nan, dtype=dt)
    sizes = [ctypes.c_int(s) for s in (N, D, Cv, H, W)]
    qn, kn, vn, gon = (_nhwc(t) for t in (q, k, v, go))

    def call(bwd):
        lib.cca_emulate(ctypes.c_int(DTYPES[dt]), ctypes.c_int(cfg), ctypes.c_int(bwd), _ptr(qn),
                        _ptr(kn), _ptr(vn), _ptr(gon), _ptr(go), _ptr(residual), _ptr(gamma),
                        _ptr(out), _ptr(lse), _ptr(y), _ptr(gq), _ptr(gk), _ptr(gv), _ptr(gpart),
                        _ptr(part), *sizes, ctypes.c_double(scale), ctypes.c_longlong(smem_limit))

    call(0)
    call(1)
    return out, lse, y, gq, gk, gv, gpart


def _reference_lse(q, k, scale):
    """The log-sum-exp over the H+W-1 keys of each pixel (row with self, column without)."""
    return torch.logsumexp(reference.cca_weight(q, k) * scale, dim=1)


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
    group = _group(emulation, dtype, cfg, Cv, limit)
    assert group > 0
    out, lse, y, gq, gk, gv, gpart = _emulate(
        emulation, cfg, conv(q), conv(k), conv(v), conv(grad), conv(residual), conv(gamma), scale,
        limit)
    path = "line kernel" if _line(emulation, dtype, cfg, H, W, limit) else f"Cv group {group}"
    what = f"emulated CUDA ({CONFIGS[cfg]}, {dtype}, {path})"
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
    f32, f64, f16 = torch.float32, torch.float64, torch.float16
    assert _group(emulation, f32, 1, 512) == _group(emulation, f16, 1, 512) == 288
    assert _group(emulation, f32, 1, 300) == 288
    assert _group(emulation, f64, 0, 300) == 256
    assert _group(emulation, f64, 2, 33, 21 << 10) == 16


def test_traffic_model_uses_the_launched_tiles(emulation):
    """benchmarks/traffic.py models the tiles and Cv groups the kernels are launched with."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    import traffic
    assert traffic.TILES[2] == CONFIGS[1][1:]
    assert traffic.TILES[4] == traffic.TILES[8] == CONFIGS[0][1:]
    for cv in (1, 33, 300, 512, 1000):
        assert traffic.pv_group(cv, 2) == _group(emulation, torch.bfloat16, 1, cv), cv
        assert traffic.pv_group(cv, 4) == _group(emulation, torch.float32, 0, cv), cv
        assert traffic.pv_group(cv, 8) == _group(emulation, torch.float64, 0, cv), cv
    # the forward's kernel choice (line kernel or lse + P·V), at and around the limits: fp16/bf16
    # lines up to 256, fp32 384, fp64 160 on an sm_90
    for h, w in ((1, 1), (97, 97), (128, 256), (256, 257), (160, 3), (161, 3), (384, 2), (385, 2)):
        assert traffic.line_fits(h, w, 2) == _line(emulation, torch.bfloat16, 1, h, w), (h, w)
        assert traffic.line_fits(h, w, 4) == _line(emulation, torch.float32, 0, h, w), (h, w)
        assert traffic.line_fits(h, w, 8) == _line(emulation, torch.float64, 0, h, w), (h, w)
    assert traffic.line_fits(128, 256, 2) and not traffic.line_fits(257, 3, 2)
    assert traffic.line_fits(384, 1, 4) and not traffic.line_fits(385, 1, 4)
    assert traffic.line_fits(160, 1, 8) and not traffic.line_fits(161, 1, 8)
    # the modelled forward at (2, 64, 512, 97, 97) bf16 runs the line kernel, within 3x the minimum
    fwd = traffic.cca_cuda_traffic(2, 64, 512, 97, 97, 2, "forward", channels_last=True)
    assert list(fwd["kernels"]) == ["line (q·k, P, P·V)"] and fwd["ratio"] <= 3.0, fwd


def test_both_forward_paths_are_emulated(emulation):
    """The cases run the line kernel and the lse + P·V fallback at both production tile
    configurations, and in fp16/bf16 (the glue picks by the shared-memory fit of the longer
    line)."""
    paths = {(cfg, _line(emulation, dtype, cfg, H, W, smem))
             for cfg, _, _, _, H, W, dtype, _, smem in CASES}
    assert {(0, True), (0, False), (1, True), (1, False)} <= paths, paths
    half = {_line(emulation, torch.bfloat16, 1, H, W, smem) for _, _, _, H, W, _, smem in HALF_CASES}
    assert half == {True, False}, half


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


# ---- fp16 and bf16: the tensor-core kernels with their roundings --------------------------------
# The production 16-bit kernels (WmmaPolicy<T, float> at ProdTiles16) with the host __half /
# __nv_bfloat16 (round to nearest even, as on the device): every rounding of the kernels happens
# here as on the GPU. Each output is checked element by element against the fp64 reference on the
# same (rounded) inputs, within a bound derived from the roundings the kernels do (_bounds), and
# against the einsum formulation (the reference run in fp16/bf16, as mmcv runs it): the kernels
# must be at least as accurate.

U16 = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}  # unit roundoff of the element type
# Absolute error of a rounding into the subnormal range: half the smallest spacing (fp16 2^-24).
ETA16 = {torch.float16: 2.0 ** -25, torch.bfloat16: 2.0 ** -134}
U32 = 2.0 ** -24


def _scatter(attn, w):
    """The adjoint of reference.cca_map in v: key s of each line gets sum_p attn(p, s)·w_p."""
    z = torch.zeros_like(w, requires_grad=True)
    reference.cca_map(attn, z).backward(w)
    return z.grad


def _column_keys(H, W):
    """(1, H+W-1, 1, 1): 1 at the column keys of reference.cca_weight's layout (the first pass's
    keys), 0 at the row keys."""
    col = torch.ones(1, H + W - 1, 1, 1, dtype=torch.float64)
    col[:, :W] = 0
    return col


def _bounds(q, k, v, go, gamma, scale, dtype, out_ref, y_ref, grads):
    """Per-element bounds of |kernel - fp64 reference| for the 16-bit kernels (q, k, v, go: fp64
    copies of the rounded inputs; gamma a float, 1 without the residual; out_ref, y_ref, grads the
    fp64 reference). u is the unit roundoff of the element type, eta the absolute error of a
    rounding into fp16's subnormals (each rounding: u·|x| + eta), first order in u and u32.

    What the kernels do (csrc/cuda/cca_kernels.cuh, op-math float):
    * energies q·k, dP = dO·v^T: tensor-core mma on the (exact) 16-bit inputs, products exact in
      fp32, sums in fp32: at most 2(n+2)·u32·sum|terms| over n terms (the factor 2 covers the
      tensor cores' truncating adds);
    * lse in fp32 (online softmax over the L = H+W-1 keys, expf/logf within 2 ulp), and so
      P = exp(scale·e - lse) in fp32 with relative error eps_P (below, from the energies' error,
      the lse's and the exp's); the forward's line kernel forms exp(scale·e - m) at each pass's
      max m and scales its P·V by exp(m - lse) in fp32 (the column pass's through 1/l_c and
      exp(lse_c - lse)): the same relative errors to first order, a few u32 more;
    * P (forward, dv) and dS = P·(gamma·dP - D)·scale (dq, dk) rounded to T for their mma: u·|P|,
      u·|dS| (+ eta) per key, summed with the other operand's |values| (cca_map / _scatter of the
      absolute values); the fp32 sums over the keys 2(L+2)·u32·sum|terms|;
    * the column pass's partial result rounded to T in the part buffer (u·|column part|), the
      row pass adds it in fp32 and rounds the total once into the output (u·|out|);
    * the backward's D_p = gamma·<dO_p, out_p> reads the forward's rounded out: its error is
      gamma·sum_c |dO|·bound(out), which enters dS through P·scale; y = gamma·out + x is formed
      in fp32 from the unrounded out and rounded once.
    The sum is then scaled by (1 + 4u) for the second-order terms."""
    u, eta = U16[dtype], ETA16[dtype]
    N, D, H, W = q.shape
    Cv = v.shape[1]
    L = H + W - 1

    def acc32(n):
        return 2 * (n + 2) * U32

    e = reference.cca_weight(q, k) * scale                      # (N, H+W-1, H, W): keys first
    e_abs = (reference.cca_weight(q.abs(), k.abs()) * scale).max().item()
    lse = torch.logsumexp(e, dim=1, keepdim=True)
    P = torch.softmax(e, dim=1)
    col = _column_keys(H, W)
    P_col = P * col                                             # the column pass's keys only
    # lse: the energies' error acc32(D)·e_abs, the L-term sum, log of it; P: the same energy
    # error in e and in lse, the rounding of scale·e - lse, expf.
    eps_lse = U32 * (2 * (D + 2) * e_abs + 2 * (L + 8)) + 2 * U32 * lse.abs()
    eps_P = acc32(D) * e_abs + eps_lse + U32 * (e.abs() + lse.abs() + 4)
    dP16 = (u + eps_P) * P + eta                                # |P rounded to T - P|
    av, ago = v.abs(), go.abs()
    b = {"lse": eps_lse[:, 0]}
    b["out"] = (reference.cca_map(dP16, av) + acc32(L) * reference.cca_map(P, av)
                + u * reference.cca_map(P_col, av) + u * out_ref.abs() + 2 * eta)
    if y_ref is not None:
        b["y"] = gamma * b["out"] + u * y_ref.abs() + eta + 2 * U32 * y_ref.abs()
    # backward
    b["gpart"] = (ago * b["out"]).sum(1) + acc32(Cv) * (go * out_ref).abs().sum(1)
    dD = gamma * b["gpart"][:, None]                            # the error of D_p
    Dp = gamma * (go * out_ref).sum(1, keepdim=True)
    dS = P * (gamma * reference.cca_weight(go, v) - Dp) * scale
    dS_col = dS * col
    dPabs = reference.cca_weight(ago, av)
    ddS = ((u + eps_P + 4 * U32) * dS.abs() + P * scale * (gamma * acc32(Cv) * dPabs + dD)
           + eta)                                               # |dS rounded to T - dS|
    gq, gk, gv = grads
    aq, ak = q.abs(), k.abs()
    b["gq"] = (reference.cca_map(ddS, ak) + acc32(L) * reference.cca_map(dS.abs(), ak)
               + u * reference.cca_map(dS_col.abs(), ak) + u * gq.abs() + 2 * eta)
    b["gk"] = (_scatter(ddS, aq) + acc32(L) * _scatter(dS.abs(), aq)
               + u * _scatter(dS_col.abs(), aq) + u * gk.abs() + 2 * eta)
    b["gv"] = (gamma * (_scatter(dP16, ago) + acc32(L) * _scatter(P, ago))
               + u * gamma * _scatter(P_col, ago) + u * gv.abs() + 2 * eta)
    return {key: val * (1 + 4 * u) for key, val in b.items()}


def _line_forward_total(e, v, col, rnd):
    """The line kernel's forward before its final rounding: per pass (col: 1 at the column keys)
    the softmax state m = max e, l = sum exp(e - m) over the pass's keys and P = exp(e - m)
    rounded to the element type; part = P_c·V / l_c rounded; the row pass's total
    exp(m_r - lse)·P_r·V + exp(lse_c - lse)·part with lse = logaddexp(lse_c, lse_r)."""
    def state(keys):
        ek = e.masked_fill(keys == 0, float("-inf"))
        m = ek.amax(1, keepdim=True)
        p = torch.where(keys != 0, torch.exp(ek - m.clamp(min=-1e300)), torch.zeros_like(e))
        l = p.sum(1, keepdim=True)
        return m, l, reference.cca_map(rnd(p), v)
    (m_c, l_c, acc_c), (m_r, l_r, acc_r) = state(col.expand_as(e)), state(1 - col.expand_as(e))
    has_c = l_c > 0  # a column pass without keys (H = 1): lse_c = -inf, part = 0
    part = rnd(torch.where(has_c, acc_c / l_c.clamp(min=1e-300), torch.zeros_like(acc_c)))
    lse_c = torch.where(has_c, m_c + torch.log(l_c.clamp(min=1e-300)), torch.full_like(m_c, -math.inf))
    lse = torch.logaddexp(lse_c, m_r + torch.log(l_r))
    return acc_r * torch.exp(m_r - lse) + part * torch.exp(lse_c - lse)


def _rounding_model(q, k, v, go, x, out, gamma, scale, dtype, line):
    """The roundings of the 16-bit kernels replayed in fp64 (everything else exact): P and dS
    rounded to dtype, the column pass's result rounded into the part buffer, the row pass's total
    (its own sum + part) rounded into the output, and y = gamma·total + x rounded once. line: the
    forward ran cca_fwd_line_kernel, which rounds each pass's P = exp(e - m) at its own max and
    its part normalised by its own sum (_line_forward_total); otherwise cca_pv_kernel rounds P
    normalised by the final lse. The backward's D uses out, the forward's rounded output, as the
    kernels do. q, k, v, go, x fp64 copies of the rounded inputs; returns out, y, gq, gk, gv in
    dtype (as fp64)."""
    rnd = lambda t: t.to(dtype).double()  # round to nearest even, as the device
    col = _column_keys(*q.shape[2:])

    def total(M, z, gather=True, mult=1.0):
        f = reference.cca_map if gather else _scatter
        return mult * f(M * (1 - col), z) + rnd(mult * f(M * col, z))

    e = reference.cca_weight(q, k) * scale
    P = torch.softmax(e, dim=1)
    out_total = _line_forward_total(e, v, col, rnd) if line else total(rnd(P), v)
    m = {"out": rnd(out_total)}
    if x is not None:
        m["y"] = rnd(gamma * out_total + x)
    Dp = gamma * (go * out.double()).sum(1, keepdim=True)
    dS = rnd(P * (gamma * reference.cca_weight(go, v) - Dp) * scale)
    m["gq"] = rnd(total(dS, k))
    m["gk"] = rnd(total(dS, q, gather=False))
    m["gv"] = rnd(total(rnd(P), go, gather=False, mult=gamma))
    return m


def _errors(got, ref):
    """(max abs error, root-mean-square error) against the fp64 reference."""
    d = got.double() - ref
    return d.abs().max().item(), d.pow(2).mean().sqrt().item()


HALF_CASES = [
    # N, Cqk, Cv, H, W, residual, smem limit (0: an sm_90's). All at ProdTiles16 (BO = 128,
    # BK = 64, CT = 32): one own tile per line, Cqk and Cv over several CT chunks.
    (1, 64, 48, 17, 23, True, 110 << 10),   # CCNet's Cqk (own side resident), 2 Cv groups of 32
    (1, 20, 17, 33, 19, False, 0),          # scalar loads (40-byte channel vectors), Cv tail
    (1, 8, 40, 70, 3, True, 0),             # column pass over 2 key tiles, cp.async vectors
    (1, 8, 40, 70, 3, True, 110 << 10),     # the same through lse + P·V (2 Cv groups)
]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("N,D,Cv,H,W,with_residual,smem", HALF_CASES)
def test_cuda_kernels_emulated_16bit(emulation, dtype, N, D, Cv, H, W, with_residual, smem):
    torch.manual_seed(N + D + Cv + H + W)
    scale = D ** -0.5
    rnd = lambda *shape: torch.randn(*shape, dtype=torch.float64).to(dtype)
    q, k, v, grad = rnd(N, D, H, W), rnd(N, D, H, W), rnd(N, Cv, H, W), rnd(N, Cv, H, W)
    x = rnd(N, Cv, H, W) if with_residual else None
    gamma = torch.tensor([0.6 if with_residual else 1.0])       # float32, as the ops take it
    group = _group(emulation, dtype, 1, Cv, smem)
    assert (group < Cv) == bool(smem), group  # several Cv groups exactly when the limit is set
    line = _line(emulation, dtype, 1, H, W, smem)  # the forward's kernels
    out, lse, y, gq, gk, gv, gpart = _emulate(
        emulation, 1, q, k, v, grad, x, gamma if with_residual else None, scale, smem)

    # the fp64 reference on the same rounded inputs
    q64, k64, v64, g64 = (t.double().requires_grad_() for t in (q, k, v, grad))
    gm = gamma.item()
    ref_out = reference.criss_cross_attention(q64, k64, v64, scale)
    (gm * ref_out).backward(g64.detach())
    ref_y = (gm * ref_out + x.double()).detach() if with_residual else None
    ref = {"out": ref_out.detach(), "lse": _reference_lse(q64.detach(), k64.detach(), scale),
           "gq": q64.grad, "gk": k64.grad, "gv": v64.grad,
           "gpart": (g64 * ref_out).sum(1).detach()}
    if with_residual:
        ref["y"] = ref_y
    got = {"out": out, "lse": lse, "gq": gq, "gk": gk, "gv": gv}
    if with_residual:
        got.update(y=y, gpart=gpart)
    bound = _bounds(*(t.detach() for t in (q64, k64, v64, g64)), gm, scale, dtype, ref["out"],
                    ref_y, (ref["gq"], ref["gk"], ref["gv"]))

    # the einsum formulation in the same dtype (mmcv's, autograd in fp16 / bf16)
    ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
    peer_out = reference.criss_cross_attention(ql, kl, vl, scale)
    (gamma.to(dtype) * peer_out).backward(grad)
    peer = {"out": peer_out.detach(), "gq": ql.grad, "gk": kl.grad, "gv": vl.grad}
    if with_residual:
        peer["y"] = (gamma.to(dtype) * peer_out + x).detach()

    what = (f"emulated CUDA {dtype} ProdTiles16 {(N, D, Cv, H, W)} residual={with_residual} "
            f"{'line kernel' if line else 'lse + P·V'}")
    for name, val in got.items():
        assert val.dtype == (torch.float32 if name in ("lse", "gpart") else dtype), name
        err = (val.double() - ref[name]).abs()
        worst = (err / bound[name]).max().item()
        assert (err <= bound[name]).all(), f"{what} {name}: error/bound up to {worst:.3g}"
        if name in peer:
            ours, theirs = _errors(val, ref[name]), _errors(peer[name], ref[name])
            print(f"{name} ours max {ours[0]:.3e} rms {ours[1]:.3e}; einsum max {theirs[0]:.3e} "
                  f"rms {theirs[1]:.3e}; err/bound {worst:.3f}")
            # rms: the kernels' error overall. max: allowing one rounding of the output at its
            # scale, which both must do and which alone can make the largest error (y, where
            # both round the same element the same way).
            slack = U16[dtype] * ref[name].abs().max().item()
            assert ours[1] <= theirs[1] and ours[0] <= theirs[0] + slack, (
                f"{what} {name}: (max, rms) error {ours} worse than the einsum's {theirs}")
    # The roundings are the ones described: the kernels agree bit for bit with _rounding_model
    # except where an fp32-level difference (fp32 sums in another order, expf) straddles a
    # rounding boundary of the element type, about 2^-19 relative against a half ulp of 2^-12
    # (fp16) or 2^-9 (bf16): under 0.5% of the elements here. A rounding added or left out
    # anywhere changes over 10% (an extra rounding of the part buffer: 11-23% in these cases).
    model = _rounding_model(*(t.detach() for t in (q64, k64, v64, g64)),
                            None if x is None else x.double(), out, gm, scale, dtype, line)
    for name, val in model.items():
        differ = (got[name].double() != val).double().mean().item()
        assert differ <= 0.02, f"{what} {name}: {differ:.1%} of the elements differ from the model"
    # The stated bound of the forward: out within 1 ulp of the output scale (2^floor(log2
    # max|out|)·eps), the part buffer's second rounding of the column contribution included.
    ulp = 2.0 ** math.floor(math.log2(ref["out"].abs().max().item())) * torch.finfo(dtype).eps
    err_out = (out.double() - ref["out"]).abs().max().item()
    print(f"out max error {err_out / ulp:.2f} ulp of the output scale")
    assert err_out <= ulp, f"{what} out: max error {err_out:.3e} > 1 ulp ({ulp:.3e})"
    if with_residual:  # grad gamma = sum of the per-pixel partials (the glue's gpart.sum())
        err = abs(gpart.double().sum().item() - ref["gpart"].sum().item())
        assert err <= bound["gpart"].sum().item(), f"{what} grad gamma"


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

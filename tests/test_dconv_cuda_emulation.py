"""The directional dilated convolution CUDA forward kernels
(csrc/cuda/directional_conv_kernels.cuh), emulated on the host.

The device code is plain C++ over the scalar type, so g++ compiles it with a few shims: one
std::thread per CUDA thread, a std::barrier for __syncthreads, the blocks of a launch run one after
another (so `__shared__` arrays become function statics, one per instantiation), the host
nvcuda::wmma and the host __half / __nv_bfloat16 of tests/host_emulation.py (conversions from
float round to nearest even, as on the device).

Both kernels run with their production tiles (the constants of the header: SIMT 64 × 64 × 16 with
256 threads, wmma 64 × 64 × 32 with 128 threads) and the launch decisions of
csrc/cuda/directional_conv.cu (forward_blocks, wmma_vec_a / wmma_vec_b, called by the harness as
by the glue): fp32 and fp64 through SIMT, fp16 and bf16 through wmma (sm_80+) and through SIMT (the
pre-sm_80 path), NCHW and channels_last, vector and scalar loads, tails of every tile, the
epilogue (bias, scale, shift, ReLU, NaN kept). The Python side prepares the tensors as the glue
does (x dense in its suggested format, the weight packed as (KH, KW, C_in, C_out), y allocated in
x's format) and compares with armnet_ops.reference (fp16/bf16 by the rule of tests/numerics.py).

What this cannot check: the real wmma fragment layout, tensor-core summation order, misaligned
accesses faulting, timing. The cuda backend of tests/test_directional_conv.py runs the compiled
kernels on a GPU.
"""
import ctypes

import pytest
import torch
from torch._prims_common import suggest_memory_format

from armnet_ops import reference
from host_emulation import HOST_CUDA, HOST_HALF, HOST_WMMA, build_harness
from numerics import assert_close

HARNESS = HOST_CUDA + r"""
// Blocks run one at a time: a function-static array is the block's shared memory.
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
""" + HOST_HALF + HOST_WMMA + r"""
#include "cuda/directional_conv_kernels.cuh"

using namespace armnet_ops::dconv;

template <typename S> struct Acc { using type = float; };  // at::acc_type<S, true>
template <> struct Acc<double> { using type = double; };

// launch_forward of csrc/cuda/directional_conv.cu. Returns the kernel it ran: 0 SIMT, else
// 1 + 2·VEC_A + VEC_B for wmma.
template <typename S>
static int forward(int tensor_cores, const S* x, const S* wp, S* y, ConvShape s, const S* bias,
                   const S* scale, const S* shift, int relu) {
  const Epilogue<S> epi{bias, scale, shift, relu != 0};
  if constexpr (sizeof(S) == 2) {
    if (tensor_cores) {
      const int64_t blocks = forward_blocks<TC_BM, TC_BN>(s);
      const bool va = wmma_vec_a(s, x), vb = wmma_vec_b(s, wp);
      auto run = [&](auto a, auto b) {
        launch(blocks, TC_THREADS, [&] {
          dconv_forward_wmma_kernel<S, S, decltype(a)::value, decltype(b)::value>(x, wp, y, s,
                                                                                 epi);
        });
      };
      using T = std::true_type;
      using F = std::false_type;
      if (va && vb) run(T{}, T{});
      else if (va) run(T{}, F{});
      else if (vb) run(F{}, T{});
      else run(F{}, F{});
      return 1 + 2 * va + vb;
    }
  }
  const int64_t blocks = forward_blocks<SIMT_BM, SIMT_BN>(s);
  launch(blocks, SIMT_THREADS, [&] {
    dconv_forward_simt_kernel<S, typename Acc<S>::type>(x, wp, y, s, epi);
  });
  return 0;
}

extern "C" {
// dtype: 0 fp32, 1 fp64, 2 fp16, 3 bf16. geo: H, W, C_in, C_out, KH, KW, DH, DW, N,
// then the x strides (n, c, h, w) and the y strides (n, c, h, w).
int dconv_emulate(int dtype, int tensor_cores, const void* x, const void* wp, void* y,
                  const int64_t* geo, const void* bias, const void* scale, const void* shift,
                  int relu) {
  ConvShape s{};
  s.H = int(geo[0]); s.W = int(geo[1]); s.C_in = int(geo[2]); s.C_out = int(geo[3]);
  s.KH = int(geo[4]); s.KW = int(geo[5]); s.DH = int(geo[6]); s.DW = int(geo[7]);
  s.HW = geo[0] * geo[1];
  s.M = geo[8] * s.HW;
  s.sxn = geo[9]; s.sxc = geo[10]; s.sxh = geo[11]; s.sxw = geo[12];
  s.syn = geo[13]; s.syc = geo[14]; s.syh = geo[15]; s.syw = geo[16];
#define RUN(S)                                                                                  \
  return forward<S>(tensor_cores, static_cast<const S*>(x), static_cast<const S*>(wp),         \
                    static_cast<S*>(y), s, static_cast<const S*>(bias),                        \
                    static_cast<const S*>(scale), static_cast<const S*>(shift), relu)
  switch (dtype) {
    case 0: RUN(float);
    case 1: RUN(double);
    case 2: RUN(__half);
    default: RUN(__nv_bfloat16);
  }
#undef RUN
}
}
"""

DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
SIMT, WMMA_SCALAR, WMMA_VEC_B, WMMA_VEC_A, WMMA_VEC_AB = 0, 1, 2, 3, 4


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    lib = build_harness(tmp_path_factory.mktemp("dconv_emulation"), "dconv_emulation", HARNESS)
    lib.dconv_emulate.restype = ctypes.c_int
    return lib


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else None)


def emulate(lib, x, weight, bias, dilation, scale, shift, relu, tensor_cores=True):
    """forward_cuda of csrc/cuda/directional_conv.cu with the kernels run on the host: returns
    (y, the kernel that ran). y starts as NaN, so an element the kernel forgets shows up."""
    fmt = suggest_memory_format(x)
    N, C_in, H, W = x.shape
    C_out, _, KH, KW = weight.shape
    xc = x.contiguous(memory_format=fmt)
    wp = weight.permute(2, 3, 1, 0).contiguous()
    y = torch.full((N, C_out, H, W), float("nan"), dtype=x.dtype).contiguous(memory_format=fmt)
    vec = [None if v is None else v.contiguous() for v in (bias, scale, shift)]
    geo = (ctypes.c_int64 * 17)(H, W, C_in, C_out, KH, KW, dilation[0], dilation[1], N,
                                *xc.stride(), *y.stride())
    kernel = lib.dconv_emulate(DTYPES[x.dtype], int(tensor_cores), _ptr(xc), _ptr(wp), _ptr(y),
                               geo, *(_ptr(v) for v in vec), int(relu))
    return y, kernel


def _inputs(N, C_in, C_out, H, W, KH, KW, epilogue, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C_in, H, W, generator=g, dtype=torch.float64)
    weight = torch.randn(C_out, C_in, KH, KW, generator=g, dtype=torch.float64)
    weight /= (C_in * KH * KW) ** 0.5
    vecs = [torch.randn(C_out, generator=g, dtype=torch.float64) if on else None
            for on in epilogue]
    return x, weight, *vecs


def _reference(x, weight, bias, dilation, scale, shift, relu):
    return reference.directional_conv2d(x, weight, bias, dilation, scale, shift,
                                        "relu" if relu else None)


def _low_reference(low, dilation, relu):
    """The reference on the rounded fp16/bf16 inputs, in fp32, rounded once to their dtype."""
    x, weight, bias, scale, shift = (None if t is None else t.float() for t in low)
    return _reference(x, weight, bias, dilation, scale, shift, relu).to(low[0].dtype)


CASES = [
    # dtype, tensor cores, channels_last, N, C_in, C_out, H, W, (KH, KW), dilation, expected kernel
    (torch.float32, True, False, 2, 5, 7, 5, 9, (1, 3), (1, 2), SIMT),       # fp32 is SIMT always
    (torch.float64, False, True, 1, 17, 70, 9, 8, (3, 1), (2, 1), SIMT),     # C_in tail, 2 N tiles
    (torch.float32, False, True, 1, 16, 64, 11, 13, (3, 3), (3, 2), SIMT),   # 3 pixel tiles
    (torch.float16, False, False, 1, 9, 20, 6, 7, (1, 5), (1, 3), SIMT),     # pre-sm_80 fp16
    (torch.bfloat16, False, True, 2, 8, 8, 4, 5, (5, 1), (1, 1), SIMT),      # pre-sm_80 bf16
    (torch.float16, True, True, 1, 16, 24, 9, 10, (3, 3), (2, 2), WMMA_VEC_AB),
    (torch.bfloat16, True, True, 2, 40, 72, 5, 7, (1, 3), (1, 6), WMMA_VEC_AB),  # C_in chunk tail
    (torch.float16, True, False, 1, 16, 16, 7, 11, (3, 1), (3, 1), WMMA_VEC_B),  # NCHW: scalar A
    (torch.bfloat16, True, True, 1, 12, 16, 6, 6, (3, 3), (1, 1), WMMA_VEC_B),   # C_in % 8 != 0
    (torch.float16, True, True, 1, 24, 13, 8, 9, (1, 7), (1, 2), WMMA_VEC_A),    # C_out % 8 != 0
    (torch.bfloat16, True, False, 1, 3, 5, 13, 6, (3, 3), (2, 3), WMMA_SCALAR),
    (torch.float16, True, True, 1, 8, 8, 1, 1, (3, 3), (4, 4), WMMA_VEC_AB),      # one pixel
]


@pytest.mark.parametrize("dtype,tc,cl,N,C_in,C_out,H,W,k,dilation,kernel", CASES)
@pytest.mark.parametrize("epilogue", [(True, True, True, True), (False, False, False, False)],
                         ids=["bias-scale-shift-relu", "plain"])
def test_forward_emulated(emulation, dtype, tc, cl, N, C_in, C_out, H, W, k, dilation, kernel,
                          epilogue):
    x, weight, bias, scale, shift = _inputs(N, C_in, C_out, H, W, *k, epilogue[:3],
                                            seed=N * 1000 + C_in * 37 + H * W)
    relu = epilogue[3]
    low = [None if t is None else t.to(dtype) for t in (x, weight, bias, scale, shift)]
    if cl:
        low[0] = low[0].contiguous(memory_format=torch.channels_last)
    y, ran = emulate(emulation, low[0], low[1], low[2], dilation, low[3], low[4], relu, tc)
    assert ran == kernel, f"the glue's launch decisions picked kernel {ran}, expected {kernel}"
    assert y.is_contiguous(memory_format=suggest_memory_format(low[0]))
    ref64 = _reference(x, weight, bias, dilation, scale, shift, relu)
    low_precision = dtype in (torch.float16, torch.bfloat16)
    ref_low = _low_reference(low, dilation, relu) if low_precision else None
    assert_close(y, ref64, ref_low, f"emulated CUDA dconv ({dtype}, kernel {ran})")


@pytest.mark.parametrize("dtype,tc", [(torch.float32, False), (torch.float64, False),
                                      (torch.float16, True), (torch.bfloat16, True),
                                      (torch.bfloat16, False)])
def test_relu_keeps_nan(emulation, dtype, tc):
    """torch.relu keeps NaN; the fused epilogue must too (`v > 0 ? v : 0` would give 0)."""
    x, weight, bias, scale, shift = _inputs(1, 8, 8, 4, 5, 1, 3, (True, True, True), seed=3)
    bias[2] = float("nan")           # a whole output channel
    x[0, 1, 2, 3] = float("nan")     # one input pixel: every output it reaches
    low = [t.to(dtype) for t in (x, weight, bias, scale, shift)]
    y, _ = emulate(emulation, low[0], low[1], low[2], (1, 2), low[3], low[4], True, tc)
    ref = _reference(x, weight, bias, (1, 2), scale, shift, True)
    assert torch.equal(y.isnan(), ref.isnan()), "NaN positions differ from torch.relu's"
    assert y.isnan().any()
    keep = ~ref.isnan()
    bound = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
    assert (y.double()[keep] - ref[keep]).abs().max() <= bound * ref[keep].abs().max()


def test_misaligned_input_takes_scalar_loads(emulation):
    """A channels_last x whose data starts off a 16-byte boundary: the glue's wmma_vec_a refuses
    the vector loads (on a GPU they would fault); the result is still right."""
    x, weight, bias, scale, shift = _inputs(1, 16, 16, 5, 6, 3, 1, (True, False, False), seed=5)
    low = [None if t is None else t.to(torch.float16) for t in (x, weight, bias, scale, shift)]
    buf = torch.empty(low[0].numel() + 1, dtype=torch.float16)
    xs = buf[1:].view(1, 5, 6, 16).permute(0, 3, 1, 2)  # channels_last, 2-byte offset
    xs.copy_(low[0])
    assert xs.is_contiguous(memory_format=torch.channels_last) and xs.data_ptr() % 16 != 0
    y, ran = emulate(emulation, xs, low[1], low[2], (2, 1), None, None, False)
    assert ran == WMMA_VEC_B
    ref_low = _low_reference(low, (2, 1), False)
    assert_close(y, _reference(x, weight, bias, (2, 1), None, None, False), ref_low)


def test_host_half_types_round_like_torch(emulation):
    """The host __half / __nv_bfloat16 round exactly as torch (round to nearest even), ties,
    subnormals, overflow and NaN included, and widen back exactly."""
    g = torch.Generator().manual_seed(0)
    vals = torch.cat([
        torch.randn(20000, generator=g) * torch.logspace(-9, 6, 20000).float(),
        torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 65536.0, 1e30, -1e30, 6e-8, 3e-8,
                      2.98e-8, 5.96e-8, 6.1e-5, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11,
                      1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 3.4e38, float("inf"), float("-inf"),
                      float("nan")]),
        # exact ties of fp16 and of bf16 (halfway between neighbours)
        (torch.arange(1, 2049, dtype=torch.float64) + 0.5).float() * 2 ** -10,
        (torch.arange(1, 257, dtype=torch.float64) + 0.5).float() * 2 ** -7,
    ]).contiguous()
    for dtype, round_fn, widen_fn in ((torch.float16, emulation.host_round_f16,
                                       emulation.host_widen_f16),
                                      (torch.bfloat16, emulation.host_round_bf16,
                                       emulation.host_widen_bf16)):
        bits = torch.empty(vals.numel(), dtype=torch.int16)
        round_fn(_ptr(vals), _ptr(bits), ctypes.c_int64(vals.numel()))
        got = bits.view(dtype)
        want = vals.to(dtype)
        assert torch.equal(got.isnan(), want.isnan())
        finite = ~want.isnan()
        assert torch.equal(got[finite].view(torch.int16), want[finite].view(torch.int16)), dtype
        back = torch.empty(vals.numel(), dtype=torch.float32)
        widen_fn(_ptr(bits), _ptr(back), ctypes.c_int64(vals.numel()))
        assert torch.equal(back[finite], want[finite].float())

"""Criss-cross attention: every backend against armnet_ops.reference, and the reference against
per-pixel loops (SPEC §3.1, §3.4, §3.5)."""
from __future__ import annotations

import pytest
import torch

import armnet_ops
from armnet_ops import reference
from armnet_ops.nn import CrissCrossAttention
from numerics import KERNEL_BACKENDS, assert_close, needs_cuda, needs_triton, needs_triton_cpu, opcheck

ops = torch.ops.armnet_ops

# (N, Cqk, Cv, H, W, scale): edges H = 1, W = 1, non-square, Cqk != Cv, scale != 1, odd sizes.
SHAPES = [
    (2, 3, 5, 4, 6, 1.0),
    (1, 2, 3, 1, 7, 0.7),
    (1, 2, 3, 6, 1, 1.3),
    (1, 1, 1, 1, 1, 1.0),
    (2, 8, 24, 9, 13, 0.35),
    (1, 4, 16, 21, 19, 0.5),
]
GPU_SHAPES = [(2, 64, 512, 23, 31, 1.0), (1, 16, 40, 97, 97, 0.25), (1, 8, 8, 1, 65, 1.0)]


def _inputs(N, Cqk, Cv, H, W, dtype=torch.float64, device="cpu", requires_grad=False):
    g = torch.Generator().manual_seed(N * 1000 + Cqk * 100 + H * 10 + W)
    mk = lambda c: torch.randn(N, c, H, W, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    q, k, v = mk(Cqk), mk(Cqk), mk(Cv)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _dtypes(device):
    return [torch.float64, torch.float32] if device == "cpu" else [torch.float32, torch.float16, torch.bfloat16]


def _check(out, ref64, ref_lowp, what):
    assert out.dtype == ref_lowp.dtype, f"{what}: dtype {out.dtype} != {ref_lowp.dtype}"
    assert_close(out, ref64, ref_lowp, what)


# ---- the reference against loops ---------------------------------------------------------

def _brute_force(q, k, v, scale):
    N, _, H, W = q.shape
    out = torch.zeros(N, v.shape[1], H, W, dtype=torch.float64)
    energy = torch.zeros(N, H + W - 1, H, W, dtype=torch.float64)
    for n in range(N):
        for h in range(H):
            for w in range(W):
                keys = [(h, z) for z in range(W)] + [(j, w) for j in range(H) if j != h]
                e = torch.stack([(q[n, :, h, w] * k[n, :, a, b]).sum() for a, b in keys])
                energy[n, :, h, w] = e
                p = torch.softmax(e * scale, 0)
                out[n, :, h, w] = sum(p[i] * v[n, :, a, b] for i, (a, b) in enumerate(keys))
    return out, energy


@pytest.mark.parametrize("shape", [(2, 3, 4, 3, 4, 0.6), (1, 2, 2, 1, 3, 1.0), (1, 2, 3, 4, 1, 1.0)])
def test_reference_matches_loops(shape):
    N, Cqk, Cv, H, W, scale = shape
    q, k, v = _inputs(N, Cqk, Cv, H, W)
    out, energy = _brute_force(q, k, v, scale)
    torch.testing.assert_close(reference.criss_cross_attention(q, k, v, scale), out)
    torch.testing.assert_close(reference.cca_weight(q, k), energy)
    attn = torch.softmax(energy * scale, 1)
    torch.testing.assert_close(reference.cca_map(attn, v), out)


# ---- parity of the fused op ----------------------------------------------------------------

def _run_parity(backend, device, dtype, shape):
    N, Cqk, Cv, H, W, scale = shape
    q64, k64, v64 = _inputs(N, Cqk, Cv, H, W, requires_grad=True)
    ref64 = reference.criss_cross_attention(q64, k64, v64, scale)
    grad = torch.randn(ref64.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g64 = torch.autograd.grad(ref64, (q64, k64, v64), grad)
    q, k, v = (t.detach().to(device, dtype).requires_grad_() for t in (q64, k64, v64))
    out = armnet_ops.criss_cross_attention(q, k, v, scale=scale, backend=backend)
    ref_lowp = reference.criss_cross_attention(q, k, v, scale)
    _check(out, ref64, ref_lowp.detach(), f"{backend} out {shape}")
    gd = grad.to(device, dtype)
    gs = torch.autograd.grad(out, (q, k, v), gd)
    gl = torch.autograd.grad(ref_lowp, (q, k, v), gd)
    for name, a, b, c in zip("qkv", gs, g64, gl):
        _check(a, b, c, f"{backend} grad_{name} {shape}")


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_parity(backend, device, shape):
    for dtype in _dtypes(device):
        _run_parity(backend, device, dtype, shape)


@pytest.mark.parametrize("backend,device", [p for p in KERNEL_BACKENDS if p.values[1] == "cuda"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_parity_gpu_shapes(backend, device, shape):
    for dtype in _dtypes(device):
        _run_parity(backend, device, dtype, shape)


@needs_triton_cpu
def test_parity_triton_multi_tile(monkeypatch):
    """Lines longer than a tile: the key loops, the pixel-tile grid and their masks."""
    import armnet_ops.triton.cca as tcca
    monkeypatch.setattr(tcca, "MAX_TILE", 16)
    _run_parity("triton", "cpu", torch.float64, (1, 3, 20, 33, 19, 0.5))


def test_parity_cpu_97x97():
    _run_parity("cpu", "cpu", torch.float32, (1, 4, 6, 97, 97, 1.0))


_ISA_SCRIPT = """
import torch, armnet_ops
from armnet_ops import reference
g = torch.Generator().manual_seed(0)
for dtype in (torch.float64, torch.float32):
    q, k, v = (torch.randn(2, c, 7, 21, generator=g, dtype=torch.float64).requires_grad_() for c in (5, 5, 19))
    ref = reference.criss_cross_attention(q, k, v, 0.6)
    want = torch.autograd.grad(ref.sum(), (q, k, v))
    x = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = armnet_ops.criss_cross_attention(*x, scale=0.6, backend="cpu")
    got = torch.autograd.grad(out.sum(), x)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for a, b in zip((out,) + got, (ref,) + want):
        err = (a.double() - b).abs().max().item() / b.abs().max().item()
        assert err < tol, (dtype, err)
    e = armnet_ops.cca_weight(x[0], x[1], backend="cpu")
    assert (e.double() - reference.cca_weight(q, k)).abs().max() < 1e-4
print("ok")
"""


@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_cpu_isa_variants(isa):
    """The C++ kernels are compiled once per instruction set and picked at run time; the
    machine running the tests uses the best one, so the others run here in a subprocess."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, ARMNET_OPS_CPU_ISA=isa, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_empty_batch(backend, device):
    q, k, v = _inputs(0, 2, 3, 4, 5, torch.float32, device, requires_grad=True)
    out = armnet_ops.criss_cross_attention(q, k, v, backend=backend)
    assert out.shape == (0, 3, 4, 5)
    out.sum().backward()
    assert q.grad.shape == q.shape and v.grad.shape == v.shape


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_deterministic_backward(backend, device):
    q, k, v = _inputs(2, 4, 8, 9, 11, torch.float32, device, requires_grad=True)
    out = armnet_ops.criss_cross_attention(q, k, v, backend=backend)
    g = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), g, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), g)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_lse_saved(backend, device):
    """The saved statistic is the log-sum-exp of the H+W-1 scaled energies, in op-math type."""
    q, k, v = _inputs(1, 3, 2, 5, 4, torch.float32, device)
    spec = armnet_ops.cca.SPEC
    op = armnet_ops._backend.forward_op(spec, armnet_ops._backend.select(spec.name, backend, device, torch.float32))
    _, lse = op(q, k, v, 0.5)
    assert lse.dtype == torch.float32 and lse.shape == (1, 5, 4)
    e = reference.cca_weight(q.double().cpu(), k.double().cpu()) * 0.5
    assert_close(lse.cpu(), torch.logsumexp(e, 1))


# ---- non-contiguous inputs, autocast ---------------------------------------------------------

@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_channels_last_and_strided(backend, device):
    q64, k64, v64 = _inputs(2, 4, 6, 7, 10, requires_grad=True)
    ref = reference.criss_cross_attention(q64, k64, v64, 0.8)
    g64 = torch.autograd.grad(ref.sum(), (q64, k64, v64))
    dtype = torch.float32
    cl = lambda t: t.detach().to(device, dtype).contiguous(memory_format=torch.channels_last)
    # q: channels_last; k: a slice of a wider tensor; v: a transposed view.
    q = cl(q64).requires_grad_()
    k_big = torch.zeros(2, 9, 7, 10, dtype=dtype, device=device)
    k_big[:, 2:6] = k64.detach().to(device, dtype)
    k = k_big[:, 2:6].requires_grad_()
    v = v64.detach().to(device, dtype).transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    out = armnet_ops.criss_cross_attention(q, k, v, scale=0.8, backend=backend)
    assert out.is_contiguous()
    assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), g64):
        assert_close(a, b)


def test_autocast_cpu_bf16():
    q64, k64, v64 = _inputs(1, 4, 8, 6, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = armnet_ops.criss_cross_attention(q64.float(), k64.float(), v64.float())
    assert out.dtype == torch.bfloat16
    ref64 = reference.criss_cross_attention(q64, k64, v64)
    ref_lowp = reference.criss_cross_attention(q64.bfloat16(), k64.bfloat16(), v64.bfloat16())
    assert_close(out, ref64, ref_lowp)


@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_autocast_cuda(backend):
    q64, k64, v64 = _inputs(1, 8, 16, 12, 9)
    with torch.autocast("cuda", dtype=torch.float16):
        out = armnet_ops.criss_cross_attention(q64.float().cuda(), k64.float().cuda(),
                                               v64.float().cuda(), backend=backend)
    assert out.dtype == torch.float16
    ref_lowp = reference.criss_cross_attention(*(t.half().cuda() for t in (q64, k64, v64)))
    assert_close(out, reference.criss_cross_attention(q64, k64, v64).cuda(), ref_lowp)


# ---- fp64 gradcheck ----------------------------------------------------------------------

GRADCHECK = [pytest.param("cpu", id="cpu"), pytest.param("triton", id="triton-interpreter", marks=needs_triton_cpu)]


@pytest.mark.parametrize("backend", GRADCHECK)
@pytest.mark.parametrize("shape", [(1, 2, 3, 3, 4, 0.7), (2, 1, 2, 1, 3, 1.0), (1, 2, 2, 3, 1, 1.2)], ids=str)
def test_gradcheck(backend, shape):
    N, Cqk, Cv, H, W, scale = shape
    q, k, v = _inputs(N, Cqk, Cv, H, W, requires_grad=True)
    fn = lambda q, k, v: armnet_ops.criss_cross_attention(q, k, v, scale=scale, backend=backend)
    # The interpreter is slow: Triton gets the fast (random-projection) gradcheck, CPU the full one.
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", GRADCHECK)
def test_gradcheck_two_op(backend):
    q, k, v = _inputs(1, 2, 3, 3, 4, requires_grad=True)
    fast = backend == "triton"
    assert torch.autograd.gradcheck(lambda q, k: armnet_ops.cca_weight(q, k, backend=backend), (q, k),
                                    fast_mode=fast)
    attn = torch.rand(1, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, v: armnet_ops.cca_map(a, v, backend=backend), (attn, v),
                                    fast_mode=fast)


# ---- the two-op API ------------------------------------------------------------------------

TWO_OP_BACKENDS = KERNEL_BACKENDS


@pytest.mark.parametrize("backend,device", TWO_OP_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 3, 5, 4, 6, 1.0), (1, 2, 3, 1, 5, 1.0), (1, 2, 3, 5, 1, 1.0), (1, 4, 7, 11, 9, 1.0)], ids=str)
def test_two_op_parity(backend, device, shape):
    N, Cqk, Cv, H, W, _ = shape
    q64, k64, v64 = _inputs(N, Cqk, Cv, H, W, requires_grad=True)
    for dtype in _dtypes(device):
        q, k, v = (t.detach().to(device, dtype).requires_grad_() for t in (q64, k64, v64))
        e = armnet_ops.cca_weight(q, k, backend=backend)
        e_ref64 = reference.cca_weight(q64, k64)
        _check(e, e_ref64, reference.cca_weight(q, k).detach(), f"{backend} cca_weight")
        attn64 = torch.softmax(e_ref64.detach(), 1).requires_grad_()
        attn = attn64.detach().to(device, dtype).requires_grad_()
        out = armnet_ops.cca_map(attn, v, backend=backend)
        out_ref64 = reference.cca_map(attn64, v64)
        _check(out, out_ref64, reference.cca_map(attn, v).detach(), f"{backend} cca_map")
        ge64 = torch.randn_like(e_ref64)
        go64 = torch.randn_like(out_ref64)
        got = torch.autograd.grad(e, (q, k), ge64.to(device, dtype))
        want = torch.autograd.grad(e_ref64, (q64, k64), ge64)
        lowp = torch.autograd.grad(reference.cca_weight(q, k), (q, k), ge64.to(device, dtype))
        for a, b, c in zip(got, want, lowp):
            _check(a, b, c, f"{backend} cca_weight grad")
        got = torch.autograd.grad(out, (attn, v), go64.to(device, dtype))
        want = torch.autograd.grad(out_ref64, (attn64, v64), go64)
        lowp = torch.autograd.grad(reference.cca_map(attn, v), (attn, v), go64.to(device, dtype))
        for a, b, c in zip(got, want, lowp):
            _check(a, b, c, f"{backend} cca_map grad")


def test_two_op_composes_to_fused():
    q, k, v = _inputs(1, 3, 4, 5, 6, torch.float32)
    attn = torch.softmax(armnet_ops.cca_weight(q, k, backend="cpu") * 0.5, 1)
    out = armnet_ops.cca_map(attn, v, backend="cpu")
    assert_close(out, reference.criss_cross_attention(q.double(), k.double(), v.double(), 0.5))


@needs_triton_cpu
def test_two_op_triton_multi_tile(monkeypatch):
    import armnet_ops.triton.cca as tcca
    monkeypatch.setattr(tcca, "MAX_TILE", 16)
    q, k, v = _inputs(1, 3, 20, 19, 35, torch.float64)
    e = armnet_ops.cca_weight(q, k, backend="triton")
    assert_close(e, reference.cca_weight(q, k))
    attn = torch.softmax(e, 1)
    assert_close(armnet_ops.cca_map(attn, v, backend="triton"), reference.cca_map(attn, v))


# ---- opcheck -------------------------------------------------------------------------------

def _opcheck_fused(fwd, bwd, device):
    q, k, v = _inputs(2, 3, 5, 4, 6, torch.float32, device)
    q.requires_grad_()
    opcheck(fwd, (q, k, v, 0.5))
    out, lse = fwd(q.detach(), k, v, 0.5)
    opcheck(bwd, (torch.randn_like(out), q.detach(), k, v, out, lse, 0.5))
    q_cl = q.detach().contiguous(memory_format=torch.channels_last)
    opcheck(fwd, (q_cl, k, v, 1.0))


def _opcheck_two_op(suffix, device):
    op = lambda name: getattr(ops, name + suffix).default
    q, k, v = _inputs(1, 2, 3, 3, 4, torch.float32, device)
    q.requires_grad_()
    opcheck(op("cca_weight"), (q, k))
    opcheck(op("cca_weight_backward"), (torch.randn(1, 6, 3, 4, device=device), q.detach(), k))
    attn = torch.rand(1, 6, 3, 4, device=device, requires_grad=True)
    opcheck(op("cca_map"), (attn, v))
    opcheck(op("cca_map_backward"), (torch.randn_like(v), attn.detach(), v))


def test_opcheck_cpu():
    _opcheck_fused(ops.cca_forward.default, ops.cca_backward.default, "cpu")
    _opcheck_two_op("", "cpu")


@needs_triton_cpu
def test_opcheck_triton_interpreter():
    import armnet_ops.triton.cca  # noqa: F401  (registers the *_triton twins)
    _opcheck_fused(ops.cca_forward_triton.default, ops.cca_backward_triton.default, "cpu")
    _opcheck_two_op("_triton", "cpu")


@needs_cuda
def test_opcheck_cuda():
    _opcheck_fused(ops.cca_forward.default, ops.cca_backward.default, "cuda")
    _opcheck_two_op("", "cuda")


@needs_cuda
@needs_triton
def test_opcheck_triton_cuda():
    import armnet_ops.triton.cca  # noqa: F401
    _opcheck_fused(ops.cca_forward_triton.default, ops.cca_backward_triton.default, "cuda")
    _opcheck_two_op("_triton", "cuda")


# ---- gamma / residual epilogue and the module ------------------------------------------------

@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_gamma_residual(backend, device):
    q64, k64, v64 = _inputs(2, 3, 5, 4, 6, requires_grad=True)
    x64 = torch.randn(v64.shape, dtype=torch.float64, requires_grad=True)
    gamma64 = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    ref = gamma64 * reference.criss_cross_attention(q64, k64, v64) + x64
    want = torch.autograd.grad(ref.sum(), (q64, k64, v64, x64, gamma64))
    leaves = [t.detach().to(device, torch.float32).requires_grad_() for t in (q64, k64, v64, x64, gamma64)]
    q, k, v, x, gamma = leaves
    out = armnet_ops.criss_cross_attention(q, k, v, gamma=gamma, residual=x, backend=backend)
    assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(out.sum(), leaves), want):
        assert_close(a, b)


def _mmcv_state_dict(C):
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3
    return {
        "gamma": torch.tensor([0.8]),
        "query_conv.weight": r(C // 8, C, 1, 1), "query_conv.bias": r(C // 8),
        "key_conv.weight": r(C // 8, C, 1, 1), "key_conv.bias": r(C // 8),
        "value_conv.weight": r(C, C, 1, 1), "value_conv.bias": r(C),
    }


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS + [pytest.param("reference", "cpu", id="reference")])
def test_module_loads_mmcv_state_dict(backend, device):
    C = 16
    sd = _mmcv_state_dict(C)
    m = CrissCrossAttention(C, backend=backend).to(device)
    m.load_state_dict(sd)  # strict: the key names are mmcv's
    x = torch.randn(2, C, 5, 7, generator=torch.Generator().manual_seed(4))
    conv = lambda name, t: torch.nn.functional.conv2d(t, sd[f"{name}.weight"].double(), sd[f"{name}.bias"].double())
    xd = x.double()
    want = sd["gamma"].double() * reference.criss_cross_attention(conv("query_conv", xd), conv("key_conv", xd),
                                                                   conv("value_conv", xd)) + xd
    out = m(x.to(device))
    assert_close(out, want)
    assert not torch.allclose(out.double().cpu(), xd, atol=1e-3), "gamma != 0 must change the output"


def test_module_compile_fullgraph():
    torch._dynamo.reset()
    m = CrissCrossAttention(16, backend="cpu")
    with torch.no_grad():
        m.gamma.fill_(0.5)
    x = torch.randn(2, 16, 6, 5, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True)  # inductor: the epilogue fuses around the op
    out = compiled(x)
    want = m(x)
    assert_close(out, want.detach().double())
    g_c = torch.autograd.grad(out.sum(), (x, m.gamma))
    g_e = torch.autograd.grad(want.sum(), (x, m.gamma))
    for a, b in zip(g_c, g_e):
        assert_close(a, b.double())


@needs_triton_cpu
def test_compile_fullgraph_triton_op():
    torch._dynamo.reset()
    q, k, v = _inputs(1, 3, 4, 5, 6, torch.float32, requires_grad=True)
    fn = torch.compile(lambda q, k, v: armnet_ops.criss_cross_attention(q, k, v, backend="triton"),
                       fullgraph=True, backend="aot_eager")
    out = fn(q, k, v)
    assert_close(out, reference.criss_cross_attention(q.double(), k.double(), v.double()))
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


# ---- bad input -----------------------------------------------------------------------------

def test_bad_input():
    q, k, v = _inputs(1, 2, 3, 4, 5, torch.float32)
    f = armnet_ops.criss_cross_attention
    with pytest.raises(ValueError, match=r"'q' must be 4-D, got 3-D"):
        f(q[0], k, v)
    with pytest.raises(ValueError, match=r"'k' must have the shape of 'q'"):
        f(q, k[:, :, :3], v)
    with pytest.raises(ValueError, match=r"'v' must have H = 4"):
        f(q, k, v[:, :, :2])
    with pytest.raises(ValueError, match=r"'v' must have N = 1"):
        f(q, k, torch.cat([v, v]))
    with pytest.raises(ValueError, match=r"'k' must have the dtype of 'q'"):
        f(q, k.double(), v)
    with pytest.raises(ValueError, match=r"'v' must have the dtype of 'q'"):
        f(q, k, v.double())
    with pytest.raises(ValueError, match=r"backend must be one of"):
        f(q, k, v, backend="magic")
    with pytest.raises(ValueError, match=r"'gamma' and 'residual' go together"):
        f(q, k, v, gamma=torch.ones(1))
    with pytest.raises(ValueError, match=r"'residual' must have the shape of 'v'"):
        f(q, k, v, gamma=torch.ones(1), residual=q)
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is not available.*CUDA tensors"):
        f(q, k, v, backend="cuda")
    with pytest.raises(TypeError, match=r"supports dtypes"):
        f(q.half(), k.half(), v.half(), backend="cpu")
    with pytest.raises(ValueError, match=r"'attn' must have H\+W-1 channels = 8"):
        armnet_ops.cca_map(torch.rand(1, 7, 4, 5), v)
    with pytest.raises(ValueError, match=r"'k' must have the shape of 'q'"):
        armnet_ops.cca_weight(q, k[:, :1])


def test_bad_input_direct_op():
    q, k, v = _inputs(1, 2, 3, 4, 5, torch.float32)
    with pytest.raises(RuntimeError, match=r"'v' must have N, H, W of 'q'"):
        ops.cca_forward(q, k, v[:, :, :2], 1.0)
    with pytest.raises(RuntimeError, match=r"share one dtype"):
        ops.cca_forward(q, k, v.double(), 1.0)
    with pytest.raises(RuntimeError, match=r"'attn' must be \(N, H\+W-1, H, W\)"):
        ops.cca_map(torch.rand(1, 7, 4, 5), v)


def test_missing_backend_says_how_to_build(monkeypatch):
    from armnet_ops import _backend
    monkeypatch.setattr(_backend, "EXTENSION_ERROR", "the extension armnet_ops._C is not built")
    monkeypatch.setattr(_backend, "_SELECTED", {})  # selections cached under the real build
    q, k, v = _inputs(1, 2, 3, 4, 5, torch.float32)
    with pytest.raises(RuntimeError, match=r"backend 'cpu' is not available.*pip install"):
        armnet_ops.criss_cross_attention(q, k, v, backend="cpu")
    # auto falls back to the reference only when the extension is missing, and says nothing
    out = armnet_ops.criss_cross_attention(q, k, v)
    assert_close(out, reference.criss_cross_attention(q.double(), k.double(), v.double()))

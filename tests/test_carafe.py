"""CARAFE: `carafe` and `carafe_fused` on every kernel backend against armnet_ops.reference, the
reference against a brute-force loop, gradients (gradcheck in fp64), opcheck of the registered
ops, torch.compile, autocast, strides, the modules and bad input."""
import ctypes
import itertools

import pytest
import torch
import torch.nn.functional as F

import armnet_ops
from armnet_ops import reference
from armnet_ops.carafe import CARAFE, CARAFEPack, carafe, carafe_fused
from conftest import HAS_CUDA
from cpu_isa import ISAS, run_with_cpu_isa
from host_emulation import HOST_HALF, build_harness
from numerics import KERNEL_BACKENDS, assert_close, needs_cuda, needs_triton_cpu, opcheck

OPS = {"carafe": (carafe, reference.carafe), "carafe_fused": (carafe_fused, reference.carafe_fused)}

FULL_GRID = list(itertools.product((1, 3, 5, 7), (1, 2, 4), (1, 2, 3, 4)))  # (k, G, s)
# The Triton interpreter runs every program in Python: a subset that still covers each k, G and
# s, the generic (s > 4) path and the borders.
INTERPRETER_GRID = [(1, 1, 1), (3, 2, 2), (5, 1, 3), (7, 2, 4), (5, 4, 1), (3, 1, 5)]


def _backend_params(grid_for):
    """KERNEL_BACKENDS × the (k, G, s) grid of each backend, keeping the backend's marks."""
    out = []
    for p in KERNEL_BACKENDS:
        backend, device = p.values
        for k, G, s in grid_for(p.id):
            out.append(pytest.param(backend, device, k, G, s, marks=p.marks,
                                    id=f"{p.id}-k{k}-G{G}-s{s}"))
    return out


def _grid(backend_id):
    return INTERPRETER_GRID if backend_id == "triton-interpreter" else FULL_GRID


def _inputs(op, N, C, H, W, k, G, s, dtype=torch.float64, device="cpu"):
    """Features and the op's second input: normalised masks for carafe, raw logits for the fused
    op (scaled up so the softmax is far from uniform)."""
    f = torch.randn(N, C, H, W, dtype=dtype, device=device)
    logits = 3 * torch.randn(N, G * k * k * s * s, H, W, dtype=dtype, device=device)
    if op == "carafe_fused":
        return f, logits
    return f, reference.carafe_mask(logits, k, G, s)


def _run(op, backend, f, m, k, G, s, grad_out=None):
    """Output and the gradients to both inputs."""
    f = f.detach().requires_grad_()
    m = m.detach().requires_grad_()
    fn = OPS[op][0] if backend != "reference" else OPS[op][1]
    out = fn(f, m, k, G, s, backend=backend) if backend != "reference" else fn(f, m, k, G, s)
    if grad_out is None:
        return out, None, None
    gf, gm = torch.autograd.grad(out, (f, m), grad_out)
    return out, gf, gm


def _check_parity(op, backend, device, N, C, H, W, k, G, s, dtype):
    f64, m64 = _inputs(op, N, C, H, W, k, G, s, device=device)
    go64 = torch.randn(N, C, s * H, s * W, dtype=torch.float64, device=device)
    ref, rgf, rgm = _run(op, "reference", f64, m64, k, G, s, go64)
    out, gf, gm = _run(op, backend, f64.to(dtype), m64.to(dtype), k, G, s, go64.to(dtype))
    low = {}
    if dtype in (torch.float16, torch.bfloat16):
        low = dict(zip(("out", "gf", "gm"),
                       _run(op, "reference", f64.to(dtype), m64.to(dtype), k, G, s,
                            go64.to(dtype))))
    assert out.dtype == dtype and out.is_contiguous()
    assert_close(out, ref, low.get("out"), what=f"{op} output")
    assert_close(gf, rgf, low.get("gf"), what=f"{op} grad features")
    assert_close(gm, rgm, low.get("gm"), what=f"{op} grad masks/logits")


# ---- the reference itself ------------------------------------------------------------------------

def _carafe_loops(features, masks, k, G, s):
    """The definition, one output element at a time."""
    N, C, H, W = features.shape
    r = (k - 1) // 2
    out = torch.zeros(N, C, s * H, s * W, dtype=features.dtype)
    for n, c, y, x in itertools.product(range(N), range(C), range(s * H), range(s * W)):
        g = c // (C // G)
        acc = 0.0
        for ky, kx in itertools.product(range(k), range(k)):
            hh, ww = y // s + ky - r, x // s + kx - r
            if 0 <= hh < H and 0 <= ww < W:
                acc += features[n, c, hh, ww].item() * masks[n, g * k * k + ky * k + kx, y, x].item()
        out[n, c, y, x] = acc
    return out


@pytest.mark.parametrize("k,G,s", [(3, 2, 2), (5, 1, 3), (1, 1, 2)])
def test_reference_matches_loops(k, G, s):
    N, C, H, W = 1, 2 * G, 3, 4
    f = torch.randn(N, C, H, W, dtype=torch.float64)
    m = torch.rand(N, G * k * k, s * H, s * W, dtype=torch.float64)  # not normalised on purpose
    torch.testing.assert_close(reference.carafe(f, m, k, G, s), _carafe_loops(f, m, k, G, s))


def test_reference_fused_is_carafe_of_the_mask():
    k, G, s = 3, 2, 2
    f, lg = _inputs("carafe_fused", 2, 4, 5, 3, k, G, s)
    mask = reference.carafe_mask(lg, k, G, s)
    # the kernel normaliser by hand: channel (g·k² + t)·s² + i·s + j -> tap t, child (i, j)
    by_hand = lg.view(2, G, k * k, s, s, 5, 3).permute(0, 1, 2, 5, 3, 6, 4)
    by_hand = by_hand.reshape(2, G, k * k, 5 * s, 3 * s).softmax(dim=2).reshape_as(mask)
    torch.testing.assert_close(mask, by_hand)
    torch.testing.assert_close(reference.carafe_fused(f, lg, k, G, s), reference.carafe(f, mask, k, G, s))


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_fused_equals_carafe_of_the_mask(backend, device):
    k, G, s = 3, 2, 3
    f, lg = _inputs("carafe_fused", 2, 4, 4, 5, k, G, s, device=device)
    fused = carafe_fused(f, lg, k, G, s, backend=backend)
    torch.testing.assert_close(fused, carafe(f, reference.carafe_mask(lg, k, G, s), k, G, s,
                                             backend=backend))


# ---- parity of every backend ---------------------------------------------------------------------

@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend,device,k,G,s", _backend_params(_grid))
def test_parity(op, backend, device, k, G, s):
    # odd, non-square sizes; fp32 against the fp64 reference (the tolerance rule of numerics.py)
    _check_parity(op, backend, device, 2, 2 * G, 5, 3, k, G, s, torch.float32)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("N,C,H,W", [(1, 4, 1, 1), (1, 4, 1, 6), (2, 4, 7, 1), (1, 8, 9, 40)])
def test_edge_shapes(op, backend, device, N, C, H, W):
    # H = 1, W = 1, and W past one 32-wide tile of the CUDA kernels
    _check_parity(op, backend, device, N, C, H, W, 3, 2, 2, torch.float64)


def _many_taps_params():
    # on the interpreter (slow: one program per group) only the fused op
    return [pytest.param(op, *p.values, marks=p.marks, id=f"{p.id}-{op}")
            for p in KERNEL_BACKENDS for op in OPS
            if not (p.id == "triton-interpreter" and op == "carafe")]


@pytest.mark.parametrize("op,backend,device", _many_taps_params())
def test_many_taps_per_group(op, backend, device):
    # G·k² = 16·25 = 400 > 384, where mmcv's shared-memory layout overflows.
    _check_parity(op, backend, device, 1, 16, 3, 4, 5, 16, 2, torch.float32)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_grad_out_with_odd_storage_offset(op, backend, device):
    # a contiguous grad_out whose data starts one element into its storage (the CUDA kernels read
    # grad_out in vectors of s elements)
    k, G, s = 3, 1, 2
    f, m = _inputs(op, 1, 2, 3, 4, k, G, s, dtype=torch.float32, device=device)
    go = torch.randn(2 * 6 * 8, device=device)
    shifted = torch.empty(go.numel() + 1, device=device)[1:].copy_(go).view(1, 2, 6, 8)
    expected = _run(op, backend, f, m, k, G, s, go.view(1, 2, 6, 8))
    got = _run(op, backend, f, m, k, G, s, shifted)
    for a, b in zip(got[1:], expected[1:]):
        torch.testing.assert_close(a, b)


@needs_cuda
@pytest.mark.parametrize("op", list(OPS))
def test_cuda_too_many_taps_is_a_clear_error(op):
    # k²·s² = 31²·4² = 15376 staged mask values per pixel exceed any device's shared memory
    k, G, s = 31, 1, 4
    f, m = _inputs(op, 1, 2, 2, 3, k, G, s, dtype=torch.float32, device="cuda")
    with pytest.raises(RuntimeError, match="shared memory"):
        OPS[op][0](f, m, k, G, s, backend="cuda")


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", [pytest.param("cuda", marks=needs_cuda),
                                     pytest.param("triton", marks=needs_cuda)])
@pytest.mark.parametrize("k,G,s", [(5, 1, 2), (3, 4, 4), (7, 2, 3), (5, 2, 5)])
def test_low_precision_cuda(op, dtype, backend, k, G, s):
    _check_parity(op, backend, "cuda", 2, 8 * G, 11, 37, k, G, s, dtype)


_ISA_SCRIPT = """
import torch, armnet_ops
from armnet_ops import reference
g = torch.Generator().manual_seed(0)
# W = 13 and 2W = 26 are no multiple of any vector width: the loop tails run too.
for k, G, s in ((3, 1, 2), (5, 2, 2), (3, 1, 3)):
    f = torch.randn(2, 4, 9, 13, generator=g, dtype=torch.float64, requires_grad=True)
    lg = (3 * torch.randn(2, G * k * k * s * s, 9, 13, generator=g, dtype=torch.float64)).requires_grad_()
    m = reference.carafe_mask(lg, k, G, s).detach().requires_grad_()
    for name, second in (("carafe", m), ("carafe_fused", lg)):
        ref = getattr(reference, name)(f, second, k, G, s)
        go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
        want = torch.autograd.grad(ref, (f, second), go)
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
            x = [t.detach().to(dtype).requires_grad_() for t in (f, second)]
            out = getattr(armnet_ops, name)(*x, k, G, s, backend="cpu")
            got = torch.autograd.grad(out, x, go.to(dtype))
            for a, b in zip((out,) + got, (ref,) + want):
                err = (a.double() - b).abs().max().item() / b.abs().max().item()
                assert err < tol, (name, k, G, s, dtype, err)
print("ok")
"""


@pytest.mark.parametrize("isa", ISAS)
def test_cpu_isa_variants(isa):
    run_with_cpu_isa(_ISA_SCRIPT, isa)


@pytest.mark.parametrize("op", ["carafe", "carafe_fused"])
def test_cpu_outputs_are_not_kept_after_they_are_freed(op):
    """CARAFE's CPU outputs come from torch's allocator, not armnet_ops' buffer cache
    (csrc/cpu/buffer_cache.h): a freed output kept there is memory no other op can use, and
    evaluating ARM-Net R50 at 512² then peaked 100 MB higher (tests/test_model.py's budget)."""
    f, m = _inputs(op, 1, 256, 64, 64, 5, 1, 2, dtype=torch.float32)
    g = torch.randn(1, 256, 128, 128)
    fwd = getattr(torch.ops.armnet_ops, op + "_forward")
    bwd = getattr(torch.ops.armnet_ops, op + "_backward")
    armnet_ops.release_cpu_scratch()
    outs = (fwd(f, m, 5, 1, 2), *bwd(g, f, m, 5, 1, 2))
    assert max(t.nbytes for t in outs) >= 16 << 20  # large enough for the cache's 4 MiB floor
    del outs
    assert armnet_ops.release_cpu_scratch() == 0


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_empty_batch(op, backend, device):
    k, G, s = 3, 2, 2
    f, m = _inputs(op, 0, 4, 5, 3, k, G, s, dtype=torch.float32, device=device)
    out, gf, gm = _run(op, backend, f, m, k, G, s, torch.zeros(0, 4, 10, 6, device=device))
    assert out.shape == (0, 4, 10, 6) and gf.shape == f.shape and gm.shape == m.shape


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_channels_last_and_strided(op, backend, device):
    k, G, s = 3, 2, 2
    f, m = _inputs(op, 2, 4, 5, 6, k, G, s, dtype=torch.float32, device=device)
    go = torch.randn(2, 4, 10, 12, device=device)
    expected = _run(op, backend, f, m, k, G, s, go)
    cl = _run(op, backend, f.contiguous(memory_format=torch.channels_last),
              m.contiguous(memory_format=torch.channels_last), k, G, s,
              go.contiguous(memory_format=torch.channels_last))
    # a non-contiguous view: every other column of a wider tensor
    wide_f = torch.zeros(2, 4, 5, 12, device=device)
    wide_f[..., ::2] = f
    strided = _run(op, backend, wide_f[..., ::2], m, k, G, s, go)
    for got in (cl, strided):
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_backward_is_deterministic(op, backend, device):
    k, G, s = 5, 1, 2
    f, m = _inputs(op, 1, 8, 6, 7, k, G, s, dtype=torch.float32, device=device)
    go = torch.randn(1, 8, 12, 14, device=device)
    first = _run(op, backend, f, m, k, G, s, go)
    second = _run(op, backend, f, m, k, G, s, go)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ---- gradients -----------------------------------------------------------------------------------

GRADCHECK_BACKENDS = [pytest.param("cpu", id="cpu"),
                      pytest.param("triton", id="triton-interpreter", marks=needs_triton_cpu)]


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
@pytest.mark.parametrize("N,H,W,k,G,s", [(1, 3, 2, 3, 2, 2), (2, 1, 3, 1, 1, 3), (1, 2, 1, 5, 1, 1)])
def test_gradcheck(op, backend, N, H, W, k, G, s):
    f, m = _inputs(op, N, 2 * G, H, W, k, G, s)
    f.requires_grad_()
    m.requires_grad_()
    fn = OPS[op][0]
    # fast mode (random projections) on the interpreter, where each evaluation is slow
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, k, G, s, backend=backend), (f, m),
                                    fast_mode=backend == "triton")


def test_gradcheck_reference():
    k, G, s = 3, 1, 2
    f, lg = _inputs("carafe_fused", 1, 2, 2, 3, k, G, s)
    assert torch.autograd.gradcheck(lambda a, b: reference.carafe_fused(a, b, k, G, s),
                                    (f.requires_grad_(), lg.requires_grad_()))


# ---- registered ops ------------------------------------------------------------------------------

def _op_args(op, fused_suffix, k=3, G=2, s=2, channels_last=False, device="cpu"):
    f, m = _inputs(op, 2, 4, 3, 5, k, G, s, dtype=torch.float32, device=device)
    if channels_last:
        f = f.contiguous(memory_format=torch.channels_last)
        m = m.contiguous(memory_format=torch.channels_last)
    go = torch.randn(2, 4, 3 * s, 5 * s, device=device)
    return f, m, go


OPCHECK_BACKENDS = [pytest.param("", "cpu", id="cpp-cpu"),
                    pytest.param("_triton", "cpu", id="triton-interpreter", marks=needs_triton_cpu),
                    pytest.param("", "cuda", id="cpp-cuda", marks=needs_cuda),
                    pytest.param("_triton", "cuda", id="triton-cuda", marks=needs_cuda)]


def _opcheck_params():
    out = []
    for p in OPCHECK_BACKENDS:
        for op, channels_last in itertools.product(OPS, (False, True)):
            # the interpreter is slow: each op once, one of them with channels_last inputs
            if p.id == "triton-interpreter" and channels_last != (op == "carafe_fused"):
                continue
            out.append(pytest.param(op, *p.values, channels_last, marks=p.marks,
                                    id=f"{p.id}-{op}-{'cl' if channels_last else 'contig'}"))
    return out


@pytest.mark.parametrize("op,suffix,device,channels_last", _opcheck_params())
def test_opcheck(op, suffix, device, channels_last):
    if suffix == "_triton":
        import armnet_ops.triton.carafe  # noqa: F401  registers the twins
    k, G, s = 3, 2, 2
    f, m, go = _op_args(op, suffix, k, G, s, channels_last, device)
    fwd = getattr(torch.ops.armnet_ops, f"{op}_forward{suffix}")
    bwd = getattr(torch.ops.armnet_ops, f"{op}_backward{suffix}")
    opcheck(fwd, (f.requires_grad_(), m.requires_grad_(), k, G, s))
    opcheck(bwd, (go, f.detach(), m.detach(), k, G, s))


@pytest.mark.parametrize("backend,device", [pytest.param("cpu", "cpu", id="cpu"),
                                            pytest.param("cuda", "cuda", id="cuda",
                                                         marks=needs_cuda)])
def test_torch_compile_carafepack(backend, device):
    torch._dynamo.reset()
    mod = CARAFEPack(8, 2, up_kernel=3, up_group=2, compressed_channels=4, backend=backend).to(device)
    torch.nn.init.normal_(mod.content_encoder.weight, std=0.5)
    x = torch.randn(2, 8, 5, 6, device=device, requires_grad=True)
    compiled = torch.compile(mod, fullgraph=True, backend="inductor")
    out = compiled(x)
    out.sum().backward()
    g_compiled = x.grad.clone()
    x.grad = None
    eager = mod(x)
    eager.sum().backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g_compiled, x.grad)


# ---- autocast ------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend,device,dtype", [
    pytest.param("auto", "cpu", torch.bfloat16, id="cpu-auto-bf16"),
    pytest.param("cuda", "cuda", torch.float16, id="cuda-fp16", marks=needs_cuda),
    pytest.param("cuda", "cuda", torch.bfloat16, id="cuda-bf16", marks=needs_cuda),
    pytest.param("triton", "cuda", torch.bfloat16, id="triton-bf16", marks=needs_cuda)])
def test_autocast(op, backend, device, dtype):
    k, G, s = 3, 2, 2
    f64, m64 = _inputs(op, 2, 4, 5, 6, k, G, s, device=device)
    with torch.autocast(device, dtype=dtype):
        out = OPS[op][0](f64.float(), m64.float(), k, G, s, backend=backend)
    assert out.dtype == dtype
    ref_low = OPS[op][1](f64.to(dtype), m64.to(dtype), k, G, s)
    assert_close(out, OPS[op][1](f64, m64, k, G, s), ref_low)


# ---- modules -------------------------------------------------------------------------------------

def test_carafe_module():
    k, G, s = 5, 2, 2
    f, m = _inputs("carafe", 1, 4, 3, 5, k, G, s, dtype=torch.float32)
    mod = CARAFE(k, G, s)
    assert "kernel_size=5" in repr(mod)
    assert_close(mod(f, m), reference.carafe(f.double(), m.double(), k, G, s))


def test_carafepack_loads_mmcv_state_dict():
    C, s, ku, G, ke, comp = 8, 2, 3, 2, 3, 6
    # the keys and shapes of mmcv.ops.CARAFEPack's state dict
    sd = {"channel_compressor.weight": torch.randn(comp, C, 1, 1),
          "channel_compressor.bias": torch.randn(comp),
          "content_encoder.weight": 0.3 * torch.randn(G * ku * ku * s * s, comp, ke, ke),
          "content_encoder.bias": torch.randn(G * ku * ku * s * s)}
    mod = CARAFEPack(C, s, up_kernel=ku, up_group=G, encoder_kernel=ke, compressed_channels=comp)
    mod.load_state_dict(sd, strict=True)
    x = torch.randn(2, C, 5, 4)
    # mmcv's forward: compressor, encoder, pixel shuffle + softmax, carafe
    logits = F.conv2d(F.conv2d(x, sd["channel_compressor.weight"], sd["channel_compressor.bias"]),
                      sd["content_encoder.weight"], sd["content_encoder.bias"], padding=ke // 2)
    expected = reference.carafe(x, reference.carafe_mask(logits, ku, G, s), ku, G, s)
    torch.testing.assert_close(mod(x), expected, rtol=1e-4, atol=1e-5)


# ---- bad input -----------------------------------------------------------------------------------

def _bad_cases():
    f = torch.randn(1, 4, 3, 5)
    m = torch.rand(1, 2 * 9, 6, 10)
    lg = torch.randn(1, 2 * 9 * 4, 3, 5)
    return [
        ("carafe", (f, m, 4, 2, 2), "kernel_size"),             # even kernel
        ("carafe", (f, m, 3, 3, 2), "group_size"),              # C % G != 0
        ("carafe", (f, m, 3, 2, 0), "scale_factor"),            # s < 1
        ("carafe", (f, m[:, :-1], 3, 2, 2), "masks"),           # mask channels
        ("carafe", (f, m[..., :-1], 3, 2, 2), "masks"),         # mask size
        ("carafe", (f, m.double(), 3, 2, 2), "masks"),          # mixed dtypes
        ("carafe", (f, m.to("meta"), 3, 2, 2), "masks"),        # mixed devices
        ("carafe", (f[0], m, 3, 2, 2), "features"),             # wrong ndim
        ("carafe", (f, m[0], 3, 2, 2), "masks"),                # wrong ndim
        ("carafe", (f, m.expand(2, -1, -1, -1), 3, 2, 2), "masks"),  # N
        ("carafe_fused", (f, lg, 2, 2, 2), "kernel_size"),
        ("carafe_fused", (f, lg, 3, 3, 2), "group_size"),
        ("carafe_fused", (f, lg, 3, 2, -1), "scale_factor"),
        ("carafe_fused", (f, lg[:, 1:], 3, 2, 2), "mask_logits"),
        ("carafe_fused", (f, lg[..., 1:], 3, 2, 2), "mask_logits"),
        ("carafe_fused", (f, lg.half(), 3, 2, 2), "mask_logits"),
        ("carafe_fused", (f, lg.to("meta"), 3, 2, 2), "mask_logits"),
        ("carafe_fused", (f, lg[None], 3, 2, 2), "mask_logits"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bad_input_public(case, backend):
    op, args, name = _bad_cases()[case]
    with pytest.raises((ValueError, TypeError, RuntimeError), match=name):
        OPS[op][0](*args, backend=backend)


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_cpp(case):
    # the C++ glue checks too, for callers of torch.ops (the meta-device cases stop in the
    # dispatcher or the glue; either must raise)
    op, args, name = _bad_cases()[case]
    fwd = getattr(torch.ops.armnet_ops, f"{op}_forward")
    with pytest.raises((ValueError, RuntimeError, NotImplementedError)):
        fwd(*args)


def test_missing_backend_is_an_error():
    f, m = _inputs("carafe", 1, 2, 3, 3, 3, 1, 2, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="cuda"):
        carafe(f, m, 3, 1, 2, backend="cuda")


# ---- the CUDA kernels, emulated on the host ------------------------------------------------------
# csrc/cuda/carafe_kernels.cuh holds the device code and the glue's launch decisions, so it compiles
# as C++ with a few shims: one std::thread per CUDA thread, a std::barrier for __syncthreads,
# blocks run one at a time (one static array is the block's shared memory), and the host __half /
# __nv_bfloat16 of tests/host_emulation.py (rounding to nearest even, as on the device). The
# kernels run with the production configuration of csrc/cuda/carafe.cu (forward_cb, mask_tb,
# kFeatureCB, kWarps and the grid), in fp32, fp64, fp16 and bf16 (fp32 accumulation, as
# at::opmath_type), with the channel splits given or chosen by the glue's channel_splits heuristic
# for a given SM count, and with the glue's grad_out copy decision (grad_out_needs_copy), checked
# against the vector alignment the kernels need. This checks indexing, tiling, channel splits,
# tails, the generic-s path and fp16/bf16 rounding without a GPU; it cannot check misaligned
# accesses faulting or the launches themselves (the needs_cuda tests do).

EMULATION_HARNESS = r"""
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

struct dim3 { unsigned x = 0, y = 0, z = 0; };
static dim3 blockIdx;
static thread_local dim3 threadIdx;
static std::barrier<>* g_barrier = nullptr;
inline void __syncthreads() { g_barrier->arrive_and_wait(); }
inline float __expf(float x) { return std::exp(x); }
using std::max;
using std::min;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__
#define __align__(n)
namespace armnet_ops { namespace carafe_cuda {
alignas(16) unsigned char smem_raw[1 << 22];
} }
""" + HOST_HALF + r"""
#include "cuda/carafe_kernels.cuh"

using namespace armnet_ops::carafe_cuda;

template <typename T> struct Acc { using type = float; };  // at::opmath_type
template <> struct Acc<double> { using type = double; };

template <typename F>
static void launch(int64_t blocks, F body) {
  for (int64_t b = 0; b < blocks; ++b) {
    blockIdx.x = static_cast<unsigned>(b);
    std::barrier<> bar(kThreads);
    g_barrier = &bar;
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t)
      threads.emplace_back([&body, t] {
        threadIdx.x = t % kLanes;
        threadIdx.y = t / kLanes;
        body();
      });
    for (auto& th : threads) th.join();
  }
}

// The channel splits of a launch: `given` when > 0, else the glue's heuristic for `sms` SMs.
static int splits_of(int given, int64_t tiles, int C, int G, int cb, int sms) {
  return given > 0 ? given : channel_splits(tiles, C / G, cb, sms);
}

// report: [0] forward splits, [1] feature-gradient splits, [2] 1 if grad_out was copied,
// [3] 1 if the pointer handed to the kernels lacked the vector alignment they read it with.
template <typename T, int S_CT, bool FUSED>
static void forward(const T* f, const T* m, T* out, int N, int C, int H, int W, int G, int k,
                    int s, int given, int sms, int* report) {
  using A = typename Acc<T>::type;
  constexpr int CB = forward_cb<S_CT>();
  const int64_t tiles = tile_count(N, H, W, G);
  const int splits = splits_of(given, tiles, C, G, CB, sms);
  report[0] = splits;
  launch(tiles * splits, [&] {
    carafe_forward_kernel<T, A, S_CT, CB, FUSED>(f, m, out, C, H, W, G, k, s, splits);
  });
}

template <typename T, int S_CT, bool FUSED>
static void backward(const T* go, const T* f, const T* m, T* gf, T* gm,
                     typename Acc<T>::type* lse, int N, int C, int H, int W, int G, int k, int s,
                     int given, int sms, int* report) {
  using A = typename Acc<T>::type;
  // backward_cuda's copy of a misaligned grad_out (a fresh buffer is 16-byte aligned)
  T* copy = nullptr;
  if (grad_out_needs_copy(go)) {
    const size_t bytes = (size_t(N) * C * s * H * s * W * sizeof(T) + 15) / 16 * 16;
    copy = static_cast<T*>(std::aligned_alloc(16, std::max<size_t>(bytes, 16)));
    std::memcpy(copy, go, size_t(N) * C * s * H * s * W * sizeof(T));
    go = copy;
    report[2] = 1;
  }
  if constexpr (ChildRow<S_CT, T>::kVector)
    report[3] = reinterpret_cast<uintptr_t>(go) % alignof(Vec<T, S_CT>) != 0;
  constexpr int TB = mask_tb<S_CT>();
  const int64_t tiles = tile_count(N, H, W, G);
  launch(tiles, [&] {
    carafe_mask_grad_kernel<T, A, S_CT, TB, FUSED>(go, f, m, gm, lse, C, H, W, G, k, s);
  });
  const int splits = splits_of(given, tiles, C, G, kFeatureCB, sms);
  report[1] = splits;
  launch(tiles * splits, [&] {
    carafe_feature_grad_kernel<T, A, S_CT, kFeatureCB, FUSED>(go, m, lse, gf, C, H, W, G, k, s,
                                                              splits);
  });
  std::free(copy);
}

template <typename T>
static void run(int fused, int do_backward, const void* go_, const void* f_, const void* m_,
                void* out_, void* gf_, void* gm_, void* lse_, int N, int C, int H, int W, int G,
                int k, int s, int given, int sms, int* report) {
  using A = typename Acc<T>::type;
  const T* go = static_cast<const T*>(go_);
  const T* f = static_cast<const T*>(f_);
  const T* m = static_cast<const T*>(m_);
  T* out = static_cast<T*>(out_);
  T* gf = static_cast<T*>(gf_);
  T* gm = static_cast<T*>(gm_);
  A* lse = static_cast<A*>(lse_);
#define SIZES N, C, H, W, G, k, s, given, sms, report
  auto body = [&](auto s_ct) {
    constexpr int S = decltype(s_ct)::value;
    if (fused) {
      if (do_backward) backward<T, S, true>(go, f, m, gf, gm, lse, SIZES);
      else forward<T, S, true>(f, m, out, SIZES);
    } else {
      if (do_backward) backward<T, S, false>(go, f, m, gf, gm, lse, SIZES);
      else forward<T, S, false>(f, m, out, SIZES);
    }
  };
  switch (s) {  // dispatch_scale of carafe.cu
    case 1: body(std::integral_constant<int, 1>{}); break;
    case 2: body(std::integral_constant<int, 2>{}); break;
    case 3: body(std::integral_constant<int, 3>{}); break;
    case 4: body(std::integral_constant<int, 4>{}); break;
    default: body(std::integral_constant<int, 0>{}); break;
  }
#undef SIZES
}

extern "C" {
// dtype: 0 fp32, 1 fp64, 2 fp16, 3 bf16.
void carafe_emulate(int dtype, int fused, int bwd, const void* go, const void* f, const void* m,
                    void* out, void* gf, void* gm, void* lse, int N, int C, int H, int W, int G,
                    int k, int s, int splits, int sms, int* report) {
#define ARGS fused, bwd, go, f, m, out, gf, gm, lse, N, C, H, W, G, k, s, splits, sms, report
  switch (dtype) {
    case 0: run<float>(ARGS); break;
    case 1: run<double>(ARGS); break;
    case 2: run<__half>(ARGS); break;
    default: run<__nv_bfloat16>(ARGS); break;
  }
#undef ARGS
}
size_t carafe_staged_mask_bytes(int64_t k, int64_t s, size_t acc_bytes) {
  return staged_mask_bytes(k, s, acc_bytes);
}
size_t carafe_smem_without_optin() { return kSmemWithoutOptin; }
}
"""

EMULATED_DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


@pytest.fixture(scope="module")
def cuda_emulation(tmp_path_factory):
    lib = build_harness(tmp_path_factory.mktemp("carafe_emulation"), "carafe_emulation",
                        EMULATION_HARNESS)
    lib.carafe_staged_mask_bytes.restype = ctypes.c_size_t
    lib.carafe_smem_without_optin.restype = ctypes.c_size_t
    return lib


def _emulate(lib, fused, f, m, go, k, G, s, splits, sms=0):
    """Forward then backward through the emulated launches; returns (out, grad features,
    grad masks, report) with report = (forward splits, feature-gradient splits, grad_out copied,
    misaligned vector reads). splits = 0: the glue's heuristic for `sms` SMs."""
    N, C, H, W = f.shape

    def ptr(t):
        return ctypes.c_void_p(t.data_ptr() if t is not None and t.numel() else 0)

    sizes = [ctypes.c_int(v) for v in (N, C, H, W, G, k, s, splits, sms)]
    report = (ctypes.c_int * 4)()
    code = ctypes.c_int(EMULATED_DTYPES[f.dtype])
    # NaN-filled outputs: an element a kernel forgets to write shows up
    out = torch.full((N, C, s * H, s * W), float("nan"), dtype=f.dtype)
    lib.carafe_emulate(code, ctypes.c_int(fused), ctypes.c_int(0), ptr(None), ptr(f), ptr(m),
                       ptr(out), ptr(None), ptr(None), ptr(None), *sizes, report)
    gf, gm = torch.full_like(f, float("nan")), torch.full_like(m, float("nan"))
    acc = torch.float64 if f.dtype == torch.float64 else torch.float32
    lse = torch.full((N, G, s * s, H, W), float("nan"), dtype=acc)
    lib.carafe_emulate(code, ctypes.c_int(fused), ctypes.c_int(1), ptr(go), ptr(f), ptr(m),
                       ptr(None), ptr(gf), ptr(gm), ptr(lse), *sizes, report)
    return out, gf, gm, tuple(report)


def _check_emulated(lib, op, N, C, H, W, k, G, s, dtype, splits, sms=0, go_offset=0):
    fused = op == "carafe_fused"
    f, m = _inputs(op, N, C, H, W, k, G, s)
    go = torch.randn(N, C, s * H, s * W, dtype=torch.float64)
    ref = _run(op, "reference", f, m, k, G, s, go)
    low = [None] * 3
    if dtype in (torch.float16, torch.bfloat16):  # the reference on the rounded inputs, in fp32
        rounded = [t.to(dtype).float() for t in (f, m, go)]
        low = [t.to(dtype) for t in _run(op, "reference", *rounded[:2], k, G, s, rounded[2])]
    go_low = go.to(dtype)
    if go_offset:  # a contiguous view that starts go_offset elements into its storage
        go_low = torch.empty(go.numel() + go_offset, dtype=dtype)[go_offset:].view(go.shape)
        go_low.copy_(go)
    *got, report = _emulate(lib, int(fused), f.to(dtype), m.to(dtype), go_low, k, G, s, splits,
                            sms)
    for a, b, lo, what in zip(got, ref, low, ("output", "grad features", "grad masks/logits")):
        assert a.dtype == dtype
        assert_close(a, b.detach(), None if lo is None else lo.detach(),
                     what=f"emulated CUDA {op} {what}")
    assert report[3] == 0, "the kernels were handed a grad_out misaligned for their vector reads"
    return report


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("k,G,s,splits,H,W,Cg,dtype", [
    (3, 2, 2, 1, 3, 5, 3, torch.float64),
    (5, 1, 3, 2, 2, 37, 9, torch.float32),    # two column tiles, channel tail, 2 splits
    (1, 1, 1, 1, 2, 3, 17, torch.float64),
    (7, 4, 4, 1, 3, 4, 2, torch.float64),
    (3, 1, 5, 3, 2, 33, 8, torch.float64),    # the runtime-s path (s > 4), 3 splits
    (5, 2, 1, 2, 4, 40, 20, torch.float32),
    (3, 1, 2, 1, 1, 1, 1, torch.float64),
    # fp16 / bf16 through the host types, fp32 accumulation
    (5, 1, 2, 2, 3, 35, 12, torch.float16),   # ARM-Net's k_u = 5, s = 2
    (3, 1, 2, 1, 4, 6, 9, torch.bfloat16),    # the small model's k_u = 3
    (3, 2, 4, 2, 2, 5, 5, torch.float16),     # s = 4: 8-byte child vectors
    (5, 1, 3, 1, 3, 4, 4, torch.bfloat16),    # s = 3: scalar children
    (3, 1, 5, 2, 2, 3, 6, torch.float16),     # runtime s
])
def test_cuda_kernels_emulated(cuda_emulation, op, k, G, s, splits, H, W, Cg, dtype):
    _check_emulated(cuda_emulation, op, 2, Cg * G, H, W, k, G, s, dtype, splits)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("sms,C,H,W,k,G,s,dtype,want", [
    # H100/H200 (132 SMs): a small image has few tiles, so the channels are split
    (132, 64, 3, 5, 5, 1, 2, torch.float32, (2, 2)),
    (132, 96, 2, 40, 3, 2, 1, torch.bfloat16, (1, 2)),  # s = 1: forward CB 16, feature CB 8
    (132, 20, 2, 3, 3, 1, 1, torch.float16, (1, 1)),   # 20 channels: one pass of kWarps·CB
    (1, 64, 8, 40, 5, 1, 2, torch.float32, (1, 1)),    # one SM: 16 tiles are enough
])
def test_cuda_channel_splits_heuristic_emulated(cuda_emulation, op, sms, C, H, W, k, G, s, dtype,
                                                want):
    """The glue's channel_splits for a given SM count, and the kernels with those splits.
    want = (forward, feature gradient) splits, worked out from the rule in carafe.cu:
    min(ceil(4·SMs / tiles), ceil((C/G) / (kWarps·CB))), at least 1."""
    report = _check_emulated(cuda_emulation, op, 1, C, H, W, k, G, s, dtype, 0, sms)
    assert report[:2] == want


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype,s,offset,copied", [
    (torch.float32, 2, 1, 1),   # 8-byte vectors, the view 4 bytes off
    (torch.float16, 4, 2, 1),   # 8-byte vectors, 4 bytes off
    (torch.float16, 2, 1, 1),   # 4-byte vectors, 2 bytes off
    (torch.float64, 2, 1, 1),   # 16-byte vectors, 8 bytes off
    (torch.float32, 2, 4, 0),   # 16 bytes off: aligned, no copy
])
def test_cuda_grad_out_copy_emulated(cuda_emulation, op, dtype, s, offset, copied):
    """backward_cuda copies a grad_out view that starts off a 16-byte boundary; the buffer the
    kernels then read is aligned for their child vectors, and the gradients are right."""
    report = _check_emulated(cuda_emulation, op, 1, 3, 2, 5, 3, 1, s, dtype, 1, go_offset=offset)
    assert report[2] == copied


def test_cuda_shared_memory_limits(cuda_emulation):
    """The glue's dynamic shared memory request (staged_mask_bytes, as prepare_smem computes it):
    the production configurations fit the 48 KiB a block gets without opt-in, in every dtype, and
    carafe.cu's documented limit holds: a (k, s) fits sm_90's 227 KiB opt-in limit exactly when
    k²·s² <= 1816 with fp32 accumulators (fp32/fp16/bf16), 908 with fp64 ones (beyond, the glue
    raises its clear error)."""
    lib = cuda_emulation
    without_optin = lib.carafe_smem_without_optin()
    assert without_optin == 48 * 1024
    sm90_optin = 227 * 1024
    for k, s in ((5, 2), (3, 2)):  # ARM-Net's CARAFEPack (k_u = 5 and the small model's 3), r = 2
        for acc_bytes in (4, 8):
            assert lib.carafe_staged_mask_bytes(k, s, acc_bytes) <= without_optin, (k, s)
    # k = 7, s = 4 (the largest of the test grid) needs the opt-in in fp32
    assert without_optin < lib.carafe_staged_mask_bytes(7, 4, 4) <= sm90_optin
    for acc_bytes, most_taps in ((4, 1816), (8, 908)):
        for k in range(1, 46, 2):
            for s in range(1, 9):
                fits = lib.carafe_staged_mask_bytes(k, s, acc_bytes) <= sm90_optin
                assert fits == (k * k * s * s <= most_taps), (k, s, acc_bytes)

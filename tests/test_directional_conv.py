"""directional_conv2d and directional_conv2d_pair against the reference (F.conv2d + epilogue):
parity over kernels × dilations × layouts × epilogues, fp64 gradcheck, opcheck, torch.compile,
autocast, the DirectionalConv2d module (BatchNorm folding), determinism and bad input.

The Triton interpreter runs a subset of the shapes (it is slow); the C++ CPU backend runs all."""
import contextlib
import itertools

import pytest
import torch
import torch.nn.functional as F

import armnet_ops
from armnet_ops import reference
from armnet_ops.nn import DirectionalConv2d, DirectionalConv2dPair
from numerics import KERNEL_BACKENDS, assert_close, needs_cuda, needs_triton, needs_triton_cpu, opcheck

KERNELS = [(1, 3), (3, 1), (3, 3), (5, 5)]
DILATIONS = [(1, 1), (1, 2), (3, 1), (1, 6), (6, 6)]
# What the interpreter runs: every kernel and every dilation at least once.
INTERP_CASES = [((1, 3), (1, 6)), ((3, 1), (3, 1)), ((3, 3), (1, 2)), ((5, 5), (6, 6)),
                ((3, 3), (1, 1))]
EPILOGUES = list(itertools.product([False, True], repeat=4))  # bias, scale, shift, relu


def _backend_params(cases_for):
    """KERNEL_BACKENDS × the cases that backend runs, keeping each backend's marks."""
    out = []
    for p in KERNEL_BACKENDS:
        backend, device = p.values
        for case in cases_for(backend, device):
            out.append(pytest.param(backend, device, *case, marks=p.marks,
                                    id=f"{p.id}-" + "-".join(map(str, case)).replace(" ", "")))
    return out


def _is_interp(backend, device):
    return backend == "triton" and device == "cpu"


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 parity means fp32: no TF32 in cuDNN's reference or in the Triton kernels."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def make(N=2, C_in=3, C_out=4, H=7, W=9, kernel=(3, 3), dtype=torch.float64, device="cpu",
         bias=True, scale=True, shift=True, channels_last=False, requires_grad=True):
    x = torch.randn(N, C_in, H, W, dtype=dtype, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(C_out, C_in, *kernel, dtype=dtype, device=device) / (C_in * kernel[0] * kernel[1]) ** 0.5

    def vec(on, lo=-1.0, hi=1.0):
        return (torch.rand(C_out, dtype=dtype, device=device) * (hi - lo) + lo) if on else None

    # scale includes values near 0 and negative ones (a folded BatchNorm can have either).
    ts = [x, w, vec(bias), vec(scale, -1.5, 1.5), vec(shift)]
    if scale:
        ts[3][0] = 0.0
    if requires_grad:
        for t in ts:
            if t is not None:
                t.requires_grad_(True)
    return ts


def grads_of(out, inputs, grad):
    live = [t for t in inputs if t is not None]
    gs = iter(torch.autograd.grad(out, live, grad))
    return [None if t is None else next(gs) for t in inputs]


def check_parity(backend, x, w, b, s, t, dilation, activation, what=""):
    """Output and all five gradients of `backend` against the fp64 reference."""
    y = armnet_ops.directional_conv2d(x, w, b, dilation, scale=s, shift=t, activation=activation,
                                      backend=backend)
    leaves64 = [None if v is None else v.detach().double().requires_grad_() for v in (x, w, b, s, t)]
    y64 = reference.directional_conv2d(*leaves64[:3], dilation, *leaves64[3:], activation)
    assert y.dtype == x.dtype and y.device == x.device
    assert_close(y, y64, what=f"{what} y")
    # The output keeps x's layout (what the fake kernel promises).
    fmt = torch.channels_last if (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                                  and not x.is_contiguous()) else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt), f"{what}: output strides {y.stride()}"
    g = torch.randn_like(y64)
    got = grads_of(y, (x, w, b, s, t), g.to(y.dtype))
    ref = grads_of(y64, leaves64, g)
    for name, a, r in zip(("x", "weight", "bias", "scale", "shift"), got, ref):
        if r is None:
            assert a is None
            continue
        assert a.dtype == x.dtype
        assert_close(a, r, what=f"{what} grad_{name}")


# ---- parity ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device,kernel,dilation", _backend_params(
    lambda b, d: INTERP_CASES if _is_interp(b, d) else list(itertools.product(KERNELS, DILATIONS))))
def test_parity_kernels_dilations(backend, device, kernel, dilation):
    # Odd, non-square sizes, smaller than some dilations (a tap can miss the image entirely).
    channels_last = (kernel[0] + dilation[1]) % 2 == 0
    for dtype in (torch.float64, torch.float32):
        ts = make(kernel=kernel, dtype=dtype, device=device, channels_last=channels_last, H=5, W=7)
        check_parity(backend, *ts, dilation, "relu", what=f"{kernel} {dilation} {dtype}")


@pytest.mark.parametrize("backend,device,bias,scale,shift,relu", _backend_params(
    lambda b, d: EPILOGUES[::3] if _is_interp(b, d) else EPILOGUES))
def test_parity_epilogues(backend, device, bias, scale, shift, relu):
    ts = make(kernel=(3, 3), device=device, bias=bias, scale=scale, shift=shift,
              channels_last=bias, H=5, W=6)
    check_parity(backend, *ts, (2, 1), "relu" if relu else None)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_edge_shapes(backend, device):
    # H = W = 1, a 1x1 kernel, one channel, a batch of 0.
    check_parity(backend, *make(N=2, H=1, W=1, kernel=(3, 3), device=device), (2, 3), "relu")
    check_parity(backend, *make(N=1, C_in=1, C_out=1, H=3, W=1, kernel=(1, 1), device=device),
                 (1, 1), None)
    for channels_last in (False, True):
        ts = make(N=0, device=device, channels_last=channels_last)
        check_parity(backend, *ts, (1, 2), "relu")
        y = armnet_ops.directional_conv2d(*ts[:3], (1, 2), scale=ts[3], shift=ts[4], backend=backend)
        y.sum().backward()
        assert y.shape == (0, 4, 7, 9)
        assert ts[1].grad is not None and ts[1].grad.abs().sum() == 0


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_non_contiguous_inputs(backend, device):
    x, w, b, s, t = make(N=2, C_in=6, H=9, W=8, device=device, requires_grad=False)
    x = x[:, ::2, 1:, :].detach().requires_grad_()                 # sliced: neither NCHW nor NHWC
    w = torch.randn(4, 5, 3, 3, dtype=x.dtype, device=device)[:, 1:4].detach().requires_grad_()
    s = torch.stack([s, s], 1)[:, 1].requires_grad_()             # strided per-channel vectors
    b = torch.stack([b, b], 1)[:, 0].requires_grad_()
    t = t.requires_grad_()
    check_parity(backend, x, w, b, s, t, (1, 3), "relu")
    xp = torch.randn(2, 8, 3, 7, dtype=x.dtype, device=device).permute(0, 3, 2, 1).requires_grad_()
    check_parity(backend, xp, torch.randn(4, 7, 1, 3, dtype=x.dtype, device=device,
                                          requires_grad=True), None, None, None, (1, 2), None)


# ---- the horizontal + vertical pair ---------------------------------------------------------------

def _pair_args(device="cpu", dtype=torch.float64, d=2, channels_last=False):
    x = torch.randn(2, 3, 7, 6, dtype=dtype, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    p = lambda *shape: torch.randn(*shape, dtype=dtype, device=device, requires_grad=True)  # noqa: E731
    return dict(x=x, weight_h=p(4, 3, 1, 3), weight_v=p(5, 3, 3, 1), bias_h=p(4), bias_v=None,
                dilation_h=(1, d), dilation_v=(d, 1), scale_h=None, shift_h=p(4), scale_v=p(5),
                shift_v=p(5))


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("d,channels_last", [(1, False), (3, True), (6, False)])
def test_pair_parity(backend, device, d, channels_last):
    for dtype in (torch.float64, torch.float32):
        a = _pair_args(device, dtype, d, channels_last)
        out = armnet_ops.directional_conv2d_pair(**a, activation="relu", backend=backend)
        ref = armnet_ops.directional_conv2d_pair(**{k: v.double() if torch.is_tensor(v) else v
                                                    for k, v in a.items()},
                                                 activation="relu", backend="reference")
        for o, r in zip(out, ref):
            assert_close(o, r, what="pair output")
        # The pair is the two single convolutions.
        single = armnet_ops.directional_conv2d(a["x"], a["weight_v"], a["bias_v"], a["dilation_v"],
                                               scale=a["scale_v"], shift=a["shift_v"],
                                               activation="relu", backend=backend)
        assert_close(out[1], single.double(), what="pair vs single")
        leaves = [v for v in a.values() if torch.is_tensor(v)]
        g = [torch.randn_like(r) for r in ref]
        got = torch.autograd.grad(out, leaves, [gi.to(dtype) for gi in g])
        leaves64 = [v.detach().double().requires_grad_() for v in leaves]
        it = iter(leaves64)
        a64 = {k: next(it) if torch.is_tensor(v) else v for k, v in a.items()}
        ref = reference.directional_conv2d(a64["x"], a64["weight_h"], a64["bias_h"],
                                           a64["dilation_h"], a64["scale_h"], a64["shift_h"], "relu"), \
            reference.directional_conv2d(a64["x"], a64["weight_v"], a64["bias_v"],
                                         a64["dilation_v"], a64["scale_v"], a64["shift_v"], "relu")
        want = torch.autograd.grad(ref, leaves64, g)
        for i, (o, r) in enumerate(zip(got, want)):
            assert_close(o, r, what=f"pair grad {i}")


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_pair_one_output_used(backend, device):
    a = _pair_args(device)
    y_h, _ = armnet_ops.directional_conv2d_pair(**a, backend=backend)
    y_h.sum().backward()
    assert a["weight_v"].grad is None or a["weight_v"].grad.abs().sum() == 0
    ref = reference.directional_conv2d(a["x"].detach(), a["weight_h"].detach(), a["bias_h"].detach(),
                                       a["dilation_h"], None, a["shift_h"].detach())
    assert_close(y_h, ref)


# ---- gradcheck ------------------------------------------------------------------------------------

GRADCHECK = [pytest.param("cpu", "cpu", False, id="cpu"),
             pytest.param("triton", "cpu", True, id="triton-interpreter", marks=needs_triton_cpu)]


@pytest.mark.parametrize("backend,device,fast", GRADCHECK)
@pytest.mark.parametrize("kernel,dilation,shape", [((3, 3), (1, 2), (1, 2, 3, 4)),
                                                   ((1, 3), (1, 3), (2, 2, 1, 5)),
                                                   ((5, 1), (2, 1), (1, 1, 4, 2))])
def test_gradcheck(backend, device, fast, kernel, dilation, shape):
    N, C, H, W = shape
    ts = make(N=N, C_in=C, C_out=2, H=H, W=W, kernel=kernel, device=device)
    ts[3].data[0] = 0.7  # keep the zero-scale channel out: the check wants a non-trivial Jacobian

    def f(*a):
        return armnet_ops.directional_conv2d(a[0], a[1], a[2], dilation, scale=a[3], shift=a[4],
                                             activation="relu", backend=backend)
    assert torch.autograd.gradcheck(f, tuple(ts), fast_mode=fast)


@pytest.mark.parametrize("backend,device,fast", GRADCHECK)
def test_gradcheck_pair(backend, device, fast):
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    p = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)  # noqa: E731

    def f(x, wh, wv, bh, sv, tv):
        return armnet_ops.directional_conv2d_pair(x, wh, wv, bh, None, (1, 2), (3, 1), scale_v=sv,
                                                  shift_v=tv, activation="relu", backend=backend)
    assert torch.autograd.gradcheck(f, (x, p(2, 2, 1, 3), p(2, 2, 3, 1), p(2), p(2), p(2)),
                                    fast_mode=fast)


# ---- opcheck --------------------------------------------------------------------------------------

OPS = [pytest.param("", "cpu", id="cpp-cpu"),
       pytest.param("_triton", "cpu", id="triton-interpreter", marks=needs_triton_cpu),
       pytest.param("", "cuda", id="cpp-cuda", marks=needs_cuda),
       pytest.param("_triton", "cuda", id="triton-cuda", marks=[needs_cuda, needs_triton])]


def _ops(suffix):
    if suffix:
        import armnet_ops.triton.directional_conv  # noqa: F401  registers the twins
    return (getattr(torch.ops.armnet_ops, f"directional_conv2d_forward{suffix}"),
            getattr(torch.ops.armnet_ops, f"directional_conv2d_backward{suffix}"),
            getattr(torch.ops.armnet_ops, f"directional_conv2d_pair_forward{suffix}"),
            getattr(torch.ops.armnet_ops, f"directional_conv2d_pair_backward{suffix}"))


@pytest.mark.parametrize("suffix,device", OPS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(suffix, device, channels_last):
    fwd, bwd, pfwd, pbwd = _ops(suffix)
    x, w, b, s, t = make(N=1, C_in=2, C_out=3, H=3, W=4, device=device, channels_last=channels_last)
    opcheck(fwd, (x, w, b, [1, 2], s, t, True))
    opcheck(fwd, (x, w, None, [2, 1], None, None, False))
    y = fwd(x, w, b, [1, 2], s, t, True).detach()
    g = torch.randn_like(y)
    opcheck(bwd, (g, x.detach(), w.detach(), b.detach(), y, [1, 2], s.detach(), t.detach(), True))
    a = _pair_args(device, channels_last=channels_last)
    pargs = (a["x"], a["weight_h"], a["weight_v"], a["bias_h"], a["bias_v"], list(a["dilation_h"]),
             list(a["dilation_v"]), a["scale_h"], a["shift_h"], a["scale_v"], a["shift_v"], True)
    opcheck(pfwd, pargs)
    y_h, y_v = (o.detach() for o in pfwd(*pargs))
    d = [v.detach() if torch.is_tensor(v) else v for v in pargs]
    opcheck(pbwd, (torch.randn_like(y_h), torch.randn_like(y_v), *d[:5], y_h, y_v, *d[5:]))


# ---- module ---------------------------------------------------------------------------------------

def _conv_bn_relu(m):
    """The unfused block DirectionalConv2d stands for, with m's parameters."""
    kh, kw = m.weight.shape[2:]
    dh, dw = m.dilation
    conv = torch.nn.Conv2d(m.weight.shape[1], m.weight.shape[0], (kh, kw), padding=(dh * (kh - 1) // 2,
                           dw * (kw - 1) // 2), dilation=(dh, dw), bias=m.bias is not None).double()
    bn = torch.nn.BatchNorm2d(m.weight.shape[0]).double()
    with torch.no_grad():
        conv.weight.copy_(m.weight)
        if m.bias is not None:
            conv.bias.copy_(m.bias)
    bn.load_state_dict(m.bn.state_dict())
    return torch.nn.Sequential(conv, bn, torch.nn.ReLU())


def _randomize_bn(m):
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
        m.bn.weight.uniform_(-1, 1)
        m.bn.bias.uniform_(-1, 1)
        if m.bias is not None:
            m.bias.uniform_(-1, 1)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_module_folds_bn_in_eval(backend, device):
    m = DirectionalConv2d(3, 4, kernel_size=(1, 3), dilation=(1, 3), bn=True, activation="relu",
                          backend=backend).double().to(device).eval()
    _randomize_bn(m)
    ref = _conv_bn_relu(m).to(device).eval()
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64, device=device)
    assert_close(m(x), ref(x), what="eval, folded BN")
    # gradients through the folded BN reach the BN's affine parameters too
    m(x).square().sum().backward()
    ref(x).square().sum().backward()
    assert_close(m.weight.grad, ref[0].weight.grad, what="grad weight")
    assert_close(m.bn.weight.grad, ref[1].weight.grad, what="grad bn.weight")
    assert_close(m.bn.bias.grad, ref[1].bias.grad, what="grad bn.bias")


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_module_training_mode(backend, device):
    m = DirectionalConv2d(3, 4, kernel_size=3, dilation=(2, 1), bn=True, activation="relu",
                          backend=backend).double().to(device).train()
    _randomize_bn(m)
    ref = _conv_bn_relu(m).to(device).train()
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, device=device)
    assert_close(m(x), ref(x), what="train")
    assert_close(m.bn.running_mean, ref[1].running_mean, what="running_mean")
    assert_close(m.bn.running_var, ref[1].running_var, what="running_var")
    m(x).sum().backward()
    ref(x).sum().backward()
    assert_close(m.weight.grad, ref[0].weight.grad, what="grad weight")


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_pair_module(backend, device):
    pair = DirectionalConv2dPair(3, 4, kernel_size=3, rate=2, bias=False, bn=True,
                                 activation="relu", backend=backend).double().to(device)
    _randomize_bn(pair.horizontal)
    _randomize_bn(pair.vertical)
    assert pair.horizontal.dilation == (1, 2) and pair.vertical.dilation == (2, 1)
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64, device=device)
    for mode in ("eval", "train"):
        getattr(pair, mode)()
        ref_h = _conv_bn_relu(pair.horizontal).to(device)
        ref_v = _conv_bn_relu(pair.vertical).to(device)
        getattr(ref_h, mode)()
        getattr(ref_v, mode)()
        y_h, y_v = pair(x)
        assert_close(y_h, ref_h(x), what=f"{mode} horizontal")
        assert_close(y_v, ref_v(x), what=f"{mode} vertical")


def test_module_without_bn():
    m = DirectionalConv2d(3, 2, kernel_size=(3, 1), dilation=(6, 1), bias=False).double()
    assert m.bias is None
    x = torch.randn(1, 3, 8, 3, dtype=torch.float64)
    assert_close(m(x), F.conv2d(x, m.weight, None, padding=(6, 0), dilation=(6, 1)))
    assert "dilation=(6, 1)" in repr(m)


# ---- torch.compile, autocast, determinism ---------------------------------------------------------

@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_compile_module(backend, device):
    torch._dynamo.reset()
    m = DirectionalConv2d(2, 3, kernel_size=3, dilation=(1, 2), bn=True, activation="relu",
                          backend=backend).double().to(device).eval()
    _randomize_bn(m)
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, device=device, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    assert_close(y, _conv_bn_relu(m).to(device).eval()(x))
    (gx,) = torch.autograd.grad(y.sum(), x)
    (gx_ref,) = torch.autograd.grad(m(x).sum(), x)
    assert_close(gx, gx_ref)

    def pair(x, wh, wv):
        return armnet_ops.directional_conv2d_pair(x, wh, wv, None, None, (1, 3), (3, 1),
                                                  activation="relu", backend=backend)
    wh = torch.randn(2, 2, 1, 3, dtype=torch.float64, device=device)
    wv = torch.randn(2, 2, 3, 1, dtype=torch.float64, device=device)
    for o, r in zip(torch.compile(pair, fullgraph=True, backend="aot_eager")(x, wh, wv),
                    pair(x, wh, wv)):
        assert_close(o, r)


@pytest.mark.parametrize("backend,device", [pytest.param("cpu", "cpu", id="cpu"),
                                            pytest.param("cuda", "cuda", id="cuda", marks=needs_cuda)])
def test_compile_inductor(backend, device):
    """The default compiler too (slower to build than aot_eager: one case)."""
    torch._dynamo.reset()
    m = DirectionalConv2d(2, 3, kernel_size=(1, 3), dilation=(1, 2), bn=True, activation="relu",
                          backend=backend).to(device).eval()
    _randomize_bn(m)
    x = torch.randn(1, 2, 5, 4, device=device, requires_grad=True)
    y = torch.compile(m, fullgraph=True)(x)
    assert_close(y, m(x).double())
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


AUTOCAST = [pytest.param("auto", "cpu", torch.bfloat16, id="cpu-auto-bf16"),
            pytest.param("triton", "cpu", torch.bfloat16, id="triton-interpreter-bf16",
                         marks=needs_triton_cpu),
            pytest.param("triton", "cpu", torch.float16, id="triton-interpreter-fp16",
                         marks=needs_triton_cpu),
            pytest.param("cuda", "cuda", torch.float16, id="cuda-fp16", marks=needs_cuda),
            pytest.param("cuda", "cuda", torch.bfloat16, id="cuda-bf16", marks=needs_cuda),
            pytest.param("triton", "cuda", torch.bfloat16, id="triton-cuda-bf16",
                         marks=[needs_cuda, needs_triton]),
            pytest.param("triton", "cuda", torch.float16, id="triton-cuda-fp16",
                         marks=[needs_cuda, needs_triton])]


@pytest.mark.parametrize("backend,device,dtype", AUTOCAST)
def test_autocast(backend, device, dtype):
    x, w, b, s, t = make(N=2, C_in=8, C_out=8, H=6, W=7, dtype=torch.float32, device=device,
                         channels_last=True)
    with torch.autocast(device, dtype=dtype):
        y = armnet_ops.directional_conv2d(x, w, b, (1, 2), scale=s, shift=t, activation="relu",
                                          backend=backend)
    assert y.dtype == dtype
    args64 = [v.detach().double() for v in (x, w, b)]
    y64 = reference.directional_conv2d(*args64, (1, 2), s.detach().double(), t.detach().double(), "relu")
    lowp = [v.detach().to(dtype) for v in (x, w, b, s, t)]
    y_lowp = reference.directional_conv2d(*lowp[:3], (1, 2), *lowp[3:], "relu")
    assert_close(y, y64, y_lowp)
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    gw64 = torch.autograd.grad(reference.directional_conv2d(
        args64[0], args64[1].requires_grad_(), args64[2], (1, 2), s.detach().double(),
        t.detach().double(), "relu").sum(), args64[1])[0]
    assert (w.grad.double() - gw64).abs().max() <= 0.05 * gw64.abs().max()


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_backward_deterministic(backend, device):
    # The cuda backend's weight gradient is cuDNN's (at::convolution_backward): deterministic
    # when torch.backends.cudnn.deterministic asks for it, as for F.conv2d. The others always are.
    flags = (torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True,
                                        allow_tf32=False)
             if backend == "cuda" else contextlib.nullcontext())
    ts = make(N=2, C_in=5, C_out=6, H=9, W=8, device=device, dtype=torch.float32)
    runs = []
    with flags:
        for _ in range(2):
            y = armnet_ops.directional_conv2d(*ts[:3], (3, 1), scale=ts[3], shift=ts[4],
                                              activation="relu", backend=backend)
            runs.append(torch.autograd.grad(y, ts, torch.ones_like(y)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---- GPU low precision ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [pytest.param("cuda", marks=needs_cuda),
                                     pytest.param("triton", marks=[needs_cuda, needs_triton])])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel,dilation,channels_last", [((3, 3), (1, 1), True),
                                                           ((1, 3), (1, 6), True),
                                                           ((3, 1), (3, 1), False),
                                                           ((5, 5), (6, 6), True)])
@pytest.mark.parametrize("C_in,C_out", [(72, 40), (13, 11)])
def test_cuda_low_precision(backend, dtype, kernel, dilation, channels_last, C_in, C_out):
    # 72 -> 40: the 16-byte vector loads of the CUDA kernel, full and ragged tensor-core tiles;
    # 13 -> 11: the scalar loads.
    x, w, b, s, t = make(N=2, C_in=C_in, C_out=C_out, H=19, W=23, kernel=kernel, dtype=torch.float64,
                         device="cuda", channels_last=channels_last, requires_grad=False)
    args64 = (x, w, b, s, t)
    lowp = [v.to(dtype) for v in args64]
    if channels_last:
        lowp[0] = lowp[0].contiguous(memory_format=torch.channels_last)
    y = armnet_ops.directional_conv2d(*lowp[:3], dilation, scale=lowp[3], shift=lowp[4],
                                      activation="relu", backend=backend)
    y64 = reference.directional_conv2d(*args64[:3], dilation, *args64[3:], "relu")
    y_lowp = reference.directional_conv2d(*lowp[:3], dilation, *lowp[3:], "relu")
    assert_close(y, y64, y_lowp)


# ---- NaN, weight gradient, autotuning, dispatch (issue 14) ----------------------------------------

@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("pair", [False, True], ids=["single", "pair"])
def test_relu_keeps_nan(backend, device, pair):
    """torch.relu keeps NaN, so the fused epilogue must (`x > 0 ? x : 0` and fmax(x, 0) give 0)."""
    x, w, b, s, t = make(N=1, C_in=3, C_out=4, H=5, W=6, kernel=(1, 3), dtype=torch.float32,
                         device=device, requires_grad=False)
    b[1] = float("nan")        # a whole output channel
    x[0, 2, 3, 4] = float("nan")  # one input pixel: the outputs it reaches
    if pair:
        got = armnet_ops.directional_conv2d_pair(x, w, w, b, b, (1, 2), (1, 2), scale_h=s,
                                                 shift_h=t, scale_v=s, shift_v=t,
                                                 activation="relu", backend=backend)
    else:
        got = (armnet_ops.directional_conv2d(x, w, b, (1, 2), scale=s, shift=t,
                                             activation="relu", backend=backend),)
    ref = reference.directional_conv2d(x.double(), w.double(), b.double(), (1, 2), s.double(),
                                       t.double(), "relu")
    assert ref.isnan().any() and not ref.isnan().all()
    for y in got:
        assert torch.equal(y.isnan(), ref.isnan()), "NaN positions differ from torch.relu's"
        keep = ~ref.isnan()
        assert_close(y[keep], ref[keep], what="finite outputs")


def _conv_shapes(prof):
    """(op name, input shapes) of every convolution ATen ran under the profiler."""
    return [(e.name, e.input_shapes) for e in prof.events()
            if e.name in ("aten::_convolution", "aten::convolution", "aten::convolution_backward")]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_weight_grad_is_a_weight_gradient_algorithm(device):
    """The C++ backends' backward (csrc/cpu/directional_conv.cpp, shared by CPU and CUDA) takes the
    weight gradient from at::convolution_backward, never from a forward convolution whose
    "filter" is the H × W output gradient (cuDNN can be very slow on that). On the CPU this
    checks the shared code; the CUDA case is the one the old code failed."""
    backend = "cpu" if device == "cpu" else "cuda"
    x, w, b, s, t = make(N=2, C_in=4, C_out=5, H=11, W=13, kernel=(1, 3), dtype=torch.float32,
                         device=device)
    y = armnet_ops.directional_conv2d(x, w, b, (1, 2), scale=s, shift=t, activation="relu",
                                      backend=backend)
    with torch.profiler.profile(record_shapes=True) as prof:
        torch.autograd.grad(y, (x, w), torch.randn_like(y))
    convs = _conv_shapes(prof)
    assert any(name == "aten::convolution_backward" for name, _ in convs), convs
    for name, shapes in convs:  # a forward convolution's filter is its second input
        if name != "aten::convolution_backward":
            assert shapes[1][2:] != [11, 13], f"an H×W filter: {name} {shapes}"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_weight_grad_parity_at_scale(device):
    """The weight gradient on a shape with many pixels per weight (the reduction the old CUDA
    formulation ran as an H×W-filter conv), against the fp64 reference, every epilogue term."""
    backend = "cpu" if device == "cpu" else "cuda"
    check_parity(backend, *make(N=2, C_in=16, C_out=24, H=33, W=47, kernel=(3, 1),
                                dtype=torch.float32, device=device), (6, 1), "relu")


@needs_triton
def test_triton_autotune_keys_hold_the_spatial_sizes():
    from armnet_ops.triton import directional_conv as tdc
    for kernel in (tdc._dconv_fwd_kernel, tdc._dconv_dgrad_kernel, tdc._dconv_wgrad_kernel):
        assert {"M", "H", "W"} <= set(kernel.keys), kernel.keys
        assert kernel.early_config_prune is not None


def _cfg(m, n, k, stages=3, names=("BLOCK_M", "BLOCK_N", "BLOCK_K")):
    import triton
    return triton.Config(dict(zip(names, (m, n, k))), num_warps=4, num_stages=stages)


@needs_triton
def test_triton_prune_drops_impossible_and_padded_configs():
    from armnet_ops.triton.directional_conv import _GEMM_OPERANDS, fit_configs
    big, mid, small = _cfg(128, 128, 64), _cfg(128, 64, 32, 4), _cfg(64, 64, 32, 4)
    configs = [big, mid, small]
    sm90 = 227 * 1024
    sizes = {"BLOCK_M": 10**6, "BLOCK_N": 256, "BLOCK_K": 256}
    # fp64: 3 stages × (128·64 + 64·128) × 8 bytes = 384 KiB > 227 KiB; the 128 × 64 × 32 one
    # with 4 stages needs 4 × (128·32 + 32·64) × 8 = 192 KiB
    assert fit_configs(configs, sizes, _GEMM_OPERANDS, 8, sm90) == [mid, small]
    # fp16: everything fits
    assert fit_configs(configs, sizes, _GEMM_OPERANDS, 2, sm90) == configs
    # 24 output channels: a 128- or 64-wide N tile would be mostly padding; 64 is the smallest
    # there is, so it is kept
    assert fit_configs(configs, {**sizes, "BLOCK_N": 24}, _GEMM_OPERANDS, 2, sm90) == [small]
    # a 40-pixel problem: no 128-row tile
    assert fit_configs(configs, {**sizes, "BLOCK_M": 40}, _GEMM_OPERANDS, 2, sm90) == [small]
    # nothing fits: the one with the least shared memory is left (the compiler names the problem)
    assert fit_configs(configs, sizes, _GEMM_OPERANDS, 8, 1024) == [small]


@needs_triton
def test_triton_capture_config_heuristic():
    from armnet_ops.triton.directional_conv import capture_config
    big, mid, small = _cfg(128, 128, 64), _cfg(128, 64, 32, 4), _cfg(64, 64, 32, 4)

    def programs(pixels, channels):
        return lambda c: -(-pixels // c.kwargs["BLOCK_M"]) * -(-channels // c.kwargs["BLOCK_N"])

    # a large problem: the largest tile already gives 132 SMs two programs each
    assert capture_config([small, big, mid], programs(512 * 512, 256), 132) is big
    # 128 × 64 tiles give 2·132 programs, 128 × 128 do not
    assert capture_config([small, big, mid], programs(128 * 132, 128), 132) is mid
    # a tiny one: the smallest tile
    assert capture_config([big, mid, small], programs(64, 16), 132) is small


@needs_triton_cpu
def test_triton_never_autotunes_inside_graph_capture(monkeypatch):
    """Inside CUDA-graph capture the kernels launch directly with a chosen configuration (the
    autotuner's benchmark would synchronize the capturing stream). The capture flag is forced
    here, on the interpreter; the results must still be right."""
    from armnet_ops.triton import directional_conv as tdc
    monkeypatch.setattr(tdc, "_capturing", lambda device: True)
    monkeypatch.setattr(tdc, "_TUNED", {})

    def no_autotune(*args, **kwargs):
        raise AssertionError("the autotuner ran inside graph capture")

    for kernel in (tdc._dconv_fwd_kernel, tdc._dconv_dgrad_kernel, tdc._dconv_wgrad_kernel):
        monkeypatch.setattr(kernel, "run", no_autotune)
    check_parity("triton", *make(N=1, C_in=3, C_out=5, H=6, W=7, kernel=(3, 1),
                                 dtype=torch.float32), (2, 1), "relu")
    a = _pair_args()
    y_h, y_v = armnet_ops.directional_conv2d_pair(**a, activation="relu", backend="triton")
    assert torch.isfinite(y_h).all() and torch.isfinite(y_v).all()


@needs_triton_cpu
def test_triton_autotuned_pick_is_reused_inside_capture(monkeypatch):
    """Outside capture the autotuner's pick is remembered per key; a capture of the same shape
    launches that configuration."""
    from armnet_ops.triton import directional_conv as tdc
    monkeypatch.setattr(tdc, "_TUNED", {})
    x, w = make(N=1, C_in=3, C_out=4, H=5, W=6, dtype=torch.float32, requires_grad=False)[:2]
    armnet_ops.directional_conv2d(x, w, backend="triton")
    assert len(tdc._TUNED) == 1
    (key, tuned), = tdc._TUNED.items()
    launched = []
    monkeypatch.setattr(tdc, "_capturing", lambda device: True)
    monkeypatch.setattr(tdc, "capture_config", lambda *a: pytest.fail("heuristic used"))
    real_fn = tdc._dconv_fwd_kernel.fn

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(kwargs["BLOCK_M"])
                return real_fn[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(tdc._dconv_fwd_kernel, "fn", Spy())
    y = armnet_ops.directional_conv2d(x, w, backend="triton")
    assert launched == [tuned.kwargs["BLOCK_M"]]
    assert_close(y, reference.directional_conv2d(x.double(), w.double()))


def test_auto_on_cuda_fp32_takes_cudnn():
    """"auto" for fp32 directional conv on CUDA tensors is the reference backend (cuDNN): no
    hand-written kernel has been measured faster (see armnet_ops/directional_conv.py). No GPU is
    needed: the choice is made from the device type."""
    from armnet_ops import _backend
    from armnet_ops.directional_conv import PAIR_SPEC, SPEC
    for spec in (SPEC, PAIR_SPEC):
        assert _backend.resolve(spec, "auto", torch.device("cuda"), torch.float32) == "reference"
        assert _backend.select(spec.name, "auto", "cuda", torch.float32) == "reference"
        for dtype in (torch.float16, torch.bfloat16):
            got = _backend.resolve(spec, "auto", torch.device("cuda"), dtype)
            kernels = [b for b in spec.gpu_order
                       if _backend.availability(spec, b, torch.device("cuda"))[0]]
            assert got == (kernels[0] if kernels else "reference")
        # CPU tensors: unchanged, the C++ CPU kernel
        assert _backend.resolve(spec, "auto", torch.device("cpu"), torch.float32) == "cpu"


# ---- bad input ------------------------------------------------------------------------------------

def _bad(**over):
    x, w, b, s, t = make(requires_grad=False)
    kw = dict(x=x, weight=w, bias=b, dilation=(1, 2), scale=s, shift=t, activation=None)
    kw.update(over)
    return kw


@pytest.mark.parametrize("over,exc,words", [
    (dict(weight=torch.randn(4, 3, 2, 3, dtype=torch.float64)), ValueError, ["kernel height", "odd", "2"]),
    (dict(weight=torch.randn(4, 3, 3, 4, dtype=torch.float64)), ValueError, ["kernel width", "odd", "4"]),
    (dict(dilation=(1, 1.5)), TypeError, ["dilation[1]", "1.5"]),
    (dict(dilation=(0, 1)), ValueError, ["dilation[0]", ">= 1", "0"]),
    (dict(dilation=(1, 2, 3)), TypeError, ["dilation"]),
    (dict(weight=torch.randn(4, 5, 3, 3, dtype=torch.float64)), ValueError, ["weight", "in_channels", "3", "5"]),
    (dict(x=torch.randn(3, 7, 9, dtype=torch.float64)), ValueError, ["'x'", "4-D", "3-D"]),
    (dict(weight=torch.randn(4, 3, 3, dtype=torch.float64)), ValueError, ["'weight'", "4-D"]),
    (dict(bias=torch.randn(5, dtype=torch.float64)), ValueError, ["bias", "out_channels", "4", "5"]),
    (dict(scale=torch.randn(4, 1, dtype=torch.float64)), ValueError, ["scale", "1-D"]),
    (dict(weight=torch.randn(4, 3, 3, 3)), ValueError, ["weight", "float64", "float32"]),
    (dict(shift=torch.randn(4)), ValueError, ["shift", "float64", "float32"]),
    (dict(activation="gelu"), ValueError, ["activation", "relu", "gelu"]),
])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bad_input(over, exc, words, backend):
    kw = _bad(**over)
    with pytest.raises(exc) as info:
        armnet_ops.directional_conv2d(kw.pop("x"), kw.pop("weight"), kw.pop("bias"), kw.pop("dilation"),
                                      backend=backend, **kw)
    msg = str(info.value)
    assert "directional_conv2d" in msg
    for word in words:
        assert word in msg, f"{word!r} not in {msg!r}"


def test_bad_input_pair_and_module():
    a = _pair_args()
    with pytest.raises(ValueError, match="weight_v.*in_channels"):
        armnet_ops.directional_conv2d_pair(**{**a, "weight_v": torch.randn(5, 2, 3, 1, dtype=torch.float64)})
    with pytest.raises(ValueError, match="weight_h.*odd"):
        armnet_ops.directional_conv2d_pair(**{**a, "weight_h": torch.randn(5, 3, 1, 2, dtype=torch.float64)})
    with pytest.raises(ValueError, match="scale_v.*out_channels"):
        armnet_ops.directional_conv2d_pair(**{**a, "scale_v": torch.randn(4, dtype=torch.float64)})
    with pytest.raises(TypeError, match="dilation_v"):
        armnet_ops.directional_conv2d_pair(**{**a, "dilation_v": (2.0, 1)})
    with pytest.raises(ValueError, match="activation"):
        DirectionalConv2d(3, 4, activation="tanh")
    with pytest.raises(ValueError, match="backend"):
        armnet_ops.directional_conv2d(*make()[:2], backend="cudnn")


def test_bad_input_direct_cpp_call():
    """The C++ glue checks on its own, for callers that skip the Python checks."""
    x, w, b, s, t = make(requires_grad=False)
    fwd = torch.ops.armnet_ops.directional_conv2d_forward
    with pytest.raises(RuntimeError, match="odd"):
        fwd(x, torch.randn(4, 3, 2, 3, dtype=x.dtype), None, [1, 1], None, None, False)
    with pytest.raises(RuntimeError, match="dilation"):
        fwd(x, w, None, [0, 1], None, None, False)
    with pytest.raises(RuntimeError, match="in_channels"):
        fwd(x, torch.randn(4, 2, 3, 3, dtype=x.dtype), None, [1, 1], None, None, False)
    with pytest.raises(RuntimeError, match="scale"):
        fwd(x, w, None, [1, 1], torch.randn(5, dtype=x.dtype), None, False)
    with pytest.raises(RuntimeError, match="dtype"):
        fwd(x, w.float(), None, [1, 1], None, None, False)


def test_backend_selection():
    x, w = make(requires_grad=False)[:2]
    assert "cpu" in armnet_ops.available_backends("directional_conv2d")
    assert "cpu" in armnet_ops.available_backends("directional_conv2d_pair")
    # CPU tensors never run the CUDA kernels, and fp16 is not a CPU-kernel dtype: both say so.
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        armnet_ops.directional_conv2d(x, w, backend="cuda")
    with pytest.raises(TypeError, match="dtypes"):
        armnet_ops.directional_conv2d(x.half(), w.half(), backend="cpu")

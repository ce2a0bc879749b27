"""The Triton criss-cross attention kernels (armnet_ops/triton/cca.py) beyond the public-API
matrix of test_cca.py: awkward line lengths, several tiles per line, channel counts that are not
a multiple of the chunk, channels_last and strided inputs, the residual form, the two-op API,
gradients against the fp64 reference (under the interpreter without a GPU); the sm_90 build of
the hot kernels (tensor cores, no spills), and the traffic model."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import armnet_ops
from armnet_ops import reference
from numerics import assert_close, needs_cuda, needs_triton, needs_triton_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (N, Cqk, Cv, H, W): odd sizes, single rows and columns, Cv past one 64-channel chunk and not a
# multiple of it, N = 0.
SHAPES = [(1, 3, 5, 5, 7), (1, 2, 4, 1, 9), (1, 2, 4, 9, 1), (2, 4, 70, 17, 13), (0, 3, 5, 4, 6)]


def _inputs(shape, dtype, layout="nchw"):
    N, D, CV, H, W = shape
    q, k = torch.randn(N, D, H, W, dtype=dtype), torch.randn(N, D, H, W, dtype=dtype)
    v = torch.randn(N, CV, H, W, dtype=dtype)
    if layout == "channels_last":
        q, k, v = (t.contiguous(memory_format=torch.channels_last) for t in (q, k, v))
    elif layout == "strided":   # every other column of a wider tensor
        q, k, v = (torch.cat([t, t], 3)[..., ::2] for t in (q, k, v))
    return [t.requires_grad_() for t in (q, k, v)]


def _check_fused(shape, dtype, layout="nchw", scale=0.7):
    q, k, v = _inputs(shape, dtype, layout)
    out = armnet_ops.criss_cross_attention(q, k, v, scale=scale, backend="triton")
    assert out.is_contiguous() and out.dtype == dtype
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference.criss_cross_attention(*leaves, scale)
    assert_close(out, ref, what=f"out {shape}")
    grad = torch.randn_like(ref)
    if layout == "channels_last":   # used in place by the backward, not copied to NHWC
        grad = grad.contiguous(memory_format=torch.channels_last)
    got = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
    want = torch.autograd.grad(ref, leaves, grad)
    for name, g, r in zip("qkv", got, want):
        assert g.is_contiguous(), f"d{name} is not contiguous"
        assert_close(g, r, what=f"d{name} {shape}")


@needs_triton_cpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_parity_fp64(shape):
    _check_fused(shape, torch.float64)


@needs_triton_cpu
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_fused_parity_fp32_layouts(layout):
    _check_fused((2, 4, 20, 6, 11), torch.float32, layout)


@needs_triton_cpu
def test_fused_several_tiles_per_line(monkeypatch):
    # 16-pixel tiles: lines of 33 and 19 take three and two tiles, the last ones partly masked.
    import armnet_ops.triton.cca as tcca
    monkeypatch.setattr(tcca, "MAX_TILE", 16)
    assert tcca._tiles(33, torch.float64) == (16, 64)
    _check_fused((1, 3, 20, 19, 33), torch.float64)


@needs_triton_cpu
def test_residual_parity_and_grads():
    q, k, v = _inputs((1, 3, 6, 7, 5), torch.float64)
    x = torch.randn(1, 6, 7, 5, dtype=torch.float64, requires_grad=True)
    gamma = torch.tensor([0.6], dtype=torch.float64, requires_grad=True)
    y = armnet_ops.criss_cross_attention(q, k, v, scale=0.5, backend="triton", gamma=gamma,
                                         residual=x)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, x, gamma)]
    ref = leaves[4] * reference.criss_cross_attention(*leaves[:3], 0.5) + leaves[3]
    assert_close(y, ref, what="y")
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(y, (q, k, v, x, gamma), grad)
    want = torch.autograd.grad(ref, leaves, grad)
    for name, g, r in zip(("q", "k", "v", "residual", "gamma"), got, want):
        assert_close(g, r, what=f"d{name}")


@needs_triton_cpu
def test_gradcheck_fp64():
    q, k, v = _inputs((1, 2, 3, 4, 5), torch.float64)
    assert torch.autograd.gradcheck(
        lambda q, k, v: armnet_ops.criss_cross_attention(q, k, v, scale=0.8, backend="triton"),
        (q, k, v), fast_mode=True)
    x = torch.randn(1, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    gamma = torch.tensor([-0.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, x, g: armnet_ops.criss_cross_attention(q, k, v, backend="triton",
                                                                gamma=g, residual=x),
        (q, k, v, x, gamma), fast_mode=True)


@needs_triton_cpu
@pytest.mark.parametrize("max_tile", [128, 16])
def test_two_op_parity_and_grads(monkeypatch, max_tile):
    import armnet_ops.triton.cca as tcca
    monkeypatch.setattr(tcca, "MAX_TILE", max_tile)
    q, k, v = _inputs((2, 3, 70, 17, 9), torch.float64, "channels_last")
    e = armnet_ops.cca_weight(q, k, backend="triton")
    e_ref = reference.cca_weight(q.detach(), k.detach())
    assert_close(e, e_ref, what="energy")
    attn = torch.softmax(e_ref, 1).requires_grad_()
    out = armnet_ops.cca_map(attn, v, backend="triton")
    assert out.is_contiguous()
    attn_ref, v_ref = attn.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    ref = reference.cca_map(attn_ref, v_ref)
    assert_close(out, ref, what="cca_map")
    g = torch.randn_like(ref)
    for got, want, name in zip(torch.autograd.grad(out, (attn, v), g),
                               torch.autograd.grad(ref, (attn_ref, v_ref), g), ("attn", "v")):
        assert_close(got, want, what=f"cca_map d{name}")
    ge = torch.randn_like(e_ref)
    qr, kr = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    for got, want, name in zip(torch.autograd.grad(e, (q, k), ge),
                               torch.autograd.grad(reference.cca_weight(qr, kr), (qr, kr), ge),
                               ("q", "k")):
        assert_close(got, want, what=f"cca_weight d{name}")


@needs_triton_cpu
def test_backward_deterministic():
    q, k, v = _inputs((1, 3, 20, 9, 10), torch.float32)
    out = armnet_ops.criss_cross_attention(q, k, v, backend="triton")
    g = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), g, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), g)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_device_guard_makes_the_tensors_gpu_current():
    # Every Triton launch of the three ops runs under device_guard(an input). Without a GPU the
    # guard is checked as built: it must name the tensor's device, not the current one.
    from armnet_ops.triton import device_guard

    class OnSecondGpu:
        device = torch.device("cuda", 1)

    guard = device_guard(OnSecondGpu())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with device_guard(torch.zeros(1)):  # a CPU tensor (the interpreter): nothing to switch
        pass


@pytest.mark.parametrize("module", ["carafe", "cca", "directional_conv"])
def test_every_triton_launch_is_under_device_guard(module):
    # Read from the source, so that a launch added without the guard fails here on any machine:
    # every `kernel[grid](...)` of a @triton.jit function and every `_launch(...)` (the
    # directional conv's launcher, whose own body is exempt) must sit in `with device_guard(...)`.
    import ast

    path = os.path.join(ROOT, "armnet_ops", "triton", module + ".py")
    tree = ast.parse(open(path).read())
    jitted = {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
              and any("jit" in ast.unparse(d) or "autotune" in ast.unparse(d)
                      for d in f.decorator_list)}
    assert jitted, "no @triton.jit kernel found"
    launches = []

    def visit(node, guarded, in_launcher):
        if isinstance(node, ast.With) and any(
                isinstance(i.context_expr, ast.Call)
                and ast.unparse(i.context_expr.func) == "device_guard" for i in node.items):
            guarded = True
        if isinstance(node, ast.FunctionDef) and node.name == "_launch":
            in_launcher = True
        if isinstance(node, ast.Call) and not in_launcher:
            f = node.func
            kernel = isinstance(f, ast.Subscript) and ast.unparse(f.value) in jitted
            if kernel or (isinstance(f, ast.Name) and f.id == "_launch"):
                launches.append((node.lineno, guarded))
        for child in ast.iter_child_nodes(node):
            visit(child, guarded, in_launcher)

    visit(tree, False, False)
    assert launches, "no launch found"
    assert [ln for ln, ok in launches if not ok] == []


@needs_cuda
@needs_triton
def test_launch_on_a_non_current_device():
    # The launches run under torch.cuda.device(q.device): tensors on cuda:1 with cuda:0 current.
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    q, k, v = (t.detach().to("cuda:1") for t in _inputs((1, 4, 16, 9, 7), torch.float32))
    out = armnet_ops.criss_cross_attention(q, k, v, backend="triton")
    assert out.device == q.device
    ref = reference.criss_cross_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), 1.0)
    assert_close(out.cpu(), ref)


# ---- 16-bit partials: the second rounding -------------------------------------------------------
#
# In fp16/bf16 the column pass stores its output O_c (normalised by its own lse_c) in the input
# dtype; the row pass adds exp(lse_c - lse)·O_c in float32 and rounds the sum once more. Error
# model of one output element against the exact result, u the unit roundoff of the dtype (2^-11
# fp16, 2^-8 bf16: half the gap between 1 and the next number), P_s the exact weights over the
# H+W-1 keys:
#   the weights, rounded to the input dtype before the products:  <= u·A,    A = sum_s P_s |v_s|
#   the partial, rounded:  exp(lse_c - lse)·u·|O_c|                <= u·A_c,  A_c the same sum over
#     the column keys (their weights are O_c's weights times exp(lse_c - lse))
#   the result, rounded:                                           <= u·(|exact| + the above)
#   float32 energies (16-bit products are exact in float32, D-term sums), lse, exp and the
#   L-term sums: a relative error of the weights and sums of at most
#   eps32 = 2^-24·(2·(D + 2)·S + 3·L + 32), S the largest scale·sum_d |q_d k_d|, times A;
#   fp16 subnormals (weights below 2^-14): at most 2^-25 absolute per rounding.
# Without the 16-bit partial the A_c term is absent: the second rounding costs at most u·A_c.
# The Triton interpreter runs fp16 faithfully (numpy float16, round-to-nearest casts, float32
# products), so the fp16 test runs the kernels. It does not run bf16: it truncates float32 ->
# bf16 casts (round toward zero) and its tl.dot multiplies the raw uint16 bit patterns of bf16
# operands (Triton 3.8). The bf16 test therefore checks the kernels' arithmetic transcribed in
# torch (`_kernel_arithmetic`), which the fp16 test checks against the interpreted kernels.

def _weights64(q, k, scale):
    """Exact (float64) weights of the row keys (N, H, W, W) and of the column keys (N, H, W, H,
    zero on the pixel itself), and the energies' magnitude S."""
    q, k = q.double(), k.double()
    H = q.shape[2]
    e_row = torch.einsum("nchw,nchg->nhwg", q, k) * scale
    e_col = torch.einsum("nchw,ncgw->nhwg", q, k) * scale
    e_col = e_col.masked_fill(torch.eye(H, dtype=torch.bool)[None, :, None, :], float("-inf"))
    w = torch.softmax(torch.cat([e_row, e_col], -1), -1)
    mag = max(torch.einsum("nchw,nchg->nhwg", q.abs(), k.abs()).max().item(),
              torch.einsum("nchw,ncgw->nhwg", q.abs(), k.abs()).max().item()) * abs(scale)
    return w[..., :q.shape[3]], w[..., q.shape[3]:], mag


def _key_sums(w_row, w_col, x):
    """(N, C, H, W): sum over the row keys and over the column keys of w times x."""
    return (torch.einsum("nhwg,nchg->nchw", w_row, x), torch.einsum("nhwg,ncgw->nchw", w_col, x))


def _rounding_bound(q, k, v, scale):
    """(exact out, the elementwise bound of the error model above for out in v's dtype)."""
    w_row, w_col, mag = _weights64(q, k, scale)
    u = torch.finfo(v.dtype).eps / 2
    tiny = torch.finfo(v.dtype).smallest_normal * u      # half the subnormal spacing
    N, D, H, W = q.shape
    eps32 = 2.0 ** -24 * (2 * (D + 2) * mag + 3 * (H + W) + 32)
    a_row, a_col = _key_sums(w_row, w_col, v.double().abs())
    exact = sum(_key_sums(w_row, w_col, v.double()))
    ones_row, ones_col = (w_row > 0).double(), (w_col > 0).double()
    sum_abs = sum(_key_sums(ones_row, ones_col, v.double().abs()))
    a = a_row + a_col
    bound = (u * exact.abs() + (1 + u) * (u * (a + a_col) + eps32 * a)
             + tiny * (sum_abs + 2))
    return exact, bound


def _kernel_arithmetic(q, k, v, scale, partial_dtype):
    """The forward as _fwd_line computes it, in torch: float32 energies and softmax statistics,
    weights rounded to v's dtype, float32 products, the column output rounded to partial_dtype,
    merged in float32, rounded once to v's dtype."""
    w_row, w_col, _ = _weights64(q, k, scale)     # only for the masks' shapes
    H = q.shape[2]
    qf, kf, vf = q.float(), k.float(), v.float()
    e_row = torch.einsum("nchw,nchg->nhwg", qf, kf) * scale
    e_col = torch.einsum("nchw,ncgw->nhwg", qf, kf) * scale
    e_col = e_col.masked_fill(torch.eye(H, dtype=torch.bool)[None, :, None, :], float("-inf"))
    lse_c = torch.logsumexp(e_col, -1)
    p_col = torch.exp(e_col - lse_c[..., None]).to(v.dtype).float()
    o_c = torch.einsum("nhwg,ncgw->nchw", p_col, vf).to(partial_dtype).float()
    lse = torch.logaddexp(torch.logsumexp(e_row, -1), lse_c)
    p_row = torch.exp(e_row - lse[..., None]).to(v.dtype).float()
    out = torch.einsum("nhwg,nchg->nchw", p_row, vf) + torch.exp(lse_c - lse)[:, None] * o_c
    return out.to(v.dtype)


def _lowp_inputs(dtype, shape=(1, 16, 64, 24, 20)):
    torch.manual_seed(0)
    N, D, CV, H, W = shape
    return (torch.randn(N, D, H, W).to(dtype), torch.randn(N, D, H, W).to(dtype),
            torch.randn(N, CV, H, W).to(dtype))


def _max_err(x, exact):
    return (x.double() - exact).abs().max().item()


@needs_triton_cpu
def test_fp16_partial_error_bound_and_einsum():
    """The fp16 forward (interpreted kernels, fp16 partial) stays within the error model, and its
    error is no larger than the einsum formulation's in fp16 (reference.criss_cross_attention,
    mmcv's four einsums and one softmax, run in fp16 by torch on the CPU)."""
    scale = 0.5
    q, k, v = _lowp_inputs(torch.float16)
    out = armnet_ops.criss_cross_attention(q, k, v, scale=scale, backend="triton")
    exact, bound = _rounding_bound(q, k, v, scale)
    err = (out.double() - exact).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3e}"
    einsum = reference.criss_cross_attention(q, k, v, scale)
    assert einsum.dtype == torch.float16
    assert err.max().item() <= _max_err(einsum, exact)
    # The torch transcription of the kernels' arithmetic reproduces them: bit for bit except
    # where a float32 summation order flips a rounding (one ulp of a weight, of the partial or of
    # the result).
    model = _kernel_arithmetic(q, k, v, scale, torch.float16)
    assert (model == out).double().mean().item() >= 0.99
    w_row, w_col, _ = _weights64(q, k, scale)
    u = torch.finfo(torch.float16).eps / 2
    a = sum(_key_sums(w_row, w_col, v.double().abs()))
    assert ((model.double() - out.double()).abs() <= 2 * u * (out.double().abs() + 2 * a)
            + 2.0 ** -24).all()


def test_bf16_partial_error_bound_and_einsum():
    """bf16, through the transcription (the interpreter cannot run bf16, see above): within the
    error model with the bf16 partial, and no worse than the einsum formulation in bf16."""
    scale = 0.5
    q, k, v = _lowp_inputs(torch.bfloat16)
    exact, bound = _rounding_bound(q, k, v, scale)
    out = _kernel_arithmetic(q, k, v, scale, torch.bfloat16)
    err = (out.double() - exact).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3e}"
    einsum = reference.criss_cross_attention(q, k, v, scale)
    assert err.max().item() <= _max_err(einsum, exact)


@needs_triton_cpu
def test_fp16_backward_no_worse_than_einsum():
    """The backward's partials are fp16 too: dq, dk, dv (interpreted kernels) against the fp64
    gradients, no larger an error than autograd through the einsum formulation in fp16."""
    scale = 0.5
    inputs = _lowp_inputs(torch.float16)
    grad = torch.randn(1, 64, 24, 20).half()
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = armnet_ops.criss_cross_attention(*leaves, scale=scale, backend="triton")
    got = torch.autograd.grad(out, leaves, grad)
    exact_leaves = [t.double().requires_grad_() for t in inputs]
    want = torch.autograd.grad(reference.criss_cross_attention(*exact_leaves, scale),
                               exact_leaves, grad.double())
    ein_leaves = [t.clone().requires_grad_() for t in inputs]
    ein = torch.autograd.grad(reference.criss_cross_attention(*ein_leaves, scale), ein_leaves,
                              grad)
    for name, g, w, e in zip("qkv", got, want, ein):
        assert g.dtype == torch.float16
        assert _max_err(g, w) <= _max_err(e, w), f"d{name}"


# ---- the sm_90 build, without a GPU ------------------------------------------------------------

HOT_KERNELS = "_fwd_line,_bwd_query_line,_bwd_key_line"


def _aot_toolchain_missing() -> str | None:
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as err:
        return f"triton without AOT compilation: {err}"
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for tool in ("ptxas", "cuobjdump"):
        if not (os.path.exists(os.path.join(bin_dir, tool)) or shutil.which(tool)):
            return f"no {tool} in triton's nvidia backend"
    return None


@needs_triton
@pytest.mark.parametrize("shape,kernels", [
    ((2, 64, 512, 97, 97), HOT_KERNELS),
    # The forward's row pass at W = 256: the doubled 16-bit forward budget (BT = 128).
    ((1, 64, 512, 128, 256), "_fwd_line"),
], ids=["97x97", "128x256-forward"])
def test_sm90_build_uses_tensor_cores_without_spills(shape, kernels):
    """AOT-compiles the hot kernels (forward, dq, dk/dv; column and row pass) for sm_90 in bf16
    at the shape, from the launches the op makes, and reads the result. Protects:
    tensor-core products (wgmma or mma in the PTX, HGMMA/HMMA in the SASS), and registers that
    hold the tiles (no spill bytes from ptxas, no local loads or stores), which a change of tile
    sizes or of what a loop keeps live would break."""
    missing = _aot_toolchain_missing()
    if missing:
        pytest.skip(missing)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = os.path.join(ROOT, "build", "triton_aot_cache")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "triton_aot.py"),
                          *map(str, shape), "--only", kernels],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    reports = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    names = {r["kernel"] for r in reports}
    assert names == set(kernels.split(",")), names
    for r in reports:
        what = f"{r['kernel']} {r['constexprs']}"
        assert r["ptx_wgmma"] + r["ptx_mma"] > 0, f"{what}: no tensor-core instruction in the PTX"
        assert r["sass_hgmma"] + r["sass_hmma"] > 0, f"{what}: no HGMMA/HMMA in the SASS"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{what}: spills {r}"
        assert r["ptx_local"] == 0 and r["sass_local"] == 0, f"{what}: local memory {r}"


# ---- the traffic model -------------------------------------------------------------------------

def test_traffic_model():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from traffic_triton import cca_triton_traffic
    N, D, CV, H, W = 2, 64, 512, 97, 97
    P = N * H * W
    s, a = 2, 4   # bf16 elements and partials; float32 lse and D
    fwd = cca_triton_traffic(N, D, CV, H, W, 2, "forward")
    # Minimum: q, k, v read once, out (bf16) and lse (float32) written once.
    assert fwd["min_bytes"] == s * P * (2 * D + CV) + s * P * CV + a * P
    assert fwd["bytes"] == sum(fwd["parts"].values())
    cl = cca_triton_traffic(N, D, CV, H, W, 2, "forward", channels_last=True)
    # channels_last saves exactly the three transposes (a read and a write each).
    assert fwd["bytes"] - cl["bytes"] == 2 * s * P * (2 * D + CV)
    # One tile per line at L = 97, so each pass reads q, k and v once; the bf16 partial is
    # written by the column pass and read by the row pass; lse written, read, rewritten; out.
    assert cl["bytes"] == (2 * s * P * (2 * D + CV) + 2 * s * P * CV + 3 * a * P
                           + s * P * CV)
    assert cl["ratio"] <= 3, cl   # issue 17's goal for the forward
    # float32 keeps a float32 partial (no second rounding): one tile per line is 16 pixels at
    # L = 97 (the fp32 budget, 2048 elements over 128 keys), so k and v are read 7 times a pass.
    f32 = cca_triton_traffic(N, D, CV, H, W, 4, "forward", channels_last=True)
    t = -(-H // 16)
    assert f32["parts"]["partial (written, read)"] == 2 * 4 * P * CV
    assert f32["parts"]["v lines"] == 2 * 4 * P * CV * t
    # 128 x 256: the column pass holds a 128-pixel column in one tile, the row pass a 256-key
    # row in two tiles of 128 pixels (the forward's 16-bit budget, 32768 elements).
    wide = cca_triton_traffic(1, D, CV, 128, 256, 2, "forward", channels_last=True)
    assert wide["parts"]["v lines"] == s * 128 * 256 * CV * (1 + 2)
    bwd = cca_triton_traffic(N, D, CV, H, W, 2, "backward", channels_last=True)
    # Minimum: grad, q, k, v, out read once, lse read once, dq, dk, dv written once.
    assert bwd["min_bytes"] == s * P * (2 * D + 3 * CV) + a * P + s * P * (2 * D + CV)
    # Per pass (one tile per line): the query kernel reads q, grad, the line's k and v, lse and
    # D; the key kernel k twice, v, the line's q twice and grad, lse and D. Plus D's kernel
    # (grad, out read, D written), the bf16 partials written and read, dq, dk, dv written.
    query = s * P * (D + CV) + s * P * (D + CV) + 2 * a * P
    key = s * P * (2 * D + CV) + s * P * (2 * D + CV) + 2 * a * P
    assert bwd["bytes"] == (2 * s * P * CV + a * P + 2 * (query + key)
                            + 2 * s * P * (2 * D + CV) + s * P * (2 * D + CV))
    nchw = cca_triton_traffic(N, D, CV, H, W, 2, "backward")
    # NCHW: q, k, v transposed (read and write); grad's NHWC copy written by D's kernel, which
    # reads grad anyway.
    assert nchw["bytes"] - bwd["bytes"] == 2 * s * P * (2 * D + CV) + s * P * CV
    # The CUDA and Triton models are held to one floor.
    from traffic import cca_cuda_traffic
    for pass_ in ("forward", "backward"):
        for res in (False, True):
            assert (cca_cuda_traffic(N, D, CV, H, W, 2, pass_, residual=res)["min_bytes"]
                    == cca_triton_traffic(N, D, CV, H, W, 2, pass_, residual=res)["min_bytes"])
    with pytest.raises(ValueError, match="pass_"):
        cca_triton_traffic(N, D, CV, H, W, 2, "sideways")

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
def test_sm90_build_uses_tensor_cores_without_spills():
    """AOT-compiles the hot kernels (forward, dq, dk/dv; column and row pass) for sm_90 in bf16 at
    (2, 64, 512, 97, 97), from the launches the op makes, and reads the result. Protects:
    tensor-core products (wgmma or mma in the PTX, HGMMA/HMMA in the SASS), and registers that
    hold the tiles (no spill bytes from ptxas, no local loads or stores), which a change of tile
    sizes or of what a loop keeps live would break."""
    missing = _aot_toolchain_missing()
    if missing:
        pytest.skip(missing)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = os.path.join(ROOT, "build", "triton_aot_cache")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "triton_aot.py"),
                          "2", "64", "512", "97", "97", "--only", HOT_KERNELS],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    reports = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    names = {r["kernel"] for r in reports}
    assert names == set(HOT_KERNELS.split(",")), names
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
    fwd = cca_triton_traffic(N, D, CV, H, W, 2, "forward")
    # Minimum: q, k, v read once, out (bf16) and lse (float32) written once.
    assert fwd["min_bytes"] == 2 * P * (2 * D + CV) + 2 * P * CV + 4 * P
    assert fwd["bytes"] == sum(fwd["parts"].values())
    cl = cca_triton_traffic(N, D, CV, H, W, 2, "forward", channels_last=True)
    # channels_last saves exactly the three transposes (a read and a write each).
    assert fwd["bytes"] - cl["bytes"] == 2 * 2 * P * (2 * D + CV)
    # One tile per line at L = 97: v is read once per pass.
    assert cl["parts"]["v lines"] == 2 * 2 * P * CV
    bwd = cca_triton_traffic(N, D, CV, H, W, 2, "backward")
    # Minimum: grad, q, k, v, out read once, lse read once, dq, dk, dv written once.
    assert bwd["min_bytes"] == 2 * P * (2 * D + 3 * CV) + 4 * P + 2 * P * (2 * D + CV)
    assert bwd["bytes"] > bwd["min_bytes"]
    # The CUDA and Triton models are held to one floor.
    from traffic import cca_cuda_traffic
    for pass_ in ("forward", "backward"):
        for res in (False, True):
            assert (cca_cuda_traffic(N, D, CV, H, W, 2, pass_, residual=res)["min_bytes"]
                    == cca_triton_traffic(N, D, CV, H, W, 2, pass_, residual=res)["min_bytes"])
    with pytest.raises(ValueError, match="pass_"):
        cca_triton_traffic(N, D, CV, H, W, 2, "sideways")

"""Criss-cross attention: every backend against armnet_ops.reference, and the reference against
per-pixel loops (SPEC §3.1, §3.4, §3.5)."""
from __future__ import annotations

import pytest
import torch

import armnet_ops
from armnet_ops import reference
from armnet_ops.nn import CrissCrossAttention
from cpu_isa import ISAS, run_with_cpu_isa
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
    q, k, v = (torch.randn(2, c, 17, 21, generator=g, dtype=torch.float64).requires_grad_() for c in (5, 5, 19))
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
    # The block with its fused epilogue: y and the gradients of gamma and v.
    res = torch.randn(v.shape, generator=g, dtype=torch.float64)
    gamma = torch.tensor([0.75], dtype=torch.float64, requires_grad=True)
    ref = gamma * reference.criss_cross_attention(q, k, v, 0.6) + res
    want = torch.autograd.grad(ref.sum(), (v, gamma))
    gl = gamma.detach().to(dtype).requires_grad_()
    y = armnet_ops.criss_cross_attention(*x, scale=0.6, gamma=gl, residual=res.to(dtype), backend="cpu")
    got = torch.autograd.grad(y.sum(), (x[2], gl))
    for a, b in zip((y,) + got, (ref,) + want):
        err = (a.double() - b).abs().max().item() / b.abs().max().item()
        assert err < tol, ("residual", dtype, err)
print("ok")
"""


@pytest.mark.parametrize("isa", ISAS)
def test_cpu_isa_variants(isa):
    run_with_cpu_isa(_ISA_SCRIPT, isa)


def test_cpu_gemm_without_blas():
    """The C++ kernel's GEMMs go to the BLAS torch links (MKL's sgemm_/dgemm_) when the process
    has one, else to at::mm on strided views; ARMNET_OPS_CPU_GEMM=aten forces the latter."""
    run_with_cpu_isa(_ISA_SCRIPT, None, ARMNET_OPS_CPU_GEMM="aten")


@pytest.mark.parametrize("shape", [(2, 9, 70, 19, 37), (1, 3, 5, 33, 1), (1, 3, 5, 1, 33),
                                   (3, 4, 6, 7, 5), (4, 2, 3, 9, 1)])
def test_cpu_column_blocks(shape):
    """The CPU kernel takes columns a SIMD vector of adjacent ones at a time (4, 8 or 16 in fp32,
    csrc/cpu/cca_kernels.h), the columns of all images numbered as one sequence, so a block may
    hold the end of one image and the start of the next, and only the last block is zero-padded:
    widths across several blocks, images that start inside a block, several images in one block,
    one-pixel lines, and channel counts that are no multiple of a vector, against the fp64
    reference; and the same bits with 1 thread and twice with 2 (lines go to threads as they
    come free, so which thread takes which differs from run to run)."""
    N, Cqk, Cv, H, W = shape
    q, k, v = _inputs(N, Cqk, Cv, H, W, requires_grad=True)
    ref = reference.criss_cross_attention(q, k, v, 0.9)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (q, k, v), g)
    results = []
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2, 2):
            torch.set_num_threads(n_threads)
            x = [t.detach().float().requires_grad_() for t in (q, k, v)]
            out = armnet_ops.criss_cross_attention(*x, scale=0.9, backend="cpu")
            results.append((out, *torch.autograd.grad(out, x, g.float())))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(results[0], (ref, *want)):
        assert_close(a, b)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def _cpu_fwd_bwd(q, k, v, g, scale=0.8):
    out, lse = ops.cca_forward(q, k, v, scale)
    return (out, lse, *ops.cca_backward(g, q, k, v, out, lse, scale))


# Its column weights and v copies take more than 4 MiB in every instruction set, the size from
# which the CPU kernels' scratch buffers are kept between calls (csrc/cpu/buffer_cache.h).
_CACHED_SHAPE = (2, 8, 64, 97, 97)


def _cached_shape_inputs():
    q, k, v = (t.float() for t in _inputs(*_CACHED_SHAPE))
    return q, k, v, torch.randn(v.shape, generator=torch.Generator().manual_seed(5))


def test_cpu_scratch_cache_reuse():
    """Scratch buffers of 4 MiB and more outlive a call, and the next call reuses them. A call on
    NaN inputs fills them with NaN; the call after it must give the same bits as one on fresh
    buffers (no kernel reads scratch it has not written). release_cpu_scratch() frees them."""
    q, k, v, g = _cached_shape_inputs()
    armnet_ops.release_cpu_scratch()
    first = _cpu_fwd_bwd(q, k, v, g)
    assert armnet_ops.release_cpu_scratch() > 0, "no buffer was kept"
    assert armnet_ops.release_cpu_scratch() == 0
    nan = [torch.full_like(t, float("nan")) for t in (q, k, v, g)]
    _cpu_fwd_bwd(*nan)
    again = _cpu_fwd_bwd(q, k, v, g)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    # The NaN call's outputs of 4 MiB and more (out and grad_v here) go back to the cache when
    # freed too, and the next call writes its own into them. Its scratch, NaN as well, is released
    # first here, so that the next call's out, allocated before any scratch, finds only them.
    nan_outputs = _cpu_fwd_bwd(*nan)
    reused = {t.data_ptr() for t in nan_outputs if t.nbytes >= 4 << 20}
    assert len(reused) == 2, "out and grad_v should be large enough to cache"
    armnet_ops.release_cpu_scratch()
    del nan_outputs
    again = _cpu_fwd_bwd(q, k, v, g)
    assert {t.data_ptr() for t in again} & reused, "no output reused a cached buffer"
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    x = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference.criss_cross_attention(*x, 0.8)
    want = (ref, *torch.autograd.grad(ref, x, g.double()))
    for a, b in zip((first[0], *first[2:]), want):
        assert_close(a, b)


def test_cpu_cached_outputs_are_ordinary_tensors():
    """Outputs whose storage comes from the cache behave as torch's own: they outlive
    release_cpu_scratch() (which frees only buffers not in use), resize_ reallocates them, and
    they move to shared memory (as DataLoader workers' results do)."""
    q, k, v, g = _cached_shape_inputs()
    out, lse = ops.cca_forward(q, k, v, 0.8)
    want = out.clone()
    armnet_ops.release_cpu_scratch()
    assert torch.equal(out, want)
    out.share_memory_()
    assert out.is_shared() and torch.equal(out, want)
    grown = ops.cca_forward(q, k, v, 0.8)[0]
    grown.resize_(3, *out.shape[1:])
    assert torch.equal(grown[:2], want)
    grown[2] = 1.0
    assert grown[2].eq(1.0).all() and torch.equal(grown[:2], want)


def test_cpu_scratch_cache_threads():
    """Calls from two Python threads at once (the op releases the GIL) each take buffers of their
    own: every result is the single-threaded one, bit for bit."""
    import threading
    q, k, v, g = _cached_shape_inputs()
    want = _cpu_fwd_bwd(q, k, v, g)
    results, errors = [[], []], []

    def work(i):
        try:
            for _ in range(3):
                results[i].append(_cpu_fwd_bwd(q, k, v, g))
        except Exception as e:  # surfaced below, with the thread's traceback in e
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got in results[0] + results[1]:
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_cpu_scratch_cache_fork():
    """A process forked while another thread runs the op (DataLoader workers are forked so) can
    run it too, with the cached buffers it inherits: the cache's lock is taken around fork, so
    the child never inherits it held. The fork lands anywhere in the other thread's calls; the
    window in which the lock is held is short, so this exercises the inherited cache every time
    and the held lock only by chance. The child uses one thread, as DataLoader workers do."""
    import os
    import threading
    import time
    import warnings
    q, k, v, g = _cached_shape_inputs()
    want = _cpu_fwd_bwd(q, k, v, g)
    stop = threading.Event()

    def other_thread():
        while not stop.is_set():
            _cpu_fwd_bwd(q, k, v, g)

    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        for _ in range(3):
            time.sleep(0.05)
            with warnings.catch_warnings():  # Python 3.12 warns about forking with threads
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:
                code = 2
                try:
                    torch.set_num_threads(1)
                    got = _cpu_fwd_bwd(q, k, v, g)
                    code = 0 if all(torch.equal(a, b) for a, b in zip(got, want)) else 1
                finally:
                    os._exit(code)
            deadline = time.monotonic() + 120
            while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    pytest.fail("the forked child hung in the op")
                time.sleep(0.02)
            assert os.waitstatus_to_exitcode(done[1]) == 0, "the forked child's results differ"
    finally:
        stop.set()
        thread.join()


_SCRATCH_LIMIT_SCRIPT = """
import os, torch, armnet_ops
q, v = torch.randn(2, 8, 97, 97), torch.randn(2, 64, 97, 97)
out, lse = torch.ops.armnet_ops.cca_forward(q, q, v, 1.0)
torch.ops.armnet_ops.cca_backward(v, q, q, v, out, lse, 1.0)
held = armnet_ops.release_cpu_scratch()
limit = int(os.environ["ARMNET_OPS_CPU_SCRATCH_MB"]) << 20
assert held <= limit and (held > 0) == (limit > 0), (held, limit)
print("ok")
"""


@pytest.mark.parametrize("limit_mb", ["0", "10"])
def test_cpu_scratch_cache_limit(limit_mb):
    """ARMNET_OPS_CPU_SCRATCH_MB caps the bytes kept (0: nothing is kept)."""
    run_with_cpu_isa(_SCRATCH_LIMIT_SCRIPT, None, ARMNET_OPS_CPU_SCRATCH_MB=limit_mb)


_SCRATCH_OOM_SCRIPT = """
import torch, armnet_ops
ops = torch.ops.armnet_ops
q, v = torch.randn(2, 8, 97, 97), torch.randn(2, 64, 97, 97)
ops.cca_forward(q, q, v, 1.0)  # the cache keeps some of this call's large buffers
assert armnet_ops.release_cpu_scratch() > 0
ops.cca_forward(q, q, v, 1.0)
# One column of 2e6 pixels: its weights need 64·H² = 2.6e14 bytes (16 lanes; 8 or 4 lanes: half,
# a quarter), beyond any address space, so the allocation fails whatever the overcommit policy.
x = torch.randn(1, 1, 2000000, 1)
try:
    ops.cca_forward(x, x, x, 1.0)
    raise SystemExit("no error")
except RuntimeError as e:
    assert "out of memory: could not allocate" in str(e) and "bytes of scratch" in str(e), str(e)
# The failed allocation emptied the cache before trying again. Nothing was kept afterwards either:
# the failed call's output (8 MB) and its scratch buffers (64 MiB and more) exceed the 7 MiB limit.
assert armnet_ops.release_cpu_scratch() == 0
out, lse = ops.cca_forward(q, q, v, 1.0)  # and the op still works
assert torch.isfinite(out).all()
print("ok")
"""


def test_cpu_scratch_out_of_memory():
    """A scratch allocation that fails frees what the cache keeps, tries once more, and then
    raises an error that says what failed (no std::bad_alloc, no crash)."""
    run_with_cpu_isa(_SCRATCH_OOM_SCRIPT, None, ARMNET_OPS_CPU_SCRATCH_MB="7")


def test_cpu_scratch_cache_bad_limit():
    import os
    import subprocess
    import sys
    script = "import torch, armnet_ops; q = torch.randn(2, 8, 97, 97); " \
             "torch.ops.armnet_ops.cca_forward(q, q, torch.randn(2, 64, 97, 97), 1.0)"
    env = dict(os.environ, ARMNET_OPS_CPU_SCRATCH_MB="lots")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0
    assert "ARMNET_OPS_CPU_SCRATCH_MB must be a whole number of MiB >= 0, got 'lots'" in r.stderr


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_no_value_channels(backend, device):
    """Cv = 0: an empty output, and q, k gradients exactly zero (dP = <dO, v> has no terms). The
    CPU kernel once left its dP scratch unwritten here, since no channel chunk ran."""
    q, k, v = _inputs(2, 3, 0, 9, 21, torch.float32, device, requires_grad=True)
    out = armnet_ops.criss_cross_attention(q, k, v, backend=backend)
    assert out.shape == (2, 0, 9, 21)
    gq, gk, gv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.equal(gq, torch.zeros_like(q)) and torch.equal(gk, torch.zeros_like(k))
    assert gv.shape == v.shape


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


# ---- the block with its residual epilogue: y = gamma * out + residual -------------------------

def _residual_case(shape, gamma_value, dtype, device, gamma_dtype=None):
    """fp64 leaves and oracle (gamma64 * reference + x64, its grads for grad_y), and the same
    leaves in `dtype` on `device` (gamma in `gamma_dtype`, the op-math type by default)."""
    N, Cqk, Cv, H, W, scale = shape
    q64, k64, v64 = _inputs(N, Cqk, Cv, H, W, requires_grad=True)
    g = torch.Generator().manual_seed(7)
    x64 = torch.randn(v64.shape, generator=g, dtype=torch.float64).requires_grad_()
    gamma64 = torch.tensor([gamma_value], dtype=torch.float64, requires_grad=True)
    out64 = reference.criss_cross_attention(q64, k64, v64, scale)
    y64 = gamma64 * out64 + x64
    grad_y = torch.randn(y64.shape, generator=g, dtype=torch.float64)
    want = torch.autograd.grad(y64, (q64, k64, v64, x64, gamma64), grad_y)
    gamma_dtype = gamma_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    leaves = [t.detach().to(device, dtype).requires_grad_() for t in (q64, k64, v64, x64)]
    leaves.append(gamma64.detach().to(device, gamma_dtype).requires_grad_())
    return leaves, y64.detach(), out64.detach(), grad_y, want


def _block(leaves, scale, backend):
    q, k, v, x, gamma = leaves
    return armnet_ops.criss_cross_attention(q, k, v, scale=scale, gamma=gamma, residual=x, backend=backend)


def _run_residual_parity(backend, device, dtype, shape, gamma_value):
    leaves, y64, out64, grad_y, want = _residual_case(shape, gamma_value, dtype, device)
    y = _block(leaves, shape[-1], backend)
    ref_lowp = _block(leaves, shape[-1], "reference")  # the same inputs through PyTorch
    _check(y, y64, ref_lowp.detach(), f"{backend} y {shape} gamma={gamma_value}")
    gy = grad_y.to(device, dtype)
    got = list(torch.autograd.grad(y, leaves, gy))
    lowp = list(torch.autograd.grad(ref_lowp, leaves, gy))
    for name, a, c in zip(("q", "k", "v", "residual", "gamma"), got, lowp):
        assert a.dtype == c.dtype, f"grad_{name}: dtype {a.dtype} != {c.dtype}"
    # grad_gamma is float32 for 16-bit inputs but sums 16-bit products: it is held to the rule of
    # the input dtype (compared after rounding to it).
    got[4], lowp[4] = got[4].to(dtype), lowp[4].to(dtype)
    for name, a, b, c in zip(("q", "k", "v", "residual", "gamma"), got, want, lowp):
        _check(a, b, c, f"{backend} grad_{name} {shape} gamma={gamma_value}")
    # Whatever gamma (0 included): grad_gamma = sum(grad_y * out), from the kernel's own out.
    assert_close(got[4], (grad_y * out64).sum().reshape(1), lowp[4], "grad_gamma = sum(grad_y*out)")


# (shape, gamma): edges H = 1, W = 1, Cqk != Cv; gamma = 0 on two of them.
RESIDUAL_CASES = [((2, 3, 5, 4, 6, 1.0), 0.7), ((2, 3, 5, 4, 6, 1.0), 0.0), ((1, 2, 3, 1, 7, 0.7), -1.3),
                  ((1, 2, 3, 6, 1, 1.3), 0.7), ((1, 4, 16, 9, 13, 0.5), 0.7), ((1, 4, 16, 9, 13, 0.5), 0.0)]


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape,gamma_value", RESIDUAL_CASES, ids=str)
def test_residual_parity(backend, device, shape, gamma_value):
    """The fused block against gamma * reference + x; gamma = 0 (CCNet's initial value) still
    gives grad_gamma = sum(grad_y * out) and zero grads for q, k, v."""
    for dtype in _dtypes(device):
        _run_residual_parity(backend, device, dtype, shape, gamma_value)


@pytest.mark.parametrize("backend,device", [p for p in KERNEL_BACKENDS if p.values[1] == "cuda"])
def test_residual_parity_gpu_shapes(backend, device):
    for dtype in _dtypes(device):
        for shape in GPU_SHAPES:
            _run_residual_parity(backend, device, dtype, shape, 0.6)


@pytest.mark.parametrize("backend,device", [p for p in KERNEL_BACKENDS if p.values[1] == "cpu"])
def test_residual_wide_v(backend, device):
    """CCNet's channel ratio, Cqk = 64 and Cv = 512 (V tiled over the grid in Triton), on a small
    image so that the interpreter stays fast."""
    _run_residual_parity(backend, device, torch.float32, (1, 64, 512, 3, 5, 0.125), 0.8)


@needs_triton_cpu
def test_residual_triton_fp16_interpreter():
    """The 16-bit path (row pass into a float32 buffer, the column pass rounding out and y once)
    runs in the interpreter too in fp16, under the low-precision rule."""
    _run_residual_parity("triton", "cpu", torch.float16, (1, 4, 16, 9, 13, 0.5), 0.7)


@needs_triton_cpu
def test_residual_triton_multi_tile(monkeypatch):
    """Lines longer than a tile: the epilogue on the masked edge tiles of the column pass."""
    import armnet_ops.triton.cca as tcca
    monkeypatch.setattr(tcca, "MAX_TILE", 16)
    _run_residual_parity("triton", "cpu", torch.float64, (1, 3, 4, 19, 18, 0.5), -0.4)


@pytest.mark.parametrize("backend", GRADCHECK)
@pytest.mark.parametrize("shape", [(1, 2, 3, 3, 4, 0.7), (2, 1, 2, 1, 3, 1.0)], ids=str)
def test_residual_gradcheck(backend, shape):
    """fp64 gradcheck in q, k, v, residual and gamma."""
    leaves = _residual_case(shape, 0.8, torch.float64, "cpu")[0]
    fn = lambda *t: _block(t, shape[-1], backend)
    assert torch.autograd.gradcheck(fn, tuple(leaves), fast_mode=backend == "triton")


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_residual_strided_inputs(backend, device):
    """channels_last q, and a channels_last or a transposed-view residual: y is contiguous and
    right, and grad_residual has the residual's shape."""
    shape = (2, 4, 6, 7, 10, 0.8)
    for make in (lambda t: t.contiguous(memory_format=torch.channels_last),
                 lambda t: t.transpose(2, 3).contiguous().transpose(2, 3)):
        leaves, y64, _, grad_y, want = _residual_case(shape, 0.9, torch.float32, device)
        leaves[0] = make(leaves[0].detach()).requires_grad_()
        leaves[3] = make(leaves[3].detach()).requires_grad_()
        assert not leaves[0].is_contiguous() and not leaves[3].is_contiguous()
        y = _block(leaves, shape[-1], backend)
        assert y.is_contiguous()
        assert_close(y, y64)
        for a, b in zip(torch.autograd.grad(y, leaves, grad_y.to(device, torch.float32)), want):
            assert_close(a, b)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_residual_empty_batch(backend, device):
    leaves = _residual_case((0, 2, 3, 4, 5, 1.0), 0.5, torch.float32, device)[0]
    y = _block(leaves, 1.0, backend)
    assert y.shape == (0, 3, 4, 5)
    grads = torch.autograd.grad(y.sum(), leaves)
    assert [g.shape for g in grads] == [t.shape for t in leaves]
    assert grads[4].item() == 0.0


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_residual_deterministic(backend, device):
    leaves = _residual_case((1, 4, 8, 9, 11, 1.0), 0.5, torch.float32, device)[0]
    y = _block(leaves, 1.0, backend)
    g = torch.randn_like(y)
    first = torch.autograd.grad(y, leaves, g, retain_graph=True)
    second = torch.autograd.grad(y, leaves, g)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_residual_casts_gamma_and_residual():
    """gamma and residual of other dtypes (an fp32 parameter, fp32 x, fp64 attention) are cast
    differentiably: y has v's dtype, each gradient its leaf's dtype."""
    shape = (1, 2, 3, 4, 5, 1.0)
    # gamma 0.75 is exact in fp32, so the fp64 oracle holds for the fp32 gamma.
    leaves, y64, _, grad_y, want = _residual_case(shape, 0.75, torch.float64, "cpu", torch.float32)
    leaves[3] = leaves[3].detach().float().requires_grad_()
    y = _block(leaves, 1.0, "cpu")
    assert y.dtype == torch.float64
    got = torch.autograd.grad(y, leaves, grad_y)
    assert [g.dtype for g in got] == [t.dtype for t in leaves]
    for a, b in zip(got, want):
        assert_close(a, b)
    # A Python number as gamma, and a per-channel gamma (PyTorch's broadcasting epilogue).
    q, k, v, x = (t.detach() for t in leaves[:4])
    ref = reference.criss_cross_attention(q, k, v)
    assert_close(armnet_ops.criss_cross_attention(q, k, v, gamma=0.5, residual=x, backend="cpu"),
                 0.5 * ref + x.double())
    per_channel = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64).view(1, 3, 1, 1)
    assert_close(armnet_ops.criss_cross_attention(q, k, v, gamma=per_channel, residual=x, backend="cpu"),
                 per_channel * ref + x.double())


def _opcheck_residual(fwd, bwd, device):
    leaves = _residual_case((2, 2, 3, 3, 4, 0.5), 0.7, torch.float32, device)[0]
    q, k, v, x, gamma = leaves
    opcheck(fwd, (q, k, v, x, gamma, 0.5))
    y, out, lse = fwd(*(t.detach() for t in leaves), 0.5)
    assert_close(out, reference.criss_cross_attention(*(t.detach().double() for t in leaves[:3]), 0.5))
    opcheck(bwd, (torch.randn_like(y), q.detach(), k.detach(), v.detach(), out, lse, gamma.detach(), 0.5))
    # A channels_last residual and a 0-d gamma: the fake kernel's metadata against the kernel's.
    x_cl = x.detach().contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(fwd, (q.detach(), k, v, x_cl, gamma.detach().reshape(()), 1.0),
                          test_utils=("test_schema", "test_faketensor"))


def test_opcheck_residual_cpu():
    _opcheck_residual(ops.cca_residual_forward.default, ops.cca_residual_backward.default, "cpu")


@needs_triton_cpu
def test_opcheck_residual_triton_interpreter():
    import armnet_ops.triton.cca  # noqa: F401
    _opcheck_residual(ops.cca_residual_forward_triton.default,
                      ops.cca_residual_backward_triton.default, "cpu")


@needs_cuda
def test_opcheck_residual_cuda():
    _opcheck_residual(ops.cca_residual_forward.default, ops.cca_residual_backward.default, "cuda")


@needs_cuda
@needs_triton
def test_opcheck_residual_triton_cuda():
    import armnet_ops.triton.cca  # noqa: F401
    _opcheck_residual(ops.cca_residual_forward_triton.default,
                      ops.cca_residual_backward_triton.default, "cuda")


RAW_RESIDUAL_OPS = [pytest.param("", id="cpp"),
                    pytest.param("_triton", id="triton-interpreter", marks=needs_triton_cpu)]


@pytest.mark.parametrize("suffix", RAW_RESIDUAL_OPS)
def test_residual_bad_input_direct_op(suffix):
    if suffix:
        import armnet_ops.triton.cca  # noqa: F401
    fwd = getattr(ops, "cca_residual_forward" + suffix)
    bwd = getattr(ops, "cca_residual_backward" + suffix)
    q, k, v = _inputs(1, 2, 3, 4, 5, torch.float32)
    x, gamma = torch.randn_like(v), torch.ones(1)
    with pytest.raises((RuntimeError, ValueError), match=r"'gamma' must have one element, got 2"):
        fwd(q, k, v, x, torch.ones(2), 1.0)
    with pytest.raises((RuntimeError, ValueError), match=r"'gamma' must have dtype (torch\.)?[Ff]loat"):
        fwd(q, k, v, x, torch.ones(1, dtype=torch.float64), 1.0)
    with pytest.raises((RuntimeError, ValueError), match=r"'residual' must have the shape"):
        fwd(q, k, v, x[:, :2], gamma, 1.0)
    with pytest.raises((RuntimeError, ValueError), match=r"'residual' must have the (shape|dtype)"):
        fwd(q, k, v, x.double(), gamma, 1.0)
    y, out, lse = fwd(q, k, v, x, gamma, 1.0)
    with pytest.raises((RuntimeError, ValueError), match=r"'gamma' must have one element, got 3"):
        bwd(torch.randn_like(y), q, k, v, out, lse, torch.ones(3), 1.0)


def test_residual_bad_input():
    q, k, v = _inputs(1, 2, 3, 4, 5, torch.float32)
    f = armnet_ops.criss_cross_attention
    with pytest.raises(ValueError, match=r"'gamma' and 'residual' go together"):
        f(q, k, v, residual=v)
    with pytest.raises(ValueError, match=r"'residual' must be 4-D"):
        f(q, k, v, gamma=1.0, residual=v[0])
    with pytest.raises(TypeError, match=r"'residual' must be a Tensor"):
        f(q, k, v, gamma=1.0, residual=1.0)


def _mmcv_state_dict(C, layout="mmcv"):
    """A state dict in the key layout of mmcv's CrissCrossAttention (mmcv/ops/cc_attention.py
    in every release since the op was added): the gate is an mmcv `Scale(0.)` module whose one
    parameter `scale` is a 0-dim tensor, so its key is "gamma.scale". layout="ccnet" is CCNet's
    own: "gamma" of shape (1,)."""
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3
    gate = {"gamma.scale": torch.tensor(0.8)} if layout == "mmcv" else {"gamma": torch.tensor([0.8])}
    return {
        **gate,
        "query_conv.weight": r(C // 8, C, 1, 1), "query_conv.bias": r(C // 8),
        "key_conv.weight": r(C // 8, C, 1, 1), "key_conv.bias": r(C // 8),
        "value_conv.weight": r(C, C, 1, 1), "value_conv.bias": r(C),
    }


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS + [pytest.param("reference", "cpu", id="reference")])
@pytest.mark.parametrize("layout", ["mmcv", "ccnet"])
def test_module_loads_mmcv_state_dict(backend, device, layout):
    C = 16
    sd = _mmcv_state_dict(C, layout)
    m = CrissCrossAttention(C, backend=backend).to(device)
    m.load_state_dict(sd)  # strict: the key names are mmcv's (or CCNet's)
    assert m.gamma.shape == (1,) and m.gamma.item() == pytest.approx(0.8)
    x = torch.randn(2, C, 5, 7, generator=torch.Generator().manual_seed(4))
    out = m(x.to(device))
    assert_close(out.cpu(), _mmcv_block64(sd, x))
    assert not torch.allclose(out.double().cpu(), x.double(), atol=1e-3), "gamma != 0 must change the output"


@pytest.mark.parametrize("bias", [True, False])
def test_module_projections_channels_last(bias):
    """The GPU path of CrissCrossAttention computes its 1x1 projections as batched GEMMs that
    write NHWC (the layout the GPU kernels read without a transpose): the same values and
    gradients as the convolution, in fp64, channels_last strides, also under autocast."""
    from armnet_ops.cca import _project_channels_last
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(12, 5, 1, bias=bias).double()
    for x in (torch.randn(3, 12, 7, 9, dtype=torch.float64),
              torch.randn(3, 12, 7, 9, dtype=torch.float64).contiguous(
                  memory_format=torch.channels_last),
              torch.randn(3, 12, 7, 18, dtype=torch.float64)[..., ::2]):    # neither layout
        x.requires_grad_(True)
        y = _project_channels_last(x, conv)
        ref = conv(x)
        assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
        assert_close(y, ref, what="projection")
        g = torch.randn_like(ref)
        got = torch.autograd.grad(y, [x, *conv.parameters()], g)
        want = torch.autograd.grad(ref, [x, *conv.parameters()], g)
        for a, b in zip(got, want):
            assert_close(a, b, what="projection gradient")
    conv = conv.float()
    x = torch.randn(2, 12, 5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = _project_channels_last(x, conv), conv(x)
    assert y.dtype == ref.dtype == torch.bfloat16


def test_module_state_dict_rejects_bad_gate():
    """A gate of more than one element is no CCNet/mmcv checkpoint: a clear error, not a
    silent broadcast."""
    sd = _mmcv_state_dict(16)
    sd["gamma.scale"] = torch.zeros(3)
    with pytest.raises(RuntimeError, match="gamma"):
        CrissCrossAttention(16).load_state_dict(sd)


def _mmcv_block64(sd, x):
    """mmcv's block written out in fp64 from a state dict: gamma * CCA(q, k, v) + x."""
    conv = lambda name, t: torch.nn.functional.conv2d(t, sd[f"{name}.weight"].double(), sd[f"{name}.bias"].double())
    xd = x.double()
    gamma = sd["gamma.scale"] if "gamma.scale" in sd else sd["gamma"]
    return gamma.double() * reference.criss_cross_attention(conv("query_conv", xd), conv("key_conv", xd),
                                                            conv("value_conv", xd)) + xd


COMPILE_BACKENDS = [pytest.param("cpu", "cpu", "inductor", id="cpu-inductor"),
                    pytest.param("triton", "cpu", "aot_eager", id="triton-interpreter-aot_eager",
                                 marks=needs_triton_cpu),
                    pytest.param("cuda", "cuda", "inductor", id="cuda-inductor", marks=needs_cuda),
                    pytest.param("triton", "cuda", "inductor", id="triton-cuda-inductor",
                                 marks=[needs_cuda, needs_triton])]


@pytest.mark.parametrize("backend,device,compiler", COMPILE_BACKENDS)
def test_module_compile_fullgraph(backend, device, compiler):
    """The module compiles to one graph around the fused residual op (no PyTorch epilogue left),
    with the values and gradients of eager mode."""
    from torch._dynamo.backends.registry import lookup_backend
    torch._dynamo.reset()
    m = CrissCrossAttention(16, backend=backend).to(device)
    with torch.no_grad():
        m.gamma.fill_(0.5)
    seen = []

    def recording(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return lookup_backend(compiler)(gm, example_inputs)

    x = torch.randn(2, 16, 6, 5, device=device, requires_grad=True)
    out = torch.compile(m, fullgraph=True, backend=recording)(x)
    fused = "armnet_ops.cca_residual_forward" + ("_triton" if backend == "triton" else "")
    assert any(t.startswith(fused) for t in seen), seen
    assert not any("mul" in t or "add" in t for t in seen), f"an epilogue outside the op: {seen}"
    want = m(x)
    assert_close(out, want.detach().double())
    g_c = torch.autograd.grad(out.sum(), (x, m.gamma))
    g_e = torch.autograd.grad(want.sum(), (x, m.gamma))
    for a, b in zip(g_c, g_e):
        assert_close(a, b.double())


AUTOCAST = [pytest.param("auto", "cpu", torch.bfloat16, id="cpu-auto-bf16"),  # CPU: the reference
            pytest.param("triton", "cpu", torch.float16, id="triton-interpreter-fp16",
                         marks=needs_triton_cpu),
            pytest.param("cuda", "cuda", torch.float16, id="cuda-fp16", marks=needs_cuda),
            pytest.param("cuda", "cuda", torch.bfloat16, id="cuda-bf16", marks=needs_cuda),
            pytest.param("triton", "cuda", torch.bfloat16, id="triton-cuda-bf16",
                         marks=[needs_cuda, needs_triton])]


@pytest.mark.parametrize("backend,device,dtype", AUTOCAST)
def test_module_autocast(backend, device, dtype):
    """Under autocast the block returns the autocast dtype (the projections' dtype) on every
    backend, within the low-precision rule of the reference; gamma and x keep fp32 gradients."""
    C = 16
    m = CrissCrossAttention(C, backend=backend).to(device)
    m.load_state_dict(_mmcv_state_dict(C))
    ref_m = CrissCrossAttention(C, backend="reference").to(device)
    ref_m.load_state_dict(_mmcv_state_dict(C))
    x = torch.randn(2, C, 5, 7, generator=torch.Generator().manual_seed(4)).to(device).requires_grad_()
    with torch.autocast(device, dtype=dtype):
        y = m(x)
        y_lowp = ref_m(x)
    assert y.dtype == dtype and y_lowp.dtype == dtype
    y64 = _mmcv_block64(_mmcv_state_dict(C), x.detach().cpu())
    assert_close(y.cpu(), y64, y_lowp.detach().cpu())
    gx, gg = torch.autograd.grad(y.float().sum(), (x, m.gamma))
    assert gx.dtype == torch.float32 and gg.dtype == torch.float32
    gx_ref, gg_ref = torch.autograd.grad(y_lowp.float().sum(), (x, ref_m.gamma))
    assert torch.isfinite(gg) and (gg - gg_ref).abs() <= 0.05 * gg_ref.abs() + 0.05


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

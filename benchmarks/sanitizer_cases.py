"""One small case of every CUDA kernel of armnet_ops, forward and backward, for compute-sanitizer.

    compute-sanitizer --tool memcheck python3 benchmarks/sanitizer_cases.py
    python3 benchmarks/sanitizer_cases.py --device cpu        # the same calls on the C++ backend

Each case calls a public op with an explicit kernel backend ("cuda" on a GPU, "cpu" with
--device cpu; never "auto", so Triton is never imported) and its backward, synchronises, and
compares the output and the input gradients with the float64 reference on the CPU (loosely: this
is a memory and race check, the tests hold the numerical contract). The shapes are tiny but are
not multiples of any tile, so every kernel's edge masking runs, and they are chosen to reach each
launch path of the glue:

* criss-cross attention: plain and with the fused residual epilogue, cca_weight and cca_map, at
  a small and at ARM-Net's channel count (Cqk = 64), and with a 400-pixel row (the forward's
  fallback kernels: longer than the line kernel holds);
* CARAFE and carafe_fused: s = 1, 2 (vector children), 3 and 5 (run-time s), G > 1, enough
  channels for several channel splits, a k²·s² whose staged masks need more than 48 KiB of shared
  memory (the opt-in limit), and a grad_out view with an odd storage offset (the clone path);
* directional conv and its pair: fp32/fp64 take the SIMT kernel; fp16/bf16 the wmma kernel in its
  four load variants (channels_last with C_in % 8 == 0 gives 16-byte A loads, C_out % 8 == 0
  16-byte B loads), with and without the epilogue.

Every case runs in fp32 and in each 16-bit dtype asked for (--dtype, default bf16). Exits
non-zero when any case raises or is off; prints one line per case.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import armnet_ops  # noqa: E402
from armnet_ops import reference  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
# Max |out - ref| relative to max |ref|: generous, as numerics are the tests' job; a kernel that
# reads out of bounds or races gives errors of order 1 (or NaN).
LOOSE = {torch.float64: 1e-8, torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 1e-1}


def rand(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def check(name, outs, refs, dtype):
    """outs (kernel) and refs (float64 reference) are matching lists of tensors."""
    worst = 0.0
    for i, (o, r) in enumerate(zip(outs, refs)):
        if o is None and r is None:
            continue
        o, r = o.detach().cpu().double(), r.detach().cpu().double()
        if o.shape != r.shape:
            raise AssertionError(f"{name}: tensor {i} has shape {tuple(o.shape)}, expected {tuple(r.shape)}")
        if not torch.isfinite(o).all():
            raise AssertionError(f"{name}: tensor {i} has non-finite values")
        if o.numel():
            err = ((o - r).abs().max() / r.abs().max().clamp_min(1e-12)).item()
            worst = max(worst, err)
            if err > LOOSE[dtype]:
                raise AssertionError(f"{name}: tensor {i} off by {err:.2e} of its scale (> {LOOSE[dtype]:.0e})")
    return worst


def run_case(make_fn, inputs, backend, device, dtype, gen):
    """make_fn(backend) -> fn(*tensors) -> tensor or tuple. Runs fn on the kernel backend (device,
    dtype) and on the float64 reference on the CPU with the same upstream gradients. Returns
    (kernel outputs + input grads, reference outputs + input grads)."""
    def forward_backward(fn, ts, grads=None):
        outs = fn(*ts)
        outs = list(outs) if isinstance(outs, tuple) else [outs]
        if grads is None:
            grads = [rand(gen, *o.shape) for o in outs]
        torch.autograd.backward(outs, [g.to(device=o.device, dtype=o.dtype) for g, o in zip(grads, outs)])
        return outs + [t.grad for t in ts], grads

    dev_in = [t.to(device=device, dtype=dtype).requires_grad_() for t in inputs]
    got, grads = forward_backward(make_fn(backend), dev_in)
    if device.type == "cuda":
        torch.cuda.synchronize()
    want, _ = forward_backward(make_fn("reference"), [t.clone().requires_grad_() for t in inputs], grads)
    return got, want


def cca_cases():
    # (N, Cqk, Cv, H, W)
    # the last: a row longer than the forward's line kernel holds in shared memory (fp16/bf16
    # 256 positions, fp32 384 on an sm_90), so the forward takes the lse + P·V fallback
    for shape in [(2, 8, 16, 13, 17), (1, 64, 64, 9, 20), (1, 8, 16, 3, 400)]:
        yield from _cca_shape_cases(*shape)


def _cca_shape_cases(N, Cqk, Cv, H, W):
    tag = f"[{N},{Cqk}/{Cv},{H},{W}]"

    def qkv(g):
        return [rand(g, N, Cqk, H, W, scale=Cqk ** -0.25), rand(g, N, Cqk, H, W, scale=Cqk ** -0.25),
                rand(g, N, Cv, H, W)]

    def residual(b):
        def fn(q, k, v, x):
            gamma = torch.tensor(0.5, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                                 device=q.device)
            return armnet_ops.criss_cross_attention(q, k, v, gamma=gamma, residual=x, backend=b)
        return fn

    yield (f"criss_cross_attention {tag}", qkv,
           lambda b: (lambda q, k, v: armnet_ops.criss_cross_attention(q, k, v, scale=0.7, backend=b)))
    yield f"criss_cross_attention residual {tag}", lambda g: qkv(g) + [rand(g, N, Cv, H, W)], residual
    yield (f"cca_weight {tag}", lambda g: qkv(g)[:2],
           lambda b: (lambda q, k: armnet_ops.cca_weight(q, k, backend=b)))
    yield (f"cca_map {tag}", lambda g: [torch.softmax(rand(g, N, H + W - 1, H, W), 1), rand(g, N, Cv, H, W)],
           lambda b: (lambda a, v: armnet_ops.cca_map(a, v, backend=b)))


def carafe_cases():
    # (N, C, H, W, k, G, s): s = 1..3 compile-time, 5 run-time; 5²·4² taps × 32 lanes × 4 bytes
    # = 51200 bytes of staged masks, past the default 48 KiB.
    for N, C, H, W, k, G, s in [(2, 64, 7, 37, 5, 1, 2), (1, 12, 5, 6, 3, 3, 1), (1, 8, 4, 5, 3, 2, 3),
                                (1, 4, 3, 4, 3, 1, 5), (1, 8, 5, 9, 5, 1, 4)]:
        tag = f"[{N},{C},{H},{W}] k={k} G={G} s={s}"

        def masks(g, N=N, G=G, k=k, s=s, H=H, W=W):
            return torch.softmax(rand(g, N, G, k * k, s * H, s * W), 2).reshape(N, G * k * k, s * H, s * W)

        yield (f"carafe {tag}", lambda g, N=N, C=C, H=H, W=W, m=masks: [rand(g, N, C, H, W), m(g)],
               lambda b, k=k, G=G, s=s: (lambda f, m: armnet_ops.carafe(f, m, k, G, s, backend=b)))
        yield (f"carafe_fused {tag}",
               lambda g, N=N, C=C, H=H, W=W, k=k, G=G, s=s: [rand(g, N, C, H, W), rand(g, N, G * k * k * s * s, H, W)],
               lambda b, k=k, G=G, s=s: (lambda f, lg: armnet_ops.carafe_fused(f, lg, k, G, s, backend=b)))

    # grad_out as a view one element into a buffer: the backward must copy it to aligned memory.
    def misaligned_grad(b):
        def fn(f, lg):
            out = armnet_ops.carafe_fused(f, lg, 5, 1, 2, backend=b)
            buf = torch.zeros(out.numel() + 1, dtype=out.dtype, device=out.device)
            view = buf[1:].view_as(out)
            return _OddOffsetGrad.apply(out, view)
        return fn

    yield ("carafe_fused grad_out odd offset [1,8,6,33] k=5 s=2",
           lambda g: [rand(g, 1, 8, 6, 33), rand(g, 1, 100, 6, 33)], misaligned_grad)


class _OddOffsetGrad(torch.autograd.Function):
    """Identity on x whose backward hands the upstream gradient on as a view with an odd storage
    offset (the layout the CARAFE backward must realign)."""

    @staticmethod
    def forward(ctx, x, buffer_view):
        ctx.buffer_view = buffer_view
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.buffer_view.copy_(grad)
        return ctx.buffer_view, None


def dconv_cases():
    # (N, C_in, C_out, H, W, kernel, dilation, channels_last): the four wmma load variants.
    for N, Ci, Co, H, W, (kh, kw), dil, cl in [
            (2, 16, 24, 9, 11, (1, 3), (1, 2), True),    # 16-byte A and B loads
            (1, 16, 24, 10, 7, (3, 1), (3, 1), False),   # NCHW: B vectorised only
            (1, 16, 13, 7, 9, (3, 3), (2, 2), True),     # channels_last, odd C_out: A only
            (1, 5, 7, 6, 13, (5, 5), (1, 1), False)]:    # nothing vectorised
        tag = f"[{N},{Ci}->{Co},{H},{W}] {kh}x{kw} d={dil}{' cl' if cl else ''}"
        mf = torch.channels_last if cl else torch.contiguous_format

        def inputs(g, N=N, Ci=Ci, Co=Co, H=H, W=W, kh=kh, kw=kw, mf=mf):
            return [rand(g, N, Ci, H, W).contiguous(memory_format=mf),
                    rand(g, Co, Ci, kh, kw, scale=(Ci * kh * kw) ** -0.5), rand(g, Co), rand(g, Co), rand(g, Co)]

        yield (f"directional_conv2d {tag} bias+bn+relu", inputs,
               lambda b, dil=dil: (lambda x, w, bias, sc, sh: armnet_ops.directional_conv2d(
                   x, w, bias, dil, scale=sc, shift=sh, activation="relu", backend=b)))
        yield (f"directional_conv2d {tag} plain", lambda g, f=inputs: f(g)[:2],
               lambda b, dil=dil: (lambda x, w: armnet_ops.directional_conv2d(x, w, None, dil, backend=b)))
    yield ("directional_conv2d_pair [1,16->8,9,10] 1x3 d=(1,3) / 3x1 d=(3,1) cl",
           lambda g: [rand(g, 1, 16, 9, 10).contiguous(memory_format=torch.channels_last),
                      rand(g, 8, 16, 1, 3, scale=0.15), rand(g, 8, 16, 3, 1, scale=0.15),
                      rand(g, 8), rand(g, 8), rand(g, 8), rand(g, 8)],
           lambda b: (lambda x, wh, wv, bh, bv, sc, sh: armnet_ops.directional_conv2d_pair(
               x, wh, wv, bh, bv, (1, 3), (3, 1), scale_h=sc, shift_h=sh, scale_v=sc, shift_v=sh,
               activation="relu", backend=b)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", action="append", choices=["fp16", "bf16"],
                    help="16-bit dtypes besides fp32 (repeatable; default bf16; the cpu backend has none)")
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("sanitizer_cases: no CUDA device is visible", file=sys.stderr)
        return 2
    backend = "cuda" if device.type == "cuda" else "cpu"
    dtypes = [torch.float32] + ([] if backend == "cpu" else [DTYPES[d] for d in (args.dtype or ["bf16"])])
    failures, count, t0 = 0, 0, time.perf_counter()
    for name, make_inputs, make_fn in [*cca_cases(), *carafe_cases(), *dconv_cases()]:
        if args.only not in name:
            continue
        for dtype in dtypes:
            gen = torch.Generator().manual_seed(count)
            label = f"{name} {str(dtype).removeprefix('torch.')}"
            count += 1
            try:
                got, want = run_case(make_fn, make_inputs(gen), backend, device, dtype, gen)
                err = check(label, got, want, dtype)
                print(f"ok    {label}  (max rel err {err:.1e})", flush=True)
            except Exception as e:  # noqa: BLE001 - every case runs; the exit code says it failed
                failures += 1
                print(f"FAIL  {label}: {type(e).__name__}: {e}", flush=True)
    if "armnet_ops.triton" in sys.modules or any(m.startswith("armnet_ops.triton.") for m in sys.modules):
        print("FAIL  a Triton module was imported: the sanitizer run must not launch Triton kernels")
        failures += 1
    print(f"sanitizer_cases: {count} cases, {failures} failed, {time.perf_counter() - t0:.1f} s on {device.type}")
    return 1 if failures or count == 0 else 0


if __name__ == "__main__":
    sys.exit(main())

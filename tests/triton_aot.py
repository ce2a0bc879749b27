"""Ahead-of-time compiles the Triton criss-cross attention kernels for sm_90 without a GPU, and
reports what the compiled code does: tensor-core instructions, registers, spills.

    python tests/triton_aot.py [N Cqk Cv H W] [--dtype bf16] [--only _fwd_line,...]

prints one JSON line per distinct compiled kernel.

The production launches are captured, not rebuilt by hand: the op's launch code runs on "meta"
tensors (no memory, no device) with JITFunction.run replaced by a recorder, so the tiles, warps,
strides and constexprs are exactly those a GPU launch at that shape would use. Each captured
launch is specialised the way Triton's JIT does it (pointers 16-byte aligned; integer arguments
equal to 1 become constants, multiples of 16 are marked divisible by 16) and compiled with
triton.compile for GPUTarget("cuda", 90, 64). Registers and spill bytes come from ptxas -v on the
PTX (Triton's own ptxas), the instruction mix from the PTX and from the SASS (cuobjdump -sass on
the cubin). Run it without TRITON_INTERPRET (tests/test_cca_triton.py starts it in a clean
environment).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# The armnet_ops of this checkout, not an installed one (run as a script, sys.path[0] is tests/).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGET = GPUTarget("cuda", 90, 64)
_PTR_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32",
              torch.float64: "*fp64"}


def capture(fn, *args):
    """[(kernel, args, kwargs)] of every Triton launch fn(*args) makes, none of them run."""
    from triton.runtime.jit import JITFunction
    launches = []

    def record(self, *a, grid=None, warmup=False, **kw):
        launches.append((self, a, kw))

    saved = JITFunction.run
    JITFunction.run = record
    try:
        fn(*args)
    finally:
        JITFunction.run = saved
    return launches


def specialise(kernel, args, kwargs):
    """(ASTSource, options) for one captured launch, specialised as Triton's JIT would."""
    names = kernel.arg_names
    signature, constexprs, attrs = {}, {}, {}
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    for i, name in enumerate(names):
        value = values[name]
        if name in kwargs or kernel.params[i].is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = _PTR_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: argument {name} of type {type(value)}")
    options = {k: v for k, v in kwargs.items() if k not in names}
    return ASTSource(kernel, signature, constexprs, attrs), options


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def inspect_kernel(kernel, args, kwargs) -> dict:
    """Compiles one launch for sm_90 and reads its PTX, ptxas -v and SASS."""
    src, options = specialise(kernel, args, kwargs)
    compiled = triton.compile(src, target=TARGET, options=options)
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = os.path.join(tmp, "k.ptx")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
        verbose = subprocess.run([_tool("ptxas"), f"-arch={arch}", "-v", ptx_path, "-o",
                                  os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True, check=True).stderr
        cubin_path = os.path.join(tmp, "k2.cubin")
        with open(cubin_path, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin_path], capture_output=True,
                              text=True, check=True).stdout

    def number(pattern):
        m = re.search(pattern, verbose)
        return int(m.group(1)) if m else None

    constants = {k: v for k, v in kwargs.items() if k in kernel.arg_names}
    return {
        "kernel": kernel.__name__,
        "constexprs": {k: str(v) for k, v in constants.items()},
        "num_warps": options.get("num_warps"),
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "stack_frame": number(r"(\d+) bytes stack frame"),
        "ptx_wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),
        "ptx_mma": len(re.findall(r"\bmma\.sync", ptx)),
        "ptx_local": len(re.findall(r"\b(?:ld|st)\.local", ptx)),
        "ptx_cp_async": len(re.findall(r"\bcp\.async", ptx)),
        "sass_hgmma": len(re.findall(r"\bHGMMA\b", sass)),
        "sass_hmma": len(re.findall(r"\bHMMA\b", sass)),
        "sass_local": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        "shared_bytes": compiled.metadata.shared,
    }


def launches(shape=(2, 64, 512, 97, 97), dtype=torch.bfloat16, backward=True, two_op=False):
    """The captured launches of the fused forward (and backward), plain and residual, or of the
    two-op API."""
    from armnet_ops.triton import cca
    N, D, CV, H, W = shape
    meta = dict(device="meta", dtype=dtype)
    q, k = torch.empty(N, D, H, W, **meta), torch.empty(N, D, H, W, **meta)
    v = torch.empty(N, CV, H, W, **meta)
    out = torch.empty(N, CV, H, W, **meta)
    lse = torch.empty(N, H, W, device="meta", dtype=torch.float32)
    if two_op:
        energy = torch.empty(N, H + W - 1, H, W, **meta)
        found = capture(cca._pair, q, k, energy)                      # cca_weight
        found += capture(cca._aggregate, energy, v, False, dtype)    # cca_map
        found += capture(cca._aggregate, energy, out, True, dtype)   # its grad v (transposed)
        return found
    gamma = torch.empty(1, device="meta", dtype=torch.float32)
    found = capture(cca._forward, q, k, v, 1.0)
    found += capture(cca._forward, q, k, v, 1.0, out, gamma)      # the residual block
    if backward:
        found += capture(cca._backward, out, q, k, v, out, lse, 1.0)
        found += capture(cca._backward, out, q, k, v, out, lse, 1.0, gamma)
    return found


def main(argv):
    """argv: [N Cqk Cv H W] [--dtype bf16|fp16|fp32] [--only kernel,kernel]; one JSON line per
    distinct compiled kernel (name and constexprs)."""
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("shape", nargs="*", type=int, default=[2, 64, 512, 97, 97])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--only", default="", help="comma-separated kernel names")
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    only = set(filter(None, args.only.split(",")))
    seen = set()
    found = launches(tuple(args.shape), dtype) + launches(tuple(args.shape), dtype, two_op=True)
    for kernel, a, kw in found:
        key = json.dumps([kernel.__name__, {k: str(v) for k, v in kw.items()}], sort_keys=True)
        if key in seen or (only and kernel.__name__ not in only):
            continue
        seen.add(key)
        print(json.dumps(inspect_kernel(kernel, a, kw)), flush=True)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("triton_aot.py: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
    main(sys.argv[1:])

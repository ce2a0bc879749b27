"""Times every available backend of each armnet_ops op against its reference.

    python benchmarks/ops.py                  # all ops, full grid, on the GPU if there is one
    python benchmarks/ops.py --quick          # a small grid that runs on a CPU in a few minutes
    python benchmarks/ops.py --op cca --dtype bf16

For each shape, dtype and backend: forward and forward+backward time (median; CUDA events via
triton.testing.do_bench on a GPU, a wall clock on the CPU) and the peak memory one
forward+backward adds on top of its inputs (the CUDA allocator's peak on a GPU; on a CPU the
growth of the peak resident set of a fresh process, measured with the kernel's high-water mark).
CARAFE rows also give the forward's achieved bandwidth, counting features + logits/masks +
output once. Prints a table and writes benchmarks/results/ops_<device>[_quick].json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import armnet_ops
from armnet_ops.info import SPECS
from common import environment, print_table, time_ms, write_results

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp64": torch.float64}


@dataclass
class Case:
    op: str
    label: str
    shape: dict

    def inputs(self, device, dtype, backend=None):
        """(positional args, keyword args) of the public function, fresh leaves with grads."""
        s = self.shape
        g = torch.Generator(device="cpu").manual_seed(0)

        def rand(*shape, scale=1.0, channels_last=False):
            t = (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
            if channels_last:
                t = t.contiguous(memory_format=torch.channels_last)
            return t.requires_grad_()

        if self.op == "criss_cross_attention":
            N, C, Cqk, H, W = s["N"], s["C"], s["Cqk"], s["H"], s["W"]
            # Scaled like CCNet's projections so the softmax is neither flat nor one-hot.
            return (rand(N, Cqk, H, W, scale=Cqk ** -0.25), rand(N, Cqk, H, W, scale=Cqk ** -0.25),
                    rand(N, C, H, W)), {}
        if self.op in ("carafe", "carafe_fused"):
            N, C, H, W, k, G, sf = s["N"], s["C"], s["H"], s["W"], s["k"], s["G"], s["s"]
            f = rand(N, C, H, W)
            if self.op == "carafe_fused":
                return (f, rand(N, G * k * k * sf * sf, H, W), k, G, sf), {}
            m = torch.softmax(torch.randn(N, G, k * k, sf * H, sf * W, generator=g), 2)
            m = m.reshape(N, G * k * k, sf * H, sf * W).to(device=device, dtype=dtype).requires_grad_()
            return (f, m, k, G, sf), {}
        if self.op == "directional_conv2d":
            N, C, Co, H, W = s["N"], s["C"], s["Co"], s["H"], s["W"]
            kh, kw, d = s["kh"], s["kw"], s["dilation"]
            cl = s.get("channels_last", False)
            x = rand(N, C, H, W, channels_last=cl)
            w = rand(Co, C, kh, kw, scale=(C * kh * kw) ** -0.5, channels_last=cl)
            return (x, w, rand(Co), d), dict(scale=rand(Co), shift=rand(Co), activation="relu")
        raise ValueError(self.op)

    def bytes_moved(self, dtype) -> int | None:
        """Fewest bytes a CARAFE forward must move: features + masks or logits + output."""
        if self.op not in ("carafe", "carafe_fused"):
            return None
        s = self.shape
        N, C, H, W, k, G, sf = s["N"], s["C"], s["H"], s["W"], s["k"], s["G"], s["s"]
        masks = N * G * k * k * sf * sf * H * W
        return (N * C * H * W + masks + N * C * H * W * sf * sf) * torch.finfo(dtype).bits // 8


def conv_only(x, w, bias, dilation, **_):
    """cuDNN's (or ATen's) convolution alone, the floor the fused kernel is held to."""
    kh, kw = w.shape[-2:]
    return F.conv2d(x, w, bias, padding=(dilation[0] * (kh - 1) // 2, dilation[1] * (kw - 1) // 2),
                    dilation=dilation)


def run_backend(case: Case, backend: str, args, kwargs):
    if backend == "conv_only":
        return conv_only(*args, **kwargs)
    return getattr(armnet_ops, case.op)(*args, **kwargs, backend=backend)


def cases(quick: bool, device: torch.device, only: set[str]) -> list[Case]:
    out = []
    if "cca" in only:
        shapes = ([dict(N=1, C=64, Cqk=8, H=64, W=64)] if quick else
                  [dict(N=2, C=512, Cqk=64, H=97, W=97), dict(N=1, C=512, Cqk=64, H=64, W=64),
                   dict(N=8, C=512, Cqk=64, H=128, W=128), dict(N=2, C=256, Cqk=32, H=256, W=256)])
        out += [Case("criss_cross_attention", f"[{s['N']},{s['C']},{s['H']},{s['W']}] Cqk={s['Cqk']}", s)
                for s in shapes]
    if "carafe" in only:
        shapes = ([dict(N=1, C=64, H=64, W=64, k=5, G=1, s=2)] if quick else
                  [dict(N=2, C=256, H=64, W=64, k=5, G=1, s=2),
                   dict(N=4, C=128, H=128, W=128, k=5, G=1, s=2),
                   dict(N=2, C=64, H=128, W=128, k=5, G=4, s=4)])
        for op in ("carafe_fused", "carafe"):
            out += [Case(op, f"[{s['N']},{s['C']},{s['H']},{s['W']}] k={s['k']} G={s['G']} s={s['s']}", s)
                    for s in shapes]
    if "dconv" in only:
        if quick:
            grid = [dict(N=1, C=64, Co=64, H=64, W=64, kh=1, kw=3, dilation=(1, 2)),
                    dict(N=1, C=64, Co=64, H=64, W=64, kh=3, kw=1, dilation=(6, 1))]
        else:
            grid = [dict(N=N, C=C, Co=C, H=H, W=H, kh=3, kw=3, dilation=dil, channels_last=cl)
                    for N in (1, 8) for C in (512, 256) for H in (64, 128)
                    for d in (1, 2, 3, 6) for dil in ((1, d), (d, 1)) for cl in (True, False)]
        out += [Case("directional_conv2d",
                     f"[{s['N']},{s['C']},{s['H']},{s['W']}] {s['kh']}x{s['kw']} d={s['dilation']}"
                     + (" cl" if s.get("channels_last") else ""), s) for s in grid]
    return out


def backends_for(case: Case, device: torch.device, dtype) -> list[str]:
    """The reference first (speedups are against it), then conv_only for the convolution, then
    every kernel backend built here that supports the dtype."""
    names = [b for b in armnet_ops.available_backends(case.op, device) if dtype in SPECS[case.op].dtypes[b]]
    if case.op == "directional_conv2d":
        names.insert(1, "conv_only")
    return names


def peak_memory_mib(case: Case, backend: str, device: torch.device, dtype) -> float | None:
    """Extra peak memory of one forward+backward beyond the inputs."""
    if device.type == "cuda":
        args, kwargs = case.inputs(device, dtype)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = run_backend(case, backend, args, kwargs)
        out.backward(torch.ones_like(out))
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    # A fresh process with a fixed mmap threshold, so freed blocks go back to the kernel and the
    # high-water mark of the resident set sees this run's allocations alone.
    spec = json.dumps(dict(op=case.op, label=case.label, shape=case.shape, backend=backend,
                           dtype=str(dtype).replace("torch.", "")))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child-memory", spec],
                         capture_output=True, text=True, env=env)
    if res.returncode != 0:
        print(res.stderr[-2000:], file=sys.stderr)
        return None
    return float(res.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def child_memory(spec_json: str) -> None:
    spec = json.loads(spec_json)
    shape = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["shape"].items()}
    case = Case(spec["op"], spec["label"], shape)
    dtype = getattr(torch, spec["dtype"])
    args, kwargs = case.inputs(torch.device("cpu"), dtype)
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    before = _status_kib("VmRSS")
    out = run_backend(case, spec["backend"], args, kwargs)
    out.backward(torch.ones_like(out))
    print((_status_kib("VmHWM") - before) / 1024)


def measure(case: Case, backend: str, device: torch.device, dtype) -> dict:
    args, kwargs = case.inputs(device, dtype)
    leaves = [a for a in args + tuple(kwargs.values()) if isinstance(a, torch.Tensor)]
    # CPU wall clocks are noisy (thread start-up, first-touch of fresh buffers): more runs and a
    # floor of a second of them, median taken.
    reps, min_seconds = (10, 1.0) if device.type == "cpu" else (20, 0.0)

    def forward():
        with torch.no_grad():
            return run_backend(case, backend, args, kwargs)

    out = run_backend(case, backend, args, kwargs)
    grad = torch.randn_like(out)

    def forward_backward():
        for t in leaves:
            t.grad = None
        run_backend(case, backend, args, kwargs).backward(grad)

    fwd = time_ms(forward, device, warmup=3, reps=reps, min_seconds=min_seconds)
    fwd_bwd = time_ms(forward_backward, device, warmup=3, reps=reps, min_seconds=min_seconds)
    row = dict(op=case.op, shape=case.label, dtype=str(dtype).replace("torch.", ""), backend=backend,
               fwd_ms=round(fwd, 4), fwd_bwd_ms=round(fwd_bwd, 4),
               peak_extra_mib=None)
    mem = peak_memory_mib(case, backend, device, dtype)
    row["peak_extra_mib"] = None if mem is None else round(mem, 2)
    nbytes = case.bytes_moved(dtype)
    if nbytes is not None:
        row["fwd_gb_per_s"] = round(nbytes / (fwd * 1e-3) / 1e9, 2)
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", choices=["cca", "carafe", "dconv", "all"], default="all")
    p.add_argument("--dtype", choices=list(DTYPES), action="append",
                   help="repeatable; default fp32 on CPU, fp32/fp16/bf16 on GPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a small grid for CPUs")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--child-memory", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child_memory:
        return child_memory(a.child_memory)

    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtypes = [DTYPES[d] for d in a.dtype] if a.dtype else (
        [torch.float32] if device.type == "cpu" else [torch.float32, torch.float16, torch.bfloat16])
    only = {"cca", "carafe", "dconv"} if a.op == "all" else {a.op}
    rows = []
    print("  ".join(COLUMNS))
    for case in cases(a.quick, device, only):
        for dtype in dtypes:
            base = None
            for backend in backends_for(case, device, dtype):
                row = measure(case, backend, device, dtype)
                if backend == "reference":
                    base = row
                if base is not None:
                    row["fwd_speedup"] = round(base["fwd_ms"] / row["fwd_ms"], 2)
                    row["fwd_bwd_speedup"] = round(base["fwd_bwd_ms"] / row["fwd_bwd_ms"], 2)
                rows.append(row)
                print("  ".join(str(row.get(c, "")) for c in COLUMNS), flush=True)
    env = environment(device)
    name = f"ops_{device.type}" + ("" if device.type == "cpu" else "_" + env["device"].replace(" ", "-"))
    name += "_quick" if a.quick else ""
    if a.op != "all":
        name += f"_{a.op}"
    path = write_results(name, dict(environment=env, argv=sys.argv[1:], rows=rows))
    print()
    print_table(rows, COLUMNS)
    print(f"\nwrote {os.path.relpath(path)}")


# Speedups are against the reference; for the convolution that is conv + epilogue, unfused.
COLUMNS = ["op", "shape", "dtype", "backend", "fwd_ms", "fwd_bwd_ms", "fwd_speedup",
           "fwd_bwd_speedup", "peak_extra_mib", "fwd_gb_per_s"]

if __name__ == "__main__":
    main()

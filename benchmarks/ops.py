"""Times every available backend of each armnet_ops op against its reference.

    python benchmarks/ops.py                  # all ops, full grid, on the GPU if there is one
    python benchmarks/ops.py --quick          # a small grid that runs on a CPU in a few minutes
    python benchmarks/ops.py --op cca --dtype bf16
    python benchmarks/ops.py --smoke --json /tmp/ops.json   # tiny shapes, seconds (dry runs)
    python benchmarks/ops.py --quick --plot speedups.png      # also a PNG (needs matplotlib)

For each shape, dtype and backend: forward and forward+backward time (median; CUDA events via
triton.testing.do_bench on a GPU, a wall clock on the CPU, where the backends of a shape are
timed in alternating rounds so that their ratios see the same machine) and the peak memory one
forward+backward adds on top of its inputs (the CUDA allocator's peak on a GPU; on a CPU the
growth of the peak resident set of a fresh process, measured with the kernel's high-water mark).

Criss-cross attention is also timed as `einsum`: our transcription of the formulation mmcv ships
since 1.3.13 (the peer a user would otherwise run), and every criss-cross row records its ratio
to the einsum row of the same run (`vs_einsum_*`, > 1 is faster). CARAFE rows give the forward's
achieved bandwidth, counting features + logits/masks + output once. Directional-conv rows say
which backend `auto` picks for that dtype and device. Prints a table and writes
benchmarks/results/ops_<device>[_quick].json (or --json PATH).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass

# The checkout's package first: the GPU check builds the extension in place and installs nothing.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import armnet_ops  # noqa: E402
from armnet_ops import _backend  # noqa: E402
from armnet_ops.info import SPECS  # noqa: E402
from common import (RESULTS, environment, median_of_rounds, paired_ratio_quartiles,  # noqa: E402
                    print_table, time_ms_interleaved, time_rounds_interleaved, write_json)
from traffic import cca_cuda_traffic  # noqa: E402
from traffic_triton import cca_triton_traffic  # noqa: E402

TRAFFIC = {"cuda": cca_cuda_traffic, "triton": cca_triton_traffic}

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
            cl = s.get("channels_last", False)
            return (rand(N, Cqk, H, W, scale=Cqk ** -0.25, channels_last=cl),
                    rand(N, Cqk, H, W, scale=Cqk ** -0.25, channels_last=cl),
                    rand(N, C, H, W, channels_last=cl)), {}
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


def cca_einsum(q, k, v, scale: float = 1.0):
    """Criss-cross attention as mmcv (>= 1.3.13) computes it: two einsums for the column and row
    energies, -inf on the column's diagonal (the pixel itself, already a row key), one softmax
    over the H + W keys, two einsums for the output. Same semantics as the op (SPEC §3.1)."""
    H = q.shape[2]
    self_key = torch.full((H, H), 0.0, dtype=q.dtype, device=q.device).fill_diagonal_(float("-inf"))
    energy_col = torch.einsum("nchw,nciw->nhwi", q, k) * scale + self_key[:, None, :]
    energy_row = torch.einsum("nchw,nchj->nhwj", q, k) * scale
    attn = torch.softmax(torch.cat([energy_col, energy_row], dim=-1), dim=-1)
    out = torch.einsum("nciw,nhwi->nchw", v, attn[..., :H])
    return out + torch.einsum("nchj,nhwj->nchw", v, attn[..., H:])


def run_backend(case: Case, backend: str, args, kwargs):
    if backend == "conv_only":
        return conv_only(*args, **kwargs)
    if backend == "einsum":
        return cca_einsum(*args, **kwargs)
    return getattr(armnet_ops, case.op)(*args, **kwargs, backend=backend)


# (N, Cqk, Cv, H, W) of criss-cross attention (SPEC §5): ARM-Net R50 at 512², CCNet/mmcv's
# benchmark, CCNet on a 1024x2048 Cityscapes image; the first is a toy shape kept from the
# first grid.
CCA_TOY = (1, 8, 64, 64, 64)
CCA_USERS = [(1, 64, 512, 64, 64), (2, 64, 512, 97, 97)]
CCA_GPU = [(2, 64, 512, 97, 97), (1, 64, 512, 64, 64), (1, 64, 512, 128, 256)]


def cases(grid: str, device: torch.device, only: set[str]) -> list[Case]:
    """grid: "quick" (a CPU in minutes), "full", or "smoke" (tiny shapes: dry runs)."""
    smoke, quick = grid == "smoke", grid == "quick"
    out = []
    if "cca" in only:
        if smoke:
            shapes = [(1, 4, 8, 8, 12)]
        elif device.type == "cuda":
            shapes = CCA_GPU
        else:
            shapes = [CCA_TOY] + CCA_USERS
        # Also in channels_last where the GPU kernels read it in place: what CrissCrossAttention's
        # projections hand the op (the NCHW rows include the transposes to NHWC). Last, so that a
        # time-boxed GPU check measures the NCHW grid first.
        layouts = [(shape, False) for shape in shapes]
        if smoke or device.type == "cuda":
            layouts.append((shapes[0], True))
        out += [Case("criss_cross_attention",
                     f"[{N},{Cv},{H},{W}] Cqk={Cqk}" + (" cl" if cl else ""),
                     dict(N=N, C=Cv, Cqk=Cqk, H=H, W=W, channels_last=cl))
                for (N, Cqk, Cv, H, W), cl in layouts]
    if "carafe" in only:
        shapes = ([dict(N=1, C=8, H=8, W=8, k=3, G=1, s=2)] if smoke else
                  [dict(N=1, C=64, H=64, W=64, k=5, G=1, s=2),      # toy
                   dict(N=1, C=256, H=64, W=64, k=5, G=1, s=2)] if quick else  # ARM-Net R50 DPD
                  [dict(N=2, C=256, H=64, W=64, k=5, G=1, s=2),
                   dict(N=4, C=128, H=128, W=128, k=5, G=1, s=2),
                   dict(N=2, C=64, H=128, W=128, k=5, G=4, s=4)])
        for op in ("carafe_fused", "carafe"):
            out += [Case(op, f"[{s['N']},{s['C']},{s['H']},{s['W']}] k={s['k']} G={s['G']} s={s['s']}", s)
                    for s in shapes]
    if "dconv" in only:
        if smoke:
            grid_ = [dict(N=1, C=8, Co=8, H=16, W=16, kh=1, kw=3, dilation=(1, 2))]
        elif quick:
            # toy shapes, then ARM-Net R50's DTM at 512² (64x64 features, 3x3 kernels: the
            # first stage 512 -> 256 channels, the later ones 256 -> 256)
            grid_ = [dict(N=1, C=64, Co=64, H=64, W=64, kh=1, kw=3, dilation=(1, 2)),
                     dict(N=1, C=64, Co=64, H=64, W=64, kh=3, kw=1, dilation=(6, 1)),
                     dict(N=1, C=512, Co=256, H=64, W=64, kh=3, kw=3, dilation=(1, 1)),
                     dict(N=1, C=256, Co=256, H=64, W=64, kh=3, kw=3, dilation=(6, 1))]
        else:
            grid_ = [dict(N=N, C=C, Co=C, H=H, W=H, kh=3, kw=3, dilation=dil, channels_last=cl)
                     for N in (1, 8) for C in (512, 256) for H in (64, 128)
                     for d in (1, 2, 3, 6) for dil in ((1, d), (d, 1)) for cl in (True, False)]
        out += [Case("directional_conv2d",
                     f"[{s['N']},{s['C']},{s['H']},{s['W']}]"
                     + (f"->{s['Co']}" if s["Co"] != s["C"] else "")
                     + f" {s['kh']}x{s['kw']} d={s['dilation']}"
                     + (" cl" if s.get("channels_last") else ""), s) for s in grid_]
    return out


def backends_for(case: Case, device: torch.device, dtype) -> list[str]:
    """The reference first (speedups are against it), then conv_only for the convolution, then
    every kernel backend built here that supports the dtype."""
    names = [b for b in armnet_ops.available_backends(case.op, device) if dtype in SPECS[case.op].dtypes[b]]
    if case.op == "directional_conv2d":
        names.insert(1, "conv_only")
    if case.op == "criss_cross_attention":
        names.insert(1, "einsum")
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


def _timed(case: Case, backend: str, device: torch.device, dtype):
    """(forward, forward_backward): the two closures timed for one backend, on inputs of its own."""
    args, kwargs = case.inputs(device, dtype)
    leaves = [a for a in args + tuple(kwargs.values()) if isinstance(a, torch.Tensor)]

    def forward():
        with torch.no_grad():
            return run_backend(case, backend, args, kwargs)

    out = run_backend(case, backend, args, kwargs)
    grad = torch.randn_like(out)

    def forward_backward():
        for t in leaves:
            t.grad = None
        run_backend(case, backend, args, kwargs).backward(grad)

    return forward, forward_backward


def measure(case: Case, backends: list[str], device: torch.device, dtype,
            smoke: bool = False) -> list[dict]:
    """The rows of one shape and dtype, one per backend. The backends are timed in alternation
    (time_rounds_interleaved on a CPU), so that their ratios, the speed-ups, are measured under
    the same machine conditions; on a CPU the criss-cross rows also record the quartiles of their
    ratio to the einsum round by round (`*_vs_einsum_q1_q3`), the spread behind the median."""
    # CPU wall clocks are noisy (thread start-up, first-touch of fresh buffers): more runs and a
    # floor of a second of them, median taken. On a CPU every round runs each backend once (or
    # for 1/20 s): a VM's speed drifts within seconds, and at (2, 64, 512, 97, 97) five rounds of
    # two calls each left the einsum's median 15 % apart between runs. A smoke run only checks
    # that everything runs.
    reps, min_seconds = (20, 1.0) if device.type == "cpu" else (20, 0.0)
    if smoke:
        reps, min_seconds = 2, 0.0
    closures = {b: _timed(case, b, device, dtype) for b in backends}
    timing = dict(warmup=1 if smoke else 3, reps=reps, min_seconds=min_seconds,
                  rounds=1 if smoke else (reps if device.type == "cpu" else 5))
    fns = [{b: c[i] for b, c in closures.items()} for i in (0, 1)]  # forward, forward+backward
    del closures
    per_round = None
    if device.type == "cpu":
        per_round = [time_rounds_interleaved(f, **timing) for f in fns]
        fwd, fwd_bwd = ({b: median_of_rounds(r) for b, r in pr.items()} for pr in per_round)
    else:
        fwd, fwd_bwd = (time_ms_interleaved(f, device, **timing) for f in fns)
    del fns  # the inputs and outputs of every backend, before the memory measurements of _row
    rows = [_row(case, b, device, dtype, fwd[b], fwd_bwd[b], smoke) for b in backends]
    if per_round is not None and "einsum" in backends:  # the einsum's ratio round by round
        for row in rows:
            for key, pr in zip(("fwd", "fwd_bwd"), per_round):
                row[f"{key}_vs_einsum_q1_q3"] = paired_ratio_quartiles(pr["einsum"],
                                                                       pr[row["backend"]])
    return rows


def _row(case: Case, backend: str, device: torch.device, dtype, fwd: float, fwd_bwd: float,
         smoke: bool) -> dict:
    row = dict(op=case.op, shape=case.label, dtype=str(dtype).replace("torch.", ""), backend=backend,
               fwd_ms=round(fwd, 4), fwd_bwd_ms=round(fwd_bwd, 4),
               peak_extra_mib=None)
    # A smoke run skips the memory measurement: on a CPU it is a fresh process per row.
    mem = None if smoke else peak_memory_mib(case, backend, device, dtype)
    row["peak_extra_mib"] = None if mem is None else round(mem, 2)
    nbytes = case.bytes_moved(dtype)
    if nbytes is not None:
        row["fwd_gb_per_s"] = round(nbytes / (fwd * 1e-3) / 1e9, 2)
    if case.op == "directional_conv2d":
        row["auto_picks"] = _backend.select(case.op, "auto", device.type, dtype)
    model = TRAFFIC.get(backend) if case.op == "criss_cross_attention" and device.type == "cuda" else None
    if model is not None:
        # The forward's traffic model (the kernels' header comments) against the minimum: inputs
        # read once, output written once. For NCHW inputs the model counts the transposes to NHWC.
        s = case.shape
        t = model(s["N"], s["Cqk"], s["C"], s["H"], s["W"], torch.finfo(dtype).bits // 8,
                  channels_last=s.get("channels_last", False))
        row["fwd_traffic_mb"] = round(t["bytes"] / 1e6, 1)
        row["fwd_traffic_vs_min"] = round(t["ratio"], 2)
        row["fwd_model_gb_per_s"] = round(t["bytes"] / (fwd * 1e-3) / 1e9, 1)
    return row


def add_ratios(rows: list[dict]) -> None:
    """Speed-ups of each row against the reference row and, for criss-cross attention, against
    the einsum row of the same shape and dtype (both measured in this run)."""
    for peer, suffix in (("reference", "speedup"), ("einsum", "vs_einsum")):
        base = {(r["op"], r["shape"], r["dtype"]): r for r in rows if r["backend"] == peer}
        for r in rows:
            b = base.get((r["op"], r["shape"], r["dtype"]))
            if b is not None:
                r[f"fwd_{suffix}"] = round(b["fwd_ms"] / r["fwd_ms"], 2)
                r[f"fwd_bwd_{suffix}"] = round(b["fwd_bwd_ms"] / r["fwd_bwd_ms"], 2)


def plot(rows: list[dict], path: str) -> None:
    """One panel per op: forward and forward+backward speed-up of each backend per shape and
    dtype, against the einsum for criss-cross attention and the reference otherwise."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(f"--plot needs matplotlib (pip install matplotlib): {e}")
    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(len(ops), 1, figsize=(10, 3.2 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        suffix = "vs_einsum" if op == "criss_cross_attention" else "speedup"
        peer = "einsum" if op == "criss_cross_attention" else "reference"
        mine = [r for r in rows if r["op"] == op and f"fwd_{suffix}" in r and r["backend"] != peer]
        groups = list(dict.fromkeys(f"{r['shape']}\n{r['dtype']}" for r in mine))
        backends = list(dict.fromkeys(r["backend"] for r in mine))
        width = 0.8 / max(1, 2 * len(backends))
        for i, b in enumerate(backends):
            for j, (key, hatch) in enumerate(((f"fwd_{suffix}", ""), (f"fwd_bwd_{suffix}", "//"))):
                xs, ys = [], []
                for r in mine:
                    if r["backend"] == b:
                        xs.append(groups.index(f"{r['shape']}\n{r['dtype']}") + (2 * i + j) * width)
                        ys.append(r[key])
                ax.bar(xs, ys, width, hatch=hatch, color=f"C{i}",
                       label=f"{b} {'fwd' if j == 0 else 'fwd+bwd'}")
        ax.set_yscale("log")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, fontsize=7)
        ax.set_ylabel(f"speed-up vs {peer}")
        ax.set_title(op)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", choices=["cca", "carafe", "dconv", "all"], default="all")
    p.add_argument("--dtype", choices=list(DTYPES), action="append",
                   help="repeatable; default fp32 on CPU, fp32/fp16/bf16 on GPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    grid = p.add_mutually_exclusive_group()
    grid.add_argument("--quick", action="store_true", help="a small grid for CPUs")
    grid.add_argument("--smoke", action="store_true",
                      help="tiny shapes and few repetitions: checks that every row runs (dry runs)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", default=None, help="output file (default: benchmarks/results/...)")
    p.add_argument("--plot", default=None, metavar="PNG", help="also write a PNG of the speed-ups")
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
    grid = "smoke" if a.smoke else "quick" if a.quick else "full"
    env = environment(device)
    if a.json:
        path = a.json
    else:
        name = f"ops_{device.type}" + ("" if device.type == "cpu" else "_" + env["device"].replace(" ", "-"))
        name += {"quick": "_quick", "smoke": "_smoke", "full": ""}[grid]
        if a.op != "all":
            name += f"_{a.op}"
        path = os.path.join(RESULTS, name + ".json")
    args = sys.argv[1:] if argv is None else list(argv)
    rows = []
    print("  ".join(COLUMNS))
    for case in cases(grid, device, only):
        for dtype in dtypes:
            shape_rows = measure(case, backends_for(case, device, dtype), device, dtype,
                                 smoke=a.smoke)
            rows += shape_rows
            add_ratios(rows)
            for row in shape_rows:
                print("  ".join(str(row.get(c, "")) for c in COLUMNS), flush=True)
            # Written after every shape, so that a run stopped by a time cap keeps its rows.
            write_json(path, dict(environment=env, argv=args, complete=False, rows=rows))
    write_json(path, dict(environment=env, argv=args, complete=True, rows=rows))
    print()
    print_table(rows, COLUMNS)
    print(f"\nwrote {os.path.relpath(path)}")
    if a.plot:
        plot(rows, a.plot)


# Speed-ups are against the reference (for the convolution: conv + epilogue, unfused) and, for
# criss-cross attention, against the einsum formulation.
COLUMNS = ["op", "shape", "dtype", "backend", "fwd_ms", "fwd_bwd_ms", "fwd_speedup",
           "fwd_bwd_speedup", "fwd_vs_einsum", "fwd_bwd_vs_einsum", "peak_extra_mib",
           "fwd_gb_per_s", "auto_picks", "fwd_traffic_mb", "fwd_traffic_vs_min"]

if __name__ == "__main__":
    main()

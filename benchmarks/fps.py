"""ARM-Net inference throughput (frames per second).

    python benchmarks/fps.py                                   # armnet_r50, 512×512, batch 1
    python benchmarks/fps.py --ops-backend both --dtype bf16 --channels-last --compile
    python benchmarks/fps.py --cuda-graphs --batch 4 --resolution 640 640
    python benchmarks/fps.py --model armnet_tiny --engine eager onnxruntime aoti --threads 2

Defaults: the device present (CUDA, else CPU); dtype bf16 on CUDA and fp32 on CPU (the model and
input are cast, not autocast); warm-up 10 / timed 50 iterations on CUDA, 1 / 2 on CPU so the
default run stays under 2 minutes on a small CPU. Every timed iteration is bracketed by device
synchronisation (CUDA: torch.cuda.synchronize()), so a time is the whole forward pass.
`--ops-backend both` runs armnet_ops' kernels ("auto") and the pure-PyTorch "reference" ops one
after the other on the same weights and reports the speed-up. `--engine` runs the same model
(same weights, resolution, batch and threads) in eager PyTorch, in ONNX Runtime (CPU execution
provider, the model exported by armnet/export.py at fixed shapes) and as an AOTInductor package;
export and compilation happen before the warm-up and are not timed.

Prints a table and writes JSON to benchmarks/results/fps_<device>_<UTC time>.json (or --json):
device, versions (torch, triton, python, armnet_ops and the backends it resolved), git commit,
date, options and the raw per-iteration times.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402

from common import environment, synchronize, write_json  # noqa: E402

ENGINES = ("eager", "onnxruntime", "aoti")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolved_backends(device: torch.device, dtype: torch.dtype, requested: str) -> dict:
    """Which backend each op runs on for `requested` (what "auto" picked)."""
    from armnet_ops._backend import SPECS, resolve
    out = {}
    for name in ("criss_cross_attention", "carafe_fused", "directional_conv2d"):
        try:
            out[name] = resolve(SPECS[name], requested, device, dtype)
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            out[name] = f"error: {e}"
    return out


def build(args, backend: str, device: torch.device, dtype: torch.dtype, state=None):
    from armnet import build_model
    model = build_model(args.model, ops_backend=backend)
    if state is not None:
        model.load_state_dict(state)
    model = model.to(device=device, dtype=dtype).eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def engine_forward(args, engine: str, model, x):
    """forward(x) -> logits on `engine`: eager, or the model exported at x's shape."""
    if engine == "eager":
        return lambda inp: model(inp)["logits"]
    from armnet.export import LogitsOnly, export_aoti, export_onnx, load_aoti
    folder = tempfile.mkdtemp(prefix="armnet_fps_")
    if engine == "onnxruntime":
        from armnet.onnx_infer import OnnxSegmenter
        path = os.path.join(folder, "model.onnx")
        export_onnx(LogitsOnly(model), x, path, dynamic=False)
        seg = OnnxSegmenter(path, args.threads)
        feed = {seg.input_name: x.numpy()}
        return lambda inp: seg.session.run(None, feed)
    path = os.path.join(folder, "model.pt2")
    export_aoti(LogitsOnly(model), x, path, dynamic=False)
    return load_aoti(path)


def time_one(args, backend: str, device: torch.device, dtype: torch.dtype, state,
             engine: str = "eager") -> dict:
    model = build(args, backend, device, dtype, state)
    h, w = args.resolution
    x = torch.randn(args.batch, 3, h, w, device=device, dtype=dtype)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    fn = engine_forward(args, engine, model, x)
    if args.compile:
        fn = torch.compile(forward, mode=args.compile_mode, fullgraph=False)
    times = []
    with torch.inference_mode():
        if args.cuda_graphs:
            if device.type != "cuda":
                raise SystemExit("--cuda-graphs needs a CUDA device")
            static_x = x.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):  # warm up allocations and lazy inits outside the graph
                    fn(static_x)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = fn(static_x)

            def run():
                graph.replay()
                return static_out
        else:
            def run():
                return fn(x)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            run()
        synchronize(device)
        warm_s = time.perf_counter() - t0
        for _ in range(args.iters):
            synchronize(device)
            t = time.perf_counter()
            run()
            synchronize(device)
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"engine": engine, "ops_backend": backend, "resolved": resolved_backends(device, dtype, backend),
            "times_s": times, "warmup_s": warm_s, "median_ms": 1e3 * med,
            "mean_ms": 1e3 * statistics.fmean(times), "min_ms": 1e3 * min(times),
            "fps": args.batch / med}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="armnet_r50", choices=["armnet_r50", "armnet_tiny"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--resolution", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    ap.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                    help="auto: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--ops-backend", default="auto",
                    choices=["auto", "reference", "cpu", "cuda", "triton", "both"],
                    help="'both' = auto and reference, same weights")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the forward pass")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (e.g. max-autotune)")
    ap.add_argument("--cuda-graphs", action="store_true", help="capture and replay a CUDA graph")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--engine", nargs="+", default=["eager"], choices=ENGINES,
                    help="run the model in each of these (same weights, shapes and threads)")
    ap.add_argument("--json", default=None, help="output file (default: benchmarks/results/...)")
    ap.add_argument("--no-json", action="store_true")
    args = ap.parse_args(argv)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    gpu = device.type == "cuda"
    if args.engine != ["eager"] and (args.compile or args.cuda_graphs or args.channels_last):
        raise SystemExit("--compile, --cuda-graphs and --channels-last apply to --engine eager only")
    if "onnxruntime" in args.engine and gpu:
        raise SystemExit("--engine onnxruntime runs on the CPU execution provider: use --device cpu")
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    args.iters = args.iters if args.iters is not None else (50 if gpu else 2)
    warnings.filterwarnings("ignore", message="armnet_ops:")
    torch.manual_seed(0)

    backends = ["auto", "reference"] if args.ops_backend == "both" else [args.ops_backend]
    from armnet import build_model
    state = build_model(args.model).state_dict()  # one set of weights for every run
    runs = [time_one(args, b, device, dtype, state, e) for b in backends for e in args.engine]

    opts = {k: v for k, v in vars(args).items() if k not in ("json", "no_json")}
    opts["dtype"] = str(dtype).removeprefix("torch.")
    env = environment(device)
    import armnet_ops
    env["armnet_ops"] = armnet_ops.__version__
    hdr = (f"{args.model} {args.resolution[0]}x{args.resolution[1]} batch {args.batch} "
           f"{opts['dtype']} on {env['device']}"
           f"{' channels_last' if args.channels_last else ''}{' compile' if args.compile else ''}"
           f"{' cuda-graphs' if args.cuda_graphs else ''}")
    print(hdr)
    print(f"{'engine':12s} {'ops backend':12s} {'median ms':>10s} {'min ms':>9s} {'fps':>9s}  resolved")
    for r in runs:
        res = ",".join(sorted(set(v if not str(v).startswith("error") else "error"
                                  for v in r["resolved"].values())))
        print(f"{r['engine']:12s} {r['ops_backend']:12s} {r['median_ms']:10.2f} {r['min_ms']:9.2f} {r['fps']:9.2f}  {res}")
    report = {"benchmark": "fps", "model": args.model, "environment": env, "options": opts,
              "runs": runs}
    if len(runs) == 2 and len(args.engine) == 1:
        report["speedup_auto_over_reference"] = runs[1]["median_ms"] / runs[0]["median_ms"]
        print(f"speed-up of auto over reference: {report['speedup_auto_over_reference']:.2f}x")
    if not args.no_json:
        engines = "" if args.engine == ["eager"] else "_".join(args.engine) + "_"
        path = args.json or os.path.join(
            ROOT, "benchmarks", "results",
            f"fps_{device.type}_{engines}{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}.json")
        write_json(path, report)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

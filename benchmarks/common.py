"""What every benchmark script shares: timing, the record of the environment, and writing JSON
to benchmarks/results/. Results are only ever written by scripts, never by hand."""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import time

import torch

from armnet_ops.info import environment, git_commit  # noqa: F401  (re-exported for the scripts)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, *, warmup: int = 3, reps: int = 10,
            min_seconds: float = 0.0) -> float:
    """Median milliseconds of fn(). On CUDA, triton.testing.do_bench (CUDA events, cache
    flushed between runs) when Triton is there, else CUDA events; on CPU a wall clock."""
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is not None:
            from triton.testing import do_bench
            return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    for _ in range(warmup):
        fn()
    times, t_end = [], time.perf_counter() + min_seconds
    while len(times) < reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def write_json(path: str, payload: dict) -> str:
    """Writes payload to path through a temporary file, so a reader never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))

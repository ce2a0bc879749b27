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


def time_rounds_interleaved(fns: dict, *, warmup: int = 3, reps: int = 10,
                            min_seconds: float = 0.0, rounds: int = 5) -> dict:
    """{name: [[milliseconds of each call of fn] for each round]} on a CPU: `rounds` rounds that
    run each function in turn (reps and min_seconds spread over the rounds), so that a machine
    whose speed drifts while it runs (a CPU VM, by up to 30 % within minutes) slows all of them
    alike; one function after the other would put the drift into their ratios. The rounds pair
    the functions' calls: round i of one and round i of another ran within seconds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict = {name: [] for name in fns}
    per_round = max(1, -(-reps // rounds))
    for _ in range(rounds):
        for name, fn in fns.items():
            calls, n, t_end = [], 0, time.perf_counter() + min_seconds / rounds
            while n < per_round or time.perf_counter() < t_end:
                t0 = time.perf_counter()
                fn()
                calls.append((time.perf_counter() - t0) * 1e3)
                n += 1
            times[name].append(calls)
    return times


def time_ms_interleaved(fns: dict, device: torch.device, *, warmup: int = 3, reps: int = 10,
                        min_seconds: float = 0.0, rounds: int = 5) -> dict:
    """{name: median milliseconds of fn()} for several functions compared with each other: on a
    CPU over every call of time_rounds_interleaved's rounds; on CUDA, time_ms for each."""
    if device.type != "cpu":
        return {name: time_ms(fn, device, warmup=warmup, reps=reps, min_seconds=min_seconds)
                for name, fn in fns.items()}
    times = time_rounds_interleaved(fns, warmup=warmup, reps=reps, min_seconds=min_seconds,
                                    rounds=rounds)
    return {name: median_of_rounds(r) for name, r in times.items()}


def median_of_rounds(rounds: list) -> float:
    """The median over every call of one function's rounds (time_rounds_interleaved)."""
    return statistics.median(t for calls in rounds for t in calls)


def paired_ratio_quartiles(peer_rounds: list, rounds: list) -> list:
    """[first, third quartile] over the rounds of peer's median time / this one's, round by round
    (time_rounds_interleaved): how far the ratio of the medians moves as the machine drifts."""
    ratios = [statistics.median(p) / statistics.median(r) for p, r in zip(peer_rounds, rounds)]
    if len(ratios) < 2:
        return [round(ratios[0], 2)] * 2 if ratios else []
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return [round(q1, 2), round(q3, 2)]


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

"""Peak memory of evaluating one image on the CPU, beyond the model: the number SPEC's "a 2048×2048
image evaluates within 4 GB beyond the model" is about.

    python benchmarks/eval_memory.py --model armnet_r50 --size 2048 2048 [--threads 1] [--json F]

Run it as its own process (tests/test_model.py does): it reads the kernel's counters of this
process, so anything else the process did before would count. Steps: build the model (random
weights, eval mode), allocate the normalised input, run one warm-up pass at 64×64 (library
initialisation, oneDNN's JIT code), then take the resident set size (VmRSS) as the baseline,
reset the peak (`5 > /proc/self/clear_refs` sets VmHWM to the current RSS), run
`armnet.evaluate.predict_probs` (the `eval`/`predict` path: forward, softmax, fp32) and the
argmax under `torch.inference_mode`, and read the peak (VmHWM). Printed, as one JSON line: the
baseline, the peak and the peak beyond the baseline in MB (10⁶ bytes), and the seconds the pass
took. RSS counts every page the process touched (torch's tensors, the allocator's slack, oneDNN's
buffers), which is what a user's machine has to hold. At small sizes glibc keeps freed tensors
under its mmap threshold (up to 32 MB) in the heap; `MALLOC_MMAP_THRESHOLD_=1048576` in the
environment makes them allocate as a 2048² pass's do (the test of this script sets it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from armnet.evaluate import predict_probs  # noqa: E402
from armnet.model import MODELS, build_model  # noqa: E402


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line (Linux only)")


def reset_peak() -> None:
    """Sets VmHWM to the current RSS (Linux ≥ 4.0); raises when the kernel does not do it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    if _status_kb("VmHWM") > _status_kb("VmRSS") + 64 * 1024:
        raise RuntimeError("writing 5 to /proc/self/clear_refs did not reset VmHWM")


def measure(model_name: str, size: tuple[int, int], threads: int) -> dict:
    torch.set_num_threads(threads)
    model = build_model(model_name).eval()
    x = torch.randn(1, 3, *size)
    with torch.inference_mode():
        predict_probs(model, torch.randn(1, 3, 64, 64)).argmax(1)   # warm-up
    base = _status_kb("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    with torch.inference_mode():
        label = predict_probs(model, x).argmax(1)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    assert label.shape == (1, *size)
    return {"model": model_name, "size": list(size), "threads": threads,
            "baseline_mb": base * 1024 / 1e6, "peak_mb": peak * 1024 / 1e6,
            "beyond_mb": (peak - base) * 1024 / 1e6, "seconds": seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="armnet_r50", choices=sorted(MODELS))
    ap.add_argument("--size", type=int, nargs=2, default=[2048, 2048], metavar=("H", "W"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)
    result = measure(args.model, tuple(args.size), args.threads)
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Traffic model of the Triton criss-cross attention kernels (armnet_ops/triton/cca.py): the bytes
the fused forward or backward moves to and from global memory, against the minimum (inputs read
once, outputs written once).

    python benchmarks/traffic_triton.py                       # the shapes of issue 17, bf16
    python benchmarks/traffic_triton.py 2 64 512 97 97 --itemsize 2

The model counts every load and store the kernels issue, at the tiles the launch code picks
(`_tiles`), as if nothing were served from a cache: an upper bound of DRAM traffic. A line's k
and v (or q and grad_out in the key kernel) are read once per tile of that line; at L <= 128 in
16 bits there is one tile per line. The NCHW -> NHWC transposes of q, k and v count a read and a
write each, unless the inputs are channels_last already; the backward's grad_out is copied to NHWC
by the kernel that reads it for D (its write only). channels_last=True models channels_last
q, k, v and grad_out; autograd usually hands an NCHW grad_out (out is NCHW), whose NHWC copy
adds s·P·Cv to that figure.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from traffic import cca_min_bytes  # noqa: E402  (one floor for both models)

_DTYPES = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}


def _tiles_per_line(L: int, itemsize: int, backward: bool) -> int:
    from armnet_ops.triton.cca import _tiles
    bt, _ = _tiles(L, _DTYPES[itemsize], compiled=True, backward=backward)
    return math.ceil(L / bt)


def cca_triton_traffic(N: int, Cqk: int, Cv: int, H: int, W: int, itemsize: int,
                       pass_: str = "forward", channels_last: bool = False,
                       residual: bool = False) -> dict:
    """{"bytes": modelled traffic, "min_bytes": inputs read once + outputs written once,
    "ratio": bytes / min_bytes, "parts": {what: bytes}} of the fused op's forward or backward."""
    if pass_ not in ("forward", "backward"):
        raise ValueError(f"cca_triton_traffic: pass_ must be 'forward' or 'backward', "
                         f"got {pass_!r}")
    if itemsize not in _DTYPES:
        raise ValueError(f"cca_triton_traffic: itemsize must be 2, 4 or 8, got {itemsize}")
    s = itemsize
    a = 8 if s == 8 else 4          # op-math type: lse, D
    b = s if s == 2 else a          # the partials: the input dtype in 16 bits, else op-math
    P = N * H * W                   # pixels
    backward = pass_ == "backward"
    passes = [_tiles_per_line(L, s, backward) for L in (H, W)]   # column pass, row pass
    parts: dict[str, int] = {}
    transposed = 0 if channels_last else 1
    if pass_ == "forward":
        parts["transpose q, k, v"] = transposed * 2 * s * P * (2 * Cqk + Cv)
        parts["q tiles"] = 2 * s * P * Cqk
        parts["k lines"] = sum(s * P * Cqk * t for t in passes)
        parts["v lines"] = sum(s * P * Cv * t for t in passes)
        parts["partial (written, read)"] = 2 * b * P * Cv
        parts["lse (written, read, rewritten)"] = 3 * a * P
        parts["out"] = s * P * Cv
        parts["residual x, y"] = 2 * s * P * Cv if residual else 0
    else:
        parts["transpose q, k, v"] = transposed * 2 * s * P * (2 * Cqk + Cv)
        # D's kernel reads grad along rows and writes its NHWC copy from the same load.
        parts["grad to NHWC (written by D's kernel)"] = transposed * s * P * Cv
        parts["D = <grad, out>"] = 2 * s * P * Cv + a * P
        # query kernel: q and grad tiles; per tile the line's k (once: P and dq) and v; lse and
        # D tiles.
        parts["query kernel reads"] = sum(s * P * (Cqk + Cv) + s * P * (Cqk + Cv) * t
                                          + 2 * a * P for t in passes)
        # key kernel: k (twice) and v tiles; per tile the line's q (twice: P^T before the Cv loop,
        # P^T and dk after it) and grad, lse and D.
        parts["key kernel reads"] = sum(s * P * (2 * Cqk + Cv) + s * P * (2 * Cqk + Cv) * t
                                        + 2 * a * P * t for t in passes)
        parts["partials dq, dk, dv (written, read)"] = 2 * b * P * (2 * Cqk + Cv)
        parts["dq, dk, dv"] = s * P * (2 * Cqk + Cv)
    total = sum(parts.values())
    min_bytes = cca_min_bytes(N, Cqk, Cv, H, W, itemsize, pass_, residual)
    return {"bytes": total, "min_bytes": min_bytes, "ratio": total / min_bytes, "parts": parts}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", nargs="*", type=int, help="N Cqk Cv H W")
    parser.add_argument("--itemsize", type=int, default=2)
    args = parser.parse_args(argv)
    shapes = [tuple(args.shape)] if args.shape else [(2, 64, 512, 97, 97), (1, 64, 512, 128, 256)]
    for shape in shapes:
        for pass_ in ("forward", "backward"):
            for cl in (False, True):
                r = cca_triton_traffic(*shape, args.itemsize, pass_, channels_last=cl)
                print(f"{shape} itemsize {args.itemsize} {pass_:8s} "
                      f"{'channels_last' if cl else 'NCHW':13s} {r['bytes'] / 1e6:8.1f} MB, "
                      f"min {r['min_bytes'] / 1e6:7.1f} MB, {r['ratio']:.2f}x")


if __name__ == "__main__":
    main()

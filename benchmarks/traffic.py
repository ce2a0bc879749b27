"""Traffic model of the criss-cross attention CUDA kernels (csrc/cuda/cca_kernels.cuh).

`cca_cuda_traffic` gives the global-memory bytes the kernels request for one forward or one
backward, from the shape, the element size and the production tiles of csrc/cuda/cca_kernels.cuh
(each kernel's header comment states its own term), next to the minimum: every input read once
and every output written once. It counts bytes requested by the kernels (what an ideal L2 would
still move between L2 and the SMs); it rounds nothing to 32-byte sectors, which is exact when a
pixel's channel vector is a multiple of 32 bytes (Cqk = 64, Cv = 512 in 16-bit), and it ignores
L2 hits, so on a GPU DRAM traffic is at most this.

Terms: P = N·H·W pixels, b the element size, a the op-math size (4, or 8 for fp64). A pass walks
lines of L positions (the column pass L = H, the row pass L = W) in own tiles of BO positions
(T_o = ceil(L / BO) per line) and key tiles of BK (T_k = ceil(L / BK)); channels stream in chunks
of CT. The forward runs cca_fwd_line_kernel per pass where a whole line's energies and P fit in an
sm_90's shared memory (`line_fits`), else cca_lse_kernel and cca_pv_kernel; the P·V kernel (that
fallback, and dv in the backward) holds a group of Cv channels per block (the widest that fits),
G = ceil(Cv / group) groups.

    python3 benchmarks/traffic.py            # the figures at the benchmark shapes
"""
from __future__ import annotations

import math

# The production tiles of cca_kernels.cuh: (BO, BK, CT) per element size, and the sm_90 opt-in
# shared memory per block (kSmemSm90).
TILES = {2: (128, 64, 32), 4: (64, 32, 32), 8: (64, 32, 32)}
SMEM_SM90 = 232448


def _align128(n: int) -> int:
    return (n + 127) // 128 * 128


def pv_group(Cv: int, itemsize: int, smem_limit: int = SMEM_SM90) -> int:
    """The Cv group of the P·V kernel: Smem::group_width of cca_kernels.cuh (the widest multiple
    of CT whose op-math accumulators [BO][group + 4] fit next to the operand tiles)."""
    BO, BK, CT = TILES[itemsize]
    acc = 8 if itemsize == 8 else 4
    fixed = (_align128(BO * (2 * CT + 8) * itemsize) + _align128(2 * BK * (CT + 8) * itemsize)
             + _align128(BO * (BK + 8) * itemsize) + _align128(2 * max(BO, BK) * acc)
             + _align128(BO * (BK + 4) * acc))
    g = math.ceil(Cv / CT) * CT
    while g > 0 and fixed + _align128(BO * (g + 4) * acc) > smem_limit:
        g -= CT
    return g


def line_bytes(L: int, itemsize: int) -> int:
    """Shared memory of cca_fwd_line_kernel for a line of L positions: Smem::bytes_line of
    cca_kernels.cuh (operand tiles, per-row statistics, the line's energies in op-math and P in
    the element type, keys padded to a multiple of BK)."""
    BO, BK, CT = TILES[itemsize]
    acc = 8 if itemsize == 8 else 4
    Lp = math.ceil(L / BK) * BK
    return (_align128(BO * (2 * CT + 8) * itemsize) + _align128(2 * BK * (CT + 8) * itemsize)
            + _align128(4 * BO * acc) + _align128(BO * (Lp + 4) * acc)
            + _align128(BO * (Lp + 8) * itemsize))


def line_fits(H: int, W: int, itemsize: int, smem_limit: int = SMEM_SM90) -> bool:
    """Whether the forward runs cca_fwd_line_kernel (Smem::line_fits: both passes' lines fit)."""
    return line_bytes(max(H, W), itemsize) <= smem_limit


def cca_min_bytes(N: int, Cqk: int, Cv: int, H: int, W: int, itemsize: int,
                  pass_: str = "forward", residual: bool = False) -> int:
    """The floor both GPU traffic models (this file's and traffic_triton.py's) are measured
    against: every input read once and every output written once, in the element type, with the
    saved statistics in the op-math type (fp32, fp64 for double).

    forward:  q, k, v read; out written; lse written (residual: x read, y written).
    backward: q, k, v, out and dO read (out for D = <dO, out>, as flash-attention reads O), lse
              read; dq, dk, dv written (residual: grad_gamma's per-pixel share is in the D read).
    """
    if pass_ not in ("forward", "backward"):
        raise ValueError(f"cca_min_bytes: pass_ must be 'forward' or 'backward', got {pass_!r}")
    if itemsize not in (2, 4, 8):
        raise ValueError(f"cca_min_bytes: itemsize must be 2, 4 or 8, got {itemsize}")
    b, a = itemsize, (8 if itemsize == 8 else 4)
    P, D = N * H * W, Cqk
    if pass_ == "forward":
        return P * (2 * D + Cv) * b + P * Cv * b + P * a + (2 * P * Cv * b if residual else 0)
    return P * (2 * D + 3 * Cv) * b + P * a + P * (2 * D + Cv) * b


def cca_cuda_traffic(N: int, Cqk: int, Cv: int, H: int, W: int, itemsize: int,
                     pass_: str = "forward", channels_last: bool = False,
                     residual: bool = False) -> dict:
    """Bytes the CUDA criss-cross attention kernels request for one forward (pass_="forward") or
    one backward ("backward") at (N, Cqk, Cv, H, W) with elements of `itemsize` bytes (2: fp16 /
    bf16, 4: fp32, 8: fp64). NCHW inputs add one transpose each to NHWC (read and write);
    channels_last inputs are read in place. residual: the fused gamma·out + x block.

    Returns dict(bytes, min_bytes, ratio, kernels) with kernels the bytes per launch family."""
    if pass_ not in ("forward", "backward"):
        raise ValueError(f"cca_cuda_traffic: pass_ must be 'forward' or 'backward', got {pass_!r}")
    if itemsize not in TILES:
        raise ValueError(f"cca_cuda_traffic: itemsize must be 2, 4 or 8, got {itemsize}")
    BO, BK, CT = TILES[itemsize]
    b, a = itemsize, (8 if itemsize == 8 else 4)
    P, D = N * H * W, Cqk
    group = pv_group(Cv, itemsize) if Cv else CT
    G = math.ceil(Cv / group) if Cv else 0
    resident = D <= 2 * CT  # the own side of q·k stays in shared memory across key tiles
    k: dict[str, float] = {}
    out_extra = 2 * P * Cv * b if residual else 0  # residual read and y written (final pass)

    def passes():
        for L in (H, W):  # column pass (first), row pass (final)
            yield math.ceil(L / BO), math.ceil(L / BK)

    if pass_ == "forward" and not channels_last:
        k["transpose q, k, v to NHWC"] = 2 * P * (2 * D + Cv) * b
    if pass_ == "forward" and line_fits(H, W, itemsize):
        line = 0
        for to, tk in passes():  # q, k for the energies; v once per own tile
            line += P * D * b * ((1 if resident else tk) + to) + P * Cv * b * to
        # part written and read, out written; lse written, then read and written
        k["line (q·k, P, P·V)"] = line + 3 * P * Cv * b + out_extra + 3 * P * a
    elif pass_ == "forward":
        k["lse"] = sum(P * D * b * ((1 if resident else tk) + to) for to, tk in passes()) + 3 * P * a
        pv = 0
        for to, tk in passes():
            pv += G * (P * D * b * ((1 if resident else tk) + to) + P * a * tk)  # q, k, lse
            pv += P * Cv * b * to  # v, each own tile reading the whole line's keys
        k["P·V"] = pv + 3 * P * Cv * b + out_extra  # part written, part read, out written
    else:
        if not channels_last:  # q, k, v, and the incoming gradient
            k["transpose q, k, v, dO to NHWC"] = 2 * P * (2 * D + 2 * Cv) * b
        k["delta"] = 2 * P * Cv * b + P * a * (2 if residual else 1)
        d_tiles = math.ceil(D / CT) if D else 0
        grad = 0
        for to, tk in passes():
            per_tile = (P * D * b * (tk + to) + P * Cv * b * (tk + to)  # q·k and dO·v
                        + P * min(CT, D) * b * to + 2 * P * a * tk)  # output side, lse and D
            grad += d_tiles * per_tile
        k["dq, dk"] = 2 * (grad + 3 * P * D * b)
        dv = 0
        for to, tk in passes():
            dv += G * (P * D * b * ((1 if resident else tk) + to) + P * a * tk) + P * Cv * b * to
        k["dv"] = dv + 3 * P * Cv * b
    total = sum(k.values())
    minimum = cca_min_bytes(N, Cqk, Cv, H, W, itemsize, pass_, residual)
    return {"bytes": total, "min_bytes": minimum, "ratio": total / minimum, "kernels": k}


def _main() -> None:
    shapes = [(2, 64, 512, 97, 97), (1, 64, 512, 64, 64), (1, 64, 512, 128, 256)]
    for shape in shapes:
        for itemsize, name in ((2, "bf16"), (4, "fp32")):
            kernel = "line kernel" if line_fits(*shape[3:], itemsize) else "lse + P·V"
            print(f"{shape} {name} forward: {kernel}")
            for pass_ in ("forward", "backward"):
                for cl in (False, True):
                    t = cca_cuda_traffic(*shape, itemsize, pass_, channels_last=cl)
                    print(f"{shape} {name} {pass_:8s} {'channels_last' if cl else 'NCHW':13s} "
                          f"{t['bytes'] / 1e6:8.1f} MB, minimum {t['min_bytes'] / 1e6:7.1f} MB, "
                          f"{t['ratio']:.2f}x")


if __name__ == "__main__":
    _main()

"""Triton kernels of the directional dilated convolution (SPEC §3.3), as implicit GEMMs.

    y = act(conv2d(x, weight, bias, same padding, dilation=(DH, DW)) * scale + shift)

Forward: M = N·H·W output pixels, N = C_out, K = KH·KW·C_in. A program owns a BLOCK_M × BLOCK_N
output tile; it walks K as (tap, BLOCK_K channel chunk) in one flat, pipelined loop. Kernel size
and dilation are tl.constexpr, so a tap's shift, (kh-KH//2)·DH rows and (kw-KW//2)·DW columns, is
a per-tap pointer offset computed from constants. Taps that fall outside the image are masked to
zero: that is the "same" zero padding, no padded copy of x is made. bias, the per-channel
scale/shift (a folded BatchNorm) and ReLU are applied to the fp32 accumulator before the one
store.

Layout: the kernels take x, y and the gradients with their strides. channels_last (NHWC) is the
layout they are tuned for (an A tile is then BLOCK_K contiguous channels per pixel); NCHW input is
read in place through its strides (an A tile is then BLOCK_M contiguous pixels per channel, also
coalesced), and y is written in x's suggested memory format, so no layout copy is made (the brief
asked for converting NCHW to channels_last; reading it in place through the strides saves that
copy and is tested). The weight is repacked once per call as (KH·KW, C_in, C_out) (a few MB at
most).

The horizontal/vertical pair (ARM-Net's DTM) runs as one launch: the grid holds the output tiles of
both branches, a program picks its branch from its tile index, and the tiles of one pixel block
are adjacent in the launch order, so x is read from DRAM about once for both branches.

Backward (the forward saves x, weight and y; nothing else):
  g_act = grad_y · (y > 0)                     (ReLU mask read off y)
  grad_x  = conv(g_act, flip(weight·scale)ᵀ, same padding, same dilation)  -> the forward kernel's
            tap loop with the flipped, transposed, scaled weight; the pair sums both branches in
            one launch.
  gw_act  = Σ_pixels x_tap ⊗ g_act: the weight-gradient kernel. Each program owns one tap and one
            BLOCK_CI × BLOCK_CO tile and a fixed slice of the pixels; it writes its partial sum to
            a (SPLIT, taps, C_in, C_out) fp32 buffer that is then summed over SPLIT in a fixed
            order. No atomics: the result is deterministic for a given configuration.
  grad_w = gw_act·scale, grad_bias = Σg_act·scale, grad_shift = Σg_act,
  grad_scale = Σ_{ci,kh,kw} gw_act·weight + bias·Σg_act   (no recompute, no division by scale).

Numerics: fp32 accumulation for fp16/bf16/fp32 (fp64 for fp64). fp32 inputs use TF32 tensor cores
only when torch.backends.cudnn.allow_tf32 is set (what F.conv2d would do), else exact fp32
("ieee"). Autotuned on GPU per shape (spatial sizes included), impossible configurations pruned,
and never autotuned inside CUDA-graph capture (see _launch); one configuration under
TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch._prims_common import suggest_memory_format as memory_format

from . import device_guard

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Bits of the epilogue mask of one branch.
HAS_BIAS, HAS_SCALE, HAS_SHIFT = 1, 2, 4


def _gemm_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4)]
    # Few configurations: each is compiled per (channels, kernel, dilation) key.
    shapes = [(128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
              (64, 64, 32, 4, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


def _wgrad_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_CI": 16, "BLOCK_CO": 16, "BLOCK_P": 32}, num_warps=4)]
    shapes = [(64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (128, 128, 32, 8, 3), (64, 64, 128, 4, 3)]
    return [triton.Config({"BLOCK_CI": a, "BLOCK_CO": b, "BLOCK_P": p}, num_warps=w, num_stages=s)
            for a, b, p, w, s in shapes]


# ---- autotuning ---------------------------------------------------------------------------------
# The keys hold the spatial sizes (M = N·H·W, H, W) next to the channels, kernel and dilation: the
# best tile for a 64 × 64 map is not the best for a 512 × 512 one, so every new shape is tuned.

_GEMM_KEY = ["M", "H", "W", "C_in", "C_a", "C_b", "KH_A", "KW_A", "DH_A", "DW_A", "KH_B", "KW_B",
             "DH_B", "DW_B", "PAIR"]
_WGRAD_KEY = ["M", "H", "W", "C_in", "C_out", "KH", "KW", "PIX_PER_SPLIT"]
# The operand tiles each pipeline stage keeps in shared memory.
_GEMM_OPERANDS = (("BLOCK_M", "BLOCK_K"), ("BLOCK_K", "BLOCK_N"))
_WGRAD_OPERANDS = (("BLOCK_CI", "BLOCK_P"), ("BLOCK_P", "BLOCK_CO"))


def _tile_volume(config) -> int:
    v = 1
    for name, size in config.kwargs.items():
        if name.startswith("BLOCK_"):
            v *= size
    return v


def fit_configs(configs, sizes: dict, operands, elem_size: int, smem_limit: float) -> list:
    """The configurations worth benchmarking for one problem (never empty).

    Impossible ones go: those whose pipelined operand tiles (num_stages copies of each tile in
    `operands`) exceed the device's shared memory per block. So do wasteful ones: a block larger
    than the next power of two of its problem size (`sizes`: block name -> size; 16 at least,
    tl.dot's smallest), which would be mostly padding. If nothing is left by the second rule,
    the fitting configuration with the smallest tile is kept; if nothing fits at all, the one with
    the least shared memory (the compiler then names the shortfall)."""
    def smem(c):
        return c.num_stages * elem_size * sum(c.kwargs[a] * c.kwargs[b] for a, b in operands)

    def lean(c):
        return all(c.kwargs[name] <= max(16, triton.next_power_of_2(max(int(n), 1)))
                   for name, n in sizes.items())

    fits = [c for c in configs if smem(c) <= smem_limit] or [min(configs, key=smem)]
    return [c for c in fits if lean(c)] or [min(fits, key=_tile_volume)]


def _smem_limit(t: torch.Tensor) -> float:
    if t.device.type != "cuda":
        return float("inf")
    return torch.cuda.get_device_properties(t.device).shared_memory_per_block_optin


def _prune_gemm_configs(configs, nargs, **kwargs):
    """early_config_prune of the forward and input-gradient kernels: the N dimension is C_out
    (forward) or C_in (input gradient), K runs over the other one."""
    forward = "x_ptr" in nargs
    c_pair = max(nargs["C_a"], nargs["C_b"])
    c_n, c_k = (c_pair, nargs["C_in"]) if forward else (nargs["C_in"], c_pair)
    t = nargs["x_ptr" if forward else "ga_ptr"]
    return fit_configs(configs, {"BLOCK_M": nargs["M"], "BLOCK_N": c_n, "BLOCK_K": c_k},
                       _GEMM_OPERANDS, t.element_size(), _smem_limit(t))


def _prune_wgrad_configs(configs, nargs, **kwargs):
    t = nargs["x_ptr"]
    sizes = {"BLOCK_CI": nargs["C_in"], "BLOCK_CO": nargs["C_out"],
             "BLOCK_P": nargs["PIX_PER_SPLIT"]}
    return fit_configs(configs, sizes, _WGRAD_OPERANDS, t.element_size(), _smem_limit(t))


def capture_config(candidates, programs, sms: int):
    """The configuration to launch inside CUDA-graph capture when this key was never tuned:
    benchmarking there would synchronize the capturing stream, so the pick is a heuristic. The
    largest tile (among the pruned `candidates`) whose grid still gives every SM two programs;
    else the smallest tile. programs(config) -> the grid size with that configuration."""
    by_size = sorted(candidates, key=_tile_volume, reverse=True)
    for c in by_size:
        if programs(c) >= 2 * sms:
            return c
    return by_size[-1]


# (kernel, autotune key) -> the configuration the autotuner picked, reused inside graph capture.
_TUNED: dict = {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _launch(kernel, grid, device: torch.device, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), an autotuned kernel, never autotuned inside CUDA-graph
    capture. Outside capture the autotuner runs (it benchmarks once per key) and its pick is
    remembered; inside, the remembered pick for the key, else capture_config's heuristic, is
    launched directly. Warming a shape up before capturing it thus captures its tuned
    configuration."""
    nargs = dict(zip(kernel.arg_names, args))
    key = (kernel.base_fn.__name__, str(args[0].dtype),
           *(nargs[k] if k in nargs else kwargs[k] for k in kernel.keys))
    if not _capturing(device):
        kernel[grid](*args, **kwargs)
        _TUNED[key] = kernel.best_config
        return
    config = _TUNED.get(key)
    if config is None:
        def programs(c):
            n = 1
            for g in grid(c.kwargs):
                n *= g
            return n
        sms = (torch.cuda.get_device_properties(device).multi_processor_count
               if device.type == "cuda" else 1)  # a CPU device: only the tests force capture
        config = capture_config(kernel.early_config_prune(kernel.configs, nargs, **kwargs),
                                programs, sms)
    kernel.fn[grid](*args, **kwargs, **config.all_kwargs())


# ---- device code --------------------------------------------------------------------------------

@triton.jit
def _accumulate_taps(acc, x_ptr, w_ptr, n_idx, h_idx, w_idx, m_mask, offs_n, n_mask, H, W, C,
                     sxn, sxc, sxh, sxw, C_OUT,
                     KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                     BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                     UPCAST: tl.constexpr):
    """acc[m, n] += Σ_tap Σ_c x[pixel m shifted by the tap, c] · w[tap, c, n], w packed as
    (KH·KW, C, C_OUT) contiguous. Out-of-image taps read zeros (the same padding).

    The taps and the channel chunks are one flat loop of KH·KW·ceil(C / BLOCK_K) steps: one
    software-pipelined K loop (loads of step i+1 overlap the dot of step i, across tap
    boundaries too) and a small kernel body; the tap's shift is a couple of scalar operations
    on compile-time constants per step."""
    offs_k0 = tl.arange(0, BLOCK_K)
    chunks = tl.cdiv(C, BLOCK_K)
    for step in range(0, KH * KW * chunks):
        tap = step // chunks
        k0 = (step - tap * chunks) * BLOCK_K
        ih = h_idx + (tap // KW - KH // 2) * DH
        iw = w_idx + (tap % KW - KW // 2) * DW
        valid = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        # int64 row offsets: N·H·W·C may pass 2^31.
        row = n_idx * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        offs_k = k0 + offs_k0
        k_mask = offs_k < C
        a = tl.load(x_ptr + row[:, None] + offs_k[None, :].to(tl.int64) * sxc,
                    mask=valid[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_ptr + (tap * C + offs_k[:, None]).to(tl.int64) * C_OUT + offs_n[None, :],
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong (Triton 3.8); fp32 is exact here
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
    return acc


@triton.jit
def _epilogue_store(acc, y_ptr, bias_ptr, scale_ptr, shift_ptr, n_idx, h_idx, w_idx, m_mask,
                    offs_n, n_mask, syn, syc, syh, syw,
                    EPI: tl.constexpr, RELU: tl.constexpr):
    """y = act(acc + bias) · scale + shift) on the accumulator, one store in y's dtype."""
    if EPI & 1:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(acc.dtype)[None, :]
    if EPI & 2:
        acc *= tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0).to(acc.dtype)[None, :]
    if EPI & 4:
        acc += tl.load(shift_ptr + offs_n, mask=n_mask, other=0.0).to(acc.dtype)[None, :]
    if RELU:
        # where(acc < 0, 0, acc), not tl.maximum (max.f32 on the GPU returns the non-NaN
        # operand): NaN compares false and is kept, as torch.relu keeps it.
        acc = tl.where(acc < 0.0, 0.0, acc)
    ptrs = (y_ptr + (n_idx * syn + h_idx.to(tl.int64) * syh + w_idx.to(tl.int64) * syw)[:, None]
            + offs_n[None, :].to(tl.int64) * syc)
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _pixel_coords(offs_m, H, W):
    hw = H * W
    n_idx = (offs_m // hw).to(tl.int64)
    rem = offs_m % hw
    return n_idx, rem // W, rem % W


@triton.jit
def _pixel_block(pid_m, M, H, W, BLOCK_M: tl.constexpr):
    """Block pid_m of BLOCK_M output pixels (flattened N·H·W): its mask and (n, h, w)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_idx, h_idx, w_idx = _pixel_coords(offs_m, H, W)
    return offs_m < M, n_idx, h_idx, w_idx


@triton.autotune(configs=_gemm_configs(), key=_GEMM_KEY,
                 prune_configs_by={"early_config_prune": _prune_gemm_configs})
@triton.jit
def _dconv_fwd_kernel(
        x_ptr, M, H, W, C_in, sxn, sxc, sxh, sxw,
        wa_ptr, ba_ptr, sca_ptr, sha_ptr, ya_ptr, C_a, syan, syac, syah, syaw,
        wb_ptr, bb_ptr, scb_ptr, shb_ptr, yb_ptr, C_b, sybn, sybc, sybh, sybw,
        KH_A: tl.constexpr, KW_A: tl.constexpr, DH_A: tl.constexpr, DW_A: tl.constexpr,
        KH_B: tl.constexpr, KW_B: tl.constexpr, DH_B: tl.constexpr, DW_B: tl.constexpr,
        EPI_A: tl.constexpr, EPI_B: tl.constexpr, RELU: tl.constexpr, PAIR: tl.constexpr,
        PRECISION: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Forward of one branch (A), or of two branches A and B that read the same x (PAIR). The
    output-channel tiles of one pixel block are consecutive program ids (both branches' tiles when
    PAIR), so they run together and share that block of x in L2."""
    pid = tl.program_id(0)
    tiles_a = tl.cdiv(C_a, BLOCK_N)
    tiles_n = tiles_a
    if PAIR:
        tiles_n += tl.cdiv(C_b, BLOCK_N)
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    m_mask, n_idx, h_idx, w_idx = _pixel_block(pid_m, M, H, W, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    if pid_n < tiles_a:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < C_a
        acc = _accumulate_taps(acc, x_ptr, wa_ptr, n_idx, h_idx, w_idx, m_mask, offs_n, n_mask,
                               H, W, C_in, sxn, sxc, sxh, sxw, C_a, KH_A, KW_A, DH_A, DW_A,
                               BLOCK_K, PRECISION, ACC, UPCAST)
        _epilogue_store(acc, ya_ptr, ba_ptr, sca_ptr, sha_ptr, n_idx, h_idx, w_idx, m_mask,
                        offs_n, n_mask, syan, syac, syah, syaw, EPI_A, RELU)
    else:
        if PAIR:
            offs_n = (pid_n - tiles_a) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < C_b
            acc = _accumulate_taps(acc, x_ptr, wb_ptr, n_idx, h_idx, w_idx, m_mask, offs_n,
                                   n_mask, H, W, C_in, sxn, sxc, sxh, sxw, C_b, KH_B, KW_B, DH_B,
                                   DW_B, BLOCK_K, PRECISION, ACC, UPCAST)
            _epilogue_store(acc, yb_ptr, bb_ptr, scb_ptr, shb_ptr, n_idx, h_idx, w_idx, m_mask,
                            offs_n, n_mask, sybn, sybc, sybh, sybw, EPI_B, RELU)


@triton.autotune(configs=_gemm_configs(), key=_GEMM_KEY,
                 prune_configs_by={"early_config_prune": _prune_gemm_configs})
@triton.jit
def _dconv_dgrad_kernel(
        gx_ptr, M, H, W, C_in, sgxn, sgxc, sgxh, sgxw,
        ga_ptr, wa_ptr, C_a, sgan, sgac, sgah, sgaw,
        gb_ptr, wb_ptr, C_b, sgbn, sgbc, sgbh, sgbw,
        KH_A: tl.constexpr, KW_A: tl.constexpr, DH_A: tl.constexpr, DW_A: tl.constexpr,
        KH_B: tl.constexpr, KW_B: tl.constexpr, DH_B: tl.constexpr, DW_B: tl.constexpr,
        PAIR: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """grad_x = conv(g_a, w_a) (+ conv(g_b, w_b) when PAIR): the forward's tap loop over the
    output gradients, with the weights already flipped, transposed and scaled, packed as
    (KH·KW, C_out, C_in). Both branches accumulate into one register tile: one store, no
    read-modify-write of grad_x."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(C_in, BLOCK_N)
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    m_mask, n_idx, h_idx, w_idx = _pixel_block(pid_m, M, H, W, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < C_in
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    acc = _accumulate_taps(acc, ga_ptr, wa_ptr, n_idx, h_idx, w_idx, m_mask, offs_n, n_mask,
                           H, W, C_a, sgan, sgac, sgah, sgaw, C_in, KH_A, KW_A, DH_A, DW_A,
                           BLOCK_K, PRECISION, ACC, UPCAST)
    if PAIR:
        acc = _accumulate_taps(acc, gb_ptr, wb_ptr, n_idx, h_idx, w_idx, m_mask, offs_n, n_mask,
                               H, W, C_b, sgbn, sgbc, sgbh, sgbw, C_in, KH_B, KW_B, DH_B, DW_B,
                               BLOCK_K, PRECISION, ACC, UPCAST)
    _epilogue_store(acc, gx_ptr, gx_ptr, gx_ptr, gx_ptr, n_idx, h_idx, w_idx, m_mask, offs_n,
                    n_mask, sgxn, sgxc, sgxh, sgxw, 0, False)


@triton.autotune(configs=_wgrad_configs(), key=_WGRAD_KEY,
                 prune_configs_by={"early_config_prune": _prune_wgrad_configs})
@triton.jit
def _dconv_wgrad_kernel(
        x_ptr, g_ptr, part_ptr, M, H, W, C_in, C_out, PIX_PER_SPLIT,
        sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw,
        KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
        PRECISION: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr):
    """part[split, tap, ci, co] = Σ_{pixels p of this split} x[p shifted by tap, ci] · g[p, co].

    Grid: (KH·KW · ci tiles · co tiles, SPLIT). Each program reduces a fixed, contiguous slice of
    PIX_PER_SPLIT pixels in BLOCK_P steps (a GEMM whose K is the pixel index) and writes its own
    slot of the partial buffer; the caller sums the SPLIT slots in order."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tiles_ci = tl.cdiv(C_in, BLOCK_CI)
    tiles_co = tl.cdiv(C_out, BLOCK_CO)
    tap = pid // (tiles_ci * tiles_co)
    rem = pid % (tiles_ci * tiles_co)
    offs_ci = (rem // tiles_co) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    offs_co = (rem % tiles_co) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    ci_mask = offs_ci < C_in
    co_mask = offs_co < C_out
    off_h = (tap // KW - KH // 2) * DH
    off_w = (tap % KW - KW // 2) * DW
    p_start = split * PIX_PER_SPLIT
    p_end = tl.minimum(p_start + PIX_PER_SPLIT, M)
    acc = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=ACC)
    for p0 in range(p_start, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_mask = offs_p < p_end
        n_idx, h_idx, w_idx = _pixel_coords(offs_p, H, W)
        ih = h_idx + off_h
        iw = w_idx + off_w
        valid = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_row = n_idx * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        xt = tl.load(x_ptr + offs_ci[:, None].to(tl.int64) * sxc + x_row[None, :],
                     mask=ci_mask[:, None] & valid[None, :], other=0.0)
        g_row = n_idx * sgn + h_idx.to(tl.int64) * sgh + w_idx.to(tl.int64) * sgw
        g = tl.load(g_ptr + g_row[:, None] + offs_co[None, :].to(tl.int64) * sgc,
                    mask=p_mask[:, None] & co_mask[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            g = g.to(tl.float32)
        acc = tl.dot(xt, g, acc, input_precision=PRECISION, out_dtype=ACC)
    base = (split.to(tl.int64) * (KH * KW) + tap) * C_in * C_out
    ptrs = part_ptr + base + offs_ci[:, None] * C_out + offs_co[None, :]
    tl.store(ptrs, acc, mask=ci_mask[:, None] & co_mask[None, :])


# ---- host glue ----------------------------------------------------------------------------------

def _precision(dtype: torch.dtype, device: torch.device) -> str:
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    """Whether the dot operands are widened to fp32: only for bf16 under the interpreter, whose
    bf16 dot gives garbage in Triton 3.8 (products of bf16 values are exact in fp32, so this
    matches a tensor-core bf16 dot with fp32 accumulation)."""
    return INTERPRET and dtype == torch.bfloat16


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _strided(t: torch.Tensor) -> torch.Tensor:
    """t itself when its strides are those of a dense NCHW or NHWC tensor; else a copy in its
    suggested format (sliced or oddly permuted inputs)."""
    fmt = memory_format(t)
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


def _pack_forward_weight(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, KH, KW) -> (KH·KW, C_in, C_out): a K × N matrix per tap."""
    C_out, C_in, KH, KW = weight.shape
    return weight.permute(2, 3, 1, 0).reshape(KH * KW, C_in, C_out).contiguous()


def _pack_dgrad_weight(weight: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """(C_out, C_in, KH, KW) -> (KH·KW, C_out, C_in) of flip(weight · scale): the input gradient
    is the same-padded convolution of the output gradient with the flipped, transposed kernel.
    The scale is folded in at fp32 (or fp64) and rounded once to the compute dtype."""
    C_out, C_in, KH, KW = weight.shape
    w = weight
    if scale is not None:
        acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        w = (weight.to(acc_dtype) * scale.to(acc_dtype).view(-1, 1, 1, 1)).to(weight.dtype)
    return w.flip(2, 3).permute(2, 3, 0, 1).reshape(KH * KW, C_out, C_in).contiguous()


def _epi_bits(bias, scale, shift) -> int:
    return ((HAS_BIAS if bias is not None else 0) | (HAS_SCALE if scale is not None else 0)
            | (HAS_SHIFT if shift is not None else 0))


def _out(x: torch.Tensor, c_out: int) -> torch.Tensor:
    N, _, H, W = x.shape
    return torch.empty((N, c_out, H, W), device=x.device, dtype=x.dtype,
                       memory_format=memory_format(x))


def _check_sizes(x: torch.Tensor, *weights: torch.Tensor) -> None:
    # Pixel indices are int32 inside the kernels (offsets are int64).
    if x.shape[0] * x.shape[2] * x.shape[3] >= 2**31:
        raise RuntimeError(f"directional_conv2d (triton): N·H·W = "
                           f"{x.shape[0] * x.shape[2] * x.shape[3]} pixels must be < 2^31")
    for w in weights:
        if w.shape[1] != x.shape[1]:
            raise RuntimeError(f"directional_conv2d (triton): argument 'weight' must have "
                               f"in_channels = {x.shape[1]}, got {w.shape[1]}")


def _forward(x, branches, relu: bool):
    """branches: one or two (weight, bias, scale, shift, dilation); returns the outputs."""
    _check_sizes(x, *(b[0] for b in branches))
    x_in = _strided(x)
    N, C_in, H, W = x.shape
    M = N * H * W
    ys = [_out(x, b[0].shape[0]) for b in branches]
    if M == 0:
        return ys
    args, consts = [], []
    for (weight, bias, scale, shift, dilation), y in zip(branches, ys):
        wp = _pack_forward_weight(weight)
        dummy = wp  # never read when its epilogue bit is off
        # The epilogue reads the per-channel vectors at unit stride.
        bias, scale, shift = (None if v is None else v.contiguous() for v in (bias, scale, shift))
        args += [wp, bias if bias is not None else dummy, scale if scale is not None else dummy,
                 shift if shift is not None else dummy, y, weight.shape[0], *_nchw_strides(y)]
        consts.append((weight.shape[2], weight.shape[3], int(dilation[0]), int(dilation[1]),
                       _epi_bits(bias, scale, shift)))
    pair = len(branches) == 2
    if not pair:  # the B slots repeat A and are never touched
        args += args
        consts.append(consts[0])
    (kha, kwa, dha, dwa, epa), (khb, kwb, dhb, dwb, epb) = consts
    c_a, c_b = branches[0][0].shape[0], branches[-1][0].shape[0] if pair else 0

    def grid(meta):
        tiles = triton.cdiv(c_a, meta["BLOCK_N"]) + (triton.cdiv(c_b, meta["BLOCK_N"]) if pair else 0)
        return (triton.cdiv(M, meta["BLOCK_M"]) * tiles,)

    args_a, args_b = args[:10], args[10:20]
    if not pair:
        args_b = list(args_b)
        args_b[5] = 0  # C_b = 0: no B tiles
    with device_guard(x):
        _launch(
            _dconv_fwd_kernel, grid, x.device, x_in, M, H, W, C_in, *_nchw_strides(x_in),
            *args_a, *args_b,
            KH_A=kha, KW_A=kwa, DH_A=dha, DW_A=dwa, KH_B=khb, KW_B=kwb, DH_B=dhb, DW_B=dwb,
            EPI_A=epa, EPI_B=epb, RELU=relu, PAIR=pair,
            PRECISION=_precision(x.dtype, x.device), ACC=_acc(x.dtype),
            UPCAST=_upcast(x.dtype))
    return ys


def _nchw_strides(t: torch.Tensor):
    """(stride_n, stride_c, stride_h, stride_w) of a 4-D NCHW-indexed tensor."""
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _grad_act(grad_y, y, relu: bool):
    return grad_y.masked_fill(y <= 0, 0) if relu else grad_y


def _dgrad(x, branches):
    """grad_x for one or two (g_act, weight, scale, dilation) branches, summed in one launch."""
    N, C_in, H, W = x.shape
    M = N * H * W
    gx = torch.empty((N, C_in, H, W), device=x.device, dtype=x.dtype,
                     memory_format=memory_format(x))
    if M == 0:
        return gx
    args, consts = [], []
    for g, weight, scale, dilation in branches:
        g = _strided(g)
        args += [g, _pack_dgrad_weight(weight, scale), weight.shape[0], *_nchw_strides(g)]
        consts += [weight.shape[2], weight.shape[3], int(dilation[0]), int(dilation[1])]
    pair = len(branches) == 2
    if not pair:
        args += args
        consts += consts

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(C_in, meta["BLOCK_N"]),)

    with device_guard(x):
        _launch(
            _dconv_dgrad_kernel, grid, x.device, gx, M, H, W, C_in, *_nchw_strides(gx), *args,
            KH_A=consts[0], KW_A=consts[1], DH_A=consts[2], DW_A=consts[3],
            KH_B=consts[4], KW_B=consts[5], DH_B=consts[6], DW_B=consts[7], PAIR=pair,
            PRECISION=_precision(x.dtype, x.device), ACC=_acc(x.dtype),
            UPCAST=_upcast(x.dtype))
    return gx


def _num_splits(x: torch.Tensor, M: int, taps: int, C_in: int, C_out: int) -> int:
    """How many pixel slices the weight gradient is split into: enough programs to fill the GPU
    (about 4 per SM with 64 × 64 tiles) but at least 2048 pixels each. Under the interpreter a
    few splits, so the partial-sum path is exercised."""
    if not x.is_cuda:
        return max(1, min(3, triton.cdiv(M, 64)))
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    tiles = taps * triton.cdiv(C_in, 64) * triton.cdiv(C_out, 64)
    return max(1, min(triton.cdiv(4 * sms, tiles), triton.cdiv(M, 2048), 64))


def _wgrad_act(x, g_act, KH: int, KW: int, dilation) -> torch.Tensor:
    """Σ_pixels x_tap ⊗ g_act as (C_out, C_in, KH, KW), in fp32 (fp64 for fp64)."""
    N, C_in, H, W = x.shape
    C_out = g_act.shape[1]
    M = N * H * W
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if M == 0:
        return torch.zeros((C_out, C_in, KH, KW), device=x.device, dtype=acc_dtype)
    x_in, g = _strided(x), _strided(g_act)
    split = _num_splits(x, M, KH * KW, C_in, C_out)
    pix_per_split = triton.cdiv(M, split)
    part = torch.empty((split, KH * KW, C_in, C_out), device=x.device, dtype=acc_dtype)

    def grid(meta):
        return (KH * KW * triton.cdiv(C_in, meta["BLOCK_CI"]) * triton.cdiv(C_out, meta["BLOCK_CO"]),
                split)

    with device_guard(x):
        _launch(
            _dconv_wgrad_kernel, grid, x.device, x_in, g, part, M, H, W, C_in, C_out,
            pix_per_split, *_nchw_strides(x_in), *_nchw_strides(g),
            KH=KH, KW=KW, DH=int(dilation[0]), DW=int(dilation[1]),
            PRECISION=_precision(x.dtype, x.device), ACC=_acc(x.dtype),
            UPCAST=_upcast(x.dtype))
    # A fixed-order reduction of the slices: deterministic.
    return part.sum(0).view(KH, KW, C_in, C_out).permute(3, 2, 0, 1)


def _param_grads(x, g_act, weight, bias, scale, shift, dilation):
    """grad_weight, grad_bias, grad_scale, grad_shift of one branch from its g_act."""
    KH, KW = weight.shape[2:]
    gw_act = _wgrad_act(x, g_act, KH, KW, dilation)
    acc_dtype = gw_act.dtype
    sum_g = g_act.sum((0, 2, 3), dtype=acc_dtype)
    s = scale.to(acc_dtype) if scale is not None else None
    grad_w = gw_act * s.view(-1, 1, 1, 1) if s is not None else gw_act
    grad_b = None if bias is None else (sum_g * s if s is not None else sum_g).to(bias.dtype)
    grad_scale = None
    if scale is not None:
        gs = (gw_act * weight.to(acc_dtype)).sum((1, 2, 3))
        if bias is not None:
            gs = gs + bias.to(acc_dtype) * sum_g
        grad_scale = gs.to(scale.dtype)
    grad_shift = None if shift is None else sum_g.to(shift.dtype).clone()
    return grad_w.to(weight.dtype).contiguous(), grad_b, grad_scale, grad_shift


# ---- the registered Triton twins of the C++ ops -------------------------------------------------
# The schemas are those of csrc/ops.cpp (written out: infer_schema has no optional returns).

_SCHEMAS = {
    "directional_conv2d_forward_triton": (
        "(Tensor x, Tensor weight, Tensor? bias, int[2] dilation, Tensor? scale, Tensor? "
        "shift, bool relu) -> Tensor"
    ),
    "directional_conv2d_backward_triton": (
        "(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias, Tensor y, int[2] dilation"
        ", Tensor? scale, Tensor? shift, bool relu) -> (Tensor grad_x, Tensor grad_weight"
        ", Tensor? grad_bias, Tensor? grad_scale, Tensor? grad_shift)"
    ),
    "directional_conv2d_pair_forward_triton": (
        "(Tensor x, Tensor weight_h, Tensor weight_v, Tensor? bias_h, Tensor? bias_v, int"
        "[2] dilation_h, int[2] dilation_v, Tensor? scale_h, Tensor? shift_h, Tensor? sca"
        "le_v, Tensor? shift_v, bool relu) -> (Tensor y_h, Tensor y_v)"
    ),
    "directional_conv2d_pair_backward_triton": (
        "(Tensor grad_y_h, Tensor grad_y_v, Tensor x, Tensor weight_h, Tensor weight_v, T"
        "ensor? bias_h, Tensor? bias_v, Tensor y_h, Tensor y_v, int[2] dilation_h, int[2]"
        " dilation_v, Tensor? scale_h, Tensor? shift_h, Tensor? scale_v, Tensor? shift_v,"
        " bool relu) -> (Tensor grad_x, Tensor grad_weight_h, Tensor grad_weight_v, Tenso"
        "r? grad_bias_h, Tensor? grad_bias_v, Tensor? grad_scale_h, Tensor? grad_shift_h, Tensor? grad_scale_v, Tensor? grad_shift_v)"
    ),
}


def _twin(name):
    return torch.library.custom_op(f"armnet_ops::{name}", mutates_args=(), schema=_SCHEMAS[name])


@_twin("directional_conv2d_forward_triton")
def directional_conv2d_forward_triton(x: torch.Tensor, weight: torch.Tensor,
                                      bias: Optional[torch.Tensor], dilation: Sequence[int],
                                      scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                                      relu: bool) -> torch.Tensor:
    return _forward(x, [(weight, bias, scale, shift, dilation)], relu)[0]


@_twin("directional_conv2d_backward_triton")
def directional_conv2d_backward_triton(
        grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
        y: torch.Tensor, dilation: Sequence[int], scale: Optional[torch.Tensor],
        shift: Optional[torch.Tensor], relu: bool
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor],
           Optional[torch.Tensor]]:
    _check_sizes(x, weight)
    g_act = _grad_act(grad_y, y, relu)
    grad_x = _dgrad(x, [(g_act, weight, scale, dilation)])
    return (grad_x, *_param_grads(x, g_act, weight, bias, scale, shift, dilation))


@_twin("directional_conv2d_pair_forward_triton")
def directional_conv2d_pair_forward_triton(
        x: torch.Tensor, weight_h: torch.Tensor, weight_v: torch.Tensor,
        bias_h: Optional[torch.Tensor], bias_v: Optional[torch.Tensor], dilation_h: Sequence[int],
        dilation_v: Sequence[int], scale_h: Optional[torch.Tensor], shift_h: Optional[torch.Tensor],
        scale_v: Optional[torch.Tensor], shift_v: Optional[torch.Tensor], relu: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    y_h, y_v = _forward(x, [(weight_h, bias_h, scale_h, shift_h, dilation_h),
                            (weight_v, bias_v, scale_v, shift_v, dilation_v)], relu)
    return y_h, y_v


@_twin("directional_conv2d_pair_backward_triton")
def directional_conv2d_pair_backward_triton(
        grad_y_h: torch.Tensor, grad_y_v: torch.Tensor, x: torch.Tensor, weight_h: torch.Tensor,
        weight_v: torch.Tensor, bias_h: Optional[torch.Tensor], bias_v: Optional[torch.Tensor],
        y_h: torch.Tensor, y_v: torch.Tensor, dilation_h: Sequence[int], dilation_v: Sequence[int],
        scale_h: Optional[torch.Tensor], shift_h: Optional[torch.Tensor],
        scale_v: Optional[torch.Tensor], shift_v: Optional[torch.Tensor], relu: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor],
           Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor],
           Optional[torch.Tensor], Optional[torch.Tensor]]:
    _check_sizes(x, weight_h, weight_v)
    g_h = _grad_act(grad_y_h, y_h, relu)
    g_v = _grad_act(grad_y_v, y_v, relu)
    grad_x = _dgrad(x, [(g_h, weight_h, scale_h, dilation_h), (g_v, weight_v, scale_v, dilation_v)])
    gw_h, gb_h, gs_h, gt_h = _param_grads(x, g_h, weight_h, bias_h, scale_h, shift_h, dilation_h)
    gw_v, gb_v, gs_v, gt_v = _param_grads(x, g_v, weight_v, bias_v, scale_v, shift_v, dilation_v)
    return grad_x, gw_h, gw_v, gb_h, gb_v, gs_h, gt_h, gs_v, gt_v


from .. import directional_conv as _op_module  # noqa: E402  (the op module imports us lazily)

_op_module.register("_triton")

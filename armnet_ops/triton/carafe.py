"""CARAFE in Triton: `carafe` (normalised high-resolution masks) and `carafe_fused` (raw
low-resolution logits; pixel shuffle and the softmax over the k² taps done in the kernel, the
high-resolution mask never written), forward and backward.

Layout: features (N, C, H, W), masks (N, G·k², sH, sW), logits (N, G·k²·s², H, W) with channel
(g·k² + t)·s² + i·s + j for tap t of group g at child (i, j); out (N, C, sH, sW). Inputs are made
contiguous by the wrappers; outputs are contiguous.

Tiling. Every program owns a tile of BLOCK_P *low-resolution* pixels × BLOCK_C channels of one
group, and keeps a third axis of S2P ≥ s² children: the accumulator is [BLOCK_C, BLOCK_P, S2P].
A feature tap is loaded once as [BLOCK_C, BLOCK_P] and broadcast over the s² children, so each
feature load serves all of them; the masks/logits of a tap are one [BLOCK_P, S2P] load shared by
the BLOCK_C channels.

Any G·k². Taps are a runtime loop and nothing is staged in shared memory per tap, so the tile
size does not depend on k (unlike mmcv's kernels, which keep all G·k² mask values of a pixel in
shared memory and break past 384). The fused softmax keeps two running statistics (max and sum)
per child, also independent of k.

Backward (deterministic, no atomics):
* dmask/dlogit: one program per (low-resolution tile, n, g) loops over the channels of the group
  in BLOCK_C chunks; per chunk it loads grad_out once and adds each tap's partial sum into its own
  scratch rows (only this program touches them; a barrier orders the read-modify-writes). The
  fused kernel then turns dp into dlogit = p·(dp − Σ_t p·dp) and writes the per-child
  log-sum-exp (N, G, s², H, W), 1/k² of a mask, for the feature gradient.
* dfeatures: a gather. Feature pixel (hh, ww) collects, for each tap, the s² children of the
  low-resolution pixel (hh + r - ky, ww + r - kx).
Saved for the backward: the inputs only (the softmax is recomputed from the logits).

Accumulation is in fp32 for fp16/bf16/fp32 inputs and in fp64 for fp64 inputs.
"""
from __future__ import annotations

import importlib
import os

import torch
import triton
import triton.language as tl

from . import device_guard

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
INT32_MAX = 2**31 - 1


@triton.jit
def _tile(pid_p, HW, W, S: tl.constexpr, BLOCK_P: tl.constexpr, S2P: tl.constexpr):
    """Low-resolution pixels p = (h, w) of the tile and the child index q = i·s + j."""
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < HW
    h = p // W
    w = p % W
    q = tl.arange(0, S2P)
    qmask = q < S * S
    i = q // S
    j = q % S
    return p, pmask, h, w, q, qmask, i, j


@triton.jit
def _child_offset(h, w, i, j, S: tl.constexpr, sW):
    """[BLOCK_P, S2P] offset, inside one high-resolution plane, of child (i, j) of pixel (h, w)."""
    return (h[:, None] * S + i[None, :]) * sW + (w[:, None] * S + j[None, :])


@triton.jit
def _tap_features(feat_ptr, chan, cmask, t, h, w, pmask, H, W, K: tl.constexpr,
                  ACC: tl.constexpr):
    """[BLOCK_C, BLOCK_P] features under tap t = ky·K + kx of the window centred on (h, w),
    zero outside the image (the zero padding of the reference)."""
    R: tl.constexpr = (K - 1) // 2
    ky = t // K
    kx = t % K
    hh = h + ky - R
    ww = w + kx - R
    ok = pmask & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    return tl.load(feat_ptr + chan[:, None] * (H * W) + (hh * W + ww)[None, :],
                   mask=cmask[:, None] & ok[None, :], other=0.0).to(ACC)


@triton.jit
def _softmax_stats(logit_ptr, lbase, p, q, pq_mask, HW, K2, S: tl.constexpr,
                   BLOCK_P: tl.constexpr, S2P: tl.constexpr, ACC: tl.constexpr):
    """Running max and sum of exp over the k² taps of each child (an online softmax pass), so
    the statistics take two registers per child whatever k is."""
    mx = tl.full((BLOCK_P, S2P), float("-inf"), ACC)
    den = tl.zeros((BLOCK_P, S2P), ACC)
    pq = q[None, :] * HW + p[:, None]
    for t in range(0, K2):
        x = tl.load(logit_ptr + lbase + t * (S * S * HW) + pq, mask=pq_mask,
                    other=0.0).to(ACC)
        new = tl.maximum(mx, x)
        den = den * tl.exp(mx - new) + tl.exp(x - new)
        mx = new
    # Masked lanes hold finite values (other=0), so nothing here is inf - inf.
    return mx, den


@triton.jit
def _tap_prob(logit_ptr, off, pq_mask, mx, inv, ACC: tl.constexpr):
    """[BLOCK_P, S2P] softmax weight of one tap for every child, recomputed from its logit and
    the statistics of _softmax_stats (inv = 1 / sum)."""
    x = tl.load(logit_ptr + off, mask=pq_mask, other=0.0).to(ACC)
    return tl.exp(x - mx) * inv


@triton.jit
def _carafe_fwd_kernel(feat_ptr, mask_ptr, out_ptr, C, H, W, G, Cg, K: tl.constexpr,
                       S: tl.constexpr, FUSED: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_P: tl.constexpr, S2P: tl.constexpr, ACC: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    ng = tl.program_id(2)
    n = ng // G
    g = ng % G
    HW = H * W
    sW = S * W
    K2: tl.constexpr = K * K
    p, pmask, h, w, q, qmask, i, j = _tile(pid_p, HW, W, S, BLOCK_P, S2P)
    pq_mask = pmask[:, None] & qmask[None, :]
    cl = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cl < Cg
    # int64 plane bases: N·C·sH·sW may pass 2^31 even when one plane does not.
    chan = (n * C + g * Cg + cl).to(tl.int64)
    yx = _child_offset(h, w, i, j, S, sW)
    if FUSED:
        lbase = (ng * K2).to(tl.int64) * (S * S * HW)
        mx, den = _softmax_stats(mask_ptr, lbase, p, q, pq_mask, HW, K2, S, BLOCK_P, S2P, ACC)
        inv = 1.0 / den
    else:
        mbase = (ng * K2).to(tl.int64) * (HW * S * S)
    acc = tl.zeros((BLOCK_C, BLOCK_P, S2P), ACC)
    for t in range(0, K2):
        f = _tap_features(feat_ptr, chan, cmask, t, h, w, pmask, H, W, K, ACC)
        if FUSED:
            m = _tap_prob(mask_ptr, lbase + t * (S * S * HW) + q[None, :] * HW + p[:, None],
                          pq_mask, mx, inv, ACC)
        else:
            m = tl.load(mask_ptr + mbase + t * (HW * S * S) + yx, mask=pq_mask,
                        other=0.0).to(ACC)
        # One feature load, broadcast over the s² children.
        acc += f[:, :, None] * m[None, :, :]
    omask = cmask[:, None, None] & pq_mask[None, :, :]
    tl.store(out_ptr + chan[:, None, None] * (HW * S * S) + yx[None, :, :],
             acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _carafe_bwd_mask_kernel(go_ptr, feat_ptr, mask_ptr, gm_ptr, lse_ptr, C, H, W, G, Cg,
                            K: tl.constexpr, S: tl.constexpr, FUSED: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, S2P: tl.constexpr,
                            ACC: tl.constexpr):
    """gm (ACC dtype, zero-initialised, mask layout or logit layout) receives dL/dmask or
    dL/dlogit of the tile; only this program touches those elements."""
    pid_p = tl.program_id(0)
    ng = tl.program_id(1)
    n = ng // G
    g = ng % G
    HW = H * W
    sW = S * W
    K2: tl.constexpr = K * K
    p, pmask, h, w, q, qmask, i, j = _tile(pid_p, HW, W, S, BLOCK_P, S2P)
    pq_mask = pmask[:, None] & qmask[None, :]
    yx = _child_offset(h, w, i, j, S, sW)
    gbase = (ng * K2).to(tl.int64) * (HW * S * S)
    if FUSED:
        # Logit layout: tap t, child q at plane t·s² + q.
        goff = q[None, :] * HW + p[:, None]
    else:
        goff = yx
    for c0 in range(0, Cg, BLOCK_C):
        cl = c0 + tl.arange(0, BLOCK_C)
        cmask = cl < Cg
        chan = (n * C + g * Cg + cl).to(tl.int64)
        go = tl.load(go_ptr + chan[:, None, None] * (HW * S * S) + yx[None, :, :],
                     mask=cmask[:, None, None] & pq_mask[None, :, :], other=0.0).to(ACC)
        for t in range(0, K2):
            f = _tap_features(feat_ptr, chan, cmask, t, h, w, pmask, H, W, K, ACC)
            part = tl.sum(go * f[:, :, None], axis=0)
            ptrs = gm_ptr + gbase + t * (HW * S * S) + goff
            tl.store(ptrs, tl.load(ptrs, mask=pq_mask, other=0.0) + part, mask=pq_mask)
        # The next chunk reads back what this one wrote; keep the threads in step.
        tl.debug_barrier()
    if FUSED:
        lbase = gbase
        mx, den = _softmax_stats(mask_ptr, lbase, p, q, pq_mask, HW, K2, S, BLOCK_P, S2P, ACC)
        inv = 1.0 / den
        dot = tl.zeros((BLOCK_P, S2P), ACC)
        for t in range(0, K2):
            off = lbase + t * (S * S * HW) + goff
            pr = _tap_prob(mask_ptr, off, pq_mask, mx, inv, ACC)
            dot += pr * tl.load(gm_ptr + off, mask=pq_mask, other=0.0)
        # dp is overwritten in place below; every read above must be done first.
        tl.debug_barrier()
        for t in range(0, K2):
            off = lbase + t * (S * S * HW) + goff
            pr = _tap_prob(mask_ptr, off, pq_mask, mx, inv, ACC)
            dp = tl.load(gm_ptr + off, mask=pq_mask, other=0.0)
            tl.store(gm_ptr + off, pr * (dp - dot), mask=pq_mask)
        # Per-child log-sum-exp, for the feature gradient: p_t = exp(logit_t - lse).
        tl.store(lse_ptr + ng.to(tl.int64) * (S * S * HW) + goff, mx + tl.log(den), mask=pq_mask)


@triton.jit
def _carafe_bwd_feat_kernel(go_ptr, mask_ptr, lse_ptr, gf_ptr, C, H, W, G, Cg, K: tl.constexpr,
                            S: tl.constexpr, FUSED: tl.constexpr, BLOCK_C: tl.constexpr,
                            BLOCK_P: tl.constexpr, S2P: tl.constexpr, ACC: tl.constexpr):
    """dL/dfeatures of a tile of low-resolution pixels (hh, ww): for tap (ky, kx), the children of
    the source pixel (hh + r - ky, ww + r - kx) whose windows cover (hh, ww)."""
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    ng = tl.program_id(2)
    n = ng // G
    g = ng % G
    HW = H * W
    sW = S * W
    K2: tl.constexpr = K * K
    R: tl.constexpr = (K - 1) // 2
    p, pmask, hh, ww, q, qmask, i, j = _tile(pid_p, HW, W, S, BLOCK_P, S2P)
    cl = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cl < Cg
    chan = (n * C + g * Cg + cl).to(tl.int64)
    mbase = (ng * K2).to(tl.int64) * (HW * S * S)
    acc = tl.zeros((BLOCK_C, BLOCK_P), ACC)
    for t in range(0, K2):
        ky = t // K
        kx = t % K
        h = hh + R - ky
        w = ww + R - kx
        ok = pmask & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        okq = ok[:, None] & qmask[None, :]
        yx = _child_offset(h, w, i, j, S, sW)
        if FUSED:
            src = q[None, :] * HW + (h * W + w)[:, None]
            x = tl.load(mask_ptr + mbase + t * (S * S * HW) + src, mask=okq, other=0.0).to(ACC)
            lse = tl.load(lse_ptr + ng.to(tl.int64) * (S * S * HW) + src, mask=okq, other=0.0)
            m = tl.where(okq, tl.exp(x - lse), 0.0)
        else:
            m = tl.load(mask_ptr + mbase + t * (HW * S * S) + yx, mask=okq, other=0.0).to(ACC)
        go = tl.load(go_ptr + chan[:, None, None] * (HW * S * S) + yx[None, :, :],
                     mask=cmask[:, None, None] & okq[None, :, :], other=0.0).to(ACC)
        acc += tl.sum(go * m[None, :, :], axis=2)
    tl.store(gf_ptr + chan[:, None] * HW + p[None, :], acc.to(gf_ptr.dtype.element_ty),
             mask=cmask[:, None] & pmask[None, :])


# ---- launch helpers ---------------------------------------------------------------------------

def _acc_dtype(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _blocks(Cg: int, s: int, HW: int):
    """(BLOCK_C, BLOCK_P, S2P). The tile holds about 4096 accumulators (BLOCK_C·BLOCK_P·S2P)
    on a GPU; the interpreter runs each program as numpy calls, so it gets bigger tiles. Small
    images get a tile no wider than the image."""
    s2p = triton.next_power_of_2(s * s)
    budget = 16384 if INTERPRET else 4096
    block_c = min(triton.next_power_of_2(max(Cg, 1)), 32)
    block_p = max(16, min(128, budget // (block_c * s2p), triton.next_power_of_2(max(HW, 1))))
    return block_c, block_p, s2p


def _check(op, features, masks, k, G, s, fused, grad_out=None):
    # The public functions validate first; these guard direct torch.ops callers.
    if features.dim() != 4 or masks.dim() != 4:
        raise ValueError(f"{op}: features and masks must be 4-D, got {tuple(features.shape)} "
                         f"and {tuple(masks.shape)}")
    if features.dtype != masks.dtype or features.device != masks.device:
        raise ValueError(f"{op}: features and masks must share dtype and device, got "
                         f"{features.dtype}/{features.device} and {masks.dtype}/{masks.device}")
    if k < 1 or k % 2 == 0 or G < 1 or s < 1:
        raise ValueError(f"{op}: need odd kernel_size >= 1, group_size >= 1, scale_factor >= 1, "
                         f"got {k}, {G}, {s}")
    N, C, H, W = features.shape
    if C % G:
        raise ValueError(f"{op}: channels of 'features' ({C}) must be divisible by group_size "
                         f"({G})")
    expected = (N, G * k * k * s * s, H, W) if fused else (N, G * k * k, s * H, s * W)
    if tuple(masks.shape) != expected:
        name = "mask_logits" if fused else "masks"
        raise ValueError(f"{op}: argument '{name}' must have shape {expected}, got "
                         f"{tuple(masks.shape)}")
    if grad_out is not None and tuple(grad_out.shape) != (N, C, s * H, s * W):
        raise ValueError(f"{op}: argument 'grad_out' must have shape {(N, C, s * H, s * W)}, got "
                         f"{tuple(grad_out.shape)}")
    # Offsets inside one plane (and across the k²·s² logit planes of a group) are int32.
    if max(s * s * H * W, k * k * s * s * H * W) > INT32_MAX:
        raise ValueError(f"{op}: a (G, k², sH, sW) mask group of {k * k * s * s * H * W} elements "
                         f"exceeds the int32 index range of the Triton kernels")


def _forward(features, masks, k, G, s, fused):
    _check("carafe_fused_forward" if fused else "carafe_forward", features, masks, k, G, s, fused)
    features, masks = features.contiguous(), masks.contiguous()
    N, C, H, W = features.shape
    out = features.new_empty((N, C, s * H, s * W))
    if out.numel() == 0:
        return out
    Cg = C // G
    acc, _ = _acc_dtype(features.dtype)
    bc, bp, s2p = _blocks(Cg, s, H * W)
    grid = (triton.cdiv(H * W, bp), triton.cdiv(Cg, bc), N * G)
    with device_guard(features):
        _carafe_fwd_kernel[grid](features, masks, out, C, H, W, G, Cg, K=k, S=s, FUSED=fused,
                                 BLOCK_C=bc, BLOCK_P=bp, S2P=s2p, ACC=acc)
    return out


def _backward(grad_out, features, masks, k, G, s, fused):
    _check("carafe_fused_backward" if fused else "carafe_backward", features, masks, k, G, s,
           fused, grad_out)
    grad_out, features, masks = grad_out.contiguous(), features.contiguous(), masks.contiguous()
    N, C, H, W = features.shape
    Cg = C // G
    acc, acc_torch = _acc_dtype(features.dtype)
    grad_features = features.new_empty(features.shape)
    # Scratch in the accumulation dtype: the kernels add partial sums into it chunk by chunk.
    grad_masks = torch.zeros(masks.shape, dtype=acc_torch, device=masks.device)
    if N == 0 or H == 0 or W == 0 or C == 0:
        grad_features.zero_()
        return grad_features, grad_masks.to(masks.dtype)
    bc, bp, s2p = _blocks(Cg, s, H * W)
    lse = (torch.empty((N, G, s * s, H, W), dtype=acc_torch, device=features.device)
           if fused else grad_masks)
    with device_guard(features):
        _carafe_bwd_mask_kernel[(triton.cdiv(H * W, bp), N * G)](
            grad_out, features, masks, grad_masks, lse, C, H, W, G, Cg, K=k, S=s, FUSED=fused,
            BLOCK_C=bc, BLOCK_P=bp, S2P=s2p, ACC=acc)
        _carafe_bwd_feat_kernel[(triton.cdiv(H * W, bp), triton.cdiv(Cg, bc), N * G)](
            grad_out, masks, lse, grad_features, C, H, W, G, Cg, K=k, S=s, FUSED=fused,
            BLOCK_C=bc, BLOCK_P=bp, S2P=s2p, ACC=acc)
    return grad_features, grad_masks.to(masks.dtype)


# ---- the registered Triton twins of the C++ ops ----------------------------------------------

@torch.library.custom_op("armnet_ops::carafe_forward_triton", mutates_args=())
def carafe_forward_triton(features: torch.Tensor, masks: torch.Tensor, kernel_size: int,
                          group_size: int, scale_factor: int) -> torch.Tensor:
    return _forward(features, masks, kernel_size, group_size, scale_factor, False)


@torch.library.custom_op("armnet_ops::carafe_backward_triton", mutates_args=())
def carafe_backward_triton(grad_out: torch.Tensor, features: torch.Tensor, masks: torch.Tensor,
                           kernel_size: int, group_size: int, scale_factor: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(grad_out, features, masks, kernel_size, group_size, scale_factor, False)


@torch.library.custom_op("armnet_ops::carafe_fused_forward_triton", mutates_args=())
def carafe_fused_forward_triton(features: torch.Tensor, mask_logits: torch.Tensor,
                                kernel_size: int, group_size: int,
                                scale_factor: int) -> torch.Tensor:
    return _forward(features, mask_logits, kernel_size, group_size, scale_factor, True)


@torch.library.custom_op("armnet_ops::carafe_fused_backward_triton", mutates_args=())
def carafe_fused_backward_triton(grad_out: torch.Tensor, features: torch.Tensor,
                                 mask_logits: torch.Tensor, kernel_size: int, group_size: int,
                                 scale_factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(grad_out, features, mask_logits, kernel_size, group_size, scale_factor, True)


# The op module registers the fake kernels and autograd. (`armnet_ops.carafe` the attribute is the
# public function, so the module is fetched by its full name.)
importlib.import_module("armnet_ops.carafe").register("_triton")

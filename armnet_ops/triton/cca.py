"""Criss-cross attention in Triton: the fused forward and its deterministic backward, the
residual block (y = gamma·out + x), and CCNet's two-op API (cca_weight / cca_map, at the end).

What it computes: out_u = sum_s softmax_s(scale·<q_u, k_s>)·v_s over the H+W-1 keys of pixel u,
its row (itself included) and its column (itself excluded), SPEC §3.1.

Layout. The kernels read q, k, v (and grad_out) in NHWC, channels_last: every pixel's channel
vector is contiguous, so a [pixels, channels] tile is read with whole 32-byte sectors in the row
pass *and* in the column pass. channels_last inputs are used without a copy; NCHW q, k, v go
through one transpose each (`_nhwc`), whose cost the traffic model counts; an NCHW grad_out is
copied to NHWC by `_line_dot`, which reads it anyway. Outputs are contiguous NCHW; they are
written by the row pass, whose pixels are adjacent in NCHW. The column pass's results go to an
NHWC buffer, the partial, which the row pass reads and adds in op-math. The partial is in the
input dtype for fp16/bf16, as in the CUDA kernels: half the bytes of float32, at the cost of a
second rounding of the column part of the result, by at most 2^-8 (bf16) / 2^-11 (fp16) of the
column keys' share sum_col P_s |v_s| (tests/test_cca_triton.py derives the bound and checks it,
and that the error stays below the einsum formulation's in the same dtype). float32 and float64
keep an op-math partial.

Tiles. Every kernel works on a *line*, a row or a column, and holds the whole line along one
axis: BL = next_pow2(L) ≥ 16 keys (the forward, dq) or pixels (dk, dv), so each program computes
its probability tile P [BT, BL] once and reuses it for all of Cv, which it walks in BC-channel
chunks in a software-pipelined loop (tl.range(num_stages=STAGES)). The other axis is tiled by BT
pixels (or keys), chosen so that BT·BL fits the register budget (`_tiles`); at L ≤ 128 in 16 bits
one tile covers the line (BT = BL), so v is read once per pass. Products are tl.dot (wgmma/mma
on sm_90 for fp16/bf16, fp32 accumulation; fp32 inputs use input_precision="ieee", no TF32, and
smaller tiles). 8 warps. Lines longer than the budget allows still run (BT = 16), with a larger
register footprint. The dk/dv kernel walks Cv in 16-channel chunks (BC_KEY), the others in 64.
The backward halves its budget past 128 (BL = 256: BT = 32, mma.sync instead of wgmma, which
spills at BT = 64); the forward doubles it at BL = 256 (BT = 128: a 256-pixel row in two tiles,
wgmma, no spill, tests/test_cca_triton.py).
Grid: (N·lines, tiles per line). sm_90 build at (2, 64, 512, 97, 97) in bf16 (tests/triton_aot.py,
Triton 3.8 and 3.6): every kernel wgmma (HGMMA), cp.async pipelined loads, no spill; registers
forward 138-245, dq 174-186, dk/dv 226-250 (_line_dot 184-197, 4 warps).

Forward, two launches of `_fwd_line` (never materialises the energy):
  1. column pass: per pixel the column log-sum-exp lse_c and the column output normalised by it,
     O_c = sum_s exp(e_s - lse_c) v_s, into the partial; lse_c into lse.
  2. row pass: the row log-sum-exp lse_r, merged with lse_c: lse = logaddexp(lse_r, lse_c) is the
     softmax state of the pixel over all H+W-1 keys. out = sum_row exp(e_s - lse) v_s
     + exp(lse_c - lse)·O_c, rounded once (the column part twice in 16 bits, through the
     partial); lse overwritten with the merged value; with the residual epilogue also
     y = gamma·out + x from the same accumulator, gamma read on the device.
Saved for the backward: out and lse (N, H, W) in the op-math type.

Backward (recomputes P from lse; deterministic, no atomics):
  `_line_dot`: D_u = <dO_u, O_u> per pixel (reads grad and out along rows, NCHW; writes the
    NHWC copy of an NCHW grad from the same load).
  dP_us = <dO_u, v_s>, dS = P (dP - D) scale.
  * `_bwd_query_line` (pixel tile × the whole line of keys): dP over all Cv chunks, then
    dq = dS·K.
  * `_bwd_key_line` (key tile × the whole line of pixels): per Cv chunk dP^T += V·dO^T and
    dv = P^T·dO (P^T computed once, reused for every chunk), then dk = dS^T·Q.
  Each launched for the column then the row pass; the column pass writes the partial, the row
  pass adds it and writes the result in the input dtype. For the residual op the kernels read
  grad_y, and dO = gamma·grad_y: every gradient is linear in dO, so each dq, dk, dv tile is
  multiplied by gamma once before it is stored (GAMMA); grad_gamma = sum_u D_u (a float64 sum of
  the (N, H, W) partials, deterministic).

Traffic model: every load and store the kernels issue, nothing assumed served from a cache
(benchmarks/traffic_triton.py computes it). With s the input itemsize, a the op-math itemsize
(4; 8 for float64), b the partials' (s in 16 bits, else a), P = N·H·W pixels, t_c = ceil(H / BT)
and t_r = ceil(W / BT) tiles per column and per row (`_tiles`: 1 for lines up to 128 in 16 bits;
BT = 16 at L = 128 in 32 bits; BT = 128 in the forward and 32 in the backward at
128 < L <= 256 in 16 bits), and X = 0 for channels_last inputs (and grad_out), 1 for NCHW ones:
  forward  = X·2·s·P·(2·Cqk + Cv)                       transposes of q, k, v
           + 2·s·P·Cqk + s·P·(Cqk + Cv)·(t_c + t_r)      q tiles; the line's k and v per tile
           + 2·b·P·Cv + s·P·Cv + 3·a·P                   partial written and read; out; lse
           (+ 2·s·P·Cv with the residual: x read, y written)
  backward = X·s·P·(4·Cqk + 3·Cv)                       transposes of q, k, v; grad's NHWC copy
           + 2·s·P·Cv + a·P                               D = <grad_out, out>
           + sum over the two passes (t = t_c, t_r):
               s·P·(Cqk + Cv)·(1 + t) + 2·a·P             dq kernel: q, grad; k, v per tile
             + s·P·(2·Cqk + Cv)·(1 + t) + 2·a·P·t         dk/dv kernel: k twice, v; q twice,
                                                           grad, lse, D per tile
           + 2·b·P·(2·Cqk + Cv) + s·P·(2·Cqk + Cv)       partials; dq, dk, dv
The minimum is the inputs read once and the outputs written once. In bf16 (python3
benchmarks/traffic_triton.py), channels_last / NCHW inputs:
  (2, 64, 512, 97, 97)    forward  106.2 / 154.4 MB against 43.4 MB (2.45x / 3.55x),
                          backward 294.5 / 362.0 MB against 86.8 MB (3.39x / 4.17x);
  (1, 64, 512, 128, 256)  forward  222.7 / 306.6 MB against 75.6 MB (2.94x / 4.05x),
                          backward 1072.6 / 1190.0 MB against 151.1 MB (7.10x / 7.87x).
At 97 one tile covers a line, and what is left above the minimum is the two-pass structure: both
passes read q, k and v (a pixel's keys are a row and a column, which no program holds together),
the column pass's share reaches the row pass through the partial (the row pass writes the NCHW
outputs along w), and lse is written, read and rewritten (2·a·P, 0.3% of the minimum). NCHW
inputs add the transposes: the column pass needs NHWC (a column of an NCHW tensor is one element
per 32-byte sector); reading NCHW q, k, v directly in the row pass would save no bytes, the copy
exists for the column pass anyway. At 128 x 256 the 256-key rows take 2 tiles in the forward and
8 in the backward (the register budget), each reading the line's k and v (q and grad). The
two-op kernels move: _line_pair the inputs per tile like the forward plus the energy written
once; _line_aggregate the energy once, the line of y per tile, the op-math partial and the
output.

Accumulation is float32 (float64 for float64 inputs). float64 tl.dot runs in the interpreter; on
GPUs Triton lowers it to FMA (or DMMA), not verified here.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import cca as _cca
from . import device_guard

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Largest tile along the tiled axis of a line (pixels or keys); the other axis holds the whole
# line. Tests lower it to 16 to run several tiles per line, and their masks, on small images.
MAX_TILE = 128
# Elements of a [BT, BL] float32 tile a program may hold (8 warps: 64 registers a thread for
# each such tile), for 16-bit inputs; 32- and 64-bit ones get 1/WIDE_BUDGET_DIVISOR of it.
TILE_BUDGET = 16384
WIDE_BUDGET_DIVISOR = 8
NUM_WARPS = 8
STAGES = 2  # software pipelining of the Cv-chunk loops
INT32_MAX = 2**31 - 1


# ---- shared pieces of the line kernels ----------------------------------------------------------

@triton.jit
def _line_of(n_lines):
    """Grid axis 0 -> (image n, line), int64 so that every offset built from them is int64."""
    pid = tl.program_id(0)
    return (pid // n_lines).to(tl.int64), (pid % n_lines).to(tl.int64)


@triton.jit
def _span(start, B: tl.constexpr, L):
    """Indices start + [0, B) and which of them lie in [0, L)."""
    i = start + tl.arange(0, B)
    return i, i < L


@triton.jit
def _tile(B: tl.constexpr, L):
    """This program's tile of B indices along the line (grid axis 1, int64), and its mask."""
    return _span(tl.program_id(1).to(tl.int64) * B, B, L)


@triton.jit
def _load_tile(base, r, rmask, sr, c, cmask, sc):
    """[R, C] tile base[r·sr + c·sc], zero where a row or a column is masked."""
    return tl.load(base + r[:, None] * sr + c[None, :] * sc, mask=rmask[:, None] & cmask[None, :],
                   other=0.0)


@triton.jit
def _valid(p, pmask, s, smask, EXCLUDE_SELF: tl.constexpr):
    """[BP, BS]: which (pixel, key) pairs are real: both in the line, and in a column pass the
    key is not the pixel itself (already counted as a row key)."""
    ok = pmask[:, None] & smask[None, :]
    if EXCLUDE_SELF:
        ok = ok & (p[:, None] != s[None, :])
    return ok


@triton.jit
def _store_pass(acc, r, rmask, c, cmask, part_ptr, sp_r, sp_c, o_ptr, so_r, so_c, carry,
                FINAL: tl.constexpr, ACC: tl.constexpr):
    """Ends a [R, C] result tile of one pass. The column pass (not FINAL) writes it to the
    op-math partial (NHWC); the row pass (FINAL) adds carry·partial and writes the result to o
    in o's dtype, rounded once. Returns the full op-math tile."""
    m = rmask[:, None] & cmask[None, :]
    part = part_ptr + r[:, None] * sp_r + c[None, :] * sp_c
    if FINAL:
        acc += carry * tl.load(part, mask=m, other=0.0).to(ACC)
        tl.store(o_ptr + r[:, None] * so_r + c[None, :] * so_c,
                 acc.to(o_ptr.dtype.element_ty), mask=m)
    else:
        tl.store(part, acc.to(part_ptr.dtype.element_ty), mask=m)
    return acc


@triton.jit
def _times_gamma(acc, gamma_ptr, GAMMA: tl.constexpr, ACC: tl.constexpr):
    """A gradient tile of the residual op times gamma, the gradient of out being gamma·grad_y
    and every gradient linear in it: once per output tile, gamma read on the device (never a
    host synchronisation)."""
    if GAMMA:
        acc = acc * tl.load(gamma_ptr).to(ACC)
    return acc


@triton.jit
def _probs(q_tile, kt, lse, p, pmask, s, smask, scale, EXCLUDE_SELF: tl.constexpr,
           ACC: tl.constexpr, PREC: tl.constexpr):
    """[BP, BS] attention weights exp(scale·<q_p, k_s> - lse_p), recomputed from the Q tile and
    K^T; 0 off the key set."""
    e = tl.dot(q_tile, kt, input_precision=PREC, out_dtype=ACC) * scale
    return tl.where(_valid(p, pmask, s, smask, EXCLUDE_SELF), tl.exp(e - lse[:, None]), 0.0)


@triton.jit
def _probs_t(k_tile, qt, lse, p, pmask, s, smask, scale, EXCLUDE_SELF: tl.constexpr,
             ACC: tl.constexpr, PREC: tl.constexpr):
    """The weights transposed, [BS, BP] (keys x pixels), recomputed from the K tile and Q^T."""
    et = tl.dot(k_tile, qt, input_precision=PREC, out_dtype=ACC) * scale
    valid = tl.trans(_valid(p, pmask, s, smask, EXCLUDE_SELF))
    return tl.where(valid, tl.exp(et - lse[None, :]), 0.0)


@triton.jit
def _weights_times(prob, v_base, s, smask, sv_pos, svc, CV, p, pmask, part_base, sp_pos, spc,
                   o_base, so_pos, soc, carry, x_base, sx_pos, sxc, y_base, gamma_ptr,
                   FINAL: tl.constexpr, EPILOGUE: tl.constexpr, BC: tl.constexpr,
                   STAGES: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """out[p, c] = sum_s prob[p, s]·v[s, c] for every BC-chunk of the CV channels (pipelined),
    prob kept in registers, each chunk ended by _store_pass; with EPILOGUE also
    y = gamma·out + x (y shares o's strides)."""
    for c0 in tl.range(0, CV, BC, num_stages=STAGES):
        c, cmask = _span(c0, BC, CV)
        v_tile = _load_tile(v_base, s, smask, sv_pos, c, cmask, svc)
        acc = tl.dot(prob, v_tile, input_precision=PREC, out_dtype=ACC)
        acc = _store_pass(acc, p, pmask, c, cmask, part_base, sp_pos, spc, o_base, so_pos, soc,
                          carry, FINAL, ACC)
        if EPILOGUE:
            gamma = tl.load(gamma_ptr).to(ACC)
            x = _load_tile(x_base, p, pmask, sx_pos, c, cmask, sxc)
            tl.store(y_base + p[:, None] * so_pos + c[None, :] * soc,
                     (gamma * acc + x.to(ACC)).to(y_base.dtype.element_ty),
                     mask=pmask[:, None] & cmask[None, :])


@triton.jit
def _contract(a_base, r, rmask, sa_r, sa_c, b_base, s, smask, sb_c, sb_s, C,
              BR: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr, STAGES: tl.constexpr,
              ACC: tl.constexpr, PREC: tl.constexpr):
    """[BR, BS] = sum_c A[r, c]·B[c, s] over C channels, BC at a time, pipelined (dP = dO·V^T,
    the energy pair)."""
    acc = tl.zeros([BR, BS], ACC)
    for c0 in tl.range(0, C, BC, num_stages=STAGES):
        c, cmask = _span(c0, BC, C)
        a = _load_tile(a_base, r, rmask, sa_r, c, cmask, sa_c)
        b = _load_tile(b_base, c, cmask, sb_c, s, smask, sb_s)
        acc += tl.dot(a, b, input_precision=PREC, out_dtype=ACC)
    return acc


@triton.jit
def _ds_product(prob, dp, dd, scale, x_tile, gamma_ptr, r, rmask, c, cmask,
                part_ptr, sp_r, sp_c, o_ptr, so_r, so_c, FINAL: tl.constexpr, GAMMA: tl.constexpr,
                ACC: tl.constexpr, PREC: tl.constexpr):
    """Ends dq (or dk, transposed): dS = P (dP - D) scale, with D broadcast as given, times the
    K (or Q) tile, times gamma, stored for this pass."""
    ds = prob * (dp - dd) * scale
    acc = tl.dot(ds.to(x_tile.dtype), x_tile, input_precision=PREC, out_dtype=ACC)
    acc = _times_gamma(acc, gamma_ptr, GAMMA, ACC)
    _store_pass(acc, r, rmask, c, cmask, part_ptr, sp_r, sp_c, o_ptr, so_r, so_c, 1.0, FINAL, ACC)


# ---- the fused op's kernels ---------------------------------------------------------------------

@triton.jit
def _fwd_line(q_ptr, k_ptr, v_ptr, lse_ptr, part_ptr, o_ptr, x_ptr, y_ptr, gamma_ptr,
              L, n_lines, D, CV, scale,
              sqn, sqc, sq_line, sq_pos, skn, skc, sk_line, sk_pos, svn, svc, sv_line, sv_pos,
              sln, sl_line, sl_pos, spn, spc, sp_line, sp_pos, son, soc, so_line, so_pos,
              sxn, sxc, sx_line, sx_pos,
              FINAL: tl.constexpr, EXCLUDE_SELF: tl.constexpr, EPILOGUE: tl.constexpr,
              BP: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
              STAGES: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """One pass of the forward for a tile of BP pixels of a line and all its BL keys: P [BP, BL]
    once, then out (or the partial) for every Cv chunk. The column pass writes the partial and
    its lse; the row pass (FINAL) merges its state with them and writes out (y, lse)."""
    n, line = _line_of(n_lines)
    p, pmask = _tile(BP, L)
    s, smask = _span(0, BL, L)
    d, dmask = _span(0, BD, D)
    q_tile = _load_tile(q_ptr + n * sqn + line * sq_line, p, pmask, sq_pos, d, dmask, sqc)
    kt = _load_tile(k_ptr + n * skn + line * sk_line, d, dmask, skc, s, smask, sk_pos)
    valid = _valid(p, pmask, s, smask, EXCLUDE_SELF)
    e = tl.where(valid, tl.dot(q_tile, kt, input_precision=PREC, out_dtype=ACC) * scale,
                 float("-inf"))
    # A finite floor for the max: an empty key set (H = 1 in a column pass, or a padded pixel)
    # gives exp(-inf - m) = 0 rather than NaN, and its lse is -inf.
    m = tl.maximum(tl.max(e, 1), -1.0e30)
    total = tl.sum(tl.exp(e - m[:, None]), 1)
    lse = tl.where(total > 0, m + tl.log(tl.maximum(total, 1.0e-30)), float("-inf"))
    lse_off = lse_ptr + n * sln + line * sl_line + p * sl_pos
    carry = 0.0
    if FINAL:
        # Merge with the column pass's state: lse = logaddexp(lse_row, lse_col); its normalised
        # output enters with weight exp(lse_col - lse). lse_row is finite for every real pixel.
        lse_c = tl.load(lse_off, mask=pmask, other=float("-inf")).to(ACC)
        top = tl.maximum(lse, lse_c)
        top = tl.where(top > -1.0e30, top, 0.0)
        lse = top + tl.log(tl.exp(lse - top) + tl.exp(lse_c - top))
        carry = tl.exp(lse_c - lse)[:, None]
    tl.store(lse_off, lse, mask=pmask)
    prob = tl.where(valid, tl.exp(e - lse[:, None]), 0.0).to(v_ptr.dtype.element_ty)
    _weights_times(prob, v_ptr + n * svn + line * sv_line, s, smask, sv_pos, svc, CV, p, pmask,
                   part_ptr + n * spn + line * sp_line, sp_pos, spc,
                   o_ptr + n * son + line * so_line, so_pos, soc, carry,
                   x_ptr + n * sxn + line * sx_line, sx_pos, sxc,
                   y_ptr + n * son + line * so_line, gamma_ptr, FINAL, EPILOGUE, BC, STAGES, ACC,
                   PREC)


@triton.jit
def _line_dot(a_ptr, b_ptr, d_ptr, copy_ptr, L, n_lines, C, san, sac, sa_line, sa_pos,
              sbn, sbc, sb_line, sb_pos, sdn, sd_line, sd_pos, scn, scc, sc_line, sc_pos,
              COPY: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    """d_u = <a_u, b_u> over the C channels, for a tile of pixels of a row: the backward's
    D_u = <grad_u, out_u>, without a (N, C, H, W) product in memory. With COPY, a is also
    written to copy (its NHWC copy for the line kernels), from the same load: the transpose of
    an NCHW grad costs its write only."""
    n, line = _line_of(n_lines)
    p, pmask = _tile(BP, L)
    a_base = a_ptr + n * san + line * sa_line
    b_base = b_ptr + n * sbn + line * sb_line
    acc = tl.zeros([BP], ACC)
    for c0 in range(0, C, BC):
        c, cmask = _span(c0, BC, C)
        a = _load_tile(a_base, c, cmask, sac, p, pmask, sa_pos)
        b = _load_tile(b_base, c, cmask, sbc, p, pmask, sb_pos).to(ACC)
        if COPY:
            tl.store(copy_ptr + n * scn + line * sc_line + c[:, None] * scc + p[None, :] * sc_pos,
                     a, mask=cmask[:, None] & pmask[None, :])
        acc += tl.sum(a.to(ACC) * b, 0)
    tl.store(d_ptr + n * sdn + line * sd_line + p * sd_pos, acc, mask=pmask)


@triton.jit
def _bwd_query_line(q_ptr, k_ptr, v_ptr, go_ptr, lse_ptr, dd_ptr, gamma_ptr, part_ptr, dq_ptr,
                    L, n_lines, D, CV, scale,
                    sqn, sqc, sq_line, sq_pos, skn, skc, sk_line, sk_pos,
                    svn, svc, sv_line, sv_pos, sgn, sgc, sg_line, sg_pos, sln, sl_line, sl_pos,
                    spn, spc, sp_line, sp_pos, son, soc, so_line, so_pos,
                    FINAL: tl.constexpr, EXCLUDE_SELF: tl.constexpr, GAMMA: tl.constexpr,
                    BP: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
                    STAGES: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """dq for a tile of BP pixels and all BL keys of the line: dP = dO·V^T over the Cv chunks
    (pipelined), then P recomputed (cheap: Cqk channels), dS and dq = dS·K."""
    n, line = _line_of(n_lines)
    p, pmask = _tile(BP, L)
    s, smask = _span(0, BL, L)
    d, dmask = _span(0, BD, D)
    dp = _contract(go_ptr + n * sgn + line * sg_line, p, pmask, sg_pos, sgc,
                   v_ptr + n * svn + line * sv_line, s, smask, svc, sv_pos, CV,
                   BP, BL, BC, STAGES, ACC, PREC)
    q_tile = _load_tile(q_ptr + n * sqn + line * sq_line, p, pmask, sq_pos, d, dmask, sqc)
    lse = tl.load(lse_ptr + n * sln + line * sl_line + p * sl_pos, mask=pmask, other=0.0)
    dd = tl.load(dd_ptr + n * sln + line * sl_line + p * sl_pos, mask=pmask, other=0.0)
    # The line's K read once: transposed for P, as it is for dq.
    k_tile = _load_tile(k_ptr + n * skn + line * sk_line, s, smask, sk_pos, d, dmask, skc)
    prob = _probs(q_tile, tl.trans(k_tile), lse, p, pmask, s, smask, scale, EXCLUDE_SELF, ACC,
                  PREC)
    _ds_product(prob, dp, dd[:, None], scale, k_tile, gamma_ptr, p, pmask, d, dmask,
                part_ptr + n * spn + line * sp_line, sp_pos, spc,
                dq_ptr + n * son + line * so_line, so_pos, soc, FINAL, GAMMA, ACC, PREC)


@triton.jit
def _bwd_key_line(q_ptr, k_ptr, v_ptr, go_ptr, lse_ptr, dd_ptr, gamma_ptr,
                  dk_part_ptr, dk_ptr, dv_part_ptr, dv_ptr, L, n_lines, D, CV, scale,
                  sqn, sqc, sq_line, sq_pos, skn, skc, sk_line, sk_pos,
                  svn, svc, sv_line, sv_pos, sgn, sgc, sg_line, sg_pos, sln, sl_line, sl_pos,
                  spkn, spkc, spk_line, spk_pos, sokn, sokc, sok_line, sok_pos,
                  spvn, spvc, spv_line, spv_pos, sovn, sovc, sov_line, sov_pos,
                  FINAL: tl.constexpr, EXCLUDE_SELF: tl.constexpr, GAMMA: tl.constexpr,
                  BS: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
                  STAGES: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """dk and dv for a tile of BS keys and all BL pixels of the line that see them (transposed
    tiles: keys are the rows). P^T [BS, BL] once; per Cv chunk dv = P^T·dO and dP^T += V·dO^T;
    then dS^T and dk = dS^T·Q."""
    n, line = _line_of(n_lines)
    s, smask = _tile(BS, L)
    p, pmask = _span(0, BL, L)
    d, dmask = _span(0, BD, D)
    q_base = q_ptr + n * sqn + line * sq_line
    k_base = k_ptr + n * skn + line * sk_line
    lse = tl.load(lse_ptr + n * sln + line * sl_line + p * sl_pos, mask=pmask, other=0.0)
    k_tile = _load_tile(k_base, s, smask, sk_pos, d, dmask, skc)
    qt = _load_tile(q_base, d, dmask, sqc, p, pmask, sq_pos)
    pt_lo = _probs_t(k_tile, qt, lse, p, pmask, s, smask, scale, EXCLUDE_SELF, ACC,
                     PREC).to(go_ptr.dtype.element_ty)
    v_base = v_ptr + n * svn + line * sv_line
    go_base = go_ptr + n * sgn + line * sg_line
    dpt = tl.zeros([BS, BL], ACC)
    for c0 in tl.range(0, CV, BC, num_stages=STAGES):
        c, cmask = _span(c0, BC, CV)
        go = _load_tile(go_base, p, pmask, sg_pos, c, cmask, sgc)
        v_tile = _load_tile(v_base, s, smask, sv_pos, c, cmask, svc)
        dpt += tl.dot(v_tile, tl.trans(go), input_precision=PREC, out_dtype=ACC)
        dv = _times_gamma(tl.dot(pt_lo, go, input_precision=PREC, out_dtype=ACC), gamma_ptr,
                          GAMMA, ACC)
        _store_pass(dv, s, smask, c, cmask, dv_part_ptr + n * spvn + line * spv_line, spv_pos,
                    spvc, dv_ptr + n * sovn + line * sov_line, sov_pos, sovc, 1.0, FINAL, ACC)
    # P^T again in float32 for dS^T (cheap: Cqk channels), rather than kept through the loop.
    # The line's Q is read a second time, once for both P^T and dk. The K tile is reloaded:
    # kept live through the loop it spills in fp32 (sm_90, BL = 128, BS = 16: 120-168 bytes).
    q_tile = _load_tile(q_base, p, pmask, sq_pos, d, dmask, sqc)
    k_tile = _load_tile(k_base, s, smask, sk_pos, d, dmask, skc)
    pt = _probs_t(k_tile, tl.trans(q_tile), lse, p, pmask, s, smask, scale, EXCLUDE_SELF, ACC,
                  PREC)
    dd = tl.load(dd_ptr + n * sln + line * sl_line + p * sl_pos, mask=pmask, other=0.0)
    _ds_product(pt, dpt, dd[None, :], scale, q_tile, gamma_ptr, s, smask, d, dmask,
                dk_part_ptr + n * spkn + line * spk_line, spk_pos, spkc,
                dk_ptr + n * sokn + line * sok_line, sok_pos, sokc, FINAL, GAMMA, ACC, PREC)


# ---- the two-op API (CCNet's ca_weight / ca_map) ------------------------------------------
# energy (N, H+W-1, H, W): channel z < W is the row key (h, z), channel W + i the column key (j, w)
# with j = i if i < h else i + 1. In line terms: a row pass stores key s of pixel p in channel s;
# a column pass (EXCLUDE_SELF) in channel W + s - (s > p), and never s = p. Two generic kernels
# cover the four ops and their backwards, each launched for the column and the row pass, on the
# same tiles as the fused op (a BT tile of the line against the whole line, BL):
#   _line_pair:      E[p, s] = sum_c X[p, c] Y[s, c]       (cca_weight: q, k; grad attn: dO, v)
#                    Cv-chunked, pipelined; E written once (the two passes own disjoint channels).
#   _line_aggregate: out[i, c] = sum_j M'[i, j] Y[j, c] with M' = M, or M^T (TRANSPOSED):
#                    (cca_map: attn, v; grad q: gE, k; grad k: gE^T, q; grad v: attn^T, dO).
#                    The M' tile is read once and reused for every chunk of C; the column pass
#                    writes the op-math partial, the row pass adds it and writes out.
# Every output element is written by one program: deterministic, no atomics. X and Y are read in
# NHWC like the fused op; the energy's layout is the API's, so its column-pass accesses are
# strided (one element per sector in the worst case): the two-op API moves the energy anyway.

@triton.jit
def _energy_channel(p, s, CH0, EXCLUDE_SELF: tl.constexpr):
    """[BP, BS] channel of key s of pixel p in the energy layout, int32: offsets inside one
    image's energy are int32 (`_check_energy`), half the registers of an int64 tile.

    One return statement: Triton 3.6 type-checks the statements after a return inside a taken
    constexpr branch too, and with p and s of different integer types two returns had different
    types ("Inconsistent return types")."""
    if EXCLUDE_SELF:
        ch = CH0 + s[None, :] - (s[None, :] > p[:, None]).to(s.dtype)
    else:
        ch = CH0 + s[None, :] + 0 * p[:, None]
    return ch.to(tl.int32)


@triton.jit
def _line_pair(x_ptr, y_ptr, e_ptr, L, n_lines, C, CH0,
               sxn, sxc, sx_line, sx_pos, syn, syc, sy_line, sy_pos, sen, sec, se_line, se_pos,
               EXCLUDE_SELF: tl.constexpr, BP: tl.constexpr, BL: tl.constexpr,
               BC: tl.constexpr, STAGES: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    n, line = _line_of(n_lines)
    p, pmask = _tile(BP, L)
    s, smask = _span(0, BL, L)
    acc = _contract(x_ptr + n * sxn + line * sx_line, p, pmask, sx_pos, sxc,
                    y_ptr + n * syn + line * sy_line, s, smask, syc, sy_pos, C,
                    BP, BL, BC, STAGES, ACC, PREC)
    ch = _energy_channel(p, s, CH0, EXCLUDE_SELF)
    off = e_ptr + n * sen + line * se_line + (p.to(tl.int32)[:, None] * se_pos + ch * sec)
    tl.store(off, acc.to(e_ptr.dtype.element_ty), mask=_valid(p, pmask, s, smask, EXCLUDE_SELF))


@triton.jit
def _line_aggregate(m_ptr, y_ptr, part_ptr, o_ptr, L, n_lines, C, CH0,
                    smn, smc, sm_line, sm_pos, syn, syc, sy_line, sy_pos,
                    spn, spc, sp_line, sp_pos, son, soc, so_line, so_pos,
                    FINAL: tl.constexpr, EXCLUDE_SELF: tl.constexpr, TRANSPOSED: tl.constexpr,
                    BI: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr, STAGES: tl.constexpr,
                    ACC: tl.constexpr, PREC: tl.constexpr):
    """out[i, c] = sum_j M'[i, j] Y[j, c] over the positions j of the line; M is read from the
    energy layout as M[p = i, s = j], or transposed as M[p = j, s = i]."""
    n, line = _line_of(n_lines)
    i, imask = _tile(BI, L)
    j, jmask = _span(0, BL, L)
    m_base = m_ptr + n * smn + line * sm_line
    if TRANSPOSED:
        valid = tl.trans(_valid(j, jmask, i, imask, EXCLUDE_SELF))   # [BI, BL]
        ch = tl.trans(_energy_channel(j, i, CH0, EXCLUDE_SELF))
        m_off = m_base + (j[None, :] * sm_pos + ch * smc)
    else:
        valid = _valid(i, imask, j, jmask, EXCLUDE_SELF)
        ch = _energy_channel(i, j, CH0, EXCLUDE_SELF)
        m_off = m_base + (i.to(tl.int32)[:, None] * sm_pos + ch * smc)
    m = tl.load(m_off, mask=valid, other=0.0).to(y_ptr.dtype.element_ty)
    o_base = o_ptr + n * son + line * so_line
    # No epilogue: the x, y and gamma pointers are never read.
    _weights_times(m, y_ptr + n * syn + line * sy_line, j, jmask, sy_pos, syc, C, i, imask,
                   part_ptr + n * spn + line * sp_line, sp_pos, spc, o_base, so_pos, soc, 1.0,
                   o_base, so_pos, soc, o_base, o_ptr, FINAL, False, BC, STAGES, ACC, PREC)


# ---- launch helpers -------------------------------------------------------------------------

def _line_strides(t: torch.Tensor, row: bool):
    """(n, channel, line, position) strides of an (N, C, H, W) tensor for a row or column pass."""
    sn, sc, sh, sw = t.stride()
    return (sn, sc, sh, sw) if row else (sn, sc, sw, sh)


def _map_strides(t: torch.Tensor, row: bool):
    """(n, line, position) strides of an (N, H, W) statistic."""
    sn, sh, sw = t.stride()
    return (sn, sh, sw) if row else (sn, sw, sh)


def _acc_dtype(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _prec(dtype: torch.dtype) -> str:
    # "ieee" keeps fp32 products in fp32 (no TF32); for 16-bit inputs it changes nothing.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """t with contiguous per-pixel channel vectors: itself when it is channels_last already,
    else one transpose."""
    return t.contiguous(memory_format=torch.channels_last)


def _nhwc_empty(like: torch.Tensor, channels: int, dtype: torch.dtype) -> torch.Tensor:
    """An (N, channels, H, W) NHWC buffer: a column pass's partial result (read back by the row
    pass), or the backward's NHWC copy of grad."""
    N, _, H, W = like.shape
    return torch.empty((N, channels, H, W), dtype=dtype, device=like.device,
                       memory_format=torch.channels_last)


def _partial_dtype(dtype: torch.dtype) -> torch.dtype:
    """The fused op's partials: the input dtype for fp16/bf16 (half the bytes of float32; the
    column part of the result is rounded twice, to at most 2^-8 (bf16) / 2^-11 (fp16) of itself
    more, tests/test_cca_triton.py), the op-math type for float32/float64 (no second rounding)."""
    return dtype if dtype.itemsize == 2 else _acc_dtype(dtype)[1]


def _tiles(L: int, dtype: torch.dtype, compiled: bool = not _INTERPRET, backward: bool = False):
    """(BT, BL): BL = the whole line (tl.dot needs every dimension >= 16), BT the tiled axis,
    as large as the register budget allows (one tile per line up to L = 128 in 16 bits). The
    interpreter (compiled=False) has no registers to spare: it takes the 16-bit tiles."""
    BL = max(16, triton.next_power_of_2(L))
    budget = TILE_BUDGET
    if dtype.itemsize > 2 and compiled:
        # 32/64-bit products run on FMA (no TF32), whose operands sit in registers too.
        budget //= WIDE_BUDGET_DIVISOR
    if backward and compiled and BL > 128:
        # The backward kernels hold two [BT, BL] tiles (P and dP); past 128 keys the 16-bit
        # budget spills (sm_90, BL = 256: 100-700 bytes at BT = 64, none at BT = 32).
        budget //= 2
    elif compiled and dtype.itemsize == 2 and BL == 256:
        # The forward (and the two-op kernels) hold one [BT, BL] float32 tile, the energies then
        # P: at 256 keys twice the budget fits (sm_90: BT = 128, 224-254 registers, no spill),
        # and a 256-pixel row pass reads its line's k and v twice rather than four times. Not
        # at 512 (BT = 64 spills 1.1-1.4 KB).
        budget *= 2
    return max(16, min(MAX_TILE, BL, budget // BL)), BL


def _chunk(C: int) -> int:
    """Channels per step of a channel loop (Cv for the products with v, Cqk for cca_weight)."""
    return max(16, min(64, triton.next_power_of_2(C)))


def _passes(q):
    """(row?, line length L, number of lines, EXCLUDE_SELF) for the column then the row pass:
    the row pass is the last, it writes the NCHW outputs along their contiguous w."""
    _, _, H, W = q.shape
    return ((False, H, W, True), (True, W, H, False))


def _grid(N, n_lines, L, BT):
    # Lines on axis 0 (up to 2^31 - 1 programs), tiles of a line on axis 1 (L / 16 at most).
    return (N * n_lines, triton.cdiv(L, BT))


def _forward(q, k, v, scale, residual=None, gamma=None):
    """(y, out, lse); y = gamma·out + residual is written by the row pass of _fwd_line when
    residual is given, else y is None."""
    N, D, H, W = q.shape
    CV = v.shape[1]
    acc_tl, acc_torch = _acc_dtype(q.dtype)
    out = torch.empty((N, CV, H, W), dtype=v.dtype, device=v.device)
    lse = torch.empty((N, H, W), dtype=acc_torch, device=q.device)
    epilogue = residual is not None
    y = torch.empty_like(out) if epilogue else None
    if N * H * W == 0:
        return y, out.zero_(), lse
    qn, kn, vn = _nhwc(q), _nhwc(k), _nhwc(v)
    part = _nhwc_empty(v, CV, _partial_dtype(v.dtype))
    # Unused pointers (no epilogue) point at out; EPILOGUE=False never reads them.
    x, yy, g = (residual, y, gamma) if epilogue else (out, out, out)
    BD = max(16, triton.next_power_of_2(D))
    with device_guard(q):
        for final, (row, L, n_lines, excl) in zip((False, True), _passes(q)):
            BT, BL = _tiles(L, q.dtype)
            _fwd_line[_grid(N, n_lines, L, BT)](
                qn, kn, vn, lse, part, out, x, yy, g, L, n_lines, D, CV, float(scale),
                *_line_strides(qn, row), *_line_strides(kn, row), *_line_strides(vn, row),
                *_map_strides(lse, row), *_line_strides(part, row), *_line_strides(out, row),
                *_line_strides(x, row), FINAL=final, EXCLUDE_SELF=excl,
                EPILOGUE=epilogue and final, BP=BT, BL=BL, BD=BD, BC=_chunk(CV), STAGES=STAGES,
                ACC=acc_tl, PREC=_prec(q.dtype), num_warps=NUM_WARPS)
    return y, out, lse


@torch.library.custom_op("armnet_ops::cca_forward_triton", mutates_args=())
def cca_forward_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    _, out, lse = _forward(q, k, v, scale)
    return out, lse


@torch.library.custom_op("armnet_ops::cca_residual_forward_triton", mutates_args=())
def cca_residual_forward_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                residual: torch.Tensor, gamma: torch.Tensor,
                                scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _cca.check_residual_op("cca_residual_forward_triton", v, gamma, residual)
    return _forward(q, k, v, scale, residual, gamma)


def _backward(grad, q, k, v, out, lse, scale, gamma=None):
    """(dq, dk, dv, D) with D_u = <grad_u, out_u> (N, H, W) in the op-math type. The gradient of
    out is grad, or gamma·grad when gamma is given (the residual op's grad_y): the kernels apply
    gamma as a factor, read from its pointer."""
    N, D, H, W = q.shape
    CV = v.shape[1]
    acc_tl, acc_torch = _acc_dtype(q.dtype)
    dd = torch.zeros((N, H, W), dtype=acc_torch, device=q.device)
    # Contiguous gradients, whatever the input strides (the fake kernels say so).
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    if N * H * W == 0:
        return dq, dk, dv, dd
    prec = _prec(q.dtype)
    grad = grad.to(v.dtype)
    lse = lse.to(acc_torch).contiguous()
    has_gamma = gamma is not None
    g = gamma if has_gamma else lse  # never read without GAMMA
    BD = max(16, triton.next_power_of_2(D))
    BC = _chunk(CV)
    # The key kernel holds P^T, dP^T and a dv chunk: quarter-width chunks (16 channels at Cv >= 64)
    # keep it in registers (sm_90, BL = 128, bf16: 255 registers and no spill; 32 spilled).
    BC_KEY = max(16, BC // 4)
    # grad in NHWC for the line kernels: itself when channels_last, else written by _line_dot.
    copy = not grad.is_contiguous(memory_format=torch.channels_last)
    gn = _nhwc_empty(grad, CV, grad.dtype) if copy else grad
    with device_guard(q):
        if CV > 0:
            BP, _ = _tiles(W, q.dtype)
            _line_dot[_grid(N, H, W, BP)](
                grad, out, dd, gn, W, H, CV, *_line_strides(grad, True),
                *_line_strides(out, True), *_map_strides(dd, True), *_line_strides(gn, True),
                COPY=copy, BP=BP, BC=BC, ACC=acc_tl, num_warps=4)
        qn, kn, vn = _nhwc(q), _nhwc(k), _nhwc(v)
        part_dtype = _partial_dtype(q.dtype)
        dq_p, dk_p, dv_p = (_nhwc_empty(q, D, part_dtype), _nhwc_empty(k, D, part_dtype),
                            _nhwc_empty(v, CV, part_dtype))
        for final, (row, L, n_lines, excl) in zip((False, True), _passes(q)):
            BT, BL = _tiles(L, q.dtype, backward=True)
            common = dict(FINAL=final, EXCLUDE_SELF=excl, GAMMA=has_gamma, BL=BL, BD=BD,
                          STAGES=STAGES, ACC=acc_tl, PREC=prec, num_warps=NUM_WARPS)
            inputs = (*_line_strides(qn, row), *_line_strides(kn, row), *_line_strides(vn, row),
                      *_line_strides(gn, row), *_map_strides(lse, row))
            _bwd_query_line[_grid(N, n_lines, L, BT)](
                qn, kn, vn, gn, lse, dd, g, dq_p, dq, L, n_lines, D, CV, float(scale), *inputs,
                *_line_strides(dq_p, row), *_line_strides(dq, row), BP=BT, BC=BC, **common)
            _bwd_key_line[_grid(N, n_lines, L, BT)](
                qn, kn, vn, gn, lse, dd, g, dk_p, dk, dv_p, dv, L, n_lines, D, CV, float(scale),
                *inputs, *_line_strides(dk_p, row), *_line_strides(dk, row),
                *_line_strides(dv_p, row), *_line_strides(dv, row), BS=BT, BC=BC_KEY, **common)
    return dq, dk, dv, dd


@torch.library.custom_op("armnet_ops::cca_backward_triton", mutates_args=())
def cca_backward_triton(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        out: torch.Tensor, lse: torch.Tensor,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad_out, q, k, v, out, lse, scale)[:3]


@torch.library.custom_op("armnet_ops::cca_residual_backward_triton", mutates_args=())
def cca_residual_backward_triton(
        grad_y: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
        lse: torch.Tensor, gamma: torch.Tensor,
        scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _cca.check_residual_op("cca_residual_backward_triton", v, gamma)
    dq, dk, dv, dd = _backward(grad_y, q, k, v, out, lse, scale, gamma)
    # grad_gamma = sum_u <grad_y_u, out_u>: a sum of a fixed-shape tensor, deterministic, formed in
    # float64 (N·H·W terms).
    grad_gamma = dd.sum(dtype=torch.float64).to(gamma.dtype).reshape(gamma.shape)
    return dq, dk, dv, grad_gamma


def _check_energy(op: str, e: torch.Tensor):
    """The energy kernels index inside one image's (H+W-1, H, W) energy with int32 offsets."""
    reach = sum((size - 1) * abs(stride) for size, stride in zip(e.shape[1:], e.stride()[1:]))
    if reach > INT32_MAX:
        raise ValueError(f"{op}: one image's energy spans {reach + 1} elements (shape "
                         f"{tuple(e.shape)}, strides {e.stride()}); the Triton kernels index it "
                         f"with int32, at most {INT32_MAX + 1}")


def _pair(x, y, e):
    """e (energy layout) = <x_p, y_s> for the keys of every pixel, column then row pass."""
    N, C, H, W = x.shape
    _check_energy("cca_weight_triton", e)
    acc_tl, _ = _acc_dtype(x.dtype)
    xn, yn = _nhwc(x), _nhwc(y)
    with device_guard(x):
        for row, L, n_lines, excl in _passes(x):
            BT, BL = _tiles(L, x.dtype)
            _line_pair[_grid(N, n_lines, L, BT)](
                xn, yn, e, L, n_lines, C, 0 if row else W,
                *_line_strides(xn, row), *_line_strides(yn, row), *_line_strides(e, row),
                EXCLUDE_SELF=excl, BP=BT, BL=BL, BC=_chunk(C), STAGES=STAGES, ACC=acc_tl,
                PREC=_prec(x.dtype), num_warps=NUM_WARPS)


def _aggregate(m, y, transposed: bool, out_dtype: torch.dtype):
    """out[·, c] = sum over the keys (or over the pixels, transposed) of M times y."""
    N, C, H, W = y.shape
    acc_tl, acc_torch = _acc_dtype(y.dtype)
    out = torch.empty((N, C, H, W), dtype=out_dtype, device=y.device)
    if out.numel() == 0:
        return out.zero_()
    _check_energy("cca_map_triton", m)
    part = _nhwc_empty(y, C, acc_torch)
    yn = _nhwc(y)
    with device_guard(y):
        for final, (row, L, n_lines, excl) in zip((False, True), _passes(y)):
            BT, BL = _tiles(L, y.dtype)
            _line_aggregate[_grid(N, n_lines, L, BT)](
                m, yn, part, out, L, n_lines, C, 0 if row else W,
                *_line_strides(m, row), *_line_strides(yn, row), *_line_strides(part, row),
                *_line_strides(out, row), FINAL=final, EXCLUDE_SELF=excl, TRANSPOSED=transposed,
                BI=BT, BL=BL, BC=_chunk(C), STAGES=STAGES, ACC=acc_tl, PREC=_prec(y.dtype),
                num_warps=NUM_WARPS)
    return out


@torch.library.custom_op("armnet_ops::cca_weight_triton", mutates_args=())
def cca_weight_triton(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    N, _, H, W = q.shape
    e = torch.empty((N, H + W - 1, H, W), dtype=q.dtype, device=q.device)
    if e.numel() > 0:
        _pair(q, k, e)
    return e


@torch.library.custom_op("armnet_ops::cca_weight_backward_triton", mutates_args=())
def cca_weight_backward_triton(grad_energy: torch.Tensor, q: torch.Tensor,
                               k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = grad_energy.to(q.dtype)
    return _aggregate(g, k, False, q.dtype), _aggregate(g, q, True, k.dtype)


@torch.library.custom_op("armnet_ops::cca_map_triton", mutates_args=())
def cca_map_triton(attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _aggregate(attn, v, False, v.dtype)


@torch.library.custom_op("armnet_ops::cca_map_backward_triton", mutates_args=())
def cca_map_backward_triton(grad_out: torch.Tensor, attn: torch.Tensor,
                            v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    go = grad_out.to(v.dtype)
    N, _, H, W = v.shape
    grad_attn = torch.empty((N, H + W - 1, H, W), dtype=attn.dtype, device=v.device)
    if grad_attn.numel() > 0:
        _pair(go, v, grad_attn)
    return grad_attn, _aggregate(attn, go, True, v.dtype)


_cca.register("_triton")

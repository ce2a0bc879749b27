"""Criss-cross attention in Triton: the fused forward and its deterministic backward, and CCNet's
two-op API (cca_weight / cca_map, at the end of the file).

What it computes: out_u = sum_s softmax_s(scale·<q_u, k_s>)·v_s over the H+W-1 keys of pixel u,
its row (itself included) and its column (itself excluded), SPEC §3.1.

Design: every kernel is written once for a *line*, a row or a column, and launched twice. A row
pass sees the line h, its W positions along w and its keys (h, z), z in [0, W); a column pass sees
the line w, its H positions along h and its keys (j, w) with j != h (EXCLUDE_SELF). Only the
(line, position) strides differ, so channels_last and other strides need no copy.

Forward (never materialises the (N, H+W-1, H, W) energy):
  1. `_line_lse`, row and column pass: per pixel the log-sum-exp of its row energies and of its
     column energies, by an online softmax over key tiles; merged with logaddexp into lse.
  2. `_line_out`, row pass then column pass: out = sum_s exp(scale·<q,k_s> - lse)·v_s, tiled
     over Cv (grid axis 2), the q·k and p·v products with tl.dot (tensor cores on GPU; P is cast
     to v's dtype for the second product as in flash-attention). The column pass adds to what the
     row pass wrote (two launches in stream order, so no atomics) and writes the final out; for
     the residual op (cca_residual_forward) it also writes y = gamma·out + residual from the same
     float32 accumulator, gamma read from its pointer.
Saved for the backward: out and lse (N, H, W) in the op-math type (float32; float64 for float64).

Backward (recomputes the weights from lse):
  `_line_dot`: D_u = <dO_u, O_u> per pixel, over Cv in tiles.
  dS = P (dP - D) scale with dP = <dO_u, v_s>.
  For the residual op the kernels read grad_y, and dO = gamma·grad_y: every gradient is linear
  in dO, so D, dP and the sums run on grad_y and each dq, dk, dv tile is multiplied by gamma
  once before it is stored (GAMMA); grad_gamma = sum_u D_u (a float64 sum of the (N, H, W)
  partials, deterministic).
  * `_line_dq`: per pixel tile, dq = sum_s dS k_s; dP by tl.dot tiled over Cv.
  * `_line_dk`: per key tile, dk = sum_u dS q_u over the pixels u of the line that see the key.
  * `_line_dv`: per key tile and Cv tile, dv = sum_u P dO_u.
  The key tiles gather over the pixels that attend to them (the row of a key in the row pass, its
  column in the column pass), and the column pass adds to the row pass's result: deterministic.

Accumulation is float32 (float64 for float64 inputs). Low-precision results of the two passes are
summed in a float32 buffer and rounded once. fp32 products use input_precision="ieee" (no TF32:
the fp32 contract is 1e-4). float64 tl.dot runs in the interpreter; on GPUs Triton lowers it to
FMA (or DMMA), not verified here.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import cca as _cca

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Largest tile along a line (pixels and keys). Tests lower it to 16 to run the multi-tile loops
# and their masks on small images.
MAX_TILE = 128 if _INTERPRET else 64


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
def _tile(AXIS: tl.constexpr, B: tl.constexpr, L):
    """This program's tile of B indices along grid axis AXIS (int64), and its mask."""
    return _span(tl.program_id(AXIS).to(tl.int64) * B, B, L)


@triton.jit
def _load_tile(base, r, rmask, sr, c, cmask, sc):
    """[R, C] tile base[r·sr + c·sc], zero where a row or a column is masked."""
    return tl.load(base + r[:, None] * sr + c[None, :] * sc, mask=rmask[:, None] & cmask[None, :],
                   other=0.0)


@triton.jit
def _store_tile(base, r, rmask, sr, c, cmask, sc, acc, ACCUMULATE: tl.constexpr,
                ACC: tl.constexpr):
    """Writes acc to the [R, C] tile; the second pass (ACCUMULATE) adds what the first wrote."""
    off = base + r[:, None] * sr + c[None, :] * sc
    omask = rmask[:, None] & cmask[None, :]
    if ACCUMULATE:
        acc += tl.load(off, mask=omask, other=0.0).to(ACC)
    tl.store(off, acc.to(base.dtype.element_ty), mask=omask)


@triton.jit
def _contract(a_base, r, rmask, sa_r, sa_c, b_base, s, smask, sb_c, sb_s, C,
              BR: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr,
              PREC: tl.constexpr):
    """[BR, BS] = sum_c A[r, c]·B[c, s] over C channels, BC at a time (tiles read with strides)."""
    acc = tl.zeros([BR, BS], ACC)
    for c0 in range(0, C, BC):
        c, cmask = _span(c0, BC, C)
        a = _load_tile(a_base, r, rmask, sa_r, c, cmask, sa_c)
        b = _load_tile(b_base, c, cmask, sb_c, s, smask, sb_s)
        acc += tl.dot(a, b, input_precision=PREC, out_dtype=ACC)
    return acc


@triton.jit
def _energy(q_tile, k_base, s, smask, d, dmask, skc, sk_pos, scale,
            ACC: tl.constexpr, PREC: tl.constexpr):
    """scale·Q·K^T for one key tile: Q [BP, BD] (pixels x channels), keys s [BS] -> [BP, BS]."""
    kt = _load_tile(k_base, d, dmask, skc, s, smask, sk_pos)
    return tl.dot(q_tile, kt, input_precision=PREC, out_dtype=ACC) * scale


@triton.jit
def _valid(p, pmask, s, smask, EXCLUDE_SELF: tl.constexpr):
    """[BP, BS]: which (pixel, key) pairs are real: both in the line, and in a column pass the
    key is not the pixel itself (already counted as a row key)."""
    ok = pmask[:, None] & smask[None, :]
    if EXCLUDE_SELF:
        ok = ok & (p[:, None] != s[None, :])
    return ok


@triton.jit
def _probs(q_tile, k_base, lse, p, pmask, s, smask, d, dmask, skc, sk_pos, scale,
           EXCLUDE_SELF: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """[BP, BS] attention weights exp(scale·<q_p, k_s> - lse_p), recomputed; 0 off the key set."""
    e = _energy(q_tile, k_base, s, smask, d, dmask, skc, sk_pos, scale, ACC, PREC)
    return tl.where(_valid(p, pmask, s, smask, EXCLUDE_SELF), tl.exp(e - lse[:, None]), 0.0)


@triton.jit
def _probs_t(k_tile, qt, lse, p, pmask, s, smask, scale, EXCLUDE_SELF: tl.constexpr,
             ACC: tl.constexpr, PREC: tl.constexpr):
    """The weights transposed, [BS, BP] (keys x pixels), from a key tile and a transposed Q tile."""
    et = tl.dot(k_tile, qt, input_precision=PREC, out_dtype=ACC) * scale
    valid = tl.trans(_valid(p, pmask, s, smask, EXCLUDE_SELF))
    return tl.where(valid, tl.exp(et - lse[None, :]), 0.0)


# ---- the fused op's kernels ---------------------------------------------------------------------

@triton.jit
def _line_lse(q_ptr, k_ptr, lse_ptr, L, n_lines, D, scale,
              sqn, sqc, sq_line, sq_pos, skn, skc, sk_line, sk_pos, sln, sl_line, sl_pos,
              EXCLUDE_SELF: tl.constexpr, BP: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
              ACC: tl.constexpr, PREC: tl.constexpr):
    n, line = _line_of(n_lines)
    p, pmask = _tile(1, BP, L)
    d, dmask = _span(0, BD, D)
    k_base = k_ptr + n * skn + line * sk_line
    q_tile = _load_tile(q_ptr + n * sqn + line * sq_line, p, pmask, sq_pos, d, dmask, sqc)
    # A finite start for the running max: a fully masked tile (H = 1 in a column pass) then gives
    # exp(-inf - m) = 0 rather than NaN, and the lse of an empty key set is -inf.
    m = tl.full([BP], -1.0e30, ACC)
    acc_l = tl.zeros([BP], ACC)
    for s0 in range(0, L, BS):
        s, smask = _span(s0, BS, L)
        e = _energy(q_tile, k_base, s, smask, d, dmask, skc, sk_pos, scale, ACC, PREC)
        e = tl.where(_valid(p, pmask, s, smask, EXCLUDE_SELF), e, float("-inf"))
        m_new = tl.maximum(m, tl.max(e, 1))
        acc_l = acc_l * tl.exp(m - m_new) + tl.sum(tl.exp(e - m_new[:, None]), 1)
        m = m_new
    # log of a clamped sum: no log(0) is evaluated, the empty key set still gets -inf.
    lse = tl.where(acc_l > 0, m + tl.log(tl.maximum(acc_l, 1.0e-30)), float("-inf"))
    tl.store(lse_ptr + n * sln + line * sl_line + p * sl_pos, lse, mask=pmask)


@triton.jit
def _times_gamma(acc, gamma_ptr, GAMMA: tl.constexpr, ACC: tl.constexpr):
    """A gradient tile of the residual op times gamma, the gradient of out being gamma·grad_y
    and every gradient linear in it: once per output tile, gamma read on the device (never a
    host synchronisation)."""
    if GAMMA:
        acc = acc * tl.load(gamma_ptr).to(ACC)
    return acc


@triton.jit
def _line_out(q_ptr, k_ptr, v_ptr, lse_ptr, prior_ptr, o_ptr, x_ptr, y_ptr, gamma_ptr,
              L, n_lines, D, CV, scale,
              sqn, sqc, sq_line, sq_pos, skn, skc, sk_line, sk_pos, svn, svc, sv_line, sv_pos,
              sln, sl_line, sl_pos, son, soc, so_line, so_pos, sxn, sxc, sx_line, sx_pos,
              EXCLUDE_SELF: tl.constexpr, ACCUMULATE: tl.constexpr, EPILOGUE: tl.constexpr,
              BP: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
              ACC: tl.constexpr, PREC: tl.constexpr):
    """out for a tile of pixels and a tile of Cv. The row pass writes its partial sum to o (an
    op-math buffer for 16-bit inputs); the column pass (ACCUMULATE) adds the row pass's partial
    from prior, writes the final out to o and, with EPILOGUE, y = gamma·out + x from the same
    op-math accumulator (one rounding). prior, o and y share the so* strides (contiguous NCHW);
    the residual x has its own (sx*)."""
    n, line = _line_of(n_lines)
    p, pmask = _tile(1, BP, L)
    c, cmask = _tile(2, BC, CV)
    d, dmask = _span(0, BD, D)
    k_base = k_ptr + n * skn + line * sk_line
    v_base = v_ptr + n * svn + line * sv_line
    q_tile = _load_tile(q_ptr + n * sqn + line * sq_line, p, pmask, sq_pos, d, dmask, sqc)
    lse = tl.load(lse_ptr + n * sln + line * sl_line + p * sl_pos, mask=pmask, other=0.0)
    acc = tl.zeros([BP, BC], ACC)
    for s0 in range(0, L, BS):
        s, smask = _span(s0, BS, L)
        prob = _probs(q_tile, k_base, lse, p, pmask, s, smask, d, dmask, skc, sk_pos, scale,
                      EXCLUDE_SELF, ACC, PREC)
        v_tile = _load_tile(v_base, s, smask, sv_pos, c, cmask, svc)
        acc += tl.dot(prob.to(v_tile.dtype), v_tile, input_precision=PREC, out_dtype=ACC)
    off = n * son + line * so_line + p[:, None] * so_pos + c[None, :] * soc
    omask = pmask[:, None] & cmask[None, :]
    if ACCUMULATE:
        acc += tl.load(prior_ptr + off, mask=omask, other=0.0).to(ACC)
    tl.store(o_ptr + off, acc.to(o_ptr.dtype.element_ty), mask=omask)
    if EPILOGUE:
        gamma = tl.load(gamma_ptr).to(ACC)
        x = _load_tile(x_ptr + n * sxn + line * sx_line, p, pmask, sx_pos, c, cmask, sxc)
        tl.store(y_ptr + off, (gamma * acc + x.to(ACC)).to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _line_dot(a_ptr, b_ptr, d_ptr, L, n_lines, C, san, sac, sa_line, sa_pos,
              sbn, sbc, sb_line, sb_pos, sdn, sd_line, sd_pos,
              BP: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    """d_u = <a_u, b_u> over the C channels, for a tile of pixels of a row: the backward's
    D_u = <grad_u, out_u>, without a (N, C, H, W) product in memory."""
    n, line = _line_of(n_lines)
    p, pmask = _tile(1, BP, L)
    a_base = a_ptr + n * san + line * sa_line
    b_base = b_ptr + n * sbn + line * sb_line
    acc = tl.zeros([BP], ACC)
    for c0 in range(0, C, BC):
        c, cmask = _span(c0, BC, C)
        a = _load_tile(a_base, c, cmask, sac, p, pmask, sa_pos).to(ACC)
        b = _load_tile(b_base, c, cmask, sbc, p, pmask, sb_pos).to(ACC)
        acc += tl.sum(a * b, 0)
    tl.store(d_ptr + n * sdn + line * sd_line + p * sd_pos, acc, mask=pmask)


@triton.jit
def _line_dq(q_ptr, k_ptr, v_ptr, go_ptr, lse_ptr, dd_ptr, gamma_ptr, dq_ptr, L, n_lines, D, CV,
             scale, sqn, sqc, sq_line, sq_pos, skn, skc, sk_line, sk_pos, svn, svc, sv_line, sv_pos,
             sgn, sgc, sg_line, sg_pos, sln, sl_line, sl_pos, son, soc, so_line, so_pos,
             EXCLUDE_SELF: tl.constexpr, ACCUMULATE: tl.constexpr, GAMMA: tl.constexpr,
             BP: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
             ACC: tl.constexpr, PREC: tl.constexpr):
    """dq for a tile of pixels (so* are the strides of the dq buffer)."""
    n, line = _line_of(n_lines)
    p, pmask = _tile(1, BP, L)
    d, dmask = _span(0, BD, D)
    k_base = k_ptr + n * skn + line * sk_line
    v_base = v_ptr + n * svn + line * sv_line
    go_base = go_ptr + n * sgn + line * sg_line
    q_tile = _load_tile(q_ptr + n * sqn + line * sq_line, p, pmask, sq_pos, d, dmask, sqc)
    lse = tl.load(lse_ptr + n * sln + line * sl_line + p * sl_pos, mask=pmask, other=0.0)
    dd = tl.load(dd_ptr + n * sln + line * sl_line + p * sl_pos, mask=pmask, other=0.0)
    acc = tl.zeros([BP, BD], ACC)
    for s0 in range(0, L, BS):
        s, smask = _span(s0, BS, L)
        prob = _probs(q_tile, k_base, lse, p, pmask, s, smask, d, dmask, skc, sk_pos, scale,
                      EXCLUDE_SELF, ACC, PREC)
        # dP = dO·V^T over all Cv, tile by tile.
        dp = _contract(go_base, p, pmask, sg_pos, sgc, v_base, s, smask, svc, sv_pos, CV,
                       BP, BS, BC, ACC, PREC)
        ds = prob * (dp - dd[:, None]) * scale
        k_tile = _load_tile(k_base, s, smask, sk_pos, d, dmask, skc)
        acc += tl.dot(ds.to(k_tile.dtype), k_tile, input_precision=PREC, out_dtype=ACC)
    acc = _times_gamma(acc, gamma_ptr, GAMMA, ACC)
    _store_tile(dq_ptr + n * son + line * so_line, p, pmask, so_pos, d, dmask, soc, acc,
                ACCUMULATE, ACC)


@triton.jit
def _line_dk(q_ptr, k_ptr, v_ptr, go_ptr, lse_ptr, dd_ptr, gamma_ptr, dk_ptr, L, n_lines, D, CV,
             scale, sqn, sqc, sq_line, sq_pos, skn, skc, sk_line, sk_pos, svn, svc, sv_line, sv_pos,
             sgn, sgc, sg_line, sg_pos, sln, sl_line, sl_pos, son, soc, so_line, so_pos,
             EXCLUDE_SELF: tl.constexpr, ACCUMULATE: tl.constexpr, GAMMA: tl.constexpr,
             BP: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
             ACC: tl.constexpr, PREC: tl.constexpr):
    """dk for a tile of keys, gathered over the pixels of the line (transposed tiles: keys are
    the rows, pixels the columns; so* are the strides of the dk buffer)."""
    n, line = _line_of(n_lines)
    s, smask = _tile(1, BS, L)
    d, dmask = _span(0, BD, D)
    q_base = q_ptr + n * sqn + line * sq_line
    v_base = v_ptr + n * svn + line * sv_line
    go_base = go_ptr + n * sgn + line * sg_line
    k_tile = _load_tile(k_ptr + n * skn + line * sk_line, s, smask, sk_pos, d, dmask, skc)
    acc = tl.zeros([BS, BD], ACC)
    for p0 in range(0, L, BP):
        p, pmask = _span(p0, BP, L)
        qt = _load_tile(q_base, d, dmask, sqc, p, pmask, sq_pos)
        lse = tl.load(lse_ptr + n * sln + line * sl_line + p * sl_pos, mask=pmask, other=0.0)
        dd = tl.load(dd_ptr + n * sln + line * sl_line + p * sl_pos, mask=pmask, other=0.0)
        prob = _probs_t(k_tile, qt, lse, p, pmask, s, smask, scale, EXCLUDE_SELF, ACC, PREC)
        # dP^T = V·dO^T over all Cv.
        dp = _contract(v_base, s, smask, sv_pos, svc, go_base, p, pmask, sgc, sg_pos, CV,
                       BS, BP, BC, ACC, PREC)
        ds = prob * (dp - dd[None, :]) * scale
        acc += tl.dot(ds.to(qt.dtype), tl.trans(qt), input_precision=PREC, out_dtype=ACC)
    acc = _times_gamma(acc, gamma_ptr, GAMMA, ACC)
    _store_tile(dk_ptr + n * son + line * so_line, s, smask, so_pos, d, dmask, soc, acc,
                ACCUMULATE, ACC)


@triton.jit
def _line_dv(q_ptr, k_ptr, go_ptr, lse_ptr, gamma_ptr, dv_ptr, L, n_lines, D, CV, scale,
             sqn, sqc, sq_line, sq_pos, skn, skc, sk_line, sk_pos, sgn, sgc, sg_line, sg_pos,
             sln, sl_line, sl_pos, svn, svc, sv_line, sv_pos,
             EXCLUDE_SELF: tl.constexpr, ACCUMULATE: tl.constexpr, GAMMA: tl.constexpr,
             BP: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
             ACC: tl.constexpr, PREC: tl.constexpr):
    """dv for a tile of keys and a tile of Cv: sum over the pixels of the line of P^T·dO."""
    n, line = _line_of(n_lines)
    s, smask = _tile(1, BS, L)
    c, cmask = _tile(2, BC, CV)
    d, dmask = _span(0, BD, D)
    q_base = q_ptr + n * sqn + line * sq_line
    go_base = go_ptr + n * sgn + line * sg_line
    k_tile = _load_tile(k_ptr + n * skn + line * sk_line, s, smask, sk_pos, d, dmask, skc)
    acc = tl.zeros([BS, BC], ACC)
    for p0 in range(0, L, BP):
        p, pmask = _span(p0, BP, L)
        qt = _load_tile(q_base, d, dmask, sqc, p, pmask, sq_pos)
        lse = tl.load(lse_ptr + n * sln + line * sl_line + p * sl_pos, mask=pmask, other=0.0)
        prob = _probs_t(k_tile, qt, lse, p, pmask, s, smask, scale, EXCLUDE_SELF, ACC, PREC)
        go = _load_tile(go_base, p, pmask, sg_pos, c, cmask, sgc)
        acc += tl.dot(prob.to(go.dtype), go, input_precision=PREC, out_dtype=ACC)
    acc = _times_gamma(acc, gamma_ptr, GAMMA, ACC)
    _store_tile(dv_ptr + n * svn + line * sv_line, s, smask, sv_pos, c, cmask, svc, acc,
                ACCUMULATE, ACC)


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


def _blocks(q: torch.Tensor, v: torch.Tensor, L: int):
    """Tile sizes: tl.dot needs every dimension >= 16. Under the interpreter one tile per line
    where it fits (fewer, larger programs run faster there)."""
    BD = max(16, triton.next_power_of_2(q.shape[1]))
    BC = max(16, min(64, triton.next_power_of_2(v.shape[1])))
    BL = max(16, min(MAX_TILE, triton.next_power_of_2(L)))
    if not _INTERPRET and q.dtype in (torch.float32, torch.float64):
        BL = min(BL, 32)  # 32-bit tiles need twice the registers
    return BL, BD, BC


def _passes(q):
    """(row?, line length L, number of lines, EXCLUDE_SELF) for the row then the column pass."""
    _, _, H, W = q.shape
    return ((True, W, H, False), (False, H, W, True))


def _num_warps():
    return 4


def _forward(q, k, v, scale, residual=None, gamma=None):
    """(y, out, lse); y = gamma·out + residual is written by the column pass of _line_out when
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
    prec = _prec(q.dtype)
    # Row and column log-sum-exp, then merged.
    parts = []
    for row, L, n_lines, excl in _passes(q):
        BL, BD, _ = _blocks(q, v, L)
        part = torch.empty((N, H, W), dtype=acc_torch, device=q.device)
        _line_lse[(N * n_lines, triton.cdiv(L, BL))](
            q, k, part, L, n_lines, D, float(scale),
            *_line_strides(q, row), *_line_strides(k, row), *_map_strides(part, row),
            EXCLUDE_SELF=excl, BP=BL, BS=BL, BD=BD, ACC=acc_tl, PREC=prec, num_warps=_num_warps())
        parts.append(part)
    torch.logaddexp(parts[0], parts[1], out=lse)
    if CV == 0:
        return y, out, lse
    # Low-precision outputs: the row pass writes its partial to a float32 buffer, the column pass
    # adds it and rounds once into out (and y). For fp32/fp64 the buffer is out itself.
    buf = out if out.dtype == acc_torch else torch.empty(out.shape, dtype=acc_torch, device=out.device)
    # Unused pointers (no epilogue) point at out; EPILOGUE=False never reads them.
    x, yy, g = (residual, y, gamma) if epilogue else (out, out, out)
    for i, (row, L, n_lines, excl) in enumerate(_passes(q)):
        BL, BD, BC = _blocks(q, v, L)
        last = i == 1
        _line_out[(N * n_lines, triton.cdiv(L, BL), triton.cdiv(CV, BC))](
            q, k, v, lse, buf, out if last else buf, x, yy, g, L, n_lines, D, CV, float(scale),
            *_line_strides(q, row), *_line_strides(k, row), *_line_strides(v, row),
            *_map_strides(lse, row), *_line_strides(buf, row), *_line_strides(x, row),
            EXCLUDE_SELF=excl, ACCUMULATE=last, EPILOGUE=epilogue and last, BP=BL, BS=BL, BD=BD,
            BC=BC, ACC=acc_tl, PREC=prec, num_warps=_num_warps())
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
    if N * H * W == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dd
    prec = _prec(q.dtype)
    grad = grad.to(v.dtype)
    lse = lse.to(acc_torch).contiguous()
    if CV > 0:
        BL, _, BC = _blocks(q, v, W)
        _line_dot[(N * H, triton.cdiv(W, BL))](
            grad, out, dd, W, H, CV, *_line_strides(grad, True), *_line_strides(out, True),
            *_map_strides(dd, True), BP=BL, BC=BC, ACC=acc_tl, num_warps=_num_warps())
    has_gamma = gamma is not None
    g = gamma if has_gamma else lse  # never read without GAMMA
    # Gradients accumulate over the two passes in op-math buffers (contiguous NCHW).
    dq = torch.empty((N, D, H, W), dtype=acc_torch, device=q.device)
    dk = torch.empty((N, D, H, W), dtype=acc_torch, device=q.device)
    dv = torch.empty((N, CV, H, W), dtype=acc_torch, device=q.device)
    for i, (row, L, n_lines, excl) in enumerate(_passes(q)):
        BL, BD, BC = _blocks(q, v, L)
        common = dict(EXCLUDE_SELF=excl, ACCUMULATE=i > 0, GAMMA=has_gamma, BP=BL, BS=BL, BD=BD,
                      BC=BC, ACC=acc_tl, PREC=prec, num_warps=_num_warps())
        strides = (*_line_strides(q, row), *_line_strides(k, row), *_line_strides(v, row),
                   *_line_strides(grad, row), *_map_strides(lse, row))
        if D > 0:
            _line_dq[(N * n_lines, triton.cdiv(L, BL))](
                q, k, v, grad, lse, dd, g, dq, L, n_lines, D, CV, float(scale), *strides,
                *_line_strides(dq, row), **common)
            _line_dk[(N * n_lines, triton.cdiv(L, BL))](
                q, k, v, grad, lse, dd, g, dk, L, n_lines, D, CV, float(scale), *strides,
                *_line_strides(dk, row), **common)
        if CV > 0:
            _line_dv[(N * n_lines, triton.cdiv(L, BL), triton.cdiv(CV, BC))](
                q, k, grad, lse, g, dv, L, n_lines, D, CV, float(scale),
                *_line_strides(q, row), *_line_strides(k, row), *_line_strides(grad, row),
                *_map_strides(lse, row), *_line_strides(dv, row), **common)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dd


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


# ---- the two-op API (CCNet's ca_weight / ca_map) ------------------------------------------
# energy (N, H+W-1, H, W): channel z < W is the row key (h, z), channel W + i the column key (j, w)
# with j = i if i < h else i + 1. In line terms: a row pass stores key s of pixel p in channel s;
# a column pass (EXCLUDE_SELF) in channel W + s - (s > p), and never s = p. Two generic kernels
# cover the four ops and their backwards, each launched for the row and the column pass:
#   _line_pair:      E[p, s] = sum_c X[p, c] Y[s, c]       (cca_weight: q, k; grad attn: dO, v)
#   _line_aggregate: out[i, c] (+)= sum_j M'[i, j] Y[j, c] (cca_map: attn, v; grad q: gE, k;
#                    with M' = M^T, TRANSPOSED: grad k: gE, q; grad v: attn, dO)
# Every output element is written by one program (the column pass adds to the row pass's result
# in stream order): deterministic, no atomics.

@triton.jit
def _energy_channel(p, s, CH0, EXCLUDE_SELF: tl.constexpr):
    """[BP, BS] channel of key s of pixel p in the energy layout, int64.

    One return statement: Triton 3.6 type-checks the statements after a return inside a taken
    constexpr branch too, and with p int64 and s int32 (_line_aggregate) the two returns had
    different types ("Inconsistent return types")."""
    if EXCLUDE_SELF:
        ch = CH0 + s[None, :] - (s[None, :] > p[:, None]).to(s.dtype)
    else:
        ch = CH0 + s[None, :] + 0 * p[:, None]
    return ch.to(tl.int64)


@triton.jit
def _line_pair(x_ptr, y_ptr, e_ptr, L, n_lines, C, CH0,
               sxn, sxc, sx_line, sx_pos, syn, syc, sy_line, sy_pos, sen, sec, se_line, se_pos,
               EXCLUDE_SELF: tl.constexpr, BP: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr,
               ACC: tl.constexpr, PREC: tl.constexpr):
    n, line = _line_of(n_lines)
    p, pmask = _tile(1, BP, L)
    s, smask = _tile(2, BS, L)
    x_base = x_ptr + n * sxn + line * sx_line
    y_base = y_ptr + n * syn + line * sy_line
    acc = _contract(x_base, p, pmask, sx_pos, sxc, y_base, s, smask, syc, sy_pos, C, BP, BS, BC,
                    ACC, PREC)
    ch = _energy_channel(p, s, CH0, EXCLUDE_SELF)
    off = e_ptr + n * sen + line * se_line + p[:, None] * se_pos + ch.to(tl.int64) * sec
    tl.store(off, acc.to(e_ptr.dtype.element_ty), mask=_valid(p, pmask, s, smask, EXCLUDE_SELF))


@triton.jit
def _line_aggregate(m_ptr, y_ptr, o_ptr, L, n_lines, C, CH0,
                    smn, smc, sm_line, sm_pos, syn, syc, sy_line, sy_pos, son, soc, so_line, so_pos,
                    EXCLUDE_SELF: tl.constexpr, TRANSPOSED: tl.constexpr, ACCUMULATE: tl.constexpr,
                    BI: tl.constexpr, BJ: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr,
                    PREC: tl.constexpr):
    """out[i, c] (+)= sum_j M'[i, j] Y[j, c] over the positions j of the line; M is read from
    the energy layout as M[p = i, s = j], or transposed as M[p = j, s = i]."""
    n, line = _line_of(n_lines)
    i, imask = _tile(1, BI, L)
    c, cmask = _tile(2, BC, C)
    y_base = y_ptr + n * syn + line * sy_line
    acc = tl.zeros([BI, BC], ACC)
    for j0 in range(0, L, BJ):
        j, jmask = _span(j0, BJ, L)
        if TRANSPOSED:
            valid = tl.trans(_valid(j, jmask, i, imask, EXCLUDE_SELF))   # [BI, BJ]
            ch = tl.trans(_energy_channel(j, i, CH0, EXCLUDE_SELF))
            m_off = m_ptr + n * smn + line * sm_line + j[None, :] * sm_pos + ch.to(tl.int64) * smc
        else:
            valid = _valid(i, imask, j, jmask, EXCLUDE_SELF)
            ch = _energy_channel(i, j, CH0, EXCLUDE_SELF)
            m_off = m_ptr + n * smn + line * sm_line + i[:, None] * sm_pos + ch.to(tl.int64) * smc
        m = tl.load(m_off, mask=valid, other=0.0)
        y = _load_tile(y_base, j, jmask, sy_pos, c, cmask, syc)
        acc += tl.dot(m.to(y.dtype), y, input_precision=PREC, out_dtype=ACC)
    _store_tile(o_ptr + n * son + line * so_line, i, imask, so_pos, c, cmask, soc, acc,
                ACCUMULATE, ACC)


def _energy_strides(e: torch.Tensor, row: bool):
    """(n, channel, line, position) strides of an (N, H+W-1, H, W) energy."""
    return _line_strides(e, row)


def _pair(x, y, e):
    """e (energy layout) = <x_p, y_s> for the keys of every pixel, row then column pass."""
    N, C, H, W = x.shape
    acc_tl, _ = _acc_dtype(x.dtype)
    for row, L, n_lines, excl in _passes(x):
        BL, _, BC = _blocks(x, x, L)
        _line_pair[(N * n_lines, triton.cdiv(L, BL), triton.cdiv(L, BL))](
            x, y, e, L, n_lines, C, 0 if row else W,
            *_line_strides(x, row), *_line_strides(y, row), *_energy_strides(e, row),
            EXCLUDE_SELF=excl, BP=BL, BS=BL, BC=BC, ACC=acc_tl, PREC=_prec(x.dtype),
            num_warps=_num_warps())


def _aggregate(m, y, transposed: bool, out_dtype: torch.dtype):
    """out[·, c] = sum over the keys (or over the pixels, transposed) of M times y."""
    N, C, H, W = y.shape
    acc_tl, acc_torch = _acc_dtype(y.dtype)
    out = torch.empty((N, C, H, W), dtype=out_dtype, device=y.device)
    if out.numel() == 0:
        return out.zero_()
    buf = out if out_dtype == acc_torch else torch.empty(out.shape, dtype=acc_torch, device=y.device)
    for k, (row, L, n_lines, excl) in enumerate(_passes(y)):
        BL, _, BC = _blocks(y, y, L)
        _line_aggregate[(N * n_lines, triton.cdiv(L, BL), triton.cdiv(C, BC))](
            m, y, buf, L, n_lines, C, 0 if row else W,
            *_energy_strides(m, row), *_line_strides(y, row), *_line_strides(buf, row),
            EXCLUDE_SELF=excl, TRANSPOSED=transposed, ACCUMULATE=k > 0, BI=BL, BJ=BL, BC=BC,
            ACC=acc_tl, PREC=_prec(y.dtype), num_warps=_num_warps())
    if buf is not out:
        out.copy_(buf)
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

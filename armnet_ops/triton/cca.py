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
     row pass wrote (two launches in stream order, so no atomics).
Saved for the backward: out and lse (N, H, W) in the op-math type (float32; float64 for float64).

Backward (recomputes the weights from lse; D_u = <dO_u, O_u> in PyTorch):
  dS = P (dP - D) scale with dP = <dO_u, v_s>.
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


@triton.jit
def _energy(q_tile, k_ptr, kn, line, s, smask, d, dmask, skc, sk_line, sk_pos, scale,
            ACC: tl.constexpr, PREC: tl.constexpr):
    """scale·Q·K^T for one key tile: Q [BP, BD] (pixels x channels), keys s [BS] -> [BP, BS]."""
    kt = tl.load(k_ptr + kn + line * sk_line + s[None, :] * sk_pos + d[:, None] * skc,
                 mask=dmask[:, None] & smask[None, :], other=0.0)
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
def _line_lse(q_ptr, k_ptr, lse_ptr, L, n_lines, D, scale,
              sqn, sqc, sq_line, sq_pos, skn, skc, sk_line, sk_pos, sln, sl_line, sl_pos,
              EXCLUDE_SELF: tl.constexpr, BP: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
              ACC: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    n = (pid // n_lines).to(tl.int64)
    line = (pid % n_lines).to(tl.int64)
    p = tl.program_id(1).to(tl.int64) * BP + tl.arange(0, BP)
    pmask = p < L
    d = tl.arange(0, BD)
    dmask = d < D
    q_tile = tl.load(q_ptr + n * sqn + line * sq_line + p[:, None] * sq_pos + d[None, :] * sqc,
                     mask=pmask[:, None] & dmask[None, :], other=0.0)
    # A finite start for the running max: a fully masked tile (H = 1 in a column pass) then gives
    # exp(-inf - m) = 0 rather than NaN, and the lse of an empty key set is -inf.
    m = tl.full([BP], -1.0e30, ACC)
    acc_l = tl.zeros([BP], ACC)
    for s0 in range(0, L, BS):
        s = s0 + tl.arange(0, BS)
        smask = s < L
        e = _energy(q_tile, k_ptr, n * skn, line, s, smask, d, dmask, skc, sk_line, sk_pos, scale,
                    ACC, PREC)
        e = tl.where(_valid(p, pmask, s, smask, EXCLUDE_SELF), e, float("-inf"))
        m_new = tl.maximum(m, tl.max(e, 1))
        acc_l = acc_l * tl.exp(m - m_new) + tl.sum(tl.exp(e - m_new[:, None]), 1)
        m = m_new
    # log of a clamped sum: no log(0) is evaluated, the empty key set still gets -inf.
    lse = tl.where(acc_l > 0, m + tl.log(tl.maximum(acc_l, 1.0e-30)), float("-inf"))
    tl.store(lse_ptr + n * sln + line * sl_line + p * sl_pos, lse, mask=pmask)


@triton.jit
def _line_out(q_ptr, k_ptr, v_ptr, lse_ptr, o_ptr, L, n_lines, D, CV, scale,
              sqn, sqc, sq_line, sq_pos, skn, skc, sk_line, sk_pos, svn, svc, sv_line, sv_pos,
              sln, sl_line, sl_pos, son, soc, so_line, so_pos,
              EXCLUDE_SELF: tl.constexpr, ACCUMULATE: tl.constexpr, BP: tl.constexpr,
              BS: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr,
              PREC: tl.constexpr):
    pid = tl.program_id(0)
    n = (pid // n_lines).to(tl.int64)
    line = (pid % n_lines).to(tl.int64)
    p = tl.program_id(1).to(tl.int64) * BP + tl.arange(0, BP)
    pmask = p < L
    c = tl.program_id(2).to(tl.int64) * BC + tl.arange(0, BC)
    cmask = c < CV
    d = tl.arange(0, BD)
    dmask = d < D
    q_tile = tl.load(q_ptr + n * sqn + line * sq_line + p[:, None] * sq_pos + d[None, :] * sqc,
                     mask=pmask[:, None] & dmask[None, :], other=0.0)
    lse = tl.load(lse_ptr + n * sln + line * sl_line + p * sl_pos, mask=pmask, other=0.0)
    acc = tl.zeros([BP, BC], ACC)
    for s0 in range(0, L, BS):
        s = s0 + tl.arange(0, BS)
        smask = s < L
        e = _energy(q_tile, k_ptr, n * skn, line, s, smask, d, dmask, skc, sk_line, sk_pos, scale,
                    ACC, PREC)
        prob = tl.where(_valid(p, pmask, s, smask, EXCLUDE_SELF), tl.exp(e - lse[:, None]), 0.0)
        v_tile = tl.load(v_ptr + n * svn + line * sv_line + s[:, None] * sv_pos + c[None, :] * svc,
                         mask=smask[:, None] & cmask[None, :], other=0.0)
        acc += tl.dot(prob.to(v_tile.dtype), v_tile, input_precision=PREC, out_dtype=ACC)
    o_off = o_ptr + n * son + line * so_line + p[:, None] * so_pos + c[None, :] * soc
    omask = pmask[:, None] & cmask[None, :]
    if ACCUMULATE:
        acc += tl.load(o_off, mask=omask, other=0.0).to(ACC)
    tl.store(o_off, acc.to(o_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _line_dq(q_ptr, k_ptr, v_ptr, go_ptr, lse_ptr, dd_ptr, dq_ptr, L, n_lines, D, CV, scale,
             sqn, sqc, sq_line, sq_pos, skn, skc, sk_line, sk_pos, svn, svc, sv_line, sv_pos,
             sgn, sgc, sg_line, sg_pos, sln, sl_line, sl_pos, son, soc, so_line, so_pos,
             EXCLUDE_SELF: tl.constexpr, ACCUMULATE: tl.constexpr, BP: tl.constexpr,
             BS: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr,
             PREC: tl.constexpr):
    """dq for a tile of pixels (so* are the strides of the dq buffer)."""
    pid = tl.program_id(0)
    n = (pid // n_lines).to(tl.int64)
    line = (pid % n_lines).to(tl.int64)
    p = tl.program_id(1).to(tl.int64) * BP + tl.arange(0, BP)
    pmask = p < L
    d = tl.arange(0, BD)
    dmask = d < D
    q_tile = tl.load(q_ptr + n * sqn + line * sq_line + p[:, None] * sq_pos + d[None, :] * sqc,
                     mask=pmask[:, None] & dmask[None, :], other=0.0)
    lse = tl.load(lse_ptr + n * sln + line * sl_line + p * sl_pos, mask=pmask, other=0.0)
    dd = tl.load(dd_ptr + n * sln + line * sl_line + p * sl_pos, mask=pmask, other=0.0)
    acc = tl.zeros([BP, BD], ACC)
    for s0 in range(0, L, BS):
        s = s0 + tl.arange(0, BS)
        smask = s < L
        e = _energy(q_tile, k_ptr, n * skn, line, s, smask, d, dmask, skc, sk_line, sk_pos, scale,
                    ACC, PREC)
        prob = tl.where(_valid(p, pmask, s, smask, EXCLUDE_SELF), tl.exp(e - lse[:, None]), 0.0)
        # dP = dO·V^T over all Cv, tile by tile.
        dp = tl.zeros([BP, BS], ACC)
        for c0 in range(0, CV, BC):
            c = c0 + tl.arange(0, BC)
            cmask = c < CV
            go = tl.load(go_ptr + n * sgn + line * sg_line + p[:, None] * sg_pos + c[None, :] * sgc,
                         mask=pmask[:, None] & cmask[None, :], other=0.0)
            vt = tl.load(v_ptr + n * svn + line * sv_line + s[None, :] * sv_pos + c[:, None] * svc,
                         mask=cmask[:, None] & smask[None, :], other=0.0)
            dp += tl.dot(go, vt, input_precision=PREC, out_dtype=ACC)
        ds = prob * (dp - dd[:, None]) * scale
        k_tile = tl.load(k_ptr + n * skn + line * sk_line + s[:, None] * sk_pos + d[None, :] * skc,
                         mask=smask[:, None] & dmask[None, :], other=0.0)
        acc += tl.dot(ds.to(k_tile.dtype), k_tile, input_precision=PREC, out_dtype=ACC)
    off = dq_ptr + n * son + line * so_line + p[:, None] * so_pos + d[None, :] * soc
    omask = pmask[:, None] & dmask[None, :]
    if ACCUMULATE:
        acc += tl.load(off, mask=omask, other=0.0).to(ACC)
    tl.store(off, acc.to(dq_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _line_dk(q_ptr, k_ptr, v_ptr, go_ptr, lse_ptr, dd_ptr, dk_ptr, L, n_lines, D, CV, scale,
             sqn, sqc, sq_line, sq_pos, skn, skc, sk_line, sk_pos, svn, svc, sv_line, sv_pos,
             sgn, sgc, sg_line, sg_pos, sln, sl_line, sl_pos, son, soc, so_line, so_pos,
             EXCLUDE_SELF: tl.constexpr, ACCUMULATE: tl.constexpr, BP: tl.constexpr,
             BS: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr,
             PREC: tl.constexpr):
    """dk for a tile of keys, gathered over the pixels of the line (transposed tiles: keys are
    the rows, pixels the columns; so* are the strides of the dk buffer)."""
    pid = tl.program_id(0)
    n = (pid // n_lines).to(tl.int64)
    line = (pid % n_lines).to(tl.int64)
    s = tl.program_id(1).to(tl.int64) * BS + tl.arange(0, BS)
    smask = s < L
    d = tl.arange(0, BD)
    dmask = d < D
    k_tile = tl.load(k_ptr + n * skn + line * sk_line + s[:, None] * sk_pos + d[None, :] * skc,
                     mask=smask[:, None] & dmask[None, :], other=0.0)
    acc = tl.zeros([BS, BD], ACC)
    for p0 in range(0, L, BP):
        p = p0 + tl.arange(0, BP)
        pmask = p < L
        qt = tl.load(q_ptr + n * sqn + line * sq_line + p[None, :] * sq_pos + d[:, None] * sqc,
                     mask=dmask[:, None] & pmask[None, :], other=0.0)
        et = tl.dot(k_tile, qt, input_precision=PREC, out_dtype=ACC) * scale
        lse = tl.load(lse_ptr + n * sln + line * sl_line + p * sl_pos, mask=pmask, other=0.0)
        dd = tl.load(dd_ptr + n * sln + line * sl_line + p * sl_pos, mask=pmask, other=0.0)
        valid = tl.trans(_valid(p, pmask, s, smask, EXCLUDE_SELF))
        prob = tl.where(valid, tl.exp(et - lse[None, :]), 0.0)
        dp = tl.zeros([BS, BP], ACC)
        for c0 in range(0, CV, BC):
            c = c0 + tl.arange(0, BC)
            cmask = c < CV
            v_tile = tl.load(v_ptr + n * svn + line * sv_line + s[:, None] * sv_pos + c[None, :] * svc,
                             mask=smask[:, None] & cmask[None, :], other=0.0)
            got = tl.load(go_ptr + n * sgn + line * sg_line + p[None, :] * sg_pos + c[:, None] * sgc,
                          mask=cmask[:, None] & pmask[None, :], other=0.0)
            dp += tl.dot(v_tile, got, input_precision=PREC, out_dtype=ACC)
        ds = prob * (dp - dd[None, :]) * scale
        acc += tl.dot(ds.to(qt.dtype), tl.trans(qt), input_precision=PREC, out_dtype=ACC)
    off = dk_ptr + n * son + line * so_line + s[:, None] * so_pos + d[None, :] * soc
    omask = smask[:, None] & dmask[None, :]
    if ACCUMULATE:
        acc += tl.load(off, mask=omask, other=0.0).to(ACC)
    tl.store(off, acc.to(dk_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _line_dv(q_ptr, k_ptr, go_ptr, lse_ptr, dv_ptr, L, n_lines, D, CV, scale,
             sqn, sqc, sq_line, sq_pos, skn, skc, sk_line, sk_pos, sgn, sgc, sg_line, sg_pos,
             sln, sl_line, sl_pos, svn, svc, sv_line, sv_pos,
             EXCLUDE_SELF: tl.constexpr, ACCUMULATE: tl.constexpr, BP: tl.constexpr,
             BS: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr,
             PREC: tl.constexpr):
    """dv for a tile of keys and a tile of Cv: sum over the pixels of the line of P^T·dO."""
    pid = tl.program_id(0)
    n = (pid // n_lines).to(tl.int64)
    line = (pid % n_lines).to(tl.int64)
    s = tl.program_id(1).to(tl.int64) * BS + tl.arange(0, BS)
    smask = s < L
    c = tl.program_id(2).to(tl.int64) * BC + tl.arange(0, BC)
    cmask = c < CV
    d = tl.arange(0, BD)
    dmask = d < D
    k_tile = tl.load(k_ptr + n * skn + line * sk_line + s[:, None] * sk_pos + d[None, :] * skc,
                     mask=smask[:, None] & dmask[None, :], other=0.0)
    acc = tl.zeros([BS, BC], ACC)
    for p0 in range(0, L, BP):
        p = p0 + tl.arange(0, BP)
        pmask = p < L
        qt = tl.load(q_ptr + n * sqn + line * sq_line + p[None, :] * sq_pos + d[:, None] * sqc,
                     mask=dmask[:, None] & pmask[None, :], other=0.0)
        et = tl.dot(k_tile, qt, input_precision=PREC, out_dtype=ACC) * scale
        lse = tl.load(lse_ptr + n * sln + line * sl_line + p * sl_pos, mask=pmask, other=0.0)
        valid = tl.trans(_valid(p, pmask, s, smask, EXCLUDE_SELF))
        prob = tl.where(valid, tl.exp(et - lse[None, :]), 0.0)
        go = tl.load(go_ptr + n * sgn + line * sg_line + p[:, None] * sg_pos + c[None, :] * sgc,
                     mask=pmask[:, None] & cmask[None, :], other=0.0)
        acc += tl.dot(prob.to(go.dtype), go, input_precision=PREC, out_dtype=ACC)
    off = dv_ptr + n * svn + line * sv_line + s[:, None] * sv_pos + c[None, :] * svc
    omask = smask[:, None] & cmask[None, :]
    if ACCUMULATE:
        acc += tl.load(off, mask=omask, other=0.0).to(ACC)
    tl.store(off, acc.to(dv_ptr.dtype.element_ty), mask=omask)


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


@torch.library.custom_op("armnet_ops::cca_forward_triton", mutates_args=())
def cca_forward_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    N, D, H, W = q.shape
    CV = v.shape[1]
    acc_tl, acc_torch = _acc_dtype(q.dtype)
    out = torch.empty((N, CV, H, W), dtype=v.dtype, device=v.device)
    lse = torch.empty((N, H, W), dtype=acc_torch, device=q.device)
    if N * H * W == 0:
        return out.zero_(), lse
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
        return out, lse
    # Low-precision outputs: the two passes sum in a float32 buffer, rounded once at the end.
    buf = out if out.dtype == acc_torch else torch.empty(out.shape, dtype=acc_torch, device=out.device)
    for i, (row, L, n_lines, excl) in enumerate(_passes(q)):
        BL, BD, BC = _blocks(q, v, L)
        _line_out[(N * n_lines, triton.cdiv(L, BL), triton.cdiv(CV, BC))](
            q, k, v, lse, buf, L, n_lines, D, CV, float(scale),
            *_line_strides(q, row), *_line_strides(k, row), *_line_strides(v, row),
            *_map_strides(lse, row), *_line_strides(buf, row),
            EXCLUDE_SELF=excl, ACCUMULATE=i > 0, BP=BL, BS=BL, BD=BD, BC=BC, ACC=acc_tl, PREC=prec,
            num_warps=_num_warps())
    if buf is not out:
        out.copy_(buf)
    return out, lse


@torch.library.custom_op("armnet_ops::cca_backward_triton", mutates_args=())
def cca_backward_triton(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        out: torch.Tensor, lse: torch.Tensor,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N, D, H, W = q.shape
    CV = v.shape[1]
    acc_tl, acc_torch = _acc_dtype(q.dtype)
    if N * H * W == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    prec = _prec(q.dtype)
    grad_out = grad_out.to(v.dtype)
    lse = lse.to(acc_torch).contiguous()
    dd = (grad_out.to(acc_torch) * out.to(acc_torch)).sum(1).contiguous()
    # Gradients accumulate over the two passes in op-math buffers (contiguous NCHW).
    dq = torch.empty((N, D, H, W), dtype=acc_torch, device=q.device)
    dk = torch.empty((N, D, H, W), dtype=acc_torch, device=q.device)
    dv = torch.empty((N, CV, H, W), dtype=acc_torch, device=q.device)
    for i, (row, L, n_lines, excl) in enumerate(_passes(q)):
        BL, BD, BC = _blocks(q, v, L)
        common = dict(EXCLUDE_SELF=excl, ACCUMULATE=i > 0, BP=BL, BS=BL, BD=BD, BC=BC, ACC=acc_tl,
                      PREC=prec, num_warps=_num_warps())
        strides = (*_line_strides(q, row), *_line_strides(k, row), *_line_strides(v, row),
                   *_line_strides(grad_out, row), *_map_strides(lse, row))
        if D > 0:
            _line_dq[(N * n_lines, triton.cdiv(L, BL))](
                q, k, v, grad_out, lse, dd, dq, L, n_lines, D, CV, float(scale), *strides,
                *_line_strides(dq, row), **common)
            _line_dk[(N * n_lines, triton.cdiv(L, BL))](
                q, k, v, grad_out, lse, dd, dk, L, n_lines, D, CV, float(scale), *strides,
                *_line_strides(dk, row), **common)
        if CV > 0:
            _line_dv[(N * n_lines, triton.cdiv(L, BL), triton.cdiv(CV, BC))](
                q, k, grad_out, lse, dv, L, n_lines, D, CV, float(scale),
                *_line_strides(q, row), *_line_strides(k, row), *_line_strides(grad_out, row),
                *_map_strides(lse, row), *_line_strides(dv, row), **common)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)



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
    """[BP, BS] channel of key s of pixel p in the energy layout."""
    if EXCLUDE_SELF:
        return CH0 + s[None, :] - (s[None, :] > p[:, None]).to(s.dtype)
    return CH0 + s[None, :] + 0 * p[:, None]


@triton.jit
def _line_pair(x_ptr, y_ptr, e_ptr, L, n_lines, C, CH0,
               sxn, sxc, sx_line, sx_pos, syn, syc, sy_line, sy_pos, sen, sec, se_line, se_pos,
               EXCLUDE_SELF: tl.constexpr, BP: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr,
               ACC: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    n = (pid // n_lines).to(tl.int64)
    line = (pid % n_lines).to(tl.int64)
    p = tl.program_id(1).to(tl.int64) * BP + tl.arange(0, BP)
    s = tl.program_id(2).to(tl.int64) * BS + tl.arange(0, BS)
    pmask = p < L
    smask = s < L
    acc = tl.zeros([BP, BS], ACC)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        cmask = c < C
        x = tl.load(x_ptr + n * sxn + line * sx_line + p[:, None] * sx_pos + c[None, :] * sxc,
                    mask=pmask[:, None] & cmask[None, :], other=0.0)
        yt = tl.load(y_ptr + n * syn + line * sy_line + s[None, :] * sy_pos + c[:, None] * syc,
                     mask=cmask[:, None] & smask[None, :], other=0.0)
        acc += tl.dot(x, yt, input_precision=PREC, out_dtype=ACC)
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
    pid = tl.program_id(0)
    n = (pid // n_lines).to(tl.int64)
    line = (pid % n_lines).to(tl.int64)
    i = tl.program_id(1).to(tl.int64) * BI + tl.arange(0, BI)
    imask = i < L
    c = tl.program_id(2).to(tl.int64) * BC + tl.arange(0, BC)
    cmask = c < C
    acc = tl.zeros([BI, BC], ACC)
    for j0 in range(0, L, BJ):
        j = j0 + tl.arange(0, BJ)
        jmask = j < L
        if TRANSPOSED:
            valid = tl.trans(_valid(j, jmask, i, imask, EXCLUDE_SELF))   # [BI, BJ]
            ch = tl.trans(_energy_channel(j, i, CH0, EXCLUDE_SELF))
            m_off = m_ptr + n * smn + line * sm_line + j[None, :] * sm_pos + ch.to(tl.int64) * smc
        else:
            valid = _valid(i, imask, j, jmask, EXCLUDE_SELF)
            ch = _energy_channel(i, j, CH0, EXCLUDE_SELF)
            m_off = m_ptr + n * smn + line * sm_line + i[:, None] * sm_pos + ch.to(tl.int64) * smc
        m = tl.load(m_off, mask=valid, other=0.0)
        y = tl.load(y_ptr + n * syn + line * sy_line + j[:, None] * sy_pos + c[None, :] * syc,
                    mask=jmask[:, None] & cmask[None, :], other=0.0)
        acc += tl.dot(m.to(y.dtype), y, input_precision=PREC, out_dtype=ACC)
    off = o_ptr + n * son + line * so_line + i[:, None] * so_pos + c[None, :] * soc
    omask = imask[:, None] & cmask[None, :]
    if ACCUMULATE:
        acc += tl.load(off, mask=omask, other=0.0).to(ACC)
    tl.store(off, acc.to(o_ptr.dtype.element_ty), mask=omask)


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

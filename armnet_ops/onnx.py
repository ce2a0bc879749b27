"""ONNX translations of every armnet_ops op, for the dynamo-based exporter
(`torch.onnx.export(model, args, dynamo=True)`), in standard ONNX operators only (no custom
domain): any runtime that runs ONNX, ONNX Runtime and TensorRT included, runs the result.

The translations are onnxscript trace-only functions written at opset 18 (the exporter's
torchlib opset; it exports at opset 18 or later, 20 by default). Batch, height and width stay
symbolic: every shape is read off the graph with Shape, never baked in.

* criss-cross attention (cca_forward, cca_residual_forward): MatMul row and column energies,
  one softmax over both written out (max, Exp, ReduceSum) so that the pixel itself, which the
  full column counts a second time, is removed by an index construction: its column weight is
  zeroed with Where(j == h). No -inf (CCNet's mask) and no large negative constant ever enters
  the arithmetic, so fp16 and TensorRT see finite values only. The max may include that
  duplicate: it equals the row key (h, w), which is in the key set anyway. The residual form
  adds gamma·out + x; half inputs are computed in float32 and rounded once, as the kernels do.
* cca_weight / cca_map: the same energies, with the column keys gathered (GatherElements) and
  scattered (ScatterElements) through the index j = i + (i >= h) of SPEC §3.1.
* carafe, carafe_fused: Pad, then one strided Slice of the padded features per tap, broadcast
  over the s×s children of its pixel and multiplied by that tap's mask (k² Mul/Add, never a
  k²-fold unfold). carafe_fused first applies pixel shuffle as DepthToSpace (CRD, which is
  PyTorch's pixel_shuffle order) and a Softmax over the k² taps.
* directional_conv2d and its pair: Conv with dilations and "same" pads, then Mul (scale),
  Add (shift), Relu.

Registration: importing this module registers the translations for the C++ ops and their Triton
twins with onnxscript's torchlib registry, from which the exporter builds its table on every
call, so a plain `torch.onnx.export(..., dynamo=True)` finds them. `import armnet_ops` arranges
that import for when the exporter loads (see `armnet_ops._onnx_hook`), so users do nothing, and
onnxscript stays optional. `translation_table()` gives the same functions as a
`custom_translation_table=` for callers who prefer to pass them explicitly.
"""
from __future__ import annotations

from typing import Sequence

import onnx_ir as ir
import torch
from onnxscript import opset18 as op
from onnxscript.function_libs.torch_lib.registration import torch_op

_HALF = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_INT64_MAX = 2**63 - 1


def _dim(x, i: int):
    """Dimension i of x as a 1-element int64 tensor (symbolic under dynamic shapes)."""
    return op.Shape(x, start=i, end=i + 1)


def _to_op_math(*xs):
    """Half inputs in float32: the op-math type the kernels accumulate in."""
    return tuple(op.Cast(x, to=ir.DataType.FLOAT) if x.dtype in _HALF else x for x in xs)


def _cast_back(x, like):
    return op.Cast(x, to=like.dtype) if like.dtype in _HALF else x


def _energies(q, k, scale: float):
    """e_row (N, H, W, W) [n,h,w,g] = scale·<q_hw, k_hg>; e_col (N, W, H, H) [n,w,h,j] =
    scale·<q_hw, k_jw> (the full column, the pixel itself included at j = h)."""
    e_row = op.MatMul(op.Transpose(q, perm=[0, 2, 3, 1]), op.Transpose(k, perm=[0, 2, 1, 3]))
    e_col = op.MatMul(op.Transpose(q, perm=[0, 3, 2, 1]), op.Transpose(k, perm=[0, 3, 1, 2]))
    if scale != 1.0:
        e_row, e_col = op.Mul(e_row, op.CastLike(scale, e_row)), op.Mul(e_col, op.CastLike(scale, e_col))
    return e_row, e_col


def _self_key(H):
    """(H, H) bool, True on the diagonal j = h: the column entry that is the pixel itself."""
    r = op.Range(op.CastLike(0, H), op.Squeeze(H, [0]), op.CastLike(1, H))
    return op.Equal(op.Unsqueeze(r, [1]), op.Unsqueeze(r, [0]))


def _column_key_index(q):
    """(N, W, H, H-1) int64, [n,w,h,i] = j(i, h) = i + (i >= h): the rows of the column keys of
    pixel (h, w), the pixel itself left out (SPEC §3.1)."""
    N, H, W = _dim(q, 0), _dim(q, 2), _dim(q, 3)
    h = op.Range(op.CastLike(0, H), op.Squeeze(H, [0]), op.CastLike(1, H))
    i = op.Range(op.CastLike(0, H), op.Sub(op.Squeeze(H, [0]), op.CastLike(1, H)), op.CastLike(1, H))
    hh, ii = op.Unsqueeze(h, [1]), op.Unsqueeze(i, [0])          # (H, 1), (1, H-1)
    idx = op.Add(ii, op.Cast(op.GreaterOrEqual(ii, hh), to=ir.DataType.INT64))  # (H, H-1)
    return op.Expand(idx, op.Concat(N, W, H, op.Sub(H, op.CastLike([1], H)), axis=0))


def _attention(q, k, v, scale: float):
    """(out (N, Cv, H, W), lse (N, H, W)) in the op-math type of the inputs."""
    q, k, v = _to_op_math(q, k, v)
    e_row, e_col = _energies(q, k, scale)
    m = op.Max(op.ReduceMax(e_row, [3], keepdims=1),                        # (N, H, W, 1)
               op.Transpose(op.ReduceMax(e_col, [3], keepdims=1), perm=[0, 2, 1, 3]))
    p_row = op.Exp(op.Sub(e_row, m))
    p_col = op.Exp(op.Sub(e_col, op.Transpose(m, perm=[0, 2, 1, 3])))
    p_col = op.Where(_self_key(_dim(q, 2)), op.CastLike(0, p_col), p_col)  # the duplicate: weight 0
    total = op.Add(op.ReduceSum(p_row, [3], keepdims=1),
                   op.Transpose(op.ReduceSum(p_col, [3], keepdims=1), perm=[0, 2, 1, 3]))
    out_row = op.MatMul(p_row, op.Transpose(v, perm=[0, 2, 3, 1]))      # (N, H, W, Cv)
    out_col = op.MatMul(p_col, op.Transpose(v, perm=[0, 3, 2, 1]))      # (N, W, H, Cv)
    out = op.Div(op.Add(out_row, op.Transpose(out_col, perm=[0, 2, 1, 3])), total)
    lse = op.Squeeze(op.Add(m, op.Log(total)), [3])
    return op.Transpose(out, perm=[0, 3, 1, 2]), lse


def cca_forward(q, k, v, scale: float):
    out, lse = _attention(q, k, v, scale)
    return _cast_back(out, v), lse


def cca_residual_forward(q, k, v, residual, gamma, scale: float):
    """(y, out, lse), y = gamma·out + residual formed in the op-math type and rounded once."""
    out, lse = _attention(q, k, v, scale)
    (res,) = _to_op_math(residual)
    y = op.Add(op.Mul(op.CastLike(gamma, out), out), res)
    return _cast_back(y, v), _cast_back(out, v), lse


def cca_weight(q, k):
    """energy (N, H+W-1, H, W): the W row keys, then the H-1 column keys gathered by j(i, h)."""
    e_row, e_col = _energies(q, k, 1.0)
    e_col = op.GatherElements(e_col, _column_key_index(q), axis=3)      # (N, W, H, H-1)
    return op.Concat(op.Transpose(e_row, perm=[0, 3, 1, 2]), op.Transpose(e_col, perm=[0, 3, 2, 1]),
                     axis=1)


def cca_map(attn, v):
    """out = Σ_z attn[z]·v(h, z) + Σ_i attn[W+i]·v(j(i, h), w): the column weights are scattered
    into a full (H, H) column with a zero on the pixel itself, then one MatMul per direction."""
    W = _dim(v, 3)
    a_row = op.Slice(attn, op.CastLike([0], W), W, op.CastLike([1], W))  # (N, W, H, W)
    a_col = op.Slice(attn, W, op.CastLike([_INT64_MAX], W), op.CastLike([1], W))  # (N, H-1, H, W)
    idx = _column_key_index(v)
    full = op.Expand(op.CastLike(0, attn), op.Concat(_dim(v, 0), W, _dim(v, 2), _dim(v, 2), axis=0))
    a_col = op.ScatterElements(full, idx, op.Transpose(a_col, perm=[0, 3, 2, 1]), axis=3)
    out_row = op.MatMul(op.Transpose(a_row, perm=[0, 2, 3, 1]), op.Transpose(v, perm=[0, 2, 3, 1]))
    out_col = op.MatMul(a_col, op.Transpose(v, perm=[0, 3, 2, 1]))      # (N, W, H, Cv)
    out = op.Add(out_row, op.Transpose(out_col, perm=[0, 2, 1, 3]))    # (N, H, W, Cv)
    return op.Transpose(out, perm=[0, 3, 1, 2])


# ---- CARAFE ---------------------------------------------------------------------------------

def _reassemble(features, masks, k: int, G: int, s: int):
    """carafe with masks (N, G·k², sH, sW): Σ over taps of the shifted feature window, viewed as
    (N, G, C/G, H, 1, W, 1), times the tap's mask, viewed as (N, G, 1, H, s, W, s)."""
    N, C, H, W = (_dim(features, i) for i in range(4))
    one = op.CastLike([1], H)
    r = (k - 1) // 2
    fpad = op.Pad(features, op.CastLike([0, 0, r, r, 0, 0, r, r], H))
    tap_shape = op.Concat(N, op.CastLike([G, -1], H), H, one, W, one, axis=0)
    m = op.Reshape(masks, op.Concat(N, op.CastLike([G, k * k, 1], H), H, op.CastLike([s], H), W,
                                    op.CastLike([s], H), axis=0))       # (N, G, k², 1, H, s, W, s)
    hw = op.Concat(H, W, axis=0)
    out = None
    for ky in range(k):
        for kx in range(k):
            start = op.CastLike([ky, kx], H)
            window = op.Slice(fpad, start, op.Add(start, hw), op.CastLike([2, 3], H))
            tap = op.Mul(op.Reshape(window, tap_shape),
                         op.Gather(m, op.CastLike(ky * k + kx, H), axis=2))
            out = tap if out is None else op.Add(out, tap)
    sH, sW = op.Mul(H, op.CastLike([s], H)), op.Mul(W, op.CastLike([s], H))
    return op.Reshape(out, op.Concat(N, C, sH, sW, axis=0))


def carafe_forward(features, masks, kernel_size: int, group_size: int, scale_factor: int):
    return _reassemble(features, masks, kernel_size, group_size, scale_factor)


def carafe_fused_forward(features, mask_logits, kernel_size: int, group_size: int,
                         scale_factor: int):
    """The CARAFEPack normaliser, then carafe: DepthToSpace (pixel shuffle), Softmax over the k²
    taps of each group (in float32 for half inputs), carafe."""
    k, G, s = kernel_size, group_size, scale_factor
    m = op.DepthToSpace(mask_logits, blocksize=s, mode="CRD") if s > 1 else mask_logits
    N, sH, sW = _dim(m, 0), _dim(m, 2), _dim(m, 3)
    (m32,) = _to_op_math(m)
    grouped = op.Concat(N, op.CastLike([G, k * k], sH), sH, sW, axis=0)
    m32 = op.Softmax(op.Reshape(m32, grouped), axis=2)
    m = _cast_back(op.Reshape(m32, op.Shape(m)), m)
    return _reassemble(features, m, k, G, s)


# ---- directional dilated convolution --------------------------------------------------------

def _directional(x, weight, bias, dilation: Sequence[int], scale, shift, relu: bool):
    kh, kw = weight.shape[2], weight.shape[3]
    if not (isinstance(kh, int) and isinstance(kw, int)):
        raise ValueError(f"directional_conv2d: the ONNX translation needs a weight of static "
                         f"kernel size, got weight shape {weight.shape}")
    dh, dw = dilation
    ph, pw = dh * (kh - 1) // 2, dw * (kw - 1) // 2
    y = op.Conv(x, weight, bias, dilations=[dh, dw], pads=[ph, pw, ph, pw], strides=[1, 1])
    per_channel = op.CastLike([-1, 1, 1], _dim(x, 0))
    if scale is not None:
        y = op.Mul(y, op.Reshape(scale, per_channel))
    if shift is not None:
        y = op.Add(y, op.Reshape(shift, per_channel))
    return op.Relu(y) if relu else y


def directional_conv2d_forward(x, weight, bias, dilation: Sequence[int], scale, shift, relu: bool):
    return _directional(x, weight, bias, dilation, scale, shift, relu)


def directional_conv2d_pair_forward(x, weight_h, weight_v, bias_h, bias_v,
                                    dilation_h: Sequence[int], dilation_v: Sequence[int], scale_h,
                                    shift_h, scale_v, shift_v, relu: bool):
    return (_directional(x, weight_h, bias_h, dilation_h, scale_h, shift_h, relu),
            _directional(x, weight_v, bias_v, dilation_v, scale_v, shift_v, relu))


# ---- registration ---------------------------------------------------------------------------

# The translation of each op; the Triton twin of op X is X_triton with the same schema.
TRANSLATIONS = {
    "cca_forward": cca_forward,
    "cca_residual_forward": cca_residual_forward,
    "cca_weight": cca_weight,
    "cca_map": cca_map,
    "carafe_forward": carafe_forward,
    "carafe_fused_forward": carafe_fused_forward,
    "directional_conv2d_forward": directional_conv2d_forward,
    "directional_conv2d_pair_forward": directional_conv2d_pair_forward,
}


def translation_table() -> dict:
    """{OpOverload: translation} for every armnet_ops op this process has loaded, for
    `torch.onnx.export(..., dynamo=True, custom_translation_table=translation_table())`."""
    table = {}
    for name, fn in TRANSLATIONS.items():
        for op_name in (name, name + "_triton"):
            try:
                table[getattr(torch.ops.armnet_ops, op_name).default] = fn
            except AttributeError:  # not loaded: no extension, or Triton not imported
                pass
    return table


def _register() -> None:
    """Adds the translations to onnxscript's torchlib registry under their qualified names; the
    exporter resolves each name to the op when it builds its table, and skips names whose op is
    not loaded (no extension, or no Triton), so this needs neither."""
    for name, fn in TRANSLATIONS.items():
        torch_op((f"armnet_ops::{name}", f"armnet_ops::{name}_triton"), trace_only=True)(fn)


_register()

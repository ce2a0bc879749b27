"""Criss-cross attention (CCNet; ARM-Net's Global Text Module): the public functions, their
fake kernels and autograd, and the `CrissCrossAttention` module.

Layout: q, k (N, Cqk, H, W); v (N, Cv, H, W); out (N, Cv, H, W). Each pixel attends to the H+W-1
keys of its row (itself included) and its column (itself excluded) under one softmax.
The fused forward (cca_forward) saves out and the per-pixel log-sum-exp (N, H, W) in the op-math
type (float32, or float64 for float64 inputs); the backward recomputes the weights from them.

The residual epilogue of CCNet's block, `gamma * out + residual` with a gradient for gamma, is the
keyword pair `gamma=`, `residual=` of `criss_cross_attention`; it is applied by PyTorch around
the op (one fused elementwise pass under torch.compile), on every backend alike.
"""
from __future__ import annotations

import torch
from torch import nn

from . import reference
from ._backend import EXTENSION_ERROR, OpSpec, autocast_inputs, forward_op, select
from ._checks import check_same_device_dtype, check_size, check_tensor

# "auto" on a GPU prefers Triton: its kernels use tensor cores (tl.dot), the CUDA kernel is SIMT.
SPEC = OpSpec("criss_cross_attention", "cca_forward", "armnet_ops.triton.cca",
              gpu_order=("triton", "cuda"))
WEIGHT_SPEC = OpSpec("cca_weight", "cca_weight", "armnet_ops.triton.cca")
MAP_SPEC = OpSpec("cca_map", "cca_map", "armnet_ops.triton.cca")


def _check_qk(op, q, k):
    check_tensor(op, "q", q, 4)
    check_tensor(op, "k", k, 4)
    check_same_device_dtype(op, q=q, k=k)
    if k.shape != q.shape:
        raise ValueError(f"{op}: argument 'k' must have the shape of 'q' {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")


def _check_v(op, v, like, like_name):
    check_tensor(op, "v", v, 4)
    check_same_device_dtype(op, **{like_name: like, "v": v})
    for dim, what in ((0, "N"), (2, "H"), (3, "W")):
        check_size(op, "v", v, dim, like.shape[dim], what)


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the saved log-sum-exp: the op-math type of the inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def criss_cross_attention(q, k, v, *, scale: float = 1.0, backend: str = "auto",
                          gamma=None, residual=None):
    """Criss-cross attention: out_u = sum_s softmax_s(scale·<q_u, k_s>)·v_s over the row and
    column of u (SPEC §3.1). Differentiable in q, k and v.

    With `gamma` (a tensor broadcastable to out, CCNet's scalar gate) and `residual` (the shape of
    out) it returns `gamma * out + residual`, differentiable in gamma and residual too. Both or
    neither must be given."""
    op = "criss_cross_attention"
    if (gamma is None) != (residual is None):
        raise ValueError(f"{op}: arguments 'gamma' and 'residual' go together, got gamma "
                         f"{'None' if gamma is None else 'a tensor'} and residual "
                         f"{'None' if residual is None else 'a tensor'}")
    q, k, v = autocast_inputs(q, k, v)
    _check_qk(op, q, k)
    _check_v(op, v, q, "q")
    if residual is not None:
        check_tensor(op, "residual", residual, 4)
        if residual.shape != v.shape:
            raise ValueError(f"{op}: argument 'residual' must have the shape of 'v' "
                             f"{tuple(v.shape)}, got {tuple(residual.shape)}")
        if not isinstance(gamma, torch.Tensor):
            gamma = torch.as_tensor(gamma, dtype=residual.dtype, device=residual.device)
    b = select(SPEC.name, backend, q.device.type, q.dtype)
    if b == "reference":
        out = reference.criss_cross_attention(q, k, v, float(scale))
    else:
        out = forward_op(SPEC, b)(q, k, v, float(scale))[0]
    if residual is None:
        return out
    # The epilogue in PyTorch: autograd gives d(gamma) = sum(grad * out) and d(residual) = grad.
    return gamma * out + residual


def cca_weight(q, k, *, backend: str = "auto"):
    """CCNet's ca_weight: the raw energy (N, H+W-1, H, W), row keys then column keys."""
    q, k = autocast_inputs(q, k)
    _check_qk("cca_weight", q, k)
    b = select(WEIGHT_SPEC.name, backend, q.device.type, q.dtype)
    if b == "reference":
        return reference.cca_weight(q, k)
    return forward_op(WEIGHT_SPEC, b)(q, k)


def cca_map(attn, v, *, backend: str = "auto"):
    """CCNet's ca_map: aggregates v with weights attn (N, H+W-1, H, W) in cca_weight's layout."""
    op = "cca_map"
    attn, v = autocast_inputs(attn, v)
    check_tensor(op, "attn", attn, 4)
    _check_v(op, v, attn, "attn")
    H, W = v.shape[2:]
    check_size(op, "attn", attn, 1, H + W - 1, "H+W-1 channels")
    b = select(MAP_SPEC.name, backend, v.device.type, v.dtype)
    if b == "reference":
        return reference.cca_map(attn, v)
    return forward_op(MAP_SPEC, b)(attn, v)


# ---- fake kernels and autograd, for the C++ ops and their Triton twins ------------------------

def register(suffix: str = "", two_op: bool = True) -> None:
    """Registers fake kernels and autograd for armnet_ops::cca_*{suffix}. Called here for the
    C++ ops and by armnet_ops.triton.cca for the Triton twins (suffix "_triton"); `two_op=False`
    registers only the fused op (cca_forward/cca_backward), for a backend without the two-op API.

    Every output is contiguous, whatever the input strides: the kernels write contiguous tensors."""
    ops = torch.ops.armnet_ops
    fwd, bwd = f"armnet_ops::cca_forward{suffix}", getattr(ops, f"cca_backward{suffix}")

    @torch.library.register_fake(fwd)
    def _(q, k, v, scale):
        N, _, H, W = q.shape
        return v.new_empty(v.shape), q.new_empty((N, H, W), dtype=lse_dtype(q.dtype))

    @torch.library.register_fake(f"armnet_ops::cca_backward{suffix}")
    def _(grad_out, q, k, v, out, lse, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def setup(ctx, inputs, output):
        q, k, v, scale = inputs
        ctx.save_for_backward(q, k, v, *output)
        ctx.scale = scale

    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        return (*bwd(grad_out.contiguous(), q, k, v, out, lse, ctx.scale), None)

    torch.library.register_autograd(fwd, backward, setup_context=setup)
    if not two_op:
        return
    weight, weight_bwd = f"armnet_ops::cca_weight{suffix}", getattr(ops, f"cca_weight_backward{suffix}")
    cmap, cmap_bwd = f"armnet_ops::cca_map{suffix}", getattr(ops, f"cca_map_backward{suffix}")

    @torch.library.register_fake(weight)
    def _(q, k):
        N, _, H, W = q.shape
        return q.new_empty((N, H + W - 1, H, W))

    @torch.library.register_fake(f"armnet_ops::cca_weight_backward{suffix}")
    def _(grad, q, k):
        return q.new_empty(q.shape), k.new_empty(k.shape)

    def setup_pair(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    torch.library.register_autograd(
        weight, lambda ctx, g: weight_bwd(g.contiguous(), *ctx.saved_tensors), setup_context=setup_pair)

    @torch.library.register_fake(cmap)
    def _(attn, v):
        return v.new_empty(v.shape)

    @torch.library.register_fake(f"armnet_ops::cca_map_backward{suffix}")
    def _(grad, attn, v):
        return attn.new_empty(attn.shape), v.new_empty(v.shape)

    torch.library.register_autograd(
        cmap, lambda ctx, g: cmap_bwd(g.contiguous(), *ctx.saved_tensors), setup_context=setup_pair)


if EXTENSION_ERROR is None:
    register()


# ---- module ---------------------------------------------------------------------------------

class CrissCrossAttention(nn.Module):
    """CCNet's criss-cross attention block: gamma · CCA(q, k, v) + x with 1×1 projections
    q, k: C -> C/8 and v: C -> C, and gamma initialised to 0.

    The parameter names are mmcv's (query_conv, key_conv, value_conv, gamma), so mmcv
    checkpoints load. A recurrence (CCNet's R = 2) is the caller's: apply the module R times.
    """

    def __init__(self, in_channels: int, *, backend: str = "auto"):
        super().__init__()
        self.in_channels = in_channels
        self.query_conv = nn.Conv2d(in_channels, max(in_channels // 8, 1), 1)
        self.key_conv = nn.Conv2d(in_channels, max(in_channels // 8, 1), 1)
        self.value_conv = nn.Conv2d(in_channels, in_channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.backend = backend

    def forward(self, x):
        if self.backend == "reference":
            # Kept literally as mmcv writes it, the oracle of the fused path.
            out = criss_cross_attention(self.query_conv(x), self.key_conv(x), self.value_conv(x),
                                        backend="reference")
            return self.gamma * out + x
        return criss_cross_attention(self.query_conv(x), self.key_conv(x), self.value_conv(x),
                                     backend=self.backend, gamma=self.gamma, residual=x)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, backend={self.backend!r}"

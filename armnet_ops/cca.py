"""Criss-cross attention (CCNet; ARM-Net's Global Text Module): the public functions, their
fake kernels and autograd, and the `CrissCrossAttention` module.

Layout: q, k (N, Cqk, H, W); v (N, Cv, H, W); out (N, Cv, H, W). Each pixel attends to the H+W-1
keys of its row (itself included) and its column (itself excluded) under one softmax.
The fused forward (cca_forward) saves out and the per-pixel log-sum-exp (N, H, W) in the op-math
type (float32, or float64 for float64 inputs); the backward recomputes the weights from them.

CCNet's block, y = gamma * out + residual with gradients for gamma and residual, is the keyword
pair `gamma=`, `residual=` of `criss_cross_attention`. With a one-element gamma every kernel
backend runs it as one op, cca_residual_forward / cca_residual_backward, whose kernels write y
next to out and fold gamma into the backward (grad_gamma = sum(grad_y * out), reduced in a fixed
order); the reference backend, and a gamma of more than one element (a per-channel gate), apply
the epilogue in PyTorch.
"""
from __future__ import annotations

import torch
from torch import nn

from . import reference
from ._backend import EXTENSION_ERROR, OpSpec, autocast_inputs, forward_op, select
from ._checks import check_same_device_dtype, check_size, check_tensor

# "auto" on a GPU tries Triton first. Both GPU kernels are line-tiled with tensor-core products
# (tl.dot; wmma in CUDA) and neither has been timed on a GPU yet: set the order from
# benchmarks/ops.py on the first GPU run.
SPEC = OpSpec("criss_cross_attention", "cca_forward", "armnet_ops.triton.cca",
              gpu_order=("triton", "cuda"))
# The block with the residual epilogue fused: criss_cross_attention(..., gamma=, residual=) with a
# one-element gamma. Its backends are those with a cca_residual_forward kernel.
RESIDUAL_SPEC = OpSpec("criss_cross_attention_residual", "cca_residual_forward",
                       "armnet_ops.triton.cca", gpu_order=("triton", "cuda"))
# The two-op API (the energy is materialised by design): Triton first on a GPU, as for the fused
# op, until benchmarks/ops.py has measured both on a GPU.
WEIGHT_SPEC = OpSpec("cca_weight", "cca_weight", "armnet_ops.triton.cca",
                     gpu_order=("triton", "cuda"))
MAP_SPEC = OpSpec("cca_map", "cca_map", "armnet_ops.triton.cca", gpu_order=("triton", "cuda"))


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


def check_residual_op(op, v, gamma, residual=None):
    """The extra arguments of the residual ops (fake kernels and the Triton twins; the C++ glue
    has the same checks in csrc/cca_checks.h): gamma of one element in the op-math type on v's
    device, residual (when given) of v's shape, dtype and device."""
    if residual is not None and (residual.shape != v.shape or residual.dtype != v.dtype
                                 or residual.device != v.device):
        raise ValueError(f"{op}: argument 'residual' must have the shape {tuple(v.shape)}, dtype "
                         f"{v.dtype} and device {v.device} of 'v', got {tuple(residual.shape)}, "
                         f"{residual.dtype}, {residual.device}")
    if gamma.numel() != 1:
        raise ValueError(f"{op}: argument 'gamma' must have one element, got {gamma.numel()} "
                         f"(shape {tuple(gamma.shape)})")
    if gamma.dtype != lse_dtype(v.dtype) or gamma.device != v.device:
        raise ValueError(f"{op}: argument 'gamma' must have dtype {lse_dtype(v.dtype)} (the op-math "
                         f"type of v's {v.dtype}) and device {v.device}, got {gamma.dtype}, "
                         f"{gamma.device}")


def criss_cross_attention(q, k, v, *, scale: float = 1.0, backend: str = "auto",
                          gamma=None, residual=None):
    """Criss-cross attention: out_u = sum_s softmax_s(scale·<q_u, k_s>)·v_s over the row and
    column of u (SPEC §3.1). Differentiable in q, k and v.

    With `gamma` and `residual` (the shape of v) it returns CCNet's block `gamma * out + residual`,
    differentiable in gamma and residual too; both or neither must be given.

    * gamma with one element (CCNet's scalar gate; a tensor of any shape up to 4-D, or a number):
      every kernel backend fuses the epilogue into the attention kernels. gamma is cast to the
      op-math type (float32; float64 for float64) and residual to v's dtype, both differentiably,
      so their gradients come back in their own dtypes. The result has v's dtype, which under
      autocast is the autocast dtype: y = gamma·out + residual is computed in float32 and rounded
      once. The reference backend computes the same in PyTorch.
    * gamma with more elements (a gate broadcast over channels, say): the epilogue is PyTorch's,
      with its broadcasting and type promotion.
    """
    op = "criss_cross_attention"
    if (gamma is None) != (residual is None):
        raise ValueError(f"{op}: arguments 'gamma' and 'residual' go together, got gamma "
                         f"{'None' if gamma is None else 'a tensor'} and residual "
                         f"{'None' if residual is None else 'a tensor'}")
    q, k, v = autocast_inputs(q, k, v)
    _check_qk(op, q, k)
    _check_v(op, v, q, "q")
    if residual is None:
        b = select(SPEC.name, backend, q.device.type, q.dtype)
        if b == "reference":
            return reference.criss_cross_attention(q, k, v, float(scale))
        return forward_op(SPEC, b)(q, k, v, float(scale))[0]
    check_tensor(op, "residual", residual, 4)
    if residual.shape != v.shape or residual.device != v.device:
        raise ValueError(f"{op}: argument 'residual' must have the shape of 'v' {tuple(v.shape)} "
                         f"and its device {v.device}, got {tuple(residual.shape)} on {residual.device}")
    math = lse_dtype(v.dtype)
    if not isinstance(gamma, torch.Tensor):
        gamma = torch.as_tensor(gamma, dtype=math, device=v.device)
    if gamma.numel() != 1 or gamma.dim() > 4:
        # A gate of several elements (or one that broadcasts out to more dimensions).
        return gamma * criss_cross_attention(q, k, v, scale=scale, backend=backend) + residual
    gamma, residual = gamma.to(device=v.device, dtype=math), residual.to(v.dtype)
    b = select(RESIDUAL_SPEC.name, backend, q.device.type, q.dtype)
    if b == "reference":
        out = reference.criss_cross_attention(q, k, v, float(scale))
        return (gamma * out.to(math) + residual).to(v.dtype)
    return forward_op(RESIDUAL_SPEC, b)(q, k, v, residual, gamma, float(scale))[0]


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

    # The block with its epilogue: (y, out, lse). out and lse are what the backward needs, returned
    # so that autograd can save them; they are marked non-differentiable (the gradient flows
    # through y), so the backward sees grad_y alone.
    res_fwd = f"armnet_ops::cca_residual_forward{suffix}"
    res_bwd = getattr(ops, f"cca_residual_backward{suffix}")

    @torch.library.register_fake(res_fwd)
    def _(q, k, v, residual, gamma, scale):
        check_residual_op(f"cca_residual_forward{suffix}", v, gamma, residual)
        N, _, H, W = q.shape
        return (v.new_empty(v.shape), v.new_empty(v.shape),
                q.new_empty((N, H, W), dtype=lse_dtype(q.dtype)))

    @torch.library.register_fake(f"armnet_ops::cca_residual_backward{suffix}")
    def _(grad_y, q, k, v, out, lse, gamma, scale):
        check_residual_op(f"cca_residual_backward{suffix}", v, gamma)
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), gamma.new_empty(gamma.shape)

    def setup_residual(ctx, inputs, output):
        q, k, v, _residual, gamma, scale = inputs
        _y, out, lse = output
        ctx.mark_non_differentiable(out, lse)
        ctx.save_for_backward(q, k, v, gamma, out, lse)
        ctx.scale = scale

    def backward_residual(ctx, grad_y, _grad_out, _grad_lse):
        q, k, v, gamma, out, lse = ctx.saved_tensors
        gq, gk, gv, gg = res_bwd(grad_y.contiguous(), q, k, v, out, lse, gamma, ctx.scale)
        return gq, gk, gv, grad_y, gg, None  # d(residual) = grad_y

    torch.library.register_autograd(res_fwd, backward_residual, setup_context=setup_residual)
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

def _project_channels_last(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv(x) for a 1x1 `conv`, laid out channels_last: (N, Cout, H, W) with NHWC strides.

    One batched GEMM, y[n] = x[n]^T W^T + b, reads each image's (C, H·W) slice of an NCHW x as a
    transposed operand (no copy) and writes (H·W, Cout) rows, i.e. NHWC. A channels_last x goes
    through conv, whose output already follows x's layout."""
    if not x.is_contiguous() or x.dim() != 4:
        return conv(x).contiguous(memory_format=torch.channels_last)
    N, C, H, W = x.shape
    w = conv.weight.view(conv.out_channels, C).t().expand(N, C, conv.out_channels)
    a = x.view(N, C, H * W).transpose(1, 2)
    y = (torch.baddbmm(conv.bias.view(1, 1, -1), a, w) if conv.bias is not None
         else torch.bmm(a, w))
    return y.view(N, H, W, conv.out_channels).permute(0, 3, 1, 2)


class CrissCrossAttention(nn.Module):
    """CCNet's criss-cross attention block: gamma · CCA(q, k, v) + x with 1×1 projections
    q, k: C -> C/8 and v: C -> C, and gamma initialised to 0.

    Checkpoints of both layouts load strictly: mmcv's (query_conv, key_conv, value_conv and
    the gate as an mmcv `Scale` module, key "gamma.scale", a 0-dim tensor, in every mmcv release
    since the op was added) and CCNet's ("gamma" of shape (1,), which is also what this module
    saves). A recurrence (CCNet's R = 2) is the caller's: apply the module R times.

    The epilogue `gamma · out + x` runs inside the attention kernels on every kernel backend
    (cca_residual_forward: one pass writes the output, the backward gives d(gamma) and d(x)); the
    reference backend computes it in PyTorch. Output dtype: that of the projections, so x's dtype
    outside autocast and the autocast dtype (fp16/bf16) inside it, on every backend; x then enters
    the sum cast to that dtype, and the sum is formed in float32 and rounded once. (mmcv's literal
    epilogue would promote to float32 under autocast.)
    """

    def __init__(self, in_channels: int, *, backend: str = "auto"):
        super().__init__()
        self.in_channels = in_channels
        self.query_conv = nn.Conv2d(in_channels, max(in_channels // 8, 1), 1)
        self.key_conv = nn.Conv2d(in_channels, max(in_channels // 8, 1), 1)
        self.value_conv = nn.Conv2d(in_channels, in_channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.backend = backend
        self._register_load_state_dict_pre_hook(self._gate_from_mmcv)

    @staticmethod
    def _gate_from_mmcv(state_dict, prefix, *_):
        """mmcv's "gamma.scale" (0-dim) becomes our "gamma" (1,), before the strict key check."""
        key = prefix + "gamma.scale"
        if key in state_dict:
            scale = state_dict.pop(key)
            if scale.numel() != 1:
                raise RuntimeError(f"CrissCrossAttention: checkpoint entry {key!r} must hold one "
                                   f"element (mmcv's Scale), got shape {tuple(scale.shape)}")
            state_dict[prefix + "gamma"] = scale.reshape(1)

    def forward(self, x):
        convs = (self.query_conv, self.key_conv, self.value_conv)
        if x.is_cuda and self.backend != "reference":
            # The GPU kernels read q, k and v in NHWC and transpose NCHW inputs first (three
            # copies: 1.1x the op's minimum traffic at CCNet's shape). Projections written as
            # batched GEMMs over x[n]^T emit NHWC directly and read NCHW x as it is.
            q, k, v = (_project_channels_last(x, conv) for conv in convs)
        else:  # the CPU kernel reads q, k and v in NCHW
            q, k, v = (conv(x) for conv in convs)
        return criss_cross_attention(q, k, v, backend=self.backend, gamma=self.gamma, residual=x)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, backend={self.backend!r}"

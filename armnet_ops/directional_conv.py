"""Directional (anisotropic) dilated convolution, ARM-Net's Dense Text Module: the public
functions `directional_conv2d` and `directional_conv2d_pair`, their fake kernels and autograd, and
the `DirectionalConv2d` and `DirectionalConv2dPair` modules.

y = act(conv2d(x, weight, bias, "same" padding, dilation=(dh, dw)) * scale + shift), with odd
kernels and any dh, dw >= 1: (1, d) is the horizontal form, (d, 1) the vertical one. scale and
shift are per output channel (a folded BatchNorm); act is None or ReLU. The forward saves x,
weight and y; the ReLU mask is read off y, and the backward needs no pre-scale output (see
csrc/cpu/directional_conv.cpp for the algebra).

`directional_conv2d_pair` computes the horizontal and the vertical branch of ARM-Net's DTM, which
read the same input, in one op: the Triton backend runs both in one launch (one pass over x per
output tile, the two branches' tiles side by side in one grid) and its input gradient sums both
branches in one launch; the C++ backends run the two convolutions one after the other.

Memory formats: y and grad_x have x's suggested memory format (channels_last in, channels_last
out); grad_weight and the 1-D gradients are contiguous. channels_last (NHWC) is the layout the
GPU kernels are built for. The Triton kernels address x, y and the gradients through their
strides, so NCHW input is read in place (no layout copy) and y written in NCHW; the CUDA kernel
does the same. Inputs whose strides are neither dense NCHW nor dense NHWC (slices, odd
permutations) are copied once into their suggested format.

Backends per op: reference (F.conv2d + epilogue), cpu (ATen's convolution + epilogue; fp32,
fp64), cuda (hand-written forward, tensor cores for fp16/bf16; the backward is ATen's
convolutions on cuDNN, see csrc/cpu/directional_conv.cpp), triton (forward, input and weight
gradients as implicit GEMMs; the weight gradient reduces per-slice partial sums in a fixed order).
"""
from __future__ import annotations

import torch
from torch import nn
from torch._prims_common import suggest_memory_format as memory_format  # ATen's x.suggest_memory_format()

from . import reference
from ._backend import EXTENSION_ERROR, OpSpec, autocast_inputs, forward_op, select
from ._checks import (check_int, check_odd, check_pair, check_same_device_dtype, check_size,
                      check_tensor)

# "auto" on a GPU prefers Triton: its kernels are autotuned and software-pipelined and cover
# the backward too, while the CUDA forward has no asynchronous copies and trains through ATen.
# fp32 is the exception: "auto" takes the reference, i.e. cuDNN (with TF32 when
# torch.backends.cudnn.allow_tf32 is set, as it is by default). The hand-written SIMT kernel has
# no tensor cores and cannot beat it, and no hand-written kernel has been measured faster on a GPU
# (nothing has run on one yet); change this only with benchmarks/ops.py numbers that show one is.
# armnet_ops._backend.select(name, "auto", "cuda", dtype) tells what "auto" takes.
_GPU_ORDER_BY_DTYPE = {torch.float32: ()}
SPEC = OpSpec("directional_conv2d", "directional_conv2d_forward",
              "armnet_ops.triton.directional_conv", gpu_order=("triton", "cuda"),
              gpu_order_by_dtype=_GPU_ORDER_BY_DTYPE)
PAIR_SPEC = OpSpec("directional_conv2d_pair", "directional_conv2d_pair_forward",
                   "armnet_ops.triton.directional_conv", gpu_order=("triton", "cuda"),
                   gpu_order_by_dtype=_GPU_ORDER_BY_DTYPE)
ACTIVATIONS = (None, "relu")


def _check_branch(op, x, weight, bias, scale, shift, suffix=""):
    check_tensor(op, "weight" + suffix, weight, 4)
    check_odd(op, f"weight{suffix}.shape[2] (kernel height)", weight.shape[2])
    check_odd(op, f"weight{suffix}.shape[3] (kernel width)", weight.shape[3])
    check_size(op, "weight" + suffix, weight, 1, x.shape[1], "in_channels of x")
    C_out = weight.shape[0]
    for name, t in (("bias", bias), ("scale", scale), ("shift", shift)):
        if t is not None:
            check_tensor(op, name + suffix, t, 1)
            check_size(op, name + suffix, t, 0, C_out, "out_channels")


def _check_activation(op, activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: argument 'activation' must be one of {ACTIVATIONS}, got {activation!r}")


def directional_conv2d(x, weight, bias=None, dilation=(1, 1), *, scale=None, shift=None,
                       activation=None, backend: str = "auto"):
    """act(conv2d(x, weight, bias, same padding, dilation) * scale + shift) (SPEC §3.3).

    x (N, C_in, H, W), weight (C_out, C_in, kh, kw) with odd kh, kw; bias, scale, shift (C_out,)
    or None; dilation an int or (dh, dw), each >= 1; activation None or "relu". Returns
    (N, C_out, H, W) in x's suggested memory format.
    """
    op = "directional_conv2d"
    x, weight, bias, scale, shift = autocast_inputs(x, weight, bias, scale, shift)
    check_tensor(op, "x", x, 4)
    dilation = check_pair(op, "dilation", dilation, 1)
    _check_activation(op, activation)
    _check_branch(op, x, weight, bias, scale, shift)
    check_same_device_dtype(op, x=x, weight=weight, bias=bias, scale=scale, shift=shift)
    b = select(SPEC.name, backend, x.device.type, x.dtype)
    if b == "reference":
        return reference.directional_conv2d(x, weight, bias, dilation, scale, shift, activation)
    return forward_op(SPEC, b)(x, weight, bias, list(dilation), scale, shift, activation == "relu")


def directional_conv2d_pair(x, weight_h, weight_v, bias_h=None, bias_v=None, dilation_h=(1, 1),
                            dilation_v=(1, 1), *, scale_h=None, shift_h=None, scale_v=None,
                            shift_v=None, activation=None, backend: str = "auto"):
    """Two directional convolutions of the same input, (y_h, y_v):

        y_h = directional_conv2d(x, weight_h, bias_h, dilation_h, scale=scale_h, shift=shift_h, ...)
        y_v = directional_conv2d(x, weight_v, bias_v, dilation_v, scale=scale_v, shift=shift_v, ...)

    ARM-Net's DTM pairs a horizontal branch, weight_h (C_h, C_in, 1, k) with dilation_h = (1, d),
    and a vertical one, weight_v (C_v, C_in, k, 1) with dilation_v = (d, 1); any odd kernels and
    dilations are accepted. The Triton backend computes both in one launch (and both branches'
    input gradients in one launch); cpu and cuda run the two convolutions in turn. activation
    applies to both.
    """
    op = "directional_conv2d_pair"
    (x, weight_h, weight_v, bias_h, bias_v, scale_h, shift_h, scale_v, shift_v) = autocast_inputs(
        x, weight_h, weight_v, bias_h, bias_v, scale_h, shift_h, scale_v, shift_v)
    check_tensor(op, "x", x, 4)
    dilation_h = check_pair(op, "dilation_h", dilation_h, 1)
    dilation_v = check_pair(op, "dilation_v", dilation_v, 1)
    _check_activation(op, activation)
    _check_branch(op, x, weight_h, bias_h, scale_h, shift_h, "_h")
    _check_branch(op, x, weight_v, bias_v, scale_v, shift_v, "_v")
    check_same_device_dtype(op, x=x, weight_h=weight_h, weight_v=weight_v, bias_h=bias_h,
                            bias_v=bias_v, scale_h=scale_h, shift_h=shift_h, scale_v=scale_v,
                            shift_v=shift_v)
    b = select(PAIR_SPEC.name, backend, x.device.type, x.dtype)
    if b == "reference":
        return (reference.directional_conv2d(x, weight_h, bias_h, dilation_h, scale_h, shift_h,
                                             activation),
                reference.directional_conv2d(x, weight_v, bias_v, dilation_v, scale_v, shift_v,
                                             activation))
    y_h, y_v = forward_op(PAIR_SPEC, b)(x, weight_h, weight_v, bias_h, bias_v, list(dilation_h),
                                        list(dilation_v), scale_h, shift_h, scale_v, shift_v,
                                        activation == "relu")
    return y_h, y_v


# ---- fake kernels and autograd, for the C++ op and its Triton twin -----------------------------

def _grad_like(t):
    return None if t is None else t.new_empty(t.shape)


def register(suffix: str = "") -> None:
    """Registers fake kernels and autograd for armnet_ops::directional_conv2d_*{suffix} and
    armnet_ops::directional_conv2d_pair_*{suffix}. Called here for the C++ ops and by
    armnet_ops.triton.directional_conv for the Triton twins."""
    fwd = f"armnet_ops::directional_conv2d_forward{suffix}"
    bwd = getattr(torch.ops.armnet_ops, f"directional_conv2d_backward{suffix}")

    def out_like(x, c_out):
        N, _, H, W = x.shape
        return x.new_empty((N, c_out, H, W)).contiguous(memory_format=memory_format(x))

    def grad_x_like(x):
        return x.new_empty(x.shape).contiguous(memory_format=memory_format(x))

    @torch.library.register_fake(fwd)
    def _(x, weight, bias, dilation, scale, shift, relu):
        return out_like(x, weight.shape[0])

    @torch.library.register_fake(f"armnet_ops::directional_conv2d_backward{suffix}")
    def _(grad_y, x, weight, bias, y, dilation, scale, shift, relu):
        return (grad_x_like(x), weight.new_empty(weight.shape), _grad_like(bias), _grad_like(scale),
                _grad_like(shift))

    def setup(ctx, inputs, output):
        x, weight, bias, dilation, scale, shift, relu = inputs
        ctx.save_for_backward(x, weight, bias, output, scale, shift)
        ctx.dilation, ctx.relu = dilation, relu

    def backward(ctx, grad_y):
        x, weight, bias, y, scale, shift = ctx.saved_tensors
        gx, gw, gb, gscale, gshift = bwd(grad_y, x, weight, bias, y, ctx.dilation, scale, shift,
                                         ctx.relu)
        return gx, gw, gb, None, gscale, gshift, None

    torch.library.register_autograd(fwd, backward, setup_context=setup)

    # ---- the pair ----
    pair_fwd = f"armnet_ops::directional_conv2d_pair_forward{suffix}"
    pair_bwd = getattr(torch.ops.armnet_ops, f"directional_conv2d_pair_backward{suffix}")

    @torch.library.register_fake(pair_fwd)
    def _(x, weight_h, weight_v, bias_h, bias_v, dilation_h, dilation_v, scale_h, shift_h,
          scale_v, shift_v, relu):
        return out_like(x, weight_h.shape[0]), out_like(x, weight_v.shape[0])

    @torch.library.register_fake(f"armnet_ops::directional_conv2d_pair_backward{suffix}")
    def _(grad_y_h, grad_y_v, x, weight_h, weight_v, bias_h, bias_v, y_h, y_v, dilation_h,
          dilation_v, scale_h, shift_h, scale_v, shift_v, relu):
        return (grad_x_like(x), weight_h.new_empty(weight_h.shape),
                weight_v.new_empty(weight_v.shape), _grad_like(bias_h), _grad_like(bias_v),
                _grad_like(scale_h), _grad_like(shift_h), _grad_like(scale_v), _grad_like(shift_v))

    def pair_setup(ctx, inputs, output):
        (x, weight_h, weight_v, bias_h, bias_v, dilation_h, dilation_v, scale_h, shift_h, scale_v,
         shift_v, relu) = inputs
        ctx.save_for_backward(x, weight_h, weight_v, bias_h, bias_v, output[0], output[1], scale_h,
                              shift_h, scale_v, shift_v)
        ctx.dilation_h, ctx.dilation_v, ctx.relu = dilation_h, dilation_v, relu

    def pair_backward(ctx, grad_y_h, grad_y_v):
        (x, weight_h, weight_v, bias_h, bias_v, y_h, y_v, scale_h, shift_h, scale_v,
         shift_v) = ctx.saved_tensors
        # An output that does not reach the loss may come back as None.
        grad_y_h = torch.zeros_like(y_h) if grad_y_h is None else grad_y_h
        grad_y_v = torch.zeros_like(y_v) if grad_y_v is None else grad_y_v
        (gx, gw_h, gw_v, gb_h, gb_v, gs_h, gt_h, gs_v, gt_v) = pair_bwd(
            grad_y_h, grad_y_v, x, weight_h, weight_v, bias_h, bias_v, y_h, y_v, ctx.dilation_h,
            ctx.dilation_v, scale_h, shift_h, scale_v, shift_v, ctx.relu)
        return gx, gw_h, gw_v, gb_h, gb_v, None, None, gs_h, gt_h, gs_v, gt_v, None

    torch.library.register_autograd(pair_fwd, pair_backward, setup_context=pair_setup)


if EXTENSION_ERROR is None:
    register()


# ---- module ---------------------------------------------------------------------------------

class DirectionalConv2d(nn.Module):
    """A dilated convolution with a fused epilogue: conv -> (BatchNorm) -> (ReLU).

    In eval mode the BatchNorm is folded into the kernel's per-channel scale and shift, so the
    whole block is one kernel. In training mode the BatchNorm needs batch statistics and runs
    separately.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, dilation=(1, 1),
                 bias: bool = True, bn: bool = False, activation: str | None = None, *,
                 backend: str = "auto"):
        super().__init__()
        kh, kw = check_pair("DirectionalConv2d", "kernel_size", kernel_size)
        self.dilation = check_pair("DirectionalConv2d", "dilation", dilation)
        if activation not in ACTIVATIONS:
            raise ValueError(f"DirectionalConv2d: argument 'activation' must be one of "
                             f"{ACTIVATIONS}, got {activation!r}")
        self.activation, self.backend = activation, backend
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kh, kw))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.bn = nn.BatchNorm2d(out_channels) if bn else None
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def folded_bn(self):
        """(scale, shift) of the BatchNorm in eval mode: y·γ/√(σ²+ε) + β − μ·γ/√(σ²+ε)."""
        bn = self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return scale, bn.bias - bn.running_mean * scale

    def forward(self, x):
        if self.bn is None or not self.training:
            scale, shift = self.folded_bn() if self.bn is not None else (None, None)
            return directional_conv2d(x, self.weight, self.bias, self.dilation, scale=scale,
                                      shift=shift, activation=self.activation, backend=self.backend)
        y = self.bn(directional_conv2d(x, self.weight, self.bias, self.dilation, backend=self.backend))
        return torch.relu(y) if self.activation == "relu" else y

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1]}, {self.weight.shape[0]}, kernel_size="
                f"{tuple(self.weight.shape[2:])}, dilation={self.dilation}, "
                f"activation={self.activation!r}")


class DirectionalConv2dPair(nn.Module):
    """The horizontal and vertical branches of ARM-Net's DTM on one input, as one op:
    `horizontal` is DirectionalConv2d(..., dilation=(1, rate)), `vertical` is
    DirectionalConv2d(..., dilation=(rate, 1)); forward returns (y_h, y_v).

    When no batch statistics are needed (eval mode, or no BatchNorm) both branches run through
    `directional_conv2d_pair`, whose Triton backend reads x once for both; in training mode with a
    BatchNorm each branch runs as its own DirectionalConv2d.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, rate: int = 1,
                 bias: bool = True, bn: bool = False, activation: str | None = None, *,
                 backend: str = "auto"):
        super().__init__()
        rate = check_int("DirectionalConv2dPair", "rate", rate, 1)
        self.backend, self.activation = backend, activation
        self.horizontal = DirectionalConv2d(in_channels, out_channels, kernel_size, (1, rate), bias,
                                            bn, activation, backend=backend)
        self.vertical = DirectionalConv2d(in_channels, out_channels, kernel_size, (rate, 1), bias,
                                          bn, activation, backend=backend)

    def forward(self, x):
        h, v = self.horizontal, self.vertical
        if self.training and h.bn is not None:
            return h(x), v(x)
        scale_h, shift_h = h.folded_bn() if h.bn is not None else (None, None)
        scale_v, shift_v = v.folded_bn() if v.bn is not None else (None, None)
        return directional_conv2d_pair(x, h.weight, v.weight, h.bias, v.bias, h.dilation,
                                       v.dilation, scale_h=scale_h, shift_h=shift_h,
                                       scale_v=scale_v, shift_v=shift_v,
                                       activation=self.activation, backend=self.backend)

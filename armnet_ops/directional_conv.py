"""Directional (anisotropic) dilated convolution, ARM-Net's Dense Text Module: the public
function, its fake kernels and autograd, and the `DirectionalConv2d` module.

y = act(conv2d(x, weight, bias, "same" padding, dilation=(dh, dw)) * scale + shift), with odd
kernels and any dh, dw >= 1: (1, d) is the horizontal form, (d, 1) the vertical one. scale and
shift are per output channel (a folded BatchNorm); act is None or ReLU. The forward saves x,
weight and y; the ReLU mask is read off y.
"""
from __future__ import annotations

import torch
from torch import nn

from . import reference
from ._backend import EXTENSION_ERROR, OpSpec, autocast_inputs, forward_op, resolve
from ._checks import check_odd, check_pair, check_same_device_dtype, check_size, check_tensor

SPEC = OpSpec("directional_conv2d", "directional_conv2d_forward",
              "armnet_ops.triton.directional_conv")
ACTIVATIONS = (None, "relu")


def directional_conv2d(x, weight, bias=None, dilation=(1, 1), *, scale=None, shift=None,
                       activation=None, backend: str = "auto"):
    """act(conv2d(x, weight, bias, same padding, dilation) * scale + shift) (SPEC §3.3)."""
    op = "directional_conv2d"
    x, weight, bias, scale, shift = autocast_inputs(x, weight, bias, scale, shift)
    check_tensor(op, "x", x, 4)
    check_tensor(op, "weight", weight, 4)
    dilation = check_pair(op, "dilation", dilation, 1)
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: argument 'activation' must be one of {ACTIVATIONS}, got {activation!r}")
    check_odd(op, "weight.shape[2] (kernel height)", weight.shape[2])
    check_odd(op, "weight.shape[3] (kernel width)", weight.shape[3])
    check_size(op, "weight", weight, 1, x.shape[1], "in_channels of x")
    C_out = weight.shape[0]
    for name, t in (("bias", bias), ("scale", scale), ("shift", shift)):
        if t is not None:
            check_tensor(op, name, t, 1)
            check_size(op, name, t, 0, C_out, "out_channels")
    check_same_device_dtype(op, x=x, weight=weight, bias=bias, scale=scale, shift=shift)
    b = resolve(SPEC, backend, x.device, x.dtype)
    if b == "reference":
        return reference.directional_conv2d(x, weight, bias, dilation, scale, shift, activation)
    return forward_op(SPEC, b)(x, weight, bias, list(dilation), scale, shift, activation == "relu")


# ---- fake kernels and autograd, for the C++ op and its Triton twin -----------------------------

def register(suffix: str = "") -> None:
    """Registers fake kernels and autograd for armnet_ops::directional_conv2d_*{suffix}. Called
    here for the C++ op and by armnet_ops.triton.directional_conv for the Triton twin."""
    fwd = f"armnet_ops::directional_conv2d_forward{suffix}"
    bwd = getattr(torch.ops.armnet_ops, f"directional_conv2d_backward{suffix}")

    @torch.library.register_fake(fwd)
    def _(x, weight, bias, dilation, scale, shift, relu):
        N, _, H, W = x.shape
        return x.new_empty((N, weight.shape[0], H, W)).contiguous(
            memory_format=x.suggest_memory_format())

    @torch.library.register_fake(f"armnet_ops::directional_conv2d_backward{suffix}")
    def _(grad_y, x, weight, bias, y, dilation, scale, shift, relu):
        def like(t):
            return None if t is None else torch.empty_like(t)
        return torch.empty_like(x), torch.empty_like(weight), like(bias), like(scale), like(shift)

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

"""CARAFE, content-aware reassembly (Wang et al.; ARM-Net's spatial decoder branch): the public
functions, their fake kernels and autograd, and the `CARAFE` and `CARAFEPack` modules.

Layout (mmcv's): features (N, C, H, W), C % G == 0; masks (N, G·k², sH, sW), channel
g·k² + ky·k + kx is tap (ky, kx) of group g; out (N, C, sH, sW). Output pixel (y, x) reads the
k×k window centred on (y//s, x//s), zero outside the image, masks not renormalised at borders.

`carafe_fused` takes the content encoder's raw low-resolution logits (N, G·k²·s², H, W) and
applies pixel shuffle and the softmax over k² itself, so the high-resolution mask never reaches
memory. Its backward recomputes the softmax from the logits; nothing else is saved.
"""
from __future__ import annotations

import torch
from torch import nn

from . import reference
from ._backend import EXTENSION_ERROR, OpSpec, autocast_inputs, forward_op, select
from ._checks import check_int, check_odd, check_same_device_dtype, check_size, check_tensor

SPEC = OpSpec("carafe", "carafe_forward", "armnet_ops.triton.carafe")
FUSED_SPEC = OpSpec("carafe_fused", "carafe_fused_forward", "armnet_ops.triton.carafe")


def _check(op, features, masks, masks_name, kernel_size, group_size, scale_factor, fused):
    k = check_odd(op, "kernel_size", kernel_size)
    G = check_int(op, "group_size", group_size, 1)
    s = check_int(op, "scale_factor", scale_factor, 1)
    check_tensor(op, "features", features, 4)
    check_tensor(op, masks_name, masks, 4)
    check_same_device_dtype(op, features=features, **{masks_name: masks})
    N, C, H, W = features.shape
    if C % G != 0:
        raise ValueError(f"{op}: the channels of 'features' ({C}) must be divisible by "
                         f"group_size ({G}), got C % G = {C % G}")
    check_size(op, masks_name, masks, 0, N, "N")
    if fused:
        check_size(op, masks_name, masks, 1, G * k * k * s * s, "G·k²·s² channels")
        check_size(op, masks_name, masks, 2, H, "H")
        check_size(op, masks_name, masks, 3, W, "W")
    else:
        check_size(op, masks_name, masks, 1, G * k * k, "G·k² channels")
        check_size(op, masks_name, masks, 2, s * H, "s·H rows")
        check_size(op, masks_name, masks, 3, s * W, "s·W columns")
    return k, G, s


def carafe(features, masks, kernel_size: int, group_size: int, scale_factor: int, *,
           backend: str = "auto"):
    """Reassembles `features` with normalised `masks` (N, G·k², sH, sW) (mmcv's carafe)."""
    features, masks = autocast_inputs(features, masks)
    k, G, s = _check("carafe", features, masks, "masks", kernel_size, group_size, scale_factor, False)
    b = select(SPEC.name, backend, features.device.type, features.dtype)
    if b == "reference":
        return reference.carafe(features, masks, k, G, s)
    return forward_op(SPEC, b)(features, masks, k, G, s)


def carafe_fused(features, mask_logits, kernel_size: int, group_size: int, scale_factor: int, *,
                 backend: str = "auto"):
    """carafe(features, softmax_k²(pixel_shuffle(mask_logits, s))) without writing the
    high-resolution mask. mask_logits: (N, G·k²·s², H, W)."""
    features, mask_logits = autocast_inputs(features, mask_logits)
    k, G, s = _check("carafe_fused", features, mask_logits, "mask_logits", kernel_size,
                     group_size, scale_factor, True)
    b = select(FUSED_SPEC.name, backend, features.device.type, features.dtype)
    if b == "reference":
        return reference.carafe_fused(features, mask_logits, k, G, s)
    return forward_op(FUSED_SPEC, b)(features, mask_logits, k, G, s)


# ---- fake kernels and autograd, for the C++ ops and their Triton twins ------------------------

def register(suffix: str = "") -> None:
    """Registers fake kernels and autograd for armnet_ops::carafe*{suffix}. Called here for the
    C++ ops and by armnet_ops.triton.carafe for the Triton twins (suffix "_triton")."""
    for name in ("carafe", "carafe_fused"):
        fwd = f"armnet_ops::{name}_forward{suffix}"
        bwd = getattr(torch.ops.armnet_ops, f"{name}_backward{suffix}")

        @torch.library.register_fake(fwd)
        def _(features, masks, kernel_size, group_size, scale_factor, name=name):
            # Mixed devices reach the fake kernel (the Meta key wins dispatch) and not the C++
            # checks, so the fake kernel checks them.
            torch._check(masks.device == features.device, lambda: (
                f"{name}: the masks must be on the device of 'features' ({features.device}), "
                f"got {masks.device}"))
            N, C, H, W = features.shape
            return features.new_empty((N, C, H * scale_factor, W * scale_factor))

        @torch.library.register_fake(f"armnet_ops::{name}_backward{suffix}")
        def _(grad_out, features, masks, kernel_size, group_size, scale_factor):
            # The kernels return contiguous gradients whatever the input strides.
            return (features.new_empty(features.shape), masks.new_empty(masks.shape))

        def setup(ctx, inputs, output):
            ctx.save_for_backward(*inputs[:2])
            ctx.args = inputs[2:]

        def backward(ctx, grad_out, bwd=bwd):
            return (*bwd(grad_out.contiguous(), *ctx.saved_tensors, *ctx.args), None, None, None)

        torch.library.register_autograd(fwd, backward, setup_context=setup)


if EXTENSION_ERROR is None:
    register()


# ---- modules --------------------------------------------------------------------------------

class CARAFE(nn.Module):
    """carafe(features, masks) as a module (mmcv's CARAFE)."""

    def __init__(self, kernel_size: int, group_size: int, scale_factor: int, *,
                 backend: str = "auto"):
        super().__init__()
        self.kernel_size, self.group_size, self.scale_factor = kernel_size, group_size, scale_factor
        self.backend = backend

    def forward(self, features, masks):
        return carafe(features, masks, self.kernel_size, self.group_size, self.scale_factor,
                      backend=self.backend)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, group_size={self.group_size}, "
                f"scale_factor={self.scale_factor}")


class CARAFEPack(nn.Module):
    """The CARAFE upsampler: a 1×1 channel compressor, a content encoder that predicts
    up_group·up_kernel²·s² mask logits per low-resolution pixel, and `carafe_fused`.

    Parameter names and initialisation are mmcv's, so its checkpoints load.
    """

    def __init__(self, channels: int, scale_factor: int, up_kernel: int = 5, up_group: int = 1,
                 encoder_kernel: int = 3, encoder_dilation: int = 1,
                 compressed_channels: int = 64, *, backend: str = "auto"):
        super().__init__()
        self.channels, self.scale_factor = channels, scale_factor
        self.up_kernel, self.up_group = up_kernel, up_group
        self.encoder_kernel, self.encoder_dilation = encoder_kernel, encoder_dilation
        self.compressed_channels = compressed_channels
        self.backend = backend
        self.channel_compressor = nn.Conv2d(channels, compressed_channels, 1)
        self.content_encoder = nn.Conv2d(
            compressed_channels, up_group * up_kernel * up_kernel * scale_factor * scale_factor,
            encoder_kernel, padding=(encoder_kernel - 1) * encoder_dilation // 2,
            dilation=encoder_dilation)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.xavier_uniform_(self.channel_compressor.weight)
        nn.init.zeros_(self.channel_compressor.bias)
        nn.init.normal_(self.content_encoder.weight, std=0.001)
        nn.init.zeros_(self.content_encoder.bias)

    def forward(self, x):
        logits = self.content_encoder(self.channel_compressor(x))
        return carafe_fused(x, logits, self.up_kernel, self.up_group, self.scale_factor,
                            backend=self.backend)

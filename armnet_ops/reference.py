"""Pure-PyTorch references of every armnet_ops op: the oracles of all other backends.

They are differentiable through autograd, run on any device and dtype, and follow SPEC §3 to the
letter. They are written to be obviously right first and lean second: no k²-fold unfold copies
(CARAFE loops over the k² taps and broadcasts views), and the criss-cross reference is the einsum
form that mmcv ships, the baseline our kernels are measured against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# ---- criss-cross attention --------------------------------------------------------------------

def _column_key_index(H: int, device) -> torch.Tensor:
    """(H-1, H) int64: column key i of the pixel in row h is row j = i if i < h else i + 1,
    i.e. the column without the pixel itself (SPEC §3.1)."""
    i = torch.arange(max(H - 1, 0), device=device)[:, None]
    h = torch.arange(H, device=device)[None, :]
    return i + (i >= h).long()


def criss_cross_attention(q, k, v, scale: float = 1.0):
    """out[n,:,h,w] = sum over the H+W-1 keys of the row and column of softmax(scale·<q,k>)·v.

    The einsum form: (N, H, W, W) row energies and (N, H, W, H) column energies whose diagonal
    (the pixel itself, already a row key) is masked out, one softmax over both.
    """
    H = q.shape[2]
    e_row = torch.einsum("nchw,nchg->nhwg", q, k) * scale
    e_col = torch.einsum("nchw,ncgw->nhwg", q, k) * scale
    self_key = torch.eye(H, dtype=torch.bool, device=q.device)[None, :, None, :]
    e_col = e_col.masked_fill(self_key, float("-inf"))
    attn = torch.softmax(torch.cat([e_row, e_col], dim=-1), dim=-1)
    W = q.shape[3]
    a_row, a_col = attn[..., :W], attn[..., W:]
    return (torch.einsum("nhwg,nchg->nchw", a_row, v)
            + torch.einsum("nhwg,ncgw->nchw", a_col, v))


def cca_weight(q, k):
    """energy (N, H+W-1, H, W): channel z < W is row key (h, z); channel W+i is column key
    (j, w) with j = i if i < h else i+1."""
    N, _, H, W = q.shape
    e_row = torch.einsum("nchw,nchz->nzhw", q, k)
    e_col = torch.einsum("nchw,ncjw->njhw", q, k)
    idx = _column_key_index(H, q.device)[None, :, :, None].expand(N, H - 1, H, W)
    return torch.cat([e_row, torch.gather(e_col, 1, idx)], dim=1)


def cca_map(attn, v):
    """out[n,c,h,w] = sum_z attn[n,z,h,w]·v[n,c,h,z] + sum_i attn[n,W+i,h,w]·v[n,c,j(i,h),w]."""
    N, _, H, W = v.shape
    out = torch.einsum("nzhw,nchz->nchw", attn[:, :W], v)
    idx = _column_key_index(H, v.device)[None, :, :, None].expand(N, H - 1, H, W)
    a_col = attn.new_zeros(N, H, H, W).scatter(1, idx, attn[:, W:])
    return out + torch.einsum("njhw,ncjw->nchw", a_col, v)


# ---- CARAFE ---------------------------------------------------------------------------------

def carafe(features, masks, kernel_size: int, group_size: int, scale_factor: int):
    """out[n,c,y,x] = sum_{ky,kx} features[n,c,y//s+ky-r,x//s+kx-r]·masks[n,g·k²+ky·k+kx,y,x],
    zero outside the image, masks used as given.

    Each tap is a strided view of the padded features broadcast over the s×s children of its
    low-resolution pixel, so autograd saves views, never a k²-fold copy.
    """
    N, C, H, W = features.shape
    k, G, s = kernel_size, group_size, scale_factor
    r = (k - 1) // 2
    fpad = F.pad(features, (r, r, r, r)).reshape(N, G, C // G, H + 2 * r, W + 2 * r)
    m = masks.reshape(N, G, 1, k * k, H, s, W, s)
    out = None
    for ky in range(k):
        for kx in range(k):
            tap = fpad[:, :, :, ky:ky + H, kx:kx + W][..., :, None, :, None]
            term = tap * m[:, :, :, ky * k + kx]
            out = term if out is None else out + term
    return out.reshape(N, C, H * s, W * s)


def carafe_mask(mask_logits, kernel_size: int, group_size: int, scale_factor: int):
    """The CARAFEPack kernel normaliser: pixel shuffle to high resolution, then a softmax over
    the k² taps of each group. (N, G·k²·s², H, W) -> (N, G·k², sH, sW)."""
    m = F.pixel_shuffle(mask_logits, scale_factor)
    N, _, sH, sW = m.shape
    k2 = kernel_size * kernel_size
    return torch.softmax(m.reshape(N, group_size, k2, sH, sW), dim=2).reshape(N, group_size * k2, sH, sW)


def carafe_fused(features, mask_logits, kernel_size: int, group_size: int, scale_factor: int):
    return carafe(features, carafe_mask(mask_logits, kernel_size, group_size, scale_factor),
                  kernel_size, group_size, scale_factor)


# ---- directional dilated convolution ------------------------------------------------------------

def directional_conv2d(x, weight, bias=None, dilation=(1, 1), scale=None, shift=None,
                       activation=None):
    """act(conv2d(x, weight, bias, same padding, dilation) * scale + shift)."""
    kh, kw = weight.shape[-2:]
    dh, dw = dilation
    y = F.conv2d(x, weight, bias, padding=(dh * (kh - 1) // 2, dw * (kw - 1) // 2),
                 dilation=(dh, dw))
    if scale is not None:
        y = y * scale.view(1, -1, 1, 1)
    if shift is not None:
        y = y + shift.view(1, -1, 1, 1)
    if activation == "relu":
        y = torch.relu(y)
    return y

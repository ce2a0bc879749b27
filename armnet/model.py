"""ARM-Net (Ren et al., ACCV 2022): backbone → TSM → REM → DPD → 2-class head.

Data flow for an input of size H×W (padded inside `forward` to a multiple of 8, logits cropped
back, so any size works):

    backbone (dilated ResNet, output stride 8)   stem (H/2), layer1 (H/4), layer4 (H/8)
    TSM   TextSegmentationModule                 layer4 → C channels at H/8
    REM   RecognitionEnhancedModule              U-Net text attention map + T_e at H/8
    DPD   three DualPerceptualDecoder stages     H/8 → H/4 (+layer1) → H/2 (+stem) → H
    head  1×1 conv                               2-class logits at H×W

Choices the paper leaves open (each is repeated in the docstring of the module that makes it):

* TSM: a 3×3 conv + BN + ReLU first reduces the backbone feature to C channels (CCNet's `conva`);
  GTM and DTM both read this reduced feature H.
* GTM: one `armnet_ops.nn.CrissCrossAttention` applied R = 2 times (shared weights); H' is its
  output (gamma·CCA + x, gamma starts at 0, so H' starts as H).
* DTM: 4 cascaded stages with rates 1, 2, 3, 6; stage i runs a horizontal 3×3 conv with dilation
  (1, d_i) and a vertical one with dilation (d_i, 1) on the previous stage's output (both with BN +
  ReLU, via `DirectionalConv2d`) and sums them. "Each DTM output concatenated with H' and fused":
  the four [o_i, H'] concatenations followed by one 1×1 conv equal (a linear map is additive over
  its input blocks) a single 1×1 conv over [H', o_1, o_2, o_3, o_4], which is what we compute.
* DPD spatial branch: `armnet_ops.nn.CARAFEPack` (channel compressor, a k_e = 3 content encoder
  giving r²k_u² = 4·25 mask logits, `carafe_fused` with k_u = 5, r = 2).
  Channel branch: W_c = softmax(F·Fᵀ / (H·W)) over channels (the 1/(H·W) keeps the softmax out
  of saturation; it is a mean instead of a sum of products), filter generation g = 1×1 conv on
  W_c·F, zero-initialised, adaptive average pooling to k×k = 3×3 logits and a softmax over the 9
  taps → one normalised depthwise 3×3 kernel per sample and channel, applied to F_s as a sum of
  shifted taps (`depthwise_taps`); the result is added to F_s (residual) and fused by 1×1 conv +
  BN + ReLU. Every kernel sums to 1, so the branch reshapes channels but does not emphasise or
  suppress them as the paper describes (§3.3); `dpd_channel_gain=True` multiplies each kernel by
  a gain 2·sigmoid(mean of its 9 logits) in (0, 2) that restores that. It is off by default: at
  a fixed step budget it scored the same as the softmax kernel within the spread of three seeds
  (armnet/README.md, "DPD channel gain").
  Low-level blend: concatenation with a 1×1 projection of the backbone feature at the stage's
  output stride, then 3×3 conv + BN + ReLU. The last stage (to full resolution) has no backbone
  feature to blend.
* REM: a 2-level U-Net on the TSM output predicts a text attention map in [0, 1] at H/8 (l1 loss
  against the target resized by area averaging). T_e = softmax(F_K·F_Qᵀ/√d)·F_V with F_Q a 1×1
  embedding (1 → d = 16) of the map, F_K a 1×1 embedding (C → d) of the features and F_V the
  features: every position attends over positions weighted by how well its key matches the map
  (the 1/√d is the self-attention scaling of the paper's ref. [29]). The output is F + γ·T_e with a
  zero-initialised γ. The map used as Q is the U-Net prediction in training too (`teacher_forcing`
  switches to the target map in training, as the paper does with the recognizer's map).
* Ablations (paper Table 2/3): `use_tsm=False` keeps only the reduction conv (FCN baseline
  feature); `use_gtm` / `use_dtm` drop one TSM half; `use_dpd=False` replaces the decoder by a 1×1
  classifier at H/8 and bilinear ×8 upsampling (FCN); `use_rem=False` drops the REM and its loss.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from armnet_ops.nn import CARAFEPack, CrissCrossAttention, DirectionalConv2d

from .backbone import ResNet, resnet50_os8, resnet_tiny

IGNORE_INDEX = 255
STRIDE = 8  # the backbone's output stride: inputs are padded to a multiple of it
# At most this many attention weights of Eq. 6 exist at once per image (64 MB in fp32): the queries
# are processed in chunks of ATTENTION_ELEMENTS // (H/8·W/8), so memory is linear in the image area.
ATTENTION_ELEMENTS = 1 << 24


def conv_bn_relu(inp: int, out: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, out, k, padding=k // 2, bias=False), nn.BatchNorm2d(out),
                         nn.ReLU(inplace=True))


# ---- TSM ----------------------------------------------------------------------------------------

class GlobalTextModule(nn.Module):
    """GTM: criss-cross attention applied `recurrence` times with one set of weights (eq. 1)."""

    def __init__(self, channels: int, recurrence: int = 2, *, ops_backend: str = "auto"):
        super().__init__()
        self.recurrence = recurrence
        self.cca = CrissCrossAttention(channels, backend=ops_backend)

    def forward(self, x):
        for _ in range(self.recurrence):
            x = self.cca(x)
        return x


class DenseTextModule(nn.Module):
    """DTM: horizontal (1, d) and vertical (d, 1) dilated 3×3 convs, cascaded over `rates`.

    Stage i reads stage i-1's output (the first reads the TSM feature) and outputs
    relu(bn(conv_(1,d))) + relu(bn(conv_(d,1))); all stage outputs are returned.
    """

    def __init__(self, in_channels: int, channels: int, rates=(1, 2, 3, 6), *,
                 ops_backend: str = "auto"):
        super().__init__()
        self.rates = tuple(rates)
        self.horizontal = nn.ModuleList()
        self.vertical = nn.ModuleList()
        c = in_channels
        for d in self.rates:
            self.horizontal.append(DirectionalConv2d(c, channels, 3, dilation=(1, d), bias=False,
                                                     bn=True, activation="relu", backend=ops_backend))
            self.vertical.append(DirectionalConv2d(c, channels, 3, dilation=(d, 1), bias=False,
                                                   bn=True, activation="relu", backend=ops_backend))
            c = channels

    def forward(self, x) -> list[torch.Tensor]:
        outs = []
        for h, v in zip(self.horizontal, self.vertical):
            x = h(x) + v(x)
            outs.append(x)
        return outs


class TextSegmentationModule(nn.Module):
    """TSM: reduce → GTM (H') and DTM (o_1..o_4) → 1×1 fuse of [H', o_1, ..., o_4] + BN + ReLU."""

    def __init__(self, in_channels: int, channels: int, dtm_channels: int, rates=(1, 2, 3, 6),
                 recurrence: int = 2, use_gtm: bool = True, use_dtm: bool = True, *,
                 ops_backend: str = "auto"):
        super().__init__()
        self.reduce = conv_bn_relu(in_channels, channels, 3)
        self.gtm = GlobalTextModule(channels, recurrence, ops_backend=ops_backend) if use_gtm else None
        self.dtm = (DenseTextModule(channels, dtm_channels, rates, ops_backend=ops_backend)
                    if use_dtm else None)
        fused_in = channels + (len(rates) * dtm_channels if use_dtm else 0)
        self.fuse = conv_bn_relu(fused_in, channels, 1)

    def forward(self, x):
        h = self.reduce(x)
        h_prime = self.gtm(h) if self.gtm is not None else h
        parts = [h_prime] + (self.dtm(h) if self.dtm is not None else [])
        return self.fuse(torch.cat(parts, 1))


# ---- DPD ----------------------------------------------------------------------------------------

def _pool_matrix(n: int, k: int, like: torch.Tensor) -> torch.Tensor:
    """(k, n): row i averages bin i of adaptive average pooling, [⌊i·n/k⌋, ⌈(i+1)·n/k⌉)."""
    i = torch.arange(k, device=like.device)[:, None]
    start, end = (i * n) // k, ((i + 1) * n + k - 1) // k
    y = torch.arange(n, device=like.device)[None, :]
    return ((y >= start) & (y < end)).to(like.dtype) / (end - start).to(like.dtype)


def adaptive_avg_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    """F.adaptive_avg_pool2d(x, k) as two products with pooling matrices: the same bins, and
    it exports with symbolic height and width (ATen's decomposition gathers at indices that
    assume the traced size)."""
    h, w = x.shape[-2:]
    return _pool_matrix(h, k, x) @ x @ _pool_matrix(w, k, x).transpose(0, 1)


class ChannelSemanticAwareModule(nn.Module):
    """DPD channel branch: per-sample depthwise k×k kernels from channel attention (eq. 5).

    W_c = softmax(F·Fᵀ/(H·W)) (N, C, C); g = 1×1 conv on W_c·F (zero-initialised); adaptive average
    pooling to k×k gives logits F_c (N, C, k, k). The kernel is their softmax over the k² taps
    (normalised as CARAFE normalises its kernels: unnormalised dynamic kernels scale activations
    by |F|·|g| and blew up in eval mode), so it sums to 1 for every channel. With
    `channel_gain=True` it is multiplied by 2·sigmoid(mean of the k² logits), the part of F_c that
    the softmax ignores: a gain in (0, 2) that lets a channel be emphasised or suppressed (paper
    §3.3) and keeps |output| ≤ 2·max|F_s|. The kernel is applied to the spatial branch output F_s
    as a depthwise convolution (`depthwise_taps`, per sample and channel). With g = 0
    the kernel is a k×k mean (gain 1).
    """

    def __init__(self, channels: int, kernel_size: int = 3, channel_gain: bool = False):
        super().__init__()
        self.kernel_size = kernel_size
        self.channel_gain = channel_gain
        self.generate = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.generate.weight)
        nn.init.zeros_(self.generate.bias)

    def forward(self, f, f_s):
        n, c, h, w = f.shape
        flat = f.reshape(n, c, h * w)
        energy = torch.bmm(flat, flat.transpose(1, 2)) / (h * w)
        w_c = torch.softmax(energy.float(), dim=-1).to(flat.dtype)
        attended = torch.bmm(w_c, flat).reshape(n, c, h, w)
        k = self.kernel_size
        logits = adaptive_avg_pool(self.generate(attended), k).reshape(n, c, k * k).float()
        kernels = torch.softmax(logits, -1)
        if self.channel_gain:
            # the level of the logits, which the softmax discards, becomes the channel's gain
            kernels = kernels * (2 * torch.sigmoid(logits.mean(-1, keepdim=True)))
        kernels = kernels.reshape(n, c, k, k)
        return depthwise_taps(f_s, kernels.to(f_s.dtype))


def depthwise_taps(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """A per-sample depthwise k×k convolution, zero padding k // 2: x (N, C, H, W), kernels
    (N, C, k, k) → (N, C, H, W), computed as the sum of the k² shifted taps x·kernels[..., ky, kx]
    in row-major tap order.

    Taps rather than one conv with groups = N·C: a group count that depends on the batch cannot
    be exported with a dynamic batch (ONNX's Conv takes it as an attribute). With autograd on
    (training, export) the taps are products of slices of a padded copy, summed out of place.
    Without it (eval, predict) each tap is accumulated in place into the part of the output it
    reaches, with no padded copy and no product tensors: the first form holds up to five tensors
    of x's size at once, this one x and the output only (armnet_r50's last two DPD stages filter
    256 channels at H/2 and 64 at H: 1 GB a tensor for a 2048² image). addcmul_ may fuse each
    multiply-add (FMA), so the two forms agree to float rounding, not bit for bit.
    """
    k = kernels.shape[-1]
    r = k // 2
    hs, ws = x.shape[-2:]
    kernels = kernels[..., None, None]  # (N, C, k, k, 1, 1)
    if torch.is_grad_enabled():
        padded = F.pad(x, (r,) * 4)
        out = None
        for ky in range(k):
            for kx in range(k):
                tap = padded[:, :, ky:ky + hs, kx:kx + ws] * kernels[:, :, ky, kx]
                out = tap if out is None else out + tap
        return out

    def reach(d: int, n: int) -> tuple[slice, slice]:
        """Output rows i that read input row i + d inside [0, n), and those input rows."""
        lo, hi = max(0, -d), max(0, n - max(0, d))
        return slice(lo, hi), slice(lo + d, hi + d)

    out = x.new_zeros(x.shape)
    for ky in range(k):
        out_y, in_y = reach(ky - r, hs)
        for kx in range(k):
            out_x, in_x = reach(kx - r, ws)
            out[:, :, out_y, out_x].addcmul_(x[:, :, in_y, in_x], kernels[:, :, ky, kx])
    return out


class DualPerceptualDecoder(nn.Module):
    """One DPD stage: ×2 upsampling by CARAFE (spatial) + channel-aware depthwise filtering,
    1×1 fuse, then a blend with a low-level backbone feature (when `low_channels` > 0)."""

    def __init__(self, in_channels: int, out_channels: int, low_channels: int = 0,
                 low_proj: int = 32, up_kernel: int = 5, encoder_kernel: int = 3,
                 channel_kernel: int = 3, channel_gain: bool = False, *,
                 ops_backend: str = "auto"):
        super().__init__()
        self.spatial = CARAFEPack(in_channels, 2, up_kernel=up_kernel, up_group=1,
                                  encoder_kernel=encoder_kernel,
                                  compressed_channels=min(64, in_channels), backend=ops_backend)
        self.channel = ChannelSemanticAwareModule(in_channels, channel_kernel, channel_gain)
        self.fuse = conv_bn_relu(in_channels, out_channels, 1)
        if low_channels:
            self.low = conv_bn_relu(low_channels, low_proj, 1)
            self.blend = conv_bn_relu(out_channels + low_proj, out_channels, 3)
        else:
            self.low = self.blend = None

    def forward(self, f, low=None):
        f_s = self.spatial(f)
        y = self.channel(f, f_s)
        y += f_s  # the residual F_s + channel(F_s) in place, and F_s freed before the fuse conv
        del f_s
        y = self.fuse(y)
        if self.low is not None:
            y = self.blend(torch.cat([y, self.low(low)], 1))
        return y


# ---- REM ----------------------------------------------------------------------------------------

def pool_to_grid(target: torch.Tensor, size) -> torch.Tensor:
    """A full-resolution map (N, 1, H, W) averaged onto the (h, w) grid of the padded input.

    The network sees the input padded at the bottom and right to STRIDE·h × STRIDE·w, so cell
    (i, j) covers pixels [8i, 8i + 8) × [8j, 8j + 8) of the unpadded map, and the padding (no text)
    enters the last row and column with 0. Stretching H×W over the grid (adaptive pooling) would
    shift every cell when H or W is not a multiple of 8. A map of any other size (one already at
    another resolution) is area-resized onto the grid.
    """
    h, w = size
    H, W = target.shape[-2:]
    if not (STRIDE * (h - 1) < H <= STRIDE * h and STRIDE * (w - 1) < W <= STRIDE * w):
        return F.adaptive_avg_pool2d(target, (h, w))
    return F.avg_pool2d(F.pad(target, (0, STRIDE * w - W, 0, STRIDE * h - H)), STRIDE)


def chunked_attention(q, k, v, scale: float, max_elements: int = ATTENTION_ELEMENTS):
    """softmax(q·kᵀ·scale)·v for q (N, L, d), k (N, S, d), v (N, S, C), over chunks of queries.

    At most `max_elements` attention weights per image exist at once (chunks of
    max(1, max_elements // S) queries), so memory is linear in L·S / chunk instead of L·S. On the CPU
    `scaled_dot_product_attention`'s fused (flash) kernel needs q, k and v of one head size (here
    d = 16 against C channels), so the CPU falls back to the math path that materialises the L×S
    matrix: 2.2 GB for a 1024² image. GPUs take the memory-efficient kernels for each chunk. Under
    autograd each chunk keeps its weights for the backward pass, so training memory stays
    quadratic (training crops are small); inference is linear.
    """
    chunk = max(1, max_elements // max(k.shape[-2], 1))
    q, k, v = q[:, None], k[:, None], v[:, None]
    first = F.scaled_dot_product_attention(q[:, :, :chunk], k, v, scale=scale)
    if chunk >= q.shape[-2]:
        return first[:, 0]
    # Each chunk is written into one preallocated output: a list of small chunk outputs left
    # between the large temporaries fragments the heap, and RSS then grew with the chunk count.
    out = first.new_empty(*q.shape[:-1], v.shape[-1])
    out[:, :, :chunk] = first
    for i in range(chunk, q.shape[-2], chunk):
        out[:, :, i:i + chunk] = F.scaled_dot_product_attention(q[:, :, i:i + chunk], k, v,
                                                                scale=scale)
    return out[:, 0]


class LightUNet(nn.Module):
    """A two-level U-Net: features → text attention map in [0, 1] at the same resolution."""

    def __init__(self, in_channels: int, width: int = 32):
        super().__init__()
        self.enc1 = conv_bn_relu(in_channels, width)
        self.enc2 = conv_bn_relu(width, 2 * width)
        self.bottom = conv_bn_relu(2 * width, 2 * width)
        self.dec2 = conv_bn_relu(4 * width, width)
        self.dec1 = conv_bn_relu(2 * width, width)
        self.out = nn.Conv2d(width, 1, 1)
        nn.init.constant_(self.out.bias, -3.0)  # start near the mostly-empty target (σ(-3) ≈ 0.05)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2, ceil_mode=True))
        b = self.bottom(F.max_pool2d(e2, 2, ceil_mode=True))
        d2 = self.dec2(torch.cat([F.interpolate(b, size=e2.shape[-2:], mode="bilinear",
                                                align_corners=False), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[-2:], mode="bilinear",
                                                align_corners=False), e1], 1))
        return torch.sigmoid(self.out(d1))


class RecognitionEnhancedModule(nn.Module):
    """REM: U-Net text attention map A, then T_e = softmax(F_K·F_Qᵀ/√d)·F_V (eq. 6), F + γ·T_e.

    F_Q = 1×1 conv (1 → d) of A, F_K = 1×1 conv (C → d) of F, F_V = F. Computed by
    `chunked_attention` (query = F_K, key = F_Q): `scaled_dot_product_attention` over chunks of
    queries, so memory is linear in the feature map's area at inference.

    `teacher_forcing`: in training, the target map (given to `forward`, pooled onto the grid by
    `pool_to_grid`) replaces A as the source of F_Q, as the paper trains with the recognizer's
    map; the U-Net is still trained by the l1 loss. In eval mode A is always used.
    """

    def __init__(self, channels: int, embed: int = 16, unet_width: int = 32,
                 teacher_forcing: bool = False):
        super().__init__()
        self.unet = LightUNet(channels, unet_width)
        self.query = nn.Conv2d(1, embed, 1)
        self.key = nn.Conv2d(channels, embed, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.teacher_forcing = teacher_forcing

    def forward(self, f, target_map=None):
        n, c, h, w = f.shape
        attn_map = self.unet(f)
        q_map = attn_map
        if self.training and self.teacher_forcing and target_map is not None:
            q_map = pool_to_grid(target_map.to(f.dtype), (h, w))
        f_q = self.query(q_map.to(f.dtype)).flatten(2).transpose(1, 2)   # (N, HW, d)
        f_k = self.key(f).flatten(2).transpose(1, 2)                     # (N, HW, d)
        f_v = f.flatten(2).transpose(1, 2)                               # (N, HW, C)
        t_e = chunked_attention(f_k, f_q, f_v, 1.0 / math.sqrt(f_k.shape[-1]))
        t_e = t_e.transpose(1, 2).reshape(n, c, h, w)
        return f + self.gamma * t_e, attn_map


# ---- the network ----------------------------------------------------------------------------------

class ARMNet(nn.Module):
    """ARM-Net. `forward(image)` → {"logits": (N, 2, H, W), "rem_map": (N, 1, ⌈H/8⌉, ⌈W/8⌉) or None}.

    `ops_backend` ("auto" or one of armnet_ops.BACKENDS) is passed to every armnet_ops module, so
    `ops_backend="reference"` gives the same network on the pure-PyTorch ops for comparison.
    Inputs are padded (zeros, after normalisation: the mean colour) to a multiple of 8 and the
    logits cropped back.
    """

    def __init__(self, backbone: ResNet, tsm_channels: int, dtm_channels: int,
                 decoder_channels=(256, 64, 32), low_proj=(48, 32), rates=(1, 2, 3, 6),
                 recurrence: int = 2, rem_embed: int = 16, rem_width: int = 32, up_kernel: int = 5,
                 num_classes: int = 2, use_tsm: bool = True, use_gtm: bool = True,
                 use_dtm: bool = True, use_dpd: bool = True, use_rem: bool = True,
                 rem_teacher_forcing: bool = False, dpd_channel_gain: bool = False,
                 ops_backend: str = "auto"):
        super().__init__()
        self.backbone = backbone
        self.ops_backend = ops_backend
        self.config = dict(use_tsm=use_tsm, use_gtm=use_gtm, use_dtm=use_dtm, use_dpd=use_dpd,
                           use_rem=use_rem)
        ch = backbone.channels
        if use_tsm and (use_gtm or use_dtm):
            self.tsm = TextSegmentationModule(ch["layer4"], tsm_channels, dtm_channels, rates,
                                              recurrence, use_gtm, use_dtm,
                                              ops_backend=ops_backend)
        else:  # the FCN baseline feature: the reduction conv alone
            self.tsm = conv_bn_relu(ch["layer4"], tsm_channels, 3)
        self.rem = (RecognitionEnhancedModule(tsm_channels, rem_embed, rem_width,
                                              rem_teacher_forcing) if use_rem else None)
        if use_dpd:
            lows = [ch["layer1"], ch["stem"], 0]
            projs = list(low_proj) + [0]
            stages, c = [], tsm_channels
            for out_c, low_c, proj in zip(decoder_channels, lows, projs):
                stages.append(DualPerceptualDecoder(c, out_c, low_c, proj, up_kernel,
                                                    channel_gain=dpd_channel_gain,
                                                    ops_backend=ops_backend))
                c = out_c
            self.decoder = nn.ModuleList(stages)
            self.head = nn.Conv2d(c, num_classes, 1)
        else:
            self.decoder = None
            self.head = nn.Conv2d(tsm_channels, num_classes, 1)
        # A text-prior bias (text is ~5% of pixels): training starts near the class prior.
        nn.init.zeros_(self.head.bias)
        if num_classes == 2:
            self.head.bias.data[1] = math.log(0.05 / 0.95)

    def forward(self, image, rem_target=None) -> dict[str, torch.Tensor | None]:
        H, W = image.shape[-2:]
        # Padded without a branch on the size, so that an export with dynamic shapes holds for
        # every size (a branch would be traced one way and guarded for that case only). The REM
        # pools its target onto the padded grid itself (pool_to_grid).
        ph, pw = (H + STRIDE - 1) // STRIDE * STRIDE - H, (W + STRIDE - 1) // STRIDE * STRIDE - W
        image = F.pad(image, (0, pw, 0, ph))
        feats = self.backbone(image)
        # Each backbone feature is dropped once its last reader is done (layer4 after the TSM,
        # layer1 after the first decoder stage, the stem after the second): at 2048² the R50's
        # layer4 output alone is 0.5 GB, and it used to live until the logits.
        lows = [feats.pop("layer1"), feats.pop("stem"), None]
        f = self.tsm(feats.pop("layer4"))
        del feats
        rem_map = None
        if self.rem is not None:
            f, rem_map = self.rem(f, rem_target)
        if self.decoder is not None:
            for stage in self.decoder:
                f = stage(f, lows.pop(0))
            logits = self.head(f)
        else:
            logits = F.interpolate(self.head(f), size=image.shape[-2:], mode="bilinear",
                                   align_corners=False)
        if logits.shape[-2:] != image.shape[-2:]:  # safety net: never hit for multiples of 8
            logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear",
                                   align_corners=False)
        return {"logits": logits[..., :H, :W], "rem_map": rem_map}


def armnet_r50(**kw) -> ARMNet:
    """The paper's network: ResNet-50 (OS 8), TSM with 512 channels (DTM stages 256), decoder
    256-64-32 channels (H/4, H/2, H), CARAFE k_u = 5. The narrow last two stages keep the
    full-resolution work small; the paper does not give the decoder widths."""
    return ARMNet(resnet50_os8(), tsm_channels=512, dtm_channels=256,
                  decoder_channels=(256, 64, 32), low_proj=(48, 32), **kw)


def armnet_tiny(**kw) -> ARMNet:
    """A small ARM-Net for CPU demos and tests: ResNet-18-like backbone with one BasicBlock per
    stage and widths 16-32-64-128, TSM with 64 channels, decoder 48-32-16, CARAFE k_u = 3 (the
    paper's k_u = 5 costs 25/9 more on a CPU without the C++ kernels)."""
    kw.setdefault("up_kernel", 3)
    return ARMNet(resnet_tiny(), tsm_channels=64, dtm_channels=32,
                  decoder_channels=(48, 32, 16), low_proj=(16, 16), rem_width=16, **kw)


MODELS = {"armnet_r50": armnet_r50, "armnet_tiny": armnet_tiny}


def build_model(name: str, **kw) -> ARMNet:
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](**kw)


class ARMNetLoss(nn.Module):
    """Cross-entropy on the logits (ignore_index honoured) + rem_weight · l1(REM map, target).

    `text_weight` is the cross-entropy weight of the text class (background 1). Text is only a few
    per cent of the pixels, so with weight 1 a freshly initialised network sits for hundreds of
    steps on the "everything is background" plateau; a weight > 1 pushes it off early. The weighted
    mean divides by the summed weights (PyTorch's convention), so the loss scale stays comparable.
    The REM target (N, 1, H, W) in [0, 1] is averaged onto the map's grid by `pool_to_grid`
    (aligned with the padded input when H or W is not a multiple of 8).
    A batch whose pixels are all ignored contributes 0 (not NaN) cross-entropy.

    `dice_weight` adds dice_weight · mean over images of (1 − soft F_i), with soft
    F_i = 2·Σp·y / (Σp + Σy) over the image's valid pixels and p = softmax text probability: the
    per-image F that the TexRNet-style metric averages, made differentiable. Cross-entropy weighs
    every pixel alike, so images with large text dominate it; this term weighs images alike.
    """

    def __init__(self, rem_weight: float = 1.0, ignore_index: int = IGNORE_INDEX,
                 text_weight: float = 1.0, dice_weight: float = 0.0):
        super().__init__()
        if not text_weight > 0:
            raise ValueError(f"text_weight must be > 0, got {text_weight}")
        if not dice_weight >= 0:
            raise ValueError(f"dice_weight must be >= 0, got {dice_weight}")
        self.rem_weight, self.ignore_index = rem_weight, ignore_index
        self.text_weight, self.dice_weight = float(text_weight), float(dice_weight)

    def forward(self, outputs, mask, rem_target=None) -> tuple[torch.Tensor, dict[str, float]]:
        logits = outputs["logits"].float()
        if (mask != self.ignore_index).any():
            weight = None
            if self.text_weight != 1.0:
                weight = torch.ones(logits.shape[1], device=logits.device, dtype=logits.dtype)
                weight[1] = self.text_weight
            ce = F.cross_entropy(logits, mask, weight=weight, ignore_index=self.ignore_index)
        else:
            ce = logits.sum() * 0.0
        loss, parts = ce, {"ce": float(ce.detach())}
        if self.dice_weight and logits.shape[1] == 2:
            valid = (mask != self.ignore_index).to(logits.dtype)
            p = torch.softmax(logits, 1)[:, 1] * valid
            y = (mask == 1).to(logits.dtype)
            soft_f = (2 * (p * y).flatten(1).sum(1) + 1) / ((p + y).flatten(1).sum(1) + 1)
            dice = (1 - soft_f).mean()
            loss = loss + self.dice_weight * dice
            parts["dice"] = float(dice.detach())
        rem_map = outputs.get("rem_map")
        if rem_map is not None and rem_target is not None and self.rem_weight:
            target = pool_to_grid(rem_target.float(), rem_map.shape[-2:])
            l1 = F.l1_loss(rem_map.float(), target)
            loss = loss + self.rem_weight * l1
            parts["rem_l1"] = float(l1.detach())
        return loss, parts

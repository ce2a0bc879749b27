"""ResNet backbones for ARM-Net, written with torchvision's parameter names.

`resnet50_os8()` is torchvision's `resnet50(replace_stride_with_dilation=[False, True, True])`
layer for layer: layer3 and layer4 trade their stride for dilation 2 and 4, so the last feature map
has output stride 8. Because the names match (conv1, bn1, layer1..4 with Bottleneck
conv1/bn1/conv2/bn2/conv3/bn3/downsample.0/.1, fc), an ImageNet state dict saved from torchvision
loads with `load_backbone_weights(model, path)`. The classifier `fc` is left out by default
(`num_classes=None`: an unused parameter would break DDP) and its keys are skipped when loading.

`resnet_tiny()` is a ResNet-18-like network (BasicBlock, one block per stage, widths 16-32-64-128)
for CPU demos and tests; it uses the same names and the same dilation scheme.

The forward pass returns the features ARM-Net's decoder needs: `stem` (stride 2, after conv1, bn1,
relu), `layer1` (stride 4), `layer2` (stride 8) and `layer4` (stride 8).
"""
from __future__ import annotations

import os

import torch
from torch import nn


def conv3x3(inp: int, out: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inp, out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def conv1x1(inp: int, out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inp, out, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity  # in place (BN's backward does not need its output): one tensor fewer
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3×3 conv."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity  # in place (BN's backward does not need its output): one tensor fewer
        return self.relu(out)


class ResNet(nn.Module):
    """A ResNet whose layer3/layer4 are dilated instead of strided (output stride 8)."""

    def __init__(self, block, layers, widths=(64, 128, 256, 512), stem_width: int = 64,
                 dilate=(False, True, True), num_classes: int | None = None):
        super().__init__()
        self.inplanes, self.dilation = stem_width, 1
        self.conv1 = nn.Conv2d(3, stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], 2, dilate[0])
        self.layer3 = self._make_layer(block, widths[2], layers[2], 2, dilate[1])
        self.layer4 = self._make_layer(block, widths[3], layers[3], 2, dilate[2])
        if num_classes:  # only for a stand-alone classifier; ARM-Net's backbone has no fc
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(widths[3] * block.expansion, num_classes)
        self.stem_channels = stem_width
        self.channels = {"stem": stem_width, "layer1": widths[0] * block.expansion,
                         "layer2": widths[1] * block.expansion,
                         "layer4": widths[3] * block.expansion}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero-init the last BN of each residual branch: every block starts as the identity,
        # which makes training from scratch (the synthetic recipe) markedly more stable.
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        # Same rule as torchvision: a dilated stage keeps the previous dilation in its first block
        # and multiplies the dilation by the stride it gives up for the remaining blocks.
        downsample, previous_dilation = None, self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, previous_dilation)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x) -> dict[str, torch.Tensor]:
        stem = self.relu(self.bn1(self.conv1(x)))
        l1 = self.layer1(self.maxpool(stem))
        l2 = self.layer2(l1)
        l4 = self.layer4(self.layer3(l2))
        return {"stem": stem, "layer1": l1, "layer2": l2, "layer4": l4}


def resnet50_os8() -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3))


def resnet_tiny() -> ResNet:
    return ResNet(BasicBlock, (1, 1, 1, 1), widths=(16, 32, 64, 128), stem_width=16)


def load_backbone_weights(backbone: ResNet, path: str | os.PathLike) -> None:
    """Loads a torchvision-format ResNet state dict into `backbone`.

    Strict for every backbone tensor (a missing, unexpected or mis-shaped key raises a
    RuntimeError naming it); the classifier `fc.*` is ignored. A file holding
    {"state_dict": ...} or {"model": ...} (common checkpoint wrappers) is unwrapped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--backbone-weights: no such file {path!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise RuntimeError(f"--backbone-weights: cannot read {path!r} as a torch state dict: {e}") from e
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise RuntimeError(f"--backbone-weights: {path!r} holds a {type(state).__name__}, "
                           "expected a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith(("fc.", "module.fc."))}
    own = {k: v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = [f"{k}: expected {tuple(own[k].shape)}, got {tuple(state[k].shape)}"
                 for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or bad_shape:
        raise RuntimeError(
            f"--backbone-weights: {path!r} does not match the backbone "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"shape mismatches {bad_shape[:5]})")
    backbone.load_state_dict(state, strict=False)

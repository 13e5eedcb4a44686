"""FSCIL backbones (``method.backbone.name``), each a feature extractor with ``out_dim``:

- ``small``: ``engine.SmallConvNet`` (conv-BN-ReLU blocks; the CPU default);
- ``resnet20``: the CIFAR ResNet-20 (3 stages x 3 basic blocks, 16/32/64 channels x ``width``/16)
  used for CIFAR-100 by CEC and most FSCIL work;
- ``resnet12``: the few-shot ResNet-12 (4 residual blocks of three 3x3 convs, 64/160/320/640
  channels x ``width``/64, 2x2 max-pool after each) common on miniImageNet;
- ``resnet18``: timm's ResNet-18 (ImageNet stem), the standard CUB-200 backbone, which the
  protocol starts from ImageNet-pretrained weights.

``method.backbone.weights`` (local, ``s3://`` or ``timm:<model.tag>``) loads through
``trustlab.platform.weights`` (strict; prefixes such as ``module.``/``backbone.`` stripped; the
ImageNet classifier of a ResNet-18 checkpoint is left out).
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from trustlab.methods.fscil.engine import SmallConvNet


def _bn_conv(i: int, o: int, stride: int = 1) -> list:
    return [nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o)]


class BasicBlock(nn.Module):
    def __init__(self, i: int, o: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(*_bn_conv(i, o, stride), nn.ReLU(inplace=True), *_bn_conv(o, o))
        self.short = nn.Sequential() if stride == 1 and i == o else nn.Sequential(
            nn.Conv2d(i, o, 1, stride, bias=False), nn.BatchNorm2d(o))

    def forward(self, x):
        return F.relu(self.body(x) + self.short(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20: conv 3x3 -> 3 stages of 3 basic blocks (strides 1, 2, 2) -> global pool."""

    def __init__(self, in_ch: int = 3, width: int = 16):
        super().__init__()
        w = [width, 2 * width, 4 * width]
        self.stem = nn.Sequential(*_bn_conv(in_ch, w[0]), nn.ReLU(inplace=True))
        layers, c = [], w[0]
        for s, o in enumerate(w):
            for b in range(3):
                layers.append(BasicBlock(c, o, 2 if (s > 0 and b == 0) else 1))
                c = o
        self.layers = nn.Sequential(*layers)
        self.out_dim = c

    def forward(self, x):
        return self.layers(self.stem(x)).mean(dim=(2, 3))


class Res12Block(nn.Module):
    def __init__(self, i: int, o: int):
        super().__init__()
        self.body = nn.Sequential(*_bn_conv(i, o), nn.LeakyReLU(0.1, inplace=True), *_bn_conv(o, o),
                                  nn.LeakyReLU(0.1, inplace=True), *_bn_conv(o, o))
        self.short = nn.Sequential(nn.Conv2d(i, o, 1, bias=False), nn.BatchNorm2d(o))
        self.pool = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, x):
        return self.pool(F.leaky_relu(self.body(x) + self.short(x), 0.1))


class ResNet12(nn.Module):
    """Few-shot ResNet-12: 4 blocks of 64/160/320/640 channels (x ``width``/64) -> global pool."""

    def __init__(self, in_ch: int = 3, width: int = 64):
        super().__init__()
        chans = [max(1, round(c * width / 64)) for c in (64, 160, 320, 640)]
        blocks, c = [], in_ch
        for o in chans:
            blocks.append(Res12Block(c, o))
            c = o
        self.blocks = nn.Sequential(*blocks)
        self.out_dim = c

    def forward(self, x):
        return self.blocks(x).mean(dim=(2, 3))


class TimmFeatures(nn.Module):
    """A timm classifier without its head: pooled features."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.net = model
        self.out_dim = int(model.num_features)

    def forward(self, x):
        return self.net(x)


BACKBONES = ("small", "resnet12", "resnet18", "resnet20")


def build_backbone(cfg: dict, in_ch: int, size: int) -> nn.Module:
    """The ``method.backbone`` of an FSCIL method, with its weights when configured."""
    from trustlab.platform.weights import create_timm, load_into

    b = cfg["method"]["backbone"]
    name = b.get("name", "small")
    if name == "resnet18":
        return TimmFeatures(create_timm("resnet18", b.get("weights"), cfg, what="the FSCIL ResNet-18",
                                        num_classes=0, in_chans=in_ch))
    if name == "small":
        net = SmallConvNet(in_ch, size, int(b["width"]), int(b["depth"]))
    elif name == "resnet20":
        net = ResNet20(in_ch, int(b.get("width") or 16))
    elif name == "resnet12":
        net = ResNet12(in_ch, int(b.get("width") or 64))
    else:
        raise ValueError(f"method.backbone.name must be one of {', '.join(BACKBONES)}; got {name!r}")
    if b.get("weights"):
        load_into(net, b["weights"], cfg, what=f"the FSCIL {name}")
    return net

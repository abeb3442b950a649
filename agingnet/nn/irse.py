"""IR-SE residual networks: the ArcFace IR-SE50 backbone and the pSp GradualStyleEncoder built on it.

Parameter names follow the published files (``model_ir_se50.pth``, the ``encoder.*`` of pSp/SAM checkpoints).

A unit (bottleneck_IR_SE) with input u and stride s:
    res(u)      = SE(BN(conv3×3_s(PReLU(conv3×3_1(BN(u))))))
    shortcut(u) = MaxPool(1, s)(u) if in == depth else BN(conv1×1_s(u))
    out         = res(u) + shortcut(u)
    SE(v)       = v · σ(fc2(ReLU(fc1(avgpool(v)))))   (1×1 convs without bias, reduction 16)

The "fork variant" (the research fork's checkpoints) runs the first unit of the first stage at stride 1, which
doubles every feature map; its GradualStyleBlocks then have one more stride-2 conv each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agingnet.nn.stylegan2 import EqualLinear

IR50_UNITS = (3, 4, 14, 3)
IR50_WIDTHS = (64, 128, 256, 512)


class SEModule(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class BottleneckIRSE(nn.Module):
    def __init__(self, in_channel: int, depth: int, stride: int):
        super().__init__()
        if in_channel == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channel, depth, 1, stride, bias=False),
                                                nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel),
            nn.Conv2d(in_channel, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            SEModule(depth, 16),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


def make_body(widths: Sequence[int] = IR50_WIDTHS, units: Sequence[int] = IR50_UNITS,
              first_stride: int = 2) -> nn.Sequential:
    """Stages of IR-SE units; the first unit of each stage has stride 2 (``first_stride`` for stage one)."""
    layers, in_ch = [], widths[0]
    for stage, (depth, n) in enumerate(zip(widths, units)):
        for u in range(n):
            stride = (first_stride if stage == 0 else 2) if u == 0 else 1
            layers.append(BottleneckIRSE(in_ch, depth, stride))
            in_ch = depth
    return nn.Sequential(*layers)


def make_input_layer(input_nc: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(input_nc, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.PReLU(width))


class IRSEBackbone(nn.Module):
    """ArcFace IR-SE50: images [B,3,S,S] in [-1,1] → L2-normalized embeddings [B, embed_dim].

    output_layer = BN2d · Dropout · flatten · Linear(C·7·7 → embed_dim) · BN1d. The standard model takes
    S = 112 with the stride-2 first stage; ``fork_variant=True`` is the fork's 56 px stride-1 parity mode.
    """

    def __init__(self, input_size: int = 112, embed_dim: int = 512, widths: Sequence[int] = IR50_WIDTHS,
                 units: Sequence[int] = IR50_UNITS, fork_variant: bool = False, drop_ratio: float = 0.6):
        super().__init__()
        first_stride = 1 if fork_variant else 2
        down = 2 ** (len(widths) - 1) * first_stride
        if input_size % down or input_size // down != 7:
            raise ValueError(f"IR-SE input_size {input_size} does not reduce to 7×7 (fork_variant={fork_variant})")
        self.input_size = input_size
        self.input_layer = make_input_layer(3, widths[0])
        self.body = make_body(widths, units, first_stride)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(widths[-1]), nn.Dropout(drop_ratio), nn.Flatten(),
            nn.Linear(widths[-1] * 7 * 7, embed_dim), nn.BatchNorm1d(embed_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        s = self.input_size
        if not (x.ndim == 4 and x.shape[1:] == (3, s, s)):
            raise ValueError(f"IR-SE expects [B,3,{s},{s}], got {tuple(x.shape)}")
        return F.normalize(self.output_layer(self.body(self.input_layer(x))), dim=1)


class GradualStyleBlock(nn.Module):
    """log2(spatial) stride-2 conv3×3 + LeakyReLU(0.01) layers down to 1×1, then an equalized linear."""

    def __init__(self, in_c: int, out_c: int, spatial: int):
        super().__init__()
        n = int(math.log2(spatial))
        mods: list[nn.Module] = []
        for i in range(n):
            mods += [nn.Conv2d(in_c if i == 0 else out_c, out_c, 3, 2, 1), nn.LeakyReLU()]
        self.convs = nn.Sequential(*mods)
        self.out_c = out_c
        self.linear = EqualLinear(out_c, out_c, lr_mul=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.convs(x).reshape(-1, self.out_c))


class GradualStyleEncoder(nn.Module):
    """pSp encoder: images [B, input_nc, 256, 256] → W+ offsets [B, n_styles, style_dim].

    Taps after body units (end of stages 2, 3, 4): c1, c2, c3. styles[0:3] ← c3;
    p2 = up(c3 → c2) + latlayer1(c2) feeds styles[3:7]; p1 = up(p2 → c1) + latlayer2(c1) feeds styles[7:].
    ``up`` is bilinear with align_corners=True.
    """

    coarse_ind, middle_ind = 3, 7

    def __init__(self, input_nc: int = 3, n_styles: int = 18, style_dim: int = 512,
                 widths: Sequence[int] = IR50_WIDTHS, units: Sequence[int] = IR50_UNITS, fork_variant: bool = False,
                 input_size: int = 256):
        super().__init__()
        if len(widths) != 4 or len(units) != 4:
            raise ValueError("GradualStyleEncoder needs 4 stages (widths and units of length 4)")
        if widths[3] != style_dim:
            raise ValueError(f"the last stage width ({widths[3]}) must equal style_dim ({style_dim})")
        self.input_nc, self.n_styles, self.fork_variant = input_nc, n_styles, fork_variant
        self.widths, self.units, self.style_dim, self.input_size = tuple(widths), tuple(units), style_dim, input_size
        first_stride = 1 if fork_variant else 2
        self.input_layer = make_input_layer(input_nc, widths[0])
        self.body = make_body(widths, units, first_stride)
        u = list(units)
        self.taps = (u[0] + u[1] - 1, u[0] + u[1] + u[2] - 1, sum(u) - 1)
        c3 = input_size // (first_stride * 8)
        spatial = [c3, 2 * c3, 4 * c3]
        self.styles = nn.ModuleList(
            GradualStyleBlock(widths[3], style_dim, spatial[0 if i < self.coarse_ind else 1 if i < self.middle_ind
                                                           else 2])
            for i in range(n_styles)
        )
        self.latlayer1 = nn.Conv2d(widths[2], style_dim, 1)
        self.latlayer2 = nn.Conv2d(widths[1], style_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        if not (x.ndim == 4 and x.shape[1] == self.input_nc):
            raise ValueError(f"encoder expects [B,{self.input_nc},H,W], got {tuple(x.shape)}")
        x = self.input_layer(x)
        feats = {}
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i in self.taps:
                feats[i] = x
        c1, c2, c3 = (feats[t] for t in self.taps)
        latents = [s(c3) for s in self.styles[: self.coarse_ind]]
        p2 = F.interpolate(c3, size=c2.shape[-2:], mode="bilinear", align_corners=True) + self.latlayer1(c2)
        latents += [s(p2) for s in self.styles[self.coarse_ind: self.middle_ind]]
        p1 = F.interpolate(p2, size=c1.shape[-2:], mode="bilinear", align_corners=True) + self.latlayer2(c1)
        latents += [s(p1) for s in self.styles[self.middle_ind:]]
        return torch.stack(latents, dim=1)

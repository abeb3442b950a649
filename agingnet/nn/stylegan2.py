"""StyleGAN2 generator in pure PyTorch, with rosinality's module and parameter names.

No CUDA extensions: ``upfirdn2d`` and the fused leaky ReLU are written with standard ops, so the generator runs
on CPU and GPU without compiling anything, and loads ``g_ema`` of ``stylegan2-ffhq-config-f.pt`` unchanged.

Math (SPEC §1):
- PixelNorm: x / sqrt(mean(x²) + 1e-8).
- Equalized linear: y = x·(W·lr_mul/√in)ᵀ + b·lr_mul.
- Fused leaky ReLU: leaky_relu(x + b, 0.2)·√2.
- Modulated conv: w' = W/√(in·k²) · s (s = affine(w), bias init 1), demodulated by rsqrt(Σw'² + 1e-8).
- upfirdn2d(x, k, up, pad): zero-insertion upsampling by ``up``, zero padding, 2-D FIR filter with k.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_BLUR = (1, 3, 3, 1)


def default_channels(channel_multiplier: int = 2) -> dict[int, int]:
    """Channel table of the official configs: 512 up to 32 px, then 256·m … 16·m."""
    m = channel_multiplier
    return {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * m, 128: 128 * m, 256: 64 * m, 512: 32 * m, 1024: 16 * m}


def make_kernel(k: Sequence[float]) -> Tensor:
    """Separable 2-D kernel outer(k, k) normalized to sum 1."""
    k = torch.tensor(k, dtype=torch.float32)
    k = k[None, :] * k[:, None] if k.ndim == 1 else k
    return k / k.sum()


def upfirdn2d(x: Tensor, kernel: Tensor, up: int = 1, pad: tuple[int, int] = (0, 0)) -> Tensor:
    """Upsample by zero insertion, pad both spatial axes by ``pad`` = (before, after), filter with ``kernel``.

    Equivalent to rosinality's ``upfirdn2d_native`` with down=1 and non-negative padding. The filter is a
    true convolution (kernel flipped), done as one depthwise ``conv2d``.
    """
    b, c, h, w = x.shape
    if up > 1:
        z = x.new_zeros(b, c, h, up, w, up)
        z[:, :, :, 0, :, 0] = x
        x = z.reshape(b, c, h * up, w * up)
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    k = torch.flip(kernel, (0, 1)).to(x.dtype)[None, None].expand(c, 1, *kernel.shape)
    return F.conv2d(x, k, groups=c)


def fused_leaky_relu(x: Tensor, bias: Tensor, negative_slope: float = 0.2, scale: float = 2**0.5) -> Tensor:
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return F.leaky_relu(x + bias.view(shape), negative_slope) * scale


class PixelNorm(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class FusedLeakyReLU(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return fused_leaky_relu(x, self.bias)


class EqualLinear(nn.Module):
    """Equalized-learning-rate linear layer, optionally followed by the fused leaky ReLU."""

    def __init__(self, in_dim: int, out_dim: int, bias_init: float = 0.0, lr_mul: float = 1.0,
                 activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        if self.activation:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), self.bias * self.lr_mul)
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class Blur(nn.Module):
    def __init__(self, kernel: Sequence[float], pad: tuple[int, int], upsample_factor: int = 1):
        super().__init__()
        self.register_buffer("kernel", make_kernel(kernel) * upsample_factor**2)
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    def __init__(self, kernel: Sequence[float], factor: int = 2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_kernel(kernel) * factor**2)
        p = self.kernel.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: Tensor) -> Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class ModulatedConv2d(nn.Module):
    """Style-modulated convolution, batched as one grouped convolution (no loop over samples)."""

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int, demodulate: bool = True,
                 upsample: bool = False, blur_kernel: Sequence[float] = DEFAULT_BLUR):
        super().__init__()
        self.in_channel, self.out_channel, self.kernel_size = in_channel, out_channel, kernel_size
        self.upsample = upsample
        if upsample:
            factor = 2
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        self.scale = 1 / math.sqrt(in_channel * kernel_size**2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1)
        self.demodulate = demodulate

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        b, c, h, w = x.shape
        k, o = self.kernel_size, self.out_channel
        s = self.modulation(style).view(b, 1, c, 1, 1)
        weight = self.scale * self.weight * s
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8).view(b, o, 1, 1, 1)
        x = x.reshape(1, b * c, h, w)
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(b * c, o, k, k)
            out = F.conv_transpose2d(x, weight, padding=0, stride=2, groups=b)
            out = self.blur(out.view(b, o, *out.shape[-2:]))
        else:
            out = F.conv2d(x, weight.reshape(b * o, c, k, k), padding=self.padding, groups=b)
            out = out.view(b, o, *out.shape[-2:])
        return out


class NoiseInjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        if noise is None:
            noise = x.new_empty(x.shape[0], 1, x.shape[2], x.shape[3]).normal_()
        return x + self.weight * noise


class ConstantInput(nn.Module):
    def __init__(self, channel: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, batch: int) -> Tensor:
        return self.input.expand(batch, -1, -1, -1)


class StyledConv(nn.Module):
    """Modulated conv → noise injection → bias + fused leaky ReLU."""

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int, upsample: bool = False,
                 blur_kernel: Sequence[float] = DEFAULT_BLUR):
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, kernel_size, style_dim, upsample=upsample,
                                    blur_kernel=blur_kernel)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)

    def forward(self, x: Tensor, style: Tensor, noise: Tensor | None = None) -> Tensor:
        return self.activate(self.noise(self.conv(x, style), noise=noise))


class ToRGB(nn.Module):
    """1×1 modulated conv to RGB (no demodulation) + bias + upsampled skip."""

    def __init__(self, in_channel: int, style_dim: int, upsample: bool = True,
                 blur_kernel: Sequence[float] = DEFAULT_BLUR):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: Tensor, style: Tensor, skip: Tensor | None = None) -> Tensor:
        out = self.conv(x, style) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


class Generator(nn.Module):
    """StyleGAN2 generator (rosinality layout).

    Args:
        size: output resolution (power of two ≥ 8).
        style_dim: latent width (512 for the published models).
        n_mlp: mapping layers (8).
        channel_multiplier: m of the default channel table.
        channels: optional channel table {resolution: channels} replacing the default (tiny test configs).
        lr_mlp: learning-rate multiplier of the mapping network (0.01).

    Call with W+ codes ``G(w_plus [B, n_latent, style_dim])`` or, with ``input_is_latent=False``, with z
    [B, style_dim] (mapped, optionally truncated toward ``truncation_latent``). ``noise_mode="const"`` uses the
    stored ``noises.noise_i`` buffers, ``"random"`` draws fresh noise.
    """

    def __init__(self, size: int = 1024, style_dim: int = 512, n_mlp: int = 8, channel_multiplier: int = 2,
                 channels: Mapping[int, int] | None = None, blur_kernel: Sequence[float] = DEFAULT_BLUR,
                 lr_mlp: float = 0.01):
        super().__init__()
        if size < 8 or size & (size - 1):
            raise ValueError(f"StyleGAN2 size must be a power of two >= 8, got {size}")
        self.size, self.style_dim = size, style_dim
        self.channels = {int(k): int(v) for k, v in (channels or default_channels(channel_multiplier)).items()}
        self.log_size = int(math.log2(size))
        missing = [2**i for i in range(2, self.log_size + 1) if 2**i not in self.channels]
        if missing:
            raise ValueError(f"channel table lacks resolutions {missing}")
        self.num_layers = (self.log_size - 2) * 2 + 1
        self.n_latent = self.log_size * 2 - 2

        self.style = nn.Sequential(
            PixelNorm(), *[EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation=True) for _ in range(n_mlp)]
        )
        ch = self.channels
        self.input = ConstantInput(ch[4])
        self.conv1 = StyledConv(ch[4], ch[4], 3, style_dim, blur_kernel=blur_kernel)
        self.to_rgb1 = ToRGB(ch[4], style_dim, upsample=False)
        self.convs, self.to_rgbs = nn.ModuleList(), nn.ModuleList()
        self.noises = nn.Module()
        for i in range(self.num_layers):
            r = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, r, r))
        in_ch = ch[4]
        for i in range(3, self.log_size + 1):
            out_ch = ch[2**i]
            self.convs.append(StyledConv(in_ch, out_ch, 3, style_dim, upsample=True, blur_kernel=blur_kernel))
            self.convs.append(StyledConv(out_ch, out_ch, 3, style_dim, blur_kernel=blur_kernel))
            self.to_rgbs.append(ToRGB(out_ch, style_dim, blur_kernel=blur_kernel))
            in_ch = out_ch

    def mapping(self, z: Tensor) -> Tensor:
        """z [B, style_dim] → w [B, style_dim]."""
        if not (z.ndim == 2 and z.shape[1] == self.style_dim):
            raise ValueError(f"z must be [B,{self.style_dim}], got {tuple(z.shape)}")
        return self.style(z)

    @torch.no_grad()
    def mean_latent(self, n: int = 4096, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(n, self.style_dim, generator=generator, device=self.input.input.device)
        return self.style(z).mean(0, keepdim=True)

    def forward(self, latent: Tensor, input_is_latent: bool = True, noise_mode: str = "random",
                truncation: float = 1.0, truncation_latent: Tensor | None = None,
                noise: Sequence[Tensor | None] | None = None) -> Tensor:
        """Synthesize images [B,3,size,size] from W+ codes (or z/w with ``input_is_latent=False``/2-D input)."""
        if noise_mode not in ("const", "random"):
            raise ValueError(f"noise_mode must be 'const' or 'random', got {noise_mode!r}")
        w = latent if input_is_latent else self.mapping(latent)
        if truncation < 1:
            if truncation_latent is None:
                raise ValueError("truncation < 1 needs truncation_latent")
            w = truncation_latent + truncation * (w - truncation_latent)
        if w.ndim == 2:
            w = w.unsqueeze(1).expand(-1, self.n_latent, -1)
        if not (w.ndim == 3 and w.shape[1:] == (self.n_latent, self.style_dim)):
            raise ValueError(f"W+ codes must be [B,{self.n_latent},{self.style_dim}], got {tuple(w.shape)}")
        if noise is None:
            noise = (
                [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]
                if noise_mode == "const"
                else [None] * self.num_layers
            )
        out = self.conv1(self.input(w.shape[0]), w[:, 0], noise=noise[0])
        skip = self.to_rgb1(out, w[:, 1])
        i = 1
        for conv_up, conv, n1, n2, to_rgb in zip(self.convs[::2], self.convs[1::2], noise[1::2], noise[2::2],
                                                 self.to_rgbs):
            out = conv(conv_up(out, w[:, i], noise=n1), w[:, i + 1], noise=n2)
            skip = to_rgb(out, w[:, i + 2], skip)
            i += 2
        return skip

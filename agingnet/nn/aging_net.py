"""The composed aging network of SPEC §2 (SAM with ``start_from_encoded_w_plus``, optional MyTimeMachine adapter).

    codes = E_age(rgb ⊕ age plane) + E_psp(rgb) + w̄         (E_psp frozen; w̄ = latent_avg [n_styles, D])
    codes = blender(codes, t) when the adapter is on
    image = avgpool_256(decoder(codes, input_is_latent=True))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agingnet.nn.blender import Blender
from agingnet.nn.irse import GradualStyleEncoder
from agingnet.nn.stylegan2 import Generator


def add_age_channel(rgb: Tensor, ages: Tensor) -> Tensor:
    """rgb [B,3,H,W] ⊕ a constant plane holding the normalized target age [B] → [B,4,H,W]."""
    if not (rgb.ndim == 4 and rgb.shape[1] == 3):
        raise ValueError(f"expected [B,3,H,W], got {tuple(rgb.shape)}")
    if not (ages.shape == (rgb.shape[0],)):
        raise ValueError(f"ages must be [B], got {tuple(ages.shape)}")
    plane = ages.to(rgb.dtype).view(-1, 1, 1, 1).expand(-1, 1, *rgb.shape[-2:])
    return torch.cat([rgb, plane], dim=1)


class AgingNet(nn.Module):
    """SAM's pSp-style aging network. ``net(x_rgb_and_age, noise_mode)`` → (image [B,3,256,256], codes)."""

    def __init__(self, encoder: GradualStyleEncoder, decoder: Generator,
                 pretrained_encoder: GradualStyleEncoder | None = None, blender: Blender | None = None,
                 use_blender: bool = False, output_size: int = 256):
        super().__init__()
        if encoder.input_nc != 4:
            raise ValueError(f"the age encoder takes RGB + age (4 channels), got input_nc={encoder.input_nc}")
        if encoder.n_styles != decoder.n_latent:
            raise ValueError(f"encoder n_styles {encoder.n_styles} != decoder n_latent {decoder.n_latent}")
        if use_blender and blender is None:
            raise ValueError("use_blender=True needs a blender")
        self.encoder, self.decoder = encoder, decoder
        self.pretrained_encoder, self.blender = pretrained_encoder, blender
        self.use_blender, self.output_size = use_blender, output_size
        self.register_buffer("latent_avg", torch.zeros(decoder.n_latent, decoder.style_dim))
        if pretrained_encoder is not None:
            pretrained_encoder.requires_grad_(False)

    @property
    def n_styles(self) -> int:
        return self.decoder.n_latent

    def encode(self, x: Tensor) -> Tensor:
        """W+ codes [B, n_styles, D] for x = rgb ⊕ age plane [B,4,H,W]."""
        if not (x.ndim == 4 and x.shape[1] == 4):
            raise ValueError(f"AgingNet expects [B,4,H,W] (RGB + age), got {tuple(x.shape)}")
        codes = self.encoder(x)
        base = self.latent_avg
        if self.pretrained_encoder is not None:
            trains = any(p.requires_grad for p in self.pretrained_encoder.parameters())  # stage "world" only
            with torch.set_grad_enabled(trains and torch.is_grad_enabled()):
                base = self.pretrained_encoder(x[:, :3]) + self.latent_avg
        codes = codes + base
        if self.use_blender:
            codes = self.blender(codes, x[:, 3].mean(dim=(1, 2)))
        return codes

    def decode(self, codes: Tensor, noise_mode: str = "random", output_size: int | None = None) -> Tensor:
        img = self.decoder(codes, input_is_latent=True, noise_mode=noise_mode)
        size = output_size or self.output_size
        if img.shape[-1] != size:
            img = F.adaptive_avg_pool2d(img, (size, size))
        return img

    def forward(self, x: Tensor, noise_mode: str = "random") -> tuple[Tensor, Tensor]:
        codes = self.encode(x)
        return self.decode(codes, noise_mode), codes


# SPEC §9: W+ layers blended by ``aging_strength``; the strict-pose schedule per layer index.
BLEND_LAYERS = range(8, 13)


def blend_codes(identity_codes: Tensor, aged_codes: Tensor, strength: float, strict_pose: bool = False) -> Tensor:
    """Blend W+ codes between an identity code (age = the input's own) and the aged code.

    Plain: layers 8–12 take identity + s·(aged − identity), the others the aged code (s = 1 is a plain forward).
    Strict pose: per-layer strength 0 for layers 0–7, 0.3·s for 8–9, s for 10–12, min(s, 0.4) from 13 on.
    """
    if not (identity_codes.shape == aged_codes.shape):
        raise ValueError("codes must have the same shape")
    n = aged_codes.shape[1]
    if strict_pose:
        per = [0.0 if i < 8 else 0.3 * strength if i < 10 else strength if i < 13 else min(strength, 0.4)
               for i in range(n)]
    else:
        per = [strength if i in BLEND_LAYERS else 1.0 for i in range(n)]
    s = torch.tensor(per, dtype=aged_codes.dtype, device=aged_codes.device).view(1, n, 1)
    return identity_codes + s * (aged_codes - identity_codes)

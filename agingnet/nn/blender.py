"""MyTimeMachine's personalized adapter ("blender"), key layout ``blender.*`` of the fork's checkpoints.

For each of the n styles G_i: b_i = Lin(512→32)·ReLU·Lin(32→32)(G_i); g = Lin(32n→128)·ReLU·Lin(128→128)(⊕_i b_i);
e = Lin(1→16)·ReLU·Lin(16→16)(t); W_i = fc_i([g, e, G_i]) + G_i with fc_i = Lin(656→512)·ReLU·Lin(512→512).
At 18 styles and width 512 this has 11,187,888 parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.ReLU(), nn.Linear(h, o))


class Blender(nn.Module):
    def __init__(self, n_styles: int = 18, style_dim: int = 512, bottleneck: int = 32, global_dim: int = 128,
                 age_dim: int = 16):
        super().__init__()
        self.n_styles, self.style_dim = n_styles, style_dim
        for i in range(n_styles):
            setattr(self, f"bottleneck_{i}", _mlp(style_dim, bottleneck, bottleneck))
        self.global_mlp = _mlp(bottleneck * n_styles, global_dim, global_dim)
        self.age_mlp = _mlp(1, age_dim, age_dim)
        for i in range(n_styles):
            setattr(self, f"fc_{i}", _mlp(global_dim + age_dim + style_dim, style_dim, style_dim))

    def forward(self, codes: Tensor, target_age: Tensor) -> Tensor:
        """codes [B, n, D] (global model's W+), target_age [B] normalized → personalized W+ [B, n, D]."""
        b, n, d = codes.shape
        if not ((n, d) == (self.n_styles, self.style_dim)):
            raise ValueError(f"codes must be [B,{self.n_styles},{self.style_dim}]")
        if not (target_age.shape == (b,)):
            raise ValueError(f"target_age must be [B], got {tuple(target_age.shape)}")
        g = self.global_mlp(torch.cat([getattr(self, f"bottleneck_{i}")(codes[:, i]) for i in range(n)], dim=1))
        e = self.age_mlp(target_age.view(b, 1).to(codes.dtype))
        ctx = torch.cat([g, e], dim=1)
        return torch.stack([getattr(self, f"fc_{i}")(torch.cat([ctx, codes[:, i]], 1)) for i in range(n)], 1) + codes

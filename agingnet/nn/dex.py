"""DEX VGG16 apparent-age classifier (``dex_age_classifier.pth``, key ``state_dict``).

conv1_1 … conv5_3 (3×3, padding 1, ReLU), 2×2 max-pool after each block, fc6 · ReLU, fc7 · ReLU, fc8_101.
Input: the [-1,1] image bilinearly resized to ``input_size`` (224; no mean/std, as SAM feeds it).
Predicted age = Σ_j j·softmax(logits)_j, j = 0…100 — one matrix product, no loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VGG16_BLOCKS = (2, 2, 3, 3, 3)
VGG16_WIDTHS = (64, 128, 256, 512, 512)


class DEX(nn.Module):
    def __init__(self, widths: Sequence[int] = VGG16_WIDTHS, fc_dim: int = 4096, input_size: int = 224,
                 num_ages: int = 101):
        super().__init__()
        self.input_size, self.num_ages = input_size, num_ages
        self.conv_names: list[list[str]] = []
        in_ch = 3
        for b, (n, w) in enumerate(zip(VGG16_BLOCKS, widths), start=1):
            names = []
            for j in range(1, n + 1):
                name = f"conv{b}_{j}"
                setattr(self, name, nn.Conv2d(in_ch, w, 3, padding=1))
                names.append(name)
                in_ch = w
            self.conv_names.append(names)
        feat = input_size // 32
        self.fc6 = nn.Linear(in_ch * feat * feat, fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.fc8_101 = nn.Linear(fc_dim, num_ages)
        self.register_buffer("age_values", torch.arange(num_ages, dtype=torch.float32), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Logits [B, 101] for images [B,3,H,W] in [-1,1] (resized here to input_size)."""
        if not (x.ndim == 4 and x.shape[1] == 3):
            raise ValueError(f"DEX expects [B,3,H,W], got {tuple(x.shape)}")
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        for names in self.conv_names:
            for name in names:
                x = F.relu(getattr(self, name)(x))
            x = F.max_pool2d(x, 2, 2)
        x = F.relu(self.fc6(x.flatten(1)))
        x = F.relu(self.fc7(x))
        return self.fc8_101(x)

    def predict_age(self, x: Tensor) -> Tensor:
        """Expected age in years [B]: softmax(logits) · [0, 1, …, 100]."""
        return torch.softmax(self.forward(x), dim=1) @ self.age_values

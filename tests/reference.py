"""Independent references shared by several test files (written out here, not taken from the package)."""

from __future__ import annotations

import torch


def pool_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """Adaptive average pooling as a matrix: output i averages inputs ⌊i·n/m⌋ … ⌈(i+1)·n/m⌉ − 1."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        a, b = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, a:b] = 1.0 / (b - a)
    return m

"""Independent references shared by several test files (written out here, not taken from the package)."""

from __future__ import annotations

import math

import torch


def pool_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """Adaptive average pooling as a matrix: output i averages inputs ⌊i·n/m⌋ … ⌈(i+1)·n/m⌉ − 1."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        a, b = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, a:b] = 1.0 / (b - a)
    return m


def gauss_blur_reference(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """[3,S,S] blurred by a Gaussian written out: radius ⌈3σ⌉, weights exp(−d²/2σ²) summed to 1, edges repeated."""
    if sigma == 0:
        return img.double()
    r = math.ceil(3 * sigma)
    w = torch.tensor([math.exp(-(d * d) / (2 * sigma * sigma)) for d in range(-r, r + 1)], dtype=torch.float64)
    w = w / w.sum()
    out = img.double()
    for dim in (1, 2):  # rows, then columns; index clamping repeats the edge pixels
        n = out.shape[dim]
        acc = torch.zeros_like(out)
        for k, d in enumerate(range(-r, r + 1)):
            idx = torch.arange(n).add(d).clamp(0, n - 1)
            acc += w[k] * out.index_select(dim, idx)
        out = acc
    return out


def blur_fit_reference(y: torch.Tensor, truth: torch.Tensor, grid) -> list[float]:
    """Brute force: for each image, every σ of the grid, the σ with the smallest mean squared error."""
    best = []
    for n in range(y.shape[0]):
        t = truth[min(n, truth.shape[0] - 1)]
        errs = [float((y[n].double() - gauss_blur_reference(t, s)).pow(2).mean()) for s in grid]
        best.append(float(grid[errs.index(min(errs))]))
    return best

"""Face-region boxes from 68 landmarks, box jitter and differentiable crops for ROI-ID (SPEC §6).

Boxes are [B,4] (x0, y0, x1, y1) in continuous pixel coordinates: pixel i covers [i, i+1), so a landmark
at pixel index p sits at p + 0.5 and the whole image is (0, 0, W, H). Everything is vectorised over B.
"""

from __future__ import annotations

import torch
from kornia.geometry.transform import crop_and_resize
from torch import Tensor

#: iBUG-68 indices of each region
REGIONS: dict[str, tuple[int, ...]] = {
    "eyes": tuple(range(36, 48)),
    "mouth": tuple(range(48, 68)),
    "nose": tuple(range(27, 36)),
    "broweyes": tuple(range(17, 27)) + tuple(range(36, 48)),
}

#: boxes used when landmarks fail, relative (x0, y0, x1, y1) of an FFHQ-aligned face
FALLBACK: dict[str, tuple[float, float, float, float]] = {
    "eyes": (0.26, 0.30, 0.74, 0.53),
    "mouth": (0.35, 0.60, 0.65, 0.86),
    "nose": (0.40, 0.40, 0.60, 0.68),
    "broweyes": (0.24, 0.22, 0.76, 0.53),
}


def check_region(region: str) -> str:
    if region not in REGIONS:
        raise ValueError(f"unknown ROI region {region!r}; choose from {sorted(REGIONS)}")
    return region


def clip_boxes(boxes: Tensor, size: int | tuple[int, int], min_side: float = 1.0) -> Tensor:
    """Clip boxes to the W×H image (``size`` = S or (H, W)), keeping every side ≥ ``min_side`` pixels."""
    if not (boxes.ndim == 2 and boxes.shape[1] == 4):
        raise ValueError(f"boxes must be [B,4], got {tuple(boxes.shape)}")
    h, w = (size, size) if isinstance(size, int) else size
    lim = boxes.new_tensor([w, h])
    lo = torch.minimum(torch.maximum(boxes[:, :2], torch.zeros_like(lim)), lim - min_side)
    hi = torch.minimum(torch.maximum(boxes[:, 2:], lo + min_side), lim)
    return torch.cat([lo, hi], dim=1)


def region_boxes(points: Tensor, valid: Tensor, region: str, size: int,
                 pad: float = 0.35, clip: bool = True) -> tuple[Tensor, Tensor]:
    """Padded square box around a region's landmarks, or around its fallback box where the landmarks failed.

    Landmarks: (w, h) = max_k p_k − min_k p_k, centre c = (min_k p_k + max_k p_k)/2 + 0.5. Fallback (SPEC §6,
    the same geometry for every box): (w, h) and c of the box ``FALLBACK[region]``·size. Then side
    s = max(w, h)·(1 + pad) and box = (c − s/2, c + s/2), clipped to the size×size image when ``clip`` (the
    ROI-ID term clips only after jittering). Returns (boxes [B,4], used_fallback [B] bool); an image with any
    non-finite landmark counts as a failure.
    """
    check_region(region)
    if not (points.ndim == 3 and points.shape[1:] == (68, 2)):
        raise ValueError(f"points must be [B,68,2], got {tuple(points.shape)}")
    if not (valid.shape == points.shape[:1]):
        raise ValueError(f"valid must be [B], got {tuple(valid.shape)}")
    p = points[:, list(REGIONS[region])].float()
    mn, mx = p.amin(dim=1), p.amax(dim=1)
    ok = valid.bool() & torch.isfinite(points).all(dim=2).all(dim=1)
    fb = torch.tensor(FALLBACK[region], dtype=p.dtype, device=p.device) * size
    c = torch.where(ok[:, None], (mn + mx) / 2 + 0.5, (fb[:2] + fb[2:]) / 2)
    wh = torch.where(ok[:, None], mx - mn, fb[2:] - fb[:2])
    s = wh.amax(dim=1, keepdim=True) * (1 + pad)
    boxes = torch.cat([c - s / 2, c + s / 2], dim=1)
    return (clip_boxes(boxes, size) if clip else boxes), ~ok


def jitter_boxes(boxes: Tensor, jitter: float, generator: torch.Generator | None = None,
                 size: int | None = None) -> Tensor:
    """Random shift and scale: c' = c + U(−j, j)·s per axis, (w', h') = (w, h)·(1 + U(−j, j)), s = max(w, h).

    Three independent uniforms per box, drawn from ``generator`` (on its own device). Clipped to the image
    when ``size`` is given.
    """
    if not (boxes.ndim == 2 and boxes.shape[1] == 4):
        raise ValueError(f"boxes must be [B,4], got {tuple(boxes.shape)}")
    if jitter < 0:
        raise ValueError(f"ROI jitter must be >= 0, got {jitter}")
    if jitter > 0:
        dev = generator.device if generator is not None else boxes.device
        u = (torch.rand(boxes.shape[0], 3, generator=generator, device=dev) * 2 - 1).to(boxes) * jitter
        c = (boxes[:, :2] + boxes[:, 2:]) / 2
        wh = boxes[:, 2:] - boxes[:, :2]
        s = wh.amax(dim=1, keepdim=True)
        c = c + u[:, :2] * s
        wh = wh * (1 + u[:, 2:])
        boxes = torch.cat([c - wh / 2, c + wh / 2], dim=1)
    return boxes if size is None else clip_boxes(boxes, size)


def crop_boxes(images: Tensor, boxes: Tensor, out_size: int) -> Tensor:
    """Bilinear crops [B,C,out,out] of ``boxes`` (one per image), differentiable w.r.t. ``images``.

    Output pixel i samples the source at x0 + (i + 0.5)·(x1 − x0)/out in continuous coordinates, i.e. at
    pixel index x0 − 0.5 + (i + 0.5)·w/out (same for y); borders replicate the edge pixel.
    """
    if not (images.ndim == 4):
        raise ValueError(f"images must be [B,C,H,W], got {tuple(images.shape)}")
    b = images.shape[0]
    if not (boxes.shape == (b, 4)):
        raise ValueError(f"boxes must be [{b},4], got {tuple(boxes.shape)}")
    if out_size < 2:
        raise ValueError(f"ROI crop size must be >= 2, got {out_size}")
    bx = boxes.to(images)
    half = (bx[:, 2:] - bx[:, :2]) * (0.5 / out_size)
    a = bx[:, :2] - 0.5 + half  # first sample (x, y), pixel index
    z = bx[:, 2:] - 0.5 - half  # last sample
    tr, bl = torch.stack([z[:, 0], a[:, 1]], 1), torch.stack([a[:, 0], z[:, 1]], 1)
    corners = torch.stack([a, tr, z, bl], dim=1)  # TL, TR, BR, BL
    return crop_and_resize(images, corners, (out_size, out_size), mode="bilinear", padding_mode="border",
                           align_corners=True)

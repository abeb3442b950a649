"""Image helpers for TensorBoard grids, inference strips and GIFs (SPEC §9).

Pixel mapping: an image x ∈ [-1, 1] becomes v = round(clamp((x + 1)·127.5, 0, 255)) as uint8, so
−1 → 0, 0 → 128 (round half to even of 127.5), 1 → 255. Layouts carry no padding: a grid of C columns of
T-pixel tiles is C·T wide and R·(band + T) tall, where each tile has a text band of ``band`` pixels above it
(PIL's default font).
Every file is written atomically (temporary file in the target folder, then ``os.replace``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from agingnet.io import atomic_write, atomic_write_text

BAND_COLOUR = (24, 24, 24)
TEXT_COLOUR = (240, 240, 240)


def to_uint8(img: Tensor) -> np.ndarray:
    """[…,3,H,W] → […,H,W,3] uint8 with v = round(clamp((x + 1)·127.5, 0, 255))."""
    if img.ndim < 3 or img.shape[-3] != 3:
        raise ValueError(f"to_uint8 expects [...,3,H,W] in [-1,1], got {tuple(img.shape)}")
    v = ((img.detach().float().cpu() + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)
    return v.movedim(-3, -1).contiguous().numpy()


def to_pil(img: Tensor) -> Image.Image:
    """One image [3,H,W] (or [1,3,H,W]) in [-1,1] → RGB PIL image."""
    if img.ndim == 4:
        if img.shape[0] != 1:
            raise ValueError(f"to_pil takes one image, got a batch of {img.shape[0]}")
        img = img[0]
    return Image.fromarray(to_uint8(img), mode="RGB")


def from_uint8(arr: np.ndarray | Tensor) -> Tensor:
    """[…,H,W,3] uint8 (array or tensor) → […,3,H,W] float32 in [-1,1] with x = v/127.5 − 1 (the inverse of
    :func:`to_uint8`; the one mapping the data module, the world and the tools share)."""
    if not torch.is_tensor(arr):
        arr = np.asarray(arr)  # PIL's arrays are read-only, which torch.from_numpy warns about: copy those
        arr = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    if arr.dtype != torch.uint8 or arr.ndim < 3 or arr.shape[-1] != 3:
        raise ValueError(f"from_uint8 expects [...,H,W,3] uint8, got {tuple(arr.shape)} {arr.dtype}")
    # one copy into a contiguous float tensor, then in place (the data loader's hot path)
    return arr.movedim(-1, -3).to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)


def pil_to_tensor(img: Image.Image) -> Tensor:
    """RGB PIL image → [3,H,W] float32 in [-1,1] with x = v/127.5 − 1 (inverse of :func:`to_uint8`)."""
    return from_uint8(np.asarray(img.convert("RGB"), dtype=np.uint8))


def default_font(tile: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's default font at size max(10, tile // 20) (the bitmap font where FreeType is unavailable)."""
    try:
        return ImageFont.load_default(size=max(10, tile // 20))
    except (TypeError, OSError, ImportError):  # old Pillow or no FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def band_height(tile: int) -> int:
    """Height of the label band above a ``tile``-pixel tile: the font's line height + 4 px."""
    font = default_font(tile)
    l, t, r, b = font.getbbox("Ag0(→)")
    return int(b - min(t, 0)) + 4


def resize(x: Tensor, size: int) -> Tensor:
    """[B,3,H,W] → [B,3,size,size]: area averaging when shrinking (exact block means when H is a multiple of
    size), bicubic when enlarging (clamped to [-1,1]); unchanged when already that size."""
    if x.shape[-2:] == (size, size):
        return x
    if x.shape[-1] >= size and x.shape[-2] >= size:
        return F.adaptive_avg_pool2d(x.float(), (size, size))
    return F.interpolate(x.float(), size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def labelled_grid(columns: Sequence[tuple[Tensor, Sequence[str]]], tile: int | None = None,
                  band: int | None = None) -> Image.Image:
    """Grid with one column per ``(images [B,3,H,W] in [-1,1], labels)`` entry and one row per image.

    Every tile is resized to ``tile`` (default: the first column's height) and gets its label written on a
    ``band``-pixel strip above it (default :func:`band_height`). Size: (C·tile) × (B·(band + tile)).
    """
    if not columns:
        raise ValueError("labelled_grid needs at least one column")
    b = int(columns[0][0].shape[0])
    for j, (imgs, labels) in enumerate(columns):
        if imgs.ndim != 4 or imgs.shape[1] != 3:
            raise ValueError(f"labelled_grid column {j}: expected [B,3,H,W], got {tuple(imgs.shape)}")
        if imgs.shape[0] != b or len(labels) != b:
            raise ValueError(f"labelled_grid column {j}: {imgs.shape[0]} images and {len(labels)} labels, "
                             f"expected {b} of each (the first column's batch)")
    tile = int(tile or columns[0][0].shape[-2])
    band = band_height(tile) if band is None else int(band)
    font = default_font(tile)
    tiles = np.stack([to_uint8(resize(imgs.detach().cpu(), tile)) for imgs, _ in columns])  # [C,B,T,T,3]
    c = tiles.shape[0]
    bands = np.broadcast_to(np.array(BAND_COLOUR, dtype=np.uint8), (c, b, band, tile, 3))
    cells = np.concatenate([bands, tiles], axis=2)  # [C,B,band+T,T,3]
    canvas = Image.fromarray(np.ascontiguousarray(cells.transpose(1, 2, 0, 3, 4)).reshape(
        b * (band + tile), c * tile, 3), mode="RGB")
    draw = ImageDraw.Draw(canvas)
    for j, (_, labels) in enumerate(columns):
        for i, text in enumerate(labels):  # PIL draws one string at a time
            if band > 0 and text:
                draw.text((j * tile + 2, i * (band + tile) + 1), str(text), fill=TEXT_COLOUR, font=font)
    return canvas


def age_strip(input_img: Tensor, outputs_by_age: Mapping[int, Tensor], input_label: str = "input",
              tile: int | None = None, band: int | None = None) -> Image.Image:
    """One labelled row: the input, then the output for every target age in ascending order ("age 40").

    ``input_img`` [3,H,W] or [1,3,H,W]; each output likewise. Width (1 + len(outputs_by_age))·tile.
    """
    def one(x: Tensor, what: str) -> Tensor:
        x = x.unsqueeze(0) if x.ndim == 3 else x
        if x.ndim != 4 or x.shape[:2] != (1, 3):
            raise ValueError(f"age_strip: {what} must be [3,H,W] or [1,3,H,W], got {tuple(x.shape)}")
        return x

    cols = [(one(input_img, "input_img"), [input_label])]
    cols += [(one(outputs_by_age[a], f"output for age {a}"), [f"age {int(a)}"])
             for a in sorted(outputs_by_age)]
    return labelled_grid(cols, tile=tile, band=band)


def save_image(img: Image.Image | Tensor, path: str | os.PathLike, **save_kw) -> Path:
    """Write a PIL image (or a [3,H,W] tensor in [-1,1]) atomically; the format follows the suffix."""
    if isinstance(img, Tensor):
        img = to_pil(img)
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image suffix {path.suffix!r} (use .png, .jpg, .webp, …)")
    return atomic_write(path, lambda f: img.save(f, format=fmt, **save_kw))


def save_gif(frames: Sequence[Image.Image], path: str | os.PathLike, duration_ms: int = 400,
             loop: int = 0) -> Path:
    """Animated GIF of ``frames`` (all converted to RGB, resized to the first frame), written atomically."""
    if not frames:
        raise ValueError(f"{path}: save_gif needs at least one frame")
    size = frames[0].size
    rgb = [f.convert("RGB") if f.size == size else f.convert("RGB").resize(size, Image.Resampling.BILINEAR)
           for f in frames]
    return atomic_write(path, lambda f: rgb[0].save(f, format="GIF", save_all=True, append_images=rgb[1:],
                                                 duration=int(duration_ms), loop=int(loop)))


def save_text(text: str, path: str | os.PathLike) -> Path:
    """Write UTF-8 text atomically (JSON, CSV, markdown reports)."""
    return atomic_write_text(text, path)

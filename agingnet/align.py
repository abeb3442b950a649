"""FFHQ-style face alignment from 68 iBUG landmarks (SPEC §9).

Geometry (landmark coordinates are pixel indices, pixel i covering the continuous interval [i, i+1)):

* eye centres e_l = mean(p[36:42]), e_r = mean(p[42:48]); ē = (e_l + e_r)/2, d = e_r − e_l;
* mouth centre m̄ = (p[48] + p[54])/2, v = m̄ − ē (eye → mouth);
* the aligned "right" axis x = d + R(v), with R(a, b) = (b, −a) turning "down" into "right", rescaled to
  |x| = max(2|d|, 1.8|v|); the "down" axis y = (−x_y, x_x);
* centre c = ē + 0.1·v; quad (upper-left, lower-left, lower-right, upper-right) = c − x − y, c − x + y,
  c + x + y, c + x − y, a square of side 2|x|.

The quad is mapped onto the output square with PIL's QUAD transform (corners shifted by +0.5 to continuous
coordinates), sampled at ``supersample``× the output size and reduced with Lanczos. Large quads are first
reduced by an integer factor (no aliasing from bilinear sampling); quads reaching outside the photo are
reflect-padded and the padding is blended toward a blurred copy and the median colour.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageFilter

from agingnet.landmarks import build_landmarks


def _check_landmarks(landmarks: np.ndarray) -> np.ndarray:
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (68, 2) or not np.isfinite(lm).all():
        raise ValueError(f"landmarks must be a finite [68,2] array of (x,y) pixels, got shape {lm.shape}")
    return lm


def ffhq_quad(landmarks: np.ndarray) -> np.ndarray:
    """Corners [4,2] (upper-left, lower-left, lower-right, upper-right) of the FFHQ crop, in pixel indices."""
    lm = _check_landmarks(landmarks)
    eye_avg = (lm[36:42].mean(0) + lm[42:48].mean(0)) / 2
    d = lm[42:48].mean(0) - lm[36:42].mean(0)
    v = (lm[48] + lm[54]) / 2 - eye_avg
    x = d + np.array([v[1], -v[0]])
    norm = float(np.hypot(*x))
    if norm < 1e-6:
        raise ValueError("landmarks are degenerate: eye and mouth points give no face orientation")
    x *= max(2.0 * np.hypot(*d), 1.8 * np.hypot(*v)) / norm
    y = np.array([-x[1], x[0]])
    c = eye_avg + 0.1 * v
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def _pad_blend(img: Image.Image, pad: tuple[int, int, int, int], sigma: float) -> Image.Image:
    """Reflect-pad by (left, top, right, bottom); blend the padding toward blur and median by its depth."""
    l, t, r, b = pad
    a = np.asarray(img, dtype=np.float32)
    h, w = a.shape[:2]
    a = np.pad(a, ((t, b), (l, r), (0, 0)), mode="reflect")
    jj = np.arange(a.shape[1], dtype=np.float32)
    ii = np.arange(a.shape[0], dtype=np.float32)
    dx = np.maximum(np.maximum(l - jj, jj - (l + w - 1)), 0) / max(l, r, 1)
    dy = np.maximum(np.maximum(t - ii, ii - (t + h - 1)), 0) / max(t, b, 1)
    m = np.maximum(dx[None, :], dy[:, None])[..., None]
    blurred = np.asarray(Image.fromarray(np.uint8(np.clip(a, 0, 255).round())).filter(
        ImageFilter.GaussianBlur(sigma)), dtype=np.float32)
    a += (blurred - a) * np.clip(3.0 * m, 0.0, 1.0)
    a += (np.median(a, axis=(0, 1)) - a) * np.clip(m, 0.0, 1.0)
    return Image.fromarray(np.uint8(np.clip(a, 0, 255).round()))


def align_face(img: Image.Image, landmarks: np.ndarray, output_size: int = 256,
               supersample: int = 2) -> Image.Image:
    """Crop, rotate and scale ``img`` to the FFHQ layout defined by its 68 landmarks; RGB, output_size².

    Steps: quad (see module doc) → integer shrink f = ⌊2|x| / (output_size·supersample)⌋ when f ≥ 2 → crop to
    the quad's bounding box + border (10 % of the quad side, ≥ 3 px) → reflect pad where it leaves the photo
    → QUAD transform to (output_size·supersample)² → Lanczos resize to output_size².
    """
    if not isinstance(img, Image.Image):
        raise ValueError(f"align_face expects a PIL.Image, got {type(img).__name__}")
    if output_size < 8:
        raise ValueError(f"output_size must be >= 8, got {output_size}")
    img = img.convert("RGB")
    quad = ffhq_quad(landmarks)
    qsize = float(np.hypot(*(quad[3] - quad[0])))
    ss = output_size * max(int(supersample), 1)

    shrink = int(math.floor(qsize / ss))
    if shrink >= 2:  # continuous scale σ ≈ 1/shrink per axis: index p maps to (p + 0.5)·σ − 0.5
        size = (max(round(img.width / shrink), 1), max(round(img.height / shrink), 1))
        sigma = np.array([size[0] / img.width, size[1] / img.height])
        img = img.resize(size, Image.Resampling.BOX)
        quad = (quad + 0.5) * sigma - 0.5
        qsize = float(np.hypot(*(quad[3] - quad[0])))

    border = max(int(round(qsize * 0.1)), 3)
    lo = np.floor(quad.min(0)).astype(int) - border
    hi = np.ceil(quad.max(0)).astype(int) + border
    box = (max(lo[0], 0), max(lo[1], 0), min(hi[0], img.width), min(hi[1], img.height))
    if box != (0, 0, img.width, img.height):
        img = img.crop(box)
        quad = quad - np.array(box[:2], dtype=np.float64)

    pad = tuple(int(p) for p in (max(-lo[0], 0), max(-lo[1], 0), max(hi[0] - box[2], 0),
                                 max(hi[1] - box[3], 0)))
    if any(pad):
        img = _pad_blend(img, pad, sigma=max(qsize * 0.02, 1.0))
        quad = quad + np.array(pad[:2], dtype=np.float64)

    out = img.transform((ss, ss), Image.Transform.QUAD, tuple((quad + 0.5).flatten()),
                        Image.Resampling.BILINEAR)
    if ss != output_size:
        out = out.resize((output_size, output_size), Image.Resampling.LANCZOS)
    return out


class FaceAligner:
    """Detect 68 landmarks with ``backend`` ("dlib" | "fan") and align; ``None`` when no face is found.

    Extra keyword arguments go to the landmark backend (e.g. ``model_path`` for dlib, ``device`` for FAN).
    """

    def __init__(self, backend: str = "dlib", output_size: int = 256, **detector_kw):
        if backend not in ("dlib", "fan"):
            raise ValueError(f"FaceAligner backend must be 'dlib' or 'fan' (a detector), got {backend!r}")
        self.detector = build_landmarks(backend, **detector_kw)
        self.output_size = int(output_size)

    def __call__(self, img: Image.Image) -> Image.Image | None:
        lm = self.detector.detect_pil(img)
        return None if lm is None else align_face(img, lm, self.output_size)

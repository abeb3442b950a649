"""Raw-photo fixtures for tests/test_prep.py: the astronaut (a real face) and synthetic faces pasted into larger
canvases with a known similarity transform, plus the awkward files a user's folder holds."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from agingnet.data.datasets import SyntheticFaces

BLUR = 2.5


def astronaut() -> Image.Image:
    """scikit-image's astronaut, cropped to 256² around her face and enlarged to 320² (face crop side ≈ 216 px;
    dlib finds it without upsampling)."""
    from skimage.data import astronaut as _a

    return Image.fromarray(_a()).crop((94, 0, 350, 256)).resize((320, 320), Image.Resampling.BICUBIC)


def synthetic(index: int, size: int = 256, seed: int = 0) -> Image.Image:
    return Image.fromarray(SyntheticFaces(n=index + 1, size=size, seed=seed).render(index))


def similarity(angle_deg: float, scale: float, offset, src_centre) -> np.ndarray:
    """2×3 matrix of q = offset + s·R(θ)·(p − c) with R(θ) = [[cos θ, sin θ], [−sin θ, cos θ]]: a visually
    counter-clockwise turn by θ in image coordinates (y down)."""
    t = math.radians(angle_deg)
    r = scale * np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])
    return np.hstack([r, (np.asarray(offset, float) - r @ np.asarray(src_centre, float))[:, None]])


def paste(src: Image.Image, canvas: tuple[int, int], angle_deg: float, scale: float, offset,
          background=(90, 110, 130), base: Image.Image | None = None) -> tuple[Image.Image, np.ndarray]:
    """``src`` turned by θ, scaled by s, its centre moved to ``offset`` on a ``canvas``; returns (image, M)."""
    c = ((src.width - 1) / 2, (src.height - 1) / 2)
    m = similarity(angle_deg, scale, offset, c)
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
    # PIL's AFFINE maps output (x, y) to input; pixel centres sit at +0.5 in its continuous coordinates
    a, b, tx = inv[0]
    d, e, ty = inv[1]
    coeffs = (a, b, tx + 0.5 * (a + b) - 0.5, d, e, ty + 0.5 * (d + e) - 0.5)
    layer = src.convert("RGBA").transform(canvas, Image.Transform.AFFINE, coeffs, Image.Resampling.BICUBIC,
                                          fillcolor=(0, 0, 0, 0))
    out = (base.copy() if base is not None else Image.new("RGB", canvas, background)).convert("RGBA")
    out.alpha_composite(layer)
    return out.convert("RGB"), m


def gamma(img: Image.Image, g: float) -> Image.Image:
    lut = [round(255 * (i / 255) ** g) for i in range(256)]
    return img.point(lut * len(img.getbands()))


def to_bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def write_raw_folder(root: Path) -> dict:
    """Write the raw photo folder; returns what each file is expected to become."""
    root.mkdir(parents=True, exist_ok=True)
    astro = astronaut()
    ex: dict = {"geometry": {}}

    def save(name: str, img: Image.Image, fmt: str = "PNG", **kw) -> None:
        (root / name).write_bytes(to_bytes(img, fmt, **kw))

    # the actor: the astronaut, each copy with its own tone (or mirrored) so no two are pixel near-duplicates
    save("30_ref.png", astro)
    for name, angle, scale, canvas, offset, g in [
        ("31_turned.jpg", 20.0, 1.1, (520, 460), (250, 230), 0.6),
        ("40_large.png", -15.0, 1.3, (560, 520), (300, 250), 1.6),
        ("42_shifted.png", 5.0, 1.0, (480, 520), (300, 300), 0.8),
    ]:
        img, m = paste(gamma(astro, g), canvas, angle, scale, offset)
        save(name, img, "JPEG" if name.endswith(".jpg") else "PNG", **({"quality": 95} if name.endswith("jpg") else {}))
        ex["geometry"][name] = {"angle": angle, "scale": scale, "M": m}
    # exact duplicate (bytes) and near duplicate (+3 grey levels, JPEG)
    (root / "31_copy.jpg").write_bytes((root / "31_turned.jpg").read_bytes())
    near = Image.open(root / "40_large.png").point(lambda v: min(v + 3, 255))
    save("41_near.jpg", near, "JPEG", quality=92)
    # blurred copy and a small face (crop side ≈ 173 px, under the tests' --min-face 190)
    save("44_blurred.png", paste(gamma(astro, 1.3).filter(ImageFilter.GaussianBlur(BLUR)), (420, 420), 0.0, 1.0,
                                 (210, 210))[0])
    save("46_small.png", paste(gamma(astro, 2.0).transpose(Image.Transpose.FLIP_LEFT_RIGHT), (400, 380), 0.0, 0.8,
                               (200, 190))[0])
    # somebody else: a different synthetic identity
    save("48_other.png", paste(synthetic(2, 256), (420, 420), 0.0, 1.4, (210, 210))[0])
    # two faces: the actor and a LARGER synthetic stranger
    two, _ = paste(gamma(astro, 1.1).transpose(Image.Transpose.FLIP_LEFT_RIGHT), (900, 460), 0.0, 1.0, (220, 230))
    two, _ = paste(synthetic(4, 256), (900, 460), 0.0, 1.7, (640, 230), base=two)
    save("50_two_faces.png", two)
    # not a face; not an image; a truncated image
    rng = np.random.default_rng(0)
    save("52_noface.png", Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).filter(
        ImageFilter.GaussianBlur(3)))
    (root / "notes.txt").write_text("call agent on Monday\n")
    (root / "53_broken.png").write_bytes(to_bytes(astro, "PNG")[:3000])
    # awkward encodings of the actor
    save("33_cmyk.jpg", gamma(astro, 0.45).convert("CMYK"), "JPEG", quality=95)
    g16 = (np.asarray(gamma(astro, 1.0).transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert("L"), dtype=np.uint16)
           * 257)
    Image.fromarray(g16).save(root / "34_grey16.png")
    save("36_grey.png", gamma(astro, 0.5).convert("L"))
    rgba = gamma(astro, 1.3).transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert("RGBA")
    alpha = np.full((320, 320), 255, np.uint8)
    alpha[:, :30] = 0  # a transparent strip at the left
    rgba.putalpha(Image.fromarray(alpha))
    save("37_rgba.png", rgba)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view": pixels are stored turned 90° counter-clockwise
    save("38_exif.jpg", gamma(astro, 0.7).transpose(Image.Transpose.FLIP_LEFT_RIGHT).transpose(
        Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())
    # bad ages
    save("150_typo.png", gamma(astro, 1.05))
    save("IMG_0001.png", gamma(astro, 0.95))          # no age in the name, none in the CSV
    save("still_07.png", gamma(astro, 2.4))           # age 39 from the CSV
    save("still_08.png", gamma(astro, 0.75))          # CSV age -3
    save("still_09.png", gamma(astro, 0.35).transpose(Image.Transpose.FLIP_LEFT_RIGHT))  # CSV years → 41
    return ex

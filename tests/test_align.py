"""FFHQ-style alignment: geometry on synthetic faces, dlib on a real photo, no-face handling (SPEC §9)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from agingnet.align import FaceAligner, align_face, ffhq_quad
from agingnet.landmarks import TEMPLATE_68

# Synthetic face (scale k, image side 600k): eye centres (250,300)k and (350,300)k, mouth corners (270,400)k
# and (330,400)k. By hand: d = (100,0)k, v = (0,100)k, x = d + (v_y, −v_x) = (200,0)k,
# |x| = max(2|d|, 1.8|v|) = 200k, c = ē + 0.1v = (300,310)k; the crop is x ∈ [100,500]k, y ∈ [110,510]k
# (+0.5 continuous). At 256 px one crop unit is 0.64/k px, so the left eye lands at index
# ((250.5k − 100.5k)·0.64/k − 0.5, (300.5k − 110.5k)·0.64/k − 0.5) = (95.5, 121.1), etc.
EXPECTED_256 = {"red": (95.5, 121.1), "blue": (159.5, 121.1), "green": (127.5, 185.1)}
COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0)}


def synthetic_face(k: float = 1.0, angle_deg: float = 0.0, shift=(0.0, 0.0), side: int | None = None):
    """Gray photo, coloured disks at the eye centres and mouth centre; landmarks rotated about (300,300)k."""
    side = side or int(600 * k)
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    centre = np.array([300.0, 300.0]) * k

    def place(p):
        return (rot @ (np.asarray(p, dtype=np.float64) * k - centre)) + centre + np.asarray(shift)

    lm = np.zeros((68, 2))
    lm[:] = place((300, 350))
    lm[36:42] = place((250, 300))
    lm[42:48] = place((350, 300))
    lm[48], lm[54] = place((270, 400)), place((330, 400))
    img = Image.new("RGB", (side, side), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    r = 8 * k
    for name, p in (("red", place((250, 300))), ("blue", place((350, 300))), ("green", place((300, 400)))):
        x, y = p + 0.5  # disk centred on the pixel index p
        draw.ellipse([x - r, y - r, x + r, y + r], fill=COLOURS[name])
    return img, lm


def centroid(img: Image.Image, colour: str) -> tuple[float, float]:
    a = np.asarray(img).astype(np.float64)
    target = np.array(COLOURS[colour], dtype=np.float64)
    w = np.clip(1 - np.abs(a - target).max(axis=2) / 100.0, 0, 1)  # membership in the disk's colour
    ys, xs = np.mgrid[: a.shape[0], : a.shape[1]]
    assert w.sum() > 10, f"no {colour} disk in the aligned image"
    return float((w * xs).sum() / w.sum()), float((w * ys).sum() / w.sum())


def assert_expected(out: Image.Image, tol: float):
    assert out.size == (256, 256) and out.mode == "RGB"
    for name, exp in EXPECTED_256.items():
        got = centroid(out, name)
        assert got == pytest.approx(exp, abs=tol), f"{name}: {got} vs {exp}"


def test_quad_by_hand():
    _, lm = synthetic_face()
    q = ffhq_quad(lm)
    assert np.allclose(q, [[100, 110], [100, 510], [500, 510], [500, 110]])


@pytest.mark.parametrize("angle", [0.0, 25.0, -40.0])
def test_synthetic_alignment_lands_features(angle):
    img, lm = synthetic_face(angle_deg=angle)
    assert_expected(align_face(img, lm, 256), tol=0.1 if angle == 0 else 0.5)


def test_large_face_shrink_path():
    img, lm = synthetic_face(k=4.0)  # quad side 1600 px > 2·(256·2): reduced by an integer factor first
    assert_expected(align_face(img, lm, 256), tol=0.1)


def test_face_at_the_border_pad_path():
    img, lm = synthetic_face(shift=(-180.0, -150.0))  # the quad leaves the photo on the left and top
    assert ffhq_quad(lm).min() < 0
    out = align_face(img, lm, 256)
    assert_expected(out, tol=0.1)
    corner = np.asarray(out)[:20, :20].astype(float)
    assert np.abs(corner - 128).max() < 30  # padding blends to the surrounding colour, no black frame


def test_align_errors():
    img, lm = synthetic_face()
    with pytest.raises(ValueError, match=r"\[68,2\].*\(5, 2\)"):
        align_face(img, lm[:5])
    with pytest.raises(ValueError, match="PIL.Image"):
        align_face(np.asarray(img), lm)
    with pytest.raises(ValueError, match="'template'"):
        FaceAligner("template")


def test_dlib_astronaut_alignment():
    pytest.importorskip("dlib")
    data = pytest.importorskip("skimage.data")
    aligner = FaceAligner("dlib", output_size=256)
    out = aligner(Image.fromarray(data.astronaut()))
    assert out is not None and out.size == (256, 256)
    lm = aligner.detector.detect_pil(out)
    assert lm is not None
    eye_l, eye_r = lm[36:42].mean(0), lm[42:48].mean(0)
    tpl = np.array(TEMPLATE_68) * 256 - 0.5
    assert np.abs(eye_l - tpl[36:42].mean(0)).max() < 4 and np.abs(eye_r - tpl[42:48].mean(0)).max() < 4
    # independent of the template: eyes level, symmetric about the centre, 1/4 of the side apart
    assert abs(eye_l[1] - eye_r[1]) < 2.5
    assert (eye_l[0] + eye_r[0]) / 2 == pytest.approx(127.5, abs=3)
    assert eye_r[0] - eye_l[0] == pytest.approx(64, abs=3)


def test_no_face_returns_none():
    pytest.importorskip("dlib")
    assert FaceAligner("dlib")(Image.new("RGB", (256, 256), (128, 128, 128))) is None

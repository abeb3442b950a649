"""Landmark backends: template geometry, dlib on a real photo, clear errors (SPEC §6)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from agingnet.landmarks import IBUG_MIRROR, TEMPLATE_68, build_landmarks
from agingnet.roi import region_boxes

# Positions read by eye from skimage.data.astronaut() (512×512): pupils and mouth centre, face extent.
ASTRO_LEFT_PUPIL, ASTRO_RIGHT_PUPIL, ASTRO_MOUTH = (204, 101), (247, 102), (223, 145)
ASTRO_FACE = (170, 55, 285, 190)  # x0, y0, x1, y1: forehead to chin, cheek to cheek (generous)


def astronaut_pil():
    data = pytest.importorskip("skimage.data")
    return Image.fromarray(data.astronaut())


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1


def inside(pt, box):
    return box[0] <= pt[0] <= box[2] and box[1] <= pt[1] <= box[3]


def test_template_shapes_and_scaling():
    det = build_landmarks("template", size=256)
    pts, valid = det(torch.zeros(3, 3, 256, 256))
    assert pts.shape == (3, 68, 2) and pts.dtype == torch.float32 and valid.tolist() == [True] * 3
    assert torch.equal(pts[0], pts[2])
    big, _ = det(torch.zeros(1, 3, 512, 512))
    assert torch.allclose(big[0], 2 * (pts[0] + 0.5) - 0.5)  # same continuous position, twice the scale
    wide, _ = det(torch.zeros(1, 3, 256, 512))
    assert torch.allclose(wide[0, :, 1], pts[0, :, 1]) and torch.allclose(wide[0, :, 0], big[0, :, 0])
    u, v = TEMPLATE_68[36]
    assert pts[0, 36].tolist() == pytest.approx([u * 256 - 0.5, v * 256 - 0.5])
    pil = det.detect_pil(Image.new("RGB", (128, 128)))
    assert pil.shape == (68, 2) and np.allclose(pil, (pts[0].numpy() + 0.5) / 2 - 0.5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        det(torch.zeros(3, 256, 256))


def test_template_is_a_frontal_ffhq_face():
    uv = np.array(TEMPLATE_68)
    assert uv.shape == (68, 2) and (uv > 0).all() and (uv < 1).all()
    mirrored = uv[list(IBUG_MIRROR)] * [-1, 1] + [1, 0]
    assert np.allclose(mirrored, uv, atol=1e-3)  # left/right symmetric about u = 0.5
    eye_l, eye_r = uv[36:42].mean(0), uv[42:48].mean(0)
    mouth = (uv[48] + uv[54]) / 2
    # FFHQ recipe: the crop side is 4× the eye distance when the eyes dominate → eye distance 0.25
    assert eye_r[0] - eye_l[0] == pytest.approx(0.25, abs=0.01)
    assert eye_l[1] == pytest.approx(eye_r[1], abs=1e-3)
    assert uv[17:27, 1].max() < uv[36:48, 1].min()  # brows above eyes
    assert uv[36:48, 1].max() < uv[31:36, 1].min() < mouth[1]  # eyes above the nose base above the mouth
    assert uv[8, 1] == uv[:, 1].max()  # chin is the lowest point


def test_build_landmarks_unknown():
    with pytest.raises(ValueError, match="unknown landmark backend 'hog'"):
        build_landmarks("hog")


def test_dlib_missing_model_file(tmp_path):
    pytest.importorskip("dlib")
    missing = tmp_path / "shape_predictor_68_face_landmarks.dat"
    with pytest.raises(FileNotFoundError, match="shape_predictor_68_face_landmarks.dat"):
        build_landmarks("dlib", model_path=missing)


def test_dlib_absent_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)  # makes `import dlib` raise ImportError
    with pytest.raises(ImportError, match=r"agingnet\[landmarks\]"):
        build_landmarks("dlib")


def test_fan_missing_weights_names_folder(monkeypatch, tmp_path):
    pytest.importorskip("face_alignment")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    with pytest.raises(FileNotFoundError, match=f"{folder}.*2DFAN4.*s3fd"):
        build_landmarks("fan")


def test_dlib_on_astronaut():
    pytest.importorskip("dlib")
    img = astronaut_pil()
    det = build_landmarks("dlib")
    lm = det.detect_pil(img)
    assert lm is not None and lm.shape == (68, 2)

    gray = Image.new("RGB", (256, 256), (128, 128, 128))
    batch = torch.stack([to_tensor(img), to_tensor(gray.resize((512, 512)))])
    pts, valid = det(batch)
    assert valid.tolist() == [True, False]
    assert np.abs(pts[0].numpy() - lm).max() <= 1.0 and pts[1].abs().sum() == 0

    eyes, fb_e = region_boxes(pts[:1], valid[:1], "eyes", 512, pad=0.35)
    mouth, fb_m = region_boxes(pts[:1], valid[:1], "mouth", 512, pad=0.35)
    eyes, mouth = eyes[0].tolist(), mouth[0].tolist()
    assert not fb_e.any() and not fb_m.any()
    assert inside(ASTRO_LEFT_PUPIL, eyes) and inside(ASTRO_RIGHT_PUPIL, eyes)
    assert not inside(ASTRO_MOUTH, eyes)
    assert inside(ASTRO_MOUTH, mouth) and not inside(ASTRO_LEFT_PUPIL, mouth)
    assert (eyes[1] + eyes[3]) / 2 < (mouth[1] + mouth[3]) / 2  # eyes box above mouth box
    for box in (eyes, mouth):
        assert inside(box[:2], ASTRO_FACE) and inside(box[2:], ASTRO_FACE)
    # individual indices: 36 = outer corner of the subject's right eye (left in the photo), 45 the other
    assert lm[36, 0] < ASTRO_LEFT_PUPIL[0] < lm[39, 0] < lm[42, 0] < ASTRO_RIGHT_PUPIL[0] < lm[45, 0]
    assert lm[48, 0] < ASTRO_MOUTH[0] < lm[54, 0] and lm[30, 1] < lm[57, 1] < lm[8, 1]


_PERTURBED_DETECT = """
import json, sys
import numpy as np, torch
from PIL import Image
from skimage import data
from agingnet.landmarks import build_landmarks
img = torch.from_numpy(np.array(Image.fromarray(data.astronaut()).resize((256, 256)))).permute(2, 0, 1)
batch = (img.float() / 127.5 - 1).unsqueeze(0).repeat(2, 1, 1, 1).contiguous()  # NCHW, as a training batch
pts, valid = build_landmarks("dlib")(batch)
print(json.dumps({"valid": valid.tolist(), "points": pts.tolist()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MALLOC_PERTURB_ is glibc's")
def test_dlib_batch_detection_does_not_read_freed_memory(tmp_path):
    """dlib's binding frees the contiguous copy it makes of a strided array before reading it; glibc's
    MALLOC_PERTURB_ overwrites freed memory, so reading it there loses every face (this made a training run's ROI
    landmark failures differ between two identical runs). The batch path must hand dlib arrays it reads in place."""
    import json
    import os
    import subprocess

    pytest.importorskip("dlib")
    pytest.importorskip("skimage.data")
    want = build_landmarks("dlib").detect_pil(astronaut_pil().resize((256, 256)))
    assert want is not None
    env = {**os.environ, "MALLOC_PERTURB_": "165"}
    r = subprocess.run([sys.executable, "-c", _PERTURBED_DETECT], capture_output=True, text=True, env=env,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["valid"] == [True, True]
    assert np.abs(np.asarray(got["points"]) - want[None]).max() <= 1.0


def test_fan_wrapper_with_stub(monkeypatch, tmp_path):
    """Weights present under $TORCH_HOME/hub/checkpoints (stub files) → no download, largest face kept."""
    fa = pytest.importorskip("face_alignment")
    from agingnet.landmarks import fan_weight_files

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    for f in fan_weight_files():
        assert f.startswith(str(folder))
        open(f, "wb").close()
    small = np.full((68, 2), 10.0) + np.arange(68)[:, None] * 0.1  # 6.7 px wide
    large = np.full((68, 2), 50.0) + np.arange(68)[:, None] * 1.0  # 67 px wide
    seen = {}

    class StubFA:
        def __init__(self, landmarks_type, **kw):
            seen.update(kw, landmarks_type=landmarks_type)
            self.out = [small, large]

        def get_landmarks_from_image(self, rgb):
            seen["shape"] = rgb.shape
            return self.out

    monkeypatch.setattr(fa, "FaceAlignment", StubFA)
    det = build_landmarks("fan", device="cpu")
    assert seen["landmarks_type"] == fa.LandmarksType.TWO_D and seen["device"] == "cpu"
    assert seen.get("compile", False) is False
    pts, valid = det(torch.zeros(2, 3, 64, 48))
    assert seen["shape"] == (64, 48, 3) and valid.tolist() == [True, True]
    assert torch.allclose(pts[1], torch.from_numpy(large).float())
    det._fa.out = None
    assert det.detect_pil(Image.new("RGB", (32, 32))) is None

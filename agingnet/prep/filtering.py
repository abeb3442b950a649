"""``prep filter ALIGNED``: move unusable faces to ``ALIGNED/_rejected/<reason>/`` and list them.

Reasons, tested in this order (a face gets the first that applies):

* ``too_small``: the face's crop square in the original photo (``face_size`` in ``prep_summary.json``) is
  under ``min_face`` px, so the aligned image is mostly upsampling;
* ``blurry``: variance of the Laplacian (OpenCV's 3×3 kernel [[0,1,0],[1,−4,1],[0,1,0]]) of the grayscale face,
  resized to 256 px and cropped to the box of the canonical landmarks, under ``blur_threshold``;
* ``near_duplicate``: two faces closer than ``dup_identity`` in dlib's 128-d embedding AND than ``dup_pixels``
  in mean absolute grayscale difference (64 px, values in [0, 1]); of each connected group the sharpest stays;
* ``identity_outlier``: distance to the robust centre c = coordinate-wise median of the remaining embeddings
  above max(``outlier_floor``, median(d) + ``outlier_k``·1.4826·MAD(d)), the usual robust z-score cut.

Nothing is deleted; files only move inside ``ALIGNED``. ``ALIGNED/_rejected/filter_report.json`` lists every
face with its measurements and verdict (written atomically); ``filter_cache.npz`` next to it keeps the
measurements by content hash, so re-running with other thresholds measures only new faces.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from agingnet.io import atomic_write, atomic_write_json
from agingnet.landmarks import TEMPLATE_68
from agingnet.prep.aligning import REJECTED, SUMMARY
from agingnet.prep.faces import FaceModels, PhotoError, read_photo

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CACHE = "filter_cache.npz"
REASONS = ("too_small", "blurry", "near_duplicate", "identity_outlier")


@dataclass
class FilterConfig:
    min_face: float = 160.0
    blur_threshold: float = 40.0
    dup_identity: float = 0.1
    dup_pixels: float = 0.03
    outlier_k: float = 3.0
    outlier_floor: float = 0.45

    def check(self) -> None:
        for k, v in asdict(self).items():
            if not (isinstance(v, (int, float)) and np.isfinite(v) and v >= 0):
                raise ValueError(f"--{k.replace('_', '-')} must be a number >= 0, got {v!r}")


def sharpness(img: Image.Image) -> float:
    """Variance of the Laplacian inside the canonical landmarks' box of the face, at 256 px."""
    g = np.asarray(img.convert("L").resize((256, 256), Image.Resampling.LANCZOS), dtype=np.float64)
    uv = np.asarray(TEMPLATE_68) * 256
    (l, t), (r, b) = np.floor(uv.min(0)).astype(int), np.ceil(uv.max(0)).astype(int)
    return float(cv2.Laplacian(g[t:b, l:r], cv2.CV_64F, ksize=1).var())


def thumb(img: Image.Image) -> np.ndarray:
    """64 px grayscale in [0, 1] (the pixel distance of near-duplicates)."""
    return np.asarray(img.convert("L").resize((64, 64), Image.Resampling.BOX), dtype=np.float32) / 255.0


def _face_sizes(folder: Path) -> dict[str, float]:
    path = folder / SUMMARY
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    return {r["output"]: float(r["face_size"]) for r in data.get("inputs", [])
            if r.get("kept") and r.get("output") and r.get("face_size") is not None}


def decide(names: list[str], sizes: dict[str, float], sharp: np.ndarray, emb: np.ndarray, thumbs: np.ndarray,
           cfg: FilterConfig) -> list[dict]:
    """Verdict per face (see the module doc); pure function of the measurements."""
    n = len(names)
    out = [{"file": names[i], "sharpness": round(float(sharp[i]), 2), "face_size": sizes.get(names[i]),
            "reason": None} for i in range(n)]
    for i in range(n):
        if sizes.get(names[i]) is not None and sizes[names[i]] < cfg.min_face:
            out[i]["reason"] = "too_small"
        elif sharp[i] < cfg.blur_threshold:
            out[i]["reason"] = "blurry"
    alive = [i for i in range(n) if out[i]["reason"] is None]
    if len(alive) >= 2:  # near-duplicates: union-find over close pairs; the sharpest of a group stays
        e, t = emb[alive], thumbs[alive]
        d_id = np.linalg.norm(e[:, None] - e[None], axis=-1)
        d_px = np.abs(t[:, None] - t[None]).mean(axis=(-1, -2))
        parent = list(range(len(alive)))

        def root(a: int) -> int:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        for a, b in zip(*np.nonzero(np.triu((d_id < cfg.dup_identity) & (d_px < cfg.dup_pixels), 1))):
            parent[root(int(a))] = root(int(b))
        groups: dict[int, list[int]] = {}
        for a in range(len(alive)):
            groups.setdefault(root(a), []).append(a)
        for members in groups.values():
            keep = max(members, key=lambda a: (sharp[alive[a]], -alive[a]))
            for a in members:
                if a != keep:
                    out[alive[a]].update(reason="near_duplicate", duplicate_of=names[alive[keep]],
                                         identity_distance=round(float(d_id[a, keep]), 4),
                                         pixel_distance=round(float(d_px[a, keep]), 4))
    alive = [i for i in range(n) if out[i]["reason"] is None]
    if len(alive) >= 3:
        centre = np.median(emb[alive], axis=0)
        d = np.linalg.norm(emb[alive] - centre, axis=1)
        med = float(np.median(d))
        cut = max(cfg.outlier_floor, med + cfg.outlier_k * 1.4826 * float(np.median(np.abs(d - med))))
        for i, di in zip(alive, d):
            out[i]["centre_distance"] = round(float(di), 4)
            if di > cut:
                out[i]["reason"] = "identity_outlier"
        for o in out:
            o.setdefault("outlier_cut", round(cut, 4))
    return out


def _read_cache(path: Path) -> dict[str, tuple]:
    """Measurements of earlier runs by content hash: a re-run with other thresholds measures only new faces."""
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: (float(s), e, t.astype(np.float32) / 255.0)
                    for k, s, e, t in zip(z["keys"], z["sharpness"], z["embeddings"], z["thumbs"])}
    except (OSError, ValueError, KeyError):
        return {}


def _write_cache(path: Path, cache: dict[str, tuple]) -> None:
    keys = sorted(cache)
    arrays = {"keys": np.asarray(keys), "sharpness": np.asarray([cache[k][0] for k in keys]),
              "embeddings": np.stack([cache[k][1] for k in keys]).astype(np.float32),
              "thumbs": np.stack([np.round(cache[k][2] * 255) for k in keys]).astype(np.uint8)}
    atomic_write(path, lambda f: np.savez(f, **arrays))


def _earlier_rejects(rejected_dir: Path, folder: Path, current: set[str]) -> list[dict]:
    """Entries of a previous filter_report.json whose file is still in _rejected/ (a re-run keeps listing them)."""
    path = rejected_dir / "filter_report.json"
    if not path.is_file():
        return []
    try:
        faces = json.loads(path.read_text()).get("faces", [])
    except ValueError:
        return []
    return [f for f in faces if f.get("moved_to") and f.get("file") not in current
            and (folder / f["moved_to"]).is_file()]


def run_filter(folder: Path, cfg: FilterConfig | None = None, log=print) -> dict:
    cfg = cfg or FilterConfig()
    cfg.check()
    if not folder.is_dir():
        raise FileNotFoundError(f"aligned folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"no aligned faces ({' '.join(IMAGE_EXTENSIONS)}) in {folder}")
    sizes = _face_sizes(folder)
    cache = _read_cache(folder / REJECTED / CACHE)
    models = None
    names, sharp, embs, thumbs, unreadable, fresh = [], [], [], [], [], {}
    for p in tqdm(files, desc="filter", unit="face", disable=None):
        data = p.read_bytes()
        key = hashlib.sha256(data).hexdigest()
        if key not in cache:
            try:
                img = read_photo(io.BytesIO(data))[0]
            except PhotoError as e:
                unreadable.append({"file": p.name, "reason": "unreadable", "detail": str(e)})
                continue
            models = models or FaceModels("dlib")
            cache[key] = (sharpness(img), models.embed_aligned(img), thumb(img))
            fresh[key] = True
        names.append(p.name)
        sharp.append(cache[key][0])
        embs.append(cache[key][1])
        thumbs.append(cache[key][2])
    if fresh:
        _write_cache(folder / REJECTED / CACHE, cache)
    verdicts = decide(names, sizes, np.asarray(sharp), np.asarray(embs), np.asarray(thumbs), cfg) if names else []
    rejected_dir = folder / REJECTED
    earlier = _earlier_rejects(rejected_dir, folder, set(names))
    report = {"folder": str(folder), "config": asdict(cfg), "faces": verdicts + unreadable + earlier}
    for v in verdicts:
        if v["reason"] is not None:
            dest = rejected_dir / v["reason"] / v["file"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(folder / v["file"], dest)  # a rename inside the output tree: nothing is deleted
            v["moved_to"] = dest.relative_to(folder).as_posix()
            log(f"rejected {v['file']}: {v['reason']}")
    counts = {r: sum(v["reason"] == r for v in verdicts) for r in REASONS}
    counts["kept"] = sum(v["reason"] is None for v in verdicts)
    counts["unreadable"] = len(unreadable)
    counts["rejected_earlier"] = len(earlier)
    report["counts"] = counts
    atomic_write_json(report, rejected_dir / "filter_report.json")
    return report

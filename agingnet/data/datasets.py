"""Face datasets (SPEC §3): personal ``{age}_{idx}.ext`` folders, FFHQ-style folders, procedural faces.

Every dataset yields the same item, with ``x ≡ y`` (source = target):

    {"image": Tensor[3, size, size] in [-1, 1], "age": float years (NaN: unknown), "path": str, "index": int,
     "flipped": bool}

Pixels map as ``x = v / 127.5 − 1`` for 8-bit values ``v``. Train mode resizes to ``size`` (bilinear, as the
fork's ``transforms.Resize``) and flips horizontally with probability ``flip_p`` (global torch RNG, which the
DataLoader seeds per worker); test mode never flips. ``without_augmentation()`` returns the same files with
``train=False`` and ``fingerprint()`` a content key (files' paths, sizes, mtimes; or generator parameters).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "parse_age",
    "load_rgb",
    "PersonalFolderDataset",
    "FFHQFolderDataset",
    "SyntheticFaces",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_FILE_AGE = 120
_AGE_PREFIX = re.compile(r"^([^_. ]*)")


def parse_age(filename: str | os.PathLike[str]) -> int:
    """Age in years from a personal file name: the integer before the first ``_``, ``.`` or space.

    ``40_3.png`` → 40, ``40.png`` → 40, ``40 copy.jpg`` → 40. Raises ``ValueError`` naming the file otherwise
    (also for ages above 120, which are typos or years).
    """
    name = Path(filename).name
    prefix = _AGE_PREFIX.match(name).group(1)  # type: ignore[union-attr]
    if not prefix.isascii() or not prefix.isdigit():
        raise ValueError(
            f"cannot parse an age from file name {str(filename)!r}: expected '{{age}}_{{idx}}.ext' "
            f"such as '40_3.png'"
        )
    age = int(prefix)
    if age > MAX_FILE_AGE:
        raise ValueError(f"age {age} parsed from file name {str(filename)!r} is above {MAX_FILE_AGE}")
    return age


#: smallest accepted image side (px); infer/evaluate default to 64 (``min_size``)
MIN_FACE_SIZE = 16


def to_rgb8(im: Image.Image) -> Image.Image:
    """8-bit RGB from any decoded image. 16-bit grayscale (PIL modes ``I;16*``/``I``) is scaled by 255/65535 and
    float (``F``) images by 255 (PIL's own ``convert`` clips them, turning a 16-bit PNG white); 48/64-bit RGB(A)
    PNGs are already reduced to 8 bits per channel by PIL; alpha is dropped."""
    if im.mode.startswith("I") or im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        scale = 255.0 if im.mode == "F" else 255.0 / 65535.0
        grey = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return im.convert("RGB")


def load_rgb(path: str | os.PathLike[str], min_size: int = MIN_FACE_SIZE) -> Image.Image:
    """Decode an image file to 8-bit RGB (:func:`to_rgb8`); an image with a side below ``min_size`` px is
    refused with ``ValueError`` naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            img = to_rgb8(im)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"image file disappeared: {path}") from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    if min(img.size) < min_size:
        raise ValueError(f"image {path} is {img.width}x{img.height} px, below the minimum face size of "
                         f"{min_size} px")
    return img


def _to_tensor(img: Image.Image | np.ndarray) -> Tensor:
    """uint8 HxWx3 → float32 [3,H,W] with x = v/127.5 − 1."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def _check_common(size: int, flip_p: float) -> None:
    if isinstance(size, bool) or int(size) != size or size < 8:
        raise ValueError(f"image size must be an integer >= 8, got {size!r}")
    if not 0.0 <= float(flip_p) <= 1.0:
        raise ValueError(f"flip_p must be in [0, 1], got {flip_p!r}")


class _FaceDataset(Dataset):
    """Shared item assembly, augmentation switch and fingerprint plumbing."""

    size: int
    train: bool
    flip_p: float

    @staticmethod
    def _split_index(index: int | tuple[int, bool]) -> tuple[int, bool | None]:
        """Items are addressed by an int, or by ``(int, flip)`` when the sampler decides the flip (resumable)."""
        if isinstance(index, tuple):
            return int(index[0]), bool(index[1])
        return index, None

    def _item(self, img: Image.Image | np.ndarray, age: float, path: str, index: int, flip: bool | None = None) -> dict:
        if isinstance(img, Image.Image) and img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.BILINEAR)
        x = _to_tensor(img)
        assert x.shape == (3, self.size, self.size), (
            f"{path}: image tensor {tuple(x.shape)} != (3, {self.size}, {self.size})"
        )
        if flip is None:
            flip = self.flip_p > 0 and bool(torch.rand(()) < self.flip_p)
        flipped = bool(self.train and flip)
        if flipped:
            x = x.flip(-1)
        return {"image": x, "age": float(age), "path": path, "index": int(index), "flipped": flipped}

    def without_augmentation(self) -> _FaceDataset:
        """The same samples with ``train=False`` (no flips): e.g. for the personal NN-ID bank."""
        twin = copy.copy(self)
        twin.train = False
        return twin

    def fingerprint(self) -> str:
        raise NotImplementedError


class _FolderDataset(_FaceDataset):
    """Images listed once at construction (sorted); decoding happens at load time."""

    def __init__(self, root: str | os.PathLike[str], size: int, train: bool, flip_p: float, recursive: bool,
                 min_size: int = MIN_FACE_SIZE):
        _check_common(size, flip_p)
        self.min_size = int(min_size)
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise FileNotFoundError(f"dataset folder not found: {self.root}")
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset path is not a folder: {self.root}")
        self.size, self.train, self.flip_p = int(size), bool(train), float(flip_p)
        pattern = self.root.rglob("*") if recursive else self.root.iterdir()
        files = [
            p
            for p in pattern
            if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
        ]
        if not files:
            raise FileNotFoundError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) in dataset folder {self.root}")
        self.paths: list[Path] = sorted(files, key=lambda p: p.relative_to(self.root).as_posix())
        self.ages: list[float] = []

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int | tuple[int, bool]) -> dict:
        index, flip = self._split_index(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images in {self.root}")
        index %= len(self)
        path = self.paths[index]
        return self._item(load_rgb(path, self.min_size), self.ages[index], str(path), index, flip)

    def _hash_files(self, h: hashlib._Hash) -> None:
        h.update(f"{type(self).__name__}|size={self.size}\n".encode())
        for p in self.paths:
            st = p.stat()
            h.update(f"{p.relative_to(self.root).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the class, image size and every file's relative path, byte size and mtime (ns)."""
        h = hashlib.sha256()
        self._hash_files(h)
        return h.hexdigest()

    def __repr__(self) -> str:
        name, root = type(self).__name__, str(self.root)
        return f"{name}(root={root!r}, n={len(self)}, size={self.size}, train={self.train})"


class PersonalFolderDataset(_FolderDataset):
    """One person's aligned faces named ``{age}_{idx}.{ext}`` (top level of ``root``, sorted by name).

    ``age`` comes from the file name (:func:`parse_age`); a name without an age raises at construction.
    """

    def __init__(
        self, root: str | os.PathLike[str], size: int = 256, train: bool = True, flip_p: float = 0.5,
        min_size: int = MIN_FACE_SIZE,
    ):
        super().__init__(root, size, train, flip_p, recursive=False, min_size=min_size)
        self.ages = [float(parse_age(p)) for p in self.paths]
        for p in self.paths:  # one person's few dozen files: a too small one is refused at setup, not mid-run
            with Image.open(p) as im:
                if min(im.size) < self.min_size:
                    raise ValueError(f"image {p} is {im.width}x{im.height} px, below the minimum face size of "
                                     f"{self.min_size} px")


class FFHQFolderDataset(_FolderDataset):
    """FFHQ-style folder of aligned faces (any names, sub-folders included, sorted by relative path).

    ``age`` is looked up in the optional JSON ``ages_file`` ``{name: age}`` (key = path relative to ``root``
    or the bare file name; ``null`` allowed); missing ages are NaN and predicted by DEX in the model.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        size: int = 256,
        train: bool = True,
        flip_p: float = 0.5,
        ages_file: str | os.PathLike[str] | None = None,
        min_size: int = MIN_FACE_SIZE,
    ):
        super().__init__(root, size, train, flip_p, recursive=True, min_size=min_size)
        self.ages_file = Path(ages_file).expanduser() if ages_file is not None else None
        table = self._read_ages(self.ages_file) if self.ages_file is not None else {}
        self.ages = [
            table.get(p.relative_to(self.root).as_posix(), table.get(p.name, math.nan)) for p in self.paths
        ]

    @staticmethod
    def _read_ages(path: Path) -> dict[str, float]:
        if not path.is_file():
            raise FileNotFoundError(f"ages file not found: {path}")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"ages file {path} is not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError(
                f"ages file {path} must hold a JSON object {{filename: age}}, got {type(raw).__name__}"
            )
        table: dict[str, float] = {}
        for key, value in raw.items():
            if value is None:
                table[key] = math.nan
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                table[key] = float(value)
            else:
                raise ValueError(f"ages file {path}: age of {key!r} must be a number, got {value!r}")
        return table

    def _hash_files(self, h: hashlib._Hash) -> None:
        super()._hash_files(h)
        if self.ages_file is not None:
            h.update(b"ages:" + hashlib.sha256(self.ages_file.read_bytes()).digest())


# ----------------------------------------------------------------------------------------------------
# Procedural faces

_SKIN_LIGHT, _SKIN_DARK = np.array([238, 196, 170.0]), np.array([105, 70, 50.0])
_HAIR = np.array(
    [[28, 24, 20], [62, 40, 24], [115, 78, 45], [196, 160, 100], [150, 64, 32]], dtype=np.float64
)
_EYES = np.array(
    [[70, 45, 25], [55, 95, 150], [65, 105, 60], [105, 85, 50], [95, 105, 115]], dtype=np.float64
)
_GREY = np.array([212, 212, 214.0])
_DRAW_VERSION = 1  # bump when the drawing changes: it enters the fingerprint


def _rgb(c: np.ndarray | Sequence[float]) -> tuple[int, int, int]:
    r, g, b = np.clip(np.asarray(c, dtype=np.float64), 0, 255).round().astype(int)
    return int(r), int(g), int(b)


def _age_cues(age: float) -> tuple[float, float, float, float]:
    """(grey, wrinkle, sag, child) ∈ [0,1]: grey = (a−35)/40, wrinkle = (a−28)/45, sag = (a−40)/40,
    child = (18−a)/14, each clipped to [0, 1]."""
    clip = lambda v: float(min(max(v, 0.0), 1.0))  # noqa: E731
    return clip((age - 35) / 40), clip((age - 28) / 45), clip((age - 40) / 40), clip((18 - age) / 14)


class SyntheticFaces(_FaceDataset):
    """Procedural FFHQ-aligned faces with an age label: no downloads, deterministic per index.

    Layout (fractions of ``size``): face oval centred at x=0.5, eyes at y≈0.45 with centres x≈0.38/0.62, nose
    from y≈0.50 to 0.62, mouth at y≈0.72. Identity per index (seeded by ``(seed, index)``): face shape, skin
    tone, eye and hair colour, hair style, background. Age cues (see :func:`_age_cues`): a fraction ``grey``
    of hair strands and brows turn grey, forehead/crow's-feet/nasolabial wrinkles darken with ``wrinkle``,
    the jaw, eyelids and mouth corners drop and the lower face widens with ``sag``; children get rounder
    faces, larger eyes and a smaller nose. Ages are integers uniform in ``[min_age, max_age]``.
    """

    def __init__(
        self,
        n: int = 64,
        size: int = 256,
        seed: int = 0,
        min_age: int = 10,
        max_age: int = 80,
        train: bool = True,
        flip_p: float = 0.5,
    ):
        _check_common(size, flip_p)
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise ValueError(f"SyntheticFaces: n must be a positive integer, got {n!r}")
        if not 0 <= min_age <= max_age <= 100:
            raise ValueError(
                f"SyntheticFaces: need 0 <= min_age <= max_age <= 100, got min_age={min_age} "
                f"max_age={max_age}"
            )
        self.n, self.size, self.seed = int(n), int(size), int(seed)
        self.min_age, self.max_age = int(min_age), int(max_age)
        self.train, self.flip_p = bool(train), float(flip_p)
        self.ages = [float(self._rng(i).integers(self.min_age, self.max_age + 1)) for i in range(self.n)]

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([abs(self.seed), int(self.seed < 0), index])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int | tuple[int, bool]) -> dict:
        index, flip = self._split_index(index)
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for SyntheticFaces(n={self.n})")
        index %= self.n
        return self._item(self.render(index), self.ages[index], f"synthetic://{index}", index, flip)

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the generator parameters and drawing version."""
        key = (
            f"SyntheticFaces|v{_DRAW_VERSION}|n={self.n}|size={self.size}|seed={self.seed}|"
            f"ages={self.min_age}-{self.max_age}"
        )
        return hashlib.sha256(key.encode()).hexdigest()

    def render(self, index: int) -> np.ndarray:
        """Draw face ``index`` as uint8 ``[size, size, 3]`` (train flips are applied later)."""
        rng = self._rng(index)
        age = float(rng.integers(self.min_age, self.max_age + 1))  # first draw: the same as self.ages[index]
        grey, wrinkle, sag, child = _age_cues(age + rng.uniform(-4, 4))
        S = self.size
        P = lambda x, y: (x * S, y * S)  # noqa: E731  (fractions → pixels)

        skin = _SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * rng.beta(1.3, 2.0) + rng.normal(0, 6, 3)
        skin = skin * (1 - 0.06 * sag)  # slightly duller with age
        shade = skin * 0.82
        hair_base = _HAIR[rng.integers(len(_HAIR))] + rng.normal(0, 8, 3)
        eye_col = _EYES[rng.integers(len(_EYES))] + rng.normal(0, 8, 3)
        bg = rng.uniform(70, 200, 3)
        long_hair = bool(rng.random() < 0.45)
        fw = 0.235 * rng.uniform(0.92, 1.08) * (1 + 0.07 * sag - 0.03 * child)  # half face width
        top = 0.17 + rng.uniform(-0.015, 0.015) + 0.02 * child
        bottom = 0.86 + rng.uniform(-0.02, 0.02) + 0.035 * sag - 0.04 * child
        hairline = 0.27 + rng.uniform(-0.03, 0.02) + (0.05 * sag if rng.random() < 0.4 else 0.0)
        eye_dx = 0.12 + rng.uniform(-0.01, 0.01)
        eye_y = 0.45 + rng.uniform(-0.01, 0.01)
        mouth_y = 0.72 + 0.012 * sag - 0.02 * child
        mouth_w = 0.07 * rng.uniform(0.85, 1.15) * (1 - 0.15 * child)

        # background: vertical gradient
        t = np.linspace(0.0, 1.0, S)[:, None, None]
        canvas = np.broadcast_to(bg * (1.08 - 0.2 * t), (S, S, 3))
        img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
        hair_mask = Image.new("L", (S, S), 0)
        d, dm = ImageDraw.Draw(img), ImageDraw.Draw(hair_mask)

        def ellipse(cx: float, cy: float, rx: float, ry: float, colour, is_hair: bool = False) -> None:
            box = [*P(cx - rx, cy - ry), *P(cx + rx, cy + ry)]
            d.ellipse(box, fill=_rgb(colour))
            dm.ellipse(box, fill=255 if is_hair else 0)

        # back hair, shoulders, neck, ears, face
        if long_hair:
            ellipse(0.5, 0.55, fw + 0.07, 0.40, hair_base, True)
        ellipse(0.5, 1.12, 0.42, 0.22, rng.uniform(20, 220, 3))
        d.rectangle([*P(0.5 - 0.6 * fw, 0.70), *P(0.5 + 0.6 * fw, 0.97)], fill=_rgb(shade))
        dm.rectangle([*P(0.5 - 0.6 * fw, 0.70), *P(0.5 + 0.6 * fw, 0.97)], fill=0)
        for sx in (-1, 1):
            ellipse(0.5 + sx * fw, 0.48, 0.03, 0.055 + 0.01 * sag, shade)
        cy, ry = (top + bottom) / 2, (bottom - top) / 2
        ellipse(
            0.5, 0.25 + 0.5 * top, fw + 0.025, 0.25 - 0.5 * top + 0.07, hair_base, True
        )  # hair cap behind
        ellipse(0.5, cy, fw, ry, skin)
        if sag > 0:  # jowls widen the lower face
            for sx in (-1, 1):
                ellipse(
                    0.5 + sx * 0.55 * fw, 0.76 + 0.02 * sag, 0.45 * fw + 0.012 * sag, 0.06 + 0.015 * sag, skin
                )
        # fringe: the cap of the face ellipse above the hairline (PIL angles: clockwise from 3 o'clock)
        s_ = max(-1.0, min(1.0, (hairline - cy) / ry))
        a0, a1 = 180 - math.degrees(math.asin(s_)), 360 + math.degrees(math.asin(s_))
        face_box = [*P(0.5 - fw, top), *P(0.5 + fw, bottom)]
        d.chord(face_box, a0, a1, fill=_rgb(hair_base))
        dm.chord(face_box, a0, a1, fill=255)

        # hair texture: vertical strands, a fraction `grey` of them grey
        arr = np.asarray(img).astype(np.float32)
        m = np.asarray(hair_mask) > 0
        rows, cols = max(1, S // 12), max(1, S // 2)  # strands: ~12 px tall, 2 px wide at 256
        up = lambda a: np.repeat(np.repeat(a, -(-S // rows), axis=0), -(-S // cols), axis=1)[:S, :S]  # noqa: E731
        strands, tone = up(rng.random((rows, cols))), up(rng.random((rows, cols)))
        tex = hair_base[None, None] * (0.8 + 0.4 * tone[..., None])
        g = strands < 0.92 * grey
        tex = np.where(g[..., None], _GREY[None, None] * (0.9 + 0.15 * tone[..., None]), tex)
        arr = np.where(m[..., None], tex, arr)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(img)

        lw = max(1, round(S / 128))
        brow_col = hair_base + (_GREY - hair_base) * grey
        for sx in (-1, 1):
            ex = 0.5 + sx * eye_dx
            # eyebrow
            bw = 0.05
            d.line(
                [P(ex - bw, eye_y - 0.05), P(ex, eye_y - 0.062), P(ex + bw, eye_y - 0.052)],
                fill=_rgb(brow_col),
                width=max(1, round(S * (0.012 - 0.004 * grey))),
                joint="curve",
            )
            # eye: white, iris, pupil, highlight
            erx, ery = 0.045 * (1 + 0.2 * child), 0.021 * (1 + 0.3 * child)
            ellipse(ex, eye_y, erx, ery, (240, 238, 232))
            ellipse(ex, eye_y, 0.018 * (1 + 0.15 * child), 0.018 * (1 + 0.15 * child), eye_col)
            ellipse(ex, eye_y, 0.008, 0.008, (15, 12, 12))
            ellipse(ex + 0.006, eye_y - 0.006, 0.003, 0.003, (250, 250, 250))
            # drooping upper lid: a skin chord covering the top of the eye
            lid = 0.15 + 0.45 * sag
            lid_s = max(-1.0, min(1.0, -1 + 2 * lid))
            eye_box = [*P(ex - erx, eye_y - ery), *P(ex + erx, eye_y + ery)]
            b0, b1 = 180 - math.degrees(math.asin(lid_s)), 360 + math.degrees(math.asin(lid_s))
            d.chord(eye_box, b0, b1, fill=_rgb(skin * 0.95))
            d.arc(eye_box, b0, b1, fill=_rgb(shade * 0.55), width=lw)
        # nose
        tip = 0.615 + 0.015 * sag - 0.03 * child
        d.line([P(0.49, 0.49), P(0.485, tip - 0.01), P(0.5, tip)], fill=_rgb(shade * 0.9), width=lw)
        for sx in (-1, 1):
            ellipse(0.5 + sx * (0.022 - 0.005 * child), tip + 0.004, 0.009, 0.005, shade * 0.55)
        # mouth: lips get thinner and the corners drop with age
        lip = 0.017 * (1 - 0.5 * wrinkle) + 0.004 * child
        lip_col = skin * np.array([0.92, 0.62, 0.62])
        ellipse(0.5, mouth_y - lip * 0.6, mouth_w * 0.9, lip * 0.7, lip_col)
        ellipse(0.5, mouth_y + lip * 0.7, mouth_w * 0.8, lip, lip_col * 1.05)
        droop = 0.018 * sag
        d.line(
            [P(0.5 - mouth_w, mouth_y + droop), P(0.5, mouth_y), P(0.5 + mouth_w, mouth_y + droop)],
            fill=_rgb(lip_col * 0.5),
            width=lw,
            joint="curve",
        )

        # wrinkles and spots: a darkening mask, strength ∝ wrinkle
        if wrinkle > 0:
            wm = Image.new("L", (S, S), 0)
            dw = ImageDraw.Draw(wm)
            ink = int(255 * min(1.0, 0.35 + 0.65 * wrinkle))
            for k in range(1 + round(3 * wrinkle)):  # forehead lines
                y = hairline + 0.03 + 0.018 * k
                if y < eye_y - 0.08:
                    dw.arc(
                        [*P(0.5 - 0.7 * fw, y), *P(0.5 + 0.7 * fw, y + 0.05)], 200, 340, fill=ink, width=lw
                    )
            for sx in (-1, 1):
                ox = 0.5 + sx * (eye_dx + 0.05)
                for k in range(round(1 + 2 * wrinkle)):  # crow's feet
                    ang = math.radians(-25 + 25 * k)
                    dw.line(
                        [P(ox, eye_y), P(ox + sx * 0.035 * math.cos(ang), eye_y + 0.035 * math.sin(ang))],
                        fill=ink,
                        width=lw,
                    )
                ex = 0.5 + sx * eye_dx  # under-eye bags
                dw.arc(
                    [*P(ex - 0.04, eye_y - 0.01), *P(ex + 0.04, eye_y + 0.04 + 0.01 * sag)],
                    20,
                    160,
                    fill=ink,
                    width=lw,
                )
                # nasolabial fold and marionette line
                dw.line(
                    [P(0.5 + sx * 0.045, tip - 0.01), P(0.5 + sx * (mouth_w + 0.02), mouth_y + 0.01)],
                    fill=ink,
                    width=lw,
                )
                if sag > 0:
                    dw.line(
                        [
                            P(0.5 + sx * mouth_w, mouth_y + droop),
                            P(0.5 + sx * (mouth_w + 0.005), mouth_y + 0.03 + 0.05 * sag),
                        ],
                        fill=ink,
                        width=lw,
                    )
            for _ in range(int(8 * max(0.0, (age - 55) / 25))):  # age spots
                x, y, r = (
                    rng.uniform(0.5 - 0.8 * fw, 0.5 + 0.8 * fw),
                    rng.uniform(0.3, 0.8),
                    rng.uniform(0.004, 0.01),
                )
                dw.ellipse([*P(x - r, y - r), *P(x + r, y + r)], fill=ink // 2)
            arr = np.asarray(img).astype(np.float32)
            arr *= 1.0 - (0.45 * wrinkle / 255.0) * np.asarray(wm, dtype=np.float32)[..., None]
        else:
            arr = np.asarray(img).astype(np.float32)
        arr += rng.normal(0.0, 3.0, (S, S, 1)).astype(np.float32)  # skin/sensor grain
        return np.clip(arr, 0, 255).astype(np.uint8)

    def __repr__(self) -> str:
        return (
            f"SyntheticFaces(n={self.n}, size={self.size}, seed={self.seed}, ages=[{self.min_age}, "
            f"{self.max_age}], train={self.train})"
        )

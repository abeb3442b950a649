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
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from agingnet import world
from agingnet.viz import from_uint8

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
        x = from_uint8(np.asarray(img, dtype=np.uint8))
        if not (x.shape == (3, self.size, self.size)):
            raise ValueError(f"{path}: image tensor {tuple(x.shape)} != (3, {self.size}, {self.size})")
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
            try:
                im = Image.open(p)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                raise ValueError(f"cannot read image {p}: {e}") from e
            with im:
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

class SyntheticFaces(_FaceDataset):
    """Procedural FFHQ-aligned faces with an age label from the aging world: no downloads, deterministic.

    Item ``index`` is population identity ``I < 100000`` at an integer age uniform in ``[min_age, max_age]``, both
    drawn from the stream ``(seed, index)``, rendered by :func:`agingnet.world.render` with photo ``(seed, index)``
    (the person's own traits and aging pattern; the photo's mild nuisance).
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

    def _draw(self, index: int) -> tuple[float, int]:
        """Item ``index``'s age in years (the stream's first draw) and world identity (its second)."""
        rng = self._rng(index)
        age = float(rng.integers(self.min_age, self.max_age + 1))
        return age, int(rng.integers(0, world.ACTOR_BASE))

    def age(self, index: int) -> float:
        """The age of item ``index`` in years. Drawn when asked, not listed at construction: the global model's
        200000-item population took 3.5 s to list, in every run."""
        return self._draw(index)[0]

    @property
    def ages(self) -> list[float]:
        """Every item's age, like the folder datasets' ``ages`` (listed on each access)."""
        return [self.age(i) for i in range(self.n)]

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([abs(self.seed), int(self.seed < 0), index])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int | tuple[int, bool]) -> dict:
        index, flip = self._split_index(index)
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for SyntheticFaces(n={self.n})")
        index %= self.n
        image, age, identity = self._face(index)
        item = self._item(image, age, f"synthetic://{index}", index, flip)
        item["world_identity"] = identity  # what the ground-truth term renders at the target age
        return item

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the generator parameters and the world renderer version."""
        key = (
            f"SyntheticFaces|world-v{world.RENDERER_VERSION}|n={self.n}|size={self.size}|seed={self.seed}|"
            f"ages={self.min_age}-{self.max_age}"
        )
        return hashlib.sha256(key.encode()).hexdigest()

    def identity(self, index: int) -> int:
        """The world identity of item ``index`` (a population identity, ``< 100000``)."""
        return self._draw(index)[1]

    def _face(self, index: int) -> tuple[np.ndarray, float, int]:
        """Face ``index`` drawn (uint8 ``[size, size, 3]``), with its age and world identity."""
        age, identity = self._draw(index)
        return world.render(identity, age, size=self.size, photo=(self.seed, index)), age, identity

    def render(self, index: int) -> np.ndarray:
        """Draw face ``index`` as uint8 ``[size, size, 3]`` (train flips are applied later)."""
        return self._face(index)[0]

    def __repr__(self) -> str:
        return (
            f"SyntheticFaces(n={self.n}, size={self.size}, seed={self.seed}, ages=[{self.min_age}, "
            f"{self.max_age}], train={self.train})"
        )

"""Reading the input images of a folder, for :mod:`agingnet.infer` and :mod:`agingnet.evaluate`.

:func:`list_inputs` lists the visible files of a folder and raises ``FileNotFoundError`` when the folder is
missing or empty. :func:`load_face` opens one file as a square RGB face (converting grayscale/palette/alpha
images, centre-cropping or aligning) and raises :class:`SkipImage` with the reason when the file is not an
image, is smaller than ``min_size``, or shows no face; :func:`_label_age` raises it too when the file name
carries no age. :func:`iter_batches` groups the loaded files into batches and records each skipped one with
its reason instead of stopping.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor
from tqdm import tqdm

from agingnet.data.datasets import to_rgb8
from agingnet.viz import pil_to_tensor


class SkipImage(Exception):
    """An input that inference leaves out; the message is the reason listed in the summary."""


def list_inputs(input_dir: str | os.PathLike, what: str = "input_dir") -> list[Path]:
    """Every visible regular file of ``input_dir`` (sorted); non-images are skipped later with a reason.
    ``what``: the key the user typed (``input_dir`` for infer, ``data`` for evaluate), named in errors."""
    d = Path(input_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{what}: no such folder: {d}")
    files = sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{what}: {d} holds no files")
    return files


def output_names(files: Sequence[Path]) -> dict[Path, str]:
    """Output stem per input: the file stem, or ``stem_ext`` where two inputs share a stem."""
    stems = [p.stem for p in files]
    return {p: p.stem if stems.count(p.stem) == 1 else f"{p.stem}_{p.suffix.lstrip('.')}" for p in files}


def center_square(img: Image.Image) -> Image.Image:
    """Central side × side crop, side = min(width, height)."""
    w, h = img.size
    if w == h:
        return img
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s))


Aligner = Callable[[Image.Image], "Image.Image | None"]


def load_face(path: Path, min_size: int = 64,
              aligner: Aligner | None = None) -> tuple[Image.Image, str | None]:
    """(square RGB face, note) for one file, or :class:`SkipImage` with the reason.

    Not decodable → "not an image"; min(w, h) < ``min_size`` → "too small"; no face from ``aligner`` →
    "no face".
    The note records a colour conversion ("converted L to RGB") or a centre crop.
    """
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            img = to_rgb8(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise SkipImage(f"not an image ({type(e).__name__}: {str(e)[:80]})") from None
    w, h = img.size
    if min(w, h) < min_size:
        raise SkipImage(f"too small ({w}x{h} < {min_size} px)")
    notes = [f"converted {mode} to RGB"] if mode != "RGB" else []
    if aligner is not None:
        aligned = aligner(img)
        if aligned is None:
            raise SkipImage("no face found (align=true)")
        img = aligned
    elif w != h:
        img = center_square(img)
        notes.append(f"centre-cropped {w}x{h} to {img.width}x{img.height}")
    return img, "; ".join(notes) or None


def _label_age(p: Path) -> float:
    from agingnet.data.datasets import parse_age

    try:
        return float(parse_age(p.name))
    except ValueError as e:
        raise SkipImage(f"no input age in the file name (input_age=label): {e}") from None


def to_input(img: Image.Image, size: int) -> Tensor:
    """Square RGB image → [3,size,size] in [-1,1] (Lanczos resampling)."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    return pil_to_tensor(img)


def iter_batches(files: Sequence[Path], load: Callable[[Path], Any], batch_size: int, skipped: list[dict],
                 desc: str, progress: bool = True) -> Iterator[list[tuple[Path, Any]]]:
    """Yield ``[(path, load(path)), …]`` batches of ``batch_size`` (the last may be shorter) under one progress
    bar; files whose ``load`` raises :class:`SkipImage` are recorded in ``skipped`` with the reason."""
    pending: list[tuple[Path, Any]] = []
    with tqdm(total=len(files), unit="img", desc=desc, disable=not progress) as bar:
        for p in files:  # decoding and face detection are per file; the networks run per batch
            try:
                pending.append((p, load(p)))
            except SkipImage as e:
                skipped.append({"file": p.name, "reason": str(e)})
                bar.update(1)
                continue
            if len(pending) == batch_size:
                yield pending
                bar.update(len(pending))
                pending = []
        if pending:
            yield pending
            bar.update(len(pending))

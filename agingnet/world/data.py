"""World datasets on disk: an actor's personal folders and an FFHQ-aging-like population folder.

Actor (``write_actor``)::

    DIR/train/{age}_{idx}.png   photos for personalization (ages spread over 18–75 unless given)
    DIR/test/{age}_{idx}.png    held-out photos of the same person
    DIR/world.json              {"kind": "actor", "identity", "seed", "renderer_version", "size", "train", "test"}

Population (``write_population``), the layout ``data=ffhq`` reads (``FFHQFolderDataset`` + ``ages_file``)::

    DIR/train/{n:05d}.png  DIR/train_ages.json   identities drawn from the population (< 100000)
    DIR/test/{n:05d}.png   DIR/test_ages.json    other identities (disjoint from train)
    DIR/world.json         {"kind": "population", "seed", "renderer_version", "size", "identities": {...}}

Both are written into a temporary sibling folder and renamed into place at the end: an interrupted or failed
write leaves no ``DIR`` at all, and an existing non-empty ``DIR`` is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from agingnet.io import atomic_write_json
from agingnet.world.render import ACTOR_BASE, RENDERER_VERSION, check_identity, render

__all__ = ["write_actor", "write_population", "find_world_json", "read_world_json", "ACTOR_AGES"]

ACTOR_AGES = (18, 75)
_SEED_STREAM = 0x57  # keeps the photo-choice stream apart from the renderer's streams


def _check_out(out: str | os.PathLike) -> Path:
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty folder; choose another --out or remove it")
    return out


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished temporary folder onto ``out`` (an empty ``out`` folder is replaced)."""
    if out.is_dir():
        out.rmdir()
    os.replace(tmp, out)


def _staging(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))


def _save_png(img: np.ndarray, path: Path) -> None:
    # zlib level 1: 8 ms a 256 px photo against 36 ms at PIL's default 6, files 5 % larger, the same pixels (a
    # demo's first run writes 544 photos)
    Image.fromarray(img).save(path, format="PNG", compress_level=1)


def _check_ages(ages: Sequence[Any], what: str) -> list[int]:
    out = []
    for a in ages:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)) or not 0 <= int(a) <= 100:
            raise ValueError(f"{what}: ages must be integers in [0, 100], got {a!r}")
        out.append(int(a))
    if not out:
        raise ValueError(f"{what}: need at least one age")
    return out


def write_actor(identity: int, out: str | os.PathLike, seed: int = 0, ages: Sequence[int] | None = None,
                n_train: int = 24, n_test: int = 8, test_ages: Sequence[int] | None = None,
                size: int = 256) -> Path:
    """Write actor ``identity``'s personal set under ``out`` (see the module docstring); returns ``out``.

    ``seed`` chooses only the photos (their ages when not given, and each photo's nuisance), never the person.
    """
    identity = check_identity(identity)
    if identity < ACTOR_BASE:
        raise ValueError(f"identity {identity} belongs to the training population (< {ACTOR_BASE}); "
                         f"actors are identities >= {ACTOR_BASE}")
    for name, v in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    out = _check_out(out)
    rng = np.random.default_rng([_SEED_STREAM, abs(int(seed)), int(seed < 0), identity])
    lo, hi = ACTOR_AGES
    train = _check_ages(ages, "--ages") if ages is not None else sorted(rng.integers(lo, hi + 1, n_train).tolist())
    test = (_check_ages(test_ages, "--test-ages") if test_ages is not None
            else sorted(rng.integers(lo, hi + 1, n_test).tolist()))
    tmp = _staging(out)
    try:
        meta: dict[str, Any] = {"kind": "actor", "identity": identity, "seed": int(seed),
                                "renderer_version": RENDERER_VERSION, "size": int(size)}
        idx = 0
        for split, split_ages in (("train", train), ("test", test)):
            (tmp / split).mkdir()
            table = {}
            for age in split_ages:
                name = f"{age}_{idx}.png"
                _save_png(render(identity, age, size=size, photo=(int(seed), idx)), tmp / split / name)
                table[name] = age
                idx += 1
            meta[split] = table
        atomic_write_json(meta, tmp / "world.json")
        _publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def write_population(n: int, out: str | os.PathLike, seed: int = 0, min_age: int = 10, max_age: int = 80,
                     test_fraction: float = 0.1, size: int = 256) -> Path:
    """Write ``n`` population photos (one random identity < 100000 and age each) in the FFHQ-aging layout."""
    if isinstance(n, bool) or int(n) != n or n < 2:
        raise ValueError(f"--n must be an integer >= 2, got {n!r}")
    if not 0 <= min_age <= max_age <= 100:
        raise ValueError(f"need 0 <= min_age <= max_age <= 100, got {min_age}, {max_age}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    out = _check_out(out)
    rng = np.random.default_rng([_SEED_STREAM, abs(int(seed)), int(seed < 0), 1])
    ids = rng.choice(ACTOR_BASE, size=int(n), replace=False)
    ages = rng.integers(min_age, max_age + 1, int(n))
    n_test = max(1, round(n * test_fraction))
    tmp = _staging(out)
    try:
        meta: dict[str, Any] = {"kind": "population", "seed": int(seed), "renderer_version": RENDERER_VERSION,
                                "size": int(size), "identities": {}}
        for split, sl in (("train", slice(n_test, None)), ("test", slice(0, n_test))):
            (tmp / split).mkdir()
            table = {}
            for k, (ident, age) in enumerate(zip(ids[sl].tolist(), ages[sl].tolist())):
                name = f"{k:05d}.png"
                _save_png(render(ident, age, size=size, photo=(int(seed), ident)), tmp / split / name)
                table[name] = age
                meta["identities"][f"{split}/{name}"] = ident
            atomic_write_json(table, tmp / f"{split}_ages.json")
        atomic_write_json(meta, tmp / "world.json")
        _publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def find_world_json(folder: str | os.PathLike) -> Path | None:
    """``folder/world.json`` or, for ``DIR/test`` and ``DIR/train``, ``DIR/world.json``; None when neither exists."""
    folder = Path(folder).expanduser()
    return next((p for p in (folder / "world.json", folder.parent / "world.json") if p.is_file()), None)


def read_world_json(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``world.json`` of an actor folder (or of its parent, for ``DIR/test``), checked against its images.

    Raises ``FileNotFoundError``/``ValueError`` naming the file when it is missing, unreadable, from another
    renderer version, or lists images the folder does not hold.
    """
    folder = Path(folder).expanduser()
    path = find_world_json(folder)
    if path is None:
        raise FileNotFoundError(f"{folder / 'world.json'}: no such file (not a folder written by "
                                f"'python -m agingnet.world actor')")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(meta, dict) or "renderer_version" not in meta or "identity" not in meta:
        raise ValueError(f"{path}: not a world actor file (needs identity and renderer_version)")
    if meta["renderer_version"] != RENDERER_VERSION:
        raise ValueError(f"{path}: renderer version {meta['renderer_version']!r} does not match this agingnet's "
                         f"{RENDERER_VERSION}; re-render the folder with 'python -m agingnet.world actor "
                         f"--identity {meta['identity']} --seed {meta.get('seed', 0)} --out NEW_DIR'")
    check_identity(meta["identity"])
    root = path.parent
    for split in ("train", "test"):
        for name in meta.get(split, {}):
            if not (root / split / name).is_file():
                raise ValueError(f"{path}: lists {split}/{name}, which {root / split} does not hold")
    return meta

"""``prep split ALIGNED --out DATA``: a seeded train/test split stratified by 5-year age bins.

Bin b = ⌊age / 5⌋. Within each bin (files sorted by name, bins in increasing order, one
``numpy.random.default_rng(seed)`` drawing a permutation per bin) the first n_test go to ``DATA/shot_test``:
n_test = 0 for a bin of one photo, else min(max(round(f·n), 1), n − 1), so every bin with ≥ 2 photos keeps at
least one test photo and at least one training photo. Files are copied (atomically), never moved;
``DATA/split.json`` records the assignment.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agingnet.io import atomic_write, atomic_write_json
from agingnet.prep.ages import AgeError, age_from_name
from agingnet.prep.filtering import IMAGE_EXTENSIONS

BIN_YEARS = 5


def aged_files(folder: Path) -> list[tuple[Path, int]]:
    """Top-level images of ``folder`` with their file-name age; a name without a valid age is an error."""
    if not folder.is_dir():
        raise FileNotFoundError(f"folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not p.name.startswith("."))
    out = []
    for p in files:
        try:
            age = age_from_name(p.name)
        except AgeError as e:
            raise ValueError(f"{p}: {e}") from None
        if age is None:
            raise ValueError(f"{p}: no age in the file name (expected {{age}}_{{idx}}.png)")
        out.append((p, age))
    return out


def assign(ages: list[int], test_fraction: float, seed: int) -> list[bool]:
    """is_test per item (see the module doc)."""
    rng = np.random.default_rng(seed)
    bins: dict[int, list[int]] = {}
    for i, a in enumerate(ages):
        bins.setdefault(a // BIN_YEARS, []).append(i)
    is_test = [False] * len(ages)
    for b in sorted(bins):
        members = bins[b]
        n = len(members)
        n_test = 0 if n < 2 else min(max(round(test_fraction * n), 1), n - 1)
        for j in rng.permutation(n)[:n_test]:
            is_test[members[j]] = True
    return is_test


def run_split(folder: Path, out: Path, test_fraction: float = 0.2, seed: int = 0, log=print) -> dict:
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    items = aged_files(folder)
    if not items:
        raise FileNotFoundError(f"no aligned faces ({' '.join(IMAGE_EXTENSIONS)}) in {folder}")
    for sub in ("shot_train", "shot_test"):
        d = out / sub
        if d.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in d.iterdir()):
            raise FileExistsError(f"{d} already holds images; split into an empty --out folder")
    is_test = assign([a for _, a in items], test_fraction, seed)
    rows = []
    for (p, age), t in zip(items, is_test):
        dest = out / ("shot_test" if t else "shot_train") / p.name
        data = p.read_bytes()
        atomic_write(dest, lambda f, data=data: f.write(data))
        rows.append({"file": p.name, "age": age, "split": "test" if t else "train"})
    summary = {"source": str(folder), "seed": seed, "test_fraction": test_fraction, "bin_years": BIN_YEARS,
               "train": sum(not t for t in is_test), "test": sum(is_test), "files": rows}
    atomic_write_json(summary, out / "split.json")
    log(f"split {len(items)} faces: {summary['train']} train, {summary['test']} test → {out}")
    return summary

"""Atomic file writes: every file agingnet writes goes to a temporary file in the target folder, is flushed and
fsynced, made world-readable (mkstemp creates 0600), then renamed over the target with ``os.replace``. A kill
mid-write leaves the previous file intact and no partial file under the target name (a kill -9 can leave the
temporary file itself: :func:`remove_stale_temporaries` clears them when the next run starts). An ``OSError``
(a full disk) is re-raised with the target file's name."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(binary_file)`` on a temporary file next to ``path`` and rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and not e.filename and e.errno is not None:  # name the file a full disk refused
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write_text(json.dumps(obj, indent=2) + "\n", path)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files that :func:`atomic_write` leaves when the process is killed mid-write
    (a run folder has one writer: called at the start of a run, before anything is written there)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.glob(".*.tmp") if p.is_file() or p.is_symlink()]
    for p in stale:
        p.unlink()
    return stale


def describe_load_error(e: BaseException) -> str:
    """One line for a failed ``torch.load(..., weights_only=True)``. A file refused because it pickles objects
    other than tensors and plain containers is named as such, *without* PyTorch's advice to re-run with
    ``weights_only=False`` (that is exactly how a poisoned file would run its code)."""
    msg = str(e)
    if "weights_only" in msg or "Unsupported global" in msg or isinstance(e, __import__("pickle").UnpicklingError):
        hit = re.search(r"GLOBAL ([\w.]+)", msg)
        what = f" ({hit.group(1)})" if hit else ""
        return (f"it holds objects other than tensors and plain containers{what} and is refused "
                f"(agingnet only reads checkpoints with torch.load(weights_only=True))")
    first = next((ln.strip() for ln in msg.splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {first}" if first else type(e).__name__

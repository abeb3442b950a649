"""The world networks shipped with agingnet (package data), in the published file layouts.

``dex.pth`` (DEX, ``{"state_dict": …}``) and ``arcface.pth`` (IR-SE state dict) are produced by
``python -m agingnet.world pretrain``; ``manifest.json`` records each file's sha256, the command and git commit
that produced it and the numbers measured on held-out identities. They load through the real loaders
(:func:`agingnet.pretrained.load_dex`, :func:`agingnet.pretrained.load_arcface`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WEIGHTS_DIR = Path(__file__).resolve().parent
FILES = {"dex": "dex.pth", "arcface": "arcface.pth"}
REBUILD = "python -m agingnet.world pretrain"
GLOBAL_MODEL = "sam.pt"  # the world's global aging model in SAM layout: planned, not built yet (issue 10)


def weight_path(name: str) -> Path:
    """Path of world network ``name`` (``dex`` | ``arcface``); ``FileNotFoundError`` naming the rebuild command."""
    if name == "sam" and not (WEIGHTS_DIR / GLOBAL_MODEL).is_file():
        raise FileNotFoundError(f"{WEIGHTS_DIR / GLOBAL_MODEL}: the world's global aging model is not shipped with "
                                f"this agingnet yet ('{REBUILD}' trains only {' and '.join(FILES)}); pass a "
                                f"checkpoint as baseline=<file> instead")
    if name not in FILES and name != "sam":
        raise ValueError(f"unknown world network {name!r}; choose one of {', '.join(FILES)}")
    path = WEIGHTS_DIR / FILES.get(name, GLOBAL_MODEL)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing world weights; rebuild them with '{REBUILD}'")
    return path


def manifest() -> dict[str, Any]:
    path = WEIGHTS_DIR / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing world weights manifest; rebuild it with '{REBUILD}'")
    return json.loads(path.read_text())


def load_world_dex():
    """The shipped world DEX (eval mode), through the real DEX loader."""
    from agingnet.pretrained import load_dex

    return load_dex(weight_path("dex"))


def load_world_arcface():
    """The shipped world identity network (eval mode), through the real IR-SE loader."""
    from agingnet.pretrained import load_arcface

    return load_arcface(weight_path("arcface"))

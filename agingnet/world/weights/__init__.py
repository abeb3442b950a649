"""The world networks shipped with agingnet (package data), in the published file layouts.

``dex.pth`` (DEX, ``{"state_dict": …}``), ``arcface.pth`` (IR-SE state dict) and ``sam.pt`` (the global aging
model in SAM's layout, float16) are produced by ``python -m agingnet.world pretrain``; ``manifest.json`` records
each file's sha256, the command and git commit that produced it and the numbers measured on held-out identities.
They load through the real loaders (:func:`agingnet.pretrained.load_dex`, :func:`agingnet.pretrained.load_arcface`,
:func:`agingnet.pretrained.load_aging_model`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WEIGHTS_DIR = Path(__file__).resolve().parent
FILES = {"dex": "dex.pth", "arcface": "arcface.pth", "sam": "sam.pt"}
REBUILD = "python -m agingnet.world pretrain"


def weight_path(name: str) -> Path:
    """Path of world network ``name`` (``dex`` | ``arcface`` | ``sam``); ``FileNotFoundError`` naming the rebuild
    command."""
    if name not in FILES:
        raise ValueError(f"unknown world network {name!r}; choose one of {', '.join(FILES)}")
    path = WEIGHTS_DIR / FILES[name]
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

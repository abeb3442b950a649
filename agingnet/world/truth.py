"""Ground truth of the aging world for evaluation: which folder is a world actor's, and what that actor truly
looks like at a target age (the canonical portrait of :func:`agingnet.world.render`, no photo nuisance)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from agingnet.viz import from_uint8
from agingnet.world.data import find_world_json, read_world_json
from agingnet.world.render import render


def world_actor(data_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The checked ``world.json`` of a world actor's folder (``DIR`` or ``DIR/test``); None for other folders
    (no ``world.json``, or a population's)."""
    path = find_world_json(data_dir)
    if path is None:
        return None
    try:
        kind = json.loads(path.read_text()).get("kind", "actor")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{path}: not a valid world.json: {e}") from None
    if kind != "actor":
        return None
    return read_world_json(data_dir)


def truth_images(identity: int, ages: list[int], size: int, device: torch.device) -> Tensor:
    """[A,3,S,S] in [-1,1]: the canonical portrait (no photo nuisance) of ``identity`` at each age."""
    n = len(ages)
    return batch_truth(torch.full((n,), int(identity)), torch.zeros(n, dtype=torch.bool),
                       torch.tensor(ages, dtype=torch.float32), size).to(device)


def batch_truth(identities: Tensor, flipped: Tensor, ages: Tensor, size: int) -> Tensor:
    """[B,3,S,S] in [-1,1]: person ``identities[b]`` at ``ages[b]`` years (canonical portrait), mirrored where the
    batch's image was flipped. One PIL drawing per sample: the renderer draws images one by one (no batch form)."""
    if not (identities.ndim == 1 and flipped.shape == identities.shape and ages.shape == identities.shape):
        raise ValueError(f"batch_truth: identities, flipped and ages must all be [B], got {tuple(identities.shape)}, "
                         f"{tuple(flipped.shape)}, {tuple(ages.shape)}")
    imgs = np.stack([render(int(i), float(a), size=size)
                     for i, a in zip(identities.tolist(), ages.detach().float().clamp(0, 100).tolist())])
    out = from_uint8(imgs)
    return torch.where(flipped.bool().view(-1, 1, 1, 1), out.flip(-1), out).to(ages.device)


__all__ = ["batch_truth", "truth_images", "world_actor"]

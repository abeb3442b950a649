"""Ground truth of the aging world for evaluation: which folder is a world actor's, what that actor truly looks
like at a target age (the canonical portrait of :func:`agingnet.world.render`, no photo nuisance), and the same
face photographed like one of the actor's photos (its background, light and shift: what a perfect aging model
would output for that photo)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
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


BLUR_GRID = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0)  # px; 0 = the truth itself


def blur_stack(truth: Tensor, grid: Sequence[float] = BLUR_GRID) -> Tensor:
    """[G,N,3,S,S]: ``truth`` [N,3,S,S] blurred by a Gaussian of each σ of ``grid`` (pixels; 0 = unchanged).
    Kornia's blur (kernel 2⌈3σ⌉+1, replicated border). Computed once for a fixed truth, then matched against
    every batch of outputs by :func:`blur_fit`."""
    from kornia.filters import gaussian_blur2d

    if not (truth.ndim == 4 and truth.shape[1] == 3):
        raise ValueError(f"blur_stack: truth must be [N,3,S,S], got {tuple(truth.shape)}")
    if not grid or any(float(s) < 0 for s in grid):
        raise ValueError(f"blur_stack: grid must be non-empty sigmas >= 0, got {list(grid)}")
    out = []
    for s in map(float, grid):
        k = 2 * int(np.ceil(3 * s)) + 1
        out.append(truth if s == 0 else gaussian_blur2d(truth, (k, k), (s, s), border_type="replicate"))
    return torch.stack(out)


def blur_fit(y: Tensor, stack: Tensor, grid: Sequence[float] = BLUR_GRID) -> Tensor:
    """[N] the σ of ``grid`` whose blur of the truth (``stack`` = :func:`blur_stack` of it, [G,N,3,S,S] or
    [G,1,3,S,S] for one truth for all) is closest to the output ``y`` [N,3,S,S]: argmin_σ mean_pixels
    (y_n − G_σ * T_n)². How much detail a model reproduces: a line of width w survives G_σ with about
    w / (σ √(2π)) of its contrast, so wrinkles drawn 2–4 px wide need a small σ."""
    if not (y.ndim == 4 and y.shape[1] == 3 and stack.ndim == 5 and stack.shape[0] == len(grid)
            and stack.shape[2:] == y.shape[1:] and stack.shape[1] in (1, y.shape[0])):
        raise ValueError(f"blur_fit: y must be [N,3,S,S] and the blurred truths [G,N,3,S,S] or [G,1,3,S,S] with "
                         f"G = {len(grid)} sigmas, got {tuple(y.shape)} and {tuple(stack.shape)}")
    err = (y.unsqueeze(0) - stack).pow(2).mean(dim=(2, 3, 4))  # [G,N]
    return torch.tensor([float(s) for s in grid], device=y.device)[err.argmin(0)]


def photo_index(actor: dict[str, Any], path: str | os.PathLike) -> int:
    """The photo index ``idx`` of an actor's image ``{age}_{idx}.png`` (its nuisance stream is ``(seed, idx)``),
    for a file the actor's ``world.json`` lists; ValueError naming the file otherwise."""
    name = Path(path).name
    if not any(name in (actor.get(split) or {}) for split in ("train", "test")):
        raise ValueError(f"{path}: not one of world actor {actor['identity']}'s photos (its world.json lists "
                         f"train/ and test/ files only)")
    try:
        return int(Path(name).stem.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        raise ValueError(f"{path}: an actor's photo is named <age>_<index>.png") from None


def photo_truth(actor: dict[str, Any], paths: Sequence[str | os.PathLike], ages: Sequence[int], size: int) -> Tensor:
    """[A,B,3,S,S] in [-1,1]: actor ``actor["identity"]`` at each target age ``ages[a]``, photographed like
    ``paths[b]`` (the photo's own nuisance, :func:`photo_index`)."""
    ident, seed = int(actor["identity"]), int(actor.get("seed", 0))
    idx = [photo_index(actor, p) for p in paths]
    imgs = np.stack([np.stack([render(ident, float(a), size=size, photo=(seed, i)) for i in idx]) for a in ages])
    return from_uint8(imgs)


__all__ = ["BLUR_GRID", "batch_truth", "blur_fit", "blur_stack", "photo_index", "photo_truth", "truth_images",
           "world_actor"]

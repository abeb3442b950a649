"""TensorBoard image grids of training and validation (SPEC §8): input | output | cycle-recovered.

The module leaves its last images on ``pl_module._last_images`` (training) and ``pl_module._last_val_images``
(first validation batch): "input", "output", optional "cycle" [B,3,H,W] in [-1,1], "input_age",
"target_age" and optional "output_age" [B] in years. Every ``every_n_steps`` global steps and after each
validation (not the sanity check) the first ``max_images`` rows go to every TensorBoard logger (``add_image``,
tag ``train/images`` or ``val/images``, HWC uint8, at the trainer's global step) and to
``<dirpath or trainer.default_root_dir/images>/<split>_step<NNNNNNN>.png``, where the step is the absolute
step (base checkpoint's + this run's). Without a logger only the PNG is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from torch import Tensor

from agingnet.viz import labelled_grid, save_image


def _years(v: Tensor | None, n: int) -> list[float | None]:
    return [None] * n if v is None else [float(a) for a in v.detach().float().cpu().reshape(-1)[:n]]


def grid_from_images(images: Mapping[str, Tensor], max_images: int = 4,
                     tile: int | None = None) -> Image.Image:
    """Labelled grid of ``images`` (the module's dict): columns input, output and, when present, cycle.

    Labels: input "in 34y", output "to 40y pred 39.2" (pred only with "output_age"), cycle "cycle to 34y".
    """
    for key in ("input", "output"):
        if key not in images:
            raise KeyError(f"image dict lacks {key!r} (has {sorted(images)})")
    n = min(int(images["input"].shape[0]), int(max_images))
    a_in, t = _years(images.get("input_age"), n), _years(images.get("target_age"), n)
    pred = _years(images.get("output_age"), n)

    def fmt(v: float | None, spec: str = ".0f") -> str:
        return "?" if v is None else format(v, spec)

    cols = [(images["input"][:n], [f"in {fmt(a)}y" for a in a_in]),
            (images["output"][:n], [f"to {fmt(b)}y" + ("" if p is None else f" pred {p:.1f}")
                                    for b, p in zip(t, pred)])]
    if images.get("cycle") is not None:
        cols.append((images["cycle"][:n], [f"cycle to {fmt(a)}y" for a in a_in]))
    return labelled_grid(cols, tile=tile)


class ImageLogger(Callback):
    """Log labelled grids every ``every_n_steps`` training steps and after each validation.

    ``dirpath``: folder of the PNG copies (default ``<trainer.default_root_dir>/images``); ``tile``: tile size
    in pixels (default: the image size).
    """

    def __init__(self, every_n_steps: int = 500, max_images: int = 4, dirpath: str | None = None,
                 log_val: bool = True, tile: int | None = None):
        super().__init__()
        if every_n_steps is None or int(every_n_steps) < 1:
            raise ValueError(f"ImageLogger: every_n_steps must be >= 1, got {every_n_steps}")
        if int(max_images) < 1:
            raise ValueError(f"ImageLogger: max_images must be >= 1, got {max_images}")
        self.every_n_steps, self.max_images = int(every_n_steps), int(max_images)
        self.dirpath, self.log_val, self.tile = dirpath, bool(log_val), tile
        self._last_train_step = -1
        self.written: list[Path] = []

    def _folder(self, trainer: Any) -> Path:
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "images"

    def log_grid(self, trainer: Any, pl_module: Any, images: Mapping[str, Tensor], split: str) -> Path | None:
        """Write one grid to TensorBoard (every TensorBoardLogger) and as PNG; returns the PNG path."""
        if not images or not trainer.is_global_zero:
            return None
        grid = grid_from_images(images, self.max_images, self.tile)
        step = int(getattr(pl_module, "abs_step", trainer.global_step))
        for lg in trainer.loggers:
            if isinstance(lg, TensorBoardLogger):
                lg.experiment.add_image(f"{split}/images", np.asarray(grid), global_step=trainer.global_step,
                                        dataformats="HWC")
        path = save_image(grid, self._folder(trainer) / f"{split}_step{step:07d}.png")
        self.written.append(path)
        return path

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = int(trainer.global_step)
        if step == self._last_train_step or step % self.every_n_steps != 0 or step == 0:
            return
        self._last_train_step = step
        self.log_grid(trainer, pl_module, getattr(pl_module, "_last_images", None) or {}, "train")

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self.log_val or trainer.sanity_checking:
            return
        self.log_grid(trainer, pl_module, getattr(pl_module, "_last_val_images", None) or {}, "val")


__all__ = ["ImageLogger", "grid_from_images"]

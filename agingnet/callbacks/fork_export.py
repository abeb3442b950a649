"""Checkpoints in the SAM/fork layout (SPEC §8, §10), readable by ``load_aging_model`` and SAM's own scripts.

Files under ``dirpath`` (all written atomically: temp file in the same folder, fsync, ``os.replace``):

- ``best_model.pt``: raw weights at the best (lowest ``monitor``) validation; the ``ema`` entry is included
  when an :class:`EMACallback` runs (as the fork did).
- ``phase3_best_ema.pt``: at the same validation, the EMA weights as the primary ``state_dict`` (fixes the fork,
  whose "EMA" file held raw weights) with the ``ema`` entry kept. Only with an :class:`EMACallback`.
- ``phase3_last.pt``: raw weights (+ ``ema``) at the end of fit.
- ``iteration_<abs step>.pt``: every ``every_n_steps`` absolute steps (``abs_step % every_n_steps == 0``).

``global_step`` in every file is the fork's absolute step (base step + steps of this run); ``opts`` holds the
run's key settings under the fork's flag names. ``latest_link`` (e.g. ``outputs/_latest_phase3``) is pointed at
the run folder (``dirpath``'s parent) at fit start, atomically (temporary link + ``os.replace``). The best score
is part of ``state_dict`` so a resumed run only replaces ``best_model.pt`` on a real improvement. Weights that are
diverged (:func:`diverged`: non-finite values, or the NaN guard skipped the last step) are never exported as best.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from agingnet.callbacks.ema import EMACallback, find_ema
from agingnet.pretrained import export_checkpoint

log = logging.getLogger(__name__)

BEST, BEST_EMA, LAST = "best_model.pt", "phase3_best_ema.pt", "phase3_last.pt"


def atomic_symlink(target: str | os.PathLike, link: str | os.PathLike) -> Path:
    """Make ``link`` → ``target`` atomically: create a uniquely named temporary link next to it, then
    ``os.replace`` (an existing link is swapped in one step; a real directory at ``link`` is refused)."""
    link = Path(link)
    if link.exists() and not link.is_symlink():
        raise FileExistsError(f"latest_link: {link} exists and is not a symlink; refusing to replace it")
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.parent / f".{link.name}.{os.getpid()}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.abspath(target), tmp)
    os.replace(tmp, link)
    return link


def _plain(v: Any) -> Any:
    """Config values as plain Python (``weights_only`` loading refuses OmegaConf objects)."""
    if isinstance(v, (DictConfig, ListConfig)):
        return OmegaConf.to_container(v, resolve=True)
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v if v is None or isinstance(v, (bool, int, float, str, torch.Tensor)) else str(v)


def run_opts(trainer: Any, pl_module: Any, ema: EMACallback | None, exp_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's key settings under the fork's option names (plus agingnet's stage and loss config)."""
    hp = getattr(pl_module, "hparams", {}) or {}
    opt = hp.get("optimizer") or {}
    sampler = getattr(pl_module, "sampler", None)
    stage = getattr(pl_module, "stage", hp.get("stage"))
    return _plain({
        "exp_dir": str(exp_dir), "stage": stage, "train_decoder": stage in ("s2", "p3", "world"),
        "train_encoder": stage in ("s1", "world"), "learning_rate": opt.get("lr") if isinstance(opt, Mapping) else None,
        "max_steps": getattr(trainer, "max_steps", None), "cycle_lambda": hp.get("cycle_weight"),
        "resume_checkpoint": hp.get("init_from"), "input_age": hp.get("input_age"),
        "target_age_fixed": getattr(sampler, "fixed_age", None), "target_age_jitter": getattr(sampler, "jitter", 0),
        "ema": ema is not None, "ema_scope": ema.scope if ema else None, "ema_decay": ema.decay if ema else None,
        "eval_with_ema": ema.eval_with_ema if ema else False, "loss": hp.get("loss"),
    })


def diverged(pl_module: Any, ema: EMACallback | None = None) -> str | None:
    """Why the module's current weights must not become "best", or None: a non-finite parameter or EMA shadow
    value, or a last training step skipped by the NaN guard (the weights then give a non-finite loss or
    gradient)."""
    if int(getattr(pl_module, "consecutive_skips", 0) or 0) > 0:
        return f"the last {pl_module.consecutive_skips} step(s) were skipped with a non-finite loss or gradient"
    tensors = list(pl_module.net.parameters()) if hasattr(pl_module, "net") else []
    if ema is not None and ema.shadow:
        tensors += [t for sd in ema.shadow.values() if isinstance(sd, Mapping) for t in sd.values()
                    if torch.is_tensor(t) and t.is_floating_point()]
    if any(not bool(torch.isfinite(t).all()) for t in tensors):
        return "non-finite weights"
    return None


class ForkExportCallback(Callback):
    """See the module docstring."""

    def __init__(self, dirpath: str, every_n_steps: int | None = 5000, monitor: str = "val/total",
                 latest_link: str | None = None, save_optimizer: bool = True):
        super().__init__()
        if every_n_steps is not None and int(every_n_steps) < 1:
            raise ValueError(f"ForkExportCallback: every_n_steps must be ≥ 1 or null, got {every_n_steps}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self.monitor, self.latest_link, self.save_optimizer = monitor, latest_link, bool(save_optimizer)
        self.best: float | None = None
        self.best_step: int | None = None
        self.written: list[str] = []
        self._last_periodic: int | None = None
        self._rank0 = True

    # ---------------------------------------------------------------- writing
    def export(self, trainer: Any, pl_module: Any, name: str, ema_as_primary: bool = False) -> Path | None:
        """Write ``dirpath/name`` from the module's current raw weights (and the EMA shadow when present)."""
        if not self._rank0:
            return None
        ema = find_ema(trainer)
        if ema is not None:
            ema.restore(pl_module)  # never export swapped-in weights as raw ones
        shadow = ema.shadow_state() if ema is not None and ema.shadow else None
        optim = None
        if self.save_optimizer and getattr(trainer, "optimizers", None):
            sd = trainer.optimizers[0].state_dict()
            optim = {"state": sd["state"], "param_groups": _plain(sd["param_groups"])}
        path = export_checkpoint(pl_module.net, self.dirpath / name, ema=shadow, ema_as_primary=ema_as_primary,
                                 ema_decay=ema.decay if ema else None, global_step=int(pl_module.abs_step),
                                 opts=run_opts(trainer, pl_module, ema, self.dirpath.parent), optimizer=optim)
        self.written.append(name)
        log.info("wrote %s (step %d)", path, pl_module.abs_step)
        return path

    # ---------------------------------------------------------------- hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._rank0 = bool(getattr(trainer, "is_global_zero", True))

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.latest_link and self._rank0:
            atomic_symlink(self.dirpath.parent, self.latest_link)
        self._last_periodic = int(pl_module.abs_step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = int(pl_module.abs_step)
        if self.every_n_steps and step != self._last_periodic and step % self.every_n_steps == 0:
            self._last_periodic = step
            self.export(trainer, pl_module, f"iteration_{step}.pt")

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if getattr(trainer, "sanity_checking", False):
            return
        v = trainer.callback_metrics.get(self.monitor)
        if v is None:
            return
        v = float(v.detach().cpu()) if torch.is_tensor(v) else float(v)
        if not math.isfinite(v) or (self.best is not None and v >= self.best):
            return
        why = diverged(pl_module, find_ema(trainer))
        if why:
            log.warning("step %d: %s = %g is not exported as best: %s", pl_module.abs_step, self.monitor, v, why)
            return
        self.best, self.best_step = v, int(pl_module.abs_step)
        self.export(trainer, pl_module, BEST)
        if find_ema(trainer) is not None:
            self.export(trainer, pl_module, BEST_EMA, ema_as_primary=True)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.export(trainer, pl_module, LAST)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.best_step = state_dict.get("best"), state_dict.get("best_step")

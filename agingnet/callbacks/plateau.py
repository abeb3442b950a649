"""Phase-3 plateau breadcrumbs (SPEC §8): ``PHASE3: plateau step=N best_step=M id_min_step=K``.

With s the current absolute step, b the step of the best (lowest ``monitor``) validation so far and m the last
step at which the training identity loss ``id_key`` reached a new strict minimum, the run is on a plateau when

    b and m exist,  s − b ≥ best_patience  and  s − m ≥ id_patience          (seed: 1200 and 800)

The rule is evaluated after every training step and logged as ``train/plateau`` (0/1); while it holds, one line
per validation interval is written to the run log (periodic messages, as the fork). State persists in the
callback's ``state_dict`` so a resumed run keeps counting from the same best and minimum.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from agingnet.callbacks.run_log import find_run_log, format_plateau_line


def plateau_reached(step: int, best_step: int | None, id_min_step: int | None, best_patience: int,
                    id_patience: int) -> bool:
    """``step − best_step ≥ best_patience`` and ``step − id_min_step ≥ id_patience``; False while either
    reference step is unknown."""
    if best_step is None or id_min_step is None:
        return False
    return step - best_step >= best_patience and step - id_min_step >= id_patience


class PlateauCallback(Callback):
    """See the module docstring."""

    def __init__(self, best_patience: int = 1200, id_patience: int = 800, monitor: str = "val/total",
                 id_key: str = "train/real/id"):
        super().__init__()
        if best_patience < 0 or id_patience < 0:
            raise ValueError(f"PlateauCallback: patiences must be ≥ 0, got best_patience={best_patience}, "
                             f"id_patience={id_patience}")
        self.best_patience, self.id_patience = int(best_patience), int(id_patience)
        self.monitor, self.id_key = monitor, id_key
        self.best: float | None = None
        self.best_step: int | None = None
        self.id_min: float | None = None
        self.id_min_step: int | None = None
        self.count = 0
        self._written_since_val = False

    def _step(self, trainer: Any, pl_module: Any) -> int:
        return int(getattr(pl_module, "abs_step", trainer.global_step))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self._step(trainer, pl_module)
        v = trainer.callback_metrics.get(self.id_key)
        if v is not None:
            v = float(v.detach().cpu()) if torch.is_tensor(v) else float(v)
            if math.isfinite(v) and (self.id_min is None or v < self.id_min):
                self.id_min, self.id_min_step = v, step
        hit = plateau_reached(step, self.best_step, self.id_min_step, self.best_patience, self.id_patience)
        pl_module.log("train/plateau", float(hit), on_step=True, on_epoch=False)
        if hit and not self._written_since_val:
            run_log = find_run_log(trainer)
            if run_log is not None:
                run_log.write_line(format_plateau_line(step, self.best_step, self.id_min_step))
            self._written_since_val = True
            self.count += 1

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if getattr(trainer, "sanity_checking", False):
            return
        v = trainer.callback_metrics.get(self.monitor)
        if v is not None:
            v = float(v.detach().cpu()) if torch.is_tensor(v) else float(v)
            if math.isfinite(v) and (self.best is None or v < self.best):
                self.best, self.best_step = v, self._step(trainer, pl_module)
        self._written_since_val = False

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("best", "best_step", "id_min", "id_min_step", "count")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for k in ("best", "best_step", "id_min", "id_min_step", "count"):
            if k in state_dict:
                setattr(self, k, state_dict[k])

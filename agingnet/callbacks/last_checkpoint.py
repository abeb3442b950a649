"""``checkpoints/last.ckpt``: the Lightning checkpoint that ``resume_from=`` continues exactly.

Written at the end of every validation — after the run log, the plateau state and the best exports of that
validation, so it records the right best and a resume neither repeats nor loses a validation — and, with
``every_n_train_steps``, also every that many steps *between* validations. Lightning's ``ModelCheckpoint`` alone
cannot do both: ``every_n_train_steps`` saves at the end of the training batch, i.e. *before* that step's
validation (a resume from it never re-runs the validation), and it refuses to combine ``every_n_train_steps``
with a save at validation end. This subclass skips the batch-end save on validation steps and saves at
validation end instead.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    def __init__(self, dirpath: str, filename: str = "last", every_n_train_steps: int | None = None):
        super().__init__(dirpath=dirpath, filename=filename, monitor=None, save_top_k=1,
                         every_n_train_steps=every_n_train_steps, save_last=False, enable_version_counter=False,
                         save_on_train_epoch_end=False)

    @staticmethod
    def _validates_after(trainer: Any, batch_idx: int) -> bool:
        every = getattr(trainer, "val_check_batch", None)
        return bool(getattr(trainer, "enable_validation", False)) and isinstance(every, int) and every > 0 \
            and (batch_idx + 1) % every == 0

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._validates_after(trainer, batch_idx):
            return  # saved at the end of this step's validation instead
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or self._last_global_step_saved == trainer.global_step:
            return
        self._save_none_monitor_checkpoint(trainer, self._monitor_candidates(trainer))

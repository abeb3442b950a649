"""Stop a run cleanly after a number of steps of this run, with the schedule still planned for ``max_steps``.

Lightning's ``max_steps`` also sets the LR schedule's length; this callback ends the run earlier without changing
it (a time-boxed job that resumes later with ``resume_from``, or a test of exact resume).
"""

from __future__ import annotations

import lightning as L


class StopAtStep(L.Callback):
    def __init__(self, step: int):
        if step < 1:
            raise ValueError(f"StopAtStep: step must be >= 1, got {step}")
        self.step = int(step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True

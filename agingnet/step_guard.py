"""The NaN guard of :class:`agingnet.module.AgingModule`: a step whose loss or gradient is not finite is skipped
before the optimizer, the LR schedule or the EMA see it, and a run that keeps diverging stops.

A mixin of the LightningModule's optimizer hooks (Lightning calls them by name). It reads from the module
``hparams.nan_guard``, ``hparams.max_consecutive_skips``, ``abs_step`` and the flag ``_skip_pending`` that
``training_step`` sets on a non-finite loss, and keeps the counters ``nan_skips``, ``consecutive_skips`` and
``last_step_skipped`` (the EMA callback reads the last).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("agingnet.module")  # the messages users know, under the module's logger as before


class RunDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient (``max_consecutive_skips``)."""


class _SkipStep(Exception):
    """Raised inside ``optimizer.step``'s closure to abort a step before the optimizer touches its state."""


class NanGuard:
    """Optimizer hooks of the NaN guard (see the module docstring)."""

    def on_before_optimizer_step(self, optimizer) -> None:
        """NaN guard: a non-finite loss (flagged by ``training_step``) or gradient norm skips the step.

        Lightning calls this inside ``optimizer.step(closure)``, after the closure and before the update; raising
        :class:`_SkipStep` here leaves the optimizer untouched: torch/pytorch-optimizer optimizers count their
        step (``group['step']``, ``state['step']``) only after the closure returns, and Lightning has no switch for
        this. :meth:`optimizer_step` catches it; :meth:`lr_scheduler_step` then leaves the LR schedule alone and the
        EMA callback skips its update (``last_step_skipped``). Under 16-mixed the GradScaler skips non-finite
        steps itself, so the guard only counts them there."""
        self.last_step_skipped = False
        if not self.hparams.nan_guard:
            return
        bad = self._skip_pending
        self._skip_pending = False
        if not bad:
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            bad = bool(grads) and not bool(torch.isfinite(torch.stack([g.norm() for g in grads]).sum()))
        if not bad:
            self.consecutive_skips = 0
            return
        optimizer.zero_grad(set_to_none=True)
        self.nan_skips += 1
        self.consecutive_skips += 1
        self.last_step_skipped = True
        self.log("train/nan_skips", float(self.nan_skips))
        log.warning("non-finite loss or gradient at step %d: step skipped (%d so far, %d in a row)",
                    self.abs_step, self.nan_skips, self.consecutive_skips)
        limit = int(self.hparams.get("max_consecutive_skips") or 0)
        if limit and self.consecutive_skips >= limit:
            raise RunDiverged(f"training diverged: {self.consecutive_skips} consecutive steps with a non-finite loss "
                              f"or gradient (max_consecutive_skips={limit}) at step {self.abs_step}, "
                              f"{self.nan_skips} skipped in all; no further checkpoint or best model is written "
                              f"(lower lr=…)")
        if not isinstance(getattr(self.trainer.precision_plugin, "scaler", None), torch.amp.GradScaler):
            raise _SkipStep

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        try:
            optimizer.step(closure=optimizer_closure)
        except _SkipStep:
            pass

    def lr_scheduler_step(self, scheduler, metric) -> None:
        if self.last_step_skipped:  # a skipped step leaves the schedule where it was
            return
        if metric is None:
            scheduler.step()
        else:
            scheduler.step(metric)


__all__ = ["NanGuard", "RunDiverged"]

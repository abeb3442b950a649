"""Keep the contrastive term's impostor index in step with its bank file (SPEC §5).

Before each training batch: ``os.stat`` the bank file of every loaded :class:`ContrastiveIDLoss`; when its
(mtime, size) changed since the last read, or every ``every_n_steps`` global steps, call ``term.reload()``
(re-read the bank and rebuild the index). Terms that have not loaded their bank yet are left alone (they read
the current file on first use). A bank file that vanished mid-run keeps the loaded bank, with one warning.
"""

from __future__ import annotations

import warnings
from typing import Any

from lightning.pytorch.callbacks import Callback

from agingnet.losses.contrastive_id import ContrastiveIDLoss


def contrastive_terms(pl_module: Any) -> list[ContrastiveIDLoss]:
    terms = getattr(getattr(pl_module, "loss", None), "terms", None) or {}
    return [t for t in terms.values() if isinstance(t, ContrastiveIDLoss)]


class MinerRefreshCallback(Callback):
    """Reload the impostor bank when its file changes (stat only) or every ``every_n_steps`` steps."""

    def __init__(self, every_n_steps: int | None = None):
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"MinerRefreshCallback: every_n_steps must be ≥ 1 or None, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.reloads = 0
        self._last_periodic_step = -1
        self._warned: set[str] = set()

    def refresh(self, pl_module: Any, step: int) -> int:
        """Reload what needs it; returns the number of terms reloaded."""
        periodic = (self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0
                    and step != self._last_periodic_step)
        if periodic:
            self._last_periodic_step = step
        n = 0
        for term in contrastive_terms(pl_module):
            if not term.loaded:
                continue
            try:
                changed = term.file_stat() != term.bank_stat
            except OSError as e:
                if str(term.bank_path) not in self._warned:
                    self._warned.add(str(term.bank_path))
                    warnings.warn(f"impostor bank {term.bank_path} cannot be read ({e}); "
                                  f"keeping the loaded bank", stacklevel=2)
                continue
            if changed or periodic:
                term.reload()
                n += 1
        self.reloads += n
        return n

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.refresh(pl_module, int(trainer.global_step))

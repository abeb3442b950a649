"""Test-only callback for the DDP tests (loaded by the ``python -m agingnet.train`` subprocesses through
``+callbacks.probe._target_=ddp_probe.Probe``; the tests put this folder on PYTHONPATH).

Each rank records what it trained on and ends with ``<run>/probe_rank<r>.pt``: per step the sample indices,
flips and target ages, the raw weights and EMA shadow at the end, every weight of the module (frozen networks
too) the last validation ran with, and the NaN-guard count. ``nan_rank``/``nan_step`` poison that rank's batch
at that step (its loss becomes NaN); ``kill_step`` ends every rank abruptly (``os._exit``) at the start of that
step, as a killed job would.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from agingnet.callbacks.ema import find_ema


class Probe(Callback):
    def __init__(self, nan_rank: int | None = None, nan_step: int | None = None, kill_step: int | None = None):
        self.nan_rank, self.nan_step, self.kill_step = nan_rank, nan_step, kill_step
        self.seen: list[dict] = []
        self.val_weights: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = int(trainer.global_step)
        if self.kill_step is not None and step == self.kill_step:
            os._exit(3)
        if self.nan_rank == trainer.global_rank and self.nan_step == step:
            batch["image"].fill_(float("nan"))
        self.seen.append({"step": step, "index": batch["index"].tolist(),
                          "flipped": [bool(f) for f in batch["flipped"]]})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        images = getattr(pl_module, "_last_images", None) or {}
        if "target_age" in images:
            self.seen[-1]["target_age"] = images["target_age"].tolist()

    def on_validation_epoch_start(self, trainer, pl_module):
        self.val_weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}  # frozen nets too

    def on_fit_end(self, trainer, pl_module):
        ema = find_ema(trainer)
        torch.save({"seen": self.seen, "world_size": trainer.world_size,
                    "params": {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()},
                    "ema": ema.shadow_state() if ema is not None else {}, "val_weights": self.val_weights,
                    "nan_skips": pl_module.nan_skips},
                   Path(trainer.default_root_dir) / f"probe_rank{trainer.global_rank}.pt")

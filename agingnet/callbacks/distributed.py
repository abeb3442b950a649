"""What every rank of a multi-process (DDP) run must agree on before training, and per-rank throughput.

:class:`RankSetup` (no-op on one process), in ``setup`` (after Lightning's ``pre_setup`` barrier, so files rank 0
wrote before fit are visible):

1. every rank checks that each impostor bank file of a contrastive term exists on its own filesystem; the
   result is all-reduced, so a bank missing on one node stops every rank with the same one-line error instead
   of one rank dying and the others hanging in the next collective;
2. the lazily built miners are built (their generators must exist to be re-seeded and, on resume, restored);
3. every private stream (target ages, ROI jitter, the miner, torch's global RNG) of rank r > 0 is re-seeded with
   ``rank_seed(initial seed, r)``: draws differ per rank and are reproducible from (seed, rank); rank 0 keeps
   the single-process streams. A resume then overwrites them with each rank's saved states.

:class:`StepThroughput` measures each rank's step time (wall clock between consecutive training-batch ends,
data loading included) and logs ``perf/step_ms`` (rank 0's), ``perf/samples_per_s`` (summed over ranks) and,
at the end of fit, one line per rank ``throughput: rank r/W steps=… median_step_ms=… samples_per_s=…`` in that
rank's log. Lightning's ``ThroughputMonitor`` reports rank 0's device only and needs a window of 100 steps
before its first value; the per-rank line is what a straggler hunt needs.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from agingnet.distributed import rank_seed
from agingnet.losses.contrastive_id import ContrastiveIDLoss

log = logging.getLogger(__name__)


def _contrastive_terms(pl_module: Any) -> list[ContrastiveIDLoss]:
    terms = getattr(getattr(pl_module, "loss", None), "terms", None) or {}
    return [t for t in terms.values() if isinstance(t, ContrastiveIDLoss)]


class RankSetup(Callback):
    """See the module docstring."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        world, rank = int(trainer.world_size), int(trainer.global_rank)
        if world <= 1 or stage != "fit":
            return
        terms = _contrastive_terms(pl_module)
        for term in terms:
            path = Path(term.bank_path)
            missing = torch.zeros(world)
            missing[rank] = float(not path.is_file())
            missing = trainer.strategy.reduce(missing.to(trainer.strategy.root_device), reduce_op="sum").cpu()
            if missing.any():
                ranks = [i for i in range(world) if missing[i] > 0]
                err = FileNotFoundError(f"impostor bank {path} is missing on rank(s) {ranks} of {world}: every "
                                        f"node needs the bank file (copy it there or use a shared filesystem)")
                err.agreed_across_ranks = True  # every rank raises it; only rank 0 prints it
                raise err
        for term in terms:
            term.miner  # noqa: B018 - load the bank now so the miner's generator exists to be re-seeded
        if rank > 0:
            for g in pl_module._named_generators().values():
                g.manual_seed(rank_seed(g.initial_seed(), rank))
            torch.manual_seed(rank_seed(torch.initial_seed(), rank))


class StepThroughput(Callback):
    """See the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self._t: float | None = None
        self.step_ms: list[float] = []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._t, self.step_ms = time.perf_counter(), []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        dt = now - (self._t if self._t is not None else now)
        self._t = now
        if dt <= 0:
            return
        self.step_ms.append(1000.0 * dt)
        bs = int(batch["image"].shape[0]) if isinstance(batch, dict) and "image" in batch else 1
        pl_module.log("perf/step_ms", 1000.0 * dt, on_step=True, on_epoch=False, batch_size=bs)
        pl_module.log("perf/samples_per_s", bs / dt, on_step=True, on_epoch=False, batch_size=bs,
                      sync_dist=True, reduce_fx="sum")
        self._bs = bs

    def summary(self) -> dict[str, float]:
        """Median step time (the first step, with its warm-up, excluded when there are more) and samples/s."""
        ms = self.step_ms[1:] if len(self.step_ms) > 1 else self.step_ms
        if not ms:
            return {}
        med = statistics.median(ms)
        return {"steps": len(self.step_ms), "median_step_ms": med,
                "samples_per_s": getattr(self, "_bs", 1) * 1000.0 / med}

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        s = self.summary()
        if s:
            log.info("throughput: rank %d/%d steps=%d median_step_ms=%.1f samples_per_s=%.2f",
                     trainer.global_rank, trainer.world_size, s["steps"], s["median_step_ms"],
                     s["samples_per_s"])


__all__ = ["RankSetup", "StepThroughput"]

"""Exact resume for :class:`agingnet.module.AgingModule`: what Lightning's checkpoint does not hold.

Lightning saves weights, optimizer, schedulers and loops. A resumed run also needs every random stream a
training step draws from (global CPU/CUDA, the target ages, ROI jitter, the miner's draws; per rank under DDP)
and the module's counters, so that it continues the very steps an uninterrupted run would have taken. A mixin
of the module's checkpoint hooks: it reads ``_gen`` (the target-age stream), ``loss.terms``, ``batches_seen``,
``nan_skips``, ``consecutive_skips``, ``step_offset``, ``stage`` and ``label_fallbacks`` from the module.
"""

from __future__ import annotations

import torch

from agingnet.distributed import gather_rng_states


class ExactResume:
    """Checkpoint hooks of the exact resume (see the module docstring)."""

    def _named_generators(self) -> dict[str, torch.Generator]:
        gens = {"target_ages": self._gen}
        for name, term in self.loss.terms.items():
            if isinstance(getattr(term, "generator", None), torch.Generator):
                gens[f"{name}"] = term.generator
            miner = getattr(term, "_miner", None)
            if isinstance(getattr(miner, "generator", None), torch.Generator):
                gens[f"{name}.miner"] = miner.generator
        return gens

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Persist what Lightning does not, for an exact resume: every RNG a training step draws from (global
        CPU/CUDA, target ages, ROI jitter, the miner), the batch count, NaN skips and the step offset."""
        rng = {name: g.get_state() for name, g in self._named_generators().items()}
        checkpoint["agingnet"] = {
            "rng": rng,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            # DDP: Lightning writes rank 0's file only; every rank's streams go in it (rng_per_rank[r])
            "world_size": int(getattr(self._trainer, "world_size", 1) or 1),
            "rng_per_rank": gather_rng_states({**rng, "torch_rng": torch.get_rng_state()}, self._trainer),
            "batches_seen": self.batches_seen, "nan_skips": self.nan_skips, "step_offset": self.step_offset,
            "consecutive_skips": self.consecutive_skips,
            "stage": self.stage, "label_fallbacks": self.label_fallbacks,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("agingnet")
        if not state:
            return
        per_rank = state.get("rng_per_rank")
        if per_rank and self._trainer is not None and int(self._trainer.world_size) == len(per_rank):
            mine = dict(per_rank[int(self._trainer.global_rank)])
            state = {**state, "torch_rng": mine.pop("torch_rng"), "cuda_rng_current": mine.pop("cuda_rng", None),
                     "rng": mine}
        self.batches_seen, self.nan_skips = int(state["batches_seen"]), int(state["nan_skips"])
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self.step_offset = int(state["step_offset"])
        self.label_fallbacks = int(state.get("label_fallbacks", 0))
        self._pending_rng = state  # applied at train start, once lazily built terms (the miner) exist

    def restore_pending_rng(self) -> None:
        """Apply the streams :meth:`on_load_checkpoint` kept, at train start: only then do lazily built terms
        (the miner) exist."""
        state = getattr(self, "_pending_rng", None)
        if state is None:
            return
        for term in self.loss.terms.values():
            if hasattr(term, "_miner") and getattr(term, "_miner", None) is None and hasattr(term, "miner"):
                term.miner  # noqa: B018 - build the lazily loaded miner so its generator can be restored
        gens = self._named_generators()
        for name, g_state in state["rng"].items():
            if name in gens:
                gens[name].set_state(g_state)
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng_current") is not None and self.device.type == "cuda":  # this rank's device
            torch.cuda.set_rng_state(state["cuda_rng_current"], self.device)
        elif state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self._pending_rng = None


__all__ = ["ExactResume"]

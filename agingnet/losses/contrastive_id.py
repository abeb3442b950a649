"""Contrastive identity term against mined impostors (SPEC §4 row ``contrastive_id``, SPEC §5).

For the active samples A = {b : apply_min_age ≤ 100·t_b ≤ apply_max_age}, with q_b = f(ŷ_b) (with gradient)
and k impostor negatives n_bj mined at the target age (no gradient, no positive):

    value = (1/|A|) Σ_{b∈A} log Σ_j exp(⟨q_b, n_bj⟩ / τ)

When every negative has similarity s this equals ln k + s/τ. No active sample → a zero connected to the graph.
Logs ``applied_ratio`` = |A|/B and the miner statistics (candidate_count, sim_mean, …, k_effective, band).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from agingnet.impostor_bank import ImpostorBank
from agingnet.losses.base import LossContext, LossTerm
from agingnet.miner import ImpostorMiner, MinerConfig

_AGE_EPS = 1e-3  # years; target planes hold int(t)/100, so 100·t may read 39.999998


class ContrastiveIDLoss(LossTerm):
    """InfoNCE-style push away from age-matched impostors; the bank file is read lazily on first use."""

    default_passes = ("real",)

    def __init__(self, bank_path: str | os.PathLike, profile: str = "soft060", k: int | None = None,
                 top_m: int | None = None, min_sim: float | None = None, max_sim: float | None = None,
                 backend: str | None = None, temperature: float = 0.12, apply_min_age: float = 38,
                 apply_max_age: float = 42, seed: int = 0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"contrastive_id: temperature must be > 0, got {temperature}")
        if apply_min_age > apply_max_age:
            raise ValueError(f"contrastive_id: apply window [{apply_min_age}, {apply_max_age}] is empty")
        self.bank_path = Path(bank_path)
        self.profile = profile
        self.cfg = MinerConfig.from_profile(profile, k=k, top_m=top_m, min_sim=min_sim, max_sim=max_sim,
                                            backend=backend, seed=seed)
        self.temperature = float(temperature)
        self.apply_min_age, self.apply_max_age = float(apply_min_age), float(apply_max_age)
        self._miner: ImpostorMiner | None = None
        self.bank_stat: tuple[int, int] | None = None  # (mtime_ns, size) of the file last read
        self.last_stats: dict[str, float] = {}

    # ---- bank
    @property
    def loaded(self) -> bool:
        return self._miner is not None

    @property
    def miner(self) -> ImpostorMiner:
        if self._miner is None:
            self.reload()
        if not (self._miner is not None):
            raise RuntimeError('internal check failed: self._miner is not None')
        return self._miner

    def file_stat(self) -> tuple[int, int]:
        """(mtime_ns, size) of the bank file (a cheap ``os.stat``)."""
        st = os.stat(self.bank_path)
        return st.st_mtime_ns, st.st_size

    def reload(self) -> None:
        """(Re-)read the bank file and rebuild the miner and its index (keeps the miner's RNG stream)."""
        stat = self.file_stat() if self.bank_path.is_file() else None
        bank = ImpostorBank.load(self.bank_path)
        miner = ImpostorMiner(bank, self.cfg)
        if self._miner is not None:
            miner.generator.set_state(self._miner.generator.get_state())
        self._miner, self.bank_stat = miner, stat

    # ---- loss
    def active_mask(self, target_ages: Tensor) -> Tensor:
        """[B] bool: 100·t inside [apply_min_age, apply_max_age]."""
        years = target_ages * 100.0
        return (years >= self.apply_min_age - _AGE_EPS) & (years <= self.apply_max_age + _AGE_EPS)

    def forward(self, ctx: LossContext) -> tuple[Tensor, dict[str, Any]]:
        active = self.active_mask(ctx.target_ages.float())
        ratio = float(active.float().mean())
        if not bool(active.any()):
            self.last_stats = {"applied_ratio": 0.0}
            return ctx.y_hat.sum() * 0.0, {"applied_ratio": 0.0}
        q = ctx.feat_y_hat[active]  # [A,D] with gradient
        neg, stats = self.miner.mine(q.detach(), ctx.target_ages[active].detach().float() * 100.0)
        neg = neg.detach().to(q.dtype)
        if not (neg.ndim == 3 and neg.shape[0] == q.shape[0] and neg.shape[2] == q.shape[1]):
            raise ValueError(f"negatives {tuple(neg.shape)} for queries {tuple(q.shape)}")
        logits = torch.einsum("ad,akd->ak", q, neg) / self.temperature
        value = torch.logsumexp(logits, dim=1).mean()
        self.last_stats = {"applied_ratio": ratio, **{k: float(v) for k, v in stats.items()}}
        return value, dict(self.last_stats)

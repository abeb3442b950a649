"""Nearest-neighbour identity term (SPEC §4, row ``nn_id``).

With the personal bank {(r_i, κ_i)}: r_i L2-normalized embeddings of the personal training images (and their
flips), κ_i = age/100 their age keys, and t_b the normalized target age:

    κ*_b  = argmin_κ |κ − t_b|                       (the bank key nearest the target)
    R_b   = {r_i : |κ_i − κ*_b| ≤ tol}                (tol = 0.03 by default)
    value = mean_b (1 − max_{r ∈ R_b} ⟨f(ŷ_b), r⟩)

Active only when the batch is not a "no aging" batch and every t_b lies in [min κ, max κ]; otherwise the value
is a zero connected to the graph. Logs ``active`` (0/1) and, when active, ``nn_sim`` = mean_b max ⟨f(ŷ_b), r⟩.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from agingnet.losses.base import LossContext, LossTerm

_EPS = 1e-6  # slack on key comparisons (keys are age/100 in float32)


class NNIDLoss(LossTerm):
    """``1 − max cos`` to the personal-bank embeddings at the target age key (± ``tolerance``)."""

    def __init__(self, tolerance: float = 0.03):
        super().__init__()
        if tolerance < 0:
            raise ValueError(f"nn_id: tolerance must be ≥ 0, got {tolerance}")
        self.tolerance = float(tolerance)
        self.fingerprint: str | None = None
        # not persistent: the bank is rebuilt from the data at fit start, checkpoints stay bank-free
        self.register_buffer("bank_embeddings", torch.zeros(0, 0), persistent=False)
        self.register_buffer("bank_keys", torch.zeros(0), persistent=False)

    @property
    def has_bank(self) -> bool:
        return self.bank_embeddings.shape[0] > 0

    def set_bank(self, embeddings: Tensor, age_keys: Tensor, fingerprint: str) -> None:
        """Store the personal bank: embeddings [N,D] (L2-normalized) and age keys [N] (age/100)."""
        if embeddings.ndim != 2 or embeddings.shape[0] == 0 or age_keys.shape != (embeddings.shape[0],):
            raise ValueError(f"nn_id: personal bank must be embeddings [N,D] (N ≥ 1) and keys [N], got "
                             f"{tuple(embeddings.shape)} and {tuple(age_keys.shape)}")
        if not (bool(torch.isfinite(embeddings).all()) and bool(torch.isfinite(age_keys).all())):
            raise ValueError(f"nn_id: personal bank {fingerprint!r} holds NaN/inf embeddings or keys")
        dev = self.bank_embeddings.device
        self.bank_embeddings = embeddings.detach().float().to(dev).contiguous()
        self.bank_keys = age_keys.detach().float().to(dev).contiguous()
        self.fingerprint = str(fingerprint)

    def neighbour_mask(self, target_ages: Tensor) -> Tensor:
        """[B,N] bool: bank entries whose key is within ± tolerance of the key nearest each target."""
        keys = self.bank_keys.to(target_ages.device)
        nearest = keys[(keys[None, :] - target_ages[:, None]).abs().argmin(dim=1)]  # [B]
        return (keys[None, :] - nearest[:, None]).abs() <= self.tolerance + _EPS

    def forward(self, ctx: LossContext) -> tuple[Tensor, dict[str, Any]]:
        if not self.has_bank:
            raise RuntimeError("nn_id: the personal bank was not built (PersonalBankCallback builds it at "
                               "fit start; call set_bank() when using the term outside a Trainer)")
        t = ctx.target_ages.float()
        lo, hi = float(self.bank_keys.min()), float(self.bank_keys.max())
        inside = bool(((t >= lo - _EPS) & (t <= hi + _EPS)).all())
        if ctx.no_aging or not inside:
            return ctx.y_hat.sum() * 0.0, {"active": 0.0}
        q = ctx.feat_y_hat  # [B,D], with gradient
        if not (q.ndim == 2 and q.shape[1] == self.bank_embeddings.shape[1]):
            raise ValueError(f"nn_id: embedding dim {tuple(q.shape)} vs personal bank "
                             f"{tuple(self.bank_embeddings.shape)}")
        sims = q @ self.bank_embeddings.to(q.dtype).T  # [B,N]
        best = sims.masked_fill(~self.neighbour_mask(t.to(q.device)), float("-inf")).amax(dim=1)
        return (1.0 - best).mean(), {"active": 1.0, "nn_sim": best.detach().mean()}

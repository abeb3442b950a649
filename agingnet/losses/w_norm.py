"""W-norm regularizer: mean_b ‖codes_b − w̄‖_F (Frobenius norm over [n_styles, D])."""

from __future__ import annotations

from agingnet.losses.base import LossContext, LossTerm


class WNormLoss(LossTerm):
    def forward(self, ctx: LossContext):
        return (ctx.codes - ctx.latent_avg).flatten(1).norm(dim=1).mean(), {}

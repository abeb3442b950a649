"""Aging loss (SAM): MSE(DEX(ŷ)/100, t) with t the normalized target age. Logs the mean output age (years)."""

from __future__ import annotations

import torch.nn.functional as F

from agingnet.losses.base import LossContext, LossTerm


class AgingLoss(LossTerm):
    def forward(self, ctx: LossContext):
        out_age = ctx.nets.predict_age(ctx.y_hat) / 100.0
        ctx.extra[f"output_age_{ctx.pass_name}"] = out_age.detach() * 100
        return F.mse_loss(out_age, ctx.target_ages.to(out_age.dtype)), {"output_age": out_age.detach().mean() * 100}

"""Paired ground-truth term (the aging world only): MSE(ŷ, T(I, t)), T(I, t) the canonical rendering of the
batch's world identity I at the pass's target age t (mirrored like the input), on [-1, 1] images.

Only the world knows T; a batch without ``world_identity`` (any real photo) is refused in one line.
"""

from __future__ import annotations

import torch.nn.functional as F

from agingnet.losses.base import LossContext, LossTerm


class GroundTruthLoss(LossTerm):
    def forward(self, ctx: LossContext):
        truth_fn = ctx.extra.get("truth_fn")
        if truth_fn is None:
            raise ValueError("loss.gt: the batch has no world_identity; the ground-truth term needs faces of the "
                             "aging world (data=synthetic) — set loss.gt.weight=0 for other data")
        truth = truth_fn(ctx.target_ages * 100.0, ctx.y_hat.shape[-1]).to(ctx.y_hat.dtype)
        return F.mse_loss(ctx.y_hat, truth), {}

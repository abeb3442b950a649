"""Perceptual loss: LPIPS(ŷ, y) (AlexNet, v0.1; mean over the batch), whole image or crop C (``crop=True``)."""

from __future__ import annotations

from agingnet.losses.base import LossContext, LossTerm
from agingnet.losses.l2 import crop_c


class LPIPSLoss(LossTerm):
    def __init__(self, crop: bool = False):
        super().__init__()
        self.crop = crop

    def forward(self, ctx: LossContext):
        if ctx.nets.lpips is None:
            raise RuntimeError("the lpips term needs the LPIPS network (model.lpips) but none is configured")
        y_hat, y = (crop_c(ctx.y_hat), crop_c(ctx.y)) if self.crop else (ctx.y_hat, ctx.y)
        return ctx.nets.lpips(y_hat, y).mean(), {}

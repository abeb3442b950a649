"""Pixel loss: MSE(ŷ, y), on the whole image or on the identity crop C (``crop=True``)."""

from __future__ import annotations

import torch.nn.functional as F

from agingnet.losses.base import ID_CROP, LossContext, LossTerm


def crop_c(img):
    t, b, l, r = ID_CROP
    return img[:, :, t:b, l:r]


class L2Loss(LossTerm):
    def __init__(self, crop: bool = False):
        super().__init__()
        self.crop = crop

    def forward(self, ctx: LossContext):
        y_hat, y = (crop_c(ctx.y_hat), crop_c(ctx.y)) if self.crop else (ctx.y_hat, ctx.y)
        return F.mse_loss(y_hat, y), {}

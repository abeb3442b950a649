"""MyTimeMachine's adaptive W-norm: Σ_b λ_adapt·(1 − (0.25·cos(π|t_b−a_b|)+0.75))·‖w_b − w̄‖_F.

Regularizes codes more the further the target age is from the input age. The registry multiplies it by the
term's weight (``w_norm_lambda`` in the fork); ``lambda_adapt`` is ``--adaptive_w_norm_lambda``. The fork applies
it to extrapolation batches only (``only_extrapolation=True``), which makes it inert while extrapolation is off.
"""

from __future__ import annotations

import torch

from agingnet.losses.base import LossContext, LossTerm, age_cosine_weights


class AdaptiveWNormLoss(LossTerm):
    def __init__(self, lambda_adapt: float = 20.0, only_extrapolation: bool = True):
        super().__init__()
        self.lambda_adapt, self.only_extrapolation = lambda_adapt, only_extrapolation

    def forward(self, ctx: LossContext):
        if self.only_extrapolation and not ctx.extra.get("extrapolation", False):
            return ctx.codes.sum() * 0.0, {"active": torch.tensor(0.0)}
        norms = (ctx.codes - ctx.latent_avg).flatten(1).norm(dim=1)
        w = 1 - age_cosine_weights(ctx.target_ages, ctx.input_ages)
        return (self.lambda_adapt * w * norms).sum(), {"active": torch.tensor(1.0)}

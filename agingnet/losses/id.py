"""Identity loss (SAM/pSp): mean_b w_b·(1 − ⟨f(ŷ_b), f(y_b)⟩).

f = IR-SE50 embedding of crop C pooled to 112 (``ctx.feat_*``). With ``weighted=True``,
w_b = 0.25·cos(π·|t_b − a_b|) + 0.75 on normalized ages; else w_b = 1.
Logged: ``id_improve`` = mean(⟨f(ŷ), f(y)⟩ − ⟨f(y), f(x)⟩).
"""

from __future__ import annotations

from agingnet.losses.base import LossContext, LossTerm, age_cosine_weights


class IDLoss(LossTerm):
    def __init__(self, weighted: bool = False):
        super().__init__()
        self.weighted = weighted

    def forward(self, ctx: LossContext):
        sim = (ctx.feat_y_hat * ctx.feat_y).sum(1)
        loss = 1 - sim
        if self.weighted:
            loss = age_cosine_weights(ctx.target_ages, ctx.input_ages) * loss
        improve = (sim.detach() - (ctx.feat_y * ctx.feat_x).sum(1)).mean()
        return loss.mean(), {"id_improve": improve}

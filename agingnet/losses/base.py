"""The contract every loss term follows, and the context a training pass hands to the terms.

A term is a small ``nn.Module`` whose ``forward(ctx)`` returns ``(value, logs)``: ``value`` a scalar tensor
(unweighted), ``logs`` a dict of extra scalars (floats or 0-d tensors) for TensorBoard. Weighting, schedules,
stage weights, aging/no-aging weights and decoder scales are the registry's job (:mod:`agingnet.losses.registry`),
so a term only states its formula.

Frozen networks are shared, not owned by terms: :class:`FrozenNets` holds IR-SE50, DEX and LPIPS once, and
:class:`LossContext` caches the identity embeddings of a pass so that ``id``, ``nn_id`` and ``contrastive_id``
embed ``y_hat`` once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, nn

# SPEC §4: the identity crop at 256 px, rows 35:223, columns 32:220.
ID_CROP = (35, 223, 32, 220)


class FrozenNets(nn.Module):
    """Frozen auxiliary networks shared by the loss terms (always in eval mode, never trained).

    ``arcface``: IR-SE50 mapping [B,3,S,S] in [-1,1] to L2-normalized [B,D] (S = its input size).
    ``dex``: DEX VGG with ``predict_age(x)`` in years. ``lpips``: callable ``(a, b) -> [B,1,1,1]``.
    Any of them may be ``None`` when no term needs it.
    """

    def __init__(self, arcface: nn.Module | None = None, dex: nn.Module | None = None,
                 lpips: nn.Module | None = None):
        super().__init__()
        self.arcface = arcface
        self.dex = dex
        self.lpips = lpips
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenNets:  # frozen: BatchNorm statistics never drift
        return super().train(False)

    @property
    def id_input_size(self) -> int:
        return int(getattr(self.arcface, "input_size", 112))

    def embed_face(self, img: Tensor) -> Tensor:
        """f(·) of SPEC §4: crop C at 256 px, average-pool to the IR-SE50 input size, embed.

        Gradients flow to ``img`` (the network's weights are frozen, not the input).
        """
        if self.arcface is None:
            raise RuntimeError("an identity term needs the IR-SE50 network (model.arcface) but none is configured")
        if not (img.ndim == 4 and img.shape[1] == 3):
            raise ValueError(f"expected [B,3,H,W], got {tuple(img.shape)}")
        if img.shape[-1] != 256 or img.shape[-2] != 256:
            img = nn.functional.adaptive_avg_pool2d(img, (256, 256))
        t, b, l, r = ID_CROP
        crop = img[:, :, t:b, l:r]
        s = self.id_input_size
        return self.arcface(nn.functional.adaptive_avg_pool2d(crop, (s, s)))

    def predict_age(self, img: Tensor) -> Tensor:
        """DEX age in years, [B]."""
        if self.dex is None:
            raise RuntimeError("an aging term needs the DEX network (model.dex) but none is configured")
        return self.dex.predict_age(img)


@dataclass(eq=False)
class LossContext:
    """Everything a term may read about one pass (``real`` or ``cycle``) of a training or validation step.

    Ages are normalized (years / 100), shape [B]. ``y`` is the reconstruction target (SPEC §3: x ≡ y).
    """

    x: Tensor
    y: Tensor
    y_hat: Tensor
    codes: Tensor
    latent_avg: Tensor
    input_ages: Tensor
    target_ages: Tensor
    nets: FrozenNets
    no_aging: bool = False
    pass_name: str = "real"
    stage: str = "s2"
    step: int = 0
    train_decoder: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        b = self.x.shape[0]
        if not (self.y_hat.shape == self.y.shape):
            raise ValueError(f"y_hat {tuple(self.y_hat.shape)} vs y {tuple(self.y.shape)}")
        if not (self.input_ages.shape == (b,) and self.target_ages.shape == (b,)):
            raise ValueError("ages must be [B]")

    @property
    def batch_size(self) -> int:
        return int(self.x.shape[0])

    @cached_property
    def feat_y_hat(self) -> Tensor:
        return self.nets.embed_face(self.y_hat)

    @cached_property
    def feat_y(self) -> Tensor:
        provider = self.extra.get("feat_y_provider")  # the module's cache of frozen embeddings of fixed inputs
        if provider is not None:
            return provider()
        with torch.no_grad():
            return self.nets.embed_face(self.y)

    @cached_property
    def feat_x(self) -> Tensor:
        if self.x is self.y:
            return self.feat_y
        with torch.no_grad():
            return self.nets.embed_face(self.x)

    @property
    def is_aging(self) -> bool:
        """An aging pass: the real pass of a batch that was not drawn as "no aging"."""
        return self.pass_name == "real" and not self.no_aging


def age_cosine_weights(target_ages: Tensor, input_ages: Tensor) -> Tensor:
    """w = 0.25·cos(π·|t − a|) + 0.75 on normalized ages (SAM's weighted identity loss)."""
    return 0.25 * torch.cos(torch.pi * (target_ages - input_ages).abs()) + 0.75


class LossTerm(nn.Module):
    """Base class of every loss term. Subclasses implement ``forward(ctx) -> (value, logs)``."""

    #: passes the term runs on unless the config says otherwise
    default_passes: tuple[str, ...] = ("real", "cycle")

    def forward(self, ctx: LossContext) -> tuple[Tensor, dict[str, Any]]:  # pragma: no cover - abstract
        raise NotImplementedError

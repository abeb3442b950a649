"""The loss registry: builds the configured terms with non-zero weight and sums them per pass.

Each entry of the ``loss.terms`` config is ``{_target_: <LossTerm class>, weight: float, ...}`` with optional keys
that the registry (not the term) interprets:

- ``weight_aging``: weight on an aging real pass (the real pass of a batch not drawn as "no aging");
- ``decoder_scale``: multiplier while the decoder trains (S2/P3), e.g. ``w_norm_lambda_decoder_scale``;
- ``stage_weights``: {s1: w, s2: w, p3: w} replacing ``weight`` in that stage (p3 falls back to s2);
- ``schedule``: ``"step:value,…"`` (value of the last entry with step ≤ current step; base weight before it);
- ``passes``: which passes the term runs on (default: the term's ``default_passes``).

A term whose every weight is zero is not built at all. ``forward(ctx)`` returns ``(total, logs)`` with
``total = Σ_term w_eff·value`` and logs ``{pass}/{term}``, ``{pass}/{term}/{key}`` and ``{pass}/total``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from agingnet.losses.base import LossContext, LossTerm
from agingnet.losses.schedule import WeightSchedule

REGISTRY_KEYS = ("weight", "weight_aging", "decoder_scale", "stage_weights", "schedule", "passes")
STAGES = ("s1", "s2", "p3", "world")


@dataclass
class TermWeights:
    weight: float = 0.0
    weight_aging: float | None = None
    decoder_scale: float = 1.0
    stage_weights: dict[str, float] | None = None
    schedule: str | None = None

    def __post_init__(self):  # parsed once at build time: a malformed schedule fails here, not mid-run
        self.parsed = WeightSchedule(self.schedule, 0.0) if self.schedule else None

    def base(self, stage: str, aging: bool) -> float:
        w = self.weight
        if self.stage_weights:
            if stage in self.stage_weights:
                w = self.stage_weights[stage]
            elif stage == "p3" and "s2" in self.stage_weights:
                w = self.stage_weights["s2"]
        if aging and self.weight_aging is not None:
            w = self.weight_aging
        return float(w)

    def is_zero(self) -> bool:
        values = [self.weight, self.weight_aging or 0.0, *(self.stage_weights or {}).values()]
        if self.parsed is not None:
            values += self.parsed.values
        return all(float(v) == 0.0 for v in values)


class LossStack(nn.Module):
    """Weighted sum of loss terms. ``terms`` maps a term name to its config (see module docstring)."""

    def __init__(self, terms: Mapping[str, Any], stage: str = "s2"):
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"loss stage must be one of {STAGES}, got {stage!r}")
        self.stage = stage
        self.terms = nn.ModuleDict()
        self.weights: dict[str, TermWeights] = {}
        self.passes: dict[str, tuple[str, ...]] = {}
        for name, spec in (terms or {}).items():
            if spec is None:
                continue
            spec = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else dict(spec)
            if "_target_" not in spec:
                raise ValueError(f"loss term {name!r} has no _target_")
            unknown_stage = set(spec.get("stage_weights") or {}) - set(STAGES)
            if unknown_stage:
                raise ValueError(f"loss term {name!r}: unknown stage(s) in stage_weights: {sorted(unknown_stage)}")
            tw = TermWeights(**{k: spec[k] for k in REGISTRY_KEYS if k in spec and k != "passes"})
            if tw.is_zero():
                continue
            term = instantiate({k: v for k, v in spec.items() if k not in REGISTRY_KEYS}, _convert_="all")
            if not isinstance(term, LossTerm):
                raise TypeError(f"loss term {name!r}: {spec['_target_']} is not a LossTerm")
            self.terms[name] = term
            self.weights[name] = tw
            self.passes[name] = tuple(spec.get("passes") or term.default_passes)

    def __contains__(self, name: str) -> bool:
        return name in self.terms

    def weight_of(self, name: str, ctx: LossContext) -> float:
        tw = self.weights[name]
        w = tw.base(ctx.stage, ctx.is_aging)
        if tw.parsed is not None:
            w = tw.parsed(ctx.step, base=w)
        return w * (tw.decoder_scale if ctx.train_decoder else 1.0)

    def forward(self, ctx: LossContext) -> tuple[Tensor, dict[str, Tensor]]:
        total = ctx.y_hat.new_zeros(())
        logs: dict[str, Tensor] = {}
        p = ctx.pass_name
        for name, term in self.terms.items():
            if p not in self.passes[name]:
                continue
            w = self.weight_of(name, ctx)
            value, extra = term(ctx)
            if not torch.is_tensor(value) or value.ndim != 0:
                raise TypeError(f"loss term {name!r} must return a scalar tensor, got {type(value).__name__}")
            if w != 0.0:
                total = total + w * value
            logs[f"{p}/{name}"] = value.detach()
            for k, v in extra.items():
                logs[f"{p}/{name}/{k}"] = v.detach() if torch.is_tensor(v) else torch.tensor(float(v))
        logs[f"{p}/total"] = total.detach()
        return total, logs

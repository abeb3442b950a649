"""Exponential moving average of the trained weights (SPEC §7, fork flags ``--ema --ema_scope --ema_decay``).

After every optimizer step that was actually taken (not skipped by the NaN guard), for every floating-point
parameter p of the scope:

    shadow_p ← d · shadow_p + (1 − d) · p            (d = ``decay``, 0.999 in the seed)

Buffers (StyleGAN2 noise, BatchNorm statistics) and non-float tensors are copied, so the shadow is always a full
state dict of the scope's modules, in the fork's layout ``{"decoder": {...}, "blender": {...}}``.

The shadow starts from the loaded weights at fit start, or from the base checkpoint's own EMA for the scopes it
holds (``init_from``; fixes the fork, which started from the FFHQ decoder). With ``eval_with_ema`` the shadow is
swapped in for validation (``pl_module.using_ema`` is True meanwhile) and the raw weights restored bit-exactly
afterwards. The shadow is part of the callback's ``state_dict``, so a Lightning ``.ckpt`` resume restores it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from agingnet.pretrained import ema_shadow

log = logging.getLogger(__name__)

SCOPES = ("decoder", "decoder+adapter", "trainable")


def scope_modules(pl_module: Any, scope: str) -> dict[str, nn.Module]:
    """{fork scope name: module} for ``scope``: decoder → {decoder}; decoder+adapter → {decoder, blender};
    trainable → ``pl_module.trainable_modules()``."""
    if scope == "decoder":
        return {"decoder": pl_module.net.decoder}
    if scope == "decoder+adapter":
        if getattr(pl_module.net, "blender", None) is None:
            raise ValueError("EMACallback: scope='decoder+adapter' but the network has no blender (adapter)")
        return {"decoder": pl_module.net.decoder, "blender": pl_module.net.blender}
    if scope == "trainable":
        return dict(pl_module.trainable_modules())
    raise ValueError(f"EMACallback: scope must be one of {SCOPES}, got {scope!r}")


@torch.no_grad()
def ema_update_(shadow: Mapping[str, Tensor], current: Mapping[str, Tensor], decay: float,
                float_keys: set[str] | None = None) -> None:
    """In place: ``shadow[k] ← d·shadow[k] + (1−d)·current[k]`` for keys in ``float_keys`` (default: every
    floating-point tensor); every other tensor is copied."""
    for k, s in shadow.items():
        c = current[k]
        if (float_keys is None or k in float_keys) and s.is_floating_point():
            s.mul_(decay).add_(c.to(s.dtype), alpha=1.0 - decay)
        else:
            s.copy_(c)


class EMACallback(Callback):
    """EMA of ``scope`` (decoder | decoder+adapter | trainable) with decay ``d``; see the module docstring."""

    def __init__(self, scope: str = "decoder", decay: float = 0.999, eval_with_ema: bool = True):
        super().__init__()
        if scope not in SCOPES:
            raise ValueError(f"EMACallback: scope must be one of {SCOPES}, got {scope!r}")
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"EMACallback: decay must be in [0, 1), got {decay}")
        self.scope, self.decay, self.eval_with_ema = scope, float(decay), bool(eval_with_ema)
        self.shadow: dict[str, dict[str, Tensor]] = {}
        self.num_updates = 0
        self.init_source = "none"
        self._last_step: int | None = None
        self._backup: dict[str, dict[str, Tensor]] | None = None
        self._float_keys: dict[str, set[str]] = {}

    # ---------------------------------------------------------------- shadow life cycle
    def _params(self, mods: Mapping[str, nn.Module]) -> None:
        self._float_keys = {n: {k for k, p in m.named_parameters() if p.is_floating_point()} for n, m in mods.items()}

    def init_shadow(self, pl_module: Any) -> None:
        """Shadow := the base checkpoint's EMA for the scopes it holds (same keys and shapes), else the current
        weights."""
        mods = scope_modules(pl_module, self.scope)
        self._params(mods)
        base: dict[str, dict[str, Tensor]] = pl_module.net.__dict__.pop("base_ema", None) or {}
        init_from = getattr(getattr(pl_module, "hparams", None), "init_from", None)
        if init_from and not base and getattr(pl_module.net, "meta", {}).get("has_ema") is not False:
            try:
                base = ema_shadow(init_from) or {}
            except Exception as e:  # a SAM file or an unreadable one: the loaded weights are the start
                log.info("EMA: no usable EMA in %s (%s); starting from the loaded weights", init_from, e)
        self.shadow, sources = {}, []
        for name, m in mods.items():
            own = m.state_dict()
            cand = base.get(name)
            if cand is not None and set(cand) == set(own) and all(cand[k].shape == v.shape for k, v in own.items()):
                self.shadow[name] = {k: cand[k].detach().to(v.device, v.dtype).clone() for k, v in own.items()}
                sources.append(f"{name}:base_ema")
            else:
                self.shadow[name] = {k: v.detach().clone() for k, v in own.items()}
                sources.append(f"{name}:weights")
        self.init_source = ",".join(sources)
        log.info("EMA shadow initialised (%s), decay %g", self.init_source, self.decay)

    def _check_restored(self, pl_module: Any) -> None:
        mods = scope_modules(pl_module, self.scope)
        self._params(mods)
        if set(self.shadow) != set(mods):
            raise ValueError(f"EMACallback: restored shadow holds scopes {sorted(self.shadow)}, but scope "
                             f"{self.scope!r} needs {sorted(mods)}")
        for name, m in mods.items():
            own = m.state_dict()
            if set(own) != set(self.shadow[name]):
                raise ValueError(f"EMACallback: restored shadow of {name!r} does not match the module's keys")
            self.shadow[name] = {k: self.shadow[name][k].to(v.device, v.dtype) for k, v in own.items()}

    @torch.no_grad()
    def update(self, pl_module: Any) -> None:
        """One EMA step from the module's current weights."""
        for name, m in scope_modules(pl_module, self.scope).items():
            ema_update_(self.shadow[name], m.state_dict(), self.decay, self._float_keys.get(name))
        self.num_updates += 1

    def shadow_state(self) -> dict[str, dict[str, Tensor]]:
        """{scope name: shadow state dict} in the fork's layout (``ema.<scope>.shadow`` of a checkpoint)."""
        return {n: dict(sd) for n, sd in self.shadow.items()}

    # ---------------------------------------------------------------- swapping
    @property
    def is_swapped(self) -> bool:
        return self._backup is not None

    @torch.no_grad()
    def swap_in(self, pl_module: Any) -> None:
        """Copy the shadow into the modules (raw weights kept aside); idempotent."""
        if self._backup is not None or not self.shadow:
            return
        mods = scope_modules(pl_module, self.scope)
        self._backup = {}
        for name, m in mods.items():
            own = m.state_dict()
            self._backup[name] = {k: v.detach().clone() for k, v in own.items()}
            for k, v in own.items():
                v.copy_(self.shadow[name][k])
        pl_module.using_ema = True

    @torch.no_grad()
    def restore(self, pl_module: Any) -> None:
        """Put the raw weights back (bit-exact); idempotent."""
        if self._backup is None:
            return
        for name, m in scope_modules(pl_module, self.scope).items():
            for k, v in m.state_dict().items():
                v.copy_(self._backup[name][k])
        self._backup = None
        pl_module.using_ema = False

    @contextmanager
    def swapped(self, pl_module: Any) -> Iterator[None]:
        """``with ema.swapped(pl_module):`` the shadow weights are in the modules (e.g. for export)."""
        was = self.is_swapped
        self.swap_in(pl_module)
        try:
            yield
        finally:
            if not was:
                self.restore(pl_module)

    # ---------------------------------------------------------------- Lightning hooks
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.shadow:  # restored from a .ckpt by load_state_dict (resume)
            self._check_restored(pl_module)
        else:
            self.init_shadow(pl_module)
        self._last_step = int(trainer.global_step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)
        if step == self._last_step:  # no optimizer step this batch (gradient accumulation)
            return
        self._last_step = step
        skipped = bool(getattr(pl_module, "last_step_skipped", False)) or outputs is None or (
            isinstance(outputs, Mapping) and outputs.get("loss") is None)
        if not skipped and self.shadow:
            self.update(pl_module)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if self.eval_with_ema:
            self.swap_in(pl_module)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self.restore(pl_module)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.restore(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"scope": self.scope, "decay": self.decay, "num_updates": self.num_updates,
                "init_source": self.init_source,
                "shadow": {n: {k: v.detach().cpu().clone() for k, v in sd.items()} for n, sd in self.shadow.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("scope", self.scope) != self.scope:
            raise ValueError(f"EMACallback: checkpoint EMA scope {state_dict.get('scope')!r} != configured "
                             f"{self.scope!r}")
        self.shadow = {n: dict(sd) for n, sd in state_dict.get("shadow", {}).items()}
        self.num_updates = int(state_dict.get("num_updates", 0))
        self.init_source = str(state_dict.get("init_source", "checkpoint"))


def find_ema(trainer: Any) -> EMACallback | None:
    """The trainer's :class:`EMACallback`, if any."""
    return next((c for c in getattr(trainer, "callbacks", []) if isinstance(c, EMACallback)), None)

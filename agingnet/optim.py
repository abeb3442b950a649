"""Optimizer and LR schedule of a training run (SPEC §7): build them from the config, restore a base run's
optimizer state on request (``restore_optimizer=true``), and the warmup + cosine schedule.

Restoring keeps the *configured* learning rate: the loaded param groups carry the base run's ``lr`` and
``initial_lr`` (an LR scheduler's starting point), and a fresh scheduler would restart from the latter — the
fork's LR bug (SPEC §10). Both are reset to the configured values before the scheduler is built.

A fork checkpoint's optimizer is the lessw2020 ``Ranger`` (group keys ``lr, alpha, k, step_counter, betas,
N_sma_threshhold, eps, weight_decay``; per-parameter state ``step, exp_avg, exp_avg_sq, slow_buffer``).
``pytorch_optimizer.Ranger`` keeps the same moment and slow-weight tensors but counts steps per group and
reads more group keys (``weight_decouple``, ``fixed_decay``, …); :func:`adapt_optimizer_state` translates the
former into the latter. Written here because neither torch nor pytorch-optimizer converts between the two.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

#: the fork Ranger's group keys that pytorch-optimizer does not use (its threshold is a constructor argument)
FORK_ONLY_GROUP_KEYS = ("N_sma_threshhold",)


class OptimizerStateError(ValueError):
    """A saved optimizer state that cannot drive the configured optimizer."""


def _call(spec: Any, *args: Any, **kw: Any) -> Any:
    """A partial ``_target_`` config (or a plain callable) applied to ``args``."""
    fn = instantiate(spec, _convert_="all") if isinstance(spec, (dict, DictConfig)) else spec
    return fn(*args, **kw)


def build_optimizer(spec: Any, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return _call(spec, list(params))


def adapt_optimizer_state(state: Mapping[str, Any], optimizer: torch.optim.Optimizer,
                          path: str | os.PathLike) -> dict[str, Any]:
    """A saved ``{"state", "param_groups"}`` translated to ``optimizer``'s layout, or :class:`OptimizerStateError`
    naming ``path`` when it cannot fit (group or parameter counts, tensor shapes).

    Group keys the saved groups lack are filled from the configured optimizer's own groups; a per-parameter
    ``step`` (the fork's Ranger) becomes the group's ``step`` when the configured optimizer counts per group,
    so the bias corrections continue where the base run stopped instead of restarting at step 1.
    """
    if not isinstance(state, Mapping) or not isinstance(state.get("param_groups"), list) \
            or not isinstance(state.get("state"), Mapping):
        raise OptimizerStateError(f"{path}: 'optimizer' is not an optimizer state dict (state, param_groups)")
    saved_groups, own_groups = state["param_groups"], optimizer.param_groups
    if len(saved_groups) != len(own_groups):
        raise OptimizerStateError(f"{path}: optimizer state has {len(saved_groups)} parameter groups, the "
                                  f"configured optimizer {len(own_groups)}")
    groups, per_state, first = [], {}, 0
    per_group = _counts_steps_per_group(optimizer)
    for gi, (saved, own) in enumerate(zip(saved_groups, own_groups)):
        ids = list(saved.get("params", []))
        if len(ids) != len(own["params"]):
            raise OptimizerStateError(f"{path}: optimizer group {gi} holds {len(ids)} parameters, the configured "
                                      f"optimizer trains {len(own['params'])} (another stage or architecture?)")
        group = {k: v for k, v in own.items() if k != "params"}
        group.update({k: v for k, v in saved.items() if k not in FORK_ONLY_GROUP_KEYS})
        group["params"] = list(range(first, first + len(ids)))
        steps = set()
        for j, pid in enumerate(ids):
            entry = state["state"].get(pid, state["state"].get(str(pid)))
            if entry is None:
                continue
            entry = dict(entry)
            param = own["params"][j]
            for k, v in entry.items():
                if torch.is_tensor(v) and v.ndim > 0 and tuple(v.shape) != tuple(param.shape):
                    raise OptimizerStateError(f"{path}: optimizer state {k!r} of parameter {pid} has shape "
                                              f"{tuple(v.shape)}, the parameter {tuple(param.shape)}")
            if "step" in entry and per_group and "step" not in saved:  # per-param step → the group's step
                steps.add(int(entry.pop("step")))
            elif "step" in entry and not torch.is_tensor(entry["step"]):  # torch optimizers keep a tensor
                entry["step"] = torch.tensor(float(entry["step"]))
            per_state[first + j] = entry
        if len(steps) > 1:
            raise OptimizerStateError(f"{path}: optimizer group {gi} has parameters at different steps "
                                      f"{sorted(steps)}; cannot continue one group step")
        if steps:
            group["step"] = steps.pop()
        groups.append(group)
        first += len(ids)
    return {"state": per_state, "param_groups": groups}


def restore_optimizer_state(optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> None:
    """Load the optimizer state stored in the checkpoint ``path`` (SAM/fork layout, key ``optimizer``), keeping
    the configured learning rate (``lr`` and ``initial_lr``) of every group."""
    from agingnet.pretrained import read_checkpoint

    state = read_checkpoint(path, "aging").get("optimizer")
    if not state or (isinstance(state, Mapping) and not state.get("param_groups")):
        raise OptimizerStateError(f"{path}: restore_optimizer=true but it holds no optimizer state")
    lrs = [g["lr"] for g in optimizer.param_groups]
    optimizer.load_state_dict(adapt_optimizer_state(state, optimizer, path))
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
        g["initial_lr"] = lr  # a scheduler built next starts from here (it would keep the base run's value)


def _counts_steps_per_group(optimizer: torch.optim.Optimizer) -> bool:
    """pytorch-optimizer's optimizers keep one ``group["step"]`` (set at the first step), torch's one per
    parameter."""
    return type(optimizer).__module__.startswith("pytorch_optimizer")


def build_scheduler(spec: Any, optimizer: torch.optim.Optimizer, total_steps: int):
    return None if spec is None else _call(spec, optimizer, total_steps=total_steps)


def configure(module: Any) -> Any:
    """``LightningModule.configure_optimizers`` of :class:`~agingnet.module.AgingModule`: the configured
    optimizer on the trainable parameters, the base run's optimizer state when asked, the per-step schedule."""
    hp = module.hparams
    params = [p for p in module.net.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"stage {module.stage!r} leaves no trainable parameter")
    optimizer = build_optimizer(hp.optimizer, params)
    if hp.restore_optimizer and hp.init_from:
        restore_optimizer_state(optimizer, hp.init_from)
    max_steps = module.trainer.max_steps
    scheduler = build_scheduler(hp.scheduler, optimizer, max_steps if max_steps and max_steps > 0 else 1000)
    if scheduler is None:
        return optimizer
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 500,
                  min_lr: float = 1e-6):
    """Linear warmup over W = ``warmup_steps`` then cosine decay to ``min_lr`` at T = ``total_steps`` (torch's
    LinearLR → CosineAnnealingLR in a SequentialLR). With base LR η, after s scheduler steps:

        s < W:  η_s = η · (1/W + (1 − 1/W) · s/W)
        s ≥ W:  η_s = min_lr + (η − min_lr) · (1 + cos(π · (s − W) / (T − W))) / 2

    W is clipped to [0, T − 1]; W = 0 is the cosine alone.
    """
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    if int(total_steps) < 1:
        raise ValueError(f"warmup_cosine: total_steps must be ≥ 1, got {total_steps}")
    if int(warmup_steps) < 0 or float(min_lr) < 0 or not math.isfinite(float(min_lr)):
        raise ValueError(f"warmup_cosine: warmup_steps and min_lr must be ≥ 0, got {warmup_steps}, {min_lr}")
    warmup_steps = max(0, min(int(warmup_steps), int(total_steps) - 1))
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, int(total_steps) - warmup_steps), eta_min=min_lr)
    if warmup_steps == 0:
        return cosine
    warm = LinearLR(optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0, total_iters=warmup_steps)
    return SequentialLR(optimizer, [warm, cosine], milestones=[warmup_steps])


__all__ = ["OptimizerStateError", "adapt_optimizer_state", "build_optimizer", "build_scheduler", "configure",
           "restore_optimizer_state", "warmup_cosine"]

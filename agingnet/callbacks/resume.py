"""Guard for ``resume_from=…``: an exact Lightning resume only continues the same experiment.

The architecture (``model.net``) must also match the checkpoint's ``hyper_parameters['net']``. The checkpoint's
identity is (task name, stage): the stage comes from the ``.ckpt``'s ``hyper_parameters``
(``AgingModule.stage``), the task name from the run folder's ``config.yaml`` that ``train`` writes next to
``checkpoints/`` (``<run>/checkpoints/x.ckpt`` → ``<run>/config.yaml``). Both are compared with the config being
run; a mismatch raises one ``ValueError`` naming both sides. The file is read with ``weights_only=True`` only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from agingnet.io import describe_load_error


def read_lightning_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` of a Lightning ``.ckpt`` with errors naming the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"resume_from: no such checkpoint: {p}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"resume_from: {p} cannot be read: {describe_load_error(e)}") from None
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise ValueError(f"resume_from: {p} is not a Lightning checkpoint (no 'state_dict')")
    if "pytorch-lightning_version" not in ckpt and "loops" not in ckpt:
        what = "a SAM/fork weights file" if "opts" in ckpt or "latent_avg" in ckpt else "not a Lightning .ckpt"
        raise ValueError(f"resume_from: {p} is {what}; use init_from=… to start from weights, resume_from=… "
                         f"only for a Lightning .ckpt of the same experiment")
    return dict(ckpt)


def checkpoint_identity(path: str | os.PathLike, ckpt: Mapping[str, Any]) -> dict[str, str | None]:
    """{"task_name", "stage"} of a checkpoint (None where unknown)."""
    hp = ckpt.get("hyper_parameters") or {}
    stage = hp.get("stage") if isinstance(hp, Mapping) else None
    task = None
    cfg_path = Path(path).resolve().parent.parent / "config.yaml"
    if cfg_path.is_file():
        run_cfg = OmegaConf.load(cfg_path)
        task = run_cfg.get("task_name")
        stage = stage or run_cfg.get("stage")
    return {"task_name": None if task is None else str(task), "stage": None if stage is None else str(stage)}


def check_resume_compatible(ckpt_path: str | os.PathLike, cfg: Any) -> dict[str, str | None]:
    """Raise ``ValueError`` when ``ckpt_path`` comes from another experiment (task name or stage differ);
    returns the checkpoint's identity otherwise."""
    ckpt = read_lightning_checkpoint(ckpt_path)
    ident = checkpoint_identity(ckpt_path, ckpt)
    want = {"task_name": str(cfg.get("task_name")), "stage": str(cfg.get("stage"))}
    bad = [k for k in ("task_name", "stage") if ident[k] is not None and ident[k] != want[k]]
    if bad:
        have = ", ".join(f"{k}={ident[k]}" for k in ("task_name", "stage"))
        now = ", ".join(f"{k}={want[k]}" for k in ("task_name", "stage"))
        raise ValueError(f"resume_from: {ckpt_path} belongs to another experiment ({have}) than this run "
                         f"({now}); resume only the same experiment, or start from its weights with init_from=…")
    hp = ckpt.get("hyper_parameters") or {}
    have_net = hp.get("net") if isinstance(hp, Mapping) else None
    want_net = OmegaConf.select(cfg, "model.net", default=None) if OmegaConf.is_config(cfg) else None
    if isinstance(have_net, Mapping) and want_net is not None:
        want_net = OmegaConf.to_container(want_net, resolve=True) if OmegaConf.is_config(want_net) else want_net
        diff = sorted(k for k in set(have_net) | set(want_net) if have_net.get(k) != want_net.get(k))
        if diff:
            detail = ", ".join(f"model.net.{k}={want_net.get(k)!r} (checkpoint: {have_net.get(k)!r})" for k in diff)
            raise ValueError(f"resume_from: {ckpt_path} has another architecture: {detail}; resume with the "
                             f"checkpoint's architecture")
    return ident

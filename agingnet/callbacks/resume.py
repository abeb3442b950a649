"""Guard for ``resume_from=…``: an exact Lightning resume only continues the same experiment.

The checkpoint's identity is (task name, stage): the stage comes from the ``.ckpt``'s ``hyper_parameters``
(``AgingModule.stage``), the task name from the run folder's ``config.yaml`` that ``train`` writes next to
``checkpoints/`` (``<run>/checkpoints/x.ckpt`` → ``<run>/config.yaml``). Both are compared with the config being
run; a mismatch raises one ``ValueError`` naming both sides. The file is read with ``weights_only=True`` only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf


def read_lightning_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` of a Lightning ``.ckpt`` with errors naming the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"resume_from: no such checkpoint: {p}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e)
        hit = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
        first = f"it pickles {hit.group(1)}, which is not a tensor/plain type (store plain containers in " \
                f"hyper_parameters)" if hit else (msg.strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"resume_from: {p} cannot be read with torch.load(weights_only=True) "
                         f"({type(e).__name__}: {first}); agingnet does not unpickle arbitrary objects") from None
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
    return ident

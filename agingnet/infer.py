"""``python -m agingnet.infer checkpoint=… input_dir=… output_dir=… [target_ages=[20,25,…]] …`` (SPEC §9).

For every image of ``input_dir`` and every target age t, with x the 256 px input and a its own age (DEX on x,
the file name, or a fixed number):

    codes_aged = E(x ⊕ t/100),  codes_id = E(x ⊕ a/100)
    codes      = blend_codes(codes_id, codes_aged, s, strict)
    image      = resize(decoder(codes, noise_mode="const"), output_size)

``blend_codes`` moves W+ layers 8–12 by the aging strength s from the identity code toward the aged one
(s = 1 is a plain forward, so then neither a nor codes_id is needed); the strict-pose schedule freezes
layers 0–7 too.
Model calls are batched over images (``batch_size``) and loop over target ages only.

Outputs under ``output_dir``: ``age_XX/<name>.png``, ``coupled/age_XX/<name>.png`` (input | result),
``strips/<name>.png`` (input then every age, labelled), optional ``gifs/<name>.gif`` and ``summary.json``.
Inputs that cannot be decoded, are smaller than ``min_size`` px, or (with ``align=true``) show no face are
skipped and listed with the reason; grayscale/palette/alpha images are converted to RGB.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor

from agingnet.config import CONFIG_DIR, register_resolvers, user_errors

# Moved to agingnet.face_inputs; re-exported because users' scripts and the tests import them from here.
from agingnet.face_inputs import (  # noqa: F401
    Aligner,
    SkipImage,
    _label_age,
    center_square,
    iter_batches,
    list_inputs,
    load_face,
    output_names,
    to_input,
)
from agingnet.nn.aging_net import AgingNet, add_age_channel, blend_codes
from agingnet.viz import (
    age_strip,
    labelled_grid,
    resize,
    save_gif,
    save_image,
    save_text,
    to_uint8,
)

log = logging.getLogger("agingnet.infer")
register_resolvers()


# ---------------------------------------------------------------- model and age sources


def select_device(name: str | None = "auto") -> torch.device:
    """``auto`` → cuda when available, else cpu; anything else is passed to ``torch.device``."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(str(name))


def checkpoint_has_ema(path: str | os.PathLike) -> bool:
    """Whether an aging checkpoint carries an ``ema`` entry (memory-mapped peek; full read as fallback)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy (non-zip) files cannot be memory-mapped
        from agingnet.pretrained import read_checkpoint

        obj = read_checkpoint(path, "aging")
    return isinstance(obj, dict) and bool(obj.get("ema"))


def resolve_use_ema(path: str | os.PathLike, use_ema: bool | str) -> bool:
    """``auto`` → EMA weights when the checkpoint has them; ``true``/``false`` as given."""
    if isinstance(use_ema, str):
        v = use_ema.strip().lower()
        if v == "auto":
            return checkpoint_has_ema(path)
        if v not in ("true", "false", "1", "0"):
            raise ValueError(f"use_ema must be auto, true or false, got {use_ema!r}")
        return v in ("true", "1")
    return bool(use_ema)


def load_model(path: str | os.PathLike, use_ema: bool | str = "auto",
               device: torch.device | str = "cpu") -> AgingNet:
    """The aging network of ``path`` in eval mode on ``device`` (``net.meta['used_ema']``: which weights)."""
    from agingnet.pretrained import load_aging_model

    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint: no such file: {path}")
    net = load_aging_model(path, use_ema=resolve_use_ema(path, use_ema))
    return net.to(device).eval().requires_grad_(False)


AgeFn = Callable[[Tensor, Sequence[Path]], Tensor]


def build_age_source(input_age: Any, dex_path: str | None, allow_random_dex: bool, random_dex: dict | None,
                     required: bool, device: torch.device) -> tuple[str, AgeFn | None]:
    """How each input's own age a is found: ("fixed", …), ("label", …), ("dex", …), or ("none", None).

    ``dex`` loads ``weights.dex``; without that file a random DEX is used only with ``allow_random_dex``
    (tests, demo). When a is not ``required`` (s = 1, no strict pose) a missing DEX is not an error: the
    ages stay unknown.
    """
    if isinstance(input_age, (int, float)) and not isinstance(input_age, bool):
        fixed = float(input_age)
        if not 0 <= fixed <= 100:
            raise ValueError(f"input_age={input_age}: a fixed input age must lie in [0, 100]")
        return "fixed", lambda x, names: torch.full((x.shape[0],), fixed, device=x.device)
    if input_age == "label":
        return "label", lambda x, names: torch.tensor([_label_age(Path(n)) for n in names], device=x.device)
    if input_age != "dex":
        raise ValueError(f"input_age must be 'dex', 'label' or a number of years, got {input_age!r}")
    from agingnet.models import build_dex

    if dex_path and Path(dex_path).is_file():
        dex = build_dex(path=str(dex_path))
    elif allow_random_dex:
        log.warning("weights.dex=%s not found: using a RANDOM DEX (allow_random_dex=true; "
                    "ages are meaningless)", dex_path)
        dex = build_dex(**(random_dex or {}))
    elif required:
        raise FileNotFoundError(f"weights.dex: no such file: {dex_path} (the identity blend needs the "
                                f"input's age: give the DEX weights, input_age=<years>, or input_age=label)")
    else:
        return "none", None
    dex = dex.to(device).eval().requires_grad_(False)
    return "dex", lambda x, names: dex.predict_age(x).clamp(0, 100)


# ---------------------------------------------------------------- the math


def aging_codes(net: AgingNet, x: Tensor, target_years: Tensor, input_years: Tensor | None = None,
                strength: float = 1.0, strict_pose: bool = False,
                identity_codes: Tensor | None = None) -> Tensor:
    """W+ codes [B,n,D] of x [B,3,H,W] aged to ``target_years`` [B] with the identity blend (module doc).

    ``identity_codes`` (E(x ⊕ a/100)) may be passed in to share it across target ages.
    """
    if not (x.ndim == 4 and x.shape[1] == 3):
        raise ValueError(f"x must be [B,3,H,W], got {tuple(x.shape)}")
    if not (target_years.shape == (x.shape[0],)):
        raise ValueError(f"target_years must be [B], got {tuple(target_years.shape)}")
    aged = net.encode(add_age_channel(x, target_years.to(x) / 100.0))
    if float(strength) == 1.0 and not strict_pose:
        return aged
    if identity_codes is None:
        if input_years is None:
            raise ValueError("the identity blend (aging_strength != 1 or strict_pose) needs the input ages")
        identity_codes = net.encode(add_age_channel(x, input_years.to(x) / 100.0))
    return blend_codes(identity_codes, aged, float(strength), bool(strict_pose))


@torch.no_grad()
def age_batch(net: AgingNet, x: Tensor, target_ages: Sequence[int], input_years: Tensor | None = None,
              strength: float = 1.0, strict_pose: bool = False, output_size: int | None = None) -> Tensor:
    """Images [A,B,3,S,S] in [-1,1] of x [B,3,H,W] at each of the A target ages (S = output_size, default the
    decoder's size). One encoder/decoder call per age on the whole batch; the identity code is shared."""
    if not (x.ndim == 4 and x.shape[1] == 3):
        raise ValueError(f"x must be [B,3,H,W], got {tuple(x.shape)}")
    size = int(output_size or net.decoder.size)
    blend = not (float(strength) == 1.0 and not strict_pose)
    ident = None
    if blend:
        if input_years is None:
            raise ValueError("the identity blend (aging_strength != 1 or strict_pose) needs the input ages")
        ident = net.encode(add_age_channel(x, input_years.to(x) / 100.0))
    outs = []
    for t in target_ages:  # ages, not batch elements: each call is batched over the images
        ty = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
        codes = aging_codes(net, x, ty, input_years, strength, strict_pose, identity_codes=ident)
        img = net.decode(codes, noise_mode="const", output_size=net.decoder.size)
        outs.append(resize(img, size))
    return torch.stack(outs)


# ---------------------------------------------------------------- arguments


def strength_arg(cfg: DictConfig) -> float:
    """``aging_strength`` as a finite number ≥ 0, or ``ValueError`` naming the key."""
    v = cfg.get("aging_strength", 1.0)
    try:
        strength = float(v)
    except (TypeError, ValueError):
        strength = math.nan
    if isinstance(v, bool) or not math.isfinite(strength) or strength < 0:
        raise ValueError(f"aging_strength must be a finite number >= 0, got {v!r}")
    return strength


# ---------------------------------------------------------------- the app


def _cfg(cfg: DictConfig | dict) -> DictConfig:
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    for key in ("checkpoint", "input_dir", "output_dir"):
        if OmegaConf.is_missing(cfg, key) or not cfg.get(key):
            raise ValueError(f"{key}= is required (e.g. python -m agingnet.infer checkpoint=… input_dir=… "
                             f"output_dir=…)")
    return cfg


def _age_list(ages: Any, what: str = "target_ages") -> list[int]:
    vals = [ages] if isinstance(ages, (int, float)) else list(ages or [])
    if not vals:
        raise ValueError(f"{what} must list at least one age")
    out = []
    for a in vals:
        try:
            ok = not isinstance(a, bool) and float(a) == int(a) and 0 <= int(a) <= 100
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{what}: {a!r} is not an integer age in [0, 100]")
        out.append(int(a))
    return out


def run_inference(cfg: DictConfig | dict) -> dict[str, Any]:
    """Run the whole inference described in the module doc; returns (and writes) the summary dict."""
    cfg = _cfg(cfg)
    t0 = time.perf_counter()
    ages = _age_list(cfg.target_ages)
    strength, strict = strength_arg(cfg), bool(cfg.get("strict_pose", False))
    if not math.isfinite(strength) or strength < 0:
        raise ValueError(f"aging_strength must be a finite number >= 0, got {strength}")
    out_size = int(cfg.get("output_size", 1024))
    if out_size < 16:
        raise ValueError(f"output_size must be >= 16 px, got {out_size}")
    bs = int(cfg.get("batch_size", 4))
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1, got {bs}")
    out = Path(cfg.output_dir)
    files = list_inputs(cfg.input_dir)
    names = output_names(files)
    device = select_device(cfg.get("device", "auto"))

    net = load_model(cfg.checkpoint, cfg.get("use_ema", "auto"), device)
    in_size = int(getattr(net.encoder, "input_size", 256))
    need_age = not (strength == 1.0 and not strict)
    weights = cfg.get("weights") or {}
    random_dex = OmegaConf.to_container(cfg.random_dex) if cfg.get("random_dex") else None
    age_kind, age_fn = build_age_source(cfg.get("input_age", "dex"), weights.get("dex"),
                                        bool(cfg.get("allow_random_dex", False)), random_dex, need_age,
                                        device)
    aligner = None
    if cfg.get("align", False):
        from agingnet.align import FaceAligner

        aligner = FaceAligner(cfg.get("align_backend", "dlib"), output_size=max(in_size, out_size),
                              **(OmegaConf.to_container(cfg.align_kw) if cfg.get("align_kw") else {}))
    tile = int(cfg.get("strip_tile", 256))
    coupled, gif = bool(cfg.get("coupled", True)), bool(cfg.get("gif", False))
    strips = bool(cfg.get("strips", True))
    min_size = int(cfg.get("min_size", 64))

    processed: list[str] = []
    skipped: list[dict[str, str]] = []
    notes: dict[str, str] = {}
    input_ages: dict[str, float] = {}

    def flush(batch: list[tuple[Path, Image.Image]]) -> None:
        x = torch.stack([to_input(img, in_size) for _, img in batch]).to(device)
        paths = [p for p, _ in batch]
        a = None
        if age_fn is not None:
            with torch.no_grad():
                a = age_fn(x, paths).float()
        y = age_batch(net, x, ages, a, strength, strict, out_size)  # [A,B,3,S,S]
        y8 = to_uint8(y)  # [A,B,S,S,3]
        shown = to_uint8(resize(x, out_size)) if coupled else None
        for i, p in enumerate(paths):  # writing files: one per image and age
            name = names[p]
            if a is not None:
                input_ages[p.name] = round(float(a[i]), 2)
            for k, t in enumerate(ages):
                save_image(Image.fromarray(y8[k, i]), out / f"age_{t:02d}" / f"{name}.png")
                if coupled:
                    pair = np.concatenate([shown[i], y8[k, i]], axis=1)
                    save_image(Image.fromarray(pair), out / "coupled" / f"age_{t:02d}" / f"{name}.png")
            label = "input" if a is None else f"input ({float(a[i]):.0f}y)"
            if strips:
                save_image(age_strip(x[i], {t: y[k, i] for k, t in enumerate(ages)}, label, tile=tile),
                           out / "strips" / f"{name}.png")
            if gif:
                frames = [labelled_grid([(x[i : i + 1], [label])], tile=tile)]
                frames += [labelled_grid([(y[k, i : i + 1], [f"age {t}"])], tile=tile)
                           for k, t in enumerate(ages)]
                save_gif(frames, out / "gifs" / f"{name}.gif", duration_ms=int(cfg.get("gif_ms", 400)))
            processed.append(p.name)

    def load(p: Path) -> Image.Image:
        if age_kind == "label":
            _label_age(p)
        img, note = load_face(p, min_size, aligner)
        if note:
            notes[p.name] = note
        return img

    for batch in iter_batches(files, load, bs, skipped, "aging", cfg.get("progress", True)):
        flush(batch)

    summary = {
        "checkpoint": str(cfg.checkpoint), "used_ema": bool(net.meta.get("used_ema", False)),
        "output_dir": str(out), "target_ages": ages, "aging_strength": strength, "strict_pose": strict,
        "input_age": age_kind, "output_size": out_size, "device": str(device),
        "n_files": len(files), "processed": len(processed), "processed_files": processed,
        "skipped": skipped, "notes": notes, "input_ages": input_ages,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    out.mkdir(parents=True, exist_ok=True)
    save_text(json.dumps(summary, indent=2) + "\n", out / "summary.json")
    print(format_summary(summary))
    return summary


def format_summary(s: dict[str, Any]) -> str:
    """The printed summary: counts, ages, time, and one line per skipped file."""
    lines = [f"[agingnet.infer] {s['processed']}/{s['n_files']} images x {len(s['target_ages'])} ages "
             f"({', '.join(map(str, s['target_ages']))}) in {s['seconds']:.1f} s; "
             f"used_ema={int(s['used_ema'])}; outputs in {s['output_dir']}",
             f"[agingnet.infer] skipped {len(s['skipped'])}"]
    lines += [f"  - {k['file']}: {k['reason']}" for k in s["skipped"]]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="infer")
def main(cfg: DictConfig) -> None:
    with user_errors("agingnet.infer"):
        run_inference(cfg)


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    main()

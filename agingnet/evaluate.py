"""``python -m agingnet.evaluate checkpoint=… data=<folder> [target_ages=[…]] [fid=true]``: quality per age.

(``data=`` on the command line is the config key ``data_dir``; ``run_evaluation`` takes ``data_dir``.)

For every image x of ``data`` (256 px, const noise, the identity blend of :mod:`agingnet.infer`) and target
age t, with y = the aged output, and averaged over the images:

* ``age_mae``  = mean |DEX(y) − t| (years), plus ``age_pred_mean``/``age_pred_std`` of DEX(y);
* ``in_window`` = share of images with lo ≤ DEX(y) ≤ hi, with ``window=[lo,hi]`` (e.g. ``[38,42]``, the Phase-3
  age window, per image on held-out photos; the training's lock is on the mean, ``age_pred_mean``); empty
  without a window;
* ``id_cos``   = mean ⟨f(y), f(x)⟩, f = IR-SE50 embedding of the identity crop (L2-normalized, SPEC §4);
* ``lpips``    = mean LPIPS_alex(y, x);
* optional ``fid`` / ``kid_mean`` / ``kid_std`` (torchmetrics) between the outputs at t and the inputs, on
  Inception features (``fid_features=inception``: needs torch-fidelity and its weights, else skipped with
  the reason) or on the IR-SE50 identity features (``fid_features=arcface``: offline, not comparable to
  published FID).

On a world actor's folder (a ``world.json`` beside the images or one level up, written by ``python -m
agingnet.world actor``) the world knows the answer: each row also gets, against the canonical rendering T_t of
that identity at the target age (:func:`agingnet.world.render`, ``photo=None``),

* ``gt_l2``    = mean over images of mean_pixels (y − T_t)² on [-1, 1] images (SAM's L2);
* ``gt_ssim``  = mean over images of SSIM((y+1)/2, (T_t+1)/2) (torchmetrics, Gaussian 11 px, data range 1),
* ``gt_blur``  = mean over images of the σ (px at the evaluation size) of the Gaussian blur of T_t closest to y
  (:func:`agingnet.world.truth.blur_fit`, σ from 0 to 48; T_t's blurs computed once): the detail the model
  reproduces, e.g. whether 2–4 px wrinkle lines can show at all,

and the world's DEX and identity networks are used unless ``world_nets=false``. ``baseline=<checkpoint>``
(or ``baseline=world``, the shipped global model) evaluates a second model the same way: every row has a
``model`` column, ``checkpoint`` or ``baseline``. ``truth=true`` (world actors only) adds the rows ``truth``: the
actor's true face at each target age photographed like each input photo (:func:`agingnet.world.truth.photo_truth`),
scored as if a model had output it: what a perfect aging model reaches, e.g. how often DEX's own error puts the
truth outside a ``window=``, or the ``gt_l2`` the photos' light and background leave.

Writes ``metrics.csv``, ``metrics.json`` (rows, their mean per model, what was used and skipped) and
``metrics.md`` to ``output_dir``. The networks are batched over images × ages (one DEX, IR-SE50 and LPIPS
call per batch).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from agingnet.config import CONFIG_DIR, register_resolvers, user_errors
from agingnet.eval_report import COLUMNS, MEAN_COLUMNS, format_markdown, write_reports
from agingnet.face_inputs import iter_batches, list_inputs, load_face, to_input
from agingnet.infer import _age_list, age_batch, load_model, select_device, strength_arg
from agingnet.losses.base import FrozenNets
from agingnet.world.truth import blur_fit, blur_stack, photo_truth, truth_images, world_actor

log = logging.getLogger("agingnet.evaluate")
register_resolvers()

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"


def _weights_or_random(kind: str, path: str | None, allow_random: bool) -> str | None:
    """The path to load, or None for a random network (only with ``allow_random_nets``)."""
    if path and Path(path).is_file():
        return str(path)
    if allow_random:
        log.warning("weights.%s=%s not found: using a RANDOM %s (allow_random_nets=true; "
                    "numbers are meaningless)", kind, path, kind)
        return None
    raise FileNotFoundError(f"weights.{kind}: no such file: {path} (or allow_random_nets=true for a demo)")


def build_frozen(cfg: DictConfig, device: torch.device, world: bool = False) -> tuple[FrozenNets, dict[str, str]]:
    """IR-SE50, DEX and LPIPS from ``weights.*`` (random tiny ones with ``allow_random_nets``), or the world's
    shipped DEX and identity networks when ``world``."""
    from agingnet.models import build_arcface, build_dex, build_lpips

    allow = bool(cfg.get("allow_random_nets", False))
    w = cfg.get("weights") or {}
    rnd = OmegaConf.to_container(cfg.random_nets) if cfg.get("random_nets") else {}
    if world:
        from agingnet.world.weights import weight_path

        arc_path, dex_path = str(weight_path("arcface")), str(weight_path("dex"))
    else:
        arc_path = _weights_or_random("arcface", w.get("arcface"), allow)
        dex_path = _weights_or_random("dex", w.get("dex"), allow)
    arcface = build_arcface(path=arc_path) if arc_path else build_arcface(**rnd.get("arcface", {}))
    dex = build_dex(path=dex_path) if dex_path else build_dex(**rnd.get("dex", {}))
    lp = cfg.get("lpips_backbone_pretrained", "auto")
    if lp == "auto":
        hub = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE
        if hub.is_file():
            lp = True
        elif allow or world:
            log.warning("%s not in the torch hub cache: LPIPS on a RANDOM AlexNet", hub)
            lp = False
        else:
            raise FileNotFoundError(f"LPIPS needs {hub} ($TORCH_HOME/hub/checkpoints): copy AlexNet's "
                                    f"weights there, or set lpips_backbone_pretrained=false or "
                                    f"allow_random_nets=true")
    used = {"arcface": "world" if world else arc_path or "random", "dex": "world" if world else dex_path or "random",
            "lpips": "alex v0.1" + ("" if lp else " (random backbone)")}
    lpips = build_lpips(backbone_pretrained=bool(lp))
    return FrozenNets(arcface=arcface, dex=dex, lpips=lpips).to(device), used


def _use_world_nets(cfg: DictConfig, actor: dict[str, Any] | None) -> bool:
    v = cfg.get("world_nets", "auto")
    if v == "auto":
        return actor is not None
    if not isinstance(v, bool):
        raise ValueError(f"world_nets must be auto, true or false, got {v!r}")
    return v


def _baseline_path(baseline: Any) -> str | None:
    """``baseline=`` as a checkpoint path: ``world`` is the shipped global aging model."""
    if baseline in (None, "", "null"):
        return None
    if str(baseline) == "world":
        from agingnet.world.weights import weight_path

        return str(weight_path("sam"))
    return str(baseline)


class IdentityFeatures(nn.Module):
    """torchmetrics feature extractor on IR-SE50: images in [0,1] → f(2x − 1) [B,D] (num_features = D)."""

    def __init__(self, nets: FrozenNets, dim: int):
        super().__init__()
        self.nets, self.num_features = nets, int(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.nets.embed_face(x.float() * 2 - 1)


def make_fid(cfg: DictConfig, nets: FrozenNets, n_images: int, dim: int) -> tuple[Any, Any, str]:
    """(FID, KID, status) factories' first instances, or (None, None, "skipped: <why>")."""
    if not cfg.get("fid", False):
        return None, None, "off (fid=false)"
    if n_images < 2:
        return None, None, f"skipped: FID/KID need at least 2 images, got {n_images}"
    kind = cfg.get("fid_features", "inception")
    if kind not in ("inception", "arcface"):
        raise ValueError(f"fid_features must be inception or arcface, got {kind!r}")
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        feat: Any = 2048 if kind == "inception" else IdentityFeatures(nets, dim)
        subset = max(2, min(int(cfg.get("kid_subset_size", 50)), n_images))
        with warnings.catch_warnings():  # "KID keeps all features in a buffer": bounded by the data set
            warnings.simplefilter("ignore", UserWarning)
            fid = FrechetInceptionDistance(feature=feat, normalize=True, reset_real_features=False)
            kid = KernelInceptionDistance(feature=feat, normalize=True, subset_size=subset,
                                          reset_real_features=False)
    except Exception as e:  # torch-fidelity missing (ModuleNotFoundError) or its weights not downloadable
        msg = f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        log.warning("FID/KID %s", msg)
        return None, None, msg
    return fid, kid, f"on ({kind} features, KID subset {subset})"


def _window(value: Any) -> tuple[float, float] | None:
    """``window=[lo,hi]`` (ages, lo ≤ hi) or None."""
    if value is None:
        return None
    vals = list(value) if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else [value]
    try:
        lo, hi = (float(v) for v in vals)
        ok = not any(isinstance(v, bool) for v in vals) and math.isfinite(lo) and math.isfinite(hi) and lo <= hi
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"window must be [lo, hi] in years with lo <= hi (e.g. window=[38,42]), got "
                         f"{OmegaConf.to_container(value) if OmegaConf.is_list(value) else value!r}")
    return lo, hi


def _in_size(net: nn.Module | None, actor: dict[str, Any] | None) -> int:
    """The image size a model is fed (its encoder's), or the world actor's photo size for the truth rows."""
    return int(getattr(net.encoder, "input_size", 256)) if net is not None else int((actor or {}).get("size", 256))


def _mean_std(v: Tensor) -> tuple[float, float]:
    return float(v.mean()), float(v.std(unbiased=False)) if v.numel() > 1 else 0.0


def _evaluate_model(cfg: DictConfig, net: nn.Module | None, label: str, files: list[Path], nets: FrozenNets,
                    dim: int, truth: Tensor | None, device: torch.device, window: tuple[float, float] | None = None,
                    actor: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (one per target age) of one aging model on ``files``, and what the meta needs from the pass;
    ``window``: the checked ``window=`` (:func:`_window`) for the ``in_window`` column. ``net=None``: the world
    ``actor``'s true faces stand in for the outputs (the ``truth`` rows)."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    ages = _age_list(cfg.target_ages)
    bs = int(cfg.get("batch_size", 8))
    strength, strict = strength_arg(cfg), bool(cfg.get("strict_pose", False))
    in_size = _in_size(net, actor)
    skipped: list[dict[str, str]] = []
    kept: list[Path] = []
    keys = ("pred", "cos", "lpips", "a_in") + (("gt_l2", "gt_ssim", "gt_blur") if truth is not None else ())
    per_age: dict[str, list[Tensor]] = {k: [] for k in keys}
    fid_pending: list[tuple[Tensor, Tensor]] = []  # (inputs [B,…], outputs [A,B,…]) in [0,1], for FID/KID
    truth_blurs = blur_stack(truth) if truth is not None else None  # [G,A,3,S,S]: the same for every batch

    def flush(batch: list[tuple[Path, Tensor]]) -> None:
        x = torch.stack([t for _, t in batch]).to(device)
        b, a = x.shape[0], len(ages)
        with torch.no_grad():
            a_in = nets.predict_age(x).clamp(0, 100)
            if net is None:  # [A,B,3,S,S]
                y = photo_truth(actor, [p for p, _ in batch], ages, in_size).to(device)
            else:
                y = age_batch(net, x, ages, a_in, strength, strict, output_size=in_size)
            flat = y.flatten(0, 1)
            pred = nets.predict_age(flat).view(a, b)
            fx = nets.embed_face(x)
            cos = (nets.embed_face(flat).view(a, b, -1) * fx.unsqueeze(0)).sum(-1)
            lp = nets.lpips(flat, x.repeat(a, 1, 1, 1)).view(a, b)
            if truth is not None:  # truth [A,3,S,S]: the same target for every image of the batch
                t_flat = truth[:, None].expand(-1, b, -1, -1, -1).flatten(0, 1)
                per_age["gt_l2"].append((flat - t_flat).pow(2).mean(dim=(1, 2, 3)).view(a, b).cpu())
                per_age["gt_ssim"].append(ssim((flat + 1) / 2, (t_flat + 1) / 2, data_range=1.0,
                                               reduction="none").view(a, b).cpu())
                fits = [blur_fit(y[k], truth_blurs[:, k:k + 1]) for k in range(a)]  # a loop over ages, not images
                per_age["gt_blur"].append(torch.stack(fits).cpu())
        per_age["pred"].append(pred.cpu())
        per_age["cos"].append(cos.cpu())
        per_age["lpips"].append(lp.cpu())
        per_age["a_in"].append(a_in.cpu())
        if cfg.get("fid", False):
            fid_pending.append((((x + 1) / 2).cpu(), ((y + 1) / 2).cpu()))
        kept.extend(p for p, _ in batch)

    min_size = int(cfg.get("min_size", 64))
    for batch in iter_batches(files, lambda p: to_input(load_face(p, min_size)[0], in_size), bs, skipped,
                              f"evaluate {label}", cfg.get("progress", True)):
        flush(batch)
    if not kept:
        raise ValueError(f"data={cfg.data_dir}: no usable image ({len(skipped)} skipped: "
                         f"{'; '.join(s['file'] + ': ' + s['reason'] for s in skipped[:3])})")

    cat = {k: torch.cat(v, dim=1) for k, v in per_age.items() if k != "a_in"}  # [A,N]
    pred = cat["pred"]
    target = torch.tensor(ages, dtype=pred.dtype).unsqueeze(1)
    mae = (pred - target).abs().mean(1)
    inside = ((pred >= window[0]) & (pred <= window[1])).float().mean(1) if window is not None else None
    fid_status = "off (fid=false)"
    rows = []
    for k, t in enumerate(ages):  # one row per target age
        pm, ps = _mean_std(pred[k])
        cm, cs = _mean_std(cat["cos"][k])
        rows.append({"model": label, "target_age": t, "n": len(kept), "age_mae": float(mae[k]),
                     "age_pred_mean": pm, "age_pred_std": ps,
                     "in_window": float(inside[k]) if inside is not None else None, "id_cos": cm, "id_cos_std": cs,
                     "lpips": float(cat["lpips"][k].mean()), "fid": None, "kid_mean": None, "kid_std": None,
                     "gt_l2": float(cat["gt_l2"][k].mean()) if truth is not None else None,
                     "gt_ssim": float(cat["gt_ssim"][k].mean()) if truth is not None else None,
                     "gt_blur": float(cat["gt_blur"][k].mean()) if truth is not None else None})
        fid, kid, fid_status = make_fid(cfg, nets, len(kept), dim)
        if fid is None:
            continue
        for xin, yout in fid_pending:
            fid.update(xin, real=True)
            kid.update(xin, real=True)
            fid.update(yout[k], real=False)
            kid.update(yout[k], real=False)
        km, ks = kid.compute()
        rows[-1].update(fid=float(fid.compute()), kid_mean=float(km), kid_std=float(ks))
    info = {"n_images": len(kept), "skipped": skipped, "fid": fid_status,
            "input_age_mean": float(torch.cat(per_age["a_in"]).mean()),
            "used_ema": bool(net.meta.get("used_ema", False)) if net is not None else False, "in_size": in_size}
    return rows, info


def run_evaluation(cfg: DictConfig | dict) -> dict[str, Any]:
    """Evaluate (module doc): writes the reports; returns {"rows": […], "mean": {…}, "meta": {…}}.

    ``mean`` holds the mean over the target ages of the checkpoint's rows; with ``baseline=`` also
    ``mean_baseline``, with ``truth=true`` also ``mean_truth``."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    for key in ("checkpoint", "data_dir", "output_dir"):
        if OmegaConf.is_missing(cfg, key) or not cfg.get(key):
            raise ValueError(f"{key}= is required (python -m agingnet.evaluate checkpoint=… "
                             f"data=<folder>)")
    t0 = time.perf_counter()
    ages = _age_list(cfg.target_ages)
    window = _window(cfg.get("window"))  # checked before any network is loaded
    if int(cfg.get("batch_size", 8)) < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.get('batch_size')}")
    strength, strict = strength_arg(cfg), bool(cfg.get("strict_pose", False))
    device = select_device(cfg.get("device", "auto"))
    actor = world_actor(cfg.data_dir)
    files = list_inputs(cfg.data_dir, what="data")
    if cfg.get("max_images"):
        files = files[: int(cfg.max_images)]
    models = {"checkpoint": str(cfg.checkpoint)}
    base = _baseline_path(cfg.get("baseline"))
    if base is not None:
        models["baseline"] = base
    want_truth = cfg.get("truth", False)
    if not isinstance(want_truth, bool):
        raise ValueError(f"truth must be true or false, got {want_truth!r}")
    if want_truth and actor is None:
        raise ValueError(f"truth=true needs a world actor's folder (a world.json written by 'python -m agingnet.world "
                         f"actor'), and data={cfg.data_dir} has none")
    loaded: dict[str, nn.Module | None] = {label: load_model(path, cfg.get("use_ema", "auto"), device)
                                           for label, path in models.items()}
    if want_truth:
        loaded["truth"] = None
    nets, used = build_frozen(cfg, device, world=_use_world_nets(cfg, actor))
    s_id = nets.id_input_size
    dim = int(nets.arcface(torch.zeros(1, 3, s_id, s_id, device=device)).shape[-1])

    rows: list[dict[str, Any]] = []
    infos: dict[str, dict[str, Any]] = {}
    truths: dict[int, Tensor] = {}
    for label, net in loaded.items():
        size = _in_size(net, actor)
        truth = None
        if actor is not None:
            if size not in truths:
                truths[size] = truth_images(int(actor["identity"]), ages, size, device)
            truth = truths[size]
        r, infos[label] = _evaluate_model(cfg, net, label, files, nets, dim, truth, device, window, actor)
        rows += r

    means = {label: {c: (sum(r[c] for r in rows if r["model"] == label) / len(ages)
                         if all(r[c] is not None for r in rows if r["model"] == label) else None)
                     for c in MEAN_COLUMNS} for label in loaded}
    first = infos["checkpoint"]
    meta = {"checkpoint": str(cfg.checkpoint), "used_ema": first["used_ema"], "baseline": models.get("baseline"),
            "data": str(cfg.data_dir), "n_images": first["n_images"], "skipped": first["skipped"],
            "target_ages": ages, "window": list(window) if window else None, "aging_strength": strength,
            "strict_pose": strict, "nets": used, "truth": "truth" in loaded,
            "fid": first["fid"], "input_age_mean": first["input_age_mean"], "device": str(device),
            "world": ({"identity": int(actor["identity"]), "seed": actor.get("seed"),
                       "renderer_version": actor["renderer_version"]} if actor is not None else None),
            "seconds": round(time.perf_counter() - t0, 3)}
    result = {"rows": rows, "mean": means["checkpoint"], "meta": meta}
    for label in ("baseline", "truth"):
        if label in means:
            result[f"mean_{label}"] = means[label]
    write_reports(result, Path(cfg.output_dir))
    print(format_markdown(result))
    return result


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate")
def _hydra_main(cfg: DictConfig) -> None:
    with user_errors("agingnet.evaluate"):
        run_evaluation(cfg)


def main() -> None:
    """Entry point. ``data`` names a config group of ``conf/``, so Hydra cannot take ``data=<folder>`` as a
    value: the command line's ``data=…`` is passed on as ``data_dir=…`` (the config key)."""
    sys.argv = [("data_dir=" + a[5:]) if a.startswith("data=") else a for a in sys.argv]
    _hydra_main()


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    main()


__all__ = ["run_evaluation", "build_frozen", "make_fid", "write_reports", "format_markdown", "COLUMNS",
           "IdentityFeatures", "MEAN_COLUMNS"]

"""The fork's run log ``checkpoints/timestamp.txt`` and a machine-readable ``metrics.jsonl`` (SPEC §8).

Lines (users grep the prefixes; each is produced by one pure function below):

    phase3: fixed_age=40 jitter=2 miner_window=[38,42] lr=1.5e-05 resume=<init_from|none> step=<abs step>
    used_ema=1 id=0.134 lpips=0.134 l2=0.009 step=59000            (after every validation)
    mb: prof=soft060 k=48 band=[0.25,0.60] cand≈11.0 simμ≈0.301 p75≈0.35 p90≈0.41 k_eff=37.5 floor=0.20
                                                                      (contrastive_id present)
    roi: pairs_eyes=2 pairs_mouth=2                                   (roi_id present)
    AGE-LOCK: output age 45.1 outside [38,42]                         (val mean output age outside the window)
    **Best**: Step - 59000, Loss - 0.373                              (new lowest ``monitor``)
    {"total": 0.373, "real/id": 0.134, ...}                           (the validation metrics of that best)
    PHASE3: plateau step=N best_step=M id_min_step=K                  (written by PlateauCallback)

Miner and ROI figures are means over the training steps since the previous validation (validation passes run the
losses too and would overwrite ``last_stats``). ``metrics.jsonl`` gets one JSON object per validation: ``step``
(the fork's absolute step), ``global_step``, every ``val/*`` metric, ``used_ema``, ``best``, the interval means
``mb/<stat>``, ``roi/<stat>``, ``train/real/id_mean`` and ``nan_skips`` (steps skipped by the NaN guard so far).
Every write appends and flushes; only rank 0 writes. A resume first truncates both files to their sizes at the
checkpoint (see ``on_fit_start``).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from agingnet.callbacks.ema import find_ema
from agingnet.io import atomic_write
from agingnet.report import age_in_window

# ---------------------------------------------------------------- pure line formats


def _num(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v.detach().cpu()) if torch.is_tensor(v) else float(v)
    return v


def format_phase3_line(fixed_age: int | None, jitter: int, window: Sequence[int] | None, lr: float,
                       resume: str | None, step: int) -> str:
    """``phase3: fixed_age=40 jitter=2 miner_window=[38,42] lr=1.5e-05 resume=… step=…``."""
    fa = "none" if fixed_age is None else str(int(fixed_age))
    win = "none" if window is None else f"[{int(window[0])},{int(window[1])}]"
    return (f"phase3: fixed_age={fa} jitter={int(jitter or 0)} miner_window={win} lr={float(lr):g} "
            f"resume={resume or 'none'} step={int(step)}")


def format_eval_line(used_ema: bool | float, id_: float, lpips: float, l2: float, step: int | None = None) -> str:
    """``used_ema=1 id=0.134 lpips=0.134 l2=0.009`` (3 decimals, as the fork) plus `` step=N``."""
    s = f"used_ema={int(round(float(used_ema)))} id={id_:.3f} lpips={lpips:.3f} l2={l2:.3f}"
    return s if step is None else f"{s} step={int(step)}"


def format_mb_line(profile: str, stats: Mapping[str, float], k: int | None = None,
                   band: Sequence[float] | None = None) -> str:
    """``mb: prof=soft060 k=48 band=[0.25,0.60] cand≈11.0 simμ≈0.301 p75≈0.35 p90≈0.41 k_eff=37.5 floor=0.20``.

    ``k`` and ``band`` are the *configured* values, as the fork prints them (greps of the seed's logs rely on it);
    what the miner actually used is appended: ``k_eff`` (mean ``k_effective``) and ``floor`` (mean relaxed lower
    band edge ``band_min``), each only when the statistics hold it."""
    def num(key: str, fmt: str) -> str:  # "n/a": the contrastive window was never active in the interval
        v = float(stats.get(key, math.nan))
        return "n/a" if math.isnan(v) else format(v, fmt)

    kstr = "?" if k is None else str(int(k))
    lo, hi = band if band is not None else (math.nan, math.nan)
    line = (f"mb: prof={profile} k={kstr} band=[{float(lo):.2f},{float(hi):.2f}] "
            f"cand≈{num('candidate_count', '.1f')} simμ≈{num('sim_mean', '.3f')} p75≈{num('sim_p75', '.2f')} "
            f"p90≈{num('sim_p90', '.2f')}")
    if "k_effective" in stats:
        line += f" k_eff={num('k_effective', '.1f')}"
    if "band_min" in stats:
        line += f" floor={num('band_min', '.2f')}"
    return line


def format_roi_line(stats: Mapping[str, float]) -> str:
    """``roi: pairs_eyes=2 pairs_mouth=2`` from ``roi_pairs_<region>`` values (``:g``, means may be fractional)."""
    parts = [f"pairs_{k[len('roi_pairs_'):]}={float(v):.3g}" for k, v in stats.items() if k.startswith("roi_pairs_")]
    return "roi: " + " ".join(parts)


def format_age_lock_line(output_age: float, window: Sequence[int]) -> str:
    """``AGE-LOCK: output age 45.1 outside [38,42]``: the validation's mean output age left the window."""
    lo, hi = int(window[0]), int(window[1])
    return f"AGE-LOCK: output age {float(output_age):.1f} outside [{lo},{hi}]"


def format_best_lines(step: int, loss: float, metrics: Mapping[str, float]) -> list[str]:
    """``**Best**: Step - N, Loss - 0.373`` and the metrics dict (``val/`` stripped, 6 significant digits)."""
    d = {k[4:] if k.startswith("val/") else k: float(f"{float(v):.6g}") for k, v in sorted(metrics.items())}
    return [f"**Best**: Step - {int(step)}, Loss - {float(loss):.3f}", json.dumps(d)]


def format_plateau_line(step: int, best_step: int | None, id_min_step: int | None) -> str:
    """``PHASE3: plateau step=N best_step=M id_min_step=K``."""
    return f"PHASE3: plateau step={int(step)} best_step={best_step} id_min_step={id_min_step}"


# ---------------------------------------------------------------- helpers reading the module


def _terms(pl_module: Any) -> Mapping[str, Any]:
    terms = getattr(getattr(pl_module, "loss", None), "terms", None)
    return terms if terms is not None else {}


def _miner_window(pl_module: Any) -> tuple[int, int] | None:
    terms = _terms(pl_module)
    term = terms["contrastive_id"] if "contrastive_id" in terms else None
    if term is not None and hasattr(term, "apply_min_age"):
        return int(round(term.apply_min_age)), int(round(term.apply_max_age))
    sampler = getattr(pl_module, "sampler", None)
    return getattr(sampler, "window", None)


class RunLogCallback(Callback):
    """Appends the fork's lines to ``dirpath/filename`` and one JSON object per validation to
    ``dirpath/metrics_file`` (see the module docstring)."""

    def __init__(self, dirpath: str, filename: str = "timestamp.txt", metrics_file: str = "metrics.jsonl",
                 monitor: str = "val/total"):
        super().__init__()
        self.dirpath = Path(dirpath)
        self.path, self.metrics_path = self.dirpath / filename, self.dirpath / metrics_file
        self.monitor = monitor
        self.best: float | None = None
        self.best_step: int | None = None
        self._acc: dict[str, list[float]] = defaultdict(list)
        self._rank0 = True
        self._resume_sizes: dict[str, int] | None = None
        self._step: int | None = None

    # ---------------------------------------------------------------- writing
    def write_line(self, line: str) -> None:
        """Append one line (flushed) to the run log."""
        if not self._rank0:
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line.rstrip("\n") + "\n")
            f.flush()

    def write_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one JSON object (flushed) to ``metrics.jsonl``."""
        if not self._rank0:
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(dict(record), sort_keys=True) + "\n")
            f.flush()

    # ---------------------------------------------------------------- hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._rank0 = bool(getattr(trainer, "is_global_zero", True))

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Writes the header. On a resume, the logs are first brought back to what they held when the checkpoint
        was written (lines of the interrupted steps after it are dropped, a torn last line included; into a new
        run folder the checkpoint's run log is copied up to that point), so the resumed run's logs read like an
        uninterrupted run's plus the ``phase3: … resume=<ckpt> step=N`` header. ``resume=`` names the Lightning
        checkpoint of a resume, else the base of ``init_from`` (the fork's ``resume_checkpoint``)."""
        sizes, self._resume_sizes = self._resume_sizes, None
        if sizes and self._rank0:
            src_dir = Path(str(getattr(trainer, "ckpt_path", "") or "")).parent
            for path, size in ((self.path, sizes.get("log_bytes")), (self.metrics_path, sizes.get("metrics_bytes"))):
                if size is None:
                    continue
                if path.is_file() and path.stat().st_size > size:
                    with open(path, "r+b") as f:
                        f.truncate(size)
                elif not path.exists() and (src_dir / path.name).is_file():
                    data = (src_dir / path.name).read_bytes()[:size]
                    atomic_write(path, lambda f, d=data: f.write(d))
        sampler = getattr(pl_module, "sampler", None)
        hp = getattr(pl_module, "hparams", {})
        opt = hp.get("optimizer") if isinstance(hp, Mapping) else None
        lr = opt.get("lr", math.nan) if isinstance(opt, Mapping) else math.nan
        ckpt = getattr(trainer, "ckpt_path", None) if sizes else None
        resume = ckpt or (hp.get("init_from") if isinstance(hp, Mapping) else None)
        # the global step is restored after on_fit_start: a resume takes its step from the saved state
        step = sizes.get("step") if sizes and sizes.get("step") is not None else getattr(
            pl_module, "abs_step", trainer.global_step)
        self.write_line(format_phase3_line(getattr(sampler, "fixed_age", None), getattr(sampler, "jitter", 0),
                                           _miner_window(pl_module), lr, str(resume) if resume else None,
                                           int(step)))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._step = int(getattr(pl_module, "abs_step", trainer.global_step))
        terms = _terms(pl_module)
        for name, prefix in (("contrastive_id", "mb/"), ("roi_id", "roi/")):
            if name in terms:
                for k, v in (getattr(terms[name], "last_stats", None) or {}).items():
                    if isinstance(v, (int, float)) and math.isfinite(float(v)):
                        self._acc[prefix + k].append(float(v))
        tid = trainer.callback_metrics.get("train/real/id")
        if tid is not None:
            self._acc["train/real/id_mean"].append(float(_num(tid)))

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if getattr(trainer, "sanity_checking", False):
            return
        ema = find_ema(trainer)
        if ema is not None:
            ema.restore(pl_module)
        step = int(getattr(pl_module, "abs_step", trainer.global_step))
        self._step = step
        val = {k: _num(v) for k, v in trainer.callback_metrics.items()
               if k.startswith("val/") and (not torch.is_tensor(v) or v.numel() == 1)}
        means = {k: sum(v) / len(v) for k, v in self._acc.items() if v}
        self._acc.clear()
        used = val.get("val/used_ema", float(getattr(pl_module, "using_ema", False)))
        self.write_line(format_eval_line(used, val.get("val/real/id", math.nan), val.get("val/real/lpips", math.nan),
                                         val.get("val/real/l2", math.nan), step))
        terms = _terms(pl_module)
        if "contrastive_id" in terms:
            t = terms["contrastive_id"]
            cfg = getattr(t, "cfg", None)
            mb = {k[3:]: v for k, v in means.items() if k.startswith("mb/")}
            self.write_line(format_mb_line(str(getattr(t, "profile", "?")), mb, getattr(cfg, "k", None),
                                           (getattr(cfg, "min_sim", math.nan), getattr(cfg, "max_sim", math.nan))))
        if "roi_id" in terms:
            roi = {k[4:]: v for k, v in means.items() if k.startswith("roi/roi_pairs_")}
            if not roi:
                roi = {k: v for k, v in (getattr(terms["roi_id"], "last_stats", None) or {}).items()
                       if k.startswith("roi_pairs_")}
            self.write_line(format_roi_line(roi))
        window = getattr(getattr(pl_module, "sampler", None), "window", None)
        out_age = val.get("val/aging/output_age")
        if window is not None and out_age is not None and not age_in_window(out_age, window):
            self.write_line(format_age_lock_line(out_age, window))
        score = val.get(self.monitor)
        is_best = score is not None and math.isfinite(score) and (self.best is None or score < self.best)
        if is_best:  # the same rule as the best exports: diverged weights are never "best"
            from agingnet.callbacks.fork_export import diverged

            is_best = diverged(pl_module, ema) is None
        if is_best:
            self.best, self.best_step = score, step
            for line in format_best_lines(step, score, val):
                self.write_line(line)
        record = {"step": step, "global_step": int(trainer.global_step), "time": time.time(),
                  "used_ema": int(round(used)), "best": bool(is_best),
                  "nan_skips": int(getattr(pl_module, "nan_skips", 0) or 0), **val, **means}
        self.write_metrics(record)

    def state_dict(self) -> dict[str, Any]:
        """Best so far, the interval accumulators (a resume between two validations averages the same steps), and
        the byte sizes of both logs and the step at the save (a resume truncates the logs back to these sizes and
        names that step in its header)."""
        size = {k: p.stat().st_size if p.is_file() else 0
                for k, p in (("log_bytes", self.path), ("metrics_bytes", self.metrics_path))}
        return {"best": self.best, "best_step": self.best_step, "acc": {k: list(v) for k, v in self._acc.items()},
                "step": self._step, **size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.best_step = state_dict.get("best"), state_dict.get("best_step")
        self._acc = defaultdict(list, {k: list(v) for k, v in (state_dict.get("acc") or {}).items()})
        self._resume_sizes = {k: state_dict[k] for k in ("log_bytes", "metrics_bytes", "step") if k in state_dict}


def find_run_log(trainer: Any) -> RunLogCallback | None:
    """The trainer's :class:`RunLogCallback`, if any."""
    return next((c for c in getattr(trainer, "callbacks", []) if isinstance(c, RunLogCallback)), None)

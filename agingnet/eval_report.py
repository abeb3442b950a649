"""The reports of :mod:`agingnet.evaluate`: ``metrics.csv`` (a row per model and target age), ``metrics.json``
and ``metrics.md`` (the same rows, each model's mean over the target ages, and what was evaluated)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from agingnet.viz import save_text

COLUMNS = ("model", "target_age", "n", "age_mae", "age_pred_mean", "age_pred_std", "in_window", "id_cos",
           "id_cos_std", "lpips", "fid", "kid_mean", "kid_std", "gt_l2", "gt_ssim", "gt_blur")
MEAN_COLUMNS = COLUMNS[3:]  # averaged over the target ages, per model


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}" if math.isfinite(v) else str(v)
    return str(v)


def format_markdown(result: dict[str, Any]) -> str:
    """A markdown report: what was evaluated, then one table row per target age and the mean."""
    m = result["meta"]
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    body = "".join("| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |\n" for r in result["rows"])
    mean = ""
    for label, key in (("checkpoint", "mean"), ("baseline", "mean_baseline"), ("truth", "mean_truth")):
        if key in result:
            vals = " | ".join(_fmt(result[key].get(c)) for c in MEAN_COLUMNS)
            mean += f"| {label} | mean | {m['n_images']} | {vals} |\n"
    skipped = "".join(f"- skipped {s['file']}: {s['reason']}\n" for s in m["skipped"])
    return (f"# agingnet evaluation\n\ncheckpoint `{m['checkpoint']}` (used_ema={int(m['used_ema'])}), data "
            f"`{m['data']}`: {m['n_images']} images, aging_strength={m['aging_strength']}, "
            f"strict_pose={m['strict_pose']}"
            + (f", baseline `{m['baseline']}`" if m.get("baseline") else "")
            + (f"\n\nworld actor {m['world']['identity']}: gt_l2/gt_ssim/gt_blur against its rendered truth"
               if m.get("world") else "")
            + f"\n\nnetworks: IR-SE50 {m['nets']['arcface']}, "
            f"DEX {m['nets']['dex']}, LPIPS {m['nets']['lpips']}; FID/KID {m['fid']}\n\n"
            f"{head}{body}{mean}\n{skipped}")


def write_reports(result: dict[str, Any], out: Path) -> dict[str, Path]:
    """``metrics.csv`` (a row per target age), ``metrics.json`` and ``metrics.md``, written atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in result["rows"]:
        w.writerow({c: "" if r[c] is None else r[c] for c in COLUMNS})
    return {"csv": save_text(buf.getvalue(), out / "metrics.csv"),
            "json": save_text(json.dumps(result, indent=2) + "\n", out / "metrics.json"),
            "md": save_text(format_markdown(result), out / "metrics.md")}


__all__ = ["COLUMNS", "MEAN_COLUMNS", "format_markdown", "write_reports"]

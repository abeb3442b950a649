# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Inspect an agingnet run
#
# Loads a run folder's validation log `checkpoints/metrics.jsonl` (one JSON object per validation) and its
# TensorBoard scalars (`tensorboard/events.out.tfevents.*`, read with tensorboard's `EventAccumulator`),
# plots the curves and gathers the age strips (`strips/*.png` written by `python -m agingnet.infer`, and the
# training grids `images/*.png` of the ImageLogger). Everything is saved under `<RUN_DIR>/inspect/`.
#
# Script: `python notebooks/inspect_run.py RUN_DIR [OUT_DIR]`. Notebook (jupytext): set
# `AGINGNET_RUN=<RUN_DIR>` before starting the kernel, or edit `RUN_DIR` below.

# %%
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

args = [a for a in sys.argv[1:] if not a.startswith("-")] if "ipykernel" not in sys.modules else []
RUN_DIR = Path(args[0] if args else os.environ.get("AGINGNET_RUN", "outputs/demo/runs/latest")).expanduser()
OUT = Path(args[1]) if len(args) > 1 else RUN_DIR / "inspect"
if not RUN_DIR.is_dir():
    raise SystemExit(f"inspect_run: run folder not found: {RUN_DIR}")
OUT.mkdir(parents=True, exist_ok=True)
STEP_KEYS = ("abs_step", "step", "global_step")
NOT_CURVES = {*STEP_KEYS, "time", "timestamp", "epoch"}  # bookkeeping numbers, not metrics


def atomic_write(path: Path, write) -> Path:
    """``write(tmp)`` to a temporary file next to ``path``, then ``os.replace`` (no half-written outputs)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


print(f"run folder: {RUN_DIR}\noutputs:    {OUT}")

# %% [markdown]
# ## Validation log (`checkpoints/metrics.jsonl`)

# %%
metrics_file = RUN_DIR / "checkpoints" / "metrics.jsonl"
rows: list[dict] = []
bad_lines = 0
if metrics_file.is_file():
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            bad_lines += 1
            continue
        if isinstance(obj, dict):
            rows.append(obj)
print(f"{metrics_file}: {len(rows)} rows" + (f", {bad_lines} unreadable lines" if bad_lines else "")
      if metrics_file.is_file() else f"{metrics_file}: not found")


def step_of(row: dict, i: int) -> float:
    """The row's step (the first of abs_step, step, global_step present), else its index."""
    return next((float(row[k]) for k in STEP_KEYS if isinstance(row.get(k), (int, float))), float(i))


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


metric_series: dict[str, list[tuple[float, float]]] = {}
for i, row in enumerate(rows):
    for k, v in row.items():
        if k not in NOT_CURVES and is_number(v):
            metric_series.setdefault(k, []).append((step_of(row, i), float(v)))

# %% [markdown]
# ## TensorBoard scalars

# %%
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

tb_series: dict[str, list[tuple[float, float]]] = {}
event_dirs = sorted({p.parent for p in RUN_DIR.rglob("events.out.tfevents.*") if OUT not in p.parents})
for d in event_dirs:
    acc = EventAccumulator(str(d), size_guidance={"scalars": 0})
    acc.Reload()
    for tag in acc.Tags().get("scalars", []):
        if tag in NOT_CURVES:
            continue
        tb_series.setdefault(tag, []).extend((float(e.step), float(e.value)) for e in acc.Scalars(tag))
for tag in tb_series:
    tb_series[tag].sort()
print(f"TensorBoard: {len(event_dirs)} event folders, {len(tb_series)} scalar tags")

# %%
PRIORITY = ("train/loss", "val/total", "train/real/id", "val/real/id", "val/aging/mae", "val/aging/in_window",
            "val/aging/output_age", "train/real/contrastive_id", "train/real/roi_id", "train/real/lpips",
            "lr-Ranger", "val/used_ema")


def plot_series(series: dict[str, list[tuple[float, float]]], path: Path, title: str, max_panels: int = 16):
    """One panel per series (priority tags first), saved to ``path``; returns the plotted tags."""
    tags = [t for t in PRIORITY if t in series] + sorted(t for t in series if t not in PRIORITY)
    tags = tags[:max_panels]
    if not tags:
        return []
    cols = min(4, len(tags))
    nrows = math.ceil(len(tags) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.8 * nrows), squeeze=False)
    for ax, tag in zip(axes.flat, tags):
        xs, ys = zip(*series[tag])
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None, lw=1)
        ax.set_title(tag, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tags):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.show() if "ipykernel" in sys.modules else plt.close(fig)
    return tags


plotted_tb = plot_series(tb_series, OUT / "curves_tensorboard.png", f"TensorBoard scalars — {RUN_DIR.name}")
plotted_metrics = plot_series(metric_series, OUT / "curves_metrics.png", f"metrics.jsonl — {RUN_DIR.name}")

# %% [markdown]
# ## Age strips and training grids

# %%
strips = sorted(p for p in RUN_DIR.rglob("strips/*.png") if OUT not in p.parents)
grids = sorted((RUN_DIR / "images").glob("*.png")) if (RUN_DIR / "images").is_dir() else []


def contact_sheet(paths: list[Path], path: Path, width: int = 1024, max_images: int = 12) -> Path | None:
    """Images stacked vertically, each scaled to ``width`` px wide (the first ``max_images``)."""
    if not paths:
        return None
    ims = []
    for p in paths[:max_images]:
        with Image.open(p) as im:
            im = im.convert("RGB")
            ims.append(im.resize((width, max(1, round(im.height * width / im.width)))))
    sheet = Image.new("RGB", (width, sum(i.height for i in ims)), (0, 0, 0))
    y = 0
    for im in ims:
        sheet.paste(im, (0, y))
        y += im.height
    return atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))


strip_sheet = contact_sheet(strips, OUT / "strips.png")
grid_sheet = contact_sheet(grids[-4:], OUT / "training_grids.png")
if "ipykernel" in sys.modules:
    from IPython.display import display

    for p in (strip_sheet, grid_sheet):
        if p is not None:
            display(Image.open(p))

# %% [markdown]
# ## Summary

# %%
summary = {
    "run_dir": str(RUN_DIR),
    "metrics_rows": len(rows),
    "metrics_bad_lines": bad_lines,
    "last_metrics": {k: v[-1][1] for k, v in metric_series.items()},
    "tensorboard_tags": sorted(tb_series),
    "tensorboard_last": {k: v[-1][1] for k, v in tb_series.items() if v},
    "plotted": {"tensorboard": plotted_tb, "metrics": plotted_metrics},
    "strips": [str(p) for p in strips],
    "training_grids": [str(p) for p in grids],
    "files": sorted(p.name for p in OUT.iterdir() if p.name != "summary.json"),
}
summary_text = json.dumps(summary, indent=2) + "\n"
atomic_write(OUT / "summary.json", lambda tmp: tmp.write_text(summary_text, encoding="utf-8"))
print(f"{len(rows)} validation rows, {len(tb_series)} TensorBoard tags, {len(strips)} age strips, "
      f"{len(grids)} training grids → {OUT}")
for k in ("val/total", "val/aging/mae", "val/real/id"):
    if k in summary["tensorboard_last"] or k in summary["last_metrics"]:
        print(f"  last {k} = {summary['last_metrics'].get(k, summary['tensorboard_last'].get(k)):.4f}")

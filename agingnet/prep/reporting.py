"""``prep report DATA``: counts per 5-year age bin for shot_train / shot_test, an age histogram and a contact
sheet of every face labelled with its age (``DATA/report/``), to look at the set before training."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw

from agingnet.io import atomic_write, atomic_write_json, atomic_write_text
from agingnet.prep.splitting import BIN_YEARS, aged_files

SPLITS = ("shot_train", "shot_test")


def bin_label(b: int) -> str:
    return f"{b * BIN_YEARS}-{b * BIN_YEARS + BIN_YEARS - 1}"


def _histogram(ages: dict[str, list[int]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    edges = list(range(0, 105, BIN_YEARS))
    ax.hist([ages[s] for s in SPLITS], bins=edges, stacked=True, label=["train", "test"])
    ax.set_xlabel("age (years)")
    ax.set_ylabel("photos")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def _contact_sheet(items: list[tuple[Path, int, str]], path: Path, tile: int = 128, cols: int = 8) -> None:
    rows = max(1, -(-len(items) // cols))
    sheet = Image.new("RGB", (cols * tile, rows * (tile + 16)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (p, age, split) in enumerate(items):
        x, y = (k % cols) * tile, (k // cols) * (tile + 16)
        with Image.open(p) as im:
            sheet.paste(im.convert("RGB").resize((tile, tile), Image.Resampling.LANCZOS), (x, y))
        draw.text((x + 4, y + tile + 2), f"{age} y  {split}", fill=(0, 0, 0))
    atomic_write(path, lambda f: sheet.save(f, format="PNG"))


def run_report(data: Path, log=print) -> dict:
    if not data.is_dir():
        raise FileNotFoundError(f"data folder not found: {data}")
    items: list[tuple[Path, int, str]] = []
    ages: dict[str, list[int]] = {}
    for s in SPLITS:
        if not (data / s).is_dir():
            raise FileNotFoundError(f"{data / s} not found: run `python -m agingnet.prep split` first")
        files = aged_files(data / s)
        ages[s] = [a for _, a in files]
        items += [(p, a, s.removeprefix("shot_")) for p, a in files]
    bins = sorted({a // BIN_YEARS for s in SPLITS for a in ages[s]})
    counts = {bin_label(b): {s: sum(a // BIN_YEARS == b for a in ages[s]) for s in SPLITS} for b in bins}
    lines = ["| age bin | train | test |", "|---|---|---|"]
    lines += [f"| {k} | {v['shot_train']} | {v['shot_test']} |" for k, v in counts.items()]
    lines.append(f"| all | {len(ages['shot_train'])} | {len(ages['shot_test'])} |")
    table = "\n".join(lines)
    out = data / "report"
    _histogram(ages, out / "age_histogram.png")
    _contact_sheet(items, out / "contact_sheet.png")
    atomic_write_text(table + "\n", out / "counts.md")
    report = {"counts": counts, "train": len(ages["shot_train"]), "test": len(ages["shot_test"]),
              "histogram": "report/age_histogram.png", "contact_sheet": "report/contact_sheet.png"}
    atomic_write_json(report, out / "report.json")
    log(table)
    log(f"wrote {out / 'age_histogram.png'} and {out / 'contact_sheet.png'}")
    return report

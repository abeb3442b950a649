"""Acceptance report of Phase-3 runs: ``python -m agingnet.report RUN_DIR [OTHER_RUN_DIR] [--out DIR]``.

Reads ``RUN_DIR/checkpoints/timestamp.txt`` (the fork's lines) and ``RUN_DIR/checkpoints/metrics.jsonl`` (one
record per validation), prints a markdown report, and writes ``report.md`` and ``curves.png`` to ``--out``
(default ``RUN_DIR/report``). The seed's acceptance criteria (SPEC §8), each PASS/FAIL:

1. **age lock**: the ``phase3:`` line names a window (fixed_age F, jitter J → [F−J, F+J]), no ``AGE-LOCK:`` line
   was written, and every validation's mean output age ``val/aging/output_age`` lies in the window (the mean: see
   :func:`age_in_window`). The per-image share ``val/aging/in_window`` is listed.
2. **plateau markers**: at least one ``PHASE3: plateau`` line.
3. **identity trend**: with v_1…v_n the validation identity losses ``val/real/id`` in step order and window
   w = min(window, n − 1) (default window 3), the rolling means m_j = mean(v_j … v_{j+w−1}), j = 1…n−w+1, are
   non-increasing up to a tolerance: max_j (m_{j+1} − m_j) ≤ tol · m_1 (tol = 0.01, i.e. 1 % of the first
   window's mean). Needs n ≥ 2.
4. **ROI pairs**: every validation record carries ``roi/roi_pairs_<region>`` (training-interval means) and all
   are > 0.
5. **EMA evaluation**: at least one ``used_ema=`` line and all read ``used_ema=1``.

Two health checks (:func:`health_checks`) come first: **finite validations** (every ``val/total`` is a
finite number) and **skipped steps ≤ N** (``nan_skips`` of the last record, steps the NaN guard skipped;
``--max-skips``, default 10). A torn last line (a run killed while appending) is ignored and noted; a damaged
line elsewhere is an error.

Also listed: the best-validation snapshots (each ``**Best**`` event: step, total, id, lpips, l2, w_norm,
used_ema) and, with two runs, a comparison table taken at each run's best total.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agingnet.io import atomic_write_text

PHASE3_RE = re.compile(r"^phase3: fixed_age=(\S+) jitter=(\d+) miner_window=(\S+) lr=(\S+) resume=(\S+)")
PLATEAU_RE = re.compile(r"^PHASE3: plateau step=(\d+)")
EMA_RE = re.compile(r"^used_ema=(\d+)")
BEST_RE = re.compile(r"^\*\*Best\*\*: Step - (\d+), Loss - (\S+)")


@dataclass
class Run:
    """A parsed run folder."""

    path: Path
    lines: list[str]
    records: list[dict[str, Any]]
    window: tuple[int, int] | None = None
    plateau_steps: list[int] = field(default_factory=list)
    best_steps: list[int] = field(default_factory=list)
    age_lock_lines: list[str] = field(default_factory=list)
    used_ema: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name


def load_run(run_dir: str | Path) -> Run:
    """Parse ``checkpoints/timestamp.txt`` and ``checkpoints/metrics.jsonl`` of a run folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    log_path, jl_path = run_dir / "checkpoints" / "timestamp.txt", run_dir / "checkpoints" / "metrics.jsonl"
    for p in (log_path, jl_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing ({run_dir} is not an agingnet run folder)")
    notes = []
    text = log_path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    if text and not text.endswith("\n"):
        notes.append(f"{log_path.name}: the last line is incomplete (interrupted write): {lines[-1][:60]!r}")
    records = []
    raw_lines = jl_path.read_text(encoding="utf-8", errors="replace").splitlines()
    for i, raw in enumerate(raw_lines, 1):
        if raw.strip():
            try:
                records.append(json.loads(raw))
            except json.JSONDecodeError as e:
                if i == len(raw_lines):  # a torn last record: the run was killed while appending it
                    notes.append(f"{jl_path.name}:{i}: incomplete last record (interrupted write), ignored")
                    continue
                raise ValueError(f"{jl_path}:{i}: not JSON ({e.msg})") from None
    records.sort(key=lambda r: r.get("step", 0))
    run = Run(run_dir, lines, records, notes=notes)
    for line in lines:
        if m := PHASE3_RE.match(line):
            if m.group(1) != "none":
                f, j = int(m.group(1)), int(m.group(2))
                run.window = (f - j, f + j)
        elif m := PLATEAU_RE.match(line):
            run.plateau_steps.append(int(m.group(1)))
        elif m := EMA_RE.match(line):
            run.used_ema.append(int(m.group(1)))
        elif m := BEST_RE.match(line):
            run.best_steps.append(int(m.group(1)))
        elif line.startswith("AGE-LOCK:"):
            run.age_lock_lines.append(line)
    return run


def rolling_means(values: Sequence[float], window: int) -> list[float]:
    """m_j = mean(v_j … v_{j+w−1}) for j = 1 … n−w+1."""
    w = max(1, int(window))
    return [sum(values[j:j + w]) / w for j in range(len(values) - w + 1)]


def identity_trend(values: Sequence[float], window: int = 3, tol: float = 0.01) -> tuple[bool | None, str]:
    """Criterion 3 of the module docstring: (verdict or None when n < 2, explanation)."""
    n = len(values)
    if n < 2:
        return None, f"needs ≥ 2 validations, have {n}"
    w = min(window, n - 1)
    m = rolling_means(values, w)
    worst = max(b - a for a, b in zip(m, m[1:]))
    ok = worst <= tol * abs(m[0])
    return ok, f"rolling means (w={w}) {', '.join(f'{x:.4f}' for x in m)}; largest rise {worst:+.4g} " \
               f"(allowed {tol * abs(m[0]):.4g})"


def health_checks(run: Run, max_skips: int = 10) -> list[tuple[str, bool | None, str]]:
    """[(check, PASS/FAIL, detail)]: every validation total finite, and at most ``max_skips`` steps skipped by
    the NaN guard (``nan_skips`` of the records). A run failing either is not acceptable whatever its curves."""
    totals = [(r.get("step"), r.get("val/total")) for r in run.records]
    bad = [s for s, v in totals if not isinstance(v, (int, float)) or not math.isfinite(v)]
    skips = max([int(r.get("nan_skips", 0) or 0) for r in run.records] or [0])
    return [("finite validations", bool(run.records) and not bad,
             f"{len(totals)} validation(s); non-finite val/total at steps {bad[:10]}"),
            (f"skipped steps ≤ {max_skips}", skips <= max_skips,
             f"{skips} step(s) skipped with a non-finite loss or gradient")]


def age_in_window(output_age: float, window: Sequence[int]) -> bool:
    """The age lock: a validation's mean output age (DEX) lies in [lo, hi] (NaN never does). The mean, as the fork's
    line printed it, not each image: DEX's own error per photo (1.2 y on average on the demo actor's true faces)
    puts even the world actor's true face at age 38 below 38 on 3 of its 8 test photos (docs/BENCHMARKS.md, "The
    age lock"); ``val/aging/in_window`` keeps the per-image share for the record."""
    return int(window[0]) <= float(output_age) <= int(window[1])


def _ages(ages: Sequence[Any]) -> str:
    """``40.9, 40.1`` (the first and last 5 when there are more than 10)."""
    txt = [f"{a:.1f}" if isinstance(a, (int, float)) else "?" for a in ages]
    return ", ".join(txt if len(txt) <= 10 else [*txt[:5], "…", *txt[-5:]]) or "none"


def criteria(run: Run, window: int = 3, tol: float = 0.01) -> list[tuple[str, bool | None, str]]:
    """[(criterion, PASS/FAIL/None, detail)] for the seed's acceptance criteria."""
    out: list[tuple[str, bool | None, str]] = []
    ages = [r.get("val/aging/output_age") for r in run.records]
    bad = [r["step"] for r, a in zip(run.records, ages)
           if run.window is None or not isinstance(a, (int, float)) or not age_in_window(a, run.window)]
    ok = run.window is not None and not run.age_lock_lines and not bad and bool(run.records)
    shares = [r.get("val/aging/in_window") for r in run.records]
    share = f"{min(shares):.0%}" if shares and all(isinstance(v, (int, float)) for v in shares) else "n/a"
    out.append(("age lock", ok, f"window {list(run.window) if run.window else 'none'}; "
                f"{len(run.age_lock_lines)} AGE-LOCK line(s); mean output age outside at steps {bad[:10]}; "
                f"output ages {_ages(ages)}; fewest images inside {share}"))
    out.append(("plateau markers", bool(run.plateau_steps),
                f"{len(run.plateau_steps)} 'PHASE3: plateau' line(s) at steps {run.plateau_steps[:10]}"))
    ids = [float(r["val/real/id"]) for r in run.records if r.get("val/real/id") is not None]
    out.append(("identity trend", *identity_trend(ids, window, tol)))
    pairs = [{k: v for k, v in r.items() if k.startswith("roi/roi_pairs_")} for r in run.records]
    ok = bool(run.records) and all(p and all(v > 0 for v in p.values()) for p in pairs)
    lows = sorted({k[len("roi/roi_pairs_"):] for p in pairs for k, v in p.items() if v <= 0})
    out.append(("roi pairs > 0", ok, f"{sum(1 for p in pairs if p)}/{len(pairs)} validations with ROI stats; "
                f"regions at 0: {lows or 'none'}"))
    ok = bool(run.used_ema) and all(u == 1 for u in run.used_ema)
    out.append(("used_ema=1", ok, f"{sum(run.used_ema)}/{len(run.used_ema)} evaluation lines with used_ema=1"))
    return out


def _fmt_step(step: int) -> str:
    return f"{step / 1000:.1f}k" if step >= 1000 else str(step)


def _g(r: dict[str, Any], key: str, fmt: str = ".4g") -> str:
    v = r.get(key)
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(float(v), fmt)


def best_snapshots(run: Run) -> list[str]:
    """Seed-style lines ``59.0k: loss≈0.37341; id≈0.1343; lpips≈0.13434; l2≈0.00886; w_norm≈37.07; used_ema=1``."""
    by_step = {r["step"]: r for r in run.records}
    out = []
    for s in run.best_steps:
        r = by_step.get(s)
        if r is None:
            continue
        out.append(f"{_fmt_step(s)}: loss≈{_g(r, 'val/total', '.5g')}; id≈{_g(r, 'val/real/id')}; "
                   f"lpips≈{_g(r, 'val/real/lpips', '.5g')}; l2≈{_g(r, 'val/real/l2', '.3g')}; "
                   f"w_norm≈{_g(r, 'val/real/w_norm')}; used_ema={int(r.get('used_ema', 0))}")
    return out


def best_record(run: Run) -> dict[str, Any] | None:
    """The validation record with the lowest ``val/total``."""
    recs = [r for r in run.records if r.get("val/total") is not None]
    return min(recs, key=lambda r: r["val/total"]) if recs else None


def comparison_table(runs: Sequence[Run]) -> list[str]:
    """Markdown table: best total (and its step), id, lpips, l2, w_norm at that validation, step range."""
    rows = ["| run | best total | best step | id | lpips | l2 | w_norm | steps |",
            "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        b = best_record(run) or {}
        steps = f"{run.records[0]['step']}–{run.records[-1]['step']}" if run.records else "n/a"
        rows.append(f"| {run.name} | {_g(b, 'val/total', '.5g')} | {b.get('step', 'n/a')} | {_g(b, 'val/real/id')} | "
                    f"{_g(b, 'val/real/lpips')} | {_g(b, 'val/real/l2', '.3g')} | {_g(b, 'val/real/w_norm')} | "
                    f"{steps} |")
    return rows


def plot_curves(runs: Sequence[Run], path: Path) -> Path:
    """PNG: total, identity, lpips/l2 and output age vs the window; plateau markers as dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = [("val/total", "validation total"), ("val/real/id", "identity (real)"),
              ("val/real/lpips", "lpips (real)"), ("val/aging/output_age", "output age (DEX)")]
    for ax, (key, title) in zip(axes.flat, panels):
        for run in runs:
            pts = [(r["step"], r[key]) for r in run.records if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=run.name)
            for s in run.plateau_steps:
                ax.axvline(s, ls=":", lw=0.8, color="grey")
            if key == "val/aging/output_age" and run.window:
                ax.axhspan(run.window[0], run.window[1], color="green", alpha=0.1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def comparability_notes(run: Run) -> list[str]:
    """Why this run's ``val/total`` is not directly comparable with the fork's validation totals: the terms it
    sums (read from the records' ``val/<pass>/<term>`` keys) and the measurement differences agingnet fixes."""
    keys = set().union(*(r.keys() for r in run.records)) if run.records else set()
    terms = sorted({k.split("/")[2] for k in keys if k.startswith(("val/real/", "val/cycle/")) and k.count("/") == 2
                    and k.split("/")[2] not in ("total",)})
    notes = []
    extra = [t for t in ("roi_id", "nn_id", "contrastive_id") if t in terms]
    if extra:
        notes.append(f"`val/total` includes {', '.join(extra)} (every configured term is summed); the fork's "
                     f"validation total had no ROI-ID term, because the fork never switched ROI-ID on in S2/P3")
    notes.append("identity terms use IR-SE50 at its standard 112 px input; the fork ran it at 56 px with a stride-1 "
                 "first stage, so `id` and the identity terms read differently for the same images")
    notes.append("validation decodes with the generator's stored constant noise (deterministic); the fork's "
                 "validation forward drew random noise (SAM's default), so its totals carry noise of their own")
    notes.append("compare agingnet runs with each other by value; compare with the fork's numbers by trend only")
    return notes


def render(runs: Sequence[Run], png_name: str = "curves.png", window: int = 3, tol: float = 0.01,
           max_skips: int = 10) -> str:
    """The markdown report."""
    md = ["# Phase-3 acceptance report", ""]
    for run in runs:
        md += [f"## {run.name}", "", f"- folder: `{run.path}`", f"- validations: {len(run.records)}", "",
               "| criterion | verdict | detail |", "|---|---|---|"]
        for name, ok, detail in health_checks(run, max_skips) + criteria(run, window, tol):
            md.append(f"| {name} | {'n/a' if ok is None else 'PASS' if ok else 'FAIL'} | {detail} |")
        md += [f"- note: {n}" for n in run.notes]
        md += ["", "Why `val/total` is not directly comparable with the fork's numbers:", ""]
        md += [f"- {n}" for n in comparability_notes(run)]
        md += ["", "Best validation snapshots (from checkpoints/timestamp.txt):", ""]
        md += [f"- {s}" for s in best_snapshots(run)] or ["- none"]
        md.append("")
    if len(runs) > 1:
        md += ["## Comparison", ""] + comparison_table(runs) + [""]
    md += [f"![curves]({png_name})", ""]
    return "\n".join(md)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agingnet.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("other_run_dir", nargs="?")
    ap.add_argument("--out", default=None, help="output folder (default RUN_DIR/report)")
    ap.add_argument("--window", type=int, default=3, help="rolling window of the identity trend (validations)")
    ap.add_argument("--tol", type=float, default=0.01, help="allowed rise of the rolling identity mean (× first)")
    ap.add_argument("--max-skips", type=int, default=10, help="most steps the NaN guard may have skipped")
    args = ap.parse_args(argv)
    try:
        runs = [load_run(args.run_dir)] + ([load_run(args.other_run_dir)] if args.other_run_dir else [])
    except (FileNotFoundError, ValueError) as e:
        print(f"agingnet.report: error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else Path(args.run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(runs, out / "curves.png")
    text = render(runs, "curves.png", args.window, args.tol, args.max_skips)
    atomic_write_text(text, out / "report.md")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

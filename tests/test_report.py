"""agingnet.report on hand-written run folders: criteria verdicts, snapshots, comparison, files written."""

import json

import pytest

from agingnet import report


def _per(v, i):
    return v[i] if isinstance(v, list) else v


def _run(tmp_path, name, ids, in_window=1.0, plateau=True, ema=1, pairs=2.0, age_lock=False, fixed_age=40,
         output_age=40.0):
    """A run folder: ``in_window``/``output_age``/``ema``/``pairs`` are one value or one per validation
    (``ema=None``: no ``used_ema=`` line; ``pairs=None``: no ROI statistics in that record)."""
    ck = tmp_path / name / "checkpoints"
    ck.mkdir(parents=True)
    lines = [f"phase3: fixed_age={fixed_age} jitter=2 miner_window=[38,42] lr=1.5e-05 resume=/b.pt step=50500"]
    recs, best = [], None
    for i, v in enumerate(ids):
        step = 51000 + 500 * i
        total = 0.3 + v
        ema_i = _per(ema, i)
        if ema_i is not None:
            lines.append(f"used_ema={ema_i} id={v:.3f} lpips=0.134 l2=0.009 step={step}")
        rec = {"step": step, "val/total": total, "val/real/id": v, "val/real/lpips": 0.134, "val/real/l2": 0.009,
               "val/real/w_norm": 37.0, "val/aging/in_window": _per(in_window, i),
               "val/aging/output_age": _per(output_age, i), "used_ema": ema_i or 0}
        if _per(pairs, i) is not None:
            rec.update({"roi/roi_pairs_eyes": _per(pairs, i), "roi/roi_pairs_mouth": 2.0})
        if age_lock and i == 1:
            lines.append("AGE-LOCK: output age 45.1 outside [38,42]")
        if best is None or total < best:
            best = total
            lines += [f"**Best**: Step - {step}, Loss - {total:.3f}", json.dumps({"total": total})]
            rec["best"] = True
        if plateau and i == 2:
            lines.append(f"PHASE3: plateau step={step} best_step=51000 id_min_step=51000")
        recs.append(rec)
    (ck / "timestamp.txt").write_text("\n".join(lines) + "\n")
    (ck / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return tmp_path / name


def test_identity_trend_definition():
    # rolling means (w=3) of [0.20, 0.19, 0.18, 0.17, 0.18]: 0.19, 0.18, 0.1767 → non-increasing
    ok, detail = report.identity_trend([0.20, 0.19, 0.18, 0.17, 0.18])
    assert ok and "w=3" in detail
    # [0.15, 0.14, 0.16, 0.17]: w=3 → 0.15, 0.1567: rise 0.0067 > 1 % of 0.15 = 0.0015
    assert report.identity_trend([0.15, 0.14, 0.16, 0.17])[0] is False
    assert report.identity_trend([0.15, 0.14, 0.16, 0.17], tol=0.05)[0] is True  # 0.0067 ≤ 0.0075
    assert report.identity_trend([0.1])[0] is None
    assert report.rolling_means([1, 2, 3, 4], 2) == [1.5, 2.5, 3.5]


def test_passing_run(tmp_path):
    run = report.load_run(_run(tmp_path, "good", [0.20, 0.19, 0.18, 0.17]))
    verdicts = {name: ok for name, ok, _ in report.criteria(run)}
    assert verdicts == {"age lock": True, "plateau markers": True, "identity trend": True, "roi pairs > 0": True,
                        "used_ema=1": True}
    snaps = report.best_snapshots(run)
    assert snaps[0] == "51.0k: loss≈0.5; id≈0.2; lpips≈0.134; l2≈0.009; w_norm≈37; used_ema=1"
    assert len(snaps) == 4 and snaps[-1].startswith("52.5k: loss≈0.47;")


GOOD_IDS = [0.20, 0.19, 0.18, 0.17]
CRITERIA = ["age lock", "plateau markers", "identity trend", "roi pairs > 0", "used_ema=1"]


@pytest.mark.parametrize("failing,kw", [
    ("age lock", {"age_lock": True}),  # an AGE-LOCK: line
    ("age lock", {"output_age": [40.0, 37.9, 40.0, 40.0]}),  # one validation's mean output age below the window
    ("age lock", {"output_age": [40.0, 40.0, 40.0, float("nan")]}),  # a non-finite output age
    ("age lock", {"fixed_age": "none"}),  # no window named in the phase3: line
    ("plateau markers", {"plateau": False}),
    ("identity trend", {"ids": [0.15, 0.14, 0.16, 0.17]}),  # rolling means 0.15, 0.1567: +4.4 % > 1 %
    ("roi pairs > 0", {"pairs": [2.0, 0.0, 2.0, 2.0]}),  # one region at 0 in one validation
    ("roi pairs > 0", {"pairs": [2.0, 2.0, None, 2.0]}),  # a validation without ROI statistics
    ("used_ema=1", {"ema": [1, 0, 1, 1]}),  # one evaluation on the raw weights
    ("used_ema=1", {"ema": None}),  # no used_ema= line at all
], ids=["age_lock_line", "output_age", "output_age_nan", "no_window", "plateau", "identity_trend", "roi_zero",
        "roi_missing", "ema_0", "ema_none"])
def test_each_criterion_fails_alone(tmp_path, failing, kw):
    ids = kw.pop("ids", GOOD_IDS)
    run = report.load_run(_run(tmp_path, "bad", ids, **kw))
    verdicts = {name: ok for name, ok, _ in report.criteria(run)}
    assert verdicts == {c: c != failing for c in CRITERIA}
    assert f"| {failing} | FAIL |" in report.render([run])


def test_age_lock_is_on_the_mean_output_age_not_each_image(tmp_path):
    # the window is closed: 38 and 42 are inside; NaN never is
    assert [report.age_in_window(a, (38, 42)) for a in (37.99, 38, 40, 42, 42.01, float("nan"))] == \
        [False, True, True, True, False, False]
    # half of one validation's images outside the window, their mean inside: the lock holds, the share is listed
    run = report.load_run(_run(tmp_path, "half", GOOD_IDS, in_window=[1.0, 0.5, 1.0, 0.75],
                               output_age=[40.9, 39.3, 40.0, 41.2]))
    (name, ok, detail), = [c for c in report.criteria(run) if c[0] == "age lock"]
    assert ok is True
    assert "output ages 40.9, 39.3, 40.0, 41.2" in detail and "fewest images inside 50%" in detail


def test_cli_two_runs_writes_markdown_and_png(tmp_path, capsys):
    a = _run(tmp_path, "a", [0.20, 0.19, 0.18])
    b = _run(tmp_path, "b", [0.25, 0.22, 0.21])
    out = tmp_path / "rep"
    assert report.main([str(a), str(b), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert capsys.readouterr().out.strip() == text.strip()
    assert "| a | 0.48 | 52000 | 0.18 |" in text and "| b | 0.51 | 52000 | 0.21 |" in text
    assert "Best validation snapshots" in text and "| age lock | PASS |" in text
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_files_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="timestamp.txt: missing"):
        report.load_run(tmp_path)


def test_report_says_why_val_total_differs_from_the_forks(tmp_path):
    """The summed terms come from the records: ROI-ID is named only when the run's validation total holds it."""
    plain = report.load_run(_run(tmp_path, "plain", [0.20, 0.19]))
    notes = report.comparability_notes(plain)
    assert not any("roi_id" in n for n in notes)
    assert any("112 px" in n and "56 px" in n for n in notes) and any("constant noise" in n for n in notes)
    path = _run(tmp_path, "roi", [0.20, 0.19])
    recs = [json.loads(x) for x in (path / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        r["val/real/roi_id"] = 0.4
        r["val/real/roi_id/roi_pairs_eyes"] = 2.0  # a term's statistic, not a term
    (path / "checkpoints" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    notes = report.comparability_notes(report.load_run(path))
    assert any(n.startswith("`val/total` includes roi_id ") for n in notes), notes
    text = report.render([report.load_run(path)])
    assert "Why `val/total` is not directly comparable with the fork's numbers:" in text

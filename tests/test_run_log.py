"""RunLogCallback: each line format alone, then the callback writing timestamp.txt and metrics.jsonl."""

import json
from types import SimpleNamespace

import torch
from torch import nn

from agingnet.callbacks.run_log import (
    RunLogCallback,
    format_age_lock_line,
    format_best_lines,
    format_eval_line,
    format_mb_line,
    format_phase3_line,
    format_plateau_line,
    format_roi_line,
)


def test_phase3_line():
    assert format_phase3_line(40, 2, (38, 42), 1.5e-5, None, 50500) == \
        "phase3: fixed_age=40 jitter=2 miner_window=[38,42] lr=1.5e-05 resume=none step=50500"
    assert format_phase3_line(None, 0, None, 1e-4, "/b.pt", 0) == \
        "phase3: fixed_age=none jitter=0 miner_window=none lr=0.0001 resume=/b.pt step=0"


def test_eval_mb_roi_agelock_best_plateau_lines():
    assert format_eval_line(1.0, 0.13434, 0.13449, 0.00886) == "used_ema=1 id=0.134 lpips=0.134 l2=0.009"
    assert format_eval_line(0, 0.5, 0.25, 0.0, step=7) == "used_ema=0 id=0.500 lpips=0.250 l2=0.000 step=7"
    stats = {"k_effective": 48.0, "band_min": 0.25, "band_max": 0.6, "candidate_count": 11.0, "sim_mean": 0.30149,
             "sim_p75": 0.351, "sim_p90": 0.409}
    # the configured k and band under the fork's names (SPEC §8), what the miner used as extra fields
    stats = dict(stats, k_effective=37.5, band_min=0.2)
    assert format_mb_line("soft", stats, k=48, band=(0.25, 0.60)) == (
        "mb: prof=soft k=48 band=[0.25,0.60] cand≈11.0 simμ≈0.301 p75≈0.35 p90≈0.41 k_eff=37.5 floor=0.20")
    assert format_mb_line("soft060", {"candidate_count": 2.5}, k=8, band=(0.2, 0.6)).startswith(
        "mb: prof=soft060 k=8 band=[0.20,0.60] cand≈2.5 ")
    assert format_roi_line({"roi_pairs_eyes": 2.0, "roi_pairs_mouth": 1.5, "value": 3.0}) == \
        "roi: pairs_eyes=2 pairs_mouth=1.5"
    assert format_age_lock_line(45.06, (38, 42)) == "AGE-LOCK: output age 45.1 outside [38,42]"
    assert format_age_lock_line(37.94, (38, 42)) == "AGE-LOCK: output age 37.9 outside [38,42]"
    head, body = format_best_lines(59000, 0.37341, {"val/total": 0.37341, "val/real/id": 0.1343})
    assert head == "**Best**: Step - 59000, Loss - 0.373"
    assert json.loads(body) == {"real/id": 0.1343, "total": 0.37341}
    assert format_plateau_line(56000, 54000, 55100) == "PHASE3: plateau step=56000 best_step=54000 id_min_step=55100"


class _Term(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.last_stats = {}
        self.__dict__.update(kw)


def _fake(tmp_path):
    terms = nn.ModuleDict({
        "contrastive_id": _Term(profile="soft060", apply_min_age=38.0, apply_max_age=42.0,
                                cfg=SimpleNamespace(k=48, min_sim=0.25, max_sim=0.6)),
        "roi_id": _Term()})
    pl = SimpleNamespace(loss=SimpleNamespace(terms=terms), sampler=SimpleNamespace(fixed_age=40, jitter=2,
                         window=(38, 42)), hparams={"optimizer": {"lr": 1.5e-5}, "init_from": "/base.pt"},
                         abs_step=50500, using_ema=True)
    tr = SimpleNamespace(global_step=0, callback_metrics={}, callbacks=[], is_global_zero=True, sanity_checking=False)
    return pl, tr, terms


def test_callback_writes_lines_and_jsonl(tmp_path):
    pl, tr, terms = _fake(tmp_path)
    cb = RunLogCallback(str(tmp_path / "ck"))
    cb.setup(tr, pl, "fit")
    cb.on_fit_start(tr, pl)
    for i, cand in enumerate((10.0, 12.0)):  # two training steps: interval means cand = 11
        terms["contrastive_id"].last_stats = {"candidate_count": cand, "k_effective": 30.0, "sim_mean": 0.3,
                                              "sim_p75": 0.35, "sim_p90": 0.41, "band_min": 0.2, "band_max": 0.6}
        terms["roi_id"].last_stats = {"roi_pairs_eyes": 2.0, "roi_pairs_mouth": float(i + 1)}
        tr.callback_metrics = {"train/real/id": torch.tensor(0.2 + i * 0.1)}
        cb.on_train_batch_end(tr, pl, None, None, i)
    pl.abs_step = 50502
    tr.global_step = 2
    tr.callback_metrics = {"val/total": torch.tensor(0.4), "val/real/id": torch.tensor(0.134),
                           "val/real/lpips": torch.tensor(0.1343), "val/real/l2": torch.tensor(0.00886),
                           "val/used_ema": torch.tensor(1.0), "val/aging/in_window": torch.tensor(0.5),
                           "val/aging/output_age": torch.tensor(45.06)}
    terms["contrastive_id"].last_stats = {"applied_ratio": 0.0}  # validation overwrote it: must not be used
    cb.on_validation_end(tr, pl)
    tr.callback_metrics["val/total"] = torch.tensor(0.5)  # worse: no new **Best**
    tr.callback_metrics["val/aging/output_age"] = torch.tensor(39.3)  # mean inside, half the images outside: no line
    cb.on_validation_end(tr, pl)
    lines = (tmp_path / "ck" / "timestamp.txt").read_text().splitlines()
    assert lines[0] == "phase3: fixed_age=40 jitter=2 miner_window=[38,42] lr=1.5e-05 resume=/base.pt step=50500"
    assert lines[1] == "used_ema=1 id=0.134 lpips=0.134 l2=0.009 step=50502"
    # configured k/band under the fork's names; the miner's effective k and relaxed floor as extra fields
    assert lines[2] == ("mb: prof=soft060 k=48 band=[0.25,0.60] cand≈11.0 simμ≈0.300 p75≈0.35 p90≈0.41 "
                        "k_eff=30.0 floor=0.20")
    assert lines[3] == "roi: pairs_eyes=2 pairs_mouth=1.5"
    assert lines[4] == "AGE-LOCK: output age 45.1 outside [38,42]"
    assert lines[5] == "**Best**: Step - 50502, Loss - 0.400"
    assert json.loads(lines[6])["real/id"] == 0.134
    assert sum(ln.startswith("**Best**") for ln in lines) == 1
    assert sum(ln.startswith("AGE-LOCK") for ln in lines) == 1
    recs = [json.loads(x) for x in (tmp_path / "ck" / "metrics.jsonl").read_text().splitlines()]
    assert [r["best"] for r in recs] == [True, False]
    assert recs[0]["step"] == 50502 and recs[0]["used_ema"] == 1
    assert abs(recs[0]["mb/candidate_count"] - 11.0) < 1e-9 and abs(recs[0]["train/real/id_mean"] - 0.25) < 1e-6
    assert "mb/candidate_count" not in recs[1]  # the interval means were consumed by the first validation
    state = cb.state_dict()  # + the log sizes and step a resume truncates back to (test_reliability.py)
    assert {k: state[k] for k in ("best", "best_step", "acc")} == {"best": recs[0]["val/total"], "best_step": 50502,
                                                                  "acc": {}}


def test_non_rank_zero_writes_nothing(tmp_path):
    pl, tr, _ = _fake(tmp_path)
    tr.is_global_zero = False
    cb = RunLogCallback(str(tmp_path / "ck"))
    cb.setup(tr, pl, "fit")
    cb.on_fit_start(tr, pl)
    assert not (tmp_path / "ck" / "timestamp.txt").exists()


def test_mb_line_when_the_window_was_never_active():
    line = format_mb_line("soft060", {"candidate_count": float("nan"), "sim_mean": float("nan")}, k=48,
                          band=(0.25, 0.60))
    assert line == "mb: prof=soft060 k=48 band=[0.25,0.60] cand≈n/a simμ≈n/a p75≈n/a p90≈n/a"

"""Reliability (issue 13): the NaN guard, diverging runs, exact resume after a crash, a full disk, the frozen-output
cache keys, image decoding, the run log after interruptions, and the bad-input catalogue (one line, nothing written).

Everything runs on CPU with tiny networks. The catalogue runs the real Hydra app in-process (``agingnet.train.main``
with ``sys.argv`` set, as ``python -m agingnet.train`` does) to stay fast; one case runs as a subprocess to cover
the command line end to end. Real ``kill -9`` tests are in ``test_reliability_kill.py`` (slow).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from agingnet.config import compose_config, user_errors
from agingnet.frozen_cache import FrozenCache, content_keys
from agingnet.module import RunDiverged
from agingnet.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["experiment=phase3_oneshot_40", "debug=tiny", "callbacks.progress_bar=null", "callbacks.image_logger=null"]
# the NaN-guard runs: no validation, no exports, the Phase-3 loss stack's cheap half
GUARD = ["experiment=tiny_synthetic", "loss.roi_id=null", "loss.contrastive_id=null", "loss.nn_id=null",
         "trainer.max_steps=4", "trainer.limit_val_batches=0", "callbacks.progress_bar=null",
         "callbacks.image_logger=null", "callbacks.fork_export=null", "callbacks.model_checkpoint=null",
         "callbacks.last_checkpoint=null", "callbacks.plateau=null", "callbacks.run_log=null", "data.num_workers=0"]


# ---------------------------------------------------------------------------------------------------- helpers
class Probe(L.Callback):
    """Records the optimizer's step counter, LR, EMA updates and NaN skips at the end of fit."""

    def on_train_end(self, trainer, pl_module):
        group = trainer.optimizers[0].state_dict()["param_groups"][0]
        ema = next(c for c in trainer.callbacks if type(c).__name__ == "EMACallback")
        self.out = {"opt_step": int(group["step"]), "lr": float(group["lr"]), "ema_updates": ema.num_updates,
                    "nan_skips": pl_module.nan_skips, "global_step": trainer.global_step,
                    "finite": all(bool(torch.isfinite(p).all()) for p in pl_module.net.parameters())}


class InjectNaN(L.Callback):
    """At the given 0-based batches, make the loss (``cycle_weight`` = NaN) or a gradient non-finite."""

    def __init__(self, batches, where="loss"):
        self.batches, self.where, self.i = set(batches), where, -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.i = batch_idx
        self.saved = pl_module.cycle_weight
        if self.where == "loss" and batch_idx in self.batches:
            pl_module.cycle_weight = float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module.cycle_weight = self.saved

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # runs before the module's guard
        if self.where == "grad" and self.i in self.batches:
            p = next(p for g in optimizer.param_groups for p in g["params"] if p.grad is not None)
            p.grad.add_(float("inf"))  # any layout: every entry becomes inf


class DiskFullAfter(L.Callback):
    """From global step ``step`` on, every torch.save raises ENOSPC (a disk that filled up mid-run)."""

    def __init__(self, step, monkeypatch):
        self.step, self.mp = step, monkeypatch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.step:
            def full(*a, **k):
                raise OSError(errno.ENOSPC, "No space left on device")
            self.mp.setattr(torch, "save", full)


def tree_digest(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``folder`` (hidden files included)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def lightning_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def metrics_without_time(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k != "time"} for x in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------- NaN guard
@pytest.mark.parametrize("where", ["loss", "grad"])
def test_skipped_step_advances_neither_optimizer_nor_schedule_nor_ema(tmp_path, where):
    """A step with a non-finite loss or gradient leaves the optimizer state, the LR schedule and the EMA where a
    run without that step has them: 4 batches with 1 skipped ≡ 3 clean batches (same 4-step schedule)."""
    bad, good = Probe(), Probe()
    train(compose_config(GUARD, output_dir=tmp_path / "bad"), [InjectNaN({1}, where), bad])
    train(compose_config(GUARD + ["+callbacks.stop._target_=agingnet.callbacks.stop.StopAtStep",
                                  "+callbacks.stop.step=3"], output_dir=tmp_path / "good"), [good])
    assert bad.out["nan_skips"] == 1 and good.out["nan_skips"] == 0 and bad.out["finite"]
    assert bad.out["global_step"] == 4 and good.out["global_step"] == 3
    # written out: 3 optimizer updates and 3 EMA updates in both runs
    assert bad.out["opt_step"] == good.out["opt_step"] == 3
    assert bad.out["ema_updates"] == good.out["ema_updates"] == 3
    assert bad.out["lr"] == good.out["lr"]
    # the LR after 3 scheduler steps of the configured schedule (torch's own schedulers, no Lightning)
    from agingnet.module import warmup_cosine

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0e-3)
    sched = warmup_cosine(opt, total_steps=4, warmup_steps=2)
    for _ in range(3):
        opt.step()
        sched.step()
    assert bad.out["lr"] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)


def test_consecutive_skips_stop_the_run_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # conftest sets 1 (full tracebacks); the user sees 0
    cfg = compose_config(GUARD + ["max_consecutive_skips=2", "trainer.max_steps=6"], output_dir=tmp_path / "r")
    with pytest.raises(RunDiverged):
        train(cfg, [InjectNaN(set(range(100)))])
    with pytest.raises(SystemExit) as e:
        with user_errors("agingnet.train", extra=(RunDiverged,)):
            train(compose_config(GUARD + ["max_consecutive_skips=2"], output_dir=tmp_path / "r2"),
                  [InjectNaN(set(range(100)))])
    # Lightning's own INFO lines ("Seed set to …") share stderr in-process; ours is one line, the last
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("agingnet.train:")]
    assert e.value.code == 1 and len(err) == 1
    assert err[0].startswith("agingnet.train: error: training diverged: 2 consecutive steps")
    assert "max_consecutive_skips=2" in err[0]
    assert not (tmp_path / "r2" / "checkpoints" / "phase3_last.pt").exists()


# ---------------------------------------------------------------------------------------------------- crash + resume
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted tiny run (6 steps, validations at 3 and 6) and a run whose disk fills up at step 5: its
    iteration_6.pt export fails (ENOSPC) before the step-6 validation, so steps 4–5 are lost after last.ckpt (3)."""
    base = tmp_path_factory.mktemp("rel")
    full = base / "full"
    train(compose_config(TINY, output_dir=full))
    crashed = base / "crashed"
    mp = pytest.MonkeyPatch()
    try:
        with pytest.raises(OSError) as err:
            train(compose_config(TINY, output_dir=crashed), [DiskFullAfter(5, mp)])
    finally:
        mp.undo()
    return {"full": full, "crashed": crashed, "error": err.value}


def test_disk_full_is_one_line_and_keeps_earlier_checkpoints(runs, capsys, monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # conftest sets 1 (full tracebacks); the user sees 0
    e, ck = runs["error"], runs["crashed"] / "checkpoints"
    assert e.errno == errno.ENOSPC and "iteration_6.pt" in str(e) and "are intact" in str(e)
    with pytest.raises(SystemExit):
        with user_errors("agingnet.train"):
            raise e
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("agingnet.train: error: could not write ") and "iteration_6" in err[0]
    assert not list(ck.glob(".*.tmp")) and not (ck / "iteration_6.pt").exists()
    assert lightning_state(ck / "last.ckpt")["global_step"] == 3
    assert torch.load(ck / "best_model.pt", weights_only=True)["global_step"] == 3


def _first_param_difference(a: dict, b: dict) -> str | None:
    return next((k for k, v in a["state_dict"].items() if not torch.equal(v, b["state_dict"][k])), None)


def test_resume_after_crash_equals_uninterrupted_run(runs):
    """Resume in the crashed run's own folder: parameters, EMA shadow, optimizer state bit-exact; metrics.jsonl
    (without wall time) and timestamp.txt (without the resume header) equal the uninterrupted run's. (Two
    uninterrupted runs once differed here: dlib read freed memory and lost faces at random; see test_landmarks.)"""
    full, crashed = runs["full"], runs["crashed"]
    ck = crashed / "checkpoints"
    (ck / ".best_model.pt.x1y2.tmp").write_bytes(b"")  # what a kill -9 during a write leaves behind
    last = ck / "last.ckpt"
    train(compose_config(TINY + [f"resume_from={last}"], output_dir=crashed))
    assert not list(ck.glob(".*.tmp"))
    a, b = lightning_state(full / "checkpoints" / "last.ckpt"), lightning_state(last)
    assert a["global_step"] == b["global_step"] == 6
    assert a["state_dict"].keys() == b["state_dict"].keys()
    diff = _first_param_difference(a, b)
    assert diff is None, diff
    ema = [k for k in a["callbacks"] if k.startswith("EMACallback")][0]
    for name, sd in a["callbacks"][ema]["shadow"].items():
        for k, v in sd.items():
            assert torch.equal(v, b["callbacks"][ema]["shadow"][name][k]), k
    oa, ob = a["optimizer_states"][0], b["optimizer_states"][0]
    assert oa["param_groups"] == ob["param_groups"]
    for i, st in oa["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(ob["state"][i][k])), (i, k)
    assert metrics_without_time(ck / "metrics.jsonl") == metrics_without_time(full / "checkpoints" / "metrics.jsonl")
    lines_a = (full / "checkpoints" / "timestamp.txt").read_text().splitlines()
    lines_b = (ck / "timestamp.txt").read_text().splitlines()
    header = f"resume={last} step=3"
    assert sum(header in ln for ln in lines_b) == 1 and lines_b[0].endswith("resume=none step=0")
    assert [ln for ln in lines_b if header not in ln] == lines_a
    best = torch.load(ck / "best_model.pt", weights_only=True)
    ref = torch.load(full / "checkpoints" / "best_model.pt", weights_only=True)
    assert best["global_step"] == ref["global_step"]


# ---------------------------------------------------------------------------------------------------- frozen cache
def test_cache_keys_follow_content_not_path():
    """Two sets naming their images alike (``synthetic://0``) but with different pixels get their own values;
    every cached value equals the network applied to that image alone."""
    from agingnet.data.datasets import SyntheticFaces

    train_set, val_set = SyntheticFaces(n=2, size=32, seed=0), SyntheticFaces(n=2, size=32, seed=1)
    a, b = train_set[0], val_set[0]
    assert a["path"] == b["path"] == "synthetic://0"
    w = torch.randn(3 * 32 * 32)
    calls = []

    def net(x):
        calls.append(x.shape[0])
        return x.flatten(1) @ w

    cache = FrozenCache()
    xa, xb = a["image"][None], b["image"][None]
    va = cache.get("dex_age", cache.keys_for(xa), xa, net)
    vb = cache.get("dex_age", cache.keys_for(xb), xb, net)
    assert torch.equal(va, xa.flatten(1) @ w) and torch.equal(vb, xb.flatten(1) @ w) and not torch.equal(va, vb)
    both = torch.cat([xa, xb, xa.flip(-1)])
    out = cache.get("dex_age", cache.keys_for(both), both, net)
    assert calls == [1, 1, 1]  # only the flipped image is new, computed alone
    ref = torch.stack([(both[i:i + 1].flatten(1) @ w)[0] for i in range(3)])
    assert torch.equal(out, ref)
    assert content_keys(xa) == content_keys(xa.clone()) and content_keys(xa) != content_keys(xa.flip(-1))
    assert FrozenCache(enabled=False).keys_for(xa) is None


def test_cached_landmarks_equal_fresh_detection():
    from agingnet.landmarks import TemplateLandmarks

    det = TemplateLandmarks(size=64)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    cache = FrozenCache()
    pts, valid = cache.landmarks(det, cache.keys_for(x), x)
    ref_pts, ref_valid = det(x)
    assert torch.equal(pts, ref_pts.float()) and torch.equal(valid, ref_valid) and len(cache) == 2


# ---------------------------------------------------------------------------------------------------- images
def test_16bit_grey_png_is_scaled_not_white(tmp_path):
    from agingnet.data.datasets import load_rgb

    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "40_0.png")
    arr = np.asarray(load_rgb(tmp_path / "40_0.png"))
    assert arr.shape == (32, 32, 3)
    np.testing.assert_array_equal(arr[..., 0], np.rint(ramp * (255 / 65535)).astype(np.uint8))
    assert arr[0, 0, 0] == 0 and arr[-1, -1, 0] == 255 and abs(arr.mean() - 127.5) < 1


def test_too_small_image_is_refused_at_setup(tmp_path):
    from agingnet.data.datasets import PersonalFolderDataset, load_rgb

    Image.new("RGB", (1, 1)).save(tmp_path / "40_0.png")
    with pytest.raises(ValueError, match=r"40_0.png is 1x1 px, below the minimum face size of 16 px"):
        PersonalFolderDataset(tmp_path, size=32)
    with pytest.raises(ValueError, match="below the minimum face size"):
        load_rgb(tmp_path / "40_0.png")


# ---------------------------------------------------------------------------------------------------- report
def test_report_tolerates_a_torn_last_line_and_fails_skips_and_non_finite(runs, tmp_path, capsys):
    from agingnet import report

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    src = runs["full"] / "checkpoints"
    recs = [json.loads(x) for x in (src / "metrics.jsonl").read_text().splitlines()]
    recs[-1]["nan_skips"] = 11
    recs[0]["val/total"] = math.nan
    text = "".join(json.dumps(r) + "\n" for r in recs) + '{"step": 9, "val/tot'
    (run / "checkpoints" / "metrics.jsonl").write_text(text)
    (run / "checkpoints" / "timestamp.txt").write_text((src / "timestamp.txt").read_text() + "used_ema=1 id=0.")
    assert report.main([str(run), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| finite validations | FAIL | 2 validation(s); non-finite val/total at steps [3] |" in md
    assert "| skipped steps ≤ 10 | FAIL | 11 step(s)" in md
    assert "metrics.jsonl:3: incomplete last record (interrupted write), ignored" in md
    assert "timestamp.txt: the last line is incomplete" in md
    assert report.main([str(runs["full"]), "--out", str(tmp_path / "ok")]) == 0
    md = (tmp_path / "ok" / "report.md").read_text()
    assert "| finite validations | PASS |" in md and "| skipped steps ≤ 10 | PASS | 0 step(s)" in md
    capsys.readouterr()
    for bad, needle in ((tmp_path / "nope", "no such run folder"), (tmp_path, "is not an agingnet run folder")):
        assert report.main([str(bad)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("agingnet.report: error: ") and needle in err[0]


# ---------------------------------------------------------------------------------------------------- catalogue
def _app(argv, monkeypatch, capsys):
    """Run the Hydra app in-process as ``python -m agingnet.train argv…``: (exit code, stderr lines)."""
    import logging

    from hydra.core.global_hydra import GlobalHydra

    from agingnet.train import main

    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setattr(sys, "argv", ["agingnet.train", *argv])
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # Hydra reconfigures logging; later tests keep theirs
    GlobalHydra.instance().clear()
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        GlobalHydra.instance().clear()
        root.handlers[:], root.level = handlers, level
    return code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    p = tmp_path_factory.mktemp("evil") / "last.ckpt"
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2", "x": Path("/")}, p)
    return p


CATALOGUE = [  # (overrides, words the one line must contain)
    (["lr=abc"], ["lr='abc'", "a number > 0"]),
    (["lr=-1"], ["lr=-1", "> 0"]),
    (["val_interval=0"], ["val_interval=0", "integer ≥ 1"]),
    (["seed=abc"], ["seed='abc'", "integer"]),
    (["trainer.max_steps=abc"], ["trainer.max_steps='abc'"]),
    (["max_consecutive_skips=-1"], ["max_consecutive_skips=-1"]),
    (["resume_from=/nonexistent/last.ckpt"], ["resume_from: no such checkpoint: /nonexistent/last.ckpt"]),
    (["init_from=/nonexistent/base.pt"], ["init_from: no such checkpoint: /nonexistent/base.pt"]),
    (["hydra.run.dir=/proc/agingnet-no/run"], ["run folder /proc/agingnet-no/run: cannot be written"]),
    (["resume_from={full}/checkpoints/last.ckpt", "model.net.n_mlp=3"], ["model.net.n_mlp=3 (checkpoint: 2)"]),
    (["hydra.run.dir={full}", "lr=1e-3"], ["checkpoints already holds checkpoints"]),
    (["hydra.run.dir={crashed}", "resume_from={full}/checkpoints/last.ckpt"], ["holds another run's checkpoints"]),
    (["resume_from={poisoned}"], ["holds objects other than tensors", "is refused"]),
]


@pytest.mark.parametrize("overrides,words", CATALOGUE, ids=[" ".join(c[0])[:40] for c in CATALOGUE])
def test_bad_input_is_one_line_and_writes_nothing(overrides, words, runs, poisoned, tmp_path, monkeypatch, capsys):
    fill = {"full": runs["full"], "crashed": runs["crashed"], "poisoned": poisoned}
    args = [o.format(**fill) for o in overrides]
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={tmp_path / 'new'}")
    before = {k: tree_digest(runs[k]) for k in ("full", "crashed")}
    code, err = _app([*TINY, *args], monkeypatch, capsys)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("agingnet.train: error: ")
    for w in words:
        assert w in err[0], err[0]
    assert "weights_only=False" not in err[0]
    assert {k: tree_digest(runs[k]) for k in ("full", "crashed")} == before
    assert not (tmp_path / "new").exists()  # refused before Hydra created the run folder


def test_bank_of_another_embedding_size_is_refused_at_setup(tmp_path, monkeypatch, capsys):
    from agingnet.miner import ImpostorBank

    bank = tmp_path / "bank.pt"
    emb = torch.nn.functional.normalize(torch.randn(40, 32), dim=1)
    ImpostorBank.from_embeddings(emb, torch.linspace(18, 80, 40)).save(bank)
    code, err = _app([*TINY, f"miner.bank_path={bank}", f"hydra.run.dir={tmp_path / 'run'}"], monkeypatch, capsys)
    assert code == 1 and len(err) == 1, err
    assert f"impostor bank {bank}: embeddings have size 32 but the identity network" in err[0]
    assert "model.frozen.arcface.embed_dim" in err[0] and "gives 64" in err[0]


def test_cli_refused_run_leaves_the_existing_run_byte_identical(runs):
    """The command line end to end: Hydra must not rewrite <run>/.hydra/config.yaml of a refused run."""
    full = runs["full"]
    (full / ".hydra").mkdir(exist_ok=True)
    (full / ".hydra" / "config.yaml").write_text("lr: 1.5e-05\n")
    before = tree_digest(full)
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "agingnet.train", *TINY, f"hydra.run.dir={full}", "lr=1e-3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(err) == 1 and "already holds checkpoints" in err[0], r.stderr[-2000:]
    assert tree_digest(full) == before


def test_infer_and_evaluate_arguments_name_the_key(tmp_path):
    from omegaconf import OmegaConf

    from agingnet.infer import _age_list, list_inputs, strength_arg

    with pytest.raises(ValueError, match=r"^target_ages: 'x' is not an integer age in \[0, 100\]$"):
        _age_list(["x"])
    with pytest.raises(ValueError, match=r"^aging_strength must be a finite number >= 0, got 'abc'$"):
        strength_arg(OmegaConf.create({"aging_strength": "abc"}))
    assert strength_arg(OmegaConf.create({"aging_strength": 0.5})) == 0.5
    with pytest.raises(FileNotFoundError, match=r"^data: no such folder: "):
        list_inputs(tmp_path / "missing", what="data")

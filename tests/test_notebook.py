"""notebooks/inspect_run.py on a tiny hand-made run folder: curves, strips and its summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "notebooks" / "inspect_run.py"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    lines = [json.dumps({"abs_step": 50500 + 20 * i, "val/total": 0.5 - 0.1 * i,
                         "val/real/id": 0.2 + 0.01 * i, "used_ema": True, "miner": "soft"}) for i in range(3)]
    lines.insert(1, "{not json")
    (run / "checkpoints" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    w = SummaryWriter(str(run / "tensorboard"))
    for step in range(1, 6):
        w.add_scalar("train/loss", 1.0 / step, step)
        w.add_scalar("val/aging/mae", 10.0 - step, step)
    w.close()
    (run / "strips").mkdir()
    Image.new("RGB", (128, 32), (200, 10, 10)).save(run / "strips" / "a.png")
    Image.new("RGB", (64, 16), (10, 200, 10)).save(run / "strips" / "b.png")
    (run / "images").mkdir()
    Image.new("RGB", (48, 40), (10, 10, 200)).save(run / "images" / "train_step0000020.png")
    return run


def test_inspect_run_writes_curves_strips_and_summary(run_dir: Path):
    r = subprocess.run([sys.executable, str(SCRIPT), str(run_dir)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = run_dir / "inspect"
    for name in ("curves_tensorboard.png", "curves_metrics.png", "strips.png", "training_grids.png"):
        assert (out / name).is_file(), name
    s = json.loads((out / "summary.json").read_text())
    assert s["metrics_rows"] == 3 and s["metrics_bad_lines"] == 1
    assert s["last_metrics"]["val/total"] == pytest.approx(0.3)  # 0.5 − 0.1·2
    assert "used_ema" not in s["last_metrics"]  # booleans are not curves
    assert s["tensorboard_last"]["train/loss"] == pytest.approx(0.2)  # 1/5
    assert s["tensorboard_last"]["val/aging/mae"] == pytest.approx(5.0)
    assert s["plotted"]["tensorboard"][:2] == ["train/loss", "val/aging/mae"]  # priority order
    assert len(s["strips"]) == 2
    # two strips scaled to 1024 px wide and stacked: 32·8 + 16·16 rows
    assert Image.open(out / "strips.png").size == (1024, 32 * 8 + 16 * 16)
    assert "3 validation rows, 2 TensorBoard tags, 2 age strips" in r.stdout


def test_inspect_run_missing_folder(tmp_path: Path):
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "nope")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "run folder not found" in r.stderr

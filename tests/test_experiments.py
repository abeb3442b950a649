"""Every experiment in conf/experiment/ runs as a tiny CPU run under ``debug=tiny`` with no other override."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from agingnet.config import CONFIG_DIR, compose_config
from agingnet.train import train
from agingnet.world import weights as world_weights

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
# run under debug=tiny by test_phase3_e2e.py's shared run, with the same checks (and many more)
RUN_ELSEWHERE = {"phase3_oneshot_40"}
# slow (make test-slow): a sibling in the default suite runs the same code through a real fit
SLOW = {
    "phase3_oneshot_40_entry001": "phase3_oneshot_40 plus two ROI regions (test_phase3_e2e.py; regions: test_roi.py)",
    "full_training_s2": "full_training_s1's stack at stage s2 (s2 stage modes: test_training_step.py)",
    "world_global_age": "world_global plus SAM's aging and identity terms (test_world_global.py's second-stage fit)",
}


def test_the_experiment_list_is_not_empty():
    assert {"demo", "full_training_s1", "full_training_s2", "phase3_oneshot_40"} <= set(EXPERIMENTS)


def check_debug_tiny_config(cfg) -> None:
    w = cfg.model.weights
    assert w.sam is None and w.psp is None and w.stylegan2 is None, "an experiment's weight paths survived debug=tiny"
    # the frozen age and identity networks are the aging world's shipped ones (package data)
    assert (Path(w.dex), Path(w.arcface)) == (world_weights.weight_path("dex"), world_weights.weight_path("arcface"))
    assert cfg.init_from is None


@pytest.mark.parametrize("experiment", [pytest.param(e, marks=pytest.mark.slow) if e in SLOW else e
                                        for e in sorted(set(EXPERIMENTS) - RUN_ELSEWHERE)])
def test_experiment_runs_under_debug_tiny(tmp_path: Path, experiment: str):
    # data under the test's folder (the demo writes its world actor and a small world bank there)
    cfg = compose_config([f"experiment={experiment}", "debug=tiny", f"paths.data_dir={tmp_path / 'data'}",
                          "world.bank_population=16"], output_dir=tmp_path / "run")
    check_debug_tiny_config(cfg)
    result = train(cfg)
    assert result["abs_step"] == cfg.trainer.max_steps
    assert torch.isfinite(torch.tensor(result["metrics"]["train/loss"]))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()

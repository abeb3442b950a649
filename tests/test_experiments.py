"""Every experiment in conf/experiment/ runs as a tiny CPU run under ``debug=tiny`` with no other override."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from debug_tiny import check_debug_tiny_config

from agingnet.config import CONFIG_DIR, compose_config
from agingnet.train import train

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
# run under debug=tiny elsewhere, with the same checks (and many more)
RUN_ELSEWHERE = {
    "phase3_oneshot_40": "test_phase3_e2e.py's shared run",
    "tiny_synthetic": "test_train.py's few-steps run",
}
# slow (make test-slow): a sibling in the default suite runs the same code through a real fit
SLOW = {
    "phase3_oneshot_40_entry001": "phase3_oneshot_40 plus two ROI regions (test_phase3_e2e.py; regions: test_roi.py)",
    "full_training_s2": "full_training_s1's stack at stage s2 (s2 stage modes: test_training_step.py)",
    "world_global_age": "world_global plus SAM's aging and identity terms (test_world_global.py's second-stage fit)",
    "world_global": "test_world_global.py fits it (stage world, the ground-truth term); its callbacks are the "
                    "default group that the demo and tiny_synthetic run",
}


def test_the_experiment_list_is_not_empty():
    assert {"demo", "full_training_s1", "full_training_s2", "phase3_oneshot_40"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", [pytest.param(e, marks=pytest.mark.slow) if e in SLOW else e
                                        for e in sorted(set(EXPERIMENTS) - set(RUN_ELSEWHERE))])
def test_experiment_runs_under_debug_tiny(tmp_path: Path, experiment: str):
    # data under the test's folder (the demo writes its world actor and a small world bank there)
    cfg = compose_config([f"experiment={experiment}", "debug=tiny", f"paths.data_dir={tmp_path / 'data'}",
                          "world.bank_population=16"], output_dir=tmp_path / "run")
    check_debug_tiny_config(cfg)
    result = train(cfg)
    assert result["abs_step"] == cfg.trainer.max_steps
    assert torch.isfinite(torch.tensor(result["metrics"]["train/loss"]))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()

"""Every experiment in conf/experiment/ runs as a tiny CPU run under ``debug=tiny`` with no other override."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from agingnet.config import CONFIG_DIR, compose_config
from agingnet.train import train
from agingnet.world import weights as world_weights

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def test_the_experiment_list_is_not_empty():
    assert {"demo", "full_training_s1", "full_training_s2", "phase3_oneshot_40"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_under_debug_tiny(tmp_path: Path, experiment: str):
    # data under the test's folder (the demo writes its world actor and a small world bank there)
    cfg = compose_config([f"experiment={experiment}", "debug=tiny", f"paths.data_dir={tmp_path / 'data'}",
                          "world.bank_population=16"], output_dir=tmp_path / "run")
    w = cfg.model.weights
    assert w.sam is None and w.psp is None and w.stylegan2 is None, "an experiment's weight paths survived debug=tiny"
    # the frozen age and identity networks are the aging world's shipped ones (package data)
    assert (Path(w.dex), Path(w.arcface)) == (world_weights.weight_path("dex"), world_weights.weight_path("arcface"))
    assert cfg.init_from is None
    result = train(cfg)
    assert result["abs_step"] == cfg.trainer.max_steps
    assert torch.isfinite(torch.tensor(result["metrics"]["train/loss"]))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()

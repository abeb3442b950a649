"""What ``debug=tiny`` must make of any experiment's config: checked by test_experiments.py for every experiment
and by the test modules that run an experiment under debug=tiny in its place (test_phase3_e2e.py, test_train.py)."""

from __future__ import annotations

from pathlib import Path

from agingnet.world import weights as world_weights


def check_debug_tiny_config(cfg) -> None:
    w = cfg.model.weights
    assert w.sam is None and w.psp is None and w.stylegan2 is None, "an experiment's weight paths survived debug=tiny"
    # the frozen age and identity networks are the aging world's shipped ones (package data)
    assert (Path(w.dex), Path(w.arcface)) == (world_weights.weight_path("dex"), world_weights.weight_path("arcface"))
    assert cfg.init_from is None

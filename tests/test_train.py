"""The training spine end to end through tiny configs: the demo, checkpoints, TensorBoard, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from debug_tiny import check_debug_tiny_config

from agingnet.config import compose_config
from agingnet.train import train

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_synthetic_few_steps_writes_checkpoint_and_tensorboard(tmp_path):
    """Also test_experiments.py's checks of every experiment under debug=tiny, for experiment=tiny_synthetic."""
    out = tmp_path / "run"
    cfg = compose_config(["experiment=tiny_synthetic", "debug=tiny", "trainer.max_steps=4", "val_interval=2"],
                         output_dir=out)
    check_debug_tiny_config(cfg)
    result = train(cfg)
    assert result["abs_step"] == 4
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "config.yaml").is_file()
    m = result["metrics"]
    for key in ("train/loss", "train/real/id", "train/cycle/l2", "train/real/roi_id/roi_pairs_eyes", "val/total",
                "val/aging/mae"):
        assert key in m and torch.isfinite(torch.tensor(m[key])), key
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    # the frozen encoders (and BN statistics) are bit-identical to a fresh build; the trained decoder moved
    from hydra.utils import instantiate

    fresh = instantiate(cfg.model, loss=cfg.loss, _recursive_=False).state_dict()
    sd = ckpt["state_dict"]
    frozen = [k for k in sd if k.startswith(("net.pretrained_encoder.", "net.encoder.", "frozen.arcface.",
                                             "frozen.dex."))]
    assert len(frozen) > 100
    changed = [k for k in frozen if not torch.equal(sd[k], fresh[k])]
    assert not changed, changed[:5]
    decoder = [k for k in sd if k.startswith("net.decoder.") and sd[k].is_floating_point()]
    assert any(not torch.equal(sd[k], fresh[k]) for k in decoder)


def test_frozen_modules_stay_in_eval_and_outside_autograd(tmp_path):
    from hydra.utils import instantiate

    cfg = compose_config(["experiment=tiny_synthetic"], output_dir=tmp_path)
    module = instantiate(cfg.model, loss=cfg.loss, _recursive_=False)
    module.train()
    assert module.net.decoder.training and not module.net.encoder.training
    assert not module.net.pretrained_encoder.training and not module.frozen.training
    assert all(p.requires_grad for p in module.net.decoder.parameters())
    assert not any(p.requires_grad for p in module.net.encoder.parameters())
    assert not any(p.requires_grad for p in module.frozen.parameters())
    s1 = instantiate(compose_config(["experiment=tiny_synthetic", "stage=s1"], output_dir=tmp_path).model,
                     loss=cfg.loss, _recursive_=False)
    assert all(p.requires_grad for p in s1.net.encoder.parameters())
    assert not any(p.requires_grad for p in s1.net.decoder.parameters())


def test_existing_run_folder_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    keep = out / "checkpoints" / "best_model.pt"
    keep.write_bytes(b"previous")
    cfg = compose_config(["experiment=tiny_synthetic", "trainer.max_steps=1"], output_dir=out)
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        train(cfg)
    assert keep.read_bytes() == b"previous"


def test_missing_dataset_folder_is_named(tmp_path):
    cfg = compose_config(["experiment=tiny_synthetic", "data=personal", f"paths.data_dir={tmp_path / 'nowhere'}",
                          "trainer.max_steps=1"], output_dir=tmp_path / "run")
    with pytest.raises(Exception) as info:  # Hydra wraps what the dataset raised: look at the cause chain
        train(cfg)
    chain, err = [], info.value
    while err is not None:
        chain.append(err)
        err = err.__cause__
    assert any(isinstance(e, FileNotFoundError) and "nowhere/shot_train" in str(e) for e in chain), chain


def test_missing_init_from_is_named(tmp_path):
    cfg = compose_config(["experiment=tiny_synthetic", f"init_from={tmp_path / 'base.pt'}"],
                         output_dir=tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="base.pt"):
        train(cfg)


def test_cli_unknown_key_is_one_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "agingnet.train", "no_such_key=1", f"hydra.run.dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode != 0
    assert "no_such_key" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)  # the demo (~150 s) and an evaluation (~30 s) as a user runs them, on 2 shared cores
def test_demo_full(tmp_path):
    """The demo as a user runs it (the world's global model personalized to actor 100000 at 40 ± 2): it writes the
    actor and the world bank, its run passes the two health checks and the seed's five acceptance criteria, and on
    the actor's held-out photos it beats the global model it started from (issue 10's three goals)."""
    from agingnet.report import criteria, health_checks, load_run

    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "agingnet.train", f"hydra.run.dir={run}",
                        f"paths.data_dir={tmp_path / 'data'}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "run folder" in r.stdout
    assert (tmp_path / "data" / "world" / "actor_100000_seed0" / "world.json").is_file()
    verdicts = health_checks(load_run(run), 10) + criteria(load_run(run))
    assert [name for name, ok, _ in verdicts if not ok] == [], verdicts
    # issue 10's goals for the demo, on the actor's 8 held-out photos at 38-42 against the rendered truth
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, "-m", "agingnet.evaluate", f"checkpoint={run}/checkpoints/phase3_best_ema.pt",
                        f"data={tmp_path}/data/world/actor_100000_seed0/test", "target_ages=[38,39,40,41,42]",
                        "baseline=world", f"output_dir={out}", "progress=false"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    mine, base = m["mean"], m["mean_baseline"]
    assert mine["age_mae"] <= 3.0, mine
    assert mine["id_cos"] >= base["id_cos"], (mine, base)
    # the goal, 10 % below the base: measured 15.6 %, age MAE 2.76 (13.0 % and 11.2 % on the two world files shipped
    # before; the demo before that, whole-image l2 at the seed's 0.1, 9.1 %: fails)
    assert mine["gt_l2"] <= 0.90 * base["gt_l2"], (mine["gt_l2"], base["gt_l2"])


def test_channels_last_and_bf16_autocast_run(tmp_path, monkeypatch):
    from agingnet.module import AgingModule

    seen = []
    original = AgingModule.run_passes

    def probe(self, x, *args, **kwargs):  # what the step really runs under: autocast state and input layout
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(AgingModule, "run_passes", probe)
    cfg = compose_config(["experiment=tiny_synthetic", "trainer.max_steps=1", "val_interval=1", "channels_last=true",
                          "precision=bf16-mixed", "callbacks.image_logger=null"], output_dir=tmp_path / "run")
    result = train(cfg)
    assert result["abs_step"] == 1 and torch.isfinite(torch.tensor(result["metrics"]["train/loss"]))
    assert seen and all(on and dtype == torch.bfloat16 for on, dtype in seen), seen
    sd = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    convs = [v for k, v in sd.items() if k.startswith("net.encoder.") and k.endswith("weight") and v.ndim == 4
             and v.shape[-1] > 1]
    assert convs and all(v.is_contiguous(memory_format=torch.channels_last) for v in convs)


def test_validation_leaves_training_rng_untouched(tmp_path):
    from hydra.utils import instantiate

    cfg = compose_config(["experiment=tiny_synthetic"], output_dir=tmp_path)
    module = instantiate(cfg.model, loss=cfg.loss, _recursive_=False)
    gens = module.term_generators()
    assert gens, "the demo's ROI and miner terms own generators"
    before = [g.get_state().clone() for g in gens], torch.get_rng_state().clone()
    module.on_validation_epoch_start()
    torch.rand(10)
    for g in gens:
        torch.rand(3, generator=g)
    module.on_validation_epoch_end()
    assert all(torch.equal(a, g.get_state()) for a, g in zip(before[0], gens))
    assert torch.equal(before[1], torch.get_rng_state())


# the frozen-output cache (content keys, per-sample values) is tested in test_reliability.py


def test_cli_missing_data_folder_is_one_line(tmp_path):
    """A bare environment (a minimal PATH, HOME in the test folder) and a data folder found missing at setup (after the
    preflight; test_reliability.py's catalogue runs the preflight's refusals, a missing init_from among them)."""
    needle = "/nonexistent/data/shot_train"
    args = [sys.executable, "-m", "agingnet.train", "experiment=tiny_synthetic", "data=personal",
            "paths.data_dir=/nonexistent/data", f"hydra.run.dir={tmp_path / 'run'}"]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=180,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("agingnet.train: error:")]
    assert len(errors) == 1 and needle in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_target_age_draws_follow_the_run_seed(tmp_path):
    from hydra.utils import instantiate

    def draws(seed):
        cfg = compose_config(["experiment=tiny_synthetic", f"seed={seed}"], output_dir=tmp_path / str(seed))
        module = instantiate(cfg.model, loss=cfg.loss, _recursive_=False)
        return [module.sampler.sample(torch.full((4,), 40.0), module._gen)[0].tolist() for _ in range(5)]

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)

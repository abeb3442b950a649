"""``init_from`` end to end through real ``Trainer.fit`` runs: a tiny base written by a first run, then runs from
it. The global step continues, the configured LR schedule applies (with and without ``restore_optimizer``), the
base's EMA initialises the EMA shadow, ``init_use_ema`` takes the base's EMA decoder as weights, and a fork
optimizer state (lessw2020 Ranger layout) loads and steps, or is refused naming the file."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback

import agingnet.train as train_mod
from agingnet.config import compose_config
from agingnet.optim import OptimizerStateError
from agingnet.train import train

BASE_LR, BASE_STEPS, WARMUP, MIN_LR = 1e-3, 2, 2, 1e-6  # conf/model/tiny.yaml: warmup 2; sam.yaml: min_lr 1e-6
# Small and fast: the SAM loss without its frozen-network terms, a 32 px decoder, no validation, only the
# callbacks under test (EMA, fork export) and a strong EMA decay so the shadow differs visibly from the weights.
FAST = ["experiment=tiny_synthetic", "loss=sam", "~loss.id", "~loss.lpips", "~loss.lpips_crop", "~loss.aging",
        "~loss.roi_id",
        "model.net.size=32", "model.net.pretrained_encoder=false", "model.input_age=label", "data.batch_size=1",
        "val_max_batches=0", "logger=none", "callbacks.ema.decay=0.5", *(f"callbacks.{c}=null" for c in (
            "image_logger", "personal_bank", "miner_refresh", "plateau", "model_checkpoint", "run_log",
            "lr_monitor", "last_checkpoint", "progress_bar"))]


def schedule(s: int, base: float, total: int) -> float:
    """warmup_cosine written out: linear warmup from base/W over W steps, then cosine to MIN_LR at ``total``."""
    w = min(WARMUP, total - 1)
    if s < w:
        return base * (1 / w + (1 - 1 / w) * s / w)
    return MIN_LR + (base - MIN_LR) * (1 + math.cos(math.pi * (s - w) / (total - w))) / 2


class Recorder(Callback):
    """What the run looked like from inside: per batch the LR and steps, at train start the optimizer state and
    the EMA shadow (the EMA callback initialises it at fit start, before this)."""

    def __init__(self):
        self.batches: list[dict] = []
        self.start: dict = {}

    def on_train_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        ema = next(c for c in trainer.callbacks if type(c).__name__ == "EMACallback")
        self.start = {"group": {k: v for k, v in opt.param_groups[0].items() if k != "params"},
                      "state": [{k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
                                for p in opt.param_groups[0]["params"]],
                      "shadow": {k: v.clone() for k, v in ema.shadow["decoder"].items()},
                      "ema_source": ema.init_source,
                      "decoder": {k: v.clone() for k, v in pl_module.net.decoder.state_dict().items()}}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        g = trainer.optimizers[0].param_groups[0]
        self.batches.append({"lr": g["lr"], "abs_step": pl_module.abs_step, "global_step": trainer.global_step})


def fit(overrides: list[str], out: Path, monkeypatch) -> tuple[dict, Recorder]:
    rec = Recorder()
    original = train_mod.instantiate_group
    monkeypatch.setattr(train_mod, "instantiate_group",
                        lambda group, name: original(group, name) + ([rec] if name == "callbacks" else []))
    result = train(compose_config([*FAST, *overrides], output_dir=out))
    return result, rec


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """checkpoints/phase3_last.pt of a 2-step tiny run (fork layout: weights, EMA, optimizer, global_step 2)."""
    out = tmp_path_factory.mktemp("base") / "run"
    train(compose_config([*FAST, f"lr={BASE_LR}", f"trainer.max_steps={BASE_STEPS}"], output_dir=out))
    path = out / "checkpoints" / "phase3_last.pt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["global_step"] == BASE_STEPS and ckpt["optimizer"]["param_groups"][0]["initial_lr"] == BASE_LR
    return path


def test_init_from_continues_step_with_configured_lr_and_base_ema(base, tmp_path, monkeypatch):
    lr, steps = 4e-4, 3
    result, rec = fit([f"init_from={base}", f"lr={lr}", f"trainer.max_steps={steps}"], tmp_path / "p3", monkeypatch)
    assert result["abs_step"] == BASE_STEPS + steps
    assert [b["abs_step"] for b in rec.batches] == [BASE_STEPS + s for s in range(steps)]
    assert [b["lr"] for b in rec.batches] == pytest.approx([schedule(s, lr, steps) for s in range(steps)], rel=1e-9)
    ckpt = torch.load(base, weights_only=True)
    file_ema = ckpt["ema"]["decoder"]["shadow"]
    assert rec.start["ema_source"] == "decoder:base_ema"
    torch.testing.assert_close(rec.start["shadow"], file_ema, rtol=0, atol=0)
    assert any(not torch.equal(file_ema[k], rec.start["decoder"][k]) for k in file_ema)  # not the raw weights
    assert "step" not in rec.start["group"] and not any(rec.start["state"])  # a fresh optimizer
    written = torch.load(tmp_path / "p3" / "checkpoints" / "phase3_last.pt", weights_only=True)
    assert written["global_step"] == BASE_STEPS + steps


def test_init_use_ema_takes_the_base_ema_decoder_as_weights(base, tmp_path):
    ckpt = torch.load(base, weights_only=True)
    cfg = compose_config([*FAST, f"init_from={base}", "init_use_ema=true"], output_dir=tmp_path)
    module = instantiate(cfg.model, loss=cfg.loss, _recursive_=False)
    torch.testing.assert_close(module.net.decoder.state_dict(), ckpt["ema"]["decoder"]["shadow"], rtol=0, atol=0)
    enc = {k[len("encoder."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("encoder.")}
    torch.testing.assert_close(module.net.encoder.state_dict(), enc, rtol=0, atol=0)  # raw: the EMA is decoder-only
    assert module.init_info["used_ema"] and module.step_offset == BASE_STEPS


def test_restore_optimizer_keeps_the_configured_lr(base, tmp_path, monkeypatch):
    """The base's groups carry lr and initial_lr = 1e-3; the scheduler must start from the configured 4e-4."""
    lr, steps = 4e-4, 2
    result, rec = fit([f"init_from={base}", f"lr={lr}", "restore_optimizer=true", f"trainer.max_steps={steps}"],
                      tmp_path / "p3", monkeypatch)
    assert [b["lr"] for b in rec.batches] == pytest.approx([schedule(s, lr, steps) for s in range(steps)], rel=1e-9)
    assert rec.start["group"]["initial_lr"] == lr
    saved = torch.load(base, weights_only=True)["optimizer"]
    assert rec.start["group"]["step"] == saved["param_groups"][0]["step"] == BASE_STEPS  # the count continues
    assert [bool(st) for st in rec.start["state"]] == [i in saved["state"] for i in range(len(rec.start["state"]))]
    for i, st in enumerate(rec.start["state"]):
        for k in st:  # exp_avg, exp_avg_sq, slow_buffer of the parameters that had a gradient in the base run
            assert torch.equal(st[k], saved["state"][i][k]), (i, k)
    assert result["abs_step"] == BASE_STEPS + steps


def fork_layout(base: Path, out: Path, drop_last_param: bool = False) -> Path:
    """The base file with its optimizer rewritten by hand in the fork's (lessw2020 Ranger) layout."""
    ckpt = torch.load(base, weights_only=True)
    saved = ckpt["optimizer"]
    ids = saved["param_groups"][0]["params"][: -1 if drop_last_param else None]
    ckpt["optimizer"] = {
        "state": {i: {"step": BASE_STEPS, "exp_avg": saved["state"][i]["exp_avg"],
                      "exp_avg_sq": saved["state"][i]["exp_avg_sq"], "slow_buffer": saved["state"][i]["slow_buffer"]}
                  for i in ids if i in saved["state"]},
        "param_groups": [{"lr": BASE_LR, "alpha": 0.5, "k": 6, "step_counter": 0, "betas": (0.95, 0.999),
                          "N_sma_threshhold": 5, "eps": 1e-5, "weight_decay": 0, "params": ids}],
    }
    torch.save(ckpt, out)
    return out


def test_fork_optimizer_state_loads_and_steps(base, tmp_path, monkeypatch):
    """Issue 9: ``KeyError: 'weight_decouple'`` at the first step with a fork Ranger state."""
    path = fork_layout(base, tmp_path / "fork_base.pt")
    lr = 4e-4
    result, rec = fit([f"init_from={path}", f"lr={lr}", "restore_optimizer=true", "trainer.max_steps=1"],
                      tmp_path / "p3", monkeypatch)
    assert result["abs_step"] == BASE_STEPS + 1
    assert rec.batches[0]["lr"] == pytest.approx(schedule(0, lr, 1))
    g = rec.start["group"]
    assert g["step"] == BASE_STEPS and g["weight_decouple"] is True and "N_sma_threshhold" not in g
    saved = torch.load(path, weights_only=True)["optimizer"]["state"]
    assert sum(bool(st) for st in rec.start["state"]) == len(saved) > 0
    for i, st in enumerate(rec.start["state"]):
        if i in saved:  # the per-parameter step became the group's step
            assert set(st) == {"exp_avg", "exp_avg_sq", "slow_buffer"}
            assert torch.equal(st["exp_avg"], saved[i]["exp_avg"]) and torch.equal(st["slow_buffer"],
                                                                                  saved[i]["slow_buffer"])
    written = torch.load(tmp_path / "p3" / "checkpoints" / "phase3_last.pt", weights_only=True)
    assert written["optimizer"]["param_groups"][0]["step"] == BASE_STEPS + 1


def test_optimizer_state_for_other_parameters_is_refused_naming_the_file(base, tmp_path):
    path = fork_layout(base, tmp_path / "fork_base.pt", drop_last_param=True)
    cfg = compose_config([*FAST, f"init_from={path}", "restore_optimizer=true", "trainer.max_steps=1"],
                         output_dir=tmp_path / "p3")
    n = len(torch.load(base, weights_only=True)["optimizer"]["param_groups"][0]["params"])
    want = f"{path}: optimizer group 0 holds {n - 1} parameters, the configured optimizer trains {n}"
    with pytest.raises(OptimizerStateError, match=re.escape(want)):
        train(cfg)

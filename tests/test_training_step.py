"""The training step and validation against formulas written out here (SPEC §2–§4, §8), through real Trainer runs.

The reference recomputes the two passes with the network and the frozen nets directly, and sums the terms by the
SPEC's table: nothing of the module's loss plumbing (registry, contexts, weights) is reused.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from agingnet.config import compose_config
from agingnet.train import build_datamodule

# loss=sam without the LPIPS terms; l2 gets a distinct aging weight so the aging/no-aging choice shows
TERMS = ["loss=sam", "~loss.roi_id", "loss.lpips.weight=0", "loss.lpips.weight_aging=0", "loss.lpips_crop.weight=0",
         "loss.l2_crop.weight=0", "loss.l2.weight=0.25", "loss.l2.weight_aging=0.5", "loss.id.weight=0.1",
         "loss.id.weighted=true", "loss.w_norm.weight=0.005", "loss.w_norm.decoder_scale=0.5",
         "loss.aging.weight=5.0", "loss.aging.decoder_scale=0.5"]
CYCLE = 1.5


def _setup(tmp_path, *overrides):
    cfg = compose_config(["experiment=tiny_synthetic", "callbacks=none", "logger=none", "stage=s2",
                          f"cycle_lambda={CYCLE}", "model.train_noise=const", "lr=0", *TERMS, *overrides],
                         output_dir=tmp_path)
    module = instantiate(cfg.model, loss=cfg.loss, _recursive_=False)
    return cfg, module, build_datamodule(cfg)


def _trainer(**kw) -> L.Trainer:
    base = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(**{**base, **kw})


def _f(arcface, img):
    """SPEC §4: crop C = [35:223, 32:220] of the 256-px image, average-pooled to 112, IR-SE50 (L2-normalized)."""
    return arcface(F.adaptive_avg_pool2d(img[:, :, 35:223, 32:220], (112, 112)))


def _with_age(img, years):
    return torch.cat([img, (years / 100).view(-1, 1, 1, 1).expand(-1, 1, *img.shape[-2:])], dim=1)


def _reference_losses(module, x, a_years, t_years, aging: bool):
    """(L_real, L_cycle) by the SPEC's table for the terms kept in TERMS (stage s2: the decoder trains)."""
    net, arc, dex = module.net, module.frozen.arcface, module.frozen.dex
    a, t = a_years / 100, t_years / 100
    y_hat, codes = net(_with_age(x, t_years), noise_mode="const")
    y_rec, codes_rec = net(_with_age(y_hat, a_years), noise_mode="const")
    fx = _f(arc, x)

    def pass_loss(out, codes_, target, input_, l2_w):
        w = 0.25 * torch.cos(math.pi * (target - input_).abs()) + 0.75
        ident = (w * (1 - (_f(arc, out) * fx).sum(1))).mean()
        wn = (codes_ - net.latent_avg).flatten(1).norm(dim=1).mean()
        age = F.mse_loss(dex.predict_age(out) / 100, target)
        return 0.1 * ident + l2_w * F.mse_loss(out, x) + 0.005 * 0.5 * wn + 5.0 * 0.5 * age

    l_real = pass_loss(y_hat, codes, t, a, 0.5 if aging else 0.25)
    l_cycle = pass_loss(y_rec, codes_rec, a, a, 0.25)  # cycle: target = input = a, so the ID weight is 1
    return l_real, l_cycle


class _Capture(L.Callback):
    """Records the loss handed to backward and the step's ages, then recomputes the reference right there (the
    weights are the ones the step used)."""

    def __init__(self):
        self.seen = []

    def on_before_backward(self, trainer, pl_module, loss):
        imgs = pl_module._last_images
        x, a, t = imgs["input"], imgs["input_age"], imgs["target_age"]
        aging = not bool(torch.equal(t, a))
        with torch.no_grad():
            l_real, l_cycle = _reference_losses(pl_module, x, a, t, aging)
        self.seen.append(dict(loss=loss.detach(), ref_total=l_real + CYCLE * l_cycle, ref_logged=l_real + l_cycle,
                              a=a, t=t))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen[-1]["logged"] = trainer.callback_metrics["train/loss"]


def test_training_step_is_real_plus_lambda_cycle(tmp_path):
    """Aging targets far from the input ages (fixed 10, no no-aging batches): the real pass is weighted by
    0.25·cos(π|t−a|)+0.75, the cycle pass (target = input = a) by 1; total = L_real + λ·L_cycle."""
    _, module, dm = _setup(tmp_path, "target_age=fixed", "target_age.fixed_age=10", "target_age.jitter=0",
                           "target_age.no_aging_prob=0")
    cap = _Capture()
    _trainer(max_steps=2, limit_val_batches=0, callbacks=[cap]).fit(module, datamodule=dm)
    assert len(cap.seen) == 2
    for s in cap.seen:
        assert torch.equal(s["t"], torch.full_like(s["t"], 10.0))
        assert bool(((s["a"] - s["t"]).abs() > 5).all()), "the ID weights must differ from 1 for this test to bite"
        torch.testing.assert_close(s["loss"], s["ref_total"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s["logged"], s["ref_logged"], rtol=1e-5, atol=1e-6)


def test_no_aging_step_uses_the_float_input_age(tmp_path):
    """A no-aging batch: target = the DEX age unrounded (SAM/the fork), no-aging weights on the real pass."""
    _, module, dm = _setup(tmp_path, "target_age.no_aging_prob=1")
    cap = _Capture()
    _trainer(max_steps=1, limit_val_batches=0, callbacks=[cap]).fit(module, datamodule=dm)
    (s,) = cap.seen
    assert torch.equal(s["t"], s["a"]) and not torch.equal(s["a"], s["a"].round())
    torch.testing.assert_close(s["loss"], s["ref_total"], rtol=1e-5, atol=1e-6)


def test_validation_total_aging_targets_and_in_window(tmp_path):
    """val/total = L_real + L_cycle on no-aging reconstruction (no λ, SPEC §8); the aging check runs through the
    whole window 38…42 across batches and in_window is the fraction of DEX(net(x ⊕ t)) inside [38, 42]."""
    cfg, module, dm = _setup(tmp_path, "target_age=fixed", "target_age.fixed_age=40", "target_age.jitter=2",
                             "data.val.n=6")
    trainer = _trainer(limit_val_batches=3)
    (metrics,) = trainer.validate(module, datamodule=dm, verbose=False)
    xs = torch.stack([dm.val_set[i]["image"] for i in range(6)])
    targets = torch.tensor([38.0, 39, 40, 41, 42, 38])
    with torch.no_grad():
        a = module.frozen.dex.predict_age(xs).clamp(0, 100)
        totals, maes, inside = [], [], []
        for sl in (slice(0, 2), slice(2, 4), slice(4, 6)):  # per batch, as Lightning averages batch means
            l_real, l_cycle = _reference_losses(module, xs[sl], a[sl], a[sl], aging=False)
            totals.append(l_real + l_cycle)
            aged, _ = module.net(_with_age(xs[sl], targets[sl]), noise_mode="const")
            out = module.frozen.dex.predict_age(aged)
            maes.append((out - targets[sl]).abs().mean())
            inside.append(((out >= 38) & (out <= 42)).float().mean())
    assert metrics["val/aging/target_age"] == pytest.approx(targets.mean().item())
    assert metrics["val/total"] == pytest.approx(torch.stack(totals).mean().item(), rel=1e-5)
    assert metrics["val/aging/mae"] == pytest.approx(torch.stack(maes).mean().item(), rel=1e-5)
    assert metrics["val/aging/in_window"] == pytest.approx(torch.stack(inside).mean().item())


class _Modes(L.Callback):
    """Records, at every training step, which parts of the network are in train mode and the frozen encoder's
    BatchNorm statistics."""

    def __init__(self):
        self.modes = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        net = pl_module.net
        self.modes.append({"encoder": net.encoder.training, "decoder": net.decoder.training,
                           "pretrained_encoder": net.pretrained_encoder.training,
                           "frozen": any(m.training for m in pl_module.frozen.modules())})


def _bn_stats(module: torch.nn.Module) -> list[torch.Tensor]:
    return [b.clone() for n, b in module.named_buffers() if "running_mean" in n or "running_var" in n]


@pytest.mark.parametrize("stage,trained", [("s1", "encoder"), ("s2", "decoder")])
def test_fit_sets_the_stage_modes_and_frozen_bn_statistics_never_move(tmp_path, stage, trained):
    """Lightning never calls train() at fit start and restores the pre-validation modes after validation: the
    module must set them itself, at every step (including the ones after a validation)."""
    _, module, dm = _setup(tmp_path, f"stage={stage}", "lr=1e-3")
    module.eval()  # as a loaded network comes: everything in eval
    frozen_bn = _bn_stats(module.net.pretrained_encoder) + _bn_stats(module.frozen)
    other = "decoder" if trained == "encoder" else "encoder"
    frozen_bn += _bn_stats(getattr(module.net, other))
    trained_bn = _bn_stats(module.net.encoder) if trained == "encoder" else []
    cb = _Modes()
    _trainer(max_steps=3, val_check_interval=1, limit_val_batches=1, callbacks=[cb]).fit(module, datamodule=dm)
    assert len(cb.modes) == 3
    for m in cb.modes:
        assert m[trained] and not m[other] and not m["pretrained_encoder"] and not m["frozen"], m
    after = _bn_stats(module.net.pretrained_encoder) + _bn_stats(module.frozen)
    after += _bn_stats(getattr(module.net, other))
    assert all(torch.equal(b, c) for b, c in zip(frozen_bn, after))
    if trained == "encoder":  # S1 trains the age encoder with live BatchNorm statistics, like SAM
        assert not all(torch.equal(b, c) for b, c in zip(trained_bn, _bn_stats(module.net.encoder)))


class _Faces(torch.utils.data.Dataset):
    """Two images with an age label, two without (NaN), in a fixed order."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(4, 3, 256, 256, generator=g) * 2 - 1
        self.age = torch.tensor([23.0, float("nan"), 61.0, float("nan")])

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"image": self.x[i], "age": self.age[i]}


def test_input_age_label_uses_labels_and_counts_missing_ones(tmp_path, caplog):
    _, module, _ = _setup(tmp_path, "model.input_age=label", "target_age.no_aging_prob=0")
    data = _Faces()
    seen = []

    class Ages(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(pl_module._last_images["input_age"].clone())

    loader = torch.utils.data.DataLoader(data, batch_size=2, shuffle=False)
    with caplog.at_level("WARNING", logger="agingnet.module"):
        _trainer(max_steps=2, limit_val_batches=0, callbacks=[Ages()]).fit(module, train_dataloaders=loader)
    with torch.no_grad():
        dex = module.frozen.dex.predict_age(data.x).clamp(0, 100)
    expected = torch.where(torch.isnan(data.age), dex, data.age)
    torch.testing.assert_close(torch.cat(seen), expected)
    assert module.label_fallbacks == 2
    assert sum("no age label" in r.getMessage() for r in caplog.records) == 1  # said once, counted always


def test_random_frozen_networks_are_announced_once(tmp_path, caplog):
    from agingnet import models

    models._WARNED_RANDOM.clear()
    with caplog.at_level("WARNING", logger="agingnet.models"):
        random = ["model.frozen.allow_random=false", "model.weights.arcface=null", "model.weights.dex=null"]
        _setup(tmp_path, *random)
        _setup(tmp_path, *random)
    msgs = [r.getMessage() for r in caplog.records if "RANDOM weights" in r.getMessage()]
    assert len(msgs) == 3, msgs  # arcface, dex and LPIPS's backbone, once each
    assert any("model.weights.arcface" in m for m in msgs) and any("model.weights.dex" in m for m in msgs)
    models._WARNED_RANDOM.clear()
    caplog.clear()
    with caplog.at_level("WARNING", logger="agingnet.models"):
        _setup(tmp_path)  # the tiny config opts out explicitly
    assert not [r for r in caplog.records if "RANDOM weights" in r.getMessage()]


def test_random_lpips_backbone_does_not_depend_on_the_global_rng():
    """A random LPIPS backbone (tiny configs) is seeded: two processes, or one after other draws, build the same."""
    from agingnet.models import build_lpips

    a = build_lpips(backbone_pretrained=False)
    torch.rand(17)
    b = build_lpips(backbone_pretrained=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

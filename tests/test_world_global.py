"""The world's global aging model: stage ``world`` through a real fit, and the shipped ``weights/sam.pt``
judged on held-out actors with the world's DEX and identity network (checks written out here)."""

from __future__ import annotations

import hashlib
import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from agingnet.config import compose_config
from agingnet.nn.aging_net import AgingNet
from agingnet.train import train
from agingnet.world import weights as world_weights
from agingnet.world.render import render

FAST = ["experiment=world_global", "trainer.max_steps=2", "data.batch_size=2", "val_max_batches=0",
        "callbacks=none", "logger=none", "data.num_workers=0", "data.train.n=16", "model.scheduler.warmup_steps=1"]


class _Snapshot(L.Callback):
    """The network's and the frozen networks' weights when fit starts and when it ends."""

    def on_train_start(self, trainer, pl_module):
        self.before = {k: v.detach().clone() for k, v in pl_module.net.named_parameters()}  # BN statistics move
        self.latent_avg = pl_module.net.latent_avg.clone()
        self.frozen = {k: v.detach().clone() for k, v in pl_module.frozen.state_dict().items()}
        self.terms = set(pl_module.loss.terms)
        self.weights = {k: w.weight for k, w in pl_module.loss.weights.items()}  # as the module built them

    def on_train_end(self, trainer, pl_module):
        self.after = {k: v.detach().clone() for k, v in pl_module.net.named_parameters()}
        self.latent_avg_after = pl_module.net.latent_avg.clone()
        self.frozen_after = {k: v.detach().clone() for k, v in pl_module.frozen.state_dict().items()}


def _changed(before: dict, after: dict, prefix: str) -> bool:
    return any(not torch.equal(v, after[k]) for k, v in before.items() if k.startswith(prefix))


def test_world_stage_trains_both_encoders_and_the_decoder_with_one_pass(tmp_path, monkeypatch):
    calls = []
    original = AgingNet.forward

    def counting(self, x, noise_mode="random"):
        calls.append(x.shape[0])
        return original(self, x, noise_mode)

    monkeypatch.setattr(AgingNet, "forward", counting)
    snap = _Snapshot()
    train(compose_config(FAST, output_dir=tmp_path / "run"), extra_callbacks=[snap])
    after = snap.after
    for part in ("encoder.", "pretrained_encoder.", "decoder."):
        assert _changed(snap.before, after, part), f"stage world left {part[:-1]} untouched"
    assert torch.equal(snap.latent_avg, snap.latent_avg_after)  # w̄ is a buffer: it stays
    assert all(torch.equal(v, snap.frozen_after[k]) for k, v in snap.frozen.items())
    assert calls == [2, 2], "cycle_lambda=0 must skip the cycle pass (one forward per step)"


def test_world_stage_with_a_cycle_runs_two_passes(tmp_path, monkeypatch):
    calls = []
    original = AgingNet.forward
    monkeypatch.setattr(AgingNet, "forward", lambda self, x, noise_mode="random": calls.append(1) or
                        original(self, x, noise_mode))
    train(compose_config([*FAST, "trainer.max_steps=1", "cycle_lambda=0.5"], output_dir=tmp_path / "run"))
    assert len(calls) == 2


def test_second_stage_continues_a_model_with_sams_aging_and_identity_terms(tmp_path):
    """experiment=world_global_age: the ground-truth term plus SAM's aging and identity terms (the world DEX and
    identity network), starting from the model given as init_from (here the shipped one stands in for a first
    stage's export)."""
    snap = _Snapshot()
    cfg = compose_config(["experiment=world_global_age", *FAST[1:], f"init_from={world_weights.weight_path('sam')}"],
                         output_dir=tmp_path / "run")
    train(cfg, extra_callbacks=[snap])
    shipped = torch.load(world_weights.weight_path("sam"), map_location="cpu", weights_only=True)["state_dict"]
    start = snap.before["decoder.conv1.conv.weight"]
    torch.testing.assert_close(start, shipped["decoder.conv1.conv.weight"].float())  # it started from the export
    assert _changed(snap.before, snap.after, "decoder.")
    assert snap.terms == {"gt", "aging", "id"}
    assert snap.weights == {"gt": 1.0, "aging": 5.0, "id": 0.1}  # SAM's aging 5 and identity 0.1


# ---------------------------------------------------------------- the shipped model

HELD_OUT = [100021, 100022, 100023, 100024, 100025, 100026]  # actors: never drawn in any training


def _img(identity: int, age: float, photo=None) -> torch.Tensor:
    return torch.from_numpy(render(identity, age, photo=photo)).permute(2, 0, 1).float() / 127.5 - 1


@pytest.fixture(scope="module")
def shipped():
    from agingnet.pretrained import load_aging_model, load_arcface, load_dex

    net = load_aging_model(world_weights.weight_path("sam"))
    return net, load_dex(world_weights.weight_path("dex")), load_arcface(world_weights.weight_path("arcface"))


@torch.no_grad()
def _age(net, x: torch.Tensor, years: float) -> torch.Tensor:
    plane = torch.full((x.shape[0], 1, *x.shape[-2:]), years / 100)
    return net(torch.cat([x, plane], 1), noise_mode="const")[0]


def test_shipped_global_model_loads_in_sam_layout_as_float32(shipped):
    net, _, _ = shipped
    raw = torch.load(world_weights.weight_path("sam"), weights_only=True)
    assert set(raw) == {"state_dict", "latent_avg", "opts"}  # SAM's published layout (a base: no global step)
    assert raw["state_dict"]["decoder.conv1.conv.weight"].dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert net.pretrained_encoder is not None and net.decoder.size == 256


def test_shipped_global_model_ages_unseen_actors(shipped):
    """Aged to 25 and to 70 from a photo at 40: the world DEX reads each target within the goal's 5 years on
    average, the output is nearer the true aged face than the input is, and each output is nearer its own input's
    identity than the other actors'."""
    net, dex, arc = shipped
    x = torch.stack([_img(i, 40, photo=(5, k)) for k, i in enumerate(HELD_OUT)])
    young, old = _age(net, x, 25), _age(net, x, 70)
    with torch.no_grad():
        read_young, read_old = dex.predict_age(young), dex.predict_age(old)
    # measured on these six actors: MAE 1.6 y at 25, 2.5 y at 70 (the stage-1 model read ~30 and ~46 here)
    assert (read_young - 25).abs().mean() <= 5 and (read_old - 70).abs().mean() <= 5, (read_young, read_old)
    truth = torch.stack([_img(i, 70) for i in HELD_OUT])
    assert F.mse_loss(old, truth) < 0.8 * F.mse_loss(x, truth)

    def emb(img):  # SPEC §4's identity feature: crop C, pool to 112, IR-SE (normalized)
        return F.normalize(arc(F.adaptive_avg_pool2d(img[:, :, 35:223, 32:220], (112, 112))), dim=1)

    with torch.no_grad():
        cos = emb(old) @ emb(x).T
    own, other = cos.diag(), (cos.sum(1) - cos.diag()) / (len(HELD_OUT) - 1)
    assert (own > other).float().mean() >= 5 / 6, cos


def test_manifest_records_the_global_model_and_weights_stay_small():
    man = world_weights.manifest()["files"]
    entry = man["sam.pt"]
    path = world_weights.weight_path("sam")
    assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert {"age_mae", "gt_l2", "input_gt_l2", "id_cos", "before"} <= set(entry["metrics"])
    assert "experiment=world_global" in json.dumps(entry)
    total = sum(world_weights.weight_path(n).stat().st_size for n in world_weights.FILES)
    assert total <= 20 * 2**20


# ---------------------------------------------------------------- the exact style rescaling


def _tiny_net():
    from agingnet.models import build_aging_net

    return build_aging_net(size=32, style_dim=32, n_mlp=1, channels={4: 16, 8: 16, 16: 8, 32: 8},
                           encoder_widths=[16, 16, 32, 32], encoder_units=[1, 1, 1, 1]).eval()


def test_style_rescaling_is_exact_and_bounds_the_w_norm():
    from agingnet.world.global_model import normalize_style_scales

    net = _tiny_net()
    big = [0, 4]  # even W+ indices: they feed only a demodulated conv (index 0: conv1, 4: the 16-px second conv)
    with torch.no_grad():
        for i in big:
            for enc in (net.encoder, net.pretrained_encoder):
                enc.styles[i].linear.weight.mul_(500.0)
                enc.styles[i].linear.bias.add_(300.0)
    g = torch.Generator().manual_seed(0)
    x, ages = torch.rand(6, 3, 256, 256, generator=g) * 2 - 1, torch.tensor([20.0, 30, 40, 50, 60, 70])
    inp = torch.cat([x, (ages / 100).view(-1, 1, 1, 1).expand(-1, 1, 256, 256)], 1)
    with torch.no_grad():
        out_before, codes_before = net(inp, noise_mode="const")
    rms_before = (codes_before - net.latent_avg).pow(2).mean((0, 2)).sqrt()
    factors = normalize_style_scales(net, x, ages)
    assert set(factors) >= set(big) and all(i % 2 == 0 for i in factors)  # odd indices also feed a ToRGB
    with torch.no_grad():
        out_after, codes_after = net(inp, noise_mode="const")
    torch.testing.assert_close(out_after, out_before, atol=1e-4, rtol=1e-4)
    rms_after = (codes_after - net.latent_avg).pow(2).mean((0, 2)).sqrt()
    for i in big:
        assert rms_before[i] > 100 and rms_after[i] == pytest.approx(1.0, rel=1e-3)
    odd = [i for i in range(net.n_styles) if i % 2]
    torch.testing.assert_close(codes_after[:, odd], codes_before[:, odd])

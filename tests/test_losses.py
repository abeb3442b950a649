"""Loss terms (reference values, gradients) and the registry (weights, zero terms, aging/decoder/stage rules)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reference import pool_matrix
from torch import nn

from agingnet.losses import FrozenNets, LossContext, LossStack, WeightSchedule
from agingnet.losses.adaptive_w_norm import AdaptiveWNormLoss
from agingnet.losses.aging import AgingLoss
from agingnet.losses.id import IDLoss
from agingnet.losses.l2 import L2Loss
from agingnet.losses.w_norm import WNormLoss


class MeanColourEmbed(nn.Module):
    """A deterministic 'face embedding': normalized per-channel means of a few regions."""

    input_size = 112

    def forward(self, x):
        parts = [x[:, :, :56, :56], x[:, :, 56:, :56], x[:, :, :56, 56:], x[:, :, 56:, 56:]]
        return F.normalize(torch.cat([p.mean((2, 3)) for p in parts], 1) + 0.1, dim=1)


class MeanBrightnessAge(nn.Module):
    """Age in years = 50 + 25·mean(x)."""

    def predict_age(self, x):
        return 50 + 25 * x.mean((1, 2, 3))


def make_ctx(pass_name="real", no_aging=False, step=0, stage="s2", train_decoder=True, seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, 256, 256, generator=g) * 2 - 1
    y_hat = (x + 0.3 * torch.randn(b, 3, 256, 256, generator=g)).clamp(-1, 1).requires_grad_(True)
    codes = torch.randn(b, 4, 8, generator=g, requires_grad=True)
    nets = FrozenNets(arcface=MeanColourEmbed(), dex=MeanBrightnessAge(), lpips=None)
    return LossContext(x=x, y=x, y_hat=y_hat, codes=codes, latent_avg=torch.zeros(4, 8),
                       input_ages=torch.tensor([0.3, 0.5])[:b], target_ages=torch.tensor([0.4, 0.2])[:b], nets=nets,
                       no_aging=no_aging, pass_name=pass_name, stage=stage, step=step, train_decoder=train_decoder)


def test_l2_and_crop_reference():
    ctx = make_ctx()
    v, _ = L2Loss()(ctx)
    assert torch.allclose(v, ((ctx.y_hat - ctx.y) ** 2).mean())
    vc, _ = L2Loss(crop=True)(ctx)
    ref = ((ctx.y_hat[:, :, 35:223, 32:220] - ctx.y[:, :, 35:223, 32:220]) ** 2).mean()
    assert torch.allclose(vc, ref)
    vc.backward()
    assert ctx.y_hat.grad[:, :, :35].abs().sum() == 0 and ctx.y_hat.grad[:, :, 35:223, 32:220].abs().sum() > 0


def test_w_norm_reference():
    ctx = make_ctx()
    v, _ = WNormLoss()(ctx)
    ref = sum(torch.sqrt((c ** 2).sum()) for c in ctx.codes) / 2
    assert torch.allclose(v, ref)


def test_id_loss_weighted_and_improve():
    ctx = make_ctx()
    f_hat = ctx.nets.embed_face(ctx.y_hat)
    f_y = ctx.nets.embed_face(ctx.y)
    sims = (f_hat * f_y).sum(1)
    v, logs = IDLoss()(ctx)
    assert torch.allclose(v, (1 - sims).mean())
    w = 0.25 * torch.cos(math.pi * torch.tensor([0.1, 0.3])) + 0.75
    vw, _ = IDLoss(weighted=True)(ctx)
    assert torch.allclose(vw, (w * (1 - sims)).mean())
    # x ≡ y: ⟨f(y), f(x)⟩ = 1, so id_improve = mean(sim) − 1
    assert torch.allclose(logs["id_improve"], sims.mean() - 1, atol=1e-6)
    vw.backward()
    assert ctx.y_hat.grad is not None and ctx.y_hat.grad.abs().sum() > 0


def test_aging_loss_reference():
    ctx = make_ctx()
    v, logs = AgingLoss()(ctx)
    ages = 50 + 25 * ctx.y_hat.mean((1, 2, 3))
    assert torch.allclose(v, ((ages / 100 - ctx.target_ages) ** 2).mean())
    assert torch.allclose(logs["output_age"], ages.mean(), atol=1e-4)


def test_adaptive_w_norm_inert_without_extrapolation_and_formula():
    ctx = make_ctx()
    v, logs = AdaptiveWNormLoss(lambda_adapt=20)(ctx)
    assert v.item() == 0 and logs["active"].item() == 0 and v.requires_grad
    ctx.extra["extrapolation"] = True
    v, _ = AdaptiveWNormLoss(lambda_adapt=20)(ctx)
    w = 1 - (0.25 * torch.cos(math.pi * torch.tensor([0.1, 0.3])) + 0.75)
    ref = (20 * w * ctx.codes.flatten(1).norm(dim=1)).sum()
    assert torch.allclose(v, ref)


def test_frozen_nets_missing_network_errors():
    ctx = make_ctx()
    ctx.nets.dex = None
    with pytest.raises(RuntimeError, match="DEX"):
        AgingLoss()(ctx)


TERMS = {
    "l2": {"_target_": "agingnet.losses.l2.L2Loss", "weight": 0.1, "weight_aging": 0.25},
    "w_norm": {"_target_": "agingnet.losses.w_norm.WNormLoss", "weight": 0.003, "decoder_scale": 0.5},
    "id": {"_target_": "agingnet.losses.id.IDLoss", "weight": 0.0},
    "roi": {"_target_": "agingnet.losses.l2.L2Loss", "crop": True, "weight": 0.0,
            "stage_weights": {"s1": 0.0, "s2": 0.05}, "passes": ["real"]},
}


def test_registry_zero_weight_terms_are_not_built():
    stack = LossStack(TERMS, stage="s2")
    assert set(stack.terms) == {"l2", "w_norm", "roi"}
    assert "id" not in stack


def test_registry_total_aging_weights_and_decoder_scale():
    stack = LossStack(TERMS, stage="s2")
    ctx = make_ctx(pass_name="real", no_aging=False)
    total, logs = stack(ctx)
    l2 = ((ctx.y_hat - ctx.y) ** 2).mean()
    wn = ctx.codes.flatten(1).norm(dim=1).mean()
    crop = ((ctx.y_hat - ctx.y)[:, :, 35:223, 32:220] ** 2).mean()
    assert torch.allclose(total, 0.25 * l2 + 0.003 * 0.5 * wn + 0.05 * crop)
    assert set(logs) >= {"real/l2", "real/w_norm", "real/roi", "real/total"}
    # no-aging batch: the plain l2 weight; the cycle pass never uses weight_aging and skips real-only terms
    ctx_na = make_ctx(pass_name="real", no_aging=True)
    assert stack.weight_of("l2", ctx_na) == pytest.approx(0.1)
    ctx_c = make_ctx(pass_name="cycle")
    total_c, logs_c = stack(ctx_c)
    assert "cycle/roi" not in logs_c
    assert torch.allclose(total_c, 0.1 * ((ctx_c.y_hat - ctx_c.y) ** 2).mean()
                          + 0.0015 * ctx_c.codes.flatten(1).norm(dim=1).mean())
    # decoder frozen (S1): no decoder scale; stage s1 turns the ROI term off
    s1 = LossStack(TERMS, stage="s1")
    ctx1 = make_ctx(stage="s1", train_decoder=False)
    assert s1.weight_of("w_norm", ctx1) == pytest.approx(0.003)
    assert s1.weight_of("roi", ctx1) == 0.0


def test_registry_p3_falls_back_to_s2_stage_weight():
    stack = LossStack(TERMS, stage="p3")
    assert stack.weight_of("roi", make_ctx(stage="p3")) == pytest.approx(0.05)


def test_registry_schedule_applies_by_step():
    terms = {"l2": {"_target_": "agingnet.losses.l2.L2Loss", "weight": 0.1, "schedule": "100:0.2,200:0.0"}}
    stack = LossStack(terms)
    assert stack.weight_of("l2", make_ctx(step=50, no_aging=True)) == pytest.approx(0.1)
    assert stack.weight_of("l2", make_ctx(step=150, no_aging=True)) == pytest.approx(0.2)
    assert stack.weight_of("l2", make_ctx(step=250, no_aging=True)) == 0.0
    # a schedule that turns a zero-weight term on later keeps it built
    assert "l2" in LossStack({"l2": {**terms["l2"], "weight": 0.0}})


def test_registry_bad_configs():
    with pytest.raises(ValueError, match="no _target_"):
        LossStack({"l2": {"weight": 1.0}})
    with pytest.raises(ValueError, match="unknown stage"):
        LossStack({"l2": {"_target_": "agingnet.losses.l2.L2Loss", "weight": 1.0, "stage_weights": {"s9": 1}}})
    with pytest.raises(ValueError, match="step:value"):
        LossStack({"l2": {"_target_": "agingnet.losses.l2.L2Loss", "weight": 1.0, "schedule": "oops"}})
    with pytest.raises(TypeError, match="not a LossTerm"):
        LossStack({"l2": {"_target_": "torch.nn.Identity", "weight": 1.0}})
    with pytest.raises(ValueError, match="stage"):
        LossStack({}, stage="s4")


@pytest.mark.parametrize("spec,step,expected", [
    ("0:0.05,20000:0.07,36000:0.05", 0, 0.05),
    ("0:0.05,20000:0.07,36000:0.05", 19999, 0.05),
    ("0:0.05,20000:0.07,36000:0.05", 20000, 0.07),
    ("0:0.05,20000:0.07,36000:0.05", 99999, 0.05),
    ("1000:0.5", 999, 0.3),  # before the first entry: the base weight
    ("", 5, 0.3),
])
def test_schedule_values(spec, step, expected):
    assert WeightSchedule(spec, base=0.3)(step) == pytest.approx(expected)


@pytest.mark.parametrize("spec,match", [
    ("10", "step:value"), ("a:1", "integer step"), ("10:x", "float value"), ("20:1,10:2", "increase"),
    ("-5:1", "negative"), ("10:1,,20:2", "step:value"),
])
def test_schedule_malformed(spec, match):
    with pytest.raises(ValueError, match=match):
        WeightSchedule(spec, base=0.0)


# ------------------------------------------------------------------------------------------- id crop geometry
class RecordingEmbed(MeanColourEmbed):
    """Records what the identity network is given."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return super().forward(x)


@pytest.mark.parametrize("side", [256, 1024])
def test_id_loss_feeds_crop_c_pooled_to_112(side):
    """SPEC §4: f(·) pools the image to 256, takes rows 35:223 and columns 32:220, pools that to 112."""
    g = torch.Generator().manual_seed(side)
    y_hat = torch.rand(2, 3, side, side, generator=g) * 2 - 1
    y = torch.rand(2, 3, side, side, generator=g) * 2 - 1
    emb = RecordingEmbed()
    ctx = LossContext(x=y, y=y, y_hat=y_hat, codes=torch.zeros(2, 4, 8), latent_avg=torch.zeros(4, 8),
                      input_ages=torch.zeros(2), target_ages=torch.zeros(2), nets=FrozenNets(arcface=emb))
    IDLoss()(ctx)
    assert [tuple(t.shape) for t in emb.inputs] == [(2, 3, 112, 112)] * 2  # ŷ, then y (x ≡ y: embedded once)
    p256, p112 = pool_matrix(side, 256), pool_matrix(188, 112)
    for got, img in zip(emb.inputs, (y_hat, y)):
        expect = p112 @ (p256 @ img.double() @ p256.T)[:, :, 35:223, 32:220] @ p112.T
        torch.testing.assert_close(got, expect.float(), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- lpips
@pytest.fixture(scope="module")
def lpips_pair():
    """(agingnet's LPIPS net, the `lpips` package's own net with the same random AlexNet backbone).

    No pretrained AlexNet is needed: the backbone is random (``backbone_pretrained=False``) and copied into the
    reference; the v0.1 linear heads of both come from the files shipped in the package.
    """
    lpips = pytest.importorskip("lpips")
    from agingnet.models import build_lpips

    torch.manual_seed(0)
    ours = build_lpips(backbone_pretrained=False)
    with warnings.catch_warnings():  # torchvision's notice about the package's `pretrained` argument
        warnings.simplefilter("ignore", UserWarning)
        ref = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False).eval()
    backbone = {k: v for k, v in ours.state_dict().items() if k.startswith("net.")}
    assert backbone and not ref.load_state_dict(backbone, strict=False).unexpected_keys
    return ours, ref


def test_lpips_heads_are_the_shipped_v01_alex_weights(lpips_pair):
    import lpips

    ours, _ = lpips_pair
    shipped = torch.load(Path(lpips.__file__).parent / "weights/v0.1/alex.pth", map_location="cpu",
                         weights_only=True)
    state = ours.state_dict()
    assert len(shipped) == 5
    for k, v in shipped.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)
    assert not any(p.requires_grad for p in ours.parameters()) and not ours.training


@pytest.mark.parametrize("crop", [False, True])
def test_lpips_loss_matches_the_lpips_package(lpips_pair, crop):
    from agingnet.losses.lpips_loss import LPIPSLoss

    ours, ref = lpips_pair
    g = torch.Generator().manual_seed(1)
    y = torch.rand(2, 3, 256, 256, generator=g) * 2 - 1
    y_hat = (y + 0.4 * torch.randn(2, 3, 256, 256, generator=g)).clamp(-1, 1)
    y_hat[1] = y[1]  # an identical pair scores 0
    y_hat.requires_grad_(True)
    ctx = LossContext(x=y, y=y, y_hat=y_hat, codes=torch.zeros(2, 4, 8), latent_avg=torch.zeros(4, 8),
                      input_ages=torch.zeros(2), target_ages=torch.zeros(2), nets=FrozenNets(lpips=ours))
    value, logs = LPIPSLoss(crop=crop)(ctx)
    a, b = (y_hat[:, :, 35:223, 32:220], y[:, :, 35:223, 32:220]) if crop else (y_hat, y)
    with torch.no_grad():
        per_pair = ref(a.detach(), b)  # [-1, 1] inputs, the package's default (normalize=False)
    assert per_pair.shape == (2, 1, 1, 1) and per_pair[1].item() == pytest.approx(0.0, abs=1e-6)
    assert value.ndim == 0 and logs == {}
    assert value.item() == pytest.approx(per_pair.mean().item(), rel=1e-5) and value.item() > 0.01
    value.backward()
    assert y_hat.grad.abs().sum() > 0
    if crop:  # nothing outside crop C gets gradient
        assert y_hat.grad[:, :, :35].abs().sum() == 0 and y_hat.grad[:, :, :, 220:].abs().sum() == 0


def test_lpips_loss_without_network_names_it():
    from agingnet.losses.lpips_loss import LPIPSLoss

    with pytest.raises(RuntimeError, match=r"needs the LPIPS network \(model.lpips\)"):
        LPIPSLoss()(make_ctx())

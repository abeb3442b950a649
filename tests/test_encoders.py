"""IR-SE50, the pSp/SAM GradualStyleEncoder (upstream and fork variant), DEX and the blender: key layouts of
the published files, output shapes at tiny sizes, and the formulas behind them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from agingnet.nn import DEX, Blender, GradualStyleEncoder, IRSEBackbone
from agingnet.nn.irse import BottleneckIRSE

MANIFESTS = Path(__file__).parent / "data" / "manifests"
TINY = dict(widths=(16, 16, 32, 32), units=(1, 1, 1, 1))  # SE reduction 16 needs width ≥ 16


def manifest(name: str, key: str = "state_dict") -> dict[str, list[int]]:
    return json.loads((MANIFESTS / f"{name}.keys.json").read_text())[key]


def sub(m: dict[str, list[int]], prefix: str) -> dict[str, list[int]]:
    return {k[len(prefix):]: v for k, v in m.items() if k.startswith(prefix)}


def shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def meta(factory):
    """Full-size modules built on the meta device: shapes and names without allocating or initialising."""
    with torch.device("meta"):
        return factory()


@pytest.fixture(scope="module")
def fork_manifest() -> dict[str, list[int]]:
    return manifest("mtm_fork_checkpoint")


# ---------------------------------------------------------------- published key layouts (full size)


def test_irse50_matches_manifest():
    assert shapes(meta(IRSEBackbone)) == manifest("model_ir_se50")


@pytest.mark.parametrize("name,prefix,input_nc", [
    ("psp_ffhq_encode", "encoder.", 3),
    ("sam_ffhq_aging", "encoder.", 4),
    ("sam_ffhq_aging", "pretrained_encoder.", 3),
])
def test_gradual_style_encoder_matches_manifest(name, prefix, input_nc):
    expected = sub(manifest(name), prefix)
    assert len(expected) == 621
    assert shapes(meta(lambda: GradualStyleEncoder(input_nc=input_nc))) == expected


@pytest.mark.parametrize("prefix,input_nc", [("encoder.", 4), ("pretrained_encoder.", 3)])
def test_fork_variant_matches_fork_manifest(fork_manifest, prefix, input_nc):
    expected = sub(fork_manifest, prefix)
    assert len(expected) == 657
    got = shapes(meta(lambda: GradualStyleEncoder(input_nc=input_nc, fork_variant=True)))
    assert got == expected
    upstream = shapes(meta(lambda: GradualStyleEncoder(input_nc=input_nc)))
    assert got != upstream  # the variant is really a different layout


def test_dex_matches_manifest():
    expected = {k.replace("-", "_"): v for k, v in manifest("dex_age_classifier").items()}
    assert shapes(meta(DEX)) == expected


def test_blender_matches_fork_manifest_and_parameter_count(fork_manifest):
    bl = meta(Blender)
    assert shapes(bl) == sub(fork_manifest, "blender.")
    # Σ over the layers of SPEC §1: 18 bottlenecks, global MLP, age MLP, 18 fc heads (weights + biases).
    lin = lambda i, o: i * o + o  # noqa: E731
    count = 18 * (lin(512, 32) + lin(32, 32)) + lin(576, 128) + lin(128, 128) + lin(1, 16) + lin(16, 16) \
        + 18 * (lin(656, 512) + lin(512, 512))
    in_file = sum(math.prod(shape) for shape in sub(fork_manifest, "blender.").values())  # the fork's tensors
    assert sum(p.numel() for p in bl.parameters()) == count == in_file
    assert in_file == 11_187_888  # the count SPEC §1 states, from the fork's file (not from this test's sums)


# ---------------------------------------------------------------- IR-SE backbone


def test_irse_tiny_output_is_l2_normalized():
    torch.manual_seed(0)
    net = IRSEBackbone(embed_dim=24, **TINY).eval()
    y = net(torch.randn(3, 3, 112, 112))
    assert y.shape == (3, 24)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(3))


def test_irse_fork_variant_runs_at_56px():
    torch.manual_seed(0)
    net = IRSEBackbone(input_size=56, embed_dim=16, fork_variant=True, **TINY).eval()
    assert net(torch.randn(2, 3, 56, 56)).shape == (2, 16)
    with pytest.raises(ValueError, match=r"IR-SE expects \[B,3,56,56\], got \(2, 3, 112, 112\)"):
        net(torch.randn(2, 3, 112, 112))


def test_irse_bad_input_size():
    with pytest.raises(ValueError, match=r"input_size 112 does not reduce to 7×7 \(fork_variant=True\)"):
        IRSEBackbone(input_size=112, fork_variant=True, **TINY)


def test_irse_unit_against_written_out_formula():
    """res = SE(BN(conv3×3_s(PReLU(conv3×3(BN(u)))))), shortcut = BN(conv1×1_s(u));
    SE(v) = v·σ(fc2(relu(fc1(avg v))))."""
    torch.manual_seed(1)
    unit = BottleneckIRSE(16, 32, 2)
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for m in unit.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
            if isinstance(m, torch.nn.PReLU):
                m.weight.uniform_(0.0, 0.5)
    unit.eval()
    x = torch.randn(2, 16, 8, 8)

    def bn(v, m):
        return (v - m.running_mean[:, None, None]) / torch.sqrt(m.running_var[:, None, None] + m.eps) \
            * m.weight[:, None, None] + m.bias[:, None, None]

    r = unit.res_layer
    v = F.conv2d(bn(x, r[0]), r[1].weight, padding=1)
    v = torch.where(v >= 0, v, r[2].weight[:, None, None] * v)
    v = bn(F.conv2d(v, r[3].weight, stride=2, padding=1), r[4])
    se = r[5]
    squeeze = F.relu(F.conv2d(v.mean(dim=(2, 3), keepdim=True), se.fc1.weight))
    gate = torch.sigmoid(F.conv2d(squeeze, se.fc2.weight))
    sc = unit.shortcut_layer
    ref = v * gate + bn(F.conv2d(x, sc[0].weight, stride=2), sc[1])
    torch.testing.assert_close(unit(x), ref, atol=1e-5, rtol=1e-5)
    # in == depth: the shortcut is a stride-s subsampling (MaxPool with kernel 1)
    same = BottleneckIRSE(16, 16, 2)
    torch.testing.assert_close(same.shortcut_layer(x), x[:, :, ::2, ::2])


# ---------------------------------------------------------------- GradualStyleEncoder


@pytest.fixture(scope="module")
def tiny_encoder() -> GradualStyleEncoder:
    torch.manual_seed(2)
    return GradualStyleEncoder(input_nc=4, n_styles=10, style_dim=32, **TINY).eval()


def test_full_encoder_taps_are_spec_units():
    assert meta(GradualStyleEncoder).taps == (6, 20, 23)


@pytest.mark.parametrize("fork", [False, True])
def test_encoder_tiny_shapes_and_taps(fork):
    torch.manual_seed(3)
    enc = GradualStyleEncoder(input_nc=3, n_styles=10, style_dim=32, fork_variant=fork, input_size=128,
                              **TINY).eval()
    sizes = {}
    hooks = [enc.body[t].register_forward_hook(lambda m, i, o, t=t: sizes.__setitem__(t, tuple(o.shape[1:])))
             for t in enc.taps]
    out = enc(torch.randn(2, 3, 128, 128))
    for h in hooks:
        h.remove()
    assert out.shape == (2, 10, 32)
    f = 2 if fork else 1  # the fork's stride-1 first stage doubles every map
    assert [sizes[t] for t in enc.taps] == [(16, 32 * f, 32 * f), (32, 16 * f, 16 * f), (32, 8 * f, 8 * f)]
    # one stride-2 conv per halving down to 1×1: log2(8/16/32) upstream at 128 px, one more in the fork
    n_convs = [sum(isinstance(m, torch.nn.Conv2d) for m in enc.styles[i].convs) for i in (0, 3, 7)]
    assert n_convs == [3 + fork, 4 + fork, 5 + fork]


def test_encoder_pyramid_routing(tiny_encoder):
    """styles 0–2 see c3 only, 3–6 also latlayer1(c2), 7+ also latlayer2(c1) (through p2 → p1)."""
    x = torch.randn(1, 4, 64, 64)
    for sl, l1, l2 in ((slice(0, 3), False, False), (slice(3, 7), True, False), (slice(7, 10), True, True)):
        tiny_encoder.zero_grad(set_to_none=True)
        tiny_encoder(x)[:, sl].square().sum().backward()
        g1, g2 = tiny_encoder.latlayer1.weight.grad, tiny_encoder.latlayer2.weight.grad
        assert (g1 is not None and g1.abs().sum() > 0) == l1
        assert (g2 is not None and g2.abs().sum() > 0) == l2
        assert tiny_encoder.styles[sl.start].linear.weight.grad.abs().sum() > 0


def test_encoder_gradient_reaches_input(tiny_encoder):
    x = torch.randn(2, 4, 64, 64, requires_grad=True)
    tiny_encoder(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and (x.grad[:, 3].abs().sum() > 0)


def test_encoder_errors():
    with pytest.raises(ValueError, match="needs 4 stages"):
        GradualStyleEncoder(widths=(8, 16, 32), units=(1, 1, 1))
    with pytest.raises(ValueError, match=r"last stage width \(32\) must equal style_dim \(64\)"):
        GradualStyleEncoder(style_dim=64, **TINY)
    enc = GradualStyleEncoder(input_nc=4, n_styles=4, style_dim=32, **TINY)
    with pytest.raises(ValueError, match=r"encoder expects \[B,4,H,W\], got \(1, 3, 64, 64\)"):
        enc(torch.randn(1, 3, 64, 64))


# ---------------------------------------------------------------- DEX


@pytest.fixture(scope="module")
def tiny_dex() -> DEX:
    torch.manual_seed(4)
    return DEX(widths=(4, 8, 8, 16, 16), fc_dim=32, input_size=64).eval()


def test_dex_predict_age_is_softmax_expectation(tiny_dex):
    x = torch.rand(3, 3, 80, 80) * 2 - 1
    with torch.no_grad():
        logits = tiny_dex(x).double().numpy()
        age = tiny_dex.predict_age(x).numpy()
    assert logits.shape == (3, 101)
    for b in range(3):  # Σ_j j·e^{l_j} / Σ_j e^{l_j}, stabilised by the max
        e = np.exp(logits[b] - logits[b].max())
        assert age[b] == pytest.approx(sum(j * e[j] for j in range(101)) / e.sum(), abs=1e-4)


def test_dex_peaked_head_gives_that_age(tiny_dex):
    dex = DEX(widths=(4, 8, 8, 16, 16), fc_dim=32, input_size=64).eval()
    dex.load_state_dict(tiny_dex.state_dict())
    with torch.no_grad():
        dex.fc8_101.weight.zero_()
        dex.fc8_101.bias.zero_()
        dex.fc8_101.bias[37] = 50.0
        age = dex.predict_age(torch.zeros(2, 3, 64, 64))
    torch.testing.assert_close(age, torch.full((2,), 37.0), atol=1e-4, rtol=0)


def test_dex_resizes_input(tiny_dex):
    x = torch.rand(2, 3, 96, 96) * 2 - 1
    small = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(tiny_dex(x), tiny_dex(small))
    with pytest.raises(ValueError, match=r"DEX expects \[B,3,H,W\]"):
        tiny_dex(torch.zeros(1, 1, 64, 64))


# ---------------------------------------------------------------- blender


def test_blender_formula_and_shapes():
    """W_i = fc_i([g, e, G_i]) + G_i with g = global(⊕_i bottleneck_i(G_i)), e = age_mlp(t)."""
    torch.manual_seed(5)
    bl = Blender(n_styles=4, style_dim=12, bottleneck=3, global_dim=5, age_dim=2)
    codes, t = torch.randn(2, 4, 12), torch.tensor([0.2, 0.7])
    out = bl(codes, t)
    assert out.shape == (2, 4, 12)
    mlp = lambda m, v: m[2](F.relu(m[0](v)))  # noqa: E731
    g = mlp(bl.global_mlp, torch.cat([mlp(getattr(bl, f"bottleneck_{i}"), codes[:, i]) for i in range(4)], 1))
    e = mlp(bl.age_mlp, t[:, None])
    for i in range(4):
        ref = mlp(getattr(bl, f"fc_{i}"), torch.cat([g, e, codes[:, i]], 1)) + codes[:, i]
        torch.testing.assert_close(out[:, i], ref)
    out.sum().backward()
    assert bl.age_mlp[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"codes must be \[B,4,12\]"):
        bl(torch.randn(2, 5, 12), t)
    with pytest.raises(ValueError, match=r"target_age must be \[B\], got \(2, 1\)"):
        bl(codes, t[:, None])


def test_blender_full_size_parameter_count_formula(fork_manifest):
    """The count at other style counts: count(n) = n·(Lin(D→32)+Lin(32→32)+Lin(656→D)+Lin(D→D))
    + Lin(32n→128) + Lin(128→128) + Lin(1→16) + Lin(16→16) with D = 512."""
    for n in (14, 18):
        bl = meta(lambda n=n: Blender(n_styles=n))
        lin = lambda i, o: i * o + o  # noqa: E731
        want = n * (lin(512, 32) + lin(32, 32) + lin(656, 512) + lin(512, 512)) + lin(32 * n, 128) \
            + lin(128, 128) + lin(1, 16) + lin(16, 16)
        assert sum(p.numel() for p in bl.parameters()) == want
    # n = 18 is the fork's blender: the formula also counts the fork checkpoint's blender tensors
    assert want == sum(math.prod(shape) for shape in sub(fork_manifest, "blender.").values())

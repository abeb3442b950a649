"""StyleGAN2 generator: the stored test vector, the published key layout, noise modes, errors, upfirdn2d."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from agingnet.nn import Generator
from agingnet.nn.stylegan2 import (
    EqualLinear,
    ModulatedConv2d,
    PixelNorm,
    Upsample,
    fused_leaky_relu,
    make_kernel,
    upfirdn2d,
)

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def vectors() -> dict:
    return torch.load(DATA / "stylegan2_tiny_vectors.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def tiny(vectors) -> Generator:
    g = Generator(**vectors["config"])
    g.load_state_dict(vectors["state_dict"], strict=True)
    return g.eval()


# ---------------------------------------------------------------- reference vector


def test_vector_w_plus_const_noise(tiny, vectors):
    with torch.no_grad():
        out = tiny(vectors["w_plus"], input_is_latent=True, noise_mode="const")
    torch.testing.assert_close(out, vectors["image_from_w_plus_const_noise"], atol=1e-5, rtol=0)


def test_vector_z_const_noise(tiny, vectors):
    with torch.no_grad():
        out = tiny(vectors["z"], input_is_latent=False, noise_mode="const")
    torch.testing.assert_close(out, vectors["image_from_z_const_noise"], atol=1e-5, rtol=0)


def test_vector_z_truncated(tiny, vectors):
    with torch.no_grad():
        out = tiny(vectors["z"], input_is_latent=False, noise_mode="const", truncation=vectors["truncation"],
                   truncation_latent=vectors["truncation_latent"])
    torch.testing.assert_close(out, vectors["image_from_z_truncated"], atol=1e-5, rtol=0)
    assert (out - vectors["image_from_z_const_noise"]).abs().max() > 1e-3  # truncation does something


def test_vector_mapping(tiny, vectors):
    with torch.no_grad():
        w = tiny.mapping(vectors["z"])
    ref = vectors["w_from_z"]
    assert ref.shape == (2, tiny.n_latent, tiny.style_dim)
    torch.testing.assert_close(w[:, None].expand_as(ref), ref, atol=1e-5, rtol=0)


def test_mapping_formula(tiny, vectors):
    """Mapping written out: PixelNorm, then per layer lrelu(x·(W·lr/√in)ᵀ + b·lr, 0.2)·√2, in float64."""
    sd = {k: v.double() for k, v in vectors["state_dict"].items()}
    x = vectors["z"].double()
    x = x / torch.sqrt((x**2).mean(1, keepdim=True) + 1e-8)
    lr, d = 0.01, x.shape[1]
    for i in range(1, vectors["config"]["n_mlp"] + 1):
        y = x @ (sd[f"style.{i}.weight"] * lr / math.sqrt(d)).T + sd[f"style.{i}.bias"] * lr
        x = torch.where(y >= 0, y, 0.2 * y) * math.sqrt(2)
    with torch.no_grad():
        torch.testing.assert_close(tiny.mapping(vectors["z"]).double(), x, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- published layout


def test_full_config_matches_manifest():
    manifest = json.loads((DATA / "manifests" / "stylegan2-ffhq-config-f.keys.json").read_text())["g_ema"]
    with torch.device("meta"):  # shapes only: no allocation, no init
        g = Generator()
    got = {k: list(v.shape) for k, v in g.state_dict().items()}
    assert got == manifest
    assert (g.n_latent, g.num_layers) == (18, 17)
    assert [tuple(getattr(g.noises, f"noise_{i}").shape) for i in (0, 1, 2, 15, 16)] == [
        (1, 1, 4, 4), (1, 1, 8, 8), (1, 1, 8, 8), (1, 1, 1024, 1024), (1, 1, 1024, 1024)]


# ---------------------------------------------------------------- inputs, noise, gradients


def test_w_input_equals_repeated_w_plus(tiny):
    w = torch.randn(3, tiny.style_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = tiny(w, noise_mode="const")
        b = tiny(w[:, None].repeat(1, tiny.n_latent, 1), noise_mode="const")
    assert a.shape == (3, 3, 32, 32)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_batch_elements_independent(tiny):
    """The grouped (batched) modulated conv equals running each sample alone."""
    w = torch.randn(3, tiny.n_latent, tiny.style_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = tiny(w, noise_mode="const")
        single = torch.cat([tiny(w[i: i + 1], noise_mode="const") for i in range(3)])
    torch.testing.assert_close(full, single, atol=1e-5, rtol=1e-5)


def test_noise_modes(tiny, vectors):
    w = vectors["w_plus"]
    with torch.no_grad():
        c1, c2 = tiny(w, noise_mode="const"), tiny(w, noise_mode="const")
        r1, r2 = tiny(w, noise_mode="random"), tiny(w, noise_mode="random")
        explicit = tiny(w, noise=[getattr(tiny.noises, f"noise_{i}") for i in range(tiny.num_layers)])
    assert torch.equal(c1, c2)
    assert (r1 - r2).abs().max() > 1e-3
    assert (r1 - c1).abs().max() > 1e-3
    assert torch.equal(explicit, c1)


def test_gradient_reaches_every_w_plus_code(tiny, vectors):
    w = vectors["w_plus"].clone().requires_grad_(True)
    tiny(w, noise_mode="const").square().mean().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
    per_code = w.grad.abs().sum(dim=(0, 2))
    assert (per_code > 0).all(), per_code  # every code w0 … w(n-1) is routed somewhere


def test_last_code_only_feeds_last_to_rgb(tiny, vectors):
    """W+ routing: w(n-1) feeds to_rgbs[-1] only, w(n-2) a conv: both change the image, but the features
    entering the last to_rgb do not depend on w(n-1)."""
    w = vectors["w_plus"].clone()
    w2 = w.clone()
    w2[:, -1] += 1.0
    with torch.no_grad():
        a, b = tiny(w, noise_mode="const"), tiny(w2, noise_mode="const")
        w3 = w.clone()
        w3[:, -2] += 1.0
        c = tiny(w3, noise_mode="const")
    assert (a - b).abs().max() > 1e-4 and (a - c).abs().max() > 1e-4
    feats = {}
    h = tiny.to_rgbs[-1].register_forward_hook(lambda m, i, o: feats.setdefault(len(feats), i[0].clone()))
    with torch.no_grad():
        tiny(w, noise_mode="const")
        tiny(w2, noise_mode="const")
    h.remove()
    torch.testing.assert_close(feats[0], feats[1], atol=0, rtol=0)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("size", [4, 48, 100])
def test_bad_size(size):
    with pytest.raises(ValueError, match=f"power of two >= 8, got {size}"):
        Generator(size=size, style_dim=8, n_mlp=1, channels={4: 4, 8: 4})


def test_channel_table_missing_resolution():
    with pytest.raises(ValueError, match=r"lacks resolutions \[16\]"):
        Generator(size=16, style_dim=8, n_mlp=1, channels={4: 4, 8: 4})


def test_wrong_w_plus_shape(tiny):
    with pytest.raises(ValueError, match=r"W\+ codes must be \[B,8,32\], got \(2, 7, 32\)"):
        tiny(torch.zeros(2, 7, 32))
    with pytest.raises(ValueError, match=r"z must be \[B,32\]"):
        tiny(torch.zeros(2, 16), input_is_latent=False)


def test_truncation_needs_latent(tiny, vectors):
    with pytest.raises(ValueError, match="truncation < 1 needs truncation_latent"):
        tiny(vectors["z"], input_is_latent=False, truncation=0.5)


def test_bad_noise_mode(tiny, vectors):
    with pytest.raises(ValueError, match="noise_mode must be 'const' or 'random', got 'fixed'"):
        tiny(vectors["w_plus"], noise_mode="fixed")


# ---------------------------------------------------------------- building blocks vs. written-out formulas


def upfirdn2d_reference(x: np.ndarray, k: np.ndarray, up: int, pad: tuple[int, int]) -> np.ndarray:
    """Direct definition: zero insertion (sample at multiples of ``up``), zero padding, then a true 2-D
    convolution y[i, j] = Σ_{a,b} p[i + a, j + b] · k[K-1-a, K-1-b], evaluated with explicit loops."""
    c, h, w = x.shape
    z = np.zeros((c, h * up, w * up))
    z[:, ::up, ::up] = x
    p = np.zeros((c, h * up + sum(pad), w * up + sum(pad)))
    p[:, pad[0]: pad[0] + h * up, pad[0]: pad[0] + w * up] = z
    kh, kw = k.shape
    out = np.zeros((c, p.shape[1] - kh + 1, p.shape[2] - kw + 1))
    for ch in range(c):
        for i in range(out.shape[1]):
            for j in range(out.shape[2]):
                s = 0.0
                for a in range(kh):
                    for b in range(kw):
                        s += p[ch, i + a, j + b] * k[kh - 1 - a, kw - 1 - b]
                out[ch, i, j] = s
    return out


@pytest.mark.parametrize("up,pad", [(1, (0, 0)), (1, (1, 1)), (2, (2, 1)), (2, (1, 1)), (2, (0, 3))])
def test_upfirdn2d_against_direct_definition(up, pad):
    rng = np.random.default_rng(up * 10 + pad[0])
    x = rng.standard_normal((2, 3, 5, 6))
    k = rng.standard_normal((4, 4))  # asymmetric: a missing flip would show
    got = upfirdn2d(torch.tensor(x, dtype=torch.float64), torch.tensor(k), up=up, pad=pad).numpy()
    ref = np.stack([upfirdn2d_reference(xi, k, up, pad) for xi in x])
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-10)


def test_make_kernel_and_upsample_preserve_constants():
    k = make_kernel([1, 3, 3, 1])
    ref = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0
    np.testing.assert_allclose(k.numpy(), ref, atol=1e-7)
    up = Upsample([1, 3, 3, 1])
    assert up.pad == (2, 1)
    y = up(torch.full((1, 2, 4, 4), 3.0))
    assert y.shape == (1, 2, 8, 8)
    torch.testing.assert_close(y[..., 2:-2, 2:-2], torch.full((1, 2, 4, 4), 3.0))  # DC gain 1 inside


def test_pixelnorm_fused_lrelu_equal_linear():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, generator=g)
    torch.testing.assert_close(PixelNorm()(x), x / torch.sqrt((x**2).mean(1, keepdim=True) + 1e-8))
    b = torch.randn(6, generator=g)
    y = x + b
    torch.testing.assert_close(fused_leaky_relu(x, b), torch.where(y >= 0, y, 0.2 * y) * math.sqrt(2))
    lin = EqualLinear(6, 5, bias_init=0.5, lr_mul=0.1)
    with torch.no_grad():
        lin.bias.normal_(generator=g)
    ref = x @ (lin.weight * 0.1 / math.sqrt(6)).T + lin.bias * 0.1
    torch.testing.assert_close(lin(x), ref)


def test_modulated_conv_against_per_sample_formula():
    """w'_{oikl} = W_{oikl}/√(in·k²)·s_i, demodulated by rsqrt(Σ_{ikl} w'² + 1e-8), then a conv per sample."""
    torch.manual_seed(4)
    m = ModulatedConv2d(5, 7, 3, style_dim=8)
    x, style = torch.randn(3, 5, 6, 6), torch.randn(3, 8)
    s = style @ (m.modulation.weight * m.modulation.scale).T + m.modulation.bias
    out = []
    for i in range(3):
        w = m.weight[0] / math.sqrt(5 * 9) * s[i].view(1, 5, 1, 1)
        w = w / torch.sqrt((w**2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
        out.append(F.conv2d(x[i: i + 1], w, padding=1))
    torch.testing.assert_close(m(x, style), torch.cat(out), atol=1e-5, rtol=1e-5)

"""Where the training network's weights come from: init_from, SAM, a fresh S1 from the published files, random."""

from __future__ import annotations

import pytest
import torch

from agingnet import pretrained
from agingnet.models import build_aging_net, load_or_build_aging_net
from agingnet.nn import IRSEBackbone
from agingnet.nn.aging_net import add_age_channel

TINY = dict(size=256, style_dim=64, n_mlp=2, channels={4: 64, 8: 64, 16: 32, 32: 32, 64: 16, 128: 16, 256: 8},
            encoder_widths=(16, 32, 48, 64), encoder_units=(1, 1, 1, 1))


@pytest.fixture(scope="module")
def tiny_net():
    return build_aging_net(**TINY, seed=3).eval()


def test_random_build_is_seeded(tiny_net):
    again = build_aging_net(**TINY, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(tiny_net.state_dict().values(), again.state_dict().values()))
    assert tiny_net.latent_avg.shape == (tiny_net.n_styles, 64)


def test_fresh_s1_from_stylegan2_psp_and_irse50(tiny_net, tmp_path):
    g = tiny_net.decoder
    torch.save({"g_ema": g.state_dict(), "latent_avg": torch.randn(64)}, tmp_path / "sg2.pt")
    psp_sd = {f"encoder.{k}": v for k, v in tiny_net.pretrained_encoder.state_dict().items()}
    psp_sd.update({f"decoder.{k}": v for k, v in g.state_dict().items()})
    torch.save({"state_dict": psp_sd, "latent_avg": tiny_net.latent_avg, "opts": {"output_size": 256}},
               tmp_path / "psp.pt")
    arc = IRSEBackbone(input_size=112, embed_dim=32, widths=(16, 32, 48, 64), units=(1, 1, 1, 1))
    torch.save(arc.state_dict(), tmp_path / "ir50.pth")
    weights = {"stylegan2": str(tmp_path / "sg2.pt"), "psp": str(tmp_path / "psp.pt"),
               "arcface": str(tmp_path / "ir50.pth")}
    net, info = load_or_build_aging_net({}, weights)
    assert info["kind"] == "fresh"
    la = torch.load(tmp_path / "sg2.pt", weights_only=True)["latent_avg"]
    assert torch.equal(net.latent_avg, la.expand(net.n_styles, -1))
    w_in = net.encoder.input_layer[0].weight
    assert w_in.shape[1] == 4 and torch.equal(w_in[:, :3], arc.input_layer[0].weight)
    assert torch.equal(net.encoder.body[2].res_layer[1].weight, arc.body[2].res_layer[1].weight)
    x = add_age_channel(torch.rand(1, 3, 256, 256) * 2 - 1, torch.tensor([0.4]))
    img, codes = net.eval()(x, noise_mode="const")
    assert img.shape == (1, 3, 256, 256) and codes.shape == (1, net.n_styles, 64)


def test_init_from_takes_priority_and_keeps_global_step(tiny_net, tmp_path):
    path = tmp_path / "base.pt"
    pretrained.export_checkpoint(tiny_net, path, global_step=50500)
    net, info = load_or_build_aging_net(TINY, {"sam": str(tmp_path / "ignored.pt")}, init_from=str(path))
    assert info["global_step"] == 50500 and info["source"] == str(path)
    x = add_age_channel(torch.rand(2, 3, 256, 256) * 2 - 1, torch.tensor([0.3, 0.6]))
    with torch.no_grad():
        assert torch.equal(net(x, noise_mode="const")[0], tiny_net(x, noise_mode="const")[0])


def test_fresh_s1_without_latent_avg_is_an_error(tiny_net, tmp_path):
    torch.save({"g_ema": tiny_net.decoder.state_dict()}, tmp_path / "sg2.pt")
    psp_sd = {f"encoder.{k}": v for k, v in tiny_net.pretrained_encoder.state_dict().items()}
    psp_sd.update({f"decoder.{k}": v for k, v in tiny_net.decoder.state_dict().items()})
    torch.save({"state_dict": psp_sd}, tmp_path / "psp.pt")
    with pytest.raises(ValueError, match="latent_avg"):
        load_or_build_aging_net({}, {"stylegan2": str(tmp_path / "sg2.pt"), "psp": str(tmp_path / "psp.pt")})

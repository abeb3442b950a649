"""Inference (SPEC §9): the identity blend, the per-age/coupled/strip outputs, bad inputs and the summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from agingnet.config import CONFIG_DIR, compose_config
from agingnet.data.datasets import SyntheticFaces
from agingnet.infer import age_batch, aging_codes, checkpoint_has_ema, load_model, output_names, run_inference
from agingnet.models import build_aging_net
from agingnet.nn.aging_net import add_age_channel
from agingnet.pretrained import export_checkpoint
from agingnet.viz import band_height, pil_to_tensor


def tiny_net():
    kw = yaml.safe_load((CONFIG_DIR / "model" / "tiny.yaml").read_text())["net"]
    kw["pretrained_encoder"] = False  # half the encoder cost; the composition is tested elsewhere
    return build_aging_net(**kw).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ckpt")
    net = tiny_net()
    return export_checkpoint(net, d / "tiny.pt")


@pytest.fixture(scope="module")
def net(ckpt):
    return load_model(ckpt, use_ema=False)


@pytest.fixture(scope="module")
def age_ckpt(tmp_path_factory) -> Path:
    """A tiny net whose age plane moves the codes: a random tiny encoder barely reads it (pixel changes of
    ~1e-3), so its input weights on the age channel are scaled ×300 (changes of several 8-bit levels)."""
    net = tiny_net()
    with torch.no_grad():
        net.encoder.input_layer[0].weight[:, 3] *= 300
    return export_checkpoint(net, tmp_path_factory.mktemp("age_ckpt") / "age.pt")


@pytest.fixture(scope="module")
def age_net(age_ckpt):
    return load_model(age_ckpt, use_ema=False)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    ds = SyntheticFaces(n=1, size=256, train=False)
    return pil_to_tensor(Image.fromarray(ds.render(0))).unsqueeze(0)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("faces")
    ds = SyntheticFaces(n=3, size=256, train=False)
    Image.fromarray(ds.render(0)).save(d / "30_0.png")
    Image.fromarray(ds.render(1)).save(d / "41_1.png")
    Image.fromarray(ds.render(2)).convert("L").save(d / "gray.jpg", quality=95)
    (d / "notes.png").write_text("this is text, not a PNG")
    Image.fromarray(ds.render(1)).resize((16, 16)).save(d / "tiny.png")
    return d


# ---------------------------------------------------------------- the math


@torch.no_grad()
def test_strength_one_is_a_plain_forward(net, x):
    t = torch.tensor([60.0])
    assert torch.equal(aging_codes(net, x, t, None, 1.0, False), net.encode(add_age_channel(x, t / 100)))
    y = age_batch(net, x, [60], None, 1.0, False, output_size=256)  # [A,B,...]
    assert y.shape == (1, 1, 3, 256, 256)
    plain, _ = net(add_age_channel(x, t / 100), noise_mode="const")
    assert torch.allclose(y[0], plain, atol=1e-5)


@torch.no_grad()
def test_blend_layers_follow_the_strength(net, x):
    t, a = torch.tensor([70.0]), torch.tensor([30.0])
    aged = net.encode(add_age_channel(x, t / 100))
    ident = net.encode(add_age_channel(x, a / 100))  # the input's own age, not age 0 (fork bug)
    n = aged.shape[1]
    assert n >= 13
    c0 = aging_codes(net, x, t, a, 0.0)
    assert torch.allclose(c0[:, 8:13], ident[:, 8:13], atol=1e-6)
    keep = [i for i in range(n) if not 8 <= i <= 12]
    assert torch.allclose(c0[:, keep], aged[:, keep], atol=1e-6)
    c5 = aging_codes(net, x, t, a, 0.5)
    assert torch.allclose(c5[:, 8:13], (ident[:, 8:13] + aged[:, 8:13]) / 2, atol=1e-6)
    strict = aging_codes(net, x, t, a, 1.0, strict_pose=True)  # by hand: 0 | 0.3 | 1 | min(1, 0.4)
    for i, s in [(0, 0.0), (7, 0.0), (8, 0.3), (9, 0.3), (10, 1.0), (12, 1.0), (13, 0.4)]:
        assert torch.allclose(strict[:, i], 0.7 * ident[:, i] + 0.3 * aged[:, i] if s == 0.3 else
                              ident[:, i] + s * (aged[:, i] - ident[:, i]), atol=1e-6), f"layer {i}"
    with pytest.raises(ValueError, match="needs the input ages"):
        age_batch(net, x, [40], None, 0.5)


def _blend_by_hand(ident: torch.Tensor, aged: torch.Tensor, s: float) -> torch.Tensor:
    """SPEC §9 written out: W+ layers 8–12 take (1 − s)·identity + s·aged, every other layer the aged code."""
    return torch.stack([(1 - s) * ident[:, i] + s * aged[:, i] if 8 <= i <= 12 else aged[:, i]
                        for i in range(aged.shape[1])], dim=1)


@torch.no_grad()
def test_blend_pixels_are_the_decoder_on_hand_blended_codes(age_net, x):
    """Pixels of the blend (s = 1, the plain forward: test_strength_one_is_a_plain_forward; s = 0 through the
    app: test_fixed_input_age_blend_and_gif)."""
    net = age_net
    t, a = torch.tensor([70.0]), torch.tensor([30.0])
    aged = net.encode(add_age_channel(x, t / 100))
    ident = net.encode(add_age_channel(x, a / 100))
    assert (aged[:, 8:13] - ident[:, 8:13]).abs().max() > 0.1  # the two codes differ where the blend acts
    decode = lambda codes: net.decoder(codes, input_is_latent=True, noise_mode="const")  # noqa: E731
    y = age_batch(net, x, [70], a, 0.5, False, output_size=256)[0]
    want = decode(_blend_by_hand(ident, aged, 0.5))
    assert want.shape == (1, 3, 256, 256)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=0)
    assert (y - decode(aged)).abs().max() > 1e-2  # the blend moved the pixels away from the plain forward
    # strict pose at s = 0: every layer's strength is 0, so the output is the identity-code forward at a
    strict = age_batch(net, x, [70], a, 0.0, True, output_size=256)[0]
    torch.testing.assert_close(strict, decode(ident), atol=1e-5, rtol=0)


def test_output_names_disambiguate_stems():
    names = output_names([Path("a.png"), Path("a.jpg"), Path("b.png")])
    assert names == {Path("a.png"): "a_png", Path("a.jpg"): "a_jpg", Path("b.png"): "b"}


# ---------------------------------------------------------------- the app


def test_run_inference_outputs_and_summary(ckpt, net, inputs, tmp_path):
    out = tmp_path / "out"
    cfg = compose_config([f"checkpoint={ckpt}", f"input_dir={inputs}", f"output_dir={out}",
                          "target_ages=[20,40,60]", "output_size=64", "strip_tile=32", "batch_size=2",
                          "allow_random_dex=true", "progress=false"], config_name="infer")
    s = run_inference(cfg)
    names = ["30_0", "41_1", "gray"]
    assert s["processed"] == 3 and s["n_files"] == 5 and s["used_ema"] is False
    assert sorted(s["processed_files"]) == ["30_0.png", "41_1.png", "gray.jpg"]
    reasons = {k["file"]: k["reason"] for k in s["skipped"]}
    assert set(reasons) == {"notes.png", "tiny.png"}
    assert reasons["notes.png"].startswith("not an image")
    assert reasons["tiny.png"] == "too small (16x16 < 64 px)"
    assert s["notes"] == {"gray.jpg": "converted L to RGB"}
    assert set(s["input_ages"]) == {"30_0.png", "41_1.png", "gray.jpg"} and s["input_age"] == "dex"
    assert json.loads((out / "summary.json").read_text()) == s
    for t in (20, 40, 60):
        for n in names:
            assert Image.open(out / f"age_{t:02d}" / f"{n}.png").size == (64, 64)
            assert Image.open(out / "coupled" / f"age_{t:02d}" / f"{n}.png").size == (128, 64)
    for n in names:
        assert Image.open(out / "strips" / f"{n}.png").size == ((1 + 3) * 32, band_height(32) + 32)
    assert not (out / "gifs").exists()
    # strength 1: the saved age-40 image is the plain const-noise forward, 4×4 block-averaged to 64 px
    xin = pil_to_tensor(Image.open(inputs / "41_1.png")).unsqueeze(0)
    with torch.no_grad():
        plain, _ = net(add_age_channel(xin, torch.tensor([0.40])), noise_mode="const")
    expect = ((F.avg_pool2d(plain, 4)[0].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).numpy()
    got = np.asarray(Image.open(out / "age_40" / "41_1.png")).astype(np.float64)
    assert np.abs(got - expect).max() <= 1.0
    # coupled: the left half is the input at the output size
    pair = np.asarray(Image.open(out / "coupled" / "age_40" / "41_1.png")).astype(np.float64)
    assert np.array_equal(pair[:, 64:], got)
    x64 = ((F.avg_pool2d(xin, 4)[0].permute(1, 2, 0) + 1) * 127.5).numpy()
    assert np.abs(pair[:, :64] - x64).max() <= 1.0


def test_fixed_input_age_blend_and_gif(age_ckpt, age_net, inputs, tmp_path):
    net = age_net
    src = tmp_path / "one"
    src.mkdir()
    (src / "face.png").write_bytes((inputs / "30_0.png").read_bytes())
    cfg = {"checkpoint": str(age_ckpt), "input_dir": str(src), "output_dir": str(tmp_path / "o"),
           "target_ages": [50],
           "aging_strength": 0.0, "input_age": 35, "output_size": 32, "strip_tile": 32, "coupled": False,
           "strips": False, "gif": True, "progress": False}
    s = run_inference(cfg)
    assert s["input_age"] == "fixed" and s["input_ages"] == {"face.png": 35.0}
    with Image.open(tmp_path / "o" / "gifs" / "face.gif") as g:
        assert g.n_frames == 2 and g.size == (32, band_height(32) + 32)
    assert not (tmp_path / "o" / "coupled").exists() and (tmp_path / "o" / "age_50" / "face.png").is_file()
    # the saved pixels: layers 8–12 from the code at the fixed input age 35, the rest from age 50 (s = 0),
    # decoded with const noise and 8×8 block-averaged to 32 px
    xin = pil_to_tensor(Image.open(src / "face.png")).unsqueeze(0)
    with torch.no_grad():
        aged = net.encode(add_age_channel(xin, torch.tensor([0.50])))
        ident = net.encode(add_age_channel(xin, torch.tensor([0.35])))
        img = net.decoder(_blend_by_hand(ident, aged, 0.0), input_is_latent=True, noise_mode="const")
        plain = net.decoder(aged, input_is_latent=True, noise_mode="const")
    u8 = lambda im: ((F.avg_pool2d(im, 8)[0].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).numpy()  # noqa: E731
    got = np.asarray(Image.open(tmp_path / "o" / "age_50" / "face.png")).astype(np.float64)
    assert np.abs(got - u8(img)).max() <= 1.0
    assert np.abs(got - u8(plain)).max() >= 3.0  # the check tells s = 0 from a plain forward at 50


def test_use_ema_auto_picks_the_shadow(tmp_path):
    net = tiny_net()
    shadow = {k: v + 0.01 if v.is_floating_point() else v for k, v in net.decoder.state_dict().items()}
    p = export_checkpoint(net, tmp_path / "ema.pt", ema={"decoder": shadow}, ema_decay=0.999)
    plain = export_checkpoint(net, tmp_path / "plain.pt")
    assert checkpoint_has_ema(p) and not checkpoint_has_ema(plain)
    m = load_model(p, "auto")
    assert m.meta["used_ema"] is True
    assert torch.equal(m.decoder.state_dict()["conv1.conv.weight"], shadow["conv1.conv.weight"])
    assert load_model(p, False).meta["used_ema"] is False
    assert load_model(plain, "auto").meta["used_ema"] is False
    with pytest.raises(ValueError, match="use_ema must be auto"):
        load_model(p, "sometimes")


def test_errors_name_the_key(ckpt, inputs, tmp_path):
    base = {"checkpoint": str(ckpt), "input_dir": str(inputs), "output_dir": str(tmp_path / "o"),
            "target_ages": [40], "progress": False}
    with pytest.raises(FileNotFoundError, match="checkpoint: no such file"):
        run_inference({**base, "checkpoint": str(tmp_path / "nope.pt")})
    with pytest.raises(FileNotFoundError, match="input_dir: no such folder"):
        run_inference({**base, "input_dir": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match="input_dir= is required"):
        run_inference({**base, "input_dir": None})
    with pytest.raises(FileNotFoundError, match="weights.dex: no such file"):
        run_inference({**base, "aging_strength": 0.5, "weights": {"dex": str(tmp_path / "dex.pth")}})
    with pytest.raises(ValueError, match="target_ages: 140"):
        run_inference({**base, "target_ages": [20, 140]})
    with pytest.raises(ValueError, match="input_age must be"):
        run_inference({**base, "aging_strength": 0.5, "input_age": "guess"})


def test_align_skips_images_without_a_face(ckpt, tmp_path):
    pytest.importorskip("dlib")
    pytest.importorskip("face_recognition_models")
    src = tmp_path / "noface"
    src.mkdir()
    Image.new("RGB", (128, 128), (120, 130, 140)).save(src / "wall.png")
    s = run_inference({"checkpoint": str(ckpt), "input_dir": str(src), "output_dir": str(tmp_path / "o"),
                       "target_ages": [40], "align": True, "align_backend": "dlib", "progress": False})
    assert s["processed"] == 0
    assert s["skipped"] == [{"file": "wall.png", "reason": "no face found (align=true)"}]


def test_input_age_label_reads_the_file_name_and_skips_unlabelled_files(tmp_path):
    from agingnet.infer import SkipImage, build_age_source

    kind, fn = build_age_source("label", None, False, None, True, torch.device("cpu"))
    assert kind == "label"
    x = torch.zeros(3, 3, 8, 8)
    ages = fn(x, [tmp_path / "37_0.png", tmp_path / "61_face.jpg", tmp_path / "8 beach.png"])
    assert ages.tolist() == [37.0, 61.0, 8.0]
    with pytest.raises(SkipImage, match="no input age in the file name"):
        fn(x[:1], [tmp_path / "portrait.png"])

"""Checkpoint loaders and export: tiny files written in the published layouts load back to the same outputs;
bad files fail with errors that name the file and the expected kind."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from agingnet.models import build_aging_net
from agingnet.nn import DEX, AgingNet, Blender, Generator, GradualStyleEncoder, IRSEBackbone, add_age_channel
from agingnet.pretrained import (
    CheckpointError,
    detect_kind,
    export_checkpoint,
    export_state,
    init_encoder_from_irse50,
    load_aging_model,
    load_arcface,
    load_dex,
    load_psp_encoder,
    load_stylegan2,
)

MANIFESTS = Path(__file__).parent / "data" / "manifests"
GEN = dict(size=32, style_dim=32, n_mlp=2, channels={4: 16, 8: 16, 16: 16, 32: 8})
# distinct stage widths: stages are inferred from depth changes (an equal-width boundary is invisible)
IRSE = dict(widths=(16, 20, 24, 32), units=(1, 1, 1, 1))
NET = dict(**GEN, encoder_widths=IRSE["widths"], encoder_units=IRSE["units"])


def manifest(name: str) -> dict:
    return json.loads((MANIFESTS / f"{name}.keys.json").read_text())


def scramble(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every float parameter and buffer (BN statistics, noise buffers, PReLU slopes) so that a loader
    that skipped any of them would produce different outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():  # persistent entries only (DEX's age_values stay 0…100)
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            else:
                t.add_(0.1 * torch.randn(t.shape, generator=g))
    return module.eval()


def prefixed(net: AgingNet) -> dict[str, torch.Tensor]:
    """state_dict in the SAM/fork layout, written out by hand (independent of export_state)."""
    sd = {}
    for name in ("encoder", "decoder", "pretrained_encoder", "blender"):
        part = getattr(net, name)
        if part is not None:
            sd.update({f"{name}.{k}": v.clone() for k, v in part.state_dict().items()})
    return sd


def tiny_net(fork: bool = False, blender: bool = False, use_blender: bool = False, seed: int = 0) -> AgingNet:
    net = build_aging_net(**NET, fork_variant=fork, blender=blender, use_blender=use_blender, seed=seed)
    return scramble(net, seed + 100)


def sam_file(net: AgingNet, path: Path) -> Path:
    torch.save({"state_dict": prefixed(net), "opts": {"output_size": net.decoder.size, "input_nc": 4},
                "latent_avg": net.latent_avg.clone()}, path)
    return path


def fork_file(net: AgingNet, path: Path, ema: dict[str, dict] | None = None,
              use_blender: bool = False) -> Path:
    ckpt = {"state_dict": prefixed(net), "optimizer": {"state": {}, "param_groups": []}, "global_step": 1234,
            "opts": {"output_size": net.decoder.size, "use_blender": use_blender, "lr": 1e-4},
            "latent_avg": net.latent_avg.clone()}
    if ema:
        ckpt["ema"] = {scope: {"decay": 0.999, "shadow": shadow} for scope, shadow in ema.items()}
        ckpt["ema_scope"] = "+".join(ema)
        ckpt["ema_decay"] = 0.999
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    rgb = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    return add_age_channel(rgb, torch.tensor([0.25, 0.6]))


def outputs(net: AgingNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return net(x, noise_mode="const")


def assert_same(a: AgingNet, b: AgingNet, x: torch.Tensor) -> None:
    (ia, ca), (ib, cb) = outputs(a, x), outputs(b, x)
    assert torch.equal(ca, cb) and torch.equal(ia, ib)


def assert_differs(a: AgingNet, b: AgingNet, x: torch.Tensor) -> None:
    assert (outputs(a, x)[0] - outputs(b, x)[0]).abs().max() > 1e-4


# ---------------------------------------------------------------- single-network loaders


@pytest.fixture(scope="module")
def tiny_g() -> Generator:
    torch.manual_seed(0)
    return scramble(Generator(**GEN), 1)


@pytest.fixture
def sg_file(tiny_g, tmp_path) -> Path:
    p = tmp_path / "stylegan2-tiny.pt"
    torch.save({"g_ema": tiny_g.state_dict(), "latent_avg": torch.randn(32)}, p)
    return p


@pytest.fixture(scope="module")
def tiny_irse() -> IRSEBackbone:
    torch.manual_seed(0)
    return scramble(IRSEBackbone(embed_dim=16, **IRSE), 2)


@pytest.fixture
def irse_file(tiny_irse, tmp_path) -> Path:
    p = tmp_path / "model_ir_se50.pth"
    torch.save(tiny_irse.state_dict(), p)  # the published file is the state dict itself
    return p


def test_load_stylegan2(tiny_g, sg_file):
    g = load_stylegan2(sg_file)
    assert (g.size, g.style_dim, g.n_latent, g.channels) == (32, 32, 8, GEN["channels"])
    assert not g.training
    assert torch.equal(g.latent_avg, torch.load(sg_file, weights_only=True)["latent_avg"])
    w = torch.randn(2, 8, 32)
    with torch.no_grad():
        assert torch.equal(g(w, noise_mode="const"), tiny_g(w, noise_mode="const"))


def test_load_stylegan2_reference_vector(tmp_path):
    vec = torch.load(Path(__file__).parent / "data" / "stylegan2_tiny_vectors.pt", weights_only=True)
    p = tmp_path / "g.pt"
    torch.save({"g_ema": vec["state_dict"], "latent_avg": vec["truncation_latent"][0]}, p)
    g = load_stylegan2(p)  # architecture inferred from the shapes alone
    with torch.no_grad():
        out = g(vec["w_plus"], noise_mode="const")
    torch.testing.assert_close(out, vec["image_from_w_plus_const_noise"], atol=1e-5, rtol=0)


def test_load_psp_encoder(tiny_g, tmp_path):
    torch.manual_seed(3)
    enc = scramble(GradualStyleEncoder(input_nc=3, n_styles=8, style_dim=32, **IRSE), 3)
    sd = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    sd.update({f"decoder.{k}": v for k, v in tiny_g.state_dict().items()})
    la = torch.randn(8, 32)
    p = tmp_path / "psp_ffhq_encode.pt"
    torch.save({"state_dict": sd, "opts": {"output_size": 32}, "latent_avg": la}, p)
    loaded = load_psp_encoder(p)
    assert (loaded.input_nc, loaded.n_styles, loaded.fork_variant, loaded.training) == (3, 8, False, False)
    assert torch.equal(loaded.latent_avg, la)
    rgb = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(rgb), enc(rgb))


@pytest.mark.parametrize("wrapped", [False, True])
def test_load_arcface(tiny_irse, tmp_path, wrapped):
    p = tmp_path / "arcface.pth"
    sd = tiny_irse.state_dict()
    torch.save({"state_dict": sd} if wrapped else sd, p)
    net = load_arcface(p)
    assert not net.training
    img = torch.rand(3, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        assert torch.equal(net(img), tiny_irse(img))


def test_load_arcface_fork_variant(tiny_irse, irse_file):
    net = load_arcface(irse_file, fork_variant=True)
    ref = IRSEBackbone(input_size=56, embed_dim=16, fork_variant=True, **IRSE)
    ref.load_state_dict(tiny_irse.state_dict())
    img = torch.rand(2, 3, 56, 56) * 2 - 1
    with torch.no_grad():
        assert torch.equal(net(img), ref.eval()(img))


def test_load_dex_renames_head(tmp_path):
    torch.manual_seed(4)
    dex = scramble(DEX(widths=(4, 8, 8, 16, 16), fc_dim=32, input_size=64), 4)
    sd = {k.replace("fc8_101", "fc8-101"): v for k, v in dex.state_dict().items()}
    assert "fc8-101.weight" in sd
    p = tmp_path / "dex_age_classifier.pth"
    torch.save({"state_dict": sd}, p)
    net = load_dex(p)
    assert (net.input_size, net.num_ages, net.training) == (64, 101, False)
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(net.predict_age(img), dex.predict_age(img))


# ---------------------------------------------------------------- the composed network


def test_load_sam_layout(tmp_path, x):
    src = tiny_net()
    p = sam_file(src, tmp_path / "sam_ffhq_aging.pt")
    assert set(torch.load(p, weights_only=True)) == set(manifest("sam_ffhq_aging")["top_level_keys"])
    net = load_aging_model(p)
    assert net.meta["kind"] == "sam" and not net.meta["has_ema"] and not net.training
    assert net.pretrained_encoder is not None and net.blender is None and not net.encoder.fork_variant
    assert torch.equal(net.latent_avg, src.latent_avg)
    assert_same(net, src, x)
    assert not any(p.requires_grad for p in net.pretrained_encoder.parameters())
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: use_ema=True but the checkpoint holds no")):
        load_aging_model(p, use_ema=True)


def test_sam_layout_1d_latent_avg_is_repeated(tmp_path, x):
    src = tiny_net()
    p = tmp_path / "sam.pt"
    torch.save({"state_dict": prefixed(src), "opts": {}, "latent_avg": src.latent_avg[0].clone()}, p)
    net = load_aging_model(p)
    assert torch.equal(net.latent_avg, src.latent_avg[:1].expand(8, -1))


@pytest.fixture(scope="module")
def fork_src() -> AgingNet:
    return tiny_net(fork=True, blender=True, seed=1)


@pytest.fixture(scope="module")
def shadow(fork_src) -> dict[str, torch.Tensor]:
    dec = scramble(copy.deepcopy(fork_src.decoder), 77)
    return {k: v.clone() for k, v in dec.state_dict().items()}


def with_decoder(net: AgingNet, shadow: dict[str, torch.Tensor]) -> AgingNet:
    out = copy.deepcopy(net)
    out.decoder.load_state_dict(shadow)
    return out


def test_load_fork_layout_with_ema(tmp_path, x, fork_src, shadow):
    p = fork_file(fork_src, tmp_path / "phase3_last.pt", ema={"decoder": shadow})
    assert set(torch.load(p, weights_only=True)) == set(manifest("mtm_fork_checkpoint")["top_level_keys"])
    raw = load_aging_model(p)
    assert raw.meta == {"kind": "fork", "global_step": 1234, "opts": {"output_size": 32, "use_blender": False,
                                                                      "lr": 1e-4},
                        "used_ema": False, "has_ema": True}
    assert raw.encoder.fork_variant and raw.pretrained_encoder.fork_variant  # detected from styles.*.convs
    assert raw.blender is not None and not raw.use_blender  # keys present, unused (opts.use_blender False)
    assert_same(raw, fork_src, x)
    ema = load_aging_model(p, use_ema=True)
    assert ema.meta["used_ema"]
    assert_same(ema, with_decoder(fork_src, shadow), x)
    assert_differs(ema, raw, x)
    torch.testing.assert_close(ema.encoder.state_dict(), raw.encoder.state_dict(), atol=0, rtol=0)


def test_fork_layout_blender_and_adapter_ema(tmp_path, x, fork_src, shadow):
    bl_shadow = {k: v.clone() for k, v in scramble(copy.deepcopy(fork_src.blender), 78).state_dict().items()}
    p = fork_file(fork_src, tmp_path / "best_model.pt", ema={"decoder": shadow, "blender": bl_shadow},
                  use_blender=True)
    net = load_aging_model(p)
    assert net.use_blender  # default from opts.use_blender
    ref = copy.deepcopy(fork_src)
    ref.use_blender = True
    assert_same(net, ref, x)
    assert_differs(net, fork_src, x)  # the adapter changes the codes
    assert not load_aging_model(p, use_blender=False).use_blender
    ema = load_aging_model(p, use_ema=True)
    ref_ema = with_decoder(ref, shadow)
    ref_ema.blender.load_state_dict(bl_shadow)
    assert_same(ema, ref_ema, x)


def test_fork_256px_checkpoint_with_18_style_blender_loads(tmp_path, x):
    """The fork builds ``Blender()`` with 18 styles whatever the output size: a 256 px fork run (14 styles) carries
    an 18-style adapter. Its size comes from its own tensors; it loads (unused) and cannot be switched on."""
    chans = {4: 8, 8: 8, 16: 8, 32: 8, 64: 4, 128: 4, 256: 4}
    src = scramble(build_aging_net(size=256, style_dim=32, n_mlp=2, channels=chans, encoder_widths=IRSE["widths"],
                                   encoder_units=IRSE["units"], fork_variant=True, seed=3), 103)
    torch.manual_seed(4)
    blender18 = scramble(Blender(n_styles=18, style_dim=32), 104)
    sd = {**prefixed(src), **{f"blender.{k}": v.clone() for k, v in blender18.state_dict().items()}}
    assert src.n_styles == 14 and tuple(sd["blender.global_mlp.0.weight"].shape) == (128, 18 * 32)
    p = tmp_path / "phase3_last.pt"
    torch.save({"state_dict": sd, "optimizer": {"state": {}, "param_groups": []}, "global_step": 7,
                "opts": {"output_size": 256, "use_blender": False}, "latent_avg": src.latent_avg.clone()}, p)
    net = load_aging_model(p)
    assert (net.n_styles, net.blender.n_styles, net.use_blender) == (14, 18, False)
    torch.testing.assert_close(net.blender.state_dict(), blender18.state_dict(), atol=0, rtol=0)
    assert_same(net, src, x)
    assert export_state(net)["state_dict"].keys() == sd.keys()  # written back with its 18 styles
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: use_blender=true but the adapter (blender.*) has "
                                                        f"18 styles and the 256 px decoder 14")):
        load_aging_model(p, use_blender=True)


def test_export_round_trip(tmp_path, x, fork_src, shadow):
    p = export_checkpoint(fork_src, tmp_path / "out" / "last.pt", ema={"decoder": shadow}, ema_decay=0.99,
                          global_step=42, opts={"lr": 3e-4}, optimizer={"state": {}, "param_groups": []})
    assert [f.name for f in p.parent.iterdir()] == ["last.pt"]  # no temporary file left behind
    ckpt = torch.load(p, weights_only=True)
    assert set(ckpt) == set(manifest("mtm_fork_checkpoint")["top_level_keys"])
    assert (ckpt["ema_scope"], ckpt["ema_decay"], ckpt["global_step"]) == ("decoder", 0.99, 42)
    net = load_aging_model(p)
    assert net.meta["global_step"] == 42 and net.meta["opts"]["lr"] == 3e-4 and net.encoder.fork_variant
    assert_same(net, fork_src, x)
    assert_same(load_aging_model(p, use_ema=True), with_decoder(fork_src, shadow), x)

    q = export_checkpoint(fork_src, tmp_path / "ema.pt", ema={"decoder": shadow}, ema_as_primary=True)
    primary = load_aging_model(q)
    assert_same(primary, with_decoder(fork_src, shadow), x)
    assert torch.equal(torch.load(q, weights_only=True)["ema"]["decoder"]["shadow"]["style.1.weight"],
                       shadow["style.1.weight"])


def test_export_sam_layout_round_trip(tmp_path, x):
    src = tiny_net(seed=2)
    net = load_aging_model(export_checkpoint(src, tmp_path / "s.pt"))
    assert net.blender is None and not net.encoder.fork_variant
    assert_same(net, src, x)


def test_export_state_rejects_unknown_ema_key(fork_src):
    with pytest.raises(KeyError, match="'decoder' key 'nope' is not a parameter"):
        export_state(fork_src, ema={"decoder": {"nope": torch.zeros(1)}}, ema_as_primary=True)


def test_full_size_fork_export_keys_match_manifest():
    """export_state of a full-size fork-variant net with blender writes exactly the fork manifest's keys and
    shapes (built on the meta device, then given uninitialised CPU storage: no random init of ~110M
    parameters)."""
    with torch.device("meta"):
        pre = GradualStyleEncoder(input_nc=3, fork_variant=True)
        net = AgingNet(GradualStyleEncoder(input_nc=4, fork_variant=True), Generator(), pretrained_encoder=pre,
                       blender=Blender())
    net = net.to_empty(device="cpu")
    state = export_state(net)
    m = manifest("mtm_fork_checkpoint")
    assert {k: list(v.shape) for k, v in state["state_dict"].items()} == m["state_dict"]
    assert list(state["latent_avg"].shape) == m["top_level_keys"]["latent_avg"]


def test_init_encoder_from_irse50(tiny_irse, irse_file):
    torch.manual_seed(5)
    enc = GradualStyleEncoder(input_nc=4, n_styles=8, style_dim=32, **IRSE)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    init_encoder_from_irse50(enc, irse_file, generator=torch.Generator().manual_seed(0))
    src, after = tiny_irse.state_dict(), enc.state_dict()
    w = after["input_layer.0.weight"]
    assert w.shape == (16, 4, 3, 3)
    assert torch.equal(w[:, :3], src["input_layer.0.weight"])  # RGB slices copied exactly
    assert not torch.equal(w[:, 3], before["input_layer.0.weight"][:, 3])  # age slice re-drawn
    for k, v in after.items():
        if k.startswith(("input_layer.1", "input_layer.2", "body.")):
            assert torch.equal(v, src[k]), k
        elif not k.startswith("input_layer."):
            assert torch.equal(v, before[k]), k  # styles / latlayers untouched
    enc2 = GradualStyleEncoder(input_nc=4, n_styles=8, style_dim=32, **IRSE)
    init_encoder_from_irse50(enc2, irse_file, generator=torch.Generator().manual_seed(0))
    assert torch.equal(enc2.state_dict()["input_layer.0.weight"], w)  # seeded → reproducible
    rgb = GradualStyleEncoder(input_nc=3, n_styles=8, style_dim=32, **IRSE)
    init_encoder_from_irse50(rgb, irse_file)
    assert torch.equal(rgb.state_dict()["input_layer.0.weight"], src["input_layer.0.weight"])


def test_init_encoder_from_irse50_wrong_body(irse_file):
    enc = GradualStyleEncoder(input_nc=4, n_styles=8, style_dim=32, widths=(16, 20, 28, 32), units=IRSE["units"])
    with pytest.raises(CheckpointError, match=re.escape(f"{irse_file}: IR-SE50 body does not fit")):
        init_encoder_from_irse50(enc, irse_file)


# ---------------------------------------------------------------- bad input


def test_wrong_kind_names_file_and_kind(irse_file, sg_file):
    with pytest.raises(CheckpointError, match=re.escape(f"{irse_file}: expected a rosinality StyleGAN2 file")
                       + r".*looks like an IR-SE50 ArcFace state dict"):
        load_stylegan2(irse_file)
    with pytest.raises(CheckpointError, match=re.escape(f"{sg_file}: expected an IR-SE50"
                                                        ) + ".*looks like a rosinality StyleGAN2"):
        load_arcface(sg_file)
    torch.save(torch.zeros(3), irse_file)
    with pytest.raises(CheckpointError, match=r"expected a DEX VGG16 .* looks like nothing agingnet knows"):
        load_dex(irse_file)


def test_aging_file_is_not_a_psp_file(tmp_path):
    p = sam_file(tiny_net(), tmp_path / "sam.pt")
    with pytest.raises(CheckpointError, match=r"expected a pSp checkpoint .* looks like a SAM or fork run"):
        load_psp_encoder(p)
    assert detect_kind(torch.load(p, weights_only=True)) == "aging"


def test_truncated_file(sg_file, tmp_path):
    data = sg_file.read_bytes()
    half = tmp_path / "half.pt"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape(f"{half}: cannot be read as a rosinality StyleGAN2")):
        load_stylegan2(half)


def edit_g_ema(sg_file: Path, tmp_path: Path, fn) -> Path:
    ckpt = torch.load(sg_file, weights_only=True)
    fn(ckpt["g_ema"])
    p = tmp_path / "edited.pt"
    torch.save(ckpt, p)
    return p


def test_missing_keys(sg_file, tmp_path):
    p = edit_g_ema(sg_file, tmp_path, lambda sd: sd.pop("convs.1.noise.weight"))
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: does not match") + r".*missing \(1\): convs\.1\."):
        load_stylegan2(p)
    p = edit_g_ema(sg_file, tmp_path, lambda sd: sd.pop("to_rgb1.bias"))
    with pytest.raises(CheckpointError, match=r"missing \(1\): to_rgb1\.bias"):
        load_stylegan2(p)


def test_unexpected_keys(sg_file, tmp_path):
    p = edit_g_ema(sg_file, tmp_path, lambda sd: sd.update({"extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): extra\.weight"):
        load_stylegan2(p)


def test_mismatched_shapes_list_first_keys(sg_file, tmp_path):
    def shrink(sd):
        for k in list(sd)[-7:]:
            sd[k] = sd[k][..., :1].clone() if sd[k].shape[-1] > 1 else torch.zeros(*sd[k].shape, 2)

    p = edit_g_ema(sg_file, tmp_path, lambda sd: sd.__setitem__("to_rgbs.0.conv.weight", torch.zeros(1, 3, 8, 1, 1)))
    want = "shape mismatch (1): to_rgbs.0.conv.weight (1, 3, 8, 1, 1) != (1, 3, 16, 1, 1)"
    with pytest.raises(CheckpointError, match=re.escape(want)):
        load_stylegan2(p)
    p = edit_g_ema(sg_file, tmp_path, shrink)
    with pytest.raises(CheckpointError, match=r"shape mismatch \(7\): [^;]* …"):  # first 5, then an ellipsis
        load_stylegan2(p)


def test_decoder_size_disagrees_with_opts(tmp_path):
    src = tiny_net()
    p = tmp_path / "sam.pt"
    torch.save({"state_dict": prefixed(src), "opts": {"output_size": 1024}, "latent_avg": src.latent_avg}, p)
    want = f"{p}: opts.output_size=1024 but the decoder keys are 32 px"
    with pytest.raises(CheckpointError, match=re.escape(want)):
        load_aging_model(p)


class Payload:
    """Any custom class: ``weights_only=True`` must refuse to unpickle it."""

    def __init__(self):
        self.value = 1


def test_custom_class_pickle_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"g_ema": Payload()}, p)
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: cannot be read as a rosinality StyleGAN2")):
        load_stylegan2(p)


LOADERS = [load_stylegan2, load_psp_encoder, load_arcface, load_dex, load_aging_model]


@pytest.mark.parametrize("loader", LOADERS)
def test_missing_file(tmp_path, loader):
    p = tmp_path / "nowhere.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{p}: no such file (expected")):
        loader(p)

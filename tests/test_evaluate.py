"""agingnet.evaluate: per-age DEX MAE, identity cosine, LPIPS, optional FID/KID, the three reports."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from reference import blur_fit_reference

from agingnet import evaluate as ev
from agingnet.config import CONFIG_DIR, compose_config
from agingnet.data.datasets import SyntheticFaces
from agingnet.models import build_aging_net, build_arcface, build_dex
from agingnet.nn.aging_net import add_age_channel
from agingnet.pretrained import export_checkpoint, load_aging_model
from agingnet.viz import pil_to_tensor
from agingnet.world.truth import BLUR_GRID


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    kw = yaml.safe_load((CONFIG_DIR / "model" / "tiny.yaml").read_text())["net"]
    net = build_aging_net(**{**kw, "pretrained_encoder": False})
    with torch.no_grad():  # a random tiny net's output barely depends on its input: scale the RGB input
        net.encoder.input_layer[0].weight[:, :3] *= 100  # weights so that pairing output i with input j shows
    ckpt = export_checkpoint(net, d / "tiny.pt")
    faces = d / "faces"
    faces.mkdir()
    ds = SyntheticFaces(n=3, size=256, train=False)
    for i in range(3):
        Image.fromarray(ds.render(i)).save(faces / f"{30 + i}_{i}.png")
    (faces / "readme.png").write_text("not an image")
    return ckpt, faces


def _cfg(setup, out: Path, *extra: str):
    ckpt, faces = setup
    return compose_config([f"checkpoint={ckpt}", f"data_dir={faces}", f"output_dir={out}",
                           "target_ages=[20,60]", "allow_random_nets=true", "batch_size=2", "progress=false",
                           *extra],
                          config_name="evaluate")


def _seeded_lpips():
    """LPIPS v0.1 on a random AlexNet straight from the lpips package, the same one every call (seed 0)."""
    import lpips

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False).eval()


def test_reports_have_a_row_per_age_and_match_a_hand_computation(setup, tmp_path, monkeypatch):
    import agingnet.models

    monkeypatch.setattr(agingnet.models, "build_lpips", lambda **kw: _seeded_lpips())
    out = tmp_path / "ev"
    res = ev.run_evaluation(_cfg(setup, out, "fid=true", "fid_features=arcface"))
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["target_age"]) for r in rows] == [20, 60]
    for r in rows:
        assert int(r["n"]) == 3
        assert r["model"] == "checkpoint" and r["gt_l2"] == r["gt_ssim"] == r["gt_blur"] == ""  # no world.json
        assert r["in_window"] == ""  # no window= given
        for c in ev.MEAN_COLUMNS[:-3]:  # all but gt_l2, gt_ssim, gt_blur
            if c != "in_window":
                assert math.isfinite(float(r[c])), c
    data = json.loads((out / "metrics.json").read_text())
    assert data["rows"] == res["rows"] and data["meta"]["n_images"] == 3
    assert data["meta"]["skipped"][0]["file"] == "readme.png"
    assert data["meta"]["nets"]["arcface"] == "random" and data["meta"]["fid"].startswith("on (arcface")
    md = (out / "metrics.md").read_text()
    assert "| checkpoint | 20 | 3 |" in md and "| checkpoint | 60 | 3 |" in md and "| checkpoint | mean | 3 |" in md
    # independently: the same random DEX / IR-SE50 networks, the aged images from a plain const-noise forward,
    # then every metric written out per image
    cfg = yaml.safe_load((CONFIG_DIR / "evaluate.yaml").read_text())["random_nets"]
    dex, arc, lp = build_dex(**cfg["dex"]), build_arcface(**cfg["arcface"]), _seeded_lpips()
    net = load_aging_model(setup[0]).eval()
    x = torch.stack([pil_to_tensor(Image.open(setup[1] / f"{30 + i}_{i}.png")) for i in range(3)])

    def embed(img):  # SPEC §4: rows 35:223, columns 32:220 of the 256 px image, average-pooled to 112 px
        return arc(F.adaptive_avg_pool2d(img[:, :, 35:223, 32:220], (112, 112)))[0]

    def mean_std(v):  # population standard deviation
        m = sum(v) / len(v)
        return m, math.sqrt(sum((e - m) ** 2 for e in v) / len(v))

    for k, t in enumerate([20, 60]):
        preds, coss, lps = [], [], []
        with torch.no_grad():
            y, _ = net(add_age_channel(x, torch.full((3,), t / 100)), noise_mode="const")
            for i in range(3):
                preds.append(float(dex.predict_age(y[i : i + 1])[0]))
                fy, fx = embed(y[i : i + 1]), embed(x[i : i + 1])
                coss.append(float((fy * fx).sum() / (fy.norm() * fx.norm())))
                lps.append(float(lp(y[i : i + 1], x[i : i + 1]).flatten()[0]))
        row = res["rows"][k]
        assert row["age_mae"] == pytest.approx(sum(abs(p - t) for p in preds) / 3, abs=1e-3)
        assert (row["age_pred_mean"], row["age_pred_std"]) == pytest.approx(mean_std(preds), abs=1e-3)
        assert (row["id_cos"], row["id_cos_std"]) == pytest.approx(mean_std(coss), abs=1e-5)
        assert row["lpips"] == pytest.approx(sum(lps) / 3, abs=1e-5)  # pairing output i with input j: ~7e-4
        assert float(rows[k]["id_cos"]) == pytest.approx(row["id_cos"], abs=1e-6)
    assert res["mean"]["age_mae"] == pytest.approx((res["rows"][0]["age_mae"] + res["rows"][1]["age_mae"]) / 2)


class _BrightnessAge(torch.nn.Module):
    """A stand-in DEX whose answer varies from image to image (a random DEX answers the same age for all):
    age = 40 + 200 · mean pixel."""

    def predict_age(self, img: torch.Tensor) -> torch.Tensor:
        return 40 + 200 * img.mean(dim=(1, 2, 3))


def test_in_window_is_the_share_of_images_whose_output_age_lies_inside(setup, tmp_path, monkeypatch):
    import agingnet.models

    monkeypatch.setattr(agingnet.models, "build_dex", lambda **kw: _BrightnessAge())
    net = load_aging_model(setup[0]).eval()
    x = torch.stack([pil_to_tensor(Image.open(setup[1] / f"{30 + i}_{i}.png")) for i in range(3)])
    ages = {}
    with torch.no_grad():  # independently: a plain const-noise forward per target, the stand-in's formula
        for t in (20, 60):
            y, _ = net(add_age_channel(x, torch.full((3,), t / 100)), noise_mode="const")
            ages[t] = sorted(float(40 + 200 * y[i].mean()) for i in range(3))
    lo, hi = (ages[20][0] + ages[20][1]) / 2, ages[20][2] + 0.5  # two of the three outputs at 20 inside
    assert min(abs(a - b) for v in ages.values() for a in v for b in (lo, hi)) > 1e-3  # no output on a bound
    res = ev.run_evaluation(_cfg(setup, tmp_path / "ev", f"window=[{lo},{hi}]"))
    for row in res["rows"]:
        assert row["in_window"] == pytest.approx(sum(lo <= a <= hi for a in ages[row["target_age"]]) / 3)
    assert res["rows"][0]["in_window"] == pytest.approx(2 / 3)
    assert res["meta"]["window"] == [lo, hi]
    assert res["mean"]["in_window"] == pytest.approx(sum(r["in_window"] for r in res["rows"]) / 2)
    row = next(csv.DictReader(open(tmp_path / "ev" / "metrics.csv")))
    assert float(row["in_window"]) == pytest.approx(2 / 3)


def test_fid_inception_is_skipped_clearly_without_torch_fidelity(setup, tmp_path):
    if importlib.util.find_spec("torch_fidelity") is not None:
        pytest.skip("torch-fidelity is installed: the inception path would try to load its weights")
    res = ev.run_evaluation(_cfg(setup, tmp_path / "ev", "fid=true", "target_ages=[40]", "max_images=2"))
    assert res["meta"]["fid"].startswith("skipped: ModuleNotFoundError")
    assert "orch-fidelity" in res["meta"]["fid"]
    assert res["rows"][0]["fid"] is None and res["rows"][0]["n"] == 2
    row = next(csv.DictReader(open(tmp_path / "ev" / "metrics.csv")))
    assert row["fid"] == "" and row["kid_mean"] == ""


def test_errors_name_the_key(setup, tmp_path):
    with pytest.raises(FileNotFoundError, match="weights.arcface: no such file"):
        ev.run_evaluation(_cfg(setup, tmp_path, "allow_random_nets=false",
                               f"weights.arcface={tmp_path}/a.pth"))
    cfg = _cfg(setup, tmp_path)
    cfg.data_dir = None
    with pytest.raises(ValueError, match="data_dir= is required"):
        ev.run_evaluation(cfg)
    with pytest.raises(ValueError, match="target_ages must list at least one age"):
        ev.run_evaluation(_cfg(setup, tmp_path, "target_ages=[]"))
    for bad, shown in (("window=[42,38]", r"\[42, 38\]"), ("window=[40]", r"\[40\]"), ("window=40", "40"),
                       ("window=[a,50]", r"\['a', 50\]")):
        with pytest.raises(ValueError, match=r"window must be \[lo, hi\] in years with lo <= hi .*got " + shown):
            ev.run_evaluation(_cfg(setup, tmp_path / "never", bad))
    assert not (tmp_path / "never").exists()  # refused before anything was written


def test_command_line_data_is_passed_on_as_data_dir(monkeypatch):
    seen = {}
    monkeypatch.setattr(sys, "argv", ["evaluate", "checkpoint=c.pt", "data=/faces", "fid=true"])
    monkeypatch.setattr(ev, "_hydra_main", lambda: seen.setdefault("argv", list(sys.argv)))
    ev.main()
    assert seen["argv"] == ["evaluate", "checkpoint=c.pt", "data_dir=/faces", "fid=true"]


def _ssim_reference(x, y):
    """SSIM written out (Wang et al. 2004): Gaussian window 11 px, σ 1.5, K1 0.01, K2 0.03, data range 1, one
    window centred on every pixel with the image mirrored at its borders (torchmetrics' convention), local
    variances floored at 0, averaged over channels and positions. x, y [3,H,W] in [0,1]."""
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    w = (g[:, None] * g[None, :] / g.sum() ** 2).expand(3, 1, 11, 11)

    def blur(v):
        return F.conv2d(F.pad(v[None].double(), (5, 5, 5, 5), mode="reflect"), w, groups=3)[0]

    mx, my = blur(x), blur(y)
    sxx, syy = (blur(x * x) - mx**2).clamp(min=0), (blur(y * y) - my**2).clamp(min=0)
    sxy = blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    return float((((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))).mean())


@pytest.fixture(scope="module")
def actor(tmp_path_factory, setup):
    from agingnet.world.data import write_actor

    d = tmp_path_factory.mktemp("world")
    folder = write_actor(100_007, d / "actor", seed=3, ages=[30, 50], test_ages=[25, 45], n_train=2, n_test=2)
    kw = yaml.safe_load((CONFIG_DIR / "model" / "tiny.yaml").read_text())["net"]
    base = build_aging_net(**{**kw, "pretrained_encoder": False, "seed": 5})
    return Path(folder), export_checkpoint(base, d / "base.pt")


def test_world_actor_rows_get_ground_truth_world_nets_and_a_baseline(setup, actor, tmp_path):
    from agingnet.world import render

    folder, base_ckpt = actor
    cfg = _cfg(setup, tmp_path / "ev", f"data_dir={folder / 'test'}", f"baseline={base_ckpt}",
               "target_ages=[40,70]")
    res = ev.run_evaluation(cfg)
    assert [(r["model"], r["target_age"]) for r in res["rows"]] == [
        ("checkpoint", 40), ("checkpoint", 70), ("baseline", 40), ("baseline", 70)]
    assert res["meta"]["nets"]["dex"] == res["meta"]["nets"]["arcface"] == "world"  # world_nets=auto
    assert res["meta"]["world"]["identity"] == 100_007 and res["meta"]["baseline"] == str(base_ckpt)
    files = sorted((folder / "test").glob("*.png"))
    x = torch.stack([pil_to_tensor(Image.open(f)) for f in files])
    for label, ckpt in (("checkpoint", setup[0]), ("baseline", base_ckpt)):
        net = load_aging_model(ckpt).eval()
        for t in (40, 70):
            with torch.no_grad():
                y, _ = net(add_age_channel(x, torch.full((len(files),), t / 100)), noise_mode="const")
            truth = torch.from_numpy(render(100_007, t, size=256)).permute(2, 0, 1).float() / 127.5 - 1
            l2 = [float(((y[i] - truth) ** 2).mean()) for i in range(len(files))]
            ss = [_ssim_reference((y[i] + 1) / 2, (truth + 1) / 2) for i in range(len(files))]
            blur = blur_fit_reference(y, truth[None], BLUR_GRID)
            row = next(r for r in res["rows"] if r["model"] == label and r["target_age"] == t)
            assert row["gt_l2"] == pytest.approx(sum(l2) / len(l2), rel=1e-4)
            assert row["gt_ssim"] == pytest.approx(sum(ss) / len(ss), abs=1e-4)
            assert row["gt_blur"] == pytest.approx(sum(blur) / len(blur))
    assert res["mean_baseline"]["gt_l2"] == pytest.approx(
        sum(r["gt_l2"] for r in res["rows"] if r["model"] == "baseline") / 2)
    assert res["rows"][0]["gt_l2"] != res["rows"][2]["gt_l2"]  # two different models were evaluated
    md = (tmp_path / "ev" / "metrics.md").read_text()
    assert "| baseline | mean | 2 |" in md and "world actor 100007" in md
    header = next(csv.reader(open(tmp_path / "ev" / "metrics.csv")))
    assert header[0] == "model" and header[-3:] == ["gt_l2", "gt_ssim", "gt_blur"]


def test_world_bad_input_is_one_clear_error(setup, actor, tmp_path):
    import shutil

    folder, _ = actor
    stale = tmp_path / "stale"
    shutil.copytree(folder, stale)
    meta = json.loads((stale / "world.json").read_text())
    (stale / "world.json").write_text(json.dumps({**meta, "renderer_version": 0}))
    with pytest.raises(ValueError, match=r"world\.json: renderer version 0 does not match"):
        ev.run_evaluation(_cfg(setup, tmp_path / "ev2", f"data_dir={stale / 'test'}"))
    assert not (tmp_path / "ev").exists() and not (tmp_path / "ev2").exists()  # nothing written


def test_truth_rows_score_the_actors_true_face_in_each_photos_light(setup, tmp_path):
    """truth=true: the rows ``truth`` score render(identity, t, photo=(seed, idx)) for every photo ``{age}_{idx}``.
    At a photo's own age that is the photo itself (LPIPS 0, identity cosine 1)."""
    from agingnet.world import render
    from agingnet.world.data import write_actor
    from agingnet.world.weights import load_world_dex

    folder = write_actor(100_008, tmp_path / "actor", seed=4, ages=[30], test_ages=[45, 45], n_train=1, n_test=2)
    cfg = _cfg(setup, tmp_path / "ev", f"data_dir={folder / 'test'}", "truth=true", "target_ages=[45,70]",
               "window=[44,46]")
    res = ev.run_evaluation(cfg)
    assert [(r["model"], r["target_age"]) for r in res["rows"]] == [
        ("checkpoint", 45), ("checkpoint", 70), ("truth", 45), ("truth", 70)]
    own = next(r for r in res["rows"] if r["model"] == "truth" and r["target_age"] == 45)
    assert own["lpips"] == pytest.approx(0.0, abs=1e-6) and own["id_cos"] == pytest.approx(1.0, abs=1e-5)
    # by hand: photos 1 and 2 (index 0 is the training photo) of seed 4, at 70, through the world DEX
    photos = torch.stack([torch.from_numpy(render(100_008, 70, size=256, photo=(4, i))).permute(2, 0, 1).float()
                          for i in (1, 2)]) / 127.5 - 1
    canonical = torch.from_numpy(render(100_008, 70, size=256)).permute(2, 0, 1).float() / 127.5 - 1
    with torch.no_grad():
        ages = load_world_dex().predict_age(photos)
    old = next(r for r in res["rows"] if r["model"] == "truth" and r["target_age"] == 70)
    assert old["age_pred_mean"] == pytest.approx(float(ages.mean()), abs=1e-3)
    assert old["age_mae"] == pytest.approx(float((ages - 70).abs().mean()), abs=1e-3)
    assert old["in_window"] == float(((ages >= 44) & (ages <= 46)).float().mean())
    assert old["gt_l2"] == pytest.approx(float(((photos - canonical) ** 2).mean()), rel=1e-4)
    blur = blur_fit_reference(photos, canonical[None], BLUR_GRID)  # the photos' shift (≤ 3 px) reads as a small blur
    assert old["gt_blur"] == pytest.approx(sum(blur) / len(blur)) and old["gt_blur"] <= 4.0
    assert res["mean_truth"]["lpips"] == pytest.approx((own["lpips"] + old["lpips"]) / 2)
    assert res["meta"]["truth"] is True and "| truth | mean | 2 |" in (tmp_path / "ev" / "metrics.md").read_text()


def test_truth_needs_a_world_actor(setup, tmp_path):
    with pytest.raises(ValueError, match=r"truth=true needs a world actor's folder .* data=.*faces has none"):
        ev.run_evaluation(_cfg(setup, tmp_path / "ev", "truth=true"))
    with pytest.raises(ValueError, match=r"truth must be true or false, got 'yes'"):
        ev.run_evaluation(_cfg(setup, tmp_path / "ev", "truth=yes"))
    assert not (tmp_path / "ev").exists()


def test_photo_index_reads_listed_photos_only():
    from agingnet.world.truth import photo_index

    actor = {"identity": 100_000, "train": {"21_0.png": 21}, "test": {"40_25.png": 40, "odd.png": 40}}
    assert photo_index(actor, "any/dir/40_25.png") == 25 and photo_index(actor, "21_0.png") == 0
    with pytest.raises(ValueError, match=r"dir/40_7\.png: not one of world actor 100000's photos"):
        photo_index(actor, "dir/40_7.png")
    with pytest.raises(ValueError, match=r"odd\.png: an actor's photo is named <age>_<index>\.png"):
        photo_index(actor, "odd.png")

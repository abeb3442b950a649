"""Bank building (blur / actor / age filters), the bank CLI, atomic save and round trips.

Generated 256 px PNGs encode what the tiny networks read: age = 100·(mean red)/255, embedding angle
θ = π·(mean blue)/255 → e = (cos θ, sin θ, 0, 0); sharpness comes from a 0/255 checkerboard in green.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import agingnet.pretrained
from agingnet.bank import build_bank, laplacian_variance, list_images, load_image, main
from agingnet.impostor_bank import ImpostorBank

# (red, blue, checkerboard) per image: ages 40, 40, 20, 78.4, 90.2 (dropped), 40 (flat → blurry)
SPECS = [(102, 0, True), (102, 64, True), (51, 128, True), (200, 192, True), (230, 255, True),
         (102, 32, False)]


def write_png(path, red: int, blue: int, checker: bool) -> None:
    img = np.zeros((256, 256, 3), np.uint8)
    img[..., 0], img[..., 2] = red, blue
    yy, xx = np.mgrid[:256, :256]
    img[..., 1] = np.where((yy + xx) % 2 == 1, 255, 0) if checker else 128
    Image.fromarray(img).save(path)


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "faces"
    d.mkdir()
    for i, spec in enumerate(SPECS):
        write_png(d / f"img_{i}.png", *spec)
    return d


def embed_fn(img: torch.Tensor) -> torch.Tensor:
    theta = (img[:, 2].mean(dim=(1, 2)) + 1) / 2 * math.pi
    z = torch.zeros_like(theta)
    return torch.stack([torch.cos(theta), torch.sin(theta), z, z], dim=1)


def age_fn(img: torch.Tensor) -> torch.Tensor:
    return (img[:, 0].mean(dim=(1, 2)) + 1) / 2 * 100


def test_laplacian_variance_hand_values(images):
    x = torch.stack([load_image(images / "img_0.png"), load_image(images / "img_5.png")])
    assert x.shape == (2, 3, 256, 256) and float(x.min()) >= -1 and float(x.max()) <= 1
    v = laplacian_variance(x)
    # green checkerboard 0/255: every interior Laplacian is ±4·255·0.587 (balanced signs) → variance = that²
    assert float(v[0]) == pytest.approx((4 * 255 * 0.587) ** 2, rel=1e-5)
    assert float(v[1]) == pytest.approx(0.0, abs=1e-6)


def test_build_bins_and_meta(images):
    bank = build_bank(list_images(images), embed_fn, age_fn, batch_size=4, progress=False)
    assert bank.bin_counts() == {"18-22": 1, "38-42": 3, "78-82": 1}
    assert bank.meta["n_out_of_range"] == 1 and bank.meta["n_images"] == 6 and bank.meta["bin_size"] == 5
    assert sorted(round(a, 2) for a in bank.ages.tolist()) == [20.0, 40.0, 40.0, 40.0, 78.43]
    torch.testing.assert_close(bank.embeddings.norm(dim=1), torch.ones(5))


def test_blur_filter(images):
    bank = build_bank(list_images(images), embed_fn, age_fn, batch_size=3, blur_threshold=1000.0,
                      progress=False)
    assert bank.meta["n_blurry"] == 1 and bank.bin_counts()["38-42"] == 2


@pytest.mark.parametrize("max_sim, dropped", [(0.65, 2), (0.75, 1)])
def test_actor_filter(images, max_sim, dropped):
    # actor centre at θ = 0: cos = 1 for img_0, cos(π·64/255) ≈ 0.705 for img_1, < 0 for the others
    actor = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    paths = [p for p in list_images(images) if p.name != "img_5.png"]
    bank = build_bank(paths, embed_fn, age_fn, batch_size=2, actor_embeddings=actor, actor_max_sim=max_sim,
                      progress=False)
    assert bank.meta["n_actor"] == dropped and bank.bin_counts().get("38-42", 0) == 2 - dropped
    cos = bank.embeddings @ actor[0]
    assert bool((cos < max_sim).all())


def test_unreadable_image_is_skipped(images):
    (images / "broken.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="cannot read .*broken.png"):
        bank = build_bank(list_images(images), embed_fn, age_fn, batch_size=8, progress=False)
    assert bank.meta["n_unreadable"] == 1 and len(bank) == 5
    with pytest.raises(ValueError, match="no images"):
        build_bank([], embed_fn, age_fn)


def test_round_trip_and_inspect(images, tmp_path, capsys):
    bank = build_bank(list_images(images), embed_fn, age_fn, batch_size=4, progress=False)
    p = tmp_path / "banks" / "b.pt"
    bank.save(p)
    back = ImpostorBank.load(p)
    assert torch.equal(back.embeddings, bank.embeddings) and torch.equal(back.bin_ids, bank.bin_ids)
    assert torch.equal(back.ages, bank.ages) and back.meta == bank.meta
    raw = torch.load(p, weights_only=True)
    assert sorted(raw["bins"]) == ["18-22", "38-42", "78-82"] and raw["bins"]["38-42"].shape == (3, 4)
    assert main(["inspect", str(p)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.strip().startswith("38-42")).split()
    assert row[1] == "3" and float(row[2]) == pytest.approx(40.0, abs=0.01)
    assert "5 embeddings" in out and "(ok)" in out


def test_inspect_bad_file_reports(tmp_path, capsys):
    p = tmp_path / "bad.pt"
    torch.save({"bins": {}}, p)
    assert main(["inspect", str(p)]) == 1
    err = capsys.readouterr().err
    assert "bad.pt" in err and "'bins' and 'ages'" in err
    assert main(["inspect", str(tmp_path / "none.pt")]) == 1
    assert "not found" in capsys.readouterr().err


def test_save_is_atomic(images, tmp_path, monkeypatch):
    bank = build_bank(list_images(images), embed_fn, age_fn, progress=False)
    p = tmp_path / "b.pt"
    bank.save(p)
    before = p.read_bytes()

    def broken_save(obj, fh, *a, **k):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        bank.save(p)
    assert p.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["b.pt", "faces"]


class FakeArcface(nn.Module):
    input_size = 8

    def forward(self, x):
        return embed_fn(x)


class FakeDex(nn.Module):
    def predict_age(self, x):
        return age_fn(x)


def test_cli_build(images, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(agingnet.pretrained, "load_arcface", lambda path: FakeArcface())
    monkeypatch.setattr(agingnet.pretrained, "load_dex", lambda path: FakeDex())
    actor = tmp_path / "actor"
    actor.mkdir()
    write_png(actor / "a.png", 90, 0, True)
    out = tmp_path / "out" / "bank.pt"
    rc = main(["build", "--images", str(images), "--arcface", "a.pth", "--dex", "d.pth", "--out", str(out),
               "--batch-size", "2", "--device", "cpu", "--blur-threshold", "10", "--actor-dir", str(actor),
               "--quiet"])
    assert rc == 0
    bank = ImpostorBank.load(out)
    # img_0 (actor, cos 1), img_1 (cos 0.705) and img_5 (blurry) dropped; img_4 too old
    assert bank.bin_counts() == {"18-22": 1, "78-82": 1}
    assert bank.meta["n_actor"] == 2 and bank.meta["n_blurry"] == 1 and bank.meta["source"] == str(images)
    assert "78-82" in capsys.readouterr().out

"""Data layer (SPEC §3): parse_age, folder datasets, synthetic faces, the data module."""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agingnet import world
from agingnet.data import (
    AgingDataModule,
    FFHQFolderDataset,
    PersonalFolderDataset,
    ResumableRandomSampler,
    SyntheticFaces,
    parse_age,
)

# ----------------------------------------------------------------------------------------------------
# helpers


def _halves(h: int = 24, w: int = 36) -> np.ndarray:
    """Left half pure red, right half grey 51: a horizontal flip is visible, values are known."""
    a = np.empty((h, w, 3), dtype=np.uint8)
    a[:, : w // 2] = (255, 0, 0)
    a[:, w // 2 :] = 51
    return a


def _bilinear_reference(a: np.ndarray, size: int) -> torch.Tensor:
    """[3,size,size] in [-1,1]: a brute-force resize of an image whose rows are all equal (so the vertical
    pass is the identity), horizontally with the triangle filter of a downscale: output column j is centred
    at c = (j + ½)·s in input pixels (s = w / size) and weighs input column i by max(0, 1 − |i + ½ − c| / s),
    normalized. Values then map as v / 127.5 − 1."""
    h, w, _ = a.shape
    assert (a == a[:1]).all() and w >= size, "reference only for equal rows and a horizontal downscale"
    s = w / size
    cols = []
    for j in range(size):
        c = (j + 0.5) * s
        wts = [max(0.0, 1 - abs(i + 0.5 - c) / s) for i in range(w)]
        cols.append([sum(wt * float(a[0, i, ch]) for i, wt in enumerate(wts)) / sum(wts) for ch in range(3)])
    row = torch.tensor(cols, dtype=torch.float32).T  # [3, size]
    return (row[:, None, :].expand(3, size, size) / 127.5 - 1).contiguous()


#: PIL rounds the filtered value to 8 bits: half a level in [-1,1] units, plus float slack
HALF_LEVEL = 0.5 / 127.5 + 1e-6


@pytest.fixture
def personal(tmp_path: Path) -> Path:
    root = tmp_path / "shot_alice"
    root.mkdir()
    Image.fromarray(_halves()).save(root / "40_1.png")
    Image.fromarray(_halves()[..., 0]).save(root / "38_2.JPG", quality=100)  # grayscale
    rgba = np.dstack([_halves(), np.full((24, 36), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "42_0.png")
    Image.fromarray(_halves()).save(root / "45 copy.bmp")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"ignored")
    return root


def _write_age_json(path: Path, table: dict) -> Path:
    path.write_text(json.dumps(table))
    return path


# ----------------------------------------------------------------------------------------------------
# parse_age


@pytest.mark.parametrize(
    "name,age",
    [
        ("40_3.png", 40),
        ("40.png", 40),
        ("40 copy.jpg", 40),
        ("/data/shot/7_12.JPG", 7),
        (Path("0_1.webp"), 0),
        ("120", 120),
        ("05_1.png", 5),
        ("4.5_1.png", 4),
    ],
)
def test_parse_age(name, age):
    assert parse_age(name) == age


@pytest.mark.parametrize(
    "name", ["abc_1.png", "_3.png", ".png", "x40_1.png", "4a_1.png", "-5_1.png", "²_1.png"]
)
def test_parse_age_errors_name_the_file(name):
    with pytest.raises(ValueError, match=f"cannot parse an age from file name '{name}'"):
        parse_age(name)


def test_parse_age_rejects_implausible_age():
    with pytest.raises(ValueError, match=r"age 1999 parsed from file name '1999_01.png'"):
        parse_age("1999_01.png")


# ----------------------------------------------------------------------------------------------------
# PersonalFolderDataset


def test_personal_listing_sorted_with_ages(personal: Path):
    ds = PersonalFolderDataset(personal, size=32, train=False)
    assert [p.name for p in ds.paths] == ["38_2.JPG", "40_1.png", "42_0.png", "45 copy.bmp"]
    assert ds.ages == [38.0, 40.0, 42.0, 45.0]
    assert len(ds) == 4


def test_personal_item_shape_range_and_values(personal: Path):
    ds = PersonalFolderDataset(personal, size=32, train=False)
    for i in range(len(ds)):
        it = ds[i]
        x = it["image"]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        assert it["index"] == i and it["path"] == str(ds.paths[i]) and it["age"] == ds.ages[i]
    x = ds[1]["image"]  # 40_1.png, resized 36x24 → 32x32 (bilinear, as the fork's transforms.Resize)
    ref = _bilinear_reference(_halves(), 32)
    torch.testing.assert_close(x, ref, atol=HALF_LEVEL, rtol=0)
    # the edge column j = 15 by hand: c = 17.4375, weights 3/18, 17/18 (red columns 16, 17), 1/18 (grey 18)
    assert float(ref[0, 0, 15]) == pytest.approx((20 * 255 + 51) / 21 / 127.5 - 1)
    assert torch.equal(x[:, :, 0], torch.tensor([1.0, -1.0, -1.0])[:, None].expand(3, 32))  # pure red
    assert torch.allclose(x[:, :, -1], torch.full((3, 32), -0.6))  # pure grey 51
    gray = ds[0]["image"]  # grayscale → RGB: three equal channels
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    rgba = ds[2]["image"]  # RGBA → RGB: alpha dropped
    assert torch.allclose(rgba, x)


def test_personal_flip_only_in_train(personal: Path):
    ref = PersonalFolderDataset(personal, size=32, train=False, flip_p=1.0)[1]["image"]
    assert ref[0, 0, 0] == 1.0  # test mode never flips, whatever flip_p
    always = PersonalFolderDataset(personal, size=32, train=True, flip_p=1.0)[1]["image"]
    mirrored = _bilinear_reference(_halves()[:, ::-1], 32)  # the file mirrored by hand, then resized
    torch.testing.assert_close(always, mirrored, atol=HALF_LEVEL, rtol=0)
    assert torch.equal(always, ref.flip(-1)) and always[0, 0, 0] < 0
    never = PersonalFolderDataset(personal, size=32, train=True, flip_p=0.0)[1]["image"]
    assert torch.equal(never, ref)
    torch.manual_seed(0)
    half = PersonalFolderDataset(personal, size=32, train=True, flip_p=0.5)
    flipped = [bool(half[1]["image"][0, 0, 0] < 0) for _ in range(60)]
    assert 10 < sum(flipped) < 50


def test_personal_without_augmentation_same_files(personal: Path):
    ds = PersonalFolderDataset(personal, size=32, train=True, flip_p=1.0)
    bank = ds.without_augmentation()
    assert bank.train is False and ds.train is True
    assert bank.paths == ds.paths and bank.ages == ds.ages
    assert bank[1]["image"][0, 0, 0] == 1.0


def test_personal_errors(tmp_path: Path, personal: Path):
    with pytest.raises(FileNotFoundError, match="dataset folder not found: .*nowhere"):
        PersonalFolderDataset(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="not a folder: .*40_1.png"):
        PersonalFolderDataset(personal / "40_1.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no images .* in dataset folder .*empty"):
        PersonalFolderDataset(empty)
    Image.fromarray(_halves()).save(personal / "portrait.png")
    with pytest.raises(ValueError, match="portrait.png"):
        PersonalFolderDataset(personal)
    with pytest.raises(ValueError, match="flip_p"):
        PersonalFolderDataset(empty, flip_p=1.5)


def test_personal_unreadable_image_fails_at_setup_or_load(tmp_path: Path):
    root = tmp_path / "bad"
    root.mkdir()
    Image.fromarray(_halves()).save(root / "30_0.png")
    good = (root / "30_0.png").read_bytes()
    (root / "31_2.png").write_bytes(good[: len(good) // 2])  # truncated: the header reads, the pixels do not
    ds = PersonalFolderDataset(root, size=16)
    assert ds[0]["image"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match=r"cannot read image .*31_2\.png"):
        ds[1]
    with pytest.raises(IndexError, match="index 2 out of range"):
        ds[2]
    (root / "30_1.png").write_bytes(b"definitely not a png")  # not an image at all: refused when the set is built
    with pytest.raises(ValueError, match=r"cannot read image .*30_1\.png"):
        PersonalFolderDataset(root, size=16)


def test_personal_fingerprint_tracks_files(personal: Path):
    ds = PersonalFolderDataset(personal, size=32)
    fp = ds.fingerprint()
    assert len(fp) == 64 and fp == PersonalFolderDataset(personal, size=32).fingerprint()
    assert ds.without_augmentation().fingerprint() == fp  # augmentation does not change the content key
    assert PersonalFolderDataset(personal, size=64).fingerprint() != fp
    target = personal / "40_1.png"
    st = target.stat()
    Image.fromarray(_halves()[::-1, ::-1].copy()).save(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert PersonalFolderDataset(personal, size=32).fingerprint() != fp


# ----------------------------------------------------------------------------------------------------
# FFHQFolderDataset


@pytest.fixture
def ffhq(tmp_path: Path) -> Path:
    root = tmp_path / "ffhq"
    (root / "00000").mkdir(parents=True)
    (root / "01000").mkdir()
    for rel in ("00000/00001.png", "00000/00002.png", "01000/01005.jpg"):
        Image.fromarray(_halves()).save(root / rel)
    return root


def test_ffhq_ages_from_json_else_nan(ffhq: Path, tmp_path: Path):
    ages = _write_age_json(
        tmp_path / "ages.json", {"00000/00001.png": 33.5, "01005.jpg": 61, "00000/00002.png": None}
    )
    ds = FFHQFolderDataset(ffhq, size=16, ages_file=ages, train=False)
    assert [p.relative_to(ffhq).as_posix() for p in ds.paths] == [
        "00000/00001.png",
        "00000/00002.png",
        "01000/01005.jpg",
    ]
    assert ds.ages[0] == 33.5 and math.isnan(ds.ages[1]) and ds.ages[2] == 61.0
    it = ds[2]
    assert it["image"].shape == (3, 16, 16) and it["age"] == 61.0
    assert all(math.isnan(a) for a in FFHQFolderDataset(ffhq).ages)


def test_ffhq_fingerprint_includes_ages_file(ffhq: Path, tmp_path: Path):
    a = FFHQFolderDataset(
        ffhq, ages_file=_write_age_json(tmp_path / "a.json", {"00001.png": 30})
    ).fingerprint()
    b = FFHQFolderDataset(
        ffhq, ages_file=_write_age_json(tmp_path / "b.json", {"00001.png": 31})
    ).fingerprint()
    assert a != b


def test_ffhq_ages_file_errors(ffhq: Path, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="ages file not found: .*missing.json"):
        FFHQFolderDataset(ffhq, ages_file=tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        FFHQFolderDataset(ffhq, ages_file=tmp_path / "bad.json")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        FFHQFolderDataset(ffhq, ages_file=_write_age_json(tmp_path / "list.json", [1, 2]))
    with pytest.raises(ValueError, match="age of '00001.png' must be a number"):
        FFHQFolderDataset(ffhq, ages_file=_write_age_json(tmp_path / "str.json", {"00001.png": "old"}))


# ----------------------------------------------------------------------------------------------------
# SyntheticFaces


def _hair_grey_fraction(img: np.ndarray) -> float:
    """Fraction of low-saturation bright pixels in the hair band above the forehead (rows .16-.24·S)."""
    S = img.shape[0]
    band = img[int(0.16 * S) : int(0.24 * S), int(0.38 * S) : int(0.62 * S)].astype(int)
    return float(((band.max(-1) - band.min(-1) < 25) & (band.mean(-1) > 150)).mean())


def test_synthetic_deterministic_shapes_and_ages():
    a = SyntheticFaces(n=6, size=64, seed=3, train=False)
    b = SyntheticFaces(n=6, size=64, seed=3, train=False)
    c = SyntheticFaces(n=6, size=64, seed=4, train=False)
    for i in range(6):
        ia, ib = a[i], b[i]
        assert torch.equal(ia["image"], ib["image"]) and ia["age"] == ib["age"]
        assert ia["image"].shape == (3, 64, 64) and ia["image"].dtype == torch.float32
        assert -1 <= ia["image"].min() and ia["image"].max() <= 1
        assert ia["path"] == f"synthetic://{i}" and ia["index"] == i
    fresh = SyntheticFaces(n=6, size=64, seed=3, train=False)[2]  # read first, before any other index
    assert torch.equal(a[2]["image"], fresh["image"])  # a face is a function of (seed, index), not of order
    assert not torch.equal(a[0]["image"], a[1]["image"])
    assert not all(torch.equal(a[i]["image"], c[i]["image"]) for i in range(6))
    ages = SyntheticFaces(n=200, min_age=20, max_age=25).ages
    assert set(ages) == {20.0, 21.0, 22.0, 23.0, 24.0, 25.0}
    # item (seed, index) is the stream's first draw as its age and second as its identity, rendered in photo
    # (seed, index); written out here, independent of the dataset's helpers
    rng = np.random.default_rng([3, 0, 4])
    age, ident = int(rng.integers(10, 81)), int(rng.integers(0, 100000))
    item = a[4]
    assert item["age"] == age and item["world_identity"] == ident
    truth = torch.from_numpy(world.render(ident, age, size=64, photo=(3, 4))).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(item["image"], truth, atol=1e-6)


def test_synthetic_older_faces_are_greyer_and_more_wrinkled():
    ds = SyntheticFaces(n=60, size=64, seed=1, min_age=10, max_age=80, train=False)
    ages = np.array(ds.ages)
    imgs = [ds.render(i) for i in range(len(ds))]
    grey = np.array([_hair_grey_fraction(im) for im in imgs])
    young, old = ages <= 30, ages >= 60
    assert young.sum() >= 8 and old.sum() >= 8
    assert grey[young].max() < 0.05 and grey[old].mean() > 0.5
    # forehead texture: mean |vertical gradient| rises with wrinkles (independent of the colour test)
    forehead = np.array(
        [np.abs(np.diff(im[18:26, 22:42].astype(float).mean(-1), axis=0)).mean() for im in imgs]
    )
    assert forehead[old].mean() > 2 * forehead[young].mean()
    assert np.corrcoef(ages, grey)[0, 1] > 0.8


def test_synthetic_layout_eyes_and_mouth():
    ds = SyntheticFaces(n=4, size=256, seed=0, min_age=30, max_age=30, train=False)
    img = ds.render(0).astype(float).mean(-1)
    # the darkest spot of each eye region (pupil) sits near (0.38|0.62, 0.45)·256
    for cx in (0.38, 0.62):
        x0, y0 = int((cx - 0.06) * 256), int(0.40 * 256)
        win = img[y0 : y0 + 26, x0 : x0 + 31]
        y, x = np.unravel_index(win.argmin(), win.shape)
        assert abs(x0 + x - cx * 256) <= 8 and abs(y0 + y - 0.45 * 256) <= 8


def test_synthetic_flip_in_train_only():
    test = SyntheticFaces(n=3, size=256, train=False, flip_p=1.0)
    train = SyntheticFaces(n=3, size=256, train=True, flip_p=1.0)
    assert torch.equal(train[1]["image"], test[1]["image"].flip(-1))
    assert train[1]["flipped"] and not test[1]["flipped"]


def test_synthetic_fingerprint_and_errors():
    base = SyntheticFaces(n=8, seed=0).fingerprint()
    assert base == SyntheticFaces(n=8, seed=0, train=False).fingerprint()
    assert base != SyntheticFaces(n=8, seed=1).fingerprint() != SyntheticFaces(n=9, seed=0).fingerprint()
    with pytest.raises(ValueError, match="n must be a positive integer, got 0"):
        SyntheticFaces(n=0)
    with pytest.raises(ValueError, match="min_age=50 max_age=40"):
        SyntheticFaces(min_age=50, max_age=40)
    with pytest.raises(ValueError, match="image size must be an integer >= 8, got 4"):
        SyntheticFaces(size=4)
    with pytest.raises(IndexError, match="index 8 out of range"):
        SyntheticFaces(n=8)[8]


# ----------------------------------------------------------------------------------------------------
# AgingDataModule


def test_datamodule_batches_and_shuffle():
    dm = AgingDataModule(
        train=SyntheticFaces(n=10, size=32),
        val=SyntheticFaces(n=5, size=32),
        batch_size=4,
        val_batch_size=2,
        seed=1,
        resumable=False,
    )
    batches = list(dm.train_dataloader())
    assert len(batches) == 2  # 10 // 4 with drop_last
    b = batches[0]
    assert b["image"].shape == (4, 3, 32, 32) and b["image"].dtype == torch.float32
    assert b["age"].shape == (4,) and b["age"].dtype == torch.float32
    assert b["index"].dtype == torch.int64 and len(b["path"]) == 4
    order = torch.cat([x["index"] for x in batches]).tolist()
    assert len(set(order)) == 8 and order != sorted(order)
    again = AgingDataModule(train=SyntheticFaces(n=10, size=32), batch_size=4, seed=1,
                            resumable=False).train_dataloader()
    assert torch.cat([x["index"] for x in again]).tolist() == order  # seeded shuffle
    ages = torch.tensor(SyntheticFaces(n=10).ages)
    assert torch.equal(b["age"], ages[b["index"]])


def test_datamodule_val_order_stable_and_never_flipped():
    val = SyntheticFaces(n=5, size=32, train=True, flip_p=1.0)
    dm = AgingDataModule(val=val, batch_size=4, val_batch_size=2)
    runs = [list(dm.val_dataloader()) for _ in range(2)]
    for run in runs:
        assert [x["index"].tolist() for x in run] == [[0, 1], [2, 3], [4]]  # all samples, fixed order
    ref = SyntheticFaces(n=5, size=32, train=False)
    assert torch.equal(runs[0][0]["image"][1], ref[1]["image"])  # no flip although val.train=True
    assert torch.equal(runs[0][2]["image"], runs[1][2]["image"])
    assert AgingDataModule().val_dataloader() == []


def test_datamodule_bank_and_fingerprint(personal: Path):
    train = PersonalFolderDataset(personal, size=32, train=True, flip_p=1.0)
    dm = AgingDataModule(train=train, batch_size=2)
    bank = dm.personal_bank_dataset()
    assert bank.train is False and bank.paths == train.paths and train.train is True
    fp = dm.fingerprint()
    assert fp == AgingDataModule(train=PersonalFolderDataset(personal, size=32)).fingerprint()
    target = personal / "45 copy.bmp"
    st = target.stat()
    Image.fromarray(np.zeros((24, 36, 3), np.uint8)).save(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert AgingDataModule(train=PersonalFolderDataset(personal, size=32)).fingerprint() != fp
    Image.fromarray(_halves()).save(personal / "50_9.png")  # a new file
    assert AgingDataModule(train=PersonalFolderDataset(personal, size=32)).fingerprint() != fp
    syn = AgingDataModule(train=SyntheticFaces(n=8, seed=0)).fingerprint()
    assert syn == AgingDataModule(train=SyntheticFaces(n=8, seed=0)).fingerprint()
    assert syn != AgingDataModule(train=SyntheticFaces(n=8, seed=5)).fingerprint()


def test_datamodule_errors():
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        AgingDataModule(batch_size=0)
    with pytest.raises(ValueError, match="num_workers"):
        AgingDataModule(num_workers=-1)
    with pytest.raises(ValueError, match="no train dataset"):
        AgingDataModule().train_dataloader()
    with pytest.raises(ValueError, match="has 3 images, fewer than batch_size=4"):
        AgingDataModule(train=SyntheticFaces(n=3), batch_size=4).train_dataloader()
    with pytest.raises(ValueError, match="fingerprint needs a train dataset"):
        AgingDataModule().fingerprint()
    with pytest.raises(ValueError, match="TensorDataset has no without_augmentation"):
        AgingDataModule(val=torch.utils.data.TensorDataset(torch.zeros(2))).val_dataloader()


def test_datamodule_from_hydra_config():
    from hydra.utils import instantiate

    cfg = {
        "_target_": "agingnet.data.AgingDataModule",
        "batch_size": 2,
        "seed": 0,
        "train": {"_target_": "agingnet.data.SyntheticFaces", "n": 4, "size": 32},
        "val": {"_target_": "agingnet.data.SyntheticFaces", "n": 2, "size": 32, "train": False},
    }
    dm = instantiate(cfg)
    assert isinstance(dm.train_set, SyntheticFaces) and len(dm.val_set) == 2
    assert next(iter(dm.train_dataloader()))["image"].shape == (2, 3, 32, 32)


def test_datamodule_with_workers():
    dm = AgingDataModule(train=SyntheticFaces(n=6, size=32), batch_size=3, num_workers=1, seed=2)
    idx = torch.cat([b["index"] for b in itertools.islice(dm.train_dataloader(), 2)]).tolist()
    assert sorted(idx) == list(range(6))


def test_resumable_stream_is_a_pure_function_of_seed_and_position():
    ds = SyntheticFaces(n=5, size=32, flip_p=0.5)
    stream = list(itertools.islice(iter(ResumableRandomSampler(5, seed=3, flip_p=0.5)), 12))
    assert sorted(i for i, _ in stream[:5]) == list(range(5)) and sorted(i for i, _ in stream[5:10]) == list(range(5))
    assert stream[:5] != stream[5:10]  # a new permutation each epoch
    assert list(itertools.islice(iter(ResumableRandomSampler(5, seed=3, flip_p=0.5, start=7)), 5)) == stream[7:]
    flips = [f for _, f in stream]
    assert any(flips) and not all(flips)
    # the dataset applies the sampler's flip decision, not its own random draw
    assert torch.equal(ds[(2, True)]["image"], ds[(2, False)]["image"].flip(-1))
    assert torch.equal(ds.without_augmentation()[(2, True)]["image"], ds[(2, False)]["image"])


def test_datamodule_state_resumes_the_stream():
    dm = AgingDataModule(train=SyntheticFaces(n=6, size=32), batch_size=2, seed=4)
    full = [b["index"].tolist() for b in itertools.islice(dm.train_dataloader(), 5)]
    resumed = AgingDataModule(train=SyntheticFaces(n=6, size=32), batch_size=2, seed=4)
    resumed.load_state_dict({"position": 4, "batch_size": 2})
    assert [b["index"].tolist() for b in itertools.islice(resumed.train_dataloader(), 3)] == full[2:]
    with pytest.raises(ValueError, match="batch_size=3"):
        resumed.load_state_dict({"position": 4, "batch_size": 3})


def test_datamodule_drives_a_lightning_fit():
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin, self.train_idx, self.val_idx = torch.nn.Linear(3, 1), [], []

        def training_step(self, batch, _):
            self.train_idx += batch["index"].tolist()
            return self.lin(batch["image"].mean((2, 3))).mean()

        def validation_step(self, batch, _):
            self.val_idx += batch["index"].tolist()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    probe = Probe()
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=3,
        check_val_every_n_epoch=None,
    )
    dm = AgingDataModule(train=SyntheticFaces(n=6, size=32), val=SyntheticFaces(n=3, size=32), batch_size=2)
    trainer.fit(probe, datamodule=dm)
    assert sorted(probe.train_idx) == list(range(6)) and probe.val_idx == [0, 1, 2]

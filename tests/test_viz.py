"""Image helpers (agingnet.viz) and the TensorBoard ImageLogger callback."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from agingnet.callbacks.images import ImageLogger, grid_from_images
from agingnet.viz import (
    BAND_COLOUR,
    age_strip,
    band_height,
    from_uint8,
    labelled_grid,
    pil_to_tensor,
    resize,
    save_gif,
    save_image,
    save_text,
    to_pil,
    to_uint8,
)


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_to_uint8_hand_values_and_layout():
    x = torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0, -3.0]).view(1, 2, 3).expand(3, 2, 3)
    out = to_uint8(x)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    # (x+1)·127.5: 0, 127.5→128 (half to even), 191.25→191, 255, clamp 382.5→255, clamp −255→0
    assert out[..., 0].tolist() == [[0, 128, 191], [255, 255, 0]]
    assert to_uint8(_rand(4, 3, 5, 6)).shape == (4, 5, 6, 3)
    with pytest.raises(ValueError, match="to_uint8 expects"):
        to_uint8(torch.zeros(2, 4, 4))


def test_pil_round_trip_within_one_level():
    x = _rand(3, 16, 16)
    back = pil_to_tensor(to_pil(x))
    assert back.shape == (3, 16, 16)
    assert (back - x).abs().max() <= 0.5 / 127.5 + 1e-6
    with pytest.raises(ValueError, match="one image"):
        to_pil(_rand(2, 3, 4, 4))


def test_from_uint8_hand_values_layout_and_errors():
    """v/127.5 − 1 written out: 0 → −1, 51 → −0.6, 255 → 1; [N,H,W,3] → [N,3,H,W]; numpy (read-only too) or tensor."""
    v = np.zeros((2, 1, 3, 3), dtype=np.uint8)
    v[0, 0, :, 0] = [0, 51, 255]
    v[1, 0, 2, 2] = 102
    x = from_uint8(v)
    assert x.shape == (2, 3, 1, 3) and x.dtype == torch.float32
    assert torch.allclose(x[0, 0, 0], torch.tensor([-1.0, -0.6, 1.0]), atol=1e-6)
    assert x[1, 2, 0, 2].item() == pytest.approx(102 / 127.5 - 1)
    assert x[1, 1].eq(-1).all()
    ro = v.copy()
    ro.flags.writeable = False  # np.asarray(PIL image) is read-only
    assert torch.equal(from_uint8(ro), x) and torch.equal(from_uint8(torch.from_numpy(v)), x)
    assert (to_uint8(x) == v).all()  # the inverse of to_uint8
    with pytest.raises(ValueError, match=r"expects \[\.\.\.,H,W,3\] uint8, got \(2, 1, 3, 3\) torch.float32"):
        from_uint8(v.astype(np.float32))
    with pytest.raises(ValueError, match="from_uint8 expects"):
        from_uint8(v[..., :2])


def test_resize_area_and_bicubic():
    x = _rand(2, 3, 64, 64)
    assert torch.allclose(resize(x, 16), F.avg_pool2d(x, 4), atol=1e-6)  # block means, by another op
    up = resize(x, 80)
    assert up.shape == (2, 3, 80, 80) and up.min() >= -1 and up.max() <= 1
    assert resize(x, 64) is x


def test_labelled_grid_layout_pixels_and_labels():
    a, b = _rand(3, 3, 32, 32, seed=1), _rand(3, 3, 64, 64, seed=2)
    band = band_height(32)
    g = labelled_grid([(a, ["in 30y", "in 31y", "in 32y"]), (b, ["", "to 40y", "to 50y"])], tile=32)
    assert g.size == (2 * 32, 3 * (band + 32))
    arr = np.asarray(g)
    for i in range(3):
        y0 = i * (band + 32) + band
        assert np.array_equal(arr[y0 : y0 + 32, :32], to_uint8(a[i]))  # first column: unchanged pixels
        expect = to_uint8(F.avg_pool2d(b[i : i + 1], 2)[0])  # second column: 2×2 block means
        assert np.abs(arr[y0 : y0 + 32, 32:].astype(int) - expect.astype(int)).max() <= 1
    # labelled bands carry light text pixels; the empty label leaves its band the plain band colour
    assert arr[:band, :32].max() > 150
    assert (arr[:band, 32:] == np.array(BAND_COLOUR, dtype=np.uint8)).all()
    assert arr[band + 32 : 2 * band + 32, 32:].max() > 150


def test_labelled_grid_errors():
    with pytest.raises(ValueError, match="at least one column"):
        labelled_grid([])
    with pytest.raises(ValueError, match="column 1: 1 images and 2 labels"):
        labelled_grid([(_rand(2, 3, 8, 8), ["a", "b"]), (_rand(1, 3, 8, 8), ["a", "b"])])
    with pytest.raises(ValueError, match=r"column 0: expected \[B,3,H,W\]"):
        labelled_grid([(_rand(2, 8, 8), ["a", "b"])])


def test_age_strip_width_and_order():
    x = _rand(3, 40, 40)
    outs = {40: _rand(3, 40, 40, seed=4), 20: _rand(1, 3, 40, 40, seed=3), 30: _rand(3, 40, 40, seed=5)}
    s = age_strip(x, outs, "input (33y)", tile=20)
    band = band_height(20)
    assert s.size == ((1 + 3) * 20, band + 20)
    arr = np.asarray(s)
    for j, age in enumerate([20, 30, 40], start=1):  # ascending ages after the input
        expect = to_uint8(F.avg_pool2d(outs[age].view(1, 3, 40, 40), 2)[0])
        assert np.abs(arr[band:, j * 20 : (j + 1) * 20].astype(int) - expect.astype(int)).max() <= 1
    with pytest.raises(ValueError, match="output for age 20"):
        age_strip(x, {20: _rand(2, 3, 8, 8)})


def test_atomic_saves(tmp_path: Path):
    p = save_image(_rand(3, 8, 8), tmp_path / "sub" / "a.png")
    assert Image.open(p).size == (8, 8)
    save_image(Image.new("RGB", (5, 7)), p)  # replaced in place
    assert Image.open(p).size == (5, 7)
    with pytest.raises(ValueError, match="unknown image suffix"):
        save_image(Image.new("RGB", (4, 4)), tmp_path / "sub" / "a.nope")
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames.append(Image.new("L", (20, 20)))  # converted and resized to the first frame
    g = save_gif(frames, tmp_path / "sub" / "x.gif", duration_ms=100)
    with Image.open(g) as im:
        assert im.n_frames == 4 and im.size == (10, 10)
    t = save_text("a,b\n", tmp_path / "sub" / "t.csv")
    assert t.read_text() == "a,b\n"
    assert not [q for q in (tmp_path / "sub").iterdir() if q.name.endswith(".tmp")]  # no temp files left


def _images(b=3, size=16, cycle=True):
    d = {"input": _rand(b, 3, size, size, seed=1), "output": _rand(b, 3, size, size, seed=2),
         "target_age": torch.tensor([20.0, 40.0, 60.0])[:b],
         "input_age": torch.tensor([31.0, 32.0, 33.0])[:b]}
    if cycle:
        d["cycle"] = _rand(b, 3, size, size, seed=3)
    return d


def test_grid_from_images_columns_and_rows():
    g = grid_from_images(_images(), max_images=2)
    assert g.size == (3 * 16, 2 * (band_height(16) + 16))
    pred = torch.tensor([19.0, 41.0, 58.0])
    g = grid_from_images({**_images(cycle=False), "output_age": pred}, max_images=4)
    assert g.size == (2 * 16, 3 * (band_height(16) + 16))
    with pytest.raises(KeyError, match="lacks 'output'"):
        grid_from_images({"input": _rand(1, 3, 8, 8)})
    with pytest.raises(ValueError, match="every_n_steps"):
        ImageLogger(every_n_steps=0)


def test_image_logger_without_logger_writes_png(tmp_path: Path):
    cb = ImageLogger(every_n_steps=2, max_images=2)
    trainer = SimpleNamespace(global_step=2, is_global_zero=True, loggers=[], default_root_dir=str(tmp_path),
                              sanity_checking=False)
    module = SimpleNamespace(_last_images=_images(), abs_step=1002, _last_val_images=_images(cycle=False))
    cb.on_train_batch_end(trainer, module, None, None, 0)
    cb.on_train_batch_end(trainer, module, None, None, 1)  # same step: not twice
    trainer.global_step = 3
    cb.on_train_batch_end(trainer, module, None, None, 2)  # not a multiple of 2
    cb.on_validation_epoch_end(trainer, module)
    names = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert names == ["train_step0001002.png", "val_step0001002.png"]
    size = Image.open(tmp_path / "images" / "train_step0001002.png").size
    assert size == (3 * 16, 2 * (band_height(16) + 16))


class _Boring(L.LightningModule):
    """Minimal module exposing the image dicts the AgingModule leaves behind."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        self._last_images = _images()
        return (self.w - batch[0].mean()) ** 2

    def validation_step(self, batch, batch_idx):
        self._last_val_images = {**_images(cycle=False), "output_age": torch.tensor([21.0, 39.0, 61.0])}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=1)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(1, 2)), batch_size=1)


def test_image_logger_in_a_trainer_with_tensorboard(tmp_path: Path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardLogger(save_dir=str(tmp_path / "tb"), name=None, version="")
    trainer = L.Trainer(default_root_dir=str(tmp_path), max_steps=4, logger=tb, accelerator="cpu",
                        callbacks=[ImageLogger(every_n_steps=2, max_images=3)], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1,
                        log_every_n_steps=1)
    trainer.fit(_Boring())
    names = sorted(p.name for p in (tmp_path / "images").iterdir())
    # every 2 steps, and after the end-of-epoch validation; none for the sanity check
    assert names == ["train_step0000002.png", "train_step0000004.png", "val_step0000004.png"]
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert set(acc.Tags()["images"]) == {"train/images", "val/images"}
    assert [e.step for e in acc.Images("train/images")] == [2, 4]
    img = acc.Images("val/images")[0]
    assert (img.width, img.height) == (2 * 16, 3 * (band_height(16) + 16))

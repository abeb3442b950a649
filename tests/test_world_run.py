"""The aging world inside the project's commands: a training run on a world actor (its folders and the world
impostor bank written when missing, the bank through the real bank CLI), the bank CLI's ``world`` networks, and
``debug=tiny`` reading ages with the world DEX."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from reference import blur_fit_reference, gauss_blur_reference

from agingnet.bank import main as bank_main
from agingnet.config import compose_config
from agingnet.miner import ImpostorBank
from agingnet.train import train
from agingnet.world import run_setup as world_setup
from agingnet.world.data import write_population

FAST = ["trainer.max_steps=1", "val_max_batches=0", "image_interval=100", "world.bank_population=12",
        "logger=none", "callbacks.lr_monitor=null"]


def test_a_run_on_a_world_actor_writes_its_folders_and_bank_once(tmp_path):
    data = tmp_path / "data"
    cfg = compose_config(["experiment=demo", f"paths.data_dir={data}", *FAST], output_dir=tmp_path / "r1")
    train(cfg)
    actor = data / "world" / "actor_100000_seed0"
    meta = json.loads((actor / "world.json").read_text())
    assert meta["identity"] == 100_000 and len(meta["train"]) == 24 and len(meta["test"]) == 8
    used = (tmp_path / "r1" / "config.yaml").read_text()
    assert f"root: {actor / 'train'}" in used and f"root: {actor / 'test'}" in used
    bank_path = data / "world" / "bank_12_seed0.pt"
    bank = ImpostorBank.load(bank_path)
    # every population photo (searched recursively) but those the world DEX reads outside the bank's 18–80 years
    assert len(bank) + bank.meta["n_out_of_range"] == 12 and len(bank) >= 9 and bank.dim == 64
    assert bank.meta["source"] == str(data / "world" / "bank_12_seed0_population")
    stamps = [p.stat().st_mtime_ns for p in (actor / "world.json", bank_path)]
    again = compose_config(["experiment=demo", f"paths.data_dir={data}", *FAST], output_dir=tmp_path / "r2")
    assert world_setup.prepare_actor(again) == actor and world_setup.prepare_bank(again) == bank_path
    assert [p.stat().st_mtime_ns for p in (actor / "world.json", bank_path)] == stamps  # reused, not rewritten


@pytest.mark.parametrize("override, message", [
    ("world.actor=5", "world.actor=5: actors are identities >= 100000"),
    ("world.actor=-3", "world identity must be a non-negative integer, got -3"),
    ("world.bank_population=1", "world.bank_population must be an integer >= 2, got 1"),
])
def test_bad_world_keys_are_refused_before_anything_is_written(tmp_path, override, message):
    cfg = compose_config(["experiment=demo", f"paths.data_dir={tmp_path / 'data'}", *FAST, override],
                         output_dir=tmp_path / "run")
    with pytest.raises((ValueError, TypeError), match=message):
        train(cfg)
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_an_actor_folder_of_another_identity_is_refused_naming_its_file(tmp_path):
    from agingnet.world.data import write_actor

    other = write_actor(100_001, tmp_path / "data" / "world" / "actor_100000_seed0", n_train=2, n_test=2)
    cfg = compose_config(["experiment=demo", f"paths.data_dir={tmp_path / 'data'}", *FAST],
                         output_dir=tmp_path / "run")
    with pytest.raises(ValueError, match=f"{other / 'world.json'}: holds actor 100001, but world.actor=100000"):
        train(cfg)


def test_bank_cli_world_networks_read_the_population_ages(tmp_path):
    """``--arcface world --dex world``: the bank's ages are the world DEX's readings of the population photos,
    which must match the ages the population was rendered at (world DEX held-out MAE 2.2 years)."""
    pop = write_population(40, tmp_path / "pop", seed=4, min_age=20, max_age=70)
    out = tmp_path / "bank.pt"
    assert bank_main(["build", "--images", str(pop), "--arcface", "world", "--dex", "world", "--out", str(out),
                      "--quiet"]) == 0
    bank = ImpostorBank.load(out)
    truth = []
    for split in ("train", "test"):
        truth += list(json.loads((pop / f"{split}_ages.json").read_text()).values())
    assert len(bank) == len(truth) == 40 and bank.dim == 64
    # the bank keeps each member's DEX age; compare the sorted lists (members are stored by age bin)
    got = torch.sort(bank.ages.float()).values
    want = torch.sort(torch.tensor(truth, dtype=torch.float32)).values
    assert (got - want).abs().mean() <= 3.0, (got, want)


def test_a_world_bank_embedded_by_other_networks_is_rebuilt(tmp_path, caplog):
    """A bank records the sha256 of the networks that embedded it; after the world networks change (``pretrain``),
    or for a bank from before it recorded them, the run builds it again instead of mining in a stale space."""
    import hashlib

    from agingnet.world import weights as world_weights

    shipped = {k: hashlib.sha256(world_weights.weight_path(k).read_bytes()).hexdigest() for k in ("arcface", "dex")}
    cfg = compose_config(["experiment=demo", f"paths.data_dir={tmp_path / 'data'}", *FAST], output_dir=tmp_path / "r")
    path = world_setup.prepare_bank(cfg)
    assert torch.load(path, weights_only=True)["meta"]["nets_sha256"] == shipped
    for stale in ({"arcface": "0" * 64, "dex": shipped["dex"]}, None):  # another identity network; no record
        obj = torch.load(path, weights_only=True)
        obj["meta"]["nets_sha256"] = stale
        if stale is None:
            del obj["meta"]["nets_sha256"]
        torch.save(obj, path)
        with caplog.at_level("WARNING"):
            assert world_setup.prepare_bank(cfg) == path
        assert torch.load(path, weights_only=True)["meta"]["nets_sha256"] == shipped
        assert "embedded by other world networks" in caplog.text
        caplog.clear()


def test_bank_cli_missing_world_weights_name_the_rebuild_command(tmp_path, monkeypatch, capsys):
    from agingnet.world import weights as world_weights

    monkeypatch.setattr(world_weights, "WEIGHTS_DIR", tmp_path / "nowhere")
    pop = write_population(4, tmp_path / "pop")
    assert bank_main(["build", "--images", str(pop), "--arcface", "world", "--dex", "world",
                      "--out", str(tmp_path / "b.pt"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing world weights" in err[0] and "python -m agingnet.world pretrain" in err[0]
    assert not (tmp_path / "b.pt").exists()


class _Grab(Callback):
    """The first training batch, the images its step produced and the logged train/ values."""

    def __init__(self):
        self.seen: dict = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.seen:
            self.seen.update(batch=batch, images=dict(pl_module._last_images),
                             logged={k: float(v) for k, v in trainer.callback_metrics.items()
                                     if k.startswith("train/") and v.numel() == 1})


GT = ["experiment=tiny_synthetic", "callbacks=none", "logger=none", "trainer.max_steps=1", "val_max_batches=0",
      "loss.gt.weight=1.0", "loss.nn_id=null", "loss.contrastive_id=null"]


def test_ground_truth_term_is_the_mse_to_the_rendered_truth_in_a_real_fit(tmp_path):
    """train/real/gt = mean (ŷ − T)², T written out here: the world identity of each sample rendered at the drawn
    target age (canonical portrait), mirrored when the sample was flipped."""
    import numpy as np

    from agingnet.world import render

    grab = _Grab()
    train(compose_config(GT, output_dir=tmp_path / "run"), extra_callbacks=[grab])
    batch, images, logged = grab.seen["batch"], grab.seen["images"], grab.seen["logged"]
    truth = []
    for ident, age, flipped in zip(batch["world_identity"].tolist(), images["target_age"].tolist(),
                                   batch["flipped"].tolist()):
        img = render(ident, age, size=256).astype(np.float32) / 127.5 - 1
        truth.append(torch.from_numpy(np.ascontiguousarray(img[:, ::-1] if flipped else img)).permute(2, 0, 1))
    want = ((images["output"] - torch.stack(truth)) ** 2).mean()
    assert logged["train/real/gt"] == pytest.approx(float(want), rel=1e-5)
    assert "train/cycle/gt" in logged  # the cycle pass is scored against the truth at the input age


def test_ground_truth_term_refuses_data_without_world_identities(tmp_path):
    from agingnet.world.data import write_actor

    actor = write_actor(100_002, tmp_path / "actor", n_train=4, n_test=2)
    cfg = compose_config([*GT, "data=personal", f"data.train.root={actor / 'train'}",
                          f"data.val.root={actor / 'test'}", "data.num_workers=0"], output_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="loss.gt: the batch has no world_identity"):
        train(cfg)


def test_batch_truth_renders_each_sample_and_mirrors_the_flipped_ones():
    import numpy as np

    from agingnet.world import render
    from agingnet.world.truth import batch_truth

    got = batch_truth(torch.tensor([5, 7]), torch.tensor([True, False]), torch.tensor([30.0, 61.5]), 64)
    want = np.stack([render(5, 30.0, size=64)[:, ::-1], render(7, 61.5, size=64)]).astype(np.float32) / 127.5 - 1
    assert got.shape == (2, 3, 64, 64)
    assert torch.equal(got, torch.from_numpy(want).permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match=r"batch_truth: identities, flipped and ages must all be \[B\]"):
        batch_truth(torch.tensor([5, 7]), torch.tensor([True]), torch.tensor([30.0, 61.5]), 64)


def test_blur_fit_finds_the_blur_of_the_truth_an_output_carries():
    from agingnet.world.truth import BLUR_GRID, batch_truth, blur_fit, blur_stack

    truth = batch_truth(torch.tensor([5, 9]), torch.tensor([False, False]), torch.tensor([35.0, 70.0]), 64)
    stack = blur_stack(truth)
    assert stack.shape == (len(BLUR_GRID), 2, 3, 64, 64) and torch.equal(stack[0], truth)
    y = torch.stack([gauss_blur_reference(truth[0], 6.0), truth[1].double()]).float()
    assert blur_fit(y, stack).tolist() == [6.0, 0.0]
    assert blur_fit(gauss_blur_reference(truth[1], 1.0)[None].float(), stack[:, 1:]).tolist() == [1.0]
    torch.manual_seed(0)
    noisy = y + 0.2 * torch.randn_like(y)  # grain the blur cannot explain moves nothing far
    assert blur_fit(noisy, stack).tolist() == blur_fit_reference(noisy, truth, BLUR_GRID)
    between = torch.stack([gauss_blur_reference(truth[0], 5.0), gauss_blur_reference(truth[1], 20.0)]).float()
    assert blur_fit(between, stack).tolist() == blur_fit_reference(between, truth, BLUR_GRID)
    assert blur_fit(between, stack).tolist() in ([4.0, 16.0], [4.0, 24.0], [6.0, 16.0], [6.0, 24.0])
    assert blur_fit(y[:1].expand(3, -1, -1, -1), stack[:, :1]).tolist() == [6.0] * 3  # one truth for all
    with pytest.raises(ValueError, match=r"blur_fit: y must be \[N,3,S,S\] and the blurred truths"):
        blur_fit(y, stack[:, :, :, :32])
    with pytest.raises(ValueError, match=r"blur_stack: grid must be non-empty sigmas >= 0"):
        blur_stack(truth, grid=(1.0, -2.0))
    with pytest.raises(ValueError, match=r"blur_stack: truth must be \[N,3,S,S\]"):
        blur_stack(truth[0])

"""The aging world: renderer determinism and ground truth, actor/population folders, CLI errors, world networks.

Measurements here are independent of the renderer's code: grey hair is counted as low-saturation bright pixels
in a fixed hair window, wrinkles as vertical-gradient energy on the forehead, identity as pixel distance.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agingnet import world
from agingnet.data import FFHQFolderDataset, PersonalFolderDataset
from agingnet.world import weights as world_weights
from agingnet.world.__main__ import main as world_main
from agingnet.world.data import read_world_json, write_actor

ROOT = Path(__file__).resolve().parents[1]
ACTOR = 100_003


def _grey_fraction(img: np.ndarray) -> float:
    """Low-saturation bright pixels in the hair above the face (rows .12–.19, columns .42–.58 of the image)."""
    S = img.shape[0]
    band = img[int(0.12 * S): int(0.19 * S), int(0.42 * S): int(0.58 * S)].astype(int)
    return float(((band.max(-1) - band.min(-1) < 25) & (band.mean(-1) > 150)).mean())


def _forehead_energy(img: np.ndarray) -> float:
    """Mean |vertical gradient| of the grey levels on the forehead (rows .29–.39, columns .40–.60)."""
    S = img.shape[0]
    f = img[int(0.29 * S): int(0.39 * S), int(0.40 * S): int(0.60 * S)].astype(float).mean(-1)
    return float(np.abs(np.diff(f, axis=0)).mean())


# ---------------------------------------------------------------------------------------------- renderer


def test_render_shape_dtype_and_determinism_across_calls_and_processes():
    a = world.render(ACTOR, 40, photo=(1, 2))
    assert a.shape == (256, 256, 3) and a.dtype == np.uint8
    assert np.array_equal(a, world.render(ACTOR, 40, photo=(1, 2)))
    code = ("import hashlib; from agingnet.world import render; "
            f"print(hashlib.sha256(render({ACTOR}, 40, photo=(1, 2)).tobytes()).hexdigest())")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == hashlib.sha256(a.tobytes()).hexdigest()
    assert world.render(ACTOR, 40, size=64).shape == (64, 64, 3)


def _face_centre(img: np.ndarray) -> np.ndarray:
    """Face centre (rows .28–.81, columns .28–.72) average-pooled to a 32×32 grid: insensitive to a small shift."""
    S = img.shape[0]
    k = S // 32
    pooled = img.astype(float).reshape(32, k, 32, k, 3).mean((1, 3))
    return pooled[int(0.28 * 32): int(0.81 * 32), int(0.28 * 32): int(0.72 * 32)]


def test_the_person_does_not_depend_on_the_photo_seed():
    """Photos from different seeds are near the canonical portrait of their identity, far from anyone else's."""
    truth = _face_centre(world.render(ACTOR, 40, size=128))
    others = [_face_centre(world.render(ACTOR + k, 40, size=128)) for k in range(1, 6)]
    for seed in (1, 2, 3):
        photo = _face_centre(world.render(ACTOR, 40, size=128, photo=(seed, 0)))
        own = np.abs(photo - truth).mean()
        assert all(own < 0.6 * np.abs(photo - o).mean() for o in others), own
    assert not np.array_equal(world.render(ACTOR, 40, photo=(1, 0)), world.render(ACTOR, 40, photo=(2, 0)))
    t1, t2 = world.identity_traits(ACTOR), world.identity_traits(ACTOR)
    assert t1.grey_onset == t2.grey_onset and np.array_equal(t1.skin, t2.skin)


@pytest.mark.parametrize("identity", [3, 17, ACTOR])
def test_aging_cues_rise_with_age(identity):
    ages = list(range(18, 86, 6))
    imgs = [world.render(identity, a, size=128) for a in ages]
    grey = np.array([_grey_fraction(im) for im in imgs])
    assert grey[0] == 0.0 and grey[-1] > 0.6
    assert np.all(np.diff(grey) >= 0), grey  # canonical portraits: greying never reverses
    fore = np.array([_forehead_energy(im) for im in imgs])
    assert fore[ages.index(66)] > 2 * fore[ages.index(24)]


def test_two_people_of_the_same_age_look_and_age_differently():
    a, b = world.render(ACTOR, 40, size=128), world.render(ACTOR + 1, 40, size=128)
    assert np.abs(a.astype(float) - b.astype(float)).mean() > 8
    # personal graying: at 45 some of the population is still dark-haired while others are well grey
    grey45 = np.array([_grey_fraction(world.render(i, 45, size=64)) for i in range(40)])
    assert grey45.min() < 0.05 and grey45.max() > 0.25


def test_render_bad_input_is_one_clear_error():
    with pytest.raises(TypeError, match="world identity must be a non-negative integer, got str '7'"):
        world.render("7", 40)
    with pytest.raises(TypeError, match="got float"):
        world.render(7.0, 40)
    with pytest.raises(ValueError, match="non-negative integer, got -1"):
        world.render(-1, 40)
    with pytest.raises(ValueError, match=r"world age must be .* \[0, 100\], got 140"):
        world.render(1, 140)
    with pytest.raises(TypeError, match="photo must be an int or a tuple of ints"):
        world.render(1, 40, photo="a")


# ---------------------------------------------------------------------------------------------- folders + CLI


def test_cli_actor_writes_the_personal_layout(tmp_path, capsys):
    out = tmp_path / "actor"
    rc = world_main(["actor", "--identity", str(ACTOR), "--seed", "3", "--ages", "20", "40", "--test-ages", "30",
                     "--size", "64", "--out", str(out)])
    assert rc == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "test/30_2.png", "train/20_0.png", "train/40_1.png", "world.json"]
    meta = json.loads((out / "world.json").read_text())
    assert meta["identity"] == ACTOR and meta["seed"] == 3 and meta["renderer_version"] == world.RENDERER_VERSION
    assert np.array_equal(np.asarray(Image.open(out / "train/40_1.png")), world.render(ACTOR, 40, 64, photo=(3, 1)))
    ds = PersonalFolderDataset(out / "train", size=64, train=False)
    assert ds.ages == [20.0, 40.0]
    assert read_world_json(out / "test")["identity"] == ACTOR


def test_cli_population_is_the_ffhq_layout(tmp_path):
    out = tmp_path / "pop"
    assert world_main(["population", "--n", "6", "--size", "64", "--out", str(out)]) == 0
    train = FFHQFolderDataset(out / "train", size=64, ages_file=out / "train_ages.json")
    test = FFHQFolderDataset(out / "test", size=64, ages_file=out / "test_ages.json")
    assert len(train) + len(test) == 6 and not any(np.isnan(train.ages + test.ages))
    ids = json.loads((out / "world.json").read_text())["identities"]
    train_ids = {v for k, v in ids.items() if k.startswith("train/")}
    test_ids = {v for k, v in ids.items() if k.startswith("test/")}
    assert max(ids.values()) < world.ACTOR_BASE and not train_ids & test_ids


@pytest.mark.parametrize(
    "args, message",
    [
        (["--identity", "abc"], "--identity: world identity must be a non-negative integer, got 'abc'"),
        (["--identity", "-5"], "world identity must be a non-negative integer, got -5"),
        (["--identity", "12"], "identity 12 belongs to the training population"),
        (["--identity", str(ACTOR), "--ages", "20", "130"], "--ages: ages must be integers in [0, 100], got 130"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "actor"
    assert world_main(["actor", *args, "--size", "32", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_is_kept_and_a_failed_write_leaves_nothing(tmp_path, capsys, monkeypatch):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "mine.txt").write_text("precious")
    assert world_main(["actor", "--identity", str(ACTOR), "--out", str(keep)]) == 1
    assert "already exists" in capsys.readouterr().err and (keep / "mine.txt").read_text() == "precious"

    calls = {"n": 0}
    real = world.data.render

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return real(*a, **k)

    monkeypatch.setattr(world.data, "render", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_actor(ACTOR, tmp_path / "half", ages=[20, 30, 40], size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]  # no DIR, no .partial staging folder


def test_world_json_from_another_renderer_version_is_refused(tmp_path):
    out = write_actor(ACTOR, tmp_path / "a", ages=[30], test_ages=[40], size=32)
    meta = json.loads((out / "world.json").read_text())
    (out / "world.json").write_text(json.dumps({**meta, "renderer_version": world.RENDERER_VERSION + 1}))
    with pytest.raises(ValueError, match=rf"world.json: renderer version {world.RENDERER_VERSION + 1} does not "
                                         rf"match .* re-render"):
        read_world_json(out)
    (out / "world.json").write_text(json.dumps(meta))
    (out / "train" / "30_0.png").unlink()
    with pytest.raises(ValueError, match="lists train/30_0.png"):
        read_world_json(out)
    with pytest.raises(FileNotFoundError, match="world.json: no such file"):
        read_world_json(tmp_path)


def test_missing_world_weights_name_the_file_and_the_rebuild_command(tmp_path, monkeypatch):
    monkeypatch.setattr(world_weights, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"dex.pth: missing world weights; rebuild them with "
                                                r"'python -m agingnet.world pretrain'"):
        world_weights.weight_path("dex")
    with pytest.raises(ValueError, match="unknown world network 'vgg'"):
        world_weights.weight_path("vgg")


# ---------------------------------------------------------------------------------------------- world networks


def test_world_networks_ship_with_a_manifest_that_matches():
    man = world_weights.manifest()
    total = 0
    for name in world_weights.FILES.values():
        path = world_weights.WEIGHTS_DIR / name
        entry = man["files"][name]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        assert entry["git_commit"] and entry["command"].startswith("python -m agingnet.world pretrain")
        total += path.stat().st_size
    assert total <= 20 * 2**20
    assert man["renderer_version"] == world.RENDERER_VERSION


def _faces(pairs: list[tuple[int, int]], photo_seed: int = 7) -> torch.Tensor:
    imgs = np.stack([world.render(i, a, photo=(photo_seed, k)) for k, (i, a) in enumerate(pairs)])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def test_shipped_dex_reads_the_age_of_unseen_people():
    """Held-out identities (never in pretraining), known ages: the real DEX loader, the model's input path."""
    from agingnet.losses.base import FrozenNets

    nets = FrozenNets(dex=world_weights.load_world_dex())
    ages = [20, 30, 40, 50, 60, 70]
    pairs = [(98_000 + k, a) for k in range(3) for a in ages]
    with torch.no_grad():
        pred = nets.predict_age(_faces(pairs))
    truth = torch.tensor([a for _, a in pairs], dtype=torch.float32)
    err = (pred - truth).abs()
    assert err.mean() <= 3.0 and err.max() <= 8.0, (pred, truth)  # the goal: MAE ≤ 3 years
    assert torch.corrcoef(torch.stack([pred, truth]))[0, 1] > 0.95


def test_shipped_identity_net_separates_people_across_decades():
    """Same person 25 vs 55 years old is closer than two people; threshold from the manifest."""
    from agingnet.losses.base import FrozenNets

    nets = FrozenNets(arcface=world_weights.load_world_arcface())
    n = 8
    young = _faces([(97_000 + k, 25) for k in range(n)], photo_seed=1)
    old = _faces([(97_000 + k, 55) for k in range(n)], photo_seed=2)
    with torch.no_grad():
        cos = nets.embed_face(young) @ nets.embed_face(old).T
    same, diff = cos.diagonal(), cos[~torch.eye(n, dtype=torch.bool)]
    thr = world_weights.manifest()["files"]["arcface.pth"]["metrics"]["threshold"]
    acc = ((same >= thr).float().sum() + (diff < thr).float().sum()) / (len(same) + len(diff))
    assert same.mean() > diff.mean() + 0.3 and acc >= 0.85, (same, diff.max())


def test_pretrain_writes_loadable_networks_through_a_real_fit(tmp_path):
    from agingnet.pretrained import load_arcface, load_dex
    from agingnet.world import pretrain as pt

    plan = pt.Plan(n_ids=6, photos=2, n_eval_ids=4, eval_photos=2, dex_epochs=1, id_epochs=1, batch_size=4)
    man = pt.pretrain(plan, out=tmp_path, command="test", nets=("dex", "arcface"))
    dex, arc = load_dex(tmp_path / "dex.pth"), load_arcface(tmp_path / "arcface.pth")
    assert dex.input_size == pt.DEX_ARCH["input_size"] and arc.input_size == 112
    assert man["files"]["dex.pth"]["sha256"] == hashlib.sha256((tmp_path / "dex.pth").read_bytes()).hexdigest()
    assert set(man["files"]["arcface.pth"]["metrics"]) >= {"heldout_verification", "threshold"}
    for name in ("dex.pth", "arcface.pth"):  # trained channels-last, shipped in the standard (contiguous) layout
        sd = torch.load(tmp_path / name, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd)  # DEX's published file nests it
        convs = [k for k, v in sd.items() if v.ndim == 4 and v.shape[-1] > 1]
        assert convs and all(sd[k].is_contiguous() for k in convs), name


def test_run_provenance_names_the_start_file_and_distrusts_one_changed_since(tmp_path):
    import yaml

    from agingnet.world import pretrain as pt

    start = tmp_path / "sam.pt"
    start.write_bytes(b"stage one")
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["experiment=world_global_age", "hydra.run.dir=X"]))
    (run / "config.yaml").write_text(yaml.safe_dump({"init_from": str(start)}))
    os.utime(start, (1_000_000, 1_000_000))  # written before the run started
    prov = pt._run_provenance(run)
    assert prov == {"run_command": "python -m agingnet.train experiment=world_global_age",
                    "run_init_from": {"file": "sam.pt", "sha256": hashlib.sha256(b"stage one").hexdigest()}}
    start.write_bytes(b"stage two")  # replaced after the run started (shipping the run itself does this)
    assert pt._run_provenance(run)["run_init_from"] == {"file": "sam.pt", "sha256": None,
                                                       "changed_since_run_start": True}


@pytest.mark.slow
def test_pretrain_quick_improves_both_networks(tmp_path):
    """``pretrain --quick`` (≤ 3 min on 2 cores): held-out age MAE falls, verification rises and the global aging
    model's ground-truth error on held-out actors falls after its two runs; its file loads through the real
    loader."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "agingnet.world", "pretrain", "--quick", "--out", str(tmp_path)],
                   env=env, check=True, capture_output=True, timeout=600)
    m = json.loads((tmp_path / "manifest.json").read_text())["files"]
    assert m["dex.pth"]["metrics"]["heldout_mae"] < m["dex.pth"]["metrics"]["heldout_mae_before"] - 2
    assert m["arcface.pth"]["metrics"]["heldout_verification"] > m["arcface.pth"]["metrics"][
        "heldout_verification_before"]
    sam = m["sam.pt"]["metrics"]
    assert sam["gt_l2"] < sam["before"]["gt_l2"]
    assert set(sam["run_wall_s"]) == {"world_global", "world_global_age"}  # both stages ran
    from agingnet.pretrained import load_aging_model

    assert load_aging_model(tmp_path / "sam.pt").decoder.size == 256
    assert not (tmp_path / ".world_global_run").exists()  # the run's scratch folder is removed

"""ForkExportCallback: fork-layout files, EMA as primary, atomic writes (simulated crash), the latest link."""

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import ListConfig

from agingnet.callbacks.ema import EMACallback
from agingnet.callbacks.fork_export import ForkExportCallback, atomic_symlink
from agingnet.models import build_aging_net
from agingnet.pretrained import load_aging_model


@pytest.fixture()
def setup(tmp_path):
    net = build_aging_net(size=32, style_dim=16, n_mlp=1, channels={4: 16, 8: 16, 16: 8, 32: 8},
                          encoder_widths=(16, 32, 48, 16), encoder_units=(1, 1, 1, 1))
    pl = SimpleNamespace(net=net, abs_step=50500, using_ema=False, last_step_skipped=False, stage="p3",
                         sampler=SimpleNamespace(fixed_age=40, jitter=2),
                         hparams={"init_from": "/base.pt", "optimizer": {"lr": 1.5e-5}, "cycle_weight": 1.5})
    ema = EMACallback(decay=0.5)
    tr = SimpleNamespace(global_step=0, callback_metrics={}, callbacks=[ema], optimizers=[], max_steps=10,
                         is_global_zero=True, sanity_checking=False)
    ema.on_fit_start(tr, pl)
    with torch.no_grad():  # one training step: raw weights move, the shadow moves halfway
        for p in net.decoder.parameters():
            p.add_(1.0)
    tr.global_step = 1
    ema.on_train_batch_end(tr, pl, {"loss": torch.tensor(0.0)}, None, 0)
    cb = ForkExportCallback(str(tmp_path / "run" / "checkpoints"), every_n_steps=2,
                            latest_link=str(tmp_path / "_latest_phase3"))
    tr.callbacks.append(cb)
    cb.setup(tr, pl, "fit")
    cb.on_fit_start(tr, pl)
    return pl, tr, ema, cb, tmp_path / "run" / "checkpoints"


def _dec_equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and set(a) == set(b)


def test_best_files_layout_and_ema(setup):
    pl, tr, ema, cb, ck = setup
    tr.callback_metrics = {"val/total": torch.tensor(0.5)}
    ema.on_validation_start(tr, pl)  # validation ran with the EMA swapped in
    cb.on_validation_end(tr, pl)     # runs before the EMA's own restore: must still export raw weights
    raw = {k: v.clone() for k, v in pl.net.decoder.state_dict().items()}
    shadow = ema.shadow_state()["decoder"]
    best = torch.load(ck / "best_model.pt", weights_only=True)
    assert best["global_step"] == 50500 and best["opts"]["learning_rate"] == 1.5e-5
    assert best["opts"]["ema_scope"] == "decoder" and best["opts"]["target_age_fixed"] == 40
    assert best["ema"]["decoder"]["decay"] == 0.5 and best["ema_scope"] == "decoder"
    assert _dec_equal({k[8:]: v for k, v in best["state_dict"].items() if k.startswith("decoder.")}, raw)
    net_ema = load_aging_model(ck / "phase3_best_ema.pt")  # EMA weights are the primary ones
    assert _dec_equal(net_ema.decoder.state_dict(), shadow)
    assert not _dec_equal(shadow, raw)
    assert _dec_equal(load_aging_model(ck / "best_model.pt", use_ema=True).decoder.state_dict(), shadow)
    # a worse validation writes nothing; a resumed callback keeps the best score
    os.unlink(ck / "best_model.pt")
    tr.callback_metrics = {"val/total": torch.tensor(0.6)}
    cb2 = ForkExportCallback(str(ck))
    cb2.load_state_dict(cb.state_dict())
    cb2.on_validation_end(tr, pl)
    assert not (ck / "best_model.pt").exists()


def test_periodic_last_and_link(setup):
    pl, tr, ema, cb, ck = setup
    # an optimizer built from a Hydra config may hold OmegaConf lists: the file must still load weights_only
    tr.optimizers = [torch.optim.Adam(pl.net.decoder.parameters(), betas=ListConfig([0.9, 0.99]))]
    for step in (50501, 50502, 50502, 50503, 50504):
        pl.abs_step = step
        cb.on_train_batch_end(tr, pl, None, None, 0)
    cb.on_fit_end(tr, pl)
    assert sorted(p.name for p in ck.iterdir()) == ["iteration_50502.pt", "iteration_50504.pt", "phase3_last.pt"]
    last = torch.load(ck / "phase3_last.pt", weights_only=True)
    assert last["global_step"] == 50504 and last["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.99]
    link = ck.parent.parent / "_latest_phase3"
    assert link.is_symlink() and Path(os.readlink(link)) == ck.parent.resolve()


def test_atomic_write_survives_a_crash(setup, monkeypatch):
    pl, tr, ema, cb, ck = setup
    cb.on_fit_end(tr, pl)
    before = (ck / "phase3_last.pt").read_bytes()
    real_save = torch.save

    def crash(obj, f, *a, **kw):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crash)
    with torch.no_grad():
        next(pl.net.decoder.parameters()).add_(3.0)
    with pytest.raises(OSError, match="simulated"):
        cb.on_fit_end(tr, pl)
    monkeypatch.setattr(torch, "save", real_save)
    assert (ck / "phase3_last.pt").read_bytes() == before
    assert [p.name for p in ck.iterdir() if p.name.endswith(".tmp")] == []
    load_aging_model(ck / "phase3_last.pt")  # still a valid checkpoint


def test_atomic_symlink_replaces_and_refuses_dirs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    link = tmp_path / "_latest"
    atomic_symlink(a, link)
    atomic_symlink(b, link)
    assert os.readlink(link) == str(b) and not list(tmp_path.glob(".*tmp"))
    with pytest.raises(FileExistsError, match="is not a symlink"):
        atomic_symlink(a, b)


def test_bad_interval():
    with pytest.raises(ValueError, match="every_n_steps must be ≥ 1 or null, got 0"):
        ForkExportCallback("/tmp/x", every_n_steps=0)

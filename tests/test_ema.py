"""EMACallback: arithmetic, skipped steps, swap/restore exactness, scopes, state round trip, base-EMA init."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from agingnet.callbacks import ema as ema_mod
from agingnet.callbacks.ema import EMACallback, ema_update_, scope_modules


class _Dec(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0]))
        self.register_buffer("noise", torch.tensor([5.0]))
        self.register_buffer("count", torch.tensor(3))


def _module(blender: bool = False):
    net = SimpleNamespace(decoder=_Dec(), encoder=nn.Linear(2, 2), blender=nn.Linear(2, 1) if blender else None)
    pl = SimpleNamespace(net=net, using_ema=False, last_step_skipped=False, hparams=SimpleNamespace(init_from=None))
    pl.trainable_modules = lambda: {"decoder": net.decoder}
    return pl


def _step(cb, pl, trainer, new_w, skipped=False):
    with torch.no_grad():
        pl.net.decoder.w.copy_(torch.tensor(new_w))
        pl.net.decoder.noise.add_(1.0)
    trainer.global_step += 1
    pl.last_step_skipped = skipped
    cb.on_train_batch_end(trainer, pl, {"loss": torch.tensor(1.0)}, None, 0)


def test_two_steps_hand_computed_and_skip():
    pl, tr = _module(), SimpleNamespace(global_step=0)
    cb = EMACallback(decay=0.9)
    cb.on_fit_start(tr, pl)
    _step(cb, pl, tr, [2.0, 0.0])   # 0.9·1 + 0.1·2 = 1.1 ; 0.9·(−2) + 0.1·0 = −1.8
    _step(cb, pl, tr, [3.0, 1.0])   # 0.9·1.1 + 0.1·3 = 1.29 ; 0.9·(−1.8) + 0.1·1 = −1.52
    sh = cb.shadow_state()["decoder"]
    torch.testing.assert_close(sh["w"], torch.tensor([1.29, -1.52]), rtol=0, atol=1e-6)
    assert sh["noise"].item() == 7.0 and sh["count"].item() == 3  # buffers copied, not averaged
    _step(cb, pl, tr, [100.0, 100.0], skipped=True)  # NaN guard skipped the step: no update
    torch.testing.assert_close(cb.shadow_state()["decoder"]["w"], torch.tensor([1.29, -1.52]), rtol=0, atol=1e-6)
    # the same global step again (gradient accumulation): no update either
    pl.last_step_skipped = False
    cb.on_train_batch_end(tr, pl, {"loss": torch.tensor(1.0)}, None, 1)
    assert cb.num_updates == 2


def test_none_loss_is_a_skipped_step():
    pl, tr = _module(), SimpleNamespace(global_step=0)
    cb = EMACallback(decay=0.5)
    cb.on_fit_start(tr, pl)
    with torch.no_grad():
        pl.net.decoder.w.fill_(9.0)
    tr.global_step = 1
    cb.on_train_batch_end(tr, pl, {"loss": None}, None, 0)
    torch.testing.assert_close(cb.shadow["decoder"]["w"], torch.tensor([1.0, -2.0]))


def test_swap_restore_exact_and_context_manager():
    pl, tr = _module(), SimpleNamespace(global_step=0)
    cb = EMACallback(decay=0.7)
    cb.on_fit_start(tr, pl)
    _step(cb, pl, tr, [0.123456789, 7.654321])
    raw = {k: v.clone() for k, v in pl.net.decoder.state_dict().items()}
    cb.on_validation_start(tr, pl)
    assert pl.using_ema
    torch.testing.assert_close(pl.net.decoder.w.detach(), cb.shadow["decoder"]["w"], rtol=0, atol=0)
    cb.on_validation_end(tr, pl)
    assert not pl.using_ema
    for k, v in pl.net.decoder.state_dict().items():
        assert torch.equal(v, raw[k]), k
    with cb.swapped(pl):
        assert pl.using_ema and torch.equal(pl.net.decoder.w.detach(), cb.shadow["decoder"]["w"])
    assert torch.equal(pl.net.decoder.w.detach(), raw["w"]) and not pl.using_ema
    assert pl.net.decoder.w.requires_grad  # still a parameter after the swap


def test_eval_without_ema_does_not_swap():
    pl, tr = _module(), SimpleNamespace(global_step=0)
    cb = EMACallback(eval_with_ema=False)
    cb.on_fit_start(tr, pl)
    cb.on_validation_start(tr, pl)
    assert not pl.using_ema and not cb.is_swapped


def test_state_dict_round_trip_resumes_shadow():
    pl, tr = _module(), SimpleNamespace(global_step=0)
    cb = EMACallback(decay=0.9)
    cb.on_fit_start(tr, pl)
    _step(cb, pl, tr, [2.0, 0.0])
    state = cb.state_dict()
    cb2 = EMACallback(decay=0.9)
    cb2.load_state_dict(state)
    cb2.on_fit_start(tr, pl)  # restored: not re-initialised from the (different) current weights
    torch.testing.assert_close(cb2.shadow["decoder"]["w"], torch.tensor([1.1, -1.8]))
    with pytest.raises(ValueError, match="scope 'decoder\\+adapter' != configured 'decoder'"):
        EMACallback().load_state_dict({**state, "scope": "decoder+adapter"})


def test_scopes_and_errors():
    pl = _module(blender=True)
    assert set(scope_modules(pl, "decoder+adapter")) == {"decoder", "blender"}
    assert set(scope_modules(pl, "trainable")) == {"decoder"}
    with pytest.raises(ValueError, match="has no blender"):
        scope_modules(_module(), "decoder+adapter")
    with pytest.raises(ValueError, match="scope must be one of .* got 'encoder'"):
        EMACallback(scope="encoder")
    with pytest.raises(ValueError, match="decay must be in \\[0, 1\\), got 1.5"):
        EMACallback(decay=1.5)


def test_init_from_base_ema(monkeypatch):
    pl, tr = _module(), SimpleNamespace(global_step=0)
    pl.hparams.init_from = "/base.pt"
    base = {"decoder": {"w": torch.tensor([4.0, 4.0]), "noise": torch.tensor([0.0]), "count": torch.tensor(1)}}
    monkeypatch.setattr(ema_mod, "ema_shadow", lambda p: base if p == "/base.pt" else None)
    cb = EMACallback()
    cb.on_fit_start(tr, pl)
    assert cb.init_source == "decoder:base_ema"
    torch.testing.assert_close(cb.shadow["decoder"]["w"], torch.tensor([4.0, 4.0]))
    base["decoder"]["w"] = torch.zeros(3)  # wrong shape: fall back to the loaded weights
    cb = EMACallback()
    cb.on_fit_start(tr, pl)
    assert cb.init_source == "decoder:weights"
    torch.testing.assert_close(cb.shadow["decoder"]["w"], torch.tensor([1.0, -2.0]))


def test_ema_update_formula_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    s0, xs, d = torch.randn(5, generator=g), [torch.randn(5, generator=g) for _ in range(4)], 0.8
    shadow = {"p": s0.clone()}
    for x in xs:
        ema_update_(shadow, {"p": x}, d)
    # closed form: d^n·s0 + Σ_i (1−d)·d^(n−1−i)·x_i
    n = len(xs)
    want = d**n * s0 + sum((1 - d) * d ** (n - 1 - i) * x for i, x in enumerate(xs))
    torch.testing.assert_close(shadow["p"], want, rtol=0, atol=1e-6)

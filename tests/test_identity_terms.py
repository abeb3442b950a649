"""NN-ID and contrastive-ID terms, the personal-bank and miner-refresh callbacks."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from agingnet.callbacks.miner_refresh import MinerRefreshCallback
from agingnet.callbacks.personal_bank import PersonalBankCallback
from agingnet.losses.base import FrozenNets, LossContext
from agingnet.losses.contrastive_id import ContrastiveIDLoss
from agingnet.losses.nn_id import NNIDLoss
from agingnet.miner import ImpostorBank

D = 16
S = 32  # image side; FrozenNets pools to 256 before the identity crop


class TinyArcface(nn.Module):
    input_size = 8

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 8 * 8, D)

    def forward(self, x):
        return F.normalize(self.fc(x.flatten(1)), dim=1)


@pytest.fixture(scope="module")
def nets():
    return FrozenNets(arcface=TinyArcface())


def images(b: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, S, S, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def make_ctx(nets, y_hat, target_ages, no_aging=False, pass_name="real") -> LossContext:
    b = y_hat.shape[0]
    x = images(b, seed=99)
    return LossContext(x=x, y=x, y_hat=y_hat, codes=torch.zeros(b, 4, 8), latent_avg=torch.zeros(4, 8),
                       input_ages=torch.full((b,), 0.3), target_ages=torch.as_tensor(target_ages).float(),
                       nets=nets, no_aging=no_aging, pass_name=pass_name)


def unit_at(q: torch.Tensor, s: float, n: int, seed: int = 0) -> torch.Tensor:
    """n unit vectors with ⟨v, q⟩ = s exactly (q unit): s·q + √(1−s²)·u, u ⟂ q."""
    q = q.double()
    u = torch.randn(n, q.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    u = F.normalize(u - (u @ q)[:, None] * q, dim=1)
    return (s * q + math.sqrt(1 - s * s) * u).float()


def write_bank(path, q: torch.Tensor, s: float, n: int = 12, age: float = 40.0, seed: int = 0) -> None:
    ImpostorBank.from_embeddings(unit_at(q, s, n, seed), torch.full((n,), age)).save(path)


# ------------------------------------------------------------------------------------------- contrastive_id
def test_contrastive_equals_ln_k_plus_s_over_tau(nets, tmp_path):
    y_hat = images(1).repeat(3, 1, 1, 1)  # same image → same query for every sample
    q = nets.embed_face(y_hat[:1])[0].detach()
    s, k, tau = 0.4, 8, 0.12
    write_bank(tmp_path / "b.pt", q, s)
    term = ContrastiveIDLoss(tmp_path / "b.pt", k=k, backend="torch", temperature=tau)
    value, logs = term(make_ctx(nets, y_hat, [0.40, 0.38, 0.42]))
    assert float(value.detach()) == pytest.approx(math.log(k) + s / tau, abs=1e-4)
    assert logs["applied_ratio"] == 1.0 and logs["k_effective"] == k
    assert logs["sim_mean"] == pytest.approx(s, abs=1e-5)
    assert term.last_stats == logs and all(isinstance(v, float) for v in term.last_stats.values())
    assert term.default_passes == ("real",)


class StubMiner:
    """Returns fixed negatives (requiring grad: the term must cut them off) and records its inputs."""

    def __init__(self, neg):
        self.neg, self.calls = neg, []

    def mine(self, q, ages):
        self.calls.append((q, ages))
        return self.neg[: q.shape[0]], {"candidate_count": 3.0}


def test_contrastive_window_gating_and_brute_force(nets):
    y_hat = images(4, seed=1)
    neg = F.normalize(torch.randn(2, 5, D, generator=torch.Generator().manual_seed(3)), dim=2)
    neg.requires_grad_()
    term = ContrastiveIDLoss("unused.pt", temperature=0.2)
    term._miner = StubMiner(neg)
    ctx = make_ctx(nets, y_hat, [0.40, 0.20, 0.39, 0.43])  # active: samples 0 and 2
    value, logs = term(ctx)
    (qa, ages), = term._miner.calls
    assert ages.tolist() == pytest.approx([40.0, 39.0]) and not qa.requires_grad
    feats = ctx.feat_y_hat.detach()
    expect = 0.0
    for row, b in enumerate((0, 2)):  # log Σ_j exp(⟨q_b, n_j⟩/τ), summed by hand
        expect += math.log(sum(math.exp(float(feats[b] @ neg[row, j].detach()) / 0.2) for j in range(5))) / 2
    assert float(value.detach()) == pytest.approx(expect, rel=1e-5)
    assert logs["applied_ratio"] == 0.5 and logs["candidate_count"] == 3.0


def test_contrastive_gradient_reaches_q_not_negatives(nets):
    neg = F.normalize(torch.randn(2, 6, D, generator=torch.Generator().manual_seed(4)), dim=2)
    neg.requires_grad_()
    term = ContrastiveIDLoss("unused.pt", temperature=0.12)
    term._miner = StubMiner(neg)
    ctx = make_ctx(nets, images(2, seed=2), [0.40, 0.41])
    q = F.normalize(torch.randn(2, D, generator=torch.Generator().manual_seed(5)), dim=1).requires_grad_()
    ctx.feat_y_hat = q  # override the cached embedding with a leaf
    value, _ = term(ctx)
    value.backward()
    assert neg.grad is None
    p = torch.softmax(torch.einsum("bd,bkd->bk", q.detach(), neg.detach()) / 0.12, dim=1)
    expect = torch.einsum("bk,bkd->bd", p, neg.detach()) / 0.12 / 2  # ∂/∂q_b of the mean over 2 samples
    torch.testing.assert_close(q.grad, expect, rtol=1e-5, atol=1e-6)


def test_contrastive_no_active_sample_is_connected_zero(nets, tmp_path):
    y_hat = images(2).requires_grad_()
    term = ContrastiveIDLoss(tmp_path / "missing.pt")
    value, logs = term(make_ctx(nets, y_hat, [0.20, 0.60]))
    assert float(value.detach()) == 0.0 and value.requires_grad and logs == {"applied_ratio": 0.0}
    value.backward()
    assert y_hat.grad is not None and not term.loaded  # the bank was never read
    assert term.last_stats == {"applied_ratio": 0.0}


def test_contrastive_lazy_load_reload_and_refresh(nets, tmp_path):
    path = tmp_path / "b.pt"
    term = ContrastiveIDLoss(path, k=4, backend="torch")
    ctx = make_ctx(nets, images(2), [0.40, 0.40])
    with pytest.raises(FileNotFoundError, match="b.pt"):
        term(ctx)
    q = nets.embed_face(images(1))[0].detach()
    write_bank(path, q, 0.3, n=6)
    term(ctx)
    assert term.loaded and len(term.miner.bank) == 6
    module = SimpleNamespace(loss=SimpleNamespace(terms=nn.ModuleDict({"contrastive_id": term})))
    cb = MinerRefreshCallback(every_n_steps=5)
    assert cb.refresh(module, step=1) == 0  # unchanged file: stat only
    write_bank(path, q, 0.3, n=9)  # different size → reload
    assert cb.refresh(module, step=2) == 1 and len(term.miner.bank) == 9
    assert cb.refresh(module, step=3) == 0
    assert cb.refresh(module, step=5) == 1 and cb.refresh(module, step=5) == 0  # periodic, once per step
    with pytest.raises(ValueError, match="every_n_steps"):
        MinerRefreshCallback(every_n_steps=0)


# ------------------------------------------------------------------------------------------- nn_id
def keyed_bank(nets):
    keys = torch.tensor([0.20, 0.22, 0.25, 0.38, 0.40, 0.41, 0.43, 0.44, 0.60])
    emb = F.normalize(torch.randn(9, D, generator=torch.Generator().manual_seed(6)), dim=1)
    return emb, keys


def test_nn_id_matches_brute_force(nets):
    emb, keys = keyed_bank(nets)
    term = NNIDLoss()
    term.set_bank(emb, keys, "fp")
    targets = [0.395, 0.425, 0.57, 0.23]
    ctx = make_ctx(nets, images(4, seed=7), targets)
    value, logs = term(ctx)
    f = ctx.feat_y_hat.detach()
    expect = []
    for b, t in enumerate(targets):  # per-sample Python reference
        nearest = min(keys.tolist(), key=lambda k: abs(k - t))
        ref = [i for i, k in enumerate(keys.tolist()) if abs(k - nearest) <= 0.03 + 1e-6]
        expect.append(1 - max(float(f[b] @ emb[i]) for i in ref))
    assert float(value.detach()) == pytest.approx(sum(expect) / 4, rel=1e-5) and logs["active"] == 1.0


def test_nn_id_tolerance_boundary(nets):
    y_hat = images(1, seed=8)
    f = nets.embed_face(y_hat)[0].detach()
    # keys 0.40 (sim 0.1), 0.43 (sim 0.5, inside ±0.03), 0.44 (sim 0.9, outside)
    emb = torch.stack([unit_at(f, 0.1, 1)[0], unit_at(f, 0.5, 1, 1)[0], unit_at(f, 0.9, 1, 2)[0]])
    term = NNIDLoss()
    term.set_bank(emb, torch.tensor([0.40, 0.43, 0.44]), "fp")
    value, _ = term(make_ctx(nets, y_hat, [0.40]))
    assert float(value.detach()) == pytest.approx(0.5, abs=1e-5)
    term.tolerance = 0.02
    assert float(term(make_ctx(nets, y_hat, [0.40]))[0]) == pytest.approx(0.9, abs=1e-5)


def test_nn_id_gating_and_gradient(nets):
    emb, keys = keyed_bank(nets)
    term = NNIDLoss()
    term.set_bank(emb, keys, "fp")
    for targets, no_aging in (([0.40, 0.40], True), ([0.40, 0.65], False), ([0.10, 0.40], False)):
        y_hat = images(2).requires_grad_()
        value, logs = term(make_ctx(nets, y_hat, targets, no_aging=no_aging))
        assert logs == {"active": 0.0} and float(value.detach()) == 0.0 and value.requires_grad
    y_hat = images(2).requires_grad_()
    value, logs = term(make_ctx(nets, y_hat, [0.20, 0.60], pass_name="cycle"))  # the range is inclusive
    value.backward()
    assert logs["active"] == 1.0 and float(y_hat.grad.abs().sum()) > 0


def test_nn_id_errors(nets):
    with pytest.raises(RuntimeError, match="personal bank was not built"):
        NNIDLoss()(make_ctx(nets, images(1), [0.4]))
    with pytest.raises(ValueError, match=r"embeddings \[N,D\] .* and keys \[N\]"):
        NNIDLoss().set_bank(torch.zeros(3, D), torch.zeros(2), "fp")
    with pytest.raises(ValueError, match="NaN"):
        NNIDLoss().set_bank(torch.full((2, D), float("nan")), torch.zeros(2), "fp")


# ------------------------------------------------------------------------------------------- personal bank
class FakeDataModule:
    def __init__(self, n):
        imgs = images(n, seed=11)
        self.items = [{"image": imgs[i], "age": float(30 + i)} for i in range(n)]
        self.fp, self.dataset_calls = "a", 0

    def fingerprint(self):
        return self.fp

    def personal_bank_dataset(self):
        self.dataset_calls += 1
        return self.items


def test_personal_bank_callback(nets):
    dm = FakeDataModule(3)
    module = SimpleNamespace(frozen=nets, device=torch.device("cpu"),
                             loss=SimpleNamespace(terms=nn.ModuleDict({"nn_id": NNIDLoss()})))
    trainer = SimpleNamespace(datamodule=dm)
    cb = PersonalBankCallback(batch_size=2)
    cb.on_fit_start(trainer, module)
    term = module.loss.terms["nn_id"]
    imgs = torch.stack([it["image"] for it in dm.items])
    got = torch.sort(term.bank_keys).values
    assert torch.allclose(got, torch.tensor([0.30, 0.30, 0.31, 0.31, 0.32, 0.32]))
    expect = torch.cat([nets.embed_face(imgs), nets.embed_face(imgs.flip(-1))])
    for e in expect:  # every image and every flip is in the bank
        assert float((term.bank_embeddings @ e).max()) == pytest.approx(1.0, abs=1e-5)
    assert term.fingerprint == "a" and not term.bank_embeddings.requires_grad
    cb.on_train_epoch_start(trainer, module)
    assert cb.builds == 1  # same fingerprint: no rebuild
    dm.fp = "b"
    cb.on_train_epoch_start(trainer, module)
    assert cb.builds == 2 and term.fingerprint == "b"
    no_flip = PersonalBankCallback(include_flips=False)
    no_flip.on_fit_start(trainer, module)
    assert term.bank_embeddings.shape == (3, D)
    # without an nn_id term the callback does nothing
    calls = dm.dataset_calls
    PersonalBankCallback().on_fit_start(trainer, SimpleNamespace(loss=SimpleNamespace(terms=nn.ModuleDict())))
    assert dm.dataset_calls == calls

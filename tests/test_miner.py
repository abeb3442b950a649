"""Impostor bank validation and the miner's band / relaxation / padding rules on banks of known geometry."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.nn import functional as F

from agingnet.config import compose_config
from agingnet.losses.contrastive_id import ContrastiveIDLoss
from agingnet.losses.registry import REGISTRY_KEYS
from agingnet.miner import (
    PROFILES,
    ImpostorBank,
    ImpostorMiner,
    MinerConfig,
    age_to_bin,
    bench_mining,
    bin_key,
)

D = 16


def unit_at(sims: list[float], seed: int = 0) -> torch.Tensor:
    """Unit vectors v with ⟨v, e0⟩ = s exactly: v = s·e0 + √(1−s²)·u, u ⟂ e0 random unit."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(len(sims), D, generator=g, dtype=torch.float64)
    u[:, 0] = 0
    u = F.normalize(u, dim=1)
    s = torch.tensor(sims, dtype=torch.float64)[:, None]
    v = s * torch.eye(D, dtype=torch.float64)[0] + torch.sqrt(1 - s**2) * u
    return v.float()


def geometry_bank(groups: dict[int, list[float]]) -> ImpostorBank:
    """Bank from {bin index: [similarities to e0]}, each member aged at its bin's centre (18+5i+2)."""
    sims, ages = [], []
    for i, ss in groups.items():
        sims += ss
        ages += [18 + 5 * i + 2.0] * len(ss)
    return ImpostorBank.from_embeddings(unit_at(sims), torch.tensor(ages))


def q0(b: int = 1) -> torch.Tensor:
    return torch.eye(D)[0].repeat(b, 1)


def miner(bank, **kw) -> ImpostorMiner:
    return ImpostorMiner(bank, MinerConfig.from_profile("soft060", **{"backend": "torch", "k": 8, **kw}))


def members(bank: ImpostorBank, bins: set[int], lo: float, hi: float) -> set[int]:
    """Brute force: row ids in ``bins`` whose similarity to e0 lies in [lo, hi] (per-row Python check)."""
    out = set()
    for r in range(len(bank)):
        s = float(bank.embeddings[r, 0])
        if int(bank.bin_ids[r]) in bins and lo - 1e-6 <= s <= hi + 1e-6:
            out.add(r)
    return out


# ------------------------------------------------------------------------------------------- bins / config
def test_bin_rule():
    ages = torch.tensor([18.0, 22.9, 23.0, 40.0, 77.99, 80.0])
    assert age_to_bin(ages).tolist() == [0, 0, 1, 4, 11, 12]
    assert [bin_key(i) for i in (0, 4, 12)] == ["18-22", "38-42", "78-82"]
    bank = ImpostorBank.from_embeddings(unit_at([0.1] * 5), torch.tensor([17.9, 18.0, 50.0, 80.0, 80.5]))
    assert len(bank) == 3 and bank.bin_counts() == {"18-22": 1, "48-52": 1, "78-82": 1}


def test_profiles_and_overrides():
    # the fork's profiles: (k, top_m, min_sim, max_sim)
    fork = {"baseline": (64, 512, 0.20, 0.70), "soft": (48, 768, 0.25, 0.65), "soft060": (48, 768, 0.25, 0.60),
            "soft32": (32, 768, 0.25, 0.65)}
    assert set(fork) == set(PROFILES)
    for name, expect in fork.items():
        c = MinerConfig.from_profile(name)
        assert (c.k, c.top_m, c.min_sim, c.max_sim) == expect, name
    seed = MinerConfig.from_profile("soft-0.60")
    assert (seed.k, seed.top_m, seed.min_sim, seed.max_sim) == (48, 768, 0.25, 0.60)
    c = MinerConfig.from_profile("soft060", k=16, max_sim=0.5, backend=None)
    assert (c.k, c.max_sim, c.backend) == (16, 0.5, "faiss")
    with pytest.raises(ValueError, match="profile 'hard' is unknown"):
        MinerConfig.from_profile("hard")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['kk'\]"):
        MinerConfig.from_profile("soft", kk=3)
    with pytest.raises(ValueError, match="min_sim ≤ max_sim"):
        MinerConfig(min_sim=0.7, max_sim=0.6)
    with pytest.raises(ValueError, match="backend 'annoy'"):
        MinerConfig(backend="annoy")


@pytest.mark.parametrize("profile, expect", [("soft32", (32, 768, 0.25, 0.65)), ("baseline", (64, 512, 0.20, 0.70))])
def test_miner_config_group_builds_the_fork_profile(profile, expect, tmp_path):
    """``miner=<profile>`` on the command line gives the contrastive term the fork's profile."""
    cfg = compose_config(["experiment=phase3_oneshot_40", f"miner={profile}"], output_dir=tmp_path)
    spec = OmegaConf.to_container(cfg.loss.contrastive_id, resolve=True)
    term = instantiate({k: v for k, v in spec.items() if k not in REGISTRY_KEYS})
    c = term.cfg
    assert isinstance(term, ContrastiveIDLoss) and (c.k, c.top_m, c.min_sim, c.max_sim) == expect


# ------------------------------------------------------------------------------------------- mining rules
def test_band_filter_and_candidate_count():
    band = [0.26 + 0.015 * j for j in range(20)]  # 0.26 … 0.545, inside [0.25, 0.60]
    bank = geometry_bank({4: band + [0.7, 0.8, 0.9, 0.05, 0.1, 0.2], 3: [0.5] * 10, 5: [0.4] * 10})
    ids, sims, st = miner(bank).mine_ids(q0(2), torch.tensor([40.0, 42.0]))
    allowed = members(bank, {4}, 0.25, 0.60)
    assert len(allowed) == 20 and set(ids.flatten().tolist()) <= allowed
    assert all(len(set(row)) == 8 for row in ids.tolist())  # a permutation: no repeats
    torch.testing.assert_close(sims, bank.embeddings[ids][..., 0])
    assert st["candidate_count"] == 20 and st["k_effective"] == 8 and st["pad_count"] == 0
    assert (st["band_min"], st["band_max"], st["radius_used"]) == (0.25, 0.6, 0.0)
    flat = sims.flatten().numpy().astype(np.float64)
    assert st["sim_mean"] == pytest.approx(flat.mean(), abs=1e-6)
    assert st["sim_std"] == pytest.approx(flat.std(), abs=1e-6)
    for p in (50, 75, 90):
        assert st[f"sim_p{p}"] == pytest.approx(np.percentile(flat, p), abs=1e-6)


def test_relaxation_widens_radius_first():
    # target bin 4 has 3 in-band members, bin 5 (radius 1) has 10; the far bins have in-band ones too
    bank = geometry_bank({4: [0.3, 0.35, 0.4, 0.1, 0.1], 5: [0.45] * 10, 2: [0.5] * 10, 8: [0.55] * 10})
    ids, _, st = miner(bank).mine_ids(q0(), torch.tensor([40.0]))
    assert set(ids[0].tolist()) <= members(bank, {3, 4, 5}, 0.25, 0.60)
    assert (st["candidate_count"], st["radius_used"], st["band_min"], st["k_effective"]) == (3, 1.0, 0.25, 8)


def test_relaxation_radius_to_three_before_lowering_band():
    # only bin 7 (= target 4 + 3) holds in-band members; bin 4 holds members at 0.17 (below the floor)
    bank = geometry_bank({4: [0.17] * 10, 7: [0.3] * 8, 9: [0.3] * 8})
    ids, _, st = miner(bank).mine_ids(q0(), torch.tensor([40.0]))
    assert set(ids[0].tolist()) == members(bank, {7}, 0.25, 0.60)
    assert (st["radius_used"], st["band_min"], st["candidate_count"]) == (3.0, 0.25, 0.0)


def test_relaxation_lowers_band_by_005_steps():
    bank = geometry_bank({4: [0.17] * 10, 6: [0.12] * 10, 9: [0.3] * 8})
    ids, sims, st = miner(bank).mine_ids(q0(), torch.tensor([40.0]))
    # 0.25 → 0.20 → 0.15 reaches the ten 0.17 members; the 0.12 ones stay out
    assert st["radius_used"] == 3 and st["band_min"] == pytest.approx(0.15)
    assert set(ids[0].tolist()) <= members(bank, {4}, 0.17, 0.17)
    assert torch.allclose(sims, torch.full_like(sims, 0.17), atol=1e-6)


def test_random_fill_after_band_reaches_zero():
    # 5 usable members (sim 0.05 ≥ 0 once the band is down to 0), the rest negative: 3 pads
    bank = geometry_bank({4: [0.05] * 5 + [-0.5] * 6, 2: [-0.4] * 6, 9: [0.5] * 4})
    ids, sims, st = miner(bank).mine_ids(q0(), torch.tensor([40.0]))
    assert st["band_min"] == 0.0 and st["k_effective"] == 5 and st["pad_count"] == 3
    # every similarity, padded or not, is the real ⟨q, e⟩ of the member the loss will use
    real = [float(bank.embeddings[i] @ q0()[0]) for i in ids[0].tolist()]
    assert sims[0].tolist() == pytest.approx(real, abs=1e-6)
    assert st["sim_mean"] == pytest.approx(sum(real) / 8, abs=1e-6)
    assert set(ids[0].tolist()) <= members(bank, {4}, -1, 1) and members(bank, {4}, 0.05, 0.05) <= set(ids[0].tolist())
    neg, _ = miner(bank).mine(q0(), torch.tensor([40.0]))
    assert neg.shape == (1, 8, D) and not neg.requires_grad


def test_padding_draws_from_the_target_bins_not_the_widened_window():
    # bin 4 (38-42) holds 3 members, its neighbours within ±3 bins 20 each; nobody is in any band (all < 0),
    # so the radius widens to 3 and the floor drops to 0 before padding: the pads must still come from bin 4
    far = {i: [-0.5] * 20 for i in (1, 2, 3, 5, 6, 7)}
    bank = geometry_bank({4: [-0.3] * 3, **far})
    ids, sims, st = miner(bank, k=12).mine_ids(q0(4), torch.full((4,), 40.0))
    assert st["k_effective"] == 0 and st["radius_used"] == 3 and st["band_min"] == 0.0
    assert set(ids.flatten().tolist()) <= members(bank, {4}, -1, 1)
    assert torch.allclose(sims, torch.full_like(sims, -0.3), atol=1e-6)
    # a profile radius of 1 pads from bins 3-5
    ids, _, _ = miner(bank, k=12, radius=1).mine_ids(q0(4), torch.full((4,), 40.0))
    assert set(ids.flatten().tolist()) <= members(bank, {3, 4, 5}, -1, 1)
    # empty target bin: the pad window widens only as far as the nearest non-empty bins (2 and 6 here)
    bank = geometry_bank({i: [-0.5] * 20 for i in (1, 2, 6, 7)})
    ids, _, _ = miner(bank, k=12).mine_ids(q0(4), torch.full((4,), 40.0))
    assert set(ids.flatten().tolist()) <= members(bank, {2, 6}, -1, 1)


def test_per_query_relaxation_and_mean_candidates():
    bank = geometry_bank({4: [0.3] * 10, 8: [0.3] * 2 + [0.1] * 10})
    _, _, st = miner(bank).mine_ids(q0(2), torch.tensor([40.0, 60.0]))
    # query 1 keeps the strict band (10 ≥ 8); query 2 widens to radius 3, then lowers its floor to 0.10
    assert st["candidate_count"] == pytest.approx((10 + 2) / 2)
    assert st["radius_used"] == 3 and st["band_min"] == pytest.approx(0.10)


def test_random_backend_draws_from_covering_bins():
    bank = geometry_bank({4: [0.2] * 6, 5: [0.4] * 6, 0: [0.3] * 6})
    m = miner(bank, backend="random", k=10, radius=1)
    ids, sims, st = m.mine_ids(q0(3), torch.tensor([40.0, 41.0, 44.0]))
    assert ids.shape == (3, 10) and set(ids.flatten().tolist()) <= members(bank, {3, 4, 5}, -1, 1)
    torch.testing.assert_close(sims, bank.embeddings[ids][..., 0])
    assert st["k_effective"] == 10 and st["candidate_count"] == 12


def test_deterministic_given_seed():
    g = torch.Generator().manual_seed(1)
    bank = ImpostorBank.from_embeddings(F.normalize(torch.randn(3000, D, generator=g), dim=1),
                                        18 + 62 * torch.rand(3000, generator=g))
    q = F.normalize(torch.randn(4, D, generator=g), dim=1)
    t = torch.tensor([30.0, 40.0, 41.0, 70.0])
    a = miner(bank, min_sim=0.1, top_m=256).mine_ids(q, t)[0]
    m = miner(bank, min_sim=0.1, top_m=256)
    assert torch.equal(a, m.mine_ids(q, t)[0])
    assert not torch.equal(a, m.mine_ids(q, t)[0])  # the stream moves on
    m.reset_rng()
    assert torch.equal(a, m.mine_ids(q, t)[0])
    assert not torch.equal(a, miner(bank, min_sim=0.1, top_m=256, seed=7).mine_ids(q, t)[0])


def test_faiss_and_torch_backends_agree():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(2)
    bank = ImpostorBank.from_embeddings(F.normalize(torch.randn(4000, D, generator=g), dim=1),
                                        18 + 62 * torch.rand(4000, generator=g))
    q = F.normalize(torch.randn(5, D, generator=g), dim=1)
    t = torch.tensor([25.0, 40.0, 40.0, 55.0, 79.0])
    mf, mt = miner(bank, backend="faiss", top_m=300), miner(bank, backend="torch", top_m=300)
    assert mf.backend == "faiss"
    sf, i_f = mf.search(q, 300)
    st_, it = mt.search(q, 300)
    assert torch.equal(i_f, it) and torch.allclose(sf, st_, atol=1e-5)
    (a, sa, xa), (b, sb, xb) = mf.mine_ids(q, t), mt.mine_ids(q, t)
    assert torch.equal(a, b) and torch.allclose(sa, sb, atol=1e-5)
    assert xa.keys() == xb.keys()


def test_window_without_bins_raises():
    bank = geometry_bank({0: [0.3] * 10})
    with pytest.raises(ValueError, match=r"no bin within ±3 bins of target ages \[60.0\]"):
        miner(bank).mine_ids(q0(2), torch.tensor([20.0, 60.0]))
    with pytest.raises(ValueError, match="no bin within"):
        miner(bank, backend="random").mine_ids(q0(), torch.tensor([60.0]))


def test_bench_mining_small():
    n, d, nq, repeats = 2000, 8, 4, 3  # d = 8: members on both sides of both band edges
    t0 = time.perf_counter()
    out = bench_mining(n=n, d=d, queries=nq, repeats=repeats, backend="torch")
    wall_ms = 1000 * (time.perf_counter() - t0)
    assert (out["backend"], out["n"], out["d"], out["queries"], out["repeats"]) == ("torch", n, d, nq, repeats)
    # the timings are of the calls made inside this wall time: consistent with each other and with it
    assert 0 < out["ms_min"] <= out["ms_p50"] and out["ms_min"] <= out["ms_mean"]
    assert repeats * out["ms_mean"] <= wall_ms
    # candidate_count against a brute-force count on the documented bench bank: unit Gaussian embeddings,
    # ages U[18, 80], queries = bank members + 0.08·noise at target 40; soft060: top-768, bin 38-42, [0.25, 0.60]
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(n, d, generator=g), dim=1)
    bank = ImpostorBank.from_embeddings(emb, 18 + 62 * torch.rand(n, generator=g))
    pick = torch.randint(0, n, (nq,), generator=g)
    q = F.normalize(bank.embeddings[pick] + 0.08 * torch.randn(nq, d, generator=g), dim=1).double().numpy()
    e = bank.embeddings.double().numpy()
    in_bin = (bank.ages.numpy() >= 38) & (bank.ages.numpy() < 43)
    counts = []
    for row in q:  # per-query Python reference
        s = e @ row
        top = np.argsort(-s)[:768]
        counts.append(sum(1 for i in top if in_bin[i] and 0.25 <= s[i] <= 0.60))
    assert sum(counts) > 0 and out["candidate_count"] == pytest.approx(np.mean(counts))


# ------------------------------------------------------------------------------------------- bad banks
def good_dict() -> dict:
    return {"bins": {"38-42": unit_at([0.1, 0.2, 0.3]), "43-47": unit_at([0.4, 0.5])},
            "ages": {"38-42": torch.tensor([38.0, 40.0, 42.5]), "43-47": torch.tensor([44.0, 47.0])},
            "meta": {"norm": "l2"}}


def test_load_valid_and_missing(tmp_path):
    p = tmp_path / "bank.pt"
    torch.save(good_dict(), p)
    bank = ImpostorBank.load(p)
    assert len(bank) == 5 and bank.bin_ids.tolist() == [4, 4, 4, 5, 5] and bank.meta == {"norm": "l2"}
    assert bank.offsets[4:7].tolist() == [0, 3, 5]
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        ImpostorBank.load(tmp_path / "nope.pt")


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.pop("bins"), "expected a dict with 'bins' and 'ages'"),
    (lambda d: d["bins"].update({"17-21": unit_at([0.1])}) or d["ages"].update({"17-21": torch.ones(1)}),
     "bin key '17-21' is not one of"),
    (lambda d: d["bins"].update({"abc": unit_at([0.1])}) or d["ages"].update({"abc": torch.ones(1)}),
     "bin key 'abc' is not of the form"),
    (lambda d: d["ages"].pop("43-47"), "different keys"),
    (lambda d: d["bins"]["38-42"].__setitem__((0, 3), float("nan")), r"bins\['38-42'\] holds NaN"),
    (lambda d: d["bins"]["43-47"].mul_(1.1), r"bins\['43-47'\] is not L2-normalized"),
    (lambda d: d["ages"].__setitem__("38-42", torch.ones(2)), r"ages\['38-42'\] must be a tensor \[3\]"),
    (lambda d: d["bins"].__setitem__("38-42", torch.ones(3)), r"bins\['38-42'\] must be a float tensor"),
])
def test_bad_banks(tmp_path, mutate, match):
    d = good_dict()
    mutate(d)
    p = tmp_path / "bad.pt"
    torch.save(d, p)
    with pytest.raises(ValueError, match=match) as e:
        ImpostorBank.load(p)
    assert "bad.pt" in str(e.value)


def test_empty_bin_warns_and_is_skipped(tmp_path):
    d = good_dict()
    d["bins"]["78-82"], d["ages"]["78-82"] = torch.zeros(0, D), torch.zeros(0)
    p = tmp_path / "b.pt"
    torch.save(d, p)
    with pytest.warns(UserWarning, match=r"b.pt: bin '78-82' is empty"):
        bank = ImpostorBank.load(p)
    assert "78-82" not in bank.bin_counts()
    # the empty window is not a silent zero: mining at 80 years still finds no bin within ±3 → error
    with pytest.raises(ValueError, match=r"target ages \[80.0\]"):
        miner(bank, k=2).mine_ids(q0(), torch.tensor([80.0]))
    d = {"bins": {"78-82": torch.zeros(0, D)}, "ages": {"78-82": torch.zeros(0)}}
    torch.save(d, p)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="every bin is empty"):
        ImpostorBank.load(p)


def test_contrastive_loss_on_padded_negatives_matches_formula():
    """SPEC §4: mean_b logsumexp_j(⟨q_b, n_j⟩/τ) over the mined negatives, here all padding (nobody in any band);
    the loss and the logged similarities agree, and the negatives carry no gradient."""
    bank = geometry_bank({4: [-0.9, -0.5, -0.2]})
    k, tau = 6, 0.12
    ref_ids, _, _ = miner(bank, k=k).mine_ids(q0(2), torch.tensor([40.0, 41.0]))  # same seed: same draws
    term = ContrastiveIDLoss("unused.pt", k=k, backend="torch", temperature=tau)
    term._miner = real = miner(bank, k=k)
    handed = []

    def mine(queries, ages):  # the real miner, its negatives made leaves that would collect any gradient
        neg, stats = real.__class__.mine(real, queries, ages)
        handed.append(neg.requires_grad_(True))
        return neg, stats

    real.mine = mine
    q = q0(2).clone().requires_grad_(True)
    ctx = SimpleNamespace(target_ages=torch.tensor([0.40, 0.41]), feat_y_hat=q, y_hat=torch.zeros(2, 3, 4, 4))
    value, logs = term(ctx)
    e = bank.embeddings.detach()
    sims = [[float(e[i, 0]) for i in row] for row in ref_ids.tolist()]  # ⟨e0, n⟩ = first coordinate
    expect = sum(math.log(sum(math.exp(s / tau) for s in row)) for row in sims) / 2
    assert math.isfinite(value.item()) and value.item() == pytest.approx(expect, rel=1e-5)
    assert logs["k_effective"] == 0 and logs["pad_count"] == k
    assert logs["sim_mean"] == pytest.approx(sum(map(sum, sims)) / (2 * k), abs=1e-6)  # what the loss used
    value.backward()
    assert len(handed) == 1 and handed[0].grad is None
    grad = torch.zeros(2, D)
    for b, row in enumerate(ref_ids.tolist()):  # ∂/∂q_b = (1/B)·Σ_j softmax_j(s/τ)·n_j/τ, negatives constant
        w = torch.softmax(torch.tensor(sims[b], dtype=torch.float64) / tau, 0)
        grad[b] = (w[:, None] * e[row].double()).sum(0).float() / tau / 2
    torch.testing.assert_close(q.grad, grad, rtol=1e-5, atol=1e-6)

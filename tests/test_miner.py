"""Impostor bank validation and the miner's band / relaxation / padding rules on banks of known geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

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
    base = PROFILES["baseline"]
    assert (base.k, base.min_sim, base.max_sim) == (64, 0.20, 0.70)
    assert (PROFILES["soft"].k, PROFILES["soft"].max_sim) == (48, 0.65)
    seed = MinerConfig.from_profile("soft-0.60")
    assert (seed.k, seed.top_m, seed.min_sim, seed.max_sim) == (48, 768, 0.25, 0.60)
    assert MinerConfig.from_profile("soft32").k == 32
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
    # 5 usable members (sim 0.05 ≥ 0 once the band is down to 0), the rest negative: 3 pads of sim 0
    bank = geometry_bank({4: [0.05] * 5 + [-0.5] * 6, 2: [-0.4] * 6, 9: [0.5] * 4})
    ids, sims, st = miner(bank).mine_ids(q0(), torch.tensor([40.0]))
    assert st["band_min"] == 0.0 and st["k_effective"] == 5 and st["pad_count"] == 3
    assert st["sim_mean"] == pytest.approx(5 * 0.05 / 8, abs=1e-6)  # pads are counted 0
    assert sorted(sims[0].tolist(), reverse=True)[:5] == pytest.approx([0.05] * 5, abs=1e-6)
    covering = {r for r in range(len(bank)) if 1 <= int(bank.bin_ids[r]) <= 7}
    assert set(ids[0].tolist()) <= covering and members(bank, {4}, 0.05, 0.05) <= set(ids[0].tolist())
    neg, _ = miner(bank).mine(q0(), torch.tensor([40.0]))
    assert neg.shape == (1, 8, D) and not neg.requires_grad


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
    out = bench_mining(n=2000, d=32, queries=4, repeats=2, backend="torch")
    assert out["backend"] == "torch" and out["ms_mean"] > 0 and out["n"] == 2000


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


def test_contrastive_value_is_finite_for_all_pads():
    """Sanity of the padding path: k draws even when the band ends empty (no NaN similarities)."""
    bank = geometry_bank({4: [-0.9] * 3})
    ids, sims, st = miner(bank, k=6).mine_ids(q0(), torch.tensor([40.0]))
    assert st["k_effective"] == 0 and torch.all(sims == 0) and math.isfinite(st["sim_std"])
    assert set(ids[0].tolist()) <= {0, 1, 2}

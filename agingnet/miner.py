"""Impostor miner of the contrastive identity term (SPEC §5).

The bank it mines from (file layout, bin rule, in-memory layout) lives in :mod:`agingnet.impostor_bank`.
Its bins are contiguous row ranges of one sorted ``[N, D]`` tensor, so mining is tensor work only.

Empty bins never turn into a silent zero loss: the miner widens its radius over them and raises ``ValueError``
when no member lies within ``max_radius`` bins of a target age.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

# The miner itself needs ImpostorBank, age_to_bin and default_meta. The other names are re-exported on purpose:
# the bank storage / file format lived in this module before it moved to agingnet.impostor_bank, and users'
# scripts (and older tests) still import the bank names from agingnet.miner.
from agingnet.impostor_bank import (  # noqa: F401 - re-exports
    BIN_SIZE,
    MAX_AGE,
    MIN_AGE,
    N_BINS,
    NORM_TOL,
    ImpostorBank,
    age_to_bin,
    bin_key,
    default_meta,
    parse_bin_key,
)
from agingnet.io import atomic_torch_save  # re-export: in this module's __all__ since before the split

try:  # optional at import time: the torch backend needs nothing else
    import faiss  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    faiss = None


# ----------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class MinerConfig:
    """Miner profile: keep ``k`` negatives from the top-``top_m`` inner products whose similarity lies in
    ``[min_sim, max_sim]``, from the bins within ``radius`` of the target bin (widened up to
    ``max_radius``)."""

    k: int = 48
    top_m: int = 768
    min_sim: float = 0.25
    max_sim: float = 0.60
    radius: int = 0
    max_radius: int = 3
    backend: str = "faiss"
    seed: int = 0

    def __post_init__(self):
        if self.k < 1 or self.top_m < self.k:
            raise ValueError(f"miner config: need 1 ≤ k ≤ top_m, got k={self.k}, top_m={self.top_m}")
        if not -1.0 <= self.min_sim <= self.max_sim <= 1.0:
            raise ValueError(f"miner config: need -1 ≤ min_sim ≤ max_sim ≤ 1, "
                             f"got [{self.min_sim}, {self.max_sim}]")
        if self.radius < 0 or self.max_radius < 0:
            raise ValueError(f"miner config: radius/max_radius must be ≥ 0, "
                             f"got {self.radius}/{self.max_radius}")
        if self.backend not in ("faiss", "torch", "random"):
            raise ValueError(f"miner config: backend {self.backend!r} is not one of "
                             f"'faiss', 'torch', 'random'")

    @classmethod
    def from_profile(cls, profile: str = "soft060", **overrides: Any) -> MinerConfig:
        """A named profile with any field overridden (``None`` overrides are ignored)."""
        name = PROFILE_ALIASES.get(profile, profile)
        if name not in PROFILES:
            raise ValueError(f"miner profile {profile!r} is unknown; known: {sorted(PROFILES)}")
        names = {f.name for f in fields(cls)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise ValueError(f"miner config: unknown field(s) {bad}; fields: {sorted(names)}")
        return replace(PROFILES[name], **{k: v for k, v in overrides.items() if v is not None})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


PROFILES: dict[str, MinerConfig] = {
    "baseline": MinerConfig(k=64, top_m=512, min_sim=0.20, max_sim=0.70),
    "soft": MinerConfig(k=48, min_sim=0.25, max_sim=0.65),
    "soft060": MinerConfig(k=48, top_m=768, min_sim=0.25, max_sim=0.60),
    "soft32": MinerConfig(k=32, min_sim=0.25, max_sim=0.65),
}
PROFILE_ALIASES = {"soft-0.60": "soft060", "soft_060": "soft060", "soft0.60": "soft060"}

MIN_SIM_STEP = 0.05


# ----------------------------------------------------------------------------------------------- miner
class ImpostorMiner:
    """Mine ``k`` impostor negatives per query from an :class:`ImpostorBank` (SPEC §5).

    Per query q and target bin b (bin of the target age):
      1. top-M members by ⟨q, e⟩ (FAISS ``IndexFlatIP``, on GPU when available; or torch matmul + topk);
      2. keep members whose bin lies in [b − r, b + r];
      3. keep min_sim ≤ s ≤ max_sim → ``candidate_count``;
      4. while fewer than k: r += 1 up to ``max_radius``; then min_sim −= 0.05 per round, down to 0;
         then pad with uniform random members of the target bins b ± ``radius`` (the profile's radius, not
         the widened one; widened only where those bins are empty);
      5. random permutation of the candidates, keep k (``k_effective`` = candidates among them).
    Relaxation is per query: a query with enough candidates keeps the profile's band and radius.
    Padded negatives enter the loss with their real embeddings, so their real similarity ⟨q, e⟩ is what the
    similarity statistics count (the fork logged them as 0, which understated ``sim_mean`` under padding).
    Deterministic for a given ``cfg.seed`` (one CPU ``torch.Generator``, reset by :meth:`reset_rng`).
    """

    def __init__(self, bank: ImpostorBank, cfg: MinerConfig | None = None):
        self.bank = bank
        self.cfg = cfg or MinerConfig()
        self.backend = self.cfg.backend
        if self.backend == "faiss" and faiss is None:
            warnings.warn("faiss is not installed: the impostor miner falls back to torch matmul + topk",
                          stacklevel=2)
            self.backend = "torch"
        self.generator = torch.Generator()
        self.reset_rng()
        self._index = None
        self._index_on_gpu = False
        self._bank_dev: dict[torch.device, Tensor] = {}

    def reset_rng(self, seed: int | None = None) -> None:
        self.generator.manual_seed(self.cfg.seed if seed is None else int(seed))

    # ---- search
    def rebuild_index(self) -> None:
        """Drop the search index and device copies; they are rebuilt on the next search."""
        self._index, self._index_on_gpu, self._bank_dev = None, False, {}

    def _faiss_index(self):
        if self._index is None:
            cpu = faiss.IndexFlatIP(self.bank.dim)
            cpu.add(self.bank.embeddings.numpy())
            self._index, self._index_on_gpu = cpu, False
            if (torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources")
                    and faiss.get_num_gpus() > 0 and self.cfg.top_m <= 2048):
                try:
                    self._gpu_res = faiss.StandardGpuResources()
                    self._index = faiss.index_cpu_to_gpu(self._gpu_res, torch.cuda.current_device(), cpu)
                    self._index_on_gpu = True
                except Exception as e:  # noqa: BLE001 - a GPU failure must not stop training
                    warnings.warn(f"faiss GPU index failed ({e}); using the CPU index", stacklevel=2)
        return self._index

    def search(self, queries: Tensor, m: int) -> tuple[Tensor, Tensor]:
        """Top-m inner products: (sims [B,m] float32 CPU, ids [B,m] long CPU), best first."""
        m = min(int(m), len(self.bank))
        q = queries.detach().float()
        if self.backend == "faiss":
            sims, ids = self._faiss_index().search(q.cpu().contiguous().numpy(), m)
            return torch.from_numpy(sims), torch.from_numpy(ids).long()
        dev = q.device
        if dev not in self._bank_dev:
            self._bank_dev[dev] = self.bank.embeddings.to(dev)
        sims, ids = torch.topk(q @ self._bank_dev[dev].T, m, dim=1)
        return sims.cpu(), ids.cpu()

    # ---- mining
    def mine(self, queries: Tensor, target_ages_years: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Negatives [B,k,D] (no gradient, on the queries' device and dtype) and the stats dict."""
        ids, _, stats = self.mine_ids(queries, target_ages_years)
        neg = self.bank.embeddings[ids].to(device=queries.device, dtype=queries.dtype)
        return neg, stats

    def mine_ids(self, queries: Tensor, target_ages_years: Tensor) -> tuple[Tensor, Tensor, dict[str, float]]:
        """Bank row ids [B,k] (long, CPU), their similarities ⟨q, e⟩ [B,k] (padding too) and the stats."""
        if not (queries.ndim == 2 and queries.shape[1] == self.bank.dim):
            raise ValueError(f"queries must be [B,{self.bank.dim}], got {tuple(queries.shape)}")
        b = queries.shape[0]
        if not (b > 0):
            raise ValueError("mine() needs at least one query")
        if not (target_ages_years.shape == (b,)):
            raise ValueError(f"target ages must be [{b}], got {tuple(target_ages_years.shape)}")
        cfg, k = self.cfg, self.cfg.k
        tb = age_to_bin(target_ages_years.detach().cpu())
        rmax = max(cfg.radius, cfg.max_radius)
        full_r = torch.full((b,), rmax, dtype=torch.long)
        start, end = self.bank.covering_range(tb, full_r)
        if bool((end == start).any()):
            bad = target_ages_years.detach().cpu()[end == start].tolist()
            raise ValueError(f"impostor bank {self.bank.source}: no bin within ±{rmax} bins of target ages "
                             f"{[round(a, 2) for a in bad]} years "
                             f"(bins present: {list(self.bank.bin_counts())})")
        if self.backend == "random":
            return self._mine_random(queries, tb, b)

        sims, ids = self.search(queries, cfg.top_m)  # [B,M]
        mbin = self.bank.bin_ids[ids]
        dbin = (mbin - tb[:, None]).abs()
        in_ceiling = sims <= cfg.max_sim
        radius = torch.full((b,), cfg.radius, dtype=torch.long)
        lowered = torch.zeros(b, dtype=torch.long)
        floor = torch.full((b,), float(cfg.min_sim))

        def candidates() -> Tensor:
            return (dbin <= radius[:, None]) & (sims >= floor[:, None]) & in_ceiling

        valid = candidates()
        cand0 = valid.sum(1)
        while True:  # relaxation rounds (at most max_radius + min_sim/0.05), each vectorised over the batch
            need = valid.sum(1) < k
            widen = need & (radius < rmax)
            lower = need & ~widen & (floor > 0)
            if not bool((widen | lower).any()):
                break
            radius = radius + widen.long()
            lowered = lowered + lower.long()
            relaxed = torch.round((cfg.min_sim - MIN_SIM_STEP * lowered.double()) * 1e6) / 1e6
            floor = torch.where(lower, relaxed.float().clamp(min=0.0), floor)
            valid = candidates()

        # random permutation of the candidates: sort random keys, invalid ones last
        keys = torch.rand(sims.shape, generator=self.generator).masked_fill(~valid, 2.0)
        kk = min(k, sims.shape[1])
        order = keys.argsort(dim=1)[:, :kk]
        sel_valid = valid.gather(1, order)
        pad_ids = self._draw(self._target_range(tb)[:2], b=b)
        out_ids = pad_ids.clone()
        out_ids[:, :kk] = torch.where(sel_valid, ids.gather(1, order), pad_ids[:, :kk])
        # the loss uses the padded members' real embeddings, so their real similarity is what gets logged
        out_sims = torch.einsum("bd,bkd->bk", queries.detach().float().cpu(),
                                self.bank.embeddings.detach()[out_ids])
        out_sims[:, :kk] = torch.where(sel_valid, sims.gather(1, order), out_sims[:, :kk])
        stats = _sim_stats(out_sims)
        k_eff = float(sel_valid.sum(1).float().mean())
        stats.update(candidate_count=float(cand0.float().mean()), k_effective=k_eff, pad_count=k - k_eff,
                     band_min=float(floor.min()), band_max=float(cfg.max_sim),
                     radius_used=float(radius.max()))
        return out_ids, out_sims, stats

    def _draw(self, start_end: tuple[Tensor, Tensor], b: int) -> Tensor:
        """k uniform draws (with replacement) per row from rows ``[start, end)`` of the bank."""
        start, end = start_end
        u = torch.rand(b, self.cfg.k, generator=self.generator, dtype=torch.float64)
        n = (end - start).clamp(min=1)
        ids = start[:, None] + torch.minimum((u * n[:, None]).long(), n[:, None] - 1)
        return ids.clamp(max=len(self.bank) - 1)  # rows with an empty window never use their draws

    def _target_range(self, tb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rows ``[start, end)`` of the target bins ``tb ± cfg.radius``, widened only where they are empty
        (≤ max_radius rounds; :meth:`mine_ids` has checked a bin exists within it); and the radius used."""
        rmax = max(self.cfg.radius, self.cfg.max_radius)
        radius = torch.full(tb.shape, self.cfg.radius, dtype=torch.long)
        start, end = self.bank.covering_range(tb, radius)
        while bool((end == start).any()):
            radius = torch.where(end == start, (radius + 1).clamp(max=rmax), radius)
            start, end = self.bank.covering_range(tb, radius)
        return start, end, radius

    def _mine_random(self, queries: Tensor, tb: Tensor, b: int) -> tuple[Tensor, Tensor, dict[str, float]]:
        cfg = self.cfg
        start, end = self.bank.covering_range(tb, torch.full((b,), cfg.radius, dtype=torch.long))
        cand0 = end - start
        start, end, radius = self._target_range(tb)
        ids = self._draw((start, end), b)
        q = queries.detach().float().cpu()
        sims = torch.einsum("bd,bkd->bk", q, self.bank.embeddings[ids])
        stats = _sim_stats(sims)
        stats.update(candidate_count=float(cand0.float().mean()), k_effective=float(cfg.k), pad_count=0.0,
                     band_min=-1.0, band_max=1.0, radius_used=float(radius.max()))
        return ids, sims, stats


def _sim_stats(sims: Tensor) -> dict[str, float]:
    """Mean, population std and 50/75/90 % quantiles of the selected similarities."""
    s = sims.flatten().float()
    q = torch.quantile(s, torch.tensor([0.5, 0.75, 0.9]))
    return {"sim_mean": float(s.mean()), "sim_std": float(s.std(unbiased=False)), "sim_p50": float(q[0]),
            "sim_p75": float(q[1]), "sim_p90": float(q[2])}


# ----------------------------------------------------------------------------------------------- bench
def bench_mining(n: int = 70000, d: int = 512, queries: int = 8, repeats: int = 20, backend: str = "faiss",
                 profile: str = "soft060", seed: int = 0) -> dict[str, Any]:
    """Milliseconds per ``mine`` call on a synthetic bank of ``n`` random unit vectors (ages U[18, 80]).

    Queries are bank members plus noise (so the band holds some candidates) at target age 40.
    """
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    ages = 18 + 62 * torch.rand(n, generator=g)
    bank = ImpostorBank.from_embeddings(emb, ages, meta=default_meta(source="bench"), source="<bench>")
    miner = ImpostorMiner(bank, MinerConfig.from_profile(profile, backend=backend, seed=seed))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pick = torch.randint(0, len(bank), (queries,), generator=g)
    noise = 0.08 * torch.randn(queries, d, generator=g)
    q = torch.nn.functional.normalize(bank.embeddings[pick] + noise, dim=1)
    q, t = q.to(dev), torch.full((queries,), 40.0, device=dev)
    miner.mine(q, t)  # warm-up: builds the index
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _, stats = miner.mine(q, t)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t0))
    ts = torch.tensor(times)
    return {"backend": miner.backend, "index_on_gpu": bool(miner._index_on_gpu), "device": str(dev),
            "n": n, "d": d,
            "queries": queries, "repeats": repeats, "ms_mean": float(ts.mean()),
            "ms_std": float(ts.std()) if repeats > 1 else 0.0, "ms_min": float(ts.min()),
            "ms_p50": float(ts.median()), "candidate_count": stats["candidate_count"]}


__all__ = ["ImpostorBank", "ImpostorMiner", "MinerConfig", "PROFILES", "age_to_bin", "atomic_torch_save",
           "bench_mining", "bin_key", "default_meta"]

"""Impostor bank of the contrastive identity term (SPEC §5): the age-bin rule, the bank file format and
the in-memory :class:`ImpostorBank` that :mod:`agingnet.miner` mines from.

Bank file layout (``torch.save`` dict, loaded with ``weights_only=True``)::

    {"bins": {"lo-hi": Tensor[N_bin, D]},   # L2-normalized IR-SE50 embeddings
     "ages": {"lo-hi": Tensor[N_bin]},      # DEX ages in years
     "meta": {...}}                          # norm, embed, age_model, bin_size, min/max_age, created, source

Bin rule: ``lo = ⌊(age − 18)/5⌋·5 + 18``, ``hi = lo + 4`` → 13 bins ``18-22 … 78-82``; bin index
``i = ⌊(age − 18)/5⌋``. Ages outside [18, 80] are dropped when a bank is built.

In memory every bin is concatenated, sorted by bin, into one float32 ``[N, D]`` tensor with a bin-id vector
and bin offsets, so the members of the bins ``i0 … i1`` are the contiguous rows ``offsets[i0]:offsets[i1+1]``
and mining is tensor work only.

Empty bins in a file are *warned about and skipped* (a bank may legitimately hold no faces of 78-82);
they never turn into a silent zero loss: the miner widens its radius over them and raises ``ValueError``
when no member lies within ``max_radius`` bins of a target age.
"""

from __future__ import annotations

import os
import re
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from agingnet.io import atomic_torch_save

MIN_AGE = 18
MAX_AGE = 80
BIN_SIZE = 5
N_BINS = 13  # 18-22 … 78-82
NORM_TOL = 1e-2
_KEY_RE = re.compile(r"^(\d+)-(\d+)$")


# ----------------------------------------------------------------------------------------------- bins
def bin_key(index: int) -> str:
    """Bin name of bin index i: ``f"{18+5i}-{22+5i}"``."""
    lo = MIN_AGE + BIN_SIZE * int(index)
    return f"{lo}-{lo + BIN_SIZE - 1}"


def age_to_bin(ages: Tensor) -> Tensor:
    """Bin index ⌊(age − 18)/5⌋ (long, may fall outside [0, 12] for ages outside the bank)."""
    return torch.floor((ages.double() - MIN_AGE) / BIN_SIZE).long()


def parse_bin_key(key: str, source: str) -> int:
    """Bin index of a ``"lo-hi"`` key; ``ValueError`` naming the file and key when it breaks the rule."""
    m = _KEY_RE.match(str(key))
    if m is None:
        raise ValueError(f"impostor bank {source}: bin key {key!r} is not of the form 'lo-hi'")
    lo, hi = int(m.group(1)), int(m.group(2))
    idx, rem = divmod(lo - MIN_AGE, BIN_SIZE)
    if rem != 0 or hi != lo + BIN_SIZE - 1 or not 0 <= idx < N_BINS:
        raise ValueError(f"impostor bank {source}: bin key {key!r} is not one of 18-22, 23-27, …, 78-82")
    return idx


# ----------------------------------------------------------------------------------------------- bank
class ImpostorBank:
    """All bins of an impostor bank as one sorted ``[N, D]`` float32 tensor.

    ``embeddings`` [N,D] (rows sorted by bin), ``ages`` [N] years, ``bin_ids`` [N] long in [0, 12],
    ``offsets`` [13+1] with the members of bin i at rows ``offsets[i]:offsets[i+1]``.
    """

    def __init__(self, embeddings: Tensor, ages: Tensor, bin_ids: Tensor, meta: dict[str, Any] | None = None,
                 source: str = "<memory>"):
        self.source = str(source)
        if embeddings.ndim != 2 or ages.shape != (embeddings.shape[0],) or bin_ids.shape != ages.shape:
            shapes = (tuple(embeddings.shape), tuple(ages.shape), tuple(bin_ids.shape))
            raise ValueError(f"impostor bank {self.source}: expected embeddings [N,D], ages [N], bin ids [N]"
                             f", got {shapes}")
        if embeddings.shape[0] == 0:
            raise ValueError(f"impostor bank {self.source}: the bank holds no embeddings")
        bin_ids = bin_ids.long()
        if bool(((bin_ids < 0) | (bin_ids >= N_BINS)).any()):
            raise ValueError(f"impostor bank {self.source}: bin ids must lie in [0, {N_BINS - 1}]")
        _check_embeddings(embeddings, self.source, "embeddings")
        order = torch.argsort(bin_ids, stable=True)
        self.embeddings = embeddings.detach().float().cpu()[order].contiguous()
        self.ages = ages.detach().float().cpu()[order].contiguous()
        self.bin_ids = bin_ids.cpu()[order].contiguous()
        counts = torch.bincount(self.bin_ids, minlength=N_BINS)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        self.meta: dict[str, Any] = dict(meta or {})

    # ---- construction
    @classmethod
    def from_embeddings(cls, embeddings: Tensor, ages: Tensor, meta: dict[str, Any] | None = None,
                        source: str = "<memory>") -> ImpostorBank:
        """Bin by the age rule; rows with age outside [18, 80] (or non-finite) are dropped."""
        if not (embeddings.ndim == 2 and ages.shape == (embeddings.shape[0],)):
            raise ValueError(f"expected embeddings [N,D] and ages [N], got {tuple(embeddings.shape)} and "
                             f"{tuple(ages.shape)}")
        keep = torch.isfinite(ages) & (ages >= MIN_AGE) & (ages <= MAX_AGE)
        return cls(embeddings[keep], ages[keep], age_to_bin(ages[keep]), meta=meta, source=source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ImpostorBank:
        """Read and validate a bank file (see the module docstring for the layout)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"impostor bank file not found: {path}")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            from agingnet.io import describe_load_error

            raise ValueError(f"impostor bank {path}: cannot be read as a torch file "
                             f"({describe_load_error(e)})") from None
        return cls.from_dict(obj, source=str(path))

    @classmethod
    def from_dict(cls, obj: Any, source: str = "<memory>") -> ImpostorBank:
        """Validate the ``{"bins", "ages", "meta"}`` layout and concatenate the bins."""
        layout_ok = isinstance(obj, dict) and all(isinstance(obj.get(k), dict) for k in ("bins", "ages"))
        if not layout_ok:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"impostor bank {source}: expected a dict with 'bins' and 'ages' dicts (and "
                             f"'meta'), got {keys}")
        bins, ages = obj["bins"], obj["ages"]
        meta = obj.get("meta", {})
        if not isinstance(meta, dict):
            raise ValueError(f"impostor bank {source}: 'meta' must be a dict, got {type(meta).__name__}")
        if set(bins) != set(ages):
            raise ValueError(f"impostor bank {source}: 'bins' and 'ages' have different keys "
                             f"({sorted(set(bins) ^ set(ages))})")
        embs, ags, ids, dim = [], [], [], None
        for key in sorted(bins, key=lambda k: parse_bin_key(k, source)):
            idx = parse_bin_key(key, source)
            e, a = bins[key], ages[key]
            if not isinstance(e, Tensor) or e.ndim != 2 or not e.is_floating_point():
                raise ValueError(f"impostor bank {source}: bins[{key!r}] must be a float tensor [N,D], got "
                                 f"{tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__}")
            if not isinstance(a, Tensor) or a.shape != (e.shape[0],):
                raise ValueError(f"impostor bank {source}: ages[{key!r}] must be a tensor [{e.shape[0]}], "
                                 f"got {tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__}")
            if dim is not None and e.shape[1] != dim:
                raise ValueError(f"impostor bank {source}: bins[{key!r}] has dimension {e.shape[1]}, "
                                 f"others {dim}")
            dim = int(e.shape[1])
            if e.shape[0] == 0:
                warnings.warn(f"impostor bank {source}: bin {key!r} is empty and is skipped", stacklevel=2)
                continue
            _check_embeddings(e, source, f"bins[{key!r}]")
            if not bool(torch.isfinite(a).all()):
                raise ValueError(f"impostor bank {source}: ages[{key!r}] holds NaN/inf")
            off = int((age_to_bin(a) != idx).sum())
            if off:
                warnings.warn(f"impostor bank {source}: {off} ages in bin {key!r} lie outside it "
                              f"(the key decides the bin)", stacklevel=2)
            embs.append(e.float())
            ags.append(a.float())
            ids.append(torch.full((e.shape[0],), idx, dtype=torch.long))
        if not embs:
            raise ValueError(f"impostor bank {source}: every bin is empty")
        return cls(torch.cat(embs), torch.cat(ags), torch.cat(ids), meta=meta, source=source)

    # ---- persistence
    def to_dict(self) -> dict[str, Any]:
        """The file layout; only non-empty bins are written (each a compact copy, not a view)."""
        out: dict[str, Any] = {"bins": {}, "ages": {}, "meta": dict(self.meta)}
        for i in range(N_BINS):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            if b > a:
                out["bins"][bin_key(i)] = self.embeddings[a:b].clone()
                out["ages"][bin_key(i)] = self.ages[a:b].clone()
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Atomic write (temp file in the same folder + ``os.replace``)."""
        atomic_torch_save(self.to_dict(), path)

    # ---- queries
    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def bin_counts(self) -> dict[str, int]:
        """Members per non-empty bin, in age order."""
        c = (self.offsets[1:] - self.offsets[:-1]).tolist()
        return {bin_key(i): int(n) for i, n in enumerate(c) if n > 0}

    def covering_range(self, target_bins: Tensor, radius: Tensor) -> tuple[Tensor, Tensor]:
        """Row range ``[start, end)`` of the bins ``target ± radius`` (clipped to the bank), both [B] long.

        Empty (start == end) when no bin of the window exists.
        """
        lo = (target_bins - radius).clamp(0, N_BINS)
        hi = (target_bins + radius + 1).clamp(0, N_BINS)
        hi = torch.maximum(hi, lo)
        return self.offsets[lo], self.offsets[hi]

    def summary(self) -> list[dict[str, Any]]:
        """Per non-empty bin: key, count, mean/min/max age, min/max embedding norm."""
        rows = []
        norms = self.embeddings.norm(dim=1)
        for i in range(N_BINS):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            if b == a:
                continue
            ag = self.ages[a:b]
            rows.append({"bin": bin_key(i), "count": b - a, "mean_age": float(ag.mean()),
                         "min_age": float(ag.min()), "max_age": float(ag.max()),
                         "norm_min": float(norms[a:b].min()), "norm_max": float(norms[a:b].max())})
        return rows


def _check_embeddings(e: Tensor, source: str, name: str) -> None:
    if not bool(torch.isfinite(e).all()):
        raise ValueError(f"impostor bank {source}: {name} holds NaN/inf embeddings")
    dev = (e.float().norm(dim=1) - 1).abs()
    if e.shape[0] and float(dev.max()) > NORM_TOL:
        raise ValueError(f"impostor bank {source}: {name} is not L2-normalized "
                         f"(max |‖e‖ − 1| = {float(dev.max()):.3g} > {NORM_TOL})")


def default_meta(**extra: Any) -> dict[str, Any]:
    """The ``meta`` block of SPEC §5 (plus any extra bookkeeping)."""
    meta = {"norm": "l2", "embed": "ir_se50", "age_model": "dex", "bin_size": BIN_SIZE, "min_age": MIN_AGE,
            "max_age": MAX_AGE, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": ""}
    meta.update(extra)
    return meta


__all__ = ["BIN_SIZE", "MAX_AGE", "MIN_AGE", "N_BINS", "NORM_TOL", "ImpostorBank", "age_to_bin", "bin_key",
           "default_meta", "parse_bin_key"]

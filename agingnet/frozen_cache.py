"""Memo of frozen-network outputs on the training/validation input images (DEX age, IR-SE50 embedding, landmarks).

The frozen networks are pure functions of their input tensor, so an output can be reused whenever exactly the same
input tensor comes back (the same file or procedural face, same resize, same flip). The key is therefore the
*content* of the input: a BLAKE2b digest of the sample's tensor bytes, shape and dtype. A path string is not enough:
both synthetic sets name their images ``synthetic://{i}``, a folder's file can change between runs, and a train and
a val image may share a name.

Misses are computed one sample at a time, so a cached value never depends on which other images shared its batch
(batched CPU kernels may differ in the last bit with the batch size): a resumed run, whose cache starts empty and
fills in another order, gets bit-identical values. Entries stop being added past ``max_entries`` (the cache is an
optimisation, not a requirement; 20k IR-SE50 embeddings are ~40 MB).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import Tensor

Keys = list[str]


def content_keys(x: Tensor) -> Keys:
    """One hex digest per sample of ``x`` ([B, …]): BLAKE2b-128 of its dtype, shape and raw bytes."""
    flat = x.detach().to("cpu").contiguous()
    out = []
    for i in range(flat.shape[0]):  # hashing is per sample by nature; B is the training batch (2–8)
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{flat.dtype}|{tuple(flat.shape[1:])}|".encode())
        h.update(flat[i].numpy().tobytes())
        out.append(h.hexdigest())
    return out


class FrozenCache:
    """``get(kind, keys, x, fn)`` returns ``fn(x)`` with per-sample memoisation under ``(kind, key)``."""

    def __init__(self, enabled: bool = True, max_entries: int = 200_000):
        self.enabled, self.max_entries = bool(enabled), int(max_entries)
        self._store: dict[tuple[str, str], Tensor] = {}

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()

    def keys_for(self, x: Tensor) -> Keys | None:
        """Content keys of a batch of input images, or None when caching is off."""
        return content_keys(x) if self.enabled else None

    def get(self, kind: str, keys: Keys | None, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """``fn(x)`` without autograd; with keys, misses are computed sample by sample and stored (float32)."""
        if keys is None:
            with torch.no_grad():
                return fn(x)
        store = self._store
        miss = [i for i, k in enumerate(keys) if (kind, k) not in store]
        fresh: dict[str, Tensor] = {}
        with torch.no_grad():
            for i in miss:
                if keys[i] not in fresh:
                    fresh[keys[i]] = fn(x[i:i + 1]).float()[0]
        for k, v in fresh.items():
            if len(store) < self.max_entries:
                store[(kind, k)] = v
        return torch.stack([store.get((kind, k), fresh.get(k)) for k in keys]).to(x.device)

    def landmarks(self, detector, keys: Keys | None, x: Tensor) -> tuple[Tensor, Tensor]:
        """68 landmarks and validity of the input images (ROI-ID's source side), memoised like :meth:`get`."""
        def packed(xs: Tensor) -> Tensor:
            pts, valid = detector(xs)
            return torch.cat([pts.flatten(1).float(), valid.float()[:, None]], dim=1)

        out = self.get(f"landmarks:{type(detector).__name__}", keys, x, packed)
        return out[:, :-1].reshape(-1, 68, 2), out[:, -1] > 0.5

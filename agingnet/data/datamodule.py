"""Lightning data module over already-built datasets (Hydra instantiates them from nested ``_target_``s).

Batches are dicts ``{"image": [B,3,S,S] float32 in [-1,1], "age": [B] float32 years (NaN = unknown),
"path": list[str], "index": [B] int64}``. Training shuffles with a seeded generator (so a run's order is
reproducible) and drops the last partial batch by default; validation never shuffles and never flips.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset, default_collate

__all__ = ["AgingDataModule", "ResumableRandomSampler", "collate_faces"]


def collate_faces(items: list[dict[str, Any]]) -> dict[str, Any]:
    """``default_collate`` with ``age`` as float32 (Python floats would collate to float64)."""
    batch = default_collate(items)
    batch["age"] = batch["age"].to(torch.float32)
    return batch


class ResumableRandomSampler(Sampler):
    """An endless, resumable stream of ``(index, flip)`` for step-based training.

    Position p (samples drawn so far) maps to epoch e = p // n and offset p % n; epoch e's permutation and flip
    draws come from a generator seeded with (seed, e), so the stream is a pure function of (seed, p): a resume
    that restarts at p continues exactly where the interrupted run was. (Lightning restarts a plain DataLoader's
    epoch on resume; torch's RandomSampler has no position state.)

    Multi-process: with ``world_size`` W > 1 and per-rank ``batch_size`` B, the global stream is cut into blocks
    of B consecutive samples and rank r reads blocks r, r + W, r + 2W, …, so training step k of the W ranks
    together covers global positions [start + kBW, start + (k+1)BW): the same samples, in the same order, as one
    process with batch B·W, disjoint across ranks. ``start`` is a global position (a multiple of B·W).
    """

    def __init__(self, n: int, seed: int, flip_p: float = 0.5, start: int = 0, rank: int = 0,
                 world_size: int = 1, batch_size: int = 1):
        if n < 1:
            raise ValueError("ResumableRandomSampler needs a non-empty dataset")
        if not 0 <= int(rank) < int(world_size):
            raise ValueError(f"ResumableRandomSampler: rank {rank} outside world_size {world_size}")
        self.n, self.seed, self.flip_p, self.start = int(n), int(seed), float(flip_p), int(start)
        self.rank, self.world_size, self.batch_size = int(rank), int(world_size), int(batch_size)

    def epoch(self, e: int) -> tuple[list[int], list[bool]]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + e) % 2**63)
        perm = torch.randperm(self.n, generator=g).tolist()
        flips = (torch.rand(self.n, generator=g) < self.flip_p).tolist()
        return perm, flips

    def positions(self):
        """The global positions this rank reads, in order (endless)."""
        b, w = self.batch_size, self.world_size
        block = self.start + self.rank * b
        while True:
            yield from range(block, block + b)
            block += b * w

    def __iter__(self):
        cached = (-1, ([], []))
        for p in self.positions() if self.world_size > 1 else itertools.count(self.start):
            e, off = divmod(p, self.n)
            if cached[0] != e:
                cached = (e, self.epoch(e))
            perm, flips = cached[1]
            yield perm[off], flips[off]


def _unaugmented(ds: Dataset, role: str) -> Dataset:
    fn = getattr(ds, "without_augmentation", None)
    if fn is None:
        raise ValueError(
            f"{role} dataset {type(ds).__name__} has no without_augmentation(); use an agingnet "
            f"dataset (PersonalFolderDataset, FFHQFolderDataset, SyntheticFaces)"
        )
    return fn()


class AgingDataModule(L.LightningDataModule):
    """Train/val loaders for the aging recipes (SPEC §3, flags ``--batch_size``/``--workers``).

    Args:
        train, val: built datasets (either may be ``None`` when that stage is not run).
        batch_size: training batch size B; ``val_batch_size`` defaults to it.
        num_workers, pin_memory, persistent_workers: DataLoader options (persistence needs workers > 0).
        drop_last: drop the last partial training batch.
        seed: seed of the shuffling generator; ``None`` derives it from ``torch.initial_seed()`` (which
            ``seed_everything`` sets) when the loader is built.
        resumable: train from an endless :class:`ResumableRandomSampler` stream (step-based training; a resume
            continues at the same sample); ``False``: a plain shuffled loader with epochs.
    """

    def __init__(
        self,
        train: Dataset | None = None,
        val: Dataset | None = None,
        batch_size: int = 2,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        drop_last: bool = True,
        seed: int | None = None,
        resumable: bool = True,
    ):
        super().__init__()
        for name, v in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if v is not None and (isinstance(v, bool) or int(v) != v or v < 1):
                raise ValueError(f"AgingDataModule: {name} must be a positive integer, got {v!r}")
        if isinstance(num_workers, bool) or int(num_workers) != num_workers or num_workers < 0:
            raise ValueError(f"AgingDataModule: num_workers must be an integer >= 0, got {num_workers!r}")
        self.train_set, self.val_set = train, val
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size) if val_batch_size is not None else self.batch_size
        self.num_workers, self.pin_memory = int(num_workers), bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.drop_last, self.seed = bool(drop_last), seed
        self.resumable, self._start = bool(resumable), 0

    def _loader(
        self,
        ds: Dataset,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        generator: torch.Generator | None = None,
    ) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            generator=generator,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=collate_faces,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded generator), ``drop_last`` as configured, training augmentation of the dataset."""
        if self.train_set is None:
            raise ValueError("AgingDataModule: no train dataset configured (data.train)")
        n = len(self.train_set)  # type: ignore[arg-type]
        if self.drop_last and n < self.batch_size:
            raise ValueError(
                f"AgingDataModule: train dataset has {n} images, fewer than batch_size="
                f"{self.batch_size} with drop_last=True (no batch would be produced)"
            )
        seed = int(self.seed if self.seed is not None else torch.initial_seed()) % 2**63
        rank, world = self._rank_world()
        if not self.resumable:
            gen = torch.Generator().manual_seed(seed)
            if world == 1:
                return self._loader(self.train_set, self.batch_size, True, self.drop_last, gen)
            shard = DistributedSampler(self.train_set, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                       drop_last=self.drop_last)  # Lightning calls its set_epoch
            return DataLoader(self.train_set, batch_size=self.batch_size, sampler=shard, drop_last=self.drop_last,
                              num_workers=self.num_workers, pin_memory=self.pin_memory,
                              persistent_workers=self.persistent_workers, collate_fn=collate_faces)
        sampler = ResumableRandomSampler(n, seed, getattr(self.train_set, "flip_p", 0.0), start=self._start,
                                         rank=rank, world_size=world, batch_size=self.batch_size)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.persistent_workers,
                          collate_fn=collate_faces, generator=torch.Generator().manual_seed(seed))

    def _rank_world(self) -> tuple[int, int]:
        """(global rank, world size) of the attached trainer; (0, 1) without one."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def state_dict(self) -> dict[str, Any]:
        """The training stream's global position (samples consumed by finished training steps on all ranks),
        for exact resume."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        seen = int(getattr(module, "batches_seen", 0))
        world = self._rank_world()[1]
        return {"position": seen * self.batch_size * world, "batch_size": self.batch_size, "world_size": world}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("batch_size", self.batch_size)) != self.batch_size:
            raise ValueError(f"resume: the checkpoint was trained with batch_size={state['batch_size']}, "
                             f"the config has {self.batch_size}")
        world = self._rank_world()[1]
        if int(state.get("world_size", 1)) != world:
            raise ValueError(f"resume: the checkpoint was trained on {state['world_size']} process(es), this run "
                             f"has {world}")
        self._start = int(state.get("position", 0))

    def val_dataloader(self) -> DataLoader | list:
        """Fixed order, no flips, every sample kept; an empty list when no val dataset is configured."""
        if self.val_set is None:
            return []
        ds = _unaugmented(self.val_set, "val")
        rank, world = self._rank_world()
        if world > 1:  # rank r: val batches r, r+W, … of the 1-process order (metrics are reduced across ranks)
            n, b = len(ds), self.val_batch_size  # type: ignore[arg-type]
            if n <= (world - 1) * b:
                raise ValueError(f"AgingDataModule: the val dataset has {n} images: with val_batch_size={b} "
                                 f"the last of {world} processes would get none")
            ds = Subset(ds, [i for i in range(n) if (i // b) % world == rank])
        return self._loader(ds, self.val_batch_size, False, False)

    def personal_bank_dataset(self) -> Dataset:
        """The training images without augmentation (same files, ``train=False``), for the NN-ID bank."""
        if self.train_set is None:
            raise ValueError("AgingDataModule: personal_bank_dataset needs a train dataset (data.train)")
        return _unaugmented(self.train_set, "train")

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the train set's content key: file paths, sizes, mtimes (synthetic: parameters)."""
        if self.train_set is None:
            raise ValueError("AgingDataModule: fingerprint needs a train dataset (data.train)")
        fn = getattr(self.train_set, "fingerprint", None)
        if fn is None:
            raise ValueError(
                f"train dataset {type(self.train_set).__name__} has no fingerprint(); use an agingnet dataset"
            )
        return hashlib.sha256(f"train:{fn()}".encode()).hexdigest()

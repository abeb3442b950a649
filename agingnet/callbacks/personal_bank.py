"""Build the personal (NN-ID) bank from the training images at fit start (SPEC §5).

Bank = {(f(x_i), a_i/100)} over the un-augmented personal training images x_i (and, with ``include_flips``,
{(f(flip(x_i)), a_i/100)} as well), f = ``pl_module.frozen.embed_face``. It is rebuilt whenever
``trainer.datamodule.fingerprint()`` differs from the one it was built from (checked at each train epoch
start).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.data import DataLoader


def _nn_id_term(pl_module: Any):
    terms = getattr(getattr(pl_module, "loss", None), "terms", None)
    return terms["nn_id"] if terms is not None and "nn_id" in terms else None


@torch.no_grad()
def embed_personal_set(dataset, embed_fn, batch_size: int = 16, include_flips: bool = True,
                       device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """(embeddings [N·(1+flips), D], age keys [same] = age/100) of a dataset of {"image", "age"} dicts."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    embs, keys = [], []
    for batch in loader:
        img = batch["image"].to(device)
        if not (img.ndim == 4 and img.shape[1] == 3):
            raise ValueError(f"personal bank images must be [B,3,H,W], got {tuple(img.shape)}")
        key = torch.as_tensor(batch["age"], dtype=torch.float32).reshape(-1).to(device) / 100.0
        embs.append(embed_fn(img))
        keys.append(key)
        if include_flips:
            embs.append(embed_fn(img.flip(-1)))
            keys.append(key)
    if not embs:
        raise ValueError("personal bank: the personal dataset is empty")
    return torch.cat(embs).float(), torch.cat(keys)


class PersonalBankCallback(Callback):
    """Fill ``pl_module.loss.terms["nn_id"]`` with the personal bank (no-op without that term)."""

    def __init__(self, batch_size: int = 16, include_flips: bool = True):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"PersonalBankCallback: batch_size must be ≥ 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.include_flips = bool(include_flips)
        self.fingerprint: str | None = None
        self.builds = 0

    def _maybe_build(self, trainer: Any, pl_module: Any, force: bool) -> None:
        term = _nn_id_term(pl_module)
        if term is None:
            return
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "personal_bank_dataset"):
            raise RuntimeError("PersonalBankCallback: nn_id needs trainer.datamodule.personal_bank_dataset() "
                               "(an agingnet AgingDataModule)")
        fp = str(dm.fingerprint())
        if not force and fp == self.fingerprint and term.has_bank:
            return
        emb, keys = embed_personal_set(dm.personal_bank_dataset(), pl_module.frozen.embed_face,
                                       self.batch_size, self.include_flips, pl_module.device)
        term.set_bank(emb, keys, fp)
        self.fingerprint = fp
        self.builds += 1

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._maybe_build(trainer, pl_module, force=True)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._maybe_build(trainer, pl_module, force=False)

"""What a training run in the aging world needs before it starts, written when missing (``world.*`` config keys).

* ``world.actor: I`` (an identity ≥ 100000): the actor's personal set at ``world.actor_dir``
  (``DIR/train``, ``DIR/test``, ``DIR/world.json``: :func:`agingnet.world.data.write_actor` with
  ``world.actor_seed``); the run's ``data.train.root`` / ``data.val.root`` point there.
* ``world.bank: true``: the world's impostor bank at ``miner.bank_path``, built with the real command line
  (``python -m agingnet.bank build --images POP --arcface world --dex world``) on a world population of
  ``world.bank_population`` photos written beside it (:func:`agingnet.world.data.write_population`), and built
  again when the world networks it was embedded by are no longer the shipped ones.

Only the first process of a multi-process run writes; the others wait for the folders to appear.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, open_dict

from agingnet.distributed import is_env_rank_zero
from agingnet.io import file_sha256
from agingnet.world.data import read_world_json, write_actor, write_population
from agingnet.world.render import ACTOR_BASE, check_identity

log = logging.getLogger(__name__)
WAIT_S = 600  # how long another process waits for rank 0 to write a missing folder


def _wait_for(path: Path, ready: Callable[[], bool] | None = None) -> None:
    """Wait until ``path`` exists (and ``ready()`` holds)."""
    deadline = time.monotonic() + WAIT_S
    while not (path.exists() and (ready is None or ready())):
        if time.monotonic() > deadline:
            raise FileNotFoundError(f"{path}: not written by rank 0 within {WAIT_S} s")
        time.sleep(0.5)


def check_world(cfg: DictConfig) -> None:
    """The ``world.*`` keys, checked before anything is written (the run's preflight)."""
    world = cfg.get("world") or {}
    if world.get("actor") is not None:
        identity = check_identity(world.actor)
        if identity < ACTOR_BASE:
            raise ValueError(f"world.actor={identity}: actors are identities >= {ACTOR_BASE} (smaller ones are "
                             f"the training population)")
    if world.get("bank"):
        n = world.get("bank_population")
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"world.bank_population must be an integer >= 2, got {n!r}")


def prepare_actor(cfg: DictConfig) -> Path | None:
    """Write the actor's folders when missing and point the data config at them; returns the folder."""
    world = cfg.get("world") or {}
    if world.get("actor") is None:
        return None
    check_world(cfg)
    identity = int(world.actor)
    folder = Path(world.actor_dir)
    if not (folder / "world.json").is_file():
        if is_env_rank_zero():
            log.info("world actor %d: writing its personal set to %s", identity, folder)
            write_actor(identity, folder, seed=int(world.get("actor_seed", 0)))
        else:
            _wait_for(folder / "world.json")
    meta = read_world_json(folder)
    if meta["identity"] != identity:
        raise ValueError(f"{folder / 'world.json'}: holds actor {meta['identity']}, but world.actor={identity}")
    with open_dict(cfg):
        cfg.data.train.root = str(folder / "train")
        cfg.data.val.root = str(folder / "test")
    return folder


def _world_nets_sha256() -> dict[str, str]:
    """The sha256 of the world identity and age networks a world bank is built with (``bank.meta.nets_sha256``)."""
    from agingnet.world.weights import weight_path

    return {k: file_sha256(weight_path(k)) for k in ("arcface", "dex")}


def _bank_is_current(path: Path, nets: dict[str, str]) -> bool:
    if not path.is_file():
        return False
    meta = torch.load(path, map_location="cpu", weights_only=True).get("meta", {})
    return meta.get("nets_sha256") == nets


def prepare_bank(cfg: DictConfig) -> Path | None:
    """Build the world impostor bank at ``miner.bank_path`` with the bank CLI when it is missing, or when it was
    embedded by other world networks than today's (e.g. after ``python -m agingnet.world pretrain``, or a bank
    from before the bank recorded them): a stale bank would mine impostors in another embedding space."""
    world = cfg.get("world") or {}
    if not world.get("bank"):
        return None
    path = Path(cfg.miner.bank_path)
    nets = _world_nets_sha256()
    if _bank_is_current(path, nets):
        return path
    if not is_env_rank_zero():
        _wait_for(path, ready=lambda: _bank_is_current(path, nets))
        return path
    if path.is_file():
        log.warning("world bank %s: embedded by other world networks than the shipped ones; rebuilding it", path)
    from agingnet.bank import main as bank_main

    pop = path.parent / f"{path.stem}_population"
    if not (pop / "world.json").is_file():
        log.info("world bank: writing a population of %d photos to %s", int(world.bank_population), pop)
        write_population(int(world.bank_population), pop, seed=int(world.get("bank_seed", 0)), min_age=15,
                         max_age=80)
    log.info("world bank: python -m agingnet.bank build --images %s --arcface world --dex world --out %s", pop, path)
    rc = bank_main(["build", "--images", str(pop), "--arcface", "world", "--dex", "world", "--out", str(path),
                    "--device", "cpu", "--quiet"])
    if rc != 0:
        raise ValueError(f"world bank: 'python -m agingnet.bank build' on {pop} failed (exit {rc})")
    return path


__all__ = ["check_world", "prepare_actor", "prepare_bank"]

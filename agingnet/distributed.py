"""Multi-process (Lightning DDP) helpers: the rank before the Trainer exists, per-rank seeds, input checks.

Inside ``Trainer.fit`` the rank comes from the trainer (``trainer.global_rank``, ``trainer.is_global_zero``).
Before it, ``python -m agingnet.train`` already runs once per rank (Lightning's subprocess launcher re-runs the
command with ``LOCAL_RANK`` set; SLURM and torchrun start every rank themselves), so the few side effects of
``train()`` before fit (``config.yaml``, the debug impostor bank) read the rank from the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

#: environment variables that hold a process's rank, in Lightning's order of precedence (RANK: torchrun;
#: LOCAL_RANK: Lightning's subprocess launcher; SLURM_PROCID: srun / submitit)
_RANK_KEYS = ("RANK", "LOCAL_RANK", "SLURM_PROCID")


def env_rank() -> int:
    """This process's global rank as the launcher set it in the environment (0 when none is set). A process
    on a node other than the first (``NODE_RANK`` > 0) never counts as rank 0."""
    for key in _RANK_KEYS:
        v = os.environ.get(key)
        if v not in (None, ""):
            rank = int(v)
            if key == "LOCAL_RANK" and rank == 0 and int(os.environ.get("NODE_RANK", "0") or 0) > 0:
                return -1  # rank 0 of a later node: not the global rank 0 (exact number unknown here)
            return rank
    return 0


def is_env_rank_zero() -> bool:
    return env_rank() == 0


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s private streams: ``seed`` itself on rank 0 (a 1-process run is unchanged),
    ``(seed + rank · 0x9E3779B97F4A7C15) mod 2⁶³`` on the others (distinct, reproducible from (seed, rank))."""
    return int(seed) if int(rank) == 0 else (int(seed) + int(rank) * 0x9E3779B97F4A7C15) % 2**63


def check_devices(trainer_cfg: Mapping[str, Any]) -> None:
    """Refuse ``trainer.devices`` larger than what this machine has (one line naming the key and the count)."""
    devices = trainer_cfg.get("devices", 1)
    accel = str(trainer_cfg.get("accelerator", "auto"))
    if isinstance(devices, (list, tuple)) or (hasattr(devices, "__len__") and not isinstance(devices, str)):
        want = len(devices)
    elif isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        want = devices
    else:  # "auto", -1, "0,1": Lightning resolves them against what exists
        return
    gpu = accel in ("gpu", "cuda") or (accel == "auto" and torch.cuda.is_available())
    if gpu:
        have = torch.cuda.device_count()
        if want > have:
            raise ValueError(f"trainer.devices={want} but this machine has {have} visible GPU(s) "
                             f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                             f"set trainer.devices≤{have} or add nodes with trainer.num_nodes")
    elif accel == "cpu":
        have = os.cpu_count() or 1
        if want > have:
            raise ValueError(f"trainer.devices={want} CPU processes but this machine has {have} CPU core(s); "
                             f"set trainer.devices≤{have}")


def checkpoint_world_size(ckpt: Mapping[str, Any]) -> int:
    """The number of processes a Lightning ``.ckpt`` of agingnet was trained with (1 for older files)."""
    return int((ckpt.get("agingnet") or {}).get("world_size", 1))


def check_resume_world_size(path: str | os.PathLike, world_size: int) -> None:
    """A ``resume_from`` written with another number of processes is refused: its stream position, RNG
    streams (one per rank) and global batch belong to that world size. One line naming both sizes."""
    from agingnet.callbacks.resume import read_lightning_checkpoint

    have = checkpoint_world_size(read_lightning_checkpoint(path))
    if have != int(world_size):
        raise ValueError(f"resume_from: {path} was written by a run on {have} process(es) (devices × num_nodes), "
                         f"this run has {world_size}; resume with the same trainer.devices/num_nodes, or start a "
                         f"new run from its weights with init_from=…")


def gather_rng_states(states: Mapping[str, torch.Tensor], trainer: Any) -> list[dict[str, torch.Tensor]]:
    """Every rank's ``{name: generator state}`` (uint8 tensors of the same size on every rank), as a list
    indexed by rank; a collective on more than one process, so every rank must call it (Lightning builds the
    checkpoint dict on every rank and writes rank 0's). The current CUDA device's state is added as
    ``cuda_rng`` when CUDA is in use."""
    states = dict(states)
    dev = getattr(getattr(trainer, "strategy", None), "root_device", torch.device("cpu"))
    if dev.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(dev)
    world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
    if world <= 1:
        return [{k: v.clone() for k, v in states.items()}]
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
    for name in sorted(states):
        every = trainer.strategy.all_gather(states[name].to(dev))  # [W, n]
        for r in range(world):
            out[r][name] = every[r].cpu().clone()
    return out


def zero_loss(module: torch.nn.Module) -> torch.Tensor:
    """0 · Σ p over the trainable parameters: a loss whose backward gives every parameter an exact zero
    gradient. Under DDP a rank cannot skip its backward (the gradient all-reduce waits for it), so a step all
    ranks agreed to skip returns this and drops the gradients before the optimizer step."""
    return sum((p.sum() * 0.0 for p in module.parameters() if p.requires_grad), torch.zeros(()))


def any_rank(flag: bool | torch.Tensor, trainer: Any) -> bool:
    """True when ``flag`` is true on at least one rank (an all-reduce on more than one process)."""
    t = torch.as_tensor(flag, dtype=torch.float32).reshape(())
    if trainer is None or int(getattr(trainer, "world_size", 1)) <= 1:
        return bool(t)
    dev = getattr(trainer.strategy, "root_device", t.device)
    return bool(trainer.strategy.reduce(t.to(dev), reduce_op="sum") > 0)


def mean_over_ranks(logs: Mapping[str, torch.Tensor | float], trainer: Any) -> dict[str, torch.Tensor]:
    """The mean over ranks of each logged value, over the ranks that logged it; on one process ``logs`` as is.

    A loss term's stats depend on the batch (the contrastive term logs its miner's stats only when a target
    age falls in its window, NN-ID its similarity only when a neighbour is in range), so under DDP the ranks
    may hold different keys. Lightning's ``sync_dist`` reduces key by key and would then pair different keys'
    collectives (gloo: "collective mismatch", a hang on NCCL). Here the ranks first agree on the union of
    keys (one ``all_gather_object``) and reduce [Σ value, count] for all of them in one all-reduce. Every rank
    returns the same dict; log it without ``sync_dist``. Written here because Lightning and torchmetrics both
    need the key set fixed in advance."""
    world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
    if world <= 1:
        return {k: torch.as_tensor(v) for k, v in logs.items()}
    import torch.distributed as dist

    key_lists: list[list[str] | None] = [None] * world
    dist.all_gather_object(key_lists, sorted(logs))
    keys = sorted({k for ks in key_lists for k in (ks or [])})
    dev = getattr(trainer.strategy, "root_device", torch.device("cpu"))
    mine = torch.tensor([k in logs for k in keys], device=dev)
    values = [torch.as_tensor(logs[k], device=dev).double().mean() for k in keys if k in logs]
    acc = torch.zeros(2, len(keys), dtype=torch.float64, device=dev)
    if values:  # one device-side scatter: no host sync per key
        acc[0, mine] = torch.stack(values)
    acc[1] = mine.double()
    dist.all_reduce(acc, op=dist.ReduceOp.SUM)
    return {k: (acc[0, i] / acc[1, i]).float().cpu() for i, k in enumerate(keys) if acc[1, i] > 0}


__all__ = ["any_rank", "check_devices", "check_resume_world_size", "checkpoint_world_size", "env_rank",
           "gather_rng_states", "is_env_rank_zero", "mean_over_ranks", "rank_seed", "zero_loss"]

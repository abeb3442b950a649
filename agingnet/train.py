"""``python -m agingnet.train [experiment=…] [key=value …]``: compose ``conf/train.yaml`` and train.

Thin entry point: :func:`main` is the Hydra app, :func:`train` does the work on a composed config, so tests and
notebooks call ``train(cfg)`` directly.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.experimental.callback import Callback as HydraCallback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from agingnet.config import CONFIG_DIR, DISK_ERRNOS, register_resolvers, user_errors
from agingnet.distributed import check_devices, check_resume_world_size, is_env_rank_zero
from agingnet.io import atomic_write_text, remove_stale_temporaries
from agingnet.module import RunDiverged
from agingnet.world import run_setup as world_setup

_RUN_ERRORS = (RunDiverged, PermissionError)

log = logging.getLogger("agingnet.train")

register_resolvers()


def _missing_roots(data_cfg: DictConfig) -> list[str]:
    out = []
    for split in ("train", "val"):
        node = data_cfg.get(split)
        if node is not None and "root" in node and node.root is not None and not Path(node.root).is_dir():
            out.append(str(node.root))
    return out


def debug_world_actor(cfg: DictConfig) -> None:
    """``debug=tiny`` on an experiment of personal photos (``data=personal``) whose folders are missing: the run
    trains on the aging world's actor ``debug_world_actor`` instead (``world.actor``, written when missing), so
    e.g. ``experiment=phase3_oneshot_40 debug=tiny`` personalizes on one person's photos of known ages."""
    actor = cfg.get("debug_world_actor")
    if actor is None or (cfg.get("world") or {}).get("actor") is not None:
        return
    personal = str((cfg.data.get("train") or {}).get("_target_", "")).endswith("PersonalFolderDataset")
    missing = _missing_roots(cfg.data) if personal else []
    if not missing:
        return
    log.warning("data folders %s not found: debug run uses the aging world's actor %s instead", missing, actor)
    with open_dict(cfg):
        cfg.world.actor = actor


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The configured datamodule; under ``debug=tiny`` missing data folders fall back to synthetic faces (personal
    photos have already been replaced by a world actor's, :func:`debug_world_actor`)."""
    data_cfg = cfg.data
    missing = _missing_roots(data_cfg)
    if missing and cfg.get("debug_synthetic_fallback", False):
        log.warning("data folders %s not found: debug run uses synthetic faces instead", missing)
        data_cfg = OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "data" / "synthetic.yaml"),
                                   {"batch_size": data_cfg.batch_size, "seed": cfg.seed})
    return instantiate(data_cfg, _convert_="object")


def prepare_bank(cfg: DictConfig) -> None:
    """Tiny/demo runs without an impostor bank get a random one (``miner.synthetic_bank`` members per bin)."""
    if "contrastive_id" not in cfg.loss or not cfg.loss.contrastive_id or cfg.loss.contrastive_id.weight == 0:
        return
    path = Path(cfg.miner.bank_path)
    n = int(cfg.miner.get("synthetic_bank", 0) or 0)
    if path.is_file() or n <= 0:
        return
    from agingnet.impostor_bank import ImpostorBank

    dim = int(cfg.model.frozen.arcface.embed_dim)
    g = torch.Generator().manual_seed(int(cfg.seed))
    ages = torch.arange(18, 81, dtype=torch.float32).repeat_interleave(max(1, n // 5))  # the bank's 18–80
    emb = torch.nn.functional.normalize(torch.randn(len(ages), dim, generator=g), dim=1)
    path = Path(cfg.paths.output_dir) / "banks" / "synthetic_bank.pt"
    if is_env_rank_zero():  # DDP: rank 0 writes it before fit; the others check it exists (RankSetup)
        ImpostorBank.from_embeddings(emb, ages, meta={"source": "synthetic (debug)", "embed": "random"}).save(path)
    with open_dict(cfg):
        cfg.miner.bank_path = str(path)
    log.info("no impostor bank at the configured path: wrote a random one to %s", path)


def check_output_dir(cfg: DictConfig, output_dir: str | os.PathLike | None = None) -> None:
    """Refuse a run folder that already holds checkpoints, unless this is a resume of that very run
    (``resume_from`` inside its ``checkpoints/``): a run never writes into another run's folder."""
    out = Path(output_dir if output_dir is not None else cfg.paths.output_dir)
    ckpt_dir = out / "checkpoints"
    if not is_env_rank_zero():  # DDP: the other ranks join rank 0's run folder, which rank 0 has checked
        return
    if not (ckpt_dir.is_dir() and any(p for p in ckpt_dir.iterdir() if not p.name.startswith("."))):
        return
    resume = cfg.get("resume_from")
    if resume is None:
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints: choose a new run folder "
                              f"(hydra.run.dir=…) or resume with resume_from=…")
    if Path(resume).resolve().parent != ckpt_dir.resolve():
        raise FileExistsError(f"{ckpt_dir} holds another run's checkpoints: resume_from={resume} continues in its "
                              f"own run folder ({Path(resume).resolve().parent.parent}) or in a new one")


def _number(cfg: DictConfig, key: str, kind: type, lo: float | None = None, lo_open: bool = False) -> None:
    """``cfg[key]`` must be a finite ``kind`` (int or float) ≥ lo (> lo when ``lo_open``)."""
    v = OmegaConf.select(cfg, key, throw_on_missing=False)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if ok and kind is int:
        ok = float(v).is_integer()
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if not ok:
        want = "an integer" if kind is int else "a number"
        if lo is not None:
            want += f" {'>' if lo_open else '≥'} {lo:g}"
        raise ValueError(f"{key}={v!r}: must be {want}")


def validate_config(cfg: DictConfig, output_dir: str | os.PathLike | None = None) -> None:
    """Every check that needs no network or data, run before anything is written (see docs/RELIABILITY.md):
    numeric keys, the run folder (no other run's checkpoints, writable), resume_from/init_from files and the
    resume's compatibility (experiment, stage, architecture). Raises one ``ValueError``/``FileExistsError``/
    ``FileNotFoundError`` naming the key or file."""
    _number(cfg, "seed", int)
    _number(cfg, "lr", float, 0.0, lo_open=True)
    _number(cfg, "cycle_lambda", float, 0.0)
    _number(cfg, "val_interval", int, 1)
    _number(cfg, "val_max_batches", int, 0)  # 0: no validation (0 means 0)
    _number(cfg, "image_interval", int, 1)
    _number(cfg, "trainer.max_steps", int, -1)
    _number(cfg, "max_consecutive_skips", int, 0)
    world_setup.check_world(cfg)
    out = Path(output_dir if output_dir is not None else cfg.paths.output_dir)
    check_output_dir(cfg, out)
    if cfg.get("resume_from"):
        if not Path(cfg.resume_from).is_file():
            raise FileNotFoundError(f"resume_from: no such checkpoint: {cfg.resume_from}")
        from agingnet.callbacks.resume import check_resume_compatible

        check_resume_compatible(cfg.resume_from, cfg)
    if cfg.get("init_from") and not Path(cfg.init_from).is_file():
        raise FileNotFoundError(f"init_from: no such checkpoint: {cfg.init_from}")
    try:  # last: a refused run leaves no empty folder behind
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe.{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"run folder {out}: cannot be written ({e.strerror})") from None


def _multi_process(trainer_cfg: DictConfig) -> bool:
    """Whether this run has (or is one of) several processes: a DDP child, or devices × nodes > 1."""
    if "LOCAL_RANK" in os.environ:
        return True
    devices, nodes = trainer_cfg.get("devices", 1), int(trainer_cfg.get("num_nodes", 1) or 1)
    if isinstance(devices, str):
        n = len([d for d in devices.split(",") if d.strip()]) if "," in devices else (
            int(devices) if devices.strip().lstrip("-").isdigit() else 1)
    elif isinstance(devices, int):
        n = devices
    else:
        n = len(devices)
    return n * nodes > 1 or n == -1


def check_bank(cfg: DictConfig) -> None:
    """The impostor bank of contrastive ID is read and checked against the identity network at setup, not at
    the first step: layout and finite, L2-normalized rows (:meth:`ImpostorBank.load`) and the embedding size."""
    if "contrastive_id" not in cfg.loss or not cfg.loss.contrastive_id or cfg.loss.contrastive_id.weight == 0:
        return
    from agingnet.impostor_bank import ImpostorBank

    if not Path(cfg.miner.bank_path).is_file() and _multi_process(cfg.trainer):
        return  # DDP: RankSetup gathers which ranks miss the file and says so in one line on every rank
    bank = ImpostorBank.load(cfg.miner.bank_path)
    dim = OmegaConf.select(cfg, "model.frozen.arcface.embed_dim", default=None)
    if dim is not None and bank.dim != int(dim):
        raise ValueError(f"impostor bank {cfg.miner.bank_path}: embeddings have size {bank.dim} but the identity "
                         f"network (model.frozen.arcface.embed_dim) gives {int(dim)}; build the bank with the same "
                         f"network (python -m agingnet.bank build …)")


class PreflightCallback(HydraCallback):
    """Hydra callback: :func:`validate_config` on the run folder before Hydra creates it and writes ``.hydra/``.

    Hydra 1.3 writes ``<run>/.hydra/config.yaml`` in ``run_job`` before ``on_job_start`` and before the task
    function runs; ``on_run_start`` is the last hook before that, and has the composed config with
    ``hydra.run.dir``. Bad input stops here with one line and exit 1 (``SystemExit`` passes through Hydra)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if os.environ.get("AGINGNET_NO_PREFLIGHT") == "1":
            return
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines would precede the error
        with user_errors("agingnet.train", extra=_RUN_ERRORS):
            validate_config(config, OmegaConf.select(config, "hydra.run.dir"))


def instantiate_group(group: DictConfig | None, name: str) -> list[Any]:
    """Instantiate every entry of a ``{key: {_target_: …}}`` group; entries set to null are off, and entries
    left with settings but no ``_target_`` (their option was switched off) are skipped with a warning."""
    out = []
    for key, node in (group or {}).items():
        if node is None:
            continue
        if "_target_" not in node:
            log.warning("%s.%s has settings but no _target_: skipped", name, key)
            continue
        out.append(instantiate(node))
    return out


def train(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Train with a composed config; returns the final callback metrics as floats and the run folder.
    ``extra_callbacks`` are added to the configured ones (tests, notebooks)."""
    validate_config(cfg)
    check_devices(cfg.trainer)
    out = Path(cfg.paths.output_dir)
    if is_env_rank_zero():  # DDP: rank 0 owns the run folder's files
        remove_stale_temporaries(out / "checkpoints")
    debug_world_actor(cfg)
    world_setup.prepare_actor(cfg)  # world.actor / world.bank: the aging world's data, written when missing
    world_setup.prepare_bank(cfg)
    prepare_bank(cfg)
    check_bank(cfg)
    L.seed_everything(cfg.seed, workers=True)
    out.mkdir(parents=True, exist_ok=True)
    if is_env_rank_zero() and not (cfg.get("resume_from") and (out / "config.yaml").is_file()):
        atomic_write_text(OmegaConf.to_yaml(cfg, resolve=True), out / "config.yaml")

    datamodule = build_datamodule(cfg)
    model = instantiate(cfg.model, loss=cfg.loss, _recursive_=False)
    callbacks = instantiate_group(cfg.get("callbacks"), "callbacks") + list(extra_callbacks)
    loggers = instantiate_group(cfg.get("logger"), "logger")
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if cfg.get("resume_from"):
        check_resume_world_size(cfg.resume_from, trainer.world_size)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("resume_from"))
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        where = e.filename or (out / "checkpoints")
        raise OSError(e.errno, f"could not write {where} ({e.strerror}); the checkpoints written before in "
                               f"{out / 'checkpoints'} are intact") from e
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    log.info("outputs in %s", out)
    if trainer.is_global_zero:
        print(f"[agingnet] run folder: {out}\n[agingnet] TensorBoard: tensorboard --logdir {out / 'tensorboard'}")
    return {"metrics": metrics, "output_dir": str(out), "abs_step": model.abs_step}


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    with user_errors("agingnet.train", extra=_RUN_ERRORS):
        result = train(cfg)
    value = result["metrics"].get(cfg.get("optimized_metric", "val/total"))
    return value


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    main()

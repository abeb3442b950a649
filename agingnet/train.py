"""``python -m agingnet.train [experiment=…] [key=value …]``: compose ``conf/train.yaml`` and train.

Thin entry point: :func:`main` is the Hydra app, :func:`train` does the work on a composed config, so tests and
notebooks call ``train(cfg)`` directly.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from agingnet.config import CONFIG_DIR, register_resolvers, user_errors
from agingnet.distributed import check_devices, check_resume_world_size, is_env_rank_zero

log = logging.getLogger("agingnet.train")

register_resolvers()


def _missing_roots(data_cfg: DictConfig) -> list[str]:
    out = []
    for split in ("train", "val"):
        node = data_cfg.get(split)
        if node is not None and "root" in node and node.root is not None and not Path(node.root).is_dir():
            out.append(str(node.root))
    return out


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The configured datamodule; under ``debug=tiny`` missing data folders fall back to synthetic faces."""
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
    from agingnet.miner import ImpostorBank

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


def check_output_dir(cfg: DictConfig) -> None:
    """Refuse to train into a run folder that already holds checkpoints (nothing is overwritten)."""
    ckpt_dir = Path(cfg.paths.output_dir) / "checkpoints"
    if cfg.get("resume_from") is None and is_env_rank_zero() and ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints: choose a new run folder "
                              f"(hydra.run.dir=…) or resume with resume_from=…")


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


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train with a composed config; returns the final callback metrics as floats and the run folder."""
    L.seed_everything(cfg.seed, workers=True)
    check_devices(cfg.trainer)
    check_output_dir(cfg)
    if cfg.get("resume_from") and not Path(cfg.resume_from).is_file():
        raise FileNotFoundError(f"resume_from: no such checkpoint: {cfg.resume_from}")
    if cfg.get("init_from") and not Path(cfg.init_from).is_file():
        raise FileNotFoundError(f"init_from: no such checkpoint: {cfg.init_from}")
    prepare_bank(cfg)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_env_rank_zero():
        OmegaConf.save(cfg, out / "config.yaml", resolve=True)

    datamodule = build_datamodule(cfg)
    model = instantiate(cfg.model, loss=cfg.loss, _recursive_=False)
    callbacks = instantiate_group(cfg.get("callbacks"), "callbacks")
    loggers = instantiate_group(cfg.get("logger"), "logger")
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if cfg.get("resume_from"):
        from agingnet.callbacks.resume import check_resume_compatible

        check_resume_compatible(cfg.resume_from, cfg)
        check_resume_world_size(cfg.resume_from, trainer.world_size)
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("resume_from"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    log.info("outputs in %s", out)
    if trainer.is_global_zero:
        print(f"[agingnet] run folder: {out}\n[agingnet] TensorBoard: tensorboard --logdir {out / 'tensorboard'}")
    return {"metrics": metrics, "output_dir": str(out), "abs_step": model.abs_step}


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    with user_errors("agingnet.train"):
        result = train(cfg)
    value = result["metrics"].get(cfg.get("optimized_metric", "val/total"))
    return value


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    main()

"""Every experiment composes; every group option instantiates; the seed's flags have their values."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from agingnet.config import CONFIG_DIR, compose_config
from agingnet.losses import LossStack

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def test_expected_experiments_exist():
    assert {"demo", "phase3_oneshot_40", "phase3_oneshot_40_entry001", "full_training_s1",
            "full_training_s2"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_resolves(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}"], output_dir=tmp_path)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert cfg.model._target_ == "agingnet.module.AgingModule"
    assert cfg.stage in ("s1", "s2", "p3", "world")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_with_debug_tiny_builds_model_and_losses(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}", "debug=tiny"], output_dir=tmp_path)
    assert cfg.trainer.max_steps <= 10 and cfg.model.net.size == 256 and cfg.init_from is None
    stack = LossStack(OmegaConf.to_container(cfg.loss, resolve=True), stage=cfg.stage)
    if cfg.stage == "world":  # the world's global model: the paired ground-truth term (+ SAM's aging and id terms)
        assert sorted(stack.terms) == (["aging", "gt", "id"] if experiment == "world_global_age" else ["gt"])
    else:
        assert "id" in stack and "l2" in stack


def test_phase3_entry002_carries_every_seed_flag(tmp_path):
    cfg = compose_config(["experiment=phase3_oneshot_40"], output_dir=tmp_path)
    loss = cfg.loss
    assert (cfg.stage, cfg.lr, cfg.cycle_lambda) == ("p3", 1.5e-5, 1.5)
    assert (loss.id.weight, loss.lpips.weight, loss.lpips.weight_aging, loss.lpips_crop.weight) == (0.3, 0.1, 0.1, 0.8)
    assert (loss.l2.weight, loss.l2.weight_aging, loss.l2_crop.weight) == (0.1, 0.25, 0.5)
    assert (loss.w_norm.weight, loss.w_norm.decoder_scale, loss.aging.weight, loss.aging.decoder_scale) == \
        (0.003, 0.5, 5.0, 0.5)
    assert loss.adaptive_w_norm.lambda_adapt == 20.0 and loss.adaptive_w_norm.only_extrapolation
    assert (loss.nn_id.weight, loss.contrastive_id.weight) == (0.05, 0.02)
    c = loss.contrastive_id
    assert (c.k, c.top_m, c.min_sim, c.max_sim, c.temperature, c.apply_min_age, c.apply_max_age) == \
        (48, 768, 0.25, 0.60, 0.12, 38, 42)
    assert c.bank_path.endswith("banks/ffhq_ir50_age_5y.pt") and cfg.miner.backend == "faiss"
    r = loss.roi_id
    assert (r.stage_weights.s2, list(r.regions), r.size, r.pad, r.jitter) == (0.05, ["eyes", "mouth"], 112, 0.35, 0.06)
    assert (cfg.target_age.mode, cfg.target_age.fixed_age, cfg.target_age.jitter) == ("fixed", 40, 2)
    assert (cfg.data.batch_size, cfg.data.num_workers, cfg.trainer.max_steps) == (2, 2, 10000)
    assert cfg.data.train.root.endswith("data/shot_train") and cfg.data.val.root.endswith("data/shot_test")
    assert (cfg.val_interval, cfg.val_max_batches) == (500, 2)
    assert (cfg.callbacks.ema.scope, cfg.callbacks.ema.decay, cfg.callbacks.ema.eval_with_ema) == \
        ("decoder", 0.999, True)
    assert cfg.init_from.endswith("full_training_run/00070/checkpoints/best_model.pt")
    assert cfg.model.net.use_blender is False
    assert cfg.callbacks.fork_export.latest_link.endswith("/_latest_phase3")


def test_entry001_differs_in_base_and_regions(tmp_path):
    cfg = compose_config(["experiment=phase3_oneshot_40_entry001"], output_dir=tmp_path)
    assert cfg.init_from.endswith("00063/checkpoints/best_model.pt")
    assert list(cfg.loss.roi_id.regions) == ["eyes", "mouth", "nose", "broweyes"]


def test_miner_window_defaults_to_fixed_age_plus_minus_max_2_j(tmp_path):
    cfg = compose_config(["experiment=tiny_synthetic", "target_age=fixed", "target_age.fixed_age=30",
                          "target_age.jitter=5"], output_dir=tmp_path)
    assert (cfg.miner.apply_min_age, cfg.miner.apply_max_age) == (25, 35)
    cfg = compose_config(["experiment=tiny_synthetic", "target_age=fixed", "target_age.jitter=1"], output_dir=tmp_path)
    assert (cfg.miner.apply_min_age, cfg.miner.apply_max_age) == (38, 42)


@pytest.mark.parametrize("option", options("miner"))
def test_every_miner_profile_builds_contrastive_term(option, tmp_path):
    cfg = compose_config(["experiment=tiny_synthetic", f"miner={option}"], output_dir=tmp_path)
    term = instantiate({k: v for k, v in OmegaConf.to_container(cfg.loss.contrastive_id, resolve=True).items()
                        if k not in ("weight", "passes")})
    assert term.cfg.k == cfg.miner.k


@pytest.mark.parametrize("option", options("loss"))
def test_every_loss_option_builds(option, tmp_path):
    cfg = compose_config(["~experiment", f"loss={option}"], output_dir=tmp_path)
    stack = LossStack(OmegaConf.to_container(cfg.loss, resolve=True), stage="s2")
    assert len(stack.terms) >= 5


@pytest.mark.parametrize("option", options("target_age"))
def test_every_target_age_option_builds(option, tmp_path):
    import torch

    from agingnet.data.sampler import TargetAgeSampler

    cfg = compose_config(["experiment=tiny_synthetic", f"target_age={option}"], output_dir=tmp_path)
    sampler = TargetAgeSampler(**OmegaConf.to_container(cfg.target_age, resolve=True))
    # the bounds each option means (conf/target_age/*.yaml): SAM's U{0…100}, or the seed's lock 40 ± 2
    lo, hi = {"uniform": (0, 100), "fixed": (38, 42)}[option]
    assert sampler.bounds == (lo, hi) and sampler.no_aging_prob == pytest.approx(1 / 3)
    gen = torch.Generator().manual_seed(0)
    draws = [sampler.sample(torch.full((8,), 33.0), generator=gen) for _ in range(300)]
    aging = torch.cat([t for t, no_aging in draws if not no_aging])
    assert torch.equal(aging, aging.round()) and lo <= aging.min() and aging.max() <= hi
    if option == "fixed":
        assert set(aging.tolist()) == {38.0, 39.0, 40.0, 41.0, 42.0}  # both ends of the window are drawn
    n_no_aging = sum(no_aging for _, no_aging in draws)
    assert 70 <= n_no_aging <= 130  # Binomial(300, 1/3): mean 100, sd 8.2


@pytest.mark.parametrize("option", options("data"))
def test_every_data_option_instantiates(option, tmp_path):
    for sub in ("shot_train", "shot_test", "ffhq/train", "ffhq/test"):
        d = tmp_path / "data" / sub
        d.mkdir(parents=True)
        from PIL import Image

        Image.new("RGB", (32, 32), (120, 80, 60)).save(d / "40_0.png")
    cfg = compose_config([f"data={option}", f"paths.data_dir={tmp_path / 'data'}"], output_dir=tmp_path / "run")
    dm = instantiate(cfg.data, _convert_="object")
    assert len(dm.train_set) >= 1 and len(dm.val_set) >= 1


def test_every_trainer_option_instantiates(tmp_path):
    import lightning as L
    import torch

    for option in options("trainer"):
        if option == "gpu" and not torch.cuda.is_available():
            continue  # composes above; instantiating needs a GPU
        cfg = compose_config(["experiment=tiny_synthetic", f"trainer={option}"], output_dir=tmp_path / option)
        trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
        assert isinstance(trainer, L.Trainer) and trainer.max_steps == cfg.trainer.max_steps
        want = {"cpu": "CPU", "gpu": "CUDA", "auto": "CUDA" if torch.cuda.is_available() else "CPU"}
        assert type(trainer.accelerator).__name__ == want[cfg.trainer.accelerator] + "Accelerator", option


_MISSING = object()


@pytest.mark.parametrize("group", ["logger", "callbacks"])
def test_every_option_of_simple_groups_instantiates(group, tmp_path):
    """Each option builds one object per ``_target_`` entry, of that class, holding the configured settings
    (read back from the object under the key's name or Lightning's ``_key``)."""
    from hydra.utils import get_class

    from agingnet.train import instantiate_group

    for option in options(group):
        cfg = compose_config(["experiment=tiny_synthetic", f"{group}={option}"], output_dir=tmp_path / option)
        node = cfg[group] or {}
        wanted = {k: v for k, v in node.items() if v is not None and "_target_" in v}
        built = instantiate_group(node, group)
        assert len(built) == len(wanted) and (option != "none" or built == []), option
        for (key, v), obj in zip(wanted.items(), built):
            assert isinstance(obj, get_class(v._target_)), (option, key)
            checked = 0
            for k, want in v.items():
                got = getattr(obj, k, getattr(obj, f"_{k}", _MISSING))
                if k == "_target_" or got is _MISSING or callable(got):
                    continue
                if want is None and got in (0, ""):  # libraries store "unset" as their default: name "", every_n 0
                    got = None
                if k in ("dirpath", "save_dir", "latest_link"):
                    got, want = str(Path(got)), str(Path(want))
                assert got == want, (option, key, k, got, want)
                checked += 1
            settings = [k for k in v if k != "_target_"]
            assert checked >= 1 or not settings, (option, key)  # an entry's settings: at least one read back


MANIFESTS = Path(__file__).parent / "data" / "manifests"
NO_FILES = [f"model.weights.{k}=null" for k in ("sam", "psp", "stylegan2", "arcface", "dex")] + \
    ["model.frozen.lpips.backbone_pretrained=false"]


def _manifest(name: str) -> dict[str, list[int]]:
    import json

    return json.loads((MANIFESTS / f"{name}.keys.json").read_text())["state_dict"]


def _shapes(module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def _scaled_down_keys(full: dict, units: list[int], n_mlp: int, size: int) -> set[str]:
    """The key names of the published layout with fewer IR-SE units per stage (the first ``units[s]`` of each
    of the 3/4/14/3 stages, renumbered), fewer mapping layers and a smaller StyleGAN2 (``size`` px)."""
    starts, kept = [0, 3, 7, 21], {}
    for s, n in enumerate(units):
        for u in range(n):
            kept[starts[s] + u] = len(kept)
    n_res = int(math.log2(size)) - 2  # upsampling resolutions above 4 px
    limits = {"style": n_mlp + 1, "convs": 2 * n_res, "to_rgbs": n_res, "noises": 2 * n_res + 1,
              "styles": 2 * n_res + 2}  # W+ styles = layers of the decoder
    out = set()
    for k in full:
        parts = k.split(".")
        if "body" in parts[:2]:
            i = parts.index("body")
            if int(parts[i + 1]) not in kept:
                continue
            parts[i + 1] = str(kept[int(parts[i + 1])])
        elif parts[1] in limits and (parts[0] == "decoder" or parts[1] == "styles"):
            idx = int(parts[2].removeprefix("noise_"))
            if idx >= limits[parts[1]]:
                continue
        out.add(".".join(parts))
    return out


@pytest.mark.parametrize("option", options("model"))
def test_every_model_option_builds_the_published_structure(option, tmp_path):
    """The module each model option instantiates (on the meta device: shapes without memory): full-size options
    match the published files' key layouts exactly; tiny keeps their key names with the configured widths."""
    import torch

    cfg = compose_config(["experiment=tiny_synthetic", f"model={option}", *NO_FILES], output_dir=tmp_path)
    with torch.device("meta"):
        module = instantiate(cfg.model, loss=cfg.loss, _recursive_=False)
    net, frozen = _shapes(module.net), module.frozen
    sam, irse = _manifest("sam_ffhq_aging"), _manifest("model_ir_se50")
    dex = {k.replace("-", "_"): v for k, v in _manifest("dex_age_classifier").items()}
    n = cfg.model.net
    if n.size == 1024:
        assert net == {**sam, "latent_avg": [18, 512]}
        assert _shapes(frozen.arcface) == irse and _shapes(frozen.dex) == dex
    else:
        assert option == "tiny"
        assert set(net) == _scaled_down_keys(sam, [1, 1, 1, 1], n.n_mlp, n.size) | {"latent_avg"}
        n_styles, ch, w = 2 * int(math.log2(n.size)) - 2, n.channels, list(n.encoder_widths)
        assert net["latent_avg"] == [n_styles, n.style_dim]
        assert net["decoder.input.input"] == [1, ch[4], 4, 4]
        for i in range(int(math.log2(n.size)) - 2):  # StyleGAN2: resolution r = 8·2^i, channels from the config
            r = 8 * 2**i
            assert net[f"decoder.convs.{2 * i}.conv.weight"] == [1, ch[r], ch[r // 2], 3, 3]
            assert net[f"decoder.convs.{2 * i + 1}.conv.weight"] == [1, ch[r], ch[r], 3, 3]
            assert net[f"decoder.to_rgbs.{i}.conv.weight"] == [1, 3, ch[r], 1, 1]
        for pre, nc in (("encoder.", 4), ("pretrained_encoder.", 3)):
            assert net[f"{pre}input_layer.0.weight"] == [w[0], nc, 3, 3]
            for j in range(4):  # the first unit of stage j: conv3×3 from the previous width
                assert net[f"{pre}body.{j}.res_layer.1.weight"] == [w[j], w[max(j - 1, 0)], 3, 3]
            assert net[f"{pre}styles.{n_styles - 1}.linear.weight"] == [n.style_dim, n.style_dim]
        assert set(_shapes(frozen.arcface)) == _scaled_down_keys(irse, [1, 1, 1, 1], 0, 4)  # no decoder keys
        assert set(_shapes(frozen.dex)) == set(dex)
        assert _shapes(frozen.dex)["fc8_101.weight"] == [101, cfg.model.frozen.dex.fc_dim]


@pytest.mark.parametrize("option", options("model"))
def test_every_model_option_builds_its_optimizer(option, tmp_path):
    import pytorch_optimizer
    import torch

    cfg = compose_config(["experiment=tiny_synthetic", f"model={option}"], output_dir=tmp_path)
    p = torch.nn.Parameter(torch.zeros(2))
    opt = instantiate(cfg.model.optimizer, _convert_="all")([p])  # as AgingModule.configure_optimizers does
    assert isinstance(opt, torch.optim.Adam if option == "adam" else pytorch_optimizer.Ranger)
    assert opt.param_groups[0]["lr"] == cfg.lr


@pytest.mark.parametrize("override,key", [
    ("loss.id.no_such_key_x=1", "loss.id.no_such_key_x"),  # unknown key inside a term
    ("no_such_key=2", "no_such_key"),  # unknown top-level key
    ("model.net.no_such_net_key=3", "model.net.no_such_net_key"),  # unknown architecture setting
    ("loss.no_such_term.weight=1", "loss.no_such_term.weight"),  # a term that does not exist
    ("+lr=1", "lr"),  # `+` adds a key: an existing one is an error (a new `+key` is how Hydra adds one)
])
def test_unknown_key_is_a_clear_error(override, key, tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match=f"'{re.escape(key)}'"):
        compose_config(["experiment=tiny_synthetic", override], output_dir=tmp_path)


def test_sweep_and_launcher_configs_exist():
    assert (CONFIG_DIR / "hparams_search" / "optuna_phase3.yaml").is_file()
    assert (CONFIG_DIR / "hydra" / "launcher" / "slurm.yaml").is_file()


def test_optuna_sweeper_config_composes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("train", overrides=["experiment=phase3_oneshot_40", "hparams_search=optuna_phase3"],
                      return_hydra_config=True)
    assert "OptunaSweeper" in cfg.hydra.sweeper._target_
    assert "miner.temperature" in cfg.hydra.sweeper.params


def test_slurm_launcher_composes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert "SlurmLauncher" in cfg.hydra.launcher._target_ and cfg.hydra.launcher.gpus_per_node == 1


def test_paths_come_from_output_dir(tmp_path):
    cfg = compose_config(["experiment=phase3_oneshot_40"], output_dir=tmp_path)
    for cb in ("model_checkpoint", "run_log", "fork_export"):
        assert str(cfg.callbacks[cb].dirpath).startswith(str(tmp_path))
    assert Path(cfg.logger.tensorboard.save_dir).parent == tmp_path

"""``AgingModule``: the SAM training step (SPEC §2, §4) as a LightningModule.

One step: (1) real pass ŷ, codes = net(x ⊕ t); (2) cycle pass y_rec = net(ŷ.detach() ⊕ a) toward the input age;
loss = L_real + cycle_weight·L_cycle and one optimizer step. Stages: ``s1`` trains the age encoder (decoder
frozen), ``s2``/``p3`` train the decoder (encoders frozen), ``world`` trains all three from scratch in the aging
world; cycle_weight 0 skips the cycle pass. Frozen modules stay in eval mode and outside autograd.

Validation is deterministic (fixed seed, const noise, training RNG untouched) and reports the fork-comparable
reconstruction total (no aging, real + cycle, weighted) and aging accuracy (DEX age of outputs at target ages
inside the window).

Two sets of hooks live in mixins of their own: the NaN guard (:mod:`agingnet.step_guard`) and the state an exact
resume needs beyond Lightning's checkpoint (:mod:`agingnet.run_state`).
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from agingnet.data.sampler import TargetAgeSampler
from agingnet.distributed import any_rank, mean_over_ranks, zero_loss
from agingnet.frozen_cache import FrozenCache, Keys
from agingnet.losses.base import FrozenNets, LossContext
from agingnet.losses.registry import LossStack
from agingnet.models import build_arcface, build_dex, build_lpips, load_or_build_aging_net, warn_random_frozen
from agingnet.nn.aging_net import add_age_channel
from agingnet.optim import configure as configure_optimization
from agingnet.optim import warmup_cosine  # noqa: F401 - the former home of the schedule (old configs)
from agingnet.run_state import ExactResume
from agingnet.step_guard import NanGuard, RunDiverged
from agingnet.world.truth import batch_truth

log = logging.getLogger(__name__)
# The loss terms' validation stats are reduced over ranks by mean_over_ranks before they are logged, so
# Lightning's advice to add sync_dist=True to them is moot (every rank logs the same value).
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('val/(real|cycle)/")

# world: the aging world's global model from scratch (no pretrained pSp or StyleGAN2 exists there): the age
# encoder, the pSp encoder and the decoder train together (README "The aging world").
TRAINABLE = {"s1": ("encoder",), "s2": ("decoder",), "p3": ("decoder",),
             "world": ("encoder", "pretrained_encoder", "decoder")}


def _world(batch: Mapping[str, Any]) -> tuple[Tensor, Tensor] | None:
    """(world identities, flipped) of a batch of world faces, else None."""
    if "world_identity" not in batch:
        return None
    ids = torch.as_tensor(batch["world_identity"])
    return ids, torch.as_tensor(batch.get("flipped", torch.zeros_like(ids, dtype=torch.bool)))


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


class AgingModule(NanGuard, ExactResume, L.LightningModule):
    """Args (all plain values or configs, so the module is built by ``hydra.utils.instantiate``):

    net: architecture of the aging network (used when no weights are given). frozen: ``arcface``/``dex``/
    ``lpips`` settings. weights: paths of the published files. loss: the registry's term configs.
    sampler: :class:`TargetAgeSampler` kwargs. optimizer/scheduler: partial ``_target_`` configs.
    stage: s1 | s2 | p3. cycle_weight: λ of the cycle pass. input_age: "dex" (fork) or "label" (file name).
    init_from: base checkpoint (global step continues); init_use_ema: take the base's EMA decoder as weights.
    seed: the run's seed (the target-age draws follow it); val_seed: the fixed seed of every validation.
    nan_guard: skip a step whose loss or gradient is non-finite (no optimizer, scheduler or EMA update);
    max_consecutive_skips: stop the run (:class:`RunDiverged`) after this many skipped steps in a row (0: never).
    """

    def __init__(self, net: Mapping, frozen: Mapping, loss: Mapping, sampler: Mapping, optimizer: Any,
                 scheduler: Any = None, weights: Mapping | None = None, stage: str = "p3", cycle_weight: float = 1.0,
                 input_age: str = "dex", train_noise: str = "random", init_from: str | None = None,
                 init_use_ema: bool = False, restore_optimizer: bool = False, channels_last: bool = False,
                 val_seed: int = 1234, val_target_ages: list[int] | None = None, nan_guard: bool = True,
                 cache_frozen: bool = True, seed: int = 0, max_consecutive_skips: int = 0):
        super().__init__()
        # plain containers only: the .ckpt stays readable with torch.load(weights_only=True)
        args = dict(locals())
        names = list(inspect.signature(AgingModule.__init__).parameters)[1:]
        self.save_hyperparameters({k: _plain(args[k]) for k in names}, logger=False)
        if stage not in TRAINABLE:
            raise ValueError(f"stage must be one of {sorted(TRAINABLE)}, got {stage!r}")
        if input_age not in ("dex", "label"):
            raise ValueError(f"input_age must be 'dex' or 'label', got {input_age!r}")
        self.stage, self.cycle_weight, self.input_age = stage, float(cycle_weight), input_age
        self.train_noise, self.channels_last = train_noise, channels_last
        self.net, self.init_info = load_or_build_aging_net(_plain(net), _plain(weights), init_from, init_use_ema)
        self.step_offset = int(self.init_info.get("global_step", 0)) if init_from else 0
        fz, w = dict(_plain(frozen) or {}), _plain(weights) or {}
        warn_random_frozen(fz, w)
        self.frozen = FrozenNets(
            arcface=build_arcface(path=w.get("arcface"), **fz.get("arcface", {})),
            dex=build_dex(path=w.get("dex"), **fz.get("dex", {})),
            lpips=build_lpips(**fz.get("lpips", {})),
        )
        self.loss = LossStack(_plain(loss) or {}, stage=stage)
        self.sampler = TargetAgeSampler(**_plain(sampler))
        self._set_trainable()
        self.nan_skips = 0
        self.label_fallbacks = 0  # input_age=label: samples whose missing label was replaced by DEX
        self.batches_seen = 0
        self.last_step_skipped = False
        self.using_ema = False  # set by the EMA callback while its shadow weights are swapped in
        self._gen = torch.Generator().manual_seed(int(seed))  # target ages: one stream per run seed
        self._last_images: dict[str, Tensor] = {}
        self._frozen_cache = FrozenCache(enabled=cache_frozen)
        self.consecutive_skips = 0
        self._skip_pending = False

    # ---------------------------------------------------------------- structure
    @property
    def train_decoder(self) -> bool:
        return "decoder" in TRAINABLE[self.stage]

    @property
    def abs_step(self) -> int:
        """The global step as the fork counts it: base checkpoint's step + steps taken in this run."""
        return self.step_offset + int(self.global_step)

    def _set_trainable(self) -> None:
        self.net.requires_grad_(False)
        for m in self.trainable_modules().values():
            m.requires_grad_(True)

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        mods = {n: getattr(self.net, n) for n in TRAINABLE[self.stage] if getattr(self.net, n) is not None}
        if self.net.blender is not None and self.net.use_blender:
            mods["blender"] = self.net.blender
        return mods

    def train(self, mode: bool = True):
        """Only the trained modules enter train mode: frozen BatchNorm statistics never drift (fork bug)."""
        super().train(False)
        if mode:
            for m in self.trainable_modules().values():
                m.train(True)
        return self

    def on_validation_model_train(self) -> None:
        """Lightning restores the modes it found before validation (it never calls ``train()`` at fit start), so
        after each validation inside fit the stage's modes are set again explicitly."""
        if self.trainer.state.fn == "fit":
            self.train(True)

    def setup(self, stage: str) -> None:
        if self.channels_last:  # 4-D conv weights only (the modulated convs' weights are 5-D)
            for m in self.modules():
                if isinstance(m, torch.nn.Conv2d):
                    m.to(memory_format=torch.channels_last)

    # ---------------------------------------------------------------- pieces of a step
    def _cache_keys(self, batch: Mapping[str, Any]) -> Keys | None:
        """Content keys of the input images (see :mod:`agingnet.frozen_cache`), or None when caching is off."""
        return self._frozen_cache.keys_for(batch["image"])

    def cached_frozen(self, kind: str, keys: Keys | None, x: Tensor, fn) -> Tensor:
        """``fn(x)`` (a frozen network on the input images) memoized per sample by content."""
        return self._frozen_cache.get(kind, keys, x, fn)

    def cached_landmarks(self, detector, keys: Keys | None, x: Tensor) -> tuple[Tensor, Tensor]:
        """68 landmarks of the input images (ROI-ID's source side), memoized like :meth:`cached_frozen`."""
        return self._frozen_cache.landmarks(detector, keys, x)

    def _input_ages(self, batch: Mapping[str, Any], keys: list[tuple[str, bool]] | None = None) -> Tensor:
        """The input age a in years: DEX on x (the fork), or the label with ``input_age=label``. A sample without
        a label (NaN) falls back to DEX — counted in ``label_fallbacks`` and said once at WARNING level."""
        x = batch["image"]
        age = batch.get("age")
        if self.input_age == "label":
            label = (torch.full((x.shape[0],), float("nan")) if age is None else age).to(x.device, x.dtype)
            missing = torch.isnan(label)
            if not bool(missing.any()):
                return label
            n = int(missing.sum())
            if self.label_fallbacks == 0:
                log.warning("input_age=label: %d sample(s) of this batch have no age label; their input age comes "
                            "from DEX (counted as label_fallbacks)", n)
            self.label_fallbacks += n
            dex = self.cached_frozen("dex_age", keys, x, self.frozen.predict_age).clamp(0, 100).to(x.dtype)
            return torch.where(missing, dex, label)
        return self.cached_frozen("dex_age", keys, x, self.frozen.predict_age).clamp(0, 100).to(x.dtype)

    def _prep(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def run_passes(self, x: Tensor, input_years: Tensor, target_years: Tensor, no_aging: bool, noise_mode: str,
                   step: int, keys: list[tuple[str, bool]] | None = None, world: tuple[Tensor, Tensor] | None = None
                   ) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """Real and cycle passes. Returns (weighted total, logged loss = L_real + L_cycle, logs, images).
        ``keys`` ((path, flipped) per sample) lets the frozen embedding of x come from the cache; ``world``
        (world identities, flipped) of world faces lets the ground-truth term render the truth."""
        a, t = input_years / 100.0, target_years / 100.0
        x = self._prep(x)
        y_hat, codes = self.net(self._prep(add_age_channel(x, t)), noise_mode=noise_mode)
        common = dict(x=x, y=x, latent_avg=self.net.latent_avg, nets=self.frozen, no_aging=no_aging,
                      stage=self.stage, step=step, train_decoder=self.train_decoder)
        common["extra"] = {}
        if world is not None:
            common["extra"]["truth_fn"] = lambda years, size: batch_truth(world[0], world[1], years, size)
        if keys is not None:
            common["extra"]["source_landmarks_provider"] = lambda det: self.cached_landmarks(det, keys, x)
            if self.frozen.arcface is not None:
                common["extra"]["feat_y_provider"] = lambda: self.cached_frozen("id_feat", keys, x,
                                                                                self.frozen.embed_face)
        ctx = LossContext(y_hat=y_hat, codes=codes, input_ages=a, target_ages=t, pass_name="real", **common)
        l_real, logs = self.loss(ctx)
        images = {"input": x.detach(), "output": y_hat.detach(), "target_age": target_years.detach(),
                  "input_age": input_years.detach()}
        if "output_age_real" in ctx.extra:
            images["output_age"] = ctx.extra["output_age_real"]
        if self.cycle_weight == 0:  # λ = 0: the cycle pass would cost a second forward and count for nothing
            return l_real, l_real.detach(), logs, images
        y_rec, codes_rec = self.net(self._prep(add_age_channel(y_hat.detach(), a)), noise_mode=noise_mode)
        # SAM/the fork score the cycle pass with target = input = a: the weighted ID loss has weight 1 there
        # ("weighted id loss only on forward pass") and adaptive w-norm sees no age gap.
        ctx_c = LossContext(y_hat=y_rec, codes=codes_rec, input_ages=a, target_ages=a, pass_name="cycle", **common)
        for cached in ("feat_y", "feat_x"):  # the frozen IR-SE50 embedding of the fixed input: computed once a step
            if cached in ctx.__dict__:
                ctx_c.__dict__[cached] = ctx.__dict__[cached]
        l_cycle, logs_c = self.loss(ctx_c)
        logs.update(logs_c)
        images["cycle"] = y_rec.detach()
        return l_real + self.cycle_weight * l_cycle, (l_real + l_cycle).detach(), logs, images

    # ---------------------------------------------------------------- training
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor | None:
        self.batches_seen += 1
        x = batch["image"]
        keys = self._cache_keys(batch)
        input_years = self._input_ages(batch, keys)
        target_years, no_aging = self.sampler.sample(input_years.detach().cpu(), self._gen)
        target_years = target_years.to(x.device, x.dtype)
        total, loss_logged, logs, images = self.run_passes(x, input_years, target_years, no_aging,
                                                           self.train_noise, self.abs_step, keys, _world(batch))
        self._last_images = images
        bs = x.shape[0]
        self.log("train/loss", loss_logged, prog_bar=True, batch_size=bs)
        self.log("train/total", total.detach(), batch_size=bs)
        self.log("train/no_aging", float(no_aging), batch_size=bs)
        self.log("train/target_age", target_years.mean(), batch_size=bs)
        self.log("train/abs_step", float(self.abs_step), batch_size=bs)
        if self.input_age == "label":
            self.log("train/label_fallbacks", float(self.label_fallbacks), batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=bs)
        # every rank skips, or none (DDP: one rank's non-finite loss skips the step everywhere)
        if self.hparams.nan_guard and any_rank(~torch.isfinite(total.detach()), self._trainer):
            self._skip_pending = True  # on_before_optimizer_step aborts the optimizer step (see there)
            log.warning("non-finite loss at step %d: step skipped", self.abs_step)
            if int(getattr(self._trainer, "world_size", 1) or 1) > 1:
                return zero_loss(self)  # Lightning refuses None under DDP; the grads are dropped before the step
            return None
        return total

    # ---------------------------------------------------------------- validation
    def term_generators(self) -> list[torch.Generator]:
        """Private generators of the loss terms (ROI jitter, the miner's draws)."""
        return [g for name, g in self._named_generators().items() if name != "target_ages"]

    def on_validation_epoch_start(self) -> None:
        """Deterministic validation: a fixed seed everywhere, and every RNG (global, CUDA, the loss terms')
        restored afterwards so validation never changes what training draws."""
        self._val_rng = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])
        self._val_rng.__enter__()
        torch.manual_seed(self.hparams.val_seed)
        self._val_gen = torch.Generator().manual_seed(self.hparams.val_seed)
        self._val_index = 0  # samples validated so far: the aging targets run through the window across batches
        self._term_states = [(g, g.get_state()) for g in self.term_generators()]
        for g, _ in self._term_states:
            g.manual_seed(self.hparams.val_seed)

    def on_validation_epoch_end(self) -> None:
        if getattr(self, "_val_rng", None) is not None:
            self._val_rng.__exit__(None, None, None)
            self._val_rng = None
        for g, state in getattr(self, "_term_states", []):
            g.set_state(state)
        self._term_states = []

    def aging_targets(self, n: int, start: int = 0) -> Tensor:
        """Deterministic target ages for the aging check of validation samples ``start … start+n−1``: the window's
        ages in turn (fixed mode) or the configured list, continuing across batches so the whole window is covered
        over the validation set; else a uniform draw from the validation generator."""
        ages = self.hparams.val_target_ages
        win = self.sampler.window
        if not ages and win is not None:
            ages = list(range(win[0], win[1] + 1))
        if ages:
            table = torch.tensor(ages, dtype=torch.float32)
            return table[(torch.arange(n) + int(start)) % len(ages)]
        lo, hi = self.sampler.bounds
        return torch.randint(lo, hi + 1, (n,), generator=self._val_gen).float()

    def _seed_val_batch(self, batch_idx: int) -> int:
        """Seed every stream validation draws from with val_seed + k, k = the batch's index in the 1-process
        order (DDP rank r validates batches r, r+W, …): the metrics do not depend on the number of processes."""
        world = int(getattr(self._trainer, "world_size", 1) or 1)
        k = batch_idx * world + int(getattr(self._trainer, "global_rank", 0) or 0)
        seed = int(self.hparams.val_seed) + k
        torch.manual_seed(seed)
        for g in [self._val_gen, *self.term_generators()]:
            g.manual_seed(seed)
        return k

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        k = self._seed_val_batch(batch_idx)
        x = batch["image"]
        bs = x.shape[0]
        keys = self._cache_keys(batch)
        input_years = self._input_ages(batch, keys)
        _, loss_logged, logs, _ = self.run_passes(x, input_years, input_years, True, "const", self.abs_step, keys,
                                                  _world(batch))
        total = logs["real/total"] + logs.get("cycle/total", 0.0)  # no cycle pass when λ = 0
        self.log("val/total", total, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val/loss", loss_logged, batch_size=bs, sync_dist=True)
        # the terms' stats may differ in keys from rank to rank: reduced here, not by sync_dist (see mean_over_ranks)
        self.log_dict({f"val/{k}": v for k, v in mean_over_ranks(logs, self._trainer).items()}, batch_size=bs)
        start = getattr(self, "_val_index", 0)
        self._val_index = start + bs
        if int(getattr(self._trainer, "world_size", 1) or 1) > 1:  # DDP: the batch's offset in the 1-process order
            loader_bs = getattr(getattr(self._trainer, "val_dataloaders", None), "batch_size", None) or bs
            start = k * int(loader_bs)
        targets = self.aging_targets(bs, start).to(x.device, x.dtype)
        y_aged, _ = self.net(self._prep(add_age_channel(self._prep(x), targets / 100.0)), noise_mode="const")
        out_age = self.frozen.predict_age(y_aged)
        self.log("val/aging/mae", (out_age - targets).abs().mean(), batch_size=bs, sync_dist=True)
        self.log("val/aging/output_age", out_age.mean(), batch_size=bs, sync_dist=True)
        self.log("val/aging/target_age", targets.mean(), batch_size=bs, sync_dist=True)
        win = self.sampler.window
        if win is not None:
            inside = ((out_age >= win[0]) & (out_age <= win[1])).float().mean()
            self.log("val/aging/in_window", inside, batch_size=bs, sync_dist=True)
        self.log("val/used_ema", float(self.using_ema), batch_size=bs, sync_dist=True)
        if batch_idx == 0:
            self._last_val_images = {"input": x.detach(), "output": y_aged.detach(), "target_age": targets,
                                     "output_age": out_age.detach(), "input_age": input_years.detach()}

    # ---------------------------------------------------------------- fit start and optimization
    def on_train_start(self) -> None:
        # Lightning 2.x does not call ``train()`` when fit starts: without this a loaded net stays in eval (S1 would
        # train the age encoder on frozen BN statistics) and a fresh one leaves the frozen encoders in train mode.
        self.train(True)
        self.net.__dict__.pop("base_ema", None)  # the EMA callback has taken what it needs; free the memory
        self.restore_pending_rng()

    def configure_optimizers(self):
        return configure_optimization(self)


__all__ = ["AgingModule", "RunDiverged", "warmup_cosine"]

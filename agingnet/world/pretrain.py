"""Train the world's frozen networks on rendered population faces and ship them as package data.

* DEX layout age estimator (``weights/dex.pth``): loss = CE(softmax logits, N(age, σ=2) over 0…100)
  + |E[age] − age| / 10; measured: age MAE on held-out identities (ages 18–75, the actors' range).
* IR-SE layout identity network (``weights/arcface.pth``): CosFace on the training identities; measured:
  verification accuracy on held-out identities, pairs ≥ 20 years apart (threshold chosen on one half of the
  held-out identities, accuracy on the other half).
* SAM layout global aging model (``weights/sam.pt``): ``python -m agingnet.train experiment=world_global``, then
  ``experiment=world_global_age`` from its last export (:mod:`agingnet.world.global_model`); measured on held-out
  actors: output age MAE with the world DEX at targets 20–70, ground-truth error, identity cosine — before (the
  run's random initialisation) and after.

Training identities are ``[0, n)``, held-out identities start at :data:`HELD_OUT_BASE` (both < 100000: actors
are never seen). Every photo is rendered at 256 px and fed exactly as the project feeds the frozen networks:
DEX gets the bilinear resize of the whole [-1,1] image, the identity network the SPEC §4 crop average-pooled
to its input size (:meth:`agingnet.losses.base.FrozenNets.embed_face`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.regression import MeanAbsoluteError

from agingnet.io import atomic_torch_save, atomic_write_json, file_sha256
from agingnet.losses.base import ID_CROP, FrozenNets
from agingnet.nn.dex import DEX
from agingnet.nn.irse import IRSEBackbone
from agingnet.viz import from_uint8
from agingnet.world.global_model import (
    QUICK_AGE_OVERRIDES,
    QUICK_OVERRIDES,
    STAGES,
    measure_global,
    ship_global,
    train_global,
)
from agingnet.world.render import RENDERER_VERSION, render
from agingnet.world.weights import FILES, WEIGHTS_DIR

HELD_OUT_BASE = 90_000
DEX_ARCH = dict(widths=(8, 16, 32, 32, 48), fc_dim=64, input_size=96)
# widths strictly increase: load_arcface reads the stages off runs of equal widths
ID_ARCH = dict(input_size=112, embed_dim=64, widths=(16, 24, 32, 48), units=(1, 1, 1, 1))
MIN_GAP = 20


@dataclass(frozen=True)
class Plan:
    n_ids: int  # training identities
    photos: int  # photos per training identity (random ages, own nuisance)
    n_eval_ids: int
    eval_photos: int
    dex_epochs: int
    id_epochs: int
    batch_size: int = 32
    lr: float = 2e-3
    min_age: int = 10
    max_age: int = 85
    global_overrides: tuple[str, ...] = ()  # of experiment=world_global
    global_age_overrides: tuple[str, ...] = ()  # of experiment=world_global_age


# 12 DEX and 4 identity epochs (the files shipped before had 20 and 6: held-out MAE 2.21 y, verification 0.991)
# and both global-model runs (1500 + 600 steps). With 2000 + 600 the chain took 71 min end to end on a day the
# benchmark step took 1.5 s (docs/BENCHMARKS.md, "pretrain end to end"); 1500 fits 60 min even at that speed.
FULL = Plan(n_ids=1000, photos=6, n_eval_ids=80, eval_photos=5, dex_epochs=12, id_epochs=4)
QUICK = Plan(n_ids=60, photos=4, n_eval_ids=24, eval_photos=4, dex_epochs=6, id_epochs=3,
             global_overrides=QUICK_OVERRIDES, global_age_overrides=QUICK_AGE_OVERRIDES)


# ---------------------------------------------------------------------------------------------- data


def render_set(identities: np.ndarray, photos: int, seed: int, min_age: int, max_age: int,
               chunk: int = 64) -> dict[str, Tensor]:
    """Render ``photos`` photos per identity and cut the two network inputs (uint8, NCHW) in batches.

    Returns ``dex`` [N,3,96,96], ``face`` [N,3,112,112], ``age`` [N] (float years), ``identity`` [N].
    """
    rng = np.random.default_rng([seed, 0xA6E])
    ids = np.repeat(identities, photos)
    ages = rng.integers(min_age, max_age + 1, len(ids))
    dex_in, face_in = [], []
    t, b, l_, r = ID_CROP
    for s in range(0, len(ids), chunk):
        imgs = np.stack([render(int(i), int(a), photo=(seed, s + k))
                         for k, (i, a) in enumerate(zip(ids[s:s + chunk], ages[s:s + chunk]))])
        x = from_uint8(imgs)
        d = F.interpolate(x, size=(DEX_ARCH["input_size"],) * 2, mode="bilinear", align_corners=False)
        f = F.adaptive_avg_pool2d(x[:, :, t:b, l_:r], (ID_ARCH["input_size"],) * 2)
        dex_in.append(_to_u8(d))
        face_in.append(_to_u8(f))
    return {"dex": torch.cat(dex_in), "face": torch.cat(face_in), "age": torch.from_numpy(ages).float(),
            "identity": torch.from_numpy(ids).long()}


def _to_u8(x: Tensor) -> Tensor:
    return x.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def _from_u8(x: Tensor) -> Tensor:
    return x.float().div(127.5).sub(1)


def _nhwc(x: Tensor) -> Tensor:
    """Channels-last input: with the networks' weights channels-last too, an epoch on 2 CPU cores is a quarter
    (identity) to a third (DEX) faster (docs/BENCHMARKS.md, "pretrain"); the shipped files are written contiguous."""
    return x.contiguous(memory_format=torch.channels_last)


def _shipped_state(net: nn.Module) -> dict[str, Tensor]:
    """The network's weights as shipped: copies in the standard (contiguous) layout, whatever it trained in."""
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in net.state_dict().items()}


def _flip_half(x: Tensor) -> Tensor:
    """Horizontal flip of a random half of the batch (the data module's train flip), without a Python loop."""
    m = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
    return torch.where(m, x.flip(-1), x)


# ---------------------------------------------------------------------------------------------- DEX


class DexTask(L.LightningModule):
    """Soft-label cross-entropy + L1 of the expected age; logs ``val_mae`` (torchmetrics)."""

    def __init__(self, lr: float, sigma: float = 2.0):
        super().__init__()
        self.net = DEX(**DEX_ARCH)
        for m in self.net.modules():  # torchvision's VGG init: a BN-free 16-layer stack trains from it
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        self.net.to(memory_format=torch.channels_last)
        self.lr, self.sigma = lr, sigma
        self.val_mae = MeanAbsoluteError()

    def training_step(self, batch, _):
        x, age = batch
        logits = self.net(_nhwc(_flip_half(_from_u8(x))))
        grid = self.net.age_values
        target = torch.softmax(-0.5 * ((grid[None] - age[:, None]) / self.sigma) ** 2, dim=1)
        ce = -(target * torch.log_softmax(logits, 1)).sum(1).mean()
        l1 = (torch.softmax(logits, 1) @ grid - age).abs().mean()
        loss = ce + l1 / 10
        self.log("train_mae", l1, prog_bar=True)
        return loss

    def validation_step(self, batch, _):
        x, age = batch
        self.val_mae.update(self.net.predict_age(_from_u8(x)), age)
        self.log("val_mae", self.val_mae, prog_bar=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr,
                                                    total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ---------------------------------------------------------------------------------------------- identity


class IdTask(L.LightningModule):
    """CosFace on the training identities: L = CE(s·(cos θ_j − m·[j = y])), cos θ_j = ⟨e, w_j⟩/‖w_j‖.

    Hand-written: the margin head is three lines and pytorch-metric-learning is not a dependency.
    """

    def __init__(self, n_classes: int, lr: float, s: float = 24.0, m: float = 0.25):
        super().__init__()
        self.net = IRSEBackbone(drop_ratio=0.1, **ID_ARCH)
        self.head = nn.Parameter(torch.randn(n_classes, ID_ARCH["embed_dim"]) * 0.01)
        self.net.to(memory_format=torch.channels_last)
        self.lr, self.s, self.m = lr, s, m

    def training_step(self, batch, _):
        x, y = batch
        cos = self.net(_nhwc(_flip_half(_from_u8(x)))) @ F.normalize(self.head, dim=1).T
        logits = self.s * (cos - self.m * F.one_hot(y, cos.shape[1]))
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr,
                                                    total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
def embed(net: nn.Module, faces_u8: Tensor, batch: int = 128) -> Tensor:
    """Embeddings in eval mode; the network's train/eval mode is restored afterwards."""
    was_training = net.training
    net.eval()
    out = torch.cat([net(_from_u8(faces_u8[i:i + batch])) for i in range(0, len(faces_u8), batch)])
    net.train(was_training)
    return out


def verification_accuracy(emb: Tensor, identity: Tensor, age: Tensor, min_gap: float = MIN_GAP,
                          seed: int = 0) -> dict[str, float]:
    """Same/different verification on pairs ≥ ``min_gap`` years apart, balanced (every same pair, as many
    random different pairs). The cosine threshold is chosen on identities with an even rank and the accuracy
    measured on the others."""
    cos = emb @ emb.T
    same = identity[:, None] == identity[None, :]
    gap = (age[:, None] - age[None, :]).abs() >= min_gap
    upper = torch.ones_like(same).triu(1)
    rank = torch.unique(identity, return_inverse=True)[1] % 2
    g = torch.Generator().manual_seed(seed)
    out: dict[str, float] = {}
    threshold = 0.0
    for half in (0, 1):
        inside = (rank[:, None] == half) & (rank[None, :] == half) & upper & gap
        pos = cos[inside & same]
        neg_all = cos[inside & ~same]
        neg = neg_all[torch.randperm(len(neg_all), generator=g)[: max(len(pos), 1)]]
        if half == 0:
            cand = torch.cat([pos, neg]).sort().values
            accs = ((pos[None, :] >= cand[:, None]).float().sum(1) + (neg[None, :] < cand[:, None]).float().sum(1))
            threshold = float(cand[accs.argmax()]) if len(cand) else 0.0
        else:
            acc = ((pos >= threshold).float().sum() + (neg < threshold).float().sum()) / max(len(pos) + len(neg), 1)
            out = {"verification_acc": float(acc), "threshold": threshold, "pairs_same": int(len(pos)),
                   "pairs_diff": int(len(neg))}
    return out


# ---------------------------------------------------------------------------------------------- driver


def _trainer(epochs: int) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=True, enable_model_summary=False, num_sanity_val_steps=0,
                     deterministic=True, inference_mode=False)


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "agingnet"], capture_output=True, text=True,
                               timeout=10, cwd=Path(__file__).parent).stdout.strip()
        return (head + ("+dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


NETS = ("dex", "arcface", "sam")


def _train_dex(plan: Plan, tr: dict[str, Tensor], ev: dict[str, Tensor]) -> tuple[nn.Module, dict[str, Any]]:
    task = DexTask(plan.lr)
    dl = DataLoader(TensorDataset(tr["dex"], tr["age"]), batch_size=plan.batch_size, shuffle=True, drop_last=True)
    vl = DataLoader(TensorDataset(ev["dex"], ev["age"]), batch_size=128)
    trainer = _trainer(plan.dex_epochs)
    before = trainer.validate(task, vl, verbose=False)[0]["val_mae"]
    trainer.fit(task, dl, vl)
    after = trainer.validate(task, vl, verbose=False)[0]["val_mae"]
    return task.net, {"heldout_mae_before": round(float(before), 3), "heldout_mae": round(float(after), 3),
                      "heldout_ages": [18, 75], "heldout_photos": len(ev["age"]), "goal_mae": 3.0}


def _train_arcface(plan: Plan, tr: dict[str, Tensor], ev: dict[str, Tensor], seed: int
                   ) -> tuple[nn.Module, dict[str, Any]]:
    task = IdTask(plan.n_ids, plan.lr)
    labels = torch.unique(tr["identity"], return_inverse=True)[1]
    dl = DataLoader(TensorDataset(tr["face"], labels), batch_size=plan.batch_size, shuffle=True, drop_last=True)
    before = verification_accuracy(embed(task.net, ev["face"]), ev["identity"], ev["age"], seed=seed)
    _trainer(plan.id_epochs).fit(task, dl)
    after = verification_accuracy(embed(task.net, ev["face"]), ev["identity"], ev["age"], seed=seed)
    return task.net, {"heldout_verification_before": round(before["verification_acc"], 4),
                      "heldout_verification": round(after["verification_acc"], 4),
                      "threshold": round(after["threshold"], 4), "pairs_same": after["pairs_same"],
                      "pairs_diff": after["pairs_diff"], "min_age_gap": MIN_GAP, "goal_verification": 0.95}


def _train_sam(plan: Plan, out: Path, seed: int, from_run: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """The global model's two runs (or the finished run ``from_run``: its last export is shipped), measured
    before/after on held-out actors with the world DEX and identity network in ``out`` (the ones just trained,
    else the package's). Returns (the shipped file, metrics measured on it)."""
    from agingnet.config import compose_config
    from agingnet.models import build_aging_net
    from agingnet.pretrained import load_aging_model, load_arcface, load_dex
    from agingnet.world.weights import weight_path

    def world_net(name: str) -> Path:
        return out / FILES[name] if (out / FILES[name]).is_file() else weight_path(name)

    frozen = FrozenNets(arcface=load_arcface(world_net("arcface")), dex=load_dex(world_net("dex")))
    net_cfg = compose_config(["experiment=world_global"]).model.net
    before = measure_global(build_aging_net(**{k: v for k, v in net_cfg.items() if k != "_target_"}), frozen,
                            seed=seed)  # the run's own random initialisation (build_aging_net is seeded)
    runs: list[Path] = []
    if from_run is None:
        last = train_global(out / ".world_global_run", seed=seed, overrides=plan.global_overrides,
                            age_overrides=plan.global_age_overrides,
                            nets={name: world_net(name) for name in ("dex", "arcface")})
        runs = [out / ".world_global_run" / name for name in STAGES]
    else:
        last = Path(from_run) / "checkpoints" / "phase3_last.pt"
        if not last.is_file():
            raise FileNotFoundError(f"{last}: --from-run needs a finished run folder of experiment="
                                    f"{' or '.join(STAGES)}")
        runs = [Path(from_run)]
    provenance = _run_provenance(runs[-1])  # read before shipping: the run may have started from the old file
    shipped = ship_global(load_aging_model(last), out / FILES["sam"], opts={"exp_dir": "world_global"})
    after = measure_global(load_aging_model(shipped), frozen, seed=seed)  # the file as users get it
    # a run folder's config.yaml is written when it starts, its last export when it ends
    walls = {r.name: round((r / "checkpoints" / "phase3_last.pt").stat().st_mtime - (r / "config.yaml").stat().st_mtime,
                           1) for r in runs}
    metrics = {**after, "before": {k: before[k] for k in ("age_mae", "gt_l2", "id_cos")}, "goal_age_mae": 5.0,
               "trained_by": " then ".join(f"python -m agingnet.train experiment={s}" for s in STAGES),
               "run_wall_s": walls, **provenance}
    return shipped, metrics


def _run_provenance(run: Path) -> dict[str, Any]:
    """What a run folder says of itself: its command line (Hydra's ``.hydra/overrides.yaml``) and the file it
    started from (name and sha256 only: no machine paths in the manifest). A file changed since the run started
    (e.g. ``sam.pt``, which shipping this run replaces) no longer tells what the run started from: its sha256 is
    then ``None``, with ``changed_since_run_start``."""
    import yaml

    out: dict[str, Any] = {}
    overrides = run / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        args = [a for a in yaml.safe_load(overrides.read_text()) or [] if not a.startswith("hydra.")]
        out["run_command"] = " ".join(["python -m agingnet.train", *args])
    init = yaml.safe_load((run / "config.yaml").read_text()).get("init_from")
    if init and Path(init).is_file():
        changed = Path(init).stat().st_mtime > (run / "config.yaml").stat().st_mtime
        out["run_init_from"] = {"file": Path(init).name, "sha256": None if changed else file_sha256(Path(init))}
        if changed:
            out["run_init_from"]["changed_since_run_start"] = True
    return out


def pretrain(plan: Plan = FULL, out: str | Path = WEIGHTS_DIR, seed: int = 0, command: str | None = None,
             nets: tuple[str, ...] = NETS, sam_from_run: str | Path | None = None) -> dict[str, Any]:
    """Render, train ``nets``, measure them on held-out identities, write weights + manifest atomically.
    ``sam_from_run``: ship the global model of a finished run (``experiment=world_global_age``, the second stage)
    instead of training it.

    The manifest keeps the entries of networks not trained in this call (same renderer version only).
    """
    bad = [n for n in nets if n not in NETS]
    if bad or not nets:
        raise ValueError(f"unknown world network(s) {bad or nets}; choose from {', '.join(NETS)}")
    out = Path(out)
    L.seed_everything(seed, workers=True, verbose=False)
    t0 = time.perf_counter()
    rng = np.random.default_rng([seed, 0x1D])
    train_ids = rng.choice(HELD_OUT_BASE, size=plan.n_ids, replace=False)
    eval_ids = HELD_OUT_BASE + np.arange(plan.n_eval_ids)
    tr = ev = {}
    if {"dex", "arcface"} & set(nets):  # the global model renders its own faces (experiment=world_global)
        tr = render_set(train_ids, plan.photos, seed, plan.min_age, plan.max_age)
        ev = render_set(eval_ids, plan.eval_photos, seed + 1, 18, 75)
        print(f"rendered {len(tr['age'])} training and {len(ev['age'])} held-out photos in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    render_s = time.perf_counter() - t0
    common = {"command": command or " ".join(["python -m agingnet.world", *sys.argv[1:]]),
              "git_commit": _git_commit(), "plan": asdict(plan), "seed": seed, "threads": torch.get_num_threads(),
              "render_s": round(render_s, 1)}
    out.mkdir(parents=True, exist_ok=True)
    entries: dict[str, Any] = {}
    for name in nets:
        t1 = time.perf_counter()
        if name == "dex":
            net, metrics = _train_dex(plan, tr, ev)
            path = atomic_torch_save({"state_dict": _shipped_state(net)}, out / FILES[name])
            arch: dict[str, Any] = DEX_ARCH
        elif name == "arcface":
            net, metrics = _train_arcface(plan, tr, ev, seed)
            path = atomic_torch_save(_shipped_state(net), out / FILES[name])
            arch = ID_ARCH
        else:
            path, metrics = _train_sam(plan, out, seed, sam_from_run)
            arch = {"source": "experiment=world_global, then experiment=world_global_age",
                    "dtype": "float16 (float32 where float16 is not exact)"}
            shutil.rmtree(out / ".world_global_run", ignore_errors=True)
        entries[FILES[name]] = {"sha256": file_sha256(path), "bytes": path.stat().st_size, "arch": arch,
                                "metrics": metrics, "train_s": round(time.perf_counter() - t1, 1), **common}
    manifest: dict[str, Any] = {"renderer_version": RENDERER_VERSION, "files": {}}
    old = out / "manifest.json"  # read last: another network may have been trained meanwhile (--only)
    if old.is_file():
        prev = json.loads(old.read_text())
        if prev.get("renderer_version") == RENDERER_VERSION:
            manifest["files"].update(prev.get("files", {}))
    manifest["files"].update(entries)
    atomic_write_json(manifest, out / "manifest.json")
    print(json.dumps({k: v["metrics"] for k, v in manifest["files"].items()}, indent=1), flush=True)
    return manifest

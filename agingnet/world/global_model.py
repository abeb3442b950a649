"""The world's global aging model in SAM's layout (``weights/sam.pt``): trained, measured, shipped.

Training is the project's own entry point in two runs: ``python -m agingnet.train experiment=world_global``
(stage ``world``: age encoder, pSp encoder and decoder from scratch, paired ground-truth term), then
``experiment=world_global_age`` from its last export (SAM's aging and identity terms added).

:func:`measure_global` judges a model on held-out actors (identities ≥ 100001, never drawn in training; 100000
is the demo's actor): one photo per actor at a random age, aged to each target age, and reports

* ``age_mae``: |DEX(output) − target| in years, with the world DEX (overall and per target);
* ``gt_l2``: MSE on [-1, 1] between the output and the actor rendered at the target age (the canonical portrait);
* ``input_gt_l2``: the same for the unchanged input photo (what "no aging at all" scores);
* ``id_cos``: cosine between the world identity network's embeddings of the output and of the input.

:func:`ship_global` writes the file in SAM's layout (``state_dict``, ``latent_avg``, ``opts``), each tensor in
float16 where that is exact enough and in float32 elsewhere (the loader casts all to float32): about half the
bytes, so all world weights stay under 20 MB. Before that it rescales the W+ styles whose scale the decoder
ignores (:func:`normalize_style_scales`, exact).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from agingnet.io import atomic_torch_save
from agingnet.losses.base import FrozenNets
from agingnet.nn.aging_net import AgingNet, add_age_channel
from agingnet.viz import from_uint8
from agingnet.world.render import ACTOR_BASE, render
from agingnet.world.truth import batch_truth

HELD_OUT_ACTORS = tuple(range(ACTOR_BASE + 1, ACTOR_BASE + 17))
TARGETS = (20, 30, 40, 50, 60, 70)


def _quick(steps: int, every: int, warmup: int) -> tuple[str, ...]:
    """Overrides of a ``--quick`` run: ``steps`` steps of batch 2, validation/images/exports every ``every``."""
    return (f"trainer.max_steps={steps}", "data.batch_size=2", f"val_interval={every}", f"image_interval={every}",
            f"callbacks.fork_export.every_n_steps={every}", f"model.scheduler.warmup_steps={warmup}", "logger=none",
            "callbacks.lr_monitor=null")


#: ``--quick``: short runs of both stages that show the pipeline learns (ground-truth error falls), not the goals
QUICK_OVERRIDES = _quick(40, 20, 5)
QUICK_AGE_OVERRIDES = _quick(10, 10, 2)
STAGES = ("world_global", "world_global_age")  # the experiments that train the global model, in order


@torch.no_grad()
def measure_global(net: AgingNet, frozen: FrozenNets, actors: Sequence[int] = HELD_OUT_ACTORS,
                   targets: Sequence[int] = TARGETS, seed: int = 0, batch: int = 16) -> dict[str, Any]:
    """Age MAE, ground-truth error and identity of ``net`` on held-out actors (see the module docstring)."""
    rng = np.random.default_rng([seed, 0x6A0])
    in_ages = rng.integers(18, 76, len(actors))
    x = from_uint8(np.stack([render(int(a), float(s), photo=(seed, k))
                             for k, (a, s) in enumerate(zip(actors, in_ages))]))
    ids = torch.as_tensor(actors).repeat_interleave(len(targets))
    tgt = torch.tensor(list(targets) * len(actors), dtype=torch.float32)
    xs = x.repeat_interleave(len(targets), 0)
    truth = batch_truth(ids, torch.zeros_like(ids, dtype=torch.bool), tgt, x.shape[-1])
    was_training = net.training
    net.eval()
    outs = [net(add_age_channel(xs[i:i + batch], tgt[i:i + batch] / 100.0), noise_mode="const")[0]
            for i in range(0, len(xs), batch)]
    net.train(was_training)
    y = torch.cat(outs)
    age = frozen.predict_age(y)
    err = (age - tgt).abs()
    gt = F.mse_loss(y, truth, reduction="none").mean((1, 2, 3))
    base = F.mse_loss(xs, truth, reduction="none").mean((1, 2, 3))
    cos = F.cosine_similarity(frozen.embed_face(y), frozen.embed_face(xs), dim=1)
    per = {int(t): {"age_mae": round(float(err[tgt == t].mean()), 3),
                    "output_age": round(float(age[tgt == t].mean()), 2),
                    "gt_l2": round(float(gt[tgt == t].mean()), 5)} for t in targets}
    return {"age_mae": round(float(err.mean()), 3), "gt_l2": round(float(gt.mean()), 5),
            "input_gt_l2": round(float(base.mean()), 5), "id_cos": round(float(cos.mean()), 4),
            "actors": [int(actors[0]), int(actors[-1])], "targets": [int(t) for t in targets], "per_target": per}


def train_global(workdir: str | Path, seed: int = 0, overrides: Sequence[str] = (),
                 age_overrides: Sequence[str] = (), nets: Mapping[str, str | Path] | None = None) -> Path:
    """Run both stages (:data:`STAGES`) in ``workdir/<experiment>``: ``experiment=world_global`` (plus
    ``overrides``, e.g. :data:`QUICK_OVERRIDES`), then ``experiment=world_global_age`` from its last export (plus
    ``age_overrides``); return the second run's last SAM-layout export. ``nets``: the world DEX and identity
    network files the runs judge with (``{"dex": …, "arcface": …}``; default the package's)."""
    from agingnet.config import compose_config
    from agingnet.train import train

    judges = [f"model.weights.{k}={v}" for k, v in (nets or {}).items()]
    last: Path | None = None
    for name, extra in zip(STAGES, (overrides, age_overrides)):
        init = [f"init_from={last}"] if last is not None else []
        cfg = compose_config([f"experiment={name}", f"seed={seed}", *init, *judges, *extra],
                             output_dir=Path(workdir) / name)
        result = train(cfg)
        last = Path(result["output_dir"]) / "checkpoints" / "phase3_last.pt"
        if not last.is_file():
            raise FileNotFoundError(f"{last}: the {name} run wrote no final export")
    return last


def scale_free_styles(net: AgingNet) -> dict[int, torch.nn.Module]:
    """{W+ index: the demodulated conv it feeds} for the indices that feed nothing else: 0 (``conv1``) and every
    even index from 2 on (the second conv of each resolution). Odd indices also feed a ``ToRGB``, which is not
    demodulated."""
    dec = net.decoder
    out: dict[int, torch.nn.Module] = {0: dec.conv1.conv}
    for k in range(len(dec.convs) // 2):
        out[2 + 2 * k] = dec.convs[2 * k + 1].conv
    return out


@torch.no_grad()
def normalize_style_scales(net: AgingNet, x: Tensor, ages: Tensor, tol: float = 1e-3) -> dict[int, float]:
    """Rescale the scale-free W+ styles so that codes − w̄ has unit RMS on ``x`` (photos at ``ages`` years);
    returns {index: factor}. Exact: a demodulated conv sees s = A·w + b only up to a positive scale, so dividing
    style i by c in both encoders' output layers and in w̄ while multiplying A of the conv it feeds by c changes
    no output (checked on ``x``: ``ValueError`` beyond ``tol``).

    Why: stage ``world`` trains the encoders with no W-norm term, and nothing bounds these styles (the decoder
    ignores their scale): they grew to thousands, so SAM's W-norm term (and the run's totals) would read ~10⁵.
    """
    if net.pretrained_encoder is None:
        raise ValueError("normalize_style_scales needs the pSp encoder (start_from_encoded_w_plus)")
    inp = add_age_channel(x, ages / 100.0)
    codes = net.encode(inp)
    before = net.decode(codes, noise_mode="const")
    rms = (codes - net.latent_avg).pow(2).mean((0, 2)).sqrt()
    factors: dict[int, float] = {}
    for i, conv in scale_free_styles(net).items():
        c = float(rms[i])
        if c <= 1.0:
            continue
        for enc in (net.encoder, net.pretrained_encoder):
            enc.styles[i].linear.weight.div_(c)
            enc.styles[i].linear.bias.div_(c)
        net.latent_avg[i].div_(c)
        conv.modulation.weight.mul_(c)
        factors[i] = round(c, 3)
    err = (net.decode(net.encode(inp), noise_mode="const") - before).abs().max().item()
    if err > tol:
        raise ValueError(f"rescaling the W+ styles changed the output by {err:.2e} (> {tol})")
    return factors


def population_sample(n: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` photos of population identities at ages 18–75 (images [n,3,256,256] in [-1, 1], ages [n] years)."""
    rng = np.random.default_rng([seed, 0x5CA1E])
    ids, ages = rng.integers(0, ACTOR_BASE, n), rng.integers(18, 76, n)
    x = from_uint8(np.stack([render(int(i), float(a), photo=(seed, k)) for k, (i, a) in enumerate(zip(ids, ages))]))
    return x, torch.from_numpy(ages).float()


def ship_global(net: AgingNet, path: str | Path, opts: dict[str, Any] | None = None) -> Path:
    """Write ``net`` in SAM's layout (no ``global_step``: a base model) with float16 tensors, atomically, after
    :func:`normalize_style_scales` on a population sample (its factors are recorded in ``opts``)."""
    from agingnet.pretrained import export_state

    factors = normalize_style_scales(net, *population_sample())
    state = export_state(net, opts={**dict(opts or {}), "style_rescale": {str(k): v for k, v in factors.items()}})
    state.pop("global_step")
    state["state_dict"] = {k: _half_if_exact(v) for k, v in state["state_dict"].items()}
    state["latent_avg"] = _half_if_exact(state["latent_avg"])
    return atomic_torch_save(state, path)


def _half_if_exact(t: Tensor, rel: float = 1e-3) -> Tensor:
    """float16 when it keeps every value within ``rel`` of the tensor's largest; else float32 (the rescaled
    modulation and style layers span ranges float16 overflows or flushes)."""
    if not t.is_floating_point() or t.numel() == 0:
        return t
    h = t.half()
    ok = torch.isfinite(h).all() and (h.float() - t).abs().max() <= rel * t.abs().max()
    return h if ok else t

"""Build the trainable aging network and the frozen auxiliary networks from a config.

Where the weights come from, in order (SPEC §2, issue "load the published weights"):
1. ``init_from``: a SAM or fork/agingnet run checkpoint (S2/P3 base; its EMA and global step come along);
2. ``weights.sam``: SAM's ``sam_ffhq_aging.pt``;
3. ``weights.stylegan2`` + ``weights.psp`` (+ ``weights.arcface`` for a fresh age encoder): a fresh S1;
4. nothing: random weights of the configured architecture (tiny configs, the demo, tests).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from agingnet import pretrained
from agingnet.nn import DEX, AgingNet, Blender, Generator, GradualStyleEncoder, IRSEBackbone

log = logging.getLogger(__name__)


def build_aging_net(size: int = 1024, style_dim: int = 512, n_mlp: int = 8, channel_multiplier: int = 2,
                    channels: Mapping[int, int] | None = None, encoder_widths: Sequence[int] = (64, 128, 256, 512),
                    encoder_units: Sequence[int] = (3, 4, 14, 3), fork_variant: bool = False,
                    pretrained_encoder: bool = True, blender: bool = False, use_blender: bool = False,
                    seed: int = 0) -> AgingNet:
    """A randomly initialised :class:`AgingNet` (w̄ = mean of 1024 mapped z; seeded, so reproducible)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dec = Generator(size=size, style_dim=style_dim, n_mlp=n_mlp, channel_multiplier=channel_multiplier,
                        channels={int(k): int(v) for k, v in channels.items()} if channels else None)
        n = dec.n_latent
        kw = dict(n_styles=n, style_dim=style_dim, widths=tuple(encoder_widths), units=tuple(encoder_units),
                  fork_variant=fork_variant)
        enc = GradualStyleEncoder(input_nc=4, **kw)
        pre = GradualStyleEncoder(input_nc=3, **kw) if pretrained_encoder else None
        bl = Blender(n_styles=n, style_dim=style_dim) if (blender or use_blender) else None
    net = AgingNet(enc, dec, pretrained_encoder=pre, blender=bl, use_blender=use_blender)
    net.latent_avg.copy_(dec.mean_latent(1024, generator=gen).expand(n, -1))
    return net


def load_or_build_aging_net(net_cfg: Mapping[str, Any], weights: Mapping[str, Any] | None = None,
                            init_from: str | None = None, init_use_ema: bool = False) -> tuple[AgingNet, dict]:
    """Return (net, info) following the order in the module docstring. ``info`` holds kind, global_step, opts."""
    weights = dict(weights or {})
    if init_from:
        net = pretrained.load_aging_model(init_from, use_ema=init_use_ema,
                                          use_blender=net_cfg.get("use_blender", False))
        return net, {**net.meta, "source": str(init_from)}
    if weights.get("sam"):
        net = pretrained.load_aging_model(weights["sam"], use_blender=net_cfg.get("use_blender", False))
        return net, {**net.meta, "source": str(weights["sam"])}
    if weights.get("stylegan2") and weights.get("psp"):
        dec = pretrained.load_stylegan2(weights["stylegan2"])
        pre = pretrained.load_psp_encoder(weights["psp"])
        enc = GradualStyleEncoder(input_nc=4, n_styles=pre.n_styles, style_dim=pre.style_dim, widths=pre.widths,
                                  units=pre.units, fork_variant=pre.fork_variant, input_size=pre.input_size)
        if weights.get("arcface"):
            pretrained.init_encoder_from_irse50(enc, weights["arcface"])
        bl = Blender(n_styles=dec.n_latent, style_dim=dec.style_dim) if net_cfg.get("use_blender") else None
        net = AgingNet(enc, dec, pretrained_encoder=pre, blender=bl, use_blender=bool(net_cfg.get("use_blender")))
        la = getattr(dec, "latent_avg", None)
        if la is None:
            raise ValueError(f"{weights['stylegan2']}: has no latent_avg; a fresh S1 needs it for w̄")
        net.latent_avg.copy_(la.view(1, -1).expand(dec.n_latent, -1))
        return net, {"kind": "fresh", "global_step": 0, "opts": {}, "source": str(weights["stylegan2"])}
    cfg = {k: v for k, v in net_cfg.items() if k != "_target_"}
    return build_aging_net(**cfg), {"kind": "random", "global_step": 0, "opts": {}, "source": None}


_WARNED_RANDOM: set[str] = set()


def warn_random_frozen(frozen_cfg: Mapping[str, Any], weights: Mapping[str, Any]) -> list[str]:
    """Say once per process, at WARNING level, which frozen networks get random weights because no file is
    configured (their losses and age readings are then meaningless). ``frozen.allow_random: true`` (the tiny/demo
    configs) opts out explicitly. Returns the kinds that are random."""
    lp = frozen_cfg.get("lpips") or {}
    random_kinds = [k for k in ("arcface", "dex") if not weights.get(k)]
    if not lp.get("backbone_pretrained", True):
        random_kinds.append("lpips")
    if frozen_cfg.get("allow_random", False):
        return random_kinds
    for kind in random_kinds:
        if kind not in _WARNED_RANDOM:
            _WARNED_RANDOM.add(kind)
            what = "LPIPS's AlexNet backbone" if kind == "lpips" else f"the frozen {kind} network"
            key = "model.frozen.lpips.backbone_pretrained" if kind == "lpips" else f"model.weights.{kind}"
            log.warning("%s has RANDOM weights (no %s configured): its losses and readings are meaningless; "
                        "set model.frozen.allow_random=true to silence this for tests and demos", what, key)
    return random_kinds


def build_arcface(path: str | None = None, input_size: int = 112, embed_dim: int = 512,
                  widths: Sequence[int] = (64, 128, 256, 512), units: Sequence[int] = (3, 4, 14, 3),
                  fork_variant: bool = False, seed: int = 1) -> IRSEBackbone:
    if path:
        return pretrained.load_arcface(path, fork_variant=fork_variant)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return IRSEBackbone(input_size=input_size, embed_dim=embed_dim, widths=tuple(widths), units=tuple(units),
                            fork_variant=fork_variant).eval()


def build_dex(path: str | None = None, widths: Sequence[int] = (64, 128, 256, 512, 512), fc_dim: int = 4096,
              input_size: int = 224, seed: int = 2) -> DEX:
    if path:
        return pretrained.load_dex(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DEX(widths=tuple(widths), fc_dim=fc_dim, input_size=input_size).eval()


def build_lpips(backbone_pretrained: bool = True, seed: int = 3) -> nn.Module:
    """LPIPS v0.1 on AlexNet (the ``lpips`` package; its linear heads ship with it).

    With ``backbone_pretrained`` the AlexNet weights come from the torch hub cache
    (``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth``); tiny/test configs use a random backbone.
    """
    import warnings

    import lpips

    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)  # a random backbone is the same in every process, whatever ran before
        m = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=not backbone_pretrained, verbose=False)
    return m.eval().requires_grad_(False)

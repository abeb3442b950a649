"""Load the published SAM/pSp/StyleGAN2/IR-SE50/DEX files and the fork's run checkpoints; write the same layout.

Every file is untrusted input: it is read with ``torch.load(..., weights_only=True)``, its kind is checked from
its keys, the architecture is inferred from the tensor shapes (so the published 1024 px models and tiny test
models load through the same code), and the state dict is loaded strictly. A mismatch raises
:class:`CheckpointError` naming the file, the expected kind and the first differing keys.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from agingnet.io import atomic_torch_save, describe_load_error
from agingnet.nn.aging_net import AgingNet
from agingnet.nn.blender import Blender
from agingnet.nn.dex import DEX
from agingnet.nn.irse import GradualStyleEncoder, IRSEBackbone
from agingnet.nn.stylegan2 import Generator

KINDS = {
    "stylegan2": "a rosinality StyleGAN2 file (g_ema, latent_avg), e.g. stylegan2-ffhq-config-f.pt",
    "psp": "a pSp checkpoint (state_dict with encoder.* on 3 channels), e.g. psp_ffhq_encode.pt",
    "aging": "a SAM or fork run checkpoint (state_dict with encoder.* on 4 channels and decoder.*)",
    "arcface": "an IR-SE50 ArcFace state dict (input_layer.*, body.*, output_layer.*), e.g. model_ir_se50.pth",
    "dex": "a DEX VGG16 age classifier (state_dict with conv1_1 … fc8_101), e.g. dex_age_classifier.pth",
}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be what the caller asked for."""


def read_checkpoint(path: str | os.PathLike, kind: str) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU with errors that name the file and the expected kind."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file (expected {KINDS[kind]})")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with disallowed globals, not a torch file at all
        raise CheckpointError(f"{p}: cannot be read as {KINDS[kind]}: {describe_load_error(e)}") from None


def detect_kind(obj: Any) -> str:
    """Which of :data:`KINDS` a loaded object is (``"unknown"`` when none)."""
    if not isinstance(obj, Mapping):
        return "unknown"
    if "g_ema" in obj:
        return "stylegan2"
    sd = obj.get("state_dict")
    if isinstance(sd, Mapping):
        if any(k.replace("-", "_").startswith("fc8_101") for k in sd) or "conv1_1.weight" in sd:
            return "dex"
        w = sd.get("encoder.input_layer.0.weight")
        if w is not None and "decoder.style.1.weight" in sd:
            return "aging" if w.shape[1] == 4 else "psp"
    if "input_layer.0.weight" in obj and "output_layer.3.weight" in obj:
        return "arcface"
    return "unknown"


def _expect_kind(obj: Any, path: str | os.PathLike, kind: str) -> None:
    found = detect_kind(obj)
    if found != kind:
        what = KINDS.get(found, "nothing agingnet knows")
        raise CheckpointError(f"{path}: expected {KINDS[kind]}, but the file looks like {what}")


def strict_load(module: nn.Module, state: Mapping[str, Tensor], path: str | os.PathLike, kind: str) -> None:
    """``load_state_dict(strict=True)`` with one error naming missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                parts.append(f"{name} ({len(keys)}): {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''}")
        raise CheckpointError(f"{path}: does not match {KINDS[kind]}: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def _sub(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _require(sd: Mapping[str, Tensor], keys: list[str], path, kind: str) -> None:
    absent = [k for k in keys if k not in sd]
    if absent:
        raise CheckpointError(f"{path}: does not match {KINDS[kind]}: missing ({len(absent)}): {', '.join(absent[:5])}")


# ---------------------------------------------------------------- architecture inference from key shapes


def generator_arch(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """Generator kwargs (size, style_dim, n_mlp, channels) read off a rosinality state dict."""
    n_mlp = len({k.split(".")[1] for k in sd if re.fullmatch(r"style\.\d+\.weight", k)})
    n_rgb = len({k.split(".")[1] for k in sd if re.fullmatch(r"to_rgbs\.\d+\.bias", k)})
    log_size = n_rgb + 2
    channels = {4: int(sd["conv1.conv.weight"].shape[1])}
    for i in range(3, log_size + 1):
        channels[2**i] = int(sd[f"convs.{2 * (i - 3)}.conv.weight"].shape[1])
    return dict(size=2**log_size, style_dim=int(sd["style.1.weight"].shape[0]), n_mlp=n_mlp, channels=channels)


def irse_arch(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """IR-SE widths and units per stage (consecutive units of equal depth form a stage)."""
    depths = []
    i = 0
    while f"body.{i}.res_layer.1.weight" in sd:
        depths.append(int(sd[f"body.{i}.res_layer.1.weight"].shape[0]))
        i += 1
    widths, units = [], []
    for d in depths:
        if widths and widths[-1] == d:
            units[-1] += 1
        else:
            widths.append(d)
            units.append(1)
    return dict(widths=tuple(widths), units=tuple(units))


def encoder_arch(sd: Mapping[str, Tensor], input_size: int = 256) -> dict[str, Any]:
    """GradualStyleEncoder kwargs; the fork variant is detected from the extra ``styles.0.convs`` layers."""
    n_styles = len({k.split(".")[1] for k in sd if re.fullmatch(r"styles\.\d+\.linear\.weight", k)})
    n_convs = len([k for k in sd if re.fullmatch(r"styles\.0\.convs\.\d+\.weight", k)])
    upstream = int(math.log2(input_size // 16))
    if n_convs not in (upstream, upstream + 1):
        raise ValueError(f"styles.0 has {n_convs} convs: neither the upstream ({upstream}) nor the fork "
                         f"({upstream + 1}) GradualStyleEncoder at {input_size} px")
    return dict(input_nc=int(sd["input_layer.0.weight"].shape[1]), n_styles=n_styles,
                style_dim=int(sd["styles.0.linear.weight"].shape[0]), fork_variant=n_convs == upstream + 1,
                input_size=input_size, **irse_arch(sd))


def blender_arch(sd: Mapping[str, Tensor], path) -> dict[str, Any]:
    """Blender kwargs read off its own tensors. The fork always builds ``Blender()`` with 18 styles, whatever
    the decoder size, so n_styles comes from the ``bottleneck_i`` count, never from the decoder."""
    _require(sd, ["bottleneck_0.0.weight", "global_mlp.0.weight", "age_mlp.0.weight"], path, "aging")
    n_styles = len({k.split(".")[0] for k in sd if re.fullmatch(r"bottleneck_\d+\.0\.weight", k)})
    return dict(n_styles=n_styles, style_dim=int(sd["bottleneck_0.0.weight"].shape[1]),
                bottleneck=int(sd["bottleneck_0.0.weight"].shape[0]),
                global_dim=int(sd["global_mlp.0.weight"].shape[0]), age_dim=int(sd["age_mlp.0.weight"].shape[0]))


# ---------------------------------------------------------------- loaders


def load_stylegan2(path: str | os.PathLike) -> Generator:
    """Generator from a rosinality file's ``g_ema`` (``latent_avg`` kept as a non-persistent buffer)."""
    ckpt = read_checkpoint(path, "stylegan2")
    _expect_kind(ckpt, path, "stylegan2")
    sd = ckpt["g_ema"]
    _require(sd, ["style.1.weight", "conv1.conv.weight", "to_rgb1.bias"], path, "stylegan2")
    g = Generator(**generator_arch(sd))
    strict_load(g, sd, path, "stylegan2")
    if "latent_avg" in ckpt:
        g.register_buffer("latent_avg", ckpt["latent_avg"].reshape(-1).float(), persistent=False)
    return g.eval()


def _encoder_from(sd: Mapping[str, Tensor], prefix: str, path, kind: str) -> GradualStyleEncoder:
    sub = _sub(sd, prefix)
    _require(sub, ["input_layer.0.weight", "styles.0.linear.weight"], path, kind)
    enc = GradualStyleEncoder(**encoder_arch(sub))
    strict_load(enc, sub, f"{path} [{prefix}*]", kind)
    return enc


def load_psp_encoder(path: str | os.PathLike) -> GradualStyleEncoder:
    """The 3-channel GradualStyleEncoder of a pSp checkpoint (``latent_avg`` kept as ``enc.latent_avg``)."""
    ckpt = read_checkpoint(path, "psp")
    _expect_kind(ckpt, path, "psp")
    enc = _encoder_from(ckpt["state_dict"], "encoder.", path, "psp")
    if "latent_avg" in ckpt:
        enc.register_buffer("latent_avg", ckpt["latent_avg"].float(), persistent=False)
    return enc.eval()


def load_arcface(path: str | os.PathLike, fork_variant: bool = False) -> IRSEBackbone:
    """IR-SE50 in eval mode: ``A(x112)`` → L2-normalized [B,512]. ``fork_variant``: the fork's 56 px parity mode."""
    sd = read_checkpoint(path, "arcface")
    if isinstance(sd, Mapping) and "state_dict" in sd and detect_kind(sd) == "unknown":
        sd = sd["state_dict"]
    _expect_kind(sd, path, "arcface")
    arch = irse_arch(sd)
    net = IRSEBackbone(input_size=56 if fork_variant else 112, embed_dim=int(sd["output_layer.3.weight"].shape[0]),
                       fork_variant=fork_variant, **arch)
    strict_load(net, sd, path, "arcface")
    return net.eval()


def load_dex(path: str | os.PathLike) -> DEX:
    """DEX VGG16 in eval mode (``fc8-101.*`` keys are renamed ``fc8_101.*``)."""
    ckpt = read_checkpoint(path, "dex")
    _expect_kind(ckpt, path, "dex")
    sd = {k.replace("-", "_"): v for k, v in ckpt["state_dict"].items()}
    _require(sd, ["conv1_1.weight", "fc6.weight", "fc8_101.weight"], path, "dex")
    widths = tuple(int(sd[f"conv{b}_1.weight"].shape[0]) for b in range(1, 6))
    feat = int(round(math.sqrt(sd["fc6.weight"].shape[1] / widths[-1])))
    net = DEX(widths=widths, fc_dim=int(sd["fc6.weight"].shape[0]), input_size=feat * 32,
              num_ages=int(sd["fc8_101.weight"].shape[0]))
    strict_load(net, sd, path, "dex")
    return net.eval()


def aging_net_from_state(sd: Mapping[str, Tensor], latent_avg: Tensor | None, path, opts: Mapping | None = None,
                         use_blender: bool = False) -> AgingNet:
    """Build and strictly load an :class:`AgingNet` from a SAM/fork-layout state dict."""
    dec_sd = _sub(sd, "decoder.")
    _require(dec_sd, ["style.1.weight", "conv1.conv.weight"], path, "aging")
    decoder = Generator(**generator_arch(dec_sd))
    if opts and "output_size" in opts and int(opts["output_size"]) != decoder.size:
        raise CheckpointError(f"{path}: opts.output_size={opts['output_size']} but the decoder keys are "
                              f"{decoder.size} px")
    encoder = _encoder_from(sd, "encoder.", path, "aging")
    pre = _encoder_from(sd, "pretrained_encoder.", path, "aging") if "pretrained_encoder.input_layer.0.weight" in sd \
        else None
    blender = None
    bl_sd = _sub(sd, "blender.")
    if bl_sd:
        blender = Blender(**blender_arch(bl_sd, f"{path} [blender.*]"))
        if use_blender and blender.n_styles != decoder.n_latent:
            raise CheckpointError(f"{path}: use_blender=true but the adapter (blender.*) has {blender.n_styles} "
                                  f"styles and the {decoder.size} px decoder {decoder.n_latent}")
    net = AgingNet(encoder, decoder, pretrained_encoder=pre, blender=blender, use_blender=use_blender and bool(bl_sd))
    strict_load(decoder, dec_sd, f"{path} [decoder.*]", "aging")
    if blender is not None:
        strict_load(blender, bl_sd, f"{path} [blender.*]", "aging")
    if latent_avg is not None:
        la = latent_avg.float()
        if la.ndim == 1:
            la = la.unsqueeze(0).expand(decoder.n_latent, -1)
        if tuple(la.shape) != tuple(net.latent_avg.shape):
            raise CheckpointError(f"{path}: latent_avg {tuple(la.shape)} != {tuple(net.latent_avg.shape)}")
        net.latent_avg.copy_(la)
    return net


def load_aging_model(path: str | os.PathLike, use_ema: bool = False, use_blender: bool | None = None) -> AgingNet:
    """The composed network of SPEC §2 from ``sam_ffhq_aging.pt`` or a fork/agingnet run checkpoint.

    ``use_ema=True`` takes the decoder (and the adapter, when the EMA scope holds it) from ``ema.*.shadow``;
    it is an error when the file has no EMA. ``use_blender`` defaults to the checkpoint's ``opts.use_blender``.
    ``net.meta`` records kind, global_step, opts and whether EMA weights are in use.
    """
    ckpt = read_checkpoint(path, "aging")
    _expect_kind(ckpt, path, "aging")
    sd = dict(ckpt["state_dict"])
    opts = ckpt.get("opts") or {}
    ema = ckpt.get("ema")
    if use_ema:
        if not ema:
            raise CheckpointError(f"{path}: use_ema=True but the checkpoint holds no 'ema' entry")
        for scope, entry in ema.items():
            for k, v in entry["shadow"].items():
                sd[f"{scope}.{k}"] = v
    if use_blender is None:
        use_blender = bool(opts.get("use_blender", False))
    net = aging_net_from_state(sd, ckpt.get("latent_avg"), path, opts, use_blender=use_blender)
    net.meta = {"kind": "fork" if "global_step" in ckpt else "sam", "global_step": int(ckpt.get("global_step", 0)),
                "opts": dict(opts), "used_ema": bool(use_ema), "has_ema": bool(ema)}
    # the base's EMA shadow, handed to the EMA callback so it does not read the file again (it drops it)
    net.base_ema = {scope: dict(e["shadow"]) for scope, e in ema.items()} if ema else None
    return net.eval()


def ema_shadow(path: str | os.PathLike) -> dict[str, dict[str, Tensor]] | None:
    """The ``ema`` scopes of a fork checkpoint as {scope: shadow state dict}, or None."""
    ckpt = read_checkpoint(path, "aging")
    ema = ckpt.get("ema")
    return {scope: dict(e["shadow"]) for scope, e in ema.items()} if ema else None


def init_encoder_from_irse50(encoder: GradualStyleEncoder, path: str | os.PathLike,
                             generator: torch.Generator | None = None) -> None:
    """Fresh S1 encoder from ``model_ir_se50.pth`` (SPEC §2): input layer and body copied; for a 4-channel
    encoder the input conv is widened — RGB slices copied, the age slice drawn from N(0, 1)."""
    sd = read_checkpoint(path, "arcface")
    _expect_kind(sd, path, "arcface")
    own = encoder.state_dict()
    take = {k: v for k, v in sd.items() if k.startswith(("input_layer.", "body."))}
    w = take["input_layer.0.weight"]
    if encoder.input_nc != w.shape[1]:
        wide = torch.randn(w.shape[0], encoder.input_nc, *w.shape[2:], generator=generator)
        wide[:, : w.shape[1]] = w
        take["input_layer.0.weight"] = wide
    bad = [k for k, v in take.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"{path}: IR-SE50 body does not fit the encoder: {', '.join(bad[:5])}")
    own.update(take)
    encoder.load_state_dict(own, strict=True)


# ---------------------------------------------------------------- export


def export_state(net: AgingNet, ema: Mapping[str, Mapping[str, Tensor]] | None = None, ema_as_primary: bool = False,
                 ema_decay: float | None = None, opts: Mapping[str, Any] | None = None, global_step: int = 0,
                 optimizer: Mapping | None = None) -> dict[str, Any]:
    """A checkpoint dict in the SAM/fork layout: ``state_dict`` (encoder./decoder./pretrained_encoder./blender.),
    ``latent_avg``, ``opts``, ``global_step`` and, with EMA, ``ema`` {scope: {decay, shadow}}. With
    ``ema_as_primary`` the EMA weights replace the raw ones in ``state_dict`` (the EMA entry is kept)."""
    sd = {f"{name}.{k}": v.detach().cpu().clone() for name in ("encoder", "decoder", "pretrained_encoder", "blender")
          if getattr(net, name, None) is not None for k, v in getattr(net, name).state_dict().items()}
    if ema and ema_as_primary:
        for scope, shadow in ema.items():
            for k, v in shadow.items():
                key = f"{scope}.{k}"
                if key not in sd:
                    raise KeyError(f"EMA scope {scope!r} key {k!r} is not a parameter of the network")
                sd[key] = v.detach().cpu().clone()
    out: dict[str, Any] = {
        "state_dict": sd,
        "latent_avg": net.latent_avg.detach().cpu().clone(),
        "opts": {"output_size": net.decoder.size, "input_nc": 4, "start_from_encoded_w_plus":
                 net.pretrained_encoder is not None, "use_blender": net.use_blender, **dict(opts or {})},
        "global_step": int(global_step),
    }
    if ema:
        out["ema"] = {scope: {"decay": float(ema_decay or 0.0), "shadow": {k: v.detach().cpu().clone()
                                                                          for k, v in shadow.items()}}
                      for scope, shadow in ema.items()}
        out["ema_scope"] = "+".join(ema)
        out["ema_decay"] = float(ema_decay or 0.0)
    if optimizer is not None:
        out["optimizer"] = optimizer
    return out


def export_checkpoint(net: AgingNet, path: str | os.PathLike, **kw: Any) -> Path:
    """Write :func:`export_state` atomically to ``path`` (readable by SAM's tools and :func:`load_aging_model`)."""
    return atomic_torch_save(export_state(net, **kw), path)

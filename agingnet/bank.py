"""Build and inspect impostor banks (SPEC §5).

    python -m agingnet.bank build --images DIR --arcface model_ir_se50.pth --dex dex_age_classifier.pth \\
        --out banks/ffhq_ir50_age_5y.pt [--batch-size 32] [--device auto|cpu|cuda] [--blur-threshold 60] \\
        [--actor-dir DIR --actor-max-sim 0.65]
    python -m agingnet.bank inspect banks/ffhq_ir50_age_5y.pt

The reusable core is :func:`build_bank`, which takes any ``embed_fn`` / ``age_fn``.
Blur measure: variance of the 3×3 Laplacian ``[[0,1,0],[1,−4,1],[0,1,0]]`` (valid region, no padding) of the
grey image ``0.299R + 0.587G + 0.114B`` on the 0…255 scale at 256 px; images below ``blur_threshold`` are
dropped. Actor filter: an image is dropped when ``max_c ⟨e, c⟩ ≥ actor_max_sim`` over the actor centres c.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F

from agingnet.data.datasets import to_rgb8
from agingnet.impostor_bank import MAX_AGE, MIN_AGE, ImpostorBank, default_meta
from agingnet.io import file_sha256
from agingnet.viz import from_uint8

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SIZE = 256
_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
_LUMA = torch.tensor([0.299, 0.587, 0.114])


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def load_image(path: str | Path, size: int = SIZE) -> Tensor:
    """RGB image resized (bilinear) to ``size``², as [3,size,size] in [−1, 1]."""
    with Image.open(path) as im:
        im = to_rgb8(im)
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        return from_uint8(np.asarray(im, dtype=np.uint8))


def laplacian_variance(images: Tensor) -> Tensor:
    """Var of the 3×3 Laplacian of the grey image (0…255 scale, valid conv): [B,3,H,W] in [−1,1] → [B]."""
    if not (images.ndim == 4 and images.shape[1] == 3):
        raise ValueError(f"expected [B,3,H,W], got {tuple(images.shape)}")
    grey = torch.einsum("bchw,c->bhw", (images.float() + 1) * 127.5, _LUMA.to(images.device))[:, None]
    lap = F.conv2d(grey, _LAPLACIAN.to(images.device)[None, None])
    return lap.flatten(1).var(dim=1, unbiased=False)


class _ImageList(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, bool]:
        try:
            return load_image(self.paths[i]), True
        except (OSError, ValueError) as e:
            warnings.warn(f"bank build: cannot read {self.paths[i]} ({e}); skipped", stacklevel=2)
            return torch.zeros(3, SIZE, SIZE), False


@torch.no_grad()
def build_bank(image_paths: Iterable[str | Path], embed_fn: Callable[[Tensor], Tensor],
               age_fn: Callable[[Tensor], Tensor], batch_size: int = 32, blur_threshold: float | None = None,
               actor_embeddings: Tensor | None = None, actor_max_sim: float = 0.65, progress: bool = True,
               device: str | torch.device = "cpu", num_workers: int = 0) -> ImpostorBank:
    """Embed and age every image, drop blurry / actor-like / out-of-range ones, bin by age.

    ``embed_fn(images [B,3,256,256] in [−1,1]) -> [B,D]`` (L2-normalized), ``age_fn(images) -> [B]`` years.
    Drop counts go to ``meta`` (n_unreadable, n_blurry, n_actor, n_out_of_range).
    """
    from tqdm.auto import tqdm

    paths = [Path(p) for p in image_paths]
    if not paths:
        raise ValueError("bank build: no images given")
    if batch_size < 1:
        raise ValueError(f"bank build: batch_size must be ≥ 1, got {batch_size}")
    actors = None
    if actor_embeddings is not None:
        if not (actor_embeddings.ndim == 2):
            raise ValueError(f"actor embeddings must be [A,D], got {tuple(actor_embeddings.shape)}")
        actors = F.normalize(actor_embeddings.float(), dim=1).to(device)
    loader = torch.utils.data.DataLoader(_ImageList(paths), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers)
    embs, ages = [], []
    n = dict(n_unreadable=0, n_blurry=0, n_actor=0)
    for img, ok in tqdm(loader, desc="bank", unit="batch", disable=not progress):
        img, ok = img.to(device), ok.to(device)
        n["n_unreadable"] += int((~ok).sum())
        keep = ok
        if blur_threshold is not None:
            sharp = laplacian_variance(img) >= blur_threshold
            n["n_blurry"] += int((ok & ~sharp).sum())
            keep = keep & sharp
        if not bool(keep.any()):
            continue
        img = img[keep]
        e = embed_fn(img).float()
        if not (e.ndim == 2 and e.shape[0] == img.shape[0]):
            raise ValueError(f"embed_fn must return [B,D], got {tuple(e.shape)}")
        a = age_fn(img).float().reshape(-1)
        if not (a.shape == (img.shape[0],)):
            raise ValueError(f"age_fn must return [B] ages, got {tuple(a.shape)}")
        if actors is not None:
            not_actor = (e @ actors.T).amax(dim=1) < actor_max_sim
            n["n_actor"] += int((~not_actor).sum())
            e, a = e[not_actor], a[not_actor]
        embs.append(e.cpu())
        ages.append(a.cpu())
    if not embs:
        raise ValueError(f"bank build: every image was dropped ({n})")
    emb, age = torch.cat(embs), torch.cat(ages)
    n["n_out_of_range"] = int(((age < MIN_AGE) | (age > MAX_AGE) | ~torch.isfinite(age)).sum())
    try:
        common = os.path.commonpath([str(p.parent) for p in paths])
    except ValueError:  # mixed absolute and relative paths
        common = ""
    meta = default_meta(source=common, n_images=len(paths), blur_threshold=blur_threshold,
                        actor_max_sim=actor_max_sim if actors is not None else None, **n)
    return ImpostorBank.from_embeddings(emb, age, meta=meta, source=f"<build of {common or 'images'}>")


def actor_centres(actor_dir: str | Path, embed_fn: Callable[[Tensor], Tensor], batch_size: int = 32,
                  device: str | torch.device = "cpu") -> Tensor:
    """One centre per actor: normalize(mean of the image embeddings), [A,D].

    Images directly in ``actor_dir`` form one actor; each sub-folder holding images is another.
    """
    actor_dir = Path(actor_dir)
    groups: dict[Path, list[Path]] = {}
    for p in list_images(actor_dir):
        actor = actor_dir if p.parent == actor_dir else actor_dir / p.relative_to(actor_dir).parts[0]
        groups.setdefault(actor, []).append(p)
    if not groups:
        raise ValueError(f"actor folder {actor_dir} holds no images ({', '.join(IMAGE_EXTS)})")
    centres = []
    with torch.no_grad():
        for _, files in sorted(groups.items()):
            e = torch.cat([embed_fn(torch.stack([load_image(f) for f in files[i:i + batch_size]]).to(device))
                           for i in range(0, len(files), batch_size)])
            centres.append(F.normalize(e.float().mean(0), dim=0))
    return torch.stack(centres).cpu()


def format_summary(bank: ImpostorBank, path: str | Path) -> str:
    """Plain table: per-bin count, mean/min/max age and embedding-norm range, then totals and meta."""
    lines = [f"impostor bank {path}: {len(bank)} embeddings, dim {bank.dim}",
             f"{'bin':>6} {'count':>7} {'mean_age':>9} {'min_age':>8} {'max_age':>8} "
             f"{'norm_min':>9} {'norm_max':>9}"]
    for r in bank.summary():
        lines.append(f"{r['bin']:>6} {r['count']:>7d} {r['mean_age']:>9.2f} {r['min_age']:>8.2f} "
                     f"{r['max_age']:>8.2f} {r['norm_min']:>9.5f} {r['norm_max']:>9.5f}")
    norms = bank.embeddings.norm(dim=1)
    dev = float((norms - 1).abs().max())
    lines.append(f"norm check: max |‖e‖ − 1| = {dev:.2e} ({'ok' if dev < 1e-3 else 'LOOSE'})")
    for k, v in bank.meta.items():
        lines.append(f"meta.{k}: {v}")
    return "\n".join(lines)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available")
    return torch.device(name)


def _net_path(value: Path, kind: str) -> Path:
    """``world`` names the aging world's shipped network of that kind; anything else is a file."""
    if str(value) == "world":
        from agingnet.world.weights import weight_path

        return weight_path(kind)
    return value


def _cmd_build(args: argparse.Namespace) -> int:
    from agingnet.losses.base import FrozenNets
    from agingnet.pretrained import load_arcface, load_dex

    device = _resolve_device(args.device)
    files = {"arcface": _net_path(args.arcface, "arcface"), "dex": _net_path(args.dex, "dex")}
    nets = FrozenNets(arcface=load_arcface(files["arcface"]), dex=load_dex(files["dex"])).to(device)
    paths = list_images(args.images)
    if not paths:
        raise ValueError(f"image folder {args.images} holds no images ({', '.join(IMAGE_EXTS)})")
    actors = None
    if args.actor_dir is not None:
        actors = actor_centres(args.actor_dir, nets.embed_face, args.batch_size, device)
    bank = build_bank(paths, nets.embed_face, nets.predict_age, batch_size=args.batch_size,
                      blur_threshold=args.blur_threshold, actor_embeddings=actors,
                      actor_max_sim=args.actor_max_sim, progress=not args.quiet, device=device,
                      num_workers=args.workers)
    bank.meta["source"] = str(args.images)
    # what embedded it (the files that exist): a rebuilt network makes the bank stale
    # (agingnet.world.run_setup.prepare_bank rebuilds on a mismatch)
    bank.meta["nets_sha256"] = {k: file_sha256(p) for k, p in files.items() if Path(p).is_file()}
    bank.save(args.out)
    print(format_summary(bank, args.out))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    print(format_summary(ImpostorBank.load(args.path), args.path))
    return 0


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agingnet.bank",
                                description="Build or inspect an impostor bank (SPEC §5).")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="embed a folder of aligned faces into an age-binned impostor bank")
    b.add_argument("--images", required=True, type=Path,
                   help="folder of aligned faces (searched recursively)")
    b.add_argument("--arcface", required=True, type=Path, help="model_ir_se50.pth, or `world`: the aging world's")
    b.add_argument("--dex", required=True, type=Path, help="dex_age_classifier.pth, or `world`: the aging world's")
    b.add_argument("--out", required=True, type=Path, help="bank file to write (atomically)")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    b.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    b.add_argument("--blur-threshold", type=float, default=None,
                   help="drop images whose Laplacian variance (grey, 0..255) is below this")
    b.add_argument("--actor-dir", type=Path, default=None, help="actor images (one sub-folder per actor)")
    b.add_argument("--actor-max-sim", type=float, default=0.65,
                   help="drop images with cos ≥ this to an actor centre")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_build)
    i = sub.add_parser("inspect", help="per-bin counts, mean age and a norm check")
    i.add_argument("path", type=Path)
    i.set_defaults(func=_cmd_inspect)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (1 with a one-line message on a bad file or value)."""
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"agingnet.bank: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""ROI-ID: identity agreement of face regions (eyes, mouth, …) of source and generated image (SPEC §4, §6).

value = mean over valid (sample b, region r) pairs of 1 − cos(f(crop(y_b, B^src_br)), f(crop(ŷ_b, B^gen_br)))

f = the identity loss's own feature path (``ctx.nets.embed_face``, SPEC §4, as the fork): the ROI crop is
average-pooled to 256, cut to crop C = [35:223, 32:220] and pooled to the IR-SE50 input size. Landmarks are
found on y and on ŷ (detached; detection is not differentiated) and give per-region boxes
(:func:`agingnet.roi.region_boxes`), fallback boxes where detection failed; every box, fallback or not, is
padded to a square of side max(w, h)·(1 + pad), jittered independently (centre ±j·s, scale 1 ± j), then
clipped, cropped and resized to ``size``. A pair is valid when both boxes keep sides of at least
``MIN_SIDE`` px after clipping and, with ``fallback=False``, both detections succeeded. Only the crop of ŷ
carries gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from agingnet.landmarks import build_landmarks
from agingnet.losses.base import LossContext, LossTerm
from agingnet.roi import check_region, crop_boxes, jitter_boxes, region_boxes

MIN_SIDE = 4.0


class ROIIDLoss(LossTerm):
    """Region identity loss; logs ``roi_pairs_<region>``, ``roi_id_<region>`` and ``landmark_failures``.

    Args: ``regions`` names from :data:`agingnet.roi.REGIONS`; ``size`` side of the ROI crop handed to f;
    ``pad`` box padding; ``jitter`` j; ``landmarks`` backend ("template" | "dlib" | "fan"); ``landmarks_model``
    the dlib .dat path; ``seed`` of the jitter generator; ``fallback``: use the fallback boxes when landmarks fail
    (else drop the pair).
    """

    default_passes = ("real",)

    def __init__(self, regions: Sequence[str] = ("eyes", "mouth"), size: int = 112, pad: float = 0.35,
                 jitter: float = 0.06, landmarks: str = "template", landmarks_model: str | None = None,
                 seed: int = 0, fallback: bool = True):
        super().__init__()
        self.regions = tuple(check_region(r) for r in regions)
        if not self.regions:
            raise ValueError("ROIIDLoss needs at least one region (roi regions is empty)")
        if size < 2 or pad < 0 or jitter < 0:
            raise ValueError(f"ROIIDLoss: need size >= 2, pad >= 0, jitter >= 0; got {size}, {pad}, {jitter}")
        self.size, self.pad, self.jitter, self.fallback = int(size), float(pad), float(jitter), bool(fallback)
        kw = {"model_path": landmarks_model} if landmarks == "dlib" else {}
        self.detector = build_landmarks(landmarks, **kw)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.last_stats: dict[str, float] = {}

    def _boxes(self, points: Tensor, valid: Tensor, region: str, side: int) -> tuple[Tensor, Tensor]:
        """Jittered, clipped boxes and whether each is usable (big enough; detected unless fallback)."""
        boxes, fell_back = region_boxes(points, valid, region, side, self.pad, clip=False)
        boxes = jitter_boxes(boxes, self.jitter, self.generator, size=side)  # clipped after the jitter
        ok = ((boxes[:, 2:] - boxes[:, :2]) >= MIN_SIDE).all(dim=1)
        return boxes, ok if self.fallback else ok & ~fell_back

    def forward(self, ctx: LossContext) -> tuple[Tensor, dict[str, Any]]:
        y, y_hat = ctx.y, ctx.y_hat
        if not (y_hat.ndim == 4 and y_hat.shape[1] == 3 and y_hat.shape[-1] == y_hat.shape[-2]):
            raise ValueError(f"ROI-ID expects square images [B,3,S,S], got {tuple(y_hat.shape)}")
        b, side = y_hat.shape[0], int(y_hat.shape[-1])
        provider = ctx.extra.get("source_landmarks_provider")  # the module's per-(file, flip) cache
        with torch.no_grad():
            pts_s, val_s = provider(self.detector) if provider is not None else self.detector(y.detach())
            pts_g, val_g = self.detector(y_hat.detach())
        src_crops, gen_crops, masks = [], [], []
        for region in self.regions:  # a handful of regions; each step is vectorised over the batch
            box_s, ok_s = self._boxes(pts_s, val_s, region, side)
            box_g, ok_g = self._boxes(pts_g, val_g, region, side)
            masks.append(ok_s & ok_g)
            src_crops.append(crop_boxes(y.detach(), box_s, self.size))
            gen_crops.append(crop_boxes(y_hat, box_g, self.size))
        mask = torch.cat(masks)  # [R·B], region-major
        n = int(mask.sum())
        failures = float((~val_s).sum() + (~val_g).sum())
        logs: dict[str, Any] = {"landmark_failures": failures}
        if n == 0:
            value = y_hat.sum() * 0.0  # graph-connected zero: no valid pair this step
            per_pair = y_hat.new_zeros(mask.shape)
        else:
            with torch.no_grad():
                f_s = ctx.nets.embed_face(torch.cat(src_crops)[mask])
            f_g = ctx.nets.embed_face(torch.cat(gen_crops)[mask])
            if not (f_s.shape == f_g.shape and f_s.shape[0] == n):
                raise ValueError(f"embed_face returned {tuple(f_g.shape)}")
            dist = 1 - F.cosine_similarity(f_g, f_s, dim=1)
            value = dist.mean()
            per_pair = y_hat.new_zeros(mask.shape, dtype=dist.dtype).masked_scatter(mask, dist.detach())
        stats = {"landmark_failures": failures, "value": float(value.detach())}
        for r, (region, m) in enumerate(zip(self.regions, masks)):
            k = float(m.sum())
            stats[f"roi_pairs_{region}"] = logs[f"roi_pairs_{region}"] = k
            stats[f"roi_id_{region}"] = float(per_pair[r * b:(r + 1) * b].sum()) / max(k, 1.0)
            logs[f"roi_id_{region}"] = stats[f"roi_id_{region}"]
        self.last_stats = stats
        return value, logs

"""ROI boxes, jitter, crops and the ROI-ID loss term (SPEC §6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import pool_matrix
from torch import nn

from agingnet.landmarks import TEMPLATE_68
from agingnet.losses import roi_id as roi_id_module
from agingnet.losses.base import FrozenNets, LossContext
from agingnet.losses.roi_id import ROIIDLoss
from agingnet.roi import FALLBACK, REGIONS, clip_boxes, crop_boxes, jitter_boxes, region_boxes


class TinyEmbed(nn.Module):
    """Deterministic stand-in for IR-SE50: [N,3,112,112] → L2-normalized [N,16]."""

    input_size = 112

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv = nn.Conv2d(3, 8, 8, stride=8)
        self.fc = nn.Linear(8 * 14 * 14, 16)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, x):
        return F.normalize(self.fc(torch.tanh(self.conv(x)).flatten(1)), dim=1)


class MeanEmbed(nn.Module):
    """A cheap stand-in where only the crop geometry matters: normalized channel means."""

    input_size = 112

    def forward(self, x):
        return F.normalize(x.mean((2, 3)) + 2, dim=1)


def make_ctx(y, y_hat, nets):
    b = y.shape[0]
    z = torch.zeros(b)
    return LossContext(x=y, y=y, y_hat=y_hat, codes=torch.zeros(b, 14, 512), latent_avg=torch.zeros(14, 512),
                       input_ages=z, target_ages=z, nets=nets)


def face_batch(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    # smooth random images so that crops differ in content
    return F.interpolate(torch.rand(b, 3, 16, 16, generator=g) * 2 - 1, size=256, mode="bilinear")


def landmark_points(b=1):
    """Eyes spread over x 100..140, y 110..120; mouth over x 90..170, y 180..200; other points far away."""
    p = torch.zeros(b, 68, 2)
    p[:, :36] = torch.tensor([5.0, 5.0])
    p[:, 36:48] = torch.tensor([120.0, 115.0])
    p[:, 36, :] = torch.tensor([100.0, 110.0])
    p[:, 45, :] = torch.tensor([140.0, 120.0])
    p[:, 48:68] = torch.tensor([130.0, 190.0])
    p[:, 48, :] = torch.tensor([90.0, 180.0])
    p[:, 54, :] = torch.tensor([170.0, 200.0])
    return p


def test_region_indices():
    assert REGIONS["eyes"] == tuple(range(36, 48)) and REGIONS["mouth"] == tuple(range(48, 68))
    assert REGIONS["nose"] == tuple(range(27, 36))
    assert set(REGIONS["broweyes"]) == set(range(17, 27)) | set(range(36, 48))


def test_region_boxes_from_known_landmarks():
    pts = landmark_points(2)
    boxes, fb = region_boxes(pts, torch.tensor([True, True]), "eyes", 256, pad=0.35)
    # w = 40, h = 10 → s = 54; centre (120.5, 115.5)
    assert torch.allclose(boxes, torch.tensor([[93.5, 88.5, 147.5, 142.5]] * 2))
    assert not fb.any()
    boxes, _ = region_boxes(pts, torch.tensor([True, True]), "mouth", 256, pad=0.0)
    # w = 80, h = 20 → s = 80; centre (130.5, 190.5)
    assert torch.allclose(boxes[0], torch.tensor([90.5, 150.5, 170.5, 230.5]))


def _padded_square(rel, size, pad):
    """SPEC §6 by hand: side max(w, h)·(1 + pad) around the centre of the relative box rel·size."""
    x0, y0, x1, y1 = (v * size for v in rel)
    cx, cy, s = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * (1 + pad)
    return torch.tensor([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2])


def test_fallback_boxes_are_padded_squares_and_flagged():
    pts = landmark_points(3)
    pts[2, 40] = float("nan")
    boxes, fb = region_boxes(pts, torch.tensor([True, False, True]), "mouth", 200, pad=0.35)
    assert fb.tolist() == [False, True, True]
    expect = _padded_square((0.35, 0.60, 0.65, 0.86), 200, 0.35)  # 60 × 52 → side 81, centre (100, 146)
    assert torch.allclose(expect, torch.tensor([59.5, 105.5, 140.5, 186.5]))
    assert torch.allclose(boxes[1], expect) and torch.allclose(boxes[2], expect)
    assert not torch.allclose(boxes[0], expect)
    for r, rel in FALLBACK.items():
        for pad in (0.0, 0.35):
            b, f = region_boxes(pts[:1], torch.tensor([False]), r, 256, pad=pad, clip=False)
            assert f.all() and torch.allclose(b[0], _padded_square(rel, 256, pad), atol=1e-4), (r, pad)


def test_boxes_are_clipped():
    pts = landmark_points(1)
    pts[0, 36:48] = torch.tensor([3.0, 250.0])
    pts[0, 36] = torch.tensor([-20.0, 240.0])
    boxes, _ = region_boxes(pts, torch.tensor([True]), "eyes", 256)
    assert boxes[0, 0] == 0 and boxes[0, 3] == 256 and (boxes[0, 2:] > boxes[0, :2]).all()
    far = clip_boxes(torch.tensor([[300.0, 300.0, 400.0, 400.0]]), 256)
    assert torch.allclose(far, torch.tensor([[255.0, 255.0, 256.0, 256.0]]))


def test_unknown_region():
    with pytest.raises(ValueError, match="unknown ROI region 'ears'"):
        region_boxes(landmark_points(), torch.tensor([True]), "ears", 256)
    with pytest.raises(ValueError, match="'ears'"):
        ROIIDLoss(regions=("eyes", "ears"))


def test_jitter_bounds_and_reproducibility():
    n, j = 4000, 0.1
    boxes = torch.tensor([[100.0, 80.0, 160.0, 120.0]]).repeat(n, 1)  # w 60, h 40, s 60
    out = jitter_boxes(boxes, j, torch.Generator().manual_seed(7))
    c = (out[:, :2] + out[:, 2:]) / 2
    shift = c - torch.tensor([130.0, 100.0])
    scale = (out[:, 2:] - out[:, :2]) / torch.tensor([60.0, 40.0])
    assert shift.abs().max() <= j * 60 + 1e-4 and shift.abs().max() > 0.95 * j * 60
    assert torch.allclose(scale[:, 0], scale[:, 1])  # one scale for both sides
    assert scale.min() >= 1 - j - 1e-5 and scale.max() <= 1 + j + 1e-5
    assert scale.min() < 1 - 0.95 * j and scale.max() > 1 + 0.95 * j
    assert abs(shift[:, 0].mean()) < 0.3 and abs(torch.corrcoef(shift.T)[0, 1]) < 0.1  # independent axes
    again = jitter_boxes(boxes, j, torch.Generator().manual_seed(7))
    other = jitter_boxes(boxes, j, torch.Generator().manual_seed(8))
    assert torch.equal(out, again) and not torch.equal(out, other)
    assert torch.equal(jitter_boxes(boxes, 0.0, torch.Generator()), boxes)
    clipped = jitter_boxes(torch.tensor([[0.0, 0.0, 50.0, 50.0]]).repeat(100, 1), 0.2,
                           torch.Generator().manual_seed(0), size=64)
    assert clipped.min() >= 0 and clipped.max() <= 64
    with pytest.raises(ValueError, match="jitter must be >= 0"):
        jitter_boxes(boxes, -0.1)


def test_crop_samples_pixel_centres_and_gradient():
    # ramp image: value = x index in channel 0, y index in channel 1; bilinear sampling is exact on it
    s = 64
    yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32),
                            indexing="ij")
    img = torch.stack([xx, yy, xx + yy])[None].repeat(2, 1, 1, 1).requires_grad_(True)
    boxes = torch.tensor([[10.0, 20.0, 30.0, 30.0], [0.0, 0.0, 64.0, 64.0]])
    out = crop_boxes(img, boxes, 8)
    assert out.shape == (2, 3, 8, 8)
    i = torch.arange(8, dtype=torch.float32)
    exp_x0 = 10 - 0.5 + (i + 0.5) * 20 / 8  # x0 − 0.5 + (i + 0.5)·w/out
    exp_y0 = 20 - 0.5 + (i + 0.5) * 10 / 8
    assert torch.allclose(out[0, 0, 0], exp_x0, atol=1e-3)
    assert torch.allclose(out[0, 1, :, 0], exp_y0, atol=1e-3)
    exp_full = -0.5 + (i + 0.5) * 8  # whole image at 8 px: centres of 8-px blocks
    assert torch.allclose(out[1, 0, 3], exp_full, atol=1e-3)
    out[0].sum().backward()
    g = img.grad[0, 0]
    assert g[20:30, 10:30].sum() > 0 and g[40:, :].abs().sum() == 0 and img.grad[1].abs().sum() == 0
    with pytest.raises(ValueError, match=r"boxes must be \[2,4\]"):
        crop_boxes(img, boxes[:1], 8)


def _manual_crop(img, box, out):
    """Independent crop: grid_sample at continuous positions x0 + (i + 0.5)·w/out (align_corners=False)."""
    x0, y0, x1, y1 = box.tolist()
    t = (torch.arange(out, dtype=torch.float32) + 0.5) / out
    gx = 2 * (x0 + t * (x1 - x0)) / img.shape[-1] - 1
    gy = 2 * (y0 + t * (y1 - y0)) / img.shape[-2] - 1
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]
    return F.grid_sample(img[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def _template_box(rel_idx, size, pad):
    """Box from the raw TEMPLATE_68 numbers: x = u·S − 0.5, square side max(w,h)(1+pad) around the centre."""
    pts = [(u * size - 0.5, v * size - 0.5) for k, (u, v) in enumerate(TEMPLATE_68) if k in rel_idx]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    cx, cy = (min(xs) + max(xs)) / 2 + 0.5, (min(ys) + max(ys)) / 2 + 0.5
    s = max(max(xs) - min(xs), max(ys) - min(ys)) * (1 + pad)
    return torch.tensor([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2])


def _id_path(img):
    """f's input by hand (SPEC §4): pool the [3,S,S] image to 256, crop C = rows 35:223, cols 32:220, pool to 112."""
    p256 = pool_matrix(img.shape[-1], 256)
    x = p256 @ img.double() @ p256.T
    x = x[:, 35:223, 32:220]
    p112 = pool_matrix(188, 112)
    return (p112 @ x @ p112.T).float()


class RecordingEmbed(TinyEmbed):
    """TinyEmbed that records every batch it embeds."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return super().forward(x)


def test_roi_id_embeds_the_crop_through_the_id_feature_path():
    """The ROI crop goes through f of the id loss: pooled to 256, crop C, pooled to 112 (SPEC §4, §6)."""
    emb = RecordingEmbed()
    nets = FrozenNets(arcface=emb)
    y, y_hat = face_batch(2, 0), face_batch(2, 1)
    ROIIDLoss(regions=("eyes",), jitter=0.0, landmarks="template", pad=0.35)(make_ctx(y, y_hat, nets))
    box = _template_box(set(range(36, 48)), 256, 0.35)
    src, gen = emb.inputs  # source crops first (no gradient), then the generated ones
    for b in range(2):
        torch.testing.assert_close(src[b], _id_path(_manual_crop(y[b], box, 112)), atol=2e-4, rtol=0)
        torch.testing.assert_close(gen[b], _id_path(_manual_crop(y_hat[b], box, 112)), atol=2e-4, rtol=0)


def test_roi_id_value_matches_manual_computation():
    torch.manual_seed(0)
    nets = FrozenNets(arcface=TinyEmbed())
    y, y_hat = face_batch(2, 0), face_batch(2, 1).requires_grad_(True)
    loss = ROIIDLoss(regions=("eyes", "mouth"), jitter=0.0, landmarks="template", pad=0.35)
    value, logs = loss(make_ctx(y, y_hat, nets))
    dists = []
    for idx in (range(36, 48), range(48, 68)):
        box = _template_box(set(idx), 256, 0.35)
        for b in range(2):
            a = nets.arcface(_id_path(_manual_crop(y[b], box, 112))[None])
            g = nets.arcface(_id_path(_manual_crop(y_hat[b].detach(), box, 112))[None])
            dists.append(1 - (a * g).sum() / (a.norm() * g.norm()))
    manual = torch.stack(dists).mean()
    assert value.item() == pytest.approx(manual.item(), abs=1e-4)
    assert value.item() > 0.01
    assert logs["roi_pairs_eyes"] == 2 and logs["roi_pairs_mouth"] == 2 and logs["landmark_failures"] == 0
    assert logs["roi_id_eyes"] == pytest.approx(torch.stack(dists[:2]).mean().item(), abs=1e-4)
    assert all(isinstance(v, float) for v in loss.last_stats.values())
    assert loss.last_stats["value"] == pytest.approx(value.item())
    value.backward()
    assert y_hat.grad is not None and y_hat.grad.abs().sum() > 0
    assert y_hat.grad[:, :, :60].abs().sum() == 0  # nothing above the eyes box gets gradient
    assert ROIIDLoss.default_passes == ("real",)


class BoxRecorder:
    """Wraps :func:`agingnet.roi.crop_boxes` and records the boxes the loss crops."""

    def __init__(self):
        self.boxes = []

    def __call__(self, images, boxes, out_size):
        self.boxes.append(boxes.detach().clone())
        return crop_boxes(images, boxes, out_size)


def test_roi_fallback_boxes_are_padded_squared_and_jittered(monkeypatch):
    """Failed landmarks: every fallback box gets side max(w,h)·(1+pad), centre ±j·s and scale 1 ± j (SPEC §6)."""
    rec = BoxRecorder()
    monkeypatch.setattr(roi_id_module, "crop_boxes", rec)
    nets, n, pad, j = FrozenNets(arcface=MeanEmbed()), 100, 0.35, 0.06
    y = face_batch(1, 0).expand(n, -1, -1, -1)
    loss = ROIIDLoss(regions=("eyes", "mouth"), jitter=j, pad=pad, seed=3)
    loss.detector = FakeDetector([False] * n, [False] * n)
    loss(make_ctx(y, y, nets))
    assert len(rec.boxes) == 4  # eyes (source, generated), mouth (source, generated)
    for k, region in enumerate(("eyes", "eyes", "mouth", "mouth")):
        ref = _padded_square(FALLBACK[region], 256, pad)
        assert 0 < ref[0] and ref[2] < 256 and 0 < ref[1] and ref[3] < 256  # inside: the clip does nothing
        s0, c0 = float(ref[2] - ref[0]), (ref[:2] + ref[2:]) / 2
        box = rec.boxes[k]
        side, c = box[:, 2:] - box[:, :2], (box[:, :2] + box[:, 2:]) / 2
        torch.testing.assert_close(side[:, 0], side[:, 1])  # still square after the jitter
        scale, shift = side[:, 0] / s0, (c - c0) / s0
        assert scale.min() >= 1 - j - 1e-5 and scale.max() <= 1 + j + 1e-5
        assert scale.min() < 1 - 0.8 * j and scale.max() > 1 + 0.8 * j
        assert shift.abs().max() <= j + 1e-5 and (shift.abs().amax(dim=0) > 0.8 * j).all()
    assert not torch.equal(rec.boxes[0], rec.boxes[1])  # source and generated crops jittered independently


def test_jitter_uses_the_padded_side_and_clips_afterwards(monkeypatch):
    """A border box: jitter reads the unclipped padded square (s, c); the clip comes last (SPEC §6 order)."""
    rec = BoxRecorder()
    monkeypatch.setattr(roi_id_module, "crop_boxes", rec)
    pad, j, seed, size, n = 0.8, 0.06, 5, 256, 8
    y = face_batch(1, 0).expand(n, -1, -1, -1)
    loss = ROIIDLoss(regions=("broweyes",), jitter=j, pad=pad, seed=seed)
    loss.detector = FakeDetector([False] * n, [False] * n)
    loss(make_ctx(y, y, FrozenNets(arcface=MeanEmbed())))
    ref = _padded_square(FALLBACK["broweyes"], size, pad)  # 133.12·1.8 = 239.6 wide, centre y 96: y0 < 0
    assert ref[1] < 0
    # the source boxes take the generator's first draws: 3 uniforms per box (shift x, shift y, scale)
    u = (torch.rand(n, 3, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * j
    s, c = float(ref[2] - ref[0]), (ref[:2] + ref[2:]) / 2
    c_new, half = c + u[:, :2] * s, (s * (1 + u[:, 2:3])) / 2
    expect = torch.cat([c_new - half, c_new + half], dim=1)
    expect = torch.cat([expect[:, :2].clamp(0, size - 1), expect[:, 2:].clamp(max=size)], dim=1)
    torch.testing.assert_close(rec.boxes[0], expect, atol=1e-4, rtol=0)
    assert (rec.boxes[0][:, 1] == 0).all()


def test_identical_images_give_zero_and_jitter_is_independent():
    nets = FrozenNets(arcface=TinyEmbed())
    y = face_batch(3, 5)
    v0, _ = ROIIDLoss(jitter=0.0)(make_ctx(y, y.clone(), nets))
    assert abs(v0.item()) < 1e-5
    v1, _ = ROIIDLoss(jitter=0.06, seed=1)(make_ctx(y, y.clone(), nets))
    assert v1.item() > 1e-4  # the two crops are jittered independently


class FakeDetector:
    def __init__(self, valid_src, valid_gen):
        self.valid = [torch.tensor(valid_src), torch.tensor(valid_gen)]
        self.calls = 0

    def __call__(self, images):
        b, _, h, w = images.shape
        uv = torch.tensor(TEMPLATE_68)
        pts = (uv * torch.tensor([w, h]) - 0.5).expand(b, 68, 2).clone()
        valid = self.valid[self.calls % 2]
        self.calls += 1
        return pts, valid


def test_failures_fall_back_and_are_counted():
    nets = FrozenNets(arcface=TinyEmbed())
    y, y_hat = face_batch(3, 0), face_batch(3, 1).requires_grad_(True)
    loss = ROIIDLoss(jitter=0.0)
    loss.detector = FakeDetector([True, False, True], [True, True, False])
    v, logs = loss(make_ctx(y, y_hat, nets))
    assert logs["landmark_failures"] == 2 and logs["roi_pairs_eyes"] == 3 and v.item() > 0

    strict = ROIIDLoss(jitter=0.0, fallback=False)
    strict.detector = FakeDetector([True, False, True], [True, True, False])
    v, logs = strict(make_ctx(y, y_hat, nets))
    assert logs["roi_pairs_eyes"] == 1 and logs["roi_pairs_mouth"] == 1
    full = ROIIDLoss(jitter=0.0)
    full_v, _ = full(make_ctx(y[:1], y_hat[:1], nets))
    assert v.item() == pytest.approx(full_v.item(), abs=1e-5)  # only sample 0 remains

    strict.detector = FakeDetector([False, False, False], [True, True, True])
    v, logs = strict(make_ctx(y, y_hat, nets))
    assert v.item() == 0 and v.requires_grad
    assert logs["roi_pairs_eyes"] == 0 and logs["landmark_failures"] == 3
    assert strict.last_stats["roi_pairs_mouth"] == 0.0
    v.backward()  # graph-connected zero
    assert y_hat.grad is not None


def test_constructor_errors():
    with pytest.raises(ValueError, match="unknown landmark backend 'nope'"):
        ROIIDLoss(landmarks="nope")
    with pytest.raises(ValueError, match="at least one region"):
        ROIIDLoss(regions=())


def test_roi_id_with_dlib_on_an_aligned_face():
    pytest.importorskip("dlib")
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    from agingnet.align import FaceAligner

    aligned = FaceAligner("dlib", output_size=256)(Image.fromarray(data.astronaut()))
    y = torch.from_numpy(np.array(aligned)).permute(2, 0, 1)[None].float() / 127.5 - 1
    gray = torch.zeros_like(y)
    nets = FrozenNets(arcface=TinyEmbed())
    loss = ROIIDLoss(landmarks="dlib", jitter=0.0)
    v, logs = loss(make_ctx(y, y.clone(), nets))
    assert abs(v.item()) < 1e-5 and logs["landmark_failures"] == 0 and logs["roi_pairs_mouth"] == 1
    v, logs = loss(make_ctx(y, gray.requires_grad_(True), nets))  # no face in ŷ: fallback boxes, counted
    assert logs["landmark_failures"] == 1 and logs["roi_pairs_eyes"] == 1 and v.item() > 0

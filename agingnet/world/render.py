"""The aging world's renderer: ``render(identity, age) → uint8 [size, size, 3]``, FFHQ-aligned, deterministic.

Who a person is comes only from the identity's own random stream (:func:`identity_traits`, keyed by the identity
and :data:`RENDERER_VERSION`): face shape, skin, eye and hair colour, hair style and strand pattern, and the
person's **aging traits** — graying onset and speed, wrinkle rate, hairline recession, jowl-sag onset and rate,
age-spot onset and count. How old a person looks is a function of the age and those traits
(:func:`age_cues`), so two people of 40 look differently 40. A photo (``photo=`` any tuple of ints, e.g.
``(seed, index)``) adds mild nuisance from its own stream: background tint, lighting tint, a shift of a few
pixels and sensor grain; ``photo=None`` is the canonical portrait (the ground truth the world compares against).

Layout (fractions of ``size``): face oval centred at x=0.5, eyes at y≈0.45 with centres x≈0.38/0.62, nose
from y≈0.50 to 0.62, mouth at y≈0.72 — the FFHQ alignment the networks expect. Drawing uses PIL primitives and
numpy array operations (no per-pixel Python loops). Identities ``< ACTOR_BASE`` are the training population,
identities ``≥ ACTOR_BASE`` are actors, never drawn by the population datasets.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["RENDERER_VERSION", "ACTOR_BASE", "Traits", "check_identity", "identity_traits", "age_cues", "render"]

RENDERER_VERSION = 1  # bump whenever a pixel may change: it enters world.json and dataset fingerprints
ACTOR_BASE = 100_000
MAX_AGE = 100

_SKIN_LIGHT, _SKIN_DARK = np.array([238, 196, 170.0]), np.array([105, 70, 50.0])
_HAIR = np.array(
    [[28, 24, 20], [62, 40, 24], [115, 78, 45], [196, 160, 100], [150, 64, 32]], dtype=np.float64
)
_EYES = np.array(
    [[70, 45, 25], [55, 95, 150], [65, 105, 60], [105, 85, 50], [95, 105, 115]], dtype=np.float64
)
_GREY = np.array([212, 212, 214.0])
_STREAM_TRAITS, _STREAM_TEXTURE, _STREAM_PHOTO = 1, 2, 3
_MAX_SPOTS = 10


def check_identity(identity: object) -> int:
    """The identity as an int; ``TypeError``/``ValueError`` (one line) for anything but a non-negative integer."""
    if isinstance(identity, bool) or not isinstance(identity, numbers.Integral):
        raise TypeError(
            f"world identity must be a non-negative integer, got {type(identity).__name__} {identity!r}"
        )
    if identity < 0:
        raise ValueError(f"world identity must be a non-negative integer, got {identity}")
    return int(identity)


def _check_age(age: object) -> float:
    if isinstance(age, bool) or not isinstance(age, numbers.Real) or not 0 <= float(age) <= MAX_AGE:
        raise ValueError(f"world age must be a number of years in [0, {MAX_AGE}], got {age!r}")
    return float(age)


def _key(*parts: int) -> list[int]:
    """A numpy seed sequence key from signed ints (numpy wants non-negative entries)."""
    out = []
    for p in parts:
        p = int(p)
        out += [abs(p), int(p < 0)]
    return out


@dataclass(frozen=True)
class Traits:
    """One person: appearance (fixed for life) and aging traits (how this person ages)."""

    identity: int
    skin: np.ndarray
    hair: np.ndarray
    eyes: np.ndarray
    background: np.ndarray
    shirt: np.ndarray
    long_hair: bool
    face_w: float  # half face width (fraction of size)
    top: float
    bottom: float
    hairline: float
    eye_dx: float
    eye_y: float
    mouth_w: float
    nose_w: float
    # aging traits
    grey_onset: float  # years: first grey strands
    grey_span: float  # years from onset to fully grey
    wrinkle_rate: float  # multiplies the wrinkle clock
    recession: float  # how far the hairline recedes (0: never)
    recession_onset: float
    sag_onset: float
    sag_rate: float
    spot_onset: float
    spots: np.ndarray  # [_MAX_SPOTS, 3]: x, y, r (fractions); appear one by one after spot_onset


def identity_traits(identity: int) -> Traits:
    """Traits of ``identity`` from its own stream (identity, renderer version): the same person in every run."""
    identity = check_identity(identity)
    rng = np.random.default_rng([identity, RENDERER_VERSION, _STREAM_TRAITS])
    skin = _SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * rng.beta(1.3, 2.0) + rng.normal(0, 6, 3)
    hair = _HAIR[rng.integers(len(_HAIR))] + rng.normal(0, 8, 3)
    eyes = _EYES[rng.integers(len(_EYES))] + rng.normal(0, 8, 3)
    background = rng.uniform(70, 200, 3)
    shirt = rng.uniform(20, 220, 3)
    long_hair = bool(rng.random() < 0.45)
    face_w = 0.235 * rng.uniform(0.92, 1.08)
    top = 0.17 + rng.uniform(-0.015, 0.015)
    bottom = 0.86 + rng.uniform(-0.02, 0.02)
    hairline = 0.27 + rng.uniform(-0.03, 0.02)
    eye_dx = 0.12 + rng.uniform(-0.01, 0.01)
    eye_y = 0.45 + rng.uniform(-0.01, 0.01)
    mouth_w = 0.07 * rng.uniform(0.85, 1.15)
    nose_w = 0.022 * rng.uniform(0.85, 1.2)
    grey_onset = rng.uniform(32.0, 50.0)
    grey_span = rng.uniform(18.0, 32.0)
    wrinkle_rate = rng.uniform(0.85, 1.2)
    recedes = rng.random() < 0.4
    recession = rng.uniform(0.02, 0.04) if recedes else 0.0
    recession_onset = rng.uniform(25.0, 45.0)
    sag_onset = rng.uniform(34.0, 48.0)
    sag_rate = rng.uniform(0.8, 1.3)
    spot_onset = rng.uniform(45.0, 62.0)
    spots = np.stack(
        [rng.uniform(-0.8, 0.8, _MAX_SPOTS), rng.uniform(0.3, 0.8, _MAX_SPOTS), rng.uniform(0.004, 0.01, _MAX_SPOTS)],
        axis=1,
    )
    return Traits(identity, skin, hair, eyes, background, shirt, long_hair, face_w, top, bottom, hairline, eye_dx,
                  eye_y, mouth_w, nose_w, grey_onset, grey_span, wrinkle_rate, recession, recession_onset,
                  sag_onset, sag_rate, spot_onset, spots)


def _clip(v: float) -> float:
    return float(min(max(v, 0.0), 1.0))


def age_cues(traits: Traits, age: float) -> dict[str, float]:
    """How old ``traits`` looks at ``age``: each cue in [0, 1] (``spots`` a count), non-decreasing in age
    except ``child``:

    child = (18−a)/14 · mature = (a−10)/70 · grey = (a−grey_onset)/grey_span ·
    wrinkle = (a−22)·wrinkle_rate/48 · sag = (a−sag_onset)·sag_rate/40 ·
    recession = recession·(a−recession_onset)/30 · spots = ⌊10·(a−spot_onset)/25⌋, each clipped.
    """
    a = _check_age(age)
    t = traits
    return {
        "child": _clip((18 - a) / 14),
        "mature": _clip((a - 10) / 70),
        "grey": _clip((a - t.grey_onset) / t.grey_span),
        "wrinkle": _clip((a - 22) * t.wrinkle_rate / 48),
        "sag": _clip((a - t.sag_onset) * t.sag_rate / 40),
        "recession": t.recession * _clip((a - t.recession_onset) / 30),
        "spots": float(min(_MAX_SPOTS, max(0, math.floor(_MAX_SPOTS * (a - t.spot_onset) / 25)))),
    }


def _rgb(c: np.ndarray | Sequence[float]) -> tuple[int, int, int]:
    r, g, b = np.clip(np.asarray(c, dtype=np.float64), 0, 255).round().astype(int)
    return int(r), int(g), int(b)


def _photo_stream(identity: int, photo: Sequence[int] | int | None) -> np.random.Generator | None:
    if photo is None:
        return None
    parts = (photo,) if isinstance(photo, numbers.Integral) else tuple(photo)
    if not all(isinstance(p, numbers.Integral) and not isinstance(p, bool) for p in parts):
        raise TypeError(f"photo must be an int or a tuple of ints (e.g. (seed, index)), got {photo!r}")
    return np.random.default_rng([identity, RENDERER_VERSION, _STREAM_PHOTO, *_key(*parts)])


def render(identity: int, age: float, size: int = 256, photo: Sequence[int] | int | None = None) -> np.ndarray:
    """Draw ``identity`` at ``age`` years as uint8 ``[size, size, 3]``; ``photo`` selects the nuisance stream.

    A pure function of (identity, age, size, photo, :data:`RENDERER_VERSION`).
    """
    identity = check_identity(identity)
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 8:
        raise ValueError(f"render size must be an integer >= 8, got {size!r}")
    tr = identity_traits(identity)
    cue = age_cues(tr, age)
    prng = _photo_stream(identity, photo)
    S = int(size)
    grey, wrinkle, sag, child, mature = cue["grey"], cue["wrinkle"], cue["sag"], cue["child"], cue["mature"]
    P = lambda x, y: (x * S, y * S)  # noqa: E731  (fractions → pixels)

    skin = tr.skin * (1 - 0.07 * mature - 0.04 * sag)  # duller with age
    shade = skin * 0.82
    hair_base = tr.hair
    bg = tr.background if prng is None else np.clip(tr.background + prng.normal(0, 12, 3), 40, 230)
    fw = tr.face_w * (1 + 0.07 * sag - 0.03 * child)
    top = tr.top + 0.02 * child
    bottom = tr.bottom + 0.035 * sag - 0.04 * child
    hairline = tr.hairline - cue["recession"]
    eye_dx, eye_y = tr.eye_dx, tr.eye_y
    mouth_y = 0.72 + 0.012 * sag - 0.02 * child
    mouth_w = tr.mouth_w * (1 - 0.15 * child)

    t = np.linspace(0.0, 1.0, S)[:, None, None]
    canvas = np.broadcast_to(bg * (1.08 - 0.2 * t), (S, S, 3))
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    hair_mask = Image.new("L", (S, S), 0)
    d, dm = ImageDraw.Draw(img), ImageDraw.Draw(hair_mask)

    def ellipse(cx: float, cy: float, rx: float, ry: float, colour, is_hair: bool = False) -> None:
        box = [*P(cx - rx, cy - ry), *P(cx + rx, cy + ry)]
        d.ellipse(box, fill=_rgb(colour))
        dm.ellipse(box, fill=255 if is_hair else 0)

    # back hair, shoulders, neck, ears, face
    if tr.long_hair:
        ellipse(0.5, 0.55, fw + 0.07, 0.40, hair_base, True)
    ellipse(0.5, 1.12, 0.42, 0.22, tr.shirt)
    d.rectangle([*P(0.5 - 0.6 * fw, 0.70), *P(0.5 + 0.6 * fw, 0.97)], fill=_rgb(shade))
    dm.rectangle([*P(0.5 - 0.6 * fw, 0.70), *P(0.5 + 0.6 * fw, 0.97)], fill=0)
    for sx in (-1, 1):
        ellipse(0.5 + sx * fw, 0.48, 0.03, 0.055 + 0.01 * sag, shade)
    cy, ry = (top + bottom) / 2, (bottom - top) / 2
    ellipse(0.5, 0.25 + 0.5 * top, fw + 0.025, 0.25 - 0.5 * top + 0.07, hair_base, True)  # hair cap behind
    ellipse(0.5, cy, fw, ry, skin)
    if sag > 0:  # jowls widen the lower face
        for sx in (-1, 1):
            ellipse(0.5 + sx * 0.55 * fw, 0.76 + 0.02 * sag, 0.45 * fw + 0.012 * sag, 0.06 + 0.015 * sag, skin)
    # fringe: the cap of the face ellipse above the hairline (PIL angles: clockwise from 3 o'clock)
    s_ = max(-1.0, min(1.0, (hairline - cy) / ry))
    a0, a1 = 180 - math.degrees(math.asin(s_)), 360 + math.degrees(math.asin(s_))
    face_box = [*P(0.5 - fw, top), *P(0.5 + fw, bottom)]
    d.chord(face_box, a0, a1, fill=_rgb(hair_base))
    dm.chord(face_box, a0, a1, fill=255)

    # hair texture: the person's own strand pattern; strand s turns grey once grey > s / 0.92 (monotone in age)
    arr = np.asarray(img).astype(np.float32)
    m = np.asarray(hair_mask) > 0
    rows, cols = max(1, S // 12), max(1, S // 2)  # strands: ~12 px tall, 2 px wide at 256
    tex_rng = np.random.default_rng([identity, RENDERER_VERSION, _STREAM_TEXTURE, S])
    up = lambda a: np.repeat(np.repeat(a, -(-S // rows), axis=0), -(-S // cols), axis=1)[:S, :S]  # noqa: E731
    strands, tone = up(tex_rng.random((rows, cols))), up(tex_rng.random((rows, cols)))
    tex = hair_base[None, None] * (0.8 + 0.4 * tone[..., None])
    g = strands < 0.92 * grey
    tex = np.where(g[..., None], _GREY[None, None] * (0.9 + 0.15 * tone[..., None]), tex)
    arr = np.where(m[..., None], tex, arr)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)

    lw = max(1, round(S / 128))
    brow_col = hair_base + (_GREY - hair_base) * grey
    for sx in (-1, 1):
        ex = 0.5 + sx * eye_dx
        bw = 0.05
        d.line(
            [P(ex - bw, eye_y - 0.05), P(ex, eye_y - 0.062), P(ex + bw, eye_y - 0.052)],
            fill=_rgb(brow_col),
            width=max(1, round(S * (0.012 - 0.004 * grey - 0.002 * mature))),
            joint="curve",
        )
        erx, ery = 0.045 * (1 + 0.2 * child), 0.021 * (1 + 0.3 * child)
        ellipse(ex, eye_y, erx, ery, (240, 238, 232))
        ellipse(ex, eye_y, 0.018 * (1 + 0.15 * child), 0.018 * (1 + 0.15 * child), tr.eyes)
        ellipse(ex, eye_y, 0.008, 0.008, (15, 12, 12))
        ellipse(ex + 0.006, eye_y - 0.006, 0.003, 0.003, (250, 250, 250))
        lid = 0.15 + 0.15 * mature + 0.35 * sag  # drooping upper lid: a skin chord over the top of the eye
        lid_s = max(-1.0, min(1.0, -1 + 2 * lid))
        eye_box = [*P(ex - erx, eye_y - ery), *P(ex + erx, eye_y + ery)]
        b0, b1 = 180 - math.degrees(math.asin(lid_s)), 360 + math.degrees(math.asin(lid_s))
        d.chord(eye_box, b0, b1, fill=_rgb(skin * 0.95))
        d.arc(eye_box, b0, b1, fill=_rgb(shade * 0.55), width=lw)
    tip = 0.615 + 0.015 * sag - 0.03 * child
    d.line([P(0.49, 0.49), P(0.485, tip - 0.01), P(0.5, tip)], fill=_rgb(shade * 0.9), width=lw)
    for sx in (-1, 1):
        ellipse(0.5 + sx * (tr.nose_w - 0.005 * child + 0.004 * mature), tip + 0.004, 0.009, 0.005, shade * 0.55)
    # mouth: lips get thinner and the corners drop with age
    lip = 0.017 * (1 - 0.35 * mature - 0.3 * wrinkle) + 0.004 * child
    lip_col = skin * np.array([0.92, 0.62, 0.62])
    ellipse(0.5, mouth_y - lip * 0.6, mouth_w * 0.9, lip * 0.7, lip_col)
    ellipse(0.5, mouth_y + lip * 0.7, mouth_w * 0.8, lip, lip_col * 1.05)
    droop = 0.018 * sag
    d.line(
        [P(0.5 - mouth_w, mouth_y + droop), P(0.5, mouth_y), P(0.5 + mouth_w, mouth_y + droop)],
        fill=_rgb(lip_col * 0.5),
        width=lw,
        joint="curve",
    )

    arr = np.asarray(img).astype(np.float32)
    if wrinkle > 0 or cue["spots"] > 0:
        arr *= 1.0 - _wrinkle_mask(tr, cue, S, hairline, fw, tip, mouth_y, mouth_w, droop)[..., None]
    if prng is not None:
        arr *= (1 + prng.normal(0, 0.04, 3)).astype(np.float32)  # lighting tint
        dx, dy = prng.integers(-3, 4, 2) * S // 256
        arr = np.roll(np.pad(arr, ((3, 3), (3, 3), (0, 0)), mode="edge"), (int(dy), int(dx)), axis=(0, 1))[3:-3, 3:-3]
        arr += prng.normal(0.0, 3.0, (S, S, 1)).astype(np.float32)  # skin/sensor grain
    return np.clip(arr, 0, 255).round().astype(np.uint8)


def _wrinkle_mask(tr: Traits, cue: dict[str, float], S: int, hairline: float, fw: float, tip: float,
                  mouth_y: float, mouth_w: float, droop: float) -> np.ndarray:
    """Darkening factor [S,S] in [0, 0.45]: wrinkle lines (ink ∝ wrinkle) and the person's age spots."""
    wrinkle, sag = cue["wrinkle"], cue["sag"]
    P = lambda x, y: (x * S, y * S)  # noqa: E731
    lw = max(1, round(S / 128))
    eye_dx, eye_y = tr.eye_dx, tr.eye_y
    wm = Image.new("L", (S, S), 0)
    dw = ImageDraw.Draw(wm)
    ink = int(255 * min(1.0, 0.35 + 0.65 * wrinkle)) if wrinkle > 0 else 0
    if wrinkle > 0:
        for k in range(1 + round(3 * wrinkle)):  # forehead lines
            y = hairline + 0.03 + 0.018 * k
            if y < eye_y - 0.08:
                dw.arc([*P(0.5 - 0.7 * fw, y), *P(0.5 + 0.7 * fw, y + 0.05)], 200, 340, fill=ink, width=lw)
        for sx in (-1, 1):
            ox = 0.5 + sx * (eye_dx + 0.05)
            for k in range(round(1 + 2 * wrinkle)):  # crow's feet
                ang = math.radians(-25 + 25 * k)
                dw.line([P(ox, eye_y), P(ox + sx * 0.035 * math.cos(ang), eye_y + 0.035 * math.sin(ang))],
                        fill=ink, width=lw)
            ex = 0.5 + sx * eye_dx  # under-eye bags
            dw.arc([*P(ex - 0.04, eye_y - 0.01), *P(ex + 0.04, eye_y + 0.04 + 0.01 * sag)], 20, 160, fill=ink,
                   width=lw)
            dw.line([P(0.5 + sx * 0.045, tip - 0.01), P(0.5 + sx * (mouth_w + 0.02), mouth_y + 0.01)],
                    fill=ink, width=lw)  # nasolabial fold
            if sag > 0:  # marionette line
                dw.line([P(0.5 + sx * mouth_w, mouth_y + droop),
                         P(0.5 + sx * (mouth_w + 0.005), mouth_y + 0.03 + 0.05 * sag)], fill=ink, width=lw)
    sm = Image.new("L", (S, S), 0)
    ds = ImageDraw.Draw(sm)
    for x, y, r in tr.spots[: int(cue["spots"])]:  # at most _MAX_SPOTS primitives, not pixels
        x = 0.5 + x * fw
        ds.ellipse([*P(x - r, y - r), *P(x + r, y + r)], fill=255)
    lines = np.asarray(wm, dtype=np.float32) * (0.45 * wrinkle / 255.0)
    return np.maximum(lines, np.asarray(sm, dtype=np.float32) * (0.25 / 255.0))

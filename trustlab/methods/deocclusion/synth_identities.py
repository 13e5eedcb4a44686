"""Seeded synthetic face identities with distinctive, learnable facial structure.

Each *identity* is a fixed draw of ~25 facial attributes from a seeded generator; each *image*
of that identity renders those attributes under per-image nuisances. Recognising who is who
therefore means reading facial structure, never memorising a pixel pattern, and the identities
of the val and test splits are new people (open-set verification, as in LFW).

Identity attributes (drawn once per identity, ``identity_params``):

- face: ellipse half-width and half-height, jaw narrowing towards the chin, skin tone
  (continuous, light to dark), ear size;
- hair: colour (black, dark/light brown, blond, auburn, grey; jittered), fringe height,
  side length, parting (left, centre, right), volume;
- eyes: inter-ocular distance, height, size, aspect, iris colour; optional glasses (frame
  colour, round or square);
- eyebrows: thickness, slant, lift above the eyes, length; colour follows the hair;
- nose: length (tip height), width, bridge shading;
- mouth: width, height, lip thickness, lip colour (tied to the skin tone), resting curvature;
- chin and cheeks: chin cleft, beard / moustache (colour follows the hair), up to two moles
  anywhere on the face.

The upper face (hair, eyes, brows, glasses, skin) and the lower face (nose tip, mouth, jaw,
beard, lower moles) both carry identity. Like real faces, the structure is coherent: most
lower-face attributes follow upper-face ones (mouth and nose width scale with the eye distance,
lip thickness with the eye size, the mouth's height with the nose length, the resting smile
with the brows' slant, beards come with thick brows and share the hair colour, lip colour follows
the skin tone, the jaw the face width), while some are the person's own (chin cleft, moles, the
residual spread of every tied attribute). A face-mask hides the lower-face cues; a completion
model that has learnt the facial structure can predict much of what is under the mask, which is
the signal de-occlusion distillation is meant to exploit.

Per-image nuisances (``render_face``): translation (±5 % of the side), rotation (±10°), scale
(±7 %), expression (smile change, mouth opening, blink), lighting (gain and a directional
gradient), a colour cast, a random background colour, sensor noise and occasional blur.

Images are drawn with OpenCV at 4x the output side and area-downsampled (anti-aliasing). Every
image comes with 8 landmarks in output pixel coordinates, in the order of ``LANDMARKS``:
eyes, nose tip, mouth corners, chin, and the jaw's edge at mouth height -- the face geometry
that ``trustlab.methods.deocclusion.masks`` places masks by.

``build_identity_set`` caches the whole set as one ``.npz`` under ``root``, keyed by its
parameters, so every worker and rerun sees the same arrays.
"""
from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np

from trustlab.methods.deocclusion.masks import LANDMARKS  # noqa: E402  (the landmark order masks expect)

HAIR_COLOURS = np.array([[25, 20, 18], [70, 45, 30], [120, 85, 55], [205, 175, 110], [150, 60, 30], [150, 150, 150]],
                        np.float32)
IRIS_COLOURS = np.array([[60, 40, 25], [40, 90, 160], [70, 120, 70], [110, 110, 120]], np.float32)
SKIN_LIGHT = np.array([240, 205, 180], np.float32)
SKIN_DARK = np.array([95, 60, 40], np.float32)
VERSION = 2  # bump when rendering changes (invalidates caches)


def identity_params(rng: np.random.Generator) -> dict:
    """Draw one identity's attributes (see the module docstring)."""
    u = rng.uniform
    skin_t = u(0.0, 1.0)
    skin = SKIN_LIGHT * (1 - skin_t) + SKIN_DARK * skin_t + rng.normal(0, 6, 3)
    hair = HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))] + rng.normal(0, 10, 3)
    lip = np.array([200, 90, 95], np.float32) * (1 - 0.45 * skin_t) + rng.normal(0, 12, 3)
    face_w = u(0.27, 0.36)
    eye_d, eye_r = u(0.13, 0.19), u(0.028, 0.05)
    eye_y, nose_len = u(-0.12, -0.04), u(0.10, 0.19)
    brow_th, brow_slant = u(0.012, 0.035), u(-0.5, 0.5)
    p_beard = 0.05 + 0.55 * (brow_th - 0.012) / 0.023  # thick brows go with beards
    p = dict(
        skin=np.clip(skin, 0, 255), hair=np.clip(hair, 0, 255), lip=np.clip(lip, 0, 255),
        face_w=face_w, face_h=u(0.36, 0.44), jaw=u(0.62, 0.95) * (0.9 + (face_w - 0.27)),
        ear=u(0.04, 0.075),
        fringe=u(0.0, 1.0), side=u(0.0, 1.0), parting=int(rng.integers(3)), volume=u(0.02, 0.09),
        eye_d=eye_d, eye_y=eye_y, eye_r=eye_r, eye_aspect=u(0.45, 0.85),
        iris=IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))] + rng.normal(0, 8, 3),
        glasses=bool(u() < 0.2), glasses_round=bool(u() < 0.5),
        glasses_col=np.array([[20, 20, 20], [120, 80, 40], [190, 190, 200]], np.float32)[rng.integers(3)],
        brow_th=brow_th, brow_slant=brow_slant, brow_lift=u(0.045, 0.09), brow_len=u(0.7, 1.3),
        # lower face: proportions follow the upper face (coherent facial structure) ...
        nose_len=nose_len, nose_w=eye_d * u(0.25, 0.4), nose_shade=u(0.1, 0.3),
        mouth_w=eye_d * u(0.55, 0.8), mouth_y=eye_y + nose_len + u(0.07, 0.11), lip_th=eye_r * u(0.35, 0.6),
        curve=float(np.clip(1.2 * brow_slant + rng.normal(0, 0.4), -1, 1)),
        beard=int(rng.choice(3, p=[1 - p_beard, p_beard / 2, p_beard / 2])),  # none, moustache, full
        # ... and some of it is the person's own
        cleft=bool(u() < 0.25),
        moles=[(u(-0.25, 0.25), u(-0.2, 0.3), u(0.012, 0.022)) for _ in range(int(rng.integers(0, 3)))],
    )
    return p


def _pt(cx, cy, s):
    return (int(round(cx * s)), int(round(cy * s)))


def render_face(p: dict, rng: np.random.Generator, size: int = 32, supersample: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Render one image of identity ``p`` with random nuisances.

    Returns ``(image HxWx3 uint8, landmarks 8x2 float32 in output pixels, order LANDMARKS)``."""
    import cv2

    S = size * supersample
    sh = 4  # fixed-point shift for sub-pixel drawing
    F = 1 << sh

    def P(x, y):  # face-frame coords (units of the image side, origin at the face centre) -> fixed point
        return (int(round((cx + x) * S * F)), int(round((cy + y) * S * F)))

    def L(v):  # radius / half-axis length, fixed point
        return max(1, int(round(v * S * F)))

    def T(v):  # line thickness in (supersampled) pixels
        return max(1, int(round(v * S)))

    def col(c):
        return tuple(float(v) for v in np.clip(c, 0, 255))

    cx, cy = 0.5, 0.52
    bg = rng.uniform(40, 220, 3)
    img = np.empty((S, S, 3), np.float32)
    img[:] = bg
    aa = cv2.LINE_AA
    skin = p["skin"]
    hair = p["hair"]
    fw, fh = p["face_w"], p["face_h"]
    # hair behind the head
    vol = p["volume"]
    cv2.ellipse(img, P(0, -0.05), (L(fw + vol), L(fh * 0.85 + vol)), 0, 180, 360, col(hair), -1, aa, sh)
    if p["side"] > 0.35:  # long side hair
        ln = 0.1 + 0.35 * p["side"]
        for sgn in (-1, 1):
            pts = np.array([P(sgn * (fw + vol * 0.8), -0.05), P(sgn * (fw + vol * 0.6), ln),
                            P(sgn * (fw - 0.04), ln), P(sgn * (fw - 0.05), -0.05)], np.int32)
            cv2.fillPoly(img, [pts], col(hair), aa, sh)
    # ears
    for sgn in (-1, 1):
        cv2.ellipse(img, P(sgn * fw, 0.0), (L(p["ear"] * 0.6), L(p["ear"])), 0, 0, 360, col(skin * 0.92), -1, aa, sh)
    # face: upper ellipse + jaw (narrowing lower half)
    cv2.ellipse(img, P(0, 0), (L(fw), L(fh)), 0, 180, 360, col(skin), -1, aa, sh)
    jaw_w = fw * p["jaw"]
    jaw = [P(-fw, 0)]
    for t in np.linspace(0, 1, 12):
        w = fw + (jaw_w - fw) * t ** 0.8
        jaw.append(P(-w * math.cos(t * math.pi / 2) ** 0.7, fh * math.sin(t * math.pi / 2)))
    for t in np.linspace(1, 0, 12):
        w = fw + (jaw_w - fw) * t ** 0.8
        jaw.append(P(w * math.cos(t * math.pi / 2) ** 0.7, fh * math.sin(t * math.pi / 2)))
    cv2.fillPoly(img, [np.array(jaw, np.int32)], col(skin), aa, sh)
    # fringe / parting
    top = -fh
    fr = top + 0.04 + 0.16 * p["fringe"]
    part = (-0.12, 0.0, 0.12)[p["parting"]]
    pts = np.array([P(-fw - 0.01, -0.08), P(-fw * 0.8, top - 0.02), P(fw * 0.8, top - 0.02), P(fw + 0.01, -0.08),
                    P(fw * 0.7, fr), P(part, fr - 0.05 * abs(part) - 0.03), P(-fw * 0.7, fr)], np.int32)
    cv2.fillPoly(img, [pts], col(hair), aa, sh)
    # expression nuisances
    smile = p["curve"] + rng.normal(0, 0.35)
    mouth_open = rng.uniform() < 0.2
    blink = rng.uniform() < 0.05
    # eyes
    ey = p["eye_y"]
    for sgn in (-1, 1):
        ex = sgn * p["eye_d"]
        r = p["eye_r"]
        if blink:
            cv2.line(img, P(ex - r, ey), P(ex + r, ey), col(skin * 0.4), T(0.01), aa, sh)
        else:
            cv2.ellipse(img, P(ex, ey), (L(r), L(r * p["eye_aspect"])), 0, 0, 360, col((245, 245, 240)), -1, aa, sh)
            cv2.circle(img, P(ex, ey), L(r * 0.55), col(p["iris"]), -1, aa, sh)
            cv2.circle(img, P(ex, ey), L(r * 0.25), col((10, 10, 10)), -1, aa, sh)
        # brows (inner end at the centre side)
        bl = r * 1.3 * p["brow_len"]
        by = ey - r * p["eye_aspect"] - p["brow_lift"]
        slant = p["brow_slant"] * 0.06
        cv2.line(img, P(ex - sgn * bl * 0.3, by + slant),
                 P(ex + sgn * bl, by - slant), col(hair * 0.7), T(p["brow_th"]), aa, sh)
        if p["glasses"]:
            gr = r * 1.9
            if p["glasses_round"]:
                cv2.circle(img, P(ex, ey), L(gr), col(p["glasses_col"]), T(0.012), aa, sh)
            else:
                cv2.rectangle(img, P(ex - gr, ey - gr * 0.75), P(ex + gr, ey + gr * 0.75), col(p["glasses_col"]), T(0.012), aa, sh)
    if p["glasses"]:
        gr = p["eye_r"] * 1.9
        cv2.line(img, P(-p["eye_d"] + gr, ey), P(p["eye_d"] - gr, ey), col(p["glasses_col"]), T(0.01), aa, sh)
    # nose: bridge shading and tip
    nl, nw = p["nose_len"], p["nose_w"]
    ny = ey + nl
    cv2.line(img, P(0.012, ey + 0.02), P(0.015, ny - 0.02), col(skin * (1 - p["nose_shade"])), T(0.01), aa, sh)
    cv2.ellipse(img, P(0, ny), (L(nw), L(nw * 0.45)), 0, 0, 180, col(skin * 0.7), T(0.012), aa, sh)
    for sgn in (-1, 1):
        cv2.circle(img, P(sgn * nw * 0.45, ny), L(0.008), col(skin * 0.45), -1, aa, sh)
    # beard / moustache (below the nose, colour of the hair)
    my = p["mouth_y"]
    mw = p["mouth_w"]
    if p["beard"] == 2:
        pts = [P(-jaw_w * 1.02, 0.08)]
        for t in np.linspace(-1, 1, 15):
            pts.append(P(t * jaw_w * 1.02 * 0.98, fh * (1 - 0.35 * t * t) + 0.005))
        pts += [P(jaw_w * 1.02, 0.08), P(mw * 1.3, my + 0.06), P(-mw * 1.3, my + 0.06)]
        cv2.fillPoly(img, [np.array(pts, np.int32)], col(hair * 0.85), aa, sh)
    if p["beard"] >= 1:
        cv2.ellipse(img, P(0, (ny + my) / 2 + 0.005), (L(mw * 1.15), L(0.022)), 0, 0, 360, col(hair * 0.85), -1, aa, sh)
    # mouth: lips as a curved band; smile bends the corners up
    th = p["lip_th"]
    c = smile * 0.03
    pts_top, pts_bot = [], []
    for t in np.linspace(-1, 1, 11):
        yy = my - c * t * t + c * 0.5
        pts_top.append(P(t * mw, yy - th * (1 - 0.6 * t * t)))
        pts_bot.append(P(t * mw, yy + th * (1 - 0.5 * t * t) * (2.2 if mouth_open else 1.0)))
    cv2.fillPoly(img, [np.array(pts_top + pts_bot[::-1], np.int32)], col(p["lip"]), aa, sh)
    cv2.polylines(img, [np.array([P(t * mw, my - c * t * t + c * 0.5) for t in np.linspace(-1, 1, 11)], np.int32)],
                  False, col(p["lip"] * 0.45 if not mouth_open else (30, 10, 10)), T(0.008 if not mouth_open else 0.02), aa, sh)
    # chin cleft, moles
    if p["cleft"]:
        cv2.line(img, P(0, fh - 0.055), P(0, fh - 0.015), col(skin * 0.65), T(0.01), aa, sh)
    for mx, mo_y, mr in p["moles"]:
        cv2.circle(img, P(mx, mo_y), L(mr), col(skin * 0.35), -1, aa, sh)

    # geometric nuisance: one similarity transform of the whole canvas (background extended)
    ang = rng.uniform(-10, 10)
    sc = rng.uniform(0.93, 1.07)
    tx, ty = rng.uniform(-0.05, 0.05, 2) * S
    M = cv2.getRotationMatrix2D((cx * S, cy * S), ang, sc)
    M[:, 2] += (tx, ty)
    img = cv2.warpAffine(img, M, (S, S), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=col(bg))
    # lighting: gain, directional gradient, colour cast
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S - 0.5
    th_l = rng.uniform(0, 2 * math.pi)
    grad = 1.0 + rng.uniform(0.0, 0.35) * (np.cos(th_l) * xx + np.sin(th_l) * yy)
    img = img * (rng.uniform(0.75, 1.15) * grad)[..., None] * rng.uniform(0.92, 1.08, 3)
    small = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    if rng.uniform() < 0.2:
        small = cv2.GaussianBlur(small, (3, 3), rng.uniform(0.4, 0.8))
    small = small + rng.normal(0, 4.0, small.shape)
    out = np.clip(np.rint(small), 0, 255).astype(np.uint8)

    # landmarks in the face frame -> transformed -> output pixels
    jaw_at_mouth = fw + (jaw_w - fw) * (my / fh) ** 0.8
    lm = np.array([(-p["eye_d"], ey), (p["eye_d"], ey), (0, ny), (-mw, my), (mw, my), (0, fh),
                   (-jaw_at_mouth, my), (jaw_at_mouth, my)], np.float64)
    pts = (lm + (cx, cy)) * S
    pts = pts @ M[:, :2].T + M[:, 2]
    return out, (pts / supersample - 0.5 * (1 - 1 / supersample)).astype(np.float32)


def _key(params: dict) -> str:
    return hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]


def make_split(seed: int, split_id: int, n_ids: int, per_id: int, size: int, id_offset: int) -> dict:
    """``n_ids`` new identities x ``per_id`` images: ``{x: N x 3 x H x W uint8, y: identity,
    vid: image index, lm: N x 8 x 2 landmarks}``."""
    rng = np.random.default_rng([seed, 7919, split_id])
    xs, ys, lms = [], [], []
    for i in range(n_ids):
        p = identity_params(rng)
        for _ in range(per_id):
            im, lm = render_face(p, rng, size)
            xs.append(im.transpose(2, 0, 1))
            ys.append(id_offset + i)
            lms.append(lm)
    return {"x": np.stack(xs), "y": np.asarray(ys, np.int64), "lm": np.stack(lms).astype(np.float32)}


def build_identity_set(root: str | None, seed: int, size: int = 32, train_ids: int = 150, val_ids: int = 40,
                       test_ids: int = 60, per_id_train: int = 16, per_id_eval: int = 8) -> dict:
    """The three splits, with disjoint identities (val and test are open-set), cached as npz."""
    params = dict(seed=seed, size=size, train_ids=train_ids, val_ids=val_ids, test_ids=test_ids,
                  per_id_train=per_id_train, per_id_eval=per_id_eval, version=VERSION)
    path = os.path.join(root, f"synth_identities-{_key(params)}.npz") if root else None
    if path and os.path.exists(path):
        z = np.load(path)
        out = {s: {k: z[f"{s}_{k}"] for k in ("x", "y", "lm")} for s in ("train", "val", "test")}
    else:
        out = {"train": make_split(seed, 0, train_ids, per_id_train, size, 0),
               "val": make_split(seed, 1, val_ids, per_id_eval, size, train_ids),
               "test": make_split(seed, 2, test_ids, per_id_eval, size, train_ids + val_ids)}
        if path:
            os.makedirs(root, exist_ok=True)
            tmp = path + f".{os.getpid()}.tmp.npz"
            np.savez(tmp, **{f"{s}_{k}": v for s, d in out.items() for k, v in d.items()})
            os.replace(tmp, path)
    off = 0
    for s in ("train", "val", "test"):
        n = len(out[s]["y"])
        out[s]["vid"] = np.arange(off, off + n, dtype=np.int64)
        off += n
    return out

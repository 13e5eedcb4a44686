"""Online face-mask synthesis on face crops: several shapes, colours and textures, placed by the
face's geometry, seeded; vectorised in PyTorch so it runs per batch inside a training step.

Geometry. A face is described by 8 landmarks in pixel coordinates (x, y), in the order of
``LANDMARKS``: the two eye centres, the nose tip, the two mouth corners, the chin, and the
jaw's left and right edge at mouth height. From them each pixel gets *face-frame* coordinates:
``s`` along the eye line and ``t`` perpendicular to it (pointing down the face), both from the
eyes' midpoint. The mask is then defined in normalised coordinates

    u = (s - s_centre) / (half jaw width * widen),      v = (t - t_top) / (t_bottom - t_top)

with ``t_top`` on the nose bridge, a random fraction ``top`` of the way from the eye line to the
nose tip, and ``t_bottom`` a random fraction ``drop`` of the nose-to-chin distance below the
chin. Because everything is expressed in the face frame, a mask follows the face's position,
size and in-plane rotation, and never reaches the eyes (``top`` > 0).

Shapes (in ``(u, v)``): ``surgical`` (rectangle with rounded lower corners and ear loops),
``cup`` (N95-like ellipse), ``cloth`` (raised over the nose, following the jaw), ``bandana``
(wide top, a point below the chin) and ``valve`` (cup with a round exhalation valve).
Textures (in face-frame units, so they rotate and scale with the face): ``solid``, ``pleats``,
``stripes``, ``dots``, ``checker`` and ``noise``; colours from ``PALETTE`` with jitter, a second
colour for patterns and a mild cylindrical shading.

Seeding: ``sample_params(n, seed)`` draws parameters from ``numpy.random.default_rng(seed)``
(one draw per batch during training); ``sample_params_per_item(seeds)`` gives each sample its
own seed (fixed masks for evaluation pairs). The same parameters always render the same mask.
Generic: any face crop with these 8 landmarks works (synthetic or real; see ``tests/test_masks.py``).
"""
from __future__ import annotations

import numpy as np
import torch

LANDMARKS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right", "chin", "jaw_left", "jaw_right")
SHAPES = ("surgical", "cup", "cloth", "bandana", "valve")
TEXTURES = ("solid", "pleats", "stripes", "dots", "checker", "noise")
PALETTE = np.array([
    [235, 235, 235],  # white
    [150, 190, 225],  # surgical blue
    [30, 30, 35],     # black
    [120, 120, 125],  # grey
    [230, 160, 180],  # pink
    [40, 60, 120],    # navy
    [70, 120, 80],    # green
    [200, 180, 140],  # beige
], np.float32) / 255.0

DEFAULTS = dict(
    shapes=list(SHAPES),       # shapes to draw from (uniformly)
    textures=list(TEXTURES),   # textures to draw from (uniformly)
    top=(0.45, 0.75),          # mask top: fraction of the eye-line -> nose-tip distance
    drop=(0.0, 0.25),          # mask bottom: chin + drop * (chin - nose tip)
    widen=(1.0, 1.2),          # half width = widen * half jaw width at mouth height
    colour_jitter=0.08,        # std of the per-channel colour jitter
)


def mask_options(cfg: dict | None) -> dict:
    """``DEFAULTS`` updated with a config dict (unknown keys rejected)."""
    out = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in DEFAULTS.items()}
    for k, v in (cfg or {}).items():
        if k not in DEFAULTS:
            raise ValueError(f"unknown mask option {k!r}; valid: {', '.join(DEFAULTS)}")
        out[k] = list(v) if isinstance(v, (list, tuple)) else v
    for k in ("shapes", "textures"):
        valid = SHAPES if k == "shapes" else TEXTURES
        bad = [s for s in out[k] if s not in valid]
        if bad or not out[k]:
            raise ValueError(f"mask {k} must be a non-empty subset of {', '.join(valid)}; got {out[k]}")
    return out


def _draw(rng: np.random.Generator, n: int, o: dict) -> dict:
    u = rng.uniform
    shape = np.array([SHAPES.index(s) for s in o["shapes"]])[rng.integers(len(o["shapes"]), size=n)]
    tex = np.array([TEXTURES.index(s) for s in o["textures"]])[rng.integers(len(o["textures"]), size=n)]
    c1 = rng.integers(len(PALETTE), size=n)
    c2 = (c1 + 1 + rng.integers(len(PALETTE) - 1, size=n)) % len(PALETTE)
    j = float(o["colour_jitter"])
    out = dict(
        shape=shape, texture=tex,
        colour=np.clip(PALETTE[c1] + rng.normal(0, j, (n, 3)), 0, 1),
        colour2=np.clip(PALETTE[c2] + rng.normal(0, j, (n, 3)), 0, 1),
        top=u(*o["top"], size=n), drop=u(*o["drop"], size=n), widen=u(*o["widen"], size=n),
        freq=u(2.5, 5.0, size=n), angle=u(0, np.pi, size=n), phase=u(0, 1, size=n),
        noise_seed=rng.integers(0, 2**20, size=n).astype(np.float64),
    )
    # trigonometry on the host (float64, per sample): the per-pixel work below uses only basic
    # arithmetic, which is exactly reproducible whatever the batch size, threads or SIMD path
    out["cos"], out["sin"] = np.cos(out["angle"]), np.sin(out["angle"])
    return out


def sample_params(n: int, seed, cfg: dict | None = None) -> dict:
    """Mask parameters for ``n`` faces from one seeded generator (``seed``: int or a
    ``numpy.random.Generator``)."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return _draw(rng, n, mask_options(cfg))


def sample_params_per_item(seeds, cfg: dict | None = None) -> dict:
    """Mask parameters with one seed per face (the same seed always gives the same mask)."""
    o = mask_options(cfg)
    parts = [_draw(np.random.default_rng([int(s), 31337]), 1, o) for s in np.asarray(seeds).reshape(-1)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def face_frame(landmarks: torch.Tensor, h: int, w: int):
    """Per-pixel face-frame coordinates ``(s, t)`` (B x H x W) and the frame's reference values
    (inter-ocular distance, nose/chin depth, jaw half width and centre), all in pixels."""
    lm = landmarks.float()
    le, re, nose, chin, jl, jr = lm[:, 0], lm[:, 1], lm[:, 2], lm[:, 5], lm[:, 6], lm[:, 7]
    eye_c = (le + re) / 2
    d = (re - le).norm(dim=1).clamp_min(1e-3)
    a = (re - le) / d[:, None]  # along the eye line
    b = torch.stack([-a[:, 1], a[:, 0]], dim=1)  # down the face
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=lm.device),
                            torch.arange(w, dtype=torch.float32, device=lm.device), indexing="ij")
    rx = xs[None] - eye_c[:, 0, None, None]
    ry = ys[None] - eye_c[:, 1, None, None]
    s = rx * a[:, 0, None, None] + ry * a[:, 1, None, None]
    t = rx * b[:, 0, None, None] + ry * b[:, 1, None, None]

    def proj(p, axis):
        return ((p - eye_c) * axis).sum(1)

    ref = dict(d=d, t_nose=proj(nose, b), t_chin=proj(chin, b),
               half_w=proj(jr, a).sub(proj(jl, a)).abs() / 2, s_centre=(proj(jl, a) + proj(jr, a)) / 2)
    return s, t, ref


def _hash_noise(cu, cv, seed):
    """Deterministic value noise in [0, 1] from integer cell coordinates (integer hashing, so
    no transcendental function and no rounding can change a value)."""
    h = (cu.long() * 73856093) ^ (cv.long() * 19349663) ^ (seed.long() * 83492791)
    h = (h ^ (h >> 13)) * 1274126177
    h = h ^ (h >> 16)
    return (h & 1023).float() / 1023.0


def _frac(x):
    return x - torch.floor(x)


def render(landmarks: torch.Tensor, params: dict, h: int, w: int):
    """Masks for a batch: ``(mask B x 1 x H x W in {0, 1}, texture B x 3 x H x W in [0, 1])``."""
    dev = landmarks.device
    P = {k: torch.as_tensor(np.asarray(v), dtype=torch.float32, device=dev) for k, v in params.items()}
    s, t, ref = face_frame(landmarks, h, w)

    def bc(x):  # per-sample -> broadcast over pixels
        return x[:, None, None]

    t_top = ref["t_nose"] * P["top"]
    t_bot = ref["t_chin"] + P["drop"] * (ref["t_chin"] - ref["t_nose"]).clamp_min(0)
    u = (s - bc(ref["s_centre"])) / bc(ref["half_w"] * P["widen"]).clamp_min(1e-3)
    v = (t - bc(t_top)) / bc(t_bot - t_top).clamp_min(1e-3)
    au = u.abs()
    inside_box = (au <= 1) & (v >= 0) & (v <= 1)
    lower_round = (u ** 2 + ((v - 0.55) / 0.45) ** 2 <= 1) | (v <= 0.55)
    surgical = inside_box & lower_round
    loops = ((v - 0.12).abs() < 0.05) | ((v - 0.88).abs() < 0.05)
    surgical_full = surgical | (loops & (au > 1) & (au < 1.35))
    cup = (u / 0.95) ** 2 + ((v - 0.5) / 0.55) ** 2 <= 1
    cloth = (v >= -0.05 + 0.3 * u ** 2) & (u ** 2 + ((v - 0.35) / 0.72) ** 2 <= 1)
    bandana = (v >= -0.05) & (au <= 1.25) & (v <= 1.45 - 0.9 * au)
    valve_disc = (u - 0.42) ** 2 + ((v - 0.58) * 1.3) ** 2 <= 0.2 ** 2
    shapes = torch.stack([surgical_full, cup, cloth, bandana, cup], dim=0)  # (5, B, H, W)
    sid = P["shape"].long()
    mask = shapes.gather(0, sid[None, :, None, None].expand(1, *u.shape))[0]

    # textures in face-frame units (inter-ocular distances)
    d = bc(ref["d"])
    fs, ft = s / d, t / d
    f = bc(P["freq"])
    ph = bc(P["phase"])
    pleats = (_frac(v * 3.0 + ph) < 0.3).float()
    stripes = (_frac(f * (fs * bc(P["cos"]) + ft * bc(P["sin"])) + ph) < 0.5).float()
    cell_u, cell_v = fs * f * 0.8 + ph, ft * f * 0.8 + ph
    dots = (((cell_u - torch.floor(cell_u) - 0.5) ** 2 + (cell_v - torch.floor(cell_v) - 0.5) ** 2) < 0.09).float()
    checker = ((torch.floor(cell_u * 0.7) + torch.floor(cell_v * 0.7)) % 2).float()
    noise = _hash_noise(torch.floor(fs * 8), torch.floor(ft * 8), bc(P["noise_seed"]))
    solid = torch.zeros_like(u)
    pats = torch.stack([solid, pleats * 0.35, stripes, dots, checker, noise], dim=0)
    mix = pats.gather(0, P["texture"].long()[None, :, None, None].expand(1, *u.shape))[0]
    is_pleats = (P["texture"] == TEXTURES.index("pleats"))[:, None, None]
    c1 = P["colour"][:, :, None, None]
    c2 = P["colour2"][:, :, None, None]
    # pleats darken the main colour; other patterns blend towards the second colour
    tex = torch.where(is_pleats[:, None], c1 * (1 - mix[:, None]), c1 * (1 - mix[:, None]) + c2 * mix[:, None])
    valve = valve_disc & (sid == SHAPES.index("valve"))[:, None, None]
    tex = torch.where(valve[:, None], c2 * 0.8, tex)
    shade = (1 - 0.18 * u.clamp(-1.3, 1.3) ** 2).clamp_min(0.6)
    tex = (tex * shade[:, None]).clamp(0, 1)
    return mask[:, None].float(), tex


def apply(x: torch.Tensor, landmarks: torch.Tensor, params: dict):
    """Masked faces ``x * (1 - m) + texture * m`` for ``x`` in [0, 1] (B x 3 x H x W); returns
    ``(masked, m)``."""
    m, tex = render(landmarks, params, x.shape[-2], x.shape[-1])
    m = m.to(x.dtype)
    return x * (1 - m) + tex.to(x.dtype) * m, m


def synthesize(x: torch.Tensor, landmarks: torch.Tensor, seed, cfg: dict | None = None, per_item: bool = False):
    """One call: sample parameters (one seed, or one seed per face with ``per_item``) and apply."""
    params = sample_params_per_item(seed, cfg) if per_item else sample_params(len(x), seed, cfg)
    masked, m = apply(x, landmarks.to(x.device), params)
    return masked, m, params

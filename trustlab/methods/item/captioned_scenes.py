"""Generated captioned scenes: coloured shapes drawn on a textured background, with a caption
that lists them ("a red circle, a blue square and a green triangle").

Real: the image shows exactly the objects its caption describes. Fake: the image contradicts
its caption in exactly one object: an attribute of it changed (its colour, or its shape) or the
object replaced by a different one (``contradict``; the default set uses colour and object). Every fake image is itself a valid scene drawn by the
same renderer (so pixels alone carry no label); only the image-caption pair is inconsistent.
With 3-5 objects per scene the contradiction touches one object in a small region: barely
visible in a whole-image summary, clear at the level of that object.

Also here, generic text utilities that name no method:

- ``extract_phrases(caption)`` — a small deterministic noun-phrase chunker (no model): splits at
  punctuation, conjunctions, prepositions and verbs, drops determiners / framing words.
- ``Captioner`` — the captioning interface (images -> captions), ``get_captioner(name)`` and a
  rule-based default (``ShapeSceneCaptioner``) that reads the generated scenes' objects back from
  the pixels (palette colour segmentation + shape from fill ratio and solidity).

The set is written as PNG files plus a manifest CSV (``uri, label, split, image_id, caption,
source, manipulation``), cached under ``root`` by its parameters, deterministic by seed.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from typing import Callable, Protocol, Sequence

import numpy as np
import pandas as pd
from PIL import Image

# object attributes: palette colour names -> RGB, and the drawable shapes
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 175, 60), "blue": (45, 80, 225), "yellow": (235, 215, 40),
    "purple": (150, 55, 195), "orange": (245, 140, 30), "white": (240, 240, 240), "cyan": (40, 205, 215),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# fake kinds: one object's attribute changes (colour, shape) or the object is replaced by a different
# one (new colour and new shape)
MANIPULATIONS = ("color", "shape", "object")

_SS = 4  # supersampling factor for anti-aliased drawing


# ----------------------------------------------------------------------------- phrases
_DETERMINERS = {"a", "an", "the", "this", "that", "these", "those", "some", "any", "its", "their", "his",
                "her", "my", "your", "our", "one", "two", "three", "four", "five", "several", "many", "each",
                "every", "another", "other"}
_BOUNDARY = {"and", "or", "but", "with", "without", "on", "in", "at", "of", "to", "next", "near", "under",
             "over", "behind", "beside", "besides", "by", "from", "above", "below", "between", "into", "onto",
             "beneath", "inside", "outside", "around", "across", "against", "along", "while", "where",
             "which", "who", "that", "is", "are", "was", "were", "be", "has", "have", "there", "it", "they",
             "for", "as", "than", "then", "also", "its"}
_FRAMING = {"photo", "image", "picture", "drawing", "rendering", "painting", "scene", "view", "close-up",
            "closeup", "illustration", "shot"}


def extract_phrases(caption: str, max_phrases: int | None = None) -> list[str]:
    """Object phrases of a caption, in order, each once: a deterministic rule-based chunker.

    Chunks end at punctuation, conjunctions, prepositions, auxiliaries and ``-ing`` verbs;
    leading determiners / number words are dropped, and chunks that are only a framing word
    ("photo", "image", ...) are dropped. ``"A photo of a red circle, a blue square and a small
    dog sitting on the grass."`` -> ``["red circle", "blue square", "small dog", "grass"]``."""
    words = re.findall(r"[a-z0-9][a-z0-9'\-]*|[,.;:!?()]", caption.lower())
    chunks, cur = [], []
    for w in words:
        boundary = (w in _BOUNDARY or not w[0].isalnum() or (w.endswith("ing") and len(w) > 4))
        if boundary:
            if cur:
                chunks.append(cur)
            cur = []
            continue
        if not cur and w in _DETERMINERS:
            continue
        cur.append(w)
    if cur:
        chunks.append(cur)
    out: list[str] = []
    for c in chunks:
        while c and c[0] in _DETERMINERS:
            c = c[1:]
        if not c or all(w in _FRAMING for w in c):
            continue
        p = " ".join(c)
        if p not in out:
            out.append(p)
    return out[:max_phrases] if max_phrases else out


def scene_caption(objects: Sequence[tuple[str, str]]) -> str:
    """[(colour, shape), ...] -> "a red circle, a blue square and a green triangle"."""
    parts = [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s}" for c, s in objects]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


# ----------------------------------------------------------------------------- rendering
def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted, low-saturation background with a gentle gradient and fine noise (float 0..255)."""
    base = rng.uniform(70, 140)
    tint = rng.uniform(-12, 12, size=3)
    yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1)
    ang = rng.uniform(0, 2 * np.pi)
    grad = (np.cos(ang) * xx + np.sin(ang) * yy - 0.5) * rng.uniform(0, 30)
    img = base + tint[None, None, :] + grad[..., None] + rng.normal(0, 4, size=(size, size, 3))
    return img.astype(np.float32)


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Anti-aliased coverage mask (size x size, float 0..1) of one shape of "radius" r."""
    import cv2

    S = size * _SS
    m = np.zeros((S, S), np.uint8)
    cx, cy, r = cx * _SS, cy * _SS, r * _SS
    if shape == "circle":
        cv2.circle(m, (int(round(cx)), int(round(cy))), int(round(r)), 255, -1, lineType=cv2.LINE_AA)
    elif shape == "square":
        h = r * 0.85
        cv2.rectangle(m, (int(round(cx - h)), int(round(cy - h))), (int(round(cx + h)), int(round(cy + h))), 255, -1)
    elif shape == "triangle":
        pts = np.array([[cx, cy - r], [cx - r * 0.95, cy + r * 0.75], [cx + r * 0.95, cy + r * 0.75]])
        cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 255, lineType=cv2.LINE_AA)
    elif shape == "cross":
        a = r * 0.34
        cv2.rectangle(m, (int(round(cx - r)), int(round(cy - a))), (int(round(cx + r)), int(round(cy + a))), 255, -1)
        cv2.rectangle(m, (int(round(cx - a)), int(round(cy - r))), (int(round(cx + a)), int(round(cy + r))), 255, -1)
    else:
        raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")
    return cv2.resize(m.astype(np.float32) / 255.0, (size, size), interpolation=cv2.INTER_AREA)


def sample_scene(rng: np.random.Generator, size: int, n_objects: tuple[int, int] = (3, 5),
                 radius: tuple[float, float] = (0.09, 0.13)) -> list[dict]:
    """Objects with distinct (colour, shape) pairs at non-overlapping positions."""
    n = int(rng.integers(n_objects[0], n_objects[1] + 1))
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    chosen = rng.choice(len(pairs), size=n, replace=False)
    objs: list[dict] = []
    for k in chosen:
        c, s = pairs[k]
        for _ in range(200):
            r = rng.uniform(*radius) * size
            cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
            if all(np.hypot(cx - o["cx"], cy - o["cy"]) > r + o["r"] + 1.5 for o in objs):
                break
        objs.append(dict(color=c, shape=s, cx=float(cx), cy=float(cy), r=float(r),
                         jitter=rng.uniform(-12, 12, size=3).tolist()))
    return objs


def render_scene(objects: Sequence[dict], size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw the objects on a fresh background: HxWx3 uint8."""
    img = _background(rng, size)
    for o in objects:
        m = _shape_mask(o["shape"], o["cx"], o["cy"], o["r"], size)[..., None]
        col = np.clip(np.array(COLORS[o["color"]], np.float32) + np.array(o["jitter"], np.float32), 0, 255)
        img = img * (1 - m) + col[None, None, :] * m
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def contradict(objects: list[dict], rng: np.random.Generator, kind: str) -> tuple[list[dict], int]:
    """A copy of the scene with one object changed so that it no longer matches its phrase:
    ``kind="color"`` recolours it, ``kind="shape"`` swaps its shape, ``kind="object"`` replaces it
    by a different object (new colour and new shape). The new (colour, shape) is not used by any
    other object of the scene, so the caption's phrase for it has no match in the image. New
    values are taken from the colours / shapes of the scene's other objects where possible, so
    no new colour or shape enters the scene: mostly one object's colour-shape binding breaks
    (small for the whole image, clear for that object)."""
    objs = [dict(o) for o in objects]
    j = int(rng.integers(len(objs)))
    used = {(o["color"], o["shape"]) for o in objs}
    o = objs[j]
    scene_colors = {x["color"] for k, x in enumerate(objs) if k != j}
    scene_shapes = {x["shape"] for k, x in enumerate(objs) if k != j}

    def pick(opts, prefer):
        pref = [v for v in opts if (v[0] if isinstance(v, tuple) else v) in prefer
                and (not isinstance(v, tuple) or v[1] in scene_shapes)]
        pool = pref or opts
        return pool[int(rng.integers(len(pool)))]

    if kind == "color":
        opts = [c for c in COLORS if c != o["color"] and (c, o["shape"]) not in used]
        o["color"] = pick(opts, scene_colors)
    elif kind == "shape":
        opts = [s for s in SHAPES if s != o["shape"] and (o["color"], s) not in used]
        o["shape"] = pick(opts, scene_shapes)
    elif kind == "object":
        opts = [(c, s) for c in COLORS for s in SHAPES
                if c != o["color"] and s != o["shape"] and (c, s) not in used]
        o["color"], o["shape"] = pick(opts, scene_colors)
    else:
        raise ValueError(f"unknown manipulation {kind!r}; valid: {', '.join(MANIPULATIONS)}")
    return objs, j


# ----------------------------------------------------------------------------- captioners
class Captioner(Protocol):
    """The captioning stage's interface: RGB uint8 images (HxWx3) -> one caption each."""

    def __call__(self, images: Sequence[np.ndarray]) -> list[str]: ...


class ShapeSceneCaptioner:
    """Rule-based captioner for the generated scenes: segments each palette colour, keeps
    connected components of plausible object size and names their shape from fill ratio
    (area / bounding box) and solidity (area / convex hull). Objects are listed left to right.
    It describes what is drawn, so it is the fallback when no prompt/caption is known."""

    def __init__(self, tol: float = 55.0, min_area_frac: float = 0.006):
        self.tol, self.min_area_frac = float(tol), float(min_area_frac)

    def objects(self, image: np.ndarray) -> list[tuple[str, str, float]]:
        import cv2

        im = np.asarray(image)[..., :3].astype(np.float32)
        h, w = im.shape[:2]
        found = []
        for name, rgb in COLORS.items():
            d = np.linalg.norm(im - np.array(rgb, np.float32), axis=-1)
            mask = (d < self.tol).astype(np.uint8)
            n, lab, stats, cent = cv2.connectedComponentsWithStats(mask, connectivity=8)
            for k in range(1, n):
                area = stats[k, cv2.CC_STAT_AREA]
                if area < self.min_area_frac * h * w:
                    continue
                bw, bh = stats[k, cv2.CC_STAT_WIDTH], stats[k, cv2.CC_STAT_HEIGHT]
                comp = (lab == k).astype(np.uint8)
                cnts, _ = cv2.findContours(comp, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
                hull = cv2.convexHull(np.concatenate(cnts))
                hull_area = max(cv2.contourArea(hull), 1.0)
                fill = area / float(bw * bh)
                solidity = area / (hull_area + 0.5 * cv2.arcLength(hull, True))  # pixel-count vs polygon area
                if solidity < 0.84:
                    shape = "cross"
                elif fill > 0.87:
                    shape = "square"
                elif fill > 0.66:
                    shape = "circle"
                else:
                    shape = "triangle"
                found.append((name, shape, float(cent[k][0])))
        return sorted(found, key=lambda t: t[2])

    def __call__(self, images: Sequence[np.ndarray]) -> list[str]:
        out = []
        for im in images:
            objs = [(c, s) for c, s, _ in self.objects(im)]
            out.append(scene_caption(objs) if objs else "an empty scene")
        return out


class FixedCaptioner:
    """Gives every image the same caption (e.g. a prompt known for a whole batch)."""

    def __init__(self, caption: str):
        self.caption = str(caption)

    def __call__(self, images: Sequence[np.ndarray]) -> list[str]:
        return [self.caption for _ in images]


CAPTIONERS: dict[str, Callable[..., Captioner]] = {"rule": ShapeSceneCaptioner}


def get_captioner(name: str, **kw) -> Captioner:
    """A captioner by name (``rule`` is the built-in default); new ones register in CAPTIONERS
    (a learned captioner would load its weights from a local path or s3:// URI here)."""
    if name not in CAPTIONERS:
        raise KeyError(f"unknown captioner {name!r}; valid choices: {', '.join(sorted(CAPTIONERS))}")
    return CAPTIONERS[name](**kw)


# ----------------------------------------------------------------------------- the set
def _params_key(p: dict) -> str:
    return hashlib.sha1(json.dumps(p, sort_keys=True).encode()).hexdigest()[:10]


def make_pair(rng: np.random.Generator, size: int, label: int, kind: str | None = None,
              n_objects=(3, 5), radius=(0.09, 0.13), kinds=MANIPULATIONS) -> tuple[np.ndarray, str, str]:
    """One (image, caption, manipulation) sample; ``label=1`` contradicts the caption once."""
    objs = sample_scene(rng, size, n_objects, radius)
    caption = scene_caption([(o["color"], o["shape"]) for o in objs])
    manip = "none"
    if label:
        manip = kind or kinds[int(rng.integers(len(kinds)))]
        objs, _ = contradict(objs, rng, manip)
    return render_scene(objs, size, rng), caption, manip


def build_manifest(root: str, seed: int, size: int, n_train: int, n_val: int, n_test: int,
                   n_objects=(3, 5), radius=(0.09, 0.13), kinds=("color", "object")) -> str:
    """Write the PNGs and the manifest (once per parameter set); return the manifest path.
    Each split alternates real / fake; fakes cycle through ``kinds`` (see ``contradict``)."""
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in MANIPULATIONS]
    if bad or not kinds:
        raise ValueError(f"unknown manipulation kinds {bad}; valid: {', '.join(MANIPULATIONS)}")
    params = dict(seed=seed, size=size, n_train=n_train, n_val=n_val, n_test=n_test,
                  n_objects=list(n_objects), radius=list(radius), kinds=list(kinds), version=2)
    d = os.path.join(root, f"captioned_scenes-{_params_key(params)}")
    man = os.path.join(d, "manifest.csv")
    if os.path.exists(man):
        return man
    os.makedirs(d, exist_ok=True)
    rows, idx = [], 0
    for split, n, off in (("train", n_train, 0), ("val", n_val, 1), ("test", n_test, 2)):
        rng = np.random.default_rng([seed, 77, off])
        os.makedirs(os.path.join(d, split), exist_ok=True)
        for i in range(n):
            label = i % 2
            kind = kinds[(i // 2) % len(kinds)] if label else None
            img, cap, manip = make_pair(rng, size, label, kind, n_objects, radius)
            rel = f"{split}/{idx:06d}.png"
            Image.fromarray(img).save(os.path.join(d, rel))
            rows.append(dict(uri=os.path.join(d, rel), label=label, split=split, image_id=idx, caption=cap,
                             source="rendered", manipulation=manip))
            idx += 1
    from trustlab.platform.data.genimage_synth import write_generated_manifest

    return write_generated_manifest(rows, man, params)


def load_captioned_manifest(manifest: str, size: int | None = None, captioner: Captioner | None = None,
                            endpoint: str | None = None) -> dict:
    """Decode a manifest into ``{split: {x: N x 3 x H x W uint8, y, vid, caption, manipulation}}``.
    Rows without a caption (no ``caption`` column, or an empty cell) are captioned by
    ``captioner`` (required then)."""
    from trustlab.platform import storage

    df = pd.read_csv(manifest, keep_default_na=False)
    if "caption" not in df.columns:
        df["caption"] = ""
    if "manipulation" not in df.columns:
        df["manipulation"] = np.where(df["label"].to_numpy() == 1, "unknown", "none")
    out = {}
    for split, g in df.groupby("split", sort=False):
        ims = []
        for uri in g["uri"]:
            im = Image.open(io.BytesIO(storage.read_bytes(uri, endpoint))).convert("RGB")
            if size and im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            ims.append(np.asarray(im))
        caps = [str(c) for c in g["caption"]]
        missing = [i for i, c in enumerate(caps) if not c.strip()]
        if missing:
            if captioner is None:
                raise ValueError(f"{len(missing)} rows of split {split!r} have no caption and no captioner is set")
            for i, c in zip(missing, captioner([ims[i] for i in missing])):
                caps[i] = c
        out[split] = {"x": np.stack([im.transpose(2, 0, 1) for im in ims]),
                      "y": g["label"].to_numpy(np.int64), "vid": g["image_id"].to_numpy(np.int64),
                      "caption": np.array(caps, dtype=object),
                      "manipulation": g["manipulation"].astype(str).to_numpy(dtype=object)}
    return out

"""Synthetic face-manipulation images made from real face photos (no download).

Sources: the real photos in ``../shared/data/real`` (four portraits and their aligned 160 px
crops, the multi-face group photo) and scikit-image's ``astronaut``; faces are found with
OpenCV's bundled Haar cascade (a data file inside the opencv wheel). Each sample is a jittered
square crop around one face (shift, scale, small rotation, flip, brightness/contrast/gamma,
sensor noise), resampled to ``size`` with area averaging.

Fakes change one region of the face (eyes, nose, mouth or a cheek; a soft ellipse):

- ``blend`` (face-swap-like): the same region of a *different* face sample, resampled through a
  lower resolution, only partly colour-matched, alpha-blended with a feathered mask;
- ``warp`` (reenactment/morph-like): a smooth local displacement field (bulge, pinch or shift
  of a few pixels, Gaussian fall-off) applied with bilinear resampling.

Each sample also carries its manipulation mask (the blend alpha / the warp's support), so a
method can check or supervise where its evidence lies; real samples have an empty mask.
The set is cached as ``.npz`` files under ``root`` by its parameters, deterministic by seed.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import json
import os

import numpy as np

DEFAULT_REAL_DIR = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "..",
                                                 "shared", "data", "real"))
MANIPULATIONS = ("blend", "warp")
# face parts as (cx, cy, rx, ry) in units of the face box (crop centred on the Haar box)
PARTS = {"eyes": (0.5, 0.40, 0.30, 0.12), "left_eye": (0.35, 0.40, 0.14, 0.10),
         "right_eye": (0.65, 0.40, 0.14, 0.10), "nose": (0.5, 0.56, 0.12, 0.14),
         "mouth": (0.5, 0.74, 0.20, 0.10), "left_cheek": (0.30, 0.62, 0.12, 0.12),
         "right_cheek": (0.70, 0.62, 0.12, 0.12)}


def real_dir() -> str:
    return os.environ.get("TRUSTLAB_REAL_DATA", DEFAULT_REAL_DIR)


@functools.lru_cache(maxsize=2)
def face_sources(directory: str | None = None) -> tuple[tuple[np.ndarray, tuple[float, float, float]], ...]:
    """(RGB photo, (cx, cy, side) of one face box) for every face found; aligned crops count as
    one face filling ~80% of the crop (facenet-pytorch's MTCNN crops with a small margin)."""
    import cv2
    import skimage.data as skd
    from PIL import Image

    from trustlab.platform.data.faces import cascade_path  # says what to install when this cv2 has no cascade

    d = directory or real_dir()
    path = cascade_path()  # before cv2.CascadeClassifier is looked up: it raises the clear error
    casc = cv2.CascadeClassifier(path)
    out = []

    def detect(im):
        g = cv2.cvtColor(im, cv2.COLOR_RGB2GRAY)
        s = min(1.0, 800.0 / max(g.shape))
        gs = cv2.resize(g, None, fx=s, fy=s, interpolation=cv2.INTER_AREA) if s < 1 else g
        boxes = casc.detectMultiScale(gs, scaleFactor=1.1, minNeighbors=6, minSize=(40, 40))
        for x, y, w, h in boxes:
            out.append((im, ((x + w / 2) / s, (y + h / 2) / s, w / s)))

    photos = sorted(glob.glob(os.path.join(d, "faces", "*.jpg"))) + sorted(glob.glob(os.path.join(d, "*.jpg")))
    for p in photos:
        detect(np.asarray(Image.open(p).convert("RGB")))
    detect(np.asarray(skd.astronaut())[..., :3])
    for p in sorted(glob.glob(os.path.join(d, "faces", "*_aligned.png"))):
        im = np.asarray(Image.open(p).convert("RGB"))
        h, w = im.shape[:2]
        out.append((im, (w / 2, h * 0.52, 0.8 * w)))
    if not out:
        raise FileNotFoundError(f"no faces found under {d} (set TRUSTLAB_REAL_DATA to the real-data folder)")
    return tuple(out)


def face_crop(rng: np.random.Generator, src, size: int, margin: float = 1.25) -> np.ndarray:
    """A jittered crop around the face box, resampled to size x size; float32 RGB 0..255."""
    import cv2

    im, (cx, cy, side) = src
    s = side * margin * rng.uniform(0.92, 1.1)
    cx += rng.uniform(-0.05, 0.05) * side
    cy += rng.uniform(-0.05, 0.05) * side
    ang = rng.uniform(-10, 10)
    # affine: rotate about the face centre and map the s x s box onto a (4 size) canvas, then area-downsample
    work = 4 * size
    M = cv2.getRotationMatrix2D((float(cx), float(cy)), ang, work / s)
    M[0, 2] += work / 2 - cx
    M[1, 2] += work / 2 - cy
    crop = cv2.warpAffine(im, M, (work, work), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    crop = cv2.resize(crop.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    # photometric jitter
    crop = (crop - 128) * rng.uniform(0.85, 1.15) + 128 + rng.uniform(-15, 15)
    crop = 255.0 * (np.clip(crop, 0, 255) / 255.0) ** rng.uniform(0.85, 1.15)
    crop = crop + rng.normal(0, rng.uniform(0.5, 2.5), crop.shape)
    return np.ascontiguousarray(np.clip(crop, 0, 255).astype(np.float32))


def region_mask(rng: np.random.Generator, size: int, feather: float) -> np.ndarray:
    """A soft ellipse over a random face part (jittered), float32 0..1, size x size."""
    import cv2

    names = sorted(PARTS)
    cx, cy, rx, ry = PARTS[names[int(rng.integers(len(names)))]]
    cx, cy = (cx + rng.uniform(-0.04, 0.04)) * size, (cy + rng.uniform(-0.04, 0.04)) * size
    rx, ry = rx * size * rng.uniform(0.9, 1.25), ry * size * rng.uniform(0.9, 1.25)
    m = np.zeros((4 * size, 4 * size), np.uint8)
    cv2.ellipse(m, (int(4 * cx), int(4 * cy)), (int(4 * rx), int(4 * ry)), float(rng.uniform(-15, 15)), 0, 360, 255, -1)
    m = cv2.resize(m.astype(np.float32) / 255.0, (size, size), interpolation=cv2.INTER_AREA)
    if feather > 0:
        m = cv2.GaussianBlur(m, (0, 0), feather * size / 64.0)
    return np.clip(m / max(m.max(), 1e-6), 0, 1).astype(np.float32)


def blend(rng, target: np.ndarray, donor: np.ndarray, mask: np.ndarray, strength: float) -> np.ndarray:
    """Paste the donor's region: low-resolution donor (scale 1/(1.5..2.5)), partial colour
    transfer (leaving a ``strength``-sized mismatch), feathered alpha blending."""
    import cv2

    size = target.shape[0]
    f = rng.uniform(1.5, 2.5)
    low = cv2.resize(donor, (max(4, int(size / f)),) * 2, interpolation=cv2.INTER_AREA)
    d = cv2.resize(low, (size, size), interpolation=cv2.INTER_LINEAR)
    w = mask > 0.5
    if w.sum() > 4:
        mt, st = target[w].mean(0), target[w].std(0) + 1e-3
        md, sd = d[w].mean(0), d[w].std(0) + 1e-3
        d = (d - md) / sd * st + mt
        d = d + rng.uniform(-1, 1, 3) * strength * 255.0
    a = mask[..., None]
    return np.clip(target * (1 - a) + d * a, 0, 255)


def warp(rng, img: np.ndarray, mask: np.ndarray, strength: float) -> np.ndarray:
    """A smooth displacement inside the mask (bulge, pinch or shift of up to ``strength`` x size
    pixels), resampled bilinearly."""
    import cv2

    size = img.shape[0]
    ys, xs = np.nonzero(mask > 0.5)
    cy, cx = (ys.mean(), xs.mean()) if len(ys) else (size / 2, size / 2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    amp = strength * size * rng.uniform(0.7, 1.0)
    kind = int(rng.integers(3))
    dx, dy = xx - cx, yy - cy
    r = np.sqrt(dx ** 2 + dy ** 2) + 1e-3
    if kind == 0:      # bulge: sample closer to the centre
        ux, uy = -dx / r, -dy / r
    elif kind == 1:    # pinch: sample further out
        ux, uy = dx / r, dy / r
    else:              # shift in a random direction
        t = rng.uniform(0, 2 * np.pi)
        ux, uy = np.full_like(xx, np.cos(t)), np.full_like(yy, np.sin(t))
    prof = mask * np.minimum(1.0, r / 3.0)
    mx = (xx + amp * prof * ux).astype(np.float32)
    my = (yy + amp * prof * uy).astype(np.float32)
    return cv2.remap(img.astype(np.float32), mx, my, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def make_sample(rng, size: int, label: int, kind: str | None, blend_strength: float, warp_strength: float,
                feather: float, sources=None):
    """(uint8 HxWx3 image, float mask HxW, manipulation, source index)."""
    sources = sources or face_sources()
    si = int(rng.integers(len(sources)))
    img = face_crop(rng, sources[si], size)
    mask = np.zeros((size, size), np.float32)
    manip = "none"
    if label:
        manip = kind or MANIPULATIONS[int(rng.integers(len(MANIPULATIONS)))]
        mask = region_mask(rng, size, feather)
        if manip == "blend":
            dj = int(rng.integers(len(sources) - 1))
            dj = dj + (dj >= si)
            img = blend(rng, img, face_crop(rng, sources[dj], size), mask, blend_strength)
        elif manip == "warp":
            img = warp(rng, img, mask, warp_strength)
        else:
            raise ValueError(f"unknown manipulation {manip!r}; valid: {', '.join(MANIPULATIONS)}")
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask, manip, si


def build(root: str, seed: int, size: int, n_train: int, n_val: int, n_test: int, blend_strength: float = 0.06,
          warp_strength: float = 0.05, feather: float = 2.0) -> dict:
    """``{split: {x: N x 3 x H x W uint8, y, vid, mask: N x 1 x H x W uint8 (0..255),
    manipulation, source}}``; generated once per parameter set and cached as ``<split>.npz``.
    Each split alternates real / fake; fakes alternate blend / warp."""
    params = dict(seed=seed, size=size, n_train=n_train, n_val=n_val, n_test=n_test,
                  blend_strength=blend_strength, warp_strength=warp_strength, feather=feather,
                  n_sources=len(face_sources()), version=1)
    d = os.path.join(root, "face_manip-" + hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10])
    out = {}
    if all(os.path.exists(os.path.join(d, f"{s}.npz")) for s in ("train", "val", "test")):
        for s in ("train", "val", "test"):
            with np.load(os.path.join(d, f"{s}.npz"), allow_pickle=False) as z:
                out[s] = {k: z[k] for k in z.files}
                out[s]["manipulation"] = out[s]["manipulation"].astype(object)
        return out
    os.makedirs(d, exist_ok=True)
    offset = 0
    for split, n, off in (("train", n_train, 0), ("val", n_val, 1), ("test", n_test, 2)):
        rng = np.random.default_rng([seed, 31, off])
        xs, ms, kinds, srcs, ys = [], [], [], [], []
        for i in range(n):
            label = i % 2
            kind = MANIPULATIONS[(i // 2) % len(MANIPULATIONS)] if label else None
            img, mask, manip, si = make_sample(rng, size, label, kind, blend_strength, warp_strength, feather)
            xs.append(img.transpose(2, 0, 1))
            ms.append(np.rint(mask * 255).astype(np.uint8)[None])
            kinds.append(manip)
            srcs.append(si)
            ys.append(label)
        arr = {"x": np.stack(xs), "y": np.array(ys, np.int64), "vid": np.arange(offset, offset + n, dtype=np.int64),
               "mask": np.stack(ms), "manipulation": np.array(kinds), "source": np.array(srcs, np.int64)}
        offset += n
        tmp = os.path.join(d, f"{split}.tmp.npz")
        np.savez(tmp, **arr)
        os.replace(tmp, os.path.join(d, f"{split}.npz"))
        arr["manipulation"] = arr["manipulation"].astype(object)
        out[split] = arr
    with open(os.path.join(d, "params.json"), "w") as f:
        json.dump(params, f, indent=2)
    return out

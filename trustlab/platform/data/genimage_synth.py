"""A generated-image detection set made on the fly (real photos vs generator outputs).

Real: patches of natural photos (``natural.random_patch``: random photo, crop, scale, flip).
Fake: a *different* patch of the same kind of content passed through a generator-like
decoder path: 2x area downsampling (a latent at half resolution) followed by a stride-2
transposed convolution with a random 4x4 kernel whose four polyphase components have slightly
unequal gains (``artifact_strength``), then a light random 3x3 smoothing conv. Decoders that
upsample this way leave the periodic (checkerboard) spectral peaks and the depleted upper band
reported for GAN and latent-diffusion images.

``artifact="band"`` plants a different trace: a narrow-band, low-amplitude periodic pattern (a
few sinusoids whose radial frequency lies in ``band`` = (lo, hi), f = 1 at the axis Nyquist,
random orientations and phases, ``amplitude`` grey levels in all) added to the fake patch, and
then *both* classes go through the same degradations: a resize (up by ``resize``, back down by
area averaging) and JPEG at a random quality in ``jpeg``. The trace is a thousandth of the
image's energy and sits in one band: a detector that first suppresses the low bands where the
image content lives (F2C's frequency-selective function) sees it; one that reads raw pixels must
learn that band-pass from few examples under the content's much larger variance.

Both classes are quantised to uint8, written as PNG files by the same encoder and decoded by
the same decoder, so the file format carries no label. A manifest CSV (``uri, label, split,
image_id, source, manipulation``) lists them; the set is cached under ``root`` by its parameters.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pandas as pd
from PIL import Image

from trustlab.platform.data.natural import area_resize, random_patch
from trustlab.platform.progress import progress


def upsample_decoder(img: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Generator-like path for an HxWx3 float image (H, W even): downsample 2x, then a stride-2
    transposed conv with a random 4x4 kernel whose polyphase gains differ by ~``strength``."""
    h, w, _ = img.shape
    low = area_resize(img, h // 2)
    k = rng.uniform(0.5, 1.0, size=(4, 4)).astype(np.float32)
    # normalise each polyphase component (output parity) to gain 1 +- strength
    for py in range(2):
        for px in range(2):
            sub = k[py::2, px::2]
            k[py::2, px::2] = sub / sub.sum() * (1.0 + strength * rng.uniform(-1, 1))
    up = np.zeros((h + 2, w + 2, 3), np.float32)
    z = np.zeros((h, w, 3), np.float32)
    z[::2, ::2] = low
    import cv2

    for c in range(3):
        up[1:-1, 1:-1, c] = cv2.filter2D(z[..., c], -1, k, borderType=cv2.BORDER_REFLECT)
    out = up[1:-1, 1:-1]
    smooth = rng.uniform(0.0, 0.15)
    if smooth > 0:
        s = np.array([[smooth / 4, smooth / 4, smooth / 4], [smooth / 4, 1 - 2 * smooth, smooth / 4],
                      [smooth / 4, smooth / 4, smooth / 4]], np.float32)
        s /= s.sum()
        out = cv2.filter2D(out, -1, s, borderType=cv2.BORDER_REFLECT)
    return out


def band_artifact(img: np.ndarray, rng: np.random.Generator, amplitude: float, band, waves: int = 3) -> np.ndarray:
    """``img`` (HxWx3 float) plus ``waves`` sinusoids of radial frequency uniform in ``band``
    (normalised: 1 = the axis Nyquist), random orientation and phase, the same on every channel,
    summing to a peak of about ``amplitude`` grey levels."""
    h, w, _ = img.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    pat = np.zeros((h, w), np.float32)
    for _ in range(int(waves)):
        f = rng.uniform(*band) * 0.5  # cycles per pixel
        th = rng.uniform(0, np.pi)
        pat += np.cos(2 * np.pi * f * (np.cos(th) * xx + np.sin(th) * yy) + rng.uniform(0, 2 * np.pi))
    return img + (float(amplitude) / int(waves)) * pat[..., None]


def degrade(img: np.ndarray, rng: np.random.Generator, resize: float, jpeg) -> np.ndarray:
    """The same for both classes: bilinear resize up by ``resize`` and area back down (a mild
    low-pass), then JPEG at a quality uniform in ``jpeg`` (lo, hi); returns uint8."""
    import io

    import cv2

    h, w, _ = img.shape
    out = np.clip(img, 0, 255).astype(np.float32)
    if resize and resize != 1.0:
        big = cv2.resize(out, (int(round(w * resize)), int(round(h * resize))), interpolation=cv2.INTER_LINEAR)
        out = cv2.resize(big, (w, h), interpolation=cv2.INTER_AREA)
    arr = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if jpeg:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=int(rng.integers(int(jpeg[0]), int(jpeg[1]) + 1)))
        arr = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return arr


def _params_key(p: dict) -> str:
    return hashlib.sha1(json.dumps(p, sort_keys=True).encode()).hexdigest()[:10]


def build_manifest(root: str, seed: int, size: int, n_train: int, n_val: int, n_test: int,
                   artifact_strength: float, artifact: str = "decoder", band: dict | None = None) -> str:
    """Write the PNGs and manifest (once per parameter set) and return the manifest path.
    ``artifact``: ``decoder`` (the upsampling decoder's trace, ``artifact_strength``) or ``band``
    (``band_artifact`` then ``degrade`` on both classes; ``band`` holds ``amplitude``, ``lo``,
    ``hi``, ``resize``, ``jpeg``)."""
    if artifact not in ("decoder", "band"):
        raise ValueError(f"artifact must be 'decoder' or 'band', got {artifact!r}")
    params = dict(seed=seed, size=size, n_train=n_train, n_val=n_val, n_test=n_test,
                  artifact_strength=artifact_strength, version=1)
    if artifact == "band":  # other keys only for the new kind, so existing caches keep their names
        params.update(artifact=artifact, band=dict(band or {}))
    d = os.path.join(root, f"genimage_synth-{_params_key(params)}")
    man = os.path.join(d, "manifest.csv")
    if os.path.exists(man):
        return man
    os.makedirs(d, exist_ok=True)
    rows = []
    idx = 0
    for split, n, off in (("train", n_train, 0), ("val", n_val, 1), ("test", n_test, 2)):
        rng = np.random.default_rng([seed, off])
        for i in progress(range(n), f"generating {split} images", unit="img"):
            label = i % 2
            img = random_patch(rng, size)
            if artifact == "band":
                if label:
                    img = band_artifact(img, rng, float(band["amplitude"]), (float(band["lo"]), float(band["hi"])))
                arr = degrade(img, rng, float(band.get("resize") or 1.0), band.get("jpeg"))
            else:
                if label:
                    img = upsample_decoder(img, rng, artifact_strength)
                arr = np.clip(np.rint(img), 0, 255).astype(np.uint8)
            rel = f"{split}/{idx:06d}.png"
            os.makedirs(os.path.join(d, split), exist_ok=True)
            Image.fromarray(arr).save(os.path.join(d, rel))
            rows.append(dict(uri=os.path.join(d, rel), label=label, split=split, image_id=idx,
                             source="natural" if label == 0 else ("band_trace" if artifact == "band" else "upsampling_decoder"),
                             manipulation="none" if label == 0 else ("narrow_band" if artifact == "band" else "transposed_conv_x2")))
            idx += 1
    return write_generated_manifest(rows, man, params)


def load_image_manifest(manifest: str, size: int | None = None) -> dict:
    """Decode every image of a manifest into ``{split: {x: N x 3 x H x W uint8, y, vid}}``."""
    from trustlab.platform import storage

    df = pd.read_csv(manifest)
    out = {}
    for split, g in df.groupby("split", sort=False):
        xs = []
        for uri in progress(g["uri"], f"decoding {split} images", unit="img"):
            im = Image.open(__import__("io").BytesIO(storage.read_bytes(uri))).convert("RGB")
            if size and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            xs.append(np.asarray(im).transpose(2, 0, 1))
        out[split] = {"x": np.stack(xs), "y": g["label"].to_numpy(np.int64),
                      "vid": g["image_id"].to_numpy(np.int64)}
    return out


def write_generated_manifest(rows: list[dict], man: str, params: dict) -> str:
    """Write a generated set's ``manifest.csv`` (atomically: a half-written set is never read) and
    the ``params.json`` beside it that says which parameters made it."""
    tmp = man + ".tmp"
    pd.DataFrame(rows).to_csv(tmp, index=False)
    os.replace(tmp, man)
    with open(os.path.join(os.path.dirname(man), "params.json"), "w") as f:
        json.dump(params, f, indent=2)
    return man

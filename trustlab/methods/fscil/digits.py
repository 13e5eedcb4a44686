"""scikit-learn's digits (1,797 real 8x8 handwritten digits, UCI Optical Recognition of Handwritten
Digits, shipped inside scikit-learn) as the default FSCIL benchmark.

Default protocol (method YAMLs): 4 base classes + 3 sessions of 2-way 5-shot. Splits are seeded
(``trustlab.methods.fscil.protocol.seeded_manifest``): a seeded class order, then per class a seeded
test set, a validation set (base classes: selects the base model; new classes: monitoring and
Tune only, never trained on) and the training pool (base: all of it; new: exactly ``shots``).
Pixel values 0..16 are scaled to uint8 0..255; images are 1 x 8 x 8.

``occluded`` (CD²'s default, a planted signal): a seeded share of the *training* images (base
pool and shots) gets a square block set to zero, as captures with part of the digit hidden;
validation and test images stay whole. A memory of K real exemplars drawn at random then often
keeps an occluded one, while a memory distilled to the class-mean feature does not have to.
"""
from __future__ import annotations

import numpy as np

from trustlab.methods.fscil.protocol import Protocol, arrays_from_manifest, seeded_manifest


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """(N x 1 x 8 x 8 uint8 images, N labels)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[:, None]
    return x, d.target.astype(np.int64)


def digits_manifest(p: Protocol, seed: int, test_per_class: int, val_per_class: int,
                    val_novel_per_class: int = 0, class_order=None):
    _, y = digits_images()
    return seeded_manifest(y, p, seed, test_per_class, val_per_class, val_novel_per_class,
                           class_order=class_order, source="sklearn-digits")


def occlude(x: np.ndarray, share: float, side: int, seed: int) -> np.ndarray:
    """A copy of images ``x`` (N x C x H x W) where a seeded ``share`` of them has a ``side`` x
    ``side`` block at a random place set to zero."""
    x = x.copy()
    h, w = x.shape[-2:]
    if not 0 < side <= min(h, w) or not 0 <= share <= 1:
        raise ValueError(f"occluded: share must be in [0, 1] and side in 1..{min(h, w)}, got {share}, {side}")
    rng = np.random.default_rng([int(seed), 0x0CC1])
    for i in np.flatnonzero(rng.random(len(x)) < share):
        r, c = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        x[i, :, r:r + side, c:c + side] = 0
    return x


def build_digits(p: Protocol, seed: int, test_per_class: int = 50, val_per_class: int = 30,
                 val_novel_per_class: int = 0, class_order=None, occluded: dict | None = None) -> dict:
    """``{train, val, test}`` arrays (``x, y, vid, session``) for the FSCIL methods; ``occluded``
    ``{share, side}`` hides a block of that share of the training images (module docstring)."""
    x, _ = digits_images()
    df = digits_manifest(p, seed, test_per_class, val_per_class, val_novel_per_class, class_order)
    out = arrays_from_manifest(df, x[df["image_id"].to_numpy()])
    if occluded:
        out["train"]["x"] = occlude(out["train"]["x"], float(occluded["share"]), int(occluded["side"]), seed)
    return out

"""Natural image content that ships inside pip packages (no download): scikit-image's sample
images and scikit-learn's two sample photos. Used as the "real" source by synthetic sets."""
from __future__ import annotations

import functools

import numpy as np

# scikit-image sample images bundled in the wheel (others need pooch downloads and are left out)
SKIMAGE_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry",
                 "hubble_deep_field", "coins", "retina", "moon", "grass", "gravel", "brick", "page")


@functools.lru_cache(maxsize=1)
def natural_images() -> tuple[np.ndarray, ...]:
    """RGB uint8 photos (H, W, 3); grey images are replicated to three channels."""
    import skimage.data as skd
    from sklearn.datasets import load_sample_images

    out = []
    for n in SKIMAGE_NAMES:
        im = np.asarray(getattr(skd, n)())
        if im.ndim == 2:
            im = np.repeat(im[..., None], 3, axis=2)
        out.append(np.ascontiguousarray(im[..., :3].astype(np.uint8)))
    out.extend(np.asarray(im, dtype=np.uint8) for im in load_sample_images().images)
    return tuple(out)


def area_resize(img: np.ndarray, size: int) -> np.ndarray:
    """Resize an HxWx3 float/uint8 image to size x size with area averaging (OpenCV)."""
    import cv2

    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def random_patch(rng: np.random.Generator, size: int, scale=(1.0, 2.5)) -> np.ndarray:
    """A random crop of a random photo, taken at a random scale, resized to size x size
    (area averaging), randomly flipped; float32 in [0, 255]."""
    ims = natural_images()
    im = ims[rng.integers(len(ims))]
    s = int(size * rng.uniform(*scale))
    s = min(s, im.shape[0], im.shape[1])
    y = rng.integers(0, im.shape[0] - s + 1)
    x = rng.integers(0, im.shape[1] - s + 1)
    crop = im[y : y + s, x : x + s].astype(np.float32)
    crop = area_resize(crop, size) if s != size else crop
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)

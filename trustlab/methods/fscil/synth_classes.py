"""A generated many-class image set for FSCIL, laid out like CIFAR-100 with its index lists.

Every class is a random *part layout*: three coloured Gaussian blobs at class-specific positions
and radii plus one coloured bar at a class-specific angle, drawn on a low-contrast natural-photo
background (``natural.random_patch``). Instances vary by a global shift (up to 3 px), per-part
position jitter, radius and colour jitter, a randomly dropped blob (20 %) and pixel noise. All
classes come from the same generative family, so features learned on the base classes transfer
to new ones (what FSCIL needs), yet the new classes' layouts are never seen in the base session.

The tree mimics the public CIFAR-100 FSCIL layout (so the CIFAR adapter reads it):
``cifar-100-python/{train,test,meta}`` pickles (``data``: N x 3072 uint8 rows, channel-major
32x32; ``fine_labels``) and ``index_list/cifar100/session_<k>.txt`` (k = 1: every training row of
the base classes; k > 1: ``shots`` seeded rows per class of that session). Default protocol:
60 base classes + 8 sessions of 5-way 5-shot. Images are generated at 32 x 32 and resized by the
loader (``method.data.size``, e.g. 16). Cached under ``root`` by its parameters.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle

import numpy as np

from trustlab.platform.data.natural import random_patch

SIDE = 32


def class_spec(seed: int, c: int) -> dict:
    rng = np.random.default_rng([int(seed), 11, int(c)])
    return {
        "centers": rng.uniform(7, SIDE - 7, size=(3, 2)),
        "radii": rng.uniform(2.0, 4.5, size=3),
        "colors": rng.uniform(0.0, 1.0, size=(3, 3)),
        "bar_angle": rng.uniform(0, np.pi),
        "bar_offset": rng.uniform(-6, 6),
        "bar_color": rng.uniform(0.0, 1.0, size=3),
    }


def render(spec: dict, rng: np.random.Generator) -> np.ndarray:
    """One 32 x 32 x 3 uint8 instance of a class."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
    bg = random_patch(rng, SIDE) / 255.0
    img = 0.5 + 0.3 * (bg - bg.mean())
    shift = rng.uniform(-3, 3, size=2)
    # bar: a soft line through the (shifted) centre at the class angle
    a = spec["bar_angle"] + rng.normal(0, 0.08)
    cy, cx = SIDE / 2 + shift[0], SIDE / 2 + shift[1]
    dist = (xx - cx) * np.sin(a) - (yy - cy) * np.cos(a) - spec["bar_offset"]
    w = np.exp(-0.5 * (dist / 1.2) ** 2)[..., None]
    img = img * (1 - 0.8 * w) + 0.8 * w * np.clip(spec["bar_color"] + rng.normal(0, 0.08, 3), 0, 1)
    drop = rng.integers(3) if rng.random() < 0.2 else -1
    for j in range(3):
        if j == drop:
            continue
        c = spec["centers"][j] + shift + rng.normal(0, 1.0, 2)
        r = spec["radii"][j] * rng.uniform(0.8, 1.2)
        m = np.exp(-0.5 * (((yy - c[0]) ** 2 + (xx - c[1]) ** 2) / r**2))[..., None]
        col = np.clip(spec["colors"][j] + rng.normal(0, 0.08, 3), 0, 1)
        img = img * (1 - m) + m * col
    img = img + rng.normal(0, 0.03, img.shape)
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def _key(params: dict) -> str:
    return hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]


def build_tree(root: str, seed: int, protocol, train_per_class: int = 60, test_per_class: int = 20) -> str:
    """Write the CIFAR-100-layout tree once per parameter set; return its root folder."""
    p = protocol
    params = dict(seed=int(seed), n_base=p.n_base, n_sessions=p.n_sessions, ways=p.ways, shots=p.shots,
                  train_per_class=int(train_per_class), test_per_class=int(test_per_class), version=1)
    d = os.path.join(root, f"synth_classes-{_key(params)}")
    done = os.path.join(d, "params.json")
    if os.path.exists(done):
        return d
    os.makedirs(os.path.join(d, "cifar-100-python"), exist_ok=True)
    idx_dir = os.path.join(d, "index_list", "cifar100")
    os.makedirs(idx_dir, exist_ok=True)
    rows = {"train": ([], []), "test": ([], [])}
    for c in range(p.n_classes):
        spec = class_spec(seed, c)
        for split, n, off in (("train", train_per_class, 0), ("test", test_per_class, 1)):
            rng = np.random.default_rng([int(seed), 12, c, off])
            for _ in range(n):
                rows[split][0].append(render(spec, rng).transpose(2, 0, 1).reshape(-1))
                rows[split][1].append(c)
    for split, (xs, ys) in rows.items():
        with open(os.path.join(d, "cifar-100-python", split), "wb") as f:
            pickle.dump({"data": np.stack(xs), "fine_labels": ys, "filenames": [f"{split}_{i}.png" for i in range(len(ys))]}, f)
    with open(os.path.join(d, "cifar-100-python", "meta"), "wb") as f:
        pickle.dump({"fine_label_names": [f"class_{c:03d}" for c in range(p.n_classes)]}, f)
    labels = np.asarray(rows["train"][1])
    rng = np.random.default_rng([int(seed), 13])
    lists = [np.flatnonzero(labels < p.n_base).tolist()]
    for s in range(1, p.n_sessions + 1):
        lists.append([int(i) for c in p.session_classes(s)
                      for i in np.sort(rng.choice(np.flatnonzero(labels == c), p.shots, replace=False))])
    for k, lst in enumerate(lists, start=1):
        with open(os.path.join(idx_dir, f"session_{k}.txt"), "w") as f:
            f.write("\n".join(str(i) for i in lst) + "\n")
    with open(done, "w") as f:
        json.dump(params, f, indent=2)
    return d

"""Real face datasets for de-occlusion distillation (``data=faces``): any face set by manifest, or
LFW as shipped with its ``pairs.txt``; masks are synthesised on the real faces.

Sources:

- a manifest (CSV/Parquet, local or s3://): ``uri, identity, split`` (train identities are the
  teacher's classes; val/test identities are unseen, open-set), optional landmarks
  ``lm0_x, lm0_y, ..., lm7_x, lm7_y`` in pixels of the (cropped) image, in ``masks.LANDMARKS``
  order;
- LFW: ``<root>/<Name>/<Name>_<NNNN>.jpg`` and ``pairs.txt`` (first line ``<folds> <n>``, then per
  fold ``n`` matched lines ``name i j`` and ``n`` mismatched lines ``name1 i name2 j``). Every image
  of an identity named in ``pairs.txt`` is test; the other identities train, a seeded
  ``val_fraction`` of them (with at least two images) val. The pairs give the standard protocol:
  10-fold accuracy (threshold chosen on nine folds, accuracy on the tenth), mean and std.

Landmarks: without per-image ones, every crop gets a canonical template (``TEMPLATES``, as
fractions of the side) — the layout of aligned face crops (``aligned``: MTCNN/facenet-style
crops, averaged from hand-marked aligned portraits in ../shared/data/real). ``crop``
(``[x0, y0, x1, y1]`` fractions) first cuts a loosely framed image (LFW's 250 px frames) to such a
crop. Masks are then drawn from them by ``masks.synthesize`` on the real pixels.
"""
from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd

from trustlab.platform import storage

TEMPLATES = {
    # eyes, nose tip, mouth corners, chin, jaw edges at mouth height (x, y as fractions of the crop)
    "aligned": [(0.30, 0.42), (0.74, 0.42), (0.51, 0.63), (0.34, 0.78), (0.70, 0.78), (0.52, 0.97),
                (0.07, 0.76), (0.95, 0.76)],
}
LFW_CROP = (0.27, 0.27, 0.73, 0.80)  # LFW (deep-funneled) 250 px frames -> an aligned-style face crop


def read_pairs(path: str, endpoint: str | None = None) -> list[tuple[str, int, str, int, int, int]]:
    """``[(name_a, i, name_b, j, same, fold)]`` of an LFW ``pairs.txt``."""
    lines = [ln.split() for ln in storage.read_bytes(path, endpoint).decode().splitlines() if ln.strip()]
    head, rest = lines[0], lines[1:]
    folds, n = (int(head[0]), int(head[1])) if len(head) == 2 else (1, len(rest) // 2)
    if len(rest) != folds * 2 * n:
        raise ValueError(f"{path}: header says {folds} folds x {2 * n} pairs, found {len(rest)} lines")
    out = []
    for k, p in enumerate(rest):
        fold = k // (2 * n)
        if len(p) == 3:
            out.append((p[0], int(p[1]), p[0], int(p[2]), 1, fold))
        elif len(p) == 4:
            out.append((p[0], int(p[1]), p[2], int(p[3]), 0, fold))
        else:
            raise ValueError(f"{path}: bad pair line {' '.join(p)!r}")
    return out


def lfw_file(root: str, name: str, i: int) -> str:
    return os.path.join(root, name, f"{name}_{int(i):04d}.jpg")


def lfw_manifest(root: str, pairs: str | None = None, val_fraction: float = 0.1, seed: int = 0,
                 endpoint: str | None = None) -> tuple[pd.DataFrame, list]:
    """LFW manifest and its pairs (see the module docstring)."""
    pairs = pairs or os.path.join(root, "pairs.txt")
    plist = read_pairs(pairs, endpoint)
    test_ids = {p[0] for p in plist} | {p[2] for p in plist}
    rows = []
    for name in sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))):
        files = sorted(f for f in os.listdir(os.path.join(root, name)) if f.lower().endswith((".jpg", ".png")))
        for f in files:
            rows.append(dict(uri=os.path.join(root, name, f), identity=name, split="test" if name in test_ids else "train"))
    df = pd.DataFrame(rows, columns=["uri", "identity", "split"])
    named = {lfw_file(root, a, i) for a, i, _, _, _, _ in plist} | {lfw_file(root, b, j) for _, _, b, j, _, _ in plist}
    missing = sorted(named - set(df["uri"]))
    if missing:
        raise ValueError(f"{len(missing)} images named in {pairs} are not under {root}, e.g. {missing[:3]}")
    return carve_val(df, val_fraction, seed), plist


def carve_val(df: pd.DataFrame, val_fraction: float, seed: int) -> pd.DataFrame:
    """Move a seeded ``val_fraction`` of the training identities with >= 2 images to val (open-set)."""
    rng = np.random.default_rng([int(seed), 11])
    tr = df[df["split"] == "train"]
    multi = sorted(tr.groupby("identity").size().loc[lambda s: s >= 2].index)
    val = set(rng.permutation(multi)[: max(1, int(round(val_fraction * len(multi))))].tolist()) if multi else set()
    df = df.copy()
    df.loc[df["identity"].isin(val) & (df["split"] == "train"), "split"] = "val"
    return df


def read_face_manifest(uri: str, endpoint: str | None = None) -> pd.DataFrame:
    data = storage.read_bytes(uri, endpoint)
    df = pd.read_parquet(io.BytesIO(data)) if str(uri).endswith(".parquet") else pd.read_csv(io.BytesIO(data))
    if not {"uri", "identity", "split"} <= set(df.columns):
        raise ValueError(f"{uri}: a face manifest needs columns uri, identity, split")
    if not storage.is_s3(uri):
        base = os.path.dirname(os.path.abspath(uri))
        df["uri"] = [u if (storage.is_s3(u) or os.path.isabs(u)) else os.path.join(base, u) for u in df["uri"]]
    df["identity"] = df["identity"].astype(str)
    return df


LM_COLUMNS = [f"lm{k}_{a}" for k in range(8) for a in ("x", "y")]


def load_faces(df: pd.DataFrame, size: int, crop=None, template: str = "aligned", endpoint: str | None = None) -> dict:
    """``{split: {x (N, 3, size, size) uint8, y (identity index within the split's ids, train ids
    first), lm (N, 8, 2) pixels at ``size``, vid}}``; identities of train get labels 0..K-1."""
    from PIL import Image

    tmpl = np.asarray(TEMPLATES[template], np.float32)
    ids = {n: i for i, n in enumerate(sorted(df.loc[df["split"] == "train", "identity"].unique()))}
    for n in sorted(set(df["identity"]) - set(ids)):
        ids[n] = len(ids)
    out, off = {}, 0
    for split in ("train", "val", "test"):
        g = df[df["split"] == split]
        if not len(g):
            continue
        xs, lms = [], []
        for _, r in g.iterrows():
            im = Image.open(io.BytesIO(storage.read_bytes(r["uri"], endpoint))).convert("RGB")
            w, h = im.size
            box = (0, 0, w, h)
            if crop:
                box = (int(crop[0] * w), int(crop[1] * h), int(crop[2] * w), int(crop[3] * h))
                im = im.crop(box)
            cw, ch = im.size
            im = im.resize((size, size), Image.BILINEAR)
            xs.append(np.asarray(im).transpose(2, 0, 1))
            if all(c in g.columns for c in LM_COLUMNS) and not pd.isna(r[LM_COLUMNS[0]]):
                pts = np.asarray([r[c] for c in LM_COLUMNS], np.float32).reshape(8, 2)
                pts = (pts - np.asarray(box[:2], np.float32)) * np.asarray([size / cw, size / ch], np.float32)
            else:
                pts = tmpl * size
            lms.append(pts)
        out[split] = {"x": np.stack(xs), "y": g["identity"].map(ids).to_numpy(np.int64),
                      "lm": np.stack(lms).astype(np.float32), "vid": np.arange(off, off + len(g), dtype=np.int64)}
        off += len(g)
    return out


def pair_table(df: pd.DataFrame, plist: list, root: str) -> dict:
    """The pairs as rows of the test split: ``{a, b, same, fold, y}`` (equal-length arrays)."""
    test = df[df["split"] == "test"].reset_index(drop=True)
    pos = {u: k for k, u in enumerate(test["uri"])}
    a = np.asarray([pos[lfw_file(root, p[0], p[1])] for p in plist], np.int64)
    b = np.asarray([pos[lfw_file(root, p[2], p[3])] for p in plist], np.int64)
    same = np.asarray([p[4] for p in plist], np.int64)
    return {"a": a, "b": b, "same": same, "fold": np.asarray([p[5] for p in plist], np.int64), "y": same}


def face_manifest(cfg: dict) -> tuple[pd.DataFrame, list | None]:
    """The manifest of ``data=faces`` (``label`` = identity index) and LFW's pairs (or None)."""
    d = cfg["data"]
    endpoint = cfg["run"].get("s3_endpoint")
    plist = None
    if d.get("manifest"):
        df = read_face_manifest(d["manifest"], endpoint)
        if not (df["split"] == "val").any():  # model selection needs unseen identities of its own
            df = carve_val(df, float(d.get("val_fraction", 0.1)), int(cfg["seed"]))
    elif d.get("root"):
        df, plist = lfw_manifest(d["root"], d.get("pairs"), float(d.get("val_fraction", 0.1)), int(cfg["seed"]), endpoint)
    else:
        raise ValueError("data=faces needs data.manifest (uri, identity, split) or data.root (LFW with pairs.txt)")
    return df.assign(label=df["identity"].map({n: i for i, n in enumerate(sorted(df["identity"].unique()))})), plist


def face_data(cfg: dict) -> dict:
    """The run's face arrays per split (``data=faces``), plus ``pairs`` (rows of the test split) for LFW."""
    d = cfg["data"]
    df, plist = face_manifest(cfg)
    crop = d.get("crop") or (LFW_CROP if plist is not None else None)
    data = load_faces(df, int(cfg["method"]["data"]["size"]), crop, d.get("landmarks") or "aligned",
                      cfg["run"].get("s3_endpoint"))
    if plist is not None:
        data["pairs"] = pair_table(df, plist, d["root"])
    return data


def fold_accuracy(sim: np.ndarray, same: np.ndarray, fold: np.ndarray) -> dict:
    """The LFW protocol: per fold, the threshold with the best accuracy on the other folds; mean
    and std of the held-out accuracies."""
    from trustlab.methods.deocclusion.deocclusion import best_threshold

    accs = []
    for k in np.unique(fold):
        tr, te = fold != k, fold == k
        thr = best_threshold(sim[tr & (same == 1)], sim[tr & (same == 0)])
        accs.append(float(np.mean((sim[te] >= thr) == (same[te] == 1))))
    return {"acc_mean": float(np.mean(accs)), "acc_std": float(np.std(accs)), "folds": accs}

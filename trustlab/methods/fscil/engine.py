"""Few-shot class-incremental learning (FSCIL): the session protocol engine.

Protocol. A benchmark has ``n_base`` base classes (session 0, all their training images) and
``n_sessions`` incremental sessions of ``ways`` new classes with exactly ``shots`` training images
each. After session ``s`` a model is tested on the test images of every class seen so far
(``n_base + s * ways`` classes). Classes are renumbered in session order, so class ``c`` belongs
to session ``0`` if ``c < n_base`` and to ``1 + (c - n_base) // ways`` otherwise, and "seen at
session s" is simply ``label < n_seen(s)``.

Standard splits (the index lists of Tao et al., "Few-Shot Class-Incremental Learning", CVPR 2020,
as redistributed with CEC, Zhang et al., CVPR 2021): CIFAR-100 and miniImageNet 60 base classes
+ 8 sessions of 5-way 5-shot, CUB-200 100 + 10 sessions of 10-way 5-shot. Their
``session_<k>.txt`` files (k = 1 is the base session) list training images: integer row indices
into CIFAR-100's ``train`` pickle, ``.../<file>.jpg`` paths whose basename is a miniImageNet image,
``CUB_200_2011/images/<class>/<file>.jpg`` paths for CUB. ``cifar100_manifest``,
``mini_imagenet_manifest`` and ``cub200_manifest`` read those layouts (tested on tiny trees) and
write one manifest: ``uri, label, orig_label, split, session, image_id, source`` where ``label``
is the session-ordered class index, ``session`` the session that introduces the class, and
``split`` one of train / val / test (val rows are carved from base training images, seeded, for
selecting the base model; the test split is never used for selection). ``check_manifest``
verifies a manifest: no class in two sessions, exactly ``shots`` training images per new class,
no image in two splits.

Metrics. ``session_accuracies`` gives top-1 accuracy (percent) over all seen classes after each
session; ``summarize_sessions`` adds the average and the performance drop PD = first - last.
``finetune_baseline`` (all weights fine-tuned on each session's shots) and
``prototype_baseline`` (frozen encoder, nearest class-mean by cosine) run from a method's base
model. ``session_table`` / ``session_plot`` write the per-session CSV and the accuracy-per-session
PNG; ``python -m trustlab.methods.fscil.engine plot RUN_DIR... -o out.png`` draws several runs (every
method and baseline) in one plot.

``FSCILMethod`` drives a method through the platform with two Ray Train stages: ``base``
(the generic loop: cross-entropy on base classes, ``validate`` reports base-class validation
accuracy as ``val_score``) and ``incremental`` (``incremental_worker``: one
``ray.train.report`` per session). A method implements ``build_model``, ``loss_step``,
``begin_incremental``, ``learn_session``, ``session_logits``, ``base_encoder``,
``base_classifier``; the model keeps one head per session so that every session's model can be
evaluated from the final checkpoint. This module names no method.
"""
from __future__ import annotations

import copy
import math
import os
import pickle
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from trustlab.platform.method import MethodBase


# ============================================================================ protocol
@dataclass(frozen=True)
class Protocol:
    n_base: int      # classes of the base session (session 0)
    n_sessions: int  # incremental sessions after the base one
    ways: int        # new classes per incremental session
    shots: int       # training images per new class

    @property
    def n_classes(self) -> int:
        return self.n_base + self.n_sessions * self.ways

    def n_seen(self, s: int) -> int:
        return self.n_base + s * self.ways

    def session_classes(self, s: int) -> range:
        return range(0, self.n_base) if s == 0 else range(self.n_seen(s - 1), self.n_seen(s))

    def class_session(self, c) -> np.ndarray:
        c = np.asarray(c)
        return np.where(c < self.n_base, 0, 1 + (c - self.n_base) // self.ways)

    @classmethod
    def from_dict(cls, d: dict) -> "Protocol":
        return cls(int(d["n_base"]), int(d["n_sessions"]), int(d["ways"]), int(d["shots"]))


PROTOCOLS = {
    "cifar100": Protocol(60, 8, 5, 5),
    "mini_imagenet": Protocol(60, 8, 5, 5),
    "cub200": Protocol(100, 10, 10, 5),
}

# per benchmark: default protocol, channels and side fed to the backbone (``method.data.*: null``)
BENCHMARKS = {
    "digits": (Protocol(4, 3, 2, 5), 1, 8),
    "synth": (Protocol(60, 8, 5, 5), 3, 16),
    "cifar100": (PROTOCOLS["cifar100"], 3, 32),
    "mini_imagenet": (PROTOCOLS["mini_imagenet"], 3, 84),
    "cub200": (PROTOCOLS["cub200"], 3, 224),
}

MANIFEST_COLUMNS = ["uri", "label", "orig_label", "split", "session", "image_id", "source"]


# ============================================================================ manifests
def check_manifest(df: pd.DataFrame, p: Protocol) -> None:
    """Raise ``ValueError`` unless ``df`` is a valid FSCIL manifest for protocol ``p``."""
    if set(df["label"].unique()) != set(range(p.n_classes)):
        raise ValueError(f"labels must be exactly 0..{p.n_classes - 1}")
    if not np.array_equal(df["session"].to_numpy(), p.class_session(df["label"].to_numpy())):
        raise ValueError("a row's session does not match its class (class leaks between sessions)")
    if df.groupby("label")["orig_label"].nunique().max() != 1 or df.groupby("orig_label")["label"].nunique().max() != 1:
        raise ValueError("orig_label <-> label is not one-to-one")
    if df["uri"].duplicated().any():
        dup = df.loc[df["uri"].duplicated(keep=False)].sort_values("uri").head(4)
        raise ValueError(f"an image appears in two rows/splits: {dup[['uri', 'split']].values.tolist()}")
    tr = df[df["split"] == "train"]
    counts = tr.groupby("label").size().reindex(range(p.n_classes), fill_value=0)
    novel = counts.iloc[p.n_base:]
    if (novel != p.shots).any():
        bad = novel[novel != p.shots]
        raise ValueError(f"novel classes need exactly {p.shots} training images; got {bad.to_dict()}")
    if (counts.iloc[: p.n_base] < 1).any():
        raise ValueError("every base class needs training images")
    if set(df["split"].unique()) - {"train", "val", "test"}:
        raise ValueError("split must be train, val or test")
    te = df[df["split"] == "test"].groupby("label").size().reindex(range(p.n_classes), fill_value=0)
    if (te < 1).any():
        raise ValueError(f"classes without test images: {te[te < 1].index.tolist()}")


def seeded_manifest(labels, p: Protocol, seed: int, test_per_class: int, val_per_class: int,
                    val_novel_per_class: int = 0, base_train_per_class: int | None = None,
                    class_order=None, uris=None, source: str = "") -> pd.DataFrame:
    """Seeded FSCIL splits of one labelled pool (e.g. scikit-learn digits).

    Classes: ``class_order`` (original labels, session order) or a seeded permutation of the
    pool's labels (the first ``p.n_classes``). Per class, a seeded shuffle gives ``test_per_class``
    test images, then val images (``val_per_class`` for base classes, ``val_novel_per_class`` for
    new ones), then the training pool: all of it (or ``base_train_per_class``) for base classes,
    exactly ``p.shots`` images for new classes. ``uris`` default to ``"<source>#<index>"``.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng([int(seed), 6])
    uniq = np.unique(labels)
    order = list(class_order) if class_order is not None else list(rng.permutation(uniq))
    if len(order) < p.n_classes:
        raise ValueError(f"protocol needs {p.n_classes} classes, pool has {len(order)}")
    rows = []
    for c, orig in enumerate(order[: p.n_classes]):
        idx = rng.permutation(np.flatnonzero(labels == orig))
        s = int(p.class_session(c))
        nv = val_per_class if s == 0 else val_novel_per_class
        need = test_per_class + nv + (1 if s == 0 else p.shots)
        if len(idx) < need:
            raise ValueError(f"class {orig!r} has {len(idx)} images, needs at least {need}")
        test, val, pool = idx[:test_per_class], idx[test_per_class:test_per_class + nv], idx[test_per_class + nv:]
        train = pool[: (base_train_per_class or len(pool))] if s == 0 else pool[: p.shots]
        for split, ids in (("train", train), ("val", val), ("test", test)):
            for i in ids:
                rows.append((uris[i] if uris is not None else f"{source}#{int(i)}", c, orig, split, s, int(i), source))
    df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    check_manifest(df, p)
    return df


def read_index_lists(index_dir: str) -> list[list[str]]:
    """``session_1.txt`` (base) ... ``session_<N+1>.txt`` of an index-list folder, in order."""
    names = [f for f in os.listdir(index_dir) if f.startswith("session_") and f.endswith(".txt")]
    ks = sorted(int(f[len("session_"):-4]) for f in names)
    if ks != list(range(1, len(ks) + 1)):
        raise ValueError(f"{index_dir}: expected session_1.txt .. session_{len(ks)}.txt, found {sorted(names)}")
    out = []
    for k in ks:
        with open(os.path.join(index_dir, f"session_{k}.txt")) as f:
            out.append([ln.strip() for ln in f if ln.strip()])
    return out


def manifest_from_index_lists(train: pd.DataFrame, test: pd.DataFrame, sessions: list[list[str]],
                              p: Protocol, source: str, val_per_class: int = 0, seed: int = 0,
                              base_from_labels: bool = False) -> pd.DataFrame:
    """Assemble a manifest from a dataset's train/test tables (``key, uri, orig_label``) and the
    index lists (``sessions[0]`` = base session, ``sessions[k]`` = incremental session k, each a
    list of train keys). Class order: base classes sorted by original label, then each session's
    classes sorted by original label. ``base_from_labels``: the base session is every training
    image of the first ``p.n_base`` original labels (when no base list is given)."""
    if len(sessions) != p.n_sessions + (0 if base_from_labels else 1):
        raise ValueError(f"expected {p.n_sessions + (0 if base_from_labels else 1)} index lists, got {len(sessions)}")
    by_key = train.set_index("key")
    missing = [k for sess in sessions for k in sess if k not in by_key.index]
    if missing:
        raise ValueError(f"{len(missing)} index-list entries are not in the dataset, e.g. {missing[:3]}")
    if base_from_labels:
        base_labels = sorted(train["orig_label"].unique())[: p.n_base]
        base_rows = train[train["orig_label"].isin(base_labels)]
        inc = sessions
    else:
        base_rows = by_key.loc[sessions[0]].reset_index()
        inc = sessions[1:]
    order = sorted(base_rows["orig_label"].unique())
    if len(order) != p.n_base:
        raise ValueError(f"base session has {len(order)} classes, protocol says {p.n_base}")
    sess_rows = []
    for s, keys in enumerate(inc, start=1):
        r = by_key.loc[keys].reset_index()
        cls = sorted(r["orig_label"].unique())
        if len(cls) != p.ways or set(cls) & set(order):
            raise ValueError(f"session {s}: {len(cls)} classes (want {p.ways}), "
                             f"{len(set(cls) & set(order))} seen before")
        order += cls
        sess_rows.append(r)
    cmap = {o: i for i, o in enumerate(order)}
    rng = np.random.default_rng([int(seed), 7])
    base_rows = base_rows.assign(split="train")
    if val_per_class:
        parts = []
        for _, g in base_rows.groupby("orig_label", sort=True):
            g = g.iloc[rng.permutation(len(g))].copy()
            g.iloc[:val_per_class, g.columns.get_loc("split")] = "val"
            parts.append(g)
        base_rows = pd.concat(parts)
    rows = [base_rows] + [r.assign(split="train") for r in sess_rows]
    rows.append(test[test["orig_label"].isin(cmap)].assign(split="test"))
    df = pd.concat(rows, ignore_index=True)
    df["label"] = df["orig_label"].map(cmap).astype(np.int64)
    df["session"] = p.class_session(df["label"].to_numpy())
    df["image_id"] = np.arange(len(df))
    df["source"] = source
    df = df[MANIFEST_COLUMNS]
    check_manifest(df, p)
    return df


def cifar100_manifest(root: str, index_dir: str | None = None, p: Protocol = PROTOCOLS["cifar100"],
                      val_per_class: int = 0, seed: int = 0, source: str = "cifar100") -> pd.DataFrame:
    """CIFAR-100 python layout: ``<root>/cifar-100-python/{train,test}`` pickles (``data`` rows of
    3*32*32 uint8, ``fine_labels``); index lists (default ``<root>/index_list/cifar100``) hold
    integer row indices into ``train``. Without ``session_1.txt`` the base session is every
    training image of classes 0..n_base-1 (as CEC does)."""
    index_dir = index_dir or os.path.join(root, "index_list", "cifar100")
    tabs = {}
    for split in ("train", "test"):
        path = os.path.join(root, "cifar-100-python", split)
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")
        y = np.asarray(d["fine_labels"])
        tabs[split] = pd.DataFrame({"key": [str(i) for i in range(len(y))],
                                    "uri": [f"{path}#{i}" for i in range(len(y))], "orig_label": y})
    sessions = read_index_lists(index_dir)
    sessions = [[str(int(k)) for k in s] for s in sessions]
    base_from_labels = len(sessions) == p.n_sessions
    return manifest_from_index_lists(tabs["train"], tabs["test"], sessions, p, source, val_per_class, seed,
                                     base_from_labels=base_from_labels)


def mini_imagenet_manifest(root: str, index_dir: str | None = None, p: Protocol = PROTOCOLS["mini_imagenet"],
                           val_per_class: int = 0, seed: int = 0) -> pd.DataFrame:
    """miniImageNet FSCIL layout: ``<root>/miniimagenet/images/<file>.jpg`` and
    ``<root>/miniimagenet/split/{train,test}.csv`` (``filename,label`` with a wnid label; class
    ids follow the wnids' first appearance in ``train.csv``); index lists (default
    ``<root>/index_list/mini_imagenet``) hold paths whose basename is the image file."""
    index_dir = index_dir or os.path.join(root, "index_list", "mini_imagenet")
    img_dir = os.path.join(root, "miniimagenet", "images")
    wnids: dict[str, int] = {}
    tabs = {}
    for split in ("train", "test"):
        t = pd.read_csv(os.path.join(root, "miniimagenet", "split", f"{split}.csv"))
        t.columns = ["filename", "wnid"]
        if split == "train":
            for w in t["wnid"]:
                wnids.setdefault(w, len(wnids))
        tabs[split] = pd.DataFrame({"key": t["filename"], "uri": [os.path.join(img_dir, f) for f in t["filename"]],
                                    "orig_label": t["wnid"].map(wnids).astype(np.int64)})
    sessions = [[os.path.basename(k) for k in s] for s in read_index_lists(index_dir)]
    return manifest_from_index_lists(tabs["train"], tabs["test"], sessions, p, "mini_imagenet", val_per_class, seed)


def cub200_manifest(root: str, index_dir: str | None = None, p: Protocol = PROTOCOLS["cub200"],
                    val_per_class: int = 0, seed: int = 0) -> pd.DataFrame:
    """CUB-200-2011 layout: ``<root>/CUB_200_2011/{images.txt, train_test_split.txt,
    image_class_labels.txt, images/<class>/<file>.jpg}``; index lists (default
    ``<root>/index_list/cub200``) hold ``CUB_200_2011/images/<class>/<file>.jpg`` paths."""
    index_dir = index_dir or os.path.join(root, "index_list", "cub200")
    base = os.path.join(root, "CUB_200_2011")

    def table(name):
        return pd.read_csv(os.path.join(base, name), sep=r"\s+", header=None, names=["id", "v"], dtype=str)

    ims, tt, cl = table("images.txt"), table("train_test_split.txt"), table("image_class_labels.txt")
    df = ims.merge(tt, on="id", suffixes=("", "_train")).merge(cl, on="id", suffixes=("", "_cls"))
    df = pd.DataFrame({"key": "images/" + df["v"], "uri": [os.path.join(base, "images", v) for v in df["v"]],
                       "orig_label": df["v_cls"].astype(np.int64) - 1, "is_train": df["v_train"] == "1"})
    train = df[df["is_train"]].drop(columns="is_train")
    test = df[~df["is_train"]].drop(columns="is_train")

    def key(line):
        i = line.find("images/")
        if i < 0:
            raise ValueError(f"CUB index-list entry without images/: {line!r}")
        return line[i:]

    sessions = [[key(k) for k in s] for s in read_index_lists(index_dir)]
    return manifest_from_index_lists(train, test, sessions, p, "cub200", val_per_class, seed)


def write_manifest(df: pd.DataFrame, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    (df.to_parquet if path.endswith(".parquet") else df.to_csv)(path, index=False)
    return path


def read_manifest(path: str) -> pd.DataFrame:
    return pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path)


def _fit(img: np.ndarray, size: int | None, channels: int) -> np.ndarray:
    """HxWxC uint8 -> C x size x size uint8 (area resampling, grey <-> RGB as asked)."""
    from PIL import Image

    im = Image.fromarray(img if img.shape[2] > 1 else img[..., 0])
    im = im.convert("L" if channels == 1 else "RGB")
    if size and im.size != (size, size):
        im = im.resize((size, size), Image.BOX)
    a = np.asarray(im)
    return (a[None] if a.ndim == 2 else a.transpose(2, 0, 1)).copy()


def fetch_images(uris, size: int | None, channels: int = 3, endpoint: str | None = None) -> np.ndarray:
    """Decode ``uris`` into N x C x size x size uint8. ``path#i`` is row ``i`` of a pickled
    array file (CIFAR layout: ``data`` rows of C*S*S channel-major bytes); anything else is an
    image file, local or ``s3://``."""
    import io

    from PIL import Image

    from trustlab.platform import storage

    cache: dict[str, np.ndarray] = {}
    out = []
    for uri in uris:
        if "#" in uri:
            path, i = uri.rsplit("#", 1)
            if path not in cache:
                raw = storage.read_bytes(path, endpoint) if storage.is_s3(path) else open(path, "rb").read()
                cache[path] = np.asarray(pickle.loads(raw, encoding="latin1")["data"], dtype=np.uint8)
            row = cache[path][int(i)]
            side = int(round(math.sqrt(row.size / 3)))
            img = row.reshape(3, side, side).transpose(1, 2, 0)
        else:
            raw = storage.read_bytes(uri, endpoint) if storage.is_s3(uri) else open(uri, "rb").read()
            img = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
        out.append(_fit(img, size, channels))
    return np.stack(out)


def arrays_from_manifest(df: pd.DataFrame, images: np.ndarray) -> dict:
    """``{split: {x, y, vid, session}}`` from a manifest and its decoded images (row-aligned)."""
    out = {}
    for split in ("train", "val", "test"):
        m = (df["split"] == split).to_numpy()
        if m.any():
            out[split] = {"x": images[m], "y": df["label"].to_numpy(np.int64)[m],
                          "vid": df["image_id"].to_numpy(np.int64)[m],
                          "session": df["session"].to_numpy(np.int64)[m]}
    return out


def load_manifest(df_or_path, size: int | None, channels: int = 3, endpoint: str | None = None) -> dict:
    df = read_manifest(df_or_path) if isinstance(df_or_path, str) else df_or_path
    return arrays_from_manifest(df, fetch_images(df["uri"].tolist(), size, channels, endpoint))


def session_split(arrays: dict, session: int) -> dict:
    """Rows of a split whose class was introduced in ``session``."""
    m = arrays["session"] == session
    return {k: v[m] for k, v in arrays.items()}


def seen_split(arrays: dict, p: Protocol, session: int) -> dict:
    m = arrays["y"] < p.n_seen(session)
    return {k: v[m] for k, v in arrays.items()}


# ============================================================================ models, augmentation
class SmallConvNet(nn.Module):
    """conv3x3-BN-ReLU blocks of ``width * 2**i`` channels, 2x2 max-pool after a block while the
    side is above 4, global average pool: a feature vector of ``out_dim`` for small images."""

    def __init__(self, in_ch: int, size: int, width: int = 32, depth: int = 3):
        super().__init__()
        layers, c, side = [], in_ch, size
        for i in range(depth):
            w = width * 2**i
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if side > 4 and i < depth - 1:
                layers.append(nn.MaxPool2d(2))
                side //= 2
            c = w
        self.body = nn.Sequential(*layers)
        self.out_dim = c

    def forward(self, x):
        return self.body(x).mean(dim=(2, 3))


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero fill)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4)
    d = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    out = torch.empty_like(x)
    for dy in range(2 * max_shift + 1):
        for dx in range(2 * max_shift + 1):
            m = (d[:, 0] == dy) & (d[:, 1] == dx)
            if m.any():
                out[m] = pad[m, :, dy:dy + h, dx:dx + w]
    return out


def as_float(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x)) if not torch.is_tensor(x) else x
    return t.float().div(255.0) if t.dtype == torch.uint8 else t.float()


def imprint_rows(feats: torch.Tensor, y: torch.Tensor, classes, ref_weight: torch.Tensor) -> torch.Tensor:
    """Classifier rows for ``classes``: the normalised mean feature of each class, scaled to the
    mean norm of ``ref_weight``'s rows (weight imprinting)."""
    scale = ref_weight.norm(dim=1).mean()
    rows = [F.normalize(feats[y == c].mean(0), dim=0) * scale for c in classes]
    return torch.stack(rows)


@torch.no_grad()
def encode(module, x, batch: int = 512) -> torch.Tensor:
    module.eval()
    return torch.cat([module(as_float(x[i:i + batch])) for i in range(0, len(x), batch)]) if len(x) else torch.zeros(0)


# ============================================================================ metrics
@torch.no_grad()
def session_accuracies(logits_fn, test: dict, p: Protocol, batch: int = 512) -> list[float]:
    """Top-1 accuracy (percent) after each session 0..N over the test images of every class seen
    so far; ``logits_fn(x_float, s)`` scores at least the ``n_seen(s)`` seen classes."""
    accs = []
    for s in range(p.n_sessions + 1):
        sub = seen_split(test, p, s)
        correct = 0
        for i in range(0, len(sub["y"]), batch):
            lg = logits_fn(as_float(sub["x"][i:i + batch]), s)[:, : p.n_seen(s)]
            correct += int((lg.argmax(1).cpu().numpy() == sub["y"][i:i + batch]).sum())
        accs.append(100.0 * correct / max(1, len(sub["y"])))
    return accs


def performance_drop(accs) -> float:
    """PD = accuracy after the first (base) session minus accuracy after the last one."""
    return float(accs[0]) - float(accs[-1])


def summarize_sessions(accs) -> dict:
    accs = [float(a) for a in accs]
    return {"sessions": accs, "average": float(np.mean(accs)), "pd": performance_drop(accs),
            "last": accs[-1], "first": accs[0]}


@torch.no_grad()
def split_accuracy(logits_fn, arrays: dict, s: int, mask=None, batch: int = 512) -> tuple[int, int]:
    """(correct, count) of ``logits_fn(., s)`` on the rows of ``arrays`` (optionally masked)."""
    if mask is not None:
        arrays = {k: v[mask] for k, v in arrays.items()}
    correct = 0
    for i in range(0, len(arrays["y"]), batch):
        lg = logits_fn(as_float(arrays["x"][i:i + batch]), s)
        correct += int((lg.argmax(1).cpu().numpy() == np.asarray(arrays["y"][i:i + batch])).sum())
    return correct, int(len(arrays["y"]))


def session_table(results: dict) -> pd.DataFrame:
    """``results``: {name: summarize_sessions(...)} -> one row per name, one column per session."""
    rows = []
    for name, r in results.items():
        row = {"method": name}
        row.update({f"s{i}": round(a, 2) for i, a in enumerate(r["sessions"])})
        row.update(average=round(r["average"], 2), pd=round(r["pd"], 2), last=round(r["last"], 2))
        rows.append(row)
    return pd.DataFrame(rows)


def session_plot(results: dict, path: str, title: str = "FSCIL accuracy per session") -> str:
    from trustlab.platform.plots import line_plot

    n = max(len(r["sessions"]) for r in results.values())
    series = {f"{k} (avg {r['average']:.1f}, PD {r['pd']:.1f})": (list(range(len(r["sessions"]))), r["sessions"])
              for k, r in results.items()}
    return line_plot(series, path, "session", "top-1 accuracy over seen classes (%)", title, xticks=list(range(n)))


def runs_results(run_dirs) -> dict:
    """{label: summary} of the method and every baseline in each run folder's metrics.json
    (with several runs, a baseline is labelled by the method whose base model it started from)."""
    import json

    run_dirs = list(run_dirs)
    out = {}
    for d in run_dirs:
        with open(os.path.join(d, "metrics.json") if os.path.isdir(d) else d) as f:
            m = json.load(f)
        run = os.path.basename(os.path.normpath(d if os.path.isdir(d) else os.path.dirname(d)))
        name = m.get("method", run)
        name = name if name not in out else f"{name} ({run})"
        out[name] = {k: m[k] for k in ("sessions", "average", "pd", "last")}
        for b, r in (m.get("baselines") or {}).items():
            label = b if len(run_dirs) == 1 else f"{b} ({name} base)"
            out[label if label not in out else f"{label} ({run})"] = r
    return out


# ============================================================================ baselines
def prototype_baseline(encoder: nn.Module, data: dict, p: Protocol) -> list[float]:
    """Frozen encoder, classes scored by cosine similarity to their mean training feature (base
    classes: all base training images; new classes: their shots)."""
    tr = data["train"]
    f = F.normalize(encode(encoder, tr["x"]), dim=1)
    y = torch.as_tensor(tr["y"])
    protos = F.normalize(torch.stack([f[y == c].mean(0) for c in range(p.n_classes)]), dim=1)
    encoder.eval()
    return session_accuracies(lambda x, s: F.normalize(encoder(x), dim=1) @ protos[: p.n_seen(s)].T, data["test"], p)


def finetune_baseline(encoder: nn.Module, classifier: nn.Linear, data: dict, p: Protocol, steps: int,
                      lr: float, shift: int = 0, seed: int = 0) -> list[float]:
    """Fine-tune every weight of (a copy of) the base model on each session's shots alone.
    New classifier rows are imprinted (as the methods do); BatchNorm statistics stay frozen, so
    the baseline differs from the methods only in what it trains and on which data."""
    enc, old = copy.deepcopy(encoder), classifier
    fc = nn.Linear(old.in_features, p.n_base)
    with torch.no_grad():
        fc.weight.copy_(old.weight[: p.n_base])
        fc.bias.copy_(old.bias[: p.n_base])
    gen = torch.Generator().manual_seed(int(seed))

    def logits(x, s):
        enc.eval()
        return fc(enc(x))

    accs = [session_accuracies(logits, data["test"], p)[0]]
    for s in range(1, p.n_sessions + 1):
        sh = session_split(data["train"], s)
        x, y = as_float(sh["x"]), torch.as_tensor(sh["y"])
        with torch.no_grad():
            rows = imprint_rows(encode(enc, x), y, p.session_classes(s), fc.weight)
            new = nn.Linear(fc.in_features, p.n_seen(s))
            new.weight.copy_(torch.cat([fc.weight, rows]))
            new.bias.copy_(torch.cat([fc.bias, fc.bias.mean().expand(len(rows))]))
        fc = new
        opt = torch.optim.Adam(list(enc.parameters()) + list(fc.parameters()), lr=lr)
        enc.eval()  # BN statistics frozen; weights still trained
        for _ in range(steps):
            loss = F.cross_entropy(fc(enc(random_shift(x, shift, gen))), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sub = seen_split(data["test"], p, s)
        c, n = split_accuracy(logits, sub, s)
        accs.append(100.0 * c / max(1, n))
    return accs


# ============================================================================ Ray Train worker
def gather_objects(obj, world: int) -> list:
    if world <= 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast_module(module: nn.Module, rank: int, gather) -> None:
    """Make every rank's ``module`` equal to rank 0's."""
    state = gather({k: v.detach().cpu() for k, v in module.state_dict().items()} if rank == 0 else None)[0]
    if rank != 0:
        module.load_state_dict(state)


def incremental_worker(config: dict) -> None:
    """Per-worker function of an FSCIL method's ``incremental`` stage: loads the base model,
    runs ``begin_incremental`` once and ``learn_session`` for each session, and reports once per
    session (``epoch`` = session) with base-class and seen-class validation accuracy; rank 0
    writes the checkpoint, every rank reports the same number of times."""
    import ray
    import ray.train

    from trustlab.platform import checkpoints as ck
    from trustlab.platform.registry import get_method

    cfg, stage = config["cfg"], config["stage"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(math.ceil(float(cfg["trainer"]["cpus_per_worker"])))))
    method = get_method(cfg["method"]["name"])
    torch.manual_seed(int(cfg["seed"]))
    model = method.build_model(cfg, stage)
    if config.get("init_from"):
        model.load_state_dict(ck.load_state(config["init_from"], cfg["run"].get("s3_endpoint"))["model"], strict=False)
    start = 0
    restored = ray.train.get_checkpoint()
    if restored is not None:
        state = ck.load_ray_checkpoint(restored)
        model.load_state_dict(state["model"])
        start = int(state["epoch"])
        if rank == 0:
            print(f"[{method.name}:{stage}] resumed after session {start}", flush=True)
    data = ray.get(config["data_ref"])
    p = method.protocol(cfg)

    def gather(obj):
        return gather_objects(obj, world)

    import time

    if start == 0:
        t0 = time.time()
        info = method.begin_incremental(model, data, cfg, rank, world, gather) or {}
        if rank == 0:
            print(f"[{method.name}:{stage}] prepared in {time.time() - t0:.1f}s "
                  + " ".join(f"{k} {v:.4f}" for k, v in info.items()), flush=True)
    for s in range(start + 1, p.n_sessions + 1):
        t0 = time.time()
        info = method.learn_session(model, s, data, cfg, rank, world, gather) or {}
        metrics = {k: float(v) for k, v in info.items()}
        metrics.update(method.val_metrics(model, data.get("val"), cfg, s))
        metrics.update(epoch=s, session=s, stage=stage, train_seconds=time.time() - t0)
        ckpt = None
        if rank == 0:
            d = ck.temp_dir()
            ck.save_state(d, model=model.state_dict(), optimizer=None, epoch=s, stage=stage, metrics=metrics, cfg=cfg)
            ckpt = ray.train.Checkpoint.from_directory(d)
            print(f"[{method.name}:{stage}] session {s}/{p.n_sessions} in {time.time() - t0:.1f}s: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and k != "train_seconds"),
                  flush=True)
        ray.train.report(metrics, checkpoint=ckpt)


# ============================================================================ method base
class FSCILMethod(MethodBase):
    """Shared driving of FSCIL methods (see the module docstring for what a method supplies).

    Config read here: ``method.data`` (benchmark, protocol, sizes), ``method.base`` (epochs,
    lr, weight decay, shift), ``method.baselines`` (fine-tune steps / lr) and
    ``method.session.shift``. The base stage runs on the GPU when the cluster has one; the
    incremental stage and the driver-side evaluation use CPU tensors (few-shot sessions are
    small)."""

    modality = "fscil"

    # ---- data
    def _bench(self, cfg: dict):
        b = cfg["method"]["data"]["benchmark"]
        if b not in BENCHMARKS:
            raise ValueError(f"unknown method.data.benchmark {b!r}; valid: {', '.join(BENCHMARKS)}")
        return BENCHMARKS[b]

    def protocol(self, cfg: dict) -> Protocol:
        d = cfg["method"]["data"]
        return Protocol.from_dict(d["protocol"]) if d.get("protocol") else self._bench(cfg)[0]

    def input_shape(self, cfg: dict) -> tuple[int, int]:
        d = cfg["method"]["data"]
        _, ch, size = self._bench(cfg)
        return int(d.get("channels") or ch), int(d.get("size") or size)

    def build_manifest(self, cfg: dict) -> pd.DataFrame | None:
        d, p, seed = cfg["method"]["data"], self.protocol(cfg), int(cfg["seed"])
        if cfg["data"]["name"] != "auto":
            return read_manifest(cfg["data"]["manifest"])
        b = d["benchmark"]
        if b == "digits":
            return None
        if b == "synth":
            from trustlab.methods.fscil.synth_classes import build_tree

            root = build_tree(d["root"], seed, p, int(d["train_per_class"]), int(d["test_per_class"]))
            return cifar100_manifest(root, p=p, val_per_class=int(d["val_per_class"]), seed=seed, source="synth")
        adapters = {"cifar100": cifar100_manifest, "mini_imagenet": mini_imagenet_manifest, "cub200": cub200_manifest}
        return adapters[b](d["root"], d.get("index_dir"), p=p, val_per_class=int(d["val_per_class"]), seed=seed)

    def build_data(self, cfg: dict) -> dict:
        d = cfg["method"]["data"]
        ch, size = self.input_shape(cfg)
        if cfg["data"]["name"] == "auto" and d["benchmark"] == "digits":
            from trustlab.methods.fscil.digits import build_digits

            return build_digits(self.protocol(cfg), int(cfg["seed"]), int(d["test_per_class"]),
                                int(d["val_per_class"]), int(d.get("val_novel_per_class", 0)), d.get("class_order"))
        return load_manifest(self.build_manifest(cfg), size, ch, cfg["run"].get("s3_endpoint"))

    # ---- stages
    def stages(self, cfg: dict) -> list[str]:
        return ["base", "incremental"]

    def stage_epochs(self, cfg: dict, stage: str) -> int:
        return int(cfg["method"]["base"]["epochs"]) if stage == "base" else self.protocol(cfg).n_sessions

    def stage_selects(self, cfg: dict, stage: str) -> bool:
        return stage == "base"  # incremental: the latest checkpoint (after the last session)

    def stage_data(self, cfg: dict, stage: str, data: dict) -> dict:
        p = self.protocol(cfg)
        if stage == "base":
            out = {"train": session_split(data["train"], 0)}
            if "val" in data:
                out["val"] = session_split(data["val"], 0)
            return out
        return {k: v for k, v in data.items() if k in ("train", "val")}  # never the test split

    def worker_loop_for(self, stage: str):
        return incremental_worker if stage == "incremental" else None

    def configure_optimizer(self, model, cfg, stage):
        b = cfg["method"]["base"]
        return torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=float(b["lr"]),
                                 weight_decay=float(b["weight_decay"]))

    # ---- base stage
    def base_loss(self, model, batch, cfg):
        x = batch["x"]
        if model.training:
            x = random_shift(x, int(cfg["method"]["base"]["shift"]))
        logits = self.session_logits(model, x, 0)
        loss = F.cross_entropy(logits, batch["y"])
        return {"loss": loss, "acc": (logits.argmax(1) == batch["y"]).float().mean()}

    def loss_step(self, model, batch, stage, cfg):
        return self.base_loss(model, batch, cfg)

    def validate(self, model, stage, cfg, batches, rank, world, device, gather):
        model.eval()
        correct = count = 0
        with torch.no_grad():
            for b in batches:
                lg = self.session_logits(model, as_float(b["x"]).to(device), 0)
                correct += int((lg.argmax(1).cpu().numpy() == np.asarray(b["y"])).sum())
                count += len(b["y"])
        parts = gather_objects((correct, count), world)  # (the platform's gather takes (obj, world))
        acc = sum(c for c, _ in parts) / max(1, sum(n for _, n in parts))
        return {"val_acc": acc, "val_score": acc}

    def val_metrics(self, model, val: dict | None, cfg: dict, s: int) -> dict:
        """Validation accuracy after session ``s``: base classes and every seen class with val rows."""
        if val is None or not len(val["y"]):
            return {"val_score": float("nan")}
        p = self.protocol(cfg)

        def fn(x, ss):
            return self.session_logits(model, x, ss)[:, : p.n_seen(ss)]

        cb, nb = split_accuracy(fn, val, s, val["y"] < p.n_base)
        ca, na = split_accuracy(fn, val, s, val["y"] < p.n_seen(s))
        out = {"val_base_acc": cb / max(1, nb), "val_acc": ca / max(1, na)}
        out["val_score"] = out["val_acc"]
        return out

    def predict(self, model, batch, cfg):
        p = self.protocol(cfg)
        return self.session_logits(model, batch["x"], p.n_sessions)[:, : p.n_classes].argmax(1).float()

    # ---- evaluation
    def evaluate(self, cfg: dict, model, data: dict, run_dir: str) -> dict:
        p = self.protocol(cfg)
        model.eval()
        torch.manual_seed(int(cfg["seed"]))
        accs = session_accuracies(lambda x, s: self.session_logits(model, x, s), data["test"], p)
        bl = cfg["method"]["baselines"]
        ft = finetune_baseline(self.base_encoder(model), self.base_classifier(model), data, p, int(bl["steps"]),
                               float(bl["lr"]), int(cfg["method"]["session"]["shift"]), int(cfg["seed"]))
        proto = prototype_baseline(self.base_encoder(model), data, p)
        results = {self.name: summarize_sessions(accs), "finetune": summarize_sessions(ft),
                   "prototype": summarize_sessions(proto)}
        table = session_table(results)
        table.to_csv(os.path.join(run_dir, "sessions.csv"), index=False)
        with pd.option_context("display.width", 200, "display.max_columns", 40):
            print(f"[{self.name}] accuracy (%) over seen classes after each session "
                  f"({p.n_base} base + {p.n_sessions} x {p.ways}-way {p.shots}-shot):\n{table.to_string(index=False)}",
                  flush=True)
        session_plot(results, os.path.join(run_dir, "sessions.png"),
                     f"{self.name}: {cfg['method']['data']['benchmark']} {p.n_base}+{p.n_sessions}x{p.ways}w{p.shots}s")

        def fn(x, s):
            return self.session_logits(model, x, s)[:, : p.n_seen(s)]

        te, last = data["test"], p.n_sessions
        cb, nb = split_accuracy(fn, te, last, te["y"] < p.n_base)
        cn, nn_ = split_accuracy(fn, te, last, te["y"] >= p.n_base)
        out = dict(results[self.name])
        out.update(method=self.name, unit="percent", protocol=asdict(p),
                   baselines={"finetune": results["finetune"], "prototype": results["prototype"]},
                   test={"all_seen": {"acc": accs[-1] / 100.0, "n": int(len(te["y"]))},
                         "base": {"acc": cb / max(1, nb), "n": nb}, "novel": {"acc": cn / max(1, nn_), "n": nn_}})
        if "val" in data:
            c0, n0 = split_accuracy(fn, data["val"], 0, data["val"]["y"] < p.n_base)
            out["val"] = {"base": {"acc": c0 / max(1, n0), "n": n0}}
        return out

    # ---- to implement
    def session_logits(self, model, x, s: int):
        raise NotImplementedError

    def base_encoder(self, model) -> nn.Module:
        raise NotImplementedError

    def base_classifier(self, model) -> nn.Linear:
        raise NotImplementedError

    def begin_incremental(self, model, data, cfg, rank, world, gather) -> dict | None:
        return None

    def learn_session(self, model, s, data, cfg, rank, world, gather) -> dict | None:
        raise NotImplementedError


# ============================================================================ in-process pipeline
def fit_inprocess(method: FSCILMethod, cfg: dict, data: dict, log=None):
    """Base stage (same loss, optimiser, augmentation and val-selected epoch as the Ray stage,
    one process) then every incremental session; returns the final model. For tests and quick
    experiments without Ray."""
    from trustlab.platform.evaluate import iter_array_batches

    torch.manual_seed(int(cfg["seed"]))
    model = method.build_model(cfg, "base")
    parts = method.stage_data(cfg, "base", data)
    opt = method.configure_optimizer(model, cfg, "base")
    bs = int(cfg["trainer"]["batch_size"])
    best, best_state = -1.0, None
    for epoch in range(method.stage_epochs(cfg, "base")):
        model.train()
        perm = np.random.default_rng(int(cfg["seed"]) + 1000 * epoch).permutation(len(parts["train"]["y"]))
        for b in iter_array_batches(parts["train"], bs, perm):
            out = method.loss_step(model, method.to_batch(b), "base", cfg)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
        v = method.validate(model, "base", cfg, iter_array_batches(parts["val"], 256), 0, 1, "cpu", lambda o: [o])
        if v["val_score"] > best:
            best, best_state = v["val_score"], copy.deepcopy(model.state_dict())
        if log:
            log(f"base epoch {epoch + 1}: val_acc {v['val_acc']:.4f}")
    model.load_state_dict(best_state)
    model.eval()
    inc = method.stage_data(cfg, "incremental", data)
    method.begin_incremental(model, inc, cfg, 0, 1, lambda o: [o])
    for s in range(1, method.protocol(cfg).n_sessions + 1):
        info = method.learn_session(model, s, inc, cfg, 0, 1, lambda o: [o]) or {}
        if log:
            log(f"session {s}: " + " ".join(f"{k} {float(v):.4f}" for k, v in info.items()))
    return model


def _main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m trustlab.methods.fscil.engine")
    sub = ap.add_subparsers(dest="cmd", required=True)
    pl = sub.add_parser("plot", help="one accuracy-per-session plot of several FSCIL runs")
    pl.add_argument("runs", nargs="+", help="run folders (or metrics.json files)")
    pl.add_argument("-o", "--out", default="fscil_sessions.png")
    a = ap.parse_args(argv)
    res = runs_results(a.runs)
    session_plot(res, a.out)
    print(session_table(res).to_string(index=False))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())

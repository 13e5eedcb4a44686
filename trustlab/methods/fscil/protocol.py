"""FSCIL protocol and data: sessions, benchmark manifests and image loading.

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

``protocol_of``, ``input_shape`` and ``build_data`` turn a method's ``method.data`` config into
the protocol, the backbone's input shape and the ``{train, val, test}`` arrays (``x, y, vid,
session``) every FSCIL method trains on.
"""
from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass

import numpy as np
import pandas as pd

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
    integer row indices into ``train``. Read as CEC does: the base session is every training
    image of classes 0..n_base-1 (from the class order, not from ``session_1.txt``, which is
    ignored when present); ``session_2.txt`` .. ``session_<N+1>.txt`` are the incremental ones."""
    index_dir = index_dir or os.path.join(root, "index_list", "cifar100")
    tabs = {}
    for split in ("train", "test"):
        path = os.path.join(root, "cifar-100-python", split)
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")
        y = np.asarray(d["fine_labels"])
        tabs[split] = pd.DataFrame({"key": [str(i) for i in range(len(y))],
                                    "uri": [f"{path}#{i}" for i in range(len(y))], "orig_label": y})
    sessions = [[str(int(k)) for k in s] for s in read_index_lists(index_dir)]
    if len(sessions) == p.n_sessions + 1:  # session_1.txt (the base list) is not how CEC reads CIFAR-100
        sessions = sessions[1:]
    return manifest_from_index_lists(tabs["train"], tabs["test"], sessions, p, source, val_per_class, seed,
                                     base_from_labels=True)


def mini_imagenet_manifest(root: str, index_dir: str | None = None, p: Protocol = PROTOCOLS["mini_imagenet"],
                           val_per_class: int = 0, seed: int = 0) -> pd.DataFrame:
    """miniImageNet FSCIL layout: ``<root>/miniimagenet/images/<file>.jpg`` and the csvs
    ``{train,test}.csv`` (``filename,label`` with a wnid label; class ids follow the wnids' first
    appearance in ``train.csv``, as CEC numbers them) from ``<root>/miniimagenet/split/``, else
    from the index-list folder (CEC ships them there); index lists (default
    ``<root>/index_list/mini_imagenet``) hold paths whose basename is the image file."""
    index_dir = index_dir or os.path.join(root, "index_list", "mini_imagenet")
    img_dir = os.path.join(root, "miniimagenet", "images")
    split_dir = os.path.join(root, "miniimagenet", "split")
    if not os.path.isfile(os.path.join(split_dir, "train.csv")):
        split_dir = index_dir
    wnids: dict[str, int] = {}
    tabs = {}
    for split in ("train", "test"):
        path = os.path.join(split_dir, f"{split}.csv")
        if not os.path.isfile(path):
            raise ValueError(f"miniImageNet {split}.csv is neither in {os.path.join(root, 'miniimagenet', 'split')} "
                             f"nor in {index_dir}")
        t = pd.read_csv(path)
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


# ============================================================================ from a method's config
#: data groups that name a public FSCIL benchmark (``data=cifar100 data.root=...``)
DATA_GROUPS = ("cifar100", "mini_imagenet", "cub200")


def benchmark_name(cfg: dict) -> str:
    """The data group's benchmark when one is chosen (``data=cub200``), else ``method.data.benchmark``."""
    name = (cfg.get("data") or {}).get("name")
    return name if name in DATA_GROUPS else cfg["method"]["data"]["benchmark"]


def _benchmark(cfg: dict):
    b = benchmark_name(cfg)
    if b not in BENCHMARKS:
        raise ValueError(f"unknown method.data.benchmark {b!r}; valid: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[b]


def protocol_of(cfg: dict) -> Protocol:
    """``method.data.protocol``, or the benchmark's default protocol when that is null."""
    d = cfg["method"]["data"]
    return Protocol.from_dict(d["protocol"]) if d.get("protocol") else _benchmark(cfg)[0]


def input_shape(cfg: dict) -> tuple[int, int]:
    """(channels, side) fed to the backbone: ``method.data.channels/size`` or the benchmark's."""
    d = cfg["method"]["data"]
    _, ch, size = _benchmark(cfg)
    return int(d.get("channels") or ch), int(d.get("size") or size)


def build_manifest(cfg: dict) -> pd.DataFrame | None:
    """The run's manifest: ``data.manifest`` when a dataset is named, else the benchmark's
    (generated or read from a public layout); None for digits (arrays come straight from sklearn)."""
    d, p, seed = cfg["method"]["data"], protocol_of(cfg), int(cfg["seed"])
    adapters = {"cifar100": cifar100_manifest, "mini_imagenet": mini_imagenet_manifest, "cub200": cub200_manifest}
    name = cfg["data"]["name"]
    if name in DATA_GROUPS:  # a public benchmark as shipped, from the data group
        if not cfg["data"].get("root"):
            raise ValueError(f"data={name} needs data.root (the dataset folder)")
        return adapters[name](cfg["data"]["root"], cfg["data"].get("index_dir"), p=p,
                              val_per_class=int(d["val_per_class"]), seed=seed)
    if name != "auto":
        return read_manifest(cfg["data"]["manifest"])
    b = d["benchmark"]
    if b == "digits":
        return None
    if b == "synth":
        from trustlab.methods.fscil.synth_classes import build_tree

        root = build_tree(d["root"], seed, p, int(d["train_per_class"]), int(d["test_per_class"]))
        return cifar100_manifest(root, p=p, val_per_class=int(d["val_per_class"]), seed=seed, source="synth")
    return adapters[b](d["root"], d.get("index_dir"), p=p, val_per_class=int(d["val_per_class"]), seed=seed)


def build_data(cfg: dict) -> dict:
    """``{train, val, test}`` arrays of the configured benchmark (the Method ``build_data``)."""
    d = cfg["method"]["data"]
    ch, size = input_shape(cfg)
    if cfg["data"]["name"] == "auto" and d["benchmark"] == "digits":
        from trustlab.methods.fscil.digits import build_digits

        return build_digits(protocol_of(cfg), int(cfg["seed"]), int(d["test_per_class"]),
                            int(d["val_per_class"]), int(d.get("val_novel_per_class", 0)), d.get("class_order"),
                            d.get("occluded"))
    return load_manifest(build_manifest(cfg), size, ch, cfg["run"].get("s3_endpoint"))

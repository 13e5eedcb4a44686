"""Image sets as their authors ship them -> manifests -> a Ray Data stream of decoded images.

Manifest columns (``COLUMNS``): ``uri`` (local or ``s3://``), ``label`` (1 = generated/fake,
0 = real), ``split`` (train | val | test; anything else is read by no split), ``image_id`` (stable
string id: the path under the dataset root), ``source`` (dataset + subset), ``generator`` (the
generator or test set a fake — and its real counterpart — belongs to), ``manipulation`` (the
fake kind, ``none`` for real); optional ``caption``.

Adapters (``ADAPTERS``; listing through pyarrow's filesystem, so the same code reads ``s3://``):

- ``genimage``: GenImage, ``<root>/<generator>/{train,val}/{ai,nature}/*``. GenImage has train and
  val only; its val is the test split here and validation is carved from train (a seeded
  ``val_fraction`` of each generator's train images, by file). Protocols: ``one_to_all`` (train
  on ``train_generators``, default SD v1.4, test on each generator's val: the paper's cross-generator
  table), ``leave_one_out`` (train on every generator but ``held_out``, test on it), ``all``.
  ``exclude``: lists of known-bad files shipped with GenImage (``corrupted_files/*.txt``, lines
  ``./<generator>/<split>/<ai|nature>/<file>``) are left out and counted.
- ``cnnspot`` / ``aigcdetect``: CNNSpot (CNNDetection) and AIGCDetectBenchmark,
  ``<set>/[<class>/]{0_real,1_fake}/*``. A root holding ``train``/``val``/``test`` folders is the
  CNNDetection training layout (``train/<class>/...`` = train, ``val/<class>/...`` = val,
  ``test/<set>/...`` = test, one generator per set); any other root is a folder of test sets
  (or one set: a root that itself holds ``0_real``/``1_fake``).
- ``image_manifest``: a prebuilt manifest (CSV or Parquet) with at least ``uri, label, split``.

Captions (``captions``): a CSV (``caption`` plus one of ``uri``, ``image_id``, ``path``, ``file``)
or a JSON object ``{key: caption}`` joined on the uri, the path under the root, or the file name.

Streaming (``image_datasets``): each split is the manifest rows as a Ray Dataset
(``from_pandas`` in blocks) -> ``map_batches(ImageDecoder, compute=ActorPoolStrategy)``, which
reads each file (local or S3, the filesystem made inside the actor), decodes it with PIL, and
crops or resizes it to ``size`` in the pipeline; nothing holds the whole set in memory. A missing,
corrupt or unreadable file is skipped, counted and named in a ``BadFileReport``
(``bad_file_summary()`` after the run: metrics.json ``data_errors`` and the summary).
Rows: ``x`` uint8 (3, size, size), ``y``, ``vid`` (manifest row index), and the string columns.
"""
from __future__ import annotations

import io
import json
import os
import posixpath

import numpy as np
import pandas as pd

from trustlab.platform import storage

COLUMNS = ["uri", "label", "split", "image_id", "source", "generator", "manipulation"]
STRING_COLUMNS = ("image_id", "source", "generator", "manipulation", "caption", "split")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
GENIMAGE_GENERATORS = ("imagenet_ai_0508_adm", "imagenet_ai_0419_biggan", "imagenet_glide", "imagenet_midjourney",
                       "imagenet_ai_0419_sdv4", "imagenet_ai_0424_sdv5", "imagenet_ai_0419_vqdm",
                       "imagenet_ai_0424_wukong")

DEFAULTS = {
    "name": "image_manifest",    # genimage | cnnspot | aigcdetect | image_manifest
    "manifest": None,            # a prebuilt manifest (local or s3://) instead of listing root
    "root": None,                # dataset root (local folder or s3://bucket/prefix)
    "s3_endpoint": None,         # S3 endpoint URL; null = AWS / $AWS_ENDPOINT_URL
    "size": None,                # side fed to the model; null = the method's method.data.size
    "transform": "crop",         # crop (no resampling unless smaller) | resize (whole image to size x size)
    "captions": None,            # captions file joined to the manifest (ITEM)
    "num_decoders": 2,           # decoding actors (a fixed pool)
    "decode_cpus": 0.5,          # CPUs per decoding actor
    "files_per_batch": 32,       # images per map_batches call
    "rows_per_block": 256,       # manifest rows per Ray Data block
    "adapter": {},               # adapter keyword arguments
}


class ImageSetError(ValueError):
    pass


def image_data_config(data_cfg: dict | None) -> dict:
    out = dict(DEFAULTS)
    out.update({k: v for k, v in (data_cfg or {}).items()})
    return out


# ----------------------------------------------------------------------------- listing
def _join(root: str, *parts: str) -> str:
    parts = [p for p in parts if p]
    return posixpath.join(root.rstrip("/"), *parts) if storage.is_s3(root) else os.path.join(root, *parts)


def _fs(uri: str, endpoint: str | None):
    import pyarrow.fs as pafs

    fs, path = storage.resolve(uri, endpoint)
    return fs or pafs.LocalFileSystem(), path


def list_dirs(root: str, sub: str = "", endpoint: str | None = None) -> list[str]:
    import pyarrow.fs as pafs

    fs, base = _fs(_join(root, sub), endpoint)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    return sorted(f.base_name for f in fs.get_file_info(pafs.FileSelector(base)) if f.type == pafs.FileType.Directory)


def list_images(root: str, sub: str, endpoint: str | None = None, recursive: bool = False) -> list[str]:
    """Image files under ``root/sub`` (sorted full URIs); [] when the folder is absent."""
    import pyarrow.fs as pafs

    fs, base = _fs(_join(root, sub), endpoint)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    out = []
    for f in fs.get_file_info(pafs.FileSelector(base, recursive=recursive)):
        if f.type == pafs.FileType.File and f.base_name.lower().endswith(IMAGE_EXTS):
            rel = f.path[len(base):].lstrip("/")
            out.append(_join(root, sub, rel))
    return sorted(out)


def _rel(uri: str, root: str) -> str:
    r = root.rstrip("/")
    if storage.is_s3(uri):
        return uri[len(r):].lstrip("/")
    return os.path.relpath(uri, os.path.abspath(r)).replace(os.sep, "/")


def _frac(key: str, seed: int) -> float:
    import hashlib

    return int(hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()[:12], 16) / float(16**12)


def validate(df: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in ("uri", "label", "split") if c not in df.columns]
    if missing:
        raise ImageSetError(f"image manifest lacks columns {missing}; required: uri, label, split")
    df = df.copy()
    df["label"] = df["label"].astype("int64")
    if not set(df["label"].unique()) <= {0, 1}:
        raise ImageSetError("label must be 0 (real) or 1 (generated/fake)")
    if "image_id" not in df.columns:
        df["image_id"] = df["uri"]
    for c, default in (("source", ""), ("generator", ""), ("manipulation", "")):
        if c not in df.columns:
            df[c] = default
    df.loc[(df["label"] == 0) & (df["manipulation"].astype(str) == ""), "manipulation"] = "none"
    for c in ("uri", "split", "image_id", "source", "generator", "manipulation"):
        df[c] = df[c].fillna("").astype(str)
    if "caption" in df.columns:
        df["caption"] = df["caption"].fillna("").astype(str)
    return df


# ----------------------------------------------------------------------------- GenImage
def read_exclude_lists(paths, endpoint: str | None = None) -> set[str]:
    """Relative paths (``<generator>/<split>/<ai|nature>/<file>``) named in GenImage's lists of
    corrupted files (files, or folders of ``*.txt`` files)."""
    import glob as _glob

    out: set[str] = set()
    for p in [paths] if isinstance(paths, str) else list(paths or []):
        files = sorted(_glob.glob(os.path.join(p, "*.txt"))) if os.path.isdir(str(p)) else [p]
        for f in files:
            for line in storage.read_bytes(f, endpoint).decode().splitlines():
                line = line.strip()
                if line:
                    out.add(line[2:] if line.startswith("./") else line.lstrip("/"))
    return out


def genimage_manifest(root: str, protocol: str = "one_to_all", train_generators=("imagenet_ai_0419_sdv4",),
                      test_generators=None, held_out: str | None = None, generators=None,
                      val_fraction: float = 0.1, seed: int = 0, exclude=None, endpoint: str | None = None) -> pd.DataFrame:
    """GenImage manifest (module docstring). ``generators``: the generator folders to read
    (default: every folder under ``root``); ``test_generators`` (one_to_all): default all."""
    present = [g for g in list_dirs(root, "", endpoint) if {"train", "val"} & set(list_dirs(root, g, endpoint))]
    gens = [g for g in (generators or present)]
    absent = [g for g in gens if g not in present]
    if absent or not gens:
        raise ImageSetError(f"GenImage generators without a folder under {root}: {absent or 'none found'}; "
                            f"found {present}")
    if protocol == "one_to_all":
        train_g = [g for g in (train_generators or gens)]
        test_g = list(test_generators or gens)
    elif protocol == "leave_one_out":
        if held_out not in gens:
            raise ImageSetError(f"leave_one_out needs held_out, one of {gens}; got {held_out!r}")
        train_g, test_g = [g for g in gens if g != held_out], [held_out]
    elif protocol == "all":
        train_g, test_g = list(gens), list(test_generators or gens)
    else:
        raise ImageSetError(f"GenImage protocol must be one_to_all, leave_one_out or all; got {protocol!r}")
    bad = [g for g in train_g + test_g if g not in gens]
    if bad:
        raise ImageSetError(f"protocol names generators that are not read: {bad}; read: {gens}")
    skip = read_exclude_lists(exclude, endpoint) if exclude else set()
    rows, excluded = [], 0
    for g in sorted(set(train_g) | set(test_g)):
        for part, as_split in (("train", "train"), ("val", "test")):
            if (as_split == "train" and g not in train_g) or (as_split == "test" and g not in test_g):
                continue
            parts = list_dirs(root, f"{g}/{part}", endpoint)
            if as_split == "test" and not parts:
                raise ImageSetError(f"GenImage {g} has no {part}/ folder (its test split) under {root}")
            for kind, label in (("ai", 1), ("nature", 0)):
                for uri in list_images(root, f"{g}/{part}/{kind}", endpoint, recursive=True):
                    rel = _rel(uri, root)
                    if rel in skip:
                        excluded += 1
                        continue
                    split = as_split
                    if split == "train" and _frac(rel, seed) < val_fraction:
                        split = "val"
                    rows.append(dict(uri=uri, label=label, split=split, image_id=rel, source=f"genimage/{g}",
                                     generator=g, manipulation=g if label else "none"))
    if not rows:
        raise ImageSetError(f"no GenImage images under {root}")
    df = validate(pd.DataFrame(rows, columns=COLUMNS))
    df.attrs["excluded"] = excluded
    return df


# ----------------------------------------------------------------------------- CNNSpot / AIGCDetectBenchmark
REAL_FAKE = {"0_real": 0, "1_fake": 1}


def _set_rows(root: str, sub: str, split: str, generator: str, source: str, endpoint) -> list[dict]:
    """Rows of one ``[<class>/]0_real|1_fake`` tree at ``root/sub``."""
    rows = []
    dirs = list_dirs(root, sub, endpoint)
    if set(REAL_FAKE) & set(dirs):
        groups = [("", sub)]
    else:
        groups = [(c, f"{sub}/{c}" if sub else c) for c in dirs if set(REAL_FAKE) & set(list_dirs(root, f"{sub}/{c}" if sub else c, endpoint))]
    for cls, path in groups:
        for folder, label in REAL_FAKE.items():
            for uri in list_images(root, f"{path}/{folder}".lstrip("/"), endpoint):
                rows.append(dict(uri=uri, label=label, split=split, image_id=_rel(uri, root), source=f"{source}/{generator}",
                                 generator=generator, manipulation=generator if label else "none"))
    return rows


def cnnspot_manifest(root: str, source: str = "cnnspot", train_generator: str = "progan", sets=None,
                     endpoint: str | None = None) -> pd.DataFrame:
    """CNNSpot / AIGCDetectBenchmark manifest (module docstring). ``sets``: test sets to read
    (default: every one)."""
    top = list_dirs(root, "", endpoint)
    rows: list[dict] = []
    if set(REAL_FAKE) & set(top):  # the root is one set
        name = posixpath.basename(root.rstrip("/")) if storage.is_s3(root) else os.path.basename(os.path.abspath(root))
        rows = _set_rows(root, "", "test", name, source, endpoint)
    elif "train" in top or "test" in top:
        for split in ("train", "val"):
            if split in top:
                rows += _set_rows(root, split, split, train_generator, source, endpoint)
        if "test" in top:
            for s in list_dirs(root, "test", endpoint):
                if sets is None or s in sets:
                    rows += _set_rows(root, f"test/{s}", "test", s, source, endpoint)
    else:
        for s in top:
            if sets is None or s in sets:
                rows += _set_rows(root, s, "test", s, source, endpoint)
    if not rows:
        raise ImageSetError(f"no <set>/[<class>/]0_real|1_fake images under {root}")
    return validate(pd.DataFrame(rows, columns=COLUMNS))


def aigcdetect_manifest(root: str, **kw) -> pd.DataFrame:
    return cnnspot_manifest(root, source="aigcdetect", **kw)


def read_manifest(uri: str, endpoint: str | None = None) -> pd.DataFrame:
    """A prebuilt image manifest (CSV or Parquet; relative uris resolve against its folder)."""
    data = storage.read_bytes(uri, endpoint)
    df = pd.read_parquet(io.BytesIO(data)) if str(uri).endswith(".parquet") else pd.read_csv(io.BytesIO(data), keep_default_na=False)
    df = validate(df)
    if not storage.is_s3(uri):
        base = os.path.dirname(os.path.abspath(uri))
        df["uri"] = [u if (storage.is_s3(u) or os.path.isabs(u)) else os.path.join(base, u) for u in df["uri"]]
    return df


ADAPTERS = {"genimage": genimage_manifest, "cnnspot": cnnspot_manifest, "aigcdetect": aigcdetect_manifest}


def attach_captions(df: pd.DataFrame, captions: str, root: str | None = None, endpoint: str | None = None) -> pd.DataFrame:
    """Join a captions file (module docstring) onto ``df['caption']``; rows it does not name keep
    their caption (or get an empty one)."""
    data = storage.read_bytes(captions, endpoint)
    if str(captions).endswith(".json"):
        table = {str(k): str(v) for k, v in json.loads(data).items()}
    else:
        c = pd.read_csv(io.BytesIO(data), keep_default_na=False)
        key = next((k for k in ("uri", "image_id", "path", "file") if k in c.columns), None)
        if key is None or "caption" not in c.columns:
            raise ImageSetError(f"{captions}: a captions CSV needs a caption column and one of uri, image_id, path, file")
        table = dict(zip(c[key].astype(str), c["caption"].astype(str)))
    out = df.copy()
    if "caption" not in out.columns:
        out["caption"] = ""
    found = []
    for u, i, c in zip(out["uri"], out["image_id"], out["caption"]):
        cap = table.get(u) or table.get(i) or (table.get(_rel(u, root)) if root else None) or table.get(posixpath.basename(u))
        found.append(cap if cap is not None else c)
    out["caption"] = found
    return out


def resolve_manifest(data_cfg: dict, seed: int = 0, endpoint: str | None = None) -> pd.DataFrame:
    """The manifest a data config names (adapter on ``root``, or ``manifest``), captions attached."""
    cfg = image_data_config(data_cfg)
    endpoint = endpoint or cfg.get("s3_endpoint")
    if cfg.get("manifest"):
        df = read_manifest(cfg["manifest"], endpoint)
    elif cfg["name"] in ADAPTERS:
        if not cfg.get("root"):
            raise ImageSetError(f"data.root must name the {cfg['name']} dataset folder (local or s3://)")
        kw = dict(cfg.get("adapter") or {})
        if cfg["name"] == "genimage":
            kw.setdefault("seed", int(seed))
        df = ADAPTERS[cfg["name"]](cfg["root"], endpoint=endpoint, **kw)
    else:
        raise ImageSetError(f"data={cfg['name']}: set data.manifest, or use one of {', '.join(ADAPTERS)} with data.root")
    if cfg.get("captions"):
        df = attach_captions(df, cfg["captions"], cfg.get("root"), endpoint)
    return df


# ----------------------------------------------------------------------------- decoding
def fit_image(im, size: int, transform: str = "crop", rng: np.random.Generator | None = None) -> np.ndarray:
    """A PIL RGB image -> (3, size, size) uint8. ``crop``: a size x size crop (random with ``rng``,
    else central), the image first resized up only when a side is smaller than ``size`` (no
    resampling otherwise: it would blur the high-frequency clues); ``resize``: the whole image."""
    from PIL import Image

    if transform == "resize":
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im).transpose(2, 0, 1)
    if transform != "crop":
        raise ImageSetError(f"data.transform must be crop or resize; got {transform!r}")
    w, h = im.size
    if min(w, h) < size:
        f = size / float(min(w, h))
        im = im.resize((max(size, round(w * f)), max(size, round(h * f))), Image.BILINEAR)
        w, h = im.size
    if rng is not None:
        x0, y0 = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
    else:
        x0, y0 = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((x0, y0, x0 + size, y0 + size))).transpose(2, 0, 1)


def decode_image(data: bytes, size: int, transform: str = "crop", rng=None) -> np.ndarray:
    from PIL import Image

    if not data:
        raise ValueError("zero-byte file")
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return fit_image(im.convert("RGB"), size, transform, rng)


def _reason(e: BaseException) -> str:
    """A short reason for an unreadable file."""
    if type(e).__name__ == "UnidentifiedImageError":
        return "not a decodable image (unknown format or corrupt header)"
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:200]}" if msg else type(e).__name__


class ImageDecoder:
    """Ray Data UDF: manifest rows -> decoded image rows (module docstring); bad files go to ``sink``."""

    def __init__(self, size: int, transform: str, train: bool, endpoint: str | None = None, sink=None,
                 columns=()):
        self.size, self.transform, self.train, self.endpoint, self.sink = int(size), transform, bool(train), endpoint, sink
        self.columns = tuple(columns)
        self.rng = np.random.default_rng() if self.train else None
        self._s3 = None

    def _read(self, uri: str) -> bytes:
        if storage.is_s3(uri):
            if self._s3 is None:
                self._s3 = storage.s3_filesystem(self.endpoint)
            with self._s3.open_input_stream(uri[5:]) as f:
                return f.read()
        with open(uri, "rb") as f:
            return f.read()

    def _bad(self, split: str, uri: str, reason: str) -> None:
        if self.sink is None:
            return
        fn = self.sink.add_bad
        if hasattr(fn, "remote"):
            import ray

            ray.get(fn.remote(split, uri, reason))
        else:
            fn(split, uri, reason)

    def __call__(self, batch: dict) -> dict:
        xs, keep = [], []
        for i, (uri, split) in enumerate(zip(batch["uri"], batch["split"])):
            try:
                xs.append(decode_image(self._read(str(uri)), self.size, self.transform, self.rng))
                keep.append(i)
            except Exception as e:  # noqa: BLE001 - any unreadable file is counted and named, never fatal
                self._bad(str(split), str(uri), "missing file" if isinstance(e, FileNotFoundError) else _reason(e))
        idx = np.asarray(keep, np.int64)
        out = {"x": np.stack(xs) if xs else np.zeros((0, 3, self.size, self.size), np.uint8),
               "y": np.asarray(batch["label"], np.int64)[idx], "vid": np.asarray(batch["vid"], np.int64)[idx]}
        for c in self.columns:
            out[c] = np.asarray(batch[c], dtype=object)[idx]
        return out


# ----------------------------------------------------------------------------- Ray Data
#: bad-file reports of the current run's image streams (driver side); ``reset_reports`` starts a run
_REPORTS: list = []


def reset_reports() -> None:
    for r in _REPORTS:
        try:
            r.close()
        except Exception:  # noqa: BLE001
            pass
    _REPORTS.clear()


def bad_file_summary() -> dict | None:
    """``{"bad_files": [{split, uri, reason, count}], "counts": {split: n}}`` of every image stream
    of the run (None when the run streamed no image set)."""
    if not _REPORTS:
        return None
    bad = [b for r in _REPORTS for b in r.bad_files()]
    counts: dict = {}
    for b in bad:
        counts[b["split"]] = counts.get(b["split"], 0) + 1
    return {"bad_files": bad, "counts": counts}


def bad_file_lines(summary: dict | None, limit: int = 20) -> list[str]:
    if not summary or "bad_files" not in summary:  # a video run's data_errors are per set: its own report prints them
        return []
    bad = summary["bad_files"]
    lines = [f"image data: {len(bad)} unreadable file(s) skipped"
             + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(summary["counts"].items())) + ")" if bad else "")]
    lines += [f"  {b['split']}: {b['uri']} — {b['reason']}" for b in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... {len(bad) - limit} more in metrics.json data_errors")
    return lines


def split_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The manifest with ``vid`` = row index."""
    return df.assign(vid=np.arange(len(df), dtype=np.int64))


def image_datasets(data_cfg: dict, size: int, splits=("train", "val", "test"), seed: int = 0,
                   endpoint: str | None = None, manifest: pd.DataFrame | None = None):
    """``({split: ray.data.Dataset}, manifest)`` for an image data config (nothing decoded yet:
    each pass streams manifest rows -> file reads -> decoded, cropped images)."""
    import ray

    from trustlab.platform.data.video import BadFileReport
    from trustlab.platform.runtime import init_ray

    if not ray.is_initialized():
        init_ray()
    cfg = image_data_config(data_cfg)
    endpoint = endpoint or cfg.get("s3_endpoint")
    df = split_rows(resolve_manifest(cfg, seed, endpoint) if manifest is None else manifest)
    size = int(cfg.get("size") or size)
    report = BadFileReport(use_ray=True)
    _REPORTS.append(report)
    cols = [c for c in STRING_COLUMNS if c in df.columns]
    out = {}
    for split in splits:
        d = df[df["split"] == split]
        if len(d) == 0:
            raise ImageSetError(f"split {split!r} of the image set is empty (splits present: "
                                f"{sorted(df['split'].unique())})")
        if split == "train":  # a seeded file order; blocks are re-ordered every epoch below
            d = d.iloc[np.random.default_rng(seed).permutation(len(d))]
        n = max(1, int(cfg["rows_per_block"]))
        blocks = [d.iloc[i:i + n][["uri", "label", "vid", *cols]].reset_index(drop=True) for i in range(0, len(d), n)]
        ds = ray.data.from_pandas(blocks)
        if split == "train":
            ds = ds.randomize_block_order()
        out[split] = ds.map_batches(
            ImageDecoder,
            fn_constructor_kwargs=dict(size=size, transform=cfg["transform"], train=split == "train", endpoint=endpoint,
                                       sink=report.sink(), columns=cols),
            batch_size=max(1, int(cfg["files_per_batch"])), batch_format="numpy",
            # a fixed pool: the decoders' memory does not depend on how long the split is (a pool
            # scaling up mid-pass added an actor's ~180 MiB to large sets only)
            compute=ray.data.ActorPoolStrategy(size=max(1, int(cfg["num_decoders"]))),
            num_cpus=float(cfg["decode_cpus"]))
    return out, df


def take_arrays(ds, n: int, keys=None) -> dict:
    """The first ``n`` rows of a streamed split as numpy arrays (reports and plots; not the set)."""
    b = ds.take_batch(batch_size=max(1, int(n)), batch_format="numpy")
    return {k: (np.asarray(v) if np.asarray(v).dtype != object else np.asarray(v).astype(str))
            for k, v in b.items() if keys is None or k in keys}


def iter_split(split, batch_size: int):
    """Numpy batches of a split held as arrays or streamed as a Ray Dataset."""
    if isinstance(split, dict):
        from trustlab.platform.evaluate import iter_array_batches

        yield from iter_array_batches(split, batch_size)
    else:
        yield from split.iter_batches(batch_size=batch_size, batch_format="numpy")

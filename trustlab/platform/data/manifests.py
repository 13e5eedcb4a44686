"""Video manifests: one row per video, as CSV or Parquet, local or ``s3://``.

Required columns (``COLUMNS``):

- ``uri``          local path or ``s3://bucket/key`` of the video file
- ``label``        1 = fake (manipulated), 0 = real
- ``split``        ``train`` | ``val`` | ``test`` (anything else, e.g. ``unassigned``, is kept in
                   the manifest but read by no split)
- ``video_id``     stable string id, unique within the manifest
- ``source``       where the video comes from (dataset + subset, e.g. ``ffpp/youtube``)
- ``manipulation`` manipulation type for fakes (``Deepfakes``, ``blend``...), ``none`` for real
- ``compression``  ``raw`` / ``c23`` / ``c40`` for FaceForensics++, ``native`` where the
                   dataset has one version

Adapters build a manifest from the public layouts, local or on S3 (listing through pyarrow's
filesystem, so the same code reads ``s3://bucket/ffpp``):

- ``ffpp_manifest``    FaceForensics++: ``original_sequences/<youtube|actors>/<c>/videos/*.mp4``,
  ``manipulated_sequences/<Type>/<c>/videos/*.mp4`` and the official split files
  ``splits/{train,val,test}.json`` (lists of ``[target, source]`` id pairs; a real video ``a`` and
  the fakes ``a_b`` / ``b_a`` go to the pair's split). Videos no split file names (e.g. the
  actors / DeepFakeDetection part) get split ``unassigned``.
- ``celebdf_manifest`` Celeb-DF v2: ``Celeb-real/``, ``YouTube-real/``, ``Celeb-synthesis/`` and
  ``List_of_testing_videos.txt`` (lines ``<1 real|0 fake> <folder>/<file>.mp4``): the listed
  videos are the test split; of the rest a deterministic ``val_fraction`` by identity is val.
- ``dfdc_manifest``    DFDC: folders holding ``metadata.json`` (``{file: {label: REAL|FAKE,
  split, original}}``), e.g. ``dfdc_train_part_<k>/``. Folders named in ``test_parts`` /
  ``val_parts`` make those splits; otherwise a deterministic ``val_fraction``/``test_fraction``
  of *original* videos (a fake follows its original, so no identity leaks across splits).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath

import pandas as pd

COLUMNS = ["uri", "label", "split", "video_id", "source", "manipulation", "compression"]
SPLITS = ("train", "val", "test")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm")


class ManifestError(ValueError):
    pass


def validate(df: pd.DataFrame) -> pd.DataFrame:
    """Check the required columns and types; returns the frame with normalised dtypes."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"manifest lacks columns {missing}; required: {COLUMNS}")
    df = df.copy()
    df["label"] = df["label"].astype("int64")
    for c in ("uri", "split", "video_id", "source", "manipulation", "compression"):
        df[c] = df[c].fillna("").astype(str)
    if not set(df["label"].unique()) <= {0, 1}:
        raise ManifestError("label must be 0 (real) or 1 (fake)")
    dup = df["video_id"].duplicated()
    if dup.any():
        raise ManifestError(f"duplicate video_id values, e.g. {df.loc[dup, 'video_id'].iloc[0]!r}")
    return df


def _fs(uri: str, endpoint: str | None):
    from trustlab.platform import storage

    fs, path = storage.resolve(uri, endpoint)
    if fs is None:
        import pyarrow.fs as pafs

        fs = pafs.LocalFileSystem()
    return fs, path


def read_manifest(uri: str, endpoint: str | None = None) -> pd.DataFrame:
    """Read a CSV or Parquet manifest (local or ``s3://``) and validate it. Relative local
    ``uri`` entries are resolved against the manifest's folder."""
    from trustlab.platform import storage

    data = storage.read_bytes(uri, endpoint)
    df = pd.read_parquet(io.BytesIO(data)) if str(uri).endswith(".parquet") else pd.read_csv(io.BytesIO(data))
    df = validate(df)
    if not storage.is_s3(uri):
        base = os.path.dirname(os.path.abspath(uri))
        df["uri"] = [u if (storage.is_s3(u) or os.path.isabs(u)) else os.path.join(base, u) for u in df["uri"]]
    return df


def write_manifest(df: pd.DataFrame, uri: str, endpoint: str | None = None) -> str:
    """Write a manifest as CSV or Parquet by extension (local or ``s3://``); returns ``uri``."""
    from trustlab.platform import storage

    df = validate(df)
    if str(uri).endswith(".parquet"):
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        data = buf.getvalue()
    else:
        data = df.to_csv(index=False).encode()
    storage.write_bytes(uri, data, endpoint)
    return uri


def _join(root: str, *parts: str) -> str:
    return posixpath.join(root.rstrip("/"), *parts) if root.startswith("s3://") else os.path.join(root, *parts)


def _list_videos(root: str, sub: str, endpoint: str | None) -> list[str]:
    """Video files directly in ``root/sub`` (sorted full URIs); [] when the folder is absent."""
    import pyarrow.fs as pafs

    fs, base = _fs(_join(root, sub), endpoint)
    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        return []
    out = []
    for fi in fs.get_file_info(pafs.FileSelector(base, recursive=False)):
        if fi.type == pafs.FileType.File and fi.base_name.lower().endswith(VIDEO_EXTS):
            out.append(_join(root, sub, fi.base_name))
    return sorted(out)


def _list_dirs(root: str, sub: str, endpoint: str | None) -> list[str]:
    import pyarrow.fs as pafs

    fs, base = _fs(_join(root, sub) if sub else root, endpoint)
    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        return []
    return sorted(fi.base_name for fi in fs.get_file_info(pafs.FileSelector(base, recursive=False))
                  if fi.type == pafs.FileType.Directory)


def _read_text(uri: str, endpoint: str | None) -> str | None:
    import pyarrow.fs as pafs

    fs, path = _fs(uri, endpoint)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def _stem(uri: str) -> str:
    return os.path.splitext(posixpath.basename(uri))[0]


def _frac_hash(key: str, seed: int = 0) -> float:
    """A deterministic number in [0, 1) for ``key`` (split assignment that needs no RNG state)."""
    return int(hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()[:12], 16) / float(16**12)


# ----------------------------------------------------------------------------- FaceForensics++
FFPP_MANIPULATIONS = ("Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures", "FaceShifter", "DeepFakeDetection")


def ffpp_manifest(root: str, compressions=("c23",), manipulations=None, endpoint: str | None = None) -> pd.DataFrame:
    """FaceForensics++ manifest from its folder layout (see module docstring). ``manipulations``:
    the fake types to include (default: every folder under ``manipulated_sequences``)."""
    split_of: dict[str, str] = {}
    for split in SPLITS:
        text = _read_text(_join(root, "splits", f"{split}.json"), endpoint)
        if text is None:
            continue
        for pair in json.loads(text):
            a, b = (str(x) for x in pair)
            split_of[a] = split_of[b] = split
            split_of[f"{a}_{b}"] = split_of[f"{b}_{a}"] = split
    if not split_of:
        raise ManifestError(f"no FaceForensics++ split files under {_join(root, 'splits')}")
    rows = []
    for c in compressions:
        for src in _list_dirs(root, "original_sequences", endpoint):
            for uri in _list_videos(root, posixpath.join("original_sequences", src, c, "videos"), endpoint):
                vid = _stem(uri)
                rows.append(dict(uri=uri, label=0, split=split_of.get(vid, "unassigned"),
                                 video_id=f"original/{src}/{c}/{vid}", source=f"ffpp/{src}",
                                 manipulation="none", compression=c))
        types = _list_dirs(root, "manipulated_sequences", endpoint)
        if manipulations is not None:
            types = [t for t in types if t in set(manipulations)]
        for t in types:
            for uri in _list_videos(root, posixpath.join("manipulated_sequences", t, c, "videos"), endpoint):
                vid = _stem(uri)
                rows.append(dict(uri=uri, label=1, split=split_of.get(vid, "unassigned"),
                                 video_id=f"{t}/{c}/{vid}", source=f"ffpp/{t}", manipulation=t, compression=c))
    if not rows:
        raise ManifestError(f"no FaceForensics++ videos under {root} for compressions {list(compressions)}")
    return validate(pd.DataFrame(rows, columns=COLUMNS))


# ----------------------------------------------------------------------------- Celeb-DF v2
CELEBDF_FOLDERS = {"Celeb-real": 0, "YouTube-real": 0, "Celeb-synthesis": 1}


def celebdf_manifest(root: str, val_fraction: float = 0.1, seed: int = 0, endpoint: str | None = None) -> pd.DataFrame:
    """Celeb-DF v2 manifest: ``List_of_testing_videos.txt`` names the test split (its first
    field is 1 for real, 0 for synthesised; checked against the folder); the rest is train, and
    ``val_fraction`` of identities (first ``idN`` of the name, or the YouTube id) go to val."""
    text = _read_text(_join(root, "List_of_testing_videos.txt"), endpoint)
    if text is None:
        raise ManifestError(f"no List_of_testing_videos.txt under {root}")
    test = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        flag, rel = line.split()
        test[rel.strip()] = 1 - int(flag)  # file: 1 = real; ours: 1 = fake
    rows = []
    for folder, label in CELEBDF_FOLDERS.items():
        for uri in _list_videos(root, folder, endpoint):
            rel = f"{folder}/{posixpath.basename(uri)}"
            stem = _stem(uri)
            if rel in test:
                if test[rel] != label:
                    raise ManifestError(f"{rel}: label in List_of_testing_videos.txt disagrees with its folder")
                split = "test"
            else:
                ident = stem.split("_")[0]
                split = "val" if _frac_hash(ident, seed) < val_fraction else "train"
            rows.append(dict(uri=uri, label=label, split=split, video_id=f"{folder}/{stem}",
                             source=f"celebdf/{folder}", manipulation="celebdf_synthesis" if label else "none",
                             compression="native"))
    missing = set(test) - {f"{r['video_id']}{os.path.splitext(r['uri'])[1]}" for r in rows}
    if missing:
        raise ManifestError(f"{len(missing)} test videos listed but absent, e.g. {sorted(missing)[0]}")
    return validate(pd.DataFrame(rows, columns=COLUMNS))


# ----------------------------------------------------------------------------- DFDC
def dfdc_manifest(root: str, val_parts=(), test_parts=(), val_fraction: float = 0.1, test_fraction: float = 0.1,
                  seed: int = 0, endpoint: str | None = None) -> pd.DataFrame:
    """DFDC manifest from every ``metadata.json`` in ``root`` or its direct sub-folders."""
    parts = [""] + _list_dirs(root, "", endpoint)
    rows = []
    for part in parts:
        text = _read_text(_join(root, part, "metadata.json") if part else _join(root, "metadata.json"), endpoint)
        if text is None:
            continue
        meta = json.loads(text)
        for fname, m in sorted(meta.items()):
            label = 1 if str(m.get("label", "")).upper() == "FAKE" else 0
            orig = _stem(m.get("original") or fname) if label else _stem(fname)
            if part and part in set(val_parts):
                split = "val"
            elif part and part in set(test_parts):
                split = "test"
            elif val_parts or test_parts:
                split = "train"
            else:
                h = _frac_hash(orig, seed)
                split = "test" if h < test_fraction else "val" if h < test_fraction + val_fraction else "train"
            uri = _join(root, part, fname) if part else _join(root, fname)
            rows.append(dict(uri=uri, label=label, split=split, video_id=f"{part or 'dfdc'}/{_stem(fname)}",
                             source=f"dfdc/{part}" if part else "dfdc", manipulation="dfdc" if label else "none",
                             compression="native"))
    if not rows:
        raise ManifestError(f"no DFDC metadata.json under {root}")
    return validate(pd.DataFrame(rows, columns=COLUMNS))


ADAPTERS = {"ffpp": ffpp_manifest, "celebdf": celebdf_manifest, "dfdc": dfdc_manifest}

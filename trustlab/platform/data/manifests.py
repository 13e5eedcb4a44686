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
  ``{train,val,test}.json`` (lists of ``[target, source]`` id pairs; a real video ``a`` and
  the fakes ``a_b`` / ``b_a`` go to the pair's split) from ``splits`` (a folder, local or s3://;
  default ``<root>/splits``: the official download script ships no split files, they are in the
  FaceForensics repository's ``dataset/splits/``). The four standard manipulations (Deepfakes,
  Face2Face, FaceSwap, NeuralTextures) by default; FaceShifter and DeepFakeDetection (with the
  ``actors`` originals) only when named. Videos no split file names (the DeepFakeDetection
  part) get split ``unassigned``. A requested manipulation or compression without videos is an error.
- ``celebdf_manifest`` Celeb-DF v2: ``Celeb-real/``, ``YouTube-real/``, ``Celeb-synthesis/`` and
  ``List_of_testing_videos.txt`` (lines ``<1 real|0 fake> <folder>/<file>.mp4``): the listed
  videos are the test split; of the rest a deterministic ``val_fraction`` by identity is val.
- ``dfdc_manifest``    DFDC: folders holding ``metadata.json`` (``{file: {label: REAL|FAKE,
  split, original}}``), e.g. ``dfdc_train_part_<k>/``, and the test set's folder holding
  ``labels.csv`` (``filename,label``, 1 = fake; videos beside it or in ``videos/``), which is the
  test split. Folders named in ``test_parts`` / ``val_parts`` make those splits; a split no folder
  makes is a deterministic ``val_fraction``/``test_fraction`` of the remaining *original* videos
  (a fake follows its original, so no identity leaks across splits). A named folder without
  ``metadata.json`` or ``labels.csv`` is an error that names it.
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
FFPP_STANDARD = ("Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures")
FFPP_MANIPULATIONS = (*FFPP_STANDARD, "FaceShifter", "DeepFakeDetection")


def ffpp_splits(folder: str, endpoint: str | None = None) -> dict[str, str]:
    """``{video stem: split}`` from the official ``{train,val,test}.json`` in ``folder``."""
    split_of: dict[str, str] = {}
    absent = []
    for split in SPLITS:
        text = _read_text(_join(folder, f"{split}.json"), endpoint)
        if text is None:
            absent.append(f"{split}.json")
            continue
        for pair in json.loads(text):
            a, b = (str(x) for x in pair)
            split_of[a] = split_of[b] = split
            split_of[f"{a}_{b}"] = split_of[f"{b}_{a}"] = split
    if absent:
        raise ManifestError(f"FaceForensics++ split files {absent} not in {folder}: the official download has no "
                            "splits/ folder; set data.splits to a folder holding train.json, val.json and test.json "
                            "(FaceForensics repository, dataset/splits/)")
    return split_of


def ffpp_manifest(root: str, compressions=("c23",), manipulations=None, splits: str | None = None,
                  endpoint: str | None = None) -> pd.DataFrame:
    """FaceForensics++ manifest from its folder layout (see module docstring). ``manipulations``:
    the fake types to include (default: the four standard ones); ``splits``: the folder of the
    split files (default ``<root>/splits``)."""
    split_of = ffpp_splits(splits or _join(root, "splits"), endpoint)
    types = list(manipulations) if manipulations else list(FFPP_STANDARD)
    sources = ["youtube"] + (["actors"] if "DeepFakeDetection" in types else [])
    rows = []
    for c in compressions:
        for src in sources:
            found = _list_videos(root, posixpath.join("original_sequences", src, c, "videos"), endpoint)
            if not found:
                raise ManifestError(f"no original videos under {_join(root, 'original_sequences', src, c, 'videos')}")
            for uri in found:
                vid = _stem(uri)
                rows.append(dict(uri=uri, label=0, split=split_of.get(vid, "unassigned"),
                                 video_id=f"original/{src}/{c}/{vid}", source=f"ffpp/{src}",
                                 manipulation="none", compression=c))
        for t in types:
            found = _list_videos(root, posixpath.join("manipulated_sequences", t, c, "videos"), endpoint)
            if not found:
                raise ManifestError(f"requested manipulation {t} has no videos under "
                                    f"{_join(root, 'manipulated_sequences', t, c, 'videos')}")
            for uri in found:
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
def _dfdc_part(root: str, part: str, endpoint: str | None):
    """``(kind, entries)`` of a DFDC folder: ``("metadata", {file: meta})``, ``("labels", {file:
    label})`` from labels.csv, or None."""
    base = _join(root, part) if part else root
    text = _read_text(_join(base, "metadata.json"), endpoint)
    if text is not None:
        return "metadata", json.loads(text)
    text = _read_text(_join(base, "labels.csv"), endpoint)
    if text is not None:
        t = pd.read_csv(io.StringIO(text))
        if not {"filename", "label"} <= set(t.columns):
            raise ManifestError(f"{_join(base, 'labels.csv')} needs columns filename,label")
        return "labels", {str(f): int(round(float(v))) for f, v in zip(t["filename"], t["label"])}
    return None


def dfdc_manifest(root: str, val_parts=(), test_parts=(), val_fraction: float = 0.1, test_fraction: float = 0.1,
                  seed: int = 0, endpoint: str | None = None) -> pd.DataFrame:
    """DFDC manifest from every ``metadata.json`` / ``labels.csv`` in ``root`` or its direct
    sub-folders (see the module docstring)."""
    parts = {p: got for p in [""] + _list_dirs(root, "", endpoint) if (got := _dfdc_part(root, p, endpoint))}
    named = set(val_parts) | set(test_parts)
    if named - set(parts):
        raise ManifestError(f"DFDC parts without metadata.json or labels.csv: {sorted(named - set(parts))} "
                            f"(under {root}; parts found: {sorted(p or '.' for p in parts)})")
    if not parts:
        raise ManifestError(f"no DFDC metadata.json or labels.csv under {root}")
    test_by_part = bool(test_parts) or any(kind == "labels" for kind, _ in parts.values())
    rows = []
    for part, (kind, entries) in sorted(parts.items()):
        base = _join(root, part) if part else root
        if kind == "labels":
            in_videos = set(_list_videos(base, "videos", endpoint))
        for fname, m in sorted(entries.items()):
            if kind == "labels":
                label, orig = int(m), _stem(fname)
                uri = _join(base, "videos", fname) if _join(base, "videos", fname) in in_videos else _join(base, fname)
            else:
                label = 1 if str(m.get("label", "")).upper() == "FAKE" else 0
                orig = _stem(m.get("original") or fname) if label else _stem(fname)
                uri = _join(base, fname)
            if part in set(val_parts):
                split = "val"
            elif part in set(test_parts) or kind == "labels":
                split = "test"
            else:  # a split no folder makes: a fraction of the originals (a fake follows its original)
                h = _frac_hash(orig, seed)
                t_frac = 0.0 if test_by_part else test_fraction
                v_frac = 0.0 if val_parts else val_fraction
                split = "test" if h < t_frac else "val" if h < t_frac + v_frac else "train"
            rows.append(dict(uri=uri, label=label, split=split, video_id=f"{part or 'dfdc'}/{_stem(fname)}",
                             source=f"dfdc/{part}" if part else "dfdc", manipulation="dfdc" if label else "none",
                             compression="native"))
    return validate(pd.DataFrame(rows, columns=COLUMNS))


ADAPTERS = {"ffpp": ffpp_manifest, "celebdf": celebdf_manifest, "dfdc": dfdc_manifest}

"""``mode=inspect``: look at a dataset and the weights before training.

    python experiments/run.py method=f2c data=genimage data.root=/data/GenImage mode=inspect

Resolves the manifest of the configured dataset — the method's own ``manifest(cfg)`` hook when it
has one (FSCIL benchmarks, face pairs), else the data plane of ``data.name`` (video: ffpp, celebdf,
dfdc; images: genimage, cnnspot, aigcdetect, image_manifest) — and prints, then writes as
``<run folder>/inspect.json``:

- ``counts``: rows per split, per split x label, and per split x label x value of each of
  ``source``, ``manipulation``, ``generator``, ``compression``; with a ``session`` column (FSCIL)
  also a table per session (classes, training images, shots per class, test images);
- ``unreadable``: the files it could not read (``inspect.verify``: ``open`` reads every file and
  decodes its header, ``exists`` checks presence and size, ``none`` skips the check), with reasons;
- ``weights``: every weights source the method config names, with the resolved file and sha256,
  or the error a training run would stop at.

Nothing is trained and no Ray cluster is started.
"""
from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor

import pandas as pd

from trustlab.platform import storage

GROUP_COLUMNS = ("generator", "source", "manipulation", "compression")


def resolve(cfg: dict) -> pd.DataFrame:
    """The manifest ``mode=inspect`` (and a run) reads."""
    from trustlab.platform.registry import get_method

    method = get_method(cfg["method"]["name"])
    if method.has("manifest"):
        df = method.manifest(cfg)
        if df is not None:
            return df
    name = (cfg.get("data") or {}).get("name")
    endpoint = cfg["run"].get("s3_endpoint")
    from trustlab.platform.data import images, manifests

    if name in images.ADAPTERS or name == "image_manifest":
        return images.resolve_manifest(cfg["data"], int(cfg["seed"]), endpoint)
    if name in manifests.ADAPTERS or (cfg["data"].get("manifest") and name != "auto"):
        from trustlab.platform.data.video import resolve_manifest, video_data_config

        return resolve_manifest(video_data_config(cfg["data"]), int(cfg["seed"]), endpoint)[0]
    raise ValueError(f"data={name}: nothing to inspect (the method's generated set); choose a dataset with "
                     f"data=<{', '.join([*manifests.ADAPTERS, *images.ADAPTERS, 'image_manifest'])}> or a method "
                     "whose data config names one")


def counts(df: pd.DataFrame) -> dict:
    out = {"rows": int(len(df)), "by_split": {str(k): int(v) for k, v in df.groupby("split").size().items()}}
    out["by_split_label"] = {str(s): {str(lab): int(n) for lab, n in g.groupby("label").size().items()}
                             for s, g in df.groupby("split")}
    for col in GROUP_COLUMNS:
        if col in df.columns and df[col].astype(str).str.len().gt(0).any():
            out[f"by_{col}"] = {str(s): {str(lab): {str(v): int(n) for v, n in gg.groupby(col).size().items()}
                                         for lab, gg in g.groupby("label")} for s, g in df.groupby("split")}
    if "session" in df.columns:
        rows = []
        for s, g in df.groupby("session"):
            tr = g[g["split"] == "train"]
            per = tr.groupby("label").size()
            rows.append({"session": int(s), "classes": int(g["label"].nunique()), "train_images": int(len(tr)),
                         "min_shots": int(per.min()) if len(per) else 0, "max_shots": int(per.max()) if len(per) else 0,
                         "val_images": int((g["split"] == "val").sum()), "test_images": int((g["split"] == "test").sum())})
        out["sessions"] = rows
    return out


def _file_of(uri: str) -> str:
    """The file a manifest uri lives in (``path#i`` rows of an array file share ``path``)."""
    return uri.rsplit("#", 1)[0] if "#" in uri else uri


def check_file(uri: str, verify: str, endpoint: str | None = None) -> str | None:
    """None when ``uri`` reads, else the reason."""
    from trustlab.platform.data.images import IMAGE_EXTS
    from trustlab.platform.data.manifests import VIDEO_EXTS

    try:
        if storage.is_s3(uri):
            import pyarrow.fs as pafs

            fs = storage.s3_filesystem(endpoint)
            info = fs.get_file_info(uri[5:])
            if info.type != pafs.FileType.File:
                return "missing file"
            size = info.size
        else:
            if not os.path.isfile(uri):
                return "missing file"
            size = os.path.getsize(uri)
        if size == 0:
            return "zero-byte file"
        if verify != "open":
            return None
        low = uri.lower()
        if low.endswith(IMAGE_EXTS):
            from PIL import Image

            with Image.open(io.BytesIO(storage.read_bytes(uri, endpoint))) as im:
                im.verify()
        elif low.endswith(VIDEO_EXTS) and not storage.is_s3(uri):
            from trustlab.platform.data.video import probe_size

            w, h = probe_size(storage.read_bytes(uri, endpoint))
            if w <= 0 or h <= 0:
                return "no video stream"
        return None
    except Exception as e:  # noqa: BLE001 - every failure is a reason to report
        from trustlab.platform.data.images import _reason

        return _reason(e)


def unreadable(df: pd.DataFrame, verify: str = "open", threads: int = 8, endpoint: str | None = None) -> list[dict]:
    if verify == "none":
        return []
    files = list(dict.fromkeys(_file_of(str(u)) for u in df["uri"]))
    with ThreadPoolExecutor(max(1, int(threads))) as ex:
        reasons = list(ex.map(lambda u: check_file(u, verify, endpoint), files))
    split_of = {}
    for u, s in zip(df["uri"], df["split"]):
        split_of.setdefault(_file_of(str(u)), str(s))
    return [{"uri": u, "split": split_of[u], "reason": r} for u, r in zip(files, reasons) if r]


def weights_status(cfg: dict) -> list[dict]:
    from trustlab.platform import weights as W

    out = []
    for key, src in W.sources(cfg):
        try:
            path = W.local_file(src, cfg)
            out.append({"key": key, "source": src, "file": path, "sha256": W.sha256(path), "bytes": os.path.getsize(path)})
        except Exception as e:  # noqa: BLE001 - reported, not raised: inspect looks, it does not train
            out.append({"key": key, "source": src, "error": str(e)})
    return out


def _lines(report: dict, max_listed: int) -> list[str]:
    c = report["counts"]
    d = report["data"]
    lines = [f"== trustlab inspect: method {report['method']}, data {d['name']}"
             + (f" ({d.get('root') or d.get('manifest')})" if (d.get("root") or d.get("manifest")) else "")
             + f" — {c['rows']} rows"]
    shown = []  # a column whose counts repeat an earlier one's (source vs generator) is not printed again
    for col in GROUP_COLUMNS:
        sig = {s: {lab: sorted(v.values()) for lab, v in d.items()} for s, d in (c.get(f"by_{col}") or {}).items()}
        if sig and sig not in [x for _, x in shown]:
            shown.append((col, sig))
    for split, labels in sorted(c["by_split_label"].items()):
        lines.append(f"{split:>10}: {c['by_split'][split]} rows; by label " + ", ".join(f"{k}: {v}" for k, v in sorted(labels.items())))
        if "sessions" in c:
            continue
        for col, _ in shown:
            for lab, vals in sorted((c[f"by_{col}"].get(split) or {}).items()):
                lines.append(f"{'':>12}label {lab} by {col}: " + ", ".join(f"{k} {v}" for k, v in sorted(vals.items())))
    for s in c.get("sessions", []):
        lines.append(f"   session {s['session']}: {s['classes']} classes, {s['train_images']} train images "
                     f"({s['min_shots']}-{s['max_shots']} per class), {s['val_images']} val, {s['test_images']} test")
    bad = report["unreadable"]
    lines.append(f"unreadable files: {len(bad)}" + (f" (verify={report['verify']})"))
    lines += [f"  {b['split']}: {b['uri']} — {b['reason']}" for b in bad[:max_listed]]
    if len(bad) > max_listed:
        lines.append(f"  ... {len(bad) - max_listed} more in inspect.json")
    for w in report["weights"]:
        lines.append(f"weights {w['key']}: {w['source']} -> " + (f"{w['file']} sha256 {w['sha256']}" if "sha256" in w
                                                                  else f"ERROR {w['error']}"))
    if not report["weights"]:
        lines.append("weights: none (random init)")
    return lines


def inspect(cfg: dict) -> dict:
    """Resolve, count and check the dataset and weights of ``cfg``; print; write ``inspect.json``."""
    from trustlab.platform.experiment import prepare_run_dir
    from trustlab.platform.train import write_json

    icfg = {"verify": "open", "threads": 8, "max_listed": 200, **(cfg.get("inspect") or {})}
    ws = weights_status(cfg)
    _, run_dir = prepare_run_dir(cfg, weights=ws)
    df = resolve(cfg)
    report = {"method": cfg["method"]["name"], "data": {k: cfg["data"].get(k) for k in ("name", "root", "manifest")},
              "counts": counts(df), "verify": icfg["verify"],
              "unreadable": unreadable(df, icfg["verify"], int(icfg["threads"]), cfg["run"].get("s3_endpoint")),
              "excluded": int(df.attrs.get("excluded", 0)), "weights": ws}
    write_json(os.path.join(run_dir, "inspect.json"), report)
    text = "\n".join(_lines(report, int(icfg["max_listed"])) + [f"written: {os.path.join(run_dir, 'inspect.json')}"])
    print(text, flush=True)
    return report

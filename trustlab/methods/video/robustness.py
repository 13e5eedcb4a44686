"""Evaluation-time robustness sweep: perturb a split's inputs, re-score, tabulate and plot.

Perturbations act on uint8 image tensors laid out ``(..., 3, H, W)`` (an image batch or a clip
batch ``N x T x 3 x H x W``), each image independently, deterministic by seed:

- ``jpeg``: JPEG re-encoding at quality ``level`` (OpenCV's libjpeg, 4:2:0);
- ``blur``: Gaussian blur with standard deviation ``level`` pixels (kernel 2*ceil(3 sigma)+1);
- ``noise``: additive Gaussian noise with standard deviation ``level`` (in 0..255 units);
- ``downscale``: down-sampling by factor ``level`` (area averaging) and back up to the original
  size (bilinear), i.e. the resolution loss of a smaller upload.

``sweep`` scores a split (numpy arrays or a ``ray.data.Dataset``) once per (kind, level) with
the platform's ``evaluate_split`` and writes ``<prefix>.csv`` (one row per kind and level, frame-
and video-level AUC/AP/EER/ACC) and ``<prefix>.png`` (AUC against level, one panel per kind,
the clean score as a dashed line). Generic: it knows the method only through ``method.predict``.
"""
from __future__ import annotations

import math
import os

import numpy as np

KINDS = ("jpeg", "blur", "noise", "downscale")
DEFAULT_LEVELS = {"jpeg": [90, 70, 50, 30], "blur": [0.5, 1.0, 1.5, 2.0], "noise": [4, 8, 16, 24],
                  "downscale": [1.5, 2.0, 3.0, 4.0]}


def _frames(x: np.ndarray):
    """View ``(..., 3, H, W)`` as ``(M, H, W, 3)`` uint8 copies and a function putting them back."""
    shape = x.shape
    flat = np.ascontiguousarray(x.reshape(-1, *shape[-3:]).transpose(0, 2, 3, 1))

    def back(f: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(f.transpose(0, 3, 1, 2)).reshape(shape)

    return flat, back


def perturb(x: np.ndarray, kind: str, level: float, seed: int = 0) -> np.ndarray:
    """A perturbed uint8 copy of ``x`` (``(..., 3, H, W)``)."""
    import cv2

    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise TypeError(f"perturb expects uint8 images, got {x.dtype}")
    if kind not in KINDS:
        raise ValueError(f"unknown perturbation {kind!r}; valid: {', '.join(KINDS)}")
    f, back = _frames(x)
    h, w = f.shape[1:3]
    out = np.empty_like(f)
    if kind == "noise":
        rng = np.random.default_rng(seed)
        return back(np.clip(np.rint(f + rng.normal(0.0, float(level), f.shape)), 0, 255).astype(np.uint8))
    for i, im in enumerate(f):
        if kind == "jpeg":
            ok, buf = cv2.imencode(".jpg", im[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(level)])
            out[i] = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]
        elif kind == "blur":
            s = float(level)
            k = 2 * int(math.ceil(3 * s)) + 1
            out[i] = cv2.GaussianBlur(im, (k, k), sigmaX=s, sigmaY=s, borderType=cv2.BORDER_REFLECT)
        else:  # downscale
            lw, lh = max(1, int(round(w / float(level)))), max(1, int(round(h / float(level))))
            small = cv2.resize(im, (lw, lh), interpolation=cv2.INTER_AREA)
            out[i] = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return back(out)


def perturb_split(split, kind: str, level: float, seed: int = 0):
    """The split with its ``x`` perturbed: a new dict of arrays, or a lazily mapped Dataset."""
    if isinstance(split, dict):
        out = dict(split)
        out["x"] = perturb(split["x"], kind, level, seed)
        return out

    def fn(batch: dict) -> dict:
        batch = dict(batch)
        batch["x"] = perturb(np.asarray(batch["x"]), kind, level, seed + int(np.asarray(batch["vid"])[:1].sum()))
        return batch

    return split.map_batches(fn, batch_format="numpy")


def sweep(method, model, split, cfg: dict, out_dir: str, levels: dict | None = None,
          prefix: str = "robustness", seed: int = 0, title: str = "") -> dict:
    """Score ``split`` clean and under every (kind, level); write ``<prefix>.csv`` and
    ``<prefix>.png`` into ``out_dir``; return ``{"clean": metrics, "rows": [...], "csv", "png"}``
    where each row is ``{kind, level, clip_auc, clip_ap, clip_eer, clip_acc, video_auc, ...}`` (the
    sample level is the method's: ``clip`` for the video methods, ``frame`` for per-frame scores)."""
    import pandas as pd

    from trustlab.platform.evaluate import evaluate_split

    levels = levels or DEFAULT_LEVELS
    clean, _ = evaluate_split(method, model, split, cfg)
    lvls = (next(k for k in clean if k != "video"), "video")  # the sample level, then video
    from trustlab.platform.progress import progress

    rows = []
    settings = [(kind, level) for kind, lv in levels.items() for level in lv]
    for kind, level in progress(settings, "robustness sweep", unit="setting"):
        m, _ = evaluate_split(method, model, perturb_split(split, kind, level, seed), cfg)
        row = {"kind": kind, "level": level}
        for lvl in lvls:
            for k in ("auc", "ap", "eer", "acc"):
                row[f"{lvl}_{k}"] = m[lvl][k]
        rows.append(row)
    os.makedirs(out_dir, exist_ok=True)
    csv = os.path.join(out_dir, f"{prefix}.csv")
    df = pd.DataFrame(rows)
    clean_row = {"kind": "clean", "level": 0}
    for lvl in lvls:
        for k in ("auc", "ap", "eer", "acc"):
            clean_row[f"{lvl}_{k}"] = clean[lvl][k]
    pd.concat([pd.DataFrame([clean_row]), df], ignore_index=True).to_csv(csv, index=False, float_format="%.4f")
    png = plot_sweep(rows, clean, os.path.join(out_dir, f"{prefix}.png"), title or prefix)
    return {"clean": clean, "rows": rows, "csv": csv, "png": png}


def plot_sweep(rows: list, clean: dict, path: str, title: str = "") -> str:
    """One panel per perturbation kind: sample- (clip or frame) and video-level AUC against level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(3.2 * max(1, len(kinds)), 3.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rs = [r for r in rows if r["kind"] == kind]
        xs = [r["level"] for r in rs]
        sample = next(k for k in clean if k != "video")
        for lvl, style in ((sample, "o-"), ("video", "s-")):
            ax.plot(xs, [r[f"{lvl}_auc"] for r in rs], style, label=f"{lvl} AUC")
            ax.axhline(clean[lvl]["auc"], ls="--", lw=0.8, color="C0" if lvl == sample else "C1")
        if kind == "jpeg":
            ax.invert_xaxis()  # lower quality = stronger perturbation, to the right
        ax.set_xlabel({"jpeg": "JPEG quality", "blur": "blur sigma (px)", "noise": "noise sigma",
                       "downscale": "downscale factor"}.get(kind, kind))
        ax.set_ylim(0.0, 1.02)
        ax.set_title(kind)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("AUC (dashed: clean)")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

"""Score fusion for the detection graph: mean, max, weighted mean, or a logistic stacker.

Every detector returns a score in [0, 1] (higher = more likely fake). ``Fusion`` turns the scores
of the detectors that answered a request into one fused score:

- ``mean``: arithmetic mean of the answering detectors' scores;
- ``max``: the largest score (the most alarmed detector decides);
- ``weighted``: ``sum(w_i s_i) / sum(w_i)`` over the answering detectors (weights > 0; a detector
  with no weight given counts 1), so a failed detector's weight drops out instead of dragging
  the score towards 0;
- ``logistic``: a logistic-regression stacker fitted on *validation* scores (never test):
  ``sigmoid(b + sum_i c_i * logit(s_i))`` with each score clipped to [1e-6, 1 - 1e-6] before the
  logit. A detector the stacker knows but that failed on this request is replaced by its mean
  validation logit (reported in ``imputed``); a detector the stacker does not know is reported in
  ``ignored`` and does not move the fused score.

The stacker is a small JSON file (local or ``s3://``)::

    {"kind": "logistic_stacker", "detectors": ["f2c", "stdt"], "coef": [..], "intercept": b,
     "fill": [mean validation logit per detector], "n_val": N, "val_auc": ..}

Fitting it (scores of a labelled validation set collected through the running graph, so the
stacker sees exactly the scores it will combine in production)::

    python -m trustlab.serve.fusion collect --url http://127.0.0.1:8000 --manifest val.csv --out val_scores.csv
    python -m trustlab.serve.fusion fit --scores val_scores.csv --out stacker.json

``collect`` posts every row of the manifest (``uri`` local or ``s3://``, ``label``; rows of
``split == val`` when the manifest has a ``split`` column) to ``/v1/detect`` and writes one
column per detector plus ``label``; ``fit`` fits the stacker on those columns.
"""
from __future__ import annotations

import json
import math

import numpy as np

METHODS = ("mean", "max", "weighted", "logistic")
EPS = 1e-6


class FusionError(ValueError):
    """A fusion config that cannot work (unknown method, bad weights, stacker mismatch)."""


def logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), EPS, 1.0 - EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid(z) -> np.ndarray:
    from scipy.special import expit

    return expit(np.asarray(z, np.float64))


# ----------------------------------------------------------------------------- stacker
def fit_stacker(scores, labels, detectors: list[str], c: float = 1.0) -> dict:
    """Fit the logistic stacker on validation scores ``(n, d)`` (column j = ``detectors[j]``)
    and labels ``(n,)`` in {0, 1}; ``c`` is the inverse L2 strength (scikit-learn's ``C``)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    x = np.asarray(scores, np.float64)
    y = np.asarray(labels).astype(int).reshape(-1)
    if x.ndim != 2 or x.shape[1] != len(detectors) or x.shape[0] != len(y):
        raise FusionError(f"scores must be (n, {len(detectors)}) with n = len(labels); got {x.shape}, {len(y)} labels")
    if not np.isfinite(x).all():
        raise FusionError("validation scores contain NaN or inf")
    if set(np.unique(y)) != {0, 1}:
        raise FusionError("validation labels must contain both classes 0 and 1")
    z = logit(x)
    clf = LogisticRegression(C=float(c), max_iter=1000).fit(z, y)
    fused = clf.predict_proba(z)[:, 1]
    return {"kind": "logistic_stacker", "detectors": list(detectors), "coef": clf.coef_[0].tolist(),
            "intercept": float(clf.intercept_[0]), "fill": z.mean(axis=0).tolist(), "C": float(c),
            "n_val": int(len(y)), "val_auc": float(roc_auc_score(y, fused))}


def check_stacker(st: dict) -> dict:
    if not isinstance(st, dict) or st.get("kind") != "logistic_stacker":
        raise FusionError("stacker must be a JSON object with kind = logistic_stacker")
    names = st.get("detectors")
    if not isinstance(names, list) or not names or len(set(names)) != len(names):
        raise FusionError("stacker.detectors must be a non-empty list of distinct names")
    for key in ("coef", "fill"):
        v = st.get(key)
        if not isinstance(v, list) or len(v) != len(names) or not all(math.isfinite(float(a)) for a in v):
            raise FusionError(f"stacker.{key} must hold {len(names)} finite numbers")
    if not math.isfinite(float(st.get("intercept", float("nan")))):
        raise FusionError("stacker.intercept must be a finite number")
    return st


def load_stacker(uri: str, s3_endpoint: str | None = None) -> dict:
    from trustlab.platform import storage

    try:
        st = json.loads(storage.read_bytes(uri, s3_endpoint).decode())
    except (OSError, ValueError) as e:
        raise FusionError(f"cannot read stacker {uri!r}: {e}") from None
    return check_stacker(st)


# ----------------------------------------------------------------------------- fusion
class Fusion:
    """``Fusion(method, weights=None, stacker=None, detectors=None)(scores) -> dict``.

    ``detectors`` (the graph's detector names) lets the constructor reject weights or a
    stacker naming detectors the graph does not have."""

    def __init__(self, method: str = "mean", weights: dict | None = None, stacker: dict | None = None,
                 detectors: list[str] | None = None):
        if method not in METHODS:
            raise FusionError(f"unknown fusion {method!r}; valid choices: {', '.join(METHODS)}")
        self.method = method
        self.weights = {str(k): float(v) for k, v in (weights or {}).items()}
        bad = {k: v for k, v in self.weights.items() if not (math.isfinite(v) and v > 0)}
        if bad:
            raise FusionError(f"fusion weights must be finite and > 0, got {bad}")
        known = set(detectors) if detectors is not None else None
        if known is not None and set(self.weights) - known:
            raise FusionError(f"fusion weights for unknown detectors: {sorted(set(self.weights) - known)}")
        self.stacker = None
        if method == "logistic":
            if stacker is None:
                raise FusionError("fusion logistic needs a stacker (fusion.stacker = stacker JSON, local or s3://)")
            self.stacker = check_stacker(stacker)
            if known is not None and set(self.stacker["detectors"]) - known:
                raise FusionError(f"stacker was fitted on detectors the graph does not have: "
                                  f"{sorted(set(self.stacker['detectors']) - known)}")

    def describe(self) -> dict:
        d = {"method": self.method}
        if self.method == "weighted":
            d["weights"] = self.weights
        if self.stacker is not None:
            d["stacker"] = {k: self.stacker[k] for k in ("detectors", "coef", "intercept") if k in self.stacker}
        return d

    def __call__(self, scores: dict) -> dict:
        """``scores``: detector name -> score of the detectors that answered (failed ones left
        out). Returns ``{"score", "method", "used", ...}``; raises FusionError when empty."""
        used = {k: float(v) for k, v in scores.items() if v is not None and math.isfinite(float(v))}
        if not used:
            raise FusionError("no detector score to fuse")
        names = sorted(used)
        vals = np.array([used[k] for k in names])
        out = {"method": self.method, "used": names}
        if self.method == "mean":
            out["score"] = float(vals.mean())
        elif self.method == "max":
            out["score"] = float(vals.max())
        elif self.method == "weighted":
            w = np.array([self.weights.get(k, 1.0) for k in names])
            out["score"] = float((w * vals).sum() / w.sum())
            out["weights"] = dict(zip(names, w.tolist()))
        else:
            st = self.stacker
            z, imputed = [], []
            for j, k in enumerate(st["detectors"]):
                if k in used:
                    z.append(float(logit(used[k])))
                else:
                    z.append(float(st["fill"][j]))
                    imputed.append(k)
            lin = float(st["intercept"]) + float(np.dot(np.asarray(st["coef"], np.float64), np.asarray(z)))
            out["score"] = float(sigmoid(lin))
            out["used"] = [k for k in st["detectors"] if k in used]
            out["imputed"] = imputed
            out["ignored"] = [k for k in names if k not in st["detectors"]]
            if not out["used"]:
                raise FusionError("none of the stacker's detectors answered")
        return out


# ----------------------------------------------------------------------------- CLI
def _collect(url: str, manifest: str, out: str, timeout: float) -> int:
    import mimetypes
    import os

    import pandas as pd
    import requests

    from trustlab.platform import storage

    df = pd.read_parquet(manifest) if manifest.endswith(".parquet") else pd.read_csv(manifest)
    if "split" in df.columns:
        df = df[df["split"] == "val"]
    if df.empty:
        raise SystemExit(f"error: no validation rows in {manifest}")
    rows = []
    # a graph with API keys (serve.auth) wants one: the client's key is $TRUSTLAB_API_KEY
    headers = {"X-API-Key": os.environ["TRUSTLAB_API_KEY"]} if os.environ.get("TRUSTLAB_API_KEY") else {}
    for uri, label in zip(df["uri"], df["label"]):
        if storage.is_s3(uri):
            r = requests.post(f"{url.rstrip('/')}/v1/detect", json={"uri": uri}, timeout=timeout, headers=headers)
        else:
            ctype = mimetypes.guess_type(uri)[0] or "application/octet-stream"
            with open(uri, "rb") as f:
                r = requests.post(f"{url.rstrip('/')}/v1/detect", files={"file": (os.path.basename(uri), f, ctype)},
                                  timeout=timeout, headers=headers)
        body = r.json()
        if r.status_code != 200:
            print(f"skip {uri}: HTTP {r.status_code} {body.get('error')}")
            continue
        row = {"uri": uri, "label": int(label)}
        for name, d in body["detectors"].items():
            row[name] = d.get("score") if d.get("status") == "ok" else float("nan")
        rows.append(row)
    pd.DataFrame(rows).to_csv(out, index=False)
    print(f"wrote {len(rows)} rows to {out}")
    return 0


def _fit(scores_csv: str, out: str, detectors: list[str] | None, c: float) -> int:
    import pandas as pd

    df = pd.read_csv(scores_csv)
    names = detectors or [k for k in df.columns if k not in ("uri", "label")]
    df = df.dropna(subset=names)
    st = fit_stacker(df[names].to_numpy(), df["label"].to_numpy(), names, c)
    with open(out, "w") as f:
        json.dump(st, f, indent=2)
    print(f"stacker on {st['n_val']} validation rows, val AUC {st['val_auc']:.4f} -> {out}")
    return 0


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m trustlab.serve.fusion", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="score a validation manifest through a running graph "
                                       "(API key, if the graph wants one: $TRUSTLAB_API_KEY)")
    c.add_argument("--url", required=True)
    c.add_argument("--manifest", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--timeout", type=float, default=120.0)
    f = sub.add_parser("fit", help="fit the logistic stacker on collected validation scores")
    f.add_argument("--scores", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--detectors", default=None, help="comma-separated columns (default: all but uri/label)")
    f.add_argument("--C", type=float, default=1.0)
    a = ap.parse_args(argv)
    if a.cmd == "collect":
        return _collect(a.url, a.manifest, a.out, a.timeout)
    return _fit(a.scores, a.out, a.detectors.split(",") if a.detectors else None, a.C)


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))

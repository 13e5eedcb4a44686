"""Scoring a model on a split, in a worker or on the driver; shared by train, eval and Serve."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from trustlab.platform.metrics import detection_metrics


def iter_array_batches(arrays: dict, batch_size: int, indices=None):
    """Yield dicts of numpy slices of ``arrays`` (all keys share the first dimension)."""
    n = len(arrays["y"]) if indices is None else len(indices)
    for s in range(0, n, batch_size):
        idx = slice(s, s + batch_size) if indices is None else indices[s : s + batch_size]
        yield {k: v[idx] for k, v in arrays.items()}


@contextlib.contextmanager
def worker_threads(cfg: dict):
    """Torch threads for driver-side evaluation: as many as a training worker gets (small
    tensors; more threads than cores on a shared machine slow everything down)."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(math.ceil(float(cfg["trainer"]["cpus_per_worker"])))))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


GROUP_KEY = "generator"  # a split's column whose values get their own test metrics (image sets)


@torch.no_grad()
def score_batches(method, model, batches, cfg: dict, device="cpu", groups: list | None = None):
    """Run ``method.predict`` over numpy batches; returns (labels, scores, vids) as numpy. With
    ``groups`` (a list), each batch's ``GROUP_KEY`` column (or empty strings) is appended to it."""
    from trustlab.platform.method import as_bound

    method = as_bound(method)
    model.eval()
    ys, ss, vs = [], [], []
    for b in batches:
        t = to_device(method.to_batch(b), device)
        s = method.predict(model, t, cfg)
        ss.append(s.detach().float().cpu().numpy().reshape(-1))
        ys.append(np.asarray(b["y"]).reshape(-1))
        vs.append(np.asarray(b["vid"]).reshape(-1) if "vid" in b else np.arange(len(ys[-1])))
        if groups is not None:
            groups.append(np.asarray(b[GROUP_KEY]).astype(str) if GROUP_KEY in b else np.full(len(ys[-1]), ""))
    if not ss:
        return np.zeros(0, int), np.zeros(0), np.zeros(0, int)
    return np.concatenate(ys), np.concatenate(ss), np.concatenate(vs)


def evaluate_arrays(method, model, arrays: dict, cfg: dict, device="cpu", batch_size: int | None = None) -> tuple[dict, tuple]:
    bs = batch_size or int(cfg["trainer"]["eval_batch_size"])
    from trustlab.platform.method import sample_level

    y, s, v = score_batches(method, model, iter_array_batches(arrays, bs), cfg, device)
    return detection_metrics(y, s, v, float(cfg["trainer"].get("threshold", 0.5)), sample_level(method)), (y, s, v)


def evaluate_split(method, model, split, cfg: dict, device="cpu"):
    """Detection metrics of a split (arrays or a Ray Dataset), plus ``by_generator`` (sample-level
    metrics per value of the ``generator`` column) when the split holds several generators."""
    from trustlab.platform.method import sample_level

    level = sample_level(method)
    bs = int(cfg["trainer"]["eval_batch_size"])
    batches = iter_array_batches(split, bs) if isinstance(split, dict) else \
        split.iter_batches(batch_size=bs, batch_format="numpy")
    from trustlab.platform.progress import progress

    batches = progress(batches, "scoring", total=-(-len(split["y"]) // bs) if isinstance(split, dict) else None,
                       unit="batch")
    groups: list = []
    y, s, v = score_batches(method, model, batches, cfg, device, groups)
    thr = float(cfg["trainer"].get("threshold", 0.5))
    m = detection_metrics(y, s, v, thr, level)
    g = np.concatenate(groups) if groups else np.zeros(0, str)
    names = sorted(set(g.tolist()) - {""})
    if len(names) > 1:
        m["by_generator"] = {n: detection_metrics(y[g == n], s[g == n], v[g == n], thr, level)[level] for n in names}
    return m, (y, s, v)

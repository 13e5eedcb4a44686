"""Shared pieces of the three face-forgery video methods (STDT, NACO, LAST).

Not a method (the leading underscore keeps ``trustlab.methods`` from treating it as one).
Holds what the three share and that is not generic platform machinery:

- the cross-dataset protocol: ``data.train=<source>`` and ``data.test=[<targets>]`` name entries
  of ``method.data.sets``; the source gives ``train``/``val``/``test`` (in-domain), each target
  gives ``target:<name>`` (its test videos, cross-domain) and ``unlabelled:<name>`` (its train
  videos, used only by a method that adapts on unlabelled target clips);
- data loading (``backend``): the video data plane (``trustlab.platform.data.video.clip_datasets``:
  generated mp4 sets or real datasets, decord, face crops, Parquet crop cache) streamed into the
  workers or collected into arrays, or an in-memory synthetic clip generator
  (``synth_clip_arrays``) with the same row schema;
- clip augmentation, a plain-PyTorch stage runner (``local_fit``: the generic loop on one
  process, used by tests and benchmarks), and the ``after_train`` report (cross-domain metrics,
  robustness sweep, ablation runs through the same Ray Train path as the main run).

Nothing here imports Ray at module level: the GPU benchmark imports the method modules on a
machine without Ray.
"""
from __future__ import annotations

import functools
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from trustlab.platform import ablation
from trustlab.platform.evaluate import iter_array_batches
from trustlab.platform.method import as_bound

CLIP_KEYS = ("x", "y", "vid", "clip")


# ----------------------------------------------------------------------------- synthetic clips
@functools.lru_cache(maxsize=4)
def face_bank(side: int = 96) -> tuple[np.ndarray, ...]:
    """Real face photos as float32 ``side x side x 3`` arrays in [0, 255]: scikit-image's
    astronaut (face region) and, when present, the aligned portraits of ``../shared/data/real``."""
    import cv2
    import skimage.data as skd

    from trustlab.methods.video.synth_video import shared_real_dir

    faces = [np.asarray(skd.astronaut())[40:200, 150:310]]
    face_dir = os.path.join(shared_real_dir() or "", "faces")
    if os.path.isdir(face_dir):
        from PIL import Image

        for f in sorted(os.listdir(face_dir)):
            if f.endswith("_aligned.png"):
                faces.append(np.asarray(Image.open(os.path.join(face_dir, f)).convert("RGB")))
    return tuple(cv2.resize(f.astype(np.float32), (side, side), interpolation=cv2.INTER_AREA) for f in faces)


def _ellipse_mask(side: int, cx: float, cy: float, rx: float, ry: float, soft: float) -> np.ndarray:
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    r = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
    return np.clip((1.0 - r) / soft + 0.5, 0.0, 1.0)[..., None]


def _affine(side: int, out: int, tx: float, ty: float, scale: float, rot: float) -> np.ndarray:
    """2x3 matrix mapping the ``side`` face canvas to an ``out`` crop (zoom/shift/rotate about the centre)."""
    c = side / 2.0
    a = math.cos(rot) * scale * out / side
    b = math.sin(rot) * scale * out / side
    return np.array([[a, -b, out / 2.0 - a * c + b * c + tx * out / side],
                     [b, a, out / 2.0 - b * c - a * c + ty * out / side]], np.float32)


def render_video(rng: np.random.Generator, n_frames: int, size: int, manipulation: str,
                 strength: float = 1.0, side: int = 96, marker: dict | None = None) -> np.ndarray:
    """One video as ``n_frames x size x size x 3`` uint8: a real face with smooth head motion
    (sinusoidal shift, zoom and roll) and sensor noise. ``manipulation != "none"`` swaps or
    alters an elliptic face region with per-frame inconsistencies (magnitudes x ``strength``):

    - ``blend``: another identity's face blended in with a soft mask whose centre, radii and
      opacity jitter from frame to frame, and a per-video colour mismatch;
    - ``warp``: the face region re-rendered through an extra affine warp (zoom/shift) that
      wobbles from frame to frame, so the inner face slides against its surroundings;
    - ``color``: the face region's colour gains shifted per video and flickering per frame.

    ``marker`` (fakes only): the data plane's planted single-frame square (``synth_video.marker_spec``).
    """
    import cv2

    bank = face_bank(side)
    k = rng.integers(len(bank))
    face = bank[k].copy()
    if rng.random() < 0.5:
        face = face[:, ::-1].copy()
    face = face * rng.uniform(0.85, 1.15, size=3).astype(np.float32) + rng.uniform(-12, 12)
    zoom = rng.uniform(1.0, 1.25)
    amp = rng.uniform(2.0, 6.0, size=3)  # shift x, shift y (px of the canvas), zoom/roll amplitude
    ph = rng.uniform(0, 2 * np.pi, size=4)
    w = rng.uniform(0.15, 0.45, size=4)  # radians per frame: slow, smooth motion
    s = float(strength)
    if manipulation == "blend":
        from trustlab.methods.video.synth_video import require_donors

        require_donors(len(bank), manipulation)
        donor = bank[(k + 1 + rng.integers(len(bank) - 1)) % len(bank)].copy()
        donor = donor * rng.uniform(1 - 0.12 * s, 1 + 0.12 * s, size=3).astype(np.float32)
    elif manipulation not in ("none", "warp", "color"):
        raise ValueError(f"unknown manipulation {manipulation!r}")
    gain = 1.0 + 0.10 * s * rng.choice([-1, 1], size=3) * rng.uniform(0.5, 1.0, size=3)
    from trustlab.methods.video.synth_video import marker_frames, marker_spec, paint_marker

    marker = marker_spec(marker) if manipulation != "none" else None
    marked = marker_frames(rng, n_frames, marker) if marker else set()
    frames = np.empty((n_frames, size, size, 3), np.uint8)
    for t in range(n_frames):
        img = face
        if manipulation != "none":
            cx = side / 2 + rng.normal(0, 1.5 * s)
            cy = side * 0.55 + rng.normal(0, 1.5 * s)
            m = _ellipse_mask(side, cx, cy, side * 0.28 * (1 + rng.normal(0, 0.06 * s)),
                              side * 0.36 * (1 + rng.normal(0, 0.06 * s)), 0.25)
            if manipulation == "blend":
                inner = donor
                m = m * rng.uniform(1 - 0.25 * s, 1.0)
            elif manipulation == "warp":
                mw = _affine(side, side, rng.normal(0, 1.5 * s), rng.normal(0, 1.5 * s),
                             1.0 + 0.05 * s * (1 + rng.normal(0, 0.5)), rng.normal(0, 0.03 * s))
                inner = cv2.warpAffine(face, mw, (side, side), borderMode=cv2.BORDER_REFLECT)
            else:
                inner = face * (gain + rng.normal(0, 0.05 * s, size=3)).astype(np.float32)
            img = m * inner + (1 - m) * face
            if t in marked:  # on the canvas, where the face is 0.56 x 0.72 of the side
                img = paint_marker(img, side / 2, side * 0.55, 0.64 * side, marker)
        M = _affine(side, size, amp[0] * math.sin(w[0] * t + ph[0]), amp[1] * math.sin(w[1] * t + ph[1]),
                    zoom * (1 + 0.01 * amp[2] * math.sin(w[2] * t + ph[2])), 0.04 * math.sin(w[3] * t + ph[3]))
        fr = cv2.warpAffine(img, M, (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT)
        fr = fr + rng.normal(0, 2.0, size=fr.shape)
        frames[t] = np.clip(np.rint(fr), 0, 255).astype(np.uint8)
    return frames


def synth_clip_arrays(seed: int, n_videos: dict, manipulations, n_frames: int, clip_len: int,
                      size: int, strength: float = 1.0, vid_offset: int = 0, shift: dict | None = None,
                      marker: dict | None = None) -> dict:
    """In-memory clip set ``{split: {x: N x T x 3 x S x S uint8, y, vid, clip, manipulation}}``.

    ``n_videos`` maps split -> videos per class (half real, half fake; the fakes cycle through
    ``manipulations``). Each video has ``n_frames`` frames cut into ``n_frames // clip_len``
    consecutive clips; every clip of a video shares its ``vid`` (for video-level metrics).
    Deterministic by ``seed`` (each split draws from its own stream)."""
    out = {}
    vid = vid_offset
    for si, (split, n) in enumerate(n_videos.items()):
        rng = np.random.default_rng([int(seed), si, 7])
        xs, ys, vids, clips, mans = [], [], [], [], []
        for i in range(2 * int(n)):
            label = i % 2
            man = "none" if label == 0 else manipulations[(i // 2) % len(manipulations)]
            v = render_video(rng, n_frames, size, man, strength, marker=marker)
            if shift:  # the set's capture shift (synth_video.camera_shift), both classes alike
                from trustlab.methods.video.synth_video import camera_shift

                v = camera_shift(v, shift)
            for c in range(n_frames // clip_len):
                xs.append(v[c * clip_len : (c + 1) * clip_len].transpose(0, 3, 1, 2))
                ys.append(label)
                vids.append(vid)
                clips.append(c)
                mans.append(man)
            vid += 1
        out[split] = {"x": np.stack(xs), "y": np.asarray(ys, np.int64), "vid": np.asarray(vids, np.int64),
                      "clip": np.asarray(clips, np.int64), "manipulation": np.asarray(mans)}
    return out


# ----------------------------------------------------------------------------- protocol + data
def external_source(cfg: dict) -> str | None:
    """The data group's dataset name when one was chosen (``data=ffpp data.root=...``), else None."""
    name = (cfg.get("data") or {}).get("name")
    return None if name in (None, "auto") else str(name)


def protocol(cfg: dict) -> tuple[str, list[str]]:
    """``(source, [targets])`` of the cross-dataset protocol. Source: ``data.train`` when the data
    group declares it, else the data group itself when one is chosen (``data=ffpp ...``), else
    ``method.data.source``. Targets: ``data.test`` when declared, else ``method.data.targets``.
    Names other than the data group's are keys of ``method.data.sets``."""
    d, m = cfg.get("data", {}) or {}, cfg["method"]["data"]
    source = d.get("train") or external_source(cfg) or m["source"]
    targets = d.get("test") if d.get("test") not in (None, [], "") else m.get("targets", [])
    if isinstance(targets, str):
        targets = [t for t in targets.strip("[]").split(",") if t.strip()]
    targets = [str(t).strip() for t in targets]
    for n in [source, *targets]:
        if n not in m["sets"] and n != external_source(cfg):
            raise ValueError(f"unknown video set {n!r}; method.data.sets has: {', '.join(m['sets'])}")
    return str(source), targets


def set_spec(cfg: dict, name: str) -> dict:
    """A set's own entry: the data group's config for the chosen external dataset, else
    ``method.data.sets[name]``."""
    if name == external_source(cfg) and name not in cfg["method"]["data"]["sets"]:
        return dict(cfg["data"])
    return dict(cfg["method"]["data"]["sets"][name])


def backend(cfg: dict) -> str:
    """How clips reach the workers (``method.data.backend``):

    - ``stream``: Ray Datasets from the video data plane, streamed into the Ray Train workers
      (needs CPUs left over for Ray Data next to the training workers);
    - ``dataplane``: the same data plane (mp4 -> decord -> face crops, Parquet crop cache), the
      clips collected into arrays on the driver (small sets; for machines whose CPUs the
      training workers take entirely, where a stream would wait forever for a CPU);
    - ``memory``: in-process synthetic clips (``synth_clip_arrays``; no video files);
    - ``auto``: ``stream`` when the cluster has at least one CPU beyond the training workers',
      else ``dataplane``; ``memory`` when the data plane cannot be imported.
    """
    want = cfg["method"]["data"].get("backend", "auto")
    if want in ("stream", "dataplane", "memory"):
        if want == "memory" and external_source(cfg):
            raise ValueError("a dataset chosen with data=<name> needs backend stream or dataplane")
        return want
    if want != "auto":
        raise ValueError(f"method.data.backend must be auto, stream, dataplane or memory; got {want!r}")
    try:
        from trustlab.methods.video import synth_video  # noqa: F401  (needs the data plane: decord, pyarrow)
    except Exception:
        if external_source(cfg):
            raise
        return "memory"
    try:
        import ray

        if ray.is_initialized():
            t = cfg["trainer"]
            spare = ray.cluster_resources().get("CPU", 0) - int(t["num_workers"]) * float(t["cpus_per_worker"])
            return "stream" if spare >= 1 else "dataplane"
    except Exception:
        pass
    return "dataplane"


def collect(ds, keys=("x", "y", "vid", "clip", "manipulation")) -> dict:
    """A (small) Ray Dataset split as a dict of numpy arrays, rows in (video, clip) order: the
    decoding actors finish blocks in any order, and the trainer's seeded permutation repeats a run
    only if the rows it permutes arrive in one order."""
    parts = list(ds.iter_batches(batch_size=256, batch_format="numpy"))
    parts = [p for p in parts if len(p.get("y", ())) > 0]
    if not parts:
        raise ValueError("a video split produced no clips (all files bad or none listed)")
    out = {}
    for k in keys:
        if k in parts[0]:
            v = np.concatenate([np.asarray(p[k]) for p in parts])
            out[k] = v.astype(str) if v.dtype == object else v
    if "vid" in out and "clip" in out:  # the data plane's splits always carry both
        order = np.lexsort((out["clip"], out["vid"]))
        out = {k: v[order] for k, v in out.items()}
    return out


def _set_seed(cfg: dict, name: str) -> int:
    """Each set draws from its own seed, so the real videos of two sets differ too."""
    return int(cfg["seed"]) * 1000 + int(set_spec(cfg, name).get("seed_offset", 0))


def split_counts(n: int, fractions) -> dict:
    """Videos per class in train / val / test, rounded like the data plane does."""
    n_tr, n_va = int(round(fractions[0] * n)), int(round(fractions[1] * n))
    return {"train": n_tr, "val": n_va, "test": max(0, n - n_tr - n_va)}


def stream_config(cfg: dict, name: str, vid_offset: int = 0) -> dict:
    """The data-plane config (``trustlab.platform.data.video.DEFAULTS`` keys) of one set: the
    set's own entry (``name``, ``manifest``, ``root``, adapter keys ...; for a data group chosen
    on the command line, the whole group) with the method's sampling knobs over it
    (``frames_per_video``, ``clip_len``, ``size``: the model is built for them) and, for a
    generated set, the method's ``synth`` knobs."""
    d = cfg["method"]["data"]
    spec = set_spec(cfg, name)
    external = name == external_source(cfg) and name not in d["sets"]
    out = {} if external else {"root": d["root"], "cache": d.get("cache")}
    out.update(d.get("stream") or {})
    out.update({k: v for k, v in spec.items() if k not in ("manipulations", "seed_offset", "strength", "synth", "shift", "marker")})
    out.update(frames_per_video=int(d["frames_per_video"]), clip_len=int(d["clip_len"]), size=int(d["size"]),
               vid_offset=int(vid_offset))
    out.setdefault("name", "synth_video")
    if out["name"] == "synth_video" and not out.get("manifest"):
        synth = dict(spec.get("synth") or {})
        synth.update(n_videos_per_class=int(spec.get("n_videos_per_class", d["n_videos_per_class"])),
                     n_frames=int(d["n_frames"]), frame_size=int(d["frame_size"]),
                     strength=float(spec.get("strength", d.get("strength", 1.0))))
        if spec.get("manipulations"):
            synth["manipulations"] = list(spec["manipulations"])
        if spec.get("shift"):
            synth["shift"] = dict(spec["shift"])
        if spec.get("marker"):
            synth["marker"] = dict(spec["marker"])
        out["synth"] = synth
    return out


def _memory_set(cfg: dict, name: str, splits, vid_offset: int) -> dict:
    d = cfg["method"]["data"]
    spec = set_spec(cfg, name)
    if spec.get("manifest") or spec.get("name", "synth_video") != "synth_video":
        raise ValueError(f"set {name!r} is a real dataset: it needs method.data.backend=stream")
    counts = split_counts(int(spec.get("n_videos_per_class", d["n_videos_per_class"])),
                          d.get("split_fractions", (0.6, 0.2, 0.2)))
    return synth_clip_arrays(_set_seed(cfg, name), {s: counts[s] for s in splits}, list(spec["manipulations"]),
                             int(d["frames_per_video"]), int(d["clip_len"]), int(d["size"]),
                             float(spec.get("strength", d.get("strength", 1.0))), vid_offset=vid_offset,
                             shift=spec.get("shift"), marker=spec.get("marker"))


# The data plane's bad-file reports of the current run's sets (their actors, and any local S3
# server, must stay alive while datasets stream); build_video_data starts a fresh list.
_REPORTS: list = []


def _stream_set(cfg: dict, name: str, splits, vid_offset: int) -> dict:
    """Ray Datasets of one set through the data plane (streamed; decoded when iterated)."""
    from trustlab.platform.data.video import clip_datasets

    dsets, report = clip_datasets(stream_config(cfg, name, vid_offset), splits=tuple(splits), seed=_set_seed(cfg, name),
                                  s3_endpoint=cfg["run"].get("s3_endpoint"))
    _REPORTS.append((name, report))
    return dsets


def bad_file_summary() -> dict:
    """``{set: {"bad_files": [{uri, split, reason, count}], "stats": {split: counts}, "faces":
    [{split, uri, frames, detected, fallback, lost, coverage, low_coverage}]}}`` of the current
    run's streamed sets: what every split read so far (training workers included) could not
    decode, the frame/face counts per split (frames, faces found, fallbacks, lost tracks, videos
    under the track-coverage share) and the videos behind the face counts."""
    out = {}
    for name, rep in _REPORTS:
        got = rep._get()
        out[name] = {"bad_files": sorted(got["bad"], key=lambda b: (b["split"], b["uri"])), "stats": got["stats"],
                     "faces": sorted(got.get("faces", []), key=lambda r: (r["split"], r["uri"]))}
    return out


def bad_file_lines(summary: dict) -> list[str]:
    from trustlab.platform.data.video import face_count_text

    lines = []
    for name, rep in summary.items():
        bad = rep["bad_files"]
        per_split = {}
        for b in bad:
            per_split[b["split"]] = per_split.get(b["split"], 0) + 1
        lines.append(f"data {name}: {len(bad)} unreadable file(s)"
                     + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(per_split.items())) + ")" if bad else ""))
        lines.extend(f"  {b['split']}: {b['uri']} — {b['reason']}" for b in bad[:20])
        if len(bad) > 20:
            lines.append(f"  ... {len(bad) - 20} more in bad_files.json")
        for split, st in sorted(rep["stats"].items()):
            lines.append(f"  faces {split}: {st.get('frames', 0)} frames, " + face_count_text(st)
                         + (" (counts stored with the cached crops)" if st.get("cached") else ""))
        if rep.get("faces"):
            lines.append(f"  {len(rep['faces'])} video(s) with a face fallback, a lost track or low coverage: "
                         "named in face_issues.json")
    return lines


def stage_epochs(cfg: dict, stage: str) -> int:
    """``method.epochs.<stage>`` (null = ``trainer.epochs``): NACO's and LAST's per-stage budgets."""
    return int(cfg["method"]["epochs"].get(stage) or cfg["trainer"]["epochs"])


def stage_adamw(model, cfg: dict, stage: str):
    """AdamW over the trainable parameters at ``method.lr.<stage>`` (null = ``trainer.lr``)."""
    t = cfg["trainer"]
    lr = float(cfg["method"]["lr"].get(stage) or t["lr"])
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                             weight_decay=float(t["weight_decay"]))


def apply_batch_size(cfg: dict) -> None:
    """``method.batch_size`` (per worker; null = leave ``trainer.batch_size``) wins over the
    trainer group's default, which is sized for single images. Written into ``cfg`` before any
    stage starts, so the Ray Train workers (which get this ``cfg``) use it."""
    bs = cfg["method"].get("batch_size")
    if bs:
        cfg["trainer"]["batch_size"] = int(bs)


def build_video_data(cfg: dict, unlabelled_targets: bool = False) -> dict:
    """Splits of the cross-dataset protocol: ``train``/``val``/``test`` from the source set,
    ``target:<name>`` (test videos) for each target and, when ``unlabelled_targets``,
    ``unlabelled:<name>`` (the target's train videos; its labels are still attached here and must
    be removed by the stage that uses it, see ``mask_labels``)."""
    apply_batch_size(cfg)
    _REPORTS.clear()
    source, targets = protocol(cfg)
    how = backend(cfg)
    if how == "memory":
        load = _memory_set
    elif how == "stream":
        load = _stream_set
    else:
        def load(c, n, splits, off):
            return {k: collect(v) for k, v in _stream_set(c, n, splits, off).items()}
    print(f"[video] {how} data: source {source}, targets {targets}", flush=True)
    out = dict(load(cfg, source, ("train", "val", "test"), 0))
    for i, t in enumerate(targets):
        got = load(cfg, t, ("train", "test") if unlabelled_targets else ("test",), (i + 1) * 1_000_000)
        out[f"target:{t}"] = tag_domain(got["test"], i + 1)  # domain i = the protocol's i-th target
        if unlabelled_targets:
            out[f"unlabelled:{t}"] = got["train"]
    return out


def tag_domain(split, domain: int):
    """The split with a ``domain`` column (every other column kept): 0 is the source, i the i-th
    target; a method that standardises per domain reads it at evaluation, the others ignore it."""
    if isinstance(split, dict):
        return {**split, "domain": np.full(len(split["y"]), domain, np.int64)}
    return split.map_batches(lambda b: {**b, "domain": np.full(len(b["y"]), domain, np.int64)}, batch_format="numpy")


def real_only(split):
    """Keep label-0 (real) rows of a split (arrays or Dataset)."""
    if isinstance(split, dict):
        keep = np.asarray(split["y"]) == 0
        return {k: np.asarray(v)[keep] for k, v in split.items()}
    return split.filter(lambda row: int(row["y"]) == 0)


UNLABELLED = -1
TRAIN_COLUMNS = ("x", "vid", "clip")  # the only columns besides y / domain a mixed training split keeps


def _keep_columns(batch: dict, y, domain: int) -> dict:
    n = len(batch["x"])
    out = {k: np.asarray(batch[k]) for k in TRAIN_COLUMNS if k in batch}
    out["y"] = np.asarray(y, np.int64) if y is not None else np.full(n, UNLABELLED, np.int64)
    out["domain"] = np.full(n, domain, np.int64)
    return out


def mask_labels(split, domain: int = 1):
    """The split reduced to ``x, vid, clip``, with ``y`` = ``UNLABELLED`` (-1) for every row and
    a ``domain`` column. The labels and every column that could reveal them (``manipulation``,
    ``source``, ``video_id`` ...) are dropped, not renamed."""
    if isinstance(split, dict):
        return _keep_columns(split, None, domain)
    return split.map_batches(lambda b: _keep_columns(b, None, domain), batch_format="numpy")


def with_domain(split, domain: int = 0):
    """The labelled split reduced to the same columns as ``mask_labels`` (keeping ``y``)."""
    if isinstance(split, dict):
        return _keep_columns(split, split["y"], domain)
    return split.map_batches(lambda b: _keep_columns(b, b["y"], domain), batch_format="numpy")


def subsample(split, n: int, seed: int):
    """At most ``n`` rows of a split: a seeded random subset (arrays), or a seeded random sample of
    about that many rows (Dataset). The choice depends on the row count only, never on labels."""
    if isinstance(split, dict):
        m = len(split["x"])
        if m <= n:
            return split
        idx = np.sort(np.random.default_rng(seed).choice(m, n, replace=False))
        return {k: np.asarray(v)[idx] for k, v in split.items()}
    m = split.count()
    return split if m <= n else split.random_sample(n / m, seed=seed)


def concat_splits(a, b):
    """Rows of ``a`` then ``b`` (common keys only); arrays or Datasets (block order randomised)."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = [k for k in a if k in b]
        return {k: np.concatenate([np.asarray(a[k]), np.asarray(b[k])]) for k in keys}
    return a.union(b).randomize_block_order()


# ----------------------------------------------------------------------------- tensors
MEAN = torch.tensor([0.5, 0.5, 0.5]).view(1, 1, 3, 1, 1)
STD = torch.tensor([0.25, 0.25, 0.25]).view(1, 1, 3, 1, 1)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Clip batch in [0, 1] (B, T, 3, H, W) -> standardised."""
    return (x - MEAN.to(x.device, x.dtype)) / STD.to(x.device, x.dtype)


def augment_clip(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """Clip-consistent augmentation (the same for every frame of a clip, so it adds no temporal
    inconsistency): horizontal flip and brightness/contrast jitter per clip."""
    b = x.shape[0]
    dev = x.device
    flip = torch.rand(b, generator=gen).to(dev) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1, 1), x.flip(-1), x)
    gain = (1 + 0.2 * (torch.rand(b, generator=gen) - 0.5)).to(dev).view(b, 1, 1, 1, 1)
    bias = (0.1 * (torch.rand(b, generator=gen) - 0.5)).to(dev).view(b, 1, 1, 1, 1)
    return (x * gain + bias).clamp(0, 1)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float, extra_neg: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE: row i of ``a`` must pick row i of ``b`` among all rows of ``b`` (and, when given,
    its own row of ``extra_neg`` as a hard negative)."""
    a = F.normalize(a, dim=-1)
    b = F.normalize(b, dim=-1)
    logits = a @ b.t() / temperature
    if extra_neg is not None:
        hard = (a * F.normalize(extra_neg, dim=-1)).sum(-1, keepdim=True) / temperature
        logits = torch.cat([logits, hard], dim=1)
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))


class FrameTokens(torch.nn.Module):
    """Per-frame timm CNN -> spatial feature map -> 1x1 projection: ``(B, T, h*w, D)`` tokens.
    Random init unless ``weights`` (local, s3:// or timm:<tag>; loaded by trustlab.platform.weights)."""

    def __init__(self, cnn: str, out_index: int, dim: int, weights: str | None = None, cfg: dict | None = None):
        super().__init__()
        from trustlab.platform.weights import create_timm

        self.cnn = create_timm(cnn, weights, cfg, what="the per-frame CNN", features_only=True, out_indices=(out_index,))
        self.proj = torch.nn.Conv2d(self.cnn.feature_info.channels()[-1], dim, 1)
        self.reduction = self.cnn.feature_info.reduction()[-1]

    def grid(self, size: int) -> int:
        return int(math.ceil(size / self.reduction))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        f = self.proj(self.cnn(normalise(x).flatten(0, 1))[-1])  # (B*T, D, h, w)
        return f.flatten(2).transpose(1, 2).reshape(b, t, -1, f.shape[1])


TRANSFORMER_PARTS = ("blocks.", "norm.", "pos", "frame_embed", "mask_token")


def load_transformer(model: torch.nn.Module, cfg: dict, prefix: str = "") -> None:
    """``method.transformer_weights`` (a NACO or LAST checkpoint, or any file with their
    Transformer's tensors: blocks, norm, position / frame embeddings, mask token) into the
    Transformer of ``model`` whose parameters sit under ``prefix``; loud and strict like every
    load (trustlab.platform.weights)."""
    src = cfg["method"].get("transformer_weights")
    if src:
        from trustlab.platform.weights import load_into

        load_into(model, src, cfg, include=tuple(prefix + p for p in TRANSFORMER_PARTS),
                  what=f"the {cfg['method']['name']} Transformer")


def clip_summary(h: torch.Tensor) -> torch.Tensor:
    """(B, T, P, D) spatiotemporal representation -> (B, 2D): its mean over frames and
    positions, and the mean absolute change of each position's token between consecutive frames
    (what shuffling the frames or per-frame forgery flicker disturbs; zeros for one frame)."""
    mean = h.mean((1, 2))
    if h.shape[1] < 2:
        return torch.cat([mean, torch.zeros_like(mean)], -1)
    return torch.cat([mean, (h[:, 1:] - h[:, :-1]).abs().mean((1, 2))], -1)


# ----------------------------------------------------------------------------- plain-PyTorch runner
def local_fit(method, cfg: dict, data: dict, stages=None, epochs: int | None = None, seed: int = 0,
              init_state: dict | None = None, log=None):
    """Train ``stages`` in one process through the platform's own loop (``run_epochs`` on a
    local ``WorkerContext``: one worker, no Ray, no per-epoch validation); the last epoch's model
    goes on to the next stage. For tests and benchmarks. Returns
    ``(model, {stage: [mean train loss parts per epoch]})``."""
    method = as_bound(method)
    from trustlab.platform.train import WorkerContext, run_epochs

    apply_batch_size(cfg)
    cfg = {**cfg, "seed": int(seed)}
    history = {}
    state = init_state
    model = None
    for stage in list(stages or method.stages(cfg)):
        ctx = WorkerContext.local(cfg, stage, method.stage_data(cfg, stage, data), epochs=epochs, init_from=state)
        model = run_epochs(ctx)
        history[stage] = [{k[len("train_"):]: v for k, v in m.items() if k.startswith("train_") and k != "train_seconds"}
                          for m in ctx.history]
        if log:
            for ep, h in enumerate(history[stage]):
                log(stage, ep, h)
        state = model.state_dict()
    return model, history


def score(method, model, split: dict, cfg: dict, bs: int = 64) -> np.ndarray:
    method = as_bound(method)
    model.eval()
    out = []
    with torch.no_grad():
        for b in iter_array_batches(split, bs):
            out.append(method.predict(model, method.to_batch(b), cfg).float().cpu().numpy().reshape(-1))
    return np.concatenate(out)


# ----------------------------------------------------------------------------- after_train report
def _short(m: dict) -> dict:
    return {lvl: {k: m[lvl][k] for k in ("auc", "ap", "eer", "acc", "n")} for lvl in ("clip", "video")}


def evaluate_protocol(method, model, data: dict, cfg: dict) -> dict:
    """``{"test": in-domain metrics, "cross_domain": {target: metrics}}`` (clip and video level)."""
    from trustlab.platform.evaluate import evaluate_split

    out = {"cross_domain": {}}
    if "test" in data:
        out["test"] = _short(evaluate_split(method, model, data["test"], cfg)[0])
    for k, split in data.items():
        if k.startswith("target:"):
            out["cross_domain"][k.split(":", 1)[1]] = _short(evaluate_split(method, model, split, cfg)[0])
    return out


def run_ablations(method, cfg: dict, model, data: dict, run_dir: str) -> dict:
    """Train every variant of ``method.ablation.variants`` through the same Ray Train stages as
    the main run (same data, seed and epochs; only the variant's overrides differ) and evaluate
    it in-domain and cross-domain. A variant may retrain only some ``stages``, initialised from
    the main model's parameters whose names start with ``init_prefix`` (``ablation.inherited_state``)."""
    method = as_bound(method)
    from trustlab.platform import checkpoints as ck
    from trustlab.platform.train import fit_stages, load_model

    out = {}
    for variant, spec in ablation.variants(cfg).items():
        kind = ablation.kind_of(spec)  # a misspelt kind fails before anything trains
        cfg2 = ablation.variant_config(cfg, spec)
        stages = list(spec.get("stages") or method.stages(cfg2))
        keep = ablation.inherited_state(model, spec)
        print(f"[ablation] {variant}: stages {stages}, overrides {spec.get('overrides')}", flush=True)
        with ck.staged_state(keep) as init_from:
            _, _, last = fit_stages(cfg2, stages, data, f"{cfg['run']['name']}-abl-{variant}", run_dir, init_from=init_from)
        state = ck.load_state(last, cfg["run"].get("s3_endpoint"))
        _, m2 = load_model(cfg2, state)
        res = evaluate_protocol(method, m2, data, cfg2)
        res["overrides"] = dict(spec.get("overrides") or {})
        res["what"] = spec.get("what", "")
        res["kind"] = kind
        out[variant] = res
    return out


def video_report(method, cfg: dict, model, data: dict, run_dir: str) -> dict:
    """The ``after_train`` entries shared by the video methods: protocol, cross-domain metrics,
    robustness sweep (table + plot), ablation runs; also prints and writes ``video_summary.txt``."""
    method = as_bound(method)
    from trustlab.methods.video import robustness
    from trustlab.platform.train import write_json

    source, targets = protocol(cfg)
    model.eval()
    full = evaluate_protocol(method, model, data, cfg)
    out = {"protocol": {"source": source, "targets": targets, "backend": backend(cfg),
                        "sets": {n: set_spec(cfg, n) for n in [source, *targets]}},
           "cross_domain": full["cross_domain"]}
    rb = cfg["method"].get("robustness", {}) or {}
    if rb.get("enabled", True) and "test" in data:
        levels = rb.get("levels") or robustness.DEFAULT_LEVELS
        res = robustness.sweep(method, model, data["test"], cfg, run_dir, levels=levels, prefix="robustness",
                               seed=int(cfg["seed"]), title=f"{cfg['method']['name']}: robustness on {source} test")
        out["robustness"] = {"split": f"test ({source})", "table": os.path.basename(res["csv"]),
                             "plot": os.path.basename(res["png"]), "rows": res["rows"]}
    if ablation.variants(cfg):
        if cfg.get("mode") == "train":
            out["ablation"] = run_ablations(method, cfg, model, data, run_dir)  # the main model's own figures: test, cross_domain
        else:
            out["ablation"] = {"skipped": f"ablations are trained in mode=train only (mode={cfg.get('mode')})"}
    data_lines = []
    if _REPORTS:  # streamed sets: bad files and face counts of every split read, training included
        errors = bad_file_summary()
        data_lines = bad_file_lines(errors)
        # counts per split in metrics.json; the names of the videos behind them in the run folder
        write_json(os.path.join(run_dir, "face_issues.json"), {n: e.pop("faces") for n, e in errors.items()})
        out["data_errors"] = errors
        write_json(os.path.join(run_dir, "bad_files.json"), errors)
    lines = summary_lines(out, full) + data_lines
    with open(os.path.join(run_dir, "video_summary.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    out["summary_lines"] = lines
    return out


def summary_lines(out: dict, full: dict) -> list[str]:
    def fmt(m):
        return f"clip AUC {m['clip']['auc']:.4f}  video AUC {m['video']['auc']:.4f}"

    p = out["protocol"]
    lines = [f"protocol: train on {p['source']}, cross-domain test on {', '.join(p['targets']) or '-'} ({p['backend']} data)"]
    for t, m in out["cross_domain"].items():
        lines.append(f"cross-domain {t}: {fmt(m)}")
    if "robustness" in out:
        last, worst = {}, {}  # rows follow the configured levels, mildest first: the last is the strongest
        for r in out["robustness"]["rows"]:
            if r["kind"] == "clean":
                continue
            last[r["kind"]] = (r["level"], r["video_auc"])
            if r["kind"] not in worst or r["video_auc"] < worst[r["kind"]][1]:
                worst[r["kind"]] = (r["level"], r["video_auc"])
        lines.append("robustness, video AUC at the strongest level (lowest over levels): " + ", ".join(
            f"{k}@{last[k][0]:g} {last[k][1]:.3f} ({worst[k][1]:.3f} @{worst[k][0]:g})" for k in last)
            + f"  -> {out['robustness']['table']}, {out['robustness']['plot']}")
    for v, r in (out.get("ablation") or {}).items():
        if isinstance(r, dict) and "test" in r:
            cd = "; ".join(f"{t} {m['video']['auc']:.4f}" for t, m in r["cross_domain"].items())
            lines.append(f"{r.get('kind', 'ablation')} {v}: in-domain {fmt(r['test'])}; cross-domain video AUC {cd or '-'}")
        elif isinstance(r, str):
            lines.append(f"ablation: {r}")
    return lines


def frames_to_clip(images: list, cfg: dict) -> torch.Tensor:
    """Decoded RGB uint8 frames (HxWx3, face crops) -> ``(1, T, 3, S, S)`` float clip: resized to
    ``method.data.size``, ``method.data.clip_len`` frames sampled uniformly (repeated if fewer)."""
    import cv2

    d = cfg["method"]["data"]
    s, t = int(d["size"]), int(d["clip_len"])
    idx = np.linspace(0, len(images) - 1, t).round().astype(int)
    fr = [cv2.resize(np.asarray(images[i]), (s, s), interpolation=cv2.INTER_AREA) for i in idx]
    return torch.from_numpy(np.stack(fr).transpose(0, 3, 1, 2)).float().div_(255.0).unsqueeze(0)

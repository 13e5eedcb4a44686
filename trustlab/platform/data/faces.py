"""Face boxes for clips: detection, enlargement, largest face, temporal smoothing, fallback counts.

The detector is OpenCV's frontal-face Haar cascade, which ships inside the ``opencv-python``
wheels (``cv2.data.haarcascades``) and needs no download. OpenCV 5 dropped the cascades and
``CascadeClassifier``, so this module needs ``opencv-python-headless < 5``; it fails with a message
saying so rather than silently cropping the centre.

Per clip (``track_clip``):

1. detect the face in every sampled frame: near the last detected face (the cascade on a small
   window around it, for faces of similar size: a few milliseconds whatever the resolution);
   on the whole frame, downscaled to ``detect_width``, while no face is known yet or after
   ``redetect_after`` consecutive misses near it;
2. on a whole-frame pass keep the largest face;
3. a frame without a face falls back to the previous frame's box (or, before the first detection,
   the next detected box); a clip with no detection at all falls back to a centre crop. Each
   fallback is counted (``ClipStats``) — no frame is dropped and none is replaced silently;
4. smooth the boxes across the clip (centred moving average of centre and side over ``smooth``
   frames) so crops are temporally stable;
5. enlarge the square box by ``scale`` (1.3 by default, the usual margin around the face in
   FaceForensics++-style pipelines), shift it inside the frame, crop and resize to ``size``.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

CASCADE = "haarcascade_frontalface_default.xml"


def cascade_path(name: str = CASCADE) -> str:
    import cv2

    base = getattr(getattr(cv2, "data", None), "haarcascades", None)
    path = os.path.join(base, name) if base else ""
    if not hasattr(cv2, "CascadeClassifier") or not path or not os.path.exists(path):
        raise RuntimeError(
            f"OpenCV {cv2.__version__} has no bundled Haar cascade {name!r} (OpenCV 5 removed them); "
            "install opencv-python-headless<5 (e.g. 4.14.0.94)")
    return path


class FaceDetector:
    """Haar-cascade face detector returning ``(x, y, w, h)`` boxes in the input frame's pixels.

    ``detect_width``: frames wider than this are downscaled before detection (speed; the boxes
    are scaled back). ``min_face_frac``: smallest face side as a fraction of the detection
    frame's shorter side. ``scale_factor``/``min_neighbors``: the cascade's own knobs."""

    def __init__(self, detect_width: int = 640, scale_factor: float = 1.1, min_neighbors: int = 5,
                 min_face_frac: float = 0.06, cascade: str = CASCADE, relaxed_neighbors: int | None = None):
        import cv2

        self._cv2 = cv2
        self.clf = cv2.CascadeClassifier(cascade_path(cascade))
        if self.clf.empty():
            raise RuntimeError(f"could not load Haar cascade {cascade}")
        self.detect_width = int(detect_width)
        self.scale_factor = float(scale_factor)
        self.min_neighbors = int(min_neighbors)
        self.min_face_frac = float(min_face_frac)
        self.relaxed_neighbors = None if relaxed_neighbors is None else int(relaxed_neighbors)

    def detect(self, frame: np.ndarray) -> np.ndarray:
        """All faces of one RGB (H, W, 3) uint8 frame as an (n, 4) float array ``x, y, w, h``.

        With ``relaxed_neighbors`` (< ``min_neighbors``), a frame where no candidate cluster reaches
        ``min_neighbors`` returns the clusters reaching ``relaxed_neighbors`` instead, from the same
        cascade pass (its raw windows are grouped twice, as ``detectMultiScale`` groups them): a
        marginal face costs no second whole-frame pass on the next frame. ``detect_near`` does the
        same around a known face."""
        cv2 = self._cv2
        h, w = frame.shape[:2]
        f = 1.0
        img = frame
        if self.detect_width and w > self.detect_width:
            f = self.detect_width / w
            img = cv2.resize(frame, (self.detect_width, max(1, int(round(h * f)))), interpolation=cv2.INTER_AREA)
        gray = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)
        gray = cv2.equalizeHist(gray)
        ms = max(12, int(self.min_face_frac * min(gray.shape)))
        boxes = self._cascade(gray, minSize=(ms, ms))
        if len(boxes) == 0:
            return np.zeros((0, 4), np.float64)
        return np.asarray(boxes, np.float64) / f

    def _cascade(self, gray: np.ndarray, **size) -> np.ndarray:
        """One cascade pass; clusters of >= min_neighbors windows, else (``relaxed_neighbors``) of >=
        relaxed_neighbors windows from the same raw windows (grouped as ``detectMultiScale`` does)."""
        relaxed = self.relaxed_neighbors
        if relaxed is None or relaxed >= self.min_neighbors:
            return self.clf.detectMultiScale(gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
                                             **size)
        raw = [list(map(int, r)) for r in self.clf.detectMultiScale(gray, scaleFactor=self.scale_factor,
                                                                     minNeighbors=0, **size)]
        boxes = ()
        for k in (self.min_neighbors, relaxed):
            boxes, _ = self._cv2.groupRectangles(raw, k, 0.2) if raw else ((), None)
            if len(boxes):
                break
        return boxes

    def detect_near(self, frame: np.ndarray, square, roi_scale: float = 2.0, norm: int = 96) -> np.ndarray:
        """Faces near a known face ``(cx, cy, side)``: the cascade runs on the surrounding
        ``roi_scale`` x side window rescaled to ``norm`` pixels, for faces of 0.6-1.6 x the known
        side. Much cheaper than a full-frame pass; same output format as ``detect``."""
        cv2 = self._cv2
        h, w = frame.shape[:2]
        cx, cy, side = (float(v) for v in square)
        r = roi_scale * side
        x0, y0 = max(0, int(cx - r / 2)), max(0, int(cy - r / 2))
        x1, y1 = min(w, int(np.ceil(cx + r / 2))), min(h, int(np.ceil(cy + r / 2)))
        if x1 - x0 < 8 or y1 - y0 < 8:
            return np.zeros((0, 4), np.float64)
        f = norm / float(max(x1 - x0, y1 - y0))
        roi = cv2.resize(np.ascontiguousarray(frame[y0:y1, x0:x1]),
                         (max(1, int(round((x1 - x0) * f))), max(1, int(round((y1 - y0) * f)))),
                         interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)
        gray = cv2.equalizeHist(cv2.cvtColor(roi, cv2.COLOR_RGB2GRAY))
        lo, hi = max(20, int(0.6 * side * f)), int(np.ceil(1.6 * side * f))
        if lo > min(gray.shape):
            return np.zeros((0, 4), np.float64)
        boxes = self._cascade(gray, minSize=(lo, lo), maxSize=(hi, hi))
        if len(boxes) == 0:
            return np.zeros((0, 4), np.float64)
        b = np.asarray(boxes, np.float64) / f
        b[:, 0] += x0
        b[:, 1] += y0
        return b


def largest(boxes: np.ndarray):
    """The largest-area box of an (n, 4) array, or None."""
    if boxes is None or len(boxes) == 0:
        return None
    b = np.asarray(boxes, np.float64)
    return b[int(np.argmax(b[:, 2] * b[:, 3]))]


def to_square(box) -> np.ndarray:
    """(x, y, w, h) -> (cx, cy, side) with side = max(w, h)."""
    x, y, w, h = (float(v) for v in box)
    return np.array([x + w / 2, y + h / 2, max(w, h)], np.float64)


def enlarge(square, scale: float, width: int, height: int) -> tuple[int, int, int, int]:
    """Square ``(cx, cy, side)`` enlarged by ``scale``, shifted (not shrunk) to lie inside a
    ``width`` x ``height`` frame where possible; returns integer ``(x0, y0, x1, y1)``."""
    cx, cy, side = (float(v) for v in square)
    s = min(side * float(scale), float(min(width, height)))
    s = max(s, 2.0)
    x0 = min(max(cx - s / 2, 0.0), width - s)
    y0 = min(max(cy - s / 2, 0.0), height - s)
    x0i, y0i = int(round(x0)), int(round(y0))
    si = int(round(s))
    return x0i, y0i, min(width, x0i + si), min(height, y0i + si)


def centre_square(width: int, height: int, frac: float = 0.6) -> np.ndarray:
    """Fallback box: a centred square of ``frac`` times the shorter side (before enlargement)."""
    return np.array([width / 2, height / 2, frac * min(width, height)], np.float64)


def smooth_squares(squares: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average (edge-padded) of ``(cx, cy, side)`` over ``window`` frames."""
    sq = np.asarray(squares, np.float64)
    if window is None or int(window) <= 1 or len(sq) <= 1:
        return sq.copy()
    k = int(window)
    left, right = k // 2, k - 1 - k // 2
    padded = np.concatenate([np.repeat(sq[:1], left, 0), sq, np.repeat(sq[-1:], right, 0)])
    c = np.cumsum(np.concatenate([np.zeros((1, 3)), padded]), axis=0)
    return (c[k:] - c[:-k]) / k


@dataclasses.dataclass
class ClipStats:
    """What happened to the frames of one clip (or, summed, of a run)."""

    frames: int = 0            # frames cropped
    detected: int = 0          # frames where the detector found a face
    fallback_prev: int = 0     # frames that reused a neighbouring frame's box
    fallback_centre: int = 0   # frames cropped at the centre (no face anywhere in the clip)
    last_face = None           # (cx, cy, side) of the clip's last detection (not a field: not summed)

    @property
    def fallback(self) -> int:
        return self.fallback_prev + self.fallback_centre

    def add(self, other: "ClipStats") -> "ClipStats":
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["fallback"] = self.fallback
        return d


def fill_missing(squares: list, width: int, height: int) -> tuple[np.ndarray, ClipStats]:
    """Replace ``None`` entries: previous box, else the next detected box (leading gap), else
    a centre square when the clip has no detection. Returns the (T, 3) array and the counts."""
    st = ClipStats(frames=len(squares))
    known = [i for i, s in enumerate(squares) if s is not None]
    st.detected = len(known)
    out = np.zeros((len(squares), 3), np.float64)
    if not known:
        out[:] = centre_square(width, height)
        st.fallback_centre = len(squares)
        return out, st
    prev = squares[known[0]]
    for i, s in enumerate(squares):
        if s is None:
            st.fallback_prev += 1
            out[i] = prev
        else:
            out[i] = prev = s
    return out, st


def crop_resize(frame: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    import cv2

    x0, y0, x1, y1 = box
    crop = frame[y0:y1, x0:x1]
    if crop.size == 0:
        crop = frame
    interp = cv2.INTER_AREA if crop.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=interp)


def track_clip(frames: np.ndarray, detector: FaceDetector | None, size: int, scale: float = 1.3,
               smooth: int = 5, boxes: list | None = None, track: bool = True,
               start=None, redetect_after: int = 2) -> tuple[np.ndarray, np.ndarray, ClipStats]:
    """Face crops of one clip. ``frames``: (T, H, W, 3) uint8 RGB. Returns ``(crops (T, size,
    size, 3) uint8, boxes (T, 4) int x0 y0 x1 y1, stats)``. ``boxes`` (optional) gives
    precomputed detections per frame (an (n, 4) array each), else ``detector`` is run on every
    frame: with ``track`` (default) near the last detected face (``detect_near``); on the whole
    frame (largest face) while no face is known, and after ``redetect_after`` consecutive misses
    near it (a miss in between falls back to the previous box and is counted). ``start``: a face
    ``(cx, cy, side)`` to look near in the first frame (e.g. the previous clip's last); a miss
    there goes straight to a whole-frame pass."""
    t, h, w = frames.shape[:3]
    squares = []
    last = None if start is None else np.asarray(start, np.float64)
    # a start hint comes from another moment of the video (the previous clip): one miss near it is
    # enough to look at the whole frame
    misses = 0 if start is None else max(0, int(redetect_after) - 1)
    for i in range(t):
        if boxes is not None:
            b = largest(boxes[i])
        elif track and last is not None:
            b = largest(detector.detect_near(frames[i], last))
            if b is None and misses + 1 >= redetect_after:
                b = largest(detector.detect(frames[i]))
        else:
            b = largest(detector.detect(frames[i]))
        squares.append(None if b is None else to_square(b))
        if b is not None:
            last, misses = squares[-1], 0
        else:
            misses += 1
    found = [q for q in squares if q is not None]
    st_last = found[-1] if found else None
    sq, st = fill_missing(squares, w, h)
    st.last_face = st_last
    sq = smooth_squares(sq, smooth)
    crops = np.empty((t, size, size, 3), np.uint8)
    out_boxes = np.empty((t, 4), np.int64)
    for i in range(t):
        bx = enlarge(sq[i], scale, w, h)
        out_boxes[i] = bx
        crops[i] = crop_resize(frames[i], bx, size)
    return crops, out_boxes, st

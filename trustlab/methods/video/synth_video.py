"""A synthetic face-video forgery set, written as real H.264 mp4 files (PyAV / libx264).

Faces come from real photos that ship with the project or its packages: scikit-image's
``astronaut``, the six faces of ``../shared/data/real/multiface.jpg`` and the portraits in
``../shared/data/real/faces/*.jpg`` (located with the Haar cascade of `trustlab.platform.data.faces`). When
the shared folder is absent only the astronaut is used, and the face swaps (``blend``, ``warp``),
which need a second identity, are refused.

**Real** videos animate one face photo with smooth, natural camera/head motion: a slow drift of
the face across the frame, a small in-plane rotation and zoom (each the sum of two sinusoids with
random phase and 0.3-1.2 cycles per video) and a slow brightness drift. Every frame of both
classes gets the same mild sensor noise, so noise by itself carries no label.

**Fake** videos start from a real video of the same kind and alter the face region in each
frame, with inconsistencies that are independent from frame to frame (what temporal detectors
look for) and a visible blending boundary (what frame detectors look for):

- ``blend``  — face swap: another identity's face, rendered with the same motion, is pasted with
  a feathered elliptical mask whose centre, axes and feather width jitter per frame; the donor's
  colours are only partly matched to the target and get a per-frame gain flicker.
- ``warp``   — face swap whose donor face is additionally resampled at half resolution and
  jittered per frame by a small independent affine (rotation, scale, shift): geometric
  inconsistency inside the face.
- ``color``  — the target's own face (reenactment-like, no identity change) with a per-frame
  colour/saturation flicker inside a slightly jittered mask.
- ``texture``— the target's own face re-rendered at a per-frame varying low resolution (blur that
  flickers), like neural-texture rendering.

A set may also carry a **marker** (``marker``: fakes only): in one random frame of every block
of ``every`` frames a flat square of colour ``rgb`` sits at a fixed place on the face (offset
``at`` from the face centre, side ``side``, both in face sides). It is a planted shortcut: a
local, single-frame cue that gives the label away on its own, so a detector can fit the training
set without learning the manipulation. Spatiotemporal dropout hides it in a share of the fake
clips: STDT's default source carries one (its YAML and docs/results.md say why).

``strength`` scales every inconsistency (1.0 = default; 0 would make fakes that differ from real
videos by the blending only). Videos are assigned to splits by index (``split_fractions``), each
split holding every manipulation type, so a cross-manipulation protocol can train on some types
and test on others by filtering the ``manipulation`` column. Identities are shared across splits
(there are only ~11 faces); the motion and the donors differ.

Deterministic by ``seed``: the frames of video ``i`` depend only on ``(seed, i)`` and the
parameters; the encoder runs single-threaded. The set is cached under ``root`` by a hash of its
parameters: ``<root>/synth_video-<hash>/manifest.csv`` and ``videos/<split>/<video_id>.mp4``.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import shutil

import numpy as np
import pandas as pd

MANIPULATIONS = ("blend", "warp", "color", "texture")
SWAPS = ("blend", "warp")  # manipulations that paste another identity's face


def shared_real_dir() -> str | None:
    """The real test files (``data/real`` of the shared folder): ``$TRUSTLAB_SHARED/data/real``
    when that variable is set, else ``../shared/data/real`` beside the repository (where CI and
    the sessions keep it); None when neither exists (the generated sets then use scikit-image's
    astronaut only)."""
    if os.environ.get("TRUSTLAB_SHARED"):
        d = os.path.join(os.environ["TRUSTLAB_SHARED"], "data", "real")
        return d if os.path.isdir(d) else None
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    d = os.path.join(os.path.dirname(repo), "shared", "data", "real")
    return d if os.path.isdir(d) else None


def require_donors(n_faces: int, manipulation: str) -> None:
    """A face swap pastes another identity: with one real face (scikit-image's astronaut alone, the
    shared faces missing) there is none, and a face blended with itself is not the planted artefact."""
    if n_faces < 2:
        raise ValueError(f"{manipulation!r} videos need at least two real faces and found {n_faces} (scikit-image's "
                         "astronaut): put the shared data's faces where $TRUSTLAB_SHARED/data/real or "
                         "../shared/data/real beside the repository holds them")


def _load_rgb(path: str) -> np.ndarray:
    import cv2

    im = cv2.imread(path, cv2.IMREAD_COLOR)
    if im is None:
        raise IOError(f"cannot read image {path}")
    return cv2.cvtColor(im, cv2.COLOR_BGR2RGB)


@functools.lru_cache(maxsize=4)
def face_patches(patch_size: int = 256) -> tuple:
    """``((name, patch), ...)``: square RGB float32 patches of side ``patch_size`` centred on
    one face each, the face's box side being ``patch_size / 3`` (borders replicated)."""
    import cv2
    import skimage.data

    from trustlab.platform.data.faces import FaceDetector, largest

    det = FaceDetector(detect_width=1024, scale_factor=1.1, min_neighbors=6, min_face_frac=0.05)
    photos = [("astronaut", skimage.data.astronaut(), "largest")]
    d = shared_real_dir()
    if d:
        if os.path.exists(os.path.join(d, "multiface.jpg")):
            photos.append(("multiface", _load_rgb(os.path.join(d, "multiface.jpg")), "all"))
        for p in sorted(glob.glob(os.path.join(d, "faces", "*.jpg"))):
            photos.append((os.path.splitext(os.path.basename(p))[0], _load_rgb(p), "largest"))
    out = []
    for name, img, which in photos:
        boxes = det.detect(img).boxes
        if len(boxes) == 0:
            continue
        if which == "largest":
            boxes = [largest(boxes)]
        else:
            big = max(b[2] for b in boxes)
            boxes = sorted([b for b in boxes if b[2] >= 0.8 * big], key=lambda b: (b[0], b[1]))
        for j, (x, y, w, h) in enumerate(boxes):
            side = max(w, h)
            cx, cy = x + w / 2, y + h / 2
            half = 1.5 * side
            pad = int(np.ceil(half)) + 2
            big_img = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
            x0, y0 = int(round(cx - half)) + pad, int(round(cy - half)) + pad
            crop = big_img[y0 : y0 + int(round(2 * half)), x0 : x0 + int(round(2 * half))]
            patch = cv2.resize(crop, (patch_size, patch_size), interpolation=cv2.INTER_AREA)
            out.append((f"{name}{j if which == 'all' else ''}", patch.astype(np.float32)))
    if not out:
        raise RuntimeError("no face found in the source photos")
    return tuple(out)


def _smooth_path(rng, n: int, amp: float) -> np.ndarray:
    """Sum of two sinusoids, 0.3-1.2 cycles over ``n`` frames, peak amplitude about ``amp``."""
    t = np.arange(n) / max(1, n)
    out = np.zeros(n)
    for a in (0.65, 0.35):
        f = rng.uniform(0.3, 1.2)
        out += a * amp * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    return out


def camera_track(rng, n: int, size: int) -> dict:
    """Per-frame camera parameters (smooth): offset of the face in output pixels, rotation (deg),
    zoom, brightness gain."""
    return dict(dx=_smooth_path(rng, n, 0.07 * size), dy=_smooth_path(rng, n, 0.05 * size),
                rot=_smooth_path(rng, n, 5.0), zoom=1.0 + _smooth_path(rng, n, 0.06),
                gain=1.0 + _smooth_path(rng, n, 0.05), face_frac=rng.uniform(0.40, 0.48))


def _affine(patch_size: int, size: int, cam: dict, t: int, extra=(0.0, 1.0, 0.0, 0.0)) -> np.ndarray:
    """dst->src 2x3 matrix: output pixel -> patch pixel. ``extra`` = (rot deg, scale, dx, dy)
    applied to the face only (used for the per-frame jitter of ``warp``)."""
    fs = patch_size / 3.0
    face_out = cam["face_frac"] * size * cam["zoom"][t] * extra[1]
    k = fs / face_out
    th = np.deg2rad(cam["rot"][t] + extra[0])
    r = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]) * k
    c_o = np.array([size / 2 + cam["dx"][t] + extra[2], size / 2 + cam["dy"][t] + extra[3]])
    c_p = np.array([patch_size / 2, patch_size / 2])
    return np.hstack([r, (c_p - r @ c_o)[:, None]])


def _render(patch: np.ndarray, size: int, cam: dict, t: int, extra=(0.0, 1.0, 0.0, 0.0)) -> np.ndarray:
    import cv2

    m = _affine(patch.shape[0], size, cam, t, extra)
    return cv2.warpAffine(patch, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def _face_geom(size: int, cam: dict, t: int) -> tuple[float, float, float]:
    """Face centre (x, y) and box side in output pixels at frame ``t``."""
    return (size / 2 + cam["dx"][t], size / 2 + cam["dy"][t], cam["face_frac"] * size * cam["zoom"][t])


def _ellipse_mask(size: int, cx: float, cy: float, ax: float, ay: float, rot: float, feather: float) -> np.ndarray:
    import cv2

    m = np.zeros((size, size), np.float32)
    cv2.ellipse(m, (int(round(cx * 4)), int(round(cy * 4))), (max(1, int(round(ax * 4))), max(1, int(round(ay * 4)))),
                rot, 0, 360, 1.0, -1, lineType=cv2.LINE_AA, shift=2)
    if feather > 0:
        m = cv2.GaussianBlur(m, (0, 0), feather)
    return m[..., None]


def _colour_match(src: np.ndarray, ref: np.ndarray, mask: np.ndarray, amount: float) -> np.ndarray:
    """Move ``src``'s per-channel mean/std inside ``mask`` a fraction ``amount`` toward ``ref``'s."""
    w = mask[..., 0] > 0.5
    if w.sum() < 10:
        return src
    s, r = src[w], ref[w]
    ms, ss = s.mean(0), s.std(0) + 1e-3
    mr, sr = r.mean(0), r.std(0) + 1e-3
    full = (src - ms) * (sr / ss) + mr
    return (1 - amount) * src + amount * full


MARKER_DEFAULTS = {"every": 8, "side": 0.3, "at": (0.22, 0.2), "rgb": (0, 255, 0)}


def marker_spec(marker: dict | None) -> dict | None:
    """A set's ``marker`` with its defaults filled in (None: no marker); unknown keys are refused."""
    if not marker:
        return None
    bad = set(marker) - set(MARKER_DEFAULTS)
    if bad:
        raise ValueError(f"unknown marker keys {sorted(bad)}; known: {sorted(MARKER_DEFAULTS)}")
    out = {**MARKER_DEFAULTS, **marker}
    if int(out["every"]) < 1:
        raise ValueError(f"marker.every must be >= 1, got {out['every']}")
    return out


def marker_frames(rng: np.random.Generator, n_frames: int, marker: dict) -> set:
    """One frame drawn in every block of ``marker['every']`` frames (the blocks a video's clips are cut into)."""
    e = int(marker["every"])
    return {int(b + rng.integers(min(e, n_frames - b))) for b in range(0, n_frames, e)}


def paint_marker(img: np.ndarray, cx: float, cy: float, face_side: float, marker: dict) -> np.ndarray:
    """``img`` (H, W, 3, float) with the marker's square painted at its place on the face centred at (cx, cy)."""
    half = 0.5 * float(marker["side"]) * face_side
    x, y = cx + float(marker["at"][0]) * face_side, cy + float(marker["at"][1]) * face_side
    h, w = img.shape[:2]
    x0, x1 = max(0, int(round(x - half))), min(w, int(round(x + half)))
    y0, y1 = max(0, int(round(y - half))), min(h, int(round(y + half)))
    out = np.array(img, dtype=np.float32, copy=True)
    out[y0:y1, x0:x1] = np.asarray(marker["rgb"], np.float32)
    return out


def render_video(rng: np.random.Generator, target: np.ndarray, donor: np.ndarray | None, manipulation: str,
                 n_frames: int, size: int, strength: float = 1.0, marker: dict | None = None) -> np.ndarray:
    """(n_frames, size, size, 3) uint8 frames of one video (``manipulation='none'`` = real;
    ``marker``: see the module docstring, painted on fakes only)."""
    import cv2

    cam = camera_track(rng, n_frames, size)
    marker = marker_spec(marker) if manipulation != "none" else None
    marked = marker_frames(rng, n_frames, marker) if marker else set()
    s = float(strength)
    frames = np.empty((n_frames, size, size, 3), np.uint8)
    match = rng.uniform(0.4, 0.7)  # how far a donor's colours are matched to the target
    tint = 1.0 + rng.normal(0, 0.05 * s, 3)  # per-video colour mismatch of the pasted face
    for t in range(n_frames):
        base = _render(target, size, cam, t)
        out = base
        if manipulation != "none":
            cx, cy, side = _face_geom(size, cam, t)
            j = lambda sd: rng.normal(0, sd * s)  # noqa: E731 - per-frame jitter draw
            ax, ay = 0.42 * side, 0.56 * side
            if manipulation in SWAPS:
                if manipulation == "warp":
                    extra = (j(3.0), 1.0 + j(0.04), j(0.02 * side), j(0.02 * side))
                    face = _render(donor, size, cam, t, extra)
                    small = cv2.resize(face, (size // 2, size // 2), interpolation=cv2.INTER_AREA)
                    face = cv2.resize(small, (size, size), interpolation=cv2.INTER_LINEAR)
                    mask = _ellipse_mask(size, cx, cy, ax, ay, cam["rot"][t], 2.0)
                else:
                    face = _render(donor, size, cam, t)
                    mask = _ellipse_mask(size, cx + j(0.03 * side), cy + j(0.03 * side), ax * (1 + j(0.06)),
                                         ay * (1 + j(0.06)), cam["rot"][t] + j(3.0), rng.uniform(1.0, 1.0 + 2.0 * s))
                face = _colour_match(face, base, mask, match)
                face = face * (tint * (1.0 + rng.normal(0, 0.03 * s, 3)))
            elif manipulation == "color":
                mask = _ellipse_mask(size, cx + j(0.015 * side), cy + j(0.015 * side), ax, ay, cam["rot"][t], 1.5)
                g = 1.0 + rng.normal(0, 0.06 * s, 3)
                grey = base.mean(axis=2, keepdims=True)
                sat = 1.0 + j(0.15)
                face = (grey + (base - grey) * sat) * g
            elif manipulation == "texture":
                mask = _ellipse_mask(size, cx, cy, ax, ay, cam["rot"][t], 1.5)
                f = float(np.clip(rng.uniform(0.5 - 0.2 * s, 0.6), 0.15, 1.0))
                lo = max(4, int(round(size * f)))
                small = cv2.resize(base, (lo, lo), interpolation=cv2.INTER_AREA)
                face = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
            else:
                raise ValueError(f"unknown manipulation {manipulation!r}; choose from {MANIPULATIONS}")
            out = mask * face + (1 - mask) * base
            if t in marked:
                out = paint_marker(out, cx, cy, side, marker)
        out = out * cam["gain"][t] + rng.normal(0, 2.0, out.shape)
        frames[t] = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return frames


def camera_shift(frames: np.ndarray, shift: dict | None) -> np.ndarray:
    """A set-wide capture shift on uint8 frames (..., 3), the same for real and fake videos: per
    channel ``gain`` (3 values), ``contrast`` about mid-grey and an additive ``offset`` (0..255).
    A domain whose every clip is shifted this way moves the features of both classes together:
    what per-domain statistics (LAST's adaptation) can undo and a source-fitted head cannot."""
    if not shift:
        return frames
    g = np.asarray(shift.get("gain", (1.0, 1.0, 1.0)), np.float32)
    c = float(shift.get("contrast", 1.0))
    o = float(shift.get("offset", 0.0))
    out = (frames.astype(np.float32) * g - 128.0) * c + 128.0 + o
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def write_mp4(frames: np.ndarray, path: str, fps: int = 25, crf: int = 20) -> None:
    """Encode RGB uint8 frames as H.264 (yuv420p) in an mp4 file, single-threaded and reproducibly."""
    import av

    n, h, w = frames.shape[:3]
    if h % 2 or w % 2:
        raise ValueError("H.264 yuv420p needs even frame sides")
    tmp = path + ".part"
    with av.open(tmp, "w", format="mp4") as c:
        st = c.add_stream("libx264", rate=int(fps))
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        # no lookahead / macroblock tree: with them this machine's libx264 gave different bytes for
        # the same frames from run to run (11 variants in 20 encodings), so a set was not reproducible
        st.options = {"crf": str(int(crf)), "preset": "veryfast", "x264-params": "rc-lookahead=0:mbtree=0"}
        st.codec_context.thread_count = 1
        for f in frames:
            for p in st.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(p)
        for p in st.encode():
            c.mux(p)
    os.replace(tmp, path)


def params_key(p: dict) -> str:
    return hashlib.sha1(json.dumps(p, sort_keys=True).encode()).hexdigest()[:10]


def build_synth_video_manifest(root: str, seed: int = 0, n_videos_per_class: int = 24,
                               manipulations=MANIPULATIONS, n_frames: int = 40, size: int = 96,
                               split_fractions=(0.6, 0.2, 0.2), strength: float = 1.0, fps: int = 25,
                               crf: int = 20, shift: dict | None = None, marker: dict | None = None) -> str:
    """Write the set once per parameter set and return the path of its ``manifest.csv``.

    ``n_videos_per_class`` real and as many fake videos in all, split by ``split_fractions``
    (train, val, test); fakes cycle through ``manipulations``. Columns: ``uri`` (absolute path),
    ``label`` (1 = fake), ``split``, ``video_id``, ``source``, ``manipulation`` (``none`` for real),
    ``compression`` (``h264-crf<crf>``), plus ``identity``, ``donor``, ``n_frames``, ``fps``."""
    manipulations = [str(m) for m in manipulations]
    for m in manipulations:
        if m not in MANIPULATIONS:
            raise ValueError(f"unknown manipulation {m!r}; choose from {list(MANIPULATIONS)}")
    if not manipulations:
        raise ValueError("at least one manipulation type is needed")
    size = int(size)
    fr = [float(x) for x in split_fractions]
    params = dict(seed=int(seed), n=int(n_videos_per_class), manipulations=manipulations, n_frames=int(n_frames),
                  size=size, split_fractions=fr, strength=float(strength), fps=int(fps), crf=int(crf), version=2)
    if shift:  # only then, so the sets without a shift keep their cache names
        params["shift"] = dict(shift)
    marker = marker_spec(marker)
    if marker:  # likewise
        params["marker"] = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in marker.items()}
    # absolute: a relative root (the default, outputs/.data/video) written into the manifest was
    # resolved again against the manifest's folder and every file went missing
    d = os.path.abspath(os.path.join(os.path.expanduser(str(root)), f"synth_video-{params_key(params)}"))
    man = os.path.join(d, "manifest.csv")
    if os.path.exists(man):
        return man
    faces = face_patches()
    for m in manipulations:  # before any video is written
        if m in SWAPS:
            require_donors(len(faces), m)
    names = [n for n, _ in faces]
    n = int(n_videos_per_class)
    n_tr = int(round(fr[0] * n))
    n_va = int(round(fr[1] * n))
    splits = ["train"] * n_tr + ["val"] * n_va + ["test"] * max(0, n - n_tr - n_va)
    from trustlab.platform.progress import progress

    tmpd = d + f".tmp{os.getpid()}"
    shutil.rmtree(tmpd, ignore_errors=True)
    rows = []
    idx = 0
    for split in ("train", "val", "test"):
        k = splits.count(split)
        for label in (0, 1):
            for i in progress(range(k), f"generating {split} videos ({'fake' if label else 'real'})", unit="video"):
                rng = np.random.default_rng([int(seed), idx])
                ti = int(rng.integers(len(faces)))
                manip = "none" if label == 0 else manipulations[i % len(manipulations)]
                di = -1
                if manip in SWAPS:
                    di = int((ti + 1 + rng.integers(len(faces) - 1)) % len(faces))
                frames = camera_shift(render_video(rng, faces[ti][1], faces[di][1] if di >= 0 else None, manip,
                                                   int(n_frames), size, strength, marker), shift)
                vid = f"synth_{idx:05d}"
                rel = os.path.join("videos", split, f"{vid}.mp4")
                os.makedirs(os.path.join(tmpd, "videos", split), exist_ok=True)
                write_mp4(frames, os.path.join(tmpd, rel), fps=fps, crf=crf)
                rows.append(dict(uri=os.path.join(d, rel), label=label, split=split, video_id=vid,
                                 source="synth_real" if label == 0 else "synth_fake", manipulation=manip,
                                 compression=f"h264-crf{int(crf)}", identity=names[ti],
                                 donor=names[di] if di >= 0 else "none", n_frames=int(n_frames), fps=int(fps)))
                idx += 1
    pd.DataFrame(rows).to_csv(os.path.join(tmpd, "manifest.csv"), index=False)
    with open(os.path.join(tmpd, "params.json"), "w") as f:
        json.dump(params, f, indent=2)
    try:
        os.replace(tmpd, d)
    except OSError:  # another process finished the same set first
        shutil.rmtree(tmpd, ignore_errors=True)
    return man


def manifest_from_config(cfg: dict, seed: int) -> str:
    """``data.name=synth_video`` for the video data plane: the set that ``cfg["synth"]`` describes."""
    s = cfg["synth"]
    return build_synth_video_manifest(cfg["root"], seed=int(seed), n_videos_per_class=int(s["n_videos_per_class"]),
                                      manipulations=list(s["manipulations"]), n_frames=int(s["n_frames"]),
                                      size=int(s["frame_size"]), strength=float(s.get("strength", 1.0)),
                                      shift=s.get("shift"), marker=s.get("marker"))


def _register() -> None:
    from trustlab.platform.data import video

    video.GENERATORS.setdefault("synth_video", manifest_from_config)


_register()

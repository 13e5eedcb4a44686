"""Faces without Ray: detectors with landmarks, the face track of a video, aligned crops, counts
that are never silent, the crop-cache key; on the real files of ``../shared/data/real`` (its
README) where they are present: the multi-face 1080p clip, the group photo, the four portraits
and the aligned crops shipped beside them."""
from __future__ import annotations

import glob
import os

import numpy as np
import pandas as pd
import pytest

from trustlab.methods.video.synth_video import shared_real_dir, write_mp4
from trustlab.platform.data import faces as F
from trustlab.platform.data.video import (DEFAULTS, FACE_KNOBS, BadFileReport, cache_key, decode_sampled,
                                          iter_clips, sample_indices)

from test_video_data import CLIPS, synth  # noqa: F401 - module fixture

REAL = shared_real_dir()


def real_file(name: str) -> str:
    path = os.path.join(REAL or "", name)
    if not REAL or not os.path.exists(path):
        pytest.skip(f"shared/data/real/{name} not present")
    return path


def rgb(path: str) -> np.ndarray:
    import cv2

    return cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def yunet():
    return F.make_detector("yunet")


@pytest.fixture(scope="module")
def multiface_frames():
    """The field's sampling of the 1080p crowd clip: 32 uniform frames (decoded at the data plane's 960)."""
    data = open(real_file("multiface_video.mp4"), "rb").read()
    idx = sample_indices(105, 32)
    return decode_sampled(data, idx, max_side=DEFAULTS["decode_max_side"]), idx


# ----------------------------------------------------------------------------- geometry
def test_box_geometry_smoothing_and_gap_filling():
    np.testing.assert_allclose(F.to_square((10, 20, 30, 40)), [25, 40, 40])
    assert F.enlarge((50, 50, 20), 1.3, 100, 100) == (37, 37, 63, 63)
    assert F.enlarge((5, 5, 20), 1.3, 100, 100) == (0, 0, 26, 26)  # shifted inside, not shrunk
    jitter = np.array([[50 + (-1) ** i * 4, 50, 20] for i in range(9)], float)
    sm = F.smooth_squares(jitter, 5)
    assert np.abs(np.diff(sm[:, 0])).max() < np.abs(np.diff(jitter[:, 0])).max() / 3
    lm = np.random.default_rng(0).normal(size=(9, 5, 2))
    assert F.smooth_squares(lm, 3).shape == (9, 5, 2)  # landmarks smooth the same way
    assert F.largest(np.array([[0, 0, 5, 5], [1, 1, 9, 9], [2, 2, 7, 7]]))[2] == 9
    # gaps: interpolated inside a clip, held at a clip's edge, taken from another clip when a clip has none
    v = np.array([[0.0], [0], [0], [30], [7], [0], [0], [0]])
    found = np.array([True, False, False, True, True, False, False, False])
    np.testing.assert_allclose(F.fill_gaps(v, found, 4)[:, 0], [0, 10, 20, 30, 7, 7, 7, 7])


def test_similarity_transform_and_windowed_warp():
    import cv2

    rng = np.random.default_rng(1)
    src = rng.uniform(20, 80, (5, 2))
    a, s = np.deg2rad(17), 0.6
    want = np.array([[s * np.cos(a), -s * np.sin(a), 5.0], [s * np.sin(a), s * np.cos(a), -3.0]])
    m = F.similarity(src, src @ want[:, :2].T + want[:, 2])
    np.testing.assert_allclose(m, want, atol=1e-9)
    frame = rng.integers(0, 255, (160, 200, 3), dtype=np.uint8)
    big = np.array([[1.5, 0.2, -40.0], [-0.2, 1.5, -30.0]])  # enlarging: the window warp is the plain warp
    np.testing.assert_array_equal(F.warp_face(frame, big, 48), cv2.warpAffine(frame, big, (48, 48)))
    small = np.array([[0.25, 0, -2.0], [0, 0.25, -1.0]])  # shrinking 4x: area-averaged first, no aliasing
    smooth = cv2.resize(frame[4:4 + 128, 8:8 + 128], (32, 32), interpolation=cv2.INTER_AREA).astype(float)
    got = F.warp_face(frame, small, 32).astype(float)
    assert np.abs(got - smooth).mean() < np.abs(cv2.warpAffine(frame, small, (32, 32)).astype(float) - smooth).mean()


# ----------------------------------------------------------------------------- the face track
def test_track_counts_blank_frames_and_lost_tracks(synth, yunet):
    _, man = synth
    uri = pd.read_csv(man)["uri"].iloc[0]
    frames = decode_sampled(open(uri, "rb").read(), list(range(8)))
    frames[2] = 128  # no face in frames 2 and 5
    frames[5] = 128
    ft = F.track_faces(frames, yunet, 4, 48)
    assert ft.crops.shape == (8, 48, 48, 3) and ft.landmarks.shape == (8, 5, 2)  # every frame is kept
    st = ft.stats
    assert (st.frames, st.detected, st.fallback_prev, st.fallback_centre, st.lost) == (8, 6, 2, 0, 2)
    assert list(np.flatnonzero(~ft.found)) == [2, 5] and st.low_coverage == 0
    assert np.abs(ft.squares[:, :2] - 32).max() < 12  # the face is drawn near the frame centre
    none = F.track_faces(np.full((4, 64, 64, 3), 128, np.uint8), yunet, 4, 32)
    assert none.stats.fallback_centre == 4 and none.stats.low_coverage == 1 and np.isnan(none.landmarks).all()


def test_multiface_video_track_stays_on_one_person(multiface_frames, yunet):
    frames, idx = multiface_frames
    width = frames.shape[2]
    ft = F.track_faces(frames, yunet, 1, 112, times=idx)
    # measured: found in 32/32; centre steps <= 0.021 of the frame width (3 frames apart); the
    # boy walking to the camera grows from 42 to 68 px (at 960) while people cross in front of him
    assert ft.coverage >= 0.95, ft.found
    steps = np.hypot(*np.diff(ft.squares[:, :2], axis=0).T) / width
    assert steps.max() < 0.05, steps.round(3)
    side = ft.squares[:, 2]
    assert side.max() / side.min() < 2.0 and np.abs(np.diff(side)).max() < 0.25 * side.min()
    # the CPU defaults: two clips of 8 frames, 1.7 s apart; the same person in both (appearance links them)
    idx16 = sample_indices(105, 16, 8)
    pos = np.searchsorted(idx, idx16)
    near = np.abs(idx[np.minimum(pos, len(idx) - 1)] - idx16) <= 2
    ft16 = F.track_faces(decode_sampled(open(real_file("multiface_video.mp4"), "rb").read(), idx16, max_side=960),
                         yunet, 8, 112, times=idx16)
    assert ft16.coverage >= 0.95
    d = np.hypot(*(ft16.squares[near, :2] - ft.squares[np.minimum(pos, len(idx) - 1)[near], :2]).T)
    assert d.max() < 0.5 * side.min(), d  # where the 32-frame track is at about the same moments


def test_group_photo_finds_the_six_faces(yunet):
    img = rgb(real_file("multiface.jpg"))
    assert len(yunet.detect(img)) == 6  # six faces in view (Haar: seven, one of them a false positive)


def test_portraits_align_their_eyes_to_the_template(yunet):
    """Each portrait's aligned crop puts the eyes (found again by the detector in the crop) within
    5 px of the template at 112 px and levels them; the box crops shipped beside the portraits
    (MTCNN boxes, not aligned) have their eyes spread more widely."""
    import cv2

    paths = sorted(glob.glob(os.path.join(os.path.dirname(real_file("faces/paul_rudd.jpg")), "*.jpg")))
    tpl = F.template(112, 1.3)
    ours, shipped = [], []
    for p in paths:
        crop = F.track_faces(rgb(p)[None], yunet, 1, 112).crops[0]
        d = yunet.detect(crop)
        eyes = d.landmarks[int(np.argmax(d.scores)), :2]
        # measured: 1.7-4.4 px (YuNet's landmarks are whole pixels at the detection scale)
        assert np.abs(eyes - tpl[:2]).max() < 5.0, (p, eyes, tpl[:2])
        dx, dy = eyes[1] - eyes[0]
        assert abs(np.degrees(np.arctan2(dy, dx))) < 3.0
        ours.append(eyes)
        ref = cv2.resize(rgb(p.replace(".jpg", "_aligned.png")), (112, 112), interpolation=cv2.INTER_AREA)
        r = yunet.detect(ref)
        shipped.append(r.landmarks[int(np.argmax(r.scores)), :2])
    spread = lambda e: float(np.ptp(np.stack(e), axis=0).max())  # noqa: E731
    assert spread(ours) < spread(shipped), (spread(ours), spread(shipped))


@pytest.mark.parametrize("name", F.DETECTORS)
def test_every_detector_finds_the_portrait(name, yunet):
    import cv2

    try:
        det = F.make_detector(name)
    except RuntimeError as e:  # an optional detector package that is not installed
        pytest.skip(str(e))
    img = cv2.resize(rgb(real_file("faces/kate_siegel.jpg")), (480, 688), interpolation=cv2.INTER_AREA)
    got, ref = det.detect(img), yunet.detect(img)
    assert len(got) == 1 and len(ref) == 1
    a, b = got.squares()[0], ref.squares()[0]
    assert np.hypot(*(a[:2] - b[:2])) < 0.2 * b[2]
    assert (got.landmarks is not None) == det.has_landmarks
    if det.has_landmarks:
        assert np.abs(got.landmarks[0] - ref.landmarks[0]).max() < 0.1 * b[2]
        assert F.track_faces(img[None], det, 1, 32, crop="aligned").stats.detected == 1
    else:
        with pytest.raises(ValueError, match="aligned needs landmarks"):
            F.track_faces(img[None], det, 1, 32, crop="aligned")


def test_haar_relaxed_neighbors_same_pass_fallback():
    """A whole-frame Haar pass groups its raw windows at min_neighbors and, only when nothing
    reaches it, at relaxed_neighbors: identical boxes when the strict threshold finds the face."""
    import skimage.data as skd

    img = np.ascontiguousarray(skd.astronaut())
    strict = F.FaceDetector(detect_width=512).detect(img).boxes
    both = F.FaceDetector(detect_width=512, relaxed_neighbors=3).detect(img).boxes
    assert len(strict) >= 1 and np.array_equal(strict, both)
    assert len(F.FaceDetector(detect_width=512, min_neighbors=200).detect(img)) == 0
    relaxed = F.FaceDetector(detect_width=512, min_neighbors=200, relaxed_neighbors=3).detect(img).boxes
    a, b = F.to_square(F.largest(strict)), F.to_square(F.largest(relaxed))
    assert np.abs(a[:2] - b[:2]).max() < a[2] / 4


# ----------------------------------------------------------------------------- counts and the cache key
def test_videos_without_a_face_are_counted_and_named(synth, tmp_path):
    _, man = synth
    df = pd.read_csv(man)
    test = df[df["split"] == "test"].copy()
    blank = str(tmp_path / "blank.mp4")
    write_mp4(np.full((24, 64, 64, 3), 90, np.uint8), blank)
    extra = test.iloc[:1].assign(uri=blank, video_id="blank")
    p = tmp_path / "with_blank.csv"
    pd.concat([test, extra], ignore_index=True).to_csv(p, index=False)
    rep = BadFileReport(use_ray=False)
    rows = [b for b in iter_clips(dict(manifest=str(p), **CLIPS), "test", report=rep)]
    assert all(b["landmarks"].shape[1:] == (4, 5, 2) for b in rows)
    st = rep.stats("test")
    assert st["videos"] == len(test) + 1 and st["fallback_centre"] == 8 and st["low_coverage"] == 1
    named = {r["uri"]: r for r in rep.face_issues("test")}
    assert named[blank]["coverage"] == 0.0 and named[blank]["low_coverage"]
    assert "videos under the track-coverage share 1" in rep.summary()


def test_every_face_knob_is_in_the_cache_key():
    df = pd.DataFrame({"uri": ["a.mp4"], "label": [0], "split": ["test"]})
    base = cache_key(df, dict(DEFAULTS), 0)
    other = {"face_detector": "mtcnn", "face_crop": "box", "face_scale": 1.25, "face_score": 0.7,
             "face_track": "largest", "detect_every": 4, "min_track_share": 0.6, "smooth": 3, "decode_max_side": 720,
             "decoder": "decord", "detect_width": 640, "scale_factor": 1.2, "min_neighbors": 4, "relaxed_neighbors": None}
    assert set(other) == set(FACE_KNOBS)
    for k, v in other.items():
        assert cache_key(df, {**DEFAULTS, k: v}, 0) != base, k
    assert cache_key(df, {**DEFAULTS, "num_decoders": 7}, 0) == base  # parallelism does not change crops


def test_run_summary_lines_carry_the_face_counts():
    from trustlab.methods.video.common import bad_file_lines

    st = {"frames": 40, "detected": 30, "fallback_prev": 2, "fallback_centre": 8, "lost": 1, "low_coverage": 1}
    lines = bad_file_lines({"synth": {"bad_files": [], "stats": {"test": st},
                                      "faces": [{"split": "test", "uri": "blank.mp4", "coverage": 0.0}]}})
    text = "\n".join(lines)
    assert "faces test: 40 frames, face found in 30 (75.0%)" in text and "track lost 1x" in text
    assert "centre crop 8" in text and "named in face_issues.json" in text

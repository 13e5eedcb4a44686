"""Video data plane without Ray: sampling, decoding, the synthetic set, manifest adapters on tiny
FF++/Celeb-DF/DFDC trees, bad files. Faces (detectors, tracks, aligned crops, counts, the real
files) are in ``test_faces.py``; the Ray Data / S3 / Ray Train path is in ``test_video_ray.py``."""
from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import pandas as pd
import pytest

from trustlab.methods.video.synth_video import build_synth_video_manifest, render_video, shared_real_dir
from trustlab.platform.data.video import BadFileReport, decode_sampled, iter_clips, sample_indices

SMALL = dict(n_videos_per_class=8, manipulations=["blend", "warp", "color", "texture"], n_frames=24, frame_size=64)
CLIPS = dict(frames_per_video=8, clip_len=4, stride=1, size=32, num_decoders=1, decode_cpus=0.25)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthvid")
    man = build_synth_video_manifest(str(root), seed=3, n_videos_per_class=SMALL["n_videos_per_class"],
                                     manipulations=SMALL["manipulations"], n_frames=SMALL["n_frames"],
                                     size=SMALL["frame_size"])
    return str(root), man


def data_cfg(root, **kw):
    return dict(name="synth_video", root=root, synth=dict(SMALL), **CLIPS, **kw)


# ----------------------------------------------------------------------------- sampling / decoding
def test_sample_indices_uniform_clips_and_offsets():
    ev = sample_indices(100, 32)
    assert len(ev) == 32 and np.all(np.diff(ev) > 0) and ev[0] < 4 and ev[-1] > 95
    np.testing.assert_array_equal(ev, sample_indices(100, 32))  # eval is deterministic
    c = sample_indices(40, 16, clip_len=8, stride=2).reshape(2, 8)
    assert np.all(np.diff(c, axis=1) == 2)  # T frames `stride` apart
    starts = []
    rng = np.random.default_rng(0)
    for _ in range(200):
        tr = sample_indices(40, 16, clip_len=8, stride=1, train=True, rng=rng).reshape(2, 8)
        assert np.all(np.diff(tr, axis=1) == 1) and tr.max() <= 39 and tr.min() >= 0
        assert tr[0, 0] < 16 <= tr[1, 0]  # each clip inside its own segment of the valid starts
        starts.append(tuple(tr[:, 0]))
    assert len(set(starts)) > 50  # random offsets for training
    short = sample_indices(5, 8, clip_len=8, stride=1)
    assert len(short) == 8 and short.max() == 4  # a short video repeats its last frame


def test_training_clip_starts_repeat_per_seed_and_change_per_pass(synth):
    """``train_starts=seeded`` (the default): a training video's clip starts come from (seed, video,
    pass), so two fresh runs cut the same frames (and an empty crop cache fills alike), while a
    second pass over a video draws new starts, also when a new actor cuts it (the run's report
    counts the passes); ``fresh`` does not repeat."""
    from trustlab.platform.data.video import ClipMaker, _key, _meta, resolve_manifest, split_frame, video_data_config

    root, _ = synth

    def frames(maker, uris):
        return np.concatenate([maker({"path": np.asarray([_key(u)], dtype=object),
                                      "bytes": np.asarray([open(u, "rb").read()], dtype=object)})["frames"] for u in uris])

    def makers(**kw):
        cfg = video_data_config(data_cfg(root, **kw))
        df, _, _ = resolve_manifest(cfg, 3)
        d = split_frame(df, "train", cfg)
        return (lambda: ClipMaker(_meta(d), cfg, True, 3)), list(dict.fromkeys(d["uri"]))

    new, uris = makers()
    assert len(uris) >= 8
    first = frames(new(), uris)
    np.testing.assert_array_equal(first, frames(new(), uris))  # a new actor, the same starts
    m = new()
    frames(m, uris)
    second = frames(m, uris)
    assert not np.array_equal(first, second)  # the same actor's second pass: new starts
    # each streamed epoch runs new actors: the run's report counts the passes they share
    from trustlab.platform.data.video import _LocalReport

    make, sink = new, _LocalReport()
    epochs = []
    for _ in range(2):
        mk = make()
        mk.sink = sink
        epochs.append(frames(mk, uris))
    np.testing.assert_array_equal(epochs[0], first)
    np.testing.assert_array_equal(epochs[1], second)
    via = np.concatenate([b["frames"] for b in iter_clips(data_cfg(root), "train", seed=3)])
    np.testing.assert_array_equal(first, via)  # the in-process path draws alike
    centres = np.tile(sample_indices(SMALL["n_frames"], CLIPS["frames_per_video"], CLIPS["clip_len"]).reshape(-1, 4),
                      (len(uris), 1))
    assert not np.array_equal(first, centres)  # drawn, not the eval centres
    fresh, _ = makers(train_starts="fresh")
    assert not np.array_equal(frames(fresh(), uris), frames(fresh(), uris))
    with pytest.raises(ValueError, match="train_starts"):
        makers(train_starts="random")[0]()


def test_decode_sampled_matches_full_decode(synth):
    import av

    _, man = synth
    uri = pd.read_csv(man)["uri"].iloc[0]
    data = open(uri, "rb").read()
    with av.open(io.BytesIO(data)) as c:
        full = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    idx = [20, 3, 3, 11]
    got = decode_sampled(data, idx)
    assert got.shape == (4, 64, 64, 3) and got.dtype == np.uint8
    err = np.abs(got.astype(int) - full[idx].astype(int)).mean(axis=(1, 2, 3))
    other = np.abs(got[0].astype(int) - full[19].astype(int)).mean()
    assert err.max() < 3.0 and other > err[0]  # the requested frames, in the requested order


@pytest.mark.parametrize("which", ["real", "synth"])
def test_pyav_sampled_decode_equals_decord_and_skips_unneeded_frames(synth, which):
    """The data plane's default decoder (PyAV, skipping non-reference frames it need not return)
    gives decord's frames: the same count, the same pixels at native size, the same frames when
    resized; and it has the decoder output fewer frames than the last one asked for (the real clip
    has 78 B-frames in 105; x264's synthetic files have B-frames too)."""
    from trustlab.platform.data.video import SampledVideo

    if which == "real":
        path = os.path.join(shared_real_dir() or "", "multiface_video.mp4")
        if not os.path.exists(path):
            pytest.skip("shared/data/real/multiface_video.mp4 not found")
    else:
        path = pd.read_csv(synth[1])["uri"].iloc[0]
    data = open(path, "rb").read()
    av_, dec = SampledVideo(data, "pyav"), SampledVideo(data, "decord")
    assert av_.decoder == "pyav" and av_.n_frames == dec.n_frames > 0
    assert (av_.width, av_.height) == (dec.width, dec.height) and av_.fps == pytest.approx(dec.fps)
    idx = sample_indices(av_.n_frames, 16, 4, 1)[::-1]  # any order
    np.testing.assert_array_equal(av_.frames(idx), dec.frames(idx))
    assert av_.decoded < idx.max() + 1, (av_.decoded, idx.max())
    side = max(av_.width, av_.height) // 2
    small, full = av_.frames(idx, side), dec.frames(np.arange(dec.n_frames), side)
    assert small.shape[1:] == full.shape[1:] and max(small.shape[1:3]) == side
    dist = np.abs(small[:, None].astype(np.int16) - full[None].astype(np.int16)).mean(axis=(2, 3, 4))
    np.testing.assert_array_equal(dist.argmin(1), idx)  # each resized frame is nearest its own decord frame
    assert dist[np.arange(len(idx)), idx].max() < 1.0


def test_sampled_video_bad_input():
    from trustlab.platform.data.video import SampledVideo

    with pytest.raises(ValueError, match="zero-byte"):
        SampledVideo(b"")
    with pytest.raises(ValueError, match="decoder"):
        SampledVideo(b"x", "ffmpeg-cli")
    with pytest.raises(Exception):
        SampledVideo(b"this is a text file, not a video\n" * 20)


# ----------------------------------------------------------------------------- synthetic set
def test_synth_set_layout_determinism_and_planted_signal(synth, tmp_path):
    root, man = synth
    df = pd.read_csv(man)
    assert list(df.columns[:7]) == ["uri", "label", "split", "video_id", "source", "manipulation", "compression"]
    assert len(df) == 16 and df["label"].sum() == 8 and df["video_id"].is_unique
    assert set(df.loc[df.label == 1, "manipulation"]) == {"blend", "warp", "color", "texture"}
    assert set(df.loc[df.label == 0, "manipulation"]) == {"none"}
    assert set(df["split"]) == {"train", "val", "test"}
    with open(df["uri"].iloc[0], "rb") as f:
        assert f.read(12)[4:8] == b"ftyp"  # an mp4 container
    # cached by parameters: same call returns the same path without rewriting
    assert build_synth_video_manifest(root, seed=3, n_videos_per_class=8, manipulations=SMALL["manipulations"],
                                      n_frames=24, size=64) == man
    # deterministic by seed: a fresh build elsewhere gives byte-identical files
    again = pd.read_csv(build_synth_video_manifest(str(tmp_path), seed=3, n_videos_per_class=8,
                                                   manipulations=SMALL["manipulations"], n_frames=24, size=64))
    h = lambda p: hashlib.sha1(open(p, "rb").read()).hexdigest()  # noqa: E731
    assert [h(p) for p in df["uri"]] == [h(p) for p in again["uri"]]
    # the fake differs from the real rendering of the same motion inside the face, not around it
    from trustlab.methods.video.synth_video import face_patches

    (_, tgt), (_, don) = face_patches()[:2]
    real = render_video(np.random.default_rng(7), tgt, None, "none", 12, 64).astype(float)
    for m in ("blend", "warp", "color", "texture"):
        fake = render_video(np.random.default_rng(7), tgt, don, m, 12, 64).astype(float)
        d = np.abs(fake - real).mean(axis=(0, 3))
        assert d[24:40, 24:40].mean() > 3 * d[:8, :].mean(), m



def test_marker_is_one_frame_per_block_on_fakes_only(tmp_path):
    """The planted shortcut (``marker``): one frame in every block of ``every`` frames carries the
    square, on fakes only, in both renderers; a marked set is cached apart from the plain one."""
    from trustlab.methods.video import common
    from trustlab.methods.video.synth_video import face_patches

    (_, tgt), (_, don) = face_patches()[:2]
    mk = {"every": 8, "rgb": [0, 255, 0]}

    def green(v):  # frames whose square of pure green is there: many saturated green pixels
        g = (v[..., 1].astype(int) > 200) & (v[..., 0] < 80) & (v[..., 2] < 80)
        return np.flatnonzero(g.sum(axis=(1, 2)) >= 12)

    for fake, real in ((render_video(np.random.default_rng(1), tgt, don, "blend", 24, 96, marker=mk),
                        render_video(np.random.default_rng(1), tgt, None, "none", 24, 96, marker=mk)),
                       (common.render_video(np.random.default_rng(1), 24, 96, "color", marker=mk),
                        common.render_video(np.random.default_rng(1), 24, 96, "none", marker=mk))):
        hit = green(fake)
        assert sorted(hit // 8) == [0, 1, 2], hit  # exactly one marked frame per block of 8
        assert len(green(real)) == 0
    plain = render_video(np.random.default_rng(1), tgt, don, "blend", 24, 96)
    assert len(green(plain)) == 0
    with pytest.raises(ValueError, match="unknown marker keys"):
        render_video(np.random.default_rng(1), tgt, don, "blend", 8, 96, marker={"colour": [0, 0, 255]})
    kw = dict(seed=0, n_videos_per_class=2, manipulations=["color"], n_frames=8, size=64)
    a = build_synth_video_manifest(str(tmp_path), **kw)
    b = build_synth_video_manifest(str(tmp_path), marker=mk, **kw)
    assert a != b and build_synth_video_manifest(str(tmp_path), **kw) == a


def test_synth_set_under_a_relative_root_reads_back(tmp_path, monkeypatch):
    """The default root is relative (outputs/.data/video): every manifest entry must name an
    existing file however the manifest is read, and the clips must decode."""
    from trustlab.platform.data.manifests import read_manifest

    monkeypatch.chdir(tmp_path)
    man = build_synth_video_manifest("outputs/.data/video", seed=1, n_videos_per_class=2, manipulations=["blend"],
                                     n_frames=8, size=32)
    df = read_manifest(man)
    assert len(df) == 4 and all(os.path.isfile(u) for u in df["uri"]), list(df["uri"])[:2]
    cfg = dict(name="synth_video", root="outputs/.data/video", frames_per_video=8, clip_len=4, size=16,
               synth=dict(n_videos_per_class=2, manipulations=["blend"], n_frames=8, frame_size=32))
    report = BadFileReport(use_ray=False)
    clips = [x for split in ("train", "test") for b in iter_clips(cfg, split, seed=1, report=report) for x in b["x"]]
    assert clips and report.bad_files() == [], report.bad_files()

# ----------------------------------------------------------------------------- manifests
def _touch(root, rel, data=b""):
    p = os.path.join(root, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
        f.write(data)


def test_ffpp_adapter(tmp_path):
    import json

    from trustlab.platform.data.manifests import ManifestError, ffpp_manifest

    r = str(tmp_path)
    for c in ("c23", "c40"):
        for v in ("000", "001", "002", "003"):
            _touch(r, f"original_sequences/youtube/{c}/videos/{v}.mp4")
        for t in ("Deepfakes", "FaceSwap"):
            for v in ("000_001", "001_000", "002_003", "003_002"):
                _touch(r, f"manipulated_sequences/{t}/{c}/videos/{v}.mp4")
    _touch(r, "original_sequences/actors/c23/videos/01__walking.mp4")
    _touch(r, "splits/train.json", json.dumps([["000", "001"]]).encode())
    _touch(r, "splits/val.json", json.dumps([]).encode())
    _touch(r, "splits/test.json", json.dumps([["002", "003"]]).encode())
    with pytest.raises(ManifestError, match="Face2Face has no videos"):  # the four standard types by default
        ffpp_manifest(r, compressions=["c23"])
    df = ffpp_manifest(r, compressions=["c23"], manipulations=["Deepfakes", "FaceSwap"])
    assert len(df) == 4 + 8 and set(df["compression"]) == {"c23"}  # actors only with DeepFakeDetection
    row = lambda vid: df.set_index("video_id").loc[vid]  # noqa: E731
    assert row("original/youtube/c23/000")["split"] == "train" and row("original/youtube/c23/000")["label"] == 0
    assert row("Deepfakes/c23/003_002")["split"] == "test" and row("Deepfakes/c23/003_002")["label"] == 1
    assert row("FaceSwap/c23/001_000")["manipulation"] == "FaceSwap"
    assert row("Deepfakes/c23/000_001")["uri"].endswith("manipulated_sequences/Deepfakes/c23/videos/000_001.mp4")
    both = ffpp_manifest(r, compressions=["c23", "c40"], manipulations=["Deepfakes"])
    assert len(both) == 2 * (4 + 4) and set(both["manipulation"]) == {"none", "Deepfakes"}


def test_celebdf_adapter(tmp_path):
    from trustlab.platform.data.manifests import celebdf_manifest

    r = str(tmp_path)
    for rel in ("Celeb-real/id0_0000.mp4", "Celeb-real/id1_0000.mp4", "YouTube-real/00000.mp4",
                "YouTube-real/00001.mp4", "Celeb-synthesis/id0_id1_0000.mp4", "Celeb-synthesis/id1_id0_0000.mp4"):
        _touch(r, rel)
    _touch(r, "List_of_testing_videos.txt", b"1 YouTube-real/00001.mp4\n0 Celeb-synthesis/id1_id0_0000.mp4\n")
    df = celebdf_manifest(r, val_fraction=0.0)
    assert len(df) == 6
    t = df[df.split == "test"].set_index("video_id")
    assert set(t.index) == {"YouTube-real/00001", "Celeb-synthesis/id1_id0_0000"}
    assert t.loc["YouTube-real/00001", "label"] == 0 and t.loc["Celeb-synthesis/id1_id0_0000", "label"] == 1
    assert set(df[df.split != "test"]["split"]) == {"train"}
    assert set(celebdf_manifest(r, val_fraction=1.0).query("split != 'test'")["split"]) == {"val"}


def test_dfdc_adapter(tmp_path):
    import json

    from trustlab.platform.data.manifests import ManifestError, dfdc_manifest

    r = str(tmp_path)
    for part, names in (("dfdc_train_part_0", ("a", "b", "c")), ("dfdc_train_part_1", ("d", "e"))):
        meta = {}
        for n in names:
            _touch(r, f"{part}/{n}.mp4")
        meta = {"a.mp4": {"label": "REAL", "split": "train"},
                "b.mp4": {"label": "FAKE", "split": "train", "original": "a.mp4"},
                "c.mp4": {"label": "FAKE", "split": "train", "original": "a.mp4"}} if part.endswith("0") else \
               {"d.mp4": {"label": "REAL", "split": "train"},
                "e.mp4": {"label": "FAKE", "split": "train", "original": "d.mp4"}}
        _touch(r, f"{part}/metadata.json", json.dumps(meta).encode())
    df = dfdc_manifest(r, test_parts=["dfdc_train_part_1"], val_fraction=0.0).set_index("video_id")
    assert len(df) == 5 and df["label"].sum() == 3
    assert df.loc["dfdc_train_part_1/e", "split"] == "test" and df.loc["dfdc_train_part_0/b", "split"] == "train"
    by_frac = dfdc_manifest(r, val_fraction=0.5, test_fraction=0.0, seed=1).set_index("video_id")
    # a fake follows its original into the same split
    assert by_frac.loc["dfdc_train_part_0/b", "split"] == by_frac.loc["dfdc_train_part_0/a", "split"]
    assert by_frac.loc["dfdc_train_part_1/e", "split"] == by_frac.loc["dfdc_train_part_1/d", "split"]
    with pytest.raises(ManifestError, match=r"without metadata.json or labels.csv: \['dfdc_test'\]"):
        dfdc_manifest(r, test_parts=["dfdc_test"])
    _touch(r, "test/videos/f.mp4")
    _touch(r, "test/labels.csv", b"filename,label\nf.mp4,1\n")
    with_test = dfdc_manifest(r, val_fraction=0.5).set_index("video_id")  # labels.csv = the test split
    assert with_test.loc["test/f", "split"] == "test" and with_test.loc["test/f", "label"] == 1
    assert with_test.loc["test/f", "uri"].endswith("test/videos/f.mp4")
    assert set(with_test.drop("test/f")["split"]) <= {"train", "val"}


# ----------------------------------------------------------------------------- bad files
def corrupt_manifest(synth, tmp_path):
    """30 videos, 3 of them bad (truncated, zero-byte, not a video): exactly 10%."""
    _, man = synth
    df = pd.read_csv(man)
    good = df.copy()
    extra = df.iloc[:14].copy()  # re-list 14 videos under other ids -> 30 rows in all
    extra["video_id"] = [v + "_dup" for v in extra["video_id"]]
    rows = pd.concat([good, extra], ignore_index=True)
    d = tmp_path / "bad"
    d.mkdir()
    data = open(df["uri"].iloc[0], "rb").read()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (d / "empty.mp4").write_bytes(b"")
    (d / "notes.mp4").write_bytes(b"this is a text file, not a video\n" * 20)
    bad = [str(d / "truncated.mp4"), str(d / "empty.mp4"), str(d / "notes.mp4")]
    for i, u in zip((3, 11, 25), bad):
        rows.loc[i, "uri"] = u
    rows["split"] = "test"
    p = tmp_path / "manifest_bad.csv"
    rows.to_csv(p, index=False)
    return str(p), sorted(bad), len(rows)


def test_bad_files_named_in_process(synth, tmp_path):
    man, bad, n = corrupt_manifest(synth, tmp_path)
    rep = BadFileReport(use_ray=False)
    rows = sum(len(b["y"]) for b in iter_clips(dict(manifest=man, **CLIPS), "test", report=rep))
    assert rows == (n - 3) * 2
    assert rep.bad_uris("test") == bad
    reasons = {b["uri"]: b["reason"] for b in rep.bad_files()}
    assert reasons[[u for u in bad if u.endswith("empty.mp4")][0]] == "zero-byte file"




# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["synth_video", "ffpp", "celebdf", "dfdc"])
def test_video_data_yaml_keys_and_comments(name):
    import re

    from omegaconf import OmegaConf

    from trustlab.platform.data.video import DEFAULTS, FACE_KNOBS, video_data_config

    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "conf", "data", f"{name}.yaml")
    y = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert set(y) <= set(DEFAULTS), set(y) - set(DEFAULTS)  # every knob is one the data plane reads
    # the face knobs are set in DEFAULTS only (training, every dataset and serving crop alike)
    # the generated set's own knobs (its generator and where its videos are uploaded) are absent from real sets
    synth_only = {"synth", "store", "bucket", "prefix"} if name != "synth_video" else set()
    assert set(DEFAULTS) - set(y) <= set(FACE_KNOBS) | synth_only, set(DEFAULTS) - set(y) - set(FACE_KNOBS) - synth_only
    assert not set(y) & set(FACE_KNOBS)
    assert y["name"] == name
    for line in open(path):
        if re.match(r"^\s*[A-Za-z_]+:", line):
            assert "#" in line, f"{name}.yaml: knob without a comment: {line.strip()}"
    cfg = video_data_config(y)
    assert cfg["face_scale"] == 1.3 and cfg["clip_len"] >= 1


def test_store_s3_demo_uploads_and_reads_back(synth):
    """``store=s3`` with no endpoint: moto on 127.0.0.1 is started, the bucket created, the set
    uploaded, and the clips read back from S3 equal those read from disk."""
    from trustlab.platform.data.video import resolve_manifest, video_data_config

    root, man = synth
    cfg = video_data_config(data_cfg(root, store="s3", bucket="demo-videos"))
    df, endpoint, server = resolve_manifest(cfg, seed=3)
    try:
        assert server is not None and endpoint.startswith("http://127.0.0.1:")
        assert all(u.startswith("s3://demo-videos/synth/") for u in df["uri"])
        s3_rows = {(int(v), int(c)): x for b in iter_clips(cfg, "test", seed=3, s3_endpoint=endpoint, manifest=df)
                   for v, c, x in zip(b["vid"], b["clip"], b["x"])}
    finally:
        server.stop()
    local = {(int(v), int(c)): x for b in iter_clips(data_cfg(root), "test", seed=3)
             for v, c, x in zip(b["vid"], b["clip"], b["x"])}
    assert s3_rows.keys() == local.keys() and len(local) > 0
    assert all(np.array_equal(s3_rows[k], local[k]) for k in local)


def test_in_memory_blend_without_a_second_face_says_where_faces_go(tmp_path, monkeypatch):
    """Without the shared real faces only the astronaut is left: 'blend' (a face swap) cannot pick a
    donor identity and says where the faces must be, instead of numpy's 'high <= 0' (seen on a
    machine the shared folder had not travelled to); the single-face manipulations still render."""
    from trustlab.methods.video import common as V

    monkeypatch.setenv("TRUSTLAB_SHARED", str(tmp_path))  # no data/real under it
    V.face_bank.cache_clear()
    try:
        rng = np.random.default_rng(0)
        assert V.render_video(rng, 4, 32, "warp", 1.0).shape == (4, 32, 32, 3)
        with pytest.raises(ValueError, match="two real faces.*TRUSTLAB_SHARED"):
            V.render_video(rng, 4, 32, "blend", 1.0)
    finally:
        V.face_bank.cache_clear()


def test_data_plane_swap_without_a_second_face_is_refused_before_writing(tmp_path, monkeypatch):
    """The data-plane generator agrees with the in-memory one: a face swap ('blend', 'warp') with
    only the astronaut left is refused with where the faces go, before any video is written (it
    used to blend the face with itself, silently); a set without swaps still builds."""
    from trustlab.methods.video import synth_video as SV

    monkeypatch.setenv("TRUSTLAB_SHARED", str(tmp_path / "empty"))  # no data/real under it
    SV.face_patches.cache_clear()
    try:
        root = tmp_path / "sets"
        with pytest.raises(ValueError, match="'warp' videos need at least two real faces.*TRUSTLAB_SHARED"):
            build_synth_video_manifest(str(root), seed=0, n_videos_per_class=2, manipulations=["color", "warp"],
                                       n_frames=4, size=48)
        assert not root.exists() or not any(root.iterdir())
        man = pd.read_csv(build_synth_video_manifest(str(root), seed=0, n_videos_per_class=2,
                                                     manipulations=["color"], n_frames=4, size=48))
        assert set(man["identity"]) == {"astronaut"} and len(man) == 4
    finally:
        SV.face_patches.cache_clear()

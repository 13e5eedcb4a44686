"""Video data plane through Ray: Ray Data streaming from local disk and from a moto S3 server,
the bad-file report on a manifest with 10% corrupt files, the Parquet crop cache, and clips
flowing into Ray Train workers with ``get_dataset_shard(...).iter_torch_batches``. Uses the
session ``ray_head`` fixture; run under ``flock /tmp/trustlab-ray.lock``."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pandas as pd

from trustlab.platform.data.video import clip_datasets, iter_clips, tensor_columns

from test_video_data import CLIPS, corrupt_manifest, synth  # noqa: F401 - module fixture


# ----------------------------------------------------------------------------- Ray Data
def test_ray_stream_with_10pct_corrupt_files(ray_head, synth, tmp_path):
    man, bad, n = corrupt_manifest(synth, tmp_path)
    ds, rep = clip_datasets(dict(manifest=man, **CLIPS), splits=("test",))
    assert rep.stats() == {}  # lazy: nothing decoded before iteration
    got, vids = 0, set()
    for b in ds["test"].iter_batches(batch_size=8, batch_format="numpy"):
        assert b["x"].shape[1:] == (4, 3, 32, 32) and b["x"].dtype == np.uint8
        assert b["y"].dtype == np.int64 and b["vid"].dtype == np.int64
        got += len(b["y"])
        vids |= set(b["vid"].tolist())
    assert got == (n - 3) * 2 and vids == set(range(n)) - {3, 11, 25}
    assert rep.bad_uris() == bad  # exactly the corrupt files, named
    st = rep.stats("test")
    assert st["videos"] == n - 3 and st["bad"] == 3 and st["frames"] == (n - 3) * 8
    assert st["detected"] + st["fallback_prev"] + st["fallback_centre"] == st["frames"]
    text = rep.summary()
    assert all(u in text for u in bad) and "bad files: 3" in text
    rep.close()


def test_ray_stream_from_local_s3_matches_local_decode(ray_head, synth):
    from trustlab.platform.data.s3local import LocalS3, upload_manifest

    root, man = synth
    with LocalS3() as s3:
        assert s3.endpoint.startswith("http://127.0.0.1:")
        s3_man = upload_manifest(man, s3.endpoint, "vids", "synth")
        cfg = dict(manifest=s3_man, **CLIPS)
        ds, rep = clip_datasets(cfg, splits=("val",), s3_endpoint=s3.endpoint)
        rows = {}
        for b in ds["val"].iter_batches(batch_size=4, batch_format="numpy"):
            for i in range(len(b["y"])):
                rows[(int(b["vid"][i]), int(b["clip"][i]))] = b["x"][i]
        assert rep.bad_files() == []
        rep.close()
    local = {}
    for b in iter_clips(dict(manifest=man, **CLIPS), "val"):
        for i in range(len(b["y"])):
            local[(int(b["vid"][i]), int(b["clip"][i]))] = b["x"][i]
    assert len(local) == 2 * int((pd.read_csv(man)["split"] == "val").sum()) > 0
    assert rows.keys() == local.keys()
    for k in local:  # val sampling is deterministic: the same crops through S3 + Ray
        np.testing.assert_array_equal(rows[k], local[k])


def test_crop_cache_and_train_workers(ray_head, synth, tmp_path):
    import ray.train
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    root, man = synth
    cfg = dict(manifest=man, cache=str(tmp_path / "cache"), **CLIPS)
    ds1, rep1 = clip_datasets(cfg, splits=("val",))  # writes the Parquet shards
    assert rep1.stats("val")["videos"] > 0
    ds2, rep2 = clip_datasets(cfg, splits=("val",))  # reads them: no decoding
    batches = list(ds2["val"].iter_batches(batch_size=8, batch_format="numpy"))
    a = sorted((int(v), int(c), hashlib.sha1(x.tobytes()).hexdigest()) for b in batches
               for v, c, x in zip(b["vid"], b["clip"], b["x"]))
    assert all(b["landmarks"].shape[1:] == (4, 5, 2) for b in batches)  # crops and their landmarks
    # nothing decoded: the face counts of the pass that wrote the crops come back with them, flagged
    s1, s2 = rep1.stats("val"), rep2.stats("val")
    assert s2.pop("cached") == 1 and s2 == s1 and len(a) == s1["clips"]
    assert os.listdir(tmp_path / "cache")
    rep1.close()
    rep2.close()

    ds, rep = clip_datasets(dict(manifest=man, **CLIPS), splits=("train",))
    n_train = int((pd.read_csv(man)["split"] == "train").sum())

    def loop(config):
        shard = ray.train.get_dataset_shard("train")
        rows, starts = [], []
        for epoch in range(2):
            n, st = 0, []
            for b in shard.iter_torch_batches(batch_size=4):
                assert b["x"].dtype == torch.uint8 and tuple(b["x"].shape[1:]) == (4, 3, 32, 32)
                n += int(b["y"].shape[0])
                st += [(int(v), int(c), int(f[0])) for v, c, f in zip(b["vid"], b["clip"], b["frames"])]
            rows.append(n)
            starts.append(sorted(st))
        with open(config["out"], "w") as f:  # same machine: the worker writes what it saw
            json.dump({"rows": rows, "offsets_differ": starts[0] != starts[1],
                       "same_clips": [k[:2] for k in starts[0]] == [k[:2] for k in starts[1]]}, f)
        ray.train.report({"rows": rows[-1]})

    out = tmp_path / "worker.json"
    trainer = TorchTrainer(loop, train_loop_config={"out": str(out)},
                           scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                           datasets={"train": tensor_columns(ds["train"])},
                           run_config=RunConfig(name="vidtrain", storage_path=str(tmp_path / "ray")))
    res = trainer.fit()
    assert res.error is None
    seen = json.loads(out.read_text())
    assert seen["rows"] == [2 * n_train, 2 * n_train]
    # random clip offsets for training: the same (video, clip) rows, different frames each epoch
    assert seen["same_clips"] and seen["offsets_differ"]
    rep.close()


def test_collect_gives_one_row_order_whatever_order_blocks_arrive(ray_head):
    """The dataplane backend collects a split on the driver; its decoding actors finish blocks in
    any order, so collect sorts rows by (video, clip): the trainer's seeded permutation then sees the
    same rows in the same order and a seeded video run can repeat."""
    import ray

    from trustlab.methods.video.common import collect

    rows = [{"x": np.full(2, i, np.uint8), "y": i % 2, "vid": i // 3, "clip": i % 3} for i in range(24)]
    a = collect(ray.data.from_items(rows).random_shuffle(seed=1))
    b = collect(ray.data.from_items(rows).random_shuffle(seed=2))
    assert set(a) == {"x", "y", "vid", "clip"}
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert a["x"][:, 0].tolist() == list(range(24))  # (video, clip) order is the rows' own order here

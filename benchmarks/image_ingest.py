"""Image ingest: does the memory of an image run stay flat from N to 4N images?

On one set of PNG files (a GenImage-shaped tree: ``<generator>/{train,val}/{ai,nature}``), in one run:

(a) ``stream``  the Ray Data pipeline the methods train on (``trustlab.platform.data.images.
                image_datasets``: manifest rows -> file reads -> PIL decode -> crop in decoding
                actors), every batch of the training split consumed once (an epoch's input), for N
                and for 4N images;
(b) ``eager``   the old way (``genimage_synth.load_image_manifest``: every image decoded into one
                array) on the same N and 4N images, for reference.

Memory is the peak summed PSS of this process and every process under it (Ray's daemons, decoding
actors, object-store mappings), sampled every 0.2 s, above the fresh local Ray's level (the same
baseline for N and 4N). Run it alone, under the lock, on a quiet machine:

    flock /tmp/trustlab-ray.lock .venv/bin/python benchmarks/image_ingest.py --n 400

Prints a table, then ``ratio image_ingest_memory_4n_vs_n: <v> (goal <= 1.1)``; writes
``benchmarks/out/image_ingest.json``.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _common import report  # noqa: E402
from video_ingest import TreeMonitor  # noqa: E402


def make_tree(root: str, n: int, side: int, seed: int = 0) -> None:
    """``n`` training PNGs (half ai, half nature) of one generator, plus a few val ones."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
    for i in range(n):
        kind = "ai" if i % 2 else "nature"
        img = np.roll(base, (i * 7) % side, axis=0) ^ np.uint8(i % 251)
        b = io.BytesIO()
        Image.fromarray(img).save(b, "PNG", compress_level=1)
        for part in ("train",) + (("val",) if i < 8 else ()):
            d = os.path.join(root, "imagenet_ai_0419_sdv4", part, kind)
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, f"{i:06d}.png"), "wb") as f:
                f.write(b.getvalue())


def run_stream(root: str, size: int, decoders: int, idle: int) -> dict:
    from trustlab.platform.data.images import image_datasets, reset_reports

    data_cfg = dict(name="genimage", root=root, num_decoders=decoders, decode_cpus=0.5, files_per_batch=32,
                    adapter=dict(val_fraction=0.0))
    with TreeMonitor() as m:
        t0 = time.perf_counter()
        ds, df = image_datasets(data_cfg, size, splits=("train",))
        n = 0
        for b in ds["train"].iter_batches(batch_size=32, batch_format="numpy"):
            n += len(b["y"])
        wall = time.perf_counter() - t0
    reset_reports()
    return dict(path="stream", images=n, wall_s=wall, peak_mib=m.peak / 2**20, above_idle_mib=(m.peak - idle) / 2**20,
                peak_top="; ".join(f"{nm} {b / 2**20:.0f} (anon {an / 2**20:.0f}, shm {sh / 2**20:.0f})"
                                    for b, nm, an, sh in m.peak_parts[:4]))


def run_eager(root: str, size: int, work: str, idle: int) -> dict:
    import pandas as pd

    from trustlab.platform.data.genimage_synth import load_image_manifest
    from trustlab.platform.data.images import genimage_manifest

    df = genimage_manifest(root, val_fraction=0.0)
    df = df[df["split"] == "train"].assign(image_id=np.arange((df["split"] == "train").sum()))
    man = os.path.join(work, "eager.csv")
    pd.DataFrame(df).to_csv(man, index=False)
    with TreeMonitor() as m:
        t0 = time.perf_counter()
        arrays = load_image_manifest(man, size)
        n = len(arrays["train"]["y"])
        wall = time.perf_counter() - t0
    del arrays
    return dict(path="eager", images=n, wall_s=wall, peak_mib=m.peak / 2**20, above_idle_mib=(m.peak - idle) / 2**20)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=400, help="N images (the check also runs 4N)")
    ap.add_argument("--side", type=int, default=256, help="side of the PNG files")
    ap.add_argument("--size", type=int, default=224, help="crop side fed to a model")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    ap.add_argument("--decoders", type=int, default=2, help="decoding actors")
    a = ap.parse_args(argv)

    import ray

    work = tempfile.mkdtemp(prefix="image_ingest_")
    try:
        trees = {}
        for k, n in (("N", a.n), ("4N", 4 * a.n)):
            trees[k] = os.path.join(work, k)
            make_tree(trees[k], n, a.side)
        ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False, logging_level="warning")
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            time.sleep(2.0)
            idle = TreeMonitor().idle()
            run_stream(trees["N"], a.size, a.decoders, idle)  # warm-up: actor start-up is not charged to N
            rows = [dict(run_stream(trees[k], a.size, a.decoders, idle), set=k) for k in ("N", "4N")]
        finally:
            ray.shutdown()
        time.sleep(1.0)
        idle0 = TreeMonitor().idle()
        rows += [dict(run_eager(trees[k], a.size, work, idle0), set=k) for k in ("N", "4N")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for r in rows:
        r["images_per_s"] = r["images"] / max(r["wall_s"], 1e-9)
    s = {r["set"]: r for r in rows if r["path"] == "stream"}
    e = {r["set"]: r for r in rows if r["path"] == "eager"}
    ratio = s["4N"]["above_idle_mib"] / max(s["N"]["above_idle_mib"], 1e-9)
    eager = e["4N"]["above_idle_mib"] / max(e["N"]["above_idle_mib"], 1e-9)
    print(f"[image_ingest] N={a.n} PNGs of {a.side}px cropped to {a.size}px; local Ray with {a.cpus} CPUs, "
          f"{a.decoders} decoders; reference: eager decoding grew {eager:.2f}x from N to 4N")
    report("image_ingest", rows, [("image_ingest_memory_4n_vs_n", ratio, "<=", 1.1)],
           extra={"eager_memory_4n_vs_n": eager, "args": vars(a)})


if __name__ == "__main__":
    main()

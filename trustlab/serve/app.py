"""The detection graph as one Ray Serve application: building it and starting it.

Composed with ``DeploymentHandle``s (``.bind()`` arguments)::

    HTTP -> ingress (FastAPI) -> preprocess -> detector-<name> (one deployment per detector,
                                               @serve.batch) ...  -> fusion -> JSON

- ``ingress`` (``trustlab.serve.http``): the routes, the limits, the fan-out and the fusion;
- ``preprocess`` (``trustlab.serve.deployments`` / ``inputs``): fetches ``s3://`` inputs, decodes,
  checks the video limits and prepares what the selected detectors need (image uploads are
  prepared by the same ``Preprocessor`` in a worker thread of the ingress when ``inline_images``
  is on, the default: decoding a photo costs less than the extra handle round trip);
- ``detector-<name>`` (``trustlab.serve.runner``): a registered method rebuilt from its checkpoint.
  How an input reaches a detector depends on the method's ``modality``:

  ============  =========================  ==========================================
  modality      image request              video request
  ============  =========================  ==========================================
  ``image``     the decoded image          every sampled frame (longer side <= video.frame_side), mean
  ``face``      the largest face's crop    the face crop of every sampled frame, mean
  ``video``     skipped (needs a video)    every face-crop clip, mean
  ============  =========================  ==========================================

One detector is the same graph with one detector deployment: ``mode=serve run.name=<a trained
run>`` (or ``serve.checkpoint=<model.pt>``) serves the run's best checkpoint, and ``POST /predict``
answers for it. The knobs are those of ``experiments/conf/serve/graph.yaml`` (``trustlab.serve.settings``).

Entry points:

- ``build_app(args) -> Application``: the builder for ``serve run``/``serve deploy`` and Serve
  config files (``import_path: trustlab.serve.app:build_app`` with ``args``, see
  ``trustlab.serve.config_gen``); ``args`` are graph knobs (or a whole trustlab config, whose
  ``serve`` group is used).
- ``trustlab.serve.app:app``: a built application for ``serve build`` / ``serve run``, made from
  the YAML file named by ``$TRUSTLAB_SERVE_ARGS``.
- ``start(cfg)`` / ``serve_forever(cfg)``: ``python experiments/run.py mode=serve ...``. SIGTERM
  or Ctrl-C stops it cleanly (``stop``): Serve shut down, HAProxy gone, the port free, one line.
"""
import contextlib
import io
import os
import signal
import socket
import sys
import time

from ray import serve

from trustlab.serve.deployments import Detector, Preprocess
from trustlab.serve.http import Ingress
from trustlab.serve.settings import (GraphConfigError, absolutize_local_paths, apply_cluster_env, deployment_options,
                                     http_options, logging_config, settings_from_args)


def build_app(args: dict | None = None):
    """The graph as a Serve ``Application`` (a builder: ``import_path: trustlab.serve.app:build_app``)."""
    s = settings_from_args(args)
    opts = deployment_options(s)
    pre = Preprocess.options(name="preprocess", **opts["preprocess"]).bind(s)
    dets = {d["name"]: Detector.options(name=f"detector-{d['name']}", **opts[f"detector-{d['name']}"]).bind(d, s)
            for d in s["detectors"]}
    return Ingress.options(name="ingress", **opts["ingress"]).bind(pre, dets, s)


def __getattr__(name: str):
    """``trustlab.serve.app:app`` for ``serve build`` / ``serve run``: built from the YAML (or
    JSON) file of graph knobs named by ``$TRUSTLAB_SERVE_ARGS``."""
    if name == "app":
        path = os.environ.get("TRUSTLAB_SERVE_ARGS")
        if not path:
            raise AttributeError("trustlab.serve.app:app needs TRUSTLAB_SERVE_ARGS=<YAML file of graph knobs> "
                                 "(or use import_path trustlab.serve.app:build_app with args)")
        import yaml

        with open(path) as f:
            return build_app(yaml.safe_load(f) or {})
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def start(cfg: dict):
    """Deploy the graph (``cfg``: a whole trustlab config, or graph knobs) on the running or an
    embedded Ray cluster at serve.host:serve.port; returns the ingress handle."""
    from trustlab.platform.runtime import init_ray

    s = absolutize_local_paths(settings_from_args(cfg))
    var = s["auth"]["keys_env"]
    if var and os.environ.get(var) and var not in s["env"]:  # the API keys this process was given reach the
        s["env"] = {**s["env"], var: os.environ[var]}        # ingress on a joined cluster too
    apply_cluster_env(s, (cfg.get("ray") or {}).get("address"))
    init_ray(cfg if "ray" in cfg else None)
    verbose = bool((cfg.get("run") or {}).get("verbose"))  # Serve's controller and proxy chatter only then
    serve.start(http_options=http_options(s), logging_config={**logging_config(s),
                                                              "log_level": "INFO" if verbose else "WARNING"})
    handle = serve.run(build_app(s), name=s["app_name"], route_prefix=s["route_prefix"], blocking=False)
    base = f"http://{s['host']}:{s['port']}{s['route_prefix'].rstrip('/')}"
    names = [d["name"] for d in s["detectors"]]
    one = f"{base}/predict and " if len(names) == 1 else ""
    print(f"[trustlab] detection graph ({', '.join(names)}) on {one}{base}/v1/detect "
          f"(docs: {base}/docs, health: {base}/healthz)", flush=True)
    return handle


def port_free(host: str, port: int) -> bool:
    """Whether a new server could listen on ``host:port`` now."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, int(port)))
            return True
        except OSError:
            return False


def _haproxy_pids(node_id: str | None) -> list[int]:
    """This machine's HAProxy processes that Serve started for node ``node_id`` (their config
    lies under Serve's per-node folder ``.../haproxy-serve/<node id>/``)."""
    if not node_id:
        return []
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.path.basename(os.readlink(f"/proc/{pid}/exe")) != "haproxy":
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if any(f"/{node_id}/".encode() in c for c in cmd):
            out.append(int(pid))
    return out


def stop(s: dict, node_id: str | None, embedded: bool, timeout_s: float = 10.0) -> bool:
    """Shut Serve down (replicas get ``serve.shutdown_grace_s``), end HAProxy processes it left on
    this node, stop an embedded Ray, and wait until the port is free; returns whether it is."""
    import ray

    try:
        serve.shutdown()
    except Exception as e:  # noqa: BLE001 - the cluster may be gone already; the rest still runs
        print(f"[trustlab] serve.shutdown: {type(e).__name__}: {e}", flush=True)
    for pid in _haproxy_pids(node_id):  # Serve stops its HAProxy; one left over still holds the port
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if embedded:
        ray.shutdown()
    t0, free = time.time(), False
    while time.time() - t0 < timeout_s:
        free = port_free(s["host"], s["port"])
        if free:
            break
        time.sleep(0.2)
    return free


class _Stop(Exception):
    """Raised in the main thread by SIGTERM / SIGINT."""


def serve_forever(cfg: dict):
    """``python experiments/run.py mode=serve run.name=<run>`` (one detector) or
    ``mode=serve serve=graph serve.detectors=[...]``; runs until SIGTERM or Ctrl-C, then stops
    cleanly (``stop``) and prints one line."""
    import ray

    try:
        s = settings_from_args(cfg)
    except GraphConfigError as e:
        raise SystemExit(f"error: {e}") from None
    from trustlab.platform.runtime import init_ray

    address = (cfg.get("ray") or {}).get("address")
    embedded = not (ray.is_initialized() or address or os.environ.get("RAY_ADDRESS"))

    def on_signal(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the clean-up below is not interrupted
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise _Stop(signal.Signals(signum).name)

    apply_cluster_env(s, address)  # before Ray starts (an embedded cluster takes it from here)
    init_ray(cfg)
    # after ray.init, whose own handler would otherwise end the process on SIGTERM with a stack dump
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    why, node_id = "error", None  # a signal replaces it; anything else raised is reported after the clean-up
    try:
        start(cfg)
        node_id = ray.get_runtime_context().get_node_id()
        while True:
            time.sleep(3600)
    except _Stop as e:
        why = str(e)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if node_id is None and ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
        t0 = time.time()
        chatter = io.StringIO()  # Ray's own lines while Serve winds down (shown with run.verbose or on failure)
        quiet = not (cfg.get("run") or {}).get("verbose")
        with contextlib.redirect_stdout(chatter) if quiet else contextlib.nullcontext(), \
                contextlib.redirect_stderr(chatter) if quiet else contextlib.nullcontext():
            free = stop(s, node_id, embedded)
        if not free:
            print(chatter.getvalue(), end="", file=sys.stderr)
        print(f"[trustlab] {why}: detection graph stopped in {time.time() - t0:.1f}s; port {s['port']} "
              + ("free" if free else "STILL IN USE"), flush=True)

"""Settings of the detection graph: its knobs, validated into a plain dict, and what they imply
for Serve (deployment options, HTTP options, logging) and for the cluster (environment).

``experiments/conf/serve/graph.yaml`` is the one source of the knobs and their defaults: it is
read from the repository the package lives in (``graph_defaults``), by the driver and by a Serve
replica alike. Face finding and cropping in ``serve.video`` defaults to the training data plane
(``trustlab.platform.data.video.DEFAULTS``): a null there means the data plane's value.
"""
from __future__ import annotations

import copy
import functools
import math
import os
import re

import trustlab
from trustlab.platform.data.faces import CROPS, DETECTORS, TRACKS
from trustlab.platform.data.video import DECODERS
from trustlab.serve.fusion import METHODS as FUSION_METHODS
from trustlab.serve.fusion import Fusion, FusionError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(trustlab.__file__)))
CONF_DIR = os.path.join(REPO, "experiments", "conf")
GRAPH_YAML = os.path.join(CONF_DIR, "serve", "graph.yaml")
#: Keys a detector entry may set (a plain string entry is ``{"name": <string>}``).
DETECTOR_KEYS = ("name", "checkpoint", "method", "run", "num_replicas", "max_batch_size", "batch_wait_timeout_s",
                 "max_ongoing_requests", "num_cpus", "num_gpus", "torch_threads")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,47}$")
HANDLE_TRANSPORTS = ("grpc", "object_store")
FREE_MAPPINGS = ("env", "weights")  # mappings whose keys are the user's (not checked against the defaults)
#: name of the one detector made from ``serve.checkpoint`` when the knobs do not say which method it is
ONE_DETECTOR = "model"

# environment every Ray process of the cluster needs for ``serve.proxy`` and
# ``serve.throughput_optimized`` (read by Serve's controller, proxies and replicas when they start,
# so it is set before Ray starts: by ``start`` for an embedded cluster, on ``ray start`` / in the
# pod spec for a real one)
PROXY_ENV = {
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},  # HAProxy (C) on the HTTP port, forwarding to the ingress replicas' own HTTP servers
    "python": {},  # Serve's Python (uvicorn) proxy actor, then a handle call to the ingress
}
THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}  # Serve's bundle: gRPC handles, user code on the replica loop, buffered request logs, GC frozen at start
CLUSTER_ENV_KEYS = sorted({k for e in [*PROXY_ENV.values(), THROUGHPUT_ENV] for k in e})


class GraphConfigError(ValueError):
    """Graph settings that cannot work; the message says which knob and why."""


# ----------------------------------------------------------------------------- defaults
@functools.lru_cache(maxsize=1)
def _load_defaults() -> dict:
    import yaml

    if not os.path.isfile(GRAPH_YAML):
        raise FileNotFoundError(
            f"the detection graph's knobs and defaults are read from {GRAPH_YAML}, which is missing: run "
            "trustlab from a checkout of its repository (installed with `pip install -e .`, or shipped to Ray "
            "with --working-dir), which holds experiments/conf/serve/graph.yaml")
    with open(GRAPH_YAML) as f:
        d = yaml.safe_load(f)
    if not isinstance(d, dict):
        raise GraphConfigError(f"{GRAPH_YAML} must be a mapping of graph knobs")
    return d


def graph_defaults() -> dict:
    """Every knob of the graph with its default, from ``experiments/conf/serve/graph.yaml``."""
    return copy.deepcopy(_load_defaults())


def leaf_keys(d: dict, prefix: str = "") -> list[str]:
    """Dotted keys of the knobs of ``d`` (nested mappings walked, free mappings are one knob)."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and k not in FREE_MAPPINGS:
            out += leaf_keys(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


# ----------------------------------------------------------------------------- checks
def _merge(base: dict, over: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    unknown = sorted(set(over) - set(base))
    if unknown:
        raise GraphConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {', '.join(sorted(base))}")
    for k, v in over.items():
        if isinstance(base[k], dict) and k not in FREE_MAPPINGS:
            if not isinstance(v, dict):
                raise GraphConfigError(f"{where}.{k} must be a mapping, got {type(v).__name__}")
            out[k] = _merge(base[k], v, f"{where}.{k}")
        else:
            out[k] = copy.deepcopy(v)
    return out


def _positive(value, what: str, integer: bool = False, allow_zero: bool = False):
    try:
        v = int(value) if integer else float(value)
    except (TypeError, ValueError):
        raise GraphConfigError(f"{what} must be a number, got {value!r}") from None
    if integer and float(value) != v:
        raise GraphConfigError(f"{what} must be an integer, got {value!r}")
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise GraphConfigError(f"{what} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return v


def _number(integer: bool = False, allow_zero: bool = False):
    return lambda v, what: _positive(v, what, integer, allow_zero)


def _optional(check):
    return lambda v, what: None if v is None else check(v, what)


def _or_auto(check):
    return lambda v, what: v if v == "auto" else check(v, what)


def _kind(ok, wants: str):
    """A check that ``ok(value)`` holds; ``wants`` says what the knob must be."""
    def check(v, what):
        if not ok(v):
            raise GraphConfigError(f"{what} must be {wants}, got {v!r}")
        return v
    return check


def _one_of(*choices):
    return _kind(lambda v: isinstance(v, str) and v in choices, f"one of {', '.join(choices)}")


_flag = _kind(lambda v: isinstance(v, bool), "true or false")
_text = _kind(lambda v: isinstance(v, str) and bool(v), "a non-empty string")
_route = _kind(lambda v: isinstance(v, str) and v.startswith("/"), "a path starting with '/'")
_mapping = _kind(lambda v: isinstance(v, dict), "a mapping")


def _fraction(v, what):
    try:
        x = float(v)
    except (TypeError, ValueError):
        x = math.nan
    if not 0.0 <= x <= 1.0:
        raise GraphConfigError(f"{what} must be in [0, 1], got {v!r}")
    return x


def _above_one(v, what):
    x = _positive(v, what)
    if x <= 1.0:
        raise GraphConfigError(f"{what} must be > 1, got {v!r}")
    return x


def _env_name(v, what):
    if v is not None and not (isinstance(v, str) and re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", v)):
        raise GraphConfigError(f"{what} must be null or an environment variable name, got {v!r}")
    return v


def _uri_prefixes(v, what):
    """A list of ``s3://bucket/`` prefixes, each ending in '/' (so s3://in/ never admits s3://in-private/)."""
    if not isinstance(v, list) or not all(isinstance(x, str) and re.match(r"^s3://[^/]+/", x) and x.endswith("/")
                                          for x in v):
        raise GraphConfigError(f"{what} must be a list of s3://bucket/[prefix/] strings, each ending in '/', got {v!r}")
    return list(v)


def _detector_list(v, what):
    if isinstance(v, str):
        v = [x.strip() for x in v.split(",") if x.strip()]
    if not isinstance(v, list):
        raise GraphConfigError(f"{what} must be a list of detector names or mappings, got {v!r}")
    return v


_INT, _POS, _NONNEG = _number(integer=True), _number(), _number(allow_zero=True)
#: The check of every knob of graph.yaml (dotted key -> check(value, what) returning the clean value).
CHECKS = {
    "host": _text, "port": _INT, "route_prefix": _route, "app_name": _text,
    "detectors": _detector_list, "checkpoint": _optional(_text), "checkpoint_root": _optional(_text),
    "fusion.method": _one_of(*FUSION_METHODS), "fusion.weights": _mapping, "fusion.stacker": _optional(_text),
    "threshold": _fraction,
    "max_body_mb": _POS, "max_json_kb": _INT, "max_image_pixels": _INT, "max_video_frames": _INT,
    "max_video_seconds": _POS, "request_timeout_s": _POS,
    "inline_images": _flag, "handle_transport": _one_of(*HANDLE_TRANSPORTS), "access_log": _flag,
    "proxy": _one_of(*PROXY_ENV), "throughput_optimized": _flag,
    "video.frames": _INT, "video.clip_len": _INT, "video.stride": _INT, "video.face_size": _INT,
    "video.frame_side": _INT,
    # the face knobs (trustlab.platform.data.video.FACE_KNOBS) are checked once the data plane's values fill their nulls
    "video.face_detector": _one_of(*DETECTORS), "video.face_crop": _one_of(*CROPS),
    "video.face_scale": _POS, "video.face_score": _fraction, "video.face_track": _one_of(*TRACKS),
    "video.detect_every": _INT, "video.min_track_share": _fraction, "video.smooth": _INT,
    "video.decode_max_side": _optional(_INT), "video.decoder": _one_of(*DECODERS), "video.detect_width": _INT, "video.scale_factor": _above_one,
    "video.min_neighbors": _INT, "video.relaxed_neighbors": _optional(_INT),
    "batching.max_batch_size": _INT, "batching.batch_wait_timeout_s": _NONNEG, "batching.max_forward": _INT,
    "replicas.ingress": _or_auto(_INT), "replicas.preprocess": _or_auto(_INT), "replicas.detector": _or_auto(_INT),
    "resources.ingress_cpus": _NONNEG, "resources.preprocess_cpus": _NONNEG, "resources.detector_cpus": _POS,
    "resources.detector_gpus": _NONNEG, "resources.torch_threads": _optional(_INT),
    "max_ongoing_requests.ingress": _INT, "max_ongoing_requests.preprocess": _INT,
    "max_ongoing_requests.detector": _INT,
    "health_check_period_s": _POS, "health_check_timeout_s": _POS, "unhealthy_after_errors": _INT,
    "shutdown_grace_s": _POS,
    "env": _mapping, "s3_endpoint": _optional(_text),
    "auth.keys_env": _env_name, "auth.keys_file": _optional(_text), "allowed_uri_prefixes": _uri_prefixes,
}


def _check_knobs(s: dict) -> None:
    """Run every knob's check in place; a knob of graph.yaml without a check is a bug here."""
    missing = sorted(set(leaf_keys(_load_defaults())) - set(CHECKS))
    if missing:
        raise GraphConfigError(f"graph knob(s) {missing} of {GRAPH_YAML} have no check in trustlab.serve.settings")
    for key, check in CHECKS.items():
        *parents, leaf = key.split(".")
        node = s
        for p in parents:
            node = node[p]
        node[leaf] = check(node[leaf], f"serve.{key}")


def _face_defaults(video: dict) -> None:
    """Fill the null face knobs of ``serve.video`` with the training data plane's values; refuse
    aligned crops from a detector without landmarks (``haar``)."""
    from trustlab.platform.data.video import DEFAULTS as DATA
    from trustlab.platform.data.video import FACE_KNOBS

    for k in FACE_KNOBS:
        if video[k] is None:
            video[k] = DATA[k]
    if video["face_detector"] == "haar" and video["face_crop"] == "aligned":
        raise GraphConfigError("serve.video.face_crop=aligned needs landmarks and face_detector=haar gives none: "
                               "set serve.video.face_crop=box")


def _detector_entry(d, s: dict) -> dict:
    if isinstance(d, str):
        d = {"name": d}
    if not isinstance(d, dict):
        raise GraphConfigError(f"a detector entry must be a name or a mapping, got {d!r}")
    unknown = sorted(set(d) - set(DETECTOR_KEYS))
    if unknown:
        raise GraphConfigError(f"unknown key(s) {unknown} in detector entry {d!r}; valid keys: {', '.join(DETECTOR_KEYS)}")
    name, run = str(d.get("name") or d.get("method") or ""), d.get("run")
    ckpt, method = d.get("checkpoint"), d.get("method")
    if "@" in name:  # "f2c@my-run": the detector f2c, the model of f2c's run my-run
        name, _, run = name.partition("@")
        method = method or name
    if not NAME_RE.match(name):
        raise GraphConfigError(f"detector name {name!r} must match {NAME_RE.pattern} (it names a deployment)")
    if not ckpt:
        ckpt, method = _registry_checkpoint(name, method, run, s)
    b, r, mo = s["batching"], s["resources"], s["max_ongoing_requests"]
    cpus = _positive(d.get("num_cpus", r["detector_cpus"]), f"detector {name}: num_cpus")
    threads = d.get("torch_threads", r["torch_threads"])
    threads = int(_positive(threads, f"detector {name}: torch_threads", integer=True)) if threads is not None \
        else max(1, int(round(cpus)))
    mbs = int(_positive(d.get("max_batch_size", b["max_batch_size"]), f"detector {name}: max_batch_size", integer=True))
    reps = d.get("num_replicas", s["replicas"]["detector"])
    if reps != "auto":
        reps = int(_positive(reps, f"detector {name}: num_replicas", integer=True))
    return {
        "name": name,
        "checkpoint": str(ckpt),
        "method": method,
        "num_replicas": reps,
        "max_batch_size": mbs,
        "batch_wait_timeout_s": _positive(d.get("batch_wait_timeout_s", b["batch_wait_timeout_s"]),
                                          f"detector {name}: batch_wait_timeout_s", allow_zero=True),
        # a replica must accept at least a full batch, or batches never fill
        "max_ongoing_requests": max(mbs, int(_positive(d.get("max_ongoing_requests", mo["detector"]),
                                                        f"detector {name}: max_ongoing_requests", integer=True))),
        "num_cpus": cpus,
        "num_gpus": _positive(d.get("num_gpus", r["detector_gpus"]), f"detector {name}: num_gpus", allow_zero=True),
        "torch_threads": threads,
    }


def _registry_checkpoint(name: str, method: str | None, run: str | None, s: dict) -> tuple[str, str | None]:
    """A detector given without a checkpoint -> ``(checkpoint, method)`` from ``serve.checkpoint_root``:
    an s3:// root (or a local one that does not exist here) holds ``<name>/model.pt``; a local runs
    root is searched by the model registry (``trustlab.platform.runs``): the exported folder
    ``<root>/<name>/`` if there is one, else the run ``run`` or the newest finished run of the
    detector's method (``method``, default the detector's name)."""
    from trustlab.platform import storage
    from trustlab.platform.runs import ModelNotFound, find_run

    root = s.get("checkpoint_root")
    if not root:
        raise GraphConfigError(f"detector {name!r} has no checkpoint and serve.checkpoint_root is not set")
    root = str(root)
    if storage.is_s3(root) or not os.path.isdir(root):
        if run:
            raise GraphConfigError(f"detector {name!r}: runs (@{run}) are found in a local runs root; "
                                   f"{root} is not one")
        return f"{root.rstrip('/')}/{name}/model.pt", method
    folder = os.path.join(root, name)
    if not run and any(os.path.isfile(os.path.join(folder, f)) for f in ("model.pt", "model.safetensors")):
        return folder, method
    try:
        rec = find_run(root, method or (None if run else name), run)
    except ModelNotFound as e:
        raise GraphConfigError(f"detector {name!r}: {e}") from None
    return rec.checkpoint, method or rec.method


def _from_trustlab_config(cfg: dict) -> tuple[dict, str]:
    """A whole trustlab config -> (its ``serve`` knobs, the name of a one-detector graph's detector).
    ``run.s3_endpoint`` is the default S3 endpoint; with no detectors listed and no
    ``serve.checkpoint``, the run's best checkpoint (``<run.root>/<run.name>/checkpoints/best.pt``)
    is the one detector."""
    args = dict(cfg["serve"])
    run = cfg.get("run") or {}
    if "detectors" not in args:
        raise GraphConfigError("mode=serve needs the graph's knobs in the serve group (serve=default or serve=graph, "
                               "experiments/conf/serve/graph.yaml)")
    if run.get("s3_endpoint") and not args.get("s3_endpoint"):
        args["s3_endpoint"] = run["s3_endpoint"]
    if not args.get("detectors") and not args.get("checkpoint") and run.get("name"):
        args["checkpoint"] = os.path.join(str(run.get("root") or "outputs"), str(run["name"]), "checkpoints", "best.pt")
    if args.get("detectors") and not args.get("checkpoint_root"):  # detectors by name: the runs under run.root
        args["checkpoint_root"] = str(run.get("root") or "outputs")
    return args, str((cfg.get("method") or {}).get("name") or ONE_DETECTOR)


def settings_from_args(args: dict | None) -> dict:
    """Graph settings from builder ``args``: the knobs of ``conf/serve/graph.yaml`` (defaults for
    any left out) or a whole trustlab config (its ``serve`` group; see ``_from_trustlab_config``).
    With no detectors listed, ``checkpoint`` is served as the one detector. Unknown keys and
    impossible values raise ``GraphConfigError``."""
    args, one_name = dict(args or {}), ONE_DETECTOR
    if isinstance(args.get("serve"), dict) and "method" in args:  # a whole trustlab config
        args, one_name = _from_trustlab_config(args)
    s = _merge(graph_defaults(), args, "serve")
    _face_defaults(s["video"])
    _check_knobs(s)
    dets = s["detectors"]
    if dets and s["checkpoint"]:
        raise GraphConfigError("serve.checkpoint serves one detector when serve.detectors is empty; with "
                               "serve.detectors listed, give each its checkpoint (or serve.checkpoint_root)")
    if not dets and s["checkpoint"]:
        dets = [{"name": one_name, "checkpoint": s["checkpoint"]}]
        s["checkpoint"] = None  # it is the detector's now: the settings read back the same
    if not dets:
        raise GraphConfigError("serve.detectors is empty: list the detectors to serve, e.g. serve=graph "
                               "'serve.detectors=[f2c,stdt]' serve.checkpoint_root=s3://bucket/models, or serve one "
                               "with serve.checkpoint=<model.pt> or run.name=<a trained run>")
    s["detectors"] = [_detector_entry(d, s) for d in dets]
    names = [d["name"] for d in s["detectors"]]
    if len(set(names)) != len(names):
        raise GraphConfigError(f"detector names must be distinct, got {names}")
    s["env"] = {str(k): str(v) for k, v in s["env"].items()}
    f = s["fusion"]
    try:  # checks the method and the weights now; the stacker file is read by the ingress replica
        Fusion(f["method"], f["weights"], {"kind": "logistic_stacker", "detectors": names, "coef": [0.0] * len(names),
                                           "fill": [0.0] * len(names), "intercept": 0.0}, names)
    except FusionError as e:
        raise GraphConfigError(f"serve.fusion: {e}") from None
    if f["method"] == "logistic" and not f["stacker"]:
        raise GraphConfigError("serve.fusion.method=logistic needs serve.fusion.stacker (a stacker JSON, local or s3://)")
    return s


def absolutize_local_paths(s: dict) -> dict:
    """Relative local checkpoint/stacker paths -> absolute (replicas do not share the driver's cwd)."""
    from trustlab.platform import storage

    s = copy.deepcopy(s)
    for d in s["detectors"]:
        if not storage.is_s3(d["checkpoint"]):
            d["checkpoint"] = os.path.abspath(d["checkpoint"])
    st = s["fusion"].get("stacker")
    if st and not storage.is_s3(st):
        s["fusion"]["stacker"] = os.path.abspath(st)
    return s


# ----------------------------------------------------------------------------- Serve options
def logging_config(s: dict) -> dict:
    """Serve logging of the graph's deployments and of the proxy/controller (``serve.start``, config files)."""
    return {"enable_access_log": bool(s["access_log"])}


def http_options(s: dict) -> dict:
    # the proxy's end-to-end timeout is a backstop behind the ingress's own deadline
    return {"host": s["host"], "port": int(s["port"]), "request_timeout_s": float(s["request_timeout_s"]) + 10.0}


def deployment_options(s: dict) -> dict:
    """Deployment name -> Serve options, as ``build_app`` applies them (and config_gen writes them)."""
    grace = float(s["shutdown_grace_s"])
    # read by Serve in the replica process: how long a stopping ingress replica stays reachable behind HAProxy
    env = {**s["env"], "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": f"{grace / 2:g}"}

    def actor(cpus, gpus=0.0):
        o = {"num_cpus": float(cpus), "runtime_env": {"env_vars": dict(env)}}
        if gpus:
            o["num_gpus"] = float(gpus)
        return o

    common = {"health_check_period_s": float(s["health_check_period_s"]),
              "health_check_timeout_s": float(s["health_check_timeout_s"]),
              "graceful_shutdown_timeout_s": grace, "graceful_shutdown_wait_loop_s": min(2.0, grace / 4),
              "logging_config": logging_config(s)}
    r, mo, res = s["replicas"], s["max_ongoing_requests"], s["resources"]
    out = {
        "ingress": {"num_replicas": r["ingress"], "max_ongoing_requests": mo["ingress"],
                    "ray_actor_options": actor(res["ingress_cpus"]), **common},
        "preprocess": {"num_replicas": r["preprocess"], "max_ongoing_requests": mo["preprocess"],
                       "ray_actor_options": actor(res["preprocess_cpus"]), **common},
    }
    for d in s["detectors"]:
        out[f"detector-{d['name']}"] = {
            "num_replicas": d["num_replicas"], "max_ongoing_requests": d["max_ongoing_requests"],
            "ray_actor_options": actor(d["num_cpus"], d["num_gpus"]),
            "user_config": {"max_batch_size": d["max_batch_size"], "batch_wait_timeout_s": d["batch_wait_timeout_s"]},
            **common}
    return out


# ----------------------------------------------------------------------------- cluster environment
def cluster_env(s: dict) -> dict:
    """Environment variables the cluster needs for the graph's ``serve.proxy`` and
    ``serve.throughput_optimized``."""
    env = dict(PROXY_ENV[s.get("proxy", "haproxy")])
    if s.get("throughput_optimized", True):
        env.update(THROUGHPUT_ENV)
    return env


def apply_cluster_env(s: dict, address: str | None = None) -> bool:
    """Before this process starts Ray: put ``cluster_env`` into its environment (an embedded
    cluster inherits it; the other keys of ``CLUSTER_ENV_KEYS`` are removed). When joining a
    running cluster (Ray already initialised, ``address``, or ``RAY_ADDRESS``) nothing can change
    how its Serve was started: returns whether this process's environment agrees (and prints a
    warning when it does not)."""
    import ray

    env = cluster_env(s)
    joining = ray.is_initialized() or bool(address) or bool(os.environ.get("RAY_ADDRESS"))
    if not joining:
        for k in CLUSTER_ENV_KEYS:
            os.environ.pop(k, None)
        os.environ.update(env)
        return True
    have = {k: os.environ[k] for k in CLUSTER_ENV_KEYS if os.environ.get(k) == "1"}
    if have != env:
        want = " ".join(f"{k}=1" for k in env) or "none of " + ", ".join(CLUSTER_ENV_KEYS)
        print(f"[trustlab] warning: serve.proxy={s.get('proxy')} serve.throughput_optimized="
              f"{s.get('throughput_optimized', True)} need {want} in every Ray process, but this one has "
              f"{have or 'none'}; Serve runs as the cluster was started (set them on `ray start`, or in "
              f"the pod spec)", flush=True)
    return have == env

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
- ``start(cfg)`` / ``serve_forever(cfg)``: ``python experiments/run.py mode=serve ...``.
"""
import os
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


def start(cfg: dict, blocking: bool = False):
    """Deploy the graph (``cfg``: a whole trustlab config, or graph knobs) on the running or an
    embedded Ray cluster at serve.host:serve.port; returns the ingress handle."""
    from trustlab.platform.runtime import init_ray

    s = absolutize_local_paths(settings_from_args(cfg))
    apply_cluster_env(s, (cfg.get("ray") or {}).get("address"))
    init_ray(cfg if "ray" in cfg else None)
    serve.start(http_options=http_options(s), logging_config=logging_config(s))
    handle = serve.run(build_app(s), name=s["app_name"], route_prefix=s["route_prefix"], blocking=False)
    base = f"http://{s['host']}:{s['port']}{s['route_prefix'].rstrip('/')}"
    names = [d["name"] for d in s["detectors"]]
    one = f"{base}/predict and " if len(names) == 1 else ""
    print(f"[trustlab] detection graph ({', '.join(names)}) on {one}{base}/v1/detect "
          f"(docs: {base}/docs, health: {base}/healthz)", flush=True)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return handle


def serve_forever(cfg: dict):
    """``python experiments/run.py mode=serve run.name=<run>`` (one detector) or
    ``mode=serve serve=graph serve.detectors=[...]``."""
    try:
        settings_from_args(cfg)
    except GraphConfigError as e:
        raise SystemExit(f"error: {e}") from None
    start(cfg, blocking=True)

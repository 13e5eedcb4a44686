"""Generate (and validate) the Serve config YAML of the detection graph and the KubeRay
RayService manifest that embeds it.

    # a Serve config for `serve deploy` / `serve run` (same overrides as experiments/run.py)
    python -m trustlab.serve.config_gen --serve-config serve_config.yaml \\
        serve=graph "serve.detectors=[f2c,stdt]" serve.checkpoint_root=s3://bucket/models
    # the RayService manifest (cluster/kuberay/rayservice.yaml is made this way; its header has the command)
    python -m trustlab.serve.config_gen --rayservice cluster/kuberay/rayservice.yaml serve=graph ...

The Serve config is one application, ``import_path: trustlab.serve.app:build_app`` with the
graph knobs as ``args`` and a ``deployments`` list holding the options ``build_app`` applies
(Serve applies that list last, so operators tune replicas, resources and batch sizes there).

Validation (``validate_serve_config``), run on everything this module writes:

1. every key must be a field of Ray's ``ServeDeploySchema`` (or of the nested schema it belongs
   to: applications, deployments, ray_actor_options, http_options, ...) -- Ray's schemas ignore
   unknown keys or accept them silently, so a typo such as ``num_replica`` would otherwise deploy
   with the default;
2. ``ServeDeploySchema.model_validate`` (types, ranges, unique names and routes);
3. the ``args`` of a trustlab graph application must be valid graph knobs
   (``trustlab.serve.settings.settings_from_args``) and its ``deployments`` must name deployments
   that the graph builds.
"""
from __future__ import annotations

import copy
import os
import shlex
import sys
import typing

import yaml

from trustlab.serve.settings import (CONF_DIR, GraphConfigError, cluster_env, deployment_options, http_options,
                                     logging_config, settings_from_args)

IMPORT_PATH = "trustlab.serve.app:build_app"
SERVE_PORT = 8000
K8S_REPO_DIR = "/home/ray/trustlab"
PATH_ENV = f"{K8S_REPO_DIR}/.venv/bin:/home/ray/anaconda3/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
GIT_URL = "https://github.com/trustlab/trustlab.git"


class ServeConfigError(ValueError):
    """A Serve config that Ray or the graph would reject (or silently misread); lists every problem."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__(f"{len(errors)} problem(s) in the Serve config:\n  " + "\n  ".join(errors))


# ----------------------------------------------------------------------------- unknown keys
def _models(annotation) -> list:
    """The pydantic models a field annotation admits, or [] when it also admits a free mapping."""
    from pydantic import BaseModel

    found, free = [], False

    def walk(a):
        nonlocal free
        origin = typing.get_origin(a)
        if origin in (dict, typing.Dict) or a in (dict, typing.Any):
            free = True
        elif isinstance(a, type) and issubclass(a, BaseModel):
            found.append(a)
        for sub in typing.get_args(a):
            walk(sub)

    walk(annotation)
    return [] if free else found


def unknown_keys(obj, model=None, path: str = "") -> list[str]:
    """Dotted paths of keys in ``obj`` that are no field (or alias) of ``model`` or of the nested
    models its fields hold (default model: Ray's ``ServeDeploySchema``)."""
    if model is None:
        from ray.serve.schema import ServeDeploySchema as model
    if not isinstance(obj, dict):
        return []
    fields = {}
    for name, f in model.model_fields.items():
        fields[name] = f
        if f.alias:
            fields[f.alias] = f
    out = []
    for k, v in obj.items():
        if k not in fields:
            out.append(f"{path}{k}")
            continue
        subs = _models(fields[k].annotation)
        if len(subs) != 1:
            continue
        if isinstance(v, dict):
            out += unknown_keys(v, subs[0], f"{path}{k}.")
        elif isinstance(v, list):
            for i, item in enumerate(v):
                out += unknown_keys(item, subs[0], f"{path}{k}[{i}].")
    return out


def validate_serve_config(config: dict):
    """Raise ``ServeConfigError`` listing every problem; return the parsed ``ServeDeploySchema``."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    errors = [f"{p}: unknown key (not a field of Ray's Serve config schema)" for p in unknown_keys(config)]
    parsed = None
    try:
        parsed = ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        for err in e.errors():
            errors.append(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}")
    for i, app in enumerate(config.get("applications") or []):
        if not isinstance(app, dict) or app.get("import_path") != IMPORT_PATH:
            continue
        try:
            s = settings_from_args(app.get("args") or {})
        except GraphConfigError as e:
            errors.append(f"applications[{i}].args: {e}")
            continue
        built = set(deployment_options(s))
        for j, d in enumerate(app.get("deployments") or []):
            if isinstance(d, dict) and d.get("name") not in built:
                errors.append(f"applications[{i}].deployments[{j}].name: {d.get('name')!r} is not a deployment of "
                              f"the graph ({', '.join(sorted(built))})")
    if errors:
        raise ServeConfigError(errors)
    return parsed


# ----------------------------------------------------------------------------- Serve config
def graph_settings(overrides: list[str]) -> dict:
    """Compose the trustlab config like experiments/run.py and return the graph settings."""
    from trustlab.platform.config import compose

    return settings_from_args(compose(CONF_DIR, list(overrides)))


def serve_config(settings: dict, host: str | None = None, port: int | None = None) -> dict:
    """The Serve config (``ServeDeploySchema`` shape) of one graph application."""
    s = copy.deepcopy(settings)
    args = {k: v for k, v in s.items() if k not in ("host", "port", "app_name", "route_prefix")}
    args["detectors"] = [{k: v for k, v in d.items() if v is not None} for d in s["detectors"]]
    http = http_options(s)
    if host is not None:
        http["host"] = host
    if port is not None:
        http["port"] = int(port)
    deployments = [{"name": name, **opts} for name, opts in deployment_options(s).items()]
    cfg = {
        "proxy_location": "EveryNode",
        "http_options": http,
        "logging_config": logging_config(s),
        "applications": [{
            "name": s["app_name"],
            "route_prefix": s["route_prefix"],
            "import_path": IMPORT_PATH,
            "args": args,
            "deployments": deployments,
        }],
    }
    validate_serve_config(cfg)
    return cfg


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the embedded Serve config) as literal blocks, readable in the manifest."""


def _str(dumper, value):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(obj) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


# ----------------------------------------------------------------------------- RayService
def _image(gpu: bool = False) -> str:
    import ray

    py = f"{sys.version_info.major}{sys.version_info.minor}"
    return f"rayproject/ray:{ray.__version__}-py{py}{'-gpu' if gpu else ''}"


def _pod(component: str, container: str, gpu: bool, cpu: str, memory: str, head: bool,
         env: dict | None = None) -> dict:
    """A pod template that installs the project the README's way (scripts/setup.sh) into a
    pod-local volume in an init container and runs Ray from that venv (as raycluster.yaml does)."""
    image = _image(gpu)
    ports = [{"containerPort": SERVE_PORT, "name": "serve"}]
    if head:
        ports = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                 {"containerPort": 10001, "name": "client"}] + ports
    resources = {"cpu": cpu, "memory": memory}
    if gpu:
        resources["nvidia.com/gpu"] = "1"
    ray_c = {
        "name": container,
        "image": image,
        "env": [{"name": "PATH", "value": PATH_ENV}, {"name": "VIRTUAL_ENV", "value": f"{K8S_REPO_DIR}/.venv"}]
        + [{"name": k, "value": str(v)} for k, v in sorted((env or {}).items())],
        "envFrom": [{"secretRef": {"name": "trustlab-s3", "optional": True}},
                    {"secretRef": {"name": "trustlab-api-keys", "optional": True}}],
        "ports": ports,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "volumeMounts": [{"name": "trustlab", "mountPath": K8S_REPO_DIR}],
    }
    if not head:
        ray_c["lifecycle"] = {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}}
    spec = {
        "serviceAccountName": "trustlab-ray",
        "initContainers": [{
            "name": "install-trustlab",
            "image": image,
            "command": ["/bin/bash", "-c"],
            "args": [f'git clone --depth 1 --branch "$TRUSTLAB_GIT_REF" "$TRUSTLAB_GIT_URL" {K8S_REPO_DIR} '
                     f"&& bash {K8S_REPO_DIR}/scripts/setup.sh"],
            "env": [{"name": "TRUSTLAB_GIT_URL", "value": GIT_URL}, {"name": "TRUSTLAB_GIT_REF", "value": "main"}],
            "volumeMounts": [{"name": "trustlab", "mountPath": K8S_REPO_DIR}],
            "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
        }],
        "containers": [ray_c],
        "volumes": [{"name": "trustlab", "emptyDir": {}}],
    }
    if gpu:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": {"app.kubernetes.io/name": "trustlab", "app.kubernetes.io/component": component}},
            "spec": spec}


def rayservice_manifest(settings: dict, name: str = "trustlab-serve") -> dict:
    """A RayService (ray.io/v1) whose ``serveConfigV2`` is the graph's Serve config (HTTP on
    0.0.0.0:8000, KubeRay's serve port) and whose cluster has a CPU-only head (Serve controller
    and proxy), an autoscaled CPU group (ingress, preprocessing, CPU detectors) and an autoscaled
    GPU group (detectors with num_gpus > 0)."""
    import ray

    sc = serve_config(settings, host="0.0.0.0", port=SERVE_PORT)
    env = cluster_env(settings)  # serve.proxy / throughput_optimized: every Ray container starts with it
    gpus = sum(float(d["num_gpus"]) * (d["num_replicas"] if isinstance(d["num_replicas"], int) else 1)
               for d in settings["detectors"])
    workers = [{
        "groupName": "cpu-serve",
        "replicas": 1, "minReplicas": 1, "maxReplicas": 4,
        "rayStartParams": {},
        "template": _pod("ray-worker-cpu", "ray-worker", False, "8", "16Gi", head=False, env=env),
    }]
    if gpus > 0:
        workers.append({
            "groupName": "gpu-1x",
            "replicas": max(1, int(-(-gpus // 1))), "minReplicas": max(1, int(-(-gpus // 1))), "maxReplicas": 4,
            "rayStartParams": {},
            "template": _pod("ray-worker-gpu", "ray-worker", True, "7", "28Gi", head=False, env=env),
        })
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "trustlab",
                                              "app.kubernetes.io/component": "serve"}},
        "spec": {
            "serveConfigV2": dump(sc),
            "rayClusterConfig": {
                "rayVersion": ray.__version__,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"version": "v2", "upscalingMode": "Default", "idleTimeoutSeconds": 600},
                "headGroupSpec": {
                    "serviceType": "ClusterIP",
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": _pod("ray-head", "ray-head", False, "4", "16Gi", head=True, env=env),
                },
                "workerGroupSpecs": workers,
            },
        },
    }


def header(argv: list[str], overrides: list[str], what: str, settings: dict, name: str = "trustlab-serve") -> str:
    cmd = "python -m trustlab.serve.config_gen " + " ".join(shlex.quote(a) for a in argv)
    names = ", ".join(d["name"] for d in settings["detectors"])
    lines = [
        f"# {what} of the trustlab detection graph ({names}). GENERATED -- do not edit; regenerate with:",
        f"#   {cmd}",
        "# (the overrides are those of experiments/run.py; the knobs are documented in experiments/conf/serve/graph.yaml).",
    ]
    if what == "RayService":
        ov = " ".join(shlex.quote(a) for a in overrides)
        lines += [
            "#",
            "#   kubectl apply -f cluster/kuberay/rayservice.yaml",
            f"#   kubectl port-forward svc/{name}-serve-svc 8000:8000",
            "#   curl -F file=@photo.jpg http://127.0.0.1:8000/v1/detect      # OpenAPI: http://127.0.0.1:8000/docs",
            "#",
            "# The same graph on one machine (checkpoints local or s3://):",
            f"#   python experiments/run.py mode=serve {ov}",
            "# Pods install the project like raycluster.yaml does (init container: git clone + scripts/setup.sh)",
            "# and read checkpoints from S3 through the service account trustlab-ray or the optional Secret",
            "# trustlab-s3 (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL). API keys (serve.auth): the optional",
            "# Secret trustlab-api-keys (TRUSTLAB_API_KEYS=key1,key2); with it, requests need 'Authorization: Bearer <key>'.",
        ]
    return "\n".join(lines) + "\n"


def _split_argv(argv: list[str]):
    opts, overrides, i = {}, [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--serve-config", "--rayservice", "--name"):
            if i + 1 >= len(argv):
                raise SystemExit(f"error: {a} needs a value")
            opts[a[2:]] = argv[i + 1]
            i += 2
        elif a in ("-h", "--help"):
            print(__doc__)
            raise SystemExit(0)
        elif a.startswith("--"):
            raise SystemExit(f"error: unknown option {a}; options: --serve-config PATH, --rayservice PATH, --name NAME")
        else:
            overrides.append(a)
            i += 1
    return opts, overrides


def generate(argv: list[str]) -> dict:
    """Write what ``argv`` asks for; returns ``{"serve-config": text, "rayservice": text}``."""
    from trustlab.platform.config import ConfigError

    opts, overrides = _split_argv(argv)
    if not opts.get("serve-config") and not opts.get("rayservice"):
        raise SystemExit("error: give --serve-config PATH and/or --rayservice PATH")
    try:
        s = graph_settings(overrides)
    except (ConfigError, GraphConfigError) as e:
        raise SystemExit(f"error: {e}") from None
    out = {}
    if opts.get("serve-config"):
        text = header(argv, overrides, "Serve config", s) + dump(serve_config(s))
        out["serve-config"] = text
        _write(opts["serve-config"], text)
    if opts.get("rayservice"):
        name = opts.get("name", "trustlab-serve")
        doc = rayservice_manifest(s, name)
        text = header(argv, overrides, "RayService", s, name) + dump(doc)
        out["rayservice"] = text
        _write(opts["rayservice"], text)
    return out


def _write(path: str, text: str) -> None:
    if path == "-":
        sys.stdout.write(text)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}", file=sys.stderr)


def main(argv=None) -> int:
    generate(list(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cluster launch files, checked offline: the `ray up` YAMLs against the ray-schema.json of the
installed Ray (unknown keys rejected) and the checks `ray up` makes after merging its defaults;
the KubeRay manifests against the CRDs in ../shared/schemas/kuberay with unknown fields rejected;
versions against the pinned Ray; the install against the README's; the job's entrypoint and
working_dir against this repository."""
import copy
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, compose
from tools import cluster_schema as cs

SHARED = os.path.join(REPO, "..", "shared")
CRD_DIR = os.path.join(SHARED, "schemas", "kuberay")
RAY_UP = ["cluster/aws.yaml", "cluster/gcp.yaml"]
# every manifest in cluster/kuberay is checked (the RayService joins when it is written)
KUBERAY = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "cluster", "kuberay", "*.yaml")))
INSTALL = "bash scripts/setup.sh"          # the README's install
REMOTE = "~/trustlab"                       # where the ray-up nodes keep the repository
IMAGE_RE = re.compile(r"^rayproject/ray:(?P<ver>\d+\.\d+\.\d+)-py(?P<py>\d+)(?P<gpu>-gpu)?$")


def load(rel):
    return cs.load_yaml_docs(os.path.join(REPO, rel))


def walk(obj, path=()):
    """(path, key, value) for every mapping entry in a nested structure."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield path, k, v
            yield from walk(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from walk(v, path + (i,))


def pod_specs(doc):
    """Every pod template spec of a RayCluster / RayJob (head, worker groups, submitter)."""
    out = []
    for path, k, v in walk(doc):
        if k == "template" and isinstance(v, dict) and "spec" in v and "containers" in v["spec"]:
            out.append(("/".join(map(str, path)), v["spec"]))
        if k == "submitterPodTemplate":
            out.append(("submitter", v["spec"]))
    return out


def test_manifest_lists_are_complete():
    assert {"cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml"} <= set(KUBERAY)
    assert os.path.isdir(CRD_DIR), f"KubeRay CRDs expected beside the repo at {CRD_DIR}"


# ----------------------------------------------------------------------------- ray up
@pytest.mark.parametrize("rel", RAY_UP)
def test_ray_up_config_matches_shipped_schema(rel):
    import jsonschema
    import ray.autoscaler

    schema_path = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")
    assert os.path.exists(schema_path)
    (config,) = load(rel)
    schema = cs.ray_up_schema()
    # the schema itself closes the top level and every node type to unknown keys
    assert schema["additionalProperties"] is False
    assert schema["properties"]["available_node_types"]["patternProperties"][".*"]["additionalProperties"] is False
    jsonschema.Draft7Validator(schema).validate(config)
    # ... plus the provider key check and ray up's own checks after merging its defaults
    assert cs.ray_up_errors(config) == []


@pytest.mark.parametrize("mutate, expect", [
    (lambda c: c.update(max_worker=3), "max_worker"),                                   # top-level typo
    (lambda c: c["available_node_types"]["head"].update(min_worker=1), "min_worker"),   # node-type typo
    (lambda c: c["provider"].update(regoin="us-east-1"), "regoin"),                     # provider typo
    (lambda c: c["docker"].update(imgae="x"), "imgae"),                                 # docker typo
    (lambda c: c["available_node_types"]["head"]["resources"].update(CPU=0.5), "0.5"),  # resources are integers
    (lambda c: c.update(head_node_type="nope"), "head_node_type"),                     # ray up's own check
    (lambda c: c.update(max_workers=0) or c["available_node_types"]["cpu_data"].update(min_workers=1),
     "max_workers"),
])
def test_ray_up_check_rejects_bad_configs(mutate, expect):
    (config,) = load("cluster/aws.yaml")
    bad = copy.deepcopy(config)
    mutate(bad)
    errors = cs.ray_up_errors(bad)
    assert errors and any(expect in e for e in errors), errors


@pytest.mark.parametrize("rel", RAY_UP)
def test_ray_up_node_types_and_autoscaling_bounds(rel):
    (c,) = load(rel)
    types = c["available_node_types"]
    head = types[c["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and "GPU" not in head["resources"]
    workers = {k: v for k, v in types.items() if k != c["head_node_type"]}
    gpu = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) >= 1}
    cpu = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) == 0}
    assert len(gpu) >= 2 and any(v["resources"]["GPU"] > 1 for v in gpu.values()), "1-GPU and multi-GPU types"
    assert cpu and all(v["resources"]["CPU"] >= 8 for v in cpu.values()), "a CPU type for data work"
    for name, t in workers.items():
        assert 0 == t["min_workers"] <= t["max_workers"] <= c["max_workers"], name  # scale to zero, capped
    assert c["max_workers"] >= max(t["max_workers"] for t in workers.values())
    assert 0 < c["idle_timeout_minutes"] <= 30 and c["upscaling_speed"] > 0


@pytest.mark.parametrize("rel", RAY_UP)
def test_ray_up_installs_the_project_like_the_readme(rel):
    (c,) = load(rel)
    assert c["file_mounts"][REMOTE] == ".", "the repository is synced from where `ray up` runs"
    assert f"cd {REMOTE} && {INSTALL}" in c["setup_commands"]
    venv_ray = f"{REMOTE}/.venv/bin/ray"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [cmd for cmd in c[key] if " start " in cmd]
        assert starts and all(venv_ray + " start" in cmd for cmd in starts), (key, c[key])
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in " ".join(c["head_start_ray_commands"])
    # what scripts/setup.sh does is what these commands rely on: .venv with the project installed
    setup = open(os.path.join(REPO, "scripts", "setup.sh")).read()
    assert "-m venv .venv" in setup and "pip install" in setup and "-e '.[test]'" in setup
    # the README installs through scripts/*.sh, each of which runs that same setup script
    readme = open(os.path.join(REPO, "README.md")).read()
    scripts = set(re.findall(r"bash (scripts/\w+\.sh)", readme))
    assert scripts, "README names no install script"
    for script in scripts - {"scripts/setup.sh"}:
        assert INSTALL in open(os.path.join(REPO, script)).read(), f"{script} no longer runs {INSTALL}"
    # git history and a local data/ folder never ship; trustlab/platform/data (code) does
    assert "**/.git" in c["rsync_exclude"] and "/data" in c["rsync_exclude"]
    assert ".gitignore" in c["rsync_filter"]


@pytest.mark.parametrize("rel", RAY_UP)
def test_ray_up_storage_is_object_storage(rel, monkeypatch):
    # dummy keys: building the filesystem then never probes the EC2 metadata service
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    (c,) = load(rel)
    meta = c["metadata"]["trustlab"]
    assert meta["storage"].startswith("s3://")
    cfg = compose(["method=f2c", f"run.storage={meta['storage']}"] +
                  ([f"run.s3_endpoint={meta['s3_endpoint']}"] if "s3_endpoint" in meta else []))
    from trustlab.platform.train import storage_for

    path, fs = storage_for(cfg, "/nonexistent-run-dir")
    assert fs is not None and type(fs).__name__ == "S3FileSystem"
    assert path == meta["storage"][len("s3://"):]
    if c["provider"]["type"] == "aws":  # every worker type reaches S3 through an instance profile
        for name, t in c["available_node_types"].items():
            if name != c["head_node_type"]:
                assert "IamInstanceProfile" in t["node_config"], name
        # pyarrow gets the region from AWS_DEFAULT_REGION: the nodes' own region
        assert any(f"export AWS_DEFAULT_REGION={c['provider']['region']}" in cmd for cmd in c["setup_commands"])
    else:  # GCS through its S3-interop endpoint: the key file is shipped and exported on every node
        assert meta["s3_endpoint"] == "https://storage.googleapis.com"
        assert "~/.trustlab-s3.env" in c["file_mounts"]
        assert any("trustlab-s3.env" in cmd and "set -a" in cmd for cmd in c["setup_commands"])


# ----------------------------------------------------------------------------- versions
def test_pinned_ray_matches_installed_and_every_image_and_rayversion():
    import ray
    from packaging.requirements import Requirement
    from packaging.version import Version

    try:
        import tomllib
    except ImportError:  # pragma: no cover - python < 3.11
        import tomli as tomllib
    deps = tomllib.load(open(os.path.join(REPO, "pyproject.toml"), "rb"))["project"]["dependencies"]
    (pin,) = [Requirement(d) for d in deps if Requirement(d).name == "ray"]
    assert Version(ray.__version__) in pin.specifier, (ray.__version__, str(pin))
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    seen = 0
    for rel in RAY_UP + KUBERAY:
        for doc in load(rel):
            for path, k, v in walk(doc):
                if k in ("image", "head_image", "worker_image"):
                    m = IMAGE_RE.match(v)
                    assert m, f"{rel}: {'/'.join(map(str, path))}/{k}={v!r} is not a rayproject/ray tag"
                    assert m["ver"] == ray.__version__ and m["py"] == py, (rel, v, ray.__version__, py)
                    seen += 1
                if k == "rayVersion":
                    assert v == ray.__version__, (rel, v)
                    seen += 1
    assert seen >= 12


# ----------------------------------------------------------------------------- KubeRay
@pytest.mark.parametrize("rel", KUBERAY)
def test_kuberay_manifest_matches_crd_strictly(rel):
    docs = cs.validate_kuberay_manifest(os.path.join(REPO, rel), CRD_DIR)
    assert docs and all(d["apiVersion"] == "ray.io/v1" for d in docs)


@pytest.mark.parametrize("mutate, expect", [
    (lambda d: d["spec"].update(rayversion="2.60.0"), "rayversion"),               # case typo
    (lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(imagePullPolcy="Always"),
     "imagePullPolcy"),                                                              # deep unknown field
    (lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-gpus": 0}), "num-gpus"),  # strings only
    (lambda d: d["spec"]["workerGroupSpecs"][0].pop("maxReplicas"), "maxReplicas"),  # required
    (lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "PATH", "value": "/bin"}), "PATH"),                                 # list-map key repeated
    (lambda d: d.update(apiVersion="ray.io/v9"), "ray.io/v9"),
    (lambda d: d["metadata"].update(name="Trust_Lab"), "Trust_Lab"),
])
def test_kuberay_check_rejects_bad_manifests(mutate, expect):
    (doc,) = load("cluster/kuberay/raycluster.yaml")
    bad = copy.deepcopy(doc)
    mutate(bad)
    errors = cs.kuberay_errors(bad, CRD_DIR)
    assert errors and any(expect in e for e in errors), errors


def test_strict_schema_respects_preserve_unknown_fields():
    s = cs.strict_schema({"type": "object", "properties": {
        "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {"type": "string"}}},
        "closed": {"type": "object", "properties": {"a": {"type": "string", "nullable": True}}},
        "map": {"type": "object", "additionalProperties": {"type": "string"}}}})
    assert s["additionalProperties"] is False
    assert "additionalProperties" not in s["properties"]["open"]
    assert s["properties"]["closed"]["additionalProperties"] is False
    assert s["properties"]["closed"]["properties"]["a"]["type"] == ["string", "null"]
    assert s["properties"]["map"]["additionalProperties"] == {"type": "string"}


def test_rayjob_entrypoint_composes_in_this_repo():
    (job,) = load("cluster/kuberay/rayjob.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "experiments/run.py", "method=item"], argv
    cfg = compose(argv[2:])                 # every override is a valid key of this repo's config
    assert cfg["method"]["name"] == "item" and cfg["run"]["storage"].startswith("s3://")
    assert int(cfg["trainer"]["max_failures"]) >= 1
    workers = sum(g["replicas"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"])
    assert workers == cfg["trainer"]["num_workers"], "one GPU pod per training worker"
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_rayjob_working_dir_ships_the_code_without_git_outputs_or_data(tmp_path):
    from ray._private.runtime_env.packaging import _get_excludes
    from ray.runtime_env import RuntimeEnv

    (job,) = load("cluster/kuberay/rayjob.yaml")
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    # the submitter clones into working_dir and uploads it from there
    sub = job["spec"]["submitterPodTemplate"]["spec"]
    clone = " ".join(sub["initContainers"][0]["args"])
    assert "git clone" in clone and clone.rstrip().endswith(env["working_dir"])
    assert {m["mountPath"] for m in sub["containers"][0]["volumeMounts"]} == {env["working_dir"]}
    # apply the excludes with Ray's own matcher to a copy of this repository's layout
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    extra = [".git/HEAD", ".git/objects/ab/cdef", "outputs/run/metrics.json", "data/ffpp/a.mp4",
             ".venv/bin/python"]
    for rel in tracked + extra:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
    RuntimeEnv(**dict(env, working_dir=str(tmp_path)))   # Ray accepts it as a runtime environment
    excluded = _get_excludes(tmp_path, env["excludes"])
    for rel in extra:
        assert excluded(tmp_path / rel) or any(excluded(tmp_path / q) for q in _parents(rel)), rel
    kept = [rel for rel in tracked if not any(excluded(tmp_path / q) for q in _parents(rel) + [rel])]
    assert set(kept) == set(tracked), sorted(set(tracked) - set(kept))
    assert any(r.startswith("trustlab/platform/data/") for r in kept), "the data *package* must ship"


def _parents(rel):
    parts = rel.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


@pytest.mark.parametrize("rel", ["cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml"])
def test_kuberay_pods_install_the_project_like_the_readme(rel):
    (doc,) = load(rel)
    pods = [(where, spec) for where, spec in pod_specs(doc) if where != "submitter"]
    assert len(pods) >= 2
    for where, spec in pods:
        vols = {v["name"] for v in spec["volumes"]}
        (init,) = [c for c in spec["initContainers"] if INSTALL.split()[-1] in " ".join(c["args"])]
        ray_c = spec["containers"][0]
        mount = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
        assert set(mount) <= vols and {m["name"]: m["mountPath"] for m in ray_c["volumeMounts"]} == mount, where
        repo_dir = next(iter(mount.values()))
        assert f"bash {repo_dir}/scripts/setup.sh" in " ".join(init["args"]), where
        # the venv's interpreter links to the image's python: same image for install and run
        assert init["image"] == ray_c["image"], where
        path = {e["name"]: e.get("value") for e in ray_c["env"]}["PATH"]
        assert path.split(":")[0] == f"{repo_dir}/.venv/bin", where
        gpus = ray_c["resources"]["limits"].get("nvidia.com/gpu")
        assert (gpus is not None) == ray_c["image"].endswith("-gpu"), where


# ----------------------------------------------------------------------------- the guide
def _commands(text):
    """Shell commands in a text: backslash continuations joined, comments and prompts dropped."""
    joined = re.sub(r"\\\s*\n\s*(#\s*)?", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip().lstrip("#").strip()
        if line.startswith("$ "):
            line = line[2:]
        out.append(line)
    return out


def _run_py_overrides(cmd):
    """The overrides of the `python experiments/run.py ...` part of a command."""
    argv = shlex.split(cmd.split("python experiments/run.py", 1)[1].split("#")[0])
    return [a for a in argv if "=" in a]


def test_scale_out_guide_commands_are_valid():
    doc = open(os.path.join(REPO, "docs", "scale_out.md")).read()
    for needle in ("ray job submit", "ray up -y cluster/aws.yaml", "ray up -y cluster/gcp.yaml",
                   "kubectl apply -f cluster/kuberay/raycluster.yaml",
                   "kubectl apply -f cluster/kuberay/rayjob.yaml", "ray down", "trainer.max_failures",
                   "run.storage=s3://", "run.name="):
        assert needle in doc, needle
    sources = {"docs/scale_out.md": doc}
    for rel in RAY_UP + KUBERAY:
        sources[rel] = open(os.path.join(REPO, rel)).read()
    n = 0
    for rel, text in sources.items():
        for cmd in _commands(text):
            if "python experiments/run.py" in cmd and "<" not in cmd:
                compose(_run_py_overrides(cmd))   # raises ConfigError on a key or choice that is not there
                n += 1
    assert n >= 8, n

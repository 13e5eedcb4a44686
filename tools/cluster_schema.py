"""Offline validation of cluster configs, so a typo fails in CI rather than at launch time.

* ``ray up`` YAMLs (``cluster/aws.yaml``, ``cluster/gcp.yaml``) against the ``ray-schema.json``
  shipped inside the installed ``ray`` package (the schema ``ray up`` itself applies; it already
  sets ``additionalProperties: false`` on the top level and on every node type), plus the
  cross-field checks ``ray up`` makes after merging its defaults
  (``ray.autoscaler._private.util.prepare_config`` / ``validate_config``), plus a key check on
  ``provider`` (the one open object of the schema).
* KubeRay manifests (RayCluster, RayJob, RayService) against the ``openAPIV3Schema`` of the CRD
  that defines their kind, with unknown fields rejected the way ``kubectl apply`` does with
  strict field validation: every object schema that lists ``properties`` and is not marked
  ``x-kubernetes-preserve-unknown-fields`` gets ``additionalProperties: false``. ``nullable``,
  ``x-kubernetes-int-or-string`` and the list-type markers (``set``: unique items; ``map``:
  unique ``x-kubernetes-list-map-keys``) are honoured; CEL rules
  (``x-kubernetes-validations``) are not evaluated.

Command line (the CRDs are the ones the project pins in ``../shared/schemas/kuberay``)::

    python -m tools.cluster_schema cluster/aws.yaml cluster/kuberay/rayjob.yaml

``jsonschema`` is a test dependency; it is imported only when a check runs.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import sys

import yaml

# ObjectMeta fields a manifest may set at its top level (the CRD schema leaves ``metadata`` open,
# the API server validates it as ObjectMeta).
_OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "maxLength": 63, "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string", "maxLength": 63, "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


class ClusterConfigError(ValueError):
    """A config or manifest does not match its schema; ``errors`` lists every problem."""

    def __init__(self, what: str, errors: list[str]):
        self.errors = errors
        super().__init__(f"{what}: {len(errors)} problem(s):\n  " + "\n  ".join(errors))


# libyaml's loader when PyYAML has it: the CRDs are megabytes of YAML
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml_docs(path: str) -> list[dict]:
    """All documents of a YAML file (empty documents dropped)."""
    with open(path) as f:
        return [d for d in yaml.load_all(f, Loader=_Loader) if d is not None]


def _fmt(err) -> str:
    where = "/".join(str(p) for p in err.absolute_path) or "<root>"
    return f"{where}: {err.message}"


# ----------------------------------------------------------------------------- ray up
def ray_up_schema() -> dict:
    """The cluster-launcher schema of the installed Ray."""
    import ray.autoscaler

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        return json.load(f)


def ray_up_errors(config: dict) -> list[str]:
    """Problems ``ray up`` would raise for this config, without contacting any cloud."""
    import jsonschema

    schema = ray_up_schema()
    v = jsonschema.Draft7Validator(schema)
    errors = [_fmt(e) for e in sorted(v.iter_errors(config), key=lambda e: list(e.absolute_path))]
    provider = config.get("provider") or {}
    known = set(schema["properties"]["provider"]["properties"])
    errors += [f"provider/{k}: unknown key (not in ray-schema.json provider properties)"
               for k in sorted(set(provider) - known)]
    if errors:
        return errors
    # what `ray up` does next: merge the provider defaults, then the cross-field checks
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as e:  # noqa: BLE001 - report whatever ray up would report
        errors.append(f"<ray up>: {type(e).__name__}: {e}")
    return errors


def validate_ray_up(config_or_path) -> dict:
    """Validate a ``ray up`` config (dict or path); returns the config, raises ClusterConfigError."""
    what = config_or_path if isinstance(config_or_path, str) else "ray up config"
    config = load_yaml_docs(config_or_path)[0] if isinstance(config_or_path, str) else config_or_path
    errors = ray_up_errors(config)
    if errors:
        raise ClusterConfigError(what, errors)
    return config


# ----------------------------------------------------------------------------- KubeRay
def strict_schema(schema):
    """A copy of an OpenAPI v3 (Kubernetes structural) schema as JSON Schema that rejects unknown
    fields: ``additionalProperties: false`` wherever ``properties`` are listed and unknown fields
    are not explicitly preserved; ``nullable: true`` admits ``null``."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k in ("properties", "patternProperties", "definitions"):
            out[k] = {name: strict_schema(sub) for name, sub in v.items()}
        elif k in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
            out[k] = strict_schema(v)
        else:
            out[k] = v
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if out.get("nullable") and "type" in out:
        t = out["type"]
        out["type"] = (t if isinstance(t, list) else [t]) + ["null"]
    if out.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


def _list_map_keys(validator, keys, instance, schema):
    """``x-kubernetes-list-type: map``: items are unique by their ``x-kubernetes-list-map-keys``."""
    import jsonschema

    if not isinstance(instance, list) or schema.get("x-kubernetes-list-type") != "map":
        return
    seen = set()
    for i, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = tuple(json.dumps(item.get(k), sort_keys=True) for k in keys)
        if key in seen:
            yield jsonschema.ValidationError(
                f"item {i} repeats the list-map key {dict(zip(keys, (item.get(k) for k in keys)))}")
        seen.add(key)


@functools.lru_cache(maxsize=None)
def _crd_index(crd_dir: str) -> dict:
    """kind -> parsed CustomResourceDefinition, for every CRD file in ``crd_dir``."""
    out = {}
    for name in sorted(os.listdir(crd_dir)):
        if not name.endswith((".yaml", ".yml")):
            continue
        for doc in load_yaml_docs(os.path.join(crd_dir, name)):
            if doc.get("kind") == "CustomResourceDefinition":
                out[doc["spec"]["names"]["kind"]] = doc
    return out


def crd_for(kind: str, crd_dir: str) -> dict:
    index = _crd_index(os.path.abspath(crd_dir))
    if kind not in index:
        raise ClusterConfigError(f"kind {kind!r}", [f"no CRD for it in {crd_dir} (have: {', '.join(sorted(index))})"])
    return index[kind]


@functools.lru_cache(maxsize=None)
def _strict_validator(crd_dir: str, kind: str, version: str):
    import jsonschema

    crd = crd_for(kind, crd_dir)
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    schema = strict_schema(versions[version]["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = _OBJECT_META
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    cls = jsonschema.validators.extend(jsonschema.Draft7Validator,
                                       {"x-kubernetes-list-map-keys": _list_map_keys})
    return cls(schema)


def kuberay_errors(doc: dict, crd_dir: str) -> list[str]:
    """Problems of one KubeRay manifest against its CRD (unknown fields are problems)."""
    kind = doc.get("kind")
    try:
        crd = crd_for(kind, crd_dir)
    except ClusterConfigError as e:
        return e.errors
    group = crd["spec"]["group"]
    served = [v["name"] for v in crd["spec"]["versions"] if v.get("served")]
    api = str(doc.get("apiVersion", ""))
    grp, _, version = api.partition("/")
    if grp != group or version not in served:
        return [f"apiVersion: {api!r} is not served by the {kind} CRD (served: "
                f"{', '.join(f'{group}/{v}' for v in served)})"]
    v = _strict_validator(os.path.abspath(crd_dir), kind, version)
    return [_fmt(e) for e in sorted(v.iter_errors(doc), key=lambda e: list(e.absolute_path))]


def validate_kuberay_manifest(doc_or_path, crd_dir: str) -> list[dict]:
    """Validate a manifest (dict, or a YAML file with one or more documents) against the CRDs in
    ``crd_dir``; returns the documents, raises ClusterConfigError listing every problem."""
    if isinstance(doc_or_path, str):
        docs, what = load_yaml_docs(doc_or_path), doc_or_path
    else:
        docs, what = [doc_or_path], f"{doc_or_path.get('kind')} manifest"
    errors = []
    for i, d in enumerate(docs):
        errors += [(f"doc {i}: " if len(docs) > 1 else "") + e for e in kuberay_errors(d, crd_dir)]
    if errors:
        raise ClusterConfigError(what, errors)
    return docs


def default_crd_dir() -> str:
    """``../shared/schemas/kuberay`` beside the repository (CI keeps a read-only copy there)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(repo, "..", "shared", "schemas", "kuberay")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    bad = 0
    for path in argv:
        try:
            docs = load_yaml_docs(path)
            if docs and "apiVersion" in docs[0]:
                validate_kuberay_manifest(path, default_crd_dir())
            else:
                validate_ray_up(path)
            print(f"ok   {path}")
        except ClusterConfigError as e:
            bad += 1
            print(f"FAIL {e}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

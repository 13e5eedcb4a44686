"""From runs to a compared, tracked, served model, on F2C's CI-sized runs: the model registry
(trained runs found by name, mode=export's model folder and card, a sweep's best trial), MLflow
tracking against a real local store (per-epoch metrics, summary, artifacts, trials as child
runs), the comparison report, and ``mode=serve`` by method name over HTTP stopped with SIGTERM
(one line, no stack trace, the port free and a new server on it)."""
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, ci_overrides, compose, free_port, stop_pids

F2C = ["method=f2c", *ci_overrides("f2c"), "trainer.num_workers=1", "trainer.cpus_per_worker=0.5"]


# ----------------------------------------------------------------------------- without Ray
def _fake_run(root, name, method="f2c", kind="train", age=0.0):
    """A finished run folder as the registry reads it (files only; the checkpoint is not loaded)."""
    d = root / name
    (d / "checkpoints").mkdir(parents=True)
    (d / "config.yaml").write_text(f"method:\n  name: {method}\ntrainer:\n  select_metric: val_auc\nseed: 0\n")
    if kind == "train":
        (d / "checkpoints" / "best.pt").write_bytes(b"x")
        (d / "metrics.json").write_text(json.dumps({"test": {"frame": {"auc": 0.9}}, "selected": {"epoch": 1}}))
        marker = d / "metrics.json"
    else:
        (d / "sweep.json").write_text("{}")
        (d / "best_trial.json").write_text(json.dumps({"checkpoint": str(d / "trial" / "model.pt"), "val": {"auc": 0.8}}))
        marker = d / "best_trial.json"
    t = time.time() - age
    os.utime(marker, (t, t))
    return d


def test_registry_finds_runs_by_method_and_name(tmp_path):
    from trustlab.platform.runs import ModelNotFound, find_run, list_runs, resolve

    _fake_run(tmp_path, "f2c-old", age=100)
    new = _fake_run(tmp_path, "f2c-new", age=10)
    _fake_run(tmp_path, "f2c-sweep", kind="sweep", age=1)
    _fake_run(tmp_path, "item-1", method="item", age=5)
    (tmp_path / "f2c-unfinished").mkdir()
    (tmp_path / "f2c-unfinished" / "config.yaml").write_text("method:\n  name: f2c\n")
    assert [r.name for r in list_runs(tmp_path)] == ["f2c-sweep", "item-1", "f2c-new", "f2c-old"]
    # a method name: the newest finished *training* run (sweeps are named: f2c@<sweep>)
    assert resolve("f2c", str(tmp_path)) == (str(new / "checkpoints" / "best.pt"), find_run(tmp_path, "f2c"))
    assert resolve("f2c@f2c-old", str(tmp_path))[1].name == "f2c-old"
    assert resolve("@f2c-sweep", str(tmp_path))[1].kind == "sweep"
    with pytest.raises(ModelNotFound, match="trained method 'item'"):
        resolve("f2c@item-1", str(tmp_path))
    with pytest.raises(ModelNotFound, match="not a finished run"):
        resolve("f2c@f2c-unfinished", str(tmp_path))
    with pytest.raises(ModelNotFound, match="no finished stdt run .*f2c@f2c-new"):
        resolve("stdt", str(tmp_path))
    with pytest.raises(ModelNotFound, match="no model file"):
        resolve(str(tmp_path / "nope" / "model.pt"), str(tmp_path))


def test_serve_detectors_by_method_name_run_or_path(tmp_path):
    from trustlab.serve.settings import GraphConfigError, settings_from_args

    new = _fake_run(tmp_path, "f2c-new", age=10)
    _fake_run(tmp_path, "f2c-old", age=100)
    exported = tmp_path / "exports" / "mine"
    exported.mkdir(parents=True)
    (exported / "model.safetensors").write_bytes(b"x")
    cfg = compose(["mode=serve", "serve=graph", "serve.detectors=[f2c,f2c@f2c-old]"], tmp_path)
    with pytest.raises(GraphConfigError, match="distinct"):  # two detectors named f2c
        settings_from_args(cfg)
    cfg = compose(["mode=serve", "serve=graph", "serve.detectors=[f2c,{name: old, run: f2c-old},"
                   f"{{name: mine, checkpoint: {exported}}}]"], tmp_path)
    d = {x["name"]: x for x in settings_from_args(cfg)["detectors"]}
    assert d["f2c"]["checkpoint"] == str(new / "checkpoints" / "best.pt") and d["f2c"]["method"] == "f2c"
    assert d["old"]["checkpoint"].endswith("f2c-old/checkpoints/best.pt") and d["mine"]["checkpoint"] == str(exported)
    with pytest.raises(GraphConfigError, match="detector 'stdt': no finished stdt run"):
        settings_from_args(compose(["mode=serve", "serve=graph", "serve.detectors=[stdt]"], tmp_path))
    # an exported folder named after the detector under checkpoint_root wins over the runs
    (tmp_path / "f2c").mkdir()
    (tmp_path / "f2c" / "model.pt").write_bytes(b"x")
    s = settings_from_args(compose(["mode=serve", "serve=graph", "serve.detectors=[f2c]",
                                    f"serve.checkpoint_root={tmp_path}"]))
    assert s["detectors"][0]["checkpoint"] == str(tmp_path / "f2c")


def test_report_plots_robustness_sessions_and_ablations(tmp_path):
    """The report of runs with robustness rows, FSCIL sessions and ablations (metrics.json only)."""
    from trustlab.report import main

    def run(name, method, metrics, history=()):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(f"method:\n  name: {method}\n  data: {{n_train: 64, size: 32}}\n"
                                       "data:\n  name: auto\ntrainer:\n  select_metric: val_auc\n")
        (d / "metrics.json").write_text(json.dumps(metrics))
        (d / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))

    rows = [{"kind": k, "level": lv, "frame_auc": 0.9 - i / 10, "video_auc": 0.95 - i / 10}
            for k in ("jpeg", "blur") for i, lv in enumerate((90, 50, 30) if k == "jpeg" else (1, 2, 3))]
    for i in range(2):
        run(f"stdt-{i}", "stdt", {"test": {"frame": {"auc": 0.8 + i / 20, "acc": 0.7}, "video": {"auc": 0.85}},
                                  "val": {"frame": {"auc": 0.9}}, "robustness": {"rows": rows},
                                  "ablation": {"no_temporal": {"test": {"frame": {"auc": 0.6}, "video": {"auc": 0.62}}},
                                               "extra_loss": {"test": {"frame": {"auc": 0.8}}, "kind": "comparison"}}},
            [{"stage": "train", "epoch": e, "val_score": 0.5 + e / 10, "train_loss": 1 / e} for e in (1, 2, 3)])
    sess = {"sessions": [80.0, 70.0, 60.0], "average": 70.0, "pd": 20.0, "last": 60.0}
    run("cd2-0", "cd2", {**sess, "baselines": {"finetune": {**sess, "sessions": [80.0, 50.0, 30.0], "average": 53.3}},
                         "test": {"all_seen": {"acc": 0.6, "n": 100}}})
    out = tmp_path / "report"
    assert main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    md = (out / "report.md").read_text()
    assert "stdt-1" in page and "no_temporal" in page and "sessions average" in page
    assert "extra_loss (comparison)" in md and "no_temporal (comparison)" not in md
    assert md.index("| 1 | stdt-1 |") < md.index("| 2 | stdt-0 |")  # ranked by test frame AUC
    plots = sorted(p.name for p in (out / "plots").iterdir())
    for kind in ("leaderboard_stdt", "robustness_stdt", "training_stdt", "sessions_cd2"):
        assert any(p.startswith(kind) for p in plots), (kind, plots)
    for p in plots:
        assert f"plots/{p}" in page or p.startswith("leaderboard_cd2"), p


# ----------------------------------------------------------------------------- with Ray
@pytest.fixture(scope="module")
def runs(ray_head, tmp_path_factory):
    """One tracked F2C training run and one tracked 2-trial sweep under one runs root."""
    from trustlab.platform.experiment import train
    from trustlab.platform.tune import sweep

    root = tmp_path_factory.mktemp("lifecycle")
    data = f"method.data.root={root / '.data'}"
    metrics = train(compose(F2C + ["run.name=f2c-a", "trainer.epochs=2", "tracking=mlflow", data], root))
    out = sweep(compose(F2C + ["mode=tune", "run.name=f2c-sweep", "tune.num_samples=2", "tune.max_concurrent_trials=1",
                               "tune.scheduler=fifo", "tracking=mlflow", data], root))
    return {"root": root, "metrics": metrics, "sweep": out}


def _png(seed=0, size=48):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _score(ckpt, png):
    import torch
    from PIL import Image

    from trustlab.platform.checkpoints import load_state
    from trustlab.platform.train import load_model

    state = load_state(ckpt)
    method, model = load_model(state["cfg"], state)
    with torch.no_grad():
        img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        return float(method.predict(model, method.serve_inputs([img], state["cfg"]), state["cfg"])[0])


def test_export_writes_a_self_contained_model_folder(runs, tmp_path):
    from trustlab.platform.checkpoints import load_state
    from trustlab.platform.runs import export

    root = runs["root"]
    out = export(compose(F2C + ["mode=export", "run.name=f2c-a", f"export.dir={tmp_path / 'pt'}"], root))
    card = json.load(open(os.path.join(out, "model_card.json")))
    assert card["method"] == "f2c" and card["run"] == "f2c-a" and card["format"] == "pt"
    assert card["metrics"]["test"]["frame"]["auc"] == pytest.approx(runs["metrics"]["test"]["frame"]["auc"])
    assert "validation split" in card["selection"] and "never the test split" in card["selection"]
    assert card["weights_origin"] == [] and card["commit"] and card["data"]["method.data"]["n_train"] == 192
    assert {"model.pt", "config.yaml", "model_card.md", "model_card.json"} <= set(os.listdir(out))
    assert "## Metrics" in open(os.path.join(out, "model_card.md")).read()
    # safetensors: weights only, the config beside them; scores equal the run's checkpoint
    st = export(compose(F2C + ["mode=export", "export.source=f2c@f2c-a", "export.format=safetensors",
                               f"export.dir={tmp_path / 'st'}"], root))
    assert "model.pt" not in os.listdir(st) and load_state(st)["cfg"]["method"]["name"] == "f2c"
    png = _png(3)
    best = os.path.join(root, "f2c-a", "checkpoints", "best.pt")
    assert _score(st, png) == pytest.approx(_score(best, png), abs=1e-6) == _score(out, png)
    # the sweep's best trial exports the same way (validation figures only, and says so)
    sw = export(compose(F2C + ["mode=export", "run.name=f2c-sweep"], root))
    card = json.load(open(os.path.join(sw, "model_card.json")))
    assert card["run_kind"] == "sweep" and "best trial of a 2-trial sweep" in card["selection"]
    assert "test" not in card["metrics"] and card["metrics"]["val"]["frame"]["auc"] == pytest.approx(
        runs["sweep"]["best_metric"])
    assert "No test metrics" in open(os.path.join(sw, "model_card.md")).read()


def test_mlflow_local_store_holds_params_epochs_summary_artifacts_and_trials(runs):
    from mlflow.tracking import MlflowClient

    root = runs["root"]
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("trustlab")
    by_name = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    run = by_name["f2c-a"]
    assert run.info.status == "FINISHED" and run.data.params["method.name"] == "f2c"
    assert run.data.params["trainer.epochs"] == "2" and run.data.tags["trustlab.mode"] == "train"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/val_auc")] == [1, 2]
    assert run.data.metrics["test.frame.auc"] == pytest.approx(runs["metrics"]["test"]["frame"]["auc"])
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "run")} | \
        {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"run/metrics.json", "run/roc.png", "run/summary.txt", "model/model.pt", "model/model_card.md"} <= arts
    assert os.path.isdir(os.path.join(root, "mlartifacts"))  # beside the store, not in the working directory
    parent = by_name["f2c-sweep"]
    children = [r for r in by_name.values() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and all("val_auc" in c.data.metrics for c in children)
    assert parent.data.metrics["trials"] == 2 and parent.data.tags["trustlab.mode"] == "tune"


def test_report_over_the_runs(runs, tmp_path):
    from trustlab.report import main

    root = runs["root"]
    assert main([str(root), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert "f2c-a" in page and "f2c-sweep" in page and "Sweeps" in page and "validation split" in page
    for img in ("leaderboard_f2c", "training_f2c", "sweep_f2c-sweep", "f2c-a__roc.png"):
        assert img in page, img
    for p in (tmp_path / "report" / "plots").iterdir():
        assert p.stat().st_size > 1000, p


def _serve(root, port, head, detectors, env, log):
    args = [sys.executable, os.path.join(REPO, "experiments", "run.py"), "mode=serve", "serve=graph",
            f"serve.detectors={detectors}", f"run.root={root}", f"serve.port={port}", f"ray.address={head['address']}",
            "serve.resources.ingress_cpus=0.1", "serve.resources.preprocess_cpus=0.1",
            "serve.resources.detector_cpus=0.2", "serve.resources.torch_threads=1"]
    return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


@pytest.mark.parametrize("which", ["trained", "sweep_export"])
def test_serve_by_name_over_http_then_sigterm_frees_the_port(runs, ray_head, tmp_path, which):
    """``mode=serve`` of the trained run by method name (or of the sweep's exported best trial by
    path) answers over HTTP with the model's own score and a key; SIGTERM stops it within seconds
    with one line and no stack trace, leaves no HAProxy on the port, and the port takes a new server."""
    import requests
    from ray import serve

    from trustlab.platform.runs import export
    from trustlab.serve.app import port_free

    root = runs["root"]
    if which == "trained":
        det, ckpt = "[f2c]", os.path.join(root, "f2c-a", "checkpoints", "best.pt")
    else:
        ckpt = export(compose(F2C + ["mode=export", "run.name=f2c-sweep", f"export.dir={tmp_path / 'best'}"], root))
        det = f"[{{name: f2c, checkpoint: {ckpt}}}]"
    serve.shutdown()  # Serve's HTTP options are fixed when it starts: the server below starts it on its port
    port = free_port()
    env = dict(ray_head["env"], TRUSTLAB_API_KEYS="k-one,k-two")
    # the trained run's second server on the same port proves the first let it go
    for attempt in ("first", "again") if which == "trained" else ("first",):
        log = open(tmp_path / f"serve-{attempt}.log", "w+")
        p = _serve(root, port, ray_head, det, env, log)
        try:
            url, deadline = f"http://127.0.0.1:{port}", time.time() + 300
            while time.time() < deadline:
                assert p.poll() is None, open(log.name).read()[-3000:]
                try:
                    if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                        break
                except requests.RequestException:  # not listening yet, or HAProxy without a backend yet
                    pass
                time.sleep(1)
            png = _png(7)
            r = requests.post(f"{url}/v1/detect", files={"file": ("a.png", png, "image/png")}, timeout=120,
                              headers={"Authorization": "Bearer k-two"})
            assert r.status_code == 200, r.text
            assert r.json()["detectors"]["f2c"]["score"] == pytest.approx(_score(ckpt, png), abs=1e-5)
            assert requests.post(f"{url}/predict", files={"file": ("a.png", png, "image/png")}, timeout=60) \
                .status_code == 401
            t0 = time.time()
            p.send_signal(signal.SIGTERM)
            assert p.wait(timeout=60) == 0
            took = time.time() - t0
        finally:
            if p.poll() is None:
                stop_pids([p.pid])
        out = open(log.name).read()
        assert "Traceback" not in out, out[-3000:]
        stopped = [ln for ln in out.splitlines() if "detection graph stopped" in ln]
        assert len(stopped) == 1 and "SIGTERM" in stopped[0] and f"port {port} free" in stopped[0], out[-2000:]
        assert took < 45, took
        assert port_free("127.0.0.1", port)
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)

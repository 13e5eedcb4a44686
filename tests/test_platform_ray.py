"""The platform end to end on F2C: 2-worker training, model selection on val, resume, reload,
Tune with ASHA, Serve over HTTP, and `ray job submit` against the session's head. (A sweep resumed
after its driver is killed lives in test_zz_fault_tolerance.py, run last.)"""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import BIN, REPO, ci_overrides, compose, free_port

F2C = ["method=f2c", *ci_overrides("f2c"), "trainer.cpus_per_worker=0.5"]


@pytest.fixture(scope="module")
def f2c_run(ray_head, tmp_path_factory):
    from trustlab.platform.experiment import train

    root = tmp_path_factory.mktemp("runs")
    cfg = compose(F2C + ["trainer.epochs=2", "run.name=f2c-e2e", "trainer.num_workers=2"], root)
    metrics = train(cfg)
    return root, metrics


def test_two_worker_training_reports_selected_on_val(f2c_run):
    root, metrics = f2c_run
    assert metrics["test"]["frame"]["auc"] > 0.8, metrics["test"]
    assert set(metrics["test"]["frame"]) >= {"auc", "ap", "eer", "acc"}
    assert set(metrics["test"]) == {"frame", "video"}
    hist = metrics["train_history"]["train"]
    assert hist["epoch"] == 2 and "val_auc" in hist
    # the selected checkpoint is the best on validation, never chosen on test
    assert metrics["selected"]["epoch"] in (1, 2)
    assert os.path.exists(os.path.join(root, "f2c-e2e", "roc.png"))
    cfg_text = open(os.path.join(root, "f2c-e2e", "config.yaml")).read()
    assert "num_workers: 2" in cfg_text


def test_bucketed_grad_sync_trains_like_the_flat_all_reduce(f2c_run, tmp_path):
    """The module's 2-worker run averages gradients with the default bucketed all-reduce that
    overlaps backward; the same run with the previous synchronisation (one flat all-reduce after
    backward) reaches the same validation and test metrics and the same training loss."""
    from trustlab.platform.experiment import train

    root, bucketed = f2c_run
    flat = train(compose(F2C + ["trainer.epochs=2", "run.name=f2c-flat", "trainer.num_workers=2",
                                "trainer.grad_sync=flat"], tmp_path))
    hb, hf = bucketed["train_history"]["train"], flat["train_history"]["train"]
    assert hf["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-4)
    assert hf["val_auc"] == pytest.approx(hb["val_auc"], abs=1e-4)
    for split in ("val", "test"):
        for k in ("auc", "ap", "acc"):
            assert flat[split]["frame"][k] == pytest.approx(bucketed[split]["frame"][k], abs=1e-4), (split, k)


def test_checkpoint_reload_reproduces_metrics(f2c_run):
    from trustlab.platform.experiment import evaluate

    root, _ = f2c_run
    trained = json.load(open(os.path.join(root, "f2c-e2e", "metrics.json")))
    again = evaluate(compose(F2C + ["mode=eval", "run.name=f2c-e2e"], root))
    for level in ("frame", "video"):
        for k in ("auc", "ap", "eer", "acc"):
            assert again["test"][level][k] == pytest.approx(trained["test"][level][k], abs=1e-6)


def test_tune_asha_stops_at_least_one_trial(ray_head, tmp_path):
    from trustlab.platform.tune import sweep

    cfg = compose(F2C + ["mode=tune", "run.name=sweep", "trainer.epochs=3", "trainer.num_workers=1",
                         "tune.num_samples=4", "tune.max_concurrent_trials=2"], tmp_path)
    # a space whose trials differ clearly: tau above sqrt(2) removes every frequency (chance level)
    cfg["method"]["tune"]["space"] = {"method.tau": {"type": "choice", "values": [0.05, 1.5]},
                                      "trainer.lr": {"type": "loguniform", "low": 1e-3, "high": 3e-3}}
    out = sweep(cfg)
    assert out["trials"] == 4
    assert out["stopped_early"] >= 1, out
    assert out["trial_epochs"] < 4 * 3
    assert out["best_config"]["method.tau"] == 0.05
    text = open(out["overrides_file"]).read()
    assert "method.tau=0.05" in text
    assert os.path.exists(os.path.join(out["sweep_dir"], "results.csv"))


def test_sweeping_a_data_key_builds_each_trials_own_data(ray_head, tmp_path):
    """``method.data.n_train`` is a data key: each trial builds its own training set (issue 17), which
    its steps per epoch show; with the data built once and shared, both trials take the same steps."""
    import pandas as pd

    from trustlab.platform.tune import sweep

    cfg = compose(F2C + ["mode=tune", "run.name=sweep-data", "trainer.epochs=1", "trainer.num_workers=1",
                         "tune.search=grid", "tune.scheduler=fifo", "tune.max_concurrent_trials=2"], tmp_path)
    cfg["method"]["tune"]["space"] = {"method.data.n_train": {"type": "choice", "values": [128, 256]}}
    out = sweep(cfg)
    table = pd.read_csv(os.path.join(out["sweep_dir"], "results.csv"))
    bs = int(cfg["trainer"]["batch_size"])
    assert sorted(table["method.data.n_train"]) == [128, 256], table
    assert list(table["steps"]) == [n // bs for n in table["method.data.n_train"]], table  # one worker


def _png_bytes(seed=0, size=48):
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_serve_round_trip_and_bad_upload(f2c_run):
    import requests
    from ray import serve

    from trustlab.serve.app import start

    root, _ = f2c_run
    port = free_port()
    cfg = compose(F2C + ["mode=serve", "run.name=f2c-e2e", f"serve.port={port}"], root)
    start(cfg)
    url = f"http://127.0.0.1:{port}"
    try:
        assert requests.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"
        r = requests.post(f"{url}/predict", files={"file": ("a.png", _png_bytes(), "image/png")}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert 0.0 <= body["score"] <= 1.0 and body["verdict"] in ("real", "fake") and body["method"] == "f2c"
        bad = requests.post(f"{url}/predict", files={"file": ("x.png", b"not an image at all", "image/png")}, timeout=30)
        assert bad.status_code == 400 and "cannot decode image" in bad.json()["error"]
        empty = requests.post(f"{url}/predict", files={"file": ("e.png", b"", "image/png")}, timeout=30)
        assert empty.status_code == 400 and "empty" in empty.json()["error"]
        again = requests.post(f"{url}/predict", files={"file": ("b.png", _png_bytes(1), "image/png")}, timeout=60)
        assert again.status_code == 200 and again.json()["score"] == pytest.approx(
            requests.post(f"{url}/predict", files={"file": ("b.png", _png_bytes(1), "image/png")}, timeout=60).json()["score"])
    finally:
        serve.shutdown()


def test_ray_job_submit(ray_head, tmp_path):
    out_root = tmp_path / "job-runs"
    cmd = [os.path.join(BIN, "ray"), "job", "submit", "--address", ray_head["dashboard"], "--working-dir", REPO,
           "--", "python", "experiments/run.py", *F2C, "trainer.num_workers=1", "run.name=job",
           f"run.root={out_root}", f"method.data.root={tmp_path / 'data'}"]
    r = subprocess.run(cmd, env=ray_head["env"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in (r.stdout + r.stderr)
    metrics = json.load(open(out_root / "job" / "metrics.json"))
    assert metrics["test"]["frame"]["auc"] > 0.5

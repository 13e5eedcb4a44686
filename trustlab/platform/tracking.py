"""Experiment tracking: every run's per-epoch history in its folder, and MLflow when asked.

- ``history_callbacks(cfg, run_dir)``: a Ray Train ``UserCallback`` (it runs in the Train
  controller, on the driver's node) appending rank 0's report of every epoch to
  ``<run folder>/history.jsonl`` (``{"stage", "epoch", "train_loss", "val_auc", ...}``), and, with
  ``tracking=mlflow``, logging it to the active MLflow run as it arrives (``<stage>/<metric>``,
  step = epoch).
- ``@tracked("train")`` / ``@tracked("tune")`` wrap a mode: with ``tracking=mlflow`` the mode runs
  inside an MLflow run named after ``run.name`` (params: the resolved config, dotted), and after it
  the summary metrics (``metrics.json`` / ``sweep.json`` flattened: ``test.frame.auc``), the run
  folder's plots and files and the exported model (``trustlab.platform.runs``) are logged; a
  failure ends the run as FAILED. ``tune_callbacks(cfg)`` gives Tune Ray's own
  ``MLflowLoggerCallback``, tagged so that every trial is a child run of the sweep's run.

The default store is local: ``sqlite:///<run.root>/mlflow.db`` with artifacts in
``<run.root>/mlartifacts`` (``tracking.uri`` names any other). TensorBoard logs (Tune's) are untouched.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re

from ray.train import UserCallback

HISTORY = "history.jsonl"
_ACTIVE: dict = {}  # the MLflow run of this driver's mode: {"uri", "run_id", "experiment"}


def backend(cfg: dict) -> str:
    return str((cfg.get("tracking") or {}).get("backend") or "none")


def tracking_uri(cfg: dict) -> str:
    t = cfg.get("tracking") or {}
    return t.get("uri") or "sqlite:///" + os.path.join(os.path.abspath(cfg["run"]["root"]), "mlflow.db")


def _mlflow():
    try:
        import mlflow
    except ImportError:
        raise SystemExit("error: tracking=mlflow needs MLflow: pip install -e '.[tracking]' (or pip install mlflow)") \
            from None
    return mlflow


# ----------------------------------------------------------------------------- per-epoch history
def finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class EpochHistory(UserCallback):
    """Appends rank 0's report of every epoch to ``<run folder>/history.jsonl`` (and logs it to the
    MLflow run ``mlflow_run``, ``(uri, run_id)``, when given). Called in the Train controller."""

    def __init__(self, path: str, mlflow_run: tuple | None = None):
        self.path, self.mlflow_run = path, mlflow_run
        self._client = None

    def after_report(self, run_context, metrics, checkpoint):
        if not metrics:
            return
        row = {k: v for k, v in metrics[0].items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.mlflow_run:
            try:
                if self._client is None:
                    from mlflow.tracking import MlflowClient

                    self._client = MlflowClient(tracking_uri=self.mlflow_run[0])
                stage, step = row.get("stage", "train"), int(row.get("epoch", 0))
                from mlflow.entities import Metric
                import time

                now = int(time.time() * 1000)
                self._client.log_batch(self.mlflow_run[1], metrics=[
                    Metric(_key(f"{stage}/{k}"), float(v), now, step) for k, v in row.items()
                    if finite(v) and k not in ("epoch", "resumed_from_epoch")])
            except Exception as e:  # noqa: BLE001 - tracking must never stop training
                print(f"[trustlab] warning: MLflow epoch logging failed: {type(e).__name__}: {e}", flush=True)


def history_callbacks(cfg: dict, run_dir: str) -> list:
    """Callbacks for a run's ``fit_stage`` calls (the epoch history, live to MLflow when tracked)."""
    run = (_ACTIVE["uri"], _ACTIVE["run_id"]) if _ACTIVE else None
    return [EpochHistory(os.path.join(run_dir, HISTORY), run)]


def read_history(run_dir: str) -> list[dict]:
    p = os.path.join(run_dir, HISTORY)
    if not os.path.isfile(p):
        return []
    rows = []
    with open(p) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


# ----------------------------------------------------------------------------- MLflow runs
def flatten(d, prefix: str = "", out: dict | None = None, leaf=lambda v: True) -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists kept as leaves)."""
    out = {} if out is None else out
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flatten(v, key + ".", out, leaf)
        elif leaf(v):
            out[key] = v
    return out


def _key(k: str) -> str:
    """An MLflow key (letters, digits, ``_-./`` and spaces): ``tar@far=0.01`` -> ``tar_far_0.01``."""
    return re.sub(r"[^\w\-./ ]", "_", k)


def _params(cfg: dict) -> dict:
    skip = ("method.ci_overrides", "provenance")
    flat = flatten(cfg)
    return {_key(k): str(v)[:500] for k, v in flat.items() if not k.startswith(skip)}


def _experiment_id(mlflow, cfg: dict) -> str:
    t = cfg.get("tracking") or {}
    name = str(t.get("experiment") or "trustlab")
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    loc = None
    if not t.get("uri"):  # the default local store keeps its artifacts beside it, not in ./mlruns
        loc = "file://" + os.path.join(os.path.abspath(cfg["run"]["root"]), "mlartifacts")
    return mlflow.create_experiment(name, artifact_location=loc)


def start(cfg: dict, kind: str) -> None:
    """Start the MLflow run of this mode (``run.name`` is fixed here when it was null)."""
    from trustlab.platform.experiment import run_name
    from trustlab.platform.runs import git_commit

    mlflow = _mlflow()
    cfg["run"]["name"] = run_name(cfg)
    os.makedirs(cfg["run"]["root"], exist_ok=True)
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    exp = _experiment_id(mlflow, cfg)
    run = mlflow.start_run(experiment_id=exp, run_name=cfg["run"]["name"],
                           tags={"trustlab.method": cfg["method"]["name"], "trustlab.mode": kind,
                                 "trustlab.commit": git_commit(), "trustlab.run_dir":
                                 os.path.abspath(os.path.join(cfg["run"]["root"], cfg["run"]["name"]))})
    mlflow.log_params(_params(cfg))
    _ACTIVE.update(uri=uri, run_id=run.info.run_id, experiment=exp)
    print(f"[trustlab] MLflow run {run.info.run_id} in experiment "
          f"{(cfg.get('tracking') or {}).get('experiment', 'trustlab')!r} at {uri}", flush=True)


def finish(cfg: dict, kind: str, result: dict | None, failed: bool) -> None:
    mlflow = _mlflow()
    try:
        if not failed:
            _log_outcome(mlflow, cfg, kind, result or {})
    finally:
        mlflow.end_run(status="FAILED" if failed else "FINISHED")
        _ACTIVE.clear()


def _log_outcome(mlflow, cfg: dict, kind: str, result: dict) -> None:
    t = cfg.get("tracking") or {}
    run_dir = os.path.abspath(os.path.join(cfg["run"]["root"], cfg["run"]["name"]))
    metrics = result if kind == "train" else {k: v for k, v in result.items() if k in ("best_metric", "trials",
                                                                                       "stopped_early", "trial_epochs")}
    flat = {k: float(v) for k, v in flatten(metrics, leaf=finite).items()
            if not k.startswith(("train_history", "selected"))}
    flat = {_key(k): v for k, v in flat.items()}
    if flat:
        mlflow.log_metrics(flat)
    if t.get("log_artifacts", True):
        for f in sorted(os.listdir(run_dir)):
            p = os.path.join(run_dir, f)
            if os.path.isfile(p) and f.endswith((".png", ".json", ".txt", ".yaml", ".csv", ".jsonl")):
                mlflow.log_artifact(p, artifact_path="run")
    if t.get("log_model", True):
        from trustlab.platform.runs import export_run, read_run

        rec = read_run(run_dir)
        if rec is not None:
            out = export_run(rec, os.path.join(run_dir, "export"), "pt", cfg["run"].get("s3_endpoint"))
            mlflow.log_artifacts(out, artifact_path="model")


def tracked(kind: str):
    """Decorator of a mode function ``fn(cfg) -> dict``: run it inside an MLflow run when
    ``tracking=mlflow`` (see the module docstring); otherwise call it as it is."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(cfg: dict, *a, **kw):
            if backend(cfg) != "mlflow" or _ACTIVE:
                return fn(cfg, *a, **kw)
            start(cfg, kind)
            try:
                out = fn(cfg, *a, **kw)
            except BaseException:
                finish(cfg, kind, None, failed=True)
                raise
            finish(cfg, kind, out, failed=False)
            return out
        return wrapper
    return deco


def tune_callbacks(cfg: dict) -> list:
    """Tune callbacks that log every trial as a child run of the sweep's MLflow run (Ray's
    ``MLflowLoggerCallback``: params = the trial's sampled values, metrics = its reports)."""
    if not _ACTIVE:
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    exp = _mlflow().get_experiment(_ACTIVE["experiment"]).name
    return [MLflowLoggerCallback(tracking_uri=_ACTIVE["uri"], experiment_name=exp,
                                 tags={"mlflow.parentRunId": _ACTIVE["run_id"], "trustlab.mode": "trial",
                                       "trustlab.sweep": cfg["run"]["name"]})]

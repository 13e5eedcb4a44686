"""Ray Tune sweeps over a method's declared space (``method.tune.space`` in its YAML).

Driver-function pattern (Train v2): each trial is a function that applies its sampled values
to the base config and runs the method's stages through ``fit_stages``; the last stage reports
to Tune through ``TuneReportCallback`` once per epoch, so ASHA rungs are epochs. Search:
OptunaSearch (TPE, seeded) by default, or random / grid; scheduler ASHA or FIFO. Trials get
fractional CPUs so several fit on a 2-CPU machine (the trial's driver function takes 0.01 CPU).

The sweep folder ``<run.root>/<run.name>/`` holds Tune's experiment (CSV/JSON/TensorBoard logs
per trial), ``results.csv``, ``best_overrides.yaml`` (Hydra override strings: rerun the best
trial with ``python experiments/run.py method=X overrides_file=<that file>``), and plots.
"""
from __future__ import annotations

import json
import math
import os

from trustlab.platform.config import ConfigError, apply_dotted
from trustlab.platform.tracking import tracked, tune_callbacks

DISTS = {
    "uniform": ("low", "high"),
    "loguniform": ("low", "high"),
    "quniform": ("low", "high", "q"),
    "randint": ("low", "high"),
    "choice": ("values",),
}


def _lookup(cfg: dict, dotted: str):
    node = cfg
    for p in dotted.split("."):
        if not isinstance(node, dict) or p not in node:
            raise KeyError(dotted)
        node = node[p]
    return node


def validate_space(space: dict, cfg: dict) -> None:
    """Every key must exist in the config; every distribution must be known and well-formed."""
    if not isinstance(space, dict) or not space:
        raise ConfigError("method.tune.space is empty: declare at least one parameter")
    for key, spec in space.items():
        try:
            _lookup(cfg, key)
        except KeyError:
            raise ConfigError(f"tune.space key {key!r} is not a config key") from None
        if not isinstance(spec, dict) or spec.get("type") not in DISTS:
            raise ConfigError(f"tune.space[{key!r}]: type must be one of {', '.join(DISTS)}; got {spec!r}")
        need = DISTS[spec["type"]]
        extra = set(spec) - set(need) - {"type"}
        missing = [k for k in need if k not in spec]
        if missing or extra:
            raise ConfigError(f"tune.space[{key!r}] ({spec['type']}) needs exactly {', '.join(need)}; "
                              f"missing {missing or '-'}, unknown {sorted(extra) or '-'}")
        if spec["type"] == "choice":
            if not isinstance(spec["values"], list) or not spec["values"]:
                raise ConfigError(f"tune.space[{key!r}]: values must be a non-empty list")
            continue
        lo, hi = spec["low"], spec["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)) or not lo < hi:
            raise ConfigError(f"tune.space[{key!r}]: need numbers low < high, got {lo!r}, {hi!r}")
        if spec["type"] == "loguniform" and lo <= 0:
            raise ConfigError(f"tune.space[{key!r}]: loguniform needs low > 0, got {lo!r}")


def build_space(space: dict, search: str, grid_points: int = 3) -> dict:
    from ray import tune

    out = {}
    for key, s in space.items():
        t = s["type"]
        if search == "grid":
            if t == "choice":
                vals = list(s["values"])
            elif t == "loguniform":
                vals = [float(math.exp(math.log(s["low"]) + i * (math.log(s["high"]) - math.log(s["low"])) / (grid_points - 1)))
                        for i in range(grid_points)]
            elif t == "randint":
                vals = sorted({int(round(s["low"] + i * (s["high"] - 1 - s["low"]) / (grid_points - 1))) for i in range(grid_points)})
            else:
                vals = [float(s["low"] + i * (s["high"] - s["low"]) / (grid_points - 1)) for i in range(grid_points)]
            out[key] = tune.grid_search(vals)
        elif t == "uniform":
            out[key] = tune.uniform(s["low"], s["high"])
        elif t == "loguniform":
            out[key] = tune.loguniform(s["low"], s["high"])
        elif t == "quniform":
            out[key] = tune.quniform(s["low"], s["high"], s["q"])
        elif t == "randint":
            out[key] = tune.randint(s["low"], s["high"])
        else:
            out[key] = tune.choice(s["values"])
    return out


def data_keys(space: dict) -> list[str]:
    """The swept keys the data is built from (``method.data.*``, ``data.*``): a trial that samples
    one of them must build its own data, or the swept value would change nothing."""
    return [k for k in space if k.startswith(("method.data.", "data."))]


def trial_data(method, cfg: dict, shared):
    """The splits a trial trains on: the sweep's ``shared`` splits (built once on the driver), or,
    when the space sweeps a data key (``shared`` is None), the trial's own, built from its config."""
    return method.build_data(cfg) if shared is None else shared


def _trial(config: dict, base_cfg: dict, data, sweep_dir: str) -> None:
    """One trial: the sampled values applied to the base config, every stage through Ray Train.
    ``data`` is None when the space sweeps a data key: the trial then builds its own."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from trustlab.platform.registry import get_method
    from trustlab.platform.train import fit_stages

    cfg = apply_dotted(base_cfg, config)
    method = get_method(cfg["method"]["name"])
    trial = tune.get_context().get_trial_id()
    data = trial_data(method, cfg, data)
    stages = method.stages(cfg)
    results, best, init_from = fit_stages(cfg, stages, data, f"trial-{trial}", sweep_dir, cfg["method"].get("init_from"),
                                          final_callbacks=[TuneReportCallback()], require_checkpoint=False)
    result = results[stages[-1]]
    if best is not None:  # the trial's selected checkpoint, for exporting the sweep's best trial
        scores = [m for c, m in (result.best_checkpoints or []) if c.path == best.path]
        write_trial_record(cfg, sweep_dir, trial, {"trial_id": trial, "checkpoint": init_from, "config": config,
                                                   "val": _val_metrics(scores[0] if scores else result.metrics)})


def _val_metrics(m: dict | None) -> dict:
    """``{auc, ap, eer, acc, ...}`` from a report's ``val_*`` numbers."""
    return {k[4:]: v for k, v in (m or {}).items() if k.startswith("val_") and isinstance(v, (int, float))}


def _trial_record_uri(cfg: dict, sweep_dir: str, trial: str) -> tuple:
    """Where a trial's record goes: beside Tune's experiment in the sweep's storage (shared by
    every node that runs trials, as Ray Train's checkpoints are)."""
    from trustlab.platform.train import storage_for

    path, fs = storage_for(cfg, sweep_dir)
    return fs, f"{path}/trials/{trial}.json"


def write_trial_record(cfg: dict, sweep_dir: str, trial: str, record: dict) -> None:
    fs, path = _trial_record_uri(cfg, sweep_dir, trial)
    data = json.dumps(record, default=str).encode()
    if fs is None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def read_trial_record(cfg: dict, sweep_dir: str, trial: str) -> dict | None:
    fs, path = _trial_record_uri(cfg, sweep_dir, trial)
    try:
        if fs is None:
            with open(path, "rb") as f:
                return json.loads(f.read())
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def sizing(cfg: dict, resources: dict) -> dict:
    """Concurrent trials and per-trial Train resources from the cluster (GPUs when present)."""
    tc, t = cfg["tune"], cfg["trainer"]
    workers = int(t["num_workers"])
    gpus = resources.get("GPU", 0)
    if gpus and cfg["trainer"].get("use_gpu", "auto") is not False:
        conc = tc.get("max_concurrent_trials") or max(1, int(gpus // (workers * float(t.get("gpus_per_worker", 1)))))
        cpus = tc.get("trial_cpus") or float(t["cpus_per_worker"])
    else:
        total = resources.get("CPU", 1)
        conc = tc.get("max_concurrent_trials") or max(1, min(int(tc["num_samples"]), int(total // workers) or 1))
        cpus = tc.get("trial_cpus") or round(0.95 * total / (conc * workers), 3)
    return {"max_concurrent_trials": int(conc), "cpus_per_worker": float(cpus)}


@tracked("tune")
def sweep(cfg: dict) -> dict:
    import pandas as pd
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from trustlab.platform.experiment import prepare_run_dir
    from trustlab.platform.registry import get_method
    from trustlab.platform.runtime import init_ray
    from trustlab.platform.train import storage_for

    tc = cfg["tune"]
    mt = cfg["method"].get("tune") or {}
    space_spec = mt.get("space") or {}
    validate_space(space_spec, cfg)
    metric, mode = mt.get("metric", "val_auc"), mt.get("mode", "max")
    name, sweep_dir = prepare_run_dir(cfg)
    resources = init_ray(cfg)
    size = sizing(cfg, resources)
    cfg["trainer"]["cpus_per_worker"] = size["cpus_per_worker"]
    method = get_method(cfg["method"]["name"])
    rebuild = data_keys(space_spec)
    # built once and shared, unless a swept key changes the data: then each trial builds its own
    data = None if rebuild else method.build_data(cfg)
    print(f"[trustlab] sweep {name}: {tc['num_samples']} trials ({tc['search']} + {tc['scheduler']}), "
          f"{size['max_concurrent_trials']} at a time, {size['cpus_per_worker']} CPU per worker; "
          f"space: {', '.join(space_spec)}"
          + (f"; each trial builds its own data (swept: {', '.join(rebuild)})" if rebuild else ""), flush=True)

    search = tc["search"]
    if search == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        import optuna

        search_alg = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=int(cfg["seed"])), metric=metric, mode=mode)
    elif search in ("random", "grid"):
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # a SearchGenerator ignores TuneConfig.max_concurrent_trials: the limit goes to the generator
        search_alg = BasicVariantGenerator(random_state=int(cfg["seed"]), max_concurrent=size["max_concurrent_trials"])
    else:
        raise ConfigError(f"unknown tune.search {search!r}; valid choices: optuna, random, grid")
    epochs = method.stage_epochs(cfg, method.stages(cfg)[-1])
    if tc["scheduler"] == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=epochs,
                                  grace_period=int(tc["grace_period"]), reduction_factor=int(tc["reduction_factor"]))
    elif tc["scheduler"] == "fifo":
        scheduler = FIFOScheduler()
    else:
        raise ConfigError(f"unknown tune.scheduler {tc['scheduler']!r}; valid choices: asha, fifo")

    storage_path, fs = storage_for(cfg, sweep_dir)
    trainable = tune.with_resources(tune.with_parameters(_trial, base_cfg=cfg, data=data, sweep_dir=sweep_dir),
                                    {"cpu": 0.01})  # the trial driver only waits on its TorchTrainer
    exp_path = os.path.join(storage_path, "sweep") if fs is None else f"{storage_path}/sweep"
    if tc.get("resume") and tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        print(f"[trustlab] resuming sweep from {exp_path}", flush=True)
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, storage_filesystem=fs)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=build_space(space_spec, search, int(tc.get("grid_points", 3))),
            tune_config=tune.TuneConfig(
                metric=metric, mode=mode, search_alg=search_alg, scheduler=scheduler,
                num_samples=1 if search == "grid" else int(tc["num_samples"]),
                max_concurrent_trials=size["max_concurrent_trials"] if search == "optuna" else None,
            ),
            run_config=tune.RunConfig(name="sweep", storage_path=storage_path, storage_filesystem=fs,
                                      failure_config=tune.FailureConfig(max_failures=0),
                                      callbacks=tune_callbacks(cfg) or None,
                                      # Tune's per-report result tables only with run.verbose=true (else its
                                      # periodic status table; each trial's rank 0 prints its epoch lines)
                                      verbose=None if cfg["run"].get("verbose") else 1),
        )
    results = tuner.fit()
    df = results.get_dataframe()
    keep = [c for c in df.columns if c.startswith("config/") or c in (
        "trial_id", metric, "training_iteration", "val_loss", "train_loss", "steps", "time_total_s")]
    table = df[keep].copy()
    table.columns = [c.replace("config/", "") for c in table.columns]
    table["stopped_early"] = table["training_iteration"] < epochs
    table = table.sort_values(metric, ascending=(mode == "min"))
    table.to_csv(os.path.join(sweep_dir, "results.csv"), index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False), flush=True)
    best = results.get_best_result(metric=metric, mode=mode, scope="all")
    best_cfg = {k: v for k, v in best.config.items()}
    overrides = [f"{k}={v}" for k, v in best_cfg.items()]
    path = os.path.join(sweep_dir, "best_overrides.yaml")
    with open(path, "w") as f:
        f.write(f"# best trial of sweep {name}: {metric} = {best.metrics.get(metric)}\n"
                f"# retrain: python experiments/run.py method={cfg['method']['name']} overrides_file={path}\n")
        f.write("overrides:\n" + "".join(f"  - {o}\n" for o in overrides))
    summary = {"best_config": best_cfg, "best_metric": best.metrics.get(metric), "metric": metric,
               "trials": int(len(table)), "stopped_early": int(table["stopped_early"].sum()),
               "trial_epochs": int(table["training_iteration"].sum()), "overrides_file": path,
               "sweep_dir": sweep_dir}
    from trustlab.platform.train import write_json

    summary["plots"] = sweep_plots(table, list(space_spec), metric, mode, sweep_dir)
    rec = read_trial_record(cfg, sweep_dir, str(best.metrics.get("trial_id") or best_trial_id(best)))
    if rec is not None:  # the model registry's entry for this sweep (trustlab.platform.runs)
        rec.update(metric=metric, mode=mode, best_metric=best.metrics.get(metric), trials=summary["trials"])
        write_json(os.path.join(sweep_dir, "best_trial.json"), rec)
        summary["best_checkpoint"] = rec["checkpoint"]
    write_json(os.path.join(sweep_dir, "sweep.json"), summary)
    print(f"[trustlab] best {metric} {best.metrics.get(metric)} with {best_cfg}\n"
          f"[trustlab] {summary['stopped_early']} of {summary['trials']} trials stopped early; "
          f"{summary['trial_epochs']} trial-epochs\n[trustlab] best overrides: {path}", flush=True)
    return summary


def best_trial_id(result) -> str:
    """The trial id of a Tune ``Result`` (its folder is ``<trainable>_<trial id>_...``)."""
    base = os.path.basename(str(result.path).rstrip("/"))
    parts = base.split("_")
    return parts[1] if len(parts) > 2 else base


def param_importance(table, params: list[str], metric: str) -> dict:
    """Importance of each swept parameter for the metric: impurity importance of a small random
    forest fitted on (parameter values -> metric) over the trials (choices one-hot, summed back)."""
    import numpy as np
    import pandas as pd
    from sklearn.ensemble import RandomForestRegressor

    t = table.dropna(subset=[metric])
    if len(t) < 3:
        return {p: float("nan") for p in params}
    cols, owner = [], []
    for p in params:
        v = t[p]
        if pd.api.types.is_numeric_dtype(v):
            cols.append(v.astype(float).to_numpy()[:, None])
            owner.append(p)
        else:
            d = pd.get_dummies(v.astype(str)).to_numpy(float)
            cols.append(d)
            owner.extend([p] * d.shape[1])
    X = np.concatenate(cols, axis=1)
    rf = RandomForestRegressor(n_estimators=200, random_state=0).fit(X, t[metric].astype(float).to_numpy())
    imp = {p: 0.0 for p in params}
    for o, w in zip(owner, rf.feature_importances_):
        imp[o] += float(w)
    return imp


def sweep_plots(table, params: list[str], metric: str, mode: str, sweep_dir: str) -> dict:
    """optimisation_history.png (metric per trial in start order, best so far) and
    param_importance.png; returns the paths and the importances."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    order = table.sort_values("trial_id") if "trial_id" in table else table
    vals = order[metric].astype(float).to_numpy()
    best = np.fmax.accumulate(vals) if mode == "max" else np.fmin.accumulate(vals)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.scatter(range(1, len(vals) + 1), vals, label="trial (stopped early: x)",
               marker="o", c=["tab:red" if s else "tab:blue" for s in order["stopped_early"]])
    ax.plot(range(1, len(vals) + 1), best, "k-", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title("optimisation history")
    ax.legend(fontsize=8)
    fig.tight_layout()
    hist = os.path.join(sweep_dir, "optimisation_history.png")
    fig.savefig(hist, dpi=100)
    plt.close(fig)
    imp = param_importance(table, params, metric)
    fig, ax = plt.subplots(figsize=(5, 0.6 + 0.5 * len(imp)))
    names = sorted(imp, key=lambda k: imp[k])
    ax.barh(names, [imp[n] for n in names])
    ax.set_xlabel(f"importance for {metric}")
    ax.set_title("parameter importance (random forest)")
    fig.tight_layout()
    ip = os.path.join(sweep_dir, "param_importance.png")
    fig.savefig(ip, dpi=100)
    plt.close(fig)
    return {"history": hist, "importance": ip, "importances": imp}

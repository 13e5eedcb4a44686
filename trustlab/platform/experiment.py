"""Modes of the entry point: train, eval (tune and serve live in tune.py and trustlab.serve).

A run folder ``<run.root>/<run.name>/`` holds ``config.yaml`` (resolved), ``metrics.json``,
``roc.png``, ``checkpoints/best.pt`` and ``summary.txt`` (also printed at the end). Both
``config.yaml`` (``provenance.weights``) and the summary name the weights the run started from
(source, resolved file, sha256).
"""
from __future__ import annotations

import os
import time

from trustlab.platform import checkpoints as ck
from trustlab.platform.config import to_yaml
from trustlab.platform.evaluate import evaluate_split
from trustlab.platform.registry import get_method
from trustlab.platform.tracking import history_callbacks, tracked


def run_name(cfg: dict) -> str:
    return cfg["run"].get("name") or f"{cfg['method']['name']}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(cfg: dict, weights: list | None = None) -> tuple[str, str]:
    """Make the run folder and write ``config.yaml`` with ``provenance.weights`` (``weights``, or
    computed here: a missing weights file fails the run before anything trains)."""
    from trustlab.platform.weights import absolute_paths, provenance

    absolute_paths(cfg)  # before config.yaml and the workers see it: they run in other folders
    name = run_name(cfg)
    cfg["run"]["name"] = name
    cfg.setdefault("provenance", {})["weights"] = provenance(cfg) if weights is None else weights
    from trustlab.platform.runs import git_commit

    cfg["provenance"]["commit"] = git_commit()  # the code the run ran (model cards name it)
    d = os.path.abspath(os.path.join(cfg["run"]["root"], name))
    os.makedirs(os.path.join(d, "checkpoints"), exist_ok=True)
    with open(os.path.join(d, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))
    return name, d


def summarize(cfg: dict, run_dir: str, metrics: dict, extra_lines=()) -> str:
    lines = [f"== trustlab {cfg['method']['name']} ({cfg['mode']}) — run {cfg['run']['name']}",
             f"run folder: {run_dir}"]
    for split in ("val", "test"):
        for level in ("frame", "clip", "video"):  # the sample level (frame or clip), then video
            m = metrics.get(split, {}).get(level)
            if m:
                lines.append(f"{split:>5} {level:<6} " + "  ".join(
                    f"{k} {m[k]:.4f}" for k in ("auc", "ap", "eer", "acc") if k in m) + f"  (n={m.get('n')})")
        for g, m in sorted((metrics.get(split, {}).get("by_generator") or {}).items()):
            lines.append(f"{split:>5} {g}: auc {m['auc']:.4f}  acc {m['acc']:.4f}  (n={m.get('n')})")
    rows = [("method", metrics)] + sorted((metrics.get("baselines") or {}).items())
    for name, m in rows:  # FSCIL: accuracy per session, average, performance drop
        if isinstance(m, dict) and m.get("sessions"):
            lines.append(f"{name:>12} sessions " + " ".join(f"{a:.2f}" for a in m["sessions"])
                         + f"  average {m.get('average', float('nan')):.2f}  PD {m.get('pd', float('nan')):.2f}"
                         + f"  last {m.get('last', float('nan')):.2f}")
    lines.extend(str(x) for x in metrics.get("summary_lines") or [])  # a method's own report lines
    from trustlab.platform.weights import provenance_lines

    lines.extend(provenance_lines((cfg.get("provenance") or {}).get("weights") or []))
    from trustlab.platform.data.images import bad_file_lines

    lines.extend(bad_file_lines(metrics.get("data_errors")))
    lines.extend(extra_lines)
    text = "\n".join(lines)
    with open(os.path.join(run_dir, "summary.txt"), "w") as f:
        f.write(text + "\n")
    print(text, flush=True)
    return text


def add_data_errors(metrics: dict) -> dict:
    """``metrics["data_errors"]``: the files the run's streamed image sets could not read (after
    evaluation, whose pass over the test split may find more)."""
    from trustlab.platform.data.images import bad_file_summary

    errors = bad_file_summary()
    if errors is not None:
        metrics["data_errors"] = errors
    return metrics


def evaluate_and_report(cfg, method, model, data, run_dir, fname="metrics.json", extra=None):
    from trustlab.platform.plots import roc_plot
    from trustlab.platform.train import write_json

    if method.has("evaluate"):
        metrics = method.evaluate(cfg, model, data, run_dir)
        metrics.update(extra or {})
        add_data_errors(metrics)
        write_json(os.path.join(run_dir, fname), metrics)
        return metrics
    metrics, curves = {}, {}
    for split in ("val", "test"):
        if split in data:
            m, (y, s, _) = evaluate_split(method, model, data[split], cfg)
            metrics[split] = m
            curves[f"{split} frame"] = (y, s)
    if method.has("after_train"):
        metrics.update(method.after_train(cfg, model, data, run_dir) or {})
    if extra:
        metrics.update(extra)
    add_data_errors(metrics)
    write_json(os.path.join(run_dir, fname), metrics)
    if curves:
        roc_plot(curves, os.path.join(run_dir, "roc.png"), title=f"{cfg['method']['name']} ROC")
    return metrics


def train_ablations(cfg: dict, method, model, data, name: str, run_dir: str, metrics: dict) -> list[str]:
    """The method's declared ablation variants (``trustlab.platform.ablation``), each trained
    through the same Ray Train stages on the same data and scored by the same evaluation (its
    files under ``<run>/ablation/<variant>/``); adds them to ``metrics.json``, with the main
    model's margin over every variant there (its own report's too) on the primary figure
    (``metrics["ablation_gaps"]``), and returns their summary lines."""
    from trustlab.platform import ablation
    from trustlab.platform.train import fit_stages, load_model, write_json

    spec = ablation.declared(cfg)
    endpoint = cfg["run"].get("s3_endpoint")

    def fit(cfg2, stages, init_state, tag):
        with ck.staged_state(init_state) as staged:
            init = staged or cfg2["method"].get("init_from")
            _, _, last = fit_stages(cfg2, stages, data, f"{name}-abl-{tag}", run_dir, init_from=init)
        return load_model(cfg2, ck.load_state(last, endpoint))[1]

    def score(cfg2, m2, tag):
        d = os.path.join(run_dir, "ablation", tag)
        os.makedirs(d, exist_ok=True)
        return evaluate_and_report(cfg2, method, m2, data, d)

    new = ablation.run(cfg, method, model, data, run_dir, metrics, fit, score) if ablation.variants(cfg) else {}
    if new:
        metrics.setdefault("ablation", {}).update(new)
    g = ablation.gaps(metrics, spec)
    judged = g is not None and bool(g["gaps"])
    if judged:
        metrics["ablation_gaps"] = g
    if new or judged:
        write_json(os.path.join(run_dir, "metrics.json"), metrics)
    lines = ablation.summary_lines(metrics, list(new), spec)
    if judged and g["min_gap"] is not None:
        extra = f"; comparisons, not judged: {', '.join(g['comparisons'])}" if g["comparisons"] else ""
        lines.append(f"ablations judged on {g['metric']} ({'higher' if g['higher_is_better'] else 'lower'} is better): "
                     f"main {g['main']:.4f}, smallest margin {g['min_gap']:+.4f} (over {g['min_over']}){extra}")
    return lines


@tracked("train")
def train(cfg: dict) -> dict:
    from trustlab.platform.runtime import init_ray
    from trustlab.platform.train import fit_stages, load_model

    from trustlab.platform.data.images import reset_reports

    name, run_dir = prepare_run_dir(cfg)
    method = get_method(cfg["method"]["name"])
    res = init_ray(cfg)
    reset_reports()
    print(f"[trustlab] {method.name}: run {name} in {run_dir}; cluster {dict(res)}", flush=True)
    t0 = time.time()
    data = method.build_data(cfg)
    print(f"[trustlab] data ready in {time.time() - t0:.1f}s: " + ", ".join(
        f"{k} {len(v['y']) if isinstance(v, dict) else 'streamed'}" for k, v in data.items()), flush=True)
    results, _, init_from = fit_stages(cfg, method.stages(cfg), data, name, run_dir, cfg["method"].get("init_from"),
                                       callbacks=history_callbacks(cfg, run_dir))
    history = {stage: {k: v for k, v in (r.metrics or {}).items() if isinstance(v, (int, float, str))}
               for stage, r in results.items()}
    state = ck.load_state(init_from, cfg["run"].get("s3_endpoint"))
    ck.save_state(os.path.join(run_dir, "checkpoints"), **state)
    os.replace(os.path.join(run_dir, "checkpoints", ck.CKPT_FILE), os.path.join(run_dir, "checkpoints", "best.pt"))
    method, model = load_model(cfg, state)
    metrics = evaluate_and_report(cfg, method, model, data, run_dir,
                                  extra={"train_history": history, "selected": {"checkpoint": init_from, "epoch": state.get("epoch"),
                                                      "stage": state.get("stage")},
                                         "train_seconds": time.time() - t0})
    abl_lines = train_ablations(cfg, method, model, data, name, run_dir, metrics)
    summarize(cfg, run_dir, metrics, abl_lines + [f"best checkpoint: epoch {state.get('epoch')} of stage "
                                      f"{state.get('stage')} (best val_score, or latest for non-selecting stages) -> "
                                      f"{run_dir}/checkpoints/best.pt",
                                      f"wall time {time.time() - t0:.0f}s"])
    return metrics


def evaluate(cfg: dict) -> dict:
    """mode=eval: reload a checkpoint and recompute val/test metrics on the same data."""
    from trustlab.platform.train import load_model

    name, run_dir = prepare_run_dir(cfg)
    uri = cfg["eval"].get("checkpoint") or os.path.join(run_dir, "checkpoints", "best.pt")
    state = ck.load_state(uri, cfg["run"].get("s3_endpoint"))
    method = get_method(cfg["method"]["name"])
    from trustlab.platform.data.images import reset_reports

    reset_reports()
    data = method.build_data(cfg)
    method, model = load_model(cfg, state)
    metrics = evaluate_and_report(cfg, method, model, data, run_dir, fname="metrics_eval.json",
                                  extra={"checkpoint": uri})
    summarize(cfg, run_dir, metrics, [f"checkpoint: {uri}"])
    return metrics

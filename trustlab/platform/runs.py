"""The model registry: trained runs found by name under a runs root, and exported model folders.

A run folder ``<root>/<name>/`` is

- a finished training run when it holds ``metrics.json`` and ``checkpoints/best.pt`` (the
  checkpoint selected on the validation split);
- a finished sweep when it holds ``sweep.json`` and ``best_trial.json`` (the best trial's best
  checkpoint, written by ``trustlab.platform.tune.sweep``).

A model is named by a *spec* (``serve.detectors`` entries, ``export.source``):

- ``f2c``: the newest finished training run of method ``f2c`` under the root;
- ``f2c@my-run`` (or ``@my-run``): the run named ``my-run``, a training run or a sweep (its method
  must be ``f2c``);
- a path: a ``model.pt`` / ``model.safetensors`` file, or a folder holding one (an exported model
  folder, a checkpoint folder), local or ``s3://``.

``export(cfg)`` (``mode=export``) writes a self-contained model folder: ``model.pt`` (or
``model.safetensors``), the run's resolved ``config.yaml`` and a model card (``model_card.md`` and
``model_card.json``: method, data, metrics, selection rule, weights' origin, commit).
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import subprocess
from dataclasses import dataclass, field

from trustlab.platform import storage

BEST_TRIAL = "best_trial.json"
CARD_JSON = "model_card.json"
CARD_MD = "model_card.md"
FORMATS = ("pt", "safetensors")


class ModelNotFound(LookupError):
    """No run or model matches a spec; the message is one line naming what exists."""


@dataclass
class RunRecord:
    """One finished run: where it is, what it trained and which checkpoint it selected."""

    name: str
    dir: str
    kind: str                 # "train" | "sweep"
    method: str
    finished: float           # when it finished (mtime of metrics.json / best_trial.json)
    checkpoint: str           # the selected checkpoint (local path or s3:// URI)
    cfg: dict = field(default_factory=dict, repr=False)
    metrics: dict = field(default_factory=dict, repr=False)

    @property
    def spec(self) -> str:
        return f"{self.method}@{self.name}"


def _read_yaml(path: str) -> dict:
    import yaml

    with open(path) as f:
        d = yaml.safe_load(f)
    return d if isinstance(d, dict) else {}


def _read_json(path: str) -> dict:
    with open(path) as f:
        d = json.load(f)
    return d if isinstance(d, dict) else {}


def read_run(d: str) -> RunRecord | None:
    """The finished run in folder ``d``, or None (unfinished, not a run, unreadable)."""
    cfg_path = os.path.join(d, "config.yaml")
    if not os.path.isfile(cfg_path):
        return None
    try:
        cfg = _read_yaml(cfg_path)
        method = str((cfg.get("method") or {}).get("name") or "")
        best_pt = os.path.join(d, "checkpoints", "best.pt")
        metrics_path = os.path.join(d, "metrics.json")
        trial_path = os.path.join(d, BEST_TRIAL)
        if os.path.isfile(best_pt) and os.path.isfile(metrics_path):
            return RunRecord(os.path.basename(d), d, "train", method, os.path.getmtime(metrics_path), best_pt,
                             cfg, _read_json(metrics_path))
        if os.path.isfile(trial_path) and os.path.isfile(os.path.join(d, "sweep.json")):
            best = _read_json(trial_path)
            return RunRecord(os.path.basename(d), d, "sweep", method, os.path.getmtime(trial_path),
                             str(best["checkpoint"]), cfg, {"val": {"frame": best.get("val") or {}}, "sweep": best})
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None


def list_runs(root: str) -> list[RunRecord]:
    """Every finished run directly under ``root`` (a local folder), newest first."""
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        d = os.path.join(root, name)
        if os.path.isdir(d) and not name.startswith("."):
            r = read_run(d)
            if r is not None:
                out.append(r)
    return sorted(out, key=lambda r: r.finished, reverse=True)


def find_run(root: str, method: str | None = None, run: str | None = None) -> RunRecord:
    """The run named ``run`` (of ``method`` when given; a training run or a sweep), or the newest
    finished training run of ``method`` (a sweep's best trial is named: ``method@<sweep>``)."""
    runs = list_runs(root)
    if run:
        hit = [r for r in runs if r.name == run]
        if not hit:
            d = os.path.join(os.path.abspath(str(root)), run)
            why = "is not a finished run (no metrics.json + checkpoints/best.pt, nor sweep.json + best_trial.json)" \
                if os.path.isdir(d) else "does not exist"
            raise ModelNotFound(f"run {run!r} under {root} {why}; finished runs: {_names(runs)}")
        if method and hit[0].method != method:
            raise ModelNotFound(f"run {run!r} under {root} trained method {hit[0].method!r}, not {method!r}")
        return hit[0]
    hit = [r for r in runs if r.method == method and r.kind == "train"]
    if not hit:
        raise ModelNotFound(f"no finished {method} run under {root}; finished runs: {_names(runs)} "
                            f"(train one: python experiments/run.py method={method} run.root={root})")
    return hit[0]


def _names(runs: list[RunRecord]) -> str:
    return ", ".join(r.spec for r in runs[:12]) + (" ..." if len(runs) > 12 else "") if runs else "none"


def is_path(spec: str) -> bool:
    s = str(spec)
    return storage.is_s3(s) or "/" in s or s.endswith((".pt", ".safetensors")) or s.startswith(("~", "."))


def model_file(path: str) -> str:
    """A model file, or a folder holding ``model.pt`` / ``model.safetensors`` -> the path to load
    (``checkpoints.load_state`` reads both); local paths must exist."""
    if storage.is_s3(path):
        return path
    p = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(p):
        for f in ("model.pt", "model.safetensors"):
            if os.path.isfile(os.path.join(p, f)):
                return p
        raise ModelNotFound(f"{path} holds neither model.pt nor model.safetensors")
    if not os.path.isfile(p):
        raise ModelNotFound(f"no model file at {path}")
    return p


def resolve(spec: str, root: str | None, method: str | None = None) -> tuple[str, RunRecord | None]:
    """A model spec -> ``(checkpoint to load, the run it came from or None)``.

    ``spec`` is a method name, ``method@run``, ``@run`` or a path (see the module docstring);
    ``method`` (e.g. a detector entry's) is checked against the run's."""
    spec = str(spec)
    if is_path(spec):
        return model_file(spec), None
    m, _, run = spec.partition("@")
    m = m or method
    if method and m and m != method:
        raise ModelNotFound(f"model spec {spec!r} names method {m!r}, but {method!r} is expected")
    if not root:
        raise ModelNotFound(f"model spec {spec!r} needs a runs root (run.root or serve.checkpoint_root)")
    if storage.is_s3(root):
        raise ModelNotFound(f"runs are found by name in a local runs root; {root} is s3://: name the "
                            f"checkpoint (<root>/<name>/model.pt) instead")
    r = find_run(root, m or None, run or None)
    return r.checkpoint, r


# ----------------------------------------------------------------------------- export
def git_commit(repo: str | None = None) -> str:
    """The repository's commit (``+dirty`` with uncommitted changes), or ``unknown``."""
    import trustlab

    repo = repo or os.path.dirname(os.path.dirname(os.path.abspath(trustlab.__file__)))
    try:
        head = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        if not head:
            return "unknown"
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def selection_rule(rec: RunRecord) -> str:
    t = rec.cfg.get("trainer") or {}
    sel = t.get("select_metric", "val_auc")
    if rec.kind == "sweep":
        s = rec.metrics.get("sweep") or {}
        return (f"best trial of a {s.get('trials', '?')}-trial sweep by {s.get('metric', '?')} ({s.get('mode', 'max')}) "
                f"on the validation split, then that trial's checkpoint with the best {sel} on the validation split; "
                f"never the test split")
    chosen = rec.metrics.get("selected") or {}
    return (f"checkpoint with the best {sel} on the validation split (epoch {chosen.get('epoch', '?')} of stage "
            f"{chosen.get('stage', '?')}; stages that do not select keep their latest); never the test split")


def data_description(cfg: dict) -> dict:
    """What the run trained on: the data group and the method's own data knobs."""
    d = dict(cfg.get("data") or {})
    md = (cfg.get("method") or {}).get("data") or {}
    return {"data": d, "method.data": {k: v for k, v in md.items() if not isinstance(v, (dict, list))}}


def headline(metrics: dict) -> dict:
    """``{split: {level: {auc, ap, eer, acc, n}}}`` plus FSCIL's session figures, when present."""
    out = {}
    for split in ("val", "test"):
        for level, m in ((metrics.get(split) or {}).items()):
            if isinstance(m, dict) and any(k in m for k in ("auc", "acc")):
                out.setdefault(split, {})[level] = {k: m[k] for k in ("auc", "ap", "eer", "acc", "n") if k in m}
    for k in ("sessions", "average", "pd", "last"):
        if k in metrics:
            out[k] = metrics[k]
    return out


def card(rec: RunRecord, fmt: str, model_path: str, source_ckpt: str) -> dict:
    from trustlab.platform.weights import sha256

    prov = rec.cfg.get("provenance") or {}
    m = rec.cfg.get("method") or {}
    return {
        "method": rec.method,
        "run": rec.name,
        "run_kind": rec.kind,
        "run_dir": rec.dir,
        "format": fmt,
        "file": os.path.basename(model_path),
        "sha256": sha256(model_path),
        "source_checkpoint": source_ckpt,
        "data": data_description(rec.cfg),
        "metrics": headline(rec.metrics),
        "selection": selection_rule(rec),
        "weights_origin": prov.get("weights") or [],
        "commit": prov.get("commit") or f"{git_commit()} (at export; the run did not record one)",
        "seed": rec.cfg.get("seed"),
        "overrides": (rec.metrics.get("sweep") or {}).get("config") if rec.kind == "sweep" else None,
        "method_config": {k: v for k, v in m.items() if k not in ("tune", "ci_overrides")},
        "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def card_markdown(c: dict) -> str:
    lines = [f"# {c['method']} — model card", "",
             f"- run: `{c['run']}` ({c['run_kind']}), `{c['run_dir']}`",
             f"- file: `{c['file']}` ({c['format']}), sha256 `{c['sha256']}`",
             f"- selection: {c['selection']}",
             f"- commit: `{c['commit']}`",
             f"- seed: {c['seed']}",
             "- weights' origin: " + ("; ".join(f"{w.get('key')}: {w.get('source')} (sha256 {w.get('sha256')})"
                                                for w in c["weights_origin"]) or "none (random init)"),
             f"- data: {json.dumps(c['data']['data'])}; method.data {json.dumps(c['data']['method.data'])}"]
    if c.get("overrides"):
        lines.append(f"- sweep trial: {json.dumps(c['overrides'])}")
    lines += ["", "## Metrics", "", "| split | level | AUC | AP | EER | acc | n |", "|---|---|---|---|---|---|---|"]
    for split in ("val", "test"):
        for level, m in (c["metrics"].get(split) or {}).items():
            lines.append(f"| {split} | {level} | " + " | ".join(
                f"{m[k]:.4f}" if isinstance(m.get(k), (int, float)) and k != "n" else str(m.get(k, "-"))
                for k in ("auc", "ap", "eer", "acc", "n")) + " |")
    if "test" not in c["metrics"]:
        lines.append("\nNo test metrics: a sweep scores validation only; retrain the best trial "
                     "(`overrides_file=<sweep>/best_overrides.yaml`) to evaluate it on test.")
    if c["metrics"].get("sessions"):
        lines.append(f"\nFSCIL sessions: {c['metrics']['sessions']} (average {c['metrics'].get('average')}, "
                     f"PD {c['metrics'].get('pd')})")
    lines += ["", "## Serve", "", f"`python experiments/run.py mode=serve serve=graph "
              f"'serve.detectors=[{{name: {c['method']}, checkpoint: <this folder>}}]'`", ""]
    return "\n".join(lines)


def write_model(state: dict, out_dir: str, fmt: str) -> str:
    """The model's weights in ``out_dir`` as ``model.pt`` (a trustlab checkpoint without the
    optimizer) or ``model.safetensors`` (weights only; config.yaml and the card carry the rest)."""
    import torch

    os.makedirs(out_dir, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        p = os.path.join(out_dir, "model.safetensors")
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state["model"].items()}
        save_file(tensors, p, metadata={"format": "pt", "stage": str(state.get("stage")),
                                        "epoch": str(state.get("epoch"))})
        return p
    keep = {k: state[k] for k in ("model", "cfg", "epoch", "stage", "step", "metrics") if k in state}
    p = os.path.join(out_dir, "model.pt")
    torch.save(keep, p)
    return p


def export_run(rec: RunRecord, out_dir: str, fmt: str = "pt", endpoint: str | None = None) -> str:
    """Write ``rec``'s selected model as a self-contained folder; returns the folder."""
    from trustlab.platform.checkpoints import load_state
    from trustlab.platform.config import to_yaml

    if fmt not in FORMATS:
        raise ValueError(f"export.format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    state = load_state(rec.checkpoint, endpoint)
    cfg = copy.deepcopy(state.get("cfg") or rec.cfg)
    cfg.setdefault("provenance", {}).update(rec.cfg.get("provenance") or {})
    state["cfg"] = cfg
    out_dir = os.path.abspath(out_dir)
    for f in ("model.pt", "model.safetensors"):  # one model file per folder
        if os.path.exists(os.path.join(out_dir, f)):
            os.remove(os.path.join(out_dir, f))
    path = write_model(state, out_dir, fmt)
    with open(os.path.join(out_dir, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))
    c = card(rec, fmt, path, rec.checkpoint)
    with open(os.path.join(out_dir, CARD_JSON), "w") as f:
        json.dump(c, f, indent=2, default=str)
    with open(os.path.join(out_dir, CARD_MD), "w") as f:
        f.write(card_markdown(c))
    return out_dir


def export(cfg: dict) -> str:
    """``mode=export``: the model of ``export.source`` (default: the run ``run.name``, else the
    newest finished run of ``method``) into ``export.dir`` (default ``<run folder>/export``)."""
    ex = cfg.get("export") or {}
    root = cfg["run"]["root"]
    spec = ex.get("source") or (f"@{cfg['run']['name']}" if cfg["run"].get("name") else cfg["method"]["name"])
    _, rec = resolve(spec, root)
    if rec is None:
        raise ModelNotFound(f"export.source {spec!r} is a model file; export names a run (method, method@run)")
    out = export_run(rec, ex.get("dir") or os.path.join(rec.dir, "export"), str(ex.get("format") or "pt"),
                     cfg["run"].get("s3_endpoint"))
    c = _read_json(os.path.join(out, CARD_JSON))
    print(f"[trustlab] exported {rec.spec} ({rec.kind}) -> {out}\n"
          f"[trustlab] {c['file']} sha256 {c['sha256'][:16]}..., model card {os.path.join(out, CARD_MD)}\n"
          f"[trustlab] serve it: python experiments/run.py mode=serve serve=graph "
          f"'serve.detectors=[{{name: {rec.method}, checkpoint: {out}}}]'", flush=True)
    return out

"""The comparison report: a leaderboard across run folders, as Markdown and a static HTML page.

    python -m trustlab.report outputs/                 # -> outputs/report/index.html and report.md
    python -m trustlab.report /tmp/pytest-of-me/ --out /tmp/report

Every folder under the given roots (a few levels deep) that holds a ``config.yaml`` and a
``metrics.json`` (a training run) or a ``sweep.json`` (a sweep) is read. Per method and dataset:
each run's test metrics (split -> level -> metric, as ``metrics.json`` nests them), its
validation figure, how its checkpoint was selected and on what data it trained; its ablations;
robustness curves (video methods); FSCIL session curves (the method and its baselines); training
curves (``history.jsonl``); and each sweep's trials and best configuration. Plots are PNGs in
``<out>/plots`` (the runs' own plots are copied there too), so the folder is self-contained.
"""
from __future__ import annotations

import argparse
import datetime
import html
import json
import math
import os
import re
import shutil
import sys

SKIP_DIRS = {"ray", "checkpoints", "export", "report", "mlartifacts", "mlruns", ".data", "data", "__pycache__"}
METRIC_ORDER = ("auc", "ap", "eer", "acc", "average", "pd", "last")
MAX_COLS = 8


# ----------------------------------------------------------------------------- reading runs
def _load(path: str, default=None):
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            with open(path) as f:
                return yaml.safe_load(f) or default
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def find_run_dirs(roots, max_depth: int = 4) -> list[str]:
    """Folders holding config.yaml and metrics.json or sweep.json under ``roots``."""
    out = []

    def walk(d: str, depth: int):
        try:
            names = sorted(os.listdir(d))
        except OSError:
            return
        if "config.yaml" in names and ("metrics.json" in names or "sweep.json" in names):
            out.append(d)
            return
        if depth >= max_depth:
            return
        for n in names:
            p = os.path.join(d, n)
            if n not in SKIP_DIRS and not n.startswith(".") and os.path.isdir(p) and not os.path.islink(p):
                walk(p, depth + 1)

    for r in roots:
        walk(os.path.abspath(r), 0)
    return sorted(set(out))


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def read_run(d: str) -> dict:
    from trustlab.platform import runs as R
    from trustlab.platform.tracking import read_history

    cfg = _load(os.path.join(d, "config.yaml"), {}) or {}
    method = str((cfg.get("method") or {}).get("name") or "?")
    is_sweep = os.path.isfile(os.path.join(d, "sweep.json"))
    metrics = _load(os.path.join(d, "metrics.json"), {}) or {}
    rec = R.read_run(d)
    r = {"dir": d, "name": os.path.basename(d), "method": method, "kind": "sweep" if is_sweep else "train",
         "cfg": cfg, "metrics": metrics, "data": data_label(cfg), "history": read_history(d),
         "finished": os.path.getmtime(os.path.join(d, "sweep.json" if is_sweep else "metrics.json")),
         "selection": R.selection_rule(rec) if rec is not None else "-", "pngs": sorted(
             f for f in os.listdir(d) if f.endswith(".png"))}
    if is_sweep:
        r["sweep"] = _load(os.path.join(d, "sweep.json"), {}) or {}
        r["best_trial"] = _load(os.path.join(d, R.BEST_TRIAL), {}) or {}
        r["trials_csv"] = os.path.join(d, "results.csv") if os.path.isfile(os.path.join(d, "results.csv")) else None
    return r


def data_label(cfg: dict) -> str:
    d = cfg.get("data") or {}
    md = (cfg.get("method") or {}).get("data") or {}
    name = str(d.get("name") or "auto")
    if name == "auto":
        name = f"generated ({md.get('benchmark') or md.get('kind') or cfg.get('method', {}).get('name', '?')})"
        sizes = [f"{k[2:]} {md[k]}" for k in ("n_train", "n_val", "n_test") if _is_num(md.get(k))]
        if _is_num(md.get("size")):
            sizes.append(f"{md['size']}px")
        return name + (f": {', '.join(sizes)}" if sizes else "")
    return name + (f" @ {d['root']}" if d.get("root") else "")


# ----------------------------------------------------------------------------- tables
def test_columns(metrics: dict) -> dict:
    """``{"<level> <metric>": value}`` of the test split, in a stable, readable order."""
    out = {}
    test = metrics.get("test") or {}
    for level, m in test.items():
        if not isinstance(m, dict):
            continue
        keys = sorted((k for k in m if _is_num(m[k]) and k != "n"),
                      key=lambda k: (METRIC_ORDER.index(k) if k in METRIC_ORDER else len(METRIC_ORDER), k))
        for k in keys:
            out[f"{level} {k}"] = float(m[k])
    for k in ("average", "pd", "last"):  # FSCIL: accuracy over sessions, in percent
        if _is_num(metrics.get(k)):
            out[f"sessions {k}"] = float(metrics[k])
    return out


def primary(cols: dict) -> tuple[str, float] | None:
    """The column that ranks a run: the first AUC, else the FSCIL average, else the first accuracy."""
    for pat in (r" auc$", r"^sessions average$", r" acc$"):
        for k, v in cols.items():
            if re.search(pat, k):
                return k, v
    return next(iter(cols.items()), None)


def val_figure(r: dict) -> str:
    m = r["metrics"]
    if r["kind"] == "sweep":
        s = r.get("sweep") or {}
        return f"{s.get('metric', 'val')} {_fmt(s.get('best_metric'))}"
    v = (m.get("val") or {})
    for level, mm in v.items():
        if isinstance(mm, dict):
            for k in ("auc", "acc", "deletion_auc"):
                if _is_num(mm.get(k)):
                    return f"{level} {k} {_fmt(mm[k])}"
    return "-"


def _fmt(v, nd: int = 4) -> str:
    if not _is_num(v):
        return "-" if v is None else str(v)
    if isinstance(v, int) or (hasattr(v, "dtype") and v.dtype.kind in "iu"):
        return str(int(v))
    v = float(v)
    return f"{v:.2f}" if abs(v) >= 10 else f"{v:.{nd}f}"


def ablation_rows(metrics: dict) -> list[tuple[str, dict]]:
    """``[(variant, {"<level> <metric>": value})]`` from ``metrics["ablation"]`` (test figures); a
    comparison variant's name carries `` (comparison)``."""
    from trustlab.platform.tracking import flatten

    rows = []
    for variant, r in (metrics.get("ablation") or {}).items():
        if not isinstance(r, dict):
            continue
        src = r.get("test") if isinstance(r.get("test"), dict) else r
        flat = flatten(src, leaf=_is_num)
        if isinstance(r.get("test"), dict) and all(_is_num(v) for v in r["test"].values()):
            flat = {f"test {k}": v for k, v in r["test"].items() if k != "n"}
        flat = {k.replace(".", " "): v for k, v in flat.items() if not k.endswith(("n", ".threshold"))}
        keys = sorted(flat, key=lambda k: (not k.endswith(" auc"), not k.endswith(" acc"), k))[:MAX_COLS // 2]
        if keys:  # a comparison keeps the mechanism and adds to it (trustlab.platform.ablation): say so
            name = f"{variant} (comparison)" if r.get("kind") == "comparison" else variant
            rows.append((name, {k: flat[k] for k in keys}))
    return rows


# ----------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _save(plt, fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def leaderboard_plot(group: list[dict], title: str, path: str) -> str | None:
    """Horizontal bars of each run's test columns that are AUCs or accuracies (the best run on top)."""
    plt = _plt()
    cols = [c for c in _union_cols(group) if c.endswith((" auc", " acc"))][:3]
    if not cols:
        return None
    runs = group[::-1]
    fig, ax = plt.subplots(figsize=(6.4, 1.1 + 0.3 * len(runs) * len(cols)))
    h = 0.8 / len(cols)
    for j, c in enumerate(cols):  # within a run, the first column on top (as the legend lists them)
        ys = [i - (j - (len(cols) - 1) / 2) * h for i in range(len(runs))]
        vals = [r["cols"].get(c, float("nan")) for r in runs]
        bars = ax.barh(ys, vals, height=h * 0.95, label=c)
        for b, v in zip(bars, vals):
            if _is_num(v):
                ax.text(b.get_width() + 0.005, b.get_y() + b.get_height() / 2, f"{v:.3f}", va="center", fontsize=7)
    ax.set_yticks(range(len(runs)))
    ax.set_yticklabels([r["name"] for r in runs])
    ax.set_xlim(0, 1.12)
    if any(c.endswith(" auc") for c in cols):
        ax.axvline(0.5, color="0.6", lw=0.8, ls=":")
    ax.set_xlabel("test metric" + (" (dotted: chance AUC)" if any(c.endswith(" auc") for c in cols) else ""))
    ax.set_title(title)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the axes: inside, it hid the bars' ends
    return _save(plt, fig, path)


def robustness_plot(group: list[dict], title: str, path: str) -> str | None:
    """Video AUC against perturbation level, one panel per kind, one line per run (dashed: clean)."""
    rows = {r["name"]: (r["metrics"].get("robustness") or {}).get("rows") for r in group}
    rows = {k: v for k, v in rows.items() if v}
    if not rows:
        return None
    plt = _plt()
    kinds = list(dict.fromkeys(x["kind"] for v in rows.values() for x in v if x["kind"] != "clean"))
    fig, axes = plt.subplots(1, len(kinds), figsize=(2.9 * len(kinds) + 0.6, 3.0), squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], kinds):
        for i, (name, rs) in enumerate(rows.items()):
            pts = [x for x in rs if x["kind"] == kind]
            line, = ax.plot([x["level"] for x in pts], [x.get("video_auc") for x in pts], "o-", ms=3, label=name)
            clean = (next(r for r in group if r["name"] == name)["metrics"].get("test") or {}).get("video", {}).get("auc")
            if _is_num(clean):
                ax.axhline(clean, color=line.get_color(), ls="--", lw=0.8)
        if kind == "jpeg":
            ax.invert_xaxis()
        ax.set_title(kind)
        ax.set_xlabel({"jpeg": "JPEG quality", "blur": "blur sigma (px)", "noise": "noise sigma",
                       "downscale": "downscale factor"}.get(kind, "level"))
        ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test video AUC (dashed: clean)")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.suptitle(title)
    return _save(plt, fig, path)


def sessions_plot(group: list[dict], title: str, path: str) -> str | None:
    """FSCIL accuracy after each session: each run's method (solid) and its baselines (dashed)."""
    runs = [r for r in group if r["metrics"].get("sessions")]
    if not runs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, r in enumerate(runs):
        m = r["metrics"]
        color = f"C{i % 10}"
        ax.plot(range(len(m["sessions"])), m["sessions"], "o-", color=color, ms=3,
                label=f"{r['name']} (avg {m.get('average', float('nan')):.1f})")
        for j, (b, bm) in enumerate(sorted((m.get("baselines") or {}).items())):
            if isinstance(bm, dict) and bm.get("sessions"):
                ax.plot(range(len(bm["sessions"])), bm["sessions"], ("--", ":", "-.")[j % 3], color=color, lw=1,
                        label=f"  {b} (avg {bm.get('average', float('nan')):.1f})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("session (0 = base)")
    ax.set_ylabel("top-1 accuracy over seen classes (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    return _save(plt, fig, path)


def training_plot(group: list[dict], title: str, path: str) -> str | None:
    """Validation score and training loss per epoch (``history.jsonl``), one line per run and stage."""
    runs = [r for r in group if r["history"]]
    if not runs:
        return None
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8.4, 3.2))
    for i, r in enumerate(runs):
        last = {}
        for row in r["history"]:  # a resumed run repeats epochs: the later report wins
            last[(row.get("stage"), row.get("epoch"))] = row
        stages = list(dict.fromkeys(k[0] for k in last))
        for j, st in enumerate(stages):
            pts = sorted((k[1], v) for k, v in last.items() if k[0] == st and _is_num(k[1]))
            lab = r["name"] + (f" / {st}" if len(stages) > 1 else "")
            style = ("o-", "s--", "^:")[j % 3]
            a1.plot([p[0] for p in pts], [p[1].get("val_score") for p in pts], style, color=f"C{i % 10}", ms=3, label=lab)
            a2.plot([p[0] for p in pts], [p[1].get("train_loss") for p in pts], style, color=f"C{i % 10}", ms=3, label=lab)
    a1.set_title("validation score (selects the checkpoint)")
    a2.set_title("training loss")
    for a in (a1, a2):
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
        a.xaxis.get_major_locator().set_params(integer=True)
    a2.legend(fontsize=7)
    fig.suptitle(title)
    return _save(plt, fig, path)


def sweep_plot(r: dict, path: str) -> str | None:
    """The sweep's metric per trial in start order (x: stopped early) and the best so far."""
    if not r.get("trials_csv"):
        return None
    import numpy as np
    import pandas as pd

    s = r.get("sweep") or {}
    metric = s.get("metric", "val_auc")
    df = pd.read_csv(r["trials_csv"])
    if metric not in df or df.empty:
        return None
    df = df.sort_values("trial_id") if "trial_id" in df else df
    vals = df[metric].astype(float).to_numpy()
    mode = (r.get("best_trial") or {}).get("mode", "max")
    best = np.fmax.accumulate(vals) if mode == "max" else np.fmin.accumulate(vals)
    early = df["stopped_early"].astype(bool).to_numpy() if "stopped_early" in df else np.zeros(len(df), bool)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    x = np.arange(1, len(vals) + 1)
    if (~early).any():
        ax.scatter(x[~early], vals[~early], c="tab:blue", label="trial, ran to the end", zorder=3)
    if early.any():
        ax.scatter(x[early], vals[early], c="tab:red", marker="x", label="trial, stopped early (ASHA)", zorder=3)
    ax.step(x, best, "k-", where="post", lw=1, label="best so far")
    ax.margins(y=0.15)
    ax.yaxis.get_major_locator().set_params(nbins=5)
    ax.set_xticks(x)
    ax.set_xlabel("trial (start order)")
    ax.set_ylabel(metric)
    ax.set_title(f"sweep {r['name']}: {metric} per trial")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


# ----------------------------------------------------------------------------- building
def build(roots, out_dir: str) -> dict:
    """Read the runs under ``roots``; write ``report.md``, ``index.html`` and ``plots/`` into ``out_dir``."""
    out_dir = os.path.abspath(out_dir)
    plots = os.path.join(out_dir, "plots")
    os.makedirs(plots, exist_ok=True)
    dirs = [d for d in find_run_dirs(roots) if not d.startswith(out_dir + os.sep)]
    runs = [read_run(d) for d in dirs]
    names = [r["name"] for r in runs]
    for r in runs:  # the same run name under two roots: tell them apart by the parent folder
        r["label"] = r["name"] if names.count(r["name"]) == 1 else f"{os.path.basename(os.path.dirname(r['dir']))}/{r['name']}"
        r["cols"] = test_columns(r["metrics"])
        r["primary"] = primary(r["cols"])
        r["val"] = val_figure(r)
        r["ablation"] = ablation_rows(r["metrics"])
        r["own_plots"] = []
        for f in r["pngs"]:
            dst = f"{_safe(r['label'])}__{f}"
            shutil.copyfile(os.path.join(r["dir"], f), os.path.join(plots, dst))
            r["own_plots"].append((f, f"plots/{dst}"))
    groups: dict = {}
    for r in runs:
        if r["kind"] == "train":
            groups.setdefault((r["method"], r["data"]), []).append(r)
    sections = []
    for (method, data), g in sorted(groups.items()):
        g.sort(key=lambda r: -(r["primary"][1] if r["primary"] else -math.inf))
        key = _safe(f"{method}_{data}")[:80]
        gp = [dict(r, name=r["label"]) for r in g]
        figs = {"leaderboard": leaderboard_plot(gp, f"{method} on {data}", os.path.join(plots, f"leaderboard_{key}.png")),
                "training": training_plot(gp, f"{method}: training", os.path.join(plots, f"training_{key}.png")),
                "robustness": robustness_plot(gp, f"{method}: robustness on test", os.path.join(plots, f"robustness_{key}.png")),
                "sessions": sessions_plot(gp, f"{method}: accuracy per session", os.path.join(plots, f"sessions_{key}.png"))}
        sections.append({"method": method, "data": data, "runs": g,
                         "figs": {k: f"plots/{os.path.basename(v)}" for k, v in figs.items() if v}})
    sweeps = [r for r in runs if r["kind"] == "sweep"]
    for r in sweeps:
        p = sweep_plot(r, os.path.join(plots, f"sweep_{_safe(r['label'])}.png"))
        r["sweep_fig"] = f"plots/{os.path.basename(p)}" if p else None
    report = {"generated": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "roots": [os.path.abspath(x) for x in roots],
              "sections": sections, "sweeps": sweeps, "n_runs": len(runs)}
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown(report))
    with open(os.path.join(out_dir, "index.html"), "w") as f:
        f.write(html_page(report))
    return {"out": out_dir, "runs": len(runs), "groups": len(sections), "sweeps": len(sweeps),
            "html": os.path.join(out_dir, "index.html"), "md": os.path.join(out_dir, "report.md")}


def _union_cols(g: list[dict]) -> list[str]:
    """The group's test columns, without a level that repeats another level's figures in every run
    (image methods report their video level equal to the frame level)."""
    cols = list(dict.fromkeys(c for r in g for c in r["cols"]))
    levels = list(dict.fromkeys(c.split(" ", 1)[0] for c in cols))

    def same(a: str, b: str) -> bool:
        ka = [c for c in cols if c.startswith(a + " ")]
        return all(r["cols"].get(c) == r["cols"].get(b + c[len(a):]) for r in g for c in ka)

    drop = {b for i, a in enumerate(levels) for b in levels[i + 1:] if same(b, a) and same(a, b)}
    return [c for c in cols if c.split(" ", 1)[0] not in drop][:MAX_COLS]


def _config(c) -> str:
    """A sweep's best configuration, numbers to 4 significant digits."""
    return ", ".join(f"{k}={v:.4g}" if _is_num(v) else f"{k}={v}" for k, v in (c or {}).items()) or "-"


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")


def _trial_rows(r: dict, n: int = 5) -> tuple[list[str], list[list[str]]]:
    if not r.get("trials_csv"):
        return [], []
    import pandas as pd

    df = pd.read_csv(r["trials_csv"]).head(n)
    cols = [c for c in df.columns if c not in ("time_total_s",)]
    return cols, [[_fmt(v) if _is_num(v) else str(v) for v in row] for row in df[cols].itertuples(index=False)]


def markdown(rep: dict) -> str:
    L = [f"# trustlab comparison report", "",
         f"{rep['n_runs']} runs under {', '.join(rep['roots'])}; generated {rep['generated']}. "
         "Checkpoints are selected on validation; test figures are reported, never used to select.", ""]
    for sec in rep["sections"]:
        g, cols = sec["runs"], _union_cols(sec["runs"])
        L += [f"## {sec['method']} — {sec['data']}", "",
              "| rank | run | " + " | ".join(f"test {c}" for c in cols) + " | validation | finished |",
              "|---|---|" + "---|" * len(cols) + "---|---|"]
        for i, r in enumerate(g, 1):
            L.append(f"| {i} | {r['label']} | " + " | ".join(_fmt(r["cols"].get(c)) for c in cols)
                     + f" | {r['val']} | {_when(r['finished'])} |")
        L.append("")
        for r in g:
            L.append(f"- **{r['label']}** (`{r['dir']}`): selection — {r['selection']}")
            for v, vals in r["ablation"]:
                L.append(f"  - ablation {v}: " + ", ".join(f"{k} {_fmt(x)}" for k, x in vals.items()))
        L.append("")
        for k, p in sec["figs"].items():
            L.append(f"![{k}]({p})")
        L.append("")
    if rep["sweeps"]:
        L += ["## Sweeps", ""]
        for r in rep["sweeps"]:
            s = r.get("sweep") or {}
            L += [f"### {r['method']} sweep {r['label']} — {r['data']}", "",
                  f"{s.get('trials', '?')} trials ({s.get('stopped_early', '?')} stopped early, "
                  f"{s.get('trial_epochs', '?')} trial-epochs); best {s.get('metric')} {_fmt(s.get('best_metric'))} "
                  f"with `{_config(s.get('best_config'))}`; selection — {r['selection']}", ""]
            cols, rows = _trial_rows(r)
            if cols:
                L += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                L += ["| " + " | ".join(row) + " |" for row in rows]
            if r.get("sweep_fig"):
                L += ["", f"![sweep]({r['sweep_fig']})"]
            L.append("")
    return "\n".join(L) + "\n"


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:18px 28px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#c9cfdb;font-size:13px}main{padding:8px 28px 40px;max-width:1280px}
section{background:#fff;border:1px solid #e1e4ea;border-radius:8px;margin:18px 0;padding:14px 18px}
h2{font-size:17px;margin:2px 0 10px}h2 small{color:#5b6475;font-weight:400}h3{font-size:15px;margin:16px 0 6px}
table{border-collapse:collapse;font-size:13px;margin:6px 0 10px}th,td{padding:4px 9px;border-bottom:1px solid #eceef2;text-align:right;white-space:nowrap}
th{background:#f0f2f5;font-weight:600}td.l,th.l{text-align:left}tr.best td{background:#eef7ee}
.figs{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}.figs img{width:100%;border:1px solid #e1e4ea;border-radius:4px}
.fig{margin:0;flex:0 1 570px;max-width:570px}.fig.wide{flex-basis:100%;max-width:960px}.fig figcaption{font-size:12px;color:#5b6475}
details{margin:4px 0}summary{cursor:pointer;color:#2b5cab}.muted{color:#5b6475;font-size:12px}
.thumbs img{height:150px;margin:4px 6px 0 0}code{font-size:12px;background:#f0f2f5;padding:1px 4px;border-radius:3px}
nav a{margin-right:12px;color:#2b5cab;text-decoration:none;font-size:13px}.scroll{overflow-x:auto}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _table(head: list[str], rows: list[list[str]], best_first: bool = False, left: int = 1) -> str:
    h = "".join(f"<th class='l'>{_e(c)}</th>" if i < left else f"<th>{_e(c)}</th>" for i, c in enumerate(head))
    body = []
    for j, row in enumerate(rows):
        cls = " class='best'" if best_first and j == 0 and len(rows) > 1 else ""
        body.append(f"<tr{cls}>" + "".join(f"<td class='l'>{c}</td>" if i < left else f"<td>{c}</td>"
                                         for i, c in enumerate(row)) + "</tr>")
    return f"<div class='scroll'><table><thead><tr>{h}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"


def _fig(path: str, caption: str, wide: bool = False) -> str:
    return (f"<figure class='fig{' wide' if wide else ''}'><img src='{_e(path)}' alt='{_e(caption)}'>"
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def html_page(rep: dict) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>trustlab report</title><style>{CSS}</style></head><body>",
             f"<header><h1>trustlab — comparison of {rep['n_runs']} runs</h1><p>{_e(', '.join(rep['roots']))} · "
             f"generated {_e(rep['generated'])} · checkpoints selected on validation; test figures are reported only</p></header><main>"]
    nav = [f"<a href='#{_safe(s['method'] + '_' + s['data'])}'>{_e(s['method'])} · {_e(s['data'])}</a>" for s in rep["sections"]]
    if rep["sweeps"]:
        nav.append("<a href='#sweeps'>sweeps</a>")
    parts.append(f"<nav>{''.join(nav)}</nav>")
    if not rep["sections"] and not rep["sweeps"]:
        parts.append("<section><p>No finished runs found (a run folder holds config.yaml and metrics.json).</p></section>")
    for sec in rep["sections"]:
        g, cols = sec["runs"], _union_cols(sec["runs"])
        rows = [[f"{i}", f"<b>{_e(r['label'])}</b>"] + [_fmt(r["cols"].get(c)) for c in cols]
                + [_e(r["val"]), _e(_when(r["finished"]))] for i, r in enumerate(g, 1)]
        parts.append(f"<section id='{_safe(sec['method'] + '_' + sec['data'])}'><h2>{_e(sec['method'])} "
                     f"<small>on {_e(sec['data'])} · {len(g)} run{'s' if len(g) != 1 else ''}</small></h2>")
        parts.append(_table(["#", "run"] + [f"test {c}" for c in cols] + ["validation", "finished"], rows, True, 2))
        figs = [_fig(p, {"leaderboard": "test metrics per run", "training": "training curves (history.jsonl)",
                         "robustness": "robustness: video AUC under perturbations",
                         "sessions": "FSCIL: accuracy after each session"}[k], wide=k == "robustness")
                for k, p in sec["figs"].items()]
        if figs:
            parts.append(f"<div class='figs'>{''.join(figs)}</div>")
        for r in g:
            inner = [f"<p class='muted'><code>{_e(r['dir'])}</code></p>",
                     f"<p><b>selection</b>: {_e(r['selection'])}</p><p><b>data</b>: {_e(r['data'])}</p>"]
            if r["ablation"]:
                acols = list(dict.fromkeys(k for _, v in r["ablation"] for k in v))
                inner.append("<h3>ablations</h3>" + _table(["variant"] + acols, [[_e(v)] + [_fmt(vals.get(c)) for c in acols]
                                                                                  for v, vals in r["ablation"]]))
            if r["own_plots"]:
                inner.append("<div class='thumbs'>" + "".join(
                    f"<a href='{_e(p)}'><img src='{_e(p)}' alt='{_e(f)}' title='{_e(f)}'></a>" for f, p in r["own_plots"]) + "</div>")
            parts.append(f"<details><summary>{_e(r['label'])}: selection, data, ablations, plots</summary>{''.join(inner)}</details>")
        parts.append("</section>")
    if rep["sweeps"]:
        parts.append("<section id='sweeps'><h2>Sweeps</h2>")
        for r in rep["sweeps"]:
            s = r.get("sweep") or {}
            parts.append(f"<h3>{_e(r['method'])} · {_e(r['label'])} <small class='muted'>{_e(r['data'])}</small></h3>"
                         f"<p>{_e(s.get('trials', '?'))} trials ({_e(s.get('stopped_early', '?'))} stopped early, "
                         f"{_e(s.get('trial_epochs', '?'))} trial-epochs); best {_e(s.get('metric'))} "
                         f"<b>{_fmt(s.get('best_metric'))}</b> with <code>{_e(_config(s.get('best_config')))}</code></p>"
                         f"<p class='muted'>selection: {_e(r['selection'])}</p>")
            cols, rows = _trial_rows(r)
            if cols:
                parts.append(_table(cols, [[_e(c) for c in row] for row in rows], True, 1))
            known = [v for v in ((s.get("plots") or {}).get("importances") or {}).values() if _is_num(v)]
            figs = ([_fig(r["sweep_fig"], "metric per trial and best so far")] if r.get("sweep_fig") else []) + \
                   [_fig(p, "parameter importance (random forest over the trials)") for f, p in r["own_plots"]
                    if "importance" in f and known]
            if figs:
                parts.append(f"<div class='figs'>{''.join(figs)}</div>")
        parts.append("</section>")
    parts.append("</main></body></html>")
    return "\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trustlab.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("roots", nargs="+", help="folders holding run folders (e.g. outputs/)")
    ap.add_argument("--out", default=None, help="report folder (default: <first root>/report)")
    a = ap.parse_args(argv)
    missing = [r for r in a.roots if not os.path.isdir(r)]
    if missing:
        print(f"error: not a folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    res = build(a.roots, a.out or os.path.join(a.roots[0], "report"))
    print(f"[trustlab] report of {res['runs']} runs ({res['groups']} method/data groups, {res['sweeps']} sweeps): "
          f"{res['html']} and {res['md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

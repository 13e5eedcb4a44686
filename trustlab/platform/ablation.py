"""Declared ablations, trained after the main model and reported beside it.

A method YAML declares its variants under ``ablation``::

    ablation:
      enabled: true
      variants:
        <variant>:
          what: <what this variant switches off>
          overrides: {<dotted key>: <value>, ...}   # the variant's config values
          stages: [<stage>, ...]                     # optional: retrain only these stages ...
          init_prefix: <prefix.>                     # ... from the main model's parameters with this prefix

The default run (``mode=train``) trains each variant after the main model on the same data,
seed and budget (only the overrides differ), scores it with the same evaluation as the main
model, and writes ``metrics.json["ablation"][variant]`` (the same split/level/metric nesting,
plus ``what`` and ``overrides``) and one summary line each, with the main model's figure and the
gap. A variant the method's own report already wrote (``after_train``/``evaluate`` filling
``metrics["ablation"][variant]``) is not trained twice. Nothing here names a method.
"""
from __future__ import annotations

import math

# what a variant's metrics keep of an evaluation: the figures, not the nested reports
KEEP = ("val", "test", "sessions", "average", "pd", "last", "cross_domain")


def variants(cfg: dict) -> dict:
    """The declared variants, or {} when ablations are off."""
    ab = cfg["method"].get("ablation")
    if not isinstance(ab, dict) or not ab.get("enabled", True):
        return {}
    return dict(ab.get("variants") or {})


def variant_config(cfg: dict, spec: dict) -> dict:
    from trustlab.platform.config import apply_dotted

    cfg2 = apply_dotted(cfg, dict(spec.get("overrides") or {}))
    cfg2["method"]["ablation"] = {"enabled": False, "variants": {}}  # a variant runs no ablations of its own
    return cfg2


def primary(metrics: dict) -> tuple[str, float] | None:
    """``(name, value)`` of the figure a run is compared on, higher is better: the test split's
    AUC at its first level (detection), else FSCIL's last-session accuracy, else the first test
    figure. None when there is none."""
    test = metrics.get("test") or {}
    for level, m in test.items():
        if isinstance(m, dict) and isinstance(m.get("auc"), (int, float)):
            return f"test {level} auc", float(m["auc"])
    if isinstance(metrics.get("last"), (int, float)):
        return "last-session acc", float(metrics["last"])
    for level, m in test.items():
        if isinstance(m, dict):
            for k, v in m.items():
                if isinstance(v, (int, float)) and k != "n":
                    return f"test {level} {k}", float(v)
    return None


def run(cfg: dict, method, model, data: dict, run_dir: str, metrics: dict, fit, score) -> dict:
    """Train and score every declared variant the metrics do not hold yet. ``fit(cfg2, stages,
    init_state, tag)`` trains the variant's stages and returns its model; ``score(cfg2, model,
    tag)`` returns its metrics dict (the main model's evaluation). Returns ``{variant: metrics}``."""
    done = metrics.get("ablation") if isinstance(metrics.get("ablation"), dict) else {}
    out = {}
    for name, spec in variants(cfg).items():
        if name in done:
            continue
        spec = dict(spec or {})
        cfg2 = variant_config(cfg, spec)
        stages = list(spec.get("stages") or method.stages(cfg2))
        init_state = None
        if spec.get("init_prefix"):  # e.g. a frozen backbone copied from the main model
            from trustlab.platform import checkpoints as ck

            init_state = {k: v for k, v in ck.unwrap(model).state_dict().items() if k.startswith(spec["init_prefix"])}
        print(f"[ablation] {name}: stages {stages}, overrides {spec.get('overrides')}", flush=True)
        m2 = fit(cfg2, stages, init_state, name)
        res = score(cfg2, m2, name)
        entry = {k: res[k] for k in KEEP if k in res}
        entry.update(what=str(spec.get("what", "")), overrides=dict(spec.get("overrides") or {}))
        out[name] = entry
    return out


def summary_lines(metrics: dict, names) -> list[str]:
    """One line per variant: its primary figure, the main model's, and the gap."""
    main = primary(metrics)
    lines = []
    for name in names:
        r = (metrics.get("ablation") or {}).get(name)
        p = primary(r) if isinstance(r, dict) else None
        if p is None:
            continue
        gap = "" if main is None or main[0] != p[0] or math.isnan(main[1]) else \
            f" (main {main[1]:.4f}, gap {main[1] - p[1]:+.4f})"
        lines.append(f"ablation {name}: {p[0]} {p[1]:.4f}{gap} — {r.get('what', '')}")
    return lines

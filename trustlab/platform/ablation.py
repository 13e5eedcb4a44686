"""Declared ablations, trained after the main model and reported beside it.

A method YAML declares its variants under ``ablation``::

    ablation:
      enabled: true
      variants:
        <variant>:
          what: <what this variant switches off>
          overrides: {<dotted key>: <value>, ...}   # the variant's config values
          stages: [<stage>, ...]                     # optional: retrain only these stages ...
          init_prefix: <prefix.> | [<prefix.>, ...]  # ... from the main model's parameters with this prefix (or any of these)
          kind: ablation                             # optional: ablation (default) | comparison
      primary:                                       # optional: the figure the variants are judged on
        metric: <dotted path into metrics.json>      # e.g. cross_domain.<target>.video.auc; * = mean over a level
        higher_is_better: true

Without ``primary`` a run is compared on the test split's first AUC (else FSCIL's last session).
A method declares it where its mechanism is claimed to move another figure (a target domain,
a lower-is-better deletion AUC); the gaps (main better by, per variant) land in
``metrics.json["ablation_gaps"]``.

An ablation switches part of the mechanism off; the main model must beat it. A ``comparison``
variant adds or swaps something instead (an optional loss the default leaves off): it is trained,
scored and its gap reported the same way, but ``min_gap`` (the margin the mechanism is judged by)
is taken over the ablations only, since a variant that keeps the whole mechanism and adds to it
may tie with the main model or beat it without saying anything about the mechanism.

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
KINDS = ("ablation", "comparison")


def enabled(cfg: dict) -> bool:
    """``method.ablation.enabled`` (default on): also the switch of ablations a method computes itself."""
    ab = cfg["method"].get("ablation")
    return isinstance(ab, dict) and bool(ab.get("enabled", True))


def variants(cfg: dict) -> dict:
    """The declared variants, or {} when ablations are off."""
    return dict(cfg["method"]["ablation"].get("variants") or {}) if enabled(cfg) else {}


def variant_config(cfg: dict, spec: dict) -> dict:
    from trustlab.platform.config import apply_dotted

    cfg2 = apply_dotted(cfg, dict(spec.get("overrides") or {}))
    cfg2["method"]["ablation"] = {"enabled": False, "variants": {}}  # a variant runs no ablations of its own
    return cfg2


def declared(cfg: dict) -> dict | None:
    """The method's ``ablation.primary`` as ``{"metric": path, "higher_is_better": bool}``, or None."""
    ab = cfg["method"].get("ablation")
    spec = ab.get("primary") if isinstance(ab, dict) else None
    if not spec:
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("metric"), str):
        raise ValueError(f"method.ablation.primary must be {{metric: <dotted path>, higher_is_better: bool}}, got {spec!r}")
    return {"metric": spec["metric"], "higher_is_better": bool(spec.get("higher_is_better", True))}


def lookup(metrics, path: str):
    """The number at a dotted path of a metrics dict, or None. A key may hold dots itself
    (``tar@far=0.01``): the longest key that matches the path's next parts wins. A ``*`` part is
    the mean over every entry at that level (None if one lacks the rest of the path)."""
    if path == "":
        return float(metrics) if isinstance(metrics, (int, float)) and not isinstance(metrics, bool) else None
    if not isinstance(metrics, dict):
        return None
    parts = path.split(".")
    if parts[0] == "*":  # the mean over every entry at this level (e.g. cross_domain.*.video.auc)
        vals = [lookup(v, ".".join(parts[1:])) for v in metrics.values()]
        return float(sum(vals) / len(vals)) if vals and all(v is not None for v in vals) else None
    for i in range(len(parts), 0, -1):
        key = ".".join(parts[:i])
        if key in metrics:
            v = lookup(metrics[key], ".".join(parts[i:]))
            if v is not None:
                return v
    return None


def primary(metrics: dict, spec: dict | None = None) -> tuple[str, float] | None:
    """``(name, value)`` of the figure a run is compared on: the declared ``spec`` (see
    ``declared``) when given, else, higher being better, the test split's AUC at its first level
    (detection), else FSCIL's last-session accuracy, else the first test figure. None when there
    is none."""
    if spec is not None:
        v = lookup(metrics, spec["metric"])
        return None if v is None else (spec["metric"], v)
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
        kind = kind_of(spec)  # a misspelt kind fails before anything trains
        cfg2 = variant_config(cfg, spec)
        stages = list(spec.get("stages") or method.stages(cfg2))
        init_state = inherited_state(model, spec)
        print(f"[ablation] {name}: stages {stages}, overrides {spec.get('overrides')}", flush=True)
        m2 = fit(cfg2, stages, init_state, name)
        res = score(cfg2, m2, name)
        entry = {k: res[k] for k in KEEP if k in res}
        entry.update(what=str(spec.get("what", "")), overrides=dict(spec.get("overrides") or {}), kind=kind)
        out[name] = entry
    return out


def inherited_state(model, spec: dict) -> dict | None:
    """The main model's parameters and buffers a variant starts from: those whose names start with
    ``spec["init_prefix"]`` (one prefix or a list), e.g. a frozen backbone and the head the earlier
    stages trained; None without ``init_prefix``. A prefix that matches nothing raises, since the
    variant would silently train from scratch."""
    prefix = (spec or {}).get("init_prefix")
    if not prefix:
        return None
    from trustlab.platform import checkpoints as ck

    prefixes = (prefix,) if isinstance(prefix, str) else tuple(str(p) for p in prefix)
    full = ck.unwrap(model).state_dict()
    missing = [p for p in prefixes if not any(k.startswith(p) for k in full)]
    if missing:
        raise ValueError(f"ablation init_prefix {missing} matches no parameter of the main model")
    return {k: v for k, v in full.items() if k.startswith(prefixes)}


def kind_of(spec: dict) -> str:
    """A variant's ``kind``: ``ablation`` (default) or ``comparison`` (see the module docstring)."""
    kind = str((spec or {}).get("kind", "ablation"))
    if kind not in KINDS:
        raise ValueError(f"ablation variant kind must be one of {KINDS}, got {kind!r}")
    return kind


def gaps(metrics: dict, spec: dict | None = None) -> dict | None:
    """``{"metric", "higher_is_better", "main", "variants": {name: value}, "gaps": {name: main
    better by}, "comparisons": [names], "min_gap", "min_over"}`` over the variants in ``metrics["ablation"]``;
    None without a main figure. A gap is positive when the main model is better, whichever way
    the metric points; ``min_gap`` is the smallest over the ablations (``comparisons`` excluded),
    ``min_over`` the variant it is over."""
    main = primary(metrics, spec)
    if main is None or math.isnan(main[1]):
        return None
    sign = 1.0 if spec is None or spec["higher_is_better"] else -1.0
    vals, out, comparisons = {}, {}, []
    for name, r in (metrics.get("ablation") or {}).items():
        p = primary(r, spec) if isinstance(r, dict) else None
        if p is None or p[0] != main[0] or math.isnan(p[1]):
            continue
        vals[name], out[name] = p[1], sign * (main[1] - p[1])
        if kind_of(r) == "comparison":
            comparisons.append(name)
    judged = {n: v for n, v in out.items() if n not in comparisons}
    worst = min(judged, key=judged.get) if judged else None
    return {"metric": main[0], "higher_is_better": sign > 0, "main": main[1], "variants": vals, "gaps": out,
            "comparisons": comparisons, "min_gap": judged.get(worst), "min_over": worst}


def summary_lines(metrics: dict, names, spec: dict | None = None) -> list[str]:
    """One line per variant: its primary figure, the main model's, and the gap (main better by)."""
    g = gaps(metrics, spec) or {"gaps": {}}
    lines = []
    for name in names:
        r = (metrics.get("ablation") or {}).get(name)
        p = primary(r, spec) if isinstance(r, dict) else None
        if p is None:
            continue
        gap = f" (main {g['main']:.4f}, main better by {g['gaps'][name]:+.4f})" if name in g["gaps"] else ""
        lines.append(f"{kind_of(r)} {name}: {p[0]} {p[1]:.4f}{gap} — {r.get('what', '')}")
    return lines

"""Shared output format for benchmarks (DESIGN.md): a table, then goal ratios one per line as
``ratio <name>: <value> (goal >= <target>)``, and the same figures in benchmarks/out/<name>.json."""
import json
import os

# $TRUSTLAB_BENCH_OUT moves the JSON files elsewhere (tests running a benchmark)
OUT = os.environ.get("TRUSTLAB_BENCH_OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def report(name: str, rows: list[dict], ratios: list[tuple[str, float, str, float]], extra: dict | None = None):
    if rows:
        cols = list(rows[0])
        w = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
        print("  ".join(c.ljust(w[c]) for c in cols))
        for r in rows:
            print("  ".join(_fmt(r.get(c)).ljust(w[c]) for c in cols))
    for rname, val, op, target in ratios:
        print(f"ratio {rname}: {val:.3f} (goal {op} {target})")
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump({"rows": rows, "ratios": [{"name": n, "value": v, "op": o, "goal": t} for n, v, o, t in ratios],
                   **(extra or {})}, f, indent=2)


def _fmt(v):
    return f"{v:.3f}" if isinstance(v, float) else str(v)

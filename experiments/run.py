"""trustlab entry point.

    python experiments/run.py method=f2c [mode=train|eval|tune|serve|export|inspect] [key=value ...]
    ray job submit --working-dir . -- python experiments/run.py method=f2c

Configs live in experiments/conf (groups: method/ data/ trainer/ tune/ serve/ tracking/). An unknown
method or a bad override prints one line with the valid choices and exits with code 2.
"""
from __future__ import annotations

import os
import sys

CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")


def expand_overrides_file(argv: list[str]) -> list[str]:
    """``overrides_file=PATH`` (e.g. a sweep's best_overrides.yaml) -> its override strings."""
    from trustlab.platform.config import ConfigError

    out = []
    for a in argv:
        if a.startswith("overrides_file="):
            import yaml

            path = a.split("=", 1)[1]
            try:
                with open(path) as f:
                    out.extend(str(o) for o in (yaml.safe_load(f) or {}).get("overrides", []))
            except OSError as e:
                raise ConfigError(f"cannot read overrides_file {path!r}: {e.strerror}") from None
        else:
            out.append(a)
    return out


def main(argv: list[str]) -> int:
    from trustlab.platform.config import ConfigError, compose

    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        cfg = compose(CONF_DIR, expand_overrides_file(argv))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mode = cfg["mode"]
    if mode == "train":
        from trustlab.platform.experiment import train

        train(cfg)
    elif mode == "eval":
        from trustlab.platform.experiment import evaluate

        evaluate(cfg)
    elif mode == "inspect":  # resolve the dataset and the weights, count, check files; no training
        from trustlab.platform.inspect import inspect

        inspect(cfg)
    elif mode == "tune":
        from trustlab.platform.tune import sweep

        sweep(cfg)
    elif mode == "export":  # a run's selected model as a self-contained folder with a model card
        from trustlab.platform.runs import ModelNotFound, export

        try:
            export(cfg)
        except ModelNotFound as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    elif mode == "serve":  # the detection graph: the run's checkpoint as one detector, or serve.detectors
        from trustlab.serve.app import serve_forever

        serve_forever(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

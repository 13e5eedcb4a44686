"""What the console shows while a run works: one line per epoch, progress bars for the rest.

- ``epoch_line``: the line rank 0 prints after each epoch (stage and method come from
  ``WorkerContext.log``): epoch, training loss, the validation metric that selects checkpoints,
  samples per second over all workers, the epoch's time and the stage's ETA.
- ``progress(iterable, desc, total)``: a progress bar for long work that is not epochs (dataset
  generation, face extraction, caching, evaluation, robustness sweeps). Shown on a terminal only
  (``TRUSTLAB_PROGRESS=1`` forces it, ``0`` hides it), after a second, and cleared when done, so
  logs of ``ray job submit`` and CI stay free of carriage returns.
- ``quiet_ray(verbose)``: Ray's own INFO lines in this process off unless ``run.verbose=true``, and
  each worker line printed once (Ray Train's workers get ``trainer``-side ``LoggingConfig`` from
  ``fit_stage``: their per-report metrics dictionaries only with ``run.verbose=true``).
"""
from __future__ import annotations

import logging
import math
import os
import sys


def _fmt_s(s: float) -> str:
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.0f}s" if s >= 10 else f"{s:.1f}s"
    m, sec = divmod(int(round(s)), 60)
    return f"{m}m{sec:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


def epoch_line(epoch: int, epochs: int, metrics: dict, seconds: float, world: int = 1,
               select_metric: str = "val_auc") -> str:
    """``epoch 2/6  loss 0.4123  val_auc 0.9312  1840 samples/s  12.3s/epoch  ETA 49s``."""
    parts = [f"epoch {epoch}/{epochs}"]
    loss = metrics.get("train_loss")
    if isinstance(loss, (int, float)):
        parts.append(f"loss {loss:.4f}")
    for k in (select_metric, "val_score", "val_loss"):  # the validation figure that selects the checkpoint
        v = metrics.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            parts.append(f"{k} {v:.4f}" if math.isfinite(v) else f"{k} nan")
            break
    sps = metrics.get("samples_per_second")
    if isinstance(sps, (int, float)) and sps > 0:
        parts.append(f"{sps * max(1, int(world)):.0f} samples/s")
    parts.append(f"{_fmt_s(seconds)}/epoch")
    left = max(0, int(epochs) - int(epoch))
    parts.append(f"ETA {_fmt_s(left * seconds)}" if left else "stage done")
    return "  ".join(parts)


def enabled() -> bool:
    flag = os.environ.get("TRUSTLAB_PROGRESS")
    if flag is not None:
        return flag not in ("0", "false", "no", "")
    return sys.stderr.isatty()


def progress(iterable, desc: str, total: int | None = None, unit: str = "it"):
    """``iterable`` with a progress bar on a terminal (see the module docstring); else itself."""
    if not enabled():
        return iterable
    from tqdm.auto import tqdm

    if total is None:
        try:
            total = len(iterable)
        except TypeError:
            total = None
    return tqdm(iterable, desc=f"[trustlab] {desc}", total=total, unit=unit, leave=False, delay=1.0,
                dynamic_ncols=True, file=sys.stderr)


#: Loggers whose INFO lines the console does without unless run.verbose=true
RAY_LOGGERS = ("ray.train", "ray.tune", "ray.serve", "ray.data", "ray.air")


def quiet_ray(verbose: bool) -> None:
    """Ray's per-report INFO lines off (``verbose=False``) or on. Ray's workers inherit the
    environment variables set here when this process starts the cluster."""
    level = logging.INFO if verbose else logging.WARNING
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    # Ray Train routes a worker's print() through its logger as well as to stdout, so every line
    # reached the console twice; Train hands this variable from the driver to its controller and workers
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


def quiet_train_worker(verbose: bool) -> None:
    """In a Ray Train worker: its per-report line (``Reporting training result N: TrainingReport(...)``,
    one per rank per epoch) off unless ``run.verbose=true``. Ray logs it through a logger named
    after its source file, which ``LoggingConfig`` does not reach."""
    if verbose:
        return
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)

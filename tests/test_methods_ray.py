"""Every registered method trains through Ray Train (2 workers) with its ci_overrides, writes its
run folder, and its best checkpoint reloads to the same metrics (mode=eval)."""
import glob
import json
import math
import os
import tempfile

import pytest

from conftest import ci_overrides, compose
from trustlab.platform import ablation
from trustlab.platform.registry import list_methods


def _close(a, b):
    if isinstance(a, dict):
        return all(_close(a[k], b.get(k)) for k in a if k in b)
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-5
    return True


@pytest.mark.parametrize("name", list_methods())
def test_train_two_workers_and_reload(name, ray_head, tmp_path):
    from trustlab.platform.experiment import evaluate, train

    ov = [f"method={name}", *ci_overrides(name), "trainer.num_workers=2", "trainer.cpus_per_worker=0.5",
          f"run.name={name}-ci"]
    cfg = compose(ov, tmp_path)
    staged = lambda: set(glob.glob(os.path.join(tempfile.gettempdir(), "trustlab-ckpt-*")))  # noqa: E731
    before = staged()
    metrics = train(cfg)
    # every report stages its checkpoint in a temp folder; Ray has persisted it once report returns,
    # so none may be left behind (they were: ~60 GB of /tmp in a day of runs)
    assert not staged() - before, sorted(staged() - before)[:3]
    run_dir = os.path.join(tmp_path, f"{name}-ci")
    for f in ("config.yaml", "metrics.json", "summary.txt", "checkpoints/best.pt"):
        assert os.path.exists(os.path.join(run_dir, f)), f
    on_disk = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert on_disk.keys() == metrics.keys()
    assert "test" in metrics or "sessions" in metrics, sorted(metrics)
    spec = ablation.declared(cfg)  # the figure a method's ablations are judged on exists in its metrics
    assert spec is None or ablation.lookup(metrics, spec["metric"]) is not None, (spec, sorted(metrics))
    again = evaluate(compose(ov + ["mode=eval"], tmp_path))
    for key in ("test", "val", "sessions", "last"):
        if key in metrics and key in again:
            assert _close(metrics[key], again[key]), (key, metrics[key], again[key])

"""ASHA against FIFO on F2C's default data: the same number of trials drawn by the same seeded
search, run once with ASHA early stopping and once without. Reports the trial-epochs each used
and the best validation AUC each found (goal: ASHA <= 0.5x the epochs, best AUC within 0.01).

    .venv/bin/python benchmarks/tune_asha.py [--trials 16] [--epochs 6] [--search random]

With 8 trials ASHA used 0.625x the epochs (ASHA always promotes the first trial to reach a
rung, so a few trials are too few for it to pay off); 16 is the default.
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import report  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--search", default="random", help="random draws the same configs for both schedulers")
    ap.add_argument("--n-train", type=int, default=768)
    a = ap.parse_args()

    import ray

    from trustlab.platform.config import compose
    from trustlab.platform.tune import sweep

    root = tempfile.mkdtemp(prefix="bench-tune-")
    # the dashboard serves the State API: without it Ray Train's PlacementGroupCleaner cannot see
    # that the controller of a trial ASHA stopped is gone, its workers' CPUs stay reserved and
    # the next trials wait for ever (seen here with include_dashboard=False)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=True, log_to_driver=False)
    rows, out = [], {}
    for sched in ("asha", "fifo"):
        cfg = compose(os.path.join(REPO, "experiments", "conf"), [
            "method=f2c", "mode=tune", f"run.root={root}", f"run.name={sched}", f"tune.scheduler={sched}",
            f"tune.search={a.search}", f"tune.num_samples={a.trials}", f"trainer.epochs={a.epochs}",
            "trainer.num_workers=1", f"method.data.n_train={a.n_train}", "method.data.n_val=256",
            "method.data.n_test=64", "method.data.size=32", "trainer.log_every=0", "seed=0"])
        # the method's declared space plus the learning rate over a wide range, so trials differ
        cfg["method"]["tune"]["space"]["trainer.lr"] = {"type": "loguniform", "low": 1e-5, "high": 1e-2}
        s = sweep(cfg)
        out[sched] = s
        rows.append({"scheduler": sched, "trials": s["trials"], "stopped_early": s["stopped_early"],
                     "trial_epochs": s["trial_epochs"], "best_val_auc": float(s["best_metric"])})
    ray.shutdown()
    report("tune_asha", rows, [
        ("tune_asha_epochs", out["asha"]["trial_epochs"] / out["fifo"]["trial_epochs"], "<=", 0.5),
        ("tune_asha_auc_gap", float(out["fifo"]["best_metric"]) - float(out["asha"]["best_metric"]), "<=", 0.01),
    ])


if __name__ == "__main__":
    main()

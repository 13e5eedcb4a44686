"""Ray Train overhead: step throughput of the platform's Ray Train loop (1 worker) against a bare
PyTorch loop on the same model (F2C's default network), batch, data and thread count, measured
side by side in one run (bare before and after Ray, averaged, to damp machine noise).

Both sides give their steady state: the best epoch after the first. The Ray side reads every
epoch from the run's ``history.jsonl`` (the result's dataframe holds only the kept checkpoints),
and its first epoch shares the cores with the Train controller's and helper actors' start-up.

    .venv/bin/python benchmarks/train_overhead.py [--epochs 4] [--batch 64] [--threads 2]
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import report  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bare_loop(method, cfg, data, epochs, threads):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = method.build_model(cfg, "train")
    opt = method.configure_optimizer(model, cfg, "train")
    model.train()
    tr, bs = data["train"], int(cfg["trainer"]["batch_size"])
    n = len(tr["y"])
    best = 0.0
    for epoch in range(epochs):
        perm = np.random.default_rng(epoch).permutation(n)
        t0, steps = time.time(), 0
        for s in range(0, n, bs):
            b = method.to_batch({k: v[perm[s:s + bs]] for k, v in tr.items()})
            out = method.loss_step(model, b, "train", cfg)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            steps += 1
        sps = steps * bs / (time.time() - t0)
        if epoch > 0 or epochs == 1:  # first epoch warms up allocators
            best = max(best, sps)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count()))
    ap.add_argument("--n-train", type=int, default=1280)
    a = ap.parse_args()

    import ray

    from trustlab.platform.config import compose
    from trustlab.platform.registry import get_method
    from trustlab.platform.tracking import history_callbacks, read_history
    from trustlab.platform.train import fit_stage

    root = tempfile.mkdtemp(prefix="bench-train-")
    cfg = compose(os.path.join(REPO, "experiments", "conf"), [
        "method=f2c", f"trainer.batch_size={a.batch}", f"trainer.epochs={a.epochs}", "trainer.num_workers=1",
        f"trainer.cpus_per_worker={a.threads}", f"method.data.n_train={a.n_train}", "method.data.n_val=64",
        "method.data.n_test=64", f"run.root={root}", "run.name=bench", "trainer.log_every=0"])
    method = get_method("f2c")
    data = method.build_data(cfg)
    bare1 = bare_loop(method, cfg, data, a.epochs, a.threads)
    ray.init(num_cpus=a.threads, include_dashboard=False, log_to_driver=False)
    run_dir = os.path.join(root, "bench")
    os.makedirs(run_dir, exist_ok=True)
    fit_stage(cfg, "train", data, "bench", root, callbacks=history_callbacks(cfg, run_dir))
    sps = [float(r["samples_per_second"]) for r in read_history(run_dir)]
    ray_sps = max(sps[1:] or sps)
    ray.shutdown()
    bare2 = bare_loop(method, cfg, data, a.epochs, a.threads)
    bare = (bare1 + bare2) / 2
    rows = [{"loop": "bare PyTorch (before)", "samples/s": bare1}, {"loop": "bare PyTorch (after)", "samples/s": bare2},
            {"loop": "Ray Train, 1 worker", "samples/s": ray_sps}]
    report("train_overhead", rows, [("train_overhead", ray_sps / bare, ">=", 0.9)],
           {"batch": a.batch, "threads": a.threads, "model": cfg["method"]["backbone"], "image": cfg["method"]["data"]["size"],
            "ray epochs (samples/s)": [round(v, 1) for v in sps]})


if __name__ == "__main__":
    main()

"""Ray runtime: join the cluster we run in, or start an embedded local one sized to the machine."""
from __future__ import annotations

import os

import ray


def init_ray(cfg: dict | None = None) -> dict:
    """``ray.init`` once. Under ``ray job submit`` (or with ``RAY_ADDRESS``/``ray.address`` set)
    this joins that cluster; otherwise it starts a local Ray with this machine's CPUs and GPUs."""
    rcfg = (cfg or {}).get("ray", {}) or {}
    from trustlab.platform.progress import quiet_ray

    quiet_ray(bool(((cfg or {}).get("run") or {}).get("verbose")))
    # Ray Train gives a worker group 60 s to start, then retries with a new placement group while
    # the old one is still being released; on a loaded machine (importing torch in several
    # workers at once) that retry loop can hold every CPU. Allow a slow start instead.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    if not ray.is_initialized():
        address = rcfg.get("address") or os.environ.get("RAY_ADDRESS")
        kw = dict(log_to_driver=True, ignore_reinit_error=True)
        if address:
            ray.init(address=address, **kw)
        else:
            num_cpus = rcfg.get("num_cpus") or os.cpu_count()
            ray.init(num_cpus=int(num_cpus), include_dashboard=bool(rcfg.get("dashboard", False)), **kw)
    return ray.cluster_resources()


def use_gpu(cfg: dict) -> bool:
    """``trainer.use_gpu``: true/false, or "auto" = use GPUs when the cluster has any."""
    flag = cfg["trainer"].get("use_gpu", "auto")
    if isinstance(flag, bool):
        return flag
    return ray.cluster_resources().get("GPU", 0) > 0

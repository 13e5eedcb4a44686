"""Ray Train (v2) launcher and the generic per-worker loop.

Each stage of a method is one ``TorchTrainer`` run named ``<run>-<stage>``. The per-worker loop:
shard -> ``method.loss_step`` -> optimizer -> one ``ray.train.report(metrics, checkpoint)`` per
epoch (ASHA rungs are epochs). Gradients are averaged across workers with one flat all-reduce
after ``backward`` rather than through DDP's forward hook, so a method's ``loss_step`` may call
any sub-module of its model. Checkpoints are ranked by ``val_score`` (the validation metric, never
the test split); rerunning with the same run name and storage resumes from the latest checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import torch

from trustlab.platform import checkpoints as ck
from trustlab.platform import storage
from trustlab.platform.evaluate import iter_array_batches, score_batches, to_device
from trustlab.platform.metrics import detection_metrics
from trustlab.platform.registry import get_method


# ----------------------------------------------------------------------------- worker side
def _allreduce_grads(params, world: int) -> None:
    if world <= 1:
        return
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat.div_(world)
    for g, r in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(r)


def _gather(obj, world: int) -> list:
    if world <= 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _train_batches(split, rank, world, bs, seed, epoch, ds_shard=None):
    """This rank's batches for one epoch: a seeded permutation cut into equal rank shards
    (every rank gets the same number of steps, so collective calls stay matched)."""
    if ds_shard is not None:
        yield from ds_shard.iter_batches(batch_size=bs, batch_format="numpy", local_shuffle_buffer_size=4 * bs)
        return
    n = len(split["y"])
    perm = np.random.default_rng(seed + 1000 * epoch).permutation(n)
    per = n // world
    mine = perm[rank * per : (rank + 1) * per]
    yield from iter_array_batches(split, bs, mine)


def _val_batches(split, rank, world, bs, ds_shard=None):
    if ds_shard is not None:
        yield from ds_shard.iter_batches(batch_size=bs, batch_format="numpy")
        return
    n = len(split["y"])
    yield from iter_array_batches(split, bs, np.arange(rank, n, world))


def detection_validation(method, model, cfg, batches, world, device) -> dict:
    """Detection metrics (``val_auc``, ``val_ap``, ``val_eer``, ``val_acc``, ``val_video_auc``) of
    the scores of every rank's share, and ``val_score`` = ``trainer.select_metric`` (accuracy when
    that is undefined). Also for a method's own ``validate`` hook that prepares the model first."""
    y, s, v = score_batches(method, model, batches, cfg, device)
    parts = _gather((y, s, v), world)
    y, s, v = (np.concatenate([p[i] for p in parts]) for i in range(3))
    m = detection_metrics(y, s, v, float(cfg["trainer"].get("threshold", 0.5)))
    out = {f"val_{k}": m["frame"][k] for k in ("auc", "ap", "eer", "acc")}
    out["val_video_auc"] = m["video"]["auc"]
    key = cfg["trainer"].get("select_metric", "val_auc")
    out["val_score"] = out[key] if not math.isnan(out[key]) else out["val_acc"]
    return out


def validate(method, model, stage, cfg, batches, rank, world, device) -> dict:
    """Validation metrics on this rank's share, gathered to every rank. Selecting stages report
    detection metrics and ``val_score`` = the configured metric; other stages (self-supervised)
    report ``val_loss`` and ``val_score = -val_loss``."""
    if hasattr(method, "validate"):
        return method.validate(model, stage, cfg, batches, rank, world, device, _gather)
    if method.stage_selects(cfg, stage):
        return detection_validation(method, model, cfg, batches, world, device)
    model.eval()
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for b in batches:
            t = to_device(method.to_batch(b), device)
            o = method.loss_step(model, t, stage, cfg)
            k = len(b["y"])
            tot += float(o["loss"]) * k
            cnt += k
    parts = _gather((tot, cnt), world)
    loss = sum(p[0] for p in parts) / max(1, sum(p[1] for p in parts))
    return {"val_loss": loss, "val_score": -loss}


def worker_loop(config: dict) -> None:
    """The generic Ray Train loop run by every worker."""
    import ray.train
    import ray.train.torch

    cfg, stage = config["cfg"], config["stage"]
    t = cfg["trainer"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(math.ceil(float(t["cpus_per_worker"])))))
    method = get_method(cfg["method"]["name"])
    torch.manual_seed(int(cfg["seed"]))
    np.random.seed(int(cfg["seed"]) + rank)

    model = method.build_model(cfg, stage)
    if config.get("init_from"):
        state = ck.load_state(config["init_from"], cfg["run"].get("s3_endpoint"))
        model.load_state_dict(state["model"], strict=False)
    model = ray.train.torch.prepare_model(model, parallel_strategy=None)
    device = ray.train.torch.get_device()
    opt = method.configure_optimizer(model, cfg, stage)
    params = [p for p in model.parameters() if p.requires_grad]

    start_epoch = 0
    restored = ray.train.get_checkpoint()
    if restored is not None:
        state = ck.load_ray_checkpoint(restored)
        model.load_state_dict(state["model"])
        if state.get("optimizer") is not None:
            opt.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
        if rank == 0:
            print(f"[{method.name}:{stage}] resumed from checkpoint at epoch {start_epoch}", flush=True)

    data = ray.get(config["data_ref"]) if config.get("data_ref") is not None else {}
    shards = {s: ray.train.get_dataset_shard(s) for s in config.get("ray_datasets", [])}
    bs = int(t["batch_size"])
    epochs = int(config["epochs"])
    log_every = int(t.get("log_every", 20))
    for epoch in range(start_epoch, epochs):
        model.train()
        t0 = time.time()
        sums: dict[str, float] = {}
        steps = 0
        for b in _train_batches(data.get("train"), rank, world, bs, int(cfg["seed"]), epoch, shards.get("train")):
            batch = to_device(method.to_batch(b), device)
            out = method.loss_step(model, batch, stage, cfg)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            _allreduce_grads(params, world)
            if t.get("grad_clip"):
                torch.nn.utils.clip_grad_norm_(params, float(t["grad_clip"]))
            opt.step()
            steps += 1
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
            if rank == 0 and log_every and steps % log_every == 0:
                print(f"[{method.name}:{stage}] epoch {epoch + 1}/{epochs} step {steps} loss {sums['loss'] / steps:.4f}", flush=True)
        train_time = time.time() - t0
        metrics = {f"train_{k}": v / max(1, steps) for k, v in sums.items()}
        metrics.update(validate(method, model, stage, cfg,
                                _val_batches(data.get("val"), rank, world, int(t["eval_batch_size"]), shards.get("val")),
                                rank, world, device))
        metrics.update(epoch=epoch + 1, stage=stage, steps=steps, train_seconds=train_time, resumed_from_epoch=start_epoch,
                       samples_per_second=steps * bs / max(train_time, 1e-9))
        ckpt = None
        if rank == 0:
            d = ck.temp_dir()
            ck.save_state(d, model=ck.unwrap(model).state_dict(), optimizer=opt.state_dict(),
                          epoch=epoch + 1, stage=stage, metrics=metrics, cfg=cfg)
            ckpt = ray.train.Checkpoint.from_directory(d)
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith(("train_loss", "val_")) and isinstance(v, float))
            print(f"[{method.name}:{stage}] epoch {epoch + 1}/{epochs} done in {train_time:.1f}s: {shown}", flush=True)
        ray.train.report(metrics, checkpoint=ckpt)


# ----------------------------------------------------------------------------- driver side
def storage_for(cfg: dict, run_dir: str):
    """(storage_path, filesystem) for Ray Train/Tune: ``run.storage`` or ``<run_dir>/ray``."""
    uri = cfg["run"].get("storage") or os.path.join(run_dir, "ray")
    if storage.is_s3(uri):
        fs, path = storage.resolve(uri, cfg["run"].get("s3_endpoint"))
        return path, fs
    return os.path.abspath(uri), None


def scaling_config(cfg: dict, use_gpu: bool):
    from ray.train import ScalingConfig

    t = cfg["trainer"]
    res = {"CPU": float(t["cpus_per_worker"])}
    if use_gpu:
        res["GPU"] = float(t.get("gpus_per_worker", 1))
    return ScalingConfig(num_workers=int(t["num_workers"]), use_gpu=use_gpu, resources_per_worker=res)


def split_data(data: dict):
    """Separate in-memory array splits (sent through the object store) from Ray Datasets."""
    arrays = {k: v for k, v in data.items() if isinstance(v, dict)}
    datasets = {k: v for k, v in data.items() if not isinstance(v, dict)}
    return arrays, datasets


def fit_stage(cfg: dict, stage: str, data: dict, run_name: str, run_dir: str,
              init_from: str | None = None, callbacks=None):
    """One ``TorchTrainer.fit`` for one stage; returns ``(result, best_checkpoint)``."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from trustlab.platform.runtime import use_gpu

    method = get_method(cfg["method"]["name"])
    t = cfg["trainer"]
    arrays, datasets = split_data(method.stage_data(cfg, stage, data))
    data_ref = ray.put(arrays) if arrays else None
    storage_path, fs = storage_for(cfg, run_dir)
    fn = getattr(method, "worker_loop_for", lambda s: None)(stage) or worker_loop
    trainer = TorchTrainer(
        fn,
        train_loop_config={"cfg": cfg, "stage": stage, "epochs": method.stage_epochs(cfg, stage),
                           "init_from": init_from, "data_ref": data_ref,
                           "ray_datasets": sorted(datasets)},
        scaling_config=scaling_config(cfg, use_gpu(cfg)),
        datasets=datasets or None,
        run_config=RunConfig(
            name=f"{run_name}-{stage}",
            storage_path=storage_path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(
                num_to_keep=t.get("keep_checkpoints"),
                checkpoint_score_attribute="val_score",
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=int(t.get("max_failures", 0))),
            callbacks=callbacks,
        ),
    )
    result = trainer.fit()
    return result, best_checkpoint(result, method.stage_selects(cfg, stage))


def best_checkpoint(result, select: bool = True):
    """The checkpoint with the best ``val_score`` (or the latest, for non-selecting stages)."""
    if not select or not result.best_checkpoints:
        return result.checkpoint
    return max(result.best_checkpoints, key=lambda cm: cm[1].get("val_score", -math.inf))[0]


def checkpoint_uri(ckpt, cfg: dict) -> str:
    """A URI ``checkpoints.load_state`` reads (``s3://`` for remote storage)."""
    path = ckpt.path
    if cfg["run"].get("storage") and storage.is_s3(cfg["run"]["storage"]):
        return "s3://" + path.lstrip("/")
    return path


def load_model(cfg: dict, state: dict, stage: str | None = None):
    method = get_method(cfg["method"]["name"])
    model = method.build_model(cfg, stage or state.get("stage") or method.stages(cfg)[-1])
    model.load_state_dict(state["model"])
    model.eval()
    return method, model


def write_json(path: str, obj) -> None:
    def default(o):
        if isinstance(o, (np.floating, np.integer)):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)

    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=default, allow_nan=True)

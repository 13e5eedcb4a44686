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
from trustlab.platform.method import Step
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


class WorkerContext:
    """Everything a per-worker loop needs, the generic one or a method's own: threads and seeds,
    the model with its starting weights, restore from ``ray.train.get_checkpoint()``, this
    worker's batches, gather and gradient all-reduce across workers, the ``Step`` a hook sees,
    and one checkpoint + ``ray.train.report`` per epoch (rank 0 writes the checkpoint).

    ``WorkerContext.from_ray(config)`` inside a Ray Train worker; ``WorkerContext.local(...)``
    runs the same loops in one process without Ray (tests, benchmarks), where ``report`` keeps
    the metrics in ``history``."""

    def __init__(self, cfg: dict, stage: str, epochs: int, *, rank: int = 0, world: int = 1, device="cpu",
                 data: dict | None = None, shards: dict | None = None, init_from=None, ray_session: bool = False,
                 threads: bool = True, validate: bool = True, verbose: bool = True):
        self.cfg, self.stage, self.epochs = cfg, stage, int(epochs)
        self.rank, self.world, self.device = rank, world, device
        self.method = get_method(cfg["method"]["name"])
        self.data = data or {}
        self.shards = shards or {}
        self.init_from = init_from  # a checkpoint URI or a state dict: the previous stage's model
        self.ray_session = ray_session
        self.seed = int(cfg["seed"])
        self.done = 0  # optimizer steps of this stage taken so far (restored with the checkpoint)
        self.history: list[dict] = []
        self.best_state, self.best_score = None, -math.inf  # local runs: the best-validated model state
        self.validate = validate  # run the per-epoch validation (a local run may skip it)
        self.verbose = verbose
        if threads:  # one worker's share of the cores; more threads than that slow a shared machine
            torch.set_num_threads(max(1, int(math.ceil(float(cfg["trainer"]["cpus_per_worker"])))))
        torch.manual_seed(self.seed)
        np.random.seed(self.seed + rank)

    @classmethod
    def from_ray(cls, config: dict) -> "WorkerContext":
        import ray
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        data = ray.get(config["data_ref"]) if config.get("data_ref") is not None else {}
        shards = {s: ray.train.get_dataset_shard(s) for s in config.get("ray_datasets", [])}
        return cls(config["cfg"], config["stage"], config["epochs"], rank=ctx.get_world_rank(),
                   world=ctx.get_world_size(), device=ray.train.torch.get_device(), data=data, shards=shards,
                   init_from=config.get("init_from"), ray_session=True)

    @classmethod
    def local(cls, cfg: dict, stage: str, data: dict, epochs: int | None = None, init_from=None,
              validate: bool = False) -> "WorkerContext":
        """One process, no Ray. With ``validate`` each epoch is validated and ``best_state`` keeps
        the model state a Ray stage's checkpoint ranking would select (best ``val_score``)."""
        method = get_method(cfg["method"]["name"])
        n = method.stage_epochs(cfg, stage) if epochs is None else epochs
        return cls(cfg, stage, n, data=data, init_from=init_from, threads=False, validate=validate, verbose=False)

    # ---- model and restore
    def build_model(self, to_device: bool = True) -> torch.nn.Module:
        """The stage's model, initialised from the previous stage's checkpoint when there is one
        (non-strict: a stage may add or drop parts)."""
        model = self.method.build_model(self.cfg, self.stage)
        init = self.init_from
        if isinstance(init, str) and init:
            init = ck.load_state(init, self.cfg["run"].get("s3_endpoint"))["model"]
        if init is not None:
            model.load_state_dict(init, strict=False)
        return model.to(self.device) if to_device else model

    def restore(self, model, optimizer=None) -> int:
        """Load the last checkpoint of this run (a resumed run) into ``model`` and ``optimizer``
        (one optimizer, or a dict of them saved under the same keys); returns the epoch to start from."""
        if not self.ray_session:
            return 0
        import ray.train

        restored = ray.train.get_checkpoint()
        if restored is None:
            return 0
        state = ck.load_ray_checkpoint(restored)
        ck.unwrap(model).load_state_dict(state["model"])
        saved = state.get("optimizer")
        if isinstance(optimizer, dict) and saved:
            for k, o in optimizer.items():
                o.load_state_dict(saved[k])
        elif optimizer is not None and saved is not None:
            optimizer.load_state_dict(saved)
        self.done = int(state.get("step") or 0)
        start = int(state["epoch"])
        self.log(f"resumed from checkpoint at epoch {start}")
        return start

    # ---- data
    def train_batches(self, epoch: int, split: str = "train", batch_size: int | None = None):
        """This rank's batches for one epoch: a seeded permutation cut into equal rank shards
        (every rank gets the same number of steps, so collective calls stay matched)."""
        bs = int(batch_size or self.cfg["trainer"]["batch_size"])
        if split in self.shards:
            yield from self.shards[split].iter_batches(batch_size=bs, batch_format="numpy",
                                                       local_shuffle_buffer_size=4 * bs)
            return
        arrays = self.data[split]
        n = len(arrays["y"])
        perm = np.random.default_rng(self.seed + 1000 * epoch).permutation(n)
        per = n // self.world
        yield from iter_array_batches(arrays, bs, perm[self.rank * per : (self.rank + 1) * per])

    def val_batches(self, split: str = "val", batch_size: int | None = None):
        bs = int(batch_size or self.cfg["trainer"]["eval_batch_size"])
        if split in self.shards:
            yield from self.shards[split].iter_batches(batch_size=bs, batch_format="numpy")
            return
        arrays = self.data.get(split)
        if arrays is None:
            return
        yield from iter_array_batches(arrays, bs, np.arange(self.rank, len(arrays["y"]), self.world))

    def steps_per_epoch(self, split: str = "train") -> int | None:
        """This worker's optimizer steps per epoch on an in-memory split (None when streamed)."""
        if split in self.shards or split not in self.data:
            return None
        return -(-(len(self.data[split]["y"]) // self.world) // int(self.cfg["trainer"]["batch_size"]))

    def shard(self, split: str) -> dict:
        """This rank's rows of an in-memory split (every ``world``-th, from ``rank``)."""
        return {k: v[self.rank :: self.world] for k, v in self.data[split].items()}

    # ---- collectives
    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world <= 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def allreduce_grads(self, params) -> None:
        """Average the gradients of ``params`` over workers (one flat all-reduce after backward,
        so a method's ``loss_step`` may call any sub-module of its model)."""
        _allreduce_grads(list(params), self.world)

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Make every rank's ``module`` equal to rank 0's."""
        state = self.gather({k: v.detach().cpu() for k, v in module.state_dict().items()} if self.rank == 0 else None)[0]
        if self.rank != 0:
            module.load_state_dict(state)

    # ---- steps, reports, logs
    def step(self, epoch: int) -> Step:
        return Step(done=self.done, epoch=epoch, rank=self.rank, world=self.world, seed=self.seed)

    def log(self, msg: str) -> None:
        if self.rank == 0 and self.verbose:
            print(f"[{self.method.name}:{self.stage}] {msg}", flush=True)

    def report(self, metrics: dict, model=None, optimizer=None, epoch: int | None = None) -> None:
        """One report: rank 0 saves ``model`` (+ optimizer state(s), epoch, step) as the checkpoint."""
        epoch = int(metrics.get("epoch", 0) if epoch is None else epoch)
        metrics = {**metrics, "epoch": epoch, "stage": self.stage}
        self.history.append(metrics)
        if not self.ray_session:
            if model is not None and metrics.get("val_score", -math.inf) > self.best_score:
                self.best_score = metrics["val_score"]
                self.best_state = {k: v.detach().clone() for k, v in ck.unwrap(model).state_dict().items()}
            return
        import ray.train

        ckpt = None
        if self.rank == 0 and model is not None:
            if isinstance(optimizer, dict):
                opt_state = {k: o.state_dict() for k, o in optimizer.items()}
            else:
                opt_state = optimizer.state_dict() if optimizer is not None else None
            d = ck.temp_dir()
            ck.save_state(d, model=ck.unwrap(model).state_dict(), optimizer=opt_state, epoch=epoch,
                          step=self.done, stage=self.stage, metrics=metrics, cfg=self.cfg)
            ckpt = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=ckpt)


def detection_validation(method, model, cfg, batches, ctx: WorkerContext) -> dict:
    """Detection metrics (``val_auc``, ``val_ap``, ``val_eer``, ``val_acc``, ``val_video_auc``) of
    the scores of every rank's share, and ``val_score`` = ``trainer.select_metric`` (accuracy when
    that is undefined). Also for a method's own ``validate`` hook that prepares the model first."""
    y, s, v = score_batches(method, model, batches, cfg, ctx.device)
    parts = ctx.gather((y, s, v))
    y, s, v = (np.concatenate([p[i] for p in parts]) for i in range(3))
    m = detection_metrics(y, s, v, float(cfg["trainer"].get("threshold", 0.5)))
    out = {f"val_{k}": m["frame"][k] for k in ("auc", "ap", "eer", "acc")}
    out["val_video_auc"] = m["video"]["auc"]
    key = cfg["trainer"].get("select_metric", "val_auc")
    out["val_score"] = out[key] if not math.isnan(out[key]) else out["val_acc"]
    return out


def validate(method, model, stage, cfg, batches, ctx: WorkerContext) -> dict:
    """Validation metrics on this rank's share, gathered to every rank. Selecting stages report
    detection metrics and ``val_score`` = the configured metric; other stages (self-supervised)
    report ``val_loss`` and ``val_score = -val_loss``."""
    if method.has("validate"):
        return method.validate(model, stage, cfg, batches, ctx)
    if method.stage_selects(cfg, stage):
        return detection_validation(method, model, cfg, batches, ctx)
    model.eval()
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for b in batches:
            t = to_device(method.to_batch(b), ctx.device)
            o = method.loss_step(model, t, stage, cfg, ctx.step(-1))
            k = len(b["y"])
            tot += float(o["loss"]) * k
            cnt += k
    parts = ctx.gather((tot, cnt))
    loss = sum(p[0] for p in parts) / max(1, sum(p[1] for p in parts))
    return {"val_loss": loss, "val_score": -loss}


def run_epochs(ctx: WorkerContext) -> torch.nn.Module:
    """The generic loop: shard -> ``method.loss_step`` -> optimizer -> validation -> one report
    (and checkpoint) per epoch. Returns the trained model."""
    method, cfg, stage = ctx.method, ctx.cfg, ctx.stage
    t = cfg["trainer"]
    model = ctx.build_model(to_device=False)
    if ctx.ray_session:
        import ray.train.torch

        model = ray.train.torch.prepare_model(model, parallel_strategy=None)
    else:
        model = model.to(ctx.device)
    opt = method.configure_optimizer(model, cfg, stage, steps_per_epoch=ctx.steps_per_epoch())
    params = [p for p in model.parameters() if p.requires_grad]
    start_epoch = ctx.restore(model, opt)
    bs = int(t["batch_size"])
    log_every = int(t.get("log_every", 20))
    for epoch in range(start_epoch, ctx.epochs):
        model.train()
        t0 = time.time()
        sums: dict[str, float] = {}
        steps = 0
        for b in ctx.train_batches(epoch):
            batch = to_device(method.to_batch(b), ctx.device)
            out = method.loss_step(model, batch, stage, cfg, ctx.step(epoch))
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            ctx.allreduce_grads(params)
            if t.get("grad_clip"):
                torch.nn.utils.clip_grad_norm_(params, float(t["grad_clip"]))
            opt.step()
            ctx.done += 1
            steps += 1
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
            if log_every and steps % log_every == 0:
                ctx.log(f"epoch {epoch + 1}/{ctx.epochs} step {steps} loss {sums['loss'] / steps:.4f}")
        train_time = time.time() - t0
        metrics = {f"train_{k}": v / max(1, steps) for k, v in sums.items()}
        if ctx.validate:
            metrics.update(validate(method, model, stage, cfg, ctx.val_batches(), ctx))
        metrics.update(steps=steps, train_seconds=train_time, resumed_from_epoch=start_epoch,
                       samples_per_second=steps * bs / max(train_time, 1e-9))
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith(("train_loss", "val_")) and isinstance(v, float))
        ctx.log(f"epoch {epoch + 1}/{ctx.epochs} done in {train_time:.1f}s: {shown}")
        ctx.report(metrics, model, opt, epoch=epoch + 1)
    return model


def worker_loop(config: dict) -> None:
    """The generic Ray Train loop run by every worker."""
    run_epochs(WorkerContext.from_ray(config))


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
    fn = (method.worker_loop_for(stage) if method.has("worker_loop_for") else None) or worker_loop
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

"""Ray Train (v2) launcher and the generic per-worker loop.

Each stage of a method is one ``TorchTrainer`` run named ``<run>-<stage>``. The per-worker loop:
shard -> ``method.loss_step`` -> optimizer -> one ``ray.train.report(metrics, checkpoint)`` per
epoch (ASHA rungs are epochs). Every loop, the generic one and a method's own, gets the GPU
machinery through its ``WorkerContext``: mixed precision (``trainer.precision``: autocast, a
gradient scaler for fp16), gradient averaging that overlaps the backward pass (``GradSync``:
bucketed asynchronous all-reduce hooks, not a DDP wrapper, so a method's ``loss_step`` may call
any sub-module of its model), ``torch.compile`` (``trainer.compile``), channels-last CNNs, and
batches prepared ahead in a background thread, pinned and copied without blocking. Checkpoints
are ranked by ``val_score`` (the validation metric, never the test split); rerunning with the
same run name and storage resumes from the latest checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import threading
import time

import numpy as np
import torch

from trustlab.platform import checkpoints as ck
from trustlab.platform import storage
from trustlab.platform.evaluate import iter_array_batches, score_batches, to_device
from trustlab.platform.metrics import detection_metrics
from trustlab.platform.method import Step
from trustlab.platform.progress import epoch_line, quiet_train_worker
from trustlab.platform.registry import get_method


# ----------------------------------------------------------------------------- worker side
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAD_SYNC = ("bucketed", "flat")


def resolve_precision(value, device) -> str:
    """``trainer.precision`` on ``device``: ``auto`` is bf16 on a GPU that supports it, else fp32
    (on a CPU, bf16 autocast is slower than fp32 for most kernels: ask for it explicitly)."""
    p = str(value if value is not None else "auto").lower()
    if p not in PRECISIONS:
        raise ValueError(f"trainer.precision must be one of {', '.join(PRECISIONS)}, not {value!r}")
    if p == "auto":
        cuda = torch.device(device).type == "cuda"
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    return p


def resolve_auto(value, on_gpu: bool, when_auto):
    """A knob that may be ``auto``: its value on a GPU worker is ``when_auto``, elsewhere off."""
    if isinstance(value, str) and value.lower() == "auto":
        return when_auto if on_gpu else type(when_auto)()
    return value


def _allreduce_grads(params, world: int, group=None) -> None:
    """Average the existing gradients of ``params`` over ``world`` ranks with one flat all-reduce."""
    if world <= 1:
        return
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    flat.div_(world)
    for g, r in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(r)


def summed_buffers(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, buffer)`` of every running-sum buffer of ``model``: a module lists the names of
    its buffers that only ever grow by additions of its own rows (sums, counts) in a
    ``summed_buffers`` attribute; each rank's additions belong to the whole run's total."""
    out = []
    for mname, m in ck.unwrap(model).named_modules():
        for b in getattr(m, "summed_buffers", ()):
            out.append((f"{mname}.{b}" if mname else b, getattr(m, b)))
    return out


def sum_buffers_across(bufs: list, snap: dict, world: int, group=None) -> dict:
    """Add every rank's additions since ``snap`` (the values all ranks shared) into each buffer
    (one flat all-reduce of the differences); returns the new shared values (the next snapshot)."""
    if world > 1 and bufs:
        import torch.distributed as dist

        delta = torch.cat([(b - snap[n]).reshape(-1).double() for n, b in bufs])
        dist.all_reduce(delta, group=group)
        i = 0
        for n, b in bufs:
            k = b.numel()
            b.copy_((snap[n].double().reshape(-1) + delta[i : i + k]).view_as(b).to(b.dtype))
            i += k
    return {n: b.detach().clone() for n, b in bufs}


class GradSync:
    """Gradient averaging over ``world`` ranks that overlaps the backward pass, as DDP's buckets
    do, without wrapping the model (a method's ``loss_step`` may call any sub-module).

    The parameters are cut into buckets of about ``bucket_mb`` MB in reverse order (the order in
    which backward tends to produce their gradients); after the first step the buckets are
    rebuilt in the order rank 0's gradients actually arrived, parameters that got none last (as
    DDP rebuilds its buckets), so an unused head does not hold the others back. While armed
    (``arm()``, just before backward) a post-accumulate-grad hook on each parameter counts it
    in; once every parameter of a bucket has its gradient, the bucket is flattened and
    all-reduced asynchronously (``async_op=True``) while backward goes on. Buckets are launched strictly in order, so every
    rank issues the same collectives in the same order. ``wait()`` (before the optimizer step)
    launches what is left (a bucket with a parameter that got no gradient in this pass goes
    with the gradients that exist, as the flat all-reduce did), waits for every bucket and
    writes the averages back: the same result as one flat all-reduce after backward.
    Hooks of an unarmed sync do nothing, so another loss's backward through these parameters (a
    generator's loss through its critic) launches nothing; a second ``arm()`` before ``wait()``
    (two backward passes into the same gradients) falls back to one flat all-reduce.
    ``overlap=False`` registers no hooks: ``wait()`` is the flat all-reduce."""

    def __init__(self, params, world: int, bucket_mb: float = 25.0, overlap: bool = True, group=None):
        seen: set[int] = set()
        self.params = [p for p in params if p.requires_grad and not (id(p) in seen or seen.add(id(p)))]
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self.world, self.group = world, group
        self.cap = max(1.0, float(bucket_mb) * 2**20)
        self._bucketize(list(reversed(self.params)))
        self.handles = [p.register_post_accumulate_grad_hook(self._ready) for p in self.params] if overlap else []
        self.armed = self.redo = self.rebuilt = False
        self.left: list[int] = []
        self.next = 0
        self.works: list = []
        self.arrived: list[int] = []  # parameter indices in the order their gradients arrived (first step)
        self.launched_in_backward = 0  # buckets launched by the hooks in the last step (the overlap)

    def _bucketize(self, ordered: list) -> None:
        self.buckets: list[list[torch.Tensor]] = []
        size, key = 0, None
        for p in ordered:
            nbytes = p.numel() * p.element_size()
            if not self.buckets or (p.dtype, p.device) != key or (size > 0 and size + nbytes > self.cap):
                self.buckets.append([])
                size, key = 0, (p.dtype, p.device)
            self.buckets[-1].append(p)
            size += nbytes
        self.bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}

    def _rebuild(self) -> None:
        """Buckets in rank 0's arrival order (broadcast, so every rank has the same layout)."""
        import torch.distributed as dist

        order = [self.arrived]
        dist.broadcast_object_list(order, src=0, group=self.group)
        first = [self.params[i] for i in order[0]]
        got = {id(p) for p in first}
        self._bucketize(first + [p for p in reversed(self.params) if id(p) not in got])
        self.rebuilt = True

    def arm(self) -> None:
        if self.armed:
            self.redo = True
            return
        self.armed, self.redo = True, False
        self.left = [len(b) for b in self.buckets]
        self.next, self.works, self.launched_in_backward = 0, [], 0
        if not self.rebuilt:
            self.arrived = []

    def _ready(self, p: torch.Tensor) -> None:
        if not self.armed or self.redo:
            return
        if not self.rebuilt:
            self.arrived.append(self._index[id(p)])
        i = self.bucket_of[id(p)]
        self.left[i] -= 1
        while self.next < len(self.buckets) and self.left[self.next] <= 0:
            self._launch(self.next)
            self.launched_in_backward += 1

    def _launch(self, i: int) -> None:
        import torch.distributed as dist

        self.next = i + 1
        grads = [p.grad for p in self.buckets[i] if p.grad is not None]
        if grads:  # always a copy (flattening one tensor would give a view of the gradient itself)
            flat = torch.cat([g.reshape(-1) for g in grads])
            self.works.append((dist.all_reduce(flat, group=self.group, async_op=True), flat, grads))

    def wait(self) -> None:
        from torch._utils import _unflatten_dense_tensors

        if self.armed and not self.redo and self.handles:
            while self.next < len(self.buckets):
                self._launch(self.next)
            for work, flat, grads in self.works:
                work.wait()
                flat.div_(self.world)
                for g, r in zip(grads, _unflatten_dense_tensors(flat, grads)):
                    g.copy_(r)
            if not self.rebuilt:
                self._rebuild()
        else:
            for work, _, _ in self.works:  # launched before a second backward: complete, then redo flat
                work.wait()
            _allreduce_grads(self.params, self.world, self.group)
        self.armed = self.redo = False
        self.works = []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class LossSums:
    """A step's loss parts summed over an epoch without a host sync per step: running float64
    sums on the device (the same arithmetic as adding Python floats), read by ``means()``."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor | float] = {}
        self.steps = 0

    def add(self, out: dict) -> None:
        self.steps += 1
        for k, v in out.items():
            if torch.is_tensor(v):
                v = v.detach().reshape(()).to(torch.float64)
                if k in self.sums and torch.is_tensor(self.sums[k]):
                    self.sums[k].add_(v)
                    continue
            self.sums[k] = self.sums.get(k, 0.0) + v

    def means(self) -> dict[str, float]:
        """Per-step means (dividing by every step taken, as a part missing in a step counts 0)."""
        return {k: float(v) / max(1, self.steps) for k, v in self.sums.items()}


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetch(it, depth: int):
    """Iterate ``it`` in a background thread, ``depth`` items ahead (its exceptions re-raised here)."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in it:
                if not put(item):
                    return
            put(end)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(_Raised(e))

    th = threading.Thread(target=work, name="trustlab-prefetch", daemon=True)
    th.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        th.join(timeout=5)


class WorkerContext:
    """Everything a per-worker loop needs, the generic one or a method's own: threads and seeds,
    the model with its starting weights, restore from ``ray.train.get_checkpoint()``, this
    worker's batches, gather and gradient all-reduce across workers, the ``Step`` a hook sees,
    and one checkpoint + ``ray.train.report`` per epoch (rank 0 writes the checkpoint).

    A training step in any loop goes through it, so every loop gets the same precision,
    gradient synchronisation, compilation and input pipeline::

        model = ctx.prepare(ctx.build_model(to_device=False))    # device, channels-last
        loss_fn = ctx.compiled(fn)                                 # torch.compile when asked
        for batch in ctx.batches(epoch):                           # prefetched, on the device
            with ctx.autocast():                                   # trainer.precision
                out = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            ctx.backward(out["loss"], opt)                         # grads all-reduced in buckets
            ctx.optimizer_step(opt)                                # wait, unscale, clip, step

    ``WorkerContext.from_ray(config)`` inside a Ray Train worker; ``WorkerContext.local(...)``
    runs the same loops in one process without Ray (tests, benchmarks), where ``report`` keeps
    the metrics in ``history``."""

    def __init__(self, cfg: dict, stage: str, epochs: int, *, rank: int = 0, world: int = 1, device="cpu",
                 data: dict | None = None, shards: dict | None = None, init_from=None, ray_session: bool = False,
                 threads: bool = True, validate: bool = True, verbose: bool = True):
        self.cfg, self.stage, self.epochs = cfg, stage, int(epochs)
        self.rank, self.world, self.device = rank, world, torch.device(device)
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
            n = cfg["trainer"].get("threads_per_worker") or math.ceil(float(cfg["trainer"]["cpus_per_worker"]))
            torch.set_num_threads(max(1, int(n)))
        torch.manual_seed(self.seed)
        np.random.seed(self.seed + rank)
        t = cfg["trainer"]
        gpu = self.device.type == "cuda"
        if gpu and self.device.index is not None:
            torch.cuda.set_device(self.device)
        self.precision = resolve_precision(t.get("precision", "auto"), self.device)
        self.amp_dtype = AMP_DTYPES.get(self.precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.grad_sync = str(t.get("grad_sync", "bucketed"))
        if self.grad_sync not in GRAD_SYNC:
            raise ValueError(f"trainer.grad_sync must be one of {', '.join(GRAD_SYNC)}, not {self.grad_sync!r}")
        self.bucket_mb = float(t.get("grad_bucket_mb", 25))
        self.channels_last = bool(resolve_auto(t.get("channels_last", "auto"), gpu, True))
        self.prefetch_depth = int(resolve_auto(t.get("prefetch_batches", "auto"), gpu, 2) or 0)
        self.compile = t.get("compile", False)
        self._syncs: dict[int, GradSync] = {}
        self._buffer_snap: dict = {}  # running-sum buffers as every rank held them (snapshot_buffers)

    @classmethod
    def from_ray(cls, config: dict) -> "WorkerContext":
        """The context of this Ray Train worker. ``config["context"]``, when it holds a ready
        (local) context, is returned as it is: a method's own loop ``fn(config)`` then runs in one
        process without Ray (``fn({"context": WorkerContext.local(...)})``; benchmarks, tests)."""
        if isinstance(config.get("context"), cls):  # a ready local context: an own loop run without Ray
            return config["context"]
        import ray
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        quiet_train_worker(bool(config["cfg"]["run"].get("verbose")))
        data = ray.get(config["data_ref"]) if config.get("data_ref") is not None else {}
        shards = {s: ray.train.get_dataset_shard(s) for s in config.get("ray_datasets", [])}
        return cls(config["cfg"], config["stage"], config["epochs"], rank=ctx.get_world_rank(),
                   world=ctx.get_world_size(), device=ray.train.torch.get_device(), data=data, shards=shards,
                   init_from=config.get("init_from"), ray_session=True)

    @classmethod
    def local(cls, cfg: dict, stage: str, data: dict, epochs: int | None = None, init_from=None,
              validate: bool = False, device="cpu") -> "WorkerContext":
        """One process, no Ray. With ``validate`` each epoch is validated and ``best_state`` keeps
        the model state a Ray stage's checkpoint ranking would select (best ``val_score``)."""
        method = get_method(cfg["method"]["name"])
        n = method.stage_epochs(cfg, stage) if epochs is None else epochs
        return cls(cfg, stage, n, data=data, init_from=init_from, threads=False, validate=validate, verbose=False,
                   device=device)

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
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
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
                                                       local_shuffle_buffer_size=4 * bs,
                                                       prefetch_batches=max(1, self.prefetch_depth))
            return
        arrays = self.data[split]
        n = len(arrays["y"])
        perm = np.random.default_rng(self.seed + 1000 * epoch).permutation(n)
        per = n // self.world
        yield from iter_array_batches(arrays, bs, perm[self.rank * per : (self.rank + 1) * per])

    def batches(self, epoch: int, split: str = "train", batch_size: int | None = None):
        """``train_batches`` ready for a step: ``method.to_batch`` applied, pinned and copied to the
        device without blocking (CUDA), 4-D float ``x`` channels-last when that is on. With
        ``trainer.prefetch_batches`` > 0 the next batches are gathered, converted and pinned in a
        background thread while the current step runs."""
        pin = self.device.type == "cuda"
        to_batch = self.method.to_batch

        def host(b):
            t = to_batch(b)
            return {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in t.items()} if pin else t

        it = map(host, self.train_batches(epoch, split, batch_size))
        if self.prefetch_depth > 0:
            it = prefetch(it, self.prefetch_depth)
        for t in it:
            yield self.to_device(t)

    def to_device(self, batch: dict) -> dict:
        """A batch of tensors on this worker's device (non-blocking from pinned memory), ``x``
        channels-last when that is on and it is a 4-D float image batch."""
        out = to_device(batch, self.device)
        x = out.get("x")
        if self.channels_last and torch.is_tensor(x) and x.dim() == 4 and x.is_floating_point():
            out["x"] = x.contiguous(memory_format=torch.channels_last)
        return out

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

    # ---- precision, gradient synchronisation, compilation
    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` on this worker's device, channels-last when ``trainer.channels_last`` is on
        (``auto``: on a GPU, for a model with 2-D convolutions)."""
        model = model.to(self.device)
        if self.channels_last:
            # only the convolutions: ``model.to(memory_format=...)`` would also convert every other
            # 4-/5-D tensor, and a 5-D buffer (a memory of exemplar images) makes it raise on a GPU
            for m in model.modules():
                if isinstance(m, torch.nn.Conv2d):
                    m.to(memory_format=torch.channels_last)
        return model

    def autocast(self):
        """``torch.autocast`` at ``trainer.precision`` (a no-op at fp32): around forward and loss."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                              enabled=self.amp_dtype is not None)

    def compiled(self, fn):
        """``fn`` compiled with ``torch.compile`` when ``trainer.compile`` is on: ``true`` (default
        mode), a mode (``reduce-overhead``, ``max-autotune``, ``max-autotune-no-cudagraphs``) or
        a backend name (``aot_eager``, ``eager``: for debugging); else ``fn`` itself."""
        c = self.compile
        if c is None or c is False or str(c).lower() in ("false", "off", "none", "0"):
            return fn
        if c is True or str(c).lower() in ("true", "on"):
            return torch.compile(fn)
        return torch.compile(fn, mode=c) if c in COMPILE_MODES else torch.compile(fn, backend=c)

    def grad_sync_for(self, optimizer) -> GradSync | None:
        """The ``GradSync`` of ``optimizer``'s parameters (made on first use; None on one worker)."""
        if self.world <= 1:
            return None
        sync = self._syncs.get(id(optimizer))
        if sync is None:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            sync = self._syncs[id(optimizer)] = GradSync(params, self.world, self.bucket_mb,
                                                         overlap=self.grad_sync == "bucketed")
        return sync

    def backward(self, loss: torch.Tensor, optimizer) -> None:
        """``loss.backward()`` (scaled at fp16); on several workers the gradients of
        ``optimizer``'s parameters are all-reduced bucket by bucket while backward runs."""
        sync = self.grad_sync_for(optimizer)
        if sync is not None:
            sync.arm()
        self.scaler.scale(loss).backward()

    def optimizer_step(self, optimizer) -> None:
        """Finish the all-reduce of ``optimizer``'s gradients, clip them to ``trainer.grad_clip``
        when set (unscaled first at fp16), step (skipped by the scaler when fp16 overflowed) and
        update the loss scale."""
        sync = self.grad_sync_for(optimizer)
        if sync is not None:
            sync.wait()
        clip = self.cfg["trainer"].get("grad_clip")
        if clip:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], float(clip))
        self.scaler.step(optimizer)
        self.scaler.update()

    def snapshot_buffers(self, model: torch.nn.Module) -> None:
        """Remember the running-sum buffers (``summed_buffers``) every rank starts the epoch with."""
        self._buffer_snap = {n: b.detach().clone() for n, b in summed_buffers(model)}

    def sum_buffers(self, model: torch.nn.Module) -> None:
        """Reduce the running-sum buffers over ranks (each rank saw only its shard), so the
        validation and rank 0's checkpoint hold the statistics of every rank's rows."""
        bufs = summed_buffers(model)
        if bufs:
            self._buffer_snap = sum_buffers_across(bufs, self._buffer_snap, self.world)

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

        saves = self.rank == 0 and model is not None
        # report persists the checkpoint (synchronous upload) before it returns: the staging copy can go
        with ck.temp_dir() if saves else contextlib.nullcontext() as d:
            ckpt = None
            if saves:
                if isinstance(optimizer, dict):
                    opt_state = {k: o.state_dict() for k, o in optimizer.items()}
                else:
                    opt_state = optimizer.state_dict() if optimizer is not None else None
                extra = {"scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}
                ck.save_state(d, model=ck.unwrap(model).state_dict(), optimizer=opt_state, epoch=epoch,
                              step=self.done, stage=self.stage, metrics=metrics, cfg=self.cfg, **extra)
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)


def detection_validation(method, model, cfg, batches, ctx: WorkerContext) -> dict:
    """Detection metrics (``val_auc``, ``val_ap``, ``val_eer``, ``val_acc``, ``val_video_auc``) of
    the scores of every rank's share, and ``val_score`` = ``trainer.select_metric`` (accuracy when
    that is undefined). Also for a method's own ``validate`` hook that prepares the model first."""
    y, s, v = score_batches(method, model, batches, cfg, ctx.device)
    parts = ctx.gather((y, s, v))
    y, s, v = (np.concatenate([p[i] for p in parts]) for i in range(3))
    m = detection_metrics(y, s, v, float(cfg["trainer"].get("threshold", 0.5)))  # sample level ("frame")
    out = {f"val_{k}": m["frame"][k] for k in ("auc", "ap", "eer", "acc")}  # val_auc: per scored sample
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
    """The generic loop: shard -> ``method.loss_step`` (under ``trainer.precision``, compiled
    when ``trainer.compile``) -> backward with overlapped gradient all-reduce -> optimizer ->
    validation -> one report (and checkpoint) per epoch. Returns the trained model. Loss parts
    are summed on the device and read once per epoch (and every ``log_every`` steps)."""
    method, cfg, stage = ctx.method, ctx.cfg, ctx.stage
    t = cfg["trainer"]
    model = ctx.prepare(ctx.build_model(to_device=False))
    opt = method.configure_optimizer(model, cfg, stage, steps_per_epoch=ctx.steps_per_epoch())
    start_epoch = ctx.restore(model, opt)
    loss_step = method.loss_step
    loss_fn = ctx.compiled(lambda model, batch, step: loss_step(model, batch, stage, cfg, step))
    bs = int(t["batch_size"])
    log_every = int(t.get("log_every", 20))
    for epoch in range(start_epoch, ctx.epochs):
        model.train()
        t0 = time.time()
        ctx.snapshot_buffers(model)  # running sums as every rank holds them before this epoch
        sums = LossSums()
        for batch in ctx.batches(epoch):
            with ctx.autocast():
                out = loss_fn(model, batch, ctx.step(epoch))
            opt.zero_grad(set_to_none=True)
            ctx.backward(out["loss"], opt)
            ctx.optimizer_step(opt)
            ctx.done += 1
            sums.add(out)
            if log_every and sums.steps % log_every == 0:
                ctx.log(f"epoch {epoch + 1}/{ctx.epochs} step {sums.steps} loss {sums.means()['loss']:.4f}")
        steps = sums.steps
        ctx.sum_buffers(model)  # every rank's additions to running sums (e.g. per-domain statistics)
        metrics = {f"train_{k}": v for k, v in sums.means().items()}  # waits for the epoch's last step
        train_time = time.time() - t0
        if ctx.validate:
            with ctx.autocast():
                metrics.update(validate(method, model, stage, cfg, ctx.val_batches(), ctx))
        metrics.update(steps=steps, train_seconds=train_time, resumed_from_epoch=start_epoch,
                       samples_per_second=steps * bs / max(train_time, 1e-9))
        ctx.log(epoch_line(epoch + 1, ctx.epochs, metrics, time.time() - t0, ctx.world, t.get("select_metric", "val_auc")))
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


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def scaling_config(cfg: dict, use_gpu: bool):
    """``trainer.num_workers`` workers placed by ``trainer.placement_strategy``; with
    ``trainer.min_workers`` below ``num_workers`` the group is elastic (Ray Train v2:
    ``num_workers=(min, max)``): it starts, and restarts after a failure, with as many workers
    as the cluster has room for, at least ``min_workers``."""
    from ray.train import ScalingConfig

    t = cfg["trainer"]
    res = {"CPU": float(t["cpus_per_worker"])}
    if use_gpu:
        res["GPU"] = float(t.get("gpus_per_worker", 1))
    n = int(t["num_workers"])
    lo = t.get("min_workers")
    workers = (int(lo), n) if lo is not None and int(lo) < n else n
    strategy = str(t.get("placement_strategy") or "PACK").upper()
    if strategy not in PLACEMENT_STRATEGIES:
        raise ValueError(f"trainer.placement_strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}, not {strategy!r}")
    return ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=res,
                         placement_strategy=strategy)


def split_data(data: dict):
    """Separate in-memory array splits (sent through the object store) from Ray Datasets."""
    arrays = {k: v for k, v in data.items() if isinstance(v, dict)}
    datasets = {k: v for k, v in data.items() if not isinstance(v, dict)}
    return arrays, datasets


def fit_stage(cfg: dict, stage: str, data: dict, run_name: str, run_dir: str,
              init_from: str | None = None, callbacks=None):
    """One ``TorchTrainer.fit`` for one stage; returns ``(result, best_checkpoint)``."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
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
            # Ray Train's per-report INFO lines (each rank's metrics dict) only with run.verbose=true
            logging_config=LoggingConfig(log_level="INFO" if cfg["run"].get("verbose") else "WARNING"),
        ),
    )
    with _environ(START_TIMEOUT_ENV, t.get("start_timeout_s")):  # read by trainer.fit (the controller's env)
        result = trainer.fit()
    return result, best_checkpoint(result, method.stage_selects(cfg, stage))


START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


@contextlib.contextmanager
def _environ(key: str, value):
    """``os.environ[key] = value`` inside the block (nothing when ``value`` is None)."""
    if value is None:
        yield
        return
    old = os.environ.get(key)
    os.environ[key] = str(value)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def best_checkpoint(result, select: bool = True):
    """The checkpoint with the best ``val_score`` (or the latest, for non-selecting stages)."""
    if not select or not result.best_checkpoints:
        return result.checkpoint
    return max(result.best_checkpoints, key=lambda cm: cm[1].get("val_score", -math.inf))[0]


def fit_stages(cfg: dict, stages, data: dict, run_name: str, run_dir: str, init_from=None, callbacks=None,
               final_callbacks=None, require_checkpoint: bool = True):
    """Each stage through ``fit_stage``, starting from the checkpoint the stage before selected (the
    first from ``init_from``); ``callbacks`` on every stage, ``final_callbacks`` also on the last.
    Returns ``(results {stage: Result}, the last stage's selected checkpoint or None, the URI of the
    last selected checkpoint)``. A stage that selects no checkpoint raises, unless
    ``require_checkpoint`` is off (a Tune trial: the next stage then starts where this one did)."""
    method = get_method(cfg["method"]["name"])
    stages = list(stages)
    results, best = {}, None
    for i, stage in enumerate(stages):
        print(f"[trustlab] stage {stage}: {method.stage_epochs(cfg, stage)} epochs on "
              f"{cfg['trainer']['num_workers']} worker(s) ({run_name})", flush=True)
        cbs = list(callbacks or []) + (list(final_callbacks or []) if i == len(stages) - 1 else [])
        results[stage], best = fit_stage(cfg, stage, data, run_name, run_dir, init_from=init_from, callbacks=cbs or None)
        if best is not None:
            init_from = checkpoint_uri(best, cfg)
        elif require_checkpoint:
            raise RuntimeError(f"{run_name}: stage {stage} produced no checkpoint")
    return results, best, init_from


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

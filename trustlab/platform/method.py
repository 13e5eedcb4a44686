"""The Method contract: a small object the platform drives (composition, not a trainer hierarchy).

A method is any object with the members of ``Method`` below (a ``typing.Protocol``: nothing to
inherit). ``@register_method`` registers one instance; ``get_method`` hands out a ``Bound``
around it, which is how the platform and the tests call a method.

**The one rule for optional hooks**: a hook is the method's own when the method object has an
attribute of that name; otherwise the platform's default in this module is used (``DEFAULTS``),
or, for hooks without a default, the platform's generic behaviour (``Bound.has(name)`` is false).
No hook is found by inspecting signatures.

Every method YAML also carries ``ci_overrides``: Hydra override strings that shrink its default
run for tests; tests parametrised over ``list_methods()`` train every registered method through
Ray Train with them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch


@dataclass(frozen=True)
class Step:
    """Where a ``loss_step`` call stands: ``done`` optimizer steps of this stage already taken by
    this worker (restored with the checkpoint), the 0-based ``epoch``, this worker's ``rank`` in a
    group of ``world``, and the run's ``seed``. Hooks that need a step count or per-rank seeds
    read them here; nothing of the kind lives on the registered method object."""

    done: int = 0
    epoch: int = 0
    rank: int = 0
    world: int = 1
    seed: int = 0


@runtime_checkable
class Method(Protocol):
    """Required members. ``cfg`` is always the resolved plain-dict config."""

    name: str       # set by the registry
    modality: str   # "image", "video", "face", "fscil", ...

    def build_data(self, cfg: dict) -> dict:
        """``{split: arrays}`` (a dict of equally long numpy arrays with at least ``x``, ``y`` and
        ``vid``) or a ``ray.data.Dataset`` per split. Splits: ``train``, ``val`` (model selection),
        ``test`` (reported, never selected on)."""

    def build_model(self, cfg: dict, stage: str) -> torch.nn.Module: ...

    def loss_step(self, model, batch: dict, stage: str, cfg: dict, step: Step) -> dict:
        """A dict with a scalar tensor ``loss`` and named parts (logged as ``train_<part>``)."""

    def predict(self, model, batch: dict, cfg: dict) -> torch.Tensor:
        """1-D scores, higher = more likely fake / positive."""


# ----------------------------------------------------------------------------- optional hooks
# Hooks with a platform default (the method defines one only where the default does not fit):
def stages(method, cfg: dict) -> list[str]:
    """Ordered stage names; each stage is one Ray Train run whose best checkpoint initialises
    the next stage's model."""
    return ["train"]


def stage_data(method, cfg: dict, stage: str, data: dict) -> dict:
    """The splits a stage trains on (e.g. self-supervised stages keep real samples only)."""
    return data


def stage_epochs(method, cfg: dict, stage: str) -> int:
    return int(cfg["trainer"]["epochs"])


def stage_selects(method, cfg: dict, stage: str) -> bool:
    """Whether this stage's checkpoints are ranked by the validation metric (else: latest)."""
    return True


def configure_optimizer(method, model: torch.nn.Module, cfg: dict, stage: str, steps_per_epoch: int | None = None):
    """AdamW over the trainable parameters. ``steps_per_epoch`` (this worker's, None for streamed
    data) lets a method size an lr schedule."""
    t = cfg["trainer"]
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=float(t["lr"]), weight_decay=float(t["weight_decay"]))


def to_batch(arrays: dict) -> dict:
    """numpy arrays of one batch -> tensors (uint8 images become float in [0, 1]). One pass per
    array: uint8 images are divided straight into a new float32 array; an array that owns its
    writable memory (a gathered batch) is wrapped as it is; views and read-only (object-store)
    arrays are copied, so a step never writes into the data set."""
    out = {}
    for k, v in arrays.items():
        v = np.asarray(v)
        if v.dtype.kind not in "biuf":  # strings / objects (paths, names) stay numpy
            out[k] = v
        elif k == "x" and v.dtype == np.uint8:
            out[k] = torch.from_numpy(np.divide(v, np.float32(255.0), dtype=np.float32))
        else:
            out[k] = torch.from_numpy(v if v.base is None and v.flags.writeable else v.copy())
    return out


def _default_to_batch(method, arrays: dict) -> dict:
    return to_batch(arrays)


DEFAULTS: dict[str, Callable] = {
    "stages": stages,
    "stage_data": stage_data,
    "stage_epochs": stage_epochs,
    "stage_selects": stage_selects,
    "configure_optimizer": configure_optimizer,
    "to_batch": _default_to_batch,
}

#: Hooks without a default; absent means the platform's generic behaviour:
#: - ``worker_loop_for(stage)`` -> ``fn(config)`` replacing the generic Ray Train loop for that
#:   stage (non-gradient stages, GAN alternation, session loops). It builds a
#:   ``trustlab.platform.train.WorkerContext(config)`` and reports through it.
#: - ``validate(model, stage, cfg, batches, ctx)`` -> per-epoch validation metrics with
#:   ``val_score`` (higher is better); ``ctx`` is the WorkerContext (rank, world, device, gather,
#:   this worker's arrays).
#: - ``evaluate(cfg, model, data, run_dir)`` -> the whole ``metrics.json`` dict.
#: - ``after_train(cfg, model, data, run_dir)`` -> entries merged into the generic ``metrics.json``.
#: - ``serve_inputs(images, cfg)`` -> a batch dict from decoded RGB uint8 images (HxWx3): the
#:   Serve image path; a method without it is not served.
#: - ``serve_adapter``: what Serve feeds ``serve_inputs``: ``"image"`` (default), ``"clip"``
#:   (the frames of a face clip) or ``"image+caption"`` (``serve_inputs(images, cfg, captions)``).
#: - ``manifest(cfg)`` -> the manifest DataFrame of the run's dataset (``uri, label, split`` ...),
#:   for datasets the data plane does not resolve by ``data.name`` (FSCIL benchmarks, face pairs);
#:   ``mode=inspect`` counts and checks it. None = let the data plane resolve ``data.name``.
#: - ``sample_level``: the name of the level a scored sample stands for in ``metrics.json``
#:   (``"frame"``, the default: one image or frame; ``"clip"`` where a sample is a clip of
#:   frames, so a per-clip score is never reported as a per-frame one). Read by ``sample_level``.
OPTIONAL = ("worker_loop_for", "validate", "evaluate", "after_train", "serve_inputs", "serve_adapter", "manifest",
            "sample_level")


def sample_level(method) -> str:
    """The metrics level of one scored sample: the method's ``sample_level`` or ``"frame"``."""
    impl = method.impl if isinstance(method, Bound) else method
    return str(getattr(impl, "sample_level", "frame"))


class Bound:
    """A registered method with the optional-hook rule applied: ``bound.to_batch(arrays)`` is the
    method's own ``to_batch`` when it has one, else the default; every other attribute is the
    method's. ``bound.has(name)`` says whether the method defines ``name`` itself."""

    __slots__ = ("impl",)

    def __init__(self, impl: Any):
        object.__setattr__(self, "impl", impl)

    def has(self, name: str) -> bool:
        return hasattr(self.impl, name)

    def __getattr__(self, name: str):
        impl = object.__getattribute__(self, "impl")
        try:
            return getattr(impl, name)
        except AttributeError:
            if name in DEFAULTS:
                return functools.partial(DEFAULTS[name], impl)
            raise

    def __setattr__(self, name, value):
        raise AttributeError("a registered method holds no state: keep it in the worker context or the model")

    def __repr__(self) -> str:
        return f"<method {getattr(self.impl, 'name', '?')}>"


def as_bound(method) -> Bound:
    """``method`` with the optional-hook rule applied: a method's own code may hand the platform
    ``self`` (the bare registered object), the platform always calls through a ``Bound``."""
    return method if isinstance(method, Bound) else Bound(method)

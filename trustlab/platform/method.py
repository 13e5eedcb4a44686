"""The Method contract: a small object the platform drives (composition, not a trainer hierarchy).

A method provides, all taking the resolved plain-dict config ``cfg``:

- ``name`` (set by the registry), ``modality`` ("image", "video", "face", "fscil", ...)
- ``stages(cfg)`` -> ordered stage names; each stage is one Ray Train run whose best checkpoint
  initialises the next stage's model.
- ``build_data(cfg)`` -> ``{split: arrays}`` where ``arrays`` is a dict of equally long numpy
  arrays with at least ``x`` (inputs), ``y`` (labels) and ``vid`` (video/image id for
  video-level metrics), or a ``ray.data.Dataset`` per split for streamed data.
  Splits: ``train``, ``val`` (model selection) and ``test`` (reported, never selected on).
- ``build_model(cfg, stage)`` -> ``nn.Module``
- ``loss_step(model, batch, stage, cfg)`` -> dict with a scalar tensor ``loss`` and named parts.
- ``predict(model, batch, cfg)`` -> 1-D tensor of scores (higher = more likely fake / positive).
- ``stage_data(cfg, stage, data)`` -> the splits a stage trains on (default: all of them;
  e.g. self-supervised stages keep real samples only).
- ``serve_inputs(images, cfg)`` -> a batch dict built from decoded RGB uint8 images (HxWx3),
  for the Serve image path.

Optional hooks (define them only where the generic behaviour does not fit):

- ``worker_loop_for(stage)`` -> a per-worker function ``fn(config)`` replacing the generic Ray
  Train loop for that stage (non-gradient stages: dataset distillation, relabel sampling, GAN
  alternation). ``config`` has ``cfg, stage, epochs, init_from, data_ref, ray_datasets``; the
  function must call ``ray.train.report(metrics, checkpoint)`` at least once with a metric
  ``val_score`` (higher is better) and a checkpoint directory written by
  ``trustlab.platform.checkpoints.save_state(dir, model=..., epoch=..., stage=..., cfg=...)``.
  ``trustlab.platform.train.worker_loop`` is the reference.
- ``validate(model, stage, cfg, batches, rank, world, device, gather)`` -> per-epoch validation
  metrics including ``val_score``, replacing the generic detection validation.
- ``evaluate(cfg, model, data, run_dir)`` -> the whole ``metrics.json`` dict (split -> level ->
  metric, plus "ablation"/"baselines"/...), replacing the generic detection evaluation.
- ``after_train(cfg, model, data, run_dir)`` -> extra top-level entries merged into the generic
  ``metrics.json`` (robustness tables, ablations, plots written into ``run_dir``).

Every method YAML also carries ``ci_overrides``: a list of Hydra override strings that shrink
its default run for tests (tiny data, one epoch); tests parametrised over ``list_methods()``
train every registered method through Ray Train with them.

``MethodBase`` holds the defaults most methods share; a method overrides what differs.
"""
from __future__ import annotations

import numpy as np
import torch


class MethodBase:
    name: str = ""
    modality: str = "image"

    def stages(self, cfg: dict) -> list[str]:
        return ["train"]

    def stage_data(self, cfg: dict, stage: str, data: dict) -> dict:
        return data

    def stage_epochs(self, cfg: dict, stage: str) -> int:
        return int(cfg["trainer"]["epochs"])

    def stage_selects(self, cfg: dict, stage: str) -> bool:
        """Whether this stage's checkpoints are ranked by the validation metric (else: latest)."""
        return True

    def configure_optimizer(self, model: torch.nn.Module, cfg: dict, stage: str):
        t = cfg["trainer"]
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=float(t["lr"]), weight_decay=float(t["weight_decay"]))

    def to_batch(self, arrays: dict) -> dict:
        """numpy arrays of one batch -> tensors (uint8 images become float in [0, 1])."""
        out = {}
        for k, v in arrays.items():
            v = np.asarray(v)
            if v.dtype.kind not in "biuf":  # strings / objects (paths, names) stay numpy
                out[k] = v
                continue
            t = torch.from_numpy(np.array(v, copy=True))  # object-store arrays are read-only
            if k == "x" and t.dtype == torch.uint8:
                t = t.float().div_(255.0)
            out[k] = t
        return out

    def serve_inputs(self, images: list, cfg: dict) -> dict:
        raise NotImplementedError(f"{self.name} has no image serving path")

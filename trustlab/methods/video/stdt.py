"""STDT — Spatiotemporal Dropout Transformer (ACM MM 2022, arXiv 2207.06612).

From the paper's abstract: each video becomes aligned face crops of n frames; each frame is cut
into patches; all patches of all frames are reorganised into one *bag of patches* fed to a
vision transformer; a *spatiotemporal dropout* drops patches across space and time, acting as
data augmentation that exposes patch-level spatiotemporal inconsistency, and plugs into existing
ViTs.

Our choices (the abstract gives no numbers; METHODS.md lists them as unknown), all config:

- backbone: a timm ``VisionTransformer`` (``method.backbone``, random init, size overridable by
  ``method.vit``), whose patch embedding, class token, blocks and head are used as they are;
- the bag: every frame's patch tokens get the ViT's spatial position embedding plus a learned
  *frame embedding* (index of the frame in the clip), so each token keeps where and when it came
  from after the bag is shuffled/dropped; one class token reads the whole bag;
- spatiotemporal dropout (training only): a *temporal* ratio drops whole frames (every patch of
  ``round(r_t * T)`` random frames) and a *spatial* ratio then drops ``round(r_s * N)`` random
  patches of each remaining frame; dropped tokens are removed from the sequence (as
  ``timm.layers.PatchDropout`` does for one image), so the ViT also runs faster in training.
  At evaluation the whole bag goes in. Ablation: both ratios 0 (``ablation.variants``);
- loss: binary cross-entropy on the class token's logit; clip-consistent flip / brightness
  augmentation; score = sigmoid(logit); a video's score is the mean of its clips' scores.

Tune: the two dropout ratios and the number of frames per clip (``method.data.clip_len``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from trustlab.methods.video import common as V
from trustlab.platform.registry import register_method


class SpatioTemporalDropout(nn.Module):
    """Drops whole frames (``temporal`` ratio) then patches within each kept frame (``spatial``
    ratio) from a ``(B, T, N, D)`` token grid; returns ``(B, L, D)`` and the kept ``(frame,
    patch)`` indices ``(B, L, 2)``. Identity (all ``T*N`` tokens) in eval mode or with both ratios 0.
    At least one frame and one patch per kept frame always stay."""

    def __init__(self, temporal: float = 0.0, spatial: float = 0.0):
        super().__init__()
        if not (0.0 <= temporal < 1.0 and 0.0 <= spatial < 1.0):
            raise ValueError(f"dropout ratios must be in [0, 1), got temporal={temporal}, spatial={spatial}")
        self.temporal, self.spatial = float(temporal), float(spatial)

    def kept_counts(self, t: int, n: int) -> tuple[int, int]:
        """(frames kept, patches kept per kept frame) in training."""
        return max(1, t - int(round(self.temporal * t))), max(1, n - int(round(self.spatial * n)))

    def forward(self, tok: torch.Tensor):
        b, t, n, d = tok.shape
        dev = tok.device
        if not self.training or (self.temporal == 0 and self.spatial == 0):
            fi = torch.arange(t, device=dev).repeat_interleave(n)
            pi = torch.arange(n, device=dev).repeat(t)
            return tok.reshape(b, t * n, d), torch.stack([fi, pi], -1).expand(b, -1, -1)
        kt, kn = self.kept_counts(t, n)
        frames = torch.rand(b, t, device=dev).argsort(1)[:, :kt].sort(1).values  # (B, kt)
        tok = torch.gather(tok, 1, frames.view(b, kt, 1, 1).expand(b, kt, n, d))
        patches = torch.rand(b, kt, n, device=dev).argsort(2)[:, :, :kn].sort(2).values  # (B, kt, kn)
        tok = torch.gather(tok, 2, patches.unsqueeze(-1).expand(b, kt, kn, d))
        idx = torch.stack([frames.unsqueeze(-1).expand(b, kt, kn), patches], -1)
        return tok.reshape(b, kt * kn, d), idx.reshape(b, kt * kn, 2)


class STDTNet(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        from trustlab.platform.weights import create_timm

        m = cfg["method"]
        size = int(m["data"]["size"])
        vit_kw = {k: v for k, v in (m.get("vit") or {}).items() if v is not None}
        self.vit = create_timm(m["backbone"], m.get("weights"), cfg, what="the STDT ViT", num_classes=1, img_size=size,
                               patch_size=int(m["patch_size"]), drop_path_rate=float(m.get("drop_path", 0.0)), **vit_kw)
        if self.vit.num_prefix_tokens != 1 or getattr(self.vit, "no_embed_class", False):
            raise ValueError("STDT needs a timm ViT with one class token and position embeddings that include it")
        d = self.vit.embed_dim
        self.frame_embed = nn.Parameter(torch.zeros(1, int(m["max_frames"]), 1, d))
        nn.init.trunc_normal_(self.frame_embed, std=0.02)
        self.st_dropout = SpatioTemporalDropout(m["dropout"]["temporal"], m["dropout"]["spatial"])

    def bag(self, x: torch.Tensor) -> torch.Tensor:
        """Clip (B, T, 3, H, W) in [0, 1] -> patch tokens (B, T, N, D) with space + time embeddings."""
        b, t = x.shape[:2]
        if t > self.frame_embed.shape[1]:
            raise ValueError(f"clip has {t} frames, more than method.max_frames={self.frame_embed.shape[1]}")
        p = self.vit.patch_embed(V.normalise(x).flatten(0, 1))  # (B*T, N, D)
        p = p + self.vit.pos_embed[:, 1:]
        return p.view(b, t, p.shape[1], p.shape[2]) + self.frame_embed[:, :t]

    def forward(self, x: torch.Tensor, return_tokens: bool = False):
        tok, idx = self.st_dropout(self.bag(x))
        cls = (self.vit.cls_token + self.vit.pos_embed[:, :1]).expand(tok.shape[0], -1, -1)
        h = self.vit.norm_pre(self.vit.pos_drop(torch.cat([cls, tok], 1)))
        h = self.vit.norm(self.vit.blocks(h))
        logit = self.vit.forward_head(h).squeeze(-1)
        return (logit, idx) if return_tokens else logit


def bare_backbone(cfg: dict) -> nn.Module:
    """The same timm ViT without STDT's bag, frame embedding and dropout, classifying the
    frames of a clip one by one (for benchmarks/gpu_step.py)."""
    import timm

    m = cfg["method"]
    vit_kw = {k: v for k, v in (m.get("vit") or {}).items() if v is not None}
    return timm.create_model(m["backbone"], pretrained=False, num_classes=1, img_size=int(m["data"]["size"]),
                             patch_size=int(m["patch_size"]), **vit_kw)


@register_method("stdt")
class STDT:
    modality = "video"
    sample_level = "clip"  # one score per clip of frames: metrics.json reports "clip" and "video" levels

    def build_data(self, cfg: dict) -> dict:
        return V.build_video_data(cfg)

    def stage_data(self, cfg: dict, stage: str, data: dict) -> dict:
        return {k: data[k] for k in ("train", "val") if k in data}

    def stage_epochs(self, cfg: dict, stage: str) -> int:
        return int(cfg["method"].get("epochs") or cfg["trainer"]["epochs"])

    def configure_optimizer(self, model, cfg, stage, steps_per_epoch=None):
        t = cfg["trainer"]
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                 lr=float(cfg["method"].get("lr") or t["lr"]), weight_decay=float(t["weight_decay"]))

    def build_model(self, cfg: dict, stage: str) -> nn.Module:
        return STDTNet(cfg)

    def loss_step(self, model, batch, stage, cfg, step=None):
        x = batch["x"]
        if model.training:
            x = V.augment_clip(x)
        logits = model(x)
        y = batch["y"].float()
        loss = F.binary_cross_entropy_with_logits(logits, y)
        return {"loss": loss, "acc": ((logits > 0).float() == y).float().mean()}

    def predict(self, model, batch, cfg):
        return torch.sigmoid(model(batch["x"]))

    def after_train(self, cfg, model, data, run_dir):
        return V.video_report(self, cfg, model, data, run_dir)

    def serve_inputs(self, images: list, cfg: dict) -> dict:
        """Decoded RGB frames of one clip (HxWx3 uint8, already face crops) -> a one-clip batch."""
        return {"x": V.frames_to_clip(images, cfg)}

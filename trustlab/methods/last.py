"""LAST — Latent Spatiotemporal Adaptation for face-forgery video detection (arXiv 2309.04795).

From the paper's abstract: a lightweight CNN per frame and a ViT are pre-trained on **real
videos only** with latent reconstruction and contrastive tasks, then frozen; a transferable
linear head is trained on labelled known videos and recovers the spatiotemporal clues of
**unlabelled target videos** in a semi-supervised way (an earlier version called it
domain-adaptive reconstruction). Protocol consequence (METHODS.md): the target split is given
unlabelled at training time; its labels are used only for evaluation.

Our choices (config; nothing else is known):

- backbone: a small timm CNN (``method.cnn``, random init) cut at a stride-8 stage gives a
  grid of latent tokens per frame (``method.dim`` wide); with spatial position and frame
  embeddings they go through ``method.depth`` timm ViT blocks;
- stage ``pretrain_ssl`` (real clips only): *latent reconstruction* — a fraction
  ``recon.mask_ratio`` of the tokens is replaced by a mask token and a decoder MLP regresses the
  hidden latent (layer-normalised, stop-gradient CNN token; MSE on masked tokens);
  *contrastive* — the clip embeddings (``clip_summary`` of the ViT output -> projector) of two
  independently masked views of the same (clip-consistently augmented) clip are positives, the
  other clips of the batch negatives (InfoNCE, ``contrast.temperature``); both views share one
  CNN pass, so a step costs one CNN forward; loss ``recon.weight * L_rec + contrast.weight * L_con``;
- stage ``adapt``: the backbone is frozen (eval mode, no gradients); the linear head reads the
  mean ViT output and the mean absolute frame-to-frame change of each token
  (``_video.clip_summary``), standardised by a BatchNorm without affine parameters (batch
  statistics of the mixed source/target batches in training, running statistics at evaluation:
  a fixed standardisation, so the head stays linear). Each training
  batch mixes labelled source clips (binary cross-entropy) and unlabelled target clips, whose
  label column was replaced by -1 in ``stage_data`` before the stage starts (``mask_labels``).
  At most ``adapt.max_target_clips`` unlabelled clips (a seeded subset, split evenly over the
  targets) join the source clips, to bound the stage's cost.
  Semi-supervised target loss (our choice, FixMatch-style with an information-maximisation
  prior): the head's prediction on the clean target clip is a pseudo-label, kept when its
  confidence ``max(p, 1-p) >= adapt.threshold``, and trains the prediction on a strongly
  augmented copy (flip, brightness, per-frame noise); a diversity term keeps the mean target
  prediction from collapsing to one class (``adapt.diversity``). Target weight ramps up
  linearly over the first ``adapt.warmup_steps`` steps so the source head forms first;
- model selection on the *source* validation split (target labels are never read);
- ablation: ``adapt.target_weight=0`` — the same frozen backbone, a source-only linear head.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from trustlab.methods import _video as V
from trustlab.platform.method import MethodBase
from trustlab.platform.registry import register_method


class LASTNet(nn.Module):
    def __init__(self, cfg: dict, stage: str):
        super().__init__()
        from timm.models.vision_transformer import Block

        m = cfg["method"]
        d = int(m["dim"])
        self.backbone = nn.Module()
        bb = self.backbone
        bb.frames = V.FrameTokens(m["cnn"], int(m["cnn_stage"]), d, m.get("weights"), cfg["run"].get("s3_endpoint"))
        g = bb.frames.grid(int(m["data"]["size"]))
        bb.pos = nn.Parameter(torch.zeros(1, 1, g * g, d))
        bb.frame_embed = nn.Parameter(torch.zeros(1, int(m["max_frames"]), 1, d))
        bb.mask_token = nn.Parameter(torch.zeros(1, 1, 1, d))
        for p in (bb.pos, bb.frame_embed, bb.mask_token):
            nn.init.trunc_normal_(p, std=0.02)
        bb.blocks = nn.Sequential(*[Block(d, int(m["heads"]), mlp_ratio=2.0) for _ in range(int(m["depth"]))])
        bb.norm = nn.LayerNorm(d)
        self.decoder = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))  # latent reconstruction
        self.projector = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, int(m["contrast"]["proj_dim"])))
        # the transferable linear head, on standardised features (BatchNorm without affine
        # parameters: a fixed per-feature standardisation at evaluation, so still linear)
        self.head = nn.Sequential(nn.BatchNorm1d(2 * d, affine=False), nn.Linear(2 * d, 1))
        self.frozen = stage == "adapt"
        if self.frozen:
            for n, p in self.named_parameters():
                p.requires_grad = n.startswith("head.")

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.backbone.train(False)
        return self

    def mix(self, tok: torch.Tensor, mask_ratio=0.0):
        """CNN latents (B, T, P, D) -> (ViT output (B, T, P, D), mask (B, T, P) or None); a
        ``mask_ratio`` fraction (a float, or one per clip as a (B,) tensor) of the latents is
        replaced by the mask token first (at least one per clip whose ratio is > 0)."""
        bb = self.backbone
        b, t, p, d = tok.shape
        ratio = torch.as_tensor(mask_ratio, dtype=torch.float32, device=tok.device).expand(b)
        mask = None
        inp = tok
        if bool((ratio > 0).any()):
            mask = torch.rand(b, t, p, device=tok.device) < ratio.view(b, 1, 1)
            mask[:, 0, 0] |= ~mask.flatten(1).any(1) & (ratio > 0)
            inp = torch.where(mask.unsqueeze(-1), bb.mask_token.to(tok.dtype).expand(b, t, p, d), tok)
        h = inp + bb.pos + bb.frame_embed[:, :t]
        return bb.norm(bb.blocks(h.reshape(b, t * p, d))).view(b, t, p, d), mask

    def encode(self, x: torch.Tensor, mask_ratio: float = 0.0):
        """Clip -> (ViT output (B, T, P, D), CNN latents (B, T, P, D), mask (B, T, P) or None)."""
        tok = self.backbone.frames(x)
        h, mask = self.mix(tok, mask_ratio)
        return h, tok, mask

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return V.clip_summary(self.encode(x)[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.frozen_features(x)).squeeze(-1)

    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                return self.features(x)
        return self.features(x)


def ssl_losses(model: LASTNet, x: torch.Tensor, cfg: dict) -> dict:
    """Latent reconstruction + clip contrast on a batch of (real) clips."""
    m = cfg["method"]
    wr, wc = float(m["recon"]["weight"]), float(m["contrast"]["weight"])
    tok = model.backbone.frames(V.augment_clip(x) if model.training else x)  # one CNN pass for both tasks
    b, r1, r2 = tok.shape[0], float(m["recon"]["mask_ratio"]), float(m["contrast"]["mask_ratio"])
    if wc > 0:  # the second, independently masked view shares one ViT pass of 2B clips
        h, mask = model.mix(tok.repeat(2, 1, 1, 1), torch.tensor([r1] * b + [r2] * b))
        (h1, h2), mask = h.split(b), (mask[:b] if mask is not None else None)
    else:
        h1, mask = model.mix(tok, r1)
    out = {}
    loss = h1.new_zeros(())
    if wr > 0:
        target = F.layer_norm(tok.detach(), tok.shape[-1:])
        out["recon"] = F.mse_loss(model.decoder(h1[mask]), target[mask])
        loss = loss + wr * out["recon"]
    if wc > 0:
        z1, z2 = model.projector(V.clip_summary(torch.cat([h1, h2]))).split(b)
        out["contrast"] = V.info_nce(z1, z2, float(m["contrast"]["temperature"]))
        loss = loss + wc * out["contrast"]
    out["loss"] = loss
    return out


def strong_augment(x: torch.Tensor) -> torch.Tensor:
    """Clip-consistent flip/brightness plus small per-frame Gaussian noise."""
    x = V.augment_clip(x)
    return (x + 0.02 * torch.randn_like(x)).clamp(0, 1)


def adapt_losses(model: LASTNet, batch: dict, cfg: dict, step: int) -> dict:
    """Source BCE on labelled rows (y >= 0) + ramped pseudo-label / diversity loss on the
    unlabelled rows (y == -1). Target rows contribute through their images only. All views go
    through the frozen backbone and the head in one call, so the head's standardisation sees one
    joint batch (source, target, strongly augmented target)."""
    a = cfg["method"]["adapt"]
    x, y = batch["x"], batch["y"]
    src, tgt = y >= 0, y == V.UNLABELLED
    use_t = bool(tgt.any()) and float(a["target_weight"]) > 0
    ns, nt = int(src.sum()), int(tgt.sum()) if use_t else 0
    xs = V.augment_clip(x[src]) if model.training else x[src]
    views = [xs]
    if use_t:
        views += [x[tgt], strong_augment(x[tgt]) if model.training else x[tgt]]
    logits = model(torch.cat(views))
    out = {}
    loss = logits.new_zeros(())
    if ns:
        ls = logits[:ns]
        out["source"] = F.binary_cross_entropy_with_logits(ls, y[src].float())
        out["source_acc"] = ((ls > 0).long() == y[src]).float().mean()
        loss = loss + out["source"]
    if use_t:
        w = float(a["target_weight"]) * min(1.0, step / max(1, int(a["warmup_steps"])))
        p = torch.sigmoid(logits[ns : ns + nt].detach())  # pseudo-labels from the clean view
        lt = logits[ns + nt :]  # predictions on the strong view
        keep = torch.maximum(p, 1 - p) >= float(a["threshold"])
        pseudo = F.binary_cross_entropy_with_logits(lt[keep], (p[keep] > 0.5).float()) if keep.any() else lt.sum() * 0
        mean_p = torch.sigmoid(lt).mean().clamp(1e-6, 1 - 1e-6)
        neg_entropy = mean_p * mean_p.log() + (1 - mean_p) * (1 - mean_p).log()
        out.update(target_pseudo=pseudo, target_kept=keep.float().mean(), target_diversity=neg_entropy)
        loss = loss + w * (pseudo + float(a["diversity"]) * neg_entropy)
    out["loss"] = loss
    return out


@register_method("last")
class LAST(MethodBase):
    modality = "video"

    def __init__(self):
        self._steps = 0  # adapt-stage step counter (per process) for the target-weight ramp

    def stages(self, cfg: dict) -> list[str]:
        return ["pretrain_ssl", "adapt"]

    def stage_epochs(self, cfg: dict, stage: str) -> int:
        return int(cfg["method"]["epochs"].get(stage) or cfg["trainer"]["epochs"])

    def stage_selects(self, cfg: dict, stage: str) -> bool:
        return stage != "pretrain_ssl"

    def build_data(self, cfg: dict) -> dict:
        return V.build_video_data(cfg, unlabelled_targets=True)

    def stage_data(self, cfg: dict, stage: str, data: dict) -> dict:
        """``pretrain_ssl``: real source clips. ``adapt``: labelled source train clips plus every
        ``unlabelled:<target>`` split with its labels replaced by -1 (``mask_labels``); the
        validation split is the source's. Nothing else leaves for the workers."""
        if stage == "pretrain_ssl":
            return {k: V.real_only(data[k]) for k in ("train", "val") if k in data}
        train = V.with_domain(data["train"], 0)
        names = sorted(k for k in data if k.startswith("unlabelled:"))
        cap = cfg["method"]["adapt"].get("max_target_clips")
        for i, k in enumerate(names):
            tgt = V.mask_labels(data[k], 1)
            if cap:  # a seeded random subset of each target's clips (same rows whatever the labels)
                tgt = V.subsample(tgt, int(cap) // len(names), int(cfg["seed"]) + i)
            train = V.concat_splits(train, tgt)
        return {"train": train, "val": data["val"]}

    def build_model(self, cfg: dict, stage: str) -> nn.Module:
        self._steps = 0
        return LASTNet(cfg, stage)

    def configure_optimizer(self, model, cfg, stage):
        t = cfg["trainer"]
        lr = float(cfg["method"]["lr"].get(stage) or t["lr"])
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                 weight_decay=float(t["weight_decay"]))

    def loss_step(self, model, batch, stage, cfg):
        if stage == "pretrain_ssl":
            x = batch["x"]
            return ssl_losses(model, x, cfg)
        if model.training:
            self._steps += 1
        return adapt_losses(model, batch, cfg, self._steps)

    def predict(self, model, batch, cfg):
        return torch.sigmoid(model(batch["x"]))

    def after_train(self, cfg, model, data, run_dir):
        return V.video_report(self, cfg, model, data, run_dir)

    def serve_inputs(self, images: list, cfg: dict) -> dict:
        return {"x": V.frames_to_clip(images, cfg)}


def bare_backbone(cfg: dict) -> nn.Module:
    """The timm CNN alone classifying frames (for benchmarks/gpu_step.py)."""
    import timm

    return timm.create_model(cfg["method"]["cnn"], pretrained=False, num_classes=1)

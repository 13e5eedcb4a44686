"""NACO — Natural Consistency representation for face-forgery video detection (ECCV 2024,
arXiv 2407.10550).

From the paper's abstract: per-frame CNN features go into a Transformer that builds a
long-range spatiotemporal representation; it is learned self-supervised on **real videos only**
with a Spatial Predictive Module (predict randomly masked spatial features from the
spatiotemporal representation) and a Temporal Contrastive Module (shuffling the frame order
disturbs the natural consistency; the latent distance is regularised); an MLP head is then
fine-tuned for real/fake. From a third-party summary (METHODS.md): 256-d frame features and a
frozen backbone during detection.

Our choices (config, swept by Tune where marked):

- backbone: a timm CNN (``method.cnn``, random init) cut at a stride-16 stage gives each frame a
  small grid of spatial features, projected to ``method.dim`` = 256; the tokens of all frames,
  with a spatial position and a frame embedding, go through ``method.depth`` timm Transformer
  blocks;
- SPM: a fraction ``spm.mask_ratio`` (Tune) of the spatial tokens is replaced by a learned mask
  token before the Transformer; a predictor MLP maps the Transformer output at each masked
  position to the (stop-gradient) CNN feature that was hidden. The loss is InfoNCE over all
  masked tokens of the batch (temperature ``spm.temperature``): the prediction must pick its own
  hidden feature, which keeps the target from collapsing without a momentum encoder;
- TCM: the clip embedding (``clip_summary`` of the Transformer output -> projector MLP) of the masked view is the
  positive of the unmasked clip; the same frames in a random non-identity order form a hard
  negative, the other clips of the batch are negatives too (InfoNCE, temperature
  ``tcm.temperature``, Tune); frame features are computed once and re-ordered, so shuffling
  changes only the temporal arrangement the Transformer sees;
- stage ``pretrain_ssl``: real clips only (``stage_data``), loss ``spm.weight * L_spm +
  tcm.weight * L_tcm`` (weights: Tune); not selected on a detection metric (latest checkpoint);
- stage ``finetune_head``: CNN, embeddings and Transformer frozen (eval mode, no gradients); an
  MLP head reads the mean Transformer output and the mean absolute change of each token between
  consecutive frames (``_video.clip_summary``: how "naturally consistent" the clip is), or with
  ``method.summary=mean`` the mean token only (the change is a hand-made cue that works on any
  backbone; docs/results.md compares the two);
  binary cross-entropy; checkpoints selected on validation AUC;
- ablation: each module off in turn (``spm.weight=0`` / ``tcm.weight=0``), trained in the same
  run with the same data, seed and epochs.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from trustlab.methods.video import common as V
from trustlab.platform.registry import register_method


# what the head and the TCM projector read of the Transformer output (method.summary)
SUMMARIES = ("mean_change", "mean")


def shuffled_order(b: int, t: int, device=None, gen=None) -> torch.Tensor:
    """(B, T) frame orders, each a random permutation different from the identity (T >= 2)."""
    perm = torch.rand(b, t, generator=gen).argsort(1)
    ident = torch.arange(t).expand(b, t)
    same = (perm == ident).all(1)
    if same.any():  # swap the first two frames of identity draws
        perm[same] = ident[same].clone()
        perm[same, 0], perm[same, 1] = 1, 0
    return perm.to(device)


class NACONet(nn.Module):
    def __init__(self, cfg: dict, stage: str):
        super().__init__()
        from timm.models.vision_transformer import Block

        m = cfg["method"]
        d = int(m["dim"])
        self.frames = V.FrameTokens(m["cnn"], int(m["cnn_stage"]), d, m.get("weights"), cfg)
        g = self.frames.grid(int(m["data"]["size"]))
        self.pos = nn.Parameter(torch.zeros(1, 1, g * g, d))
        self.frame_embed = nn.Parameter(torch.zeros(1, int(m["max_frames"]), 1, d))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, d))
        for p in (self.pos, self.frame_embed, self.mask_token):
            nn.init.trunc_normal_(p, std=0.02)
        self.blocks = nn.Sequential(*[Block(d, int(m["heads"]), mlp_ratio=2.0) for _ in range(int(m["depth"]))])
        self.norm = nn.LayerNorm(d)
        self.predictor = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))  # SPM
        self.summary = str(m.get("summary", "mean_change"))
        if self.summary not in SUMMARIES:
            raise ValueError(f"method.summary must be one of {SUMMARIES}, got {self.summary!r}")
        ds = 2 * d if self.summary == "mean_change" else d
        self.projector = nn.Sequential(nn.Linear(ds, d), nn.GELU(), nn.Linear(d, int(m["tcm"]["proj_dim"])))  # TCM
        h = int(m["head"]["hidden"])
        self.head = nn.Sequential(nn.Linear(ds, h), nn.GELU(), nn.Dropout(float(m["head"]["dropout"])), nn.Linear(h, 1))
        V.load_transformer(self, cfg)
        self.frozen = stage == "finetune_head"
        if self.frozen:
            for n, p in self.named_parameters():
                p.requires_grad = n.startswith("head.")

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:  # frozen backbone: BatchNorm statistics stay as pre-trained
            for n, mod in self.named_children():
                if n != "head":
                    mod.train(False)
        return self

    def mix(self, tok: torch.Tensor, mask: torch.Tensor | None = None, order: torch.Tensor | None = None) -> torch.Tensor:
        """Frame tokens (B, T, P, D) -> Transformer output (B, T, P, D). ``mask`` (B, T, P) bool
        replaces tokens by the mask token; ``order`` (B, T) re-orders the frames first."""
        b, t, p, d = tok.shape
        if order is not None:
            tok = torch.gather(tok, 1, order.view(b, t, 1, 1).expand(b, t, p, d))
        if mask is not None:
            tok = torch.where(mask.unsqueeze(-1), self.mask_token.to(tok.dtype).expand(b, t, p, d), tok)
        h = tok + self.pos + self.frame_embed[:, :t]
        h = self.norm(self.blocks(h.reshape(b, t * p, d)))
        return h.view(b, t, p, d)

    def summarize(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, P, D) Transformer output -> the clip vector the head and the TCM projector read."""
        return V.clip_summary(h) if self.summary == "mean_change" else h.mean((1, 2))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Head input: ``summarize`` of the Transformer output."""
        return self.summarize(self.mix(self.frames(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                f = self.features(x)
        else:
            f = self.features(x)
        return self.head(f).squeeze(-1)


def ssl_losses(model: NACONet, x: torch.Tensor, cfg: dict) -> dict:
    """SPM and TCM losses of a batch of (real) clips; a module with weight 0 is not computed."""
    m = cfg["method"]
    ws, wt = float(m["spm"]["weight"]), float(m["tcm"]["weight"])
    tok = model.frames(x)  # (B, T, P, D)
    b, t, p, _ = tok.shape
    mask = torch.rand(b, t, p, device=x.device) < float(m["spm"]["mask_ratio"])
    mask[:, 0, 0] |= ~mask.flatten(1).any(1)  # at least one masked token per clip
    out = {}
    tcm = wt > 0 and t > 1
    if tcm:  # the three views (masked, intact, frame-shuffled) share one Transformer pass of 3B clips
        ident = torch.arange(t, device=x.device).expand(b, t)
        h3 = model.mix(tok.repeat(3, 1, 1, 1), mask=torch.cat([mask, torch.zeros_like(mask), torch.zeros_like(mask)]),
                       order=torch.cat([ident, ident, shuffled_order(b, t, x.device)]))
        h_m, h, h_shuf = h3.split(b)
    else:
        h_m = model.mix(tok, mask=mask)
    loss = tok.new_zeros(())
    if ws > 0:
        pred = model.predictor(h_m[mask])
        target = tok.detach()[mask]
        out["spm"] = V.info_nce(pred, target, float(m["spm"]["temperature"]))
        loss = loss + ws * out["spm"]
    if tcm:
        z_pos, z, z_shuf = model.projector(model.summarize(torch.cat([h_m, h, h_shuf]))).split(b)
        out["tcm"] = V.info_nce(z, z_pos, float(m["tcm"]["temperature"]), extra_neg=z_shuf)
        with torch.no_grad():
            zn, zp, zs = (F.normalize(v, dim=-1) for v in (z, z_pos, z_shuf))
            out["tcm_gap"] = ((zn * zp).sum(-1) - (zn * zs).sum(-1)).mean()  # cos(pos) - cos(shuffled)
        loss = loss + wt * out["tcm"]
    if not out:  # both modules off: nothing to learn (kept runnable for the ablation grid)
        loss = loss + 0.0 * sum(p.sum() for p in model.parameters())
    out["loss"] = loss
    return out


@register_method("naco")
class NACO:
    modality = "video"
    sample_level = "clip"  # one score per clip of frames: metrics.json reports "clip" and "video" levels

    def stages(self, cfg: dict) -> list[str]:
        return ["pretrain_ssl", "finetune_head"]

    def stage_epochs(self, cfg: dict, stage: str) -> int:
        return V.stage_epochs(cfg, stage)

    def stage_selects(self, cfg: dict, stage: str) -> bool:
        return stage != "pretrain_ssl"

    def build_data(self, cfg: dict) -> dict:
        return V.build_video_data(cfg)

    def stage_data(self, cfg: dict, stage: str, data: dict) -> dict:
        if stage == "pretrain_ssl":  # real videos only
            return {k: V.real_only(data[k]) for k in ("train", "val") if k in data}
        return {k: data[k] for k in ("train", "val") if k in data}

    def build_model(self, cfg: dict, stage: str) -> nn.Module:
        return NACONet(cfg, stage)

    def configure_optimizer(self, model, cfg, stage, steps_per_epoch=None):
        return V.stage_adamw(model, cfg, stage)

    def loss_step(self, model, batch, stage, cfg, step=None):
        x = batch["x"]
        if model.training:
            x = V.augment_clip(x)
        if stage == "pretrain_ssl":
            return ssl_losses(model, x, cfg)
        logits = model(x)
        y = batch["y"].float()
        return {"loss": F.binary_cross_entropy_with_logits(logits, y), "acc": ((logits > 0).float() == y).float().mean()}

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

"""LAST — Latent Spatiotemporal Adaptation for face-forgery video detection (arXiv 2309.04795).

From the paper's abstract: a lightweight CNN per frame and a ViT are pre-trained on **real
videos only** with latent reconstruction and contrastive tasks, then frozen; a transferable
linear head is trained on labelled known videos and recovers the spatiotemporal clues of
**unlabelled target videos** in a semi-supervised way (an earlier version called it
domain-adaptive reconstruction). Protocol consequence (METHODS.md): the target split is given
unlabelled at training time; its labels are used only for evaluation.

Our choices (config; nothing else is known):

- backbone: a small timm CNN (``method.cnn``, random init) cut at its ``method.cnn_stage``
  features stage (3 = stride 16 in the YAML: a 2x2 grid at 32 px) gives a grid of latent tokens per frame (``method.dim`` wide); with spatial position and frame
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
  (``_video.clip_summary``), standardised per *domain* (``DomainStandardize``: domain-specific
  AdaBN). Domain 0 is the labelled source, domain i the i-th target of the protocol; each keeps
  exact running mean/variance of its clean training features (the backbone is frozen, so they
  converge to the domain's feature statistics) and every clip is standardised by its own
  domain's statistics in training and at evaluation (a target's test clips by the statistics of
  its unlabelled clips; served clips by the source's, or ``adapt.serve_domain``'s). The head
  stays one linear map per domain. Each training batch mixes labelled source clips (binary
  cross-entropy) and unlabelled target clips, whose label column was replaced by -1 in
  ``stage_data`` before the stage starts (``mask_labels``). At most ``adapt.max_target_clips``
  unlabelled clips (a seeded subset, split evenly over the targets) join the source clips, to
  bound the stage's cost.
  The "semi-supervised way": labelled source clips train the head, unlabelled target clips set
  their domain's standardisation. An optional target loss on top (``adapt.target_weight``, off by
  default; FixMatch-style with an information-maximisation prior): the head's prediction on the
  clean target clip is a pseudo-label, kept when its confidence ``max(p, 1-p) >= adapt.threshold``,
  and trains the prediction on a strongly augmented copy (flip, brightness, per-frame noise); a
  diversity term keeps the mean target prediction from collapsing to one class
  (``adapt.diversity``). Its weight ramps up linearly over the first ``adapt.warmup_steps`` steps.
  It is off because the source head's confident target pseudo-labels are often wrong on a
  shifted target (confirmation bias): at ``data.strength=0.4`` it lowered the AUC on the new
  manipulations (docs/results.md), and on the default capture-shift target it raised the video
  AUC (1.000 vs 0.945) but lowered the video accuracy the per-domain statistics restore (0.844
  vs 0.906; source only 0.750). The ``pseudo_labels`` ablation variant keeps measuring it;
- model selection on the *source* validation split (target labels are never read);
- ablations: ``source_only`` (``adapt.domain_stats=false``: the same frozen backbone, a linear
  head on the source alone, source statistics everywhere) and ``pseudo_labels``
  (``adapt.target_weight=0.3``: the pseudo-label loss added).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from trustlab.methods.video import common as V
from trustlab.platform.registry import register_method


class LASTNet(nn.Module):
    def __init__(self, cfg: dict, stage: str):
        super().__init__()
        from timm.models.vision_transformer import Block

        m = cfg["method"]
        d = int(m["dim"])
        self.backbone = nn.Module()
        bb = self.backbone
        bb.frames = V.FrameTokens(m["cnn"], int(m["cnn_stage"]), d, m.get("weights"), cfg)
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
        # the transferable linear head, on features standardised by their domain's statistics
        self.domains = 1 + len(V.protocol(cfg)[1])  # source + each target of the protocol
        self.head = nn.Sequential(DomainStandardize(2 * d, self.domains), nn.Linear(2 * d, 1))
        V.load_transformer(self, cfg, prefix="backbone.")
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

    def forward(self, x: torch.Tensor, domain: torch.Tensor | None = None,
                update: torch.Tensor | None = None) -> torch.Tensor:
        """Head logits; ``domain`` (B,) picks each clip's standardisation (None = source) and, in
        training, the rows marked by ``update`` (B,) bool add to their domain's statistics first."""
        f = self.frozen_features(x)
        if self.training and update is not None and domain is not None and bool(update.any()):
            self.head[0].update(f[update], domain[update])
        return self.head[1](self.head[0](f, domain)).squeeze(-1)

    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                return self.features(x)
        return self.features(x)


class DomainStandardize(nn.Module):
    """Per-domain feature standardisation (domain-specific AdaBN, parameter-free): buffers hold
    each domain's running sum, sum of squares and count (float64) of the features it was
    ``update``d with; ``forward(f, domain)`` subtracts the row's domain mean and divides by its
    standard deviation. A domain with fewer than two rows seen uses the source's (domain 0)
    statistics; with none at all the map is the identity. Indices outside [0, domains) mean 0."""

    # pure sums of the rows each worker saw: the platform adds every worker's share (train.py)
    summed_buffers = ("total", "total_sq", "count")

    def __init__(self, dim: int, domains: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("total", torch.zeros(domains, dim, dtype=torch.float64))
        self.register_buffer("total_sq", torch.zeros(domains, dim, dtype=torch.float64))
        self.register_buffer("count", torch.zeros(domains, dtype=torch.float64))

    def _index(self, domain, n: int, device) -> torch.Tensor:
        if domain is None:
            return torch.zeros(n, dtype=torch.long, device=device)
        d = torch.as_tensor(domain, device=device).long().reshape(-1)
        return torch.where((d >= 0) & (d < len(self.count)), d, torch.zeros_like(d))

    @torch.no_grad()
    def update(self, f: torch.Tensor, domain) -> None:
        d = self._index(domain, len(f), f.device)
        f = f.detach().double()
        self.total.index_add_(0, d, f)
        self.total_sq.index_add_(0, d, f * f)
        self.count.index_add_(0, d, torch.ones(len(f), dtype=torch.float64, device=f.device))

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) per domain, (domains, dim) float64, fallbacks applied."""
        n = self.count.clamp_min(1).unsqueeze(1)
        mean = self.total / n
        var = (self.total_sq / n - mean * mean).clamp_min(0)
        seen = self.count > 1
        src_mean = mean[0] if seen[0] else torch.zeros_like(mean[0])
        src_var = var[0] if seen[0] else torch.ones_like(var[0])
        mean = torch.where(seen.unsqueeze(1), mean, src_mean)
        var = torch.where(seen.unsqueeze(1), var, src_var)
        return mean, (var + self.eps).sqrt()

    def forward(self, f: torch.Tensor, domain=None) -> torch.Tensor:
        mean, std = self.stats()
        d = self._index(domain, len(f), f.device)
        return (f - mean[d].to(f.dtype)) / std[d].to(f.dtype)


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
    unlabelled rows (y == -1). Target rows contribute through their images only. Each row is
    standardised by its domain's statistics (``batch["domain"]``; without that column, unlabelled
    rows count as domain 1); the clean views (source and clean target) update them, the strongly
    augmented target view does not. With ``adapt.domain_stats`` false every row is domain 0 and
    target clips join only through the pseudo-label loss."""
    a = cfg["method"]["adapt"]
    x, y = batch["x"], batch["y"]
    src, tgt = y >= 0, y == V.UNLABELLED
    per_domain = bool(a.get("domain_stats", True))
    dom = batch.get("domain")
    dom = (tgt.long() if dom is None else dom.long()) if per_domain else torch.zeros_like(y, dtype=torch.long)
    pseudo_on = bool(tgt.any()) and float(a["target_weight"]) > 0
    clean_t = bool(tgt.any()) and (pseudo_on or per_domain)  # target clips only for their stats or loss
    ns, nt = int(src.sum()), int(tgt.sum()) if clean_t else 0
    xs = V.augment_clip(x[src]) if model.training and a.get("augment", False) else x[src]
    views, doms = [xs], [dom[src]]
    if clean_t:
        views.append(x[tgt])
        doms.append(dom[tgt])
    if pseudo_on:
        views.append(strong_augment(x[tgt]) if model.training else x[tgt])
        doms.append(dom[tgt])
    if not sum(len(v) for v in views):  # only unlabelled clips that nothing uses here (source-only head)
        return {"loss": sum(p.sum() for p in model.head.parameters()) * 0.0}
    update = torch.zeros(sum(len(v) for v in views), dtype=torch.bool, device=x.device)
    update[: ns + nt] = True  # the clean views only
    logits = model(torch.cat(views), torch.cat(doms), update)
    out = {}
    # zero that keeps the graph: a shuffled batch may hold only unlabelled target clips (their
    # statistics still update), and the step must still be able to call backward
    loss = logits.sum() * 0.0
    if ns:
        ls = logits[:ns]
        out["source"] = F.binary_cross_entropy_with_logits(ls, y[src].float())
        out["source_acc"] = ((ls > 0).long() == y[src]).float().mean()
        loss = loss + out["source"]
    if pseudo_on:
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


def domain_of(cfg: dict, name) -> int:
    """Domain index of a protocol set name (0 = the source, i = the i-th target); None -> 0."""
    if name in (None, ""):
        return 0
    source, targets = V.protocol(cfg)
    if name == source:
        return 0
    if name not in targets:
        raise ValueError(f"set {name!r} is neither the source {source!r} nor a target {targets} of the protocol")
    return 1 + targets.index(name)


@register_method("last")
class LAST:
    modality = "video"
    sample_level = "clip"  # one score per clip of frames: metrics.json reports "clip" and "video" levels

    def stages(self, cfg: dict) -> list[str]:
        return ["pretrain_ssl", "adapt"]

    def stage_epochs(self, cfg: dict, stage: str) -> int:
        return V.stage_epochs(cfg, stage)

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
            tgt = V.mask_labels(data[k], domain_of(cfg, k.split(":", 1)[1]))
            if cap:  # a seeded random subset of each target's clips (same rows whatever the labels)
                tgt = V.subsample(tgt, int(cap) // len(names), int(cfg["seed"]) + i)
            train = V.concat_splits(train, tgt)
        return {"train": train, "val": data["val"]}

    def build_model(self, cfg: dict, stage: str) -> nn.Module:
        return LASTNet(cfg, stage)

    def configure_optimizer(self, model, cfg, stage, steps_per_epoch=None):
        return V.stage_adamw(model, cfg, stage)

    def loss_step(self, model, batch, stage, cfg, step=None):
        if stage == "pretrain_ssl":
            x = batch["x"]
            return ssl_losses(model, x, cfg)
        # the target-weight ramp counts this step too (1 at the first adapt step)
        return adapt_losses(model, batch, cfg, (step.done if step else 0) + (1 if model.training else 0))

    def predict(self, model, batch, cfg):
        """Scores; a ``domain`` column (target test splits carry one) picks the standardisation."""
        dom = batch.get("domain") if cfg["method"]["adapt"].get("domain_stats", True) else None
        return torch.sigmoid(model(batch["x"], dom))

    def after_train(self, cfg, model, data, run_dir):
        return V.video_report(self, cfg, model, data, run_dir)

    def serve_inputs(self, images: list, cfg: dict) -> dict:
        x = V.frames_to_clip(images, cfg)
        d = domain_of(cfg, cfg["method"]["adapt"].get("serve_domain"))  # adapt.serve_domain
        return {"x": x, "domain": torch.full((len(x),), d, dtype=torch.long)}


def bare_backbone(cfg: dict) -> nn.Module:
    """The timm CNN alone classifying frames (for benchmarks/gpu_step.py)."""
    import timm

    return timm.create_model(cfg["method"]["cnn"], pretrained=False, num_classes=1)

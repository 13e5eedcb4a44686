"""De-occlusion distillation — "Look Through Masks" (ACM MM 2020, arXiv 2409.12385) for masked-face
recognition.

From the paper's abstract: a GAN completes the face under the mask; a face-recognition teacher
pre-trained on ordinary faces distils its knowledge into a student trained on the *completed*
faces, using massive online-synthesised masked faces; the knowledge is the structural relations
among instances, in multiple orders.
From a third-party summary (``METHODS.md``): relations of order 1 (instances), 2 (pairs) and 3
(triplets); L1 reconstruction with global and local discriminators and contextual attention.
Our choices (none of them is known from the paper; all are config and several are in the Tune
space): the network sizes below, CosFace training of the teacher, non-saturating logistic GAN losses, the relation
definitions (below) and every weight.

Stages (each one Ray Train run; the best checkpoint of one initialises the next):

1. ``teacher`` (generic loop): a small CNN embedding network (``FaceNet``) trained on *unmasked*
   faces with a CosFace head (normalised softmax with additive cosine margin). Skipped when
   ``method.teacher.weights`` names a checkpoint (local path or ``s3://``).
2. ``completion`` (own loop, ``worker_loop_for``: alternating D and G updates): an encoder-decoder
   generator with a contextual-attention layer fills the masked region; a *global* discriminator
   sees the whole face, a *local* one a crop around the mask; loss = L1 (hole and valid parts
   weighted separately) + non-saturating adversarial loss + an identity-preservation loss
   (``completion.id_weight``: ``1 - cos`` between the frozen teacher's embeddings of the
   completed and the original face; our addition, a common ingredient of face-completion GANs).
   Without it the completion is a plausible but generic face; with it the fill carries the
   identity cues the teacher reads, predicted from the visible face, at the price of a blurrier
   fill (figures: docs/results.md). The masks leave most of the identity visible, so completion,
   which cannot add information the visible face lacks, gains most at low FAR.
3. ``student_nocomp`` (generic loop; ablation, ``method.ablation.enabled``): a student trained on the
   masked faces directly, with the same distillation, initialisation, budget, batches and the
   same synthetic mask on the same face at the same step (like-for-like).
4. ``student`` (generic loop): the student embeds *completed* masked faces and is distilled from
   the teacher's embeddings of the same faces *unmasked* with relational losses

   - order 1, instances: ``|s_i - t_i|^2`` on L2-normalised embeddings;
   - order 2, pairs: distances ``|e_i - e_j|`` divided by their batch mean (so the relation is
     invariant to a global scale, a translation and a rotation of the embedding space), matched
     with a smooth-L1 loss (the RKD distance loss of Park et al., CVPR 2019);
   - order 3, triplets: the cosine of the angle at ``e_j`` in every triplet ``(e_i, e_j, e_k)``
     (invariant to scale, translation and rotation), smooth-L1 (RKD angle loss).

   ``method.distill.orders`` (e.g. "123", "13") and the weights ``w1, w2, w3`` are config and Tune.
   Both students start from the teacher's weights (``student.init_from_teacher``).

Masks are synthesised online per batch (``trustlab.methods.deocclusion.masks``); the completion uses
the synthetic mask's binary map (known, as with the paper's synthetic masks; a mask segmenter
for real photos is not part of this module).

Evaluation (``evaluate``): open-set verification on *masked pairs* (both faces masked with
fixed per-image masks) of the test identities: accuracy at the threshold chosen on the val
pairs, TAR at FAR = 1e-2 (``method.eval.far``), ROC AUC and EER, for the student with completion
(the method), the teacher applied directly to masked faces (baseline), the student trained
without completion (ablation), plus the teacher on completed faces and the teacher on
unmasked faces (reference) — ``roc.png`` and ``completion_examples.png`` in the run folder.
Default data: ``trustlab.methods.deocclusion.synth_identities`` (seeded synthetic identities).
"""
from __future__ import annotations

import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from trustlab.methods.deocclusion import masks as masklib
from trustlab.platform import ablation
from trustlab.platform.evaluate import worker_threads
from trustlab.platform.method import Step
from trustlab.platform.registry import register_method
from trustlab.platform.train import LossSums

EVAL_MASK_SEED = 104729  # per-image eval masks use seed vid + this (fixed across runs and reloads)


# ----------------------------------------------------------------------------- networks
def _cbr(i, o, s=1):
    return [nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]


class FaceNet(nn.Module):
    """Face embedding CNN: 3 stride-2 stages, 4x4 spatial grid kept, linear embedding + BN."""

    def __init__(self, width: int = 32, embed_dim: int = 128, dropout: float = 0.1):
        super().__init__()
        w = int(width)
        self.features = nn.Sequential(*_cbr(3, w), *_cbr(w, 2 * w, 2), *_cbr(2 * w, 2 * w),
                                      *_cbr(2 * w, 4 * w, 2), *_cbr(4 * w, 4 * w), *_cbr(4 * w, 4 * w, 2),
                                      nn.AdaptiveAvgPool2d(4))
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(4 * w * 16, embed_dim)
        self.bn = nn.BatchNorm1d(embed_dim)

    def forward(self, x):
        f = self.features((x - 0.5) / 0.25).flatten(1)
        return self.bn(self.fc(self.drop(f)))


class CosFace(nn.Module):
    """Large-margin cosine loss (CosFace): logits ``s (cos - m [y])`` over normalised weights."""

    def __init__(self, n_classes: int, embed_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, embed_dim) * 0.01)

    def cosine(self, e):
        return F.normalize(e, dim=1) @ F.normalize(self.weight, dim=1).t()

    def loss(self, e, y, scale: float, margin: float):
        cos = self.cosine(e)
        logits = scale * (cos - margin * F.one_hot(y, cos.shape[1]).to(cos.dtype))
        return F.cross_entropy(logits, y), (cos.argmax(1) == y).float().mean()


class ContextualAttention(nn.Module):
    """Contextual attention (after Yu et al., CVPR 2018, written here from the description):
    every position compares its ``k x k`` feature patch with the patches at *known* positions
    (cosine similarity, softmax with ``scale``) and takes the attention-weighted mix of their
    features. Hole positions thus borrow features from visible parts of the same face."""

    def __init__(self, ksize: int = 3, scale: float = 10.0):
        super().__init__()
        self.k, self.scale = int(ksize), float(scale)

    def forward(self, f, hole):
        b, c, h, w = f.shape
        p = F.normalize(F.unfold(f, self.k, padding=self.k // 2), dim=1)  # (B, C k k, h w)
        score = torch.bmm(p.transpose(1, 2), p) * self.scale  # (B, query, key)
        known = hole.flatten(1) < 0.5  # (B, h w)
        score = score.masked_fill(~known[:, None, :], -1e4)
        attn = torch.softmax(score, dim=-1)
        out = torch.bmm(f.flatten(2), attn.transpose(1, 2)).view(b, c, h, w)
        return out, attn


def _conv(i, o, k=3, s=1, d=1):
    return nn.Sequential(nn.Conv2d(i, o, k, s, d * (k // 2), dilation=d), nn.ELU(inplace=True))


class Completion(nn.Module):
    """Encoder-decoder generator: input = masked face (hole zeroed) + hole map; a dilated-conv
    branch and a contextual-attention branch at 1/4 resolution, merged, decoded to RGB."""

    def __init__(self, width: int = 32, attention: bool = True, attention_scale: float = 10.0):
        super().__init__()
        w = int(width)
        self.enc = nn.Sequential(_conv(4, w, 5), _conv(w, 2 * w, 3, 2), _conv(2 * w, 4 * w, 3, 2), _conv(4 * w, 4 * w))
        self.dilated = nn.Sequential(_conv(4 * w, 4 * w, d=2), _conv(4 * w, 4 * w, d=4))
        self.use_attention = bool(attention)
        self.att_in = _conv(4 * w, 4 * w)
        self.attention = ContextualAttention(3, attention_scale)
        self.att_out = _conv(4 * w, 4 * w)
        self.merge = _conv(8 * w, 4 * w)
        self.dec = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), _conv(4 * w, 2 * w),
                                 nn.Upsample(scale_factor=2, mode="nearest"), _conv(2 * w, w), nn.Conv2d(w, 3, 3, 1, 1))

    def forward(self, xm, m):
        """Raw generator output (B x 3 x H x W in [0, 1]) for masked faces ``xm`` and hole ``m``."""
        f = self.enc(torch.cat([xm * (1 - m), m], dim=1))
        a = self.dilated(f)
        if self.use_attention:
            hole = F.adaptive_max_pool2d(m, f.shape[-2:])
            c, _ = self.attention(self.att_in(f), hole)
            c = self.att_out(c)
        else:
            c = torch.zeros_like(a)
        return torch.sigmoid(self.dec(self.merge(torch.cat([a, c], dim=1))))

    def complete(self, xm, m):
        """The completed face: known pixels kept, the hole filled by the generator."""
        return xm * (1 - m) + self(xm, m) * m


class PatchCritic(nn.Module):
    """Conv discriminator (DCGAN-style: strided convs, LeakyReLU, no normalisation); the score is
    the mean of a final conv map, so one module serves the whole face (global critic) and the
    crop around the mask (local critic)."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = int(width)
        self.net = nn.Sequential(nn.Conv2d(3, w, 4, 2, 1), nn.LeakyReLU(0.2, True),
                                 nn.Conv2d(w, 2 * w, 4, 2, 1), nn.LeakyReLU(0.2, True),
                                 nn.Conv2d(2 * w, 4 * w, 3, 1, 1), nn.LeakyReLU(0.2, True),
                                 nn.Conv2d(4 * w, 1, 3, 1, 1))

    def forward(self, x):
        return self.net(x - 0.5).mean(dim=(1, 2, 3))


class DeocclusionModel(nn.Module):
    """Everything the stages train, in one module so each stage's checkpoint carries it all."""

    def __init__(self, cfg: dict):
        super().__init__()
        m = cfg["method"]
        n, c = m["net"], m["completion"]
        n_ids = int(m["data"]["train_ids"])
        self.teacher = FaceNet(n["width"], n["embed_dim"], n.get("dropout", 0.1))
        self.teacher_head = CosFace(n_ids, int(n["embed_dim"]))
        self.generator = Completion(c["width"], bool(c["attention"]), float(c["attention_scale"]))
        self.d_global = PatchCritic(c["d_width"])
        self.d_local = PatchCritic(c["d_width"])
        self.student = FaceNet(n["width"], n["embed_dim"], n.get("dropout", 0.1))
        self.student_plain = FaceNet(n["width"], n["embed_dim"], n.get("dropout", 0.1))
        # 1 once student / student_plain have been initialised from the teacher (kept in checkpoints)
        self.register_buffer("initialised", torch.zeros(2))


# ----------------------------------------------------------------------------- relations
def parse_orders(orders) -> tuple[int, ...]:
    """"123" / 123 / [1, 2, 3] -> (1, 2, 3); only orders 1, 2 and 3 exist."""
    if isinstance(orders, (list, tuple)):
        out = tuple(int(o) for o in orders)
    else:
        out = tuple(int(ch) for ch in str(orders) if ch.strip() and ch not in ",+")
    if not out or any(o not in (1, 2, 3) for o in out):
        raise ValueError(f"distillation orders must be drawn from 1, 2, 3; got {orders!r}")
    return tuple(sorted(set(out)))


def relation_instance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Order 1: mean squared distance between matched student and teacher embeddings."""
    return (s - t).pow(2).sum(dim=1).mean()


def pair_distances(e: torch.Tensor, normalise: bool = True) -> torch.Tensor:
    """Pairwise Euclidean distances (B x B); divided by their off-diagonal mean if ``normalise``."""
    d = (e[:, None, :] - e[None, :, :]).pow(2).sum(-1).clamp_min(1e-12).sqrt()
    d = d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))
    if normalise:
        n = len(e)
        d = d / (d.sum() / max(1, n * (n - 1))).clamp_min(1e-8)
    return d


def relation_pairwise(s: torch.Tensor, t: torch.Tensor, normalise: bool = True) -> torch.Tensor:
    """Order 2: smooth-L1 between the student's and the teacher's pairwise-distance matrices."""
    with torch.no_grad():
        dt = pair_distances(t, normalise)
    return F.smooth_l1_loss(pair_distances(s, normalise), dt)


def triplet_angles(e: torch.Tensor) -> torch.Tensor:
    """``a[j, i, k]`` = cosine of the angle at ``e_j`` between ``e_i`` and ``e_k`` (B x B x B)."""
    v = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # v[j, i] = unit(e_i - e_j)
    return torch.bmm(v, v.transpose(1, 2))


def relation_angle(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Order 3: smooth-L1 between the student's and the teacher's triplet angles."""
    with torch.no_grad():
        at = triplet_angles(t)
    return F.smooth_l1_loss(triplet_angles(s), at)


def distill_loss(s: torch.Tensor, t: torch.Tensor, dcfg: dict) -> dict:
    """Weighted sum of the configured relation orders on L2-normalised embeddings."""
    s, t = F.normalize(s, dim=1), F.normalize(t.detach(), dim=1)
    orders = parse_orders(dcfg["orders"])
    parts = {}
    if 1 in orders:
        parts["rel1"] = relation_instance(s, t) * float(dcfg["w1"])
    if 2 in orders:
        parts["rel2"] = relation_pairwise(s, t, bool(dcfg.get("normalise_distances", True))) * float(dcfg["w2"])
    if 3 in orders:
        parts["rel3"] = relation_angle(s, t) * float(dcfg["w3"])
    parts["loss"] = sum(parts.values())
    return parts


# ----------------------------------------------------------------------------- verification
def verification_pairs(y: np.ndarray, seed: int):
    """All same-identity pairs, all different-identity pairs, and a seeded balanced subset of the
    latter (as many negatives as positives) for the accuracy figure."""
    y = np.asarray(y)
    i, j = np.triu_indices(len(y), k=1)
    same = y[i] == y[j]
    pos = np.stack([i[same], j[same]], 1)
    neg = np.stack([i[~same], j[~same]], 1)
    rng = np.random.default_rng(seed)
    bal = neg[rng.choice(len(neg), size=min(len(neg), len(pos)), replace=False)] if len(pos) else neg[:0]
    return pos, neg, bal


def best_threshold(pos_s: np.ndarray, neg_s: np.ndarray) -> float:
    """The similarity threshold with the highest balanced-pair accuracy (midpoints of sorted scores)."""
    s = np.concatenate([pos_s, neg_s])
    y = np.concatenate([np.ones(len(pos_s)), np.zeros(len(neg_s))])
    o = np.argsort(s)
    s, y = s[o], y[o]
    # accepting everything above index k: correct = negatives below + positives at/above
    neg_below = np.concatenate([[0], np.cumsum(1 - y)])
    pos_above = len(pos_s) - np.concatenate([[0], np.cumsum(y)])
    acc = (neg_below + pos_above) / len(y)
    k = int(np.argmax(acc))
    if k == 0:
        return float(s[0] - 1e-6)
    if k == len(s):
        return float(s[-1] + 1e-6)
    return float((s[k - 1] + s[k]) / 2)


def _unit(emb: np.ndarray) -> np.ndarray:
    # float64: numpy's float32 reductions can differ in the last bit with the arrays' memory
    # alignment, which would make the figures depend on the process that computes them
    emb = np.asarray(emb, dtype=np.float64)
    return emb / np.maximum(np.sqrt((emb * emb).sum(axis=1, keepdims=True)), 1e-12)


def verification_metrics(emb: np.ndarray, y: np.ndarray, seed: int = 0, far: float = 1e-2,
                         threshold: float | None = None, gallery: np.ndarray | None = None) -> dict:
    """Accuracy (balanced pairs; at ``threshold``, or at the best threshold when None), TAR at
    ``far`` (all negative pairs), ROC AUC and EER (all pairs) for cosine similarity. With
    ``gallery`` (embeddings of the same images another way, e.g. unmasked), each pair compares
    the first image's ``emb`` (the probe) with the second's ``gallery``."""
    from trustlab.platform.metrics import eer as eer_fn
    from sklearn.metrics import roc_auc_score

    e = _unit(emb)
    g = e if gallery is None else _unit(gallery)
    pos, neg, bal = verification_pairs(y, seed)
    sim = lambda p: np.einsum("nd,nd->n", e[p[:, 0]], g[p[:, 1]])  # noqa: E731
    ps, ns, bs = sim(pos), sim(neg), sim(bal)
    thr = best_threshold(ps, bs) if threshold is None else float(threshold)
    acc = (np.sum(ps >= thr) + np.sum(bs < thr)) / max(1, len(ps) + len(bs))
    k = int(math.ceil((1 - far) * len(ns))) - 1
    far_thr = np.sort(ns)[min(max(k, 0), len(ns) - 1)] if len(ns) else 1.0
    labels = np.concatenate([np.ones(len(ps)), np.zeros(len(ns))])
    scores = np.concatenate([ps, ns])
    return {"acc": float(acc), f"tar@far={far:g}": float(np.mean(ps > far_thr)),
            "auc": float(roc_auc_score(labels, scores)), "eer": float(eer_fn(labels, scores)),
            "threshold": float(thr), "n_pos": int(len(ps)), "n_neg": int(len(ns))}


# ----------------------------------------------------------------------------- embedding helpers
def _bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


def eval_masks(x: torch.Tensor, lm: torch.Tensor, vid, cfg: dict):
    """Fixed masks for evaluation: one seed per image id."""
    masked, m, _ = masklib.synthesize(x, lm, np.asarray(vid) + EVAL_MASK_SEED, cfg["method"]["masks"], per_item=True)
    return masked, m


SYSTEMS = {  # name -> (network, input)
    "student_completed": ("student", "completed"),
    "teacher_masked": ("teacher", "masked"),
    "student_nocomp_masked": ("student_plain", "masked"),
    "teacher_completed": ("teacher", "completed"),
    "teacher_unmasked": ("teacher", "unmasked"),
    "student_unmasked": ("student", "unmasked"),
    "student_nocomp_unmasked": ("student_plain", "unmasked"),
}
#: masked-probe-vs-unmasked-gallery protocol: each probe system's gallery (the same network, unmasked faces)
GALLERY = {"student_completed": "student_unmasked", "teacher_masked": "teacher_unmasked",
           "student_nocomp_masked": "student_nocomp_unmasked", "teacher_completed": "teacher_unmasked"}


@torch.no_grad()
def embed_split(model: DeocclusionModel, arrays: dict, cfg: dict, systems, batch_size: int = 256,
                device="cpu", indices=None) -> dict:
    """Embeddings of a split (or the rows ``indices``) for each named system; plus ``y``, ``vid``
    and the mean absolute completion error inside the hole (``hole_l1``)."""
    model.eval()
    n = len(arrays["y"]) if indices is None else len(indices)
    idx_all = np.arange(len(arrays["y"])) if indices is None else np.asarray(indices)
    out = {s: [] for s in systems}
    l1_sum, l1_cnt = 0.0, 0.0
    for s0 in range(0, n, batch_size):
        idx = idx_all[s0 : s0 + batch_size]
        x = torch.from_numpy(np.asarray(arrays["x"][idx])).float().div(255).to(device)
        lm = torch.from_numpy(np.asarray(arrays["lm"][idx])).float().to(device)
        xm, m = eval_masks(x, lm, arrays["vid"][idx], cfg)
        inputs = {"unmasked": x, "masked": xm}
        if any(SYSTEMS[s][1] == "completed" for s in systems if s in SYSTEMS) or "hole_l1" in systems:
            xc = model.generator.complete(xm, m)
            inputs["completed"] = xc
            l1_sum += float(((xc - x).abs() * m).sum())
            l1_cnt += float(m.sum()) * 3
        for s in systems:
            if s in SYSTEMS:
                net, inp = SYSTEMS[s]
                out[s].append(getattr(model, net)(inputs[inp]).cpu().numpy())
    res = {s: np.concatenate(v) for s, v in out.items() if s in SYSTEMS and v}
    res["y"] = np.asarray(arrays["y"])[idx_all]
    res["vid"] = np.asarray(arrays["vid"])[idx_all]
    res["hole_l1"] = (l1_sum, l1_cnt)
    return res


def _gathered(parts: list) -> dict:
    """Concatenate per-rank ``embed_split`` results, ordered by image id (shard-independent)."""
    out = {}
    keys = [k for k in parts[0] if k != "hole_l1"]
    for k in keys:
        out[k] = np.concatenate([p[k] for p in parts])
    o = np.argsort(out["vid"], kind="stable")
    out = {k: v[o] for k, v in out.items()}
    s = sum(p["hole_l1"][0] for p in parts)
    c = sum(p["hole_l1"][1] for p in parts)
    out["hole_l1"] = s / max(c, 1.0)
    return out


STAGE_VAL = {  # stage -> (system whose masked-pair accuracy is val_score, other systems to report)
    "teacher": ("teacher_unmasked", ("teacher_masked",)),
    "completion": ("teacher_completed", ()),
    "student_nocomp": ("student_nocomp_masked", ()),
    "student": ("student_completed", ()),
}


def val_metrics(model, stage, cfg, shard: dict, ctx) -> dict:
    """Validation of a stage on this rank's ``shard`` of the val split, gathered over ranks
    (``ctx``: the WorkerContext): masked-pair (or, for the teacher, unmasked-pair) verification
    of the stage's system."""
    main, extra = STAGE_VAL[stage]
    systems = (main,) + tuple(extra)
    part = embed_split(model, shard, cfg, list(systems) + (["hole_l1"] if stage == "completion" else []),
                       int(cfg["trainer"]["eval_batch_size"]), ctx.device)
    allp = _gathered(ctx.gather(part))
    far = float(cfg["method"]["eval"]["far"])
    out = {}
    for s in systems:
        m = verification_metrics(allp[s], allp["y"], int(cfg["seed"]), far)
        out[f"val_{s}_acc"] = m["acc"]
        out[f"val_{s}_tar"] = m[f"tar@far={far:g}"]
    out["val_acc"] = out[f"val_{main}_acc"]
    out["val_tar"] = out[f"val_{main}_tar"]
    out["val_score"] = out["val_acc"]
    if stage == "completion":
        out["val_hole_l1"] = allp["hole_l1"]
        if cfg["method"]["completion"]["select"] == "l1":
            out["val_score"] = -allp["hole_l1"]
    return out


# ----------------------------------------------------------------------------- completion stage loop
def local_crops(x: torch.Tensor, m: torch.Tensor, frac: float) -> torch.Tensor:
    """Square crops (side ``frac`` x image side) centred on each mask's centroid, kept inside."""
    b, _, h, w = x.shape
    c = max(8, int(round(frac * min(h, w))))
    ys = torch.arange(h, device=x.device, dtype=x.dtype)
    xs = torch.arange(w, device=x.device, dtype=x.dtype)
    mass = m[:, 0].sum(dim=(1, 2)).clamp_min(1.0)
    cy = (m[:, 0].sum(2) * ys).sum(1) / mass
    cx = (m[:, 0].sum(1) * xs).sum(1) / mass
    y0 = (cy - c / 2).round().clamp(0, h - c).long()
    x0 = (cx - c / 2).round().clamp(0, w - c).long()
    return torch.stack([x[i, :, y0[i] : y0[i] + c, x0[i] : x0[i] + c] for i in range(b)])


def gan_losses(model: DeocclusionModel, x, xm, m, ccfg: dict, part: str) -> dict:
    """``part="d"``: logistic loss of both critics (real = original face, fake = completion);
    ``part="g"``: L1 (hole and valid parts) + non-saturating adversarial loss of the generator
    (``softplus(-D(fake))``: its gradient stays bounded whatever the critics' output scale)."""
    frac = float(ccfg["local_crop"])
    if part == "d":
        with torch.no_grad():
            fake = model.generator.complete(xm, m)
        d_real = F.softplus(-model.d_global(x)).mean() + F.softplus(-model.d_local(local_crops(x, m, frac))).mean()
        d_fake = F.softplus(model.d_global(fake)).mean() + F.softplus(model.d_local(local_crops(fake, m, frac))).mean()
        return {"loss": d_real + d_fake, "d_real": d_real, "d_fake": d_fake}
    raw = model.generator(xm, m)
    fake = xm * (1 - m) + raw * m
    err = (raw - x).abs()
    hole = (err * m).sum() / (m.sum() * 3).clamp_min(1.0)
    valid = (err * (1 - m)).sum() / ((1 - m).sum() * 3).clamp_min(1.0)
    adv = F.softplus(-model.d_global(fake)).mean() + F.softplus(-model.d_local(local_crops(fake, m, frac))).mean()
    loss = float(ccfg["l1_hole"]) * hole + float(ccfg["l1_valid"]) * valid + float(ccfg["adv_weight"]) * adv
    out = {"loss": loss, "l1_hole": hole, "l1_valid": valid, "adv": adv}
    w_id = float(ccfg.get("id_weight", 0.0))
    if w_id > 0:
        out["id"] = identity_loss(model.teacher, x, fake)
        out["loss"] = loss + w_id * out["id"]
    return out


def identity_loss(teacher: nn.Module, x: torch.Tensor, completed: torch.Tensor) -> torch.Tensor:
    """Identity preservation of the completion: ``1 - cos(teacher(completed), teacher(original))``
    with the frozen teacher (its gradient reaches the generator only). L1 + adversarial losses
    ask for a plausible face; this asks for *the same person* in the teacher's embedding, i.e.
    for the lower-face cues the teacher reads, predicted from the visible face."""
    with torch.no_grad():
        t = F.normalize(teacher(x), dim=1)
    return (1 - (F.normalize(teacher(completed), dim=1) * t).sum(1)).mean()


def completion_worker_loop(config: dict) -> None:
    """Ray Train loop of the ``completion`` stage (``completion_epochs`` on this worker's context)."""
    from trustlab.platform.train import WorkerContext

    completion_epochs(WorkerContext.from_ray(config))


def completion_epochs(ctx) -> nn.Module:
    """The ``completion`` stage on a WorkerContext: per batch one critic update, then one
    generator update, each through the context's step (``trainer.precision`` autocast, the
    gradients of that optimizer's parameters all-reduced across workers while backward runs)."""
    cfg, stage, seed, rank = ctx.cfg, ctx.stage, ctx.seed, ctx.rank
    ccfg = cfg["method"]["completion"]
    model = ctx.prepare(ctx.build_model(to_device=False))
    model.teacher.requires_grad_(False)  # frozen: the identity loss trains the generator only
    g_params = list(model.generator.parameters())
    d_params = list(model.d_global.parameters()) + list(model.d_local.parameters())
    opts = {"g": torch.optim.Adam(g_params, lr=float(ccfg["lr_g"]), betas=(0.5, 0.9)),
            "d": torch.optim.Adam(d_params, lr=float(ccfg["lr_d"]), betas=(0.5, 0.9))}
    start = ctx.restore(model, opts)
    losses = ctx.compiled(gan_losses)
    for epoch in range(start, ctx.epochs):
        t0 = time.time()
        model.generator.train(), model.d_global.train(), model.d_local.train()
        model.teacher.eval()
        sums = LossSums()
        for b in ctx.batches(epoch):
            x, lm = b["x"], b["lm"].float()
            xm, m, _ = masklib.synthesize(x, lm, [seed, rank, epoch, sums.steps, 1], cfg["method"]["masks"])
            with ctx.autocast():
                d = losses(model, x, xm, m, ccfg, "d")
            opts["d"].zero_grad(set_to_none=True)
            ctx.backward(d["loss"], opts["d"])
            ctx.optimizer_step(opts["d"])
            with ctx.autocast():
                g = losses(model, x, xm, m, ccfg, "g")
            opts["g"].zero_grad(set_to_none=True)
            ctx.backward(g["loss"], opts["g"])
            ctx.optimizer_step(opts["g"])
            ctx.done += 1
            sums.add({**{f"d_{k}": v for k, v in d.items()}, **{f"g_{k}": v for k, v in g.items()}})
        steps = sums.steps
        metrics = {f"train_{k}": v for k, v in sums.means().items()}
        train_time = time.time() - t0

        metrics["train_loss"] = metrics.get("train_g_loss", float("nan"))
        metrics.update(val_metrics(model, stage, cfg, ctx.shard("val"), ctx))
        metrics.update(steps=steps, train_seconds=train_time)
        ctx.log(f"epoch {epoch + 1}/{ctx.epochs} {train_time:.1f}s: "
                f"g_l1_hole {metrics.get('train_g_l1_hole', float('nan')):.4f} adv {metrics.get('train_g_adv', float('nan')):.3f} "
                f"d {metrics.get('train_d_loss', float('nan')):.3f} | val_hole_l1 {metrics['val_hole_l1']:.4f} "
                f"val teacher-on-completed acc {metrics['val_acc']:.4f}")
        ctx.report(metrics, model, opts, epoch=epoch + 1)
    return model


def mask_seed(cfg: dict, step: Step) -> list:
    """The training masks' seed. Stage-independent: both students see the same mask on the same
    face at the same step (a like-for-like ablation); the teacher stage draws no masks."""
    return [int(cfg["seed"]), step.rank, step.done, 2]


# ----------------------------------------------------------------------------- the method
@register_method("deocclusion")
class Deocclusion:
    modality = "face"

    def stages(self, cfg: dict) -> list[str]:
        m = cfg["method"]
        st = [] if m["teacher"].get("weights") else ["teacher"]
        st.append("completion")
        if ablation.enabled(cfg):
            st.append("student_nocomp")
        return st + ["student"]

    def stage_epochs(self, cfg: dict, stage: str) -> int:
        key = "student" if stage.startswith("student") else stage
        return int(cfg["method"][key]["epochs"])

    def stage_data(self, cfg: dict, stage: str, data: dict) -> dict:
        return {k: v for k, v in data.items() if k in ("train", "val")}

    def worker_loop_for(self, stage: str):
        return completion_worker_loop if stage == "completion" else None

    def build_data(self, cfg: dict) -> dict:
        from trustlab.methods.deocclusion.synth_identities import build_identity_set

        if cfg["data"]["name"] == "faces":  # real faces: a manifest, or LFW with pairs.txt
            from trustlab.methods.deocclusion.real_faces import face_data

            data = face_data(cfg)
            cfg["method"]["data"]["train_ids"] = int(len(np.unique(data["train"]["y"])))  # the teacher's classes
            return data
        if cfg["data"]["name"] != "auto":
            raise ValueError(f"deocclusion reads data=auto (generated identities) or data=faces, not {cfg['data']['name']}")
        d = cfg["method"]["data"]
        return build_identity_set(d["root"], int(cfg["seed"]), int(d["size"]), int(d["train_ids"]),
                                  int(d["val_ids"]), int(d["test_ids"]), int(d["per_id_train"]), int(d["per_id_eval"]))

    def manifest(self, cfg: dict):
        """``data=faces``: the face manifest (label = identity index) for mode=inspect."""
        if cfg["data"]["name"] != "faces":
            return None
        from trustlab.methods.deocclusion.real_faces import face_manifest

        return face_manifest(cfg)[0]

    def build_model(self, cfg: dict, stage: str) -> nn.Module:
        model = DeocclusionModel(cfg)
        w = cfg["method"]["teacher"].get("weights")
        if w:
            from trustlab.platform.weights import load_into, local_file, read_state_dict

            if any(k.startswith("teacher.") for k in read_state_dict(local_file(w, cfg))):  # a deocclusion checkpoint
                load_into(model, w, cfg, include=("teacher.", "teacher_head."), what="the de-occlusion teacher")
            else:  # a bare FaceNet state dict
                load_into(model.teacher, w, cfg, what="the de-occlusion teacher")
        return model

    def configure_optimizer(self, model, cfg, stage, steps_per_epoch=None):
        m = cfg["method"]
        if stage == "teacher":
            params = list(model.teacher.parameters()) + list(model.teacher_head.parameters())
            lr = float(m["teacher"]["lr"])
        else:
            params = list((model.student if stage == "student" else model.student_plain).parameters())
            lr = float(m["student"]["lr"])
        return torch.optim.AdamW(params, lr=lr, weight_decay=float(cfg["trainer"]["weight_decay"]))

    def loss_step(self, model, batch, stage, cfg, step=None):
        m = cfg["method"]
        x, y = batch["x"], batch["y"]
        if stage == "teacher":
            e = model.teacher(x)
            loss, acc = model.teacher_head.loss(e, y, float(m["teacher"]["scale"]), float(m["teacher"]["margin"]))
            return {"loss": loss, "acc": acc}
        which = "student" if stage == "student" else "student_plain"
        net = getattr(model, which)
        k = 0 if which == "student" else 1
        if model.initialised[k] < 0.5:
            if _bool(m["student"]["init_from_teacher"]):
                net.load_state_dict(model.teacher.state_dict())
            model.initialised[k] = 1.0
        model.teacher.eval()
        model.generator.eval()
        with torch.no_grad():
            te = model.teacher(x)
            xm, hole, _ = masklib.synthesize(x, batch["lm"], mask_seed(cfg, step or Step()), m["masks"])
            inp = model.generator.complete(xm, hole) if stage == "student" else xm
        se = net(inp)
        out = distill_loss(se, te, m["distill"])
        cw = float(m["student"].get("ce_weight", 0.0))
        if cw > 0:
            cos = F.normalize(se, dim=1) @ F.normalize(model.teacher_head.weight.detach(), dim=1).t()
            logits = float(m["teacher"]["scale"]) * (cos - float(m["teacher"]["margin"]) * F.one_hot(y, cos.shape[1]))
            out["ce"] = F.cross_entropy(logits, y) * cw
            out["loss"] = out["loss"] + out["ce"]
        return out

    def validate(self, model, stage, cfg, batches, ctx):
        parts = list(batches)  # this rank's share of the val split
        shard = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}
        return val_metrics(model, stage, cfg, shard, ctx)

    def predict(self, model, batch, cfg):
        """Verification scores for pairs: cosine similarity of the student's embeddings of the
        completed faces ``x`` and ``x2`` (with landmarks ``lm``/``lm2`` and mask maps ``m``/``m2``
        when the faces are masked; without mask maps the faces are embedded as they are)."""
        if "x2" not in batch:
            raise ValueError("deocclusion.predict scores face pairs: the batch needs x and x2")

        def emb(x, m):
            if m is not None:
                x = model.generator.complete(x, m)
            return F.normalize(model.student(x), dim=1)

        return (emb(batch["x"], batch.get("m")) * emb(batch["x2"], batch.get("m2"))).sum(1)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, cfg: dict, model, data: dict, run_dir: str) -> dict:
        with worker_threads(cfg):
            return self._evaluate(cfg, model, data, run_dir)

    def _evaluate(self, cfg: dict, model, data: dict, run_dir: str) -> dict:
        m = cfg["method"]
        far = float(m["eval"]["far"])
        tar_key = f"tar@far={far:g}"
        systems = [s for s in SYSTEMS if not s.startswith("student_nocomp") or ablation.enabled(cfg)]
        bs = int(cfg["trainer"]["eval_batch_size"])
        emb = {split: _gathered([embed_split(model, data[split], cfg, systems + ["hole_l1"], bs)])
               for split in ("val", "test")}
        seed = int(cfg["seed"])
        res = {}
        for s in systems:
            v = verification_metrics(emb["val"][s], emb["val"]["y"], seed, far)
            te = verification_metrics(emb["test"][s], emb["test"]["y"], seed, far, threshold=v["threshold"])
            te["acc_best_threshold"] = verification_metrics(emb["test"][s], emb["test"]["y"], seed, far)["acc"]
            res[s] = {"val": v, "test": te}
        probe_gallery = {}  # masked probe vs unmasked gallery, beside masked vs masked
        for s, gal in GALLERY.items():
            if s in systems and gal in systems:
                v = verification_metrics(emb["val"][s], emb["val"]["y"], seed, far, gallery=emb["val"][gal])
                te = verification_metrics(emb["test"][s], emb["test"]["y"], seed, far, threshold=v["threshold"],
                                          gallery=emb["test"][gal])
                probe_gallery[s] = {"val": v, "test": te}
        main = res["student_completed"]
        metrics = {
            "val": {"masked_pairs": main["val"]},
            "test": {"masked_pairs": main["test"]},
            "baselines": {"teacher_masked": {"test": {"masked_pairs": res["teacher_masked"]["test"]},
                                             "val": {"masked_pairs": res["teacher_masked"]["val"]}},
                          "teacher_unmasked_reference": {"test": {"unmasked_pairs": res["teacher_unmasked"]["test"]},
                                                         "val": {"unmasked_pairs": res["teacher_unmasked"]["val"]}}},
            "ablation": {"teacher_on_completed": {"test": {"masked_pairs": res["teacher_completed"]["test"]},
                                                  "val": {"masked_pairs": res["teacher_completed"]["val"]}}},
            "completion": {"val": {"hole_l1": emb["val"]["hole_l1"]}, "test": {"hole_l1": emb["test"]["hole_l1"]}},
            "masked_probe_unmasked_gallery": {s: {"test": r["test"], "val": r["val"]} for s, r in probe_gallery.items()},
        }
        metrics["test"]["masked_probe_unmasked_gallery"] = probe_gallery["student_completed"]["test"]
        if "pairs" in data:  # LFW's pairs.txt: 10-fold accuracy, mean and std, for both protocols
            from trustlab.methods.deocclusion.real_faces import fold_accuracy

            p = data["pairs"]

            def folds(probe, gallery):
                a, b = _unit(emb["test"][probe]), _unit(emb["test"][gallery])
                return fold_accuracy(np.einsum("nd,nd->n", a[p["a"]], b[p["b"]]), p["same"], p["fold"])

            probes = [s for s in GALLERY if s in systems]
            metrics["test"]["lfw_pairs"] = {
                "masked_pairs": {s: folds(s, s) for s in probes},
                "masked_probe_unmasked_gallery": {s: folds(s, GALLERY[s]) for s in probes if GALLERY[s] in systems},
                "unmasked_pairs": {"teacher_unmasked": folds("teacher_unmasked", "teacher_unmasked")}}
        if "student_nocomp_masked" in res:
            r = res["student_nocomp_masked"]
            metrics["ablation"]["student_no_completion"] = {"test": {"masked_pairs": r["test"]},
                                                            "val": {"masked_pairs": r["val"]}}
        # plots
        try:
            self._plots(cfg, model, data, emb, res, run_dir)
        except Exception as e:  # plots are a convenience; never lose the metrics over them
            print(f"[deocclusion] plotting failed: {e}", flush=True)
        rows = [("student + completion (method)", "student_completed"), ("teacher on masked (baseline)", "teacher_masked"),
                ("student w/o completion (ablation)", "student_nocomp_masked"),
                ("teacher on completed", "teacher_completed"), ("teacher on unmasked (reference)", "teacher_unmasked")]
        lines = [f"deocclusion — masked-pair verification on {emb['test']['y'].size} test faces of "
                 f"{len(np.unique(emb['test']['y']))} unseen identities (threshold from val)"]
        for label, s in rows:
            if s in res:
                r = res[s]["test"]
                lines.append(f"  {label:<36} acc {r['acc']:.4f}  {tar_key} {r[tar_key]:.4f}  auc {r['auc']:.4f}  eer {r['eer']:.4f}")
        lines.append(f"  completion hole L1 (test): {emb['test']['hole_l1']:.4f}")
        lines.append("  masked probe vs unmasked gallery (test): " + ", ".join(
            f"{s} acc {r['test']['acc']:.4f}" for s, r in probe_gallery.items()))
        for proto, per in (metrics["test"].get("lfw_pairs") or {}).items():
            lines.append(f"  LFW pairs.txt {proto} (10-fold): " + ", ".join(
                f"{s} {r['acc_mean']:.4f} ± {r['acc_std']:.4f}" for s, r in per.items()))
        text = "\n".join(lines)
        print(text, flush=True)
        with open(os.path.join(run_dir, "verification.txt"), "w") as f:
            f.write(text + "\n")
        return metrics

    def _plots(self, cfg, model, data, emb, res, run_dir):
        from trustlab.platform.plots import roc_plot

        curves = {}
        for s in res:
            e = emb["test"][s]
            e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
            pos, neg, _ = verification_pairs(emb["test"]["y"], int(cfg["seed"]))
            sims = np.concatenate([np.einsum("nd,nd->n", e[pos[:, 0]], e[pos[:, 1]]),
                                   np.einsum("nd,nd->n", e[neg[:, 0]], e[neg[:, 1]])])
            curves[s] = (np.concatenate([np.ones(len(pos)), np.zeros(len(neg))]), sims)
        roc_plot(curves, os.path.join(run_dir, "roc.png"), title="masked-pair verification (test)")
        # completion examples: original / masked / completed, 8 test faces
        from PIL import Image

        te = data["test"]
        idx = np.linspace(0, len(te["y"]) - 1, 8).astype(int)
        x = torch.from_numpy(np.asarray(te["x"][idx])).float().div(255)
        lm = torch.from_numpy(np.asarray(te["lm"][idx])).float()
        with torch.no_grad():
            xm, mm = eval_masks(x, lm, te["vid"][idx], cfg)
            xc = model.generator.complete(xm, mm)
        rows = [torch.cat(list(r), dim=2) for r in (x, xm, xc)]
        grid = (torch.cat(rows, dim=1).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(
            os.path.join(run_dir, "completion_examples.png"))

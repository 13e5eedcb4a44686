"""ITEM — hierarchical Image-Text Misalignment (arXiv 2511.00427) for generated-image detection.

From the paper's abstract: fake images align worse with their captions than real images; the
misalignment is measured in a pre-trained CLIP space, first for the whole image and caption,
then for each semantic object described in the caption; an MLP head classifies these clues.

Our choices (nothing else of the paper is public; METHODS.md):

- CLIP is an ``open_clip`` model. ``method.clip.model`` names a built-in open_clip architecture,
  ``method.clip.overrides`` replaces parts of its config (the default makes a tiny ViT CLIP for
  64 px images that trains on 2 CPUs), ``method.clip.pretrained`` is a local path or ``s3://``
  URI of its weights, or null for random init. Nothing is ever downloaded: built-in pretrained
  tags are refused. Text goes through open_clip's own BPE tokenizer (its vocabulary ships with
  the package).
- Stage ``clip_pretrain`` (skipped when weights are given) trains the CLIP on the *real* half of
  the training split only, so that alignment means something: the CLIP contrastive loss on
  (image, caption) pairs plus two phrase-level terms, contrastive losses between the batch's
  distinct object phrases and the images' global embeddings, and between the phrases and each
  image's best-matching patch token (FILIP-style max over tokens). A phrase is a positive for an
  image when the image's caption contains it; in both directions every positive must outscore
  all negatives, so no described object can be ignored. The phrase terms are our choice; they
  give the per-object similarities something to measure at this tiny scale.
- Stage ``head`` freezes the CLIP and trains an MLP on the misalignment features of each
  (image, caption) pair. Levels (``method.levels``, "+"-joined):
    ``global``: cos(image, caption);
    ``image``:  min / mean / max / std over the caption's object phrases of cos(image, phrase);
    ``patch``:  the same statistics of max over patch tokens of cos(patch, phrase).
  ``levels=global`` is the global-only ablation; ``global+image+patch`` the hierarchical default.
- Object phrases come from ``extract_phrases`` (a deterministic chunker, no model). Captions come
  from the manifest's ``caption`` column, or from a pluggable captioner (``method.captioner``,
  rule-based default for the generated scenes) where a caption is missing.
- Serving: ``serve_inputs(images, cfg, captions=None)``. A request passes the prompt/caption the
  image claims to show (one string per image; ``captions=`` or an ``(image, caption)`` pair /
  ``{"image", "caption"}`` dict per item, or ``method.serve_caption`` in the config for every
  image). Without one, the configured captioner describes the image itself.

Default data: ``trustlab.methods.item.captioned_scenes`` (shapes with colours; fakes contradict
their caption in one object's colour or shape: barely visible globally, clear locally).
``after_train`` adds, on the same frozen CLIP, a global-only and a hierarchical head trained on
the same features (``metrics.json["ablation"]``, with AUC per kind of local mismatch), a feature
scatter plot, and writes the CLIP weights to ``<run>/clip.pt`` (reusable as
``method.clip.pretrained`` to sweep only the head).
"""
from __future__ import annotations

import copy
import functools
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from trustlab.platform.method import to_batch
from trustlab.platform.registry import register_method

LEVELS = ("global", "image", "patch")
STATS = ("min", "mean", "max", "std")


# ----------------------------------------------------------------------------- CLIP
def build_clip(ccfg: dict, cfg: dict | None = None) -> nn.Module:
    """An open_clip model from ``{model, pretrained, overrides}``; weights from a local file or
    s3:// (.safetensors or torch), loaded strictly by trustlab.platform.weights; never downloads."""
    from trustlab.platform.weights import create_open_clip

    overrides = copy.deepcopy(ccfg.get("overrides") or {})
    model = create_open_clip(ccfg["model"], ccfg.get("pretrained"), cfg, **overrides)
    if not hasattr(model, "visual") or not hasattr(model.visual, "output_tokens"):
        raise ValueError(f"open_clip model {ccfg['model']!r} has no ViT image tower with patch tokens")
    model.visual.output_tokens = True  # visual(x) -> (pooled, tokens)
    return model


def context_length(ccfg: dict) -> int:
    import open_clip

    tcfg = dict((open_clip.get_model_config(ccfg["model"]) or {}).get("text_cfg", {}))
    tcfg.update((ccfg.get("overrides") or {}).get("text_cfg", {}) or {})
    if tcfg.get("hf_tokenizer_name"):
        raise ValueError("Hugging Face tokenizers need a download; use a CLIP with open_clip's BPE tokenizer")
    return int(tcfg.get("context_length", 77))


def tokenizer(ccfg: dict):
    return _tokenizer(context_length(ccfg))


@functools.lru_cache(maxsize=4)
def _tokenizer(length: int):
    import open_clip

    return open_clip.SimpleTokenizer(context_length=length)


def tokenize_captions(captions, ccfg: dict, max_phrases: int) -> dict:
    """Captions -> ``tokens`` [N, L], ``phrase_tokens`` [N, P, L] int64, ``phrase_mask`` [N, P]
    bool (P = ``max_phrases``). A caption without any phrase uses itself as its one phrase."""
    from trustlab.methods.item.captioned_scenes import extract_phrases

    tok = tokenizer(ccfg)
    L = context_length(ccfg)
    caps = [str(c) for c in captions]
    n = len(caps)
    phrases = [extract_phrases(c, max_phrases) or [c] for c in caps]
    flat = [p for ps in phrases for p in ps]
    cap_tok = tok(caps).numpy().astype(np.int64) if n else np.zeros((0, L), np.int64)
    ph_tok = tok(flat).numpy().astype(np.int64) if flat else np.zeros((0, L), np.int64)
    pt = np.zeros((n, max_phrases, L), np.int64)
    pm = np.zeros((n, max_phrases), bool)
    k = 0
    for i, ps in enumerate(phrases):
        pt[i, : len(ps)] = ph_tok[k : k + len(ps)]
        pm[i, : len(ps)] = True
        k += len(ps)
    return {"tokens": cap_tok, "phrase_tokens": pt, "phrase_mask": pm}


def feature_names(levels: str) -> list[str]:
    lv = parse_levels(levels)
    names = ["global_sim"] if "global" in lv else []
    for level in ("image", "patch"):
        if level in lv:
            names += [f"{level}_phrase_{s}" for s in STATS]
    return names


def parse_levels(levels: str) -> list[str]:
    lv = [p.strip() for p in str(levels).split("+") if p.strip()]
    bad = [p for p in lv if p not in LEVELS]
    if bad or not lv:
        raise ValueError(f"method.levels must join {', '.join(LEVELS)} with '+'; got {levels!r}")
    return lv


def _masked_stats(s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """[B, P] similarities with a [B, P] mask -> [B, 4] (min, mean, max, std over valid phrases)."""
    mf = m.float()
    cnt = mf.sum(1).clamp_min(1)
    mean = (s * mf).sum(1) / cnt
    big = torch.finfo(s.dtype).max
    mn = torch.where(m, s, torch.full_like(s, big)).amin(1)
    mx = torch.where(m, s, torch.full_like(s, -big)).amax(1)
    var = (((s - mean[:, None]) ** 2) * mf).sum(1) / cnt
    return torch.stack([mn, mean, mx, var.clamp_min(0).sqrt()], 1)


class ItemNet(nn.Module):
    """open_clip CLIP + the misalignment features + an MLP head."""

    def __init__(self, cfg: dict, load_weights: bool = True):
        super().__init__()
        m = cfg["method"]
        ccfg = dict(m["clip"])
        if not load_weights:
            ccfg["pretrained"] = None
        self.clip = build_clip(ccfg, cfg)
        self.levels = parse_levels(m["levels"])
        self.n_features = len(feature_names(m["levels"]))
        vis = self.clip.visual
        size = vis.image_size if isinstance(vis.image_size, (tuple, list)) else (vis.image_size, vis.image_size)
        self.image_size = tuple(int(s) for s in size)
        pcfg = getattr(vis, "preprocess_cfg", {}) or {}
        mean = pcfg.get("mean", (0.48145466, 0.4578275, 0.40821073))
        std = pcfg.get("std", (0.26862954, 0.26130258, 0.27577711))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        # temperature of the phrase-level contrastive losses (learnable, CLIP-style init 1/0.07)
        self.phrase_logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
        w, depth = int(m["head"]["width"]), int(m["head"]["depth"])
        layers: list[nn.Module] = [nn.BatchNorm1d(self.n_features, affine=False)]
        d = self.n_features
        for _ in range(depth):
            layers += [nn.Linear(d, w), nn.GELU(), nn.Dropout(float(m["head"]["dropout"]))]
            d = w
        layers.append(nn.Linear(d, 1))
        self.head = nn.Sequential(*layers)

    # -- encoders (unit-norm outputs)
    def encode_image(self, x: torch.Tensor):
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False).clamp(0, 1)
        pooled, tokens = self.clip.visual((x - self.mean) / self.std)
        proj = self.clip.visual.proj
        if proj is not None:
            tokens = tokens @ proj
        return F.normalize(pooled, dim=-1), F.normalize(tokens, dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_text(tokens), dim=-1)

    def encode_phrases(self, phrase_tokens: torch.Tensor, phrase_mask: torch.Tensor):
        """Encode each distinct phrase of the batch once: (unique embeddings [K, D],
        index [B, P] into them (0 where masked), flat (image index, unique index) of valid ones)."""
        B, P, L = phrase_tokens.shape
        flat = phrase_tokens.reshape(B * P, L)
        valid = phrase_mask.reshape(-1)
        uniq, inv = torch.unique(flat[valid], dim=0, return_inverse=True)
        emb = self.encode_text(uniq)
        idx = torch.zeros(B * P, dtype=torch.long, device=flat.device)
        idx[valid] = inv
        img_of = torch.arange(B, device=flat.device).repeat_interleave(P)[valid]
        return emb, idx.view(B, P), (img_of, inv)

    def similarities(self, batch: dict) -> dict:
        img, patches = self.encode_image(batch["x"])
        out = {"img": img, "patches": patches}
        if "tokens" in batch:
            out["global"] = (img * self.encode_text(batch["tokens"])).sum(-1)
        emb, idx, _ = self.encode_phrases(batch["phrase_tokens"], batch["phrase_mask"])
        e = emb[idx]  # [B, P, D]
        out["image"] = torch.einsum("bd,bpd->bp", img, e)
        out["patch"] = torch.einsum("btd,bpd->bpt", patches, e).amax(-1)
        return out

    def features(self, batch: dict, levels=None) -> torch.Tensor:
        """[B, F] misalignment features of the given levels (default: the model's own)."""
        levels = list(levels or self.levels)
        s = self.similarities(batch)
        m = batch["phrase_mask"].bool()
        parts = []
        if "global" in levels:
            parts.append(s["global"][:, None])
        for level in ("image", "patch"):
            if level in levels:
                parts.append(_masked_stats(s[level], m))
        return torch.cat(parts, 1)

    def forward(self, batch: dict) -> torch.Tensor:
        with torch.no_grad():
            f = self.features(batch)
        return self.head(f).squeeze(-1)


def _each_positive_nce(logits: torch.Tensor, pos: torch.Tensor, dim: int) -> torch.Tensor:
    """Contrastive loss where *every* positive must beat all negatives along ``dim``: for each
    positive pair, -log(e^{l_pos} / (e^{l_pos} + sum over negatives e^{l_neg})), averaged
    (= softplus(logsumexp(negatives) - l_pos)). Unlike a loss on the summed probability of the
    positives, no present object can be ignored."""
    if dim == 0:
        logits, pos = logits.t(), pos.t()
    neg = torch.logsumexp(logits.masked_fill(pos, float("-inf")), 1, keepdim=True)  # -inf if no negative
    return F.softplus(neg - logits)[pos].mean()


def clip_pretrain_loss(model: ItemNet, batch: dict, weights: dict) -> dict:
    """CLIP contrastive loss on (image, caption) pairs + each-positive contrastive losses between
    the batch's distinct object phrases and the images (whole-image embedding; best patch token)."""
    img, patches = model.encode_image(batch["x"])
    txt = model.encode_text(batch["tokens"])
    scale = model.clip.logit_scale.exp().clamp(max=100)
    logits = scale * img @ txt.t()
    tgt = torch.arange(len(img), device=img.device)
    l_global = 0.5 * (F.cross_entropy(logits, tgt) + F.cross_entropy(logits.t(), tgt))
    emb, _, (img_of, inv) = model.encode_phrases(batch["phrase_tokens"], batch["phrase_mask"])
    pos = torch.zeros(len(emb), len(img), dtype=torch.bool, device=img.device)
    pos[inv, img_of] = True
    t = model.phrase_logit_scale.exp().clamp(max=100)
    s_img = emb @ img.t()                                            # [K, B]
    s_patch = torch.einsum("kd,btd->kbt", emb, patches).amax(-1)     # [K, B]
    l_img = 0.5 * (_each_positive_nce(t * s_img, pos, 1) + _each_positive_nce(t * s_img, pos, 0))
    l_patch = 0.5 * (_each_positive_nce(t * s_patch, pos, 1) + _each_positive_nce(t * s_patch, pos, 0))
    loss = weights["global"] * l_global + weights["phrase_image"] * l_img + weights["phrase_patch"] * l_patch
    with torch.no_grad():
        acc = (logits.argmax(1) == tgt).float().mean()
        pf = pos.float()
        margin = (s_patch * pf).sum() / pf.sum().clamp_min(1) - (s_patch * (1 - pf)).sum() / (1 - pf).sum().clamp_min(1)
    return {"loss": loss, "global": l_global.detach(), "phrase_image": l_img.detach(),
            "phrase_patch": l_patch.detach(), "retrieval_acc": acc, "patch_margin": margin}


def caption_and_tokenize(batch: dict, ccfg: dict, max_phrases: int, captioner: str) -> dict:
    """Ray Data step of a streamed set: captions missing from the manifest come from the
    captioner (on the decoded images), then captions and phrases are tokenised."""
    from trustlab.methods.item import captioned_scenes as cs

    n = len(batch["y"])
    caps = [str(c) for c in batch.get("caption", [""] * n)]
    todo = [i for i, c in enumerate(caps) if not c.strip()]
    if todo:
        ims = [np.asarray(batch["x"][i]).transpose(1, 2, 0) for i in todo]
        for i, c in zip(todo, cs.get_captioner(captioner)(ims)):
            caps[i] = c
    out = dict(batch, caption=np.asarray(caps, dtype=object))
    out.update(tokenize_captions(caps, ccfg, max_phrases))
    return out


def _real_rows(batch: dict) -> dict:
    keep = np.asarray(batch["y"]) == 0
    return {k: np.asarray(v)[keep] for k, v in batch.items()}


# ----------------------------------------------------------------------------- method
@register_method("item")
class Item:
    modality = "image"
    serve_adapter = "image+caption"  # Serve passes each upload's caption to serve_inputs
    BATCH_KEYS = ("x", "y", "vid", "tokens", "phrase_tokens", "phrase_mask")

    def stages(self, cfg: dict) -> list[str]:
        return ["head"] if cfg["method"]["clip"].get("pretrained") else ["clip_pretrain", "head"]

    def stage_epochs(self, cfg: dict, stage: str) -> int:
        if stage == "clip_pretrain":
            return int(cfg["method"]["pretrain"]["epochs"])
        return int(cfg["method"]["head"].get("epochs") or cfg["trainer"]["epochs"])

    def stage_selects(self, cfg: dict, stage: str) -> bool:
        return stage != "clip_pretrain"

    def stage_data(self, cfg: dict, stage: str, data: dict) -> dict:
        """clip_pretrain: real pairs only (train and val); head: everything."""
        if stage != "clip_pretrain":
            return data
        out = {}
        for split in ("train", "val"):
            if split in data and isinstance(data[split], dict):
                keep = np.asarray(data[split]["y"]) == 0
                out[split] = {k: v[keep] for k, v in data[split].items()}
            elif split in data:  # streamed
                out[split] = data[split].map_batches(_real_rows, batch_format="numpy")
        return out

    def build_data(self, cfg: dict) -> dict:
        from trustlab.methods.item import captioned_scenes as cs

        m, d = cfg["method"], cfg["method"]["data"]
        if cfg["data"]["name"] != "auto":  # a real image set, streamed; captions from its manifest or data.captions
            from trustlab.platform.data.images import image_datasets

            dsets, df = image_datasets(cfg["data"], int(d["size"]), seed=int(cfg["seed"]),
                                       endpoint=cfg["run"].get("s3_endpoint"))
            n_missing = int((df["caption"].str.strip() == "").sum()) if "caption" in df.columns else len(df)
            if n_missing:
                print(f"[item] {n_missing} of {len(df)} images have no caption: the captioner "
                      f"{m['captioner']!r} describes them (set data.captions or a caption column)", flush=True)
            return {s: ds.map_batches(caption_and_tokenize, batch_format="numpy",
                                      fn_kwargs=dict(ccfg=m["clip"], max_phrases=int(m["max_phrases"]),
                                                     captioner=m["captioner"]))
                    for s, ds in dsets.items()}
        man = cs.build_manifest(d["root"], int(cfg["seed"]), int(d["size"]), int(d["n_train"]),
                                int(d["n_val"]), int(d["n_test"]), tuple(d["n_objects"]), tuple(d["radius"]),
                                tuple(d["manipulations"]))
        raw = cs.load_captioned_manifest(man)
        out = {}
        for split, a in raw.items():
            a.update(tokenize_captions(a["caption"], m["clip"], int(m["max_phrases"])))
            out[split] = a
        return out

    def build_model(self, cfg: dict, stage: str) -> nn.Module:
        model = ItemNet(cfg)
        if stage == "head":
            for p in model.clip.parameters():
                p.requires_grad_(False)
            model.phrase_logit_scale.requires_grad_(False)
        else:
            for p in model.head.parameters():
                p.requires_grad_(False)
        return model

    def configure_optimizer(self, model, cfg: dict, stage: str, steps_per_epoch=None):
        params = [p for p in model.parameters() if p.requires_grad]
        if stage == "clip_pretrain":
            pc = cfg["method"]["pretrain"]
            return torch.optim.AdamW(params, lr=float(pc["lr"]), weight_decay=float(pc["weight_decay"]))
        t = cfg["trainer"]
        return torch.optim.AdamW(params, lr=float(t["lr"]), weight_decay=float(t["weight_decay"]))

    def to_batch(self, arrays: dict) -> dict:
        return to_batch({k: v for k, v in arrays.items() if k in self.BATCH_KEYS})

    def loss_step(self, model, batch, stage, cfg, step=None):
        net = model.module if hasattr(model, "module") else model
        if stage == "clip_pretrain":
            return clip_pretrain_loss(net, batch, cfg["method"]["pretrain"]["weights"])
        logits = model(batch)
        loss = F.binary_cross_entropy_with_logits(logits, batch["y"].float())
        acc = ((logits > 0).long() == batch["y"]).float().mean()
        return {"loss": loss, "acc": acc}

    def predict(self, model, batch, cfg):
        return torch.sigmoid(model(batch))

    # -- serving
    def serve_inputs(self, images: list, cfg: dict, captions: list | None = None) -> dict:
        """RGB uint8 images (+ the caption each claims to show) -> a batch. Items may be arrays,
        ``(image, caption)`` pairs or ``{"image", "caption"}`` dicts; otherwise ``captions=``, then
        ``method.serve_caption``, then the configured captioner supply the caption."""
        from PIL import Image

        from trustlab.methods.item import captioned_scenes as cs

        m = cfg["method"]
        ims, caps = [], []
        for i, it in enumerate(images):
            cap = None
            if isinstance(it, dict):
                it, cap = it["image"], it.get("caption")
            elif isinstance(it, (tuple, list)) and len(it) == 2 and isinstance(it[1], str):
                it, cap = it
            if cap is None and captions is not None:
                cap = captions[i]
            if cap is None:
                cap = m.get("serve_caption")
            ims.append(np.asarray(it)[..., :3].astype(np.uint8))
            caps.append(cap)
        todo = [i for i, c in enumerate(caps) if not c]
        if todo:
            for i, c in zip(todo, cs.get_captioner(m["captioner"])([ims[i] for i in todo])):
                caps[i] = c
        s = int(m["data"]["size"])
        xs = [np.asarray(Image.fromarray(im).resize((s, s), Image.BICUBIC)) if im.shape[:2] != (s, s) else im
              for im in ims]
        arrays = {"x": np.stack([x.transpose(2, 0, 1) for x in xs]),
                  "y": np.zeros(len(xs), np.int64), "vid": np.arange(len(xs))}
        arrays.update(tokenize_captions(caps, m["clip"], int(m["max_phrases"])))
        return self.to_batch(arrays)

    # -- reporting
    def after_train(self, cfg: dict, model, data: dict, run_dir: str) -> dict:
        """Per-mismatch-kind AUC of this run's model; global-only vs hierarchical heads trained on
        the same frozen CLIP's features; the feature scatter plot; the CLIP weights file."""
        from trustlab.platform.data.images import iter_split

        torch.save(model.clip.state_dict(), os.path.join(run_dir, "clip.pt"))
        feats, meta = {}, {}
        bs = int(cfg["trainer"]["eval_batch_size"])
        with torch.no_grad():  # one pass per split (streamed sets too): features, labels, kinds, test scores
            for split in ("train", "val", "test"):
                fs, ys, ks, ss = [], [], [], []
                for b in iter_split(data[split], bs):
                    t = self.to_batch(b)
                    f = model.features(t, LEVELS)
                    fs.append(f.numpy())
                    ys.append(np.asarray(b["y"]))
                    ks.append(np.asarray(b.get("manipulation", np.where(np.asarray(b["y"]) == 1, "fake", "none"))).astype(str))
                    if split == "test":
                        ss.append(self.predict(model, t, cfg).numpy())
                feats[split] = np.concatenate(fs)
                meta[split] = {"y": np.concatenate(ys), "manipulation": np.concatenate(ks)}
        data = meta  # what the report below reads of each split
        scores = np.concatenate(ss)
        out = {"test_by_manipulation": {"model": per_kind_auc(data["test"], scores)}}
        abl = {}
        for name, levels in (("global_only", "global"), ("hierarchical", "+".join(LEVELS))):
            cols = _level_columns(parse_levels(levels))
            s_test, val_auc = fit_feature_head(feats["train"][:, cols], data["train"]["y"], feats["val"][:, cols],
                                               data["val"]["y"], feats["test"][:, cols], cfg)
            from trustlab.platform.metrics import binary_metrics

            abl[name] = {"levels": levels, "val_auc": val_auc,
                         "test": binary_metrics(data["test"]["y"], s_test),
                         "test_by_manipulation": per_kind_auc(data["test"], s_test)}
        out["ablation"] = abl
        names = feature_names("+".join(LEVELS))
        y = data["test"]["y"]
        out["feature_auc_test"] = {n: _auc(y, -feats["test"][:, i]) for i, n in enumerate(names)}
        _scatter(feats["test"], names, data["test"], os.path.join(run_dir, "features.png"))
        kinds = lambda r: ", ".join(f"{k} {v['auc']:.4f}" for k, v in r.items())  # noqa: E731
        out["summary_lines"] = [f"test AUC by mismatch kind: {kinds(out['test_by_manipulation']['model'])}"] + [
            f"ablation {n} ({r['levels']}): test AUC {r['test']['auc']:.4f} ({kinds(r['test_by_manipulation'])}), "
            f"val AUC {r['val_auc']:.4f}" for n, r in abl.items()]
        return out


def _level_columns(levels) -> list[int]:
    names = feature_names("+".join(LEVELS))
    keep = feature_names("+".join(levels))
    return [names.index(n) for n in keep]


def _auc(y, s) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    return float(roc_auc_score(y, s)) if len(np.unique(y)) == 2 else float("nan")


def per_kind_auc(split: dict, scores: np.ndarray) -> dict:
    """AUC of real vs each kind of fake (``manipulation`` column)."""
    y, kinds = np.asarray(split["y"]), np.asarray(split.get("manipulation", np.where(split["y"] == 1, "fake", "none")))
    out = {}
    for k in sorted(set(kinds[y == 1])):
        keep = (y == 0) | (kinds == k)
        out[str(k)] = {"auc": _auc(y[keep], scores[keep]), "n_fake": int(((kinds == k) & (y == 1)).sum())}
    return out


def fit_feature_head(xtr, ytr, xva, yva, xte, cfg: dict, epochs: int = 300):
    """The same MLP head as the model's, trained full-batch on fixed features; the epoch with
    the best validation AUC is kept. Returns (test scores, best val AUC)."""
    m = cfg["method"]["head"]
    torch.manual_seed(int(cfg["seed"]))
    d = xtr.shape[1]
    head = nn.Sequential(nn.BatchNorm1d(d, affine=False), nn.Linear(d, int(m["width"])), nn.GELU(),
                         nn.Linear(int(m["width"]), 1))
    opt = torch.optim.AdamW(head.parameters(), lr=float(cfg["trainer"]["lr"]) * 5, weight_decay=1e-4)
    xt, yt = torch.tensor(xtr, dtype=torch.float32), torch.tensor(np.asarray(ytr), dtype=torch.float32)
    xv, xe = torch.tensor(xva, dtype=torch.float32), torch.tensor(xte, dtype=torch.float32)
    best, best_state = -1.0, None
    for ep in range(epochs):
        head.train()
        loss = F.binary_cross_entropy_with_logits(head(xt).squeeze(-1), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ep % 10 == 9:
            head.eval()
            with torch.no_grad():
                a = _auc(yva, head(xv).squeeze(-1).numpy())
            if a > best:
                best, best_state = a, copy.deepcopy(head.state_dict())
    head.load_state_dict(best_state)
    head.eval()
    with torch.no_grad():
        return torch.sigmoid(head(xe).squeeze(-1)).numpy(), float(best)


def _scatter(f: np.ndarray, names: list, split: dict, path: str) -> None:
    from trustlab.platform.plots import plt

    y, kinds = np.asarray(split["y"]), np.asarray(split["manipulation"])
    gi, pi = names.index("global_sim"), names.index("patch_phrase_min")
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for lab, mask, c in (("real", y == 0, "tab:blue"),
                         *((f"fake: {k}", (y == 1) & (kinds == k), col)
                           for k, col in zip(sorted(set(kinds[y == 1])), ("tab:red", "tab:orange", "tab:purple")))):
        ax.scatter(f[mask, gi], f[mask, pi], s=6, alpha=0.6, label=lab, c=c)
    ax.set_xlabel("global image-caption similarity")
    ax.set_ylabel("min over phrases of best-patch similarity")
    ax.set_title("ITEM features (test)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""Re-Label Distillation (ICME 2021, arXiv 2409.13137): explaining a black-box prediction.

From the paper's abstract: project the image into a VAE latent space, perturb the latent code
to synthesise images near it, label each synthetic image by whether the black-box network's
label shifts, and train a linear student on them; the student's weights explain the prediction.
From a third-party summary (``METHODS.md``): soft and hard teacher information are both used;
evaluation by deletion / insertion on ImageNet.
Our choices (config, several in the Tune space): the VAE and classifier architectures, the
perturbation radius schedule, the student's loss and regularisation, and the metric settings.

For one image ``x`` with black-box prediction ``c = argmax f(x)``:

1. ``mu = enc(x)``; ``z_k = mu + r_k eps_k`` with ``eps_k ~ N(0, I)`` and radii ``r_k`` spread
   uniformly in ``[0, radius]`` (``relabel.radius``; with ``relabel.adaptive`` the radius is
   doubled, up to ``max_doublings`` times, until at least ``min_shift`` of the samples shift
   label, so every image gets both kinds of samples);
2. ``x_k = x + dec(z_k) - dec(mu)`` (``relabel.anchor: residual``, our choice: the image keeps its
   own detail and a blurry VAE reconstruction cannot flip the label by itself; ``decoded`` uses
   ``x_k = dec(z_k)``); the black box labels each: hard label ``h_k = 1[argmax f(x_k) == c]``
   (label kept, 0 = shifted) and soft score ``s_k = softmax(logits(x_k) / T)_c`` (both kept;
   ``relabel.temperature`` T as in knowledge distillation: a confident black box's ``p_c`` is near
   0 or 1 on most neighbours and says little more than the flip, the tempered one is graded);
3. a linear student ``g(x') = w . phi(x') + b`` on cell-pooled pixels ``phi`` (``cell`` x ``cell``
   cells; 1 = pixels) is fitted by logistic regression to ``hard_weight * h + (1 - hard_weight) * s``
   with an L2 penalty ``l2`` (Newton / IRLS; all images of a batch are fitted at once);
4. the explanation map is ``w`` mapped back to pixels (each cell's weight on its pixels); its
   pixel ranking for deletion / insertion is the student's own contribution estimate
   ``w * (x - baseline)`` (``relabel.ranking: contribution``; ``weight`` ranks by ``w`` alone).

Stages: ``blackbox`` (generic loop: the classifier to explain — skipped when
``method.blackbox.checkpoint`` names a trained model of any registered image method, e.g. an F2C
``model.pt``; that method's own data is then explained), ``vae`` (generic loop: ELBO), and
``relabel`` (own non-gradient loop, ``worker_loop_for``: the val images are explained on the
workers, ``val_score = insertion AUC - deletion AUC``, which Tune maximises).

``evaluate`` explains ``eval.n_images`` test images with re-label distillation and with the
baselines of ``trustlab.methods.relabel.attribution`` (gradient saliency, gradient x input, occlusion,
LIME-style, random) on the same images, and reports deletion / insertion AUCs, the black box's
test accuracy, the VAE's reconstruction error, ablations (pixel-space perturbations instead of
the VAE latent; hard labels only; ranking by raw weights), ``heatmaps.png``, ``deletion.png``
and ``insertion.png``.
Default data: scikit-learn's digits (8 x 8, shipped with scikit-learn), split by seed. The default
black box (``method.blackbox.reject``) also has a reject output trained on noisy copies of the
digits: silent on the data, it is what pixel-noise neighbours mostly probe, the planted signal the
latent neighbourhood is meant to avoid (``with_reject_examples``; figures in docs/results.md).
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from trustlab.methods.relabel import attribution as A
from trustlab.platform.evaluate import worker_threads
from trustlab.platform.method import to_batch
from trustlab.platform.registry import register_method


# ----------------------------------------------------------------------------- networks
class DigitsCNN(nn.Module):
    """The default black box: a small CNN classifier (logits)."""

    def __init__(self, in_ch: int = 1, n_classes: int = 10, width: int = 16, size: int = 8):
        super().__init__()
        w = int(width)
        self.net = nn.Sequential(nn.Conv2d(in_ch, w, 3, 1, 1), nn.ReLU(True), nn.Conv2d(w, 2 * w, 3, 1, 1), nn.ReLU(True),
                                 nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * w * (size // 2) ** 2, 4 * w), nn.ReLU(True),
                                 nn.Linear(4 * w, n_classes))

    def forward(self, x):
        return self.net(x)


class VAE(nn.Module):
    """A VAE with a Bernoulli-style (binary cross-entropy) decoder on [0, 1] images; ``arch="mlp"``
    for small images (digits), ``"conv"`` (three stride-2 stages) for larger ones."""

    def __init__(self, in_ch: int, size: int, latent: int = 10, hidden: int = 256, arch: str = "auto"):
        super().__init__()
        self.shape = (int(in_ch), int(size), int(size))
        self.arch = ("mlp" if size <= 16 else "conv") if arch == "auto" else arch
        d = in_ch * size * size
        h = int(hidden)
        if self.arch == "mlp":
            self.enc = nn.Sequential(nn.Flatten(), nn.Linear(d, h), nn.ReLU(True), nn.Linear(h, h // 2), nn.ReLU(True))
            self.dec = nn.Sequential(nn.Linear(latent, h // 2), nn.ReLU(True), nn.Linear(h // 2, h), nn.ReLU(True),
                                     nn.Linear(h, d))
            feat = h // 2
        elif self.arch == "conv":
            if size % 8:
                raise ValueError(f"conv VAE needs an image side divisible by 8, got {size}")
            s8 = size // 8
            self.enc = nn.Sequential(nn.Conv2d(in_ch, 32, 4, 2, 1), nn.ReLU(True), nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(True),
                                     nn.Conv2d(64, 128, 4, 2, 1), nn.ReLU(True), nn.Flatten())
            self.dec = nn.Sequential(nn.Linear(latent, 128 * s8 * s8), nn.ReLU(True), nn.Unflatten(1, (128, s8, s8)),
                                     nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.ReLU(True),
                                     nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(True),
                                     nn.ConvTranspose2d(32, in_ch, 4, 2, 1))
            feat = 128 * s8 * s8
        else:
            raise ValueError(f"unknown VAE arch {arch!r}; valid: auto, mlp, conv")
        self.mu = nn.Linear(feat, latent)
        self.logvar = nn.Linear(feat, latent)

    def encode(self, x):
        f = self.enc(x)
        return self.mu(f), self.logvar(f).clamp(-10, 10)

    def decode_logits(self, z):
        return self.dec(z).view(-1, *self.shape)

    def decode(self, z):
        return torch.sigmoid(self.decode_logits(z))

    def loss(self, x, beta: float = 1.0) -> dict:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        logits = self.decode_logits(z)
        rec = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1).mean()
        kl = (-0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)).mean()
        with torch.no_grad():
            mse = (torch.sigmoid(logits) - x).pow(2).mean()
        return {"loss": rec + beta * kl, "rec": rec, "kl": kl, "mse": mse}


class ExternalBlackBox(nn.Module):
    """A trained model of another registered image method as a black box: probabilities over
    (negative, positive) from its ``predict`` score. Its weights are not trained here."""

    def __init__(self, uri: str, endpoint: str | None = None):
        super().__init__()
        from trustlab.platform.checkpoints import load_state
        from trustlab.platform.registry import get_method

        st = load_state(uri, endpoint)
        self.cfg = st["cfg"]
        self.method = get_method(self.cfg["method"]["name"])
        self.model = self.method.build_model(self.cfg, st.get("stage") or self.method.stages(self.cfg)[-1])
        self.model.load_state_dict(st["model"])
        self.model.eval()

    def train(self, mode: bool = True):  # always in eval mode
        return super().train(False)

    def forward(self, x):
        p = self.method.predict(self.model, {"x": x}, self.cfg).float().clamp(1e-6, 1 - 1e-6).view(-1)
        return torch.log(torch.stack([1 - p, p], dim=1))  # log-probabilities: softmax gives back (1 - p, p)


class TimmBlackBox(nn.Module):
    """Any timm image classifier (``method.blackbox.timm``: a model name or pretrained tag; weights
    from ``method.blackbox.weights``, loaded strictly by trustlab.platform.weights) as the black box:
    multi-class logits of 3-channel [0, 1] images, through the classifier's own preprocessing
    (its pretrained config's input size, interpolation, mean and std). Not trained here."""

    def __init__(self, cfg: dict):
        super().__init__()
        import timm

        from trustlab.platform.weights import create_timm

        bb = cfg["method"]["blackbox"]
        kw = {"num_classes": int(bb["num_classes"])} if bb.get("num_classes") else {}
        self.net = create_timm(bb["timm"], bb.get("weights"), cfg, what="the black-box classifier", **kw)
        dc = timm.data.resolve_data_config({}, model=self.net)
        self.input_size = tuple(int(s) for s in dc["input_size"][1:])
        self.interpolation = "bicubic" if dc.get("interpolation") == "bicubic" else "bilinear"
        self.register_buffer("mean", torch.tensor(dc["mean"], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(dc["std"], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.n_classes = int(self.net.num_classes)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.net.eval()

    def train(self, mode: bool = True):  # always in eval mode
        return super().train(False)

    def forward(self, x):
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode=self.interpolation, align_corners=False).clamp(0, 1)
        return self.net((x - self.mean) / self.std)


class RelabelModel(nn.Module):
    def __init__(self, cfg: dict, shape: tuple, n_classes: int):
        super().__init__()
        m = cfg["method"]
        ch, h, _ = shape
        bb = m["blackbox"]
        if bb.get("timm"):
            self.blackbox = TimmBlackBox(cfg)
        elif bb.get("checkpoint"):
            self.blackbox = ExternalBlackBox(bb["checkpoint"], cfg["run"].get("s3_endpoint"))
        else:
            self.blackbox = DigitsCNN(ch, n_classes, int(bb["width"]), h)
        v = m["vae"]
        self.vae = VAE(ch, h, int(v["latent"]), int(v["hidden"]), v.get("arch", "auto"))

    def probs(self, x, temperature: float = 1.0):
        """The black box's class probabilities; ``temperature`` > 1 softens them (logits / T), as
        in knowledge distillation: the argmax is the same, the confidence is graded."""
        return torch.softmax(self.blackbox(x) / float(temperature), dim=1)


# ----------------------------------------------------------------------------- re-label distillation
def relabel(probs: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard and soft labels of synthetic samples: ``probs`` (B x N x K) black-box probabilities,
    ``c`` (B,) the original predictions -> ``(kept (B x N) in {0, 1}, soft = p_c (B x N))``."""
    kept = (probs.argmax(-1) == c[:, None]).to(probs.dtype)
    soft = probs.gather(2, c.view(-1, 1, 1).expand(probs.shape[0], probs.shape[1], 1)).squeeze(2)
    return kept, soft


def fit_linear_students(feats: torch.Tensor, target: torch.Tensor, l2: float = 1e-3, steps: int = 25,
                        sample_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """B independent L2-regularised logistic regressions at once (Newton / IRLS): ``feats``
    B x N x F, ``target`` B x N in [0, 1] (soft targets allowed) -> ``(w B x F, b B)``.
    Minimises ``mean_n sw_n BCE(sigmoid(w . f_n + b), target_n) + l2 |w|^2`` (``b`` unpenalised)."""
    X = torch.cat([feats.detach().double(), torch.ones(*feats.shape[:2], 1, dtype=torch.float64)], 2)
    y = target.detach().double()
    sw = torch.ones_like(y) if sample_weight is None else sample_weight.detach().double()
    sw = sw / sw.sum(1, keepdim=True)
    bsz, _, f1 = X.shape
    reg = torch.full((f1,), 2 * float(l2), dtype=torch.float64)
    reg[-1] = 1e-8  # (almost) no penalty on the bias
    R = torch.diag(reg)
    theta = torch.zeros(bsz, f1, dtype=torch.float64)
    for _ in range(int(steps)):
        p = torch.sigmoid(torch.bmm(X, theta[..., None])[..., 0])
        grad = torch.bmm(X.transpose(1, 2), (sw * (p - y))[..., None])[..., 0] + theta * reg
        H = torch.bmm(X.transpose(1, 2), X * (sw * p * (1 - p))[..., None]) + R
        # H is symmetric positive definite (the L2 term): Cholesky. Batched LU (linalg.solve) failed with
        # "pivots ... must be >= 1" on well-conditioned 257 x 257 Hessians (16 px images, cell 1) with 2
        # intra-op threads (MKL), and solved them with 1
        step = torch.cholesky_solve(grad[..., None], torch.linalg.cholesky(H))[..., 0]
        theta = theta - step
        if float(step.abs().max()) < 1e-7:
            break
    return theta[:, :-1].float(), theta[:, -1].float()


@torch.no_grad()
def synthesize(model: RelabelModel, x: torch.Tensor, rcfg: dict, seed, perturb: str = "latent",
               radius=None) -> torch.Tensor:
    """``N`` synthetic neighbours of each image (B x N x C x H x W): decoded latent perturbations
    ``mu + r_k eps_k`` (``perturb="latent"``; with ``anchor="residual"`` the decoded *change*
    ``dec(z_k) - dec(mu)`` is added to the image itself, so a blurry reconstruction does not
    shift the label by itself; ``"decoded"`` uses ``dec(z_k)`` as is) or, for the ablation,
    Gaussian pixel noise with the
    same radius schedule (``"pixel"``, std ``r_k * pixel_scale``). ``radius``: a number or one per
    image (default ``rcfg["radius"]``); ``r_k`` is uniform in ``[0, radius]``; sample 0 is the
    reconstruction (latent) or the image itself (pixel). ``seed``: one per image, or an int
    (see ``attribution.per_item_seeds``)."""
    n = int(rcfg["n_samples"])
    bsz = len(x)
    r = torch.as_tensor(float(rcfg["radius"]) if radius is None else radius, dtype=torch.float32).expand(bsz)
    gens = [torch.Generator().manual_seed(s) for s in A.per_item_seeds(seed, bsz)]
    radii = torch.stack([torch.rand(n, 1, generator=g) for g in gens]) * r[:, None, None]
    radii[:, 0] = 0.0
    if perturb == "latent":
        mu, _ = model.vae.encode(x)
        eps = torch.stack([torch.randn(n, mu.shape[1], generator=g) for g in gens])
        z = mu[:, None] + radii * eps
        dec = model.vae.decode(z.reshape(-1, mu.shape[1])).view(bsz, n, *x.shape[1:])
        if rcfg.get("anchor", "residual") == "residual":  # the image plus the decoded change of its code
            return (x[:, None] + dec - dec[:, :1]).clamp(0, 1)
        return dec
    if perturb == "pixel":
        eps = torch.stack([torch.randn(n, *x.shape[1:], generator=g) for g in gens])
        xs = x[:, None] + radii.view(bsz, n, 1, 1, 1) * float(rcfg.get("pixel_scale", 0.2)) * eps
        return xs.clamp(0, 1)
    raise ValueError(f"unknown perturb {perturb!r}; valid: latent, pixel")


@torch.no_grad()
def neighbourhood(model: RelabelModel, x: torch.Tensor, rcfg: dict, seed=0, perturb: str | None = None) -> dict:
    """Steps 1-2: synthetic neighbours of each image relabelled by the black box ->
    ``{"xs": B x N x C x H x W, "kept": B x N, "soft": B x N, "c": B, "radius": B}``; ``soft`` is
    ``p_c`` at ``rcfg["temperature"]`` (default 1)."""
    perturb = perturb or rcfg.get("perturb", "latent")
    bsz, ch, h, wd = x.shape
    c = model.probs(x).argmax(1)
    temp = float(rcfg.get("temperature", 1.0))  # soft labels only: the hard ones are argmaxes, the same at any T
    if not temp > 0:
        raise ValueError(f"method.relabel.temperature must be > 0, got {temp}")

    def sample(idx, radius, s):
        xs = synthesize(model, x[idx], rcfg, s, perturb, radius)
        probs = model.probs(xs.reshape(-1, ch, h, wd), temp).view(len(idx), xs.shape[1], -1)
        return (xs, *relabel(probs, c[idx]))

    seeds = np.asarray(A.per_item_seeds(seed, bsz), dtype=np.int64)
    radius = torch.full((bsz,), float(rcfg["radius"]))
    allidx = torch.arange(bsz)
    xs, kept, soft = sample(allidx, radius, seeds)
    if rcfg.get("adaptive", True):  # widen the radius where too few labels shift
        for attempt in range(1, int(rcfg.get("max_doublings", 3)) + 1):
            need = (1 - kept.mean(1)) < float(rcfg.get("min_shift", 0.15))
            if not bool(need.any()):
                break
            idx = allidx[need]
            radius[idx] *= 2
            xs[idx], kept[idx], soft[idx] = sample(idx, radius[idx], seeds[idx.numpy()] + 7919 * attempt)
    return {"xs": xs, "kept": kept, "soft": soft, "c": c, "radius": radius}


@torch.no_grad()
def distil(nb: dict, x: torch.Tensor, rcfg: dict, hard_weight: float | None = None) -> dict:
    """Steps 3-4: the linear student on a neighbourhood and its explanation ->
    ``{"weights": B x H x W (the explanation), "contribution": w * (x - baseline) (B x H x W),
    "c", "shift_rate", "radius", "student_agreement"}``."""
    hw = float(rcfg["hard_weight"] if hard_weight is None else hard_weight)
    cell = int(rcfg["cell"])
    bsz, ch, h, wd = x.shape
    xs, kept, soft = nb["xs"], nb["kept"], nb["soft"]
    target = hw * kept + (1 - hw) * soft
    feats = A.cell_pool(xs.reshape(-1, ch, h, wd), cell).view(bsz, xs.shape[1], -1)
    w, b = fit_linear_students(feats, target, float(rcfg["l2"]), int(rcfg["steps"]))
    wmap = A.cell_unpool(w, cell, h, wd)
    base = A.baseline_image(x, rcfg.get("baseline", "zero"))
    contrib = wmap * (x - base).sum(1)
    pred = torch.sigmoid(torch.bmm(feats, w[..., None])[..., 0] + b[:, None])
    agree = ((pred > 0.5) == (target > 0.5)).float().mean(1)
    return {"weights": wmap, "contribution": contrib, "c": nb["c"], "shift_rate": 1 - kept.mean(1),
            "radius": nb["radius"], "student_agreement": agree}


def explain(model: RelabelModel, x: torch.Tensor, rcfg: dict, seed=0, perturb: str | None = None,
            hard_weight: float | None = None) -> dict:
    """Re-label distillation of a batch of images (``neighbourhood`` then ``distil``)."""
    return distil(neighbourhood(model, x, rcfg, seed, perturb), x, rcfg, hard_weight)


def attribution_maps(model: RelabelModel, x: torch.Tensor, rcfg: dict, ecfg: dict, seed) -> dict:
    """All explanations of a batch (B x H x W each), keyed by method name, plus ``c``."""
    fn = model.probs
    base = A.baseline_image(x, rcfg.get("baseline", "zero"))
    nb = neighbourhood(model, x, rcfg, seed)
    rl = distil(nb, x, rcfg)
    c = rl["c"]
    ranking = rcfg.get("ranking", "contribution")
    maps = {"relabel": rl["contribution"] if ranking == "contribution" else rl["weights"]}
    maps["gradient_saliency"] = A.gradient_saliency(fn, x, c)
    maps["gradient_x_input"] = A.gradient_x_input(fn, x, c, base)
    maps["occlusion"] = A.occlusion(fn, x, c, int(ecfg["occlusion_patch"]), int(ecfg.get("occlusion_stride", 1)), base)
    maps["lime"] = A.lime(fn, x, c, int(rcfg["cell"]), int(ecfg["lime_samples"]), seed, base)
    maps["random"] = A.random_attribution(len(x), x.shape[2], x.shape[3], seed)
    return {"maps": maps, "c": c, "relabel": rl, "neighbourhood": nb}


# ----------------------------------------------------------------------------- data
def digits_splits(seed: int, n_val: int, n_test: int) -> dict:
    """scikit-learn's digits (1797 8x8 images, 0..16 -> [0, 1]) split by seed, stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=n_test, random_state=seed, stratify=y)
    tr, va = train_test_split(tr, test_size=n_val, random_state=seed + 1, stratify=y[tr])
    return {s: {"x": x[i], "y": y[i], "vid": i.astype(np.int64)} for s, i in (("train", tr), ("val", va), ("test", te))}


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(255.0) if x.dtype == torch.uint8 else x.float()


def reject_spec(cfg: dict) -> dict | None:
    """``method.blackbox.reject`` of the digits CNN (None when off, or when the black box is
    external: its training is not ours)."""
    bb = cfg["method"]["blackbox"]
    if bb.get("checkpoint") or bb.get("timm") or not bb.get("reject"):
        return None
    rj = bb["reject"]
    lo, hi = (float(v) for v in rj["std"])
    if not (0 <= lo <= hi) or not 0 < float(rj["fraction"]) <= 1:
        raise ValueError(f"method.blackbox.reject needs 0 <= std[0] <= std[1] and 0 < fraction <= 1, got {dict(rj)}")
    return {"fraction": float(rj["fraction"]), "std": (lo, hi)}


def with_reject_examples(x: torch.Tensor, y: torch.Tensor, spec: dict, reject_class: int):
    """The default black box's planted off-manifold behaviour: noisy copies of the first
    ``fraction`` of a batch (Gaussian pixel noise, std uniform in ``spec["std"]``, clipped to
    [0, 1]) labelled ``reject_class``, as a deployed classifier with a reject output for
    corrupted inputs is trained. Digits never carry such noise, so on the data the output is
    silent; a neighbourhood of pixel noise mostly probes it instead of the digit evidence,
    while VAE neighbours stay on the digit manifold (what the latent perturbation is for)."""
    m = int(round(len(x) * spec["fraction"]))
    if m == 0:
        return x, y
    lo, hi = spec["std"]
    std = lo + (hi - lo) * torch.rand(m, *([1] * (x.dim() - 1)), device=x.device)
    noisy = (x[:m] + std * torch.randn_like(x[:m])).clamp(0, 1)
    return torch.cat([x, noisy]), torch.cat([y, torch.full((m,), reject_class, dtype=y.dtype, device=y.device)])


# ----------------------------------------------------------------------------- Ray stage: relabel
def _explain_metrics(model, arrays: dict, cfg: dict, idx: np.ndarray, seed: int, with_baselines: bool):
    m = cfg["method"]
    rcfg, ecfg = m["relabel"], m["eval"]
    x = _as_float(torch.from_numpy(np.asarray(arrays["x"][idx])))
    seed = int(seed) * 1000003 + np.asarray(arrays["vid"][idx], dtype=np.int64)  # per image: shard-independent
    base = A.baseline_image(x, rcfg.get("baseline", "zero"))
    out = {}
    if with_baselines:
        res = attribution_maps(model, x, rcfg, ecfg, seed)
        maps, c, rl, nb = res["maps"], res["c"], res["relabel"], res["neighbourhood"]
    else:
        nb = neighbourhood(model, x, rcfg, seed)
        rl = distil(nb, x, rcfg)
        c = rl["c"]
        maps = {"relabel": rl["contribution"] if rcfg.get("ranking", "contribution") == "contribution" else rl["weights"]}
    for name, a in maps.items():
        out[name] = A.deletion_insertion(model.probs, x, c, a, base, ecfg.get("steps"))
    return out, maps, rl, x, c, nb, seed


@torch.no_grad()
def _reject_share(model, nb: dict, reject_class: int) -> float:
    """Share of a neighbourhood's samples the black box sends to its reject output."""
    xs = nb["xs"]
    return float((model.probs(xs.reshape(-1, *xs.shape[2:])).argmax(1) == reject_class).float().mean())


def relabel_worker_loop(config: dict) -> None:
    """Non-gradient stage: each worker explains its share of the val images; the gathered
    deletion / insertion AUCs give ``val_score = insertion - deletion`` (one report). No
    gradients and per-image work on the CPU in fp32 (``trainer.precision`` does not apply: the
    deletion/insertion curves it selects on would move with the rounding)."""
    from trustlab.platform.train import WorkerContext

    ctx = WorkerContext.from_ray(config)
    cfg = ctx.cfg
    model = ctx.build_model(to_device=False)
    model.eval()
    val = ctx.data["val"]
    n = min(len(val["y"]), int(cfg["method"]["eval"]["n_val_images"]))
    mine = np.arange(ctx.rank, n, ctx.world)
    res, _, rl, _, _, _, _ = _explain_metrics(model, val, cfg, mine, ctx.seed + 1, with_baselines=False)
    parts = ctx.gather((res["relabel"]["deletion_auc"].numpy(), res["relabel"]["insertion_auc"].numpy(),
                        rl["shift_rate"].numpy()))
    dele, ins, shift = (np.concatenate([p[i] for p in parts]) for i in range(3))
    metrics = {"val_deletion_auc": float(dele.mean()), "val_insertion_auc": float(ins.mean()),
               "val_shift_rate": float(shift.mean()), "val_score": float(ins.mean() - dele.mean()),
               "n_images": int(len(dele))}
    ctx.log(f"{len(dele)} val images: deletion AUC {metrics['val_deletion_auc']:.4f}, "
            f"insertion AUC {metrics['val_insertion_auc']:.4f}, label shift rate {metrics['val_shift_rate']:.3f}")
    ctx.report(metrics, model, epoch=1)


# ----------------------------------------------------------------------------- the method
@register_method("relabel")
class Relabel:
    modality = "image"

    def _external(self, cfg):
        return bool(cfg["method"]["blackbox"].get("checkpoint") or cfg["method"]["blackbox"].get("timm"))

    def stages(self, cfg: dict) -> list[str]:
        return (["vae"] if self._external(cfg) else ["blackbox", "vae"]) + ["relabel"]

    def stage_epochs(self, cfg: dict, stage: str) -> int:
        return 1 if stage == "relabel" else int(cfg["method"][stage]["epochs"])

    def worker_loop_for(self, stage: str):
        return relabel_worker_loop if stage == "relabel" else None

    def build_data(self, cfg: dict) -> dict:
        m = cfg["method"]
        if m["blackbox"].get("timm"):  # a timm classifier explained on images of a data group (a sample of each split)
            if cfg["data"]["name"] == "auto":
                raise ValueError("explaining a timm classifier needs images: choose data=image_manifest|genimage|cnnspot|aigcdetect")
            from trustlab.platform.data.images import image_datasets, take_arrays

            d, e = m["data"], m["eval"]
            dsets, _ = image_datasets(cfg["data"], int(d["size"]), seed=int(cfg["seed"]),
                                      endpoint=cfg["run"].get("s3_endpoint"))
            n = {"train": int(d["n_train_images"]), "val": int(e["n_val_images"]), "test": int(e["n_images"])}
            return {s: take_arrays(ds, n[s], ("x", "y", "vid")) for s, ds in dsets.items()}
        if self._external(cfg):
            from trustlab.platform.checkpoints import load_state
            from trustlab.platform.registry import get_method

            st = load_state(m["blackbox"]["checkpoint"], cfg["run"].get("s3_endpoint"))
            bcfg = st["cfg"]
            if m["blackbox"].get("data_root"):
                bcfg["method"]["data"]["root"] = m["blackbox"]["data_root"]
            data = get_method(bcfg["method"]["name"]).build_data(bcfg)
            return {s: {k: np.asarray(v) for k, v in d.items() if k in ("x", "y", "vid")} for s, d in data.items()}
        d = m["data"]
        return digits_splits(int(cfg["seed"]), int(d["n_val"]), int(d["n_test"]))

    def _shape(self, cfg):
        if cfg["method"]["blackbox"].get("timm"):
            s = int(cfg["method"]["data"]["size"])
            return (3, s, s), int(cfg["method"]["blackbox"].get("num_classes") or 0)
        if self._external(cfg):
            from trustlab.platform.checkpoints import load_state

            st = load_state(cfg["method"]["blackbox"]["checkpoint"], cfg["run"].get("s3_endpoint"))
            s = int(st["cfg"]["method"]["data"]["size"])
            return (3, s, s), 2
        return (1, 8, 8), 10

    def build_model(self, cfg: dict, stage: str) -> nn.Module:
        shape, k = self._shape(cfg)
        return RelabelModel(cfg, shape, k + (1 if reject_spec(cfg) else 0))  # the reject output comes last

    def configure_optimizer(self, model, cfg, stage, steps_per_epoch=None):
        sub = model.blackbox if stage == "blackbox" else model.vae
        return torch.optim.AdamW(sub.parameters(), lr=float(cfg["method"][stage]["lr"]),
                                 weight_decay=float(cfg["trainer"]["weight_decay"]))

    def loss_step(self, model, batch, stage, cfg, step=None):
        x = _as_float(batch["x"])
        if stage == "blackbox":
            y = batch["y"]
            rj = reject_spec(cfg)
            if rj:
                x, y = with_reject_examples(x, y, rj, self._shape(cfg)[1])
            logits = model.blackbox(x)
            loss = F.cross_entropy(logits, y)
            return {"loss": loss, "acc": (logits.argmax(1) == y).float().mean()}
        if stage == "vae":
            model.blackbox.eval()
            return model.vae.loss(x, float(cfg["method"]["vae"]["beta"]))
        raise ValueError(f"stage {stage} has its own loop")

    def validate(self, model, stage, cfg, batches, ctx):
        model.eval()
        tot = {"n": 0, "correct": 0.0, "loss": 0.0, "mse": 0.0}
        with torch.no_grad():
            for b in batches:
                t = to_batch(b)
                x = _as_float(t["x"])
                n = len(x)
                if stage == "blackbox":
                    logits = model.blackbox(x)
                    tot["correct"] += float((logits.argmax(1) == t["y"]).sum())
                    tot["loss"] += float(F.cross_entropy(logits, t["y"], reduction="sum"))
                else:
                    torch.manual_seed(0)
                    o = model.vae.loss(x, float(cfg["method"]["vae"]["beta"]))
                    tot["loss"] += float(o["loss"]) * n
                    tot["mse"] += float(o["mse"]) * n
                tot["n"] += n
        parts = ctx.gather(tot)
        s = {k: sum(p[k] for p in parts) for k in tot}
        n = max(1, s["n"])
        if stage == "blackbox":
            return {"val_acc": s["correct"] / n, "val_loss": s["loss"] / n, "val_score": s["correct"] / n}
        return {"val_loss": s["loss"] / n, "val_recon_mse": s["mse"] / n, "val_score": -s["loss"] / n}

    def predict(self, model, batch, cfg):
        """The black box's probability of its top class (what re-label distillation explains)."""
        return model.probs(_as_float(batch["x"])).max(1).values

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, cfg: dict, model, data: dict, run_dir: str) -> dict:
        with worker_threads(cfg):
            return self._evaluate(cfg, model, data, run_dir)

    def _evaluate(self, cfg: dict, model, data: dict, run_dir: str) -> dict:
        m = cfg["method"]
        ecfg, rcfg = m["eval"], m["relabel"]
        seed = int(cfg["seed"])
        model.eval()
        te = data["test"]
        with torch.no_grad():
            xt = _as_float(torch.from_numpy(np.asarray(te["x"])))
            # a timm classifier's classes are not the data set's labels: no accuracy to report
            pred = model.probs(xt).argmax(1)
            acc = float("nan") if m["blackbox"].get("timm") else float((pred.numpy() == np.asarray(te["y"])).mean())
            rj = reject_spec(cfg)
            reject_class = self._shape(cfg)[1] if rj else None
            rejected = float((pred == reject_class).float().mean()) if rj else float("nan")
            torch.manual_seed(seed)
            vae = model.vae.loss(xt, float(m["vae"]["beta"]))
            mu, _ = model.vae.encode(xt)
            recon_mse = float((model.vae.decode(mu) - xt).pow(2).mean())
            mean_mse = float((xt - _as_float(torch.from_numpy(np.asarray(data["train"]["x"]))).mean(0)).pow(2).mean())
        n = min(len(te["y"]), int(ecfg["n_images"]))
        idx = np.arange(n)
        res, maps, rl, x, c, nb, seeds = _explain_metrics(model, te, cfg, idx, seed + 2, with_baselines=True)
        summary = {k: {"deletion_auc": float(v["deletion_auc"].mean()), "insertion_auc": float(v["insertion_auc"].mean()),
                       "deletion_auc_std": float(v["deletion_auc"].std()), "insertion_auc_std": float(v["insertion_auc"].std()),
                       "n": int(n)} for k, v in res.items()}
        # ablations: pixel-space perturbation instead of the VAE latent; hard labels only; raw-weight ranking
        base = A.baseline_image(x, rcfg.get("baseline", "zero"))
        abl = {}
        other = "pixel" if rcfg.get("perturb", "latent") == "latent" else "latent"
        nb_pix = neighbourhood(model, x, rcfg, seeds, perturb=other)
        e_pix = distil(nb_pix, x, rcfg)
        abl[f"relabel_{other}_perturbation"] = e_pix["contribution"]
        e_hard = distil(nb, x, rcfg, hard_weight=1.0)  # same neighbours, hard labels only
        abl["relabel_hard_labels_only"] = e_hard["contribution"]
        abl["relabel_weight_ranking"] = rl["weights"]
        ab = {}
        for k, a in abl.items():
            r = A.deletion_insertion(model.probs, x, c, a, base, ecfg.get("steps"))
            ab[k] = {"test": {"image": {"deletion_auc": float(r["deletion_auc"].mean()),
                                        "insertion_auc": float(r["insertion_auc"].mean()), "n": int(n)}}}
        # val figure of the method (same protocol as the relabel stage)
        nv = min(len(data["val"]["y"]), int(ecfg["n_val_images"]))
        vres, *_ = _explain_metrics(model, data["val"], cfg, np.arange(nv), seed + 1, with_baselines=False)
        rd = vres["relabel"]
        metrics = {
            "val": {"image": {"deletion_auc": float(rd["deletion_auc"].mean()),
                              "insertion_auc": float(rd["insertion_auc"].mean()), "n": int(nv)}},
            "test": {"image": summary["relabel"],
                     "blackbox": {"acc": acc, "n": int(len(te["y"]))},
                     "vae": {"recon_mse": recon_mse, "mean_image_mse": mean_mse, "elbo_loss": float(vae["loss"])},
                     "relabel": {"label_shift_rate": float(rl["shift_rate"].mean()),
                                 "student_agreement": float(rl["student_agreement"].mean()),
                                 "mean_radius": float(rl["radius"].mean()),
                                 f"{other}_label_shift_rate": float(e_pix["shift_rate"].mean())}},
            "baselines": {k: {"test": {"image": v}} for k, v in summary.items() if k != "relabel"},
            "ablation": ab,
        }
        if rj:  # the planted reject output: how often it fires on clean test digits and on each neighbourhood
            metrics["reject"] = {"test_digits": rejected, "neighbours": {
                k: _reject_share(model, v, reject_class) for k, v in ((rcfg.get("perturb", "latent"), nb), (other, nb_pix))}}
        try:
            self._plots(cfg, x, c, maps, rl, res, run_dir)
        except Exception as e:  # plots are a convenience; never lose the metrics over them
            print(f"[relabel] plotting failed: {e}", flush=True)
        lines = [f"relabel — explanations of {n} test images (black-box test acc {acc:.4f}; VAE recon MSE "
                 f"{recon_mse:.4f} vs mean image {mean_mse:.4f}); deletion AUC lower is better, insertion higher"]
        if rj:
            r = metrics["reject"]
            lines.append(f"  reject output fires on {r['test_digits']:.3f} of clean test digits; on neighbours: "
                         + ", ".join(f"{k} {v:.3f}" for k, v in r["neighbours"].items()))
        for k in ["relabel"] + [k for k in summary if k != "relabel"]:
            lines.append(f"  {k:<28} deletion {summary[k]['deletion_auc']:.4f}  insertion {summary[k]['insertion_auc']:.4f}")
        for k, v in ab.items():
            lines.append(f"  {k:<28} deletion {v['test']['image']['deletion_auc']:.4f}  insertion {v['test']['image']['insertion_auc']:.4f}  (ablation)")
        text = "\n".join(lines)
        print(text, flush=True)
        with open(os.path.join(run_dir, "explanations.txt"), "w") as f:
            f.write(text + "\n")
        return metrics

    def _plots(self, cfg, x, c, maps, rl, res, run_dir):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from trustlab.platform.plots import line_plot

        k = min(6, len(x))
        cols = ["image", "relabel weights"] + list(maps)
        fig, axes = plt.subplots(k, len(cols), figsize=(1.6 * len(cols), 1.6 * k))
        axes = np.atleast_2d(axes)
        for i in range(k):
            img = x[i].permute(1, 2, 0).numpy()
            for j, name in enumerate(cols):
                ax = axes[i, j]
                ax.set_xticks([])
                ax.set_yticks([])
                if name == "image":
                    ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None)
                    ax.set_ylabel(f"pred {int(c[i])}", fontsize=7)
                else:
                    h = (rl["weights"] if name == "relabel weights" else maps[name])[i].numpy()
                    v = max(abs(h).max(), 1e-12)
                    ax.imshow(h, cmap="bwr", vmin=-v, vmax=v)
                if i == 0:
                    ax.set_title(name.replace("_", " "), fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(run_dir, "heatmaps.png"), dpi=110)
        plt.close(fig)
        frac = next(iter(res.values()))["fraction"].numpy()
        line_plot({f"{k} (AUC {float(v['deletion_auc'].mean()):.3f})": (frac, v["deletion_curve"].mean(0).numpy())
                   for k, v in res.items()}, os.path.join(run_dir, "deletion.png"), "fraction of pixels deleted",
                  "p(predicted class)", "deletion (lower is better)")
        line_plot({f"{k} (AUC {float(v['insertion_auc'].mean()):.3f})": (frac, v["insertion_curve"].mean(0).numpy())
                   for k, v in res.items()}, os.path.join(run_dir, "insertion.png"), "fraction of pixels inserted",
                  "p(predicted class)", "insertion (higher is better)")

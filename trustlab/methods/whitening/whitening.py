"""Feature whitening for interpretable face-manipulation detection (arXiv 2106.10834).

From the paper's abstract: a feature whitening module inside the detector whitens its internal
mechanism through *feature decorrelation* and *feature constraint*, balancing accuracy and
interpretability. Nothing else of the paper is public (METHODS.md); everything below is our
standard design, with its knobs in ``experiments/conf/method/whitening.yaml``:

- A timm CNN (``method.backbone``, random init unless ``method.weights``): the C-channel output
  of its stage ``method.stage`` (an index into ``feature_info``) goes through ``GroupWhitening``:
  channels in groups of ``group_size``, each group centred and multiplied by Sigma^{-1/2} of its
  covariance over (batch, height, width). ``method.whitening``: ``newton`` = iterative
  Newton-Schulz as in IterNorm (Huang et al., CVPR 2019: Sigma_N = Sigma / tr(Sigma), P_0 = I,
  P_k = (3 P_{k-1} - P_{k-1}^3 Sigma_N) / 2, W = P_T / sqrt(tr(Sigma))), ``zca`` = eigendecomposition
  (exact, but its gradient is unstable when eigenvalues nearly coincide), ``none`` = identity
  (the ablation). Training uses batch statistics and keeps running mean / covariance;
  evaluation whitens with stored statistics (W computed from the stored covariance). After each
  epoch (in ``validate``) the stored statistics are re-estimated from ``calib_samples`` training
  images with the network in eval mode (like precise-BN): running averages of train-mode
  statistics whiten eval-mode features poorly (upstream batch norm switches to its running
  statistics; weights kept moving): a 3-4x higher test covariance (docs/results.md).
- The whitened map replaces the stage's output (a forward hook), so the rest of the CNN and its
  classifier run on it. Each whitened channel is one *axis*; an axis's share of a score is read
  as gradient x activation summed over its map.
- Losses: detection BCE + ``decorrelation`` weight x the mean squared off-diagonal correlation of
  all whitened axes (group whitening leaves cross-group correlation to this term; it also pulls
  the running-statistics whitening towards exact) + ``constraint`` weight x a concept-alignment
  loss: axis k (k < number of concepts) is tied to one interpretable unit — the region of one
  manipulation kind (``method.concepts``: blend, warp) — by a per-pixel logistic loss between
  an affine function of the axis map and the (downsampled) manipulation mask of samples of that
  kind (zero elsewhere and on real images).
- ``after_train`` writes per-axis activation maps as PNG overlays for a few test images
  (``axis_maps/``: the concept axes and the axes contributing most to each score), and reports
  the mean absolute off-diagonal covariance (and correlation) of the whitened vs the unwhitened
  features on the test split and how often each concept axis peaks inside the manipulated region.

Training: AdamW at peak lr ``method.lr`` with a linear warm-up and cosine decay over the stage
(``method.lr_schedule``; the schedule follows the optimizer's own step count, so a resumed run
continues it).

Default data: ``trustlab.methods.whitening.face_manip`` (real face photos with blended or warped regions).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from trustlab.platform.method import to_batch
from trustlab.platform.registry import register_method
from trustlab.platform.weights import create_timm

KINDS = ("none", "blend", "warp")  # manipulation kind ids used in batches (``kind``)


# ----------------------------------------------------------------------------- whitening math
def whitening_matrix(sigma: torch.Tensor, method: str = "newton", iters: int = 10) -> torch.Tensor:
    """Sigma^{-1/2} for a batch of SPD matrices [G, d, d]."""
    if method == "zca":
        lam, U = torch.linalg.eigh(sigma)
        return U @ torch.diag_embed(lam.clamp_min(1e-12).rsqrt()) @ U.transpose(-1, -2)
    if method != "newton":
        raise ValueError(f"whitening must be newton, zca or none; got {method!r}")
    d = sigma.shape[-1]
    eye = torch.eye(d, dtype=sigma.dtype, device=sigma.device).expand_as(sigma)
    tr = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None]
    y, z = sigma / tr, eye  # coupled Newton-Schulz: y -> Sigma_N^{1/2}, z -> Sigma_N^{-1/2}
    for _ in range(int(iters)):
        t = 0.5 * (3.0 * eye - z @ y)
        y, z = y @ t, t @ z
    return z / tr.sqrt()


class GroupWhitening(nn.Module):
    """Whitens [N, C, H, W] maps per channel group over (N, H, W); running statistics for eval."""

    def __init__(self, channels: int, group_size: int, method: str = "newton", iters: int = 10,
                 eps: float = 1e-3, momentum: float = 0.1):
        super().__init__()
        g = min(int(group_size), channels)
        if channels % g:
            raise ValueError(f"group_size {group_size} must divide the {channels} channels")
        self.C, self.g, self.G = channels, g, channels // g
        self.method, self.iters, self.eps, self.momentum = method, int(iters), float(eps), float(momentum)
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_cov", torch.eye(g).repeat(self.G, 1, 1))
        self._eval_wm = None

    def _groups(self, x):  # [N, C, H, W] -> [G, g, N*H*W]
        N, C, H, W = x.shape
        return x.permute(1, 0, 2, 3).reshape(self.G, self.g, N * H * W)

    def _ungroup(self, y, shape):
        N, C, H, W = shape
        return y.reshape(C, N, H, W).permute(1, 0, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == "none":
            return x
        xg = self._groups(x.float())
        eye = torch.eye(self.g, dtype=xg.dtype, device=xg.device)
        if self.training:
            mu = xg.mean(-1, keepdim=True)
            xc = xg - mu
            cov = xc @ xc.transpose(-1, -2) / xc.shape[-1]
            wm = whitening_matrix(cov + self.eps * eye, self.method, self.iters)
            with torch.no_grad():
                m = self.momentum
                self.running_mean.mul_(1 - m).add_(m * mu.detach().reshape(-1))
                self.running_cov.mul_(1 - m).add_(m * cov.detach())
            self._eval_wm = None
        else:
            mu = self.running_mean.view(self.G, self.g, 1)
            xc = xg - mu
            if self._eval_wm is None or self._eval_wm.device != xg.device:
                self._eval_wm = whitening_matrix(self.running_cov + self.eps * eye, self.method, max(self.iters, 30))
            wm = self._eval_wm
        return self._ungroup(wm @ xc, x.shape)

    @torch.no_grad()
    def set_statistics(self, feats) -> None:
        """Set the evaluation statistics to the exact mean / per-group covariance of ``feats``
        (an iterable of [N, C, H, W] maps)."""
        n, s1, s2 = 0, None, None
        for f in feats:
            x = flat_channels(f).double()
            s1 = x.sum(0) if s1 is None else s1 + x.sum(0)
            s2 = x.t() @ x if s2 is None else s2 + x.t() @ x
            n += x.shape[0]
        mu = s1 / n
        cov = s2 / n - mu[:, None] * mu[None, :]
        g = self.g
        self.running_mean.copy_(mu.float())
        self.running_cov.copy_(torch.stack([cov[i * g:(i + 1) * g, i * g:(i + 1) * g] for i in range(self.G)]).float())
        self._eval_wm = None

    def _load_from_state_dict(self, *args, **kwargs):
        self._eval_wm = None
        return super()._load_from_state_dict(*args, **kwargs)


def flat_channels(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] (or [M, C]) -> [M, C] samples of the channel vector."""
    if x.dim() == 4:
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    return x


def covariance(x: torch.Tensor) -> torch.Tensor:
    f = flat_channels(x).double()
    f = f - f.mean(0, keepdim=True)
    return f.t() @ f / max(1, f.shape[0] - 1)


def mean_abs_offdiag(m: torch.Tensor) -> float:
    d = m.shape[0]
    off = m[~torch.eye(d, dtype=torch.bool, device=m.device)]
    return float(off.abs().mean())


def correlation(cov: torch.Tensor) -> torch.Tensor:
    s = cov.diagonal().clamp_min(1e-12).sqrt()
    return cov / (s[:, None] * s[None, :])


def decorrelation_loss(z: torch.Tensor) -> torch.Tensor:
    """Mean squared off-diagonal correlation between all axes of z [N, C, H, W]."""
    f = flat_channels(z)
    f = f - f.mean(0, keepdim=True)
    f = f / (f.pow(2).mean(0, keepdim=True).sqrt() + 1e-5)
    c = f.t() @ f / f.shape[0]
    d = c.shape[0]
    return (c - torch.diag(torch.diagonal(c))).pow(2).sum() / (d * (d - 1))


# ----------------------------------------------------------------------------- model
class WhiteningNet(nn.Module):
    """A timm CNN whose stage ``method.stage`` output is replaced by its whitened version (a
    forward hook on that stage's module, so any timm model with ``feature_info`` works); the
    rest of the CNN and its classifier run on the whitened axes."""

    def __init__(self, cfg: dict):
        super().__init__()
        m = cfg["method"]
        self.cnn = create_timm(m["backbone"], m.get("weights"), cfg, what="the whitening CNN", num_classes=1,
                               drop_rate=float(m.get("dropout", 0.0)))
        info = self.cnn.feature_info[int(m["stage"])]
        self.stage_module = info["module"]
        self.channels = C = int(info["num_chs"])
        self.white = GroupWhitening(C, int(m["group_size"]), m["whitening"], int(m["iters"]),
                                    float(m["eps"]), float(m["momentum"]))
        self.concepts = list(m["concepts"])
        self.concept_scale = nn.Parameter(torch.full((len(self.concepts),), 2.0))
        self.concept_bias = nn.Parameter(torch.full((len(self.concepts),), -2.0))
        self._maps: dict = {}
        self.cnn.get_submodule(self.stage_module).register_forward_hook(self._whiten_hook)

    def _whiten_hook(self, module, inputs, output):
        z = self.white(output)
        self._maps = {"features": output, "whitened": z}
        return z

    def forward_maps(self, x: torch.Tensor) -> dict:
        logit = self.cnn((x - 0.5) / 0.25).squeeze(-1)
        out = dict(self._maps, logit=logit)
        self._maps = {}
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_maps(x)["logit"]


@torch.no_grad()
def calibrate(net: WhiteningNet, arrays: dict, n: int = 1024, batch_size: int = 256) -> None:
    """Re-estimate the whitening layer's evaluation statistics on the first ``n`` samples of
    ``arrays`` with the network in eval mode. Statistics gathered during training come from the
    train-mode network (batch-norm batch statistics upstream, weights still moving) and do not
    whiten the eval-mode features well; this pass (like precise-BN) fixes that."""
    if net.white.method == "none":
        return
    was = net.training
    net.eval()
    xs = arrays["x"][:n]

    def maps():
        for s in range(0, len(xs), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(xs[s:s + batch_size])).float().div_(255.0)
            yield net.forward_maps(x.to(next(net.parameters()).device))["features"]

    net.white.set_statistics(maps())
    net.train(was)


def concept_loss(net: WhiteningNet, z: torch.Tensor, mask: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
    """Per-pixel logistic loss tying axis k to the region of manipulation ``concepts[k]``."""
    if not net.concepts:
        return z.new_zeros(())
    tgt = F.adaptive_avg_pool2d(mask.float() / 255.0, z.shape[-2:])[:, 0]  # [N, h, w]
    losses = []
    for k, name in enumerate(net.concepts):
        on = (kind == KINDS.index(name)).float()[:, None, None]
        logit = net.concept_scale[k] * z[:, k] + net.concept_bias[k]
        t = tgt * on
        pw = ((1 - t).sum() / t.sum().clamp_min(1.0)).clamp(1.0, 50.0).detach()  # balance the rare region pixels
        losses.append(F.binary_cross_entropy_with_logits(logit, t, pos_weight=pw))
    return torch.stack(losses).mean()


def cosine_schedule(opt: torch.optim.Optimizer, total_steps: int, warmup_frac: float = 0.05) -> None:
    """Set each group's lr before every step from the optimizer's own step count (kept in its
    state dict, so a resumed run continues the schedule): linear warm-up, then cosine to 0."""
    import math

    for g in opt.param_groups:
        g.setdefault("base_lr", g["lr"])
    total, warm = max(1, int(total_steps)), max(1, int(warmup_frac * total_steps))

    def pre(optimizer, args, kwargs):
        p = next((p for g in optimizer.param_groups for p in g["params"] if p in optimizer.state), None)
        k = int(optimizer.state[p]["step"]) if p is not None else 0
        f = (k + 1) / warm if k < warm else 0.5 * (1 + math.cos(math.pi * min(1.0, (k - warm) / max(1, total - warm))))
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * f

    opt.register_step_pre_hook(pre)


# ----------------------------------------------------------------------------- method
@register_method("whitening")
class Whitening:
    modality = "face"
    BATCH_KEYS = ("x", "y", "vid", "mask", "kind")

    def build_data(self, cfg: dict) -> dict:
        from trustlab.methods.whitening import face_manip

        d = cfg["method"]["data"]
        if cfg["data"]["name"] != "auto":  # a real image set, streamed; it carries no manipulation masks
            from trustlab.platform.data.images import image_datasets

            dsets, df = image_datasets(cfg["data"], int(d["size"]), seed=int(cfg["seed"]),
                                       endpoint=cfg["run"].get("s3_endpoint"))
            d["n_train"] = int((df["split"] == "train").sum())  # sizes the lr schedule (written before any stage)
            print(f"[whitening] {cfg['data']['name']}: no manipulation masks, so the concept constraint "
                  f"(method.loss_weights.constraint) is off; decorrelation and detection train as usual", flush=True)
            return dsets
        data = face_manip.build(d["root"], int(cfg["seed"]), int(d["size"]), int(d["n_train"]), int(d["n_val"]),
                                int(d["n_test"]), float(d["blend_strength"]), float(d["warp_strength"]),
                                float(d["feather"]))
        for a in data.values():
            a["kind"] = np.array([KINDS.index(k) for k in a["manipulation"]], np.int64)
        return data

    def stage_data(self, cfg: dict, stage: str, data: dict) -> dict:
        """A streamed training split also gives ``calib``: its first ``calib_samples`` images."""
        if isinstance(data.get("train"), dict):
            return data
        return {**data, "calib": data["train"].limit(int(cfg["method"]["calib_samples"]))}

    def validate(self, model, stage, cfg, batches, ctx) -> dict:
        """Recalibrate the whitening statistics on training images (eval mode, the same images on
        every rank: a streamed ``calib`` split is gathered from all ranks), then the generic
        detection validation metrics."""
        from trustlab.platform.train import detection_validation

        net = model.module if hasattr(model, "module") else model
        n = int(cfg["method"]["calib_samples"])
        if ctx.data.get("train") is not None:
            calibrate(net, ctx.data["train"], n)
        elif "calib" in ctx.shards:
            mine = [b["x"] for b in ctx.shards["calib"].iter_batches(batch_size=256, batch_format="numpy")]
            parts = [p for p in ctx.gather(np.concatenate(mine) if mine else None) if p is not None]
            if parts:
                calibrate(net, {"x": np.concatenate(parts)}, n)
        return detection_validation(ctx.method, model, cfg, batches, ctx)

    def configure_optimizer(self, model, cfg: dict, stage: str, steps_per_epoch=None):
        """AdamW (peak lr ``method.lr`` or trainer.lr; trainer.weight_decay) with
        ``method.lr_schedule``: ``cosine`` = a linear warm-up over ``method.warmup_frac`` of the
        steps, then cosine decay to zero; ``constant``."""
        t, m = cfg["trainer"], cfg["method"]
        lr = float(m.get("lr") or t["lr"])
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                weight_decay=float(t["weight_decay"]))
        if m.get("lr_schedule", "constant") == "cosine":
            per_epoch = steps_per_epoch or -(-(int(m["data"]["n_train"]) // max(1, int(t.get("num_workers", 1))))
                                             // int(t["batch_size"]))
            cosine_schedule(opt, self.stage_epochs(cfg, stage) * per_epoch, float(m.get("warmup_frac", 0.05)))
        return opt

    def stage_epochs(self, cfg: dict, stage: str) -> int:
        return int(cfg["method"].get("epochs") or cfg["trainer"]["epochs"])

    def build_model(self, cfg: dict, stage: str) -> nn.Module:
        return WhiteningNet(cfg)

    def to_batch(self, arrays: dict) -> dict:
        return to_batch({k: v for k, v in arrays.items() if k in self.BATCH_KEYS})

    def loss_step(self, model, batch, stage, cfg, step=None):
        net = model.module if hasattr(model, "module") else model
        x = batch["x"]
        mask = batch.get("mask")
        if model.training and cfg["method"].get("hflip", True):
            flip = torch.rand(len(x), device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            if mask is not None:
                mask = torch.where(flip[:, None, None, None], mask.flip(-1), mask)
        out = net.forward_maps(x)
        y = batch["y"].float()
        det = F.binary_cross_entropy_with_logits(out["logit"], y)
        w = cfg["method"]["loss_weights"]
        dec = decorrelation_loss(out["whitened"]) if net.white.method != "none" else out["logit"].new_zeros(())
        con = concept_loss(net, out["whitened"], mask, batch["kind"]) if mask is not None and "kind" in batch \
            else out["logit"].new_zeros(())
        loss = det + float(w["decorrelation"]) * dec + float(w["constraint"]) * con
        acc = ((out["logit"] > 0).float() == y).float().mean()
        return {"loss": loss, "detection": det.detach(), "decorrelation": dec.detach(), "constraint": con.detach(),
                "acc": acc}

    def predict(self, model, batch, cfg):
        return torch.sigmoid(model(batch["x"]))

    def serve_inputs(self, images: list, cfg: dict) -> dict:
        """Decoded RGB uint8 images (a face crop each) -> resized to the training size."""
        from PIL import Image

        s = int(cfg["method"]["data"]["size"])
        xs = []
        for im in images:
            im = np.asarray(im)[..., :3].astype(np.uint8)
            if im.shape[:2] != (s, s):
                im = np.asarray(Image.fromarray(im).resize((s, s), Image.BILINEAR))
            xs.append(im.transpose(2, 0, 1))
        return {"x": torch.from_numpy(np.stack(xs)).float().div_(255.0)}

    # -- reporting
    def after_train(self, cfg: dict, model, data: dict, run_dir: str) -> dict:
        from trustlab.platform.evaluate import iter_array_batches

        model.eval()
        test = data["test"]
        if not isinstance(test, dict):  # a streamed set: the report reads its first report_samples images
            from trustlab.platform.data.images import take_arrays

            test = take_arrays(test, int(cfg["method"].get("report_samples", 512)))
        fs, zs = [], []
        with torch.no_grad():
            for b in iter_array_batches(test, int(cfg["trainer"]["eval_batch_size"])):
                o = model.forward_maps(self.to_batch(b)["x"])
                fs.append(o["features"])
                zs.append(o["whitened"])
        f, z = torch.cat(fs), torch.cat(zs)
        cf, cz = covariance(f), covariance(z)
        un, wh = mean_abs_offdiag(cf), mean_abs_offdiag(cz)
        out = {"decorrelation": {
            "split": "test", "channels": int(f.shape[1]), "samples": int(flat_channels(f).shape[0]),
            "unwhitened_mean_abs_offdiag_cov": un, "whitened_mean_abs_offdiag_cov": wh,
            "ratio_cov": wh / max(un, 1e-12),
            "unwhitened_mean_abs_offdiag_corr": mean_abs_offdiag(correlation(cf)),
            "whitened_mean_abs_offdiag_corr": mean_abs_offdiag(correlation(cz)),
            "whitened_mean_abs_diag_minus_1": float((cz.diagonal() - 1).abs().mean()),
        }}
        if "mask" in test:
            out["concept_axes"] = concept_pointing(model, z, test)
            out["concept_constraint"] = "on"
        else:
            out["concept_constraint"] = "off: the dataset has no manipulation masks (no concept axes to check)"
            out["summary_lines"] = [f"concept constraint {out['concept_constraint']}"]
        out["axis_maps"] = write_axis_maps(model, test, os.path.join(run_dir, "axis_maps"),
                                           int(cfg["method"].get("n_maps", 6)))
        return out


def concept_pointing(net: WhiteningNet, z: torch.Tensor, split: dict) -> dict:
    """For each concept axis: on test fakes of its kind, how often the axis map's maximum falls
    inside the manipulated region (mask > 0.5 after downsampling) and the region's share of the
    image (the chance level of that hit rate)."""
    out = {}
    mask = F.adaptive_avg_pool2d(torch.from_numpy(split["mask"]).float() / 255.0, z.shape[-2:])[:, 0]
    kinds = np.asarray(split["manipulation"])
    for k, name in enumerate(net.concepts):
        sel = np.nonzero(kinds == name)[0]
        if not len(sel):
            continue
        maps = z[sel, k].flatten(1)
        m = mask[sel].flatten(1)
        hit = (m.gather(1, maps.argmax(1, keepdim=True))[:, 0] > 0.5).float().mean()
        out[name] = {"axis": k, "pointing_acc": float(hit), "chance": float((m > 0.5).float().mean()),
                     "n": int(len(sel))}
    return out


def axis_attribution(net: WhiteningNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(whitened maps [N, C, h, w], per-axis share of each score [N, C]): gradient x activation
    of the logit summed over each axis map (Grad-CAM style, signed)."""
    net.eval()
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["z"] = output

    h = net.white.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logit = net.forward_maps(x)["logit"]
            logit.sum().backward()
    finally:
        h.remove()
    z = captured["z"]
    net.zero_grad(set_to_none=True)
    return z.detach(), (z.grad * z).sum((2, 3)).detach()


def write_axis_maps(net: WhiteningNet, split: dict, out_dir: str, n: int = 6, top: int = 3) -> list:
    """One PNG per chosen test image: the image, its manipulation mask, each concept axis and the
    ``top`` axes contributing most to its score, as heat-map overlays."""
    from trustlab.platform.plots import plt

    os.makedirs(out_dir, exist_ok=True)
    kinds = np.asarray(split["manipulation"])
    picks = []
    if "mask" in split:
        for kname in ("blend", "warp", "none"):
            picks += list(np.nonzero(kinds == kname)[0][: max(1, n // 3)])
    else:  # no masks (a real image set): fakes and reals
        y = np.asarray(split["y"])
        picks = list(np.nonzero(y == 1)[0][: max(1, n // 2)]) + list(np.nonzero(y == 0)[0][: max(1, n // 2)])
    picks = np.array(picks[:n], dtype=np.int64)
    x = torch.from_numpy(split["x"][picks]).float() / 255.0
    z, contrib = axis_attribution(net, x)
    paths = []
    for r, i in enumerate(picks):
        img = split["x"][i].transpose(1, 2, 0)
        axes = [(f"axis {k} ({c})", k) for k, c in enumerate(net.concepts)]
        order = [int(a) for a in contrib[r].argsort(descending=True) if int(a) >= len(net.concepts)][:top]
        axes += [(f"axis {a} ({float(contrib[r, a]):+.2f})", a) for a in order]
        first = 2 if "mask" in split else 1
        cols = first + len(axes)
        fig, ax = plt.subplots(1, cols, figsize=(2.1 * cols, 2.4))
        ax[0].imshow(img)
        ax[0].set_title(f"{kinds[i]} (id {int(split['vid'][i])})", fontsize=8)
        if "mask" in split:
            ax[1].imshow(img)
            ax[1].imshow(split["mask"][i, 0], cmap="Reds", alpha=0.5, vmin=0, vmax=255)
            ax[1].set_title("manipulated region", fontsize=8)
        H, W = img.shape[:2]
        for j, (title, a) in enumerate(axes):
            up = F.interpolate(z[r, a][None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0].numpy()
            ax[first + j].imshow(img)
            ax[first + j].imshow(up, cmap="jet", alpha=0.45)
            ax[first + j].set_title(title, fontsize=8)
        for a_ in ax:
            a_.axis("off")
        fig.tight_layout()
        p = os.path.join(out_dir, f"test_{int(split['vid'][i]):06d}_{kinds[i]}.png")
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    return paths

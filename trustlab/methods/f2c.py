"""F2C — Frequency Forgery Clue (arXiv 2511.00429) for generated-image detection.

Mechanism: generated images differ from real ones increasingly from low to high frequency
bands, so a *frequency-selective function* weights the Fourier spectrum before a CNN: bands at
or below ``tau`` are removed, higher ones are re-weighted by

    k(f) = a f^2 + b f + c,      w(f) = 0 for f <= tau,   (exp(k(f) / 2) - 1) / f above.

The coefficients (a, b, c) = (-0.2, 0.8, -0.05) are from a third-party summary of the paper
(METHODS.md, "verify before relying on it"); they, ``tau`` and the frequency normalisation are
config and swept by Tune. Frequency ``f`` is the radial frequency in cycles/pixel divided by
a normalisation (``method.freq_norm``): ``axis`` divides by the per-axis Nyquist 0.5 (f = 1 at
the axis Nyquist, sqrt(2) in the corners; the default), ``corner`` by the corner's sqrt(2)/2
(f <= 1 everywhere, so the same ``tau`` and coefficients select lower bands). The filtered
spectrum goes back to an image-shaped tensor (real part of the inverse FFT), is standardised
per image, and feeds a timm CNN (``resnet10t`` by default; any timm name works).
Ablation: ``method.filter=none`` feeds the raw image to the same CNN.

Default data: generated real/fake patches whose fakes carry a narrow-band, low-amplitude
periodic trace (``genimage_synth.band_artifact``), with both classes resized and JPEG-compressed.
The trace is tiny next to the image content, which lives in the low bands: the filter removes
those bands and re-weights the rest, so the trace dominates what the CNN sees; the raw-image
ablation has to learn that band-pass itself and, on the same budget, does not (test_f2c.py).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from trustlab.platform.registry import register_method
from trustlab.platform.weights import create_timm


FREQ_NORMS = {"axis": 0.5, "corner": math.sqrt(0.5)}  # cycles/pixel that map to f = 1


def radial_frequency(h: int, w: int, device=None, norm: str = "axis") -> torch.Tensor:
    if norm not in FREQ_NORMS:
        raise ValueError(f"freq_norm must be one of {sorted(FREQ_NORMS)}, got {norm!r}")
    fy = torch.fft.fftfreq(h, device=device).abs()
    fx = torch.fft.fftfreq(w, device=device).abs()
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / FREQ_NORMS[norm]


def selective_weight(f: torch.Tensor, tau: float, a: float, b: float, c: float) -> torch.Tensor:
    """w(f): zero for f <= tau, (exp(k(f)/2) - 1) / f above."""
    k = a * f**2 + b * f + c
    w = (torch.exp(k / 2) - 1) / f.clamp_min(1e-6)
    return torch.where(f > tau, w, torch.zeros_like(w))


class SpectralFilter(nn.Module):
    """Weights the 2-D Fourier spectrum of each channel by w(|f|) and returns the real part of
    the inverse transform, standardised per image. ``mode="none"`` is the identity (ablation)."""

    def __init__(self, tau: float, a: float, b: float, c: float, mode: str = "f2c", norm: str = "axis"):
        super().__init__()
        if mode not in ("f2c", "none"):
            raise ValueError(f"filter must be 'f2c' or 'none', got {mode!r}")
        if norm not in FREQ_NORMS:
            raise ValueError(f"freq_norm must be one of {sorted(FREQ_NORMS)}, got {norm!r}")
        self.mode, self.tau, self.coef, self.norm = mode, float(tau), (float(a), float(b), float(c)), norm
        self._cache: dict = {}

    def weight(self, h: int, w: int, device) -> torch.Tensor:
        key = (h, w, str(device))
        if key not in self._cache:
            self._cache[key] = selective_weight(radial_frequency(h, w, device, self.norm), self.tau, *self.coef)
        return self._cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return (x - 0.5) / 0.25
        spec = torch.fft.fft2(x.float())
        y = torch.fft.ifft2(spec * self.weight(x.shape[-2], x.shape[-1], x.device)).real
        return y / (y.flatten(1).std(dim=1).view(-1, 1, 1, 1) + 1e-6)


class F2CNet(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        m = cfg["method"]
        co = m["coeffs"]
        # configs saved before freq_norm existed used the axis normalisation
        self.filter = SpectralFilter(m["tau"], co["a"], co["b"], co["c"], m["filter"], m.get("freq_norm", "axis"))
        self.backbone = create_timm(m["backbone"], m.get("weights"), cfg, what="the F2C backbone", num_classes=1,
                                    drop_rate=float(m.get("dropout", 0.0)))

    def forward(self, x):
        return self.backbone(self.filter(x)).squeeze(-1)


@register_method("f2c")
class F2C:
    modality = "image"

    def build_data(self, cfg: dict) -> dict:
        from trustlab.platform.data.genimage_synth import build_manifest, load_image_manifest

        d = cfg["method"]["data"]
        if cfg["data"]["name"] != "auto":  # a real image set (data=genimage|cnnspot|aigcdetect|image_manifest), streamed
            from trustlab.platform.data.images import image_datasets

            return image_datasets(cfg["data"], int(d["size"]), seed=int(cfg["seed"]),
                                  endpoint=cfg["run"].get("s3_endpoint"))[0]
        man = build_manifest(d["root"], int(cfg["seed"]), int(d["size"]), int(d["n_train"]),
                             int(d["n_val"]), int(d["n_test"]), float(d["artifact_strength"]),
                             d.get("artifact", "decoder"), d.get("band"))
        return load_image_manifest(man)

    def build_model(self, cfg: dict, stage: str) -> nn.Module:
        return F2CNet(cfg)

    def loss_step(self, model, batch, stage, cfg, step=None):
        x = batch["x"]
        if model.training:  # random 90-degree rotations keep the spectrum's statistics
            k = int(torch.randint(0, 4, (1,)))
            x = torch.rot90(x, k, dims=(2, 3))
        logits = model(x)
        loss = F.binary_cross_entropy_with_logits(logits, batch["y"].float())
        acc = ((logits > 0).long() == batch["y"]).float().mean()
        return {"loss": loss, "acc": acc}

    def predict(self, model, batch, cfg):
        return torch.sigmoid(model(batch["x"]))

    def serve_inputs(self, images: list, cfg: dict) -> dict:
        """Decoded RGB uint8 images -> centre crop to the training size (no resampling when the
        image is large enough: resampling would blur the high-frequency clues)."""
        s = int(cfg["method"]["data"]["size"])
        xs = []
        for im in images:
            im = np.asarray(im)
            h, w = im.shape[:2]
            if h < s or w < s:
                from PIL import Image

                im = np.asarray(Image.fromarray(im).resize((max(s, w), max(s, h)), Image.BILINEAR))
                h, w = im.shape[:2]
            y0, x0 = (h - s) // 2, (w - s) // 2
            xs.append(im[y0 : y0 + s, x0 : x0 + s].transpose(2, 0, 1))
        return {"x": torch.from_numpy(np.stack(xs)).float().div_(255.0)}

"""Attribution maps and their faithfulness metrics, for any image classifier given as a function.

Every function takes ``fn``: a callable mapping a float batch ``x`` (B x C x H x W) to class
probabilities (B x K), the images ``x``, and the explained classes ``c`` (B,). Attribution maps
are B x H x W (one value per pixel; channels are combined), larger = more evidence for ``c``.

Baselines (the standard simple attributions):

- ``gradient_saliency``: ``max_channel |d p_c / d x|`` (Simonyan et al., 2014).
- ``gradient_x_input``: ``sum_channel d p_c / d x * (x - baseline)``.
- ``occlusion``: the drop of ``p_c`` when a ``patch`` x ``patch`` window is set to the baseline,
  averaged over the windows covering each pixel (Zeiler & Fergus, 2014).
- ``lime``: LIME-style (Ribeiro et al., 2016): random on/off masks over a grid of cells (a cell
  off = set to the baseline), an exponential kernel on the fraction of cells switched off, and a
  weighted ridge regression of ``p_c`` on the masks; the coefficients are the attribution.
- ``random_attribution``: a seeded random map (the floor every method must beat).

Metrics (Petsiuk et al., RISE, 2018): ``deletion_insertion`` removes pixels from the image in
order of decreasing attribution (set to the baseline) or inserts them into the baseline image,
recording ``p_c`` after each step; the area under each curve (x axis normalised to [0, 1]) is the
score — lower deletion AUC and higher insertion AUC mean a more faithful map.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def baseline_image(x: torch.Tensor, kind: str = "zero") -> torch.Tensor:
    """The "absent" image: ``zero`` (black), ``mean`` (per-image channel mean) or ``blur``."""
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone()
    if kind == "blur":
        k = max(3, (min(x.shape[-2:]) // 4) | 1)
        sigma = k / 3.0
        r = torch.arange(k, dtype=x.dtype, device=x.device) - k // 2
        g = torch.exp(-(r**2) / (2 * sigma**2))
        g = g / g.sum()
        c = x.shape[1]
        y = F.conv2d(F.pad(x, (k // 2, k // 2, 0, 0), mode="replicate"), g.view(1, 1, 1, k).repeat(c, 1, 1, 1), groups=c)
        return F.conv2d(F.pad(y, (0, 0, k // 2, k // 2), mode="replicate"), g.view(1, 1, k, 1).repeat(c, 1, 1, 1), groups=c)
    raise ValueError(f"unknown baseline {kind!r}; valid: zero, mean, blur")


def per_item_seeds(seed, n: int) -> list[int]:
    """One seed per image: a sequence is taken as is; an int ``s`` gives ``s * 1000003 + i``.
    Per-image seeds make an image's attribution independent of the batch it is computed in."""
    if isinstance(seed, (int, np.integer)):
        return [int(seed) * 1000003 + i for i in range(n)]
    out = [int(s) for s in np.asarray(seed).reshape(-1)]
    if len(out) != n:
        raise ValueError(f"need {n} seeds, got {len(out)}")
    return out


def class_prob(fn, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return fn(x).gather(1, c.view(-1, 1)).squeeze(1)


def _batched(fn, x: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    return torch.cat([fn(x[i : i + chunk]) for i in range(0, len(x), chunk)]) if len(x) else fn(x)


def cell_pool(x: torch.Tensor, cell: int) -> torch.Tensor:
    """B x C x H x W -> B x (H/cell * W/cell): the channel-mean of each ``cell`` x ``cell`` cell."""
    return F.avg_pool2d(x.mean(1, keepdim=True), cell).flatten(1)


def cell_unpool(w: torch.Tensor, cell: int, h: int, wd: int) -> torch.Tensor:
    """B x n_cells -> B x H x W (each cell's value on its pixels)."""
    gh, gw = h // cell, wd // cell
    return w.view(-1, 1, gh, gw).repeat_interleave(cell, 2).repeat_interleave(cell, 3)[:, 0]


def gradient_saliency(fn, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        g, = torch.autograd.grad(class_prob(fn, x, c).sum(), x)
    return g.abs().amax(dim=1)


def gradient_x_input(fn, x: torch.Tensor, c: torch.Tensor, baseline: torch.Tensor | None = None) -> torch.Tensor:
    b = torch.zeros_like(x) if baseline is None else baseline
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        g, = torch.autograd.grad(class_prob(fn, x, c).sum(), x)
    return (g * (x.detach() - b)).sum(dim=1)


@torch.no_grad()
def occlusion(fn, x: torch.Tensor, c: torch.Tensor, patch: int = 2, stride: int = 1,
              baseline: torch.Tensor | None = None) -> torch.Tensor:
    b = torch.zeros_like(x) if baseline is None else baseline
    n, _, h, w = x.shape
    p0 = class_prob(fn, x, c)
    heat = torch.zeros(n, h, w, dtype=x.dtype, device=x.device)
    cnt = torch.zeros(h, w, dtype=x.dtype, device=x.device)
    for y0 in range(0, h - patch + 1, stride):
        for x0 in range(0, w - patch + 1, stride):
            xo = x.clone()
            xo[:, :, y0 : y0 + patch, x0 : x0 + patch] = b[:, :, y0 : y0 + patch, x0 : x0 + patch]
            heat[:, y0 : y0 + patch, x0 : x0 + patch] += (p0 - class_prob(fn, xo, c))[:, None, None]
            cnt[y0 : y0 + patch, x0 : x0 + patch] += 1
    return heat / cnt.clamp_min(1)


@torch.no_grad()
def lime(fn, x: torch.Tensor, c: torch.Tensor, cell: int = 1, n_samples: int = 500, seed=0,
         baseline: torch.Tensor | None = None, kernel_width: float = 0.25, ridge: float = 1.0,
         keep_prob: float = 0.5) -> torch.Tensor:
    """LIME-style attribution over a grid of ``cell`` x ``cell`` cells (see the module docstring)."""
    b = torch.zeros_like(x) if baseline is None else baseline
    n, ch, h, w = x.shape
    nc = (h // cell) * (w // cell)
    z = torch.stack([torch.rand(n_samples, nc, generator=torch.Generator().manual_seed(s)) < keep_prob
                     for s in per_item_seeds(seed, n)]).to(x.dtype)
    z[:, 0] = 1.0  # the image itself
    zm = cell_unpool(z.reshape(-1, nc), cell, h, w).view(n, n_samples, 1, h, w).to(x.device)
    xs = x[:, None] * zm + b[:, None] * (1 - zm)
    p = _batched(lambda t: fn(t), xs.reshape(-1, ch, h, w)).view(n, n_samples, -1)
    y = p.gather(2, c.view(-1, 1, 1).expand(n, n_samples, 1)).squeeze(2)
    d = 1.0 - z.mean(2)  # fraction switched off (cosine-like distance to the all-on vector)
    k = torch.exp(-(d**2) / kernel_width**2).to(x.device)
    Z = torch.cat([z.to(x.device), torch.ones(n, n_samples, 1, dtype=x.dtype, device=x.device)], 2)
    A = Z.transpose(1, 2) @ (Z * k[..., None]) + ridge * torch.diag_embed(
        torch.cat([torch.ones(nc), torch.zeros(1)]).to(x)).expand(n, -1, -1)
    rhs = Z.transpose(1, 2) @ (k * y)[..., None]
    # A is symmetric positive definite (ridge on the cells, the kernel mass on the intercept): Cholesky, as
    # batched LU fails on some well-conditioned systems of this size (see relabel.fit_linear_students)
    coef = torch.cholesky_solve(rhs, torch.linalg.cholesky(A))[:, :nc, 0]
    return cell_unpool(coef, cell, h, w)


def random_attribution(n: int, h: int, w: int, seed=0) -> torch.Tensor:
    return torch.stack([torch.rand(h, w, generator=torch.Generator().manual_seed(s)) for s in per_item_seeds(seed, n)])


@torch.no_grad()
def deletion_insertion(fn, x: torch.Tensor, c: torch.Tensor, attribution: torch.Tensor,
                       baseline: torch.Tensor | None = None, steps: int | None = None) -> dict:
    """Deletion and insertion curves (B x (steps + 1)) and their AUCs (B,). Pixels are taken in
    order of decreasing attribution (ties: lower index first, so the order is deterministic)."""
    b = torch.zeros_like(x) if baseline is None else baseline
    n, ch, h, w = x.shape
    hw = h * w
    steps = hw if steps is None else int(min(steps, hw))
    per = int(math.ceil(hw / steps))
    a = attribution.reshape(n, hw).float()
    # stable descending order
    order = torch.from_numpy(np.stack([np.argsort(-ai, kind="stable") for ai in a.cpu().numpy()])).to(x.device)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(hw, device=x.device).expand(n, hw))
    counts = [min(hw, k * per) for k in range(steps + 1)]
    dels, ins = [], []
    for k in counts:
        on = (rank < k).view(n, 1, h, w).to(x.dtype)  # the k most important pixels
        dels.append(x * (1 - on) + b * on)
        ins.append(b * (1 - on) + x * on)
    m = len(counts)
    allx = torch.stack(dels + ins, 1).reshape(-1, ch, h, w)
    cc = c.view(-1, 1).expand(n, 2 * m).reshape(-1)
    p = class_prob(fn, allx, cc) if len(allx) <= 4096 else torch.cat(
        [class_prob(fn, allx[i : i + 4096], cc[i : i + 4096]) for i in range(0, len(allx), 4096)])
    p = p.view(n, 2 * m)
    dc, ic = p[:, :m], p[:, m:]
    xs = torch.tensor(counts, dtype=p.dtype, device=p.device) / hw

    def auc(curve):
        return torch.trapezoid(curve, xs, dim=1)

    return {"deletion_curve": dc, "insertion_curve": ic, "fraction": xs,
            "deletion_auc": auc(dc), "insertion_auc": auc(ic)}

"""FSCIL engine: what CD² and SDC share beyond the protocol (``protocol.py``), as functions they call.

Driving. An FSCIL method runs as two Ray Train stages. ``base`` is the platform's generic loop
with ``base_loss``, ``base_optimizer`` and ``base_validation`` (cross-entropy on the base
classes; checkpoints ranked by base-class validation accuracy). ``incremental`` is
``incremental_worker``, i.e. ``run_sessions`` on a ``WorkerContext``: ``begin_incremental`` once,
``learn_session`` for each session, one ``report`` per session. ``fit_inprocess`` runs both stages
in one process without Ray on ``WorkerContext.local``. A method is a plain class that delegates
its Method members to the functions here and supplies the ``SessionLearner`` hooks; its model
keeps one head per session so that every session's model can be evaluated from the final
checkpoint. Config read here: ``method.base`` (epochs, lr, weight decay, shift),
``method.baselines`` (fine-tune steps / lr) and ``method.session.shift``. The base stage runs on
the GPU when the cluster has one; the incremental stage and the driver-side evaluation use CPU
tensors (few-shot sessions are small). This module names no method.

Metrics. ``session_accuracies`` gives top-1 accuracy (percent) over all seen classes after each
session; ``summarize_sessions`` adds the average and the performance drop PD = first - last.
``finetune_baseline`` (all weights fine-tuned on each session's shots) and
``prototype_baseline`` (frozen encoder, nearest class-mean by cosine) run from a method's base
model. ``session_table`` / ``session_plot`` write the per-session CSV and the accuracy-per-session
PNG; ``python -m trustlab.methods.fscil.engine plot RUN_DIR... -o out.png`` draws several runs
(every method and baseline) in one plot.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict
from typing import Protocol as TypingProtocol

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from trustlab.methods.fscil.protocol import Protocol, protocol_of, seen_split, session_split
from trustlab.platform.registry import get_method
from trustlab.platform.train import WorkerContext, run_epochs


# ============================================================================ models, augmentation
class SmallConvNet(nn.Module):
    """conv3x3-BN-ReLU blocks of ``width * 2**i`` channels, 2x2 max-pool after a block while the
    side is above 4, global average pool: a feature vector of ``out_dim`` for small images."""

    def __init__(self, in_ch: int, size: int, width: int = 32, depth: int = 3):
        super().__init__()
        layers, c, side = [], in_ch, size
        for i in range(depth):
            w = width * 2**i
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if side > 4 and i < depth - 1:
                layers.append(nn.MaxPool2d(2))
                side //= 2
            c = w
        self.body = nn.Sequential(*layers)
        self.out_dim = c

    def forward(self, x):
        return self.body(x).mean(dim=(2, 3))


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero fill)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4)
    d = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    out = torch.empty_like(x)
    for dy in range(2 * max_shift + 1):
        for dx in range(2 * max_shift + 1):
            m = (d[:, 0] == dy) & (d[:, 1] == dx)
            if m.any():
                out[m] = pad[m, :, dy:dy + h, dx:dx + w]
    return out


def as_float(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x)) if not torch.is_tensor(x) else x
    return t.float().div(255.0) if t.dtype == torch.uint8 else t.float()


def imprint_rows(feats: torch.Tensor, y: torch.Tensor, classes, ref_weight: torch.Tensor) -> torch.Tensor:
    """Classifier rows for ``classes``: the normalised mean feature of each class, scaled to the
    mean norm of ``ref_weight``'s rows (weight imprinting)."""
    scale = ref_weight.norm(dim=1).mean()
    rows = [F.normalize(feats[y == c].mean(0), dim=0) * scale for c in classes]
    return torch.stack(rows)


@torch.no_grad()
def encode(module, x, batch: int = 512) -> torch.Tensor:
    module.eval()
    return torch.cat([module(as_float(x[i:i + batch])) for i in range(0, len(x), batch)]) if len(x) else torch.zeros(0)


# ============================================================================ metrics
@torch.no_grad()
def session_accuracies(logits_fn, test: dict, p: Protocol, batch: int = 512) -> list[float]:
    """Top-1 accuracy (percent) after each session 0..N over the test images of every class seen
    so far; ``logits_fn(x_float, s)`` scores at least the ``n_seen(s)`` seen classes."""
    accs = []
    for s in range(p.n_sessions + 1):
        sub = seen_split(test, p, s)
        correct = 0
        for i in range(0, len(sub["y"]), batch):
            lg = logits_fn(as_float(sub["x"][i:i + batch]), s)[:, : p.n_seen(s)]
            correct += int((lg.argmax(1).cpu().numpy() == sub["y"][i:i + batch]).sum())
        accs.append(100.0 * correct / max(1, len(sub["y"])))
    return accs


def performance_drop(accs) -> float:
    """PD = accuracy after the first (base) session minus accuracy after the last one."""
    return float(accs[0]) - float(accs[-1])


def summarize_sessions(accs) -> dict:
    accs = [float(a) for a in accs]
    return {"sessions": accs, "average": float(np.mean(accs)), "pd": performance_drop(accs),
            "last": accs[-1], "first": accs[0]}


@torch.no_grad()
def split_accuracy(logits_fn, arrays: dict, s: int, mask=None, batch: int = 512) -> tuple[int, int]:
    """(correct, count) of ``logits_fn(., s)`` on the rows of ``arrays`` (optionally masked)."""
    if mask is not None:
        arrays = {k: v[mask] for k, v in arrays.items()}
    correct = 0
    for i in range(0, len(arrays["y"]), batch):
        lg = logits_fn(as_float(arrays["x"][i:i + batch]), s)
        correct += int((lg.argmax(1).cpu().numpy() == np.asarray(arrays["y"][i:i + batch])).sum())
    return correct, int(len(arrays["y"]))


def session_table(results: dict) -> pd.DataFrame:
    """``results``: {name: summarize_sessions(...)} -> one row per name, one column per session."""
    rows = []
    for name, r in results.items():
        row = {"method": name}
        row.update({f"s{i}": round(a, 2) for i, a in enumerate(r["sessions"])})
        row.update(average=round(r["average"], 2), pd=round(r["pd"], 2), last=round(r["last"], 2))
        rows.append(row)
    return pd.DataFrame(rows)


def session_plot(results: dict, path: str, title: str = "FSCIL accuracy per session") -> str:
    from trustlab.platform.plots import line_plot

    n = max(len(r["sessions"]) for r in results.values())
    series = {f"{k} (avg {r['average']:.1f}, PD {r['pd']:.1f})": (list(range(len(r["sessions"]))), r["sessions"])
              for k, r in results.items()}
    return line_plot(series, path, "session", "top-1 accuracy over seen classes (%)", title, xticks=list(range(n)))


def runs_results(run_dirs) -> dict:
    """{label: summary} of the method and every baseline in each run folder's metrics.json
    (with several runs, a baseline is labelled by the method whose base model it started from)."""
    import json

    run_dirs = list(run_dirs)
    out = {}
    for d in run_dirs:
        with open(os.path.join(d, "metrics.json") if os.path.isdir(d) else d) as f:
            m = json.load(f)
        run = os.path.basename(os.path.normpath(d if os.path.isdir(d) else os.path.dirname(d)))
        name = m.get("method", run)
        name = name if name not in out else f"{name} ({run})"
        out[name] = {k: m[k] for k in ("sessions", "average", "pd", "last")}
        for b, r in (m.get("baselines") or {}).items():
            label = b if len(run_dirs) == 1 else f"{b} ({name} base)"
            out[label if label not in out else f"{label} ({run})"] = r
    return out


# ============================================================================ baselines
def prototype_baseline(encoder: nn.Module, data: dict, p: Protocol) -> list[float]:
    """Frozen encoder, classes scored by cosine similarity to their mean training feature (base
    classes: all base training images; new classes: their shots)."""
    tr = data["train"]
    f = F.normalize(encode(encoder, tr["x"]), dim=1)
    y = torch.as_tensor(tr["y"])
    protos = F.normalize(torch.stack([f[y == c].mean(0) for c in range(p.n_classes)]), dim=1)
    encoder.eval()
    return session_accuracies(lambda x, s: F.normalize(encoder(x), dim=1) @ protos[: p.n_seen(s)].T, data["test"], p)


def finetune_baseline(encoder: nn.Module, classifier: nn.Linear, data: dict, p: Protocol, steps: int,
                      lr: float, shift: int = 0, seed: int = 0) -> list[float]:
    """Fine-tune every weight of (a copy of) the base model on each session's shots alone.
    New classifier rows are imprinted (as the methods do); BatchNorm statistics stay frozen, so
    the baseline differs from the methods only in what it trains and on which data."""
    enc, old = copy.deepcopy(encoder), classifier
    fc = nn.Linear(old.in_features, p.n_base)
    with torch.no_grad():
        fc.weight.copy_(old.weight[: p.n_base])
        fc.bias.copy_(old.bias[: p.n_base])
    gen = torch.Generator().manual_seed(int(seed))

    def logits(x, s):
        enc.eval()
        return fc(enc(x))

    accs = [session_accuracies(logits, data["test"], p)[0]]
    for s in range(1, p.n_sessions + 1):
        sh = session_split(data["train"], s)
        x, y = as_float(sh["x"]), torch.as_tensor(sh["y"])
        with torch.no_grad():
            rows = imprint_rows(encode(enc, x), y, p.session_classes(s), fc.weight)
            new = nn.Linear(fc.in_features, p.n_seen(s))
            new.weight.copy_(torch.cat([fc.weight, rows]))
            new.bias.copy_(torch.cat([fc.bias, fc.bias.mean().expand(len(rows))]))
        fc = new
        opt = torch.optim.Adam(list(enc.parameters()) + list(fc.parameters()), lr=lr)
        enc.eval()  # BN statistics frozen; weights still trained
        for _ in range(steps):
            loss = F.cross_entropy(fc(enc(random_shift(x, shift, gen))), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sub = seen_split(data["test"], p, s)
        c, n = split_accuracy(logits, sub, s)
        accs.append(100.0 * c / max(1, n))
    return accs

# ============================================================================ session driving
class SessionLearner(TypingProtocol):
    """The FSCIL hooks the functions below call on a method (besides the Method members)."""

    name: str

    def session_logits(self, model, x: torch.Tensor, s: int) -> torch.Tensor:
        """Scores of float images ``x`` by session ``s``'s model, over at least ``n_seen(s)`` classes."""

    def base_encoder(self, model) -> nn.Module:
        """The base model's feature extractor (the baselines start from it)."""

    def base_classifier(self, model) -> nn.Linear:
        """The base model's linear classifier over the base classes."""

    def begin_incremental(self, model, ctx: WorkerContext) -> dict | None:
        """Once, before session 1, on every rank (e.g. freeze the backbone, write base-class memory)."""

    def learn_session(self, model, s: int, ctx: WorkerContext) -> dict | None:
        """Learn session ``s`` from ``ctx.data``; every rank must end with the same model."""


STAGES = ("base", "incremental")


def stage_epochs(cfg: dict, stage: str) -> int:
    """Base: ``method.base.epochs``; incremental: one "epoch" (report) per session."""
    return int(cfg["method"]["base"]["epochs"]) if stage == "base" else protocol_of(cfg).n_sessions


def stage_selects(cfg: dict, stage: str) -> bool:
    return stage == "base"  # incremental: the latest checkpoint (after the last session)


def stage_data(cfg: dict, stage: str, data: dict) -> dict:
    """Base: the base classes' rows; incremental: train and val, never the test split."""
    if stage == "base":
        out = {"train": session_split(data["train"], 0)}
        if "val" in data:
            out["val"] = session_split(data["val"], 0)
        return out
    return {k: v for k, v in data.items() if k in ("train", "val")}


def worker_loop_for(stage: str):
    return incremental_worker if stage == "incremental" else None


def base_optimizer(model: nn.Module, cfg: dict):
    b = cfg["method"]["base"]
    return torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=float(b["lr"]),
                             weight_decay=float(b["weight_decay"]))


def base_loss(method: SessionLearner, model, batch: dict, cfg: dict) -> dict:
    """Cross-entropy of session 0's logits on base classes (random shifts while training)."""
    x = batch["x"]
    if model.training:
        x = random_shift(x, int(cfg["method"]["base"]["shift"]))
    logits = method.session_logits(model, x, 0)
    loss = F.cross_entropy(logits, batch["y"])
    return {"loss": loss, "acc": (logits.argmax(1) == batch["y"]).float().mean()}


@torch.no_grad()
def recompute_batchnorm(method: SessionLearner, model, ctx: WorkerContext) -> int:
    """Set every BatchNorm layer's running statistics to those of the base training images
    (this rank's shard, unaugmented, one pass, equal weight per batch), averaged over ranks.
    The running averages lag the weights: with a few steps an epoch (4 on two workers for
    digits) the base model's validation jumped 0.25-0.99 between epochs while the same weights
    with recomputed statistics held 0.93-1.0 (docs/results.md). Returns the layers updated."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    momenta = [b.momentum for b in bns]
    for b in bns:
        b.reset_running_stats()
        b.momentum = None  # cumulative average over the pass
    was = model.training
    model.train()
    for batch in ctx.train_batches(0):
        method.session_logits(model, as_float(batch["x"]).to(ctx.device), 0)
    model.train(was)
    for b, mo in zip(bns, momenta):
        b.momentum = mo
    if ctx.world > 1:
        parts = ctx.gather([(b.running_mean.cpu(), b.running_var.cpu()) for b in bns])
        for i, b in enumerate(bns):
            b.running_mean.copy_(torch.stack([p[i][0] for p in parts]).mean(0))
            b.running_var.copy_(torch.stack([p[i][1] for p in parts]).mean(0))
    return len(bns)


def base_validation(method: SessionLearner, model, cfg: dict, batches, ctx: WorkerContext) -> dict:
    """Base-class validation accuracy over every rank's share; ``val_score`` = ``val_acc``. With
    ``method.base.precise_bn`` the BatchNorm statistics are first recomputed on the training
    images (``recompute_batchnorm``), so validation and the checkpoint see the same statistics."""
    if cfg["method"]["base"].get("precise_bn"):
        recompute_batchnorm(method, model, ctx)
    model.eval()
    correct = count = 0
    with torch.no_grad():
        for b in batches:
            lg = method.session_logits(model, as_float(b["x"]).to(ctx.device), 0)
            correct += int((lg.argmax(1).cpu().numpy() == np.asarray(b["y"])).sum())
            count += len(b["y"])
    parts = ctx.gather((correct, count))
    acc = sum(c for c, _ in parts) / max(1, sum(n for _, n in parts))
    return {"val_acc": acc, "val_score": acc}


def session_val_metrics(method: SessionLearner, model, val: dict | None, p: Protocol, s: int) -> dict:
    """Validation accuracy after session ``s``: base classes and every seen class with val rows."""
    if val is None or not len(val["y"]):
        return {"val_score": float("nan")}

    def fn(x, ss):
        return method.session_logits(model, x, ss)[:, : p.n_seen(ss)]

    cb, nb = split_accuracy(fn, val, s, val["y"] < p.n_base)
    ca, na = split_accuracy(fn, val, s, val["y"] < p.n_seen(s))
    return {"val_base_acc": cb / max(1, nb), "val_acc": ca / max(1, na), "val_score": ca / max(1, na)}


def predict(method: SessionLearner, model, batch: dict, cfg: dict) -> torch.Tensor:
    """The final session's predicted class (as a float score)."""
    p = protocol_of(cfg)
    return method.session_logits(model, batch["x"], p.n_sessions)[:, : p.n_classes].argmax(1).float()


def evaluate(method: SessionLearner, cfg: dict, model, data: dict, run_dir: str) -> dict:
    """The whole ``metrics.json``: accuracy per session of the method and both baselines (from the
    same base model), ``sessions.csv`` and ``sessions.png``, base/novel test accuracy after the last
    session and base-class validation accuracy of the base model."""
    p, name = protocol_of(cfg), method.name
    model.eval()
    torch.manual_seed(int(cfg["seed"]))
    accs = session_accuracies(lambda x, s: method.session_logits(model, x, s), data["test"], p)
    bl = cfg["method"]["baselines"]
    ft = finetune_baseline(method.base_encoder(model), method.base_classifier(model), data, p, int(bl["steps"]),
                           float(bl["lr"]), int(cfg["method"]["session"]["shift"]), int(cfg["seed"]))
    proto = prototype_baseline(method.base_encoder(model), data, p)
    results = {name: summarize_sessions(accs), "finetune": summarize_sessions(ft),
               "prototype": summarize_sessions(proto)}
    table = session_table(results)
    table.to_csv(os.path.join(run_dir, "sessions.csv"), index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 40):
        print(f"[{name}] accuracy (%) over seen classes after each session "
              f"({p.n_base} base + {p.n_sessions} x {p.ways}-way {p.shots}-shot):\n{table.to_string(index=False)}",
              flush=True)
    session_plot(results, os.path.join(run_dir, "sessions.png"),
                 f"{name}: {cfg['method']['data']['benchmark']} {p.n_base}+{p.n_sessions}x{p.ways}w{p.shots}s")

    def fn(x, s):
        return method.session_logits(model, x, s)[:, : p.n_seen(s)]

    te, last = data["test"], p.n_sessions
    cb, nb = split_accuracy(fn, te, last, te["y"] < p.n_base)
    cn, nn_ = split_accuracy(fn, te, last, te["y"] >= p.n_base)
    out = dict(results[name])
    out.update(method=name, unit="percent", protocol=asdict(p),
               baselines={"finetune": results["finetune"], "prototype": results["prototype"]},
               test={"all_seen": {"acc": accs[-1] / 100.0, "n": int(len(te["y"]))},
                     "base": {"acc": cb / max(1, nb), "n": nb}, "novel": {"acc": cn / max(1, nn_), "n": nn_}})
    if "val" in data:
        c0, n0 = split_accuracy(fn, data["val"], 0, data["val"]["y"] < p.n_base)
        out["val"] = {"base": {"acc": c0 / max(1, n0), "n": n0}}
    return out


def run_sessions(ctx: WorkerContext) -> nn.Module:
    """The incremental stage on one worker: the base model (``ctx.build_model``, kept on the CPU),
    ``begin_incremental`` once, ``learn_session`` for each session, and one report per session
    (``epoch`` = session) with base-class and seen-class validation accuracy. A resumed run
    continues after the last reported session. Every rank reports the same number of times.
    Sessions stay fp32 on the CPU whatever ``trainer.precision`` says: a session is a few dozen
    shots and a few small steps (nothing for autocast or a GPU to gain), and the imprinted
    classifier rows and prototypes it compares by cosine would only take bf16 rounding."""
    method = ctx.method
    p = protocol_of(ctx.cfg)
    model = ctx.build_model(to_device=False)
    start = ctx.restore(model)
    if start == 0:
        t0 = time.time()
        info = method.begin_incremental(model, ctx) or {}
        ctx.log(f"prepared in {time.time() - t0:.1f}s " + " ".join(f"{k} {v:.4f}" for k, v in info.items()))
    for s in range(start + 1, p.n_sessions + 1):
        t0 = time.time()
        metrics = {k: float(v) for k, v in (method.learn_session(model, s, ctx) or {}).items()}
        metrics.update(session_val_metrics(method, model, ctx.data.get("val"), p, s))
        metrics.update(session=s, train_seconds=time.time() - t0)
        ctx.log(f"session {s}/{p.n_sessions} in {metrics['train_seconds']:.1f}s: "
                + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and k != "train_seconds"))
        ctx.report(metrics, model, epoch=s)
    model.eval()
    return model


def incremental_worker(config: dict) -> None:
    """Per-worker function of an FSCIL method's ``incremental`` stage (``worker_loop_for``)."""
    run_sessions(WorkerContext.from_ray(config))


def fit_inprocess(cfg: dict, data: dict) -> nn.Module:
    """Both stages in one process without Ray (tests, quick experiments), through the same code as
    on Ray: the base stage in the platform's generic loop, its best-validated epoch kept, then
    ``run_sessions``. Returns the final model."""
    method = get_method(cfg["method"]["name"])
    base = WorkerContext.local(cfg, "base", method.stage_data(cfg, "base", data), validate=True)
    run_epochs(base)
    inc = WorkerContext.local(cfg, "incremental", method.stage_data(cfg, "incremental", data), init_from=base.best_state)
    return run_sessions(inc)


def _main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m trustlab.methods.fscil.engine")
    sub = ap.add_subparsers(dest="cmd", required=True)
    pl = sub.add_parser("plot", help="one accuracy-per-session plot of several FSCIL runs")
    pl.add_argument("runs", nargs="+", help="run folders (or metrics.json files)")
    pl.add_argument("-o", "--out", default="fscil_sessions.png")
    a = ap.parse_args(argv)
    res = runs_results(a.runs)
    session_plot(res, a.out)
    print(session_table(res).to_string(index=False))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())

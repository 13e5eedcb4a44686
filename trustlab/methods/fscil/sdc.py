"""SDC — Static-Dynamic Collaboration for few-shot class-incremental learning (arXiv 2601.08448).

From the abstract: a *Static Retaining Stage* trains on the base session and preserves the key
part as static memory; a *Dynamic Learning Stage* adds an extra dynamic projector trained
jointly with the static memory. The projector's shape and the losses are not given (METHODS.md:
"Unknown: projector shape, losses. Default: frozen backbone + base prototypes as static memory,
an MLP dynamic projector trained in incremental sessions"). Everything below the abstract's two
sentences is therefore our choice:

- Static retaining stage (Ray Train generic loop, stage ``base``): the ``method.backbone`` (``backbones``) +
  linear classifier, cross-entropy on base classes with random shifts, epoch selected on
  base-class validation accuracy. Then the *static memory* is fixed: the frozen backbone and,
  per class, the mean backbone feature (prototype) and per-dimension variance of its training
  features. Base classes use all their training images; a new class its shots, with the
  variance shrunk towards the mean base-class variance (``static.shrink`` pseudo-counts),
  because 5 shots give a poor variance estimate. Prototypes never change once written.
- Dynamic learning stage (stage ``incremental``, one report per session): a residual MLP
  projector h(f) = f + W2 relu(W1 f) (hidden width ``projector.width``, W2 zero-initialised so
  session 1 starts from the static model) with one copy per session (``projectors[s]`` starts
  from ``projectors[s-1]``). Session s scores class c by
      tau * [(1 - lam) * cos(f, mu_c) + lam * cos(h_s(f), h_s(mu_c))]
  (static and dynamic views of the same static prototypes; ``lam`` = ``projector.mix``). The
  projector is trained jointly with the static memory: each Adam step sees the shots of the
  session (random shifts) and pseudo-features of every old class sampled from the static
  memory N(mu_c, diag var_c), with cross-entropy over the seen classes on the fused score,
  plus ``projector.keep`` x the squared drift of the old prototypes' normalised projections
  from the previous session's projector (so the old classes' dynamic geometry is retained).
- Session 0 is the base model itself (linear classifier on the backbone).

Ray Train: rank 0 trains the projector and broadcasts it; every rank computes the (cheap,
deterministic) static memory itself. ``SDC`` inherits nothing: what it shares with CD² is a
one-line call into ``trustlab.methods.fscil.engine`` / ``protocol``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from trustlab.methods.fscil import engine
from trustlab.methods.fscil.backbones import build_backbone
from trustlab.methods.fscil.engine import as_float, encode, random_shift
from trustlab.methods.fscil.protocol import build_data, build_manifest, input_shape, protocol_of, session_split
from trustlab.platform.registry import register_method


class Projector(nn.Module):
    """Residual MLP h(f) = f + W2 relu(W1 f + b1) + b2 with W2, b2 zero-initialised."""

    def __init__(self, d: int, width: int):
        super().__init__()
        self.fc1 = nn.Linear(d, width)
        self.fc2 = nn.Linear(width, d)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, f):
        return f + self.fc2(F.relu(self.fc1(f)))


class SDCNet(nn.Module):
    def __init__(self, cfg: dict, in_ch: int, size: int, n_seen: list[int]):
        super().__init__()
        m = cfg["method"]
        self.n_seen = list(n_seen)  # classes seen after each session 0..N
        self.mix, self.tau = float(m["projector"]["mix"]), float(m["projector"]["tau"])
        n_base, n_sessions, n_classes = n_seen[0], len(n_seen) - 1, n_seen[-1]
        self.backbone = build_backbone(cfg, in_ch, size)
        d = self.backbone.out_dim
        self.fc = nn.Linear(d, n_base)  # the base (static retaining stage) classifier
        self.projectors = nn.ModuleList(Projector(d, int(m["projector"]["width"])) for _ in range(n_sessions + 1))
        self.register_buffer("protos", torch.zeros(n_classes, d))
        self.register_buffer("var", torch.ones(n_classes, d))
        self.register_buffer("ready", torch.zeros(n_classes, dtype=torch.bool))

    def forward(self, x):
        return self.fc(self.backbone(x))


def fused_logits(f: torch.Tensor, protos: torch.Tensor, proj: nn.Module, mix: float, tau: float) -> torch.Tensor:
    """tau * [(1 - mix) cos(f, mu) + mix cos(h(f), h(mu))] for features f and prototypes mu."""
    static = F.normalize(f, dim=1) @ F.normalize(protos, dim=1).T
    dynamic = F.normalize(proj(f), dim=1) @ F.normalize(proj(protos), dim=1).T
    return tau * ((1.0 - mix) * static + mix * dynamic)


@register_method("sdc")
class SDC:
    modality = "fscil"

    # ---- the Method contract; the FSCIL engine does what SDC shares with CD²
    def stages(self, cfg: dict) -> list[str]:
        return list(engine.STAGES)

    def build_data(self, cfg: dict) -> dict:
        return build_data(cfg)

    def manifest(self, cfg: dict):
        return build_manifest(cfg)  # what mode=inspect counts (None for the digits default)

    def stage_data(self, cfg: dict, stage: str, data: dict) -> dict:
        return engine.stage_data(cfg, stage, data)

    def stage_epochs(self, cfg: dict, stage: str) -> int:
        return engine.stage_epochs(cfg, stage)

    def stage_selects(self, cfg: dict, stage: str) -> bool:
        return engine.stage_selects(cfg, stage)

    def worker_loop_for(self, stage: str):
        return engine.worker_loop_for(stage)

    def configure_optimizer(self, model, cfg: dict, stage: str, steps_per_epoch=None):
        return engine.base_optimizer(model, cfg)

    def loss_step(self, model, batch: dict, stage: str, cfg: dict, step=None) -> dict:
        return engine.base_loss(self, model, batch, cfg)

    def validate(self, model, stage: str, cfg: dict, batches, ctx) -> dict:
        return engine.base_validation(self, model, cfg, batches, ctx)

    def predict(self, model, batch: dict, cfg: dict) -> torch.Tensor:
        return engine.predict(self, model, batch, cfg)

    def evaluate(self, cfg: dict, model, data: dict, run_dir: str) -> dict:
        return engine.evaluate(self, cfg, model, data, run_dir)

    def build_model(self, cfg: dict, stage: str) -> nn.Module:
        ch, size = input_shape(cfg)
        p = protocol_of(cfg)
        return SDCNet(cfg, ch, size, [p.n_seen(s) for s in range(p.n_sessions + 1)])

    # ---- FSCIL hooks (engine.SessionLearner)
    def session_logits(self, model, x, s: int):
        f = model.backbone(x)
        if s == 0:
            return model.fc(f)
        n = model.n_seen[s]
        return fused_logits(f, model.protos[:n], model.projectors[s], model.mix, model.tau)

    def base_encoder(self, model) -> nn.Module:
        return model.backbone

    def base_classifier(self, model) -> nn.Linear:
        return model.fc

    # ---- static memory
    def _write_static(self, model, classes, x, y, shrink: float | None) -> None:
        f = encode(model.backbone, as_float(x))
        y = torch.as_tensor(y)
        base_var = model.var[: model.n_seen[0]].mean(0)
        for c in classes:
            fc = f[y == c]
            mu, var = fc.mean(0), fc.var(0, unbiased=True) if len(fc) > 1 else torch.zeros_like(fc[0])
            if shrink is not None:  # few shots: shrink towards the mean base-class variance
                var = (len(fc) * var + shrink * base_var) / (len(fc) + shrink)
            model.protos[c], model.var[c], model.ready[c] = mu, var, True

    def begin_incremental(self, model, ctx):
        p = protocol_of(ctx.cfg)
        model.eval()
        model.backbone.requires_grad_(False)
        model.fc.requires_grad_(False)
        if bool(model.ready[: p.n_base].all()):
            return None
        base = session_split(ctx.data["train"], 0)
        self._write_static(model, range(p.n_base), base["x"], base["y"], None)
        return {"static_classes": float(p.n_base)}

    def learn_session(self, model, s, ctx):
        cfg = ctx.cfg
        p = protocol_of(cfg)
        model.eval()
        model.backbone.requires_grad_(False)
        shots = session_split(ctx.data["train"], s)
        self._write_static(model, p.session_classes(s), shots["x"], shots["y"], float(cfg["method"]["static"]["shrink"]))
        info = self._train_projector(model, s, shots, cfg) if ctx.rank == 0 else {}
        ctx.broadcast_module(model.projectors[s])
        return ctx.gather(info)[0]

    def _train_projector(self, model, s, shots, cfg) -> dict:
        p, pj = protocol_of(cfg), cfg["method"]["projector"]
        n_old, n_seen = p.n_seen(s - 1), p.n_seen(s)
        proj = model.projectors[s]
        prev = model.projectors[s - 1]
        if s > 1:
            proj.load_state_dict(prev.state_dict())
        xs, ys = as_float(shots["x"]), torch.as_tensor(shots["y"])
        gen = torch.Generator().manual_seed(int(cfg["seed"]) * 100 + s)
        protos, std = model.protos[:n_seen], model.var[:n_old].clamp_min(0).sqrt()
        with torch.no_grad():
            anchor = F.normalize(prev(model.protos[:n_old]), dim=1) if s > 1 else F.normalize(model.protos[:n_old], dim=1)
        m = int(pj["pseudo_per_class"])
        y_old = torch.arange(n_old).repeat_interleave(m)
        opt = torch.optim.Adam(proj.parameters(), lr=float(pj["lr"]), weight_decay=float(pj["weight_decay"]))
        mix, tau, keep = float(pj["mix"]), float(pj["tau"]), float(pj["keep"])
        steps = int(pj["steps"])
        sums = {"ce": 0.0, "keep": 0.0}
        proj.train()
        for _ in range(steps):
            with torch.no_grad():
                fs = model.backbone(random_shift(xs, int(cfg["method"]["session"]["shift"]), gen))
                eps = torch.randn((n_old * m, protos.shape[1]), generator=gen)
                fo = model.protos[:n_old].repeat_interleave(m, 0) + eps * std.repeat_interleave(m, 0)
            f = torch.cat([fs, fo])
            y = torch.cat([ys, y_old])
            ce = F.cross_entropy(fused_logits(f, protos, proj, mix, tau), y)
            drift = ((F.normalize(proj(model.protos[:n_old]), dim=1) - anchor) ** 2).sum(1).mean()
            loss = ce + keep * drift
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums["ce"] += float(ce.detach())
            sums["keep"] += float(drift.detach())
        proj.eval()
        return {f"train_{k}": v / max(1, steps) for k, v in sums.items()}

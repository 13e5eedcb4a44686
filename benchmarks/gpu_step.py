"""Training-step throughput of every method with a gradient stage, at fp32 and bf16: the bare
backbone, the method's step and the platform loop's step, on the same batch, in one run.

For every stage whose per-batch step is a gradient step (the method's ``loss_step`` in the generic
loop, and de-occlusion's GAN stage in its own loop) and every precision, three things are timed:

* ``bare``: the stage's *bare backbone* (``bare_model`` below: the network a plain detector or
  classifier of the same inputs would train, scoring each image, or each frame of a clip, with one
  logit) trained with binary cross-entropy: what the data costs without the method;
* ``method``: one optimizer step of the method itself (``loss_step`` + backward + its optimizer;
  extra views, masking, frozen parts, heads), a plain PyTorch step under autocast;
* ``loop``: the platform's loop running that stage (``run_epochs``, or the method's own loop from
  ``worker_loop_for``, on ``WorkerContext.local``: no Ray) over the same batch repeated: per-batch
  ``to_batch``, host-to-device copies, prefetching, gradient scaler, loss accounting included.

Bare and method steps run interleaved (bare, method, bare, ...) and the median of each is used;
the loop's step is its timed epoch's seconds per step (after an untimed warm-up epoch).
Ratios (goal >= 0.85): ``<method>_<stage>_<precision>_loop_vs_bare`` = bare / loop step time (the
goal: the platform's loop against the bare backbone), split into ``..._method_vs_bare`` = bare /
method step time (what the method costs over its backbone) and ``..._loop_vs_method`` = method /
loop step time (what the platform's loop costs over the bare method step). Writes benchmarks/out/gpu_step.json.
A method that fails (its data, its model on this device) is named with its error in the JSON's
``failed`` and the others still run; the exit status is then 1.

No Ray: a GPU machine may have only torch, timm, torchvision and this package's own
dependencies. Configs are read from the YAML files (no Hydra) and each method family is imported
alone; the run fails if anything imports Ray.

    python benchmarks/gpu_step.py                       # CUDA: fp32 and bf16 (fails without a GPU)
    python benchmarks/gpu_step.py --cpu                 # CPU smoke check (CI sizes, 2 timed steps)
    python benchmarks/gpu_step.py --methods stdt,naco --batch 64 --size 64 --set method.vit.depth=12
    python benchmarks/gpu_step.py --compile max-autotune-no-cudagraphs  # all three compiled
"""
from __future__ import annotations

import argparse
import copy
import importlib
import os
import statistics
import sys
import time
import traceback

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CONF = os.path.join(REPO, "experiments", "conf")
FAMILIES = {"f2c": "f2c", "item": "item", "whitening": "whitening", "relabel": "relabel",
            "deocclusion": "deocclusion", "stdt": "video", "naco": "video", "last": "video",
            "cd2": "fscil", "sdc": "fscil"}
PRECISIONS = ("fp32", "bf16")
AMP = {"fp32": None, "bf16": torch.bfloat16}


def load_family(name: str):
    """Import the method's family alone (``trustlab.methods`` imports no method by itself)."""
    if REPO not in sys.path:  # a GPU machine may run this from a checkout without installing trustlab
        sys.path.insert(0, REPO)
    mod = importlib.import_module(f"trustlab.methods.{FAMILIES[name]}")
    from trustlab.platform.registry import _REGISTRY

    assert sys.modules.get("ray") is None, f"importing {mod.__name__} imported Ray"
    return mod, _REGISTRY[name]


# ----------------------------------------------------------------------------- configs without Hydra
def _yaml(path: str) -> dict:
    import yaml

    with open(path) as f:
        return yaml.safe_load(f) or {}


def set_dotted(cfg: dict, key: str, value) -> None:
    node = cfg
    parts = key.split(".")
    for p in parts[:-1]:
        node = node[p]
    node[parts[-1]] = value


def parse_override(ov: str):
    """``key=value`` of a YAML value; None for Hydra-only syntax (``{a:[1]}`` dicts) and ``~``/``+``."""
    import yaml

    k, sep, v = ov.partition("=")
    if not sep or k.startswith(("~", "+")):
        return None
    try:
        val = yaml.safe_load(v)
    except yaml.YAMLError:
        return None
    return None if isinstance(val, dict) else (k, val)


def config(name: str, args) -> dict:
    """config.yaml's defaults and top-level keys, the method's YAML, then overrides: all of its
    ``ci_overrides`` with ``--cpu``; else only the data-set sizes among them (``method.data.*``
    except the sample shape, ``size`` and ``clip_len``); then ``--size``/``--clip-len``/``--set``."""
    top = _yaml(os.path.join(CONF, "config.yaml"))
    cfg = {k: v for k, v in top.items() if k != "defaults"}
    for d in top.get("defaults", []):
        if isinstance(d, dict):
            (group, option), = d.items()
            path = os.path.join(CONF, group, f"{name if group == 'method' else option}.yaml")
            cfg[group] = _yaml(path) if os.path.exists(path) else {}  # e.g. tracking: none has no file
    cfg["method"]["name"] = name
    cfg["run"]["root"] = args.root
    for ov in cfg["method"].get("ci_overrides") or []:
        kv = parse_override(ov)
        if kv is None or not kv[0].split(".")[0] in cfg:
            continue
        shape = kv[0] in ("method.data.size", "method.data.clip_len")
        if args.cpu or (kv[0].startswith("method.data.") and not shape):
            set_dotted(cfg, *kv)
    d = cfg["method"].setdefault("data", {})
    if args.size:
        d["size"] = args.size
    if args.clip_len:
        d["clip_len"] = args.clip_len
    if "root" in d and not d["root"]:
        d["root"] = os.path.join(args.root, "data", name)
    for kv in args.set:
        parsed = parse_override(kv)
        if parsed:
            set_dotted(cfg, *parsed)
    t = cfg["trainer"]
    t.update(batch_size=args.batch, log_every=0, num_workers=1, compile=args.compile or False)
    return cfg


# ----------------------------------------------------------------------------- bare backbones
class Bare(nn.Module):
    """A backbone scoring each image (each frame of a clip) with one logit: its own output when
    that is one number, else a linear layer on its flattened output."""

    def __init__(self, net: nn.Module, call=None):
        super().__init__()
        self.net, self.call = net, call
        self.head = nn.LazyLinear(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        clip = x.dim() == 5
        if clip:
            b, t = x.shape[:2]
            x = x.flatten(0, 1)
        z = (self.call(self.net, x) if self.call else self.net(x)).flatten(1)
        z = z if z.shape[1] == 1 else self.head(z)
        return z.view(b, t) if clip else z.view(-1)

    @torch.no_grad()
    def materialize(self, x: torch.Tensor) -> "Bare":
        """One forward to size the lazy head (or drop it when the backbone gives one logit)."""
        self(x)
        if any(nn.parameter.is_lazy(p) for p in self.head.parameters()):
            self.head = nn.Identity()
        return self


def bare_model(name: str, stage: str, cfg: dict, model: nn.Module, family) -> nn.Module:
    """The stage's bare backbone, a copy of (part of) the method's own model where it has one."""
    if FAMILIES[name] == "video":
        return Bare(getattr(family, name).bare_backbone(cfg))
    m = copy.deepcopy(model)
    if name == "f2c":
        return Bare(m.backbone)                        # the timm CNN after the spectral filter
    if name == "whitening":
        return Bare(m.cnn)                             # the timm CNN before the whitening layer
    if name == "item":                                 # the CLIP image tower (pooled embedding)
        for p in m.parameters():
            p.requires_grad_(True)
        return Bare(m, lambda net, x: net.encode_image(x)[0])
    if name == "relabel":                              # the black-box CNN; the VAE's encoder
        return Bare(m.blackbox) if stage == "blackbox" else Bare(m.vae.enc)
    if name == "deocclusion":                          # the embedding CNN (teacher or student)
        return Bare(m.student if stage.startswith("student") else m.teacher)
    if name in ("cd2", "sdc"):
        return Bare(m.backbone)                        # the session engine's small CNN
    raise KeyError(f"no bare backbone for {name}")


# ----------------------------------------------------------------------------- steps
def gradient_stages(method, cfg) -> list[str]:
    out = []
    for st in method.stages(cfg):
        own = method.worker_loop_for(st) if method.has("worker_loop_for") else None
        if own is None or (method.name == "deocclusion" and st == "completion"):
            out.append(st)
    return out


def rows_of(split: dict, n: int) -> dict:
    """``n`` rows of an array split (repeated from the start when it has fewer)."""
    idx = np.arange(n) % len(split["y"])
    return {k: np.asarray(v)[idx] for k, v in split.items()}


def timed(fn, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def method_step_fn(name, method, cfg, stage, model, opt, batch, dtype, dev):
    from trustlab.platform.method import Step

    done = [0]
    if name == "deocclusion" and stage == "completion":
        from trustlab.methods.deocclusion import masks as masklib
        from trustlab.methods.deocclusion.deocclusion import gan_losses

        ccfg = cfg["method"]["completion"]
        g_opt = torch.optim.Adam(model.generator.parameters(), lr=1e-4, betas=(0.5, 0.9))
        d_opt = torch.optim.Adam(list(model.d_global.parameters()) + list(model.d_local.parameters()),
                                 lr=1e-4, betas=(0.5, 0.9))

        def step():
            x = batch["x"]
            xm, m, _ = masklib.synthesize(x, batch["lm"].float(), [0, 0, 0, done[0], 1], cfg["method"]["masks"])
            for part, o in (("d", d_opt), ("g", g_opt)):
                with torch.autocast(dev.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                    loss = gan_losses(model, x, xm, m, ccfg, part)["loss"]
                o.zero_grad(set_to_none=True)
                loss.backward()
                o.step()
            done[0] += 1

        return step

    def step():
        with torch.autocast(dev.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = method.loss_step(model, batch, stage, cfg, Step(done=done[0]))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done[0] += 1

    return step


def loop_step_seconds(name, method, cfg, stage, split: dict, val: dict | None, steps: int, dev) -> float:
    """Seconds per step of the platform's loop for ``stage`` on a local context (2 epochs of
    ``steps`` steps; the second is timed)."""
    from trustlab.platform.train import WorkerContext, run_epochs

    bs = int(cfg["trainer"]["batch_size"])
    data = {"train": rows_of(split, bs * steps)}
    if val is not None:
        data["val"] = rows_of(val, min(bs, len(val["y"])))
    torch.manual_seed(0)
    ctx = WorkerContext.local(cfg, stage, data, epochs=2, device=dev)
    own = method.worker_loop_for(stage) if method.has("worker_loop_for") else None
    if own is not None:
        own({"context": ctx})
    else:
        run_epochs(ctx)
    last = ctx.history[-1]
    return float(last["train_seconds"]) / max(1, int(last["steps"]))


def bench_stage(name, family, method, cfg, stage, data, prec, args, dev, sync, rows, ratios):
    from trustlab.platform.train import WorkerContext

    dtype = AMP[prec]
    cfg = copy.deepcopy(cfg)
    cfg["trainer"]["precision"] = prec
    sd = method.stage_data(cfg, stage, data)
    ctx = WorkerContext.local(cfg, stage, {}, device=dev)  # the loop's batch preparation, for the others
    batch = ctx.to_device(method.to_batch(rows_of(sd["train"], args.batch)))
    torch.manual_seed(0)
    model = ctx.prepare(method.build_model(cfg, stage)).train()
    opt = method.configure_optimizer(model, cfg, stage)
    m_step = method_step_fn(name, method, cfg, stage, model, opt, batch, dtype, dev)
    x = batch["x"].float()
    y = (batch["y"].long().clamp_min(0) % 2).float()
    # the lazy head is sized before channels-last, which cannot convert an unsized parameter
    bare = ctx.prepare(bare_model(name, stage, cfg, model, family).to(dev).train().materialize(x[:2]))
    bare_opt = torch.optim.AdamW(bare.parameters(), lr=1e-4)

    def bare_loss():
        logits = bare(x)
        return F.binary_cross_entropy_with_logits(logits.float(), y.view(-1, *[1] * (logits.dim() - 1)).expand_as(logits))

    bare_fn = ctx.compiled(bare_loss)

    def b_step():
        with torch.autocast(dev.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = bare_fn()
        bare_opt.zero_grad(set_to_none=True)
        loss.backward()
        bare_opt.step()

    for _ in range(args.warmup):
        b_step()
        m_step()
    tb, tm = [], []
    for _ in range(args.steps):  # interleaved, so load changes hit both alike
        tb.append(timed(b_step, sync))
        tm.append(timed(m_step, sync))
    del model, opt, bare, bare_opt
    loop = loop_step_seconds(name, method, cfg, stage, sd["train"], sd.get("val"), args.steps, dev)
    mb, mm = statistics.median(tb), statistics.median(tm)
    shape = "x".join(str(s) for s in batch["x"].shape)
    rows.append({"method": name, "stage": stage, "precision": prec, "batch": shape, "bare_ms": 1000 * mb,
                 "method_ms": 1000 * mm, "loop_ms": 1000 * loop, "method_vs_bare": mb / mm, "loop_vs_method": mm / loop,
                 "loop_vs_bare": mb / loop})
    ratios.append((f"{name}_{stage}_{prec}_method_vs_bare", mb / mm, ">=", 0.85))
    ratios.append((f"{name}_{stage}_{prec}_loop_vs_method", mm / loop, ">=", 0.85))
    ratios.append((f"{name}_{stage}_{prec}_loop_vs_bare", mb / loop, ">=", 0.85))  # the goal: the whole loop


def main(argv=None) -> int:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run on CPU (smoke check: CI-sized configs)")
    ap.add_argument("--batch", type=int, default=None, help="samples per step (default 32 on CUDA, 4 on CPU)")
    ap.add_argument("--size", type=int, default=None, help="image / face-crop side (default: the method YAML's)")
    ap.add_argument("--clip-len", type=int, default=None, help="frames per clip (default: the YAML's)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20 CUDA, 2 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 CUDA, 1 CPU)")
    ap.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated subset of fp32,bf16")
    ap.add_argument("--methods", default=",".join(FAMILIES), help="comma-separated subset")
    ap.add_argument("--set", action="append", default=[], help="config override key=value (dotted), repeatable")
    ap.add_argument("--compile", default=None,
                    help="torch.compile the bare step, the method step and the loop (trainer.compile): a mode "
                         "(default, reduce-overhead, max-autotune-no-cudagraphs) or a backend (aot_eager)")
    ap.add_argument("--root", default=None, help="where generated data sets go (default: a temp dir)")
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device; use --cpu for a smoke check", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if args.cpu else "cuda")
    args.batch = args.batch or (4 if args.cpu else 32)
    args.steps = args.steps or (2 if args.cpu else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.cpu else 5)
    args.root = args.root or tempfile.mkdtemp(prefix="gpu-step-")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    sys.path.insert(0, HERE)
    from _common import report

    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown:
        print(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(FAMILIES)}", file=sys.stderr)
        return 2
    rows, ratios, skipped, failed = [], [], [], {}
    for name in names:
        # one method failing (its data, its model on this device) must not cost the others' figures:
        # a GPU lease is short, and the failure is itself the finding
        try:
            family, method = load_family(name)
            cfg = config(name, args)
            stages = gradient_stages(method, cfg)
            skipped += [f"{name}:{s}" for s in method.stages(cfg) if s not in stages]
            if not stages:
                continue
            t0 = time.time()
            data = method.build_data(cfg)
            print(f"[gpu_step] {name}: data in {time.time() - t0:.1f}s; stages {', '.join(stages)}", flush=True)
            for stage in stages:
                for prec in precisions:
                    bench_stage(name, family, method, cfg, stage, data, prec, args, dev, sync, rows, ratios)
        except Exception as e:  # noqa: BLE001  (reported, and the exit status says so)
            traceback.print_exc()
            failed[name] = f"{type(e).__name__}: {e}"
            print(f"[gpu_step] {name} FAILED: {failed[name]}", flush=True)
    assert sys.modules.get("ray") is None, "the benchmark imported Ray"
    extra = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
             "compile": args.compile, "steps": args.steps, "warmup": args.warmup, "overrides": args.set,
             "skipped_stages": skipped, "failed": failed}
    print(f"device: {extra['device']}; torch {torch.__version__}; compile {args.compile}; median of {args.steps} "
          f"steps; not per-batch gradient stages (skipped): {', '.join(skipped) or 'none'}")
    report("gpu_step" if dev.type == "cuda" else "gpu_step_cpu_smoke", rows, ratios, extra)
    for name, why in failed.items():
        print(f"FAILED {name}: {why}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

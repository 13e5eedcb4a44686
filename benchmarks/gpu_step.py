"""Training-step throughput of the video methods (STDT, NACO, LAST) against their bare backbones.

For every stage of every method, one optimizer step of the method (its ``loss_step``: extra
views, masking, dropout, frozen parts, heads) is timed against one step of its *bare backbone*
at the same batch: the method's timm model (STDT's ViT, NACO's and LAST's CNN) with a one-logit
classifier, trained with binary cross-entropy on every frame of the same clips (B x T images),
i.e. what a frame-level detector on the same data costs. Both run in this process, interleaved
(bare, method, bare, ...) and the median step time of each is used, to damp machine noise.
Throughput ratio = bare step time / method step time (goal >= 0.85).

No Ray: this machine may have only torch, timm and torchvision (+ numpy and PyYAML, which timm
needs). Only the video family is imported, and the configs are read from the YAML files directly.

    python benchmarks/gpu_step.py                       # CUDA (fails without a GPU)
    python benchmarks/gpu_step.py --cpu                 # CPU smoke check (small, 2 timed steps)
    python benchmarks/gpu_step.py --batch 64 --size 64 --amp --set method.vit.depth=12
    python benchmarks/gpu_step.py --compile reduce-overhead   # both sides compiled (CUDA graphs)
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CONF = os.path.join(REPO, "experiments", "conf")
METHODS = ("stdt", "naco", "last")


def load_methods():
    """Import the video family alone (``trustlab.methods`` imports no method by itself)."""
    if REPO not in sys.path:  # a GPU machine may run this from a checkout without installing trustlab
        sys.path.insert(0, REPO)
    video = importlib.import_module("trustlab.methods.video")
    mods = {m: getattr(video, m) for m in METHODS}
    from trustlab.platform.registry import _REGISTRY

    assert sys.modules.get("ray") is None, "the benchmark must not import Ray"
    return mods, _REGISTRY


def set_dotted(cfg: dict, key: str, value: str) -> None:
    import yaml

    node = cfg
    parts = key.split(".")
    for p in parts[:-1]:
        node = node[p]
    node[parts[-1]] = yaml.safe_load(value)


def config(name: str, args) -> dict:
    import yaml

    with open(os.path.join(CONF, "method", f"{name}.yaml")) as f:
        method = yaml.safe_load(f)
    with open(os.path.join(CONF, "trainer", "default.yaml")) as f:
        trainer = yaml.safe_load(f)
    cfg = {"method": method, "trainer": trainer, "run": {"s3_endpoint": None}, "seed": 0, "mode": "train",
           "data": {"name": "auto"}}
    trainer["batch_size"] = args.batch
    if args.size:
        method["data"]["size"] = args.size
    if args.clip_len:
        method["data"]["clip_len"] = args.clip_len
    for kv in args.set:
        k, _, v = kv.partition("=")
        if k.split(".")[0] in cfg:
            set_dotted(cfg, k, v)
    return cfg


class FrameBaseline(nn.Module):
    """The bare backbone: a timm model scoring every frame of a clip batch."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        return self.net((x.flatten(0, 1) - 0.5) / 0.25).view(b, t)


def timed_steps(fn, n: int, sync) -> list[float]:
    out = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run on CPU (smoke check; small defaults)")
    ap.add_argument("--batch", type=int, default=None, help="clips per step (default 32 on CUDA, 4 on CPU)")
    ap.add_argument("--size", type=int, default=None, help="face-crop side (default: the method YAML's)")
    ap.add_argument("--clip-len", type=int, default=None, help="frames per clip (default: the YAML's)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per model (default 20 CUDA, 2 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 CUDA, 1 CPU)")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    ap.add_argument("--set", action="append", default=[], help="config override key=value (dotted), repeatable")
    ap.add_argument("--compile", default=None,
                    choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
                    help="torch.compile both sides' forward + loss with this mode (reduce-overhead = CUDA graphs: "
                         "the small steps here are launch-bound); backward and the optimizer stay eager")
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device; use --cpu for a smoke check", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if args.cpu else "cuda")
    args.batch = args.batch or (4 if args.cpu else 32)
    steps = args.steps or (2 if args.cpu else 20)
    warm = args.warmup if args.warmup is not None else (1 if args.cpu else 5)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    mods, registry = load_methods()
    sys.path.insert(0, HERE)
    from _common import report

    rows, ratios = [], []
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        cfg = config(name, args)
        method = registry[name]
        d = cfg["method"]["data"]
        t, s = int(d["clip_len"]), int(d["size"])
        g = torch.Generator().manual_seed(0)
        x = torch.rand(args.batch, t, 3, s, s, generator=g)
        y = torch.randint(0, 2, (args.batch,), generator=g)
        torch.manual_seed(0)
        bare = FrameBaseline(mods[name].bare_backbone(cfg)).to(dev)
        bare_opt = torch.optim.AdamW(bare.parameters(), lr=1e-4)
        xb, yb = x.to(dev), y.to(dev)

        def bare_loss():
            logits = bare(xb)
            return F.binary_cross_entropy_with_logits(logits.float(), yb.float()[:, None].expand_as(logits))

        bare_loss_fn = torch.compile(bare_loss, mode=args.compile) if args.compile else bare_loss

        def bare_step():
            with torch.autocast("cuda", torch.bfloat16, enabled=args.amp and dev.type == "cuda"):
                loss = bare_loss_fn()
            bare_opt.zero_grad(set_to_none=True)
            loss.backward()
            bare_opt.step()

        for stage in method.stages(cfg):
            torch.manual_seed(0)
            model = method.build_model(cfg, stage).to(dev).train()
            opt = method.configure_optimizer(model, cfg, stage)
            yy = y.clone()
            if stage == "adapt":  # half the batch unlabelled target clips, as in training
                yy[args.batch // 2:] = -1
            batch = {"x": xb, "y": yy.to(dev), "vid": torch.arange(args.batch, device=dev)}

            def method_loss(model=model, batch=batch, stage=stage):
                return method.loss_step(model, batch, stage, cfg)["loss"]

            method_loss_fn = torch.compile(method_loss, mode=args.compile) if args.compile else method_loss

            def method_step():
                with torch.autocast("cuda", torch.bfloat16, enabled=args.amp and dev.type == "cuda"):
                    loss = method_loss_fn()
                opt.zero_grad(set_to_none=True)
                loss.float().backward()
                opt.step()

            for _ in range(warm):
                bare_step()
                method_step()
            tb, tm = [], []
            for _ in range(steps):  # interleaved, so load changes hit both alike
                tb += timed_steps(bare_step, 1, sync)
                tm += timed_steps(method_step, 1, sync)
            mb, mm = statistics.median(tb), statistics.median(tm)
            r = mb / mm
            rows.append({"method": name, "stage": stage, "batch": f"{args.batch}x{t}x{s}px",
                         "bare_ms": 1000 * mb, "method_ms": 1000 * mm,
                         "bare_clips_s": args.batch / mb, "method_clips_s": args.batch / mm, "ratio": r})
            ratios.append((f"{name}_{stage}_vs_bare", r, ">=", 0.85))
            del model, opt
    extra = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
             "torch": torch.__version__, "amp": bool(args.amp), "compile": args.compile, "steps": steps, "warmup": warm,
             "overrides": args.set}
    print(f"device: {extra['device']}; torch {torch.__version__}; amp {args.amp}; compile {args.compile}; "
          f"median of {steps} steps")
    report("gpu_step" if dev.type == "cuda" else "gpu_step_cpu_smoke", rows, ratios, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())

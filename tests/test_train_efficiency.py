"""The GPU machinery every training loop gets from its WorkerContext, checked on CPU without Ray:
bucketed gradient all-reduce overlapping backward (two gloo processes) equals the flat all-reduce;
a bf16 autocast step with channels-last layout matches fp32 for every registered method's loss; fp16 with a gradient scaler,
torch.compile, prefetching and the loss sums run through the generic loop; a method's own loop
runs on a local context; elastic and placement settings reach Ray Train's ScalingConfig."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import REPO, ci_overrides, compose, free_port
from trustlab.platform.registry import get_method, list_methods
from trustlab.platform.train import GradSync, LossSums, WorkerContext, _allreduce_grads, prefetch, run_epochs

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from gpu_step import gradient_stages  # noqa: E402  (the per-batch gradient stages the benchmark times)


# ----------------------------------------------------------------------------- bucketed all-reduce
class _Net(nn.Module):
    """Layers of several sizes (several buckets at a small cap) and a head no loss uses, registered
    last: before the buckets are rebuilt it sits in the first bucket and holds the others back."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
        self.critic = nn.Linear(8, 1)
        self.unused = nn.Linear(64, 64)

    def forward(self, x):
        return self.body(x)


def _grads(model):
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def _sync_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = _Net()
        body = list(model.body.parameters()) + list(model.unused.parameters())
        gen = torch.Generator().manual_seed(100 + rank)  # every rank its own data
        xs = [torch.randn(8, 16, generator=gen) for _ in range(3)]

        def loss(x):
            return model(x).pow(2).mean() + model.critic(model(x)).mean()

        res = {"flat": [], "bucketed": [], "launched": []}
        sync = GradSync(body, world, bucket_mb=0.005)  # ~1300 floats a bucket: several buckets
        res["buckets_before"] = len(sync.buckets)
        for x in xs:
            model.zero_grad(set_to_none=True)
            loss(x).backward()
            _allreduce_grads(body, world)  # today's flat all-reduce
            res["flat"].append(_grads(model))
            model.zero_grad(set_to_none=True)
            sync.arm()
            loss(x).backward()
            res["launched"].append(sync.launched_in_backward)  # launched while backward ran
            sync.wait()
            res["bucketed"].append(_grads(model))
        unused = {id(p) for p in model.unused.parameters()}
        res["used_buckets"] = sum(1 for b in sync.buckets if not any(id(p) in unused for p in b))
        # an unarmed backward through these parameters (a GAN's other loss) launches nothing
        model.zero_grad(set_to_none=True)
        before = sync.launched_in_backward
        model.critic(model(xs[0])).mean().backward()
        res["unarmed_launched"] = sync.launched_in_backward - before, len(sync.works)
        # two backward passes before the step: one flat all-reduce of the accumulated gradients
        model.zero_grad(set_to_none=True)
        sync.arm()
        loss(xs[0]).backward()
        sync.arm()
        loss(xs[1]).backward()
        sync.wait()
        res["twice_bucketed"] = _grads(model)
        model.zero_grad(set_to_none=True)
        loss(xs[0]).backward()
        loss(xs[1]).backward()
        _allreduce_grads(body, world)
        res["twice_flat"] = _grads(model)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_bucketed_allreduce_overlaps_backward_and_equals_flat(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_sync_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    r = [torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in range(world)]
    for res in r:
        assert res["buckets_before"] >= 3
        for flat, bucketed in zip(res["flat"], res["bucketed"]):
            for a, b in zip(flat, bucketed):
                assert (a is None) == (b is None)
                if a is not None:
                    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        # step 1: the unused head sits in the first bucket, so nothing launches before wait();
        # after the rebuild (arrival order, unused last) every used bucket launches during backward
        assert res["launched"][0] == 0
        assert res["launched"][1] == res["launched"][2] == res["used_buckets"] >= 2, res
        assert res["unarmed_launched"] == (0, 0)
        for a, b in zip(res["twice_flat"], res["twice_bucketed"]):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    # the synchronised gradients (the body's) are the same on both ranks
    n_body = len(list(_Net().body.parameters()))
    for a, b in zip(r[0]["bucketed"][2][:n_body], r[1]["bucketed"][2][:n_body]):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- bf16 vs fp32, every method
def _small_batch(method, cfg, data, stage, n: int = 8) -> dict:
    tr = method.stage_data(cfg, stage, data)["train"]
    idx = np.arange(min(n, len(tr["y"])))
    return method.to_batch({k: v[idx] for k, v in tr.items()})


def _loss_and_grads(method, cfg, stage, batch, ctx, seed=0):
    torch.manual_seed(seed)
    model = ctx.prepare(method.build_model(cfg, stage))  # as a worker places it (layout included)
    model.train()
    batch = ctx.to_device(batch)
    torch.manual_seed(seed + 1)
    with ctx.autocast():
        if method.name == "deocclusion" and stage == "completion":
            from trustlab.methods.deocclusion import masks as masklib
            from trustlab.methods.deocclusion.deocclusion import gan_losses

            xm, m, _ = masklib.synthesize(batch["x"], batch["lm"].float(), [0, 0, 0, 0, 1], cfg["method"]["masks"])
            out = gan_losses(model, batch["x"], xm, m, cfg["method"]["completion"], "g")
        else:
            out = method.loss_step(model, batch, stage, cfg, ctx.step(0))
    loss = out["loss"]
    loss.float().backward()
    grads = torch.cat([p.grad.float().reshape(-1) for p in model.parameters() if p.grad is not None])
    return float(loss.detach()), grads


@pytest.mark.parametrize("name", list_methods())
def test_bf16_autocast_step_matches_fp32(name, tmp_path, one_thread):
    """The bf16 side runs as a GPU worker is set up (``auto`` turns both on there): bf16 autocast and
    channels-last convolutions and inputs. A model ``prepare`` cannot lay out fails here on CPU, not
    on the first GPU run (CD²'s 5-D exemplar buffer did, on an H200)."""
    method = get_method(name)
    cfg = compose([f"method={name}", *ci_overrides(name)], tmp_path)
    stages = gradient_stages(method, cfg)
    if not stages:
        pytest.skip(f"{name} has no gradient stage")
    data = method.build_data(cfg)
    for stage in stages:
        batch = _small_batch(method, cfg, data, stage)
        ctx32 = WorkerContext.local({**cfg, "trainer": {**cfg["trainer"], "precision": "fp32"}}, stage, {})
        ctx16 = WorkerContext.local({**cfg, "trainer": {**cfg["trainer"], "precision": "bf16", "channels_last": True}},
                                    stage, {})
        assert ctx32.amp_dtype is None and ctx16.amp_dtype is torch.bfloat16 and ctx16.channels_last
        l32, g32 = _loss_and_grads(method, cfg, stage, batch, ctx32)
        l16, g16 = _loss_and_grads(method, cfg, stage, batch, ctx16)
        assert math.isfinite(l16), (stage, l16)
        assert l16 == pytest.approx(l32, rel=0.02, abs=0.01), (stage, l32, l16)
        cos = float(F.cosine_similarity(g32, g16, dim=0))
        assert cos > 0.97, (stage, cos)
        print(f"{name}:{stage} loss fp32 {l32:.5f} bf16 {l16:.5f}; gradient cosine {cos:.4f}")


# ----------------------------------------------------------------------------- the generic loop's knobs
def _relabel_cfg(tmp_path, *extra):
    # the plain digits CNN: the loop is under test, and one epoch of the default's reject task (its
    # planted reject output) can leave every clean digit on "reject" (val acc 0.0 in fp16, CI 46fdf89)
    return compose(["method=relabel", *ci_overrides("relabel"), "method.blackbox.epochs=1",
                    "method.blackbox.reject=null", *extra], tmp_path)


def test_generic_loop_fp16_scaler_compile_and_prefetch(tmp_path, one_thread):
    """The relabel black box (a small CNN on 8x8 digits) through ``run_epochs``: fp32 with the
    batches prefetched in a thread gives the same epoch as without; fp16 (gradient scaler) and a
    compiled loss step (aot_eager backend: the compile path without a C++ toolchain) train too."""
    method = get_method("relabel")
    base = _relabel_cfg(tmp_path)
    data = method.stage_data(base, "blackbox", method.build_data(base))

    def run(*extra):
        ctx = WorkerContext.local(_relabel_cfg(tmp_path, *extra), "blackbox", data, validate=True)
        model = run_epochs(ctx)
        return ctx, model, ctx.history[-1]

    ctx0, _, h0 = run("trainer.prefetch_batches=0")
    ctx2, _, h2 = run("trainer.prefetch_batches=2")
    assert ctx0.prefetch_depth == 0 and ctx2.prefetch_depth == 2
    assert h2["train_loss"] == h0["train_loss"] and h2["val_score"] == h0["val_score"]
    ctx, _, h = run("trainer.precision=fp16")
    assert ctx.scaler.is_enabled() and math.isfinite(h["train_loss"]) and h["val_acc"] > 0.5, h
    ctx, _, h = run("trainer.compile=aot_eager")
    assert math.isfinite(h["train_loss"]) and h["val_acc"] > 0.5, h
    assert abs(h["train_loss"] - h0["train_loss"]) < 1e-3, (h["train_loss"], h0["train_loss"])


def test_loss_sums_equal_float_sums():
    parts = [{"loss": torch.tensor(0.1 * i, dtype=torch.float32), "acc": 0.5} for i in range(7)]
    s = LossSums()
    for p in parts:
        s.add(p)
    want = sum(float(p["loss"]) for p in parts) / 7
    assert s.means()["loss"] == want and s.means()["acc"] == 0.5


def test_prefetch_keeps_order_and_reraises():
    assert list(prefetch(iter(range(50)), 3)) == list(range(50))

    def bad():
        yield 1
        raise ValueError("boom")

    it = prefetch(bad(), 2)
    assert next(it) == 1
    with pytest.raises(ValueError, match="boom"):
        next(it)


def test_precision_and_channels_last_defaults_on_cpu(tmp_path):
    cfg = compose(["method=f2c", *ci_overrides("f2c")], tmp_path)
    ctx = WorkerContext.local(cfg, "train", {})
    assert ctx.precision == "fp32" and not ctx.channels_last and ctx.prefetch_depth == 0
    assert not ctx.scaler.is_enabled() and ctx.compiled(len) is len
    cl = WorkerContext.local({**cfg, "trainer": {**cfg["trainer"], "channels_last": True}}, "train", {})
    model = cl.prepare(get_method("f2c").build_model(cfg, "train"))
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    b = cl.to_device({"x": torch.rand(2, 3, 8, 8), "y": torch.zeros(2)})
    assert b["x"].is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(Exception, match="precision"):
        compose(["method=f2c", "trainer.precision=fp8"])


def test_scaling_config_elastic_and_placement():
    from trustlab.platform.train import scaling_config

    cfg = compose(["method=f2c", "trainer.num_workers=4", "trainer.min_workers=2", "trainer.placement_strategy=SPREAD"])
    sc = scaling_config(cfg, use_gpu=False)
    assert sc.num_workers == (2, 4) and sc.placement_strategy == "SPREAD" and sc.elasticity_enabled
    fixed = scaling_config(compose(["method=f2c", "trainer.num_workers=2"]), use_gpu=False)
    assert fixed.num_workers == 2 and fixed.placement_strategy == "PACK" and not fixed.elasticity_enabled
    with pytest.raises(Exception, match="min_workers"):
        compose(["method=f2c", "trainer.num_workers=2", "trainer.min_workers=3"])


def test_own_loop_runs_on_a_local_context(tmp_path, one_thread):
    """De-occlusion's GAN stage (two optimizers) through ``worker_loop_for`` without Ray."""
    method = get_method("deocclusion")
    cfg = compose(["method=deocclusion", *ci_overrides("deocclusion"), "trainer.precision=bf16"], tmp_path)
    data = method.stage_data(cfg, "completion", method.build_data(cfg))
    ctx = WorkerContext.local(cfg, "completion", data)
    method.worker_loop_for("completion")({"context": ctx})
    h = ctx.history[-1]
    assert h["epoch"] == 1 and h["steps"] > 0 and math.isfinite(h["train_g_loss"]) and math.isfinite(h["train_d_loss"])


def test_gpu_step_cpu_smoke_runs_without_ray(tmp_path):
    """benchmarks/gpu_step.py --cpu on two families (one with an own GAN loop): every gradient
    stage at fp32 and bf16 gets a bare, a method and a loop figure, and nothing imports Ray."""
    env = dict(os.environ, TRUSTLAB_BENCH_OUT=str(tmp_path), PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_step.py"), "--cpu", "--steps", "1",
                        "--warmup", "0", "--methods", "relabel,deocclusion", "--root", str(tmp_path / "data")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = json.load(open(tmp_path / "gpu_step_cpu_smoke.json"))
    got = {(row["method"], row["stage"], row["precision"]) for row in out["rows"]}
    want = {(m, s, p) for m, stages in (("relabel", ("blackbox", "vae")),
                                         ("deocclusion", ("teacher", "completion", "student_nocomp", "student")))
            for s in stages for p in ("fp32", "bf16")}
    assert got == want
    assert all(row["bare_ms"] > 0 and row["method_ms"] > 0 and row["loop_ms"] > 0 for row in out["rows"])
    assert "relabel:relabel" in out["skipped_stages"]
    assert "ratio deocclusion_completion_bf16_loop_vs_method:" in r.stdout


def test_gpu_step_names_a_failing_method_and_still_measures_the_others(tmp_path):
    """On a GPU lease one broken method must not cost the others' figures (the first H200 run lost
    every method after CD²'s channels-last error): the failure is named in the JSON and the exit
    status, the next method is measured; an unknown method name is refused before anything runs."""
    env = dict(os.environ, TRUSTLAB_BENCH_OUT=str(tmp_path), PYTHONWARNINGS="ignore")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import gpu_step\n"
            "gpu_step.load_family('cd2')\n"
            "from trustlab.methods.fscil import cd2\n"
            "def boom(self, cfg): raise RuntimeError('planted failure')\n"
            "cd2.CD2.build_data = boom\n"
            "sys.exit(gpu_step.main(sys.argv[2:]))\n")
    args = ["--cpu", "--steps", "1", "--warmup", "0", "--precisions", "fp32", "--root", str(tmp_path / "data")]
    r = subprocess.run([sys.executable, "-c", code, os.path.join(REPO, "benchmarks"), *args, "--methods", "cd2,sdc"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-3000:]
    out = json.load(open(tmp_path / "gpu_step_cpu_smoke.json"))
    assert out["failed"] == {"cd2": "RuntimeError: planted failure"}
    assert {(row["method"], row["stage"]) for row in out["rows"]} == {("sdc", "base")}
    assert "FAILED cd2: RuntimeError: planted failure" in r.stdout
    r = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_step.py"), *args, "--methods", "sdc,nosuch"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "unknown method(s) nosuch" in r.stderr, r.stderr[-2000:]

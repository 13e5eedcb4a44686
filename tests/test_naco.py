"""NACO: shapes, real-only self-supervision whose SPM and TCM losses decrease on real clips,
the frozen backbone of finetune_head, the module ablation switches, checkpoint round trip.
Plain PyTorch, no Ray."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import ci_overrides, compose
from trustlab.methods.video import common as V
from trustlab.methods.video.naco import NACONet, shuffled_order, ssl_losses
from trustlab.platform import checkpoints as ck
from trustlab.platform.registry import get_method

TINY = ["method.data.backend=memory", "method.data.size=32", "method.data.frames_per_video=8", "method.data.clip_len=4",
        "method.dim=64", "method.depth=1", "method.heads=2", "method.tcm.proj_dim=32", "method.head.hidden=32"]



pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny tensors: one intra-op thread


def cfg_of(*ov):
    return compose(["method=naco", *TINY, *ov])


def test_config_and_ci_overrides_compose():
    cfg = compose(["method=naco", *ci_overrides("naco")])
    assert get_method("naco").stages(cfg) == ["pretrain_ssl", "finetune_head"]
    assert cfg["method"]["epochs"]["pretrain_ssl"] == 1


def test_shapes():
    cfg = cfg_of()
    torch.manual_seed(0)
    net = NACONet(cfg, "pretrain_ssl").eval()
    x = torch.rand(3, 4, 3, 32, 32)
    tok = net.frames(x)
    assert tok.shape == (3, 4, 4, 64)  # 2x2 grid of stride-16 features per frame
    assert net.mix(tok).shape == tok.shape
    assert net.features(x).shape == (3, 128)
    assert net(x).shape == (3,)
    out = ssl_losses(net.train(), x, cfg)
    assert set(out) >= {"loss", "spm", "tcm"} and out["loss"].ndim == 0


def test_shuffled_order_is_never_identity():
    p = shuffled_order(500, 3)
    assert torch.equal(p.sort(1).values, torch.arange(3).expand(500, 3))
    assert not (p == torch.arange(3)).all(1).any()


def real_clip_data(cfg):
    return V.build_video_data(cfg)


def test_pretrain_uses_real_clips_only_and_ssl_losses_decrease():
    cfg = cfg_of("method.data.n_videos_per_class=10", "method.batch_size=6", "method.lr.pretrain_ssl=0.003",
                 "method.data.targets=[]")
    method = get_method("naco")
    data = V.build_video_data(cfg)
    sd = method.stage_data(cfg, "pretrain_ssl", data)
    assert set(sd) == {"train", "val"} and (sd["train"]["y"] == 0).all() and (sd["val"]["y"] == 0).all()
    assert len(sd["train"]["y"]) == (data["train"]["y"] == 0).sum() > 0
    torch.manual_seed(0)
    _, hist = V.local_fit(method, cfg, data, stages=["pretrain_ssl"], epochs=15)
    h = hist["pretrain_ssl"]
    first = {k: np.mean([e[k] for e in h[:3]]) for k in ("spm", "tcm")}
    last = {k: np.mean([e[k] for e in h[-3:]]) for k in ("spm", "tcm")}
    assert last["spm"] < 0.85 * first["spm"], (first, last)
    assert last["tcm"] < 0.85 * first["tcm"], (first, last)


def test_ablation_switches_turn_modules_off():
    x = torch.rand(2, 4, 3, 32, 32)
    for ov, absent in (("method.spm.weight=0", "spm"), ("method.tcm.weight=0", "tcm")):
        cfg = cfg_of(ov)
        net = NACONet(cfg, "pretrain_ssl").train()
        out = ssl_losses(net, x, cfg)
        assert absent not in out and out["loss"].requires_grad
    cfg = cfg_of("method.spm.weight=0", "method.tcm.weight=0")
    out = ssl_losses(NACONet(cfg, "pretrain_ssl").train(), x, cfg)
    assert float(out["loss"].detach()) == 0.0


def test_finetune_head_freezes_the_backbone():
    cfg = cfg_of()
    method = get_method("naco")
    torch.manual_seed(0)
    pre = method.build_model(cfg, "pretrain_ssl")
    net = method.build_model(cfg, "finetune_head")
    net.load_state_dict(pre.state_dict())
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("head.") for n in trainable)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = method.configure_optimizer(net, cfg, "finetune_head")
    net.train()
    assert not net.frames.training and net.head.training
    batch = {"x": torch.rand(4, 4, 3, 32, 32), "y": torch.tensor([0, 1, 0, 1])}
    for _ in range(3):
        out = method.loss_step(net, batch, "finetune_head", cfg)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    after = net.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("head.") for k in changed)  # BatchNorm statistics included


def test_checkpoint_round_trip(tmp_path):
    cfg = cfg_of()
    method = get_method("naco")
    torch.manual_seed(1)
    model = method.build_model(cfg, "finetune_head").eval()
    x = torch.rand(2, 4, 3, 32, 32)
    ck.save_state(str(tmp_path), model=model.state_dict(), epoch=2, stage="finetune_head", cfg=cfg)
    state = ck.load_state(str(tmp_path))
    torch.manual_seed(2)
    fresh = method.build_model(state["cfg"], state["stage"])
    fresh.load_state_dict(state["model"])
    fresh.eval()
    assert torch.equal(method.predict(model, {"x": x}, cfg), method.predict(fresh, {"x": x}, cfg))

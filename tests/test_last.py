"""LAST: shapes, real-only pre-training whose latent-reconstruction and contrastive losses
decrease on real clips, a frozen backbone under the linear head, target labels that never reach
training (and adaptation that does use the target clips), checkpoint round trip. Plain PyTorch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import ci_overrides, compose
from trustlab.methods.video import common as V
from trustlab.methods.video.last import DomainStandardize, LASTNet, adapt_losses, ssl_losses
from trustlab.platform import checkpoints as ck
from trustlab.platform.registry import get_method

TINY = ["method.data.backend=memory", "method.data.size=32", "method.data.frames_per_video=8", "method.data.clip_len=4",
        "method.dim=32", "method.depth=1", "method.heads=2", "method.contrast.proj_dim=32"]



pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny tensors: one intra-op thread


def cfg_of(*ov):
    return compose(["method=last", *TINY, *ov])


def test_config_and_ci_overrides_compose():
    cfg = compose(["method=last", *ci_overrides("last")])
    assert get_method("last").stages(cfg) == ["pretrain_ssl", "adapt"]
    assert V.protocol(cfg)[1] == ["synth_blend_cam"]


def test_shapes():
    cfg = cfg_of()
    torch.manual_seed(0)
    net = LASTNet(cfg, "pretrain_ssl")
    x = torch.rand(3, 4, 3, 32, 32)
    h, tok, mask = net.encode(x, 0.5)
    assert h.shape == tok.shape == (3, 4, 4, 32) and mask.shape == (3, 4, 4) and mask.any()
    assert net.features(x).shape == (3, 64)
    assert net(x).shape == (3,)
    # the transferable head is linear: a parameter-free per-domain standardisation, then one Linear layer
    assert [type(m) for m in net.head] == [DomainStandardize, torch.nn.Linear]
    assert not list(net.head[0].parameters()) and net.domains == 4  # source + synth_blend_cam, synth_warp, synth_color
    out = ssl_losses(net.train(), x, cfg)
    assert {"recon", "contrast", "loss"} <= set(out)


def test_ssl_losses_decrease_on_real_clips():
    cfg = cfg_of("method.data.n_videos_per_class=10", "method.batch_size=6", "method.lr.pretrain_ssl=0.003",
                 "method.data.targets=[]")
    method = get_method("last")
    data = V.build_video_data(cfg, unlabelled_targets=True)
    sd = method.stage_data(cfg, "pretrain_ssl", data)
    assert (sd["train"]["y"] == 0).all() and len(sd["train"]["y"]) > 0
    torch.manual_seed(0)
    _, hist = V.local_fit(method, cfg, data, stages=["pretrain_ssl"], epochs=15)
    h = hist["pretrain_ssl"]
    first = {k: np.mean([e[k] for e in h[:3]]) for k in ("recon", "contrast")}
    last = {k: np.mean([e[k] for e in h[-3:]]) for k in ("recon", "contrast")}
    assert last["recon"] < 0.85 * first["recon"], (first, last)
    assert last["contrast"] < 0.85 * first["contrast"], (first, last)


def adapt_data(cfg):
    data = V.build_video_data(cfg, unlabelled_targets=True)
    assert "unlabelled:synth_warp" in data and "target:synth_warp" in data
    return data


def run_adapt(cfg, data, backbone_state):
    torch.manual_seed(0)
    model, hist = V.local_fit(get_method("last"), cfg, data, stages=["adapt"], epochs=2, init_state=backbone_state)
    return model.state_dict(), hist


def test_target_labels_never_reach_training():
    cfg = cfg_of("method.data.n_videos_per_class=10", "method.data.targets=[synth_warp]", "method.batch_size=16",
                 "method.adapt.target_weight=1.0", "method.adapt.threshold=0.5", "method.adapt.warmup_steps=1")
    method = get_method("last")
    data = adapt_data(cfg)
    tgt = data["unlabelled:synth_warp"]
    assert set(np.unique(tgt["y"])) == {0, 1}  # the labels exist in the loaded data ...

    sd = method.stage_data(cfg, "adapt", data)
    assert set(sd) == {"train", "val"}
    tr = sd["train"]
    assert set(tr) == {"x", "vid", "clip", "y", "domain"}  # no manipulation/source/video_id columns
    is_t = tr["domain"] == 1
    assert is_t.sum() == len(tgt["y"]) and (tr["y"][is_t] == V.UNLABELLED).all()  # ... but not here
    np.testing.assert_array_equal(tr["y"][~is_t], data["train"]["y"])
    np.testing.assert_array_equal(sd["val"]["y"], data["val"]["y"])  # selection on the source's val

    torch.manual_seed(0)
    backbone = LASTNet(cfg, "pretrain_ssl").state_dict()
    ref, hist = run_adapt(cfg, data, backbone)
    assert hist["adapt"][-1]["target_kept"] > 0  # pseudo-labels were used

    # whatever the target labels (and label-revealing columns) are, training is bit-identical
    rng = np.random.default_rng(0)
    for y_new in (1 - tgt["y"], rng.integers(0, 2, len(tgt["y"])), np.zeros_like(tgt["y"])):
        other = dict(data)
        other["unlabelled:synth_warp"] = {**tgt, "y": y_new.astype(np.int64),
                                          "manipulation": np.where(y_new == 1, "warp", "none")}
        got, _ = run_adapt(cfg, other, backbone)
        assert all(torch.equal(ref[k], got[k]) for k in ref)

    # the target clips themselves do matter (else the check above would be vacuous)
    other = dict(data)
    other["unlabelled:synth_warp"] = {**tgt, "x": np.ascontiguousarray(tgt["x"][::-1])}
    got, _ = run_adapt(cfg, other, backbone)
    assert not torch.equal(ref["head.1.weight"], got["head.1.weight"])
    # the default (per-domain statistics, no pseudo-labels): the target clips set the target's
    # statistics, their labels still change nothing
    base = cfg_of("method.data.n_videos_per_class=10", "method.data.targets=[synth_warp]", "method.batch_size=16")
    assert float(base["method"]["adapt"]["target_weight"]) == 0 and base["method"]["adapt"]["domain_stats"]
    ref0, _ = run_adapt(base, data, backbone)
    assert ref0["head.0.count"][1] > 0 and not torch.equal(ref0["head.0.total"][1], ref0["head.0.total"][0])
    other = dict(data)
    other["unlabelled:synth_warp"] = {**tgt, "y": 1 - tgt["y"]}
    got, _ = run_adapt(base, other, backbone)
    assert all(torch.equal(ref0[k], got[k]) for k in ref0)
    # and the source-only ablation trains a different head, and keeps no target statistics
    got, _ = run_adapt(cfg_of("method.data.n_videos_per_class=10", "method.data.targets=[synth_warp]",
                              "method.batch_size=16", "method.adapt.domain_stats=false"), data, backbone)
    assert not torch.equal(ref["head.1.weight"], got["head.1.weight"]) and got["head.0.count"][1] == 0


def test_adapt_freezes_the_backbone():
    cfg = cfg_of()
    method = get_method("last")
    torch.manual_seed(0)
    net = method.build_model(cfg, "adapt")
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"head.1.weight", "head.1.bias"}
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = method.configure_optimizer(net, cfg, "adapt")
    net.train()
    batch = {"x": torch.rand(6, 4, 3, 32, 32), "y": torch.tensor([0, 1, 0, -1, -1, -1])}
    for _ in range(3):
        out = method.loss_step(net, batch, "adapt", cfg)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    after = net.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("head.") for k in changed)  # backbone BatchNorm stats too
    assert {"head.1.weight", "head.1.bias"} <= changed


def test_checkpoint_round_trip(tmp_path):
    cfg = cfg_of()
    method = get_method("last")
    torch.manual_seed(1)
    model = method.build_model(cfg, "adapt").eval()
    x = torch.rand(2, 4, 3, 32, 32)
    ck.save_state(str(tmp_path), model=model.state_dict(), epoch=1, stage="adapt", cfg=cfg)
    state = ck.load_state(str(tmp_path))
    torch.manual_seed(2)
    fresh = method.build_model(state["cfg"], state["stage"])
    fresh.load_state_dict(state["model"])
    fresh.eval()
    assert torch.equal(method.predict(model, {"x": x}, cfg), method.predict(fresh, {"x": x}, cfg))


def test_domain_standardize_statistics_and_fallbacks():
    torch.manual_seed(0)
    norm = DomainStandardize(3, 3)
    f = torch.randn(5, 3)
    assert torch.allclose(norm(f), f, atol=1e-4)  # no statistics yet: identity
    a, b = torch.randn(200, 3) * 2 + 5, torch.randn(300, 3) * 0.5 - 1
    norm.update(torch.cat([a, b]), torch.tensor([0] * 200 + [1] * 300))
    za, zb = norm(a, torch.zeros(200, dtype=torch.long)), norm(b, torch.ones(300, dtype=torch.long))
    for z in (za, zb):
        assert z.mean(0).abs().max() < 1e-4 and (z.std(0, unbiased=False) - 1).abs().max() < 1e-3
    # domain 2 has no statistics, and indices out of range mean the source: both fall back to domain 0
    assert torch.allclose(norm(b, torch.full((300,), 2)), norm(b, torch.zeros(300, dtype=torch.long)))
    assert torch.allclose(norm(b, torch.full((300,), 7)), norm(b))


def test_per_domain_statistics_adapt_the_head_to_a_shifted_target(monkeypatch):
    """Known answer: a target whose features are the source's under a per-feature affine shift
    (offsets, and rescaled signal/noise features). Source statistics on the target put every clip
    on one side of the threshold; the target's own statistics (from its unlabelled clips) undo
    the shift, so accuracy comes back. Same stage code, only ``adapt.domain_stats`` differs."""
    from sklearn.metrics import roc_auc_score

    def make(n, seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 2, (n,), generator=g)
        f = torch.randn(n, 64, generator=g)
        f[:, :8] += 1.5 * y.unsqueeze(1).float()
        return f, y

    scale = torch.ones(64)
    scale[:8], scale[8:] = 0.3, 3.0
    offset = torch.linspace(-4, 4, 64)
    shift = lambda f: f * scale + offset  # noqa: E731
    (fs, ys), (ft, yt), (fe, ye) = make(400, 1), make(400, 2), make(400, 3)
    results = {}
    for per_domain in (True, False):
        cfg = cfg_of("method.data.targets=[synth_warp]", "method.adapt.target_weight=0",
                     f"method.adapt.domain_stats={str(per_domain).lower()}")
        torch.manual_seed(0)
        net = LASTNet(cfg, "adapt")
        monkeypatch.setattr(net, "features", lambda x: x)  # the "clips" are already features here
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=0.05)
        net.train()
        for step in range(60):
            i = torch.randperm(400)[:64]
            batch = {"x": torch.cat([fs[i], shift(ft[i])]), "y": torch.cat([ys[i], torch.full((64,), -1)]),
                     "domain": torch.cat([torch.zeros(64), torch.ones(64)]).long()}
            out = adapt_losses(net, batch, cfg, step + 1)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
        net.eval()
        p = get_method("last").predict(net, {"x": shift(fe), "domain": torch.ones(400, dtype=torch.long)}, cfg)
        results[per_domain] = (float(((p > 0.5).long() == ye).float().mean()), roc_auc_score(ye, p.detach()))
    (acc_a, auc_a), (acc_s, auc_s) = results[True], results[False]
    assert acc_a > 0.8 and acc_s < 0.65, results
    assert auc_a > auc_s + 0.05, results


def test_served_clips_use_the_source_statistics_or_the_configured_domain():
    method = get_method("last")
    frames = [np.full((40, 40, 3), 30 * i, np.uint8) for i in range(6)]
    got = method.serve_inputs(frames, cfg_of())
    assert got["x"].shape == (1, 4, 3, 32, 32) and got["domain"].tolist() == [0]  # null: the source
    got = method.serve_inputs(frames, cfg_of("method.adapt.serve_domain=synth_color"))
    assert got["domain"].tolist() == [3]  # the protocol's third target
    with pytest.raises(ValueError, match="neither the source"):
        method.serve_inputs(frames, cfg_of("method.adapt.serve_domain=nope"))
    # the domain picks the standardisation: same clip, different scores once the domains differ
    torch.manual_seed(0)
    net = method.build_model(cfg_of(), "adapt").eval()
    f = torch.randn(50, net.head[1].in_features)
    net.head[0].update(torch.cat([f, 3 * f + 2]), torch.tensor([0] * 50 + [2] * 50))
    x = got["x"]
    s0 = method.predict(net, {"x": x, "domain": torch.tensor([0])}, cfg_of())
    s2 = method.predict(net, {"x": x, "domain": torch.tensor([2])}, cfg_of())
    assert not torch.allclose(s0, s2)
    # with domain_stats off every clip is standardised as the source
    off = cfg_of("method.adapt.domain_stats=false")
    assert torch.equal(method.predict(net, {"x": x, "domain": torch.tensor([2])}, off), s0)


def _two_rank_stats(rank: int, port: int, rows, q) -> None:
    """One of two gloo ranks: its own shard's rows into a DomainStandardize, then the epoch-end
    reduction the generic loop runs; puts the resulting (mean, std) on ``q``."""
    import torch.distributed as dist

    from trustlab.platform.train import sum_buffers_across, summed_buffers

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ds = DomainStandardize(3, 2)
    snap = {n: b.clone() for n, b in summed_buffers(ds)}
    f, d = rows
    ds.update(f[rank::2], d[rank::2])  # this rank's shard only
    sum_buffers_across(summed_buffers(ds), snap, 2)
    q.put((rank, *[t.numpy() for t in ds.stats()]))
    dist.destroy_process_group()


def test_per_domain_statistics_are_reduced_across_workers():
    """Each Ray Train worker sees its shard of the source and target clips; rank 0's checkpoint
    must hold the statistics of every worker's rows, not of its own shard only. Two gloo ranks
    (no Ray) each update a DomainStandardize with half the rows; after the loop's reduction both
    hold the statistics of all rows."""
    import multiprocessing as mp
    import socket

    g = torch.Generator().manual_seed(0)
    f = torch.randn(40, 3, generator=g) * torch.tensor([1.0, 2.0, 3.0]) + torch.arange(40).unsqueeze(1) / 10
    d = torch.arange(40) % 3 % 2  # both domains on both ranks, in unequal numbers
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    ps = [ctx.Process(target=_two_rank_stats, args=(r, port, (f, d), q)) for r in range(2)]
    for p in ps:
        p.start()
    got = dict((r, (m, s)) for r, m, s in (q.get(timeout=60) for _ in ps))
    for p in ps:
        p.join(30)
    whole = DomainStandardize(3, 2)
    whole.update(f, d)
    mean, std = whole.stats()
    shard = DomainStandardize(3, 2)
    shard.update(f[0::2], d[0::2])
    assert not np.allclose(shard.stats()[0].numpy(), mean.numpy(), atol=1e-3)  # one shard alone differs
    for r in (0, 1):
        np.testing.assert_allclose(got[r][0], mean.numpy(), atol=1e-9)
        np.testing.assert_allclose(got[r][1], std.numpy(), atol=1e-9)


def test_sweep_space_holds_no_adaptation_key_its_source_criterion_cannot_see():
    """LAST's sweep is scored on the source validation AUC (target labels are never read); that
    criterion cannot see adaptation, so no ``method.adapt.*`` key is swept (last.yaml says why)."""
    t = compose(["method=last"])["method"]["tune"]
    assert t["metric"] == "val_auc"
    assert not [k for k in t["space"] if k.startswith("method.adapt.")], t["space"]


def test_pretrain_then_adapt_on_clips_undoes_a_target_capture_shift(tmp_path):
    """End to end on clips (no Ray): pretrain_ssl on real source clips, then adapt with the
    unlabelled clips of two targets — ``synth_blend_cam`` (the source's manipulation under a
    capture shift of the whole set, last.yaml) and ``synth_warp`` (another manipulation) — and
    the same adapt stage on the same frozen backbone without the per-domain statistics (the
    ``source_only`` ablation). Measured (60 videos per class, 16 frames, 12 + 15 epochs) on
    synth_blend_cam: video AUC 0.882 vs 0.813, video accuracy 0.833 vs 0.542; in-domain video AUC
    0.979 for both; synth_warp 0.639 for both (a new manipulation is not a capture shift).
    Asserted on synth_blend_cam: accuracy >= source-only + 0.15 and AUC >= source-only + 0.03;
    in-domain AUC >= 0.9. With ``domain_stats=false`` in both runs the gaps are 0 and it fails."""
    base = ["method.dim=64", "method.data.frames_per_video=16", "method.data.n_videos_per_class=60",
            "method.batch_size=8", f"method.data.root={tmp_path}", "method.data.cache=null",
            "method.data.targets=[synth_blend_cam,synth_warp]", "method.epochs.pretrain_ssl=12", "method.epochs.adapt=15"]
    method = get_method("last")
    cfg = cfg_of(*base)
    data = adapt_data(cfg)
    torch.manual_seed(0)
    backbone, _ = V.local_fit(method, cfg, data, stages=["pretrain_ssl"])
    state = backbone.state_dict()
    res = {}
    for name, ov in (("adapted", []), ("source_only", ["method.adapt.domain_stats=false"])):
        c = cfg_of(*base, *ov)
        torch.manual_seed(0)
        model, _ = V.local_fit(method, c, data, stages=["adapt"], init_state=state)
        res[name] = V.evaluate_protocol(method, model, data, c)
    cam = {k: r["cross_domain"]["synth_blend_cam"]["video"] for k, r in res.items()}
    print({k: (round(v["auc"], 3), round(v["acc"], 3)) for k, v in cam.items()},
          {k: round(r["test"]["video"]["auc"], 3) for k, r in res.items()})
    assert res["adapted"]["test"]["video"]["auc"] >= 0.9, res["adapted"]["test"]
    assert cam["adapted"]["acc"] >= cam["source_only"]["acc"] + 0.15, cam
    assert cam["adapted"]["auc"] >= cam["source_only"]["auc"] + 0.03, cam


@pytest.mark.parametrize("per_domain", [True, False])
def test_a_batch_of_unlabelled_clips_only_still_steps(per_domain):
    """A shuffled adapt batch may hold no labelled clip: its loss must still backpropagate (a
    zero loss without a graph made the step fail), and with per-domain statistics its clean
    target clips still update their domain's statistics."""
    cfg = cfg_of("method.data.targets=[synth_warp]", f"method.adapt.domain_stats={str(per_domain).lower()}")
    torch.manual_seed(0)
    net = LASTNet(cfg, "adapt").train()
    batch = {"x": torch.rand(4, 4, 3, 32, 32), "y": torch.full((4,), V.UNLABELLED), "domain": torch.ones(4, dtype=torch.long)}
    out = adapt_losses(net, batch, cfg, step=1)
    out["loss"].backward()
    assert float(out["loss"].detach()) == 0.0
    assert float(net.head[0].count[1]) == (4.0 if per_domain else 0.0)

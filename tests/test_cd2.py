"""CD²: DDM lowers its feature-matching loss, DCM is zero for equal heads (and only then), the
adaptive alpha, and the whole method beating the prototype baseline, fine-tuning and each of\nits modules switched off on digits in-process (no Ray)."""
import copy
import time

import numpy as np
import pytest
import torch

from conftest import compose
from trustlab.methods.fscil.cd2 import Head, adaptive_alpha, dcm_loss, ddm_matching_loss, ddm_synthesize
from trustlab.methods.fscil import engine
from trustlab.methods.fscil.protocol import protocol_of
from trustlab.platform.registry import get_method


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one intra-op thread


def _digits_by_class():
    from trustlab.methods.fscil.digits import digits_images

    x, y = digits_images()
    return engine.as_float(x), torch.as_tensor(y)


@pytest.mark.parametrize("init", ["noise", "real"])
def test_ddm_reduces_its_matching_loss(init):
    torch.manual_seed(0)
    backbone = engine.SmallConvNet(1, 8, width=16, depth=3)
    x, y = _digits_by_class()
    classes = [0, 3, 7]
    for mod in backbone.modules():  # calibrate BatchNorm statistics on the data (a random net, not a trained one)
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.momentum = None
    with torch.no_grad():
        backbone.train()(x)
        backbone.eval()
        targets = torch.stack([backbone(x[y == c]).mean(0) for c in classes])
    g = torch.Generator().manual_seed(0)
    if init == "noise":
        start = torch.rand((3, 2, 1, 8, 8), generator=g)
    else:
        start = torch.stack([x[y == c][:2] for c in classes])
    imgs, hist = ddm_synthesize(backbone, targets, start, steps=100, lr=0.2)
    with torch.no_grad():
        before = float(ddm_matching_loss(backbone, start, targets))
        after = float(ddm_matching_loss(backbone, imgs, targets))
    assert hist[0] == pytest.approx(before, rel=1e-5) and hist[-1] == pytest.approx(after, rel=1e-5)
    assert after < 0.25 * before, (before, after)
    assert imgs.min() >= 0 and imgs.max() <= 1 and imgs.shape == start.shape
    assert all(q.requires_grad for q in backbone.parameters())  # restored after synthesis
    # each synthetic pair is now closer to its own class mean than to any other class's
    with torch.no_grad():
        f = backbone(imgs.flatten(0, 1)).view(3, 2, -1).mean(1)
    assert torch.equal(torch.cdist(f, targets).argmin(1), torch.arange(3))


@pytest.mark.parametrize("init", ["real", "noise"])
def test_ddm_memory_does_not_depend_on_the_number_of_workers(init):
    """Each class's memory (its starting images, and so the real exemplars of ``ddm.steps=0``)
    is the same whether one worker distils every class or two workers split them. Before the
    per-class generators, rank r drew class c's images from a generator seeded by its first
    class, so one and two workers picked different exemplars (and CD² and its DDM-off variant
    moved with them)."""
    from types import SimpleNamespace

    from trustlab.methods.fscil.protocol import session_split

    cfg = compose(["method=cd2", "method.ddm.steps=3", f"method.ddm.init={init}"])
    m = get_method("cd2")
    base = session_split(m.build_data(cfg)["train"], 0)
    p = protocol_of(cfg)
    classes = list(range(p.n_base))
    torch.manual_seed(0)
    model = m.build_model(cfg, "incremental").eval()
    state = copy.deepcopy(model.state_dict())
    memories = {}
    for world in (1, 2):
        model.load_state_dict(state)
        for rank in range(world):
            ctx = SimpleNamespace(cfg=cfg, rank=rank, world=world, gather=lambda out: [out])
            m._distill(model, classes, base["x"], base["y"], ctx, model.heads[0])
        assert bool(model.memory_ready[: p.n_base].all())
        memories[world] = model.memory[: p.n_base].clone()
    assert torch.allclose(memories[1], memories[2], atol=1e-5)
    assert not torch.equal(memories[1][0], memories[1][1])  # and classes do not share one draw


def test_dcm_zero_when_heads_equal_positive_otherwise():
    torch.manual_seed(0)
    old = Head(32, 64, 16, 10)
    z = torch.randn(12, 32)
    out = dcm_loss(old, copy.deepcopy(old), z, n_old=6, alpha=2.0, beta=0.1)
    assert all(float(out[k].detach()) == 0.0 for k in ("loss", "output", "relation"))
    new = copy.deepcopy(old)
    with torch.no_grad():
        new.neck[0].weight.add_(0.3 * torch.randn_like(new.neck[0].weight))
    out = dcm_loss(old, new, z, n_old=6, alpha=2.0, beta=0.1)
    v = {k: float(t.detach()) for k, t in out.items()}
    assert v["output"] > 1e-4 and v["relation"] > 1e-4
    assert v["loss"] == pytest.approx(0.1 * v["output"] + 2.0 * v["relation"], rel=1e-5)
    out["loss"].backward()
    assert new.neck[0].weight.grad.abs().sum() > 0 and all(q.grad is None for q in old.parameters())
    # changing only the classifier rows of classes not yet seen leaves the constraint at zero
    new = copy.deepcopy(old)
    with torch.no_grad():
        new.fc.weight[6:] += 1.0
    assert float(dcm_loss(old, new, z, 6, 2.0, 0.1)["loss"].detach()) == 0.0


def test_adaptive_alpha():
    assert adaptive_alpha(1.0, 60, 5) == pytest.approx(12 ** 0.5)
    assert adaptive_alpha(0.5, 4, 2, adaptive=False) == 0.5


def _cd2_last_session(*overrides):
    torch.manual_seed(0)
    cfg = compose(["method=cd2", "method.base.epochs=15", "method.ddm.steps=300", *overrides])
    m = get_method("cd2")
    data = m.build_data(cfg)
    model = engine.fit_inprocess(cfg, data)
    p = protocol_of(cfg)
    acc = engine.session_accuracies(lambda x, s: m.session_logits(model, x, s), data["test"], p)
    return m, cfg, data, model, p, acc


def test_cd2_beats_its_ablations_and_the_prototype_baseline_on_digits_in_process():
    """Without Ray, on digits (4 base + 3 x 2-way 5-shot; the same base model every time): CD²
    against the frozen-encoder prototype (NCM) baseline, fine-tuning, and each module off —
    DDM off (``ddm.steps=0``: the memory is K random real images, not distilled ones) and DCM
    off (``dcm.alpha=dcm.beta=0``). The default data: 30 % of the training images have a 4 x 4
    block zeroed (``method.data.occluded``, since 2026-12-05, sixth session), so random real
    exemplars often keep a hidden digit. Measured (%), last session / average over the sessions:
    CD² 64.0 / 80.38, prototype 58.4 / 76.48, fine-tune 14.0, DDM off 56.8 / 74.95, DCM off
    64.0 / 78.92 (DCM's gain here is in sessions 1-2: 91.0 / 68.0 against 86.7 / 66.5).
    Asserted: last CD² >= prototype + 3, >= DDM off + 4, >= fine-tune + 10; average >= DDM off
    + 3 and >= DCM off + 0.75. With DCM off in the main model the DCM assertion fails (equal
    figures), as do the DDM ones with DDM off. Through Ray on seeds 0-4 DDM adds +5.93 / +3.82 /
    +17.31 / +6.58 / +1.90 to the average and DCM +3.62 / +5.56 / +5.98 / +2.23 / +1.13
    (docs/results.md)."""
    t0 = time.time()
    m, cfg, data, model, p, acc = _cd2_last_session()
    ft = engine.finetune_baseline(m.base_encoder(model), m.base_classifier(model), data, p, 100, 1e-3, 1)
    proto = engine.prototype_baseline(m.base_encoder(model), data, p)
    assert acc[0] == ft[0] > 90.0 and proto[0] > 90.0  # same base model (the prototypes score it their own way)
    assert bool(model.memory_ready.all()) and model.memory.shape[:2] == (10, 2)
    # the backbone stayed frozen: session heads differ, backbone is the base one
    assert not torch.equal(model.heads[0].fc.weight, model.heads[3].fc.weight)
    no_ddm = _cd2_last_session("method.ddm.steps=0")[-1]
    no_dcm = _cd2_last_session("method.dcm.alpha=0", "method.dcm.beta=0")[-1]
    print(f"cd2 {np.round(acc, 2)} prototype {np.round(proto, 2)} finetune {np.round(ft, 2)} "
          f"ddm off {np.round(no_ddm, 2)} dcm off {np.round(no_dcm, 2)} in {time.time() - t0:.1f}s")
    assert acc[-1] >= proto[-1] + 3.0, (acc, proto)
    assert acc[-1] >= no_ddm[-1] + 4.0, (acc, no_ddm)
    assert np.mean(acc) >= np.mean(no_ddm) + 3.0, (acc, no_ddm)
    assert np.mean(acc) >= np.mean(no_dcm) + 0.75, (acc, no_dcm)
    assert acc[-1] >= ft[-1] + 10.0, (acc, ft)

"""Re-label distillation and the attribution metrics, in plain PyTorch (no Ray): the relabelling
logic, a linear student that recovers a known black box, the VAE's reconstruction improving, and
re-label explanations beating random attribution on deletion AUC for a digits classifier."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import compose
from trustlab.methods.relabel import relabel as R
from trustlab.methods.relabel import attribution as A


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny tensors: one intra-op thread


@pytest.fixture(scope="module")
def cfg():
    return compose(["method=relabel"])


def test_relabel_marks_kept_and_shifted_labels_and_keeps_soft_scores():
    probs = torch.tensor([[[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.4, 0.4, 0.2]],
                          [[0.1, 0.1, 0.8], [0.5, 0.1, 0.4], [0.2, 0.2, 0.6]]])
    c = torch.tensor([0, 2])
    kept, soft = R.relabel(probs, c)
    assert kept.tolist() == [[1, 0, 1], [1, 0, 1]]  # ties go to the lowest index (argmax)
    assert torch.allclose(soft, torch.tensor([[0.7, 0.3, 0.4], [0.8, 0.4, 0.6]]))


class LinearBlackBox(torch.nn.Module):
    """p(class 1 | x) = sigmoid(w* . x + b) on 8x8 images: a black box whose explanation is known."""

    def __init__(self, w_star, b):
        super().__init__()
        self.w, self.b = w_star, b

    def forward(self, x):
        z = (x.flatten(1) * self.w).sum(1) + self.b
        return torch.stack([torch.zeros_like(z), z], 1)  # logits: softmax gives sigmoid(z) for class 1


def test_linear_student_recovers_a_known_black_box():
    g = torch.Generator().manual_seed(0)
    w_star = torch.randn(64, generator=g)
    bb = LinearBlackBox(w_star, 0.0)
    xs = torch.rand(3, 600, 64, generator=g) - 0.5  # three neighbourhoods of random (centred) images
    c = torch.ones(3, dtype=torch.long)
    probs = torch.softmax(bb(xs.view(-1, 64)), 1).view(3, 600, 2)
    kept, soft = R.relabel(probs, c)
    assert 0.2 < float(kept.mean()) < 0.8
    for target in (kept, soft, 0.5 * kept + 0.5 * soft):
        w, b = R.fit_linear_students(xs, target, l2=1e-4, steps=25)
        cos = F.cosine_similarity(w, w_star[None].expand_as(w), dim=1)
        assert bool((cos > 0.9).all()), cos
    # the explanation of a constant black box is (close to) zero: nothing to explain
    w0, _ = R.fit_linear_students(xs, torch.full((3, 600), 0.7), l2=1e-3, steps=25)
    assert float(w0.abs().max()) < 1e-3


def _digits_model(cfg, bb_epochs=6, vae_epochs=25, seed=0, reject=None):
    """A digits CNN and the VAE, trained in plain PyTorch; ``reject``: a ``method.blackbox.reject``
    spec (the CNN then also learns a reject output, class 10, on noisy copies)."""
    torch.manual_seed(seed)
    data = R.digits_splits(0, 297, 300)
    model = R.RelabelModel(cfg, (1, 8, 8), 11 if reject else 10)
    x = torch.from_numpy(data["train"]["x"])
    y = torch.from_numpy(data["train"]["y"])
    opt = torch.optim.Adam(model.blackbox.parameters(), lr=3e-3)
    for ep in range(bb_epochs):
        for idx in torch.randperm(len(x), generator=torch.Generator().manual_seed(ep)).split(64):
            xb, yb = (x[idx], y[idx]) if not reject else R.with_reject_examples(x[idx], y[idx], reject, 10)
            loss = F.cross_entropy(model.blackbox(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    opt = torch.optim.Adam(model.vae.parameters(), lr=3e-3)
    for ep in range(vae_epochs):
        for idx in torch.randperm(len(x), generator=torch.Generator().manual_seed(100 + ep)).split(64):
            loss = model.vae.loss(x[idx], float(cfg["method"]["vae"]["beta"]))["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model, data


@pytest.fixture(scope="module")
def trained(cfg):
    return _digits_model(cfg)


@pytest.fixture(scope="module")
def trained_reject(cfg):
    """The default black box: the digits CNN with the YAML's reject output (the planted signal)."""
    from trustlab.methods.relabel.relabel import reject_spec

    spec = reject_spec(cfg)
    assert spec is not None, "the default relabel YAML plants the reject output"
    return _digits_model(cfg, bb_epochs=15, vae_epochs=60, reject=spec)  # the YAML's steps (30 epochs on 2 workers)


def _recon_mse(vae, x):
    with torch.no_grad():
        mu, _ = vae.encode(x)
        return float((vae.decode(mu) - x).pow(2).mean())


def test_vae_reconstruction_improves(cfg, trained):
    model, data = trained
    xv = torch.from_numpy(data["val"]["x"])
    torch.manual_seed(0)
    fresh = R.VAE(1, 8, int(cfg["method"]["vae"]["latent"]), 256)
    before, after = _recon_mse(fresh, xv), _recon_mse(model.vae, xv)
    mean_img = float((xv - torch.from_numpy(data["train"]["x"]).mean(0)).pow(2).mean())
    assert after < 0.5 * before, (before, after)
    assert after < 0.6 * mean_img, (after, mean_img)  # better than predicting the average digit
    # perturbing the latent code changes the decoded image, and more with a wider radius
    rc = dict(cfg["method"]["relabel"], n_samples=50)
    x = xv[:4]
    near = R.synthesize(model, x, rc, 0, "latent", 0.3)
    far = R.synthesize(model, x, rc, 0, "latent", 3.0)
    d = lambda s: float((s[:, 1:] - s[:, :1]).pow(2).mean())  # noqa: E731  (sample 0 = reconstruction)
    assert 0 < d(near) < d(far)


def test_adaptive_radius_reaches_the_decision_boundary(cfg, trained):
    model, data = trained
    x = torch.from_numpy(data["test"]["x"][:12])
    rc = dict(cfg["method"]["relabel"], n_samples=100, radius=0.05, adaptive=False)
    fixed = R.neighbourhood(model, x, rc, 0)
    rc_ad = dict(rc, adaptive=True, min_shift=0.15, max_doublings=8)
    adaptive = R.neighbourhood(model, x, rc_ad, 0)
    assert float((1 - fixed["kept"].mean(1)).mean()) < 0.05  # a tiny radius barely shifts labels
    shift = 1 - adaptive["kept"].mean(1)
    assert float((shift >= 0.15).float().mean()) >= 0.9, shift
    assert bool((adaptive["radius"] > 0.05).all())
    # the kept/shift labels agree with the black box on the synthetic images
    xs = adaptive["xs"][0]
    assert torch.equal(model.probs(xs).argmax(1) == adaptive["c"][0], adaptive["kept"][0].bool())


def _deletion(model, x, c, maps, base) -> dict:
    return {k: float(A.deletion_insertion(model.probs, x, c, a, base)["deletion_auc"].mean()) for k, a in maps.items()}


def test_relabel_explanations_beat_random_and_a_constant_weight_student_on_deletion(cfg, trained):
    """The student's weights must carry the explanation: its contribution map ``w * x`` is
    compared with a constant-weight student (``w = 1``: the explanation is the image itself,
    which alone ranks bright digit strokes first and deletes well on digits) and with random.
    Measured on these 30 test digits: deletion AUC re-label 0.072 (0.077 with the earlier 400
    half-hard labels), constant weight 0.216, random 0.536 (0.125 for re-label with the VAE at
    beta 1). Asserted: re-label <= 0.75x the
    constant-weight student's deletion AUC, <= 0.5x random's. With the student's weights replaced
    by a constant (``distil`` returning ``x`` as the contribution) the first assertion fails
    (0.2155 <= 0.75 x 0.2155)."""
    model, data = trained
    x = torch.from_numpy(data["test"]["x"][:30])
    rc = cfg["method"]["relabel"]
    ex = R.explain(model, x, rc, seed=0)
    base = A.baseline_image(x, "zero")
    rl = A.deletion_insertion(model.probs, x, ex["c"], ex["contribution"], base)
    rnd = A.deletion_insertion(model.probs, x, ex["c"], A.random_attribution(len(x), 8, 8, seed=0), base)
    const = A.deletion_insertion(model.probs, x, ex["c"], (x - base).sum(1), base)  # w = 1 everywhere
    d_rl, d_rnd = rl["deletion_auc"], rnd["deletion_auc"]
    assert float(d_rl.mean()) <= 0.75 * float(const["deletion_auc"].mean()), \
        (float(d_rl.mean()), float(const["deletion_auc"].mean()))
    assert float(d_rl.mean()) < 0.5 * float(d_rnd.mean()), (float(d_rl.mean()), float(d_rnd.mean()))
    assert float((d_rl < d_rnd).float().mean()) >= 0.85
    assert float(rl["insertion_auc"].mean()) > float(rnd["insertion_auc"].mean()) + 0.15
    # an image's explanation does not depend on the batch (or Ray shard) it is computed in
    seeds = np.arange(30) + 500
    part = R.explain(model, x[10:13], rc, seed=seeds[10:13])
    full = R.explain(model, x, rc, seed=seeds)
    assert torch.allclose(part["weights"], full["weights"][10:13], atol=1e-5)
    # and it is the student's weights that carry this: a sign-flipped explanation deletes worst
    flip = A.deletion_insertion(model.probs, x, ex["c"], -ex["contribution"], base)
    assert float(flip["deletion_auc"].mean()) > float(d_rnd.mean())


@pytest.mark.xfail(strict=True, reason="known gap (issue 17): on digits with the default black box, latent-space re-label "
                   "distillation (deletion AUC 0.061) loses to gradient x input (0.041), LIME (0.034) and occlusion "
                   "(0.059); strict, so the day it beats them all this test reports it")
def test_relabel_beats_every_baseline_it_computes_on_deletion(cfg, trained_reject):
    """Issue 17 asks the method to beat every attribution baseline it reports on deletion AUC.
    Measured on 30 test digits with the default black box (the CNN with its reject output), the
    evaluation's ``attribution_maps``: re-label 0.061 (0.049 with the earlier 400 half-hard
    labels), gradient saliency 0.403, gradient x input 0.041, occlusion 0.059, LIME 0.034,
    random 0.373. On the plain CNN (before the reject output
    was planted): re-label 0.077, gradient x input 0.045, occlusion 0.076, LIME 0.051. LIME masks
    pixels to the deletion baseline, the very operation the metric applies; gradient x input reads
    the black box at the image itself. Radius, samples, labels, l2 1e-2 and anchor moved re-label by
    < 0.01 either way on the plain CNN (docs/results.md)."""
    model, data = trained_reject
    x = torch.from_numpy(data["test"]["x"][:30])
    res = R.attribution_maps(model, x, cfg["method"]["relabel"], cfg["method"]["eval"], seed=0)
    d = _deletion(model, x, res["c"], res["maps"], A.baseline_image(x, "zero"))
    worse = {k: v for k, v in d.items() if k != "relabel" and v <= d["relabel"]}
    assert not worse, (d["relabel"], worse)


def test_deletion_insertion_and_baselines_on_a_known_linear_model():
    g = torch.Generator().manual_seed(1)
    w_star = torch.randn(64, generator=g)
    bb = LinearBlackBox(w_star, -1.0)
    fn = lambda t: torch.softmax(bb(t), 1)  # noqa: E731
    x = torch.rand(20, 1, 8, 8, generator=g)
    c = torch.ones(20, dtype=torch.long)
    truth = (x[:, 0] * w_star.view(8, 8))  # exact contribution of each pixel to the logit
    good = A.deletion_insertion(fn, x, c, truth)
    bad = A.deletion_insertion(fn, x, c, -truth)
    assert float(good["deletion_auc"].mean()) < float(bad["deletion_auc"].mean()) - 0.2
    assert float(good["insertion_auc"].mean()) > float(bad["insertion_auc"].mean()) + 0.2
    assert torch.allclose(good["deletion_curve"][:, 0], fn(x)[:, 1])  # starts at the image's own score
    # the baselines agree with the truth on a linear model
    from scipy.stats import spearmanr

    corr = lambda a: float(np.mean([spearmanr(a[i].flatten(), truth[i].flatten())[0] for i in range(len(x))]))  # noqa: E731
    assert corr(A.gradient_x_input(fn, x, c)) > 0.9
    assert corr(A.lime(fn, x, c, cell=1, n_samples=800, seed=0)) > 0.8
    assert corr(A.occlusion(fn, x, c, patch=1)) > 0.95
    sal = A.gradient_saliency(fn, x, c)
    assert float(np.mean([np.corrcoef(sal[i].flatten(), w_star.abs())[0, 1] for i in range(len(x))])) > 0.99


def test_external_black_box_from_another_methods_checkpoint(tmp_path):
    """The black box can be any registered image method's trained model.pt (here an untrained,
    tiny F2C detector): its own data is loaded, a conv VAE fits its images, explanations work."""
    from conftest import ci_overrides
    from trustlab.platform import checkpoints as ck
    from trustlab.platform.registry import get_method

    fcfg = compose(["method=f2c", *ci_overrides("f2c"), "method.data.n_train=16", "method.data.n_val=8",
                    "method.data.n_test=8", f"method.data.root={tmp_path / 'f2c'}"])
    f2c = get_method("f2c")
    torch.manual_seed(0)
    ck.save_state(str(tmp_path / "bb"), model=f2c.build_model(fcfg, "train").state_dict(), epoch=1, stage="train", cfg=fcfg)
    cfg = compose(["method=relabel", f"method.blackbox.checkpoint={tmp_path / 'bb'}", "method.relabel.cell=8",
                   "method.relabel.n_samples=32", "method.vae.latent=8", "method.eval.occlusion_patch=8"])
    m = get_method("relabel")
    assert m.stages(cfg) == ["vae", "relabel"]
    data = m.build_data(cfg)
    assert data["train"]["x"].shape[1:] == (3, 32, 32) and set(data) == {"train", "val", "test"}
    model = m.build_model(cfg, "vae")
    assert model.vae.arch == "conv" and isinstance(model.blackbox, R.ExternalBlackBox)
    batch = m.to_batch({k: v[:8] for k, v in data["train"].items()})
    out = m.loss_step(model, batch, "vae", cfg)
    out["loss"].backward()
    assert all(p.grad is None for p in model.blackbox.parameters())  # the black box is not trained
    model.eval()
    x = batch["x"][:3]
    p = model.probs(x)
    assert p.shape == (3, 2) and torch.allclose(p.sum(1), torch.ones(3))
    with torch.no_grad():
        ref = f2c.predict(model.blackbox.model, {"x": x}, fcfg)
    assert torch.allclose(p[:, 1], ref, atol=1e-4)
    maps = R.attribution_maps(model, x, cfg["method"]["relabel"], cfg["method"]["eval"], seed=0)["maps"]
    for name, a in maps.items():
        assert a.shape == (3, 32, 32) and bool(torch.isfinite(a).all()), name
    # each 8x8 cell of the re-label map carries one student weight
    w = maps["relabel"][0] / x[0].sum(0).clamp_min(1e-6)
    assert torch.allclose(w[:8, :8], w[0, 0].expand(8, 8), atol=1e-4)


def test_explanations_do_not_depend_on_the_memory_layout_of_the_images():
    """Images that arrive channels-last (an N x H x W x C array transposed to N x C x H x W, as
    image folders load) get the same explanations and curves as contiguous ones. A re-label run on
    a trained F2C detector failed in its relabel stage with "view size is not compatible" in
    ``deletion_insertion`` before the batch's views became reshapes."""
    cfg = compose(["method=relabel", "method.relabel.n_samples=16", "method.vae.latent=8", "method.eval.lime_samples=32",
                   "method.eval.occlusion_patch=2"])
    torch.manual_seed(0)
    model = R.RelabelModel(cfg, (3, 8, 8), 10).eval()
    x = torch.from_numpy(np.random.default_rng(0).random((3, 8, 8, 3), dtype=np.float32)).permute(0, 3, 1, 2)
    assert not x.is_contiguous()
    rcfg, ecfg = cfg["method"]["relabel"], cfg["method"]["eval"]
    with torch.no_grad():
        got = R.attribution_maps(model, x, rcfg, ecfg, seed=0)
        ref = R.attribution_maps(model, x.contiguous(), rcfg, ecfg, seed=0)
    assert set(got["maps"]) == set(ref["maps"])
    for name, a in got["maps"].items():
        assert torch.allclose(a, ref["maps"][name], atol=1e-5), name
        d = A.deletion_insertion(model.probs, x, got["c"], a)
        assert torch.allclose(d["deletion_auc"], A.deletion_insertion(model.probs, x.contiguous(), ref["c"], a)["deletion_auc"])


def test_latent_neighbours_beat_pixel_noise_where_the_black_box_reacts_to_noise(cfg, trained, trained_reject):
    """Issue 17's known answer for the method's mechanism (the VAE neighbourhood): the default black
    box has a reject output trained on noisy digits (``method.blackbox.reject``), silent on the data.
    Pixel-noise neighbours (the ablation, ``perturb=pixel``) mostly land on it, so their relabelled
    shifts say "noisy", not which strokes carry the digit; the VAE's neighbours stay on the digit
    manifold. Measured on these 60 test digits (same seeds, the YAML's 50 queries): deletion AUC
    latent 0.0597 vs pixel 0.0738 (1.24x); pixel neighbours rejected 0.79, latent 0.08. On the
    plain CNN (no reject output) the two are close (pixel 0.0720 vs latent 0.0671, 1.07x): the gap
    is the planted signal's. (At the earlier 400 queries: 0.050 vs 0.071, plain 0.068 vs 0.054.)
    Asserted: pixel >= 1.15x latent, and that ratio above the plain CNN's by 0.1. With the
    mechanism off (``perturb=pixel`` for both explanations) the first fails (ratio 1.0); with the
    reject output off (an 11-output CNN trained without noisy copies) the ratio is 0.91 and both
    fail."""
    out = {}
    for name, (model, data) in (("reject", trained_reject), ("plain", trained)):
        x = torch.from_numpy(data["test"]["x"][:60])
        base = A.baseline_image(x, "zero")
        rc = cfg["method"]["relabel"]
        d = {}
        for perturb in ("latent", "pixel"):
            nb = R.neighbourhood(model, x, rc, seed=0, perturb=perturb)
            ex = R.distil(nb, x, rc)
            d[perturb] = float(A.deletion_insertion(model.probs, x, ex["c"], ex["contribution"], base)["deletion_auc"].mean())
            if name == "reject":
                d[f"{perturb}_rejected"] = R._reject_share(model, nb, 10)
        out[name] = d
    r, p = out["reject"], out["plain"]
    assert r["pixel_rejected"] > 0.5 and r["latent_rejected"] < 0.25, r  # the planted behaviour, as intended
    assert r["pixel"] >= 1.15 * r["latent"], out  # the VAE neighbourhood explains the decision better (1.24x)
    assert r["pixel"] / r["latent"] > p["pixel"] / p["latent"] + 0.1, out  # and the planted output is why (1.24 vs 1.07)


def test_tempered_soft_labels_beat_the_flips_alone_at_the_default_budget(cfg, trained_reject):
    """Issue 17's known answer for the soft teacher information: at the YAML's query budget
    (``relabel.n_samples`` 50, under one neighbour per student pixel) a student fitted to the black
    box's tempered probability of the original class (``temperature`` 4, soft labels only) explains
    the decision better than one fitted to the label flips alone (the ``hard labels only``
    ablation, same neighbours). Measured on these 100 test digits (default black box): deletion
    AUC soft 0.0554 vs hard 0.0771 at 50 queries; 0.0473 vs 0.0526 at 400, where both students
    are well determined and the flips say nearly as much. Asserted: hard >= soft + 0.015, and the
    soft labels' lead shrinks at 8x the budget. With the soft labels off (the YAML's
    ``hard_weight: 1``) it fails."""
    model, data = trained_reject
    x = torch.from_numpy(data["test"]["x"][:100])
    base = A.baseline_image(x, "zero")
    n = int(cfg["method"]["relabel"]["n_samples"])
    d = {}
    for k in (n, 8 * n):
        rc = dict(cfg["method"]["relabel"], n_samples=k)
        nb = R.neighbourhood(model, x, rc, seed=0)
        for name, hw in (("main", None), ("hard", 1.0)):
            ex = R.distil(nb, x, rc, hard_weight=hw)
            d[f"{name}{k}"] = float(A.deletion_insertion(model.probs, x, ex["c"], ex["contribution"], base)["deletion_auc"].mean())
    assert d[f"hard{n}"] >= d[f"main{n}"] + 0.015, d
    assert d[f"hard{n}"] - d[f"main{n}"] > d[f"hard{8 * n}"] - d[f"main{8 * n}"], d
    # the temperature grades the soft labels and leaves the flips alone; a non-positive one is refused
    rc = dict(cfg["method"]["relabel"], n_samples=20)
    t1, t4 = (R.neighbourhood(model, x[:5], dict(rc, temperature=t), seed=0) for t in (1.0, 4.0))
    assert torch.equal(t1["kept"], t4["kept"]) and not torch.allclose(t1["soft"], t4["soft"])
    with pytest.raises(ValueError, match="temperature"):
        R.neighbourhood(model, x[:2], dict(rc, temperature=0), seed=0)


def test_reject_examples_are_noisy_copies_labelled_reject_and_bad_specs_are_refused(cfg):
    spec = R.reject_spec(cfg)
    x = torch.rand(8, 1, 8, 8)
    y = torch.arange(8)
    torch.manual_seed(0)
    xb, yb = R.with_reject_examples(x, y, spec, 10)
    m = int(round(8 * spec["fraction"]))
    assert xb.shape == (8 + m, 1, 8, 8) and torch.equal(xb[:8], x) and torch.equal(yb[:8], y)
    assert bool((yb[8:] == 10).all()) and bool((xb >= 0).all() and (xb <= 1).all())
    noise = (xb[8:] - x[:m]).abs().mean()
    assert float(noise) > 0.01, noise  # the copies differ from the digits they were made from
    bad = compose(["method=relabel", "method.blackbox.reject.std=[0.3,0.1]"])
    with pytest.raises(ValueError, match="reject"):
        R.reject_spec(bad)
    assert R.reject_spec(compose(["method=relabel", "method.blackbox.reject=null"])) is None
    assert R.reject_spec(compose(["method=relabel", "method.blackbox.checkpoint=/nowhere"])) is None  # not ours to train

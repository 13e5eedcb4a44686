"""Declared ablations (trustlab.platform.ablation), without Ray: every method that has no report
of its own ablations declares its variants in its YAML; the runner trains each variant with the
variant's config through a given fit function, scores it with the main model's evaluation,
writes it beside the main metrics and says the gap in one summary line."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import ci_overrides, compose
from trustlab.platform import ablation
from trustlab.platform.registry import get_method, list_methods

# methods whose own report trains and writes their ablations (after_train / evaluate)
OWN_REPORT = {"item", "relabel", "deocclusion"}


@pytest.mark.parametrize("name", sorted(set(list_methods()) - OWN_REPORT))
def test_every_method_declares_its_ablation_variants(name):
    cfg = compose([f"method={name}"])
    v = ablation.variants(cfg)
    assert v, f"{name}: no ablation variants declared"
    for variant, spec in v.items():
        assert spec.get("what") and spec.get("overrides"), (name, variant)
        cfg2 = ablation.variant_config(cfg, spec)  # every override is a real config key
        for key, val in spec["overrides"].items():
            node = cfg
            for p in key.split(".")[:-1]:
                node = node[p]
            assert key.split(".")[-1] in node, (name, variant, key)
        assert not ablation.variants(cfg2)  # a variant runs no ablations of its own
        stages = get_method(name).stages(cfg2)
        assert set(spec.get("stages") or stages) <= set(stages), (name, variant, spec.get("stages"))
        if spec.get("init_prefix"):  # what the variant inherits exists in the main model
            model = get_method(name).build_model(cfg, stages[-1])
            assert ablation.inherited_state(model, spec), (name, variant)
    kinds = [ablation.kind_of(spec) for spec in v.values()]
    assert "ablation" in kinds, f"{name}: every variant is a comparison; none switches the mechanism off"
    # CI's small runs skip them (the registry-wide Ray tests train the main model only)
    assert not ablation.variants(compose([f"method={name}", *ci_overrides(name)]))


def test_inherited_state_takes_one_prefix_or_several_and_refuses_one_that_matches_nothing():
    model = torch.nn.ModuleDict({"backbone": torch.nn.BatchNorm1d(2), "heads": torch.nn.ModuleList(
        [torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]), "memory": torch.nn.Linear(2, 1)})
    assert ablation.inherited_state(model, {}) is None
    one = ablation.inherited_state(model, {"init_prefix": "backbone."})
    assert set(one) == {"backbone.weight", "backbone.bias", "backbone.running_mean", "backbone.running_var",
                        "backbone.num_batches_tracked"}  # buffers come too (frozen BatchNorm statistics)
    two = ablation.inherited_state(model, {"init_prefix": ["backbone.", "heads.0."]})
    assert set(two) == set(one) | {"heads.0.weight", "heads.0.bias"}  # heads.1 and memory stay the variant's own
    with pytest.raises(ValueError, match="matches no parameter"):
        ablation.inherited_state(model, {"init_prefix": ["backbone.", "head.0."]})


def test_runner_trains_scores_and_reports_each_variant_once(tmp_path, one_thread):
    from trustlab.platform.experiment import evaluate_and_report
    from trustlab.platform.train import WorkerContext, run_epochs

    cfg = compose(["method=f2c", "method.data.artifact=decoder", "method.data.n_train=128", "method.data.n_val=32",
                   "method.data.n_test=64", "method.data.size=32", "trainer.epochs=1", f"method.data.root={tmp_path}",
                   "trainer.batch_size=32", "trainer.num_workers=1", "trainer.cpus_per_worker=1"])
    cfg.setdefault("run", {})["name"] = "abl"
    method = get_method("f2c")
    data = method.build_data(cfg)
    fitted = []

    def fit(cfg2, stages, init_state, tag):
        fitted.append((tag, cfg2["method"]["filter"], stages))
        torch.manual_seed(0)
        model = None
        for stage in stages:
            model = run_epochs(WorkerContext.local(cfg2, stage, method.stage_data(cfg2, stage, data), init_from=init_state))
        return model

    def score(cfg2, model, tag):
        d = tmp_path / tag
        d.mkdir()
        return evaluate_and_report(cfg2, method, model, data, str(d))

    main = fit(cfg, ["train"], None, "main")
    metrics = evaluate_and_report(cfg, method, main, data, str(tmp_path))
    new = ablation.run(cfg, method, main, data, str(tmp_path), metrics, fit, score)
    assert list(new) == ["filter_none"] and fitted[-1] == ("filter_none", "none", ["train"])
    r = new["filter_none"]
    assert set(r["test"]) == set(metrics["test"]) and 0.0 <= r["test"]["frame"]["auc"] <= 1.0
    assert r["overrides"] == {"method.filter": "none"} and r["what"]
    metrics["ablation"] = new
    (line,) = ablation.summary_lines(metrics, list(new))
    gap = metrics["test"]["frame"]["auc"] - r["test"]["frame"]["auc"]
    assert line.startswith("ablation filter_none: test frame auc") and f"main better by {gap:+.4f}" in line, line
    # a variant already in the metrics (a method's own report) is not trained again
    n = len(fitted)
    assert ablation.run(cfg, method, main, data, str(tmp_path), metrics, fit, score) == {} and len(fitted) == n


def test_primary_figure():
    assert ablation.primary({"test": {"clip": {"auc": 0.9, "acc": 0.8}, "video": {"auc": 0.95}}}) == ("test clip auc", 0.9)
    assert ablation.primary({"test": {"all_seen": {"acc": 0.6}}, "last": 61.4}) == ("last-session acc", 61.4)
    assert ablation.primary({"test": {"masked_pairs": {"acc": 0.8, "n": 3}}}) == ("test masked_pairs acc", 0.8)
    assert ablation.primary({}) is None
    assert math.isnan(ablation.primary({"test": {"frame": {"auc": float("nan")}}})[1])


def test_declared_primary_lookup_and_gaps():
    """A method may declare the figure its ablations are judged on (``ablation.primary``): a dotted
    path (keys may hold dots), in either direction; the gaps say by how much the main model is
    better, so a lower-is-better metric gives a positive gap when the main model's is lower."""
    m = {"test": {"masked_pairs": {"tar@far=0.01": 0.9, "acc": 0.97}, "image": {"deletion_auc": 0.10}},
         "cross_domain": {"cam": {"video": {"auc": 0.8}}}}
    assert ablation.lookup(m, "test.masked_pairs.tar@far=0.01") == 0.9
    assert ablation.lookup(m, "cross_domain.cam.video.auc") == 0.8
    assert ablation.lookup(m, "cross_domain.other.video.auc") is None and ablation.lookup(m, "test.image") is None
    two = {"cross_domain": {"a": {"video": {"auc": 0.6}}, "b": {"video": {"auc": 0.9}}}}
    assert ablation.lookup(two, "cross_domain.*.video.auc") == pytest.approx(0.75)
    assert ablation.lookup({"cross_domain": {"a": {"video": {"auc": 0.6}}, "b": {}}}, "cross_domain.*.video.auc") is None
    lower = ablation.declared({"method": {"ablation": {"primary": {"metric": "test.image.deletion_auc",
                                                                   "higher_is_better": False}}}})
    m["ablation"] = {"pixel": {"test": {"image": {"deletion_auc": 0.05}}}, "hard": {"test": {"image": {"deletion_auc": 0.2}}},
                     "other": {"note": "no figure"}}
    g = ablation.gaps(m, lower)
    assert g["gaps"] == pytest.approx({"pixel": -0.05, "hard": 0.1}) and g["min_gap"] == pytest.approx(-0.05)
    assert not g["higher_is_better"] and g["main"] == 0.10
    lines = ablation.summary_lines(m, ["pixel", "hard", "other"], lower)
    assert len(lines) == 2 and "main better by -0.0500" in lines[0] and "main better by +0.1000" in lines[1], lines
    higher = ablation.declared({"method": {"ablation": {"primary": {"metric": "test.image.deletion_auc"}}}})
    assert ablation.gaps(m, higher)["gaps"] == pytest.approx({"pixel": 0.05, "hard": -0.1})
    assert ablation.declared({"method": {"ablation": True}}) is None and ablation.declared({"method": {}}) is None
    with pytest.raises(ValueError, match="metric"):
        ablation.declared({"method": {"ablation": {"primary": "test.auc"}}})


def test_a_comparison_variant_is_reported_but_not_in_the_smallest_margin():
    """A variant that keeps the mechanism and adds to it (``kind: comparison``) gets its gap like
    any other, but the margin the mechanism is judged by is the smallest over the ablations."""
    m = {"last": 70.0, "ablation": {"off": {"last": 60.0}, "extra": {"last": 71.0, "kind": "comparison"}}}
    g = ablation.gaps(m)
    assert g["gaps"] == pytest.approx({"off": 10.0, "extra": -1.0}) and g["comparisons"] == ["extra"]
    assert g["min_gap"] == pytest.approx(10.0) and g["min_over"] == "off"
    lines = ablation.summary_lines(m, ["off", "extra"])
    assert lines[0].startswith("ablation off:") and lines[1].startswith("comparison extra:"), lines
    m["ablation"] = {"extra": m["ablation"]["extra"]}
    assert ablation.gaps(m)["min_gap"] is None  # nothing switched off: nothing to judge
    with pytest.raises(ValueError, match="kind"):
        ablation.kind_of({"kind": "comparision"})


@pytest.mark.parametrize("name", sorted(list_methods()))
def test_declared_primary_is_well_formed(name):
    cfg = compose([f"method={name}"])
    spec = ablation.declared(cfg)
    if spec is not None:
        top = spec["metric"].split(".")[0]
        assert top in ("test", "val", "cross_domain", "sessions", "last", "average"), spec


def test_a_methods_own_ablations_are_judged_on_its_declared_figure(tmp_path):
    """Re-label computes its ablations inside its own evaluation and declares deletion AUC (lower
    is better) as the figure: the run's ablation step trains nothing more, but writes the margins
    to metrics.json and says the smallest one."""
    import json

    from trustlab.platform.experiment import train_ablations

    cfg = compose(["method=relabel"])
    assert not ablation.variants(cfg)
    metrics = {"test": {"image": {"deletion_auc": 0.08}},
               "ablation": {"relabel_pixel_perturbation": {"test": {"image": {"deletion_auc": 0.05}}},
                            "relabel_hard_labels_only": {"test": {"image": {"deletion_auc": 0.11}}}}}
    lines = train_ablations(cfg, get_method("relabel"), None, {}, "x", str(tmp_path), metrics)
    g = json.load(open(tmp_path / "metrics.json"))["ablation_gaps"]
    assert g["metric"] == "test.image.deletion_auc" and not g["higher_is_better"]
    assert g["gaps"] == pytest.approx({"relabel_pixel_perturbation": -0.03, "relabel_hard_labels_only": 0.03})
    assert lines == ["ablations judged on test.image.deletion_auc (lower is better): main 0.0800, "
                     "smallest margin -0.0300 (over relabel_pixel_perturbation)"], lines


def test_staged_state_is_an_init_checkpoint_for_the_block_and_gone_after():
    """What an ablation inherits from the main model reaches ``fit_stages`` as an ``init``
    checkpoint in a staging folder (``ck.staged_state``), removed once the variant has trained."""
    import os

    import torch

    from trustlab.platform import checkpoints as ck

    state = {"w": torch.arange(3.0)}
    with ck.staged_state(state) as d:
        loaded = ck.load_state(d)
        assert loaded["stage"] == "init" and torch.equal(loaded["model"]["w"], state["w"])
    assert not os.path.exists(d)
    with ck.staged_state(None) as none:
        assert none is None

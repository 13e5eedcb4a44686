"""Every registered detector (a method with a serving path and an image, face or video modality)
loads into the Serve graph's detector runner from a checkpoint and scores requests in-process:
the runner's scores equal the model called directly on the same preprocessed inputs, each item
gets its own score, and detectors that read a caption (ITEM) answer differently when the
caption changes. No Ray here: the HTTP graph itself is tested in test_serve_graph.py."""
import os

import numpy as np
import pytest
import torch

from conftest import ci_overrides, compose
from trustlab.platform.registry import get_method, list_methods

FACES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "real", "faces")


def _detectors():
    from trustlab.serve.inputs import MODALITIES

    out = []
    for name in list_methods():
        m = get_method(name)
        # other tests may register bare stand-ins without a serving path
        if getattr(m, "modality", "image") in MODALITIES and m.has("serve_inputs"):
            out.append(name)
    return out


def _runner(name, tmp_path):
    from trustlab.platform.checkpoints import save_state
    from trustlab.serve.runner import DetectorRunner
    from trustlab.serve.settings import settings_from_args

    cfg = compose([f"method={name}", *ci_overrides(name)], tmp_path)
    m = get_method(name)
    stage = m.stages(cfg)[-1]
    torch.manual_seed(0)
    model = m.build_model(cfg, stage).eval()
    save_state(str(tmp_path / "ckpt"), model=model.state_dict(), epoch=1, stage=stage, cfg=cfg)
    s = settings_from_args({"detectors": [{"name": name, "checkpoint": str(tmp_path / "ckpt" / "model.pt")}],
                            "checkpoint_root": str(tmp_path)})
    return DetectorRunner(s["detectors"][0], s), cfg


def _inputs(runner, n, seed=0):
    rng = np.random.default_rng(seed)
    d = runner.cfg["method"].get("data") or {}
    s = int(d.get("size") or 64)
    if runner.modality == "video":
        t = int(d.get("clip_len") or 8)
        return [{"clips": rng.integers(0, 255, (2, t, s, s, 3), dtype=np.uint8)} for _ in range(n)]
    return [{"images": [rng.integers(0, 255, (s + 7, s + 3, 3), dtype=np.uint8)]} for _ in range(n)]


@pytest.mark.parametrize("name", _detectors())
def test_detector_runner_scores_like_the_model(name, tmp_path):
    runner, cfg = _runner(name, tmp_path)
    assert runner.warmup_error is None, runner.warmup_error
    items = _inputs(runner, 3)
    if runner.takes_captions:
        for it in items:
            it["caption"] = "a red circle and a blue square"
    res = runner.score_items(items)
    assert len(res) == 3 and all("error" not in r for r in res), res
    scores = np.array([r["score"] for r in res], float)
    assert np.all(np.isfinite(scores)) and np.all((scores >= 0) & (scores <= 1)), scores
    # the same inputs straight through the method: the runner adds nothing and mixes no items
    m = runner.method
    for it, got in zip(items, scores):
        if runner.modality == "video":  # one clip (T frames) per batch
            batches = [m.serve_inputs(list(c), cfg) for c in it["clips"]]
        elif runner.takes_captions:
            batches = [m.serve_inputs(it["images"], cfg, captions=[it["caption"]])]
        else:
            batches = [m.serve_inputs(it["images"], cfg)]
        with torch.inference_mode():
            direct = float(np.mean([np.asarray(m.predict(runner.model, b, cfg), float) for b in batches]))
        assert got == pytest.approx(direct, abs=1e-4), (got, direct)


def test_caption_reaches_the_caption_reading_detectors(tmp_path):
    from trustlab.serve.runner import serve_adapter

    names = [n for n in _detectors() if serve_adapter(get_method(n)) == "image+caption"]
    assert names, "no registered detector reads captions (ITEM should)"
    for name in names:
        runner, _ = _runner(name, tmp_path / name)
        img = _inputs(runner, 1)[0]["images"]
        a = runner.score_items([{"images": img, "caption": "a red circle and a blue square"}])[0]["score"]
        b = runner.score_items([{"images": img, "caption": "a green triangle"}])[0]["score"]
        assert abs(a - b) > 1e-6, (name, a, b)

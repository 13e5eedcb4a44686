import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from trustlab.platform.metrics import binary_metrics, detection_metrics, eer, video_level


@pytest.mark.parametrize("seed", range(5))
def test_matches_sklearn_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = rng.random(300) + 0.3 * y
    m = binary_metrics(y, s)
    assert m["auc"] == pytest.approx(roc_auc_score(y, s))
    assert m["ap"] == pytest.approx(average_precision_score(y, s))
    assert m["acc"] == pytest.approx(np.mean((s >= 0.5) == y))
    assert 0 <= m["eer"] <= 1


def test_eer_hand_checked():
    # negatives 0.1 0.2 0.3 0.6 ; positives 0.4 0.7 0.8 0.9
    # at threshold 0.6: FPR = 1/4 (0.6), FNR = 1/4 (0.4) -> EER = 0.25
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    s = [0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9]
    assert eer(y, s) == pytest.approx(0.25)
    assert eer([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == pytest.approx(0.0)
    assert eer([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == pytest.approx(1.0)


def test_single_class_gives_nan_not_crash():
    m = binary_metrics([1, 1, 1], [0.2, 0.6, 0.9])
    assert math.isnan(m["auc"]) and m["acc"] == pytest.approx(2 / 3)


def test_video_level_averages_scores_per_video():
    y = np.array([0, 0, 1, 1, 1])
    s = np.array([0.2, 0.4, 0.9, 0.1, 0.8])
    v = np.array([7, 7, 3, 3, 3])
    vl, vs, ids = video_level(y, s, v)
    assert list(ids) == [3, 7]
    assert vs == pytest.approx([0.6, 0.3]) and list(vl) == [1, 0]
    m = detection_metrics(y, s, v)
    assert m["video"]["n"] == 2 and m["frame"]["n"] == 5 and m["video"]["auc"] == 1.0


def test_video_methods_report_clip_level_not_frame_level():
    """A video method scores clips, not frames: its sample level is named ``clip`` (the field's
    frame AUC is per frame), images keep ``frame``."""
    from trustlab.platform.method import sample_level
    from trustlab.platform.registry import get_method, list_methods

    y = np.array([0, 1, 0, 1])
    m = detection_metrics(y, np.array([0.1, 0.9, 0.2, 0.8]), np.array([0, 1, 2, 3]), level="clip")
    assert set(m) == {"clip", "video"} and m["clip"]["auc"] == 1.0
    levels = {n: sample_level(get_method(n)) for n in list_methods()}
    assert {n for n, lv in levels.items() if lv == "clip"} == {"stdt", "naco", "last"}, levels
    assert {lv for n, lv in levels.items() if n not in ("stdt", "naco", "last")} == {"frame"}, levels

import math

import pytest

from workloads.divergence import DivergenceConfig, DivergenceDetector


def feed(det, losses):
    out = []
    for i, l in enumerate(losses):
        out += det.observe_loss(i, l)
    return out


def test_stable_curve_raises_nothing():
    det = DivergenceDetector()
    assert feed(det, [5.5 - 0.01 * i for i in range(200)]) == []


def test_nonfinite_loss_is_an_event():
    det = DivergenceDetector()
    ev = feed(det, [5.0, 4.9, float("nan")])
    assert [e.kind for e in ev] == ["nonfinite"] and ev[0].step == 2 and det.is_stop(ev[0])
    assert ev[0].to_dict()["value"] == "nan"


def test_loss_ratio_against_initial_loss():
    det = DivergenceDetector(DivergenceConfig(max_loss_ratio=1.5, warmup_checks=3))
    ev = feed(det, [4.0, 4.0, 4.0, 5.9, 6.1])
    assert [(e.kind, e.step) for e in ev] == [("loss_ratio", 4)]  # 5.9 < 1.5 x 4.0 < 6.1


def test_spike_against_running_average():
    det = DivergenceDetector(DivergenceConfig(spike_ratio=2.0, max_loss_ratio=100, warmup_checks=5))
    losses = [5.0] * 5 + [2.0] * 40 + [4.5]
    ev = feed(det, losses)
    assert len(ev) == 1 and ev[0].kind == "loss_spike" and ev[0].step == 45


def test_entropy_collapse_once_per_layer_and_not_a_stop_by_default():
    det = DivergenceDetector(DivergenceConfig(entropy_collapse=0.1))
    ev = det.observe_entropy(10, [1.0, 0.05, 0.01])
    assert [(e.kind, e.step) for e in ev] == [("entropy_collapse", 10)] * 2
    assert "layer 1" in ev[0].detail
    assert det.observe_entropy(20, [1.0, 0.01, 0.01]) == []
    assert not det.is_stop(ev[0])


def test_bad_config_names_allowed_values():
    with pytest.raises(ValueError, match="allowed"):
        DivergenceConfig(stop_on=("boom",))
    with pytest.raises(ValueError):
        DivergenceConfig(max_loss_ratio=0.5)
    assert math.isfinite(DivergenceConfig().max_loss_ratio)

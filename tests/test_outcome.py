"""Outcome classes, the bracket rule and LR sensitivity (workloads.outcome), on synthetic runs with
known answers, and the marginal baselines against an independent numpy computation."""

import math

import numpy as np
import pytest
import torch

from workloads import data as data_mod
from workloads.divergence import replay
from workloads.outcome import Point, bracket, classify, criterion_label, lr_sensitivity, trial_class, validate_crash

L0, BASE = 5.5, 3.26


def curve_class(losses, final_val, baseline=BASE, l0=L0):
    """What the trial loop does: the detector may stop the run; the class is the run's end."""
    ev = replay(losses, l0, len(losses))
    return trial_class(final_val, l0, baseline, ev.kind if ev else None), ev


def test_spike_and_recover_is_stable():
    losses = [5.5, 9, 14, 11, 7] + list(np.linspace(6, 2.5, 195))
    assert curve_class(losses, 2.45) == ("stable", None)


def test_slow_blow_up_is_stopped_and_diverged():
    losses = list(np.linspace(5.5, 3.0, 60)) + list(np.geomspace(3.0, 400.0, 140))
    cls, ev = curve_class(losses, None)
    assert cls == "diverged" and ev.kind == "above_initial" and 60 < ev.step < 200


def test_plateau_at_the_baseline_is_collapsed():
    losses = list(np.linspace(5.5, 3.3, 30)) + [3.3 + 0.02 * math.sin(i) for i in range(170)]
    assert curve_class(losses, 3.28) == ("collapsed", None)


def test_nan_is_diverged():
    losses = [5.5, 5.0, 4.0, float("nan")]
    cls, ev = curve_class(losses, math.inf)
    assert cls == "diverged" and ev.kind == "nonfinite" and ev.step == 3


def test_final_loss_at_or_above_l0_is_diverged_even_when_finite():
    assert trial_class(5.6, L0, BASE) == "diverged"
    assert trial_class(L0, L0, BASE) == "diverged"
    assert trial_class(BASE, L0, BASE) == "collapsed"
    assert trial_class(3.0, L0, BASE) == "stable"


def test_degraded_is_normalised_by_the_gap_to_l0():
    def pts(l0, losses):
        return [Point(lr, 0, loss, l0, None) for lr, loss in zip((1e-3, 1e-2, 1e-1), losses)]

    # digits-like scale: 0.08 vs a best of 0.05 with l_0 2.3 closes most of the gap: stable
    assert classify(pts(2.3, [0.2, 0.05, 0.08])) == ["stable", "stable", "stable"]
    # bytes: 3.7 vs best 2.5 with l_0 5.5 is 40 % of the gap: stable at kappa 0.5, degraded at 0.3
    assert classify(pts(5.5, [2.9, 2.5, 3.7])) == ["stable", "stable", "stable"]
    assert classify(pts(5.5, [2.9, 2.5, 3.7]), kappa=0.3)[2] == "degraded"
    # an undertrained run at a lower LR than the best is never degraded
    assert classify(pts(5.5, [5.0, 2.5, 2.6]))[0] == "stable"


def test_bracket_seeds_vote_and_a_tie_is_a_crash():
    pts = [Point(0.05, 0, 2.0, L0, BASE), Point(0.05, 1, 2.1, L0, BASE),
           Point(0.06, 0, 2.0, L0, BASE), Point(0.06, 1, math.inf, L0, BASE),   # 1 of 2 crashed: a tie
           Point(1.0, 0, math.inf, L0, BASE), Point(1.0, 1, math.inf, L0, BASE)]
    b = bracket(pts)
    assert (b.stable_lr, b.crash_lr) == (0.05, 0.06) and b.crashed[0.06] == (1, 2)
    assert bracket(pts, seed=0).stable_lr == 0.06  # seed 0 alone saw 0.06 stable


def test_one_early_crash_does_not_pin_the_boundary_low():
    pts = [Point(lr, 0, math.inf if lr in (0.02, 0.5, 1.0) else 2.0, L0, BASE)
           for lr in (1e-3, 0.01, 0.02, 0.05, 0.1, 0.3, 0.5, 1.0)]
    b = bracket(pts)
    assert (b.stable_lr, b.crash_lr, b.non_monotonic, b.lowest_crash) == (0.3, 0.5, True, 0.02)


def test_collapsed_counts_as_a_crash_only_when_asked():
    pts = [Point(0.01, 0, 2.5, L0, BASE), Point(0.1, 0, 3.3, L0, BASE)]
    assert bracket(pts).crash_lr == 0.1
    assert bracket(pts, crash=("diverged",)).crash_lr is None
    assert "collapsed" in criterion_label(("diverged", "collapsed"))
    with pytest.raises(ValueError, match="allowed"):
        validate_crash(["stable"])


def true_curve(lr):  # a smooth synthetic final-loss curve, capped at l_0 = 4
    return min(4.0, 1.0 + 0.5 * math.log10(lr / 1e-4) ** 2 / 4 + (3.0 if lr > 0.3 else 0.0))


def test_lr_sensitivity_is_a_log_uniform_integral_whatever_the_lrs_run():
    a, b = 1e-4, 1.0
    xs = np.linspace(math.log(a), math.log(b), 20001)
    ys = np.array([true_curve(math.exp(x)) for x in xs])
    truth = float(np.trapezoid(ys - ys.min(), xs) / (xs[-1] - xs[0]))
    grid = [Point(lr, 0, true_curve(lr), 4.0, None) for lr in np.geomspace(a, b, 33)]
    lrs = [1.0, 1e-4, 1e-2, 1e-1, 0.3162, 0.5623, 0.4217, 0.3652, 0.3398, 0.3, 0.2]  # bisection-like
    bis = [Point(lr, 0, true_curve(lr), 4.0, None) for lr in lrs]
    g, covers = lr_sensitivity(grid, (a, b))
    s, _ = lr_sensitivity(bis, (a, b))
    assert covers and g == pytest.approx(truth, rel=0.03) and s == pytest.approx(truth, rel=0.15)
    # a crashed run counts as l_0
    crashed = [Point(p.lr, 0, math.inf if p.lr > 0.3 else p.final_loss, 4.0, None) for p in grid]
    assert lr_sensitivity(crashed, (a, b))[0] == pytest.approx(g, rel=1e-9)
    # a cell that does not cover the range gets no value
    assert lr_sensitivity([p for p in grid if p.lr > 1e-3], (a, b)) == (None, False)


def test_unigram_baseline_matches_numpy():
    rng = np.random.default_rng(0)
    train = rng.choice(256, size=50_000, p=np.r_[np.full(128, 1.5), np.full(128, 0.5)] / 256).astype(np.uint8)
    val = rng.choice(256, size=5_000).astype(np.uint8)
    counts = np.array([(train == t).sum() for t in range(256)], dtype=float)
    p = (counts + 1) / (counts.sum() + 256)
    want = -np.mean(np.log(p[val]))
    assert data_mod.unigram_cross_entropy(train, val, 256) == pytest.approx(want, rel=1e-12)
    # the chunked estimate for huge shards stays close
    assert data_mod.unigram_cross_entropy(train, val, 256, max_tokens=2) == pytest.approx(want, rel=0.05)


def test_class_prior_baseline_matches_numpy():
    ty, vy = torch.tensor([0, 0, 0, 1, 2, 2]), torch.tensor([0, 1, 2, 2])
    p = (np.array([3, 1, 2]) + 1) / (6 + 3)
    assert data_mod.class_prior_cross_entropy(ty, vy, 3) == pytest.approx(-np.mean(np.log(p[[0, 1, 2, 2]])))


def test_stdlib_baseline_is_the_byte_unigram_entropy():
    td = data_mod.stdlib_corpus()
    assert data_mod.text_baseline(td) == pytest.approx(3.26, abs=0.05)  # PAPERS.md: 3.26 nats
    assert data_mod.text_baseline(td) is data_mod.text_baseline(td) or True

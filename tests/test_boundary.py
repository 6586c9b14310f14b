import math

import pytest

from orchestrator.boundary import BoundaryConfig, Cell, CellSearch, dense_grid_size, next_lr, search_local
from orchestrator.spec import SpecError, parse_spec
from workloads.outcome import Point

CFG = BoundaryConfig(lr_range=(1e-4, 1.0), resolution=2 ** 0.25, max_trials_per_cell=20)
L0 = 5.0


def P(lr, crashed, seed=0, loss=2.0):
    return Point(lr, seed, math.inf if crashed else loss, L0, 3.0)


def result(crashed, loss=2.0):
    """What a trial's summary says: a crash is a non-finite loss here."""
    return {"final_loss": math.inf if crashed else loss, "initial_loss": L0, "baseline_loss": 3.0,
            "stop_reason": "nonfinite" if crashed else None}


def test_bisection_order_top_bottom_then_middle_then_one_reprobe():
    assert next_lr([], CFG) == 1.0
    obs = [P(1.0, True)]
    assert next_lr(obs, CFG) == 1e-4
    obs.append(P(1e-4, False))
    assert next_lr(obs, CFG) == pytest.approx(1e-2)
    assert next_lr([P(1.0, False)], CFG) is None  # stable at the top: above the range
    assert next_lr([P(1.0, True), P(1e-4, True)], CFG) is None  # below the range
    # converged at [0.01, 0.0115]: one re-probe above the crash end (resolution^2 x it), then done
    done = [P(1.0, True), P(1e-4, False), P(0.01, False), P(0.0115, True)]
    probe = next_lr(done, CFG)
    assert probe == pytest.approx(0.0115 * CFG.resolution ** 2, rel=1e-5)
    assert next_lr(done + [P(probe, True)], CFG) is None


def test_a_stable_reprobe_moves_the_bracket_up():
    # 0.0115 crashed by chance; the re-probe above it is stable: bisection resumes in [0.0163, 1]
    obs = [P(1.0, True), P(1e-4, False), P(0.01, False), P(0.0115, True), P(0.0163, False)]
    assert next_lr(obs, CFG) == pytest.approx(math.sqrt(0.0163 * 1.0), rel=1e-5)


def test_collapsed_is_a_crash_by_default_and_degraded_is_not():
    cfg = BoundaryConfig(lr_range=(1e-4, 1.0))
    obs = [P(1.0, False, loss=3.5), P(1e-4, False, loss=2.0)]  # 3.5 >= the baseline 3.0: collapsed
    assert next_lr(obs, cfg) == pytest.approx(1e-2)
    degraded = [P(1.0, False, loss=2.9), P(1e-4, False, loss=2.0)]  # (2.9-2)/(5-2) = 0.3 <= 0.5
    assert next_lr(degraded, cfg) is None  # stable at the top
    strict = BoundaryConfig(lr_range=(1e-4, 1.0), crash=("diverged", "collapsed", "degraded"), kappa=0.2)
    assert next_lr(degraded, strict) == pytest.approx(1e-2)


@pytest.mark.parametrize("truth", [3e-4, 2.2e-3, 0.0415, 0.5])
def test_synthetic_boundary_is_bracketed_within_resolution(tmp_path, truth):
    calls = []

    def fake(cfg):
        calls.append(cfg.lr)
        return result(cfg.lr > truth)

    cell = Cell("synthetic", {}, {"workload": "gpt", "steps": 1})
    rep = search_local([cell], CFG, f"sqlite:///{tmp_path / 'o.db'}", "t", fake)[0]
    assert rep["stable_lr"] <= truth < rep["crash_lr"]
    assert rep["crash_lr"] / rep["stable_lr"] <= CFG.resolution and rep["converged"]
    assert len(calls) <= dense_grid_size(CFG) / 4
    assert not rep["non_monotonic"]


def test_seeds_repeat_the_bracket_ends_and_count_crashes(tmp_path):
    cfg = BoundaryConfig(lr_range=(1e-3, 1.0), resolution=1.5, seeds=3, max_trials_per_cell=30)

    def noisy(c):  # seed 2 crashes one step lower than the others
        limit = 0.05 if c.seed != 2 else 0.03
        return result(c.lr > limit)

    cell = Cell("noisy", {}, {"workload": "gpt", "steps": 1})
    rep = search_local([cell], cfg, f"sqlite:///{tmp_path / 'o.db'}", "t", noisy)[0]
    assert rep["stable_end_seeds"] == 3 and rep["crash_end_seeds"] == 3
    assert rep["crash_end_crashed"] == 3
    assert rep["stable_end_crashed"] == (1 if rep["stable_lr"] > 0.03 else 0)


def test_interrupted_search_resumes_from_the_optuna_store(tmp_path):
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    cell = Cell("c", {}, {"workload": "gpt", "steps": 1})
    calls = []

    def fake(cfg):
        calls.append(cfg.lr)
        return result(cfg.lr > 0.01)

    first = CellSearch(cell, CFG, storage, "t")
    for _ in range(3):  # three trials, then "the driver dies" with a fourth asked but never told
        trial, lr, seed = first.ask()
        first.tell(trial, fake(type("C", (), {"lr": lr})))
    first.ask()
    rep = search_local([cell], CFG, storage, "t", fake)[0]
    assert rep["converged"] and rep["trials"] == len(calls) - 0 and rep["failed_trials"] == 1
    again = len(calls)
    search_local([cell], CFG, storage, "t", fake)
    assert len(calls) == again  # a finished cell runs nothing more


def test_boundary_spec_errors():
    base = {"name": "b", "workload": "gpt", "steps": 5, "axes": {"stabilizers": ["none"]}}
    from orchestrator.boundary import boundary_config

    with pytest.raises(SpecError, match="boundary: missing"):
        boundary_config(parse_spec(base))
    with pytest.raises(SpecError, match=r"boundary.lr_range: \[1.0, 0.1\] must satisfy"):
        boundary_config(parse_spec({**base, "boundary": {"lr_range": [1.0, 0.1]}}))
    with pytest.raises(SpecError, match="boundary.resolution"):
        boundary_config(parse_spec({**base, "boundary": {"lr_range": [0.1, 1.0], "resolution": 1.0}}))
    with pytest.raises(SpecError, match="boundary.seedz: .*keys: lr_range"):
        boundary_config(parse_spec({**base, "boundary": {"lr_range": [0.1, 1.0], "seedz": 2}}))
    with pytest.raises(SpecError, match="boundary.degraded_ratio: not a boundary setting.*top-level crash"):
        boundary_config(parse_spec({**base, "boundary": {"lr_range": [0.1, 1.0], "degraded_ratio": 1.5}}))
    # a spec's lr axis (its grid for `ablate sweep`) is ignored by the search: it makes no cells
    from orchestrator.boundary import cells_of

    spec = parse_spec({**base, "axes": {"lr": [0.1, 0.2], "stabilizers": ["none", "weyl"], "depth": [1, 2]},
                       "boundary": {"lr_range": [0.1, 1.0]}})
    cells = cells_of(spec, boundary_config(spec))
    assert sorted(c.key for c in cells) == ["stabilizers=none depth=1", "stabilizers=none depth=2",
                                            "stabilizers=weyl depth=1", "stabilizers=weyl depth=2"]

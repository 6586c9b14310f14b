import math

import pytest

from orchestrator.boundary import (BoundaryConfig, Cell, CellSearch, Obs, bracket, classify, dense_grid_size,
                                   next_lr, search_local)
from orchestrator.spec import SpecError, parse_spec

CFG = BoundaryConfig(lr_range=(1e-4, 1.0), resolution=2 ** 0.25, max_trials_per_cell=20)


def test_bisection_order_top_bottom_then_middle():
    assert next_lr([], CFG) == 1.0
    obs = [Obs(1.0, 0, True, math.inf)]
    assert next_lr(obs, CFG) == 1e-4
    obs.append(Obs(1e-4, 0, False, 3.0))
    assert next_lr(obs, CFG) == pytest.approx(1e-2)
    assert next_lr([Obs(1.0, 0, False, 2.0)], CFG) is None  # stable at the top: above the range
    assert next_lr([Obs(1.0, 0, True, math.inf), Obs(1e-4, 0, True, math.inf)], CFG) is None  # below


def test_degraded_counts_only_above_the_best_lr():
    obs = [Obs(1e-4, 0, False, 6.0), Obs(1e-3, 0, False, 2.0), Obs(1e-1, 0, False, 3.5)]
    got = {o.lr: (out, crash) for o, out, crash in classify(obs, 1.5, True)}
    assert got[1e-4] == ("stable", False)       # undertrained at a tiny LR is not a crash
    assert got[1e-1] == ("degraded", True)
    assert classify(obs, 1.5, False)[2][2] is False


def test_non_monotonic_is_flagged():
    obs = [Obs(0.1, 0, True, math.inf), Obs(0.3, 0, False, 2.0), Obs(0.01, 0, False, 2.1)]
    b = bracket(obs, CFG)
    assert b.non_monotonic and b.crash_lr == 0.1 and b.stable_lr == 0.01


@pytest.mark.parametrize("truth", [3e-4, 2.2e-3, 0.0415, 0.5])
def test_synthetic_boundary_is_bracketed_within_resolution(tmp_path, truth):
    calls = []

    def fake(cfg):
        calls.append(cfg.lr)
        return cfg.lr > truth, (math.inf if cfg.lr > truth else 2.0)

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
        return c.lr > limit, 2.0

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
        return cfg.lr > 0.01, 2.0

    first = CellSearch(cell, CFG, storage, "t")
    for _ in range(3):  # three trials, then "the driver dies" with a fourth asked but never told
        trial, lr, seed = first.ask()
        first.tell(trial, *fake(type("C", (), {"lr": lr})))
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
    # a spec's lr axis (its grid for `ablate sweep`) is ignored by the search: it makes no cells
    from orchestrator.boundary import cells_of

    spec = parse_spec({**base, "axes": {"lr": [0.1, 0.2], "stabilizers": ["none", "weyl"], "depth": [1, 2]},
                       "boundary": {"lr_range": [0.1, 1.0]}})
    cells = cells_of(spec, boundary_config(spec))
    assert sorted(c.key for c in cells) == ["stabilizers=none depth=1", "stabilizers=none depth=2",
                                            "stabilizers=weyl depth=1", "stabilizers=weyl depth=2"]

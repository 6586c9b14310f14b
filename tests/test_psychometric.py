"""The boundary model of ``orchestrator.psychometric`` beyond the logistic: LR50 under a crash floor,
the grid against a fine one, the stopping rule, and a censored cell from the search to the exported
JSON and Parquet (real Optuna, MLflow SQLite, pyarrow; synthetic outcomes)."""

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from orchestrator import psychometric as psy
from orchestrator.boundary import Cell, search_local
from orchestrator.boundary_config import BoundaryConfig

RANGE = (1e-3, 1.0)


def logistic(x: float, x50: float, band: float = 2.0) -> float:
    return 1 / (1 + math.exp(-(x - x50) * 2 * math.log(9) / math.log(band)))


def plateau(x: float, x50: float) -> float:
    """P(crash) 0.3 over the decade below LR50, a logistic (band x2) above: LR50 is exp(x50)."""
    return max(logistic(x, x50), 0.3 if x50 - math.log(10) <= x < x50 else 0.0)


def counts(p, x50: float, lrs, n: int = 40):
    """n runs at each LR, round(n P) of them crashed (the expected data, no noise)."""
    xs, ys = [], []
    for lr in lrs:
        k = round(n * p(math.log(lr), x50))
        xs += [lr] * n
        ys += [True] * k + [False] * (n - k)
    return xs, ys


def test_lr50_is_where_the_fitted_p_crash_is_half_also_above_a_crash_floor():
    grid = psy.grid_for(RANGE)
    x50 = math.log(0.05)
    lrs = [c for c in psy.candidates(grid) if 0.05 / 10 <= c <= 0.05 * 3]  # where a search's runs fall
    xs, ys = counts(plateau, x50, lrs)
    f = psy.fit(RANGE, xs, ys, grid)
    assert f.lr50_low <= 0.05 <= f.lr50_high and abs(math.log(f.lr50 / 0.05)) < 0.05
    assert f.floor > 0.2 and f.lr10 < f.lr50 < f.lr90
    # without a floor (the old model: 0.02 at each end) the plateau drags LR50 down, the interval misses
    old = psy.make_grid(RANGE, floors=(0.02,), floor_prior=None, lapses=(0.02,), lapse_prior=None)
    g = psy.fit(RANGE, xs, ys, old)
    assert g.lr50_high < 0.05 and g.lr50 < 0.8 * f.lr50
    # the fitted curve crosses 0.5 at LR50: its posterior median there is 0.5, below it less
    med = psy.curve(grid, psy.posterior(grid, xs, ys), [f.lr50, f.lr50 / 3], (0.5,))[:, 0]
    assert med[0] == pytest.approx(0.5, abs=0.03) and 0.2 < med[1] < 0.4


def test_a_stable_island_above_the_boundary_is_a_lapse_not_a_second_boundary():
    grid = psy.grid_for(RANGE)
    x50 = math.log(0.02)

    def island(x, m):
        return 0.1 if m + 0.4 * math.log(10) <= x <= m + 0.6 * math.log(10) else logistic(x, m)

    lrs = [c for c in psy.candidates(grid) if 0.02 / 3 <= c <= 0.02 * 5]
    f = psy.fit(RANGE, *counts(island, x50, lrs), grid)
    assert f.lr50_low <= 0.02 <= f.lr50_high and f.lapse > 0.05


def eight_trials(p, x50: float, seed: int):
    grid = psy.grid_for(RANGE)
    rng = np.random.default_rng(seed)
    lrs, ys = [], []
    for _ in range(8):
        lr = psy.next_lr(grid, lrs, ys)
        lrs.append(lr)
        ys.append(bool(rng.random() < p(math.log(lr), x50)))
    return lrs, ys


def test_intervals_at_eight_trials_are_within_five_percent_of_a_fine_grid():
    """Issue 31: the 21-point s grid made sparse-data intervals up to 30 % too wide. The default grid
    (LR50 step 3.7 %, 41 widths, trapezoid end weights) against one with 1.5 % steps and 121 widths."""
    fine = psy.make_grid(RANGE, max_step=0.015, n_s=121)
    for p, x50, seed in ((logistic, math.log(0.03), 1), (plateau, math.log(0.1), 2)):
        lrs, ys = eight_trials(p, x50, seed)
        a, b = psy.fit(RANGE, lrs, ys), psy.fit(RANGE, lrs, ys, fine)
        for end in ("lr50_low", "lr50_high", "lr50"):
            assert abs(math.log(getattr(a, end) / getattr(b, end))) < math.log(1.05), (end, a, b)
        assert abs(math.log(a.width / b.width)) < math.log(1.05)


def test_stop_rule_judges_the_reported_interval_and_the_range_edge():
    grid = psy.grid_for(RANGE)
    assert psy.stop_reason(grid, [], [], 1.5) is None
    cands = psy.candidates(grid)
    assert psy.stop_reason(grid, [cands[-1]] * 8, [False] * 8, 1.5) == "range_edge"   # nothing crashes
    assert psy.stop_reason(grid, [cands[0]] * 8, [True] * 8, 1.5) == "range_edge"     # everything does
    lrs = [c for c in cands if 0.02 <= c <= 0.08]
    xs, ys = counts(lambda x, m: logistic(x, m, 1.3), math.log(0.04), lrs, n=6)
    f = psy.fit(RANGE, xs, ys, grid)
    assert psy.STOP_LEVEL == psy.LEVEL and f.width < 1.5
    assert psy.stop_reason(grid, xs, ys, f.width * 1.001) == "interval"
    assert psy.stop_reason(grid, xs, ys, f.width * 0.999) is None
    wider = psy.fit(RANGE, xs, ys, grid, 0.95).width  # a level may be asked for: its own interval
    assert wider > f.width and psy.stop_reason(grid, xs, ys, f.width * 1.001, stop_level=0.95) is None


def test_a_fit_outside_the_range_is_censored_with_a_one_sided_bound():
    grid = psy.grid_for(RANGE)
    cands = psy.candidates(grid)
    up = psy.fit(RANGE, cands[-20:], [False] * 20, grid)
    assert up.censored == "above" and up.p_above_range >= 0.5
    # the bound: LR50 > bound with probability LEVEL, never a number above the range
    assert up.lr50_q_low > 1.0 and up.bound == 1.0  # LR50 > 1 with probability >= 0.9: the range's top
    for ys in ([True, False, False, False], [True, False, False, True, False, False]):  # weaker: inside the range
        lrs = [cands[-1]] * len(ys)
        few = psy.fit(RANGE, lrs, ys, grid)
        post = psy.posterior(grid, lrs, ys)
        m_w = post.reshape(len(grid.x50), -1).sum(axis=1)
        assert few.censored == "above" and few.bound == few.lr50_q_low < 1.0
        assert m_w[grid.x50 > math.log(few.bound)].sum() == pytest.approx(psy.LEVEL, abs=0.01)
    d = up.as_dict()
    assert d["censored"] == "above" and d["lr50_bound"] == up.bound
    assert all(d[k] is None for k in ("lr50", "lr50_low", "lr50_high", "lr10", "lr90", "band", "interval_ratio"))
    down = psy.fit(RANGE, cands[:20], [True] * 20, grid)
    assert down.censored == "below" and down.bound >= 1e-3 and down.as_dict()["lr50"] is None
    inside = psy.fit(RANGE, *counts(logistic, math.log(0.05), cands[20:50], n=3), grid)
    assert inside.censored is None and inside.bound is None and inside.as_dict()["lr50"] == inside.lr50


def record(tr, parent, i, lr, seed, crashed):
    from mlflow.entities import Metric

    from workloads.trial import TrialConfig

    cfg = TrialConfig(steps=1, lr=lr, seed=seed).to_dict()
    rid = tr.trial_run("cen", parent, f"t{i}", f"none lr={lr:g}", {**cfg, "stabilizer": "none"}, replace=False)
    final = 6.0 if crashed else 2.0
    tr.log_metrics(rid, [Metric("result/final_loss", final, 0, 1), Metric("result/initial_loss", 5.0, 0, 1),
                         Metric("result/baseline_loss", 3.0, 0, 1), Metric("result/best_loss", final, 0, 1)])
    tr.set_tags(rid, {"status": "diverged" if crashed else "stable", "steps_run": 1})
    tr.finish(rid)


def test_a_boundary_above_the_range_is_exported_as_censored_with_no_lr50(tmp_path):
    """Issue 31 item 3, end to end: a synthetic cell whose P(crash) reaches 0.5 at lr 5 (the range
    tops at 1): the search stops on the range edge, and the exported JSON, Parquet and tables carry
    lr50 null, censored above and the bound; the figure draws a triangle at the bound."""
    from orchestrator.mlflow_store import Tracker
    from orchestrator.report import export

    cfg = BoundaryConfig(lr_range=RANGE, max_trials_per_cell=40)
    ran = []

    def fake(c):
        crashed = bool(np.random.default_rng(c.seed).random() < logistic(math.log(c.lr), math.log(5.0)))
        ran.append((c.lr, c.seed, crashed))
        return {"final_loss": math.inf if crashed else 2.0, "initial_loss": 5.0, "baseline_loss": 3.0,
                "stop_reason": None}

    rep = search_local([Cell("stabilizers=none", {"stabilizers": "none"}, {"workload": "gpt", "steps": 1})],
                       cfg, None, "cen", fake)[0]
    assert rep["stop_reason"] == "range_edge" and rep["censored"] == "above" and rep["lr50"] is None
    assert 0.1 < rep["lr50_bound"] <= 1.0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tr = Tracker(uri, "cen")
    parent = tr.sweep_run("cen", {"name": "cen"}, "name: cen\n")
    for i, (lr, seed, crashed) in enumerate(ran):
        record(tr, parent, i, lr, seed, crashed)
    tr.log_text(parent, json.dumps([rep], default=str), "boundary/cells.json")
    tr.finish(parent)
    res = export(uri, "cen", "cen", tmp_path / "out", log_to_mlflow=False)
    saved = json.loads((tmp_path / "out" / "max_stable_lr.json").read_text())
    row = saved["tables"]["0"][0]
    assert row["lr50"] is None and row["lr50_low"] is None and row["lr50_high"] is None and row["band"] is None
    assert row["censored"] == "above" and row["lr50_bound"] == pytest.approx(rep["lr50_bound"], rel=1e-9)
    assert row["stop_reason"] == "range_edge" and not row["converged"]
    assert "censored" in saved["model"] and saved["level"] == psy.LEVEL
    parquet = pq.read_table(tmp_path / "out" / "boundary.parquet").to_pylist()[0]
    assert parquet["lr50"] is None and parquet["censored"] == "above"
    assert parquet["lr50_bound"] == pytest.approx(rep["lr50_bound"], rel=1e-9)
    md = (tmp_path / "out" / "max_stable_lr_warmup0.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| none |"))
    from orchestrator.writers import fmt

    assert f"> {fmt(rep['lr50_bound'])} (above range)‡" in line and "| – |" in line
    assert "censored: LR50 above / below the LR range" in md
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from orchestrator.figures import boundary_grid, boundary_points

    grid = boundary_grid(res.tables.max_stable_lr[0], res.tables.cell_fields)
    fig = boundary_points(plt, grid, 0, "crit")
    tri = [ln for ln in fig.axes[0].lines if ln.get_marker() == "^"]
    assert len(tri) == 1 and tri[0].get_ydata()[0] == pytest.approx(rep["lr50_bound"])
    plt.close(fig)

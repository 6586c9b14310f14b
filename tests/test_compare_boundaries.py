"""docs/compare_boundaries.py: the verdict per pair of cells is "signal" only where their intervals
are disjoint in every search, and the dense grid's LR50 is checked against every search's interval."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("compare_boundaries", ROOT / "docs" / "compare_boundaries.py")
cb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cb)


def cell(lr50, low, high, n=20, **extra):
    return {"lr50": lr50, "lr50_low": low, "lr50_high": high, "lr10": low, "lr90": high, "band": high / low,
            "n_trials": n, "converged": True, "stop_reason": "interval", **extra}


def test_signal_needs_disjoint_intervals_in_every_search_and_the_grid_inside_each():
    a = {"x": cell(0.1, 0.08, 0.12), "y": cell(0.3, 0.25, 0.36), "z": cell(0.4, 0.34, 0.5)}
    b = {"x": cell(0.11, 0.09, 0.13), "y": cell(0.32, 0.26, 0.4), "z": cell(0.45, 0.41, 0.55)}
    c = {"x": cell(0.1, 0.07, 0.14), "y": cell(0.3, 0.2, 0.38), "z": cell(1.5, 1.0, 2.0)}  # z far off: overlap NO
    grid = {"x": cell(0.1, 0.09, 0.11, n=60, stop_reason="grid", converged=False),
            "y": cell(0.39, 0.35, 0.43, n=60, stop_reason="grid", converged=False)}  # y above c's interval
    text = cb.compare([a, b, c], ["A", "B", "C"], grid)
    rows = {ln.split(" | ")[0].lstrip("| "): ln for ln in text.splitlines() if ln.startswith("| ")}
    assert rows["x"].endswith("| yes | 0.1 [0.09, 0.11] (60) | yes |")
    assert rows["y"].endswith("| yes | 0.39 [0.35, 0.43] (60) | NO |")       # outside C's [0.2, 0.38]
    assert rows["z"].endswith("| NO |  |  |")                                  # z: C apart; no grid
    assert rows["y / x"].endswith("| disjoint | disjoint | disjoint | signal |")
    assert rows["z / y"].endswith("| overlap | disjoint | disjoint | not distinguishable |")

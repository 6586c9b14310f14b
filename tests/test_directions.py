"""docs/directions.py: a claim is "reproduced" only where the two cells' LR50 intervals are disjoint
in the claimed direction, "reversed" where disjoint the other way, else "not resolved at this size";
the entropy table takes only the runs within x1.5 of the cell's LR50 and counts non-finite ones apart."""

import importlib.util
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("directions", ROOT / "docs" / "directions.py")
dr = importlib.util.module_from_spec(spec)
sys.modules["directions"] = dr  # (its dataclass looks its module up)
spec.loader.exec_module(dr)


def cell(stab, warmup, depth, lr50, low, high, n=40, **extra):
    return {"stabilizer": stab, "warmup_steps": warmup, "depth": depth, "lr50": lr50, "lr50_low": low,
            "lr50_high": high, "n_trials": n, "converged": True, "stop_reason": "interval", **extra}


def test_verdict_reads_the_intervals_in_the_claimed_direction():
    base = cell("none", 0, 2, 0.1, 0.08, 0.12)
    above, touching, below = cell("x", 0, 2, 0.3, 0.2, 0.4), cell("x", 0, 2, 0.2, 0.12, 0.3), cell("x", 0, 2, 0.05, 0.03, 0.07)
    assert dr.verdict(base, above, higher=True) == "reproduced"
    assert dr.verdict(base, above, higher=False) == "reversed"
    assert dr.verdict(base, below, higher=False) == "reproduced"
    assert dr.verdict(base, below, higher=True) == "reversed"
    assert dr.verdict(base, touching, higher=True) == "not resolved at this size"  # shared end: overlap
    # a censored cell's interval runs from its bound to the end of the axis
    cens = {**cell("x", 0, 2, None, None, None), "censored": "above", "lr50_bound": 0.11}
    assert dr.verdict(base, cens, higher=True) == "not resolved at this size"
    assert dr.verdict(base, {**cens, "lr50_bound": 0.5}, higher=True) == "reproduced"


def test_contrast_rows_name_both_cells_ratio_and_a_missing_cell():
    cells = {dr.key_of(c): c for c in (cell("none", 0, 2, 0.1, 0.08, 0.12), cell("none", 0, 4, 0.05, 0.04, 0.06, n=48,
                                                                               converged=False, stop_reason="budget"))}
    claims = [dr.Claim("W", "deeper crashes lower", ("none", 0, 2), ("none", 0, 4), False),
              dr.Claim("Z", "sigma higher", ("none", 0, 2), ("sigma_reparam", 0, 2), True)]
    rows = [ln for ln in dr.contrasts(cells, claims).splitlines() if ln.startswith("| deeper") or ln.startswith("| sigma")]
    assert rows[0] == ("| deeper crashes lower | W | none w0 d2 | 0.1 [0.08, 0.12] (40) | none w0 d4 | "
                       "0.05 [0.04, 0.06] † (48) | 0.50 | lower | reproduced | 17 |")  # 48 (ln 1.5 / ln 2)^2 = 16.4
    assert rows[1].endswith("| not run | – |")


def test_trials_to_resolve_scales_the_wider_cells_trials_by_its_log_width_over_the_log_ratio():
    a, b = cell("none", 0, 2, 0.1, 0.08, 0.125, n=40), cell("x", 0, 2, 0.125, 0.1, 0.15625, n=30)
    # both intervals x1.5625 wide, ratio x1.25: each needs n (ln 1.5625 / ln 1.25)^2 = 4 n
    assert dr.trials_to_resolve(a, b) == 160
    assert dr.trials_to_resolve(a, cell("x", 0, 2, 0.1005, 0.08, 0.125)) is None   # ratio ~1: no number
    assert dr.trials_to_resolve(a, cell("x", 0, 2, 0.1001 * 1.05, 0.01, 10.0)) == 1000  # capped


def test_entropy_takes_runs_near_lr50_and_counts_non_finite_apart():
    cells = {("none", 0, 2): cell("none", 0, 2, 0.1, 0.08, 0.12)}
    def run(lr, ent, crashed):
        return {"stabilizer": "none", "warmup_steps": 0, "depth": 2, "seq_len": 64, "lr": lr, "status": "stable",
                "crashed": crashed, "last/attn_entropy/min": ent}
    trials = [run(0.07, 0.01, False), run(0.1, 2.0, False), run(0.14, 0.5, True), run(0.12, math.nan, True),
              run(0.2, 0.01, True), run(0.003, 3.0, False)]  # the last two are beyond x1.5 of LR50
    text = dr.entropy_near_lr50(cells, trials, keys=[("none", 0, 2), ("qk_norm", 0, 2)])
    row = next(ln for ln in text.splitlines() if ln.startswith("| none w0 d2"))
    assert row == ("| none w0 d2 | 0.1 | 0.0667-0.15 | 4 | 0.500 [0.010, 2.000] (3) | 1.005 [0.010, 2.000] (2) | "
                   "0.500 [0.500, 0.500] (1) | 1/2 / 0/1 | 1 |")
    assert "| qk_norm w0 d2 | – |" in text and "ln 64 = 4.16 nats" in text

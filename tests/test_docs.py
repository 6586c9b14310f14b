"""The README's result tables are the files `ablate export` wrote (docs/sync_tables.py)."""

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent


def test_readme_tables_equal_their_export_files():
    res = subprocess.run([sys.executable, str(ROOT / "docs" / "sync_tables.py"), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    readme = (ROOT / "README.md").read_text()
    assert readme.count("<!-- export: ") >= 3


def test_shipped_results_carry_their_crash_criterion_and_trial_counts():
    from workloads.outcome import DEFAULT_CRASH, DEFAULT_KAPPA, criterion_label

    for name, n in (("smoke", 25), ("smoke_seeds", 75)):  # recorded under today's rule, with its measurements
        smoke = pq.read_table(ROOT / f"docs/results/{name}/trials.parquet").to_pylist()
        assert len(smoke) == n and {r["crash_criterion"] for r in smoke} == {criterion_label(DEFAULT_CRASH, DEFAULT_KAPPA)}
        assert all(r["eval_baseline"] is not None and r["final_loss_se"] is not None for r in smoke)
        assert all(r["crashed"] == (r["outcome"] in ("diverged", "collapsed")) for r in smoke)
    table = (ROOT / "docs/results/boundary_smoke/max_stable_lr_warmup0.md").read_text()
    assert "LR50 [90 % interval]" in table and "crash = diverged" in table
    lines = [line.split(" | ") for line in table.splitlines() if line.startswith("| ")]
    col = lines[0].index("trials (seeds)")
    trials = pq.read_table(ROOT / "docs/results/boundary_smoke/trials.parquet").num_rows
    assert sum(int(row[col].split()[0]) for row in lines[2:]) == trials
    for row in lines[2:]:  # every row says how its search ended
        assert row[lines[0].index("search")].split(": ")[1] in ("interval", "budget", "range_edge")

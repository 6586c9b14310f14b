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
    smoke = pq.read_table(ROOT / "docs/results/smoke/trials.parquet").to_pylist()
    assert len(smoke) == 25 and {r["crash_criterion"] for r in smoke} == {
        "crash = diverged (non-finite, or final val loss >= l_0) or collapsed (final val loss >= marginal baseline)"}
    assert all(r["crashed"] == (r["outcome"] in ("diverged", "collapsed")) for r in smoke)
    table = (ROOT / "docs/results/boundary_smoke/max_stable_lr_warmup0.md").read_text()
    assert "LR50 [90 % interval]" in table and "crash = diverged" in table
    lines = [line.split(" | ") for line in table.splitlines() if line.startswith("| ")]
    col = lines[0].index("trials (seeds)")
    trials = pq.read_table(ROOT / "docs/results/boundary_smoke/trials.parquet").num_rows
    assert sum(int(row[col].split()[0]) for row in lines[2:]) == trials
    for row in lines[2:]:  # every row says how its search ended
        assert row[lines[0].index("search")].split(": ")[1] in ("interval", "budget", "range_edge")

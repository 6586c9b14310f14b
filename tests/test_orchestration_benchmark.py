"""benchmarks/orchestration_overhead.py stays runnable: the whole script at a tiny size, in its own
process (it starts and stops its own Ray). No timing is asserted: only that every part ran, printed
its figures, and read back every metric value it wrote."""

import pytest
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_orchestration_benchmark_runs_at_a_tiny_size():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ABLATE_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "orchestration_overhead.py"), "--trials", "1",
                          "--steps", "10", "--values", "600", "--repeats", "2"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for line in ("per-trial overhead (marginal, per trial slot)", "driver, in the MLflow tracking callback",
                 "driver, other CPU", "trial run() in a Ray worker", "fixed cost per sweep",
                 "fixed + Ray start-up", "600 values, every one read back", "median [min, max] of 2 repeats",
                 "the command as a user runs it", "fresh workdir: ", "existing workdir: "):
        assert line in text, text
    # every figure: the median and the range of the repeats, the median inside the range
    spreads = re.findall(r"(-?[\d,.]+)[^\[\]\d]*\[(-?[\d,.]+), (-?[\d,.]+)\]", text)
    assert len(spreads) >= 15, text
    for med, lo, hi in spreads:
        med, lo, hi = (float(v.replace(",", "")) for v in (med, lo, hi))
        assert lo <= med <= hi, (med, lo, hi)
    rates = {name: float(v.replace(",", "")) for name, v in
             re.findall(r"(Tracker.log_metrics|MLflow log_batch|the limit\)):\s+([\d,]+)", text)}
    assert set(rates) == {"Tracker.log_metrics", "MLflow log_batch", "the limit)"} and min(rates.values()) > 0, text
    assert text.strip().splitlines()[-1] in ("all targets met", "target missed")

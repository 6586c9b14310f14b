"""`ablate sweep` prints only what a user can act on: Ray Tune's "performance bottleneck" warnings
are folded into one line with the reason (orchestrator/quiet.py).

Tune warns when processing a result takes longer than ``TUNE_WARN_THRESHOLD_S`` (0.5 s), and only
from the 60th second after ``ray.tune.utils.util`` was imported. A CPU sweep on a busy machine
passes both; this test provokes the same warnings in a sweep of seconds: threshold 0 and the
60-second gate moved back, in the subprocess that runs the real CLI (real Ray, Tune, MLflow)."""

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from orchestrator.quiet import FoldedWarnings

SPEC = {
    "name": "t-quiet-sweep", "workload": "gpt", "steps": 6, "probe_interval": 2,
    "fixed": {"depth": 1, "width": 16, "heads": 2, "seq_len": 16, "batch_size": 4, "warmup_steps": 0,
              "schedule": "constant", "eval_interval": 0, "eval_batches": 1},
    "axes": {"lr": [1.0e-3, 1.0e-2], "stabilizers": ["none"]}, "resources": {"cpus": 1, "gpus": 0},
    "concurrency": 2,
}
RUN = ("import sys, ray.tune.utils.util as u; u.START_OF_TIME -= 3600; "  # Tune's 60-second gate, passed
       "from orchestrator.cli import app; sys.argv[0] = 'ablate'; app()")


def warning_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if re.search(r"warn|bottleneck", ln, re.I)]


def test_sweep_folds_tune_bottleneck_warnings_into_one_line(tmp_path):
    spec = tmp_path / "quiet.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "ABLATE_LIBRARY_WARNINGS")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    env["TUNE_WARN_THRESHOLD_S"] = "0"  # every result's processing is "slow"
    res = subprocess.run([sys.executable, "-c", RUN, "sweep", str(spec), "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=env)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "sweep t-quiet-sweep: 2 trials" in out, out[-3000:]
    lines = warning_lines(out)
    assert len(lines) == 1, "\n".join(lines)[-3000:]
    (note,) = lines
    folded = int(re.search(r"Ray Tune warned (\d+) time", note).group(1))
    assert folded >= 2, note  # at least one per trial result: the warnings were there, and folded
    assert note.startswith("note: ") and "MLflow" in note and "ABLATE_LIBRARY_WARNINGS=show" in note


def test_folding_keeps_other_tune_lines_and_own_warnings_and_show_lets_all_through(caplog, recwarn):
    """The filter drops only the bottleneck lines; a warning raised outside the installed libraries
    (here: this test file) is still shown; with show=True nothing is folded."""
    import warnings

    tune_log = logging.getLogger("ray.tune.utils.util")
    with caplog.at_level(logging.WARNING):
        with FoldedWarnings(show=False) as f:
            tune_log.warning("The `process_trial_result` operation took 0.734 s, which may be a performance "
                             "bottleneck.")
            tune_log.warning("something else Tune says")
            warnings.warn("ours", UserWarning)
        assert f.bottlenecks == 1 and f.longest == 0.734
    texts = [r.getMessage() for r in caplog.records]
    assert "something else Tune says" in texts
    assert not any("0.734 s, which may" in t for t in texts)
    assert [t for t in texts if t.startswith("note: Ray Tune warned 1 time ")], texts
    assert [str(w.message) for w in recwarn] == ["ours"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        with FoldedWarnings(show=True) as f:
            tune_log.warning("took 0.9 s, which may be a performance bottleneck.")
    assert f.bottlenecks == 0 and [r.getMessage() for r in caplog.records] == [
        "took 0.9 s, which may be a performance bottleneck."]

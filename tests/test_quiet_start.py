"""`ablate boundary` as a user runs it, in a fresh process with embedded Ray: no warning from Ray's
token authentication (on, deliberately, for the embedded cluster) nor from Tune's searcher save."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

SPEC = {
    "name": "t-quiet", "workload": "gpt", "steps": 4, "probe_interval": 2,
    "fixed": {"depth": 1, "width": 16, "heads": 2, "seq_len": 16, "batch_size": 4, "warmup_steps": 0,
              "schedule": "constant", "eval_interval": 0, "eval_batches": 1},
    "axes": {"stabilizers": ["none"]}, "resources": {"cpus": 1, "gpus": 0}, "concurrency": 1,
    "boundary": {"lr_range": [1e-3, 1.0], "max_trials_per_cell": 2, "reference_seeds": 1},  # 1 reference, 1 psi trial
}


def test_boundary_run_starts_quietly_and_saves_its_searcher(tmp_path):
    spec = tmp_path / "quiet.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "boundary", str(spec), "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=env)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "Token authentication" not in out, out[-3000:]
    assert "save not implemented" not in out, out[-3000:]
    # Tune saved the searcher's small state file beside its experiment state
    saved = list((tmp_path / "ray_results").glob("t-quiet-boundary-*/searcher-state-*.pkl"))
    assert saved, sorted(str(p) for p in (tmp_path / "ray_results").rglob("*"))[:50]
    state = json.loads(saved[0].read_text())
    assert state["kind"] == "ablate.boundary" and state["studies"] == ["t-quiet::stabilizers=none"]
    # restoring it is harmless: the search's state is the Optuna store, read when a search starts
    from orchestrator.boundary import BoundarySearcher

    searcher = BoundarySearcher([])
    searcher.restore(str(saved[0]))
    assert searcher.searches == [] and searcher.live == {}

"""Kill the sweep driver part-way (SIGKILL to its whole process group: driver, Ray, workers), then
resume: each trial ends up exactly once in MLflow, with no metric step logged twice."""

import pytest
import os
import signal
import subprocess
import sys
import time

import yaml
from mlflow.tracking import MlflowClient

SPEC = {
    "name": "t-resume",
    "workload": "gpt",
    "steps": 300,  # ~5-8 s a trial on 2 cores: the kill lands mid-sweep
    "fixed": {"depth": 2, "width": 64, "heads": 2, "seq_len": 64, "batch_size": 16, "eval_batches": 1},
    "axes": {"lr": [1e-3, 2e-3, 3e-3], "warmup_steps": [0, 10]},
    "probe_interval": 50,
    "resources": {"cpus": 1, "gpus": 0},
    "concurrency": 2,
}


def _runs(client, finished_only=False):
    exp = client.get_experiment_by_name("ablate-t-resume")
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], "tags.`ablate.kind` = 'trial'", max_results=1000)
    if finished_only:
        runs = [r for r in runs if r.data.tags.get("status") in ("stable", "diverged")]
    return runs


@pytest.mark.slow
def test_killed_sweep_resumes_with_each_trial_once(tmp_path):
    spec_path = tmp_path / "resume.yaml"
    spec_path.write_text(yaml.safe_dump(SPEC))
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", str(spec_path), "--workdir", str(tmp_path)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log = tmp_path / "first.log"
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    client = None
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            time.sleep(1)
            assert proc.poll() is None, log.read_text()[-3000:]
            if "6 trials" in log.read_text():  # printed once the driver has set up the MLflow store
                client = client or MlflowClient(uri)
                if len(_runs(client, finished_only=True)) >= 2:
                    time.sleep(4)  # > Tune's state-save period (2 s): finished for Tune too
                    break
        else:
            raise AssertionError("sweep did not finish 2 trials in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at_ms = time.time() * 1000
    before = [r for r in _runs(client, finished_only=True) if r.info.end_time < killed_at_ms - 3500]
    assert 2 <= len(before) < 6, "the kill should land part-way through the sweep"

    resumed = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    runs = _runs(client)
    ids = [r.data.tags["ablate.trial_id"] for r in runs]
    assert len(runs) == 6 and len(set(ids)) == 6, ids
    assert all(r.data.tags["status"] in ("stable", "diverged") for r in runs)
    # trials finished (for Tune too) before the kill were not run again: same MLflow run
    assert {r.info.run_id for r in before} <= {r.info.run_id for r in runs}
    for r in runs:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "loss")]
        assert steps == sorted(set(steps)) and steps[-1] == 299, steps

import json
import subprocess
import sys

import yaml


def ablate(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_bad_spec_fails_before_anything_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "bad", "workload": "gpt", "steps": 10,
                                   "axes": {"lr": [1e-3, -1.0]}}))
    out = ablate("sweep", str(bad), "--workdir", str(tmp_path / "wd"))
    assert out.returncode == 2
    assert "axes.lr: -1.0 is not a learning rate; allowed: finite numbers > 0" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "wd").exists()


def test_trial_subcommand_runs_one_trial():
    out = ablate("trial", "--", "--steps", "3", "--depth", "1", "--width", "32", "--heads", "2",
                 "--seq-len", "16", "--quiet")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["steps_run"] == 3


def test_doctor_reports_versions_ray_and_mlflow(tmp_path):
    out = ablate("doctor", "--workdir", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    for needle in ("torch", "ray         1 node(s): CPU", f"sqlite:///{tmp_path}", "no store yet",
                   "all checks passed"):
        assert needle in out.stdout, needle
    assert not (tmp_path / "mlflow.db").exists()  # a health check creates nothing

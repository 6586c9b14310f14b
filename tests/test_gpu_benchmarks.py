"""The GPU benchmarks run where no GPU is: ``--cpu-smoke`` drives their whole code path (every
variant's ``Trainer``, the loss reads, the packed worker processes) at tiny sizes on the CPU, so
that the scripts still work when a GPU session runs them. Their figures are not checked here."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_gpu_step_script_runs_every_variant():
    out = _run("benchmarks/gpu_step.py", "--cpu-smoke", "--rounds", "1", "--steps-per-round", "2", "--no-compile")
    for variant in ("none", "bare", "probe_step", "weyl", "sigma_reparam", "qk_norm", "mlra"):
        assert out.count(f"| {variant} |") == 2, variant  # gpt and vit tables
    assert "probes at interval 25" in out and "CPU smoke run" in out


def test_gpu_packing_script_kills_packed_runs_past_their_timeout():
    out = _run("benchmarks/gpu_packing.py", "--cpu-smoke", "--stabilizers", "none", "--packing", "1",
               "--steps", "100000", "--warmup", "1", "--timeout", "2")
    assert "| none | timed out (> 2 s) |" in out


def test_gpu_session_script_parts_run_without_the_orchestrator(tmp_path):
    """``gpu_session.sh`` is what a session with a lent GPU runs: its parts must work with only the
    GPU image's packages (no Ray, MLflow or Optuna) and leave their figures in $OUT."""
    shadow = tmp_path / "shadow"  # make the orchestrator's packages unimportable
    shadow.mkdir()
    for mod in ("ray", "mlflow", "optuna"):
        (shadow / f"{mod}.py").write_text(f"raise ImportError('{mod} is not on the GPU image')\n")
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, PYTHONPATH=str(shadow))
    for part in ("step", "packing"):
        out = subprocess.run(["bash", "benchmarks/gpu_session.sh", part, "--cpu-smoke"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["env.txt", "packing.json", "packing.log", "step.json", "step.log"]
    step = json.loads((tmp_path / "out" / "step.json").read_text())["workloads"]
    assert set(step) == {"gpt"} and {"weyl", "none/bare", "probes"} <= set(step["gpt"]["ratios"])
    assert "| weyl |" in (tmp_path / "out" / "step.log").read_text()
    packing = (tmp_path / "out" / "packing.log").read_text()
    assert "(" in packing.split("| weyl |")[1]  # packed workers ran: the 2-trial ratio to one trial
    got = json.loads((tmp_path / "out" / "packing.json").read_text())["tokens_per_s"]
    assert set(got) == {"weyl"} and set(got["weyl"]) == {"1", "2"} and all(v > 0 for v in got["weyl"].values())

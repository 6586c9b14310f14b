"""The GPU benchmarks run where no GPU is: ``--cpu-smoke`` drives their whole code path (every
variant's ``Trainer``, the loss reads, the packed worker processes) at tiny sizes on the CPU, so
that the scripts still work when a GPU session runs them. Their figures are not checked here."""

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


def test_gpu_packing_script_runs_packed_workers():
    out = _run("benchmarks/gpu_packing.py", "--cpu-smoke", "--stabilizers", "none,weyl", "--packing", "1,2",
               "--steps", "3", "--warmup", "1")
    assert "| none |" in out and "| weyl |" in out and "(" in out.split("| weyl |")[1]  # the 2-trial ratio

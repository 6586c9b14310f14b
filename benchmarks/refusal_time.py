"""How long ``ablate check`` / ``sweep`` / ``boundary`` take to refuse a bad spec, as a user sees it:
the command run as a fresh process, from its start to its exit, the median and range of ``--repeats``
runs of each case (issue #32: every spec-content refusal in under 2 s on a 2-core machine).

The cases are spec-content errors caught at different depths of the validation: an unknown
stabilizer (a trial field), a learning rate that is not a number, ``steps: 0``, bf16 on a CPU
trial, a non-finite ``boundary.lr_range`` and a missing data file. Each must exit 2 with one
``error:`` line; the benchmark checks that too, and that nothing was written to the workdir.

Then a busy workdir: a second ``ablate sweep`` on a workdir whose lock another driver holds (exit 1).

    python benchmarks/refusal_time.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BASE = {"name": "refuse", "workload": "gpt", "steps": 20,
        "fixed": {"depth": 1, "width": 32, "heads": 2, "seq_len": 32, "batch_size": 8},
        "axes": {"lr": [1.0e-3, 1.0e-2]}, "resources": {"cpus": 1, "gpus": 0}}
BOUNDARY = {**{k: v for k, v in BASE.items() if k != "axes"}, "axes": {"stabilizers": ["none", "weyl"]},
            "boundary": {"lr_range": [1.0e-3, 1.0]}}


def cases(tmp: Path) -> dict[str, tuple[str, dict]]:
    """name -> (command, spec)."""
    return {
        "unknown stabilizer": ("sweep", {**BASE, "axes": {"lr": [1.0e-3], "stabilizers": ["none", "wyel"]}}),
        "lr not a number": ("sweep", {**BASE, "axes": {"lr": ["fast"]}}),
        "steps 0": ("check", {**BASE, "steps": 0}),
        "bf16 on CPU": ("check", {**BASE, "fixed": {**BASE["fixed"], "precision": "bf16"}}),
        "lr_range [1e-3, inf]": ("check", {**BOUNDARY, "boundary": {"lr_range": [1.0e-3, float("inf")]}}),
        "resolution 0.5": ("boundary", {**BOUNDARY, "boundary": {"lr_range": [1.0e-3, 1.0], "resolution": 0.5}}),
        "missing data file": ("sweep", {**BASE, "fixed": {**BASE["fixed"], "data": "text",
                                                             "data_path": str(tmp / "missing.txt")}}),
    }


def run(args: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                         cwd=cwd, timeout=300)
    return time.perf_counter() - t0, out


def summary(times: list[float]) -> str:
    return f"median {statistics.median(times):.2f} s [{min(times):.2f}, {max(times):.2f}]"


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="ablate-refusal-") as tmp:
        tmp = Path(tmp)
        print(f"{'case':<24} {'command':<9} {'exit':>4}  time over {args.repeats} runs")
        for name, (cmd, spec) in cases(tmp).items():
            path = tmp / "spec.yaml"
            path.write_text(yaml.safe_dump(spec))
            wd = tmp / "wd"
            times = []
            for _ in range(args.repeats):
                extra = ["--workdir", str(wd)] if cmd != "check" else []
                dt, out = run([cmd, str(path), *extra], tmp)
                errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
                times.append(dt)
                if out.returncode != 2 or len(errors) != 1:
                    break
                assert not wd.exists(), f"{name}: the refusal created {wd}"
            if out.returncode != 2 or len(errors) != 1:
                print(f"{name:<24} {cmd:<9} {out.returncode:>4}  NOT REFUSED ({dt:.2f} s): "
                      f"{(out.stdout + out.stderr).strip().splitlines()[-1:]}")
                continue
            results[name] = times
            print(f"{name:<24} {cmd:<9} {out.returncode:>4}  {summary(times)}   {errors[0][:100]}")
        # a busy workdir: another process holds its lock
        path = tmp / "spec.yaml"
        path.write_text(yaml.safe_dump(BASE))
        wd = tmp / "busy"
        wd.mkdir()
        holder = subprocess.Popen([sys.executable, "-c", "import time; from orchestrator.faults import WorkdirLock; "
                                   f"WorkdirLock({str(wd)!r}).acquire('holder'); print('ok', flush=True); "
                                   "time.sleep(600)"], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "ok"
            times = []
            for _ in range(args.repeats):
                dt, out = run(["sweep", str(path), "--workdir", str(wd)], tmp)
                assert out.returncode == 1 and "in use by another ablate driver" in out.stderr, out.stderr[-2000:]
                times.append(dt)
            results["busy workdir"] = times
            print(f"{'busy workdir':<24} {'sweep':<9} {out.returncode:>4}  {summary(times)}")
        finally:
            holder.kill()
            holder.wait()
    worst = max(statistics.median(t) for t in results.values())
    print(f"slowest median: {worst:.2f} s (target < 2 s)")
    return results


if __name__ == "__main__":
    main()

"""Aggregate throughput of 1, 2 and 4 trials sharing one GPU, per stabilizer (issue 12). Needs
CUDA; exits with a message without it.

Each trial is a separate process (as Ray runs trials with ``gpus: 1/k``) training the spec's GPT
(depth 6, width 512, 8 heads, seq 256, batch 64, bf16) for ``--steps`` steps after a warm-up; the
processes start together and each reports its tokens/s over the timed steps. The aggregate is the
sum. A stabilizer "packs" when its k-trial aggregate is at least its one-trial throughput. Run once
as is and once with ``--mps``, which starts the CUDA MPS control daemon (``nvidia-cuda-mps-control
-d``, pipe and log folders under /tmp) for the run and stops it after, to see whether MPS helps.

A packed run that has not finished after ``--timeout`` seconds is killed and reported as such (the
first version's launch-bound trials slowed down eight-fold when packed); ``--json`` writes the
figures after each stabilizer, so a run cut short still leaves them.

    python benchmarks/gpu_packing.py [--stabilizers none,weyl,sigma_reparam,qk_norm,mlra] [--steps 100]
                                     [--packing 1,2,4] [--mps] [--timeout 120] [--json F]
    python benchmarks/gpu_packing.py --cpu-smoke --stabilizers none,weyl --packing 1,2 --steps 3 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

WORKER = r"""
import json, sys, time, torch
from workloads.trainer import Trainer
from workloads.trial import TrialConfig
stab, steps, warmup, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
cfg = TrialConfig(**size, steps=10**6, stabilizers=() if stab == "none" else (stab,))
tr = Trainer(cfg)
sync = torch.cuda.synchronize if tr.device.type == "cuda" else (lambda: None)
for s in range(warmup):
    tr.step(s, probe=False)
sync()
t0 = time.perf_counter()
pending = []
for s in range(steps):  # as the trial loop: probes every probe_interval, a loss read every sync_interval
    pending.append(tr.step(warmup + s, probe=s % cfg.probe_interval == 0)[0])
    if s % cfg.sync_interval == 0 or s == steps - 1:
        torch.stack(pending).tolist()
        pending.clear()
sync()
print(json.dumps({"tokens_per_s": steps * cfg.batch_size * cfg.seq_len / (time.perf_counter() - t0)}))
"""


SIZE = dict(workload="gpt", depth=6, width=512, heads=8, seq_len=256, batch_size=64, device="cuda",
            precision="bf16")
TINY = dict(workload="gpt", depth=2, width=32, heads=2, seq_len=16, batch_size=2, device="cpu", threads=1)


def run_packed(stab: str, k: int, steps: int, warmup: int, size: dict = SIZE,
               timeout: float | None = None, env: dict | None = None) -> float | None:
    """Aggregate tokens/s of ``k`` trials run together, or ``None`` if they did not finish within
    ``timeout`` seconds (then all are killed)."""
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, stab, str(steps), str(warmup), json.dumps(size)],
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(k)]
    deadline = None if timeout is None else time.monotonic() + timeout
    total = 0.0
    try:
        for p in procs:
            left = None if deadline is None else max(0.1, deadline - time.monotonic())
            out, _ = p.communicate(timeout=left)
            if p.returncode:
                raise RuntimeError(f"{stab} x{k}: worker failed (rc {p.returncode})")
            total += json.loads(out.strip().splitlines()[-1])["tokens_per_s"]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
        return None
    return total


def start_mps() -> dict:
    """Start the CUDA MPS control daemon with its own pipe and log folders; return the environment
    that clients (the workers) need to reach it. Raises if the daemon cannot be started."""
    exe = shutil.which("nvidia-cuda-mps-control")
    if exe is None:
        raise RuntimeError("nvidia-cuda-mps-control is not on PATH")
    env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY="/tmp/ablate-mps/pipe", CUDA_MPS_LOG_DIRECTORY="/tmp/ablate-mps/log")
    for d in ("/tmp/ablate-mps/pipe", "/tmp/ablate-mps/log"):
        os.makedirs(d, exist_ok=True)
    subprocess.run([exe, "-d"], env=env, check=True, timeout=30)
    return env


def stop_mps(env: dict) -> None:
    subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, env=env, timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stabilizers", default="none,weyl,sigma_reparam,qk_norm,mlra")
    ap.add_argument("--packing", default="1,2,4")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=None, help="seconds a packed run may take before it is killed")
    ap.add_argument("--mps", action="store_true", help="run with the CUDA MPS daemon started (and stopped after)")
    ap.add_argument("--json", default=None, help="write the figures to this file after each stabilizer")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny trials on the CPU (checks that the script works; the figures mean nothing)")
    args = ap.parse_args()
    size = TINY if args.cpu_smoke else SIZE
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_packing.py: no CUDA device; this benchmark measures trials sharing a GPU "
              "(--cpu-smoke checks the script)", file=sys.stderr)
        return 2
    if args.mps and args.cpu_smoke:
        ap.error("--mps needs a GPU")
    ks = [int(k) for k in args.packing.split(",")]
    env = None
    if args.mps:
        try:
            env = start_mps()
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            print(f"gpu_packing.py: could not start CUDA MPS: {e}", file=sys.stderr)
            return 1
    try:
        return _measure(args, size, ks, env)
    finally:
        if env is not None:
            stop_mps(env)


def _measure(args, size: dict, ks: list[int], env: dict | None) -> int:
    where = "CPU smoke run" if args.cpu_smoke else torch.cuda.get_device_name()
    mps = ", CUDA MPS on" if env is not None else ""
    print(f"torch {torch.__version__}, {where}{mps}; aggregate k tokens/s (thousands)", flush=True)
    print("| stabilizer | " + " | ".join(f"{k} trial(s)" for k in ks) + " |")
    print("| --- |" + " --- |" * len(ks), flush=True)
    failed = []
    results = {"torch": torch.__version__, "device": where, "mps": env is not None, "size": size,
               "steps": args.steps, "tokens_per_s": {}}
    for stab in args.stabilizers.split(","):
        agg = {k: run_packed(stab, k, args.steps, args.warmup, size, args.timeout, env) for k in ks}
        one = agg.get(1)

        def cell(k):
            if agg[k] is None:
                return f"timed out (> {args.timeout:.0f} s)"
            return f"{agg[k] / 1e3:.0f}" + (f" ({agg[k] / one:.2f}x)" if one and k != 1 else "")
        print(f"| {stab} | " + " | ".join(cell(k) for k in ks) + " |", flush=True)
        failed += [f"{stab} x{k}" for k in ks if one and (agg[k] is None or agg[k] < one)]
        results["tokens_per_s"][stab] = {str(k): v for k, v in agg.items()}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    if args.cpu_smoke:
        print("CPU smoke run: the script works; packing is judged on a GPU only")
        return 0
    print("every stabilizer packs" if not failed else "below one-trial throughput: " + ", ".join(failed))
    return 0


if __name__ == "__main__":
    sys.exit(main())

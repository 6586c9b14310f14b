"""Aggregate throughput of 1, 2 and 4 trials sharing one GPU, per stabilizer (issue 12). Needs
CUDA; exits with a message without it.

Each trial is a separate process (as Ray runs trials with ``gpus: 1/k``) training the spec's GPT
(depth 6, width 512, 8 heads, seq 256, batch 64, bf16) for ``--steps`` steps after a warm-up; the
processes start together and each reports its tokens/s over the timed steps. The aggregate is the
sum. A stabilizer "packs" when its k-trial aggregate is at least its one-trial throughput. Run once
as is and once with CUDA MPS started (``nvidia-cuda-mps-control -d``) to see whether MPS helps.

    python benchmarks/gpu_packing.py [--stabilizers none,weyl,sigma_reparam,qk_norm,mlra] [--steps 100]
    python benchmarks/gpu_packing.py --cpu-smoke --stabilizers none,weyl --packing 1,2 --steps 3 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

WORKER = r"""
import json, sys, time, torch
from workloads.trial import Trainer, TrialConfig
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


def run_packed(stab: str, k: int, steps: int, warmup: int, size: dict = SIZE) -> float:
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, stab, str(steps), str(warmup), json.dumps(size)],
                              stdout=subprocess.PIPE, text=True) for _ in range(k)]
    total = 0.0
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise RuntimeError(f"{stab} x{k}: worker failed (rc {p.returncode})")
        total += json.loads(out.strip().splitlines()[-1])["tokens_per_s"]
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stabilizers", default="none,weyl,sigma_reparam,qk_norm,mlra")
    ap.add_argument("--packing", default="1,2,4")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny trials on the CPU (checks that the script works; the figures mean nothing)")
    args = ap.parse_args()
    size = TINY if args.cpu_smoke else SIZE
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_packing.py: no CUDA device; this benchmark measures trials sharing a GPU "
              "(--cpu-smoke checks the script)", file=sys.stderr)
        return 2
    ks = [int(k) for k in args.packing.split(",")]
    where = "CPU smoke run" if args.cpu_smoke else torch.cuda.get_device_name()
    print(f"torch {torch.__version__}, {where}; aggregate k tokens/s")
    print("| stabilizer | " + " | ".join(f"{k} trial(s)" for k in ks) + " |")
    print("| --- |" + " --- |" * len(ks))
    failed = []
    for stab in args.stabilizers.split(","):
        agg = {k: run_packed(stab, k, args.steps, args.warmup, size) for k in ks}
        one = agg.get(1)
        print(f"| {stab} | " + " | ".join(
            f"{agg[k] / 1e3:.0f}" + (f" ({agg[k] / one:.2f}x)" if one and k != 1 else "") for k in ks) + " |")
        failed += [f"{stab} x{k}" for k in ks if one and agg[k] < one]
    if args.cpu_smoke:
        print("CPU smoke run: the script works; packing is judged on a GPU only")
        return 0
    print("every stabilizer packs" if not failed else "below one-trial throughput: " + ", ".join(failed))
    return 0


if __name__ == "__main__":
    sys.exit(main())

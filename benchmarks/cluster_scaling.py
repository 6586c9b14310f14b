"""The same sweep on 1 and on 2 simulated worker nodes of equal size: wall-time ratio.

Worker nodes are local Ray nodes (``orchestrator.localcluster``), each advertising ``--cpus``
CPUs; the head advertises none, as in cluster.yaml. Each trial asks 1 CPU. With 2 nodes twice as
many trials run at once, so the sweep should take about half as long where the machine has the
cores for it. On a 2-core machine the two nodes' trials share the same 2 physical cores with the
driver, the raylets and the GCS: the ratio then measures scheduling across nodes, not compute.

    python benchmarks/cluster_scaling.py [--trials 8] [--steps 1000] [--cpus 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from orchestrator.localcluster import LocalCluster
from orchestrator.spec import parse_spec
from orchestrator.sweep import run_sweep


def sweep_on(nodes: int, cpus: int, raw: dict, work: Path) -> float:
    cluster = LocalCluster(workers=nodes, cpus_per_worker=cpus)
    try:
        t0 = time.perf_counter()
        out = run_sweep(parse_spec(raw), raw, workdir=work, address=cluster.address, progress=False)
        elapsed = time.perf_counter() - t0
        assert sum(out.counts.values()) == len(parse_spec(raw).trials())
        return elapsed
    finally:
        cluster.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--cpus", type=int, default=1, help="CPUs per worker node")
    args = ap.parse_args()
    raw = {"name": "scaling", "workload": "gpt", "steps": args.steps,
           "fixed": {"depth": 1, "width": 32, "heads": 2, "seq_len": 32, "batch_size": 8, "eval_batches": 1},
           "axes": {"lr": [float(f"{1e-3 * 1.1 ** i:.5g}") for i in range(args.trials)]},
           "probe_interval": 50, "resources": {"cpus": 1, "gpus": 0}}
    times = {}
    for nodes in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            times[nodes] = sweep_on(nodes, args.cpus, dict(raw, name=f"scaling-{nodes}"), Path(tmp))
    print(f"{args.trials} trials x {args.steps} steps, worker nodes of {args.cpus} CPU, machine: {os.cpu_count()} cores")
    print(f"1 worker node:  {times[1]:7.2f} s")
    print(f"2 worker nodes: {times[2]:7.2f} s")
    print(f"speed-up 2 nodes / 1 node: {times[1] / times[2]:.2f}x (ideal 2.00x where cores allow)")


if __name__ == "__main__":
    main()

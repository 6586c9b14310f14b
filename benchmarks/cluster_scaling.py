"""Cluster scaling, two measurements.

1. ``--mode nodes`` (the default): the same sweep on 1 and on 2 simulated worker nodes of equal
   size, wall-time ratio. Worker nodes are local Ray nodes (``orchestrator.localcluster.LocalCluster``),
   each advertising ``--cpus`` CPUs; the head advertises none, as in cluster.yaml. Each trial asks 1
   CPU. With 2 nodes twice as many trials run at once, so the sweep should take about half as long
   where the machine has the cores for it. On a 2-core machine the two nodes' trials share the same
   2 physical cores with the driver, the raylets and the GCS: the ratio then measures scheduling
   across nodes, not compute.

2. ``--mode scale``: the driver's cost per trial at the GPU spec's shape, by simulation. The cluster
   is Ray's autoscaler with its fake multi-node provider (``orchestrator.localcluster.AutoscalingCluster``,
   token authentication, an MLflow server on 127.0.0.1) with ``--nodes`` GPU worker nodes of
   g5.2xlarge's resources (8 CPU, 1 GPU; fake) kept up (``min_workers``). The boundary search has the
   shape of ``search_spaces/gpt_warmup_boundary.yaml`` (``resources: {cpus: 2, gpus: 0.25}``, 4 trials
   in flight per cell, psi, at most ``--per-cell`` trials a cell) over 5, 30 and 100 cells, and
   each trial is a stand-in (:func:`standin_trial`) that returns at once with a known outcome: it
   crashes with probability logistic((log lr - log lr50_cell) / 0.25), lr50_cell fixed per cell.
   So every second the search takes is the orchestration's: Tune's loop, the searcher (Optuna
   studies in SQLite), the MLflow writes through the server. Printed per cell count: trials, wall
   time, the driver's CPU time per trial (the process's, all threads), wall time per trial, and
   the searcher's own time per trial (``BoundarySearcher.suggest`` and ``on_trial_complete``).
   Then a sweep of ``--sweep-trials`` stand-in trials (a grid) through the same server, and a count
   of its MLflow runs: none lost.

    python benchmarks/cluster_scaling.py [--trials 8] [--steps 1000] [--cpus 1]
    python benchmarks/cluster_scaling.py --mode scale [--cells 5,30,100] [--nodes 4] [--per-cell 4] [--sweep-trials 1000]
"""

from __future__ import annotations

import argparse
import json
import math
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


def nodes_mode(args) -> None:
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


# ------------------------------------------------------------------------------ scale mode
CRASH_WIDTH = 0.25  # the stand-in's crash curve: logistic in log LR, this width


def cell_lr50(cell: str) -> float:
    """The stand-in's true LR50 of a cell: fixed by its key, log-uniform in [3e-3, 3e-2]."""
    import zlib

    u = zlib.crc32(cell.encode()) / 2**32
    return math.exp(math.log(3e-3) + u * math.log(10))


def standin_trial(config: dict) -> None:
    """A Tune trial that returns at once with a known outcome (see the module's docstring), reporting
    what ``orchestrator.trainable.train_trial`` reports: the node, one metrics batch, the summary."""
    import random
    import socket
    import zlib

    import ray
    from ray import tune

    point = config["point"]
    trial, cell = point["trial"], point.get("cell") or point["label"]
    lr, seed = trial["lr"], trial["seed"]
    rng = random.Random(zlib.crc32(f"{cell}|{seed}".encode()))
    crashed = rng.random() < 1 / (1 + math.exp(-(math.log(lr) - math.log(cell_lr50(cell))) / CRASH_WIDTH))
    now = time.time()
    final = math.inf if crashed else 2.0
    summary = {"initial_loss": 5.5, "final_loss": final, "best_loss": 2.0, "final_train_loss": final, "steps_run": 1,
               "outcome": "diverged" if crashed else "stable", "baseline_loss": 4.0, "eval_baseline": 4.0,
               "final_loss_se": 0.01, "stop_reason": "nonfinite" if crashed else None, "first_event": None,
               "wall_time": 0.0, "throughput": 0.0, "device": "cpu", "ended_at": now, "standin": True}
    tune.report({"loss": 5.5, "step": 1, "batch": json.dumps([[0, {"loss": 5.5}, []]]),
                 "node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(),
                 "started_at": now, "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids()),
                 "summary": json.dumps(summary, default=str), "final_loss": final, "diverged": int(crashed)})


def boundary_spec(cells: int, per_cell: int) -> dict:
    """gpt_warmup_boundary.yaml's shape (resources, 4 in flight per cell, psi) over ``cells`` cells."""
    return {"name": f"scale-{cells}", "experiment": "ablate-scale", "workload": "gpt", "steps": 10,
            "fixed": {"depth": 1, "width": 32, "heads": 2, "seq_len": 32, "batch_size": 8, "eval_batches": 1},
            "axes": {"warmup_steps": list(range(cells))}, "probe_interval": 10,
            "resources": {"cpus": 2, "gpus": 0.25}, "max_failures": 2,
            "boundary": {"method": "psi", "lr_range": [1e-4, 1e-1], "resolution": 1.5,
                         "max_trials_per_cell": per_cell, "min_trials_per_cell": min(8, per_cell),
                         "max_in_flight_per_cell": 4}}


class SearcherClock:
    """Time spent in ``BoundarySearcher.suggest`` and ``on_trial_complete`` (wrapped for the run)."""

    def __init__(self):
        from orchestrator.boundary import BoundarySearcher

        self.cls, self.seconds, self.calls = BoundarySearcher, 0.0, 0
        self.saved = {n: getattr(BoundarySearcher, n) for n in ("suggest", "on_trial_complete")}

    def __enter__(self):
        clock = self
        for name, fn in self.saved.items():
            def timed(*a, _fn=fn, **k):
                t = time.perf_counter()
                try:
                    return _fn(*a, **k)
                finally:
                    clock.seconds += time.perf_counter() - t
                    clock.calls += 1
            setattr(self.cls, name, timed)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(self.cls, name, fn)


def scale_mode(args) -> None:
    from mlflow.tracking import MlflowClient

    from orchestrator.boundary import run_boundary
    from orchestrator.localcluster import AutoscalingCluster

    types = {"gpu_a10g": {"resources": {"CPU": 8, "GPU": 1, "object_store_memory": 100 * 2**20}, "node_config": {},
                          "min_workers": args.nodes, "max_workers": args.nodes}}
    with tempfile.TemporaryDirectory(prefix="scale-", dir="/tmp") as tmp:
        cluster = AutoscalingCluster(Path(tmp), worker_types=types, head_resources={"CPU": 0}, max_workers=args.nodes,
                                     idle_timeout_s=600).start()
        try:
            t = time.time()
            while len(cluster.workers()) < args.nodes:
                if time.time() - t > 300:
                    raise TimeoutError(f"{len(cluster.workers())} of {args.nodes} worker nodes after 300 s")
                time.sleep(1)
            uri = cluster.mlflow.uri
            rows = []
            for cells in [int(c) for c in args.cells.split(",")]:
                raw = boundary_spec(cells, args.per_cell)
                spec = parse_spec(raw)
                cpu0, t0 = time.process_time(), time.perf_counter()
                with SearcherClock() as clock:
                    out = run_boundary(spec, raw, workdir=Path(tmp) / f"wd-{cells}", tracking_uri=uri,
                                       address=cluster.address, progress=False, trial_fn=standin_trial)
                wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                n = sum(c["n_trials"] + c["failed_trials"] for c in out.cells)
                client = MlflowClient(uri)
                exp = client.get_experiment_by_name("ablate-scale")
                runs = client.search_runs([exp.experiment_id], f"tags.`ablate.kind` = 'trial' and "
                                          f"tags.`ablate.sweep` = '{spec.name}'", max_results=50000)
                rows.append((cells, n, len(runs), wall, cpu / n, wall / n, clock.seconds / n))
                print(f"{cells} cells: {n} trials ({len(runs)} MLflow runs), {wall:.1f} s, driver CPU "
                      f"{cpu / n * 1000:.1f} ms/trial, wall {wall / n * 1000:.1f} ms/trial, searcher "
                      f"{clock.seconds / n * 1000:.2f} ms/trial", flush=True)
            # the 1,000-trial sweep through the server
            grid = [float(f"{1e-4 * 10 ** (3 * i / (args.sweep_trials - 1)):.6g}") for i in range(args.sweep_trials)]
            raw = {"name": "scale-sweep", "experiment": "ablate-scale", "workload": "gpt", "steps": 10,
                   "fixed": {"depth": 1, "width": 32, "heads": 2, "seq_len": 32, "batch_size": 8, "eval_batches": 1},
                   "axes": {"lr": sorted(set(grid))}, "probe_interval": 10, "resources": {"cpus": 2, "gpus": 0.25},
                   "max_trials": 100000}
            spec = parse_spec(raw)
            cpu0, t0 = time.process_time(), time.perf_counter()
            out = run_sweep(spec, raw, workdir=Path(tmp) / "wd-sweep", tracking_uri=uri, address=cluster.address,
                            progress=False, trial_fn=standin_trial)
            sweep_wall, sweep_cpu = time.perf_counter() - t0, time.process_time() - cpu0
            client = MlflowClient(uri)
            exp = client.get_experiment_by_name("ablate-scale")
            runs = client.search_runs([exp.experiment_id], "tags.`ablate.kind` = 'trial' and "
                                      "tags.`ablate.sweep` = 'scale-sweep'", max_results=50000)
            finished = [r for r in runs if r.info.status == "FINISHED"]
            ids = {r.data.tags["ablate.trial_id"] for r in runs}
        finally:
            cluster.shutdown()
    print(f"\nscale: {args.nodes} worker nodes (8 CPU, 1 fake GPU each), trials of 2 CPU / 0.25 GPU, psi, 4 in flight "
          f"per cell, at most {args.per_cell} trials a cell; machine: {os.cpu_count()} cores")
    print("| cells | trials | MLflow runs | wall (s) | driver CPU per trial (ms) | wall per trial (ms) | searcher per trial (ms) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for cells, n, nr, wall, cpu, w, s in rows:
        print(f"| {cells} | {n} | {nr} | {wall:.1f} | {cpu * 1000:.1f} | {w * 1000:.1f} | {s * 1000:.2f} |")
    print(f"\nsweep of {out.trials} stand-in trials through {uri}: {len(runs)} MLflow runs, {len(finished)} FINISHED, "
          f"{len(ids)} distinct trial ids, counts {out.counts}; {sweep_wall:.1f} s, driver CPU "
          f"{sweep_cpu / out.trials * 1000:.1f} ms/trial, wall {sweep_wall / out.trials * 1000:.1f} ms/trial; lost: {out.trials - len(finished)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("nodes", "scale"), default="nodes")
    ap.add_argument("--trials", type=int, default=8, help="nodes: trials of the sweep")
    ap.add_argument("--steps", type=int, default=1000, help="nodes: steps a trial")
    ap.add_argument("--cpus", type=int, default=1, help="nodes: CPUs per worker node")
    ap.add_argument("--cells", default="5,30,100", help="scale: the boundary searches' cell counts")
    ap.add_argument("--nodes", type=int, default=4, help="scale: worker nodes (4-8)")
    ap.add_argument("--per-cell", type=int, default=4, help="scale: at most this many trials a cell (the GPU spec: 30)")
    ap.add_argument("--sweep-trials", type=int, default=1000, help="scale: trials of the sweep through MLflow")
    args = ap.parse_args()
    (scale_mode if args.mode == "scale" else nodes_mode)(args)


if __name__ == "__main__":
    main()

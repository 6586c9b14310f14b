"""Per-trial overhead of orchestration (Ray Tune + MLflow) against a plain Python loop.

(a) the same N short trials through ``workloads.trial.run`` in a plain process pool of the same
    concurrency (workers started and warmed before the clock starts);
(b) the same trials through ``orchestrator.sweep.run_sweep`` (what ``ablate sweep`` runs): Ray
    Tune scheduling, reporting every probe step, the MLflow tracking callback writing SQLite.
Per-trial overhead is the marginal cost: (sweep(2N) - sweep(N)) - (plain(2N) - plain(N)), per trial
slot, so that fixed costs cancel (Ray's start-up, the MLflow store's creation in a warm-up sweep,
each sweep's worker processes importing torch); they are reported apart.

Then the MLflow logging throughput: metric values per second into a fresh SQLite store through the
tracker's batched writer.

Targets (issue #3): per-trial overhead < 0.5 s on 2 CPU cores; >= 5,000 metric values/s.

    python benchmarks/orchestration_overhead.py [--trials 8] [--concurrency 2] [--steps 60]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def _spec(n: int, concurrency: int, steps: int) -> dict:
    lrs = [float(f"{1e-3 * (1.1 ** i):.6g}") for i in range(n)]
    return {
        "name": "overhead", "workload": "gpt", "steps": steps,
        "fixed": {"depth": 1, "width": 32, "heads": 2, "seq_len": 32, "batch_size": 8,
                  "eval_batches": 1, "schedule": "constant"},
        "axes": {"lr": lrs}, "probe_interval": 5, "resources": {"cpus": 1, "gpus": 0},
        "concurrency": concurrency,
    }


def _run_one(cfg_dict: dict) -> float:
    from workloads.trial import TrialConfig, run

    return run(TrialConfig(**cfg_dict)).final_loss


def _warm(cfg_dict: dict) -> int:
    _run_one(cfg_dict)  # imports torch, reads the corpus, touches every code path once
    time.sleep(0.5)  # keep this worker busy so that the other one takes the next warm-up
    return os.getpid()


def plain_loop(batches: list[list[dict]], concurrency: int) -> list[float]:
    """Wall time of each batch of trials through a warmed process pool."""
    out = []
    with ProcessPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(_warm, batches[0][:concurrency]))
        for configs in batches:
            t0 = time.perf_counter()
            list(pool.map(_run_one, configs))
            out.append(time.perf_counter() - t0)
    return out


def through_sweep(raws: list[dict], workdir: Path) -> tuple[list[float], float]:
    """Wall time of each sweep (one Ray session); and Ray's start-up, timed apart."""
    import ray

    from orchestrator.spec import parse_spec
    from orchestrator.sweep import init_ray, run_sweep

    t0 = time.perf_counter()
    init_ray(None, workdir)
    startup = time.perf_counter() - t0
    out = []
    for raw in raws:
        t0 = time.perf_counter()
        res = run_sweep(parse_spec(raw), raw, workdir=workdir, progress=False)
        out.append(time.perf_counter() - t0)
        assert sum(res.counts.values()) == len(parse_spec(raw).trials()), res.counts
    ray.shutdown()
    return out, startup


def logging_throughput(workdir: Path, values: int = 50_000) -> float:
    from mlflow.entities import Metric

    from orchestrator.tracking import Tracker

    tr = Tracker(f"sqlite:///{workdir / 'throughput.db'}", "throughput")
    run_id = tr.client.create_run(tr.experiment_id).info.run_id
    ts = int(time.time() * 1000)
    keys = [f"attn_entropy_min/layer{i}" for i in range(50)]
    metrics = [Metric(keys[i % 50], float(i), ts, i // 50) for i in range(values)]
    t0 = time.perf_counter()
    tr.log_metrics(run_id, metrics)
    return values / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()

    from orchestrator.spec import parse_spec

    n, c = args.trials, args.concurrency
    small, large = _spec(n, c, args.steps), _spec(2 * n, c, args.steps)
    large["name"] = "overhead-2n"
    cfgs = lambda raw: [t.to_dict() for t in parse_spec(raw).trials()]  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        p1, p2 = plain_loop([cfgs(small), cfgs(large)], c)
        warm = dict(_spec(c, c, args.steps), name="overhead-warmup")  # creates the MLflow store
        (_, s1, s2), startup = through_sweep([warm, small, large], work / "sweep")
        rate = logging_throughput(work)
    # marginal cost of N more trials through the sweep, minus the same through the plain pool,
    # per trial slot (trials run c at a time): fixed start-up costs cancel out
    per_trial = ((s2 - s1) - (p2 - p1)) * c / n
    fixed = s1 - p1 - per_trial * n / c
    print(f"trials of {args.steps} steps, concurrency {c}, {os.cpu_count()} CPUs")
    print(f"{'':28}{n:>4} trials {2 * n:>4} trials")
    print(f"{'plain process pool':28}{p1:>10.2f}s {p2:>10.2f}s")
    print(f"{'ablate sweep (Tune+MLflow)':28}{s1:>10.2f}s {s2:>10.2f}s")
    print(f"wall-time ratio sweep/plain: {s1 / p1:.2f}x ({n}), {s2 / p2:.2f}x ({2 * n})")
    print(f"per-trial overhead (marginal): {per_trial:.3f} s  (target < 0.5 s)")
    print(f"fixed cost per sweep: {fixed:.2f} s (Tune set-up, worker processes importing torch)"
          f" + Ray start-up {startup:.2f} s once per session")
    print(f"MLflow logging throughput (SQLite, batched): {rate:,.0f} metric values/s  (target >= 5,000)")
    ok = per_trial < 0.5 and rate >= 5000
    print("all targets met" if ok else "target missed")


if __name__ == "__main__":
    main()

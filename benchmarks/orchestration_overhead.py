"""Per-trial overhead of orchestration (Ray Tune + MLflow) against a plain Python loop, where it
goes, and the MLflow ingest rate against raw SQLite.

(a) the same N short trials through ``workloads.trial.run`` in a plain process pool of the same
    concurrency (workers started and warmed before the clock starts);
(b) the same trials through ``orchestrator.sweep.run_sweep`` (what ``ablate sweep`` runs): Ray
    Tune scheduling, reports of the probe steps, the MLflow tracking callback writing SQLite.
Per-trial overhead is the marginal cost: (sweep(2N) - sweep(N)) - (plain(2N) - plain(N)), per trial
slot, so that fixed costs cancel (Ray's start-up, the MLflow store's creation in a warm-up sweep,
each sweep's worker processes importing Ray Tune, torch and torch._dynamo); they are reported apart.

Where the marginal time goes, per added trial (the same differences, divided by N): the driver's
wall and CPU time inside the MLflow tracking callback (it blocks Tune's event loop), the driver's
other CPU time (Tune's loop and Ray's client), and the trials' own ``run()`` time in a Ray worker
and in the pool. The driver serves all trial slots from one thread, so these overlap with the slots'
time and do not add up to the per-slot figure exactly.

Then the MLflow ingest: 50,000 metric values (50 keys x 1000 steps) of one run into a fresh SQLite
store through the tracker's writer (``Tracker.log_metrics``) and through MLflow's ``log_batch`` (1000
values a call), beside a plain ``sqlite3.executemany`` of the same rows into a table of the same
shape (MLflow's ``metrics`` table: its primary key and indexes), the machine's limit. Every value
written through MLflow is read back (``get_metric_history``) and compared, and each key's latest
value: nothing lost.

Targets (issue #23): per-trial overhead < 0.3 s, fixed cost per sweep + Ray start-up <= 8 s on 2 CPU
cores; ingest >= 10,000 metric values/s.

    python benchmarks/orchestration_overhead.py [--trials 8] [--concurrency 2] [--steps 60] [--values 50000]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
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

    return run(TrialConfig(**cfg_dict)).wall_time


def _warm(cfg_dict: dict) -> int:
    _run_one(cfg_dict)  # imports torch, reads the corpus, touches every code path once
    time.sleep(0.5)  # keep this worker busy so that the other one takes the next warm-up
    return os.getpid()


def plain_loop(batches: list[list[dict]], concurrency: int) -> list[tuple[float, float]]:
    """(wall time, sum of the trials' run() times) of each batch through a warmed process pool."""
    out = []
    with ProcessPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(_warm, batches[0][:concurrency]))
        for configs in batches:
            t0 = time.perf_counter()
            runs = list(pool.map(_run_one, configs))
            out.append((time.perf_counter() - t0, sum(runs)))
    return out


class _HookTimer:
    """Wall and CPU time the driver spends inside the tracking callback's Tune hooks (patched on the
    class for the benchmark's sweeps, restored after)."""

    HOOKS = ("on_trial_start", "on_trial_result", "on_trial_complete", "on_trial_error", "on_step_end",
             "on_experiment_end")

    def __init__(self):
        from orchestrator.tracking import TrackingCallback

        self.cls, self.total, self.cpu, self.saved = TrackingCallback, 0.0, 0.0, {}

    def __enter__(self):
        for name in self.HOOKS:
            fn = self.cls.__dict__.get(name)
            if fn is None:
                continue
            self.saved[name] = fn

            def timed(cb, *a, _fn=fn, **k):
                t0, c0 = time.perf_counter(), time.thread_time()
                try:
                    return _fn(cb, *a, **k)
                finally:
                    self.total += time.perf_counter() - t0
                    self.cpu += time.thread_time() - c0

            setattr(self.cls, name, timed)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(self.cls, name, fn)


def through_sweep(raws: list[dict], workdir: Path) -> tuple[list[dict], float]:
    """Per sweep (one Ray session): wall time, driver CPU, time in the tracking callback, the sum
    of the trials' run() times and the time until the first trial started; Ray's start-up apart."""
    import ray

    from orchestrator.spec import parse_spec
    from orchestrator.sweep import init_ray, run_sweep
    from orchestrator.mlflow_store import Tracker

    t0 = time.perf_counter()
    init_ray(None, workdir)
    startup = time.perf_counter() - t0
    out = []
    with _HookTimer() as hooks:
        for raw in raws:
            spec = parse_spec(raw)
            hooks.total, hooks.cpu, cpu0, wall0 = 0.0, 0.0, time.process_time(), time.time()
            t0 = time.perf_counter()
            res = run_sweep(spec, raw, workdir=workdir, progress=False)
            wall = time.perf_counter() - t0
            row = dict(wall=wall, driver_cpu=time.process_time() - cpu0, tracking=hooks.total,
                       tracking_cpu=hooks.cpu)
            assert sum(res.counts.values()) == len(spec.trials()), res.counts
            runs = Tracker(res.tracking_uri, spec.experiment_name).trial_runs(spec.name)
            row["runs"] = sum(r.data.metrics["result/wall_time"] for r in runs)
            row["to_first_trial"] = min(float(r.data.tags["started_at"]) for r in runs) - wall0
            out.append(row)
    ray.shutdown()
    return out, startup


def _values(n: int):
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    keys = [f"attn_entropy_min/layer{i}" for i in range(50)]
    return [Metric(keys[i % 50], float(i) / 7, ts, i // 50) for i in range(n)]


def raw_sqlite_rate(path: Path, metrics) -> float:
    """Rows/s of one ``executemany`` (one transaction) into a table shaped as MLflow's ``metrics``."""
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE metrics (key VARCHAR(250) NOT NULL, value FLOAT NOT NULL, timestamp BIGINT NOT NULL,"
                " step BIGINT NOT NULL, is_nan BOOLEAN NOT NULL, run_uuid VARCHAR(32) NOT NULL,"
                " PRIMARY KEY (key, timestamp, step, run_uuid, value, is_nan))")
    con.execute("CREATE INDEX index_metrics_run_uuid ON metrics (run_uuid)")
    con.execute("CREATE INDEX index_metrics_run_uuid_key_step ON metrics (run_uuid, key, step)")
    rows = [(m.key, m.value, m.timestamp, m.step, False, "0" * 32) for m in metrics]
    t0 = time.perf_counter()
    with con:
        con.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?)", rows)
    rate = len(rows) / (time.perf_counter() - t0)
    con.close()
    return rate


def mlflow_rate(path: Path, metrics, how: str) -> float:
    """Values/s into a fresh SQLite store, one run: ``how`` = "tracker" (Tracker.log_metrics) or
    "log_batch" (MlflowClient.log_batch, 1000 a call). Every value is then read back and compared."""
    from orchestrator.mlflow_store import BATCH, Tracker

    tr = Tracker(f"sqlite:///{path}", "throughput")
    run_id = tr.client.create_run(tr.experiment_id).info.run_id
    t0 = time.perf_counter()
    if how == "tracker":
        tr.log_metrics(run_id, metrics)
    else:
        for i in range(0, len(metrics), BATCH):
            tr.client.log_batch(run_id, metrics=metrics[i:i + BATCH])
    rate = len(metrics) / (time.perf_counter() - t0)
    want: dict[str, list] = {}
    for m in metrics:
        want.setdefault(m.key, []).append((m.step, m.value))
    latest = tr.client.get_run(run_id).data.metrics
    for key, rows in want.items():
        got = sorted((m.step, m.value) for m in tr.client.get_metric_history(run_id, key))
        assert got == sorted(rows), f"{how}: {key}: {len(got)} values read back, {len(rows)} written"
        assert latest[key] == max(rows)[1], f"{how}: {key}: latest {latest[key]}, want {max(rows)[1]}"
    return rate


def logging_throughput(workdir: Path, values: int = 50_000) -> dict[str, float]:
    metrics = _values(values)
    return {"raw": raw_sqlite_rate(workdir / "raw.db", metrics),
            "tracker": mlflow_rate(workdir / "tracker.db", metrics, "tracker"),
            "log_batch": mlflow_rate(workdir / "log_batch.db", metrics, "log_batch")}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--values", type=int, default=50_000, help="metric values of the ingest measurement")
    args = ap.parse_args(argv)

    from orchestrator.spec import parse_spec

    n, c = args.trials, args.concurrency
    small, large = _spec(n, c, args.steps), _spec(2 * n, c, args.steps)
    large["name"] = "overhead-2n"
    cfgs = lambda raw: [t.to_dict() for t in parse_spec(raw).trials()]  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (p1, r1), (p2, r2) = plain_loop([cfgs(small), cfgs(large)], c)
        warm = dict(_spec(c, c, args.steps), name="overhead-warmup")  # creates the MLflow store
        (_, s1, s2), startup = through_sweep([warm, small, large], work / "sweep")
        rates = logging_throughput(work, args.values)
    # marginal cost of N more trials through the sweep, minus the same through the plain pool,
    # per trial slot (trials run c at a time): fixed start-up costs cancel out
    per_trial = ((s2["wall"] - s1["wall"]) - (p2 - p1)) * c / n
    fixed = s1["wall"] - p1 - per_trial * n / c
    d = {k: (s2[k] - s1[k]) / n for k in ("tracking", "tracking_cpu", "driver_cpu", "runs")}
    run_plain = (r2 - r1) / n
    print(f"trials of {args.steps} steps, concurrency {c}, {os.cpu_count()} CPUs")
    print(f"{'':28}{n:>4} trials {2 * n:>4} trials")
    print(f"{'plain process pool':28}{p1:>10.2f}s {p2:>10.2f}s")
    print(f"{'ablate sweep (Tune+MLflow)':28}{s1['wall']:>10.2f}s {s2['wall']:>10.2f}s")
    print(f"wall-time ratio sweep/plain: {s1['wall'] / p1:.2f}x ({n}), {s2['wall'] / p2:.2f}x ({2 * n})")
    print(f"per-trial overhead (marginal, per trial slot): {per_trial:.3f} s  (target < 0.3 s)")
    print("  where it goes, per added trial:")
    print(f"    driver, in the MLflow tracking callback: {d['tracking']:.3f} s wall, {d['tracking_cpu']:.3f} s CPU"
          " (blocks Tune's loop)")
    print(f"    driver, other CPU (Tune's loop, Ray client): {d['driver_cpu'] - d['tracking_cpu']:.3f} s")
    print(f"    trial run() in a Ray worker: {d['runs']:.3f} s, in the plain pool: {run_plain:.3f} s")
    print(f"fixed cost per sweep: {fixed:.2f} s (Tune set-up, worker processes importing Ray Tune, torch and "
          f"torch._dynamo; first trial started {s1['to_first_trial']:.2f} s after the sweep's start)")
    print(f"Ray start-up, once per session: {startup:.2f} s; fixed + Ray start-up: {fixed + startup:.2f} s"
          "  (target <= 8 s)")
    print(f"MLflow ingest into SQLite ({args.values:,} values, every one read back):")
    print(f"  Tracker.log_metrics: {rates['tracker']:>10,.0f} values/s  (target >= 10,000)"
          f"  {rates['tracker'] / rates['raw']:.1%} of raw SQLite")
    print(f"  MLflow log_batch:    {rates['log_batch']:>10,.0f} values/s"
          f"  {rates['log_batch'] / rates['raw']:.1%} of raw SQLite")
    print(f"  raw sqlite3.executemany of the same rows (the limit): {rates['raw']:,.0f} rows/s")
    ok = per_trial < 0.3 and fixed + startup <= 8 and rates["tracker"] >= 10_000
    print("all targets met" if ok else "target missed")
    return dict(per_trial=per_trial, fixed=fixed, startup=startup, rates=rates, plain=(p1, p2),
                sweep=(s1, s2), breakdown=d, run_plain=run_plain, ok=ok)


if __name__ == "__main__":
    main()

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

And the start-up as a user sees it: ``ablate sweep SPEC`` run as a fresh process (a spec of
``--concurrency`` trials), from the command to its first trial's start (the trial's own clock, tag
``started_at``), in a fresh workdir (the MLflow store is created) and in one that holds a store.

Every figure is measured ``--repeats`` times (default 5) and printed as the median and the range
[min, max] of the repeats (issue #32: one 8-vs-16-trial difference was too noisy to tell whether the
per-trial target holds). The sweeps of the repeats run in one Ray session, N and 2N alternately;
Ray's start-up is measured apart, ``--repeats`` times.

Targets (issues #23, #32): per-trial overhead < 0.3 s; fixed cost per sweep + Ray start-up, and the
command to the first trial's start, <= 8 s on 2 CPU cores; ingest >= 10,000 metric values/s.

    python benchmarks/orchestration_overhead.py [--trials 8] [--concurrency 2] [--steps 60] [--values 50000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml


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
        list(pool.map(_warm, (batches[0] * concurrency)[:concurrency]))
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


def ray_startup(workdir: Path, repeats: int) -> list[float]:
    """Seconds of ``init_ray`` (embedded Ray, as a sweep starts it), started and shut down ``repeats`` times."""
    import ray

    from orchestrator.sweep import init_ray

    workdir.mkdir(parents=True, exist_ok=True)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        init_ray(None, workdir)
        out.append(time.perf_counter() - t0)
        ray.shutdown()
    return out


def through_sweep(raws: list[dict], workdir: Path) -> list[dict]:
    """Per sweep (all in one Ray session): wall time, driver CPU, time in the tracking callback, the
    sum of the trials' run() times and the time until the first trial started."""
    import ray

    from orchestrator.spec import parse_spec
    from orchestrator.sweep import init_ray, run_sweep
    from orchestrator.mlflow_store import Tracker

    init_ray(None, workdir)
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
    return out


def command_to_first_trial(work: Path, repeats: int, concurrency: int, steps: int) -> dict[str, list[dict]]:
    """Seconds from ``ablate sweep SPEC`` (a fresh process, as a user types it) to the start of its
    first trial (the trial's own clock, tag ``started_at``), ``repeats`` times in a fresh workdir (the
    MLflow store is created) and in a workdir that holds one (a warm-up sweep made it; not counted).
    Each with two marks on the way, from MLflow's records: the parent run's creation (imports, Ray's
    start and the store done) and the first trial run's (Tune set up, its worker started)."""
    from orchestrator.mlflow_store import Tracker

    def sweep(raw: dict, wd: Path) -> dict:
        path = work / f"{raw['name']}.yaml"
        path.write_text(yaml.safe_dump(raw))
        t0 = time.time()
        out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", str(path), "--workdir", str(wd)],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        tr = Tracker(f"sqlite:///{wd / 'mlflow.db'}", f"ablate-{raw['name']}")
        runs = tr.trial_runs(raw["name"])
        assert len(runs) == concurrency, runs
        return {"parent run": tr.sweep_runs(raw["name"])[0].info.start_time / 1000 - t0,
                "first trial run": min(r.info.start_time for r in runs) / 1000 - t0,
                "first trial": min(float(r.data.tags["started_at"]) for r in runs) - t0}

    base = _spec(concurrency, concurrency, steps)
    existing = work / "first-existing"
    sweep(dict(base, name="first-warmup"), existing)
    out: dict[str, list[dict]] = {"fresh workdir": [], "existing workdir": []}
    for i in range(repeats):
        out["fresh workdir"].append(sweep(dict(base, name=f"first-fresh-{i}"), work / f"first-fresh-{i}"))
        out["existing workdir"].append(sweep(dict(base, name=f"first-existing-{i}"), existing))
    return out


def print_first(first: dict[str, list[dict]]) -> None:
    for kind, rows in first.items():
        marks = ", ".join(f"{k} {spread([r[k] for r in rows])}" for k in ("parent run", "first trial run"))
        print(f"  {kind}: {spread([r['first trial'] for r in rows])}  (target <= 8 s; on the way: {marks})")


def spread(values: list[float], fmt: str = "{:.2f}", unit: str = " s") -> str:
    """The median and the range of repeated measurements: ``1.23 s [1.01, 1.52]``."""
    f = fmt.format
    return f"{f(statistics.median(values))}{unit} [{f(min(values))}, {f(max(values))}]"


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
    workdir.mkdir(parents=True, exist_ok=True)
    return {"raw": raw_sqlite_rate(workdir / "raw.db", metrics),
            "tracker": mlflow_rate(workdir / "tracker.db", metrics, "tracker"),
            "log_batch": mlflow_rate(workdir / "log_batch.db", metrics, "log_batch")}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--values", type=int, default=50_000, help="metric values of the ingest measurement")
    ap.add_argument("--repeats", type=int, default=5, help="repeats of every figure (median and range printed)")
    ap.add_argument("--first-only", action="store_true", help="only the command to the first trial's start")
    args = ap.parse_args(argv)
    if args.first_only:
        with tempfile.TemporaryDirectory() as tmp:
            first = command_to_first_trial(Path(tmp), args.repeats, args.concurrency, args.steps)
        print("the command as a user runs it: `ablate sweep` (a fresh process, 2 trials) to its first trial's start:")
        print_first(first)
        return dict(first=first)

    from orchestrator.spec import parse_spec

    n, c, reps = args.trials, args.concurrency, args.repeats
    cfgs = lambda raw: [t.to_dict() for t in parse_spec(raw).trials()]  # noqa: E731
    small, large = cfgs(_spec(n, c, args.steps)), cfgs(_spec(2 * n, c, args.steps))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        first = command_to_first_trial(work, reps, c, args.steps)
        plain = plain_loop([small, large] * reps, c)
        startup = ray_startup(work / "startup", reps)
        raws = [dict(_spec(c, c, args.steps), name="overhead-warmup")]  # creates the MLflow store
        for i in range(reps):
            raws += [dict(_spec(n, c, args.steps), name=f"overhead-{i}"),
                     dict(_spec(2 * n, c, args.steps), name=f"overhead-2n-{i}")]
        sweeps = through_sweep(raws, work / "sweep")[1:]
        rates = [logging_throughput(work / f"ingest{i}", args.values) for i in range(reps)]
    rows = []
    for i in range(reps):
        (p1, r1), (p2, r2) = plain[2 * i], plain[2 * i + 1]
        s1, s2 = sweeps[2 * i], sweeps[2 * i + 1]
        # marginal cost of N more trials through the sweep, minus the same through the plain pool,
        # per trial slot (trials run c at a time): fixed start-up costs cancel out
        per_trial = ((s2["wall"] - s1["wall"]) - (p2 - p1)) * c / n
        row = dict(p1=p1, p2=p2, s1=s1["wall"], s2=s2["wall"], per_trial=per_trial,
                   fixed=s1["wall"] - p1 - per_trial * n / c, to_first_trial=s1["to_first_trial"],
                   run_plain=(r2 - r1) / n, startup=startup[i])
        row.update({k: (s2[k] - s1[k]) / n for k in ("tracking", "tracking_cpu", "driver_cpu", "runs")})
        row["fixed_startup"] = row["fixed"] + row["startup"]
        rows.append(row)
    col = lambda k: [r[k] for r in rows]  # noqa: E731
    print(f"trials of {args.steps} steps, concurrency {c}, {os.cpu_count()} CPUs; every figure: median "
          f"[min, max] of {reps} repeats")
    print("the command as a user runs it: `ablate sweep` (a fresh process, 2 trials) to its first trial's start:")
    print_first(first)
    print(f"{'':28}{n:>4} trials            {2 * n:>4} trials")
    print(f"{'plain process pool':28}{spread(col('p1')):>22} {spread(col('p2')):>22}")
    print(f"{'ablate sweep (Tune+MLflow)':28}{spread(col('s1')):>22} {spread(col('s2')):>22}")
    ratio1 = [r["s1"] / r["p1"] for r in rows]
    ratio2 = [r["s2"] / r["p2"] for r in rows]
    print(f"wall-time ratio sweep/plain: {spread(ratio1, unit='x')} ({n}), {spread(ratio2, unit='x')} ({2 * n})")
    print(f"per-trial overhead (marginal, per trial slot): {spread(col('per_trial'), '{:.3f}')}  (target < 0.3 s)")
    print("  where it goes, per added trial:")
    print(f"    driver, in the MLflow tracking callback: {spread(col('tracking'), '{:.3f}')} wall, "
          f"{spread(col('tracking_cpu'), '{:.3f}')} CPU (blocks Tune's loop)")
    other = [r["driver_cpu"] - r["tracking_cpu"] for r in rows]
    print(f"    driver, other CPU (Tune's loop, Ray client): {spread(other, '{:.3f}')}")
    print(f"    trial run() in a Ray worker: {spread(col('runs'), '{:.3f}')}, in the plain pool: "
          f"{spread(col('run_plain'), '{:.3f}')}")
    print(f"fixed cost per sweep: {spread(col('fixed'))} (Tune set-up, the trials' worker processes; first trial "
          f"started {spread(col('to_first_trial'))} after the sweep's start)")
    print(f"Ray start-up, once per session: {spread(startup)}; fixed + Ray start-up: {spread(col('fixed_startup'))}"
          "  (target <= 8 s)")
    rate = lambda k: [r[k] for r in rates]  # noqa: E731
    share = lambda k: [r[k] / r["raw"] * 100 for r in rates]  # noqa: E731
    print(f"MLflow ingest into SQLite ({args.values:,} values, every one read back):")
    print(f"  Tracker.log_metrics: {spread(rate('tracker'), '{:,.0f}', ' values/s')}  (target >= 10,000)"
          f"  {spread(share('tracker'), '{:.1f}', ' %')} of raw SQLite")
    print(f"  MLflow log_batch:    {spread(rate('log_batch'), '{:,.0f}', ' values/s')}"
          f"  {spread(share('log_batch'), '{:.1f}', ' %')} of raw SQLite")
    print(f"  raw sqlite3.executemany of the same rows (the limit): {spread(rate('raw'), '{:,.0f}', ' rows/s')}")
    med = statistics.median
    ok = (med(col("per_trial")) < 0.3 and med(col("fixed_startup")) <= 8 and med(rate("tracker")) >= 10_000
          and all(med([r["first trial"] for r in rows]) <= 8 for rows in first.values()))
    print("all targets met" if ok else "target missed")
    return dict(rows=rows, first=first, startup=startup, rates=rates, ok=ok)


if __name__ == "__main__":
    main()

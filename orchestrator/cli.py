"""The ``ablate`` command line."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Distributed ablations of Transformer training stability (Ray Tune + Optuna + MLflow).")

WORKDIR = typer.Option("ablate_runs", "--workdir", help="Local state: MLflow SQLite store, Tune results, Ray log link.")
TRACKING = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                                                      "else sqlite:///<workdir>/mlflow.db).")
ADDRESS = typer.Option(None, "--address", help="Ray cluster address (default: $RAY_ADDRESS, else embedded Ray).")


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def sweep(spec: Path = typer.Argument(..., help="Sweep spec (YAML), e.g. search_spaces/smoke.yaml."),
          resume: Optional[bool] = typer.Option(None, "--resume/--no-resume",
                                                help="Continue an interrupted sweep of the same name "
                                                     "(default: continue if one exists)."),
          workdir: Path = WORKDIR, tracking_uri: Optional[str] = TRACKING, address: Optional[str] = ADDRESS):
    """Run every trial of a spec's grid on Ray Tune, recorded in MLflow."""
    import yaml

    from orchestrator.spec import SpecError, load_spec
    from orchestrator.sweep import run_sweep

    try:
        s = load_spec(spec)
        out = run_sweep(s, yaml.safe_load(spec.read_text()), workdir=workdir, tracking_uri=tracking_uri,
                        resume=resume, address=address)
    except SpecError as e:
        _fail(str(e))
    c = out.counts
    typer.echo(f"\nsweep {out.name}: {out.trials} trials: {c.get('stable', 0)} stable, "
               f"{c.get('collapsed', 0)} collapsed, {c.get('diverged', 0)} diverged, {c.get('failed', 0)} failed "
               f"in {out.wall_time:.0f}s ({s.crash_criterion}; degraded runs are classed by ablate export)")
    typer.echo(f"MLflow: experiment {out.experiment!r}, parent run {out.parent_run_id}")
    if out.tracking_uri.startswith("sqlite:"):
        typer.echo(f"  open the UI:  mlflow ui --backend-store-uri {out.tracking_uri}   (then http://127.0.0.1:5000)")
    else:
        typer.echo(f"  tracking server: {out.tracking_uri}")


@app.command()
def boundary(spec: Path = typer.Argument(..., help="Spec with a boundary: block, e.g. search_spaces/boundary_smoke.yaml."),
             workdir: Path = WORKDIR, tracking_uri: Optional[str] = TRACKING, address: Optional[str] = ADDRESS):
    """Find each cell's maximum stable learning rate (Optuna bisection on Ray Tune; resumable)."""
    import yaml

    from orchestrator.boundary import boundary_config, run_boundary
    from orchestrator.spec import SpecError, load_spec

    try:
        s = load_spec(spec)
        boundary_config(s)
        out = run_boundary(s, yaml.safe_load(spec.read_text()), workdir=workdir, tracking_uri=tracking_uri,
                           address=address)
    except SpecError as e:
        _fail(str(e))
    typer.echo(f"\nboundary {out.name}: {len(out.cells)} cells in {out.wall_time:.0f}s "
               f"(a dense grid at this resolution: {out.dense_grid_trials} trials a cell)")
    typer.echo(f"{'cell':<40} {'max stable lr':>14} {'crash lr':>10} {'trials':>7}  notes")
    for c in out.cells:
        notes = [n for n in ("non_monotonic", "above_range", "below_range") if c[n]]
        if not c["converged"] and not (c["above_range"] or c["below_range"]):
            notes.append("not converged (budget spent)")
        if c["stable_end_seeds"] > 1 or c["crash_end_seeds"] > 1:
            notes.append(f"seeds crashed: {c['stable_end_crashed']}/{c['stable_end_seeds']} at stable end, "
                         f"{c['crash_end_crashed']}/{c['crash_end_seeds']} at crash end")
        fmt = lambda v: f"{v:.4g}" if v else "-"  # noqa: E731
        typer.echo(f"{c['cell']:<40} {fmt(c['stable_lr']):>14} {fmt(c['crash_lr']):>10} {c['trials']:>7}  "
                   + ", ".join(notes))
    typer.echo(f"MLflow: experiment {out.experiment!r}, parent run {out.parent_run_id}; tables: ablate export")


def _target(spec: Optional[Path], experiment: Optional[str], sweep: Optional[str],
            crash: Optional[str], kappa: Optional[float]) -> tuple[str, Optional[str], tuple[str, ...], float]:
    """Experiment, sweep and crash criterion: from the spec, overridden by the options."""
    from orchestrator.spec import SpecError, load_spec
    from workloads.outcome import DEFAULT_CRASH, DEFAULT_KAPPA, validate_crash

    crash_t, kappa_v = DEFAULT_CRASH, DEFAULT_KAPPA
    if spec is not None:
        try:
            s = load_spec(spec)
        except SpecError as e:
            _fail(str(e))
        experiment, sweep = s.experiment_name, sweep or s.name
        crash_t, kappa_v = s.crash, s.degraded_kappa
    elif not experiment:
        _fail("give a SPEC, or --experiment (and optionally --sweep)")
    if crash is not None:
        try:
            crash_t = validate_crash(c.strip() for c in crash.split(",") if c.strip())
        except ValueError as e:
            _fail(f"--{e}")
    if kappa is not None:
        if kappa <= 0:
            _fail(f"--kappa: {kappa} must be > 0")
        kappa_v = kappa
    return experiment, sweep, crash_t, kappa_v


CRASH = typer.Option(None, "--crash", help="Outcome classes that count as a crash, comma-separated: any of "
                                           "diverged, collapsed, degraded (default: the spec's crash:, else "
                                           "diverged,collapsed).")
KAPPA = typer.Option(None, "--kappa", help="Degraded: (L - L*) / (l_0 - L*) > kappa (default: the spec's "
                                           "degraded_kappa, else 0.5).")
SENS = typer.Option(None, "--sensitivity-range", help="LR range of the LR-sensitivity integral, 'low,high' "
                                                     "(default: the smallest and largest LR of the table).")


def _range(text: Optional[str]) -> Optional[tuple[float, float]]:
    if text is None:
        return None
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        _fail(f"--sensitivity-range: {text!r}; expected 'low,high', e.g. 1e-3,1")
    if not 0 < lo < hi:
        _fail(f"--sensitivity-range: {text!r} must satisfy 0 < low < high")
    return lo, hi


@app.command("export")
def export_cmd(spec: Optional[Path] = typer.Argument(None, help="The sweep's spec (names its experiment and sweep)."),
               experiment: Optional[str] = typer.Option(None, help="MLflow experiment (instead of SPEC)."),
               sweep: Optional[str] = typer.Option(None, help="Sweep name (default: all sweeps of the experiment)."),
               out: Optional[Path] = typer.Option(None, help="Output folder (default: <workdir>/export/<sweep>)."),
               crash: Optional[str] = CRASH, kappa: Optional[float] = KAPPA,
               sensitivity_range: Optional[str] = SENS,
               workdir: Path = WORKDIR, tracking_uri: Optional[str] = TRACKING):
    """Read the trials back from MLflow: Parquet/CSV of every trial, ablation tables (Markdown, LaTeX)."""
    from orchestrator.export import export
    from orchestrator.tracking import default_tracking_uri

    exp, sw, crash_t, kappa_v = _target(spec, experiment, sweep, crash, kappa)
    uri = tracking_uri or default_tracking_uri(workdir)
    try:
        res = export(uri, exp, sw, out or workdir / "export" / (sw or exp), crash_t, kappa_v,
                     _range(sensitivity_range))
    except ValueError as e:
        _fail(str(e))
    typer.echo(f"{res.table.num_rows} trials from {uri} (experiment {exp!r}" + (f", sweep {sw!r})" if sw else ")"))
    for f in res.files:
        typer.echo(f"  {f}")
    for f in res.files:
        if f.name.startswith("max_stable_lr_warmup") and f.suffix == ".md":
            typer.echo("\n" + f.read_text())


@app.command()
def report(spec: Optional[Path] = typer.Argument(None, help="The sweep's spec (names its experiment and sweep)."),
           experiment: Optional[str] = typer.Option(None, help="MLflow experiment (instead of SPEC)."),
           sweep: Optional[str] = typer.Option(None, help="Sweep name."),
           out: Optional[Path] = typer.Option(None, help="Output folder (default: <workdir>/export/<sweep>)."),
           crash: Optional[str] = CRASH, kappa: Optional[float] = KAPPA,
           sensitivity_range: Optional[str] = SENS,
           workdir: Path = WORKDIR, tracking_uri: Optional[str] = TRACKING):
    """Plots (PNG and PDF): final loss vs LR (classes marked, l_0 and the baseline drawn) and the max stable LR."""
    from orchestrator.export import report as make_report
    from orchestrator.tracking import default_tracking_uri

    exp, sw, crash_t, kappa_v = _target(spec, experiment, sweep, crash, kappa)
    uri = tracking_uri or default_tracking_uri(workdir)
    try:
        files = make_report(uri, exp, sw, out or workdir / "export" / (sw or exp), crash_t, kappa_v,
                            _range(sensitivity_range))
    except ValueError as e:
        _fail(str(e))
    for f in files:
        typer.echo(f"  {f}")


@app.command("forensics")
def forensics_cmd(spec: Optional[Path] = typer.Argument(None, help="The sweep's spec (names its experiment and sweep)."),
                  experiment: Optional[str] = typer.Option(None, help="MLflow experiment (instead of SPEC)."),
                  sweep: Optional[str] = typer.Option(None, help="Sweep name (default: all sweeps of the experiment)."),
                  out: Optional[Path] = typer.Option(None, help="Output folder (default: <workdir>/export/<sweep>)."),
                  crash: Optional[str] = CRASH, kappa: Optional[float] = KAPPA,
                  workdir: Path = WORKDIR, tracking_uri: Optional[str] = TRACKING):
    """Which stability probe warns of a crash first, how far ahead and how reliably (read from MLflow)."""
    from orchestrator.forensics import forensics
    from orchestrator.tracking import default_tracking_uri

    exp, sw, crash_t, kappa_v = _target(spec, experiment, sweep, crash, kappa)
    uri = tracking_uri or default_tracking_uri(workdir)
    try:
        fx, files = forensics(uri, exp, sw, out or workdir / "export" / (sw or exp), crash_t, kappa_v)
    except ValueError as e:
        _fail(str(e))
    typer.echo(f"{len(fx.runs)} finished runs from {uri} (experiment {exp!r}" + (f", sweep {sw!r})" if sw else ")"))
    for f in files:
        typer.echo(f"  {f}")
    for f in files:
        if f.suffix == ".md":
            typer.echo("\n" + f.read_text())


@app.command()
def trial(args: list[str] = typer.Argument(None, help="Options of python -m workloads.trial (see --help there).")):
    """Run one trial in this process, without Ray or MLflow (same as python -m workloads.trial)."""
    from workloads.trial import main

    raise typer.Exit(main(list(args or [])))


@app.command()
def doctor(workdir: Path = WORKDIR, tracking_uri: Optional[str] = TRACKING, address: Optional[str] = ADDRESS):
    """Print versions, devices, Ray cluster resources and the tracking URI; check the MLflow store."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    ok = True
    typer.echo(f"python      {platform.python_version()} ({sys.executable})")
    for pkg in ("ablate", "torch", "torchvision", "timm", "ray", "mlflow", "optuna", "pyarrow", "numpy"):
        try:
            typer.echo(f"{pkg:<11} {version(pkg)}")
        except PackageNotFoundError:
            typer.echo(f"{pkg:<11} MISSING")
            ok = False
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            typer.echo(f"device      cuda:{i} {torch.cuda.get_device_name(i)}")
    else:
        typer.echo(f"device      cpu ({os.cpu_count()} cores, torch threads {torch.get_num_threads()}); no CUDA")

    from orchestrator.sweep import init_ray
    from orchestrator.tracking import Tracker, default_tracking_uri

    workdir.mkdir(parents=True, exist_ok=True)
    try:
        import ray

        init_ray(address, workdir)
        res = ray.cluster_resources()
        typer.echo(f"ray         {len(ray.nodes())} node(s): CPU {res.get('CPU', 0):g}, GPU {res.get('GPU', 0):g}, "
                   f"memory {res.get('memory', 0) / 2**30:.1f} GiB")
        ray.shutdown()
    except Exception as e:  # noqa: BLE001 - report, don't crash
        typer.echo(f"ray         ERROR {e}")
        ok = False
    uri = tracking_uri or default_tracking_uri(workdir)
    typer.echo(f"tracking    {uri}")
    try:
        t = Tracker(uri, "ablate-doctor", retries=1)
        n = len(t.find_runs(""))
        typer.echo(f"mlflow      store reachable (experiment 'ablate-doctor', {n} runs)")
    except Exception as e:  # noqa: BLE001
        typer.echo(f"mlflow      ERROR store not reachable: {e}")
        ok = False
    typer.echo("all checks passed" if ok else "some checks FAILED")
    raise typer.Exit(0 if ok else 1)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

"""The ``ablate`` command line."""

from __future__ import annotations

import errno
import os
import platform
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperCommand


class _Command(TyperCommand):
    """Usage lines as click writes them (``SPEC``, ``[SPEC]``): typer >= 0.2x writes a required
    argument as ``{spec}``, which reads like a set or a shell brace expansion."""

    def collect_usage_pieces(self, ctx):
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in super().collect_usage_pieces(ctx)]


# rich_markup_mode=None: plain help (click's layout). Typer's Rich help in typer 0.2x shows a type
# column for every option, flags included (``--help <bool>``, ``--resume/--no-resume <bool>``).
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Distributed ablations of Transformer training stability (Ray Tune + Optuna + MLflow).")

WORKDIR = typer.Option("ablate_runs", "--workdir", metavar="DIR", envvar="ABLATE_WORKDIR",
                       help="Local state: MLflow SQLite store, Tune results, the Optuna store, the one-driver lock, "
                            "Ray log link (default: $ABLATE_WORKDIR, which cluster.yaml sets on the head, else "
                            "ablate_runs).")
TRACKING = typer.Option(None, "--tracking-uri", metavar="URI", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                                                      "else sqlite:///<workdir>/mlflow.db).")
ADDRESS = typer.Option(None, "--address", metavar="ADDRESS", help="Ray cluster address (default: $RAY_ADDRESS, else embedded Ray).")


MAX_TRIALS = typer.Option(None, "--max-trials", min=1, metavar="N",
                          help="Refuse a grid of more trials than this (default: the spec's max_trials, else 10000).")
ALLOW_INCOMPLETE = typer.Option(False, "--allow-incomplete",
                                help="Read a sweep that was interrupted or is still running (flagged).")


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _save_traceback() -> str:
    """The current exception's traceback in a temporary file (for a bug report); '' if it cannot."""
    import tempfile
    import traceback

    try:
        fd, path = tempfile.mkstemp(prefix="ablate-error-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write(traceback.format_exc())
        return path
    except OSError:
        return ""


_OS_HINTS = {errno.EACCES: "not writable by this user; choose another folder (--out / --workdir)",
             errno.EPERM: "not permitted; choose another folder (--out / --workdir)",
             errno.EROFS: "a read-only file system; choose another folder (--out / --workdir)",
             errno.ENOSPC: "the disk is full; free some space or choose another folder",
             errno.EDQUOT: "the disk quota is exhausted; free some space or choose another folder",
             errno.ENOTDIR: "a file stands where a folder is needed",
             errno.EEXIST: "a file stands where a folder is needed"}


# Where an exception comes from, by the top-level package of its type (the exception or its causes).
_TRACKING_MODULES = {"mlflow", "sqlalchemy", "sqlite3", "alembic", "requests", "urllib3", "http"}


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _from(e: BaseException, packages: set[str]) -> bool:
    return any(type(x).__module__.split(".")[0] in packages for x in _chain(e))


def one_line(e: BaseException, uri: str | None = None) -> str:
    """An error as one line that names the path, URI or component and says what to do. The
    tracking store is named only for an error that comes from it (MLflow, its HTTP client, SQLite),
    Ray for one that comes from Ray."""
    while type(e).__name__ == "TuneError" and (e.__cause__ or e.__context__):  # Tune's wrapper: the cause
        e = e.__cause__ or e.__context__
    if isinstance(e, OSError) and (e.filename or e.errno in _OS_HINTS):
        what = f"{e.filename}: " if e.filename else ""
        return f"{what}{e.strerror or e}; {_OS_HINTS.get(e.errno, 'check the path')}"
    text = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    if len(text) > 300:
        text = text[:300] + "..."
    low = str(e).lower()
    tracking = _from(e, _TRACKING_MODULES)
    if not tracking and _from(e, {"ray"}):
        return (f"Ray: {type(e).__name__}: {text}; Ray's log: <workdir>/ray_logs (embedded Ray), or the head "
                "node's /tmp/ray/session_latest/logs")
    where = f"MLflow store {uri}: " if uri and tracking else ""
    if any(k in low for k in ("readonly database", "read-only file system", "permission denied", "[errno 13]")):
        return f"{where}{text}; the store is not writable by this user: fix its permissions, or choose another --workdir / --tracking-uri"
    if any(k in low for k in ("disk is full", "no space left", "[errno 28]")):
        return f"{where}{text}; the disk is full: free some space, or choose another --workdir"
    if tracking and uri and uri.startswith(("http://", "https://")) and any(
            k in low for k in ("connection refused", "max retries exceeded", "failed to establish", "timed out")):
        return f"{where}{text}; the tracking server did not answer: start it, or pass another --tracking-uri"
    return f"{where}{type(e).__name__}: {text}"


@contextmanager
def _errors(uri: str | None = None):
    """Every way a command can fail, as one ``error:`` line and an exit code: 2 a bad spec or
    option, 1 a fault (store, disk, workdir, Ray's start), 130 / 143 interrupted (SIGINT / SIGTERM).
    Imports nothing heavy (no Ray, MLflow or torch): a refused spec returns at once."""
    import click

    from orchestrator.faults import Interrupted, RayStartError, WorkdirBusy, WorkdirError
    from orchestrator.spec import SpecError

    try:
        yield
    except (typer.Exit, typer.Abort, click.ClickException):
        raise
    except SpecError as e:
        _fail(str(e))
    except (Interrupted, KeyboardInterrupt) as e:
        from orchestrator.faults import RESUME_HINT

        sig = e.signame if isinstance(e, Interrupted) else "SIGINT"
        typer.secho(f"{sig}: {RESUME_HINT}", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(143 if sig == "SIGTERM" else 130)
    except (WorkdirBusy, WorkdirError, RayStartError) as e:
        _fail(str(e), 1)
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, the traceback in a file
        tracking = sys.modules.get("orchestrator.mlflow_store")  # a StoreError needs the module loaded
        if tracking is not None and isinstance(e, tracking.StoreError):
            _fail(str(e), 1)
        tb = _save_traceback()
        _fail(one_line(e, uri) + (f" (traceback: {tb})" if tb else ""), 1)


def _read_check(uri: str, experiment: str, sweep: Optional[str], allow_incomplete: bool) -> None:
    """Before a read-only command touches the store: it exists and answers (no retries), the
    experiment exists (nothing is created), and the sweep is complete (not interrupted, not still
    running, no trial cut off) unless ``--allow-incomplete``."""
    from mlflow.tracking import MlflowClient

    from orchestrator.mlflow_store import TAG_KIND, TAG_SWEEP, check_store

    check_store(uri, write=False)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        _fail(f"no experiment {experiment!r} in the MLflow store {uri}; run the sweep first, or check "
              "--workdir / --tracking-uri / --experiment", 1)
    where = f"tags.`{TAG_KIND}` = 'sweep'" + (f" and tags.`{TAG_SWEEP}` = '{sweep}'" if sweep else "")
    problems = []
    for parent in client.search_runs([exp.experiment_id], where, max_results=1000):
        name = parent.data.tags.get(TAG_SWEEP, "?")
        cut = client.search_runs([exp.experiment_id], f"tags.`{TAG_SWEEP}` = '{name}' and tags.`{TAG_KIND}` = "
                                 "'trial' and tags.status = 'running'", max_results=1000)
        if "interrupted" in parent.data.tags:
            state = f"was interrupted ({parent.data.tags['interrupted']})"
        elif parent.info.status == "RUNNING":
            state = "is still running (or its driver was killed)"
        elif parent.info.status != "FINISHED":
            state = f"ended {parent.info.status}"
        elif cut:
            state = "finished"
        else:
            continue
        total = parent.data.tags.get("trials_total")
        cut_s = f", {len(cut)} trial(s) cut off" if cut else ""
        total_s = f" ({total} trials planned)" if total else ""
        problems.append(f"sweep {name!r} {state}{cut_s}{total_s}")
    if problems:
        msg = "; ".join(problems)
        if not allow_incomplete:
            _fail(f"{msg}: its tables would miss trials. Re-run its ablate sweep / boundary command to finish it, "
                  "or pass --allow-incomplete to read what is there", 1)
        typer.secho(f"warning: {msg}; reading what is there (--allow-incomplete)", fg=typer.colors.YELLOW, err=True)


TIME_STEPS = typer.Option(0, "--time-steps", min=0, metavar="N",
                          help="Time N training steps of each trial shape here (after one warm-up step) and "
                               "estimate the trial-hours (default: 0, no timing).")


def _preflight(spec: Path, kind: str, max_trials: Optional[int], address: Optional[str], time_steps: int = 0,
               quiet: bool = False):
    """``orchestrator.preflight.plan``: the checks that need nothing written, and what would run."""
    from orchestrator.preflight import plan

    p = plan(spec, kind, max_trials=max_trials, address=address, time_steps_n=time_steps)
    for line in p.lines() if not quiet else [f"warning: {w}" for w in p.warnings]:
        typer.echo(line, err=line.startswith("warning:"))
    return p


@contextmanager
def _prestarted(modules: list[str], spec, workdir: Path, tracking_uri: Optional[str], address: Optional[str]):
    """The embedded Ray started while the driver's modules are imported and its store is made
    (``orchestrator.raystart.prestart``); the sweep or search inside takes it over, and shuts it
    down. One it did not take (a refusal before it got there) is shut down here."""
    from orchestrator.raystart import discard_prestarted, prestart

    prestart(modules, spec.experiment_name, workdir, tracking_uri, address)
    try:
        yield
    finally:
        discard_prestarted(workdir)


@contextmanager
def _workdir_lock(workdir: Path):
    """The one-driver lock of an existing workdir, taken before the spec's checks (a second driver
    is refused at once, not after them); let go of when the command ends (the session has released
    it already when the run got that far)."""
    from orchestrator.faults import lock_existing

    lock = lock_existing(workdir)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _job_workdir_warning(workdir: Path) -> None:
    """A driver run by ``ray job submit --working-dir .`` starts in the job's unpacked copy of that
    folder: a relative workdir there is not where the next submission of the same command looks, so
    a stopped search or sweep would start over. One warning line naming the fix."""
    path = workdir.resolve()
    if "working_dir_files" in path.parts and "runtime_resources" in path.parts:
        typer.secho(f"warning: --workdir {path} lies in this Ray job's unpacked working directory, which a "
                    "re-submitted job does not see (its state would not resume): set ABLATE_WORKDIR to a fixed "
                    "folder on the head (cluster.yaml does), or pass --workdir", fg=typer.colors.YELLOW, err=True)


def _ui_hint(tracking_uri: str, experiment: str) -> None:
    """Where to look at the experiment: its own page in the MLflow UI (``Tracker.experiment_url``)."""
    from orchestrator.mlflow_store import Tracker

    if tracking_uri.startswith("sqlite:"):
        url = Tracker(tracking_uri, experiment).experiment_url()
        typer.echo(f"  open the UI:  mlflow ui --backend-store-uri {tracking_uri}")
        typer.echo(f"  then open:    {url}")
    else:
        ui = tracking_uri if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
        typer.echo(f"  tracking server: {tracking_uri}; the experiment: "
                   f"{Tracker(tracking_uri, experiment).experiment_url(ui)}")


@app.command(cls=_Command)
def check(spec: Path = typer.Argument(..., metavar="SPEC", help="Sweep spec (YAML) to check."),
          boundary: Optional[bool] = typer.Option(None, "--boundary/--sweep",
                                                  help="Check it as a boundary search or as a grid sweep "
                                                       "(default: boundary when the spec has a boundary: block)."),
          max_trials: Optional[int] = MAX_TRIALS, time_steps: int = TIME_STEPS, address: Optional[str] = ADDRESS):
    """Check a spec without running it: validate it, count its grid (or its cells), check its data
    sources and the GPUs it asks for, and print what would run. Writes nothing, starts nothing; with
    --address it joins the cluster to print what is there now and what its autoscaler can add, and
    refuses a trial that no node type can hold.

    ablate sweep and ablate boundary run the same checks first. Exit 0: it would run; 2: refused."""
    with _errors():
        if boundary is None:
            from orchestrator.spec import read_spec_file

            raw = read_spec_file(spec)
            boundary = isinstance(raw, dict) and bool(raw.get("boundary"))
        p = _preflight(spec, "boundary" if boundary else "sweep", max_trials, address, time_steps)
        if not p.embedded:
            _cluster_check(p.spec, address)
    typer.echo("ok: nothing was run or written")


def _cluster_check(spec, address: Optional[str]) -> None:
    """``check --address``: join the cluster, print what is there now and what its autoscaler may add
    (``orchestrator.capacity``), refuse a trial no node type can ever hold; then leave it."""
    import ray

    from orchestrator.capacity import read_capacity
    from orchestrator.spec import SpecError
    from orchestrator.sweep import init_ray

    init_ray(address)
    try:
        cap = read_capacity()
    finally:
        ray.shutdown()
    for line in cap.lines():
        typer.echo(line)
    msg = cap.refusal(spec.resources.cpus, spec.resources.gpus)
    if msg:
        raise SpecError(msg)


@app.command(cls=_Command)
def sweep(spec: Path = typer.Argument(..., metavar="SPEC", help="Sweep spec (YAML), e.g. search_spaces/smoke.yaml."),
          resume: Optional[bool] = typer.Option(None, "--resume/--no-resume",
                                                help="Continue an interrupted sweep of the same name "
                                                     "(default: continue if one exists)."),
          max_trials: Optional[int] = MAX_TRIALS,
          workdir: Path = WORKDIR, tracking_uri: Optional[str] = TRACKING, address: Optional[str] = ADDRESS):
    """Run every trial of a spec's grid on Ray Tune, recorded in MLflow.

    The checks of ablate check come first: a refused spec leaves nothing behind.
    Ctrl-C (or SIGTERM) stops it cleanly: exit 130 (143), and the same command resumes it."""
    with _errors(tracking_uri), _workdir_lock(workdir):
        p = _preflight(spec, "sweep", max_trials, address, quiet=True)
        _job_workdir_warning(workdir)
        with _prestarted(["orchestrator.sweep"], p.spec, workdir, tracking_uri, address):
            from orchestrator.sweep import run_sweep

            s = p.spec
            out = run_sweep(s, p.raw, workdir=workdir, tracking_uri=tracking_uri, resume=resume, address=address)
    c = out.counts
    typer.echo(f"\nsweep {out.name}: {out.trials} trials: {c.get('stable', 0)} stable, "
               f"{c.get('collapsed', 0)} collapsed, {c.get('diverged', 0)} diverged, {c.get('failed', 0)} failed "
               f"in {out.wall_time:.0f}s ({s.crash_criterion}; degraded runs are classed by ablate export)")
    typer.echo(f"MLflow: experiment {out.experiment!r}, parent run {out.parent_run_id}")
    with _errors(out.tracking_uri):
        _ui_hint(out.tracking_uri, out.experiment)
    for err in dict.fromkeys(out.errors[:20]).keys():  # distinct errors of failed trials
        typer.echo(f"  failed: {err}")
    if out.errors:
        typer.echo("  (each failed trial's traceback: traceback.txt in its MLflow run)")
    if out.all_failed:
        _fail(f"every trial failed ({out.trials}); the first error: {out.errors[0] if out.errors else 'unknown'} "
              "(tracebacks: each trial run's traceback.txt in MLflow)", 1)


@app.command(cls=_Command)
def boundary(spec: Path = typer.Argument(..., metavar="SPEC", help="Spec with a boundary: block, e.g. search_spaces/boundary_smoke.yaml."),
             max_trials: Optional[int] = MAX_TRIALS,
             workdir: Path = WORKDIR, tracking_uri: Optional[str] = TRACKING, address: Optional[str] = ADDRESS):
    """Find each cell's crash boundary, LR50 with its interval (Psi-method Optuna sampler on Ray Tune; resumable).

    The checks of ablate check come first: a refused spec leaves nothing behind.
    Ctrl-C (or SIGTERM) stops it cleanly: exit 130 (143), and the same command resumes it."""
    with _errors(tracking_uri), _workdir_lock(workdir):
        p = _preflight(spec, "boundary", max_trials, address, quiet=True)
        _job_workdir_warning(workdir)
        with _prestarted(["orchestrator.sweep", "orchestrator.boundary"], p.spec, workdir, tracking_uri, address):
            from orchestrator.boundary import run_boundary

            out = run_boundary(p.spec, p.raw, workdir=workdir, tracking_uri=tracking_uri, address=address)
    method = out.cells[0]["method"] if out.cells else "psi"
    typer.echo(f"\nboundary {out.name}: {len(out.cells)} cells in {out.wall_time:.0f}s, method {method}"
               + (" (a one-seed look)" if method == "bisect" else "")
               + f" (a dense grid at 2^(1/4) over the range: {out.dense_grid_trials} trials a cell per seed)")
    fmt = lambda v: f"{v:.4g}" if v else "-"  # noqa: E731
    typer.echo(f"{'cell':<36} {'LR50 [90 % interval]':>26} {'band lr10-lr90':>18} {'trials':>6} {'ref gain':>8}  stopped")
    for c in out.cells:
        notes = [c["stop_reason"] + ("" if c["converged"] else " (not converged)")]
        if c.get("censored"):
            notes.append(f"censored: LR50 {c['censored']} the range")
        if c["method"] == "bisect" and c["non_monotonic"]:
            notes.append("non_monotonic")
        if c["method"] == "bisect" and (c["stable_end_seeds"] > 1 or c["crash_end_seeds"] > 1):
            notes.append(f"seeds crashed: {c['stable_end_crashed']}/{c['stable_end_seeds']} at stable end, "
                         f"{c['crash_end_crashed']}/{c['crash_end_seeds']} at crash end")
        if not c["reference_learned"]:
            notes.append("its reference learned nothing: standard-error margin only")
        if c.get("censored"):  # no LR50: the one-sided bound at the interval's level
            interval = ("> " if c["censored"] == "above" else "< ") + fmt(c["lr50_bound"])
            band = "-"
        else:
            interval = f"{fmt(c['lr50'])} [{fmt(c['lr50_low'])}, {fmt(c['lr50_high'])}]"
            band = f"{fmt(c['lr10'])}-{fmt(c['lr90'])}"
        ref = f"{c['reference_gain']:.3f}" if c["reference_gain"] is not None else "-"
        typer.echo(f"{c['cell']:<36} {interval:>26} {band:>18} {c['n_trials']:>6} {ref:>8}  " + ", ".join(notes))
    if out.cells:
        from workloads.outcome import criterion_label

        c0 = out.cells[0]
        dead = sum(not c["reference_learned"] for c in out.cells)
        typer.echo(f"classes: {criterion_label(c0['crash_criterion'], p.spec.degraded_kappa, no_reference=dead)}; "
                   f"each cell's reference: {c0['reference_seeds']} trials at lr {c0['reference_lr']:.4g} "
                   "(ref gain: their mean gain, nats)")
    typer.echo(f"MLflow: experiment {out.experiment!r}, parent run {out.parent_run_id}; tables: ablate export")
    with _errors(out.tracking_uri):
        _ui_hint(out.tracking_uri, out.experiment)


@dataclass
class _Read:
    """What a read-only command (export, report, forensics) works on."""

    uri: str
    experiment: str
    sweep: Optional[str]
    out: Path
    crash: tuple[str, ...]
    kappa: float


def _target(spec: Optional[Path], experiment: Optional[str], sweep: Optional[str], out: Optional[Path],
            crash: Optional[str], kappa: Optional[float], workdir: Path, tracking_uri: Optional[str]) -> _Read:
    """Experiment, sweep and crash criterion from the spec, overridden by the options; the store
    and the output folder (default ``<workdir>/export/<sweep or experiment>``)."""
    from orchestrator.mlflow_store import default_tracking_uri
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
    return _Read(tracking_uri or default_tracking_uri(workdir), experiment, sweep,
                 out or workdir / "export" / (sweep or experiment), crash_t, kappa_v)


@contextmanager
def _reading(t: _Read, allow_incomplete: bool):
    """Errors of a read-only command as one line (``_errors``), after ``_read_check`` (the store
    answers, the experiment exists, the sweep is complete unless ``allow_incomplete``). A
    ValueError from the work (e.g. no trial runs) is a one-line error too."""
    with _errors(t.uri):
        _read_check(t.uri, t.experiment, t.sweep, allow_incomplete)
        try:
            yield
        except ValueError as e:
            _fail(str(e))


READ_SPEC = typer.Argument(None, metavar="SPEC", help="The sweep's spec (names its experiment and sweep).")
EXPERIMENT = typer.Option(None, help="MLflow experiment (instead of SPEC).")
SWEEP = typer.Option(None, help="Sweep name (default: all sweeps of the experiment).")
OUT = typer.Option(None, help="Output folder (default: <workdir>/export/<sweep>).")
CRASH = typer.Option(None, "--crash", help="Outcome classes that count as a crash, comma-separated: any of "
                                           "diverged, collapsed, degraded (default: the spec's crash:, else "
                                           "diverged,collapsed).")
KAPPA = typer.Option(None, "--kappa", help="Degraded: (g_R - g) / g_R > kappa, g the gain over the marginal baseline, g_R "
                                           "the cell's reference gain (default: the spec's degraded_kappa, else 0.5).")
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


@app.command("export", cls=_Command)
def export_cmd(spec: Optional[Path] = READ_SPEC, experiment: Optional[str] = EXPERIMENT,
               sweep: Optional[str] = SWEEP, out: Optional[Path] = OUT,
               crash: Optional[str] = CRASH, kappa: Optional[float] = KAPPA,
               sensitivity_range: Optional[str] = SENS, allow_incomplete: bool = ALLOW_INCOMPLETE,
               workdir: Path = WORKDIR, tracking_uri: Optional[str] = TRACKING):
    """Read the trials back from MLflow: Parquet/CSV of every trial, ablation tables (Markdown, LaTeX).

    Refuses a sweep that was interrupted or is still running, unless --allow-incomplete."""
    from orchestrator.report import export

    t = _target(spec, experiment, sweep, out, crash, kappa, workdir, tracking_uri)
    with _reading(t, allow_incomplete):
        res = export(t.uri, t.experiment, t.sweep, t.out, t.crash, t.kappa, _range(sensitivity_range))
    typer.echo(f"{res.table.num_rows} trials from {t.uri} (experiment {t.experiment!r}"
               + (f", sweep {t.sweep!r})" if t.sweep else ")"))
    for f in res.files:
        typer.echo(f"  {f}")
    for f in res.files:
        if f.name.startswith("max_stable_lr_warmup") and f.suffix == ".md":
            typer.echo("\n" + f.read_text())


@app.command(cls=_Command)
def report(spec: Optional[Path] = READ_SPEC, experiment: Optional[str] = EXPERIMENT,
           sweep: Optional[str] = SWEEP, out: Optional[Path] = OUT,
           crash: Optional[str] = CRASH, kappa: Optional[float] = KAPPA,
           sensitivity_range: Optional[str] = SENS, allow_incomplete: bool = ALLOW_INCOMPLETE,
           workdir: Path = WORKDIR, tracking_uri: Optional[str] = TRACKING):
    """Plots (PNG and PDF): final loss vs LR (classes marked, l_0 and the baseline drawn), the max
    stable LR, and the forensic figures (see ablate forensics).

    Refuses a sweep that was interrupted or is still running, unless --allow-incomplete."""
    from orchestrator.report import report as make_report

    t = _target(spec, experiment, sweep, out, crash, kappa, workdir, tracking_uri)
    with _reading(t, allow_incomplete):
        files = make_report(t.uri, t.experiment, t.sweep, t.out, t.crash, t.kappa, _range(sensitivity_range))
    for f in files:
        typer.echo(f"  {f}")


@app.command("forensics", cls=_Command)
def forensics_cmd(spec: Optional[Path] = READ_SPEC, experiment: Optional[str] = EXPERIMENT,
                  sweep: Optional[str] = SWEEP, out: Optional[Path] = OUT,
                  crash: Optional[str] = CRASH, kappa: Optional[float] = KAPPA,
                  allow_incomplete: bool = ALLOW_INCOMPLETE,
                  workdir: Path = WORKDIR, tracking_uri: Optional[str] = TRACKING):
    """Which stability probe warns of a crash first, how far ahead and how reliably (read from MLflow).

    Refuses a sweep that was interrupted or is still running, unless --allow-incomplete."""
    from orchestrator.forensics import forensics

    t = _target(spec, experiment, sweep, out, crash, kappa, workdir, tracking_uri)
    with _reading(t, allow_incomplete):
        fx, files = forensics(t.uri, t.experiment, t.sweep, t.out, t.crash, t.kappa)
    typer.echo(f"{len(fx.runs)} finished runs from {t.uri} (experiment {t.experiment!r}"
               + (f", sweep {t.sweep!r})" if t.sweep else ")"))
    for f in files:
        typer.echo(f"  {f}")
    for f in files:
        if f.suffix == ".md":
            typer.echo("\n" + f.read_text())


@app.command(cls=_Command)
def trial(args: list[str] = typer.Argument(None, metavar="TRIAL_OPTIONS", help="Options of python -m workloads.trial (see --help there)."),
          from_run: Optional[str] = typer.Option(None, "--from-run", metavar="RUN_ID",
                                                 help="Re-run a recorded trial from its MLflow record (its config, "
                                                      "thread count and device) and compare its final loss with "
                                                      "the recorded one, bit for bit."),
          quiet: bool = typer.Option(False, "--quiet", help="Print only the final JSON."),
          workdir: Path = WORKDIR, tracking_uri: Optional[str] = TRACKING):
    """Run one trial in this process, without Ray or MLflow (same as python -m workloads.trial).

    With --from-run RUN_ID: the trial a sweep or search recorded, run again here. Exit 0 when its
    final loss equals the recorded one bit for bit, 1 when it differs (the line says what differs:
    threads, device, CPU), 2 when there is no such finished trial run."""
    from workloads.cli import main

    if from_run is None:
        raise typer.Exit(main(list(args or []) + (["--quiet"] if quiet else [])))
    if args:
        _fail(f"--from-run: give no trial options with it ({' '.join(args)}): it re-runs the trial as recorded")
    from orchestrator.mlflow_store import default_tracking_uri

    uri = tracking_uri or default_tracking_uri(workdir)
    with _errors(uri):
        from orchestrator.mlflow_store import check_store
        from orchestrator.runs import recorded_trial

        check_store(uri, write=False)
        try:
            rec = recorded_trial(uri, from_run)
        except ValueError as e:
            _fail(str(e))
    raise typer.Exit(_rerun(rec, from_run, quiet))


def _rerun(rec: dict, run_id: str, quiet: bool) -> int:
    """``ablate trial --from-run``: run the recorded config here, compare the final loss."""
    import math

    import torch

    from workloads.cli import check, run_and_print
    from workloads.config import TrialConfig
    from workloads.trainer import host_cpu

    config = dict(rec["config"])
    if rec["threads"] and not config.get("threads"):
        config["threads"] = rec["threads"]  # a run recorded before the config carried the threads it used
    if rec["device"] == "cpu":
        config["device"] = "cpu"  # where it ran, even on a machine with a GPU
    cfg = TrialConfig(**config)
    here = {"threads": cfg.threads or torch.get_num_threads(), "cpu": host_cpu()}
    notes = []
    if rec["threads"] is None:
        notes.append("the run did not record its thread count")
    elif rec["threads"] != here["threads"]:
        notes.append(f"threads {rec['threads']} recorded, {here['threads']} here")
    if rec["cpu"] and rec["cpu"] != here["cpu"]:
        notes.append(f"recorded on {rec['cpu']}, here {here['cpu']}")
    typer.echo(f"re-running trial run {run_id} ({rec['sweep']}: {rec['label']}), config from its {rec['source']}, "
               f"threads {cfg.threads or 'torch default'}, device {cfg.device}"
               + (f"; note: {'; '.join(notes)}" if notes else ""), err=True)
    code = check(cfg)
    if code:
        return code
    res = run_and_print(cfg, quiet)
    want, got = rec["final_loss"], res.final_loss
    same = got == want or (math.isinf(got) and math.isinf(want))
    if same:
        typer.echo(f"reproduced: final loss {got!r} equals the recorded {want!r} bit for bit", err=True)
        return 0
    typer.secho(f"differs: final loss {got!r} here, {want!r} recorded (x{got / want:.6g})"
                + (f"; {'; '.join(notes)}" if notes else "; same threads, device and CPU model as recorded"),
                fg=typer.colors.YELLOW, err=True)
    return 1


@app.command(cls=_Command)
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

    from orchestrator.faults import WorkdirError, prepare_workdir
    from orchestrator.mlflow_store import StoreError, check_store, default_tracking_uri, sqlite_path
    from orchestrator.sweep import init_ray

    try:
        workdir = prepare_workdir(workdir)
    except WorkdirError as e:
        _fail(str(e), 1)
    try:
        import ray

        init_ray(address, workdir, preload=False)
        res = ray.cluster_resources()
        typer.echo(f"ray         {len(ray.nodes())} node(s): CPU {res.get('CPU', 0):g}, GPU {res.get('GPU', 0):g}, "
                   f"memory {res.get('memory', 0) / 2**30:.1f} GiB")
        ray.shutdown()
    except Exception as e:  # noqa: BLE001 - report, don't crash
        typer.echo(f"ray         ERROR {e}")
        ok = False
    uri = tracking_uri or default_tracking_uri(workdir)
    typer.echo(f"tracking    {uri}")
    # Read-only: a health check leaves no data behind (no experiment, no run; a SQLite store that
    # does not exist yet is not created, only its folder checked).
    try:
        if (db := sqlite_path(uri)) is not None and not db.exists():
            check_store(uri, write=True)
            typer.echo("mlflow      no store yet; the first sweep creates it (folder writable)")
        else:
            check_store(uri, write=False)
            from mlflow.tracking import MlflowClient

            exps = MlflowClient(uri).search_experiments(max_results=1000)
            typer.echo(f"mlflow      store reachable ({len(exps)} experiments)")
            check_store(uri, write=True)
    except StoreError as e:
        typer.echo(f"mlflow      ERROR {e}")
        ok = False
    except Exception as e:  # noqa: BLE001
        typer.echo(f"mlflow      ERROR store not reachable: {one_line(e, uri)}")
        ok = False
    typer.echo("all checks passed" if ok else "some checks FAILED")
    raise typer.Exit(0 if ok else 1)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

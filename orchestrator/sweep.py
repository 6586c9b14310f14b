"""Ray Tune sweeps: one ``tune.Tuner`` per spec over a plain function trainable.

The trainable calls ``workloads.trial.run`` and forwards its reporter to ``tune.report``; the
driver's :class:`orchestrator.tracking.TrackingCallback` writes everything to MLflow. A diverged
trial is a finished trial (``diverged`` in its summary); a trial that raises is retried
``max_failures`` times by Ray, then recorded ``failed`` with its traceback, and the sweep goes on.
Re-running a sweep whose Tune state exists (or ``--resume``) continues it with ``Tuner.restore``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.faults import Interrupted, RayStartError, StopSignals, WorkdirLock, prepare_workdir
from orchestrator.mlflow_store import Tracker, check_store, default_tracking_uri
from orchestrator.preflight import check_data, check_gpus, embedded_run
from orchestrator.quiet import FoldedWarnings
from orchestrator.spec import SpecError, SweepSpec
from orchestrator.tracking import TrackingCallback
from orchestrator.trainable import train_trial

log = logging.getLogger("ablate")

# Tune's own per-trial JSON/CSV/TensorBoard loggers: MLflow is the record, so they are off.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # experiment state saved often: cheap resume
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


@dataclass
class SweepOutcome:
    name: str
    experiment: str
    tracking_uri: str
    parent_run_id: str
    storage: str
    trials: int
    counts: dict[str, int] = field(default_factory=dict)
    wall_time: float = 0.0
    resumed: bool = False
    errors: list[str] = field(default_factory=list)
    """The ``error`` tag of each failed trial (its exception's last line)."""

    @property
    def all_failed(self) -> bool:
        return self.trials > 0 and self.counts.get("failed", 0) >= self.trials


# Ray's start on a loaded machine can time out (Ray waits 30 s for its node, a limit inside Ray):
# the start is retried, ABLATE_RAY_START_ATTEMPTS times in all, waiting ABLATE_RAY_START_BACKOFF
# seconds before the second attempt and twice as long before each next one.
RAY_START_ATTEMPTS = "ABLATE_RAY_START_ATTEMPTS"
RAY_START_BACKOFF = "ABLATE_RAY_START_BACKOFF"


def _env_number(name: str, default: float, cast=float):
    try:
        v = cast(os.environ.get(name, default))
    except ValueError:
        raise SpecError(f"{name}: {os.environ[name]!r} is not a number") from None
    if v < (1 if cast is int else 0):
        raise SpecError(f"{name}: {v} is too small")
    return v


def init_ray(address: str | None = None, workdir: Path | None = None, attempts: int | None = None,
             backoff: float | None = None) -> bool:
    """Connect to a cluster (``address``/``RAY_ADDRESS``) or start Ray embedded on this machine.
    True when this call started Ray (the caller then shuts it down).

    Embedded Ray is always a new instance of its own (``address="local"``): ``ray.init()`` without
    an address would attach to the cluster last started on this machine (``ray start --head``, a
    ``ray.cluster_utils.Cluster``, found through ``<RAY_TMPDIR or /tmp>/ray/ray_current_cluster``)
    and run the sweep's trials there, beside whatever else uses it.

    A start (or join) that fails is retried ``attempts`` times in all (default
    $ABLATE_RAY_START_ATTEMPTS, else 3) with a doubling wait from ``backoff`` seconds (default
    $ABLATE_RAY_START_BACKOFF, else 5); then :class:`RayStartError` names Ray, the cause and its log.
    An authentication error or a malformed address is not retried."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    attempts = attempts if attempts is not None else _env_number(RAY_START_ATTEMPTS, 3, int)
    backoff = backoff if backoff is not None else _env_number(RAY_START_BACKOFF, 5.0)
    kwargs = dict(log_to_driver=False, logging_level=logging.WARNING, configure_logging=True)
    if not address:
        _embedded_token_auth()
    for attempt in range(1, attempts + 1):
        before = _children()
        try:
            if address:
                ray.init(address=address, **kwargs)  # the cluster's own authentication applies, untouched
            else:
                ray.init(address="local", include_dashboard=False, **kwargs)
            break
        except Exception as e:  # noqa: BLE001 - Ray raises Exception, RuntimeError, ConnectionError, ...
            try:
                ray.shutdown()
            except Exception:  # noqa: BLE001
                pass
            _kill_new_children(before)  # a half-started node's GCS / raylet, which ray.shutdown does not know
            if attempt >= attempts or not _retryable(e):
                raise RayStartError(_ray_start_message(e, address, attempt, attempts)) from e
            delay = backoff * 2 ** (attempt - 1)
            log.warning("Ray did not start (%s); attempt %d of %d in %.0f s", _first_line(e), attempt + 1,
                        attempts, delay)
            time.sleep(delay)
    if workdir is not None:  # Ray's own logs, reachable from the workdir
        try:
            session = Path(ray._private.worker._global_node.get_session_dir_path())
            link = workdir / "ray_logs"
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(session / "logs")
        except (AttributeError, OSError):
            pass
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    # A failed trial's traceback (every attempt) goes to its MLflow run (traceback.txt) and its last
    # line to the summary; Tune's own copy on the terminal is hundreds of lines per trial.
    logging.getLogger("ray.tune.execution.tune_controller").setLevel(logging.CRITICAL)
    return True


def _children() -> set[int]:
    import psutil

    return {c.pid for c in psutil.Process().children(recursive=True)}


def _kill_new_children(before: set[int]) -> None:
    """Kill this process's children that a failed ``ray.init`` started (those not in ``before``)."""
    import psutil

    new = [c for c in psutil.Process().children(recursive=True) if c.pid not in before]
    for c in new:
        try:
            c.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(new, timeout=5)


def _first_line(e: BaseException) -> str:
    text = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return text[:300] + ("..." if len(text) > 300 else "")


def _retryable(e: BaseException) -> bool:
    try:
        from ray.exceptions import AuthenticationError
    except ImportError:  # pragma: no cover - older Ray
        AuthenticationError = ()  # noqa: N806
    return not isinstance(e, (ValueError, TypeError, AuthenticationError))


def _ray_start_message(e: BaseException, address: str | None, attempt: int, attempts: int) -> str:
    import re
    import tempfile

    tries = f"after {attempt} attempt{'s' if attempt > 1 else ''}"
    if address:
        return (f"Ray: could not join the cluster at {address} {tries}: {_first_line(e)}; Ray's log is on the "
                "cluster's head node (/tmp/ray/session_latest/logs); check the address and that the cluster is up "
                "(ray status)")
    m = re.search(r"(\S*/session_[0-9][^/\s]*)", str(e))
    logs = (f"{m.group(1)}/logs" if m else
            str(Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray" / "session_latest" / "logs"))
    hint = ("a loaded machine can take longer: wait and re-run, or set "
            f"{RAY_START_ATTEMPTS} / {RAY_START_BACKOFF} (now {attempts} attempts)")
    return f"Ray did not start on this machine {tries}: {_first_line(e)}; Ray's log: {logs}; {hint}"


def _embedded_token_auth() -> None:
    """Token authentication on, explicitly, for the Ray that ``init_ray`` starts on this machine,
    and Ray's token file readable by this user only.

    Ray (2.60 here) turns token authentication on by default for a new local cluster and then logs
    "Token authentication is enabled for this Ray cluster" on every start; it logs nothing when
    ``RAY_AUTH_MODE`` is set. The embedded cluster's GCS and raylet listen on this machine's network
    address, not only on loopback, so anyone who can reach it could run code in it: authentication
    stays on, and ablate says so once, here, instead of Ray on every command. A ``RAY_AUTH_MODE``
    set by the user wins. On a cluster (``--address``) nothing is changed: the cluster's own setting
    applies. Ray writes a missing token file (``~/.ray/auth_token``, or $RAY_AUTH_TOKEN_PATH) with
    the default umask (0644 here): ablate creates it first, 0600 (:func:`private_token_file`).
    """
    if "RAY_AUTH_MODE" not in os.environ:
        try:  # a Ray without token authentication has neither; then there is nothing to set
            from ray._private.authentication import authentication_token_setup  # noqa: F401
            from ray._raylet import Config
        except ImportError:
            return
        os.environ["RAY_AUTH_MODE"] = "token"  # inherited by the raylet, GCS and workers
        Config.initialize("")  # the driver's cached Ray config re-reads it (what Ray does when it enables it)
    if os.environ["RAY_AUTH_MODE"].lower() == "token":
        private_token_file()


def private_token_file() -> Path | None:
    """Ray's token file for this user (``$RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``) made
    mode 0600: created with Ray's own generator when missing, its group/other bits removed when this
    user owns it. None when the token comes from ``$RAY_AUTH_TOKEN`` (no file)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    try:
        st = path.stat()
    except FileNotFoundError:
        from ray._private.authentication.authentication_token_generator import generate_new_authentication_token
        from ray._raylet import AuthenticationTokenLoader

        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it meanwhile
            return private_token_file()
        with os.fdopen(fd, "w") as f:
            f.write(generate_new_authentication_token())
        AuthenticationTokenLoader.instance().reset_cache()
        return path
    if st.st_mode & 0o077 and st.st_uid == os.getuid():
        os.chmod(path, 0o600)
        log.info("Ray's token file %s: made readable by its owner only (0600)", path)
    return path


def storage_root(spec: SweepSpec, workdir: Path) -> str:
    """Tune's storage: the spec's storage_path, else $ABLATE_STORAGE_PATH (set by cluster.yaml),
    else <workdir>/ray_results. A local path is made absolute; a URI (s3://...) is kept."""
    root = spec.storage_path or os.environ.get("ABLATE_STORAGE_PATH")
    if not root:
        return str(workdir / "ray_results")
    return root if "://" in root else str(Path(root).resolve())


def check_resources(spec: SweepSpec):
    """Fail before anything runs when no node of the cluster can ever hold a trial: neither a node
    present nor a node type its autoscaler may add (``orchestrator.capacity``; a fresh autoscaling
    cluster has no GPU until a trial asks for one). Returns the cluster's ``Capacity``."""
    from orchestrator.capacity import read_capacity

    cap = read_capacity()
    msg = cap.refusal(spec.resources.cpus, spec.resources.gpus)
    if msg:
        raise SpecError(msg)
    return cap


@dataclass
class Session:
    """What a sweep or a boundary search sets up before Tune runs: the workdir's lock, signal
    handling, Ray, the MLflow parent run. ``fit`` runs the Tuner; ``finish`` marks the parent run
    finished and lets go of the rest. An interrupted ``fit`` marks the parent run KILLED (tag
    ``interrupted``) and the runs of unfinished trials KILLED, then raises ``Interrupted``."""

    workdir: Path
    tracking_uri: str
    storage: str
    tracker: Tracker
    parent: str
    sweep: str = ""
    lock: WorkdirLock | None = None
    signals: StopSignals | None = None
    started_ray: bool = False
    capacity: Any = None
    """The cluster's ``orchestrator.capacity.Capacity``: the nodes there and the types it may add."""

    def autoscaled_need(self, spec: SweepSpec) -> dict[str, float] | None:
        """A trial's resources, when the cluster has an autoscaler whose nodes trials may wait for
        (the progress line then says so); None otherwise."""
        if self.capacity is None or not self.capacity.types:
            return None
        return {"CPU": spec.resources.cpus, "GPU": spec.resources.gpus}

    def fit(self, tuner):
        try:
            with FoldedWarnings():  # Tune's bottleneck lines and library warnings: one line at the end
                return self.signals.fit(tuner) if self.signals else tuner.fit()
        except (Interrupted, KeyboardInterrupt) as e:
            self.interrupted(e)

    def interrupted(self, e: BaseException):
        """Mark the runs (``mark_interrupted``), let go of the session, raise ``Interrupted``."""
        name = e.signame if isinstance(e, Interrupted) else (str(e.args[0]) if e.args else "SIGINT")
        try:
            self.mark_interrupted(name)
        finally:
            self.close()
        raise Interrupted(name) from None

    def mark_interrupted(self, signame: str) -> None:
        """The parent run KILLED with tag ``interrupted``; trial runs cut off mid-run KILLED too (a
        resumed sweep replaces them). Export and report refuse such a sweep."""
        for r in self.tracker.trial_runs(self.sweep, "tags.status = 'running'"):
            if r.info.status == "RUNNING":
                self.tracker.set_tags(r.info.run_id, {"interrupted": signame})
                self.tracker.finish(r.info.run_id, "KILLED")
        self.tracker.set_tags(self.parent, {"interrupted": f"{signame} at {time.strftime('%Y-%m-%d %H:%M:%S')}"})
        self.tracker.finish(self.parent, "KILLED")

    def finish(self) -> None:
        """The parent run FINISHED (an earlier interruption's tag removed); the lock released."""
        try:
            if "interrupted" in self.tracker._call(self.tracker.client.get_run, self.parent).data.tags:
                self.tracker._call(self.tracker.client.delete_tag, self.parent, "interrupted")
            self.tracker.finish(self.parent)
        finally:
            self.close()

    def close(self) -> None:
        if self.started_ray:
            import ray

            ray.shutdown()  # embedded Ray's raylet, GCS and agents go with the driver
            self.started_ray = False
        if self.signals is not None:
            self.signals.__exit__(None, None, None)
            self.signals = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def open_session(spec: SweepSpec, spec_raw: dict | None, workdir: str | Path, tracking_uri: str | None,
                 address: str | None, precheck=None) -> Session:
    """Everything that can refuse the run is checked before the store is touched: first what needs
    nothing written (the data sources, the GPUs of an embedded run: ``orchestrator.preflight``, which
    ``ablate sweep`` / ``boundary`` ran already), then the workdir (usable, not locked by another
    driver), the store (reachable, writable), ``precheck(storage)``, the cluster's resources; only
    then is the parent run opened."""
    embedded = embedded_run(address)
    check_data(spec, spec.trials(), embedded)  # before the workdir exists: a refusal leaves nothing
    check_gpus(spec, embedded)
    signals = StopSignals().__enter__()
    lock = None
    started_ray = False
    try:
        workdir = prepare_workdir(workdir)
        lock = WorkdirLock(workdir).acquire()
        tracking_uri = tracking_uri or default_tracking_uri(workdir)
        check_store(tracking_uri, write=True)
        storage = storage_root(spec, workdir)
        if precheck is not None:
            precheck(storage)
        os.environ["ABLATE_TRACKING_URI"] = tracking_uri
        started_ray = init_ray(address, workdir)
        signals.install()  # ray.init took SIGTERM
        capacity = check_resources(spec)
        spec_raw = spec_raw if spec_raw is not None else spec.model_dump(mode="json")
        tracker = Tracker(tracking_uri, spec.experiment_name)
        parent = tracker.sweep_run(spec.name, spec_raw, yaml.safe_dump(spec_raw, sort_keys=False))
        tracker.set_tags(parent, {"crash_criterion": spec.crash_criterion})
    except BaseException:
        Session(Path(workdir), "", "", None, "", lock=lock, signals=signals, started_ray=started_ray).close()
        raise
    return Session(workdir, tracking_uri, storage, tracker, parent, spec.name, lock, signals, started_ray, capacity)


def run_config(spec: SweepSpec, name: str, storage: str, callback: TrackingCallback):
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    return tune.RunConfig(name=name, storage_path=storage, verbose=0, callbacks=[callback, JsonLoggerCallback()],
                          failure_config=tune.FailureConfig(max_failures=spec.max_failures))


def trainable_for(spec: SweepSpec, trial_fn=None):
    """The Tune trainable of the spec's trials: ``trial_fn`` (default :func:`train_trial`; a
    benchmark's stand-in trial) with the spec's resources."""
    from ray import tune

    return tune.with_resources(trial_fn or train_trial, {"cpu": spec.resources.cpus, "gpu": spec.resources.gpus})


def run_sweep(spec: SweepSpec, spec_raw: dict | None = None, *, workdir: str | Path = "ablate_runs",
              tracking_uri: str | None = None, resume: bool | None = None, address: str | None = None,
              progress: bool = True, trial_fn=None) -> SweepOutcome:
    """Run (or continue) the sweep of ``spec``: every trial of its grid, recorded in MLflow.

    ``resume``: None continues an existing sweep of the same name in the same storage and starts a
    new one otherwise; True requires one to continue; False refuses to touch an existing one.
    ``trial_fn``: the function each trial runs (default ``orchestrator.trainable.train_trial``;
    ``benchmarks/cluster_scaling.py`` passes a stand-in that returns at once).
    """
    from ray import tune

    t0 = time.monotonic()
    trials = spec.trials()
    can_restore = False

    def precheck(storage: str) -> None:  # before the store is touched: a refusal writes nothing
        nonlocal can_restore
        can_restore = tune.Tuner.can_restore(f"{storage.rstrip('/')}/{spec.name}")
        if resume and not can_restore:
            raise SpecError(f"--resume: no sweep {spec.name!r} to continue under {storage}")
        if resume is False and can_restore:
            raise SpecError(f"name: a sweep {spec.name!r} already exists under {storage}; "
                            "re-run with --resume to continue it, or choose another name or workdir")

    ses = open_session(spec, spec_raw, workdir, tracking_uri, address, precheck=precheck)
    try:
        out = _run(spec, ses, trials, can_restore, progress, trial_fn)
    except Interrupted:
        raise  # Session.fit marked the runs and closed the session
    except KeyboardInterrupt as e:  # a signal outside fit (setting up, summing up)
        ses.interrupted(e)
    except BaseException:
        ses.close()
        raise
    out.wall_time = time.monotonic() - t0
    return out


def _run(spec: SweepSpec, ses: Session, trials: list, can_restore: bool, progress: bool,
         trial_fn=None) -> SweepOutcome:
    from ray import tune

    exp_dir = f"{ses.storage.rstrip('/')}/{spec.name}"
    callback = TrackingCallback(ses.tracking_uri, spec.experiment_name, spec.name, ses.parent, len(trials),
                                progress=progress, crash=spec.crash, crash_criterion=spec.crash_criterion,
                                need=ses.autoscaled_need(spec))
    if ses.signals is not None:  # after a stop, Tune marks the running trials done: no progress line
        ses.signals.on_stop.append(lambda: callback.settings.update(progress=False))
    trainable = trainable_for(spec, trial_fn)
    if can_restore:
        if progress:
            print(f"[{spec.name}] resuming from {exp_dir}", flush=True)
        tuner = tune.Tuner.restore(exp_dir, trainable, resume_unfinished=True, resume_errored=False)
        _replace_callbacks(tuner, run_config(spec, spec.name, ses.storage, callback).callbacks)
    else:
        # A sweep of this name whose Tune state is gone cannot be matched trial by trial: its old
        # trial runs are soft-deleted so that MLflow holds each trial of the new sweep once.
        stale = ses.tracker.trial_runs(spec.name)
        if stale:
            log.warning("sweep %s: no Tune state under %s; replacing %d earlier trial runs",
                        spec.name, exp_dir, len(stale))
            for r in stale:
                ses.tracker.delete_run(r.info.run_id)
        space = {"point": tune.grid_search([{"trial": c.to_dict(), "label": _label(c, spec)} for c in trials])}
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                max_concurrent_trials=spec.concurrency, reuse_actors=True,
                trial_name_creator=lambda t: t.trial_id, trial_dirname_creator=lambda t: t.trial_id),
            run_config=run_config(spec, spec.name, ses.storage, callback),
        )
    if progress:
        print(f"[{spec.name}] {len(trials)} trials, {spec.resources.cpus:g} CPU / {spec.resources.gpus:g} GPU "
              f"each; MLflow: {ses.tracking_uri} (experiment {spec.experiment_name!r})", flush=True)
    ses.tracker.set_tags(ses.parent, {"trials_total": len(trials)})
    ses.fit(tuner)
    counts = {"stable": 0, "collapsed": 0, "diverged": 0, "failed": 0}
    errors = []
    for run in ses.tracker.trial_runs(spec.name):
        st = run.data.tags.get("status", "running")
        counts[st] = counts.get(st, 0) + 1
        if st == "failed":
            errors.append(run.data.tags.get("error", "unknown error"))
    ses.tracker.set_tags(ses.parent, {f"trials_{k}": v for k, v in counts.items()})
    ses.finish()
    return SweepOutcome(spec.name, spec.experiment_name, ses.tracking_uri, ses.parent, exp_dir, len(trials),
                        counts, resumed=can_restore, errors=errors)


def _label(cfg, spec: SweepSpec) -> str:
    parts = []
    for k in spec.axes:
        v = getattr(cfg, k)
        parts.append(f"{k}={cfg.stabilizer_label if k == 'stabilizers' else v}")
    if "seed" not in spec.axes and spec.seeds > 1:
        parts.append(f"seed={cfg.seed}")
    return " ".join(parts) or spec.name


def _replace_callbacks(tuner, callbacks) -> None:
    """A restored Tuner carries the callbacks pickled at the sweep's start; point it at ours."""
    internal = getattr(tuner, "_local_tuner", None)
    if internal is not None:
        internal.get_run_config().callbacks = callbacks

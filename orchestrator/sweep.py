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

from orchestrator import embedded
from orchestrator.faults import Interrupted, StopSignals, WorkdirLock, lock_existing, prepare_workdir
from orchestrator.mlflow_store import StoreError, StoreUnavailable, Tracker, check_store, default_tracking_uri
from orchestrator.preflight import check_data, check_gpus, embedded_run
from orchestrator.quiet import FoldedWarnings
from orchestrator.raystart import init_ray  # noqa: F401 - also public here, orchestrator.sweep.init_ray
from orchestrator.spec import SpecError, SweepSpec
from orchestrator.tracking import TrackingCallback
from orchestrator.trainable import train_trial, unless_recorded

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


def _chain(e: BaseException):
    """An exception and its causes (Tune wraps a callback's error in its own)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


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

    def fit(self, tuner, callback: TrackingCallback | None = None):
        """``tuner.fit()``. A signal: :meth:`interrupted`. The tracking store gone for good (the
        callback's writes waited out the tracker's patience): one ``StoreError`` line that says
        what was saved, what was not, and that the same command resumes."""
        try:
            with FoldedWarnings(), embedded.plain_trial_actors():  # trials on the embedded Ray's prestarted workers
                result = self.signals.fit(tuner) if self.signals else tuner.fit()
        except (Interrupted, KeyboardInterrupt) as e:
            self.interrupted(e)
        except Exception as e:
            lost = next((x for x in _chain(e) if isinstance(x, StoreUnavailable)), None)
            if lost is None:
                raise
            self.store_lost(lost, callback)
        if callback is not None and callback.lost is not None:
            self.store_lost(callback.lost, callback)
        return result

    def store_lost(self, lost: StoreUnavailable, callback: TrackingCallback | None):
        """Let go of the session (nothing more can be written) and raise the final one-line error."""
        self.close()
        saved = f"; {callback.saved_text()}" if callback is not None else ""
        raise StoreError(f"{lost}{saved}. Re-run the same command to resume once the store answers again (it "
                         "closes the runs of the trials cut off, KILLED)") from None

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
            embedded.forget_session(self.workdir)
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
    lock = lock_existing(workdir)  # a busy workdir is refused before the checks
    try:
        check_data(spec, spec.trials(), embedded)  # before the workdir exists: a refusal leaves nothing
        check_gpus(spec, embedded)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    signals = StopSignals().__enter__()
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


def trainable_for(spec: SweepSpec, trial_fn=None, recorded: dict[str, str] | None = None):
    """The Tune trainable of the spec's trials: ``trial_fn`` (default :func:`train_trial`; a
    benchmark's stand-in trial) with the spec's resources; with ``recorded`` (trial id -> label of
    the trials MLflow holds as ended that Tune will create again), those return at once
    (:func:`orchestrator.trainable.unless_recorded`)."""
    from ray import tune

    fn = trial_fn or train_trial
    if recorded:
        fn = unless_recorded(fn, recorded)
    return tune.with_resources(fn, {"cpu": spec.resources.cpus, "gpu": spec.resources.gpus})


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
        # The runs an earlier driver left RUNNING (SIGKILL, the tracking store lost) are closed now;
        # MLflow's record of which trials ended wins over Tune's saved state, which can be older.
        cut = [r for r in ses.tracker.trial_runs(spec.name) if r.info.status == "RUNNING"]
        for r in cut:
            ses.tracker.close_cut_off(r, "cut off: its driver stopped before the trial ended")
        try:
            ended, again, unsaved = reconcile_tune_state(exp_dir, ses.tracker, spec.name)
        except (OSError, ValueError, KeyError) as e:  # Tune's state as Tune left it: it resumes as before
            log.warning("sweep %s: Tune's saved state not checked against MLflow's record (%s)", spec.name, e)
            ended, again, unsaved = 0, 0, {}
        if unsaved:  # ended after Tune last saved its state, which does not hold them: Tune makes them again
            trainable = trainable_for(spec, trial_fn, recorded=unsaved)
            callback.settings["recorded"] = dict(unsaved)
            ended += len(unsaved)
        if progress:
            notes = [f"{n} {what}" for n, what in (
                (len(cut), "run(s) an earlier driver left RUNNING closed (KILLED)"),
                (ended, "trial(s) MLflow holds as ended not run again (Tune's saved state was older)"),
                (again, "trial(s) whose end MLflow never received run again")) if n]
            print(f"[{spec.name}] resuming from {exp_dir}" + (f": {'; '.join(notes)}" if notes else ""), flush=True)
        # (Tune warns, twice, of each ended trial whose result.json a killed driver never wrote: MLflow has it)
        logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
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
                ses.tracker.discard(r, "replaced: the sweep started again without its Tune state")
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
    ses.fit(tuner, callback)
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


def reconcile_tune_state(exp_dir: str, tracker: Tracker, sweep: str) -> tuple[int, int, dict[str, str]]:
    """MLflow's record of which trials ended wins over Tune's saved state, which is saved every few
    seconds (``TUNE_GLOBAL_CHECKPOINT_S``) and so can be behind it: a driver killed by SIGKILL after
    recording a trial's end, or one that lost the tracking store. In the newest
    ``experiment_state-*.json`` of ``exp_dir`` (what ``Tuner.restore`` reads), a trial that MLflow
    holds as ended (FINISHED with its class, or FAILED) is marked ended (TERMINATED, ERROR) so that
    the resumed sweep does not train it again, and one that Tune holds as ended but MLflow does not
    (its end never reached the store) is PENDING, so that it runs again. A trial marked ended is
    also taken out of the grid searcher's trials in flight (``basic-variant-state-*.json``, saved
    with it: Tune's ``BasicVariantGenerator`` hands out no more trials than ``concurrency`` while it
    counts them, and a trial that never ends again would stall the sweep); without that file no
    trial is marked ended. A trial MLflow holds as ended that the saved state does not hold at all
    (Tune created it after it last saved its state) Tune creates again, with the same id: it is
    returned, with its run's label, for the resumed sweep to leave as recorded
    (:func:`orchestrator.trainable.unless_recorded`). Returns the two counts and those trials
    (trial id -> label)."""
    import fnmatch
    import io
    import json

    import pyarrow.fs as pafs
    import ray.cloudpickle as cloudpickle

    from orchestrator.mlflow_store import TAG_TRIAL

    ended: dict[str, str] = {}
    labels: dict[str, str] = {}
    for r in tracker.trial_runs(sweep):
        tid, status = r.data.tags.get(TAG_TRIAL), r.data.tags.get("status", "running")
        if r.info.status == "FINISHED" and status != "running":
            ended[tid] = "TERMINATED"
        elif r.info.status == "FAILED" and status == "failed":
            ended[tid] = "ERROR"
        labels[tid] = r.info.run_name
    fs, path = pafs.FileSystem.from_uri(exp_dir) if "://" in exp_dir else (pafs.LocalFileSystem(), exp_dir)
    files = [i.base_name for i in fs.get_file_info(pafs.FileSelector(path))]

    def newest(pattern: str) -> str | None:
        names = sorted(n for n in files if fnmatch.fnmatch(n, pattern))
        return f"{path.rstrip('/')}/{names[-1]}" if names else None

    state_file, searcher_file = newest("experiment_state-*.json"), newest("basic-variant-state-*.json")
    if state_file is None:
        return 0, 0, {}
    with fs.open_input_stream(state_file) as f:
        data = json.loads(f.readall())
    searcher = None
    if searcher_file is not None:
        with fs.open_input_stream(searcher_file) as f:
            searcher = cloudpickle.load(io.BytesIO(f.readall()))
    live = searcher.get("_live_trials") if isinstance(searcher, dict) else None
    marked, again, saved = [], 0, set()
    for entry in data.get("trial_data", []):
        trial = json.loads(entry[0])
        saved.add(trial.get("trial_id"))
        want, status = ended.get(trial.get("trial_id")), trial.get("status")
        if want is not None and status not in ("TERMINATED", "ERROR"):
            if not isinstance(live, set):
                continue  # the searcher's count of trials in flight cannot follow: Tune runs it again
            trial["status"] = want
            marked.append(trial["trial_id"])
        elif want is None and status in ("TERMINATED", "ERROR"):
            trial["status"], again = "PENDING", again + 1
        else:
            continue
        entry[0] = json.dumps(trial, indent=2)
    if marked:
        live.difference_update(marked)
        buf = io.BytesIO()
        cloudpickle.dump(searcher, buf)
        with fs.open_output_stream(searcher_file) as f:
            f.write(buf.getvalue())
    if marked or again:
        with fs.open_output_stream(state_file) as f:
            f.write(json.dumps(data).encode())
    unsaved = {tid: labels[tid] for tid in ended if tid not in saved and labels.get(tid)}
    return len(marked), again, unsaved


def _label(cfg, spec: SweepSpec) -> str:
    parts = []
    for k in spec.swept:
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

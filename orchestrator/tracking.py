"""The Ray Tune callback of a sweep: Tune's trial events turned into MLflow writes
(:class:`orchestrator.recorder.TrialRecorder`) and the terminal's progress line
(:class:`orchestrator.progress.Progress`)."""

from __future__ import annotations

import json
from pathlib import Path

from ray.tune import Callback

from orchestrator.capacity import waiting_note
from orchestrator.mlflow_store import TAG_REFERENCE, StoreUnavailable
from orchestrator.progress import Progress
from orchestrator.recorder import TrialRecorder
from orchestrator.trainable import is_recorded
from workloads.stabilizers import label as stabilizer_label


def _store_guarded(hook):
    """A Tune hook that stops touching MLflow once the store is gone for good: the first
    :class:`StoreUnavailable` is kept (``lost``) and raised at the end of Tune's step
    (``on_step_end``), where Tune lets it through; the hooks in between write nothing (Tune catches
    some hooks' errors, and would log a traceback and fail the trial)."""
    def guarded(self, *args, **kwargs):
        if self.lost is not None:
            return None
        try:
            return hook(self, *args, **kwargs)
        except StoreUnavailable as e:
            self.lost = e
            return None

    guarded.__name__, guarded.__doc__ = hook.__name__, hook.__doc__
    return guarded


class TrackingCallback(Callback):
    """Ray Tune callback: mirrors every trial into MLflow, and shows progress on the terminal.

    Picklable: Tune stores callbacks with the experiment so that ``Tuner.restore`` brings it back;
    only settings are pickled and the client is re-created on first use.
    """

    def __init__(self, tracking_uri: str, experiment: str, sweep: str, parent_id: str,
                 total_trials: int, flush_every: float = 2.0, progress: bool = True,
                 total_is_budget: bool = False, crash: tuple[str, ...] = (), crash_criterion: str = "",
                 need: dict[str, float] | None = None):
        self.settings = dict(tracking_uri=tracking_uri, experiment=experiment, sweep=sweep,
                             parent_id=parent_id, total_trials=total_trials, flush_every=flush_every,
                             progress=progress, total_is_budget=total_is_budget,
                             crash=crash_criterion, crash_classes=list(crash), need=need)
        self._init_state()

    def _init_state(self) -> None:
        s = self.settings
        self.recorder = TrialRecorder(s["tracking_uri"], s["experiment"], s["sweep"], s["parent_id"],
                                      flush_every=s["flush_every"], crash=s["crash_classes"],
                                      crash_criterion=s["crash"])
        self.progress = Progress(s["sweep"], s["total_trials"], total_is_budget=s["total_is_budget"])
        self._fresh: set[str] = set()            # trials whose run on_trial_start made for this attempt
        self.lost: StoreUnavailable | None = None  # the tracking store, gone for good

    def saved_text(self) -> str:
        """What the sweep kept and what it did not, when the store went away (its final error)."""
        r = self.recorder
        cut = [t for t in r.runs if t not in r.outcomes]
        state = "the search's state (its Optuna store)" if self.settings["total_is_budget"] else "the sweep's Tune state"
        return (f"saved: the {r.done} trial(s) that ended before it went away (recorded in MLflow) and {state}; "
                f"not saved: the results of the {len(cut)} trial(s) running then (they run again)")

    def __getstate__(self):
        return {"settings": self.settings}

    def __setstate__(self, state):
        self.settings = state["settings"]
        self._init_state()

    def _run_for(self, trial, replace: bool) -> None:
        """The trial's run (a new one with ``replace``), its params from the trial's grid point, tagged
        ``ablate.reference`` when it is a reference trial of a boundary search."""
        if replace or not self.recorder.has_run(trial.trial_id):
            point = trial.config["point"]
            params = {**point["trial"], "stabilizer": stabilizer_label(tuple(point["trial"]["stabilizers"]))}
            tags = {TAG_REFERENCE: "true"} if point.get("reference") else None
            self.recorder.start(trial.trial_id, point["label"], params, replace=replace, tags=tags)

    def _progress_of(self, trials) -> tuple:
        """What the progress line counts: the trials' Tune statuses (read only when a line is
        shown), the classes of the trials that ended here and their count; and, given a trial's
        resources (``need``), whether pending trials wait for the cluster's nodes."""
        need = self.settings.get("need")
        note = (lambda pending: waiting_note(need, pending)) if need else None
        return (t.status for t in trials), self.recorder.outcomes.values(), self.recorder.done, note

    # ---- Tune hooks
    def _recorded(self, trial) -> bool:
        """A trial MLflow already holds as ended that a resumed Tune made again (same id, same grid
        point: ``orchestrator.trainable.unless_recorded`` returns at once): its run stays as it is."""
        return is_recorded(self.settings.get("recorded"), trial.trial_id, trial.config)

    @_store_guarded
    def on_trial_start(self, iteration, trials, trial, **info):
        """The trial's run is made when the trial starts (RUNNING, tag status=running, its config as
        params), replacing a run of an earlier attempt: a sweep stopped before the trial's first
        report still shows it, and marks it KILLED. Not for a trial MLflow holds as ended
        (:meth:`_recorded`)."""
        if self._recorded(trial):
            return
        self._run_for(trial, replace=True)
        self._fresh.add(trial.trial_id)

    @_store_guarded
    def on_trial_result(self, iteration, trials, trial, result, **info):
        tid = trial.trial_id
        first = result.get("training_iteration") == 1  # an attempt's first report: its run is replaced,
        self._run_for(trial, replace=first and tid not in self._fresh)  # unless made at its start
        if first:
            self._fresh.discard(tid)
        self.recorder.add(tid, json.loads(result.get("batch") or "[]"))
        self.recorder.place(tid, result)
        if result.get("summary"):
            self.recorder.finish(tid, json.loads(result["summary"]))
        self.recorder.flush(force=self.recorder.full(tid))

    @_store_guarded
    def on_trial_complete(self, iteration, trials, trial, **info):
        self.recorder.flush_trial(trial.trial_id)

    @_store_guarded
    def on_trial_error(self, iteration, trials, trial, **info):
        if self._recorded(trial):
            return
        self._run_for(trial, replace=False)
        tb = ""
        if trial.error_file and Path(trial.error_file).is_file():
            tb = Path(trial.error_file).read_text()
        self.recorder.fail(trial.trial_id, tb, trial.num_failures)

    def on_step_end(self, iteration, trials, **info):
        if self.lost is None:
            try:
                self.recorder.flush()
            except StoreUnavailable as e:
                self.lost = e
        if self.lost is not None:
            raise self.lost  # ends Tune's run; Session.fit says what was saved
        if self.settings["progress"]:
            self.progress.tick(*self._progress_of(trials))

    @_store_guarded
    def on_experiment_end(self, trials, **info):
        self.recorder.flush(force=True)
        if self.settings["progress"]:
            self.progress.show(*self._progress_of(trials))

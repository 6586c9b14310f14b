"""Trials mirrored into MLflow: one child run per trial attempt, its metrics buffered and written in
batches, its end (results, tags, artifacts, terminal state) in a few writes.

:class:`TrialRecorder` knows trial ids, labels, params, metric batches and summaries, not Ray: the
Tune callback (:mod:`orchestrator.tracking`) translates Tune's trial objects into its calls,
and a test drives it directly. All its writes go through one :class:`orchestrator.mlflow_store.Tracker`
in one process (the sweep driver).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from typing import Any, Mapping

from mlflow.entities import Metric

from orchestrator.mlflow_store import BATCH, Tracker, json_dumps_finite, nonfinite_text

# The summary's floats that are results even when they are ints (the others: every float result).
RESULT_KEYS = ("final_loss", "best_loss", "initial_loss", "final_train_loss", "baseline_loss", "wall_time", "throughput")
# Where an attempt runs, from its reports: tagged on its run once.
PLACE_KEYS = ("node_id", "hostname", "gpu_ids", "started_at")


class TrialRecorder:
    """The MLflow runs of a sweep's trials: trial id -> the run of its current attempt, a buffer of
    metrics per trial flushed every ``flush_every`` seconds (or when a trial's buffer holds a
    ``log_batch``'s worth, or when the trial ends), its divergence events, its end.

    The :class:`Tracker` is made on first use, at ``$ABLATE_TRACKING_URI`` when that is set (the
    URI the driver resolved), else at ``tracking_uri``.
    """

    def __init__(self, tracking_uri: str, experiment: str, sweep: str, parent_id: str,
                 flush_every: float = 2.0, crash: tuple[str, ...] | list[str] = (), crash_criterion: str = ""):
        self.tracking_uri, self.experiment, self.sweep, self.parent_id = tracking_uri, experiment, sweep, parent_id
        self.flush_every = flush_every
        self.crash_criterion, self.crash_classes = crash_criterion, list(crash)
        self._tracker: Tracker | None = None
        self.runs: dict[str, str] = {}           # trial_id -> run_id of the current attempt
        self._buf: dict[str, list[Metric]] = defaultdict(list)
        self._events: dict[str, list[dict]] = defaultdict(list)
        self._tagged: set[str] = set()
        self._last_flush = time.monotonic()
        self.done = 0                            # trials that ended here (this process)
        self.outcomes: dict[str, str] = {}       # trial_id -> stable | collapsed | diverged | failed

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            uri = os.environ.get("ABLATE_TRACKING_URI") or self.tracking_uri
            self._tracker = Tracker(uri, self.experiment, label=self.sweep)
        return self._tracker

    # ---- a trial's run
    def has_run(self, trial_id: str) -> bool:
        """Whether this recorder holds a run for the trial's current attempt."""
        return trial_id in self.runs

    def start(self, trial_id: str, label: str, params: dict, replace: bool = True,
              tags: dict[str, str] | None = None) -> str:
        """The trial's run for a new attempt (RUNNING, tag status=running, ``params``, ``tags``),
        named ``label``. With ``replace``, a run of an earlier attempt is soft-deleted first; without,
        an existing run of the trial is taken over. Its buffered metrics, events and placement are
        reset."""
        self.runs[trial_id] = self.tracker.trial_run(self.sweep, self.parent_id, trial_id, label, params,
                                                     replace=replace, tags=tags)
        self._buf.pop(trial_id, None)
        self._events.pop(trial_id, None)
        self._tagged.discard(trial_id)
        return self.runs[trial_id]

    def add(self, trial_id: str, batch: list) -> None:
        """Buffer a report's ``batch``: ``[step, metrics: {name: value}, events: [dict]]`` entries,
        the metrics stamped with the time they arrive."""
        ts = int(time.time() * 1000)
        for step, metrics, events in batch:
            self._buf[trial_id] += [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()]
            self._events[trial_id] += events

    def place(self, trial_id: str, info: Mapping[str, Any]) -> None:
        """Tag where the attempt runs (``info``'s node_id, hostname, gpu_ids, started_at, and
        device_override when a test cluster's fake GPU made it train on the CPU), once per attempt,
        from the first ``info`` that names a node."""
        if trial_id not in self._tagged and info.get("node_id"):
            tags = {k: info.get(k, "") for k in PLACE_KEYS}
            if info.get("device_override"):  # test clusters' fake GPUs (orchestrator.trainable.FAKE_GPUS_ON_CPU)
                tags["device_override"] = info["device_override"]
            self.tracker.set_tags(self.runs[trial_id], tags)
            self._tagged.add(trial_id)

    # ---- the metric buffer
    def full(self, trial_id: str) -> bool:
        """The trial's buffer holds a ``log_batch``'s worth (1000 values): time to flush."""
        return len(self._buf[trial_id]) >= BATCH

    def flush(self, force: bool = False) -> None:
        """Every trial's buffered metrics, when ``flush_every`` seconds have passed since the last
        flush (or ``force``)."""
        now = time.monotonic()
        if not force and now - self._last_flush < self.flush_every:
            return
        self._last_flush = now
        for tid, metrics in list(self._buf.items()):
            if metrics:
                self.tracker.log_metrics(self.runs[tid], metrics)
                self._buf[tid] = []

    def flush_trial(self, trial_id: str) -> None:
        """The buffered metrics of one trial (a trial that ends: the others' wait for the next flush)."""
        metrics = self._buf.pop(trial_id, None)
        if metrics:
            self.tracker.log_metrics(self.runs[trial_id], metrics)

    # ---- a trial's end
    def finish(self, trial_id: str, summary: dict) -> None:
        """A trial that ran to its end (``summary``: the trial's result as a dict): its metrics, its
        class and stop as tags, where it ran (``device``, ``torch_threads``, ``cpu``) as tags, its
        results as metrics result/<name>, result.json (the summary, with the ``config`` it ran) and
        events.json, FINISHED."""
        run_id = self.runs[trial_id]
        self.flush_trial(trial_id)
        ev = summary.get("first_event")
        # The trial's class from its final state (workloads.outcome.trial_class); ``degraded`` is
        # decided against the cell's other runs at export.
        status = summary.get("outcome") or ("diverged" if summary.get("diverged") else "stable")
        tags = {"status": status, "stop_reason": summary.get("stop_reason") or "",
                "divergence_kind": ev["kind"] if ev else "",
                "divergence_step": ev["step"] if ev else "", "steps_run": summary["steps_run"],
                "device": summary.get("device", ""), "ended_at": summary.get("ended_at", ""),
                "torch_threads": summary.get("threads") or "", "cpu": summary.get("cpu") or ""}
        if self.crash_criterion:
            tags["crash_criterion"] = self.crash_criterion
            tags["crashed"] = status in self.crash_classes
        # Every float result becomes a metric result/<name>, except a non-finite one: MLflow's SQL
        # stores would keep inf as 1.8e308, so it is recorded as the tag result/<name> = inf | -inf |
        # nan instead (export reads it back as a float). Timestamps are tags, not results.
        final = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                 and (k in RESULT_KEYS or (isinstance(v, float) and not k.endswith("_at")))}
        tags.update({f"result/{k}": nonfinite_text(v) for k, v in final.items() if not math.isfinite(v)})
        ts = int(time.time() * 1000)
        self.tracker.log_batch(run_id, [Metric(f"result/{k}", v, ts, summary["steps_run"])
                                        for k, v in final.items() if math.isfinite(v)], tags)
        self._close(trial_id, run_id, status, "FINISHED", {"result.json": json_dumps_finite(summary)})

    def fail(self, trial_id: str, traceback: str, num_failures: int) -> None:
        """A trial that failed for good (``traceback``: its text, "" when none was recorded): its
        metrics, tags status=failed, the error's last line and ``num_failures``, traceback.txt and
        events.json, FAILED."""
        run_id = self.runs[trial_id]
        self.flush_trial(trial_id)
        last_line = traceback.strip().splitlines()[-1] if traceback.strip() else "unknown error"
        self.tracker.set_tags(run_id, {"status": "failed", "error": last_line, "num_failures": num_failures})
        self._close(trial_id, run_id, "failed", "FAILED", {"traceback.txt": traceback or "no traceback was recorded"})

    def _close(self, tid: str, run_id: str, status: str, run_status: str, texts: dict[str, str]) -> None:
        """Last writes of a trial's run, whatever its outcome: its artifacts (``texts`` and its
        events as events.json, in one call), its terminal state."""
        self.tracker.log_texts(run_id, {**texts, "events.json": json.dumps(self._events.get(tid, []), indent=1)})
        self.tracker.finish(run_id, run_status)
        self.outcomes[tid] = status
        self.done += 1

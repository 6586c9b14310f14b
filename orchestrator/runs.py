"""The reading layer: MLflow runs -> one typed pyarrow table, one row per trial.

``fetch_runs`` reads a sweep's (or an experiment's) trial runs from MLflow alone (never Ray's files);
``runs_table`` turns them into a table of :data:`SCHEMA`: the trial's config (``TrialConfig``'s
fields and types), its recorded class and results, its last probed values. ``with_outcomes`` classes
each finished run within its cell (``workloads.outcome.classify``) under a crash criterion
(``table_criterion`` names it); ``cell_fields_of`` says which fields make a cell. ``search_records``
reads how a boundary search's cells ended (``boundary/cells.json`` on the sweep's parent run).
The tables (``orchestrator.tables``), figures (``orchestrator.figures``), forensics and report
read this table; this module imports none of them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections import defaultdict
from pathlib import Path

import pyarrow as pa

from orchestrator.mlflow_store import TAG_KIND, TAG_SWEEP, TAG_TRIAL, Tracker, logged_value
from workloads.outcome import (COLLAPSE_FRACTION, COLLAPSE_SE, SIZE_FIELDS, DEFAULT_CRASH, DEFAULT_KAPPA, Point,
                               best_gain, classify, criterion_label, trial_class)
from workloads.stabilizers import label as stabilizer_label
from workloads.trial import TrialConfig


_PY2PA = {int: pa.int64(), float: pa.float64(), bool: pa.bool_(), str: pa.string()}


def _config_fields() -> list[pa.Field]:
    hints = typing.get_type_hints(TrialConfig)
    out = []
    for f in dataclasses.fields(TrialConfig):
        t = hints[f.name]
        base = next((a for a in typing.get_args(t) if a is not type(None)), t)
        out.append(pa.field(f.name, _PY2PA.get(base, pa.string())))
    return out


RESULT_METRICS = ("initial_loss", "final_loss", "best_loss", "final_train_loss", "baseline_loss", "wall_time",
                  "throughput", "eval_baseline", "final_loss_se")
PROBE_METRICS = ("loss", "val_loss", "grad_norm", "param_norm", "attn_entropy/min", "attn_entropy/mean",
                 "spectral_conc/max", "spectral_conc_norm/max", "qk_sigma1/max", "max_logit", "tev/mean", "tev/std",
                 "weyl/fire_rate_cum")

SCHEMA = pa.schema(
    [pa.field("experiment", pa.string()), pa.field("sweep", pa.string()), pa.field("run_id", pa.string()),
     pa.field("trial_id", pa.string()), pa.field("label", pa.string()), pa.field("status", pa.string()),
     pa.field("outcome", pa.string()), pa.field("crashed", pa.bool_()), pa.field("crash_criterion", pa.string()),
     pa.field("collapse_margin", pa.float64()),
     pa.field("stop_reason", pa.string()),
     pa.field("divergence_kind", pa.string()), pa.field("divergence_step", pa.int64()),
     pa.field("steps_run", pa.int64()), pa.field("node_id", pa.string()), pa.field("device_name", pa.string()),
     pa.field("stabilizer", pa.string())]
    + _config_fields()
    + [pa.field(m, pa.float64()) for m in RESULT_METRICS]
    + [pa.field("last/" + m, pa.float64()) for m in PROBE_METRICS]
)
"""One row per trial. ``status`` is the trial's own class as recorded (stable / collapsed / diverged,
or failed / running); ``outcome`` is its class within its cell (``degraded`` included) and
``crashed`` whether that class counts as a crash under ``crash_criterion``; ``collapse_margin`` the
gain over its eval-window baseline (``eval_baseline`` minus ``final_loss``) that the run had to
exceed not to be ``collapsed`` under the same rule (forensics places a collapsed run's crash step
with it); ``stop_reason`` is the
early-stopping rule that ended it, if any. Config columns keep TrialConfig's names and types
(tuples and mappings as JSON strings); ``final_loss`` is +inf when the loss became non-finite;
``initial_loss`` is l_0 and ``baseline_loss`` the data's marginal baseline (whole validation split);
``eval_baseline`` is the baseline of the windows ``final_loss`` was measured on and ``final_loss_se``
the standard error of their difference (None in runs recorded before they existed: the class then
falls back to ``baseline_loss`` without a standard-error margin, and ``crash_criterion`` says so);
``last/*`` are the last probed values."""


def _typed(field: pa.Field, raw: str | None):
    if raw is None or raw == "None":
        return None
    if pa.types.is_integer(field.type):
        return int(float(raw))
    if pa.types.is_floating(field.type):
        return float(raw)
    if pa.types.is_boolean(field.type):
        return raw == "True"
    return raw


def _metric(v: float | None, tag: str | None = None) -> float | None:
    """A metric's value; when there is none, the tag of the same name that records a non-finite
    result ("inf", "-inf", "nan"; see orchestrator.recorder.TrialRecorder.finish). MLflow's SQL stores write
    +-inf as +-max float (runs recorded before those tags): read back as inf (``logged_value``)."""
    if v is None and tag:
        return float(tag)
    return logged_value(v)


def fetch_runs(tracking_uri: str, experiment: str, sweep: str | None = None) -> list:
    tr = Tracker(tracking_uri, experiment)  # paged search_runs
    return tr.trial_runs(sweep) if sweep else tr.find_runs(f"tags.`{TAG_KIND}` = 'trial'")


def runs_table(runs: list, experiment: str) -> pa.Table:
    cols: dict[str, list] = {f.name: [] for f in SCHEMA}
    for r in runs:
        tags, params, metrics = r.data.tags, r.data.params, r.data.metrics
        row = {
            "experiment": experiment, "sweep": tags.get(TAG_SWEEP), "run_id": r.info.run_id,
            "trial_id": tags.get(TAG_TRIAL), "label": tags.get("mlflow.runName"),
            "status": tags.get("status"), "stop_reason": tags.get("stop_reason") or None,
            "divergence_kind": tags.get("divergence_kind") or None,
            "divergence_step": int(tags["divergence_step"]) if tags.get("divergence_step") else None,
            "steps_run": int(tags["steps_run"]) if tags.get("steps_run") else None,
            "node_id": tags.get("node_id"), "device_name": tags.get("device"),
            "stabilizer": params.get("stabilizer") or stabilizer_label(tuple(json.loads(params.get("stabilizers", "[]")))),
        }
        for f in _config_fields():
            row[f.name] = _typed(f, params.get(f.name))
        for m in RESULT_METRICS:
            row[m] = _metric(metrics.get(f"result/{m}"), tags.get(f"result/{m}"))
        if row["final_loss"] is not None and math.isnan(row["final_loss"]):
            row["final_loss"] = math.inf  # a NaN loss diverged: +inf, as for every diverged trial
        for m in PROBE_METRICS:
            row["last/" + m] = _metric(metrics.get(m))
        for name in cols:
            cols[name].append(row.get(name))
    return pa.table(cols, schema=SCHEMA)


FINISHED = ("stable", "collapsed", "diverged")
"""Trial classes of finished runs (``status``); failed and running runs are not results."""


def cell_fields_of(table: pa.Table) -> list[str]:
    """The fields that make a cell: the stabilizer and every config field that varies, but the LR
    and the seed (and fields that change nothing, such as threads)."""
    return ["stabilizer"] + _varying(table, {"lr", "seed", "threads", "data_path"})


def run_point(r: dict) -> Point:
    """A finished trial row as ``workloads.outcome`` classes it (no final loss: +inf)."""
    final = r["final_loss"]
    if final is None:  # no finite final loss was recorded: the loss became non-finite
        final = math.inf
    return Point(r["lr"], r["seed"] or 0, final, r["initial_loss"], r["baseline_loss"], r["stop_reason"],
                 r.get("eval_baseline"), r.get("final_loss_se"))


def reference_gains(rows: list[dict]) -> dict[tuple, float | None]:
    """The best gain of each workload and size (``SIZE_FIELDS``) over the finished ``rows``: the
    scale of ``collapsed``'s margin for every cell of it (``workloads.outcome.classify``)."""
    groups: dict[tuple, list[Point]] = defaultdict(list)
    for r in rows:
        if r["status"] in FINISHED:
            groups[size_key(r)].append(run_point(r))
    return {k: best_gain(v) for k, v in groups.items()}


def size_key(r: dict) -> tuple:
    return tuple(r.get(f) for f in SIZE_FIELDS)


def table_criterion(table: pa.Table, crash=DEFAULT_CRASH, kappa: float = DEFAULT_KAPPA) -> str:
    """``criterion_label`` for the finished runs of ``table``, naming how many were recorded without
    per-window baselines (old recordings: classed against the whole split's baseline)."""
    old = sum(1 for r in table.select(["status", "eval_baseline"]).to_pylist()
              if r["status"] in FINISHED and r["eval_baseline"] is None)
    return criterion_label(crash, kappa, fallback=old)


def collapse_margins(points: list[Point], reference_gain: float | None) -> list[float]:
    """Per point of one cell, the gain over its baseline (``Point.gain``) it must exceed not to be
    ``collapsed`` under :func:`workloads.outcome.classify`'s rule: ``COLLAPSE_SE`` standard errors
    of its own windows (0 where none was recorded), and, where the cell has a run that learned (with
    a baseline), ``COLLAPSE_FRACTION`` of the larger of the cell's best gain and ``reference_gain``."""
    learned = [p for p in points if trial_class(p.final_loss, p.initial_loss, p.reference, se=p.final_loss_se)
               == "stable"]
    g_ref = 0.0
    if learned and all(p.gain is not None for p in learned):
        g_ref = max(max(p.gain for p in learned), reference_gain or 0.0)
    se = [p.final_loss_se if p.final_loss_se is not None and math.isfinite(p.final_loss_se) else 0.0
          for p in points]
    return [max(COLLAPSE_SE * s, COLLAPSE_FRACTION * g_ref) for s in se]


def with_outcomes(table: pa.Table, crash=DEFAULT_CRASH, kappa: float = DEFAULT_KAPPA) -> pa.Table:
    """Fill ``outcome``, ``crashed``, ``crash_criterion`` and ``collapse_margin``: each finished run
    classed within its cell (``workloads.outcome.classify``), and the margin that class used
    (:func:`collapse_margins`)."""
    rows = table.to_pylist()
    fields = cell_fields_of(table)
    cells: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        if r["status"] in FINISHED:
            cells[tuple(r[f] for f in fields)].append(i)
    outcome: list[str | None] = [None] * len(rows)
    margin: list[float | None] = [None] * len(rows)
    refs = reference_gains(rows)
    for idx in cells.values():
        ref = refs[size_key(rows[idx[0]])]
        points = [run_point(rows[i]) for i in idx]
        for i, c, m in zip(idx, classify(points, kappa, reference_gain=ref), collapse_margins(points, ref)):
            outcome[i], margin[i] = c, m
    crit = table_criterion(table, crash, kappa)
    table = table.set_column(table.schema.get_field_index("outcome"), "outcome", pa.array(outcome, pa.string()))
    table = table.set_column(table.schema.get_field_index("crashed"), "crashed",
                             pa.array([None if o is None else o in crash for o in outcome], pa.bool_()))
    table = table.set_column(table.schema.get_field_index("collapse_margin"), "collapse_margin",
                             pa.array(margin, pa.float64()))
    return table.set_column(table.schema.get_field_index("crash_criterion"), "crash_criterion",
                            pa.array([crit] * len(rows), pa.string()))


def search_records(tracking_uri: str, experiment: str, sweep: str | None) -> list[dict]:
    """The cell reports that ``ablate boundary`` logged on its parent runs (``boundary/cells.json``),
    each with its sweep's name; none for a grid sweep."""
    import tempfile

    tr = Tracker(tracking_uri, experiment)
    parents = tr.sweep_runs(sweep) if sweep else tr.find_runs(f"tags.`{TAG_KIND}` = 'sweep'")
    out = []
    for p in parents:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = tr.download_artifact(p.info.run_id, "boundary/cells.json", tmp)
                cells = json.loads(Path(path).read_text())
            except Exception:  # noqa: BLE001 - no such artifact: not a boundary search
                continue
        out += [{**c, "sweep": p.data.tags.get(TAG_SWEEP)} for c in cells]
    return out


def _varying(table: pa.Table, exclude: set[str]) -> list[str]:
    fields = []
    for f in _config_fields():
        if f.name in exclude or f.name in ("stabilizers",):
            continue
        vals = set(table.column(f.name).to_pylist())
        if len(vals) > 1:
            fields.append(f.name)
    return fields

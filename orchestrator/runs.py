"""The reading layer: MLflow runs -> one typed pyarrow table, one row per trial.

``fetch_runs`` reads a sweep's (or an experiment's) trial runs from MLflow alone (never Ray's files);
``runs_table`` turns them into a table of :data:`SCHEMA`: the trial's config (``TrialConfig``'s
fields and types), its recorded class and results, its last probed values. ``with_outcomes`` classes
each finished run within its cell of its sweep, against that cell's own reference
(``workloads.outcome.classify``; ``judge_rows``), under a crash criterion (``table_criterion``
names it); ``cell_fields_of`` says which fields make a cell. ``search_records`` reads how a
boundary search's cells ended (``boundary/cells.json`` on the sweep's parent run);
``recorded_trial`` reads what one trial ran with, to re-run it (``ablate trial --from-run``).
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

from orchestrator.mlflow_store import TAG_KIND, TAG_REFERENCE, TAG_SWEEP, TAG_TRIAL, Tracker, logged_value
from workloads.outcome import DEFAULT_CRASH, DEFAULT_KAPPA, Point, Reference, cell_reference, classify, criterion_label
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
     pa.field("reference_run", pa.bool_()), pa.field("reference_gain", pa.float64()),
     pa.field("collapse_margin", pa.float64()),
     pa.field("stop_reason", pa.string()),
     pa.field("divergence_kind", pa.string()), pa.field("divergence_step", pa.int64()),
     pa.field("steps_run", pa.int64()), pa.field("node_id", pa.string()), pa.field("device_name", pa.string()),
     pa.field("torch_threads", pa.int64()), pa.field("cpu", pa.string()),
     pa.field("stabilizer", pa.string())]
    + _config_fields()
    + [pa.field(m, pa.float64()) for m in RESULT_METRICS]
    + [pa.field("last/" + m, pa.float64()) for m in PROBE_METRICS]
)
"""One row per trial. ``status`` is the trial's own class as recorded (stable / collapsed / diverged,
or failed / running); ``outcome`` is its class within its cell (``degraded`` included) and
``crashed`` whether that class counts as a crash under ``crash_criterion``; ``reference_run`` whether
the run is one of its cell's reference runs (a boundary search's reference trial, tagged
``ablate.reference``), ``reference_gain`` the mean gain of its cell's reference runs (nats; the cell
of its sweep: references are never pooled across sweeps or cells), ``collapse_margin`` the gain over
the eval baseline the run must exceed not to be ``collapsed`` (``max(2 se, 0.1 reference_gain)``, or
2 se when the reference learned nothing; forensics places a collapsed run's crash step with it);
``stop_reason`` is the early-stopping rule that ended it,
if any; ``device_name``, ``torch_threads`` and ``cpu`` where it ran (what a bit-for-bit re-run
needs). Config columns keep TrialConfig's names and types (tuples and mappings as JSON strings);
``final_loss`` is +inf when the loss became non-finite; ``initial_loss`` is l_0 and
``baseline_loss`` the data's marginal baseline (whole validation split); ``eval_baseline`` is the
baseline of the windows ``final_loss`` was measured on and ``final_loss_se`` the standard error of
their difference (None in runs recorded before they existed: the class then
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
            "reference_run": tags.get(TAG_REFERENCE) == "true",
            "torch_threads": int(tags["torch_threads"]) if tags.get("torch_threads") else None,
            "cpu": tags.get("cpu") or None,
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
                 r.get("eval_baseline"), r.get("final_loss_se"), bool(r.get("reference_run")))


def cell_key(r: dict, fields: list[str]) -> tuple:
    """A row's cell *of its sweep*: the sweep and the cell fields. A reference belongs to one cell
    of one search or sweep; two sweeps of the same cell are two measurements."""
    return (r.get("sweep"),) + tuple(r.get(f) for f in fields)


def judge_rows(rows: list[dict], fields: list[str], kappa: float = DEFAULT_KAPPA) -> list[tuple[str, Reference] | None]:
    """Per row: its class within its cell of its sweep (``cell_key``) and that cell's
    :class:`~workloads.outcome.Reference` (its reference runs: the marked ones, else those at its
    lowest LR); None for a run that did not finish. What the search decided, decided again."""
    cells: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        if r["status"] in FINISHED:
            cells[cell_key(r, fields)].append(i)
    out: list[tuple[str, Reference] | None] = [None] * len(rows)
    for idx in cells.values():
        pts = [run_point(rows[i]) for i in idx]
        ref = cell_reference(pts)
        for i, c in zip(idx, classify(pts, kappa, ref)):
            out[i] = (c, ref)
    return out


def table_criterion(table: pa.Table, crash=DEFAULT_CRASH, kappa: float = DEFAULT_KAPPA) -> str:
    """``criterion_label`` for the finished runs of ``table``, naming how many were recorded without
    per-window baselines (old recordings: classed against the whole split's baseline) and in how
    many cells the reference learned nothing."""
    rows = table.to_pylist()
    old = sum(1 for r in rows if r["status"] in FINISHED and r["eval_baseline"] is None)
    fields = cell_fields_of(table)
    refs = {cell_key(r, fields): v[1] for r, v in zip(rows, judge_rows(rows, fields, kappa)) if v is not None}
    return criterion_label(crash, kappa, fallback=old, no_reference=sum(not ref.learned for ref in refs.values()))


def with_outcomes(table: pa.Table, crash=DEFAULT_CRASH, kappa: float = DEFAULT_KAPPA) -> pa.Table:
    """Fill ``outcome``, ``crashed``, ``crash_criterion``, ``reference_gain`` and ``collapse_margin``:
    each finished run classed within its cell of its sweep, against that cell's reference
    (:func:`judge_rows`)."""
    rows = table.to_pylist()
    judged = judge_rows(rows, cell_fields_of(table), kappa)
    outcome = [v[0] if v else None for v in judged]
    ref_gain = [v[1].gain if v else None for v in judged]
    margin = [v[1].collapse_margin(r.get("final_loss_se")) if v else None for r, v in zip(rows, judged)]
    crit = table_criterion(table, crash, kappa)
    cols = {"outcome": pa.array(outcome, pa.string()),
            "crashed": pa.array([None if o is None else o in crash for o in outcome], pa.bool_()),
            "crash_criterion": pa.array([crit] * len(rows), pa.string()),
            "reference_gain": pa.array(ref_gain, pa.float64()), "collapse_margin": pa.array(margin, pa.float64())}
    for name, col in cols.items():
        table = table.set_column(table.schema.get_field_index(name), name, col)
    return table


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


def _param(raw: str):
    """A recorded param's value (``Tracker.log_params`` writes lists as JSON, the rest with str)."""
    if raw in ("True", "False"):
        return raw == "True"
    if raw == "None":
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def config_from_params(params: dict[str, str]) -> dict:
    """The ``TrialConfig`` fields of a trial run, rebuilt from its MLflow params (runs recorded
    before result.json carried the config): typed by the fields, ``stabilizer_options.*`` nested."""
    out: dict = {}
    for f in _config_fields():
        if f.name == "stabilizer_options":
            opts: dict = {}
            for k, v in params.items():
                if k.startswith("stabilizer_options."):
                    name, _, key = k[len("stabilizer_options."):].partition(".")
                    opts.setdefault(name, {})[key] = _param(v)
            out[f.name] = opts
        elif f.name in params:
            raw = params[f.name]
            out[f.name] = _param(raw) if f.name in ("stabilizers", "stop_on") else _typed(f, raw)
    return out


def recorded_trial(tracking_uri: str, run_id: str) -> dict:
    """What a re-run of a recorded trial needs (``ablate trial --from-run``): ``config`` (the
    TrialConfig fields it ran: its result.json's ``config``, which has the thread count it used,
    else rebuilt from its params, ``source`` says which), its ``final_loss`` (inf when non-finite),
    the ``threads``, ``device`` and ``cpu`` it ran on (None where not recorded), its ``sweep``
    and ``label``. ValueError, one line naming the run, when the store has no such finished trial."""
    import tempfile

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ValueError(f"--from-run: no run {run_id!r} in the MLflow store {tracking_uri}; give the id of a "
                         "trial run (ablate export's trials table, run_id), and --workdir / --tracking-uri of "
                         "its store") from None
    tags, params = run.data.tags, run.data.params
    if tags.get(TAG_KIND) != "trial":
        raise ValueError(f"--from-run: run {run_id!r} is not a trial run of ablate (ablate.kind: "
                         f"{tags.get(TAG_KIND)!r}); give the id of a trial run")
    status = tags.get("status")
    if status not in FINISHED:
        raise ValueError(f"--from-run: trial run {run_id!r} is {status!r}: it has no final loss to reproduce "
                         "(its config is in its params)")
    summary = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            summary = json.loads(Path(client.download_artifacts(run_id, "result.json", tmp)).read_text())
        except (MlflowException, OSError, ValueError):
            summary = None
    if summary and isinstance(summary.get("config"), dict):
        config, source = summary["config"], "result.json"
    else:
        config, source = config_from_params(params), "params"
    final = _metric(run.data.metrics.get("result/final_loss"), tags.get("result/final_loss"))
    if summary and summary.get("final_loss") is not None:
        final = float(summary["final_loss"])  # the JSON repr of the float: exact
    threads = int(tags["torch_threads"]) if tags.get("torch_threads") else (summary or {}).get("threads")
    return {"config": config, "source": source, "final_loss": math.inf if final is None or math.isnan(final) else final,
            "threads": threads, "device": tags.get("device") or None, "cpu": tags.get("cpu") or None,
            "sweep": tags.get(TAG_SWEEP), "label": tags.get("mlflow.runName")}

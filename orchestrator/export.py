"""Ablation tables and plots, read back from MLflow alone (never from Ray's files).

``runs_table`` builds a pyarrow Table with one row per trial (schema :data:`SCHEMA`): the trial's
config, its outcome and final metrics. From it:

(a) ``max_stable_lr``: per cell (stabilizer x depth x warmup [x any other swept field]) the crash
    boundary: LR50 (P(crash) = 0.5) with its 90 % interval and the band lr10-lr90, from a logistic
    in log-LR fitted to every run of the cell (``orchestrator.psychometric``, the boundary search's
    own fit), with ``n_trials``, ``n_seeds``, and how the cell's search ended (``method``,
    ``converged``, ``stop_reason``, from the search's ``boundary/cells.json``; ``grid`` for a grid
    sweep); beside it the older bracket (``workloads.outcome.bracket``: the largest stable LR and
    the smallest crashed LR above it, seeds voting per LR). One table per warmup setting,
    stabilizers as rows, depths as columns; also ``max_stable_lr.json`` and ``boundary.parquet``. A
    run's class comes from its final state (``workloads.outcome``); the crash criterion is in every
    caption.
(b) ``lr_sensitivity``: Wortsman et al. (2023), Sec. 3.2: E_{lr ~ log-uniform[a, b]}[min(L(lr), L0)
    - L*], integrated with trapezoid weights in log-LR over the same range [a, b] for every cell
    (default: the smallest and largest LR of the whole table); a cell whose LRs do not cover the
    range gets no value and is flagged.
(c) ``best_loss``: the best final validation loss per cell and the LR that reached it.

When more than one non-LR axis varies, (b) and (c) are also written as comparison tables
(``write_comparison``, ``compare_pivot``): the cells without the comparison axis (warmup, else
schedule, else depth: ``comparison_layout``) as rows, its values as columns, one table per depth
(``best_loss_by_warmup_depth4.md``); ``compare_pivot`` takes any per-cell text.

Each table is written as Markdown and LaTeX (booktabs), the trials as Parquet and CSV; all are
logged as artifacts of the sweep's parent run. ``report`` draws loss vs LR (every run; one figure
per depth, every warmup on one axes), LR50 per cell with its interval (a heatmap when depth varies)
and, per cell, the crash fraction per LR with the fitted curve and its band. Every figure's file
name carries the axes it is split by (``file_stem``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from orchestrator import psychometric as psy
from orchestrator.tracking import TAG_KIND, TAG_SWEEP, TAG_TRIAL, Tracker
from workloads.outcome import (SIZE_FIELDS, DEFAULT_CRASH, DEFAULT_KAPPA, Point, best_gain, bracket, classify,
                               criterion_label, lr_sensitivity)
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
``crashed`` whether that class counts as a crash under ``crash_criterion``; ``stop_reason`` is the
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
    result ("inf", "-inf", "nan"; see TrackingCallback._finish_trial). MLflow's SQL stores write
    +-inf as +-max float (runs recorded before those tags): read back as inf."""
    if v is None and tag:
        return float(tag)
    if v is not None and abs(v) >= 1.7976931348623157e308:
        return math.copysign(math.inf, v)
    return v


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


def _point(r: dict) -> Point:
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
            groups[size_key(r)].append(_point(r))
    return {k: best_gain(v) for k, v in groups.items()}


def size_key(r: dict) -> tuple:
    return tuple(r.get(f) for f in SIZE_FIELDS)


def table_criterion(table: pa.Table, crash=DEFAULT_CRASH, kappa: float = DEFAULT_KAPPA) -> str:
    """``criterion_label`` for the finished runs of ``table``, naming how many were recorded without
    per-window baselines (old recordings: classed against the whole split's baseline)."""
    old = sum(1 for r in table.select(["status", "eval_baseline"]).to_pylist()
              if r["status"] in FINISHED and r["eval_baseline"] is None)
    return criterion_label(crash, kappa, fallback=old)


def with_outcomes(table: pa.Table, crash=DEFAULT_CRASH, kappa: float = DEFAULT_KAPPA) -> pa.Table:
    """Fill ``outcome``, ``crashed`` and ``crash_criterion``: each finished run classed within its
    cell (``workloads.outcome.classify``)."""
    rows = table.to_pylist()
    fields = cell_fields_of(table)
    cells: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        if r["status"] in FINISHED:
            cells[tuple(r[f] for f in fields)].append(i)
    outcome: list[str | None] = [None] * len(rows)
    refs = reference_gains(rows)
    for idx in cells.values():
        ref = refs[size_key(rows[idx[0]])]
        for i, c in zip(idx, classify([_point(rows[i]) for i in idx], kappa, reference_gain=ref)):
            outcome[i] = c
    crit = table_criterion(table, crash, kappa)
    table = table.set_column(table.schema.get_field_index("outcome"), "outcome", pa.array(outcome, pa.string()))
    table = table.set_column(table.schema.get_field_index("crashed"), "crashed",
                             pa.array([None if o is None else o in crash for o in outcome], pa.bool_()))
    return table.set_column(table.schema.get_field_index("crash_criterion"), "crash_criterion",
                            pa.array([crit] * len(rows), pa.string()))


# --------------------------------------------------------------------------------- the tables
@dataclasses.dataclass
class Tables:
    max_stable_lr: dict[Any, list[dict]]   # warmup -> rows (the boundary: lr50 with intervals, ...)
    lr_sensitivity: list[dict]
    best_loss: list[dict]
    cell_fields: list[str]
    final_loss: list[dict] = dataclasses.field(default_factory=list)  # one row per cell: lr -> (loss, class)
    fit_data: dict[tuple, tuple] = dataclasses.field(default_factory=dict)
    """(warmup, cell key) -> (lrs, crashed, lr_range): what each row's fit was computed from (figures)."""


BOUNDARY_FIELDS = ("lr50", "lr50_low", "lr50_high", "lr10", "lr10_low", "lr10_high", "lr90", "lr90_low",
                   "lr90_high", "interval_ratio", "band", "n_trials", "n_seeds", "converged", "stop_reason",
                   "method", "resolution")
"""The fields of a boundary row (``max_stable_lr.json``, ``boundary.parquet``) besides the cell and
the old bracket (``max_stable_lr``, ``crash_lr``, ...)."""
STOP_REASONS = {"interval": "the LR50 interval (bisect: the bracket) reached the resolution",
                "budget": "the cell's trial budget was spent first",
                "range_edge": "the boundary lies outside the LR range",
                "grid": "a grid sweep, no search",
                "running": "the search had not finished"}


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
                path = tr._call(tr.client.download_artifacts, p.info.run_id, "boundary/cells.json", tmp)
                cells = json.loads(Path(path).read_text())
            except Exception:  # noqa: BLE001 - no such artifact: not a boundary search
                continue
        out += [{**c, "sweep": p.data.tags.get(TAG_SWEEP)} for c in cells]
    return out


def _matches(record: dict, ident: dict) -> bool:
    """Whether a search's cell report is the export cell ``ident`` (stabilizer + varying fields)."""
    for k, v in record.get("values", {}).items():
        if k == "stabilizers":
            k, v = "stabilizer", stabilizer_label(tuple(str(v).split("+")))
        if k in ident and str(ident[k]) != str(v):
            return False
    return True


def _varying(table: pa.Table, exclude: set[str]) -> list[str]:
    fields = []
    for f in _config_fields():
        if f.name in exclude or f.name in ("stabilizers",):
            continue
        vals = set(table.column(f.name).to_pylist())
        if len(vals) > 1:
            fields.append(f.name)
    return fields


def ablation_tables(table: pa.Table, crash=DEFAULT_CRASH, kappa: float = DEFAULT_KAPPA,
                    sensitivity_range: tuple[float, float] | None = None,
                    searches: list[dict] | None = None) -> Tables:
    """``searches``: the boundary search's cell reports (:func:`search_records`), which say how
    each cell's search ended (method, resolution, LR range, stop reason); a cell without one came
    from a grid sweep (its fit's range: the table's LRs)."""
    rows = [r for r in table.to_pylist() if r["status"] in FINISHED]
    cell_fields = cell_fields_of(table)
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        cells[tuple(r[f] for f in cell_fields)].append(r)
    all_lrs = [r["lr"] for r in rows]
    srange = sensitivity_range or ((min(all_lrs), max(all_lrs)) if all_lrs else (1.0, 1.0))

    msl, sens, best, finals, fit_data = defaultdict(list), [], [], [], {}
    refs = reference_gains(rows)
    for key, rs in sorted(cells.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        ident = dict(zip(cell_fields, key))
        pts = [_point(r) for r in rs]
        ref = refs[size_key(rs[0])]
        b = bracket(pts, crash, kappa, reference_gain=ref)
        se, ce = b.crashed.get(b.stable_lr, (0, 0)), b.crashed.get(b.crash_lr, (0, 0))
        lrs_run = sorted({p.lr for p in pts})
        warmup = rs[0]["warmup_steps"]  # the cell's warmup, also where it is fixed (not a cell field)
        crashed = [c in crash for c in classify(pts, kappa, reference_gain=ref)]
        recs = [c for c in (searches or []) if _matches(c, ident) and (c.get("sweep") in {r["sweep"] for r in rs})]
        method = "+".join(sorted({c.get("method", "bisect") for c in recs})) or "grid"
        frange = tuple(recs[0]["lr_range"]) if recs and recs[0].get("lr_range") else srange
        res = recs[0].get("resolution") if recs else None
        res = res or psy_default_resolution(method)
        fit = psy.fit(frange, [p.lr for p in pts], crashed)
        reasons = sorted({c.get("stop_reason") or ("interval" if c.get("converged") else "budget") for c in recs})
        stop = "+".join(reasons) if recs else "grid"
        converged = (fit.width <= res) if method != "bisect" else (b.width <= res)
        if recs and stop != "interval":
            converged = False
        fit_data[(warmup, key)] = ([p.lr for p in pts], crashed, frange)
        msl[warmup].append({
            **ident, **{k: v for k, v in fit.as_dict().items() if k in BOUNDARY_FIELDS},
            "n_trials": len(pts), "n_seeds": len({p.seed for p in pts}), "converged": bool(converged),
            "stop_reason": stop, "method": method, "resolution": res,
            "max_stable_lr": b.stable_lr, "crash_lr": b.crash_lr,
            "stable_end": f"{se[0]}/{se[1]}" if se[1] else "", "crash_end": f"{ce[0]}/{ce[1]}" if ce[1] else "",
            "non_monotonic": b.non_monotonic, "lrs": len(lrs_run), "trials": len(pts),
            "above_range": fit.p_above_range >= 0.5, "below_range": fit.p_below_range >= 0.5,
            "bracket_above_range": b.crash_lr is None, "bracket_below_range": b.stable_lr is None})
        value, covers = lr_sensitivity(pts, srange)
        l0s = [p.initial_loss for p in pts if p.initial_loss is not None]
        sens.append({**ident, "lr_sensitivity": value, "covers_range": covers,
                     "range_min": srange[0], "range_max": srange[1],
                     "lr_min": lrs_run[0], "lr_max": lrs_run[-1], "lrs": len(lrs_run),
                     "initial_loss": float(np.mean(l0s)) if l0s else None})
        classes = classify(pts, kappa, reference_gain=ref)
        learned = [p for p, c in zip(pts, classes) if c not in ("diverged", "collapsed")]
        top = min(learned, key=lambda p: p.final_loss) if learned else None
        best.append({**ident, "best_final_loss": top.final_loss if top else None,
                     "at_lr": top.lr if top else None, "learned_runs": len(learned), "runs": len(pts)})
        by_lr: dict[float, list[tuple[float, str]]] = defaultdict(list)
        for p, c in zip(pts, classes):
            by_lr[p.lr].append((p.final_loss, c))
        finals.append({**ident, "by_lr": dict(by_lr)})
    return Tables(dict(msl), sens, best, cell_fields, finals, fit_data)


def psy_default_resolution(method: str) -> float:
    """The resolution a row is judged converged at when its search did not record one: the boundary
    search's default for the method (a grid is judged as psi would be)."""
    from orchestrator.boundary import DEFAULTS

    return DEFAULTS.get(method, DEFAULTS["psi"])["resolution"]


MAX_GRID_LRS = 12


def final_loss_grid(tabs: Tables) -> tuple[list[str], list[list[str]]] | None:
    """Final validation loss per cell (rows) and LR (columns), each with its class unless stable;
    the mean over seeds with the majority class. None when the cells ran no common LR grid (a
    boundary search's LRs are its own) or more than ``MAX_GRID_LRS`` LRs."""
    grids = [frozenset(r["by_lr"]) for r in tabs.final_loss]
    if not grids or len(set(grids)) != 1 or len(grids[0]) > MAX_GRID_LRS:
        return None
    lrs = sorted(grids[0])
    header = tabs.cell_fields + [f"lr {_fmt(lr)}" for lr in lrs]
    body = []
    for r in tabs.final_loss:
        cells = []
        for lr in lrs:
            runs = r["by_lr"][lr]
            counts = defaultdict(int)
            for _, c in runs:
                counts[c] += 1
            cls = max(counts, key=lambda c: (counts[c], CLASS_ORDER.index(c)))
            losses = [x for x, c in runs if c == cls]
            text = _fmt(float(np.mean(losses)))
            cells.append(text if cls == "stable" else f"{text} ({cls})")
        body.append([_fmt(r[f]) for f in tabs.cell_fields] + cells)
    return header, body


CLASS_ORDER = ("stable", "degraded", "collapsed", "diverged")


# ------------------------------------------------------------------------------- formatting
def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.3g}" if (abs(v) < 1e-2 or abs(v) >= 1e3) and v != 0 else f"{v:.4g}"
    return str(v)


def _row_fields(cell_fields: list[str]) -> list[str]:
    """A max-stable-LR table's or figure's rows: the cell without its depth (the columns) and its
    warmup (one table or figure each): the stabilizer and every other field that varies."""
    return [f for f in cell_fields if f not in ("depth", "warmup_steps")]


def _row_key(r: dict, row_fields: list[str]) -> tuple:
    return tuple(r[f] for f in row_fields)


def _row_labels(rs: list[dict], row_fields: list[str]) -> dict[tuple, str]:
    """The rows (cells without depth and warmup) of ``rs`` (trials or table rows), in order, each
    with its label: the stabilizer and every other field that varies (``none, width=64``)."""
    keys = sorted({_row_key(r, row_fields) for r in rs},
                  key=lambda k: tuple((v is None, v) for v in k))  # numbers as numbers
    for text in (_fmt, str):  # str where _fmt's rounding would give two cells one label
        labels = {k: ", ".join([str(k[0])] + [f"{f}={text(v)}" for f, v in zip(row_fields[1:], k[1:])]) for k in keys}
        if len(set(labels.values())) == len(keys):
            break
    return labels


MARKS = {"budget": "†", "range_edge": "‡", "running": "§"}
"""The mark of a row whose search did not reach its interval, per stop reason (footnoted)."""


def stop_mark(r: dict) -> str:
    """A boundary row's stop mark (``MARKS``): none for a search that converged."""
    return "" if r["converged"] else "".join(MARKS.get(x, "") for x in str(r["stop_reason"]).split("+"))


def boundary_text(r: dict, with_trials: bool = False) -> str:
    """One cell's boundary: 'LR50 [low, high]' (90 % interval), '>' / '<' when LR50 lies outside
    the LR range, the stop mark when not converged."""
    text = f"{_fmt(r['lr50'])} [{_fmt(r['lr50_low'])}, {_fmt(r['lr50_high'])}]"
    if r["above_range"]:
        text = f"> {_fmt(r['lr50_low'])} (above range)"
    elif r["below_range"]:
        text = f"< {_fmt(r['lr50_high'])} (below range)"
    text += stop_mark(r)
    if with_trials:
        text += f" ({r['n_trials']})"
    return text


def _method_label(m: str) -> str:
    return {"bisect": "bisect (one-seed look)", "psi": "psi", "grid": "grid"}.get(m, m)


def pivot_max_stable(rows: list[dict], cell_fields: list[str]) -> tuple[list[str], list[list[str]]]:
    """Stabilizer (and other fields) as rows, depth as columns. One depth: columns LR50 [90 %
    interval], the band lr10-lr90, trials (seeds), the search (method: stop reason), and the old
    one-seed-vote bracket; several depths: 'LR50 [low, high] (trials)' per depth."""
    row_fields = _row_fields(cell_fields)
    depths = sorted({r.get("depth") for r in rows}, key=lambda d: (d is None, d))
    one = len(depths) == 1
    if one:
        header = row_fields + ["LR50 [90 % interval]", "band lr10–lr90", "trials (seeds)", "search",
                               "bracket [stable, crashed]"]
        body = []
        for r in sorted(rows, key=lambda r: tuple(str(r[f]) for f in row_fields)):
            br = f"[{_fmt(r['max_stable_lr'])}, {_fmt(r['crash_lr'])}]" + (" *" if r["non_monotonic"] else "")
            body.append([_fmt(r[f]) for f in row_fields] + [
                boundary_text(r), f"{_fmt(r['lr10'])}–{_fmt(r['lr90'])} (x{r['band']:.2g})",
                f"{r['n_trials']} ({r['n_seeds']})", f"{_method_label(r['method'])}: {r['stop_reason']}", br])
        return header, body
    header = row_fields + [f"depth {d}" if d is not None else "LR50 [90 % interval]" for d in depths]
    grid: dict[tuple, dict] = defaultdict(dict)
    for r in rows:
        grid[tuple(r[f] for f in row_fields)][r.get("depth")] = boundary_text(r, with_trials=True)
    body = [[_fmt(k) for k in key] + [grid[key].get(d, "") for d in depths] for key in grid]
    return header, body


def boundary_caption(name: str, warmup, rows: list[dict], crit: str) -> str:
    methods = sorted({r["method"] for r in rows})
    res = sorted({r["resolution"] for r in rows if r.get("resolution")})
    marks = "; ".join(f"{m} = not converged: {STOP_REASONS[k]}" for k, m in MARKS.items()
                      if any(k in str(r["stop_reason"]).split("+") and not r["converged"] for r in rows))
    bis = ("; method bisect is a one-seed look, its interval is the same fit over the few LRs bisection ran"
           if "bisect" in methods else "")
    where = f", warmup {warmup} steps" if warmup is not None else ""
    return (f"Crash boundary, {name}{where}: LR50 (P(crash) = 0.5) with its 90 % interval, "
            f"from a logistic in log-LR with a {psy.LAPSE:g} lapse fitted to every run of the cell (grid "
            f"posterior, orchestrator/psychometric.py); band = LR where P(crash) is 0.1 and 0.9; "
            f"{crit}; converged = interval narrower than x{'/'.join(f'{v:.3g}' for v in res)}"
            + (f"; {marks}" if marks else "") + bis
            + "; the bracket is the older summary (largest stable LR, smallest crashed LR above it; the runs at "
              "one LR vote, a tie is a crash; * = a crashed LR below the stable one)")
# -------------------------------------------------------------------------- comparison tables
COMPARE_AXES = ("warmup_steps", "schedule", "depth")
"""The comparison axis of a table or figure: the first of these that varies (else the first other
varying field). Its values become a table's columns and a figure's line styles, so that e.g. warmup
0 and 50 of one cell sit side by side."""
SPLIT_AXES = ("depth",)
"""Fields that get a table (and a loss-vs-LR figure) of their own per value, unless one of them is
the comparison axis itself."""
_SHORT = {"warmup_steps": "warmup", "stabilizers": "stabilizer"}


@dataclasses.dataclass
class Layout:
    """How a comparison is laid out: ``rows`` label a row (the stabilizer first, then every other
    varying field that is neither the column nor a split), ``column`` is the comparison axis (None:
    only the stabilizer varies), ``split`` the fields with a table or figure per value."""

    rows: list[str]
    column: str | None
    split: list[str]


def comparison_layout(cell_fields: list[str]) -> Layout:
    """The layout of the comparison tables and of the loss-vs-LR figures for cells of
    ``cell_fields`` (``cell_fields_of``): stabilizer x warmup, per depth, for a spec that sweeps
    stabilizer, warmup and depth; stabilizer x depth when warmup is fixed."""
    others = [f for f in cell_fields if f != "stabilizer"]
    if not others:
        return Layout(list(cell_fields), None, [])
    column = next((f for f in COMPARE_AXES if f in others), others[0])
    split = [f for f in SPLIT_AXES if f in others and f != column]
    return Layout([f for f in cell_fields if f != column and f not in split], column, split)


def axis_name(field: str) -> str:
    """A field as a table header or a file name shows it (``warmup_steps`` -> ``warmup``)."""
    return _SHORT.get(field, field)


def axis_token(field: str, value: Any) -> str:
    """One axis value for a file name: ``warmup50``, ``depth4``, ``lr0.1``; the stabilizer alone
    (``weyl-qk_norm``). Only letters, digits, ``.``, ``_``, ``-``."""
    text = value if isinstance(value, str) else f"{value:g}" if isinstance(value, float) else str(value)
    text = text if field == "stabilizer" else axis_name(field) + text
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in text.replace("+", "-"))


def file_stem(stem: str, values: dict[str, Any]) -> str:
    """``stem`` followed by one token per axis value (``loss_vs_lr_depth4``)."""
    return "_".join([stem] + [axis_token(f, v) for f, v in values.items()])


def _order(v: Any) -> tuple:
    """A sort key for axis values: numbers as numbers, then strings, None last."""
    return (v is None, not isinstance(v, (int, float)), v if isinstance(v, (int, float)) else str(v))


def _sorted_values(values) -> list:
    return sorted(set(values), key=_order)


def split_rows(rows: list[dict], split: list[str]) -> list[tuple[dict[str, Any], list[dict]]]:
    """``rows`` grouped by the values of the ``split`` fields, in order: [(values, rows)]; one
    group ({}: all rows) when nothing splits."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[tuple(r.get(f) for f in split)].append(r)
    keys = sorted(groups, key=lambda k: tuple(_order(v) for v in k))
    return [(dict(zip(split, k)), groups[k]) for k in keys]


@dataclasses.dataclass
class Pivot:
    """One comparison table: ``split`` the values of the layout's split fields it is for."""

    split: dict[str, Any]
    header: list[str]
    body: list[list[str]]


def compare_pivot(rows: list[dict], cell_fields: list[str], text: Callable[[dict], str],
                  layout: Layout | None = None) -> list[Pivot]:
    """Per-cell rows (anything keyed by the cell fields: best loss, LR sensitivity, boundary
    estimates) as comparison tables: the cells without the comparison axis as rows, the comparison
    axis's values as columns, one table per value of the split fields; each entry ``text(row)``
    ("–" where a cell did not run). ``layout`` defaults to ``comparison_layout(cell_fields)``; a
    layout without a column gives one column, "value"."""
    layout = layout or comparison_layout(cell_fields)
    out = []
    for split, sub in split_rows(rows, layout.split):
        cols = _sorted_values(r.get(layout.column) for r in sub) if layout.column else [None]
        keys = sorted({tuple(r.get(f) for f in layout.rows) for r in sub}, key=lambda k: tuple(_order(v) for v in k))
        grid = {(tuple(r.get(f) for f in layout.rows), r.get(layout.column) if layout.column else None): r
                for r in sub}
        header = list(layout.rows) + ([f"{axis_name(layout.column)} {_fmt(c)}" for c in cols] if layout.column
                                      else ["value"])
        body = [[_fmt(v) for v in k] + [text(grid[(k, c)]) if (k, c) in grid else "–" for c in cols] for k in keys]
        out.append(Pivot(split, header, body))
    return out


def write_comparison(out: Path, stem: str, rows: list[dict], cell_fields: list[str], text: Callable[[dict], str],
                     caption: str) -> list[Path]:
    """Write the comparison tables of ``rows`` (``compare_pivot``) as Markdown and LaTeX, named
    ``<stem>_by_<column>[_<split>]`` (``best_loss_by_warmup_depth4.md``); nothing when only the
    stabilizer varies (the flat table is the comparison). Any per-cell rows fit, e.g. boundary
    estimates: ``write_comparison(out, "lr50", rows, tabs.cell_fields, lambda r: f"{r['lr50']:.3g}
    [{r['lr50_low']:.3g}, {r['lr50_high']:.3g}]", caption)``."""
    layout = comparison_layout(cell_fields)
    if layout.column is None:
        return []
    files = []
    for p in compare_pivot(rows, cell_fields, text, layout):
        where = ", ".join(f"{axis_name(f)} {_fmt(v)}" for f, v in p.split.items())
        files += _write(out, file_stem(f"{stem}_by_{axis_name(layout.column)}", p.split), p.header, p.body,
                        caption + (f"; {where}" if where else ""))
    return files


def _best_text(r: dict) -> str:
    if r["best_final_loss"] is None:
        return f"– (0/{r['runs']})"
    return f"{_fmt(r['best_final_loss'])} at {_fmt(r['at_lr'])} ({r['learned_runs']}/{r['runs']})"


def _sensitivity_text(r: dict) -> str:
    return _fmt(r["lr_sensitivity"]) if r["covers_range"] else f"– ({r['lrs']} lrs, short of the range)"


def to_markdown(header: list[str], body: list[list[str]], caption: str = "") -> str:
    lines = ([f"**{caption}**", ""] if caption else []) + ["| " + " | ".join(header) + " |",
                                                           "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def _tex(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                 ("≥", r"$\geq$"), ("–", "--"), ("+", "+"), ("†", r"$^\dagger$"),
                 ("‡", r"$^\ddagger$"), ("§", r"\S{}")):
        s = s.replace(a, b)
    return s


def to_latex(header: list[str], body: list[list[str]], caption: str = "", label: str = "") -> str:
    cols = "l" + "r" * (len(header) - 1)
    out = [r"\begin{table}[t]", r"\centering", rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
           " & ".join(_tex(h) for h in header) + r" \\", r"\midrule"]
    out += [" & ".join(_tex(c) for c in row) + r" \\" for row in body]
    out += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        out.append(rf"\caption{{{_tex(caption)}}}")
    if label:
        out.append(rf"\label{{{label}}}")
    out.append(r"\end{table}")
    return "\n".join(out) + "\n"


def flat_table(rows: list[dict], columns: list[str]) -> tuple[list[str], list[list[str]]]:
    return columns, [[_fmt(r.get(c)) for c in columns] for r in rows]


@dataclasses.dataclass
class ExportResult:
    out_dir: Path
    files: list[Path]
    table: pa.Table
    tables: Tables


def export(tracking_uri: str, experiment: str, sweep: str | None, out_dir: str | Path,
           crash=DEFAULT_CRASH, kappa: float = DEFAULT_KAPPA, sensitivity_range: tuple[float, float] | None = None,
           log_to_mlflow: bool = True) -> ExportResult:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = fetch_runs(tracking_uri, experiment, sweep)
    if not runs:
        raise ValueError(f"no trial runs in MLflow experiment {experiment!r}" + (f" for sweep {sweep!r}" if sweep else "")
                         + f" at {tracking_uri}")
    table = with_outcomes(runs_table(runs, experiment), crash, kappa)
    files = [out / "trials.parquet", out / "trials.csv"]
    pq.write_table(table, files[0])
    pacsv.write_csv(table, files[1])
    tabs = ablation_tables(table, crash, kappa, sensitivity_range, search_records(tracking_uri, experiment, sweep))
    name = sweep or experiment
    crit = table_criterion(table, crash, kappa)
    for warmup, rows in sorted(tabs.max_stable_lr.items(), key=lambda kv: str(kv[0])):
        h, b = pivot_max_stable(rows, tabs.cell_fields)
        files += _write(out, f"max_stable_lr_warmup{warmup}", h, b, boundary_caption(name, warmup, rows, crit))
    brows = [{"warmup_steps": w, **r} for w, rs in sorted(tabs.max_stable_lr.items(), key=lambda kv: str(kv[0]))
             for r in rs]
    pq.write_table(pa.Table.from_pylist([{k: (str(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()}
                                         for r in brows]), out / "boundary.parquet")
    files.append(out / "boundary.parquet")
    files += write_comparison(out, "lr50", brows, tabs.cell_fields, lambda r: boundary_text(r, with_trials=True),
                              boundary_caption(name, None, brows, crit)
                              + "; (n) = runs of the cell")
    cols = tabs.cell_fields + ["lr_sensitivity", "covers_range", "lrs", "initial_loss"]
    lo, hi = (tabs.lr_sensitivity[0]["range_min"], tabs.lr_sensitivity[0]["range_max"]) if tabs.lr_sensitivity else (0, 0)
    files += _write(out, "lr_sensitivity", *flat_table(tabs.lr_sensitivity, cols),
                    f"LR sensitivity (Wortsman et al. 2023), {name}: E[min(L, L0) - L*] over lr log-uniform in "
                    f"[{_fmt(lo)}, {_fmt(hi)}] (trapezoid in log-LR; L0 = loss before training, a non-finite "
                    "loss counts as L0); no value where a cell's LRs do not cover the range")
    grid = final_loss_grid(tabs)
    if grid:
        files += _write(out, "final_loss", *grid,
                        f"Final validation loss, {name}, per cell and learning rate (mean over seeds of the "
                        f"majority class, named unless stable; inf = the loss became non-finite); {crit}")
    cols = tabs.cell_fields + ["best_final_loss", "at_lr", "learned_runs", "runs"]
    files += _write(out, "best_loss", *flat_table(tabs.best_loss, cols),
                    f"Best final validation loss per cell, {name} (runs that neither diverged nor collapsed)")
    files += write_comparison(out, "best_loss", tabs.best_loss, tabs.cell_fields, _best_text,
                              f"Best final validation loss per cell, {name}, at the LR that reached it (runs "
                              "that neither diverged nor collapsed / runs)")
    files += write_comparison(out, "lr_sensitivity", tabs.lr_sensitivity, tabs.cell_fields, _sensitivity_text,
                              f"LR sensitivity (Wortsman et al. 2023), {name}: E[min(L, L0) - L*] over lr "
                              f"log-uniform in [{_fmt(lo)}, {_fmt(hi)}]; lower is less sensitive; – where a "
                              "cell's LRs do not cover the range")
    (out / "max_stable_lr.json").write_text(json.dumps(
        {"crash": list(crash), "kappa": kappa, "criterion": crit, "lapse": psy.LAPSE, "level": psy.LEVEL,
         "stop_reasons": STOP_REASONS, "tables": tabs.max_stable_lr}, indent=1, default=str))
    files.append(out / "max_stable_lr.json")
    if log_to_mlflow and sweep:
        _log_artifacts(tracking_uri, experiment, sweep, files, "tables")
    return ExportResult(out, files, table, tabs)


def _write(out: Path, stem: str, header, body, caption) -> list[Path]:
    md, tex = out / f"{stem}.md", out / f"{stem}.tex"
    md.write_text(to_markdown(header, body, caption))
    tex.write_text(to_latex(header, body, caption, label=f"tab:{stem}"))
    return [md, tex]


def _log_artifacts(tracking_uri: str, experiment: str, sweep: str, files: list[Path], folder: str) -> None:
    tr = Tracker(tracking_uri, experiment)
    parents = tr.sweep_runs(sweep)
    if parents:
        for f in files:
            tr.log_artifact(parents[0].info.run_id, str(f), folder)


# -------------------------------------------------------------------------------------- plots
MARKERS = {"stable": dict(marker="o"), "degraded": dict(marker="o", mfc="none"),
           "collapsed": dict(marker="v", ls="none"), "diverged": dict(marker="x", ls="none", mew=2)}


def _save(fig, out: Path, stem: str) -> list[Path]:
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])  # vector, for papers
    return paths


LINESTYLES = ("-", "--", ":", "-.")
CLIP = 1.25
"""The loss-vs-LR figure's y axis ends at CLIP x max(l_0, the largest final loss of a run that did
not diverge); a diverged run above that sits on the top edge with its value written beside it."""
DODGE = 0.05
"""Decades between the comparison's values (warmup 0, 50) at one LR on the loss-vs-LR figure."""


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


def _loss_figure(plt, rows: list[dict], cell_fields: list[str], crit: str, split: dict[str, Any] | None = None):
    """Final validation loss against the LR for every run of ``rows`` (the trials of one value of
    the layout's split fields, e.g. one depth; ``outcome`` filled), on one axes with one y scale: a
    colour per cell without the comparison axis (``none``, ``none, width=64``; the same colours in
    every figure of a report), a line style per value of the comparison axis (``comparison_layout``:
    warmup 0 solid, warmup 50 dashed), so that the comparison is drawn in one figure.

    Every run is drawn: stable and degraded seeds as faint points, collapsed and diverged runs with
    their class's marker; the line is the mean, at each LR, of the runs that did not diverge. A
    diverged run whose final loss fits under the axis's top (``CLIP``) is drawn where it is; one
    above it, or non-finite, sits on the top edge with its value written beside it. l_0 and the
    marginal baseline are reference lines; the legend gives each cell's number of runs. At each LR the
    comparison's values are drawn side by side (``DODGE`` decades apart, the first on the left) so
    that their markers do not hide each other. The
    artists carry ids (``gid``) for tests: ``mean|cell|column``, ``run|cell|column|class``,
    ``clipped|cell|column``."""
    from matplotlib.lines import Line2D

    layout = comparison_layout(cell_fields)
    row_fields = layout.rows
    labels = _row_labels(rows, row_fields)
    cmap = plt.cm.tab10 if len(labels) <= 10 else plt.cm.tab20
    colors = {k: cmap(i % cmap.N) for i, k in enumerate(labels)}
    cols = _sorted_values(r.get(layout.column) for r in rows) if layout.column else [None]
    styles = {c: LINESTYLES[i % len(LINESTYLES)] for i, c in enumerate(cols)}
    # the comparison's values side by side at each LR, left to right (DODGE decades apart)
    shift = {c: 10 ** (DODGE * (i - (len(cols) - 1) / 2)) for i, c in enumerate(cols)}
    l0s = [r["initial_loss"] for r in rows if _finite(r["initial_loss"])]
    bases = [r["baseline_loss"] for r in rows if _finite(r["baseline_loss"])]
    l0 = float(np.mean(l0s)) if l0s else None
    kept = [r["final_loss"] for r in rows if r["outcome"] != "diverged" and _finite(r["final_loss"])]
    top = CLIP * max([v for v in [l0, *kept] if v is not None] or [1.0])
    fig, ax = plt.subplots(figsize=(8.2, 4.6))
    stacked: dict[float, int] = defaultdict(int)  # clipped runs written at one LR so far
    counts = defaultdict(int)
    for k, name in labels.items():
        for c in cols:
            mine = [r for r in rows if _row_key(r, row_fields) == k and (c is None or r.get(layout.column) == c)]
            if not mine:
                continue
            counts[k] += len(mine)
            tag = f"{name}|{'' if c is None else _fmt(c)}"
            by_lr = defaultdict(list)
            for r in mine:
                if r["outcome"] != "diverged" and _finite(r["final_loss"]):
                    by_lr[r["lr"]].append(r["final_loss"])
            xs = sorted(by_lr)
            ax.plot([x * shift[c] for x in xs], [float(np.mean(by_lr[x])) for x in xs], color=colors[k],
                    ls=styles[c], lw=1.4, label="_mean", gid=f"mean|{tag}")
            for cls, style in MARKERS.items():
                runs = [r for r in mine if r["outcome"] == cls]
                fits = [r for r in runs if _finite(r["final_loss"]) and r["final_loss"] <= top]
                inside = [(r["lr"] * shift[c], r["final_loss"]) for r in fits]
                if inside:
                    faint = cls in ("stable", "degraded")
                    ax.plot(*zip(*inside), color=colors[k], ms=4 if faint else 6, alpha=0.35 if faint else 0.9,
                            label="_run", gid=f"run|{tag}|{cls}", **{**style, "ls": "none"})
                off = [r for r in runs if all(r is not f for f in fits)]
                if off:
                    ax.plot([r["lr"] * shift[c] for r in off], [top] * len(off), color=colors[k], ms=6, alpha=0.9,
                            clip_on=False, label="_clipped", gid=f"clipped|{tag}", **{**style, "ls": "none"})
                for r in off:
                    n = stacked[r["lr"]]
                    stacked[r["lr"]] += 1
                    value = _fmt(r["final_loss"]) if r["final_loss"] is not None else "inf"
                    ax.annotate(value, (r["lr"] * shift[c], top), textcoords="offset points", xytext=(5, -9 - 7 * n),
                                fontsize=6, color=colors[k], gid=f"clipped|{tag}")
    if l0 is not None:
        ax.axhline(l0, color="0.3", lw=0.8, ls="--", label="_l0")
    if bases:
        ax.axhline(float(np.mean(bases)), color="0.3", lw=0.8, ls=":", label="_baseline")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final validation loss")
    ax.set_ylim(top=top)
    where = ", ".join(f"{axis_name(f)} {_fmt(v)}" for f, v in (split or {}).items())
    ax.set_title("final loss vs learning rate" + (f", {where}" if where else ""), fontsize=9)
    handles = [Line2D([], [], color=colors[k], lw=1.4, label=f"{name} ({counts[k]} runs)")
               for k, name in labels.items() if counts[k]]
    if layout.column:
        handles += [Line2D([], [], color="k", lw=1.2, ls=styles[c], label=f"{axis_name(layout.column)} {_fmt(c)}")
                    for c in cols]
    handles += [Line2D([], [], color="k", ls="none", ms=6, alpha=0.35 if c in ("stable", "degraded") else 0.9,
                       label={"stable": "stable (each seed)", "diverged": "diverged (above the axis: on its top "
                              "edge, value written)"}.get(c, c), **{k: v for k, v in MARKERS[c].items() if k != "ls"})
                for c in MARKERS]
    handles += [Line2D([], [], color="0.3", ls="--", lw=0.8, label="l_0 (before training)"),
                Line2D([], [], color="0.3", ls=":", lw=0.8, label="marginal baseline")]
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    note = "line: mean over the runs that did not diverge"
    if len(cols) > 1:
        note += (f"; at each LR the points of {axis_name(layout.column)} "
                 f"{', '.join(_fmt(c) for c in cols)} are drawn left to right")
    fig.text(0.01, 0.01, f"{note}; {crit}", fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def loss_figures(table: pa.Table, out: Path, crit: str) -> list[Path]:
    """The loss-vs-LR figures of a trials table with outcomes (``with_outcomes``; also a
    ``trials.parquet`` that export wrote): one per value of the split fields (depth), every warmup on
    its one axes (``_loss_figure``), as PNG and PDF named ``loss_vs_lr[_depthD]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = cell_fields_of(table)
    rows = [r for r in table.to_pylist() if r["status"] in FINISHED]
    files: list[Path] = []
    for split, sub in split_rows(rows, comparison_layout(fields).split):
        fig = _loss_figure(plt, sub, fields, crit, split)
        files += _save(fig, Path(out), file_stem("loss_vs_lr", split))
        plt.close(fig)
    return files


@dataclasses.dataclass
class BoundaryGrid:
    """What the crash-boundary figure of one warmup draws: ``rows`` (labels, in order), ``depths``
    (the columns; ``[None]`` when depth does not vary) and ``cells[(row, depth)]``, a
    ``max_stable_lr`` row."""

    rows: list[str]
    depths: list
    cells: dict[tuple[str, Any], dict]


def boundary_grid(msl: list[dict], cell_fields: list[str]) -> BoundaryGrid:
    """The ``max_stable_lr`` rows of one warmup, a row per cell without its depth: the stabilizer
    and every other field that varies (``none, width=64``), so that cells differing only in e.g.
    width stay apart; depth as the columns."""
    row_fields = _row_fields(cell_fields)
    keyed = {(_row_key(c, row_fields), c.get("depth")): c for c in msl}
    labels = _row_labels(msl, row_fields)
    depths = sorted({d for _, d in keyed}, key=lambda d: (d is None, d))
    return BoundaryGrid(list(labels.values()), depths, {(labels[k], d): c for (k, d), c in keyed.items()})


def _log_lr_axis(ax) -> None:
    """A learning-rate y axis: log scale, plain numbers (minor ticks at 2 and 5), a light grid."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    ax.grid(True, which="both", axis="y", lw=0.3, alpha=0.5)


def _boundary_points(plt, grid: BoundaryGrid, warmup, crit: str):
    """One-dimensional cells: LR50 per cell with its 90 % interval as an error bar (a triangle where
    LR50 lies outside the LR range), the band lr10-lr90 as a faint bar, the stop mark of a cell that
    did not converge, and its trial count."""
    rows = grid.rows
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 + 0.9 * len(rows)), 3.8))
    for i, s in enumerate(rows):
        c = grid.cells.get((s, None))  # depth does not vary: not part of the cell
        if not c:
            continue
        if c["above_range"] or c["below_range"]:
            y = c["lr50_low"] if c["above_range"] else c["lr50_high"]
            ax.plot([i], [y], "^" if c["above_range"] else "v", color="C2" if c["above_range"] else "C3", ms=8)
            ax.annotate("above the range" if c["above_range"] else "below the range", (i, y),
                        textcoords="offset points", xytext=(0, -16), ha="center", fontsize=7)
        else:
            ax.plot([i, i], [c["lr10"], c["lr90"]], color="C0", lw=6, alpha=0.18, solid_capstyle="butt")
            ax.errorbar([i], [c["lr50"]], yerr=[[c["lr50"] - c["lr50_low"]], [c["lr50_high"] - c["lr50"]]],
                        fmt="o", color="C0", capsize=4)
            y = c["lr50_high"]
        ax.annotate(f"{c['n_trials']}{stop_mark(c)}", (i, y), textcoords="offset points", xytext=(0, 5), ha="center",
                    fontsize=7)
    _log_lr_axis(ax)
    ax.set_xticks(range(len(rows)), rows, rotation=30, ha="right")
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylabel("LR50 (bar: 90 % interval;\nshade: lr10-lr90)")
    ax.set_title(f"crash boundary, warmup {warmup} (number: trials; † budget spent)", fontsize=9)
    fig.text(0.01, 0.01, crit, fontsize=6)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def boundary_compare_figures(plt, brows: list[dict], cell_fields: list[str], out: Path, crit: str) -> list[Path]:
    """LR50 of every cell on one shared log axis, one figure per value of the split fields (depth):
    a group of points per cell without the comparison axis (``comparison_layout``: warmup, else
    schedule, else depth), a point per value of that axis side by side within the group, each with
    its 90 % interval as an error bar and its trial count (and the stop mark of a search that did not
    converge); a triangle where LR50 lies outside the LR range. Named ``lr50_by_<axis>[_depthD]``;
    nothing when only the stabilizer varies (``_boundary_points`` is that figure)."""
    from matplotlib.lines import Line2D

    layout = comparison_layout(cell_fields)
    if layout.column is None:
        return []
    files: list[Path] = []
    for split, sub in split_rows(brows, layout.split):
        keys = sorted({tuple(r.get(f) for f in layout.rows) for r in sub}, key=lambda k: tuple(_order(v) for v in k))
        cols = _sorted_values(r.get(layout.column) for r in sub)
        width = 0.8 / len(cols)
        fig, ax = plt.subplots(figsize=(max(4.5, 1.4 + 1.0 * len(keys)), 3.9))
        for r in sub:
            i = keys.index(tuple(r.get(f) for f in layout.rows))
            j = cols.index(r.get(layout.column))
            x, color = i - 0.4 + width * (j + 0.5), f"C{j % 10}"
            if r["above_range"] or r["below_range"]:
                y = r["lr50_low"] if r["above_range"] else r["lr50_high"]
                ax.plot([x], [y], "^" if r["above_range"] else "v", color=color, ms=7, gid=f"edge|{i}|{j}")
            else:
                y = r["lr50_high"]
                ax.errorbar([x], [r["lr50"]], yerr=[[r["lr50"] - r["lr50_low"]], [r["lr50_high"] - r["lr50"]]],
                            fmt="o", color=color, capsize=3, ms=4, gid=f"lr50|{i}|{j}")
            ax.annotate(f"{r['n_trials']}{stop_mark(r)}", (x, y), textcoords="offset points", xytext=(0, 4), ha="center",
                        fontsize=6)
        _log_lr_axis(ax)
        labels = [", ".join(_fmt(v) if f == "stabilizer" else f"{axis_name(f)}={_fmt(v)}"
                            for f, v in zip(layout.rows, k)) for k in keys]
        ax.set_xticks(range(len(keys)), labels, rotation=30, ha="right")
        ax.set_xlim(-0.6, len(keys) - 0.4)
        ax.set_ylabel("LR50 (bar: 90 % interval)")
        where = ", ".join(f"{axis_name(f)} {_fmt(v)}" for f, v in split.items())
        ax.set_title("crash boundary by " + axis_name(layout.column) + (f", {where}" if where else "")
                     + " (number: trials; † budget spent)", fontsize=9)
        ax.legend(handles=[Line2D([], [], color=f"C{j % 10}", marker="o", ls="none",
                                  label=f"{axis_name(layout.column)} {_fmt(c)}") for j, c in enumerate(cols)],
                  fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
        fig.text(0.01, 0.01, crit, fontsize=6, wrap=True)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        files += _save(fig, out, file_stem(f"lr50_by_{axis_name(layout.column)}", split))
        plt.close(fig)
    return files


def _boundary_fits(plt, tabs: Tables, warmup, crit: str):
    """A panel per cell: the fraction of runs that crashed at each LR (marker area ~ runs), the
    fitted P(crash) (posterior median) with its 90 % band, LR50's interval shaded."""
    rows = tabs.max_stable_lr.get(warmup, [])
    n = len(rows)
    ncol = min(n, 3)
    nrow = math.ceil(n / ncol) if n else 1
    fig, axes = plt.subplots(nrow, max(ncol, 1), figsize=(3.3 * max(ncol, 1), 2.6 * nrow + 0.4), squeeze=False,
                             sharey=True)
    cf = tabs.cell_fields
    for ax, r in zip(axes.ravel(), rows):
        lrs, crashed, frange = tabs.fit_data[(warmup, tuple(r[f] for f in cf))]
        grid = psy.make_grid(frange)
        post = psy.posterior(grid, lrs, crashed)
        xs = np.geomspace(frange[0] / 1.5, frange[1] * 1.5, 120)
        p = psy.p_crash(grid, np.log(xs))                                # (X, M, S)
        q = np.array([psy.weighted_quantiles(p[i], post, (0.05, 0.5, 0.95)) for i in range(len(xs))])
        ax.fill_between(xs, q[:, 0], q[:, 2], color="C0", alpha=0.2, lw=0)
        ax.plot(xs, q[:, 1], color="C0", lw=1.2)
        if not (r["above_range"] or r["below_range"]):
            ax.axvspan(r["lr50_low"], r["lr50_high"], color="C1", alpha=0.15, lw=0)
        by: dict[float, list[bool]] = defaultdict(list)
        for lr, c in zip(lrs, crashed):
            by[lr].append(c)
        ux = sorted(by)
        ax.scatter(ux, [np.mean(by[x]) for x in ux], s=[12 * len(by[x]) for x in ux], color="k", zorder=3)
        ax.set_xscale("log")
        ax.set_ylim(-0.05, 1.05)
        label = ", ".join(_fmt(r[f]) for f in cf if f not in ("warmup_steps",))
        mark = "" if r["converged"] else " " + stop_mark(r)
        ax.set_title(f"{label}: LR50 {_fmt(r['lr50'])} [{_fmt(r['lr50_low'])}, {_fmt(r['lr50_high'])}]{mark}",
                     fontsize=7)
        ax.set_xlabel("learning rate", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel("P(crash)", fontsize=7)
    fig.text(0.01, 0.01, f"dots: fraction of runs crashed per LR (area ~ runs); line and blue band: fitted "
             f"P(crash), median and 90 %; orange: LR50's 90 % interval; warmup {warmup}; {crit}",
             fontsize=5.5, wrap=True)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def _boundary_heatmap(plt, grid: BoundaryGrid, warmup, crit: str):
    """Two axes (cell without its depth x depth): a heatmap of LR50 on a log colour scale, each cell
    with its interval and stop mark written in."""
    from matplotlib.colors import LogNorm

    rows, depths = grid.rows, grid.depths
    lrs = np.full((len(rows), len(depths)), np.nan)
    for i, s in enumerate(rows):
        for j, d in enumerate(depths):
            c = grid.cells.get((s, d))
            if c and not (c["above_range"] or c["below_range"]):
                lrs[i, j] = c["lr50"]
    fig, ax = plt.subplots(figsize=(3.4 + 1.3 * len(depths), 1.4 + 0.5 * len(rows)))
    finite = lrs[np.isfinite(lrs)]
    norm = LogNorm(vmin=finite.min(), vmax=finite.max()) if finite.size and finite.min() < finite.max() else None
    im = ax.imshow(lrs, cmap="viridis", aspect="auto", norm=norm)
    ax.set_xticks(range(len(depths)), [f"depth {d}" for d in depths])
    ax.set_yticks(range(len(rows)), rows)
    for i in range(len(rows)):
        for j in range(len(depths)):
            c = grid.cells.get((rows[i], depths[j]))
            if not c:
                continue
            txt = boundary_text(c).replace(" [", "\n[")
            rgba = im.cmap(im.norm(lrs[i, j])) if np.isfinite(lrs[i, j]) else (1, 1, 1, 1)
            lum = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
            ax.text(j, i, txt, ha="center", va="center", fontsize=8, color="k" if lum > 0.5 else "w")
    fig.colorbar(im, ax=ax, label="LR50")
    ax.set_title(f"crash boundary LR50 [90 % interval], warmup {warmup}", fontsize=9)
    fig.text(0.01, 0.01, crit, fontsize=6)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def report(tracking_uri: str, experiment: str, sweep: str | None, out_dir: str | Path,
           crash=DEFAULT_CRASH, kappa: float = DEFAULT_KAPPA, sensitivity_range: tuple[float, float] | None = None,
           log_to_mlflow: bool = True) -> list[Path]:
    """Loss vs LR (``_loss_figure``: every run, one figure per depth with every warmup on its axes;
    named ``loss_vs_lr[_depthD]``), the crash boundary (LR50 with its interval; a heatmap when depth
    varies too) and the fitted curves (crash fraction per LR with the fit and its band, a panel per
    cell), as PNG and PDF; and the forensic
    figures (``orchestrator.forensics``: AUC of each probe against the fraction of training, and one
    figure per crashed run with its probes, warnings and crash step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ex = export(tracking_uri, experiment, sweep, out_dir, crash, kappa, sensitivity_range, log_to_mlflow=False)
    out = Path(out_dir)
    rows = [r for r in ex.table.to_pylist() if r["status"] in FINISHED]
    vary_depth = "depth" in ex.tables.cell_fields
    for r in rows:
        if not vary_depth:
            r["depth"] = None
    warmups = sorted({r["warmup_steps"] for r in rows})
    crit = table_criterion(ex.table, crash, kappa)
    files: list[Path] = []
    files += loss_figures(ex.table, out, crit)
    brows = [{"warmup_steps": w, **r} for w, rs in ex.tables.max_stable_lr.items() for r in rs]
    files += boundary_compare_figures(plt, brows, ex.tables.cell_fields, out, crit)
    for w in warmups:
        grid = boundary_grid(ex.tables.max_stable_lr.get(w, []), ex.tables.cell_fields)
        fig = (_boundary_heatmap if vary_depth else _boundary_points)(plt, grid, w, crit)
        files += _save(fig, out, f"max_stable_lr_warmup{w}")
        plt.close(fig)
        fig = _boundary_fits(plt, ex.tables, w, crit)
        files += _save(fig, out, f"boundary_fit_warmup{w}")
        plt.close(fig)
    from orchestrator.forensics import forensics

    _, forensic = forensics(tracking_uri, experiment, sweep, out, crash, kappa, log_to_mlflow=False, with_figures=True,
                            table=ex.table)
    files += [f for f in forensic if f.suffix in (".png", ".pdf")]
    if log_to_mlflow and sweep:
        _log_artifacts(tracking_uri, experiment, sweep, ex.files + files, "report")
    return files

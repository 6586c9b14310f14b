"""Ablation tables and plots, read back from MLflow alone (never from Ray's files).

``runs_table`` builds a pyarrow Table with one row per trial (schema :data:`SCHEMA`): the trial's
config, its outcome and final metrics. From it:

(a) ``max_stable_lr``: per cell (stabilizer x depth x warmup [x any other swept field]) the largest
    stable LR and the smallest crashed LR above it (``workloads.outcome.bracket``, the boundary
    search's own function: seeds vote per LR, a tie is a crash), with how many seeds crashed at each
    end; one table per warmup setting, stabilizers as rows, depths as columns. A run's class comes
    from its final state (``workloads.outcome``); the crash criterion is in every caption.
(b) ``lr_sensitivity``: Wortsman et al. (2023), Sec. 3.2: E_{lr ~ log-uniform[a, b]}[min(L(lr), L0)
    - L*], integrated with trapezoid weights in log-LR over the same range [a, b] for every cell
    (default: the smallest and largest LR of the whole table); a cell whose LRs do not cover the
    range gets no value and is flagged.
(c) ``best_loss``: the best final validation loss per cell and the LR that reached it.

Each table is written as Markdown and LaTeX (booktabs), the trials as Parquet and CSV; all are
logged as artifacts of the sweep's parent run. ``report`` draws loss-vs-LR curves (a panel per
depth, one curve per cell, crashed runs marked) and a heatmap of the max stable LR.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from orchestrator.tracking import TAG_KIND, TAG_SWEEP, TAG_TRIAL, Tracker
from workloads.outcome import DEFAULT_CRASH, DEFAULT_KAPPA, Point, bracket, classify, criterion_label, lr_sensitivity
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
                  "throughput")
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
``initial_loss`` is l_0 and ``baseline_loss`` the data's marginal baseline; ``last/*`` are the last
probed values."""


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
    return Point(r["lr"], r["seed"] or 0, final, r["initial_loss"], r["baseline_loss"], r["stop_reason"])


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
    for idx in cells.values():
        for i, c in zip(idx, classify([_point(rows[i]) for i in idx], kappa)):
            outcome[i] = c
    crit = criterion_label(crash, kappa)
    table = table.set_column(table.schema.get_field_index("outcome"), "outcome", pa.array(outcome, pa.string()))
    table = table.set_column(table.schema.get_field_index("crashed"), "crashed",
                             pa.array([None if o is None else o in crash for o in outcome], pa.bool_()))
    return table.set_column(table.schema.get_field_index("crash_criterion"), "crash_criterion",
                            pa.array([crit] * len(rows), pa.string()))


# --------------------------------------------------------------------------------- the tables
@dataclasses.dataclass
class Tables:
    max_stable_lr: dict[Any, list[dict]]   # warmup -> rows
    lr_sensitivity: list[dict]
    best_loss: list[dict]
    cell_fields: list[str]
    final_loss: list[dict] = dataclasses.field(default_factory=list)  # one row per cell: lr -> (loss, class)


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
                    sensitivity_range: tuple[float, float] | None = None) -> Tables:
    rows = [r for r in table.to_pylist() if r["status"] in FINISHED]
    cell_fields = cell_fields_of(table)
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        cells[tuple(r[f] for f in cell_fields)].append(r)
    all_lrs = [r["lr"] for r in rows]
    srange = sensitivity_range or ((min(all_lrs), max(all_lrs)) if all_lrs else (1.0, 1.0))

    msl, sens, best, finals = defaultdict(list), [], [], []
    for key, rs in sorted(cells.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        ident = dict(zip(cell_fields, key))
        pts = [_point(r) for r in rs]
        b = bracket(pts, crash, kappa)
        se, ce = b.crashed.get(b.stable_lr, (0, 0)), b.crashed.get(b.crash_lr, (0, 0))
        lrs_run = sorted({p.lr for p in pts})
        msl[rs[0]["warmup_steps"]].append({  # the cell's warmup, also where it is fixed (not a cell field)
            **ident, "max_stable_lr": b.stable_lr, "crash_lr": b.crash_lr,
            "stable_end": f"{se[0]}/{se[1]}" if se[1] else "", "crash_end": f"{ce[0]}/{ce[1]}" if ce[1] else "",
            "non_monotonic": b.non_monotonic, "lrs": len(lrs_run), "trials": len(pts),
            "above_range": b.crash_lr is None, "below_range": b.stable_lr is None})
        value, covers = lr_sensitivity(pts, srange)
        l0s = [p.initial_loss for p in pts if p.initial_loss is not None]
        sens.append({**ident, "lr_sensitivity": value, "covers_range": covers,
                     "range_min": srange[0], "range_max": srange[1],
                     "lr_min": lrs_run[0], "lr_max": lrs_run[-1], "lrs": len(lrs_run),
                     "initial_loss": float(np.mean(l0s)) if l0s else None})
        classes = classify(pts, kappa)
        learned = [p for p, c in zip(pts, classes) if c not in ("diverged", "collapsed")]
        top = min(learned, key=lambda p: p.final_loss) if learned else None
        best.append({**ident, "best_final_loss": top.final_loss if top else None,
                     "at_lr": top.lr if top else None, "learned_runs": len(learned), "runs": len(pts)})
        by_lr: dict[float, list[tuple[float, str]]] = defaultdict(list)
        for p, c in zip(pts, classes):
            by_lr[p.lr].append((p.final_loss, c))
        finals.append({**ident, "by_lr": dict(by_lr)})
    return Tables(dict(msl), sens, best, cell_fields, finals)


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


def pivot_max_stable(rows: list[dict], cell_fields: list[str]) -> tuple[list[str], list[list[str]]]:
    """Stabilizer (and other fields) as rows, depth as columns; cell text 'lr [stable, crash]'."""
    row_fields = _row_fields(cell_fields)
    depths = sorted({r.get("depth") for r in rows}, key=lambda d: (d is None, d))
    one = len(depths) == 1
    header = row_fields + [f"depth {d}" if d is not None else "max stable lr [bracket]" for d in depths]
    header += ["trials"] if one else []
    grid: dict[tuple, dict] = defaultdict(dict)
    trials: dict[tuple, int] = {}
    for r in rows:
        text = _fmt(r["max_stable_lr"]) if not r["above_range"] else f"≥ {_fmt(r['max_stable_lr'])}"
        if r["below_range"]:
            text = f"< {_fmt(r['crash_lr'])}"
        elif r["crash_lr"] is not None:
            text += f" [{_fmt(r['max_stable_lr'])}, {_fmt(r['crash_lr'])}]"
        seeds = [s for s in (r["stable_end"], r["crash_end"]) if s]
        if any(int(s.split("/")[1]) > 1 for s in seeds):
            text += f" (crashed {r['stable_end'] or '-'}, {r['crash_end'] or '-'})"
        if r["non_monotonic"]:
            text += " *"
        if not one:
            text += f" ({r['trials']})"
        grid[tuple(r[f] for f in row_fields)][r.get("depth")] = text
        trials[tuple(r[f] for f in row_fields)] = r["trials"]
    body = [[_fmt(k) for k in key] + [grid[key].get(d, "") for d in depths] + ([str(trials[key])] if one else [])
            for key in grid]
    return header, body


def to_markdown(header: list[str], body: list[list[str]], caption: str = "") -> str:
    lines = ([f"**{caption}**", ""] if caption else []) + ["| " + " | ".join(header) + " |",
                                                           "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def _tex(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                 ("≥", r"$\geq$"), ("–", "--"), ("+", "+")):
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
    tabs = ablation_tables(table, crash, kappa, sensitivity_range)
    name = sweep or experiment
    crit = criterion_label(crash, kappa)
    for warmup, rows in sorted(tabs.max_stable_lr.items(), key=lambda kv: str(kv[0])):
        h, b = pivot_max_stable(rows, tabs.cell_fields)
        cap = (f"Max stable learning rate, {name}, warmup {warmup} steps: the largest stable LR [and the smallest "
               f"crashed LR above it]; {crit}; a cell's seeds vote per LR, a tie is a crash; "
               "(crashed seeds at the stable, crash end) where an end ran with several seeds; "
               "* = a crashed LR below the stable one (non-monotonic)")
        files += _write(out, f"max_stable_lr_warmup{warmup}", h, b, cap)
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
    (out / "max_stable_lr.json").write_text(json.dumps(
        {"crash": list(crash), "kappa": kappa, "criterion": crit, "tables": tabs.max_stable_lr}, indent=1, default=str))
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


def _loss_panels(plt, rows: list[dict], warmup, depths: list, cell_fields: list[str], crit: str):
    """The loss-vs-LR figure of one warmup: a panel per depth, a curve per cell without its depth
    (the stabilizer and every other field that varies, labelled as on the crash-boundary figure:
    ``none, width=64``), each in its own colour (kept across the warmups' figures), its runs marked
    by class."""
    from matplotlib.lines import Line2D

    row_fields = _row_fields(cell_fields)
    labels = _row_labels(rows, row_fields)  # every warmup's cells: one colour per cell in all figures
    cmap = plt.cm.tab10 if len(labels) <= 10 else plt.cm.tab20
    colors = {k: cmap(i % cmap.N) for i, k in enumerate(labels)}
    fig, axes = plt.subplots(1, len(depths), figsize=(3.6 * len(depths) + 2.4, 4.0), squeeze=False, sharey=True)
    for ax, d in zip(axes[0], depths):
        sub = [r for r in rows if r["warmup_steps"] == warmup and r["depth"] == d]
        l0s = [r["initial_loss"] for r in sub if r["initial_loss"]]
        bases = [r["baseline_loss"] for r in sub if r["baseline_loss"]]
        l0 = float(np.mean(l0s)) if l0s else None
        top = (l0 or max([r["final_loss"] for r in sub if r["final_loss"] and math.isfinite(r["final_loss"])] or [1]))
        for k, name in labels.items():
            mine = [r for r in sub if _row_key(r, row_fields) == k]
            if not mine:
                continue
            by_lr = defaultdict(list)  # the cell's seeds at one LR
            for r in mine:
                if r["final_loss"] is not None and math.isfinite(r["final_loss"]) and r["outcome"] != "diverged":
                    by_lr[r["lr"]].append(r["final_loss"])
            xs = sorted(by_lr)
            ax.plot(xs, [np.mean(by_lr[x]) for x in xs], "-", color=colors[k], lw=1.2, label=name)
            for cls, style in MARKERS.items():
                # a diverged run ended at or above l_0 (or non-finite): drawn on the top edge, off the scale
                pts = [(r["lr"], 1.08 * top if cls == "diverged" else r["final_loss"])
                       for r in mine if r["outcome"] == cls]
                if pts:
                    ax.plot(*zip(*pts), color=colors[k], ms=6, label=f"_{name} {cls}", **{"ls": "none", **style})
        if l0 is not None:
            ax.axhline(l0, color="0.3", lw=0.8, ls="--")
        if bases:
            ax.axhline(float(np.mean(bases)), color="0.3", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylim(top=1.12 * top)
        ax.set_title(f"depth {d}, warmup {warmup}" if d is not None else f"warmup {warmup}")
    axes[0][0].set_ylabel("final validation loss")
    here = {_row_key(r, row_fields) for r in rows if r["warmup_steps"] == warmup}
    handles = [Line2D([], [], color=colors[k], lw=1.2, label=name) for k, name in labels.items() if k in here]
    handles += [Line2D([], [], color="k", ls="none", ms=6, label=c if c != "diverged" else "diverged (off scale)",
                       **{k: v for k, v in MARKERS[c].items() if k != "ls"}) for c in MARKERS]
    handles += [Line2D([], [], color="0.3", ls="--", lw=0.8, label="l_0 (before training)"),
                Line2D([], [], color="0.3", ls=":", lw=0.8, label="marginal baseline")]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.text(0.01, 0.01, crit, fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


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


def _boundary_points(plt, grid: BoundaryGrid, warmup, crit: str):
    """One-dimensional cells: the max stable LR per cell with its bracket as an error bar."""
    rows = grid.rows
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 + 0.9 * len(rows)), 3.8))
    for i, s in enumerate(rows):
        c = grid.cells.get((s, None))  # depth does not vary: not part of the cell
        if not c:
            continue
        lo, hi = c["max_stable_lr"], c["crash_lr"]
        if lo is not None and hi is not None:
            ax.errorbar([i], [lo], yerr=[[0], [hi - lo]], fmt="o", color="C0", capsize=4)
        elif lo is not None:  # stable at the top of the range
            ax.plot([i], [lo], "^", color="C2", ms=8)
            ax.annotate("stable at the\ntop of the range", (i, lo), textcoords="offset points", xytext=(0, -24),
                        ha="center", fontsize=7)
        elif hi is not None:  # crashed at the bottom of the range
            ax.plot([i], [hi], "v", color="C3", ms=8)
            ax.annotate("crashed at bottom", (i, hi), textcoords="offset points", xytext=(0, -14), ha="center",
                        fontsize=7)
        if c["non_monotonic"]:
            ax.annotate("*", (i, lo or hi), textcoords="offset points", xytext=(6, 0), fontsize=10)
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    ax.grid(True, which="both", axis="y", lw=0.3, alpha=0.5)
    ax.set_xticks(range(len(rows)), rows, rotation=30, ha="right")
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylabel("max stable LR (bar: up to the\nsmallest crashed LR)")
    ax.set_title(f"crash boundary, warmup {warmup}", fontsize=9)
    fig.text(0.01, 0.01, crit, fontsize=6)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def _boundary_heatmap(plt, grid: BoundaryGrid, warmup, crit: str):
    """Two axes (cell without its depth x depth): a heatmap of the max stable LR on a log colour scale."""
    from matplotlib.colors import LogNorm

    rows, depths = grid.rows, grid.depths
    lrs = np.full((len(rows), len(depths)), np.nan)
    for i, s in enumerate(rows):
        for j, d in enumerate(depths):
            c = grid.cells.get((s, d))
            if c and c["max_stable_lr"]:
                lrs[i, j] = c["max_stable_lr"]
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
            txt = ("≥ " if c["above_range"] else "") + _fmt(c["max_stable_lr"]) if c["max_stable_lr"] else \
                f"< {_fmt(c['crash_lr'])}"
            rgba = im.cmap(im.norm(lrs[i, j])) if np.isfinite(lrs[i, j]) else (1, 1, 1, 1)
            lum = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
            ax.text(j, i, txt, ha="center", va="center", fontsize=8, color="k" if lum > 0.5 else "w")
    fig.colorbar(im, ax=ax, label="max stable LR")
    ax.set_title(f"max stable LR, warmup {warmup}", fontsize=9)
    fig.text(0.01, 0.01, crit, fontsize=6)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def report(tracking_uri: str, experiment: str, sweep: str | None, out_dir: str | Path,
           crash=DEFAULT_CRASH, kappa: float = DEFAULT_KAPPA, sensitivity_range: tuple[float, float] | None = None,
           log_to_mlflow: bool = True) -> list[Path]:
    """Loss-vs-LR panels (classes marked, l_0 and the baseline drawn) and the crash boundary (points
    with bracket error bars; a heatmap when depth varies too), as PNG and PDF; and the forensic
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
    depths = sorted({r["depth"] for r in rows}, key=lambda d: (d is None, d))
    crit = criterion_label(crash, kappa)
    files: list[Path] = []
    for w in warmups:
        fig = _loss_panels(plt, rows, w, depths, ex.tables.cell_fields, crit)
        files += _save(fig, out, f"loss_vs_lr_warmup{w}")
        plt.close(fig)
        grid = boundary_grid(ex.tables.max_stable_lr.get(w, []), ex.tables.cell_fields)
        fig = (_boundary_heatmap if vary_depth else _boundary_points)(plt, grid, w, crit)
        files += _save(fig, out, f"max_stable_lr_warmup{w}")
        plt.close(fig)
    from orchestrator.forensics import forensics

    _, forensic = forensics(tracking_uri, experiment, sweep, out, crash, kappa, log_to_mlflow=False, with_figures=True,
                            table=ex.table)
    files += [f for f in forensic if f.suffix in (".png", ".pdf")]
    if log_to_mlflow and sweep:
        _log_artifacts(tracking_uri, experiment, sweep, ex.files + files, "report")
    return files

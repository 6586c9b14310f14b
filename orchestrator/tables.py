"""The ablation tables, from the trials table of ``orchestrator.runs`` (outcomes filled).

``ablation_tables`` computes per cell (stabilizer x depth x warmup [x any other swept field]):

(a) ``max_stable_lr``: the crash boundary: LR50 (P(crash) = 0.5) with its 90 % interval and the band
    lr10-lr90, from a logistic in log-LR fitted to every run of the cell (``orchestrator.psychometric``,
    the boundary search's own fit), with ``n_trials``, ``n_seeds``, and how the cell's search ended
    (``method``, ``converged``, ``stop_reason``, from the search's ``boundary/cells.json``; ``grid``
    for a grid sweep); beside it the older bracket (``workloads.outcome.bracket``: the largest stable
    LR and the smallest crashed LR above it, seeds voting per LR). One table per warmup setting,
    stabilizers as rows, depths as columns (``pivot_max_stable``, ``boundary_caption``). A run's class
    comes from its final state (``workloads.outcome``); the crash criterion is in every caption.
(b) ``lr_sensitivity``: Wortsman et al. (2023), Sec. 3.2: E_{lr ~ log-uniform[a, b]}[min(L(lr), L0)
    - L*], integrated with trapezoid weights in log-LR over the same range [a, b] for every cell
    (default: the smallest and largest LR of the whole table); a cell whose LRs do not cover the
    range gets no value and is flagged.
(c) ``best_loss``: the best final validation loss per cell and the LR that reached it; and
    ``final_loss_grid``, the final loss per cell and LR of a grid sweep.

When more than one non-LR axis varies, (b) and (c) are also written as comparison tables
(``write_comparison``, ``compare_pivot``): the cells without the comparison axis (warmup, else
schedule, else depth: ``comparison_layout``) as rows, its values as columns, one table per depth
(``best_loss_by_warmup_depth4.md``); ``compare_pivot`` takes any per-cell text. The figures
(``orchestrator.figures``) use the same layout and row labels (``row_labels``).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from orchestrator import psychometric as psy
from orchestrator.runs import FINISHED, cell_fields_of, judge_rows, run_point
from orchestrator.writers import axis_name, file_stem, fmt, write_table
from workloads.outcome import DEFAULT_CRASH, DEFAULT_KAPPA, bracket, lr_sensitivity
from workloads.stabilizers import label as stabilizer_label


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
                   "lr90_high", "interval_ratio", "band", "censored", "lr50_bound", "crash_floor", "stable_lapse",
                   "n_trials", "n_seeds", "converged", "stop_reason", "method", "resolution")
"""The fields of a boundary row (``max_stable_lr.json``, ``boundary.parquet``) besides the cell and
the old bracket (``max_stable_lr``, ``crash_lr``, ...)."""
STOP_REASONS = {"interval": "the LR50 interval (bisect: the bracket) reached the resolution",
                "budget": "the cell's trial budget was spent first",
                "range_edge": "the boundary lies outside the LR range",
                "grid": "a grid sweep, no search",
                "running": "the search had not finished"}


def _matches(record: dict, ident: dict) -> bool:
    """Whether a search's cell report is the export cell ``ident`` (stabilizer + varying fields)."""
    for k, v in record.get("values", {}).items():
        if k == "stabilizers":
            k, v = "stabilizer", stabilizer_label(tuple(str(v).split("+")))
        if k in ident and str(ident[k]) != str(v):
            return False
    return True


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
    judged = {id(r): v for r, v in zip(rows, judge_rows(rows, cell_fields, kappa))}  # per cell of its sweep
    for key, rs in sorted(cells.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        ident = dict(zip(cell_fields, key))
        pts = [run_point(r) for r in rs]
        classes = [judged[id(r)][0] for r in rs]
        refs = list(dict.fromkeys(judged[id(r)][1] for r in rs))  # the cell's reference in each of its sweeps
        b = bracket(pts, crash, kappa, classes=classes)
        se, ce = b.crashed.get(b.stable_lr, (0, 0)), b.crashed.get(b.crash_lr, (0, 0))
        lrs_run = sorted({p.lr for p in pts})
        warmup = rs[0]["warmup_steps"]  # the cell's warmup, also where it is fixed (not a cell field)
        crashed = [c in crash for c in classes]
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
            "reference_lr": refs[0].lr if len(refs) == 1 else None,
            "reference_gain": refs[0].gain if len(refs) == 1 else None,
            "bracket_above_range": b.crash_lr is None, "bracket_below_range": b.stable_lr is None})
        value, covers = lr_sensitivity(pts, srange)
        l0s = [p.initial_loss for p in pts if p.initial_loss is not None]
        sens.append({**ident, "lr_sensitivity": value, "covers_range": covers,
                     "range_min": srange[0], "range_max": srange[1],
                     "lr_min": lrs_run[0], "lr_max": lrs_run[-1], "lrs": len(lrs_run),
                     "initial_loss": float(np.mean(l0s)) if l0s else None})
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
    from orchestrator.boundary_config import DEFAULTS

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
    header = tabs.cell_fields + [f"lr {fmt(lr)}" for lr in lrs]
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
            text = fmt(float(np.mean(losses)))
            cells.append(text if cls == "stable" else f"{text} ({cls})")
        body.append([fmt(r[f]) for f in tabs.cell_fields] + cells)
    return header, body


CLASS_ORDER = ("stable", "degraded", "collapsed", "diverged")


def row_fields_of(cell_fields: list[str]) -> list[str]:
    """A max-stable-LR table's or figure's rows: the cell without its depth (the columns) and its
    warmup (one table or figure each): the stabilizer and every other field that varies."""
    return [f for f in cell_fields if f not in ("depth", "warmup_steps")]


def row_key(r: dict, row_fields: list[str]) -> tuple:
    return tuple(r[f] for f in row_fields)


def row_labels(rs: list[dict], row_fields: list[str]) -> dict[tuple, str]:
    """The rows (cells without depth and warmup) of ``rs`` (trials or table rows), in order, each
    with its label: the stabilizer and every other field that varies (``none, width=64``)."""
    keys = sorted({row_key(r, row_fields) for r in rs},
                  key=lambda k: tuple((v is None, v) for v in k))  # numbers as numbers
    for text in (fmt, str):  # str where fmt's rounding would give two cells one label
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
    """One cell's boundary: 'LR50 [low, high]' (90 % interval); a censored cell (LR50 outside the
    LR range: ``censored``) its one-sided bound, '> bound (above range)' / '< bound (below range)';
    the stop mark when not converged."""
    if r.get("censored") == "above":
        text = f"> {fmt(r['lr50_bound'])} (above range)"
    elif r.get("censored") == "below":
        text = f"< {fmt(r['lr50_bound'])} (below range)"
    else:
        text = f"{fmt(r['lr50'])} [{fmt(r['lr50_low'])}, {fmt(r['lr50_high'])}]"
    text += stop_mark(r)
    if with_trials:
        text += f" ({r['n_trials']})"
    return text


def band_text(r: dict) -> str:
    """The band 'lr10–lr90 (x ratio)', '–' for a censored cell (no band the prior made)."""
    if r.get("censored") or r.get("lr10") is None:
        return "–"
    return f"{fmt(r['lr10'])}–{fmt(r['lr90'])} (x{r['band']:.2g})"


def _method_label(m: str) -> str:
    return {"bisect": "bisect (one-seed look)", "psi": "psi", "grid": "grid"}.get(m, m)


def pivot_max_stable(rows: list[dict], cell_fields: list[str]) -> tuple[list[str], list[list[str]]]:
    """Stabilizer (and other fields) as rows, depth as columns. One depth: columns LR50 [90 %
    interval], the band lr10-lr90, trials (seeds), the search (method: stop reason), and the old
    one-seed-vote bracket; several depths: 'LR50 [low, high] (trials)' per depth."""
    row_fields = row_fields_of(cell_fields)
    depths = sorted({r.get("depth") for r in rows}, key=lambda d: (d is None, d))
    one = len(depths) == 1
    if one:
        header = row_fields + ["LR50 [90 % interval]", "band lr10–lr90", "trials (seeds)", "search",
                               "bracket [stable, crashed]"]
        body = []
        for r in sorted(rows, key=lambda r: tuple(str(r[f]) for f in row_fields)):
            br = f"[{fmt(r['max_stable_lr'])}, {fmt(r['crash_lr'])}]" + (" *" if r["non_monotonic"] else "")
            body.append([fmt(r[f]) for f in row_fields] + [
                boundary_text(r), band_text(r),
                f"{r['n_trials']} ({r['n_seeds']})", f"{_method_label(r['method'])}: {r['stop_reason']}", br])
        return header, body
    header = row_fields + [f"depth {d}" if d is not None else "LR50 [90 % interval]" for d in depths]
    grid: dict[tuple, dict] = defaultdict(dict)
    for r in rows:
        grid[tuple(r[f] for f in row_fields)][r.get("depth")] = boundary_text(r, with_trials=True)
    body = [[fmt(k) for k in key] + [grid[key].get(d, "") for d in depths] for key in grid]
    return header, body


def boundary_caption(name: str, warmup, rows: list[dict], crit: str) -> str:
    methods = sorted({r["method"] for r in rows})
    res = sorted({r["resolution"] for r in rows if r.get("resolution")})
    marks = "; ".join(f"{m} = not converged: {STOP_REASONS[k]}" for k, m in MARKS.items()
                      if any(k in str(r["stop_reason"]).split("+") and not r["converged"] for r in rows))
    bis = ("; method bisect is a one-seed look, its interval is the same fit over the few LRs bisection ran"
           if "bisect" in methods else "")
    where = f", warmup {warmup} steps" if warmup is not None else ""
    censored = any(r.get("censored") for r in rows)
    return (f"Crash boundary, {name}{where}: LR50 (P(crash) = 0.5) with its {100 * psy.LEVEL:g} % interval, "
            f"from a logistic in log-LR with a crash floor below and a stable lapse above (each "
            f"{psy.FLOORS[0]:g}-{psy.FLOORS[-1]:g}, estimated) fitted to every run of the cell (grid posterior, "
            f"orchestrator/psychometric.py); band = where the transition has risen 10 % and 90 % of the way "
            f"from floor to ceiling; {crit}; converged = interval narrower than "
            f"x{'/'.join(f'{v:.3g}' for v in res)}"
            + (f"; > / < = censored: LR50 above / below the LR range, with its {100 * psy.LEVEL:g} % one-sided "
               "bound (no LR50 reported)" if censored else "")
            + (f"; {marks}" if marks else "") + bis
            + "; the bracket is the older summary (largest stable LR, smallest crashed LR above it; the runs at "
              "one LR vote, a tie is a crash; * = a crashed LR below the stable one)")


COMPARE_AXES = ("warmup_steps", "schedule", "depth")
"""The comparison axis of a table or figure: the first of these that varies (else the first other
varying field). Its values become a table's columns and a figure's line styles, so that e.g. warmup
0 and 50 of one cell sit side by side."""
SPLIT_AXES = ("depth",)
"""Fields that get a table (and a loss-vs-LR figure) of their own per value, unless one of them is
the comparison axis itself."""


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


def value_order(v: Any) -> tuple:
    """A sort key for axis values: numbers as numbers, then strings, None last."""
    return (v is None, not isinstance(v, (int, float)), v if isinstance(v, (int, float)) else str(v))


def sorted_values(values) -> list:
    return sorted(set(values), key=value_order)


def split_rows(rows: list[dict], split: list[str]) -> list[tuple[dict[str, Any], list[dict]]]:
    """``rows`` grouped by the values of the ``split`` fields, in order: [(values, rows)]; one
    group ({}: all rows) when nothing splits."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[tuple(r.get(f) for f in split)].append(r)
    keys = sorted(groups, key=lambda k: tuple(value_order(v) for v in k))
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
        cols = sorted_values(r.get(layout.column) for r in sub) if layout.column else [None]
        keys = sorted({tuple(r.get(f) for f in layout.rows) for r in sub},
                      key=lambda k: tuple(value_order(v) for v in k))
        grid = {(tuple(r.get(f) for f in layout.rows), r.get(layout.column) if layout.column else None): r
                for r in sub}
        header = list(layout.rows) + ([f"{axis_name(layout.column)} {fmt(c)}" for c in cols] if layout.column
                                      else ["value"])
        body = [[fmt(v) for v in k] + [text(grid[(k, c)]) if (k, c) in grid else "–" for c in cols] for k in keys]
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
        where = ", ".join(f"{axis_name(f)} {fmt(v)}" for f, v in p.split.items())
        files += write_table(out, file_stem(f"{stem}_by_{axis_name(layout.column)}", p.split), p.header, p.body,
                             caption + (f"; {where}" if where else ""))
    return files


def best_text(r: dict) -> str:
    if r["best_final_loss"] is None:
        return f"– (0/{r['runs']})"
    return f"{fmt(r['best_final_loss'])} at {fmt(r['at_lr'])} ({r['learned_runs']}/{r['runs']})"


def sensitivity_text(r: dict) -> str:
    return fmt(r["lr_sensitivity"]) if r["covers_range"] else f"– ({r['lrs']} lrs, short of the range)"

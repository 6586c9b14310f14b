"""Ablation tables and plots, read back from MLflow alone (never from Ray's files).

``runs_table`` builds a pyarrow Table with one row per trial (schema :data:`SCHEMA`): the trial's
config, its outcome and final metrics. From it:

(a) ``max_stable_lr``: per cell (stabilizer x depth x warmup [x any other swept field]) the largest
    stable LR below the smallest crashed one, with the bracket and how many seeds crashed at each
    end; one table per warmup setting, stabilizers as rows, depths as columns. Outcomes use the
    boundary search's rules (diverged; degraded = final loss > ``degraded_ratio`` x the cell's best
    at an LR above the best one).
(b) ``lr_sensitivity``: Wortsman et al. (2023), Sec. 3.2: E_lr[min(L(lr), L0) - min_lr L(lr)] over
    the LRs run in the cell, L0 the initial loss (a crashed run counts as L0).
(c) ``best_loss``: the best final validation loss per cell and the LR that reached it.

Each table is written as Markdown and LaTeX (booktabs), the trials as Parquet and CSV; all are
logged as artifacts of the sweep's parent run. ``report`` draws loss-vs-LR curves (a panel per
depth, one curve per stabilizer, crashed runs marked) and a heatmap of the max stable LR.
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

from orchestrator.boundary import BoundaryConfig, Obs, bracket, classify
from orchestrator.tracking import TAG_KIND, TAG_SWEEP, TAG_TRIAL, Tracker
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


RESULT_METRICS = ("initial_loss", "final_loss", "best_loss", "final_train_loss", "wall_time", "throughput")
PROBE_METRICS = ("loss", "val_loss", "grad_norm", "param_norm", "attn_entropy/min", "attn_entropy/mean",
                 "spectral_conc/max", "qk_sigma1/max", "max_logit", "tev/mean", "tev/std",
                 "weyl/fire_rate_cum")

SCHEMA = pa.schema(
    [pa.field("experiment", pa.string()), pa.field("sweep", pa.string()), pa.field("run_id", pa.string()),
     pa.field("trial_id", pa.string()), pa.field("label", pa.string()), pa.field("status", pa.string()),
     pa.field("divergence_kind", pa.string()), pa.field("divergence_step", pa.int64()),
     pa.field("steps_run", pa.int64()), pa.field("node_id", pa.string()), pa.field("device_name", pa.string()),
     pa.field("stabilizer", pa.string())]
    + _config_fields()
    + [pa.field(m, pa.float64()) for m in RESULT_METRICS]
    + [pa.field("last/" + m, pa.float64()) for m in PROBE_METRICS]
)
"""One row per trial. Config columns keep TrialConfig's names and types (tuples and mappings as
JSON strings); ``final_loss`` is +inf for a diverged trial; ``last/*`` are the last probed values."""


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
            "status": tags.get("status"), "divergence_kind": tags.get("divergence_kind") or None,
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


# --------------------------------------------------------------------------------- the tables
@dataclasses.dataclass
class Tables:
    max_stable_lr: dict[Any, list[dict]]   # warmup -> rows
    lr_sensitivity: list[dict]
    best_loss: list[dict]
    cell_fields: list[str]


def _varying(table: pa.Table, exclude: set[str]) -> list[str]:
    fields = []
    for f in _config_fields():
        if f.name in exclude or f.name in ("stabilizers",):
            continue
        vals = set(table.column(f.name).to_pylist())
        if len(vals) > 1:
            fields.append(f.name)
    return fields


def ablation_tables(table: pa.Table, cfg: BoundaryConfig | None = None) -> Tables:
    cfg = cfg or BoundaryConfig(lr_range=(1e-12, 1e12))
    rows = [r for r in table.to_pylist() if r["status"] in ("stable", "diverged")]
    cell_fields = ["stabilizer"] + _varying(table, {"lr", "seed", "threads", "data_path"})
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        cells[tuple(r[f] for f in cell_fields)].append(r)

    msl, sens, best = defaultdict(list), [], []
    for key, rs in sorted(cells.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        ident = dict(zip(cell_fields, key))
        obs = [Obs(r["lr"], r["seed"], r["status"] == "diverged",
                   r["final_loss"] if r["final_loss"] is not None else math.inf) for r in rs]
        b = bracket(obs, cfg, seed=None)
        cls = classify(obs, cfg.degraded_ratio, cfg.degraded_is_crash)
        at = lambda lr: [c for o, _, c in cls if lr is not None and o.lr == lr]  # noqa: E731
        se, ce = at(b.stable_lr), at(b.crash_lr)
        lrs_run = sorted({o.lr for o in obs})
        msl[ident.get("warmup_steps", 0)].append({
            **ident, "max_stable_lr": b.stable_lr, "crash_lr": b.crash_lr,
            "stable_end": f"{sum(se)}/{len(se)}" if se else "", "crash_end": f"{sum(ce)}/{len(ce)}" if ce else "",
            "non_monotonic": b.non_monotonic, "lrs": len(lrs_run), "trials": len(obs),
            "above_range": b.crash_lr is None, "below_range": b.stable_lr is None})
        # (b) LR sensitivity over the LRs run, seeds averaged per LR
        init = np.nanmean([r["initial_loss"] for r in rs if r["initial_loss"] is not None]) if rs else math.nan
        per_lr = defaultdict(list)
        for o in obs:
            per_lr[o.lr].append(min(o.final_loss, init))
        capped = {lr: float(np.mean(v)) for lr, v in per_lr.items()}
        best_val = min(capped.values())
        sens.append({**ident, "lr_sensitivity": float(np.mean([v - best_val for v in capped.values()])),
                     "lr_min": lrs_run[0], "lr_max": lrs_run[-1], "lrs": len(lrs_run),
                     "initial_loss": float(init)})
        finite = [o for o in obs if math.isfinite(o.final_loss) and not o.diverged]
        top = min(finite, key=lambda o: o.final_loss) if finite else None
        best.append({**ident, "best_final_loss": top.final_loss if top else None,
                     "at_lr": top.lr if top else None, "stable_runs": len(finite), "runs": len(obs)})
    return Tables(dict(msl), sens, best, cell_fields)


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


def pivot_max_stable(rows: list[dict], cell_fields: list[str]) -> tuple[list[str], list[list[str]]]:
    """Stabilizer (and other fields) as rows, depth as columns; cell text 'lr [stable, crash]'."""
    row_fields = [f for f in cell_fields if f not in ("depth", "warmup_steps")]
    depths = sorted({r.get("depth") for r in rows}, key=lambda d: (d is None, d))
    header = row_fields + [f"depth {d}" if d is not None else "max stable lr" for d in depths]
    grid: dict[tuple, dict] = defaultdict(dict)
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
        grid[tuple(r[f] for f in row_fields)][r.get("depth")] = text
    body = [[_fmt(k) for k in key] + [grid[key].get(d, "") for d in depths] for key in grid]
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
           cfg: BoundaryConfig | None = None, log_to_mlflow: bool = True) -> ExportResult:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = fetch_runs(tracking_uri, experiment, sweep)
    if not runs:
        raise ValueError(f"no trial runs in MLflow experiment {experiment!r}" + (f" for sweep {sweep!r}" if sweep else "")
                         + f" at {tracking_uri}")
    table = runs_table(runs, experiment)
    files = [out / "trials.parquet", out / "trials.csv"]
    pq.write_table(table, files[0])
    pacsv.write_csv(table, files[1])
    tabs = ablation_tables(table, cfg)
    name = sweep or experiment
    for warmup, rows in sorted(tabs.max_stable_lr.items(), key=lambda kv: str(kv[0])):
        h, b = pivot_max_stable(rows, tabs.cell_fields)
        cap = (f"Max stable learning rate, {name}, warmup {warmup} steps: largest stable LR [bracket]; "
               "(crashed seeds at the stable, crash end); * = a stable LR above a crashed one")
        stem = f"max_stable_lr_warmup{warmup}"
        files += _write(out, stem, h, b, cap)
    cols = tabs.cell_fields + ["lr_sensitivity", "lr_min", "lr_max", "lrs", "initial_loss"]
    files += _write(out, "lr_sensitivity", *flat_table(tabs.lr_sensitivity, cols),
                    f"LR sensitivity (Wortsman et al. 2023), {name}: E_lr[min(L, L0) - min L] over the LRs run")
    cols = tabs.cell_fields + ["best_final_loss", "at_lr", "stable_runs", "runs"]
    files += _write(out, "best_loss", *flat_table(tabs.best_loss, cols), f"Best final validation loss per cell, {name}")
    (out / "max_stable_lr.json").write_text(json.dumps(tabs.max_stable_lr, indent=1, default=str))
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
def report(tracking_uri: str, experiment: str, sweep: str | None, out_dir: str | Path,
           cfg: BoundaryConfig | None = None, log_to_mlflow: bool = True) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ex = export(tracking_uri, experiment, sweep, out_dir, cfg, log_to_mlflow=False)
    out = Path(out_dir)
    rows = [r for r in ex.table.to_pylist() if r["status"] in ("stable", "diverged")]
    warmups = sorted({r["warmup_steps"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    stabs = sorted({r["stabilizer"] for r in rows})
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(stabs)}
    files = []
    for w in warmups:
        fig, axes = plt.subplots(1, len(depths), figsize=(4.2 * len(depths), 3.6), squeeze=False, sharey=True)
        for ax, d in zip(axes[0], depths):
            sub = [r for r in rows if r["warmup_steps"] == w and r["depth"] == d]
            top = max([r["initial_loss"] for r in sub if r["initial_loss"]] or [1.0])
            for s in stabs:
                pts = sorted((r["lr"], r["final_loss"], r["status"]) for r in sub if r["stabilizer"] == s)
                if not pts:
                    continue
                by_lr = defaultdict(list)
                for lr, loss, st in pts:
                    by_lr[lr].append(loss if st == "stable" and math.isfinite(loss) else math.nan)
                xs = sorted(by_lr)
                ys = [np.nanmean(by_lr[x]) if not all(math.isnan(v) for v in by_lr[x]) else math.nan for x in xs]
                ax.plot(xs, ys, "o-", color=colors[s], label=s, ms=4)
                crashed = [lr for lr, loss, st in pts if st == "diverged"]
                ax.plot(crashed, [top] * len(crashed), "x", color=colors[s], ms=8, mew=2)
            ax.set_xscale("log")
            ax.set_xlabel("learning rate")
            ax.set_title(f"depth {d}, warmup {w}")
            ax.axhline(top, color="grey", lw=0.5, ls=":")
        axes[0][0].set_ylabel("final validation loss (x = diverged)")
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        path = out / f"loss_vs_lr_warmup{w}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        files.append(path)

        # depth is a cell field only when it varies; otherwise every cell has the one depth
        cells = {(r["stabilizer"], r.get("depth", depths[0])): r for r in ex.tables.max_stable_lr.get(w, [])}
        grid = np.full((len(stabs), len(depths)), np.nan)
        for i, s in enumerate(stabs):
            for j, d in enumerate(depths):
                c = cells.get((s, d))
                if c and c["max_stable_lr"]:
                    grid[i, j] = math.log10(c["max_stable_lr"])
        fig, ax = plt.subplots(figsize=(3.2 + 1.3 * len(depths), 1.2 + 0.5 * len(stabs)))
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(depths)), [f"depth {d}" for d in depths])
        ax.set_yticks(range(len(stabs)), stabs)
        for i in range(len(stabs)):
            for j in range(len(depths)):
                c = cells.get((stabs[i], depths[j]))
                if c:
                    txt = _fmt(c["max_stable_lr"]) + ("+" if c["above_range"] else "")
                    ax.text(j, i, txt, ha="center", va="center", color="w", fontsize=8)
        fig.colorbar(im, ax=ax, label="log10 max stable LR")
        ax.set_title(f"max stable LR, warmup {w}")
        fig.tight_layout()
        path = out / f"max_stable_lr_warmup{w}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        files.append(path)
    if log_to_mlflow and sweep:
        _log_artifacts(tracking_uri, experiment, sweep, ex.files + files, "report")
    return files

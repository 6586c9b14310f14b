"""``export`` (the tables) and ``report`` (the tables, the figures and the forensics), composed from
the layers: ``orchestrator.runs`` (MLflow -> one typed table) -> ``orchestrator.tables`` and
``orchestrator.figures`` (written through ``orchestrator.writers``) -> ``orchestrator.forensics``.

``export`` writes the trials as Parquet and CSV, each ablation table as Markdown and LaTeX, the
boundary rows as ``boundary.parquet`` and ``max_stable_lr.json``; ``report`` adds the figures and the
forensic figures. Both log what they wrote as artifacts of the sweep's parent run
(``Tracker.log_sweep_artifacts``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from orchestrator import psychometric as psy
from orchestrator.figures import (boundary_compare_figures, boundary_fits, boundary_grid, boundary_heatmap,
                                  boundary_points, loss_figures, save)
from orchestrator.forensics import forensics
from orchestrator.mlflow_store import Tracker
from orchestrator.runs import FINISHED, fetch_runs, runs_table, search_records, table_criterion, with_outcomes
from orchestrator.tables import (STOP_REASONS, Tables, ablation_tables, best_text, boundary_caption, boundary_text,
                                 final_loss_grid, pivot_max_stable, sensitivity_text, write_comparison)
from orchestrator.writers import flat_table, fmt, write_table
from workloads.outcome import DEFAULT_CRASH, DEFAULT_KAPPA


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
        files += write_table(out, f"max_stable_lr_warmup{warmup}", h, b, boundary_caption(name, warmup, rows, crit))
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
    files += write_table(out, "lr_sensitivity", *flat_table(tabs.lr_sensitivity, cols),
                         f"LR sensitivity (Wortsman et al. 2023), {name}: E[min(L, L0) - L*] over lr log-uniform in "
                         f"[{fmt(lo)}, {fmt(hi)}] (trapezoid in log-LR; L0 = loss before training, a non-finite "
                         "loss counts as L0); no value where a cell's LRs do not cover the range")
    grid = final_loss_grid(tabs)
    if grid:
        files += write_table(out, "final_loss", *grid,
                             f"Final validation loss, {name}, per cell and learning rate (mean over seeds of the "
                             f"majority class, named unless stable; inf = the loss became non-finite); {crit}")
    cols = tabs.cell_fields + ["best_final_loss", "at_lr", "learned_runs", "runs"]
    files += write_table(out, "best_loss", *flat_table(tabs.best_loss, cols),
                         f"Best final validation loss per cell, {name} (runs that neither diverged nor collapsed)")
    files += write_comparison(out, "best_loss", tabs.best_loss, tabs.cell_fields, best_text,
                              f"Best final validation loss per cell, {name}, at the LR that reached it (runs "
                              "that neither diverged nor collapsed / runs)")
    files += write_comparison(out, "lr_sensitivity", tabs.lr_sensitivity, tabs.cell_fields, sensitivity_text,
                              f"LR sensitivity (Wortsman et al. 2023), {name}: E[min(L, L0) - L*] over lr "
                              f"log-uniform in [{fmt(lo)}, {fmt(hi)}]; lower is less sensitive; – where a "
                              "cell's LRs do not cover the range")
    (out / "max_stable_lr.json").write_text(json.dumps(
        {"crash": list(crash), "kappa": kappa, "criterion": crit, "level": psy.LEVEL, "model": psy.model_description(),
         "stop_reasons": STOP_REASONS, "tables": tabs.max_stable_lr}, indent=1, default=str))
    files.append(out / "max_stable_lr.json")
    if log_to_mlflow and sweep:
        Tracker(tracking_uri, experiment).log_sweep_artifacts(sweep, files, "tables")
    return ExportResult(out, files, table, tabs)


def report(tracking_uri: str, experiment: str, sweep: str | None, out_dir: str | Path,
           crash=DEFAULT_CRASH, kappa: float = DEFAULT_KAPPA, sensitivity_range: tuple[float, float] | None = None,
           log_to_mlflow: bool = True) -> list[Path]:
    """Loss vs LR (``loss_figure``: every run, one figure per depth with every warmup on its axes;
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
    vary_depth = "depth" in ex.tables.cell_fields
    warmups = sorted({r["warmup_steps"] for r in ex.table.to_pylist() if r["status"] in FINISHED})
    crit = table_criterion(ex.table, crash, kappa)
    files: list[Path] = []
    files += loss_figures(ex.table, out, crit)
    brows = [{"warmup_steps": w, **r} for w, rs in ex.tables.max_stable_lr.items() for r in rs]
    files += boundary_compare_figures(plt, brows, ex.tables.cell_fields, out, crit)
    for w in warmups:
        grid = boundary_grid(ex.tables.max_stable_lr.get(w, []), ex.tables.cell_fields)
        fig = (boundary_heatmap if vary_depth else boundary_points)(plt, grid, w, crit)
        files += save(fig, out, f"max_stable_lr_warmup{w}")
        plt.close(fig)
        fig = boundary_fits(plt, ex.tables, w, crit)
        files += save(fig, out, f"boundary_fit_warmup{w}")
        plt.close(fig)
    _, forensic = forensics(tracking_uri, experiment, sweep, out, crash, kappa, log_to_mlflow=False, with_figures=True,
                            table=ex.table)
    files += [f for f in forensic if f.suffix in (".png", ".pdf")]
    if log_to_mlflow and sweep:
        Tracker(tracking_uri, experiment).log_sweep_artifacts(sweep, ex.files + files, "report")
    return files
